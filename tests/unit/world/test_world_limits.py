"""World sampling checks its counts, seeds and sizes before drawing anything, and export
refuses a folder it cannot write to without touching what is there."""

import pytest
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.world import export_dataset, load_dataset, make_samples


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0), "n must be an integer of at least 1, not 0"),
        ((10**9, 0), "n must be an integer of at most 100,000"),
        ((2, -1), "seed must be an integer of at least 0, not -1"),
        ((2, 2**32), "seed must be an integer of at most 4,294,967,295"),
        ((2, 0, 1), "size must be an integer of at least 2, not 1"),
        ((2, 0, 10**6), "size must be an integer of at most 4,096"),
        ((2, "x"), "seed must be an integer, not 'x'"),
        ((100_000, 0, 100), "over the ceiling of 500,000,000"),
    ],
)
def test_bad_counts_seeds_and_sizes(args, message):
    with pytest.raises(InputError, match=message):
        make_samples(*args)


def test_export_refuses_a_file_and_leaves_it(tmp_path):
    target = tmp_path / "out"
    target.write_text("mine")
    with pytest.raises(InputError, match="is an existing file"):
        export_dataset(make_samples(1, 0), target)
    assert target.read_text() == "mine"


def test_a_reloaded_export_goes_through_the_image_loader(tmp_path):
    export_dataset(make_samples(2, 4), tmp_path)
    Image.new("RGBA", (48, 48), (0, 0, 0, 0)).save(tmp_path / "images" / "00000.png")
    first = load_dataset(tmp_path)[0].image
    assert first.mode == "RGB" and first.getpixel((0, 0)) == (255, 255, 255)  # on white
