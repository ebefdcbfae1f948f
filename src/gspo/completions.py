"""A record of every completion: `<output_dir>/completions/completions_{step:05d}.parquet`, one file per step.

Each row is one sampled completion: the step, its place in the rollout (`index`, `group`), the prompt as the
model saw it (`prompt`, the rendered conversation) and its last user message (`last_user`), the `completion`,
the total `reward`, one `reward/<name>` column per reward function (NaN where a function had no opinion), the
`advantage` (a per-token advantage averaged over the policy's tokens), `completion_length` (tokens),
`truncated`, an episode's counts (`episode/turns`, `episode/tool_calls`, ...), the row's other dataset
columns as one JSON object (`extra`), and for multi-turn episodes the whole conversation as JSON (`messages`;
null for single turns).

Cheap by construction: the rows are plain Python values taken from the finished Rollout after the update, at
most `log_completions_max_per_step` of them, and the parquet file is written by a background thread while
the next step generates. Files are written whole (a temporary file, then a rename), so a killed run leaves
complete files only; a resumed run deletes the files of the steps it redoes. `gspo eval --out` writes its
per-sample records the same way (`write_records`).
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

COMPLETIONS_DIR = "completions"
FILE_PATTERN = re.compile(r"completions_(\d+)\.parquet$")
TAIL_CHARS = 400  # a plain prompt's "last user message" is its end


def last_user_message(conversation: Optional[list], prompt: str) -> str:
    """The content of the last user message before the first assistant turn, else the end of the prompt text."""
    if conversation:
        user = None
        for m in conversation:
            if m.get("role") == "assistant":
                break
            if m.get("role") == "user":
                user = m
        if user is not None:
            return str(user.get("content") or "")
    prompt = str(prompt)
    return prompt if len(prompt) <= TAIL_CHARS else "…" + prompt[-TAIL_CHARS:]


def sequence_advantages(rollout) -> list:
    """One advantage per completion: a per-token advantage ([N, T], GAE) averaged over the loss mask."""
    adv = rollout.advantages
    if adv is None:
        return [math.nan] * len(rollout)
    if adv.dim() == 2:
        mask = rollout.loss_mask.to(adv.dtype)
        adv = (adv * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return adv.float().tolist()


def _json(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def completion_rows(rollout, step: int, limit: Optional[int] = None) -> list[dict]:
    """The first `limit` completions of a finished Rollout as record rows (module doc)."""
    n = len(rollout) if limit is None else min(len(rollout), limit)
    rewards = rollout.rewards.tolist() if rollout.rewards is not None else [math.nan] * len(rollout)
    per_func = {name: torch.as_tensor(values).float().tolist() for name, values in rollout.reward_per_func.items()}
    advantages = sequence_advantages(rollout)
    lengths, truncated = rollout.lengths.tolist(), rollout.truncated.tolist()
    stats = {f"episode/{k}": v.tolist() for k, v in rollout.episode_stats.items()}  # multi-turn episodes
    rows = []
    for i in range(n):
        conversation = rollout.messages[i] if rollout.messages else None
        prompt_messages = rollout.prompt_messages[i] if rollout.prompt_messages else None
        rows.append(
            {
                "step": int(step),
                "index": i,
                "group": i // rollout.group_size,
                "prompt": rollout.prompts[i] if rollout.prompts else "",
                "last_user": last_user_message(conversation or prompt_messages, rollout.prompts[i]),
                "completion": rollout.completions[i] if rollout.completions else "",
                "reward": float(rewards[i]),
                **{f"reward/{name}": values[i] for name, values in per_func.items()},
                "advantage": float(advantages[i]),
                "completion_length": int(lengths[i]),
                "truncated": bool(truncated[i]),
                **{k: v[i] for k, v in stats.items()},
                "extra": _json({k: v[i] for k, v in rollout.extra.items()}),
                "messages": _json(conversation) if conversation is not None else None,
            }
        )
    return rows


def write_records(rows: list[dict], path) -> Path:
    """Rows -> one parquet file, written whole (temporary file, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)
    return path


