"""Load training data from the Hub or local files, and mix several sources.

Every source goes through `datasets`: a local file through its packaged builder (`json`, `csv`, `parquet`,
`text`), a `save_to_disk` folder through `load_from_disk`, and anything else (a folder of data files, a local
dataset repo with a README, a Hub id) through `load_dataset(path, name, split=, revision=)`, exactly as for the Hub.
Errors users can fix come out as one-line QuillErrors naming the source.
"""

import codecs
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

from quill.data.formats import apply_format, check_format_name
from quill.data.schemas import check_schema, prepare_rows
from quill.errors import QuillError, did_you_mean

log = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".txt"}  # checked for UTF-8 ourselves: `json` loads bad bytes silently
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes


@dataclass
class DataSource:
    """One dataset in a recipe: `path` is a Hub id (`org/name`) or a local file/folder."""

    path: str
    name: str | None = None  # dataset config on the Hub
    split: str = "train"
    revision: str | None = None  # Hub branch, tag or commit
    weight: float = 1.0  # rows taken = weight x rows: 0.25 keeps a quarter, 2.0 repeats every row twice
    columns: dict[str, str] = field(default_factory=dict)  # renames old -> new, e.g. {"conversations": "messages"}
    max_samples: int | None = None  # keep only the first N rows (after renaming, before weighting)
    format: str | None = None  # alpaca, sharegpt, chat_text (quill.data.formats); None: alpaca/sharegpt recognised

    @classmethod
    def parse(cls, spec: "DataSource | str | dict") -> "DataSource":
        """Build from a recipe entry: a bare path/Hub id string or a dict of the fields above. Errors say what is
        wrong with the entry; the caller says which entry it is."""
        if isinstance(spec, DataSource):
            return spec
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict):
            raise QuillError(
                f"expected a mapping like {{path: ..., weight: ...}}, found {type(spec).__name__}",
                "write each dataset as a mapping or as its path",
            )
        known = [f.name for f in fields(cls)]
        for key in spec:
            if key not in known:
                raise QuillError(f"unknown key '{key}'", did_you_mean(str(key), known) or f"use {', '.join(known)}")
        if not spec.get("path"):
            raise QuillError("'path' is missing", "give the Hub dataset id or a local path as path: ...")
        if not isinstance(spec["path"], str):
            raise QuillError(f"expected 'path' to be text, found {spec['path']!r}", "quote the path")
        src = cls(**spec)
        if not isinstance(src.weight, (int, float)) or src.weight <= 0:
            raise QuillError(f"expected weight > 0, found {src.weight!r}", "use e.g. weight: 0.5")
        if src.max_samples is not None and (not isinstance(src.max_samples, int) or src.max_samples < 1):
            raise QuillError(f"expected max_samples >= 1, found {src.max_samples!r}", "drop it or use 1 or more")
        check_format_name(src.format)
        if not isinstance(src.columns, dict):
            raise QuillError(
                f"expected columns as a mapping old: new, found {src.columns!r}", "write `columns: {old: new}`"
            )
        return src


def _looks_local(path: str) -> bool:
    # A Hub id is `name` or `org/name`; anything with a data suffix, a leading ./ ~ / or deeper nesting is a path.
    return (
        path.startswith((".", "/", "~")) or Path(path).suffix.lower() in BUILDERS or path.count("/") > 1 or "\\" in path
    )


