"""`quill serve`: a model folder or Hub id behind transformers' own OpenAI-compatible server, plus a web chat page.

    quill serve MODEL_OR_DIR [--host 127.0.0.1] [--port 8000] [--no-browser] [--max-tokens N] [--trust-remote-code]

This runs `transformers serve MODEL` itself (its FastAPI app, chat-completion handler, streaming and generation;
`/v1/chat/completions`, `/v1/models`, `/health`) with two additions:

- Models whose code ships with the checkpoint load. transformers 5.24's server picks the model class with
  `getattr(transformers, config.architectures[0])` (transformers/cli/serving/model_manager.py, `_load_model`), so
  `transformers serve DIR --trust-remote-code` fails for every custom-code checkpoint, Quill's included, with
  "module transformers has no attribute QuillForCausalLM". Such a model loads here through
  `AutoModelForCausalLM`, as `pipeline()` loads it.
- `GET /` is a one-page web chat (web_chat.html beside this file) that talks to `/v1/chat/completions` on the
  same origin.
- Bad requests get a 4xx whose body is one line in OpenAI's error format, `{"error": {"message", "type", "code"}}`:
  a body that is not JSON (FastAPI's default is a 422 with a list of pydantic details), messages that are not a
  list of turns, and a prompt that leaves no room for a reply in the model's context (`max_position_embeddings`;
  transformers' server would generate past it). A request that names no reply budget gets what the context has left.

Requests are served concurrently by transformers' server: each model generates on one inference thread, in arrival
order, and a streaming client that disconnects cancels its generation at the next token (DirectStreamer.cancel).
tests/test_serve_load.py checks both under concurrent clients; bench/serve_load.py measures throughput and latency.

Without --trust-remote-code a Quill folder runs Quill's installed code (registered with the Auto classes); with it,
the code copied beside the checkpoint runs, exactly as for `transformers serve --trust-remote-code`. Replies stop at
the end of the assistant's turn because the folder's generation_config lists `<|end|>` among its eos ids.
"""

import argparse
import json
import logging
import threading
import time
import webbrowser
from importlib import resources
from pathlib import Path

from quill.errors import QuillError, one_line, run_guarded

WEB_PAGE = "web_chat.html"  # beside this module, shipped as package data


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="quill serve", description="Serve a model with transformers' OpenAI-compatible server and a web chat page."
    )
    p.add_argument("model", help="model folder (any causal-LM stage's output) or Hub id")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="listen port")
    p.add_argument("--no-browser", action="store_true", help="do not open the web chat page in a browser")
    p.add_argument(
        "--max-tokens", type=int, default=256, help="reply budget the web page asks for (API clients set their own)"
    )
    p.add_argument("--device", default="cpu", help="device for inference, e.g. cpu, cuda:0 or auto")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the modelling code shipped with the checkpoint (needed for non-Quill custom models)",
    )
    return p


def check_servable(model: str) -> None:
    """A local folder must be a causal LM with a chat template; a Hub id is checked by transformers when it loads."""
    folder = Path(model)
    if not folder.exists():
        if folder.is_absolute() or model.startswith(".") or model.count("/") > 1:
            raise QuillError(f"model folder '{model}' not found", fix="pass a stage's output folder or a Hub id")
        return
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise QuillError(
            f"'{model}' has no readable config.json ({one_line(err, 120)})",
            fix="pass a finished stage folder (previous stage missing or unfinished?)",
        ) from None
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise QuillError(
            f"'{model}' is a reward model (it scores text, it does not write it)",
            fix="serve a causal-LM stage folder such as sft/, dpo/ or rl/; score text with "
            "pipeline('text-classification', model=...)",
        )
    tokenizer_config = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").exists() or (
        tokenizer_config.exists() and "chat_template" in json.loads(tokenizer_config.read_text(encoding="utf-8"))
    )
    if not has_template:
        raise QuillError(f"the tokenizer of '{model}' has no chat template", fix="serve a model trained by SFT")


def remote_code_model_manager(base):
    """transformers' ModelManager, but a model whose class transformers does not export loads through the Auto class
    (the checkpoint's own code with trust_remote_code, or a class registered with the Auto classes)."""
    import transformers

    class RemoteCodeModelManager(base):
        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            from transformers.cli.serving.utils import split_revision

            model_id, revision = split_revision(model_id_and_revision)
            config = transformers.AutoConfig.from_pretrained(
                model_id, revision=revision, trust_remote_code=self.trust_remote_code
            )
            architectures = getattr(config, "architectures", None) or []
            if gguf_file is not None or all(hasattr(transformers, a) for a in architectures[:1]):
                return super()._load_model(model_id_and_revision, tqdm_class, progress_callback, gguf_file)
            if progress_callback is not None:
                progress_callback({"status": "loading", "model": model_id_and_revision, "stage": "weights"})
            return transformers.AutoModelForCausalLM.from_pretrained(
                model_id,
                revision=revision,
                attn_implementation=self.attn_implementation,
                dtype=self.dtype,
                device_map=self.device,
                trust_remote_code=self.trust_remote_code,
                quantization_config=self.get_quantization_config(),
            )

    return RemoteCodeModelManager


