"""The rollout-engine interface and the sampling settings it takes (see gspo.engines)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from gspo.rollout import Rollout


@dataclass(frozen=True)
class SamplingParams:
    """What to sample: softmax(logits / temperature) after top-k / top-p, or greedy decoding."""

    max_new_tokens: int
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def greedy(cls, max_new_tokens: int) -> "SamplingParams":
        return cls(max_new_tokens=max_new_tokens, do_sample=False)

    @classmethod
    def from_config(cls, config) -> "SamplingParams":
        return cls(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k
        )


class RolloutEngine:
    """The interface every rollout engine implements."""

    max_length = None  # the longest prompt + completion the engine can hold, when it has its own limit (vLLM)

    def session(self):
        """Context for several `generate` calls with the weights made ready once (whole, cast).
        `generate` outside a session opens one itself."""
        return contextlib.nullcontext()

    def generate(self, rows: list, *, group_size: int, sampling: SamplingParams) -> Rollout:
        """`group_size` completions per row ({"prompt", "prompt_ids", **extra}), contiguous per prompt."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine holds (a vLLM engine's memory and process-wide state)."""

    def release_memory(self) -> None:
        """Called before the policy update: an engine may free its memory (its weights too) until the next
        `sync_weights`. Never between two `generate` calls of a step (dynamic sampling's rounds, evaluation)."""

    def sync_weights(self, model) -> None:
        """Called after every optimizer update with the trained model: an engine holding its own copy
        of the weights must load them before it generates again."""
