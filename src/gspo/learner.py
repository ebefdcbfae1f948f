"""The learner: consumes a finished Rollout, updates the policy (and the critic), returns typed stats.

    stats = learner.learn(rollout, step=step)

gspo_epochs passes over the rollout, num_mini_batches optimizer updates per pass, gradient_accumulation_steps
micro-batches per update. The Rollout is read, never written: what the learner keeps across epochs (pi_old from
its own first epoch) lives in the learner.

Where pi_old comes from is decided once (GSPOConfig.pi_old_source): the Rollout's old_logprobs (the engine's,
or the producer's no-grad pass) or, with one mini-batch, the first epoch's own log-probs, which are taken
before any update: no extra forward pass.

Loss denominators are the whole mini-batch's (and, under data parallelism, the global batch's divided by the
world size, since DDP averages gradients), so micro-batching and extra ranks change nothing but memory.
A non-finite loss or gradient skips the update on every rank (decided on the loss tensor and the norm by the
back-end), counted by a SkipCounter; too many in a row raise NonFiniteUpdateError.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from gspo.core import POLICY_LOSSES, aggregate, engine_is_weights, kl_penalty, positive_example_nll
from gspo.faults import NonFiniteUpdateError, SkipCounter
from gspo.moe import DenseRouting
from gspo.rollout import Rollout

# Per-update values: summed over micro-batches, averaged over a step's updates and the ranks.
UPDATE_METRICS = (
    "policy_loss",
    "entropy",
    "kl_divergence",
    "loss",
    "clip_fraction_seq",
    "clip_fraction_token",
    "ratio_mean",
)


@dataclass(frozen=True)
class LearnStats:
    """One step's update values, the same on every rank: means over the step's optimizer updates and ranks.
    `policy` is empty while only the critic trains (value_warmup_steps)."""

    policy: dict = field(default_factory=dict)  # UPDATE_METRICS (+ positive_nll) and grad_norm
    critic: dict = field(default_factory=dict)  # value_loss, value_clip_fraction, value_grad_norm

    @property
    def policy_trained(self) -> bool:
        return bool(self.policy)

    @property
    def kl_divergence(self) -> Optional[float]:
        return self.policy.get("kl_divergence")

    def as_metrics(self) -> dict:
        return {**self.policy, **self.critic}


class _OldFromRollout:
    """pi_old is the Rollout's old_logprobs (the engine's, or the producer's pass before any update); an MoE
    policy's experts under pi_old are the Rollout's old_routes (None where the engine gave pi_old)."""

    def begin(self, rollout: Rollout, routing) -> None:
        self.old, self.old_routes = rollout.old_logprobs, rollout.old_routes

    def routes(self, epoch: int) -> tuple:
        """(pi_old's routes to compare with and replay, a buffer this epoch's passes fill as pi_old's)."""
        return self.old_routes, None

    def __call__(self, idx: torch.Tensor, logprobs: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.old[idx].to(logprobs.device)


class _OldFromFirstEpoch:
    """pi_old is the first epoch's own log-probs: with one mini-batch that forward runs before any update.
    Kept here (never in the Rollout) for the later epochs."""

    def __init__(self, epochs: int) -> None:
        self.keep = epochs > 1

    def begin(self, rollout: Rollout, routing) -> None:
        self.old = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32) if self.keep else None
        width = rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1]
        self.old_routes = routing.buffer(len(rollout), width) if self.keep else None  # filled in epoch 0

    def routes(self, epoch: int) -> tuple:
        return (None, self.old_routes) if epoch == 0 else (self.old_routes, None)

    def __call__(self, idx: torch.Tensor, logprobs: torch.Tensor, epoch: int) -> torch.Tensor:
        if epoch == 0:
            if self.keep and len(idx):
                self.old[idx] = logprobs.detach().float().cpu()
            return logprobs.detach()
        return self.old[idx].to(logprobs.device)


def positive_token_count(rollout: Rollout, idx: torch.Tensor, config, accelerator) -> float:
    """VAPO's positive examples in the mini-batch `idx`: their global policy-token count / world size, the NLL's
    denominator (Eq. 9); 0 when positive_nll_coef is 0 (no NLL term). Collective when the term is on."""
    if not config.positive_nll_coef:
        return 0.0
    positive = (rollout.rewards[idx] >= config.positive_reward_threshold).float()
    local = (rollout.loss_mask[idx].float() * positive[:, None]).sum()
    return max(accelerator.reduce(local.to(accelerator.device), "mean").item(), 1e-12)  # > 0: on, perhaps empty


