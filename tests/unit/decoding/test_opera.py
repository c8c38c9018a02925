"""OPERA (Huang et al. 2024) with a model: the candidate scores by hand, without penalty it is
Hugging Face's beam search, the batched candidate forward equals one forward per candidate,
rollbacks never re-choose a banned pair, and the decoder contract (see also
test_opera_state.py for the bookkeeping)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import mmscope.decoding.opera_search as search_mod
from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.state import model_state
from mmscope.decoding import generate, make_decoder
from mmscope.decoding.base import hf_generate
from mmscope.decoding.opera import OPERA, OPERAFast
from mmscope.decoding.opera_search import (
    Search,
    Settings,
    candidate_forward,
    candidate_scores,
    run,
    split_items,
)
from mmscope.world import DESCRIBE_PROMPT, render, sample_scenes

NEVER = 10**6  # a rollback threshold that is never reached


def _inputs(vlm, n=1, seed=5):
    images = [render(s, 48).image for s in sample_scenes(n, seed)]
    prompts = [DESCRIBE_PROMPT, "is there a red circle in the image ?", "how many ?"][:n]
    return vlm.prepare(images, prompts).to(vlm.device)


def _trim(ids: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row up to its first end of sequence (kept): Hugging Face pads after it with EOS,
    the decoders with the pad id."""
    return [row[: row.index(eos) + 1] if eos in row else row for row in ids.tolist()]


def _vocab(vlm) -> int:
    return int(vlm.model.config.get_text_config().vocab_size)


def test_candidate_scores_by_hand():
    # one beam, two candidates, a prompt of 4 positions (image at 1 and 2), one response token
    rows = torch.tensor([[[0.1, 0.2, 0.3, 0.1, 0.2, 0.1], [0.0, 0.5, 0.1, 0.1, 0.1, 0.2]]])
    top = torch.tensor([[2.0, 1.5]])
    columns = torch.log(torch.tensor([[50 * 0.4]], dtype=torch.float64))  # earlier row: 0.4
    image = torch.tensor([1, 2])
    s = Settings(penalty_weights=2.0)
    # early token: the logit plus weight times the attention on the image
    scores, cols, _ = candidate_scores(top, rows, columns, 4, image, 1, s)
    assert torch.allclose(scores, torch.tensor([[2.0 + 2 * 0.5, 1.5 + 2 * 0.6]]))
    # later token: column products 20 * 50 * 0.2 = 200 vs 50 * 0.1 = 5 (first candidate) and
    # 20 * 5 = 100 vs 10 (second), times 1e-7, times the weight 2
    scores, cols, location = candidate_scores(top, rows, columns, 4, image, 10, s)
    assert torch.allclose(cols.exp(), torch.tensor([[[200.0, 5.0], [100.0, 10.0]]]).double())
    assert torch.allclose(scores, torch.tensor([[2.0 - 2 * 200e-7, 1.5 - 2 * 100e-7]]))
    assert location.tolist() == [[0, 0]]


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl"])
def test_decoder_rolls_back_and_never_rechooses_a_banned_pair(name, request, monkeypatch):
    vlm = request.getfixturevalue(name)
    inputs = _inputs(vlm)
    real = search_mod.aggregate

    def fake(columns, factor=1e-7):  # aggregation always at token 11 once it exists
        penalty, location = real(columns, factor)
        return penalty, torch.full_like(location, 11 if columns.shape[-1] > 11 else 0)

    monkeypatch.setattr(search_mod, "aggregate", fake)
    with vlm.attention("eager"), torch.no_grad():
        search = Search(vlm, inputs, Settings(threshold=3), 30)
        out = search.run()
    assert len(out) == 30
    positions = [p for p, _, _ in search.rollbacks]
    # 4 rollbacks to 12 ban its 4 x 5 chosen pairs; the 5th would leave fewer than 5 of the 25
    # candidates, so the position before takes over
    assert positions == [12] * 4 + [11] * 4
    for k, (_, banned, chosen) in enumerate(search.rollbacks):
        assert len(banned) == 5 * (k % 4 + 1)
        assert not set(map(tuple, chosen.tolist())) & set(map(tuple, banned.tolist()))


