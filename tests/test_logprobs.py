"""gspo.logprobs: the bounded output head gives the full-logits result, and never holds [n, T, V]."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from gspo.logprobs import HeadMode, _final_hidden, completion_logprobs
from gspo.models import load_tokenizer
from gspo.rollout import left_pad


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    prompts = ["12+3=", "7*8=", "100-1=", "5="]
    completions = ["15", "56<eos>", "99", "5555"]
    p_ids, p_mask = left_pad([tok.encode(p) for p in prompts], tok.pad_token_id)
    c_list = [tok.encode(c) for c in completions]
    width = max(len(c) for c in c_list)
    c_ids = torch.full((4, width), tok.pad_token_id)
    c_mask = torch.zeros((4, width), dtype=torch.long)
    for i, c in enumerate(c_list):
        c_ids[i, : len(c)], c_mask[i, : len(c)] = torch.tensor(c), 1
    return p_ids, p_mask, c_ids, c_mask


def _run(model, batch, bounded: bool, entropy_mode):
    model.zero_grad()
    with_entropy, entropy_grad = entropy_mode is not None, entropy_mode == "grad"
    logp, ent = completion_logprobs(
        model,
        *batch,
        temperature=0.7,
        chunk_size=5,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
        head=HeadMode.RECOMPUTED if bounded else HeadMode.WHOLE,
    )
    loss = (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum()
    if entropy_mode == "grad":
        loss = loss + 0.3 * ent.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), (ent.detach() if ent is not None else None), grads


@pytest.mark.parametrize("entropy_mode", [None, "metric", "grad"])
def test_bounded_head_matches_full_logits_values_and_gradients(tiny_model_dir, batch, entropy_mode):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    p_ids, p_mask, c_ids, c_mask = batch
    with torch.no_grad():  # the bounded path is really taken for this model, not a silent fallback
        assert _final_hidden(model, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), keep=3) is not None
    lp_full, ent_full, g_full = _run(model, batch, False, entropy_mode)
    lp_b, ent_b, g_b = _run(model, batch, True, entropy_mode)
    assert torch.allclose(lp_b, lp_full, atol=1e-6, rtol=0)
    if entropy_mode is not None:
        assert torch.allclose(ent_b, ent_full, atol=1e-6, rtol=0)
    assert g_b.keys() == g_full.keys() and len(g_b) > 0
    for name in g_full:
        assert torch.allclose(g_b[name], g_full[name], atol=1e-6, rtol=1e-5), name


def test_bounded_head_never_keeps_vocab_by_length_tensors(batch):
    """Largest non-parameter storage autograd keeps for backward (a saved view keeps its whole base
    alive), on a model whose vocabulary (4096) dwarfs its width (16): with the bounded head at most one
    chunk of fp32 logits (5 tokens x V x 4 bytes); with full logits the [n, T, V] block (4 x 4 x V x 4)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=4096,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    vocab, params = 4096, {p.untyped_storage().data_ptr() for p in model.parameters()}
    for bounded in (True, False):
        biggest = [0]

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                biggest[0] = max(biggest[0], t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp, _ = completion_logprobs(
                model, *batch, chunk_size=5, head=HeadMode.RECOMPUTED if bounded else HeadMode.WHOLE
            )
        logp.sum().backward()
        if bounded:
            assert 0 < biggest[0] <= 5 * vocab * 4
        else:
            assert biggest[0] >= 4 * 4 * vocab * 4


class _ScaledLogits(LlamaForCausalLM):
    """Stands in for models that transform logits after the head (Gemma-2 soft-capping, Cohere scale)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_bounded_head_falls_back_when_logits_are_not_the_heads_output(tiny_model_dir, batch):
    model = _ScaledLogits.from_pretrained(tiny_model_dir).eval()
    p_ids, p_mask, c_ids, c_mask = batch
    with torch.no_grad():
        assert _final_hidden(model, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), keep=3) is None
        full, _ = completion_logprobs(model, *batch, head=HeadMode.WHOLE)
        bounded, _ = completion_logprobs(model, *batch, head=HeadMode.RECOMPUTED)
    assert torch.allclose(bounded, full, atol=1e-6, rtol=0)
    # the doubled logits really are used: log-probs differ from the plain model's
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(completion_logprobs(plain, *batch)[0], full, atol=1e-3)


@pytest.mark.parametrize("limit,expect_recompute", [(1 << 30, False), (1000, True)])
def test_auto_bound_follows_the_logits_size(tiny_model_dir, batch, limit, expect_recompute):
    """head=HeadMode.CHUNKED: the head runs chunk by chunk from the final hidden states; its chunks are
    recomputed in backward only when a micro-batch's fp32 logits would exceed the limit (here 4 rows x
    4 tokens x 19 symbols x 4 bytes = 1216 bytes). Values and gradients equal the one-call head's.
    Seen from outside: head calls during backward (a forward hook) happen only when chunks are recomputed."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.vocab_size == 19
    phase, calls = ["forward"], {"forward": 0, "backward": 0}
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.__setitem__(phase[0], calls[phase[0]] + 1))
    auto, _ = completion_logprobs(model, *batch, head=HeadMode.CHUNKED, recompute_above_bytes=limit)
    phase[0] = "backward"
    auto.sum().backward()
    # forward: the narrowed call inside the model, its exactness check, then the 16 positions in one chunk
    assert calls == {"forward": 2 + 1, "backward": 1 if expect_recompute else 0}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full, _ = completion_logprobs(model, *batch, head=HeadMode.WHOLE)
    full.sum().backward()
    assert torch.allclose(auto, full, atol=1e-6, rtol=0)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=0), n


