"""Recipes: a folder of stage configs, run in order, each stage in its own process.

The stage contract
==================
Every stage is a module `quill/stages/<name>.py` (tokenizer, pretrain, sft, dpo, reward, rl) that defines:

    ARG_TYPES: tuple[type, ...]      # dataclasses, e.g. (DataArguments, ModelArguments, trl.SFTConfig, RunArguments)
    def train(*args) -> dict: ...    # args are instances in ARG_TYPES order; writes output_dir; returns metrics
    def main(argv=None):
        run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))   # quill.cli / quill.config
    if __name__ == "__main__":
        main()

- ARG_TYPES must accept `output_dir`, and `overwrite` for `quill run --overwrite` (include `RunArguments`, or give
  the stage's TrainingArguments subclass an `overwrite` field; a key several dataclasses share is set on all of
  them). A stage trained from another accepts `model_name_or_path` and `tokenizer_name_or_path` (`ModelArguments`);
  an RL stage with a reward model accepts `reward_model_path` (`RewardModelArguments`, or a field of its own).
- It is launched as `python -m quill.stages.<name> --config FILE [key=value ...]`, as
  `quill <name> --config FILE [key=value ...]`, or as
  `accelerate launch [--config_file X] -m quill.stages.<name> --config FILE [key=value ...]`.
- When it finishes, it writes the marker `<output_dir>/quill_stage.json` = `{"done": true, ...}` LAST, atomically, on
  the main process only (`quill.markers.mark_stage_done(output_dir, info)`, also importable from here): it is
  how a recipe run knows the stage is done and skips it next time.
- With `overwrite=true` it starts over; otherwise, when output_dir holds a partial run (no marker), it resumes.
- Errors a user can fix are `QuillError(problem, fix)`; run_guarded prints them as one line and exits 2.

recipe.yaml
===========
    name: tiny                        # default: the folder's name
    description: ...                  # optional
    output_dir: outputs/tiny          # default outputs/<name>, relative to the current directory; --output-dir wins
    accelerate_config: null           # optional: a path (tried relative to the recipe, the current directory and
                                      # the repo) or a name in recipes/accelerate/ (e.g. cpu_ddp); when set, stages
                                      # run under `accelerate launch --config_file`
    env: {HF_HUB_OFFLINE: 1}          # optional: environment variables for every stage
    stages:                           # run in this order
      - {name: tokenizer, config: tokenizer.yaml}
      - {name: pretrain,  config: pretrain.yaml}
      - {name: sft,       config: sft.yaml,    from: pretrain}
      - {name: dpo,       config: dpo.yaml,    from: sft}
      - {name: reward,    config: reward.yaml, from: sft}
      - {name: rl,        config: rl.yaml,     from: sft, reward_model: reward}

A stage entry: `name` (unique; also its output folder), `config` (relative to the recipe folder), `from` (an earlier
stage whose output is the starting model), `reward_model` (an earlier stage), `stage` (which built-in stage to run
when the name is not one, e.g. `{name: sft_math, stage: sft}`), `module` (a custom stage module; the recipe folder
is importable), `accelerate_config` (this stage only; null runs it as a plain process, e.g. for the tokenizer).

What each stage gets, in this order (later wins):
    --config <recipe>/<config>
    output_dir=OUT/<name>                                   always (use --output-dir to move OUT)
    model_name_or_path=OUT/<from>                           unless its config or an override sets it
    tokenizer_name_or_path=OUT/<tokenizer stage>            if the recipe has an earlier tokenizer stage and the
                                                            stage accepts the key, unless set explicitly
    reward_model_path=OUT/<reward_model>                    if reward_model is given, unless set explicitly
    overwrite=true                                          with --overwrite
    the user's overrides: `sft.key=value` goes to stage sft only; `key=value` goes to every selected stage whose
    ARG_TYPES accept `key`, and is an error if none does.
"""

import dataclasses
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from quill.markers import (  # noqa: F401  (stages and tests import the marker helpers from here too)
    MARKER,
    atomic_write_text,
    clear_stage_done,
    is_stage_done,
    mark_stage_done,
    read_stage_done,
)
from quill.config import (
    build_stage_args,
    did_you_mean,
    display_path,
    load_config_file,
    nearby_file_hint,
    one_line,
    option_names,
    unknown_key_error,
)
from quill.errors import QuillError

