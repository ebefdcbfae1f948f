#!/usr/bin/env python
"""DAPO dynamic sampling on the offline demo task: the same demo run with and without it, same seeds.

    .venv/bin/python bench/dynamic_sampling.py                     # 300 steps, RL seed 42, both variants
    .venv/bin/python bench/dynamic_sampling.py --seeds 42 1 --steps 150
    .venv/bin/python bench/dynamic_sampling.py --smoke             # 2 steps, no figures worth reading (CI)

Each run is `gspo demo`'s (gspo.demo.run_demo: the built-in tiny model, 16 prompts x 8 completions, GSPO,
held-out greedy accuracy every 25 steps) with dynamic_sampling on or off; one torch thread. Reported per run:
the zero-spread fraction of the groups trained on (frac_reward_zero_std) and of the groups generated
(dynamic_sampling/zero_std_fraction), generation rounds per step, step time, accuracy before / after, and
reward and accuracy curves by step and by training wall time (bench/results/dynamic_sampling/curves.png).
Run it alone: step times move when another process shares the cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "dynamic_sampling"


def run_one(seed: int, dynamic: bool, steps: int, rounds: int, workdir: Path, smoke: bool, model=None) -> dict:
    from gspo.demo import run_demo
    from gspo.tracking import read_metrics

    name = f"{'dynamic' if dynamic else 'plain'}-seed{seed}"
    out = workdir / name
    extra = dict(eval_steps=1, eval_max_samples=8, log_completions_steps=0) if smoke else {}
    if model is not None:
        extra["policy_model_name"] = str(model)
    summary = run_demo(
        str(out),
        max_steps=steps,
        seed=seed,
        dynamic_sampling=dynamic,
        dynamic_sampling_max_rounds=rounds,
        progress_bar=False,
        plot_curves=False,
        **extra,
    )
    rows = read_metrics(out)
    mean = lambda key: statistics.fmean(r[key] for r in rows if r.get(key) is not None)  # noqa: E731
    result = {
        "name": name,
        "seed": seed,
        "dynamic_sampling": dynamic,
        "steps": len(rows),
        "accuracy_before": summary["eval_before"]["accuracy"],
        "accuracy_after": summary["eval_after"]["accuracy"],
        "frac_reward_zero_std_trained": mean("frac_reward_zero_std"),
        "step_time_s_mean": mean("step_time_s"),
        "train_wall_s": sum(r["step_time_s"] for r in rows),
        "curves": {
            "step": [r["step"] for r in rows],
            "reward": [r["raw_reward_mean"] for r in rows],
            "step_time_s": [r["step_time_s"] for r in rows],
            "eval_step": [r["step"] for r in rows if r.get("eval/accuracy") is not None],
            "eval_accuracy": [r["eval/accuracy"] for r in rows if r.get("eval/accuracy") is not None],
        },
    }
    if dynamic:
        result["frac_reward_zero_std_generated"] = mean("dynamic_sampling/zero_std_fraction")
        result["rounds_mean"] = mean("dynamic_sampling/rounds")
        result["filled_groups_mean"] = mean("dynamic_sampling/filled_groups")
    else:  # without the filter, the groups generated are the groups trained on
        result["frac_reward_zero_std_generated"] = result["frac_reward_zero_std_trained"]
    return result


def plot(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        c = r["curves"]
        style = "-" if r["dynamic_sampling"] else "--"
        wall = list(itertools.accumulate(c["step_time_s"]))
        eval_wall = [wall[s - 1] for s in c["eval_step"]]
        window = 10
        smooth = [statistics.fmean(c["reward"][max(0, i - window + 1) : i + 1]) for i in range(len(c["reward"]))]
        axes[0].plot(c["step"], smooth, style, label=r["name"])
        axes[1].plot(c["eval_step"], c["eval_accuracy"], style + "o", label=r["name"])
        axes[2].plot(eval_wall, c["eval_accuracy"], style + "o", label=r["name"])
    axes[0].set(title="train reward (mean of 10 steps)", xlabel="step")
    axes[1].set(title="held-out greedy accuracy", xlabel="step")
    axes[2].set(title="held-out greedy accuracy", xlabel="training wall time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-rounds", type=int, default=4, help="dynamic_sampling_max_rounds")
    parser.add_argument("--smoke", action="store_true", help="2 steps, tiny evaluation: that it runs, no figures")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--model", default=None, help="another policy than the demo's built-in tiny model")
    args = parser.parse_args(argv)
    steps = 2 if args.smoke else args.steps
    results = []
    with tempfile.TemporaryDirectory(prefix="gspo-ds-") as tmp:
        for seed in args.seeds:
            for dynamic in (False, True):
                results.append(run_one(seed, dynamic, steps, args.max_rounds, Path(tmp), args.smoke, args.model))
    for r in results:
        print(
            f"{r['name']:>16}: acc {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f}, zero-spread groups "
            f"generated {r['frac_reward_zero_std_generated']:.3f} / trained {r['frac_reward_zero_std_trained']:.3f}, "
            f"rounds {r.get('rounds_mean', 1.0):.2f}, step {r['step_time_s_mean']:.3f} s, "
            f"train wall {r['train_wall_s']:.0f} s",
            flush=True,
        )
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        plot(results, args.out / "curves.png")
        print(f"wrote {args.out / 'results.json'} and {args.out / 'curves.png'}")
    print(json.dumps([{k: v for k, v in r.items() if k != "curves"} for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
