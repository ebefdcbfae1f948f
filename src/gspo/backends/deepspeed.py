"""DeepSpeed ZeRO-1/2/3 under `accelerate launch`: the `deepspeed` back-end (its config comes from the launch).

What accelerate's DeepSpeed path would do on its own, and why gspo drives the engine instead:
* `accelerator.backward` calls `engine.step()` inside backward whenever its sync flag is set and
  the engine divides every loss by its own accumulation count. gspo's loss already carries the
  mini-batch's global normaliser (gspo.core), and its micro-batch count is GSPOConfig's. So the
  trainer calls `engine.backward(loss, scale_wrt_gas=False)` with the accumulation boundary set on
  the last micro-batch of each mini-batch only, then `engine.step()` once: the same update as
  without DeepSpeed.
* Clipping is DeepSpeed's (`gradient_clipping` = GSPOConfig.max_grad_norm, the same
  max/(norm + 1e-6) rule as torch); the non-finite skip is DeepSpeed's too: its ZeRO optimizers skip
  a step whose gradient norm is NaN/inf (fp32, and bf16 with `check_grad_overflow`) and count it in
  `engine.skipped_steps`, which the trainer feeds to its SkipCounter. A non-finite *loss* with a
  finite gradient is turned into a NaN gradient (`poison`), so the engine skips that step too, on
  every rank.
* ZeRO-3 stores 1/world of every parameter. Generation gathers the whole model once per rollout and
  removes ZeRO-3's per-module hooks for it (DeepSpeed's own `unwrap_model_for_generation`), so
  ranks decode different numbers of tokens without per-token collectives. The reference model is a
  ZeRO-3 engine without optimizer (partitioned too); reward models stay whole on every rank.
* Checkpoints: DeepSpeed's own files (partitioned optimizer state, fp32 master weights) in
  `checkpoint-N/deepspeed/`, written by every rank into the checkpoint's staging directory, next to
  the usual full-weight `model.safetensors`, so the checkpoint stays atomic and its weights load
  with `from_pretrained`. Resume needs the same DeepSpeed launch (`engine.load_checkpoint`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from pathlib import Path
from typing import Callable

import torch

from gspo.backends.base import Backend, TrainedModel
from gspo.config import ConfigError

log = logging.getLogger("gspo")
ENGINE_DIR = "deepspeed"  # inside checkpoint-N/
_TAG = "state"


def accelerator_kwargs(has_device: bool) -> dict:
    """Without a GPU, accelerate starts DeepSpeed with no backend and then runs every rank as a lone
    process 0; naming gloo fixes it (accelerate's `cpu=True` would drop DeepSpeed instead)."""
    if has_device:
        return {}
    from accelerate.utils import InitProcessGroupKwargs

    return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def is_engine(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine" or hasattr(model, "zero_optimization_stage")


def stage(acc) -> int:
    """The ZeRO stage of this launch; -1 when it is not a DeepSpeed launch."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        return -1
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def configure(acc, cfg) -> None:
    """Put GSPOConfig's batch geometry and clipping into the launch's DeepSpeed config (before
    prepare); refuse settings gspo cannot honour."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    zero = stage(acc)
    if zero not in (1, 2, 3):
        raise ConfigError(
            f"DeepSpeed zero_optimization.stage={zero}: allowed 1, 2 or 3 (stage 0 is plain data "
            f"parallelism: launch without DeepSpeed)"
        )
    if ds.get("fp16", {}).get("enabled") in (True, "true"):
        raise ConfigError(
            "DeepSpeed fp16 is not supported (dynamic loss scaling skips steps while it calibrates, "
            "which gspo would count as failed updates); allowed: bf16 or fp32 (mixed_precision bf16 / no)"
        )
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"DeepSpeed config has an '{section}' section: gspo builds AdamW and its schedule from "
                f"GSPOConfig (learning_rate, lr_scheduler_type, ...); remove the section"
            )
    clip = ds.get("gradient_clipping", "auto")
    if clip != "auto" and not math.isclose(float(clip), cfg.max_grad_norm):
        raise ConfigError(
            f"DeepSpeed gradient_clipping={clip} but GSPOConfig.max_grad_norm={cfg.max_grad_norm}: "
            f"set them equal, or gradient_clipping to 'auto' (gspo fills it)"
        )
    ds["gradient_clipping"] = float(cfg.max_grad_norm)
    micro = max(
        1,
        cfg.batch_size
        // acc.num_processes
        * cfg.group_size
        // (cfg.num_mini_batches * cfg.gradient_accumulation_steps),
    )
    geometry = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": micro * cfg.gradient_accumulation_steps * acc.num_processes,
    }
    for key, value in geometry.items():  # bookkeeping for DeepSpeed: gspo sets the boundaries itself
        if ds.get(key, "auto") not in ("auto", value) and acc.is_main_process:
            log.warning(
                "gspo: DeepSpeed %s=%s replaced by %s (from GSPOConfig batch_size, group_size, "
                "num_mini_batches, gradient_accumulation_steps)",
                key,
                ds[key],
                value,
            )
        ds[key] = value
    ds["zero_allow_untested_optimizer"] = True  # torch's AdamW
    if zero == 3:
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True  # for exports
    if ds.get("bf16", {}).get("enabled") in (True, "true"):
        ds["bf16"]["check_grad_overflow"] = True  # skip non-finite steps (DeepSpeed >= 0.17 defaults to it)


