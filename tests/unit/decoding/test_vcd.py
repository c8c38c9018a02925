"""VCD (Leng et al. 2024): the contrastive processor by hand, the diffusion noise against its
closed form, and the batched decoder against plain greedy and a two-forward reference loop."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import LogitsProcessorList

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.registry import REGISTRY
from mmscope.core.state import model_state
from mmscope.decoding.base import KIND, decoders, hf_generate, make_decoder
from mmscope.decoding.standard import Greedy
from mmscope.decoding.vcd import (
    VCD,
    VCDLogitsProcessor,
    alpha_bar,
    diffusion_noise,
    with_distorted,
)
from mmscope.world import DESCRIBE_PROMPT, render, sample_scenes

INF = math.inf


def _inputs(vlm, n=2):
    images = [render(s, 48).image for s in sample_scenes(n, 7)]
    prompts = [DESCRIBE_PROMPT, "is there a red circle in the image ?", "how many ?"][:n]
    return vlm.prepare(images, prompts).to(vlm.device)


# --- the processor -------------------------------------------------------------------------


def test_processor_scores_match_hand_computation():
    # Two items, vocabulary of 5. Item 0: log(0.1) = -2.303, so the cutoff is 2 - 2.303 =
    # -0.303: tokens 0, 1, 3 stay; token 2 (-1.0) and token 4 (-inf) are cut.
    clean = torch.tensor([[2.0, 1.0, -1.0, 0.5, -INF], [0.0, 0.0, -3.0, -2.0, 0.0]])
    distorted = torch.tensor([[1.0, 2.0, 0.0, -1.0, 0.0], [1.0, -1.0, 0.0, 0.0, 4.0]])
    scores = torch.cat([clean, distorted])
    out = VCDLogitsProcessor(alpha=1.0, beta=0.1)(torch.zeros(4, 3, dtype=torch.long), scores)
    # 2 * clean - distorted on the kept tokens; item 1 (cutoff -2.303) cuts only token 2
    # (-3.0), its token 3 (-2.0) stays.
    expected = torch.tensor([[3.0, 0.0, -INF, 2.0, -INF], [-1.0, 1.0, -INF, -4.0, -4.0]])
    assert torch.equal(out[:2], expected)
    assert torch.equal(out[2:], expected)  # both rows of an item get the same scores
    # alpha = 0.5 and beta = 0.3 (cutoff 2 - 1.204 = 0.796): tokens 0 and 1 of item 0 stay.
    out = VCDLogitsProcessor(alpha=0.5, beta=0.3)(torch.zeros(4, 3, dtype=torch.long), scores)
    assert torch.equal(out[0], torch.tensor([2.5, 0.5, -INF, -INF, -INF]))


def test_processor_cutoff_is_on_probabilities():
    gen = torch.Generator().manual_seed(3)
    clean, distorted = torch.randn(6, 50, generator=gen) * 3, torch.randn(6, 50, generator=gen)
    out = VCDLogitsProcessor(alpha=1.0, beta=0.2)(
        torch.zeros(12, 1, dtype=torch.long), torch.cat([clean, distorted])
    )
    p = clean.softmax(-1)
    keep = p >= 0.2 * p.max(-1, keepdim=True).values
    assert torch.equal(torch.isfinite(out[:6]), keep)
    assert torch.allclose(out[:6][keep], (2 * clean - distorted)[keep])


def test_processor_refuses_odd_batch():
    with pytest.raises(ValueError):
        VCDLogitsProcessor()(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 4))


def test_processor_sampling_is_one_hot_in_sync_and_follows_the_scores():
    # 4000 copies of one item: the draws must follow softmax(contrastive / temperature).
    clean = torch.tensor([2.0, 1.5, 1.0, -4.0])
    distorted = torch.tensor([1.0, 1.5, 0.0, 0.0])
    n = 4000
    scores = torch.cat([clean.expand(n, 4), distorted.expand(n, 4)])
    proc = VCDLogitsProcessor(alpha=1.0, beta=0.1, sample=True, temperature=2.0, seed=5)
    rng = torch.random.get_rng_state()
    out = proc(torch.zeros(2 * n, 1, dtype=torch.long), scores)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.equal(out[:n], out[n:])
    assert torch.equal((out == 0).sum(-1), torch.ones(2 * n, dtype=torch.long))
    assert torch.isneginf(out[out != 0]).all()
    chosen = out[:n].argmax(-1)
    assert not (chosen == 3).any()  # token 3 is implausible (p < 0.1 max p)
    want = (torch.tensor([3.0, 1.5, 2.0]) / 2.0).softmax(-1)  # (2 l - l') / T on tokens 0..2
    freq = torch.bincount(chosen, minlength=4)[:3].double() / n
    assert torch.allclose(freq, want.double(), atol=0.03)
    again = VCDLogitsProcessor(alpha=1.0, beta=0.1, sample=True, temperature=2.0, seed=5)
    assert torch.equal(again(torch.zeros(2 * n, 1, dtype=torch.long), scores), out)


# --- the distorted image -------------------------------------------------------------------


def test_alpha_bar_closed_form_and_indexing():
    betas = [1 / (1 + math.exp(-(-6 + 12 * i / 999))) * (5e-3 - 1e-5) + 1e-5 for i in range(1000)]
    assert alpha_bar(0) == pytest.approx(1 - betas[0], rel=1e-12)
    assert alpha_bar(500) == pytest.approx(math.prod(1 - b for b in betas[:501]), rel=1e-9)
    assert alpha_bar(999) == pytest.approx(math.prod(1 - b for b in betas), rel=1e-9)
    for bad in (-1, 1000, 2.5):
        with pytest.raises(InputError):
            alpha_bar(bad)


def test_diffusion_noise_scales_mean_and_variance():
    abar = alpha_bar(500)
    x = torch.full((4, 3, 64, 64), 2.0)
    rng = torch.random.get_rng_state()
    y = diffusion_noise(x, 500, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.mean().item() == pytest.approx(math.sqrt(abar) * 2.0, abs=0.02)
    assert y.var().item() == pytest.approx(1 - abar, rel=0.03)
    # Linear in the image with the same noise: y(x) - sqrt(abar) x does not depend on x.
    eps = diffusion_noise(torch.zeros_like(x), 500, seed=1)
    assert torch.allclose(y - math.sqrt(abar) * x, eps, atol=1e-5)
    assert torch.equal(diffusion_noise(x, 500, seed=1), y)
    assert not torch.equal(diffusion_noise(x, 500, seed=2), y)
    assert diffusion_noise(x.double(), 500).dtype == torch.float64


# --- the decoder ---------------------------------------------------------------------------


def test_registered():
    assert "vcd" in decoders()
    entry = REGISTRY.get("vcd", KIND)
    assert entry.family == "decoding/contrastive" and entry.paper == "Leng et al. 2024"


@pytest.mark.parametrize(
    "settings",
    [
        {"alpha": -1.0},
        {"beta": 0.0},
        {"beta": 1.5},
        {"noise_step": 1000},
        {"sample": 1},
        {"temperature": 0.0},
        {"top_p": 0.0},
        {"top_k": -1},
        {"seed": -1},
        {"gamma": 1.0},
    ],
)
def test_bad_settings(settings):
    with pytest.raises(InputError):
        make_decoder("vcd", **settings)
    decoding_only = {"noise_step", "gamma"}
    if not decoding_only & set(settings):  # the processor, used on its own, checks them too
        with pytest.raises(InputError):
            VCDLogitsProcessor(**settings)


def test_every_architecture(any_vlm):
    inputs = _inputs(any_vlm)
    if any_vlm.contrastive:
        with pytest.raises(NotApplicableError):
            VCD()(any_vlm, inputs, 4)
        return
    before, rng = model_state(any_vlm.model), torch.random.get_rng_state()
    texts = VCD()(any_vlm, inputs, 4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert VCD(sample=True)(any_vlm, inputs, 4) == VCD(sample=True)(any_vlm, inputs, 4)
    assert model_state(any_vlm.model) == before
    assert torch.equal(torch.random.get_rng_state(), rng)


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl"])
def test_alpha_zero_is_greedy(name, request):
    vlm = request.getfixturevalue(name)
    inputs = _inputs(vlm, 3)
    with torch.no_grad():
        ids = VCD(alpha=0.0).decode(vlm, inputs, 6)
        plain = Greedy().decode(vlm, inputs, 6)
    assert torch.equal(ids, plain)
    assert VCD(alpha=0.0)(vlm, inputs, 6) == vlm.generate(inputs, 6)


def _reference(vlm, inputs, steps, alpha=1.0, beta=0.1, noise_step=500, seed=0):
    """Clean forward, distorted forward (separately, without a cache), contrast, pick, append."""
    grid = inputs.tensors.get("image_grid_thw")  # each image its own seeded noise
    sizes = grid.prod(-1).tolist() if grid is not None else [1] * len(inputs.pixel_values)
    parts = torch.split(inputs.pixel_values, sizes)
    noisy = torch.cat([diffusion_noise(p, noise_step, seed) for p in parts])
    distorted = replace(inputs, tensors={**inputs.tensors, "pixel_values": noisy})
    tok = vlm.tokenizer
    ids = torch.zeros(inputs.batch_size, 0, dtype=torch.long)
    done = torch.zeros(inputs.batch_size, dtype=torch.bool)
    for _ in range(steps):
        logits = []
        for item in (inputs, distorted):
            x = item.extend(ids, keep=torch.ones_like(ids, dtype=torch.bool))
            extra = {}
            if vlm.family == "llava":  # left padding: positions count real tokens, as generate
                mask = x.attention_mask
                extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            # (Qwen2-VL computes its M-RoPE positions from the mask and the image grids.)
            with torch.no_grad():
                logits.append(vlm.model(**x.tensors, **extra).logits[:, -1].float())
        clean, dist = logits
        p = clean.softmax(-1)
        keep = p >= beta * p.max(-1, keepdim=True).values
        score = torch.where(keep, (1 + alpha) * clean - alpha * dist, -INF)
        nxt = torch.where(done, tok.pad_token_id, score.argmax(-1))
        ids = torch.cat([ids, nxt[:, None]], 1)
        done |= nxt == tok.eos_token_id
        if done.all():
            break
    return ids


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl"])
def test_batched_equals_two_forward_reference(name, request):
    vlm = request.getfixturevalue(name)
    inputs = _inputs(vlm, 3)  # different prompt lengths: left padding
    with torch.no_grad():
        plain = Greedy().decode(vlm, inputs, 5)
    changed = False
    for settings in ({}, {"alpha": 2.0, "beta": 0.01, "noise_step": 800, "seed": 4}):
        with torch.no_grad():
            ids = VCD(**settings).decode(vlm, inputs, 5)
        assert torch.equal(ids, _reference(vlm, inputs, 5, **settings))
        changed |= not torch.equal(ids, plain)
    assert changed  # the contrast changes the text on these models: the test can tell


def test_rows_stay_in_sync_and_seeds_repeat(tiny_llava):
    inputs = _inputs(tiny_llava, 2)
    decoder = VCD(sample=True, temperature=1.5, seed=3)
    pair = with_distorted(inputs, 500, 3)
    rng = torch.random.get_rng_state()
    with torch.no_grad():
        both = hf_generate(
            tiny_llava,
            pair,
            8,
            do_sample=False,
            logits_processor=LogitsProcessorList([decoder.processor()]),
        )
    assert torch.equal(both[:2], both[2:])
    assert torch.equal(torch.random.get_rng_state(), rng)
    texts = [VCD(sample=True, temperature=1.5, seed=s)(tiny_llava, inputs, 8) for s in range(4)]
    assert decoder(tiny_llava, inputs, 8) == texts[3]
    assert len({tuple(t) for t in texts}) > 1  # the seed matters
    # top_k = 1 leaves one token: sampling then equals greedy VCD.
    assert VCD(sample=True, top_k=1, seed=9)(tiny_llava, inputs, 8) == VCD(seed=9)(
        tiny_llava, inputs, 8
    )


def test_needs_an_image_and_leaves_the_model(tiny_llava):
    text_only = tiny_llava.prepare(None, "describe the image .")
    before, rng = model_state(tiny_llava.model), torch.random.get_rng_state()
    with pytest.raises(InputError):
        VCD()(tiny_llava, text_only, 4)
    assert model_state(tiny_llava.model) == before
    assert torch.equal(torch.random.get_rng_state(), rng)
