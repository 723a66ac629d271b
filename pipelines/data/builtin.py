"""`quill:default/<name>`: the embedded default data as a dataset path, built offline on first use and cached.

Recipes name e.g. `quill:default/sft_train`; the files come from `default_data.build_default_data` (seed 0,
default sizes, the stage's `demonstrator`) under `$QUILL_CACHE` (default `~/.cache/quill`), one folder per
demonstrator. A recipe takes fewer rows with `max_samples`.
"""

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path

from quill.data import DEFAULT_PREFIX as PREFIX
from quill.data import default_data, tasks
from quill.data.default_data import FILES, build_default_data
from quill.data.tasks import Demonstrator
from quill.errors import QuillError


def code_digest(*modules) -> str:
    """A short hash of the generator modules' source. It names the cache, so any change to a generator (a task's
    config, a size, a format) builds new data. A hand-bumped version once missed a change (3 -> 2 sorted numbers)
    and runs read the stale set."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("QUILL_CACHE", Path.home() / ".cache" / "quill"))


def cache_dir(demonstrator: Demonstrator | None = None) -> Path:
    d = Demonstrator() if demonstrator is None else demonstrator
    variant = "-".join(str(v) for v in astuple(d))  # e.g. number_sorting-descending-ascending-0.7
    return cache_root() / f"default-data-{code_digest(default_data, tasks)}-{variant}"


def resolve(path: str, demonstrator: Demonstrator | None = None) -> str:
    """Map `quill:default/NAME` to its local jsonl file (building the set once); any other path is returned as is."""
    if not isinstance(path, str) or not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX) :]
    if name not in FILES:
        raise QuillError(f"dataset '{path}' does not exist", fix=f"use quill:default/ with one of {', '.join(FILES)}")
    target = cache_dir(demonstrator)
    build_once(target, lambda folder: build_default_data(folder, demonstrator=demonstrator))
    return str(target / f"{name}.jsonl")


def build_once(target: Path, build: Callable[[Path], None]) -> None:
    """Build an offline data folder (it ends with SOURCES.md) once: beside the target, then swapped in whole."""
    if (target / "SOURCES.md").exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    build(tmp)
    try:
        os.replace(tmp, target)  # atomic: readers never see a half-built folder
    except OSError:  # another process (e.g. another DDP rank) finished first
        shutil.rmtree(tmp, ignore_errors=True)
