"""Words as token ids: one token, an answer's first word, and the refusal of words the
tokenizer does not know (which it would silently read as its unknown token)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmscope.core.errors import InputError

if TYPE_CHECKING:
    from mmscope.models.base import VLM


def known_ids(vlm: VLM, text: str) -> list[int]:
    """``text`` as token ids, refusing words the tokenizer does not know (that it would read
    as its unknown token), named; byte-level tokenizers know every word."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"a target word or answer must be a non-empty string, not {text!r}")
    tok = vlm.tokenizer
    ids = [int(i) for i in tok.encode(text, add_special_tokens=False)]
    unk = getattr(tok, "unk_token_id", None)
    if unk is None or unk not in ids or getattr(tok, "unk_token", None) in text.split():
        return ids
    unknown = [w for w in text.split() if unk in tok.encode(w, add_special_tokens=False)]
    words = ", ".join(repr(w) for w in unknown or [text])
    raise InputError(
        f"{words} {'is' if len(unknown) < 2 else 'are'} not in the vocabulary of {vlm.name} "
        f"(it would be read as {tok.unk_token}); use words the model knows"
    )


def token_id(vlm: VLM, word: str) -> int:
    """The id of ``word`` as one token (also tried with a leading space, as SentencePiece
    tokenizers spell a word after another); a word not in the vocabulary is refused."""
    known_ids(vlm, word)
    tok = vlm.tokenizer
    for text in (word, " " + word):
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            return int(ids[0])
    raise InputError(
        f"{word!r} is not a single token of {vlm.name}; use AnswerLogProb({word!r}) instead"
    )


def answer_id(vlm: VLM, answer: str) -> int:
    """The id of an answer's first word as one token (``"bottom right"``: ``"bottom"``)."""
    words = answer.split()
    if not words:
        raise InputError("an empty answer has no first token")
    return token_id(vlm, words[0])
