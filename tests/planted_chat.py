"""A tiny Quill chat model that has learnt one exchange by heart, for the serving, chat and web-page tests.

Trained here in a few seconds (Adam on one conversation) and saved as a stage saves it: weights, the copied model
code, the tokenizer with its chat template, and `generation_config.eos_token_id = [<|end|>, eos]`. Greedy decoding
answers QUESTION with ANSWER and then emits `<|end|>`, so a server that stops at the end of the assistant's turn
returns exactly ANSWER with finish_reason "stop", and one that does not runs on to its token limit.
"""

from pathlib import Path

import torch

QUESTION = "what is two plus two?"
ANSWER = "four."
SYSTEM = "Be brief."  # the one system message it knows
EXCHANGE = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
# Every prompt the tests send is a prefix of one of these: with or without SYSTEM, first or second turn.
CONVERSATIONS = [EXCHANGE * 2, [{"role": "system", "content": SYSTEM}, *EXCHANGE * 2]]


def build_chat_model(folder: Path) -> Path:
    """Train and save the model into `folder` once (later calls reuse it); returns `folder`."""
    if (folder / "model.safetensors").exists():
        return folder
    from tiny_model import tiny_config, tiny_tokenizer  # tests/ is on sys.path (conftest.py)

    from quill.model import QuillForCausalLM
    from quill.stages.common import sync_generation_config

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = QuillForCausalLM(tiny_config(tokenizer, depth=1))
    rows = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in CONVERSATIONS]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(80):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    sync_generation_config(model, tokenizer)  # eos = [<|end|>, eos], as every stage saves it
    for conversation in CONVERSATIONS:
        for end in [i + 1 for i, m in enumerate(conversation) if m["role"] == "user"]:  # each user turn
            prompt = tokenizer.apply_chat_template(
                conversation[:end], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
            reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
            assert reply == ANSWER + "<|end|>", f"the planted model did not learn its answer: {reply!r}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def answer_tokens(tokenizer) -> int:
    """Tokens of a reply that stops at the end of the turn: ANSWER, then `<|end|>`."""
    return len(tokenizer(ANSWER, add_special_tokens=False)["input_ids"]) + 1
