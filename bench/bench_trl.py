#!/usr/bin/env python
"""gspo vs TRL's GRPOTrainer(importance_sampling_level="sequence"), side by side, identical settings.

    bash bench/setup_trl_venv.sh                 # once: TRL in its own venv, bench/.venv-trl
    .venv/bin/python bench/bench_trl.py          # ~6 min per repeat on 2 shared CPU cores
    .venv/bin/python bench/bench_trl.py --steps 1 --repeats 1 --new-tokens 4 --smoke --out /tmp/x.json  # (tests)

Both run in their own subprocess, each with its own interpreter (gspo: this venv; TRL: bench/.venv-trl),
on the same model directory (the random-init Qwen2 "small" model of bench_step.py, built here if absent),
the same 8 prompts x 4 completions, the same completion length, KL coefficient (beta) 0.04, learning rate,
one update per generation (gspo_epochs=1 / num_iterations=1), no gradient checkpointing, fp32 (or, with
`--mixed-precision bf16`, float32 weights with bfloat16 autocast in both: TRL's bf16=True), the same
reward function and the same torch thread count. Step time = wall time of one training step
(TRL: on_step_begin -> on_step_end, which includes its generation; gspo: training_step). The first step
of each is a warm-up and is dropped. The runs alternate (gspo, TRL, gspo, TRL, ...) so that both see
the same machine load. Reports median step time, peak RSS (getrusage of the worker) and the ratios.
Last stdout line: one JSON object (also written to bench/results/bench_trl.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRL_PY = HERE / ".venv-trl" / "bin" / "python"
BETA, LR = 0.04, 1e-6


def trl_worker(model_dir: str, steps: int, new_tokens: int, threads: int, bf16: bool) -> dict:
    """Runs inside bench/.venv-trl: TRL + torch + transformers, no gspo."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(HERE))
    from bench_common import GROUP, N_PROMPTS, diversity_reward, record_linear_dtypes, word_prompts

    torch.set_num_threads(threads)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)  # not AutoTokenizer: keep the word-level vocab
    tok.padding_side = "left"
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    ds = Dataset.from_list([{"prompt": p} for p in word_prompts(N_PROMPTS, vocab)])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = tempfile.mkdtemp(prefix="trl-bench-")
    args = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=N_PROMPTS * GROUP,
        num_generations=GROUP,
        max_completion_length=new_tokens,
        beta=BETA,
        num_iterations=1,
        importance_sampling_level="sequence",
        learning_rate=LR,
        max_steps=steps + 1,
        logging_steps=1,
        use_vllm=False,
        gradient_checkpointing=False,
        bf16=bf16,
        fp16=False,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        seed=42,
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_completions=False,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.cpus, self.t0, self.c0 = [], [], None, None

        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)
            self.cpus.append(time.process_time() - self.c0)

    timer = StepTimer()
    matmul_dtypes = record_linear_dtypes(model)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[diversity_reward],
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()
    import trl

    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    times = timer.times[1:]
    return {
        "impl": "trl",
        "version": trl.__version__,
        "step_times_s": [round(x, 4) for x in times],
        "step_median_s": statistics.median(times),
        "step_cpu_median_s": statistics.median(timer.cpus[1:]),
        "step_cpu_s": [round(x, 4) for x in timer.cpus[1:]],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "completion_length_mean": lengths[-1] if lengths else None,
        "threads": torch.get_num_threads(),
        "linear_output_dtypes": sorted(matmul_dtypes),
        "accelerate_mixed_precision": trainer.accelerator.mixed_precision,
    }


