"""Tests for gspo.plotting: per-reward-function panels, the zero-std panel, distinct tick labels, legends
outside the curves. Figures are read through the internal `_figure` (what plot_run saves) after a draw."""

import json

import matplotlib.pyplot as plt
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from gspo import plotting
from gspo.plotting import ZERO_STD_TITLE, _DistinctFormatter, _figure, panel_titles, plot_compare, plot_run


def _write(tmp_path, rows):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _drawn(rows):
    fig = _figure(rows, "run")
    fig.canvas.draw()
    return fig


def _by_title(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def _shown_labels(axis):
    """Texts of the tick labels inside the view (matplotlib keeps stale ones outside it)."""
    low, high = sorted(axis.get_view_interval())
    return [t.get_text() for t, loc in zip(axis.get_ticklabels(), axis.get_ticklocs()) if low <= loc <= high]


# 3 steps; math_accuracy logged in training and eval, think_format in training only, environment in eval only,
# `never` only as null (a non-finite value): no panel for it. eval/reward_mean is the total, not a function.
FUNC_ROWS = [
    {"step": 1, "raw_reward_mean": 0.5, "reward/math_accuracy_mean": 0.25, "reward/think_format_mean": 1.0},
    {"step": 2, "raw_reward_mean": 0.6, "reward/math_accuracy_mean": 0.5, "reward/think_format_mean": 0.75},
    {"step": 2, "eval/reward_mean": 0.4, "eval/reward/math_accuracy_mean": 0.375, "eval/reward/environment_mean": 2.0},
    {"step": 3, "raw_reward_mean": 0.7, "reward/math_accuracy_mean": 0.75, "reward/never_mean": None},
    {"step": 3, "policy_loss": 0.1},
]


def test_one_panel_per_reward_function_right_after_the_reward_panel():
    assert panel_titles(FUNC_ROWS) == [
        "Reward",
        "reward: math_accuracy",
        "reward: think_format",
        "reward: environment",
        "Policy loss",
    ]
    assert not any(t.startswith("reward: ") for t in panel_titles([{"step": 1, "raw_reward_mean": 0.5}]))


def test_a_reward_function_panel_draws_the_train_curve_and_the_eval_points():
    fig = _drawn(FUNC_ROWS)
    try:
        axes = _by_title(fig)
        math_lines = {line.get_label(): line for line in axes["reward: math_accuracy"].get_lines()}
        assert list(math_lines) == ["train", "eval"]
        assert list(math_lines["train"].get_xdata()) == [1, 2, 3]
        assert list(math_lines["train"].get_ydata()) == [0.25, 0.5, 0.75]
        assert list(math_lines["eval"].get_xdata()) == [2] and list(math_lines["eval"].get_ydata()) == [0.375]
        assert [line.get_label() for line in axes["reward: think_format"].get_lines()] == ["train"]
        env_lines = axes["reward: environment"].get_lines()
        assert [line.get_label() for line in env_lines] == ["eval"] and list(env_lines[0].get_ydata()) == [2.0]
    finally:
        plt.close(fig)


def test_frac_reward_zero_std_has_its_own_panel_on_the_full_0_1_range():
    rows = [{"step": s, "raw_reward_mean": 0.5, "frac_reward_zero_std": f} for s, f in [(1, 0.75), (2, 0.5), (3, 0.25)]]
    assert panel_titles(rows) == ["Reward", ZERO_STD_TITLE]
    assert ZERO_STD_TITLE not in panel_titles([{"step": 1, "raw_reward_mean": 0.5}])
    fig = _drawn(rows)
    try:
        ax = _by_title(fig)[ZERO_STD_TITLE]
        (line,) = ax.get_lines()
        assert line.get_label() == "frac_reward_zero_std"
        assert list(line.get_ydata()) == [0.75, 0.5, 0.25]
        assert ax.get_ylim() == (-0.02, 1.02)
    finally:
        plt.close(fig)


@pytest.mark.parametrize(
    "locs, labels",
    [
        ([7.6015, 7.602, 7.6025], ["7.6015", "7.6020", "7.6025"]),  # "%.3g" read 7.6 thrice
        ([0.2, 0.200002, 0.200004], ["0.200000", "0.200002", "0.200004"]),  # a KL coef that barely adapts
        ([-1.3877787807814457e-17, 0.1, 0.2], ["0.0", "0.1", "0.2"]),  # round-off at 0: not "-0.0"
        ([0, 1000, 2000], ["0", "1000", "2000"]),  # steps and token counts: no 1e+03
        ([-1e-9, 0.0, 1e-9], ["-1e-09", "0", "1e-09"]),  # an on-policy loss: not 0.000000000
        ([-7.5e-10, -2.5e-10, 2.5e-10], ["-7.5e-10", "-2.5e-10", "2.5e-10"]),
    ],
)
def test_tick_labels_take_the_digits_that_tell_ticks_apart(locs, labels):
    assert _DistinctFormatter().format_ticks(locs) == labels


def test_a_nearly_constant_series_gets_distinct_tick_labels_on_every_axis():
    # entropy 7.6012..7.6049 on the main axis; a KL coef 0.2..0.20001 on the KL panel's twin axis
    rows = [
        {
            "step": s,
            "entropy": 7.6012 + 0.0037 * s / 9,
            "kl_divergence": 0.001 * s,
            "kl_coef": 0.2 + 1e-5 * s / 9,
        }
        for s in range(10)
    ]
    fig = _drawn(rows)
    try:
        entropy = _shown_labels(_by_title(fig)["Entropy"].yaxis)
        (kl_coef_axis,) = [ax for ax in fig.axes if ax.get_ylabel() == "KL coef"]
        twin = _shown_labels(kl_coef_axis.yaxis)
        assert len(entropy) >= 3 and len(twin) >= 3
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                shown = _shown_labels(axis)
                assert len(set(shown)) == len(shown) and all(shown), (ax.get_title(), shown)
        ax = _by_title(fig)["Entropy"]
        low, high = sorted(ax.yaxis.get_view_interval())
        locs = [loc for loc in ax.yaxis.get_ticklocs() if low <= loc <= high]
        assert [float(t) for t in entropy] == pytest.approx(locs, abs=1e-9)  # labels read as the tick values
    finally:
        plt.close(fig)


def _busy_rows(n=40):
    """Curves that fill their panels, twins included, so that any legend inside would cover one."""
    rows = []
    for s in range(1, n + 1):
        rows.append(
            {
                "step": s,
                "raw_reward_mean": s / n,
                "raw_reward_std": 0.1,
                "reward/math_accuracy_mean": 1 - s / n,
                "frac_reward_zero_std": s / n,
                "kl_divergence": s / n,
                "kl_coef": 1 - s / n,
                "completion_length_mean": 100 + s,
                "truncated_fraction": s / n,
                "policy_loss": (-1) ** s,
            }
        )
        if s % 10 == 0:
            rows.append({"step": s, "eval/accuracy": s / n, "eval/reward/math_accuracy_mean": s / n})
    return rows


def test_legends_sit_below_their_axes_clear_of_curves_labels_and_other_panels():
    fig = _drawn(_busy_rows())
    try:
        renderer = fig.canvas.get_renderer()
        panels = [ax for ax in fig.axes if ax.get_visible()]
        with_legend = [ax for ax in panels if ax.get_legend() is not None]
        assert [ax.get_title() for ax in with_legend] == [  # every panel has one
            "Reward",
            "reward: math_accuracy",
            ZERO_STD_TITLE,
            "KL to reference",
            "Completion length",
            "Policy loss",
        ]
        for ax in with_legend:
            box = ax.get_legend().get_window_extent(renderer)
            for other in panels:  # no axes (data area, twins too) and no title under any legend
                assert not box.overlaps(other.get_window_extent(renderer)), (ax.get_title(), other.get_title())
                assert not box.overlaps(other.title.get_window_extent(renderer)), ax.get_title()
            assert box.y1 <= ax.xaxis.get_tightbbox(renderer).y0 + 1  # below the tick labels and "step"
            for other in [a for a in panels if a.bbox.bounds == ax.bbox.bounds]:  # the panel and its twin
                for line in other.get_lines():
                    points = other.transData.transform(line.get_xydata())
                    assert not any(box.contains(x, y) for x, y in points), line.get_label()
    finally:
        plt.close(fig)


def test_the_suptitle_clears_the_first_row_of_a_tall_figure():
    # 4 reward functions: Reward, 4 function panels, zero-std, KL, entropy, loss = 9 panels in 5 rows (21 in),
    # where matplotlib's default y=0.98 put the suptitle over the first row
    names = ["math_accuracy", "think_format", "environment", "reward_model"]
    rows = [
        dict(
            {f"reward/{n}_mean": 0.1 * s for n in names},
            step=s,
            raw_reward_mean=0.1 * s,
            frac_reward_zero_std=0.5,
            kl_divergence=0.01 * s,
            entropy=2.0,
            policy_loss=0.1,
        )
        for s in range(1, 6)
    ]
    assert len(panel_titles(rows)) == 9
    fig = _drawn(rows)
    try:
        renderer = fig.canvas.get_renderer()
        assert fig.get_suptitle() == "GSPO training — run (5 steps)"
        top = fig._suptitle.get_window_extent(renderer)
        panels = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_visible()]  # title, ticks, labels
        assert len(panels) >= 9 and not any(top.overlaps(box) for box in panels)
    finally:
        plt.close(fig)


