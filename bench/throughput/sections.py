"""One measuring function per benchmark section. Each returns plain, JSON-ready data (step times, compile times,
errors); ``summary.summarize`` turns them into ratios and verdicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .machine import cpu_snapshot, other_processes_share, sync
from .peak_memory import measure_peak_memory
from .timing import interleaved, make_step, matmul_peak, matmul_probe
from .workloads import (
    DENSE_SIZES,
    GPU_124M,
    PACKED,
    PACKED_4096,
    PLAIN_ALL,
    PLAIN_VARIANTS,
    SMALL,
    TINY,
    TINY_PACKED,
    TINY_PACKED_LONG,
    Size,
    attended_context,
    batch_for,
    build_models,
    flops_per_token,
    packed_isolation,
    step_context,
)

# The compared pair and, on dense rows, the references that show what bounds their ratio: both models on eager
# attention (on CPU, SDPA's flash kernel can lose to two matmuls and a softmax, so the best of each model's two
# backends gives the like-for-like ratio) and Quill without attention (the ceiling).
DENSE_MODELS = ("quill", "llama", "quill_eager", "llama_eager", "quill_no_attention")
# Llama's packed baseline is sdpa by definition (transformers' block-diagonal mask path); only the ceiling is added.
PACKED_MODELS = ("quill", "llama", "quill_no_attention")
KERNEL_MODELS = ("quill", *PLAIN_VARIANTS)
COMPILE_MODELS = ("quill", "llama", "quill_compiled", f"{PLAIN_ALL}_compiled", "llama_compiled")


@dataclass(frozen=True)
class Settings:
    device: str
    dtype: torch.dtype | None
    warmup: int
    reps: int
    quick: bool
    threads: int

    @property
    def dense_sizes(self) -> tuple[Size, ...]:
        return (TINY,) if self.quick else DENSE_SIZES

    @property
    def packed_size(self) -> Size:
        return TINY_PACKED if self.quick else PACKED

    @property
    def packed4096_size(self) -> Size:
        return TINY_PACKED_LONG if self.quick else PACKED_4096

    @property
    def compile_size(self) -> Size:
        # One size: every compiled model pays its compile time again at every size.
        return TINY if self.quick else SMALL


def measure_matmul_peak(settings: Settings) -> dict:
    """Best square-matmul FLOP/s in the training precision. 1024-2048 is where the 2-core CPU peaks; a 4096 fp32
    operand pair (128 MiB) left it slow for the model steps that followed, so larger sizes are not tried."""
    if settings.device == "cuda":
        return matmul_peak("cuda", settings.dtype, [4096, 8192], repeats=3, seconds=0.2)
    sizes, repeats, seconds = ([256, 512], 1, 0.05) if settings.quick else ([1024, 2048], 3, 0.2)
    return matmul_peak(settings.device, settings.dtype, sizes, repeats=repeats, seconds=seconds)


def label_of(kind: str, size: Size) -> str:
    return f"{kind} {size.name} s{size.seq}"


def time_models(kind: str, size: Size, names: tuple[str, ...], settings: Settings, peak: dict | None = None) -> dict:
    """Training steps of the named models on one batch, interleaved. With `peak`, the peak's matmul is also timed
    after every repetition (the rate under the load of that moment)."""
    models = build_models(names, size, settings.device)
    batch, rows = batch_for(size, settings.device)
    isolation = packed_isolation(models, batch, rows) if rows else None
    steps = {
        name: make_step(model, batch, settings.device, settings.dtype, step_context(name))
        for name, model in models.items()
    }
    probe = matmul_probe(settings.device, settings.dtype, peak, seconds=0.1) if peak else None
    before = cpu_snapshot()
    measured = interleaved(steps, settings.device, settings.warmup, settings.reps, probe)
    return {
        "kind": kind,
        "label": label_of(kind, size),
        "size": dataclasses.asdict(size),
        "tokens_per_step": size.tokens_per_step,
        "flops_per_token": flops_per_token(size, attended_context(size, rows)),
        "doc_lengths": rows,
        "isolation_max_abs_logit_delta": isolation,
        "step_s": measured["times"],
        "probe_flops": measured["probe_flops"],
        "other_processes_cpu_share": other_processes_share(before, cpu_snapshot()),
    }


def measure_dense(settings: Settings, peak: dict) -> list[dict]:
    """Quill vs Llama on dense rows at each size, with the eager and no-attention references."""
    return [time_models("dense", size, DENSE_MODELS, settings, peak) for size in settings.dense_sizes]


def measure_packed(settings: Settings, peak: dict) -> dict:
    """Packed rows of 1024 tokens (8 documents): Quill on sdpa (per document) vs Llama on sdpa with the block mask."""
    return time_models("packed", settings.packed_size, PACKED_MODELS, settings, peak)


def measure_packed4096(settings: Settings, peak: dict) -> dict:
    """Packed rows of 4096 tokens (32 documents), the same pair and ceiling."""
    return time_models("packed4096", settings.packed4096_size, PACKED_MODELS, settings, peak)


def measure_kernels(settings: Settings) -> list[dict]:
    """Stock Quill against Quill with each hand-written kernel replaced by its plain-autograd reference (one at a
    time, then all at once), interleaved, at each dense size."""
    return [time_models("kernels", size, KERNEL_MODELS, settings) for size in settings.dense_sizes]


def measure_memory(settings: Settings) -> list[dict]:
    """Peak memory of a few training steps of stock Quill, each kernel variant and Llama, at each dense size."""
    repeats, steps = (1, 2) if settings.quick else (2, 3)
    return measure_peak_memory(
        settings.dense_sizes,
        (*KERNEL_MODELS, "llama"),
        settings.device,
        settings.dtype,
        settings.threads,
        repeats,
        steps,
    )


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def fresh_inductor_cache() -> Iterator[None]:
    """Inductor compiles into an empty cache directory, removed afterwards: compile times must not depend on what
    an earlier run left on disk."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="bench_inductor_") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def measure_compile(settings: Settings) -> dict:
    """torch.compile (inductor, static shapes) of both models, and of Quill with every kernel replaced by its
    reference, interleaved with the eager models at one dense size. The first step of each compiled model compiles
    it (forward and backward) and is timed on its own; a model whose compilation fails is reported, not timed.
    Models compiled later in the process may reuse frames and kernels compiled for earlier ones (as they would in
    any process), so their first steps can be shorter; graph breaks are counted where a frame is first traced."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    size, device = settings.compile_size, settings.device
    torch._dynamo.reset()
    batch, _ = batch_for(size, device)
    steps, first_step_s, graph_breaks, errors = {}, {}, {}, {}
    with fresh_inductor_cache():
        for name in COMPILE_MODELS:
            base = name.removesuffix("_compiled")
            model = build_models((base,), size, device)[base]
            runnable = torch.compile(model, dynamic=False) if name.endswith("_compiled") else model
            step = make_step(runnable, batch, device, settings.dtype, step_context(name))
            counters.clear()
            start = time.perf_counter()
            try:
                step()
                sync(device)
            except Exception as error:  # noqa: BLE001 - any failure to compile is a result to report
                errors[name] = first_line(error)
                continue
            first_step_s[name] = time.perf_counter() - start
            graph_breaks[name] = {reason.splitlines()[0]: n for reason, n in counters["graph_break"].items()}
            steps[name] = step
        before = cpu_snapshot()
        measured = interleaved(steps, device, max(settings.warmup - 1, 0), settings.reps)
    return {
        "label": label_of("compile", size),
        "size": dataclasses.asdict(size),
        "tokens_per_step": size.tokens_per_step,
        "step_s": measured["times"],
        "first_step_s": first_step_s,
        "graph_breaks": graph_breaks,
        "errors": errors,
        "torch_compile": "torch.compile(model, dynamic=False), default inductor backend, fresh cache; optimizer step "
        "not compiled",
        "other_processes_cpu_share": other_processes_share(before, cpu_snapshot()),
    }


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


def measure_gpu(settings: Settings, peak: dict) -> dict:
    """CUDA only: the ~124M model at seq 1024 against Llama, for MFU against the GPU's data-sheet bf16 peak."""
    name = torch.cuda.get_device_name()
    run = time_models("gpu", GPU_124M, ("quill", "llama"), settings, peak)
    run["gpu"] = name
    run["gpu_bf16_peak_tflops_datasheet"] = next((v for k, v in GPU_BF16_PEAK_TFLOPS.items() if k in name), None)
    return run
