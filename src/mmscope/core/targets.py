"""What scalar an explanation explains.

A ``Target`` is bound to a model and inputs (``target.bind(vlm, inputs)``); the bound target
holds the inputs the methods run on (teacher-forced where the target needs the answer in the
sequence) and maps the model's output to scores of shape ``(batch, k)``: one column per
explained output (one for most targets, one per generated token for ``Generated``). Every
method takes the same targets.

Nothing falls back silently: a word the tokenizer does not know (it would be read as
``<unk>``) is refused naming the word, and a sequence longer than the model's context is
refused (``core.context``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from mmscope.core.context import check_length, fit_new_tokens
from mmscope.core.errors import InputError
from mmscope.core.inputs import Inputs
from mmscope.core.validate import integer
from mmscope.core.vocab import answer_id, known_ids, token_id

if TYPE_CHECKING:
    from mmscope.models.base import VLM

Scorer = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class BoundTarget:
    """A target bound to a model and inputs.

    Attributes:
        inputs: what the methods run on (the user's inputs, teacher-forced where needed).
        labels: per batch item, a name for each explained output (``k`` of them).
        score: model output -> ``(batch, k)`` scores; differentiable.
        positions: per output, the sequence positions whose logits it reads (what attention
            methods take the query rows from); empty for contrastive encoders, whose outputs
            read the pooled class / end-of-text tokens.
        log_prob: whether the scores are log-probabilities (methods that need odds or
            probabilities convert them; other scores are logit differences or similarities).
    """

    inputs: Inputs
    labels: tuple[tuple[str, ...], ...]
    score: Scorer
    positions: tuple[tuple[int, ...], ...] = ()
    log_prob: bool = False

    @property
    def k(self) -> int:
        return max((len(lab) for lab in self.labels), default=1)

    def __call__(self, output: Any) -> torch.Tensor:
        return self.score(output)


class Target:
    """Base class: subclasses implement ``bind``."""

    def bind(self, vlm: VLM, inputs: Inputs) -> BoundTarget:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{v!r}" for v in vars(self).values())
        return f"{type(self).__name__}({fields})"


def _decoder_only(vlm: VLM, target: Target) -> None:
    if getattr(vlm, "contrastive", False):
        raise InputError(
            f"{vlm.name} is a contrastive encoder; explain it with Similarity(), not {target!r}"
        )


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _tiled(per_item: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-item values for a batch that ``Inputs.tile`` repeated (methods batch that way)."""
    return per_item.repeat(batch // per_item.shape[0], *([1] * (per_item.dim() - 1)))


def _next_token_target(vlm: VLM, inputs: Inputs, ids: Sequence[int], what: str) -> BoundTarget:
    """Log-probability of ``ids[b]`` as the next token of item ``b``."""
    check_length(vlm, inputs)
    index = torch.tensor(list(ids), dtype=torch.long)

    def score(output: Any) -> torch.Tensor:
        logp = torch.log_softmax(_logits(output)[:, -1].float(), dim=-1)
        return logp.gather(1, _tiled(index, logp.shape[0]).to(logp.device).view(-1, 1))

    names = tuple((f"{what}{vlm.tokenizer.decode([i]).strip()}",) for i in ids)
    return BoundTarget(inputs, names, score, _last(inputs), log_prob=True)


def _last(inputs: Inputs) -> tuple[tuple[int, ...], ...]:
    return ((inputs.input_ids.shape[1] - 1,),)


class TokenId(Target):
    """Log-probability of token ``id`` as the next token; a sequence gives each batch item its
    own id (``Predicted().token_ids(...)`` frozen, so a perturbed or randomised model is asked
    about the same token)."""

    def __init__(self, id: int | Sequence[int]) -> None:
        self.id: int | tuple[int, ...] = (
            tuple(integer("TokenId's id", i) for i in id)
            if isinstance(id, Sequence) and not isinstance(id, str)
            else integer("TokenId's id", id)
        )

    def bind(self, vlm: VLM, inputs: Inputs) -> BoundTarget:
        _decoder_only(vlm, self)
        ids = list(self.id) if isinstance(self.id, tuple) else [self.id] * inputs.batch_size
        if len(ids) != inputs.batch_size:
            raise InputError(f"{len(ids)} token ids for a batch of {inputs.batch_size}")
        for i in ids:
            if not 0 <= i < len(vlm.tokenizer):
                raise InputError(f"token id {i} is outside the vocabulary of {vlm.name}")
        return _next_token_target(vlm, inputs, ids, "")


class Token(Target):
    """Log-probability of ``word`` (one token) as the next token."""

    def __init__(self, word: str) -> None:
        self.word = word

    def bind(self, vlm: VLM, inputs: Inputs) -> BoundTarget:
        _decoder_only(vlm, self)
        return _next_token_target(vlm, inputs, [token_id(vlm, self.word)] * inputs.batch_size, "")


class Predicted(Target):
    """Log-probability of the model's own top next token, per item (the answer's first word)."""

    def token_ids(self, vlm: VLM, inputs: Inputs) -> list[int]:
        """Each item's top next token."""
        _decoder_only(vlm, self)
        check_length(vlm, inputs)
        with torch.no_grad():
            return [int(i) for i in _logits(vlm.forward(inputs))[:, -1].argmax(-1).tolist()]

    def bind(self, vlm: VLM, inputs: Inputs) -> BoundTarget:
        return _next_token_target(vlm, inputs, self.token_ids(vlm, inputs), "")


class Contrast(Target):
    """Logit of ``word`` minus logit of ``other`` at the next position ("yes" vs "no")."""

    def __init__(self, word: str, other: str) -> None:
        self.word, self.other = word, other

    def bind(self, vlm: VLM, inputs: Inputs) -> BoundTarget:
        _decoder_only(vlm, self)
        check_length(vlm, inputs)
        a, b = token_id(vlm, self.word), token_id(vlm, self.other)

        def score(output: Any) -> torch.Tensor:
            last = _logits(output)[:, -1].float()
            return (last[:, a] - last[:, b]).unsqueeze(1)

        label = f"{self.word} - {self.other}"
        return BoundTarget(inputs, ((label,),) * inputs.batch_size, score, _last(inputs))


def _forced(inputs: Inputs, ids: torch.Tensor, keep: torch.Tensor) -> tuple[Inputs, Scorer]:
    """Append ``ids`` (batch, k) and score the log-probability of each appended token."""
    forced = inputs.extend(ids, keep)
    start = inputs.input_ids.shape[1] - 1  # the logits at start + j predict appended token j
    k = ids.shape[1]

    def score(output: Any) -> torch.Tensor:
        logits = _logits(output)[:, start : start + k].float()
        logp = torch.log_softmax(logits, dim=-1)
        n = logp.shape[0]
        picked = logp.gather(2, _tiled(ids, n).to(logp.device).unsqueeze(-1)).squeeze(-1)
        return picked * _tiled(keep, n).to(picked)

    return forced, score


class AnswerLogProb(Target):
    """Log-probability of a whole answer (several tokens), teacher-forced after the prompt."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def bind(self, vlm: VLM, inputs: Inputs) -> BoundTarget:
        _decoder_only(vlm, self)
        ids = known_ids(vlm, self.answer)
        if not ids:
            raise InputError("the answer to explain is empty")
        check_length(vlm, inputs, len(ids), f"the prompt with the answer {self.answer!r}")
        row = torch.tensor(ids, dtype=torch.long).unsqueeze(0).repeat(inputs.batch_size, 1)
        forced, per_token = _forced(inputs, row, torch.ones_like(row, dtype=torch.bool))
        labels = ((self.answer,),) * inputs.batch_size
        start = inputs.input_ids.shape[1] - 1
        positions = (tuple(range(start, start + len(ids))),)
        return BoundTarget(
            forced, labels, lambda out: per_token(out).sum(1, keepdim=True), positions, True
        )


class Generated(Target):
    """Every token of the model's own greedy answer: one explained output per token.

    The answer is generated once, then teacher-forced, so every method explains all tokens
    from one forward pass (and batched backward passes) instead of one run per token.
    """

    def __init__(self, max_new_tokens: int = 24) -> None:
        if max_new_tokens < 1:
            raise InputError("Generated needs max_new_tokens >= 1")
        self.max_new_tokens = int(max_new_tokens)

    def bind(self, vlm: VLM, inputs: Inputs) -> BoundTarget:
        _decoder_only(vlm, self)
        tok = vlm.tokenizer
        max_new_tokens = fit_new_tokens(vlm, inputs, self.max_new_tokens)
        with torch.no_grad():
            out = vlm.model.generate(
                **inputs.to(vlm.device).tensors,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, inputs.input_ids.shape[1] :].cpu()
        special = set(tok.all_special_ids)
        keep = torch.tensor([[int(t) not in special for t in row] for row in new.tolist()])
        # stop each item at its first end/pad token
        keep = keep & (torch.cumprod(keep.long(), dim=1) > 0)
        if not bool(keep.any()):
            raise InputError("the model generated no tokens to explain")
        width = int(keep.sum(1).max())
        new, keep = new[:, :width], keep[:, :width]
        forced, score = _forced(inputs, new, keep)
        labels = tuple(
            tuple(tok.convert_ids_to_tokens(row[: int(n)].tolist()))
            for row, n in zip(new, keep.sum(1))
        )
        start = inputs.input_ids.shape[1] - 1
        positions = tuple((start + j,) for j in range(width))
        return BoundTarget(forced, labels, score, positions, log_prob=True)


class Similarity(Target):
    """Contrastive encoders: the scaled cosine similarity of image ``b`` with text ``b``.

    One text for several images is copied once per image, so every batch item has its own
    text row (its own prompt-word scores) like a decoder's items.
    """

    def bind(self, vlm: VLM, inputs: Inputs) -> BoundTarget:
        if not getattr(vlm, "contrastive", False):
            raise InputError(f"{vlm.name} is not a contrastive encoder; Similarity() needs one")
        n_images, n_texts = inputs.batch_size, len(inputs.prompts)
        if n_texts not in (1, n_images):
            raise InputError(f"{n_images} images need one text or {n_images} texts")
        check_length(vlm, inputs, what="the text")
        if n_texts == 1 and n_images > 1:
            inputs = _one_text_per_image(inputs)
            n_texts = n_images

        def score(output: Any) -> torch.Tensor:
            sims = output.logits_per_image  # (images, texts); a tiled batch tiles both
            rows = torch.arange(sims.shape[0], device=sims.device)
            cols = rows * sims.shape[1] // sims.shape[0]
            return sims[rows, cols].unsqueeze(1)

        labels = tuple((inputs.prompts[b if n_texts > 1 else 0],) for b in range(n_images))
        return BoundTarget(inputs, labels, score)


def _one_text_per_image(inputs: Inputs) -> Inputs:
    """A contrastive batch's single text repeated for each image (pixels untouched)."""
    n = inputs.batch_size
    tensors = {
        key: value if key == "pixel_values" else value.repeat(n, *[1] * (value.dim() - 1))
        for key, value in inputs.tensors.items()
    }
    return replace(
        inputs,
        tensors=tensors,
        prompts=inputs.prompts * n,
        prompt_spans=inputs.prompt_spans * n,
        prompt_tokens=inputs.prompt_tokens * n,
    )


def default_target(vlm: VLM) -> Target:
    """``Similarity()`` for contrastive encoders, else the model's own next token."""
    return Similarity() if getattr(vlm, "contrastive", False) else Predicted()


__all__ = [
    "AnswerLogProb",
    "BoundTarget",
    "Contrast",
    "Generated",
    "Predicted",
    "Similarity",
    "Target",
    "Token",
    "TokenId",
    "answer_id",
    "default_target",
    "known_ids",
    "token_id",
]
