"""GSPOTrainer: the training loop, top to bottom. Orchestration only; the math is gspo.core.

One step = one rollout batch:
    prompts -> generate G completions each -> rewards -> group advantages
    -> reference log-probs (no grad) [-> old log-probs, only when needed]
    -> gspo_epochs x num_mini_batches optimizer updates -> metrics / eval / checkpoint

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

import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import get_scheduler

from gspo import checkpoint as ckpt
from gspo import zero
from gspo.config import ConfigError, GSPOConfig
from gspo.core import AdaptiveKLController, FixedKLController, aggregate, group_advantages, kl_penalty, policy_loss, zero_std_groups
from gspo.data import GSPODataset, load_rows
from gspo.faults import InterruptGuard, NonFiniteUpdateError, SkipCounter, TrainingInterrupted
from gspo.logprobs import completion_logprobs
from gspo.models import apply_lora, autocast, load_causal_lm, load_tokenizer, mixed_precision_mode, reference_context
from gspo.parallel import full_optimizer_state, full_state_dict, gathered, is_sharded, shard_model
from gspo.rewards import RewardModelScorer, compute_rewards, resolve_reward_funcs
from gspo.rollout import Rollout, generate_rollout
from gspo.tracking import MetricsLogger, Progress, print_samples

log = logging.getLogger("gspo")


def _make_accelerator() -> Accelerator:
    """Accelerator() that honours the launcher's world size on machines without a GPU.

    accelerate starts its CPU (gloo) backend only when asked for the CPU (`accelerate launch --cpu`
    sets ACCELERATE_USE_CPU); under plain `torchrun` on a CPU-only machine, Accelerator() would run
    every worker as an independent single process: N unsynchronised copies racing over one output_dir.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = getattr(torch, "accelerator", None) is not None and torch.accelerator.is_available()
    if zero.launched_with_deepspeed():
        acc = Accelerator(**zero.accelerator_kwargs(has_accelerator))
    else:
        # gspo autocasts itself (GSPOConfig.mixed_precision): accelerate's would wrap only model.forward
        acc = Accelerator(cpu=world > 1 and not has_accelerator, mixed_precision="no")
    if acc.num_processes != world:
        raise RuntimeError(f"the launcher started WORLD_SIZE={world} processes but accelerate runs "
                           f"{acc.num_processes} ({acc.distributed_type}); refusing to train unsynchronised copies")
    return acc


