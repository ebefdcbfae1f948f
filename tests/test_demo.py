"""The offline demo's plumbing (the learning itself is measured by `make demo`, see README)."""
from __future__ import annotations

import json

import gspo.models
from gspo.demo import demo_config, run_demo


def test_demo_config_is_valid_and_evaluates_on_at_least_200_problems():
    cfg = demo_config()
    assert cfg.eval_max_samples >= 200 and cfg.dataset_path == "builtin:arithmetic"
    assert cfg.reward_funcs == ["exact_answer"]


def test_run_demo_writes_summary_with_accuracy_before_and_after(tiny_model_dir, tmp_path, monkeypatch):
    # The real demo builds and warm-starts the tiny model (about a minute); here a random one stands in.
    monkeypatch.setattr(gspo.models, "resolve_model_path", lambda name: tiny_model_dir)
    summary = run_demo(output_dir=str(tmp_path), max_steps=2, eval_max_samples=8, eval_steps=0,
                       batch_size=2, group_size=2, num_mini_batches=1, progress_bar=False)
    written = json.loads((tmp_path / "summary.json").read_text())
    for key in ("eval_before", "eval_after"):
        assert 0.0 <= written[key]["accuracy"] <= 1.0 and written[key]["num_samples"] == 8.0
    assert summary["steps"] == 2 and (tmp_path / "training_curves.png").exists()
