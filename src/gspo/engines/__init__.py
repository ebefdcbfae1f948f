"""Rollout engines behind one interface: a batch of rows + group size + sampling settings in,
a `Rollout` out, and `sync_weights(model)` after each training step's updates.

    TransformersEngine  `model.generate` on the live policy with gspo's inverse-CDF sampler
                        (gspo.engines.hf); nothing to sync, it reads the weights it trains
    VLLMEngine          one `vllm.LLM` per rank in this process (gspo.engines.vllm); the trained
                        weights are pushed into it after every step; returns its own log-probs

The trainer builds one engine at start-up (`build_engine`, or takes one through
`GSPOTrainer(rollout_engine=...)`) and calls only the methods of `RolloutEngine`; evaluation uses
the same engine, greedily.
"""

from __future__ import annotations

from gspo.engines.base import RolloutEngine, SamplingParams
from gspo.engines.hf import TransformersEngine, generate_rollout

__all__ = ["RolloutEngine", "SamplingParams", "TransformersEngine", "build_engine", "generate_rollout"]


def build_engine(
    config,
    *,
    policy,
    tokenizer,
    backend,
    precision_context,
    world_size: int,
    completion_tokens: int | None = None,
    routes=None,
) -> RolloutEngine:
    """The engine GSPOConfig.rollout_engine names, for the back-end's trained `policy`, holding its weights.
    `completion_tokens`: the longest completion it must hold (a multi-turn episode's; default max_new_tokens);
    `routes`: an MoE policy's router hooks when the engine must record its experts (Routing Replay 'rollout')."""
    if config.rollout_engine == "vllm":
        from gspo.engines.vllm import VLLMEngine

        engine = VLLMEngine(
            policy.unwrapped(), tokenizer, config=config, world_size=world_size, completion_tokens=completion_tokens
        )
        engine.sync_weights(policy)  # created from the policy's own weights, never from disk
        return engine
    return TransformersEngine(
        policy.unwrapped(),
        tokenizer,
        weights_context=lambda: backend.generation_context(policy),
        precision_context=precision_context,
        synced_gpus=backend.synced_gpus,
        routes=routes,
    )