STAGE_NAMES = ("tokenizer", "pretrain", "sft", "dpo", "reward", "rl")
STAGE_PACKAGE = "quill.stages"
RECIPE_FILE = "recipe.yaml"
RUN_RECORD = "quill_run.json"  # written by the runner in OUT: what ran, how, and how long
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # shipped with the package
ACCELERATE_DIR = RECIPES_DIR / "accelerate"

RECIPE_KEYS = ("name", "description", "output_dir", "accelerate_config", "stages")
STAGE_KEYS = ("name", "config", "from", "reward_model", "stage", "module", "accelerate_config")


# ---------------------------------------------------------------------------------------------------------------
# Loading and checking a recipe
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StageSpec:
    name: str
    kind: str  # the built-in stage it is (or its name, for a custom module): "tokenizer" feeds the others
    module: str
    config: Path | None
    from_stage: str | None = None
    reward_model: str | None = None
    accelerate_config: Path | None = None
    use_cpu: bool = False  # the accelerate config says use_cpu (multi_gpu_launcher does not pass it on)
    where: str = ""  # "recipe.yaml line 7", for messages


@dataclass
class Recipe:
    name: str
    path: Path
    output_dir: Path
    stages: list[StageSpec]
    env: dict[str, str] = field(default_factory=dict)

    def index(self, name: str, flag: str) -> int:
        names = [s.name for s in self.stages]
        if name not in names:
            fix = did_you_mean(name, names) or f"stages: {', '.join(names)}"
            raise QuillError(f"{flag} {name}: recipe '{self.name}' has no such stage", fix)
        return names.index(name)


def find_recipe(recipe: str | os.PathLike) -> Path:
    """A recipe folder, its recipe.yaml, or a recipe name under the repo's recipes/."""
    p = Path(recipe)
    if p.is_file() and p.name == RECIPE_FILE:
        return p.parent
    if p.is_dir():
        if not (p / RECIPE_FILE).is_file():
            raise QuillError(f"{p} has no {RECIPE_FILE}", "point at a recipe folder, e.g. recipes/tiny")
        return p
    if not p.is_absolute() and len(p.parts) == 1 and (RECIPES_DIR / p / RECIPE_FILE).is_file():
        return RECIPES_DIR / p
    known = sorted(f.parent.name for f in RECIPES_DIR.glob(f"*/{RECIPE_FILE}"))
    fix = did_you_mean(p.name, known)
    fix = f"{fix} (recipes: {', '.join(known)})" if fix else f"available recipes: {', '.join(known) or 'none'}"
    raise QuillError(f"recipe folder {recipe} not found", fix)


