"""A recipe: its `recipe.yaml` read and checked, and the plan of which stages run with which arguments.

The file format and the stage contract are in docs/recipes.md. Planning does everything that can fail before a
stage runs: stage selection, module imports, each stage's whole argument parse (TrainingArguments' own checks
included), and the finished outputs that `from`/`reward_model` need. `quill.runner` then executes the plan.
A recipe can name Python modules (`module:`) and environment variables (`env:`): it is code, trust it like code.
"""

import dataclasses
import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from quill.errors import (
    SECRET_KEYS,
    QuillError,
    did_you_mean,
    display_path,
    nearby_file_hint,
    one_line,
    unknown_key_error,
)
from quill.options import build_stage_args, load_config_file, option_names
from quill.output import check_finished, fingerprint
from quill.stages import STAGES, stage_module

RECIPE_FILE = "recipe.yaml"
RECIPES_DIR = Path(str(resources.files("quill.recipes")))  # shipped with the package (recipes/ in a checkout)
ACCELERATE_DIR = RECIPES_DIR / "accelerate"
RECIPE_KEYS = ("name", "description", "output_dir", "accelerate_config", "stages")
STAGE_KEYS = ("name", "config", "from", "reward_model", "teacher", "stage", "module", "accelerate_config")
STAGE_REFS = ("from", "reward_model", "teacher")  # entry keys that name an earlier stage


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
    where: str = ""  # "recipe.yaml stage 'sft'", for messages
    teacher: str | None = None  # an earlier stage whose output a distill stage learns from


@dataclass
class Recipe:
    name: str
    path: Path
    output_dir: Path
    stages: list[StageSpec]
    env: dict[str, str] = field(default_factory=dict)
    description: str = ""  # one line for people: printed when the run starts, kept in the run record

    def index(self, name: str, flag: str) -> int:
        names = [s.name for s in self.stages]
        if name not in names:
            raise QuillError(
                f"{flag} {name}: recipe '{self.name}' has no such stage",
                did_you_mean(name, names) or f"stages: {', '.join(names)}",
            )
        return names.index(name)


@dataclass
class StagePlan:
    spec: StageSpec
    output_dir: Path
    argv: list[str]  # what follows `-m <module>`
    skip: bool  # finished with the same fingerprint, and no --overwrite


def find_recipe(recipe: str | os.PathLike) -> Path:
    """A recipe folder, its recipe.yaml, or the name of a recipe shipped with Quill (`tiny`)."""
    p = Path(recipe)
    if p.is_file() and p.name == RECIPE_FILE:
        return p.parent
    if p.is_dir():
        if not (p / RECIPE_FILE).is_file():
            raise QuillError(f"{p} has no {RECIPE_FILE}", "point at a recipe folder, or name a shipped recipe: tiny")
        return p
    if not p.is_absolute() and len(p.parts) == 1 and (RECIPES_DIR / p / RECIPE_FILE).is_file():
        return RECIPES_DIR / p
    known = sorted(f.parent.name for f in RECIPES_DIR.glob(f"*/{RECIPE_FILE}"))
    fix = did_you_mean(p.name, known)
    fix = f"{fix} (recipes: {', '.join(known)})" if fix else f"shipped recipes: {', '.join(known) or 'none'}"
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
    stages_raw, shown = raw.get("stages"), display_path(folder / RECIPE_FILE)
    if not isinstance(stages_raw, list) or not stages_raw:
        raise QuillError(f"{shown}: 'stages' must be a non-empty list", "e.g. stages: [{name: sft, config: sft.yaml}]")
    if accelerate_config is not None:
        default_acc, default_acc_where = accelerate_config, "--accelerate-config"
    else:
        default_acc, default_acc_where = raw.get("accelerate_config"), where_of.get("accelerate_config")
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
        if Path(sname).name != sname or sname in (".", ".."):  # it becomes OUT/<name>: no way out of OUT
            raise QuillError(f"{where}: a stage name is a folder name, not a path", "use letters, digits, - and _")
        if any(s.name == sname for s in stages):
            raise QuillError(
                f"{where}: the name is used twice", "give each stage its own name (it is its output folder)"
            )
        config = folder / str(entry["config"]) if entry.get("config") else None
        if config is not None and not config.is_file():
            raise QuillError(f"{where}: config file {display_path(config)} not found", nearby_file_hint(config))
        refs = {key: _earlier_stage(entry.get(key), key, stages, stages_raw, where) for key in STAGE_REFS}
        acc, acc_where = (
            (entry["accelerate_config"], where) if "accelerate_config" in entry else (default_acc, default_acc_where)
        )
        acc_path, use_cpu = check_accelerate_config(str(acc), folder, acc_where) if acc else (None, False)
        kind = str(entry.get("stage") or sname)
        stages.append(
            StageSpec(
                sname,
                kind,
                _module(entry, kind, where),
                config,
                refs["from"],
                refs["reward_model"],
                acc_path,
                use_cpu,
                where,
                refs["teacher"],
            )
        )
    output_dir = Path(raw.get("output_dir") or Path("outputs") / name)
    return Recipe(name, folder, output_dir, stages, cfg.env, str(raw.get("description") or ""))


