"""GSPOTrainer: the training loop, top to bottom. Orchestration only; the math is gspo.core.

One step = one rollout batch:
    prompts -> generate G completions each -> rewards -> group advantages
    -> reference log-probs (no grad) [-> old log-probs, only when needed]
    -> gspo_epochs x num_mini_batches optimizer updates -> engine weight sync -> metrics / eval / checkpoint

What varies sits behind one seam each, chosen once in __init__; the loop never asks which it has:
the distributed back-end (gspo.backends: prepare, no_sync, backward, clip + skip + step, full states),
the rollout engine (gspo.engines: generate, sync_weights), the reward scorer (gspo.rewards.RewardScorer)
and the optimizer factory. Evaluation is gspo.evaluate.evaluate with the same engine and scorer.

How it departs from a naive loop (and from some peers):
* no old-log-prob pass when it is not needed: with one mini-batch, the first epoch's
  forward runs before any update, so its detached log-probs *are* pi_old and are kept
  for later epochs; only num_mini_batches > 1 costs one extra no-grad pass;
* loss denominators are the whole mini-batch's (and, under data parallelism, the
  global batch's), so micro-batching and extra ranks change nothing but memory;
* a non-finite gradient skips the update (counted, warned, capped), so no NaN reaches
  the weights; SIGINT/SIGTERM finish the step and save a checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict

import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

from gspo.backends import make_accelerator, select_backend
from gspo.config import ConfigError, GSPOConfig
from gspo.core import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    engine_is_weights,
    kl_penalty,
    policy_loss,
    positive_example_nll,
)
from gspo.critic import build_estimator, positive_token_count
from gspo.data import as_dataset, rank_batch, steps_per_epoch
from gspo.engines import RolloutEngine, SamplingParams, build_engine
from gspo.engines.mismatch import EngineMonitor
from gspo.evaluate import evaluate_as_configured
from gspo.faults import InterruptGuard, NonFiniteUpdateError, SkipCounter
from gspo.logprobs import completion_logprobs
from gspo.models import (
    adamw_factory,
    autocast,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    mixed_precision_mode,
    reference_context,
)
from gspo.rewards import build_scorer
from gspo.rollout import Rollout
from gspo.run_checkpoints import RunCheckpoints
from gspo.tracking import MetricsLogger, Progress, record_step, step_metrics, timed, write_run_summary

log = logging.getLogger("gspo")
# per-update values: summed over micro-batches, then averaged over a step's updates and the ranks
UPDATE_METRICS = (
    "policy_loss",
    "entropy",
    "kl_divergence",
    "loss",
    "clip_fraction_seq",
    "clip_fraction_token",
    "ratio_mean",
)


class GSPOTrainer:
    def __init__(
        self,
        config: GSPOConfig,
        reward_funcs=None,
        model=None,
        tokenizer=None,
        ref_model=None,
        reward_model=None,
        eval_dataset=None,
        *,
        rollout_engine: RolloutEngine | None = None,
        reward_scorer=None,
        optimizer_factory=None,
        value_optimizer_factory=None,
    ):
        """The seed's arguments, then the seams: `rollout_engine` (default: transformers `generate`),
        `reward_scorer` (default: bound to config.reward_funcs + reward_funcs + the reward model) and
        `optimizer_factory` (parameters -> optimizer; default AdamW from the config), and the critic's
        `value_optimizer_factory` (default AdamW at value_learning_rate; advantage_estimator='gae')."""
        self.config = cfg = config
        self.accelerator = make_accelerator()
        self.backend = select_backend(self.accelerator, cfg)  # chosen once; nothing below asks which
        self.mixed_precision = mixed_precision_mode(cfg, self.backend.engine_owns_precision)
        set_seed(cfg.seed + self.accelerator.process_index)  # ranks sample different completions
        self.tokenizer = (
            tokenizer if tokenizer is not None else load_tokenizer(cfg.policy_model_name, cfg.trust_remote_code)
        )
        policy = load_policy(cfg, model)
        # LoRA's reference is the base model with adapters off: no second copy
        if cfg.uses_reference_model and not cfg.use_lora and ref_model is None:
            ref_model = load_causal_lm(cfg.policy_model_name, cfg)
        device, whole = self.accelerator.device, self.backend.whole_models
        self.scorer = reward_scorer or build_scorer(cfg, reward_funcs, reward_model, device=device, whole_models=whole)
        self.policy = self.backend.prepare_trained(policy, optimizer_factory or adamw_factory(cfg))
        self.ref_model = (
            self.backend.prepare_frozen(ref_model) if cfg.uses_reference_model and not cfg.use_lora else None
        )
        # group advantages, or a critic (a second trained model) with GAE: chosen once
        self.estimator = build_estimator(
            cfg, backend=self.backend, precision_context=self._autocast, optimizer_factory=value_optimizer_factory
        )
        self.engine = rollout_engine or build_engine(
            cfg,
            policy=self.policy,
            tokenizer=self.tokenizer,
            backend=self.backend,
            precision_context=self._autocast,
            world_size=self.accelerator.num_processes,
        )
        self.eval_dataset = eval_dataset
        self._init_run_state()

    def _init_run_state(self) -> None:
        """What a run keeps besides the models: sampling, checkpoints, the KL controller, skip counts, the step."""
        cfg, acc = self.config, self.accelerator
        self.engine_monitor = EngineMonitor(cfg.engine_mismatch_tolerance)
        self.sampling = SamplingParams.from_config(cfg)
        self.checkpoints = RunCheckpoints(
            accelerator=acc,
            config=cfg,
            backend=self.backend,
            policy=self.policy,
            tokenizer=self.tokenizer,
            critic=self.estimator.critic,
        )
        self.kl_ctl = (
            AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
            if cfg.adaptive_kl
            else FixedKLController(cfg.kl_coef)
        )
        self.skips = SkipCounter(cfg.max_consecutive_skipped_updates)
        self.step = 0
        self.history: list = []
        if acc.is_main_process:
            log.warning("gspo: %s", cfg.clip_summary())

    # The wrapped policy, its optimizer and schedule (the back-end's TrainedModel holds them).
    model = property(lambda self: self.policy.module)
    optimizer = property(lambda self: self.policy.optimizer)
    scheduler = property(lambda self: self.policy.scheduler)

    def _as_dataset(self, data):
        return as_dataset(data, self.tokenizer, self.config)

    # ------------------------------------------------------------------ the loop
    def train(self, dataset=None, eval_dataset=None) -> list:
        """Run GSPO on `dataset` (a GSPODataset, a list of prompts/rows, a file path, or None for
        config.dataset_path). Returns the list of per-step metric dicts."""
        cfg, acc = self.config, self.accelerator
        dataset = self._as_dataset(dataset if dataset is not None else cfg.dataset_path)
        if dataset is None:
            raise ConfigError("no training data: pass a dataset to train() or set GSPOConfig.dataset_path")
        eval_ds = self._as_dataset(eval_dataset or self.eval_dataset or cfg.eval_dataset_path)
        per_epoch = steps_per_epoch(len(dataset), batch_size=cfg.batch_size, world_size=acc.num_processes)
        total = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * per_epoch
        updates = total * cfg.gspo_epochs * cfg.num_mini_batches
        schedule = lambda optimizer: get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, updates)  # noqa: E731
        self.policy.scheduler = schedule(self.policy.optimizer)
        self.estimator.schedule(schedule)
        resumed = self._maybe_resume()
        if resumed:
            self.engine.sync_weights(self.policy)  # an engine holding its own weights must see the restored ones
        tracker = MetricsLogger(
            cfg.output_dir, cfg.report_to, cfg.to_dict(), enabled=acc.is_main_process, resume=resumed
        )
        if resumed:
            tracker.truncate_after(self.step)
        progress = Progress(
            total,
            initial_step=self.step,
            enabled=acc.is_main_process and cfg.progress_bar,
            print_every=cfg.logging_steps,
        )
        try:
            with InterruptGuard() as guard:
                while self.step < total:
                    rows = rank_batch(
                        dataset,
                        step=self.step,
                        steps_per_epoch=per_epoch,
                        batch_size=cfg.batch_size,
                        seed=cfg.seed,
                        rank=acc.process_index,
                        world_size=acc.num_processes,
                    )
                    metrics, rollout = self.training_step(rows)
                    self.step += 1
                    if eval_ds is not None and cfg.eval_steps and self.step % cfg.eval_steps == 0:
                        metrics.update(self.evaluate(eval_ds))
                    self.history.append({"step": self.step, **metrics})
                    record_step(self.history[-1], rollout, tracker=tracker, progress=progress, config=cfg, main=acc)
                    self.checkpoints.save_if_due(self.step, total, guard.signum, self._trainer_state)
            if eval_ds is not None and self.history and not (cfg.eval_steps and total % cfg.eval_steps == 0):
                self.history[-1].update(self.evaluate(eval_ds))
            self._finish()
        finally:
            progress.close()
            tracker.close()
        return self.history

    def training_step(self, rows: list) -> tuple[dict, Rollout]:
        cfg, timings = self.config, {}
        start = time.perf_counter()
        with timed(timings, "generation"):
            rollout = self.engine.generate(rows, group_size=cfg.group_size, sampling=self.sampling)
        with timed(timings, "reward"):
            self._score(rollout)
        if cfg.uses_reference_model:
            with timed(timings, "reference"):
                with reference_context(self.policy.unwrapped(), self.ref_model):
                    rollout.ref_logprobs = self._no_grad_logprobs(self.ref_model or self.policy.module, rollout)
        if cfg.old_logprobs_source == "engine":  # GSPO paper §5.4: the sampler's own likelihoods are pi_old
            rollout.old_logprobs = rollout.engine_logprobs
        elif cfg.num_mini_batches > 1 or cfg.kl_in_reward:  # updated weights, or a KL reward, need pi_old first
            with timed(timings, "old_logprobs"):
                rollout.old_logprobs = self._no_grad_logprobs(self.policy.module, rollout)
        with timed(timings, "advantages"):
            estimator_metrics = self.estimator.estimate(rollout, self.accelerator, kl_coef=self.kl_ctl.value)
        with timed(timings, "update"):
            update_metrics = self._update(rollout)
        with timed(timings, "weight_sync"):  # the engine generates again at the next step only
            self.engine.sync_weights(self.policy)
        metrics = step_metrics(
            rollout,
            update_metrics,
            timings,
            accelerator=self.accelerator,
            group_size=cfg.group_size,
            kl_coef=self.kl_ctl.value,
            learning_rate=self.scheduler.get_last_lr()[0],
            skipped_updates=self.skips.total,
        )
        metrics.update(self.engine_monitor.step_metrics(self.accelerator))
        metrics.update(estimator_metrics)
        if math.isfinite(metrics.get("kl_divergence", math.nan)):  # a skipped NaN update (or value warm-up)
            self.kl_ctl.update(metrics["kl_divergence"], cfg.batch_size * cfg.group_size)
        metrics["step_time_s"] = time.perf_counter() - start
        return metrics, rollout

    def _autocast(self):
        """bfloat16 autocast for a forward pass under mixed_precision='bf16', else a no-op."""
        return autocast(self.accelerator.device, self.mixed_precision)

    # ------------------------------------------------------------------ stages
    def _score(self, rollout: Rollout) -> None:
        result = self.scorer(rollout)
        rollout.rewards, rollout.reward_per_func = result.total.float(), result.per_func
        rollout.num_penalized = result.num_penalized

    def _logprobs(self, model, part: Rollout, *, training: bool):
        """([n, T] log-probs, [n, T] entropy or None) of a micro-batch; the output head as the back-end allows."""
        cfg = self.config
        head = self.backend.head_mode(training=training, gradient_checkpointing=cfg.gradient_checkpointing)
        with self._autocast():  # the loss math after it stays float32
            return completion_logprobs(
                model,
                part.prompt_ids,
                part.prompt_mask,
                part.completion_ids,
                part.completion_mask,
                temperature=cfg.temperature,
                chunk_size=cfg.entropy_chunk_size,
                with_entropy=training,
                entropy_grad=training and cfg.entropy_coef != 0,
                head=head,
            )

    @torch.no_grad()
    def _no_grad_logprobs(self, model, rollout: Rollout) -> torch.Tensor:
        parts = rollout.no_grad_parts(self.config)
        return torch.cat([self._logprobs(model, part, training=False)[0].cpu() for part in parts])

    def _update(self, rollout: Rollout) -> dict:
        """gspo_epochs passes over the rollout, num_mini_batches optimizer updates per pass."""
        cfg, acc = self.config, self.accelerator
        n, world, rank = len(rollout), acc.num_processes, acc.process_index
        keep_old = rollout.old_logprobs is None and cfg.gspo_epochs > 1
        if keep_old:
            rollout.old_logprobs = torch.zeros_like(rollout.completion_mask, dtype=torch.float32)
        totals = defaultdict(float)
        for epoch in range(cfg.gspo_epochs):
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step * 1009 + epoch)
            # Shuffle the global batch (rank r holds its rows [r*n, (r+1)*n)), so that mini-batches are the
            # same whatever the number of processes; a rank's share of one may be uneven, even empty.
            order = torch.randperm(n * world, generator=gen) if cfg.num_mini_batches > 1 else torch.arange(n * world)
            for j, mb in enumerate(order.chunk(cfg.num_mini_batches)):
                local = mb[(mb >= rank * n) & (mb < (rank + 1) * n)] - rank * n
                # With one mini-batch, the first epoch runs before any update: its log-probs are pi_old.
                on_policy = epoch == 0 and cfg.num_mini_batches == 1 and cfg.old_logprobs_source == "trainer"
                for k, v in self._mini_batch_update(
                    rollout,
                    local,
                    n_seq=len(mb) / world,
                    on_policy=on_policy,
                    keep_old=keep_old,
                    first=epoch == 0 and j == 0,
                ).items():
                    totals[k] += v
        updates = cfg.gspo_epochs * cfg.num_mini_batches
        return {k: v / updates for k, v in totals.items()}

    def _mini_batch_update(
        self, rollout: Rollout, idx: torch.Tensor, *, n_seq: float, on_policy: bool, keep_old: bool, first: bool
    ) -> dict:
        """One optimizer update from this rank's rows `idx` of a mini-batch (`first`: the step's first update,
        where the engine's log-probs are checked against the trainer's before anything changed), and the
        critic's update on the same rows when there is one. During value_warmup_steps only the critic trains.

        Denominators are the whole mini-batch's: n_seq and n_tok are its global sequence and token
        counts divided by the world size, because DDP averages gradients over ranks."""
        cfg, acc = self.config, self.accelerator
        n_tok = acc.reduce(rollout.completion_mask[idx].sum().float().to(acc.device), "mean").item()
        counts = dict(n_seq=n_seq, n_tok=n_tok, n_pos=positive_token_count(rollout, idx, cfg, acc))
        train_policy = self.step >= cfg.value_warmup_steps  # VAPO's value pretraining: the critic alone first
        keys = UPDATE_METRICS + (("positive_nll",) if counts["n_pos"] else ())
        sums = dict.fromkeys(keys, 0.0)  # same keys, same order on every rank
        critic = defaultdict(float)
        # Exactly gradient_accumulation_steps micro-batches on every rank, even when its share is short:
        # ranks must run the same number of forward/backward passes (DDP/FSDP collectives).
        micro_batches = torch.tensor_split(idx, cfg.gradient_accumulation_steps)
        for j, mic in enumerate(micro_batches):
            empty, last = len(mic) == 0, j == len(micro_batches) - 1
            part = rollout.select(mic if not empty else torch.arange(1))  # empty: a stand-in row, loss x 0
            if train_policy:
                self._policy_micro_batch(
                    rollout, part, mic, sums, counts, on_policy=on_policy, keep_old=keep_old, first=first, last=last
                )
            for k, v in self.estimator.micro_batch(part, num_tokens=n_tok, last=last, empty=empty).items():
                critic[k] += v
        critic.update(self.estimator.step(critic.get("value_loss", 0.0)))
        if not train_policy:
            return dict(critic)
        sums["clip_fraction_token"] /= n_tok if n_tok > 0 else 1.0  # / global tokens once reduced over ranks
        if first:
            self.engine_monitor.check(acc, self.step + 1)  # a stale engine stops the run before this update
        sums["grad_norm"] = self._optimizer_step(sums["loss"])
        return {**sums, **critic}

    def _policy_micro_batch(self, rollout, part, mic, sums, counts, *, on_policy, keep_old, first, last) -> None:
        """The policy's forward / backward on one micro-batch; its values added to `sums`."""
        empty, acc = len(mic) == 0, self.accelerator
        with self.policy.no_sync(last):
            loss, values = self._micro_batch_loss(part, on_policy=on_policy, **counts)
            self.policy.backward(loss * 0.0 if empty else loss, last=last)
        if keep_old and on_policy and not empty:
            rollout.old_logprobs[mic] = values["logprobs"]
        if empty:
            return
        if values["is_weights"] is not None:
            self.engine_monitor.add_weights(values["is_weights"], part.completion_mask.to(acc.device))
        if first and part.engine_logprobs is not None:
            self.engine_monitor.add_mismatch(values["logprobs"], part.engine_logprobs, part.completion_mask)
        for key in ("policy_loss", "entropy", "kl_divergence", "loss") + (("positive_nll",) if counts["n_pos"] else ()):
            sums[key] += values[key]
        sums["clip_fraction_seq"] += values["clip_fraction_seq"] * len(mic) / counts["n_seq"]
        sums["clip_fraction_token"] += values["clip_fraction_token"] * values["tokens"]
        sums["ratio_mean"] += values["ratio_mean"] * len(mic) / counts["n_seq"]

    def _micro_batch_loss(self, part: Rollout, *, n_seq: float, n_tok: float, n_pos: float, on_policy: bool):
        """(loss with its graph, detached values) for one micro-batch; seed §4.1:
        loss = policy loss - entropy_coef * entropy + kl_coef * KL (+ VAPO's mu * positive-example NLL)."""
        cfg, device = self.config, self.accelerator.device
        mask = part.completion_mask.to(device)
        logp, entropy = self._logprobs(self.policy.module, part, training=True)
        old = logp.detach() if on_policy else part.old_logprobs.to(device)
        weights = None
        if cfg.engine_is_correction != "none":  # sampled from pi_engine, optimised against pi_old
            weights = engine_is_weights(
                old, part.engine_logprobs.to(device), mask, mode=cfg.engine_is_correction, cap=cfg.engine_is_cap
            )
        pg, m = policy_loss(
            logp,
            old,
            part.advantages.to(device),
            mask,
            level=cfg.importance_sampling_level,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            aggregation=cfg.loss_aggregation,
            max_log_ratio=cfg.max_log_ratio,
            num_sequences=n_seq,
            num_tokens=n_tok,
            is_weights=weights,
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
        # One device->host copy per micro-batch (each .item() would be a GPU sync).
        keys = UPDATE_METRICS + ("tokens",) + (("positive_nll",) if n_pos else ())
        stacked = terms[:3] + [loss, m["clip_fraction_seq"], m["clip_fraction_token"], m["ratio_mean"], mask.sum()]
        values = dict(zip(keys, torch.stack(stacked + terms[3:]).detach().double().tolist()))
        values["logprobs"], values["is_weights"] = logp.detach().cpu(), weights
        return loss, values

    def _optimizer_step(self, loss: float) -> float:
        """The back-end clips, skips a non-finite update on every rank (NaN norm), or steps."""
        cfg = self.config
        grad_norm = self.policy.step(loss, max_grad_norm=cfg.max_grad_norm)
        self.skips.record(grad_norm, f"step {self.step + 1}")
        if self.skips.exhausted:  # never replace a clean checkpoint of this step with this mid-step state
            done = self.checkpoints.exists(self.step)
            path = self.checkpoints.path(self.step) if done else self.checkpoints.save(self.step, self._trainer_state())
            raise NonFiniteUpdateError(
                f"{self.skips.in_a_row} consecutive updates had a non-finite loss or gradient (limit "
                f"GSPOConfig.max_consecutive_skipped_updates={cfg.max_consecutive_skipped_updates}); stopped at step "
                f"{self.step}, weights are untouched by them, checkpoint: {path}"
            )
        return grad_norm if math.isfinite(grad_norm) else 0.0

    # ------------------------------------------------------------------ metrics
    # ------------------------------------------------------------------ evaluation
    def evaluate(self, dataset=None) -> dict:
        """Greedy decoding on (a shard per rank of) up to eval_max_samples prompts; metrics prefixed 'eval/'."""
        cfg, acc = self.config, self.accelerator
        dataset = self._as_dataset(dataset if dataset is not None else (self.eval_dataset or cfg.eval_dataset_path))
        return evaluate_as_configured(
            self.engine, self.scorer, dataset, cfg, rank=acc.process_index, world_size=acc.num_processes
        )

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        return {"step": self.step, "kl_controller": self.kl_ctl.state_dict(), "skips": self.skips.state_dict()}

    def _maybe_resume(self) -> bool:
        state = self.checkpoints.resume()
        if state is None:
            return False
        self.step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.skips = SkipCounter(self.config.max_consecutive_skipped_updates, **state["skips"])
        return True

    def save_model(self, output_dir=None) -> None:
        self.checkpoints.export(output_dir or self.config.output_dir)

    def _finish(self) -> None:
        self.save_model()
        if self.accelerator.is_main_process:
            write_run_summary(self.config, steps=self.step, history=self.history)
