"""Visual contrastive decoding (Leng et al. 2024, "Mitigating object hallucinations in large
vision-language models through visual contrastive decoding").

At every step the next-token logits given the image, ``l``, are contrasted with those given a
diffusion-noised copy of it, ``l'``: score = (1 + alpha) l - alpha l', over the tokens that are
plausible given the clean image (p(y | v) >= beta * max p(y | v)); the others get -inf.

Both passes run as ONE batched Hugging Face ``generate`` over 2B rows (clean rows, then the
distorted rows), each row with its own KV cache. ``VCDLogitsProcessor`` combines row b with row
b + B and writes the same scores to both, so that both rows take the same token.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmscope.core.errors import InputError
from mmscope.core.registry import register
from mmscope.core.validate import integer, number, valid_seed
from mmscope.decoding.base import KIND, LEVEL, Decoder, hf_generate

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM

#: Steps of VCD's forward-diffusion schedule.
STEPS = 1000


def alpha_bar(step: int = 500) -> float:
    """abar_t = prod_{s <= t} (1 - beta_s), t counted from 0 as in VCD's ``add_diffusion_noise``
    (``alphas_prod[noise_step]``), with beta = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5)
    + 1e-5."""
    step = integer("noise_step", step, minimum=0)
    if step >= STEPS:
        raise InputError(f"noise_step must be below {STEPS}, not {step}")
    grid = torch.linspace(-6, 6, STEPS, dtype=torch.float64)
    betas = torch.sigmoid(grid) * (5e-3 - 1e-5) + 1e-5
    return float(torch.prod(1 - betas[: step + 1]))


def diffusion_noise(pixel_values: torch.Tensor, step: int = 500, seed: int = 0) -> torch.Tensor:
    """sqrt(abar_t) v + sqrt(1 - abar_t) eps on the preprocessed pixel tensor (any layout:
    LLaVA's ``(images, 3, H, W)`` or Qwen2-VL's flattened patches); eps ~ N(0, 1) comes from a
    CPU generator seeded with ``seed``, so the same seed gives the same noise on every device."""
    abar = alpha_bar(step)
    generator = torch.Generator().manual_seed(valid_seed(seed))
    eps = torch.randn(tuple(pixel_values.shape), generator=generator, dtype=torch.float32)
    noisy = math.sqrt(abar) * pixel_values.float() + math.sqrt(1 - abar) * eps.to(
        pixel_values.device
    )
    return noisy.to(pixel_values.dtype)


def contrast(
    clean: torch.Tensor, distorted: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """(1 + alpha) clean - alpha distorted where p(y | v) >= beta max p(y | v), else -inf.

    The cutoff on logits, ``clean >= log(beta) + max clean``, equals the one on probabilities
    (softmax shares its normaliser); tokens already at -inf stay there."""
    cutoff = clean.max(dim=-1, keepdim=True).values + math.log(beta)
    scores = (1 + alpha) * clean - alpha * distorted
    return scores.masked_fill(~(clean >= cutoff), -math.inf)


class VCDLogitsProcessor(LogitsProcessor):
    """A ``LogitsProcessor`` for a 2B batch whose rows ``b`` (clean image) and ``b + B``
    (distorted image) continue the same text: both rows get the contrastive scores of item b.

    With ``sample=True`` the processor draws the token itself (temperature, top-k, top-p on the
    contrastive scores, as VCD samples, from its own generator seeded with ``seed``) and gives
    both rows a one-hot score (0 at the drawn token, -inf elsewhere), so that greedy search (or
    sampling) in ``generate`` must take it in both rows.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.1,
        sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.alpha, self.beta = number("alpha", alpha), number("beta", beta)
        if self.alpha < 0 or not 0 < self.beta <= 1:
            raise InputError("alpha must be at least 0 and beta in (0, 1]")
        if not isinstance(sample, bool):
            raise InputError(f"sample must be True or False, not {sample!r}")
        temperature, top_p = number("temperature", temperature), number("top_p", top_p)
        if temperature <= 0 or not 0 < top_p <= 1:
            raise InputError("temperature must be positive and top_p in (0, 1]")
        top_k = integer("top_k", top_k, minimum=0)
        self.sample, self.seed = sample, valid_seed(seed)
        #: The checked settings, to make an equal processor again.
        self.settings: dict[str, Any] = {
            "alpha": self.alpha,
            "beta": self.beta,
            "sample": sample,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": self.seed,
        }
        warpers: list[LogitsProcessor] = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = scores.shape[0]
        if rows % 2:
            raise ValueError(f"VCD needs clean and distorted rows (an even batch), got {rows}")
        half = rows // 2
        out = contrast(scores[:half], scores[half:], self.alpha, self.beta)
        if self.sample:
            if self.generator is None or self.generator.device != scores.device:
                self.generator = torch.Generator(scores.device).manual_seed(self.seed)
            warped = self.warpers(input_ids[:half], out)  # type: ignore[arg-type]
            probs = torch.softmax(warped, dim=-1)
            chosen = torch.multinomial(probs, 1, generator=self.generator)
            out = torch.full_like(out, -math.inf).scatter_(1, chosen, 0.0)
        return torch.cat([out, out]).to(scores.dtype)  # type: ignore[return-value]


