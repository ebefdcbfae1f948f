"""Input errors name the file and the line: non-UTF-8 bytes, a CSV row with an extra cell, empty files, a
byte-order mark (read, not rejected), and a key written twice in a YAML config."""

from __future__ import annotations

import pytest

from gspo.config import ConfigError
from gspo.data import DataError, load_rows
from gspo.yaml_config import load_config, read_yaml

BOM = b"\xef\xbb\xbf"


def _file(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# ------------------------------------------------------------------ not UTF-8
# Columns count characters from 1: `{"prompt": "` is 12 characters, "é" one character (two bytes).
@pytest.mark.parametrize(
    "name, data, line, byte, column",
    [
        ("d.jsonl", b'{"prompt": "a"}\n{"prompt": "\xc3\xa9b\xff"}\n', 2, "0xff", 15),
        ("d.jsonl", BOM + b'{"prompt": "\xfe"}\n', 1, "0xfe", 13),  # the BOM is not a column
        ("d.json", b'[\n  {"prompt": "a"},\n  {"prompt": "\x80"}\n]\n', 3, "0x80", 15),  # 2 spaces + 12
        ("d.csv", b"prompt,answer\nab,1\ncd,2\nx\xe9y,3\n", 4, "0xe9", 2),  # latin-1 "é"
        ("d.csv", BOM + b"prompt,answer\n\xc3\xa9\xc3\xa9,\xc0\n", 2, "0xc0", 4),
    ],
)
def test_non_utf8_names_file_line_byte_and_column(tmp_path, name, data, line, byte, column):
    path = _file(tmp_path, name, data)
    with pytest.raises(DataError) as e:
        load_rows(path)
    assert str(e.value) == (
        f"file {path}: line {line} is not valid UTF-8 (byte {byte} at column {column}); save the file as UTF-8"
    )


# ------------------------------------------------------------------ CSV shape
def test_csv_row_with_an_extra_cell_names_line_and_counts(tmp_path):
    path = _file(tmp_path, "d.csv", b"prompt,answer\n1+2=,3\n2+2=,4,extra\n")
    with pytest.raises(DataError) as e:
        load_rows(path)
    assert str(e.value) == (
        f"{path}: line 3 has 3 cells, but the header (line 1) has 2 columns; quote a cell that holds a comma"
    )


def test_csv_extra_cell_line_counts_physical_lines(tmp_path):
    # line 1 header, lines 2-3 one quoted cell spanning two lines, line 4 blank, line 5 the bad row
    # (pandas itself says "line 4")
    path = _file(tmp_path, "d.csv", b'prompt,answer\n"a\nb",1\n\nc,2,3\n')
    with pytest.raises(DataError, match=r"line 5 has 3 cells, but the header \(line 1\) has 2 columns"):
        load_rows(path)


# ------------------------------------------------------------------ empty files
@pytest.mark.parametrize(
    "name, data, why",
    [
        ("d.csv", b"", "0 bytes"),
        ("d.csv", b"  \n\n", "only whitespace"),
        ("d.csv", b"prompt,answer\n", "a header line with columns ['prompt', 'answer'], no rows"),
        ("d.jsonl", b"", "0 bytes"),
        ("d.jsonl", b"\n  \n", "2 blank line(s), no records"),
        ("d.json", b"", "0 bytes"),
        ("d.json", b" \n", "only whitespace"),
    ],
)
def test_empty_file_is_named(tmp_path, name, data, why):
    path = _file(tmp_path, name, data)
    with pytest.raises(DataError) as e:
        load_rows(path)
    assert str(e.value) == f"dataset file {path!r} is empty ({why})"


# ------------------------------------------------------------------ byte-order mark
@pytest.mark.parametrize(
    "name, data",
    [
        ("d.jsonl", BOM + b'{"prompt": "q", "answer": "007"}\n'),
        ("d.json", BOM + b'[{"prompt": "q", "answer": "007"}]'),
        ("d.csv", BOM + b"prompt,answer\nq,007\n"),
    ],
)
def test_utf8_bom_is_read(tmp_path, name, data):
    assert data.startswith(b"\xef\xbb\xbf")
    rows = load_rows(_file(tmp_path, name, data))
    assert rows == [{"prompt": "q", "answer": "007"}]  # not a "\ufeffprompt" column, nor a JSON error


def test_valid_utf8_beyond_ascii_still_reads(tmp_path):
    rows = load_rows(_file(tmp_path, "d.jsonl", '{"prompt": "héllo ✓"}\n'.encode()))
    assert rows == [{"prompt": "héllo ✓"}]


# ------------------------------------------------------------------ YAML duplicate keys
def test_yaml_duplicate_top_level_key_names_key_and_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("group_size: 4\nlearning_rate: 1.0e-5\ngroup_size: 8\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(str(path))
    assert str(e.value) == (
        f"config file {str(path)!r}: key 'group_size' is given twice, on line 1 and again on line 3; "
        "remove one (YAML would silently keep the last)"
    )
    with pytest.raises(ConfigError, match="'group_size' is given twice"):
        load_config(str(path))


def test_yaml_duplicate_nested_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("reward_kwargs:\n  fn:\n    a: 1\n    b: 2\n    a: 3\n")
    with pytest.raises(ConfigError, match=r"key 'a' is given twice, on line 3 and again on line 5"):
        read_yaml(str(path))
    path.write_text("outer:\n  - {x: 1, x: 2}\n")  # a flow mapping inside a list
    with pytest.raises(ConfigError, match=r"key 'x' is given twice, on line 2 and again on line 2"):
        read_yaml(str(path))


def test_yaml_otherwise_reads_like_safe_load(tmp_path):
    path = tmp_path / "run.yaml"
    # same key in different mappings is fine; a merge key's values may be overridden
    path.write_text("a: {k: 1}\nb: {k: 2}\nbase: &b\n  x: 1\n  y: 2\nd:\n  <<: *b\n  x: 3\ne: 3e-4\nf: null\n")
    assert read_yaml(str(path)) == {
        "a": {"k": 1},
        "b": {"k": 2},
        "base": {"x": 1, "y": 2},
        "d": {"x": 3, "y": 2},
        "e": "3e-4",  # PyYAML's YAML 1.1: no dot, a string
        "f": None,
    }
    path.write_text("")
    assert read_yaml(str(path)) == {}
    path.write_text("a: !!python/object/apply:os.getcwd []\n")  # the safe loader builds no Python objects
    with pytest.raises(ConfigError, match="is not valid YAML"):
        read_yaml(str(path))
