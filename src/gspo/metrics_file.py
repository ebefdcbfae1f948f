"""metrics.jsonl, the run's source of truth: its name and its reader.

Its own module so that the writer (gspo.tracking) and the readers (gspo.plotting, gspo.compare) share
it without importing each other: tracking draws the end-of-run plot through plotting, so plotting must
not import tracking. One JSON object per line, `{"step": int, **metrics}`; non-finite values are `null`.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(path) -> list[dict]:
    """Read metrics.jsonl (the file, or the run directory that holds it) into a list of dicts.

    A last line cut off by a killed process is skipped rather than raising.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # partial line from an interrupted write
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows
