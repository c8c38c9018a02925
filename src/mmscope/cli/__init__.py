"""The ``mmscope`` command line. Errors a user can cause print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmscope.cli.args import Parser, count, fail, one_line, out_folder, seed
from mmscope.cli.bench import add_bench_command, add_demo_command
from mmscope.cli.evaluate import add_commands as add_eval_commands
from mmscope.cli.inside import add_commands as add_inside_commands
from mmscope.cli.studies import add_commands as add_study_commands
from mmscope.core.errors import MMScopeError
from mmscope.core.validate import MAX_NEW_TOKENS

Handler = Callable[[argparse.Namespace], int]
#: Largest side of a world image a flag accepts.
MAX_SIDE = 1024


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
    targets.known_ids(vlm, args.target)  # a word not in the vocabulary raises, named
    try:
        targets.token_id(vlm, args.target)
        return targets.Token(args.target)
    except MMScopeError:  # several tokens: explain the whole answer's log-probability
        return targets.AnswerLogProb(args.target)


def _explain(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mmscope.core.context import check_length
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
    check_length(vlm, inputs)  # the whole sequence, image tokens included, before progress
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
    parser = Parser(
        prog="mmscope", description="Explain and interpret multimodal large language models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a prompt about an image")
    ask.add_argument("--model", default="toy-llava")
    ask.add_argument("--image", required=True)
    ask.add_argument("--prompt", required=True)
    ask.add_argument("--max-new-tokens", type=count(MAX_NEW_TOKENS), default=24)
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
    explain.add_argument("--max-new-tokens", type=count(MAX_NEW_TOKENS), default=24)
    explain.add_argument("--allow-large", action="store_true", help="accept images over 50 MP")
    explain.add_argument("--out", type=out_folder, default="mmscope-explain")
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(handler=_explain)

    world = sub.add_parser("world", help="the synthetic ground-truth world").add_subparsers(
        dest="world_command", required=True
    )
    sample = world.add_parser("sample", help="write scenes as PNG images + JSONL annotations")
    sample.add_argument("--n", type=count(), default=100)
    sample.add_argument("--seed", type=seed, default=0)
    sample.add_argument("--size", type=count(MAX_SIDE, minimum=2), default=48, help="pixels")
    sample.add_argument("--out", type=out_folder, required=True)
    sample.set_defaults(handler=_world_sample)

    train = sub.add_parser(
        "train-toy", help="train the toy models on the world (llava starts from a toy-clip)"
    )
    train.add_argument("which", choices=["llava", "clip", "all"])
    train.add_argument("--seed", type=seed, default=0)
    train.add_argument(
        "--out", type=out_folder, help="folder for the weights (default: the package's own)"
    )
    train.set_defaults(handler=_train_toy)

    toys = sub.add_parser("toys", help="the shipped toy models").add_subparsers(
        dest="toys_command", required=True
    )
    evaluate = toys.add_parser("eval", help="measure the toys on held-out world data")
    evaluate.add_argument("--n", type=count(), default=2000)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=_toys_eval)

    add_eval_commands(sub)

    add_bench_command(sub)

    add_inside_commands(sub)
    add_study_commands(sub)

    methods = sub.add_parser("methods", help="list every registered method by survey level")
    methods.add_argument(
        "--model", help="a loaded model: mark the entries that do not apply to it, and why"
    )
    methods.set_defaults(handler=_methods)

    add_demo_command(sub)
    return parser


def _warn(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    print(f"mmscope: warning: {one_line(str(message))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0), or a refused flag (2, its one line printed)
        return stop.code if isinstance(stop.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the CLI owns this process's output
    handler: Handler = args.handler
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn  # one line each, like the errors
            return handler(args)
    except MMScopeError as err:
        return fail(str(err))
    except KeyboardInterrupt:
        print("mmscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
