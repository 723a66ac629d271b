"""Smoke test of bench/model_throughput.py: its quickest mode runs, exits 0 and writes the summary. No timings are
asserted (they are what the benchmark is for, and meaningless at this size)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "model_throughput.py"


def test_quick_benchmark_writes_its_summary(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--reps",
            "1",
            "--threads",
            "1",
            "--only",
            "dense,kernels",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "model_throughput.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == summary  # the last line printed is the summary
    assert summary["sections"] == ["dense", "kernels"] and summary["quick"]
    for key in (
        "dense_ratio",
        "matmul_peak_fraction",
        "dense_ratio_ceiling",
        "targets",
        "pass",
        "runs",
        "kernels",
        "kernel_verdicts",
        "kernel_rule",
        "device_name",
        "dtype",
        "other_processes_cpu_share",
        "date",
    ):
        assert key in summary, key
    assert set(summary["pass"]) == {"dense_ratio", "matmul_peak_fraction"}  # only the sections that ran
    (run,) = summary["runs"].values()
    assert {"quill", "llama", "quill_eager", "llama_eager", "quill_no_attention"} <= set(run["models"])
    assert {"ratio", "paired_median", "interval", "min_max"} <= set(run["quill_vs_llama"])
    (kernels,) = summary["kernels"].values()
    assert "all" in kernels["speedup"] and len(kernels["speedup"]) >= 2
    assert set(summary["kernel_verdicts"]) == set(kernels["speedup"]) - {"all"}
    assert summary["compile"] is None and summary["peak_memory"] == {}
    if summary.get("chart"):
        assert (tmp_path / summary["chart"]).stat().st_size > 0
