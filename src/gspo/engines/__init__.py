"""Rollout engines behind one interface: a batch of rows + group size + sampling settings in,
a `Rollout` out, and `sync_weights(model)` after each training step's updates.

    TransformersEngine  `model.generate` on the live policy with gspo's inverse-CDF sampler
                        (gspo.engines.hf); nothing to sync, it reads the weights it trains

The trainer builds one engine at start-up (or takes one through `GSPOTrainer(rollout_engine=...)`)
and calls only the methods of `RolloutEngine`; evaluation uses the same engine, greedily.
"""

from __future__ import annotations

from gspo.engines.base import RolloutEngine, SamplingParams
from gspo.engines.hf import TransformersEngine, generate_rollout

__all__ = ["RolloutEngine", "SamplingParams", "TransformersEngine", "generate_rollout"]
