"""The leaderboard: every attribution method against every metric on a fixed set of items.

Items run in batches; for each batch the model answers once (localisation only scores correct
answers), then each method (and the random and oracle baselines) explains the model's own
next token (CLIP: the image-text similarity) and every metric scores that explanation. Each
(batch, method) result is appended to ``results.jsonl`` as soon as it exists, so an
interrupted run loses at most one method's batch, and ``resume`` skips what is there. The
costliest metrics score only the first items (``subsets``): those that re-run the method
(randomisation, max-sensitivity: several explanations each) and ROAD (a sparse solve per
image and step).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmscope.bench.baselines import OracleMap, RandomMap
from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.targets import Predicted, Target, TokenId, default_target
from mmscope.core.validate import integer, positive_int
from mmscope.methods.explain import attribution_methods, make_method
from mmscope.metrics.base import Case, MetricResult, make_metric, metric_keys
from mmscope.world.items import BenchItem

if TYPE_CHECKING:
    from mmscope.models.base import VLM

BASELINES: tuple[str, ...] = ("random", "oracle")
#: How many of the first items the costliest metrics score.
SUBSETS: dict[str, int] = {
    "randomisation": 25,
    "max_sensitivity": 25,
    "road_morf": 100,
    "road_lerf": 100,
}
#: Cheaper settings of the costliest methods and metrics, so n=500 fits in minutes.
BENCH_SETTINGS: dict[str, dict[str, Any]] = {
    "rise": {"masks": 100},
    "lime": {"samples": 100},
    "kernel_shap": {"samples": 100},
    "harsanyi": {"regions": (2, 3), "words": ()},
}
BENCH_METRIC_SETTINGS: dict[str, dict[str, Any]] = {
    **{key: {"steps": 5} for key in ("deletion", "insertion", "road_morf", "road_lerf")},
    "randomisation": {"stages": 1},  # the score is the last stage's: skip the others
    "max_sensitivity": {"samples": 3},
}
RESULTS = "results.jsonl"
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class BenchConfig:
    """Everything that decides a leaderboard's numbers (saved as ``config.json``)."""

    model: str
    n: int
    methods: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    batch_size: int = 25
    subsets: dict[str, int] = field(default_factory=dict)
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: str = "world"

    def resolved(self) -> BenchConfig:
        """The config with defaults filled in (every method, baseline and metric), checked:
        unknown keys and bad sizes raise."""
        positive_int("n", self.n)
        positive_int("batch_size", self.batch_size)
        for key, size in self.subsets.items():
            integer(f"items of {key}", size, minimum=0)
        methods = self.methods or (*attribution_methods(), *BASELINES)
        metrics = self.metrics or tuple(metric_keys())
        known = metric_keys()
        for key in methods:
            if key not in BASELINES:
                make_method(key)  # unknown keys raise with the known ones listed
        for key in metrics:
            if key not in known:
                raise InputError(f"unknown explanation metric {key!r}; known: {', '.join(known)}")
        settings = {m: BENCH_SETTINGS[m] for m in methods if m in BENCH_SETTINGS}
        metric_settings = {
            k: BENCH_METRIC_SETTINGS[k] for k in metrics if k in BENCH_METRIC_SETTINGS
        }
        subsets = {k: SUBSETS[k] for k in metrics if k in SUBSETS}
        return BenchConfig(
            self.model,
            self.n,
            tuple(methods),
            tuple(metrics),
            self.batch_size,
            {**subsets, **self.subsets},
            {**settings, **self.method_settings},
            {**metric_settings, **self.metric_settings},
            self.data,
        )

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def _done(path: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """Finished (batch, method) records; a line cut short by a kill is ignored."""
    done: dict[tuple[int, str], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(int(rec["batch"]), str(rec["method"]))] = rec
    return done


def _prepare_out(out: Path, config: BenchConfig, resume: bool) -> dict[tuple[int, str], Any]:
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    if resume and saved.is_file():
        if json.loads(saved.read_text()) != config.to_json():
            raise InputError(f"{out} holds a run with other settings; use a new --out")
        done = _done(out / RESULTS)  # rewritten without a line a kill cut short
        (out / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in done.values()))
        return done
    saved.write_text(json.dumps(config.to_json(), indent=2) + "\n")
    (out / RESULTS).write_text("")
    return {}