def load_recipe(recipe_dir: str | os.PathLike, accelerate_config: str | None = None) -> Recipe:
    """Reads and checks recipe.yaml (keys, stage names, order, files); imports nothing heavy."""
    folder = find_recipe(recipe_dir).resolve()
    cfg = load_config_file(folder / RECIPE_FILE)  # same YAML errors as stage configs; `env:` works too
    raw = {k: v for k, (v, _) in cfg.values.items()}
    where_of = {k: w for k, (_, w) in cfg.values.items()}
    for key in raw:
        if key not in RECIPE_KEYS:
            raise unknown_key_error(key, RECIPE_KEYS, where_of[key])
    name = str(raw.get("name") or folder.name)
    out = Path(raw.get("output_dir") or Path("outputs") / name)
    stages_raw = raw.get("stages")
    shown = display_path(folder / RECIPE_FILE)
    if not isinstance(stages_raw, list) or not stages_raw:
        raise QuillError(f"{shown}: 'stages' must be a non-empty list", "e.g. stages: [{name: sft, config: sft.yaml}]")

    default_acc = accelerate_config if accelerate_config is not None else raw.get("accelerate_config")
    default_acc_where = "--accelerate-config" if accelerate_config is not None else where_of.get("accelerate_config")
    stages: list[StageSpec] = []
    for i, entry in enumerate(stages_raw):
        where = f"{shown} stages[{i}]"
        if not isinstance(entry, dict) or not entry.get("name"):
            raise QuillError(f"{where}: expected a mapping with a name", "e.g. {name: sft, config: sft.yaml}")
        for key in entry:
            if key not in STAGE_KEYS:
                raise unknown_key_error(str(key), STAGE_KEYS, where)
        sname = str(entry["name"])
        where = f"{shown} stage '{sname}'"
        if any(s.name == sname for s in stages):
            raise QuillError(
                f"{where}: the name is used twice", "give each stage its own name (it is its output folder)"
            )
        module = _stage_module(entry, sname, where)
        config = None
        if entry.get("config"):
            config = folder / str(entry["config"])
            if not config.is_file():
                raise QuillError(f"{where}: config file {display_path(config)} not found", nearby_file_hint(config))
        refs = {}
        for key in ("from", "reward_model"):
            ref = entry.get(key)
            if ref is not None and not any(s.name == ref for s in stages):
                later = any(isinstance(e, dict) and e.get("name") == ref for e in stages_raw)
                problem = f"{where}: {key}: '{ref}' " + ("comes later in the recipe" if later else "is not a stage")
                fix = (
                    "stages run in order: move it before this one"
                    if later
                    else did_you_mean(str(ref), [s.name for s in stages])
                )
                raise QuillError(problem, fix or "name an earlier stage")
            refs[key] = ref
        if "accelerate_config" in entry:  # the stage's own, even null
            acc, acc_where = entry["accelerate_config"], where
        else:
            acc, acc_where = default_acc, default_acc_where
        acc_path, use_cpu = (None, False) if not acc else check_accelerate_config(str(acc), folder, acc_where)
        stages.append(
            StageSpec(
                sname,
                str(entry.get("stage") or sname),
                module,
                config,
                refs["from"],
                refs["reward_model"],
                acc_path,
                use_cpu,
                where,
            )
        )
    return Recipe(name, folder, out, stages, cfg.env)


def _stage_module(entry: dict, name: str, where: str) -> str:
    if entry.get("module"):
        return str(entry["module"])
    kind = str(entry.get("stage") or name)
    if kind not in STAGE_NAMES:
        key = "stage" if entry.get("stage") else "name"
        fix = did_you_mean(kind, STAGE_NAMES)
        raise QuillError(
            f"{where}: '{kind}' is not a Quill stage ({', '.join(STAGE_NAMES)})",
            fix or f"set {key} to one of them, or stage: <kind> / module: <python module> for a custom stage",
        )
    return f"{STAGE_PACKAGE}.{kind}"


def check_accelerate_config(value: str, recipe_dir: Path, where: str | None) -> tuple[Path, bool]:
    """Finds an accelerate config and loads it with accelerate's own loader; returns (path, use_cpu)."""
    p = Path(value)
    candidates = [p] if p.is_absolute() else [recipe_dir / p, Path.cwd() / p]
    if not p.suffix and len(p.parts) == 1:
        candidates.append(ACCELERATE_DIR / f"{value}.yaml")
    path = next((c for c in candidates if c.is_file()), None)
    where = f"{where}: " if where else ""
    if path is None:
        names = sorted(c.stem for c in ACCELERATE_DIR.glob("*.yaml"))
        fix = did_you_mean(p.stem, names)
        raise QuillError(
            f"{where}accelerate config {value} not found", fix or f"use a file, or one of: {', '.join(names)}"
        )
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        cfg = load_config_from_file(str(path))
    except Exception as e:  # accelerate raises ValueError/TypeError/KeyError/YAMLError for a bad file
        raise QuillError(
            f"{where}accelerate config {display_path(path)} is invalid: {type(e).__name__}: {one_line(e)}",
            "compare it with recipes/accelerate/*.yaml, or write one with `accelerate config --config_file FILE`",
        ) from None
    return path.resolve(), bool(getattr(cfg, "use_cpu", False))


