"""The ``mmscope`` command line. Errors a user can cause print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mmscope.cli.evaluate import add_commands as add_eval_commands
from mmscope.cli.inside import add_commands as add_inside_commands
from mmscope.cli.studies import add_commands as add_study_commands
from mmscope.core.errors import InputError, MMScopeError

Handler = Callable[[argparse.Namespace], int]


def _ask(args: argparse.Namespace) -> int:
    from mmscope.core.images import load_image
    from mmscope.models import load

    vlm = load(args.model)
    image = load_image(args.image, allow_large=args.allow_large)
    inputs = vlm.prepare(image, args.prompt)
    if not hasattr(vlm, "generate"):
        raise MMScopeError(
            f"{args.model} is a contrastive encoder; it scores texts, it does not answer"
        )
    from mmscope.decoding import generate

    answer = generate(vlm, inputs, args.decoder, max_new_tokens=args.max_new_tokens)[0]
    print(json.dumps({"prompt": args.prompt, "answer": answer}) if args.json else answer)
    return 0


def _cli_target(vlm, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from mmscope.core import targets

    if args.generated:
        return targets.Generated(args.max_new_tokens)
    if args.target is None:
        return targets.default_target(vlm)
    try:
        targets.token_id(vlm, args.target)
        return targets.Token(args.target)
    except MMScopeError:  # several tokens: explain the whole answer's log-probability
        return targets.AnswerLogProb(args.target)


def _explain(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mmscope.core.images import load_image
    from mmscope.methods.explain import attribution_methods, make_method
    from mmscope.models import load
    from mmscope.report.explanations import write_explanations

    names = attribution_methods() if args.method == "all" else args.method.split(",")
    methods = [make_method(name.strip()) for name in names if name.strip()]  # check all first
    if not methods:
        raise MMScopeError("--method names no method; give registry keys or all")
    vlm = load(args.model)
    inputs = vlm.prepare(load_image(args.image, allow_large=args.allow_large), args.prompt)
    target = _cli_target(vlm, args)
    done = []
    for method in tqdm(methods, desc="explain", unit="method", disable=not args.verbose):
        done.append(method(vlm, inputs, target))
        page = write_explanations(done, args.out, title=args.prompt)  # kept as it goes
    if args.json:
        summary = {e.method: {"labels": e.labels[0], "words": e.text_map()} for e in done}
        print(json.dumps({"page": str(page), "methods": summary}))
    else:
        print(f"wrote {page}")
    return 0


def _world_sample(args: argparse.Namespace) -> int:
    from mmscope.world import export_dataset, make_samples

    path = export_dataset(make_samples(args.n, args.seed, size=args.size), args.out)
    print(f"wrote {args.n} scenes to {path}")
    return 0


def _train_toy(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mmscope.models.loading import toy_path
    from mmscope.toys.train import Recipe, train_toys

    bars: dict[str, tqdm] = {}

    def progress(stage: str, step: int, total: int, loss: float) -> None:
        bar = bars.setdefault(stage, tqdm(total=total, desc=f"toy-{stage}", unit="step"))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    out = Path(args.out) if args.out else toy_path("x").parent
    saved = train_toys(args.which, out, Recipe(seed=args.seed), progress)
    for bar in bars.values():
        bar.close()
    for name, path in saved.items():
        print(f"saved {name} to {path}")
    return 0


def _toys_eval(args: argparse.Namespace) -> int:
    from mmscope.models import load
    from mmscope.toys.evaluate import eval_clip, eval_llava

    result = {
        "toy-llava": eval_llava(load("toy-llava"), n=args.n),
        "toy-clip": eval_clip(load("toy-clip")),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for name, metrics in result.items():
            print(name, json.dumps(metrics, indent=1))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mmscope.bench import BenchConfig, load_items, run_leaderboard, world_items
    from mmscope.bench.report import write_leaderboard
    from mmscope.models import load

    vlm = load(args.model)
    items = load_items(args.data, args.images) if args.data else None
    items = items[: args.n] if items else world_items(args.n, contrastive=vlm.contrastive)
    split = lambda text: tuple(k for k in (text or "").split(",") if k)  # noqa: E731
    subsets = {}
    for part in split(args.subset):
        key, _, size = part.partition("=")
        if not size.isdigit():
            raise InputError(f"--subset takes metric=items pairs, not {part!r}")
        subsets[key] = int(size)
    config = BenchConfig(
        args.model,
        len(items),
        split(args.methods),
        split(args.metrics),
        args.batch_size,
        subsets,
        data=args.data or "world",
    ).resolved()  # bad keys and sizes raise before any work
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


def _methods(args: argparse.Namespace) -> int:
    import mmscope.decoding  # noqa: F401  (registers the decoders)
    import mmscope.methods  # noqa: F401  (registers the methods)
    import mmscope.metrics  # noqa: F401  (registers the metrics)
    import mmscope.models  # noqa: F401  (registers the adapters)
    from mmscope.core.registry import REGISTRY
    from mmscope.core.taxonomy import tree

    entries = [e for e in REGISTRY.entries() if e.kind != "adapter"]
    methods = [(e.level, e.key, e.family, e.paper) for e in entries]
    notes: dict[str, str] = {}
    if args.model:
        from mmscope.models import load
        from mmscope.models.capabilities import applicability

        vlm = load(args.model)
        notes = {e.key: f"does not apply: {why}" for e, why in applicability(vlm, entries) if why}
        caps = ", ".join(f"{k}={v}" for k, v in vlm.capabilities.to_dict().items())
        print(f"{vlm.name} ({vlm.family}): {caps}\n")
    print("\n".join(tree(methods, notes)))
    adapters = sorted(c for e in REGISTRY.entries("adapter") for c in e.extra["hf_classes"])
    print("\nmodel adapters: " + ", ".join(adapters))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmscope", description="Explain and interpret multimodal large language models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a prompt about an image")
    ask.add_argument("--model", default="toy-llava")
    ask.add_argument("--image", required=True)
    ask.add_argument("--prompt", required=True)
    ask.add_argument("--max-new-tokens", type=int, default=24)
    ask.add_argument("--decoder", default="greedy", help="a registered decoder, e.g. vcd, opera")
    ask.add_argument("--allow-large", action="store_true", help="accept images over 50 MP")
    ask.add_argument("--json", action="store_true")
    ask.set_defaults(handler=_ask)

    explain = sub.add_parser("explain", help="which image regions and prompt words made an answer")
    explain.add_argument("--model", default="toy-llava")
    explain.add_argument("--image", required=True)
    explain.add_argument("--prompt", required=True)
    explain.add_argument(
        "--method", default="integrated_gradients", help="comma-separated registry keys, or all"
    )
    explain.add_argument("--target", help="the word or answer to explain (default: the model's)")
    explain.add_argument(
        "--generated", action="store_true", help="explain every token of the generated answer"
    )
    explain.add_argument("--max-new-tokens", type=int, default=24)
    explain.add_argument("--allow-large", action="store_true", help="accept images over 50 MP")
    explain.add_argument("--out", default="mmscope-explain")
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(handler=_explain)

    world = sub.add_parser("world", help="the synthetic ground-truth world").add_subparsers(
        dest="world_command", required=True
    )
    sample = world.add_parser("sample", help="write scenes as PNG images + JSONL annotations")
    sample.add_argument("--n", type=int, default=100)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--size", type=int, default=48)
    sample.add_argument("--out", required=True)
    sample.set_defaults(handler=_world_sample)

    train = sub.add_parser(
        "train-toy", help="train the toy models on the world (llava starts from a toy-clip)"
    )
    train.add_argument("which", choices=["llava", "clip", "all"])
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", help="folder for the weights (default: the package's own)")
    train.set_defaults(handler=_train_toy)

    toys = sub.add_parser("toys", help="the shipped toy models").add_subparsers(
        dest="toys_command", required=True
    )
    evaluate = toys.add_parser("eval", help="measure the toys on held-out world data")
    evaluate.add_argument("--n", type=int, default=2000)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=_toys_eval)

    add_eval_commands(sub)

    bench = sub.add_parser("bench", help="the leaderboard: every method against every metric")
    bench.add_argument("--model", default="toy-llava")
    bench.add_argument("--n", type=int, default=500, help="world items (or the first of --data)")
    bench.add_argument("--data", help="a JSONL of items (image, question, answer, mask or boxes)")
    bench.add_argument("--images", help="folder of the --data images (default: its folder)")
    bench.add_argument("--methods", help="comma-separated methods (default: all + baselines)")
    bench.add_argument("--metrics", help="comma-separated metrics (default: all)")
    bench.add_argument("--batch-size", type=int, default=25)
    bench.add_argument(
        "--subset",
        help="items the costly metrics score, e.g. "
        "randomisation=25,road_morf=100 (defaults: see the README)",
    )
    bench.add_argument("--out", default="mmscope-bench")
    bench.add_argument("--resume", action="store_true", help="continue the run in --out")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(handler=_bench)

    add_inside_commands(sub)
    add_study_commands(sub)

    methods = sub.add_parser("methods", help="list every registered method by survey level")
    methods.add_argument(
        "--model", help="a loaded model: mark the entries that do not apply to it, and why"
    )
    methods.set_defaults(handler=_methods)

    demo = sub.add_parser("demo", help="run the main job on a toy model and write a report")
    demo.add_argument("--model", default="toy-llava")
    demo.add_argument("--n", type=int, default=10)
    demo.add_argument(
        "--explain", type=int, default=3, help="questions explained by every method (0: none)"
    )
    demo.add_argument(
        "--bench", type=int, default=10, help="items of the leaderboard section (0: none)"
    )
    demo.add_argument(
        "--inside", type=int, default=30, help="world questions of the inside-the-model section"
    )
    demo.add_argument(
        "--decoding", type=int, default=40, help="world images of the decoders' section"
    )
    demo.add_argument(
        "--neurons", type=int, default=40, help="world items of the neurons-and-concepts section"
    )
    demo.add_argument("--out", default="mmscope-report")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the CLI owns this process's output
    handler: Handler = args.handler
    try:
        return handler(args)
    except MMScopeError as err:
        print(f"mmscope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
