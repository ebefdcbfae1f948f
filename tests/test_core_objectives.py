"""Tests of the policy objectives by name (gspo.core.POLICY_LOSSES): CISPO, SAPO, GMPO, and Dr. GRPO's
aggregation 'seq-mean-token-sum-norm'. For each objective:
(a) the slow loop oracle of tests/oracles.py equals the vectorised function, loss and gradient, in float64 on
    random batches with padding and a hole in the loss mask (atol 1e-12);
(b) a tiny case computed by hand, the arithmetic in a comment;
(c) an independent reading of verl's function of the same name (verl/trainer/ppo/core_algos.py), written below
    as an oracle, on the same tensors;
(d) micro-batch invariance: slices with the global num_sequences / num_tokens add up to the whole;
(e) config errors for a wrong combination name the field.
The 'clip' objective (GSPO, GSPO-token, GRPO) has its own file, tests/test_core_policy_loss.py; it is read
against verl's 'vanilla' and 'gspo' here too.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from oracles import cispo_loss_loop, gmpo_loss_loop, sapo_loss_loop, token_loss_loop

from gspo import core
from gspo.config import ConfigError, GSPOConfig
from gspo.core import POLICY_LOSSES, aggregate, cispo_loss, gmpo_loss, policy_loss, sapo_loss
from loss_cases import F64, close, holed_batch, loss_and_grad

TOKEN_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
NORM = 9.0  # the constant L of seq-mean-token-sum-norm in these tests (the batches have T = 7)


def grad_of(loss, logprobs):
    (g,) = torch.autograd.grad(loss, logprobs)
    return loss.detach(), g


def token_adv(lp, seed):
    return torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ==================================================================================
# The registry: one signature, the same metrics, explicit rules
# ==================================================================================
def test_registry_holds_every_objective_with_the_clip_objective_as_policy_loss():
    assert list(POLICY_LOSSES) == ["clip", "cispo", "sapo", "gmpo"]
    assert POLICY_LOSSES["clip"] is policy_loss
    assert (POLICY_LOSSES["cispo"], POLICY_LOSSES["sapo"], POLICY_LOSSES["gmpo"]) == (cispo_loss, sapo_loss, gmpo_loss)


@pytest.mark.parametrize("name", ["clip", "cispo", "sapo", "gmpo"])
def test_every_objective_reports_the_same_detached_metrics(name):
    lp, old, adv, mask = holed_batch(0, scale=0.3)
    level = list(core.POLICY_LOSS_SPECS[name].clip)[-1]  # 'token' for clip / cispo / sapo, 'sequence' for gmpo
    loss, m = POLICY_LOSSES[name](lp, old, adv, mask, level=level)
    assert set(m) == {"clip_fraction_seq", "clip_fraction_token", "ratio_mean", "ratio_min", "ratio_max"}
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    assert loss.requires_grad and torch.isfinite(loss)


@pytest.mark.parametrize(
    "name, level, message",
    [
        ("cispo", "sequence", r"importance_sampling_level 'sequence' does not apply to policy_loss 'cispo'"),
        ("sapo", "sequence_token", r"importance_sampling_level 'sequence_token' does not apply to policy_loss 'sapo'"),
        ("gmpo", "token", r"importance_sampling_level 'token' does not apply to policy_loss 'gmpo': allowed \['seq"),
        ("clip", "tok", r"importance_sampling_level 'tok' is not one of \['sequence', 'sequence_token', 'token'\]"),
    ],
)
def test_an_objective_refuses_the_levels_it_is_not_defined_at(name, level, message):
    lp, old, adv, mask = holed_batch(1)
    with pytest.raises(ValueError, match=message):
        POLICY_LOSSES[name](lp, old, adv, mask, level=level)
    with pytest.raises(ValueError, match=message):
        core.recommended_clip_range(level, name)


@pytest.mark.parametrize("name", ["clip", "gmpo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_sequence_levels_refuse_token_sum_aggregations(name, agg):
    lp, old, adv, mask = holed_batch(1)
    with pytest.raises(ValueError, match=r"loss_aggregation must be None or 'seq-mean-token-mean', got"):
        POLICY_LOSSES[name](lp, old, adv, mask, level="sequence", aggregation=agg, norm_length=NORM)


@pytest.mark.parametrize("name", ["clip", "cispo", "sapo"])
def test_unknown_aggregation_and_missing_norm_length(name):
    lp, old, adv, mask = holed_batch(1)
    with pytest.raises(ValueError, match=r"loss aggregation 'sum' is not one of \["):
        POLICY_LOSSES[name](lp, old, adv, mask, level="token", aggregation="sum")
    with pytest.raises(ValueError, match=r"'seq-mean-token-sum-norm' needs norm_length > 0"):
        POLICY_LOSSES[name](lp, old, adv, mask, level="token", aggregation="seq-mean-token-sum-norm")


def test_unknown_options_are_named():
    lp, old, adv, mask = holed_batch(1)
    with pytest.raises(TypeError, match=r"policy_loss 'clip' got unknown option\(s\) \['sapo_tau_pos'\]"):
        policy_loss(lp, old, adv, mask, sapo_tau_pos=1.0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['tau_pos'\]; its options are \['sapo_tau_neg'"):
        sapo_loss(lp, old, adv, mask, level="token", tau_pos=1.0)
    with pytest.raises(ValueError, match=r"sapo_tau_neg=0.0 must be > 0"):
        sapo_loss(lp, old, adv, mask, level="token", sapo_tau_neg=0.0)
    with pytest.raises(ValueError, match=r"policy_loss 'ppo' is not one of \['clip', 'cispo', 'sapo', 'gmpo'\]"):
        core.policy_loss_spec("ppo")


def test_gmpo_takes_one_advantage_per_sequence():
    lp, old, adv, mask = holed_batch(1)
    with pytest.raises(ValueError, match=r"policy_loss 'gmpo' at level 'sequence' .* takes one advantage per"):
        gmpo_loss(lp, old, adv[:, None].expand_as(lp), mask)


def test_default_aggregation_per_objective():
    assert core.allowed_aggregations("cispo", "token")[0] == "token-mean"  # MiniMax-M1 Eq. 4: 1 / sum_i |o_i|
    assert core.allowed_aggregations("sapo", "token")[0] == "seq-mean-token-mean"
    assert core.allowed_aggregations("clip", "token")[0] == "seq-mean-token-mean"
    assert core.allowed_aggregations("gmpo", "sequence") == ("seq-mean-token-mean",)
    lp, old, adv, mask = holed_batch(2, scale=0.2)
    a, _ = cispo_loss(lp, old, adv, mask, level="token")
    b, _ = cispo_loss(lp, old, adv, mask, level="token", aggregation="token-mean")
    c, _ = cispo_loss(lp, old, adv, mask, level="token", aggregation="seq-mean-token-mean")
    close(a.detach(), b.detach(), atol=0)
    assert abs(a.item() - c.item()) > 1e-6  # the default is not an accident of this batch


# ==================================================================================
# Hand examples: 2 sequences, T = 3, the second padded at t = 2 (garbage there)
# ==================================================================================
HAND_LP = [[-1.0, -2.0, -0.5], [-0.3, -0.7, 9.0]]
HAND_OLD = [[-1.1, -2.0, -0.6], [-0.3, -0.9, -40.0]]
HAND_MASK = [[1, 1, 1], [1, 1, 0]]
# token log-ratios: seq 0 [0.1, 0, 0.1], seq 1 [0, 0.2];
# ratios: seq 0 [e^0.1, 1, e^0.1] = [1.10517092, 1, 1.10517092]; seq 1 [1, e^0.2] = [1, 1.22140276]
E1, E2 = math.exp(0.1), math.exp(0.2)


def hand_inputs(adv=(1.0, -1.0), swap=False):
    lp, old = (HAND_OLD, HAND_LP) if swap else (HAND_LP, HAND_OLD)  # swap: every log-ratio changes sign
    lp = torch.tensor(lp, dtype=F64, requires_grad=True)
    return lp, torch.tensor(old, dtype=F64), torch.tensor(adv, dtype=F64), torch.tensor(HAND_MASK)


def test_cispo_hand():
    lp, old, adv, mask = hand_inputs()
    # eps_low = 1 (floor 0), eps_high = 0.1 (cap 1.1): weights seq 0 [1.1, 1, 1.1], seq 1 [1, 1.1]
    # (seq 1's last token has A < 0 and ratio 1.221 > 1.1: PPO's clip would not bind there; CISPO caps it anyway)
    # token losses -w A log pi: seq 0 (A = +1): 1.1*1.0 = 1.1, 1*2.0 = 2.0, 1.1*0.5 = 0.55 -> sum 3.65
    #                           seq 1 (A = -1): 1*(-0.3) = -0.3, 1.1*(-0.7) = -0.77 -> sum -1.07
    # token-mean: (3.65 - 1.07) / 5 = 2.58 / 5 = 0.516
    loss, grad, m = loss_and_grad(lp, old, adv, mask, objective=cispo_loss, level="token", clip_low=1.0, clip_high=0.1)
    close(loss, 0.516, atol=1e-12)
    # d l / d log pi = -w A / 5 on every token, the capped ones included (PPO would give 0 on seq 0's 1.105s):
    # seq 0: [-0.22, -0.2, -0.22]; seq 1: [0.2, 0.22, 0 (padding)]
    close(grad, [[-0.22, -0.2, -0.22], [0.2, 0.22, 0.0]], atol=1e-12)
    # capped weights: seq 0 tokens 0 and 2, seq 1 token 1: 3 of 5 tokens; per sequence (2/3 + 1/2) / 2 = 7/12
    close(m["clip_fraction_token"], 0.6, atol=1e-15)
    close(m["clip_fraction_seq"], 7 / 12, atol=1e-15)
    # ratio metrics: each sequence's mean token ratio: (2 * 1.10517092 + 1) / 3 = 1.07011395, (1 + 1.22140276) / 2
    close(m["ratio_min"], (2 * E1 + 1) / 3)
    close(m["ratio_max"], (1 + E2) / 2)
    # seq-mean-token-mean instead: (3.65 / 3 - 1.07 / 2) / 2 = (1.21666667 - 0.535) / 2 = 0.34083333
    loss2, _ = cispo_loss(
        lp, old, adv, mask, level="token", clip_low=1.0, clip_high=0.1, aggregation="seq-mean-token-mean"
    )
    close(loss2.detach(), 0.34083333, atol=1e-8)


def test_sapo_hand():
    lp, old, adv, mask = hand_inputs()
    # tau_pos = 1 (seq 0, A = +1), tau_neg = 2 (seq 1, A = -1); f(r) = sigmoid(tau (r - 1)) * 4 / tau
    # seq 0: sigmoid(0.10517092) = 0.52626852 -> f = 2.10507408 on tokens 0 and 2; f(1) = 0.5 * 4 = 2 on token 1
    #        losses -f A = [-2.10507408, -2, -2.10507408], mean -6.21014817 / 3 = -2.07004939
    # seq 1: f(1) = 0.5 * 4 / 2 = 1; sigmoid(2 * 0.22140276) = sigmoid(0.44280552) = 0.60892733 -> f = 1.21785465
    #        losses -f A = [1, 1.21785465], mean 1.10892733
    # seq-mean-token-mean: (-2.07004939 + 1.10892733) / 2 = -0.48056103
    loss, grad, m = loss_and_grad(
        lp, old, adv, mask, objective=sapo_loss, level="token", sapo_tau_pos=1.0, sapo_tau_neg=2.0
    )
    close(loss, -0.48056103, atol=1e-8)
    # d l / d log pi = -A * 4 sigma (1 - sigma) * r / (N |y_i|):
    # seq 0 (1/6): 4 * 0.52626852 * 0.47373148 * 1.10517092 = 1.10212049 -> -0.18368675; r = 1: 4 * 0.25 = 1 -> -1/6
    # seq 1 (1/4): r = 1 -> +0.25; 4 * 0.60892733 * 0.39107267 * 1.22140276 = 1.16343419 -> +0.29085855
    close(grad, [[-0.18368675, -1 / 6, -0.18368675], [0.25, 0.29085855, 0.0]], atol=1e-8)
    # clip_fraction counts where 'clip' with eps 0.2 would bind: seq 0's 1.105 < 1.2, seq 1 has A < 0 and r >= 1
    close(m["clip_fraction_token"], 0.0, atol=0)


def test_gmpo_hand_clips_the_side_the_advantage_pushes():
    lp, old, adv, mask = hand_inputs()
    # eps 0.05 / 0.05 in log space. seq 0 (A = +1): log-ratios [0.1, 0, 0.1] capped at 0.05 -> [0.05, 0, 0.05],
    #   mean 0.1 / 3, ratio exp(0.03333333) = 1.03389510; loss -1.03389510; only token 1 keeps a gradient.
    # seq 1 (A = -1): [0, 0.2], floor -0.05 does not bind -> mean 0.1, ratio exp(0.1) = 1.10517092, loss +1.10517092
    # mean over sequences: (-1.03389510 + 1.10517092) / 2 = 0.03563791
    loss, grad, m = loss_and_grad(lp, old, adv, mask, objective=gmpo_loss, clip_low=0.05, clip_high=0.05)
    close(loss, 0.03563791, atol=1e-8)
    # d l_i / d lp_it = -A_i ratio_i / |y_i| / N: seq 0 token 1: -1.03389510 / 6 = -0.17231585;
    # seq 1: +1.10517092 / 4 = 0.27629273 on both tokens
    close(grad, [[0.0, -math.exp(0.1 / 3) / 6, 0.0], [E1 / 4, E1 / 4, 0.0]])
    close(grad[0, 1], -0.17231585, atol=1e-8)
    close(m["clip_fraction_token"], 0.4, atol=1e-15)  # 2 of 5 tokens
    close(m["clip_fraction_seq"], 1 / 3, atol=1e-15)  # (2/3 + 0) / 2
    close(m["ratio_min"], math.exp(0.2 / 3))  # the unclipped geometric means: exp(0.2/3), exp(0.1)
    close(m["ratio_max"], E1)


def test_gmpo_hand_negative_advantage_floor():
    # logprobs and old swapped: log-ratios seq 0 [-0.1, 0, -0.1], seq 1 [0, -0.2]; A = [-1, +1], eps 0.05 / 0.05
    # seq 0 (A = -1): floored at -0.05 -> [-0.05, 0, -0.05], ratio exp(-0.03333333) = 0.96721610, loss +0.96721610
    # seq 1 (A = +1): cap 0.05 does not bind -> ratio exp(-0.1) = 0.90483742, loss -0.90483742
    # mean: (0.96721610 - 0.90483742) / 2 = 0.03118934
    lp, old, adv, mask = hand_inputs(adv=(-1.0, 1.0), swap=True)
    loss, grad, m = loss_and_grad(lp, old, adv, mask, objective=gmpo_loss, clip_low=0.05, clip_high=0.05)
    close(loss, 0.03118934, atol=1e-8)
    # seq 0 token 1: +0.96721610 / 6 = 0.16120268; seq 1: -0.90483742 / 4 = -0.22620935 on both tokens
    close(grad, [[0.0, 0.16120268, 0.0], [-0.22620935, -0.22620935, 0.0]], atol=1e-8)
    close(m["clip_fraction_token"], 0.4, atol=1e-15)


# Dr. GRPO by hand: 'clip' at token level, eps_low = 0.2, eps_high = 0.1, A = [1, -1] (tests/test_core_policy_loss.py
# TOKEN_HAND): token losses seq 0 [-1.1, -1, -1.1] (the two 1.105 ratios clipped), seq 1 [1, 1.22140276];
# sum -3.2 + 2.22140276 = -0.97859724; N = 2, L = 4: loss = -0.97859724 / 8 = -0.12232466
def test_seq_mean_token_sum_norm_hand():
    lp, old, adv, mask = hand_inputs()
    kw = dict(level="token", clip_low=0.2, clip_high=0.1, aggregation="seq-mean-token-sum-norm", norm_length=4)
    loss, grad, _ = loss_and_grad(lp, old, adv, mask, **kw)
    close(loss, (-3.2 + 1 + E2) / 8)
    close(loss, -0.12232466, atol=1e-8)
    # d l_it / d log pi_it = -A r_it unclipped, 0 clipped; times 1 / (N L) = 1/8, for every sequence alike
    close(grad, [[0.0, -1 / 8, 0.0], [1 / 8, E2 / 8, 0.0]])
    # aggregate itself: a [2, 3] of ones, 5 tokens on the mask -> 5 / (2 * 4); num_sequences replaces N
    ones = torch.ones(2, 3, dtype=F64)
    close(aggregate(ones, mask, "seq-mean-token-sum-norm", norm_length=4), 5 / 8)
    close(aggregate(ones, mask, "seq-mean-token-sum-norm", num_sequences=10, norm_length=4), 5 / 40)


def test_cispo_and_sapo_on_policy_are_the_plain_policy_gradient():
    # r = 1: CISPO's weight is 1, SAPO's gate slope 4 sigma(0)(1 - sigma(0)) = 1, so d l / d log pi_it = -A_i w_it
    # with the aggregation's weight w_it (token-mean: 1 / sum |y|; seq-mean-token-mean: 1 / (N |y_i|))
    lp, _, adv, mask = holed_batch(3)
    n, lengths, total = lp.shape[0], mask.sum(1, keepdim=True).to(F64), mask.sum().to(F64)
    _, g_cispo, _ = loss_and_grad(lp, lp.detach(), adv, mask, objective=cispo_loss, level="token")
    close(g_cispo, -adv[:, None] * mask / total)
    _, g_sapo, _ = loss_and_grad(lp, lp.detach(), adv, mask, objective=sapo_loss, level="token")
    close(g_sapo, -adv[:, None] * mask / (n * lengths))


def test_is_weights_scale_each_objective():
    lp, old, adv, mask = holed_batch(4, scale=0.2)
    w = torch.full(lp.shape, 3.0, dtype=F64) * mask
    for name, level in (("cispo", "token"), ("sapo", "token"), ("gmpo", "sequence")):
        plain, _ = POLICY_LOSSES[name](lp, old, adv, mask, level=level)
        weighted, _ = POLICY_LOSSES[name](lp, old, adv, mask, level=level, is_weights=w)
        close(weighted.detach(), 3 * plain.detach(), atol=1e-12)
    # GMPO: a sequence's weight is the geometric mean of its tokens' (as verl): [2, 8] -> 4, not the mean 5
    lp2, old2, _, mask2 = hand_inputs()
    w2 = torch.tensor([[2.0, 8.0, 4.0], [2.0, 8.0, 0.0]], dtype=F64)  # seq 0: (2*8*4)^(1/3) = 4; seq 1: 4
    adv2 = torch.tensor([1.0, 1.0], dtype=F64)
    plain, _ = gmpo_loss(lp2, old2, adv2, mask2, clip_low=1.0, clip_high=1.0)
    weighted, _ = gmpo_loss(lp2, old2, adv2, mask2, clip_low=1.0, clip_high=1.0, is_weights=w2)
    close(weighted.detach(), 4 * plain.detach(), atol=1e-12)


# ==================================================================================
# (a) loop oracles, float64, padding and a hole in the mask
# ==================================================================================
@pytest.mark.parametrize("token_advantages", [False, True])
@pytest.mark.parametrize("agg", TOKEN_AGGS)
@pytest.mark.parametrize("clip", [(0.2, 0.2), (1.0, 0.1), (0.05, 0.3)])
@pytest.mark.parametrize("seed", range(2))
def test_cispo_matches_loop_oracle(seed, clip, agg, token_advantages):
    lp, old, adv, mask = holed_batch(seed, scale=0.15)
    adv = token_adv(lp, seed) if token_advantages else adv
    kw = dict(level="token", clip_low=clip[0], clip_high=clip[1], aggregation=agg, norm_length=NORM)
    loss, grad, m = loss_and_grad(lp, old, adv, mask, objective=cispo_loss, **kw)
    e_loss, e_grad = grad_of(cispo_loss_loop(lp, old, adv, mask, *clip, agg, norm_length=NORM), lp)
    close(loss, e_loss)
    close(grad, e_grad)
    assert 0 < float(m["clip_fraction_token"]) < 1  # capped and free weights both occur
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).all()  # every token on the mask keeps a gradient


@pytest.mark.parametrize("token_advantages", [False, True])
@pytest.mark.parametrize("agg", TOKEN_AGGS)
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 3.0)])
@pytest.mark.parametrize("seed", range(2))
def test_sapo_matches_loop_oracle(seed, taus, agg, token_advantages):
    lp, old, adv, mask = holed_batch(seed, scale=0.5)
    adv = token_adv(lp, seed) if token_advantages else adv
    kw = dict(level="token", aggregation=agg, norm_length=NORM, sapo_tau_pos=taus[0], sapo_tau_neg=taus[1])
    loss, grad, _ = loss_and_grad(lp, old, adv, mask, objective=sapo_loss, **kw)
    e_loss, e_grad = grad_of(sapo_loss_loop(lp, old, adv, mask, *taus, agg, norm_length=NORM), lp)
    close(loss, e_loss)
    close(grad, e_grad)


@pytest.mark.parametrize("clip", [(0.4, 0.4), (0.1, 0.3), (3.0, 3.0)])
@pytest.mark.parametrize("seed", range(3))
def test_gmpo_matches_loop_oracle(seed, clip):
    lp, old, adv, mask = holed_batch(seed, scale=0.5)
    loss, grad, m = loss_and_grad(lp, old, adv, mask, objective=gmpo_loss, clip_low=clip[0], clip_high=clip[1])
    e_loss, e_grad = grad_of(gmpo_loss_loop(lp, old, adv, mask, *clip), lp)
    close(loss, e_loss)
    close(grad, e_grad)
    if clip[0] < 1:
        assert 0 < float(m["clip_fraction_token"]) < 1  # clipped and free tokens both occur


@pytest.mark.parametrize("agg", TOKEN_AGGS)
def test_clip_token_level_matches_loop_oracle_with_every_aggregation(agg):
    lp, old, adv, mask = holed_batch(5, scale=0.15)
    kw = dict(level="token", clip_low=0.2, clip_high=0.2, aggregation=agg, norm_length=NORM)
    loss, grad, _ = loss_and_grad(lp, old, adv, mask, **kw)
    e_loss, e_grad = grad_of(token_loss_loop(lp, old, adv, mask, 0.2, 0.2, agg, norm_length=NORM), lp)
    close(loss, e_loss)
    close(grad, e_grad)


@pytest.mark.parametrize("name", ["cispo", "sapo", "gmpo"])
def test_float32_matches_the_float64_oracle(name):
    lp, old, adv, mask = holed_batch(21, scale=0.3)
    oracles = {
        "cispo": lambda x: cispo_loss_loop(x, old, adv, mask, 1.0, 0.2, "token-mean"),
        "sapo": lambda x: sapo_loss_loop(x, old, adv, mask, 1.0, 1.05, "seq-mean-token-mean"),
        "gmpo": lambda x: gmpo_loss_loop(x, old, adv, mask, 0.4, 0.4),
    }
    e_loss, e_grad = grad_of(oracles[name](lp), lp)
    lp32 = lp.detach().float().requires_grad_()
    level = "sequence" if name == "gmpo" else "token"
    loss, grad, _ = loss_and_grad(lp32, old.float(), adv.float(), mask, objective=POLICY_LOSSES[name], level=level)
    assert loss.dtype == torch.float32
    close(loss, e_loss, atol=1e-6)
    close(grad, e_grad, atol=1e-6)


@pytest.mark.parametrize("name", ["cispo", "sapo", "gmpo"])
@pytest.mark.parametrize("huge", [1e4, -1e4])
def test_huge_log_ratio_stays_finite(name, huge):
    lp, old, adv, mask = hand_inputs(adv=(1.0, -1.0))
    lp = (lp.detach() + torch.tensor([[huge, 0, 0], [0, 0, 0]], dtype=F64)).requires_grad_()
    level = "sequence" if name == "gmpo" else "token"
    loss, grad, m = loss_and_grad(lp, old, adv, mask, objective=POLICY_LOSSES[name], level=level)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in m.values())


# ==================================================================================
# (c) verl's functions of the same name, read independently
# ==================================================================================
# Written here from verl/trainer/ppo/core_algos.py (volcengine/verl at b178a3c, 2026-01-29): agg_loss,
# compute_policy_loss_cispo, compute_policy_loss_sapo, compute_policy_loss_geo_mean, compute_policy_loss_vanilla,
# compute_policy_loss_gspo, with verl's argument order (old_log_prob first) and its [N, T] advantages, no
# global batch info (dp_size 1) and the default loss_scale_factor.
def verl_agg_loss(loss_mat, loss_mask, mode, loss_scale_factor=None):
    loss_mask = loss_mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum()
    per_seq_sum = (loss_mat * loss_mask).sum(-1)
    n_tokens = loss_mask.sum(-1)
    non_empty = (n_tokens > 0).to(loss_mat.dtype)
    if mode == "seq-mean-token-sum":
        return (per_seq_sum * non_empty).sum() / non_empty.sum()
    if mode == "seq-mean-token-mean":
        return (per_seq_sum / (n_tokens + 1e-8) * non_empty).sum() / non_empty.sum()
    if mode == "seq-mean-token-sum-norm":  # verl: no division by the number of sequences
        return per_seq_sum.sum() / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    raise ValueError(mode)


def verl_cispo(old, lp, adv, mask, clip_low, clip_high, mode, loss_scale_factor=None):
    ratio = torch.exp((lp - old).clamp(-20.0, 20.0))
    weight = ratio.clamp(1 - clip_low, 1 + clip_high).detach()
    clipfrac = ((ratio != ratio.clamp(1 - clip_low, 1 + clip_high)).to(lp.dtype) * mask).sum() / mask.sum()
    return verl_agg_loss(-weight * adv * lp, mask, mode, loss_scale_factor), clipfrac


def verl_sapo(old, lp, adv, mask, tau_pos, tau_neg):
    ratio = torch.exp((lp - old).clamp(-20.0, 20.0))
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return verl_agg_loss(-gate * adv, mask, "seq-mean-token-mean")  # verl ignores loss_agg_mode here


def verl_geo_mean(old, lp, adv, mask, clip_low, clip_high):
    mask = mask.to(lp.dtype)
    log_ratio = lp - old  # verl leaves its +-20 clamp commented out
    sign = torch.sign(adv)
    clamped = log_ratio.clamp(-clip_low, clip_high)
    kept = sign * torch.min(sign * log_ratio, sign * clamped)
    lengths = mask.sum(-1)
    ratio = torch.exp((kept * mask).sum(-1) / (lengths + 1e-8))
    seq_adv = (adv * mask).sum(-1) / (lengths + 1e-8)
    return (-seq_adv * ratio).mean()


def verl_vanilla(old, lp, adv, mask, clip_low, clip_high, mode, clip_ratio_c=3.0):
    ratio = torch.exp((lp - old).clamp(-20.0, 20.0))
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(l1, l2)
    dual = torch.min(-adv * clip_ratio_c, clipped)
    return verl_agg_loss(torch.where(adv < 0, dual, clipped), mask, mode)


def verl_gspo(old, lp, adv, mask, clip_low, clip_high):
    m = mask.to(lp.dtype)
    seq_log_ratio = ((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
    log_s = (lp - lp.detach() + seq_log_ratio.detach()[:, None]).clamp(max=10.0)
    s = torch.exp(log_s)
    losses = torch.maximum(-adv * s, -adv * s.clamp(1 - clip_low, 1 + clip_high))
    return verl_agg_loss(losses, mask, "seq-mean-token-mean")


def expanded(adv, lp):
    return adv if adv.dim() == 2 else adv[:, None].expand_as(lp)


VERL_TOL = dict(atol=1e-12, rtol=5e-8)  # verl divides by (length + 1e-8): up to 2e-8 relative at length 1


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("clip", [(0.2, 0.2), (10.0, 0.2)])  # (10, 0.2): verl's examples/cispo_trainer
@pytest.mark.parametrize("seed", range(2))
def test_cispo_matches_verl(seed, clip, agg):
    lp, old, adv, mask = holed_batch(seed, scale=0.15)
    kw = dict(level="token", clip_low=clip[0], clip_high=clip[1], aggregation=agg)
    loss, grad, m = loss_and_grad(lp, old, adv, mask, objective=cispo_loss, **kw)
    v_loss, v_clipfrac = verl_cispo(old, lp, expanded(adv, lp), mask, *clip, agg)
    e_loss, e_grad = grad_of(v_loss, lp)
    close(loss, e_loss, **VERL_TOL)
    close(grad, e_grad, **VERL_TOL)
    close(m["clip_fraction_token"], v_clipfrac, atol=1e-15)


@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 3.0)])
@pytest.mark.parametrize("seed", range(2))
def test_sapo_matches_verl(seed, taus):
    lp, old, adv, mask = holed_batch(seed, scale=0.5)
    loss, grad, _ = loss_and_grad(
        lp, old, adv, mask, objective=sapo_loss, level="token", sapo_tau_pos=taus[0], sapo_tau_neg=taus[1]
    )
    e_loss, e_grad = grad_of(verl_sapo(old, lp, expanded(adv, lp), mask, *taus), lp)
    close(loss, e_loss, **VERL_TOL)
    close(grad, e_grad, **VERL_TOL)


@pytest.mark.parametrize("clip", [(0.4, 0.4), (0.1, 0.3)])
@pytest.mark.parametrize("seed", range(3))
def test_gmpo_matches_verl_geo_mean(seed, clip):
    lp, old, adv, mask = holed_batch(seed, scale=0.5)
    loss, grad, _ = loss_and_grad(lp, old, adv, mask, objective=gmpo_loss, clip_low=clip[0], clip_high=clip[1])
    # verl's padding holds no garbage in practice, and it does not clamp: give it the batch with 0 off the mask
    lp_v = torch.where(mask, lp, torch.zeros_like(lp))
    e_loss, e_grad = grad_of(verl_geo_mean(torch.where(mask, old, 0.0), lp_v, expanded(adv, lp), mask, *clip), lp)
    close(loss, e_loss, **VERL_TOL)
    close(grad, e_grad, **VERL_TOL)


@pytest.mark.parametrize("seed", range(3))
def test_seq_mean_token_sum_norm_is_verls_divided_by_the_sequences(seed):
    lp, old, adv, mask = holed_batch(seed, scale=0.15)
    x = torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    n = lp.shape[0]
    ours = aggregate(x, mask, "seq-mean-token-sum-norm", norm_length=NORM)
    close(ours * n, verl_agg_loss(x, mask, "seq-mean-token-sum-norm", loss_scale_factor=NORM), atol=1e-12)
    # verl's default L is the padded width T: a constant only when every batch is padded to max_new_tokens
    close(
        aggregate(x, mask, "seq-mean-token-sum-norm", norm_length=lp.shape[1]) * n,
        verl_agg_loss(x, mask, "seq-mean-token-sum-norm"),
        atol=1e-12,
    )


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("seed", range(2))
def test_clip_token_level_matches_verl_vanilla_below_its_dual_clip(seed, agg):
    lp, old, adv, mask = holed_batch(seed, scale=0.15)  # ratios well below verl's dual-clip c = 3
    kw = dict(level="token", clip_low=0.2, clip_high=0.28, aggregation=agg)
    loss, grad, _ = loss_and_grad(lp, old, adv, mask, **kw)
    e_loss, e_grad = grad_of(verl_vanilla(old, lp, expanded(adv, lp), mask, 0.2, 0.28, agg), lp)
    close(loss, e_loss, **VERL_TOL)
    close(grad, e_grad, **VERL_TOL)


@pytest.mark.parametrize("clip", [(3e-4, 4e-4), (0.2, 0.2)])
@pytest.mark.parametrize("seed", range(2))
def test_clip_sequence_token_matches_verl_gspo(seed, clip):
    lp, old, adv, mask = holed_batch(seed, scale=0.02)
    loss, grad, _ = loss_and_grad(lp, old, adv, mask, level="sequence_token", clip_low=clip[0], clip_high=clip[1])
    e_loss, e_grad = grad_of(verl_gspo(old, lp, expanded(adv, lp), mask, *clip), lp)
    close(loss, e_loss, **VERL_TOL)
    close(grad, e_grad, **VERL_TOL)


# ==================================================================================
# (d) micro-batch invariance
# ==================================================================================
CASES = (
    [("cispo", "token", a) for a in TOKEN_AGGS]
    + [("sapo", "token", a) for a in TOKEN_AGGS]
    + [("gmpo", "sequence", None), ("clip", "token", "seq-mean-token-sum-norm")]
)


@pytest.mark.parametrize("name, level, agg", CASES)
def test_micro_batches_sum_to_whole_batch(name, level, agg):
    lp, old, adv, mask = holed_batch(11, n=8, t=9, scale=0.3)
    fn = POLICY_LOSSES[name]
    kw = dict(level=level, aggregation=agg, norm_length=NORM)
    whole, g_whole, _ = loss_and_grad(lp, old, adv, mask, objective=fn, **kw)
    n, total_tokens = lp.shape[0], int(mask.sum())
    parts = [
        fn(lp[s], old[s], adv[s], mask[s], num_sequences=n, num_tokens=total_tokens, **kw)[0]
        for s in (slice(0, 3), slice(3, 8))  # unequal slices
    ]
    summed, g_sum = grad_of(sum(parts), lp)
    close(summed, whole)
    close(g_sum, g_whole)
    # without the global denominators the slices would not add up (the test can tell)
    naive = sum(fn(lp[s], old[s], adv[s], mask[s], **kw)[0] for s in (slice(0, 3), slice(3, 8)))
    assert abs(naive.item() - whole.item()) > 1e-6


# ==================================================================================
# (e) the config: objectives by name, errors that name the field
# ==================================================================================
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(policy_loss="cispo"), r"GSPOConfig.importance_sampling_level='sequence' is not allowed: policy_loss="),
        (dict(policy_loss="sapo", importance_sampling_level="sequence_token"), r"importance_sampling_level='sequ"),
        (dict(policy_loss="gmpo", importance_sampling_level="token"), r"importance_sampling_level='token' is not"),
        (dict(policy_loss="gmpo", loss_aggregation="seq-mean-token-sum"), r"loss_aggregation='seq-mean-token-sum'"),
        (dict(loss_aggregation="seq-mean-token-sum-norm"), r"loss_aggregation='seq-mean-token-sum-norm' is not"),
        (dict(policy_loss="ppo"), r"policy_loss='ppo' is not allowed: expected one of \['clip', 'cispo', 'sapo'"),
        (dict(loss_aggregation_norm_length=512), r"loss_aggregation_norm_length=512 is not allowed: applies only"),
        (
            dict(
                importance_sampling_level="token",
                loss_aggregation="seq-mean-token-sum-norm",
                loss_aggregation_norm_length=0,
            ),
            r"loss_aggregation_norm_length=0 is not allowed: must be >= 1",
        ),
        (dict(policy_loss="sapo", importance_sampling_level="token", sapo_tau_neg=-1.0), r"sapo_tau_neg=-1.0"),
        (dict(policy_loss="clip", importance_sampling_level="token", clip_range=1.5), r"clip_range=1.5 is not"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        GSPOConfig(**overrides)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(), dict(level="sequence", clip_low=3e-4, clip_high=4e-4, aggregation="seq-mean-token-mean")),
        (dict(policy_loss="cispo", importance_sampling_level="token"), dict(clip_low=1.0, aggregation="token-mean")),
        (dict(policy_loss="cispo", importance_sampling_level="token", clip_range_low=10.0), dict(clip_low=10.0)),
        (
            dict(policy_loss="sapo", importance_sampling_level="token", sapo_tau_neg=2.0),
            dict(sapo_tau_pos=1.0, sapo_tau_neg=2.0, aggregation="seq-mean-token-mean"),
        ),
        (dict(policy_loss="gmpo"), dict(level="sequence", clip_low=0.4, clip_high=0.4)),
        (
            dict(importance_sampling_level="token", loss_aggregation="seq-mean-token-sum-norm", max_new_tokens=64),
            dict(aggregation="seq-mean-token-sum-norm", norm_length=64),
        ),
        (
            dict(
                importance_sampling_level="token",
                loss_aggregation="seq-mean-token-sum-norm",
                loss_aggregation_norm_length=100,
            ),
            dict(norm_length=100),
        ),
    ],
)
def test_policy_loss_kwargs_drive_every_objective(overrides, expected):
    cfg = GSPOConfig(**overrides)
    kwargs = cfg.policy_loss_kwargs()
    assert {k: kwargs[k] for k in expected} == expected
    assert cfg.policy_loss in cfg.clip_summary() and f"low={cfg.clip_low:g}" in cfg.clip_summary()
    # the trainer's call, as written in policy_loss_kwargs's docstring
    lp, old, adv, mask = holed_batch(6, scale=0.2)
    weights = torch.ones(lp.shape, dtype=F64) * mask
    loss, m = POLICY_LOSSES[cfg.policy_loss](
        lp, old, adv, mask, num_sequences=6, num_tokens=int(mask.sum()), is_weights=weights, **kwargs
    )
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and g.abs().sum() > 0


def test_dr_grpo_preset():
    from gspo.yaml_config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "examples" / "dr_grpo.yaml"))
    assert (cfg.advantage_type, cfg.use_group_normalization, cfg.normalize_advantages) == ("relative", False, False)
    assert (cfg.policy_loss, cfg.importance_sampling_level) == ("clip", "token")
    assert cfg.policy_loss_kwargs()["aggregation"] == "seq-mean-token-sum-norm"
    assert cfg.policy_loss_kwargs()["norm_length"] == cfg.max_new_tokens


@pytest.mark.parametrize(
    "name, level, agg",
    CASES + [("clip", "sequence", None), ("clip", "sequence_token", None), ("clip", "token", "token-mean")],
)
def test_a_row_with_an_empty_loss_mask_adds_nothing(name, level, agg):
    """mask_truncated_completions zeroes a whole row: its sequence must add exactly 0 to the loss (not -A_i, which
    a length-normalised ratio of an empty row, exp(0) = 1, would give) and 0 to the gradient."""
    lp, old, adv, mask = holed_batch(5, n=6, t=7, scale=0.3)
    fn, kw = POLICY_LOSSES[name], dict(level=level, aggregation=agg, norm_length=NORM)
    keep = torch.tensor([0, 1, 2, 4, 5])
    emptied = mask.clone()
    emptied[3] = 0
    n, n_tok = 6, int(emptied.sum())  # the same denominators for both: the row still counts in the batch
    loss, grad = grad_of(fn(lp, old, adv, emptied, num_sequences=n, num_tokens=n_tok, **kw)[0], lp)
    rest, g_rest = grad_of(
        fn(lp[keep], old[keep], adv[keep], mask[keep], num_sequences=n, num_tokens=n_tok, **kw)[0], lp
    )
    close(loss, rest)
    assert torch.equal(grad[3], torch.zeros_like(grad[3]))
    close(grad[keep], g_rest[keep])


@pytest.mark.parametrize("name, level, agg", CASES + [("clip", "sequence", None), ("clip", "token", "token-mean")])
def test_ratio_metrics_leave_out_a_row_with_an_empty_loss_mask(name, level, agg):
    """A row masked out whole has no ratio: ratio_mean / min / max and clip_fraction_seq are those of the others."""
    lp, old, adv, mask = holed_batch(8, n=6, t=7, scale=0.3)
    fn, kw = POLICY_LOSSES[name], dict(level=level, aggregation=agg, norm_length=NORM)
    emptied = mask.clone()
    emptied[2] = 0
    keep = torch.tensor([0, 1, 3, 4, 5])
    _, m = fn(lp, old, adv, emptied, **kw)
    _, want = fn(lp[keep], old[keep], adv[keep], mask[keep], **kw)
    for key in ("ratio_mean", "ratio_min", "ratio_max", "clip_fraction_seq"):
        close(m[key], want[key])
