"""``mmscope neurons|probe|concepts|sae ...``: the dataset-scale studies from the command line.

Every command runs one registered study on ``--n`` world items (or ``--data`` a JSONL file of
the user's, see ``bench.load_items``), takes the study's settings as ``--set name=value``,
writes ``<study>.json``, ``<study>.png`` and any tables as ``<study>.<table>.parquet`` into
``--out``, and prints where (``--json``: the result). Studies that take a ``checkpoint`` keep
one in ``--out`` and resume from it.
"""

from __future__ import annotations

import argparse
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmscope.cli.args import count, out_folder, seed, typed
from mmscope.core.errors import InputError


@dataclass(frozen=True)
class Command:
    """A subcommand: its studies (the first is the default ``--method``), the files it
    loads into keywords of the call (``--flag`` -> keyword, loader ``module:function``) and
    the world items it runs on without ``--data`` (``module:function(n, seed)``)."""

    studies: tuple[str, ...]
    help: str
    loads: tuple[tuple[str, str, str], ...] = field(default=())
    world: str = ""


GROUPS: dict[str, dict[str, Command]] = {
    "neurons": {
        "stats": Command(("neuron_stats",), "activation statistics per neuron and token group"),
        "dape": Command(
            ("dape",),
            "domain-specific neurons (MMNeuron's DAPE) over the world's background styles",
            world="mmscope.methods.neuron.dape:domain_items",
        ),
        "miner": Command(("miner",), "modality-specific neurons (MINER)"),
        "knowledge": Command(("knowledge_neurons",), "knowledge neurons of answers (Dai et al.)"),
        "dissect": Command(
            ("network_dissection", "clip_dissect"), "label neurons with the world's concepts"
        ),
        "edit": Command(
            ("neuron_edit",),
            "switch a neuron set off (or amplify it): accuracy by question type vs random",
            loads=(("--neurons", "neurons", "mmscope.methods.neuron.base:load_neuron_set"),),
        ),
    },
    "concepts": {
        "splice": Command(("splice",), "sparse concept decomposition of CLIP image embeddings"),
        "tcav": Command(("tcav",), "concept activation vectors and TCAV scores"),
        "textspan": Command(("textspan",), "text descriptions of CLIP heads (TextSpan)"),
        "anisotropy": Command(("anisotropy",), "mean cosine of embeddings per layer"),
    },
    "sae": {
        "train": Command(("sae_train",), "train a sparse autoencoder on a site"),
        "label": Command(
            ("sae_label",),
            "label a sparse autoencoder's features with the world's concepts",
            loads=(("--sae", "sae", "mmscope.methods.embedding.sae:load_sae"),),
        ),
    },
}
#: Top-level commands that are a single study.
SINGLE: dict[str, Command] = {
    "probe": Command(("probe",), "linear probes per layer with control tasks (selectivity)"),
}


def add_commands(sub: Any) -> None:
    """Add the study commands to the ``mmscope`` parser."""
    for group, commands in GROUPS.items():
        inner = sub.add_parser(group, help=f"{group} studies").add_subparsers(
            dest=f"{group}_command", required=True
        )
        for name, command in commands.items():
            _add(inner.add_parser(name, help=command.help), command)
    for name, command in SINGLE.items():
        _add(sub.add_parser(name, help=command.help), command)


def _add(p: argparse.ArgumentParser, command: Command) -> None:
    p.add_argument("--model", default="toy-llava")
    p.add_argument("--n", type=count(), default=200, help="world items")
    p.add_argument("--seed", type=seed, default=0, help="seed of the world items")
    p.add_argument("--data", help="a JSONL of the user's items instead of world items")
    p.add_argument("--allow-large", action="store_true", help="accept --data images over 50 MP")
    if len(command.studies) > 1:
        p.add_argument("--method", choices=command.studies, default=command.studies[0])
    for flag, _, _ in command.loads:
        p.add_argument(flag, required=True)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--out", type=out_folder, default="mmscope-studies")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run, study_command=command)


def settings(key: str, pairs: list[str]) -> dict[str, Any]:
    """``--set name=value`` pairs typed by the study's annotations (bools are true/false,
    yes/no, on/off or 1/0; lists are comma-separated), then checked against each setting's
    declared type and range; unknown names and bad values raise ``InputError``."""
    from mmscope.core.registry import REGISTRY
    from mmscope.core.settings import setting_hints
    from mmscope.methods.study import KIND

    obj = REGISTRY.get(key, KIND).obj
    params, hints = inspect.signature(obj).parameters, setting_hints(obj)
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in params:
            raise InputError(f"--set {pair!r}: {key} takes {', '.join(params) or 'no settings'}")
        hint = hints.get(name, inspect.Parameter.empty)
        out[name] = typed(hint, params[name].default, text, name)
    REGISTRY.check(key, KIND, **out)
    return out


def _loader(spec: str) -> Any:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run(args: argparse.Namespace) -> int:
    from mmscope.bench.items import load_items
    from mmscope.core.context import check_prompts
    from mmscope.methods.study import KIND, study, write_table
    from mmscope.models import load
    from mmscope.world.items import world_items

    command: Command = args.study_command
    key = getattr(args, "method", None) or command.studies[0]
    chosen = settings(key, args.set)  # settings, then data files, are checked before the model
    given = load_items(args.data, allow_large=args.allow_large) if args.data else None
    data = {kw: _loader(spec)(getattr(args, flag[2:])) for flag, kw, spec in command.loads}
    vlm = load(args.model)
    if given is not None:
        items = given
    elif command.world:
        items = _loader(command.world)(args.n, seed=args.seed)
    else:
        items = world_items(args.n, seed=args.seed, contrastive=vlm.contrastive)
    check_prompts(vlm, [it.prompt for it in items])  # before any progress bar starts
    out = Path(args.out)
    from mmscope.core.registry import REGISTRY

    if "checkpoint" in inspect.signature(REGISTRY.get(key, KIND).obj.__call__).parameters:
        data["checkpoint"] = out / f"{key}.checkpoint"
    result = study(key, vlm, items, **data, **chosen)
    written = [result.save(out / f"{key}.json"), result.save(out / f"{key}.png")]
    for name, columns in getattr(result, "tables", dict)().items():
        written.append(write_table(columns, out / f"{key}.{name}.parquet"))
    if args.json:
        from mmscope.methods.analysis import jsonable

        print(json.dumps(jsonable(result.to_dict())))
    else:
        print("wrote " + ", ".join(str(p) for p in written))
    return 0
