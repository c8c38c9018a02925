"""Causal tracing (Meng et al. 2022, "Locating and editing factual associations in GPT"; Palit
et al. 2023 for vision-language models): which hidden states carry the image's evidence.

Run clean, run corrupted (image tokens plus Gaussian noise of ``noise`` standard deviations of
their embeddings, or a counterfactual input), then restore one site from the clean run and see
how much of the target comes back: effect = (p_restored - p_corrupt) / (p_clean - p_corrupt),
with p the target's probability (its raw score when it is not a log-probability: a logit
difference, CLIP's similarity). Presets of the patching engine (``patching.py``):

- ``"residual"``: a layer's output at one position, for every layer x position;
- ``"mlp"`` / ``"attn"``: the MLP's / attention's output at one position in a window of layers
  centred on each layer (Meng et al.: 10 of GPT-2 XL's 48 layers; default here a quarter);
- ``"head"``: one head's output (its slice of ``.attn.heads``) at all chosen positions, for
  every layer x head.

Decoders trace their language model, dual encoders (CLIP) their vision tower, whose sequence
is the class token and the patches. In a decoder, positions before the first image token (and
before any token a counterfactual changes) see the same values in every run; they are not run
and their effect is exactly 0 (listed in ``PatchingResult.skipped``).

Hybrid models (Qwen3.5): ``"attn"`` restores each layer's token mixer, the softmax attention or
the linear-attention module (``linear_attn``) of a gated delta-net layer; ``"head"`` traces the
softmax-attention heads only (effect NaN at the other layers, ``settings["skipped_layers"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.core.sites import site
from mmscope.core.targets import BoundTarget, Target
from mmscope.core.validate import integer, number, positive_int, valid_seed
from mmscope.methods.analysis import (
    KIND,
    Analysis,
    bind,
    position_labels,
    sequence_spans,
    stack,
)
from mmscope.methods.layer.patching import (
    PatchingResult,
    Restoration,
    normalised_effect,
    patch_runs,
)
from mmscope.models.base import VLM
from mmscope.models.capabilities import softmax_only

PRESETS = ("residual", "mlp", "attn", "head")


def _positions(value: Any) -> str | tuple[int, ...] | None:
    if value is None or value == "image":
        return value  # type: ignore[no-any-return]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise InputError(f"positions must be None, 'image' or a list of positions, not {value!r}")
    return tuple(integer("a position", p) for p in value)


@register(
    "causal_trace",
    kind=KIND,
    family="inside/patching",
    paper="Meng et al. 2022",
    level="model/layer",
)
class CausalTrace(Analysis):
    """Causal tracing with a preset of the patching engine (Meng et al. 2022).

    Args:
        preset: ``"residual"``, ``"mlp"``, ``"attn"`` or ``"head"`` (see the module).
        noise: the image tokens' noise, in standard deviations of their embeddings (3 in
            Meng et al.); unused when a counterfactual ``corrupted`` input is given.
        window: layers restored together by ``"mlp"`` / ``"attn"`` (default a quarter of the
            stack, at least 1).
        seed: seed of the noise (the same noise in every run).
        batch_size: at most this many rows per forward.
        positions: sequence positions traced (``"head"``: restored), ``None`` for all,
            ``"image"`` for the image tokens; negative ones count from the end.
    """

    def __init__(
        self,
        preset: str = "residual",
        noise: float = 3.0,
        window: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        positions: Sequence[int] | str | None = None,
    ) -> None:
        if preset not in PRESETS:
            raise InputError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
        self.preset = preset
        self.noise = number("noise", noise)
        if self.noise < 0:
            raise InputError(f"noise must be at least 0, not {noise!r}")
        self.window = None if window is None else positive_int("window", window)
        self.seed = valid_seed(seed)
        self.batch_size = positive_int("batch_size", batch_size)
        self.positions = _positions(positions)

    def __call__(
        self,
        vlm: VLM,
        inputs: Inputs,
        target: Target | None = None,
        corrupted: Inputs | None = None,
    ) -> PatchingResult:
        bound = bind(vlm, inputs, target)
        counter = None
        if corrupted is not None:
            counter = _counterfactual(vlm, inputs, bound, corrupted, target)
        where = stack(vlm)
        layers = vlm.num_layers(where)
        length = _length(vlm, bound.inputs)
        chosen = self._chosen(vlm, bound.inputs, length)
        window = self.window or max(1, round(layers / 4))
        skipped: tuple[int, ...] = ()
        no_heads: dict[str, str] = {}
        if self.preset == "head":
            heads = vlm.num_heads(where)
            width = vlm.head_dim(where)
            kept, no_heads = softmax_only(vlm, where, range(layers), "causal_trace (heads)")
            units: list[Restoration] = [
                ((site(where, k, "attn.heads"), chosen, (h * width, (h + 1) * width)),)
                for k in kept
                for h in range(heads)
            ]
            shape = (len(kept), heads)
        else:
            first = _first_reached(vlm, bound.inputs, counter)
            skipped = tuple(p for p in chosen if p < first)
            run = [p for p in chosen if p >= first]
            units = [
                self._unit(vlm, where, k, p, layers, window) for k in range(layers) for p in run
            ]
            shape = (layers, len(run))
        runs = patch_runs(
            vlm,
            bound,
            units,
            corrupted=counter,
            noise=self.noise,
            seed=self.seed,
            batch_size=self.batch_size,
        )
        to_p = torch.exp if bound.log_prob else (lambda x: x)
        clean, corrupt, restored = to_p(runs.clean), to_p(runs.corrupt), to_p(runs.restored)
        traced = normalised_effect(restored.T, clean[:, None], corrupt[:, None]).numpy()
        effect = traced.reshape(inputs.batch_size, *shape)
        if no_heads:  # layers without softmax-attention heads: NaN
            full = np.full((inputs.batch_size, layers, shape[1]), np.nan)
            full[:, [k for k in range(layers) if site(where, k) not in no_heads]] = effect
            effect = full
        if skipped:  # skipped positions: exactly 0, or NaN where no restoration can matter
            flat = normalised_effect(clean, clean, corrupt).isnan().numpy()
            full = np.zeros((inputs.batch_size, layers, len(chosen)))
            full[:, :, [i for i, p in enumerate(chosen) if p not in skipped]] = effect
            full[flat] = np.nan
            effect = full
        return PatchingResult(
            effect=effect,
            p_clean=clean.numpy(),
            p_corrupt=corrupt.numpy(),
            preset=self.preset,
            positions=chosen,
            image_spans=sequence_spans(vlm, bound.inputs),
            tokens=tuple(
                tuple(labels[p] for p in chosen)
                for labels in (
                    position_labels(vlm, bound.inputs, b, length) for b in range(inputs.batch_size)
                )
            ),
            skipped=skipped,
            settings={
                "noise": None if corrupted is not None else self.noise,
                "corruption": "counterfactual" if corrupted is not None else "noise",
                "window": window if self.preset in ("mlp", "attn") else None,
                "seed": self.seed,
                "stack": where,
                "target": [lab[0] if lab else "" for lab in bound.labels],
                **({"skipped_layers": no_heads} if no_heads else {}),
            },
        )

    def _chosen(self, vlm: VLM, inputs: Inputs, length: int) -> tuple[int, ...]:
        if self.positions is None:
            return tuple(range(length))
        if self.positions == "image":
            found = {p for item in inputs.image_spans for s in item for p in s.positions}
            spans = [s for item in inputs.image_spans for s in item]
            if not vlm.contrastive and any(s.sequence != "lm" for s in spans):
                raise NotApplicableError(
                    f"positions='image': {vlm.name} reads its images through cross-attention, "
                    "so its language model has no image positions to restore"
                )
            return tuple(sorted(found))
        out, given = [], tuple(int(p) for p in self.positions)
        for p in given:
            if not -length <= p < length:
                raise InputError(f"position {p} is outside the sequence of length {length}")
            out.append(p % length)
        return tuple(sorted(set(out)))

    def _unit(
        self, vlm: VLM, where: str, layer: int, pos: int, layers: int, window: int
    ) -> Restoration:
        if self.preset == "residual":
            return ((site(where, layer), (pos,), None),)
        low, high = max(0, layer - window // 2), min(layers, layer - (-window // 2))
        if self.preset == "attn":
            return tuple((_mixer(vlm, where, j), (pos,), None) for j in range(low, high))
        return tuple((site(where, j, self.preset), (pos,), None) for j in range(low, high))


def _mixer(vlm: VLM, where: str, layer: int) -> str:
    """A layer's token mixer: its ``.attn``, or where the layer has no softmax attention over
    the sequence a hybrid model's ``.linear_attn`` (Qwen3.5) or ``.cross_attn`` (Mllama)."""
    if layer in vlm.non_softmax_layers(where):
        for role in ("linear_attn", "cross_attn"):
            if f"{where}.{role}" in vlm.ROLES:
                return site(where, layer, role)
    return site(where, layer, "attn")