def nonfinite_source(rollout: Rollout, idx: torch.Tensor, loss: torch.Tensor) -> str:
    """The first non-finite stage of this rank's update, in the order the data flows."""
    if rollout.rewards is not None and not bool(torch.isfinite(rollout.rewards[idx]).all()):
        return "rewards"
    if rollout.advantages is not None and not bool(torch.isfinite(rollout.advantages[idx]).all()):
        return "advantages"
    if not bool(torch.isfinite(loss).all()):
        return "loss"
    return "gradient (the loss was finite on this rank)"


class Learner:
    """Policy (and critic) updates from one Rollout. Built once by the trainer with everything it needs."""

    def __init__(
        self, config, *, accelerator, policy, estimator, logprobs, kl_controller, engine_monitor, routing=None
    ) -> None:
        """`routing`: an MoE policy's routes (gspo.moe.build_routing; None: a dense policy)."""
        self.config, self.accelerator = config, accelerator
        self.routing = routing or DenseRouting()
        self.policy, self.estimator, self.logprobs = policy, estimator, logprobs
        self.kl_ctl, self.engine_monitor = kl_controller, engine_monitor
        self.objective = POLICY_LOSSES[config.policy_loss]  # chosen once, by name
        self.pi_old = (
            _OldFromRollout() if config.pi_old_source != "first_epoch" else _OldFromFirstEpoch(config.gspo_epochs)
        )
        self.skips = SkipCounter(config.max_consecutive_skipped_updates)

    def learn(self, rollout: Rollout, *, step: int) -> LearnStats:
        """gspo_epochs passes over the rollout, num_mini_batches optimizer updates per pass (`step`: the steps
        done before this one, which seeds the mini-batch shuffle)."""
        cfg, acc = self.config, self.accelerator
        totals: dict = defaultdict(float)
        self.pi_old.begin(rollout, self.routing)
        for epoch in range(cfg.gspo_epochs):
            for j, (local, n_seq) in enumerate(self._mini_batches(len(rollout), step=step, epoch=epoch)):
                values = self._update(rollout, local, n_seq=n_seq, epoch=epoch, step=step, first=epoch + j == 0)
                for k, v in values.items():
                    totals[k] += v
        updates = cfg.gspo_epochs * cfg.num_mini_batches
        keys = list(totals)  # the same keys in the same order on every rank
        local = torch.tensor([totals[k] / updates for k in keys], device=acc.device, dtype=torch.float64)
        means = dict(zip(keys, acc.reduce(local, "mean").tolist()))
        critic_keys = [k for k in keys if k.startswith("value_")]
        means.update(self.routing.step_metrics(lambda t: acc.reduce(t.to(acc.device), "sum").cpu()))
        return LearnStats(
            policy={k: v for k, v in means.items() if k not in critic_keys},
            critic={k: means[k] for k in critic_keys},
        )

    def _mini_batches(self, n: int, *, step: int, epoch: int) -> list:
        """[(this rank's rows of mini-batch j, the mini-batch's sequences / world size)]. The global batch (rank r
        holds rows [r*n, (r+1)*n)) is shuffled the same way whatever the number of processes, so mini-batches
        do not depend on it; a rank's share of one may be uneven, even empty."""
        cfg, acc = self.config, self.accelerator
        world, rank = acc.num_processes, acc.process_index
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + epoch)
        order = torch.randperm(n * world, generator=gen) if cfg.num_mini_batches > 1 else torch.arange(n * world)
        return [
            (mb[(mb >= rank * n) & (mb < (rank + 1) * n)] - rank * n, len(mb) / world)
            for mb in order.chunk(cfg.num_mini_batches)
        ]

    def _update(self, rollout: Rollout, idx: torch.Tensor, *, n_seq: float, epoch: int, step: int, first: bool):
        """One optimizer update from this rank's rows `idx` of a mini-batch, and the critic's update on the same
        rows when there is one; during value_warmup_steps only the critic trains. `first`: the step's first
        update, where the engine's log-probs are checked against the trainer's before anything changed."""
        cfg, acc = self.config, self.accelerator
        n_tok = acc.reduce(rollout.loss_mask[idx].sum().float().to(acc.device), "mean").item()
        # No loss token anywhere (every completion masked: mask_truncated_completions): every masked sum is 0,
        # and a denominator of 1 keeps that 0 instead of 0/0 = NaN (which would count as a non-finite update).
        n_tok = n_tok if n_tok > 0 else 1.0
        n_pos = positive_token_count(rollout, idx, cfg, acc)
        counts = dict(n_seq=n_seq, n_tok=n_tok, n_pos=n_pos)  # the mini-batch's global denominators / world size
        train_policy = step >= cfg.value_warmup_steps  # VAPO's value pretraining: the critic alone first
        aux_key = ("moe/aux_loss",) if self.routing.aux_coef > 0 else ()
        sums = dict.fromkeys(UPDATE_METRICS + (("positive_nll",) if n_pos else ()) + aux_key, 0.0)  # same on all ranks
        loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)  # the skip rule reads this tensor
        critic: dict = defaultdict(float)
        # Exactly gradient_accumulation_steps micro-batches on every rank, even when its share is short:
        # ranks must run the same number of forward/backward passes (DDP/FSDP collectives).
        micro_batches = torch.tensor_split(idx, cfg.gradient_accumulation_steps)
        for j, mic in enumerate(micro_batches):
            empty, last = len(mic) == 0, j == len(micro_batches) - 1
            rows = mic if not empty else torch.arange(1)  # empty: a stand-in row, its loss x 0
            part = rollout.select(rows)
            if train_policy:
                with self.policy.no_sync(last):
                    loss, values = self._micro_batch_loss(part, rows, epoch=epoch, empty=empty, **counts)
                    self.policy.backward(loss * 0.0 if empty else loss, last=last)
                if not empty:
                    loss_sum = loss_sum + loss.detach().double()
                    self._record(values, part, sums, n_seq=n_seq, first=first)
            for k, v in self.estimator.micro_batch(part, num_tokens=n_tok, last=last, empty=empty).items():
                critic[k] += v
        critic.update(self.estimator.step(critic.get("value_loss", 0.0)))
        if not train_policy:
            return dict(critic)
        sums["clip_fraction_token"] /= n_tok if n_tok > 0 else 1.0  # / global tokens once reduced over ranks
        if first and rollout.engine_logprobs is not None:  # the same on every rank: the engine reports them or not
            self.engine_monitor.check(acc, step + 1)  # a stale engine stops the run before this update
        sums["grad_norm"] = self._optimizer_step(loss_sum, step, lambda: nonfinite_source(rollout, idx, loss_sum))
        return {**sums, **critic}

    def _record(self, values: dict, part: Rollout, sums: dict, *, n_seq: float, first: bool) -> None:
        """Add one micro-batch's detached values to the update's sums; feed the engine monitor."""
        mask = part.loss_mask
        if values["is_weights"] is not None:
            self.engine_monitor.add_weights(values["is_weights"], mask.to(values["is_weights"].device))
        if first and part.engine_logprobs is not None:
            self.engine_monitor.add_mismatch(values["logprobs"], part.engine_logprobs, mask)
        n = len(part)
        for key in ("policy_loss", "entropy", "kl_divergence", "loss", "positive_nll", "moe/aux_loss"):
            if key in sums:
                sums[key] += values[key]
        sums["clip_fraction_seq"] += values["clip_fraction_seq"] * n / n_seq
        sums["clip_fraction_token"] += values["clip_fraction_token"] * values["tokens"]
        sums["ratio_mean"] += values["ratio_mean"] * n / n_seq

    def _micro_batch_loss(
        self, part: Rollout, idx, *, n_seq: float, n_tok: float, n_pos: float, epoch: int, empty: bool = False
    ):
        """(loss with its graph, detached values) for one micro-batch; seed §4.1:
        loss = policy loss - entropy_coef * entropy + kl_coef * KL (+ VAPO's mu * positive-example NLL)
        (+ an MoE policy's router_aux_loss_coef * load-balancing loss over the micro-batch's real tokens)."""
        cfg, device = self.config, self.accelerator.device
        mask = part.loss_mask.to(device)
        with self._routes(part, idx, epoch, empty) as moe:
            logp, entropy = self.logprobs(self.policy.module, part, training=True)
        aux = moe.aux_loss()
        old = self.pi_old(idx, logp, epoch)
        weights = None
        if cfg.engine_is_correction != "none":  # sampled from pi_engine, optimised against pi_old
            weights = engine_is_weights(
                old, part.engine_logprobs.to(device), mask, mode=cfg.engine_is_correction, cap=cfg.engine_is_cap
            )
        pg, m = self.objective(
            logp,
            old,
            part.advantages.to(device),
            mask,
            num_sequences=n_seq,
            num_tokens=n_tok,
            is_weights=weights,
            **cfg.policy_loss_kwargs(),
        )
        ent = aggregate(entropy, mask, "token-mean", num_tokens=n_tok)
        kl = (
            kl_penalty(logp, part.ref_logprobs.to(device), mask, cfg.kl_estimator, num_tokens=n_tok)
            if part.ref_logprobs is not None
            else torch.zeros((), device=device)
        )
        kl_weight = 0.0 if cfg.kl_in_reward else self.kl_ctl.value  # the KL is in the reward (PPO-RLHF) or here
        loss = pg - cfg.entropy_coef * ent + kl_weight * kl
        terms = [pg, ent, kl]
        if n_pos:  # VAPO Eq. 9 on the completions scored as correct
            nll = positive_example_nll(logp, mask, part.rewards.to(device) >= cfg.positive_reward_threshold, n_pos)
            loss, terms = loss + cfg.positive_nll_coef * nll, terms + [nll]
        if self.routing.aux_coef > 0:  # a mean over this micro-batch's tokens: weighted like the other means
            aux = aux if aux is not None else torch.zeros((), device=device)
            share = len(part) / n_seq  # the micro-batch's share of the mini-batch's sequences
            loss, terms = loss + self.routing.aux_coef * share * aux, terms + [aux * share]
        # One device->host copy per micro-batch (each .item() would be a GPU sync).
        keys = UPDATE_METRICS + ("tokens",) + (("positive_nll",) if n_pos else ())
        keys += ("moe/aux_loss",) if self.routing.aux_coef > 0 else ()
        stacked = terms[:3] + [loss, m["clip_fraction_seq"], m["clip_fraction_token"], m["ratio_mean"], mask.sum()]
        values = dict(zip(keys, torch.stack(stacked + terms[3:]).detach().double().tolist()))
        values["logprobs"], values["is_weights"] = logp.detach().cpu(), weights
        return loss, values

    def _routes(self, part: Rollout, idx, epoch: int, empty: bool):
        """The MoE routing context of one training forward over rollout rows `idx` (a no-op for a dense policy and
        for an empty micro-batch's stand-in row)."""
        if empty:
            return DenseRouting().train_pass(idx, old=None, record=None, attention_mask=None, count_mask=None)
        old, record = self.pi_old.routes(epoch)
        device = self.accelerator.device
        return self.routing.train_pass(
            idx,
            old=old,
            record=record,
            attention_mask=torch.cat([part.prompt_mask, part.completion_mask], dim=1).to(device),
            count_mask=torch.cat([torch.zeros_like(part.prompt_mask), part.loss_mask], dim=1),  # policy tokens
            engine_routes=part.engine_routes,
        )

    def _optimizer_step(self, loss: torch.Tensor, step: int, source=None) -> float:
        """The back-end clips, skips a non-finite update on every rank (a non-finite loss or norm), or steps.
        `source()`: what was not finite first, for the warning."""
        grad_norm = self.policy.step(loss, max_grad_norm=self.config.max_grad_norm)
        self.skips.record(grad_norm, f"step {step + 1}", source=source)
        if self.skips.exhausted:
            raise NonFiniteUpdateError(
                f"{self.skips.in_a_row} consecutive updates had a non-finite loss or gradient (limit "
                f"GSPOConfig.max_consecutive_skipped_updates={self.config.max_consecutive_skipped_updates}); "
                f"stopped at step {step}, weights are untouched by them"
            )
        return grad_norm if grad_norm == grad_norm else 0.0
