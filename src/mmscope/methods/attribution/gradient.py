"""Gradient attributions: saliency, input x gradient, integrated gradients, SmoothGrad."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from mmscope.core.errors import InputError
from mmscope.core.hooks import capture, patch
from mmscope.core.inputs import Inputs
from mmscope.core.registry import REGISTRY, register
from mmscope.core.targets import BoundTarget
from mmscope.methods.attribution.base import Attribution, Maps
from mmscope.methods.attribution.gradients import (
    check_space,
    gradients,
    to_maps,
)

if TYPE_CHECKING:
    from mmscope.models.base import VLM

LEVEL = "model/architecture"


@register("saliency", family="attribution/gradient", paper="Simonyan et al. 2014", level=LEVEL)
class Saliency(Attribution):
    """Absolute gradient of the target, summed over each patch and each word vector."""

    def __init__(self, space: str = "pixels") -> None:
        self.space = check_space(space)

    def attribute(self, vlm: VLM, bound: BoundTarget) -> Maps:
        g = gradients(vlm, bound, space=self.space)
        image, text = to_maps(vlm, bound.inputs, self.space, g.image_grad.abs(), g.text_grad.abs())
        return Maps(image, text)


@register(
    "input_x_gradient", family="attribution/gradient", paper="Shrikumar et al. 2016", level=LEVEL
)
class InputXGradient(Attribution):
    """Input times gradient, summed over each patch and each word vector."""

    def __init__(self, space: str = "pixels") -> None:
        self.space = check_space(space)

    def attribute(self, vlm: VLM, bound: BoundTarget) -> Maps:
        g = gradients(vlm, bound, space=self.space)
        image, text = to_maps(
            vlm, bound.inputs, self.space, g.image * g.image_grad, g.text * g.text_grad
        )
        return Maps(image, text)


PIXEL_BASELINES = ("black", "blur", "mean")
TOKEN_BASELINES = ("zero", "mean", "black", "blur")


@register(
    "integrated_gradients",
    family="attribution/gradient",
    paper="Sundararajan et al. 2017",
    level=LEVEL,
)
class IntegratedGradients(Attribution):
    """attr = (x - x') * mean_k grad f(x' + a_k (x - x')), image and prompt words together.

    The prompt's word vectors go to zero at the baseline; the image goes to ``baseline``:
    pixels ``black``, ``blur`` or ``mean`` (the processor's mean colour), or tokens ``zero``,
    ``mean`` (the image's mean token), ``black``/``blur`` (the tokens of that image) or a
    ``(dim,)`` tensor such as a dataset-mean visual embedding (Neo et al. 2024). The steps are
    Gauss-Legendre nodes (captum's default) run ``batch_steps`` at a time.
    ``extras["completeness_gap"]``: sum of attributions minus f(x) - f(x'), per item and output.
    """

    def __init__(
        self,
        steps: int = 32,
        baseline: str | torch.Tensor = "black",
        space: str = "pixels",
        batch_steps: int = 16,
    ) -> None:
        self.space = check_space(space)
        allowed = PIXEL_BASELINES if space == "pixels" else TOKEN_BASELINES
        if isinstance(baseline, str) and baseline not in allowed:
            raise InputError(f"{space} baselines are {', '.join(allowed)}, not {baseline!r}")
        if steps < 1 or batch_steps < 1:
            raise InputError("steps and batch_steps must be at least 1")
        self.steps, self.baseline, self.batch_steps = int(steps), baseline, int(batch_steps)

    def attribute(self, vlm: VLM, bound: BoundTarget) -> Maps:
        inputs = bound.inputs
        nodes, weights = np.polynomial.legendre.leggauss(self.steps)
        alphas, weights = (nodes + 1) / 2, weights / 2
        x_img, x_txt, f_x = _clean_features(vlm, bound, self.space)
        base_img = self._image_baseline(vlm, inputs, x_img)
        prompt = _prompt_mask(inputs, x_txt)
        avg_img = torch.zeros((bound.k, *x_img.shape))
        avg_txt = torch.zeros((bound.k, *x_txt.shape))
        for start in range(0, self.steps, self.batch_steps):
            a = torch.tensor(alphas[start : start + self.batch_steps], dtype=torch.float32)
            w = torch.tensor(weights[start : start + self.batch_steps], dtype=torch.float32)
            g = self._grads_at(vlm, bound, inputs, a, base_img, prompt)
            n = len(a)
            avg_img += torch.einsum(
                "s,ks...->k...", w, g.image_grad.reshape(bound.k, n, *x_img.shape)
            )
            avg_txt += torch.einsum(
                "s,ks...->k...", w, g.text_grad.reshape(bound.k, n, *x_txt.shape)
            )
        image, text = to_maps(
            vlm, inputs, self.space, (x_img - base_img) * avg_img, x_txt * prompt * avg_txt
        )
        f_base = _scores_at(vlm, bound, inputs, self.space, base_img, prompt, x_txt)
        total = torch.stack([t.sum(-1) for t in text], dim=0)  # (batch, outputs)
        flat = iter(image)
        for b, item in enumerate(inputs.image_spans):
            for _ in item:
                total[b] += next(flat).sum((-2, -1))
        delta = f_x - f_base
        return Maps(
            image, text, {"completeness_gap": (total - delta).tolist(), "delta": delta.tolist()}
        )

    def _grads_at(
        self,
        vlm: VLM,
        bound: BoundTarget,
        inputs: Inputs,
        alphas: torch.Tensor,
        base_img: torch.Tensor,
        prompt: torch.Tensor,
    ) -> Any:
        n = len(alphas)
        tiled = inputs.tile(n)
        a_img = alphas.repeat_interleave(base_img.shape[0]).view(-1, *[1] * (base_img.dim() - 1))
        a_txt = alphas.repeat_interleave(prompt.shape[0]).view(-1, 1, 1)
        base = base_img.repeat(n, *[1] * (base_img.dim() - 1))
        mask = prompt.repeat(n, 1, 1)
        return gradients(
            vlm,
            bound,
            tiled,
            self.space,
            image_edit=lambda x: base.to(x) + a_img.to(x) * (x - base.to(x)),
            text_edit=lambda x: x - mask.to(x) * (1 - a_txt.to(x)) * x,
        )

    def _image_baseline(self, vlm: VLM, inputs: Inputs, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.baseline, torch.Tensor):
            if self.baseline.shape[-1:] != x.shape[-1:] or self.baseline.dim() > x.dim():
                raise InputError(
                    f"a baseline tensor must broadcast to the image features {tuple(x.shape)}"
                    f" (e.g. a ({x.shape[-1]},) mean embedding), not {tuple(self.baseline.shape)}"
                )
            return self.baseline.to(x).expand_as(x).clone()
        if self.baseline == "zero" or (self.space == "pixels" and self.baseline == "mean"):
            return torch.zeros_like(x)
        if self.baseline == "mean":  # each image's mean token
            sizes = [s.grid[0] * s.grid[1] for s in vlm.flat_spans(inputs)]
            return torch.cat([p.mean(0, keepdim=True).expand_as(p) for p in x.split(sizes)])
        images = [[_baseline_image(im, self.baseline) for im in item] for item in inputs.images]
        pixels = vlm.pixel_values_of([im for item in images for im in item])
        if pixels.shape != inputs.pixel_values.shape:  # a layout that depends on the prompt
            # (LLaVA-OneVision tiles an image only when it is alone in its prompt)
            batch: Any = images if len(images) > 1 else images[0]
            again = vlm.prepare(batch, list(inputs.prompts))
            pixels = again.pixel_values.to(inputs.pixel_values)
        if self.space == "pixels":
            return pixels.to(x)
        other = replace(inputs, tensors={**inputs.tensors, "pixel_values": pixels})
        with torch.no_grad(), capture(vlm, vlm.IMAGE_TOKENS_SITE) as cap:
            vlm.forward(other)
        return vlm.image_tokens(cap[vlm.IMAGE_TOKENS_SITE], other).to(x)


def _baseline_image(image: Image.Image, kind: str) -> Image.Image:
    if kind == "black":
        return Image.new("RGB", image.size)
    radius = max(1.0, min(image.size) / 12)
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))


def _prompt_mask(inputs: Inputs, text: torch.Tensor) -> torch.Tensor:
    """(batch, sequence, 1): 1 on the prompt's positions."""
    mask = torch.zeros(text.shape[:2] + (1,), dtype=text.dtype)
    for b, (start, end) in enumerate(inputs.prompt_spans):
        mask[b, start:end] = 1
    return mask


def _clean_features(
    vlm: VLM, bound: BoundTarget, space: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clean image features, text embeddings and target scores, from one forward."""
    sites = [vlm.TEXT_EMBED_SITE] + ([vlm.IMAGE_TOKENS_SITE] if space == "tokens" else [])
    with torch.no_grad(), capture(vlm, sites) as cap:
        f_x = bound(vlm.forward(bound.inputs)).float()
    text = cap[vlm.TEXT_EMBED_SITE].float().cpu()
    if space == "tokens":
        image = vlm.image_tokens(cap[vlm.IMAGE_TOKENS_SITE], bound.inputs).float().cpu()
    else:
        image = bound.inputs.pixel_values.float().cpu()
    return image, text, f_x.cpu()


def _scores_at(
    vlm: VLM,
    bound: BoundTarget,
    inputs: Inputs,
    space: str,
    image: torch.Tensor,
    prompt: torch.Tensor,
    text: torch.Tensor,
) -> torch.Tensor:
    """Target scores with the image features set to ``image`` and the prompt zeroed."""
    hooks = {vlm.TEXT_EMBED_SITE: lambda out: out * (1 - prompt.to(out))}
    if space == "tokens":
        hooks[vlm.IMAGE_TOKENS_SITE] = lambda out: vlm.with_image_tokens(
            out, image.to(out), inputs
        )
    else:
        pixels = image.to(inputs.pixel_values)
        inputs = replace(inputs, tensors={**inputs.tensors, "pixel_values": pixels})
    with torch.no_grad(), patch(vlm, hooks):
        return bound(vlm.forward(inputs)).float().cpu()


@register("smoothgrad", family="attribution/gradient", paper="Smilkov et al. 2017", level=LEVEL)
class SmoothGrad(Attribution):
    """The mean of a gradient method's maps over ``samples`` noisy copies of the pixels.

    ``noise`` is the standard deviation as a share of the pixel values' range (10-20% in the
    paper); ``method`` is any registered gradient method, ``settings`` its settings.
    """

    def __init__(
        self,
        method: str = "saliency",
        samples: int = 16,
        noise: float = 0.15,
        seed: int = 0,
        **settings: Any,
    ) -> None:
        entry = REGISTRY.get(method)
        if entry.family != "attribution/gradient" or entry.obj is SmoothGrad:
            raise InputError(f"SmoothGrad wraps a gradient method, not {method!r}")
        if samples < 1 or noise < 0:
            raise InputError("SmoothGrad needs samples >= 1 and noise >= 0")
        self.method, self.samples, self.noise, self.seed = method, int(samples), noise, seed
        self.inner_settings = dict(settings)
        try:  # through the registry: the inner method's settings are checked too
            self._inner: Attribution = REGISTRY.make(method, **settings)
        except TypeError as err:
            raise InputError(f"SmoothGrad over {method}: {err}") from None

    def attribute(self, vlm: VLM, bound: BoundTarget) -> Maps:
        inputs = bound.inputs.tile(self.samples)
        pixels = inputs.pixel_values
        noise = []
        for sample in range(self.samples):  # each image's noise depends on (seed, sample) only
            for rows in vlm.pixel_rows(bound.inputs):
                generator = torch.Generator().manual_seed(self.seed * 100_003 + sample)
                noise.append(torch.randn((rows, *pixels.shape[1:]), generator=generator))
        sd = self.noise * vlm.pixel_range
        noisy = pixels + sd * torch.cat(noise).to(pixels)
        noisy_inputs = replace(inputs, tensors={**inputs.tensors, "pixel_values": noisy})
        maps = self._inner.attribute(vlm, replace(bound, inputs=noisy_inputs))
        n_img, n_items = len(maps.image) // self.samples, len(maps.text) // self.samples
        image = [torch.stack(maps.image[i::n_img]).mean(0) for i in range(n_img)]
        text = [torch.stack(maps.text[b::n_items]).mean(0) for b in range(n_items)]
        return Maps(image, text)
