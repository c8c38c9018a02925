"""Visual-token pruning as an analysis: FastV (Chen et al. 2024, "An image is worth 1/2 tokens
after layer 2").

FastV ranks the image tokens by attention after layer K and drops the fraction R with the
least attention from every later layer, keeping the original position ids. As an analysis:
accuracy of the next token over a batch of questions on a grid of (K, R), under both ranking
rules, with the theoretical FLOPs each setting saves.

Hybrid models (Qwen3.5) rank with, and prune in, their softmax-attention layers only: a K whose
ranking layer K-1 has no softmax attention raises ``NotApplicableError``; the linear-attention
layers from K on cannot be masked and still read every token (a warning says so, and
``skipped_layers`` names them), so the accuracy is that of pruning the attention layers alone,
and the FLOPs saved count only the layers pruned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import capture, mask_attention
from mmscope.core.registry import register
from mmscope.core.sites import site
from mmscope.core.targets import Predicted, Target
from mmscope.core.validate import integer, number, positive_int
from mmscope.methods.analysis import Analysis, Result, jsonable, new_figure, next_token_ids
from mmscope.methods.token.sets import block_matrix
from mmscope.models.capabilities import require_softmax, softmax_only

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM

RULES: tuple[str, ...] = ("last", "received")
PAPER = "Chen et al. 2024 (FastV)"
#: One pruning setting: (layer K, per item the sequence positions of the pruned tokens).
Setting = tuple[int, list[list[int]]]


def image_positions(inputs: Inputs, item: int) -> list[int]:
    """Sequence positions of every image token of batch item ``item`` (all its images)."""
    return [p for span in inputs.image_spans[item] for p in span.positions]


def rank_scores(
    probs: torch.Tensor, positions: Sequence[int], item: int, rule: str
) -> torch.Tensor:
    """Per image token of ``item`` (in ``positions`` order), the attention it gets under ``rule``.

    ``probs`` is one layer's attention ``(batch, heads, queries, keys)``, averaged over heads.
    ``"last"`` (FastV's released code): the last position's row. ``"received"`` (the paper's
    text): the mean attention a token receives from every later query position.
    """
    avg = probs[item].float().mean(0)  # (queries, keys)
    keys = torch.as_tensor(list(positions), dtype=torch.long)
    if rule == "last":
        return avg[-1, keys].cpu()
    length = avg.shape[0]
    later = torch.tril(avg, diagonal=-1).sum(0)  # column sums over the queries after each key
    counts = (length - 1 - torch.arange(length, device=avg.device)).clamp(min=1)
    return (later / counts)[keys].cpu()


def pruned_count(n_image: int, ratio: float) -> int:
    """How many of ``n_image`` tokens a ratio prunes: ``ratio * n_image`` rounded half up."""
    return min(n_image, int(math.floor(ratio * n_image + 0.5)))


def pruned_positions(scores: torch.Tensor, positions: Sequence[int], ratio: float) -> list[int]:
    """The positions of the ``pruned_count`` lowest-scoring tokens (ties: the first), sorted."""
    order = torch.argsort(scores, stable=True)[: pruned_count(len(positions), ratio)]
    return sorted(int(positions[i]) for i in order.tolist())


def layer_flops(n: float, hidden: int, intermediate: int) -> float:
    """FastV's FLOPs of one decoder layer on ``n`` tokens: 4nd^2 + 2n^2 d + 2ndm."""
    d, m = hidden, intermediate
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def flops_saved(
    n: int,
    n_image: int,
    hidden: int,
    intermediate: int,
    layers: int,
    k: int,
    ratio: float,
    pruned: int | None = None,
) -> float:
    """Share of the decoder's FLOPs saved: 1 - (K f(n) + (L-K) f(n - R n_img)) / (L f(n)), or
    with ``pruned`` of the layers from K on pruned (the others run on every token)."""
    full = layer_flops(n, hidden, intermediate)
    kept = layer_flops(n - pruned_count(n_image, ratio), hidden, intermediate)
    cut = layers - k if pruned is None else pruned
    return 1.0 - ((layers - cut) * full + cut * kept) / (layers * full)


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


@torch.no_grad()
def masked_logits(vlm: VLM, inputs: Inputs, settings: Sequence[Setting]) -> torch.Tensor:
    """Last-position logits ``(settings, batch, vocab)`` (float32, CPU) under each setting.

    A setting ``(K, pruned)`` blocks every query from item ``b``'s keys ``pruned[b]`` in the
    language-model layers K, K+1, ... (0-based): the kept tokens then compute exactly what they
    would with the pruned tokens dropped and the original position ids kept. The batch is
    tiled once per setting and run in one forward. Layers without softmax attention (hybrid
    models) are not masked.
    """
    n, batch = len(settings), inputs.batch_size
    tiled = inputs.tile(n) if n > 1 else inputs
    length = inputs.input_ids.shape[1]
    first = min(k for k, _ in settings)
    blocked: dict[str, torch.Tensor] = {}
    for layer in [i for i in vlm.softmax_layers("lm.layer") if i >= first]:
        block = torch.zeros(n * batch, length, length, dtype=torch.bool)
        for s, (k, pruned) in enumerate(settings):
            if k <= layer:
                for b, keys in enumerate(pruned):
                    block[s * batch + b] = block_matrix(length, range(length), keys)
        blocked[site("lm.layer", layer, "attn")] = block
    with mask_attention(vlm, blocked):
        last = _logits(vlm.forward(tiled))[:, -1].float().cpu()
    return last.reshape(n, batch, -1)


@dataclass(frozen=True, eq=False)
class PruningResult(Result):
    """Accuracy under FastV pruning.

    Attributes:
        rules: the ranking rules, in the order of ``accuracy``'s first axis.
        layers: the pruning layers K (pruned from the K-th layer on, 0-based).
        ratios: the pruned fractions R of the image tokens.
        accuracy: ``(rules, layers, ratios)`` share of items whose top next token is the target.
        baseline: the unpruned accuracy.
        flops_saved: ``(layers, ratios)`` theoretical share of the decoder FLOPs saved (FastV's
            formula, averaged over items).
        n: number of items.
        num_layers: the language model's layers L.
        skipped_layers: ``{site: why}`` of the layers from the smallest K on that have no
            softmax attention and were not pruned (hybrid models; empty otherwise).
    """

    rules: tuple[str, ...]
    layers: tuple[int, ...]
    ratios: tuple[float, ...]
    accuracy: np.ndarray
    baseline: float
    flops_saved: np.ndarray
    n: int
    num_layers: int
    skipped_layers: dict[str, str] = field(default_factory=dict)

    def breaks_at(self, rule: str, layer: int, drop: float = 0.05) -> float | None:
        """The smallest R whose accuracy is more than ``drop`` below the baseline (None: never)."""
        if rule not in self.rules or layer not in self.layers:
            raise InputError(
                f"no ({rule!r}, K={layer}) in this result: {self.rules} x {self.layers}"
            )
        row = self.accuracy[self.rules.index(rule), self.layers.index(layer)]
        for j in np.argsort(self.ratios, kind="stable"):
            if row[j] < self.baseline - drop:
                return float(self.ratios[j])
        return None

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "analysis": "fastv",
                "rules": list(self.rules),
                "layers": list(self.layers),
                "ratios": list(self.ratios),
                "accuracy": self.accuracy.tolist(),
                "baseline": self.baseline,
                "flops_saved": self.flops_saved.tolist(),
                "n": self.n,
                "num_layers": self.num_layers,
                **({"skipped_layers": self.skipped_layers} if self.skipped_layers else {}),
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """Accuracy vs R per (rule, K), the baseline dotted, FLOPs saved on a twin axis."""
        fig, ax = new_figure(6.0, 4.0, ax)
        order = np.argsort(self.ratios, kind="stable")
        ratios = np.asarray(self.ratios)[order]
        for r, rule in enumerate(self.rules):
            for k, layer in enumerate(self.layers):
                acc, style = self.accuracy[r, k, order], ["-", "--", "-.", ":"][r % 4]
                ax.plot(ratios, acc, style, marker="o", color=f"C{k}", label=f"{rule}, K={layer}")
        ax.axhline(self.baseline, color="black", linestyle=":", label="unpruned")
        ax.set_xlabel("pruned fraction R of image tokens")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        twin = ax.twinx()
        for k in range(len(self.layers)):
            twin.plot(ratios, self.flops_saved[k, order], color=f"C{k}", alpha=0.35, linewidth=3)
        twin.set_ylabel(f"FLOPs saved (thick; L={self.num_layers})")
        twin.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="lower left")
        ax.set_title(f"FastV pruning, n={self.n}")
        return fig


