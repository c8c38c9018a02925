"""The streaming accumulators behind ``neuron_stats`` (and DAPE): token indices per batch,
per-group reductions by vectorised scatter (``index_add_`` / ``scatter_reduce_``) on the
model's device, top-k merging, and the atomic ``.npz`` checkpoint (arrays plus a JSON header;
loaded with ``allow_pickle=False``).

The top-k examples of a neuron are its k *items* with the largest activation in the group,
each with the position of that activation (distinct items: one image does not fill the list
with neighbouring patches)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.methods.activations import token_rows

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem

FORMAT = 1
FIELDS = ("count", "active", "total", "max", "top_values", "top_items", "top_positions")


@dataclass(frozen=True)
class Index:
    """Where one batch's kept tokens sit in a site's output flattened to ``(batch * length,
    width)``. ``buckets``: per row and grouping (token groups; with domains ``group@domain``)
    its group, or ``groups`` (a bucket thrown away) for tokens not kept (padding, template);
    ``counts``: tokens per group; ``padded``: ``(groups present, rows, valid)``, per group
    ``(depth, items)`` the rows of each item, padded with a row of the same item (the max is
    unchanged), ``valid``: the item has such rows; ``offsets``: per item, its padding."""

    buckets: tuple[torch.Tensor, ...]
    counts: torch.Tensor
    padded: tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]
    offsets: torch.Tensor


class RowCache:
    """The kept tokens of one batch, from ``token_rows``, once per sequence kind and length."""

    def __init__(
        self,
        vlm: VLM,
        inputs: Inputs,
        groups: Sequence[str],
        first: int,
        domains: torch.Tensor | None = None,
    ) -> None:
        self.vlm, self.inputs, self.groups, self.first = vlm, inputs, list(groups), first
        self.domains = domains
        self._rows: dict[tuple[bool, int], tuple[torch.Tensor, ...]] = {}
        self._index: dict[tuple[bool, int], Index] = {}

    def get(self, site: str, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(batch, position, group)`` long tensors of the kept tokens on ``value``'s device
        (``group`` indexes ``groups``)."""
        key = (site.startswith("vision."), int(value.shape[1]))
        if key not in self._rows:
            b, pos, grp = [], [], []
            for i, rows in enumerate(token_rows(self.vlm, self.inputs, site, value)):
                for p, g, _ in rows:
                    if g in self.groups:
                        b.append(i)
                        pos.append(p)
                        grp.append(self.groups.index(g))
            dev = value.device
            self._rows[key] = tuple(
                torch.tensor(x, dtype=torch.long, device=dev) for x in (b, pos, grp)
            )
        return self._rows[key]

    def index(self, site: str, value: torch.Tensor, n_groups: int) -> Index:
        """The ``Index`` of ``value`` (``n_groups``: every grouping's groups together)."""
        key = (site.startswith("vision."), int(value.shape[1]))
        if key not in self._index:
            b, pos, grp = self.get(site, value)
            length, dev = value.shape[1], value.device
            flat = b * length + pos
            ids = [grp]
            if self.domains is not None:
                dom = self.domains.to(dev)[self.first + b]
                ids.append(grp + len(self.groups) * (1 + dom))
            buckets = []
            for gid in ids:
                bucket = torch.full((value.shape[0] * length,), n_groups, device=dev)
                buckets.append(bucket.index_copy_(0, flat, gid))
            counts = torch.bincount(torch.cat(ids), minlength=n_groups)
            batch = value.shape[0]
            rows_of: list[list[list[int]]] = [[[] for _ in range(batch)] for _ in self.groups]
            for i, p, g in zip(b.tolist(), flat.tolist(), grp.tolist()):
                rows_of[g][i].append(p)
            present = [g for g, per in enumerate(rows_of) if any(per)]
            tables, valid = [], []
            for g in present:  # pad with a row of the same item (or any row: masked)
                depth = max(len(r) for r in rows_of[g])
                fill = [r[0] if r else 0 for r in rows_of[g]]
                table = [r + [f] * (depth - len(r)) for r, f in zip(rows_of[g], fill)]
                tables.append(torch.tensor(table, device=dev).t().contiguous())
                valid.append([bool(r) for r in rows_of[g]])
            padded = (
                torch.tensor(present, dtype=torch.long, device=dev),
                tuple(tables),
                torch.tensor(valid, dtype=torch.bool, device=dev).reshape(len(present), -1),
            )
            offsets = torch.zeros(value.shape[0], dtype=torch.long, device=dev)
            mask = self.inputs.tensors.get("attention_mask")
            if not key[0] and mask is not None:  # left padding: count from the first token
                offsets = mask.to(dev).long().argmax(dim=1)
            self._index[key] = Index(tuple(buckets), counts, padded, offsets)
        return self._index[key]


