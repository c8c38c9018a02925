"""Network dissection (Bau et al. 2017): IoU by hand, the world's concepts per patch, and a
planted red-patch neuron found and labelled "red"."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import capture, patch
from mmscope.core.state import model_state
from mmscope.methods.neuron.base import load_neuron_set
from mmscope.methods.neuron.dissect import iou, label_units
from mmscope.methods.study import read_table, study, write_table
from mmscope.world import COLORS, make_samples
from mmscope.world.items import BenchItem, item_scenes, world_items

N = 40


def redness(image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """Share of each patch's pixels within 60 of the world's red, row-major."""
    px = np.asarray(image.convert("RGB"), dtype=float)
    close = np.linalg.norm(px - np.array(COLORS["red"]), axis=-1) < 60
    rows, cols = grid
    r0 = np.arange(rows) * close.shape[0] // rows
    c0 = np.arange(cols) * close.shape[1] // cols
    sums = np.add.reduceat(np.add.reduceat(close.astype(float), r0, 0), c0, 1)
    sizes = np.outer(np.diff(np.append(r0, close.shape[0])), np.diff(np.append(c0, close.shape[1])))
    return (sums / sizes).ravel()


@contextmanager
def planted(vlm, items, site, unit):
    """Make ``unit`` at ``site`` read 5 x the red share of each patch, computed from the
    pixels. Each batch row is matched to its item by its clean activations (nearest)."""
    bank, reds = [], []
    for it in items:
        inputs = vlm.prepare([it.image], [it.prompt])
        with torch.no_grad(), capture(vlm, site) as cap:
            vlm.forward(inputs)
        bank.append(cap[site][0].float())
        reds.append(torch.tensor(redness(it.image, inputs.image_spans[0][0].grid)))
    bank_t = torch.stack(bank)

    def fn(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        for b in range(out.shape[0]):
            i = int((bank_t - out[b].float()).abs().flatten(1).max(1).values.argmin())
            first = out.shape[1] - len(reds[i])
            out[b, first:, unit] = 5 * reds[i].to(out)
        return out

    with patch(vlm, {site: fn}):
        yield


def test_iou_by_hand():
    fires = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool)
    concept = np.array([[1], [0], [1], [0]], dtype=bool)
    table, inter = iou(fires, concept)
    # unit 0: fires {0, 1}, concept {0, 2}: 1 / 3; unit 1: fires {1, 2}: 1 / 3
    np.testing.assert_allclose(table[:, 0], [1 / 3, 1 / 3])
    np.testing.assert_allclose(inter[:, 0], [1, 1])


def test_label_units_by_hand():
    values = np.array([[0.0, 3.0], [1.0, 2.0], [5.0, 0.0], [4.0, 1.0], [0.5, 2.5]])
    concepts = np.array([[0, 1], [0, 1], [1, 0], [1, 0], [0, 1]], dtype=bool)
    best, score, cut, p = label_units(values, concepts, quantile=0.5)
    # medians: 1.0 and 2.0; unit 0 fires on rows 2, 3 = concept 0 exactly; unit 1 on 0, 4
    np.testing.assert_allclose(cut, [1.0, 2.0])
    assert best.tolist() == [0, 1]
    np.testing.assert_allclose(score, [1.0, 2 / 3])
    assert p[0] == pytest.approx(0.1)  # hypergeometric: C(2,2) / C(5,2)


def test_item_scenes_are_the_world_items_own_and_foreign_images_are_refused():
    items = world_items(5, seed=0, contrastive=True)
    assert item_scenes(items) == [s.scene for s in make_samples(5, 0)]
    own = world_items(3, seed=7)
    assert item_scenes(own) == [s.scene for s in make_samples(3, 7)]
    assert item_scenes(own[:1], [own[2].scene]) == [own[2].scene]
    foreign = [BenchItem(Image.new("RGB", (48, 48), (1, 2, 3)), "a red circle")]
    with pytest.raises(InputError, match="scenes"):
        item_scenes(foreign)


@pytest.mark.parametrize("fixture", ["tiny_clip", "tiny_llava"])
def test_planted_red_neuron_is_labelled_red(fixture, request):
    vlm = request.getfixturevalue(fixture)
    items = world_items(N, seed=0, contrastive=vlm.contrastive)
    site, unit = "vision.layer[1].mlp.act", 7
    before = model_state(vlm.model)
    with planted(vlm, items, site, unit):
        result = study("network_dissection", vlm, items, sites=(site,), batch_size=8, quantile=0.9)
    assert model_state(vlm.model) == before
    red = dict(zip(result.neurons, zip(result.labels, result.scores)))
    label, score = red[(site, unit)]
    # measured: IoU 0.78 on both; the best random unit (colour-sensitive, also "red" on
    # tiny-clip) 0.54 and 0.51
    assert label == "red" and score > 0.7
    others = [s for (st, u), s in zip(result.neurons, result.scores) if u != unit]
    assert max(others) < score - 0.1
    assert result.table["p_value"][unit] < 1e-6


def test_every_unit_in_the_table_and_saved(tiny_clip, tmp_path):
    items = world_items(12, seed=0, contrastive=True)
    result = study("network_dissection", tiny_clip, items, quantile=0.9)
    width = tiny_clip.model.config.vision_config.intermediate_size
    assert len(result.table["unit"]) == 2 * width  # two layers
    labelled = result.table["labelled"]
    assert len(result) == labelled.sum()
    assert np.all(result.table["iou"][labelled] > 0.04)
    assert np.all(result.table["iou"][~labelled] <= 0.04)
    path = write_table(result.tables()["units"], tmp_path / "units.parquet")
    assert read_table(path)["label"].tolist() == list(result.table["label"])
    reloaded = load_neuron_set(result.save(tmp_path / "d.json"))
    assert reloaded.neurons == result.neurons and reloaded.labels == result.labels
    result.save(tmp_path / "d.png")


def test_lm_sites_and_qwen(tiny_qwen2_vl):
    items = world_items(6, seed=0)
    # Qwen2-VL's tower keeps no sequence per image: the default falls back to the LM's MLPs
    result = study("network_dissection", tiny_qwen2_vl, items)
    assert set(result.table["site"]) == {"lm.layer[0].mlp.act", "lm.layer[1].mlp.act"}
    with pytest.raises(NotApplicableError, match="one sequence per image"):
        study("network_dissection", tiny_qwen2_vl, items, sites=("vision.layer[0].mlp.act",))
    result = study("network_dissection", tiny_qwen2_vl, items, sites=("lm.layer[0].mlp.act",))
    assert set(result.table["site"]) == {"lm.layer[0].mlp.act"}


def test_user_items_without_scenes_raise(tiny_clip):
    items = [BenchItem(Image.new("RGB", (48, 48), (9, 9, 9)), "a red circle")]
    with pytest.raises(InputError, match="concept"):
        study("network_dissection", tiny_clip, items)
    with pytest.raises(InputError, match="quantile"):
        study("network_dissection", tiny_clip, items, quantile=1.5)


def test_toy_clip_dissection_labels_mostly_colours(toy_clip):
    # measured on these 100 items: 1222 / 1536 units labelled, 1162 above chance, 76% of the
    # labels colours, split-half agreement 0.64 (on 200 items: 1223, 1200, 80%, 0.73)
    items = world_items(100, seed=0, contrastive=True)
    result = study("network_dissection", toy_clip, items)
    s = result.summary
    assert s["labelled"] > 0.6 * s["units"]
    assert s["above_chance"] > 0.9 * s["labelled"]
    assert s["label_kinds"]["color"] > 0.6
    assert s["split_half_agreement"] > 0.5
