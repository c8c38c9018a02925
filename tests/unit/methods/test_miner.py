"""MINER: the five scores by hand on two tokens, the selection on a planted example, the
streamed per-item scores against ``collect`` + numpy, and on toy-llava."""

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.methods.activations import collect
from mmscope.methods.neuron.miner import item_scores, miner_select
from mmscope.methods.study import study
from mmscope.world.items import world_items


def _minmax(v):
    v = np.asarray(v, dtype=float)
    return (v - v.min()) / (v.max() - v.min())


def test_item_scores_by_hand():
    a = np.array([[1.0, -1.0, 0.0], [3.0, 2.0, 0.0]])  # 2 tokens x 3 neurons
    s = np.array([[0.0, 1.0], [0.5, 0.0]])  # attention (queries x keys)
    got = item_scores(torch.tensor(a), torch.tensor(s)).numpy()
    assert got[0] == pytest.approx([1.0, 0.5, 0.0])  # share > 0: 1, 1/2, 0
    assert got[1] == pytest.approx([1.0, 0.25, 0.0])  # mean 2, 1/2, 0
    assert got[2] == pytest.approx([1.0, 2 / 3, 0.0])  # max 3, 2, 0
    e = np.exp(s)
    k = e / e.sum(axis=0, keepdims=True)  # softmax over the queries of each key
    w = k.sum(axis=1)  # weight of each query token
    assert got[3] == pytest.approx(_minmax(w @ a))
    q = e / e.sum(axis=1, keepdims=True)  # softmax over the keys of each query
    assert got[4] == pytest.approx(_minmax(q.sum(axis=0) @ a))
    assert np.all(item_scores(torch.ones(2, 3), None).numpy() == 0)  # constant: 0, not NaN


def test_selection_on_a_planted_example():
    scores = np.zeros((2, 5, 4))  # (image, text) x 5 scores x 4 neurons
    scores[0, :, 0] = 1.0  # neuron 0: every image score high
    scores[1, :, 3] = 0.9  # neuron 3: every text score high
    scores[:, :, 1] = 0.3  # neuron 1: middling on both
    scores[1, 3, 2] = 0.5  # neuron 2: only attn_k on text, a weight-0.5 score
    weighted, kept, best = miner_select(scores, (0, 0.25, 0.25, 0.5, 0), share=0.5)
    assert weighted[:, 0] == pytest.approx([1.0, 0.0])
    assert weighted[:, 2] == pytest.approx([0.0, 0.25])
    assert kept.tolist() == [0, 3] and best.tolist() == [0, 1]
    _, kept, best = miner_select(scores, (0, 0.25, 0.25, 0.5, 0), share=0.75)
    assert kept.tolist() == [0, 3, 1]  # 0.6 for neuron 1 beats 0.25 for neuron 2


def test_streamed_scores_agree_with_collect(tiny_llava):
    items = world_items(3)
    r = study(
        "miner",
        tiny_llava,
        items,
        weights=(0.2, 0.3, 0.5, 0, 0),
        share=0.05,
        batch_size=2,
        progress=False,
    )
    sites = r.neurons.settings["sites"]
    acts = collect(tiny_llava, items, sites)
    for site in sites:
        a = acts[site]
        rows = r.table["site"] == site
        for modality, groups in (("image", ["image"]), ("text", ["text", "last"])):
            per_item = []
            for i in range(3):
                x = a.values[(a.item == i) & np.isin(a.group, groups)]
                per_item.append([_minmax((x > 0).mean(0)), _minmax(x.mean(0)), _minmax(x.max(0))])
            want = np.mean(per_item, axis=0)
            for k, metric in enumerate(("prob", "mean", "max")):
                np.testing.assert_allclose(
                    r.table[f"{metric}_{modality}"][rows], want[k], atol=1e-5, err_msg=metric
                )
            score = 0.2 * want[0] + 0.3 * want[1] + 0.5 * want[2]
            np.testing.assert_allclose(r.table[f"score_{modality}"][rows], score, atol=1e-5)
    assert len(r.neurons) == int(0.05 * len(r.table["site"]))
    assert set(r.neurons.labels) <= {"image", "text"}


def test_runs_with_attention_on_qwen2_vl_and_refuses_clip(tiny_qwen2_vl, tiny_clip):
    r = study("miner", tiny_qwen2_vl, world_items(2), progress=False)
    assert np.ptp(r.table["attn_k_image"]) > 0  # attention scores were read
    assert len(r.neurons) == int(0.02 * len(r.table["neuron"]))
    with pytest.raises(NotApplicableError):
        study("miner", tiny_clip, world_items(2, contrastive=True), progress=False)
    with pytest.raises(InputError):
        study("miner", tiny_qwen2_vl, world_items(2), weights=(1, 0), progress=False)


def test_toy_llava_modality_neurons_fire_on_their_modality(toy_llava):
    """Measured on 32 new items: MINER's 21 image neurons fire on image tokens more often
    than on text tokens (p_active difference 0.18 on average, positive for 90%); its 9 text
    neurons the other way round (-0.17, negative for all); over all neurons it is -0.01."""
    r = study("miner", toy_llava, world_items(32), progress=False)
    assert len(r.neurons) == int(0.02 * len(r.table["neuron"]))
    stats = study("neuron_stats", toy_llava, world_items(32, seed=11), top_k=0, progress=False)
    image, text = stats.group("image"), stats.group("text")

    def diff(site, unit):
        return stats.p_active(site)[image, unit] - stats.p_active(site)[text, unit]

    base = np.mean([diff(s, u) for s in stats.sites for u in range(stats.active[s].shape[1])])
    d_image = np.array([diff(s, u) for s, u in r.neurons.with_label("image").neurons])
    d_text = np.array([diff(s, u) for s, u in r.neurons.with_label("text").neurons])
    assert len(d_image) >= 5 and len(d_text) >= 3
    assert d_image.mean() > base + 0.1 and (d_image > 0).mean() >= 0.75
    assert d_text.mean() < base - 0.1 and (d_text < 0).mean() >= 0.75
