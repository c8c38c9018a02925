"""Neuron editing: switch a neuron set off (x0) or amplify it (x factor) and measure what the
answers lose, against random sets of the same size (Dai et al. 2022, "Knowledge neurons in
pretrained transformers"; the deactivation test of MMNeuron, Huo et al. 2024, and MINER,
Huang et al. 2024).

``edited`` is the context manager (usable around ``vlm.forward`` and ``vlm.generate``);
``neuron_edit`` the study: exact-match accuracy of greedy answers by question kind (and the
probability of the answer's first token, which moves before answers flip), unedited, edited,
and with seeded random sets that have as many units at each site as the edited set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import PatchFn, capture, patch
from mmscope.core.registry import register
from mmscope.core.targets import answer_id
from mmscope.core.validate import integer, number, positive_int, valid_seed
from mmscope.methods.activations import batches
from mmscope.methods.analysis import Result, jsonable, new_figure
from mmscope.methods.neuron.base import NeuronSet
from mmscope.methods.study import KIND, Study

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem

MODES = ("zero", "scale")


def _editor(units: Sequence[int], mode: str, factor: float) -> PatchFn:
    index = torch.as_tensor(sorted(set(int(u) for u in units)), dtype=torch.long)
    top = int(index.max()) if len(index) else -1

    def fn(out: torch.Tensor) -> torch.Tensor:
        if top >= out.shape[-1]:
            raise InputError(f"unit {top} is out of range for a site of width {out.shape[-1]}")
        out = out.clone()
        idx = index.to(out.device)
        out[..., idx] = 0.0 if mode == "zero" else out[..., idx] * factor
        return out

    return fn


@contextmanager
def edited(vlm: VLM, neurons: NeuronSet, mode: str = "zero", factor: float = 2.0) -> Iterator[None]:
    """Inside the block, the units of ``neurons`` output 0 (``mode="zero"``: deactivated) or
    ``factor`` times their value (``mode="scale"``: amplified, x2 in Dai et al. 2022) at every
    position; the hooks go on exit."""
    if mode not in MODES:
        raise InputError(f"mode is one of {MODES}, not {mode!r}")
    factor = number("factor", factor)
    fns = {site: _editor(units, mode, factor) for site, units in neurons.by_site().items()}
    with patch(vlm, fns):
        yield


def site_widths(vlm: VLM, item: BenchItem, sites: Sequence[str]) -> dict[str, int]:
    """The width (last dimension) of each site's output, read on one forward of ``item``."""
    inputs = vlm.prepare([item.image], [item.prompt])
    with torch.no_grad(), capture(vlm, list(sites)) as cap:
        vlm.forward(inputs)
    return {site: int(cap[site].shape[-1]) for site in sites}


def random_like(neurons: NeuronSet, widths: dict[str, int], seed: int | Sequence[int]) -> NeuronSet:
    """As many random units at each site as ``neurons`` has there, drawn (seeded) from the
    site's other units (from all of them where too few others are left)."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[str, int]] = []
    for site, units in sorted(neurons.by_site().items()):
        chosen = sorted(set(units))
        others = np.setdiff1d(np.arange(widths[site]), chosen)
        pool = others if len(others) >= len(chosen) else np.arange(widths[site])
        pairs += [(site, int(u)) for u in rng.choice(pool, size=len(chosen), replace=False)]
    return NeuronSet("random", tuple(pairs), ("",) * len(pairs), (0.0,) * len(pairs))


def answer_scores(
    vlm: VLM, items: Sequence[BenchItem], batch_size: int, max_new_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per item, whether the greedy answer equals the expected one (as ``toys eval``), and
    the probability of the answer's first token as the next token (a finer measure)."""
    right: list[bool] = []
    probs: list[np.ndarray] = []
    for _, chunk in batches(items, batch_size):
        inputs = vlm.prepare([it.image for it in chunk], [it.prompt for it in chunk])
        answers = vlm.generate(inputs, max_new_tokens=max_new_tokens)  # type: ignore[attr-defined]
        right += [a == it.answer for a, it in zip(answers, chunk)]
        ids = torch.tensor([answer_id(vlm, it.answer) for it in chunk])
        rows = torch.arange(len(chunk))
        with torch.no_grad():
            logits = vlm.forward(inputs).logits[:, -1].float()
        probs.append(logits.softmax(-1)[rows, ids.to(logits.device)].cpu().numpy())
    return np.array(right, dtype=bool), np.concatenate(probs)


