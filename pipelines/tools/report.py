"""`quill report`: the report card of a finished (or partly finished) run: one table, three plots, the recipe.

    quill report RUN_DIR      ->  RUN_DIR/report.md, training_loss.png, eval_metrics.png, rl_reward.png

Reads what each stage wrote into its folder (`metrics.json`, and `training_log.json`, the Trainer's log_history)
and the run record `quill_run.json`; nothing is recomputed and no model library is imported, so a report takes a
second and works on a copy of the run without its weights.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

from quill.errors import QuillError, run_guarded
from quill.output import MARKER, read_json
from quill.stages import STAGES
from quill.tools.report_stats import NOTE_KEYS, StageReport, comparison_keys, fmt, num, statistics_section

RUN_RECORD = "quill_run.json"  # written by quill.runner (not imported: it would pull in the planner)
# Cost rows, after the quality metrics, in this order.
COST_KEYS = (
    "train_loss",
    "train_steps",
    "wall_seconds",
    "train_runtime",
    "tokens_seen",
    "tokens_per_second",
    "peak_memory_mb",
    "device",
    "world_size",
)
# Held-out metrics worth a panel in eval_metrics.png (whichever exist).
PLOTTED = (
    "task_accuracy",
    "eval_loss",
    "bits_per_byte",
    "preference_accuracy",
    "dpo_reward_accuracy",
    "mean_reward",
    "bytes_per_token",
)
PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "tokenizers",
    "evaluate",
    "reasoning-gym",
    "quill",
)
SMOOTH_PROMPTS = 256  # each point of the RL reward plot averages at least this many prompts


def load_stages(run_dir: Path) -> list[StageReport]:
    """Every stage folder of the run that wrote metrics or a log: the known stages in pipeline order, with a stage
    that only the run's recipe names (e.g. midtrain) where the recipe puts it, then any others."""
    folders = [p for p in sorted(run_dir.iterdir()) if p.is_dir()] if run_dir.is_dir() else []
    found = []
    for folder in folders:
        metrics, log = read_json(folder / "metrics.json"), _read_list(folder / "training_log.json")
        # lm-evaluation-harness rows that `quill eval --lm-eval` saved for this stage (quill.tools.eval)
        evaluated = read_json(run_dir / "eval" / f"{folder.name}.json").get("metrics")
        if isinstance(evaluated, dict):
            metrics = {**metrics, **{k: v for k, v in evaluated.items() if k.startswith("lm_eval/")}}
        if metrics or log:
            stage = read_json(folder / MARKER)
            found.append(StageReport(folder.name, folder, metrics, log, stage.get("done") is True))
    order, recipe = list(STAGES), recipe_stages(run_dir)
    for i, name in enumerate(recipe):  # a stage only the recipe has goes right after the stage it follows there
        if name not in order:
            after = next((p for p in reversed(recipe[:i]) if p in order), None)
            order.insert(order.index(after) + 1 if after else 0, name)
    rank = {name: i for i, name in enumerate(order)}
    return sorted(found, key=lambda s: (rank.get(s.name, len(rank)), s.name))


def recipe_stages(run_dir: Path) -> list[str]:
    """Stage names in the order the recipe of the run record lists them (all of them, whichever ran)."""
    import yaml

    try:
        recipe = yaml.safe_load(read_json(run_dir / RUN_RECORD).get("recipe_yaml") or "") or {}
        return [str(s["name"]) for s in recipe.get("stages") or [] if isinstance(s, dict) and "name" in s]
    except (yaml.YAMLError, AttributeError):
        return []


def _read_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return data if isinstance(data, list) else []


# -- the table -------------------------------------------------------------------------------------------------