def _check_utf8(file: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                at_line = line + chunk[: e.start].count(b"\n")
                raise QuillError(
                    f"{file}: expected UTF-8 text, found byte 0x{chunk[e.start]:02x} at line {at_line} "
                    f"(byte {offset + e.start})",
                    fix=f"re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {file.name} > fixed{file.suffix}`",
                ) from None
            offset += len(chunk)
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise QuillError(
                f"{file}: expected UTF-8 text, found a truncated UTF-8 sequence at the end (byte {offset})",
                fix="re-encode the file as UTF-8",
            ) from None


def _check_local_files(where: Path, files: list[Path]) -> None:
    if not files:
        raise QuillError(
            f"{where}: expected data files ({', '.join(BUILDERS)}), found none",
            fix="point `path:` at a data file or a folder that holds some",
        )
    for file in files:
        if file.suffix.lower() in TEXT_SUFFIXES:
            _check_utf8(file)
    # `datasets` reports an empty file as a bare StopIteration or "corresponds to no data": say it plainly.
    if all(f.stat().st_size < 1 << 16 and not f.read_bytes().strip() for f in files):
        raise QuillError(f"{where}: expected rows, found an empty dataset", fix="check the file has data")


def _wrap_load_error(src: DataSource, e: Exception) -> QuillError:
    """Turn what `datasets` raises for bad input into one line that says what to check."""
    cause = e
    while cause is not None:  # the useful part is usually the innermost error
        if isinstance(cause, UnicodeDecodeError):
            return QuillError(f"{src.path}: expected UTF-8 text, found {cause.reason}", fix="re-encode it as UTF-8")
        cause = cause.__cause__ or cause.__context__
    msg = " ".join(str(e).split())  # one line
    if isinstance(e, DatasetNotFoundError | FileNotFoundError | ConnectionError):
        return QuillError(
            f"data source {src.path!r}: dataset not found locally or on the Hub ({msg[:200]})",
            fix=f"check the spelling and that a local path exists from {Path.cwd()}; for private Hub datasets log "
            "in with `hf auth login`; offline (HF_HUB_OFFLINE=1) only cached or local datasets load",
        )
    if "Unknown split" in msg:
        return QuillError(f"data source {src.path!r}: split {src.split!r} not found ({msg})", fix="set `split:`")
    if "BuilderConfig" in msg:
        return QuillError(f"data source {src.path!r}: config {src.name!r} not found ({msg})", fix="set `name:`")
    if "corresponds to no data" in msg or isinstance(e, StopIteration):
        return QuillError(f"data source {src.path!r}: expected rows, found an empty dataset", fix="check the data")
    inner = e.__cause__ or e.__context__
    detail = " ".join(str(inner).split()) if isinstance(e, DatasetGenerationError) and inner else msg
    return QuillError(
        f"data source {src.path!r}: could not read it ({detail[:300]})",
        fix="check the file parses in its format (one JSON object per line for .jsonl, a header row for .csv)",
    )


def _load(src: DataSource, streaming: bool):
    path = Path(src.path).expanduser()
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise QuillError(
                f"data source {src.path!r}: expected a {'/'.join(BUILDERS)} file, found suffix {path.suffix!r}",
                fix="convert it to JSON lines, CSV, Parquet or plain text",
            )
        _check_local_files(path, [path])
        return datasets.load_dataset(builder, data_files=str(path), split=src.split, streaming=streaming)
    # A folder written by save_to_disk is not a dataset repo: load_dataset refuses it.
    if path.is_dir() and any((path / m).exists() for m in SAVED_MARKERS):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise QuillError(
                    f"data source {src.path!r}: split {src.split!r} not found, found splits {list(ds)}",
                    fix="set `split:` to one of them",
                )
            ds = ds[src.split]
        return ds.to_iterable_dataset() if streaming else ds
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in BUILDERS and not _hidden(p, path)]
        _check_local_files(path, [f for f in files if f.is_file()])
    elif _looks_local(src.path):
        raise QuillError(
            f"data source {src.path!r}: no such file or folder (looked in {Path.cwd()})",
            fix="check the path; Hub ids look like `org/name`",
        )
    # A Hub id, or a local folder of data files / dataset repo (README + data/): the same call reads both.
    target = str(path) if path.is_dir() else src.path
    return datasets.load_dataset(target, src.name, split=src.split, revision=src.revision, streaming=streaming)


def _hidden(file: Path, root: Path) -> bool:
    # `datasets` skips hidden files and folders (.cache, .git) when it scans a folder; so do we.
    return any(part.startswith((".", "__")) for part in file.relative_to(root).parts)


