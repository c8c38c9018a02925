"""What the streaming neuron statistics cost over the plain forward passes they need.

    python benchmarks/neurons.py [--model toy-llava] [--n 128] [--batch-size 16] [--top-k 5]
                                 [--lm-width 1024] [--threads 2] [--repeats 3] [--json]

``hook_overhead``: wall time of the ``neuron_stats`` engine's forwards (every MLP activation
site reduced inside the forward: counts, active counts, sums, maxima and top-k per token
group, on the model's device) divided by the same batched forwards with no hooks, over ``n``
fixed world items (inputs prepared once, outside both timings). Goal (the issue): at most
1.15. ``study_items_per_s`` is the whole study (preparing inputs included) per second.
Times are the minimum over ``repeats``, the runs interleaved; on CPU they are the process's
CPU time (run with one thread), on a GPU synchronised wall time.

``--lm-width W`` runs a random-weight model of toy-llava's shape whose language model is W wide
(MLP 2.75 W, W / 64 heads): the toy's 128-wide LM makes the per-batch reductions weigh far more
against its forward than a real model's would.

``peak_memory_mb``: growth of the process's peak resident set during the first study run
(on a GPU: ``torch.cuda.max_memory_allocated`` growth); ``accumulator_mb``: the size of the
accumulators, which does not grow with ``n``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

import torch

from mmscope.core.hooks import patch
from mmscope.methods.activations import batches
from mmscope.methods.neuron.accumulate import Accumulator, RowCache
from mmscope.methods.neuron.stats import NeuronStatsStudy, default_sites
from mmscope.models import load
from mmscope.world.items import world_items


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _timed(fn: Any) -> float:
    """Seconds of ``fn``: on a GPU wall time (synchronised); on CPU the process's CPU time,
    which a machine shared with other jobs disturbs far less than wall time."""
    clock = time.perf_counter if torch.cuda.is_available() else time.process_time
    _sync()
    start = clock()
    fn()
    _sync()
    return clock() - start


def _wider(model: str, width: int) -> Any:
    """``model`` (a toy-llava-shaped LLaVA) with a random language model ``width`` wide."""
    from transformers import LlavaForConditionalGeneration

    from mmscope.models.llava import LlavaVLM

    base = load(model)
    config = base.model.config
    text = config.text_config
    text.hidden_size, text.intermediate_size = width, int(2.75 * width)
    text.num_attention_heads = text.num_key_value_heads = max(1, width // 64)
    text.head_dim = width // text.num_attention_heads
    torch.manual_seed(0)
    wide = LlavaForConditionalGeneration(config).eval()
    return LlavaVLM(wide, base.processor, f"{model} (random LM, width {width})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="toy-llava")
    parser.add_argument("--n", type=int, default=128, help="world items")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda")
    parser.add_argument(
        "--lm-width", type=int, default=0, help="a random LM this wide (0: the toy)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vlm = _wider(args.model, args.lm_width) if args.lm_width else load(args.model)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    vlm.model.to(device)
    items = world_items(args.n, contrastive=vlm.contrastive)
    sites = default_sites(vlm)
    groups = ("image", "text", "last", "class")
    prepared = [
        (first, vlm.prepare([it.image for it in chunk], [it.prompt for it in chunk]).to(device))
        for first, chunk in batches(items, args.batch_size)
    ]

    @torch.no_grad()
    def bare() -> None:
        for _, inputs in prepared:
            vlm.forward(inputs)

    @torch.no_grad()
    def hooked() -> Accumulator:
        acc = Accumulator(sites, groups, (), args.top_k, vlm.device)
        for first, inputs in prepared:
            rows = RowCache(vlm, inputs, groups, first)
            with patch(vlm, {s: acc.reducer(s, rows) for s in sites}):
                vlm.forward(inputs)
        return acc

    study = NeuronStatsStudy(top_k=args.top_k, batch_size=args.batch_size, progress=False)
    bare()  # warm-up
    acc = hooked()
    cuda = device == "cuda"
    rss = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    first_study = _timed(lambda: study(vlm, items))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mb() - rss
    runs: dict[str, list[float]] = {"bare": [], "hooked": [], "study": [first_study]}
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows all alike
        runs["bare"].append(_timed(bare))
        runs["hooked"].append(_timed(hooked))
        runs["study"].append(_timed(lambda: study(vlm, items)))
    t_bare, t_hooked, t_study = (min(runs[k]) for k in ("bare", "hooked", "study"))
    acc_bytes = sum(t.numel() * t.element_size() for st in acc.state.values() for t in st.values())
    report: dict[str, Any] = {
        "model": vlm.name,
        "device": str(vlm.device),
        "threads": args.threads,
        "items": args.n,
        "batch_size": args.batch_size,
        "sites": len(sites),
        "top_k": args.top_k,
        "bare_seconds": round(t_bare, 4),
        "hooked_seconds": round(t_hooked, 4),
        "hook_overhead": round(t_hooked / t_bare, 3),
        "bare_items_per_s": round(args.n / t_bare, 1),
        "hooked_items_per_s": round(args.n / t_hooked, 1),
        "study_items_per_s": round(args.n / t_study, 1),
        "peak_memory_mb": round(peak, 1),
        "peak_memory_method": "cuda max_memory_allocated growth"
        if cuda
        else "ru_maxrss growth during the first study run",
        "accumulator_mb": round(acc_bytes / 2**20, 3),
    }
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key:<24} {value}")


if __name__ == "__main__":
    main()
