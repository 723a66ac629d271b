"""Training throughput of Quill against transformers' LlamaForCausalLM of the same dimensions.

    python bench/model_throughput.py [--quick] [--system-malloc] [--out bench/results]

One process, four measurements:

1. Dense rows: tokens/s of a full training step (forward, loss, backward, AdamW step) for Quill and Llama at two
   sizes. Same hidden/intermediate size, layers, heads, kv heads, vocab, tied embeddings, no biases. What differs is
   the implementation (fused projections, the fused LM head + loss, RoPE/RMSNorm/SwiGLU with hand-written backwards),
   plus Quill's QK-norm (on by default and kept on here: it is extra work for Quill).
2. Packed rows: 8 documents of mixed length per row, restarting position_ids, no attention_mask, use_cache=False.
   Quill runs its default ``quill_sdpa`` backend; Llama runs sdpa with the block-diagonal mask transformers builds.
3. Model FLOP/s as a fraction of the matmul peak measured in this run, in the same precision.
4. On CUDA only: a ~124M model at seq 1024, MFU against the GPU's dense bf16 peak and the Llama ratio there.

Reference models run interleaved beside the compared pair, to show what bounds the ratios on the machine at hand:
both models on eager attention (dense rows; on CPU SDPA's flash kernel can lose to two bf16 matmuls and a softmax,
so the ratio of each model's faster backend is reported too), and Quill with its attention kernel replaced by a
no-op, whose throughput no attention kernel can beat (the "ceiling" for every ratio and for the FLOP/s fraction).

On CPU both models run with glibc's malloc keeping freed memory for the next step, as Quill's training stages do
(``quill/allocator.py``); ``--system-malloc`` measures the stock allocator instead, under which every step
page-faults its large tensors back in and Llama (fp32 logits) loses far more than Quill.

CPU time is shared and noisy, so every number that is compared is measured interleaved: after warm-up the two
models alternate repetitions (A B, B A, A B, ...) and the reported step time is the median of the repetitions.

Model FLOPs per token (PaLM appendix B / nanochat convention), forward + backward:
    6 * N + 12 * L * H * Q * T
N counts the weights that take part in matmuls (every Linear in the blocks plus the LM head, embedding lookup
excluded; a tied head is counted once), L layers, H heads, Q head dim, T the attended context: the row length for
dense rows (the causal half is not subtracted, as in PaLM) and sum(len_i^2) / row_len for packed rows (each
document counted as its own sequence: the work that is actually needed). The same formula is used for both models,
so the FLOP/s ratio equals the throughput ratio.

The last line printed is a JSON object (also written to ``<out>/model_throughput.json``, with a bar chart next to
it as ``model_throughput.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quill.model import QuillConfig, QuillForCausalLM  # noqa: E402
from quill.allocator import keep_freed_memory  # noqa: E402

TARGETS = {"dense_ratio": 1.2, "packed_ratio": 2.0, "matmul_peak_fraction": 0.5}

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets. Matched by substring.
GPU_BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # HBM3 parts report as "NVIDIA H100 80GB HBM3" (SXM)
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int
    seq: int
    batch: int
    vocab: int = 8192
    kv_heads: int | None = None

    @property
    def intermediate(self) -> int:  # Quill's default rule (SwiGLU ~ 8/3 * width, multiple of 64), given to both
        return int(-(-8 * self.hidden / 3 // 64) * 64)


SMALL = Size("d256-L4", hidden=256, layers=4, heads=4, seq=256, batch=8)
LARGE = Size("d512-L8", hidden=512, layers=8, heads=8, seq=512, batch=4)
# Packed: the small model, rows of TRL's default SFT max_length (1024), same tokens per step as SMALL.
PACKED = Size("d256-L4-packed", hidden=256, layers=4, heads=4, seq=1024, batch=2)
DOCS_PER_ROW = 8
GPU_124M = Size("124M", hidden=768, layers=12, heads=12, seq=1024, batch=8, vocab=50304)


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_supports_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX); without them bf16 is emulated and slower than fp32."""
    flags = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    has_isa = bool(flags & {"avx512_bf16", "amx_bf16"})
    return has_isa and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_device_and_dtype(force_cpu: bool) -> tuple[str, torch.dtype | None]:
    """(device, autocast dtype or None for plain fp32)."""
    if torch.cuda.is_available() and not force_cpu:
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: str, dtype: torch.dtype | None):
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# Matmul peak
# ----------------------------------------------------------------------------------------------------------------


