"""Does a critic-based preset learn on short answers? PPO vs VAPO (and ablations) on 2-digit addition.

The task (issue 18 §7): prompts "a+b=" with a, b in [10, 99], answers of 2-3 digits, a partial-credit
reward (`partial_credit` below: the share of answer characters right in position, 1.0 for the exact
answer), and a *random-init* tiny Llama (hidden 64, 2 layers, 4 heads) with the project's char-level
tokenizer. Completions are at most `max_new_tokens` = 6 tokens (the presets' value), so every
sequence is far below VAPO's length-adaptive lambda's knee: lambda = 1 - 1/(alpha * l) is 0 for
alpha * l <= 1, i.e. l <= 20 at alpha = 0.05.

The run is `gspo train --config <merged.yaml>` in a subprocess, the YAML being examples/<preset>.yaml
with the model, data and reward swapped in, batch 8 x group 4, no eval, plus any --override. It
reports the mean of `raw_reward_mean` over the first 20 and the last 20 steps of metrics.jsonl.
`--task demo` runs the preset as shipped instead (the built-in warm-started model, exact_answer,
16 x 8, its 150 steps) and also reports the end-of-run held-out accuracy. Findings and the per-run
table: bench/results/vapo/README.md.

    .venv/bin/python bench/vapo_short_answers.py --preset ppo  --seed 1
    .venv/bin/python bench/vapo_short_answers.py --preset vapo --seed 1
    .venv/bin/python bench/vapo_short_answers.py --preset vapo --seed 1 --override gae_lambda=0.95
    .venv/bin/python bench/vapo_short_answers.py --task demo --preset vapo --override length_adaptive_alpha=0.05
    .venv/bin/python bench/vapo_short_answers.py --smoke --workdir /tmp/x   # 2 steps of 2 x 2 (CI)

Results: bench/results/vapo/<name>.json (name: --out, else derived from preset, seed and overrides);
the run directory (model, data, metrics) under outputs/vapo_short_answers/<name>/ (git-ignored; --workdir).
One thread (OMP_NUM_THREADS=1): the box is shared. Not a timing benchmark; wall_s is informational.

This file is also the reward file: the trainer loads `partial_credit` from it by path, so keep the
module's top level free of heavy imports.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "vapo"
WORK = ROOT / "outputs" / "vapo_short_answers"
ARCHS = {
    "h64": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    ),
    # the project's demo architecture (gspo.tasks.tiny_model.MODEL_KWARGS: 256 wide, 2 layers, 8 heads), random init
    "h256": dict(),
}
N_TRAIN = 4000  # prompts written to train.jsonl (300 steps x 8 prompts = 2400 are drawn)
WINDOW = 20  # steps averaged at the start and at the end


# ----------------------------------------------------------------------------------
# The reward (loaded by the trainer from this file: "bench/vapo_short_answers.py:partial_credit")
# ----------------------------------------------------------------------------------
def _guesses_and_answers(completions, answer):
    answers = answer if answer is not None else [""] * len(completions)
    for completion, ans in zip(completions, answers):
        guess = completion if isinstance(completion, str) else str(completion)
        for marker in ("<eos>", "<pad>", "<bos>"):
            guess = guess.split(marker)[0]
        yield guess, str(ans)


def partial_credit(prompts=None, completions=None, answer=None, **kwargs) -> list[float]:
    """The share of the answer's digits right in position: hits / len(answer); 1.0 for the exact answer
    (and for an answer followed by extra characters, which cost nothing): "46" -> 1.0, "47" -> 0.5,
    "4" -> 0.5, "96" -> 0.5, "9" -> 0."""
    out = []
    for guess, ans in _guesses_and_answers(completions, answer):
        out.append(1.0 if guess == ans else sum(g == a for g, a in zip(guess, ans)) / max(len(ans), 1))
    return out


def partial_credit_diluted(prompts=None, completions=None, answer=None, **kwargs) -> list[float]:
    """As partial_credit but over max(len(answer), len(guess)): extra characters (spaces included)
    dilute the credit, "46 " -> 0.67, so stopping at the right length (EOS) pays by itself."""
    out = []
    for guess, ans in _guesses_and_answers(completions, answer):
        hits = sum(g == a for g, a in zip(guess, ans))
        out.append(1.0 if guess == ans else hits / max(len(ans), len(guess), 1))
    return out


# ----------------------------------------------------------------------------------
# Model, data, config
# ----------------------------------------------------------------------------------
def build_model_dir(path: Path, seed: int, arch: dict) -> Path:
    """A random-init tiny Llama with the project's char-level tokenizer, saved to `path` (reused if there)."""
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    import torch

    from gspo.tasks.tiny_model import build_model, build_tokenizer

    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = build_model(tokenizer, **arch)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_dataset(path: Path, n: int, seed: int) -> Path:
    """n addition problems "a+b=" -> "a+b" with a, b in [10, 99], one JSON object a line."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            fh.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return path


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise SystemExit(f"--override wants key=value, got {text!r}")
    key, value = text.split("=", 1)
    import yaml

    return key.strip(), yaml.safe_load(value)  # numbers, bools, null, 'adaptive' as YAML reads them


def merged_config(preset, run_dir, model_dir, data, *, task, steps, seed, batch, group, reward, overrides):
    """examples/<preset>.yaml with the run's fields. task 'add2': this file's model, data and reward, batch x
    group, no eval. task 'demo': the preset as shipped (its built-in warm-started model, data, exact_answer,
    16 x 8), greedy eval on the held-out split at the end only; `steps` None keeps the preset's max_steps."""
    import yaml

    cfg = yaml.safe_load((ROOT / "examples" / f"{preset}.yaml").read_text())
    if task == "add2":
        cfg.update(
            policy_model_name=str(model_dir),
            dataset_path=str(data),
            eval_dataset_path=None,
            reward_funcs=[f"{Path(__file__).resolve()}:{reward}"],
            batch_size=batch,
            group_size=group,
        )
    if steps is not None:
        cfg["max_steps"] = steps
    cfg.update(
        eval_steps=0,
        seed=seed,
        output_dir=str(run_dir / "train"),
        progress_bar=False,
        log_completions_steps=0,
        logging_steps=50,
    )
    cfg.update(overrides)
    return cfg


