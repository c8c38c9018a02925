"""Sparse autoencoders on one site's activations (Bricken et al. 2023, "Towards
Monosemanticity"; Cunningham et al. 2023, "Sparse Autoencoders Find Highly Interpretable
Features in Language Models").

f = ReLU((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec; loss = mean over rows of
||x - x_hat||^2 + l1 ||f||_1; decoder rows kept at unit norm (their gradient's component along
themselves removed before each Adam step, renormalised after it, as Bricken et al.). Inputs
are scaled by one constant so that their mean norm is sqrt(width); b_dec starts at the data
mean (Bricken et al. use the geometric median), W_enc at W_dec transposed. Seeded: one
``torch.Generator`` draws the initialisation and the batches; no global RNG is touched.

Saved as ``<name>.json`` (settings, curve) beside ``<name>.safetensors`` (weights, with the
site and scale in its metadata); never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.registry import register
from mmscope.core.validate import number, positive_int, valid_seed
from mmscope.methods.activations import GROUPS, collect
from mmscope.methods.analysis import Result, jsonable, new_figure
from mmscope.methods.study import KIND, Study

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem

WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass(frozen=True, eq=False)
class SAEResult(Result):
    """A trained sparse autoencoder and its training curve.

    Attributes:
        site: the site it reads, e.g. ``"vision.layer[-2]"``.
        weights: ``W_enc (width, features)``, ``b_enc``, ``W_dec (features, width)``,
            ``b_dec``, float32, in the scaled input space.
        scale: inputs are multiplied by it before encoding.
        curve: per epoch, over all rows: ``mse`` (per element, scaled space), ``l0`` (mean
            active features per row), ``explained_variance``, ``dead`` (features never active).
        settings: the training settings.
    """

    site: str
    weights: dict[str, np.ndarray] = field(repr=False)
    scale: float = 1.0
    curve: dict[str, list[float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> int:
        return int(self.weights["W_dec"].shape[0])

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Feature activations ``(rows, features)`` of raw activations ``x (rows, width)``."""
        w = self.weights
        pre = (np.asarray(x, dtype=np.float32) * self.scale - w["b_dec"]) @ w["W_enc"]
        return np.maximum(pre + w["b_enc"], 0.0)

    def decode(self, f: np.ndarray) -> np.ndarray:
        """Reconstruction in the raw activations' units."""
        return (f @ self.weights["W_dec"] + self.weights["b_dec"]) / self.scale

    def to_dict(self) -> dict[str, Any]:
        final = {k: v[-1] for k, v in self.curve.items() if v and k != "epoch"}
        return {
            "site": self.site,
            "width": int(self.weights["W_dec"].shape[1]),
            "features": self.features,
            "scale": self.scale,
            "final": final,
            "curve": self.curve,
            "settings": self.settings,
        }

    def plot(self, ax: Any = None) -> Any:
        """Reconstruction MSE and explained variance per epoch; L0 on a second axis."""
        fig, ax = new_figure(6, 3, ax)
        epochs = self.curve.get("epoch", [])
        ax.plot(epochs, self.curve.get("mse", []), label="MSE")
        ax.plot(epochs, self.curve.get("explained_variance", []), label="explained variance")
        ax.set_xlabel("epoch")
        ax.legend(loc="upper left", fontsize=7)
        twin = ax.twinx()
        twin.plot(epochs, self.curve.get("l0", []), color="gray", linestyle="--")
        twin.set_ylabel("L0 (gray)")
        ax.set_title(f"SAE at {self.site}: {self.features} features")
        return fig

    def save(self, path: str | Path) -> Path:
        """``.png``: the figure; otherwise the JSON and, beside it, ``.safetensors``."""
        path = Path(path)
        if path.suffix == ".png":
            return super().save(path)
        from safetensors.numpy import save_file

        json_path = path.with_suffix(".json")
        super().save(json_path)
        meta = {"site": self.site, "scale": repr(float(self.scale))}
        arrays = {k: np.ascontiguousarray(self.weights[k], dtype=np.float32) for k in WEIGHTS}
        save_file(arrays, str(path.with_suffix(".safetensors")), metadata=meta)
        return json_path