def matmul_operands(device: str, dtype: torch.dtype | None, n: int, how: str):
    a = torch.randn(n, n, device=device, dtype=(dtype or torch.float32) if how == "tensor" else torch.float32)
    return a, a.clone(), (lambda: autocast(device, dtype)) if how == "autocast" else contextlib.nullcontext


def time_matmul(a, b, ctx, device: str, seconds: float) -> float:
    """FLOP/s of back-to-back a @ b for about `seconds`."""
    n = a.shape[0]
    with ctx():
        a @ b  # warm-up (and oneDNN primitive creation)
        sync(device)
        iters, start = 0, time.perf_counter()
        while iters < 3 or time.perf_counter() - start < seconds:
            a @ b
            iters += 1
            if device == "cuda" and iters % 10 == 0:
                sync(device)
        sync(device)
        return 2 * n**3 * iters / (time.perf_counter() - start)


def matmul_peak(device: str, dtype: torch.dtype | None, sizes: list[int], repeats: int) -> dict:
    """Best FLOP/s of square matmuls in the training precision (bf16 tensors, and fp32 under autocast; best wins)."""
    best = {"flops": 0.0, "size": None, "how": None}
    for n in sizes:
        for how in ("tensor", "autocast") if dtype is not None else ("tensor",):
            a, b, ctx = matmul_operands(device, dtype, n, how)
            for _ in range(repeats):
                flops = time_matmul(a, b, ctx, device, seconds=0.2)
                if flops > best["flops"]:
                    best = {"flops": flops, "size": n, "how": how}
    return best


# ----------------------------------------------------------------------------------------------------------------
# Models and batches
# ----------------------------------------------------------------------------------------------------------------


# References measured beside the two models, to show what bounds the ratios on this machine:
# - "llama_eager", "quill_eager": both models on eager attention (dense rows only). On CPUs SDPA's flash kernel can
#   be slower than two bf16 matmuls and a softmax, so sdpa is not always a model's best; the best of each model's two
#   backends gives the like-for-like ratio.
# - "quill_no_attention": Quill with attention replaced by a near no-op (below). No attention kernel can beat it, so
#   its throughput is the ceiling for Quill's ratio and FLOP/s at that size.
REFERENCES = ("quill_eager", "llama_eager", "quill_no_attention")
NO_ATTENTION = "bench_no_attention"


def no_attention(module, query, key, value, attention_mask, **kwargs):
    """Returns V, with Q and K kept in the graph (added times zero) so their projections, QK-norm and RoPE still run
    forward and backward: everything of a training step except the attention kernel itself."""
    repeat = query.shape[1] // value.shape[1]
    value = value.repeat_interleave(repeat, dim=1) if repeat > 1 else value
    key = key.repeat_interleave(repeat, dim=1) if repeat > 1 else key
    return torch.add(value, query + key, alpha=0.0).transpose(1, 2), None


AttentionInterface.register(NO_ATTENTION, no_attention)
AttentionMaskInterface.register(NO_ATTENTION, lambda *args, **kwargs: None)


def build_models(size: Size, device: str, references: tuple[str, ...] = ()) -> dict[str, torch.nn.Module]:
    """Quill (default backend) and Llama (sdpa), plus any of the reference models named above."""
    common = dict(
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads or size.heads,
        vocab_size=size.vocab,
        max_position_embeddings=max(2048, size.seq),
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )

    def quill(attn: str | None = None) -> torch.nn.Module:  # default backend quill_sdpa, QK-norm on (the default)
        torch.manual_seed(0)
        model = QuillForCausalLM(QuillConfig(**common))
        if attn:
            model.set_attn_implementation(attn)
        return model

    def llama(attn: str) -> torch.nn.Module:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False, mlp_bias=False))
        model.set_attn_implementation(attn)
        return model

    makers = {
        "quill": quill,
        "llama": lambda: llama("sdpa"),
        "llama_eager": lambda: llama("eager"),
        "quill_eager": lambda: quill("eager"),
        "quill_no_attention": lambda: quill(NO_ATTENTION),
    }
    models = {name: makers[name]() for name in ("quill", "llama", *references)}
    for name, model in models.items():
        linears = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        assert linears == matmul_params(size), (name, linears, matmul_params(size))
    return {name: model.to(device).train() for name, model in models.items()}


