"""Check that a dataset has the columns and row shapes a training stage needs, before training starts.

`check_schema(ds, stage, source)` returns the detected format and raises a one-line QuillError at the first bad
row, e.g. ``data/sft.jsonl row 17, column 'messages': expected role in {system,user,assistant}, found 'bot'; fix:
...``. Rows are numbered from 0, as in ``ds[17]``. Formats (the names TRL uses for the same shapes):

| stage | format | columns |
|---|---|---|
| pretrain | text | text: non-empty string |
| sft | messages | messages: list of {role, content} with at least one assistant turn |
| sft | prompt_completion[_conversational] | prompt, completion: strings, or message lists |
| dpo, reward | preference[_conversational] | prompt, chosen, rejected: strings, or message lists |
| dpo, reward | implicit_preference[_conversational] | chosen, rejected (each a whole conversation) |
| rl | prompt[_conversational] | prompt: string or message list (other columns go to the reward function) |

Preference data whose `chosen`/`rejected` are whole conversations (the user turn included) and whose `prompt` is a
plain string beside them, like HuggingFaceH4/ultrafeedback_binarized, is implicit preference data: the string is
not used, and `prepare_rows` derives the prompt from the shared opening turns with TRL's own
`maybe_extract_prompt`, as TRL's trainers do. For every stage `prepare_rows` gives the trainers one shape: DPO and
reward rows get an explicit prompt, and RL prompts become chat messages (a string is the user's turn).
"""

import difflib
import itertools

import datasets

from quill.errors import QuillError

ROLES = ("system", "user", "assistant")
MAX_ROWS_CHECKED = 100_000  # all rows of small datasets; the first 100k of large or streaming ones

# Column sets per format, in the order formats are tried for each stage.
FORMATS = {
    "pretrain": [("text", ["text"])],
    "sft": [("messages", ["messages"]), ("prompt_completion", ["prompt", "completion"])],
    "dpo": [("preference", ["prompt", "chosen", "rejected"]), ("implicit_preference", ["chosen", "rejected"])],
    "rl": [("prompt", ["prompt"])],
}
FORMATS["reward"] = FORMATS["dpo"]


class _Bad(Exception):
    """A bad cell: `expected`/`found`/`fix` become the message; `column` is filled in by _cell()."""

    def __init__(self, expected: str, found: str, fix: str):
        self.expected, self.found, self.fix, self.column = expected, found, fix, None


def _show(value) -> str:
    text = repr(value)  # repr keeps it on one line (newlines become \n)
    return text if len(text) <= 60 else text[:57] + "..."


def _string(value, what: str = "a non-empty string") -> None:
    if not isinstance(value, str):
        raise _Bad(what, f"{type(value).__name__} {_show(value)}", "store plain text in this column")
    if not value.strip():
        raise _Bad(what, _show(value), "drop empty rows or fill them in")


def _messages(value, need_assistant: bool) -> None:
    if not isinstance(value, list) or not value:
        raise _Bad(
            "a non-empty list of {role, content} messages", _show(value), "store the conversation as a list of messages"
        )
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            keys = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise _Bad(
                f"message {i} with keys role and content",
                f"{keys}",
                "ShareGPT turns: declare `format: sharegpt` on the source and keep its conversations column"
                if isinstance(message, dict) and "from" in message
                else "give every message a role and a content",
            )
        if message["role"] not in ROLES:
            raise _Bad(
                "role in {system,user,assistant}",
                _show(message["role"]),
                "rename the role to system, user or assistant in the data",
            )
        if not isinstance(message["content"], str):
            raise _Bad(
                f"message {i} content as a string",
                f"{type(message['content']).__name__} {_show(message['content'])}",
                "store message content as plain text",
            )
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise _Bad(
            "at least one assistant turn",
            f"roles {[m['role'] for m in value]}",
            "drop conversations without an answer, or check the roles are spelled system/user/assistant",
        )


def _text_or_messages(value, conversational: bool, need_assistant: bool) -> None:
    if conversational:
        _messages(value, need_assistant)
    elif isinstance(value, list):
        raise _Bad("a string like row 0", f"a list {_show(value)}", "use one kind of value in the whole column")
    else:
        _string(value)


def _cell(row: dict, column: str, check) -> None:
    try:
        check(row[column])
    except _Bad as e:
        e.column = column
        raise


def _check_row(fmt: str, row: dict, conv: bool) -> None:
    """Raise _Bad for the first bad cell of `row`; `conv` says whether the dataset is conversational."""
    if fmt == "text":
        _cell(row, "text", _string)
    elif fmt == "messages":
        _cell(row, "messages", lambda v: _messages(v, need_assistant=True))
    elif fmt == "prompt_completion":
        _cell(row, "prompt", lambda v: _text_or_messages(v, conv, need_assistant=False))
        _cell(row, "completion", lambda v: _text_or_messages(v, conv, need_assistant=conv))
    elif fmt in ("preference", "implicit_preference"):
        if fmt == "preference":
            _cell(row, "prompt", lambda v: _text_or_messages(v, conv, need_assistant=False))
        # Without a prompt column each side is the whole conversation, so it must hold the assistant's answer.
        _cell(row, "chosen", lambda v: _text_or_messages(v, conv, need_assistant=conv))
        _cell(row, "rejected", lambda v: _text_or_messages(v, conv, need_assistant=conv))
        if row["chosen"] == row["rejected"]:
            bad = _Bad("a rejected answer different from chosen", "the same value as chosen", "drop this pair")
            bad.column = "rejected"
            raise bad
        if fmt == "implicit_preference" and conv and row["chosen"][0] != row["rejected"][0]:
            bad = _Bad(
                "chosen and rejected to open with the same prompt turns",
                f"first turns {_show(row['chosen'][0])} and {_show(row['rejected'][0])}",
                "give both sides the same conversation up to the answers, or add a prompt column of messages",
            )
            bad.column = "rejected"
            raise bad
    elif fmt == "prompt":
        _cell(row, "prompt", lambda v: _text_or_messages(v, conv, need_assistant=False))


