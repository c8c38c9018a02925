"""The ``mmscope`` command line. Errors a user can cause print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mmscope.core.errors import MMScopeError

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
    answer = vlm.generate(inputs, max_new_tokens=args.max_new_tokens)[0]
    print(json.dumps({"prompt": args.prompt, "answer": answer}) if args.json else answer)
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


def _demo(args: argparse.Namespace) -> int:
    from mmscope.report.demo import run_demo

    path = run_demo(Path(args.out), model=args.model, n=args.n)
    print(f"wrote {path}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    import mmscope.models  # noqa: F401  (registers the adapters)
    from mmscope.core.registry import REGISTRY
    from mmscope.core.taxonomy import tree

    methods = [
        (e.level, e.key, e.family, e.paper) for e in REGISTRY.entries() if e.kind != "adapter"
    ]
    print("\n".join(tree(methods)))
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
    ask.add_argument("--allow-large", action="store_true", help="accept images over 50 MP")
    ask.add_argument("--json", action="store_true")
    ask.set_defaults(handler=_ask)

    world = sub.add_parser("world", help="the synthetic ground-truth world").add_subparsers(
        dest="world_command", required=True
    )
    sample = world.add_parser("sample", help="write scenes as PNG images + JSONL annotations")
    sample.add_argument("--n", type=int, default=100)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--size", type=int, default=48)
    sample.add_argument("--out", required=True)
    sample.set_defaults(handler=_world_sample)

    train = sub.add_parser("train-toy", help="train the toy models on the world (CPU)")
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

    methods = sub.add_parser("methods", help="list every registered method by survey level")
    methods.set_defaults(handler=_methods)

    demo = sub.add_parser("demo", help="run the main job on a toy model and write a report")
    demo.add_argument("--model", default="toy-llava")
    demo.add_argument("--n", type=int, default=10)
    demo.add_argument("--out", default="mmscope-report")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
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
