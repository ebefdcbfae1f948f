"""The step as a stream of rollouts: the producer builds a frozen Rollout, the learner reads it; the loss mask;
DAPO's dynamic sampling and truncated-completion masking. Tiny random model, CPU."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import small_config
from transformers import AutoModelForCausalLM

from gspo.config import ConfigError
from gspo.logprobs import completion_logprobs
from gspo.trainer import GSPOTrainer


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def flat_for_even(prompts, completions, **kwargs):
    """The completion's length for prompts whose first operand is odd; 1.0 for every completion of the others
    (their groups have zero spread)."""
    return [float(len(c)) if int(p.split("+")[0].split("-")[0]) % 2 else 1.0 for p, c in zip(prompts, completions)]


def constant(completions, **kwargs):
    return [0.5] * len(completions)


def sgd_trainer(cfg, rewards):
    """Plain SGD at lr 1 and no clipping: an update moves each weight by exactly minus its gradient."""
    return GSPOTrainer(cfg, reward_funcs=rewards, optimizer_factory=lambda p: torch.optim.SGD(p, lr=1.0))


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def tensors_of(rollout):
    return {
        f.name: getattr(rollout, f.name).clone()
        for f in dataclasses.fields(rollout)
        if isinstance(getattr(rollout, f.name), torch.Tensor)
    }


def test_the_rollout_is_frozen_and_the_learner_leaves_it_as_it_was(tiny_model_dir, arithmetic_rows, tmp_path):
    # gspo_epochs=3 with one mini-batch: pi_old comes from the learner's first epoch, kept by the learner
    cfg = small_config(tiny_model_dir, tmp_path, gspo_epochs=3, kl_coef=0.1, reward_funcs=[])
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    rows = [trainer._as_dataset(arithmetic_rows[:2])[i] for i in range(2)]
    rollout = trainer.producer.produce(rows)
    assert rollout.old_logprobs is None and rollout.ref_logprobs is not None and rollout.advantages is not None
    before = tensors_of(rollout)
    trainer.learner.learn(rollout, step=0)
    after = tensors_of(rollout)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    with pytest.raises(dataclasses.FrozenInstanceError):
        rollout.old_logprobs = torch.zeros(1)


@pytest.mark.parametrize("level,aggregation", [("sequence", None), ("token", "token-mean")])
def test_a_hole_in_the_loss_mask_gives_the_gradient_of_the_masked_tokens_by_hand(
    tiny_model_dir, arithmetic_rows, tmp_path, level, aggregation
):
    """Tokens attended to but not trained on: the update equals minus the gradient of the loss written out by
    hand over the tokens left in the mask (one update, on-policy, SGD at lr 1, no KL, no entropy)."""
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        reward_funcs=[],
        group_size=4,
        max_new_tokens=6,
        kl_coef=0.0,
        entropy_coef=0.0,
        max_grad_norm=0.0,
        importance_sampling_level=level,
        loss_aggregation=aggregation,
        seed=3,
    )
    trainer = sgd_trainer(cfg, [length_reward])
    rows = [trainer._as_dataset(arithmetic_rows[:2])[i] for i in range(2)]
    rollout = trainer.producer.produce(rows)
    holed = rollout.completion_mask.clone()
    long = [i for i in range(len(rollout)) if holed[i].sum() >= 3]
    assert len(long) >= 2, "the sampled completions are too short for this test"
    holed[long[0], 1] = 0  # a hole inside a completion: attended to, not trained on
    holed[long[1], 0] = holed[long[1], 2] = 0
    rollout = rollout.with_(loss_mask=holed)
    adv = rollout.advantages
    assert adv.abs().sum() > 0

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # the same initial weights
    model.train(False)
    logp, _ = completion_logprobs(
        model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask
    )
    trained = [[t for t in range(holed.shape[1]) if holed[i, t]] for i in range(len(rollout))]
    if level == "sequence":
        # GSPO on-policy: s_i = exp(mean_{t in mask_i}(logp - sg logp)) = 1 with the gradient of the mean
        # log-prob over the masked tokens; loss = -(1/N) sum_i A_i s_i
        terms = [
            -adv[i] * torch.exp(sum(logp[i, t] - logp[i, t].detach() for t in ts) / len(ts))
            for i, ts in enumerate(trained)
            if ts
        ]
        by_hand = sum(terms) / len(rollout)
    else:
        # token-mean: -(1/sum_i |mask_i|) sum_i sum_{t in mask_i} A_i r_it, r_it = exp(logp - sg logp) = 1
        n_tok = sum(len(ts) for ts in trained)
        by_hand = (
            sum(-adv[i] * torch.exp(logp[i, t] - logp[i, t].detach()) for i, ts in enumerate(trained) for t in ts)
            / n_tok
        )
    by_hand.backward()

    before = params_of(trainer.model)
    stats = trainer.learner.learn(rollout, step=0)
    after = params_of(trainer.model)
    assert stats.policy["policy_loss"] == pytest.approx(by_hand.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - after[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_dynamic_sampling_keeps_groups_with_spread_and_counts_the_extra_prompt_batches(
    tiny_model_dir, arithmetic_rows, tmp_path
):
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        reward_funcs=[],
        batch_size=4,
        group_size=3,
        max_steps=3,
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=4,
    )
    trainer = GSPOTrainer(cfg, reward_funcs=[flat_for_even])
    history = trainer.train(arithmetic_rows)
    rounds = [m["dynamic_sampling/rounds"] for m in history]
    assert trainer.prompt_batches == sum(rounds)  # each round took one batch of 4 prompts
    assert max(rounds) >= 2  # about half the prompts are flat: 4 groups with spread rarely come in one round
    for m in history:
        assert m["dynamic_sampling/kept_groups"] + m["dynamic_sampling/filled_groups"] == 4
        assert m["frac_reward_zero_std"] == m["dynamic_sampling/filled_groups"] / 4
        generated = 4 * m["dynamic_sampling/rounds"]
        # every generated group is kept (up to 4), dropped, or was surplus with spread
        assert m["dynamic_sampling/dropped_groups"] <= generated - m["dynamic_sampling/kept_groups"]
        assert 0 < m["dynamic_sampling/zero_std_fraction"] < 1


def test_when_the_rounds_run_out_the_step_trains_on_a_topped_up_batch(tiny_model_dir, arithmetic_rows, tmp_path):
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        reward_funcs=[],
        batch_size=2,
        max_steps=2,
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=2,
    )
    trainer = GSPOTrainer(cfg, reward_funcs=[constant])
    history = trainer.train(arithmetic_rows)
    assert len(history) == 2 and trainer.prompt_batches == 4
    for m in history:
        assert m["dynamic_sampling/rounds"] == 2
        assert (m["dynamic_sampling/kept_groups"], m["dynamic_sampling/filled_groups"]) == (0, 2)
        assert m["dynamic_sampling/dropped_groups"] == 4 and m["dynamic_sampling/zero_std_fraction"] == 1.0
        assert m["frac_reward_zero_std"] == 1.0 and math.isfinite(m["loss"])


def test_the_filter_reads_one_named_reward_function(tiny_model_dir, arithmetic_rows, tmp_path):
    """Total reward = length + constant varies, but the filter looks at `constant` only: nothing is kept."""
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        reward_funcs=[],
        max_steps=1,
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=2,
        dynamic_sampling_metric="constant",
    )
    history = GSPOTrainer(cfg, reward_funcs=[length_reward, constant]).train(arithmetic_rows)
    assert history[0]["dynamic_sampling/kept_groups"] == 0 and history[0]["dynamic_sampling/rounds"] == 2
    cfg = dataclasses.replace(cfg, dynamic_sampling_metric="no_such_function", output_dir=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"dynamic_sampling_metric='no_such_function'.*'constant', 'length_reward'"):
        GSPOTrainer(cfg, reward_funcs=[length_reward, constant]).train(arithmetic_rows)


def test_masked_truncated_completions_are_attended_to_but_not_trained_on(tiny_model_dir, arithmetic_rows, tmp_path):
    cfg = small_config(tiny_model_dir, tmp_path, reward_funcs=[], group_size=4, max_new_tokens=3, seed=5)
    plain = GSPOTrainer(cfg, reward_funcs=[length_reward])
    rows = [plain._as_dataset(arithmetic_rows[:2])[i] for i in range(2)]
    masked_cfg = dataclasses.replace(cfg, mask_truncated_completions=True, output_dir=str(tmp_path / "m"))
    masked = GSPOTrainer(masked_cfg, reward_funcs=[length_reward])
    torch.manual_seed(11)
    a = plain.producer.produce(rows)
    torch.manual_seed(11)
    b = masked.producer.produce(rows)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert 0 < int(b.truncated.sum()) < len(b), "need both truncated and finished completions"
    assert torch.equal(b.completion_mask, a.completion_mask)  # attention unchanged
    assert torch.equal(b.loss_mask, a.completion_mask * (~a.truncated)[:, None].long())
    assert torch.equal(b.policy_lengths[b.truncated], torch.zeros(int(b.truncated.sum()), dtype=torch.long))


def test_training_step_works_on_a_trainer_that_has_not_trained(tiny_model_dir, arithmetic_rows, tmp_path):
    """training_step needs nothing that only train() sets up (a scheduler, a prompt stream)."""
    cfg = small_config(tiny_model_dir, tmp_path, reward_funcs=[], dynamic_sampling=True, dynamic_sampling_max_rounds=2)
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    rows = [trainer._as_dataset(arithmetic_rows[:2])[i] for i in range(2)]
    metrics, rollout = trainer.training_step(rows)
    assert metrics["learning_rate"] == cfg.learning_rate and math.isfinite(metrics["loss"])
    assert len(rollout) == 4 and metrics["dynamic_sampling/rounds"] >= 1


def test_dynamic_sampling_config_errors_name_the_field(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="dynamic_sampling_max_rounds=-1"):
        small_config(tiny_model_dir, tmp_path, dynamic_sampling_max_rounds=-1)


def test_a_step_whose_completions_are_all_masked_is_a_zero_update_not_a_nan(tiny_model_dir, arithmetic_rows, tmp_path):
    """mask_truncated_completions with 1-token completions (an untrained model rarely stops at once): a step with no
    loss token anywhere. Every masked sum is 0; the loss, entropy and KL must be 0 too (not 0/0), and the update
    is not skipped as non-finite."""
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        reward_funcs=[],
        max_new_tokens=1,
        max_steps=3,
        mask_truncated_completions=True,
        kl_coef=0.1,
    )
    history = GSPOTrainer(cfg, reward_funcs=[length_reward]).train(arithmetic_rows)
    empty = [m for m in history if m["truncated_fraction"] == 1.0]
    assert empty, "need a step with every completion truncated"
    for m in empty:
        assert (m["loss"], m["entropy"], m["kl_divergence"]) == (0.0, 0.0, 0.0)
    assert history[-1]["skipped_updates"] == 0.0


def fails(completions, **kwargs):
    raise ValueError("always")


def test_penalized_rewards_are_counted_once_per_round_under_dynamic_sampling(tiny_model_dir, arithmetic_rows, tmp_path):
    """reward_error_policy='penalty': `fails` is replaced by the penalty on all 2 x 2 = 4 completions of every
    round; length_reward keeps groups varied. The step's count is 4 per round, however the groups are sliced."""
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        reward_funcs=[],
        max_steps=2,
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=3,
        reward_error_policy="penalty",
    )
    history = GSPOTrainer(cfg, reward_funcs=[length_reward, fails]).train(arithmetic_rows)
    for m in history:
        assert m["reward_penalized"] == 4 * m["dynamic_sampling/rounds"]


class _CountingAccelerator:
    """Two ranks as seen from one: records the collectives a call makes."""

    num_processes, device = 2, "cpu"

    def __init__(self):
        self.calls = []

    def reduce(self, tensor, reduction):
        self.calls.append(("reduce", reduction, tuple(tensor.shape)))
        return tensor

    def gather(self, tensor):
        self.calls.append(("gather", tuple(tensor.shape)))
        return tensor


def test_the_engine_check_makes_the_same_collectives_on_a_rank_with_nothing_to_check():
    """A rank whose share of the first mini-batch is empty recorded no mismatch terms; it must still join the
    reduce and the gather of the ranks that did, or the collectives misalign (a hang)."""
    from gspo.engines.mismatch import EngineMonitor

    busy, idle = _CountingAccelerator(), _CountingAccelerator()
    monitor = EngineMonitor(tolerance=0.1)
    lp = torch.tensor([[-1.0, -2.0]])
    monitor.add_mismatch(lp, lp - 0.01, torch.ones(1, 2))
    monitor.check(busy, step=1)
    EngineMonitor(tolerance=0.1).check(idle, step=1)
    assert busy.calls == idle.calls and len(busy.calls) == 2
