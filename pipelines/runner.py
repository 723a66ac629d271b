"""`quill run`: execute a recipe's plan, each stage in its own process, then write the run record and the report.

The run folder is locked for the whole run (a second `quill run` on it stops with one line naming the holder).
Finished stages are skipped; an interrupted one resumes when the same command runs again. `OUT/quill_run.json`
records what ran: the recipe (its YAML and each stage's config as text), the overrides, each stage's command,
status and time; stages a run leaves alone keep their entries from the record before it. The report reads that
record and the stage folders.
"""

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from quill.errors import PREEMPT_SIGNALS, PREEMPTED_EXIT, QuillError, StageFailed, display_path, redact
from quill.output import check_finished, folder_lock, prepare_run_dir, read_json, write_json
from quill.recipe import RECIPE_FILE, Recipe, StagePlan, load_recipe, plan_recipe
from quill.tools.report import write_report  # reads JSON only: no model libraries

RUN_RECORD = "quill_run.json"


@dataclass
class StageRun:
    name: str
    status: str  # "skipped", "ran", "failed", "interrupted", "not run"
    seconds: float = 0.0
    returncode: int | None = None


def run_recipe(
    recipe_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    from_stage: str | None = None,
    until_stage: str | None = None,
    overrides: list[str] | tuple = (),
    overwrite: bool = False,
    debug: bool = False,
    accelerate_config: str | None = None,
    smoke: bool = False,
) -> list[StageRun]:
    """Runs a recipe's stages in order, each as a subprocess; finished stages are skipped, interrupted ones resume.

    `smoke`: every stage for a few steps at tiny size, as one CPU process each (no accelerate launcher), on
    datasets capped to a few rows, into `<output_dir>-smoke` unless an output folder is given (quill.recipe.SMOKE).
    """
    if smoke and accelerate_config is not None:
        raise QuillError("--smoke runs every stage as one CPU process", "drop --accelerate-config, or --smoke")
    recipe = load_recipe(recipe_dir, accelerate_config)
    if smoke:
        recipe.output_dir = Path(f"{recipe.output_dir}-smoke")
        for spec in recipe.stages:
            spec.accelerate_config, spec.use_cpu = None, True
    out = Path(output_dir if output_dir is not None else recipe.output_dir).resolve()
    if out.exists() and not out.is_dir():  # the cheap check first; creating it waits until the plan is sound
        raise QuillError(f"output dir {display_path(out)} is a file", "pick another --output-dir")
    plans = plan_recipe(recipe, out, from_stage, until_stage, overrides, overwrite, smoke)
    prepare_run_dir(out)
    with folder_lock(out, what="run"):
        return _run_plans(recipe, out, plans, list(overrides), debug)


def _run_plans(recipe: Recipe, out: Path, plans: list[StagePlan], overrides: list[str], debug: bool) -> list[StageRun]:
    print(f"quill: recipe '{recipe.name}' -> {display_path(out)} ({', '.join(p.spec.name for p in plans)})", flush=True)
    if recipe.description:
        print(f"quill: {recipe.description}", flush=True)
    results = [StageRun(p.spec.name, "not run") for p in plans]
    record = run_record(recipe, out, plans, overrides)
    earlier = earlier_stages(out / RUN_RECORD, recipe, plans)
    current, started = None, time.monotonic()
    # One tracker run name for every stage of this `quill run` (quill.stages.tracking groups them by it).
    run_name = f"{recipe.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    try:
        for i, (plan, result) in enumerate(zip(plans, results, strict=True), start=1):
            tag = f"[{i}/{len(plans)}] {plan.spec.name}"
            if plan.skip:
                result.status = "skipped"
                print(
                    f"{tag}: finished earlier ({display_path(plan.output_dir)}), skipping; --overwrite redoes it",
                    flush=True,
                )
                continue
            command = stage_command(plan)
            print(f"{tag}: {shlex.join(['python', *command[1:]])}", flush=True)
            current, started = result, time.monotonic()
            result.returncode = _run_process(command, stage_env(recipe, plan, debug, run_name))
            result.seconds, current = time.monotonic() - started, None
            if result.returncode in (130, -signal.SIGINT):
                result.status = "interrupted"
                raise KeyboardInterrupt
            if result.returncode == PREEMPTED_EXIT:  # it saved a checkpoint and printed how to resume
                result.status = "preempted"
                raise StageFailed(
                    f"stage '{plan.spec.name}' was preempted after {result.seconds:.1f} s",
                    "re-run the same command: finished stages are skipped, this one resumes from its checkpoint",
                    PREEMPTED_EXIT,
                )
            if result.returncode != 0 or check_finished(plan.output_dir) is None:
                result.status = "failed"
                why = _exit_reason(result.returncode) if result.returncode else "it exited without finishing"
                problem = f"stage '{plan.spec.name}' failed ({why}) after {result.seconds:.1f} s"
                fix = "fix the cause and re-run the same command: finished stages are skipped, this one resumes"
                if result.returncode > 0:  # it printed its own error line: one error, one line
                    raise StageFailed(problem, fix, result.returncode)
                raise QuillError(problem, fix)
            result.status = "ran"
            print(f"{tag}: done in {result.seconds:.1f} s", flush=True)
    except KeyboardInterrupt:
        if current is not None:  # Ctrl-C reached the runner while the stage ran
            current.status, current.seconds = "interrupted", time.monotonic() - started
        raise
    finally:
        record["finished_at"] = _now()
        ran = {r.name: {**rec, **dataclasses.asdict(r)} for rec, r in zip(record["stages"], results, strict=True)}
        merged = ran | earlier  # a stage this run left alone keeps the earlier run's entry
        record["stages"] = [merged[s.name] for s in recipe.stages if s.name in merged]
        write_json(out / RUN_RECORD, record)
        _print_summary(out, results)
    try:
        print(f"report: {display_path(write_report(out))}", flush=True)
    except QuillError as e:  # e.g. custom stages that record no metrics: the run itself succeeded
        print(f"report: not written ({e.problem})", flush=True)
    return results


