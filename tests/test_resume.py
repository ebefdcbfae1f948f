"""Interrupts, crashes and exact resume, on real training runs of a tiny model (CPU).

* A run interrupted at step k (SIGTERM/SIGINT: the step finishes, a checkpoint is saved,
  exit status 128 + signum) and resumed with resume_from_checkpoint="latest" ends with
  bit-identical weights and per-step metrics to an uninterrupted run (timing keys aside),
  with a linear LR schedule, and with LoRA + adaptive KL.
* A training process killed with SIGKILL in the middle of a checkpoint save leaves the
  previous checkpoint complete and loadable; "latest" picks it and a new process finishes
  the run, again bit-identical to the uninterrupted one.

Why the interrupted and the reference runs share `max_steps`: the LR schedule spans
max_steps (or num_epochs) updates. A first run with max_steps=k would schedule its LR over
k steps and so differ from a run to n (for linear/cosine; constant is unaffected). Stop a
run early with an interrupt or a kill, not by lowering max_steps, if you mean to resume it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import fault_worker as fw
import pytest
import torch

from gspo import checkpoint as ckpt
from gspo.faults import TrainingInterrupted
from gspo.trainer import GSPOTrainer

WORKER = str(Path(__file__).with_name("fault_worker.py"))
STEPS = 6
LORA = dict(
    use_lora=True,
    lora_target_modules=["q_proj", "v_proj"],
    lora_r=4,
    lora_alpha=8,
    kl_coef=0.05,
    adaptive_kl=True,
    target_kl=0.001,
    kl_horizon=100,
)
VARIANTS = {
    "full-linear-lr": dict(lr_scheduler_type="linear", warmup_steps=1),
    "lora-adaptive-kl": LORA,
    # extra generation rounds take extra prompt batches: the checkpoint must count them
    "dynamic-sampling": dict(dynamic_sampling=True, dynamic_sampling_max_rounds=3),
    # multi-turn episodes (an environment, real sampling): the episode model and template come from `env`
    "episodes": dict(environment="fault_worker:TwoTurnEnv", max_turns=3, max_episode_tokens=10),
}


def settings(env, variant: str) -> dict:
    extra = {}
    if variant == "episodes":
        extra = dict(policy_model_name=env["episode_model"], chat_template=env["template"])
    return {**VARIANTS.get(variant, {}), **extra}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker subprocess uses 1 thread: same arithmetic, same bits
    try:
        yield {
            "root": root,
            "model": fw.make_model_dir(root / "model"),
            "data": fw.make_dataset(root / "data.jsonl"),
            "episode_model": fw.make_episode_model_dir(root / "episode-model", root / "template.jinja"),
            "template": str(root / "template.jinja"),
            "refs": {},
        }
    finally:
        torch.set_num_threads(threads)


def _run(env, out, resume=None, reward=fw.digit_reward, **overrides):
    cfg = fw.make_config(out, env["model"], max_steps=STEPS, resume_from_checkpoint=resume, **overrides)
    trainer = GSPOTrainer(cfg, reward_funcs=[reward])
    trainer.train(env["data"])
    return trainer


def _final_params(trainer):
    return fw.params_of(trainer.accelerator.unwrap_model(trainer.model))


def reference(env, variant: str):
    """An uninterrupted run to STEPS for `variant`, computed once: (params, comparable metrics)."""
    if variant not in env["refs"]:
        out = env["root"] / f"ref-{variant}"
        trainer = _run(env, out, **settings(env, variant))
        env["refs"][variant] = (_final_params(trainer), fw.comparable(fw.read_metrics(out)))
    return env["refs"][variant]


def assert_same_run(env, variant, params, out):
    ref_params, ref_metrics = reference(env, variant)
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, ref_params[name]), (
            f"{name} differs after resume: max |diff| {(p - ref_params[name]).abs().max().item()}"
        )
    metrics = fw.comparable(fw.read_metrics(out))
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert metrics == ref_metrics


def test_the_dynamic_sampling_variant_takes_extra_prompt_batches(env):
    """So that its exact resume above is about something: some step needed a second generation round."""
    _, metrics = reference(env, "dynamic-sampling")
    assert max(m["dynamic_sampling/rounds"] for m in metrics) > 1


def test_the_episodes_variant_takes_several_turns(env):
    """So that its exact resume below is about multi-turn episodes: most took their two turns."""
    _, metrics = reference(env, "episodes")
    assert all(m["episode/turns_mean"] > 1.5 for m in metrics) and "reward/environment_mean" in metrics[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_interrupted_run_resumes_exactly(env, variant):
    """SIGTERM during step 3 (delivered to this process, so the real signal handler runs):
    step 3 finishes, checkpoint-3 is saved, TrainingInterrupted carries exit code 143 and
    says how to resume; resuming with 'latest' reproduces the uninterrupted run bit for bit."""
    out = env["root"] / f"interrupted-{variant}"
    trainer = None

    def digit_reward(completions, **kw):
        if trainer.step + 1 == 3:  # mid-step: rollout done, update not yet
            os.kill(os.getpid(), signal.SIGTERM)
        return fw.digit_reward(completions, **kw)

    cfg = fw.make_config(out, env["model"], max_steps=STEPS, save_steps=2, **settings(env, variant))
    trainer = GSPOTrainer(cfg, reward_funcs=[digit_reward])
    with pytest.raises(TrainingInterrupted) as info:
        trainer.train(env["data"])
    assert info.value.code == 128 + signal.SIGTERM
    assert "resume_from_checkpoint='latest'" in str(info.value) and "step 3/6" in str(info.value)
    assert trainer.step == 3
    assert ckpt.find_latest_checkpoint(out).name == "checkpoint-3"
    assert [m["step"] for m in fw.read_metrics(out)] == [1, 2, 3]
    # the handler was restored: a later SIGTERM would not be swallowed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))

    resumed = _run(env, out, resume="latest", save_steps=2, **settings(env, variant))
    assert resumed.step == STEPS
    assert_same_run(env, variant, _final_params(resumed), out)


def test_a_finished_run_continues_to_a_larger_max_steps_exactly(env):
    """A run that reached max_steps=3 with save_steps=5 still leaves checkpoint-3 (the last step is always
    checkpointed when save_steps > 0); continuing it with max_steps=6 and resume 'latest' gives the
    uninterrupted 6-step run bit for bit (constant LR: a linear schedule spans max_steps by design)."""
    out = env["root"] / "continued"
    first = GSPOTrainer(fw.make_config(out, env["model"], max_steps=3, save_steps=5), reward_funcs=[fw.digit_reward])
    first.train(env["data"])
    assert first.step == 3 and ckpt.find_latest_checkpoint(out).name == "checkpoint-3"
    continued = _run(env, out, resume="latest", save_steps=5)
    assert continued.step == STEPS and ckpt.find_latest_checkpoint(out).name == f"checkpoint-{STEPS}"
    assert_same_run(env, "constant-lr", _final_params(continued), out)


def _worker(env, out, *args, slow=0.0):
    cmd = [sys.executable, WORKER, str(out), env["model"], env["data"], "--steps", str(STEPS), *args]
    if slow:
        cmd += ["--slow", str(slow)]
    log = open(Path(str(out) + ".stderr"), "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    proc.stderr_path = log.name
    log.close()
    return proc


def _wait_for_line(proc, wanted: str, timeout: float = 240.0) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.strip())
        if line.strip() == wanted:
            return seen
    proc.kill()
    raise AssertionError(
        f"worker never printed {wanted!r}; stdout {seen}; stderr:\n" + Path(proc.stderr_path).read_text()[-3000:]
    )


def _fresh_model(env):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(env["model"])


def _load_params_from(path, env):
    """A fresh model loaded from checkpoint `path` (full weights)."""
    model = _fresh_model(env)
    ckpt.load_checkpoint(path, model, restore_rng=False)
    return fw.params_of(model)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_training_process_checkpoints_and_exits(env, sig):
    """A real signal to a training subprocess while step 2 is in progress: the step finishes,
    checkpoint-2 is written, the exit status is 128 + signum and stderr says how to resume.
    For SIGTERM, a new process resumes with 'latest' and matches the uninterrupted run."""
    out = env["root"] / f"signal-{sig.name}"
    proc = _worker(env, out, slow=1.0)
    _wait_for_line(proc, "STEP 2")
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=240)
    stderr = Path(proc.stderr_path).read_text()
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert "DONE" not in stdout
    assert f"received {sig.name}" in stdout + stderr
    assert "interrupted at step 2/6" in stderr and "resume_from_checkpoint='latest'" in stderr
    latest = ckpt.find_latest_checkpoint(out)
    assert latest.name == "checkpoint-2"
    assert ckpt.load_checkpoint(latest, _fresh_model(env), restore_rng=False)["step"] == 2
    if sig != signal.SIGTERM:
        return
    resume = _worker(env, out, "--resume", "latest", "--dump-params", str(out / "final.pt"))
    stdout, _ = resume.communicate(timeout=300)
    assert resume.returncode == 0, Path(resume.stderr_path).read_text()[-3000:]
    assert stdout.split()[:2] == ["STEP", "3"], "the resumed run must start at step 3"
    assert_same_run(env, "full", torch.load(out / "final.pt", weights_only=True), out)


@pytest.mark.slow
def test_a_second_sigterm_while_a_reward_hangs_saves_the_last_step_and_resumes_exactly(env):
    """The reward never returns at step 3 (no reward timeout); SIGTERM, then SIGTERM again as a scheduler would: the
    run exits 143 within seconds with checkpoint-2 (the last finished step, saved now: save_steps is 0), which
    verifies and resumes into a run bit-identical to an uninterrupted one."""
    out = env["root"] / "hung-reward"
    proc = _worker(env, out, "--hang-at-step", "3", "--reward-timeout", "0")
    _wait_for_line(proc, "STEP 3")
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None  # the first signal waits for the step, which hangs
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    stderr = Path(proc.stderr_path).read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert time.monotonic() - start < 30
    assert "stopped by a second SIGTERM during step 3/6" in stderr and "resume_from_checkpoint='latest'" in stderr
    latest = ckpt.resolve_checkpoint(out, "latest")  # verified: sizes, checksums, steps
    assert latest.name == "checkpoint-2"
    resume = _worker(env, out, "--resume", "latest", "--dump-params", str(out / "final.pt"))
    stdout, _ = resume.communicate(timeout=300)
    assert resume.returncode == 0, Path(resume.stderr_path).read_text()[-3000:]
    assert stdout.split()[:2] == ["STEP", "3"]
    assert_same_run(env, "full", torch.load(out / "final.pt", weights_only=True), out)


def test_a_reward_past_reward_timeout_s_stops_the_run_or_is_penalised(env):
    """reward_timeout_s=0.5 and a reward that never returns at step 2: under 'raise' the run stops with an error
    naming the function and the limit; under 'penalty' it finishes all steps, the hung step's rewards replaced."""
    out = env["root"] / "reward-timeout"
    proc = _worker(env, out, "--hang-at-step", "2", "--reward-timeout", "0.5")
    _, _ = proc.communicate(timeout=120)
    stderr = Path(proc.stderr_path).read_text()
    assert proc.returncode != 0 and "'digit_reward' did not return within reward_timeout_s=0.5 s" in stderr
    out = env["root"] / "reward-timeout-penalty"
    proc = _worker(env, out, "--hang-at-step", "2", "--reward-timeout", "0.5", "--reward-error-policy", "penalty")
    stdout, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, Path(proc.stderr_path).read_text()[-3000:]
    rows = fw.read_metrics(out)
    assert [r["reward_penalized"] for r in rows] == [0.0, 4.0, 0.0, 0.0, 0.0, 0.0]  # step 2: 2 prompts x 2


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_then_resume_latest(env):
    """save_steps=1; once checkpoint-1 exists, SIGKILL the process at a random moment while a
    later save's temp directory exists (the worker sleeps 0.3 s inside each save, so the kill
    reliably lands mid-save). The newest checkpoint-* is complete
    and loads; 'latest' resumes from it in a new process, which cleans the dead temp dir and
    finishes the run bit-identical to an uninterrupted one."""
    out = env["root"] / "sigkill"
    proc = _worker(env, out, "--save-steps", "1", "--slow-save", "0.3")
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-1" / ckpt.COMPLETE_MARKER).exists():
        assert proc.poll() is None and time.monotonic() < deadline, Path(proc.stderr_path).read_text()[-3000:]
        time.sleep(0.01)
    mid_save = False
    while proc.poll() is None and time.monotonic() < deadline:
        if any(
            p.name.startswith(".tmp-checkpoint-") and not p.name.startswith(".tmp-checkpoint-1-") for p in out.iterdir()
        ):
            mid_save = True
            time.sleep(random.uniform(0.0, 0.25))  # somewhere inside the save
            break
        time.sleep(0.0005)
    proc.kill()  # SIGKILL
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before a save could be caught"
    assert mid_save

    latest = ckpt.find_latest_checkpoint(out)
    assert latest is not None and (latest / ckpt.COMPLETE_MARKER).is_file()
    for d in out.glob("checkpoint-*"):  # no half-written directory ever carries the final name
        assert (d / ckpt.COMPLETE_MARKER).is_file(), d
    params = _load_params_from(latest, env)
    assert all(torch.isfinite(p).all() for p in params.values())

    resume = _worker(env, out, "--resume", "latest", "--save-steps", "1", "--dump-params", str(out / "final.pt"))
    stdout, _ = resume.communicate(timeout=300)
    assert resume.returncode == 0, Path(resume.stderr_path).read_text()[-3000:]
    step = int(latest.name.split("-")[1])
    assert stdout.split()[:2] == ["STEP", str(step + 1)]
    assert not list(out.glob(".tmp-*")), "the dead process's temp directory was not cleaned up"
    assert_same_run(env, "full", torch.load(out / "final.pt", weights_only=True), out)


