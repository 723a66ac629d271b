"""`quill chat`: transformers' terminal client against quill serve's server, driven through a pseudo-terminal."""

import contextlib
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from planted_chat import ANSWER, QUESTION, SYSTEM, answer_tokens, build_chat_model

from quill.errors import QuillError
from quill.loading import load_tokenizer
from quill.tools import chat

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.getbasetemp() / "planted_chat")


class Terminal:
    """A child process on a pseudo-terminal: it sees a real tty, as when a person types."""

    def __init__(self, argv: list[str], cwd=None):
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, close_fds=True, cwd=cwd)
        os.close(child)
        self.output = b""

    @property
    def text(self) -> bytes:
        """What a person reads: the output without colour and cursor codes."""
        return ANSI.sub(b"", self.output)

    def expect(self, text: bytes, count: int = 1, timeout: float = 120) -> None:
        """Read until `text` has appeared `count` times in the (plain) output so far."""
        deadline = time.time() + timeout
        while self.text.count(text) < count:
            if time.time() > deadline or self.proc.poll() is not None and not self._ready(0):
                raise AssertionError(f"waited for {text!r} x{count}; got:\n{self.text.decode(errors='replace')}")
            if self._ready(0.2):
                with contextlib.suppress(OSError):  # the child closed the terminal
                    self.output += os.read(self.fd, 4096)

    def _ready(self, timeout: float) -> bool:
        return bool(select.select([self.fd], [], [], timeout)[0])

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.fd)


def test_chat_in_a_terminal_answers_two_turns_stops_each_at_the_end_of_turn_and_exits_on_ctrl_d(chat_model, tmp_path):
    term = Terminal(
        [sys.executable, "-m", "quill.cli", "chat", str(chat_model), "--max-new-tokens", "12", "--system", SYSTEM],
        cwd=tmp_path,
    )
    stats = f"{answer_tokens(load_tokenizer(str(chat_model)))} tokens in".encode()  # printed after each reply
    try:
        term.expect(b"was already loaded", timeout=300)  # the server is up and the client has connected
        time.sleep(0.5)
        term.send(QUESTION.encode() + b"\r")
        term.expect(stats)
        term.send(b"!status\r")
        term.expect(b"max_new_tokens")
        term.send(QUESTION.encode() + b"\r")
        term.expect(stats, count=2)
        time.sleep(0.5)
        term.send(b"\x04")  # Ctrl-D at an empty prompt: end of input
        assert term.proc.wait(timeout=60) == 0
        assert term.text.count(ANSWER.encode()) >= 2
        assert b"Traceback" not in term.output and b"error" not in term.text
    finally:
        term.close()


def test_generation_flags_default_to_greedy_with_the_reply_budget():
    assert chat.generate_flags(7, []) == ["do_sample=false", "max_new_tokens=7"]
    assert chat.generate_flags(7, ["do_sample=true", "temperature=0.7"]) == [
        "do_sample=true",
        "temperature=0.7",
        "max_new_tokens=7",
    ]
    assert chat.generate_flags(7, ["max_new_tokens=3"]) == ["do_sample=false", "max_new_tokens=3"]
    with pytest.raises(QuillError, match="is not key=value"):
        chat.generate_flags(7, ["temperature"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["--max-new-tokens", "0"], "--max-new-tokens expected a positive number"), (["top_p"], "is not key=value")],
)
def test_bad_options_get_one_line_before_anything_loads(args, expected, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "quill.cli", "chat", str(tmp_path), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