def matmul_params(size: Size) -> int:
    kv = size.kv_heads or size.heads
    head_dim = size.hidden // size.heads
    attn = size.hidden * (size.heads + 2 * kv) * head_dim + size.heads * head_dim * size.hidden
    mlp = 3 * size.hidden * size.intermediate
    return size.layers * (attn + mlp) + size.vocab * size.hidden


def dense_batch(size: Size, device: str) -> dict:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def document_lengths(row_len: int, docs: int, generator: torch.Generator, min_len: int = 16) -> list[int]:
    """`docs` lengths >= min_len summing to row_len, from random cut points (mixed short and long documents)."""
    free = row_len - docs * min_len
    cuts = sorted(torch.randint(0, free + 1, (docs - 1,), generator=generator).tolist())
    return [b - a + min_len for a, b in zip([0, *cuts], [*cuts, free])]


def packed_batch(size: Size, device: str) -> tuple[dict, list[list[int]]]:
    g = torch.Generator().manual_seed(4321)
    rows = [document_lengths(size.seq, DOCS_PER_ROW, g) for _ in range(size.batch)]
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])
    # No attention_mask and no cache: the only way transformers builds Llama's block-diagonal mask.
    batch = {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": ids.to(device), "use_cache": False}
    return batch, rows


def check_packed_isolation(models: dict, batch: dict, rows: list[list[int]]) -> dict[str, float]:
    """Both models really keep documents apart (fp32, no grad): the packed comparison is like for like."""
    lengths = rows[0]
    ids = batch["input_ids"][:1]
    out = {}
    for name, model in models.items():
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=batch["position_ids"][:1], use_cache=False).logits[0]
            start, worst = 0, 0.0
            for n in lengths[:3]:
                alone = model(input_ids=ids[:, start : start + n], use_cache=False).logits[0]
                worst = max(worst, (packed[start : start + n] - alone).abs().max().item())
                start += n
        out[name] = worst
        if worst > 1e-3:
            raise RuntimeError(f"{name}: packed documents leak into each other (max |delta logits| {worst:.3g})")
    return out


def flops_per_token(size: Size, context: float) -> float:
    head_dim = size.hidden // size.heads
    return 6 * matmul_params(size) + 12 * size.layers * size.heads * head_dim * context


# ----------------------------------------------------------------------------------------------------------------
# Interleaved timing
# ----------------------------------------------------------------------------------------------------------------


