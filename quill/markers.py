"""The completion marker `<output_dir>/quill_stage.json`: how a stage says it finished, and how runs know to skip it.

Written last and atomically by the stage (main process only). A folder without it is unfinished, whatever else it
holds. Kept apart from quill.checkpoint so the recipe runner, report and eval can read it without importing
the Trainer stack.
"""

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

MARKER = "quill_stage.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_stage_done(output_dir: str | os.PathLike, info: dict | None = None) -> Path:
    """Write the marker. Call it LAST, on the main process only: a crash mid-write never leaves a "done" marker."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {**(info or {}), "done": True, "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic_write_text(out / MARKER, json.dumps(record, indent=2, default=str))
    return out / MARKER


def read_stage_done(output_dir: str | os.PathLike) -> dict | None:
    """The marker's contents, or None if the stage has not finished."""
    try:
        record = json.loads((Path(output_dir) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("done") is True else None


def is_stage_done(output_dir: str | os.PathLike) -> bool:
    return read_stage_done(output_dir) is not None


def clear_stage_done(output_dir: str | os.PathLike) -> None:
    (Path(output_dir) / MARKER).unlink(missing_ok=True)