# ------------------------------------------------------------------------- gspo.kernels.label_logprob
def test_label_logprob_hand_values():
    from gspo.kernels import label_logprob

    # logits [0, 0, ln 2] -> p = [1/4, 1/4, 1/2]; label 2: log p = ln(1/2) = -0.693147;
    # H = -(2 * 1/4 * ln(1/4) + 1/2 * ln(1/2)) = 0.5 * 1.386294 + 0.5 * 0.693147 = 1.039721
    logits = torch.tensor([[0.0, 0.0, 0.6931471805599453]], requires_grad=True)
    logp, entropy = label_logprob(logits, torch.tensor([2]), with_entropy=True)
    torch.testing.assert_close(logp, torch.tensor([-0.693147]), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, torch.tensor([1.039721]), atol=1e-6, rtol=0)
    assert not entropy.requires_grad
    logp.sum().backward()  # d log p_2 / d z = onehot(2) - p = [-1/4, -1/4, 1/2]
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.25, -0.25, 0.5]]), atol=1e-7, rtol=0)
    assert label_logprob(logits, torch.tensor([2]))[1] is None


def test_label_logprob_matches_log_softmax_oracle_and_gradcheck():
    from gspo.kernels import label_logprob

    torch.manual_seed(0)
    x = (torch.randn(16, 300, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, 300, (16,))
    assert torch.autograd.gradcheck(lambda z: label_logprob(z, labels)[0], (x,))
    assert torch.autograd.gradcheck(lambda z: label_logprob(z, labels, entropy_grad=True), (x,))
    weights = torch.randn(16, dtype=torch.float64)
    logp, entropy = label_logprob(x, labels, with_entropy=True)
    (logp * weights).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    ls = torch.log_softmax(x, -1)  # float64 oracle
    (ls.gather(-1, labels[:, None]).squeeze(-1) * weights).sum().backward()
    torch.testing.assert_close(logp, ls.gather(-1, labels[:, None]).squeeze(-1).detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, -(ls.exp() * ls).sum(-1).detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(ours, x.grad, atol=1e-12, rtol=0)
    # float32 at a real vocabulary: within float32 rounding of the float64 values (measured <= 3.3e-5 on H ~ 8)
    z = torch.randn(64, 32768) * 2
    lab = torch.randint(0, 32768, (64,))
    lp32, h32 = label_logprob(z, lab, with_entropy=True)
    ls64 = torch.log_softmax(z.double(), -1)
    assert (lp32.double() - ls64.gather(-1, lab[:, None]).squeeze(-1)).abs().max() < 1e-5
    assert (h32.double() + (ls64.exp() * ls64).sum(-1)).abs().max() < 1e-4
    assert (label_logprob(z, lab, entropy_grad=True)[0] - lp32).abs().max() == 0  # the entropy-gradient path agrees


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_label_logprob_row_blocks_match_the_oracle_and_leave_the_logits_alone(dtype, monkeypatch):
    """On CPU the Function works a block of rows at a time; a ragged last block, every dtype."""
    import gspo.kernels as kernels

    torch.manual_seed(2)
    vocab = 1000
    monkeypatch.setattr(kernels, "_BLOCK_BYTES", 3 * 4 * vocab)  # 3 rows per block: 11 rows -> 3, 3, 3, 2
    x = (torch.randn(11, vocab, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    before = x.detach().clone()
    labels = torch.randint(0, vocab, (11,))
    weights, entropy_weights = torch.randn(11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    assert [r.stop - r.start for r in kernels._row_blocks(x)] == [3, 3, 3, 2]
    logp, entropy = kernels.label_logprob(x, labels, entropy_grad=True)  # gradients through both outputs
    (logp.double() * weights + entropy.double() * entropy_weights).sum().backward()
    assert torch.equal(x.detach(), before)  # in-place work only on the Function's own copies
    ref = x.detach().double().requires_grad_()  # float64 oracle on the same (rounded) logits
    ls = torch.log_softmax(ref, -1)
    (ls.gather(-1, labels[:, None]).squeeze(-1) * weights - (ls.exp() * ls).sum(-1) * entropy_weights).sum().backward()
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6}[dtype]  # math in >= float32
    torch.testing.assert_close(logp.double(), ls.gather(-1, labels[:, None]).squeeze(-1).detach(), atol=tol, rtol=0)
    torch.testing.assert_close(entropy.double(), -(ls.exp() * ls).sum(-1).detach(), atol=10 * tol, rtol=0)
    grad_tol = 1e-12 if dtype == torch.float64 else (1e-6 if dtype == torch.float32 else 8e-3)  # bf16 gradient
    torch.testing.assert_close(x.grad.double(), ref.grad, atol=grad_tol, rtol=0)


def test_label_logprob_bf16_logits_get_a_bf16_gradient_from_float32_math():
    from gspo.kernels import label_logprob

    torch.manual_seed(1)
    x = (torch.randn(8, 50) * 2).bfloat16().requires_grad_()
    labels = torch.randint(0, 50, (8,))
    logp, entropy = label_logprob(x, labels, with_entropy=True)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    logp.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    ref = x.detach().float().requires_grad_()
    torch.log_softmax(ref, -1).gather(-1, labels[:, None]).sum().backward()
    torch.testing.assert_close(
        logp, torch.log_softmax(x.detach().float(), -1).gather(-1, labels[:, None]).squeeze(-1), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(x.grad.float(), ref.grad, atol=4e-3, rtol=0)  # bf16 rounding of the gradient


def test_nan_logits_do_not_disable_the_chunked_head_for_the_model_class(tiny_model_dir, batch):
    """A NaN forward (a diverged step) must not blacklist the class: the next finite call takes the head path."""
    import gspo.logprobs as lp_module

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    p_ids, p_mask, c_ids, c_mask = batch
    ids, mask = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1)
    with torch.no_grad():
        weight = model.lm_head.weight.clone()
        model.lm_head.weight.fill_(float("nan"))
        _final_hidden(model, ids, mask, keep=3)
        model.lm_head.weight.copy_(weight)
        assert type(model) not in lp_module._HEAD_NOT_FINAL
        assert _final_hidden(model, ids, mask, keep=3) is not None
