"""`quill report`: the report card of a finished (or partly finished) run: what each stage changed (and, with
--ablation, what it changed in a second run of the recipe), the plots, the recipe, every metric in an appendix.

    quill report RUN_DIR [--ablation OTHER_RUN]  ->  RUN_DIR/report.md and its plots (quill.tools.report_plots)

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

from quill.data import DEFAULT_PREFIX
from quill.errors import QuillError, run_guarded
from quill.output import MARKER, read_json
from quill.stages import STAGES
from quill.tools.report_plots import (
    plot_accuracy,
    plot_eval_metrics,
    plot_preference_training,
    plot_rl_reward,
    plot_training_loss,
)
from quill.tools.report_stats import (
    NOTE_KEYS,
    StageReport,
    ablation_section,
    comparison_keys,
    details_section,
    fmt,
    lead_section,
    num,
)

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
# The plots, in the order the report shows them: file name -> (caption, what draws it).
PLOTS = {
    "accuracy.png": ("Held-out accuracy at the end of each stage, with 95% intervals", plot_accuracy),
    "rl_reward.png": ("Reward over each RL run", plot_rl_reward),
    "preference_training.png": ("DPO margin and the reward model's accuracy over training", plot_preference_training),
    "training_loss.png": ("Training loss", plot_training_loss),
    "eval_metrics.png": ("Other held-out metrics per stage", plot_eval_metrics),
}
ABLATION_FIX = (
    "pass the output folder of a finished `quill run` (e.g. `quill run tiny demonstrator.rate=0 --output-dir OUT`)"
)


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
            marker = read_json(folder / MARKER)
            fingerprint = marker.get("fingerprint") if isinstance(marker.get("fingerprint"), dict) else {}
            kind = str(marker.get("stage") or "")  # the built-in stage it ran as: rlvr's marker says rl
            settings = fingerprint.get("settings") if isinstance(fingerprint.get("settings"), dict) else {}
            if not _reads_default_data(fingerprint):  # its demonstrator option applied to no data it read
                settings = {k: v for k, v in settings.items() if k != "demonstrator"}
            found.append(StageReport(folder.name, folder, metrics, log, marker.get("done") is True, kind, settings))
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


def stage_seconds(run_dir: Path, stages: list[StageReport]) -> float:
    """The stages' time summed: each stage process as the runner timed it (start-up included) where the run record
    has it, else the stage's own clock from its metrics (a stage run on its own; the tokenizer keeps none)."""
    timed = {
        entry.get("name"): num(entry.get("seconds"))
        for entry in read_json(run_dir / RUN_RECORD).get("stages") or []
        if isinstance(entry, dict)
    }
    return sum(timed.get(s.name) or num(s.metrics.get("wall_seconds")) or 0 for s in stages)


def demonstrator(run_dir: Path, stages: list[StageReport]) -> dict:
    """The run's `demonstrator` argument ({task, slice, mistake, rate}) as the stages' markers recorded it (SFT's
    first: it trains on the demonstrations), else as the run record's stage configs and commands set it (maybe only
    some keys); {} when nothing says."""
    for stage in sorted(stages, key=lambda s: s.kind != "sft"):
        if isinstance(stage.settings.get("demonstrator"), dict):
            return stage.settings["demonstrator"]
    found = {}
    for stage in read_json(run_dir / RUN_RECORD).get("stages") or []:
        found.update(_configured_demonstrator(stage) if isinstance(stage, dict) else {})
    return found


def _configured_demonstrator(stage: dict) -> dict:
    """`demonstrator` as one run-record stage's config text and command set it (the command's overrides win)."""
    import yaml

    try:
        config = yaml.safe_load(stage.get("config") or "") or {}
        found = dict(config.get("demonstrator") or {})
        for arg in stage.get("command") or []:
            key, _, value = str(arg).partition("=")
            if key == "demonstrator":
                found.update(yaml.safe_load(value) or {})
            elif key.startswith("demonstrator."):
                found[key.removeprefix("demonstrator.")] = yaml.safe_load(value)
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        return {}
    return found


def _reads_default_data(fingerprint: dict) -> bool:
    """Whether a stage's recorded sources include the default data (old markers without sources count as yes)."""
    sources = fingerprint.get("sources")
    if not isinstance(sources, dict) or "dataset_mixture" not in sources:
        return True
    entries = sources.get("dataset_mixture") or []
    return any(isinstance(e, dict) and str(e.get("path", "")).startswith(DEFAULT_PREFIX) for e in entries)


def _read_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return data if isinstance(data, list) else []


# -- the appendix -----------------------------------------------------------------------------------------------


