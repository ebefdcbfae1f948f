"""Greedy evaluation: one function for the trainer, `gspo eval` and the demo model's warm start.

This module takes a rollout engine and a reward scorer and loads nothing, so the demo model (whose warm start
evaluates through it, and which gspo.models builds on first use) can import it without a cycle. Loading a
model from a config to evaluate it (`gspo eval`) is gspo.model_eval.evaluate_model.

Each rank decodes its shard (rows rank, rank + world, ...) of the first `max_samples` rows, in
batches, greedily, with the rollout engine; the reward scorer scores them; per-sample rewards and
lengths are gathered, so every rank returns the same metrics. The engine's session is opened once
around all batches: ranks may hold different numbers of batches, and a sharded back-end's gather
is a collective.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from gspo.engines import RolloutEngine, SamplingParams


def evaluate(
    engine: RolloutEngine,
    scorer: Callable,
    rows: Sequence[dict],
    *,
    max_new_tokens: int,
    batch_size: int,
    accuracy_threshold: float,
    max_samples: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    gather: Optional[Callable] = None,
) -> dict:
    """Metrics 'eval/reward_mean', 'eval/accuracy' (share with total reward >= accuracy_threshold),
    'eval/completion_length_mean', 'eval/num_samples'. `rows` hold "prompt" and "prompt_ids";
    `gather(list) -> list` concatenates every rank's list (identity in one process)."""
    n = len(rows) if max_samples is None else min(len(rows), max_samples)
    shard = list(range(rank, n, world_size))
    batches = [[rows[i] for i in shard[start : start + batch_size]] for start in range(0, len(shard), batch_size)]
    # every rank decodes as many batches as rank 0, whose shard is the largest: under ZeRO-3 a forward can be a
    # collective, so a rank with fewer rows decodes a placeholder batch (its result dropped) rather than none
    most = math.ceil(math.ceil(n / world_size) / batch_size) if n else 0
    placeholders = most - len(batches) if n else 0
    samples = []  # (reward, length, model turns, tool calls) per sample; turns and calls None for single turns
    with torch.no_grad(), engine.session():
        for batch in batches:
            rollout = engine.generate(batch, group_size=1, sampling=SamplingParams.greedy(max_new_tokens))
            stats = rollout.episode_stats
            turns = stats["turns"].tolist() if stats else [None] * len(rollout)
            calls = stats["tool_calls"].tolist() if stats else [None] * len(rollout)
            samples += list(zip(scorer(rollout).total.tolist(), rollout.lengths.tolist(), turns, calls))
        for _ in range(placeholders):
            engine.generate([rows[0]], group_size=1, sampling=SamplingParams.greedy(max_new_tokens))
    if gather is not None:  # one collective, whatever this rank's number of batches
        samples = gather(samples)
    total = torch.tensor([s[0] for s in samples], dtype=torch.float64)
    lengths = [s[1] for s in samples]
    metrics = {
        "eval/reward_mean": total.mean().item() if len(samples) else float("nan"),
        "eval/accuracy": (total >= accuracy_threshold).double().mean().item() if len(samples) else float("nan"),
        "eval/completion_length_mean": float(sum(lengths)) / max(len(lengths), 1),
        "eval/num_samples": float(len(samples)),
    }
    episodes = [s for s in samples if s[2] is not None]  # multi-turn episodes
    if episodes:
        metrics["eval/turns_mean"] = sum(s[2] for s in episodes) / len(episodes)
        metrics["eval/tool_call_fraction"] = sum(s[3] > 0 for s in episodes) / len(episodes)  # calling a tool
    return metrics


def evaluate_as_configured(engine, scorer, rows, config, *, rank: int = 0, world_size: int = 1) -> dict:
    """`evaluate` with GSPOConfig's settings (max_new_tokens, eval_batch_size, accuracy_threshold,
    eval_max_samples); gathered over processes when there are several."""
    from accelerate.utils import gather_object

    return evaluate(
        engine,
        scorer,
        rows,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.eval_batch_size,
        accuracy_threshold=config.accuracy_threshold,
        max_samples=config.eval_max_samples,
        rank=rank,
        world_size=world_size,
        gather=gather_object if world_size > 1 else None,
    )
