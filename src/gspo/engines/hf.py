"""The first rollout engine: `transformers` `model.generate` on the live policy.

Sampling draws from softmax(logits / temperature) after top-k / top-p and nothing else, by
gspo's inverse-CDF sampler (gspo.sampling) inside `generate`; greedy decoding for evaluation.
It generates from the weights being trained, so `sync_weights` has nothing to do; under a
sharded back-end its session holds the whole weights (the back-end's generation context).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from transformers import GenerationConfig, LogitsProcessorList

from gspo.engines.base import RolloutEngine, SamplingParams
from gspo.rollout import Rollout, assemble_rollout, eos_ids, left_pad
from gspo.sampling import PolicySampler, plain_generation


class TransformersEngine(RolloutEngine):
    def __init__(
        self,
        model,
        tokenizer,
        *,
        weights_context: Optional[Callable] = None,
        precision_context: Optional[Callable] = None,
        synced_gpus: Optional[bool] = None,
        routes=None,
    ) -> None:
        """`model`: the unwrapped policy. `weights_context()`: makes sharded weights whole for a session
        (the back-end's generation context); `precision_context()`: autocast for mixed precision; `routes`: an MoE
        policy's gspo.moe.RouterHooks, to record the experts chosen while sampling (Routing Replay 'rollout')."""
        self.model, self.tokenizer, self.routes = model, tokenizer, routes
        self._weights = weights_context or contextlib.nullcontext
        self._precision = precision_context or contextlib.nullcontext
        self.synced_gpus = synced_gpus
        self._depth = 0  # sessions nest: only the outermost gathers

    @contextlib.contextmanager
    def session(self):
        if self._depth:
            yield
            return
        self._depth += 1
        try:
            with self._weights(), self._precision():
                yield
        finally:
            self._depth -= 1

    def generate(self, rows: list, *, group_size: int, sampling: SamplingParams) -> Rollout:
        with self.session():
            return generate_rollout(
                self.model,
                self.tokenizer,
                rows,
                group_size=group_size,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sampling.do_sample,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                synced_gpus=self.synced_gpus,
                routes=self.routes,
            )


@torch.no_grad()
def generate_rollout(
    model,
    tokenizer,
    rows: list,
    *,
    group_size: int,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    synced_gpus: Optional[bool] = None,
    routes=None,
) -> Rollout:
    """Sample `group_size` completions for each row ({"prompt", "prompt_ids", **extra}).

    Each prompt is repeated G times (completions of one prompt are contiguous). Sampling draws from
    softmax(logits / temperature) after top-k / top-p and nothing else (`gspo.sampling`);
    `do_sample=False` is plain greedy decoding. `synced_gpus` is passed to `generate`: None lets
    transformers decide (True when parameters are sharded, every forward then being collective);
    the trainer's back-end says False once its generation context has made sharded weights whole.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in rows], pad_id)
    eos = eos_ids(model, tokenizer)
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos)
    processors = LogitsProcessorList([PolicySampler(temperature, top_k, top_p)] if do_sample else [])
    inputs = prompt_ids.repeat_interleave(group_size, dim=0), prompt_mask.repeat_interleave(group_size, dim=0)
    recording = routes.generation(len(inputs[0]), prompt_ids.shape[1]) if routes is not None else None
    with plain_generation(model), recording or contextlib.nullcontext() as engine_routes:
        out = model.generate(
            input_ids=inputs[0].to(device),
            attention_mask=inputs[1].to(device),
            generation_config=gen_config,
            logits_processor=processors,
            synced_gpus=synced_gpus,
        )
    completion_ids = out[:, prompt_ids.shape[1] :].cpu()
    if completion_ids.shape[1] == 0:  # cannot happen with max_new_tokens >= 1, but keep shapes valid
        completion_ids = torch.full((out.shape[0], 1), eos[0], dtype=torch.long)
    rollout = assemble_rollout(
        tokenizer,
        rows,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        group_size=group_size,
        eos=eos,
        pad_id=pad_id,
    )
    return rollout if engine_routes is None else rollout.with_(engine_routes=engine_routes(completion_ids.shape[1]))
