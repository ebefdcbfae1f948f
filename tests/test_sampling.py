"""Rollout sampling: the distribution is softmax(logits / T) after top-k / top-p and nothing else."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from gspo.engines import generate_rollout
from gspo.models import load_tokenizer
from gspo.sampling import filter_logits, plain_generation, sample_tokens

P4 = torch.tensor([[0.1, 0.2, 0.3, 0.4]])


def _kept_probs(**kw):
    return filter_logits(P4.log(), **kw).softmax(-1)


def test_filter_logits_hand_values():
    assert torch.allclose(_kept_probs(), P4, atol=1e-7)
    # top_k=2 keeps 0.3, 0.4 -> renormalised 3/7, 4/7
    assert torch.allclose(_kept_probs(top_k=2), torch.tensor([[0, 0, 3 / 7, 4 / 7]]), atol=1e-7)
    # top_p=0.45: {0.4} holds 0.4 < 0.45, so 0.3 joins -> 3/7, 4/7
    assert torch.allclose(_kept_probs(top_p=0.45), torch.tensor([[0, 0, 3 / 7, 4 / 7]]), atol=1e-7)
    # top_p=0.35: {0.4} already holds 0.4 >= 0.35 -> only it
    assert torch.allclose(_kept_probs(top_p=0.35), torch.tensor([[0, 0, 0, 1.0]]), atol=1e-7)
    # temperature 2: p ** (1/2) renormalised; sqrt(.1)+sqrt(.2)+sqrt(.3)+sqrt(.4) = 2.1605...
    root = P4.sqrt()
    assert torch.allclose(_kept_probs(temperature=2.0), root / root.sum(), atol=1e-7)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9), (1.3, 20, 0.8), (0.5, 3, 0.3)],
)
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    """Oracle: transformers' own warpers, applied in generate's order (temperature, top-k, top-p)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    expected = logits.clone()
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got.softmax(-1), expected.softmax(-1), atol=1e-6)


def _loop_sample(probs_row: list, u01: float) -> int:
    """Slow oracle: walk the cumulative sum until it passes u * total."""
    target, acc = u01 * math.fsum(probs_row), 0.0
    for i, p in enumerate(probs_row):
        acc += p
        if acc > target and p > 0:
            return i
    return max(range(len(probs_row)), key=lambda i: probs_row[i])


@pytest.mark.parametrize("vocab, top_k", [(30, 10), (1000, 0), (1000, 40), (32768, 0)])  # 1 block; 4, some empty; 128
def test_sample_tokens_matches_loop_oracle(vocab, top_k):
    torch.manual_seed(1)
    logits = torch.randn(64, vocab) * 2
    got = sample_tokens(logits, top_k=top_k, generator=torch.Generator().manual_seed(5))
    u = torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    probs = filter_logits(logits, top_k=top_k).softmax(-1).double()
    expected = [_loop_sample(probs[i].tolist(), float(u[i])) for i in range(64)]
    assert got.tolist() == expected


def test_sample_tokens_frequencies_and_zero_mass():
    # 200k draws of [0.1, 0.2, 0.3, 0.4]: each frequency within 4 standard errors (sd <= sqrt(.25/2e5) = 0.0011)
    draws = sample_tokens(P4.log().expand(200_000, 4), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert torch.allclose(freq, P4[0].double(), atol=4 * 0.0011)
    # top_k=2: the two small tokens have zero mass and never appear
    draws = sample_tokens(P4.log().expand(20_000, 4), top_k=2, generator=torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {2, 3}


def test_sample_tokens_one_hot_row_and_extreme_logits():
    logits = torch.full((3, 1000), -1e4)
    logits[0, 7], logits[1, 999], logits[2, 0] = 0.0, 0.0, 0.0
    assert sample_tokens(logits).tolist() == [7, 999, 0]


def test_plain_generation_blanks_logit_changing_fields_and_restores(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.suppress_tokens = [5]
    original = model.generation_config
    with plain_generation(model):
        assert model.generation_config.repetition_penalty is None
        assert model.generation_config.suppress_tokens is None
        assert model.generation_config.eos_token_id == original.eos_token_id
    assert model.generation_config is original and original.repetition_penalty == 3.0


def test_rollout_samples_the_policy_distribution_only(tiny_model_dir):
    """Tokens from generate_rollout equal a hand-written decode loop (full forward each step,
    filter_logits + inverse CDF with the same RNG stream), although the model's generation_config
    asks for a repetition penalty, an n-gram ban, suppressed tokens and top-k 3."""
    tok = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    gc = model.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.suppress_tokens, gc.top_k = 4.0, 1, [5, 6, 7], 3
    gc.eos_token_id = None  # every row runs all steps
    rows = [{"prompt": p, "prompt_ids": tok.encode(p)} for p in ("12+3=", "7*8=")]
    torch.manual_seed(123)
    rollout = generate_rollout(model, tok, rows, group_size=3, max_new_tokens=5, temperature=1.5, top_k=8)

    torch.manual_seed(123)
    ids = rollout.prompt_ids.clone()
    mask = rollout.prompt_mask.clone()
    picked = []
    with torch.no_grad():
        for _ in range(5):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            nxt = sample_tokens(logits, temperature=1.5, top_k=8)
            picked.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    expected = torch.stack(picked, 1)
    # the tokenizer's EOS still ends a row; compare up to and including it
    assert torch.equal(rollout.completion_ids[rollout.completion_mask.bool()], expected[rollout.completion_mask.bool()])
    assert rollout.completion_mask.sum() >= 6
