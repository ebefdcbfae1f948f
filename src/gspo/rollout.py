"""The Rollout: G completions per prompt (seed §2.1), as a rollout engine (gspo.engines) returns them.

The Rollout is the one object that travels through a training step; later stages
(rewards, advantages, log-probs) fill in its optional fields and never reach back.
Layout: prompts left-padded to P columns, completions right-padded to T columns, so
`cat([prompt_ids, completion_ids], dim=1)` is a valid causal-LM input whose last T
positions are the completion. Completion tokens run up to and including the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] right-padded
    completion_mask: torch.Tensor  # [N, T] 1 on completion tokens, EOS included
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without EOS
    group_size: int
    prompts: list = field(default_factory=list)  # [N] prompt text, repeated per completion
    completions: list = field(default_factory=list)  # [N] decoded completion text
    extra: dict = field(default_factory=dict)  # column -> [N] values, repeated per completion
    rewards: Optional[torch.Tensor] = None  # [N] total reward
    reward_per_func: dict = field(default_factory=dict)  # name -> [N]
    num_penalized: int = 0  # rewards replaced by the penalty value (reward_error_policy='penalty')
    advantages: Optional[torch.Tensor] = None  # [N]
    old_logprobs: Optional[torch.Tensor] = None  # [N, T] log pi_old, when off-policy updates need it
    ref_logprobs: Optional[torch.Tensor] = None  # [N, T] log pi_ref
    engine_logprobs: Optional[torch.Tensor] = None  # [N, T] the engine's log-probs of its samples (vLLM)
    values: Optional[torch.Tensor] = None  # [N, T] the critic's V_t at rollout time (advantage_estimator='gae')
    returns: Optional[torch.Tensor] = None  # [N, T] the critic's GAE return targets

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:  # [N] |y_i|
        return self.completion_mask.sum(dim=1)

    @property
    def completion_id_lists(self) -> list:
        return [ids[m.bool()].tolist() for ids, m in zip(self.completion_ids, self.completion_mask)]

    def no_grad_parts(self, config) -> list:
        """The rollout in micro-batches the size of a training micro-batch, for no-grad passes (reference,
        old log-probs, the critic's values): the same memory bound as the update."""
        micro = max(1, len(self) // (config.num_mini_batches * config.gradient_accumulation_steps))
        return [self.select(idx) for idx in torch.arange(len(self)).split(micro)]

    def select(self, index: torch.Tensor) -> "Rollout":
        """Rows `index` of every per-sequence tensor (texts and extras are left out)."""
        picked = {
            f.name: getattr(self, f.name)[index]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, prompts=[], completions=[], extra={}, reward_per_func={}, **picked)


def left_pad(seqs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> ([B, P] ids, [B, P] mask), padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def eos_ids(model, tokenizer) -> list:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def completion_mask_from_ids(completion_ids: torch.Tensor, eos: list) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T] ids -> (mask through the first EOS inclusive, [N] bool 'no EOS' flags)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, dtype=completion_ids.dtype, device=completion_ids.device))
    has_eos = is_eos.any(dim=1)
    first = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, completion_ids.shape[1], dtype=torch.long)
    )
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)[None, :]
    return (positions <= first[:, None]).long(), ~has_eos


def assemble_rollout(
    tokenizer, rows: list, *, prompt_ids, prompt_mask, completion_ids, group_size: int, eos: list, pad_id: int
) -> Rollout:
    """Masks, texts and per-completion extras around [N, T] sampled ids (N = len(rows) * G)."""
    completion_mask, no_eos = completion_mask_from_ids(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)
    repeat = lambda xs: [x for x in xs for _ in range(group_size)]  # noqa: E731
    extra_keys = [k for k in rows[0] if k not in ("prompt", "prompt_ids")]
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=no_eos,
        group_size=group_size,
        prompts=repeat([r["prompt"] for r in rows]),
        completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        extra={k: repeat([r.get(k) for r in rows]) for k in extra_keys},
    )
