"""neuron_stats: planted activations worked out by hand, agreement with ``collect`` + numpy,
resume from a checkpoint, mismatching checkpoints, bounded accumulators."""

import json

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import patch
from mmscope.core.state import model_state
from mmscope.methods.activations import collect
from mmscope.methods.neuron.stats import NeuronStats, NeuronStatsStudy
from mmscope.methods.study import read_table, study, write_table
from mmscope.world.items import world_items

FIELDS = ("count", "active", "total", "max", "top_values", "top_items", "top_positions")


class Planted(torch.nn.Module):
    """The act_fn with neurons 0-2 planted: always 1, always -1, the token's position."""

    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x):
        out = self.act(x).clone()
        out[..., 0] = 1.0
        out[..., 1] = -1.0
        out[..., 2] = torch.arange(x.shape[1], dtype=out.dtype)
        return out


def test_planted_neurons_by_hand(tiny_llava):
    items = world_items(3)
    mlp = tiny_llava.resolve("lm.layer[0].mlp")
    act = mlp.act_fn
    mlp.act_fn = Planted(act)
    try:
        r = study(
            "neuron_stats",
            tiny_llava,
            items,
            sites=("lm.layer[0].mlp.act",),
            top_k=2,
            batch_size=3,
            progress=False,
        )
    finally:
        mlp.act_fn = act
    inputs = tiny_llava.prepare([it.image for it in items], [it.prompt for it in items])
    mask = inputs.tensors["attention_mask"]
    pos = {"image": [], "text": [], "last": []}
    for b in range(3):  # the groups' positions, from the spans by hand
        pos["image"] += [(b, p) for p in inputs.image_spans[b][0].positions]
        pos["text"] += [(b, p) for p in range(*inputs.prompt_spans[b])]
        pos["last"] += [(b, int(mask[b].nonzero().max()))]
    site = "lm.layer[0].mlp.act"
    for name, rows in pos.items():
        g = r.group(name)
        p = np.array([q for _, q in rows], dtype=float)
        assert r.count[site][g] == len(rows)
        assert r.p_active(site)[g, :3].tolist() == [1.0, 0.0, pytest.approx(np.mean(p > 0))]
        assert r.mean(site)[g, :3] == pytest.approx([1.0, -1.0, p.mean()])
        assert r.max[site][g, :3].tolist() == [1.0, -1.0, p.max()]
        # neuron 2's top 2: the two items whose group reaches the furthest, at that position
        last = {b: max(q for bb, q in rows if bb == b) for b, _ in rows}
        best = sorted(last.items(), key=lambda bq: -bq[1])[:2]
        assert r.top_values[site][g, 2].tolist() == [float(q) for _, q in best]
        pad = [int(mask[b].nonzero().min()) for b in range(3)]  # positions count from there
        found = zip(r.top_items[site][g, 2].tolist(), r.top_positions[site][g, 2].tolist())
        assert all(last[b] - pad[b] == q for b, q in found)  # ties may go either way
    assert r.count[site][r.group("class")] == 0


