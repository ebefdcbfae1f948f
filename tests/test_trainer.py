"""GSPOTrainer end to end on a tiny local model: metrics, invariances, the seed's examples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import small_config
from transformers import AutoModelForCausalLM

from gspo.config import ConfigError, GSPOConfig
from gspo.trainer import GSPOTrainer

REQUIRED_METRICS = (
    "raw_reward_mean",
    "raw_reward_std",
    "relative_advantage_std",
    "kl_divergence",
    "kl_coef",
    "policy_loss",
    "entropy",
    "clip_fraction_seq",
    "clip_fraction_token",
    "frac_reward_zero_std",
    "completion_length_mean",
    "truncated_fraction",
    "step_time_s",
    "skipped_updates",
)


def length_reward(completions, **kwargs):
    """Varies across a random model's samples, so advantages are non-zero."""
    return [float(len(c)) for c in completions]


def params_of(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}  # CPU: comparable on a GPU run too


def test_training_steps_produce_every_metric_and_change_weights(tiny_model_dir, arithmetic_rows, tmp_path):
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        reward_funcs=["exact_answer"],
        batch_size=2,
        group_size=4,
        gspo_epochs=2,
        num_mini_batches=2,
    )
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    before = params_of(trainer.model)
    history = trainer.train(arithmetic_rows)
    assert len(history) == 2
    for m in history:
        for key in REQUIRED_METRICS + ("reward/exact_answer_mean", "reward/length_reward_mean"):
            assert key in m and math.isfinite(m[key]), key
    after = params_of(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # the final model, HF format
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, after[name]), name


def test_no_reference_model_when_kl_is_off(tiny_model_dir, arithmetic_rows, tmp_path):
    cfg = small_config(tiny_model_dir, tmp_path, kl_coef=0.0, adaptive_kl=False, max_steps=1)
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    assert trainer.ref_model is None
    assert trainer.train(arithmetic_rows)[0]["kl_divergence"] == 0.0


def _count_log_prob_passes(trainer) -> dict:
    """Sequences pushed through log-prob forwards (use_cache=False; generation's forwards use the cache) of the
    policy and the reference model, with and without grad: forward pre-hooks, nothing patched."""
    calls = {"no_grad": 0, "grad": 0}

    def count(module, args, kwargs):
        if kwargs.get("use_cache") is False:
            calls["grad" if torch.is_grad_enabled() else "no_grad"] += kwargs["input_ids"].shape[0]

    for model in (trainer.policy.unwrapped(), trainer.ref_model):
        model.register_forward_pre_hook(count, with_kwargs=True)
    return calls


def test_one_reference_pass_and_no_old_pass_whatever_the_epochs(tiny_model_dir, arithmetic_rows, tmp_path):
    cfg = small_config(tiny_model_dir, tmp_path, gspo_epochs=3, num_mini_batches=1, max_steps=1)
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    calls = _count_log_prob_passes(trainer)
    trainer.train(arithmetic_rows)
    n = 2 * 2  # batch_size x group_size sequences per rollout
    assert calls == {"no_grad": n, "grad": 3 * n}  # one reference pass; one forward per epoch, pi_old from the first
    cfg = small_config(tiny_model_dir, tmp_path / "b", gspo_epochs=3, num_mini_batches=2, max_steps=1)
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    calls = _count_log_prob_passes(trainer)
    trainer.train(arithmetic_rows)
    assert calls == {"no_grad": 2 * n, "grad": 3 * n}  # + one old-log-prob pass for the off-policy mini-batches


def _sgd_step_params(cfg, rows) -> dict:
    """Train with plain SGD instead of AdamW (Adam's 1/sqrt(v) would turn float rounding in a near-zero
    gradient into a full step) and return the final parameters."""
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward], optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer.train(rows)
    return params_of(trainer.model)


