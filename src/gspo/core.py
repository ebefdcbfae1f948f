"""The math of GSPO, GSPO-token and GRPO as pure tensor functions. No model, no I/O.

Equation numbers refer to the GSPO paper (Zheng et al., 2025,
arXiv 2507.18071). Notation: N sequences (prompts x group), T completion positions,
`mask[i, t] = 1` on the completion tokens of sequence i (EOS included, padding excluded).

Departures from the paper, on purpose:
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
from typing import Optional

import torch

IMPORTANCE_LEVELS = ("sequence", "sequence_token", "token")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")

# (eps_low, eps_high) recommended per level: GSPO paper §5.1 for the sequence levels,
# the usual PPO/GRPO 0.2 for token level.
_RECOMMENDED_CLIP = {"sequence": (3e-4, 4e-4), "sequence_token": (3e-4, 4e-4), "token": (0.2, 0.2)}


def recommended_clip_range(level: str) -> tuple[float, float]:
    _check_level(level)
    return _RECOMMENDED_CLIP[level]


def _check_level(level: str) -> None:
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance sampling level {level!r} is not one of {list(IMPORTANCE_LEVELS)}")


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
) -> torch.Tensor:
    """Reduce per-token losses to a scalar (verl's mode names).

    seq-mean-token-mean: (1/N) sum_i (1/|y_i|) sum_t l_it   (GRPO paper; GSPO Eq. 5/14)
    token-mean:          (1/sum_i |y_i|) sum_i sum_t l_it    (DAPO)
    seq-mean-token-sum:  (1/N) sum_i sum_t l_it              (the seed's token-level loss)
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
    raise ValueError(f"loss aggregation {mode!r} is not one of {list(AGGREGATIONS)}")


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
    # The clip binds (and the gradient vanishes) only on the side the advantage pushes towards.
    clipped = ((ratio > 1 + clip_high) & (advantages > 0)) | ((ratio < 1 - clip_low) & (advantages < 0))
    return -torch.min(surr, surr_clipped), clipped


def _check_loss_inputs(logprobs, old_logprobs, advantages, mask, *, level, aggregation) -> str:
    _check_level(level)
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
            "level 'sequence' (GSPO, Eq. 5) takes one advantage per sequence [N]; "
            "use level 'sequence_token' (Eq. 13) for per-token advantages"
        )
    if level == "token":
        aggregation = aggregation or "seq-mean-token-mean"
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"loss aggregation {aggregation!r} is not one of {list(AGGREGATIONS)}")
        return aggregation
    if aggregation not in (None, "seq-mean-token-mean"):
        raise ValueError(
            f"level {level!r} is defined per sequence (Eq. 5 / Eq. 14: mean over sequences); "
            f"aggregation must be None or 'seq-mean-token-mean', got {aggregation!r}"
        )
    return "seq-mean-token-mean"


