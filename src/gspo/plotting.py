"""Training curves from metrics.jsonl as one PNG (matplotlib, Agg backend: no display needed).

Panels (each drawn only when its metrics were logged): reward with a ±std band and eval
points, KL divergence with the adaptive KL coefficient on a twin axis, clip fractions,
completion length with the truncated fraction on a twin axis, entropy, policy loss.
Noisy series are drawn as faint raw points plus an exponential moving average.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, MaxNLocator  # noqa: E402

from gspo.metrics_file import METRICS_FILE, read_metrics  # noqa: E402

PLOT_FILE = "training_curves.png"


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, skipping rows without it and null (non-finite) values."""
    steps, values = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(int(row["step"]))
            values.append(float(v))
    return steps, values


def ema(values: list[float], n_points: Optional[int] = None) -> list[float]:
    """Exponential moving average with a span of ~5% of the run (at least 1 point), bias-corrected.

    Bias correction (as in Adam) keeps the first points from being dragged towards zero.
    """
    n = len(values) if n_points is None else n_points
    span = max(1.0, n / 20)
    alpha = 2.0 / (span + 1.0)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _noisy_line(ax, rows, key, label, color) -> bool:
    """Faint raw values plus a bold EMA; returns False when the key was never logged."""
    steps, values = _series(rows, key)
    if not steps:
        return False
    smooth = len(values) >= 10  # smoothing a handful of points only hides them
    ax.plot(
        steps,
        values,
        color=color,
        alpha=0.3 if smooth else 0.9,
        lw=1,
        marker="o" if len(values) < 30 else None,
        ms=3,
        label=None if smooth else label,
    )
    if smooth:
        ax.plot(steps, ema(values), color=color, lw=2, label=f"{label} (EMA)")
    return True


def _panel_reward(ax, rows) -> bool:
    steps, mean = _series(rows, "raw_reward_mean")
    drawn = _noisy_line(ax, rows, "raw_reward_mean", "train reward", "tab:blue")
    std_rows = [r for r in rows if "raw_reward_std" in r and "raw_reward_mean" in r]
    s_steps, std = _series(std_rows, "raw_reward_std")
    by_step = dict(zip(steps, mean))
    pairs = [(s, by_step[s], d) for s, d in zip(s_steps, std) if s in by_step]
    if pairs:
        xs, ms, ds = zip(*pairs)
        ax.fill_between(
            xs,
            [m - d for m, d in zip(ms, ds)],
            [m + d for m, d in zip(ms, ds)],
            color="tab:blue",
            alpha=0.12,
            lw=0,
            label="± std (within batch)",
        )
    for key, label, color in (("eval/reward_mean", "eval reward", "tab:red"),):
        e_steps, e_vals = _series(rows, key)
        if e_steps:
            ax.plot(e_steps, e_vals, "s--", color=color, ms=5, lw=1, label=label)
            drawn = True
    ax.set_ylabel("reward")
    a_steps, acc = _series(rows, "eval/accuracy")
    if a_steps:
        twin = ax.twinx()
        twin.plot(a_steps, acc, "D-", color="tab:green", ms=5, lw=1.2, label="eval accuracy")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("eval accuracy", color="tab:green")
        _merge_legends(ax, twin)
        return True
    if drawn:
        ax.legend(loc="best", fontsize=8)
    return drawn


def _merge_legends(ax, twin) -> None:
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)


def _panel_with_twin(ax, rows, main, twin_spec, ylabel) -> bool:
    """Main noisy series on the left axis, a secondary series (key, label, color) on the right."""
    drawn = _noisy_line(ax, rows, main[0], main[1], main[2])
    t_steps, t_vals = _series(rows, twin_spec[0])
    if t_steps:
        twin = ax.twinx()
        twin.plot(t_steps, t_vals, color=twin_spec[2], lw=1.5, ls="--", label=twin_spec[1])
        twin.set_ylabel(twin_spec[1], color=twin_spec[2])
        twin.tick_params(axis="y", colors=twin_spec[2])
        _merge_legends(ax, twin)
    elif drawn:
        ax.legend(loc="best", fontsize=8)
    ax.set_ylabel(ylabel)
    return drawn or bool(t_steps)