@dataclass(frozen=True)
class EditResult(Result):
    """Exact-match answers (and the answer's probability) with and without an edit.

    Attributes:
        kinds: per item, its question kind.
        baseline: ``(items,)`` right without the edit.
        edited: ``(items,)`` right with the edited set.
        random: ``(random_sets, items)`` right with each random set of the same size.
        n_neurons: neurons edited.
        settings: the study's settings.
        p_baseline, p_edited, p_random: the same shapes, the probability of the answer's
            first token.
    """

    kinds: tuple[str, ...]
    baseline: np.ndarray
    edited: np.ndarray
    random: np.ndarray
    n_neurons: int
    settings: dict[str, Any]
    p_baseline: np.ndarray
    p_edited: np.ndarray
    p_random: np.ndarray

    def accuracy(self) -> dict[str, dict[str, float]]:
        """Per kind (and ``"all"``): accuracy unedited, edited, random-edited (mean over the
        random sets) and the drops from the unedited accuracy; the same of the answer's
        probability as ``p_baseline``, ``p_edited``, ... ."""
        kinds = np.asarray(self.kinds, dtype=object)
        out = {}
        for kind in [*sorted(set(self.kinds)), "all"]:
            keep = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
            row: dict[str, float] = {"n": int(keep.sum())}
            for prefix, (base, edit, rand) in (
                ("", (self.baseline, self.edited, self.random)),
                ("p_", (self.p_baseline, self.p_edited, self.p_random)),
            ):
                b, e = float(base[keep].mean()), float(edit[keep].mean())
                r = float(rand[:, keep].mean()) if len(rand) else float("nan")
                row.update({f"{prefix}baseline": b, f"{prefix}edited": e, f"{prefix}random": r})
                row.update({f"{prefix}drop": b - e, f"{prefix}random_drop": b - r})
            out[kind] = row
        return out

    def tables(self) -> dict[str, dict[str, list[Any]]]:
        acc = self.accuracy()
        table: dict[str, list[Any]] = {"kind": list(acc)}
        table.update({c: [row[c] for row in acc.values()] for c in acc["all"]})
        return {"accuracy": table}

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "study": "neuron_edit",
                "n_neurons": self.n_neurons,
                "settings": self.settings,
                "accuracy": self.accuracy(),
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """Per question kind, what the edit and the random sets cost: the fall of exact-match
        accuracy and of the answer's probability."""
        fig, ax = new_figure(6.5, 3, ax)
        acc = self.accuracy()
        kinds = list(acc)
        x = np.arange(len(kinds))
        bars = (
            ("drop", "accuracy, edited", "#c44e52"),
            ("random_drop", "accuracy, random", "#4c72b0"),
            ("p_drop", "probability, edited", "#e8a0a2"),
            ("p_random_drop", "probability, random", "#a6bddb"),
        )
        for j, (key, name, color) in enumerate(bars):
            values = [acc[k][key] for k in kinds]
            ax.bar(x + (j - 1.5) * 0.2, values, width=0.2, color=color, label=name)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(x, kinds, fontsize=8)
        ax.set_ylabel("drop from unedited", fontsize=8)
        mode = self.settings.get("mode", "zero")
        ax.set_title(f"{mode}: {self.n_neurons} neurons vs random sets", fontsize=9)
        ax.legend(fontsize=7)
        return fig


@register(
    "neuron_edit",
    kind=KIND,
    family="neuron/edit",
    paper="Dai et al. 2022",
    level="model/neuron",
)
class NeuronEdit(Study):
    """Deactivate (or amplify) a neuron set and compare the answers with random sets.

    Args:
        mode: ``"zero"`` (deactivate) or ``"scale"`` (multiply by ``factor``).
        factor: the amplification of ``"scale"`` (2 in Dai et al. 2022).
        random_sets: random sets of the same size per site, averaged (0: none).
        seed: seed of the random sets.
        batch_size: items per generation.
        max_new_tokens: tokens generated per answer.
    """

    def __init__(
        self,
        mode: str = "zero",
        factor: float = 2.0,
        random_sets: int = 3,
        seed: int = 0,
        batch_size: int = 16,
        max_new_tokens: int = 4,
    ) -> None:
        if mode not in MODES:
            raise InputError(f"mode is one of {MODES}, not {mode!r}")
        self.mode = mode
        self.factor = number("factor", factor)
        self.random_sets = integer("random_sets", random_sets, minimum=0)
        self.seed = valid_seed(seed)
        self.batch_size = positive_int("batch_size", batch_size)
        self.max_new_tokens = positive_int("max_new_tokens", max_new_tokens)

    def __call__(
        self, vlm: VLM, items: Sequence[BenchItem], neurons: NeuronSet | None = None
    ) -> EditResult:
        if vlm.contrastive:
            raise NotApplicableError(
                f"{vlm.name} is a contrastive encoder; neuron_edit scores generated answers"
            )
        if not isinstance(neurons, NeuronSet):  # a study's result that holds a set (MINER's)
            neurons = getattr(neurons, "neurons", neurons)
        if not isinstance(neurons, NeuronSet) or not len(neurons):
            raise InputError("neuron_edit needs a non-empty NeuronSet (neurons=...)")
        scored = [it for it in items if it.answer]
        if not scored:
            raise InputError("neuron_edit needs items with expected answers")
        run = (self.batch_size, self.max_new_tokens)
        base, p_base = answer_scores(vlm, scored, *run)
        with edited(vlm, neurons, self.mode, self.factor):
            edit, p_edit = answer_scores(vlm, scored, *run)
        widths = site_widths(vlm, scored[0], list(neurons.by_site()))
        rand = np.zeros((self.random_sets, len(scored)), dtype=bool)
        p_rand = np.zeros((self.random_sets, len(scored)))
        for r in range(self.random_sets):
            other = random_like(neurons, widths, [self.seed, r])
            with edited(vlm, other, self.mode, self.factor):
                rand[r], p_rand[r] = answer_scores(vlm, scored, *run)
        settings = {
            "mode": self.mode,
            "factor": self.factor,
            "random_sets": self.random_sets,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
        }
        return EditResult(
            kinds=tuple(it.kind or "(none)" for it in scored),
            baseline=base,
            edited=edit,
            random=rand,
            n_neurons=len(set(neurons.neurons)),
            settings=settings,
            p_baseline=p_base,
            p_edited=p_edit,
            p_random=p_rand,
        )
