"""A generic activation-patching engine (Meng et al. 2022, causal tracing; Palit et al. 2023
for vision-language models).

Three kinds of run: the *clean* run, the *corrupted* run (Gaussian noise added to the image
tokens, or a counterfactual input with the same layout) and *restored* runs: the corrupted run
with parts of some sites taken back from the clean run. A ``Restoration`` lists those parts as
``Piece``\\ s (site, sequence positions, feature range); presets (``tracing.py``) only say which
restorations to run.

The engine runs the clean inputs once, capturing every site any restoration reads, the
corrupted inputs once, then all restorations batched: the corrupted inputs are tiled
(``Inputs.tile``), each tiled copy restores its own pieces, and one hook per site writes the
clean values into the rows of the copies that restore it. ``batch_size`` bounds the rows of
one forward. Noise is drawn once and added identically in every run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import PatchFn, capture, patch
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.core.targets import BoundTarget
from mmscope.methods.analysis import Result, jsonable, new_figure

if TYPE_CHECKING:
    from mmscope.models.base import VLM

#: (site, sequence positions, feature range ``(lo, hi)`` or ``None`` for every feature).
Piece = tuple[str, tuple[int, ...], tuple[int, int] | None]
#: What one restored run takes from the clean run.
Restoration = tuple[Piece, ...]


@dataclass(frozen=True)
class Runs:
    """Target scores of the patching runs, per item (float32, CPU).

    Attributes:
        clean: ``(items,)`` the clean run.
        corrupt: ``(items,)`` the corrupted run.
        restored: ``(restorations, items)`` each restored run.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    restored: torch.Tensor


def image_counts(inputs: Inputs) -> list[int]:
    """Image tokens per item (all its images), the rows ``vlm.image_tokens`` gives per item."""
    return [sum(span.size for span in item) for item in inputs.image_spans]


def image_noise(
    tokens: torch.Tensor, counts: Sequence[int], scale: float, seed: int
) -> torch.Tensor:
    """Gaussian noise for image tokens ``(tokens, dim)``: per item ``scale`` times the standard
    deviation of that item's image-token embeddings (Meng et al. 2022 take 3), drawn from a
    generator seeded with ``seed`` for every item, so an item's noise does not depend on its
    batch."""
    if sum(counts) != tokens.shape[0]:
        raise NotApplicableError(
            f"the image-token site gave {tokens.shape[0]} tokens for spans of {sum(counts)}"
        )
    out = []
    for chunk in tokens.float().cpu().split(list(counts)):
        gen = torch.Generator().manual_seed(seed)
        sd = chunk.std() if chunk.numel() > 1 else torch.tensor(0.0)
        out.append(torch.randn(chunk.shape, generator=gen) * (scale * sd))
    return torch.cat(out)


def _noise_patch(vlm: VLM, noise: torch.Tensor, inputs: Inputs, tiles: int) -> PatchFn:
    """Add ``noise`` (drawn for one copy of the batch) to each of the ``tiles`` copies of the
    batch that ``inputs`` holds."""
    tiled = noise.to(vlm.device).repeat(tiles, 1)

    def fn(value: torch.Tensor) -> torch.Tensor:
        tokens = vlm.image_tokens(value, inputs)
        if tokens.shape[0] != tiled.shape[0]:
            raise NotApplicableError(
                f"{vlm.IMAGE_TOKENS_SITE} gave {tokens.shape[0]} image tokens, "
                f"the noise was drawn for {tiled.shape[0]}"
            )
        return vlm.with_image_tokens(value, tokens + tiled.to(tokens), inputs)

    return fn


def _restore_patch(clean: torch.Tensor, pieces: Sequence[tuple[int, Piece]], items: int) -> PatchFn:
    """One site's hook for a tiled batch: tile ``t`` writes its piece's clean values into its
    rows ``t * items .. t * items + items - 1``."""
    groups: dict[tuple[int, int] | None, tuple[list[int], list[int], list[int]]] = defaultdict(
        lambda: ([], [], [])
    )
    for tile, (_, positions, features) in pieces:
        rows, cols, src = groups[features]
        for b in range(items):
            for p in positions:
                rows.append(tile * items + b)
                cols.append(p)
                src.append(b)
    device = clean.device
    index = [
        (feat, *(torch.tensor(v, dtype=torch.long, device=device) for v in lists))
        for feat, lists in groups.items()
    ]

    def fn(value: torch.Tensor) -> torch.Tensor:
        if value.dim() < 3 or value.shape[1:] != clean.shape[1:]:
            raise NotApplicableError(
                f"cannot restore a site of shape {tuple(value.shape)} from a clean value of "
                f"shape {tuple(clean.shape)}: patching needs (batch, sequence, features)"
            )
        for feat, rows, cols, src in index:
            lo, hi = feat if feat is not None else (0, value.shape[-1])
            value[rows, cols, lo:hi] = clean[src, cols, lo:hi].to(value)
        return value

    return fn


