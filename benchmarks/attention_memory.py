"""Peak memory of the methods that read attention probabilities, next to one plain forward and
backward, on a random LLaVA-shaped model (CPU, each measurement in its own process).

    python benchmarks/attention_memory.py [--layers 8] [--width 256] [--heads 8] [--side 24]
                                          [--json]

The model has ``--layers`` language-model layers of ``--width`` with ``--heads`` heads and
``--side`` x ``--side`` image tokens (24: LLaVA-1.5's 576). Every row is the peak resident
memory a call adds over the loaded model and its prepared inputs (``ru_maxrss``), and its ratio
to one plain forward+backward of the same inputs (SDPA attention). ``retain_all`` is what a
tool that keeps every layer's attention with its gradient does (LVLM-Interpret's way): eager
attention on every layer, each probability tensor captured in the graph, then a backward.
mmscope switches only the layers it reads to eager attention, and rollout and raw attention
keep each layer's probabilities fused over heads (one T x T per layer).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any

import torch

CASES = (
    "forward_backward",
    "retain_all",
    "raw_attention",
    "raw_attention_mean",
    "attention_rollout",
    "chefer_relevance",
    "attention_knockout",
)


def build(layers: int, width: int, heads: int, side: int) -> Any:
    """A seeded random LLaVA with the toy tokenizer, ``side`` x ``side`` image tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    from mmscope.models.llava import LlavaVLM
    from mmscope.toys import build as toys

    torch.manual_seed(0)
    tok, patch = toys.toy_tokenizer(), 4
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=side * patch, patch_size=patch, projection_dim=16,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=4 * side * side, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=toys.image_token_id(tok),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )  # fmt: skip
    config.architectures = ["LlavaForConditionalGeneration"]
    model = Llava(config).eval()
    model.set_attn_implementation("sdpa")
    return LlavaVLM(model, toys.llava_processor(side * patch, patch), "random-llava")


def run(case: str, layers: int, width: int, heads: int, side: int) -> dict[str, Any]:
    """Peak memory (MB) the case adds over the loaded model and inputs."""
    from mmscope.core.hooks import capture
    from mmscope.core.targets import Predicted
    from mmscope.methods.explain import make_method
    from mmscope.methods.inside import analyse
    from mmscope.world import render, sample_scenes

    vlm = build(layers, width, heads, side)
    image = render(sample_scenes(1, 3)[0], side * 4).image
    inputs = vlm.prepare(image, "what color is the circle ?")
    bound = Predicted().bind(vlm, inputs)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if case == "forward_backward":
        bound(vlm.model(**inputs.tensors)).sum().backward()
    elif case == "retain_all":
        sites = [f"lm.layer[{i}].attn.probs" for i in range(layers)]
        with vlm.attention("eager"), capture(vlm, sites, grads=True) as cap:
            bound(vlm.model(**inputs.tensors)).sum().backward()
            assert all(cap.grad(s) is not None for s in sites)
    elif case == "raw_attention_mean":
        make_method("raw_attention", layer="mean")(vlm, inputs)
    elif case == "attention_knockout":
        analyse("attention_knockout", vlm, inputs, None)
    else:
        make_method(case)(vlm, inputs)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "peak_mb": (after - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--side", type=int, default=24)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args()
    shape = (args.layers, args.width, args.heads, args.side)
    if args.case:
        print(json.dumps(run(args.case, *shape)))
        return
    rows = []
    for case in CASES:
        sizes = [f"--{k}={v}" for k, v in zip(("layers", "width", "heads", "side"), shape)]
        cmd = [sys.executable, __file__, "--case", case, *sizes]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]["peak_mb"] or 1.0
    for row in rows:
        row["vs_forward_backward"] = row["peak_mb"] / base
    probs_mb = args.heads * (args.side**2 + 16) ** 2 * 4 / 2**20
    summary = {"shape": dict(zip(("layers", "width", "heads", "side"), shape)),
               "one_layer_probs_mb": probs_mb, "rows": rows}  # fmt: skip
    if args.json:
        print(json.dumps(summary))
        return
    print(f"one layer's probabilities: {probs_mb:.1f} MB")
    for row in rows:
        print(f"{row['case']:>20}: {row['peak_mb']:8.1f} MB  {row['vs_forward_backward']:.2f}x")


if __name__ == "__main__":
    main()
