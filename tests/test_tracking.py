"""Tests for gspo.tracking (metrics sinks, progress, sample tables) and gspo.plotting."""

from __future__ import annotations

import json
import math
import sys
import warnings

import pytest
import torch

from gspo.plotting import ema, plot_run
from gspo.tracking import CONFIG_FILE, MetricsLogger, Progress, print_samples, read_metrics


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_log_writes_one_flushed_line_per_step(tmp_path):
    logger = MetricsLogger(str(tmp_path), ["jsonl"], config={"lr": 1e-5, "fn": print})
    logger.log(1, {"raw_reward_mean": torch.tensor(0.5), "kl_divergence": 0.01, "ok": True, "n": 3})
    # Read before close: the line must already be on disk (a SIGKILL would skip close()).
    rows = _lines(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "raw_reward_mean": 0.5, "kl_divergence": 0.01, "ok": 1.0, "n": 3.0}]
    logger.log(2, {"step": 2.0, "policy_loss": float("nan"), "entropy": torch.tensor(float("inf"))})
    rows = _lines(tmp_path / "metrics.jsonl")
    assert rows[1] == {
        "step": 2,
        "policy_loss": None,
        "entropy": None,
        "non_finite": ["policy_loss", "entropy"],
    }  # strict JSON, no NaN token
    assert isinstance(rows[1]["step"], int)  # a float "step" in the metrics does not replace the int
    logger.close()
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["lr"] == 1e-5 and "print" in config["fn"]
    assert not (tmp_path / "config.json").exists()  # reserved for the final model's config


def test_log_rejects_non_scalar_tensor(tmp_path):
    logger = MetricsLogger(str(tmp_path), ["jsonl"])
    with pytest.raises(TypeError, match="scalar"):
        logger.log(1, {"x": torch.ones(3)})
    logger.close()


def test_truncate_after_and_resume(tmp_path):
    logger = MetricsLogger(str(tmp_path), ["jsonl"])
    for step in range(1, 6):
        logger.log(step, {"raw_reward_mean": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "raw_rew')  # a line cut off by a kill
    resumed = MetricsLogger(str(tmp_path), ["jsonl"], resume=True)
    resumed.truncate_after(3)
    resumed.log(4, {"raw_reward_mean": 40.0})
    resumed.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["raw_reward_mean"] == 40.0
    # A fresh (non-resumed) run in the same directory starts a new file.
    fresh = MetricsLogger(str(tmp_path), ["jsonl"], resume=False)
    fresh.log(1, {"raw_reward_mean": 7.0})
    fresh.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "raw_reward_mean": 7.0}]


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path)


