"""``mmscope lens|ablate|knockout|trace|heads|prune|first-token``: the inside-the-model
analyses from the command line. Each runs on ``--image``/``--prompt`` or, without an image, on
world questions (whose evidence masks and answers are known), writes ``<analysis>.json`` and
``<analysis>.png`` into ``--out`` and prints where (``--json``: the result)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmscope.cli.args import box, count, numbers, out_folder, seed
from mmscope.core.errors import InputError


@dataclass(frozen=True)
class Command:
    """A subcommand: its analysis, what it needs from the data, its own options."""

    analysis: str
    help: str
    many: bool = False  # runs on many world questions rather than one
    options: tuple[tuple[str, dict[str, Any]], ...] = field(default=())


_ints, _floats = numbers(int), numbers(float)


def _words(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


COMMANDS: dict[str, Command] = {
    "lens": Command(
        "logit_lens",
        "logit lens: what every layer would answer, at every position",
        options=(("--k", {"type": int}), ("--layers", {"type": _ints})),
    ),
    "ablate": Command(
        "token_ablation",
        "visual-token ablation: answers flipped by replacing image tokens",
        many=True,
        options=(
            ("--sets", {"type": _words, "help": "object,random,high_norm,attributed"}),
            ("--buffer", {"type": int}),
            ("--fill", {"choices": ["mean", "zero"]}),
        ),
    ),
    "knockout": Command(
        "attention_knockout",
        "attention knockout: the answer's probability with flows to the last token blocked",
        options=(("--window", {"type": int}),),
    ),
    "trace": Command(
        "causal_trace",
        "causal tracing: restore clean sites into a run with noised image tokens",
        options=(
            ("--preset", {"choices": ["residual", "mlp", "attn", "head"]}),
            ("--noise", {"type": float}),
            ("--corrupt-image", {"dest": "corrupt_image", "help": "a counterfactual image"}),
        ),
    ),
    "heads": Command(
        "head_importance",
        "head importance: the target's drop when each attention head is masked",
        options=(("--method", {"choices": ["ablation", "gradient"]}), ("--top", {"type": int})),
    ),
    "prune": Command(
        "fastv",
        "FastV pruning: accuracy on world questions over the pruning layer and ratio",
        many=True,
        options=(("--layers", {"type": _ints}), ("--ratios", {"type": _floats})),
    ),
    "first-token": Command(
        "first_token",
        "first-token analysis: does the first answer token tell answerable questions apart",
        many=True,
    ),
}
#: Options that are data or handled here, not settings of the analysis.
_NOT_SETTINGS = {"corrupt_image"}


def add_commands(sub: Any) -> None:
    """Add every inside-the-model subcommand to the ``mmscope`` parser."""
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        p.add_argument("--model", default="toy-llava")
        p.add_argument("--image", help="an image (default: world questions)")
        p.add_argument("--prompt", help="the question about --image")
        p.add_argument("--box", type=box, help="evidence box x0,y0,x1,y1 in --image's pixels")
        p.add_argument("--target", help="the word to follow (default: the model's answer)")
        n = 100 if command.many else 1
        p.add_argument("--n", type=count(), default=n, help="world items")
        p.add_argument("--seed", type=seed, default=0, help="seed of the world items")
        p.add_argument("--allow-large", action="store_true", help="accept images over 50 MP")
        for flag, spec in command.options:
            p.add_argument(flag, default=None, **spec)
        p.add_argument("--out", type=out_folder, default="mmscope-inside")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=run, inside=name)


def _world(vlm: Any, args: argparse.Namespace) -> tuple[Any, list[Any], list[str]]:
    """(inputs, masks, answers) of ``--n`` world questions."""
    from mmscope.world.items import world_items

    items = world_items(args.n, seed=args.seed, contrastive=vlm.contrastive)
    inputs = vlm.prepare([it.image for it in items], [it.prompt for it in items])
    return inputs, [it.mask for it in items], [it.answer for it in items]


def _given(vlm: Any, args: argparse.Namespace) -> tuple[Any, list[Any], list[str]]:
    from mmscope.core.images import load_image

    if not args.prompt:
        raise InputError("--image needs --prompt")
    image = load_image(args.image, allow_large=args.allow_large)
    mask = None
    if args.box:
        x0, y0, x1, y1 = (int(round(v)) for v in args.box)
        if x0 >= image.width or y0 >= image.height or x1 <= x0 or y1 <= y0:
            size = f"{image.width}x{image.height}"
            raise InputError(f"--box {x0},{y0},{x1},{y1} covers no pixel of the {size} image")
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[y0:y1, x0:x1] = True
    return vlm.prepare(image, args.prompt), [mask], [""]


def _target(vlm: Any, args: argparse.Namespace, answers: list[str]) -> Any:
    from mmscope.core import targets

    if args.target:
        return targets.Token(args.target)
    if vlm.contrastive or args.image or not all(answers):
        return None
    ids = [targets.answer_id(vlm, a) for a in answers]
    return targets.TokenId(ids)  # world questions: the true answer's first word


def _first_token_data(vlm: Any, args: argparse.Namespace) -> tuple[Any, list[bool]]:
    """``--n`` answerable and ``--n`` unanswerable world questions, with their labels."""
    from mmscope.world.items import answerability_items

    items = answerability_items(args.n, args.seed)
    inputs = vlm.prepare([it.image for it in items], [it.prompt for it in items])
    return inputs, [it.kind != "unanswerable" for it in items]


def run(args: argparse.Namespace) -> int:
    """Handler of every inside-the-model subcommand."""
    from mmscope.core import targets
    from mmscope.core.registry import REGISTRY
    from mmscope.methods.analysis import KIND
    from mmscope.methods.inside import analyse
    from mmscope.models import load

    command = COMMANDS[args.inside]
    names = [spec.get("dest") or flag[2:].replace("-", "_") for flag, spec in command.options]
    settings = {
        name: getattr(args, name)
        for name in names
        if name not in _NOT_SETTINGS and getattr(args, name) is not None
    }
    REGISTRY.check(command.analysis, KIND, **settings)  # types and ranges, before the model
    if args.prompt and not args.image:
        raise InputError("--prompt needs --image (without one, world questions are asked)")
    vlm = load(args.model)
    if args.target:
        targets.token_id(vlm, args.target)  # not one known token: refused, naming the word
    data: dict[str, Any] = {}
    if command.analysis == "first_token":
        inputs, data["labels"] = _first_token_data(vlm, args)
        target = None
    else:
        inputs, masks, answers = (_given if args.image else _world)(vlm, args)
        target = _target(vlm, args, answers)
        if command.analysis in ("token_ablation", "attention_knockout"):
            data["masks"] = masks
        wants_object = "object" in (settings.get("sets") or ("object",))
        if command.analysis == "token_ablation" and args.image and not args.box and wants_object:
            raise InputError("ablate --image needs --box x0,y0,x1,y1 (the evidence) or --sets")
        if args.inside == "trace" and args.corrupt_image:
            from mmscope.core.images import load_image

            other = load_image(args.corrupt_image, allow_large=args.allow_large)
            data["corrupted"] = vlm.prepare(other, inputs.prompts[0])
    result = analyse(command.analysis, vlm, inputs, target, **settings, **data)
    out = Path(args.out)
    written = [result.save(out / f"{command.analysis}.{ext}") for ext in ("json", "png")]
    if args.json:
        files = [str(p) for p in written]
        print(json.dumps({"analysis": command.analysis, "files": files, **_summary(result)}))
    else:
        print(f"wrote {written[0]} and {written[1]}")
    return 0


def _summary(result: Any) -> dict[str, Any]:
    from mmscope.methods.analysis import jsonable

    return dict(jsonable(result.to_dict()))
