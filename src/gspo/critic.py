"""Advantage estimators behind one interface, chosen once: group advantages (GSPO / GRPO) or a critic
with GAE (PPO, VAPO arXiv 2504.05118 §4). The math is gspo.core's; this is the orchestration.

The critic is `AutoModelForTokenClassification` with one label: the backbone of the policy (or of a
reward model, whose `score` head it then starts from) and a linear head giving one value per position.
A standard transformers class rather than a custom value-head wrapper: `from_pretrained` /
`save_pretrained` round-trip it, and peft, FSDP2 and DeepSpeed treat it as any Hugging Face model.
V_t, the value of the state before completion token t, is read at the position that predicts token t
(the same alignment as the policy's log-probs). The sequence reward sits on the last completion token,
EOS included (verl, OpenRLHF, NeMo-RL; TRL's PPO puts it one position later).
"""

from __future__ import annotations

import logging

import torch

from gspo.core import (
    gae_advantages,
    group_advantages,
    length_adaptive_lambda,
    place_sequence_rewards,
    value_loss,
)
from gspo.logprobs import position_ids
from gspo.rollout import Rollout

log = logging.getLogger("gspo")


class GroupEstimator:
    """advantage_estimator='group': A_i from the group's rewards (Eq. 6); nothing to train."""

    critic = None

    def __init__(self, config) -> None:
        self.config = config

    def estimate(self, rollout: Rollout, accelerator, *, kl_coef: float) -> tuple[dict, dict]:
        """(the Rollout's new fields, metrics): here only the advantages."""
        advantages = group_advantages(rollout.rewards, self.config.group_size, self.config.normalize_advantages)
        return {"advantages": advantages}, {}

    def micro_batch(self, part: Rollout, *, num_tokens: float, last: bool, empty: bool) -> dict:
        return {}

    def step(self, mini_batch_loss: float) -> dict:
        return {}

    def schedule(self, make_scheduler) -> None:
        """Give the critic its learning-rate schedule (nothing to schedule here)."""


def token_rewards(rollout: Rollout, *, kl_coef: float) -> torch.Tensor:  # [N, T]
    """The sequence reward on the policy's last token, minus kl_coef * (log pi_old - log pi_ref) on every
    policy token when the KL is part of the reward (PPO-RLHF, k1 per token; kl_coef 0: reward only)."""
    mask = rollout.loss_mask
    rewards = place_sequence_rewards(rollout.rewards, mask)
    if kl_coef and rollout.ref_logprobs is not None:
        rewards = rewards - kl_coef * (rollout.old_logprobs - rollout.ref_logprobs) * mask
    return rewards


def load_value_model(config):
    """The critic: config.value_model_name, or the policy's weights with a fresh scalar head."""
    from transformers import AutoModelForTokenClassification

    from gspo.models import disable_dropout, resolve_model_path

    name = resolve_model_path(config.value_model_name or config.policy_model_name)
    model = AutoModelForTokenClassification.from_pretrained(
        name, num_labels=1, dtype=getattr(torch, config.torch_dtype), trust_remote_code=config.trust_remote_code
    )
    disable_dropout(model)
    return model


def token_values(model, part: Rollout) -> torch.Tensor:  # [n, T]
    """V_t for every completion token: the critic's output at the position that predicts token t."""
    device = next(model.parameters()).device
    ids = torch.cat([part.prompt_ids, part.completion_ids], dim=1).to(device)
    mask = torch.cat([part.prompt_mask, part.completion_mask], dim=1).to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[..., 0]  # [n, P + T]
    p, t = part.prompt_ids.shape[1], part.completion_ids.shape[1]
    return out[:, p - 1 : p - 1 + t].float()


