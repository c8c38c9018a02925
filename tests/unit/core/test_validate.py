"""Counts with ceilings, seeds, and output folders checked without touching anything."""

import pytest

from mmscope.core.errors import InputError
from mmscope.core.validate import (
    MAX_ITEMS,
    MAX_SEED,
    count,
    folder_problem,
    integer,
    output_folder,
    valid_seed,
)


def test_counts_have_a_floor_and_a_ceiling():
    assert count("n", 5) == 5 and count("n", MAX_ITEMS) == MAX_ITEMS
    with pytest.raises(InputError, match="n must be an integer of at least 1, not 0"):
        count("n", 0)
    with pytest.raises(InputError, match="n must be an integer of at most 100,000, not 10"):
        count("n", 10**9)
    with pytest.raises(InputError, match="n must be an integer, not '3'"):
        count("n", "3")
    with pytest.raises(InputError, match="at most 7"):
        integer("size", 8, minimum=2, maximum=7)


def test_seeds_are_within_what_the_generators_take():
    assert valid_seed(0) == 0 and valid_seed(MAX_SEED) == MAX_SEED
    for bad in (-1, MAX_SEED + 1, 2**70):
        with pytest.raises(InputError, match="seed"):
            valid_seed(bad)


def test_an_existing_file_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("keep me")
    with pytest.raises(InputError, match="results.txt is an existing file"):
        output_folder(path)
    assert path.read_text() == "keep me"


def test_a_folder_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "cannot be created" in folder_problem(tmp_path / "f" / "a" / "b")
    assert not (tmp_path / "f" / "a").exists()


def test_new_and_existing_folders_are_fine_and_nothing_is_made(tmp_path):
    assert folder_problem(tmp_path) is None
    assert output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()


def test_a_name_the_system_refuses(tmp_path):
    assert "NUL byte" in folder_problem(str(tmp_path) + "/a\x00b")
    assert "cannot be used" in folder_problem(tmp_path / ("x" * 5000))
