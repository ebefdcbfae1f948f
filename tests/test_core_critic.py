"""The critic's math in gspo.core (PPO / VAPO): reward placement, GAE, length-adaptive lambda, the clipped
value loss and the positive-example NLL, by hand and against loop oracles."""

from __future__ import annotations

import pytest
import torch

from gspo.core import (
    gae_advantages,
    length_adaptive_lambda,
    place_sequence_rewards,
    positive_example_nll,
    value_loss,
)


def _gae_loop(rewards, values, mask, gamma, lams):
    n, t_max = rewards.shape
    adv = [[0.0] * t_max for _ in range(n)]
    for i in range(n):
        length = int(mask[i].sum())
        nxt_adv, nxt_v = 0.0, 0.0
        for t in reversed(range(length)):
            delta = float(rewards[i, t]) + gamma * nxt_v - float(values[i, t])
            nxt_adv = delta + gamma * float(lams[i]) * nxt_adv
            adv[i][t] = nxt_adv
            nxt_v = float(values[i, t])
    adv = torch.tensor(adv, dtype=torch.float64)
    return adv, (adv + values) * mask


def test_gae_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # gamma 1, lambda 0.5 (the padded 4th position is ignored):
    # t=2: delta = 1 + 0 - 3 = -2, A = -2; t=1: delta = 0 + 3 - 2 = 1, A = 1 + 0.5 * -2 = 0;
    # t=0: delta = 0 + 2 - 1 = 1, A = 1 + 0.5 * 0 = 1. Returns = A + V = [2, 2, 1].
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv.tolist() == [[1.0, 0.0, -2.0, 0.0]]
    assert ret.tolist() == [[2.0, 2.0, 1.0, 0.0]]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_matches_the_loop_with_one_lambda_per_sequence(gamma):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 7, generator=g, dtype=torch.float64)
    values = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = (torch.arange(7)[None, :] < torch.tensor([7, 3, 1, 0])[:, None]).long()
    lams = torch.tensor([0.95, 0.5, 1.0, 0.0], dtype=torch.float64)
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lams)
    want_adv, want_ret = _gae_loop(rewards, values, mask, gamma, lams)
    assert torch.allclose(adv, want_adv, rtol=0, atol=1e-12)
    assert torch.allclose(ret, want_ret, rtol=0, atol=1e-12)


def test_gae_with_lambda_and_gamma_one_and_a_terminal_reward_is_r_minus_v():
    values = torch.tensor([[0.3, -0.2, 0.7, 0.1, 0.0], [0.5, 0.25, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    rewards = place_sequence_rewards(torch.tensor([2.0, -1.0], dtype=torch.float64), mask)
    adv, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    want = (torch.tensor([2.0, -1.0], dtype=torch.float64)[:, None] - values) * mask  # A_t = R - V_t
    assert torch.allclose(adv, want, rtol=0, atol=1e-12)


def test_sequence_reward_sits_on_the_last_completion_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    placed = place_sequence_rewards(torch.tensor([2.0, 3.0, 4.0]), mask)
    assert placed.tolist() == [[0.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_gae_skips_tokens_off_the_loss_mask_by_hand():
    """A hole (a tool's tokens, attended to, not the policy's) is skipped: the next policy token's V and A carry over
    it. gamma 1, lambda 0.5; policy tokens t = 0, 1, 3 (t = 2 is the hole, its V and r are ignored):
    t=3: delta = 1 + 0 - 4 = -3, A = -3; t=1: delta = 0 + V_3 - V_1 = 4 - 2 = 2, A = 2 + 0.5 * -3 = 0.5;
    t=0: delta = 0 + 2 - 1 = 1, A = 1 + 0.5 * 0.5 = 1.25. Returns A + V = [2.25, 2.5, 0, 1]."""
    values = torch.tensor([[1.0, 2.0, 9.0, 4.0]])
    mask = torch.tensor([[1, 1, 0, 1]])
    rewards = place_sequence_rewards(torch.tensor([1.0]), mask)
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    adv, ret = gae_advantages(rewards + torch.tensor([[0.0, 0.0, 7.0, 0.0]]), values, mask, gamma=1.0, lam=0.5)
    assert adv.tolist() == [[1.25, 0.5, 0.0, -3.0]]
    assert ret.tolist() == [[2.25, 2.5, 0.0, 1.0]]


def test_the_reward_sits_on_the_last_policy_token_not_the_last_attended_one():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]])  # loss masks: a tool's tokens at the end / middle
    placed = place_sequence_rewards(torch.tensor([2.0, 3.0, 4.0]), mask)
    assert placed.tolist() == [[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 4.0, 0.0]]


def test_length_adaptive_lambda():
    # 1 - 1/(0.05 * 10) = -1 -> 0; 1 - 1/(0.05 * 20) = 0; 1 - 1/(0.05 * 100) = 0.8
    got = length_adaptive_lambda(torch.tensor([10, 20, 100]), alpha=0.05)
    assert got.tolist() == pytest.approx([0.0, 0.0, 0.8], abs=1e-7)
    assert length_adaptive_lambda(torch.tensor([0]), alpha=0.05).tolist() == [0.0]


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 1.0]], requires_grad=True)
    old = torch.tensor([[0.5, 2.0, 2.0]])
    returns = torch.tensor([[0.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1]])
    # c = 0.2: clipped V = [0.7, 2.0, 1.8]; (V - R)^2 = [1, 1, 1]; (clip - R)^2 = [0.49, 1, 3.24]
    # max = [1, 1, 3.24] -> 0.5 * mean = 0.5 * 5.24 / 3; the clipped term is larger on 1 token of 3
    loss, m = value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * 5.24 / 3, rel=1e-6)
    assert m["value_clip_fraction"].item() == pytest.approx(1 / 3)
    # explained variance: residual R - V = [-1, 1, -1] (var 8/9), Var(R) = 2 -> 1 - (8/9)/2 = 5/9
    assert m["explained_variance"].item() == pytest.approx(5 / 9, rel=1e-6)
    loss.backward()
    # d/dV of 0.5 * (V - R)^2 / 3 where unclipped wins: (V - R) / 3 = [1/3, -1/3]; the clipped token is flat
    assert values.grad.tolist()[0] == pytest.approx([1 / 3, -1 / 3, 0.0], abs=1e-7)


def test_positive_example_nll_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -0.5, -0.5], [-3.0, -3.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    positive = torch.tensor([True, True, False])
    # -(-1 - 2 - 0.5 * 3) / 5 tokens = 4.5 / 5
    assert positive_example_nll(logp, mask, positive).item() == pytest.approx(0.9)
    assert positive_example_nll(logp, mask, positive, num_tokens=9.0).item() == pytest.approx(0.5)
    assert positive_example_nll(logp, mask, torch.tensor([False] * 3)).item() == 0.0
