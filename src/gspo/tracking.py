"""Metric sinks (metrics.jsonl, TensorBoard, Weights & Biases), progress display and sample tables.

Everything here is safe to construct on every process: with `enabled=False` (non-main
ranks) each method does nothing, so the trainer needs no `if is_main_process` around calls.

metrics.jsonl is the source of truth: one JSON object per line, `{"step": int, **metrics}`,
flushed after every line so a killed run keeps every step it finished. Non-finite values
(NaN/inf) are written as `null`, because bare `NaN` is not valid JSON and breaks strict
readers (jq, browsers); `read_metrics` and `plot_run` treat `null` as a missing point.

The run config goes to `<output_dir>/gspo_config.json`, not `config.json`: the final model
is saved into the same output_dir and `save_pretrained` writes the model's own config.json
there, which must stay loadable by `AutoModelForCausalLM.from_pretrained(output_dir)`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

from gspo.metrics_file import METRICS_FILE, read_metrics

CONFIG_FILE = "gspo_config.json"
TENSORBOARD_DIR = "runs"


def _to_python(value: Any) -> Any:
    """A metric value (python number, bool, 0-d tensor, numpy scalar, str) -> JSON-ready value."""
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # a multi-element tensor is not a scalar metric
            raise TypeError(
                f"metric value must be a scalar, got {type(value).__name__} with shape "
                f"{tuple(getattr(value, 'shape', ()))}"
            ) from None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"metric value of type {type(value).__name__} is not a number or a string")


def _json_default(obj: Any) -> Any:
    """Best effort for config dicts: callables or paths become their repr rather than failing the run."""
    return str(obj)


class MetricsLogger:
    """Append metrics to metrics.jsonl and optionally TensorBoard / wandb.

    resume=False starts metrics.jsonl afresh (a new run in a reused output_dir must not mix
    its steps with the old run's); resume=True keeps the file, and the trainer calls
    `truncate_after(resume_step)` to drop steps the resumed run will redo.
    """

    def __init__(
        self,
        output_dir: str,
        report_to: Iterable[str],
        config: Optional[dict] = None,
        enabled: bool = True,
        resume: bool = False,
    ) -> None:
        self.enabled = enabled
        self._fh = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        self.report_to = set(report_to or ())
        if config is not None:
            _write_json_atomic(self.output_dir / CONFIG_FILE, config)
        self._fh = open(self.path, "a" if resume else "w", encoding="utf-8")
        if "tensorboard" in self.report_to:
            self._tb = self._open_tensorboard()
        if "wandb" in self.report_to:
            self._wandb = self._open_wandb(config)

    def _open_tensorboard(self, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: pulls in tensorboard

        return SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def _open_wandb(self, config: Optional[dict]):
        try:
            import wandb
        except ImportError:
            warnings.warn(
                "report_to includes 'wandb' but wandb is not installed (pip install wandb); "
                "metrics still go to metrics.jsonl",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        # Round-trip through JSON so wandb gets plain values, the same ones as gspo_config.json.
        cfg = json.loads(json.dumps(config, default=_json_default)) if config is not None else None
        return wandb.init(config=cfg, dir=str(self.output_dir))

    def log(self, step: int, metrics: dict) -> None:
        """Write one line {"step": step, **metrics} and forward numeric values to the other sinks."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        non_finite = []  # keys whose NaN/inf is written as null: the row says so, a null alone could be "missing"
        for key, value in metrics.items():
            if key != "step":  # the argument is authoritative; a float "step" metric must not replace it
                row[str(key)] = _to_python(value)
                if row[str(key)] is None and value is not None:  # _to_python gives None only for NaN/inf then
                    non_finite.append(str(key))
        if non_finite:
            row["non_finite"] = non_finite
        # the whole line in one write, then flushed: a SIGKILL leaves either the line or a torn last line
        # without its newline (which read_metrics drops with a warning), never half a row mid-file
        line = json.dumps(row, allow_nan=False) + "\n"
        self._fh.write(line)
        self._fh.flush()  # a SIGKILL after this line still leaves the line on disk (OS buffers)
        numeric = {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, global_step=int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))

    def truncate_after(self, step: int) -> None:
        """Drop lines with step > `step` (a resumed run redoes those steps), atomically. A torn last line (the
        previous run was killed while writing it) is dropped with a warning (read_metrics); a damaged line
        elsewhere raises ValueError, before anything is rewritten."""
        if not self.enabled:
            return
        self._fh.flush()
        rows = [r for r in read_metrics(self.path) if int(r["step"]) <= step] if self.path.exists() else []
        self._fh.close()
        tmp = self.path.with_name(f".{METRICS_FILE}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")  # the rows as read (an old file may hold a bare NaN)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        if self._tb is not None:
            # TensorBoard hides events at or after purge_step written by earlier writers.
            self._tb.close()
            self._tb = self._open_tensorboard(purge_step=step + 1)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._fh is not None and not self._fh.closed:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=_json_default)
        fh.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------
