"""The demo's "inside the model" section: one figure per analysis on world questions, each with
the finding it shows in one sentence."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mmscope.core.result import figure_uri
from mmscope.core.targets import TokenId, answer_id
from mmscope.methods.inside import analyse
from mmscope.models.base import VLM
from mmscope.world.items import BenchItem, answerability_items, world_items
from mmscope.world.seeds import INSIDE_SEED


def _answers(vlm: VLM, items: list[BenchItem]) -> TokenId:
    return TokenId([answer_id(vlm, it.answer) for it in items])


def _evidence_question(items: list[BenchItem]) -> BenchItem:
    """The first colour or shape question with an evidence mask (else the first item)."""
    chosen = (it for it in items if it.mask is not None and it.kind in ("color", "shape"))
    return next(chosen, items[0])


def _lens(vlm: VLM, items: list[BenchItem]) -> tuple[Any, str]:
    item = next((it for it in items if it.kind == "existence"), items[0])
    result = analyse("logit_lens", vlm, vlm.prepare(item.image, item.prompt))
    layer = result.first_top_layer(0)
    word = result.names[result.target_ids[0]]
    where = f"from layer {layer} on" if layer is not None else "at no layer"
    return result, f"“{item.prompt}” → {word}: the top token at the last position {where}."


def _ablation(vlm: VLM, items: list[BenchItem]) -> tuple[Any, str]:
    chosen = [it for it in items if it.mask is not None and it.kind != "count"]
    inputs = vlm.prepare([it.image for it in chosen], [it.prompt for it in chosen])
    result = analyse(
        "token_ablation", vlm, inputs, _answers(vlm, chosen), masks=[it.mask for it in chosen]
    )
    return result, (
        f"On {len(chosen)} questions, replacing the evidence object's tokens flips "
        f"{result.flip_rate('object'):.0%} of the right answers; as many random tokens "
        f"{result.flip_rate('random'):.0%}."
    )


def _trace(vlm: VLM, items: list[BenchItem]) -> tuple[Any, str]:
    from mmscope.methods.token.sets import object_cells

    item = _evidence_question(items)
    assert item.mask is not None
    inputs = vlm.prepare(item.image, item.prompt)
    result = analyse("causal_trace", vlm, inputs, _answers(vlm, [item]))
    cells = object_cells(item.mask, inputs.image_spans[0][0])
    mass = result.mass_inside(cells, item=0, layer=0)
    return result, (
        f"“{item.prompt}”: restoring clean image tokens at layer 0 into a run with noised image "
        f"tokens, {mass:.0%} of the recovered answer comes from the evidence object's patches, "
        f"which cover {cells.mean():.0%} of the image."
    )


def _knockout(vlm: VLM, items: list[BenchItem]) -> tuple[Any, str]:
    chosen = [it for it in items if it.mask is not None and it.kind in ("color", "shape")]
    inputs = vlm.prepare([it.image for it in chosen], [it.prompt for it in chosen])
    result = analyse(
        "attention_knockout", vlm, inputs, _answers(vlm, chosen), masks=[it.mask for it in chosen]
    )
    change = result.mean_change()
    flows = list(result.flows)
    worst = {f: float(np.nanmin(change[flows.index(f)])) for f in ("object", "other_image")}
    return result, (
        f"On {len(chosen)} colour and shape questions, blocking the last token from the "
        f"evidence object's patches changes the answer's probability by up to "
        f"{worst['object']:+.0%}; from all other patches by up to {worst['other_image']:+.0%}."
    )


def _heads(vlm: VLM, items: list[BenchItem]) -> tuple[Any, str]:
    item = _evidence_question(items)
    result = analyse("head_importance", vlm, vlm.prepare(item.image, item.prompt))
    stack, layer, head, drop = result.top_heads(1)[0]
    return result, (
        f"“{item.prompt}”: masking {stack} {layer} head {head} costs the answer most "
        f"({drop:.2f} in log-probability)."
    )


def _pruning(vlm: VLM, items: list[BenchItem]) -> tuple[Any, str]:
    inputs = vlm.prepare([it.image for it in items], [it.prompt for it in items])
    result = analyse("fastv", vlm, inputs, _answers(vlm, items))
    breaks = {k: result.breaks_at("last", k) for k in result.layers}
    said = "; ".join(
        f"after layer {k} it {'breaks at R = ' + format(r, '.2f') if r is not None else 'holds'}"
        for k, r in breaks.items()
    )
    return result, f"Unpruned accuracy {result.baseline:.2f} on {len(items)} questions; {said}."


def _first_token(vlm: VLM, items: list[BenchItem]) -> tuple[Any, str]:
    pairs = answerability_items(max(10, len(items) // 2), seed=INSIDE_SEED)
    inputs = vlm.prepare([it.image for it in pairs], [it.prompt for it in pairs])
    labels = [it.kind != "unanswerable" for it in pairs]
    result = analyse("first_token", vlm, inputs, labels=labels)
    auc = "n/a" if result.auc is None else f"{result.auc:.2f}"
    return result, (
        f"A linear probe on the first answer token tells {len(pairs) // 2} answerable from "
        f"as many unanswerable questions with ROC AUC {auc} (0.5: not at all)."
    )


SECTIONS: dict[str, tuple[str, Callable[[VLM, list[BenchItem]], tuple[Any, str]]]] = {
    "logit_lens": ("Logit lens: where the answer forms", _lens),
    "token_ablation": ("Visual-token ablation: which image tokens the answer needs", _ablation),
    "attention_knockout": ("Attention knockout: which flows the answer reads", _knockout),
    "head_importance": ("Head importance: which heads the answer needs", _heads),
    "causal_trace": ("Causal tracing: which hidden states carry the evidence", _trace),
    "fastv": ("Visual-token pruning (FastV): where accuracy breaks", _pruning),
    "first_token": ("First-token analysis: does the model know it cannot answer?", _first_token),
}


def inside_section(vlm: VLM, n: int = 30) -> list[dict[str, str]]:
    """Each analysis of ``SECTIONS`` on ``n`` world questions: title, finding, figure."""
    if vlm.contrastive:
        return []
    items = world_items(n, seed=INSIDE_SEED)
    items = [it for it in items if it.kind != "count"] or items
    out = []
    for key, (title, run) in SECTIONS.items():
        result, finding = run(vlm, items)
        out.append(
            {"key": key, "title": title, "finding": finding, "figure": figure_uri(result.plot())}
        )
    return out


__all__ = ["SECTIONS", "figure_uri", "inside_section"]
