"""`quill eval`: every held-out metric that applies to a model folder or Hub id, Quill or not.

    quill eval MODEL_OR_DIR [--data-dir D] [--limit N] [--output FILE] [--trust-remote-code]
               [--lm-eval TASKS [--lm-eval-include DIR] [--lm-eval-only]]

A reward model gets preference accuracy; a causal LM gets held-out loss / bits per byte and task accuracy, plus
mean reward (RL stage) or DPO implicit-reward accuracy (a DPO stage whose starting model is found). Results are
printed and written to --output (default: ./eval_results/<model name>.json, never inside the model folder; for a
stage folder of a `quill run`, OUT/eval/<stage>.json, whose lm-eval rows `quill report` shows with the stage).
`--lm-eval TASKS` adds lm-evaluation-harness results (quill.tools.harness; `pip install quill[lm-eval]`).
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from quill.errors import QuillError, one_line, run_guarded
from quill.loading import CAUSAL_LM, CLASSIFIER, check_model_path, load_for_inference, load_tokenizer
from quill.metrics import generate_completions, heldout_loss, preference_accuracy, reward_metrics, score_completions
from quill.output import MARKER, read_json
from quill.tools.harness import parse_tasks, run_lm_eval

# Rows `quill eval` scores from the default data when --limit is not given: enough to compare stages, quick on CPU.
DEFAULT_EVAL_ROWS = {"pretrain_eval": None, "rl_eval": 200, "dpo_eval": 100}
EVAL_FILES = tuple(DEFAULT_EVAL_ROWS)

# -- eval data -------------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    folder: Path
    texts: list[str] = field(default_factory=list)  # pretrain_eval {text}
    task_rows: list[dict] = field(default_factory=list)  # rl_eval {prompt, task, answer, metadata}
    pairs: list[dict] = field(default_factory=list)  # dpo_eval {prompt, chosen, rejected, task}


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise QuillError(
                        f"{path}:{n}: not valid JSON ({err.msg})", fix="fix or regenerate the file"
                    ) from None
    return rows


def default_eval_dir() -> Path:
    """The embedded default data's folder, the same one `quill:default/...` recipes train from (built once)."""
    from quill.data import builtin

    return Path(builtin.resolve("quill:default/rl_eval")).parent


def load_eval_data(data_dir=None, limit: int | None = None) -> EvalData:
    """pretrain_eval/rl_eval/dpo_eval.jsonl from `data_dir` (default: the default data), `limit` rows each."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise QuillError(
            f"eval data folder '{data_dir}' not found", fix="pass --data-dir a folder made by the data step"
        )
    folder = Path(data_dir) if data_dir is not None else default_eval_dir()
    rows = {
        name: limit if limit is not None or data_dir is not None else DEFAULT_EVAL_ROWS[name] for name in EVAL_FILES
    }
    texts = [r["text"] for r in _read_jsonl(folder / "pretrain_eval.jsonl", rows["pretrain_eval"]) if r.get("text")]
    data = EvalData(
        folder,
        texts,
        _read_jsonl(folder / "rl_eval.jsonl", rows["rl_eval"]),
        _read_jsonl(folder / "dpo_eval.jsonl", rows["dpo_eval"]),
    )
    if not (data.texts or data.task_rows or data.pairs):
        raise QuillError(
            f"eval data folder '{folder}' has none of {', '.join(f + '.jsonl' for f in EVAL_FILES)}",
            fix="pass --data-dir a folder with held-out files in the default data's layout",
        )
    return data


# -- any model folder or Hub id --------------------------------------------------------------------------------


def model_kind(path: str, trust_remote_code: bool = False) -> str:
    """CLASSIFIER for a sequence classifier (config architectures), else CAUSAL_LM."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise QuillError(
            f"model '{path}' could not be loaded ({one_line(err, 200)})",
            fix="pass a model folder or Hub id (add --trust-remote-code for custom code)",
        ) from err
    archs = getattr(config, "architectures", None) or []
    return CLASSIFIER if any(a.endswith("ForSequenceClassification") for a in archs) else CAUSAL_LM


def stage_info(path: str) -> tuple[str | None, str | None]:
    """(stage, starting model) of a Quill stage folder, from its completion marker (which is never pushed)."""
    marker = read_json(Path(path) / MARKER)
    base = marker.get("base_model")
    # As recorded, else a sibling of the same name: a run folder that was moved keeps its stages side by side.
    found = (
        [c for c in (Path(base), Path(path).parent / Path(base).name) if (c / "config.json").exists()] if base else []
    )
    return marker.get("stage"), str(found[0]) if found else None


def load_on_device(path: str, tokenizer, task: str, trust_remote_code: bool):
    """The model in float32 on this process's device (accelerate's: the GPU when there is one), as stages place it."""
    args = SimpleNamespace(model_name_or_path=None, trust_remote_code=trust_remote_code)
    return load_for_inference(path, args, "eval", tokenizer, task=task)