def _assert_same_params(a: dict, b: dict) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "level,aggregation",
    [("sequence", None), ("sequence_token", None), ("token", "token-mean"), ("token", "seq-mean-token-sum")],
)
def test_gradient_accumulation_changes_nothing(tiny_model_dir, arithmetic_rows, tmp_path, level, aggregation):
    """Same seed -> same rollout; 1 vs 2 micro-batches must give the same updated weights.

    Plain SGD replaces AdamW here: Adam divides by sqrt(v), which turns float rounding in a
    near-zero gradient into a full learning-rate-sized step, hiding what we test (the gradient).
    """
    results = [
        _sgd_step_params(
            small_config(
                tiny_model_dir,
                tmp_path / str(accum),
                group_size=4,
                max_steps=1,
                gspo_epochs=2,
                importance_sampling_level=level,
                loss_aggregation=aggregation,
                gradient_accumulation_steps=accum,
                max_grad_norm=0.0,
            ),
            arithmetic_rows,
        )
        for accum in (1, 2)
    ]
    _assert_same_params(*results)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_gradient_checkpointing_and_bounded_head_change_nothing(
    tiny_model_dir, arithmetic_rows, tmp_path, entropy_coef
):
    """gradient_checkpointing recomputes the layers and runs the output head a chunk at a time
    (entropy_chunk_size=3 here, so several chunks per micro-batch): same weights as without it."""
    results = [
        _sgd_step_params(
            small_config(
                tiny_model_dir,
                tmp_path / str(ckpt),
                group_size=4,
                max_steps=1,
                gspo_epochs=2,
                num_mini_batches=2,
                gradient_checkpointing=ckpt,
                entropy_chunk_size=3,
                entropy_coef=entropy_coef,
                kl_coef=0.1,
                adaptive_kl=False,
                max_grad_norm=0.0,
            ),
            arithmetic_rows,
        )
        for ckpt in (False, True)
    ]
    _assert_same_params(*results)


def test_lora_trains_adapters_only_and_uses_base_as_reference(tiny_model_dir, arithmetic_rows, tmp_path):
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        use_lora=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        gspo_epochs=1,
        max_steps=1,
    )
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    assert trainer.ref_model is None  # no second copy: adapters disabled instead
    before = params_of(trainer.model)
    m = trainer.train(arithmetic_rows)[0]
    assert m["kl_divergence"] == pytest.approx(0.0, abs=1e-7)  # B=0 at init: policy == base on the first pass
    after = params_of(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    assert (Path(tmp_path) / "adapter_config.json").exists()


def test_no_reward_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="reward"):
        GSPOTrainer(small_config(tiny_model_dir, tmp_path, reward_funcs=[]))


def test_dataset_smaller_than_batch_is_a_clear_error(tiny_model_dir, tmp_path):
    trainer = GSPOTrainer(small_config(tiny_model_dir, tmp_path, batch_size=4), reward_funcs=[length_reward])
    with pytest.raises(ConfigError, match="batch_size=4"):
        trainer.train(["1+1=", "2+2="])


def test_evaluate_reports_greedy_accuracy(tiny_model_dir, arithmetic_rows, tmp_path):
    """eval/accuracy on rows whose answers are known to be right for exactly 7 of the 10 evaluated: the answer
    column holds the model's own greedy answer (decoded here by a plain generate loop, prompt by prompt) for
    rows 0-6, and that answer + "x" (never matched) for rows 7-9. exact_answer then scores 1, 1, ..., 0, 0, 0:
    accuracy 7/10, whatever the random model says."""
    from gspo.answers import extract_answer
    from gspo.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = []
    for i, row in enumerate(arithmetic_rows[:10]):
        ids = torch.tensor([tok.encode(row["prompt"])])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=4,  # small_config's
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :]
        answer = extract_answer(tok.decode(out, skip_special_tokens=True))
        rows.append({"prompt": row["prompt"], "answer": answer if i < 7 else answer + "x"})
    rows += arithmetic_rows[10:12]  # beyond eval_max_samples: not evaluated
    trainer = GSPOTrainer(small_config(tiny_model_dir, tmp_path, eval_max_samples=10, eval_batch_size=4))
    metrics = trainer.evaluate(rows)
    assert metrics["eval/num_samples"] == 10.0
    assert metrics["eval/accuracy"] == pytest.approx(0.7, abs=1e-12)
    assert metrics["eval/reward_mean"] == pytest.approx(0.7, abs=1e-12)  # exact_answer is the only reward


