"""Held-out metrics: the numbers each stage records at its end, and `quill eval` on any Hub-format model.

    quill eval MODEL_OR_DIR [--data-dir D] [--limit N] [--output FILE] [--trust-remote-code]

Every function here runs under `torch.no_grad()` in eval mode (the model's mode is restored afterwards), batches its
inputs, and generates greedily with a bounded `max_new_tokens`, so a stage can call it before and after training.

- `heldout_loss`: nats per token and bits per byte on held-out text.
- `task_accuracy`: greedy answers to held-out task questions, scored by the task's own reasoning-gym scorer.
- `reward_preference_accuracy`: how often a reward model scores the chosen answer above the rejected one.
- `dpo_preference_accuracy`: the same with DPO's implicit reward beta * (log p_policy - log p_reference).
- `mean_reward`: the mean reward (TRL reward-function signature) of greedy completions, for RL models.

The `evaluate` library is not used: all its metrics (even "accuracy") are scripts fetched from the Hub at
`evaluate.load()` time, which fails offline, and the metrics here are one-line means anyway.
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from quill.errors import QuillError, first_line
from quill.markers import MARKER
from quill.models import check_model_path, load_model, load_tokenizer, read_json

# Rows `quill eval` scores from the default data when --limit is not given: enough to compare stages, quick on CPU.
DEFAULT_EVAL_ROWS = {"pretrain_eval": None, "rl_eval": 200, "dpo_eval": 100}
EVAL_FILES = ("pretrain_eval", "rl_eval", "dpo_eval")
STAGES = ("pretrain", "sft", "dpo", "reward", "rl")


# -- small helpers ---------------------------------------------------------------------------------------------


@contextmanager
def _inference(model):
    """Eval mode and no grad for the duration; a model called mid-training goes back to train mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _pad(seqs: list[list[int]], pad_id: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad by hand so the caller's tokenizer (its padding_side) is never changed."""
    width = max(len(s) for s in seqs)
    ids, mask = [], []
    for s in seqs:
        fill = [pad_id] * (width - len(s))
        ids.append(fill + s if side == "left" else s + fill)
        mask.append([0] * len(fill) + [1] * len(s) if side == "left" else [1] * len(s) + [0] * len(fill))
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def stop_ids(model, tokenizer) -> list[int]:
    """End of an assistant turn or of text: generation_config's eos ids, `<|end|>` if the vocabulary has it, eos."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    ids += [end if end != tokenizer.unk_token_id else None, tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, tok in enumerate(ids):
        if tok in stops:
            return ids[:i]
    return ids


def _as_messages(answer) -> list[dict]:
    return [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A chat prompt (message list) through the chat template, up to the assistant header; a plain string as is."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if not tokenizer.chat_template:
        raise QuillError("the tokenizer has no chat template, so chat prompts cannot be rendered",
                         fix="use a tokenizer with a chat_template (Quill's tokenizer stage adds one)")
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes BOS itself


def _tokenize(tokenizer, content, **template_kwargs) -> list[int]:
    if isinstance(content, str):
        return tokenizer(content)["input_ids"]
    return tokenizer(tokenizer.apply_chat_template(content, tokenize=False, **template_kwargs),
                     add_special_tokens=False)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def preference_ids(tokenizer, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids of a preference pair, split exactly as TRL's DPOTrainer splits them.

    Prompt and prompt + answer are tokenized whole (chat template for message lists; EOS appended to plain-text
    answers) and the answers start where the token lists diverge. A pair without a prompt (implicit prompt) gets
    its shared opening messages as the prompt, as in TRL.
    """
    from trl.data_utils import maybe_extract_prompt

    pair = maybe_extract_prompt(dict(pair))
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    if isinstance(prompt, str):
        eos = tokenizer.eos_token or ""
        chosen, rejected = (a if a.endswith(eos) else a + eos for a in (chosen, rejected))
        prompt_ids = _tokenize(tokenizer, prompt)
    else:
        chosen, rejected = _as_messages(chosen), _as_messages(rejected)
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)
    with_chosen, with_rejected = _tokenize(tokenizer, prompt + chosen), _tokenize(tokenizer, prompt + rejected)
    n = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    return prompt_ids[:n], with_chosen[n:], with_rejected[n:]


