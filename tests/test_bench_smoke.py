"""Every benchmark script that README.md or docs/benchmarks.md cites runs, at its smallest size.

Benchmarks are not in the suite, so an API change breaks them unseen until someone re-measures. Here each
cited script runs once as a subprocess, with the test's interpreter (the project venv), at its smallest
size (`--smoke` where the script has it: a few-step tiny model, one or two steps), writing only to a
temporary directory, and must exit 0. No figure is checked: smoke runs measure nothing.

Scripts that need another environment: bench_engines.py and demo_engines.py's vllm side need vllm (marked
`vllm`: `make test-vllm` runs them in .venv-vllm, where a skip is a failure); bench_trl.py needs TRL in
bench/.venv-trl (`bash bench/setup_trl_venv.sh`); gpu_generation.py needs CUDA. setup_trl_venv.sh itself
installs packages from the network and is not run. `test_every_cited_script_has_a_smoke_run` fails when the
docs cite a script this file does not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import vllm_or_skip

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TRL_PY = BENCH / ".venv-trl" / "bin" / "python"
CITING_DOCS = ("README.md", "docs/benchmarks.md")
NOT_RUN = {"setup_trl_venv.sh": "installs TRL into bench/.venv-trl from the network: a setup step, not a benchmark"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Models built once for the module (bench_common's smoke shapes), outputs, and an empty model cache: a
    script that reached for the recipe's tiny model (minutes to build) would time out, not pass slowly."""
    return tmp_path_factory.mktemp("bench-smoke")


def run(args: list, workdir: Path, env: dict | None = None, timeout: int = 300) -> str:
    """`python args` (or `bash args` for a .sh) from the repository root; asserts exit status 0."""
    cmd = (["bash"] if args[0].endswith(".sh") else [sys.executable]) + [str(a) for a in args]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "GSPO_CACHE_DIR": str(workdir / "empty-cache"),
        **(env or {}),
    }
    p = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (
        f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}"
    )
    return p.stdout


def _tiny_model(workdir: Path) -> Path:
    """The demo's tiny model after bench_common's smoke warm start, where bench_step.py --smoke builds it."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_common import SMOKE_SFT_STEPS
    finally:
        sys.path.remove(str(BENCH))
    from gspo.tasks.tiny_model import ensure_tiny_model

    return ensure_tiny_model(cache_dir=workdir / "tiny-smoke", sft_steps=SMOKE_SFT_STEPS, verbose=False)


# ---------------------------------------------------------------------------------------- the smoke runs
def test_bench_step(workdir):
    run(
        ["bench/bench_step.py", "--only", "tiny", "--steps-tiny", "1", "--smoke"]
        + ["--workdir", workdir, "--out", workdir / "bench_step.json"],
        workdir,
    )


def test_bench_memory(workdir):
    run(["bench/bench_memory.py", "--smoke", "--out", workdir / "bench_memory.json"], workdir)


def test_lever_generation(workdir):
    run(["bench/lever_generation.py", "--reps", "1", "--smoke", "--workdir", workdir], workdir)


def test_lever_label_logprob(workdir):
    run(["bench/lever_label_logprob.py", "--smoke"], workdir)


def test_demo_errors(workdir):
    out = run(["bench/demo_errors.py", _tiny_model(workdir)], workdir)
    assert "correct" in out


def test_demo_seeds(workdir):
    run(["bench/demo_seeds.py", "--pairs", "1234:42", "--smoke", "--out", workdir / "demo_seeds.json"], workdir)


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_demo_engines(workdir, engine):
    if engine == "vllm":
        vllm_or_skip()
    run(
        ["bench/demo_engines.py", "--seeds", "42", "--engines", engine, "--smoke", "--model", _tiny_model(workdir)]
        + ["--out", workdir / f"demo_engines_{engine}.json"],
        workdir,
    )


@pytest.mark.vllm
def test_bench_engines(workdir):
    vllm_or_skip()
    run(
        ["bench/bench_engines.py", "--only", "tiny", "--reps", "1", "--smoke"]
        + ["--workdir", workdir, "--out", workdir / "bench_engines.json"],
        workdir,
    )


@pytest.mark.skipif(not TRL_PY.exists(), reason="needs TRL in bench/.venv-trl: bash bench/setup_trl_venv.sh")
def test_bench_trl(workdir):
    run(
        ["bench/bench_trl.py", "--steps", "1", "--repeats", "1", "--new-tokens", "4", "--smoke"]
        + ["--workdir", workdir, "--out", workdir / "bench_trl.json"],
        workdir,
    )


def test_gpu_sh_dry_run(workdir):
    """bench/gpu.sh's own CPU dry run (DRY_RUN=1: a 2-layer model), one step of 2 x 2, 4 tokens."""
    env = dict(DRY_RUN="1", STEPS="1", PROMPTS="2", GROUP="2", NEW_TOKENS="4", PYTHON=sys.executable)
    run(["bench/gpu.sh"], workdir, env=env)


