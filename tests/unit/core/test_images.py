import io
import struct

import numpy as np
import pytest
from PIL import Image

from mmscope.core.errors import ImageError, ImageTooLargeError
from mmscope.core.images import MAX_PIXELS, load_image, load_images


def _save(img: Image.Image, path, fmt="PNG"):
    img.save(path, format=fmt)
    return path


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(load_image(_save(img, tmp_path / "a.png")))
    assert out.shape == (4, 4, 3)
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 255)


def test_half_transparent_pixel_blends():
    img = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    value = np.asarray(load_image(img))[0, 0]
    assert 120 <= value[0] <= 130  # half black over white


def test_palette_grey_and_cmyk_convert_to_rgb(tmp_path):
    pal = Image.new("P", (2, 2))
    pal.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    assert tuple(np.asarray(load_image(pal))[0, 0]) == (10, 20, 30)
    grey = Image.new("L", (2, 2), 77)
    assert tuple(np.asarray(load_image(_save(grey, tmp_path / "g.png")))[1, 1]) == (77, 77, 77)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    red = np.asarray(load_image(_save(cmyk, tmp_path / "c.jpg", "JPEG")))[0, 0]
    assert red[0] > 200 and red[1] < 40 and red[2] < 40


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = np.asarray(load_image(_save(img, tmp_path / "d.png")))[..., 0]
    assert out.tolist() == [[0, 128], [255, 1]]


def test_missing_non_image_corrupt_and_truncated_files(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "t.png").write_text("hello, not an image")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "t.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, format="PNG"
    )
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.png")


def test_over_50_megapixels_is_refused_unless_allowed(tmp_path):
    # A 1x1 BMP whose header claims 8000 x 7000: PIL reads the size lazily, no pixels needed.
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="BMP")
    data = bytearray(buf.getvalue())
    struct.pack_into("<ii", data, 18, 8000, 7000)
    path = tmp_path / "huge.bmp"
    path.write_bytes(bytes(data))
    assert 8000 * 7000 > MAX_PIXELS
    with pytest.raises(ImageTooLargeError, match="allow_large"):
        load_image(path)
    with pytest.raises(ImageError):  # allowed, but the pixels are not there: truncated
        load_image(path, allow_large=True)


def test_arrays_and_lists():
    arr = np.zeros((3, 5, 3), np.uint8)
    assert load_image(arr).size == (5, 3)
    assert len(load_images([arr, arr])) == 2
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((3, 5, 3), np.float32))