def _panel_lines(ax, rows, specs, ylabel) -> bool:
    drawn = [_noisy_line(ax, rows, key, label, color) for key, label, color in specs]
    if any(drawn):
        ax.legend(loc="best", fontsize=8)
    ax.set_ylabel(ylabel)
    return any(drawn)


# (title, needed keys (any), draw function)
_PANELS = [
    ("Reward", ("raw_reward_mean", "eval/reward_mean", "eval/accuracy"), _panel_reward),
    (
        "KL to reference",
        ("kl_divergence", "kl_coef"),
        lambda ax, rows: _panel_with_twin(
            ax, rows, ("kl_divergence", "KL divergence", "tab:purple"), ("kl_coef", "KL coef", "tab:gray"), "KL"
        ),
    ),
    (
        "Clipped fraction",
        ("clip_fraction_seq", "clip_fraction_token"),
        lambda ax, rows: _panel_lines(
            ax,
            rows,
            [
                ("clip_fraction_seq", "sequences clipped", "tab:orange"),
                ("clip_fraction_token", "tokens clipped", "tab:brown"),
            ],
            "fraction",
        ),
    ),
    (
        "Completion length",
        ("completion_length_mean", "truncated_fraction"),
        lambda ax, rows: _panel_with_twin(
            ax,
            rows,
            ("completion_length_mean", "mean length", "tab:cyan"),
            ("truncated_fraction", "truncated fraction", "tab:red"),
            "tokens",
        ),
    ),
    (
        "Entropy",
        ("entropy",),
        lambda ax, rows: _panel_lines(ax, rows, [("entropy", "entropy (nats/token)", "tab:olive")], "nats"),
    ),
    (
        "Policy loss",
        ("policy_loss",),
        lambda ax, rows: _panel_lines(ax, rows, [("policy_loss", "policy loss", "tab:pink")], "loss"),
    ),
    (  # only for multi-turn episodes (tools or an environment)
        "Turns and tool use",
        ("episode/turns_mean", "tools/calls_per_episode"),
        lambda ax, rows: _panel_with_twin(
            ax,
            rows,
            ("episode/turns_mean", "model turns per episode", "tab:blue"),
            ("tools/episodes_with_calls", "episodes with a tool call", "tab:green"),
            "turns",
        ),
    ),
    (  # only with a critic (advantage_estimator='gae')
        "Critic",
        ("value_loss", "explained_variance"),
        lambda ax, rows: _panel_with_twin(
            ax,
            rows,
            ("value_loss", "value loss", "tab:blue"),
            ("explained_variance", "explained variance", "tab:green"),
            "loss",
        ),
    ),
]


def panel_titles(rows: list[dict]) -> list[str]:
    """The panels a run's metrics give (a 'Critic' panel only when a critic logged its values, 'Turns and tool
    use' only for multi-turn episodes)."""
    return [title for title, keys, _ in _PANELS if any(_series(rows, k)[0] for k in keys)]