def slug(overrides: dict) -> str:
    parts = [f"{k}={v}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts))


def summarize(rows: list[dict], window: int) -> dict:
    rewards = [r["raw_reward_mean"] for r in rows if "raw_reward_mean" in r]

    def mean(xs):
        return sum(xs) / len(xs) if xs else None  # None (JSON null) rather than NaN

    def mean_key(key, part):
        vals = [r[key] for r in part if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
        return mean(vals)

    w = min(window, max(1, len(rewards) // 2))
    return {
        "steps_logged": len(rewards),
        "window": w,
        "reward_first": mean(rewards[:w]),
        "reward_last": mean(rewards[-w:]),
        "reward_gain": mean(rewards[-w:]) - mean(rewards[:w]) if rewards else None,
        "reward_max_step": max(rewards) if rewards else None,
        "gae_lambda_policy_mean": mean_key("gae_lambda_policy_mean", rows),
        "explained_variance_last": mean_key("explained_variance", rows[-w:]),
        "kl_divergence_last": mean_key("kl_divergence", rows[-w:]),
        "completion_length_last": mean_key("completion_length_mean", rows[-w:]),
        "reward_by_step": [round(x, 4) for x in rewards],
    }


def main(argv=None) -> int:
    global WORK
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="vapo", help="examples/<preset>.yaml as the base: ppo or vapo")
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a GSPOConfig field over the preset (repeatable), e.g. gae_lambda=0.95",
    )
    ap.add_argument(
        "--task",
        default="add2",
        choices=("add2", "demo"),
        help="add2: 2-digit addition, random-init model, partial credit, --batch-size x --group-size "
        "(default); demo: the preset as shipped on the built-in warm-started demo task (exact answer)",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: 300 for add2, the preset's max_steps for demo)",
    )
    ap.add_argument("--seed", type=int, default=1, help="training seed (sampling, data order)")
    ap.add_argument("--model-seed", type=int, default=0, help="seed of the random init (same for every run)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument(
        "--arch",
        default="h64",
        choices=tuple(ARCHS),
        help="h64: hidden 64, 2 layers, 4 heads; h256: the demo model's shape (hidden 256, 8 heads), random init",
    )
    ap.add_argument(
        "--reward",
        default="partial_credit",
        choices=("partial_credit", "partial_credit_diluted"),
        help="partial_credit: share of answer digits right in position; _diluted: over the longer of "
        "answer and guess, so extra characters cost",
    )
    ap.add_argument("--out", default=None, help="result name: bench/results/vapo/<out>.json")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results/vapo)")
    ap.add_argument(
        "--smoke", action="store_true", help="2 steps of 2 x 2; the JSON goes to <workdir>/smoke, not bench/results"
    )
    ap.add_argument("--workdir", default=None, help="run dirs, model, data (outputs/vapo_short_answers)")
    ap.add_argument(
        "--src",
        default=None,
        help="a directory holding a gspo package to run instead of the installed one (put first on "
        "PYTHONPATH), e.g. a `git archive HEAD src` export while the working tree is mid-edit",
    )
    args = ap.parse_args(argv)
    if args.workdir:
        WORK = Path(args.workdir).resolve()

    overrides = dict(parse_override(o) for o in args.override)
    if args.task == "demo":
        tag = "_demo"
    else:
        tag = ("" if args.reward == "partial_credit" else "_diluted") + ("" if args.arch == "h64" else f"_{args.arch}")
    name = args.out or (f"{args.preset}{tag}_seed{args.seed}" + (f"__{slug(overrides)}" if overrides else ""))
    if args.smoke:
        args.steps, args.batch_size, args.group_size = 2, 2, 2
        if args.task == "demo":
            overrides = {"batch_size": 2, "group_size": 2, "eval_dataset_path": None, **overrides}
    if args.steps is None and args.task == "add2":
        args.steps = 300
    if args.smoke:
        name = f"smoke_{name}"
    results_dir = Path(args.results_dir) if args.results_dir else (WORK / "smoke" if args.smoke else RESULTS)
    run_dir = WORK / name

    if args.src:
        src = str(Path(args.src).resolve())
        sys.path.insert(0, src)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    model_dir = data = None
    if args.task == "add2":
        model_dir = build_model_dir(
            WORK / f"model-{args.arch}-seed{args.model_seed}", args.model_seed, ARCHS[args.arch]
        )
        data = write_dataset(WORK / "data" / f"add2_{N_TRAIN}.jsonl", N_TRAIN, seed=0)
    cfg = merged_config(
        args.preset,
        run_dir,
        model_dir,
        data,
        task=args.task,
        steps=args.steps,
        seed=args.seed,
        batch=args.batch_size,
        group=args.group_size,
        reward=args.reward,
        overrides=overrides,
    )
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    metrics_path = run_dir / "train" / "metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()  # a rerun under the same name starts clean

    gspo = Path(sys.executable).parent / "gspo"
    cmd = (
        [str(gspo), "train", "--config", str(cfg_path)]
        if gspo.exists()
        else [sys.executable, "-m", "gspo", "train", "--config", str(cfg_path)]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"[vapo_short_answers] {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    wall = time.time() - start
    if proc.returncode != 0:
        print(f"[vapo_short_answers] gspo train failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode

    from gspo.tracking import read_metrics

    rows = read_metrics(metrics_path)
    evals = [r for r in rows if "eval/accuracy" in r]
    summary = run_dir / "train" / "train_summary.json"  # the end-of-run eval lands here, not in metrics.jsonl
    if summary.is_file():
        final = json.loads(summary.read_text()).get("final_metrics", {})
        if "eval/accuracy" in final:
            evals.append(final)
    result = {
        "name": name,
        "task": args.task,
        "preset": args.preset,
        "overrides": overrides,
        "seed": args.seed,
        "model_seed": args.model_seed,
        "steps": cfg["max_steps"],
        "batch_size": cfg["batch_size"],
        "group_size": cfg["group_size"],
        "reward": args.reward if args.task == "add2" else cfg["reward_funcs"],
        "arch": args.arch if args.task == "add2" else cfg["policy_model_name"],
        "final_eval_accuracy": evals[-1]["eval/accuracy"] if evals else None,
        "command": " ".join([".venv/bin/python", "bench/vapo_short_answers.py", *(argv or sys.argv[1:])]),
        "gspo_source": args.src or "installed",
        "wall_s": round(wall, 1),
        **summarize(rows, WINDOW),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"{name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    brief = {k: v for k, v in result.items() if k != "reward_by_step"}
    print(json.dumps(brief))
    print(
        f"[vapo_short_answers] {name}: reward first{result['window']} {result['reward_first']:.3f} -> "
        f"last{result['window']} {result['reward_last']:.3f}, final eval accuracy {result['final_eval_accuracy']}  "
        f"({out})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