# --- against Hugging Face's beam search ----------------------------------------------------


class _TopRenormalised(LogitsProcessor):
    """Beam search over each beam's top-c tokens, renormalised (OPERA with no penalty)."""

    def __init__(self, c: int) -> None:
        self.c = c

    def __call__(self, input_ids, scores):
        values, index = scores.topk(self.c, dim=-1)
        kept = torch.full_like(scores, -math.inf).scatter(1, index, values)
        return kept.log_softmax(-1)


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl"])
def test_without_penalty_over_all_tokens_it_is_beam_search(name, request):
    vlm = request.getfixturevalue(name)
    inputs = _inputs(vlm, n=3)  # padded batch
    eos = int(vlm.model.generation_config.eos_token_id)
    with vlm.attention("eager"):
        beam = generate(vlm, inputs, "beam", max_new_tokens=14)
        with torch.no_grad():
            ref = hf_generate(vlm, inputs, 14, do_sample=False, num_beams=5)
    opera = OPERA(penalty_weights=0.0, threshold=NEVER, num_attn_candidates=_vocab(vlm))
    with torch.no_grad():
        ours = opera.decode(vlm, inputs, 14)
    assert _trim(ours, eos) == _trim(ref, eos)
    assert generate(vlm, inputs, opera, max_new_tokens=14) == beam


def test_min_new_tokens_of_the_generation_config_bars_the_end(toy_llava):
    """The benchmark makes every decoder generate as many tokens by setting min_new_tokens:
    OPERA then leaves the end-of-sequence token out of the candidates (Hugging Face masks it
    after its log-softmax, so the two searches may part after the forced length's first
    choices)."""
    inputs = _inputs(toy_llava, n=2)
    eos = int(toy_llava.model.generation_config.eos_token_id)
    config = toy_llava.model.generation_config
    saved = config.min_new_tokens
    plain = OPERA().decode(toy_llava, inputs, 20)
    config.min_new_tokens = 20
    try:
        forced = OPERA().decode(toy_llava, inputs, 20)
    finally:
        config.min_new_tokens = saved
    assert (plain == eos).any(1).all()  # toy captions end by themselves
    assert forced.shape[1] == 20 and not (forced == eos).any()


def test_without_penalty_it_is_beam_search_over_renormalised_candidates(tiny_llava):
    inputs = _inputs(tiny_llava, n=2)
    with tiny_llava.attention("eager"), torch.no_grad():
        ref = hf_generate(
            tiny_llava,
            inputs,
            16,
            do_sample=False,
            num_beams=5,
            logits_processor=LogitsProcessorList([_TopRenormalised(5)]),
        )
    with torch.no_grad():
        ours = OPERA(penalty_weights=0.0, threshold=NEVER).decode(tiny_llava, inputs, 16)
    assert _trim(ours, 3) == _trim(ref, 3)


@pytest.mark.parametrize("candidates", [1, 52])
def test_toy_llava_captions_end_as_beam_search_ends(toy_llava, candidates):
    """The trained toy ends its captions: finished hypotheses and early stopping as in HF, also
    with fewer candidates (1 x 5) than the 2 x 5 continuations beam search keeps."""
    images = [render(s, 48).image for s in sample_scenes(2, 11)]
    inputs = toy_llava.prepare(images, [DESCRIBE_PROMPT] * 2)
    processors = LogitsProcessorList([_TopRenormalised(candidates)])
    with torch.no_grad():
        ref = hf_generate(
            toy_llava, inputs, 24, do_sample=False, num_beams=5, logits_processor=processors
        )
        plain = hf_generate(toy_llava, inputs, 24, do_sample=False, num_beams=5)
    opera = OPERA(penalty_weights=0.0, threshold=NEVER, num_attn_candidates=candidates)
    with torch.no_grad():
        ours = opera.decode(toy_llava, inputs, 24)
    assert _trim(ours, 3) == _trim(ref, 3)
    assert all(row[-1] == 3 for row in _trim(ref, 3))  # they did end before the limit
    if candidates == _vocab(toy_llava):
        assert _trim(ours, 3) == _trim(plain, 3)