class GAEEstimator:
    """advantage_estimator='gae': the critic's values, GAE advantages per token for the policy (its own
    lambda, or VAPO's length-adaptive one) and return targets for the critic (lambda_value, decoupled)."""

    def __init__(self, config, critic, *, precision_context) -> None:
        self.config, self.critic, self._precision = config, critic, precision_context

    @torch.no_grad()
    def _values(self, rollout: Rollout) -> torch.Tensor:
        with self._precision():
            return torch.cat(
                [token_values(self.critic.module, part).cpu() for part in rollout.no_grad_parts(self.config)]
            )

    def estimate(self, rollout: Rollout, accelerator, *, kl_coef: float) -> tuple[dict, dict]:
        """(the Rollout's new fields: values, returns and per-token advantages; the batch's metrics), over the
        policy's tokens (the loss mask). `kl_coef`: the KL controller's current coefficient, for kl_in_reward."""
        cfg, mask = self.config, rollout.loss_mask
        values = self._values(rollout) * mask
        rewards = token_rewards(rollout, kl_coef=kl_coef if cfg.kl_in_reward else 0.0)  # [N, T]
        lam = (
            length_adaptive_lambda(rollout.policy_lengths, cfg.length_adaptive_alpha)  # VAPO Eq. 5
            if cfg.gae_lambda == "adaptive"
            else torch.full((len(rollout),), float(cfg.gae_lambda))
        )
        advantages, _ = gae_advantages(rewards, values, mask, cfg.gamma, lam)
        _, returns = gae_advantages(rewards, values, mask, cfg.gamma, cfg.gae_lambda_value)  # the critic's targets
        raw = _global_moments(advantages, mask, accelerator)
        if cfg.whiten_advantages:
            advantages = (advantages - raw["mean"]) / (raw["std"] + 1e-8) * mask
        explained = _global_explained_variance(values, returns, mask, accelerator)
        fields = {"values": values, "returns": returns, "advantages": advantages}
        return fields, {
            "value_mean": _global_moments(values, mask, accelerator)["mean"],
            "returns_mean": _global_moments(returns, mask, accelerator)["mean"],
            "advantages_mean": raw["mean"],
            "advantages_std": raw["std"],
            "gae_lambda_policy_mean": accelerator.reduce(lam.mean().to(accelerator.device), "mean").item(),
            "explained_variance": explained,
        }

    def micro_batch(self, part: Rollout, *, num_tokens: float, last: bool, empty: bool) -> dict:
        """The critic's forward / backward on one micro-batch (every rank runs the same number)."""
        mask = part.loss_mask
        with self.critic.no_sync(last):
            with self._precision():
                values = token_values(self.critic.module, part)
            device = values.device
            loss, m = value_loss(
                values,
                part.values.to(device),
                part.returns.to(device),
                mask.to(device),
                self.config.value_clip_range,
                num_tokens=num_tokens,
            )
            self.critic.backward(loss * 0.0 if empty else loss, last=last)
        if empty:
            return {"value_loss": 0.0, "value_clip_fraction": 0.0}
        share = float(mask.sum()) / num_tokens if num_tokens > 0 else 0.0
        return {"value_loss": loss.item(), "value_clip_fraction": m["value_clip_fraction"].item() * share}

    def step(self, mini_batch_loss: float) -> dict:
        norm = self.critic.step(mini_batch_loss, max_grad_norm=self.config.max_grad_norm)
        return {"value_grad_norm": norm if norm == norm else 0.0}

    def schedule(self, make_scheduler) -> None:
        self.critic.scheduler = make_scheduler(self.critic.optimizer)


def _global_moments(x: torch.Tensor, mask: torch.Tensor, accelerator) -> dict:
    """Mean and (population) std of x over the masked tokens of every rank."""
    m = mask.to(torch.float64)
    local = torch.stack([(x.double() * m).sum(), (x.double() ** 2 * m).sum(), m.sum()]).to(accelerator.device)
    total, total_sq, count = accelerator.reduce(local, "sum").cpu().tolist()
    mean = total / max(count, 1.0)
    return {"mean": mean, "std": max(total_sq / max(count, 1.0) - mean**2, 0.0) ** 0.5}


def _global_explained_variance(values, returns, mask, accelerator) -> float:
    """1 - Var(R - V) / Var(R) over every rank's completion tokens (NaN when the returns do not vary)."""
    var_r = _global_moments(returns, mask, accelerator)["std"] ** 2
    var_res = _global_moments(returns - values, mask, accelerator)["std"] ** 2
    return 1.0 - var_res / var_r if var_r > 0 else float("nan")


def build_estimator(config, *, backend, precision_context, optimizer_factory=None):
    """The estimator of config.advantage_estimator; 'gae' loads and prepares the critic as a trained model."""
    if config.advantage_estimator == "group":
        return GroupEstimator(config)
    from gspo.models import adamw_factory

    if config.gae_lambda == "adaptive" and config.length_adaptive_alpha * config.max_new_tokens <= 1:
        log.warning(
            "gspo: length_adaptive_alpha=%g x max_new_tokens=%d <= 1: the length-adaptive lambda 1 - 1/(alpha * l) is "
            "0 for every completion, so the policy learns from one-step TD errors of the critic alone; raise "
            "length_adaptive_alpha for short answers (examples/vapo.yaml)",
            config.length_adaptive_alpha,
            config.max_new_tokens,
        )
    make_optimizer = optimizer_factory or adamw_factory(config, lr=config.value_learning_rate)
    critic = backend.prepare_trained(load_value_model(config), make_optimizer)
    return GAEEstimator(config, critic, precision_context=precision_context)


__all__ = [
    "GAEEstimator",
    "GroupEstimator",
    "build_estimator",
    "load_value_model",
    "token_rewards",
    "token_values",
]
