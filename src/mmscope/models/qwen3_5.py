"""Qwen3.5: a Qwen3-VL-style vision tower and a hybrid language model whose layers are either
gated delta-net linear attention or gated softmax attention (Qwen Team, Qwen3.5; Yang et
al. 2025, "Gated Delta Networks: improving Mamba2 with delta rule").

What differs from Qwen3-VL (``models/qwen3_vl.py``), and what the rest of mmscope sees:

- **Vision.** The same tower (16-pixel patches, a learned position grid, 2-D rotary blocks,
  the merger ``projector``; one image token per 32x32 pixels, in the processor's order) but
  *without DeepStack*: the merger's output is the only way the image enters the language model,
  so token-space methods at ``projector`` are complete here (no ``deepstack.layer`` role).
- **Hybrid language model.** ``text_config.layer_types[i]`` is ``"linear_attention"`` (the
  layer's token mixer is ``linear_attn``, a ``GatedDeltaNet``: a causal depthwise convolution
  and a gated delta-rule recurrence, no softmax, no attention probabilities, no additive mask)
  or ``"full_attention"`` (``self_attn``: softmax attention with q/k norms and an output gate,
  ``o_proj(attn * sigmoid(gate))``). The released models have three linear layers, then one
  softmax layer, repeated. Roles: ``lm.layer.attn`` (and ``.attn.heads``, ``.attn.probs``)
  resolve on softmax layers only, ``lm.layer.linear_attn`` on linear layers only; the other
  role raises ``SiteError`` naming the layer's type. ``softmax_layers("lm.layer")`` lists the
  softmax layers, ``non_softmax_layers`` the others with why: methods that read or mask
  attention probabilities (raw attention, rollout, Chefer, knockout, FastV, head importance,
  OPERA, MINER's attention scores, causal tracing's heads) run on the softmax layers, record
  the linear ones they skipped (``skipped_layers``), and warn; asked for a linear layer by
  index they raise ``NotApplicableError``. Causal tracing's ``"attn"`` preset restores the
  linear layers' ``linear_attn`` output.
- The processor is ``Qwen3VLProcessor`` (image-only here, as for Qwen3-VL) with the
  ``Qwen2VLImageProcessor`` and Qwen3.5's byte-level BPE ``Qwen3_5Tokenizer``; the model needs
  the processor's ``mm_token_type_ids`` for its interleaved M-RoPE, as Qwen3-VL. Transformers
  loads the tokenizer of every ``qwen3_5`` folder as ``Qwen3_5Tokenizer``, which rebuilds a
  byte-level BPE from the saved vocabulary; ``load_processor`` keeps a local folder's
  tokenizer as saved when its ``tokenizer.json`` is no BPE (the tiny model's word-level one),
  which that rebuild would garble.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmscope.core.errors import SiteError
from mmscope.core.registry import register
from mmscope.models.base import parse_site
from mmscope.models.qwen2_vl import _L, _V, Qwen2VLVLM
from mmscope.models.qwen3_vl import ImageOnlyQwen3VLProcessor, Qwen3VLVLM

LINEAR = "linear_attention"
#: What a linear-attention layer has instead of softmax attention (recorded by the methods).
LINEAR_REASON = "linear attention ({}, a gated delta net): no attention probabilities"


@register("qwen3_5", kind="adapter", hf_classes=("Qwen3_5ForConditionalGeneration",))
class Qwen3_5VLM(Qwen3VLVLM):
    """Adapter for ``Qwen3_5ForConditionalGeneration`` (Qwen Team, Qwen3.5)."""

    family = "qwen3_5"
    LAYER_LISTS = {"vision.layer": _V, "lm.layer": _L}
    ROLES = {
        **Qwen2VLVLM.ROLES,
        "vision.layer.mlp.act": _V + ".{i}.mlp.act_fn",
        "lm.layer.linear_attn": _L + ".{i}.linear_attn",
    }
    #: Roles that exist only on the softmax-attention layers / only on the linear ones.
    SOFTMAX_ROLES: ClassVar[tuple[str, ...]] = (
        "lm.layer.attn",
        "lm.layer.attn.heads",
        "lm.layer.attn.probs",
    )
    LINEAR_ROLES: ClassVar[tuple[str, ...]] = ("lm.layer.linear_attn",)

    @classmethod
    def load_processor(cls, source: Any, trust_remote_code: bool = False) -> Any:
        """The image-only processor, its tokenizer as saved where that is no BPE (see the
        module docstring)."""
        processor = super().load_processor(source, trust_remote_code)
        saved = Path(str(source)) / "tokenizer.json"
        if not saved.is_file() or json.loads(saved.read_text())["model"]["type"] == "BPE":
            return processor
        from transformers import PreTrainedTokenizerFast

        return ImageOnlyQwen3VLProcessor(
            image_processor=processor.image_processor,
            tokenizer=PreTrainedTokenizerFast.from_pretrained(source),
            chat_template=processor.chat_template,
        )

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Each LM layer's type: ``"linear_attention"`` or ``"full_attention"``."""
        return tuple(str(t) for t in self.model.config.text_config.layer_types)

    @property
    def deepstack_layers(self) -> tuple[int, ...]:
        """No DeepStack in Qwen3.5: the merger's output alone carries the image."""
        return ()

    def non_softmax_layers(self, stack: str) -> dict[int, str]:
        if stack != "lm.layer":
            return {}
        layers = self.model.get_submodule(_L)
        return {
            i: LINEAR_REASON.format(type(layers[i].linear_attn).__name__)
            for i, t in enumerate(self.layer_types)
            if t == LINEAR
        }

    def resolve(self, site: str) -> torch.nn.Module:
        role, index = parse_site(site)
        wants_softmax, wants_linear = role in self.SOFTMAX_ROLES, role in self.LINEAR_ROLES
        if index is not None and (wants_softmax or wants_linear):
            n = len(self.layer_types)
            if -n <= index < n:
                kind = self.layer_types[index % n]
                layer = self.model.get_submodule(f"{_L}.{index % n}")
                mixer = type(getattr(layer, "linear_attn", getattr(layer, "self_attn", None)))
                if wants_softmax and kind == LINEAR:
                    raise SiteError(
                        f"{site}: lm.layer[{index}] of {self.name} is a {kind} layer "
                        f"({mixer.__name__}, a gated delta net) with no softmax attention; "
                        f"its token mixer is lm.layer[{index}].linear_attn; the softmax "
                        f"attention layers are {self.softmax_layers('lm.layer')}"
                    )
                if wants_linear and kind != LINEAR:
                    raise SiteError(
                        f"{site}: lm.layer[{index}] of {self.name} is a {kind} layer "
                        f"({mixer.__name__}); its token mixer is lm.layer[{index}].attn"
                    )
        return super().resolve(site)
