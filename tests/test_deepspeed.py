"""DeepSpeed ZeRO-2 / ZeRO-3 on CPU (gloo), 2 processes, against 1 process on the same global batch.

The launches use the example configs themselves (`accelerate launch --config_file
examples/accelerate/deepspeed_zero{2,3}.yaml --num_processes 2`), with the worker and deterministic
rollouts of tests/test_distributed.py (see its docstring for why rollouts are made world-size
independent). What is compared: final parameters (2-process vs 1-process), per-step metrics, resume
from DeepSpeed's own checkpoint files, a non-finite loss skipped on every rank, LoRA, and a run
with real sampling, evaluation and export under ZeRO-3's partitioned weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")

from helpers_data import save_tiny_reward_model  # noqa: E402
from test_distributed import (  # noqa: E402
    HERE,
    METRIC_ATOL,
    PARAM_ATOL,
    STEPS,
    WORKER,
    _env,
    _finish,
    _free_port,
    accelerate_launch,
)

TWINS = {"offpolicy": "seq_offpolicy", "token": "token_mean", "nan": "nan", "lora": "lora", "gae": "gae"}
EXTRA = ["resume", "sampled", "gae_resume"]
STAGES = ("zero2", "zero3")


def _launch(stage: str, model_dir: Path, out: Path, scenarios: list, reward_model: str = "") -> subprocess.Popen:
    port = _free_port()
    config = HERE.parent / "examples" / "accelerate" / f"deepspeed_{stage}.yaml"
    cmd = accelerate_launch(config, port, WORKER, "--model_dir", str(model_dir), "--out", str(out))
    cmd += ["--scenarios", ",".join(scenarios), "--reward_model", reward_model]
    return subprocess.Popen(cmd, env=_env(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    model_dir = root / "model"
    subprocess.run(
        [sys.executable, WORKER, "--build_model", "--model_dir", str(model_dir)],
        check=True,
        env=_env(0),
        capture_output=True,
        timeout=300,
    )
    reward_model = save_tiny_reward_model(root / "rm")
    one = subprocess.Popen(
        [
            sys.executable,
            WORKER,
            "--model_dir",
            str(model_dir),
            "--out",
            str(root / "one"),
            "--scenarios",
            ",".join(list(TWINS.values()) + ["rm"]),
            "--reward_model",
            reward_model,
        ],
        env=_env(0),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    results = []
    for stage in STAGES:  # one 2-process launch at a time: two cores
        scenarios = [f"{stage}_{s}" for s in list(TWINS) + EXTRA] + (
            ["zero3_rm", "zero3_episodes"] if stage == "zero3" else []
        )
        results.append(_finish(_launch(stage, model_dir, root / "two", scenarios, reward_model), 900))
    results.append(_finish(one, 600))
    for rc, out in results:
        assert rc == 0, out[-6000:]
    return {"one": root / "one", "two": root / "two", "model_dir": model_dir, "root": root}


def _rank(run_dir: Path, scenario: str, rank: int) -> dict:
    return json.loads((run_dir / scenario / f"rank{rank}.json").read_text())


def _params(run_dir: Path, scenario: str, rank: int) -> dict:
    return torch.load(run_dir / scenario / f"params_rank{rank}.pt", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    """Over the names both hold; ZeRO-3 lists a tied output head once (as the embedding)."""
    shared = a.keys() & b.keys()
    assert shared and all(("lm_head" in k) for k in (a.keys() ^ b.keys())), a.keys() ^ b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in shared)


@pytest.mark.parametrize("stage", STAGES)
def test_launch_is_deepspeed_and_zero3_partitions(runs, stage):
    for scenario in TWINS:
        infos = [_rank(runs["two"], f"{stage}_{scenario}", r) for r in (0, 1)]
        assert all(i["world"] == 2 and i["distributed_type"].endswith("DEEPSPEED") for i in infos)
        assert all(i["zero_stage"] == int(stage[-1]) for i in infos)
        if stage == "zero3":  # each rank stores about half of every parameter
            assert sum(i["local_numel"] for i in infos) >= infos[0]["full_numel"]
            assert all(i["local_numel"] < 0.55 * i["full_numel"] for i in infos), [i["local_numel"] for i in infos]
        else:  # ZeRO-2 partitions gradients and optimizer state, not the weights
            assert all(i["local_numel"] == i["full_numel"] for i in infos)
    # Under ZeRO-3 the reference model (KL on, no LoRA) is partitioned too.
    assert all(_rank(runs["two"], f"{stage}_offpolicy", r)["ref_sharded"] == (stage == "zero3") for r in (0, 1))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("scenario", ["offpolicy", "token", "nan"])
def test_zero_matches_one_process(runs, stage, scenario):
    """Off-policy GSPO with 2 mini-batches x 2 epochs; token-level with accumulation over 2 micro-batches
    and a linear schedule; a NaN loss at step 2 on rank 0: the same weights and metrics as 1 process."""
    name, twin = f"{stage}_{scenario}", TWINS[scenario]
    one, init = _params(runs["one"], twin, 0), _initial(runs["model_dir"])
    p0, p1 = _params(runs["two"], name, 0), _params(runs["two"], name, 1)
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)  # ranks agree bitwise
    diff = _max_diff(one, p0)
    print(f"{name}: max |2-proc - 1-proc| {diff:.3e}")
    assert _max_diff(one, init) > 1e-3 and diff < PARAM_ATOL
    h1, h2 = _rank(runs["one"], twin, 0)["history"], _rank(runs["two"], name, 0)["history"]
    assert [m["step"] for m in h2] == list(range(1, STEPS + 1))
    skipped_at = {
        m["step"] for i, m in enumerate(h1) if m["skipped_updates"] > (h1[i - 1]["skipped_updates"] if i else 0)
    }
    for a, b in zip(h1, h2):
        for k in (
            "loss",
            "kl_divergence",
            "grad_norm",
            "clip_fraction_seq",
            "kl_coef",
            "learning_rate",
            "skipped_updates",
            "entropy",
        ):
            if k == "grad_norm" and a["step"] in skipped_at:
                continue  # 1 process reports the (finite) norm it refused; DeepSpeed saw the poisoned one
            assert b[k] == pytest.approx(a[k], abs=METRIC_ATOL, nan_ok=True), (a["step"], k)
    if scenario == "token":  # the schedule really moved the learning rate
        assert len({m["learning_rate"] for m in h2}) == STEPS


@pytest.mark.parametrize("stage", STAGES)
def test_non_finite_loss_skips_the_update_on_every_rank(runs, stage):
    """Rank 0's loss and gradient are NaN at step 2 (rank 1's are finite): the reduced gradient is NaN
    and the engine skips the step on every rank."""
    for rank in (0, 1):
        skipped = [m["skipped_updates"] for m in _rank(runs["two"], f"{stage}_nan", rank)["history"]]
        assert skipped == [0.0, 1.0, 1.0]
    assert [m["skipped_updates"] for m in _rank(runs["one"], "nan", 0)["history"]] == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("stage", STAGES)
def test_zero_resume_is_bit_identical_and_checkpoint_is_complete(runs, stage):
    straight, resumed = _params(runs["two"], f"{stage}_offpolicy", 0), _params(runs["two"], f"{stage}_resume", 0)
    assert all(_rank(runs["two"], f"{stage}_resume", r)["start_step"] == 2 for r in (0, 1))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    out = runs["two"] / f"{stage}_resume"
    ckpt = out / "checkpoint-2"
    assert (ckpt / "complete").is_file() and (ckpt / "model.safetensors").is_file()
    assert (ckpt / "deepspeed" / "state").is_dir() and not (ckpt / "optimizer.pt").exists()
    assert not list(out.glob(".tmp-*"))  # the staging dir was renamed, nothing left behind
    # Its full weights load like any checkpoint's.
    from safetensors.torch import load_file

    assert set(load_file(str(ckpt / "model.safetensors"))) >= {k for k in straight if "lm_head" not in k}


def test_deepspeed_checkpoint_without_deepspeed_says_so(runs):
    from transformers import AutoModelForCausalLM

    from gspo.checkpoint import load_checkpoint

    ckpt = runs["two"] / "zero3_resume" / "checkpoint-2"
    model = AutoModelForCausalLM.from_pretrained(str(ckpt))  # the weights alone are usable
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(FileNotFoundError, match="DeepSpeed run"):
        load_checkpoint(ckpt, model, optimizer)


@pytest.mark.parametrize("stage", STAGES)
def test_zero_lora_merged_export_matches_one_process(runs, stage):
    from safetensors.torch import load_file

    one = load_file(str(runs["one"] / "lora" / "model.safetensors"))
    two = load_file(str(runs["two"] / f"{stage}_lora" / "model.safetensors"))
    assert one.keys() == two.keys()  # merged: plain model weights
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"{stage}_lora: max |merged export 2-proc - 1-proc| {diff:.3e}")
    assert diff < PARAM_ATOL


@pytest.mark.parametrize("stage", STAGES)
def test_zero_sampled_run_generates_evaluates_and_exports_whole_weights(runs, stage):
    """Real sampling and uneven greedy evaluation (rank 0: 2 batches, rank 1: 1) on partitioned weights,
    then the export: every weight, equal to the gathered parameters, loadable with from_pretrained."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    name = f"{stage}_sampled"
    history = _rank(runs["two"], name, 0)["history"]
    assert len(history) == STEPS and all(m["eval/num_samples"] == 5 for m in history)
    assert all(m["completion_length_mean"] > 0 for m in history)
    params = _params(runs["two"], name, 0)
    exported = load_file(str(runs["two"] / name / "model.safetensors"))
    assert {k for k in params if "lm_head" not in k} <= exported.keys()
    for k in exported.keys() & params.keys():
        assert torch.equal(exported[k], params[k]), k
    model = AutoModelForCausalLM.from_pretrained(str(runs["two"] / name))
    for k, v in model.state_dict().items():
        if k in params:
            assert torch.equal(v, params[k]), k


