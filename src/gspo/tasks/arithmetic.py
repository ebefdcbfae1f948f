"""Integer arithmetic problems and an exact-match reward for the offline demo.

The task is two-operand addition and subtraction with operands in [0, 99]
(e.g. ``"23+58="`` -> ``"81"``, ``"17-42="`` -> ``"-25"``). It is small enough
for a tiny character-level model to learn, yet carries and borrows make it hard
enough that a briefly warm-started model gets only part of it right, which is
the regime where RL with group-relative rewards helps most.

Train, dev and eval splits partition the (a, op, b) space by a stable hash, so
no eval question is ever seen during warm start or RL. The dev split (5% of the
space, carved out of what used to be train; eval is unchanged) is what the tiny
model's warm start checks its accuracy on to decide when to stop, so that
decision never looks at the problems the demo reports on.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

# The answer parsing and the reward live in the library (gspo.answers, gspo.rewards); the task re-exports them
# under its own names. The library never imports this module for them.
from gspo.answers import END_MARKERS, completion_text, extract_answer  # noqa: F401 (re-exported)
from gspo.rewards import exact_answer as exact_answer_reward  # noqa: F401 (re-exported)

OPERATORS = ("+", "-")
MAX_OPERAND = 99
# Fraction of the problem space reserved for evaluation. 10% of 20,000 is
# plenty for a 200+ problem held-out set.
EVAL_FRACTION = 0.10
# Hash bucket [EVAL_FRACTION, EVAL_FRACTION + DEV_FRACTION) is the dev split
# (about 1,000 problems): enough for a 512-problem stopping check.
DEV_FRACTION = 0.05
SPLITS = ("train", "dev", "eval")


def _split_of(a: int, op: str, b: int) -> str:
    """Stable (process-independent) assignment of a problem to a split.

    Python's built-in hash() is salted per process, so use a digest instead.
    The eval bucket is the same as before the dev split existed, so the
    held-out set the demo reports on did not change.
    """
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    u = int.from_bytes(digest[:4], "big") / 2**32
    if u < EVAL_FRACTION:
        return "eval"
    return "dev" if u < EVAL_FRACTION + DEV_FRACTION else "train"


def _solve(a: int, op: str, b: int) -> int:
    """Ground-truth result of ``a op b``."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    raise ValueError(f"unknown operator {op!r}")


def all_problems(split: str) -> list[tuple[int, str, int]]:
    """Every (a, op, b) triple of one split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [
        (a, op, b)
        for op in OPERATORS
        for a in range(MAX_OPERAND + 1)
        for b in range(MAX_OPERAND + 1)
        if _split_of(a, op, b) == split
    ]


def format_problem(a: int, op: str, b: int) -> dict:
    """The record the trainer and reward see: prompt text and answer text."""
    return {"prompt": f"{a}{op}{b}=", "answer": str(_solve(a, op, b))}


def make_problems(n: int, seed: int, split: str = "train") -> list[dict]:
    """Sample ``n`` problems of ``split`` deterministically from ``seed``.

    Problems are drawn without replacement while ``n`` fits in the split
    (about 17,000 train / 1,000 dev / 2,000 eval), and with replacement beyond that, so
    callers can ask for long SFT streams.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    pool = all_problems(split)
    rng = random.Random(f"{split}:{seed}")
    if n <= len(pool):
        chosen = rng.sample(pool, n)
    else:
        chosen = [rng.choice(pool) for _ in range(n)]
    return [format_problem(*t) for t in chosen]


def off_by_one_teacher(problems: Sequence[dict], error_rate: float, seed: int) -> list[dict]:
    """The warm start's sloppy teacher: each answer, independently with probability `error_rate`,
    is replaced by the true result + 1 (``"23+58="`` -> ``"82"``, ``"17-42="`` -> ``"-24"``).

    The tiny model imitates this teacher, errors included, so its greedy answer is often the
    teacher's mistake while the true answer keeps much of its probability; the RL reward checks the
    true result. Deterministic in `seed`; the input is not modified.
    """
    if not 0.0 <= error_rate < 0.5:
        raise ValueError(
            f"error_rate must be in [0, 0.5) so the true answer stays the teacher's majority, got {error_rate!r}"
        )
    rng = random.Random(f"teacher:{seed}")
    return [{**p, "answer": str(int(p["answer"]) + 1)} if rng.random() < error_rate else dict(p) for p in problems]
