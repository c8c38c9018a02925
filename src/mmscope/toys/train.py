"""Training the toy models on the world (``mmscope train-toy llava|clip``).

The recipe follows how real MLLMs are built: toy-clip is trained contrastively on captions
(Radford et al. 2021); its vision tower becomes toy-llava's (Liu et al. 2023), which is then
tuned on captions and balanced questions with the vision tower at a lower learning rate.
Seeded and reproducible on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, LlavaForConditionalGeneration

from mmscope.toys import build
from mmscope.toys.data import SceneBank, Vocab, clip_batch, llava_batch
from mmscope.world.questions import HARD_NEGATIVE_PROB
from mmscope.world.seeds import TRAIN_SEED

Progress = Callable[[str, int, int, float], None]


@dataclass(frozen=True)
class Recipe:
    """Every setting of a toy training run (saved next to the weights)."""

    seed: int = 0
    bank_size: int = 12000
    clip_steps: int = 2500
    clip_batch: int = 128
    clip_lr: float = 2e-3
    llava_steps: int = 4500
    llava_batch: int = 64
    llava_lr: float = 1e-3
    vision_lr_scale: float = 0.2
    caption_share: float = 0.2
    warmup: int = 100
    weight_decay: float = 0.01
    vision_feature_layer: int = -2
    existence_weight: float = 2.5
    hard_negative_ramp: float = 0.5
    #: The prompt before the image tokens (see ``build.QUESTION_FIRST_TEMPLATE``), so image
    #: tokens can attend to the question: this lifted existence from 0.51 to 0.96 (README).
    question_first: bool = True


def _schedule(
    opt: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _contrastive_loss(logits: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE where identical captions in a batch all count as positives."""
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=logits.dtype)
    target = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
        + torch.sum(-target * F.log_softmax(logits.t(), dim=1), dim=1).mean()
    )


def train_clip(recipe: Recipe, bank: SceneBank, progress: Progress | None = None) -> CLIPModel:
    """Contrastive training of toy-clip on the world's captions."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    tok = build.toy_tokenizer(for_clip=True)
    vocab = Vocab(tok)
    model = build.build_clip(len(tok))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.clip_lr, weight_decay=recipe.weight_decay)
    sched = _schedule(opt, recipe.warmup, recipe.clip_steps)
    for step in range(recipe.clip_steps):
        batch = clip_batch(bank, vocab, rng, recipe.clip_batch)
        captions = [" ".join(map(str, row.tolist())) for row in batch["input_ids"]]
        out = model(**batch)
        loss = _contrastive_loss(out.logits_per_image, captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress:
            progress("clip", step + 1, recipe.clip_steps, loss.item())
    model.eval()
    return model


def _per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over each example's answer tokens, then over examples:
    a one-word answer weighs as much as a 15-token caption (a token mean lets captions drown
    the questions)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(labels.shape)
    mask = labels != -100
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def train_llava(
    recipe: Recipe,
    bank: SceneBank,
    clip: CLIPModel | None = None,
    progress: Progress | None = None,
    device: str = "cpu",
) -> LlavaForConditionalGeneration:
    """Caption and question tuning of toy-llava, its vision tower taken from toy-clip
    (``device``: where to train, for recipe experiments; the shipped toys train on CPU)."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed + 1)
    tok = build.toy_tokenizer()
    vocab = Vocab(tok)
    model = build.build_llava(len(tok), recipe.vision_feature_layer)
    if clip is not None:
        model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.train().to(torch.device(device))
    vision = list(model.model.vision_tower.parameters())
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    scale = recipe.vision_lr_scale if clip is not None else 1.0
    groups: list[dict[str, Any]] = [
        {"params": rest},
        {"params": vision, "lr": recipe.llava_lr * scale},
    ]
    opt = torch.optim.AdamW(
        groups,
        lr=recipe.llava_lr,
        weight_decay=recipe.weight_decay,
    )
    sched = _schedule(opt, recipe.warmup, recipe.llava_steps)
    for step in range(recipe.llava_steps):
        ramp = min(1.0, step / max(1.0, recipe.hard_negative_ramp * recipe.llava_steps))
        batch = llava_batch(
            bank,
            vocab,
            rng,
            recipe.llava_batch,
            recipe.caption_share,
            recipe.existence_weight,
            ramp * HARD_NEGATIVE_PROB,
            recipe.question_first,
        )
        batch = {key: value.to(device) for key, value in batch.items()}
        labels = batch.pop("labels")
        loss = _per_example_loss(model(**batch).logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress:
            progress("llava", step + 1, recipe.llava_steps, loss.item())
    model.eval().to(torch.device("cpu"))
    return model


def save_toy(
    model: Any, which: str, out_dir: Path, info: dict[str, Any], question_first: bool = False
) -> Path:
    """Weights (safetensors), tokenizer, processor and the recipe into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor = (
        build.llava_processor(question_first=question_first)
        if which == "llava"
        else build.clip_processor()
    )
    processor.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def train_toys(
    which: str,
    out_root: Path,
    recipe: Recipe = Recipe(),
    progress: Progress | None = None,
) -> dict[str, Path]:
    """Train and save ``"clip"``, ``"llava"`` or ``"all"`` (both) under ``out_root``.

    toy-llava's vision tower starts from a toy-clip, as LLaVA starts from a pretrained CLIP:
    ``"all"`` trains it first; ``"llava"`` loads ``out_root/toy-clip`` when it is there and
    the shipped one otherwise, so each command stays within its time budget. The weights'
    SHA-256 of the toy-clip used is saved in toy-llava's ``training.json``, with the stage's
    ``seconds`` (rendering the scene bank included).
    """
    if which not in ("clip", "llava", "all"):
        from mmscope.core.errors import InputError

        raise InputError(f"train-toy takes llava, clip or all, not {which!r}")
    start = time.perf_counter()
    bank = SceneBank.sample(recipe.bank_size, TRAIN_SEED + recipe.seed)
    bank_seconds = time.perf_counter() - start
    info = {"recipe": asdict(recipe), "train_seed": TRAIN_SEED + recipe.seed}
    saved = {}
    if which in ("clip", "all"):
        clip = train_clip(recipe, bank, progress)
        clip_info = {**info, "seconds": round(time.perf_counter() - start, 1)}
        saved["toy-clip"] = save_toy(clip, "clip", out_root / "toy-clip", clip_info)
    if which in ("llava", "all"):
        clip_dir = out_root / "toy-clip"
        if not (clip_dir / "model.safetensors").exists():
            from mmscope.models.loading import toy_path

            clip_dir = toy_path("toy-clip")
        clip = CLIPModel.from_pretrained(clip_dir)
        llava_start = time.perf_counter()
        llava = train_llava(recipe, bank, clip, progress)
        llava_info = {
            **info,
            "seconds": round(bank_seconds + time.perf_counter() - llava_start, 1),
            "vision_from": {"path": str(clip_dir), "sha256": weights_sha256(clip_dir)},
        }
        saved["toy-llava"] = save_toy(
            llava, "llava", out_root / "toy-llava", llava_info, recipe.question_first
        )
    return saved


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 of a saved model's safetensors weights."""
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