@register(
    "fastv",
    kind="analysis",
    family="inside/pruning",
    paper=PAPER,
    level="model/token",
    needs=("generates", "lm_attention", "lm_image_tokens"),
)
class FastV(Analysis):
    """Accuracy as a function of the pruning layer K and pruned fraction R (Chen et al. 2024).

    Indexing: the image tokens are ranked with the attention probabilities of decoder layer
    K-1 (0-based; ``lm.layer[K-1].attn.probs``), averaged over heads, and pruned from layer K
    on, so K layers run on every token and L-K on the kept ones (as FastV's released code,
    which reads layer K-1's attention when it reaches layer K). ``"last"`` ranks by the last
    position's attention row (the released code), ``"received"`` by the mean attention each
    image token receives from every later position (the paper's text); the R * n_img (rounded
    half up) lowest go. Pruning is done by blocking every query from the pruned keys in layers >= K
    before the softmax: for the kept tokens this is exactly dropping the pruned ones while
    keeping the original position ids. Hybrid models: see the module docstring.

    Args:
        layers: the K values, each in 1..L-1.
        ratios: the pruned fractions R, each in [0, 1].
        rules: ranking rules, a subset of ``("last", "received")``.
        batch_size: pruning settings per forward (the batch is tiled that many times).
    """

    def __init__(
        self,
        layers: Sequence[int] = (1, 2),
        ratios: Sequence[float] = (0.25, 0.5, 0.75, 0.9),
        rules: Sequence[str] = RULES,
        batch_size: int = 4,
    ) -> None:
        self.layers = tuple(integer("layers", k, minimum=1) for k in _seq("layers", layers))
        self.ratios = tuple(number("ratios", r) for r in _seq("ratios", ratios))
        if any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise InputError(f"ratios must lie in [0, 1], not {self.ratios}")
        self.rules = tuple(_seq("rules", rules))
        if any(rule not in RULES for rule in self.rules):
            raise InputError(f"rules must be among {RULES}, not {self.rules}")
        self.batch_size = positive_int("batch_size", batch_size)

    def __call__(self, vlm: VLM, inputs: Inputs, target: Target | None = None) -> PruningResult:
        num_layers = vlm.num_layers("lm.layer")
        if any(k >= num_layers for k in self.layers):
            raise InputError(f"layers must lie in 1..{num_layers - 1} for {vlm.name}")
        for k in self.layers:  # the ranking layer K-1 must give probabilities
            require_softmax(vlm, "lm.layer", k - 1, f"fastv with K={k}")
        _, skipped = softmax_only(vlm, "lm.layer", range(min(self.layers), num_layers), "fastv")
        batch = inputs.batch_size
        where = [image_positions(inputs, b) for b in range(batch)]
        if not all(where):
            raise InputError("FastV prunes image tokens; every item needs an image")
        sites = {k: site("lm.layer", k - 1, "attn.probs") for k in self.layers}
        with torch.no_grad(), capture(vlm, sorted(set(sites.values()))) as cap:
            base = _logits(vlm.forward(inputs))[:, -1].float().cpu()
        ids = _answer_ids(vlm, inputs, target, base)
        settings: list[Setting] = []
        for rule in self.rules:
            for k in self.layers:
                scores = [rank_scores(cap[sites[k]], where[b], b, rule) for b in range(batch)]
                for r in self.ratios:
                    pruned = [pruned_positions(sc, w, r) for sc, w in zip(scores, where)]
                    settings.append((k, pruned))
        correct = []
        for start in range(0, len(settings), self.batch_size):
            logits = masked_logits(vlm, inputs, settings[start : start + self.batch_size])
            correct.append((logits.argmax(-1) == ids).float().mean(-1))
        shape = (len(self.rules), len(self.layers), len(self.ratios))
        accuracy = torch.cat(correct).reshape(shape).numpy().astype(float)
        return PruningResult(
            rules=self.rules,
            layers=self.layers,
            ratios=self.ratios,
            accuracy=accuracy,
            baseline=float((base.argmax(-1) == ids).float().mean()),
            flops_saved=_flops(vlm, inputs, where, self.layers, self.ratios, num_layers),
            n=batch,
            num_layers=num_layers,
            skipped_layers=skipped,
        )