def _earlier_stage(ref, key: str, stages: list[StageSpec], stages_raw: list, where: str) -> str | None:
    if ref is None or any(s.name == ref for s in stages):
        return ref
    later = any(isinstance(e, dict) and e.get("name") == ref for e in stages_raw)
    fix = "stages run in order: move it before this one" if later else did_you_mean(str(ref), [s.name for s in stages])
    problem = f"{where}: {key}: '{ref}' " + ("comes later in the recipe" if later else "is not a stage")
    raise QuillError(problem, fix or "name an earlier stage")


def _module(entry: dict, kind: str, where: str) -> str:
    if entry.get("module"):
        return str(entry["module"])
    if kind not in STAGES:
        key = "stage" if entry.get("stage") else "name"
        raise QuillError(
            f"{where}: '{kind}' is not a Quill stage ({', '.join(STAGES)})",
            did_you_mean(kind, STAGES)
            or f"set {key} to one of them, or stage: <kind> / module: <python module> for a custom stage",
        )
    return stage_module(kind)


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
        raise QuillError(
            f"{where}accelerate config {value} not found",
            did_you_mean(p.stem, names) or f"use a file, or one of: {', '.join(names)}",
        )
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        cfg = load_config_from_file(str(path))
    except Exception as e:  # accelerate raises ValueError/TypeError/KeyError/YAMLError for a bad file
        raise QuillError(
            f"{where}accelerate config {display_path(path)} is invalid: {type(e).__name__}: {one_line(e)}",
            "compare it with the shipped ones (recipes/accelerate/), or write one with `accelerate config`",
        ) from None
    return path.resolve(), bool(getattr(cfg, "use_cpu", False))


def import_stage(spec: StageSpec, recipe_dir: Path | None = None):
    """Imports a stage module (only stages that run) and checks it follows the contract."""
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
        raise QuillError(f"{spec.module} defines no ARG_TYPES tuple of dataclasses", "see docs/recipes.md")
    if not callable(getattr(module, "main", None)):
        raise QuillError(f"{spec.module} defines no main(argv)", "see docs/recipes.md")
    return module


