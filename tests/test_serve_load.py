"""`quill serve` under concurrent clients: every request answered, each reply the one the same prompt gets alone
(greedy), bad requests a 4xx with a one-line error, and a streaming client that hangs up stops its generation.

Raw HTTP (http.client), not the OpenAI client: that client retries failed requests by itself, which would hide them.
The long run at 16 and 32 clients is a benchmark (bench/serve_load.py), not a test.
"""

import http.client
import json
import os
import sys
import threading
import time

import pytest
from planted_chat import QUESTION, build_chat_model
from test_serve import Server, isolated_env

from quill.data.tokenizer import stop_token_ids
from quill.loading import load_tokenizer

PROMPTS = [QUESTION, "hello", "count to five", "what is the capital of France?", "say something", "2 + 2", "why?", ""]
CLIENTS, REQUESTS = 8, 4


def ask(port: int, body: dict | bytes, timeout: float = 300) -> tuple[int, str, dict]:
    """(status, reply text or error body, the final chunk / the JSON answer). Streams are read to their end."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200 or not (isinstance(body, dict) and body.get("stream")):
            raw = response.read().decode()
            if response.status != 200:
                return response.status, raw, {}
            answer = json.loads(raw)
            return 200, answer["choices"][0]["message"]["content"], answer
        text, last = [], {}
        for line in response:  # server-sent events: `data: {chunk}` lines, then the connection closes
            if line.startswith(b"data: "):
                last = json.loads(line[len(b"data: ") :])
                assert "error" not in last, last
                text += [c["delta"].get("content") or "" for c in last.get("choices", [])]
        return 200, "".join(text), last
    finally:
        conn.close()


def chat(prompt: str, stream: bool = False, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "stream": stream, **extra}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.getbasetemp() / "planted_chat")


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_load")
    env = isolated_env(tmp) | {"OMP_NUM_THREADS": "1"}
    running = Server([sys.executable, "-m", "quill.cli", "serve", str(chat_model)], tmp / "server.log", env=env)
    yield running
    running.stop()


def test_concurrent_clients_get_the_replies_each_prompt_gets_alone(server):
    alone = {p: ask(server.port, chat(p))[1] for p in PROMPTS}  # one request at a time
    assert len(set(alone.values())) > 3, alone  # the prompts really get different replies
    results, spans, start = [], [], threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        start.wait()
        for k in range(REQUESTS):
            prompt, stream = PROMPTS[(i + k) % len(PROMPTS)], (i + k) % 2 == 1  # streaming and not, interleaved
            began = time.monotonic()
            status, text, _ = ask(server.port, chat(prompt, stream))
            spans.append((began, time.monotonic()))
            results.append((prompt, stream, status, text))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(results) == CLIENTS * REQUESTS
    failed = [r for r in results if r[2] != 200]
    assert not failed, failed
    wrong = [(prompt, stream, text, alone[prompt]) for prompt, stream, _, text in results if text != alone[prompt]]
    assert not wrong, wrong
    # The requests really overlapped: at the busiest moment most clients were waiting on the server at once.
    busiest = max(sum(b <= t < e for b, e in spans) for t, _ in spans)
    assert busiest >= CLIENTS // 2, spans
    assert "Traceback" not in server.log()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"messages": [', "not valid JSON"),
        (b"[1, 2]", "invalid request body"),
        ({"messages": "what is two plus two?"}, "'messages' must be a non-empty list"),
        (chat("word " * 3000), "context is 2048 tokens"),  # an over-long prompt
        (chat("word " * 3000, stream=True), "context is 2048 tokens"),
        (chat("hello", max_tokens=5000), "lower max_tokens"),  # room for the prompt, not for the reply asked for
        (chat("hello", max_tokens="many"), "max_tokens must be a positive whole number"),
    ],
)
def test_bad_requests_get_a_4xx_with_one_line(server, body, expected):
    status, raw, _ = ask(server.port, body)
    assert 400 <= status < 500, (status, raw)
    assert "\n" not in raw.strip(), raw
    message = json.loads(raw)["error"]["message"]
    assert expected in message and "\n" not in message, message
    assert ask(server.port, chat(QUESTION))[0] == 200  # and the server goes on serving
    assert "Traceback" not in server.log()


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# Near the tiny chat model's 2048-token context; at the ~650 tokens/s it streams on an idle 2-core machine the reply
# lasts ~3 s, so the windows below are short: 0.3 s of reading, 0.3 s to settle, 1 s of CPU measured after.
REPLY_TOKENS = 2000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's CPU time from /proc")
def test_a_client_that_hangs_up_mid_stream_stops_its_generation(server, chat_model):
    """A reply that would run for the whole context (end tokens banned): while the client reads, the server works;
    once it hangs up, the server goes idle instead of generating the rest for nobody."""
    ends = stop_token_ids(load_tokenizer(str(chat_model)))
    body = chat("hello", stream=True, max_tokens=REPLY_TOKENS, logit_bias={str(i): -100.0 for i in ends})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    pid, began, chunks = server.proc.pid, time.monotonic(), 0
    cpu = cpu_seconds(pid)
    while time.monotonic() - began < 0.3:
        chunks += response.readline().startswith(b"data: ")
    reading = (cpu_seconds(pid) - cpu) / (time.monotonic() - began)
    rate = chunks / (time.monotonic() - began)
    conn.sock.close()  # hang up mid-stream
    conn.close()
    assert (REPLY_TOKENS - chunks) / rate > 1.5, f"{rate:.0f} tokens/s: the reply would end before the check below"
    time.sleep(0.3)
    began, cpu = time.monotonic(), cpu_seconds(pid)
    time.sleep(1)
    after = (cpu_seconds(pid) - cpu) / (time.monotonic() - began)
    assert reading > 0.03 and after < reading / 4, f"CPU per second while read: {reading:.3f}, after: {after:.3f}"
    status, text, _ = ask(server.port, chat(QUESTION))
    assert status == 200 and text == "four."
