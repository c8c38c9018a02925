"""Activations at sites over a dataset, tagged by token group: the data of the neuron- and
embedding-level methods (probes, TCAV, dissection, DAPE, MINER, sparse autoencoders).

Items are ``BenchItem`` s (``bench.world_items`` or a user's JSONL via ``bench.load_items``).
Each kept token becomes one row: its activation vector plus the item, position, group and
patch it came from. Groups: ``"image"`` (an image token; ``patch`` is its index in the image's
grid, row-major), ``"text"`` (a prompt token) and ``"last"`` (the last attended position, where
the next token is read). A site of the vision tower is read at its own sequence; its image
tokens are the patches of the first image (a leading class token is group ``"class"``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import capture
from mmscope.core.validate import positive_int

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem

GROUPS = ("image", "text", "last", "class")


@dataclass(frozen=True, eq=False)
class Activations:
    """Rows of activations at one site.

    Attributes:
        site: where they were read, e.g. ``"lm.layer[1].mlp.act"``.
        values: float32 ``(rows, width)``.
        item: index of each row's item in the dataset.
        position: the row's position in its sequence.
        group: the row's token group (one of ``GROUPS``).
        patch: the row's patch index in its image's grid (row-major), -1 elsewhere.
        grid: the image grid ``(rows, cols)`` of each item (the first image's).
    """

    site: str
    values: np.ndarray = field(repr=False)
    item: np.ndarray = field(repr=False)
    position: np.ndarray = field(repr=False)
    group: np.ndarray = field(repr=False)
    patch: np.ndarray = field(repr=False)
    grid: tuple[tuple[int, int], ...] = field(repr=False)

    def where(self, group: str) -> Activations:
        """The rows of one token group."""
        if group not in GROUPS:
            raise InputError(f"token group {group!r} is not one of {GROUPS}")
        keep = self.group == group
        return Activations(
            self.site,
            self.values[keep],
            self.item[keep],
            self.position[keep],
            self.group[keep],
            self.patch[keep],
            self.grid,
        )


def batches(items: Sequence[BenchItem], batch_size: int) -> Iterator[tuple[int, list[BenchItem]]]:
    """``(first index, items)`` in consecutive batches."""
    size = positive_int("batch_size", batch_size)
    for start in range(0, len(items), size):
        yield start, list(items[start : start + size])


def token_rows(
    vlm: VLM, inputs: Inputs, site: str, value: torch.Tensor
) -> list[list[tuple[int, str, int]]]:
    """Per batch item, ``(position, group, patch)`` of the tokens of a site's output
    ``value``."""
    if site.startswith("vision."):
        if value.dim() != 3 or value.shape[0] != inputs.batch_size:
            raise NotApplicableError(
                f"{vlm.name}'s vision tower does not keep one sequence per image at {site}"
            )
        return [vlm.vision_rows(inputs, b, value.shape[1]) for b in range(inputs.batch_size)]
    if vlm.contrastive:
        raise NotApplicableError(f"{vlm.name} has no joint sequence; read vision.* sites")
    mask = inputs.tensors["attention_mask"]
    out = []
    for b in range(inputs.batch_size):
        rows: list[tuple[int, str, int]] = []
        for span in inputs.image_spans[b][:1]:
            if span.sequence == "lm":  # not a tower's own cells (Mllama: cross-attention)
                rows += [(pos, "image", j) for j, pos in enumerate(span.positions)]
        start, end = inputs.prompt_spans[b]
        rows += [(pos, "text", -1) for pos in range(start, end)]
        last = int(torch.nonzero(mask[b]).max())
        rows.append((last, "last", -1))
        out.append(rows)
    return out


def collect(
    vlm: VLM,
    items: Sequence[BenchItem],
    sites: str | Sequence[str],
    groups: Sequence[str] = GROUPS,
    batch_size: int = 16,
) -> dict[str, Activations]:
    """Activations at ``sites`` over ``items``, keeping the rows of ``groups``.

    Memory grows with the rows kept; for statistics over large datasets use the streaming
    ``mmscope.methods.neuron.stats``.
    """
    names = [sites] if isinstance(sites, str) else list(sites)
    bad = set(groups) - set(GROUPS)
    if bad:
        raise InputError(f"token groups {sorted(bad)} are not among {GROUPS}")
    lm = [s for s in names if not s.startswith("vision.")]
    if lm and set(groups) <= {"image", "class"} and vlm.capabilities.images_in == "cross_attention":
        raise NotApplicableError(
            f"{vlm.name} reads its images through cross-attention: its language model has no "
            f"image-token rows at {lm[0]} (read the vision tower's vision.* sites)"
        )
    parts: dict[str, list[tuple[np.ndarray, ...]]] = {s: [] for s in names}
    grids: list[tuple[int, int]] = []
    for first, chunk in batches(items, batch_size):
        inputs = vlm.prepare([it.image for it in chunk], [it.prompt for it in chunk])
        grids += [spans[0].grid for spans in inputs.image_spans]
        with torch.no_grad(), capture(vlm, names) as cap:
            vlm.forward(inputs)
        for site in names:
            value = cap[site].float().cpu()
            for b, rows in enumerate(token_rows(vlm, inputs, site, value)):
                kept = [r for r in rows if r[1] in groups]
                pos = np.array([r[0] for r in kept], dtype=np.int64)
                parts[site].append(
                    (
                        value[b, pos].numpy(),
                        np.full(len(kept), first + b),
                        pos,
                        np.array([r[1] for r in kept], dtype=object),
                        np.array([r[2] for r in kept], dtype=np.int64),
                    )
                )
    return {site: _join(site, parts[site], tuple(grids)) for site in names}


def _join(site: str, parts: list[tuple[np.ndarray, ...]], grid: tuple) -> Activations:
    cols = list(zip(*parts)) if parts else [[np.zeros((0, 0))]] + [[np.zeros(0)]] * 4
    values, item, position, group, patch = (np.concatenate(c) for c in cols)
    return Activations(site, values.astype(np.float32), item, position, group, patch, grid)