def metric_rows(stages: list[StageReport]) -> list[str]:
    """Quality metrics first (each `<m>_before` right above `<m>`, so a stage's gain reads top to bottom), then cost.
    Paired comparisons and sentences have their own section (statistics_section)."""
    keys = list(dict.fromkeys(k for s in stages for k in s.metrics))
    paired = {k for s in stages for k in comparison_keys(s.metrics)}
    quality = [k for k in keys if k not in COST_KEYS and k not in paired and k not in NOTE_KEYS]
    rows = []
    for key in quality:
        base = key.removesuffix("_before")
        for k in (f"{base}_before", base):
            if k in quality and k not in rows:
                rows.append(k)
    return rows + [k for k in COST_KEYS if k in keys]


def metrics_table(stages: list[StageReport]) -> str:
    header = ["metric"] + [s.name if s.done else f"{s.name} (unfinished)" for s in stages]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in metric_rows(stages):
        lines.append("| " + " | ".join([key] + [fmt(s.metrics.get(key)) for s in stages]) + " |")
    return "\n".join(lines)


# -- environment -----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """Where this report was written (each stage's own `device` and `world_size` are rows of the table)."""
    return {"CPU": cpu_model(), "CPU cores": os.cpu_count(), "platform": platform.platform()}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# -- plots -----------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display, over SSH, in CI
    import matplotlib.pyplot as plt

    return plt


