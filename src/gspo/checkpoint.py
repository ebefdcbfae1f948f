"""Atomic checkpoints with exact resume, and the final model export.

Layout of `<output_dir>/checkpoint-<step>/`:
    model.safetensors (or adapter_model.safetensors + adapter_config.json for peft),
    config.json, tokenizer files, optimizer.pt, scheduler.pt, trainer_state.json,
    rng_state.pt, manifest.json (the step, the run's resolved config, every file's size and xxh3-128
    checksum), complete (marker, written last).

Verified on load: every file the manifest lists must be there with its size and checksum, and the manifest's
step must agree with the directory's name and trainer_state.json. `resolve_checkpoint("latest")` takes the
newest checkpoint that verifies, and says which newer ones it skipped and why. Checksums cost one read of the
checkpoint at save and at load (xxh3-128 hashed 3.96 GB/s on a 2-core Xeon, 2026-12-07: docs/status.md).

Crash safety: everything is written into `<output_dir>/.tmp-checkpoint-<step>-<pid>/`,
fsynced, marked complete, and only then renamed to `checkpoint-<step>` (a rename within
one directory is atomic on POSIX). So a process killed at any moment leaves either no
`checkpoint-<step>` or a complete one; older checkpoints are pruned only after the new one
exists, and are renamed away before deletion so a half-deleted one never looks valid.

Sharded back-ends (gspo.backends) read the same files with `read_full_model_state` /
`read_state_file` and set them on their shards; this module knows nothing of them.

Security: weights only through safetensors, other state only through
`torch.load(weights_only=True)`, so loading a checkpoint cannot execute code.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file

log = logging.getLogger("gspo")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: damaged, incomplete or inconsistent. The message names the file."""


CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "complete"
TMP_PREFIX = ".tmp-"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.pt"
MANIFEST_FILE = "manifest.json"
CHUNK = 1 << 23  # bytes read at a time when hashing
MIN_FREE_FOR_SAVE = 16 << 20  # a failed save with less free than this is reported as a full disk
_CKPT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


