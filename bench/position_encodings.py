"""Position encodings compared: the tiny decoder trained once per encoding, held-out loss at 1x, 2x and 4x the
training length.

    python bench/position_encodings.py [--steps 800] [--length 64] [--device cpu] [--out bench/results]

For each ``QuillConfig.position_embedding`` (rope, sinusoidal, learned, alibi) the same ``QuillForCausalLM`` (same
size, seed and initial weights where the encodings share parameters) trains on the same batches of
``quill:default/pretrain_train`` packed into rows of ``--length`` tokens. It is then scored on the held-out documents
(``quill:default/pretrain_eval``) packed into one token stream and cut into windows of L, 2L and 4L tokens: the same
tokens at every length, so a column differs from the first only by how far the positions reach. Two numbers per
length: the token-weighted mean loss over the whole window, and over the positions at or past L only (the tokens the
model never saw a position for in training; empty at L). The table gives each longer length as a ratio against the
encoding's loss at L. The learned table is built with 4L rows (it refuses positions past ``max_position_embeddings``),
so its rows past L were never trained: its longer columns are flagged, and they are the point of the comparison.

Writes OUT/position_encodings.json and a chart, OUT/position_encodings.png (loss vs eval length, a line per encoding).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from quill.data.builtin import resolve
from quill.data.tokenizer import train_tokenizer
from quill.model import QuillConfig, QuillForCausalLM

ENCODINGS = ("rope", "sinusoidal", "learned", "alibi")
FACTORS = (1, 2, 4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800, help="training steps per encoding (default 800: ~1.5 min each)")
    p.add_argument("--length", type=int, default=64, help="training length L in tokens; eval at L, 2L, 4L")
    p.add_argument("--device", default="cpu", help="torch device to train and score on (default cpu)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (64-dim heads)")
    p.add_argument("--depth", type=int, default=2, help="number of layers")
    p.add_argument("--batch-size", type=int, default=16, help="rows of L tokens per step")
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the pretraining text")
    p.add_argument("--seed", type=int, default=0)
    # One thread by default: the machine is shared, and single-threaded runs are also reproducible run to run.
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = p.parse_args(argv)
    for name in ("steps", "length", "hidden", "depth", "batch_size", "vocab", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.hidden % 64:
        p.error(f"--hidden must be a multiple of 64 (the head size), got {args.hidden}")
    return args


def _texts(name: str) -> list[str]:
    with open(resolve(f"quill:default/{name}")) as f:
        return [json.loads(line)["text"] for line in f]


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    # Documents back to back, each starting with BOS (the tokenizer prepends it), as pretraining packs them.
    return torch.tensor([t for ids in tokenizer(texts)["input_ids"] for t in ids])


def _build(encoding: str, length: int, hidden: int, depth: int, vocab: int, seed: int) -> QuillForCausalLM:
    config = QuillConfig(
        depth=depth,
        hidden_size=hidden,
        vocab_size=vocab,
        position_embedding=encoding,
        # Only `learned` reads this: its table gets a row for every eval position, and rows past L stay untrained.
        max_position_embeddings=max(FACTORS) * length,
    )
    torch.manual_seed(seed)  # same initial weights for the parameters every encoding shares
    return QuillForCausalLM(config)


@torch.no_grad()
def _score(model, stream: torch.Tensor, length: int, factor: int, device) -> dict:
    """Token-weighted mean loss over windows of factor * length tokens, and over their positions >= length."""
    n = factor * length
    windows = stream.view(-1, n)
    total, past, n_all, n_past = 0.0, 0.0, 0, 0
    for batch in windows.split(16):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        total, n_all = total + nll.sum().item(), n_all + nll.numel()
        # nll[:, i] predicts the token at position i + 1: positions >= length are columns >= length - 1.
        tail = nll[:, length - 1 :]
        past, n_past = past + tail.sum().item(), n_past + tail.numel()
    return {"loss": total / n_all, "loss_past_L": past / n_past if factor > 1 else None, "tokens": n_all}


def compare(
    steps=800, length=64, device="cpu", out=None, hidden=128, depth=2, batch_size=16, vocab=1024, seed=0, log=print
) -> dict:
    """Train one model per encoding on identical batches and score each on the held-out stream; write JSON + PNG."""
    train_texts, eval_texts = _texts("pretrain_train"), _texts("pretrain_eval")
    tokenizer = train_tokenizer(train_texts[:3000], vocab_size=vocab)
    train = _stream(tokenizer, train_texts)
    train = train[: len(train) // length * length].view(-1, length)
    # The same order of rows for every encoding: one permutation, drawn once.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held = _stream(tokenizer, eval_texts)
    held = held[: len(held) // (max(FACTORS) * length) * (max(FACTORS) * length)]  # same tokens at every length
    if len(held) == 0:
        raise ValueError(f"held-out text has fewer than {max(FACTORS) * length} tokens; use a smaller --length")

    # Linear warm-up then linear decay to zero: a short run still ends at a settled loss.
    warm = max(1, steps // 10)

    def schedule(s: int) -> float:
        return min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))

    results = {}
    for encoding in ENCODINGS:
        model = _build(encoding, length, hidden, depth, len(tokenizer), seed).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        model.train()
        start = time.perf_counter()
        for step in range(steps):
            idx = order[(torch.arange(batch_size) + step * batch_size) % len(order)]
            batch = train[idx].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        scores = {f"{f}L": _score(model, held, length, f, device) for f in FACTORS}
        results[encoding] = {
            "train_loss": loss.item(),
            "train_seconds": time.perf_counter() - start,
            "untrained_past_L": encoding == "learned",  # the learned rows for positions >= L never got a gradient
            **scores,
        }
        log(f"  {encoding:<10} trained in {results[encoding]['train_seconds']:.0f}s, last train loss {loss.item():.3f}")

    summary = {
        "steps": steps,
        "length": length,
        "eval_lengths": [f * length for f in FACTORS],
        "model": {"hidden_size": hidden, "depth": depth, "vocab_size": len(tokenizer)},
        "batch_size": batch_size,
        "seed": seed,
        "held_out_tokens": len(held),
        "device": str(device),
        "encodings": results,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "position_encodings.json").write_text(json.dumps(summary, indent=2) + "\n")
        _plot(summary, out / "position_encodings.png")
    return summary


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for encoding, r in summary["encodings"].items():
        losses = [r[f"{f}L"]["loss"] for f in FACTORS]
        label = f"{encoding} (rows past L untrained)" if r["untrained_past_L"] else encoding
        ax.plot(summary["eval_lengths"], losses, marker="o", label=label)
    ax.axvline(summary["length"], color="grey", linestyle=":", label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xticks(summary["eval_lengths"], [str(n) for n in summary["eval_lengths"]])
    ax.set_xlabel("eval window (tokens)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"Position encodings, trained at L={summary['length']} for {summary['steps']} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(summary: dict) -> None:
    L = summary["length"]
    print(f"\nheld-out loss (nats/token, {summary['held_out_tokens']} tokens) after {summary['steps']} steps at L={L}")
    print(f"{'encoding':<11}{'@L':>8}{'@2L':>8}{'@4L':>8}{'2L/L':>7}{'4L/L':>7}{'2L>=L':>8}{'4L>=L':>8}")
    for encoding, r in summary["encodings"].items():
        base = r["1L"]["loss"]
        flag = " *" if r["untrained_past_L"] else ""
        print(
            f"{encoding:<11}{base:8.3f}{r['2L']['loss']:8.3f}{r['4L']['loss']:8.3f}"
            f"{r['2L']['loss'] / base:7.2f}{r['4L']['loss'] / base:7.2f}"
            f"{r['2L']['loss_past_L']:8.3f}{r['4L']['loss_past_L']:8.3f}{flag}"
        )
    print(
        "  @kL: mean over windows of k*L tokens; kL/L: ratio against the same encoding at L (>1 = worse);"
        " kL>=L: mean over positions >= L only (never seen in training)."
    )
    if any(r["untrained_past_L"] for r in summary["encodings"].values()):
        print(
            f"  * learned: its table has {max(FACTORS) * L} rows but rows >= {L} were never trained; its >L columns"
            " measure exactly that (random position vectors), not a tuned long-context model."
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"position encodings: L={args.length}, {args.steps} steps, hidden {args.hidden}, depth {args.depth}")
    summary = compare(
        steps=args.steps,
        length=args.length,
        device=device,
        out=args.out,
        hidden=args.hidden,
        depth=args.depth,
        batch_size=args.batch_size,
        vocab=args.vocab,
        seed=args.seed,
        log=lambda m: print(m, flush=True),
    )
    print_table(summary)
    print(f"wrote {args.out / 'position_encodings.json'} and {args.out / 'position_encodings.png'}")
    return 0 if all(math.isfinite(r[f"{f}L"]["loss"]) for r in summary["encodings"].values() for f in FACTORS) else 1


if __name__ == "__main__":
    sys.exit(main())
