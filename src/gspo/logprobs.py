"""Model forward -> per-token log-probs (and entropy) of the completion tokens.

Memory and work are bounded three ways: padding columns that no row of the micro-batch
uses are trimmed first; logits are computed only for the T completion positions
(`logits_to_keep`, when the model supports it); log-softmax and entropy run a chunk
of positions at a time (gspo.core.logprobs_and_entropy).
Log-probs are of softmax(logits / temperature): the distribution rollouts were sampled
from, so the importance ratio compares like with like.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gspo.core import logprobs_and_entropy

_NO_LOGITS_TO_KEEP: set = set()  # model classes whose forward rejected `logits_to_keep`


def trim_padding(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Drop leading prompt columns and trailing completion columns that are padding in every row."""
    used_p = prompt_mask.any(dim=0).nonzero()
    start = int(used_p[0]) if len(used_p) else prompt_mask.shape[1]
    used_c = completion_mask.any(dim=0).nonzero()
    end = int(used_c[-1]) + 1 if len(used_c) else 1
    return prompt_ids[:, start:], prompt_mask[:, start:], completion_ids[:, :end], completion_mask[:, :end]


def _forward_logits(model, input_ids, attention_mask, keep: int) -> torch.Tensor:
    # Position ids from the mask: left padding must not shift positions (generate does the same).
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    kind = type(model)
    if kind not in _NO_LOGITS_TO_KEEP:
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        logits_to_keep=keep, use_cache=False)
            if out.logits.shape[1] == keep:
                return out.logits
        except TypeError:
            pass
        _NO_LOGITS_TO_KEEP.add(kind)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[:, -keep:]


def _chunk_label_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _label_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[N, T, V] logits, [N, T] labels -> [N, T] log p(label), with grad, a chunk of positions at a time.
    fp32 logits: autograd keeps only views of them. Other dtypes: each chunk is checkpointed, so the
    fp32 copies are never all alive at once (backward recomputes one chunk's logsumexp)."""
    n, t, v = logits.shape
    out = []
    # split, not slicing: the backward of each slice would allocate a zero-filled [N*T, V] gradient per
    # chunk; split's backward concatenates the chunk gradients once.
    for chunk, lab in zip(logits.reshape(n * t, v).split(chunk_size), labels.reshape(n * t).split(chunk_size)):
        if logits.dtype == torch.float32 or not chunk.requires_grad:
            out.append(_chunk_label_logprob(chunk, lab))
        else:
            out.append(checkpoint(_chunk_label_logprob, chunk, lab, use_reentrant=False))
    return torch.cat(out).view(n, t)


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,  # [n, P] left-padded
    prompt_mask: torch.Tensor,  # [n, P]
    completion_ids: torch.Tensor,  # [n, T] right-padded
    completion_mask: torch.Tensor,  # [n, T]
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log pi(y_t | x, y_<t) for every completion position: ([n, T], [n, T] entropy or None).

    Positions beyond the trimmed width come back as 0 (they are masked out downstream).
    `entropy_grad=False` (entropy only as a metric, e.g. entropy_coef == 0): the entropy is computed
    detached, so the graph holds only log p(label) = logit - logsumexp and backward recomputes no
    softmax (bench/bench_step.py: about 20% less CPU in this head at vocabulary 32768).
    """
    device = next(model.parameters()).device
    full_t = completion_ids.shape[1]
    p_ids, p_mask, c_ids, c_mask = trim_padding(prompt_ids, prompt_mask, completion_ids, completion_mask)
    input_ids = torch.cat([p_ids, c_ids], dim=1).to(device)
    attention_mask = torch.cat([p_mask, c_mask], dim=1).to(device)
    t = c_ids.shape[1]
    logits = _forward_logits(model, input_ids, attention_mask, keep=t + 1)[:, :-1]  # [n, t, V] predicts c_ids
    if temperature != 1.0:
        logits = logits / temperature
    labels = c_ids.to(device)
    if with_entropy and not entropy_grad and torch.is_grad_enabled():
        logp = _label_logprobs(logits, labels, chunk_size)
        with torch.no_grad():
            _, entropy = logprobs_and_entropy(logits.detach(), labels, chunk_size, with_entropy=True)
    else:
        logp, entropy = logprobs_and_entropy(logits, labels, chunk_size, with_entropy)
    pad = (0, full_t - t)
    return F.pad(logp, pad), (F.pad(entropy, pad) if entropy is not None else None)
