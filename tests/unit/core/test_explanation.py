"""Explanation: maps come back where they belong, in the original image's pixels."""

import json

import numpy as np
import pytest
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.explanation import Explanation
from mmscope.core.inputs import ImageSpan


def _explanation(crop=(0.0, 0.0, 0.0, 0.0), size=(8, 8)) -> Explanation:
    grid = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    return Explanation(
        method="m",
        settings={"steps": 3},
        target="Token('red')",
        labels=(("red",),),
        image_scores=((grid,),),
        text_scores=(np.array([[0.5, -1.0]], dtype=np.float32),),
        prompt_tokens=(("what", "colour"),),
        spans=((ImageSpan(1, 5, (2, 2), "lm", crop),),),
        images=((Image.new("RGB", size),),),
        extras={"gap": np.float32(0.25)},
    )


def test_maps_words_and_round_trip(tmp_path):
    exp = _explanation()
    assert exp.image_map().tolist() == [[0, 1], [2, 3]]
    assert exp.text_map() == [("what", 0.5), ("colour", -1.0)]
    back = Explanation.from_dict(json.loads(json.dumps(exp.to_dict())))
    np.testing.assert_array_equal(back.image_map(), exp.image_map())
    assert back.text_map() == exp.text_map() and back.extras == {"gap": 0.25}
    assert back.spans == exp.spans and back.settings == exp.settings
    assert exp.save(tmp_path / "e.json").read_text().startswith("{")
    assert exp.save(tmp_path / "e.png").stat().st_size > 1000
    assert "<img" in exp._repr_html_()
    with pytest.raises(InputError):
        exp.image_map(1)
    with pytest.raises(InputError):
        exp.text_map(output=2)


def test_heatmap_covers_the_whole_image_without_a_crop():
    heat = _explanation(size=(8, 8)).heatmap()
    assert heat.shape == (8, 8)
    # quadrant means follow the grid's order
    quads = [heat[:4, :4].mean(), heat[:4, 4:].mean(), heat[4:, :4].mean(), heat[4:, 4:].mean()]
    assert np.argsort(quads).tolist() == [0, 1, 2, 3]


def test_heatmap_maps_through_the_processors_centre_crop():
    # a 16x8 image whose centre 8x8 square was kept: columns 4..12
    heat = _explanation(crop=(4.0, 0.0, 12.0, 8.0), size=(16, 8)).heatmap()
    assert heat.shape == (8, 16)
    assert not heat[:, :4].any() and not heat[:, 12:].any()
    assert heat[:, 4:12].max() == pytest.approx(3.0, abs=0.6)
    assert heat[:4, 4:8].mean() < heat[4:, 8:12].mean()
