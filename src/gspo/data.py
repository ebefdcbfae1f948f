"""Prompt data: load rows from files, format and tokenize them once.

Two pieces:

* `load_rows(path)` reads a .jsonl / .json / .csv / .parquet file, a local Hugging
  Face dataset directory (`datasets.save_to_disk`), `builtin:arithmetic` /
  `builtin:arithmetic-eval`, or `reasoning_gym:<task>?size=N&seed=S` (built with reasoning-gym), into a list
  of plain dicts.
* `GSPODataset(prompts, tokenizer)` turns strings, chat-message lists or dict rows
  into `{"prompt": text, "prompt_ids": [...], **extra_columns}` items. Extra columns
  (every column but the prompt column) travel with the prompt so the trainer can hand
  them to the reward functions as keyword arguments.

Choices, on purpose:

* CSV cells are read as text exactly as written (`dtype=str`, no NaN guessing), so an
  answer "007" or "3.50" reaches a reward function unchanged. Use JSONL or parquet
  when columns need real types.
* Plain-string prompts are tokenized with the tokenizer's default special tokens (a
  BOS where the tokenizer adds one). Chat-formatted prompts are tokenized with
  `add_special_tokens=False`, because the chat template already writes its own BOS /
  role tokens and adding them again would double them.
* Rows that lack a column other rows have get None for it, so every item has the
  same keys and the trainer can repeat columns per completion without gaps.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

BUILTIN_DATASETS = {
    # name -> (task module, number of problems, split). The eval sets are smaller: they are decoded greedily.
    "builtin:arithmetic": ("gspo.tasks.arithmetic", 2000, "train"),
    "builtin:arithmetic-eval": ("gspo.tasks.arithmetic", 256, "eval"),
    "builtin:tools": ("gspo.tasks.tool_use", 2000, "train"),  # two-digit products, for the calculator tool
    "builtin:tools-eval": ("gspo.tasks.tool_use", 256, "eval"),
}
REASONING_GYM_PREFIX = "reasoning_gym:"
REASONING_GYM_COLUMN = "reasoning_gym"  # the entry reasoning-gym's score_answer needs (gspo.verifiers)
FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
TRUNCATION_POLICIES = ("error", "left")


class DataError(ValueError):
    """The prompt data cannot be used. The message names the file / row / column."""


# ----------------------------------------------------------------------------------
# Loading rows
# ----------------------------------------------------------------------------------
def load_rows(path: str, prompt_column: str = "prompt", *, seed: int = 42) -> list[dict]:
    """Read prompt rows from `path` into a list of dicts and check the prompt column.

    `seed` only matters for the built-in arithmetic sets (which problems are drawn).
    Raises DataError for a missing file, an unknown format, a malformed record, an
    empty dataset, or rows without `prompt_column`.
    """
    path = str(path)
    if path in BUILTIN_DATASETS:
        import importlib  # the task modules are only needed for the demos

        module, n, split = BUILTIN_DATASETS[path]
        rows = importlib.import_module(module).make_problems(n=n, seed=seed, split=split)
    elif path.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset {path!r}; built-ins are {sorted(BUILTIN_DATASETS)}")
    elif path.startswith(REASONING_GYM_PREFIX):
        rows = load_reasoning_gym(path, prompt_column, seed=seed)
    elif os.path.isdir(path):
        rows = _load_hf_dir(path)
    elif not os.path.exists(path):
        raise DataError(f"dataset file {path!r} does not exist")
    else:
        rows = _load_file(path)
    return _check_rows(rows, path, prompt_column)


def _load_file(path: str) -> list:
    """Dispatch on the file extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        return _load_jsonl(path)
    if ext == ".json":
        return _load_json(path)
    if ext == ".csv":
        return _load_csv(path)
    if ext == ".parquet":
        import pyarrow.parquet as pq

        # pyarrow's to_pylist gives plain Python values (lists stay lists), unlike
        # pandas, which would hand back numpy arrays for list columns such as chats.
        return pq.read_table(path).to_pylist()
    raise DataError(
        f"dataset file {path!r} has unsupported extension {ext or '(none)'!r}; "
        f"allowed: {list(FILE_FORMATS)} or a Hugging Face dataset directory"
    )


