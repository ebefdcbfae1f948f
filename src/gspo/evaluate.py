"""Evaluation: one function for the trainer, `gspo eval` and the demo model's warm start; greedy by default,
or k sampled completions per prompt with mean@k and pass@k.

This module takes a rollout engine and a reward scorer and loads nothing, so the demo model (whose warm start
evaluates through it, and which gspo.models builds on first use) can import it without a cycle. Loading a
model from a config to evaluate it (`gspo eval`) is gspo.model_eval.evaluate_model.

Each rank decodes its shard (rows rank, rank + world, ...) of the first `max_samples` rows, in
batches, with the rollout engine; the reward scorer scores them; the per-sample records (gspo.completions rows)
are gathered, so every rank returns the same metrics. The engine's session is opened once
around all batches: ranks may hold different numbers of batches, and a sharded back-end's gather
is a collective.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional, Sequence

import torch

from gspo.completions import completion_rows
from gspo.core import pass_at_k
from gspo.engines import RolloutEngine, SamplingParams

log = logging.getLogger("gspo")
# Correctness rewards, in the order accuracy_reward=None looks for them.
CORRECTNESS_REWARDS = ("math_accuracy", "reasoning_gym", "exact_answer", "answer_match")
TOTAL = None  # accuracy from the total reward


def accuracy_source(scorer, accuracy_reward: Optional[str] = None) -> Optional[str]:
    """The reward whose value defines eval/accuracy: `accuracy_reward`, else the scorer's first correctness
    reward (CORRECTNESS_REWARDS), else None (the total reward)."""
    names = [f.name for f in getattr(scorer, "funcs", [])]
    if accuracy_reward is not None:
        known = names + ["reward_model", "environment"]
        if accuracy_reward not in known:
            from gspo.config import ConfigError

            raise ConfigError(
                f"GSPOConfig.accuracy_reward={accuracy_reward!r} is not allowed: expected one of the rewards {names}"
                " (or None for the first correctness reward)."
            )
        return accuracy_reward
    return next((n for n in names if n in CORRECTNESS_REWARDS), TOTAL)


def evaluate(engine: RolloutEngine, scorer: Callable, rows: Sequence[dict], **kwargs) -> dict:
    """`evaluate_records`' metrics alone."""
    return evaluate_records(engine, scorer, rows, **kwargs)[0]


def evaluate_records(
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
    num_samples: int = 1,
    temperature: float = 1.0,
    accuracy_reward: Optional[str] = None,
    step: int = 0,
) -> tuple[dict, list]:
    """(metrics, per-sample records). Each prompt gets one greedy completion (`num_samples` 1) or `num_samples`
    sampled at `temperature`. Metrics: 'eval/reward_mean', 'eval/accuracy' (share of completions whose
    accuracy reward (accuracy_source) is >= accuracy_threshold), 'eval/reward/<name>_mean' per reward,
    'eval/completion_length_mean', 'eval/truncated_fraction', 'eval/num_samples', 'time/eval_s'; with
    num_samples k > 1 also 'eval/mean@k' and 'eval/pass@j' for j = 1, 2, 4, ..., k. `rows` hold "prompt" and
    "prompt_ids"; `gather(list) -> list` concatenates every rank's list (identity in one process). The records
    are gspo.completions rows (`step` in their step column), every rank's."""
    start = time.perf_counter()
    n = len(rows) if max_samples is None else min(len(rows), max_samples)
    shard = list(range(rank, n, world_size))
    batches = [[rows[i] for i in shard[start : start + batch_size]] for start in range(0, len(shard), batch_size)]
    # every rank decodes as many batches as rank 0, whose shard is the largest: under ZeRO-3 a forward can be a
    # collective, so a rank with fewer rows decodes a placeholder batch (its result dropped) rather than none
    most = math.ceil(math.ceil(n / world_size) / batch_size) if n else 0
    placeholders = most - len(batches) if n else 0
    sampling = (
        SamplingParams.greedy(max_new_tokens)
        if num_samples == 1
        else SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    )
    records = []
    with torch.no_grad(), engine.session():
        for batch in batches:
            rollout = engine.generate(batch, group_size=num_samples, sampling=sampling)
            result = scorer(rollout)
            scored = rollout.with_(rewards=result.total.float(), reward_per_func=result.per_func)
            records += completion_rows(scored, step)
        for _ in range(placeholders):
            engine.generate([rows[0]], group_size=num_samples, sampling=sampling)
    if gather is not None:  # one collective, whatever this rank's number of batches
        records = gather(records)
    metrics = eval_metrics(
        records,
        accuracy=accuracy_source(scorer, accuracy_reward),
        threshold=accuracy_threshold,
        num_samples=num_samples,
    )
    metrics["time/eval_s"] = time.perf_counter() - start
    return metrics, records


