"""Distributed back-ends behind one interface (gspo.backends.base), chosen once by `select_backend`.

    data_parallel    one process, or DDP under a launcher (accelerate's prepare)
    fsdp2            GSPOConfig.fsdp with several processes: FSDP2 shards (gspo.backends.fsdp)
    accelerate_fsdp  accelerate's own FSDP launch config on GPUs
    deepspeed        DeepSpeed ZeRO-1/2/3 under `accelerate launch` (gspo.backends.deepspeed)

DeepSpeed is imported only when the launch asks for it.
"""

from __future__ import annotations

import atexit
import logging
import os

import torch

from gspo.backends.base import Backend, HeadMode, TrainedModel
from gspo.config import ConfigError

log = logging.getLogger("gspo")

__all__ = [
    "Backend",
    "HeadMode",
    "TrainedModel",
    "destroy_process_group_at_exit",
    "launched_with_deepspeed",
    "make_accelerator",
    "select_backend",
]


def launched_with_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_TEARDOWN_REGISTERED = []


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, while it is still whole.

    Left to interpreter finalization, gloo's worker threads can abort the process after a run that
    succeeded ("terminate called without an active exception", SIGABRT: pytorch/pytorch#190489).
    Local to each rank (no barrier), so a rank that failed cannot hang the others here.
    """
    if not _TEARDOWN_REGISTERED:
        atexit.register(_destroy_process_group)
        _TEARDOWN_REGISTERED.append(True)


def make_accelerator():
    """Accelerator() that honours the launcher's world size on machines without a GPU.

    accelerate starts its CPU (gloo) backend only when asked for the CPU (`accelerate launch --cpu`
    sets ACCELERATE_USE_CPU); under plain `torchrun` on a CPU-only machine, Accelerator() would run
    every worker as an independent single process: N unsynchronised copies racing over one output_dir.
    """
    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = getattr(torch, "accelerator", None) is not None and torch.accelerator.is_available()
    if launched_with_deepspeed():
        from gspo.backends.deepspeed import accelerator_kwargs

        acc = Accelerator(**accelerator_kwargs(has_accelerator))
    else:
        # gspo autocasts itself (GSPOConfig.mixed_precision): accelerate's would wrap only model.forward
        acc = Accelerator(cpu=world > 1 and not has_accelerator, mixed_precision="no")
    if acc.num_processes > 1:
        destroy_process_group_at_exit()
    if acc.num_processes != world:
        raise RuntimeError(
            f"the launcher started WORLD_SIZE={world} processes but accelerate runs "
            f"{acc.num_processes} ({acc.distributed_type}); refusing to train unsynchronised copies"
        )
    return acc


def select_backend(accelerator, config) -> Backend:
    """The back-end of this launch and config; called once, before any model is prepared."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        if config.fsdp:
            raise ConfigError("GSPOConfig.fsdp=True under a DeepSpeed launch: pick one (fsdp=False to use ZeRO)")
        from gspo.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(accelerator, config)
    from gspo.backends.data_parallel import DataParallelBackend
    from gspo.backends.fsdp import AccelerateFSDPBackend, FSDP2Backend

    # An accelerate FSDP config on a device where accelerate cannot shard (CPU: it falls back to DDP).
    plugin_dropped = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and kind != DistributedType.FSDP
    if (config.fsdp or plugin_dropped) and accelerator.num_processes > 1:
        if plugin_dropped and not config.fsdp and accelerator.is_main_process:
            log.warning(
                "gspo: accelerate's FSDP plugin is inactive on %s; sharding with FSDP2 as with GSPOConfig.fsdp=True",
                kind,
            )
        return FSDP2Backend(accelerator)
    if kind == DistributedType.FSDP:
        return AccelerateFSDPBackend(accelerator)
    return DataParallelBackend(accelerator)