def test_plot_run_writes_the_png_and_closes_its_figure(tmp_path):
    _write(tmp_path, _busy_rows())
    before = plt.get_fignums()
    out = plot_run(tmp_path)
    assert out == tmp_path / "training_curves.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert plt.get_fignums() == before
    assert not list(tmp_path.glob(".*.tmp.png"))  # the atomic write left no temporary file


def test_plot_compare_gets_the_same_readable_ticks_and_outside_legends(tmp_path, monkeypatch):
    figures = []
    save = plotting._save
    monkeypatch.setattr(plotting, "_save", lambda fig, out: (figures.append(fig), save(fig, out)))

    def run(offset):
        return {
            "rows": [
                {"step": s, "raw_reward_mean": 7.6 + offset + 1e-4 * s, "eval/accuracy": s / 12, "step_time_s": 1.5}
                for s in range(1, 13)
            ]
        }

    out = plot_compare({"gspo": [run(0.0), run(1e-4)], "grpo": [run(2e-4)]}, tmp_path / "compare.png")
    assert out.stat().st_size > 20_000
    (fig,) = figures
    FigureCanvasAgg(fig)  # plot_compare closed it, which took its canvas
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        shown = _shown_labels(ax.yaxis)
        assert len(shown) >= 3 and len(set(shown)) == len(shown), (ax.get_title(), shown)
        box = ax.get_legend().get_window_extent(renderer)
        assert not any(box.overlaps(other.get_window_extent(renderer)) for other in fig.axes), ax.get_title()
