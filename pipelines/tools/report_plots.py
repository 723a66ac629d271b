"""The report card's plots (matplotlib, Agg: files only): training loss, held-out accuracy per stage with 95% error
bars on and off the demonstrator's slice, other held-out metrics, the RL reward over the whole run, and the DPO margin
and reward model's accuracy over training. Each `plot_*` draws from StageReports and returns False when it has no data.
"""

from pathlib import Path

from quill.stats import wilson_interval
from quill.tools.report_stats import LEAD_GROUPS, StageReport, num

# Held-out metrics worth a panel in eval_metrics.png (whichever exist); task accuracy has its own plot, with
# intervals. eval_accuracy and eval_exact_match are the encoder stages' (classify, qa) and seq2seq's.
PLOTTED = (
    "eval_loss",
    "bits_per_byte",
    "preference_accuracy",
    "dpo_reward_accuracy",
    "mean_reward",
    "bytes_per_token",
    "eval_accuracy",
    "eval_exact_match",
)
SMOOTHING_SHARE = 10  # the RL reward's rolling mean spans 1/10 of the run's log rows: short enough to show it all
FAINT = 0.25  # alpha of the raw points under a rolling mean


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display, over SSH, in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _line_chart(series: dict[str, list[tuple]], path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """One line per series of (x, y) points; markers while there are few enough to read."""
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for name, points in series.items():
        ax.plot(*zip(*points), label=name, marker="." if len(points) < 30 else None)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def logged(stage: StageReport, key: str) -> list[tuple]:
    """(step, value) of every log row of the stage that has a number under `key`."""
    return [(r["step"], r[key]) for r in stage.log if num(r.get(key)) is not None and "step" in r]


def plot_training_loss(stages: list[StageReport], path: Path) -> bool:
    series = {s.name: logged(s, "loss") for s in stages}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    _line_chart(series, path, "step (within the stage)", "training loss", "Training loss per stage")
    return True


def accuracy_interval(metrics: dict, group: str) -> tuple | None:
    """(accuracy, low, high) at the end of a stage: its recorded accuracy, and the Wilson 95% interval over the
    `<group>_n` held-out prompts it was measured on (the interval collapses to the point when n is not recorded)."""
    value = num(metrics.get(f"{group}_to", metrics.get(group)))
    if value is None:
        return None
    n = num(metrics.get(f"{group}_n"))
    low, high = wilson_interval(round(value * n), int(n)) if n else (value, value)
    return value, low, high


def accuracy_bars(stages: list[StageReport]) -> tuple[list[str], dict[str, list[tuple]]]:
    """The stages that measured held-out accuracy, and for each group that some stage measured (all prompts, on the
    slice, off it) the (stage index, accuracy, low, high) of every stage that measured it."""
    measured = [s for s in stages if accuracy_interval(s.metrics, "task_accuracy")]
    bars = {}
    for group, label in LEAD_GROUPS:
        points = [(i, accuracy_interval(s.metrics, group)) for i, s in enumerate(measured)]
        if any(interval for _, interval in points):
            bars[label] = [(i, *interval) for i, interval in points if interval]
    return [s.name for s in measured], bars


def plot_accuracy(stages: list[StageReport], path: Path) -> bool:
    """Held-out greedy accuracy at the end of each stage that measured it, grouped bars (all prompts, on the slice,
    off it), each with its 95% interval."""
    names, bars = accuracy_bars(stages)
    if not names:
        return False
    fig, ax = _pyplot().subplots(figsize=(max(6, 1.6 * len(names)), 4))
    width = 0.8 / len(bars)
    for j, (label, points) in enumerate(bars.items()):
        x = [i + (j - (len(bars) - 1) / 2) * width for i, *_ in points]
        values = [value for _, value, _, _ in points]
        errors = [[value - low for _, value, low, _ in points], [high - value for _, value, _, high in points]]
        ax.bar(x, values, width, label=label, yerr=errors, capsize=3, error_kw={"lw": 1})
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="held-out greedy accuracy", ylim=(0, 1), title="Accuracy at the end of each stage (95% intervals)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return True


def plot_eval_metrics(stages: list[StageReport], path: Path) -> bool:
    """One panel per held-out metric: its value before (light) and after (dark) each stage that measured it."""
    panels = [m for m in PLOTTED if any(num(s.metrics.get(m)) is not None for s in stages)]
    if not panels:
        return False
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=True):
        names = [s.name for s in stages if num(s.metrics.get(metric)) is not None]
        after = [s.metrics[metric] for s in stages if s.name in names]
        before = [num(s.metrics.get(f"{metric}_before")) for s in stages if s.name in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [b if b is not None else 0 for b in before], 0.4, label="before", color="#9ecae1")
        ax.bar([i + 0.2 for i in x], after, 0.4, label="after", color="#3182bd")
        ax.set_xticks(list(x), names, rotation=30)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(fig, path)
    return True


