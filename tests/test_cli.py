"""The `gspo` command: help text, flag parsing, precedence, errors, the generated docs,
and an end-to-end `gspo train` / `gspo eval` on a tiny model in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gspo.cli import main
from gspo.yaml_config import config_fields

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """main(argv) in-process -> (exit code, stdout, stderr); argparse's SystemExit counts."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def flat(text: str) -> str:
    """Whitespace-normalised text: help output is wrapped at the terminal width."""
    return " ".join(text.split())


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")


# ------------------------------------------------------------------ help
@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["config", "--help"], ["eval", "--help"]])
def test_help_lists_every_field_with_its_help(argv, capsys):
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    text = flat(out)
    for name, f in config_fields().items():
        assert name in text, name
        assert flat(f.metadata["help"]) in text, name


def test_train_help_shows_choices_and_defaults(capsys):
    _, out, _ = run_cli(["train", "--help"], capsys)
    text = flat(out)
    assert "--group_size INT" in text
    assert "Choices: sequence, sequence_token, token." in text
    assert "Default: 4." in text  # group_size
    assert "Choices: none, seq-mean-token-mean" in text  # loss_aggregation accepts None


def test_top_level_help_lists_subcommands(capsys):
    _, out, _ = run_cli(["--help"], capsys)
    for cmd in ("train", "eval", "demo", "plot", "config"):
        assert cmd in out


def test_no_command_is_an_error(capsys):
    code, _, err = run_cli([], capsys)
    assert code == 2 and "COMMAND" in err


# ------------------------------------------------------------------ flag errors
def test_bad_flag_value_names_the_field(capsys):
    code, _, err = run_cli(["train", "--group_size", "four"], capsys)
    assert code == 2
    assert "--group_size" in err and "'four'" in err and "integer" in err


def test_bad_bool_flag(capsys):
    code, _, err = run_cli(["config", "--adaptive_kl", "maybe"], capsys)
    assert code == 2 and "adaptive_kl" in err


def test_unknown_flag(capsys):
    code, _, err = run_cli(["train", "--grop_size", "4"], capsys)
    assert code == 2 and "--grop_size" in err


def test_abbreviated_flag_is_not_accepted(capsys):
    code, _, _ = run_cli(["config", "--group", "8"], capsys)
    assert code == 2


def test_invalid_value_is_one_line_error_exit_2(capsys):
    code, _, err = run_cli(["config", "--group_size", "1"], capsys)
    assert code == 2
    assert err.startswith("gspo: error: ") and "group_size" in err and "Traceback" not in err


