"""POPE and CHAIR: hand-computed scores, the POPE JSONL reader, and a run on a tiny model."""

import json

import numpy as np
import pytest
from PIL import Image

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.registry import REGISTRY
from mmscope.metrics.hallucination import (
    Chair,
    HallucinationResult,
    Pope,
    chair_scores,
    load_pope_jsonl,
    pope_scores,
)


def test_pope_scores_by_hand():
    s = pope_scores(["yes", "Yes, there is", "no", "No."], ["yes", "no", "no", "yes"])
    assert s == {
        "accuracy": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "yes_ratio": 0.5,
        "n": 4,
    }
    s = pope_scores(["yes", "yes", "yes", "no"], ["yes", "yes", "no", "no"])
    assert s["accuracy"] == 0.75 and s["recall"] == 1.0 and s["yes_ratio"] == 0.75
    assert s["precision"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(0.8)


def test_pope_scores_without_a_yes_give_zero_not_a_crash():
    s = pope_scores(["no", "nope", "yesterday", ""], ["yes", "no", "yes", "no"])
    assert s["precision"] == s["recall"] == s["f1"] == s["yes_ratio"] == 0.0
    assert s["accuracy"] == 0.5


@pytest.mark.parametrize(
    "answers, truths", [(["yes"], ["yes", "no"]), ([], []), (["yes"], ["maybe"])]
)
def test_pope_scores_reject_bad_input(answers, truths):
    with pytest.raises(InputError):
        pope_scores(answers, truths)


def test_chair_scores_by_hand():
    captions = [
        "a red circle and a blue square",  # 2 mentions, blue square hallucinated
        "a green triangle",  # 1 mention, right
        "a red circle , a red circle and a blue cross",  # 3 mentions, all hallucinated
        "nothing here",  # no mentions
    ]
    present = [{"red circle"}, {"green triangle"}, set(), {"red circle"}]
    s = chair_scores(captions, present)
    assert s["chair_i"] == pytest.approx(4 / 6) and s["chair_s"] == 0.5
    assert (s["mentions"], s["hallucinated"], s["n"]) == (6, 4, 4)
    assert chair_scores([], [])["chair_i"] == 0.0


def _pope_file(tmp_path, lines):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.jpg")
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_pope_jsonl(tmp_path):
    path = _pope_file(
        tmp_path,
        [
            '{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?",'
            ' "label": "yes"}',
            "",
            '{"question_id": 2, "image": "a.jpg", "question": "Is there a cat?", "answer": "No"}',
        ],
    )
    items = load_pope_jsonl(path, tmp_path)
    assert [(i.question_id, i.label) for i in items] == [(1, "yes"), (2, "no")]
    assert items[1].text == "Is there a cat?" and items[0].image == tmp_path / "a.jpg"
    assert load_pope_jsonl(path)[0].image == tmp_path / "a.jpg"  # default: the file's folder


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"image": "a.jpg", "text": "Is there a dog?"', "line 2: not JSON"),
        ('{"image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}', "line 2: label"),
        ('{"image": "b.jpg", "text": "Is there a dog?", "label": "no"}', "does not exist"),
        ('{"image": "a.jpg", "label": "no"}', "line 2: needs"),
    ],
)
def test_load_pope_jsonl_names_file_and_line(tmp_path, line, message):
    good = '{"image": "a.jpg", "text": "Is there a dog?", "label": "yes"}'
    path = _pope_file(tmp_path, [good, line])
    with pytest.raises(InputError, match=message) as err:
        load_pope_jsonl(path)
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="cannot read"):
        load_pope_jsonl(tmp_path / "missing.jsonl")


def test_registered_as_hallucination_metrics():
    for key, cls, higher in (("pope", Pope, True), ("chair", Chair, False)):
        entry = REGISTRY.get(key, kind="metric")
        assert entry.obj is cls and entry.family == "metric/hallucination"
        assert cls.category == "hallucination" and cls.higher_is_better is higher
    with pytest.raises(InputError, match="split"):
        Pope(split="hard")


def test_pope_on_a_tiny_model(tiny_llava, tmp_path):
    from mmscope.core.state import model_state
    from mmscope.world import sample_scenes
    from mmscope.world.seeds import EVAL_SEED

    before = model_state(tiny_llava.model)
    result = Pope(n_images=8, batch_size=5)(tiny_llava)
    assert model_state(tiny_llava.model) == before
    assert isinstance(result, HallucinationResult) and result.metric == "pope"
    expected = sum(2 * min(3, len(s.objects)) for s in sample_scenes(8, EVAL_SEED))
    s = result.scores
    assert s["n"] == expected == len(result.per_item)
    assert 0 <= s["yes_ratio"] <= 1 and all(0 <= s[k] <= 1 for k in ("accuracy", "f1"))
    for key in ("accuracy", "f1"):
        lo, hi = result.ci[key]
        assert lo <= s[key] + 1e-9 and s[key] <= hi + 1e-9
    item = result.per_item[0]
    assert {"question", "label", "answer", "correct", "object"} <= set(item)
    assert np.mean([i["correct"] for i in result.per_item]) == pytest.approx(s["accuracy"])
    saved = json.loads(result.save(tmp_path / "pope.json").read_text())
    assert saved["accuracy"] == s["accuracy"] and len(saved["per_item"]) == expected
    assert saved["settings"]["split"] == "adversarial"
    assert result.plot() is not None


def test_pope_runs_user_probes_and_refuses_clip(tiny_llava, tiny_clip, tmp_path):
    path = _pope_file(
        tmp_path,
        [
            '{"image": "a.jpg", "text": "is there a red circle in the image ?", "label": "no"}',
            '{"image": "a.jpg", "text": "is there a blue cross in the image ?", "label": "no"}',
        ],
    )
    result = Pope()(tiny_llava, load_pope_jsonl(path))
    assert result.scores["n"] == 2 and result.settings["split"] == "data"
    with pytest.raises(NotApplicableError, match="contrastive"):
        Pope(n_images=1)(tiny_clip)


def test_chair_on_a_tiny_model(tiny_llava):
    result = Chair(n_images=4, max_new_tokens=6)(tiny_llava)
    assert result.scores["n"] == 4 and len(result.per_item) == 4
    assert 0 <= result.scores["chair_i"] <= 1 and 0 <= result.scores["chair_s"] <= 1
    assert set(result.to_dict()["ci"]) == {"chair_i", "chair_s"}