def second_trained_engine(acc, model, optimizer):
    """A second trained model (the critic) as an engine of its own: accelerate prepares one DeepSpeed engine
    per Accelerator, so this one is initialised directly, with the policy's (already configured) settings."""
    import deepspeed

    ds = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine


def reference_engine(acc, model):
    """A frozen model partitioned like the policy under ZeRO-3 (no optimizer): an inference engine."""
    import deepspeed

    ds = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        ds.pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine


@contextlib.contextmanager
def whole_models_context(acc):
    """Models loaded inside stay whole (no zero.Init partitioning): reward models, export replicas.

    transformers partitions at load time whenever a ZeRO-3 config is registered, which accelerate's
    plugin does whatever `zero3_init_flag` says (and its zero3_init_context_manager(False) registers it
    again), so unregister it here and let the plugin register it back."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


@contextlib.contextmanager
def gathered_for_generation(engine):
    """ZeRO-3: every parameter whole on every rank, forwards without collectives. Else a no-op."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(engine):
        yield


def poison(loss: torch.Tensor, global_loss: float) -> torch.Tensor:
    """A non-finite mini-batch loss becomes a NaN gradient, which DeepSpeed's step skips."""
    return loss if math.isfinite(global_loss) else loss * float("nan")


def backward(engine, loss: torch.Tensor, boundary: bool) -> None:
    engine.set_gradient_accumulation_boundary(boundary)  # gradients are reduced at the boundary only
    engine.backward(loss, scale_wrt_gas=False)  # the loss already holds the mini-batch normaliser


def step(engine) -> float:
    """Clip, check and apply the update; the pre-clip global gradient norm, NaN when DeepSpeed skipped it."""
    skipped = engine.skipped_steps
    engine.step()
    norm = engine.get_global_grad_norm()
    if engine.skipped_steps != skipped or norm is None:
        return float("nan")
    return float(norm)


def save_engine_state(engine, staging: Path) -> None:
    """Every rank writes its partition into `staging/deepspeed/` (collective)."""
    engine.save_checkpoint(str(Path(staging) / ENGINE_DIR), tag=_TAG, save_latest=False)