def _compose(first: PatchFn, second: PatchFn) -> PatchFn:
    return lambda value: second(first(value))


@torch.no_grad()
def _scores(
    vlm: VLM, bound: BoundTarget, inputs: Inputs, patches: Mapping[str, PatchFn]
) -> torch.Tensor:
    with patch(vlm, patches):
        return bound(vlm.forward(inputs))[:, 0].float().cpu()


@torch.no_grad()
def patch_runs(
    vlm: VLM,
    bound: BoundTarget,
    restorations: Sequence[Restoration],
    *,
    corrupted: Inputs | None = None,
    noise: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Runs:
    """Clean, corrupted and restored runs of ``bound.inputs``, scored by ``bound``'s first
    output.

    Args:
        restorations: what each restored run takes from the clean run.
        corrupted: the counterfactual inputs (laid out like ``bound.inputs``, teacher-forced
            tokens included); ``None`` adds noise to the image tokens instead.
        noise: the noise scale in standard deviations of the image-token embeddings.
        seed: the noise's seed.
        batch_size: at most this many rows per forward (at least one tiled copy of the batch).
        progress: called with (restorations done, restorations) after each forward.
    """
    inputs = bound.inputs
    items = inputs.batch_size
    sites = sorted({piece[0] for r in restorations for piece in r})
    needed = sites + ([vlm.IMAGE_TOKENS_SITE] if corrupted is None else [])
    with capture(vlm, needed) as cap:
        clean = bound(vlm.forward(inputs))[:, 0].float().cpu()
    cache = {site: cap[site] for site in sites}

    noisy = None
    if corrupted is None:
        counts = image_counts(inputs)
        if min(counts, default=0) == 0:
            raise InputError("noise on the image tokens needs an image in every item")
        tokens = vlm.image_tokens(cap[vlm.IMAGE_TOKENS_SITE], inputs)
        noisy = image_noise(tokens, counts, noise, seed)
    del cap

    def corruption(run: Inputs, tiles: int) -> dict[str, PatchFn]:
        if noisy is None:
            return {}
        return {vlm.IMAGE_TOKENS_SITE: _noise_patch(vlm, noisy, run, tiles)}

    base = inputs if corrupted is None else corrupted
    corrupt = _scores(vlm, bound, base, corruption(base, 1))

    per_forward = max(1, batch_size // items)
    restored: list[torch.Tensor] = []
    tiled: dict[int, Inputs] = {}
    for start in range(0, len(restorations), per_forward):
        chunk = restorations[start : start + per_forward]
        tiles = len(chunk)
        if tiles not in tiled:
            tiled = {tiles: base.tile(tiles).to(vlm.device)}
        by_site: dict[str, list[tuple[int, Piece]]] = defaultdict(list)
        for t, restoration in enumerate(chunk):
            for piece in restoration:
                by_site[piece[0]].append((t, piece))
        patches = corruption(tiled[tiles], tiles)
        for site, pieces in by_site.items():
            fn = _restore_patch(cache[site], pieces, items)
            patches[site] = _compose(patches[site], fn) if site in patches else fn
        restored.append(_scores(vlm, bound, tiled[tiles], patches).view(tiles, items))
        if progress is not None:
            progress(start + tiles, len(restorations))
    out = torch.cat(restored) if restored else torch.zeros(0, items)
    return Runs(clean, corrupt, out)


def normalised_effect(
    restored: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor, rtol: float = 1e-6
) -> torch.Tensor:
    """Indirect effect (p_restored - p_corrupt) / (p_clean - p_corrupt), per item along the
    last axis (Meng et al. 2022); NaN where the corruption did not change the target
    (|p_clean - p_corrupt| <= rtol * max(1, |p_clean|)), as no restoration can then matter."""
    gap = clean - corrupt
    flat = gap.abs() <= rtol * clean.abs().clamp(min=1.0)
    effect = (restored - corrupt) / torch.where(flat, torch.ones_like(gap), gap)
    return torch.where(flat.expand_as(effect), torch.full_like(effect, float("nan")), effect)


@dataclass(frozen=True, eq=False)
class PatchingResult(Result):
    """Normalised indirect effects of restoring clean sites into a corrupted run.

    Attributes:
        effect: ``(items, layers, positions)`` (``(items, layers, heads)`` for ``"head"``);
            NaN for an item whose target the corruption did not change.
        p_clean: ``(items,)`` the target's probability (or raw score) in the clean run.
        p_corrupt: ``(items,)`` the same in the corrupted run.
        preset: ``"residual"``, ``"mlp"``, ``"attn"`` or ``"head"``.
        positions: the sequence positions along the last axis (for ``"head"``: the positions
            every head was restored at).
        image_spans: per item, its image spans (for CLIP in the vision tower's sequence).
        tokens: per item, a label per entry of ``positions``.
        skipped: positions not run because the corruption cannot reach them (effect 0).
        settings: noise, window, seed, corruption, stack, target.
    """

    effect: np.ndarray
    p_clean: np.ndarray
    p_corrupt: np.ndarray
    preset: str
    positions: tuple[int, ...]
    image_spans: tuple[tuple[ImageSpan, ...], ...]
    tokens: tuple[tuple[str, ...], ...]
    skipped: tuple[int, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    def image_effect(self, item: int = 0, layer: int | None = None, image: int = 0) -> np.ndarray:
        """``(rows, cols)`` effect over an image's patches at ``layer`` (default: the maximum
        over layers); NaN at patches not traced."""
        if self.preset == "head":
            raise InputError("a head trace has no per-position effect; use preset 'residual'")
        if not 0 <= image < len(self.image_spans[item]):
            raise InputError(
                f"item {item} has no image {image} in the traced sequence (an image read "
                "through cross-attention, as Mllama's, has no positions there)"
            )
        span = self.image_spans[item][image]
        column = {p: i for i, p in enumerate(self.positions)}
        per_layer = self.effect[item] if layer is None else self.effect[item, layer][None]
        out = np.full(span.size, np.nan)
        for j, pos in enumerate(span.positions):
            if pos in column and not np.all(np.isnan(per_layer[:, column[pos]])):
                out[j] = np.nanmax(per_layer[:, column[pos]])
        return out.reshape(span.grid)

    def mass_inside(
        self, cells: np.ndarray, item: int = 0, layer: int | None = None, image: int = 0
    ) -> float:
        """Share of the positive image effect inside the bool ``(rows, cols)`` ``cells`` (NaN
        where no patch has a positive effect)."""
        grid = np.clip(np.nan_to_num(self.image_effect(item, layer, image)), 0.0, None)
        if np.asarray(cells).shape != grid.shape:
            raise InputError(f"cells {np.shape(cells)} do not match the image grid {grid.shape}")
        total = float(grid.sum())
        return float(grid[np.asarray(cells, bool)].sum() / total) if total > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "analysis": "causal_trace",
                "preset": self.preset,
                "effect": self.effect,
                "p_clean": self.p_clean,
                "p_corrupt": self.p_corrupt,
                "positions": list(self.positions),
                "tokens": [list(t) for t in self.tokens],
                "image_spans": [
                    [{"start": s.start, "end": s.end, "grid": list(s.grid)} for s in item]
                    for item in self.image_spans
                ],
                "skipped": list(self.skipped),
                "settings": dict(self.settings),
            }
        )

    def plot(self, ax: Any = None, item: int = 0) -> Any:
        """Effect over layers x positions (image tokens shaded) and, beside it, the image-patch
        map (maximum over layers)."""
        own = ax is None
        fig, ax = new_figure(9, 3.2, ax)
        grid = self.effect[item]
        image = ax.imshow(grid, aspect="auto", cmap="magma", origin="lower")
        fig.colorbar(image, ax=ax, fraction=0.03)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_yticks(range(grid.shape[0]))
        if self.preset == "head":
            ax.set_xticks(range(grid.shape[1]))
            ax.set_xlabel("head", fontsize=8)
        else:
            column = {p: i for i, p in enumerate(self.positions)}
            for span in self.image_spans[item]:
                inside = [column[p] for p in span.positions if p in column]
                if inside:
                    ax.axvspan(min(inside) - 0.5, max(inside) + 0.5, color="c", alpha=0.15)
            step = max(1, len(self.positions) // 40)
            ticks = list(range(0, len(self.positions), step))
            ax.set_xticks(ticks, [self.tokens[item][i] for i in ticks], rotation=90, fontsize=5)
            ax.set_xlabel("position (image tokens shaded)", fontsize=8)
        ax.set_title(f"causal trace ({self.preset}), effect", fontsize=9)
        if own and self.preset != "head" and self.image_spans[item]:
            inset = ax.inset_axes((1.12, 0.0, 0.3, 1.0))
            inset.imshow(self.image_effect(item), cmap="magma")
            inset.set_axis_off()
            inset.set_title("image patches (max over layers)", fontsize=7)
        return fig
