"""metrics.jsonl, the run's source of truth: its name and its reader.

Its own module so that the writer (gspo.tracking) and the readers (gspo.plotting, gspo.compare) share
it without importing each other: tracking draws the end-of-run plot through plotting, so plotting must
not import tracking. One JSON object per line, `{"step": int, **metrics}`; non-finite values are `null`,
and a row that had any also holds `"non_finite": [their keys]`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(path) -> list[dict]:
    """Read metrics.jsonl (the file, or the run directory that holds it) into a list of dicts.

    A torn last line (no newline at its end and not valid JSON: a process killed while writing it) is
    dropped with a warning naming the file and the line. Any other line that is not valid JSON (two rows
    glued together, bytes that are not UTF-8) raises ValueError naming the file and the line: the file
    was damaged, and skipping the line would hide a step. Rows keep every key, a row's "non_finite" list
    (the keys whose values were NaN/inf and were written as null) included.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    # split() leaves "" after a final newline; a non-empty last piece is a line without its newline
    torn_candidate = len(lines) if lines[-1].strip() else None
    rows = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            why = f"{e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            if lineno == torn_candidate:
                warnings.warn(
                    f"{path}: line {lineno}, the last, is cut off ({why}; a run killed while writing it) and "
                    "was dropped",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            raise ValueError(f"{path}: line {lineno} is not one valid JSON row: {why}") from None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows
