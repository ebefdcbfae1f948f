"""Training curves from metrics.jsonl as one PNG (matplotlib, Agg backend: no display needed).

Panels (each drawn only when its metrics were logged): reward with a ±std band and eval
points, one panel per reward function (reward/<name>_mean, with eval/reward/<name>_mean points),
the share of groups whose rewards are all equal (frac_reward_zero_std: no learning signal),
KL divergence with the adaptive KL coefficient on a twin axis, clip fractions,
completion length with the truncated fraction on a twin axis, entropy, policy loss.
Noisy series are drawn as faint raw points plus an exponential moving average.
Legends sit below their axes so that they never hide a curve.
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import Formatter, MaxNLocator  # noqa: E402
from matplotlib.transforms import ScaledTranslation  # noqa: E402

from gspo.metrics_file import METRICS_FILE, read_metrics  # noqa: E402

PLOT_FILE = "training_curves.png"
_REWARD_FUNC_KEY = re.compile(r"^(?:eval/)?reward/(.+)_mean$")  # reward/<name>_mean, eval/reward/<name>_mean


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


def _tick_labels(values: list[float], decimals: int) -> list[str]:
    """Fixed-point labels with `decimals` decimals from 1e-4 to 1e6 (steps read 1000, not 1e+03), else
    `decimals + 1` significant digits with an exponent (an on-policy loss of ~1e-9 stays readable)."""
    top = max((abs(v) for v in values), default=0.0)
    if 1e-4 <= top < 1e6:
        return [f"{v:.{decimals}f}" for v in values]
    return ["0" if v == 0 else f"{v:.{decimals + 1}g}" for v in values]


class _DistinctFormatter(Formatter):
    """Tick labels with the fewest decimals that still tell every tick of the axis apart, the same for all.

    A fixed "%.3g" read "7.6" on every tick of a nearly constant entropy (7.6012..7.6049), and matplotlib's
    offset notation ("1e-5+2e-1") hides the value itself; this gives 7.6015, 7.6020, 7.6025 instead.
    """

    decimals = 3
    zero_below = 0.0  # a tick at 1e-17 where the locator meant 0 (float round-off) reads "0", not "-0.00"
    locs_top = 1.0  # the largest tick, |.|: picks fixed-point or exponent for the whole axis

    def set_locs(self, locs):
        super().set_locs(locs)
        values = sorted(float(v) for v in locs)
        gaps = [b - a for a, b in zip(values, values[1:]) if b > a]
        self.zero_below = min(gaps) * 1e-9 if gaps else 0.0
        values = [self._snap(v) for v in values]
        self.locs_top = max((abs(v) for v in values), default=1.0)
        tolerance = min(gaps) * 1e-3 if gaps else self.locs_top * 1e-6
        for decimals in range(0, 17):  # the first that is exact (to 1/1000 of a tick step) and distinct
            labels = _tick_labels(values, decimals)
            if len(set(labels)) == len(labels) and all(abs(float(t) - v) <= tolerance for t, v in zip(labels, values)):
                break
        self.decimals = decimals

    def _snap(self, value: float) -> float:
        return 0.0 if abs(value) <= self.zero_below else value  # <=: -0.0 too

    def __call__(self, x, pos=None):
        return _tick_labels([self._snap(float(x)), self.locs_top], self.decimals)[0]


def _readable_ticks(fig, integer_x: bool) -> None:
    """Distinct tick labels on every axis of every panel, twin axes included."""
    for ax in fig.axes:
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.xaxis.set_major_formatter(_DistinctFormatter())
        ax.yaxis.set_major_formatter(_DistinctFormatter())


_LEGEND_DROP_IN = 0.5  # inches from the axes' bottom edge to the legend: clears the x tick labels and x label


def _legend(ax, handles=None, labels=None) -> None:
    """Legend below the axes, outside the plotting area: loc="best" inside still covered curves that span the
    panel. The drop is in inches so that it clears the x label whatever the panel's height."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    drop = ScaledTranslation(0, -_LEGEND_DROP_IN, ax.figure.dpi_scale_trans)
    ax.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        bbox_transform=ax.transAxes + drop,
        ncol=min(len(labels), 3),
        fontsize=8,
        frameon=False,
    )


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
        _legend(ax)
    return drawn


def _reward_func_names(rows: list[dict]) -> list[str]:
    """Reward function names in logging order, from reward/<name>_mean and eval/reward/<name>_mean keys that
    hold a number at least once (as for the other panels, a key only ever logged as null draws nothing)."""
    names: list[str] = []
    for row in rows:
        for key in row:
            match = _REWARD_FUNC_KEY.match(key)
            if match and match.group(1) not in names and _series([row], key)[0]:
                names.append(match.group(1))
    return names


