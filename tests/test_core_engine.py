"""The engine-likelihood math in gspo.core: mismatch terms and truncated IS weights, each against a slow
loop oracle and a hand-computed case; policy_loss with IS weights; the config rules around them."""

from __future__ import annotations

import math

import pytest
import torch

from gspo.config import ConfigError, GSPOConfig
from gspo.core import ENGINE_MISMATCH_TERMS, engine_is_weights, engine_mismatch_terms, policy_loss


def _case(seed=0, n=5, t=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    engine = logp + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.3
    lengths = torch.tensor([6, 3, 1, 0, 4])[:n]
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return logp, engine, mask


def _terms_loop(logp, engine, mask):
    abs_sum, tokens, biggest, seq_sum, seqs = 0.0, 0.0, 0.0, 0.0, 0.0
    for i in range(logp.shape[0]):
        diffs = [float(logp[i, t] - engine[i, t]) for t in range(logp.shape[1]) if mask[i, t]]
        abs_sum += sum(abs(d) for d in diffs)
        tokens += len(diffs)
        biggest = max([biggest] + [abs(d) for d in diffs])
        if diffs:
            seq_sum += abs(sum(diffs) / len(diffs))
            seqs += 1
    return [abs_sum, tokens, biggest, seq_sum, seqs]


def test_mismatch_terms_match_the_loop():
    logp, engine, mask = _case()
    got = engine_mismatch_terms(logp, engine, mask).tolist()
    assert got == pytest.approx(_terms_loop(logp, engine, mask), rel=1e-12, abs=1e-12)
    assert len(got) == len(ENGINE_MISMATCH_TERMS)


def test_mismatch_terms_by_hand():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    engine = torch.tensor([[-1.5, -1.0, -9.0], [-0.25, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # diffs: row 0: +0.5, -1.0 (third masked); row 1: -0.25
    # abs sum 1.75 over 3 tokens, max 1.0; sequence log-ratios: (0.5 - 1.0)/2 = -0.25, -0.25 -> |.| sum 0.5
    assert engine_mismatch_terms(logp, engine, mask).tolist() == pytest.approx([1.75, 3.0, 1.0, 0.5, 2.0])


def _weights_loop(old, engine, mask, mode, cap):
    w = torch.zeros_like(old)
    for i in range(old.shape[0]):
        idx = [t for t in range(old.shape[1]) if mask[i, t]]
        if not idx:
            continue
        s = math.exp(sum(float(old[i, t] - engine[i, t]) for t in idx) / len(idx))
        for t in idx:
            if mode == "token_truncate":
                w[i, t] = min(math.exp(float(old[i, t] - engine[i, t])), cap)
            elif mode == "sequence_truncate":
                w[i, t] = min(s, cap)
            else:
                w[i, t] = 1.0 if 1 / cap <= s <= cap else 0.0
    return w


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("cap", [1.1, 3.0])
def test_is_weights_match_the_loop(mode, cap):
    old, engine, mask = _case(seed=1)
    got = engine_is_weights(old, engine, mask, mode=mode, cap=cap)
    assert torch.allclose(got, _weights_loop(old, engine, mask, mode, cap), rtol=1e-12, atol=1e-12)


def test_is_weights_by_hand():
    old = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    engine = torch.tensor([[-math.log(4.0), 0.0], [math.log(2.0), 0.0]])  # pi_old / pi_engine = 4, 1 | 1/2, 1
    mask = torch.tensor([[1, 1], [1, 0]])
    token = engine_is_weights(old, engine, mask, mode="token_truncate", cap=3.0)
    assert token.flatten().tolist() == pytest.approx([3.0, 1.0, 0.5, 0.0])  # 4 capped at 3
    seq = engine_is_weights(old, engine, mask, mode="sequence_truncate", cap=3.0)
    assert seq.flatten().tolist() == pytest.approx([2.0, 2.0, 0.5, 0.0])  # exp(mean(log 4, 0)) = 2; exp(log 1/2)
    masked = engine_is_weights(old, engine, mask, mode="sequence_mask", cap=1.5)
    assert masked.tolist() == [[0.0, 0.0], [0.0, 0.0]]  # 2 > 1.5 and 1/2 < 1/1.5: both sequences dropped


def test_policy_loss_weights_scale_each_sequence_or_token():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.ones(2, 2)
    weights = torch.tensor([[2.0, 2.0], [0.5, 0.5]])
    # on-policy ratio 1 (no clipping): sequence loss = -mean_i(w_i * A_i) = -(2*1 + 0.5*-2)/2 = -0.5
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, level="sequence", is_weights=weights)
    assert loss.item() == pytest.approx(-0.5)
    # token level, seq-mean-token-mean: per sequence mean_t(w * A) -> 2, -1; loss = -(2 - 1)/2 = -0.5
    loss, _ = policy_loss(
        logp, logp.detach(), adv, mask, level="token", clip_low=0.2, clip_high=0.2, is_weights=weights
    )
    assert loss.item() == pytest.approx(-0.5)
    unweighted, _ = policy_loss(logp, logp.detach(), adv, mask, level="token", clip_low=0.2, clip_high=0.2)
    assert unweighted.item() == pytest.approx(0.5)  # -(1 - 2)/2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(old_logprobs_source="engine"), "needs rollout_engine='vllm'"),
        (
            dict(rollout_engine="vllm", old_logprobs_source="engine", importance_sampling_level="token"),
            "is for the sequence levels",
        ),
        (dict(engine_is_correction="sequence_mask"), "needs rollout_engine='vllm' and old_logprobs_source='trainer'"),
        (dict(rollout_engine="vllm", engine_is_cap=1.0), "engine_is_cap=1.0 is not allowed"),
        (dict(rollout_engine="vllm", engine_mismatch_tolerance=0.0), "engine_mismatch_tolerance=0.0"),
        (dict(rollout_engine="vllm", vllm_gpu_memory_utilization=1.5), "vllm_gpu_memory_utilization=1.5"),
        (dict(rollout_engine="vllm", vllm_max_model_len=8, max_new_tokens=16), "must exceed max_new_tokens=16"),
        (dict(rollout_engine="sglang"), "expected one of \\['hf', 'vllm'\\]"),
    ],
)
def test_engine_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        GSPOConfig(**overrides)


def test_engine_settings_that_are_allowed():
    cfg = GSPOConfig(rollout_engine="vllm", old_logprobs_source="engine", importance_sampling_level="sequence_token")
    assert cfg.old_logprobs_source == "engine"
    cfg = GSPOConfig(rollout_engine="vllm", engine_is_correction="token_truncate", importance_sampling_level="token")
    assert cfg.engine_is_correction == "token_truncate"