def _not_utf8(path: str, data: bytes, offset: int, line_offset: int = 0) -> DataError:
    """DataError for the undecodable byte at `offset` of `data` (one line of the file when line_offset > 0,
    else the whole file): the line number, the byte and its column (in characters, counted from 1)."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    lineno = line_offset or data.count(b"\n", 0, offset) + 1
    column = len(data[line_start:offset].decode("utf-8", errors="replace")) + 1
    return DataError(
        f"file {path}: line {lineno} is not valid UTF-8 (byte 0x{data[offset]:02x} at column {column}); "
        "save the file as UTF-8"
    )


def _read_text(path: str) -> str:
    """The whole file as text: UTF-8, a leading byte-order mark dropped ("utf-8-sig")."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # e.object is the data without the BOM, and e.start an offset into it
        raise _not_utf8(path, e.object, e.start) from None


def _empty(path: str, what: str = "0 bytes") -> DataError:
    return DataError(f"dataset file {path!r} is empty ({what})")


def _load_jsonl(path: str) -> list:
    """One JSON object per line; blank lines are skipped. Read as bytes and decoded line by line, so an
    undecodable byte is reported with its line."""
    rows = []
    blank = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e.object, e.start, line_offset=lineno) from None
            if not line.strip():
                blank += 1
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON: {e.msg} (column {e.colno})") from e
    if not rows:
        raise _empty(path, f"{blank} blank line(s), no records" if blank else "0 bytes")
    return rows


def _load_json(path: str) -> list:
    """A JSON list of objects, or an object whose "data" key holds that list."""
    text = _read_text(path)
    if not text.strip():
        raise _empty(path, "only whitespace" if text else "0 bytes")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from e
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        return payload["data"]
    if isinstance(payload, list):
        return payload
    raise DataError(
        f'{path}: expected a JSON list of objects or {{"data": [...]}}, got {type(payload).__name__}'
        + (f" with keys {sorted(payload)[:10]}" if isinstance(payload, dict) else "")
    )


def _load_csv(path: str) -> list:
    """A CSV file with a header line; cells stay the text written in the file."""
    import io

    import pandas as pd

    text = _read_text(path)
    if not text.strip():
        raise _empty(path, "only whitespace" if text else "0 bytes")
    try:
        # dtype=str / keep_default_na=False: cells stay the text written in the file.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as e:
        raise _csv_shape_error(path, text) or DataError(f"{path}: cannot be read as CSV: {e}") from e
    if frame.empty:
        raise _empty(path, f"a header line with columns {list(frame.columns)}, no rows")
    return frame.to_dict(orient="records")


