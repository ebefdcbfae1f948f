"""Training-pass lever at the small size (27.5M Qwen2, vocabulary 32768, 32 completions x 64 tokens), CPU time.

    .venv/bin/python bench/lever_logprobs.py [--reps 4]

Forward + backward of the policy's log-probs with the entropy as a metric (entropy_coef == 0, the
default), three ways, alternated in one process:
  raw       the model's logits for the completion positions, log_softmax, gather (no entropy at all);
  before    gspo before 2026-11-28 (kept here as the baseline): full logits sliced to the completion,
            log p = z_y - logsumexp(z) per chunk of 1024 rows, entropy from a second log_softmax pass;
  gspo      gspo.logprobs.completion_logprobs as the trainer calls it: the head applied chunk by chunk
            from the final hidden states, log p and the entropy from one autograd Function.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import model_setup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/gspo-bench-models")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from gspo.logprobs import HeadMode, completion_logprobs
    from gspo.rollout import left_pad

    path, tok, rows = model_setup("small", Path(a.workdir))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    pids, pmask = left_pad([tok.encode(r["prompt"]) for r in rows], tok.pad_token_id)
    pids, pmask = pids.repeat_interleave(4, 0), pmask.repeat_interleave(4, 0)
    cids = torch.randint(5, 32000, (32, 64), generator=torch.Generator().manual_seed(0))
    cmask = torch.ones(32, 64, dtype=torch.long)
    adv = torch.randn(32, generator=torch.Generator().manual_seed(1))
    ids, mask = torch.cat([pids, cids], 1), torch.cat([pmask, cmask], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)

    def logits():  # [32, 64, V] predicting cids
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=65).logits[:, :-1]

    def raw():
        logp = torch.log_softmax(logits().float(), -1).gather(-1, cids[..., None]).squeeze(-1)
        return logp

    def before():
        flat, lab = logits().reshape(-1, model.config.vocab_size), cids.reshape(-1)
        out = []
        for chunk, y in zip(flat.split(1024), lab.split(1024)):
            out.append(chunk.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
            with torch.no_grad():  # the entropy metric from a second log_softmax pass
                ls = torch.log_softmax(chunk.detach().float(), -1)
                -(ls.exp() * ls).sum(-1)
        return torch.cat(out).view(32, 64)

    def gspo():
        return completion_logprobs(
            model,
            pids,
            pmask,
            cids,
            cmask,
            temperature=1.0,
            chunk_size=1024,
            with_entropy=True,
            entropy_grad=False,
            head=HeadMode.CHUNKED,
        )[0]

    times = {"raw": [], "before": [], "gspo": []}
    for _ in range(a.reps):
        for name, fn in (("raw", raw), ("before", before), ("gspo", gspo)):
            model.zero_grad(set_to_none=True)
            start = time.process_time()
            loss = -((fn() * cmask).sum(1) / 64 * adv).mean()
            loss.backward()
            times[name].append(time.process_time() - start)
    print(
        json.dumps(
            {
                "bench": "lever_logprobs",
                "reps": a.reps,
                "shape": "32 x 64 tokens, vocab 32768",
                "fwd_bwd_cpu_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
                "all_cpu_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
