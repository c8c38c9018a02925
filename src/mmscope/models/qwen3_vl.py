"""Qwen3-VL: a Qwen2-VL-style tower with learned positions and DeepStack injection into a Qwen3
language model (Bai et al. 2025, Qwen3-VL Technical Report; Meng et al. 2024, DeepStack).

What differs from Qwen2-VL (``models/qwen2_vl.py``), and what the rest of mmscope sees:

- The tower adds a learned position table (``pos_embed``, a square grid bilinearly resampled
  to each image's patch grid) to ``patch_embed``'s output, then the 2-D rotary blocks
  (LayerNorm, GELU MLP ``linear_fc1``/``linear_fc2``). There is no window permutation: every
  vision site is in the processor's order, as in Qwen2-VL. Patch 16, merge 2: one image token
  per 32x32 pixels.
- **DeepStack.** The outputs of the vision blocks ``deepstack_visual_indexes`` (``[8, 16,
  24]`` in the released models) go through extra patch mergers, the roles
  ``deepstack.layer[i]`` (``model.visual.deepstack_merger_list[i]``; the index is the
  DeepStack level, not a vision layer). Level ``i``'s output, ``(all image tokens, hidden)``
  in span order like ``projector``'s, is *added* to the LM hidden states at the image
  positions right after decoder layer ``i``: outside every module, so the output read at
  ``lm.layer[i]`` (``i`` < number of levels) is the state *before* that addition and
  ``lm.layer[i + 1]`` reads the state after it.
- **What image-token methods reach.** ``IMAGE_TOKENS_SITE`` is the main merger
  (``projector``), whose output is the LM's input at the image positions. The DeepStack
  copies of the same tokens bypass it. Methods that act on image tokens at that site (token
  space gradients, integrated gradients and their baselines, token ablation, image-token
  noise in causal tracing and patching) therefore act on the input path only: a token-space
  gradient leaves out d score / d ``deepstack.layer[i]`` times its value (token-space
  integrated gradients sum to the change of the score when only the input-path tokens move
  to the baseline, the DeepStack features staying clean), and ablating or noising an image
  token leaves its DeepStack features in place (a removal effect is underestimated). Methods
  in pixel space (the gradient methods' default, occlusion and the other perturbations, CAMs
  on the vision tower) are complete: the pixels feed both paths. To read or patch the
  DeepStack path, use the ``deepstack.layer[i]`` sites.
- The LM is Qwen3 (RMS-normalised queries and keys per head, ``q_norm``/``k_norm``) with
  interleaved M-RoPE; the processor returns ``mm_token_type_ids`` as Qwen2-VL's does.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen3VLProcessor

from mmscope.core.registry import register
from mmscope.models.qwen2_vl import _L, _V, ImageOnlyProcessor, Qwen2VLVLM

_D = "model.visual.deepstack_merger_list"


class ImageOnlyQwen3VLProcessor(ImageOnlyProcessor, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without its video processor (see ``ImageOnlyProcessor``)."""


@register("qwen3_vl", kind="adapter", hf_classes=("Qwen3VLForConditionalGeneration",))
class Qwen3VLVLM(Qwen2VLVLM):
    """Adapter for ``Qwen3VLForConditionalGeneration`` (Bai et al. 2025, Qwen3-VL)."""

    family = "qwen3_vl"
    LAYER_LISTS = {"vision.layer": _V, "lm.layer": _L, "deepstack.layer": _D}
    ROLES = {
        **Qwen2VLVLM.ROLES,
        "vision.layer.mlp.act": _V + ".{i}.mlp.act_fn",
        "deepstack.layer": _D + ".{i}",
    }

    @classmethod
    def load_processor(cls, source: Any, trust_remote_code: bool = False) -> Any:
        """The image-only processor: the stock one needs torchvision for its video half."""
        return ImageOnlyQwen3VLProcessor.from_pretrained(source)

    @property
    def deepstack_layers(self) -> tuple[int, ...]:
        """The vision layer that each DeepStack level reads (``deepstack.layer[i]`` reads
        ``vision.layer[deepstack_layers[i]]`` and is added after ``lm.layer[i]``)."""
        return tuple(int(i) for i in self.model.config.vision_config.deepstack_visual_indexes)