def _csv_shape_error(path: str, text: str) -> Optional[DataError]:
    """The first row with more cells than the header has columns (what pandas rejects), found again with the
    csv module to name its line; None when there is none."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text, newline=""))
    header_cells, header_line = None, 0
    for row in reader:
        if not row:  # a blank line, skipped as pandas does
            continue
        if header_cells is None:
            header_cells, header_line = len(row), reader.line_num
            continue
        if len(row) > header_cells:
            return DataError(
                f"{path}: line {reader.line_num} has {len(row)} cells, but the header (line {header_line}) has "
                f"{header_cells} columns; quote a cell that holds a comma"
            )
    return None


def _load_hf_dir(path: str) -> list:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises FileNotFoundError / ValueError variants
        raise DataError(f"{path!r} is a directory but not a saved Hugging Face dataset: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: dataset has splits {list(ds)}, expected a 'train' split")
        ds = ds["train"]
    return ds.to_list()


def load_reasoning_gym(spec: str, prompt_column: str = "prompt", *, seed: int = 42) -> list[dict]:
    """`reasoning_gym:<task>?size=N&seed=S&<task option>=<value>...` -> rows with the question as a one-message chat
    (prompt_column), the task's `answer`, and the whole entry under `reasoning_gym` for its own scorer. Options
    other than size and seed go to reasoning-gym's task config (numbers parsed as numbers); seed defaults to
    GSPOConfig.seed and size to 1000."""
    from urllib.parse import parse_qsl

    task, _, query = spec[len(REASONING_GYM_PREFIX) :].partition("?")
    options: dict[str, Any] = {"size": 1000, "seed": seed}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        options[key] = _number_or_text(value)
    try:
        import reasoning_gym
    except ImportError as e:
        raise DataError(
            f"dataset {spec!r} needs reasoning-gym, which is not installed: pip install 'gspo[reasoning-gym]'"
        ) from e
    if task not in reasoning_gym.factory.DATASETS:
        raise DataError(
            f"dataset {spec!r}: reasoning-gym has no task {task!r}; it has {sorted(reasoning_gym.factory.DATASETS)}"
        )
    try:
        entries = reasoning_gym.create_dataset(task, **options)
    except Exception as e:  # reasoning-gym's config checks raise assorted errors
        raise DataError(f"dataset {spec!r}: reasoning-gym could not build it with {options}: {e}") from e
    return [
        {
            prompt_column: [{"role": "user", "content": e["question"]}],
            "answer": str(e["answer"]),
            REASONING_GYM_COLUMN: e,
        }
        for e in entries
    ]


def _number_or_text(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def read_system_prompt(value: Optional[str]) -> Optional[str]:
    """GSPOConfig.system_prompt: the text itself, or the path of a file holding it."""
    if value is None:
        return None
    path = os.path.expanduser(value)
    if len(value) < 4096 and "\n" not in value and os.path.isfile(path):
        return Path(path).read_text(encoding="utf-8").strip()
    return value


def _check_rows(rows: list, source: str, prompt_column: str) -> list[dict]:
    """Every row a dict holding `prompt_column`; at least one row."""
    if not rows:
        raise DataError(f"dataset {source!r} is empty (no rows)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"{source}: row {i} is a {type(row).__name__}, expected an object with a {prompt_column!r} field"
            )
        if prompt_column not in row:
            raise DataError(
                f"{source}: row {i} has no prompt column {prompt_column!r}; "
                f"columns present: {sorted(row)} (set prompt_column to choose another)"
            )
    return rows


# ----------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------
class GSPODataset(torch.utils.data.Dataset):
    """Formatted, tokenized prompts plus their extra columns.

    `prompts`: a list of strings, a list of chat-message lists
    (`[{"role": ..., "content": ...}, ...]`), a list of dicts holding `prompt_column`
    (a string or a message list) and any extra columns, a `datasets.Dataset`, or a
    pandas DataFrame.
    Each item is `{"prompt": formatted text, "prompt_ids": list[int], **extras}`.
    """

    def __init__(
        self,
        prompts: Any,
        tokenizer: Any,
        prompt_column: str = "prompt",
        max_prompt_length: Optional[int] = None,
        truncation: str = "error",
        system_prompt: Optional[str] = None,
    ) -> None:
        if truncation not in TRUNCATION_POLICIES:
            raise DataError(f"truncation must be one of {list(TRUNCATION_POLICIES)}, got {truncation!r}")
        if max_prompt_length is not None and max_prompt_length < 1:
            raise DataError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
        self.tokenizer = tokenizer
        self.prompt_column = prompt_column
        rows = _as_rows(prompts, prompt_column)
        self.extra_columns: list[str] = _extra_columns(rows, prompt_column)
        if system_prompt is not None:
            rows = [
                {**row, prompt_column: _with_system(i, row[prompt_column], system_prompt)} for i, row in enumerate(rows)
            ]
        texts, is_chat = zip(*(self._format(i, row[prompt_column]) for i, row in enumerate(rows)))
        ids = _tokenize(tokenizer, list(texts), list(is_chat))
        texts, ids = self._limit_length(list(texts), ids, list(is_chat), max_prompt_length, truncation)
        # a chat prompt keeps its messages: multi-turn episodes render them again, with the tools
        self._items = [
            {
                "prompt": t,
                "prompt_ids": p,
                **({"prompt_messages": list(row[prompt_column])} if chat else {}),
                **{c: copy.deepcopy(row.get(c)) for c in self.extra_columns},  # the caller's rows stay theirs
            }
            for t, p, chat, row in zip(texts, ids, is_chat, rows)
        ]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:
        # A shallow copy, so a caller editing the item cannot corrupt the dataset.
        item = self._items[i]
        return {**item, "prompt_ids": list(item["prompt_ids"])}

    def _format(self, i: int, value: Any) -> tuple[str, bool]:
        """Row i's prompt value -> (text fed to the model, whether it came from a chat)."""
        if isinstance(value, str):
            if not value.strip():
                raise DataError(f"prompt of row {i} is empty or whitespace only")
            return value, False
        if _is_message_list(value):
            if not value or not any(str(m.get("content") or "").strip() for m in value):
                raise DataError(f"prompt of row {i} is a chat with no message content")
            if not getattr(self.tokenizer, "chat_template", None):
                raise DataError(
                    f"prompt of row {i} is a list of chat messages, but the tokenizer "
                    f"{type(self.tokenizer).__name__} has no chat_template; set tokenizer.chat_template "
                    "or pass plain-string prompts"
                )
            text = self.tokenizer.apply_chat_template(list(value), tokenize=False, add_generation_prompt=True)
            return text, True
        raise DataError(
            f"prompt of row {i} is a {type(value).__name__}; expected a string or a list of "
            "{'role': ..., 'content': ...} messages"
        )

    def _limit_length(self, texts, ids, is_chat, max_len, policy):
        """Apply max_prompt_length: raise on the first long prompt, or keep its last tokens."""
        if max_len is None:
            return texts, ids
        long_rows = [i for i, p in enumerate(ids) if len(p) > max_len]
        if not long_rows:
            return texts, ids
        if policy == "error":
            i = long_rows[0]
            raise DataError(
                f"prompt of row {i} is {len(ids[i])} tokens, longer than max_prompt_length={max_len} "
                f"({len(long_rows)} prompt(s) too long); raise max_prompt_length or set prompt_truncation='left'"
            )
        for i in long_rows:
            ids[i] = ids[i][-max_len:]
            # Special tokens written by a chat template are part of its text; for plain
            # prompts only the tokenizer added them, so they are left out of the text.
            texts[i] = self.tokenizer.decode(ids[i], skip_special_tokens=not is_chat[i])
        warnings.warn(
            f"{len(long_rows)} of {len(ids)} prompts were longer than max_prompt_length={max_len} "
            "tokens and were cut on the left (their last tokens kept)",
            stacklevel=3,
        )
        return texts, ids