def load_source(src: "DataSource | str | dict", streaming: bool = False):
    """Load one source as a `Dataset` (or `IterableDataset` when streaming), renamed and capped.

    A Hub dataset with `max_samples` is read as a stream up to that many rows and then held as a `Dataset`:
    `load_dataset` would otherwise download (and prepare) every split of the config before the cap applies."""
    try:
        src = DataSource.parse(src)
    except QuillError as e:
        path = src.get("path") if isinstance(src, dict) else src
        raise QuillError(f"data source {path!r}: {e.problem}", e.fix) from None
    capped_hub = not streaming and src.max_samples is not None and not Path(src.path).expanduser().exists()
    if capped_hub:
        stream = load_source(src, streaming=True)
        return datasets.Dataset.from_list(list(stream), features=stream.features)
    try:
        ds = _load(src, streaming)
    except QuillError:
        raise
    except (
        DatasetGenerationError,
        DatasetNotFoundError,
        FileNotFoundError,
        ConnectionError,
        ValueError,
        StopIteration,
    ) as e:
        raise _wrap_load_error(src, e) from e
    if isinstance(ds, datasets.DatasetDict | datasets.IterableDatasetDict):  # split=None slipped through
        raise QuillError(f"data source {src.path!r}: expected one split, found {list(ds)}", fix="set `split:`")

    if src.columns:
        have = ds.column_names
        if have is not None:  # streaming sources without known features skip the check and fail on first read
            missing = [c for c in src.columns if c not in have]
            if missing:
                raise QuillError(
                    f"data source {src.path!r}, columns: expected a column {missing[0]!r} to rename, "
                    f"found columns {have}",
                    fix="fix the old name on the left of `columns:`",
                )
        ds = ds.rename_columns(src.columns)
    if src.max_samples is not None:
        ds = ds.take(src.max_samples) if streaming else ds.select(range(min(src.max_samples, len(ds))))
    ds = apply_format(ds, src.format, src.path)  # alpaca / ShareGPT rows become chat messages (quill.data.formats)
    empty = next(iter(ds.take(1)), None) is None if streaming else len(ds) == 0
    if empty:
        raise QuillError(
            f"data source {src.path!r} (split {src.split!r}): expected rows, found an empty dataset",
            fix="check the path, split and filters",
        )
    return ds


def _eval_count(eval_size: int | float, total: int) -> int:
    # Below 1 it is a fraction of the mix; from 1 up a row count (YAML may hand us 100 as 100.0).
    n = round(eval_size * total) if eval_size < 1 else int(eval_size)
    if not 0 <= n < total:
        raise QuillError(
            f"data mixture: eval_size expected 0 <= eval rows < {total} rows in total, found {eval_size!r} ({n} rows)",
            fix="use a fraction like 0.01 or a row count smaller than the data",
        )
    return n


def load_mixture(
    sources: list["DataSource | str | dict"], seed: int, eval_size: int | float, stage: str | None = None
) -> datasets.DatasetDict:
    """Mix sources into `DatasetDict(train=..., eval=...)`, deterministic for a given seed.

    Each source is loaded (renamed, capped), checked against `stage` when given, and split into its own eval and
    train rows *before* weighting, so an upsampled row can never sit in both splits. Each source's share of the
    eval split follows its weighted share of the mixture. Columns not shared by every source are dropped.
    """
    if not sources:
        raise QuillError("data mixture: expected at least one source, found none", fix="list sources under `data:`")
    srcs = [DataSource.parse(s) for s in sources]
    loaded = [load_source(s) for s in srcs]
    if stage is not None:
        formats = [check_schema(ds, stage, s.path) for ds, s in zip(loaded, srcs)]
        prepared = [prepare_rows(ds, stage, f) for ds, f in zip(loaded, formats)]  # one shape per stage
        loaded, formats = [p[0] for p in prepared], [p[1] for p in prepared]
        for s, f in zip(srcs[1:], formats[1:]):
            if f != formats[0]:
                raise QuillError(
                    f"data mixture for {stage}: {srcs[0].path!r} is {formats[0]} data, {s.path!r} is {f}",
                    fix="convert one source so all have the same columns (use `columns:` to rename)",
                )
    common = [c for c in loaded[0].column_names if all(c in ds.column_names for ds in loaded[1:])]
    for s, ds in zip(srcs, loaded):
        extra = [c for c in ds.column_names if c not in common]
        if extra:
            log.warning("data source %r: dropping columns %s that other sources lack", s.path, extra)
    loaded = [ds.select_columns(common) for ds in loaded]

    targets = [max(1, round(s.weight * len(ds))) for s, ds in zip(srcs, loaded)]
    n_eval = _eval_count(eval_size, sum(targets))
    # Largest-remainder rounding so the per-source eval counts add up to exactly n_eval.
    shares = [n_eval * t / sum(targets) for t in targets]
    eval_counts = [int(x) for x in shares]
    for i in sorted(range(len(shares)), key=lambda i: eval_counts[i] - shares[i])[: n_eval - sum(eval_counts)]:
        eval_counts[i] += 1

    train_parts, eval_parts = [], []
    for i, (s, ds, n_ev) in enumerate(zip(srcs, loaded, eval_counts)):
        rng = np.random.default_rng([seed, i])  # per-source stream: adding a source leaves the others' picks alone
        order = rng.permutation(len(ds))
        if n_ev >= len(ds):
            raise QuillError(
                f"data source {s.path!r}: eval split needs {n_ev} of its {len(ds)} rows, leaving none to train on",
                fix="lower eval_size or add data",
            )
        eval_parts.append(ds.select(order[:n_ev]))
        pool = order[n_ev:]
        want = round(s.weight * len(pool))
        if want == 0:
            raise QuillError(
                f"data source {s.path!r}: weight {s.weight} of {len(pool)} rows keeps no rows",
                fix="raise its weight or drop the source",
            )
        repeats, rest = divmod(want, len(pool))
        picks = np.concatenate([np.tile(pool, repeats), rng.choice(pool, size=rest, replace=False)])
        train_parts.append(ds.select(picks))
    try:
        train = datasets.concatenate_datasets(train_parts).shuffle(seed=seed)
        held_out = datasets.concatenate_datasets(eval_parts).shuffle(seed=seed)
    except ValueError as e:  # same column names, different types (e.g. a string vs a list of messages)
        types = "; ".join(f"{s.path}: {ds.features}" for s, ds in zip(srcs, loaded))
        raise QuillError(
            f"data mixture: sources have different column types ({types})"[:500],
            fix="make the columns hold the same kind of value in every source",
        ) from e
    return datasets.DatasetDict(train=train, eval=held_out)