def _line_chart(series: dict[str, list[tuple]], path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """One line per series of (x, y) points; markers while there are few enough to read."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        ax.plot(*zip(*points), label=name, marker="." if len(points) < 30 else None)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training_loss(stages: list[StageReport], path: Path) -> bool:
    series = {s.name: [(r["step"], r["loss"]) for r in s.log if "loss" in r and "step" in r] for s in stages}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    _line_chart(series, path, "step (within the stage)", "training loss", "Training loss per stage")
    return True


def plot_eval_metrics(stages: list[StageReport], path: Path) -> bool:
    """One panel per held-out metric: its value before (light) and after (dark) each stage that measured it."""
    panels = [m for m in PLOTTED if any(num(s.metrics.get(m)) is not None for s in stages)]
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_rl_reward(stages: list[StageReport], path: Path) -> bool:
    """Reward during RL: `reward` (the total) and each `rewards/<func>/mean` from the rl stage's log_history, each
    point a mean over at least SMOOTH_PROMPTS prompts (a log row averages logging_steps x prompts per step)."""
    rl = next((s for s in stages if s.name == "rl"), None)
    if rl is None:
        return False
    keys = [
        k
        for k in dict.fromkeys(k for r in rl.log for k in r)
        if k == "reward" or (k.startswith("rewards/") and not k.endswith("/std"))
    ]
    if not keys:
        return False
    per_step = num(rl.metrics.get("rl_prompts_per_step"))
    series, window = {}, None
    for key in keys:
        rows = [(r["step"], r[key]) for r in rl.log if num(r.get(key)) is not None and "step" in r]
        points, window = smooth_by_prompts(rows, per_step, SMOOTH_PROMPTS)
        if points:
            series[key] = points
    if not series:
        return False
    if per_step:
        title = f"Reward during RL (each point: mean over the last {window:,} prompts)"
    else:
        title = "Reward during RL (per log row; prompts per step unknown)"
    _line_chart(series, path, "step", "mean reward", title)
    return True


def smooth_by_prompts(rows: list[tuple], prompts_per_step, min_prompts: int) -> tuple[list[tuple], int]:
    """Running means of (step, value) log rows, each over the fewest latest rows that cover `min_prompts` prompts
    (row i covers (step_i - step_{i-1}) x prompts_per_step). Returns the points and the prompts per point."""
    if not prompts_per_step:
        return rows, 0
    sizes = [(step - prev) * prompts_per_step for (step, _), prev in zip(rows, [0] + [s for s, _ in rows])]
    points, covered = [], 0
    for i, (step, _) in enumerate(rows):
        total, weight, j = 0.0, 0, i
        while j >= 0 and weight < min_prompts:
            total += rows[j][1] * sizes[j]
            weight += sizes[j]
            j -= 1
        if weight >= min_prompts:
            points.append((step, total / weight))
            covered = max(covered, weight)
    return points, covered


# -- the report ------------------------------------------------------------------------------------------------


def write_report(run_dir) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise QuillError(f"run folder '{run_dir}' not found", fix="pass the output folder of a `quill run`")
    stages = load_stages(run_dir)
    if not stages:
        raise QuillError(
            f"run folder '{run_dir}' has no stage folders with metrics.json or training_log.json",
            fix="run at least one stage first (its output_dir must be inside the run folder)",
        )
    plots = {
        "training_loss.png": ("Training loss", plot_training_loss),
        "eval_metrics.png": ("Held-out metrics per stage", plot_eval_metrics),
        "rl_reward.png": ("Reward during RL", plot_rl_reward),
    }
    made = []
    for filename, (title, plot) in plots.items():
        (run_dir / filename).unlink(missing_ok=True)  # no stale plot from an earlier report
        if plot(stages, run_dir / filename):
            made.append(f"![{title}]({filename})")
    text = render(run_dir, stages, made)
    out = run_dir / "report.md"
    out.write_text(text, encoding="utf-8")
    return out


def render(run_dir: Path, stages: list[StageReport], images: list[str]) -> str:
    present = {s.name for s in stages}
    absent = [n for n in STAGES if n not in present]
    wall = sum(num(s.metrics.get("wall_seconds")) or 0 for s in stages)
    tokens = sum(num(s.metrics.get("tokens_seen")) or 0 for s in stages)
    parts = [
        f"# Quill run report: `{run_dir.resolve().name}`",
        "",
        f"Stages: {', '.join(s.name for s in stages)}" + (f" (not run: {', '.join(absent)})" if absent else "") + ".",
        f"Total wall time {wall:,.0f} s, {tokens:,} tokens seen in training.",
        "",
        "`*_before` rows are measured on the stage's starting model, the row below it after training: the",
        "difference is what the stage gained. All metrics are on held-out data; `—` means not measured.",
        "",
        metrics_table(stages),
        "",
        *statistics_section(stages),
        "## Plots",
        "",
        *(images or ["No training logs to plot."]),
        "",
        "## Hardware",
        "",
        "Where this report was written; the `device` and `world_size` rows above say where each stage trained.",
        "",
        *[f"- {k}: {v}" for k, v in hardware().items()],
        "",
        "## Versions",
        "",
        *[f"- {k}: {v}" for k, v in versions().items()],
        "",
        "## Recipe",
        "",
        recipe_section(run_dir),
    ]
    return "\n".join(parts) + "\n"


def recipe_section(run_dir: Path) -> str:
    """The recipe as the last `quill run` of this folder ran it: its recipe.yaml, overrides and stage configs."""
    record = read_json(run_dir / RUN_RECORD)
    if not record.get("recipe_yaml"):
        return f"No `{RUN_RECORD}` in this folder: its stages were run one by one, each with its own config."
    overrides = " ".join(f"`{o}`" for o in record.get("overrides") or []) or "none"
    parts = [
        f"Recipe `{record.get('name')}` ({record.get('recipe')}), run {record.get('started_at')}; "
        f"overrides: {overrides}.",
        "",
        "```yaml",
        record["recipe_yaml"].rstrip(),
        "```",
    ]
    for stage in record.get("stages") or []:
        if stage.get("config"):
            parts += [
                "",
                f"`{stage['name']}` ({stage.get('status', 'not run')}):",
                "",
                "```yaml",
                stage["config"].rstrip(),
                "```",
            ]
    return "\n".join(parts)


# -- CLI -------------------------------------------------------------------------------------------------------


def run(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="quill report", description="Write RUN_DIR/report.md with plots.")
    p.add_argument("run_dir", help="the run's output folder (holds pretrain/, sft/, ... stage folders)")
    out = write_report(p.parse_args(argv).run_dir)
    print(out)
    return out


def main(argv: list[str] | None = None) -> None:
    run_guarded(lambda: run(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
