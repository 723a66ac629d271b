"""Training throughput of Quill against transformers' LlamaForCausalLM of the same dimensions, and what Quill's own
kernels earn.

    python bench/model_throughput.py [--quick] [--only dense,kernels,...] [--system-malloc] [--out bench/results]

Sections (``--only`` picks some; all run by default; bench/README.md describes each and the last full run):

- dense:      full training steps (forward, loss, backward, fused AdamW) of Quill and Llama at two sizes, with
              references: both on eager attention, and Quill without attention (the ceiling of every ratio).
- packed:     rows of 1024 tokens holding 8 documents (restarting position_ids, no attention_mask): Quill's
              ``sdpa`` (per document) against Llama on sdpa with the block-diagonal mask transformers builds.
- kernels:    stock Quill against Quill with each hand-written kernel (RMSNorm, SwiGLU, fused LM-head loss)
              replaced by its plain-autograd reference, one at a time and all at once, at the dense sizes.
- memory:     peak memory of the same variants (and Llama), a fresh subprocess per measurement.
- packed4096: rows of 4096 tokens holding 32 documents, the same pair as `packed`, against a 3x target.
- compile:    torch.compile of Quill, of Quill with the reference kernels, and of Llama, next to the eager models.
- gpu:        CUDA only: a ~124M model at seq 1024 and its MFU against the GPU's data-sheet bf16 peak.

Every compared number is measured interleaved in the same run (``throughput/timing.py``): after warm-up the models
alternate repetitions (ABC, CBA, ...) and a step time is the median of the repetitions. Model FLOP/s count
6 * N + 12 * L * H * Q * T per token (``throughput/workloads.py``), against a matmul peak measured in the same run.

On CPU both models run with glibc's malloc keeping freed memory for the next step, as Quill's training stages do
(``pipelines/allocator.py``); ``--system-malloc`` measures the stock allocator instead.

The last line printed is the summary as JSON (also written to ``<out>/model_throughput.json``, with a chart next
to it as ``model_throughput.png``); ``--replot <json>`` prints and plots a saved summary again without measuring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from throughput import machine, sections  # noqa: E402
from throughput.chart import save_chart  # noqa: E402
from throughput.summary import summarize  # noqa: E402
from throughput.tables import print_report  # noqa: E402

from quill.allocator import keep_freed_memory  # noqa: E402

SECTIONS = ("dense", "packed", "kernels", "memory", "packed4096", "compile", "gpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of every selected section: tiny models, 1 warm-up step, 3 repetitions "
        "(unless --reps); its numbers mean nothing",
    )
    parser.add_argument(
        "--only",
        type=lambda v: [s.strip() for s in v.split(",") if s.strip()],
        default=None,
        help=f"comma-separated sections to run (default: all): {','.join(SECTIONS)}",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per comparison")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="on CPU, leave glibc's malloc as it is instead of keeping freed memory for reuse the way "
        "Quill's training stages do (pipelines/allocator.py); both models get the same either way",
    )
    parser.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="JSON",
        help="print and plot a saved summary again (next to it), without measuring anything",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args


def settle_environment(args: argparse.Namespace) -> tuple[sections.Settings, dict]:
    """Threads, allocator, device and precision for the run; (settings, the environment part of the summary)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = machine.pick_device_and_dtype(args.cpu)
    # The best setting for both models: without it every step page-faults its large tensors back in, which costs
    # Llama, with its fp32 (tokens, vocab) logits, far more than Quill.
    keeps_freed = device == "cpu" and not args.system_malloc and keep_freed_memory()
    warmup, reps = (1, args.reps or 3) if args.quick else (2, args.reps or 15)
    settings = sections.Settings(
        device=device, dtype=dtype, warmup=warmup, reps=reps, quick=args.quick, threads=torch.get_num_threads()
    )
    environment = {
        "sections": [s for s in SECTIONS if s in (args.only or SECTIONS)],
        "quick": args.quick,
        "device": device,
        "device_name": machine.device_name(device),
        "cpu": machine.cpu_name(),
        "cpu_native_bf16": machine.cpu_supports_bf16(),
        "threads": torch.get_num_threads(),
        "dtype": machine.dtype_name(dtype),
        "allocator": "glibc malloc keeping freed memory (pipelines/allocator.py)" if keeps_freed else "system malloc",
        "warmup": warmup,
        "reps": reps,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return settings, environment


def measure(selected: list[str], settings: sections.Settings) -> dict:
    """Runs the selected sections; returns section name -> its measurements (and the matmul peaks)."""
    measured: dict = {}
    needs_peak = {"dense", "packed", "packed4096", "gpu"} & set(selected)
    if needs_peak:
        measured["matmul_peak"] = [sections.measure_matmul_peak(settings)]
    steps = {
        "dense": lambda: sections.measure_dense(settings, measured["matmul_peak"][0]),
        "packed": lambda: sections.measure_packed(settings, measured["matmul_peak"][0]),
        "kernels": lambda: sections.measure_kernels(settings),
        "memory": lambda: sections.measure_memory(settings),
        "packed4096": lambda: sections.measure_packed4096(settings, measured["matmul_peak"][0]),
        "compile": lambda: sections.measure_compile(settings),
        "gpu": lambda: sections.measure_gpu(settings, measured["matmul_peak"][0]),
    }
    for name in selected:
        if name == "gpu" and settings.device != "cuda":
            print("  gpu: skipped (no CUDA device in use)", flush=True)
            continue
        start = time.perf_counter()
        measured[name] = steps[name]()
        print(f"  {name}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    if needs_peak:  # again at the end: a quiet moment anywhere in the run sets the bar
        measured["matmul_peak"].append(sections.measure_matmul_peak(settings))
    return measured


def write_outputs(summary: dict, out: Path, chart: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "model_throughput.json", out / "model_throughput.png"
    if chart and save_chart(summary, png_path):
        summary["chart"] = png_path.name
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {json_path}" + (f" and {png_path}" if "chart" in summary else ""))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        summary = json.loads(args.replot.read_text())
        print_report(summary)
        if not args.no_chart and save_chart(summary, args.replot.with_suffix(".png")):
            print(f"\nwrote {args.replot.with_suffix('.png')}")
        return
    settings, environment = settle_environment(args)
    print(
        f"{environment['device_name']}, {environment['dtype']}: measuring {', '.join(environment['sections'])}",
        flush=True,
    )
    before, load_start = machine.cpu_snapshot(), machine.load_average()
    measured = measure(environment["sections"], settings)
    environment.update(
        other_processes_cpu_share=machine.other_processes_share(before, machine.cpu_snapshot()),
        load_average_start=load_start,
        load_average_end=machine.load_average(),
    )
    summary = summarize(measured, environment)
    print()
    print_report(summary)
    write_outputs(summary, args.out, chart=not args.no_chart)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
