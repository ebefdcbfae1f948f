"""metrics.jsonl and train_summary.json are strict JSON that say which values were non-finite, and a damaged
metrics.jsonl is reported (a torn last line: a warning; a bad line elsewhere: an error) instead of skipped."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from gspo.metrics_file import read_metrics
from gspo.tracking import MetricsLogger, write_run_summary


def _strict(text: str):
    """json.loads that refuses NaN / Infinity / -Infinity, as jq and browsers do."""

    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def _write(path, text: str) -> None:
    path.write_bytes(text.encode())


# ------------------------------------------------------------------ writing metrics.jsonl
def test_log_flags_non_finite_keys_only_when_there_are_some(tmp_path):
    logger = MetricsLogger(str(tmp_path), ["jsonl"])
    logger.log(1, {"raw_reward_mean": 0.5, "policy_loss": None})  # None is "not logged", not non-finite
    logger.log(2, {"raw_reward_mean": float("-inf"), "kl": 0.25, "policy_loss": torch.tensor(float("nan"))})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [_strict(line) for line in lines] == [
        {"step": 1, "raw_reward_mean": 0.5, "policy_loss": None},
        {
            "step": 2,
            "raw_reward_mean": None,
            "kl": 0.25,
            "policy_loss": None,
            "non_finite": ["raw_reward_mean", "policy_loss"],
        },
    ]


def test_log_writes_the_whole_line_in_one_write(tmp_path):
    logger = MetricsLogger(str(tmp_path), ["jsonl"])
    writes = []
    real_write = logger._fh.write
    logger._fh.write = lambda text: writes.append(text) or real_write(text)
    logger.log(7, {"a": 1.0, "b": float("nan")})
    logger.close()
    assert writes == ['{"step": 7, "a": 1.0, "b": null, "non_finite": ["b"]}\n']


# ------------------------------------------------------------------ reading metrics.jsonl
def test_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, '{"step": 1}\n\n{"step": 2}\n{"step": 3, "x"')  # line 4: killed mid-write, no newline
    with pytest.warns(RuntimeWarning) as caught:
        rows = read_metrics(path)
    assert rows == [{"step": 1}, {"step": 2}]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message and "line 4, the last, is cut off" in message and "dropped" in message


@pytest.mark.parametrize(
    "text, line",
    [
        ('{"step": 1}\n{"step": 2}{"step": 3}\n{"step": 4}\n', 2),  # two rows glued on one line
        ('{"step": 1}\n{"step": 2, "x"\n{"step": 3}\n', 2),  # a torn line in the middle
        ('{"step": 1}\n{"step": 2}\n{"step": 3, "x"\n', 3),  # the last line, but it has its newline
        ('{"step": 1}\n{"step": \xff}\n', 2),  # not UTF-8
    ],
)
def test_bad_line_not_at_the_torn_end_raises(tmp_path, text, line):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(text.encode("latin-1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning instead of the error
        with pytest.raises(ValueError) as e:
            read_metrics(tmp_path)
    assert str(e.value).startswith(f"{path}: line {line} is not one valid JSON row")


def test_valid_file_reads_without_warnings(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, '{"step": 1, "a": null, "non_finite": ["a"]}\n{"step": 2, "a": 2.0}')  # last line whole, no "\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_metrics(path) == [{"step": 1, "a": None, "non_finite": ["a"]}, {"step": 2, "a": 2.0}]


# ------------------------------------------------------------------ resume
def test_truncate_after_warns_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, '{"step": 1, "a": 1.0}\n{"step": 2, "a": null, "non_finite": ["a"]}\n{"step": 3, "a')
    logger = MetricsLogger(str(tmp_path), ["jsonl"], resume=True)
    with pytest.warns(RuntimeWarning, match="line 3, the last, is cut off"):
        logger.truncate_after(5)
    logger.log(3, {"a": 3.0})
    logger.close()
    assert path.read_text() == (
        '{"step": 1, "a": 1.0}\n{"step": 2, "a": null, "non_finite": ["a"]}\n{"step": 3, "a": 3.0}\n'
    )


def test_truncate_after_refuses_a_damaged_file_and_leaves_it_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    damaged = '{"step": 1}{"step": 2}\n{"step": 3}\n'
    _write(path, damaged)
    logger = MetricsLogger(str(tmp_path), ["jsonl"], resume=True)
    with pytest.raises(ValueError, match="line 1 is not one valid JSON row"):
        logger.truncate_after(2)
    logger.close()
    assert path.read_text() == damaged


# ------------------------------------------------------------------ plotting ignores the flag
def test_plot_ignores_the_non_finite_list(tmp_path):
    from gspo.plotting import panel_titles, plot_run

    logger = MetricsLogger(str(tmp_path), ["jsonl"])
    for step in range(1, 6):
        logger.log(step, {"raw_reward_mean": float("nan") if step == 3 else step / 10, "entropy": 1.0})
    logger.close()
    rows = read_metrics(tmp_path)
    assert rows[2] == {"step": 3, "raw_reward_mean": None, "entropy": 1.0, "non_finite": ["raw_reward_mean"]}
    without_flag = [{k: v for k, v in r.items() if k != "non_finite"} for r in rows]
    assert panel_titles(rows) == panel_titles(without_flag)
    assert plot_run(tmp_path).is_file()


# ------------------------------------------------------------------ train_summary.json
def _config(tmp_path):
    from gspo.config import GSPOConfig

    return GSPOConfig(output_dir=str(tmp_path), plot_curves=False)


def test_run_summary_is_strict_json_with_the_non_finite_keys(tmp_path):
    final = {"step": 3, "raw_reward_mean": float("inf"), "policy_loss": float("nan"), "kl": 0.5, "x": float("-inf")}
    history = [{"step": 2, "kl": 0.1}, final]
    write_run_summary(_config(tmp_path), steps=3, history=history)
    text = (tmp_path / "train_summary.json").read_text()
    summary = _strict(text)
    assert summary["final_metrics"] == {"step": 3, "raw_reward_mean": None, "policy_loss": None, "kl": 0.5, "x": None}
    assert summary["non_finite"] == ["raw_reward_mean", "policy_loss", "x"]
    assert summary["steps"] == 3
    assert history[-1]["raw_reward_mean"] == float("inf")  # the trainer's history is left as it was
    assert not list(tmp_path.glob(".train_summary.json.tmp-*"))


def test_run_summary_of_finite_metrics_lists_none(tmp_path):
    write_run_summary(_config(tmp_path), steps=1, history=[{"step": 1, "kl": 0.5, "note": "ok"}])
    summary = _strict((tmp_path / "train_summary.json").read_text())
    assert summary["final_metrics"] == {"step": 1, "kl": 0.5, "note": "ok"}
    assert summary["non_finite"] == []
    write_run_summary(_config(tmp_path), steps=0, history=[])
    assert _strict((tmp_path / "train_summary.json").read_text())["final_metrics"] == {}
