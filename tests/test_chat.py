"""`quill chat`: a real terminal session through a pseudo-terminal, and the conversation it keeps."""

import contextlib
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch
from test_evaluation import make_checkpoint  # tests/ is on sys.path (conftest.py)

from quill.data.tokenizer import END
from quill.loading import load_tokenizer
from quill.model import QuillForCausalLM
from quill.tools import chat


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("chat") / "sft")


class Terminal:
    """A child process on a pseudo-terminal: it sees a real tty, as when a person types."""

    def __init__(self, argv: list[str]):
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, close_fds=True)
        os.close(child)
        self.output = b""

    def expect(self, text: bytes, count: int = 1, timeout: float = 60) -> None:
        """Read until `text` has appeared `count` times in all output so far."""
        deadline = time.time() + timeout
        while self.output.count(text) < count:
            if time.time() > deadline or self.proc.poll() is not None and not self._ready(0):
                raise AssertionError(f"waited for {text!r} x{count}; got:\n{self.output.decode(errors='replace')}")
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


def test_chat_in_a_terminal_answers_two_turns_and_exits_on_ctrl_d(ckpt):
    term = Terminal(
        [sys.executable, "-m", "quill.cli", "chat", str(ckpt), "--max-new-tokens", "5", "--system", "Answer briefly."]
    )
    try:
        term.expect(chat.PROMPT.encode())
        term.send(b"What is 12 + 7?\n")
        term.expect(chat.REPLY.encode())
        term.expect(chat.PROMPT.encode(), count=2)  # the reply streamed and ended; the next turn is offered
        term.send(b"And reversed: go, hundred?\n")
        term.expect(chat.PROMPT.encode(), count=3)
        term.send(b"\x04")  # Ctrl-D at an empty prompt: end of input
        assert term.proc.wait(timeout=30) == 0
        assert term.output.count(chat.REPLY.encode()) == 2
        assert b"Traceback" not in term.output and b"error" not in term.output
    finally:
        term.close()


def test_chat_keeps_the_history_resets_and_exits(ckpt, monkeypatch, capsys):
    tok = load_tokenizer(str(ckpt))
    model = QuillForCausalLM.from_pretrained(ckpt).eval()
    prompts = []

    def generate(input_ids, attention_mask, generation_config, streamer):  # a planted reply, streamed like generate
        prompts.append(tok.decode(input_ids[0]))
        reply = torch.tensor([tok(f"reply {len(prompts)}{END}", add_special_tokens=False)["input_ids"]])
        streamer.put(input_ids.cpu())
        streamer.put(reply[0])
        streamer.end()
        return torch.cat([input_ids, reply], dim=1)

    model.generate = generate
    monkeypatch.setattr(chat, "load_chat_model", lambda path, trust_remote_code: (model, tok))
    lines = iter(["first question", "second question", "/reset", "third question", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat.main([str(ckpt), "--system", "Be brief."])  # returns: /exit is a normal end

    assert len(prompts) == 3
    # Turn 2 sees turn 1 (question and the model's own reply); after /reset only the system message stays.
    assert "first question" in prompts[1] and "reply 1" in prompts[1] and "Be brief." in prompts[1]
    assert "first question" not in prompts[2] and "Be brief." in prompts[2]
    assert capsys.readouterr().out.count("reply ") == 3  # streamed to the terminal
    assert next(lines) == "never read"
