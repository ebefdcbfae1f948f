#!/usr/bin/env python
"""Peak memory of the log-prob function and of the output head, forward + backward (CPU, RSS).

    .venv/bin/python bench/bench_memory.py                  # both parts
    .venv/bin/python bench/bench_memory.py --only chunkmem  # chunkmem | headmem
    .venv/bin/python bench/bench_memory.py --smoke --out /tmp/x.json   # each path once, small: does it run (tests)

chunkmem  gspo.kernels.logprobs_and_entropy on [32, 64, 32768] fp32 logits at chunk 256 / 1024 / unchunked
headmem   the output head at the small model's shape: full [32, T, V] logits vs the chunked, recomputed head

Each measurement runs in its own subprocess, so its peak RSS is its own. Last stdout line: JSON (also
written to bench/results/bench_memory.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import GROUP, HERE, N_PROMPTS, SMALL_ARCH, current_rss_mb, peak_rss_mb, run_script  # noqa: E402

SMOKE_VOCAB = 1024  # --smoke: [32, 64, 1024] logits instead of [32, 64, 32768]; the figures then mean nothing


def worker_chunkmem(chunk: int, threads: int, fn: str = "core", vocab: int = SMALL_ARCH["vocab_size"]) -> dict:
    """Peak RSS above the live logits (+ their gradient) of a chunked log-prob forward+backward:
    fn='core': gspo.kernels.logprobs_and_entropy (entropy with grad, entropy_coef != 0);
    fn='label': gspo.kernels.logprobs_and_entropy(with_entropy=False) (log p only)."""
    torch.set_num_threads(threads)
    from gspo.kernels import logprobs_and_entropy

    n, t, v = N_PROMPTS * GROUP, 64, vocab
    logits = torch.randn(n, t, v, requires_grad=True)
    labels = torch.randint(0, v, (n, t))
    logits.grad = torch.zeros_like(logits)  # the gradient buffer exists whatever the chunking
    base = current_rss_mb()
    assert peak_rss_mb() <= base + 64, "a higher peak earlier would hide this measurement"
    t0 = time.perf_counter()
    if fn == "core_nograd":  # the reference / old-log-prob pass: forward only, with entropy
        with torch.no_grad():
            logprobs_and_entropy(logits, labels, chunk_size=chunk if chunk > 0 else n * t, with_entropy=True)
    elif fn == "core":
        lp, ent = logprobs_and_entropy(logits, labels, chunk_size=chunk if chunk > 0 else n * t, with_entropy=True)
        (lp.sum() + ent.sum()).backward()
    else:
        logprobs_and_entropy(logits, labels, chunk if chunk > 0 else n * t, with_entropy=False)[0].sum().backward()
    return {
        "fn": fn,
        "chunk": chunk if chunk > 0 else n * t,
        "shape": [n, t, v],
        "logits_mb": logits.numel() * 4 / 2**20,
        "peak_above_logits_and_grad_mb": peak_rss_mb() - base,
        "time_s": time.perf_counter() - t0,
    }


def worker_headmem(
    chunk: int, threads: int, bounded: bool, new_tokens: int, vocab: int = SMALL_ARCH["vocab_size"]
) -> dict:
    """Peak RSS above weights + gradient buffers of the output head's forward+backward at the small
    model's shape ([32 x new_tokens] hidden states of width 384, vocabulary 32768): bounded = the
    chunked, recomputed head (gradient_checkpointing); otherwise full [32, T, V] logits then chunked log p."""
    torch.set_num_threads(threads)
    from gspo.kernels import logprobs_and_entropy
    from gspo.logprobs import _head_logprobs

    n, t, h, v = N_PROMPTS * GROUP, new_tokens, SMALL_ARCH["hidden_size"], vocab
    torch.manual_seed(0)
    head = torch.nn.Linear(h, v, bias=False)
    hidden = torch.randn(n, t, h, requires_grad=True)
    labels = torch.randint(0, v, (n, t))
    head.weight.grad, hidden.grad = torch.zeros_like(head.weight), torch.zeros_like(hidden)
    base = current_rss_mb()
    assert peak_rss_mb() <= base + 64, "a higher peak earlier would hide this measurement"
    t0 = time.perf_counter()
    if bounded:
        logp, _ = _head_logprobs(head, hidden, labels, temperature=1.0, chunk_size=chunk, entropy=None)
    else:
        logp = logprobs_and_entropy(head(hidden), labels, chunk, with_entropy=False)[0]
    logp.sum().backward()
    return {
        "bounded": bounded,
        "chunk": chunk,
        "new_tokens": t,
        "full_logits_mb": n * t * v * 4 / 2**20,
        "peak_above_weights_mb": peak_rss_mb() - base,
        "time_s": time.perf_counter() - t0,
    }


def run_worker(args: list) -> dict:
    return run_script(Path(__file__).resolve(), args)


def run_chunkmem(th: list, smoke: bool = False) -> list:
    vocab = {"vocab": SMOKE_VOCAB} if smoke else {}
    res = [
        run_worker(["--worker", "chunkmem", "--spec", json.dumps({"chunk": c, "fn": f, **vocab})] + th)
        for f in (("core", "label") if smoke else ("core_nograd", "core", "label"))  # smoke: each call once
        for c in ((256,) if smoke else (256, 1024, 0))
    ]
    print(
        "\n== chunked log-probs forward+backward, logits [32, 64, 32768] fp32 (256 MB): peak RSS above "
        "logits+grad\n   (core_nograd = gspo.kernels.logprobs_and_entropy forward only, as in the reference pass; "
        "core = "
        "the same with entropy grad, forward+backward; label = "
        "gspo.kernels.logprobs_and_entropy(with_entropy=False), log p only)"
    )
    for r in res:
        print(
            f"   {r['fn']:11s} chunk {r['chunk']:5d}: {r['peak_above_logits_and_grad_mb']:7.0f} MB  "
            f"({r['time_s']:.2f}s)"
        )
    return res


def run_headmem(th: list, smoke: bool = False) -> list:
    vocab = {"vocab": SMOKE_VOCAB} if smoke else {}
    res = [
        run_worker(
            ["--worker", "headmem", "--spec", json.dumps({"chunk": c, "bounded": b, "new_tokens": t, **vocab})] + th
        )
        for t in ((64,) if smoke else (64, 256))
        for b in ((True,) if smoke else (False, True))  # smoke: full logits go through chunkmem's "label" call
        for c in ((256,) if smoke else (256, 1024))
    ]
    print(
        "\n== output head forward+backward, hidden [32, T, 384] -> vocabulary 32768: peak RSS above weights and "
        "gradient buffers\n   (full = [32, T, V] logits then chunked log p; bounded = head applied a chunk at a "
        "time and recomputed in backward, the gradient_checkpointing path)"
    )
    for r in res:
        kind = "bounded" if r["bounded"] else "full"
        print(
            f"   T {r['new_tokens']:4d} {kind:8s} chunk {r['chunk']:5d}: {r['peak_above_weights_mb']:7.0f} MB  "
            f"(full logits would be {r['full_logits_mb']:.0f} MB; {r['time_s']:.2f}s)"
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="chunkmem,headmem")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_memory.json"))
    ap.add_argument(
        "--smoke", action="store_true", help="vocabulary 1024, each function call once: checks the script runs"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    spec = json.loads(a.spec)
    if a.worker == "headmem":
        vocab = spec.get("vocab", SMALL_ARCH["vocab_size"])
        print(json.dumps(worker_headmem(spec["chunk"], a.threads, spec["bounded"], spec["new_tokens"], vocab)))
        return
    if a.worker == "chunkmem":
        vocab = spec.get("vocab", SMALL_ARCH["vocab_size"])
        print(json.dumps(worker_chunkmem(spec["chunk"], a.threads, spec.get("fn", "core"), vocab)))
        return
    th = ["--threads", str(a.threads)]
    out = {"date": time.strftime("%Y-%m-%d"), "threads": a.threads, "torch": torch.__version__}
    for part, run in (("chunkmem", run_chunkmem), ("headmem", run_headmem)):
        if part in a.only.split(","):
            out[part] = run(th, smoke=a.smoke)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
