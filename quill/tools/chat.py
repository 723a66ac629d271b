"""Talk to a model in the terminal.

    quill chat MODEL_OR_DIR [--max-new-tokens N] [--system TEXT] [--trust-remote-code]

Any causal-LM stage folder or Hub id whose tokenizer has a chat template. Replies stream token by token; the
whole conversation goes back to the model each turn (oldest turns dropped when it outgrows the context).
`/reset` forgets the conversation; `/exit` or Ctrl-D ends the session.
"""

import argparse
import copy
import sys

import torch

from quill.errors import QuillError, run_guarded
from quill.loading import CAUSAL_LM, CLASSIFIER, check_model_path, load_tokenizer
from quill.metrics import cut_at_stop, generation_stops, pad_token_id, prompt_ids
from quill.tools.eval import load_on_device, model_kind

PROMPT = "you> "
REPLY = "model> "


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quill chat", description="Multi-turn chat with a model in the terminal.")
    p.add_argument("model", help="model folder (a stage's output) or Hub id")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--system", help="system message that opens the conversation")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modeling code to run")
    return p


def load_chat_model(path: str, trust_remote_code: bool):
    check_model_path(path)
    if model_kind(path, trust_remote_code) == CLASSIFIER:
        raise QuillError(
            f"'{path}' is a reward model (it scores text, it does not write it)",
            fix="chat with a causal-LM stage folder, e.g. sft/, dpo/ or rl/",
        )
    tokenizer = load_tokenizer(path, trust_remote_code)
    if not tokenizer.chat_template:
        raise QuillError(f"the tokenizer of '{path}' has no chat template", fix="chat with a model trained by SFT")
    return load_on_device(path, tokenizer, CAUSAL_LM, trust_remote_code), tokenizer


def generation_config(model, tokenizer, max_new_tokens: int):
    """The model's own generation settings, with a reply budget and every end-of-turn id as a stop."""
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None  # max_new_tokens governs; a saved max_length would cut long conversations short
    config.eos_token_id = generation_stops(model, tokenizer)
    config.pad_token_id = pad_token_id(tokenizer)
    return config


def fit_history(history: list[dict], tokenizer, limit: int | None, reserve: int) -> list[int]:
    """Prompt ids of the conversation, dropping the oldest exchanges (never the system message) to fit `limit`."""
    while True:
        ids = prompt_ids(tokenizer, history)
        turns = [i for i, m in enumerate(history) if m["role"] != "system"]
        if not limit or len(ids) + reserve <= limit or len(turns) <= 1:
            return ids
        del history[turns[0] : turns[1] + 1 if len(turns) > 1 else turns[0] + 1]


def reply(model, tokenizer, history: list[dict], config) -> str:
    """Stream the model's answer to `history` to stdout and return it as text."""
    from transformers import TextStreamer

    limit = getattr(model.config, "max_position_embeddings", None)
    ids = fit_history(history, tokenizer, limit, config.max_new_tokens)
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(REPLY, end="", flush=True)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config, streamer=streamer
        )
    new = cut_at_stop(out[0, input_ids.shape[1] :].tolist(), config.eos_token_id)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def chat(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise QuillError(f"--max-new-tokens expected a positive number, found {args.max_new_tokens}")
    model, tokenizer = load_chat_model(args.model, args.trust_remote_code)
    config = generation_config(model, tokenizer, args.max_new_tokens)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    print(f"Chatting with {args.model}. /reset clears the conversation; /exit or Ctrl-D quits.", flush=True)
    while True:
        try:
            line = input(PROMPT).strip()
        except EOFError:  # Ctrl-D: a normal way to leave
            print()
            return
        except KeyboardInterrupt:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(opening)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:
            answer = reply(model, tokenizer, history, config)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            print("\n[reply interrupted]")
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


def main(argv: list[str] | None = None) -> None:
    run_guarded(lambda: chat(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
