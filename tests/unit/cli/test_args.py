"""Typed flags and ``--set`` values: refused by the parser in one line, before any work."""

import argparse
import inspect
from collections.abc import Sequence

import pytest

from mmscope.cli.args import Parser, box, count, numbers, out_folder, seed, typed
from mmscope.core.errors import InputError

EMPTY = inspect.Parameter.empty


@pytest.mark.parametrize("text", ["0", "-1", "100001", "ten", "1.5", ""])
def test_counts_are_integers_in_range(text):
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace(".", r"\.")):
        count()(text)
    assert count()(" 7 ") == 7 and count(minimum=0)("0") == 0


@pytest.mark.parametrize("text", ["-1", "4294967296", "x"])
def test_seeds(text):
    with pytest.raises(argparse.ArgumentTypeError):
        seed(text)
    assert seed("4294967295") == 2**32 - 1


@pytest.mark.parametrize(
    "text", ["1,2,3", "a,b,c,d", "1,2,3,4,5", "4,0,2,8", "0,5,8,5", "-1,0,4,4", "0,0,inf,4", ""]
)
def test_boxes_are_four_ordered_numbers(text):
    with pytest.raises(argparse.ArgumentTypeError):
        box(text)
    assert box(" 1, 2.5,3,4 ") == (1.0, 2.5, 3.0, 4.0)


def test_number_lists():
    assert numbers(int)("1, 2,") == [1, 2] and numbers(float)("0.5") == [0.5]
    for text, kind in (("a,b", float), ("1.5", int), ("", int), ("nan", float)):
        with pytest.raises(argparse.ArgumentTypeError):
            numbers(kind)(text)


def test_out_folder_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is an existing file"):
        out_folder(str(tmp_path / "f"))
    assert out_folder(str(tmp_path / "new")) == str(tmp_path / "new")


@pytest.mark.parametrize(
    "hint, default, text, expected",
    [
        (bool, True, "No", False),
        (bool, False, "on", True),
        (bool, EMPTY, "1", True),
        (int, 3, "12", 12),
        (float, 0.5, "1e-3", 1e-3),
        (tuple[str, ...], (), "a, b,", ("a", "b")),
        (tuple[int, int] | None, (2, 2), "3,1", (3, 1)),
        (tuple[int, int] | None, (2, 2), "none", None),
        (int | str, -1, "5", 5),
        (int | str, -1, "mean", "mean"),
        (Sequence[float], (0.5,), "0.25,1", (0.25, 1.0)),
        (EMPTY, (1.0, 2.0), "3,4", (3.0, 4.0)),
        (EMPTY, "x", "y", "y"),
    ],
)
def test_set_values_are_typed_by_the_annotation(hint, default, text, expected):
    assert typed(hint, default, text, "s") == expected


@pytest.mark.parametrize(
    "hint, text, message",
    [
        (bool, "maybe", "takes true or false"),
        (bool, "", "takes true or false"),
        (int, "ten", "takes an integer"),
        (float, "big", "takes a number"),
        (tuple[int, int] | None, "1,2,3", "takes 2 values"),
        (tuple[int, ...], "1,x", "takes an integer"),
        (int | None, "x", "takes an integer"),
    ],
)
def test_set_words_that_are_not_of_the_type_are_refused(hint, text, message):
    with pytest.raises(InputError, match=f"--set s={text!r}: s {message}"):
        typed(hint, None, text, "s")


def test_parser_errors_are_one_line(capsys):
    parser = Parser(prog="mmscope x")
    parser.add_argument("--n", type=count(), required=True)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--n", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("mmscope: error: --n must be an integer in [1, 100,000], not '0'")
