"""A stage's output folder: preparing and locking it, its checkpoints, its fingerprint, and the finished folder.

Layout of `OUT/<stage>/` while the stage trains, and once it is finished:
    checkpoints/checkpoint-N/        resume points (the Trainer's), with checkpoints/quill_fingerprint.json
    config.json, model.safetensors, modeling_quill.py, ..., tokenizer files, generation_config.json,
    README.md (model card), metrics.json, training_log.json, quill_stage.json (the marker: finished)
Beside it: `OUT/.<stage>.lock` (held while a process works on the folder), and during the final swap
`OUT/.<stage>.staged` (the finished folder being written) and `OUT/.<stage>.previous` (what it replaces).

Rules that keep a folder from being corrupted:
- One process at a time per folder (an advisory lock the kernel releases when its holder dies).
- Nothing is deleted until the stage's inputs have been checked (`clear_for_overwrite` is called late).
- The finished folder is written beside the old one, marker last, then swapped in by rename: no file of an earlier
  run survives, and a kill at any moment leaves the previous state or the new one (`recover` completes a swap).
- A checkpoint is resumed from only if every file resume needs is there; a fingerprint of what determines the
  weights (model, data, training settings) must match, or the stage stops and says what differs.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path

from quill.errors import QuillError, display_path, one_line

MARKER = "quill_stage.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_FINGERPRINT = "quill_fingerprint.json"
# Fields of the training configs that do not change the weights: left out of the fingerprint, so changing how
# often a run logs or saves, where it reports or pushes, does not count as a different run.
NOT_FINGERPRINTED = (
    "output_dir",
    "overwrite",
    "logging_",
    "log_",
    "save_",
    "eval_",
    "per_device_eval_batch_size",
    "hub_",
    "push_to_hub",
    "report_to",
    "run_name",
    "project",
    "trackio_",
    "dataloader_",
    "disable_tqdm",
    "use_cpu",
    "local_rank",
    "ddp_",
    "fsdp",
    "deepspeed",
    "accelerator_config",
    "parallelism_config",
    "task_eval",
    "include_",
    "skip_memory_metrics",
    "debug",
    "tokenizer_name_or_path",
    "trust_remote_code",
    "merge_lora_on_save",
    "gradient_checkpointing",
    "activation_checkpointing",
    "torch_empty_cache_steps",
    "prediction_loss_only",
)


# -- small atomic writes ---------------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a marker is readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the marker and the fingerprint -----------------------------------------------------------------------------


# The options that name another model a stage computes with: a retrained upstream model makes the stage stale.
MODEL_SOURCES = ("model_name_or_path", "reward_model_path", "teacher_model_name_or_path")


def fingerprint(parsed: tuple) -> dict:
    """What determines a stage's weights, from its parsed config dataclasses: model and tokenizer sources, data
    sources (with size or revision), and every training setting except the ones in NOT_FINGERPRINTED."""
    settings, sources = {}, {}
    for obj in parsed:
        values = obj.to_dict() if hasattr(obj, "to_dict") else {k: getattr(obj, k) for k in vars(obj)}
        for key, value in values.items():
            if key.startswith("_") or key.startswith(NOT_FINGERPRINTED):
                continue
            if key in MODEL_SOURCES:
                sources[key] = source_identity(value, getattr(obj, "model_revision", None))
            elif key == "dataset_mixture":
                sources[key] = [{**e, "identity": source_identity(e["path"], e.get("revision"))} for e in value]
            else:
                settings[key] = value
    return json.loads(json.dumps({"sources": sources, "settings": settings}, default=str))


def source_identity(path, revision: str | None = None) -> dict | None:
    """How a model or data source is recognised again: a finished stage by when it finished, a local file by its
    size, a model folder by its config, anything else (a Hub id) by name and revision."""
    if not path:
        return None
    p = Path(str(path)).expanduser()
    if (p / MARKER).is_file():
        return {"stage": str(p.resolve()), "finished_at": read_json(p / MARKER).get("finished_at")}
    if p.is_file():
        return {"file": str(p.resolve()), "bytes": p.stat().st_size}
    if (p / "config.json").is_file():
        return {
            "folder": str(p.resolve()),
            "config_sha256": hashlib.sha256((p / "config.json").read_bytes()).hexdigest(),
        }
    if p.is_dir():
        return {"folder": str(p.resolve()), "bytes": sum(f.stat().st_size for f in p.rglob("*") if f.is_file())}
    return {"id": str(path), "revision": revision}


def fingerprint_difference(old: dict, new: dict) -> str | None:
    """'learning_rate: 0.001 -> 0.002' for the first thing that differs, or None."""
    for section in ("sources", "settings"):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                shown = lambda v: json.dumps(v)[:80]  # noqa: E731
                return f"{key}: {shown(a.get(key))} -> {shown(b.get(key))}"
    return None


def mark_done(folder: Path, info: dict) -> Path:
    """Write the marker. LAST, on the main process only: a crash mid-write never leaves a "done" marker."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / MARKER, {**info, "done": True, "finished_at": datetime.now(UTC).isoformat()})
    return folder / MARKER


