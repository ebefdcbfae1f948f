"""The critic as a trained model (advantage_estimator='gae', PPO / VAPO): value warm-up leaves the policy
bit-identical, micro-batching changes nothing, checkpoints hold the critic and resume exactly, the final
export loads with from_pretrained, and PPO / VAPO runs raise the reward."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config
from transformers import AutoModelForTokenClassification

from gspo.config import ConfigError
from gspo.critic import GAEEstimator, token_values
from gspo.trainer import GSPOTrainer


def length_reward(completions, **kwargs):
    """Learnable from a random model: longer completions score more (EOS later or never)."""
    return [float(len(c)) for c in completions]


def gae_config(model_dir, out, **overrides):
    settings = dict(
        advantage_estimator="gae",
        importance_sampling_level="token",
        reward_funcs=[],
        kl_coef=0.0,
        adaptive_kl=False,
        entropy_coef=0.0,
        gae_lambda=0.95,
        batch_size=2,
        group_size=2,
        max_new_tokens=4,
    )
    settings.update(overrides)
    return small_config(model_dir, out, **settings)


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.1)


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


def test_value_warmup_leaves_the_policy_bit_identical(tiny_model_dir, arithmetic_rows, tmp_path):
    trainer = GSPOTrainer(gae_config(tiny_model_dir, tmp_path, value_warmup_steps=2, max_steps=2), [length_reward])
    policy0, critic0 = params(trainer.policy.unwrapped()), params(trainer.estimator.critic.unwrapped())
    history = trainer.train(arithmetic_rows)
    after = params(trainer.policy.unwrapped())
    assert all(torch.equal(policy0[k], after[k]) for k in policy0)
    critic1 = params(trainer.estimator.critic.unwrapped())
    assert any(not torch.equal(critic0[k], critic1[k]) for k in critic0)
    assert all("policy_loss" not in m and m["value_loss"] > 0 for m in history)


def test_micro_batching_changes_neither_policy_nor_critic(tiny_model_dir, arithmetic_rows, tmp_path):
    def run(out, accumulation):
        cfg = gae_config(
            tiny_model_dir,
            out,
            max_steps=1,
            batch_size=4,
            num_mini_batches=2,
            gradient_accumulation_steps=accumulation,
            positive_nll_coef=0.1,
            positive_reward_threshold=3.0,
        )
        # SGD: an update proportional to the gradient (AdamW's first step is ~lr * sign, which turns rounding-level
        # gradient differences of near-zero entries into lr-sized ones)
        trainer = GSPOTrainer(cfg, [length_reward], optimizer_factory=sgd, value_optimizer_factory=sgd)
        history = trainer.train(arithmetic_rows)
        return params(trainer.policy.unwrapped()), params(trainer.estimator.critic.unwrapped()), history[-1]

    p1, c1, m1 = run(tmp_path / "one", 1)
    p4, c4, m4 = run(tmp_path / "four", 4)
    assert_close(p1, p4, 1e-6)
    assert_close(c1, c4, 1e-6)
    for key in ("value_loss", "policy_loss", "positive_nll", "explained_variance"):
        assert m1[key] == pytest.approx(m4[key], rel=1e-5, abs=1e-7), key


def test_critic_checkpoints_resume_exactly_and_export(tiny_model_dir, arithmetic_rows, tmp_path):
    cfg = dict(save_steps=1, gae_lambda="adaptive", num_mini_batches=2)
    straight = GSPOTrainer(gae_config(tiny_model_dir, tmp_path / "a", max_steps=3, **cfg), [length_reward])
    full = straight.train(arithmetic_rows)
    GSPOTrainer(gae_config(tiny_model_dir, tmp_path / "b", max_steps=2, **cfg), [length_reward]).train(arithmetic_rows)
    assert (tmp_path / "b" / "checkpoint-2" / "critic" / "optimizer.pt").is_file()
    resumed = GSPOTrainer(
        gae_config(tiny_model_dir, tmp_path / "b", max_steps=3, resume_from_checkpoint="latest", **cfg),
        [length_reward],
    )
    tail = resumed.train(arithmetic_rows)
    assert tail[-1]["step"] == 3
    for key in ("value_loss", "policy_loss", "grad_norm", "value_mean"):
        assert tail[-1][key] == pytest.approx(full[-1][key], rel=1e-6, abs=1e-9), key
    assert_close(params(straight.estimator.critic.unwrapped()), params(resumed.estimator.critic.unwrapped()), 0.0)
    exported = AutoModelForTokenClassification.from_pretrained(tmp_path / "a" / "critic")
    assert_close(params(exported), params(straight.estimator.critic.unwrapped()), 0.0)


def test_a_checkpoint_without_a_critic_is_a_clear_error(tiny_model_dir, arithmetic_rows, tmp_path):
    plain = small_config(tiny_model_dir, tmp_path, max_steps=1, save_steps=1)
    GSPOTrainer(plain).train(arithmetic_rows)
    resumed = GSPOTrainer(
        gae_config(tiny_model_dir, tmp_path, max_steps=2, resume_from_checkpoint="latest"), [length_reward]
    )
    with pytest.raises(ConfigError, match="advantage_estimator: 'group' -> 'gae'"):  # another run: refused
        resumed.train(arithmetic_rows)
    forced = GSPOTrainer(
        gae_config(tiny_model_dir, tmp_path, max_steps=2, resume_from_checkpoint="latest", allow_config_change=True),
        [length_reward],
    )
    with pytest.raises(ValueError, match="holds no critic"):
        forced.train(arithmetic_rows)


def test_values_are_read_where_the_policy_reads_its_log_probs(tiny_model_dir, arithmetic_rows, tmp_path):
    """V_t is the head's output at the position predicting completion token t: left padding changes nothing."""
    trainer = GSPOTrainer(gae_config(tiny_model_dir, tmp_path, max_steps=1), [length_reward])
    rows = [trainer._as_dataset(arithmetic_rows[:3])[i] for i in range(3)]
    rollout = trainer.engine.generate(rows, group_size=1, sampling=trainer.sampling)
    critic = trainer.estimator.critic.unwrapped().eval()
    with torch.no_grad():
        batch = token_values(critic, rollout)
        for i in range(3):
            alone = token_values(critic, rollout.select(torch.tensor([i])))  # no padding of the other rows
            n = int(rollout.lengths[i])
            assert torch.allclose(batch[i, :n], alone[0, :n], atol=1e-5)
            full = torch.cat([torch.tensor(rows[i]["prompt_ids"]), rollout.completion_ids[i, :n]])
            head = critic(input_ids=full[None]).logits[0, :, 0]
            p = len(rows[i]["prompt_ids"])
            assert torch.allclose(alone[0, :n], head[p - 1 : p - 1 + n], atol=1e-5)
    assert isinstance(trainer.estimator, GAEEstimator)


