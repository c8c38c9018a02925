"""What ``prepare`` costs next to one forward pass, for inputs of thousands of image tokens.

    python benchmarks/layout.py [--tokens 1024] [--side 1344] [--repeats 5] [--threads 2] [--json]

Two tiny random models (``mmscope.toys.tiny``) with real geometries, one row each:
- ``qwen2_5_vl``: a Qwen2.5-VL whose processor is allowed ``--tokens`` merged cells gets a
  square image of exactly that many image tokens (one view);
- ``llava_next``: a LLaVA-NeXT with LLaVA-1.6's geometry (336 px tiles of 14 px patches, its
  grid pinpoints) gets a ``--side`` x ``side * 2 / 3`` image: a base view and the unpadded
  stitched tiles with a newline per row (two views, the second with ``cells``).
Times (minimum over ``repeats``, after a warm-up) of the Hugging Face processor alone (resize,
normalise, tile, expand the image placeholder), mmscope's ``prepare`` (the processor plus the
layout: where each view's cells sit, their grids and boxes, where the prompt's words sit), and
one forward of the model on the prepared inputs. ``layout_s`` is ``prepare`` given the
processor's output (its work done once beforehand): mmscope's own layout work;
``layout_vs_forward`` divides it by the forward, the issue's goal being under 0.05;
``prepare_vs_forward`` is the whole of prepare over the forward (the processor's image work
included).
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
from mmscope.toys.tiny.llava_next import tiny_llava_next
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


#: LLaVA-1.6's grid pinpoints (height, width) for 336 px tiles.
LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def qwen_case(tokens: int) -> tuple[Any, Image.Image]:
    """Tiny Qwen2.5-VL allowed ``tokens`` merged cells, and a square image of that many."""
    vlm = build_tiny("tiny_qwen2_5_vl")
    side = math.isqrt(tokens)
    ip = vlm.processor.image_processor
    ip.size = {"shortest_edge": FACTOR * FACTOR, "longest_edge": (side * FACTOR) ** 2}
    return vlm, Image.new("RGB", (side * FACTOR, side * FACTOR), (200, 40, 40))


def llava_next_case(side: int) -> tuple[Any, Image.Image]:
    """Tiny LLaVA-NeXT with LLaVA-1.6's geometry, and a ``side`` x ``2 side / 3`` image."""
    vlm = tiny_llava_next(size=336, patch=14, pinpoints=LLAVA_16_PINPOINTS, context=8192)
    return vlm, Image.new("RGB", (side, side * 2 // 3), (200, 40, 40))


def measure(name: str, vlm: Any, image: Image.Image, repeats: int) -> dict[str, Any]:
    inputs = vlm.prepare(image, PROMPT)
    spans = inputs.image_spans[0]
    text = vlm._template(1, PROMPT)
    processor = best(lambda: vlm._process([image], [text]), repeats)
    prepare = best(lambda: vlm.prepare(image, PROMPT), repeats)
    done = vlm._process([image], [text])
    vlm._process = lambda images, texts: dict(done)  # the processor's work, done once
    layout = best(lambda: vlm.prepare(image, PROMPT), repeats)  # prepare's own work alone
    del vlm._process
    with torch.no_grad():
        forward = best(lambda: vlm.forward(inputs), repeats)
    return {
        "case": name,
        "image": list(image.size),
        "views": [f"{s.view or 'image'} {s.grid[0]}x{s.grid[1]}" for s in spans],
        "image_tokens": sum(s.end - s.start for s in spans),
        "sequence": int(inputs.input_ids.shape[1]),
        "processor_s": processor,
        "prepare_s": prepare,
        "forward_s": forward,
        "layout_s": layout,
        "layout_vs_forward": layout / forward,
        "prepare_vs_forward": prepare / forward,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--side", type=int, default=1344)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        measure("qwen2_5_vl", *qwen_case(args.tokens), args.repeats),
        measure("llava_next", *llava_next_case(args.side), args.repeats),
    ]
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        for key, value in row.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{key:>20}: {shown}")
        print()


if __name__ == "__main__":
    main()
