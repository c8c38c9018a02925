"""What ``prepare`` costs next to one forward pass, for an input of 1,000+ image tokens.

    python benchmarks/layout.py [--tokens 1024] [--repeats 5] [--threads 2] [--json]

A tiny random Qwen2.5-VL (``mmscope.toys.tiny``) whose processor is allowed ``--tokens``
merged cells gets a square image of exactly that many image tokens. Times (minimum over
``repeats``, after a warm-up) of: the Hugging Face processor alone (resize, normalise, expand
the image placeholder), mmscope's ``prepare`` (the processor plus the spans: where each image's
tokens sit, their grid and box, where the prompt's words sit) and one forward of the model on
the prepared inputs. ``layout_vs_forward`` is (prepare - processor) / forward: the cost of
mmscope's own layout work, the issue's goal being under 0.05; ``prepare_vs_forward`` is the
whole of prepare over the forward (the processor's image work included).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from mmscope.toys.tiny import build_tiny
from mmscope.toys.tiny.qwen2_vl import FACTOR

PROMPT = "what color is the circle ?"


def best(fn: Callable[[], Any], repeats: int) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(tokens: int, repeats: int) -> dict[str, Any]:
    vlm = build_tiny("tiny_qwen2_5_vl")
    side = math.isqrt(tokens)
    ip = vlm.processor.image_processor
    ip.size = {"shortest_edge": FACTOR * FACTOR, "longest_edge": (side * FACTOR) ** 2}
    image = Image.new("RGB", (side * FACTOR, side * FACTOR), (200, 40, 40))
    inputs = vlm.prepare(image, PROMPT)
    span = inputs.image_spans[0][0]
    text = vlm._template(1, PROMPT)
    processor = best(lambda: vlm._process([image], [text]), repeats)
    prepare = best(lambda: vlm.prepare(image, PROMPT), repeats)
    with torch.no_grad():
        forward = best(lambda: vlm.forward(inputs), repeats)
    return {
        "model": vlm.name,
        "image_tokens": span.end - span.start,
        "sequence": int(inputs.input_ids.shape[1]),
        "processor_s": processor,
        "prepare_s": prepare,
        "forward_s": forward,
        "layout_vs_forward": (prepare - processor) / forward,
        "prepare_vs_forward": prepare / forward,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    row = measure(args.tokens, args.repeats)
    if args.json:
        print(json.dumps(row))
    else:
        for key, value in row.items():
            print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
