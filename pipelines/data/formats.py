"""Instruction data in the formats users bring, converted to chat `messages` ([{role, content}, ...]), and chats
rendered as plain text for training with the language-modelling loss (mid-training).

| format | columns | becomes |
|---|---|---|
| alpaca | instruction, output; optional input, system, history ([[question, answer], ...]) | messages |
| sharegpt | conversations: [{from, value}, ...] with from in human/gpt/system (and their usual aliases) | messages |
| chat_text | messages (Quill's own, or converted from the above) | text, in Quill's chat layout |

A dataset_mixture entry names its format with `format: alpaca | sharegpt | chat_text`; without it a source is
recognised by its columns (instruction + output, or conversations whose first turn has `from`) unless it already has
`messages`; chat_text is only ever declared. A bad row stops loading with one line that names the format expected,
e.g. ``data/chat.jsonl row 3: expected sharegpt turns {from, value} with from in {human, gpt, system}, found from
'bot'; fix: ...``.
"""

import datasets

from quill.errors import QuillError

FORMATS = ("alpaca", "sharegpt", "chat_text")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
ALPACA_COLUMNS = ("instruction", "input", "output", "system", "history")


class _BadRow(Exception):
    def __init__(self, expected: str, found: str, fix: str):
        self.expected, self.found, self.fix = expected, found, fix


def check_format_name(name) -> None:
    if name is not None and name not in FORMATS:
        raise QuillError(f"unknown format {name!r}", f"use one of {', '.join(FORMATS)}, or drop `format:`")


def detect(column_names: list[str], first_row: dict | None) -> str | None:
    """The format a source's columns (and first row) show, or None for data already in Quill's own columns."""
    if "messages" in column_names:
        return None
    if "instruction" in column_names and "output" in column_names:
        return "alpaca"
    turns = (first_row or {}).get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]:
        return "sharegpt"
    return None


def _text(value, what: str, fmt: str, fix: str) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise _BadRow(f"{fmt} {what} as non-empty text", shown, fix)
    return value


def alpaca_messages(row: dict) -> list[dict]:
    """instruction (+ "\\n\\n" + input), output -> user, assistant; system and earlier history turns first."""
    fix = "give every row a non-empty instruction and output (input may be empty)"
    instruction = _text(row.get("instruction"), "'instruction'", "alpaca", fix)
    answer = _text(row.get("output"), "'output'", "alpaca", fix)
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise _BadRow("alpaca 'input' as text", repr(extra)[:60], "store input as text, or leave it empty")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for i, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise _BadRow(f"alpaca 'history' item {i} as [question, answer]", repr(pair)[:60], "fix the history")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def sharegpt_messages(row: dict) -> list[dict]:
    turns = row.get("conversations")
    roles = "{" + ", ".join(dict.fromkeys(("human", "gpt", "system", *SHAREGPT_ROLES))) + "}"
    expected = f"sharegpt turns {{from, value}} with from in {roles}"
    if not isinstance(turns, list) or not turns:
        raise _BadRow(expected, repr(turns)[:60], "store each conversation as a list of {from, value} turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            found = f"turn {i} with keys {sorted(turn)}" if isinstance(turn, dict) else f"turn {i}: {turn!r}"[:60]
            raise _BadRow(expected, found, "give every turn a `from` and a `value`")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise _BadRow(expected, f"from {turn['from']!r} in turn {i}", "rename the speaker, or drop such turns")
        content = _text(turn["value"], f"turn {i} value", "sharegpt", "drop empty turns or fill them in")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRow("a sharegpt conversation with a gpt turn", f"speakers {[t['from'] for t in turns]}", "drop it")
    return messages


def chat_text(row: dict) -> str:
    """A conversation in the layout of Quill's chat template (quill.data.tokenizer), without the <|bos|> that
    tokenizer(text) adds: the pretrain stage then trains on every token of it, the prompts included."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRow("chat_text 'messages' as a list of {role, content}", repr(messages)[:60], "fix the row")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _BadRow(f"chat_text message {i} with role system/user/assistant", repr(m)[:60], "fix the role")
        _text(m.get("content"), f"message {i} content", "chat_text", "drop empty messages or fill them in")
    return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)


CONVERTERS = {"alpaca": alpaca_messages, "sharegpt": sharegpt_messages, "chat_text": chat_text}
NEEDED = {"alpaca": ("instruction", "output"), "sharegpt": ("conversations",), "chat_text": ("messages",)}


def apply_format(ds, fmt: str | None, source: str):
    """`ds` converted to `messages` when it is (or is declared) alpaca or ShareGPT data, or to `text` when declared
    chat_text; other columns are kept. Data in Quill's own columns without a declared format comes back unchanged."""
    check_format_name(fmt)
    columns = list(ds.column_names or [])
    first = next(iter(ds.take(1)), None) if isinstance(ds, datasets.IterableDataset) or len(ds) else None
    if not columns and first is not None:
        columns = list(first)
    fmt = fmt or detect(columns, first)
    if fmt is None:
        return ds
    needed = NEEDED[fmt]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise QuillError(
            f"{source}: expected {fmt} columns {' + '.join(needed)}, found columns {columns}",
            fix=f"rename with `columns:`, or drop `format: {fmt}`",
        )
    convert = CONVERTERS[fmt]

    def convert_row(row: dict, index: int) -> dict:
        try:
            return {"text" if fmt == "chat_text" else "messages": convert(row)}
        except _BadRow as bad:
            raise QuillError(f"{source} row {index}: expected {bad.expected}, found {bad.found}", bad.fix) from None

    drop = [c for c in columns if c in (*ALPACA_COLUMNS, "conversations", "messages")]
    try:
        return ds.map(convert_row, with_indices=True, remove_columns=drop)
    except QuillError:
        raise
    except Exception as err:  # datasets wraps errors raised in a worker; ours is the cause
        cause = err.__cause__ or err.__context__
        if isinstance(cause, QuillError):
            raise cause from None
        raise
