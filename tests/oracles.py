"""Slow, obviously correct loop versions of gspo.core, used as test oracles.

Each function loops over sequences and tokens with Python scalars / 0-d tensors, written
straight from the equations of DESIGN.md §2 (GSPO paper Eq. 5, 6, 7, 13, 14), so that a
vectorisation mistake in gspo.core cannot hide in the oracle too. They operate on torch
0-d tensors so that torch.autograd.grad works through them.
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
    logprobs, old_logprobs, advantages, mask, clip_low, clip_high, aggregation, num_sequences=None, num_tokens=None
):
    """GRPO token level: r_it = pi/pi_old per token, sequence advantage on each token."""
    n, t = logprobs.shape
    per_seq = []
    all_tokens = logprobs.new_zeros(())
    count = 0
    for i in range(n):
        seq_sum = logprobs.new_zeros(())
        length = 0
        for j in range(t):
            if mask[i, j]:
                r = torch.exp(logprobs[i, j] - old_logprobs[i, j].detach())
                a = advantages[i] if advantages.dim() == 1 else advantages[i, j]
                l_it = _surrogate(r, a, clip_low, clip_high)
                seq_sum = seq_sum + l_it
                all_tokens = all_tokens + l_it
                length += 1
        count += length
        per_seq.append((seq_sum, length))
    n_seq = num_sequences if num_sequences is not None else n
    if aggregation == "seq-mean-token-mean":
        return sum((s / ln if ln else s) for s, ln in per_seq) / n_seq
    if aggregation == "seq-mean-token-sum":
        return sum(s for s, _ in per_seq) / n_seq
    if aggregation == "token-mean":
        return all_tokens / (num_tokens if num_tokens is not None else max(count, 1))
    raise ValueError(aggregation)


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