def test_zero3_reward_model_is_whole_and_scores_like_one_process(runs):
    """A reward model loaded after the ZeRO-3 launch (transformers would build it partitioned): whole on
    every rank, so rewards, hence the trained weights, are the 1-process run's."""
    h1, h2 = _rank(runs["one"], "rm", 0)["history"], _rank(runs["two"], "zero3_rm", 0)["history"]
    assert [m["raw_reward_mean"] for m in h2] == pytest.approx([m["raw_reward_mean"] for m in h1], abs=1e-6)
    assert len({round(m["raw_reward_mean"], 6) for m in h1}) > 1  # the rewards are not constant
    assert _max_diff(_params(runs["one"], "rm", 0), _params(runs["two"], "zero3_rm", 0)) < PARAM_ATOL


def test_zero3_ranks_whose_episodes_take_different_turns_finish_together(runs):
    """Multi-turn episodes under ZeRO-3 with real generation: rank 0's episodes end after 1 model turn, rank 1's
    after 3 (tests/dist_worker.py UnevenEnv); both ranks finished every step and hold the same weights."""
    r0, r1 = _rank(runs["two"], "zero3_episodes", 0), _rank(runs["two"], "zero3_episodes", 1)
    assert r0["local_turns"] == [1] * 24 and r1["local_turns"] == [3] * 24  # 8 episodes per rank and step, 3 steps
    assert [m["step"] for m in r0["history"]] == [1, 2, 3] and r0["zero_stage"] == 3
    assert all(m["episode/turns_max"] == 3 and m["episode/turns_mean"] == 2 for m in r0["history"])
    assert _max_diff(_params(runs["two"], "zero3_episodes", 0), _params(runs["two"], "zero3_episodes", 1)) == 0


