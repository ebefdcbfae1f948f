"""GSPOTrainer: the training loop, top to bottom. Orchestration only; the math is gspo.core.

One step = one Rollout, produced, then consumed:

    for rollout in producer.rollouts(prompts):   # generate -> score -> [dynamic sampling] -> ref / pi_old
        stats = learner.learn(rollout, step)     #   -> advantages; the Rollout is frozen from here
        engine.sync_weights(policy)              # gspo_epochs x num_mini_batches optimizer updates
        metrics, eval, checkpoint

What varies sits behind one seam each, chosen once in __init__; the loop never asks which it has:
the distributed back-end (gspo.backends: prepare, no_sync, backward, clip + skip + step, full states),
the rollout engine (gspo.engines: generate, sync_weights), the reward scorer (gspo.rewards.RewardScorer),
the advantage estimator (gspo.critic: group or GAE with a critic), the objective (gspo.core.POLICY_LOSSES,
by name) and the optimizer factory. The producer (gspo.producer) and the learner (gspo.learner) get them
through their constructors. Evaluation is gspo.evaluate.evaluate with the same engine and scorer.

How it departs from a naive loop (and from some peers):
* no old-log-prob pass when it is not needed (GSPOConfig.pi_old_source): with one mini-batch, the first
  epoch's forward runs before any update, so its detached log-probs *are* pi_old; only num_mini_batches > 1
  (or a KL reward) costs one extra no-grad pass;
* loss denominators are the whole mini-batch's (and, under data parallelism, the global batch's), so
  micro-batching and extra ranks change nothing but memory;
* a non-finite loss or gradient skips the update (counted, warned, capped), so no NaN reaches the weights;
  SIGINT/SIGTERM finish the step and save a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from accelerate.utils import broadcast_object_list, set_seed
from transformers import get_scheduler

from gspo.backends import make_accelerator, select_backend
from gspo.checkpoint import rng_state, set_rng_state
from gspo.completions import COMPLETIONS_DIR, CompletionsRecord, write_records
from gspo.config import ConfigError, GSPOConfig
from gspo.core import AdaptiveKLController, FixedKLController
from gspo.critic import build_estimator
from gspo.data import PromptStream, as_dataset
from gspo.engines import RolloutEngine, SamplingParams, build_engine
from gspo.engines.mismatch import EngineMonitor
from gspo.episodes import episode_engine, read_chat_template, resolve_episode
from gspo.evaluate import accuracy_source, evaluate_as_configured
from gspo.faults import ForcedStop, InterruptGuard, NonFiniteUpdateError, SkipCounter, TrainingInterrupted
from gspo.learner import Learner
from gspo.logprobs import RolloutLogprobs
from gspo.models import (
    adamw_factory,
    autocast,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    mixed_precision_mode,
    set_threads,
)
from gspo.moe import build_routing
from gspo.preflight import DeadPolicyMonitor, check_lengths, check_output_dir, check_tokenizer
from gspo.producer import RolloutProducer
from gspo.rewards import build_scorer
from gspo.rollout import Rollout, eos_ids
from gspo.run_checkpoints import RunCheckpoints
from gspo.run_dir import RunDirLock, check_fresh_run
from gspo.tracking import MetricsLogger, Progress, record_step, step_metrics, timed, write_run_summary

log = logging.getLogger("gspo")


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
        tools=None,
        environment=None,
    ):
        """The seed's arguments, then the seams: `rollout_engine` (default: transformers `generate`),
        `reward_scorer` (default: bound to config.reward_funcs + reward_funcs + the reward model) and
        `optimizer_factory` (parameters -> optimizer; default AdamW from the config), and the critic's
        `value_optimizer_factory` (default AdamW at value_learning_rate; advantage_estimator='gae').
        Multi-turn episodes: `tools` (Python functions, added to config.tools) or `environment` (a class, instead
        of config.environment); the engine then runs episodes (gspo.episodes)."""
        self.config = cfg = config
        check_output_dir(cfg.output_dir)  # a read-only or full directory fails now, not after the model loads
        self.threads = set_threads(cfg)  # first: loading and building already run torch ops
        self.accelerator = make_accelerator()
        self.backend = select_backend(self.accelerator, cfg)  # chosen once; nothing below asks which
        self.mixed_precision = mixed_precision_mode(cfg, self.backend.engine_owns_precision)
        set_seed(cfg.seed + self.accelerator.process_index)  # ranks sample different completions
        self.tokenizer = (
            tokenizer if tokenizer is not None else load_tokenizer(cfg.policy_model_name, cfg.trust_remote_code)
        )
        check_tokenizer(self.tokenizer, cfg.policy_model_name)
        if cfg.chat_template is not None:  # before any prompt is rendered; saved with the tokenizer
            self.tokenizer.chat_template = read_chat_template(cfg.chat_template)
        tools, environment = resolve_episode(cfg, tools, environment)
        policy = load_policy(cfg, model)
        # LoRA's reference is the base model with adapters off: no second copy
        if cfg.uses_reference_model and not cfg.use_lora and ref_model is None:
            ref_model = load_causal_lm(cfg.policy_model_name, cfg)
        device, whole = self.accelerator.device, self.backend.whole_models
        self.scorer = reward_scorer or build_scorer(
            cfg, reward_funcs, reward_model, device=device, whole_models=whole, environment=environment is not None
        )
        accuracy_source(self.scorer, cfg.accuracy_reward)  # a misspelt accuracy_reward fails now, not at the first eval
        self.policy = self.backend.prepare_trained(policy, optimizer_factory or adamw_factory(cfg))
        self.routing = build_routing(cfg, self.policy.unwrapped())  # an MoE policy's routes (gspo.moe), or none
        self.ref_model = (
            self.backend.prepare_frozen(ref_model) if cfg.uses_reference_model and not cfg.use_lora else None
        )
        # group advantages, or a critic (a second trained model) with GAE: chosen once
        self.estimator = build_estimator(
            cfg, backend=self.backend, precision_context=self._autocast, optimizer_factory=value_optimizer_factory
        )
        engine = rollout_engine or build_engine(
            cfg,
            policy=self.policy,
            tokenizer=self.tokenizer,
            backend=self.backend,
            precision_context=self._autocast,
            world_size=self.accelerator.num_processes,
            completion_tokens=cfg.episode_tokens if tools or environment is not None else cfg.max_new_tokens,
            routes=self.routing.engine_hooks,  # Routing Replay 'rollout': the engine records its experts
        )
        # single-turn completions, or episodes with tools / an environment: chosen once, the loop never asks
        self.engine = episode_engine(
            cfg,
            engine,
            self.tokenizer,
            self.policy.unwrapped(),
            tools=tools,
            environment=environment,
            eos=eos_ids(self.policy.unwrapped(), self.tokenizer),
            accelerator=self.accelerator,
        )
        self.eval_dataset = eval_dataset
        self._init_run_state()

    def _init_run_state(self) -> None:
        """What a run keeps besides the models: sampling, checkpoints, the KL controller, the producer and the
        learner, the step."""
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
        self.logprobs = RolloutLogprobs(
            cfg, backend=self.backend, precision_context=self._autocast, full_width=self.routing.full_width
        )
        tok = self.tokenizer
        self.producer = RolloutProducer(
            cfg,
            engine=self.engine,
            sampling=self.sampling,
            scorer=self.scorer,
            logprobs=self.logprobs,
            policy=self.policy,
            ref_model=self.ref_model,
            estimator=self.estimator,
            kl_controller=self.kl_ctl,
            accelerator=acc,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            routing=self.routing,
        )
        self.learner = Learner(
            cfg,
            accelerator=acc,
            policy=self.policy,
            estimator=self.estimator,
            logprobs=self.logprobs,
            kl_controller=self.kl_ctl,
            engine_monitor=self.engine_monitor,
            routing=self.routing,
        )
        self.dead_policy = DeadPolicyMonitor()
        self.prompt_batches = 0  # prompt batches taken so far (dynamic sampling takes more than one per step)
        self.step = 0
        self.history: list = []
        if acc.is_main_process:
            log.warning("gspo: %s", cfg.clip_summary())
            log.warning(
                "gspo: %d torch CPU threads per process (%s); %d CPUs",
                self.threads,
                "num_threads" if cfg.num_threads is not None else "torch's choice; set num_threads to change it",
                os.cpu_count() or 0,
            )
            if cfg.adaptive_kl and cfg.kl_coef == 0:
                log.warning(
                    "gspo: kl_coef=0 with adaptive_kl=True: the adaptive controller multiplies the coefficient, so it "
                    "stays 0; no reference model is loaded and no KL is computed (set kl_coef > 0 for a KL penalty)"
                )

    # The wrapped policy, its optimizer and schedule (the back-end's TrainedModel holds them).
    model = property(lambda self: self.policy.module)
    optimizer = property(lambda self: self.policy.optimizer)
    scheduler = property(lambda self: self.policy.scheduler)
    skips = property(lambda self: self.learner.skips)  # skipped non-finite updates: total, in a row

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
        for data in (dataset, eval_ds):  # the first turn of an episode too: longer ones are capped by the engine
            check_lengths(cfg, self.policy.unwrapped(), data, completion_tokens=cfg.max_new_tokens)
        prompts = PromptStream(
            dataset, batch_size=cfg.batch_size, seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes
        )
        total = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * prompts.steps_per_epoch
        updates = total * cfg.gspo_epochs * cfg.num_mini_batches
        schedule = lambda optimizer: get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, updates)  # noqa: E731
        self.policy.scheduler = schedule(self.policy.optimizer)
        self.estimator.schedule(schedule)
        lock = self._claim_output_dir()  # one run per directory; a fresh run never mixes with an old one's files
        try:
            return self._train(dataset, eval_ds, prompts, total)
        finally:
            lock.release()

    def _claim_output_dir(self) -> RunDirLock:
        """Lock output_dir (main process) and check a fresh run starts clean; every rank raises the same error."""
        cfg, acc = self.config, self.accelerator
        lock, error = RunDirLock(cfg.output_dir, enabled=acc.is_main_process), None
        if acc.is_main_process:
            try:
                lock.acquire()
                if not cfg.resume_from_checkpoint:
                    check_fresh_run(cfg.output_dir, overwrite=cfg.overwrite_output_dir)
            except ConfigError as e:
                lock.release()
                error = str(e)
        if acc.num_processes > 1:
            error = broadcast_object_list([error])[0]
        if error:
            raise ConfigError(error)
        return lock

    def _train(self, dataset, eval_ds, prompts, total) -> list:
        cfg, acc = self.config, self.accelerator
        resumed = self._maybe_resume()
        if resumed:
            self.engine.sync_weights(self.policy)  # an engine holding its own weights must see the restored ones
        tracker = MetricsLogger(
            cfg.output_dir, cfg.report_to, cfg.to_dict(), enabled=acc.is_main_process, resume=resumed
        )
        record = CompletionsRecord(
            cfg.output_dir,
            enabled=acc.is_main_process and cfg.log_completions,
            max_per_step=cfg.log_completions_max_per_step,
        )
        if resumed:
            tracker.truncate_after(self.step)
            record.truncate_after(self.step)
        progress = Progress(
            total,
            initial_step=self.step,
            enabled=acc.is_main_process and cfg.progress_bar,
            print_every=cfg.logging_steps,
        )
        prompts.position = self.prompt_batches
        try:
            with InterruptGuard() as guard:
                rollouts = self.producer.rollouts(prompts)  # lazy: each is generated when asked for
                finished = self._finished_state()  # what a second stop signal saves: the last finished step
                while self.step < total:
                    try:
                        rollout = next(rollouts)  # generate and score: where a step gets stuck (a hung reward)
                    except ForcedStop as stop:
                        self._stop_now(stop.signum, total, finished)
                    finished = None  # the update changes the weights: no consistent state until the step is done
                    metrics = self._learn(rollout)
                    self.step, self.prompt_batches = self.step + 1, prompts.position
                    finished = self._finished_state()
                    if eval_ds is not None and cfg.eval_steps and self.step % cfg.eval_steps == 0:
                        metrics.update(self.evaluate(eval_ds))
                    self.history.append({"step": self.step, **metrics})
                    record_step(
                        self.history[-1],
                        rollout,
                        tracker=tracker,
                        progress=progress,
                        config=cfg,
                        main=acc,
                        completions=record,
                    )
                    self.checkpoints.save_if_due(self.step, total, guard.signum, self._trainer_state)
            if eval_ds is not None and self.history and not (cfg.eval_steps and total % cfg.eval_steps == 0):
                self.history[-1].update(self.evaluate(eval_ds))
            self._finish()
        finally:
            progress.close()
            tracker.close()
            record.close()
        return self.history

    def training_step(self, rows: list, more=None) -> tuple[dict, Rollout]:
        """One step from this rank's prompt `rows`: produce a Rollout, learn from it, sync the engine.
        `more`: further prompt batches for dynamic sampling's refill (default: the same rows again)."""
        rollout = self.producer.produce(rows, more=more)
        return self._learn(rollout), rollout

    def _learn(self, rollout: Rollout) -> dict:
        """Consume a finished Rollout: the update, the engine's weight sync, the KL controller; the step's metrics."""
        cfg = self.config
        start = time.perf_counter()
        timings = dict(rollout.info.get("timings", {}))
        self.engine.release_memory()  # e.g. vLLM's sleep mode: the update needs the memory
        skips_before = self.skips.total
        with timed(timings, "update"):
            try:
                stats = self.learner.learn(rollout, step=self.step)
            except NonFiniteUpdateError as exc:
                raise NonFiniteUpdateError(f"{exc}, checkpoint: {self._checkpoint_mid_step()}") from None
        with timed(timings, "weight_sync"):  # the engine generates again at the next step only
            self.engine.sync_weights(self.policy)
        metrics = step_metrics(
            rollout,
            stats.as_metrics(),
            timings,
            accelerator=self.accelerator,
            group_size=cfg.group_size,
            kl_coef=self.kl_ctl.value,
            learning_rate=self.policy.optimizer.param_groups[0]["lr"],
            skipped_updates=self.skips.total,
        )
        metrics.update(self.engine_monitor.step_metrics(self.accelerator))
        metrics.update(rollout.info.get("metrics", {}))
        if stats.policy_trained:  # after the metrics: kl_coef there is the one this step used
            self.kl_ctl.update(stats.kl_divergence, cfg.batch_size * cfg.group_size)
            self.dead_policy.update(metrics, self.step + 1, skipped=self.skips.total > skips_before)
        metrics["step_time_s"] = rollout.info.get("wall_s", 0.0) + time.perf_counter() - start
        return metrics

    def _finished_state(self) -> dict:
        """The RNG state at the end of a finished step (with the trainer's counters, it resumes exactly)."""
        return {"step": self.step, "rng": rng_state()}

    def _stop_now(self, signum: int, total: int, finished) -> None:
        """A second stop signal while a step is generating or scoring: save the last finished step (one process;
        with several, a rank may be stuck inside a collective, so only an existing checkpoint is named) and exit
        with 128 + signum."""
        name = signal.Signals(signum).name
        if finished is not None and self.accelerator.num_processes == 1:
            set_rng_state(finished["rng"])  # as it was when step `self.step` finished
            where = f"saved to {self._checkpoint_mid_step()}"
        elif self.checkpoints.exists(self.step):
            where = f"its checkpoint is {self.checkpoints.path(self.step)}"
        else:
            where = "not saved (several processes, or mid-update): resume from the newest checkpoint"
        message = (
            f"[gspo] stopped by a second {name} during step {self.step + 1}/{total}; the last finished step, "
            f"{self.step}, is {where}. Resume with resume_from_checkpoint='latest' "
            "(CLI: --resume_from_checkpoint latest) and the same output_dir."
        )
        if self.accelerator.is_main_process:
            print(message, file=sys.stderr, flush=True)
        raise TrainingInterrupted(message, signum)

    def _checkpoint_mid_step(self):
        """The checkpoint of the last finished step; saved now unless it exists (never replace a clean one with
        this mid-step state)."""
        if self.checkpoints.exists(self.step):
            return self.checkpoints.path(self.step)
        return self.checkpoints.save(self.step, self._trainer_state())

    def _autocast(self):
        """bfloat16 autocast for a forward pass under mixed_precision='bf16', else a no-op."""
        return autocast(self.accelerator.device, self.mixed_precision)

    # ------------------------------------------------------------------ metrics
    # ------------------------------------------------------------------ evaluation
    def evaluate(self, dataset=None) -> dict:
        """Up to eval_max_samples prompts (a shard per rank), greedy or eval_num_samples sampled completions each;
        metrics prefixed 'eval/'. The per-sample records go to completions/eval_{step}.parquet (log_completions)."""
        cfg, acc = self.config, self.accelerator
        dataset = self._as_dataset(dataset if dataset is not None else (self.eval_dataset or cfg.eval_dataset_path))
        metrics, records = evaluate_as_configured(
            self.engine, self.scorer, dataset, cfg, rank=acc.process_index, world_size=acc.num_processes, step=self.step
        )
        if cfg.log_completions and acc.is_main_process:  # beside the training record
            write_records(records, Path(cfg.output_dir) / COMPLETIONS_DIR / f"eval_{self.step:05d}.parquet")
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "prompt_batches": self.prompt_batches,
            "kl_controller": self.kl_ctl.state_dict(),
            "skips": self.skips.state_dict(),
        }

    def _maybe_resume(self) -> bool:
        state = self.checkpoints.resume()
        if state is None:
            return False
        self.step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.prompt_batches = int(state.get("prompt_batches", self.step))  # older checkpoints: one batch a step
        self.learner.skips = SkipCounter(self.config.max_consecutive_skipped_updates, **state["skips"])
        return True

    def save_model(self, output_dir=None) -> None:
        self.checkpoints.export(output_dir or self.config.output_dir)

    def _finish(self) -> None:
        self.save_model()
        if self.accelerator.is_main_process:
            write_run_summary(self.config, steps=self.step, history=self.history)
