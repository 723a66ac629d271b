"""A stage's output folder: resume points, the final Hub-format checkpoint, its model card, and the Hub push.

Layout of `OUT/<stage>/` (the stage's `output_dir`):
    checkpoints/checkpoint-N/   Trainer checkpoints while the stage runs (deleted once it finishes)
    config.json, model.safetensors, modeling_quill.py, ..., tokenizer files, chat_template.jinja,
    generation_config.json, README.md (model card), metrics.json, training_log.json
    quill_stage.json            written last and atomically: the stage is finished (`is_stage_done`)

A half-written checkpoint is never resumed from, and the final files of a stage only count once the marker exists,
so a kill at any moment leaves either the previous good state or the new one.
"""

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from quill.errors import QuillError, first_line
from quill.markers import MARKER, clear_stage_done, mark_stage_done

CHECKPOINTS = "checkpoints"


# -- output folder ---------------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: str, overwrite: bool = False) -> Path:
    """Check the folder is usable; on overwrite, forget the old run's resume points (its final files stay until replaced)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise QuillError(f"output_dir '{out}' is a file", fix="choose a folder path for output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise QuillError(f"output_dir '{out}' is not writable ({err.strerror})",
                         fix="choose a folder you can write to") from err
    if overwrite:
        clear_stage_done(out)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return out


def last_complete_checkpoint(output_dir) -> str | None:
    """Newest `checkpoint-N` whose trainer_state.json parses and says step N.

    The Trainer writes trainer_state.json after the weights, optimizer, scheduler and RNG states, so a valid one
    means the whole checkpoint made it to disk. Anything newer (a save killed half-way) is ignored.
    """
    root = Path(output_dir) / CHECKPOINTS
    candidates = []
    for path in root.glob("checkpoint-*") if root.is_dir() else []:
        try:
            step = int(path.name.split("-")[-1])
            state = json.loads((path / "trainer_state.json").read_text())
        except (ValueError, OSError, json.JSONDecodeError):
            continue
        if state.get("global_step") == step:
            candidates.append((step, path))
    return str(max(candidates)[1]) if candidates else None


# -- training guards -------------------------------------------------------------------------------------------


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop the stage before a NaN/inf update is applied, so no checkpoint ever holds a diverged model."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not torch.stack(torch._foreach_norm(grads)).isfinite().all():
            raise QuillError(
                f"loss became NaN or inf at step {state.global_step + 1}",
                fix="lower learning_rate or set max_grad_norm; the last good checkpoint is kept and the stage resumes "
                "from it when re-run",
            )


# -- finishing a stage -----------------------------------------------------------------------------------------


def sync_generation_config(model, tokenizer) -> None:
    """Make `pipeline()` stop at the end of an assistant turn: eos = [<|end|>, eos] (TRL leaves only eos there)."""
    eos_ids = [tokenizer.eos_token_id]
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id and end_id not in eos_ids:
        eos_ids.insert(0, end_id)
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = eos_ids


def finish_stage(trainer, tokenizer, output_dir, *, stage: str, card: dict, metrics: dict,
                 merge_lora: bool = False) -> None:
    """Write the final Hub-format folder, then the completion marker. Call on every process (saving may gather)."""
    out = Path(output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_peft = hasattr(model, "peft_config")
    base = model.get_base_model() if is_peft else model
    if hasattr(base, "generation_config") and base.generation_config is not None:
        sync_generation_config(base, tokenizer)

    staging = out / ".final"
    if trainer.accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    if is_peft and merge_lora:
        if trainer.accelerator.is_main_process:
            model.merge_and_unload().save_pretrained(staging)
    else:
        trainer.save_model(str(staging))  # handles FSDP/DeepSpeed gathering and saves only on the main process
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(staging)
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle, and it may hold the Hub token
        log = [{k: v for k, v in row.items() if _finite(v)} for row in trainer.state.log_history]
        (staging / "training_log.json").write_text(json.dumps(log, indent=1))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (staging / "README.md").write_text(model_card(stage=stage, metrics=metrics, **card))
        for item in staging.iterdir():
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        staging.rmdir()
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        mark_stage_done(out, {"stage": stage})
    trainer.accelerator.wait_for_everyone()


def _finite(v) -> bool:
    return not (isinstance(v, float) and not math.isfinite(v))


def model_card(*, stage: str, base_model: str | None, datasets: list[str], metrics: dict,
               hub_model_id: str | None = None) -> str:
    """A Hub model card: what this checkpoint is, where it came from, what it scored, and how to load it."""
    repo = hub_model_id or "path/to/this/folder"
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- quill", f"- {stage}"]
    if base_model:
        front.append(f"base_model: {base_model}")
    if datasets:
        front += ["datasets:"] + [f"- {d}" for d in datasets]
    front.append("---")
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    task = "text-classification" if stage == "reward" else "text-generation"
    return "\n".join(front) + f"""

# Quill — {stage} stage

A Quill decoder-only language model after the **{stage}** stage of a Quill pipeline run.

- Base model: {base_model or "trained from scratch"}
- Data: {", ".join(datasets) or "n/a"}

## Metrics (held-out)

| metric | value |
|---|---|
{rows}

## Use

Quill's modeling code ships in this folder, so loading runs it as remote code (`trust_remote_code=True`);
with Quill installed, `import quill.model` first and it loads with the installed code, no flag needed.

```python
from transformers import pipeline
pipe = pipeline("{task}", model="{repo}", trust_remote_code=True)
print(pipe([{{"role": "user", "content": "What is 3 + 4?"}}]{", max_new_tokens=32" if task == "text-generation" else ""}))
```
"""


# -- Hub -------------------------------------------------------------------------------------------------------


def push_folder(output_dir, hub_model_id: str, token: str | None = None, attempts: int = 3, wait: float = 2.0) -> str:
    """Upload a finished stage folder (not its checkpoints). Retries, then one clear error; the local copy is untouched."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    last_error = None
    for attempt in range(1, attempts + 1):
        try:
            api.create_repo(hub_model_id, exist_ok=True)
            info = api.upload_folder(folder_path=str(output_dir), repo_id=hub_model_id,
                                     ignore_patterns=[f"{CHECKPOINTS}/*", ".*", MARKER],
                                     commit_message="Upload Quill checkpoint")
            return getattr(info, "commit_url", hub_model_id)
        except Exception as err:  # network and HTTP errors differ across huggingface_hub versions
            last_error = err
            if attempt < attempts:
                time.sleep(wait * attempt)
    raise QuillError(f"push to the Hub repo '{hub_model_id}' failed after {attempts} attempts "
                     f"({type(last_error).__name__}: {first_line(last_error, 160)})",
                     fix=f"the local output in {output_dir} is complete; check the network/token and re-run with "
                     "--overwrite or push it with `huggingface-cli upload`")
