"""How far the rollout engine's likelihoods are from the trainer's, every step, and the guard on it.

The engine (vLLM) returns the log-prob of each token it sampled, from the distribution it sampled
(after temperature). Before the step's first update the trainer's log pi_theta of the same tokens
should match it up to numerics: ~1e-6 in fp32, ~1e-2 in bf16. Much more means the engine runs
other weights than the trainer (a sync skipped, or lost: TRL #5312), and the run stops.

Measured on the sequences of the step's first update (all of them when num_mini_batches=1), after
summing over micro-batches and ranks, so every rank reaches the same verdict.
"""

from __future__ import annotations

import torch

from gspo.core import ENGINE_MISMATCH_TERMS, engine_mismatch_terms


class EngineMismatchError(RuntimeError):
    """The trainer's and the engine's log-probs disagree beyond GSPOConfig.engine_mismatch_tolerance."""


class EngineMonitor:
    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self._terms: list = []  # [5] ENGINE_MISMATCH_TERMS per micro-batch of this step's first update
        self._weights: list = []  # (sum, count, min, max, masked sequences, sequences) per micro-batch
        self._metrics: dict = {}

    def add_mismatch(self, logprobs, engine_logprobs, mask) -> None:
        self._terms.append(engine_mismatch_terms(logprobs.float().cpu(), engine_logprobs.float().cpu(), mask.cpu()))

    def add_weights(self, weights: torch.Tensor, mask: torch.Tensor) -> None:
        """The importance weights of one micro-batch ([n, T], 0 off the mask)."""
        mask = mask.to(weights.dtype)
        on = weights[mask.bool()]
        per_seq = weights.sum(dim=1)
        has_tokens = mask.sum(dim=1) > 0
        self._weights.append(
            torch.stack(
                [
                    on.sum(),
                    mask.sum(),
                    on.min() if on.numel() else weights.new_tensor(float("inf")),
                    on.max() if on.numel() else weights.new_tensor(float("-inf")),
                    ((per_seq == 0) & has_tokens).sum().to(weights.dtype),
                    has_tokens.sum().to(weights.dtype),
                ]
            )
            .detach()
            .double()
            .cpu()
        )

    def check(self, accelerator, step: int) -> None:
        """Before the step's first optimizer update, on every rank whenever the rollout has engine log-probs, also
        a rank whose share of that mini-batch is empty (it adds zeros: the collectives must match): reduce,
        record, stop on a broken engine."""
        width = len(ENGINE_MISMATCH_TERMS)
        terms = torch.stack(self._terms).double() if self._terms else torch.zeros((0, width), dtype=torch.float64)
        self._terms = []
        sums = accelerator.reduce(terms.sum(dim=0).to(accelerator.device), "sum").cpu()
        column = terms[:, ENGINE_MISMATCH_TERMS.index("abs_diff_max")]
        biggest = _reduce_max(accelerator, column.max() if len(column) else torch.tensor(float("-inf")))
        t = dict(zip(ENGINE_MISMATCH_TERMS, sums.tolist()))
        self._metrics = {
            "engine/logprob_abs_diff_mean": t["abs_diff_sum"] / max(t["tokens"], 1.0),
            "engine/logprob_abs_diff_max": biggest,
            "engine/seq_log_ratio_abs_mean": t["seq_abs_log_ratio_sum"] / max(t["sequences"], 1.0),
        }
        mean = self._metrics["engine/logprob_abs_diff_mean"]
        if not mean <= self.tolerance:  # NaN fails too
            figures = ", ".join(f"{k}={v:.4g}" for k, v in self._metrics.items())
            raise EngineMismatchError(
                f"step {step}: the rollout engine's log-probs disagree with the trainer's before any update "
                f"({figures}; GSPOConfig.engine_mismatch_tolerance={self.tolerance}). The engine is generating "
                "from other weights than the ones being trained (a weight sync skipped or lost); no update of this "
                "step was applied."
            )

    def step_metrics(self, accelerator) -> dict:
        """The step's engine metrics (empty without an engine that reports log-probs); every rank calls it."""
        metrics, self._metrics = self._metrics, {}
        if self._weights:
            w = torch.stack(self._weights)
            self._weights = []
            sums = accelerator.reduce(w[:, [0, 1, 4, 5]].sum(dim=0).to(accelerator.device), "sum").cpu().tolist()
            metrics["engine/is_weight_mean"] = sums[0] / max(sums[1], 1.0)
            metrics["engine/is_weight_min"] = -_reduce_max(accelerator, -w[:, 2].min())
            metrics["engine/is_weight_max"] = _reduce_max(accelerator, w[:, 3].max())
            metrics["engine/masked_fraction"] = sums[2] / max(sums[3], 1.0)
        return metrics


def _reduce_max(accelerator, value: torch.Tensor) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    gathered = accelerator.gather(value.double().reshape(1).to(accelerator.device))
    return float(gathered.max())
