"""Linear probes with control tasks (Hewitt & Liang 2019): selectivity on synthetic features
worked out by hand, the image-grouped folds as a leak guard, agreement with scikit-learn's
``cross_val_score`` on the same arrays, and colour at object patches of toy-clip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.state import model_state
from mmscope.methods.activations import collect
from mmscope.methods.embedding.probes import Probe, ProbeResult, control_labels, probe_accuracy
from mmscope.methods.study import study
from mmscope.world import patch_objects
from mmscope.world.items import BenchItem, world_items
from mmscope.world.render import Rendered


def _onehot(index: np.ndarray, width: int) -> np.ndarray:
    return np.eye(width)[index]


def test_control_task_is_one_random_label_per_type_from_the_label_distribution():
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b", "c"], size=4000, p=[0.6, 0.3, 0.1])
    types = rng.integers(0, 1000, size=4000)
    ctl = control_labels(labels, types, seed=1)
    for t in np.unique(types):
        assert len(set(ctl[types == t].tolist())) == 1  # the type decides the control label
    per_type = np.array([ctl[types == t][0] for t in np.unique(types)])
    shares = [np.mean(per_type == v) for v in ("a", "b", "c")]
    assert np.allclose(shares, [0.6, 0.3, 0.1], atol=0.05)  # drawn from the labels' shares
    assert np.array_equal(ctl, control_labels(labels, types, seed=1))  # seeded


def test_selectivity_by_hand_on_synthetic_features():
    rng = np.random.default_rng(0)
    n_images, per_image = 40, 10
    groups = np.repeat(np.arange(n_images), per_image)
    types = rng.integers(0, 12, size=len(groups))  # recur across images, like patch indices
    # (1) features that encode the label and nothing of the type: accuracy 1, control only
    # what the label happens to say of the random per-type labels -> high selectivity
    labels = rng.integers(0, 2, size=len(groups))
    x = _onehot(labels, 2) + 0.01 * rng.normal(size=(len(groups), 2))
    ctl = control_labels(labels.astype(str), types, seed=0)
    acc = probe_accuracy(x, labels.astype(str), groups, folds=5)
    control = probe_accuracy(x, ctl, groups, folds=5)
    assert acc == 1.0
    majority = max(np.mean(ctl == v) for v in set(ctl.tolist()))
    assert control <= majority + 0.05 and acc - control >= 0.3
    # (2) features that encode the type, labels a function of the type (as a word's part of
    # speech): the control task is memorised as well as the task -> selectivity 0
    word_label = rng.integers(0, 3, size=12)[types].astype(str)
    x = _onehot(types, 12) + 0.01 * rng.normal(size=(len(groups), 12))
    assert probe_accuracy(x, word_label, groups, folds=5) == 1.0
    assert probe_accuracy(x, control_labels(word_label, types, seed=3), groups, folds=5) == 1.0


def test_folds_grouped_by_image_guard_against_leaks():
    """Per-image features with a per-image random label: an ungrouped split memorises
    images (the leak); image-grouped folds leave the probe at chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_score

    rng = np.random.default_rng(1)
    n_images, per_image = 60, 8
    groups = np.repeat(np.arange(n_images), per_image)
    x = np.repeat(rng.normal(size=(n_images, 128)), per_image, axis=0)
    x += 0.05 * rng.normal(size=x.shape)
    y = np.repeat(rng.integers(0, 2, size=n_images), per_image).astype(str)
    leaky = cross_val_score(
        LogisticRegression(max_iter=2000), x, y, cv=KFold(5, shuffle=True, random_state=0)
    ).mean()
    assert leaky > 0.95  # measured 1.0
    assert probe_accuracy(x, y, groups, folds=5) < 0.7  # measured 0.46
    # a group with its rows in both training and test is impossible in GroupKFold
    from sklearn.model_selection import GroupKFold

    for train, test in GroupKFold(5).split(x, y, groups):
        assert not set(groups[train]) & set(groups[test])


@pytest.fixture(scope="module")
def clip_items():
    return world_items(16, seed=3, contrastive=True)


def test_probe_agrees_with_cross_val_score_by_hand(tiny_clip, clip_items):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    before = model_state(tiny_clip.model)
    res = study("probe", tiny_clip, clip_items, layers=(1,), concepts=("color",), folds=3)
    assert model_state(tiny_clip.model) == before
    assert isinstance(res, ProbeResult) and res.stack == "vision.layer" and res.layers == (1,)
    acts = collect(tiny_clip, clip_items, "vision.layer[1]", ("image",))["vision.layer[1]"]
    keep, y = [], []
    for r, (i, p) in enumerate(zip(acts.item, acts.patch)):
        item = clip_items[int(i)]
        ids = patch_objects(Rendered(item.image, item.objects), acts.grid[int(i)], 0.5).ravel()
        if ids[p] >= 0:
            keep.append(r)
            y.append(item.scene.objects[ids[p]].color)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = GroupKFold(3)
    expected = cross_val_score(pipe, acts.values[keep], y, groups=acts.item[keep], cv=cv).mean()
    got = res.at("color", "object")
    assert got["accuracy"][0] == pytest.approx(expected)
    assert res.rows[0, res.kinds.index("object")] == len(keep)
    assert got["selectivity"][0] == pytest.approx(got["accuracy"][0] - got["control"][0])
    table = res.tables()["probes"]
    assert len({len(v) for v in table.values()}) == 1
    json.dumps(res.to_dict(), allow_nan=False)
    assert res.plot() is not None