@pytest.mark.parametrize(
    "preset",
    [
        dict(gae_lambda=0.95, gae_lambda_value=0.95),  # PPO
        dict(gae_lambda="adaptive", value_warmup_steps=2, positive_nll_coef=0.1, positive_reward_threshold=4.0),  # VAPO
    ],
    ids=["ppo", "vapo"],
)
def test_ppo_and_vapo_raise_the_reward(tiny_model_dir, arithmetic_rows, tmp_path, preset):
    cfg = gae_config(
        tiny_model_dir,
        tmp_path,
        max_steps=14,
        batch_size=4,
        group_size=4,
        learning_rate=3e-3,
        value_learning_rate=3e-3,
        clip_range_low=0.2,
        clip_range_high=0.28,
        seed=3,
        **preset,
    )
    history = GSPOTrainer(cfg, [length_reward]).train(arithmetic_rows)
    first = sum(m["raw_reward_mean"] for m in history[:3]) / 3
    last = sum(m["raw_reward_mean"] for m in history[-3:]) / 3
    assert last > first + 0.3, (first, last)


def test_gae_config_rules():
    with pytest.raises(ConfigError, match="importance_sampling_level='token'"):
        small_config("x", "y", advantage_estimator="gae")
    with pytest.raises(ConfigError, match="kl_in_reward=True is not allowed"):
        small_config("x", "y", kl_in_reward=True)