def import_stage(spec: StageSpec, recipe_dir: Path | None = None):
    """Imports a stage module (lazily: only stages that run) and checks it follows the contract."""
    added = recipe_dir is not None and str(recipe_dir) not in sys.path
    if added:
        sys.path.insert(0, str(recipe_dir))  # custom `module:` stages may live in the recipe folder
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as e:
        if e.name and (spec.module == e.name or spec.module.startswith(e.name + ".")):
            raise QuillError(
                f"{spec.where}: stage module {spec.module} does not exist",
                "remove the stage from the recipe, or stop before it with --until",
            ) from None
        raise
    finally:
        if added:
            sys.path.remove(str(recipe_dir))
    arg_types = getattr(module, "ARG_TYPES", None)
    if not isinstance(arg_types, tuple) or not all(dataclasses.is_dataclass(t) for t in arg_types):
        raise QuillError(
            f"{spec.module} defines no ARG_TYPES tuple of dataclasses", "see the stage contract in quill/recipe.py"
        )
    if not callable(getattr(module, "main", None)):
        raise QuillError(f"{spec.module} defines no main(argv)", "see the stage contract in quill/recipe.py")
    return module


# ---------------------------------------------------------------------------------------------------------------
# Planning: which stages run, with which arguments
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    spec: StageSpec
    output_dir: Path
    argv: list[str]  # what follows `-m <module>`
    command: list[str]
    env: dict[str, str]
    skip: bool  # already done and not --overwrite


@dataclass
class StageResult:
    name: str
    status: str  # "skipped", "ran", "failed", "interrupted", "not run"
    seconds: float = 0.0
    returncode: int | None = None


def route_overrides(
    overrides: list[str], stage_names: list[str], accepted: dict[str, set[str]]
) -> dict[str, list[str]]:
    """Splits `key=value` / `stage.key=value` overrides per stage.

    `accepted` maps each selected stage to the keys it takes; a stage in `stage_names` but not in `accepted` is
    not selected, so its scoped overrides are dropped.
    """
    routed: dict[str, list[str]] = {name: [] for name in accepted}
    for raw in overrides:
        where = f"override '{raw}'"
        key, sep, value = raw.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if not sep or not key:
            raise QuillError(f"{where} is not key=value", "e.g. learning_rate=1e-4 or sft.learning_rate=1e-4")
        head, dot, rest = key.partition(".")
        if "output_dir" in (head, rest.partition(".")[0]):
            raise QuillError(f"{where}: output_dir is set by the recipe", "use --output-dir to move the whole run")
        if dot and head in stage_names:
            targets, key = [head], rest
        else:
            targets = [name for name, keys in accepted.items() if head in keys]
            if not targets:
                every = sorted(set().union(*accepted.values())) if accepted else []
                guess = did_you_mean(head, list(stage_names)) if dot else None
                if guess:
                    raise QuillError(f"{where}: '{head}' is not a stage of this recipe", guess)
                raise QuillError(
                    f"{where}: no stage selected to run accepts '{head}'",
                    did_you_mean(head, every) or "check the key, or scope it to a stage: <stage>.<key>=value",
                )
        top = key.partition(".")[0]
        for name in targets:
            if name not in accepted:
                continue  # scoped to a stage that does not run this time
            if top not in accepted[name]:
                raise unknown_key_error(top, sorted(accepted[name]), f"{where}: stage '{name}'")
            routed[name].append(f"{key}={value}")
    return routed


