"""The math of GSPO, GSPO-token, GRPO and the other policy objectives as pure tensor functions. No model, no I/O.

Equation numbers without a paper's name refer to the GSPO paper (Zheng et al., 2025,
arXiv 2507.18071). Notation: N sequences (prompts x group), T completion positions,
`mask[i, t] = 1` on the tokens the loss is taken over (the policy's completion tokens, EOS included;
padding, and in multi-turn episodes the environment's tokens, excluded).

Policy objectives by name: `POLICY_LOSSES[name]` is a function with one signature for every objective,

    fn(logprobs [N, T], old_logprobs [N, T], advantages [N] or [N, T], loss_mask [N, T], *,
       level, clip_low, clip_high, aggregation, max_log_ratio=20.0,
       num_sequences=None, num_tokens=None, is_weights=None, norm_length=None, **options) -> (loss, metrics)

and metrics always hold the detached clip_fraction_seq, clip_fraction_token, ratio_mean, ratio_min and
ratio_max. Registered here: 'clip' (the clipped surrogate of GSPO / GSPO-token / GRPO, `policy_loss`),
'cispo' (MiniMax-M1), 'sapo' (soft adaptive gate) and 'gmpo' (geometric-mean ratio); docs/objectives.md
lists them with their equations. `POLICY_LOSS_SPECS[name]` says which importance levels each accepts,
the clip it recommends at each, its default aggregation and its options. Adding an objective is one
function with that signature plus `@register_policy_loss(name, clip={level: (eps_low, eps_high)})`.

Departures from the papers, on purpose:
* log-ratios are clamped to [-max_log_ratio, max_log_ratio] before `exp`, so one
  outlier token cannot overflow to inf and poison the gradient with NaN;
* the normalised advantage divides by the group's *sample* std (unbiased, as the
  seed's `rewards_grouped.std(dim=1)` does) plus eps, and a group whose rewards are
  all equal gets exactly zero advantage;
* the loss denominators (number of sequences / tokens) can be passed in, so that a
  batch split into micro-batches or across ranks gives the same gradient as the whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

IMPORTANCE_LEVELS = ("sequence", "sequence_token", "token")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# The per-sequence levels (GSPO Eq. 5 / 14, GMPO) are a mean over sequences by definition.
SEQUENCE_AGGREGATIONS = ("seq-mean-token-mean",)
KL_ESTIMATORS = ("k1", "k2", "k3")


def recommended_clip_range(level: str, objective: str = "clip") -> tuple[float, float]:
    """(eps_low, eps_high) the objective's paper (or verl) uses at this importance level."""
    check_objective_level(objective, level)
    return POLICY_LOSS_SPECS[objective].clip[level]


