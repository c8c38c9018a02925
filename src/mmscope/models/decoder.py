"""Shared ``prepare`` and ``generate`` for decoder-only VLMs whose processor expands one
image placeholder into a run of image tokens (LLaVA, Qwen2-VL, and their kin)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.images import ImageLike
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.models.base import VLM
from mmscope.models.hub import render_chat
from mmscope.models.spans import image_runs, prompt_positions


class DecoderVLM(VLM):
    """Base of decoder adapters. Subclasses give ``image_token_id``, ``_grids``, ``_crop``,
    ``_template``, ``_placeholder`` and ``_process``."""

    GENERATES = True

    def __init__(self, model: Any, processor: Any, name: str = "") -> None:
        super().__init__(model, processor, name)
        tok = self.tokenizer
        if getattr(tok, "padding_side", "left") != "left":
            tok.padding_side = "left"  # generation needs left padding; the adapter owns this copy

    @property
    def image_token_id(self) -> int:
        """The id of the image placeholder the processor expands (the config's
        ``image_token_id``, named ``image_token_index`` in older configs)."""
        config = self.model.config
        found = getattr(config, "image_token_id", None)
        found = getattr(config, "image_token_index", None) if found is None else found
        if found is None:
            raise NotImplementedError(f"{type(config).__name__} names no image token id")
        return int(found)

    def _grids(self, tensors: dict[str, Any], n_images: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _crop(self, image: Image.Image) -> tuple[float, float, float, float]:
        return (0.0, 0.0, float(image.width), float(image.height))

    def _template(self, n_images: int, prompt: str) -> str:
        raise NotImplementedError

    def _placeholder(self) -> str:
        raise NotImplementedError

    def _process(self, images: Sequence[Image.Image], texts: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def _images_per_prompt(
        self, images: Sequence[Image.Image], texts: list[str]
    ) -> list[list[Image.Image]]:
        """``images`` (in prompt order) as one list per text, as many as its placeholders:
        for processors that want each prompt's images in a list of their own."""
        nested, k = [], 0
        for text in texts:
            n = text.count(self._placeholder())
            nested.append(list(images[k : k + n]))
            k += n
        return nested

    def _image_runs(self, ids: torch.Tensor) -> list[tuple[int, int]]:
        """Each image's ``[start, end)`` in one item's ids: here one run of image tokens each
        (PaliGemma splits the one run its consecutive images make)."""
        return image_runs(ids, self.image_token_id)

    def _chat_text(self, n_images: int, prompt: str, fallback: str) -> str:
        """The processor's chat template with ``n_images`` images, or ``fallback``."""
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
            return render_chat(self.processor, [{"role": "user", "content": content}], self.name)
        return fallback.format(images=self._placeholder() * n_images, prompt=prompt)

    def _processed(
        self, items: list[list[Image.Image]], prompts: list[str]
    ) -> tuple[list[str], dict[str, Any]]:
        """Each item's text (its prompt in the template) and the processor's tensors of them
        all; a processor's refusal is an ``InputError``."""
        texts = [self._template(len(imgs), p) for imgs, p in zip(items, prompts)]
        try:
            tensors = self._process([im for imgs in items for im in imgs], texts)
        except (ValueError, TypeError) as err:
            raise InputError(f"the processor refused these inputs: {err}") from None
        return texts, tensors

    def prepare(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> Inputs:
        items, prompts = self._batch(images, prompt)
        texts, tensors = self._processed(items, prompts)
        flat = [im for imgs in items for im in imgs]
        grids = self._grids(tensors, len(flat)) if flat else []
        spans, all_runs = [], []
        k = 0
        for b, imgs in enumerate(items):
            runs = self._image_runs(tensors["input_ids"][b])
            if len(runs) != len(imgs):
                raise InputError(f"found {len(runs)} image-token runs for {len(imgs)} images")
            spans.append(
                [
                    ImageSpan(start, end, grids[k + j], "lm", self._crop(image))
                    for j, ((start, end), image) in enumerate(zip(runs, imgs))
                ]
            )
            all_runs.append(runs)
            k += len(imgs)
        return self._inputs(tensors, items, prompts, spans, texts, all_runs)

    def _inputs(
        self,
        tensors: dict[str, Any],
        items: list[list[Image.Image]],
        prompts: list[str],
        spans: list[list[ImageSpan]],
        texts: list[str],
        runs: list[list[tuple[int, int]]],
    ) -> Inputs:
        """``Inputs`` from the tensors and each item's image spans (views), with each prompt
        located in its item's text (``texts[b]``, each image placeholder standing for the run
        of ``runs[b]`` in the same order)."""
        located = [
            prompt_positions(
                self.tokenizer, texts[b], prompts[b], ids, self.image_token_id, runs[b]
            )
            for b, ids in enumerate(tensors["input_ids"])
        ]
        return Inputs(
            tensors=tensors,
            images=tuple(tuple(imgs) for imgs in items),
            image_spans=tuple(tuple(item) for item in spans),
            prompts=tuple(prompts),
            prompt_spans=tuple(span for span, _ in located),
            prompt_tokens=tuple(tokens for _, tokens in located),
        )

    @torch.no_grad()
    def generate(self, inputs: Inputs, max_new_tokens: int = 24, **kwargs: Any) -> list[str]:
        """Greedy (by default) continuation of each batch item, decoded without specials."""
        kwargs.setdefault("do_sample", False)
        tok = self.tokenizer
        kwargs.setdefault("pad_token_id", tok.pad_token_id)
        out = self.model.generate(
            **inputs.to(self.device).tensors, max_new_tokens=max_new_tokens, **kwargs
        )
        new = out[:, inputs.input_ids.shape[1] :]
        return [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
