"""POPE files: every line checked (bytes, encoding, JSON, fields) and every image's header
checked with the 50-megapixel guard when the file is read, before any model work."""

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from mmscope.core import images
from mmscope.core.errors import InputError
from mmscope.metrics.hallucination import load_pope_jsonl

PROBE = {"question_id": 1, "image": "a.png", "text": "Is there a dog?", "label": "yes"}


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (8, 6)).save(tmp_path / "a.png")
    return tmp_path


def _file(folder, data: bytes) -> Path:
    path = folder / "pope.jsonl"
    path.write_bytes(data)
    return path


def _refused(path, message, **kwargs):
    with pytest.raises(InputError) as err:
        load_pope_jsonl(path, **kwargs)
    assert message in str(err.value) and str(path) in str(err.value), str(err.value)
    return err.value


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xff\xfe\x00\x00", "line 1: binary data"),
        ('{"image": "a.png", "text": "caf\xe9", "label": "yes"}'.encode("latin-1"), "not UTF-8"),
        (json.dumps(PROBE).encode() + b"\n{oops\n", "line 2: not JSON"),
        (json.dumps({**PROBE, "label": "maybe"}).encode(), "label must be 'yes' or 'no'"),
        (json.dumps({**PROBE, "label": 1}).encode(), "label must be 'yes' or 'no', got 1"),
        (json.dumps({**PROBE, "text": ["a"]}).encode(), "needs 'image' and 'text'"),
        (json.dumps({**PROBE, "image": "gone.png"}).encode(), "gone.png does not exist"),
        (b"\n\n", "has no probes"),
    ],
)
def test_bad_lines_are_refused_naming_the_line(folder, data, message):
    _refused(_file(folder, data), message)


def test_a_bomb_declared_in_a_png_header_is_refused_before_decoding(folder):
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, 9000, 9000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    (folder / "bomb.png").write_bytes(bytes(data))
    path = _file(folder, json.dumps({**PROBE, "image": "bomb.png"}).encode())
    _refused(path, "bomb.png has 81.0 megapixels, over the 50 MP limit")


def test_allowed_large_images_are_read_now_and_others_stay_paths(folder, monkeypatch):
    Image.new("RGB", (2, 2)).save(folder / "small.png")
    lines = [json.dumps(PROBE), json.dumps({**PROBE, "image": "small.png", "label": "no"})]
    path = _file(folder, "\n".join(lines).encode())
    monkeypatch.setattr(images, "MAX_PIXELS", 10)  # the 8 x 6 image is "large" now
    _refused(path, "a.png has 0.0 megapixels, over the")
    big, small = load_pope_jsonl(path, allow_large=True)
    assert isinstance(big.image, Image.Image) and big.image.size == (8, 6)
    assert small.image == folder / "small.png" and small.label == "no"
