"""The Rollout: G completions per prompt (seed §2.1), as a rollout engine (gspo.engines) returns them.

The Rollout is the one object that travels through a training step. The producer (gspo.producer) builds
it stage by stage, each stage making a new one with `dataclasses.replace`; it is frozen, and once it
leaves the producer nobody writes into it (the learner keeps its own state).

Layout: prompts left-padded to P columns, completions right-padded to T columns, so
`cat([prompt_ids, completion_ids], dim=1)` is a valid causal-LM input whose last T
positions are the completion. Completion tokens run up to and including the first EOS.

Two masks over the completion positions, two jobs:
* `completion_mask`: every real token (the attention mask of the completion part);
* `loss_mask`: the tokens the policy produced and is trained on. For a single-turn completion the two are
  equal; tokens the model did not sample (a tool's output in a multi-turn episode) are attended to but
  not trained on; a completion excluded from the loss (mask_truncated_completions) has an all-zero row.
Everything that means "the policy's tokens" reads `loss_mask`: log-prob aggregation, GSPO's |y_i|,
entropy, KL, the engine-mismatch metrics, the positive-example NLL, GAE's reward placement.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch


@dataclass(frozen=True)
class Rollout:
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] right-padded
    completion_mask: torch.Tensor  # [N, T] 1 on every real completion token (attention), EOS included
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without EOS
    group_size: int
    loss_mask: Optional[torch.Tensor] = None  # [N, T] 1 on the policy's tokens; None -> completion_mask
    prompts: list = field(default_factory=list)  # [N] prompt text, repeated per completion
    completions: list = field(default_factory=list)  # [N] decoded completion text
    extra: dict = field(default_factory=dict)  # column -> [N] values, repeated per completion
    rewards: Optional[torch.Tensor] = None  # [N] total reward
    reward_per_func: dict = field(default_factory=dict)  # name -> [N]
    num_penalized: int = 0  # rewards replaced by the penalty value (reward_error_policy='penalty')
    advantages: Optional[torch.Tensor] = None  # [N] or [N, T]
    old_logprobs: Optional[torch.Tensor] = None  # [N, T] log pi_old, when the producer computed it
    ref_logprobs: Optional[torch.Tensor] = None  # [N, T] log pi_ref
    engine_logprobs: Optional[torch.Tensor] = None  # [N, T] the engine's log-probs of its samples (vLLM)
    messages: list = field(default_factory=list)  # [N] multi-turn episodes: the whole conversation, as messages
    prompt_messages: list = field(default_factory=list)  # [N] a chat prompt's messages (None: a plain prompt)
    environment_rewards: Optional[torch.Tensor] = None  # [N] an environment's summed step rewards (episodes)
    episode_stats: dict = field(default_factory=dict)  # name -> [N] per-episode counts (turns, tool_calls, ...)
    old_routes: Optional[torch.Tensor] = None  # [N, layers, P + T, k] an MoE policy's experts under pi_old
    engine_routes: Optional[torch.Tensor] = None  # [N, layers, P + T, k] the experts the engine sampled with (R3)
    values: Optional[torch.Tensor] = None  # [N, T] the critic's V_t at rollout time (advantage_estimator='gae')
    returns: Optional[torch.Tensor] = None  # [N, T] the critic's GAE return targets
    info: dict = field(default_factory=dict)  # how it was produced: phase times, dynamic-sampling counts

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            object.__setattr__(self, "loss_mask", self.completion_mask)
        elif self.loss_mask.shape != self.completion_mask.shape:
            raise ValueError(
                f"loss_mask {tuple(self.loss_mask.shape)} must have completion_mask's shape "
                f"{tuple(self.completion_mask.shape)}"
            )
        elif bool((self.loss_mask.bool() & ~self.completion_mask.bool()).any()):
            raise ValueError("loss_mask marks a position that completion_mask does not: a padding token")

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_groups(self) -> int:
        return len(self) // self.group_size

    @property
    def lengths(self) -> torch.Tensor:  # [N] completion tokens (all of them, EOS included)
        return self.completion_mask.sum(dim=1)

    @property
    def policy_lengths(self) -> torch.Tensor:  # [N] |y_i|: the policy's tokens (the loss mask)
        return self.loss_mask.sum(dim=1)

    @property
    def completion_id_lists(self) -> list:
        return [ids[m.bool()].tolist() for ids, m in zip(self.completion_ids, self.completion_mask)]

    def with_(self, **changes) -> "Rollout":
        """A new Rollout with `changes`; this one is left as it was."""
        return replace(self, **changes)

    def no_grad_parts(self, config) -> list:
        """The rollout in micro-batches the size of a training micro-batch, for no-grad passes (reference,
        old log-probs, the critic's values): the same memory bound as the update."""
        micro = max(1, len(self) // (config.num_mini_batches * config.gradient_accumulation_steps))
        return [self.select(idx) for idx in torch.arange(len(self)).split(micro)]

    def select(self, index: torch.Tensor) -> "Rollout":
        """Rows `index` of every per-sequence tensor and episode count (texts, messages, extras and per-function
        rewards are left out)."""
        picked = {
            f.name: getattr(self, f.name)[index]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        stats = {k: v[index] for k, v in self.episode_stats.items()}
        return replace(
            self,
            prompts=[],
            completions=[],
            messages=[],
            prompt_messages=[],
            extra={},
            reward_per_func={},
            episode_stats=stats,
            **picked,
        )

    def select_groups(self, groups: list) -> "Rollout":
        """Whole groups `groups` (indices into [N / G]), with their texts, extras and per-function rewards.
        `num_penalized` is a count over the whole rollout, not per row: the slice carries 0 (the producer counts
        each round's penalties itself)."""
        rows = [g * self.group_size + j for g in groups for j in range(self.group_size)]
        index = torch.tensor(rows, dtype=torch.long)
        take = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return replace(
            self.select(index),
            prompts=take(self.prompts) if self.prompts else [],
            completions=take(self.completions) if self.completions else [],
            messages=take(self.messages) if self.messages else [],
            prompt_messages=take(self.prompt_messages) if self.prompt_messages else [],
            extra={k: take(v) for k, v in self.extra.items()},
            reward_per_func={k: torch.as_tensor(v)[index] for k, v in self.reward_per_func.items()},
            num_penalized=0,
        )


def concat_rollouts(parts: list, pad_id: int) -> Rollout:
    """One Rollout from several (dynamic sampling's rounds), prompts re-padded on the left and completions
    on the right to the widest. Only the fields set before advantages are kept: texts, extras, rewards."""
    if len(parts) == 1:
        return parts[0]
    p_width = max(r.prompt_ids.shape[1] for r in parts)
    t_width = max(r.completion_ids.shape[1] for r in parts)
    left = lambda x, fill: torch.nn.functional.pad(x, (p_width - x.shape[1], 0), value=fill)  # noqa: E731
    right = lambda x, fill: torch.nn.functional.pad(x, (0, t_width - x.shape[1]), value=fill)  # noqa: E731
    cat = lambda name, pad, fill: torch.cat([pad(getattr(r, name), fill) for r in parts])  # noqa: E731
    first = parts[0]
    has_engine = all(r.engine_logprobs is not None for r in parts)
    return Rollout(
        prompt_ids=cat("prompt_ids", left, pad_id),
        prompt_mask=cat("prompt_mask", left, 0),
        completion_ids=cat("completion_ids", right, pad_id),
        completion_mask=cat("completion_mask", right, 0),
        loss_mask=cat("loss_mask", right, 0),
        truncated=torch.cat([r.truncated for r in parts]),
        group_size=first.group_size,
        prompts=[p for r in parts for p in r.prompts],
        completions=[c for r in parts for c in r.completions],
        extra={k: [v for r in parts for v in r.extra[k]] for k in first.extra},
        rewards=torch.cat([r.rewards for r in parts]) if first.rewards is not None else None,
        reward_per_func={
            k: torch.cat([torch.as_tensor(r.reward_per_func[k]) for r in parts]) for k in first.reward_per_func
        },
        num_penalized=sum(r.num_penalized for r in parts),
        messages=[m for r in parts for m in r.messages],
        prompt_messages=[m for r in parts for m in r.prompt_messages],
        environment_rewards=(
            torch.cat([r.environment_rewards for r in parts]) if first.environment_rewards is not None else None
        ),
        episode_stats={k: torch.cat([r.episode_stats[k] for r in parts]) for k in first.episode_stats},
        engine_logprobs=cat("engine_logprobs", right, 0.0) if has_engine else None,
        engine_routes=_concat_routes(parts, p_width, t_width) if first.engine_routes is not None else None,
    )


def _concat_routes(parts: list, p_width: int, t_width: int) -> torch.Tensor:
    """Engine routes [n, layers, P + T, k] of several rollouts, re-padded like their ids (-1: no route)."""
    out = []
    for r in parts:
        p = r.prompt_ids.shape[1]
        routes = r.engine_routes
        left = torch.nn.functional.pad(routes[:, :, :p], (0, 0, p_width - p, 0), value=-1)
        right = torch.nn.functional.pad(routes[:, :, p:], (0, 0, 0, t_width - (routes.shape[2] - p)), value=-1)
        out.append(torch.cat([left, right], dim=2))
    return torch.cat(out)


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
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=no_eos,
        group_size=group_size,
        prompts=repeat([r["prompt"] for r in rows]),
        completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        extra=row_extras(rows, repeat=group_size),
        prompt_messages=repeat([r.get("prompt_messages") for r in rows])
        if any("prompt_messages" in r for r in rows)
        else [],
    )


ROW_KEYS = ("prompt", "prompt_ids", "prompt_messages")  # what a dataset row holds besides its extra columns


def row_extras(rows: list, *, repeat: int) -> dict:
    """The rows' extra columns (every key but ROW_KEYS), each value repeated `repeat` times (one per completion)."""
    keys = [k for k in rows[0] if k not in ROW_KEYS]
    return {k: [r.get(k) for r in rows for _ in range(repeat)] for k in keys}
