"""Slow, obviously correct loop versions of gspo.core, used as test oracles.

Each function loops over sequences and tokens with Python scalars / 0-d tensors, written
straight from the equations of DESIGN.md §2 (GSPO paper Eq. 5, 6, 7, 13, 14) and §2c (CISPO, SAPO,
GMPO, Dr. GRPO's aggregation), so that a vectorisation mistake in gspo.core cannot hide in the oracle too.
They operate on torch 0-d tensors so that torch.autograd.grad works through them.
"""

from __future__ import annotations

import math

import torch


def group_advantages_loop(rewards, group_size, normalize, eps=1e-8):
    """Python floats only. Sample std (divide by G-1); equal rewards -> exactly 0."""
    rewards = [float(r) for r in rewards]
    out = []
    for g in range(0, len(rewards), group_size):
        grp = rewards[g : g + group_size]
        if all(r == grp[0] for r in grp):
            out.extend([0.0] * len(grp))
            continue
        mean = sum(grp) / len(grp)
        if normalize:
            var = sum((r - mean) ** 2 for r in grp) / (len(grp) - 1)
            std = math.sqrt(var)
            out.extend([(r - mean) / (std + eps) for r in grp])
        else:
            out.extend([r - mean for r in grp])
    return out


def _clip(x, lo, hi):
    return torch.clamp(x, lo, hi)


def _surrogate(ratio, adv, clip_low, clip_high):
    """-min(r A, clip(r, 1-lo, 1+hi) A) for 0-d tensors."""
    return -torch.minimum(ratio * adv, _clip(ratio, 1 - clip_low, 1 + clip_high) * adv)


def _length(mask_row):
    return int(sum(int(m) for m in mask_row.tolist()))


def gspo_loss_loop(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, num_sequences=None):
    """GSPO, Eq. 5 + Eq. 7: one term per sequence, mean over sequences."""
    n, t = logprobs.shape
    total = logprobs.new_zeros(())
    for i in range(n):
        length = _length(mask[i])
        log_s = logprobs.new_zeros(())
        for j in range(t):
            if mask[i, j]:
                log_s = log_s + (logprobs[i, j] - old_logprobs[i, j].detach())
        if length > 0:
            log_s = log_s / length
        s = torch.exp(log_s)  # Eq. 7
        total = total + _surrogate(s, advantages[i], clip_low, clip_high)  # Eq. 5
    return total / (num_sequences if num_sequences is not None else n)


def gspo_token_loss_loop(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, num_sequences=None):
    """GSPO-token, Eq. 13 + Eq. 14, with per-token advantages advantages[i, j].

    s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)] = exp(sg[log s_i] + logp_t - sg[logp_t]).
    """
    n, t = logprobs.shape
    total = logprobs.new_zeros(())
    for i in range(n):
        length = _length(mask[i])
        if length == 0:
            continue
        log_s = 0.0
        for j in range(t):
            if mask[i, j]:
                log_s += logprobs[i, j].item() - old_logprobs[i, j].item()
        log_s /= length
        seq_term = logprobs.new_zeros(())
        for j in range(t):
            if mask[i, j]:
                s_it = math.exp(log_s) * torch.exp(logprobs[i, j] - logprobs[i, j].detach())  # Eq. 13
                seq_term = seq_term + _surrogate(s_it, advantages[i, j], clip_low, clip_high)
        total = total + seq_term / length  # Eq. 14
    return total / (num_sequences if num_sequences is not None else n)


def token_loss_loop(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    clip_low,
    clip_high,
    aggregation,
    num_sequences=None,
    num_tokens=None,
    norm_length=None,
):
    """GRPO token level: r_it = pi/pi_old per token, sequence advantage on each token."""

    def token_loss(i, j):
        r = torch.exp(logprobs[i, j] - old_logprobs[i, j].detach())
        return _surrogate(r, _advantage(advantages, i, j), clip_low, clip_high)

    return _aggregate_loop(token_loss, mask, aggregation, num_sequences, num_tokens, norm_length)


def _advantage(advantages, i, j):
    return advantages[i] if advantages.dim() == 1 else advantages[i, j]


