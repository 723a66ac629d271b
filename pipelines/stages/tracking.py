"""Experiment tracking for a stage's trainer: `report_to` (trackio, tensorboard, wandb, ...) as transformers does it,
with the stages of one `quill run` grouped together.

The runner gives every stage of a run the same QUILL_RUN_NAME (`<recipe>-<UTC time>`). Unless a config sets them:

- trackio: `project` is the run name and `run_name` the stage, so one project holds the run's stages side by side;
  the store is trackio's own (TRACKIO_DIR, default ~/.cache/huggingface/trackio): `trackio show` opens it.
- tensorboard: events go to `<run folder>/tensorboard/<run name>/<stage>/` (TENSORBOARD_LOGGING_DIR wins), outside
  the stage folder, whose checkpoints are removed when it finishes: `tensorboard --logdir <run folder>/tensorboard`.
- every other tracker gets the same project and run name through the Trainer's arguments.

A stage run on its own (not under `quill run`) is its own run, named `<stage>-<UTC time>`.
"""

import os
from datetime import UTC, datetime
from pathlib import Path

RUN_NAME_ENV = "QUILL_RUN_NAME"  # set by quill.runner for every stage of a run
DEFAULT_PROJECT = "huggingface"  # TrainingArguments.project's default


def reporting_to(args) -> list[str]:
    report_to = args.report_to or []
    return [report_to] if isinstance(report_to, str) else list(report_to)


def configure_tracking(args, stage_dir: Path) -> None:
    """Name the run and place the tensorboard events before the trainer (and its tracker callbacks) is built. The
    stage is named by its folder (`OUT/midtrain` runs the pretrain stage under the name midtrain)."""
    stage, run_dir = Path(stage_dir).name, Path(stage_dir).parent
    if not [r for r in reporting_to(args) if r != "none"]:
        return
    run = os.environ.get(RUN_NAME_ENV) or f"{stage}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    if getattr(args, "project", DEFAULT_PROJECT) == DEFAULT_PROJECT:
        args.project = run
    if not args.run_name:
        args.run_name = stage
    if {"tensorboard", "all"} & set(reporting_to(args)) and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard" / args.project / args.run_name)