def with_distorted(inputs: Inputs, step: int = 500, seed: int = 0) -> Inputs:
    """``inputs`` tiled twice: the clean items, then the same items with diffusion-noised pixels.

    ``Inputs.tile`` repeats every tensor along its first axis, which keeps per-image tensors
    (Qwen2-VL's flattened patches and ``image_grid_thw``) in step; the second copy of
    ``pixel_values`` is then replaced by its noised version, every image noised with the same
    seeded noise (so an item gets the same text alone as in a batch).
    """
    if "pixel_values" not in inputs.tensors:
        raise InputError("VCD contrasts with a distorted image; these inputs have no image")
    pixels = inputs.pixel_values
    pair = inputs.tile(2)
    tensors = dict(pair.tensors)
    noised = [diffusion_noise(part, step, seed) for part in _per_image(inputs, pixels)]
    tensors["pixel_values"] = torch.cat([pixels, *noised])
    return replace(pair, tensors=tensors)


def _per_image(inputs: Inputs, pixels: torch.Tensor) -> list[torch.Tensor]:
    """``pixel_values`` split into its images (Qwen2-VL: rows t*h*w of ``image_grid_thw``), so
    each image gets the same seeded noise whatever batch it is in."""
    grid = inputs.tensors.get("image_grid_thw")
    if grid is not None and pixels.dim() == 2:
        return list(torch.split(pixels, [int(n) for n in grid.prod(-1).tolist()]))
    return list(torch.split(pixels, 1))


@register("vcd", kind=KIND, family="decoding/contrastive", paper="Leng et al. 2024", level=LEVEL)
class VCD(Decoder):
    """Visual contrastive decoding (Leng et al. 2024), greedy or sampled.

    Args:
        alpha: weight of the contrast (0: plain decoding over the plausible tokens).
        beta: adaptive plausibility; tokens below ``beta`` times the top probability are cut.
        noise_step: the diffusion step t (0..999) of the distorted image.
        sample: draw from the contrastive scores (as the paper) instead of taking their argmax.
        temperature, top_k, top_p: sampling warpers (top_k 0 and top_p 1 are off).
        seed: seed of the image noise and of the draws.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.1,
        noise_step: int = 500,
        sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> None:
        alpha_bar(noise_step)  # checks the step
        self.noise_step = int(noise_step)
        checked = VCDLogitsProcessor(alpha, beta, sample, temperature, top_k, top_p, seed)
        self.settings = checked.settings  # the processor checks its own settings
        self.seed = checked.seed

    @property
    def draws(self) -> bool:
        return bool(self.settings["sample"])

    def processor(self) -> VCDLogitsProcessor:
        """A fresh processor with these settings (its generator starts from ``seed``)."""
        return VCDLogitsProcessor(**self.settings)

    def decode(self, vlm: VLM, inputs: Inputs, max_new_tokens: int) -> torch.Tensor:
        pair = with_distorted(inputs, self.noise_step, self.seed)
        new = hf_generate(
            vlm,
            pair,
            max_new_tokens,
            do_sample=False,
            num_beams=1,
            logits_processor=LogitsProcessorList([self.processor()]),
        )
        half = inputs.batch_size
        if not torch.equal(new[:half], new[half:]):
            raise RuntimeError("VCD's clean and distorted rows chose different tokens")
        return new[:half]