def plan_recipe(
    recipe: Recipe,
    output_dir: Path,
    from_stage: str | None = None,
    until_stage: str | None = None,
    overrides: list[str] | tuple = (),
    overwrite: bool = False,
    debug: bool = False,
) -> list[StagePlan]:
    """Everything up front, before any stage runs: stage selection, imports, arguments, dependencies."""
    names = [s.name for s in recipe.stages]
    first = recipe.index(from_stage, "--from") if from_stage else 0
    last = recipe.index(until_stage, "--until") if until_stage else len(names) - 1
    if first > last:
        raise QuillError(f"--from {from_stage} comes after --until {until_stage}", "swap them")
    selected = recipe.stages[first : last + 1]

    modules = {s.name: import_stage(s, recipe.path) for s in selected}
    accepted = {name: option_names(m.ARG_TYPES) for name, m in modules.items()}
    for s in selected:
        missing = ({"output_dir", "overwrite"} if overwrite else {"output_dir"}) - accepted[s.name]
        if missing:
            raise QuillError(
                f"{s.where}: its module {s.module} accepts no {' or '.join(sorted(missing))}",
                "add quill.config.RunArguments (output_dir, overwrite) to its ARG_TYPES",
            )
    routed = route_overrides(list(overrides), names, accepted)
    tokenizer_stage = next((s for s in recipe.stages if s.kind == "tokenizer"), None)

    plans = []
    for s in selected:
        out = output_dir / s.name
        explicit = set(load_config_file(s.config).values) if s.config else set()
        explicit |= {o.partition("=")[0].partition(".")[0] for o in routed[s.name]}
        argv = ["--config", display_path(s.config)] if s.config else []
        argv.append(f"output_dir={display_path(out)}")
        deps = []
        for key, dep in (
            ("model_name_or_path", s.from_stage),
            ("tokenizer_name_or_path", tokenizer_stage.name if tokenizer_stage and tokenizer_stage is not s else None),
            ("reward_model_path", s.reward_model),
        ):
            if dep is None or key in explicit:
                continue
            if names.index(dep) > names.index(s.name):
                continue  # a tokenizer stage placed after this one is not its tokenizer
            if key not in accepted[s.name]:
                if key == "tokenizer_name_or_path":
                    continue  # optional: only stages that load a tokenizer take it
                entry = "from" if key == "model_name_or_path" else "reward_model"
                raise QuillError(
                    f"{s.where}: its module {s.module} accepts no {key}",
                    f"drop the stage's {entry}, or add ModelArguments / RewardModelArguments to its ARG_TYPES",
                )
            argv.append(f"{key}={display_path(output_dir / dep)}")
            deps.append(dep)
        if overwrite:
            argv.append("overwrite=true")
        argv += routed[s.name]

        try:  # the whole parse, TrainingArguments' checks included, without running anything
            build_stage_args(modules[s.name].ARG_TYPES, argv)
        except QuillError as e:
            raise QuillError(f"stage '{s.name}': {e.problem}", e.fix) from None

        for dep in deps:
            if dep not in {x.name for x in selected} and not is_stage_done(output_dir / dep):
                raise QuillError(
                    f"previous stage '{dep}' has no finished output at {display_path(output_dir / dep)}",
                    "run it first or drop --from",
                )
        plans.append(
            StagePlan(
                s, out, argv, _command(s, argv), _env(recipe, s, debug), skip=is_stage_done(out) and not overwrite
            )
        )
    return plans


def _command(spec: StageSpec, argv: list[str]) -> list[str]:
    if spec.accelerate_config is None:
        return [sys.executable, "-m", spec.module, *argv]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(spec.accelerate_config)]
    return [*launch, "-m", spec.module, *argv]


def _env(recipe: Recipe, spec: StageSpec, debug: bool) -> dict[str, str]:
    env = {**os.environ, **recipe.env, "PYTHONUNBUFFERED": "1"}  # live output through pipes and launchers
    if debug:
        env["QUILL_DEBUG"] = "1"
    if spec.use_cpu:
        env["ACCELERATE_USE_CPU"] = (
            "true"  # accelerate's multi-process launcher drops use_cpu; TrainingArguments reads this
        )
    if not spec.module.startswith(STAGE_PACKAGE + "."):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(recipe.path), env.get("PYTHONPATH")) if p)
    return env


