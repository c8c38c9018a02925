"""FastV pruning: hand references for the masked forward, the ranking rules and the FLOPs, and
accuracy on the world's questions with toy-llava."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import capture
from mmscope.core.state import model_state
from mmscope.core.targets import Predicted, TokenId
from mmscope.methods.analysis import make_analysis
from mmscope.methods.token.pruning import (
    FastV,
    PruningResult,
    flops_saved,
    image_positions,
    masked_logits,
    pruned_count,
    pruned_positions,
    rank_scores,
)

PROMPTS = ["what color is the circle ?", "where is the blue square ?"]


@pytest.fixture
def pair(tiny_llava, scene_image):
    """Two items of different lengths (the shorter one is left-padded)."""
    return tiny_llava.prepare([scene_image, scene_image.rotate(90)], PROMPTS)


def _dropped_logits(vlm, inputs, k: int, pruned: list[int]) -> torch.Tensor:
    """Hand reference on one unpadded item: run layers >= k on the kept tokens only, with their
    original position ids (the pruned tokens removed from the sequence, as FastV does)."""
    lm = vlm.model.model.language_model
    with torch.no_grad(), capture(vlm, f"lm.layer[{k - 1}]") as cap:
        vlm.forward(inputs)
    length = inputs.input_ids.shape[1]
    keep = [p for p in range(length) if p not in pruned]
    h = cap[f"lm.layer[{k - 1}]"][:, keep]
    pos = torch.tensor(keep).unsqueeze(0)
    n = len(keep)
    causal = torch.full((n, n), torch.finfo(h.dtype).min).triu(1).view(1, 1, n, n)
    with torch.no_grad():
        rope = lm.rotary_emb(h, position_ids=pos)
        for layer in range(k, vlm.num_layers("lm.layer")):
            out = vlm.resolve(f"lm.layer[{layer}]")(
                h, attention_mask=causal, position_ids=pos, position_embeddings=rope
            )
            h = out[0] if isinstance(out, tuple) else out
        return vlm.resolve("lm_head")(vlm.resolve("lm.norm")(h))[0, -1].float()


def test_masked_forward_equals_dropping_the_tokens(tiny_llava, scene_image):
    inputs = tiny_llava.prepare(scene_image, PROMPTS[0])
    img = image_positions(inputs, 0)
    pruned = img[::3] + [img[-1]]
    got = masked_logits(tiny_llava, inputs, [(1, [pruned])])[0, 0]
    want = _dropped_logits(tiny_llava, inputs, 1, pruned)
    assert torch.allclose(got, want, atol=1e-5)
    # and pruning changes the answer's logits at all (the reference is not vacuous)
    plain = masked_logits(tiny_llava, inputs, [(1, [[]])])[0, 0]
    assert not torch.allclose(plain, want, atol=1e-3)


def test_nothing_pruned_is_the_plain_forward(tiny_llava, pair):
    with torch.no_grad():
        plain = tiny_llava.forward(pair).logits[:, -1].float()
    got = masked_logits(tiny_llava, pair, [(1, [[], []])])[0]
    # the masked layers run eager attention, the others as loaded: equal up to rounding
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)


def test_batched_settings_equal_one_item_one_setting_at_a_time(tiny_llava, pair, scene_image):
    img = [image_positions(pair, b) for b in range(2)]
    settings = [(1, [img[0][:5], img[1][3:9]]), (1, [img[0][-2:], []])]
    both = masked_logits(tiny_llava, pair, settings)
    for s, (k, pruned) in enumerate(settings):
        for b, image in enumerate([scene_image, scene_image.rotate(90)]):
            one = tiny_llava.prepare(image, PROMPTS[b])
            shift = image_positions(one, 0)[0] - img[b][0]  # no left padding alone
            alone = masked_logits(tiny_llava, one, [(k, [[p + shift for p in pruned[b]]])])
            assert torch.allclose(both[s, b], alone[0, 0], atol=1e-5)


def test_ranking_rules_by_hand(tiny_llava, pair):
    with torch.no_grad(), capture(tiny_llava, "lm.layer[0].attn.probs") as cap:
        tiny_llava.forward(pair)
    probs = cap["lm.layer[0].attn.probs"]
    b = 1  # the padded item
    img = image_positions(pair, b)
    length = probs.shape[-1]
    last = torch.tensor([probs[b, :, -1, j].mean().item() for j in img])
    received = torch.tensor([probs[b, :, j + 1 :, j].mean().item() for j in img])
    assert torch.allclose(rank_scores(probs, img, b, "last"), last, atol=1e-6)
    assert torch.allclose(rank_scores(probs, img, b, "received"), received, atol=1e-6)
    assert length - 1 > img[-1]  # every image token has later queries
    for scores in (last, received):
        pruned = pruned_positions(scores, img, 0.5)
        assert len(pruned) == 8 == pruned_count(16, 0.5)
        kept = [p for p in img if p not in pruned]
        lowest = max(scores[img.index(p)] for p in pruned)
        assert all(scores[img.index(p)] >= lowest for p in kept)


def test_flops_formula_by_hand():
    # f(n) = 4nd^2 + 2n^2 d + 2ndm with d=2, m=3: f(10) = 160 + 400 + 120, f(8) = 128 + 256 + 96
    assert flops_saved(10, 4, 2, 3, layers=4, k=1, ratio=0.5) == pytest.approx(
        1 - (680 + 3 * 480) / (4 * 680)
    )
    assert flops_saved(10, 4, 2, 3, layers=4, k=1, ratio=0.0) == 0.0
    # the paper's headline: LLaVA-1.5-13B (d=5120, m=13824, L=40), K=2, R=50% of 576 image
    # tokens, ~600-640 tokens in all: about 45% fewer FLOPs
    for n in (600, 640):
        assert 0.42 < flops_saved(n, 576, 5120, 13824, layers=40, k=2, ratio=0.5) < 0.47


def test_analysis_by_hand_on_a_tiny_model(tiny_llava, pair):
    before = model_state(tiny_llava.model)
    result = FastV(layers=(1,), ratios=(0.0, 0.5), batch_size=3)(tiny_llava, pair)
    assert model_state(tiny_llava.model) == before
    assert isinstance(result, PruningResult)
    assert result.accuracy.shape == (2, 1, 2) and result.flops_saved.shape == (1, 2)
    # the default target is the unpruned model's own answer: baseline 1, R=0 the same
    assert result.baseline == 1.0 and np.all(result.accuracy[:, :, 0] == 1.0)
    # the analysis' accuracy is the hand pipeline's (rank at layer 0, block from layer 1 on)
    with torch.no_grad(), capture(tiny_llava, "lm.layer[0].attn.probs") as cap:
        answer = tiny_llava.forward(pair).logits[:, -1].argmax(-1)
    for r, rule in enumerate(("last", "received")):
        pruned = [
            pruned_positions(rank_scores(cap["lm.layer[0].attn.probs"], img, b, rule), img, 0.5)
            for b, img in enumerate(image_positions(pair, b) for b in range(2))
        ]
        logits = masked_logits(tiny_llava, pair, [(1, pruned)])[0]
        assert result.accuracy[r, 0, 1] == (logits.argmax(-1) == answer).float().mean().item()
    # FLOPs by hand: d=32, m=64, L=2, K=1; item b has n_b tokens, 16 image tokens
    lengths = pair.attention_mask.sum(-1).tolist()

    def f(n: float) -> float:
        return 4 * n * 32**2 + 2 * n**2 * 32 + 2 * n * 32 * 64

    want = np.mean([1 - (f(n) + f(n - 8)) / (2 * f(n)) for n in lengths])
    assert result.flops_saved[0, 1] == pytest.approx(want) and result.flops_saved[0, 0] == 0
    d = result.to_dict()
    assert d["accuracy"] == result.accuracy.tolist() and d["n"] == 2


def test_every_architecture(any_vlm, scene_image):
    before = model_state(any_vlm.model)
    prompt = "a red circle" if any_vlm.contrastive else "what color is the circle ?"
    inputs = any_vlm.prepare([scene_image, scene_image], [prompt, prompt])
    if any_vlm.contrastive:
        with pytest.raises(NotApplicableError, match="contrastive"):
            FastV(layers=(1,))(any_vlm, inputs)
    elif any_vlm.capabilities.images_in != "sequence":  # Mllama: no image tokens to prune
        with pytest.raises(NotApplicableError, match="image tokens in the language model"):
            FastV(layers=(1,))(any_vlm, inputs)
    else:
        result = FastV(layers=(1,), ratios=(0.0, 1.0))(any_vlm, inputs, Predicted())
        assert result.accuracy.shape == (2, 1, 2)
        assert np.all(result.accuracy[:, :, 0] == result.baseline)
        assert 0 < result.flops_saved[0, 1] < 1
    assert model_state(any_vlm.model) == before


def test_settings_and_misuse(tiny_llava, pair):
    with pytest.raises(InputError):
        FastV(ratios=(0.5, 1.5))
    with pytest.raises(InputError):
        FastV(rules=("first",))
    with pytest.raises(InputError):
        FastV(layers=(0,))
    with pytest.raises(InputError, match="1..1"):
        FastV(layers=(2,))(tiny_llava, pair)  # tiny_llava has 2 layers
    with pytest.raises(InputError, match="3 target token ids"):
        FastV(layers=(1,))(tiny_llava, pair, TokenId([1, 2, 3]))
    assert isinstance(make_analysis("fastv", layers=(1,)), FastV)


@pytest.fixture(scope="module")
def world_grid(toy_llava):
    """100 world questions; target: the first token of each true answer."""
    from mmscope.world.items import world_items

    items = world_items(100, seed=0)
    inputs = toy_llava.prepare([i.image for i in items], [i.prompt for i in items])
    ids = [toy_llava.tokenizer.encode(i.answer, add_special_tokens=False)[0] for i in items]
    analysis = FastV(layers=(1, 2, 3), ratios=(0.25, 0.5, 0.9), batch_size=4)
    return analysis(toy_llava, inputs, TokenId(ids))


def test_world_accuracy_breaks_when_pruning_early(world_grid):
    """Measured (n=100, seed 0): baseline 0.98. Accuracy at R = 0.25/0.5/0.9, last/received:
    K=1 0.97/0.97, 0.92/0.89, 0.74/0.65; K=2 0.98/0.94, 0.93/0.88, 0.82/0.78; K=3 0.98/0.98,
    0.98/0.98, 0.98/0.95. The question comes before the image and the last token reads the
    image in layer 2 (see the knockout test): pruning after layer 1 or 2 removes image tokens
    before they are read and breaks by R = 0.9; pruning after layer 3 costs nothing."""
    res = world_grid
    assert res.baseline > 0.9  # the toy answers most world questions
    for r in range(2):
        k1, k2, k3 = res.accuracy[r]
        assert k1[2] < k1[0] - 0.15  # R=0.9 at K=1 hurts far more than R=0.25
        assert k2[2] < res.baseline - 0.1  # and still at K=2 (measured drops 0.16, 0.20)
        assert k3[2] > k2[2] + 0.1  # after layer 3 it holds (measured +0.16, +0.17)
        assert k3[2] >= res.baseline - 0.08  # measured 0.98, 0.95
        assert k2[2] >= k1[2]  # later pruning hurts less
    assert res.accuracy[0, 0, 2] > res.accuracy[1, 0, 2] + 0.05  # "last" beats "received"
    assert res.breaks_at("last", 1, drop=0.1) == 0.9
    assert res.breaks_at("last", 3) is None
    assert np.all(np.diff(res.flops_saved, axis=1) > 0)  # more pruning, more saved
    assert np.all(np.diff(res.flops_saved, axis=0) < 0)  # earlier pruning, more saved
    assert res.plot().axes  # draws
