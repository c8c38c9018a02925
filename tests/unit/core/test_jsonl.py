"""A user's JSONL file, checked line by line: binary, encodings, JSON, objects."""

import pytest

from mmscope.core.errors import InputError
from mmscope.core.jsonl import lines, records


def test_blank_lines_are_skipped_and_a_bom_is_accepted(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n  \n{"b": "caf\xc3\xa9"}\n')
    assert records(path) == [(1, {"a": 1}), (4, {"b": "café"})]


@pytest.mark.parametrize(
    "data, message",
    [
        (b'{"a": 1}\n\x00\x01\x02\x03', "line 2: binary data"),
        ('{"q": "caf\xe9"}\n'.encode("latin-1"), "line 1: not UTF-8 text"),
        (b"\xff\xfe{\x00", "line 1: binary data"),
        (b'{"a": 1}\n{not json\n', "line 2: not JSON"),
        (b"[1, 2]\n", "line 1: expected a JSON object"),
        (b'"text"\n', "line 1: expected a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "line 1"),
    ],
)
def test_bad_content_names_the_line(tmp_path, data, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(data)
    with pytest.raises(InputError, match=message) as err:
        records(path)
    assert str(path) in str(err.value)


def test_a_folder_is_not_a_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        lines(tmp_path)