# ----------------------------------------------------------------------------------
# Advantages (seed §2.3, paper Eq. 6)
# ----------------------------------------------------------------------------------
def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] rewards -> [N / G] bool: groups whose rewards are all equal (no learning signal)."""
    grouped = _grouped(rewards, group_size)  # [N/G, G]
    return (grouped == grouped[:, :1]).all(dim=1)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor,  # [N], group-contiguous: rows i*G .. i*G+G-1 share a prompt
    group_size: int,
    normalize: bool,
    eps: float = 1e-8,
) -> torch.Tensor:  # [N]
    """A_i = r_i - mean(group); divided by (sample std + eps) when `normalize` (Eq. 6)."""
    grouped = _grouped(rewards.float(), group_size)  # [N/G, G]
    adv = grouped - grouped.mean(dim=1, keepdim=True)  # seed §2.3: relative advantage
    if normalize:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(adv[:, :1])
        adv = adv / (std + eps)  # Eq. 6
    # Equal rewards -> exactly 0 (the float mean of equal values is not always equal to them).
    adv = torch.where(zero_std_groups(rewards, group_size)[:, None], torch.zeros_like(adv), adv)
    return adv.reshape(-1)


# ----------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)


def masked_mean(
    x: torch.Tensor,  # [N, T]
    mask: torch.Tensor,  # [N, T]
    dim: Optional[int] = None,
) -> torch.Tensor:
    """Mean over masked entries (all of them, or along `dim`); an empty row gives 0."""
    return masked_sum(x, mask, dim) / mask.sum(dim=dim).clamp(min=1)


def aggregate(
    token_losses: torch.Tensor,  # [N, T]
    mask: torch.Tensor,  # [N, T]
    mode: str,
    num_sequences: Optional[float] = None,
    num_tokens: Optional[float] = None,
    norm_length: Optional[float] = None,
) -> torch.Tensor:
    """Reduce per-token losses to a scalar (verl's mode names).

    seq-mean-token-mean:     (1/N) sum_i (1/|y_i|) sum_t l_it   (GRPO paper; GSPO Eq. 5/14)
    token-mean:              (1/sum_i |y_i|) sum_i sum_t l_it    (DAPO)
    seq-mean-token-sum:      (1/N) sum_i sum_t l_it              (the seed's token-level loss)
    seq-mean-token-sum-norm: (1/(N L)) sum_i sum_t l_it, L = norm_length a constant (Dr. GRPO,
                             arXiv 2503.20783: its objective is (1/G) sum_i sum_t, no 1/|y_i|; its code and
                             TRL's 'dr_grpo' divide by N * max completion length). verl's agg_loss of that name
                             returns sum_i sum_t l_it / L per micro-batch, without 1/N (its actor then scales
                             by 1/gradient_accumulation): ours is verl's divided by N, so that the loss does
                             not grow with the batch and slices add up to the whole.
    `num_sequences` / `num_tokens` replace N / sum|y_i| when this batch is a slice of a
    larger one, so that slices' losses add up to the whole batch's loss.
    """
    mask = mask.to(token_losses.dtype)
    n_seq = num_sequences if num_sequences is not None else token_losses.shape[0]
    if mode == "seq-mean-token-mean":
        return masked_mean(token_losses, mask, dim=1).sum() / n_seq
    if mode == "seq-mean-token-sum":
        return masked_sum(token_losses, mask, dim=1).sum() / n_seq
    if mode == "token-mean":
        n_tok = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
        return masked_sum(token_losses, mask) / n_tok
    if mode == "seq-mean-token-sum-norm":
        if norm_length is None or not norm_length > 0:
            raise ValueError(
                f"loss aggregation 'seq-mean-token-sum-norm' needs norm_length > 0, a constant token count "
                f"(Dr. GRPO: the maximum completion length), got {norm_length!r}"
            )
        return masked_sum(token_losses, mask) / (n_seq * norm_length)  # Dr. GRPO: sum_i sum_t l_it / (N L)
    raise ValueError(f"loss aggregation {mode!r} is not one of {list(AGGREGATIONS)}")


# ----------------------------------------------------------------------------------
# The registry of policy objectives
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyLossSpec:
    """What the registry knows about an objective besides its function.

    clip: {level: (eps_low, eps_high)}: the importance levels it accepts (the first is its default) and the clip
        its paper (or verl) recommends at each; default_aggregation: the token level's aggregation when none is
        given (the per-sequence levels have only 'seq-mean-token-mean'); options: {name: default} of the
        keyword arguments only this objective takes (GSPOConfig has a field of the same name for each)."""

    clip: dict
    default_aggregation: str
    options: dict
    level_rule: str  # why it accepts only those levels, for error messages


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {}
POLICY_LOSS_SPECS: dict[str, PolicyLossSpec] = {}


def register_policy_loss(
    name: str,
    *,
    clip: dict,
    default_aggregation: str = "seq-mean-token-mean",
    options: Optional[dict] = None,
    level_rule: str = "",
) -> Callable:
    """Decorator: register `fn` as POLICY_LOSSES[name], with the levels / clip / options it takes (PolicyLossSpec)."""
    for level in clip:
        if level not in IMPORTANCE_LEVELS:
            raise ValueError(f"importance_sampling_level {level!r} is not one of {list(IMPORTANCE_LEVELS)}")
    if default_aggregation not in AGGREGATIONS:
        raise ValueError(f"loss_aggregation {default_aggregation!r} is not one of {list(AGGREGATIONS)}")

    def decorator(fn: Callable) -> Callable:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy_loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        POLICY_LOSS_SPECS[name] = PolicyLossSpec(dict(clip), default_aggregation, dict(options or {}), level_rule)
        return fn

    return decorator


def policy_loss_spec(objective: str) -> PolicyLossSpec:
    if objective not in POLICY_LOSS_SPECS:
        raise ValueError(f"policy_loss {objective!r} is not one of {list(POLICY_LOSSES)}")
    return POLICY_LOSS_SPECS[objective]


def check_objective_level(objective: str, level: str) -> None:
    """ValueError naming importance_sampling_level unless `objective` is defined at `level`."""
    spec = policy_loss_spec(objective)
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level {level!r} is not one of {list(IMPORTANCE_LEVELS)}")
    if level not in spec.clip:
        raise ValueError(
            f"importance_sampling_level {level!r} does not apply to policy_loss {objective!r}: allowed "
            f"{list(spec.clip)}" + (f" ({spec.level_rule})" if spec.level_rule else "")
        )


def allowed_aggregations(objective: str, level: str) -> tuple[str, ...]:
    """The loss aggregations `objective` accepts at `level`, its default first."""
    check_objective_level(objective, level)
    if level != "token":
        return SEQUENCE_AGGREGATIONS
    default = POLICY_LOSS_SPECS[objective].default_aggregation
    return (default,) + tuple(a for a in AGGREGATIONS if a != default)


def resolve_aggregation(objective: str, level: str, aggregation: Optional[str]) -> str:
    """The aggregation in force (None: the objective's default); ValueError naming loss_aggregation otherwise."""
    allowed = allowed_aggregations(objective, level)
    if aggregation is None:
        return allowed[0]
    if level != "token" and aggregation not in allowed:
        raise ValueError(
            f"importance_sampling_level {level!r} is defined per sequence (mean over sequences: GSPO Eq. 5 / "
            f"Eq. 14, GMPO); loss_aggregation must be None or 'seq-mean-token-mean', got {aggregation!r}"
        )
    if aggregation not in allowed:
        raise ValueError(f"loss aggregation {aggregation!r} is not one of {list(allowed)}")
    return aggregation


class _Call(NamedTuple):
    level: str
    aggregation: str
    clip_low: float
    clip_high: float
    options: dict


def _prepare(objective, logprobs, old_logprobs, advantages, mask, level, clip_low, clip_high, aggregation, options):
    """Check one call of a registered objective; fill in its defaults (level, clip, aggregation, options)."""
    spec = policy_loss_spec(objective)
    level = next(iter(spec.clip)) if level is None else level
    check_objective_level(objective, level)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(
            f"policy_loss {objective!r} got unknown option(s) {unknown}; its options are {sorted(spec.options)}"
        )
    if logprobs.dim() != 2 or old_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            "logprobs, old_logprobs and mask must share one [N, T] shape, got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(
            f"advantages must be [N]={tuple(logprobs.shape[:1])} or [N, T]={tuple(logprobs.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    if level == "sequence" and advantages.dim() == 2:
        raise ValueError(
            f"policy_loss {objective!r} at level 'sequence' (one term per sequence: GSPO Eq. 5, GMPO) takes one "
            "advantage per sequence [N]; for per-token advantages use level 'sequence_token' (Eq. 13) or 'token'"
        )
    mode = resolve_aggregation(objective, level, aggregation)
    low, high = spec.clip[level]
    return _Call(
        level,
        mode,
        low if clip_low is None else float(clip_low),
        high if clip_high is None else float(clip_high),
        {**spec.options, **options},
    )


def _metrics(
    clipped: torch.Tensor,  # [N, T] bool: where the objective's clip binds
    mask: torch.Tensor,  # [N, T] float
    seq_ratio: torch.Tensor,  # [N] one importance ratio per sequence, for the log
) -> dict:
    """clip_fraction_seq: mean over sequences of the fraction of a sequence's tokens clipped (for a sequence-level
    objective a 0/1 flag per sequence); clip_fraction_token: clipped tokens / all tokens (GSPO's Fig. 2 count);
    the ratio's mean / min / max over sequences. All detached."""
    clipped = clipped.to(mask.dtype)
    # Over the sequences that have loss tokens: a row masked out whole (mask_truncated_completions) has no ratio.
    has = mask.sum(dim=1) > 0  # [N]
    seq_ratio = seq_ratio.detach()[has] if bool(has.any()) else seq_ratio.detach().new_ones(1)
    per_seq = masked_mean(clipped, mask, dim=1)[has]
    return {
        "clip_fraction_seq": (per_seq.mean() if per_seq.numel() else per_seq.new_zeros(())).detach(),
        "clip_fraction_token": masked_mean(clipped, mask).detach(),
        "ratio_mean": seq_ratio.mean(),
        "ratio_min": seq_ratio.min(),
        "ratio_max": seq_ratio.max(),
    }


def _token_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # [N, T]
    return advantages if advantages.dim() == 2 else advantages[:, None].expand_as(like)


# ----------------------------------------------------------------------------------
# Importance ratios and the clipped surrogate (paper Eq. 5, 7, 13, 14)
# ----------------------------------------------------------------------------------
def sequence_log_ratio(
    logprobs: torch.Tensor,  # [N, T]
    old_logprobs: torch.Tensor,  # [N, T]
    mask: torch.Tensor,  # [N, T]
) -> torch.Tensor:  # [N]
    """log s_i = (1/|y_i|) sum_t (log pi_theta - log pi_old)   (Eq. 7, in log space)."""
    return masked_mean(logprobs - old_logprobs, mask.to(logprobs.dtype), dim=1)  # Eq. 7


def clipped_surrogate(
    ratio: torch.Tensor,  # [N] or [N, T]
    advantages: torch.Tensor,  # same shape as ratio
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element loss -min(r A, clip(r, 1-eps_low, 1+eps_high) A) and where the clip is active."""
    surr = ratio * advantages
    surr_clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    return -torch.min(surr, surr_clipped), _clip_binds(ratio, advantages, 1 - clip_low, 1 + clip_high)


def _clip_binds(x, advantages, low, high):
    """The clip binds (and the gradient vanishes) only on the side the advantage pushes towards."""
    return ((x > high) & (advantages > 0)) | ((x < low) & (advantages < 0))


@register_policy_loss("clip", clip={"sequence": (3e-4, 4e-4), "sequence_token": (3e-4, 4e-4), "token": (0.2, 0.2)})
def policy_loss(
    logprobs: torch.Tensor,  # [N, T] log pi_theta(y_t | x, y_<t), requires grad
    old_logprobs: torch.Tensor,  # [N, T] log pi_old, no grad
    advantages: torch.Tensor,  # [N] per sequence, or [N, T] per token
    loss_mask: torch.Tensor,  # [N, T] 1 on the tokens the loss is taken over
    *,
    level: Optional[str] = None,  # None: 'sequence'
    clip_low: Optional[float] = None,  # None: recommended_clip_range(level)
    clip_high: Optional[float] = None,
    aggregation: Optional[str] = None,  # None: 'seq-mean-token-mean'
    max_log_ratio: float = 20.0,
    num_sequences: Optional[float] = None,
    num_tokens: Optional[float] = None,
    is_weights: Optional[torch.Tensor] = None,  # [N, T] engine-mismatch weights (engine_is_weights), no grad
    norm_length: Optional[float] = None,  # seq-mean-token-sum-norm's constant L
    **options,
) -> tuple[torch.Tensor, dict]:
    """'clip': the clipped surrogate for GSPO ('sequence', Eq. 5-7), GSPO-token ('sequence_token', Eq. 13-14)
    or GRPO ('token'). Paper clip (GSPO §5.1): 3e-4 / 4e-4 at the sequence levels; 0.2 at token level.
    `is_weights` scale each token's surrogate (sequence level: each sequence's, by their mean); denominators
    are unchanged. verl: 'gspo' (our 'sequence_token'; it clamps the log-ratio at 10, we at max_log_ratio) and
    'vanilla' (token level, plus dual-clip at ratio 3 for A < 0, which we do not have).

    Returns (loss, metrics); metrics are detached: clip_fraction_seq, clip_fraction_token and the importance
    ratio's mean / min / max over sequences (token level: each sequence's mean token ratio).
    """
    call = _prepare(
        "clip", logprobs, old_logprobs, advantages, loss_mask, level, clip_low, clip_high, aggregation, options
    )
    level, mode, clip_low, clip_high = call.level, call.aggregation, call.clip_low, call.clip_high
    mask = loss_mask.to(logprobs.dtype)
    old_logprobs = old_logprobs.detach()
    if level == "token":
        log_ratio = (logprobs - old_logprobs).clamp(-max_log_ratio, max_log_ratio)
        ratio = torch.exp(log_ratio)  # [N, T] r_it = pi_theta / pi_old per token
        token_loss, clipped = clipped_surrogate(ratio, _token_advantages(advantages, ratio), clip_low, clip_high)
        token_loss = token_loss if is_weights is None else token_loss * is_weights.detach()
        loss = aggregate(token_loss, mask, mode, num_sequences, num_tokens, norm_length)
        seq_ratio = masked_mean(ratio.detach(), mask, dim=1)
    else:
        log_s = sequence_log_ratio(logprobs, old_logprobs, mask).clamp(-max_log_ratio, max_log_ratio)  # Eq. 7
        if level == "sequence":
            ratio = torch.exp(log_s)  # [N] s_i(theta)
            seq_loss, seq_clipped = clipped_surrogate(ratio, advantages, clip_low, clip_high)  # Eq. 5
            if is_weights is not None:
                seq_loss = seq_loss * masked_mean(is_weights.detach(), mask, dim=1)
            seq_loss = seq_loss * (mask.sum(dim=1) > 0)  # a sequence with no loss tokens adds nothing (not -A_i)
            loss = seq_loss.sum() / (num_sequences if num_sequences is not None else seq_loss.shape[0])
            clipped = seq_clipped[:, None].expand_as(mask)
        else:
            # Eq. 13: s_it = sg[s_i] * pi_theta(y_t) / sg[pi_theta(y_t)] -> value s_i, gradient per token
            ratio = torch.exp(log_s.detach()[:, None] + logprobs - logprobs.detach())  # [N, T]
            token_loss, clipped = clipped_surrogate(ratio, _token_advantages(advantages, ratio), clip_low, clip_high)
            token_loss = token_loss if is_weights is None else token_loss * is_weights.detach()
            loss = aggregate(token_loss, mask, "seq-mean-token-mean", num_sequences)  # Eq. 14
        seq_ratio = torch.exp(log_s.detach())
    return loss, _metrics(clipped, mask, seq_ratio)


# ----------------------------------------------------------------------------------
# CISPO, SAPO, GMPO: other objectives users ask for by name (DESIGN §2c)
# ----------------------------------------------------------------------------------
@register_policy_loss(
    "cispo",
    clip={"token": (1.0, 0.2)},
    default_aggregation="token-mean",
    level_rule="CISPO clips each token's importance-sampling weight, MiniMax-M1 Eq. 4: use 'token'",
)
def cispo_loss(
    logprobs: torch.Tensor,  # [N, T] log pi_theta, requires grad
    old_logprobs: torch.Tensor,  # [N, T] log pi_old, no grad
    advantages: torch.Tensor,  # [N] or [N, T]
    loss_mask: torch.Tensor,  # [N, T]
    *,
    level: Optional[str] = None,  # only 'token'
    clip_low: Optional[float] = None,  # None: 1.0, a floor of 0 (no lower bound)
    clip_high: Optional[float] = None,  # None: 0.2
    aggregation: Optional[str] = None,  # None: 'token-mean' (Eq. 4 divides by all tokens of the group)
    max_log_ratio: float = 20.0,
    num_sequences: Optional[float] = None,
    num_tokens: Optional[float] = None,
    is_weights: Optional[torch.Tensor] = None,  # [N, T], no grad: scales each token's loss
    norm_length: Optional[float] = None,
    **options,
) -> tuple[torch.Tensor, dict]:
    """CISPO (MiniMax-M1, arXiv 2506.13585 §3.1): l_it = -sg(clip(r_it, 1-eps_low, 1+eps_high)) * A_it * log pi_theta.

    The clip caps the importance-sampling *weight* and is under a stop-gradient, so no token loses its gradient
    (PPO's clip zeroes it): d l_it / d log pi = -r̂_it A_it on every token. The paper sets no lower bound
    ("eps_low large") and tunes eps_high; default here 1.0 / 0.2 (a floor of 0 is no floor: ratios are > 0;
    verl's example run sets clip_ratio_low=10, clip_ratio_high=0.2, the same weights). Default aggregation
    'token-mean', as Eq. 4 (1 / sum_i |o_i|) and verl's default loss_agg_mode. Matches verl
    `compute_policy_loss_cispo` term by term (both clamp the log-ratio at 20); its clip fraction, like ours,
    counts tokens whose weight was capped on either side, whatever the advantage's sign.
    """
    call = _prepare(
        "cispo", logprobs, old_logprobs, advantages, loss_mask, level, clip_low, clip_high, aggregation, options
    )
    mask = loss_mask.to(logprobs.dtype)
    log_ratio = (logprobs.detach() - old_logprobs.detach()).clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)  # [N, T] r_it, no gradient
    low, high = 1 - call.clip_low, 1 + call.clip_high
    weight = ratio.clamp(low, high)  # [N, T] r̂_it = clip(r_it, 1 - eps_low, 1 + eps_high), under sg
    token_loss = -weight * _token_advantages(advantages, ratio) * logprobs  # MiniMax-M1 Eq. 4
    token_loss = token_loss if is_weights is None else token_loss * is_weights.detach()
    loss = aggregate(token_loss, mask, call.aggregation, num_sequences, num_tokens, norm_length)
    clipped = (ratio < low) | (ratio > high)
    return loss, _metrics(clipped, mask, masked_mean(ratio, mask, dim=1))


@register_policy_loss(
    "sapo",
    clip={"token": (0.2, 0.2)},
    options={"sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05},
    level_rule="SAPO gates each token's ratio, arXiv 2511.20347: use 'token'",
)
def sapo_loss(
    logprobs: torch.Tensor,  # [N, T] log pi_theta, requires grad
    old_logprobs: torch.Tensor,  # [N, T] log pi_old, no grad
    advantages: torch.Tensor,  # [N] or [N, T]
    loss_mask: torch.Tensor,  # [N, T]
    *,
    level: Optional[str] = None,  # only 'token'
    clip_low: Optional[float] = None,  # SAPO does not clip: eps only count clip_fraction_* (see below)
    clip_high: Optional[float] = None,
    aggregation: Optional[str] = None,  # None: 'seq-mean-token-mean' (the paper's and verl's)
    max_log_ratio: float = 20.0,
    num_sequences: Optional[float] = None,
    num_tokens: Optional[float] = None,
    is_weights: Optional[torch.Tensor] = None,  # [N, T], no grad: scales each token's loss
    norm_length: Optional[float] = None,
    **options,  # sapo_tau_pos (default 1.0), sapo_tau_neg (default 1.05): verl's tau_pos / tau_neg defaults
) -> tuple[torch.Tensor, dict]:
    """SAPO (arXiv 2511.20347 §3): l_it = -f(r_it) A_it with the soft gate f(r) = sigmoid(tau (r - 1)) * 4 / tau,
    tau = sapo_tau_pos where A_it > 0, sapo_tau_neg elsewhere.

    No hard clip: the gate's gradient weight d f / d r = 4 sigma (1 - sigma) is 1 at r = 1 (on-policy SAPO is the
    plain policy gradient) and decays smoothly as r leaves 1, faster for the larger tau (the paper: tau_neg >
    tau_pos). Matches verl `compute_policy_loss_sapo` term by term, which hard-codes seq-mean-token-mean whatever
    loss_agg_mode says; here the aggregation is a choice, defaulting to seq-mean-token-mean (the paper's
    1/G sum_i 1/|y_i| sum_t). verl reports clip fractions of 0; here clip_fraction_* count the tokens whose
    ratio is beyond [1 - clip_low, 1 + clip_high] on the side the advantage pushes, where the 'clip' objective's
    hard clip would have zeroed the gradient and SAPO only attenuates it.
    """
    call = _prepare(
        "sapo", logprobs, old_logprobs, advantages, loss_mask, level, clip_low, clip_high, aggregation, options
    )
    tau_pos, tau_neg = (float(call.options[k]) for k in ("sapo_tau_pos", "sapo_tau_neg"))
    for name, tau in (("sapo_tau_pos", tau_pos), ("sapo_tau_neg", tau_neg)):
        if not tau > 0:
            raise ValueError(f"SAPO option {name}={tau!r} must be > 0 (the gate's temperature)")
    mask = loss_mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)  # [N, T] r_it
    adv = _token_advantages(advantages, ratio)
    tau = torch.where(adv > 0, ratio.new_tensor(tau_pos), ratio.new_tensor(tau_neg))  # [N, T] tau_it
    gate = torch.sigmoid(tau * (ratio - 1)) * (4 / tau)  # SAPO §3: f_it(r) = sigma(tau (r - 1)) 4 / tau
    token_loss = -gate * adv  # SAPO §3: J = (1/G) sum_i (1/|y_i|) sum_t f_it(r_it) A_it
    token_loss = token_loss if is_weights is None else token_loss * is_weights.detach()
    loss = aggregate(token_loss, mask, call.aggregation, num_sequences, num_tokens, norm_length)
    clipped = _clip_binds(ratio.detach(), adv, 1 - call.clip_low, 1 + call.clip_high)
    return loss, _metrics(clipped, mask, masked_mean(ratio.detach(), mask, dim=1))


@register_policy_loss(
    "gmpo",
    clip={"sequence": (0.4, 0.4)},
    level_rule="GMPO is its own sequence-level form, a geometric mean of clipped token ratios: use 'sequence'",
)
def gmpo_loss(
    logprobs: torch.Tensor,  # [N, T] log pi_theta, requires grad
    old_logprobs: torch.Tensor,  # [N, T] log pi_old, no grad
    advantages: torch.Tensor,  # [N] one per sequence
    loss_mask: torch.Tensor,  # [N, T]
    *,
    level: Optional[str] = None,  # only 'sequence'
    clip_low: Optional[float] = None,  # in log space: token log-ratios floor at -clip_low (None: 0.4)
    clip_high: Optional[float] = None,  # in log space: token log-ratios cap at clip_high (None: 0.4)
    aggregation: Optional[str] = None,  # only None / 'seq-mean-token-mean' (mean over sequences)
    max_log_ratio: float = 20.0,
    num_sequences: Optional[float] = None,
    num_tokens: Optional[float] = None,
    is_weights: Optional[torch.Tensor] = None,  # [N, T], no grad: each sequence's loss times their geometric mean
    norm_length: Optional[float] = None,
    **options,
) -> tuple[torch.Tensor, dict]:
    """GMPO (arXiv 2507.20673 §3): l_i = -A_i * exp((1/|y_i|) sum_t c_it), the geometric mean of the token ratios
    after a one-sided clip of each log-ratio lr_it on the side the advantage pushes:
    c_it = min(lr_it, eps_high) if A_i > 0, max(lr_it, -eps_low) if A_i < 0 (the paper's
    sgn(A) * prod_t |min(rho_t A, clip(rho_t, e^-eps_low, e^eps_high) A)|^(1/|y|), in log space). A clipped token
    drops out of the gradient; the others get d l_i / d lp_it = -A_i s_i / |y_i|. Loss: mean over sequences.
    Clip in log space, (e^-0.4, e^0.4) by default (the paper, and verl's examples/gmpo_trainer).

    verl `compute_policy_loss_geo_mean` computes the same loss (sgn(A) * min(sgn(A) lr, sgn(A) clamp(lr))), with
    differences: it does not clamp the log-ratio (we clamp at max_log_ratio, so a wild token cannot overflow);
    it averages [N, T] advantages over tokens (we take [N] only: GMPO's advantage is per sequence); it divides by
    the micro-batch's row count (we by num_sequences); its clip fraction counts every clamped token with A > 0,
    also below -eps_low where the min keeps the unclipped value (we count where the clip binds, as `clip`).
    IS weights enter as a per-sequence geometric mean, as in verl. The ratio metrics are the unclipped
    exp(mean_t lr_it), GSPO's s_i.
    """
    call = _prepare(
        "gmpo", logprobs, old_logprobs, advantages, loss_mask, level, clip_low, clip_high, aggregation, options
    )
    mask = loss_mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-max_log_ratio, max_log_ratio)  # [N, T] lr_it
    adv = advantages[:, None]  # [N, 1]
    clipped_lr = torch.where(  # GMPO §3: token clipping in log space, one-sided by sgn(A)
        adv > 0,
        log_ratio.clamp(max=call.clip_high),
        torch.where(adv < 0, log_ratio.clamp(min=-call.clip_low), log_ratio),
    )
    ratio = torch.exp(masked_mean(clipped_lr, mask, dim=1))  # [N] (prod_t clipped rho_it)^(1/|y_i|)
    seq_loss = -advantages * ratio  # GMPO §3: J = (1/G) sum_i A_i (prod_t rho_it)^(1/|y_i|)
    if is_weights is not None:
        w = is_weights.detach()
        log_w = torch.where(mask.bool(), torch.log(w), torch.zeros_like(w))  # a weight of 0 gives -inf -> 0
        seq_loss = seq_loss * torch.exp(log_w.sum(dim=1) / mask.sum(dim=1).clamp(min=1))
    seq_loss = seq_loss * (mask.sum(dim=1) > 0)  # a sequence with no loss tokens adds nothing (not -A_i)
    loss = seq_loss.sum() / (num_sequences if num_sequences is not None else seq_loss.shape[0])
    clipped = _clip_binds(log_ratio.detach(), adv, -call.clip_low, call.clip_high)
    seq_ratio = torch.exp(masked_mean(log_ratio.detach(), mask, dim=1))
    return loss, _metrics(clipped, mask, seq_ratio)


# ----------------------------------------------------------------------------------
# The rollout engine's likelihoods against the trainer's (GSPO paper §5.4)
# ----------------------------------------------------------------------------------
ENGINE_MISMATCH_TERMS = ("abs_diff_sum", "tokens", "abs_diff_max", "seq_abs_log_ratio_sum", "sequences")


def engine_mismatch_terms(
    logprobs: torch.Tensor,  # [N, T] trainer log pi_theta of the sampled tokens, before any update
    engine_logprobs: torch.Tensor,  # [N, T] the engine's log-probs of the same tokens (after temperature)
    mask: torch.Tensor,  # [N, T]
) -> torch.Tensor:  # [5] in ENGINE_MISMATCH_TERMS order: sums (and a max) that add up over micro-batches / ranks
    """|log pi_trainer - log pi_engine| per token, and GSPO's |length-normalised sequence log-ratio| (Eq. 7)."""
    mask = mask.to(logprobs.dtype)
    diff = (logprobs.detach() - engine_logprobs) * mask  # [N, T]
    seq = sequence_log_ratio(logprobs.detach(), engine_logprobs, mask)  # [N] Eq. 7 with pi_old := pi_engine
    has_tokens = mask.sum(dim=1) > 0
    return torch.stack(
        [
            diff.abs().sum(),
            mask.sum(),
            diff.abs().max() if diff.numel() else diff.new_zeros(()),
            seq.abs()[has_tokens].sum(),
            has_tokens.sum().to(diff.dtype),
        ]
    )


def engine_is_weights(
    old_logprobs: torch.Tensor,  # [N, T] log pi_old (the trainer's)
    engine_logprobs: torch.Tensor,  # [N, T] log pi_engine, the distribution the tokens were sampled from
    mask: torch.Tensor,  # [N, T]
    *,
    mode: str,
    cap: float,
    max_log_ratio: float = 20.0,
) -> torch.Tensor:  # [N, T] weights, 0 off the mask
    """Truncated importance weights for the engine/trainer mismatch (sampled from pi_engine, optimised
    against pi_old): 'token_truncate' min(pi_old/pi_engine, cap) per token; 'sequence_truncate'
    min(s, cap) with s the length-normalised sequence ratio (Eq. 7's form); 'sequence_mask' 1 where
    1/cap <= s <= cap, else 0."""
    mask = mask.to(old_logprobs.dtype)
    if mode == "token_truncate":
        log_w = (old_logprobs - engine_logprobs).clamp(-max_log_ratio, max_log_ratio)
        return torch.exp(log_w).clamp(max=cap) * mask
    log_s = sequence_log_ratio(old_logprobs, engine_logprobs, mask).clamp(-max_log_ratio, max_log_ratio)  # [N]
    if mode == "sequence_truncate":
        return torch.exp(log_s).clamp(max=cap)[:, None] * mask
    if mode == "sequence_mask":
        return (log_s.abs() <= math.log(cap)).to(mask.dtype)[:, None] * mask
    raise ValueError(f"engine IS correction {mode!r} is not one of token_truncate, sequence_truncate, sequence_mask")


# ----------------------------------------------------------------------------------
# KL to the reference model, and its adaptive coefficient (seed §2.4, §5.4)
# ----------------------------------------------------------------------------------
def kl_per_token(
    logprobs: torch.Tensor,  # [N, T] log pi_theta
    ref_logprobs: torch.Tensor,  # [N, T] log pi_ref
    estimator: str = "k3",
    max_log_ratio: float = 20.0,
) -> torch.Tensor:  # [N, T]
    """Schulman's estimators of KL(pi_theta || pi_ref) from samples of pi_theta."""
    log_r = (ref_logprobs.detach() - logprobs).clamp(-max_log_ratio, max_log_ratio)  # log(pi_ref / pi_theta)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.exp(log_r) - log_r - 1
    raise ValueError(f"KL estimator {estimator!r} is not one of {list(KL_ESTIMATORS)}")


def kl_penalty(
    logprobs: torch.Tensor,  # [N, T]
    ref_logprobs: torch.Tensor,  # [N, T]
    mask: torch.Tensor,  # [N, T]
    estimator: str = "k3",
    num_tokens: Optional[float] = None,
) -> torch.Tensor:
    """Masked mean over all completion tokens of the per-token KL estimate."""
    kl = kl_per_token(logprobs, ref_logprobs, estimator)
    return aggregate(kl, mask, "token-mean", num_tokens=num_tokens)


class FixedKLController:
    """Constant KL coefficient, with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): err = clip(kl / target - 1, -0.2, 0.2); coef *= 1 + err * n / horizon."""

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):  # a skipped non-finite update says nothing about the KL
            return
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


# ----------------------------------------------------------------------------------
# A critic: rewards per token, GAE, the value loss (PPO; VAPO arXiv 2504.05118 §4)
# ----------------------------------------------------------------------------------
def place_sequence_rewards(
    rewards: torch.Tensor,  # [N] one scalar per completion
    mask: torch.Tensor,  # [N, T] loss mask: 1 on the policy's tokens (may have holes)
) -> torch.Tensor:  # [N, T]
    """The sequence reward on the policy's last token (the EOS when there is one), as verl, OpenRLHF and
    NeMo-RL place it; 0 elsewhere. A completion without policy tokens gets nothing."""
    t = torch.arange(mask.shape[1], device=mask.device)  # [T]
    last = torch.where(mask.bool(), t, -1).amax(dim=1) if mask.shape[1] else mask.new_full((mask.shape[0],), -1)
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    has = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    out[rows, last[has]] = rewards[has]
    return out


def gae_advantages(
    token_rewards: torch.Tensor,  # [N, T] r_t
    values: torch.Tensor,  # [N, T] V(s_t), no grad
    mask: torch.Tensor,  # [N, T] loss mask: 1 on the policy's tokens (right-padded, may have holes)
    gamma: float,
    lam,  # float, or [N] one lambda per sequence (length-adaptive GAE)
) -> tuple[torch.Tensor, torch.Tensor]:  # (advantages [N, T], returns [N, T]), 0 off the mask
    """GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1},
    with V = 0 and A = 0 after the last policy token; returns = A + V. t+1 is the next token *on the mask*:
    tokens the policy did not produce (a tool's output) are skipped, as if the episode went on from there."""
    mask = mask.to(values.dtype)
    values = values.detach() * mask
    lam = torch.as_tensor(lam, dtype=values.dtype, device=values.device).expand(values.shape[0])  # [N]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # [N] V and A of the next *policy* token
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        on = mask[:, t].bool()
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]  # TD error
        adv = delta + gamma * lam * next_adv  # A_t
        advantages[:, t] = adv * mask[:, t]
        # Off the mask (padding, or tokens the policy did not produce) the recursion passes through unchanged.
        next_adv = torch.where(on, adv, next_adv)
        next_value = torch.where(on, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:  # [N]
    """VAPO Eq. 5: lambda_policy = 1 - 1 / (alpha * l), clamped to [0, 1] (alpha * l < 1 would give < 0)."""
    lengths = lengths.to(torch.float64)
    return (1.0 - 1.0 / (alpha * lengths)).clamp(0.0, 1.0).to(torch.float32)  # Eq. 5


def value_loss(
    values: torch.Tensor,  # [N, T] V_phi, requires grad
    old_values: torch.Tensor,  # [N, T] V at rollout time, no grad
    returns: torch.Tensor,  # [N, T] GAE returns, no grad
    mask: torch.Tensor,  # [N, T]
    clip_range: float,
    num_tokens: Optional[float] = None,
) -> tuple[torch.Tensor, dict]:
    """0.5 * masked mean of max((V - R)^2, (clip(V, V_old +- c) - R)^2) (PPO's clipped value loss).
    metrics: value_clip_fraction (tokens where the clipped term is the larger) and explained_variance
    1 - Var(R - V) / Var(R) over the masked tokens."""
    mask = mask.to(values.dtype)
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_err, clipped_err)  # [N, T]
    denom = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
    loss = masked_sum(per_token, mask) / denom
    on = mask.bool()
    residual, target = (returns - values.detach())[on], returns[on]
    var_r = target.var(unbiased=False) if target.numel() else target.new_zeros(())
    explained = 1.0 - residual.var(unbiased=False) / var_r if var_r > 0 else var_r.new_tensor(float("nan"))
    metrics = {
        "value_clip_fraction": masked_mean((clipped_err > unclipped_err).to(mask.dtype), mask).detach(),
        "explained_variance": explained.detach(),
    }
    return loss, metrics


def positive_example_nll(
    logprobs: torch.Tensor,  # [N, T] log pi_theta, requires grad
    mask: torch.Tensor,  # [N, T]
    positive: torch.Tensor,  # [N] bool: the completion counts as correct
    num_tokens: Optional[float] = None,
) -> torch.Tensor:
    """VAPO Eq. 9: -sum of log pi over the tokens of the positive samples / their token count (0 if none)."""
    keep = mask.to(logprobs.dtype) * positive.to(logprobs.dtype)[:, None]
    denom = num_tokens if num_tokens is not None else keep.sum().clamp(min=1)
    return -masked_sum(logprobs, keep) / denom  # Eq. 9


# ----------------------------------------------------------------------------------
# Evaluation: pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code")
# ----------------------------------------------------------------------------------
def pass_at_k(
    num_samples: torch.Tensor,  # [P] n: completions sampled per prompt
    num_correct: torch.Tensor,  # [P] c: of them correct
    k: int,
) -> torch.Tensor:  # [P] float64
    """The unbiased pass@k estimator per prompt, 1 - C(n - c, k) / C(n, k)   (Chen et al. 2021, Eq. 1),
    as the product 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which never forms the large binomials;
    1 where n - c < k (every k-subset holds a correct one). Needs k <= n."""
    n, c = num_samples.to(torch.float64), num_correct.to(torch.float64)
    if k < 1 or bool((n < k).any()) or bool((c > n).any()) or bool((c < 0).any()):
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n; got k={k}, n={n.tolist()}, c={c.tolist()}")
    width = int(c.max().item()) if c.numel() else 0
    i = (n - c)[:, None] + torch.arange(1, width + 1, dtype=torch.float64)[None, :]  # [P, max c]: n-c+1 .. n-c+max c
    factors = torch.where(i <= n[:, None], 1.0 - k / i, torch.ones_like(i))  # only i <= n take part
    estimate = 1.0 - factors.prod(dim=1)  # Eq. 1
    return torch.where(n - c < k, torch.ones_like(n), estimate)