def plot_run(run_dir_or_metrics_file, out_png=None) -> Path:
    """Plot the curves of a run into a PNG; default <run_dir>/training_curves.png. Returns the path."""
    src = Path(run_dir_or_metrics_file)
    run_dir = src if src.is_dir() else src.parent
    rows = read_metrics(src if src.is_file() else run_dir / METRICS_FILE)
    out = Path(out_png) if out_png is not None else run_dir / PLOT_FILE
    panels = [p for p in _PANELS if any(_series(rows, k)[0] for k in p[1])]
    if not panels:
        raise ValueError(
            f"{src}: none of the plotted metrics were logged "
            f"(expected e.g. raw_reward_mean, kl_divergence, policy_loss)"
        )
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.6 * nrows), squeeze=False)
    try:
        for ax, (title, _keys, draw) in zip(axes.flat, panels):
            draw(ax, rows)
            ax.set_title(title, fontsize=11, fontweight="bold")
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        for ax in fig.axes:  # twins included
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
            # No "1e-5+2e-1" offset labels: a nearly constant KL coef must still read as its value;
            # "%.3g" keeps tiny values (an on-policy loss of ~1e-9) readable instead of 0.000000000.
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        last = max(int(r["step"]) for r in rows)
        fig.suptitle(f"GSPO training — {run_dir.name} ({last} steps)", fontsize=13)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp.png")  # atomic: a viewer never sees half a PNG
        fig.savefig(tmp, dpi=110)
        tmp.replace(out)
    finally:
        plt.close(fig)  # long-lived trainers call this repeatedly; do not leak figures
    return out


_COMPARE_COLORS = {"gspo": "tab:blue", "grpo": "tab:orange", "ppo": "tab:green", "vapo": "tab:red"}


def _aligned(runs: list, key: str, x: str, smooth: bool):
    """(x of the first seed, mean, min, max over seeds) of `key`; x is 'step' or cumulative step time."""
    curves = []
    for r in runs:
        rows = [m for m in r["rows"] if isinstance(m.get(key), (int, float))]
        clock, t = {}, 0.0
        for m in r["rows"]:
            t += float(m.get("step_time_s", 0.0))
            clock[m["step"]] = t
        xs = [m["step"] if x == "step" else clock[m["step"]] for m in rows]
        ys = [float(m[key]) for m in rows]
        curves.append((xs, ema(ys) if smooth and len(ys) >= 10 else ys))
    n = min(len(c[1]) for c in curves)
    if n == 0:
        return None
    cols = list(zip(*(c[1][:n] for c in curves)))
    xs = [sum(c[0][i] for c in curves) / len(curves) for i in range(n)]  # wall times differ a little by seed
    return xs, [sum(v) / len(v) for v in cols], [min(v) for v in cols], [max(v) for v in cols]


def plot_compare(runs: dict, out_png) -> Path:
    """compare.png: training reward (EMA) and eval accuracy against step and against training wall time, one
    colour per algorithm, the line the mean over seeds and the band their range. `runs`: algorithm -> runs."""
    out = Path(out_png)
    panels = [
        ("raw_reward_mean", "step", "training reward (EMA) by step"),
        ("eval/accuracy", "step", "eval accuracy (greedy) by step"),
        ("raw_reward_mean", "time", "training reward (EMA) by wall time"),
        ("eval/accuracy", "time", "eval accuracy (greedy) by wall time"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), squeeze=False)
    try:
        for ax, (key, x, title) in zip(axes.flat, panels):
            for i, (name, seeds) in enumerate(runs.items()):
                line = _aligned(seeds, key, x, smooth=key == "raw_reward_mean")
                if line is None:
                    continue
                xs, mean, low, high = line
                color = _COMPARE_COLORS.get(name, f"C{i}")
                ax.plot(xs, mean, color=color, linewidth=2, marker="o" if key.startswith("eval") else None, label=name)
                if len(seeds) > 1:
                    ax.fill_between(xs, low, high, color=color, alpha=0.18, linewidth=0)
            ax.set_title(title, fontsize=11, fontweight="bold")
            ax.set_xlabel("step" if x == "step" else "training wall time (s)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=9)
        n_seeds = max(len(s) for s in runs.values())
        band = f"; bands: range over {n_seeds} seeds" if n_seeds > 1 else ""
        fig.suptitle(f"gspo compare: {', '.join(runs)} (line: mean over seeds{band})", fontsize=13)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        tmp.replace(out)
    finally:
        plt.close(fig)
    return out
