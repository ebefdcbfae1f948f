"""The demo's gain over (warm-start seed, RL seed) pairs, each from an empty model cache.

For every pair: build the tiny model with that warm-start seed in a fresh temporary cache
(`ensure_tiny_model(cache_dir=..., seed=...)`: warm start until the dev-accuracy target), then
run the demo (`run_demo(seed=<RL seed>)`, GSPOConfig.seed) on it. Prints per pair the warm-start
steps, dev accuracy at the stop, held-out greedy accuracy before / after GSPO, the gain and the
wall time (build + demo); then the median and minimum gain. Writes bench/results/demo_seeds.json.

    .venv/bin/python bench/demo_seeds.py                      # the default pairs
    .venv/bin/python bench/demo_seeds.py --pairs 1234:42 1:7  # chosen pairs
    .venv/bin/python bench/demo_seeds.py --out bench/results/demo_seeds_other.json
    .venv/bin/python bench/demo_seeds.py --pairs 1234:42 --teacher-error-rate 0   # a correct teacher
    .venv/bin/python bench/demo_seeds.py --pairs 1234:42 --smoke --out /tmp/x.json  # seconds: does it run (tests)

Pairs run one after another, or `--jobs N` at once (each in its own process, one torch thread, as
in the demo; the gains do not depend on it, the wall times do). Measured on the 2-core AMD
EPYC machine: 128-227 s per pair, 18 min for the six default pairs (bench/results/demo_seeds.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

# (warm-start seed, RL seed): the recipe's default seeds first, then warm-start seeds 1-5,
# each with a different RL seed.
DEFAULT_PAIRS = ((1234, 42), (1, 1), (2, 7), (3, 13), (4, 42), (5, 3))
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "demo_seeds.json"
# --smoke: a 2-step warm start (no dev checks), 1 GSPO step, 32 eval prompts, no plot; the gains mean nothing.
SMOKE_SFT_STEPS, SMOKE_DEMO = 2, dict(max_steps=1, eval_max_samples=32, plot_curves=False)


def run_pair(warm_seed: int, rl_seed: int, teacher_error_rate: Optional[float] = None, smoke: bool = False) -> dict:
    """Build the model (fresh cache) and run the demo once; the row this script prints."""
    from gspo.demo import run_demo
    from gspo.tasks.tiny_model import ensure_tiny_model, read_warm_start_info

    work = Path(tempfile.mkdtemp(prefix=f"demo_seeds_{warm_seed}_{rl_seed}_"))
    try:
        start = time.perf_counter()
        rate = {} if teacher_error_rate is None else {"teacher_error_rate": teacher_error_rate}
        steps = {"sft_steps": SMOKE_SFT_STEPS} if smoke else {}
        model_dir = ensure_tiny_model(cache_dir=work / "cache", seed=warm_seed, verbose=False, **rate, **steps)
        build_s = time.perf_counter() - start
        summary = run_demo(
            output_dir=str(work / "demo"),
            policy_model_name=str(model_dir),
            seed=rl_seed,
            progress_bar=False,
            log_completions_steps=0,
            **(SMOKE_DEMO if smoke else {}),
        )
        info = read_warm_start_info(model_dir)
        return {
            "warm_start_seed": warm_seed,
            "rl_seed": rl_seed,
            "teacher_error_rate": info["teacher_error_rate"],
            "warm_start_steps": info["steps"],
            "dev_accuracy_at_stop": info["dev_accuracy"],
            "reached_target": info["reached_target"],
            "accuracy_before": summary["eval_before"]["accuracy"],
            "accuracy_after": summary["eval_after"]["accuracy"],
            "gain_points": summary["accuracy_gain_points"],
            "build_wall_s": build_s,
            "wall_s": time.perf_counter() - start,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _row_text(r: dict) -> str:
    dev = r["dev_accuracy_at_stop"]  # None: a fixed-step warm start (--smoke) checks no dev accuracy
    return (
        f"{r['warm_start_seed']:>9} {r['rl_seed']:>7} {r['warm_start_steps']:>10} "
        f"{'-' if dev is None else f'{dev:.3f}':>8} {r['accuracy_before']:>7.3f} {r['accuracy_after']:>7.3f} "
        f"{r['gain_points']:>+7.1f} {r['wall_s']:>7.1f}"
    )


def _settings() -> dict:
    from gspo.demo import DEMO_SETTINGS
    from gspo.tasks import tiny_model as tm

    return {
        "demo_settings": DEMO_SETTINGS,
        "recipe_version": tm.RECIPE_VERSION,
        "target_dev_accuracy": tm.SFT_TARGET_DEV_ACCURACY,
        "check_every": tm.SFT_CHECK_EVERY,
        "max_steps": tm.SFT_MAX_STEPS,
        "dev_samples": tm.DEV_SAMPLES,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--pairs", nargs="+", default=[f"{w}:{r}" for w, r in DEFAULT_PAIRS], help="WARM_SEED:RL_SEED pairs"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--teacher-error-rate",
        type=float,
        default=None,
        help="the warm-start teacher's error rate (default: the recipe's)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="pairs run at once, each in its own process (one thread)")
    ap.add_argument("--smoke", action="store_true", help="2-step warm start, 1 GSPO step: checks the script runs")
    args = ap.parse_args(argv)
    pairs = [tuple(int(x) for x in p.split(":")) for p in args.pairs]
    import torch

    header = "warm_seed rl_seed ws_steps dev@stop  before   after    gain  wall_s"
    rows = []
    # spawn: each pair in a fresh interpreter, as from an empty cache; results keep the pairs' order.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=spawn, max_tasks_per_child=1) as pool:
        for row in pool.map(run_pair, *zip(*pairs), [args.teacher_error_rate] * len(pairs), [args.smoke] * len(pairs)):
            rows.append(row)
            print(f"[demo_seeds] {header}\n[demo_seeds] {_row_text(row)}", flush=True)
    gains = [r["gain_points"] for r in rows]
    print(f"\n{header}\n" + "\n".join(_row_text(r) for r in rows))
    print(f"median gain {statistics.median(gains):+.1f} points, min {min(gains):+.1f}, max {max(gains):+.1f}")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
        "median_gain_points": statistics.median(gains),
        "min_gain_points": min(gains),
        "settings": _settings(),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu": _cpu_name(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