def test_error_on_one_rank_stops_a_zero3_run(runs):
    start = time.monotonic()
    rc, out = _finish(_launch("zero3", runs["model_dir"], runs["root"] / "fail", ["zero3_fail_rank1"]), 300)
    assert rc != 0 and "deliberate failure on rank 1" in out, out[-4000:]
    assert time.monotonic() - start < 240


def _initial(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# ---------------------------------------------------------------------------- config, no launch
def _fake_accelerator(ds: dict, world: int = 2):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config=ds)
    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        num_processes=world,
        is_main_process=True,
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )


def _config(**kw):
    from gspo.config import GSPOConfig

    base = dict(
        policy_model_name="m",
        reward_funcs=["exact_answer"],
        batch_size=8,
        group_size=4,
        num_mini_batches=2,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
    )
    return GSPOConfig(**{**base, **kw})


def test_configure_fills_geometry_and_clipping():
    from gspo.backends import deepspeed as ds_backend

    ds = {"zero_optimization": {"stage": 3}, "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto"}
    ds_backend.configure(_fake_accelerator(ds), _config())
    # per rank: 8 prompts / 2 ranks x 4 completions = 16 rows, in 2 mini-batches x 2 micro-batches -> 4 rows
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 4 * 2 * 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(
    "ds, message",
    [
        ({"zero_optimization": {"stage": 0}}, "stage=0: allowed 1, 2 or 3"),
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16 is not supported"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, "'optimizer' section"),
        (
            {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0},
            r"gradient_clipping=1.0 but GSPOConfig.max_grad_norm=0.5",
        ),
    ],
)
def test_configure_refuses_what_gspo_cannot_honour(ds, message):
    from gspo.backends import deepspeed as ds_backend
    from gspo.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        ds_backend.configure(_fake_accelerator(ds), _config())


def test_resuming_a_checkpoint_without_deepspeed_state_under_deepspeed_says_so(tmp_path):
    from gspo.backends import deepspeed as ds_backend
    from gspo.config import ConfigError

    with pytest.raises(ConfigError, match="not written by a DeepSpeed run"):
        ds_backend.load_engine_state(None, tmp_path)


@pytest.mark.parametrize("stage", STAGES)
def test_zero_critic_matches_one_process_and_resumes_exactly(runs, stage):
    """PPO / VAPO under ZeRO-2/3: the critic is a second DeepSpeed engine; its metrics equal the 1-process run's,
    and resuming from DeepSpeed's engine files (policy and critic/) ends where the uninterrupted run ends."""
    h1, h2 = _rank(runs["one"], "gae", 0)["history"], _rank(runs["two"], f"{stage}_gae", 0)["history"]
    for a, b in zip(h1, h2):
        for k in ("value_loss", "value_mean", "explained_variance", "advantages_std", "positive_nll"):
            assert b[k] == pytest.approx(a[k], abs=METRIC_ATOL, rel=1e-4), (stage, a["step"], k)
    straight, resumed = _params(runs["two"], f"{stage}_gae", 0), _params(runs["two"], f"{stage}_gae_resume", 0)
    assert _max_diff(straight, resumed) < 1e-6
    assert (runs["two"] / f"{stage}_gae_resume" / "checkpoint-2" / "critic" / "deepspeed").is_dir()