def eval_metrics(records: list, *, accuracy: Optional[str], threshold: float, num_samples: int = 1) -> dict:
    """The eval metrics of gathered records (whole groups of `num_samples` in a row)."""
    if not records:
        return {"eval/num_samples": 0.0}
    column = lambda key: torch.tensor([float(r[key]) for r in records], dtype=torch.float64)  # noqa: E731
    total = column("reward")
    correct = column("reward" if accuracy is TOTAL else f"reward/{accuracy}")  # NaN: no opinion
    scored = ~correct.isnan()
    hits = (correct >= threshold) & scored
    metrics = {
        "eval/reward_mean": total.mean().item(),
        "eval/accuracy": (hits.sum().double() / scored.sum()).item() if scored.any() else float("nan"),
        "eval/completion_length_mean": column("completion_length").mean().item(),
        "eval/truncated_fraction": column("truncated").mean().item(),
        "eval/num_samples": float(len(records)),  # completions scored (prompts x eval_num_samples)
        "eval/num_prompts": float(len(records) // num_samples),
    }
    for key in [k for k in records[0] if k.startswith("reward/")]:
        metrics[f"eval/{key}_mean"] = column(key).nanmean().item()
    if num_samples > 1:
        metrics[f"eval/mean@{num_samples}"] = metrics["eval/accuracy"]
        metrics.update(_pass_at(hits.view(-1, num_samples), scored.view(-1, num_samples), num_samples))
    if "episode/turns" in records[0]:  # multi-turn episodes
        metrics["eval/turns_mean"] = column("episode/turns").mean().item()
        metrics["eval/tool_call_fraction"] = (column("episode/tool_calls") > 0).double().mean().item()
    return metrics


def _pass_at(hits: torch.Tensor, scored: torch.Tensor, k: int) -> dict:
    """'eval/pass@j' for j = 1, 2, 4, ..., k over the prompts whose k completions were all scored
    ('eval/pass_prompts' of them)."""
    full = scored.all(dim=1)  # [P]
    if not full.any():
        return {"eval/pass_prompts": 0.0}
    c = hits[full].sum(dim=1)
    n = torch.full_like(c, k)
    ks = sorted({2**i for i in range(k.bit_length()) if 2**i < k} | {k})
    # prompts whose accuracy reward had no opinion on some completion are left out: say over how many it is
    return {"eval/pass_prompts": float(full.sum()), **{f"eval/pass@{j}": pass_at_k(n, c, j).mean().item() for j in ks}}


def evaluate_as_configured(engine, scorer, rows, config, *, rank: int = 0, world_size: int = 1, step: int = 0):
    """`evaluate_records` with GSPOConfig's settings (max_new_tokens, eval_batch_size, accuracy_threshold,
    accuracy_reward, eval_max_samples, eval_num_samples, eval_temperature); gathered over processes when there
    are several. Returns (metrics, records)."""
    from accelerate.utils import gather_object

    source = accuracy_source(scorer, config.accuracy_reward)
    if rank == 0:
        _announce(source, config.accuracy_threshold)
    return evaluate_records(
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
        num_samples=config.eval_num_samples,
        temperature=config.eval_temperature,
        accuracy_reward=config.accuracy_reward,
        step=step,
    )


_announced: set = set()


def _announce(source: Optional[str], threshold: float) -> None:
    """Say once per process what eval/accuracy means."""
    what = "the total reward" if source is TOTAL else f"reward {source!r}"
    if (what, threshold) not in _announced:
        _announced.add((what, threshold))
        log.warning("gspo: eval/accuracy = share of eval completions whose %s is >= %g", what, threshold)
