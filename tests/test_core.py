"""Tests of gspo.core: the math of GSPO, GSPO-token and GRPO against hand-computed values
(arithmetic in the comments) and against the slow loop oracles in tests/oracles.py.

Tolerances are tight on purpose: float64 comparisons use atol=1e-12 where the computation
is the same up to rounding, and 1e-7 against hand values written to 8 digits.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gspo import core
from gspo.core import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    group_advantages,
    kl_penalty,
    kl_per_token,
    logprobs_and_entropy,
    masked_mean,
    policy_loss,
)
from oracles import (
    group_advantages_loop,
    gspo_loss_loop,
    gspo_token_loss_loop,
    k3_loop,
    token_loss_loop,
)

F64 = torch.float64
LEVELS = ("sequence", "sequence_token", "token")
AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
# every (level, aggregation) pair policy_loss accepts
LEVEL_AGGS = [("sequence", None), ("sequence_token", None)] + [("token", a) for a in AGGS]


def close(actual, expected, atol=1e-12, rtol=0.0):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64),
                               torch.as_tensor(expected, dtype=F64), atol=atol, rtol=rtol)


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
    mask = (torch.arange(t)[None, :] < lengths[:, None])
    logprobs = torch.where(mask, logprobs, torch.full_like(logprobs, 7.0))
    old = torch.where(mask, old, torch.full_like(old, -30.0))
    adv = torch.randn(n, generator=g, dtype=dtype)
    return logprobs.requires_grad_(), old, adv, mask


def loss_and_grad(logprobs, *args, **kwargs):
    loss, metrics = policy_loss(logprobs, *args, **kwargs)
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


# ==================================================================================
# 1. group advantages (Eq. 6)
# ==================================================================================
def test_group_advantages_relative_hand():
    # group 1: mean([1,0,0,1]) = 0.5 -> [0.5,-0.5,-0.5,0.5]; group 2: all 2 -> 0
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2]), 4, normalize=False)
    close(adv, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], atol=0)


def test_group_advantages_normalized_hand_uses_sample_std():
    # sample std of [1,0,0,1]: sum sq dev = 4 * 0.25 = 1, / (G-1 = 3) -> var 1/3, std sqrt(1/3) = 0.57735027
    # 0.5 / (0.57735027 + 1e-8) = 0.86602539 (population std 0.5 would give 1.0)
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2]), 4, normalize=True)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-8)
    assert abs(a - 0.8660254) < 1e-7
    close(adv, [a, -a, -a, a, 0, 0, 0, 0], atol=1e-6)
    # [3,1,2] group 3: mean 2, devs [1,-1,0], var (1+1)/2 = 1, std 1 -> [1,-1,0]
    close(group_advantages(torch.tensor([3.0, 1.0, 2.0]), 3, normalize=True), [1, -1, 0], atol=1e-6)


def test_group_advantages_integer_rewards():
    adv = group_advantages(torch.tensor([1, 0, 0, 1]), 4, normalize=False)
    assert adv.is_floating_point()
    close(adv, [0.5, -0.5, -0.5, 0.5], atol=0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("values,dtype", [
    ([0.1] * 7, torch.float32),  # float32 mean of seven 0.1 is off by 7e-9, std 8e-9
    ([0.9] * 3, torch.float32),  # float32 mean off by 6e-8
    ([0.1] * 3, F64),  # float64 mean 0.10000000000000002
    ([5.0] * 4, torch.float32),
])
def test_group_advantages_equal_rewards_exactly_zero(values, dtype, normalize):
    r = torch.tensor(values, dtype=dtype)
    assert (r - r.mean() != 0).any() or values[0] == 5.0  # the naive formula would not be 0
    other = torch.tensor([0.0, 1.0] + [0.0] * (len(values) - 2), dtype=dtype)
    adv = group_advantages(torch.cat([r, other]), len(values), normalize=normalize)
    assert torch.isfinite(adv).all()
    assert (adv[: len(values)] == 0).all()  # exactly zero, not ~1e-8 or ~1 (1e-8 / 8e-9)
    assert (adv[len(values):] != 0).any()
    assert core.zero_std_groups(torch.cat([r, other]), len(values)).tolist() == [True, False]


def test_group_advantages_group_size_one_is_zero():
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0]), 1, normalize=True)
    assert (adv == 0).all() and torch.isfinite(adv).all()


@pytest.mark.parametrize("rewards,g", [(torch.ones(7), 4), (torch.ones(4), 0), (torch.ones(2, 4), 4)])
def test_group_advantages_bad_shape_raises(rewards, g):
    with pytest.raises(ValueError):
        group_advantages(rewards, g, normalize=True)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_group_advantages_matches_loop_oracle(seed, normalize):
    g = torch.Generator().manual_seed(seed)
    group = 2 + seed * 3  # 2, 5, 8
    rewards = torch.randn(group * 5, generator=g)
    rewards[:group] = 0.25  # one zero-variance group
    rewards[group:2 * group] = torch.randint(0, 2, (group,), generator=g).float()  # binary rewards
    expected = group_advantages_loop(rewards.tolist(), group, normalize)
    close(group_advantages(rewards, group, normalize), expected, atol=2e-6, rtol=1e-6)


# ==================================================================================
# 2. GSPO, level "sequence" (Eq. 5, 7)
# ==================================================================================
# Shared hand example: 2 sequences, T = 3, the second padded at t = 2 (garbage there).
HAND_LP = [[-1.0, -2.0, -0.5], [-0.3, -0.7, 9.0]]
HAND_OLD = [[-1.1, -2.0, -0.6], [-0.3, -0.9, -40.0]]
HAND_MASK = [[1, 1, 1], [1, 1, 0]]
HAND_ADV = [1.0, -1.0]
# log-ratio diffs: seq 0: [0.1, 0, 0.1] -> mean 0.2/3 -> s_0 = exp(0.0666667) = 1.06893911
#                  seq 1: [0, 0.2]      -> mean 0.1   -> s_1 = exp(0.1)       = 1.10517092
S0, S1 = math.exp(0.2 / 3), math.exp(0.1)


def hand_inputs():
    lp = torch.tensor(HAND_LP, dtype=F64, requires_grad=True)
    return lp, torch.tensor(HAND_OLD, dtype=F64), torch.tensor(HAND_ADV, dtype=F64), torch.tensor(HAND_MASK)


def test_hand_values_of_ratios():
    assert abs(S0 - 1.06893911) < 1e-8 and abs(S1 - 1.10517092) < 1e-8


def test_gspo_sequence_hand_unclipped():
    lp, old, adv, mask = hand_inputs()
    # eps = 0.2: both ratios inside [0.8, 1.2], nothing clipped.
    # J = (s_0 * 1 + s_1 * (-1)) / 2 = (1.06893911 - 1.10517092) / 2 = -0.01811590 -> loss 0.01811590
    loss, grad, m = loss_and_grad(lp, old, adv, mask, level="sequence", clip_low=0.2, clip_high=0.2)
    close(loss, (S1 - S0) / 2)
    close(loss, 0.01811590, atol=1e-8)
    # d loss / d logp_0t = -(1/2) * A_0 * s_0 / |y_0| = -s_0 / 6 = -0.17815652 on its 3 tokens
    # d loss / d logp_1t = -(1/2) * A_1 * s_1 / |y_1| = +s_1 / 4 = +0.27629273 on its 2 tokens, 0 on padding
    close(grad, [[-S0 / 6] * 3, [S1 / 4, S1 / 4, 0.0]])
    close(m["clip_fraction_seq"], 0.0, atol=0)
    close(m["clip_fraction_token"], 0.0, atol=0)
    close(m["ratio_mean"], (S0 + S1) / 2)
    close(m["ratio_min"], S0)
    close(m["ratio_max"], S1)


def test_gspo_sequence_hand_clipped_one_sequence():
    lp, old, adv, mask = hand_inputs()
    # paper eps: 1 - 3e-4 = 0.9997, 1 + 4e-4 = 1.0004.
    # seq 0: s_0 = 1.0689 > 1.0004 with A = +1 -> min(1.0689, 1.0004) = 1.0004, clipped, no gradient.
    # seq 1: s_1 = 1.1052 > 1.0004 but A = -1 -> min(-1.1052, -1.0004) = -1.1052, NOT clipped.
    # loss = -(1.0004 - 1.10517092) / 2 = 0.05238546
    loss, grad, m = loss_and_grad(lp, old, adv, mask, level="sequence", clip_low=3e-4, clip_high=4e-4)
    close(loss, -(1.0004 - S1) / 2)
    close(loss, 0.05238546, atol=1e-8)
    close(grad, [[0.0] * 3, [S1 / 4, S1 / 4, 0.0]])
    # per sequence: 1 of 2 sequences clipped -> 0.5; per token: seq 0's 3 tokens of 5 -> 0.6
    close(m["clip_fraction_seq"], 0.5, atol=0)
    close(m["clip_fraction_token"], 3 / 5, atol=1e-15)


def test_gspo_sequence_clip_low_side():
    lp, old, _, mask = hand_inputs()
    # swap roles: old <- logprobs, so s_0 = exp(-0.0667) = 0.93551 < 0.9997, s_1 = exp(-0.1) = 0.90484
    # A = [-1, +1]: seq 0 clipped below (A < 0): -min(-0.93551, -0.9997) = 0.9997;
    # seq 1 has A > 0, ratio below 1 - eps: min(0.90484, 0.9997) = 0.90484, not clipped.
    lp2 = old.clone().requires_grad_()
    old2 = lp.detach().clone()
    adv = torch.tensor([-1.0, 1.0], dtype=F64)
    loss, grad, m = loss_and_grad(lp2, old2, adv, mask, level="sequence", clip_low=3e-4, clip_high=4e-4)
    close(loss, (0.9997 - 1 / S1) / 2)
    close(grad, [[0.0] * 3, [-(1 / S1) / 4, -(1 / S1) / 4, 0.0]])
    close(m["clip_fraction_seq"], 0.5, atol=0)
    close(m["clip_fraction_token"], 0.6, atol=1e-15)


@pytest.mark.parametrize("clip", [(0.2, 0.2), (3e-4, 4e-4), (0.01, 0.02)])
@pytest.mark.parametrize("seed", range(3))
def test_gspo_sequence_matches_loop_oracle(seed, clip):
    lp, old, adv, mask = random_batch(seed, scale=0.02)
    loss, grad, _ = loss_and_grad(lp, old, adv, mask, level="sequence", clip_low=clip[0], clip_high=clip[1])
    e_loss, e_grad = oracle_and_grad("sequence", None, lp, old, adv, mask, *clip)
    close(loss, e_loss)
    close(grad, e_grad)


def test_gspo_sequence_oracle_covers_both_regimes():
    # the random batches above, with paper eps, clip some sequences and not others
    fracs = []
    for seed in range(3):
        lp, old, adv, mask = random_batch(seed, scale=0.02)
        _, m = policy_loss(lp, old, adv, mask, level="sequence", clip_low=3e-4, clip_high=4e-4)
        fracs.append(float(m["clip_fraction_seq"]))
    assert any(0 < f < 1 for f in fracs)


@pytest.mark.parametrize("level,agg", LEVEL_AGGS)
@pytest.mark.parametrize("huge", [1e4, -1e4])
def test_huge_log_ratio_stays_finite(level, agg, huge):
    lp, old, adv, mask = hand_inputs()
    lp = (lp.detach() + torch.tensor([[huge, 0, 0], [0, 0, 0]], dtype=F64)).requires_grad_()
    loss, grad, m = loss_and_grad(lp, old, adv, mask, level=level, aggregation=agg, clip_low=0.2, clip_high=0.2)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in m.values())
    # the clamp is at 20 in log space: no ratio beyond e^20
    assert float(m["ratio_max"]) <= math.exp(20.0) * (1 + 1e-12)


@pytest.mark.parametrize("level,agg", LEVEL_AGGS)
@pytest.mark.parametrize("clip", [(0.2, 0.2), (3e-4, 4e-4)])
def test_float32_matches_float64_oracle(level, agg, clip):
    # the same batch in float32: loss and gradient within float32 rounding of the float64 oracle
    lp, old, adv, mask = random_batch(21, scale=0.02)
    e_loss, e_grad = oracle_and_grad(level, agg, lp, old, adv, mask, *clip)
    lp32 = lp.detach().float().requires_grad_()
    loss, grad, _ = loss_and_grad(lp32, old.float(), adv.float(), mask, level=level, aggregation=agg,
                                  clip_low=clip[0], clip_high=clip[1])
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    close(loss, e_loss, atol=1e-6)
    close(grad, e_grad, atol=1e-6)


def test_huge_log_ratio_in_float32():
    lp, old, adv, mask = hand_inputs()
    lp = (lp.detach().float() + torch.tensor([[1e4, 0, 0], [0, 0, 0]])).requires_grad_()
    for level in LEVELS:
        loss, grad, _ = loss_and_grad(lp, old.float(), adv.float(), mask, level=level, clip_low=0.2, clip_high=0.2)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), level


def test_sequence_level_rejects_token_advantages():
    lp, old, adv, mask = hand_inputs()
    with pytest.raises(ValueError, match="sequence_token"):
        policy_loss(lp, old, adv[:, None].expand(2, 3), mask, level="sequence")


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "sum"])
def test_sequence_levels_reject_token_aggregations(level, agg):
    lp, old, adv, mask = hand_inputs()
    with pytest.raises(ValueError, match=r"aggregation must be None or 'seq-mean-token-mean'"):
        policy_loss(lp, old, adv, mask, level=level, aggregation=agg)
    # the one aggregation they are defined with is accepted and is the default
    a, _ = policy_loss(lp, old, adv, mask, level=level, aggregation="seq-mean-token-mean")
    b, _ = policy_loss(lp, old, adv, mask, level=level)
    close(a.detach(), b.detach(), atol=0)


def test_unknown_level_and_aggregation_rejected():
    lp, old, adv, mask = hand_inputs()
    with pytest.raises(ValueError, match="importance sampling level"):
        policy_loss(lp, old, adv, mask, level="tokens")
    with pytest.raises(ValueError, match="not one of"):
        policy_loss(lp, old, adv, mask, level="token", aggregation="mean")
    with pytest.raises(ValueError):
        core.recommended_clip_range("seq")


def test_shape_mismatch_rejected():
    lp, old, adv, mask = hand_inputs()
    with pytest.raises(ValueError, match="share one"):
        policy_loss(lp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="share one"):
        policy_loss(lp, old, adv, mask[:1])
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(lp, old, adv[:1], mask)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(lp, old, torch.zeros(2, 4, dtype=F64), mask, level="token")


def test_recommended_clip_ranges():
    assert core.recommended_clip_range("sequence") == (3e-4, 4e-4)
    assert core.recommended_clip_range("sequence_token") == (3e-4, 4e-4)
    assert core.recommended_clip_range("token") == (0.2, 0.2)


def test_old_logprobs_gradient_is_not_taken():
    lp, old, adv, mask = hand_inputs()
    old = old.clone().requires_grad_()
    for level in LEVELS:
        loss, _ = policy_loss(lp, old, adv, mask, level=level, clip_low=0.2, clip_high=0.2)
        g_old = torch.autograd.grad(loss, old, allow_unused=True)[0]
        assert g_old is None or (g_old == 0).all()


# ==================================================================================
# 3. GSPO-token (Eq. 13, 14)
# ==================================================================================
@pytest.mark.parametrize("clip", [(0.2, 0.2), (3e-4, 4e-4)])
@pytest.mark.parametrize("expanded", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_gspo_token_equals_gspo_with_sequence_advantages(seed, expanded, clip):
    lp, old, adv, mask = random_batch(seed, scale=0.02)
    l_seq, g_seq, m_seq = loss_and_grad(lp, old, adv, mask, level="sequence", clip_low=clip[0], clip_high=clip[1])
    adv_tok = adv[:, None].expand_as(lp) if expanded else adv
    l_tok, g_tok, m_tok = loss_and_grad(lp, old, adv_tok, mask, level="sequence_token",
                                        clip_low=clip[0], clip_high=clip[1])
    close(l_tok, l_seq)
    close(g_tok, g_seq)
    for k in m_seq:
        close(m_tok[k], m_seq[k])


def test_gspo_token_equals_gspo_in_clipped_regime_hand():
    lp, old, adv, mask = hand_inputs()
    # the hand example with paper eps clips seq 0 (see test_gspo_sequence_hand_clipped_one_sequence)
    l_seq, g_seq, m_seq = loss_and_grad(lp, old, adv, mask, level="sequence")
    l_tok, g_tok, m_tok = loss_and_grad(lp, old, adv, mask, level="sequence_token")
    close(l_tok, 0.05238546, atol=1e-8)
    close(l_tok, l_seq)
    close(g_tok, g_seq)
    close(m_tok["clip_fraction_seq"], 0.5, atol=0)
    close(m_tok["clip_fraction_token"], 0.6, atol=1e-15)


def test_gspo_token_ratio_value_is_sequence_ratio():
    # s_it = sg[s_i] * pi/sg[pi] has the value s_i on every token: metrics equal GSPO's exactly
    lp, old, adv, mask = hand_inputs()
    _, m = policy_loss(lp, old, adv, mask, level="sequence_token", clip_low=0.2, clip_high=0.2)
    close(m["ratio_mean"], (S0 + S1) / 2)
    close(m["ratio_min"], S0)
    close(m["ratio_max"], S1)


def test_gspo_token_hand_per_token_advantages():
    lp, old, _, mask = hand_inputs()
    # A = [[1, -1, 2], [0.5, -0.5, 99 (padding)]], eps 0.2: s_0 = 1.0689, s_1 = 1.1052 all inside [0.8, 1.2]
    # J = 1/2 [ (1/3)(s_0 - s_0 + 2 s_0) + (1/2)(0.5 s_1 - 0.5 s_1) ] = s_0 / 3
    # grad: d/dlogp_it = -(1/N)(1/|y_i|) A_it s_i (Eq. 13: d s_it / d logp_it = s_it = s_i)
    adv = torch.tensor([[1.0, -1.0, 2.0], [0.5, -0.5, 99.0]], dtype=F64)
    loss, grad, _ = loss_and_grad(lp, old, adv, mask, level="sequence_token", clip_low=0.2, clip_high=0.2)
    close(loss, -S0 / 3)
    close(grad, [[-S0 / 6, S0 / 6, -2 * S0 / 6], [-0.5 * S1 / 4, 0.5 * S1 / 4, 0.0]])


@pytest.mark.parametrize("clip", [(0.2, 0.2), (3e-4, 4e-4)])
@pytest.mark.parametrize("seed", range(3))
def test_gspo_token_matches_loop_oracle_with_token_advantages(seed, clip):
    lp, old, _, mask = random_batch(seed, scale=0.02)
    g = torch.Generator().manual_seed(100 + seed)
    adv = torch.randn(lp.shape, generator=g, dtype=F64)  # genuinely per-token
    loss, grad, _ = loss_and_grad(lp, old, adv, mask, level="sequence_token", clip_low=clip[0], clip_high=clip[1])
    e_loss, e_grad = oracle_and_grad("sequence_token", None, lp, old, adv, mask, *clip)
    close(loss, e_loss)
    close(grad, e_grad)


# ==================================================================================
# 4. GRPO, level "token", every aggregation
# ==================================================================================
# Hand example with eps_low = 0.2, eps_high = 0.1, A = [1, -1]:
# seq 0 ratios: exp(0.1) = 1.10517092, exp(0) = 1, exp(0.1) = 1.10517092; A = +1 so
#   the two 1.105 > 1.1 tokens are clipped: token losses [-1.1, -1, -1.1], sum -3.2, mean -1.06666667
# seq 1 ratios: exp(0) = 1, exp(0.2) = 1.22140276; A = -1: -min(-r, -clip(r)) = r (no clip on
#   the upper side for a negative advantage): losses [1, 1.22140276], sum 2.22140276, mean 1.11070138
R = math.exp(0.2)
TOKEN_HAND = {
    # (1/2)(-1.06666667 + 1.11070138) = 0.02201735
    "seq-mean-token-mean": ((-3.2 / 3 + (1 + R) / 2) / 2, 0.02201735),
    # (1/5)(-3.2 + 2.22140276) = -0.19571945
    "token-mean": ((-3.2 + 1 + R) / 5, -0.19571945),
    # (1/2)(-3.2 + 2.22140276) = -0.48929862
    "seq-mean-token-sum": ((-3.2 + 1 + R) / 2, -0.48929862),
}
# d l_it / d logp_it = -A_i r_it when not clipped, 0 when clipped; then the aggregation weight
TOKEN_HAND_GRAD_UNWEIGHTED = [[0.0, -1.0, 0.0], [1.0, R, 0.0]]
TOKEN_WEIGHTS = {
    "seq-mean-token-mean": [[1 / 6] * 3, [1 / 4] * 3],  # 1 / (N |y_i|)
    "token-mean": [[1 / 5] * 3, [1 / 5] * 3],  # 1 / sum |y_i|
    "seq-mean-token-sum": [[1 / 2] * 3, [1 / 2] * 3],  # 1 / N
}


@pytest.mark.parametrize("agg", AGGS)
def test_token_level_hand(agg):
    lp, old, adv, mask = hand_inputs()
    loss, grad, m = loss_and_grad(lp, old, adv, mask, level="token", aggregation=agg, clip_low=0.2, clip_high=0.1)
    exact, written = TOKEN_HAND[agg]
    close(loss, exact)
    close(loss, written, atol=1e-8)
    w = torch.tensor(TOKEN_WEIGHTS[agg], dtype=F64)
    close(grad, torch.tensor(TOKEN_HAND_GRAD_UNWEIGHTED, dtype=F64) * w)
    # 2 of 5 tokens clipped; per sequence (2/3 + 0/2) / 2 = 1/3
    close(m["clip_fraction_token"], 0.4, atol=1e-15)
    close(m["clip_fraction_seq"], 1 / 3, atol=1e-15)
    # ratio metrics: per-sequence mean of token ratios: (2*1.10517 + 1)/3 and (1 + 1.22140)/2
    close(m["ratio_min"], (2 * math.exp(0.1) + 1) / 3)
    close(m["ratio_max"], (1 + R) / 2)


def test_token_level_default_aggregation_is_seq_mean_token_mean():
    lp, old, adv, mask = hand_inputs()
    a, _ = policy_loss(lp, old, adv, mask, level="token", clip_low=0.2, clip_high=0.1)
    close(a.detach(), TOKEN_HAND["seq-mean-token-mean"][0])


@pytest.mark.parametrize("token_adv", [False, True])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", range(3))
def test_token_level_matches_loop_oracle(seed, agg, token_adv):
    lp, old, adv, mask = random_batch(seed, scale=0.15)  # scale 0.15: some tokens beyond 1 +- 0.2
    if token_adv:
        adv = torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    loss, grad, m = loss_and_grad(lp, old, adv, mask, level="token", aggregation=agg, clip_low=0.2, clip_high=0.2)
    e_loss, e_grad = oracle_and_grad("token", agg, lp, old, adv, mask, 0.2, 0.2)
    close(loss, e_loss)
    close(grad, e_grad)
    assert 0 < float(m["clip_fraction_token"]) < 1  # both regimes exercised


# ==================================================================================
# 5. on-policy: ratio exactly 1, nothing clipped, plain policy gradient
# ==================================================================================
@pytest.mark.parametrize("level,agg", LEVEL_AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_on_policy_ratio_exactly_one(level, agg, dtype):
    lp, _, adv, mask = random_batch(0, dtype=dtype)
    _, m = policy_loss(lp, lp.detach(), adv, mask, level=level, aggregation=agg, clip_low=1e-9, clip_high=1e-9)
    assert m["ratio_mean"].item() == 1.0
    assert m["ratio_min"].item() == 1.0 and m["ratio_max"].item() == 1.0
    assert m["clip_fraction_seq"].item() == 0.0
    assert m["clip_fraction_token"].item() == 0.0


@pytest.mark.parametrize("level,agg", [("sequence", None), ("sequence_token", None), ("token", "seq-mean-token-mean")])
def test_on_policy_gradient_is_plain_policy_gradient(level, agg):
    # With s_i = 1 the loss gradient is -(1/N) sum_i A_i (1/|y_i|) sum_t grad logp_it
    # (for GSPO, GSPO-token, and GRPO with seq-mean-token-mean alike).
    # Check it through a small linear "model": logp = theta-dependent, compare grad w.r.t. theta.
    lp0, _, adv, mask = random_batch(3)
    n, t = lp0.shape
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(n, t, 4, generator=g, dtype=F64)
    theta = torch.randn(4, generator=g, dtype=F64, requires_grad=True)
    logp = lp0.detach() + feats @ theta  # [N, T]
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, level=level, aggregation=agg)
    (g_loss,) = torch.autograd.grad(loss, theta, retain_graph=True)
    lengths = mask.sum(1).to(F64)
    pg = -(adv[:, None] * mask / lengths[:, None] * logp).sum() / n
    (g_pg,) = torch.autograd.grad(pg, theta)
    close(g_loss, g_pg)
    # and the loss value itself is -(1/N) sum_i A_i
    close(loss.detach(), -adv.sum() / n)


@pytest.mark.parametrize("agg", AGGS)
def test_on_policy_token_level_gradient_per_aggregation(agg):
    # r_it = 1: d loss / d logp_it = -A_i * w_it with w = 1/(N|y_i|), 1/sum|y|, 1/N per aggregation
    lp, _, adv, mask = random_batch(8)
    loss, grad, _ = loss_and_grad(lp, lp.detach(), adv, mask, level="token", aggregation=agg)
    n, lengths, total = lp.shape[0], mask.sum(1, keepdim=True).to(F64), mask.sum().to(F64)
    w = {"seq-mean-token-mean": 1 / (n * lengths), "token-mean": 1 / total + 0 * lengths,
         "seq-mean-token-sum": torch.full_like(lengths, 1 / n)}[agg]
    close(grad, -adv[:, None] * w * mask)
    close(loss, (-adv[:, None] * w * mask).sum())


# ==================================================================================
# 6. micro-batch invariance
# ==================================================================================
@pytest.mark.parametrize("level,agg", LEVEL_AGGS)
@pytest.mark.parametrize("n_micro", [2, 4])
@pytest.mark.parametrize("clip", [(0.2, 0.2), (3e-4, 4e-4)])
def test_micro_batches_sum_to_whole_batch(level, agg, n_micro, clip):
    lp, old, adv, mask = random_batch(11, n=8, t=9, scale=0.1)
    kw = dict(level=level, aggregation=agg, clip_low=clip[0], clip_high=clip[1])
    whole, g_whole, _ = loss_and_grad(lp, old, adv, mask, **kw)
    n = lp.shape[0]
    total_tokens = int(mask.sum())
    size = n // n_micro
    parts = []
    for s in range(0, n, size):
        sl = slice(s, s + size)
        loss, _ = policy_loss(lp[sl], old[sl], adv[sl], mask[sl], num_sequences=n, num_tokens=total_tokens, **kw)
        parts.append(loss)
    summed = sum(parts)
    (g_sum,) = torch.autograd.grad(summed, lp)
    close(summed.detach(), whole)
    close(g_sum, g_whole)
    # without the denominators, token-mean / seq-mean micro-batches would NOT add up (sanity of the test)
    naive = sum(policy_loss(lp[s:s + size], old[s:s + size], adv[s:s + size], mask[s:s + size], **kw)[0]
                for s in range(0, n, size))
    assert abs(naive.item() - whole.item()) > 1e-6


@pytest.mark.parametrize("estimator", core.KL_ESTIMATORS)
def test_kl_penalty_micro_batches(estimator):
    lp, ref, _, mask = random_batch(5, n=8, t=9, scale=0.3)
    whole = kl_penalty(lp, ref, mask, estimator)
    (g_whole,) = torch.autograd.grad(whole, lp)
    total_tokens = int(mask.sum())
    summed = sum(kl_penalty(lp[s:s + 2], ref[s:s + 2], mask[s:s + 2], estimator, num_tokens=total_tokens)
                 for s in range(0, 8, 2))
    (g_sum,) = torch.autograd.grad(summed, lp)
    close(summed.detach(), whole.detach())
    close(g_sum, g_whole)


# ==================================================================================
# 7. KL estimators
# ==================================================================================
def test_kl_estimators_hand():
    # logp = -1, ref = -2: log r = ref - logp = -1
    # k1 = -log r = 1;  k2 = 0.5 (log r)^2 = 0.5;  k3 = exp(-1) - (-1) - 1 = 0.36787944
    lp = torch.tensor([[-1.0]], dtype=F64)
    ref = torch.tensor([[-2.0]], dtype=F64)
    close(kl_per_token(lp, ref, "k1"), [[1.0]])
    close(kl_per_token(lp, ref, "k2"), [[0.5]])
    close(kl_per_token(lp, ref, "k3"), [[math.exp(-1)]])
    close(kl_per_token(lp, ref, "k3"), [[0.36787944]], atol=1e-8)
    # logp = -2, ref = -1: log r = 1 -> k1 = -1, k2 = 0.5, k3 = e - 1 - 1 = 0.71828183
    close(kl_per_token(ref, lp, "k1"), [[-1.0]])
    close(kl_per_token(ref, lp, "k3"), [[0.71828183]], atol=1e-8)


def test_kl_k3_gradient_hand():
    # d k3 / d logp = d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp) = 1 - e^-1
    lp = torch.tensor([[-1.0]], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(kl_per_token(lp, torch.tensor([[-2.0]], dtype=F64)).sum(), lp)
    close(g, [[1 - math.exp(-1)]])


def test_kl_penalty_masked_mean_ignores_padding():
    # tokens: (logp, ref) = (-1, -2) -> k3 0.36787944, (-2, -1) -> 0.71828183, (-1, -1) -> 0; padding huge
    lp = torch.tensor([[-1.0, -2.0], [-1.0, 50.0]], dtype=F64)
    ref = torch.tensor([[-2.0, -1.0], [-1.0, -50.0]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    expected = (math.exp(-1) + (math.e - 2) + 0.0) / 3  # = 0.36205376
    close(kl_penalty(lp, ref, mask, "k3"), expected)
    close(kl_penalty(lp, ref, mask, "k3"), 0.36205376, atol=1e-8)
    close(kl_penalty(lp, ref, mask, "k1"), (1 - 1 + 0) / 3)


@pytest.mark.parametrize("seed", range(3))
def test_kl_k3_nonnegative_and_matches_loop(seed):
    lp, ref, _, mask = random_batch(seed, scale=2.0)
    k3 = kl_per_token(lp, ref, "k3")
    assert (k3 >= 0).all()
    close(kl_penalty(lp, ref, mask, "k3"), k3_loop(lp, ref, mask))


def test_kl_unknown_estimator_rejected():
    with pytest.raises(ValueError, match="KL estimator"):
        kl_per_token(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_kl_ref_gets_no_gradient_and_huge_gap_is_finite():
    lp = torch.tensor([[-1.0, -1e4]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1e4, -1.0]], dtype=F64, requires_grad=True)
    kl = kl_penalty(lp, ref, torch.ones(1, 2))
    g_lp, g_ref = torch.autograd.grad(kl, (lp, ref), allow_unused=True)
    assert torch.isfinite(kl) and torch.isfinite(g_lp).all()
    assert g_ref is None or (g_ref == 0).all()


# ==================================================================================
# 8. KL controllers
# ==================================================================================
def test_adaptive_kl_controller_hand():
    c = AdaptiveKLController(0.2, target_kl=0.01, horizon=10000)
    # kl 0.02: err = 0.02 / 0.01 - 1 = 1 -> clipped to 0.2; value = 0.2 (1 + 0.2 * 256 / 10000) = 0.201024
    c.update(0.02, n_steps=256)
    assert c.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000), abs=1e-15)
    assert c.value == pytest.approx(0.201024, abs=1e-12)
    # kl 0.011: err = 0.1 (inside the clip) -> value *= 1 + 0.1 * 100 / 10000 = 1.001
    c.update(0.011, n_steps=100)
    assert c.value == pytest.approx(0.201024 * 1.001, abs=1e-12)


def test_adaptive_kl_controller_below_target_lowers():
    c = AdaptiveKLController(0.2, target_kl=0.01, horizon=10000)
    # kl 0.005: err = -0.5 -> clipped to -0.2; value = 0.2 (1 - 0.2 * 256 / 10000) = 0.198976
    c.update(0.005, n_steps=256)
    assert c.value == pytest.approx(0.198976, abs=1e-12)
    # kl 0.009: err = -0.1 -> value *= 1 - 0.1 * 1000 / 10000 = 0.99
    c.update(0.009, n_steps=1000)
    assert c.value == pytest.approx(0.198976 * 0.99, abs=1e-12)
    # kl exactly at target: unchanged
    v = c.value
    c.update(0.01, n_steps=1000)
    assert c.value == v


def test_adaptive_kl_controller_state_dict_round_trip():
    a = AdaptiveKLController(0.1, target_kl=0.05, horizon=1000)
    for kl in (0.2, 0.01, 0.07):
        a.update(kl, 64)
    b = AdaptiveKLController(0.1, target_kl=0.05, horizon=1000)
    b.load_state_dict(a.state_dict())
    assert b.value == a.value
    a.update(0.3, 32)
    b.update(0.3, 32)
    assert b.value == a.value != 0.1


def test_fixed_kl_controller_never_changes():
    c = FixedKLController(0.05)
    for kl in (0.0, 1.0, 100.0, -1.0):
        c.update(kl, 1000)
    assert c.value == 0.05
    d = FixedKLController(0.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05


# ==================================================================================
# 9. chunked log-probs and entropy
# ==================================================================================
def direct_logprobs_entropy(logits, labels):
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def make_logits(seed, n=3, t=5, v=11, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, t, v, generator=g)
    labels = torch.randint(0, v, (n, t), generator=g)
    return logits, labels


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 1024])  # N*T = 15: 4 and 7 do not divide it
@pytest.mark.parametrize("with_entropy", [True, False])
def test_logprobs_and_entropy_values(chunk_size, with_entropy):
    logits, labels = make_logits(0)
    lp, ent = logprobs_and_entropy(logits, labels, chunk_size=chunk_size, with_entropy=with_entropy)
    e_lp, e_ent = direct_logprobs_entropy(logits, labels)
    assert lp.shape == (3, 5)
    torch.testing.assert_close(lp, e_lp, atol=1e-6, rtol=0)
    if with_entropy:
        torch.testing.assert_close(ent, e_ent, atol=1e-6, rtol=0)
        assert (ent >= -1e-6).all() and (ent <= math.log(11) + 1e-5).all()
    else:
        assert ent is None


def test_entropy_hand():
    # uniform over 4 -> H = log 4 = 1.38629436, log p = -log 4; one-hot-ish logits -> H ~ 0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    lp, ent = logprobs_and_entropy(logits, torch.tensor([[2, 0]]), chunk_size=1)
    torch.testing.assert_close(lp, torch.tensor([[-math.log(4), 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, torch.tensor([[math.log(4), 0.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [4, 7, 1024])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_logprobs_and_entropy_gradient(chunk_size, with_entropy):
    logits, labels = make_logits(1)
    g = torch.Generator().manual_seed(2)
    w_lp, w_ent = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)

    def objective(lp, ent):
        return (w_lp * lp).sum() + ((w_ent * ent).sum() if ent is not None else 0.0)

    x = logits.clone().requires_grad_()
    lp, ent = logprobs_and_entropy(x, labels, chunk_size=chunk_size, with_entropy=with_entropy)
    (g_chunked,) = torch.autograd.grad(objective(lp, ent), x)
    y = logits.clone().requires_grad_()
    e_lp, e_ent = direct_logprobs_entropy(y, labels)
    (g_direct,) = torch.autograd.grad(objective(e_lp, e_ent if with_entropy else None), y)
    torch.testing.assert_close(g_chunked, g_direct, atol=1e-6, rtol=0)
    if with_entropy:  # each output's gradient separately
        for pick in (0, 1):
            x = logits.clone().requires_grad_()
            out = logprobs_and_entropy(x, labels, chunk_size=chunk_size)[pick]
            (ga,) = torch.autograd.grad((w_lp * out).sum(), x)
            y = logits.clone().requires_grad_()
            (gb,) = torch.autograd.grad((w_lp * direct_logprobs_entropy(y, labels)[pick]).sum(), y)
            torch.testing.assert_close(ga, gb, atol=1e-6, rtol=0)


def test_logprobs_and_entropy_non_contiguous_shifted_logits():
    # the usual causal-LM call: logits[:, :-1] predicts ids[:, 1:] (a non-contiguous view)
    full, labels = make_logits(5, t=6)
    x = full.clone().requires_grad_()
    lp, ent = logprobs_and_entropy(x[:, :-1], labels[:, 1:], chunk_size=4)
    e_lp, e_ent = direct_logprobs_entropy(full[:, :-1], labels[:, 1:])
    torch.testing.assert_close(lp.detach(), e_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent.detach(), e_ent, atol=1e-6, rtol=0)
    (g,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
    assert (g[:, -1] == 0).all() and torch.isfinite(g).all()


def test_logprobs_and_entropy_no_grad_matches_grad_path():
    logits, labels = make_logits(3)
    with torch.no_grad():
        a = logprobs_and_entropy(logits.clone().requires_grad_(), labels, chunk_size=4)
    b = logprobs_and_entropy(logits.clone().requires_grad_(), labels, chunk_size=4)
    torch.testing.assert_close(a[0], b[0].detach(), atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1].detach(), atol=0, rtol=0)


def test_logprobs_and_entropy_bf16():
    logits, labels = make_logits(4, v=50)
    bf = logits.bfloat16().requires_grad_()
    lp, ent = logprobs_and_entropy(bf, labels, chunk_size=4)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32  # computed in float32
    # exactly the float32 computation on the bf16-rounded logits
    e_lp, e_ent = direct_logprobs_entropy(bf.detach().float(), labels)
    torch.testing.assert_close(lp.detach(), e_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent.detach(), e_ent, atol=1e-6, rtol=0)
    # and loosely the float32 logits' values (bf16 rounding of logits ~ 3 * 2^-8)
    f_lp, f_ent = direct_logprobs_entropy(logits, labels)
    torch.testing.assert_close(lp.detach(), f_lp, atol=0.1, rtol=0.02)
    torch.testing.assert_close(ent.detach(), f_ent, atol=0.1, rtol=0.02)
    (g,) = torch.autograd.grad(lp.sum() + ent.sum(), bf)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    lp2, _ = logprobs_and_entropy(bf.detach(), labels, with_entropy=False)
    torch.testing.assert_close(lp2, e_lp, atol=1e-5, rtol=0)


# ==================================================================================
# 10. aggregate and masked_mean edge cases
# ==================================================================================
def test_masked_mean_hand_and_empty_row():
    x = torch.tensor([[1.0, 2.0, 100.0], [5.0, 6.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    close(masked_mean(x, mask, dim=1), [1.5, 0.0])  # (1 + 2) / 2; empty row -> 0, not NaN
    close(masked_mean(x, mask), 1.5)
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # nothing at all -> 0


def test_aggregate_hand_and_empty():
    x = torch.tensor([[1.0, 2.0, 100.0], [5.0, 6.0, 7.0], [3.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    # seq-mean-token-mean: (1.5 + 0 + 3) / 3 = 1.5; seq-mean-token-sum: (3 + 0 + 3) / 3 = 2; token-mean: 6 / 3 = 2
    close(aggregate(x, mask, "seq-mean-token-mean"), 1.5)
    close(aggregate(x, mask, "seq-mean-token-sum"), 2.0)
    close(aggregate(x, mask, "token-mean"), 2.0)
    close(aggregate(x, mask, "token-mean", num_tokens=6), 1.0)
    close(aggregate(x, mask, "seq-mean-token-sum", num_sequences=6), 1.0)
    with pytest.raises(ValueError, match="not one of"):
        aggregate(x, mask, "sum")
    for mode in AGGS:
        y = x.clone().requires_grad_()
        out = aggregate(y, torch.zeros_like(mask), mode)
        (g,) = torch.autograd.grad(out, y)
        assert out.item() == 0.0 and torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("level,agg", LEVEL_AGGS)
def test_empty_sequence_gets_no_gradient(level, agg):
    # a sequence with no completion tokens must not produce NaN, and gets zero gradient
    lp, old, adv, mask = random_batch(2, n=4, t=5, scale=0.1)
    mask = mask.clone()
    mask[1] = False
    loss, grad, m = loss_and_grad(lp, old, adv, mask, level=level, aggregation=agg, clip_low=0.2, clip_high=0.2)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[1] == 0).all() and (grad[~mask] == 0).all()
    assert all(torch.isfinite(v) for v in m.values())


def test_bool_float_and_int_masks_agree():
    lp, old, adv, mask = random_batch(4)
    for level, agg in LEVEL_AGGS:
        ref, _ = policy_loss(lp, old, adv, mask, level=level, aggregation=agg)
        for m in (mask.to(F64), mask.long()):
            out, _ = policy_loss(lp, old, adv, m, level=level, aggregation=agg)
            close(out.detach(), ref.detach(), atol=0)