def test_disabled_logger_is_a_no_op(tmp_path):
    logger = MetricsLogger(str(tmp_path / "run"), ["jsonl", "tensorboard", "wandb"], {"a": 1}, enabled=False)
    logger.log(1, {"x": 1.0})
    logger.truncate_after(0)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_events_written_and_purged_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(str(tmp_path), ["jsonl", "tensorboard"])
    for step in range(1, 5):
        logger.log(step, {"raw_reward_mean": float(step), "note": "text is jsonl-only"})
    logger.truncate_after(2)
    logger.log(3, {"raw_reward_mean": 30.0})
    logger.close()
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path / "runs"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["raw_reward_mean"]
    events = acc.Scalars("raw_reward_mean")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_wandb_missing_warns_once_and_continues(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = MetricsLogger(str(tmp_path), ["jsonl", "wandb"], {"a": 1})
        logger.log(1, {"x": 1.0})
        logger.log(2, {"x": 2.0})
        logger.close()
    assert sum("wandb" in str(w.message) for w in caught) == 1
    assert len(read_metrics(tmp_path)) == 2


def test_progress_without_tty_prints_compact_lines(capsys):
    progress = Progress(total_steps=10, initial_step=2, print_every=2)
    for step in range(3, 11):
        progress.update(step, {"raw_reward_mean": torch.tensor(0.25), "kl_divergence": 0.0012, "step_time_s": 0.5})
    progress.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # steps 4, 6, 8, 10
    assert lines[0].startswith("[gspo] step 4/10 | reward 0.250 | kl 1.20e-03 | 0.50s/step | eta")
    assert lines[-1].startswith("[gspo] step 10/10") and "eta 0s" in lines[-1]


def test_progress_missing_metrics_and_disabled(capsys):
    Progress(total_steps=3, enabled=False).update(1, {"raw_reward_mean": 1.0})
    assert capsys.readouterr().out == ""
    p = Progress(total_steps=3)
    p.update(1, {})
    p.close()
    assert "reward - | kl - | -/step" in capsys.readouterr().out


def test_progress_with_tty_uses_rich_bar(monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    progress = Progress(total_steps=4)
    assert progress._bar is not None
    for step in range(1, 5):
        progress.update(step, {"raw_reward_mean": 1.0, "kl_divergence": 0.1, "step_time_s": 0.1})
    progress.close()
    assert progress._bar is None


def _row(group, user, completion, reward, **rewards):
    return {"group": group, "last_user": user, "completion": completion, "reward": reward, **rewards}


def test_print_samples_truncates_and_shows_markup_literally(capsys):
    long = "x" * 1000
    print_samples(7, [_row(0, "What is [bold]2+2?", "[/] 4", 1.0), _row(1, long, long, 0.0)], max_chars=160)
    out = capsys.readouterr().out
    assert "Samples at step 7" in out and "[bold]" in out and "[/]" in out
    assert 300 < out.count("x") < 400  # both long cells cut to 159 characters and an ellipsis


def test_print_samples_one_row_per_prompt_with_each_reward(capsys):
    rows = [
        _row(0, "first question", "alpha", 1.5, **{"reward/acc": 1.0, "reward/fmt": 0.5}),
        _row(0, "first question", "beta", 0.0, **{"reward/acc": 0.0, "reward/fmt": 0.0}),
        _row(1, "second question", "gamma", 0.5, **{"reward/acc": 0.0, "reward/fmt": 0.5}),
    ]
    print_samples(2, rows, max_rows=4)
    out = capsys.readouterr().out
    assert "alpha" in out and "gamma" in out and "beta" not in out  # the group's first completion only
    assert out.count("first question") == 1
    assert "acc 1.000" in out and "fmt 0.500" in out and "total 1.500" in out


def test_ema_smooths_and_starts_unbiased():
    values = [1.0] * 5 + [0.0] * 5
    smoothed = ema(values)
    assert smoothed[0] == pytest.approx(1.0)  # bias-corrected: no drag towards 0 at the start
    assert all(0.0 <= v <= 1.0 for v in smoothed)


def _synthetic_run(path, steps=120, with_eval=True):
    rows = []
    for s in range(1, steps + 1):
        row = {
            "step": s,
            "raw_reward_mean": 1 - math.exp(-s / 40) + 0.1 * math.sin(s),
            "raw_reward_std": 0.2,
            "kl_divergence": 1e-3 * s,
            "kl_coef": 0.2 * (1 + s / 400),
            "clip_fraction_seq": 0.1 + 0.05 * math.cos(s),
            "clip_fraction_token": 0.05,
            "completion_length_mean": 30 + s / 10,
            "truncated_fraction": max(0.0, 0.3 - s / 400),
            "entropy": 2.0 - s / 100,
            "policy_loss": 0.01 * math.sin(s / 3),
        }
        if s == 50:
            row["policy_loss"] = None  # a skipped (non-finite) update
        rows.append(row)
        if with_eval and s % 20 == 0:
            rows.append({"step": s, "eval/accuracy": min(1.0, s / 120), "eval/reward_mean": s / 120})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_run_writes_png(tmp_path):
    _synthetic_run(tmp_path / "metrics.jsonl")
    out = plot_run(tmp_path)
    assert out == tmp_path / "training_curves.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_run_subset_of_keys_and_explicit_output(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "policy_loss": 1.0 / s}) + "\n" for s in range(1, 4))
    )
    out = plot_run(tmp_path / "metrics.jsonl", tmp_path / "plots" / "curves.png")
    assert out.is_file() and out.stat().st_size > 0


def test_the_critic_panel_appears_only_with_a_critic(tmp_path):
    from gspo.plotting import panel_titles

    plain = [{"step": s, "raw_reward_mean": 0.1 * s, "policy_loss": 1.0} for s in range(1, 4)]
    assert panel_titles(plain) == ["Reward", "Policy loss"]
    critic = [dict(r, value_loss=1.0 / r["step"], explained_variance=0.1 * r["step"]) for r in plain]
    assert panel_titles(critic) == ["Reward", "Policy loss", "Critic"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in critic))
    assert plot_run(tmp_path).stat().st_size > 0


def test_plot_run_without_known_metrics_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "unrelated": 1.0}) + "\n")
    with pytest.raises(ValueError, match="none of the plotted metrics"):
        plot_run(tmp_path)


@pytest.mark.parametrize("plot_curves", [True, False])
def test_run_summary_draws_the_curves_only_when_configured(tmp_path, plot_curves):
    from gspo.config import GSPOConfig
    from gspo.tracking import write_run_summary

    _synthetic_run(tmp_path / "metrics.jsonl")
    cfg = GSPOConfig(output_dir=str(tmp_path), plot_curves=plot_curves)
    write_run_summary(cfg, steps=3, history=[{"step": 3, "policy_loss": 0.5}])
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_metrics"] == {"step": 3, "policy_loss": 0.5}
    assert (tmp_path / "training_curves.png").is_file() is plot_curves
