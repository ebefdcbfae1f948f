"""Completion text and the answer it commits to: plain string helpers, no gspo imports.

Shared by the built-in rewards (gspo.rewards) and the demo task (gspo.tasks.arithmetic), so that
neither has to import the other: the library never imports its demo task.
"""

from __future__ import annotations

from typing import Any

# Strings that end a completion: eos/pad spellings in case a caller decodes
# without skipping special tokens.
END_MARKERS = ("<eos>", "<|endoftext|>", "<pad>", "</s>", "<bos>")


def completion_text(completion: Any) -> str:
    """Text of a completion: a string, a message dict, or the last message of a chat."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)) and completion:
        return completion_text(completion[-1])
    return "" if completion is None else str(completion)


def extract_answer(completion: Any) -> str:
    """The answer a completion commits to: text up to the first end marker or
    whitespace, after stripping leading/trailing whitespace."""
    text = completion_text(completion).strip()
    for marker in END_MARKERS:
        text = text.split(marker, 1)[0]
    parts = text.split()
    return parts[0] if parts else ""