def _length(vlm: VLM, inputs: Inputs) -> int:
    """Length of the traced sequence: the decoder's tokens, or CLIP's class token + patches."""
    if not vlm.contrastive:
        return int(inputs.input_ids.shape[1])
    return max(span.end for item in inputs.image_spans for span in item)


def _first_reached(vlm: VLM, inputs: Inputs, counter: Inputs | None) -> int:
    """The first position the corruption can change (0 for CLIP, whose attention looks both
    ways): the first image token, or an earlier token a counterfactual changes."""
    if vlm.contrastive:
        return 0
    starts = [min((s.start for s in item), default=0) for item in inputs.image_spans]
    first = min(starts, default=0)
    if counter is not None:
        differs = (counter.input_ids != inputs.input_ids).any(0).nonzero()
        first = min(first, int(differs[0]) if len(differs) else first)
    return first


def _counterfactual(
    vlm: VLM, inputs: Inputs, bound: BoundTarget, corrupted: Inputs, target: Target | None
) -> Inputs:
    """``corrupted`` laid out as ``bound.inputs`` (teacher-forced tokens appended, CLIP texts
    copied per image), checked to have the same sequence layout as ``inputs``."""
    if not isinstance(corrupted, Inputs):
        raise InputError(f"corrupted must be Inputs from vlm.prepare, not {type(corrupted)}")
    if corrupted.image_spans != inputs.image_spans:
        raise InputError("the corrupted inputs need the same items and image spans as the clean")
    if vlm.contrastive:
        return bind(vlm, corrupted, target).inputs
    if corrupted.input_ids.shape != inputs.input_ids.shape:
        raise InputError(
            f"the corrupted inputs have {tuple(corrupted.input_ids.shape)} tokens, the clean "
            f"{tuple(inputs.input_ids.shape)}: use the same prompt layout"
        )
    length = inputs.input_ids.shape[1]
    if bound.inputs.input_ids.shape[1] == length:
        return corrupted
    keep = bound.inputs.attention_mask[:, length:].bool()
    return corrupted.extend(bound.inputs.input_ids[:, length:], keep)
