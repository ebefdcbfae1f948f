"""gspo.kernels.label_logprob alone on one [1024, 32768] chunk of logits, median CPU ms of 5 calls, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python bench/lever_label_logprob.py
    .venv/bin/python bench/lever_label_logprob.py --smoke   # [64, 1024] logits, 1 call each: does it run (tests)

bf16 / float32 logits, entropy off / on (as a metric), forward only and forward+backward. The figures
"before" in bench/README.md are this script run at commit e77ed88 (whole-chunk temporaries).
"""

import argparse
import json
import time

import torch

from gspo.kernels import label_logprob


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--smoke", action="store_true", help="[64, 1024] logits and one call each: checks the script runs")
    a = ap.parse_args()
    rows, vocab, calls = (64, 1024, 1) if a.smoke else (1024, 32768, 5)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        for entropy in (False, True):
            logits = (torch.randn(rows, vocab) * 3).to(dtype).requires_grad_()
            labels = torch.randint(0, vocab, (rows,))

            def forward():
                with torch.no_grad():
                    label_logprob(logits, labels, entropy)

            def forward_backward():
                logp, _ = label_logprob(logits, labels, entropy)
                logp.sum().backward()
                logits.grad = None

            for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
                fn()  # warm-up
                times = []
                for _ in range(calls):
                    start = time.process_time()
                    fn()
                    times.append(time.process_time() - start)
                key = f"{str(dtype).replace('torch.', '')} entropy={entropy} {name}"
                out[key] = round(1000 * sorted(times)[len(times) // 2], 1)
                print(f"{key:34s} {out[key]:7.1f} ms", flush=True)
    print(json.dumps({"bench": "lever_label_logprob", "ms": out}))


if __name__ == "__main__":
    main()