class GSPOTrainer:
    def __init__(self, config: GSPOConfig, reward_funcs=None, model=None, tokenizer=None,
                 ref_model=None, reward_model=None, eval_dataset=None):
        self.config = cfg = config
        self.accelerator = _make_accelerator()
        self.mixed_precision = mixed_precision_mode(cfg, zero.launched_with_deepspeed())
        set_seed(cfg.seed + self.accelerator.process_index)  # ranks sample different completions
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.policy_model_name, cfg.trust_remote_code)
        policy = model if model is not None else load_causal_lm(cfg.policy_model_name, cfg)
        if cfg.use_lora:
            policy = apply_lora(policy, cfg)
        if cfg.gradient_checkpointing:
            # transformers >= 5.2x renamed it (the old name warns); older versions only have the old one
            getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)()
        self.ref_model = None
        if cfg.uses_reference_model and not cfg.use_lora:  # LoRA: the base model with adapters off
            self.ref_model = ref_model if ref_model is not None else load_causal_lm(cfg.policy_model_name, cfg)
            self.ref_model.requires_grad_(False).eval().to(self.accelerator.device)
        self.reward_funcs = resolve_reward_funcs(
            list(cfg.reward_funcs) + list(reward_funcs or []),
            list(cfg.reward_weights or [None] * len(cfg.reward_funcs)) + [None] * len(reward_funcs or []))
        self.reward_model = reward_model
        if self.reward_model is None and cfg.reward_model_name:
            with zero.whole_models_context(self.accelerator):  # a whole scorer per rank, even under ZeRO-3
                self.reward_model = RewardModelScorer(cfg.reward_model_name, device=self.accelerator.device,
                                                      trust_remote_code=cfg.trust_remote_code)
        if not self.reward_funcs and self.reward_model is None:
            raise ConfigError("GSPOTrainer has no reward: set GSPOConfig.reward_model_name, GSPOConfig.reward_funcs, "
                              "or pass reward_funcs=[...]")
        self.model, self.optimizer = self._prepare_policy(policy)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        self.skips = SkipCounter(cfg.max_consecutive_skipped_updates)
        self.eval_dataset = eval_dataset
        self.scheduler = None
        self.step = 0
        self.history: list = []
        if self.accelerator.is_main_process:
            log.warning("gspo: importance_sampling_level=%s, clip eps low=%g high=%g%s", cfg.importance_sampling_level,
                        cfg.clip_low, cfg.clip_high, " (the level's recommended values)" if cfg.clip_range is None
                        and cfg.clip_range_low is None and cfg.clip_range_high is None else "")

    def _prepare_policy(self, policy):
        """DDP or DeepSpeed (accelerate's prepare) or, with fsdp and several processes, FSDP2 shards; then
        AdamW over what this rank holds (after sharding: its parameters are the shards)."""
        cfg, acc = self.config, self.accelerator
        self._zero_stage = zero.stage(acc)
        if self._zero_stage >= 0:
            zero.configure(acc, cfg)
            if cfg.fsdp:
                raise ConfigError("GSPOConfig.fsdp=True under a DeepSpeed launch: pick one (fsdp=False to use ZeRO)")
            if self._zero_stage == 3 and self.ref_model is not None:  # partitioned like the policy
                self.ref_model = zero.reference_engine(acc, self.ref_model)
        # An accelerate FSDP config on a backend where accelerate cannot shard (CPU: it falls back to DDP).
        plugin_dropped = (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
                          and acc.distributed_type != DistributedType.FSDP)
        sharded = (cfg.fsdp or plugin_dropped) and acc.num_processes > 1
        if sharded:  # accelerate would put DDP on top of it (and refuses FSDP on CPU): shard it ourselves
            if plugin_dropped and not cfg.fsdp and acc.is_main_process:
                log.warning("gspo: accelerate's FSDP plugin is inactive on %s; sharding with FSDP2 as with "
                            "GSPOConfig.fsdp=True", acc.distributed_type)
            policy = shard_model(policy, acc.device, acc.num_processes)
            if self.ref_model is not None:  # frozen, no optimizer state, but as large as the policy
                self.ref_model = shard_model(self.ref_model, acc.device, acc.num_processes)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay)
        policy, optimizer = (policy, acc.prepare(optimizer)) if sharded else acc.prepare(policy, optimizer)
        return policy, optimizer

    # ------------------------------------------------------------------ data
    def _as_dataset(self, data):
        cfg = self.config
        if data is None or isinstance(data, GSPODataset):
            return data
        rows = load_rows(data, cfg.prompt_column, seed=cfg.seed) if isinstance(data, (str, Path)) else data
        return GSPODataset(rows, self.tokenizer, cfg.prompt_column, cfg.max_prompt_length, cfg.prompt_truncation)

    def _steps_per_epoch(self, dataset) -> int:
        cfg, world = self.config, self.accelerator.num_processes
        if cfg.batch_size % world:
            raise ConfigError(f"GSPOConfig.batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
        if len(dataset) < cfg.batch_size:
            raise ConfigError(f"the dataset has {len(dataset)} prompts, fewer than GSPOConfig.batch_size={cfg.batch_size}")
        return len(dataset) // cfg.batch_size

    def _batch_rows(self, dataset, step: int, steps_per_epoch: int) -> list:
        """This rank's prompts for `step`: a deterministic function of (seed, step), so resume needs no sampler state."""
        cfg = self.config
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        per_rank = cfg.batch_size // self.accelerator.num_processes
        start = k * cfg.batch_size + self.accelerator.process_index * per_rank
        return [dataset[int(i)] for i in order[start:start + per_rank]]

    # ------------------------------------------------------------------ the loop
    def train(self, dataset=None, eval_dataset=None) -> list:
        """Run GSPO on `dataset` (a GSPODataset, a list of prompts/rows, a file path, or None for
        config.dataset_path). Returns the list of per-step metric dicts."""
        cfg, acc = self.config, self.accelerator
        dataset = self._as_dataset(dataset if dataset is not None else cfg.dataset_path)
        if dataset is None:
            raise ConfigError("no training data: pass a dataset to train() or set GSPOConfig.dataset_path")
        eval_ds = self._as_dataset(eval_dataset or self.eval_dataset or cfg.eval_dataset_path)
        steps_per_epoch = self._steps_per_epoch(dataset)
        total = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * steps_per_epoch
        updates = total * cfg.gspo_epochs * cfg.num_mini_batches
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer, cfg.warmup_steps, updates)
        resumed = self._maybe_resume()
        tracker = MetricsLogger(cfg.output_dir, cfg.report_to, cfg.to_dict(), enabled=acc.is_main_process, resume=resumed)
        if resumed:
            tracker.truncate_after(self.step)
        progress = Progress(total, initial_step=self.step, enabled=acc.is_main_process and cfg.progress_bar,
                            print_every=cfg.logging_steps)
        try:
            with InterruptGuard() as guard:
                while self.step < total:
                    rows = self._batch_rows(dataset, self.step, steps_per_epoch)
                    metrics, rollout = self.training_step(rows)
                    self.step += 1
                    if eval_ds is not None and cfg.eval_steps and self.step % cfg.eval_steps == 0:
                        metrics.update(self.evaluate(eval_ds))
                    self._record(metrics, rollout, tracker, progress)
                    self._checkpoint_if_due(total, guard)
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
        with self._timed(timings, "generation"):
            policy = self.accelerator.unwrap_model(self.model)
            with gathered(self.model), self._autocast():
                rollout = generate_rollout(policy, self.tokenizer, rows, cfg.group_size, cfg.max_new_tokens, True,
                                           cfg.temperature, cfg.top_p, cfg.top_k, synced_gpus=self._synced_gpus)
        with self._timed(timings, "reward"):
            self._score(rollout)
        if self.ref_model is not None or (cfg.use_lora and cfg.uses_reference_model):
            with self._timed(timings, "reference"):
                with reference_context(policy, self.ref_model):
                    rollout.ref_logprobs = self._no_grad_logprobs(self.ref_model or self.model, rollout)
        if cfg.num_mini_batches > 1:  # later mini-batches run after an update: they need pi_old
            with self._timed(timings, "old_logprobs"):
                rollout.old_logprobs = self._no_grad_logprobs(self.model, rollout)
        with self._timed(timings, "update"):
            update_metrics = self._update(rollout)
        metrics = self._step_metrics(rollout, update_metrics, timings)
        if math.isfinite(metrics["kl_divergence"]):  # a skipped NaN update must not poison kl_coef for good
            self.kl_ctl.update(metrics["kl_divergence"], cfg.batch_size * cfg.group_size)
        metrics["step_time_s"] = time.perf_counter() - start
        return metrics, rollout

    def _autocast(self):
        """bfloat16 autocast for a forward pass under mixed_precision='bf16', else a no-op."""
        return autocast(self.accelerator.device, self.mixed_precision)

    @property
    def _synced_gpus(self):
        """False once `gathered` has made sharded weights whole (no per-token collectives needed);
        otherwise None: transformers decides."""
        return False if is_sharded(self.model) or self._zero_stage == 3 else None

    @property
    def _head_bound_ok(self) -> bool:
        """Under ZeRO-3 every call of the output head gathers its weight: a chunked head would make the
        number of gathers depend on this rank's completion lengths, and ranks would wait on each other."""
        return self._zero_stage != 3

    @property
    def _train_head_bound(self):
        """Training pass: head chunks recomputed under gradient checkpointing (True), else only when the
        logits are large (None); under ZeRO-3 one head call (False)."""
        if not self._head_bound_ok:
            return False
        return True if self.config.gradient_checkpointing else None

    # ------------------------------------------------------------------ stages
    def _score(self, rollout: Rollout) -> None:
        cfg = self.config
        result = compute_rewards(self.reward_funcs, rollout.prompts, rollout.completions, rollout.completion_id_lists,
                                 rollout.extra, self.reward_model, cfg.reward_model_weight,
                                 cfg.reward_error_policy, cfg.reward_penalty_value)
        rollout.rewards, rollout.reward_per_func = result.total.float(), result.per_func
        rollout.num_penalized = result.num_penalized
        rollout.advantages = group_advantages(rollout.rewards, cfg.group_size, cfg.normalize_advantages)  # Eq. 6

    @torch.no_grad()
    def _no_grad_logprobs(self, model, rollout: Rollout) -> torch.Tensor:
        cfg, out = self.config, []
        micro = max(1, len(rollout) // (cfg.num_mini_batches * cfg.gradient_accumulation_steps))
        for idx in torch.arange(len(rollout)).split(micro):
            part = rollout.select(idx)
            with self._autocast():
                lp, _ = completion_logprobs(model, part.prompt_ids, part.prompt_mask, part.completion_ids,
                                            part.completion_mask, cfg.temperature, cfg.entropy_chunk_size,
                                            bounded_head=self._head_bound_ok)  # no backward: bounding costs nothing
            out.append(lp.cpu())
        return torch.cat(out)

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
            for mb in order.chunk(cfg.num_mini_batches):
                local = mb[(mb >= rank * n) & (mb < (rank + 1) * n)] - rank * n
                # With one mini-batch, the first epoch runs before any update: its log-probs are pi_old.
                on_policy = epoch == 0 and cfg.num_mini_batches == 1
                for k, v in self._mini_batch_update(rollout, local, len(mb) / world, on_policy, keep_old).items():
                    totals[k] += v
        updates = cfg.gspo_epochs * cfg.num_mini_batches
        return {k: v / updates for k, v in totals.items()}

    def _mini_batch_update(self, rollout: Rollout, idx: torch.Tensor, n_seq: float, on_policy: bool,
                           keep_old: bool) -> dict:
        """One optimizer update from this rank's rows `idx` of a mini-batch.

        Denominators are the whole mini-batch's: n_seq and n_tok are its global sequence and token
        counts divided by the world size, because DDP averages gradients over ranks."""
        cfg, acc = self.config, self.accelerator
        n_tok = acc.reduce(rollout.completion_mask[idx].sum().float().to(acc.device), "mean").item()
        sums = dict.fromkeys(("policy_loss", "entropy", "kl_divergence", "loss", "clip_fraction_seq",
                              "clip_fraction_token", "ratio_mean"), 0.0)  # same keys, same order on every rank
        # Exactly gradient_accumulation_steps micro-batches on every rank, even when its share is short:
        # ranks must run the same number of forward/backward passes (DDP/FSDP collectives).
        micro_batches = torch.tensor_split(idx, cfg.gradient_accumulation_steps)
        for j, mic in enumerate(micro_batches):
            empty = len(mic) == 0
            part = rollout.select(mic if not empty else torch.arange(1))  # empty: a stand-in row, loss x 0
            mask = part.completion_mask.to(acc.device)
            last = j == len(micro_batches) - 1
            sync = acc.no_sync(self.model) if not last and self._zero_stage < 0 else contextlib.nullcontext()
            with sync:
                with self._autocast():  # the loss math below stays float32
                    logp, entropy = completion_logprobs(
                        self.model, part.prompt_ids, part.prompt_mask, part.completion_ids, part.completion_mask,
                        cfg.temperature, cfg.entropy_chunk_size, True, entropy_grad=cfg.entropy_coef != 0,
                        bounded_head=self._train_head_bound)
                old = logp.detach() if on_policy else part.old_logprobs.to(acc.device)
                if keep_old and on_policy and not empty:
                    rollout.old_logprobs[mic] = logp.detach().cpu()
                pg, m = policy_loss(logp, old, part.advantages.to(acc.device), mask, cfg.importance_sampling_level,
                                    cfg.clip_low, cfg.clip_high, cfg.loss_aggregation, cfg.max_log_ratio,
                                    num_sequences=n_seq, num_tokens=n_tok)
                ent = aggregate(entropy, mask, "token-mean", num_tokens=n_tok)
                kl = (kl_penalty(logp, part.ref_logprobs.to(acc.device), mask, cfg.kl_estimator, num_tokens=n_tok)
                      if part.ref_logprobs is not None else torch.zeros((), device=acc.device))
                loss = pg - cfg.entropy_coef * ent + self.kl_ctl.value * kl  # seed §4.1
                self._backward(loss * 0.0 if empty else loss, last, empty, sums["loss"])
            if empty:
                continue
            # One device->host copy per micro-batch (each .item() would be a GPU sync).
            values = torch.stack([pg, ent, kl, loss, m["clip_fraction_seq"], m["clip_fraction_token"],
                                  m["ratio_mean"], mask.sum()]).detach().double().tolist()
            pg_v, ent_v, kl_v, loss_v, clip_seq, clip_tok, ratio, tokens = values
            sums["policy_loss"] += pg_v
            sums["entropy"] += ent_v
            sums["kl_divergence"] += kl_v
            sums["loss"] += loss_v
            sums["clip_fraction_seq"] += clip_seq * len(mic) / n_seq
            sums["clip_fraction_token"] += clip_tok * tokens
            sums["ratio_mean"] += ratio * len(mic) / n_seq
        sums["clip_fraction_token"] /= n_tok if n_tok > 0 else 1.0  # / global tokens once reduced over ranks
        sums["grad_norm"] = self._optimizer_step(sums["loss"])
        return sums

    def _backward(self, loss: torch.Tensor, last: bool, empty: bool, loss_so_far: float) -> None:
        """accelerate's backward; under DeepSpeed the engine's, gradients reduced on the last micro-batch."""
        if self._zero_stage < 0:
            self.accelerator.backward(loss)
            return
        if last:  # the mini-batch's loss summed over ranks, known before the update: all ranks agree
            mine = loss_so_far + (0.0 if empty else loss.item())
            total = self.accelerator.reduce(torch.tensor(mine, device=loss.device, dtype=torch.float64), "sum")
            loss = zero.poison(loss, total.item())
        zero.backward(self.model, loss, boundary=last)

    def _optimizer_step(self, loss: float = 0.0) -> float:
        cfg, acc = self.config, self.accelerator
        where = f"step {self.step + 1}"
        if self._zero_stage >= 0:  # DeepSpeed clips, and skips a non-finite step itself (gspo.zero)
            grad_norm = zero.step(self.model)  # NaN when it skipped
            if self.skips.record(grad_norm, where):
                with warnings.catch_warnings():  # torch cannot see the engine's optimizer step: a false alarm
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                    self.scheduler.step()
        else:
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), max_norm))
            # A non-finite loss skips the update even when its gradient happens to be finite. The loss is
            # this rank's share: sum it over ranks so that all ranks skip together (else weights diverge).
            loss = acc.reduce(torch.tensor(float(loss), device=acc.device, dtype=torch.float64), "sum").item()
            if self.skips.record(grad_norm if math.isfinite(loss) else float("nan"), where):
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.skips.exhausted:
            # Never replace a clean checkpoint of this step with this mid-step state.
            # Decided on the main process and shared, so every rank takes the same branch (the save waits for all).
            existing = Path(cfg.output_dir) / f"{ckpt.CHECKPOINT_PREFIX}{self.step}"
            found = float(acc.is_main_process and (existing / ckpt.COMPLETE_MARKER).is_file())
            found = acc.reduce(torch.tensor(found, device=acc.device), "max").item()
            path = existing if found else self._save_checkpoint()
            raise NonFiniteUpdateError(
                f"{self.skips.in_a_row} consecutive updates had a non-finite loss or gradient (limit "
                f"GSPOConfig.max_consecutive_skipped_updates={cfg.max_consecutive_skipped_updates}); stopped at step "
                f"{self.step}, weights are untouched by them, checkpoint: {path}")
        return grad_norm if math.isfinite(grad_norm) else 0.0

    # ------------------------------------------------------------------ metrics
    def _step_metrics(self, rollout: Rollout, update: dict, timings: dict) -> dict:
        cfg, acc = self.config, self.accelerator
        gather = lambda t: acc.gather(t.float().to(acc.device)).cpu()  # noqa: E731  equal sizes on every rank
        rewards, adv = gather(rollout.rewards), gather(rollout.advantages)
        lengths, truncated = gather(rollout.lengths), gather(rollout.truncated)
        metrics = {
            "raw_reward_mean": rewards.mean().item(),
            "raw_reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "relative_advantage_std": adv.std().item() if adv.numel() > 1 else 0.0,
            "frac_reward_zero_std": zero_std_groups(rewards, cfg.group_size).float().mean().item(),
            "completion_length_mean": lengths.mean().item(),
            "completion_length_max": lengths.max().item(),
            "truncated_fraction": truncated.mean().item(),
            "kl_coef": self.kl_ctl.value,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "skipped_updates": float(self.skips.total),
            "reward_penalized": acc.reduce(torch.tensor(float(rollout.num_penalized), device=acc.device), "sum").item(),
        }
        for name, values in rollout.reward_per_func.items():
            metrics[f"reward/{name}_mean"] = gather(torch.as_tensor(values)).mean().item()
        reduced = acc.reduce(torch.tensor(list(update.values()), device=acc.device, dtype=torch.float64), "mean")
        metrics.update(zip(update.keys(), reduced.tolist()))
        metrics.update({f"time/{k}_s": v for k, v in timings.items()})
        metrics["tokens_per_s"] = lengths.sum().item() / max(sum(timings.values()), 1e-9)
        return metrics

    @contextlib.contextmanager
    def _timed(self, timings: dict, name: str):
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - start

    def _record(self, metrics: dict, rollout: Rollout, tracker, progress) -> None:
        cfg = self.config
        metrics = {"step": self.step, **metrics}
        self.history.append(metrics)
        tracker.log(self.step, metrics)
        progress.update(self.step, metrics)
        if self.accelerator.is_main_process and cfg.log_completions_steps and self.step % cfg.log_completions_steps == 0:
            print_samples(self.step, rollout.prompts, rollout.completions, rollout.rewards.tolist())

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset=None) -> dict:
        """Greedy decoding on (a shard per rank of) up to eval_max_samples prompts; metrics prefixed 'eval/'."""
        cfg, acc = self.config, self.accelerator
        dataset = self._as_dataset(dataset if dataset is not None else (self.eval_dataset or cfg.eval_dataset_path))
        n = min(len(dataset), cfg.eval_max_samples)
        shard = list(range(acc.process_index, n, acc.num_processes))
        policy = acc.unwrap_model(self.model)
        totals, lengths = [], []
        size = cfg.eval_batch_size
        batches = [[dataset[i] for i in shard[start:start + size]] for start in range(0, len(shard), size)]
        with gathered(self.model), self._autocast():  # once: ranks may hold different numbers of eval batches
            rollouts = [generate_rollout(policy, self.tokenizer, rows, 1, cfg.max_new_tokens, do_sample=False,
                                         synced_gpus=self._synced_gpus) for rows in batches]
        for r in rollouts:
            res = compute_rewards(self.reward_funcs, r.prompts, r.completions, r.completion_id_lists, r.extra,
                                  self.reward_model, cfg.reward_model_weight, cfg.reward_error_policy,
                                  cfg.reward_penalty_value)
            totals += res.total.tolist()
            lengths += r.lengths.tolist()
        from accelerate.utils import gather_object
        totals, lengths = gather_object(totals), gather_object(lengths)
        rewards = torch.tensor(totals, dtype=torch.float64)
        return {"eval/reward_mean": rewards.mean().item(),
                "eval/accuracy": (rewards >= cfg.accuracy_threshold).double().mean().item(),
                "eval/completion_length_mean": float(sum(lengths)) / max(len(lengths), 1),
                "eval/num_samples": float(len(totals))}

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self, rng_per_rank: list) -> dict:
        return {"step": self.step, "kl_controller": self.kl_ctl.state_dict(), "skips": self.skips.state_dict(),
                "rng_per_rank": rng_per_rank}

    def _rng_per_rank(self) -> list:
        """Every rank's torch RNG (sampling draws from it); the checkpoint's rng_state.pt is the main rank's only."""
        from accelerate.utils import gather_object

        state = {"torch": torch.get_rng_state().tolist()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state().tolist()
        return gather_object([state]) if self.accelerator.num_processes > 1 else [state]

    def _restore_rank_rng(self, states: list) -> None:
        acc = self.accelerator
        if len(states) != acc.num_processes:
            log.warning("gspo: checkpoint has RNG states for %d processes, this run has %d: ranks keep the main "
                        "process's RNG, so sampling will not continue exactly", len(states), acc.num_processes)
            return
        mine = states[acc.process_index]
        torch.set_rng_state(torch.tensor(mine["torch"], dtype=torch.uint8))
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(mine["cuda"], dtype=torch.uint8))

    def _save_checkpoint(self):
        acc, cfg = self.accelerator, self.config
        acc.wait_for_everyone()
        rng = self._rng_per_rank()  # a collective: every rank, before the main-only save
        model_state, optim_state = self._gathered_states(with_optimizer=True)
        staged = self._stage_engine_state() if self._zero_stage >= 0 else None
        path = None
        if acc.is_main_process:
            optimizer = None if self._zero_stage >= 0 else self.optimizer  # DeepSpeed's is in staged/deepspeed
            path = ckpt.save_checkpoint(cfg.output_dir, self.step, acc.unwrap_model(self.model), self.tokenizer,
                                        optimizer, self.scheduler, self._trainer_state(rng), cfg.save_total_limit,
                                        model_state, optim_state, staged)
        acc.wait_for_everyone()
        return path or Path(cfg.output_dir) / f"{ckpt.CHECKPOINT_PREFIX}{self.step}"

    def _stage_engine_state(self) -> Path:
        """DeepSpeed: every rank writes its partition into the main process's staging dir (collective)."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        holder = [ckpt.open_staging(self.config.output_dir, self.step) if acc.is_main_process else None]
        broadcast_object_list(holder)
        zero.save_engine_state(self.model, holder[0])
        acc.wait_for_everyone()
        return holder[0]

    def _checkpoint_if_due(self, total: int, guard: InterruptGuard) -> None:
        cfg, acc = self.config, self.accelerator
        flag = acc.reduce(torch.tensor(float(guard.signum or 0), device=acc.device), "max").item()
        if (cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < total) or flag:
            path = self._save_checkpoint()
        if flag:
            signum = int(flag)
            message = (f"[gspo] interrupted at step {self.step}/{total}; checkpoint saved to {path}. Resume with "
                       f"resume_from_checkpoint='latest' (CLI: --resume_from_checkpoint latest) and the same output_dir.")
            if acc.is_main_process:
                print(message, file=sys.stderr, flush=True)  # SystemExit with an int code prints nothing
            raise TrainingInterrupted(message, signum)

    def _maybe_resume(self) -> bool:
        cfg = self.config
        if not cfg.resume_from_checkpoint:
            return False
        path = ckpt.resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
        if self._zero_stage >= 0:  # weights, fp32 master partitions and optimizer state: DeepSpeed's own files
            zero.load_engine_state(self.model, path)
            state = ckpt.load_checkpoint(path, None, None, self.scheduler)
        else:
            state = ckpt.load_checkpoint(path, self.accelerator.unwrap_model(self.model), self.optimizer,
                                         self.scheduler)
        self.step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.skips = SkipCounter(cfg.max_consecutive_skipped_updates, **state["skips"])
        if state.get("rng_per_rank"):
            self._restore_rank_rng(state["rng_per_rank"])
        if self.accelerator.is_main_process:
            log.warning("gspo: resumed from %s at step %d", path, self.step)
        return True

    def _gathered_states(self, with_optimizer: bool) -> tuple:
        """(model, optimizer) full states when the policy is sharded (collectives: every rank), else (None, None).
        DeepSpeed ZeRO-3: the gathered weights (its optimizer state stays in its own files)."""
        if self._zero_stage == 3:
            return self.accelerator.get_state_dict(self.model), None
        if not is_sharded(self.model):
            return None, None
        optim = full_optimizer_state(self.model, self.optimizer.optimizer) if with_optimizer else None
        return full_state_dict(self.model), optim

    def save_model(self, output_dir=None) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        cfg = self.config
        model_state, _ = self._gathered_states(with_optimizer=False)
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            if model_state is not None and cfg.use_lora and cfg.merge_lora_on_save:
                # peft merges in place on whole tensors: do it on an unsharded replica holding the gathered state
                with zero.whole_models_context(acc):  # main process only: no ZeRO-3 partitioning here
                    model = apply_lora(load_causal_lm(cfg.policy_model_name, cfg), cfg)
                model.load_state_dict(model_state)
                model_state = None
            ckpt.save_final_model(model, self.tokenizer, output_dir or cfg.output_dir,
                                  merge_lora=cfg.merge_lora_on_save, state_dict=model_state)
        acc.wait_for_everyone()

    def _finish(self) -> None:
        cfg = self.config
        self.save_model()
        if self.accelerator.is_main_process:
            out = Path(cfg.output_dir)
            (out / "train_summary.json").write_text(json.dumps(
                {"steps": self.step, "final_metrics": self.history[-1] if self.history else {},
                 "clip_range_low": cfg.clip_low, "clip_range_high": cfg.clip_high}, indent=2))
            try:
                from gspo.plotting import plot_run
                plot_run(out)
            except Exception as exc:  # a plot must never cost the user a finished run
                log.warning("gspo: could not plot the training curves: %s", exc)
