"""The adapter around one Hugging Face vision-language model and its processor.

Methods speak in *roles* (``lm.layer[3].mlp.act``, ``vision.layer[1].attn``, ``projector``);
each architecture family maps roles to its module paths in one small table, the way
TransformerLens adapters do, and ``resolve`` turns a site into the module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from PIL import Image

from mmscope.core.errors import InputError, NotApplicableError, SiteError
from mmscope.core.images import ImageLike, load_images
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.core.sites import parse_site, site
from mmscope.models.capabilities import Capabilities


class VLM:
    """Adapter base class. Subclasses set ``ROLES`` and implement ``prepare``.

    ``ROLES`` maps a role to a module path; ``{i}`` stands for the layer index, and a role
    whose path has ``{i}`` needs an index. ``LAYER_LISTS`` maps a role prefix (``lm.layer``)
    to the path of its ``ModuleList`` so that negative indices and ``num_layers`` work.
    """

    family: ClassVar[str] = ""
    #: True for dual encoders (CLIP): they score image-text pairs and generate nothing.
    contrastive: ClassVar[bool] = False
    ROLES: ClassVar[dict[str, str]] = {}
    LAYER_LISTS: ClassVar[dict[str, str]] = {}
    #: Roles whose module returns a tuple: index of the main tensor and of attention weights.
    ATTENTION_ROLES: ClassVar[tuple[str, ...]] = ("lm.layer.attn", "vision.layer.attn")
    #: True for models that continue a prompt with text.
    GENERATES: ClassVar[bool] = False
    #: True when the vision tower's sequence starts with a class token (CLIP-style ViTs).
    CLASS_TOKEN: ClassVar[bool] = False
    #: Where image tokens meet the text: "sequence", "cross_attention" or "none".
    IMAGES_IN: ClassVar[str] = "sequence"

    def __init__(self, model: Any, processor: Any, name: str = "") -> None:
        self.model: Any = model  # a transformers PreTrainedModel
        self.processor = processor
        self.name = name or type(model).__name__

    @classmethod
    def load_processor(cls, source: Any, trust_remote_code: bool = False) -> Any:
        """The processor saved with a model (``AutoProcessor``); adapters may override."""
        import transformers

        return transformers.AutoProcessor.from_pretrained(
            source, trust_remote_code=trust_remote_code
        )

    @property
    def capabilities(self) -> Capabilities:
        """What this model can do, from the adapter's declarations (checked by ``require``)."""
        stacks = tuple(
            r.removesuffix(".attn") for r in self.ATTENTION_ROLES if r in self.ROLES
        )
        # a stack of linear-attention layers only has no probabilities to read
        hybrid = [s for s in stacks if self.non_softmax_layers(s)]
        stacks = tuple(s for s in stacks if s not in hybrid or self.softmax_layers(s))
        return Capabilities(
            generates=self.GENERATES,
            contrastive=self.contrastive,
            images_in=self.IMAGES_IN,
            attention=stacks,
            class_token=self.CLASS_TOKEN,
        )

    # ----- roles -------------------------------------------------------------------------
    @property
    def roles(self) -> list[str]:
        """The roles this adapter resolves (probability sites ``*.attn.probs`` included)."""
        base = list(self.ROLES)
        return base + [r + ".probs" for r in self.ATTENTION_ROLES if r in self.ROLES]

    def num_layers(self, stack: str) -> int:
        """Number of layers in a stack such as ``"lm.layer"`` or ``"vision.layer"``."""
        if stack not in self.LAYER_LISTS:
            raise SiteError(
                f"{self.name} has no layer stack {stack!r}; it has {list(self.LAYER_LISTS)}"
            )
        return len(self.model.get_submodule(self.LAYER_LISTS[stack]))

    def non_softmax_layers(self, stack: str) -> dict[int, str]:
        """The layers of ``stack`` without softmax attention, each with what it has instead
        (none here). Hybrid models override (Qwen3.5's gated delta-net layers give no
        attention probabilities and take no attention mask)."""
        return {}

    def softmax_layers(self, stack: str) -> list[int]:
        """The layers of ``stack`` whose ``.attn`` is softmax attention (probabilities to read,
        an additive mask to block pairs): every layer, unless ``non_softmax_layers`` says
        otherwise. Methods that read or mask attention run over these and record the others
        (``capabilities.softmax_only``)."""
        other = self.non_softmax_layers(stack)
        return [i for i in range(self.num_layers(stack)) if i not in other]

    def num_heads(self, stack: str) -> int:
        """Attention heads per (softmax-attention) layer of a stack such as ``"lm.layer"``."""
        attn = self.resolve(site(stack, (self.softmax_layers(stack) or [0])[0], "attn"))
        heads = getattr(attn, "num_heads", None) or getattr(
            getattr(attn, "config", None), "num_attention_heads", None
        )
        if not heads:
            raise SiteError(f"cannot tell how many heads {stack} of {self.name} has")
        return int(heads)

    def _heads_projection(self, stack: str) -> tuple[str, torch.nn.Module]:
        """The ``.attn.heads`` site of the first softmax-attention layer of ``stack`` and its
        module (the attention's output projection: heads side by side in, residual out)."""
        at = site(stack, (self.softmax_layers(stack) or [0])[0], "attn.heads")
        return at, self.resolve(at)

    def head_dim(self, stack: str) -> int:
        """Width of one head's output in a (softmax-attention) layer of ``stack``: the input of
        the output projection (``.attn.heads``) shared evenly among ``num_heads`` heads."""
        at, proj = self._heads_projection(stack)
        width = getattr(proj, "in_features", None)
        if not width:
            raise SiteError(f"cannot tell the width of {at} of {self.name}")
        return int(width) // self.num_heads(stack)

    def hidden_size(self, stack: str) -> int:
        """Width of the residual stream of ``stack``: the output of its attention's output
        projection (``.attn.heads``)."""
        at, proj = self._heads_projection(stack)
        width = getattr(proj, "out_features", None)
        if not width:
            raise SiteError(f"cannot tell the output width of {at} of {self.name}")
        return int(width)

    def mlp_size(self, stack: str) -> int:
        """Width of the MLP inside a layer of ``stack`` (its ``intermediate_size``): from the
        vision config for ``vision.*`` stacks, else from the text config (or the config)."""
        config = self.model.config
        part = "vision_config" if stack.startswith("vision.") else "text_config"
        size = getattr(getattr(config, part, None) or config, "intermediate_size", None)
        if stack not in self.LAYER_LISTS or not size:
            raise SiteError(f"cannot tell the MLP width of {stack} of {self.name}")
        return int(size)

    def resolve(self, site: str) -> torch.nn.Module:
        """The module at a site such as ``"lm.layer[-1].mlp"`` or ``"projector"``."""
        role, index = parse_site(site)
        if role.endswith(".probs"):
            role = role[: -len(".probs")]
        if role not in self.ROLES:
            raise SiteError(
                f"{self.name} has no role {role!r}; roles: {', '.join(sorted(self.roles))}"
            )
        path = self.ROLES[role]
        if "{i}" in path:
            if index is None:
                raise SiteError(
                    f"site {site!r} needs a layer index, e.g. {role.split('.')[0]}.layer[0]"
                )
            stack = next(s for s in self.LAYER_LISTS if role.startswith(s))
            n = self.num_layers(stack)
            if not -n <= index < n:
                raise SiteError(f"layer {index} is out of range for {stack} with {n} layers")
            path = path.format(i=index % n)
        elif index is not None:
            raise SiteError(f"role {role!r} takes no index")
        return self.model.get_submodule(path)

    # ----- running -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def final_logit_softcap(self) -> float | None:
        """``c`` when the model soft-caps its logits after ``lm_head`` to ``c * tanh(logits /
        c)`` (Gemma 2, as in PaliGemma 2), else None; readouts such as the logit lens apply it."""
        return None

    @property
    def vocab_size(self) -> int:
        """How many logits ``lm_head`` gives (its output rows; may exceed the tokenizer's)."""
        weight = self.resolve("lm_head").weight
        assert isinstance(weight, torch.Tensor), f"{self.name}'s lm_head has no weight"
        return int(weight.shape[0])

    @property
    def logit_scale(self) -> torch.Tensor:
        """The factor a dual encoder multiplies its image-text cosine similarities by (``exp``
        of its learned log-scale), a one-element float32 tensor; ``NotApplicableError`` for
        other models."""
        scale = getattr(self.model, "logit_scale", None) if self.contrastive else None
        if not isinstance(scale, torch.Tensor):
            raise NotApplicableError(f"{self.name} scores no image-text pairs: no logit scale")
        return scale.exp().float()

    def prepare(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> Inputs:
        """Tensors and spans for ``images`` and ``prompt`` (a list of prompts makes a batch)."""
        raise NotImplementedError

    def forward(self, inputs: Inputs, **kwargs: Any) -> Any:
        """One forward pass of the wrapped model on prepared inputs."""
        return self.model(**inputs.to(self.device).tensors, **kwargs)

    def image_features(self, pixel_values: torch.Tensor) -> Any:
        """A dual encoder's image embeddings of ``pixel_values`` from its vision tower and
        projection alone, no text (what a hook on the vision tower reads in one forward)."""
        return self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))

    @contextmanager
    def attention(self, implementation: str = "eager") -> Iterator[None]:
        """Switch the attention implementation (eager gives probabilities) and switch back."""
        before = self.model.config._attn_implementation
        if before == implementation:
            yield
            return
        self.model.set_attn_implementation(implementation)
        try:
            yield
        finally:
            self.model.set_attn_implementation(before)

    # ----- what attribution methods reach: image patches, image tokens, prompt tokens -----
    #: Site whose output holds every image token as the model's next stage sees it.
    IMAGE_TOKENS_SITE: ClassVar[str] = "projector"
    #: Site whose output holds the prompt's token embeddings (positions: ``prompt_spans``).
    TEXT_EMBED_SITE: ClassVar[str] = "lm.embed"
    #: Default layer for class activation maps: the vision tower's last block.
    CAM_SITE: ClassVar[str] = "vision.layer[-1]"

    @staticmethod
    def flat_spans(inputs: Inputs) -> list[ImageSpan]:
        """Every image's span, in item order then image order (the order of the pixels)."""
        return [span for item in inputs.image_spans for span in item]

    def pixel_grid(self, values: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        """Sum a tensor shaped like ``pixel_values`` over channels and each patch: one
        ``(rows, cols)`` map per image on its span's grid. Here ``(images, C, H, W)``."""
        per_pixel = values.sum(1)
        out = []
        for image, span in zip(per_pixel, self.flat_spans(inputs)):
            rows, cols = span.grid
            h, w = image.shape[0] // rows, image.shape[1] // cols
            out.append(image[: rows * h, : cols * w].reshape(rows, h, cols, w).sum((1, 3)))
        return out

    def pixel_rows(self, inputs: Inputs) -> list[int]:
        """How many leading rows of ``pixel_values`` each image has (one each here)."""
        return [1] * len(self.flat_spans(inputs))

    @property
    def pixel_range(self) -> float:
        """Range of a normalised pixel value: 1 / std of the processor (mean over channels)."""
        std = getattr(getattr(self.processor, "image_processor", None), "image_std", None)
        return float(len(std) / sum(std)) if std else 2.0

    def pixel_values_of(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``pixel_values`` of other images (a baseline), laid out as ``prepare`` lays them."""
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"].to(self.device, self.dtype)

    def mask_pixels(
        self,
        values: torch.Tensor,
        inputs: Inputs,
        keep: torch.Tensor,
        fill: float | torch.Tensor = 0.0,
    ) -> torch.Tensor:
        """``pixel_values`` with each grid cell blended to ``fill`` by ``1 - keep``.

        ``keep``: ``(images, rows, cols)`` in [0, 1], one grid per image (all images of a
        batch share a grid here). ``fill`` 0 is the processor's mean colour.
        """
        rows, cols = keep.shape[-2:]
        h, w = values.shape[-2] // rows, values.shape[-1] // cols
        up = keep.to(values).repeat_interleave(h, 1).repeat_interleave(w, 2).unsqueeze(1)
        return values * up + (1 - up) * fill

    def image_tokens(self, value: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        """``IMAGE_TOKENS_SITE``'s output for ``inputs`` as ``(all image tokens, dim)``, in span
        order (item by item, each span's cells in raster order)."""
        return value.reshape(-1, value.shape[-1])

    def with_image_tokens(
        self, value: torch.Tensor, tokens: torch.Tensor, inputs: Inputs
    ) -> torch.Tensor:
        """Inverse of ``image_tokens``: ``value`` with its image tokens replaced."""
        return tokens.reshape(value.shape)

    def vision_grid(self, value: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        """A vision-tower layer's output as one ``(rows, cols, dim)`` grid per image.

        CLIP-style towers: position 0 is the class token, the patches follow in raster order.
        """
        out = []
        for tokens, span in zip(value, self.flat_spans(inputs)):
            rows, cols = span.grid
            out.append(tokens[-rows * cols :].reshape(rows, cols, -1))
        return out

    def vision_rows(self, inputs: Inputs, item: int, length: int) -> list[tuple[int, str, int]]:
        """``(position, group, cell)`` of the tokens of item ``item``'s first image in a
        vision layer's sequence of ``length``: ``"class"`` rows (cell -1) and ``"image"`` rows
        (cell: raster index in the span's grid). Here the patches, after a class token where
        the tower has one; tiling adapters override (Mllama)."""
        rows, cols = inputs.image_spans[item][0].grid
        first = length - rows * cols
        if first not in (0, 1):
            raise NotApplicableError(
                f"{self.name}'s vision sequence ({length}) does not match its {rows}x{cols} grid"
            )
        patches = [(first + j, "image", j) for j in range(rows * cols)]
        return [(0, "class", -1)] * first + patches

    # ----- where a dual encoder reads its towers' embeddings ------------------------------
    def vision_pooling(self, inputs: Inputs) -> torch.Tensor:
        """``(images, vision positions)``: the weight of each position of the vision tower's
        last layer in the image embedding; here one-hot at the class token (CLIP). Adapters
        that pool otherwise (SigLIP's attention probe) override."""
        if not self.CLASS_TOKEN:
            raise NotApplicableError(
                f"{self.name}'s vision tower has no class token and no other pooling declared"
            )
        spans = self.flat_spans(inputs)
        out = torch.zeros(len(spans), max(span.end for span in spans))
        out[:, 0] = 1.0
        return out

    def text_pooling(self, inputs: Inputs) -> list[int]:
        """Per text, the position its tower's embedding is read at: here the last attended
        one (CLIP's end-of-text token; texts padded on the right)."""
        mask = inputs.attention_mask
        return [int(t) for t in mask.shape[1] - 1 - mask.flip(-1).argmax(-1)]

    # ----- helpers for subclasses --------------------------------------------------------
    def _batch(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> tuple[list[list[Image.Image]], list[str]]:
        """Normalise (images, prompt) into per-item image lists and prompts, checking them
        (a prompt longer than the model's context is refused before any image is read)."""
        from mmscope.core.context import check_prompts

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("no prompt given")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise InputError("the prompt is empty; say what to ask about the image")
        check_prompts(self, prompts)
        if images is None:
            return [[] for _ in prompts], prompts
        if len(prompts) == 1:
            items = [images] if not isinstance(images, (list, tuple)) else [list(images)]
        else:
            if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
                raise InputError(f"{len(prompts)} prompts need a list of {len(prompts)} images")
            items = list(images)
        return [load_images(item) for item in items], prompts  # type: ignore[arg-type]