def route_overrides(
    overrides: list[str], stage_names: list[str], accepted: dict[str, set[str]]
) -> dict[str, list[str]]:
    """Splits `key=value` / `stage.key=value` overrides per stage.

    `accepted` maps each selected stage to the keys it takes; a stage in `stage_names` but not in `accepted` is
    not selected, so its scoped overrides are dropped. An unscoped `hub_model_id=user/x` gives each stage its own
    repo, `user/x-<stage>`: one repo for all would hold only the last stage's push.
    """
    routed: dict[str, list[str]] = {name: [] for name in accepted}
    for raw in overrides:
        key, sep, value = raw.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if key.rpartition(".")[2] in SECRET_KEYS:  # refused without echoing the value
            raise QuillError(
                f"override '{key}=***': a secret on the command line shows in `ps` and in the run record",
                "export HF_TOKEN=... (or run `hf auth login`) instead",
            )
        where = f"override '{raw}'"
        if not sep or not key:
            raise QuillError(f"{where} is not key=value", "e.g. learning_rate=1e-4 or sft.learning_rate=1e-4")
        head, dot, rest = key.partition(".")
        if "output_dir" in (head, rest.partition(".")[0]):
            raise QuillError(f"{where}: output_dir is set by the recipe", "use --output-dir to move the whole run")
        own_repo = False  # scoped, the id is the user's exactly
        if dot and head in stage_names:
            targets, key = [head], rest
        else:
            own_repo = key == "hub_model_id" and value.strip() not in ("", "null", "~")  # unset stays unset
            targets = [name for name, keys in accepted.items() if head in keys]
            if not targets:
                guess = did_you_mean(head, list(stage_names)) if dot else None
                if guess:
                    raise QuillError(f"{where}: '{head}' is not a stage of this recipe", guess)
                every = sorted(set().union(*accepted.values())) if accepted else []
                raise QuillError(
                    f"{where}: no stage selected to run accepts '{head}'",
                    did_you_mean(head, every) or "check the key, or scope it: <stage>.<key>=value",
                )
        for name in (t for t in targets if t in accepted):  # a stage that does not run this time takes nothing
            if key.partition(".")[0] not in accepted[name]:
                raise unknown_key_error(key.partition(".")[0], sorted(accepted[name]), f"{where}: stage '{name}'")
            routed[name].append(f"{key}={_stage_repo(value, name, where) if own_repo else value}")
    return routed


def _stage_repo(repo_id: str, stage: str, where: str) -> str:
    """`user/x` for stage `sft` is `user/x-sft`; a stage name the Hub cannot take in an id is refused here."""
    repo = f"{repo_id}-{stage}"
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise QuillError(
            f"{where}: stage '{stage}' would push to '{repo}', which is not a Hub repo id",
            f"scope it: {stage}.hub_model_id=user/name",
        ) from None
    return repo


def plan_recipe(
    recipe: Recipe,
    output_dir: Path,
    from_stage: str | None = None,
    until_stage: str | None = None,
    overrides: list[str] | tuple = (),
    overwrite: bool = False,
    smoke: bool = False,
) -> list[StagePlan]:
    """Everything up front, before any stage runs: stage selection, imports, arguments, dependencies, skips.
    With `smoke`, every selected stage is shrunk first (smoke_overrides); the user's overrides still win."""
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
                "add quill.arguments.OutputArguments (output_dir, overwrite) to its ARG_TYPES",
            )
    if smoke:
        overrides = [o for s in selected for o in smoke_overrides(s, accepted[s.name])] + list(overrides)
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
        tokenizer_dep = tokenizer_stage.name if tokenizer_stage and tokenizer_stage is not s else None
        for key, dep in (
            ("model_name_or_path", s.from_stage),
            ("tokenizer_name_or_path", tokenizer_dep),
            ("reward_model_path", s.reward_model),
            ("teacher_model_name_or_path", s.teacher),
        ):
            if dep is None or key in explicit or names.index(dep) > names.index(s.name):
                continue  # set explicitly, or a tokenizer stage placed after this one (not its tokenizer)
            if key not in accepted[s.name]:
                if key == "tokenizer_name_or_path":
                    continue  # optional: only stages that load a tokenizer take it
                entry = {"model_name_or_path": "from", "reward_model_path": "reward_model"}.get(key, "teacher")
                raise QuillError(
                    f"{s.where}: its module {s.module} accepts no {key}",
                    f"drop the stage's {entry}, or give its ARG_TYPES a field {key}",
                )
            argv.append(f"{key}={display_path(output_dir / dep)}")
            deps.append(dep)
        if overwrite:
            argv.append("overwrite=true")
        argv += routed[s.name]
        try:  # the whole parse, TrainingArguments' checks included, without running anything
            parsed = build_stage_args(modules[s.name].ARG_TYPES, argv)
        except QuillError as e:
            raise QuillError(f"stage '{s.name}': {e.problem}", e.fix) from None
        for dep in deps:
            if dep not in {x.name for x in selected} and check_finished(output_dir / dep) is None:
                raise QuillError(
                    f"previous stage '{dep}' has no finished output at {display_path(output_dir / dep)}",
                    "run it first or drop --from",
                )
        upstream_runs = any(d in {x.name for x in selected} and not plans_skip(plans, d) for d in deps)
        skip = not overwrite and not upstream_runs and check_finished(out, fingerprint(parsed), s.name) is not None
        plans.append(StagePlan(s, out, argv, skip))
    return plans