def _with_system(i: int, value: Any, system_prompt: str) -> Any:
    """Row i's prompt with the system message first: a plain prompt becomes a user message."""
    if isinstance(value, str):
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": value}]
    if _is_message_list(value):
        if value and value[0].get("role") == "system":
            raise DataError(
                f"prompt of row {i} already starts with a system message, and system_prompt is set: keep one of them"
            )
        return [{"role": "system", "content": system_prompt}, *value]
    return value  # _format names the bad type


def _is_message_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in value)


def _as_rows(prompts: Any, prompt_column: str) -> list[dict]:
    """Normalise the accepted input shapes to a list of dict rows."""
    try:
        import datasets

        if isinstance(prompts, datasets.Dataset):
            if prompt_column not in prompts.column_names:
                raise DataError(
                    f"dataset has no prompt column {prompt_column!r}; columns present: {prompts.column_names}"
                )
            prompts = prompts.to_list()
    except ImportError:  # datasets is optional for list input
        pass
    if type(prompts).__name__ == "DataFrame" and hasattr(prompts, "to_dict"):  # pandas, without importing it
        prompts = prompts.to_dict(orient="records")
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence):
        raise DataError(
            f"prompts must be a list of strings, message lists or dicts, or a datasets.Dataset; "
            f"got {type(prompts).__name__}"
        )
    if len(prompts) == 0:
        raise DataError("prompt dataset is empty (no rows)")
    rows = [p if isinstance(p, dict) else {prompt_column: p} for p in prompts]
    return _check_rows(rows, "prompts", prompt_column)