def make_step(model: torch.nn.Module, batch: dict, device: str, dtype: torch.dtype | None):
    # Fused AdamW: what the Trainer gives our stages by default (optim="adamw_torch_fused"). On the 2-core CPU it
    # is 3x faster than foreach (d512: 14 vs 42 ms per step), time both models would otherwise spend alike.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with autocast(device, dtype):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def interleaved(steps: dict, device: str, warmup: int, reps: int, steps_per_rep: int, probe=None) -> dict:
    """Seconds per step for each name: warm-up, then repetitions alternating the order (AB, BA, ...).

    `probe` (optional) is timed after every repetition pair: the matmul rate under the same load as the steps
    around it, so a busy neighbour lowers the model's FLOP/s and the reference together."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    sync(device)
    times = {name: [] for name in names}
    probes = []
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(steps_per_rep):
                steps[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) / steps_per_rep)
        if probe is not None:
            probes.append(probe())
    return {"times": times, "probe_flops": probes}


def run_comparison(label: str, size: Size, batch: dict, context: float, device: str, dtype, args, peak,
                   models: dict[str, torch.nn.Module]) -> dict:
    steps = {name: make_step(m, batch, device, dtype) for name, m in models.items()}
    a, b, ctx = matmul_operands(device, dtype, peak["size"], peak["how"])
    probe = lambda: time_matmul(a, b, ctx, device, seconds=0.1)  # noqa: E731
    measured = interleaved(steps, device, args.warmup, args.reps, args.steps_per_rep, probe)
    times, probes = measured["times"], measured["probe_flops"]
    tokens = batch["input_ids"].numel()
    result = {"label": label, "size": size.name, "tokens_per_step": tokens, "flops_per_token": flops_per_token(size, context)}
    for name, ts in times.items():
        median = statistics.median(ts)
        result[name] = {
            "step_s_median": median,
            "step_s_all": [round(t, 5) for t in ts],
            "tokens_per_s": tokens / median,
            "flops_per_s": tokens / median * result["flops_per_token"],
            # Against the matmul rate measured right after the same repetition (same neighbours, same load).
            "probe_fraction": statistics.median(
                tokens / t * result["flops_per_token"] / f for t, f in zip(ts, probes)
            ),
        }
    # Ratio of medians, and the spread of per-repetition ratios (rep i of A against rep i of B) as a noise gauge.
    result["ratio"] = result["quill"]["tokens_per_s"] / result["llama"]["tokens_per_s"]
    pair_ratios = sorted(b / a for a, b in zip(times["quill"], times["llama"]))
    result["ratio_paired_median"] = statistics.median(pair_ratios)
    result["ratio_min_max"] = [pair_ratios[0], pair_ratios[-1]]
    result["probe_gflops"] = [round(f / 1e9) for f in probes]
    if "llama_eager" in times and "quill_eager" in times:  # each model on its faster backend
        fastest = {m: max(result[m]["tokens_per_s"], result[f"{m}_eager"]["tokens_per_s"]) for m in ("quill", "llama")}
        result["ratio_best_backends"] = fastest["quill"] / fastest["llama"]
    if "quill_no_attention" in times:  # the most any attention kernel could give Quill here
        result["ratio_ceiling"] = result["quill_no_attention"]["tokens_per_s"] / result["llama"]["tokens_per_s"]
    del models, steps
    return result


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "FAIL"


def save_chart(summary: dict, path: Path) -> bool:
    """Bar chart from the summary alone (so a saved JSON can be re-plotted): every model's throughput relative to
    Llama (sdpa) per run, and the headline numbers against their targets and ceilings."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    runs = summary["runs"]
    bars = [  # (model, legend, style): the two compared models, then the references where a run has them
        ("quill", "Quill", {"color": "tab:blue"}),
        ("llama", "Llama (sdpa)", {"color": "tab:orange"}),
        ("quill_eager", "Quill (eager)", {"color": "white", "edgecolor": "tab:blue", "hatch": "//"}),
        ("llama_eager", "Llama (eager)", {"color": "white", "edgecolor": "tab:orange", "hatch": "//"}),
        ("quill_no_attention", "Quill, attention removed (ceiling)",
         {"color": "white", "edgecolor": "tab:blue", "hatch": ".."}),
    ]
    width = 0.8 / len(bars)
    for k, (name, legend, style) in enumerate(bars):
        key = f"{name}_tokens_per_s"
        xs = [i for i, run in enumerate(runs.values()) if key in run]
        ys = [run[key] / run["llama_tokens_per_s"] for run in runs.values() if key in run]
        offset = (k - (len(bars) - 1) / 2) * width
        ax1.bar([i + offset for i in xs], ys, width, label=legend, **style)
        for x, y in zip(xs, ys):
            ax1.text(x + offset, y + 0.02, f"{y:.2f}", ha="center", fontsize=6)
    ax1.axhline(1.0, color="gray", linewidth=0.8)
    ax1.set_ylim(0, max(r["quill_no_attention_tokens_per_s"] / r["llama_tokens_per_s"] for r in runs.values()) * 1.3)
    ax1.set_xticks(range(len(runs)), list(runs), fontsize=8)
    ax1.set_ylabel("training tokens/s relative to Llama (sdpa)")
    ax1.set_title(f"{summary['device_name']} - {summary['dtype']} - {summary['allocator']}", fontsize=7)
    ax1.legend(fontsize=7, ncol=3, loc="upper center")
    names = ["dense_ratio", "packed_ratio", "matmul_peak_fraction"]
    values = [summary[n] for n in names]
    targets = [TARGETS[n] for n in names]
    colors = ["tab:green" if v >= t else "tab:red" for v, t in zip(values, targets)]
    ax2.bar(range(3), values, color=colors)
    ax2.scatter(range(3), targets, marker="_", s=900, color="black", label="target", zorder=3)
    ceilings = [summary[f"{n}_ceiling"] for n in names]
    ax2.scatter(range(3), ceilings, marker="v", color="dimgray", label="ceiling (attention removed)", zorder=3)
    ax2.set_xticks(range(3), ["dense\nratio", "packed\nratio", "matmul peak\nfraction"], fontsize=8)
    ax2.set_ylim(0, max(values + targets + ceilings) * 1.35)
    ax2.legend(fontsize=7, loc="upper center")
    fig.suptitle(f"Quill vs Llama training throughput ({summary['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def print_table(results: list[dict], peak: dict) -> None:
    header = f"{'run':<22}{'tok/step':>9}{'Quill tok/s':>13}{'Llama tok/s':>13}{'ratio':>7}{'paired med (min-max)':>23}"
    header += f"{'Quill %peak':>13}{'Llama %peak':>13}{'Quill %probe':>14}"
    print(header)
    print("-" * len(header))
    for r in results:
        lo, hi = r["ratio_min_max"]
        paired = f"{r['ratio_paired_median']:.2f} ({lo:.2f}-{hi:.2f})"
        print(
            f"{r['label']:<22}{r['tokens_per_step']:>9}{r['quill']['tokens_per_s']:>13,.0f}"
            f"{r['llama']['tokens_per_s']:>13,.0f}{r['ratio']:>7.2f}{paired:>23}"
            f"{100 * r['quill']['flops_per_s'] / peak['flops']:>12.1f}%"
            f"{100 * r['llama']['flops_per_s'] / peak['flops']:>12.1f}%{100 * r['quill']['probe_fraction']:>13.1f}%"
        )
    print(f"\n{'references':<22}{'Quill eager tok/s':>19}{'Llama eager tok/s':>19}{'best/best':>11}"
          f"{'ceiling tok/s':>15}{'ceiling ratio':>15}{'ceiling %peak':>15}")
    for r in results:
        eager = [f"{r[n]['tokens_per_s']:,.0f}" if n in r else "-" for n in ("quill_eager", "llama_eager")]
        best = f"{r['ratio_best_backends']:.2f}" if "ratio_best_backends" in r else "-"
        ceiling = r["quill_no_attention"]
        print(
            f"{r['label']:<22}{eager[0]:>19}{eager[1]:>19}{best:>11}{ceiling['tokens_per_s']:>15,.0f}"
            f"{r['ratio_ceiling']:>15.2f}{100 * ceiling['flops_per_s'] / peak['flops']:>14.1f}%"
        )
    print("ceiling: Quill with attention replaced by a no-op (everything else of the step still runs); "
          "ratios against Llama sdpa")
    print(
        f"matmul peak: {peak['flops'] / 1e9:,.0f} GFLOP/s (best of {peak['size']}x{peak['size']} {peak['how']} "
        "matmuls at start and end); %probe: against the same matmul timed right after each repetition"
    )


def gpu_section(args) -> dict:
    """CUDA only: the ~124M model at seq 1024, MFU against the data-sheet dense bf16 peak, and the Llama ratio."""
    name = torch.cuda.get_device_name()
    datasheet = next((v for k, v in GPU_BF16_PEAK_TFLOPS.items() if k in name), None)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    size = GPU_124M
    measured = matmul_peak("cuda", dtype, [4096, 8192], repeats=3)
    models = build_models(size, "cuda")
    batch = dense_batch(size, "cuda")
    r = run_comparison("gpu 124M seq1024", size, batch, size.seq, "cuda", dtype, args, measured, models)
    out = {
        "gpu": name,
        "gpu_bf16_peak_tflops_datasheet": datasheet,
        "gpu_matmul_peak_tflops_measured": measured["flops"] / 1e12,
        "gpu_quill_tokens_per_s": r["quill"]["tokens_per_s"],
        "gpu_llama_tokens_per_s": r["llama"]["tokens_per_s"],
        "gpu_ratio": r["ratio"],
        "gpu_quill_mfu": r["quill"]["flops_per_s"] / (datasheet * 1e12) if datasheet else None,
        "gpu_llama_mfu": r["llama"]["flops_per_s"] / (datasheet * 1e12) if datasheet else None,
        "gpu_quill_fraction_of_measured_matmul_peak": r["quill"]["flops_per_s"] / measured["flops"],
    }
    print(f"\n== GPU: {name}, 124M (depth 12, vocab 50304), seq 1024, batch {size.batch}, {dtype} autocast ==")
    print(f"Quill {out['gpu_quill_tokens_per_s']:,.0f} tok/s, Llama {out['gpu_llama_tokens_per_s']:,.0f} tok/s, "
          f"ratio {r['ratio']:.2f}; measured matmul peak {out['gpu_matmul_peak_tflops_measured']:.0f} TFLOP/s")
    if datasheet:
        print(f"MFU vs {datasheet:.0f} TFLOP/s data-sheet bf16 peak: Quill {100 * out['gpu_quill_mfu']:.1f}%, "
              f"Llama {100 * out['gpu_llama_mfu']:.1f}%")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, small dense size only (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per comparison")
    parser.add_argument("--system-malloc", action="store_true",
                        help="on CPU, leave glibc's malloc as it is instead of keeping freed memory for reuse the way "
                        "Quill's training stages do (quill/allocator.py); both models get the same either way")
    args = parser.parse_args()
    # One step per repetition: alternating at the finest grain is what best cancels a neighbour's bursts.
    args.warmup, args.reps, args.steps_per_rep = (2, args.reps or 4, 1) if args.quick else (3, args.reps or 15, 1)
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = pick_device_and_dtype(args.cpu)
    # The best setting for both models: without it every step page-faults its large tensors back in (~10 ms per
    # 32 MB here), which costs Llama, with its fp32 (tokens, vocab) logits, far more than Quill.
    allocator = "system malloc"
    if device == "cpu" and not args.system_malloc and keep_freed_memory():
        allocator = "glibc malloc keeping freed memory (quill/allocator.py)"
    dtype_name = f"{str(dtype).removeprefix('torch.')} autocast" if dtype else "float32"
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()} ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; precision: {dtype_name}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"allocator: {allocator}")
    print(f"interleaved: warm-up {args.warmup}, {args.reps} repetitions x {args.steps_per_rep} step per model, medians\n")

    # 1024-2048 is where this CPU peaks; a 4096 fp32 operand pair (128 MiB) left the 2-core box slow for the model
    # steps that followed (measured: 0.28 s -> ~2 s per step), so larger sizes are not tried.
    peak_sizes = [1024, 2048]
    peak = matmul_peak(device, dtype, peak_sizes, repeats=2 if args.quick else 3)

    results = []
    sizes = [SMALL] if args.quick else [SMALL, LARGE]
    for size in sizes:
        label = f"dense {size.name} s{size.seq}"
        models = build_models(size, device, references=REFERENCES)
        batch = dense_batch(size, device)
        results.append(run_comparison(label, size, batch, size.seq, device, dtype, args, peak, models))
        print(f"  {label}: ratio {results[-1]['ratio']:.2f}", flush=True)

    # Llama's packed baseline is sdpa by definition (transformers' packed-mask path); only the ceiling is added.
    models = build_models(PACKED, device, references=("quill_no_attention",))
    batch, rows = packed_batch(PACKED, device)
    isolation = check_packed_isolation(models, batch, rows)
    context = sum(n * n for lengths in rows for n in lengths) / (PACKED.seq * PACKED.batch)
    label = f"packed {PACKED.name.removesuffix('-packed')} s{PACKED.seq}"
    results.append(run_comparison(label, PACKED, batch, context, device, dtype, args, peak, models))
    print(f"  {label}: ratio {results[-1]['ratio']:.2f}\n", flush=True)

    # Peak again at the end (best of both): a quiet moment anywhere in the run sets the bar.
    end_peak = matmul_peak(device, dtype, peak_sizes, repeats=2 if args.quick else 3)
    peak = max(peak, end_peak, key=lambda p: p["flops"])
    print_table(results, peak)

    dense = [r for r in results if r["label"].startswith("dense")]
    packed = next(r for r in results if r["label"].startswith("packed"))
    # Headline numbers are the worst case over the dense sizes: a target has to hold at every size.
    summary = {
        "dense_ratio": min(r["ratio"] for r in dense),
        "packed_ratio": packed["ratio"],
        "matmul_peak_fraction": min(r["quill"]["flops_per_s"] for r in dense) / peak["flops"],
    }
    # What bounds them on this machine: the ratio with each model on its faster backend, and with Quill's
    # attention removed (no attention kernel, however fast, gets past these).
    bounds = {
        "dense_ratio_best_backends": min(r["ratio_best_backends"] for r in dense),
        "dense_ratio_ceiling": min(r["ratio_ceiling"] for r in dense),
        "packed_ratio_ceiling": packed["ratio_ceiling"],
        "matmul_peak_fraction_ceiling": min(r["quill_no_attention"]["flops_per_s"] for r in dense) / peak["flops"],
    }
    print()
    for key, value in summary.items():
        print(f"{key:<22}{value:>7.3f}  target >= {TARGETS[key]:<4} {verdict(value, TARGETS[key])}"
              f"   (ceiling without attention: {bounds[key + '_ceiling']:.3f})")
    print(f"dense_ratio, each model on its faster backend (sdpa/eager): {bounds['dense_ratio_best_backends']:.3f}")

    summary.update(
        {
            **bounds,
            "targets": TARGETS,
            "pass": {k: summary[k] >= t for k, t in TARGETS.items()},
            "headline_rule": "ratio = ratio of median step times; dense_ratio and matmul_peak_fraction are the "
            "minimum over the dense sizes; peak = best matmul rate seen in the run",
            "matmul_peak_fraction_by_run": {r["label"]: r["quill"]["flops_per_s"] / peak["flops"] for r in results},
            "matmul_probe_fraction_by_run": {r["label"]: r["quill"]["probe_fraction"] for r in results},
            "matmul_peak_gflops": peak["flops"] / 1e9,
            "matmul_peak_how": f"{peak['size']}x{peak['size']} {peak['how']}",
            "flops_formula": "6*N + 12*L*H*Q*T per token; N = matmul weights incl. LM head; T = row length (dense) "
            "or sum(len^2)/row_len (packed)",
            "runs": {
                r["label"]: {
                    "quill_tokens_per_s": r["quill"]["tokens_per_s"],
                    "llama_tokens_per_s": r["llama"]["tokens_per_s"],
                    "ratio": r["ratio"],
                    "ratio_paired_median": r["ratio_paired_median"],
                    "ratio_min_max": r["ratio_min_max"],
                    "quill_step_s": r["quill"]["step_s_all"],
                    "llama_step_s": r["llama"]["step_s_all"],
                    **{f"{name}_tokens_per_s": r[name]["tokens_per_s"] for name in REFERENCES if name in r},
                    **{key: r[key] for key in ("ratio_best_backends", "ratio_ceiling") if key in r},
                    "probe_gflops": r["probe_gflops"],
                    "tokens_per_step": r["tokens_per_step"],
                    "flops_per_token": r["flops_per_token"],
                }
                for r in results
            },
            "packed_doc_lengths": rows,
            "packed_isolation_max_abs_logit_delta": isolation,
            "differences": "Quill: QK-norm (default, on), fused qkv/gate_up, quill_sdpa backend, fused LM head + "
            "loss, hand-written RoPE/RMSNorm/SwiGLU backwards; Llama: sdpa, transformers' ForCausalLMLoss. Same sizes, "
            "tied embeddings, no biases, kv heads = heads.",
            "quick": args.quick,
            "device": device,
            "device_name": device_name,
            "threads": torch.get_num_threads(),
            "dtype": dtype_name,
            "allocator": allocator,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    if device == "cuda":
        summary.update(gpu_section(args))

    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "model_throughput.json"
    png_path = args.out / "model_throughput.png"
    if save_chart(summary, png_path):
        summary["chart"] = str(png_path)
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {json_path}" + (f" and {png_path}" if "chart" in summary else ""))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
