"""Hooks: capture, patch and ablate at role sites, always removed (also on error)."""

import pytest
import torch

from mmscope.core.errors import SiteError
from mmscope.core.hooks import ablate, capture, mask_attention, patch
from mmscope.core.state import model_state


@pytest.fixture
def inputs(tiny_llava, scene_image):
    return tiny_llava.prepare(scene_image, "what color is the circle ?")


def test_capture_residual_equals_hidden_states(tiny_llava, inputs):
    with torch.no_grad(), capture(tiny_llava, ["lm.layer[0]", "lm.layer[-1]"]) as cap:
        out = tiny_llava.forward(inputs, output_hidden_states=True)
    assert torch.allclose(cap["lm.layer[0]"], out.hidden_states[1])
    # the last layer's residual, before the final norm
    last = cap["lm.layer[-1]"]
    norm = tiny_llava.resolve("lm.norm")
    assert torch.allclose(norm(last), out.hidden_states[-1], atol=1e-6)


def test_capture_projector_gives_one_row_per_image_token(tiny_llava, inputs):
    with torch.no_grad(), capture(tiny_llava, "projector") as cap:
        tiny_llava.forward(inputs)
    span = inputs.image_spans[0][0]
    assert cap["projector"].shape[-2] == span.end - span.start == 16


def test_patch_is_applied_and_removed(tiny_llava, inputs):
    before = model_state(tiny_llava.model)
    with torch.no_grad():
        clean = tiny_llava.forward(inputs).logits
        with patch(tiny_llava, {"lm.layer[1]": lambda h: h * 0}):
            patched = tiny_llava.forward(inputs).logits
        again = tiny_llava.forward(inputs).logits
    assert not torch.allclose(clean, patched)
    assert torch.equal(clean, again)
    assert model_state(tiny_llava.model) == before
    # zeroing the last residual leaves only lm_head(norm(0)) = lm_head bias-free zeros
    assert torch.allclose(patched, torch.zeros_like(patched))


def test_ablate_mlp_units_at_positions_matches_manual_patch(tiny_llava, inputs):
    site = "lm.layer[0].mlp.act"
    with torch.no_grad():
        with ablate(tiny_llava, site, positions=[3, 5], units=[0, 7]):
            a = tiny_llava.forward(inputs).logits

        def manual(x):
            x = x.clone()
            x[:, [3, 5], :][:, :, [0, 7]] = 0  # (no-op on a copy: checked below)
            y = x.clone()
            for p in (3, 5):
                for u in (0, 7):
                    y[:, p, u] = 0
            return y

        with patch(tiny_llava, {site: manual}):
            b = tiny_llava.forward(inputs).logits
        plain = tiny_llava.forward(inputs).logits
    assert torch.allclose(a, b)
    assert not torch.allclose(a, plain)


def test_hooks_removed_when_forward_raises(tiny_llava, inputs):
    before = model_state(tiny_llava.model)

    def boom(_):
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError, match="midway"), torch.no_grad():
        with patch(tiny_llava, {"lm.layer[1].attn": boom}):
            tiny_llava.forward(inputs)
    assert model_state(tiny_llava.model) == before


def test_attention_probs_switch_only_their_layer_to_eager(tiny_llava, inputs):
    before = tiny_llava.model.config._attn_implementation
    assert before != "eager"
    with torch.no_grad(), capture(tiny_llava, "lm.layer[0].attn.probs") as cap:
        tiny_llava.forward(inputs)
        assert tiny_llava.model.config._attn_implementation == before  # the model as it was
    probs = cap["lm.layer[0].attn.probs"]
    seq = inputs.input_ids.shape[1]
    assert probs.shape == (1, 2, seq, seq)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 2, seq), atol=1e-5)
    assert torch.all(probs.triu(1) == 0)  # causal
    assert tiny_llava.model.config._attn_implementation != "eager"


def test_gradients_at_sites(tiny_llava, inputs):
    with capture(tiny_llava, ["projector", "lm.layer[1]"], grads=True) as cap:
        logits = tiny_llava.forward(inputs).logits
        logits[0, -1, 7].backward()
    g = cap.grad("projector")
    assert g.shape == cap["projector"].shape and g.abs().sum() > 0
    # d logit / d last residual is lm_head row 7 pushed through the final norm: nonzero at -1 only
    g_last = cap.grad("lm.layer[1]")
    assert g_last[0, -1].abs().sum() > 0 and g_last[0, :-1].abs().sum() == 0
    tiny_llava.model.zero_grad(set_to_none=True)