def metric_rows(stages: list[StageReport]) -> list[str]:
    """Quality metrics first (each `<m>_before` right above `<m>`, so a stage's gain reads top to bottom), then cost.
    A `<m>_before` equal to `<m>` in every stage that has it is a count or setting recorded twice, not a measurement
    before and after: shown once. Paired comparisons and sentences have their own sections."""
    keys = list(dict.fromkeys(k for s in stages for k in s.metrics))
    paired = {k for s in stages for k in comparison_keys(s.metrics)}
    quality = [k for k in keys if k not in COST_KEYS and k not in paired and k not in NOTE_KEYS]
    twice = {k for k in quality if k.endswith("_before") and _same_after(stages, k)}
    rows = []
    for key in quality:
        base = key.removesuffix("_before")
        for k in (f"{base}_before", base):
            if k in quality and k not in rows and k not in twice:
                rows.append(k)
    return rows + [k for k in COST_KEYS if k in keys]


def _same_after(stages: list[StageReport], before: str) -> bool:
    after = before.removesuffix("_before")
    return all(s.metrics.get(after) == s.metrics[before] for s in stages if before in s.metrics)


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


# -- the report ------------------------------------------------------------------------------------------------


def write_report(run_dir, ablation=None) -> Path:
    """RUN_DIR/report.md and its plots; with `ablation`, a second finished run whose lead table goes next to this
    run's (checked before anything is written)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise QuillError(f"run folder '{run_dir}' not found", fix="pass the output folder of a `quill run`")
    other = load_ablation(Path(ablation)) if ablation is not None else None
    stages = load_stages(run_dir)
    if not stages:
        raise QuillError(
            f"run folder '{run_dir}' has no stage folders with metrics.json or training_log.json",
            fix="run at least one stage first (its output_dir must be inside the run folder)",
        )
    made = []
    for filename, (title, plot) in PLOTS.items():
        (run_dir / filename).unlink(missing_ok=True)  # no stale plot from an earlier report
        if plot(stages, run_dir / filename):
            made.append(f"![{title}]({filename})")
    text = render(run_dir, stages, made, other)
    out = run_dir / "report.md"
    out.write_text(text, encoding="utf-8")
    return out


def load_ablation(path: Path) -> tuple[Path, list[StageReport]]:
    """The ablation run's folder and stages: a finished `quill run` (its run record says which recipe and settings)."""
    if not path.is_dir():
        raise QuillError(f"--ablation: run folder '{path}' not found", ABLATION_FIX)
    if not (path / RUN_RECORD).is_file():
        raise QuillError(
            f"--ablation: '{path}' has no {RUN_RECORD}, so it is not the folder of a `quill run`", ABLATION_FIX
        )
    stages = load_stages(path)
    if not stages:
        raise QuillError(f"--ablation: '{path}' has no stage folders with metrics.json", ABLATION_FIX)
    return path, stages


def render(run_dir: Path, stages: list[StageReport], images: list[str], ablation: tuple | None = None) -> str:
    present = {s.name for s in stages}
    # The recipe's stages that left no folder (all kinds Quill knows when there is no run record to say which).
    absent = [n for n in (recipe_stages(run_dir) or STAGES) if n not in present]
    seconds = stage_seconds(run_dir, stages)
    tokens = sum(num(s.metrics.get("tokens_seen")) or 0 for s in stages)
    other = ablation_section(ablation[1], demonstrator(*ablation), str(ablation[0])) if ablation else []
    parts = [
        f"# Quill run report: `{run_dir.resolve().name}`",
        "",
        f"Stages: {', '.join(s.name for s in stages)}" + (f" (not run: {', '.join(absent)})" if absent else "") + ".",
        f"Stage time {seconds:,.0f} s (the stages' processes, summed), {tokens:,} tokens seen in training.",
        "",
        *lead_section(stages, demonstrator(run_dir, stages)),
        *other,
        "## Plots",
        "",
        *([line for image in images for line in (image, "")] or ["No training logs to plot.", ""]),
        *details_section(stages),
        "## Hardware",
        "",
        "Where this report was written; the appendix's `device` and `world_size` rows say where each stage trained.",
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
        "",
        "## Appendix: every recorded metric",
        "",
        "`*_before` rows are measured on the stage's starting model, the row below it after training; a count or "
        "setting recorded both times with the same value is shown once. All metrics are on held-out data; `—` means "
        "not measured. The paired comparisons are in the tables above, and all of it in each stage's metrics.json.",
        "",
        metrics_table(stages),
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
                f"`{stage['name']}` ({stage.get('status', 'not run')}"
                + (f", by the earlier run of {stage['earlier_run']}" if stage.get("earlier_run") else "")
                + "):",
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
    p.add_argument(
        "--ablation",
        metavar="OTHER_RUN",
        help="a second finished run of the recipe (e.g. with demonstrator.rate=0): its table goes next to this run's",
    )
    args = p.parse_args(argv)
    out = write_report(args.run_dir, ablation=args.ablation)
    print(out)
    return out


def main(argv: list[str] | None = None) -> None:
    run_guarded(lambda: run(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
