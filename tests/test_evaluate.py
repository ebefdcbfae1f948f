"""The one evaluation function (gspo.evaluate) and the reward scorer, through their seams."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config
from transformers import AutoModelForCausalLM

from gspo.engines import RolloutEngine
from gspo.evaluate import evaluate
from gspo.model_eval import evaluate_model
from gspo.models import load_tokenizer
from gspo.rewards import RewardFunction, RewardScorer
from gspo.rollout import Rollout


class FixedEngine(RolloutEngine):
    """Completion i of the dataset is the text "x" * lengths[i] (one token each): no model at all."""

    def __init__(self, lengths):
        self.lengths, self.calls, self.sessions = lengths, [], 0

    def session(self):
        self.sessions += 1
        return super().session()

    def generate(self, rows, *, group_size, sampling):
        assert group_size == 1 and not sampling.do_sample  # evaluation is greedy, one completion per prompt
        self.calls.append([r["i"] for r in rows])
        width = max(self.lengths[r["i"]] for r in rows)
        mask = torch.tensor([[1] * self.lengths[r["i"]] + [0] * (width - self.lengths[r["i"]]) for r in rows])
        return Rollout(
            prompt_ids=torch.zeros(len(rows), 1, dtype=torch.long),
            prompt_mask=torch.ones(len(rows), 1),
            completion_ids=torch.zeros_like(mask),
            completion_mask=mask,
            truncated=torch.zeros(len(rows), dtype=torch.bool),
            group_size=1,
            prompts=[r["prompt"] for r in rows],
            completions=["x" * self.lengths[r["i"]] for r in rows],
            extra={"i": [r["i"] for r in rows]},
        )


def quarter_length(completions, **kwargs):
    return [len(c) / 4 for c in completions]


def rows(n):
    return [{"prompt": f"p{i}", "prompt_ids": [1], "i": i} for i in range(n)]


def test_evaluate_metrics_by_hand_with_a_shard_and_batches():
    lengths = [4, 0, 2, 3, 1, 2, 8]
    scorer = RewardScorer([RewardFunction("quarter_length", quarter_length)])
    engine = FixedEngine(lengths)
    # max_samples=6 drops row 6; world 2: rank 1 holds rows 1, 3, 5, in batches of 2: [1, 3], [5]
    shard = evaluate(
        engine,
        scorer,
        rows(7),
        max_new_tokens=8,
        batch_size=2,
        accuracy_threshold=0.5,
        max_samples=6,
        rank=1,
        world_size=2,
    )
    assert engine.calls == [[1, 3], [5]] and engine.sessions == 1  # one session around every batch
    # rewards 0/4, 3/4, 2/4 -> mean 5/12; >= 0.5: 2 of 3; lengths 0, 3, 2 -> 5/3
    assert shard.pop("time/eval_s") > 0
    assert shard == pytest.approx(
        {
            "eval/reward_mean": 5 / 12,
            "eval/accuracy": 2 / 3,  # quarter_length is no correctness reward: accuracy reads the total
            "eval/reward/quarter_length_mean": 5 / 12,
            "eval/completion_length_mean": 5 / 3,
            "eval/truncated_fraction": 0.0,
            "eval/num_samples": 3.0,
            "eval/num_prompts": 3.0,
        },
        abs=1e-12,
    )

    # a gather that adds rank 0's records (rows 0, 2, 4: rewards 1, 0.5, 0.25; lengths 4, 2, 1), one call for all
    def fake_gather(records):
        gathered.append(len(records))
        rank0 = [
            {"reward": r, "reward/quarter_length": r, "completion_length": n, "truncated": False}
            for r, n in ((1.0, 4), (0.5, 2), (0.25, 1))
        ]
        return rank0 + records

    gathered = []

    both = evaluate(
        FixedEngine(lengths),
        scorer,
        rows(7),
        max_new_tokens=8,
        batch_size=2,
        accuracy_threshold=0.5,
        max_samples=6,
        rank=1,
        world_size=2,
        gather=fake_gather,
    )
    both.pop("time/eval_s")
    # all six: rewards 1, .5, .25, 0, .75, .5 -> mean 3/6 = 0.5; >= 0.5: 4 of 6; lengths sum 12 -> 2
    assert both == pytest.approx(
        {
            "eval/reward_mean": 0.5,
            "eval/accuracy": 4 / 6,
            "eval/reward/quarter_length_mean": 0.5,
            "eval/completion_length_mean": 2.0,
            "eval/truncated_fraction": 0.0,
            "eval/num_samples": 6.0,
            "eval/num_prompts": 6.0,
        },
        abs=1e-12,
    )
    assert gathered == [3]  # this rank's three samples, in one gather


def test_scorer_is_bound_once_and_weighs_functions():
    scorer = RewardScorer.from_config(
        small_config("m", "/tmp/x", reward_funcs=["length_penalty"], reward_weights=[2.0]), [quarter_length]
    )
    rollout = FixedEngine([4, 2]).generate(rows(2), group_size=1, sampling=_greedy())
    result = scorer(rollout)
    # length_penalty: -0.001 per token x weight 2 -> -0.008, -0.004; quarter_length: 1.0, 0.5
    assert result.total.tolist() == pytest.approx([0.992, 0.496], abs=1e-6)
    assert sorted(result.per_func) == ["length_penalty", "quarter_length"]


def _greedy():
    from gspo.engines import SamplingParams

    return SamplingParams.greedy(4)


def test_evaluate_model_matches_an_independent_greedy_decode(tiny_model_dir, tmp_path):
    """`gspo eval`'s function on a real model: the completion lengths and the length reward equal those of a
    plain `model.generate(do_sample=False)` loop written here, prompt by prompt."""
    prompts = ["1+2=", "13+4=", "7-7=", "20+22=", "5-9="]
    cfg = small_config(tiny_model_dir, tmp_path, reward_funcs=[], max_new_tokens=5, eval_batch_size=2)
    metrics = evaluate_model(cfg, [{"prompt": p} for p in prompts], reward_funcs=[quarter_length])
    tok = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    lengths, rewards = [], []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=5,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        n = out.index(tok.eos_token_id) + 1 if tok.eos_token_id in out else len(out)  # EOS counts as a token
        lengths.append(n)
        rewards.append(len(tok.decode(out[:n], skip_special_tokens=True)) / 4)
    assert metrics["eval/num_samples"] == 5.0
    assert metrics["eval/completion_length_mean"] == pytest.approx(sum(lengths) / 5, abs=1e-12)
    assert metrics["eval/reward_mean"] == pytest.approx(sum(rewards) / 5, abs=1e-6)
    assert metrics["eval/accuracy"] == pytest.approx(sum(r >= cfg.accuracy_threshold for r in rewards) / 5, abs=1e-12)


def test_every_rank_decodes_as_many_batches_as_rank_0():
    """5 rows, 2 ranks, batches of 2: rank 0 holds [0, 2], [4] and rank 1 only [1, 3]; rank 1 decodes a placeholder
    batch (row 0) as its second, so that under ZeRO-3 (a collective in each forward) no rank waits, and drops it."""
    lengths = [4, 0, 2, 3, 1]
    scorer = RewardScorer([RewardFunction("quarter_length", quarter_length)])
    engine = FixedEngine(lengths)
    metrics = evaluate(
        engine, scorer, rows(5), max_new_tokens=8, batch_size=2, accuracy_threshold=0.5, rank=1, world_size=2
    )
    assert engine.calls == [[1, 3], [0]]
    # rows 1 and 3 only: rewards 0/4 and 3/4 -> mean 3/8; lengths 0, 3 -> 1.5
    assert metrics["eval/num_samples"] == 2.0 and metrics["eval/reward_mean"] == pytest.approx(3 / 8, abs=1e-12)
    assert metrics["eval/completion_length_mean"] == 1.5
    engine = FixedEngine(lengths)
    evaluate(engine, scorer, rows(5), max_new_tokens=8, batch_size=2, accuracy_threshold=0.5, rank=0, world_size=2)
    assert engine.calls == [[0, 2], [4]]  # rank 0: no placeholder