def _extra_columns(rows: list[dict], prompt_column: str) -> list[str]:
    """Every column but the prompt, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key != prompt_column:
                seen.setdefault(key, None)
    taken = [k for k in ("prompt_ids", "prompt_messages") if k in seen]
    if taken or ("prompt" in seen and prompt_column != "prompt"):
        clash = taken[0] if taken else "prompt"
        raise DataError(f"extra column {clash!r} clashes with the item key the dataset fills in; rename it")
    return list(seen)


def _tokenize(tokenizer: Any, texts: list[str], is_chat: list[bool]) -> list[list[int]]:
    """Token ids per text; chat-formatted texts without added special tokens (see module doc)."""
    out: list[Optional[list[int]]] = [None] * len(texts)
    for chat in (False, True):
        idx = [i for i, c in enumerate(is_chat) if c == chat]
        if not idx:
            continue
        enc = tokenizer([texts[i] for i in idx], add_special_tokens=not chat)["input_ids"]
        for i, ids in zip(idx, enc):
            out[i] = list(ids)
    return out  # type: ignore[return-value]


def steps_per_epoch(num_rows: int, *, batch_size: int, world_size: int) -> int:
    """Rollout batches in one pass over the prompts (the last partial batch is dropped)."""
    from gspo.config import ConfigError

    if batch_size % world_size:
        raise ConfigError(
            f"GSPOConfig.batch_size={batch_size} must be divisible by the number of processes ({world_size})"
        )
    if num_rows < batch_size:
        raise ConfigError(f"the dataset has {num_rows} prompts, fewer than GSPOConfig.batch_size={batch_size}")
    return num_rows // batch_size


def rank_batch(
    dataset, *, step: int, steps_per_epoch: int, batch_size: int, seed: int, rank: int, world_size: int
) -> list:
    """This rank's prompts for `step`: a deterministic function of (seed, step), so resume needs no sampler
    state; each epoch is a fresh permutation, split into batch_size prompts per step, batch_size / world per rank."""
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
    per_rank = batch_size // world_size
    start = k * batch_size + rank * per_rank
    return [dataset[int(i)] for i in order[start : start + per_rank]]


class PromptStream:
    """This rank's prompt batches, one after another: batch k is rank_batch(step=k). `position` counts the
    batches taken so far; a checkpoint keeps it, because dynamic sampling takes more than one per step."""

    def __init__(self, dataset, *, batch_size: int, seed: int, rank: int, world_size: int, position: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.position = rank, world_size, position
        self.steps_per_epoch = steps_per_epoch(len(dataset), batch_size=batch_size, world_size=world_size)

    def __iter__(self):
        return self

    def __next__(self) -> list:
        rows = rank_batch(
            self.dataset,
            step=self.position,
            steps_per_epoch=self.steps_per_epoch,
            batch_size=self.batch_size,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.position += 1
        return rows


def as_dataset(data, tokenizer, config):
    """A GSPODataset from a GSPODataset (as is), a file or dataset path, or a list of prompts or rows (None: None)."""
    if data is None or isinstance(data, GSPODataset):
        return data
    rows = load_rows(data, config.prompt_column, seed=config.seed) if isinstance(data, (str, Path)) else data
    return GSPODataset(
        rows,
        tokenizer,
        config.prompt_column,
        config.max_prompt_length,
        config.prompt_truncation,
        system_prompt=read_system_prompt(config.system_prompt),
    )
