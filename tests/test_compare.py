"""`gspo compare`: presets over one base config, one process per run, resumable, compare.md / compare.png."""

from __future__ import annotations

import json

import pytest
import yaml

from gspo.cli import main
from gspo.compare import ALGORITHMS, run_settings
from gspo.config import ConfigError, GSPOConfig


def test_presets_are_valid_configs_over_the_demo_base():
    from gspo.compare import base_settings

    base = base_settings(None)
    for name in ALGORITHMS:
        settings = run_settings(base, name, seed=1, output_dir="x", max_steps=None)
        cfg = GSPOConfig(**settings)
        assert cfg.seed == 1 and cfg.dataset_path == "builtin:arithmetic" and cfg.eval_steps == 25
        for key, value in ALGORITHMS[name].items():
            assert getattr(cfg, key) == value, (name, key)
    vapo = run_settings(base, "vapo", seed=0, output_dir="x", max_steps=10)
    assert vapo["value_learning_rate"] == 2 * base["learning_rate"]  # VAPO: critic at 2x the actor's rate
    assert vapo["value_warmup_steps"] == 2 and vapo["eval_steps"] == 1  # 10 // 5; six points -> a divisor of 10


def test_preset_files_hold_the_same_algorithm_values():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "examples"
    for name, preset in ALGORITHMS.items():
        data = yaml.safe_load((root / f"{name}.yaml").read_text())
        for key, value in preset.items():
            assert data[key] == value, (name, key)


def test_compare_runs_each_preset_once_and_writes_the_table_and_plot(
    tiny_model_dir, arithmetic_jsonl, tmp_path, capsys
):
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            dict(
                policy_model_name=tiny_model_dir,
                dataset_path=arithmetic_jsonl,
                eval_dataset_path=arithmetic_jsonl,
                eval_max_samples=8,
                reward_funcs=["exact_answer"],
                batch_size=2,
                group_size=2,
                max_new_tokens=4,
                learning_rate=1e-3,
                log_completions_steps=0,
            )
        )
    )
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(base), "--algorithms", "gspo,ppo", "--max_steps", "2", "--output_dir", str(out)]
    assert main(args) == 0
    table = (out / "compare.md").read_text()
    assert "| gspo |" in table and "| ppo |" in table and "nan" not in table
    assert (out / "compare.png").stat().st_size > 20_000
    for run in ("gspo-seed0", "ppo-seed0"):
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and "eval/accuracy" in rows[-1]
    assert "value_loss" in rows[-1]  # ppo trained a critic
    stamp = (out / "gspo-seed0" / "metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # resumable: finished runs are kept, only the outputs are rewritten
    assert "gspo-seed0: done earlier, kept" in capsys.readouterr().out
    assert (out / "gspo-seed0" / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_unknown_algorithm_is_a_clear_error(tmp_path):
    from gspo.compare import run_compare

    with pytest.raises(ConfigError, match=r"unknown algorithm\(s\) \['dpo'\]"):
        run_compare(algorithms=["gspo", "dpo"], seeds=[0], output_dir=str(tmp_path))
