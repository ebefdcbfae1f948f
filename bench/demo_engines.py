"""The offline demo with each rollout engine on the same RL seeds: the accuracy gain of `hf` and `vllm`.

    .venv-vllm/bin/python bench/demo_engines.py --seeds 42,1,2      # needs vllm (make test-vllm builds .venv-vllm)
    .venv/bin/python bench/demo_engines.py --seeds 42 --engines hf --smoke --out /tmp/x.json   # seconds (tests)

One `gspo.demo.run_demo(seed=S, rollout_engine=E)` per (seed, engine), each in a process of its own (one vLLM
engine per process), with the demo's warm-started model; prints one line per run and writes
bench/results/demo_engines.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_RUN = (
    "import json, sys; from gspo.demo import run_demo; "
    "s = run_demo(output_dir=sys.argv[1], seed=int(sys.argv[2]), rollout_engine=sys.argv[3], "
    "**json.loads(sys.argv[4])); "
    "print(json.dumps({k: s[k] for k in ('eval_before', 'eval_after', 'accuracy_gain_points', 'wall_time_s')}))"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--out", default=str(HERE / "results" / "demo_engines.json"))
    ap.add_argument("--model", default=None, help="policy model directory (default: the demo's built-in model)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="1 GSPO step, 32 eval prompts, and without --model a 2-step warm-start model: checks the script runs",
    )
    a = ap.parse_args()
    runs = []
    workdir = Path(tempfile.mkdtemp(prefix="gspo-demo-engines-"))
    overrides = {} if a.model is None else {"policy_model_name": a.model}
    if a.smoke:  # the recipe's warm start takes minutes from an empty cache; the gains then mean nothing
        overrides.update(max_steps=1, eval_max_samples=32, plot_curves=False)
        if a.model is None:
            from gspo.tasks.tiny_model import ensure_tiny_model

            model = ensure_tiny_model(cache_dir=workdir / "cache", sft_steps=2, verbose=False)
            overrides["policy_model_name"] = str(model)
    for seed in (int(s) for s in a.seeds.split(",")):
        for engine in a.engines.split(","):
            out = workdir / f"{engine}-{seed}"
            p = subprocess.run(
                [sys.executable, "-c", _RUN, str(out), str(seed), engine, json.dumps(overrides)],
                capture_output=True,
                text=True,
            )
            if p.returncode != 0:
                raise SystemExit(f"{engine} seed {seed} failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            runs.append({"seed": seed, "engine": engine, **r})
            print(
                f"seed {seed} {engine}: {r['eval_before']['accuracy']:.3f} -> {r['eval_after']['accuracy']:.3f} "
                f"({r['accuracy_gain_points']:+.1f} points, {r['wall_time_s']:.0f} s)",
                flush=True,
            )
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
