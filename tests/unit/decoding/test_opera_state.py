"""OPERA's bookkeeping without a model (Huang et al. 2024): the knowledge-aggregation penalty
by hand, the rollback bookkeeping on a constructed history, and the beam bookkeeping against
Hugging Face's beam search driven by made-up log-probabilities."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mmscope.decoding.base import hf_generate
from mmscope.decoding.opera_state import (
    Beams,
    Retrospection,
    column_logs,
    extend_columns,
    knowledge_aggregation,
    most_common,
)
from mmscope.world import DESCRIBE_PROMPT, render, sample_scenes


def _trim(ids: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row up to its first end of sequence (kept)."""
    return [row[: row.index(eos) + 1] if eos in row else row for row in ids.tolist()]


# --- the penalties by hand -----------------------------------------------------------------


def test_knowledge_aggregation_equals_hand_computation():
    attn = torch.tensor([[0.5, 0.0, 0.0], [0.2, 0.8, 0.0], [0.1, 0.3, 0.6]])
    # scale 2: column 0 = 1.0 * 0.4 * 0.2 = 0.08, column 1 = 1.6 * 0.6 = 0.96, column 2 = 1.2
    penalty, location = knowledge_aggregation(attn, scale=2.0, factor=1.0)
    assert penalty.item() == pytest.approx(1.2) and location.item() == 2
    assert torch.allclose(column_logs(attn, 2.0).exp(), torch.tensor([0.08, 0.96, 1.2]).double())
    # scale 50 (OPERA's): 25 * 10 * 5 = 1250, 40 * 15 = 600, 30; times 1e-7
    penalty, location = knowledge_aggregation(attn, scale=50.0)
    assert penalty.item() == pytest.approx(1250e-7) and location.item() == 0
    # batched, and the upper triangle is ignored
    noisy = attn + torch.triu(torch.full((3, 3), 0.7), diagonal=1)
    penalty, location = knowledge_aggregation(torch.stack([attn, noisy]), scale=2.0, factor=1.0)
    assert torch.allclose(penalty, torch.tensor([1.2, 1.2]).double())


def test_columns_extended_row_by_row_equal_the_whole_matrix():
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 6, 6, generator=gen).tril()
    columns = torch.zeros(3, 0, dtype=torch.float64)
    for i in range(6):
        columns = extend_columns(columns, attn[:, i, : i + 1], 50.0)
    assert torch.allclose(columns, column_logs(attn, 50.0))


def test_most_common_takes_the_smallest_on_ties():
    assert most_common(torch.tensor([[3, 1, 3, 1, 2], [4, 4, 0, 5, 5]])).tolist() == [1, 4]


# --- retrospection on a constructed history ------------------------------------------------


def _history(retro, last_step=20, location=12, beams=3):
    for step in range(last_step + 1):
        locs = torch.full((beams,), location if step > 15 else step % 5)
        retro.record(step, locs)


def test_rollback_triggers_on_a_constructed_history_and_bans_the_chosen_tokens():
    retro = Retrospection(threshold=4, window_size=512, max_rollbacks=2)
    _history(retro)  # location 12 five times (steps 16..20) in every beam
    assert retro.trigger(20) == 13  # right after the location
    chosen = torch.tensor([[0, 7], [0, 9], [2, 7]])
    assert retro.commit(13, chosen).tolist() == chosen.tolist()
    assert [s for s, _ in retro.history][-1] == 13  # later history forgotten
    # decoding goes on from 14: location 12 again, bans pile up at 13
    for step in range(14, 19):
        retro.record(step, torch.full((3,), 12))
    assert retro.trigger(18) == 13
    again = torch.tensor([[1, 4], [1, 5], [2, 8]])
    assert retro.commit(13, again).tolist() == chosen.tolist() + again.tolist()
    # two rollbacks to 13 are the most: then the position before it
    for step in range(14, 19):
        retro.record(step, torch.full((3,), 12))
    assert retro.trigger(18) == 12
    retro.commit(12, torch.tensor([[0, 1], [1, 1], [2, 1]]))
    assert 13 not in retro.bans  # bans after the new position are dropped
    retro.exhaust(12)
    for step in range(13, 18):
        retro.record(step, torch.full((3,), 12))
    assert retro.trigger(17) is None  # 13 and 12 are used up


def test_rollback_needs_every_beam_and_a_late_location():
    retro = Retrospection(threshold=4, window_size=512, max_rollbacks=5)
    _history(retro)
    retro.record(21, torch.tensor([12, 12, 3]))  # beam 2 moved on: still 5 > 4 for it
    assert retro.trigger(21) == 13
    retro = Retrospection(threshold=5, window_size=512, max_rollbacks=5)
    _history(retro)  # five times, not more than 5
    assert retro.trigger(20) is None
    retro = Retrospection(threshold=4, window_size=512, max_rollbacks=5)
    _history(retro, location=8)  # within the first 10 tokens
    assert retro.trigger(20) is None
    retro = Retrospection(threshold=4, window_size=3, max_rollbacks=5)
    _history(retro)  # only 3 steps are remembered
    assert retro.trigger(20) is None


# --- the beam bookkeeping against Hugging Face's beam search --------------------------------


def _synthetic(sequence: list[int], vocab: int, eos: int) -> torch.Tensor:
    """Log-probabilities that depend only on the sequence; the end grows likelier with length."""
    gen = torch.Generator().manual_seed(hash(tuple(sequence)) % 2**31)
    logits = torch.randn(vocab, generator=gen) * 2
    logits[eos] += 0.4 * len(sequence) - 12
    return logits.log_softmax(-1)


class _Synthetic(LogitsProcessor):
    def __call__(self, input_ids, scores):
        rows = [_synthetic(row, scores.shape[-1], 3) for row in input_ids.tolist()]
        return torch.stack(rows)


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping", "early"),
    [(1.0, False, True), (2.0, False, False), (-1.0, True, True), (0.5, "never", False)],
)
def test_beams_follow_hugging_face_beam_search(tiny_llava, length_penalty, early_stopping, early):
    """Beams driven by made-up log-probabilities, against HF's beam search driven by the same."""
    image = render(sample_scenes(1, 5)[0], 48).image
    inputs = tiny_llava.prepare(image, DESCRIBE_PROMPT)
    prompt = inputs.input_ids[0].tolist()
    with torch.no_grad():
        ref = hf_generate(
            tiny_llava,
            inputs,
            20,
            do_sample=False,
            num_beams=4,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            logits_processor=LogitsProcessorList([_Synthetic()]),
        )
    beams = Beams(4, 20, torch.tensor([3]), 0, length_penalty, early_stopping)
    while not beams.done:
        rows = [_synthetic(prompt + r, 52, 3) for r in beams.running.tolist()]
        beams.advance(torch.stack(rows))
    assert _trim(beams.best()[None], 3) == _trim(ref, 3)
    assert (beams.step < 20) == early  # finished hypotheses, not the length limit, ended it