def test_contradictory_values_error(capsys):
    code, _, err = run_cli(["config", "--advantage_type", "normalized", "--use_group_normalization", "false"], capsys)
    assert code == 2 and "use_group_normalization" in err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(["config", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "does not exist" in err


def test_unknown_yaml_key_via_cli(capsys, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("clip_rnage: 0.2\n")
    code, _, err = run_cli(["config", "--config", str(path)], capsys)
    assert code == 2 and "'clip_rnage'" in err and "clip_range" in err


# ------------------------------------------------------------------ gspo config
def test_config_flag_overrides_yaml(capsys, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("group_size: 6\nkl_coef: 0.1\n")
    code, out, _ = run_cli(["config", "--config", str(path), "--group_size", "8"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert "group_size: 8" in lines and "kl_coef: 0.1" in lines


def test_config_parses_every_kind_of_flag(capsys):
    import yaml

    code, out, _ = run_cli(
        [
            "config",
            "--clip_range",
            "3e-4",
            "--reward_funcs",
            "exact_answer,length_penalty",
            "--reward_weights",
            "[1, 0.1]",
            "--adaptive_kl",
            "no",
            "--save_total_limit",
            "none",
            "--report_to",
            "jsonl,tensorboard",
        ],
        capsys,
    )
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["clip_range"] == 3e-4 and cfg["adaptive_kl"] is False and cfg["save_total_limit"] is None
    assert cfg["reward_funcs"] == ["exact_answer", "length_penalty"] and cfg["reward_weights"] == [1.0, 0.1]
    assert cfg["report_to"] == ["jsonl", "tensorboard"]


def test_config_of_each_example(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        code, out, err = run_cli(["config", "--config", str(path.relative_to(ROOT))], capsys)
        assert code == 0, (path.name, err)


def test_python_dash_m_gspo():
    proc = subprocess.run(
        [sys.executable, "-m", "gspo", "config", "--group_size", "8"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "group_size: 8" in proc.stdout.splitlines()


# ------------------------------------------------------------------ other commands (wiring only)
def test_demo_calls_run_demo(monkeypatch, capsys):
    demo = pytest.importorskip("gspo.demo")
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(kw) or {})
    code, _, _ = run_cli(["demo", "--output_dir", "somewhere", "--max_steps", "3"], capsys)
    assert code == 0 and calls == [
        {"output_dir": "somewhere", "max_steps": 3, "task": "arithmetic", "rollout_engine": "hf"}
    ]
    code, _, _ = run_cli(["demo", "--rollout_engine", "vllm"], capsys)
    assert code == 0 and calls[-1] == {
        "output_dir": "outputs/demo",
        "max_steps": None,
        "task": "arithmetic",
        "rollout_engine": "vllm",
    }
    code, _, _ = run_cli(["demo", "--task", "tools"], capsys)
    assert code == 0 and calls[-1] == {
        "output_dir": "outputs/demo-tools",
        "max_steps": None,
        "task": "tools",
        "rollout_engine": "hf",
    }


def test_plot_calls_plot_run(monkeypatch, capsys, tmp_path):
    plotting = pytest.importorskip("gspo.plotting")
    monkeypatch.setattr(plotting, "plot_run", lambda run_dir, out: Path(out or Path(run_dir) / "p.png"))
    code, out, _ = run_cli(["plot", str(tmp_path)], capsys)
    assert code == 0 and out.strip() == str(tmp_path / "p.png")


def test_plot_missing_dir(capsys, tmp_path):
    code, _, err = run_cli(["plot", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err


def test_eval_needs_a_dataset(capsys):
    code, _, err = run_cli(["eval", "--reward_funcs", "exact_answer"], capsys)
    assert code == 2 and "--dataset" in err


def test_eval_config_takes_the_model_and_sample_count():
    from gspo.cli import build_parser, eval_config

    args = build_parser().parse_args(
        [
            "eval",
            "--model",
            "builtin:tiny-arithmetic",
            "--max_samples",
            "7",
            "--reward_funcs",
            "exact_answer",
            "--kl_coef",
            "0.5",
        ]
    )
    cfg = eval_config(args)  # gspo eval builds no trainer: kl_coef is irrelevant to it (no reference model)
    assert cfg.eval_max_samples == 7 and cfg.policy_model_name == "builtin:tiny-arithmetic"
    assert cfg.reward_funcs == ["exact_answer"]


# ------------------------------------------------------------------ docs/config_reference.md
def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts/gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date():
    generated = _load_generator().render()
    committed = (ROOT / "docs/config_reference.md").read_text()
    assert committed == generated, "docs/config_reference.md is stale: run python scripts/gen_config_reference.py"


def test_config_reference_has_a_row_per_field():
    text = _load_generator().render()
    for name in config_fields():
        assert f"| `{name}` |" in text


# ------------------------------------------------------------------ end to end (subprocess)
def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_pipeline = pytest.mark.skipif(
    not all(_have(m) for m in ("gspo.data", "gspo.rewards", "gspo.tasks.tiny_model")),
    reason="needs gspo.data, gspo.rewards and gspo.tasks.tiny_model",
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from gspo.tasks.tiny_model import ensure_tiny_model

    return Path(ensure_tiny_model(cache_dir=tmp_path_factory.mktemp("tiny_model"), sft_steps=5, verbose=False))


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _gspo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "gspo", *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


@pytest.mark.slow
@needs_pipeline
def test_train_and_eval_end_to_end(tiny_model_dir, prompts_file, tmp_path):
    out_dir = tmp_path / "run"
    proc = _gspo(
        "train",
        "--policy_model_name",
        str(tiny_model_dir),
        "--dataset_path",
        str(prompts_file),
        "--reward_funcs",
        "exact_answer",
        "--batch_size",
        "2",
        "--group_size",
        "2",
        "--max_steps",
        "2",
        "--max_new_tokens",
        "4",
        "--gspo_epochs",
        "1",
        "--output_dir",
        str(out_dir),
        "--progress_bar",
        "false",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert [json.loads(line)["step"] for line in lines] == [1, 2]

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out_dir)  # the final model loads

    metrics_path = tmp_path / "eval.json"
    proc = _gspo(
        "eval",
        "--model",
        str(out_dir),
        "--dataset",
        str(prompts_file),
        "--reward_funcs",
        "exact_answer",
        "--max_new_tokens",
        "4",
        "--max_samples",
        "3",
        "--out",
        str(metrics_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads(metrics_path.read_text())
    assert json.loads(proc.stdout) == metrics
    from gspo.config import GSPOConfig
    from gspo.model_eval import evaluate_model  # tests/test_evaluate.py checks it against a plain decode loop

    cfg = GSPOConfig(
        policy_model_name=str(out_dir), reward_funcs=["exact_answer"], max_new_tokens=4, eval_max_samples=3
    )
    again = evaluate_model(cfg, str(prompts_file))
    assert metrics.pop("time/eval_s") > 0 and again.pop("time/eval_s") > 0  # wall time: the only difference
    assert metrics == again and metrics["eval/num_samples"] == 3.0
    records = pq.read_table(metrics_path.with_name(metrics_path.stem + ".completions.parquet")).to_pylist()
    assert len(records) == 3 and [r["reward"] for r in records] == [r["reward/exact_answer"] for r in records]
    assert sum(r["reward"] for r in records) / 3 == pytest.approx(metrics["eval/accuracy"])


@needs_pipeline
@pytest.mark.parametrize("case", ["data", "reward"])
def test_train_user_error_is_one_line(case, tiny_model_dir, prompts_file, tmp_path, capsys):
    """DataError / RewardError raised inside the trainer: one line, status 2, no traceback."""
    dataset, reward = str(prompts_file), "exact_answer"
    if case == "data":
        dataset = str(tmp_path / "bad.jsonl")
        Path(dataset).write_text('{"question": "1+1="}\n')  # no "prompt" column
    else:
        reward = str(tmp_path / "missing_reward.py") + ":score"
    code, _, err = run_cli(
        [
            "train",
            "--policy_model_name",
            str(tiny_model_dir),
            "--dataset_path",
            dataset,
            "--reward_funcs",
            reward,
            "--batch_size",
            "2",
            "--group_size",
            "2",
            "--max_steps",
            "1",
            "--output_dir",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("gspo: error:") and "Traceback" not in err
    assert ("prompt" if case == "data" else "missing_reward.py") in err


def test_train_without_dataset_fails_before_loading_a_model(capsys):
    code, _, err = run_cli(["train", "--reward_funcs", "exact_answer"], capsys)
    assert code == 2 and "--dataset_path" in err


def test_train_without_reward_fails_before_loading_a_model(capsys):
    code, _, err = run_cli(["train", "--dataset_path", "builtin:arithmetic"], capsys)
    assert code == 2 and "--reward_funcs" in err


@pytest.mark.parametrize(
    "flag, ours",
    [
        ("--max_completion_length", "max_new_tokens"),  # by spelling alone it would be max_prompt_length
        ("--num_generations", "group_size"),
        ("--beta", "kl_coef"),
    ],
)
def test_trl_option_names_are_told_their_gspo_names(flag, ours, capsys, tmp_path):
    code, _, err = run_cli(["train", flag, "4"], capsys)
    assert code == 2 and f"TRL's '{flag[2:]}' is {ours} in gspo" in flat(err)
    (tmp_path / "c.yaml").write_text(f"{flag[2:]}: 4\n")
    code, _, err = run_cli(["config", "--config", str(tmp_path / "c.yaml")], capsys)
    assert code == 2 and f"TRL's '{flag[2:]}' is {ours} in gspo" in flat(err)


def test_a_misspelt_flag_is_told_the_field(capsys):
    code, _, err = run_cli(["train", "--group_sise", "4"], capsys)
    assert code == 2 and "did you mean 'group_size'?" in err