# Progress display
# ----------------------------------------------------------------------------------
def _fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt_num(value: Any, spec: str) -> str:
    try:
        value = _to_python(value)
    except TypeError:
        return "-"
    return format(value, spec) if isinstance(value, float) else "-"


class Progress:
    """A rich progress bar on a terminal; a compact printed line every `print_every` steps otherwise.

    The ETA uses wall-clock time per step measured since this Progress started (so the time
    a resumed run spent loading is not extrapolated over the steps already done elsewhere).
    """

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True, print_every: int = 1) -> None:
        self.enabled = enabled
        self.total = int(total_steps)
        self.initial_step = int(initial_step)
        self.print_every = max(1, int(print_every))
        self._start = time.monotonic()
        self._bar = None
        if not enabled:
            return
        if sys.stdout.isatty():
            self._bar, self._task = self._make_bar()

    def _make_bar(self):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        bar = RichProgress(
            TextColumn("[bold]GSPO"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("reward {task.fields[reward]}"),
            TextColumn("KL {task.fields[kl]}"),
            TextColumn("{task.fields[step_time]}/step"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        task = bar.add_task("train", total=self.total, completed=self.initial_step, reward="-", kl="-", step_time="-")
        bar.start()
        return bar, task

    def _eta(self, step: int) -> Optional[float]:
        done = step - self.initial_step
        if done <= 0:
            return None
        return (time.monotonic() - self._start) / done * max(self.total - step, 0)

    def update(self, step: int, metrics: dict) -> None:
        """Show progress at `step`; reads raw_reward_mean, kl_divergence and step_time_s when present."""
        if not self.enabled:
            return
        reward = _fmt_num(metrics.get("raw_reward_mean"), ".3f")
        kl = _fmt_num(metrics.get("kl_divergence"), ".2e")
        step_time = _fmt_num(metrics.get("step_time_s"), ".2f")
        step_time = step_time + "s" if step_time != "-" else step_time
        if self._bar is not None:
            self._bar.update(self._task, completed=step, reward=reward, kl=kl, step_time=step_time)
            return
        if step % self.print_every == 0 or step >= self.total:
            print(
                f"[gspo] step {step}/{self.total} | reward {reward} | kl {kl} | "
                f"{step_time}/step | eta {_fmt_duration(self._eta(step))}",
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _clip_text(text: str, limit: int) -> str:
    text = str(text).replace("\r", "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_turn(conversation: list) -> int:
    """Index of an episode's first assistant message (what came before it is the prompt)."""
    return next((i for i, m in enumerate(conversation) if m.get("role") == "assistant"), len(conversation))


def print_samples(step: int, rows: list[dict], *, max_rows: int = 4, max_chars: int = 600) -> None:
    """A table of sampled completions, one per distinct prompt (the first `max_rows` groups): the last user
    message, the whole completion wrapped (up to `max_chars`; an episode's turns with their roles), the total
    reward and each function's. `rows` are completion records (gspo.completions.completion_rows).

    Cells are rich `Text` objects, not markup strings, so a completion containing
    "[bold]" or "[/]" is shown literally instead of being interpreted (or crashing rich).
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"Samples at step {step}", show_lines=True, expand=True)
    table.add_column("prompt (last user message)", overflow="fold", ratio=2)
    table.add_column("completion", overflow="fold", ratio=4)
    table.add_column("reward", no_wrap=True)
    seen: set = set()
    for row in rows:
        key = (row.get("rank", 0), row["group"])
        if key in seen:
            continue
        seen.add(key)
        if row.get("messages"):  # an episode: its turns after the prompt, one line each, with their roles
            turns = json.loads(row["messages"])
            turns = turns[first_turn(turns) :]
            completion = "\n".join(f"{m['role']}: {_clip_text(m.get('content'), max_chars)}" for m in turns)
        else:
            completion = _clip_text(row["completion"], max_chars)
        rewards = (
            [f"total {_fmt_num(row['reward'], '.3f')}"]
            + (["TRUNCATED"] if row.get("truncated") else [])
            + [f"{k[len('reward/') :]} {_fmt_num(v, '.3f')}" for k, v in row.items() if k.startswith("reward/")]
        )
        table.add_row(Text(_clip_text(row["last_user"], max_chars)), Text(completion), Text("\n".join(rewards)))
        if len(seen) >= max_rows:
            break
    Console().print(table)


def step_metrics(
    rollout,
    update: dict,
    timings: dict,
    *,
    accelerator,
    group_size: int,
    kl_coef: float,
    learning_rate: float,
    skipped_updates: int,
) -> dict:
    """A step's metrics over all ranks: rollout statistics gathered, the learner's (global) stats, phase times."""
    import torch

    from gspo.core import zero_std_groups

    acc = accelerator
    gather = lambda t: acc.gather(t.float().to(acc.device)).cpu()  # noqa: E731  equal sizes on every rank
    adv = rollout.advantages
    if adv.dim() == 2:  # per-token (GAE): one mean per sequence, since completion widths differ across ranks
        mask = rollout.loss_mask.to(adv.dtype)
        adv = (adv * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    rewards, adv = gather(rollout.rewards), gather(adv)
    lengths, truncated = gather(rollout.lengths), gather(rollout.truncated)  # all completion tokens
    metrics = {
        "raw_reward_mean": rewards.mean().item(),
        "raw_reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "relative_advantage_std": adv.std().item() if adv.numel() > 1 else 0.0,
        "frac_reward_zero_std": zero_std_groups(rewards, group_size).float().mean().item(),
        "completion_length_mean": lengths.mean().item(),
        "completion_length_max": lengths.max().item(),
        "truncated_fraction": truncated.mean().item(),
        "kl_coef": kl_coef,
        "learning_rate": learning_rate,
        "skipped_updates": float(skipped_updates),
        "reward_penalized": acc.reduce(torch.tensor(float(rollout.num_penalized), device=acc.device), "sum").item(),
    }
    for name, values in rollout.reward_per_func.items():
        values = gather(torch.as_tensor(values))  # NaN where the function had no opinion (None)
        metrics[f"reward/{name}_mean"] = values.nanmean().item()
        if values.isnan().any():
            metrics[f"reward/{name}_none_fraction"] = values.isnan().float().mean().item()
    if rollout.episode_stats:  # multi-turn episodes
        metrics.update(episode_metrics(rollout, gather))
    metrics.update(update)  # the learner's stats: already the same on every rank
    metrics.update({f"time/{k}_s": v for k, v in timings.items()})
    metrics["tokens_per_s"] = lengths.sum().item() / max(sum(timings.values()), 1e-9)
    return metrics


def episode_metrics(rollout, gather) -> dict:
    """Turns, tokens and tool use of a batch of multi-turn episodes (gather: every rank's rows)."""
    stats = {k: gather(v) for k, v in rollout.episode_stats.items()}
    calls = stats["tool_calls"].sum().item()
    return {  # token counts as sampled and inserted (the loss mask may have dropped a truncated episode since)
        "episode/turns_mean": stats["turns"].mean().item(),
        "episode/turns_max": stats["turns"].max().item(),
        "episode/model_tokens_mean": stats["model_tokens"].mean().item(),
        "episode/env_tokens_mean": stats["inserted_tokens"].mean().item(),
        "episode/truncated_fraction": gather(rollout.truncated).mean().item(),
        "tools/calls_per_episode": stats["tool_calls"].mean().item(),
        "tools/failure_fraction": stats["tool_failures"].sum().item() / calls if calls else 0.0,
        "tools/episodes_with_calls": (stats["tool_calls"] > 0).float().mean().item(),
    }


def write_run_summary(config, *, steps: int, history: list) -> None:
    """<output_dir>/train_summary.json at the end of a run (main process), and training_curves.png when
    config.plot_curves is on."""
    out = Path(config.output_dir)
    final = dict(history[-1]) if history else {}
    # strict JSON: a NaN/inf final metric is written as null and its key listed in "non_finite"
    non_finite = [k for k, v in final.items() if isinstance(v, float) and not math.isfinite(v)]
    final.update(dict.fromkeys(non_finite))
    summary = {
        "steps": steps,
        "final_metrics": final,
        "non_finite": non_finite,
        "clip_range_low": config.clip_low,
        "clip_range_high": config.clip_high,
    }
    path = out / "train_summary.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, allow_nan=False))
    os.replace(tmp, path)  # a run whose summary exists counts as finished (gspo compare): never half a file
    if not config.plot_curves:
        return
    try:
        from gspo.plotting import plot_run

        plot_run(out)
    except Exception as exc:  # a plot must never cost the user a finished run
        import logging

        logging.getLogger("gspo").warning("gspo: could not plot the training curves: %s", exc)


@contextlib.contextmanager
def timed(timings: dict, name: str):
    """Add the wall seconds of the block to timings[name] (after the GPU's queued work, when there is a GPU): a
    phase run several times in a step (dynamic sampling's rounds) adds up."""
    import torch

    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def record_step(metrics: dict, rollout, *, tracker, progress, config, main, completions=None) -> None:
    """Log a finished step: metrics.jsonl / trackers, the progress line, the completions record (every rank takes
    part: the rows are gathered), and every log_completions_steps a table of sampled completions (main process;
    `main` is the accelerator)."""
    from gspo.completions import completion_rows, gathered_rows

    step = metrics["step"]
    tracker.log(step, metrics)
    progress.update(step, metrics)
    rows = None
    if config.log_completions and config.log_completions_max_per_step:
        rows = gathered_rows(rollout, step, limit=config.log_completions_max_per_step, accelerator=main)
        if completions is not None:
            completions.add(step, rows)
    if main.is_main_process and config.log_completions_steps and step % config.log_completions_steps == 0:
        rows = rows if rows is not None else completion_rows(rollout, step)
        print_samples(step, rows, max_chars=config.samples_max_chars)
