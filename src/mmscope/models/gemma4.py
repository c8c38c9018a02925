"""Gemma 4 (Google 2026): a vision encoder over variable-resolution patches with 2-D rotary
positions, a pooler that averages ``k x k`` patches into one soft token, a projection into the
language model (``embed_vision``) and a Gemma 4 language model with sliding-window and global
attention layers, optionally a mixture-of-experts block beside each dense MLP, per-layer
embeddings (PLE, the small models) and soft-capped logits. The audio tower is not supported.

Differences from Gemma 3 (whose adapter this one extends) that the rest of mmscope sees:

- Variable resolution (``Gemma4ImageProcessorPil``): each image is scaled, keeping its aspect
  ratio, to fill a budget of ``max_soft_tokens * k * k`` patches (small images are scaled
  *up*), each side rounded down to a multiple of ``patch * k`` pixels, and nothing is cropped:
  ``crop`` is the whole image. It becomes ``(H / (patch * k)) x (W / (patch
  * k))`` soft tokens, the span's grid, in row-major order (``Gemma4VisionPooler`` numbers the
  pooled cell of patch ``(x, y)`` as ``x // k + (W / patch / k) * (y // k)``).
- ``pixel_values`` is not ``(B, C, H, W)`` but each image's patches in raster order,
  ``(images, max_patches, patch * patch * 3)`` with the pixels of a patch in (row, column,
  channel) order, zero-padded to ``max_patches``; ``image_position_ids`` ``(images,
  max_patches, 2)`` holds each patch's ``(x, y)``, ``(-1, -1)`` on padding. ``pixel_grid``,
  ``mask_pixels`` and ``vision_grid`` read this layout; padding patches are never masked and
  the model ignores them. With the processor's defaults pixels are in [0, 1] (no
  normalisation; the patch embedder maps them to [-1, 1]): pixel value 0, the processor's
  declared mean, is black.
- Vision activations are ``(images, max_patches, dim)`` (padding included, at the end); the
  projector's output ``(soft tokens of all images, hidden)`` has no batch axis, rows in span
  order. ``vision_grid`` gives the patch grid, ``k`` times finer than the span grid.
- Attention, where the config sets ``use_bidirectional_attention="vision"``: in the
  *sliding-window* layers the soft tokens of one image attend to each other both ways (and,
  like every token there, to at most ``sliding_window`` positions back); in the *global*
  layers every token, image tokens included, attends causally. ``mm_token_type_ids`` (1 on the
  soft tokens, not on ``<|image>``/``<image|>``) marks them; appended tokens are text (0).
  Without it (``None``, as in the smaller checkpoints) attention is causal everywhere.
- Mixture of experts (``enable_moe_block``): every layer runs its dense MLP *and* a router
  (``lm.layer.mlp.router``, read on the residual stream before the feed-forward norm; its
  output is the router's probabilities over experts) and experts (``lm.layer.mlp.experts``),
  whose outputs are flattened to ``(batch * sequence, ...)``. The layer adds the normed dense
  and expert outputs. ``lm.layer.mlp`` and ``lm.layer.mlp.act`` are the dense MLP's, which
  every token passes through: neuron methods read its neurons, the dense half of the layer's
  feed-forward. Dense checkpoints have no router or experts roles.
- Per-layer embeddings (``hidden_size_per_layer_input``, the small models): besides
  ``lm.embed`` each layer adds a lookup of the token id, ``lm.embed.per_layer`` (image
  positions look up the pad token), mixed with a projection of ``lm.embed``'s output.
  Perturbing the prompt at ``lm.embed`` (``TEXT_EMBED_SITE``) leaves that lookup as it is.
- The logits are soft-capped after ``lm_head`` when the config sets
  ``final_logit_softcapping`` (``final_logit_softcap``); the logit lens applies the same cap.
- The processor needs a feature extractor (audio) and a video processor (torchvision):
  ``ImageOnlyGemma4Processor`` leaves both out. Audio input is refused with
  ``NotApplicableError``.
- CAMs read ``vision.layer[-2]``: the projector RMS-normalises each pooled token without a
  scale, so (without ``standardize``) sum(grad * act) over a pooled cell's patches of the last
  block vanishes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import ProcessorMixin
from transformers.models.gemma4 import Gemma4Processor

from mmscope.core.errors import InputError, NotApplicableError, SiteError
from mmscope.core.images import ImageLike
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.models.base import parse_site
from mmscope.models.decoder import DecoderVLM
from mmscope.models.gemma3 import Gemma3VLM
from mmscope.models.roles import decoder_lm_roles, layer_lists, stack_roles

FALLBACK = "<|turn>user\n{images}{prompt}<turn|>\n<|turn>model\n"
_V = "model.vision_tower.encoder.layers"
_L = "model.language_model.layers"
#: A Gemma 4 vision layer: its output projection wraps a clippable ``linear``.
GEMMA4_VISION_LAYER = {"attn": "self_attn", "heads": "self_attn.o_proj.linear", "act": "mlp.act_fn"}
#: Roles only some checkpoints have, with the text-config field that switches them on.
OPTIONAL_ROLES = {
    "lm.layer.mlp.router": "enable_moe_block",
    "lm.layer.mlp.experts": "enable_moe_block",
    "lm.embed.per_layer": "hidden_size_per_layer_input",
}


class _ImageAndTextParts(ProcessorMixin):
    """Where ``Gemma4Processor.__init__`` hands its parts on: the feature extractor and the
    video processor are dropped, the image processor and tokenizer kept."""

    def __init__(
        self,
        feature_extractor: Any = None,
        image_processor: Any = None,
        tokenizer: Any = None,
        video_processor: Any = None,
        **kw: Any,
    ) -> None:
        ProcessorMixin.__init__(self, image_processor, tokenizer, **kw)


class ImageOnlyGemma4Processor(Gemma4Processor, _ImageAndTextParts):
    """``Gemma4Processor`` without its audio feature extractor and video processor (the video
    processor needs torchvision, and the processor's type check refuses ``None`` for it).

    A processor's parts are the parameters of its ``__init__``: here the image processor and
    the tokenizer, which ``from_pretrained`` loads from a saved folder. Everything else (the
    image, audio and video token attributes) is ``Gemma4Processor``'s own ``__init__``. It
    saves itself as a plain ``Gemma4Processor``.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: Any = None,
        **kw: Any,
    ) -> None:
        super().__init__(None, image_processor, tokenizer, None, chat_template=chat_template, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "processor_class": "Gemma4Processor"}


