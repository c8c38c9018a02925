"""One result protocol: explanations, analysis and study results and metric results all have
``to_dict``, ``plot`` giving a matplotlib ``Figure``, ``save`` (strict JSON or PNG) and
``_repr_html_``."""

from __future__ import annotations

import json

import numpy as np
from matplotlib.figure import Figure

from mmscope.core.result import Result, jsonable
from mmscope.core.targets import Predicted
from mmscope.methods.attribution.gradient import Saliency
from mmscope.metrics.base import MetricResult
from mmscope.metrics.hallucination import HallucinationResult


def _results(tiny_llava, scene_image):
    exp = Saliency()(tiny_llava, tiny_llava.prepare(scene_image, "what color ?"), Predicted())
    metric = MetricResult("deletion", "saliency", (0.2, float("nan"), 0.4), "faithfulness", False)
    pope = HallucinationResult("pope", {"f1": 0.5, "yes_ratio": 0.25}, ({"answer": "yes"},))
    return exp, metric, pope


def test_every_result_draws_a_figure_and_saves_strict_json(tiny_llava, scene_image, tmp_path):
    for result in _results(tiny_llava, scene_image):
        assert isinstance(result, Result)
        assert isinstance(result.plot(), Figure)
        saved = json.loads(result.save(tmp_path / f"{type(result).__name__}.json").read_text())
        assert saved == json.loads(json.dumps(jsonable(result.record())))  # NaN as null
        assert result.save(tmp_path / f"{type(result).__name__}.png").stat().st_size > 0
        assert result._repr_html_().count("data:image/png;base64,") == 1


def test_what_save_keeps_per_item(tiny_llava, scene_image, tmp_path):
    exp, metric, pope = _results(tiny_llava, scene_image)
    assert json.loads(metric.save(tmp_path / "m.json").read_text())["values"] == [0.2, None, 0.4]
    assert json.loads(pope.save(tmp_path / "p.json").read_text())["per_item"] == [{"answer": "yes"}]
    back = json.loads(exp.save(tmp_path / "e.json").read_text())
    np.testing.assert_allclose(back["image_scores"][0][0], exp.image_scores[0][0], rtol=1e-6)