STREAM_ROWS_CHECKED = 1000  # a stream's schema is checked on its first rows: checking more would download more


def load_stream(
    sources: list["DataSource | str | dict"], seed: int, stage: str | None = None
) -> datasets.IterableDataset:
    """Mix sources as one `datasets` stream, opened lazily: nothing is downloaded beyond what is read.

    Each source is a stream capped by its `max_samples` before anything else, checked against `stage` on its first
    rows when `stage` is given. Sources are interleaved at random with probabilities proportional to their weights
    (a stream has no length, so weights are sampling shares here, not row multipliers), every row read once.
    Rows come in file order: a shuffle buffer's contents could not be restored on resume.
    """
    if not sources:
        raise QuillError("data mixture: expected at least one source, found none", fix="list sources under `data:`")
    srcs = [DataSource.parse(s) for s in sources]
    streams = [load_source(s, streaming=True) for s in srcs]
    if stage is not None:
        formats = [check_schema(ds, stage, s.path, max_rows=STREAM_ROWS_CHECKED) for ds, s in zip(streams, srcs)]
        for s, f in zip(srcs[1:], formats[1:]):
            if f != formats[0]:
                raise QuillError(
                    f"data mixture for {stage}: {srcs[0].path!r} is {formats[0]} data, {s.path!r} is {f}",
                    fix="convert one source so all have the same columns (use `columns:` to rename)",
                )
    if len(streams) == 1:
        return streams[0]
    names = [list(ds.column_names or next(iter(ds.take(1)))) for ds in streams]
    common = [c for c in names[0] if all(c in n for n in names[1:])]
    total = sum(s.weight for s in srcs)
    return datasets.interleave_datasets(
        [ds.select_columns(common) for ds in streams],
        probabilities=[s.weight / total for s in srcs],
        seed=seed,
        stopping_strategy="all_exhausted_without_replacement",
    )


def stream_eval_count(eval_size: int | float) -> int:
    """Held-out rows of a stream: its first `eval_size` rows. A fraction needs the length a stream does not know."""
    if 0 < eval_size < 1:
        raise QuillError(
            f"eval_size {eval_size} is a fraction of the data, which a stream cannot know before reading it all",
            fix="give eval_size as a number of rows when streaming, e.g. eval_size: 1000",
        )
    return int(eval_size)
