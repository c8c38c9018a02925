"""Max-sensitivity (Yeh et al. 2019, "On the (In)fidelity and Sensitivity of Explanations").

The pixels are perturbed by uniform noise within a small radius, the method is run again, and
the largest relative change of the item's maps, ``max_j ||map_j - map||_F / ||map||_F``, is the
score: lower is better (a robust explanation changes little when the input barely does).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.explanation import Explanation
from mmscope.core.registry import register
from mmscope.core.validate import number, positive_int, valid_seed
from mmscope.metrics.base import LEVEL, Case, Metric


def _item_maps(explanation: Explanation) -> list[np.ndarray]:
    """Per item its image maps (output 0) flattened and joined into one vector."""
    return [
        np.concatenate([np.asarray(m[0], dtype=np.float64).ravel() for m in item])
        if item
        else np.zeros(0)
        for item in explanation.image_scores
    ]


@register(
    "max_sensitivity",
    kind="metric",
    family="metric/robustness",
    paper="Yeh et al. 2019",
    level=LEVEL,
)
class MaxSensitivity(Metric):
    """Largest relative change of the maps over ``samples`` uniform perturbations of the
    pixels within ``radius`` times the normalised pixel range (Yeh et al. 2019).

    Args:
        samples: how many perturbed copies to explain.
        radius: half-width of the uniform noise, as a fraction of ``vlm.pixel_range``.
        seed: seed of the noise.
    """

    category = "robustness"
    higher_is_better = False

    def __init__(self, samples: int = 5, radius: float = 0.05, seed: int = 0) -> None:
        self.samples = positive_int("samples", samples)
        self.radius = number("radius", radius)
        if self.radius < 0:
            raise InputError(f"radius must be at least 0, not {radius!r}")
        self.seed = valid_seed(seed)

    def noise(self, pixels: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
        """Uniform noise in ``[-scale, scale]`` shaped like ``pixels`` (drawn in float32 on the
        CPU, element by element, so any ``pixel_values`` layout gets the same draw)."""
        u = torch.rand(pixels.shape, generator=generator, dtype=torch.float32)
        return ((2 * u - 1) * scale).to(device=pixels.device, dtype=pixels.dtype)

    def __call__(self, case: Case) -> np.ndarray:
        if case.method is None:
            raise InputError("max-sensitivity re-runs the method; give the Case its method")
        inputs = case.inputs
        if "pixel_values" not in inputs.tensors:
            raise InputError("max-sensitivity perturbs the pixels; these inputs have no image")
        pixels = inputs.pixel_values
        scale = self.radius * case.vlm.pixel_range
        generator = torch.Generator().manual_seed(self.seed)
        base = _item_maps(case.explanation)
        worst = np.zeros(len(base))
        for _ in range(self.samples):
            noisy = pixels + self.noise(pixels, scale, generator)
            moved = replace(inputs, tensors={**inputs.tensors, "pixel_values": noisy})
            again = _item_maps(case.method(case.vlm, moved, case.target))
            for b, (m, m_j) in enumerate(zip(base, again)):
                worst[b] = max(worst[b], float(np.linalg.norm(m_j - m)))
        norms = np.array([np.linalg.norm(m) for m in base])
        out = np.full(len(base), np.nan)
        ok = (norms > 0) & np.isfinite(norms)
        out[ok] = worst[ok] / norms[ok]
        return out
