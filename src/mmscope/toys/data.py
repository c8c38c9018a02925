"""Training batches for the toys, built straight from the world (no processor in the loop).

The fast path here must equal what the saved processor produces; a test checks that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from mmscope.toys.build import ANSWER_CUE, IMAGE_SIZE, MEAN, NUM_IMAGE_TOKENS, STD
from mmscope.world import (
    DESCRIBE_PROMPT,
    QUESTION_TYPES,
    SHAPES,
    Scene,
    WorldConfig,
    ask,
    caption,
    render,
    sample_scenes,
)
from mmscope.world.questions import HARD_NEGATIVE_PROB


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), as the toy image processor does."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def shape_twin(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with one object's shape changed: a hard negative whose caption differs from
    the scene's by one shape word (contrastive training otherwise gets by on colour alone)."""
    taken = {o.combo for o in scene.objects}
    changes = [
        (i, shape)
        for i, o in enumerate(scene.objects)
        for shape in SHAPES
        if (o.color, shape) not in taken
    ]
    if not changes:
        return scene
    i, shape = changes[int(rng.integers(len(changes)))]
    objects = list(scene.objects)
    objects[i] = replace(objects[i], shape=shape)
    return replace(scene, objects=tuple(objects))


def _render_all(scenes: list[Scene]) -> np.ndarray:
    return np.stack([np.asarray(render(s, IMAGE_SIZE).image) for s in scenes])


@dataclass
class SceneBank:
    """Pre-rendered scenes for training: the scenes, their uint8 images, and each scene's
    shape twin (``shape_twin``) with its image."""

    scenes: list[Scene]
    images: np.ndarray
    twins: list[Scene]
    twin_images: np.ndarray

    @classmethod
    def sample(cls, n: int, seed: int, config: WorldConfig | None = None) -> SceneBank:
        scenes = sample_scenes(n, seed, config or WorldConfig())
        rng = np.random.default_rng([seed, 1])
        twins = [shape_twin(s, rng) for s in scenes]
        return cls(scenes, _render_all(scenes), twins, _render_all(twins))


class Vocab:
    """Word -> id for the toy word-level tokenizer, without the tokenizer's overhead."""

    def __init__(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        self.ids: dict[str, int] = tokenizer.get_vocab()
        self.bos, self.eos, self.pad = (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        self.image = self.ids["<image>"]

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]


def example(
    vocab: Vocab, prompt: str, answer: str, question_first: bool = False
) -> tuple[list[int], list[int]]:
    """Ids of ``<s> <image>*N prompt answer : answer </s>`` (``question_first``: ``<s> prompt
    <image>*N answer : ...``) and labels (-100 but on the answer)."""
    image = [vocab.image] * NUM_IMAGE_TOKENS
    if question_first:
        head = [vocab.bos] + vocab.encode(prompt) + image + vocab.encode(ANSWER_CUE)
    else:
        head = [vocab.bos] + image + vocab.encode(f"{prompt} {ANSWER_CUE}")
    tail = vocab.encode(answer) + [vocab.eos]
    return head + tail, [-100] * len(head) + tail


def llava_batch(
    bank: SceneBank,
    vocab: Vocab,
    rng: np.random.Generator,
    batch_size: int,
    caption_share: float = 0.25,
    existence_weight: float = 1.0,
    hard_negative_prob: float = HARD_NEGATIVE_PROB,
    question_first: bool = False,
) -> dict[str, torch.Tensor]:
    """A batch of (image, prompt, answer) sequences with loss only on the answer and </s>.

    ``caption_share`` of the items are describe prompts, the rest questions: existence
    ``existence_weight`` times as often as each other type (the binding question that small
    models learn last), its absent objects hard negatives with ``hard_negative_prob``;
    ``question_first`` puts each prompt before the image tokens.
    """
    idx = rng.integers(0, len(bank.scenes), batch_size)
    weights = np.array([existence_weight if t == "existence" else 1.0 for t in QUESTION_TYPES])
    weights = weights / weights.sum()
    seqs, labels = [], []
    for i in idx:
        scene = bank.scenes[int(i)]
        if rng.random() < caption_share:
            prompt, answer = DESCRIBE_PROMPT, caption(scene)
        else:
            qtype = QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=weights))]
            q = ask(scene, qtype, rng, hard_negative_prob)
            prompt, answer = q.text, q.answer
        ids, labs = example(vocab, prompt, answer, question_first)
        seqs.append(ids)
        labels.append(labs)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((batch_size, width), vocab.pad)
    lab = torch.full((batch_size, width), -100)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    for b, (s, la) in enumerate(zip(seqs, labels)):
        input_ids[b, : len(s)] = torch.tensor(s)
        lab[b, : len(la)] = torch.tensor(la)
        mask[b, : len(s)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": lab,
        "pixel_values": pixels(bank.images[idx]),
    }


def clip_batch(
    bank: SceneBank, vocab: Vocab, rng: np.random.Generator, batch_size: int
) -> dict[str, torch.Tensor]:
    """Images and their captions, ``<s> caption </s>`` padded right: half the batch are
    scenes, the other half their shape twins."""
    idx = rng.choice(len(bank.scenes), batch_size // 2, replace=False)
    scenes = [bank.scenes[int(i)] for i in idx] + [bank.twins[int(i)] for i in idx]
    images = np.concatenate([bank.images[idx], bank.twin_images[idx]])
    seqs = [[vocab.bos] + vocab.encode(caption(s)) + [vocab.eos] for s in scenes]
    width = max(len(s) for s in seqs)
    ids = torch.full((batch_size, width), vocab.pad)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(images)}


__all__ = ["IMAGE_SIZE", "SceneBank", "Vocab", "clip_batch", "example", "llava_batch", "pixels"]