def load_sae(path: str | Path) -> SAEResult:
    """An SAE saved by ``SAEResult.save``: its ``.json``, its ``.safetensors`` or a folder
    holding one ``.safetensors``."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise InputError(f"{path} holds {len(found)} .safetensors files; name one")
        path = found[0]
    weights_path, json_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not weights_path.is_file():
        raise InputError(f"no SAE weights at {weights_path}")
    try:
        with safe_open(str(weights_path), framework="numpy") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in WEIGHTS}
        info = json.loads(json_path.read_text()) if json_path.is_file() else {}
        return SAEResult(
            meta["site"],
            weights,
            float(meta["scale"]),
            info.get("curve", {}),
            info.get("settings", {}),
        )
    except (KeyError, ValueError, OSError) as err:
        raise InputError(f"{weights_path} is not a saved SAE: {err}") from None


def _metrics(x: torch.Tensor, w: dict[str, torch.Tensor]) -> dict[str, float]:
    f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    err = x - (f @ w["W_dec"] + w["b_dec"])
    total = ((x - x.mean(0)) ** 2).sum()
    return {
        "mse": float((err**2).mean()),
        "l0": float((f > 0).float().sum(1).mean()),
        "explained_variance": float(1 - (err**2).sum() / total) if total > 0 else float("nan"),
        "dead": float(int((f.max(0).values <= 0).sum())),
    }


def train_sae(
    x: np.ndarray,
    features: int,
    l1: float = 1.0,
    lr: float = 1e-3,
    epochs: int = 20,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], float, dict[str, list[float]]]:
    """Train a ReLU SAE on rows ``x (rows, width)``: ``(weights, scale, curve)``."""
    data = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if data.dim() != 2 or len(data) < 2:
        raise InputError(
            f"an SAE needs at least two rows of vectors, got shape {tuple(data.shape)}"
        )
    norm = float(data.norm(dim=1).mean())
    scale = float(np.sqrt(data.shape[1]) / norm) if norm > 0 else 1.0
    data = data * scale
    gen = torch.Generator().manual_seed(seed)
    dec = torch.randn(features, data.shape[1], generator=gen)
    dec = dec / dec.norm(dim=1, keepdim=True)
    params = {
        "W_enc": dec.t().clone(),
        "b_enc": torch.zeros(features),
        "W_dec": dec,
        "b_dec": data.mean(0),
    }
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    curve: dict[str, list[float]] = {k: [] for k in ("epoch", "mse", "l0", "explained_variance")}
    curve["dead"] = []
    with torch.enable_grad():
        for epoch in range(1, epochs + 1):
            for idx in torch.randperm(len(data), generator=gen).split(batch_size):
                batch = data[idx]
                f = torch.relu((batch - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
                recon = f @ params["W_dec"] + params["b_dec"]
                loss = ((batch - recon) ** 2).sum(1).mean() + l1 * f.abs().sum(1).mean()
                opt.zero_grad()
                loss.backward()
                with torch.no_grad():
                    wd, g = params["W_dec"], params["W_dec"].grad
                    assert g is not None
                    g -= (g * wd).sum(1, keepdim=True) * wd
                opt.step()
                with torch.no_grad():
                    params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
            with torch.no_grad():
                curve["epoch"].append(float(epoch))
                for k, v in _metrics(data, params).items():
                    curve[k].append(v)
    return {k: v.detach().numpy().copy() for k, v in params.items()}, scale, curve


def default_site(vlm: VLM) -> str:
    """``vision.layer[-2]`` for dual encoders, else the residual after ``lm.layer[1]``."""
    return "vision.layer[-2]" if vlm.contrastive else "lm.layer[1]"


@register(
    "sae_train",
    kind=KIND,
    family="embedding/sae",
    paper="Bricken et al. 2023; Cunningham et al. 2023",
    level="model/embedding",
)
class SAETrain(Study):
    """Train a sparse autoencoder on one site's activations at one token group.

    Args:
        site: where to read (default ``vision.layer[-2]`` for CLIP, ``lm.layer[1]`` else).
        group: token group of the rows (``image`` by default).
        expansion: features per input dimension.
        l1: weight of the L1 penalty on the features.
        lr: Adam's learning rate.
        epochs: passes over the rows.
        batch_size: rows per step.
        seed: seeds the initialisation and the batches.
        items_batch: items per forward when collecting.
    """

    def __init__(
        self,
        site: str = "",
        group: str = "image",
        expansion: int = 4,
        l1: float = 1.0,
        lr: float = 1e-3,
        epochs: int = 20,
        batch_size: int = 256,
        seed: int = 0,
        items_batch: int = 16,
    ) -> None:
        if group not in GROUPS:
            raise InputError(f"group must be one of {GROUPS}, not {group!r}")
        self.site, self.group = str(site), group
        self.expansion = positive_int("expansion", expansion)
        self.l1 = number("l1", l1)
        self.lr = number("lr", lr)
        if self.l1 < 0 or self.lr <= 0:
            raise InputError("need l1 >= 0 and lr > 0")
        self.epochs = positive_int("epochs", epochs)
        self.batch_size = positive_int("batch_size", batch_size)
        self.seed = valid_seed(seed)
        self.items_batch = positive_int("items_batch", items_batch)

    def __call__(self, vlm: VLM, items: Sequence[BenchItem]) -> SAEResult:
        site = self.site or default_site(vlm)
        acts = collect(vlm, items, site, groups=(self.group,), batch_size=self.items_batch)[site]
        width = acts.values.shape[1] if acts.values.ndim == 2 else 0
        weights, scale, curve = train_sae(
            acts.values,
            self.expansion * max(width, 1),
            self.l1,
            self.lr,
            self.epochs,
            self.batch_size,
            self.seed,
        )
        settings = jsonable({**vars(self), "site": site, "rows": len(acts.values)})
        return SAEResult(site, weights, scale, curve, settings)