@pytest.mark.parametrize("vlm", ["tiny_llava", "tiny_clip"])
def test_agrees_with_collect_and_numpy(vlm, request):
    vlm = request.getfixturevalue(vlm)
    items = world_items(5, contrastive=vlm.contrastive)
    domains = ["a", "b", "a", "b", "b"]
    r = study("neuron_stats", vlm, items, domains=domains, top_k=3, batch_size=2, progress=False)
    acts = collect(vlm, items, r.sites, batch_size=1)  # positions without padding
    dom = np.array(domains)
    for site in r.sites:
        a = acts[site]
        for name in r.groups:
            group, _, d = name.partition("@")
            keep = (a.group == group) & ((dom[a.item] == d) if d else True)
            x = a.values[keep]
            g = r.group(name)
            assert r.count[site][g] == len(x)
            if not len(x):
                continue
            np.testing.assert_allclose(r.p_active(site)[g], (x > 0).mean(0))
            np.testing.assert_allclose(r.mean(site)[g], x.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(r.max[site][g], x.max(0), rtol=1e-5, atol=1e-6)
            if not d:  # top-k: the k items with the largest activation, each its largest
                item = a.item[keep]
                best = np.stack([x[item == i].max(0) for i in np.unique(item)])
                top = -np.sort(-best, axis=0)[:3].T
                np.testing.assert_allclose(r.top_values[site][g], top, rtol=1e-5, atol=1e-6)
                found = r.top_values[site][g]
                at = np.array(
                    [
                        [x[(item == i) & (a.position[keep] == q), n][0] for i, q in zip(ii, qq)]
                        for n, (ii, qq) in enumerate(
                            zip(r.top_items[site][g], r.top_positions[site][g])
                        )
                    ]
                )
                np.testing.assert_allclose(at, found, rtol=1e-5, atol=1e-6)
    assert r.count[r.sites[0]][r.group("image@b")] == 3 * r.count[r.sites[0]][r.group("image")] // 5


def test_table_to_dict_and_plot(tiny_llava, tmp_path):
    r = study("neuron_stats", tiny_llava, world_items(2), progress=False)
    assert isinstance(r, NeuronStats)
    table = read_table(write_table(r.tables()["neurons"], tmp_path / "n.parquet"))
    width = r.active[r.sites[0]].shape[1]
    assert len(table["neuron"]) == len(r.sites) * 3 * width  # image, text, last (no class)
    row = (table["site"] == r.sites[1]) & (table["group"] == "text") & (table["neuron"] == 4)
    assert table["p_active"][row][0] == pytest.approx(r.p_active(r.sites[1])[1, 4])
    json.dumps(r.to_dict(), allow_nan=False)
    assert r.plot() is not None


def _arrays(r):
    return {(f, s): getattr(r, f)[s] for f in FIELDS for s in r.sites}


def test_resume_equals_an_uninterrupted_run(tiny_llava, tmp_path):
    items = world_items(5)
    kw = {"batch_size": 2, "save_every": 1, "progress": False}
    whole = study("neuron_stats", tiny_llava, items, **kw)
    path = tmp_path / "stats.ckpt"
    calls = []

    def fail_on_second_batch(h):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return h

    before = model_state(tiny_llava.model)
    with patch(tiny_llava, {"lm.layer[1]": fail_on_second_batch}):
        with pytest.raises(RuntimeError, match="interrupted"):
            study("neuron_stats", tiny_llava, items, checkpoint=path, **kw)
    assert model_state(tiny_llava.model) == before
    with np.load(path, allow_pickle=False) as saved:
        assert json.loads(str(saved["meta"]))["done"] == 2
    forwards = []
    with patch(tiny_llava, {"lm.layer[0]": lambda h: forwards.append(1) or h}):
        resumed = study("neuron_stats", tiny_llava, items, checkpoint=path, **kw)
    assert len(forwards) == 2  # items 2-3 and 4, not the first batch again
    for key, value in _arrays(whole).items():
        np.testing.assert_allclose(_arrays(resumed)[key], value, rtol=1e-6, err_msg=str(key))


def test_a_checkpoint_of_another_run_raises(tiny_llava, tmp_path):
    items = world_items(3)
    path = tmp_path / "stats.ckpt"
    study("neuron_stats", tiny_llava, items, checkpoint=path, progress=False)
    with pytest.raises(InputError, match="top_k"):
        study("neuron_stats", tiny_llava, items, checkpoint=path, top_k=2, progress=False)
    with pytest.raises(InputError, match="items"):
        study("neuron_stats", tiny_llava, world_items(4), checkpoint=path, progress=False)
    with pytest.raises(InputError, match="domains"):
        study("neuron_stats", tiny_llava, items, checkpoint=path, domains="xyz", progress=False)
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not an npz")
    with pytest.raises(InputError, match="not a neuron-stats checkpoint"):
        study("neuron_stats", tiny_llava, items, checkpoint=bad, progress=False)


def test_accumulators_do_not_grow_with_the_dataset(tiny_llava, tmp_path):
    small = study(
        "neuron_stats",
        tiny_llava,
        world_items(2),
        progress=False,
        batch_size=2,
        checkpoint=tmp_path / "a",
    )
    large = study(
        "neuron_stats",
        tiny_llava,
        world_items(6),
        progress=False,
        batch_size=2,
        checkpoint=tmp_path / "b",
    )
    for key, value in _arrays(small).items():
        assert _arrays(large)[key].shape == value.shape
    assert abs((tmp_path / "a").stat().st_size - (tmp_path / "b").stat().st_size) < 200
    assert large.count[large.sites[0]][0] == 3 * small.count[small.sites[0]][0]


def test_settings_and_keywords_are_checked(tiny_llava):
    for bad in ({"groups": ("pixels",)}, {"top_k": -1}, {"save_every": 0}, {"sites": (3,)}):
        with pytest.raises(InputError):
            NeuronStatsStudy(**bad)
    with pytest.raises(InputError, match="3 items"):
        study("neuron_stats", tiny_llava, world_items(3), domains=["a"], progress=False)
