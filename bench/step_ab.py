#!/usr/bin/env python
"""Did a change make the training step slower? The same steps with two versions of the library, side by side.

    .venv/bin/python bench/step_ab.py --base 690c65d                  # HEAD's src/ against commit 690c65d's
    .venv/bin/python bench/step_ab.py --base 690c65d --sizes small --steps-small 6 --rounds 3
    .venv/bin/python bench/step_ab.py --base HEAD --smoke             # CI: that it runs (no figures)

The base version's `src/` is exported with `git archive <rev> src` into a temporary directory and put first on
PYTHONPATH of its worker processes; the candidate is this checkout's `src/`. Each worker builds the trainer of
bench_step.py (`make_trainer`: the bench's batch, KL on, one epoch) on bench_common's models (tiny: the demo
model, 8 prompts x 4 completions, 8 new tokens; small: the 27.5M random-init Qwen2, 64 new tokens), seeds
each step (torch.manual_seed(1000 + step)), runs `trainer.training_step(batch)` and records the process CPU time
of each step (one torch thread: CPU time is the work done, far less sensitive to other load than wall time)
and its wall time. Step 0 warms up and is dropped. Workers alternate base / candidate for `--rounds` rounds;
the figure is the median over all kept steps of each side, and candidate / base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "step_ab.json"


def worker(size: str, steps: int, workdir: Path, smoke: bool) -> dict:
    import time

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    import gspo
    from bench_common import model_setup
    from bench_step import make_trainer
    from gspo.data import GSPODataset

    model_dir, tok, rows = model_setup(size, workdir, smoke=smoke)
    trainer = make_trainer(model_dir, tok, new_tokens=8 if size == "tiny" else 64, out_dir=workdir / "out")
    dataset = GSPODataset(rows, tok, max_prompt_length=256)
    batch = [dataset[i] for i in range(len(dataset))]
    cpu, wall = [], []
    for step in range(steps + 1):
        torch.manual_seed(1000 + step)
        c0, w0 = time.process_time(), time.perf_counter()
        trainer.training_step(batch)
        trainer.step += 1
        if step:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    return {"gspo": str(Path(gspo.__file__).parents[1]), "cpu_s": cpu, "wall_s": wall}


def run_worker(src: Path, size: str, steps: int, workdir: Path, smoke: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, __file__, "--worker", size, "--steps", str(steps), "--workdir", str(workdir)]
    p = subprocess.run(args + (["--smoke"] if smoke else []), env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"worker {size} on {src} failed:\n{p.stderr[-4000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    if Path(result["gspo"]).resolve() != src.resolve():
        raise RuntimeError(f"the worker imported gspo from {result['gspo']}, not {src}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD~1", help="the git revision to compare against")
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--steps-tiny", type=int, default=30)
    ap.add_argument("--steps-small", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="alternating base / candidate workers per size")
    ap.add_argument("--smoke", action="store_true", help="1 step, 1 round, smoke-sized models; no figures")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.workdir, args.smoke)))
        return 0
    rounds = 1 if args.smoke else args.rounds
    with tempfile.TemporaryDirectory(prefix="gspo-ab-") as tmp:
        base_src = Path(tmp) / "base"
        base_src.mkdir()
        archive = subprocess.run(["git", "archive", args.base, "src"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base_src)], input=archive.stdout, check=True)
        sides = {"base": base_src / "src", "candidate": ROOT / "src"}
        workdir = args.workdir or Path(tmp) / "work"
        results = {}
        for size in args.sizes.split(","):
            steps = 1 if args.smoke else (args.steps_tiny if size == "tiny" else args.steps_small)
            got = {"base": {"cpu_s": [], "wall_s": []}, "candidate": {"cpu_s": [], "wall_s": []}}
            for _ in range(rounds):
                for side, src in sides.items():
                    r = run_worker(src, size, steps, workdir, args.smoke)
                    got[side]["cpu_s"] += r["cpu_s"]
                    got[side]["wall_s"] += r["wall_s"]
            med = {side: {k: statistics.median(v) for k, v in got[side].items()} for side in got}
            results[size] = {
                "steps_per_side": len(got["base"]["cpu_s"]),
                "median": med,
                "candidate_over_base_cpu": med["candidate"]["cpu_s"] / med["base"]["cpu_s"],
                "candidate_over_base_wall": med["candidate"]["wall_s"] / med["base"]["wall_s"],
                "raw": got,
            }
            base, cand = med["base"], med["candidate"]
            print(
                f"{size}: step CPU median base {base['cpu_s']:.4f} s, candidate {cand['cpu_s']:.4f} s "
                f"({results[size]['candidate_over_base_cpu']:.3f}x); wall {med['base']['wall_s']:.4f} s vs "
                f"{med['candidate']['wall_s']:.4f} s ({results[size]['candidate_over_base_wall']:.3f}x)",
                flush=True,
            )
    summary = {"base": args.base, "candidate": "working tree", "results": results}
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "raw"} for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
