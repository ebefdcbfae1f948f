"""Model forward -> per-token log-probs (and entropy) of the completion tokens.

Memory and work are bounded: padding columns that no row of the micro-batch uses are
trimmed first; logits are computed only for the T completion positions (`logits_to_keep`,
when the model supports it); log-softmax and entropy run a chunk of positions at a time
(gspo.kernels.logprobs_and_entropy); with a chunked `head` mode the output head itself runs a chunk
at a time, so memory is one [chunk, V] block whatever the length and vocabulary.
Log-probs are of softmax(logits / temperature): the distribution rollouts were sampled
from, so the importance ratio compares like with like.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gspo.kernels import label_logprob, logprobs_and_entropy


class HeadMode(enum.Enum):
    """How the output head runs in a log-prob pass (the back-end picks it: gspo.backends)."""

    WHOLE = "whole"  # one head call over all positions ([n, T, V] logits exist); ZeRO-3 needs it
    CHUNKED = "chunked"  # a chunk of positions at a time; recomputed in backward only when the logits are large
    RECOMPUTED = "recomputed"  # a chunk at a time, always recomputed in backward: one [chunk, V] block at most


_NO_LOGITS_TO_KEEP: set = set()  # model classes whose forward rejected `logits_to_keep`
_HEAD_NOT_FINAL: set = set()  # model classes whose logits are not exactly lm_head(final hidden state)
# HeadMode.CHUNKED recomputes the head's chunks in backward when a micro-batch's fp32 logits would exceed
# this: above it the memory matters more than the extra head matmul the backward recompute costs.
AUTO_BOUND_BYTES = 1 << 30


def trim_padding(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Drop leading prompt columns and trailing completion columns that are padding in every row."""
    used_p = prompt_mask.any(dim=0).nonzero()
    start = int(used_p[0]) if len(used_p) else prompt_mask.shape[1]
    used_c = completion_mask.any(dim=0).nonzero()
    end = int(used_c[-1]) + 1 if len(used_c) else 1
    return prompt_ids[:, start:], prompt_mask[:, start:], completion_ids[:, :end], completion_mask[:, :end]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:  # [n, L]
    """Positions from the mask: left padding must not shift them (generate does the same)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def _model_logits(model, input_ids, attention_mask, keep: int) -> torch.Tensor:
    """The model's logits, asking for only the last `keep` positions where the model supports it."""
    positions = position_ids(attention_mask)
    kind = type(model)
    if kind not in _NO_LOGITS_TO_KEEP:
        try:
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                logits_to_keep=keep,
                use_cache=False,
            ).logits
        except TypeError:
            _NO_LOGITS_TO_KEEP.add(kind)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).logits


def _forward_logits(model, input_ids, attention_mask, keep: int) -> torch.Tensor:  # [n, keep, V]
    return _model_logits(model, input_ids, attention_mask, keep)[:, -keep:]


def _output_head(model):
    inner = getattr(model, "module", model)  # DDP wraps; PEFT forwards get_output_embeddings to its base
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Module) else None


