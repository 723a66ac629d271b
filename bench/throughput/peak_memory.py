"""Peak memory of training steps for each Quill kernel variant (and Llama), one fresh subprocess per measurement.

On CPU the measure is the process's peak resident set (``getrusage`` max RSS): what the operating system had to
give the training process, whichever allocator or library asked for it. Reported are the peak itself and its
increase over the resident set just before the first step, when the model, its batch and the imported libraries
are already in memory; the increase holds the optimizer state and gradients (alike for every variant) and the
step's activations, logits and temporaries (where the variants differ). Each subprocess sets the same allocator as
the timed runs. On CUDA the measure is ``torch.cuda.max_memory_allocated``.

    python -m throughput.peak_memory '<json spec>'   (run by ``measure_peak_memory``, with bench/ on sys.path)
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = BENCH_DIR.parent


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_one(spec: dict) -> dict:
    """Runs in the subprocess: build one model, then a few training steps; the peak before and after them."""
    from quill.allocator import keep_freed_memory

    from .timing import make_step
    from .workloads import Size, batch_for, build_models, step_context

    if spec["keep_freed_memory"]:
        keep_freed_memory()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    name, device = spec["name"], spec["device"]
    dtype = getattr(torch, spec["dtype"]) if spec["dtype"] else None
    size = Size(**spec["size"])
    model = build_models((name,), size, device)[name]
    batch, _ = batch_for(size, device)
    step = make_step(model, batch, device, dtype, step_context(name))
    before = peak_mb(device)
    for _ in range(spec["steps"]):
        step()
    return {"before_steps_mb": before, "peak_mb": peak_mb(device)}


def run_subprocess(spec: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "throughput.peak_memory", json.dumps(spec)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_peak_memory(sizes, names: tuple[str, ...], device: str, dtype: torch.dtype | None, threads: int,
                        keep_freed_memory: bool, repeats: int, steps: int) -> list[dict]:
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
                    "keep_freed_memory": keep_freed_memory,
                    "steps": steps,
                }
                per_model[name].append(run_subprocess(spec))
        results.append({"label": f"memory {size.name} s{size.seq}", "size": dataclasses.asdict(size),
                        "steps": steps, "measure": "cuda max_memory_allocated" if device == "cuda" else "max RSS",
                        "runs": per_model})
    return results


if __name__ == "__main__":
    print(json.dumps(measure_one(json.loads(sys.argv[1]))))