def check_finished(folder: Path, fp: dict | None = None, name: str | None = None) -> dict | None:
    """The marker of a finished folder, else None. With `fp`, a finished folder made with a different fingerprint
    is an error that says what differs (a skip would silently keep the other run's result)."""
    marker = read_json(Path(folder) / MARKER)
    if marker.get("done") is not True:
        return None
    recorded = marker.get("fingerprint")  # a custom stage's marker may have none: nothing to compare then
    difference = fingerprint_difference(recorded, fp) if fp is not None and recorded is not None else None
    if difference:
        raise QuillError(
            f"stage '{name or Path(folder).name}' finished earlier with other settings ({difference})",
            "pass overwrite=true (quill run --overwrite) to redo it, or restore the settings it was run with",
        )
    return marker


# -- locking and preparing --------------------------------------------------------------------------------------


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "stage"):
    """Hold `.<name>.lock` beside `folder` while the block runs; a second holder gets one line naming the first.
    flock locks die with their process, so a killed run leaves nothing that blocks the next one."""
    folder = Path(folder).resolve()
    path = folder.parent / f".{folder.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_json(path)
            raise QuillError(
                f"{what} folder {display_path(folder)} is in use by pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} since {holder.get('since', '?')}",
                "wait for that run to finish or stop it, or pick another output folder",
            ) from None
        os.ftruncate(fd, 0)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.write(fd, json.dumps(holder).encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def prepare_run_dir(folder: Path) -> Path:
    """The run folder (or a stage folder) exists, is a folder, and is writable; nothing in it is touched."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise QuillError(f"output folder {display_path(folder)} is a file", "choose a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise QuillError(
            f"output folder {display_path(folder)} is not writable ({err.strerror})", "choose a folder you can write to"
        ) from None
    return folder


def recover(folder: Path) -> None:
    """Finish or undo a swap of the finished folder that a kill interrupted (see finish_folder)."""
    staged, previous = _sibling(folder, "staged"), _sibling(folder, "previous")
    if staged.exists() and (staged / MARKER).is_file() and not folder.exists():
        os.replace(staged, folder)  # the new folder was complete: finish the swap
    shutil.rmtree(staged, ignore_errors=True)  # an unfinished staged folder is a leftover
    if previous.exists():
        if folder.exists():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(previous, folder)  # killed between the two renames, before the new one was complete


def clear_for_overwrite(folder: Path) -> None:
    """Forget an earlier run of this stage: its marker and its resume points. Call once the inputs are checked;
    its other files stay until the new finished folder replaces the whole folder."""
    (Path(folder) / MARKER).unlink(missing_ok=True)
    shutil.rmtree(Path(folder) / CHECKPOINTS, ignore_errors=True)


def _sibling(folder: Path, kind: str) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.{kind}"


# -- checkpoints ------------------------------------------------------------------------------------------------


def _has_weights(ckpt: Path) -> bool:
    names = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    sharded = any(ckpt.glob("pytorch_model_fsdp_*")) or any(ckpt.glob("global_step*"))  # FSDP / DeepSpeed
    return sharded or any((ckpt / n).is_file() and (ckpt / n).stat().st_size > 0 for n in names)


def _has_optimizer(ckpt: Path) -> bool:
    return (ckpt / "optimizer.pt").is_file() or any(ckpt.glob("optimizer_*")) or any(ckpt.glob("global_step*"))


def _has_rng_states(ckpt: Path) -> bool:
    """Every rank's RNG file was written to the end. The Trainer writes trainer_state.json on rank 0 without waiting
    for the other ranks' `rng_state_<rank>.pth`, so a rank killed just then leaves a checkpoint that looks done but
    fails its resume with EOFError (CI caught this). A distributed save writes one file per rank, at least two."""
    files = list(ckpt.glob("rng_state*.pth"))  # rng_state.pth (one process) or rng_state_<rank>.pth
    ranks = sorted(int(i) for i in (p.stem.removeprefix("rng_state_") for p in files) if i.isdigit())
    if ranks and ranks != list(range(max(ranks[-1], 1) + 1)):
        return False
    return all(zipfile.is_zipfile(p) for p in files)  # torch.save writes a zip: a cut one is not


def is_complete_checkpoint(ckpt: Path) -> bool:
    """trainer_state.json (written last by the Trainer) says step N, and the weights, optimizer, scheduler and RNG
    states that resume needs are there: a save killed half-way, or a checkpoint half-deleted by rotation, is not."""
    try:
        step = int(ckpt.name.rsplit("-", 1)[-1])
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (ValueError, OSError):
        return False
    return (
        state.get("global_step") == step
        and _has_weights(ckpt)
        and _has_optimizer(ckpt)
        and ((ckpt / "scheduler.pt").is_file() or any(ckpt.glob("global_step*")))
        and _has_rng_states(ckpt)
    )


def checkpoints(folder: Path) -> list[Path]:
    """Every `checkpoint-N` of a stage folder, oldest first."""
    root = Path(folder) / CHECKPOINTS
    return sorted((p for p in root.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()), key=_step)


def resume_point(folder: Path, fp: dict, name: str, clean: bool = True) -> str | None:
    """The newest complete checkpoint to resume from, after checking that it was made with the same fingerprint;
    None to start fresh. With `clean` (the main process), incomplete checkpoints newer than it are deleted."""
    root = Path(folder) / CHECKPOINTS
    complete = [p for p in checkpoints(folder) if is_complete_checkpoint(p)]
    for p in checkpoints(folder):
        if clean and p not in complete and (not complete or _step(p) > _step(complete[-1])):
            shutil.rmtree(p, ignore_errors=True)
    if not complete:
        return None
    recorded = read_json(root / CHECKPOINT_FINGERPRINT)
    difference = fingerprint_difference(recorded, fp) if recorded else "no fingerprint recorded"
    if difference:
        raise QuillError(
            f"stage '{name}' has checkpoints made with other settings ({difference})",
            "restore those settings to resume, or pass overwrite=true to start over",
        )
    return str(complete[-1])


def _step(ckpt: Path) -> int:
    return int(ckpt.name.rsplit("-", 1)[-1])


def record_fingerprint(folder: Path, fp: dict) -> None:
    root = Path(folder) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / CHECKPOINT_FINGERPRINT, fp)


# -- the finished folder ----------------------------------------------------------------------------------------


def staged_path(folder: Path) -> Path:
    """Where the finished folder is built (the model may be saved there first, by every process)."""
    return _sibling(folder, "staged")


def finish_folder(folder: Path, write_files, marker: dict, weights: bool = True) -> None:
    """Complete the finished folder beside `folder` with `write_files(staged)`, check its weights load, write the
    marker last, then swap it in whole. Main process only. On any failure the staged folder is removed and
    `folder` is as it was (its checkpoints included)."""
    folder = Path(folder)
    staged, previous = _sibling(folder, "staged"), _sibling(folder, "previous")
    try:
        staged.mkdir(parents=True, exist_ok=True)
        write_files(staged)
        if weights:
            check_loadable_weights(staged)
        mark_done(staged, marker)
        if folder.exists():
            os.replace(folder, previous)  # checkpoints and the old files go aside, in one rename
        os.replace(staged, folder)
    except OSError as err:
        shutil.rmtree(staged, ignore_errors=True)
        if previous.exists() and not folder.exists():
            os.replace(previous, folder)
        raise disk_error(err, folder) from err
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def check_loadable_weights(folder: Path) -> None:
    """The folder holds weights whose safetensors headers parse: a save that wrote no model files (FSDP with a
    sharded state dict) or a torn one must never be marked finished, or its checkpoints deleted."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QuillError(
            f"the finished folder {display_path(folder)} holds no model weights (*.safetensors)",
            "nothing was marked finished and the checkpoints are kept; under FSDP use "
            "fsdp_state_dict_type: FULL_STATE_DICT or SHARDED_STATE_DICT with Quill's gather, then re-run",
        )
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                list(f.keys())
        except Exception as err:
            raise QuillError(
                f"{display_path(file)} is not a readable safetensors file ({one_line(err, 120)})",
                "nothing was marked finished; re-run the stage to save again",
            ) from None


def disk_error(err: OSError, where: Path) -> Exception:
    """A full disk (or quota) as one line that says what is intact; other OS errors pass through unchanged."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return err
    return QuillError(
        f"no space left on the device while writing {display_path(Path(where))}",
        "free some space and re-run the same command: earlier checkpoints and finished stages are "
        "intact, and the stage resumes from its newest complete checkpoint",
    )