def test_the_critic_can_start_from_a_reward_model(tiny_model_dir, tmp_path):
    """value_model_name = a sequence-classification reward model: its backbone and `score` weight carry over
    (the token-classification head adds a bias, newly initialised)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from gspo.critic import load_value_model

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(1)
    reward_model = AutoModelForSequenceClassification.from_config(config)
    reward_model.save_pretrained(tmp_path / "rm")
    critic = load_value_model(gae_config(tiny_model_dir, tmp_path, value_model_name=str(tmp_path / "rm")))
    want, got = reward_model.state_dict(), critic.state_dict()
    assert set(got) - set(want) == {"score.bias"}
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize(
    "overrides", [dict(mixed_precision="bf16"), dict(use_lora=True, lora_r=4)], ids=["bf16", "lora"]
)
def test_the_critic_trains_under_bf16_autocast_and_beside_a_lora_policy(
    tiny_model_dir, arithmetic_rows, tmp_path, overrides
):
    """bf16: the critic's forwards run under the same autocast; LoRA: the policy trains adapters, the critic all
    its weights (it has no adapters)."""
    trainer = GSPOTrainer(gae_config(tiny_model_dir, tmp_path, max_steps=2, **overrides), [length_reward])
    critic0 = params(trainer.estimator.critic.unwrapped())
    history = trainer.train(arithmetic_rows)
    critic1 = params(trainer.estimator.critic.unwrapped())
    moved = [k for k in critic0 if not torch.equal(critic0[k], critic1[k])]
    assert "score.weight" in moved and any(k.startswith("model.layers.") for k in moved)
    for m in history:
        assert all(torch.isfinite(torch.tensor(m[k])) for k in ("value_loss", "policy_loss", "grad_norm"))


def test_token_rewards_with_the_kl_in_the_reward_by_hand():
    from gspo.critic import token_rewards
    from gspo.rollout import Rollout

    mask = torch.tensor([[1, 1, 0]])
    rollout = Rollout(
        prompt_ids=torch.zeros(1, 1, dtype=torch.long),
        prompt_mask=torch.ones(1, 1, dtype=torch.long),
        completion_ids=torch.zeros(1, 3, dtype=torch.long),
        completion_mask=mask,
        truncated=torch.tensor([False]),
        group_size=1,
        rewards=torch.tensor([2.0]),
        old_logprobs=torch.tensor([[-1.0, -2.0, -7.0]]),
        ref_logprobs=torch.tensor([[-1.5, -1.0, -3.0]]),
    )
    # k1 per token: log pi_old - log pi_ref = [0.5, -1.0] (the padded third ignored); kl_coef 0.1:
    # [0 - 0.05, 2 + 0.1, 0] = [-0.05, 2.1, 0]
    assert token_rewards(rollout, kl_coef=0.1).flatten().tolist() == pytest.approx([-0.05, 2.1, 0.0])
    assert token_rewards(rollout, kl_coef=0.0).flatten().tolist() == [0.0, 2.0, 0.0]


@pytest.mark.parametrize("alpha, warned", [(0.05, True), (1.0, False)])
def test_a_length_adaptive_lambda_of_zero_for_every_completion_is_warned(
    tiny_model_dir, tmp_path, caplog, alpha, warned
):
    """alpha * max_new_tokens = 0.05 * 4 <= 1: lambda = 1 - 1/(alpha * l) <= 0 for every l <= 4, clamped to 0;
    at alpha 1.0 lambda(4) = 0.75, no warning."""
    cfg = gae_config(tiny_model_dir, tmp_path, gae_lambda="adaptive", length_adaptive_alpha=alpha)
    with caplog.at_level("WARNING", logger="gspo"):
        GSPOTrainer(cfg, [length_reward])
    assert ("is 0 for every completion" in caplog.text) == warned