def evaluate_model(
    model_name_or_path: str,
    data_dir=None,
    limit: int | None = None,
    trust_remote_code: bool = False,
    max_new_tokens: int = 32,
) -> dict:
    """Every metric that applies to this model: a reward model gets preference accuracy; a causal LM gets held-out
    loss / bits per byte and task accuracy, plus mean reward (RL stage) or DPO implicit-reward accuracy (DPO stage
    whose base model folder is found)."""
    path = str(model_name_or_path)
    check_model_path(path)
    kind = model_kind(path, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    data = load_eval_data(data_dir, limit)
    model = load_on_device(path, tokenizer, kind, trust_remote_code)
    if kind == CLASSIFIER:
        if not data.pairs:
            raise QuillError(f"a reward model needs preference pairs; '{data.folder}' has no dpo_eval.jsonl")
        return preference_accuracy(model, tokenizer, data.pairs)

    metrics = heldout_loss(model, tokenizer, data.texts) if data.texts else {}
    stage, base = stage_info(path) if Path(path).is_dir() else (None, None)
    if data.task_rows and tokenizer.chat_template:
        completions = generate_completions(model, tokenizer, [r["prompt"] for r in data.task_rows], max_new_tokens)
        metrics.update(score_completions(data.task_rows, completions))
        if stage == "rl":
            metrics.update(reward_metrics(data.task_rows, completions))
    elif data.task_rows:
        _note("task accuracy skipped: the tokenizer has no chat template")
    reference_path = base if stage == "dpo" and data.pairs else None
    if reference_path:
        reference = load_on_device(reference_path, tokenizer, CAUSAL_LM, trust_remote_code)
        metrics.update(preference_accuracy(model, tokenizer, data.pairs, reference=reference))
    elif stage == "dpo":
        _note(f"DPO implicit-reward accuracy skipped: base model '{base}' not found")
    return metrics


def _note(msg: str) -> None:
    print(f"[quill] eval: {msg}", file=sys.stderr, flush=True)


# -- CLI -------------------------------------------------------------------------------------------------------


def format_table(metrics: dict) -> str:
    width = max([len("metric")] + [len(k) for k in metrics])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    for key, value in metrics.items():
        lines.append(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quill eval", description="Held-out metrics of a model folder or Hub id.")
    p.add_argument("model", help="model folder (any stage's output, or any Hub-format folder) or Hub id")
    p.add_argument("--data-dir", help="folder with pretrain_eval/rl_eval/dpo_eval.jsonl (default: the default data)")
    p.add_argument("--limit", type=int, help="use at most N rows of each eval file")
    p.add_argument("--output", help="JSON file for the results (default: eval_results/<model name>.json here)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation budget per task answer")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modeling code to run")
    p.add_argument("--lm-eval", metavar="TASKS", help="also run these lm-evaluation-harness tasks (comma-separated)")
    p.add_argument("--lm-eval-include", metavar="DIR", help="folder of your own lm-eval task YAMLs")
    p.add_argument("--lm-eval-only", action="store_true", help="only lm-eval, not Quill's own held-out metrics")
    return p


def default_output(model: str) -> Path:
    folder = Path(model)
    if (folder / MARKER).exists() and (folder.parent / "quill_run.json").exists():
        return folder.parent / "eval" / f"{folder.name}.json"  # beside the stages, where quill report reads it
    return Path("eval_results") / f"{folder.name or 'model'}.json"


def run(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise QuillError(f"--limit expected a positive number of rows, found {args.limit}")
    if not args.lm_eval and (args.lm_eval_include or args.lm_eval_only):
        raise QuillError("--lm-eval-include and --lm-eval-only go with --lm-eval", "add --lm-eval TASKS")
    if args.lm_eval_only and args.data_dir:
        raise QuillError("--data-dir feeds Quill's own metrics, which --lm-eval-only skips", "drop one of them")
    tasks = parse_tasks(args.lm_eval) if args.lm_eval else []
    metrics = {}
    if not args.lm_eval_only:
        metrics = evaluate_model(args.model, args.data_dir, args.limit, args.trust_remote_code, args.max_new_tokens)
    if tasks:  # --limit caps the harness's documents per task too
        metrics.update(run_lm_eval(args.model, tasks, args.lm_eval_include, args.limit, args.trust_remote_code))
    print(format_table(metrics), flush=True)
    # Never inside the model folder: a finished stage folder is the stage's alone.
    output = Path(args.output) if args.output else default_output(args.model)
    result = {"model": args.model, "data_dir": args.data_dir, "limit": args.limit, "metrics": metrics}
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1))
    except OSError as err:
        raise QuillError(f"could not write '{output}' ({err.strerror})", fix="pass --output a writable file") from None
    print(f"saved {output}", file=sys.stderr)
    return metrics


def main(argv: list[str] | None = None) -> None:
    run_guarded(lambda: run(argv))


if __name__ == "__main__":
    main()