def policy_loss(
    logprobs: torch.Tensor,  # [N, T] log pi_theta(y_t | x, y_<t), requires grad
    old_logprobs: torch.Tensor,  # [N, T] log pi_old, no grad
    advantages: torch.Tensor,  # [N] per sequence, or [N, T] per token
    mask: torch.Tensor,  # [N, T] 1 on completion tokens
    *,
    level: str = "sequence",
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    aggregation: Optional[str] = None,
    max_log_ratio: float = 20.0,
    num_sequences: Optional[float] = None,
    num_tokens: Optional[float] = None,
    is_weights: Optional[torch.Tensor] = None,  # [N, T] engine-mismatch weights (engine_is_weights), no grad
) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss for GSPO ('sequence'), GSPO-token or GRPO ('token'). `is_weights` scale
    each token's surrogate (sequence level: each sequence's, by their mean); denominators are unchanged.

    Returns (loss, metrics); metrics are detached: clip_fraction_seq (mean over sequences
    of the fraction of a sequence's tokens clipped; for GSPO a 0/1 flag per sequence),
    clip_fraction_token (clipped tokens / all tokens, the paper's Fig. 2 count), and
    the importance ratio's mean / min / max over sequences.
    """
    mode = _check_loss_inputs(logprobs, old_logprobs, advantages, mask, level=level, aggregation=aggregation)
    mask = mask.to(logprobs.dtype)
    old_logprobs = old_logprobs.detach()
    if level == "token":
        log_ratio = (logprobs - old_logprobs).clamp(-max_log_ratio, max_log_ratio)
        ratio = torch.exp(log_ratio)  # [N, T] r_it = pi_theta / pi_old per token
        adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(ratio)
        token_loss, clipped = clipped_surrogate(ratio, adv, clip_low, clip_high)
        token_loss = token_loss if is_weights is None else token_loss * is_weights.detach()
        loss = aggregate(token_loss, mask, mode, num_sequences, num_tokens)
        seq_ratio = masked_mean(ratio.detach(), mask, dim=1)
    else:
        log_s = sequence_log_ratio(logprobs, old_logprobs, mask).clamp(-max_log_ratio, max_log_ratio)  # Eq. 7
        if level == "sequence":
            ratio = torch.exp(log_s)  # [N] s_i(theta)
            seq_loss, seq_clipped = clipped_surrogate(ratio, advantages, clip_low, clip_high)  # Eq. 5
            if is_weights is not None:
                seq_loss = seq_loss * masked_mean(is_weights.detach(), mask, dim=1)
            loss = seq_loss.sum() / (num_sequences if num_sequences is not None else seq_loss.shape[0])
            clipped = seq_clipped[:, None].expand_as(mask)
        else:
            # Eq. 13: s_it = sg[s_i] * pi_theta(y_t) / sg[pi_theta(y_t)] -> value s_i, gradient per token
            ratio = torch.exp(log_s.detach()[:, None] + logprobs - logprobs.detach())  # [N, T]
            adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(ratio)
            token_loss, clipped = clipped_surrogate(ratio, adv, clip_low, clip_high)
            token_loss = token_loss if is_weights is None else token_loss * is_weights.detach()
            loss = aggregate(token_loss, mask, "seq-mean-token-mean", num_sequences)  # Eq. 14
        seq_ratio = torch.exp(log_s.detach())
    clipped = clipped.to(mask.dtype)
    metrics = {
        "clip_fraction_seq": masked_mean(clipped, mask, dim=1).mean().detach(),
        "clip_fraction_token": masked_mean(clipped, mask).detach(),
        "ratio_mean": seq_ratio.mean(),
        "ratio_min": seq_ratio.min(),
        "ratio_max": seq_ratio.max(),
    }
    return loss, metrics


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
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


# ----------------------------------------------------------------------------------
# A critic: rewards per token, GAE, the value loss (PPO; VAPO arXiv 2504.05118 §4)
# ----------------------------------------------------------------------------------
def place_sequence_rewards(
    rewards: torch.Tensor,  # [N] one scalar per completion
    mask: torch.Tensor,  # [N, T] 1 on completion tokens, EOS included
) -> torch.Tensor:  # [N, T]
    """The sequence reward on the last completion token (the EOS when there is one), as verl, OpenRLHF and
    NeMo-RL place it; 0 elsewhere. A completion without tokens gets nothing."""
    lengths = mask.sum(dim=1).long()  # [N]
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    has = lengths > 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    out[rows, lengths[has] - 1] = rewards[has]
    return out


def gae_advantages(
    token_rewards: torch.Tensor,  # [N, T] r_t
    values: torch.Tensor,  # [N, T] V(s_t), no grad
    mask: torch.Tensor,  # [N, T] 1 on completion tokens (right-padded)
    gamma: float,
    lam,  # float, or [N] one lambda per sequence (length-adaptive GAE)
) -> tuple[torch.Tensor, torch.Tensor]:  # (advantages [N, T], returns [N, T]), 0 off the mask
    """GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1},
    with V = 0 and A = 0 after the last completion token; returns = A + V."""
    mask = mask.to(values.dtype)
    values = values.detach() * mask
    lam = torch.as_tensor(lam, dtype=values.dtype, device=values.device).expand(values.shape[0])  # [N]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # [N]
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]  # TD error
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]  # A_t; 0 on padding, so the end restarts
        advantages[:, t] = next_adv
        next_value = values[:, t]
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
# Token log-probs and entropy from logits, one chunk of the vocabulary at a time
# ----------------------------------------------------------------------------------
class _LabelLogprob(torch.autograd.Function):
    """log p(label) with the entropy as a by-product; backward recomputes the softmax from the saved
    logits (a view: no [C, V] tensor is stored) and writes the gradient in place, without the
    zero-filled [C, V] buffer that gather's backward allocates. The entropy gets a gradient only
    when asked (entropy_grad): then H is saved too, one value per row."""

    @staticmethod
    def forward(ctx, logits, labels, with_entropy: bool, entropy_grad: bool):  # [C, V], [C]
        with torch.autocast(logits.device.type, enabled=False):  # float32 math even under bf16 autocast
            logp, lse, entropy = _logsumexp_pass(logits, labels, with_entropy)
        ctx.save_for_backward(logits, labels, lse, entropy if entropy_grad else None)
        if entropy is not None and not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):  # [C], [C] or None
        logits, labels, lse, entropy = ctx.saved_tensors
        dtype = _math_dtype(logits)
        upcast = dtype != logits.dtype  # then logits[rows].to(dtype) is our own copy: work on it in place
        grad = torch.empty_like(logits)  # [C, V] in the logits' dtype
        g = grad_logp[:, None].to(dtype)  # [C, 1]
        gh = grad_entropy[:, None].to(dtype) if entropy is not None and grad_entropy is not None else None
        for rows in _row_blocks(logits):
            z = logits[rows].to(dtype)  # [b, V]
            logp_all = z.sub_(lse[rows]) if upcast else z - lse[rows]  # [b, V] log p_v
            if gh is None:
                block = logp_all.exp_().mul_(-g[rows])  # d log p_y / d z_v = 1[v = y] - p_v
            else:  # d H / d z_v = -p_v (log p_v + H)
                p = logp_all.exp()
                block = logp_all.add_(entropy[rows, None]).mul_(gh[rows]).add_(g[rows]).mul_(p).neg_()
            block.scatter_add_(1, labels[rows, None], g[rows])
            grad[rows] = block
        return grad, None, None, None


def _logsumexp_pass(logits, labels, with_entropy: bool):
    """[C, V] -> ([C] log p(label), [C, 1] logsumexp, [C] entropy or None), float32 math or better.

    A block of rows at a time: the float32 temporaries of one block stay in cache and are reused,
    where whole-chunk [C, V] buffers each cost a pass through memory plus page faults on first touch."""
    dtype = _math_dtype(logits)
    upcast = dtype != logits.dtype  # then logits[rows].to(dtype) is our own copy: work on it in place
    z_label = logits.gather(-1, labels[:, None]).to(dtype)  # [C, 1]
    lse, entropy = torch.empty_like(z_label), (torch.empty_like(z_label) if with_entropy else None)
    for rows in _row_blocks(logits):
        z = logits[rows].to(dtype)  # [b, V]: our copy when upcast, else a view of the caller's logits
        m = z.amax(dim=-1, keepdim=True)  # [b, 1]
        centered = z.sub_(m) if upcast else z - m  # [b, V] <= 0
        e = centered.exp() if with_entropy else centered.exp_()  # [b, V] softmax numerators
        s = e.sum(dim=-1, keepdim=True)  # [b, 1]
        lse[rows] = m + s.log()  # logsumexp z
        if with_entropy:  # H = log s - sum_v e_v (z_v - m) / s: centred, so no cancellation against m
            dot = e.mul_(centered).sum(dim=-1, keepdim=True)  # [b, 1] (e is not needed after s)
            entropy[rows] = s.log() - dot / s
    logp = (z_label - lse).squeeze(-1)  # [C]  log p(label) = z_y - logsumexp z
    return logp, lse, (entropy.squeeze(-1) if entropy is not None else None)


def _math_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half-precision logits; float32 and float64 (gradcheck) stay as they are."""
    return torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype


_BLOCK_BYTES = 1 << 20  # float32 bytes per row block on CPU: 8 rows at V = 32768, cache-resident


def _row_blocks(logits: torch.Tensor) -> list:
    """Row slices of [C, V] logits. On CPU, blocks of ~1 MiB of float32 (at least 2 rows): measured
    4x faster than whole-chunk temporaries at [1024, 32768]. Elsewhere one block: a GPU has the
    bandwidth, and each block would cost kernel launches."""
    n, vocab = logits.shape
    rows = n if logits.device.type != "cpu" else max(2, _BLOCK_BYTES // (4 * max(vocab, 1)))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def label_logprob(logits: torch.Tensor, labels: torch.Tensor, with_entropy: bool = False, entropy_grad: bool = False):
    """[C, V] logits, [C] labels -> ([C] log p(label) with grad, [C] entropy or None).

    The entropy (with_entropy) has no gradient unless entropy_grad. Low-precision logits are computed
    in float32. Autograd keeps only the logits (a view) and one or two values per row."""
    return _LabelLogprob.apply(logits, labels, with_entropy or entropy_grad, entropy_grad)


def logprobs_and_entropy(
    logits: torch.Tensor,  # [N, T, V] logits predicting labels
    labels: torch.Tensor,  # [N, T] token ids
    chunk_size: int = 1024,
    with_entropy: bool = True,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log p(label) [N, T] and entropy [N, T] or None, `chunk_size` rows at a time; the entropy
    has a gradient when entropy_grad. Autograd keeps the logits (views) and one logsumexp (and entropy)
    per position: backward recomputes each chunk's softmax, never holding [N*T, V] probabilities."""
    n, t, v = logits.shape
    flat_logits, flat_labels = logits.reshape(n * t, v), labels.reshape(n * t)
    lps, ents = [], []
    # split, not slicing: a slice's backward zero-fills a full-size gradient per chunk.
    for chunk, lab in zip(flat_logits.split(chunk_size), flat_labels.split(chunk_size)):
        lp, ent = label_logprob(chunk, lab, with_entropy=with_entropy, entropy_grad=with_entropy and entropy_grad)
        lps.append(lp)
        ents.append(ent)
    logp = torch.cat(lps).view(n, t)
    return logp, (torch.cat(ents).view(n, t) if with_entropy else None)
