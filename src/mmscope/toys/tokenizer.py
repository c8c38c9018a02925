"""Word-level tokenizers for the toy models, built with the ``tokenizers`` library."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


def build_tokenizer(
    words: Sequence[str],
    specials: Sequence[str] = SPECIALS,
    add_bos: bool = True,
    add_eos: bool = False,
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ids 0.. are ``specials`` then ``words``.

    ``specials`` must start with pad, unk, bos, eos (in that order); the rest are extra
    special tokens such as the image placeholder. Decoders pad on the left (generation),
    CLIP on the right (absolute positions, pooled at the end-of-text token).
    """
    vocab: dict[str, int] = {}
    for token in list(specials) + sorted(set(words) - set(specials)):
        vocab.setdefault(token, len(vocab))
    pad, unk, bos, eos = specials[:4]
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if add_bos or add_eos:
        head, tail = (f"{bos} " if add_bos else ""), (f" {eos}" if add_eos else "")
        core.post_processor = processors.TemplateProcessing(
            single=f"{head}$A{tail}",
            pair=f"{head}$A $B{tail}",
            special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=pad,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        extra_special_tokens=list(specials[4:]) or None,
        padding_side=padding_side,
    )