def _aggregate_loop(token_loss, mask, aggregation, num_sequences=None, num_tokens=None, norm_length=None):
    """Sum token_loss(i, j) over the mask, one sequence at a time, and reduce as `aggregation` says."""
    n, t = mask.shape
    per_seq = []
    for i in range(n):
        seq_sum, length = 0.0, 0
        for j in range(t):
            if mask[i, j]:
                seq_sum = seq_sum + token_loss(i, j)
                length += 1
        per_seq.append((seq_sum, length))
    n_seq = num_sequences if num_sequences is not None else n
    total = sum(s for s, _ in per_seq)
    if aggregation == "seq-mean-token-mean":
        return sum((s / ln if ln else s) for s, ln in per_seq) / n_seq
    if aggregation == "seq-mean-token-sum":
        return total / n_seq
    if aggregation == "token-mean":
        return total / (num_tokens if num_tokens is not None else max(sum(ln for _, ln in per_seq), 1))
    if aggregation == "seq-mean-token-sum-norm":  # Dr. GRPO: token sums over a constant L, mean over sequences
        return total / (n_seq * norm_length)
    raise ValueError(aggregation)


def cispo_loss_loop(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    clip_low,
    clip_high,
    aggregation,
    num_sequences=None,
    num_tokens=None,
    norm_length=None,
):
    """CISPO (MiniMax-M1 Eq. 4): l_it = -min(max(r_it, 1 - eps_low), 1 + eps_high) A_it log pi_it, where the
    clipped weight is a Python float (no gradient) and log pi_it keeps its gradient on every token."""

    def token_loss(i, j):
        r = math.exp(logprobs[i, j].item() - old_logprobs[i, j].item())
        weight = min(max(r, 1 - clip_low), 1 + clip_high)
        return -weight * float(_advantage(advantages, i, j)) * logprobs[i, j]

    return _aggregate_loop(token_loss, mask, aggregation, num_sequences, num_tokens, norm_length)


def sapo_loss_loop(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    tau_pos,
    tau_neg,
    aggregation,
    num_sequences=None,
    num_tokens=None,
    norm_length=None,
):
    """SAPO: l_it = -f(r_it) A_it, f(r) = 4 / (tau (1 + exp(-tau (r - 1)))), tau = tau_pos if A_it > 0 else tau_neg."""

    def token_loss(i, j):
        a = float(_advantage(advantages, i, j))
        tau = tau_pos if a > 0 else tau_neg
        r = torch.exp(logprobs[i, j] - old_logprobs[i, j].detach())
        gate = 4.0 / (tau * (1.0 + torch.exp(-tau * (r - 1.0))))
        return -gate * a

    return _aggregate_loop(token_loss, mask, aggregation, num_sequences, num_tokens, norm_length)


def gmpo_loss_loop(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, num_sequences=None):
    """GMPO: l_i = -A_i exp(mean_t c_it); c_it is the token log-ratio, replaced by the constant eps_high when
    A_i > 0 and it is above eps_high, by -eps_low when A_i < 0 and it is below -eps_low. Mean over sequences."""
    n, t = logprobs.shape
    total = logprobs.new_zeros(())
    for i in range(n):
        a = float(advantages[i])
        log_sum, length = logprobs.new_zeros(()), 0
        for j in range(t):
            if mask[i, j]:
                lr = logprobs[i, j] - old_logprobs[i, j].detach()
                if a > 0 and lr.item() > clip_high:
                    lr = logprobs.new_tensor(clip_high)  # clipped: a constant, no gradient
                elif a < 0 and lr.item() < -clip_low:
                    lr = logprobs.new_tensor(-clip_low)
                log_sum = log_sum + lr
                length += 1
        ratio = torch.exp(log_sum / length) if length else logprobs.new_ones(())
        total = total - a * ratio
    return total / (num_sequences if num_sequences is not None else n)


def k3_loop(logprobs, ref_logprobs, mask):
    """Masked mean over all tokens of exp(ref - logp) - (ref - logp) - 1."""
    total, count = 0.0, 0
    for i in range(logprobs.shape[0]):
        for j in range(logprobs.shape[1]):
            if mask[i, j]:
                d = ref_logprobs[i, j].item() - logprobs[i, j].item()
                total += math.exp(d) - d - 1
                count += 1
    return total / max(count, 1)
