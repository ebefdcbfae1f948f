"""Runs that cannot be silently corrupted (issue 22): one run per output directory, a config that travels with its
checkpoint, checkpoints verified on load with `latest` falling back to the newest one that verifies."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import fault_worker as fw
import pytest

from gspo import checkpoint as ckpt
from gspo.config import ConfigError
from gspo.run_dir import LOCK_FILE, RunDirLock
from gspo.trainer import GSPOTrainer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model, data = fw.make_model_dir(root / "model"), fw.make_dataset(root / "data.jsonl")
    run = root / "run"  # a finished 2-step run with checkpoint-1 and checkpoint-2, shared by the tests (copied)
    train(model, data, run, max_steps=2, save_steps=1)
    return {"root": root, "model": model, "data": data, "run": run}


def train(model, data, out, **overrides):
    trainer = GSPOTrainer(fw.make_config(out, model, **overrides), reward_funcs=[fw.digit_reward])
    trainer.train(data)
    return trainer


def copy_run(env, name):
    target = env["root"] / name
    shutil.copytree(env["run"], target)
    return target


# --- verified checkpoints -------------------------------------------------------------
def test_the_manifest_holds_step_config_sizes_and_checksums(env):
    path = env["run"] / "checkpoint-2"
    manifest = ckpt.read_manifest(path)
    assert manifest["step"] == 2 and manifest["config"]["batch_size"] == 2 and manifest["config"]["seed"] == 7
    weights = manifest["files"]["model.safetensors"]
    assert weights["size"] == (path / "model.safetensors").stat().st_size
    assert weights["xxh3_128"] == ckpt.file_checksum(path / "model.safetensors")
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pt"} <= set(manifest["files"])
    ckpt.verify_checkpoint(path)  # as saved: no error


def test_flipped_bytes_inside_the_weights_are_found_and_latest_falls_back(env, caplog):
    run = copy_run(env, "flipped")
    weights = run / "checkpoint-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])  # same size, other bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-2/model.safetensors has changed since it was saved"):
        ckpt.verify_checkpoint(run / "checkpoint-2")
    with caplog.at_level("WARNING", logger="gspo"):
        assert ckpt.resolve_checkpoint(run, "latest").name == "checkpoint-1"
    assert "skipping checkpoint-2 for resume" in caplog.text and "model.safetensors has changed" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors has changed"):
        ckpt.resolve_checkpoint(run, str(run / "checkpoint-2"))  # asked for by name: no fallback


def test_truncated_files_and_edited_steps_are_named(env):
    run = copy_run(env, "damaged")
    optimizer = run / "checkpoint-2" / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[: size // 2])
    with pytest.raises(ckpt.CheckpointError, match=rf"optimizer.pt is {size // 2} bytes, the manifest says {size}"):
        ckpt.verify_checkpoint(run / "checkpoint-2")
    state_file = run / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "step": 99}))  # also changes its size and checksum
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json"):
        ckpt.verify_checkpoint(run / "checkpoint-1")
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint in .* verifies: checkpoint-2: .*checkpoint-1: "):
        ckpt.resolve_checkpoint(run, "latest")
    renamed = run / "checkpoint-7"
    shutil.copytree(env["run"] / "checkpoint-2", renamed)
    with pytest.raises(ckpt.CheckpointError, match="says step 2 but the directory is checkpoint-7"):
        ckpt.verify_checkpoint(renamed)


def test_a_damaged_state_file_is_named_when_loaded(tmp_path, env):
    path = tmp_path / "checkpoint-2"
    shutil.copytree(env["run"] / "checkpoint-2", path)
    (path / "manifest.json").unlink()  # an older checkpoint: nothing to verify against, the load still names it
    (path / "scheduler.pt").write_bytes(b"not a zip")
    with pytest.raises(ckpt.CheckpointError, match=r"scheduler.pt cannot be loaded"):
        ckpt.read_state_file(path, "scheduler.pt")


# --- the config travels with the checkpoint ----------------------------------------------
def test_resume_refuses_a_changed_run_and_lists_the_differences(env):
    run = copy_run(env, "changed")
    with pytest.raises(ConfigError) as info:
        train(env["model"], env["data"], run, max_steps=3, batch_size=4, seed=8, resume_from_checkpoint="latest")
    message = str(info.value)
    assert "batch_size: 2 -> 4" in message and "seed: 7 -> 8" in message and "--allow_config_change" in message
    assert not (run / "checkpoint-3").exists()
    trainer = train(
        env["model"], env["data"], run, max_steps=3, seed=8, resume_from_checkpoint="latest", allow_config_change=True
    )
    assert trainer.step == 3


def test_a_changed_learning_rate_is_applied_and_recorded(env):
    run = copy_run(env, "new-lr")
    trainer = train(env["model"], env["data"], run, max_steps=3, learning_rate=5e-4, resume_from_checkpoint="latest")
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)  # constant schedule: the new peak
    assert fw.read_metrics(run)[-1]["learning_rate"] == pytest.approx(5e-4)  # step 3 ran at it
    assert json.loads((run / "gspo_config.json").read_text())["learning_rate"] == 5e-4


# --- one run per directory ----------------------------------------------------------------
def test_a_locked_directory_stops_a_second_run(env, tmp_path):
    out = tmp_path / "busy"
    with RunDirLock(out):
        with pytest.raises(ConfigError, match=r"in use by another gspo run \(pid \d+ on host .+\)"):
            train(env["model"], env["data"], out, max_steps=1)
    trainer = train(env["model"], env["data"], out, max_steps=1)  # released: the run goes ahead
    assert trainer.step == 1
    RunDirLock(out).acquire().release()  # and it released the lock at its end


def test_the_lock_dies_with_its_process(tmp_path):
    code = (
        "import sys, time; from gspo.run_dir import RunDirLock; lock = RunDirLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"pid {proc.pid}"):
        RunDirLock(tmp_path).acquire()
    proc.kill()  # SIGKILL: no clean-up code runs
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            RunDirLock(tmp_path).acquire().release()
            break
        except ConfigError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert (tmp_path / LOCK_FILE).is_file()


def test_a_fresh_run_into_another_runs_directory_is_refused_unless_overwritten(env):
    run = copy_run(env, "finished")
    with pytest.raises(ConfigError, match=r"holds another run \(checkpoint-1, checkpoint-2, model.safetensors\)"):
        train(env["model"], env["data"], run, max_steps=1)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # untouched
    train(env["model"], env["data"], run, max_steps=1, overwrite_output_dir=True)
    assert not list(run.glob("checkpoint-*"))  # the old run's checkpoints are gone: 'latest' cannot pick them
    assert [r["step"] for r in fw.read_metrics(run)] == [1]


# --- checked at start-up ------------------------------------------------------------------
def test_prompt_plus_new_tokens_must_fit_the_models_positions(env, tmp_path):
    # the model has 64 positions (fault_worker's tiny Llama); the prompts are 4 tokens ("1+2=", no BOS)
    with pytest.raises(ConfigError) as info:
        train(env["model"], env["data"], tmp_path / "long", max_steps=1, max_new_tokens=62, max_prompt_length=16)
    message = str(info.value)
    assert "max_new_tokens=62 plus the longest prompt in the data, 4 tokens (below max_prompt_length=16)" in message
    assert "66 tokens, more than the model's 64 positions" in message
    assert not (tmp_path / "long" / "metrics.jsonl").exists()  # before anything ran
    with pytest.raises(ConfigError, match=r"max_new_tokens=61 plus max_prompt_length=4 is 65 tokens"):
        train(env["model"], env["data"], tmp_path / "long2", max_steps=1, max_new_tokens=61, max_prompt_length=4)
    train(env["model"], env["data"], tmp_path / "fits", max_steps=1, max_new_tokens=60)  # 4 + 60 = 64: fits


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused(env, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env["model"])
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(ConfigError, match="has neither a pad token nor an EOS token"):
        GSPOTrainer(fw.make_config(tmp_path / "tok", env["model"]), reward_funcs=[fw.digit_reward], tokenizer=tok)


def test_an_output_dir_that_cannot_be_written_fails_before_the_model_loads(env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = fw.make_config(blocker / "run", env["model"])
    with pytest.raises(ConfigError, match=r"output_dir=.*a-file/run' cannot be written"):
        GSPOTrainer(cfg, reward_funcs=[fw.digit_reward])


@pytest.mark.parametrize("field", ["temperature", "eval_temperature"])
def test_a_temperature_below_the_floor_is_refused(field):
    from gspo.config import GSPOConfig

    with pytest.raises(ConfigError, match=rf"GSPOConfig.{field}=1e-40 is not allowed: must be >= 0.001"):
        GSPOConfig(**{field: 1e-40})
    GSPOConfig(**{field: 1e-3})


def test_a_dead_policy_is_warned_about_once(caplog):
    from gspo.preflight import DeadPolicyMonitor

    monitor = DeadPolicyMonitor(patience=3)
    alive, dead = {"grad_norm": 0.5, "frac_reward_zero_std": 0.5}, {"grad_norm": 0.0, "frac_reward_zero_std": 0.5}
    flat = {"grad_norm": 0.0, "frac_reward_zero_std": 1.0}  # no reward spread: a zero gradient is expected
    with caplog.at_level("WARNING", logger="gspo"):
        for step, (m, skipped) in enumerate(
            [(dead, False), (dead, False), (alive, False), (dead, True), (flat, False), (dead, False), (dead, False)], 1
        ):
            monitor.update(m, step, skipped=skipped)
        assert "exactly 0" not in caplog.text  # never 3 dead steps in a row with spread so far
        monitor.update(dead, 8, skipped=False)
        monitor.update(dead, 9, skipped=False)
    assert caplog.text.count("exactly 0 for 3 steps (to step 8)") == 1  # steps 6, 7, 8; warned once


def test_a_full_disk_during_a_save_is_named_as_such(tmp_path):
    import errno

    full = ckpt._out_of_space(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert full.startswith(f"no space left on device while saving a checkpoint in {tmp_path}")
    assert "the previous checkpoints are intact" in full
    # torch's writer reports a full disk as a RuntimeError without errno: named only when the disk is nearly full
    assert ckpt._out_of_space(tmp_path, RuntimeError("basic_ios::clear: iostream error")) is None  # room left here
    assert ckpt._out_of_space(tmp_path, ValueError("not a disk problem")) is None
