"""Words the tokenizer does not know are refused, naming them, never read as <unk>."""

from types import SimpleNamespace

import pytest

from mmscope.core.errors import InputError
from mmscope.core.targets import AnswerLogProb, Contrast, Token, known_ids, token_id


@pytest.fixture()
def inputs(tiny_llava, scene_image):
    return tiny_llava.prepare(scene_image, "what color is the circle ?")


def test_an_unknown_token_word_is_refused_naming_it(tiny_llava, inputs):
    with pytest.raises(InputError, match="'zzqqxx' is not in the vocabulary of .*<unk>"):
        Token("zzqqxx").bind(tiny_llava, inputs)
    with pytest.raises(InputError, match="'zzqqxx'"):
        token_id(tiny_llava, "zzqqxx")
    assert token_id(tiny_llava, "red") == known_ids(tiny_llava, "red")[0]


def test_an_answer_names_only_its_unknown_words(tiny_llava, inputs):
    with pytest.raises(InputError) as err:
        AnswerLogProb("a red blorf circle qux").bind(tiny_llava, inputs)
    message = str(err.value)
    assert "'blorf', 'qux' are not in the vocabulary" in message and "'red'" not in message
    assert AnswerLogProb("a red circle").bind(tiny_llava, inputs).k == 1


def test_contrast_words_are_checked(tiny_llava, inputs):
    with pytest.raises(InputError, match="'maybe'"):
        Contrast("yes", "maybe").bind(tiny_llava, inputs)


def test_empty_and_non_string_targets(tiny_llava):
    for bad in ("", "   ", None):
        with pytest.raises(InputError, match="non-empty string"):
            known_ids(tiny_llava, bad)


def test_the_unknown_token_itself_and_tokenizers_without_one():
    class Tok:
        unk_token, unk_token_id = "<unk>", 0

        def encode(self, text, add_special_tokens=False):
            return [0 if w in ("<unk>", "zz") else 5 for w in text.split()]

    vlm = SimpleNamespace(tokenizer=Tok(), name="stub")
    assert known_ids(vlm, "<unk>") == [0]  # asked for by name: fine
    with pytest.raises(InputError, match="'zz'"):
        known_ids(vlm, "a zz")
    Tok.unk_token_id = None  # byte-level tokenizers: every word is known
    assert known_ids(vlm, "a zz") == [5, 0]
