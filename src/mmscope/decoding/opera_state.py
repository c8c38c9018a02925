"""OPERA's bookkeeping without a model (Huang et al. 2024, "OPERA: Alleviating hallucination in
multi-modal large language models via over-trust penalty and retrospection-allocation").

- ``knowledge_aggregation``: the over-trust score of a candidate, read off the last layer's
  attention over the response window: for each column j the product down the column of the
  lower triangle (rows i >= j) of ``scale * attention``, times ``factor`` (1e-7 as in OPERA's
  code); the penalty is the largest column score and its column the "rollback location".
  Products are taken as sums of logs in float64, so long windows neither overflow nor underflow.
- ``Beams``: beam search for one item with Hugging Face's (transformers 5) semantics: the top
  ``2 * num_beams`` continuations, finished hypotheses on EOS or at the length limit, scores
  divided by ``length ** length_penalty``, the same early-stopping heuristic.
- ``Retrospection``: the history of rollback locations, when to roll back, and the banned
  tokens per position.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

#: Scores at or below this are "no candidate" in Hugging Face's beam search.
NEG = -1.0e9


def column_logs(attn: torch.Tensor, scale: float) -> torch.Tensor:
    """``log prod_{i >= j} scale * attn[..., i, j]`` for every column j: ``(..., n)`` (float64)."""
    n = attn.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=attn.device).tril()
    logs = (scale * attn.double()).log()
    return torch.where(lower, logs, torch.zeros_like(logs)).sum(-2)


def extend_columns(columns: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """``column_logs`` of a matrix after one more row: ``columns`` ``(..., n)`` of the first n rows
    and the new rows ``(..., n + 1)`` give ``(..., n + 1)``."""
    logs = (scale * rows.double()).log()
    return torch.cat([columns + logs[..., :-1], logs[..., -1:]], dim=-1)


def aggregate(columns: torch.Tensor, factor: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """The penalty (``factor`` times the largest column product) and its column, from
    ``column_logs``. The penalty is capped at 1e30 (a long window of confident attention can
    exceed any float); the first column wins ties."""
    best, location = columns.max(dim=-1)
    penalty = (best + math.log(factor)).clamp(max=math.log(1e30)).exp()
    return penalty, location


def knowledge_aggregation(
    attn: torch.Tensor, scale: float = 50.0, factor: float = 1e-7
) -> tuple[torch.Tensor, torch.Tensor]:
    """OPERA's over-trust penalty and rollback location of ``(..., n, n)`` window attention."""
    return aggregate(column_logs(attn, scale), factor)


def most_common(values: torch.Tensor) -> torch.Tensor:
    """The most common value along the last axis (the smallest one on ties)."""
    counts = (values[..., :, None] == values[..., None, :]).sum(-1)
    best = counts.max(dim=-1, keepdim=True).values
    masked = torch.where(
        counts == best, values, torch.full_like(values, torch.iinfo(values.dtype).max)
    )
    return masked.min(dim=-1).values


