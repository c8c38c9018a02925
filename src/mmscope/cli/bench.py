"""``mmscope bench`` (the leaderboard) and ``mmscope demo`` (the report that runs every
section): their flags are typed and their data files, settings and prompts checked before the
model loads and before any progress bar starts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mmscope.cli.args import count, out_folder
from mmscope.core.errors import InputError

#: Largest batch a flag accepts.
MAX_BATCH = 65_536
#: ``demo`` sections: flag, default size, help.
DEMO_SECTIONS = (
    ("explain", 3, "questions explained by every method (0: none)"),
    ("bench", 10, "items of the leaderboard section (0: none)"),
    ("inside", 30, "world questions of the inside-the-model section"),
    ("decoding", 40, "world images of the decoders' section"),
    ("neurons", 40, "world items of the neurons-and-concepts section"),
)


def _bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mmscope.bench import BenchConfig, load_items, run_leaderboard
    from mmscope.bench.report import write_leaderboard
    from mmscope.core.context import check_prompts
    from mmscope.models import load
    from mmscope.world.items import world_items

    split = lambda text: tuple(k for k in (text or "").split(",") if k)  # noqa: E731
    subsets = {}
    for part in split(args.subset):
        key, _, size = part.partition("=")
        if not size.isdigit():
            raise InputError(f"--subset takes metric=items pairs, not {part!r}")
        subsets[key] = int(size)

    def configured(n: int) -> BenchConfig:  # bad keys and sizes raise before any work
        methods, metrics = split(args.methods), split(args.metrics)
        data = args.data or "world"
        return BenchConfig(
            args.model, n, methods, metrics, args.batch_size, subsets, data=data
        ).resolved()

    configured(args.n)
    data = load_items(args.data, args.images, allow_large=args.allow_large) if args.data else []
    vlm = load(args.model)
    items = data[: args.n] if data else world_items(args.n, contrastive=vlm.contrastive)
    check_prompts(vlm, [it.prompt for it in items])  # before the progress bar starts
    config = configured(len(items))
    with tqdm(desc="bench", unit="method-batch", disable=args.json) as bar:

        def progress(step: int, total: int, method: str) -> None:
            bar.total = total
            bar.n = step
            bar.set_postfix_str(method)
            bar.refresh()

        results = run_leaderboard(vlm, items, config, args.out, args.resume, progress)
    info = {**config.resolved().to_json(), "model": args.model}
    page = write_leaderboard(results, args.out, info)
    if args.json:
        print(json.dumps({"rows": [r.to_dict() for r in results]}))
        return 0
    for r in results:
        d = r.to_dict()
        lo, hi = (f"{v:.3f}" if v is not None else "n/a" for v in d["ci"])
        mean = "n/a" if d["mean"] is None else f"{d['mean']:.3f}"
        print(f"{d['method']:<22} {d['metric']:<18} {mean:>8}  [{lo}, {hi}]  n={d['n']}")
    print(f"wrote {page}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mmscope.report.demo import run_demo

    path = run_demo(
        Path(args.out),
        model=args.model,
        n=args.n,
        explain=args.explain,
        bench=args.bench,
        inside=args.inside,
        decoding=args.decoding,
        neurons=args.neurons,
    )
    print(f"wrote {path}")
    return 0


def add_bench_command(sub: Any) -> None:
    """Add ``bench`` to the ``mmscope`` parser."""
    bench = sub.add_parser("bench", help="the leaderboard: every method against every metric")
    bench.add_argument("--model", default="toy-llava")
    bench.add_argument(
        "--n", type=count(), default=500, help="world items (or the first of --data)"
    )
    bench.add_argument("--data", help="a JSONL of items (image, question, answer, mask or boxes)")
    bench.add_argument("--images", help="folder of the --data images (default: its folder)")
    bench.add_argument("--methods", help="comma-separated methods (default: all + baselines)")
    bench.add_argument("--metrics", help="comma-separated metrics (default: all)")
    bench.add_argument("--batch-size", type=count(MAX_BATCH), default=25)
    bench.add_argument(
        "--subset",
        help="items the costly metrics score, e.g. "
        "randomisation=25,road_morf=100 (defaults: see the README)",
    )
    bench.add_argument("--allow-large", action="store_true", help="accept --data images over 50 MP")
    bench.add_argument("--out", type=out_folder, default="mmscope-bench")
    bench.add_argument("--resume", action="store_true", help="continue the run in --out")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(handler=_bench)


def add_demo_command(sub: Any) -> None:
    """Add ``demo`` to the ``mmscope`` parser."""
    demo = sub.add_parser("demo", help="run the main job on a toy model and write a report")
    demo.add_argument("--model", default="toy-llava")
    demo.add_argument("--n", type=count(), default=10)
    for flag, default, text in DEMO_SECTIONS:
        demo.add_argument(f"--{flag}", type=count(minimum=0), default=default, help=text)
    demo.add_argument("--out", type=out_folder, default="mmscope-report")
    demo.set_defaults(handler=_demo)