def test_bad_sites_raise_site_error(tiny_llava):
    before = model_state(tiny_llava.model)
    with pytest.raises(SiteError, match="no role"):
        tiny_llava.resolve("lm.layer[0].nonsense")
    with pytest.raises(SiteError, match="out of range"):
        tiny_llava.resolve("lm.layer[9]")
    with pytest.raises(SiteError, match="needs a layer index"):
        tiny_llava.resolve("lm.layer")
    with pytest.raises(SiteError):
        with capture(tiny_llava, ["lm.layer[0]", "vision.layer[7]"]):
            pass
    assert model_state(tiny_llava.model) == before  # nothing added before the bad site


def test_mlp_activation_modules_are_distinct_per_layer(tiny_llava):
    acts = [tiny_llava.resolve(f"lm.layer[{i}].mlp.act") for i in range(2)]
    assert acts[0] is not acts[1]


def test_ablate_unbatched_vision_tokens_of_qwen(tiny_qwen2_vl):
    from PIL import Image

    inputs = tiny_qwen2_vl.prepare(Image.new("RGB", (56, 84), (200, 30, 30)), "what color is it ?")
    site = "vision.layer[0]"
    with torch.no_grad():
        with capture(tiny_qwen2_vl, site) as plain:
            tiny_qwen2_vl.forward(inputs)
        with ablate(tiny_qwen2_vl, site, positions=[0, 2]), capture(tiny_qwen2_vl, site) as cut:
            tiny_qwen2_vl.forward(inputs)
    a, b = plain[site], cut[site]
    assert a.dim() == 2  # (vision tokens, dim): no batch axis
    assert torch.all(b[[0, 2]] == 0) and torch.equal(a[1], b[1]) and torch.equal(a[3:], b[3:])


def test_patch_reaches_what_transformers_records(tiny_llava, inputs):
    """LLaVA reads its vision layer through transformers' own recording hooks; a patch must
    run before them, or it would silently change nothing."""
    site = tiny_llava.CAM_SITE  # the layer the projector reads
    with torch.no_grad():
        clean = tiny_llava.forward(inputs).logits
        with patch(tiny_llava, {site: lambda h: h * 0 + 5}):
            patched = tiny_llava.forward(inputs).logits
    assert not torch.allclose(clean, patched)


def test_heads_site_is_the_output_projection_input(tiny_llava, inputs):
    site = "lm.layer[0].attn.heads"
    with torch.no_grad(), capture(tiny_llava, [site, "lm.layer[0].attn"]) as cap:
        tiny_llava.forward(inputs)
    o_proj = tiny_llava.resolve(site)
    assert torch.allclose(o_proj(cap[site]), cap["lm.layer[0].attn"], atol=1e-6)
    # zeroing every head's slice leaves the projection's bias-free output at zero
    with torch.no_grad(), ablate(tiny_llava, site), capture(tiny_llava, "lm.layer[0].attn") as c2:
        tiny_llava.forward(inputs)
    assert torch.allclose(c2["lm.layer[0].attn"], torch.zeros(1))


def _manual_knockout(probs: torch.Tensor, query: int, keys: list[int]) -> torch.Tensor:
    """Blocking keys before the softmax = zeroing them after it and renormalising the row."""
    out = probs.clone()
    out[:, :, query, keys] = 0
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("vlm_name", ["tiny_llava", "tiny_clip"])
def test_mask_attention_renormalises_over_the_keys_left(vlm_name, request, scene_image):
    vlm = request.getfixturevalue(vlm_name)
    stack = "lm.layer" if vlm_name == "tiny_llava" else "vision.layer"
    prompt = "a red circle" if vlm.contrastive else "what color is the circle ?"
    inputs = vlm.prepare(scene_image, prompt)
    site = f"{stack}[1].attn"
    with torch.no_grad(), capture(vlm, site + ".probs") as cap:
        vlm.forward(inputs)
    probs = cap[site + ".probs"]
    length = probs.shape[-1]
    query, keys = length - 1, [1, 2, 5]
    block = torch.zeros(length, length, dtype=torch.bool)
    block[query, keys] = True
    before = model_state(vlm.model)
    with torch.no_grad(), mask_attention(vlm, {site: block}), capture(vlm, site + ".probs") as c2:
        vlm.forward(inputs)
    assert model_state(vlm.model) == before
    assert torch.allclose(c2[site + ".probs"], _manual_knockout(probs, query, keys), atol=1e-5)
