"""lm-evaluation-harness for `quill eval --lm-eval TASKS`: any model folder or Hub id, Quill or not, on the
harness's tasks or on task YAMLs of your own (`--lm-eval-include DIR`, e.g. a task over a local jsonl).

Needs the optional extra: `pip install quill[lm-eval]`. Results come back as flat metrics named
`lm_eval/<task>/<metric>` (the harness's `acc,none` becomes `acc`; another filter than `none` stays as
`acc/<filter>`), which `quill eval` prints and saves, and `quill report` shows as rows of the stage evaluated.
"""

from pathlib import Path

from quill.errors import QuillError, did_you_mean, one_line

PREFIX = "lm_eval/"


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise QuillError(f"--lm-eval expected comma-separated task names, found '{spec}'", "e.g. --lm-eval hellaswag")
    return tasks


def run_lm_eval(
    model: str, tasks: list[str], include: str | None = None, limit: int | None = None, trust_remote_code=False
) -> dict:
    """The harness's results for `tasks` on `model`, as flat `lm_eval/<task>/<metric>` floats."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise QuillError("--lm-eval needs lm-evaluation-harness", "pip install 'quill[lm-eval]'") from None
    import torch

    if include is not None and not Path(include).is_dir():
        raise QuillError(f"--lm-eval-include '{include}' is not a folder", "pass the folder holding your task YAMLs")
    # Indexing the harness's own ~15k task YAMLs takes most of a minute on a small machine: skipped when every task
    # asked for is one of the included ones.
    manager = TaskManager(include_path=include, include_defaults=False) if include is not None else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include, include_defaults=True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        fix = did_you_mean(unknown[0], manager.all_tasks) or "lm-eval ls tasks lists them; --lm-eval-include adds yours"
        raise QuillError(f"unknown lm-eval task '{unknown[0]}'", fix)
    model_args = {"pretrained": model, "trust_remote_code": trust_remote_code, "dtype": "float32"}
    try:
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            device="cuda" if torch.cuda.is_available() else "cpu",
            batch_size=8,
            log_samples=False,
        )
    except (OSError, ValueError) as err:
        raise QuillError(
            f"lm-eval could not run on '{model}' ({one_line(err, 200)})",
            "check the model (add --trust-remote-code for custom code you trust) and the task definitions",
        ) from None
    return flatten(out["results"])


def flatten(results: dict) -> dict:
    """{task: {"acc,none": 0.5, "alias": ...}} -> {"lm_eval/task/acc": 0.5}; names and aliases are dropped."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or key == "sample_len":
                continue
            metric, _, filt = key.partition(",")
            flat[f"{PREFIX}{task}/{metric}" + (f"/{filt}" if filt and filt != "none" else "")] = float(value)
    return flat
