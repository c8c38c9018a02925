"""Do the decoders lower hallucination? POPE (random, popular, adversarial), CHAIR on captions
and exact-match accuracy on answerable world questions, for every decoder, with paired 95%
intervals of the change against greedy decoding.

    python benchmarks/hallucination.py [--model toy-llava] [--decoders greedy,sampling,...]
        [--n 200] [--captions 200] [--answers 500] [--threads 2] [--json]

A decoder "helps" on a split where its F1 gain's interval lies above zero (the issue asks for
at least 2 points on the adversarial split), and on captions where CHAIR_i's change lies below
zero; ``answers`` says what it costs on questions that have an answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mmscope.bench.decoders import compare_decoders
from mmscope.decoding import decoders
from mmscope.models import load

SPLITS = ("random", "popular", "adversarial")


def _table(result: dict) -> str:
    head = "| decoder | " + " | ".join(f"{s} F1 (gain CI)" for s in SPLITS)
    head += " | CHAIR_i (change CI) | CHAIR_s | answer accuracy (change CI) |"
    rows = [head, "|" + " --- |" * (len(SPLITS) + 4)]
    for name, row in result["decoders"].items():
        cells = []
        for s in SPLITS:
            gain = row[s].get("f1_gain_ci")
            extra = f" ({gain[0]:+.3f}, {gain[1]:+.3f})" if gain else ""
            cells.append(f"{row[s]['f1']:.3f}{extra}")
        change = row["chair"].get("chair_i_change_ci")
        extra = f" ({change[0]:+.3f}, {change[1]:+.3f})" if change else ""
        cells.append(f"{row['chair']['chair_i']:.3f}{extra}")
        cells.append(f"{row['chair']['chair_s']:.3f}")
        acc = row["answers"].get("accuracy_change_ci")
        extra = f" ({acc[0]:+.3f}, {acc[1]:+.3f})" if acc else ""
        cells.append(f"{row['answers']['accuracy']:.3f}{extra}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="toy-llava")
    parser.add_argument("--decoders", help="comma-separated (default: every registered one)")
    parser.add_argument("--n", type=int, default=200, help="POPE images per split")
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--answers", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.decoders.split(",") if args.decoders else decoders()
    start = time.perf_counter()
    result = compare_decoders(
        load(args.model),
        names,
        n_images=args.n,
        n_captions=args.captions,
        n_answers=args.answers,
        progress=lambda name: print(f"decoding with {name}", file=sys.stderr),
    )
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result) if args.json else _table(result))


if __name__ == "__main__":
    main()