# -- held-out text ---------------------------------------------------------------------------------------------


def heldout_loss(model, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8) -> dict:
    """Mean nats per token and bits per byte over `texts`.

    Scored tokens: every token of each text (tokenized without special tokens), each predicted from one leading
    BOS (EOS for tokenizers without one) plus the text before it. No EOS is appended, so the nats belong exactly
    to the text's UTF-8 bytes: bits_per_byte = total nats / ln 2 / total bytes. Texts longer than `max_length`
    are cut into windows of `max_length` that overlap by one token, so each token is scored exactly once, with up
    to `max_length - 1` tokens of context.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise QuillError("heldout_loss: the tokenizer has neither a BOS nor an EOS token to start texts with")
    windows, total_bytes = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if not ids:
            continue
        total_bytes += len(text.encode("utf-8"))
        ids = [start] + ids
        windows += [ids[i : i + max_length] for i in range(0, len(ids) - 1, max_length - 1)]
    if not windows:
        raise QuillError("heldout_loss: expected some non-empty held-out texts, found none")
    windows.sort(key=len)  # similar lengths share a batch: less padding
    nats, count = 0.0, 0
    device = _device(model)
    with _inference(model):
        for batch in _batches(windows, batch_size):
            input_ids, mask = _pad(batch, pad_token_id(tokenizer), "right", device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nats += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return {"eval_loss": nats / count, "bits_per_byte": nats / math.log(2) / total_bytes}


# -- generation and task scoring -------------------------------------------------------------------------------


def generate_completions(model, tokenizer, prompts: list, max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy completions of `prompts` (chat message lists or strings), cut at the first stop token, decoded."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    stops = stop_ids(model, tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    texts = [""] * len(encoded)
    device, pad = _device(model), pad_token_id(tokenizer)
    with _inference(model):
        for batch in _batches(order, batch_size):
            # Left padding: every row's prompt ends at the same column, so new tokens line up after it.
            input_ids, mask = _pad([encoded[i] for i in batch], pad, "left", device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad)
            for i, row in zip(batch, out[:, input_ids.shape[1] :].tolist(), strict=True):
                texts[i] = tokenizer.decode(cut_at_stop(row, stops), skip_special_tokens=True)
    return texts


def score_completions(rows: list[dict], completions: list[str]) -> dict:
    """Fraction fully correct (score 1.0; reasoning-gym gives partial credit below that), overall and per task."""
    from quill.data import tasks as task_lib  # here, not at the top: reasoning-gym is slow to import

    per_task = defaultdict(list)
    for row, text in zip(rows, completions, strict=True):
        per_task[row["task"]].append(task_lib.score(row["task"], text, row) >= 1.0)
    hits = [h for v in per_task.values() for h in v]
    metrics = {"task_accuracy": sum(hits) / len(hits) if hits else float("nan")}
    metrics.update({f"{task}_accuracy": sum(v) / len(v) for task, v in sorted(per_task.items())})
    return metrics


def task_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 32, batch_size: int = 16) -> dict:
    """Held-out task accuracy of a chat model. `rows`: RL/eval rows {prompt, task, answer, metadata}."""
    rows = list(rows)
    completions = generate_completions(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    return score_completions(rows, completions)


def reward_metrics(rows: list[dict], completions: list[str], reward_funcs: list | None = None) -> dict:
    """Mean total reward of `completions`, each reward function called as TRL calls it: `f(completions, **columns)`.

    Rewards of several functions are summed per completion (TRL's default, unit weights); `None` counts as 0.
    """
    from quill.data import tasks as task_lib

    if not rows:
        return {"mean_reward": float("nan")}
    funcs = reward_funcs or [task_lib.reward_fn]
    # TRL hands conversational completions to reward functions as assistant message lists.
    shaped = [c if isinstance(r["prompt"], str) else _as_messages(c) for r, c in zip(rows, completions, strict=True)]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
    totals = [0.0] * len(rows)
    metrics = {}
    for func in funcs:
        values = [0.0 if v is None else float(v) for v in func(completions=shaped, prompts=[r["prompt"] for r in rows],
                                                                 **columns)]
        totals = [t + v for t, v in zip(totals, values, strict=True)]
        if len(funcs) > 1:
            metrics[f"reward_{getattr(func, '__name__', 'func')}"] = sum(values) / len(values)
    return {"mean_reward": sum(totals) / len(totals), **metrics}


def mean_reward(model, tokenizer, rows: list[dict], reward_funcs: list | None = None, max_new_tokens: int = 32,
                batch_size: int = 16) -> dict:
    """Mean reward of greedy completions; default reward: the tasks' own scorers (partial credit included)."""
    rows = list(rows)
    completions = generate_completions(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    return reward_metrics(rows, completions, reward_funcs)


# -- preferences -----------------------------------------------------------------------------------------------


def _reward_scores(model, tokenizer, seqs: list[list[int]], batch_size: int) -> torch.Tensor:
    device, scores = _device(model), []
    for batch in _batches(seqs, batch_size):
        input_ids, mask = _pad(batch, pad_token_id(tokenizer), "right", device)
        scores.append(model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().cpu())
    return torch.cat(scores)


def reward_preference_accuracy(reward_model, tokenizer, pairs: list[dict], batch_size: int = 16) -> dict:
    """Fraction of pairs the reward model ranks right (score(chosen) > score(rejected)), and the mean margin.

    Chosen and rejected are scored as whole conversations (prompt + answer) through the chat template, the way
    TRL's RewardTrainer sees them.
    """
    if reward_model.config.pad_token_id is None:  # sequence classifiers pool at the last non-pad token
        reward_model.config.pad_token_id = pad_token_id(tokenizer)
    split = [preference_ids(tokenizer, p) for p in pairs]
    with _inference(reward_model):
        chosen = _reward_scores(reward_model, tokenizer, [p + c for p, c, _ in split], batch_size)
        rejected = _reward_scores(reward_model, tokenizer, [p + r for p, _, r in split], batch_size)
    margin = chosen - rejected
    return {"preference_accuracy": (margin > 0).float().mean().item(), "reward_margin": margin.mean().item()}


def completion_logps(model, tokenizer, examples: list[tuple[list[int], list[int]]], batch_size: int = 16) -> torch.Tensor:
    """Summed log-probabilities of each completion given its prompt; examples are (prompt ids, completion ids)."""
    device, out = _device(model), []
    for batch in _batches(examples, batch_size):
        input_ids, mask = _pad([p + c for p, c in batch], pad_token_id(tokenizer), "right", device)
        scored = torch.zeros_like(mask)
        for row, (p, c) in enumerate(batch):
            scored[row, len(p) : len(p) + len(c)] = 1
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        out.append((logps * scored[:, 1:]).sum(-1).cpu())
    return torch.cat(out)


def dpo_preference_accuracy(policy, reference, tokenizer, pairs: list[dict], beta: float = 0.1,
                            batch_size: int = 16) -> dict:
    """DPO's implicit reward r = beta * (log p_policy - log p_reference), summed over the completion tokens.

    Accuracy: fraction of pairs with r(chosen) > r(rejected) (TRL's `rewards/accuracies`; 0 before training,
    when policy == reference). `reference=None` with a PEFT policy uses the policy with its adapter disabled.
    """
    split = [preference_ids(tokenizer, p) for p in pairs]
    examples = {"chosen": [(p, c) for p, c, _ in split], "rejected": [(p, r) for p, _, r in split]}
    if reference is None and not hasattr(policy, "disable_adapter"):
        raise QuillError("dpo_preference_accuracy: no reference model given",
                         fix="pass the starting (SFT) model as the reference")
    rewards = {}
    for side, ex in examples.items():
        with _inference(policy):
            logp_policy = completion_logps(policy, tokenizer, ex, batch_size)
        ref_model = reference if reference is not None else policy
        ref_context = policy.disable_adapter() if reference is None else nullcontext()
        with _inference(ref_model), ref_context:
            logp_ref = completion_logps(ref_model, tokenizer, ex, batch_size)
        rewards[side] = beta * (logp_policy - logp_ref)
    margin = rewards["chosen"] - rewards["rejected"]
    return {"dpo_reward_accuracy": (margin > 0).float().mean().item(), "dpo_reward_margin": margin.mean().item()}


# -- eval data -------------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    folder: Path
    texts: list[str] = field(default_factory=list)  # pretrain_eval {text}
    task_rows: list[dict] = field(default_factory=list)  # rl_eval {prompt, task, answer, metadata}
    pairs: list[dict] = field(default_factory=list)  # dpo_eval {prompt, chosen, rejected, task}


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise QuillError(f"{path}:{n}: not valid JSON ({err.msg})", fix="fix or regenerate the file") from None
    return rows


def default_eval_dir() -> Path:
    """The embedded default data's folder, the same one `quill:default/...` recipes train from (built once)."""
    from quill.data import builtin

    return Path(builtin.resolve("quill:default/rl_eval")).parent


def load_eval_data(data_dir=None, limit: int | None = None) -> EvalData:
    """pretrain_eval.jsonl, rl_eval.jsonl and dpo_eval.jsonl from `data_dir` (default: the default data), `limit` rows each."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise QuillError(f"eval data folder '{data_dir}' not found", fix="pass --data-dir a folder made by the data step")
    folder = Path(data_dir) if data_dir is not None else default_eval_dir()
    rows = {name: limit if limit is not None or data_dir is not None else DEFAULT_EVAL_ROWS[name] for name in EVAL_FILES}
    texts = [r["text"] for r in _read_jsonl(folder / "pretrain_eval.jsonl", rows["pretrain_eval"]) if r.get("text")]
    data = EvalData(folder, texts, _read_jsonl(folder / "rl_eval.jsonl", rows["rl_eval"]),
                    _read_jsonl(folder / "dpo_eval.jsonl", rows["dpo_eval"]))
    if not (data.texts or data.task_rows or data.pairs):
        raise QuillError(f"eval data folder '{folder}' has none of {', '.join(f + '.jsonl' for f in EVAL_FILES)}",
                         fix="pass --data-dir a folder with held-out files in the default data's layout")
    return data


# -- any model folder or Hub id --------------------------------------------------------------------------------


def model_kind(path: str, trust_remote_code: bool = False) -> str:
    """'reward' for a sequence classifier (config architectures), else 'causal-lm'."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise QuillError(f"model '{path}' could not be loaded ({first_line(err)})",
                         fix="pass a model folder or Hub id (add --trust-remote-code for custom code)") from err
    archs = getattr(config, "architectures", None) or []
    return "reward" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal-lm"


def stage_info(path: str) -> tuple[str | None, str | None]:
    """(stage, base model) of a Quill stage folder: the completion marker, else the model card's front matter."""
    folder = Path(path)
    stage = read_json(folder / MARKER).get("stage")
    try:
        card = (folder / "README.md").read_text(encoding="utf-8")
    except OSError:
        card = ""
    front = card.split("---")[1].splitlines() if card.startswith("---") and card.count("---") >= 2 else []
    base = None
    for line in front:
        if line.startswith("base_model:"):
            base = line.split(":", 1)[1].strip()
        elif stage is None and line.startswith("- ") and line[2:].strip() in STAGES:  # the card's tags
            stage = line[2:].strip()
    return stage, base


def _resolve_base(model_dir: Path, base: str | None) -> str | None:
    """The DPO reference: the card's base_model as written (relative to the cwd of the run), else a sibling folder."""
    if not base:
        return None
    for candidate in (Path(base), model_dir.parent / Path(base).name):
        if (candidate / "config.json").exists():
            return str(candidate)
    return None


def load_on_device(path: str, tokenizer, task: str, trust_remote_code: bool):
    args = SimpleNamespace(model_name_or_path=path, dtype="float32", attn_implementation=None,
                           trust_remote_code=trust_remote_code)
    model = load_model(args, tokenizer, task=task)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def evaluate_model(model_name_or_path: str, data_dir=None, limit: int | None = None, trust_remote_code: bool = False,
                   max_new_tokens: int = 32) -> dict:
    """Every metric that applies to this model: a reward model gets preference accuracy; a causal LM gets held-out
    loss / bits per byte and task accuracy, plus mean reward (RL stage) or DPO implicit-reward accuracy (DPO stage
    whose base model folder is found)."""
    path = str(model_name_or_path)
    check_model_path(path)
    kind = model_kind(path, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    data = load_eval_data(data_dir, limit)
    model = load_on_device(path, tokenizer, kind, trust_remote_code)
    if kind == "reward":
        if not data.pairs:
            raise QuillError(f"a reward model needs preference pairs; '{data.folder}' has no dpo_eval.jsonl")
        return reward_preference_accuracy(model, tokenizer, data.pairs)

    metrics = heldout_loss(model, tokenizer, data.texts) if data.texts else {}
    stage, base = stage_info(path) if Path(path).is_dir() else (None, None)
    if data.task_rows and tokenizer.chat_template:
        completions = generate_completions(model, tokenizer, [r["prompt"] for r in data.task_rows], max_new_tokens)
        metrics.update(score_completions(data.task_rows, completions))
        if stage == "rl":
            metrics.update(reward_metrics(data.task_rows, completions))
    elif data.task_rows:
        _note("task accuracy skipped: the tokenizer has no chat template")
    reference_path = _resolve_base(Path(path), base) if stage == "dpo" and data.pairs else None
    if reference_path:
        reference = load_on_device(reference_path, tokenizer, "causal-lm", trust_remote_code)
        metrics.update(dpo_preference_accuracy(model, reference, tokenizer, data.pairs))
    elif stage == "dpo":
        _note(f"DPO implicit-reward accuracy skipped: base model '{base}' not found")
    return metrics


def _note(msg: str) -> None:
    print(f"[quill] eval: {msg}", file=sys.stderr, flush=True)


# -- CLI -------------------------------------------------------------------------------------------------------


def format_table(metrics: dict) -> str:
    width = max([len("metric")] + [len(k) for k in metrics])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    for key, value in metrics.items():
        lines.append(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quill eval", description="Held-out metrics of a model folder or Hub id.")
    p.add_argument("model", help="model folder (any stage's output, or any Hub-format folder) or Hub id")
    p.add_argument("--data-dir", help="folder with pretrain_eval/rl_eval/dpo_eval.jsonl (default: the default data)")
    p.add_argument("--limit", type=int, help="use at most N rows of each eval file")
    p.add_argument("--output", help="JSON file for the results (default: eval_results.json in the model folder)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation budget per task answer")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modeling code to run")
    return p


def run(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise QuillError(f"--limit expected a positive number of rows, found {args.limit}")
    metrics = evaluate_model(args.model, args.data_dir, args.limit, args.trust_remote_code, args.max_new_tokens)
    print(format_table(metrics), flush=True)
    output = Path(args.output) if args.output else (Path(args.model) if Path(args.model).is_dir() else Path.cwd())
    output = output / "eval_results.json" if not args.output else output
    result = {"model": args.model, "data_dir": args.data_dir, "limit": args.limit, "metrics": metrics}
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1))
    except OSError as err:
        raise QuillError(f"could not write '{output}' ({err.strerror})", fix="pass --output a writable file") from err
    print(f"saved {output}", file=sys.stderr)
    return metrics


def main(argv: list[str] | None = None) -> None:
    from quill.cli import run_guarded

    run_guarded(lambda: run(argv))


if __name__ == "__main__":
    main()
