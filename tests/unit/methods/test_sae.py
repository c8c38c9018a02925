"""Sparse autoencoders (Bricken et al. 2023): training on a planted sparse dictionary, the
safetensors round trip, the study on every architecture, and labelling a planted feature."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import capture, patch
from mmscope.core.state import model_state
from mmscope.methods.embedding.sae import SAEResult, load_sae, train_sae
from mmscope.methods.study import study
from mmscope.world import COLORS
from mmscope.world.items import world_items


def planted_dictionary(n: int = 3000, width: int = 24, atoms: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(atoms, width))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = (rng.random((n, atoms)) < 0.15) * rng.uniform(0.5, 1.5, (n, atoms))
    return codes @ dictionary, dictionary


def test_recovers_a_planted_dictionary():
    x, dictionary = planted_dictionary()
    weights, scale, curve = train_sae(x, 24, l1=1.0, lr=3e-3, epochs=30, batch_size=128)
    cos = dictionary @ weights["W_dec"].T  # decoder rows are unit norm
    np.testing.assert_allclose(np.linalg.norm(weights["W_dec"], axis=1), 1.0, atol=1e-5)
    # measured: every atom has a decoder row at cosine >= 0.998
    assert cos.max(1).min() > 0.9
    assert curve["mse"][-1] < 0.2 * curve["mse"][0]  # loss decreases: 0.51 -> 0.028
    # measured L0 2.9 against the planted 1.8 active atoms per row; explained variance 0.98
    assert curve["l0"][-1] < 5 and curve["explained_variance"][-1] > 0.9
    # the reconstruction through encode/decode in raw units agrees with the curve
    result = SAEResult("x", weights, scale, curve)
    err = x - result.decode(result.encode(x))
    assert np.mean((err * scale) ** 2) == pytest.approx(curve["mse"][-1], rel=1e-3)


def test_seeded_and_l1_trades_sparsity():
    x, _ = planted_dictionary(n=600)
    a = train_sae(x, 24, l1=0.1, epochs=3, seed=5)
    b = train_sae(x, 24, l1=0.1, epochs=3, seed=5)
    np.testing.assert_array_equal(a[0]["W_enc"], b[0]["W_enc"])
    sparse = train_sae(x, 24, l1=3.0, epochs=3, seed=5)
    assert sparse[2]["l0"][-1] < a[2]["l0"][-1]


def test_save_and_load_round_trip(tmp_path):
    x, _ = planted_dictionary(n=300)
    weights, scale, curve = train_sae(x, 16, epochs=2)
    result = SAEResult("vision.layer[-2]", weights, scale, curve, {"l1": 1.0})
    json_path = result.save(tmp_path / "sae_train.json")
    result.save(tmp_path / "sae_train.png")
    assert (tmp_path / "sae_train.safetensors").is_file()
    assert json.loads(json_path.read_text())["features"] == 16
    for where in (json_path, tmp_path / "sae_train.safetensors", tmp_path):
        loaded = load_sae(where)
        assert loaded.site == result.site and loaded.scale == result.scale
        for k, v in weights.items():
            np.testing.assert_array_equal(loaded.weights[k], v)
        assert loaded.curve == json.loads(json.dumps(curve))
        np.testing.assert_allclose(loaded.encode(x), result.encode(x))
    with pytest.raises(InputError):
        load_sae(tmp_path / "missing.json")


def test_sae_train_study(any_vlm):
    items = world_items(4, seed=0, contrastive=any_vlm.contrastive)
    before = model_state(any_vlm.model)
    group = "image"
    if any_vlm.capabilities.images_in == "cross_attention":  # Mllama: no image rows in the LM
        with pytest.raises(NotApplicableError, match="cross-attention"):
            study("sae_train", any_vlm, items, epochs=2, expansion=2)
        group = "text"
    with torch.no_grad():  # training enables grad for itself only
        result = study("sae_train", any_vlm, items, epochs=2, expansion=2, group=group)
        assert not torch.is_grad_enabled()
    assert model_state(any_vlm.model) == before
    site = "vision.layer[-2]" if any_vlm.contrastive else "lm.layer[1]"
    assert result.site == site and len(result.curve["mse"]) == 2
    assert result.weights["W_dec"].shape[0] == 2 * result.weights["W_dec"].shape[1]
    with pytest.raises(InputError):
        study("sae_train", any_vlm, items, group="nowhere")


def test_sae_label_finds_a_planted_feature(tiny_clip):
    """Residual dimension 3 at vision.layer[0] is set to each patch's red share (from the
    pixels); an SAE whose feature 5 reads that dimension must be labelled red."""
    items = world_items(40, seed=0, contrastive=True)
    site, dim, width = "vision.layer[0]", 3, 32
    bank, reds = [], []
    red = np.array(COLORS["red"], dtype=float)
    for it in items:
        with torch.no_grad(), capture(tiny_clip, site) as cap:
            tiny_clip.forward(tiny_clip.prepare([it.image], [it.prompt]))
        bank.append(cap[site][0].float())
        px = np.asarray(it.image.convert("RGB"), dtype=float)
        close = (np.linalg.norm(px - red, axis=-1) < 60).astype(float)  # 48 px, 4 x 4 grid
        reds.append(torch.tensor(close.reshape(4, 12, 4, 12).mean((1, 3)).ravel()))
    bank_t = torch.stack(bank)

    def fn(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        for b in range(out.shape[0]):
            i = int((bank_t - out[b].float()).abs().flatten(1).max(1).values.argmin())
            out[b, 1:, dim] = 10 * reds[i].to(out)
        return out

    rng = np.random.default_rng(0)
    w_dec = rng.normal(size=(8, width)).astype(np.float32)
    w_dec[5] = np.eye(width, dtype=np.float32)[dim]
    weights = {"W_enc": w_dec.T.copy(), "b_enc": np.zeros(8, np.float32), "W_dec": w_dec}
    weights["b_dec"] = np.zeros(width, np.float32)
    sae = SAEResult(site, weights, 1.0)
    with patch(tiny_clip, {site: fn}):
        result = study("sae_label", tiny_clip, items, sae=sae, quantile=0.9)
    assert set(result.table["site"]) == {"sae:vision.layer[0]"}
    row = result.table["unit"].tolist().index(5)
    # measured: IoU 0.78; the best random feature 0.63
    assert result.table["label"][row] == "red" and result.table["iou"][row] > 0.7
    others = np.delete(result.table["iou"], row)
    assert others.max() < result.table["iou"][row] - 0.1
    with pytest.raises(InputError, match="SAE"):
        study("sae_label", tiny_clip, items)
