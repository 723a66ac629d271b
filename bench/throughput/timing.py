"""Timing: the matmul peak, one training step, interleaved repetitions, and the statistics of ratios.

CPU time is shared and noisy, so every number that is compared is measured interleaved: after warm-up the models
alternate repetitions (A B C, C B A, A B C, ...) and a model's step time is the median of its repetitions. Ratios
come with a spread from the per-repetition ratios (repetition i of A against repetition i of B, measured next to
each other): a distribution-free interval for their median, and their min/max.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable

import torch

from .machine import autocast, sync

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


def matmul_peak(device: str, dtype: torch.dtype | None, sizes: list[int], repeats: int, seconds: float) -> dict:
    """Best FLOP/s of square matmuls in the training precision (bf16 tensors, and fp32 under autocast; best wins)."""
    best = {"flops": 0.0, "size": None, "how": None}
    for n in sizes:
        for how in ("tensor", "autocast") if dtype is not None else ("tensor",):
            a, b, ctx = matmul_operands(device, dtype, n, how)
            for _ in range(repeats):
                flops = time_matmul(a, b, ctx, device, seconds=seconds)
                if flops > best["flops"]:
                    best = {"flops": flops, "size": n, "how": how}
    return best


def matmul_probe(device: str, dtype: torch.dtype | None, peak: dict, seconds: float) -> Callable[[], float]:
    """The peak's matmul, timed briefly: the rate under the load of the moment (timed after each repetition)."""
    a, b, ctx = matmul_operands(device, dtype, peak["size"], peak["how"])
    return lambda: time_matmul(a, b, ctx, device, seconds=seconds)


# ----------------------------------------------------------------------------------------------------------------
# Training steps, interleaved
# ----------------------------------------------------------------------------------------------------------------


def make_step(
    model: torch.nn.Module,
    batch: dict,
    device: str,
    dtype: torch.dtype | None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Callable[[], None]:
    """One training step: forward with the loss, backward, optimizer step. `context` is entered around the whole
    step (the benchmark swaps Quill's kernels for their references that way, only while that model runs)."""
    # Fused AdamW: what the Trainer gives our stages by default (optim="adamw_torch_fused"); both models alike.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with context():
            with autocast(device, dtype):
                loss = model(**batch).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def interleaved(
    steps: dict[str, Callable[[], None]], device: str, warmup: int, reps: int, probe: Callable[[], float] | None = None
) -> dict:
    """Seconds per step for each name: warm-up, then one step per model per repetition, the order reversed every
    other repetition (ABC, CBA, ...): alternating at the finest grain is what best cancels a neighbour's bursts.

    `probe` (optional) is timed after every repetition: the matmul rate under the same load as the steps around
    it, so a busy neighbour lowers the model's FLOP/s and the reference together."""
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
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
        if probe is not None:
            probes.append(probe())
    return {"times": times, "probe_flops": probes}


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free interval for the median: (low, high, its actual coverage).

    The k-th smallest and k-th largest values bracket the median with probability 1 - 2 * P(Binomial(n, 1/2) < k);
    k is the largest rank that keeps that at or above `confidence`. With too few values for that (n < 6 at 95%)
    the interval is the min/max and the coverage says how little it is worth."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return math.nan, math.nan, 0.0

    def coverage(k: int) -> float:  # P(x_(k) <= median <= x_(n-k+1))
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


def ratio_of(times_a: list[float], times_b: list[float]) -> dict:
    """How much faster A is than B: median time of B over median time of A, with the spread of the per-repetition
    ratios b_i / a_i (each pair measured next to each other)."""
    pairs = [b / a for a, b in zip(times_a, times_b)]
    low, high, coverage = median_interval(pairs)
    return {
        "ratio": statistics.median(times_b) / statistics.median(times_a),
        "paired_median": statistics.median(pairs),
        "interval": [low, high],
        "interval_coverage": coverage,
        "min_max": [min(pairs), max(pairs)],
    }


def relative_spread(times: list[float]) -> float:
    """Interquartile range over the median of one model's step times: how noisy its repetitions were."""
    if len(times) < 4:
        return (max(times) - min(times)) / statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)