def _panel_reward_func(ax, rows, name: str) -> bool:
    """One reward function's mean: shows which part of the total reward moves, and which is stuck."""
    drawn = _noisy_line(ax, rows, f"reward/{name}_mean", "train", "tab:blue")
    e_steps, e_vals = _series(rows, f"eval/reward/{name}_mean")
    if e_steps:
        ax.plot(e_steps, e_vals, "s--", color="tab:red", ms=5, lw=1, label="eval")
    ax.set_ylabel("reward")
    _legend(ax)
    return drawn or bool(e_steps)


def _panel_zero_std(ax, rows) -> bool:
    """Share of groups whose rewards are all equal: their advantages are zero, so they teach nothing."""
    drawn = _noisy_line(ax, rows, "frac_reward_zero_std", "frac_reward_zero_std", "tab:gray")
    ax.set_ylim(-0.02, 1.02)  # a share: the full range, so 0.9 looks as bad as it is
    ax.set_ylabel("fraction of groups")
    _legend(ax)
    return drawn


def _merge_legends(ax, twin) -> None:
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    _legend(ax, h1 + h2, l1 + l2)


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
        _legend(ax)
    ax.set_ylabel(ylabel)
    return drawn or bool(t_steps)


def _panel_lines(ax, rows, specs, ylabel) -> bool:
    drawn = [_noisy_line(ax, rows, key, label, color) for key, label, color in specs]
    if any(drawn):
        _legend(ax)
    ax.set_ylabel(ylabel)
    return any(drawn)


ZERO_STD_TITLE = "Groups with all-equal rewards"

# (title, needed keys (any), draw function); the "reward: <name>" panels follow "Reward" (see _panels)
_PANELS = [
    ("Reward", ("raw_reward_mean", "eval/reward_mean", "eval/accuracy"), _panel_reward),
    (ZERO_STD_TITLE, ("frac_reward_zero_std",), _panel_zero_std),
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


def _panels(rows: list[dict]) -> list[tuple]:
    """(title, draw(ax, rows)) of the panels the rows give; each reward function's panel right after the total
    reward it is part of."""
    panels = []
    for title, keys, draw in _PANELS:
        if any(_series(rows, k)[0] for k in keys):
            panels.append((title, draw))
        if title == "Reward":
            panels += [(f"reward: {n}", partial(_panel_reward_func, name=n)) for n in _reward_func_names(rows)]
    return panels


def panel_titles(rows: list[dict]) -> list[str]:
    """The panels a run's metrics give (a 'Critic' panel only when a critic logged its values, 'Turns and tool
    use' only for multi-turn episodes, 'reward: <name>' per reward function)."""
    return [title for title, _ in _panels(rows)]


def _figure(rows: list[dict], run_name: str):
    """The laid-out training-curves figure; the caller saves and closes it (tests read its axes)."""
    panels = _panels(rows)
    ncols = 2 if len(panels) > 1 else 1
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
    try:
        for ax, (title, draw) in zip(axes.flat, panels):
            draw(ax, rows)
            ax.set_title(title, fontsize=11, fontweight="bold")
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        _readable_ticks(fig, integer_x=True)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        last = max(int(r["step"]) for r in rows)
        # y in inches from the top: tight_layout keeps room for a suptitle at the top edge, and the default y=0.98
        # of a tall figure (many reward functions) sits low enough to overlap the first row
        top = 1 - 0.2 / fig.get_figheight()
        fig.suptitle(f"GSPO training — {run_name} ({last} steps)", fontsize=13, y=top)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)  # plot_run closes only a figure it got back
        raise
    return fig


def _save(fig, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")  # atomic: a viewer never sees half a PNG
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)


def plot_run(run_dir_or_metrics_file, out_png=None) -> Path:
    """Plot the curves of a run into a PNG; default <run_dir>/training_curves.png. Returns the path."""
    src = Path(run_dir_or_metrics_file)
    run_dir = src if src.is_dir() else src.parent
    rows = read_metrics(src if src.is_file() else run_dir / METRICS_FILE)
    out = Path(out_png) if out_png is not None else run_dir / PLOT_FILE
    if not _panels(rows):
        raise ValueError(
            f"{src}: none of the plotted metrics were logged "
            f"(expected e.g. raw_reward_mean, kl_divergence, policy_loss)"
        )
    fig = _figure(rows, run_dir.name)
    try:
        _save(fig, out)
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
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), squeeze=False)
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
            _legend(ax)
        n_seeds = max(len(s) for s in runs.values())
        band = f"; bands: range over {n_seeds} seeds" if n_seeds > 1 else ""
        fig.suptitle(f"gspo compare: {', '.join(runs)} (line: mean over seeds{band})", fontsize=13)
        _readable_ticks(fig, integer_x=False)  # x is wall time on two panels
        fig.tight_layout()
        _save(fig, out)
    finally:
        plt.close(fig)
    return out
