"""An example reward function for the built-in arithmetic task, loaded by reference:

    reward_funcs: ["examples/custom_reward.py:my_reward"]     # see custom_reward.yaml

A reward function receives the batch's prompts and completions (strings), the completion
token ids, and every other dataset column as a keyword argument (here `answer`). It
returns one float per completion. Paths are relative to the directory you run gspo from.
"""
from __future__ import annotations


def _first_word(text: str) -> str:
    words = text.strip().split()
    return words[0] if words else ""


def my_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """1.0 for the exact answer, 0.5 when only the sign is wrong, 0.0 otherwise,
    minus 0.01 per completion token beyond the answer's own length (keeps answers short)."""
    answers = kwargs.get("answer") or [""] * len(completions)
    rewards = []
    for completion, ids, answer in zip(completions, completion_ids, answers):
        guess, answer = _first_word(str(completion)), str(answer).strip()
        if guess == answer:
            score = 1.0
        elif guess.lstrip("-") == answer.lstrip("-") and guess:
            score = 0.5
        else:
            score = 0.0
        extra_tokens = max(0, len(ids) - len(answer) - 1)  # the answer's characters plus EOS
        rewards.append(score - 0.01 * extra_tokens)
    return rewards