def test_dynamic_sampling(workdir):
    """The demo with and without dynamic sampling, 2 steps each, on the smoke-built tiny model."""
    run(["bench/dynamic_sampling.py", "--smoke", "--model", _tiny_model(workdir)], workdir, timeout=400)


def test_vapo_short_answers(workdir):
    run(
        ["bench/vapo_short_answers.py", "--smoke", "--workdir", workdir / "vapo", "--results-dir", workdir / "vapo"],
        workdir,
    )


def test_step_ab(workdir):
    """The A/B of two library versions, here HEAD's src/ against the working tree's, one step each."""
    run(["bench/step_ab.py", "--base", "HEAD", "--smoke", "--workdir", workdir / "ab"], workdir)


def test_tool_seeds(workdir):
    """The tool demo from an empty cache: a 2-step warm start, 1 GSPO step."""
    run(["bench/tool_seeds.py", "--pairs", "1234:42", "--smoke", "--out", workdir / "tool_seeds.json"], workdir)


def test_moe_volatility(workdir):
    """The tiny MoE policy, GSPO and GRPO, 2 steps each."""
    run(["bench/moe_volatility.py", "--smoke"], workdir)


def test_completions_record(workdir):
    """The record's cost on the demo: 2 steps on the smoke-built tiny model."""
    run(["bench/completions_record.py", "--smoke", "--model", _tiny_model(workdir)], workdir)


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_episode_step(workdir, engine):
    if engine == "vllm":
        vllm_or_skip()
    run(["bench/episode_step.py", "--smoke", "--engine", engine], workdir)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_generation(workdir):
    run(["bench/gpu_generation.py", "--smoke"], workdir)


# ---------------------------------------------------------------------------------------- the list itself
SMOKE_RUNS = {
    "bench_step.py": test_bench_step,
    "bench_memory.py": test_bench_memory,
    "lever_generation.py": test_lever_generation,
    "lever_label_logprob.py": test_lever_label_logprob,
    "demo_errors.py": test_demo_errors,
    "demo_seeds.py": test_demo_seeds,
    "demo_engines.py": test_demo_engines,
    "bench_engines.py": test_bench_engines,
    "bench_trl.py": test_bench_trl,
    "gpu.sh": test_gpu_sh_dry_run,
    "gpu_generation.py": test_gpu_generation,
    "dynamic_sampling.py": test_dynamic_sampling,
    "vapo_short_answers.py": test_vapo_short_answers,
    "tool_seeds.py": test_tool_seeds,
    "episode_step.py": test_episode_step,
    "step_ab.py": test_step_ab,
    "completions_record.py": test_completions_record,
    "moe_volatility.py": test_moe_volatility,
}


def cited_scripts() -> set:
    """Scripts in bench/ whose file name appears in README.md or docs/benchmarks.md (`bench/x.py`, or `x.py`
    after a `cd bench`); bench_common.py is a module the scripts share, not a script."""
    text = "\n".join((ROOT / doc).read_text(encoding="utf-8") for doc in CITING_DOCS)
    scripts = {p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh")} - {"bench_common.py"}
    return {name for name in scripts if re.search(rf"(?<![\w.]){re.escape(name)}\b", text)}


def test_every_cited_script_has_a_smoke_run():
    cited = cited_scripts()
    assert "bench_step.py" in cited and "gpu.sh" in cited  # the scan reads the docs
    missing = cited - set(SMOKE_RUNS) - set(NOT_RUN)
    assert not missing, f"cited in {CITING_DOCS} but not smoke-run here: {sorted(missing)}"
    assert not (set(SMOKE_RUNS) - {p.name for p in BENCH.iterdir()}), "a smoke run names a script that is gone"
