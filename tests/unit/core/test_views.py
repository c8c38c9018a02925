"""Images shown in several views (a base view and stitched tiles, sub-images, frames): spans
say which positions hold which cells, and one heatmap in the original pixels holds them all."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.explanation import Explanation
from mmscope.core.inputs import ImageSpan, Inputs

BASE = ImageSpan(1, 5, (2, 2), crop=(0.0, 0.0, 8.0, 8.0), image=0, view="base")
#: a 2x3 grid whose rows end in a separator token (LLaVA-NeXT's newline): 5..7, 9..11
TILES = ImageSpan(
    5, 13, (2, 3), crop=(2.0, 0.0, 8.0, 4.0), image=0, view="tiles", cells=(5, 6, 7, 9, 10, 11)
)


def _explanation(base: np.ndarray, tiles: np.ndarray) -> Explanation:
    return Explanation(
        method="m",
        settings={},
        target="t",
        labels=(("x",),),
        image_scores=((base[None], tiles[None]),),
        text_scores=(np.zeros((1, 0), np.float32),),
        prompt_tokens=((),),
        spans=((BASE, TILES),),
        images=((Image.new("RGB", (8, 8)),),),
    )


def test_positions_follow_the_cells_and_default_to_the_run():
    assert list(TILES.positions) == [5, 6, 7, 9, 10, 11] and TILES.size == 6
    assert list(BASE.positions) == [1, 2, 3, 4] and BASE.size == 4
    one = ImageSpan(3, 7, (2, 2))
    assert one.image_index(1) == 1 and BASE.image_index(1) == 0  # -1: its own index


def test_views_of_an_image_are_found_in_inputs_and_explanations():
    inputs = Inputs({}, ((Image.new("RGB", (8, 8)),),), ((BASE, TILES),), ("p",), ((0, 0),))
    assert inputs.views(0, 0) == [0, 1] and inputs.views(0, 1) == []
    exp = _explanation(np.ones((2, 2), np.float32), np.ones((2, 3), np.float32))
    assert exp.views(0) == [0, 1]
    with pytest.raises(InputError, match="no image 1"):
        exp.heatmap(1)


def test_the_heatmap_sums_the_views_as_densities_of_the_finest_cell():
    """Base cells cover 4x4 = 16 px of the 8x8 image, tile cells 2x2 = 4 px (over the box
    x 2..8, y 0..4): in units of a tile cell a base score counts 4 / 16."""
    exp = _explanation(np.ones((2, 2), np.float32), np.full((2, 3), 2.0, np.float32))
    heat = exp.heatmap(0)
    assert heat.shape == (8, 8)
    np.testing.assert_allclose(heat[:4, 2:], 0.25 + 2.0)  # both views
    np.testing.assert_allclose(heat[4:, :], 0.25)  # the base view alone
    np.testing.assert_allclose(heat[:4, :2], 0.25)
    np.testing.assert_allclose(exp.heatmap(0, view=1)[:4, 2:], 2.0)  # one view alone
    np.testing.assert_allclose(exp.heatmap(0, view=1)[4:], 0.0)


def test_views_survive_the_json_round_trip():
    exp = _explanation(np.ones((2, 2), np.float32), np.ones((2, 3), np.float32))
    back = Explanation.from_dict(exp.to_dict())
    assert back.spans == exp.spans
