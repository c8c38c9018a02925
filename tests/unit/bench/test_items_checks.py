"""A user's data file is checked field by field, and its images go through the one loader
with the 50-megapixel guard; every error names the file and line."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mmscope.bench import load_items
from mmscope.core import images
from mmscope.core.errors import InputError
from mmscope.world import export_dataset, make_samples
from mmscope.world.items import world_items
from mmscope.world.rle import encode_rle


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (20, 10), "white").save(tmp_path / "a.png")
    return tmp_path


def _write(folder, *records, raw: bytes | None = None):
    path = folder / "items.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _refused(path, message, **kwargs):
    with pytest.raises(InputError) as err:
        load_items(path, **kwargs)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text, text
    return text


Q = {"image": "a.png", "question": "what color ?"}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"bbox": ["a", "b", "c", "d"]}, "bbox must be [x0, y0, x1, y1] in pixels"),
        ({"bbox": [1, 2, 3]}, "bbox must be"),
        ({"bbox": [1, 2, 3, True]}, "bbox must be"),
        ({"bbox": "0,0,4,4"}, "bbox must be"),
        ({"boxes": [[0, 0, 4, 4], ["x"]]}, "each of boxes must be"),
        ({"boxes": {"a": 1}}, "boxes must be a list"),
        ({"mask_rle": "abc"}, "mask_rle must be"),
        ({"mask_rle": {"size": [10**5, 10**5], "counts": [10**10]}}, "does not match the image"),
        ({"mask_rle": {"size": [10, 20], "counts": [5, 5]}}, "not a valid run-length mask"),
        ({"answer": {"x": 1}}, "an answer must be a string or a number"),
        ({"question": 7}, "needs a question"),
        ({"image": 3}, "image must be a file name, not 3"),
        ({"image": "missing.png"}, "missing.png does not exist"),
    ],
)
def test_fields_of_the_wrong_type_or_shape(folder, extra, message):
    _refused(_write(folder, {**Q, **extra}), message)


def test_a_nan_box_from_json_is_refused(folder):
    path = _write(folder, raw=b'{"image": "a.png", "question": "q ?", "bbox": [0, 0, NaN, 4]}\n')
    _refused(path, "bbox must be")


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x00\x01\x02\x03\n", "line 1: binary data"),
        (b'{"image": "a.png", "question": "caf\xe9 ?"}\n', "line 1: not UTF-8 text"),
        (json.dumps(Q).encode() + b"\n[1, 2]\n", "line 2: expected a JSON object"),
    ],
)
def test_binary_and_non_utf8_files(folder, raw, message):
    _refused(_write(folder, raw=raw), message)


def _world_record(folder):
    export_dataset(make_samples(1, 0), folder / "world")
    return json.loads((folder / "world" / "annotations.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("bad", [99, -1, "0", 1.5, True])
def test_evidence_that_names_no_object(folder, bad):
    record = _world_record(folder)
    record["questions"][0]["evidence"] = [bad]
    path = folder / "world" / "annotations.jsonl"
    path.write_text(json.dumps(record) + "\n")
    text = _refused(path, f"evidence index {bad!r} names no object")
    assert f"the image has {len(record['objects'])}" in text


def test_world_questions_and_objects_must_be_lists_of_objects(folder):
    record = _world_record(folder)
    path = folder / "world" / "annotations.jsonl"
    for key, value, message in (
        ("questions", "what ?", "questions must be a list"),
        ("objects", [1, 2], "objects must be a list"),
    ):
        path.write_text(json.dumps({**record, key: value}) + "\n")
        _refused(path, message)
    record["questions"][0]["text"] = ["not", "text"]
    path.write_text(json.dumps(record) + "\n")
    _refused(path, "text must be a non-empty string")


def _bomb(folder):
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, 10_000, 10_000)  # the IHDR's width and height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # and its checksum
    (folder / "bomb.png").write_bytes(bytes(data))  # 100 MP declared, a few bytes of pixels


def test_a_decompression_bomb_in_data_is_refused(folder):
    _bomb(folder)
    _refused(_write(folder, {**Q, "image": "bomb.png"}), "100.0 megapixels, over the 50 MP")


def test_large_images_pass_with_allow_large(folder, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100)  # the 20 x 10 image is "large" now
    path = _write(folder, Q)
    _refused(path, "over the 0 MP limit")
    (item,) = load_items(path, allow_large=True)
    assert item.image.size == (20, 10)


def test_each_image_is_read_once_and_good_files_still_load(folder):
    mask = np.zeros((10, 20), bool)
    mask[2:4, 3:9] = True
    path = _write(folder, {**Q, "mask_rle": encode_rle(mask)}, {**Q, "bbox": [0, 0, 2.6, 3]})
    a, b = load_items(path)
    assert a.image is b.image and np.array_equal(a.mask, mask) and b.mask.sum() == 9


def test_world_items_have_a_ceiling():
    with pytest.raises(InputError, match="n must be an integer of at most 100,000"):
        world_items(10**9)
