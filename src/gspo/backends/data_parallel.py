"""Single process and DDP (accelerate's prepare): every rank holds the whole model and optimizer."""

from __future__ import annotations

from typing import Callable

from gspo import checkpoint as ckpt
from gspo.backends.base import Backend, TrainedModel


class DataParallelModel(TrainedModel):
    def load_checkpoint(self, path) -> None:
        model = self.unwrapped()
        ckpt.load_weights(path, model)
        state = ckpt.read_state_file(path, ckpt.OPTIMIZER_FILE, for_what=type(self.optimizer).__name__)
        if ckpt.keyed_by_name(state):  # written by a sharded run: full tensors keyed by parameter name
            from gspo.backends.fsdp import load_full_optimizer_state

            load_full_optimizer_state(model, self.optimizer.optimizer, state)
        else:
            self.optimizer.load_state_dict(state)


class DataParallelBackend(Backend):
    name = "data_parallel"

    def prepare_trained(self, model, make_optimizer: Callable) -> TrainedModel:
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        module, optimizer = self.accelerator.prepare(model, optimizer)
        return DataParallelModel(module, optimizer, self.accelerator)