class Accumulator:
    """Per-site count / active / sum / max per group and top-k per token group."""

    def __init__(
        self,
        sites: Sequence[str],
        groups: Sequence[str],
        domains: Sequence[str],
        k: int,
        device: torch.device,
    ) -> None:
        self.sites, self.k, self.device = list(sites), k, device
        self.base = len(groups)
        self.group_names = tuple(groups) + tuple(f"{g}@{d}" for d in domains for g in groups)
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def _init(self, width: int) -> dict[str, torch.Tensor]:
        n, dev = len(self.group_names), self.device
        return {
            "count": torch.zeros(n, dtype=torch.float64, device=dev),
            "active": torch.zeros(n, width, dtype=torch.float64, device=dev),
            "total": torch.zeros(n, width, dtype=torch.float64, device=dev),
            "max": torch.full((n, width), -torch.inf, device=dev),
            "top_values": torch.full((self.base, width, self.k), -torch.inf, device=dev),
            "top_items": torch.full((self.base, width, self.k), -1, device=dev),
            "top_positions": torch.full((self.base, width, self.k), -1, device=dev),
        }

    def reducer(self, site: str, rows: RowCache) -> Callable[[torch.Tensor], torch.Tensor]:
        """An identity patch that folds a site's batch output into the accumulators."""

        def fn(value: torch.Tensor) -> torch.Tensor:
            self.add(site, value, rows)
            return value

        return fn

    def add(self, site: str, value: torch.Tensor, rows: RowCache) -> None:
        """Fold ``value`` ``(batch, length, width)`` in: a few scatters over all its rows (the
        tokens not kept land in a bucket thrown away), no loop over tokens."""
        n = len(self.group_names)
        index = rows.index(site, value, n)
        x = value.reshape(-1, value.shape[-1])
        if x.dtype != torch.float32:
            x = x.float()
        st = self.state.get(site)
        if st is None:
            st = self.state[site] = self._init(x.shape[1])
        positive = x.sign().clamp_(min=0)  # 1 where active, else 0 (cheaper than (x > 0))
        st["count"] += index.counts
        shape = (n + 1, x.shape[1])
        for bucket in index.buckets:
            st["active"] += x.new_zeros(shape).index_add_(0, bucket, positive)[:n]
            st["total"] += x.new_zeros(shape).index_add_(0, bucket, x)[:n]
            high = x.new_full(shape, -torch.inf)
            high.scatter_reduce_(0, bucket[:, None].expand_as(x), x, "amax")
            torch.maximum(st["max"], high[:n], out=st["max"])
        if self.k and index.padded[0].numel():
            self._top(st, x, index, rows.first, value.shape[1])

    def _top(
        self, st: dict[str, torch.Tensor], x: torch.Tensor, index: Index, first: int, length: int
    ) -> None:
        """Merge the batch's per-item maxima of every token group into their top-k, all
        groups at once; the argmax position is looked up only for the entries that enter the
        top-k (max with indices is several times slower than ``amax`` on CPU)."""
        groups, padded, valid = index.padded
        k = self.k
        ys = [x.index_select(0, t.reshape(-1)).view(*t.shape, -1) for t in padded]
        best = torch.stack([y.amax(dim=0) for y in ys])  # (groups, items, width)
        best.masked_fill_(~valid[:, :, None], -torch.inf)
        values = torch.cat([st["top_values"][groups], best.transpose(1, 2)], dim=2)
        top, order = values.topk(k, dim=2)
        g, unit, slot = (order >= k).nonzero(as_tuple=True)
        if not g.numel():  # no item of this batch enters a top-k
            return
        kept = order.clamp(max=k - 1)
        item = st["top_items"][groups].gather(2, kept)
        pos = st["top_positions"][groups].gather(2, kept)
        b = order[g, unit, slot] - k
        row = torch.empty_like(b)
        for i, (y, t) in enumerate(zip(ys, padded)):  # the few groups, not the tokens
            here = g == i
            col = b[here]
            row[here] = t[y[:, col, unit[here]].argmax(dim=0), col]
        item[g, unit, slot] = first + b
        pos[g, unit, slot] = row % length - index.offsets[b]
        st["top_values"][groups], st["top_items"][groups] = top, item
        st["top_positions"][groups] = pos

    def arrays(self) -> tuple[dict[str, np.ndarray], ...]:
        """The fields (``FIELDS``) as per-site numpy dicts; count/active as integers."""
        out: list[dict[str, np.ndarray]] = []
        for name in FIELDS:
            per = {}
            for site in self.sites:
                if site not in self.state:
                    raise InputError(f"nothing reached {site}: no item was run")
                arr = self.state[site][name].cpu().numpy()
                per[site] = arr.astype(np.int64) if name in ("count", "active") else arr
            out.append(per)
        return tuple(out)

    def save(self, path: Path, meta: dict[str, Any], done: int) -> None:
        """Write the accumulators and ``done`` atomically (a temporary file, then replace)."""
        arrays = {
            f"{i}.{name}": self.state[site][name].cpu().numpy()
            for i, site in enumerate(self.sites)
            for name in FIELDS
        }
        header = json.dumps({**meta, "done": done})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **{"meta": np.array(header), **arrays})  # type: ignore[arg-type]
        os.replace(tmp, path)

    def load(self, arrays: Any) -> None:
        for i, site in enumerate(self.sites):
            self.state[site] = {
                name: torch.as_tensor(arrays[f"{i}.{name}"]).to(self.device) for name in FIELDS
            }


