"""gspo.data: loading every file format, validation errors, formatting, truncation."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest

from gspo.data import DataError, GSPODataset, load_rows
from helpers_data import char_tokenizer

ROWS = [
    {"prompt": "1+2=", "answer": "3", "level": 1},
    {"prompt": "10-4=", "answer": "6", "level": 2},
]


def _write(tmp_path, fmt):
    """ROWS written in `fmt`; returns the path load_rows should read."""
    if fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")  # trailing blank line is fine
    elif fmt == "json":
        p = tmp_path / "d.json"
        p.write_text(json.dumps(ROWS))
    elif fmt == "json-data":
        p = tmp_path / "d.json"
        p.write_text(json.dumps({"data": ROWS}))
    elif fmt == "csv":
        p = tmp_path / "d.csv"
        pd.DataFrame(ROWS).to_csv(p, index=False)
    elif fmt == "parquet":
        p = tmp_path / "d.parquet"
        pd.DataFrame(ROWS).to_parquet(p)
    else:
        import datasets

        p = tmp_path / "hf"
        ds = datasets.Dataset.from_list(ROWS)
        (datasets.DatasetDict({"train": ds}) if fmt == "hf-dict" else ds).save_to_disk(str(p))
    return str(p)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json-data", "csv", "parquet", "hf", "hf-dict"])
def test_formats_round_trip(tmp_path, fmt):
    rows = load_rows(_write(tmp_path, fmt))
    if fmt == "csv":  # CSV cells stay text, as written in the file
        assert rows == [{k: str(v) for k, v in r.items()} for r in ROWS]
    else:
        assert rows == ROWS
    ds = GSPODataset(rows, char_tokenizer())
    assert ds.extra_columns == ["answer", "level"]
    assert len(ds) == 2
    item = ds[1]
    assert item["prompt"] == "10-4=" and str(item["answer"]) == "6" and str(item["level"]) == "2"
    assert len(item["prompt_ids"]) == 1 + 5  # <bos> + one token per character


def test_list_of_strings_and_ids():
    tok = char_tokenizer()
    ds = GSPODataset(["ab", "c"], tok)
    assert ds.extra_columns == []
    assert ds[0] == {"prompt": "ab", "prompt_ids": tok("ab")["input_ids"]}
    assert ds[0]["prompt_ids"][0] == tok.bos_token_id
    assert ds[1]["prompt_ids"] == [tok.bos_token_id, tok.convert_tokens_to_ids("c")]


def test_datasets_dataset_input():
    import datasets

    ds = GSPODataset(datasets.Dataset.from_list(ROWS), char_tokenizer())
    assert ds.extra_columns == ["answer", "level"] and ds[0]["answer"] == "3"


def test_dataframe_input():
    ds = GSPODataset(pd.DataFrame(ROWS), char_tokenizer())
    assert ds.extra_columns == ["answer", "level"] and ds[1]["prompt"] == "10-4="


def test_missing_columns_filled_with_none():
    ds = GSPODataset([{"prompt": "a", "x": 1}, {"prompt": "b", "y": 2}], char_tokenizer())
    assert ds.extra_columns == ["x", "y"]
    assert ds[1]["x"] is None and ds[1]["y"] == 2


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 3"):
        load_rows(str(p))


def test_missing_prompt_column(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "a", "answer": "1"}\n')
    with pytest.raises(DataError) as e:
        load_rows(str(p))
    assert "'prompt'" in str(e.value) and "answer" in str(e.value) and "question" in str(e.value)
    assert load_rows(str(p), prompt_column="question")[0]["question"] == "a"
    with pytest.raises(DataError, match="question"):
        GSPODataset([{"q": "a"}], char_tokenizer(), prompt_column="question")


@pytest.mark.parametrize("content", ["", "[]", '{"data": []}'])
def test_empty_dataset(tmp_path, content):
    p = tmp_path / ("d.jsonl" if content == "" else "d.json")
    p.write_text(content)
    with pytest.raises(DataError, match="empty"):
        load_rows(str(p))
    with pytest.raises(DataError, match="empty"):
        GSPODataset([], char_tokenizer())


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported extension '.txt'"):
        load_rows(str(tmp_path / "d.txt"))
    with pytest.raises(DataError, match="not a saved Hugging Face dataset"):
        load_rows(str(tmp_path))
    with pytest.raises(DataError, match="builtin:arithmetic"):
        load_rows("builtin:nope")


def test_builtin_arithmetic():
    train = load_rows("builtin:arithmetic", seed=1)
    ev = load_rows("builtin:arithmetic-eval", seed=1)
    assert len(train) == 2000 and len(ev) == 256
    assert set(train[0]) == {"prompt", "answer"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}


@pytest.mark.parametrize("bad", ["", "   \n\t"])
def test_whitespace_prompt_names_row(bad):
    with pytest.raises(DataError, match="row 1 is empty"):
        GSPODataset(["ok", bad], char_tokenizer())


def test_non_string_prompt():
    with pytest.raises(DataError, match="row 0 is a int"):
        GSPODataset([{"prompt": 5}], char_tokenizer())


def test_too_long_prompt_error():
    # "abcdef" is 7 tokens with <bos>
    with pytest.raises(DataError, match=r"row 1 is 7 tokens, longer than max_prompt_length=4"):
        GSPODataset(["ab", "abcdef"], char_tokenizer(), max_prompt_length=4)


def test_too_long_prompt_left_truncation_keeps_last_tokens():
    tok = char_tokenizer()
    with pytest.warns(UserWarning, match="2 of 3 prompts") as rec:
        ds = GSPODataset(["abcdef", "ab", "xyz123"], tok, max_prompt_length=4, truncation="left")
    assert len(rec) == 1  # warned once for both prompts
    assert ds[0]["prompt_ids"] == tok("cdef", add_special_tokens=False)["input_ids"]
    assert ds[0]["prompt"] == "cdef"
    assert ds[1]["prompt_ids"] == tok("ab")["input_ids"]  # short prompt untouched
    assert ds[2]["prompt"] == "z123"


def test_no_warning_when_nothing_truncated():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GSPODataset(["ab"], char_tokenizer(), max_prompt_length=4, truncation="left")


def test_bad_truncation_policy():
    with pytest.raises(DataError, match="truncation"):
        GSPODataset(["a"], char_tokenizer(), truncation="right")


def test_chat_messages_formatted_with_template():
    tok = char_tokenizer(chat_template=True)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}]
    ds = GSPODataset([chat, {"prompt": chat[1:], "answer": "2"}], tok)
    assert ds[0]["prompt"] == "<bos><system>be brief\n<user>1+1?\n<assistant>"
    assert ds[1]["prompt"] == "<bos><user>1+1?\n<assistant>"
    assert ds[1]["answer"] == "2" and ds[0]["answer"] is None
    # The template writes <bos> itself: exactly one <bos> id, at the start.
    ids = ds[1]["prompt_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == ds[1]["prompt"]


def test_chat_left_truncation_keeps_template_text():
    tok = char_tokenizer(chat_template=True)
    with pytest.warns(UserWarning):
        ds = GSPODataset([[{"role": "user", "content": "hello"}]], tok, max_prompt_length=14, truncation="left")
    # "<bos><user>hello\n<assistant>" is 1 + 6 + 5 + 1 + 11 tokens; the last 14 are kept.
    assert ds[0]["prompt"] == "lo\n<assistant>"
    assert ds[0]["prompt_ids"] == tok("lo\n<assistant>", add_special_tokens=False)["input_ids"]


def test_chat_without_template_is_an_error():
    with pytest.raises(DataError, match="no chat_template"):
        GSPODataset([[{"role": "user", "content": "hi"}]], char_tokenizer())


def test_chat_with_empty_content_is_an_error():
    with pytest.raises(DataError, match="row 0"):
        GSPODataset([[{"role": "user", "content": "  "}]], char_tokenizer(chat_template=True))


def test_parquet_chat_column_round_trips(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    loaded = load_rows(str(tmp_path / "c.parquet"))
    assert loaded == rows
    ds = GSPODataset(loaded, char_tokenizer(chat_template=True))
    assert ds[0]["prompt"] == "<bos><user>hi\n<assistant>"


def test_items_are_copies():
    ds = GSPODataset(["ab"], char_tokenizer())
    ds[0]["prompt_ids"].append(99)
    assert 99 not in ds[0]["prompt_ids"]
