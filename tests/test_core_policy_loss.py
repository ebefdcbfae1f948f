"""Tests of gspo.core.policy_loss: GSPO (Eq. 5-7), GSPO-token (Eq. 13-14) and GRPO's token level with
every aggregation, against hand-computed values (arithmetic in the comments) and the slow loop oracles in
tests/oracles.py; on-policy behaviour and micro-batch invariance.

Tolerances are tight on purpose: float64 comparisons use atol=1e-12 where the computation
is the same up to rounding, and 1e-7 against hand values written to 8 digits.
"""

from __future__ import annotations

import math

import pytest
import torch

from gspo import core
from gspo.core import (
    kl_penalty,
    policy_loss,
)
from loss_cases import AGGS, F64, LEVEL_AGGS, LEVELS, close, loss_and_grad, oracle_and_grad, random_batch

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
    loss, grad, _ = loss_and_grad(
        lp32, old.float(), adv.float(), mask, level=level, aggregation=agg, clip_low=clip[0], clip_high=clip[1]
    )
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
    with pytest.raises(ValueError, match=r"importance_sampling_level 'tokens' is not one of \['sequence'"):
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
    # per objective (tests/test_core_objectives.py checks the levels each refuses)
    assert core.recommended_clip_range("token", "cispo") == (1.0, 0.2)  # no lower bound (MiniMax-M1)
    assert core.recommended_clip_range("token", "sapo") == (0.2, 0.2)  # only for SAPO's clip_fraction metric
    assert core.recommended_clip_range("sequence", "gmpo") == (0.4, 0.4)  # log space: (e^-0.4, e^0.4)
    assert core.policy_loss is core.POLICY_LOSSES["clip"]


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
    l_tok, g_tok, m_tok = loss_and_grad(
        lp, old, adv_tok, mask, level="sequence_token", clip_low=clip[0], clip_high=clip[1]
    )
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
# 5. ratio metrics from a known log-ratio; on-policy: plain policy gradient
# ==================================================================================
@pytest.mark.parametrize("level,agg", LEVEL_AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_ratio_metrics_from_a_known_log_ratio(level, agg, dtype):
    # old = logprobs - d_i on every token of sequence i, garbage on padding: every token ratio of sequence i is
    # exp(d_i), so is the sequence ratio s_i (Eq. 7) and the mean token ratio: d = 0, 0.05, ..., 0.25 gives
    # ratio_min = exp(0) = 1, ratio_max = exp(0.25) = 1.28402542, ratio_mean = mean_i exp(0.05 i)
    # = (1 + 1.05127110 + 1.10517092 + 1.16183424 + 1.22140276 + 1.28402542) / 6 = 6.82370444 / 6 = 1.13728407
    lp, old, adv, mask = random_batch(0, dtype=dtype)
    d = torch.arange(6, dtype=dtype) * 0.05  # [N]
    old = torch.where(mask, lp.detach() - d[:, None], old)
    _, m = policy_loss(lp, old, adv, mask, level=level, aggregation=agg, clip_low=0.01, clip_high=0.01)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    close(m["ratio_min"], 1.0, atol=tol)
    close(m["ratio_max"], math.exp(0.25), atol=tol)
    close(m["ratio_mean"], sum(math.exp(0.05 * i) for i in range(6)) / 6, atol=tol)
    close(m["ratio_mean"], 1.13728407, atol=1e-7)
    # eps 0.01: sequences 1..5 have ratio >= exp(0.05) > 1.01, clipped where A_i > 0 (the side A pushes to);
    # sequence 0 (ratio 1) never. The fractions, counted by hand from the signs of A and the lengths:
    up = [i >= 1 and adv[i].item() > 0 for i in range(6)]
    lengths = mask.sum(1).tolist()
    assert 0 < sum(up) < 6  # both cases occur in this batch
    close(m["clip_fraction_seq"], sum(up) / 6, atol=1e-7)
    close(m["clip_fraction_token"], sum(n for n, u in zip(lengths, up) if u) / sum(lengths), atol=1e-7)


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
    w = {
        "seq-mean-token-mean": 1 / (n * lengths),
        "token-mean": 1 / total + 0 * lengths,
        "seq-mean-token-sum": torch.full_like(lengths, 1 / n),
    }[agg]
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
    naive = sum(
        policy_loss(lp[s : s + size], old[s : s + size], adv[s : s + size], mask[s : s + size], **kw)[0]
        for s in range(0, n, size)
    )
    assert abs(naive.item() - whole.item()) > 1e-6


@pytest.mark.parametrize("estimator", core.KL_ESTIMATORS)
def test_kl_penalty_micro_batches(estimator):
    lp, ref, _, mask = random_batch(5, n=8, t=9, scale=0.3)
    whole = kl_penalty(lp, ref, mask, estimator)
    (g_whole,) = torch.autograd.grad(whole, lp)
    total_tokens = int(mask.sum())
    summed = sum(
        kl_penalty(lp[s : s + 2], ref[s : s + 2], mask[s : s + 2], estimator, num_tokens=total_tokens)
        for s in range(0, 8, 2)
    )
    (g_sum,) = torch.autograd.grad(summed, lp)
    close(summed.detach(), whole.detach())
    close(g_sum, g_whole)
