"""Sharded data parallelism (PyTorch FSDP2): the `fsdp` back-end.

With `GSPOConfig.fsdp` (or accelerate's FSDP config on a device where accelerate cannot shard)
and more than one process, every decoder layer and then the root module are wrapped with
`torch.distributed.fsdp.fully_shard`: each rank stores 1/world of the parameters, gradients
and AdamW state, and gradients are reduce-scattered (averaged over ranks, as DDP does), so the
loss normalisation of the data-parallel path applies unchanged. The same code runs on GPUs
(NCCL) and on CPU (gloo, which is how CI tests it).

Three places need the whole model rather than a shard:
* generation: ranks decode different numbers of tokens, so per-token all-gathers would
  deadlock (or need `synced_gpus`, one collective per token); `generation_context` unshards
  every FSDP module once for the whole rollout and reshards after it;
* checkpoints and the final export: `full_state_dict` / `full_optimizer_state` gather the
  full tensors to CPU on the main rank (collectives: every rank calls them);
* resume: every rank reads the same full checkpoint and keeps its own shard.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from gspo import checkpoint as ckpt
from gspo.backends.base import Backend, TrainedModel
from gspo.config import ConfigError


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    """FSDP2 modules (ours, or accelerate's fsdp_version 2) or an FSDP1 wrapper (accelerate's version 1)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return bool(_fsdp_modules(model)) or any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _decoder_blocks(model) -> list:
    """The repeated transformer blocks, by the class names transformers lists in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"GSPOConfig.fsdp=True: cannot find the decoder layers of {type(model).__name__} "
            f"(no module class named in its _no_split_modules={sorted(names)}); allowed: "
            f"transformers causal LMs that declare their layer class, or fsdp=False"
        )
    return blocks


def shard_model(model, device: torch.device, world_size: int):
    """fully_shard each decoder block, then the root (embeddings, final norm, tied head). In place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    # Rank 0's values everywhere first, as DDP does at construction: anything initialised randomly
    # (LoRA's A matrices, weights missing from a checkpoint) differs per rank, and sharding would
    # silently stitch rank 0's first shard to rank 1's second.
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)
    mesh = init_device_mesh(device.type, (world_size,))
    for block in _decoder_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(model) -> dict:
    """Full CPU state dict on the main rank ({} elsewhere). Collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model, optimizer) -> dict:
    """Full optimizer state keyed by parameter names, on the main rank. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_state(model, state: dict) -> None:
    """Every rank passes the same full state dict and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    result = set_model_state_dict(model, state, options=_options(strict=False))
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint has weights the model lacks: {result.unexpected_keys[:10]}")
    if result.missing_keys:
        raise RuntimeError(f"checkpoint lacks weights of the model: {result.missing_keys[:10]}")


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """Load an optimizer state written either way (by name, or torch's by-index layout from a run
    without fsdp) into `optimizer`, sharded or not."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not ckpt.keyed_by_name(state):
        # torch numbers parameters in the order the optimizer was given them: the trainable ones, in
        # named_parameters() order (sharding keeps names and order).
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        state = {
            "state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]],
        }
    set_optimizer_state_dict(model, optimizer, state, options=_options())


class FSDP2Model(TrainedModel):
    sharded = True

    def unwrapped(self):
        return self.module  # fully_shard works in place: the root is the user's model

    def whole_parameters(self):
        for name, param in self.module.named_parameters():  # one all-gather per parameter, in the same order
            yield name, (param.full_tensor() if hasattr(param, "full_tensor") else param).detach()

    def no_sync(self, last: bool):
        # FSDP2 reduce-scatters every micro-batch into the sharded gradients, which then add up:
        # the same sum, and no full unsharded gradient is held between micro-batches.
        return contextlib.nullcontext()

    def full_states(self, *, with_optimizer: bool):
        optim = full_optimizer_state(self.module, self.optimizer.optimizer) if with_optimizer else None
        return full_state_dict(self.module), optim

    def load_checkpoint(self, path) -> None:
        if ckpt.holds_adapter(path):
            ckpt.load_weights(path, self.module)  # peft sets its (sharded) adapter tensors itself
        else:
            load_full_state(self.module, ckpt.read_full_model_state(path, self.module))
        state = ckpt.read_state_file(path, ckpt.OPTIMIZER_FILE, for_what=type(self.optimizer).__name__)
        load_full_optimizer_state(self.module, self.optimizer.optimizer, state)


class FSDP2Backend(Backend):
    name = "fsdp2"
    synced_gpus = False  # generation_context makes the weights whole first

    def prepare_trained(self, model, make_optimizer: Callable) -> TrainedModel:
        acc = self.accelerator
        model = shard_model(model, acc.device, acc.num_processes)
        optimizer = acc.prepare(make_optimizer([p for p in model.parameters() if p.requires_grad]))
        return FSDP2Model(model, optimizer, acc)

    def prepare_frozen(self, model):  # no optimizer state, but as large as the policy
        return shard_model(model.requires_grad_(False).eval(), self.accelerator.device, self.accelerator.num_processes)

    def generation_context(self, trained: TrainedModel):
        return unsharded(trained.module)


class AccelerateFSDPModel(FSDP2Model):
    no_sync = TrainedModel.no_sync  # accelerate's FSDP1 wrapper has its own no_sync

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.module)


class AccelerateFSDPBackend(FSDP2Backend):
    """accelerate's own FSDP (its launch config, on GPUs): accelerate wraps; the rest is as FSDP2.
    Not exercised on CPU, where accelerate falls back to DDP and gspo shards with FSDP2 instead."""

    name = "accelerate_fsdp"

    def prepare_trained(self, model, make_optimizer: Callable) -> TrainedModel:
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        module, optimizer = self.accelerator.prepare(model, optimizer)
        return AccelerateFSDPModel(module, optimizer, self.accelerator)

    def prepare_frozen(self, model):
        return Backend.prepare_frozen(self, model)


@contextlib.contextmanager
def unsharded(model):
    """Full parameters on every rank inside the block; forwards run without collectives.

    FSDP2: unshard every FSDP module (one all-gather each) and keep it unsharded across
    forwards. FSDP1 (accelerate's fsdp_version 1): summon_full_params.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):  # not exercised on CPU: accelerate's FSDP needs a GPU
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield
        return
    modules = _fsdp_modules(model)
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            # back to FSDP2's defaults (root keeps its params); a non-default setting is not remembered
            m.set_reshard_after_forward(m is not model, recurse=False)
