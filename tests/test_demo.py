"""The offline demo's plumbing (the learning itself is measured by `make demo` and bench/demo_seeds.py)."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from gspo.demo import demo_config, run_demo
from gspo.tasks.arithmetic import extract_answer, make_problems
from gspo.tasks.tiny_model import evaluate_accuracy, generate_completions


def test_demo_config_is_valid_and_evaluates_on_at_least_200_problems():
    cfg = demo_config()
    assert cfg.eval_max_samples >= 200 and cfg.dataset_path == "builtin:arithmetic"
    assert cfg.reward_funcs == ["exact_answer"]


def _greedy_accuracy(model_dir, problems) -> float:
    """Independent recomputation: HF greedy decoding + exact match through evaluate_accuracy."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return evaluate_accuracy(model, AutoTokenizer.from_pretrained(model_dir), problems, max_new_tokens=6)


def test_run_demo_writes_summary_with_accuracy_before_and_after(tiny_model_dir, tmp_path):
    # The real demo builds and warm-starts the tiny model (a minute or more); a random one stands in.
    out = tmp_path / "demo"
    summary = run_demo(
        output_dir=str(out),
        max_steps=2,
        eval_max_samples=8,
        eval_steps=0,
        batch_size=2,
        group_size=2,
        num_mini_batches=1,
        progress_bar=False,
        policy_model_name=tiny_model_dir,
    )
    written = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and (out / "training_curves.png").exists()
    assert written["config"]["policy_model_name"] == tiny_model_dir and written["warm_start"] is None
    # builtin:arithmetic-eval with the config's seed (42), first 8 problems: what the trainer evaluated.
    problems = make_problems(256, seed=42, split="eval")[:8]
    # Before: the model in tiny_model_dir; after: the trained model the trainer saved into output_dir.
    for key, model_dir in (("eval_before", tiny_model_dir), ("eval_after", out)):
        acc = written[key]["accuracy"]
        assert written[key]["num_samples"] == 8.0
        assert acc * 8 == round(acc * 8)  # a count of correct answers out of 8
        assert acc == _greedy_accuracy(model_dir, problems)
    assert written["accuracy_gain_points"] == 100 * (
        written["eval_after"]["accuracy"] - written["eval_before"]["accuracy"]
    )


def test_demo_accuracy_is_the_exact_match_rate_of_greedy_answers(tiny_model_dir, tmp_path):
    # A random model gets the real answers wrong, so rig the reference answers instead: the model's
    # own greedy answer for 5 of 8 eval prompts, a surely different one for 3. Accuracy must be 5/8.
    problems = make_problems(256, seed=42, split="eval")[:8]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    greedy = generate_completions(
        model,
        AutoTokenizer.from_pretrained(tiny_model_dir),
        [p["prompt"] for p in problems],
        max_new_tokens=6,
        do_sample=False,
    )
    rows = [
        {"prompt": p["prompt"], "answer": extract_answer(c) + ("" if i < 5 else "x")}
        for i, (p, c) in enumerate(zip(problems, greedy))
    ]
    path = tmp_path / "rigged.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_demo(
        output_dir=str(tmp_path / "demo"),
        max_steps=1,
        eval_max_samples=8,
        eval_steps=0,
        batch_size=2,
        group_size=2,
        progress_bar=False,
        policy_model_name=tiny_model_dir,
        eval_dataset_path=str(path),
    )
    assert summary["eval_before"]["accuracy"] == 5 / 8
    assert summary["eval_after"]["accuracy"] == _greedy_accuracy(tmp_path / "demo", rows)