def masked_log_softmax(scores: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the finite entries of each row; a row with none stays -inf."""
    alive = torch.isfinite(scores).any(dim=-1, keepdim=True)
    out = torch.log_softmax(scores.masked_fill(~alive, 0.0), dim=-1)
    return out.masked_fill(~alive, -math.inf)


class Beams:
    """Beam search over one item, step by step, as ``GenerationMixin._beam_search`` runs it.

    ``advance(log_probs)`` takes the ``(num_beams, vocab)`` next-token log-probabilities of the
    running beams and returns, for the new running beams, the index of the beam each continues
    and the token it appends. ``done`` says when Hugging Face would stop; ``best()`` is the
    returned hypothesis (its tokens, EOS included).
    """

    def __init__(
        self,
        num_beams: int,
        max_new_tokens: int,
        eos: torch.Tensor,
        pad: int,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_beams, self.max_new, self.pad = num_beams, max_new_tokens, pad
        self.eos = eos.to(device)
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.keep = max(2, 1 + len(eos)) * num_beams
        b = num_beams
        self.state: dict[str, Any] = {
            "step": 0,
            "running": torch.zeros(b, 0, dtype=torch.long, device=device),
            "scores": torch.tensor([0.0] + [NEG] * (b - 1), device=device),
            "finished": torch.full((b, max_new_tokens), pad, dtype=torch.long, device=device),
            "finished_scores": torch.full((b,), NEG, device=device),
            "lengths": torch.zeros(b, dtype=torch.long, device=device),
            "is_finished": torch.zeros(b, dtype=torch.bool, device=device),
            "unsatisfied": True,
            "done": False,
        }

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def done(self) -> bool:
        return bool(self.state["done"])

    @property
    def running(self) -> torch.Tensor:
        return self.state["running"]  # type: ignore[no-any-return]

    def snapshot(self) -> dict[str, Any]:
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in self.state.items()}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.state = {k: v.clone() if torch.is_tensor(v) else v for k, v in snapshot.items()}

    def advance(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, b, t, lp = self.state, self.num_beams, self.step, self.length_penalty
        vocab = log_probs.shape[-1]
        acc = (log_probs + s["scores"][:, None]).reshape(1, -1)
        values, index = torch.topk(acc, k=self.keep)
        parent, token = index[0] // vocab, index[0] % vocab
        seqs = torch.cat([s["running"][parent], token[:, None]], dim=1)
        hits = torch.isin(token, self.eos) | (t + 1 >= self.max_new)
        # running beams: the best continuations that did not finish
        run = values[0] + hits.to(torch.float32) * NEG
        chosen = torch.topk(run[None], k=b)[1][0]
        # finished hypotheses: the top num_beams continuations that finished, length-penalised
        top = torch.arange(self.keep, device=hits.device) < b
        did = hits & top
        fin = values[0] / ((t + 1) ** lp)
        all_full = bool(s["is_finished"].all()) and self.early_stopping is True
        fin = fin + float(all_full) * NEG
        fin = fin + float(not s["unsatisfied"]) * NEG
        fin = fin + (~did) * NEG
        padded = torch.full(
            (self.keep, self.max_new), self.pad, dtype=torch.long, device=seqs.device
        )
        padded[:, : t + 1] = seqs
        merged = torch.cat([s["finished_scores"], fin])
        keep = torch.topk(merged[None], k=b)[1][0]
        lengths = torch.cat([s["lengths"], torch.full_like(token, t + 1)])
        s["finished"] = torch.cat([s["finished"], padded])[keep]
        s["finished_scores"] = merged[keep]
        s["lengths"] = lengths[keep]
        s["is_finished"] = torch.cat([s["is_finished"], did])[keep]
        s["running"], s["scores"] = seqs[chosen], run[chosen]
        s["step"] = t + 1
        # Hugging Face's early-stopping heuristic and stopping condition
        best_len = self.max_new if self.early_stopping == "never" and lp > 0 else t + 1
        best = s["scores"][0] / (best_len**lp)
        worst = torch.where(s["is_finished"], s["finished_scores"].min(), torch.tensor(NEG))
        s["unsatisfied"] = s["unsatisfied"] and bool((best > worst).any())
        open_beam = not (bool(s["is_finished"].all()) and self.early_stopping is True)
        s["done"] = not (s["unsatisfied"] and open_beam and not bool(hits.all()))
        return parent[chosen], token[chosen]

    def best(self) -> torch.Tensor:
        """The tokens of the best finished hypothesis."""
        return self.state["finished"][0, : int(self.state["lengths"][0])]  # type: ignore[no-any-return]


class Retrospection:
    """OPERA's retrospection-allocation: when the current rollback location has been, for every
    beam, the most common location of more than ``threshold`` of the last ``window_size``
    steps, decoding goes back to the token right after it and bans the tokens chosen there.

    Positions count generated tokens from 0. ``record`` adds a step's per-beam locations,
    ``trigger(step)`` says where to roll back to (or None), ``commit(position, chosen)`` does
    the bookkeeping of a rollback and returns every (beam, token) pair banned there.
    """

    def __init__(self, threshold: int, window_size: int, max_rollbacks: int, floor: int = 10):
        self.threshold, self.window, self.max_rollbacks, self.floor = (
            threshold,
            window_size,
            max_rollbacks,
            floor,
        )
        self.history: deque[tuple[int, torch.Tensor]] = deque(maxlen=window_size)
        self.rollbacks: dict[int, int] = {}
        self.bans: dict[int, torch.Tensor] = {}

    def record(self, step: int, locations: torch.Tensor) -> None:
        """Per-beam rollback locations ``(num_beams,)`` of ``step`` (most common over the
        beam's candidates)."""
        self.history.append((step, locations))

    def trigger(self, step: int) -> int | None:
        """The position to roll back to at ``step`` (after its ``record``), or None."""
        if not self.history or self.history[-1][0] != step:
            raise ValueError(f"record step {step} before asking whether to roll back")
        current = int(most_common(self.history[-1][1]))
        table = torch.stack([locs for _, locs in self.history])  # (steps, beams)
        if current < self.floor or not bool(((table == current).sum(0) > self.threshold).all()):
            return None
        # right after the location; never beyond the last decided token, nor before the window
        position = max(min(current + 1, step - 1), self.history[0][0])
        if self.rollbacks.get(position, 0) >= self.max_rollbacks:
            position -= 1
            if (
                position < self.history[0][0]
                or self.rollbacks.get(position, 0) >= self.max_rollbacks
            ):
                return None
        return position

    def exhaust(self, position: int) -> None:
        """No more rollbacks to ``position`` (its candidates are all banned)."""
        self.rollbacks[position] = self.max_rollbacks

    def banned(self, position: int, chosen: torch.Tensor) -> torch.Tensor:
        """``(n, 2)`` (beam, token) pairs banned at ``position`` if ``chosen`` is banned too."""
        before = self.bans.get(position, chosen[:0])
        return torch.cat([before, chosen])

    def commit(self, position: int, chosen: torch.Tensor) -> torch.Tensor:
        """Roll back to ``position``: count it, forget the later history and bans, ban the
        ``chosen`` ``(num_beams, 2)`` (beam, token) pairs there; returns all its bans."""
        self.rollbacks[position] = self.rollbacks.get(position, 0) + 1
        while self.history and self.history[-1][0] > position:
            self.history.pop()
        banned = self.banned(position, chosen)
        self.bans = {p: v for p, v in self.bans.items() if p < position}
        self.bans[position] = banned
        return banned
