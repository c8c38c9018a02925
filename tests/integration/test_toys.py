"""The shipped toys load offline and do their jobs on held-out world data.

The full measurement (2,000 questions) is `mmscope toys eval --json`; these tests use
smaller held-out samples with margins, so they stay quick and still fail on a broken toy.
"""

import json
from pathlib import Path

import pytest

import mmscope
from mmscope.models.loading import toy_path
from mmscope.toys.evaluate import eval_clip, eval_llava

pytestmark = pytest.mark.slow

MAX_TOY_BYTES = 20 * 1024 * 1024


def test_toys_are_small_and_safetensors_only():
    total = 0
    for name in ("toy-llava", "toy-clip"):
        folder = toy_path(name)
        files = list(folder.iterdir())
        assert any(f.suffix == ".safetensors" for f in files)
        assert not any(f.suffix in (".bin", ".pt", ".pth", ".pkl") for f in files)
        total += sum(f.stat().st_size for f in files)
        recipe = json.loads((folder / "training.json").read_text())
        assert recipe["recipe"]["seed"] == 0
    assert total <= MAX_TOY_BYTES


def test_toy_llava_answers_held_out_questions():
    """The foundation issue's target is 0.95 overall and 0.90 per type on 2,000 held-out
    questions: measured 0.964, every type >= 0.935 (`mmscope toys eval`). On these 400
    (80 a type) measured 0.9625, every type >= 0.9375; the bounds leave room for sampling."""
    result = eval_llava(mmscope.load("toy-llava"), n=400, n_captions=100)
    assert result["accuracy"] >= 0.94, result
    assert min(result["by_type"].values()) >= 0.88, result
    # the co-occurrence prior shows up in captions (measured CHAIR_i 0.057), without dominating
    assert 0.0 < result["chair_i"] < 0.15, result


def test_toy_clip_zero_shot_and_retrieval():
    result = eval_clip(mmscope.load("toy-clip"), n=200)
    assert result["zero_shot_shape"] >= 0.9 and result["zero_shot_color"] >= 0.9, result
    assert result["retrieval_top1"] >= 0.7, result


def test_toy_llava_vision_tower_comes_from_toy_clip_recipe():
    llava = json.loads(Path(toy_path("toy-llava"), "config.json").read_text())
    clip = json.loads(Path(toy_path("toy-clip"), "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "patch_size", "image_size"):
        assert llava["vision_config"][key] == clip["vision_config"][key]
