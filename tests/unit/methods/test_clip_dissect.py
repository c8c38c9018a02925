"""CLIP-Dissect (Oikarinen & Weng 2023): soft-WPMI by hand, a planted red-patch neuron, and
the labelling accuracy on toy-clip against the world's concepts."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import capture, patch
from mmscope.core.state import model_state
from mmscope.methods.neuron.clip_dissect import soft_wpmi, top_lift
from mmscope.methods.study import study
from mmscope.world import COLORS
from mmscope.world.items import world_items


def test_soft_wpmi_by_hand():
    sim = np.array([[0.3, 0.1], [0.0, 0.2], [0.25, 0.05]])  # 3 images, 2 concepts
    acts = np.array([[3.0], [1.0], [2.0]])  # one unit: top-2 images are 0 then 2
    got = soft_wpmi(sim, acts, top_k=2, alpha=10.0, p_start=0.998, p_end=0.97)

    def p(i, t):  # p(t | x_i) = softmax(10 sim)
        e = [math.exp(10 * s) for s in sim[i]]
        return e[t] / sum(e)

    weights = [0.998, 0.998 - 0.5 * (0.998 - 0.97)]  # falls linearly by rank
    for t in range(2):
        given = sum(
            math.log(1 + w * (p(i, t) - 1) + 1e-7) for w, i in zip(weights, (0, 2), strict=True)
        )
        prior = math.log(sum(p(i, t) + 1e-7 for i in range(3)) / 3)
        assert got[0, t] == pytest.approx(given - prior, rel=1e-9)
    assert got[0].argmax() == 0  # images 0 and 2 lean to concept 0


def test_top_lift_by_hand():
    acts = np.array([[5.0], [4.0], [1.0], [0.0]])
    present = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 1, 1]], dtype=bool)
    lift = top_lift(acts, present, top_k=2)
    # concept 0: 2/2 - 2/4; concept 1: 1/2 - 2/4; concept 2 always present: NaN
    np.testing.assert_allclose(lift[0, :2], [0.5, 0.0])
    assert np.isnan(lift[0, 2])


@contextmanager
def planted_red(vlm, items, site, unit):
    """``unit`` reads 5 x each patch's share of pixels within 60 of the world's red (from the
    pixels); batch rows are matched to items by their clean activations."""
    bank, reds = [], []
    red = np.array(COLORS["red"], dtype=float)
    for it in items:
        with torch.no_grad(), capture(vlm, site) as cap:
            vlm.forward(vlm.prepare([it.image], [it.prompt]))
        bank.append(cap[site][0].float())
        px = np.asarray(it.image.convert("RGB"), dtype=float)
        close = (np.linalg.norm(px - red, axis=-1) < 60).astype(float)
        side = close.shape[0] // 6  # toy-clip: 48 px, 6 x 6 patches of 8 px
        reds.append(torch.tensor(close.reshape(6, side, 6, side).mean((1, 3)).ravel()))
    bank_t = torch.stack(bank)

    def fn(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        for b in range(out.shape[0]):
            i = int((bank_t - out[b].float()).abs().flatten(1).max(1).values.argmin())
            out[b, 1:, unit] = 5 * reds[i].to(out)
        return out

    with patch(vlm, {site: fn}):
        yield


@pytest.mark.filterwarnings("ignore:.*tokenizer cannot spell")
def test_planted_red_neuron_on_toy_clip(toy_clip):
    items = world_items(100, seed=0, contrastive=True)
    # the last block's patch tokens never reach the class token: the embeddings stay clean
    site, unit = "vision.layer[3].mlp.act", 7
    before = model_state(toy_clip.model)
    with planted_red(toy_clip, items, site, unit):
        colours = study(
            "clip_dissect", toy_clip, items, sites=(site,), concepts=tuple(COLORS), top_k=10
        )
        full = study("clip_dissect", toy_clip, items, sites=(site,), top_k=10, template="a {}")
    assert model_state(toy_clip.model) == before
    index = list(colours.neurons).index((site, unit))
    assert colours.labels[index] == "red"
    # with every name in the vocabulary: "red square" (measured; the images with the most
    # red area hold large red squares, and the world's truth for this unit agrees)
    assert "red" in full.labels[index].split()
    assert full.table["truth"][index] in ("red", "red square")


def test_labelling_accuracy_on_toy_clip(toy_clip):
    items = world_items(200, seed=0, contrastive=True)
    with pytest.warns(UserWarning, match="cannot spell"):  # the styles
        result = study("clip_dissect", toy_clip, items, top_k=20, template="a {}")
    s = result.summary
    assert len(result) == s["units"] == 4 * 384 and s["scored_units"] == s["units"]
    # measured: agreement 0.443 (chance 0.071), sharing a word 0.829
    assert s["agreement"] > max(0.3, 4 * s["chance_agreement"])
    assert s["agreement_sharing_a_word"] > 0.7


def test_user_items_are_labelled_but_not_scored(tiny_clip):
    from PIL import Image

    from mmscope.world.items import BenchItem

    items = [
        BenchItem(Image.new("RGB", (32, 32), (i * 20, 0, 0)), "a red circle") for i in range(4)
    ]
    with pytest.warns(UserWarning, match="top_k"):
        result = study("clip_dissect", tiny_clip, items, concepts=("red", "blue", "circle"))
    assert len(result) == 2 * 64 and set(result.labels) <= {"red", "blue", "circle"}
    assert result.summary["agreement"] is None


def test_refuses_decoders_and_bad_settings(tiny_llava, tiny_clip):
    items = world_items(2, seed=0)
    with pytest.raises(NotApplicableError, match="CLIP"):
        study("clip_dissect", tiny_llava, items)
    with pytest.raises(InputError, match="pool"):
        study("clip_dissect", tiny_clip, items, pool="median")
    with pytest.raises(InputError, match="template"):
        study("clip_dissect", tiny_clip, items, template="a")