def _final_hidden(model, input_ids, attention_mask, keep: int):
    """(hidden [n, keep, H], head) where logits == head(hidden) exactly, computing the head at one
    position only; None when the model does more after its head (soft-capping, scaling...).

    A pre-hook on the output head records its input and narrows it to the last position, so the
    model's own forward (and DDP's hooks around it) run unchanged while [n, keep, V] logits never exist.
    """
    head = _output_head(model)
    if head is None or type(model) in _HEAD_NOT_FINAL:
        return None
    seen = {}

    def narrow(module, args):
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            return None  # an unexpected call shape: leave it alone, the check below falls back
        seen["hidden"] = args[0]
        return (args[0][:, -1:],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(narrow)
    try:
        logits = _model_logits(model, input_ids, attention_mask, keep)  # [n, 1, V]: the head saw one position
    finally:
        handle.remove()
    hidden = seen.get("hidden")
    if hidden is not None and hidden.dim() == 3 and hidden.shape[1] >= keep:
        with torch.no_grad():
            again, seen_logits = head(hidden[:, -1:]).float(), logits[:, -1:].float()
            exact = torch.allclose(again, seen_logits, rtol=1e-4, atol=1e-5, equal_nan=True)
        if exact:
            return hidden[:, -keep:], head
        if not (again.isfinite().all() and seen_logits.isfinite().all()):
            return None  # non-finite values prove nothing about the model: fall back this once, remember nothing
    _HEAD_NOT_FINAL.add(type(model))
    return None


def _head_chunk(head, hidden, labels, temperature: float, entropy: Optional[str]):
    """[C, H] hidden, [C] labels -> ([C] log p, [C] entropy or None); entropy None | 'grad' | 'metric'."""
    logits = head(hidden)  # [C, V]; bfloat16 under autocast
    if temperature != 1.0:
        logits = logits.float() / temperature  # before dividing: bf16 would round the scaled logits again
    return label_logprob(logits, labels, with_entropy=entropy == "metric", entropy_grad=entropy == "grad")


def _head_logprobs(
    head, hidden, labels, *, temperature: float, chunk_size: int, entropy: Optional[str], recompute: bool = True
):
    """[n, t, H] hidden -> ([n, t] log p, [n, t] entropy or None), the head applied `chunk_size` rows at a
    time. `recompute`: under autograd each chunk is checkpointed, backward recomputes its logits, so
    peak memory is one [chunk_size, V] block whatever the length or the vocabulary (one more head
    matmul). Otherwise autograd keeps each chunk's logits, as many as full logits would hold, but no
    [n, T+1, V] tensor is ever sliced, copied or zero-filled in backward."""
    n, t, h = hidden.shape
    lps, ents = [], []
    for hid, lab in zip(hidden.reshape(n * t, h).split(chunk_size), labels.reshape(n * t).split(chunk_size)):
        if recompute and torch.is_grad_enabled() and hid.requires_grad:
            lp, ent = checkpoint(_head_chunk, head, hid, lab, temperature, entropy, use_reentrant=False)
        else:
            lp, ent = _head_chunk(head, hid, lab, temperature, entropy)
        lps.append(lp)
        ents.append(ent)
    logp = torch.cat(lps).view(n, t)
    return logp, (torch.cat(ents).view(n, t) if entropy is not None else None)


def _vocab_size(model) -> int:
    head = _output_head(model)
    return getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", 0) or 0


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,  # [n, P] left-padded
    prompt_mask: torch.Tensor,  # [n, P]
    completion_ids: torch.Tensor,  # [n, T] right-padded
    completion_mask: torch.Tensor,  # [n, T]
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    head: HeadMode = HeadMode.WHOLE,
    recompute_above_bytes: int = AUTO_BOUND_BYTES,
    trim: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log pi(y_t | x, y_<t) for every completion position: ([n, T], [n, T] entropy or None).

    Positions beyond the trimmed width come back as 0 (they are masked out downstream).
    `entropy_grad=False` (entropy only as a metric, e.g. entropy_coef == 0): the entropy is computed
    detached, so the graph holds only log p(label) = logit - logsumexp and backward recomputes no
    softmax (bench/bench_step.py: about 20% less CPU in this head at vocabulary 32768).
    `head=HeadMode.RECOMPUTED`: the output head itself runs a chunk at a time (recomputed in backward),
    so no [n, T, V] logits tensor ever exists; falls back to full logits for models that transform
    their logits after the head. `HeadMode.CHUNKED`: the head runs a chunk at a time too, recomputed
    only when the fp32 logits would exceed `recompute_above_bytes` (default 1 GiB; else kept: no extra
    matmul, no full-size slice, copy or concatenation of logits gradients). `HeadMode.WHOLE`: one head call
    over all positions (for ZeRO-3, where each head call gathers its weight). `trim=False` keeps every column
    (an MoE policy's recorded routes then line up with the rollout's full rows).
    """
    device = next(model.parameters()).device
    full_t = completion_ids.shape[1]
    p_ids, p_mask, c_ids, c_mask = (
        trim_padding(prompt_ids, prompt_mask, completion_ids, completion_mask)
        if trim
        else (prompt_ids, prompt_mask, completion_ids, completion_mask)
    )
    input_ids = torch.cat([p_ids, c_ids], dim=1).to(device)
    attention_mask = torch.cat([p_mask, c_mask], dim=1).to(device)
    t = c_ids.shape[1]
    labels = c_ids.to(device)
    entropy_mode = None if not with_entropy else ("grad" if entropy_grad else "metric")
    recompute = head is HeadMode.RECOMPUTED or (
        head is HeadMode.CHUNKED and labels.numel() * _vocab_size(model) * 4 > recompute_above_bytes
    )
    found = _final_hidden(model, input_ids, attention_mask, keep=t + 1) if head is not HeadMode.WHOLE else None
    if found is not None:
        hidden, head_module = found
        logp, entropy = _head_logprobs(
            head_module,
            hidden[:, :-1],
            labels,
            temperature=temperature,
            chunk_size=chunk_size,
            entropy=entropy_mode,
            recompute=recompute,
        )
    else:
        logits = _forward_logits(model, input_ids, attention_mask, keep=t + 1)[:, :-1]  # [n, t, V] predicts c_ids
        if temperature != 1.0:
            logits = logits / temperature
        logp, entropy = logprobs_and_entropy(
            logits, labels, chunk_size, with_entropy=entropy_mode is not None, entropy_grad=entropy_mode == "grad"
        )
    pad = (0, full_t - t)
    return F.pad(logp, pad), (F.pad(entropy, pad) if entropy is not None else None)


class RolloutLogprobs:
    """The trainer's log-probs of a Rollout's completion tokens, with the config's temperature and chunking,
    the back-end's head mode and the precision context bound once; used by the producer (reference and
    pi_old passes, no grad) and the learner (with grad)."""

    def __init__(self, config, *, backend, precision_context, full_width: bool = False) -> None:
        """`full_width`: never trim padding columns (an MoE policy whose routes are recorded or replayed)."""
        self.config, self.backend, self.precision = config, backend, precision_context
        self.full_width = full_width

    def __call__(self, model, part, *, training: bool):
        """([n, T] log-probs, [n, T] entropy or None) of a micro-batch `part` (a Rollout)."""
        cfg = self.config
        head = self.backend.head_mode(training=training, gradient_checkpointing=cfg.gradient_checkpointing)
        with self.precision():  # the loss math after it stays float32
            return completion_logprobs(
                model,
                part.prompt_ids,
                part.prompt_mask,
                part.completion_ids,
                part.completion_mask,  # attention over every real token; the loss mask is applied downstream
                temperature=cfg.temperature,
                chunk_size=cfg.entropy_chunk_size,
                with_entropy=training,
                entropy_grad=training and cfg.entropy_coef != 0,
                head=head,
                trim=not self.full_width,
            )

    @torch.no_grad()
    def no_grad(self, model, rollout, around=None) -> torch.Tensor:  # [N, T] on the CPU
        """A whole rollout, in micro-batches the size of a training micro-batch; `around(rows)`: a context for
        each micro-batch's forward over rollout rows `rows` (an MoE policy records pi_old's routes in it)."""
        out, start = [], 0
        for part in rollout.no_grad_parts(self.config):
            rows = torch.arange(start, start + len(part))
            start += len(part)
            with around(rows) if around is not None else contextlib.nullcontext():
                out.append(self(model, part, training=False)[0].cpu())
        return torch.cat(out)