# --- the batched forward and the rollback's rebuild ----------------------------------------


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl"])
def test_batched_candidates_equal_one_forward_per_candidate(name, request):
    vlm = request.getfixturevalue(name)
    with vlm.attention("eager"), torch.no_grad():
        search = Search(vlm, _inputs(vlm), Settings(num_beams=3, num_attn_candidates=4), 20)
        for _ in range(3):
            search.step()
        top, candidates = search.logits.topk(4, dim=-1)
        logits, rows = candidate_forward(vlm, copy.deepcopy(search.cache), candidates)
        for c in range(4):
            cache = copy.deepcopy(search.cache)
            one_logits, probs, _ = run(
                vlm, input_ids=candidates[:, c : c + 1], past_key_values=cache
            )
            assert torch.allclose(logits.view(3, 4, -1)[:, c], one_logits, atol=1e-5)
            assert torch.allclose(rows.view(3, 4, -1)[:, c], probs[:, -1], atol=1e-6)
        # the rebuild after a rollback (prompt, then all response tokens at once) agrees
        logits, _, columns = search.rebuild()
        assert torch.allclose(logits, search.logits, atol=1e-5)
        assert torch.allclose(columns, search.columns, atol=1e-5)


def test_split_items_equal_items_prepared_alone(tiny_qwen2_vl):
    batch = _inputs(tiny_qwen2_vl, n=3)
    for b, item in enumerate(split_items(tiny_qwen2_vl, batch)):
        alone = tiny_qwen2_vl.prepare(batch.images[b][0], batch.prompts[b])
        assert item.tensors.keys() == alone.tensors.keys()
        for key, value in alone.tensors.items():
            assert torch.equal(item.tensors[key], value), key
        assert item.image_spans == alone.image_spans


# --- the contract --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["opera", "opera_fast"])
def test_runs_on_decoders_leaves_state_and_refuses_clip(any_vlm, key, lacks):
    if any_vlm.contrastive:
        inputs = any_vlm.prepare(render(sample_scenes(1, 5)[0], 48).image, "a red circle")
        with pytest.raises(NotApplicableError):
            generate(any_vlm, inputs, key, max_new_tokens=4)
        return
    inputs = _inputs(any_vlm, n=2)
    before, rng = model_state(any_vlm.model), torch.random.get_rng_state()
    why = lacks(any_vlm, key, "decoder")
    if why:  # no image tokens in the LM's sequence to penalise attention on (Mllama)
        with pytest.raises(NotApplicableError, match="image tokens"):
            generate(any_vlm, inputs, key, max_new_tokens=4)
        assert model_state(any_vlm.model) == before
        return
    deltas = getattr(any_vlm.model.model, "rope_deltas", None)
    texts = generate(any_vlm, inputs, key, max_new_tokens=12)
    assert len(texts) == 2 and all(texts)
    assert model_state(any_vlm.model) == before
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert getattr(any_vlm.model.model, "rope_deltas", None) is deltas
    new = make_decoder(key).decode(any_vlm, inputs, 12)
    assert new.shape[0] == 2 and new.shape[1] <= 12


def test_state_is_restored_when_decoding_raises(tiny_qwen2_vl, monkeypatch):
    before = model_state(tiny_qwen2_vl.model)
    deltas = tiny_qwen2_vl.model.model.rope_deltas

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(search_mod, "candidate_forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        generate(tiny_qwen2_vl, _inputs(tiny_qwen2_vl), "opera", max_new_tokens=4)
    assert model_state(tiny_qwen2_vl.model) == before
    assert tiny_qwen2_vl.model.model.rope_deltas is deltas


def test_settings():
    assert isinstance(make_decoder("opera"), OPERA)
    fast = make_decoder("opera_fast")
    assert isinstance(fast, OPERAFast) and fast.settings.num_attn_candidates == 2
    assert make_decoder("opera").settings == Settings()
    for bad in (
        {"num_beams": 0},
        {"num_attn_candidates": 0},
        {"scale_factor": 0},
        {"threshold": -1},
        {"penalty_weights": math.nan},
        {"alpha": 1},
    ):
        with pytest.raises(InputError):
            make_decoder("opera", **bad)