# ----------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------
def _unwrap(model):
    """DDP / accelerate wrappers keep the real model in `.module`."""
    return getattr(model, "module", model)


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional: without it no model can be a PeftModel
        return False
    return isinstance(model, PeftModel)


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (renames, new files); a no-op where unsupported (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _save_weights(model, directory: Path, state_dict: Optional[dict] = None) -> None:
    """save_pretrained in safetensors. transformers 5 always writes safetensors and has no
    `safe_serialization` argument any more; peft still takes it (and defaults to True).
    `state_dict`: full tensors gathered from a sharded model (a sharded back-end's full_states)."""
    extra = {"state_dict": state_dict} if state_dict is not None else {}
    if _is_peft(model):
        model.save_pretrained(str(directory), safe_serialization=True, **extra)
    else:
        model.save_pretrained(str(directory), **extra)


def _remove_dir(path: Path) -> None:
    """Rename then delete, so a kill mid-delete never leaves a half-deleted checkpoint-* dir."""
    doomed = path.with_name(f"{TMP_PREFIX}delete-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _clean_stale_tmp(output_dir: Path) -> None:
    """Delete temp dirs left by killed saves (dead pid), which can be as big as a model."""
    for d in output_dir.glob(f"{TMP_PREFIX}*"):
        pid = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------
# RNG state (stored as tensors / ints so torch.load(weights_only=True) accepts it)
# ----------------------------------------------------------------------------------
def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # a different GPU count: restore what matches rather than fail the resume
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------
def _write_contents(
    tmp: Path,
    step: int,
    model,
    *,
    tokenizer,
    optimizer,
    scheduler,
    trainer_state: dict,
    model_state: Optional[dict],
    optimizer_state: Optional[dict],
) -> None:
    # Serialise the trainer state first: a non-JSON value should fail before anything big is written.
    state_json = json.dumps({"step": int(step), **trainer_state}, indent=2, allow_nan=False)
    _save_weights(model, tmp, model_state)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if optimizer is not None or optimizer_state is not None:
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
    (tmp / TRAINER_STATE_FILE).write_text(state_json + "\n", encoding="utf-8")
    torch.save(rng_state(), tmp / RNG_FILE)


def write_model_part(
    directory, step: int, model, *, optimizer=None, scheduler=None, model_state=None, optimizer_state=None
):
    """A second trained model's weights, optimizer and scheduler (the critic) in `directory`, a sub-directory of a
    checkpoint being staged: complete on its own (marker included), made durable and final with the checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_contents(
        directory,
        step,
        _unwrap(model),
        tokenizer=None,
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state={},
        model_state=model_state,
        optimizer_state=optimizer_state,
    )
    (directory / COMPLETE_MARKER).write_text(f"{int(step)}\n")


def staging_dir(output_dir, step: int, pid: int) -> Path:
    """Where checkpoint-<step> is assembled before its atomic rename (`pid`: the main process's)."""
    return Path(output_dir) / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{int(step)}-{int(pid)}"


def open_staging(output_dir, step: int) -> Path:
    """Create an empty staging dir that other ranks may write into (DeepSpeed's partitioned state)
    before the main process calls save_checkpoint(..., staged=it). Main process only."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(out)
    tmp = staging_dir(out, step, os.getpid())
    tmp.mkdir()
    return tmp


def save_checkpoint(
    output_dir,
    step: int,
    model,
    *,
    tokenizer=None,
    optimizer=None,
    scheduler=None,
    trainer_state: Optional[dict] = None,
    save_total_limit: Optional[int] = None,
    model_state: Optional[dict] = None,
    optimizer_state: Optional[dict] = None,
    staged: Optional[Path] = None,
    config: Optional[dict] = None,
) -> Path:
    """Write <output_dir>/checkpoint-<step>/ atomically, then prune to `save_total_limit`. Returns its path.

    Call on the main process only. Saving the same step twice replaces the earlier one.
    `model_state` / `optimizer_state`: full states gathered from a sharded model, saved instead of the
    live model's and optimizer's (which hold only this rank's shards).
    `staged`: the dir from open_staging, already holding files other ranks wrote; completed here.
    `config`: the run's resolved config, kept in the manifest (a resume compares it with its own).
    """
    out = Path(output_dir)
    final = out / f"{CHECKPOINT_PREFIX}{int(step)}"
    if staged is not None:
        tmp = Path(staged)
    else:
        out.mkdir(parents=True, exist_ok=True)
        _clean_stale_tmp(out)
        tmp = staging_dir(out, step, os.getpid())
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    try:
        _write_contents(
            tmp,
            step,
            _unwrap(model),
            tokenizer=tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_state=trainer_state or {},
            model_state=model_state,
            optimizer_state=optimizer_state,
        )
        write_manifest(tmp, step, config)
        _fsync_tree(tmp)  # data must be durable before the marker claims completeness
        with open(tmp / COMPLETE_MARKER, "w") as fh:
            fh.write(f"{int(step)}\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            _remove_dir(final)  # rename() cannot replace a non-empty directory
        os.replace(tmp, final)
        _fsync_dir(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _out_of_space(out, e)
        if full is not None:
            raise OSError(errno.ENOSPC, full) from e
        raise
    if save_total_limit is not None:
        _prune(out, save_total_limit, keep=final)
    return final


def _out_of_space(output_dir: Path, error: BaseException) -> Optional[str]:
    """A readable message when a save failed because the disk is full (torch's writer reports it as
    'basic_ios::clear: iostream error'), else None."""
    if not isinstance(error, (OSError, RuntimeError)):
        return None
    free = shutil.disk_usage(output_dir).free
    if not (getattr(error, "errno", None) == errno.ENOSPC or free < MIN_FREE_FOR_SAVE):
        return None
    return (
        f"no space left on device while saving a checkpoint in {output_dir} ({free / 2**20:.1f} MiB free; "
        f"{type(error).__name__}: {error}); the partial save was removed, the previous checkpoints are intact"
    )


def _complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for d in output_dir.iterdir():
        m = _CKPT_RE.match(d.name)
        if m and d.is_dir() and (d / COMPLETE_MARKER).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def _prune(output_dir: Path, limit: int, keep: Path) -> None:
    if limit < 1:
        raise ValueError(f"save_total_limit must be >= 1, got {limit}")
    ckpts = [p for _s, p in _complete_checkpoints(output_dir)]
    excess = len(ckpts) - limit
    for path in ckpts:
        if excess <= 0:
            break
        if path != keep:  # never delete the checkpoint just written
            _remove_dir(path)
            excess -= 1


# ----------------------------------------------------------------------------------
# manifest: sizes and checksums, verified on load
# ----------------------------------------------------------------------------------
def file_checksum(path: Path) -> str:
    """xxh3-128 of the file's bytes (fast: a checkpoint is read once more at save and at load)."""
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _listed_files(root: Path) -> list[Path]:
    """Every file under `root` but the manifest and the completion markers, in a stable order."""
    skip = {MANIFEST_FILE, COMPLETE_MARKER}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip)


def write_manifest(directory, step: int, config: Optional[dict] = None) -> None:
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "xxh3_128": file_checksum(p)}
        for p in _listed_files(directory)
    }
    payload = {"step": int(step), "files": files, "config": config}
    text = json.dumps(payload, indent=1, sort_keys=True, default=str, allow_nan=False)
    (directory / MANIFEST_FILE).write_text(text + "\n", encoding="utf-8")


def read_manifest(path) -> Optional[dict]:
    """The checkpoint's manifest (None for a checkpoint written before manifests existed)."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is damaged: not valid JSON ({e})") from None


def verify_checkpoint(path) -> None:
    """Raise CheckpointError naming the file that is missing, changed size or checksum, or the step that
    disagrees between the directory name, the manifest and trainer_state.json. A checkpoint without a manifest
    (older gspo) is accepted with a warning."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no '{COMPLETE_MARKER}' marker)")
    manifest = read_manifest(path)
    if manifest is None:
        log.warning("gspo: %s has no %s (written by an older gspo): its files are not verified", path, MANIFEST_FILE)
        return
    for name, want in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (the checkpoint's manifest lists it)")
        size = file.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{file} is {size} bytes, the manifest says {want['size']}: truncated or replaced")
        if file_checksum(file) != want["xxh3_128"]:
            raise CheckpointError(f"{file} has changed since it was saved: its checksum differs from the manifest's")
    _check_steps(path, int(manifest["step"]))


def _check_steps(path: Path, step: int) -> None:
    m = _CKPT_RE.match(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{path / MANIFEST_FILE} says step {step} but the directory is {path.name}")
    state_file = path / TRAINER_STATE_FILE
    if state_file.is_file():
        recorded = read_trainer_state(path).get("step")
        if recorded is not None and int(recorded) != step:
            raise CheckpointError(f"{state_file} says step {recorded} but the manifest says {step}")


def read_trainer_state(path) -> dict:
    file = Path(path) / TRAINER_STATE_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is damaged: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------
# find / resolve
# ----------------------------------------------------------------------------------
def find_latest_checkpoint(output_dir) -> Optional[Path]:
    """The complete checkpoint with the highest step in output_dir, or None."""
    ckpts = _complete_checkpoints(Path(output_dir))
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(output_dir, spec: str) -> Path:
    """'latest' -> newest complete checkpoint in output_dir; otherwise `spec` is a checkpoint path.

    A run directory (holding checkpoint-* dirs) is also accepted and resolves to its newest one.
    """
    if not spec or not str(spec).strip():
        raise ValueError("resume_from_checkpoint is empty: pass 'latest' or a checkpoint directory")
    if str(spec) == "latest":
        return _latest_verified(Path(output_dir))
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is a file; expected a {CHECKPOINT_PREFIX}<step> directory")
    if (path / COMPLETE_MARKER).is_file():
        verify_checkpoint(path)
        return path
    if find_latest_checkpoint(path) is not None:
        return _latest_verified(path)
    raise ValueError(
        f"{path} is not a complete checkpoint (no '{COMPLETE_MARKER}' marker: the save was "
        f"interrupted) and holds no complete {CHECKPOINT_PREFIX}<step> directory"
    )


def _latest_verified(output_dir: Path) -> Path:
    """The newest complete checkpoint that verifies; each newer one skipped is named with its reason."""
    found = _complete_checkpoints(output_dir)
    if not found:
        raise FileNotFoundError(
            f"resume_from_checkpoint='latest' but {output_dir} holds no complete {CHECKPOINT_PREFIX}<step> directory"
        )
    skipped = []
    for _step, path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            log.warning("gspo: skipping %s for resume: %s", path.name, e)
            skipped.append(f"{path.name}: {e}")
            continue
        return path
    raise CheckpointError(f"no checkpoint in {output_dir} verifies: " + "; ".join(skipped))


# ----------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------
def _load_safetensors_dir(path: Path, stem: str) -> dict:
    """Load `<stem>.safetensors`, or every shard listed in `<stem>.safetensors.index.json`."""
    single = path / f"{stem}.safetensors"
    if single.is_file():
        return _read_safetensors(single)
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(_read_safetensors(path / shard))
        return state
    raise FileNotFoundError(f"{path}: no {stem}.safetensors (or sharded index) to load weights from")


def _read_safetensors(file: Path) -> dict:
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError) for a damaged file
        raise CheckpointError(f"{file} cannot be read as safetensors: {e}") from e


def _torch_load(file: Path):
    """A state file, loaded safely (tensors and plain containers only); a damaged one is named."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle error, ...
        raise CheckpointError(f"{file} cannot be loaded ({type(e).__name__}: {e}): damaged or truncated") from e


def _tied_groups(model) -> dict[str, set[str]]:
    """name -> all names sharing its storage (tied embeddings etc.), from the live model."""
    by_ptr: dict[int, set[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        by_ptr.setdefault(t.data_ptr(), set()).add(name)
    return {name: group for group in by_ptr.values() for name in group}


def _load_plain_weights(path: Path, model) -> None:
    state = _load_safetensors_dir(path, "model")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{path}: checkpoint has weights the model lacks: {result.unexpected_keys[:10]}")
    # save_pretrained drops tied duplicates (e.g. lm_head.weight = embed_tokens.weight): a missing
    # key is fine only if a tensor sharing its storage was loaded.
    groups = _tied_groups(model)
    loaded = set(state)
    truly_missing = [k for k in result.missing_keys if not (groups.get(k, set()) & loaded)]
    # Non-persistent buffers (rotary inv_freq) are not in state_dict() at all, so they never show up here.
    if truly_missing:
        raise RuntimeError(f"{path}: checkpoint lacks weights of the model: {truly_missing[:10]}")


def _with_tied_duplicates(model, state: dict) -> dict:
    """Add the names save_pretrained dropped as tied duplicates (lm_head.weight = embed_tokens.weight)."""
    by_param: dict[int, list] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    for names in by_param.values():
        present = [n for n in names if n in state]
        for n in names:
            if n not in state and present:
                state[n] = state[present[0]]
    return state


def _load_peft_weights(path: Path, model) -> None:
    from peft import set_peft_model_state_dict

    state = _load_safetensors_dir(path, "adapter_model")
    adapter = getattr(model, "active_adapter", "default")
    adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or adapter in k]
    if unexpected:
        raise RuntimeError(f"{path}: adapter weights do not fit the model: {unexpected[:10]}")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{adapter}." in k]
    if missing:
        raise RuntimeError(f"{path}: adapter checkpoint lacks LoRA weights: {missing[:10]}")


def holds_adapter(path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _check_same_kind(path: Path, model) -> None:
    has_adapter = holds_adapter(path)
    if has_adapter != _is_peft(model):
        raise ValueError(
            f"{path} holds {'a LoRA adapter' if has_adapter else 'full model weights'} but the model "
            f"is {'not ' if has_adapter else ''}a peft model: resume with the same use_lora setting"
        )


def load_weights(path, model) -> None:
    """The checkpoint's weights into a whole `model` (plain or peft; wrappers unwrapped), in place."""
    path, model = Path(path), _unwrap(model)
    _check_same_kind(path, model)
    if _is_peft(model):
        _load_peft_weights(path, model)
    else:
        _load_plain_weights(path, model)


def read_full_model_state(path, model) -> dict:
    """The checkpoint's full state dict, with the tied duplicates save_pretrained dropped put back
    (for back-ends that set full tensors on shards)."""
    path = Path(path)
    _check_same_kind(path, _unwrap(model))
    return _with_tied_duplicates(model, _load_safetensors_dir(path, "model"))


def read_state_file(path, name: str, for_what: str = "") -> dict:
    """optimizer.pt / scheduler.pt, loaded safely (tensors and plain containers only)."""
    path = Path(path)
    if not (path / name).is_file():
        hint = (
            " (written by a DeepSpeed run: resume it under the same DeepSpeed launch)"
            if (path / "deepspeed").is_dir()
            else ""
        )
        raise FileNotFoundError(f"{path}: no {name} to restore {for_what or name} from{hint}")
    # map_location cpu: optimizers move their state to each parameter's device on load.
    return _torch_load(path / name)


def keyed_by_name(optimizer_state: dict) -> bool:
    """True for the by-parameter-name layout sharded runs write (torch's own uses indices)."""
    groups = optimizer_state.get("param_groups") or [{}]
    return any(isinstance(k, str) for g in groups for k in g.get("params", []))


def load_checkpoint(path, model=None, optimizer=None, scheduler=None, *, restore_rng: bool = True) -> dict:
    """Restore a whole model's weights (in place), optimizer, scheduler and RNG; return trainer_state.

    Any of model / optimizer / scheduler may be None (not restored). A sharded model is restored by
    its back-end (TrainedModel.load_checkpoint), which then calls this with model=None.
    """
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (missing '{COMPLETE_MARKER}' marker)")
    if model is not None:
        load_weights(path, model)
    if optimizer is not None:
        state = read_state_file(path, OPTIMIZER_FILE, type(optimizer).__name__)
        if keyed_by_name(state):
            raise ValueError(
                f"{path}: the optimizer state is keyed by parameter name (a sharded run wrote it); "
                f"resume it through GSPOTrainer(resume_from_checkpoint=...), whose back-end reads it"
            )
        optimizer.load_state_dict(state)
    if scheduler is not None:
        scheduler.load_state_dict(read_state_file(path, SCHEDULER_FILE, type(scheduler).__name__))
    if restore_rng and (path / RNG_FILE).is_file():
        set_rng_state(_torch_load(path / RNG_FILE))
    return read_trainer_state(path)


# ----------------------------------------------------------------------------------
# final model
# ----------------------------------------------------------------------------------
# Files a previous export may have left that would change how the directory loads
# (e.g. a stale adapter_config.json makes from_pretrained treat it as an adapter).
_MODEL_FILE_PATTERNS = (
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "pytorch_model*.bin",
)


def save_final_model(model, tokenizer, output_dir, merge_lora: bool = False, state_dict: Optional[dict] = None) -> Path:
    """Save the model (safetensors) and tokenizer into output_dir; returns output_dir.

    A PeftModel is saved as its adapter, or with merge_lora=True merged into the base
    weights (this modifies the model in place, so call it at the very end). Files are
    written to a temp dir first and then moved in, config files last, so a crash never
    leaves a config pointing at missing weights.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _unwrap(model)
    if _is_peft(model) and merge_lora:
        model = model.merge_and_unload()
    tmp = out / f"{TMP_PREFIX}final-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _save_weights(model, tmp, state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _fsync_tree(tmp)
        for pattern in _MODEL_FILE_PATTERNS:
            for stale in out.glob(pattern):
                if not (tmp / stale.name).exists():
                    stale.unlink()
        names = sorted(os.listdir(tmp), key=lambda n: n.endswith("config.json"))  # configs last
        for name in names:
            dest = out / name
            if dest.is_dir() and not (tmp / name).is_file():
                shutil.rmtree(dest)
            os.replace(tmp / name, dest)
        _fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
