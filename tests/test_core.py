"""Tests of gspo.core outside the policy loss: group advantages, KL estimators and controllers, chunked
log-probs and entropy, aggregation edge cases, against hand-computed values (arithmetic in the comments)
and the slow loop oracles in tests/oracles.py. The policy loss itself: tests/test_core_policy_loss.py.

Tolerances are tight on purpose: float64 comparisons use atol=1e-12 where the computation
is the same up to rounding, and 1e-7 against hand values written to 8 digits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from oracles import (
    group_advantages_loop,
    k3_loop,
)

from gspo import core
from gspo.core import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    group_advantages,
    kl_penalty,
    kl_per_token,
    masked_mean,
    policy_loss,
)
from gspo.kernels import logprobs_and_entropy
from loss_cases import AGGS, F64, LEVEL_AGGS, close, loss_and_grad, random_batch


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
@pytest.mark.parametrize(
    "values,dtype",
    [
        ([0.1] * 7, torch.float32),  # float32 mean of seven 0.1 is off by 7e-9, std 8e-9
        ([0.9] * 3, torch.float32),  # float32 mean off by 6e-8
        ([0.1] * 3, F64),  # float64 mean 0.10000000000000002
        ([5.0] * 4, torch.float32),
    ],
)
def test_group_advantages_equal_rewards_exactly_zero(values, dtype, normalize):
    r = torch.tensor(values, dtype=dtype)
    assert (r - r.mean() != 0).any() or values[0] == 5.0  # the naive formula would not be 0
    other = torch.tensor([0.0, 1.0] + [0.0] * (len(values) - 2), dtype=dtype)
    adv = group_advantages(torch.cat([r, other]), len(values), normalize=normalize)
    assert torch.isfinite(adv).all()
    assert (adv[: len(values)] == 0).all()  # exactly zero, not ~1e-8 or ~1 (1e-8 / 8e-9)
    assert (adv[len(values) :] != 0).any()
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
    rewards[group : 2 * group] = torch.randint(0, 2, (group,), generator=g).float()  # binary rewards
    expected = group_advantages_loop(rewards.tolist(), group, normalize)
    close(group_advantages(rewards, group, normalize), expected, atol=2e-6, rtol=1e-6)


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
