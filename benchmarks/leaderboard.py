"""Where the leaderboard's time goes: ``mmscope bench`` on world items, timed per method and
per metric from the run's own ``results.jsonl``.

    python benchmarks/leaderboard.py [--n 500] [--model toy-llava] [--threads 2] [--json]

``seconds`` is the wall time of the whole run (answers, explanations, metrics); ``by_method``
and ``by_metric`` split the time spent inside explanations and metrics. The issue's goal:
n=500 on toy-llava in under 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict

import torch

from mmscope.bench import BenchConfig, run_leaderboard
from mmscope.models import load
from mmscope.world.items import world_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="toy-llava")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="keep the run here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vlm = load(args.model)
    items = world_items(args.n, contrastive=vlm.contrastive)
    out = args.out or tempfile.mkdtemp(prefix="mmscope-bench-")
    start = time.perf_counter()
    run_leaderboard(vlm, items, BenchConfig(args.model, args.n), out)
    seconds = time.perf_counter() - start
    by_method: dict[str, float] = defaultdict(float)
    by_metric: dict[str, float] = defaultdict(float)
    with open(f"{out}/results.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            for key, t in rec["seconds"].items():
                by_metric[key] += t
                by_method[rec["method"]] += t
    report = {
        "model": args.model,
        "n": args.n,
        "threads": args.threads,
        "seconds": round(seconds, 1),
        "minutes": round(seconds / 60, 2),
        "by_method": {k: round(v, 1) for k, v in sorted(by_method.items(), key=lambda x: -x[1])},
        "by_metric": {k: round(v, 1) for k, v in sorted(by_metric.items(), key=lambda x: -x[1])},
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.model}, n={args.n}, {args.threads} threads: {report['minutes']} minutes")
    for title in ("by_method", "by_metric"):
        print(title)
        for k, v in report[title].items():  # type: ignore[attr-defined]
            print(f"  {k:<24} {v:>8.1f} s")


if __name__ == "__main__":
    main()
