"""The tool demo's gain (`gspo demo --task tools`) over (warm-start seed, RL seed) pairs, each from an empty cache.

For every pair: build the tool-use model with that warm-start seed in a fresh temporary cache
(`ensure_tool_model(cache_dir=..., seed=...)`), then run the tool demo on it (`run_demo(task="tools",
seed=<RL seed>)`). Prints per pair the held-out greedy accuracy and the share of episodes that call the
calculator, before and after GSPO, the gains and the wall time; then the median and the minimum gain. Writes
bench/results/tool_seeds.json.

    .venv/bin/python bench/tool_seeds.py --jobs 2                # the five default pairs, two at a time
    .venv/bin/python bench/tool_seeds.py --pairs 1234:42 1:1     # chosen pairs
    .venv/bin/python bench/tool_seeds.py --pairs 1234:42 --smoke --out /tmp/x.json   # seconds: does it run (tests)
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

DEFAULT_PAIRS = ((1234, 42), (1, 1), (2, 7), (3, 13), (4, 3))
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "tool_seeds.json"
# --smoke: a 2-step warm start, 1 GSPO step, 8 eval prompts, no plot; the figures mean nothing.
SMOKE_SFT_STEPS, SMOKE_DEMO = 2, dict(max_steps=1, eval_max_samples=8, plot_curves=False, batch_size=2)


def run_pair(warm_seed: int, rl_seed: int, smoke: bool = False) -> dict:
    from gspo.demo import run_demo
    from gspo.tasks.tool_use import SFT_STEPS, ensure_tool_model

    work = Path(tempfile.mkdtemp(prefix=f"tool_seeds_{warm_seed}_{rl_seed}_"))
    try:
        start = time.perf_counter()
        steps = SMOKE_SFT_STEPS if smoke else SFT_STEPS
        model_dir = ensure_tool_model(work / "cache", seed=warm_seed, steps=steps, verbose=False)
        build_s = time.perf_counter() - start
        summary = run_demo(
            output_dir=str(work / "demo"),
            task="tools",
            policy_model_name=str(model_dir),
            seed=rl_seed,
            progress_bar=False,
            **(SMOKE_DEMO if smoke else {}),
        )
        before, after = summary["eval_before"], summary["eval_after"]
        return {
            "warm_seed": warm_seed,
            "rl_seed": rl_seed,
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
            "accuracy_gain_points": 100 * (after["accuracy"] - before["accuracy"]),
            "tool_rate_before": summary["tool_call_rate_before"],
            "tool_rate_after": summary["tool_call_rate_after"],
            "steps": summary["steps"],
            "build_s": build_s,
            "wall_s": time.perf_counter() - start,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=[f"{w}:{r}" for w, r in DEFAULT_PAIRS])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="pairs run at once, each in its own process (one thread)")
    args = parser.parse_args(argv)
    pairs = [tuple(int(x) for x in p.split(":")) for p in args.pairs]
    rows = []
    print("warm  rl   accuracy before -> after (gain)    tool calls before -> after   wall")
    # spawn: each pair in a fresh interpreter, as from an empty cache; results keep the pairs' order
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=spawn, max_tasks_per_child=1) as pool:
        results = list(pool.map(run_pair, *zip(*pairs), [args.smoke] * len(pairs)))
    for (warm, rl), row in zip(pairs, results):
        rows.append(row)
        print(
            f"{warm:<5} {rl:<4} {row['accuracy_before']:.3f} -> {row['accuracy_after']:.3f} "
            f"({row['accuracy_gain_points']:+.1f})      {row['tool_rate_before']:.3f} -> {row['tool_rate_after']:.3f}"
            f"        {row['wall_s']:.0f} s",
            flush=True,
        )
    gains = [r["accuracy_gain_points"] for r in rows]
    rates = [100 * (r["tool_rate_after"] - r["tool_rate_before"]) for r in rows]
    print(
        f"median accuracy gain {statistics.median(gains):+.1f} points (min {min(gains):+.1f}); "
        f"median tool-call rate gain {statistics.median(rates):+.1f} points (min {min(rates):+.1f})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": platform.processor() or platform.machine(),
                "command": "bench/tool_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "rows": rows,
                "median_gain_points": statistics.median(gains),
                "min_gain_points": min(gains),
            },
            indent=2,
        )
    )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