def answers_right(vlm: VLM, items: Sequence[BenchItem]) -> list[bool]:
    """Whether the model's greedy answer equals each item's expected answer (items without
    one, and contrastive models, count as right)."""
    if vlm.contrastive or not any(it.answer for it in items):
        return [True] * len(items)
    inputs = vlm.prepare([it.image for it in items], [it.prompt for it in items])
    said = vlm.generate(inputs, max_new_tokens=4)  # type: ignore[attr-defined]
    return [not it.answer or a.strip().lower() == it.answer.lower() for it, a in zip(items, said)]


def _frozen(vlm: VLM, inputs: Any) -> Target:
    """The model's own next token, frozen per item (``TokenId``), so the metrics that re-run a
    method on a randomised or noisy model ask about the same token (Adebayo et al. keep the
    class); CLIP's similarity as it is."""
    target = default_target(vlm)
    return TokenId(target.token_ids(vlm, inputs)) if isinstance(target, Predicted) else target


def _explainer(key: str, config: BenchConfig, start: int, masks: list[Any]) -> Any:
    if key == "random":
        return RandomMap(range(start, start + len(masks)))
    if key == "oracle":
        return OracleMap(masks)
    return make_method(key, **config.method_settings.get(key, {}))


def run_leaderboard(
    vlm: VLM,
    items: Sequence[BenchItem],
    config: BenchConfig,
    out: str | Path,
    resume: bool = False,
    progress: Progress | None = None,
) -> list[MetricResult]:
    """Score every method with every metric on ``items``, writing results as they come.

    Returns one ``MetricResult`` per (method, metric) with at least one scored item.
    """
    config = config.resolved()
    metrics = {k: make_metric(k, **config.metric_settings.get(k, {})) for k in config.metrics}
    out = Path(out)
    done = _prepare_out(out, config, resume)
    size = config.batch_size
    batches = [range(i, min(len(items), i + size)) for i in range(0, len(items), size)]
    total, step = len(batches) * len(config.methods), 0
    with (out / RESULTS).open("a", encoding="utf-8") as sink:
        for index, chunk in enumerate(batches):
            todo = [m for m in config.methods if (index, m) not in done]
            step += len(config.methods) - len(todo)
            if not todo:
                continue
            group = [items[i] for i in chunk]
            right = answers_right(vlm, group)
            inputs = vlm.prepare([it.image for it in group], [it.prompt for it in group])
            target = _frozen(vlm, inputs)
            evidence = [it.mask for it in group]
            scored = tuple(m if ok else None for m, ok in zip(evidence, right))
            for key in todo:
                started = time.perf_counter()
                method = _explainer(key, config, chunk.start, evidence)
                case = Case(vlm, inputs, target, method(vlm, inputs, target), method, scored)
                values, seconds = {}, {"explain": time.perf_counter() - started}
                for name, metric in metrics.items():
                    if chunk.start >= config.subsets.get(name, len(items)):
                        continue
                    tick = time.perf_counter()
                    try:
                        scores = metric(case)
                    except NotApplicableError as err:  # e.g. ROAD on flattened patches
                        warnings.warn(f"{name} skipped on {vlm.name}: {err}", stacklevel=2)
                        continue
                    values[name] = [None if np.isnan(v) else float(v) for v in scores]
                    seconds[name] = time.perf_counter() - tick
                record = {
                    "batch": index,
                    "method": key,
                    "items": list(chunk),
                    "correct": right,
                    "values": values,
                    "seconds": {k: round(v, 3) for k, v in seconds.items()},
                }
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                done[(index, key)] = record
                step += 1
                if progress:
                    progress(step, total, key)
    return aggregate(done.values(), config)


def aggregate(records: Any, config: BenchConfig) -> list[MetricResult]:
    """Per (method, metric) the scores of every item, as ``MetricResult``s."""
    import mmscope.metrics  # noqa: F401  (registers the metrics)
    from mmscope.core.registry import REGISTRY

    values: dict[tuple[str, str], list[float]] = {}
    for rec in sorted(records, key=lambda r: (r["method"], r["batch"])):
        for name, vals in rec["values"].items():
            values.setdefault((rec["method"], name), []).extend(
                np.nan if v is None else v for v in vals
            )
    results = []
    for method in config.methods:
        for name in config.metrics:
            vals = values.get((method, name))
            if not vals or all(np.isnan(vals)):
                continue
            cls = REGISTRY.get(name, kind="metric").obj
            results.append(
                MetricResult(name, method, tuple(vals), cls.category, cls.higher_is_better)
            )
    return results