# Column names other datasets use for the same thing, to suggest a `columns:` rename.
SYNONYMS = {
    "text": ("content", "document", "body", "sentence"),
    "messages": ("conversations", "conversation", "chat", "dialog", "dialogue"),
    "prompt": ("question", "instruction", "input", "query"),
    "completion": ("response", "answer", "output"),
    "chosen": ("accepted", "preferred", "positive"),
    "rejected": ("dispreferred", "negative"),
}


def _suggest_renames(stage: str, have: list[str]) -> list[str]:
    """Renames that would complete the first format they can complete, e.g. ['conversations: messages']."""
    for _, wanted in FORMATS[stage]:
        renames, free = [], [h for h in have if h not in wanted]
        for want in (w for w in wanted if w not in have):
            close = [h for h in free if h.lower() in SYNONYMS.get(want, ())]
            close = close or difflib.get_close_matches(want, free, n=1, cutoff=0.6)
            if not close:
                break
            renames.append(f"{close[0]}: {want}")
            free.remove(close[0])
        else:
            return renames
    return []


def _missing_columns_error(source: str, stage: str, have: list[str]) -> QuillError:
    options = " or ".join("+".join(cols) for _, cols in FORMATS[stage])
    renames = _suggest_renames(stage, have)
    fix = f"rename with `columns: {{{', '.join(renames)}}}`" if renames else "rename your columns with `columns:`"
    return QuillError(f"{source}: expected columns {options} for stage '{stage}', found columns {have}", fix=fix)


def _string_prompt_beside_conversations(ds) -> bool:
    """A string `prompt` next to conversational `chosen`: TRL ignores such a prompt and extracts the real one."""
    first = next(iter(ds.select_columns(["prompt", "chosen"]).take(1)), None)
    return first is not None and isinstance(first["prompt"], str) and isinstance(first["chosen"], list)


def prepare_rows(ds, stage: str, fmt: str):
    """The rows in the shape the stage's trainer takes, and their format: preference data with an implicit prompt
    gets it extracted (TRL's `maybe_extract_prompt`, so `prompt` is the shared opening turns and chosen/rejected
    the answers); an RL prompt that is a string becomes a user message. Other data is returned as it is."""
    if stage in ("dpo", "reward") and fmt.startswith("implicit_preference"):
        from trl.data_utils import maybe_extract_prompt

        def extract(row):
            return maybe_extract_prompt({k: row[k] for k in ("prompt", "chosen", "rejected") if k in row})

        return ds.map(extract), fmt.replace("implicit_", "")
    if stage == "rl" and fmt == "prompt":
        return ds.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]}), "prompt_conversational"
    return ds, fmt


def check_schema(ds, stage: str, source: str, max_rows: int = MAX_ROWS_CHECKED) -> str:
    """Return the format of `ds` for `stage` (see the table above); raise a QuillError at the first bad row.
    At most `max_rows` rows are checked."""
    if stage not in FORMATS:
        raise QuillError(f"{source}: unknown stage {stage!r}", fix=f"use one of {', '.join(FORMATS)}")
    have = list(ds.column_names or [])
    if not have and isinstance(ds, datasets.IterableDataset):  # streaming without known features: peek
        have = list(next(iter(ds.take(1)), {}))
    fmt, columns = next(((f, cols) for f, cols in FORMATS[stage] if all(c in have for c in cols)), (None, None))
    if fmt is None:
        raise _missing_columns_error(source, stage, have)
    if fmt == "preference" and _string_prompt_beside_conversations(ds):
        fmt, columns = "implicit_preference", ["chosen", "rejected"]  # ultrafeedback_binarized's shape

    rows = ds.select_columns(columns)
    if isinstance(rows, datasets.Dataset):
        rows = rows.select(range(min(len(rows), max_rows)))
    else:
        rows = rows.take(max_rows)  # a stream: read no further than the rows checked
    # Batches, because row-by-row iteration of a Dataset is ~50x slower.
    batches = (zip(*(b[c] for c in columns)) for b in rows.iter(batch_size=1000))
    rows = itertools.islice((dict(zip(columns, values)) for b in batches for values in b), max_rows)
    first = next(rows, None)
    if first is None:
        raise QuillError(f"{source}: expected rows, found an empty dataset", fix="check the path and split")
    # The first row decides string vs conversational; every other row must match it.
    conversational = isinstance(first[columns[-1]], list)
    for index, row in enumerate(itertools.chain([first], rows)):
        try:
            _check_row(fmt, row, conversational)
        except _Bad as e:
            raise QuillError(
                f"{source} row {index}, column '{e.column}': expected {e.expected}, found {e.found}", fix=e.fix
            ) from None
    return f"{fmt}_conversational" if conversational and fmt not in ("messages", "text") else fmt
