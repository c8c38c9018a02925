"""Contract: every hook operation on every architecture leaves the model exactly as found
(parameters, hooks, train/eval modes, requires_grad, grad mode, attention implementation),
also when the forward raises midway; and every role of every adapter resolves and fires."""

import pytest
import torch

from mmscope.core.errors import SiteError
from mmscope.core.hooks import ablate, capture, patch
from mmscope.core.registry import REGISTRY
from mmscope.core.state import model_state
from mmscope.models.base import parse_site

PROMPT = "what color is the circle ?"


def _sites(vlm) -> list[str]:
    """Every role, at the first layer where it resolves if it takes an index (layer 0, but on
    hybrid models a role such as ``lm.layer.attn`` exists on the softmax-attention layers only)."""
    sites = []
    for role in vlm.roles:
        base = role.removesuffix(".probs")
        if "{i}" not in vlm.ROLES[base]:
            sites.append(role)
            continue
        stack = next(s for s in vlm.LAYER_LISTS if base.startswith(s))
        at = [role.replace(".layer", f".layer[{i}]", 1) for i in range(vlm.num_layers(stack))]
        sites.append(next((s for s in at if _resolves(vlm, s)), at[0]))
    return sites


def _resolves(vlm, site: str) -> bool:
    try:
        vlm.resolve(site)
    except SiteError:
        return False
    return True


def _inputs(vlm, image):
    return vlm.prepare(image, "a red circle" if vlm.contrastive else PROMPT)


def test_every_adapter_has_a_tiny_model():
    from mmscope.toys.tiny import TINY

    families = {entry.obj.family for entry in REGISTRY.entries("adapter")}
    assert {"llava", "clip", "qwen2_vl"} <= families
    assert {f"tiny_{f}" for f in families} <= set(TINY)


def test_every_role_fires_on_a_forward(any_vlm, scene_image):
    sites = _sites(any_vlm)
    before = model_state(any_vlm.model)
    with torch.no_grad(), capture(any_vlm, sites) as cap:
        any_vlm.forward(_inputs(any_vlm, scene_image))
    missing = [s for s in sites if not cap.calls(s)]
    assert not missing, f"roles that did not fire: {missing}"
    for site in sites:
        if site.endswith(".probs"):
            probs = cap[site]
            assert torch.allclose(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-4)
    assert model_state(any_vlm.model) == before


@pytest.mark.parametrize("mode", ["eval", "train-partly-frozen"])
def test_state_unchanged_after_capture_patch_ablate_and_backward(any_vlm, scene_image, mode):
    model = any_vlm.model
    frozen = list(model.parameters())[:3]
    if mode != "eval":
        model.train()
        for p in frozen:
            p.requires_grad_(False)
    try:
        before = model_state(model)
        inputs = _inputs(any_vlm, scene_image)
        layer = "lm.layer[0]" if "lm.layer" in any_vlm.LAYER_LISTS else "text.layer[0]"
        with capture(any_vlm, [layer, "vision.layer[-1]"], grads=True) as cap:
            out = any_vlm.forward(inputs)
            score = (
                out.logits[0, -1].sum() if hasattr(out, "logits") else out.logits_per_image.sum()
            )
            score.backward()
        assert cap.grad(layer).shape == cap[layer].shape
        model.zero_grad(set_to_none=True)
        with torch.no_grad(), patch(any_vlm, {layer: lambda h: h + 1.0}):
            any_vlm.forward(inputs)
        with torch.no_grad(), ablate(any_vlm, [layer, "vision.layer[0].mlp.act"], positions=[0]):
            any_vlm.forward(inputs)
        assert model_state(model) == before
    finally:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)


def test_state_unchanged_when_forward_raises_midway(any_vlm, scene_image):
    before = model_state(any_vlm.model)
    stack = "lm.layer" if "lm.layer" in any_vlm.LAYER_LISTS else "text.layer"
    probs_site = f"{stack}[0].attn.probs"

    def boom(_):
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError, match="midway"):
        with (
            capture(any_vlm, ["vision.layer[0]", probs_site]),
            patch(any_vlm, {f"{stack}[-1]": boom}),
        ):
            any_vlm.forward(_inputs(any_vlm, scene_image))
    after = model_state(any_vlm.model)
    assert after == before
    assert parse_site(probs_site)[1] == 0