class CompletionsRecord:
    """Writes each step's completions off the training thread. With `enabled=False` (non-main ranks, or
    log_completions off) every method does nothing."""

    def __init__(self, output_dir, *, enabled: bool = True, max_per_step: int = 256) -> None:
        self.enabled = enabled and max_per_step > 0
        self.dir = Path(output_dir) / COMPLETIONS_DIR
        self.max_per_step = max_per_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gspo-completions") if self.enabled else None
        self._pending: list = []

    def path(self, step: int) -> Path:
        return self.dir / f"completions_{step:05d}.parquet"

    def add(self, step: int, rows: list[dict]) -> None:
        """Queue one step's rows (from `completion_rows`) for writing; a writer error surfaces at the next call."""
        if not self.enabled or not rows:
            return
        self._raise_finished()
        self._pending.append(self._pool.submit(write_records, rows[: self.max_per_step], self.path(step)))

    def truncate_after(self, step: int) -> None:
        """Delete the files of steps after `step` (a resumed run redoes them)."""
        if not self.enabled or not self.dir.is_dir():
            return
        for f in self.dir.iterdir():
            m = FILE_PATTERN.match(f.name)
            if m and int(m.group(1)) > step:
                f.unlink()

    def _raise_finished(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            f.result()  # re-raises a failed write

    def close(self) -> None:
        if self._pool is None:
            return
        pending, self._pending = self._pending, []
        self._pool.shutdown(wait=True)
        self._pool = None
        for f in pending:
            f.result()


def gathered_rows(rollout, step: int, *, limit: int, accelerator) -> list[dict]:
    """Every rank's first completions, `limit` in all (a collective: every rank calls it)."""
    world = accelerator.num_processes
    rows = completion_rows(rollout, step, limit=math.ceil(limit / world) if limit else 0)
    if world == 1:
        return rows
    from accelerate.utils import gather_object

    rank = accelerator.process_index
    gathered = gather_object([{**r, "rank": rank} for r in rows])
    return gathered[:limit]


# ----------------------------------------------------------------------------------
# Reading: `gspo completions RUN_DIR`
# ----------------------------------------------------------------------------------
def record_files(run_dir) -> dict:
    """{step: path} of a run's completions files (a run directory, or its completions/ directory)."""
    d = Path(run_dir)
    if (d / COMPLETIONS_DIR).is_dir():
        d = d / COMPLETIONS_DIR
    if not d.is_dir():
        raise FileNotFoundError(f"{run_dir}: no {COMPLETIONS_DIR}/ directory (was log_completions on?)")
    files = {int(m.group(1)): f for f in d.iterdir() if (m := FILE_PATTERN.match(f.name))}
    if not files:
        raise FileNotFoundError(f"{d}: no completions_*.parquet files")
    return dict(sorted(files.items()))


def read_records(path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def pick_rows(rows: list[dict], *, order: str = "first", k: int = 5, seed: int = 0) -> list[dict]:
    """`k` rows: the first, the lowest reward ("worst"), the highest ("best"), or a random sample ("sample")."""
    if order == "worst":
        return sorted(rows, key=lambda r: (r["reward"], r["index"]))[:k]
    if order == "best":
        return sorted(rows, key=lambda r: (-r["reward"], r["index"]))[:k]
    if order == "sample":
        import random

        return random.Random(seed).sample(rows, min(k, len(rows)))
    return rows[:k]


def format_row(row: dict, max_chars: int = 2000) -> str:
    """A record row as readable text: where it is from, its rewards, the question and the completion."""
    rewards = "  ".join(
        f"{k[len('reward/') :]}={_num(v)}" for k, v in row.items() if k.startswith("reward/") and v is not None
    )
    head = (
        f"step {row['step']}  #{row['index']} (group {row['group']})  reward {_num(row['reward'])}  "
        f"advantage {_num(row.get('advantage'))}  {row['completion_length']} tokens"
        f"{'  TRUNCATED' if row.get('truncated') else ''}"
    )
    body = row["completion"]
    if row.get("messages"):  # an episode: its turns after the prompt
        conversation = json.loads(row["messages"])
        start = next((i for i, m in enumerate(conversation) if m.get("role") == "assistant"), len(conversation))
        body = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in conversation[start:])
    return "\n".join(
        [head, f"rewards: {rewards}" if rewards else "", f"user: {_clip(row['last_user'], max_chars)}", "completion:"]
        + ["  " + line for line in _clip(body, max_chars).splitlines() or [""]]
    )


def _num(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _clip(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + f"… [{len(text) - limit + 1} more chars]"
