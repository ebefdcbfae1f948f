"""Shared by the gspo.core tests: random batches with padding garbage (and a hole), the loop oracles by level,
tolerances."""

from __future__ import annotations

import torch
from oracles import gspo_loss_loop, gspo_token_loss_loop, token_loss_loop

from gspo.core import policy_loss

F64 = torch.float64
LEVELS = ("sequence", "sequence_token", "token")
AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
# every (level, aggregation) pair policy_loss accepts
LEVEL_AGGS = [("sequence", None), ("sequence_token", None)] + [("token", a) for a in AGGS]


def close(actual, expected, atol=1e-12, rtol=0.0):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), atol=atol, rtol=rtol
    )


def random_batch(seed, n=6, t=7, scale=0.05, min_len=1, dtype=F64):
    """Random float64 logprobs / old logprobs, unequal lengths (right padding), [N] advantages.

    Padding positions hold garbage (large values) so that any leak of padding shows.
    """
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=g, dtype=dtype) * 3
    logprobs = old + scale * torch.randn(n, t, generator=g, dtype=dtype)
    lengths = torch.randint(min_len, t + 1, (n,), generator=g)
    lengths[0] = t  # at least one full row
    lengths[-1] = min_len  # at least one short row
    mask = torch.arange(t)[None, :] < lengths[:, None]
    logprobs = torch.where(mask, logprobs, torch.full_like(logprobs, 7.0))
    old = torch.where(mask, old, torch.full_like(old, -30.0))
    adv = torch.randn(n, generator=g, dtype=dtype)
    return logprobs.requires_grad_(), old, adv, mask


def holed_batch(seed, **kw):
    """random_batch with a hole in the loss mask of the full first row (as an environment's tokens inside a
    multi-turn episode), garbage in the hole like in the padding."""
    lp, old, adv, mask = random_batch(seed, **kw)
    mask = mask.clone()
    mask[0, 2] = False
    lp = torch.where(mask, lp.detach(), torch.full_like(lp, 7.0)).requires_grad_()
    old = torch.where(mask, old, torch.full_like(old, -30.0))
    return lp, old, adv, mask


def loss_and_grad(logprobs, *args, objective=policy_loss, **kwargs):
    loss, metrics = objective(logprobs, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss.detach(), grad, metrics


def oracle(level, agg, logprobs, old, adv, mask, lo, hi, **kw):
    if level == "sequence":
        return gspo_loss_loop(logprobs, old, adv, mask, lo, hi, **kw)
    if level == "sequence_token":
        adv2 = adv if adv.dim() == 2 else adv[:, None].expand_as(logprobs)
        return gspo_token_loss_loop(logprobs, old, adv2, mask, lo, hi, **kw)
    return token_loss_loop(logprobs, old, adv, mask, lo, hi, agg or "seq-mean-token-mean", **kw)


def oracle_and_grad(level, agg, logprobs, old, adv, mask, lo, hi, **kw):
    loss = oracle(level, agg, logprobs, old, adv, mask, lo, hi, **kw)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss.detach(), grad
