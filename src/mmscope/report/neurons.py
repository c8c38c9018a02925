"""The demo's "neurons and concepts" section: a few studies on world items, each with its
figure and the finding it shows in one sentence, checked against the world's truth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmscope.methods.neuron.dape import domain_items
from mmscope.methods.study import study
from mmscope.models import load
from mmscope.models.base import VLM
from mmscope.report.inside import figure_uri
from mmscope.world.items import world_items
from mmscope.world.seeds import NEURONS_SEED


def _miner_edit(vlm: VLM, n: int) -> tuple[Any, str]:
    items = world_items(n, seed=NEURONS_SEED)
    found = study("miner", vlm, items, progress=False)
    image = found.neurons.with_label("image")
    result = study("neuron_edit", vlm, world_items(n, seed=NEURONS_SEED + 1), neurons=image)
    row = result.accuracy()["all"]
    return result, (
        f"MINER finds {len(image)} image-specific and "
        f"{len(found.neurons) - len(image)} text-specific neurons (2%); switching the image "
        f"ones off lowers the answer's probability by {row['p_drop']:.3f} and accuracy by "
        f"{row['drop']:.3f}, as many random neurons by {row['p_random_drop']:.3f} and "
        f"{row['random_drop']:.3f}."
    )


def _dape(vlm: VLM, n: int) -> tuple[Any, str]:
    result = study("dape", vlm, domain_items(n, seed=NEURONS_SEED), progress=False)
    labels = result.neurons.labels
    counts = {lab: labels.count(lab) for lab in sorted(set(labels))}
    said = ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
    return result, (
        f"Over the world's four background styles, DAPE keeps {len(labels)} domain-specific "
        f"neurons (1% lowest entropy): {said}."
    )


def _probe(vlm: VLM, n: int) -> tuple[Any, str]:
    result = study("probe", vlm, world_items(n, seed=NEURONS_SEED), concepts=("color", "shape"))
    color, shape = result.at("color", "object"), result.at("shape", "object")
    return result, (
        f"At object patches a linear probe reads colour with accuracy up to "
        f"{color['accuracy'].max():.2f} (selectivity {color['selectivity'].max():.2f} over a "
        f"control task) and shape up to {shape['accuracy'].max():.2f}."
    )


def _dissect(clip: VLM, n: int) -> tuple[Any, str]:
    result = study("network_dissection", clip, world_items(n, seed=NEURONS_SEED, contrastive=True))
    s = result.summary
    return result, (
        f"Network dissection of toy-clip's vision MLPs: {s['labelled']} of {s['units']} "
        f"neurons match a world concept (IoU > 0.04), {s['above_chance']} above chance; "
        f"{s['label_kinds']['color']:.0%} of the labels are colours."
    )


def _splice(clip: VLM, n: int) -> tuple[Any, str]:
    result = study("splice", clip, world_items(n, seed=NEURONS_SEED, contrastive=True))
    return result, (
        f"SpLiCE decomposes toy-clip's image embeddings into {result.l0.mean():.1f} world "
        f"concepts on average (cosine {result.cosine.mean():.2f}); the top concept is in the "
        f"image {result.precision(1):.0%} of the time."
    )


LLAVA: dict[str, tuple[str, Callable[[VLM, int], tuple[Any, str]]]] = {
    "miner": ("Modality-specific neurons (MINER), switched off", _miner_edit),
    "dape": ("Domain-specific neurons (DAPE)", _dape),
    "probe": ("Linear probes with control tasks", _probe),
}
CLIP: dict[str, tuple[str, Callable[[VLM, int], tuple[Any, str]]]] = {
    "network_dissection": ("Network dissection against the world's patch concepts", _dissect),
    "splice": ("SpLiCE: sparse concepts of CLIP image embeddings", _splice),
}


def neurons_section(vlm: VLM, n: int = 40) -> list[dict[str, str]]:
    """The studies of ``LLAVA`` on a decoder (``vlm``) and of ``CLIP`` on toy-clip, each on
    ``n`` world items: title, finding, figure."""
    runs = [] if vlm.contrastive else [(vlm, LLAVA)]
    runs.append((vlm if vlm.contrastive else load("toy-clip"), CLIP))
    out = []
    for model, sections in runs:
        for key, (title, run) in sections.items():
            result, finding = run(model, n)
            out.append(
                {
                    "key": key,
                    "title": title,
                    "finding": finding,
                    "figure": figure_uri(result.plot()),
                }
            )
    return out


__all__ = ["neurons_section"]