def test_interrupt_in_last_step_then_resume_just_finishes(env):
    """SIGTERM during the final step: checkpoint-2 of 2 is saved; resuming from it has no step
    left to run and must still finish cleanly (final model, summary) with an eval set given."""
    out = env["root"] / "last-step"
    trainer = None

    def digit_reward(completions, **kw):
        if trainer.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return fw.digit_reward(completions, **kw)

    cfg = fw.make_config(out, env["model"], max_steps=2, eval_dataset_path=env["data"], eval_max_samples=2)
    trainer = GSPOTrainer(cfg, reward_funcs=[digit_reward])
    with pytest.raises(TrainingInterrupted):
        trainer.train(env["data"])
    assert ckpt.find_latest_checkpoint(out).name == "checkpoint-2"
    cfg = fw.make_config(
        out,
        env["model"],
        max_steps=2,
        eval_dataset_path=env["data"],
        eval_max_samples=2,
        resume_from_checkpoint="latest",
    )
    resumed = GSPOTrainer(cfg, reward_funcs=[fw.digit_reward])
    assert resumed.train(env["data"]) == []
    assert resumed.step == 2 and (out / "model.safetensors").is_file() and (out / "train_summary.json").is_file()
    assert [m["step"] for m in fw.read_metrics(out)] == [1, 2]
