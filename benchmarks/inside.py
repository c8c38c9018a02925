"""What the inside-the-model analyses cost: causal tracing over every layer x position, and the
logit lens over every layer, each against the plain forward passes it cannot do without.

    python benchmarks/inside.py [--model toy-llava] [--n 4] [--batch-size 64] [--threads 2]
                                [--repeats 3] [--json]

``overhead_ratio``: wall time of ``causal_trace`` (preset ``residual``, noise on the image
tokens, one batch of ``n`` world items, a frozen ``TokenId`` target so that no forward goes to
finding the answer) divided by the wall time of the minimum forward passes: the clean run, the
corrupted run and one row per item per restored site, run as plain unhooked batched forwards of
the same row counts and batch size. Goal (the issue): at most 1.2. ``overhead_ratio_default_
target`` is the same with the default ``Predicted`` target, which costs one more forward.
Times are the minimum over ``repeats``, the runs interleaved.

``peak_memory_mb``: growth of the process's peak resident set (``resource.getrusage``
``ru_maxrss``) during the first trace, in MiB (on a GPU: ``torch.cuda.max_memory_allocated``
growth instead); ``clean_cache_mb`` is the size of the clean run's captured layer outputs.

``lens_forward_ratio``: wall time of ``logit_lens`` over all layers divided by one plain forward
of the same inputs (the issue: one forward plus the projections).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from mmscope.core.targets import Predicted, TokenId
from mmscope.methods.analysis import stack
from mmscope.methods.layer.tracing import CausalTrace
from mmscope.models import load
from mmscope.world.items import world_items


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return min(times)


def _rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


@torch.no_grad()
def _plain(vlm: Any, inputs: Any, units: int, batch_size: int) -> None:
    """The minimum forwards of a trace: clean, corrupt, and ``units`` tiled copies in chunks."""
    vlm.forward(inputs)
    vlm.forward(inputs)
    per = max(1, batch_size // inputs.batch_size)
    tiled: dict[int, Any] = {}
    for start in range(0, units, per):
        tiles = min(per, units - start)
        if tiles not in tiled:
            tiled = {tiles: inputs.tile(tiles).to(vlm.device)}
        vlm.forward(tiled[tiles])


def _lens(vlm: Any, inputs: Any, target: Any, repeats: int) -> dict[str, Any]:
    try:
        import mmscope.methods.token.lens  # noqa: F401  (registers it)
        from mmscope.methods.analysis import make_analysis

        lens = make_analysis("logit_lens")
    except Exception as err:  # the lens is not there yet
        return {"lens_forward_ratio": None, "lens_note": f"logit_lens unavailable: {err}"}
    lens(vlm, inputs, target)  # warm-up
    t_lens = _best(lambda: lens(vlm, inputs, target), repeats)
    with torch.no_grad():
        t_fwd = _best(lambda: vlm.forward(inputs), repeats)
    return {
        "lens_seconds": round(t_lens, 4),
        "forward_seconds": round(t_fwd, 4),
        "lens_forward_ratio": round(t_lens / t_fwd, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="toy-llava")
    parser.add_argument("--n", type=int, default=4, help="world items, traced as one batch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vlm = load(args.model)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    vlm.model.to(device)
    items = world_items(args.n, contrastive=vlm.contrastive)
    inputs = vlm.prepare([it.image for it in items], [it.prompt for it in items])
    target = None if vlm.contrastive else TokenId(Predicted().token_ids(vlm, inputs))
    trace = CausalTrace(preset="residual", batch_size=args.batch_size)
    layers = vlm.num_layers(stack(vlm))
    with torch.no_grad():
        vlm.forward(inputs)  # warm-up

    rss, cuda = _rss_mb(), device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    _sync()
    start = time.perf_counter()
    result = trace(vlm, inputs, target)
    _sync()
    first = time.perf_counter() - start
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss_mb() - rss
    traced = len(result.positions) - len(result.skipped)
    units = layers * traced

    runs: dict[str, list[float]] = {"trace": [first], "plain": [], "default": []}
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows all alike
        runs["plain"].append(_best(lambda: _plain(vlm, inputs, units, args.batch_size), 1))
        runs["trace"].append(_best(lambda: trace(vlm, inputs, target), 1))
        runs["default"].append(_best(lambda: trace(vlm, inputs, None), 1))
    t_trace, t_plain, t_default = (min(runs[k]) for k in ("trace", "plain", "default"))
    hidden = vlm.model.config.get_text_config().hidden_size
    width = len(result.positions)
    cache_mb = layers * args.n * width * hidden * vlm.dtype.itemsize / 2**20
    report: dict[str, Any] = {
        "model": args.model,
        "device": str(vlm.device),
        "threads": args.threads,
        "items": args.n,
        "layers": layers,
        "positions": width,
        "skipped_positions": len(result.skipped),
        "restored_sites": units,
        "rows_per_forward": max(1, args.batch_size // args.n) * args.n,
        "trace_seconds": round(t_trace, 4),
        "min_forwards_seconds": round(t_plain, 4),
        "overhead_ratio": round(t_trace / t_plain, 3),
        "overhead_ratio_default_target": round(t_default / t_plain, 3),
        "peak_memory_mb": round(peak, 1),
        "peak_memory_method": "cuda max_memory_allocated growth"
        if cuda
        else "ru_maxrss growth during the first trace",
        "clean_cache_mb": round(cache_mb, 2),
    }
    report.update(_lens(vlm, inputs, target, args.repeats))
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key:<30} {value}")


if __name__ == "__main__":
    main()
