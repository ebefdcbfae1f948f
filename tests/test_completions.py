"""Issue 20's workflow pieces: the completions record and `gspo completions`, sampled evaluation (mean@k,
pass@k) and which reward defines accuracy, system_prompt, reasoning-gym datasets, num_threads."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_config

from gspo.completions import CompletionsRecord, completion_rows, pick_rows, read_records, record_files
from gspo.config import ConfigError, GSPOConfig
from gspo.core import pass_at_k
from gspo.data import DataError, GSPODataset, load_rows
from gspo.engines import RolloutEngine
from gspo.evaluate import accuracy_source, eval_metrics, evaluate
from gspo.rewards import RewardFunction, RewardScorer, resolve_reward_funcs
from gspo.rollout import Rollout


def _rollout(completions, rewards, advantages, group_size=2, extra=None, messages=None):
    n = len(completions)
    mask = torch.tensor([[1] * (i + 1) + [0] * (n - i - 1) for i in range(n)])  # lengths 1, 2, ..., n
    return Rollout(
        prompt_ids=torch.zeros(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.zeros_like(mask),
        completion_mask=mask,
        truncated=torch.tensor([False] * (n - 1) + [True]),
        group_size=group_size,
        prompts=[f"<sys>be brief</sys><user>q{i // group_size}</user>" for i in range(n)],
        completions=completions,
        extra=extra or {"answer": [str(i // group_size) for i in range(n)]},
        rewards=torch.tensor(rewards),
        reward_per_func={"acc": torch.tensor([1.0, float("nan"), 0.0, 1.0][:n])},
        advantages=torch.tensor(advantages),
        messages=messages or [],
        prompt_messages=[
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i // 2}"}] for i in range(n)
        ],
    )


# --- the record ------------------------------------------------------------------------
def test_completion_rows_hold_each_reward_the_advantage_and_the_question():
    rollout = _rollout(["a", "b", "c", "d"], [1.0, 0.5, 0.0, 1.0], [0.7, -0.7, -1.0, 1.0])
    rows = completion_rows(rollout, step=3, limit=3)
    assert len(rows) == 3  # the limit
    first = rows[0]
    assert first["step"] == 3 and first["index"] == 0 and first["group"] == 0
    assert first["last_user"] == "q0"  # the user's message, not the system prompt at the prompt's start
    assert first["completion"] == "a" and first["reward"] == 1.0 and first["reward/acc"] == 1.0
    assert first["advantage"] == pytest.approx(0.7) and first["completion_length"] == 1
    assert json.loads(first["extra"]) == {"answer": "0"} and first["messages"] is None
    assert math.isnan(rows[1]["reward/acc"])  # None: no opinion
    assert [r["group"] for r in rows] == [0, 0, 1] and rows[2]["completion_length"] == 3


def test_per_token_advantages_are_averaged_over_the_loss_mask():
    rollout = _rollout(["a", "b"], [1.0, 0.0], [0.0, 0.0]).with_(
        advantages=torch.tensor([[2.0, 9.0], [1.0, 3.0]])  # row 0 has one token: 2; row 1 two: (1 + 3) / 2
    )
    assert [r["advantage"] for r in completion_rows(rollout, 1)] == [2.0, 2.0]


def test_the_record_writes_one_file_per_step_and_a_resume_drops_later_steps(tmp_path):
    rollout = _rollout(["a", "b", "c", "d"], [1.0, 0.5, 0.0, 1.0], [0.7, -0.7, -1.0, 1.0])
    record = CompletionsRecord(tmp_path, max_per_step=3)
    for step in (1, 2, 3):
        record.add(step, completion_rows(rollout, step))
    record.close()
    files = record_files(tmp_path)
    assert sorted(files) == [1, 2, 3]
    rows = read_records(files[2])
    assert len(rows) == 3 and {r["step"] for r in rows} == {2}  # capped at max_per_step
    assert not list((tmp_path / "completions").glob(".*"))  # no temporary file left
    CompletionsRecord(tmp_path).truncate_after(1)
    assert sorted(record_files(tmp_path)) == [1]


def test_pick_rows_orders_by_reward():
    rows = [{"reward": r, "index": i} for i, r in enumerate([0.5, -1.0, 2.0, 0.5])]
    assert [r["index"] for r in pick_rows(rows, order="worst", k=2)] == [1, 0]
    assert [r["index"] for r in pick_rows(rows, order="best", k=2)] == [2, 0]
    assert sorted(r["index"] for r in pick_rows(rows, order="sample", k=4)) == [0, 1, 2, 3]
    assert [r["index"] for r in pick_rows(rows, k=1)] == [0]


def test_training_records_every_step_and_gspo_completions_reads_it(tiny_model_dir, tmp_path):
    from gspo.trainer import GSPOTrainer

    prompts = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]]
    cfg = small_config(tiny_model_dir, tmp_path / "run", max_steps=3, log_completions_max_per_step=3)
    history = GSPOTrainer(cfg).train(prompts)
    files = record_files(tmp_path / "run")
    assert sorted(files) == [1, 2, 3]
    table = pq.read_table(files[3])
    assert table.num_rows == 3  # 2 prompts x 2 completions, capped at 3
    assert {"prompt", "last_user", "completion", "reward", "reward/exact_answer", "advantage", "truncated"} <= set(
        table.column_names
    )
    full = small_config(tiny_model_dir, tmp_path / "full", max_steps=1)
    metrics = GSPOTrainer(full).train(prompts)[-1]
    rows = read_records(record_files(tmp_path / "full")[1])
    assert len(rows) == 4  # the whole rollout: its mean reward is the step's
    assert sum(r["reward"] for r in rows) / 4 == pytest.approx(metrics["raw_reward_mean"], abs=1e-6)
    assert all(r["last_user"] == r["prompt"] for r in rows)  # plain prompts: the prompt is the question
    out = subprocess.run(
        [sys.executable, "-m", "gspo", "completions", str(tmp_path / "run"), "--step", "2", "--worst", "2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    worst = sorted(read_records(files[2]), key=lambda r: (r["reward"], r["index"]))[:2]
    assert "3 completions, showing 2 (worst)" in out
    assert out.index(f"#{worst[0]['index']} ") < out.index(f"#{worst[1]['index']} ")
    bad = subprocess.run(
        [sys.executable, "-m", "gspo", "completions", str(tmp_path / "run"), "--step", "9"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no completions for step 9; steps recorded: 1-3" in bad.stderr
    assert len(history) == 3


# --- evaluation ------------------------------------------------------------------------
class CountingEngine(RolloutEngine):
    """Completion j of prompt i is "x" * (j + 1): no model; records the sampling it was asked for."""

    def __init__(self):
        self.samplings = []

    def generate(self, rows, *, group_size, sampling):
        self.samplings.append((group_size, sampling.do_sample, sampling.temperature))
        n = len(rows) * group_size
        lengths = [j + 1 for _ in rows for j in range(group_size)]
        mask = torch.tensor([[1] * k + [0] * (group_size - k) for k in lengths])
        return Rollout(
            prompt_ids=torch.zeros(n, 1, dtype=torch.long),
            prompt_mask=torch.ones(n, 1),
            completion_ids=torch.zeros_like(mask),
            completion_mask=mask,
            truncated=torch.zeros(n, dtype=torch.bool),
            group_size=group_size,
            prompts=[r["prompt"] for r in rows for _ in range(group_size)],
            completions=["x" * k for k in lengths],
            extra={"solved_at": [r["solved_at"] for r in rows for _ in range(group_size)]},
        )


def hit(completions, solved_at, **kwargs):
    """1 when the completion is exactly `solved_at` long (one completion of a group at most)."""
    return [1.0 if len(c) == s else 0.0 for c, s in zip(completions, solved_at)]


def test_sampled_evaluation_reports_mean_at_k_and_pass_at_k():
    rows = [{"prompt": f"p{i}", "prompt_ids": [1], "solved_at": s} for i, s in enumerate([1, 3, 0])]
    engine = CountingEngine()
    scorer = RewardScorer([RewardFunction("hit", hit), RewardFunction("answer_match", hit, weight=0.0)])
    m = evaluate(
        engine, scorer, rows, max_new_tokens=4, batch_size=2, accuracy_threshold=1.0, num_samples=4, temperature=0.7
    )
    assert engine.samplings == [(4, True, 0.7), (4, True, 0.7)]
    # prompt 0: completion 1 of 4 correct; prompt 1: completion 3; prompt 2: none -> c = 1, 1, 0 of n = 4
    assert m["eval/accuracy"] == pytest.approx(2 / 12) and m["eval/mean@4"] == pytest.approx(2 / 12)
    # pass@1 = c/n: (1/4 + 1/4 + 0) / 3; pass@2 = 1 - C(3,2)/C(4,2) = 1/2 for c = 1: (1/2 + 1/2 + 0) / 3
    assert m["eval/pass@1"] == pytest.approx(1 / 6)
    assert m["eval/pass@2"] == pytest.approx(1 / 3)
    assert m["eval/pass@4"] == pytest.approx(2 / 3)  # some completion of prompts 0 and 1 is right
    assert m["eval/num_samples"] == 12.0 and m["eval/num_prompts"] == 3.0 and m["eval/pass_prompts"] == 3.0
    assert m["eval/reward/hit_mean"] == pytest.approx(2 / 12)
    greedy = CountingEngine()
    evaluate(greedy, scorer, rows, max_new_tokens=4, batch_size=8, accuracy_threshold=1.0)
    assert greedy.samplings == [(1, False, 1.0)]


def test_pass_at_k_matches_the_binomial_formula():
    n = torch.tensor([10, 10, 10, 5, 4, 7])
    c = torch.tensor([0, 3, 10, 2, 1, 6])
    for k in (1, 2, 3, 4):
        expected = [1 - math.comb(a - b, k) / math.comb(a, k) for a, b in zip(n.tolist(), c.tolist())]
        assert pass_at_k(n, c, k).tolist() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(torch.tensor([2]), torch.tensor([1]), 3)


def test_accuracy_reads_the_correctness_reward_not_the_total():
    funcs = resolve_reward_funcs(["think_format", "exact_answer", "length_penalty"])
    scorer = RewardScorer(funcs)
    assert accuracy_source(scorer) == "exact_answer"
    assert accuracy_source(scorer, "think_format") == "think_format"
    assert accuracy_source(RewardScorer(resolve_reward_funcs(["length_penalty"]))) is None  # the total
    with pytest.raises(ConfigError, match="accuracy_reward='nope'.*exact_answer"):
        accuracy_source(scorer, "nope")
    # a format bonus lifts the total over the threshold, but accuracy only counts the correct answer;
    # a None (NaN) accuracy value is left out of the share
    records = [
        {"reward": 1.2, "reward/exact_answer": 0.0, "completion_length": 3, "truncated": False},
        {"reward": 1.0, "reward/exact_answer": 1.0, "completion_length": 5, "truncated": True},
        {"reward": 0.0, "reward/exact_answer": float("nan"), "completion_length": 1, "truncated": False},
    ]
    m = eval_metrics(records, accuracy="exact_answer", threshold=1.0)
    assert m["eval/accuracy"] == 0.5 and m["eval/truncated_fraction"] == pytest.approx(1 / 3)
    assert m["eval/reward/exact_answer_mean"] == 0.5
    assert eval_metrics(records, accuracy=None, threshold=1.0)["eval/accuracy"] == pytest.approx(2 / 3)


# --- system prompt, reasoning-gym data, threads ---------------------------------------------
def test_system_prompt_goes_first_in_every_conversation(tmp_path):
    from gspo.tasks.tool_use import build_tokenizer

    tok = build_tokenizer()  # printable characters and a chat template
    (tmp_path / "sys.txt").write_text("Think first.\n")
    from gspo.data import read_system_prompt

    system = read_system_prompt(str(tmp_path / "sys.txt"))
    assert system == "Think first."
    ds = GSPODataset(["2+2=", [{"role": "user", "content": "3+3="}]], tok, system_prompt=system)
    for item, question in zip(ds, ["2+2=", "3+3="]):
        assert item["prompt_messages"] == [
            {"role": "system", "content": "Think first."},
            {"role": "user", "content": question},
        ]
        assert item["prompt"] == tok.apply_chat_template(
            item["prompt_messages"], tokenize=False, add_generation_prompt=True
        )
    with pytest.raises(DataError, match="row 0 already starts with a system message"):
        GSPODataset([[{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]], tok, system_prompt="z")
    assert read_system_prompt("Answer in one word.") == "Answer in one word."


def test_reasoning_gym_rows_keep_their_entry_for_the_scorer():
    rows = load_rows("reasoning_gym:basic_arithmetic?size=4&seed=3&max_terms=2", seed=0)
    assert len(rows) == 4
    entry = rows[0]["reasoning_gym"]
    assert rows[0]["prompt"] == [{"role": "user", "content": entry["question"]}]
    assert rows[0]["answer"] == str(entry["answer"]) and entry["metadata"]["source_dataset"] == "basic_arithmetic"
    assert load_rows("reasoning_gym:basic_arithmetic?size=4&seed=3&max_terms=2") == rows  # seeded
    with pytest.raises(DataError, match="no task 'nope'"):
        load_rows("reasoning_gym:nope?size=2")
    with pytest.raises(DataError, match="could not build it.*bogus"):
        load_rows("reasoning_gym:basic_arithmetic?size=2&bogus=1")
    GSPOConfig(dataset_path="reasoning_gym:basic_arithmetic?size=8")  # not a file: no path check


def test_num_threads_is_set_and_checked():
    from gspo.models import set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(GSPOConfig(num_threads=1)) == 1 and torch.get_num_threads() == 1
        assert set_threads(GSPOConfig()) == 1  # None keeps what is in force
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="num_threads=0"):
        GSPOConfig(num_threads=0)


def test_misconfigurations_are_caught_before_training(tiny_model_dir, tmp_path):
    from gspo.trainer import GSPOTrainer

    with pytest.raises(ConfigError, match=r"accuracy_reward='exact_anser' is not allowed.*exact_answer"):
        GSPOTrainer(small_config(tiny_model_dir, tmp_path / "a", accuracy_reward="exact_anser"))
    with pytest.raises(ConfigError, match=r"system_prompt=.*looks like a file path, and no such file exists"):
        GSPOConfig(system_prompt=str(tmp_path / "sys_promt.txt"))
    GSPOConfig(system_prompt="Think first, then answer.")  # text, not a path
    same = "reasoning_gym:basic_arithmetic?size=64"
    with pytest.raises(ConfigError, match=r"eval_dataset_path=.*same seed \(42\) as dataset_path"):
        GSPOConfig(dataset_path=same + "&seed=42", eval_dataset_path=same)  # no seed: the config's, 42
    GSPOConfig(dataset_path=same, eval_dataset_path=same + "&seed=7")


def test_gspo_config_resolves_the_rewards_and_gspo_eval_reads_the_runs_config(tmp_path):
    from gspo.cli import build_parser, eval_config

    bad = subprocess.run(
        [sys.executable, "-m", "gspo", "config", "--reward_funcs", "exact_answer", "--accuracy_reward", "exact_anser"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "accuracy_reward='exact_anser'" in bad.stderr
    run = tmp_path / "run"
    run.mkdir()
    trained = GSPOConfig(reward_funcs=["length_penalty"], system_prompt="Be brief.", max_new_tokens=9, output_dir="x")
    (run / "gspo_config.json").write_text(json.dumps(trained.to_dict()))
    cfg = eval_config(build_parser().parse_args(["eval", "--model", str(run), "--max_new_tokens", "5"]))
    assert cfg.policy_model_name == str(run) and cfg.system_prompt == "Be brief."
    assert cfg.reward_funcs == ["length_penalty"] and cfg.max_new_tokens == 5  # the flag wins over the run's value


def test_gspo_completions_refuses_contradictory_flags(tmp_path):
    record = CompletionsRecord(tmp_path)
    record.add(1, completion_rows(_rollout(["a", "b", "c", "d"], [1.0, 0.5, 0.0, 1.0], [0.7, -0.7, -1.0, 1.0]), 1))
    record.close()
    path = record_files(tmp_path)[1]
    for args, match in ((["--step", "1"], "with a records file"), (["--worst", "0"], "--worst 0")):
        out = subprocess.run(
            [sys.executable, "-m", "gspo", "completions", str(path), *args], capture_output=True, text=True
        )
        assert out.returncode == 2 and match in out.stderr


def test_no_reward_signal_for_ten_steps_is_warned_about(caplog):
    from gspo.preflight import DeadPolicyMonitor

    monitor = DeadPolicyMonitor(flat_patience=10)
    with caplog.at_level("WARNING", logger="gspo"):
        for step in range(1, 10):
            monitor.update({"frac_reward_zero_std": 1.0, "grad_norm": 0.1}, step, skipped=False)
        assert "no reward signal" not in caplog.text  # 9 flat steps
        monitor.update({"frac_reward_zero_std": 1.0, "grad_norm": 0.1}, 10, skipped=False)
    assert caplog.text.count("all equal for 10 steps (to step 10): no reward signal") == 1
