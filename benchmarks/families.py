"""Which registered entries run on which architecture family, measured on the tiny models.

    python benchmarks/families.py [--json] [--markdown]

For every tiny model of ``mmscope.toys.tiny.TINY`` (one per adapter family), every attribution
method, analysis and decoder is run once on two world images with cheap settings; an entry
either runs, or is refused with ``NotApplicableError`` (its reason is kept), or fails (a bug:
the contract suite in ``tests/contract`` fails too). Studies and metrics are listed by their
declared needs (``mmscope.models.capabilities``), which is what refuses them before any work.
``--markdown`` prints the README's supported-architectures table.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mmscope.core.errors import NotApplicableError
from mmscope.core.registry import REGISTRY
from mmscope.decoding import decoders, make_decoder
from mmscope.methods.analysis import analyses
from mmscope.methods.explain import attribution_methods, make_method
from mmscope.methods.inside import analyse
from mmscope.models.capabilities import applicability
from mmscope.toys.tiny import TINY, build_tiny
from mmscope.world import render, sample_scenes

#: Cheap settings (the contract suite's); defaults are exercised in the unit tests.
FAST: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 4},
    "smoothgrad": {"samples": 2},
    "rise": {"masks": 32},
    "lime": {"samples": 20},
    "kernel_shap": {"samples": 20},
    "score_cam": {"batch_size": 32},
    "gscore_cam": {"channels": 4},
    "harsanyi": {"regions": (2, 1)},
    "token_ablation": {"sets": ("random",)},
    "fastv": {"layers": (1,), "ratios": (0.5,)},
    "head_importance": {"top": 2},
}


def _outcome(run: Any) -> str | None:
    """``None`` when ``run()`` works, else ``"n/a: reason"`` or ``"error: ..."``."""
    try:
        run()
    except NotApplicableError as err:
        return f"n/a: {err}"
    except Exception as err:  # noqa: BLE001  (a measurement: report every failure)
        return f"error: {type(err).__name__}: {err}"
    return None


def measure(name: str) -> dict[str, Any]:
    """Capabilities and, per entry, ``None`` (runs) or why not, on the tiny model ``name``."""
    vlm = build_tiny(name)
    images = [render(s, 48).image for s in sample_scenes(2, 11)]
    prompts = (
        ["a red circle", "a blue square"]
        if vlm.contrastive
        else ["what color is the circle ?", "how many objects are there ?"]
    )
    inputs = vlm.prepare(images, prompts)
    outcomes: dict[str, str | None] = {}
    start = time.perf_counter()
    for key in attribution_methods():
        outcomes[key] = _outcome(lambda k=key: make_method(k, **FAST.get(k, {}))(vlm, inputs))
    for key in analyses():
        if key == "first_token":  # takes labelled items; its need is declared
            continue
        outcomes[key] = _outcome(lambda k=key: analyse(k, vlm, inputs, None, **FAST.get(k, {})))
    for key in decoders():
        outcomes[key] = _outcome(lambda k=key: make_decoder(k)(vlm, inputs, max_new_tokens=3))
    declared = [e for e in REGISTRY.entries() if e.kind in ("study", "metric")]
    declared += [REGISTRY.get("first_token", "analysis")]
    for entry, why in applicability(vlm, declared):
        outcomes[entry.key] = None if why is None else f"n/a: {why}"
    return {
        "family": vlm.family,
        "hf_class": type(vlm.model).__name__,
        "capabilities": vlm.capabilities.to_dict(),
        "outcomes": outcomes,
        "seconds": round(time.perf_counter() - start, 1),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README's table: one row per family, what applies and what does not."""
    lines = [
        "| HF class | adapter | images meet text | attention read | runs | does not apply |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        caps, out = row["capabilities"], row["outcomes"]
        runs = sum(v is None for v in out.values())
        skipped = sorted(k for k, v in out.items() if v and v.startswith("n/a"))
        errors = sorted(k for k, v in out.items() if v and v.startswith("error"))
        cell = ", ".join(f"`{k}`" for k in skipped) or "none"
        if errors:
            cell += "; **errors:** " + ", ".join(f"`{k}`" for k in errors)
        where = caps["images_in"] + (" (class token)" if caps["class_token"] else "")
        lines.append(
            f"| `{row['hf_class']}` | `{row['family']}` | {where} | "
            f"{', '.join(caps['attention']) or 'none'} | {runs} of {len(out)} | {cell} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print every outcome as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--only", help="comma-separated tiny model names (default: all)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(TINY)
    rows = [measure(name) for name in names]
    if args.json:
        print(json.dumps(rows, indent=1))
    if args.markdown or not args.json:
        print(markdown(rows))


if __name__ == "__main__":
    main()