SEED_8_1 = """
from gspo_train import GSPOConfig, GSPOTrainer, GSPODataset

# 创建配置
config = GSPOConfig(
    policy_model_name="Qwen/Qwen2-0.5B",
    batch_size=8,
    group_size=4,
    learning_rate=1e-5,
    num_epochs=3
)

# 加载数据
prompts = load_training_data()
tokenizer = AutoTokenizer.from_pretrained(config.policy_model_name)
dataset = GSPODataset(prompts, tokenizer)

# 创建训练器
trainer = GSPOTrainer(config)

# 开始训练
trainer.train(dataset)
"""

SEED_8_2 = """
# 长序列任务配置
config = GSPOConfig(
    group_size=6,  # 更大的组
    gspo_epochs=5,  # 更多更新
    clip_range=0.15,  # 更保守的裁剪
    use_group_normalization=True,  # 启用标准化
    advantage_type="normalized"  # 使用标准化优势
)

# 短序列任务配置
config = GSPOConfig(
    group_size=3,  # 更小的组
    gspo_epochs=3,  # 更少更新
    clip_range=0.25,  # 更激进的裁剪
    use_group_normalization=False,  # 不使用标准化
    advantage_type="relative"  # 使用相对优势
)
"""


def test_seed_example_8_1_runs_as_written(tiny_model_dir, tmp_path, monkeypatch):
    """The brief's §8.1 code, word for word, given a local model directory and a local reward model."""
    from helpers_data import save_tiny_reward_model

    reward_dir = save_tiny_reward_model(tmp_path / "rm")
    code = SEED_8_1.replace('"Qwen/Qwen2-0.5B",', f'"{tiny_model_dir}", reward_model_name="{reward_dir}",')
    monkeypatch.chdir(tmp_path)  # output_dir defaults to ./outputs/gspo
    # The snippet uses two names it never defines: the user's data loader, and transformers' AutoTokenizer.
    from transformers import AutoTokenizer

    namespace = {
        "load_training_data": lambda: ["1+2=", "3+4=", "5+6=", "7+8=", "9+1=", "2+3=", "4+5=", "6+7="],
        "AutoTokenizer": AutoTokenizer,
    }
    monkeypatch.setattr(GSPOConfig, "__post_init__", _short_generation(GSPOConfig.__post_init__))
    exec(compile(code, "seed_8_1", "exec"), namespace)
    history = namespace["trainer"].history
    assert len(history) == 3  # 8 prompts / batch_size 8 = 1 step per epoch, 3 epochs
    assert (tmp_path / "outputs" / "gspo" / "metrics.jsonl").exists()


def _short_generation(post_init):
    """The seed's defaults generate 128 tokens x gspo_epochs=4; keep the test fast by capping length only."""

    def patched(self):
        self.max_new_tokens = 8
        post_init(self)

    return patched


def test_seed_example_8_2_runs_as_written():
    namespace = {"GSPOConfig": GSPOConfig}
    exec(compile(SEED_8_2, "seed_8_2", "exec"), namespace)
    short = namespace["config"]
    assert (short.group_size, short.gspo_epochs, short.clip_low, short.normalize_advantages) == (3, 3, 0.25, False)


def test_kl_coef_0_loads_no_reference_model_even_with_adaptive_kl(tiny_model_dir, arithmetic_rows, tmp_path, caplog):
    """adaptive_kl multiplies the coefficient: 0 stays 0, so a reference model would only cost a forward pass."""
    from conftest import small_config

    cfg = small_config(tiny_model_dir, tmp_path, kl_coef=0.0, adaptive_kl=True)
    with caplog.at_level("WARNING", logger="gspo"):
        trainer = GSPOTrainer(cfg)
    assert trainer.ref_model is None and "kl_coef=0 with adaptive_kl=True" in caplog.text
    metrics, rollout = trainer.training_step([trainer._as_dataset(arithmetic_rows[:2])[i] for i in range(2)])
    assert rollout.ref_logprobs is None and "time/reference_s" not in metrics and metrics["kl_coef"] == 0.0