def meta_of(
    vlm: VLM,
    items: Sequence[BenchItem],
    sites: Sequence[str],
    groups: Sequence[str],
    domains: Sequence[str],
    labels: Sequence[str] | None,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """What a checkpoint must match: model, sites, groups, domains, settings and items (their
    count and a hash of their prompts and domain labels)."""
    digest = hashlib.sha256()
    for i, it in enumerate(items):
        digest.update(f"{it.prompt}\x00{labels[i] if labels else ''}\x01".encode())
    return {
        "format": FORMAT,
        "model": vlm.name,
        **settings,
        "sites": list(sites),
        "groups": list(groups),
        "domains": list(domains),
        "items": len(items),
        "items_sha256": digest.hexdigest(),
    }


def load_checkpoint(path: Path, meta: dict[str, Any], acc: Accumulator) -> int:
    """Items already done according to the checkpoint at ``path`` (0 when there is none);
    a checkpoint of another run raises ``InputError``."""
    if not path.exists():
        return 0
    meta = json.loads(json.dumps(meta))  # tuples as lists, as saved
    try:
        with np.load(path, allow_pickle=False) as data:
            saved = json.loads(str(data["meta"]))
            done = int(saved.pop("done"))
            if saved != meta:
                diff = sorted(k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k))
                raise InputError(
                    f"checkpoint {path} is of another run (differs in {', '.join(diff)}); "
                    "remove it or pass another path"
                )
            acc.load({k: data[k] for k in data.files if k != "meta"})
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{path} is not a neuron-stats checkpoint: {err}") from None
    return done