def rolling_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the up to `window - 1` before it: one point per value, the first ones over fewer
    values, so the smoothed line starts where the run starts."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(n: int) -> int:
    """A tenth of the run's log rows, at least 3 (a window of 1 draws the raw points again), at most all of them."""
    return max(1, min(n, max(3, n // SMOOTHING_SHARE)))


def reward_keys(stage: StageReport) -> list[str]:
    """GRPO's logged rewards: `reward` (the total) and each `rewards/<func>/mean`; with one reward function its mean
    is the total, so only the total is drawn."""
    keys = dict.fromkeys(k for r in stage.log for k in r)
    parts = [k for k in keys if k.startswith("rewards/") and k.endswith("/mean")]
    return (["reward"] if "reward" in keys else []) + (parts if len(parts) > 1 or "reward" not in keys else [])


def _smoothed(ax, points: list[tuple], label: str, window: int) -> None:
    """Raw points faint, their rolling mean on top in the same colour."""
    steps, values = zip(*points)
    (raw,) = ax.plot(steps, values, alpha=FAINT, marker="." if len(points) < 60 else None, lw=1)
    ax.plot(steps, rolling_mean(list(values), window), color=raw.get_color(), lw=2, label=label)


def plot_rl_reward(stages: list[StageReport], path: Path) -> bool:
    """The reward of each RL stage over its whole run: every logged point faint, a rolling mean over a tenth of the
    run's log rows (at least 3) on top. A log row averages logging_steps x rl_prompts_per_step prompts."""
    panels = [(s, reward_keys(s)) for s in stages if s.kind == "rl" and reward_keys(s)]
    if not panels:
        return False
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (stage, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            points = logged(stage, key)
            window = smoothing_window(len(points))
            _smoothed(ax, points, f"{key} (rolling mean of {window} log rows)", window)
        ax.set(
            xlabel="step", ylabel="mean reward", title=f"{stage.name}: reward over the whole run (faint: each log row)"
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def plot_preference_training(stages: list[StageReport], path: Path) -> bool:
    """DPO's reward margin (chosen - rejected) and the reward model's accuracy on its training pairs, per log row
    over training; the reward model's held-out agreement AUC before and after, with its 95% interval."""
    panels = [(s, "rewards/margins", "DPO reward margin", "margin") for s in stages if s.kind == "dpo"]
    panels += [
        (s, "accuracy", "accuracy on its training pairs", "accuracy / AUC") for s in stages if s.kind == "reward"
    ]
    panels = [panel for panel in panels if logged(panel[0], panel[1])]
    if not panels:
        return False
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (stage, key, label, ylabel) in zip(axes[0], panels, strict=True):
        points = logged(stage, key)
        window = smoothing_window(len(points))
        _smoothed(ax, points, f"{label} (rolling mean of {window} log rows)", window)
        m = stage.metrics
        if stage.kind == "reward" and num(m.get("rm_agreement_auc")) is not None:
            _agreement_points(ax, m, points[0][0], points[-1][0])
        ax.set(xlabel="step", ylabel=ylabel, title=f"{stage.name}: {label} over training")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def _agreement_points(ax, metrics: dict, first_step, last_step) -> None:
    """The held-out within-group AUC before (at the first step) and after training, with its interval where known."""
    for step, suffix in ((first_step, "_before"), (last_step, "")):
        value = num(metrics.get(f"rm_agreement_auc{suffix}"))
        if value is None:
            continue
        low = num(metrics.get(f"rm_agreement_auc_low{suffix}"))
        high = num(metrics.get(f"rm_agreement_auc_high{suffix}"))
        errors = [[value - low], [high - value]] if low is not None and high is not None else None
        label = "held-out agreement with the scorer before / after (AUC, 95% CI)" if suffix else None
        ax.errorbar([step], [value], yerr=errors, fmt="s", color="black", capsize=4, label=label)