# `quill run --smoke`: does every stage of a recipe run, end to end? Each stage trains for SMOKE["max_steps"] steps
# on one CPU process, at tiny size, every dataset capped at SMOKE_ROWS rows (read before anything more is downloaded).
SMOKE = {
    "max_steps": 2,
    "save_steps": 2,
    "logging_steps": 1,
    "warmup_steps": 0,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "use_cpu": True,
    "bf16": False,
    "fp16": False,
    "dataloader_num_workers": 0,
    "gradient_checkpointing": False,
    "report_to": "none",
    "max_length": 512,  # long enough that TRL keeps real-length chat samples (it drops longer preference pairs)
    "max_completion_length": 8,
    "num_generations": 2,
    "vocab_size": 512,
    "max_train_documents": 64,
    "task_eval_limit": 4,
}
SMOKE_MODEL = {"depth": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
SMOKE_LAYER_KEYS = ("num_hidden_layers", "num_decoder_layers")
SMOKE_DERIVED_KEYS = ("head_dim", "num_key_value_heads")  # left out: QuillConfig derives them from SMOKE_MODEL
SMOKE_ROWS, SMOKE_EVAL_ROWS = 64, 4


def smoke_overrides(spec: StageSpec, accepted: set[str]) -> list[str]:
    """`stage.key=value` overrides that shrink one stage for a smoke run (the user's own overrides come after)."""
    values = {k: v for k, (v, _) in load_config_file(spec.config).values.items()} if spec.config else {}
    settings = {k: v for k, v in SMOKE.items() if k in accepted}
    if "model_config" in values:
        shrunk = {**values["model_config"], **SMOKE_MODEL, "max_position_embeddings": 512}
        # A layer count set beside depth (an encoder's num_hidden_layers, an encoder-decoder's num_decoder_layers)
        # follows the smoke depth, and head shapes follow its width: else a smoke model keeps the full-size stack.
        for key in SMOKE_LAYER_KEYS:
            if key in shrunk:
                shrunk[key] = SMOKE_MODEL["depth"]
        settings["model_config"] = {k: v for k, v in shrunk.items() if k not in SMOKE_DERIVED_KEYS}
    if values.get("eval_size"):
        settings["eval_size"] = SMOKE_EVAL_ROWS
    if values.get("dataset_mixture"):
        entries = values["dataset_mixture"]
        entries = [entries] if isinstance(entries, (str, dict)) else entries
        entries = [{"path": e} if isinstance(e, str) else dict(e) for e in entries]
        for entry in entries:
            entry["max_samples"] = min(entry.get("max_samples") or SMOKE_ROWS, SMOKE_ROWS)
        settings["dataset_mixture"] = entries
    return [f"{spec.name}.{key}={json.dumps(value)}" for key, value in settings.items()]


def plans_skip(plans: list[StagePlan], name: str) -> bool:
    return any(p.spec.name == name and p.skip for p in plans)