def _seq(name: str, values: Any) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise InputError(f"{name} must be a non-empty sequence, not {values!r}")
    return list(values)


def _answer_ids(
    vlm: VLM, inputs: Inputs, target: Target | None, base: torch.Tensor
) -> torch.Tensor:
    """Per item the correct next token: the target's, or the unpruned model's own answer."""
    if target is None or isinstance(target, Predicted):
        return base.argmax(-1)
    ids = next_token_ids(vlm, inputs, target)
    if len(ids) != inputs.batch_size:
        raise InputError(f"{len(ids)} target token ids for a batch of {inputs.batch_size}")
    return torch.as_tensor(ids, dtype=torch.long)


def _flops(
    vlm: VLM,
    inputs: Inputs,
    where: list[list[int]],
    layers: tuple[int, ...],
    ratios: tuple[float, ...],
    num_layers: int,
) -> np.ndarray:
    hidden, inter = vlm.hidden_size("lm.layer"), vlm.mlp_size("lm.layer")
    lengths = inputs.attention_mask.sum(-1).tolist()
    out = np.zeros((len(layers), len(ratios)))
    softmax = vlm.softmax_layers("lm.layer")
    for i, k in enumerate(layers):
        cut = sum(1 for layer in softmax if layer >= k)
        for j, r in enumerate(ratios):
            saved = [
                flops_saved(int(n), len(img), hidden, inter, num_layers, k, r, cut)
                for n, img in zip(lengths, where)
            ]
            out[i, j] = float(np.mean(saved))
    return out
