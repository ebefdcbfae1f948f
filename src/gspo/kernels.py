"""Token log-probs and entropy from logits, one chunk of the vocabulary at a time: the memory kernel.

Not RL math (that is gspo.core): the log-probability of the sampled tokens and the policy's entropy, computed
without ever holding a [tokens, vocabulary] tensor of probabilities beyond one chunk. gspo.logprobs drives it
from a model's hidden states; `logprobs_and_entropy` is the entry point for [N, T, V] logits.
"""

from __future__ import annotations

from typing import Optional

import torch


class _LabelLogprob(torch.autograd.Function):
    """log p(label) with the entropy as a by-product; backward recomputes the softmax from the saved
    logits (a view: no [C, V] tensor is stored) and writes the gradient in place, without the
    zero-filled [C, V] buffer that gather's backward allocates. The entropy gets a gradient only
    when asked (entropy_grad): then H is saved too, one value per row."""

    @staticmethod
    def forward(ctx, logits, labels, with_entropy: bool, entropy_grad: bool):  # [C, V], [C]
        with torch.autocast(logits.device.type, enabled=False):  # float32 math even under bf16 autocast
            logp, lse, entropy = _logsumexp_pass(logits, labels, with_entropy)
        ctx.save_for_backward(logits, labels, lse, entropy if entropy_grad else None)
        if entropy is not None and not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):  # [C], [C] or None
        logits, labels, lse, entropy = ctx.saved_tensors
        dtype = _math_dtype(logits)
        upcast = dtype != logits.dtype  # then logits[rows].to(dtype) is our own copy: work on it in place
        grad = torch.empty_like(logits)  # [C, V] in the logits' dtype
        g = grad_logp[:, None].to(dtype)  # [C, 1]
        gh = grad_entropy[:, None].to(dtype) if entropy is not None and grad_entropy is not None else None
        for rows in _row_blocks(logits):
            z = logits[rows].to(dtype)  # [b, V]
            logp_all = z.sub_(lse[rows]) if upcast else z - lse[rows]  # [b, V] log p_v
            if gh is None:
                block = logp_all.exp_().mul_(-g[rows])  # d log p_y / d z_v = 1[v = y] - p_v
            else:  # d H / d z_v = -p_v (log p_v + H)
                p = logp_all.exp()
                block = logp_all.add_(entropy[rows, None]).mul_(gh[rows]).add_(g[rows]).mul_(p).neg_()
            block.scatter_add_(1, labels[rows, None], g[rows])
            grad[rows] = block
        return grad, None, None, None


def _logsumexp_pass(logits, labels, with_entropy: bool):
    """[C, V] -> ([C] log p(label), [C, 1] logsumexp, [C] entropy or None), float32 math or better.

    A block of rows at a time: the float32 temporaries of one block stay in cache and are reused,
    where whole-chunk [C, V] buffers each cost a pass through memory plus page faults on first touch."""
    dtype = _math_dtype(logits)
    upcast = dtype != logits.dtype  # then logits[rows].to(dtype) is our own copy: work on it in place
    z_label = logits.gather(-1, labels[:, None]).to(dtype)  # [C, 1]
    lse, entropy = torch.empty_like(z_label), (torch.empty_like(z_label) if with_entropy else None)
    for rows in _row_blocks(logits):
        z = logits[rows].to(dtype)  # [b, V]: our copy when upcast, else a view of the caller's logits
        m = z.amax(dim=-1, keepdim=True)  # [b, 1]
        centered = z.sub_(m) if upcast else z - m  # [b, V] <= 0
        e = centered.exp() if with_entropy else centered.exp_()  # [b, V] softmax numerators
        s = e.sum(dim=-1, keepdim=True)  # [b, 1]
        lse[rows] = m + s.log()  # logsumexp z
        if with_entropy:  # H = log s - sum_v e_v (z_v - m) / s: centred, so no cancellation against m
            dot = e.mul_(centered).sum(dim=-1, keepdim=True)  # [b, 1] (e is not needed after s)
            entropy[rows] = s.log() - dot / s
    logp = (z_label - lse).squeeze(-1)  # [C]  log p(label) = z_y - logsumexp z
    return logp, lse, (entropy.squeeze(-1) if entropy is not None else None)


def _math_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half-precision logits; float32 and float64 (gradcheck) stay as they are."""
    return torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype


_BLOCK_BYTES = 1 << 20  # float32 bytes per row block on CPU: 8 rows at V = 32768, cache-resident


def _row_blocks(logits: torch.Tensor) -> list:
    """Row slices of [C, V] logits. On CPU, blocks of ~1 MiB of float32 (at least 2 rows): measured
    4x faster than whole-chunk temporaries at [1024, 32768]. Elsewhere one block: a GPU has the
    bandwidth, and each block would cost kernel launches."""
    n, vocab = logits.shape
    rows = n if logits.device.type != "cpu" else max(2, _BLOCK_BYTES // (4 * max(vocab, 1)))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def label_logprob(logits: torch.Tensor, labels: torch.Tensor, with_entropy: bool = False, entropy_grad: bool = False):
    """[C, V] logits, [C] labels -> ([C] log p(label) with grad, [C] entropy or None).

    The entropy (with_entropy) has no gradient unless entropy_grad. Low-precision logits are computed
    in float32. Autograd keeps only the logits (a view) and one or two values per row."""
    return _LabelLogprob.apply(logits, labels, with_entropy or entropy_grad, entropy_grad)


def logprobs_and_entropy(
    logits: torch.Tensor,  # [N, T, V] logits predicting labels
    labels: torch.Tensor,  # [N, T] token ids
    chunk_size: int = 1024,
    with_entropy: bool = True,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log p(label) [N, T] and entropy [N, T] or None, `chunk_size` rows at a time; the entropy
    has a gradient when entropy_grad. Autograd keeps the logits (views) and one logsumexp (and entropy)
    per position: backward recomputes each chunk's softmax, never holding [N*T, V] probabilities."""
    n, t, v = logits.shape
    flat_logits, flat_labels = logits.reshape(n * t, v), labels.reshape(n * t)
    lps, ents = [], []
    # split, not slicing: a slice's backward zero-fills a full-size gradient per chunk.
    for chunk, lab in zip(flat_logits.split(chunk_size), flat_labels.split(chunk_size)):
        lp, ent = label_logprob(chunk, lab, with_entropy=with_entropy, entropy_grad=with_entropy and entropy_grad)
        lps.append(lp)
        ents.append(ent)
    logp = torch.cat(lps).view(n, t)
    return logp, (torch.cat(ents).view(n, t) if with_entropy else None)
