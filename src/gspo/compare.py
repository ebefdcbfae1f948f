"""`gspo compare`: the brief's four algorithms (GSPO, GRPO, PPO, VAPO) side by side on one task.

Each algorithm is a preset of algorithm fields (ALGORITHMS; examples/{gspo,grpo,ppo,vapo}.yaml hold the same
values with their sources) over one base config: the same data, reward, model, sampling, batch, learning
rate and seeds. Every (algorithm, seed) run is a `gspo train` of its own process, one after another (its
peak memory is its own), into <output_dir>/<algorithm>-seed<seed>/; a run whose train_summary.json exists
is not redone, so an interrupted comparison resumes. Then compare.png (reward and eval accuracy against
step and against wall time, mean and range over seeds) and compare.md (a table per algorithm).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

# Algorithm fields only; everything else comes from the base config. Sources in examples/<name>.yaml.
ALGORITHMS = {
    "gspo": dict(importance_sampling_level="sequence", advantage_estimator="group"),
    "grpo": dict(
        importance_sampling_level="token", advantage_estimator="group", loss_aggregation="seq-mean-token-mean"
    ),
    "ppo": dict(
        importance_sampling_level="token",
        advantage_estimator="gae",
        gamma=1.0,
        gae_lambda=0.95,
        gae_lambda_value=0.95,
        value_clip_range=0.2,
        kl_in_reward=True,
        whiten_advantages=True,
    ),
    "vapo": dict(
        importance_sampling_level="token",
        advantage_estimator="gae",
        gamma=1.0,
        gae_lambda="adaptive",
        length_adaptive_alpha=1.0,  # not the paper's 0.05, whose lambda is 0 below 20 tokens (examples/vapo.yaml)
        gae_lambda_value=1.0,
        clip_range_low=0.2,
        clip_range_high=0.28,
        value_warmup_steps=20,
        positive_nll_coef=0.1,
        kl_coef=0.0,
        adaptive_kl=False,
    ),
}
# The paper's MoE comparison (§5.3): GRPO with and without Routing Replay against GSPO, with and without it.
ALGORITHMS["grpo-replay"] = dict(ALGORITHMS["grpo"], routing_replay="old")
ALGORITHMS["gspo-replay"] = dict(ALGORITHMS["gspo"], routing_replay="old")
TASKS = {
    "arithmetic": ("gspo", "grpo", "ppo", "vapo"),
    "moe": ("gspo", "grpo", "grpo-replay", "gspo-replay"),  # the demo task on its MoE model, off-policy
}
SUMMARY_FILE = "train_summary.json"
USAGE_FILE = "compare_usage.json"


def base_settings(config_path: Optional[str], task: str = "arithmetic") -> dict:
    """The base config's fields: a YAML file, or the offline demo's settings (the built-in arithmetic task) at
    150 steps, the presets' length (examples/*.yaml), which keeps four runs within minutes. Task 'moe': the same
    on builtin:tiny-arithmetic-moe, each rollout batch split into 4 mini-batches (the paper's off-policy setting,
    GSPO §5.1), so three of every four updates use a rollout sampled by older weights."""
    if config_path:
        from gspo.yaml_config import read_yaml

        return read_yaml(config_path)
    from gspo.demo import DEMO_SETTINGS

    base = dict(DEMO_SETTINGS, log_completions_steps=0, max_steps=150)
    if task == "moe":
        base.update(policy_model_name="builtin:tiny-arithmetic-moe", num_mini_batches=4)
    return base


def run_settings(base: dict, algorithm: str, seed: int, output_dir: Path, max_steps: Optional[int]) -> dict:
    settings = {**base, **ALGORITHMS[algorithm], "seed": seed, "output_dir": str(output_dir), "progress_bar": False}
    if algorithm == "vapo" and "value_learning_rate" not in base:  # VAPO §5.1: the critic at 2x the actor's rate
        settings["value_learning_rate"] = 2 * float(base.get("learning_rate", 1e-5))
    if max_steps is not None:
        settings["max_steps"] = max_steps
        if algorithm == "vapo":  # keep value pretraining to at most a fifth of a shortened run
            settings["value_warmup_steps"] = min(settings["value_warmup_steps"], max_steps // 5)
    if settings.get("eval_dataset_path"):  # six eval points per run, the last at the last step
        steps = int(settings.get("max_steps", 150))
        settings["eval_steps"] = next(k for k in range(max(1, steps // 6), 0, -1) if steps % k == 0)
    return settings


def _train_once(settings: dict, run_dir: Path) -> None:
    """`gspo train` in a process of its own; records its wall time and peak RSS next to the run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "compare_config.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    start = os.times().elapsed
    proc = subprocess.Popen([sys.executable, "-m", "gspo", "train", "--config", str(config)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"gspo compare: the run in {run_dir} failed (exit {proc.returncode}); its log is above")
    usage_record = {"wall_s": os.times().elapsed - start, "peak_rss_mb": usage.ru_maxrss / 1024}
    (run_dir / USAGE_FILE).write_text(json.dumps(usage_record) + "\n")


def run_compare(
    *,
    algorithms: list,
    seeds: list,
    output_dir: str,
    config_path: Optional[str] = None,
    max_steps: Optional[int] = None,
    task: str = "arithmetic",
) -> dict:
    """Run (or reuse) every (algorithm, seed) run, then write compare.png and compare.md. Returns the table."""
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        from gspo.config import ConfigError

        raise ConfigError(f"gspo compare: unknown algorithm(s) {unknown}; allowed: {sorted(ALGORITHMS)}")
    out, base = Path(output_dir), base_settings(config_path, task)
    for algorithm in algorithms:
        for seed in seeds:
            run_dir = out / f"{algorithm}-seed{seed}"
            if (run_dir / SUMMARY_FILE).is_file() and (run_dir / USAGE_FILE).is_file():
                print(f"[gspo compare] {run_dir.name}: done earlier, kept", flush=True)
                continue
            print(f"[gspo compare] {run_dir.name}: training", flush=True)
            _train_once(run_settings(base, algorithm, seed, run_dir, max_steps), run_dir)
    runs = {a: [_load_run(out / f"{a}-seed{s}") for s in seeds] for a in algorithms}
    table = {a: _row(rs) for a, rs in runs.items()}
    from gspo.plotting import plot_compare

    plot_compare(runs, out / "compare.png")
    (out / "compare.md").write_text(_markdown(table, seeds, base, max_steps))
    print(f"[gspo compare] {out / 'compare.md'}; {out / 'compare.png'}", flush=True)
    return table


def _load_run(run_dir: Path) -> dict:
    from gspo.tracking import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    usage = json.loads((run_dir / USAGE_FILE).read_text())
    return {"rows": rows, **usage}


def _row(runs: list) -> dict:
    """Final / best eval accuracy (mean over seeds), median step time, tokens/s, peak memory."""
    finals, bests, steps, rates = [], [], [], []
    series = lambda key: [m[key] for r in runs for m in r["rows"] if isinstance(m.get(key), (int, float))]  # noqa: E731
    for r in runs:
        acc = [m["eval/accuracy"] for m in r["rows"] if "eval/accuracy" in m]
        finals.append(acc[-1] if acc else float("nan"))
        bests.append(max(acc) if acc else float("nan"))
        steps += [m["step_time_s"] for m in r["rows"] if "step_time_s" in m]
        rates += [m["tokens_per_s"] for m in r["rows"] if "tokens_per_s" in m]
    return {
        "final_accuracy": statistics.mean(finals),
        "final_accuracy_min": min(finals),
        "final_accuracy_max": max(finals),
        "best_accuracy": statistics.mean(bests),
        "step_time_s": statistics.median(steps) if steps else float("nan"),
        "tokens_per_s": statistics.median(rates) if rates else float("nan"),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "wall_s": statistics.mean(r["wall_s"] for r in runs),
        "reward": statistics.mean(series("raw_reward_mean")) if series("raw_reward_mean") else float("nan"),
        "clip_token": statistics.mean(series("clip_fraction_token")) if series("clip_fraction_token") else float("nan"),
        "clip_seq": statistics.mean(series("clip_fraction_seq")) if series("clip_fraction_seq") else float("nan"),
        "expert_change": (
            statistics.mean(series("moe/expert_change_fraction")) if series("moe/expert_change_fraction") else None
        ),
    }


def _markdown(table: dict, seeds: list, base: dict, max_steps: Optional[int]) -> str:
    steps = max_steps if max_steps is not None else base.get("max_steps")
    lines = [
        f"# gspo compare: {len(table)} algorithms, seeds {', '.join(map(str, seeds))}, {steps} steps",
        "",
        f"Model {base.get('policy_model_name')}, data {base.get('dataset_path')}, reward {base.get('reward_funcs')}, "
        f"{base.get('batch_size')} prompts x {base.get('group_size')} completions per step, learning rate "
        f"{base.get('learning_rate')}. Eval accuracy: greedy, {base.get('eval_dataset_path')}; mean over seeds "
        "[min, max].",
        "",
        "| algorithm | final eval accuracy | best eval accuracy | train reward (mean) | clip fraction token / seq "
        "| expert change (mean) | step time (median) | tokens/s (median) | peak RSS | wall time per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in table.items():
        change = "-" if r.get("expert_change") is None else f"{r['expert_change']:.4f}"
        lines.append(
            f"| {name} | {r['final_accuracy']:.3f} [{r['final_accuracy_min']:.3f}, {r['final_accuracy_max']:.3f}] "
            f"| {r['best_accuracy']:.3f} | {r['reward']:.3f} | {r['clip_token']:.4f} / {r['clip_seq']:.4f} "
            f"| {change} | {r['step_time_s']:.2f} s | {r['tokens_per_s']:.0f} "
            f"| {r['peak_rss_mb']:.0f} MB | {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines) + "\n"
