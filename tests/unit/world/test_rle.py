"""Tests for the COCO-style RLE helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mmscope.world import decode_rle, encode_rle


def test_known_encoding_is_column_major_and_starts_with_background() -> None:
    mask = np.array([[0, 1], [1, 1]], dtype=bool)
    # Column-major order: 0, 1, 1, 1.
    assert encode_rle(mask) == {"size": [2, 2], "counts": [1, 3]}
    full = np.ones((2, 3), dtype=bool)
    assert encode_rle(full) == {"size": [2, 3], "counts": [0, 6]}
    assert encode_rle(np.zeros((2, 3), dtype=bool))["counts"] == [6]


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        dtype=bool,
        shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    )
)
def test_round_trip(mask: np.ndarray) -> None:
    enc = encode_rle(mask)
    assert sum(enc["counts"]) == mask.size
    assert all(isinstance(c, int) for c in enc["counts"])
    dec = decode_rle(enc)
    assert dec.dtype == bool and dec.shape == mask.shape
    assert np.array_equal(dec, mask)


def test_decode_rejects_bad_counts() -> None:
    with pytest.raises(ValueError):
        decode_rle({"size": [2, 2], "counts": [1, 2]})