def check_output_dir(output_dir: Path) -> Path:
    out = output_dir.resolve()
    if out.exists() and not out.is_dir():
        raise QuillError(f"output dir {display_path(out)} is a file", "pick another --output-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuillError(f"cannot create output dir {output_dir}: {e.strerror}", "pick another --output-dir") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise QuillError(f"output dir {output_dir} is not writable", "fix its permissions or pick another --output-dir")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


def run_recipe(
    recipe_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    from_stage: str | None = None,
    until_stage: str | None = None,
    overrides: list[str] | tuple = (),
    overwrite: bool = False,
    debug: bool = False,
    accelerate_config: str | None = None,
) -> list[StageResult]:
    """Runs a recipe's stages in order, each as a subprocess; finished stages are skipped, interrupted ones resume."""
    recipe = load_recipe(recipe_dir, accelerate_config)
    out = Path(output_dir if output_dir is not None else recipe.output_dir).resolve()
    if out.exists() and not out.is_dir():  # the cheap check first; creating it waits until the plan is sound
        raise QuillError(f"output dir {display_path(out)} is a file", "pick another --output-dir")
    plans = plan_recipe(recipe, out, from_stage, until_stage, overrides, overwrite, debug)
    check_output_dir(out)

    print(f"quill: recipe '{recipe.name}' -> {display_path(out)} ({', '.join(p.spec.name for p in plans)})", flush=True)
    results = [StageResult(p.spec.name, "not run") for p in plans]
    record = {
        "recipe": str(recipe.path),
        "name": recipe.name,
        "output_dir": str(out),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "overrides": list(overrides),
        "stages": [],
    }
    current: StageResult | None = None
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
            if overwrite:
                clear_stage_done(plan.output_dir)  # a crash during the redo must not leave the old marker behind
            shown = ["python", *plan.command[1:]] if plan.command[0] == sys.executable else plan.command
            print(f"{tag}: {shlex.join(shown)}", flush=True)
            current, started = result, time.monotonic()
            result.returncode = _run_process(plan)
            result.seconds, current = time.monotonic() - started, None
            if result.returncode in (130, -2):
                result.status = "interrupted"
                raise KeyboardInterrupt
            if result.returncode != 0:
                result.status = "failed"
                why = _exit_reason(result.returncode)
                raise QuillError(
                    f"stage '{plan.spec.name}' failed ({why}) after {result.seconds:.1f} s; its error is printed above",
                    "fix the cause and re-run the same command: finished stages are skipped, this one resumes",
                )
            if not is_stage_done(plan.output_dir):
                result.status = "failed"
                raise QuillError(
                    f"stage '{plan.spec.name}' exited without writing {display_path(plan.output_dir / MARKER)}",
                    "the stage must call quill.recipe.mark_stage_done(output_dir, metrics) when it finishes",
                )
            result.status = "ran"
            print(f"{tag}: done in {result.seconds:.1f} s", flush=True)
    except KeyboardInterrupt:
        if current is not None:  # Ctrl-C reached the runner while the stage ran
            current.status, current.seconds = "interrupted", time.monotonic() - started
        raise
    finally:
        record["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        record["stages"] = [
            {**dataclasses.asdict(r), "module": p.spec.module, "output_dir": str(p.output_dir), "command": p.command}
            for p, r in zip(plans, results, strict=True)
        ]
        _write_json(out / RUN_RECORD, record)
        _print_summary(out, results)

    report = _write_report(out)
    if report is not None:
        print(f"report: {display_path(Path(report))}" if isinstance(report, (str, os.PathLike)) else "report written")
    return results


def _run_process(plan: StagePlan) -> int:
    proc = subprocess.Popen(plan.command, env=plan.env)  # inherits stdout/stderr: live output
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        # The stage got the same Ctrl-C; give it time to stop cleanly rather than killing it mid-checkpoint.
        try:
            proc.wait(timeout=30)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        raise
    return rc


def _exit_reason(rc: int) -> str:
    if rc < 0:
        import signal

        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"killed by {name}" + (", out of memory?" if name == "SIGKILL" else "")
    return f"exit code {rc}"


def _print_summary(out: Path, results: list[StageResult]) -> None:
    print(f"summary ({display_path(out)}):", flush=True)
    width = max(len(r.name) for r in results) if results else 0
    for r in results:
        took = f"{r.seconds:.1f} s" if r.status in ("ran", "failed", "interrupted") and r.seconds else ""
        print(f"  {r.name:<{width}}  {r.status:<11}  {took}".rstrip(), flush=True)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _write_report(out: Path) -> Any:
    """quill.report.write_report(run_dir), if that module exists (it is optional)."""
    try:
        report = importlib.import_module("quill.report")
    except ModuleNotFoundError as e:
        if e.name == "quill.report":
            return None
        raise
    write = getattr(report, "write_report", None)
    return write(out) if callable(write) else None


__all__ = [
    "MARKER",
    "STAGE_NAMES",
    "Recipe",
    "StagePlan",
    "StageResult",
    "StageSpec",
    "clear_stage_done",
    "is_stage_done",
    "load_recipe",
    "mark_stage_done",
    "plan_recipe",
    "read_stage_done",
    "route_overrides",
    "run_recipe",
]
