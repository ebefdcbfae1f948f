"""One run per output directory, and a resume that is the run it claims to be.

* `RunDirLock`: an exclusive `flock` on `<output_dir>/.gspo.lock`, held for the whole run by the main process
  and released by the OS when the process dies (no stale lock after a `kill -9`). A second run on the same
  directory stops at once with the holder's pid and host.
* `check_fresh_run`: a run that does not resume must not start in a directory holding another run's
  checkpoints or final model (`resume_from_checkpoint: latest` would later pick the old run's); with
  `overwrite_output_dir` the old run's checkpoints, final model and completions record are removed first.
* `config_changes`: a resumed run compares its config with the one its checkpoint was saved with. Fields that
  change what the run is are refused (unless `allow_config_change`); `learning_rate` is applied to the restored
  optimizer and schedule and logged; the rest (max_steps, logging, eval, save fields, the reward error policy...)
  may change freely.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

from gspo.config import ConfigError

LOCK_FILE = ".gspo.lock"
# Fields whose change makes a resumed run a different run.
IDENTITY_FIELDS = (
    "policy_model_name",
    "use_lora",
    "batch_size",
    "group_size",
    "policy_loss",
    "importance_sampling_level",
    "advantage_estimator",
    "loss_aggregation",
    "seed",
    "max_new_tokens",
    "reward_funcs",
    "reward_weights",
    "reward_kwargs",
    "reward_model_name",
    "lr_scheduler_type",  # the restored scheduler holds the old schedule's state
    "warmup_steps",
)
APPLIED_FIELDS = ("learning_rate",)  # set on the restored optimizer and scheduler
# Never compared: where the run is, how it was started.
IGNORED_FIELDS = ("output_dir", "resume_from_checkpoint", "allow_config_change", "overwrite_output_dir")


class RunDirLock:
    """Hold `<output_dir>/.gspo.lock` (main process; `enabled=False` elsewhere does nothing)."""

    def __init__(self, output_dir, *, enabled: bool = True) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.enabled = enabled
        self._fh = None

    def acquire(self) -> "RunDirLock":
        if not self.enabled:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise ConfigError(
                f"output_dir {str(self.path.parent)!r} is in use by another gspo run ({holder}); wait for it, stop "
                "it, or choose another output_dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the flock
            self._fh = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def previous_run(output_dir) -> list[str]:
    """What another run left in `output_dir`: its checkpoints and final model files."""
    from gspo.checkpoint import CHECKPOINT_PREFIX

    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = sorted(p.name for p in out.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir())
    found += [
        n
        for n in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
        if (out / n).exists()
    ]
    return found


def check_fresh_run(output_dir, *, overwrite: bool) -> None:
    """A run that does not resume starts in a directory with no other run's checkpoints or final model."""
    left = previous_run(output_dir)
    if not left:
        return
    if not overwrite:
        shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
        raise ConfigError(
            f"output_dir {str(output_dir)!r} holds another run ({shown}): resume it with --resume_from_checkpoint "
            "latest, choose another output_dir, or pass --overwrite_output_dir true to replace it"
        )
    out = Path(output_dir)
    for name in left:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    from gspo.completions import COMPLETIONS_DIR

    shutil.rmtree(out / COMPLETIONS_DIR, ignore_errors=True)


def _comparable(value):
    return json.loads(json.dumps(value, default=str))


def config_changes(saved: Optional[dict], current: dict) -> tuple[list[str], dict]:
    """(refused: "field: saved -> current" for changed identity fields, applied: {field: (saved, current)} for
    changed APPLIED_FIELDS). A checkpoint without a saved config (older gspo) compares as unchanged."""
    if saved is None:
        return [], {}
    current = _comparable(current)
    refused, applied = [], {}
    for name in IDENTITY_FIELDS:
        if name in saved and saved[name] != current.get(name):
            refused.append(f"{name}: {saved[name]!r} -> {current.get(name)!r}")
    for name in APPLIED_FIELDS:
        if name in saved and saved[name] != current.get(name):
            applied[name] = (saved[name], current.get(name))
    return refused, applied


def refuse_changes(refused: list[str], checkpoint) -> None:
    if refused:
        raise ConfigError(
            f"resuming {checkpoint} with a config that changes what the run is: "
            + "; ".join(refused)
            + ". Resume with the checkpoint's values (its manifest.json holds its config), or pass "
            "--allow_config_change true to go on anyway"
        )


def apply_learning_rate(optimizer, scheduler, old: float, new: float) -> None:
    """Scale the restored optimizer's learning rates and the scheduler's base rates by new / old, so the restored
    schedule continues at the new peak rate."""
    factor = float(new) / float(old)
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
