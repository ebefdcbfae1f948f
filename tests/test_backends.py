"""The back-end seam in one process: selection, head modes, and the one skip rule of TrainedModel.step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_config

from gspo.backends import HeadMode, make_accelerator, select_backend
from gspo.backends.data_parallel import DataParallelBackend


@pytest.fixture
def prepared():
    """A 2 -> 1 linear layer with weight [3, 4] and no bias, prepared by the single-process back-end with SGD."""
    acc = make_accelerator()
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]]))
    trained = DataParallelBackend(acc).prepare_trained(layer, lambda params: torch.optim.SGD(params, lr=0.5))
    trained.scheduler = torch.optim.lr_scheduler.StepLR(trained.optimizer.optimizer, step_size=1, gamma=0.1)
    return trained


def backward_of_output_sum(trained, x):
    loss = trained.module(x).sum()  # d loss / d w = sum of the rows of x
    trained.backward(loss, last=True)
    return loss.item()


def test_one_process_selects_data_parallel_and_its_head_modes():
    backend = select_backend(make_accelerator(), small_config("m", "/tmp/unused"))
    assert backend.name == "data_parallel" and backend.synced_gpus is None and not backend.engine_owns_precision
    assert backend.head_mode(training=False, gradient_checkpointing=False) is HeadMode.RECOMPUTED  # no backward
    assert backend.head_mode(training=True, gradient_checkpointing=False) is HeadMode.CHUNKED
    assert backend.head_mode(training=True, gradient_checkpointing=True) is HeadMode.RECOMPUTED


def test_step_clips_applies_and_steps_the_schedule(prepared):
    backward_of_output_sum(prepared, torch.tensor([[3.0, 4.0]]))  # gradient [3, 4]: norm 5
    norm = prepared.step(1.0, max_grad_norm=1.0)
    assert norm == pytest.approx(5.0, abs=1e-6)
    # clipped to norm 1: [0.6, 0.8]; w - 0.5 * that = [3 - 0.3, 4 - 0.4]
    assert prepared.module.weight.detach()[0].tolist() == pytest.approx([2.7, 3.6], abs=1e-6)
    assert prepared.scheduler.get_last_lr() == pytest.approx([0.05])  # stepped once: 0.5 * 0.1
    assert prepared.module.weight.grad is None  # zeroed for the next mini-batch


@pytest.mark.parametrize("loss", [math.inf, math.nan])
def test_a_non_finite_loss_skips_even_with_a_finite_gradient(prepared, loss):
    """Only the loss value tells (e.g. an infinite constant added to the loss): no update, no schedule step,
    gradients cleared, NaN returned for the trainer's skip counter."""
    backward_of_output_sum(prepared, torch.tensor([[3.0, 4.0]]))
    assert math.isnan(prepared.step(loss, max_grad_norm=1.0))
    assert prepared.module.weight.detach().tolist() == [[3.0, 4.0]]
    assert prepared.scheduler.get_last_lr() == [0.5] and prepared.module.weight.grad is None


def test_a_non_finite_gradient_skips(prepared):
    backward_of_output_sum(prepared, torch.tensor([[math.inf, 1.0]]))
    assert math.isnan(prepared.step(0.0, max_grad_norm=0.0))  # max_grad_norm 0: no clipping, still checked
    assert prepared.module.weight.detach().tolist() == [[3.0, 4.0]]