def load_engine_state(engine, checkpoint: Path) -> None:
    """Weights, fp32 master partitions and optimizer state from checkpoint-N/deepspeed/ (collective)."""
    source = Path(checkpoint) / ENGINE_DIR
    if not (source / _TAG).is_dir():
        raise ConfigError(
            f"{checkpoint} was not written by a DeepSpeed run (no {ENGINE_DIR}/{_TAG}/): resume it "
            f"without DeepSpeed, or start a new run from its weights with policy_model_name={checkpoint}"
        )
    loaded, _ = engine.load_checkpoint(
        str(source), tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load {source / _TAG}")


class DeepSpeedModel(TrainedModel):
    """The policy as a DeepSpeed engine: gradients reduced at the boundary gspo sets, clipping and the
    non-finite skip done by the engine (a non-finite loss becomes a NaN gradient first)."""

    def __init__(self, module, optimizer, accelerator) -> None:
        super().__init__(module, optimizer, accelerator)
        self._pending_loss = None  # this rank's loss so far in the mini-batch, on the device (no host sync)

    @property
    def sharded(self) -> bool:
        return self.module.zero_optimization_stage() == 3

    def whole_parameters(self):
        if not self.sharded:
            yield from super().whole_parameters()
            return
        import deepspeed

        for name, param in self.unwrapped().named_parameters():
            with deepspeed.zero.GatheredParameters([param]):  # one parameter gathered at a time
                whole = param.detach().clone()  # the gathered storage is freed on exit
            yield name, whole

    def no_sync(self, last: bool):
        return contextlib.nullcontext()  # the accumulation boundary is set in backward

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        pending = loss.detach().double()
        self._pending_loss = pending if self._pending_loss is None else self._pending_loss + pending
        if last:  # the mini-batch's loss summed over ranks, known before the update: all ranks agree
            acc = self.accelerator
            total = acc.reduce(self._pending_loss, "sum")
            loss = poison(loss, total.item())
            self._pending_loss = None
        backward(self.module, loss, boundary=last)

    def step(self, local_loss, *, max_grad_norm: float) -> float:
        norm = step(self.module)  # max_grad_norm is the engine's gradient_clipping (configure)
        if self.scheduler is not None and math.isfinite(norm):
            with warnings.catch_warnings():  # torch cannot see the engine's optimizer step: a false alarm
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                self.scheduler.step()
        return norm

    def full_states(self, *, with_optimizer: bool):
        """ZeRO-3: the gathered weights (collective). The optimizer state is in the engine's own files."""
        if self.module.zero_optimization_stage() == 3:
            return self.accelerator.get_state_dict(self.module), None
        return None, None

    def save_native_state(self, staging) -> None:
        save_engine_state(self.module, staging)

    def load_checkpoint(self, path) -> None:
        load_engine_state(self.module, path)


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    engine_owns_precision = True

    def __init__(self, accelerator, config) -> None:
        super().__init__(accelerator)
        self.config, self.stage = config, stage(accelerator)
        self.trained = 0  # models prepared for training so far
        self.one_head_call = self.stage == 3
        # ZeRO-3: generation gathers the weights first, but DeepSpeed's forward hook on the model stays, and while it
        # records its module trace (the first steps) each forward runs a collective check: every rank must run every
        # generation step (transformers' synced_gpus), and as many generate calls (gspo.evaluate, gspo.episodes).
        self.synced_gpus = True if self.stage == 3 else None

    def prepare_trained(self, model, make_optimizer: Callable) -> TrainedModel:
        configure(self.accelerator, self.config)  # GSPOConfig's geometry and clipping into the launch's config
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        if self.trained:  # the critic: the scheduler steps its torch optimizer, the engine applies the updates
            engine = second_trained_engine(self.accelerator, model, optimizer)
        else:
            engine, optimizer = self.accelerator.prepare(model, optimizer)
        self.trained += 1
        return DeepSpeedModel(engine, optimizer, self.accelerator)

    def prepare_frozen(self, model):
        if self.stage == 3:  # partitioned like the policy
            return reference_engine(self.accelerator, model.requires_grad_(False))
        return super().prepare_frozen(model)

    def generation_context(self, trained: TrainedModel):
        return gathered_for_generation(trained.module)

    def whole_models(self):
        return whole_models_context(self.accelerator)
