"""`quill chat`: talk to a model in the terminal through `transformers chat`, against `quill serve`'s server.

    quill chat MODEL_OR_DIR [--max-new-tokens N] [--system TEXT] [--port P] [--trust-remote-code] [key=value ...]

Starts transformers' OpenAI-compatible server for the model on a free loopback port (quill.tools.serve, which also
loads custom-code checkpoints) and runs transformers' own terminal client, `transformers chat`, against it: replies
stream, stop at the end of the assistant's turn, and `!clear`, `!set key=value`, `!save`, `!status`, `!help` work
as documented there. `key=value` arguments are generation settings (e.g. do_sample=true temperature=0.7); the
default is greedy decoding. `!exit` or Ctrl-D ends the session; the server stops with it.

Where `transformers chat` (5.24) falls short of the terminal chat Quill had, for the record: it is only a client (it
needs a server, and `transformers serve` cannot load a custom-code checkpoint); Ctrl-C during a reply ends the whole
session rather than the reply; and it sends the whole history every turn, with no dropping of old turns when the
conversation outgrows the model's context.
"""

import argparse
import logging
import socket
import sys

from quill.errors import QuillError, run_guarded
from quill.tools.serve import check_servable, start_server


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="quill chat", description="Multi-turn chat with a model in the terminal (transformers chat)."
    )
    p.add_argument("model", help="model folder (a causal-LM stage's output) or Hub id")
    p.add_argument(
        "generate_flags", nargs="*", metavar="key=value", help="generation settings, e.g. do_sample=true top_p=0.9"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--system", help="system message that opens the conversation")
    p.add_argument("--port", type=int, default=0, help="loopback port for the server (default: a free one)")
    p.add_argument("--device", default="cpu", help="device for inference, e.g. cpu, cuda:0 or auto")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modeling code to run")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_flags(max_new_tokens: int, flags: list[str]) -> list[str]:
    """transformers chat's `key=value` flags: greedy unless told otherwise, and the reply budget."""
    bad = [f for f in flags if "=" not in f or not f.split("=", 1)[0]]
    if bad:
        raise QuillError(f"generation setting '{bad[0]}' is not key=value", fix="write e.g. temperature=0.7")
    keys = {f.split("=", 1)[0] for f in flags}
    defaults = [] if "do_sample" in keys else ["do_sample=false"]
    return [*defaults, *flags, *([] if "max_new_tokens" in keys else [f"max_new_tokens={max_new_tokens}"])]


def chat(argv: list[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(argv)
    if args.max_new_tokens < 1:
        raise QuillError(f"--max-new-tokens expected a positive number, found {args.max_new_tokens}")
    flags = generate_flags(args.max_new_tokens, args.generate_flags)
    check_servable(args.model)
    port = args.port or free_port()
    served = start_server(
        args.model, "127.0.0.1", port, args.device, args.trust_remote_code, args.max_new_tokens, quiet=True
    )
    try:
        from transformers.cli.chat import Chat

        Chat(
            model_id=args.model,
            base_url=f"http://127.0.0.1:{port}",
            generate_flags=flags,
            system_prompt=args.system,
            save_folder="./chat_history/",
            user=None,
            examples_path=None,
            generation_config=None,
        )
    except EOFError:  # Ctrl-D at the prompt: a normal way to leave
        print()
    finally:
        served.kill_server()
        logging.shutdown()


def main(argv: list[str] | None = None) -> None:
    run_guarded(lambda: chat(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
