"""Sharded data parallelism (PyTorch FSDP2) around the trainer.

With `GSPOConfig.fsdp` and more than one process, every decoder layer and then the root module
are wrapped with `torch.distributed.fsdp.fully_shard`: each rank stores 1/world of the
parameters, gradients and AdamW state, and gradients are reduce-scattered (averaged over ranks,
as DDP does), so the loss normalisation of the data-parallel path applies unchanged.
The same code runs on GPUs (NCCL) and on CPU (gloo, which is how CI tests it).

Three places need the whole model rather than a shard:
* generation: ranks decode different numbers of tokens, so per-token all-gathers would
  deadlock (or need `synced_gpus`, one collective per token); `gathered` unshards every
  FSDP module once for the whole rollout and reshards after it;
* checkpoints and the final export: `full_state_dict` / `full_optimizer_state` gather the
  full tensors to CPU on the main rank (collectives: every rank calls them);
* resume: `load_full_state` / `load_full_optimizer_state` let every rank read the same full
  checkpoint and keep its own shard.
"""
from __future__ import annotations

import contextlib

import torch

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
        raise ConfigError(f"GSPOConfig.fsdp=True: cannot find the decoder layers of {type(model).__name__} "
                          f"(no module class named in its _no_split_modules={sorted(names)}); allowed: "
                          f"transformers causal LMs that declare their layer class, or fsdp=False")
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


@contextlib.contextmanager
def gathered(model):
    """Full parameters on every rank inside the block; forwards run without collectives.

    FSDP2: unshard every FSDP module (one all-gather each) and keep it unsharded across
    forwards. FSDP1 (accelerate's fsdp_version 1): summon_full_params. DeepSpeed ZeRO-3: gathered,
    its per-module hooks removed (gspo.zero). Otherwise a no-op.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    from gspo import zero

    if zero.is_engine(model):
        with zero.gathered_for_generation(model):
            yield
        return

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


def keyed_by_name(optimizer_state: dict) -> bool:
    """True for the by-parameter-name layout `full_optimizer_state` writes (torch's own uses indices)."""
    groups = optimizer_state.get("param_groups") or [{}]
    return any(isinstance(k, str) for g in groups for k in g.get("params", []))


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """Load an optimizer state written either way (by name, or torch's by-index layout from a run
    without fsdp) into `optimizer`, sharded or not."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not keyed_by_name(state):
        # torch numbers parameters in the order the optimizer was given them: the trainable ones, in
        # named_parameters() order (sharding keeps names and order).
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        state = {"state": {names[i]: v for i, v in state["state"].items()},
                 "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=_options())
