"""Per-token explanations of a generated caption: one teacher-forced pass with batched
backwards (mmscope's ``Generated``) against one run per token (what per-target tools do:
Captum's LLM attribution explains one target token per pass).

    python benchmarks/attribution.py [--json] [--model toy-llava] [--repeats 3]

Prints the seconds of each way and their ratio per method; the maps of both ways are checked
to agree first, so the speed-up is not bought with a different answer.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

import mmscope
from mmscope.core.targets import Generated, TokenId
from mmscope.methods.explain import make_method
from mmscope.world import DESCRIBE_PROMPT, render, sample_scenes

METHODS = {"saliency": {}, "integrated_gradients": {"steps": 16}, "grad_cam": {}}


def per_token(vlm, inputs, method, bound):  # type: ignore[no-untyped-def]
    """One explanation per generated token, each on its own teacher-forced prefix."""
    start = inputs.input_ids.shape[1]
    maps = []
    for j in range(len(bound.labels[0])):
        prefix = replace(
            inputs,
            tensors={
                **inputs.tensors,
                "input_ids": bound.inputs.input_ids[:, : start + j],
                "attention_mask": bound.inputs.attention_mask[:, : start + j],
            },
        )
        token = int(bound.inputs.input_ids[0, start + j])
        maps.append(method(vlm, prefix, TokenId(token)).image_map())
    return np.stack(maps)


def best_of(repeats: int, fn):  # type: ignore[no-untyped-def]
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy-llava")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    vlm = mmscope.load(args.model)
    scene = sample_scenes(1, 31)[0]
    inputs = vlm.prepare(render(scene).image, DESCRIBE_PROMPT)
    bound = Generated().bind(vlm, inputs)
    rows = {}
    for key, settings in METHODS.items():
        method = make_method(key, **settings)
        batched_s, exp = best_of(args.repeats, lambda m=method: m(vlm, inputs, Generated()))
        loop_s, loop = best_of(args.repeats, lambda m=method: per_token(vlm, inputs, m, bound))
        np.testing.assert_allclose(exp.image_scores[0][0], loop, rtol=2e-3, atol=1e-6)
        rows[key] = {
            "tokens": len(bound.labels[0]),
            "batched_s": round(batched_s, 4),
            "per_token_s": round(loop_s, 4),
            "speedup": round(loop_s / batched_s, 2),
        }
    if args.json:
        print(json.dumps({"model": args.model, "methods": rows}))
    else:
        for key, row in rows.items():
            print(f"{key:<22} {row}")


if __name__ == "__main__":
    main()
