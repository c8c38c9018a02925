"""The one image loader: EXIF orientation applied, the 50-megapixel guard on whatever is
still to be decoded, and headers checked without decoding (``probe_image``)."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from mmscope.core import images
from mmscope.core.errors import ImageError, ImageTooLargeError
from mmscope.core.images import load_image, load_images, probe_image


def _photo(orientation: int) -> bytes:
    """A 4 x 2 JPEG whose left half is red, with the given EXIF orientation tag."""
    arr = np.zeros((2, 4, 3), np.uint8)
    arr[:, :2] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=100, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation, size", [(1, (4, 2)), (3, (4, 2)), (6, (2, 4)), (8, (2, 4))])
def test_exif_orientation_is_applied_from_paths_bytes_and_open_images(tmp_path, orientation, size):
    data = _photo(orientation)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    with Image.open(path) as opened:
        loaded = [load_image(path), load_image(data), load_image(opened)]
    for img in loaded:
        assert img.size == size
    if orientation == 3:  # turned 180 degrees: the red half is now on the right
        arr = np.asarray(loaded[0])
        assert arr[0, -1, 0] > 200 and arr[0, 0, 0] < 60


def test_load_images_turns_every_image(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_photo(6))
    assert [im.size for im in load_images([tmp_path / "a.jpg", _photo(1)])] == [(2, 4), (4, 2)]


def _bomb(tmp_path):
    """A BMP whose header claims 8000 x 7000 pixels, with none of them in the file."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="BMP")
    data = bytearray(buf.getvalue())
    struct.pack_into("<ii", data, 18, 8000, 7000)
    path = tmp_path / "bomb.bmp"
    path.write_bytes(bytes(data))
    return path


def test_an_opened_but_undecoded_image_is_still_guarded(tmp_path):
    with Image.open(_bomb(tmp_path)) as lazy:
        with pytest.raises(ImageTooLargeError, match="allow_large"):
            load_image(lazy)


def test_an_image_already_in_memory_is_past_the_guard(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 10)  # a 5 x 5 image is "large" now
    big = Image.new("RGB", (5, 5), (1, 2, 3))
    assert load_image(big).size == (5, 5)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(ImageTooLargeError):
        load_image(buf.getvalue())  # still to be decoded: guarded
    assert load_image(buf.getvalue(), allow_large=True).size == (5, 5)


def test_probe_reads_the_header_only(tmp_path):
    good = tmp_path / "g.png"
    Image.new("RGB", (7, 3)).save(good)
    assert probe_image(good) == (7, 3)
    with pytest.raises(ImageTooLargeError, match="56.0 megapixels"):
        probe_image(_bomb(tmp_path))
    assert probe_image(_bomb(tmp_path), allow_large=True) == (8000, 7000)
    (tmp_path / "t.png").write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        probe_image(tmp_path / "t.png")
    with pytest.raises(ImageError, match="does not exist"):
        probe_image(tmp_path / "nope.png")


def test_a_video_array_is_refused_with_what_to_do():
    import numpy as np

    from mmscope.core.images import load_image

    with pytest.raises(ImageError, match=r"\(4, 8, 8, 3\) \(a video.s frames\?"):
        load_image(np.zeros((4, 8, 8, 3), dtype=np.uint8))