@register("gemma4", kind="adapter", hf_classes=("Gemma4ForConditionalGeneration",))
class Gemma4VLM(Gemma3VLM):
    """Adapter for ``Gemma4ForConditionalGeneration`` (Google 2026, Gemma 4), images only."""

    family = "gemma4"
    ROLES = {
        "vision.embed": "model.vision_tower.patch_embedder",
        **stack_roles("vision.layer", _V, GEMMA4_VISION_LAYER),
        "projector": "model.embed_vision",
        **decoder_lm_roles(),
        "lm.embed.per_layer": "model.language_model.embed_tokens_per_layer",
        "lm.layer.mlp.router": _L + ".{i}.router",
        "lm.layer.mlp.experts": _L + ".{i}.experts",
    }
    LAYER_LISTS = layer_lists(ROLES)

    @classmethod
    def load_processor(cls, source: Any, trust_remote_code: bool = False) -> Any:
        """The image-only processor: the stock one needs torchvision for its video part."""
        return ImageOnlyGemma4Processor.from_pretrained(source)

    # ----- roles -------------------------------------------------------------------------
    def _has(self, role: str) -> bool:
        field = OPTIONAL_ROLES.get(role)
        return field is None or bool(getattr(self.model.config.get_text_config(), field, None))

    @property
    def moe(self) -> bool:
        """True when the language model's layers have a mixture-of-experts block."""
        return self._has("lm.layer.mlp.router")

    @property
    def roles(self) -> list[str]:
        return [r for r in super().roles if self._has(r)]

    def resolve(self, site: str) -> torch.nn.Module:
        role = parse_site(site)[0]
        if not self._has(role):
            raise SiteError(
                f"{self.name} has no {role!r}: its text config's {OPTIONAL_ROLES[role]} is off"
            )
        return super().resolve(site)

    # ----- the model's settings ----------------------------------------------------------
    @property
    def pooling(self) -> int:
        """``k``: each soft token is the mean of ``k x k`` patches."""
        return int(self.model.config.vision_config.pooling_kernel_size)

    @property
    def tokens_per_image(self) -> int:
        """The most soft tokens an image can become; each image's own count is its span's."""
        return int(getattr(self.processor.image_processor, "max_soft_tokens", 0))

    @property
    def tokens_per_side(self) -> int:
        raise NotApplicableError("Gemma 4 grids vary with each image's shape: read span.grid")

    @property
    def patches_per_side(self) -> int:
        raise NotApplicableError("Gemma 4 grids vary with each image's shape: read span.grid")

    @property
    def final_logit_softcap(self) -> float | None:
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        return float(cap) if cap else None

    # ----- prepare -----------------------------------------------------------------------
    def prepare(
        self,
        images: ImageLike | Sequence[ImageLike] | None,
        prompt: str | Sequence[str],
        audio: Any = None,
    ) -> Inputs:
        """As every decoder's; ``audio`` (or an audio placeholder in a prompt) is refused."""
        audio_token = getattr(self.processor, "audio_token", None)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if audio is not None or (audio_token and any(audio_token in p for p in prompts)):
            raise NotApplicableError(
                f"{self.name}: mmscope supports Gemma 4's images, not its audio tower"
            )
        return super().prepare(images, prompt)

    def _image_runs(self, ids: torch.Tensor) -> list[tuple[int, int]]:
        # <|image> and <image|> separate consecutive images: one run of soft tokens each
        return DecoderVLM._image_runs(self, ids)

    def _grids(self, tensors: dict[str, Any], n_images: int) -> list[tuple[int, int]]:
        positions = tensors["image_position_ids"]
        if len(positions) != n_images:
            raise InputError(f"the processor made {len(positions)} patch grids for {n_images}")
        k, grids = self.pooling, []
        for pos in positions:
            real = pos[(pos >= 0).all(-1)]
            cols, rows = (int(v) + 1 for v in real.max(0).values)
            grids.append((rows // k, cols // k))
        return grids

    def _placeholder(self) -> str:
        return str(self.processor.image_token)

    def _one_image(self) -> str:
        """An image's text with one soft token: tokenised, one image token per image."""
        p = self.processor
        return f"{p.boi_token}{p.image_token}{p.eoi_token}"

    def _chat_text(self, n_images: int, prompt: str, fallback: str = FALLBACK) -> str:
        return super()._chat_text(n_images, prompt, FALLBACK)

    def _process(self, images: Sequence[Image.Image], texts: list[str]) -> dict[str, Any]:
        plain = [t.replace(self._one_image(), self._placeholder()) for t in texts]
        nested = self._images_per_prompt(images, plain)
        out = self.processor(
            images=nested if images else None, text=plain, return_tensors="pt", padding=True
        )
        return dict(out)

    # ----- the patch layout --------------------------------------------------------------
    def _patch_grid(self, span_grid: tuple[int, int]) -> tuple[int, int]:
        rows, cols = span_grid
        return rows * self.pooling, cols * self.pooling

    def pixel_grid(self, values: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        k, out = self.pooling, []
        for image, span in zip(values, self.flat_spans(inputs)):
            (rows, cols), (h, w) = span.grid, self._patch_grid(span.grid)
            per_patch = image[: h * w].sum(-1).reshape(rows, k, cols, k)
            out.append(per_patch.sum((1, 3)))
        return out

    def mask_pixels(
        self,
        values: torch.Tensor,
        inputs: Inputs,
        keep: torch.Tensor,
        fill: float | torch.Tensor = 0.0,
    ) -> torch.Tensor:
        """``keep[i]`` ``(rows, cols)`` on image ``i``'s span grid (a list where grids differ)
        blends each cell's ``k x k`` patches to ``fill``; padding patches are kept."""
        k, per_image = self.pooling, []
        for i, span in enumerate(self.flat_spans(inputs)):
            if tuple(keep[i].shape) != span.grid:
                raise InputError(f"image {i} needs a {span.grid} keep grid, not {keep[i].shape}")
            cells = keep[i].to(values).repeat_interleave(k, 0).repeat_interleave(k, 1)
            cells = cells.reshape(-1)
            pad = cells.new_ones(values.shape[1] - cells.numel())
            per_image.append(torch.cat([cells, pad]))
        up = torch.stack(per_image).unsqueeze(-1)
        return values * up + (1 - up) * fill

    def vision_grid(self, value: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        """The tower's patch grid of each image (``k`` times finer than the span grid)."""
        out = []
        for tokens, span in zip(value, self.flat_spans(inputs)):
            h, w = self._patch_grid(span.grid)
            out.append(tokens[: h * w].reshape(h, w, -1))
        return out
