"""The distributed back-end seam: what differs between single process / DDP, FSDP2 and DeepSpeed.

A `Backend` is chosen once, at start-up (`gspo.backends.select_backend`). It prepares models:
* `prepare_trained(model, make_optimizer)` -> a `TrainedModel` (the policy today, a critic next):
  the wrapped module to run forwards on, its optimizer, micro-batch gradient sync, backward,
  clip + skip + step, full states for checkpoints and native engine state;
* `prepare_frozen(model)` -> the reference model, placed or partitioned like the policy.
It also owns the generation context (whole weights while decoding) and says how the output
head may be run (`HeadMode`). The trainer calls these and never asks which back-end it has.

One skip rule for every back-end: an update is skipped, on every rank, when the mini-batch's
loss summed over ranks or the global gradient norm is not finite. `TrainedModel.step` returns
the pre-clip gradient norm, NaN when it skipped.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch

from gspo.logprobs import HeadMode


class TrainedModel:
    """A model the back-end trains, with its optimizer. Subclasses fill in the back-end's parts."""

    sharded = False  # True where a rank holds only part of each weight (FSDP2, ZeRO-3)

    def __init__(self, module, optimizer, accelerator) -> None:
        self.module = module  # what forwards run on (a DDP wrapper, an FSDP2 root, a DeepSpeed engine)
        self.optimizer = optimizer
        self.accelerator = accelerator
        self.scheduler = None  # the learning-rate schedule, stepped with every applied update

    def unwrapped(self):
        """The user's model (transformers / peft), without wrappers."""
        return self.accelerator.unwrap_model(self.module)

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    def whole_parameters(self):
        """(name, whole tensor) for each parameter of the user's model, one at a time, so that a rank never
        holds a second full copy (collective where sharded: every rank must iterate to the end)."""
        for name, param in self.unwrapped().named_parameters():
            yield name, param.detach()

    def no_sync(self, last: bool):
        """Context for one micro-batch: gradients are reduced over ranks on the last one only."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.module)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self.accelerator.backward(loss)

    def step(self, local_loss, *, max_grad_norm: float) -> float:
        """Clip, then apply the update unless the global loss or gradient norm is not finite (every rank
        decides the same). `local_loss`: this rank's mini-batch loss, a detached tensor (or a float). Returns the
        norm, NaN when skipped."""
        acc = self.accelerator
        local = torch.as_tensor(local_loss, dtype=torch.float64).detach().to(acc.device).reshape(())
        total = acc.reduce(local, "sum").item()
        limit = max_grad_norm if max_grad_norm > 0 else float("inf")
        norm = float(acc.clip_grad_norm_(self.module.parameters(), limit))
        applied = math.isfinite(total) and math.isfinite(norm)
        if applied:
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm if applied else float("nan")

    def full_states(self, *, with_optimizer: bool) -> tuple[Optional[dict], Optional[dict]]:
        """(model, optimizer) states for a checkpoint, on the main process. A None model state means
        "save the live model" (it is whole on this rank). Collective where the states are sharded."""
        return None, (self.optimizer.state_dict() if with_optimizer else None)

    def save_native_state(self, staging) -> None:
        """Write engine files every rank holds a part of into `staging` (collective). None here."""

    def load_checkpoint(self, path) -> None:
        """Restore weights and optimizer state from checkpoint `path` (collective where sharded)."""
        raise NotImplementedError


class Backend:
    """Single process / DDP behaviour; the sharded back-ends override what differs."""

    name = "data_parallel"
    # None: transformers decides whether every decoding step must be a collective; False once the
    # generation context has made sharded weights whole on every rank.
    synced_gpus: Optional[bool] = None
    # The launcher's engine owns precision (DeepSpeed's bf16 section): gspo's autocast must stay off.
    engine_owns_precision = False
    # ZeRO-3 gathers a weight on every call of its module: a chunked head would make the number of
    # gathers depend on this rank's completion lengths, and ranks would wait on each other.
    one_head_call = False

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    def prepare_trained(self, model, make_optimizer: Callable) -> TrainedModel:
        raise NotImplementedError

    def prepare_frozen(self, model):
        return model.requires_grad_(False).eval().to(self.accelerator.device)

    def generation_context(self, trained: TrainedModel):
        """Whole weights on every rank inside the block, so that forwards need no collectives."""
        return contextlib.nullcontext()

    def whole_models(self):
        """Models loaded inside stay whole on every rank (reward models, export replicas)."""
        return contextlib.nullcontext()

    def head_mode(self, *, training: bool, gradient_checkpointing: bool) -> HeadMode:
        """No-grad passes chunk the head for free (no backward); training passes recompute the chunks
        under gradient checkpointing, else only when the logits are large."""
        if self.one_head_call:
            return HeadMode.WHOLE
        if not training or gradient_checkpointing:
            return HeadMode.RECOMPUTED
        return HeadMode.CHUNKED
