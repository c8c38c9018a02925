"""``mmscope eval pope|chair``: the hallucination metrics, for one decoder or several side by
side (``--decoder greedy,vcd,opera``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mmscope.cli.args import count
from mmscope.core.errors import InputError, MMScopeError


def _eval_pope(args: argparse.Namespace) -> int:
    from mmscope.metrics.hallucination import Pope, load_pope_jsonl
    from mmscope.models import load
    from mmscope.world import POPE_SPLITS

    if args.data and args.split:
        raise MMScopeError("--split picks world probes; with --data the file is the split")
    split = args.split or "all"
    if split not in (*POPE_SPLITS, "all"):
        raise MMScopeError(f"unknown POPE split {split!r}; use {', '.join(POPE_SPLITS)} or all")
    decoders = _decoders(args.decoder)
    data = None
    if args.data:  # the probes and their images are checked before the model loads
        data = load_pope_jsonl(args.data, args.images, allow_large=args.allow_large)
    vlm = load(args.model)
    result: dict[str, dict[str, Any]] = {}
    for decoder in decoders:
        if data:
            runs = {Path(args.data).stem: Pope(n_images=args.n, decoder=decoder)(vlm, data)}
        else:
            splits = [s for s in POPE_SPLITS if split in (s, "all")]
            runs = {s: Pope(s, n_images=args.n, decoder=decoder)(vlm) for s in splits}
        result[decoder] = {k: {**r.scores, "ci": r.to_dict()["ci"]} for k, r in runs.items()}
    if args.json:
        if len(decoders) == 1:
            print(json.dumps({"model": args.model, "splits": result[decoders[0]]}))
        else:
            print(json.dumps({"model": args.model, "decoders": result}))
        return 0
    for decoder, out in result.items():
        for name, r in out.items():
            nums = "  ".join(f"{k} {r[k]:.3f}" for k in ("accuracy", "precision", "recall", "f1"))
            ci = ", ".join(f"{k} [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in r["ci"].items())
            head = f"{decoder:<9} {name:<11}" if len(decoders) > 1 else f"{name:<11}"
            print(f"{head} {nums}  yes_ratio {r['yes_ratio']:.3f}  n {r['n']}  (95% CI {ci})")
    return 0


def _decoders(names: str) -> list[str]:
    """Registered decoder keys from a comma-separated list (each checked)."""
    from mmscope.decoding import make_decoder

    keys = [n.strip() for n in names.split(",") if n.strip()]
    if not keys:
        raise InputError("--decoder names no decoder")
    for key in keys:
        make_decoder(key)  # unknown ones raise now, before any work
    return keys


def _eval_chair(args: argparse.Namespace) -> int:
    from mmscope.metrics.hallucination import Chair
    from mmscope.models import load

    decoders = _decoders(args.decoder)
    vlm = load(args.model)
    runs = {d: Chair(n_images=args.n, decoder=d)(vlm).to_dict() for d in decoders}
    if args.json:
        if len(decoders) == 1:
            print(json.dumps({"model": args.model, **runs[decoders[0]]}))
        else:
            print(json.dumps({"model": args.model, "decoders": runs}))
        return 0
    for decoder, r in runs.items():
        ci = ", ".join(f"{k} [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in r["ci"].items())
        head = f"{decoder:<9} " if len(decoders) > 1 else ""
        rates = f"CHAIR_i {r['chair_i']:.3f}  CHAIR_s {r['chair_s']:.3f}  n {r['n']}"
        print(f"{head}{rates}  (95% CI {ci})")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``eval pope`` and ``eval chair`` to the ``mmscope`` parser."""
    evals = sub.add_parser("eval", help="hallucination metrics: POPE and CHAIR").add_subparsers(
        dest="eval_command", required=True
    )
    pope = evals.add_parser("pope", help="yes/no object probes (world or a POPE .jsonl file)")
    pope.add_argument("--model", default="toy-llava")
    pope.add_argument("--split", help="random, popular, adversarial or all (default: all)")
    pope.add_argument("--n", type=count(), default=100, help="world images per split")
    pope.add_argument("--data", help="probes in the POPE JSONL format")
    pope.add_argument("--images", help="folder of the --data images (default: its folder)")
    pope.add_argument("--allow-large", action="store_true", help="accept --data images over 50 MP")
    pope.add_argument("--decoder", default="greedy", help="comma-separated decoders")
    pope.add_argument("--json", action="store_true")
    pope.set_defaults(handler=_eval_pope)
    chair = evals.add_parser("chair", help="hallucinated objects in captions of world images")
    chair.add_argument("--model", default="toy-llava")
    chair.add_argument("--n", type=count(), default=100)
    chair.add_argument("--decoder", default="greedy", help="comma-separated decoders")
    chair.add_argument("--json", action="store_true")
    chair.set_defaults(handler=_eval_chair)