def test_runs_on_every_architecture_or_says_why(any_vlm):
    items = world_items(10, seed=2, contrastive=any_vlm.contrastive)
    before = model_state(any_vlm.model)
    res = Probe(folds=2, concepts=("color", "count"), min_cover=0.25)(any_vlm, items)
    assert model_state(any_vlm.model) == before
    assert res.accuracy.shape == (len(res.layers), 2, len(res.kinds))
    if any_vlm.capabilities.images_in == "cross_attention":  # Mllama: no image rows in the LM
        assert res.kinds == ("last",)
        res = Probe(stack="vision.layer", folds=2, concepts=("color",))(any_vlm, items)
    assert "object" in res.kinds
    if any_vlm.name == "tiny-qwen2-vl":  # its vision tower packs every image in one sequence
        with pytest.raises(NotApplicableError):
            Probe(stack="vision.layer", folds=2)(any_vlm, items)


def test_refuses_items_without_scenes_and_bad_settings(tiny_llava):
    with pytest.raises(InputError, match="known scenes"):
        Probe()(tiny_llava, [BenchItem(it.image, it.prompt, it.answer) for it in world_items(4)])
    for bad in ({"concepts": ("size",)}, {"stack": "text.layer"}, {"folds": 1}, {"c": 0.0}):
        with pytest.raises(InputError):
            Probe(**bad)
    with pytest.raises(InputError):
        Probe(layers=(7,))(tiny_llava, world_items(4))


def test_colour_is_decodable_and_selective_at_object_patches_of_toy_clip(toy_clip):
    items = world_items(60, seed=11, contrastive=True)
    res = study("probe", toy_clip, items, concepts=("color", "position"))
    colour = res.at("color", "object")
    # measured (seed 11, 60 images, 412 object patches): accuracy 1.0 at every layer,
    # control 0.38-0.43, selectivity 0.57-0.62
    assert np.all(colour["accuracy"] > 0.9)
    assert np.all(colour["selectivity"] > 0.3)
    # the quadrant: measured 0.88-0.97, selectivity 0.40-0.48
    assert np.all(res.at("position", "object")["accuracy"] > 0.7)


def test_row_labels_follow_the_scene():
    from mmscope.methods.embedding.concepts import row_labels
    from mmscope.world import Scene, WorldObject, render

    scene = Scene((WorldObject("square", "red", "large", "top left"),))
    r = render(scene, 48)
    item = BenchItem(r.image, "what color is the square ?", "red", None, "color", scene,
                       r.masks, (0,))  # fmt: skip
    patches = np.arange(36)
    rows_item = np.zeros(38, dtype=int)
    group = np.array(["image"] * 36 + ["last", "text"], dtype=object)
    patch = np.r_[patches, -1, -1]
    for concept, want in (("color", "red"), ("position", "top left")):
        labels, kinds, types = row_labels([item], rows_item, group, patch, [(6, 6)], concept)
        covered = patch_objects(r, (6, 6), 0.5).ravel() == 0
        assert covered.sum() >= 4 and set(labels[:36][covered]) == {want}
        assert set(kinds[:36][covered]) == {"object"} and set(kinds[:36][~covered]) == {""}
        assert types[int(np.flatnonzero(covered)[0])] == f"patch {np.flatnonzero(covered)[0]}"
        assert labels[36] == want and kinds[36] == "last" and kinds[37] == ""
        # every covered patch lies in the top-left quadrant of the 6x6 grid
        assert np.all(np.flatnonzero(covered) // 6 < 3) and np.all(np.flatnonzero(covered) % 6 < 3)
    labels, kinds, _ = row_labels([item], rows_item, group, patch, [(6, 6)], "count")
    assert labels[36] == "1" and set(kinds[:36]) == {""}


def test_colour_is_decodable_and_selective_at_object_patches_of_toy_llava(toy_llava):
    # the retrained toy-llava (question first, training.json "question_first": true)
    items = world_items(60, seed=11)
    res = study("probe", toy_llava, items, concepts=("color",))
    assert res.stack == "lm.layer"
    colour = res.at("color", "object")
    # measured (seed 11, 60 images, 412 object patches): accuracy 1.0 at every layer,
    # control 0.29-0.32, selectivity 0.68-0.71
    assert np.all(colour["accuracy"] > 0.9)
    assert np.all(colour["selectivity"] > 0.3)
