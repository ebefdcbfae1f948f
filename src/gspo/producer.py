"""The rollout producer: prompts in, finished Rollouts out, one per training step.

    generate -> score -> [dynamic sampling: drop zero-spread groups, generate more] -> [mask truncated]
    -> reference log-probs -> pi_old -> advantages -> Rollout (frozen; nobody writes into it after this)

The trainer iterates it, in the shape of nanochat's `get_batch`:

    for rollout in producer.rollouts(prompts):
        stats = learner.learn(rollout, step=step)
        engine.sync_weights(policy)

It is lazy: the next rollout is generated only when asked for, after the weights were synced.

Dynamic sampling (DAPO §3.3, verl `algorithm.filter_groups`): a group whose filter metric is the same for all
its completions has zero advantage and only dilutes the batch. Each rank keeps the groups with spread and
generates more prompts until every rank has its share (batch_size / world groups), at most
dynamic_sampling_max_rounds rounds; every rank runs the same number of rounds, since a sharded model's
generation is collective. When the rounds run out, the batch is topped up with zero-spread groups (no
policy-gradient signal) so that its size, and every loss denominator, means what it means without it.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from gspo.config import ConfigError
from gspo.core import zero_std_groups
from gspo.models import reference_context
from gspo.moe import DenseRouting
from gspo.rollout import Rollout, concat_rollouts
from gspo.tracking import timed

log = logging.getLogger("gspo")


class RolloutProducer:
    """Builds finished Rollouts. Everything it needs comes in once, through the constructor."""

    def __init__(
        self,
        config,
        *,
        engine,
        sampling,
        scorer,
        logprobs,
        policy,
        ref_model,
        estimator,
        kl_controller,
        accelerator,
        pad_id: int,
        routing=None,
    ) -> None:
        """`routing`: an MoE policy's routes (gspo.moe; None or DenseRouting: nothing to record)."""
        self.config, self.engine, self.sampling, self.scorer = config, engine, sampling, scorer
        self.routing = routing or DenseRouting()
        self.logprobs, self.policy, self.ref_model, self.estimator = logprobs, policy, ref_model, estimator
        self.kl_ctl, self.accelerator, self.pad_id = kl_controller, accelerator, pad_id
        self._warned_filled = False

    def rollouts(self, prompts):
        """One finished Rollout per step, forever; `prompts` is an iterator of this rank's prompt batches."""
        for rows in prompts:
            yield self.produce(rows, more=prompts)

    def produce(self, rows: list, *, more=None) -> Rollout:
        """One finished Rollout from this rank's prompt rows; dynamic sampling draws further batches from `more`
        (an iterator of prompt batches; None: the same rows again)."""
        cfg, timings, start = self.config, {}, time.perf_counter()
        rollout = self._sample(rows, more if more is not None else itertools.repeat(rows), timings)
        if cfg.mask_truncated_completions:  # DAPO §3.4: no gradient from a cut-off answer
            rollout = rollout.with_(
                loss_mask=rollout.loss_mask * (~rollout.truncated).to(rollout.loss_mask.dtype)[:, None]
            )
        if cfg.uses_reference_model:
            with timed(timings, "reference"), reference_context(self.policy.unwrapped(), self.ref_model):
                rollout = rollout.with_(
                    ref_logprobs=self.logprobs.no_grad(self.ref_model or self.policy.module, rollout)
                )
        if cfg.pi_old_source == "engine":  # GSPO paper §5.4: the sampler's own likelihoods are pi_old
            rollout = rollout.with_(old_logprobs=rollout.engine_logprobs)
        elif cfg.pi_old_source == "no_grad_pass":  # updated weights, or a KL reward, need pi_old up front
            with timed(timings, "old_logprobs"):
                rollout = self._old_pass(rollout)
        with timed(timings, "advantages"):
            fields, metrics = self.estimator.estimate(rollout, self.accelerator, kl_coef=self.kl_ctl.value)
        info = {
            "timings": timings,
            "metrics": {**rollout.info.get("metrics", {}), **metrics},
            "wall_s": time.perf_counter() - start,  # all of it, the untimed work and waits between phases too
        }
        return rollout.with_(**fields, info=info)

    def _old_pass(self, rollout: Rollout) -> Rollout:
        """pi_old's log-probs, and an MoE policy's experts under pi_old when they are replayed or measured."""
        routes = self.routing.buffer(len(rollout), rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1])
        around = (lambda rows: self.routing.old_pass(rows, routes)) if routes is not None else None
        old = self.logprobs.no_grad(self.policy.module, rollout, around=around)
        return rollout.with_(old_logprobs=old, old_routes=routes)

    def _generate_scored(self, rows: list, timings: dict) -> Rollout:
        with timed(timings, "generation"):
            rollout = self.engine.generate(rows, group_size=self.config.group_size, sampling=self.sampling)
        with timed(timings, "reward"):
            result = self.scorer(rollout)
        return rollout.with_(
            rewards=result.total.float(), reward_per_func=result.per_func, num_penalized=result.num_penalized
        )

    def _sample(self, rows: list, more, timings: dict) -> Rollout:
        """Generate and score; under dynamic sampling, keep the groups with spread and refill (see module doc)."""
        cfg, acc = self.config, self.accelerator
        rollout = self._generate_scored(rows, timings)
        if not cfg.dynamic_sampling:
            return rollout
        target = len(rows)  # groups this rank needs: batch_size / world
        kept, dropped, rounds, penalized = [], [], 1, rollout.num_penalized
        while True:
            spread = ~zero_std_groups(self._filter_values(rollout), cfg.group_size)  # [groups]
            idx = spread.nonzero().flatten().tolist()
            kept += [rollout.select_groups([g]) for g in idx]
            dropped += [rollout.select_groups([g]) for g in (~spread).nonzero().flatten().tolist()]
            short = torch.tensor(float(len(kept) < target), device=acc.device)
            if acc.reduce(short, "sum").item() == 0:  # every rank has its share
                break
            if cfg.dynamic_sampling_max_rounds and rounds >= cfg.dynamic_sampling_max_rounds:
                break
            rollout = self._generate_scored(next(more), timings)
            rounds, penalized = rounds + 1, penalized + rollout.num_penalized
        filled = max(0, target - len(kept))
        batch = concat_rollouts(kept[:target] + dropped[:filled], self.pad_id)
        counts = torch.tensor(
            [min(len(kept), target), len(dropped), filled, len(kept) + len(dropped)],
            device=acc.device,
            dtype=torch.float64,
        )
        kept_n, dropped_n, filled_n, total_n = acc.reduce(counts, "sum").tolist()
        if filled_n and not self._warned_filled and acc.is_main_process:
            self._warned_filled = True  # once a run; every step's count is in the metrics
            log.warning(
                "gspo: dynamic sampling kept %d of %d groups with reward spread after %d rounds "
                "(dynamic_sampling_max_rounds=%d); the batch was topped up with %d zero-spread groups "
                "(metric dynamic_sampling/filled_groups; warned once)",
                int(kept_n),
                cfg.batch_size,
                rounds,
                cfg.dynamic_sampling_max_rounds,
                int(filled_n),
            )
        return batch.with_(
            num_penalized=penalized,  # every reward replaced by the penalty while producing this step
            info={
                "metrics": {
                    "dynamic_sampling/rounds": float(rounds),
                    "dynamic_sampling/kept_groups": kept_n,
                    "dynamic_sampling/dropped_groups": dropped_n,
                    "dynamic_sampling/filled_groups": filled_n,
                    "dynamic_sampling/zero_std_fraction": dropped_n / max(total_n, 1.0),
                }
            },
        )

    def _filter_values(self, rollout: Rollout) -> torch.Tensor:  # [N]
        name = self.config.dynamic_sampling_metric
        if name == "reward":
            return rollout.rewards
        if name not in rollout.reward_per_func:
            raise ConfigError(
                f"GSPOConfig.dynamic_sampling_metric={name!r} is not allowed: expected 'reward' or the name of "
                f"a reward function, one of {sorted(rollout.reward_per_func)}."
            )
        # None ("no opinion", NaN) counts as 0: a group the function did not score has no spread in it
        return torch.as_tensor(rollout.reward_per_func[name]).float().nan_to_num(0.0)
