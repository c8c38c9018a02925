"""The adapter around one Hugging Face vision-language model and its processor.

Methods speak in *roles* (``lm.layer[3].mlp.act``, ``vision.layer[1].attn``, ``projector``);
each architecture family maps roles to its module paths in one small table, the way
TransformerLens adapters do, and ``resolve`` turns a site into the module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from PIL import Image

from mmscope.core.errors import InputError, SiteError
from mmscope.core.images import ImageLike, load_images
from mmscope.core.inputs import Inputs

_SITE = re.compile(r"\[(-?\d+)\]")


def parse_site(site: str) -> tuple[str, int | None]:
    """Split ``"lm.layer[3].mlp.act"`` into the role ``"lm.layer.mlp.act"`` and index 3."""
    indices = _SITE.findall(site)
    if len(indices) > 1:
        raise SiteError(f"site {site!r} has more than one index")
    role = _SITE.sub("", site)
    return role, (int(indices[0]) if indices else None)


class VLM:
    """Adapter base class. Subclasses set ``ROLES`` and implement ``prepare``.

    ``ROLES`` maps a role to a module path; ``{i}`` stands for the layer index, and a role
    whose path has ``{i}`` needs an index. ``LAYER_LISTS`` maps a role prefix (``lm.layer``)
    to the path of its ``ModuleList`` so that negative indices and ``num_layers`` work.
    """

    family: ClassVar[str] = ""
    ROLES: ClassVar[dict[str, str]] = {}
    LAYER_LISTS: ClassVar[dict[str, str]] = {}
    #: Roles whose module returns a tuple: index of the main tensor and of attention weights.
    ATTENTION_ROLES: ClassVar[tuple[str, ...]] = ("lm.layer.attn", "vision.layer.attn")

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

    def prepare(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> Inputs:
        """Tensors and spans for ``images`` and ``prompt`` (a list of prompts makes a batch)."""
        raise NotImplementedError

    def forward(self, inputs: Inputs, **kwargs: Any) -> Any:
        """One forward pass of the wrapped model on prepared inputs."""
        return self.model(**inputs.to(self.device).tensors, **kwargs)

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

    # ----- helpers for subclasses --------------------------------------------------------
    @staticmethod
    def _batch(
        images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> tuple[list[list[Image.Image]], list[str]]:
        """Normalise (images, prompt) into per-item image lists and prompts, checking them."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("no prompt given")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise InputError("the prompt is empty; say what to ask about the image")
        if images is None:
            return [[] for _ in prompts], prompts
        if len(prompts) == 1:
            items = [images] if not isinstance(images, (list, tuple)) else [list(images)]
        else:
            if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
                raise InputError(f"{len(prompts)} prompts need a list of {len(prompts)} images")
            items = list(images)
        return [load_images(item) for item in items], prompts  # type: ignore[arg-type]