def stage_command(plan: StagePlan) -> list[str]:
    spec = plan.spec
    if spec.accelerate_config is None:
        return [sys.executable, "-m", spec.module, *plan.argv]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(spec.accelerate_config)]
    return [*launch, "-m", spec.module, *plan.argv]


def stage_env(recipe: Recipe, plan: StagePlan, debug: bool, run_name: str) -> dict[str, str]:
    env = {**os.environ, **recipe.env, "PYTHONUNBUFFERED": "1"}  # live output through pipes and launchers
    env["QUILL_RUN_NAME"] = run_name  # the same for every stage of the run: groups them in trackers
    if debug:
        env["QUILL_DEBUG"] = "1"
    if plan.spec.use_cpu:  # accelerate's multi-process launcher drops use_cpu; TrainingArguments reads this
        env["ACCELERATE_USE_CPU"] = "true"
    if not plan.spec.module.startswith("quill."):  # a custom stage module may live in the recipe folder
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(recipe.path), env.get("PYTHONPATH")) if p)
    return env


def run_record(recipe: Recipe, out: Path, plans: list[StagePlan], overrides: list[str]) -> dict:
    """What the report shows of the run: the recipe and its configs as text, the overrides, every stage's command."""
    configs = {p.spec.name: p.spec.config.read_text(encoding="utf-8") for p in plans if p.spec.config}
    return {
        "recipe": str(recipe.path),
        "name": recipe.name,
        "description": recipe.description,
        "recipe_yaml": (recipe.path / RECIPE_FILE).read_text(encoding="utf-8"),
        "output_dir": str(out),
        "started_at": _now(),
        "overrides": overrides,
        "stages": [
            {
                "name": p.spec.name,
                "module": p.spec.module,
                "output_dir": str(p.output_dir),
                "command": [redact(a) for a in stage_command(p)],
                "config": configs.get(p.spec.name),
            }
            for p in plans
        ],
    }


def earlier_stages(path: Path, recipe: Recipe, plans: list[StagePlan]) -> dict[str, dict]:
    """The previous run record's entries for the recipe's stages this run will not run (left out by `--from` or
    `--until`, or finished and skipped): their folders stay as an earlier run made them, so the new record keeps how
    (command, config, time), marked with the `earlier_run` that made them."""
    previous = read_json(path)  # {} when there is none or it is unreadable
    names = {s.name for s in recipe.stages} - {p.spec.name for p in plans if not p.skip}
    return {
        entry["name"]: {**entry, "earlier_run": entry.get("earlier_run") or previous.get("started_at")}
        for entry in previous.get("stages") or []
        if isinstance(entry, dict) and entry.get("name") in names and entry.get("status") in ("ran", None)
    }


def _run_process(command: list[str], env: dict[str, str]) -> int:
    """Runs one stage and waits for it. SIGTERM/SIGUSR1 sent to the runner (Kubernetes signals only PID 1; SLURM's
    --signal may name the batch step) are passed on to the stage, which saves a checkpoint and exits 75."""
    proc = subprocess.Popen(command, env=env)  # inherits stdout/stderr: live output
    forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in PREEMPT_SIGNALS}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The stage got the same Ctrl-C; give it time to stop cleanly rather than killing it mid-checkpoint.
        try:
            proc.wait(timeout=30)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_reason(rc: int) -> str:
    if rc >= 0:
        return f"exit code {rc}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    return f"killed by {name}" + (", out of memory?" if name == "SIGKILL" else "")


def _print_summary(out: Path, results: list[StageRun]) -> None:
    print(f"summary ({display_path(out)}):", flush=True)
    width = max((len(r.name) for r in results), default=0)
    for r in results:
        took = f"{r.seconds:.1f} s" if r.status in ("ran", "failed", "interrupted") and r.seconds else ""
        print(f"  {r.name:<{width}}  {r.status:<11}  {took}".rstrip(), flush=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
