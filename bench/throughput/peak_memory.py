"""Peak memory of training steps for each Quill kernel variant (and Llama), one fresh subprocess per measurement.

On CPU the measure is the process's peak resident set (``VmHWM`` in /proc/self/status), reset
(/proc/self/clear_refs) once the model, its batch and the imported libraries are in memory: the peak during the
training steps and its growth over the resident set just before them. The growth holds the optimizer state and
gradients (alike for every variant) and the step's activations, logits and temporaries (where the variants differ).

The subprocess makes glibc's malloc map every block of 64 KiB or more on its own and unmap it when freed, so the
resident set follows the live tensors and the peak is that of the tensors themselves, the same to a fraction of a
MiB in every repeat. Under the allocator the timed runs use (freed memory kept for reuse, ``pipelines/allocator.py``)
the peak also holds whatever the heap's fragmentation adds, which varies from process to process by tens of MiB:
noise that would hide the differences measured here. (``getrusage``'s max RSS would not do either: a child started
from a big parent inherits the parent's peak.) On CUDA the measure is ``torch.cuda.max_memory_allocated``.

    python -m throughput.peak_memory '<json spec>'   (run by ``measure_peak_memory``, with bench/ on sys.path)
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .timing import make_step
from .workloads import Size, batch_for, build_models, step_context

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = BENCH_DIR.parent


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def map_large_blocks_alone() -> bool:
    """glibc: blocks of 64 KiB or more get their own mapping, returned when freed (a fixed threshold: glibc's
    default raises it as blocks are freed, and then serves them from the heap). False where that is not possible."""
    M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, 64 * 1024) == 1


def reset_peak(device: str) -> float:
    """Restart peak tracking from now; returns the memory in use now (MiB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return status_mb("VmRSS")


def peak_mb(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return status_mb("VmHWM")


def measure_one(spec: dict) -> dict:
    """Runs in the subprocess: build one model, then a few training steps; the peak before and after them."""
    tracks_tensors = spec["device"] == "cpu" and map_large_blocks_alone()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    name, device = spec["name"], spec["device"]
    dtype = getattr(torch, spec["dtype"]) if spec["dtype"] else None
    size = Size(**spec["size"])
    model = build_models((name,), size, device)[name]
    batch, _ = batch_for(size, device)
    step = make_step(model, batch, device, dtype, step_context(name))
    before = reset_peak(device)
    for _ in range(spec["steps"]):
        step()
    return {"before_steps_mb": before, "peak_mb": peak_mb(device), "large_blocks_mapped_alone": tracks_tensors}


def run_subprocess(spec: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "throughput.peak_memory", json.dumps(spec)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_peak_memory(
    sizes, names: tuple[str, ...], device: str, dtype: torch.dtype | None, threads: int, repeats: int, steps: int
) -> list[dict]:
    """For each size, each named model measured `repeats` times (names alternating), each time in a new process."""
    results = []
    for size in sizes:
        per_model = {name: [] for name in names}
        for _ in range(repeats):
            for name in names:
                spec = {
                    "name": name,
                    "size": dataclasses.asdict(size),
                    "device": device,
                    "dtype": str(dtype).removeprefix("torch.") if dtype else None,
                    "threads": threads,
                    "steps": steps,
                }
                per_model[name].append(run_subprocess(spec))
        measure = "cuda max_memory_allocated" if device == "cuda" else "peak RSS (VmHWM), blocks unmapped when freed"
        results.append(
            {
                "label": f"memory {size.name} s{size.seq}",
                "size": dataclasses.asdict(size),
                "steps": steps,
                "measure": measure,
                "runs": per_model,
            }
        )
    return results


if __name__ == "__main__":
    print(json.dumps(measure_one(json.loads(sys.argv[1]))))
