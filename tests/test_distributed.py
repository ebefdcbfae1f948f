"""Data-parallel GSPO on CPU (gloo): 2 processes must train exactly like 1 on the same global batch.

How the comparison is made honest. A 1-process and a 2-process run cannot share sampled
rollouts: each rank draws from its own RNG stream (seed + rank), so comparing them after
real sampling would test nothing tighter than "both learn". The worker (tests/dist_worker.py)
therefore replaces `gspo.trainer.generate_rollout` with a deterministic stand-in whose
completions depend only on the prompt's token ids and the completion's index in its group
(torch.Generator seeded from a hash of both). Lengths vary (1..4 tokens, EOS-terminated), so the
two ranks hold unequal token counts and the global token normaliser (token-mean, KL, entropy)
is exercised. Everything downstream is the real trainer: rewards, group advantages, reference
and pi_old log-probs, the clipped losses, DDP gradient averaging, clipping, AdamW, the
adaptive KL controller, metric reduction, checkpoint/resume. Greedy decoding would also be
RNG-free, but a tiny random model's greedy completions tend to all have the same length and
identical rewards within a group (zero advantages), which would test far less.

Scenarios (3 steps each, tiny Llama, batch_size 4 x group_size 4, max_new_tokens 4):
  seq_offpolicy  GSPO (sequence level), gspo_epochs=2, num_mini_batches=2: the off-policy path,
                 mini-batches shuffled over the *global* batch
  token_mean     token level, loss_aggregation='token-mean', gradient_accumulation_steps=2
  uneven         2x2 rollout in 4 mini-batches of 1: one rank has an empty share each update
  resume         seq_offpolicy stopped after a step-2 checkpoint, resumed by a fresh trainer
  fail_rank1     a reward function raising on rank 1 only
  fsdp_*         the same with fsdp=True (FSDP2 shards on gloo), resume and cross-resume with and
                 without fsdp, and one run with real sampling + evaluation + export (see dist_worker.py)

The 1-process run is plain `python`; the 2-process equivalence runs use `torchrun`, the failure
run `accelerate launch --multi_gpu` (torchrun workers; on a machine without GPUs the trainer
selects gloo), so both launchers are covered.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "dist_worker.py")
BIN = Path(sys.executable).parent
EQUIV = ["seq_offpolicy", "token_mean", "uneven", "gae"]
FSDP = {
    "fsdp_offpolicy": "seq_offpolicy",
    "fsdp_token": "token_mean",  # 2-process FSDP2 run -> 1-process twin
    "fsdp_gae": "gae",
    "fsdp_ckpt": "seq_offpolicy",
}
BF16 = {"bf16_offpolicy": "bf16_offpolicy", "fsdp_bf16": "bf16_offpolicy"}  # DDP / FSDP2 under bf16 autocast
EPISODES = ["episodes", "fsdp_episodes"]  # multi-turn, rank 0's episodes 1 turn long and rank 1's 3
MOE = ["moe", "fsdp_moe"]  # a tiny Qwen3-MoE, GRPO with Routing Replay, against the 1-process "moe"
FSDP_EXTRA = ["fsdp_resume", "fsdp_sampled", "fsdp_from_plain_ckpt", "fsdp_lora", "fsdp_lora_resume", "fsdp_gae_resume"]
STEPS = 3
PARAM_ATOL = 1e-5  # measured: max |2-proc - 1-proc| ~1e-6 after 3 steps x up to 4 AdamW updates at lr 1e-3
METRIC_ATOL = 1e-5  # measured: <= ~5e-7
LOCAL_TIMINGS = ("step_time_s", "tokens_per_s")  # wall-clock figures: per rank, not reduced


def _env(port: int) -> dict:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MASTER_PORT=str(port),
        PYTHONUNBUFFERED="1",
    )
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def accelerate_launch(config: Path, port: int, worker: str, *args: str) -> list:
    """`accelerate launch --config_file CONFIG` of `worker args` on 2 processes (the example configs' commands)."""
    head = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--num_processes", "2"]
    return head + ["--main_process_port", str(port), worker, *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as timed_out:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"launch timed out after {timeout}s (a hang?):\n{out[-4000:]}") from timed_out
    return proc.returncode, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch the 1-process and the 2-process runs side by side; return their output roots."""
    root = tmp_path_factory.mktemp("dist")
    model_dir = root / "model"
    subprocess.run(
        [sys.executable, WORKER, "--build_model", "--model_dir", str(model_dir)],
        check=True,
        env=_env(0),
        capture_output=True,
        timeout=300,
    )
    one = subprocess.Popen(
        [
            sys.executable,
            WORKER,
            "--model_dir",
            str(model_dir),
            "--out",
            str(root / "one"),
            "--scenarios",
            ",".join(EQUIV + ["lora", "bf16_offpolicy", "moe"]),
        ],
        env=_env(0),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    port = _free_port()
    two = subprocess.Popen(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            WORKER,
            "--model_dir",
            str(model_dir),
            "--out",
            str(root / "two"),
            "--scenarios",
            ",".join(EQUIV + ["resume", "dynamic"] + list(FSDP) + FSDP_EXTRA + list(BF16) + EPISODES + MOE),
        ],
        env=_env(port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rc1, out1 = _finish(one, 600)
    rc2, out2 = _finish(two, 600)
    assert rc1 == 0, out1[-6000:]
    assert rc2 == 0, out2[-6000:]
    # One process resuming from the 2-process FSDP run's step-2 checkpoint (optimizer state by name).
    subprocess.run(
        [
            sys.executable,
            WORKER,
            "--model_dir",
            str(model_dir),
            "--out",
            str(root / "one"),
            "--scenarios",
            "plain_from_ckpt",
            "--resume_from",
            str(root / "two" / "fsdp_resume" / "checkpoint-2"),
        ],
        check=True,
        env=_env(0),
        capture_output=True,
        timeout=300,
    )
    return {"one": root / "one", "two": root / "two", "model_dir": model_dir, "root": root}


def _rank(run_dir: Path, scenario: str, rank: int) -> dict:
    return json.loads((run_dir / scenario / f"rank{rank}.json").read_text())


def _params(run_dir: Path, scenario: str, rank: int) -> dict:
    return torch.load(run_dir / scenario / f"params_rank{rank}.pt", weights_only=True)


def test_two_process_run_is_really_distributed(runs):
    for scenario in EQUIV:
        for rank in (0, 1):
            info = _rank(runs["two"], scenario, rank)
            assert info["world"] == 2 and info["rank"] == rank
            assert info["distributed_type"].endswith("MULTI_CPU")
        assert _rank(runs["one"], scenario, 0)["world"] == 1
    # The ranks see unequal token counts at some step, so the global token normaliser matters.
    t0, t1 = _rank(runs["two"], "token_mean", 0)["local_tokens"], _rank(runs["two"], "token_mean", 1)["local_tokens"]
    assert t0 != t1
    assert [a + b for a, b in zip(t0, t1)] == _rank(runs["one"], "token_mean", 0)["local_tokens"]


@pytest.mark.parametrize("scenario", EQUIV + ["resume", "dynamic"] + list(BF16))
def test_ranks_hold_identical_parameters(runs, scenario):
    p0, p1 = _params(runs["two"], scenario, 0), _params(runs["two"], scenario, 1)
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k


@pytest.mark.parametrize("scenario", EQUIV)
def test_two_processes_match_one_process(runs, scenario):
    one, two = _params(runs["one"], scenario, 0), _params(runs["two"], scenario, 0)
    init = _params_initial(runs["model_dir"])
    moved = max((one[k] - init[k]).abs().max().item() for k in init)
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"{scenario}: max |param change| {moved:.3e}, max |2-proc - 1-proc| {diff:.3e}")
    assert moved > 1e-3  # the weights really moved: the comparison is not trivially true
    assert diff < PARAM_ATOL


@pytest.mark.parametrize("scenario", list(BF16))
def test_bf16_two_processes_track_one_process(runs, scenario):
    """bf16 rounding depends on the batch shape (oneDNN picks kernels by rows), so 2 processes match 1 only to
    bf16 precision, and AdamW turns that into lr-sized weight differences within steps. The first update is the
    check: loss, KL and gradient norm to bf16 precision (wrong averaging over ranks would be off by x2).
    Measured: |d loss| 4.2e-5, |d KL| 1.9e-5, grad norm 1.4e-5 relative."""
    a, b = _rank(runs["one"], BF16[scenario], 0)["history"][0], _rank(runs["two"], scenario, 0)["history"][0]
    assert b["loss"] == pytest.approx(a["loss"], abs=2e-4)
    assert b["kl_divergence"] == pytest.approx(a["kl_divergence"], abs=2e-4)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert a["kl_divergence"] > 0 and math.isfinite(a["loss"])


def _params_initial(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("scenario", EQUIV)
def test_logged_metrics_match_one_process_and_agree_across_ranks(runs, scenario):
    h1 = _rank(runs["one"], scenario, 0)["history"]
    h2 = {r: _rank(runs["two"], scenario, r)["history"] for r in (0, 1)}
    local = lambda m: {k: v for k, v in m.items() if not k.startswith("time/") and k not in LOCAL_TIMINGS}  # noqa: E731
    assert [local(m) for m in h2[0]] == [local(m) for m in h2[1]]  # reduced: every rank holds the same numbers
    assert [m["step"] for m in h1] == [m["step"] for m in h2[0]] == list(range(1, STEPS + 1))
    keys = (
        "raw_reward_mean",
        "raw_reward_std",
        "kl_divergence",
        "policy_loss",
        "entropy",
        "loss",
        "clip_fraction_seq",
        "clip_fraction_token",
        "ratio_mean",
        "completion_length_mean",
        "grad_norm",
        "frac_reward_zero_std",
    )
    for a, b in zip(h1, h2[0]):
        for k in keys:
            assert b[k] == pytest.approx(a[k], abs=METRIC_ATOL), (a["step"], k)
    # Only the main process writes: one metrics.jsonl with one line per step, equal to the history.
    lines = (runs["two"] / scenario / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    assert [m["raw_reward_mean"] for m in logged] == [m["raw_reward_mean"] for m in h2[0]]


@pytest.mark.parametrize("scenario", ["gae", "fsdp_gae"])
def test_critic_metrics_match_one_process(runs, scenario):
    """The critic trains as a second model under DDP and FSDP2: its loss, the GAE statistics (whitened over
    all ranks' tokens) and the positive-example NLL equal the 1-process run's."""
    h1, h2 = _rank(runs["one"], "gae", 0)["history"], _rank(runs["two"], scenario, 0)["history"]
    keys = ("value_loss", "value_clip_fraction", "explained_variance", "value_mean", "returns_mean")
    keys += ("advantages_mean", "advantages_std", "gae_lambda_policy_mean", "positive_nll", "value_grad_norm")
    for a, b in zip(h1, h2):
        for k in keys:
            assert b[k] == pytest.approx(a[k], abs=METRIC_ATOL, rel=1e-4), (a["step"], k)
    assert h1[-1]["positive_nll"] > 0 and h1[-1]["value_loss"] > 0 and h1[-1]["value_clip_fraction"] > 0


def test_fsdp_critic_resumes_exactly(runs):
    """FSDP2 with a critic: 2 steps, a checkpoint (policy and critic/ gathered to full states), a fresh trainer
    resumes and runs step 3; weights and the critic's metrics end where the uninterrupted run ends."""
    straight, resumed = _params(runs["two"], "fsdp_gae", 0), _params(runs["two"], "fsdp_gae_resume", 0)
    assert max((resumed[k] - straight[k]).abs().max().item() for k in resumed) < 1e-6
    a, b = _rank(runs["two"], "fsdp_gae", 0)["history"][-1], _rank(runs["two"], "fsdp_gae_resume", 0)["history"][-1]
    assert b["step"] == 3 and _rank(runs["two"], "fsdp_gae_resume", 0)["start_step"] == 2
    for k in ("value_loss", "value_mean", "explained_variance", "policy_loss"):
        assert b[k] == pytest.approx(a[k], abs=1e-6), k


@pytest.mark.parametrize("scenario", ["seq_offpolicy", "token_mean"])
def test_adaptive_kl_coef_is_global(runs, scenario):
    one = _rank(runs["one"], scenario, 0)
    r0, r1 = _rank(runs["two"], scenario, 0), _rank(runs["two"], scenario, 1)
    traj = lambda info: [m["kl_coef"] for m in info["history"]] + [info["final_kl_coef"]]  # noqa: E731
    assert traj(r0) == traj(r1)  # bitwise: the controller sees the reduced KL on every rank
    assert traj(r0) == pytest.approx(traj(one), rel=1e-6)
    assert len(set(traj(one))) == len(traj(one))  # the coefficient really moved every step


@pytest.mark.parametrize("scenario", EPISODES)
def test_ranks_whose_episodes_take_different_turns_finish_together(runs, scenario):
    """Real generation, an environment that ends rank 0's episodes after 1 model turn and rank 1's after 3: every
    step finished on both ranks (no rank waited on the other's turns), and they trained the same weights."""
    r0, r1 = _rank(runs["two"], scenario, 0), _rank(runs["two"], scenario, 1)
    # 4 prompts x 4 completions / 2 ranks = 8 episodes per rank and step, 3 steps
    assert r0["local_turns"] == [1] * 24 and r1["local_turns"] == [3] * 24
    for h in (r0["history"], r1["history"]):
        assert [m["step"] for m in h] == [1, 2, 3]
        assert all(m["episode/turns_max"] == 3 and m["episode/turns_mean"] == 2 for m in h)  # half 1, half 3
    p0, p1 = _params(runs["two"], scenario, 0), _params(runs["two"], scenario, 1)
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert r0["sharded"] == (scenario == "fsdp_episodes")


def test_every_rank_resumes_from_the_same_checkpoint(runs):
    for rank in (0, 1):
        info = _rank(runs["two"], "resume", rank)
        assert info["start_step"] == 2  # both ranks continued at step 3
    resumed, straight = _params(runs["two"], "resume", 0), _params(runs["two"], "seq_offpolicy", 0)
    diff = max((resumed[k] - straight[k]).abs().max().item() for k in resumed)
    assert diff < 1e-6, diff
    r, s = _rank(runs["two"], "resume", 0), _rank(runs["two"], "seq_offpolicy", 0)
    assert r["final_kl_coef"] == pytest.approx(s["final_kl_coef"], rel=1e-9)


@pytest.mark.parametrize("scenario", ["fail_rank1", "fsdp_fail_rank1"])
def test_error_on_one_rank_stops_the_whole_run(runs, scenario):
    """A reward function raising on rank 1 only (DDP, and FSDP2 where rank 0 then waits in a sharded
    collective): the launcher exits non-zero, promptly, showing the error."""
    port = _free_port()
    # `accelerate launch --cpu` starts ONE process (multi-CPU there means mpirun); `--multi_gpu` starts
    # torchrun workers, which the trainer puts on gloo when the machine has no GPU.
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        WORKER,
        "--model_dir",
        str(runs["model_dir"]),
        "--out",
        str(runs["root"] / "fail"),
        "--scenarios",
        scenario,
    ]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=_env(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rc, out = _finish(proc, 300)
    elapsed = time.monotonic() - start
    assert rc != 0, out[-4000:]
    assert "deliberate failure on rank 1" in out
    assert "fails_on_rank1" in out  # the reward error names the function
    assert elapsed < 240, elapsed


# ---------------------------------------------------------------------------- FSDP2
def test_fsdp_really_shards(runs):
    """Each rank stores about half of the parameter elements (uneven splits round per tensor)."""
    for scenario in list(FSDP) + FSDP_EXTRA:
        infos = [_rank(runs["two"], scenario, r) for r in (0, 1)]
        assert all(i["sharded"] for i in infos), scenario
        full = infos[0]["full_numel"]
        assert sum(i["local_numel"] for i in infos) == full
        assert all(i["local_numel"] < 0.55 * full for i in infos), [i["local_numel"] for i in infos]
    assert not _rank(runs["two"], "seq_offpolicy", 0)["sharded"]  # fsdp=False stays DDP
    # the reference model (KL on, no LoRA) is sharded too; with LoRA there is none (adapters off instead)
    assert all(_rank(runs["two"], s, r)["ref_sharded"] for s in FSDP for r in (0, 1))
    assert not _rank(runs["two"], "seq_offpolicy", 0)["ref_sharded"]


@pytest.mark.parametrize("scenario", list(FSDP) + FSDP_EXTRA)
def test_fsdp_ranks_hold_identical_full_parameters(runs, scenario):
    p0, p1 = _params(runs["two"], scenario, 0), _params(runs["two"], scenario, 1)
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k


@pytest.mark.parametrize("scenario", list(FSDP))
def test_fsdp_two_processes_match_one_process(runs, scenario):
    """Same global batch and rollouts: FSDP2's reduce-scattered mean gradients give the 1-process weights."""
    twin = FSDP[scenario]
    one, two = _params(runs["one"], twin, 0), _params(runs["two"], scenario, 0)
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"{scenario}: max |fsdp 2-proc - 1-proc| {diff:.3e}")
    assert diff < PARAM_ATOL
    h1, h2 = _rank(runs["one"], twin, 0)["history"], _rank(runs["two"], scenario, 0)["history"]
    for a, b in zip(h1, h2):
        for k in ("loss", "kl_divergence", "grad_norm", "clip_fraction_seq", "kl_coef"):
            assert b[k] == pytest.approx(a[k], abs=METRIC_ATOL), (a["step"], k)


def test_fsdp_resume_and_cross_resume_continue_exactly(runs):
    """Resume under FSDP from an FSDP checkpoint, under FSDP from a DDP checkpoint, and in one process
    from an FSDP checkpoint: all three end where the uninterrupted run ends."""
    straight_fsdp = _params(runs["two"], "fsdp_offpolicy", 0)
    resumed = _params(runs["two"], "fsdp_resume", 0)
    assert max((resumed[k] - straight_fsdp[k]).abs().max().item() for k in resumed) < 1e-6
    for run, scenario in ((runs["two"], "fsdp_from_plain_ckpt"), (runs["one"], "plain_from_ckpt")):
        p = _params(run, scenario, 0)
        assert _rank(run, scenario, 0)["start_step"] == 2
        assert max((p[k] - straight_fsdp[k]).abs().max().item() for k in p) < PARAM_ATOL, scenario


def test_fsdp_sampled_run_gathers_for_generation_and_exports_whole_weights(runs):
    """Real sampling and greedy evaluation on the sharded model, then the final export: it holds every
    weight, equal to the gathered parameters, and loads with from_pretrained."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = runs["two"] / "fsdp_sampled"
    history = _rank(runs["two"], "fsdp_sampled", 0)["history"]
    assert len(history) == STEPS and all(m["eval/num_samples"] == 5 for m in history)  # uneven batches per rank
    assert all(m["completion_length_mean"] > 0 for m in history)
    params = _params(runs["two"], "fsdp_sampled", 0)
    exported = load_file(str(out / "model.safetensors"))
    for k, v in exported.items():
        assert torch.equal(v, params[k]), k
    model = AutoModelForCausalLM.from_pretrained(str(out))
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k


def test_accelerate_launch_with_the_fsdp_example_config_shards_and_matches(runs):
    """`accelerate launch --config_file examples/accelerate/fsdp.yaml` on CPU: accelerate cannot shard
    here (it falls back to DDP), so the trainer shards with FSDP2 itself; the result is the 1-process one."""
    port = _free_port()
    config = HERE.parent / "examples" / "accelerate" / "fsdp.yaml"
    cmd = accelerate_launch(
        config, port, WORKER, "--model_dir", str(runs["model_dir"]), "--out", str(runs["root"] / "acc")
    ) + ["--scenarios", "accelerate_fsdp"]
    rc, out = _finish(
        subprocess.Popen(cmd, env=_env(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), 300
    )
    assert rc == 0, out[-4000:]
    infos = [_rank(runs["root"] / "acc", "accelerate_fsdp", r) for r in (0, 1)]
    assert all(i["world"] == 2 and i["sharded"] for i in infos)
    assert all(i["local_numel"] < 0.55 * i["full_numel"] for i in infos)
    one, two = _params(runs["one"], "seq_offpolicy", 0), _params(runs["root"] / "acc", "accelerate_fsdp", 0)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < PARAM_ATOL


def test_fsdp_lora_matches_one_process_and_resumes_exactly(runs):
    """LoRA under FSDP2 (adapters initialised randomly: rank 0's values are broadcast before sharding),
    merged on export from the gathered state: the merged weights equal the 1-process LoRA run's;
    resuming from the adapter checkpoint of step 2 ends bit-identical to the uninterrupted run."""
    from safetensors.torch import load_file

    one = load_file(str(runs["one"] / "lora" / "model.safetensors"))
    two = load_file(str(runs["two"] / "fsdp_lora" / "model.safetensors"))
    init = _params_initial(runs["model_dir"])
    assert one.keys() == two.keys() == init.keys()  # merged: plain model weights, no adapter keys
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 1e-3
    assert max((one[k] - two[k]).abs().max().item() for k in one) < PARAM_ATOL
    assert (runs["two"] / "fsdp_lora_resume" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    straight, resumed = _params(runs["two"], "fsdp_lora", 0), _params(runs["two"], "fsdp_lora_resume", 0)
    assert any("lora_A" in k for k in straight)
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) == 0.0


def test_dynamic_sampling_under_ddp_keeps_the_global_batch_and_the_step_count(runs):
    """Each rank refills its own share of groups with spread; the ranks still take the same number of steps with
    the same logged (global) metrics, and every step trains batch_size groups: kept + topped up = 4."""
    a, b = _rank(runs["two"], "dynamic", 0), _rank(runs["two"], "dynamic", 1)
    assert [m["step"] for m in a["history"]] == [m["step"] for m in b["history"]] == [1, 2, 3]
    for ma, mb in zip(a["history"], b["history"]):
        for key in ("dynamic_sampling/rounds", "dynamic_sampling/kept_groups", "policy_loss", "frac_reward_zero_std"):
            assert ma[key] == mb[key], key
        assert ma["dynamic_sampling/kept_groups"] + ma["dynamic_sampling/filled_groups"] == 4
        # the groups trained on are the kept ones plus the top-ups: only those can have zero spread
        assert ma["frac_reward_zero_std"] == ma["dynamic_sampling/filled_groups"] / 4
    # half the prompts are flat: some step needed a second round
    assert max(m["dynamic_sampling/rounds"] for m in a["history"]) >= 2


@pytest.mark.parametrize("scenario", MOE)
def test_an_moe_policy_under_ddp_and_fsdp2_matches_one_process(runs, scenario):
    """Routing Replay and the volatility metric over ranks: the same parameters as one process (the dense tests'
    tolerance), and the same step metrics, the expert-change fraction included (summed over ranks)."""
    one, two = _params(runs["one"], "moe", 0), _params(runs["two"], scenario, 0)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], atol=PARAM_ATOL), name
    h1, h2 = _rank(runs["one"], "moe", 0)["history"], _rank(runs["two"], scenario, 0)["history"]
    for m1, m2 in zip(h1, h2):
        assert m2["moe/expert_change_fraction"] == pytest.approx(m1["moe/expert_change_fraction"], abs=1e-9)
        assert m1["moe/routes_buffer_mb"] > 0
    assert any(m["moe/expert_change_fraction"] > 0 for m in h1)  # the routes do move between updates