def run(cmd: list, timeout: int = 900) -> dict:
    p = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{p.stderr[-5000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each implementation")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        default="no",
        help="bf16: TRL's bf16=True and gspo's mixed_precision='bf16' (fp32 weights, bf16 autocast)",
    )
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gspo-bench-models"))
    ap.add_argument("--out", default=str(HERE / "results" / "bench_trl.json"))
    ap.add_argument(
        "--smoke", action="store_true", help="bench_common's 2-layer smoke model: checks the script runs, nothing more"
    )
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_worker:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(trl_worker(a.model_dir, a.steps, a.new_tokens, a.threads, a.mixed_precision == "bf16")))
        return
    if not TRL_PY.exists():
        raise SystemExit(f"{TRL_PY} not found: run `bash bench/setup_trl_venv.sh` first")
    sys.path.insert(0, str(HERE))
    from bench_common import SMALL_ARCH, SMOKE_ARCH, build_qwen2_dir

    workdir = Path(a.workdir)
    arch = SMOKE_ARCH if a.smoke else SMALL_ARCH
    key = "-".join(f"{k[:3]}{v}" for k, v in sorted(arch.items()))
    model_dir = build_qwen2_dir(workdir / f"qwen2-{key}", arch)
    spec = json.dumps({"size": "small", "steps": a.steps, "model_dir": str(model_dir), "new_tokens": a.new_tokens})
    gspo_cmd = [
        sys.executable,
        str(HERE / "bench_step.py"),
        "--worker",
        "gspo_only",
        "--spec",
        spec,
        "--threads",
        str(a.threads),
        "--workdir",
        str(workdir),
        "--mixed-precision",
        a.mixed_precision,
    ]
    trl_cmd = [
        str(TRL_PY),
        str(Path(__file__).resolve()),
        "--trl-worker",
        "--model-dir",
        str(model_dir),
        "--steps",
        str(a.steps),
        "--new-tokens",
        str(a.new_tokens),
        "--threads",
        str(a.threads),
        "--mixed-precision",
        a.mixed_precision,
    ]
    print(
        f"gspo vs TRL: model {model_dir.name}, 8x4, {a.new_tokens} new tokens, beta {BETA}, {a.threads} threads, "
        f"mixed precision {a.mixed_precision}, "
        f"{a.steps} timed steps x {a.repeats} alternating runs; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    runs = {"gspo": [], "trl": []}
    loads = []
    for r in range(a.repeats):
        for name, cmd in (("gspo", gspo_cmd), ("trl", trl_cmd)):
            t0 = time.perf_counter()
            res = run(cmd)
            res["wall_s"] = time.perf_counter() - t0
            res["loadavg"] = os.getloadavg()[0]
            runs[name].append(res)
            loads.append(res["loadavg"])
            print(
                f"   run {r + 1} {name:4s}: step median {res['step_median_s']:.3f}s {res['step_times_s']}, CPU "
                f"{res['step_cpu_median_s']:.3f}s {res['step_cpu_s']}, "
                f"peak RSS {res['peak_rss_mb']:.0f} MB, load {res['loadavg']:.2f}, "
                f"nn.Linear outputs {res.get('linear_output_dtypes')}",
                flush=True,
            )
    med = {k: statistics.median([t for res in v for t in res["step_times_s"]]) for k, v in runs.items()}
    cpu = {k: statistics.median([t for res in v for t in res["step_cpu_s"]]) for k, v in runs.items()}
    rss = {k: max(res["peak_rss_mb"] for res in v) for k, v in runs.items()}
    summary = {
        "bench": "gspo_vs_trl",
        "date": time.strftime("%Y-%m-%d"),
        "trl_version": runs["trl"][0]["version"],
        "gspo_step_s": round(med["gspo"], 4),
        "trl_step_s": round(med["trl"], 4),
        "speedup_trl_over_gspo": round(med["trl"] / med["gspo"], 3),
        "gspo_step_cpu_s": round(cpu["gspo"], 4),
        "trl_step_cpu_s": round(cpu["trl"], 4),
        "speedup_cpu_time": round(cpu["trl"] / cpu["gspo"], 3),
        "gspo_peak_rss_mb": round(rss["gspo"], 1),
        "trl_peak_rss_mb": round(rss["trl"], 1),
        "rss_ratio_gspo_over_trl": round(rss["gspo"] / rss["trl"], 3),
        "threads": a.threads,
        "mixed_precision": a.mixed_precision,
        "new_tokens": a.new_tokens,
        "loadavg": [round(x, 2) for x in loads],
    }
    print(
        f"\n   median step wall: gspo {med['gspo']:.3f}s, TRL {med['trl']:.3f}s -> gspo is "
        f"{med['trl'] / med['gspo']:.2f}x faster per step (goal >= 2x)"
    )
    print(f"   median step CPU:  gspo {cpu['gspo']:.3f}s, TRL {cpu['trl']:.3f}s -> {cpu['trl'] / cpu['gspo']:.2f}x")
    print(f"   peak RSS: gspo {rss['gspo']:.0f} MB, TRL {rss['trl']:.0f} MB (goal: gspo no higher)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
