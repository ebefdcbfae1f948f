"""Generation levers at the small size (27.5M Qwen2, vocabulary 32768, 8 prompts x 4, 64 new tokens), CPU time.

    .venv/bin/python bench/lever_generation.py [--reps 6]
    .venv/bin/python bench/lever_generation.py --reps 1 --smoke    # tiny shapes, seconds: does it run (tests)

1. The sampler inside `generate`: gspo's two-level inverse CDF (`gspo.sampling.sample_tokens`) against the
   one-level form it replaced (a float64 running sum over the whole vocabulary, kept below as the baseline),
   alternated in one process: time spent in the sampler, and whole `generate_rollout` time.
2. A lean decode loop (prefill, then one forward per token over transformers' DynamicCache, sampling with
   the same function) against `generate_rollout`: does `generate`'s per-token machinery cost anything?
Prints one JSON line at the end.
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


def one_level_sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """The sampler before 2026-11-28 (baseline only): float64 running sum over all V entries."""
    from gspo.sampling import filter_logits

    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator) * (cdf[:, -1:] * (1.0 - 2.0**-50))
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def lean_loop(model, tok, rows, group: int, new_tokens: int, sample) -> float:
    """CPU seconds of prefill + `new_tokens` cached forwards + sampling; returns the forward share too."""
    from transformers import DynamicCache

    from gspo.rollout import left_pad

    ids, mask = left_pad([r["prompt_ids"] for r in rows], tok.pad_token_id)
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        past_key_values=DynamicCache(),
        use_cache=True,
        logits_to_keep=1,
    )
    for _ in range(new_tokens):
        nxt = sample(out.logits[:, -1].float())
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--workdir", default="/tmp/gspo-bench-models")
    ap.add_argument("--smoke", action="store_true", help="bench_common's smoke-test shapes: checks the script runs")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    import gspo.sampling as sampling
    from gspo.engines import generate_rollout

    path, tok, rows = model_setup("small", Path(a.workdir), smoke=a.smoke)
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    for r in rows:
        r["prompt_ids"] = tok.encode(r["prompt"])
    two_level = sampling.sample_tokens
    in_sampler = {"one_level": 0.0, "two_level": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            out = fn(*args, **kwargs)
            in_sampler[name] += time.process_time() - start
            return out

        return wrapper

    gen = {"one_level": [], "two_level": [], "lean_loop": []}
    for _ in range(a.reps):
        for name, fn in (("one_level", one_level_sample), ("two_level", two_level)):
            sampling.sample_tokens = timed(name, fn)  # PolicySampler looks the function up at call time
            start = time.process_time()
            generate_rollout(model, tok, rows, group_size=4, max_new_tokens=64)
            gen[name].append(time.process_time() - start)
        sampling.sample_tokens = two_level
        start = time.process_time()
        lean_loop(model, tok, rows, 4, 64, two_level)
        gen["lean_loop"].append(time.process_time() - start)
    result = {
        "bench": "lever_generation",
        "reps": a.reps,
        "shape": "32 rows x 64 tokens, vocab 32768",
        "generate_rollout_cpu_s": {k: round(statistics.median(v), 3) for k, v in gen.items() if k != "lean_loop"},
        "lean_loop_cpu_s": round(statistics.median(gen["lean_loop"]), 3),
        "sampler_ms_per_step": {k: round(1000 * v / (64 * a.reps), 2) for k, v in in_sampler.items()},
        "all_cpu_s": {k: [round(x, 2) for x in v] for k, v in gen.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
