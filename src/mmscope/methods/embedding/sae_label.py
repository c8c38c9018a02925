"""Label a sparse autoencoder's features with the world's patch concepts, as network
dissection labels neurons (Bau et al. 2017; applied to SAE features as Bricken et al. 2023
label features by what they fire on).

Each feature is encoded at every image token of the SAE's site; it fires on a patch when its
activation exceeds its top ``quantile`` over the dataset (strictly, so that a feature silent
on most patches fires exactly where it is active); its label is the concept of highest IoU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from mmscope.core.errors import InputError
from mmscope.core.registry import register
from mmscope.core.validate import number, positive_int
from mmscope.methods.activations import collect
from mmscope.methods.embedding.sae import SAEResult
from mmscope.methods.neuron.concept_truth import patch_concept_matrix
from mmscope.methods.neuron.dissect import (
    COLUMNS,
    DissectionResult,
    add_units,
    dissection_result,
)
from mmscope.methods.study import KIND, Study
from mmscope.world.items import item_scenes

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world import Scene
    from mmscope.world.items import BenchItem


@register(
    "sae_label",
    kind=KIND,
    family="embedding/sae",
    paper="Bricken et al. 2023; Bau et al. 2017",
    level="model/embedding",
)
class SAELabel(Study):
    """Concept labels of SAE features by thresholded IoU with the world's patch concepts.

    Args:
        quantile: per-feature quantile above which a feature fires.
        min_iou: least IoU for a label.
        min_cover: least share of a patch an object covers to give it its concepts.
        batch_size: items per forward.
        background: also label with ``"background"``.
    """

    def __init__(
        self,
        quantile: float = 0.95,
        min_iou: float = 0.04,
        min_cover: float = 0.25,
        batch_size: int = 16,
        background: bool = False,
    ) -> None:
        self.quantile = number("quantile", quantile)
        if not 0.0 < self.quantile < 1.0:
            raise InputError(f"quantile must lie in (0, 1), not {quantile}")
        self.min_iou = number("min_iou", min_iou)
        self.min_cover = number("min_cover", min_cover)
        self.batch_size = positive_int("batch_size", batch_size)
        self.background = bool(background)

    def __call__(
        self,
        vlm: VLM,
        items: Sequence[BenchItem],
        sae: SAEResult | None = None,
        scenes: Sequence[Scene] | None = None,
    ) -> DissectionResult:
        """``sae``: a trained SAE (``sae_train``, ``load_sae``); ``scenes``: the world scene
        of each item (default: matched by pixels). Units are features, the site
        ``"sae:<site>"``."""
        if not isinstance(sae, SAEResult):
            raise InputError(f"sae_label needs an SAE (sae=load_sae(path)), not {sae!r:.60}")
        found = item_scenes(items, scenes)
        acts = collect(vlm, items, sae.site, groups=("image",), batch_size=self.batch_size)
        raw = acts[sae.site]
        if raw.values.shape[1] != sae.weights["W_enc"].shape[0]:
            raise InputError(
                f"the SAE reads width {sae.weights['W_enc'].shape[0]}, "
                f"{sae.site} has {raw.values.shape[1]}"
            )
        features = replace(raw, values=sae.encode(raw.values).astype(np.float32))
        names, concepts = patch_concept_matrix(
            features, items, found, self.min_cover, self.background
        )
        rows: dict[str, list[Any]] = {k: [] for k in COLUMNS}
        site = f"sae:{sae.site}"
        agree = add_units(rows, site, features, names, concepts, self.quantile, self.min_iou)
        settings = {**vars(self), "sae_site": sae.site, "features": sae.features}
        return dissection_result("sae_label", rows, len(names), agree, settings)
