"""`quill serve` under concurrent load: throughput and latency at 16 and 32 clients against one client, in one run.

    python bench/serve_load.py [MODEL_DIR] [--duration 60] [--levels 1,16,32] [--max-tokens 32] [--out bench/results]

Starts `quill serve MODEL_DIR` (default: the planted tiny chat model the tests use, built into OUT), records each
prompt's greedy reply served alone, then runs every level for `--duration` seconds: that many clients, each sending
requests back to back (streaming and not, alternately, over the prompts in turn). Per level: requests/s, completion
tokens/s, p50/p95 latency (request sent to last byte), failed requests, replies that differ from the prompt's reply
served alone, and the server's peak resident memory. The first level is the baseline: the table gives every other
level as ratios against it, measured minutes apart on the same server. Writes OUT/serve_load.json and a chart,
OUT/serve_load.png. transformers' server generates one request at a time per model, so requests/s should stay near
the baseline while latency grows with the number of clients waiting.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["what is two plus two?", "hello", "count to five", "what is the capital of France?", "say something",
           "2 + 2", "why?", "name three colours"]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="a chat model folder (default: the tests' planted tiny chat model)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per level (default 60)")
    p.add_argument("--levels", default="1,16,32", help="concurrent clients per level; the first is the baseline")
    p.add_argument("--max-tokens", type=int, default=32, help="reply budget of every request")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON and the chart")
    return p.parse_args(argv)


def ask(port: int, prompt: str, stream: bool, max_tokens: int) -> tuple[int, str, int]:
    """(HTTP status, reply, completion tokens); a stream is read to its end."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": stream}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.read().decode(errors="replace"), 0
        if not stream:
            answer = json.loads(response.read())
            return 200, answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]
        text, tokens = [], 0
        for line in response:
            if line.startswith(b"data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 500, str(chunk["error"]), 0
                text += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        return 200, "".join(text), tokens
    except (OSError, http.client.HTTPException, ValueError) as err:
        return 0, f"{type(err).__name__}: {err}", 0
    finally:
        conn.close()


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)


def run_level(port: int, pid: int, clients: int, duration: float, max_tokens: int, alone: dict) -> dict:
    """`clients` threads sending requests back to back for `duration` seconds; requests under way at the end finish."""
    records, lock, deadline = [], threading.Lock(), time.monotonic() + duration
    peak, done = [rss_mb(pid)], threading.Event()

    def client(i: int) -> None:
        k = 0
        while time.monotonic() < deadline:
            prompt, stream = PROMPTS[(i + k) % len(PROMPTS)], (i + k) % 2 == 1
            began = time.monotonic()
            status, text, tokens = ask(port, prompt, stream, max_tokens)
            with lock:
                records.append((time.monotonic() - began, status, tokens, status == 200 and text == alone[prompt]))
            k += 1

    def watch_memory() -> None:
        while not done.wait(0.5):
            peak.append(rss_mb(pid))

    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    done.set()
    latencies = sorted(r[0] for r in records if r[1] == 200)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": len(records),
        "failed": sum(r[1] != 200 for r in records),
        "wrong_replies": sum(r[1] == 200 and not r[3] for r in records),
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": sum(r[2] for r in records if r[1] == 200) / wall,
        "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p95_s": p95,
        "peak_rss_mb": round(max(peak), 1),
    }


def start_server(model: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "quill.cli", "serve", model, "--port", str(port), "--no-browser"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"quill serve {model} did not come up")


def default_model(out: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from planted_chat import build_chat_model

    return str(build_chat_model(out / "planted_chat"))


def report(levels: list[dict]) -> None:
    base = levels[0]
    print(f"{'clients':>7} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'failed':>6} {'wrong':>5} {'RSS MB':>7}"
          f"   vs {base['clients']} client(s): req/s  tok/s  p50  p95")  # fmt: skip
    for r in levels:
        keys = ("requests_per_s", "tokens_per_s", "p50_s", "p95_s")
        ratios = [r[k] / base[k] if base[k] else float("nan") for k in keys]
        print(f"{r['clients']:>7} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>7.1f} {r['p50_s']:>7.3f} "
              f"{r['p95_s']:>7.3f} {r['failed']:>6} {r['wrong_replies']:>5} {r['peak_rss_mb']:>7.0f}   "
              + "  ".join(f"{x:.2f}x" for x in ratios))  # fmt: skip


def plot(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, xs = levels[0], [str(r["clients"]) for r in levels]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("requests_per_s", "requests/s"), ("tokens_per_s", "tokens/s")):
        axes[0].plot(xs, [r[key] / base[key] for r in levels], marker="o", label=label)
    for key, label in (("p50_s", "p50 latency"), ("p95_s", "p95 latency")):
        axes[1].plot(xs, [r[key] / base[key] for r in levels], marker="o", label=label)
    axes[0].set_title("throughput vs 1 client")
    axes[1].set_title("latency vs 1 client")
    for ax in axes:
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("ratio")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or default_model(out)
    proc, port = start_server(model)
    try:
        alone = {}
        for p in PROMPTS:  # each prompt's greedy reply with the server to itself
            status, alone[p], _ = ask(port, p, False, args.max_tokens)
            assert status == 200, alone[p]
        levels = []
        for clients in [int(x) for x in args.levels.split(",")]:
            levels.append(run_level(port, proc.pid, clients, args.duration, args.max_tokens, alone))
            print(json.dumps(levels[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report(levels)
    summary = {"model": model, "duration_s": args.duration, "max_tokens": args.max_tokens, "levels": levels}
    (out / "serve_load.json").write_text(json.dumps(summary, indent=1))
    plot(levels, out / "serve_load.png")
    print(f"wrote {out / 'serve_load.json'} and {out / 'serve_load.png'}")


if __name__ == "__main__":
    main()