def with_web_page(build_server, max_tokens: int):
    """transformers' app factory, plus `GET /` (the web chat page, told the reply budget it should ask for), the
    context check on chat requests and one-line errors."""
    page = resources.files("quill.tools").joinpath(WEB_PAGE).read_text(encoding="utf-8")
    page = page.replace("__QUILL_MAX_TOKENS__", str(max_tokens))

    def build(model_manager, chat_handler, *args, **kwargs):
        from fastapi.responses import HTMLResponse

        chat_handler.handle_request = within_context(chat_handler)
        app = build_server(model_manager, chat_handler, *args, **kwargs)
        app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
        one_line_errors(app)
        return app

    return build


def within_context(chat_handler):
    """The chat handler's `handle_request`, after checking that the messages are turns and that the prompt leaves
    room for the reply in the model's context (400 otherwise, as OpenAI's context_length_exceeded)."""
    handle = chat_handler.handle_request

    async def handle_request(body: dict, request_id: str):
        from fastapi import HTTPException

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise HTTPException(400, "'messages' must be a non-empty list of {role, content} objects")
        _, model, processor = chat_handler._resolve_model(dict(body))  # the loaded model (a copy: it edits body)
        context = getattr(model.config, "max_position_embeddings", None)
        if not context:
            return await handle(body, request_id)
        try:
            ids = processor.apply_chat_template(messages, add_generation_prompt=True, return_dict=False,
                                                tools=body.get("tools"))  # fmt: skip
        except Exception as err:  # a template that refuses these messages (roles out of order, missing content)
            why = one_line(err, 200)
            raise HTTPException(400, f"the messages do not fit the model's chat template ({why})") from None
        prompt, asked = len(ids), body.get("max_completion_tokens") or body.get("max_tokens")
        if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 1):
            raise HTTPException(400, f"max_tokens must be a positive whole number, found {asked!r}")
        if prompt + (asked or 1) > context:
            wanted = f"{prompt} in the messages" + (f" and {asked} for the reply" if asked else "")
            fix = "shorten the messages" + (" or lower max_tokens" if asked else "")
            raise HTTPException(400, f"this model's context is {context} tokens, the request needs {wanted}; {fix}")
        if not asked and body.get("generation_config") is None:
            default = max(model.generation_config.max_new_tokens or 0, 1024)  # transformers' server default
            body["max_tokens"] = min(default, context - prompt)
        return await handle(body, request_id)

    return handle_request


def one_line_errors(app) -> None:
    """Every HTTP error as OpenAI's API answers one, `{"error": {"message", "type", "code"}}`, its message one line:
    what the OpenAI client shows, instead of FastAPI's `{"detail": ...}` (for a body that is not JSON, a 422 with a
    list of pydantic error objects)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(status: int, message: str) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": one_line(message), "type": kind, "code": status}}, status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError):
        first = next(iter(exc.errors()), {})
        if first.get("type") == "json_invalid":
            return error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'unreadable')})")
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error(400, f"invalid request body: {first.get('msg', 'unreadable')} ({where})")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)  # a failed generation: Starlette still logs the traceback on the server
    async def server_error(request, exc: Exception):
        return error(500, f"generation failed ({type(exc).__name__}: {one_line(exc, 300)})")


def start_server(
    model: str, host: str, port: int, device: str, trust_remote_code: bool, max_tokens: int, quiet: bool = False
):
    """Start transformers' `Serve` in a background thread (the model is loaded first) and return it once it listens.
    `quiet` keeps the per-request log lines out of a terminal that a chat client draws on."""
    try:
        from transformers.cli import serve as serve_cli
        from transformers.cli.serving import model_manager, server
    except ImportError as err:
        raise QuillError(f"serving needs FastAPI and uvicorn ({err})", fix="pip install 'quill[serve]'") from None
    if not trust_remote_code:
        import quill.model  # noqa: F401  registers Quill with the Auto classes: the installed code serves Quill folders

    # Serve imports both names from their modules when it starts, so swapping them here is enough.
    saved = model_manager.ModelManager, server.build_server
    model_manager.ModelManager = remote_code_model_manager(saved[0])
    server.build_server = with_web_page(saved[1], max_tokens)
    try:
        served = serve_cli.Serve(
            force_model=model,
            host=host,
            port=port,
            device=device,
            trust_remote_code=trust_remote_code,
            log_level="error" if quiet else "warning",
            non_blocking=True,
        )
    except (OSError, ValueError) as err:
        raise QuillError(
            f"model '{model}' could not be loaded ({one_line(err, 200)})",
            fix="pass a model folder or Hub id (add --trust-remote-code for custom code)",
        ) from None
    finally:
        model_manager.ModelManager, server.build_server = saved
    deadline = time.monotonic() + 60
    while not served.server.started:
        if not served._thread.is_alive() or time.monotonic() > deadline:
            raise QuillError(f"the server did not start on {host}:{port}", fix="is the port in use? pass --port")
        time.sleep(0.05)
    if quiet:
        logging.getLogger("uvicorn.access").disabled = True
    return served


def serve(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.max_tokens < 1:
        raise QuillError(f"--max-tokens expected a positive number, found {args.max_tokens}")
    check_servable(args.model)
    served = start_server(args.model, args.host, args.port, args.device, args.trust_remote_code, args.max_tokens)
    url = f"http://{args.host}:{args.port}/"
    print(f"serving {args.model}: web chat {url}, OpenAI-compatible API {url}v1 (Ctrl-C stops)", flush=True)
    if not args.no_browser:
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        while served._thread.is_alive():
            served._thread.join(timeout=0.5)
    finally:
        served.kill_server()


def main(argv: list[str] | None = None) -> None:
    run_guarded(lambda: serve(argv))


if __name__ == "__main__":
    main()
