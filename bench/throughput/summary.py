"""The summary: figures, ratios and verdicts computed from the sections' measurements. It is what the JSON holds and
all that the printed tables and the chart read, so a saved JSON can be re-printed and re-plotted.

Ratios are ratios of median step times, with the spread of the per-repetition ratios (``timing.ratio_of``). A
headline number is the worst case over the dense sizes: a target has to hold at every size.
"""

from __future__ import annotations

import statistics

from .timing import ratio_of, relative_spread

TARGETS = {"dense_ratio": 1.2, "packed_ratio": 2.0, "packed4096_ratio": 3.0, "matmul_peak_fraction": 0.5}

# A hand-written kernel earns its place when, at some dense size, the model measurably needs it: the 95% interval
# of its paired speedup lies wholly above 1, or the step's peak memory grows by at least this fraction without it
# (and by more than the spread between repeated measurements). Where it also measurably costs on the other measure
# (slower, or more memory), that is reported as a trade-off. A kernel that only costs, or whose effect is inside the
# noise on both measures, does not earn its place.
MEMORY_SAVING_MIN = 0.05

PLAIN_PREFIX = "quill_plain_"


def model_figures(times: list[float], run: dict, peak: dict | None) -> dict:
    tokens, median = run["tokens_per_step"], statistics.median(times)
    out = {
        "tokens_per_s": tokens / median,
        "step_s_median": median,
        "step_s": [round(t, 5) for t in times],
        "spread_iqr_over_median": relative_spread(times),
    }
    flops_per_token = run.get("flops_per_token")
    if flops_per_token and peak:
        out["flops_per_s"] = tokens / median * flops_per_token
        out["peak_fraction"] = out["flops_per_s"] / peak["flops"]
    if flops_per_token and run.get("probe_flops"):
        # Against the matmul rate measured right after the same repetition (same neighbours, same load).
        out["probe_fraction"] = statistics.median(
            tokens / t * flops_per_token / f for t, f in zip(times, run["probe_flops"])
        )
    return out


def copy_keys(run: dict, keys: tuple[str, ...]) -> dict:
    return {key: run[key] for key in keys if key in run}


RUN_KEYS = (
    "kind",
    "label",
    "size",
    "tokens_per_step",
    "flops_per_token",
    "doc_lengths",
    "isolation_max_abs_logit_delta",
    "other_processes_cpu_share",
)


def comparison_summary(run: dict, peak: dict) -> dict:
    """A Quill vs Llama run: per-model figures, the ratio, and the references' bounds on it."""
    times = run["step_s"]
    models = {name: model_figures(ts, run, peak) for name, ts in times.items()}
    out = {**copy_keys(run, RUN_KEYS), "models": models, "quill_vs_llama": ratio_of(times["quill"], times["llama"])}
    if "quill_eager" in models and "llama_eager" in models:  # each model on its faster backend
        fastest = {m: max(models[m]["tokens_per_s"], models[f"{m}_eager"]["tokens_per_s"]) for m in ("quill", "llama")}
        out["best_backends_ratio"] = fastest["quill"] / fastest["llama"]
    if "quill_no_attention" in models:  # the most any attention kernel could give Quill here
        out["ceiling_ratio"] = models["quill_no_attention"]["tokens_per_s"] / models["llama"]["tokens_per_s"]
    if run.get("probe_flops"):
        out["probe_gflops"] = [round(f / 1e9, 1) for f in run["probe_flops"]]
    return out


def headline(runs: list[dict]) -> tuple[dict, dict]:
    """(headline numbers, their ceilings and the best-backends ratio), for the sections that ran."""
    values, bounds = {}, {}
    dense = [r for r in runs if r["kind"] == "dense"]
    if dense:
        values["dense_ratio"] = min(r["quill_vs_llama"]["ratio"] for r in dense)
        values["matmul_peak_fraction"] = min(r["models"]["quill"]["peak_fraction"] for r in dense)
        bounds["dense_ratio_best_backends"] = min(r["best_backends_ratio"] for r in dense)
        bounds["dense_ratio_ceiling"] = min(r["ceiling_ratio"] for r in dense)
        bounds["matmul_peak_fraction_ceiling"] = min(r["models"]["quill_no_attention"]["peak_fraction"] for r in dense)
    for kind in ("packed", "packed4096"):
        for r in runs:
            if r["kind"] == kind:
                values[f"{kind}_ratio"] = r["quill_vs_llama"]["ratio"]
                bounds[f"{kind}_ratio_ceiling"] = r["ceiling_ratio"]
    return values, bounds


def kernels_summary(run: dict) -> dict:
    """Each kernel's speedup: the step time of Quill with the kernel's reference over stock Quill's (> 1: the kernel
    is faster); "all" is every kernel replaced at once."""
    times = run["step_s"]
    speedup = {
        name.removeprefix(PLAIN_PREFIX): ratio_of(times["quill"], ts)
        for name, ts in times.items()
        if name.startswith(PLAIN_PREFIX)
    }
    models = {name: model_figures(ts, run, None) for name, ts in times.items()}
    return {
        **copy_keys(run, ("label", "size", "tokens_per_step", "other_processes_cpu_share")),
        "models": models,
        "speedup": speedup,
    }


def memory_summary(run: dict) -> dict:
    """Per model: peak memory and the step's growth over the memory before it (MB), each repeat; per kernel: how much
    more the step needs without it (medians), and the repeat spread that a difference has to exceed."""
    models = {}
    for name, results in run["runs"].items():
        ok = [r for r in results if "error" not in r]
        models[name] = {
            "peak_mb": [round(r["peak_mb"], 1) for r in ok],
            "step_mb": [round(r["peak_mb"] - r["before_steps_mb"], 1) for r in ok],
            "errors": [r["error"] for r in results if "error" in r],
        }
    without_kernel = {}
    stock = models.get("quill", {}).get("step_mb")
    for name, figures in models.items():
        if not (name.startswith(PLAIN_PREFIX) and stock and figures["step_mb"]):
            continue
        with_mb, without_mb = statistics.median(stock), statistics.median(figures["step_mb"])
        stock_peak, peak = statistics.median(models["quill"]["peak_mb"]), statistics.median(figures["peak_mb"])
        spread = max(max(stock) - min(stock), max(figures["step_mb"]) - min(figures["step_mb"]))
        without_kernel[name.removeprefix(PLAIN_PREFIX)] = {
            "step_mb_with": with_mb,
            "step_mb_without": without_mb,
            "extra_mb_without": without_mb - with_mb,
            "extra_fraction_without": (without_mb - with_mb) / with_mb if with_mb > 0 else None,
            "peak_fraction_without": peak / stock_peak - 1,
            "repeat_spread_mb": spread,
        }
    return {**copy_keys(run, ("label", "size", "steps", "measure")), "models": models, "without_kernel": without_kernel}


def kernel_verdicts(kernels: list[dict], memory: list[dict]) -> dict:
    """Per kernel: does it earn its place (see MEMORY_SAVING_MIN for the rule), and the evidence."""
    names = [k for run in kernels for k in run["speedup"] if k != "all"]
    verdicts = {}
    for kernel in dict.fromkeys(names):
        faster, slower, less_memory, more_memory = [], [], [], []
        for run in kernels:
            s = run["speedup"].get(kernel)
            if s and s["interval"][0] > 1:
                faster.append(run["size"]["name"])
            if s and s["interval"][1] < 1:
                slower.append(run["size"]["name"])
        for run in memory:
            m = run["without_kernel"].get(kernel)
            if not m or m["extra_fraction_without"] is None or abs(m["extra_mb_without"]) <= m["repeat_spread_mb"]:
                continue
            if m["extra_fraction_without"] >= MEMORY_SAVING_MIN:
                less_memory.append(run["size"]["name"])
            elif m["extra_fraction_without"] <= -MEMORY_SAVING_MIN:
                more_memory.append(run["size"]["name"])
        helps = [f"faster at {x}" for x in faster] + [f"less memory at {x}" for x in less_memory]
        costs = [f"slower at {x}" for x in slower] + [f"more memory at {x}" for x in more_memory]
        earns = bool(helps)
        if helps and costs:
            reason = "trade-off: " + ", ".join(helps) + "; but " + ", ".join(costs)
        elif helps:
            reason = ", ".join(helps)
        elif costs:
            reason = "only costs: " + ", ".join(costs)
        else:
            reason = "its effect is inside the noise at every size measured (speed and memory)"
        verdicts[kernel] = {
            "earns_its_place": earns,
            "reason": reason,
            "faster_at": faster,
            "slower_at": slower,
            "less_memory_at": less_memory,
            "more_memory_at": more_memory,
            "measured_speed": bool(kernels),
            "measured_memory": bool(memory),
        }
    return verdicts


COMPILE_RATIOS = {  # name: (A, B), A's speed over B's
    "quill_compiled_vs_llama_compiled": ("quill_compiled", "llama_compiled"),
    "kernels_under_compile": ("quill_compiled", "quill_plain_all_compiled"),
    "quill_plain_all_compiled_vs_llama_compiled": ("quill_plain_all_compiled", "llama_compiled"),
    "compile_gain_quill": ("quill_compiled", "quill"),
    "compile_gain_llama": ("llama_compiled", "llama"),
    "quill_vs_llama_eager": ("quill", "llama"),
}


def compile_summary(run: dict) -> dict:
    times = run["step_s"]
    models = {}
    for name, ts in times.items():
        figures = model_figures(ts, run, None)
        figures["first_step_s"] = run["first_step_s"][name]
        if name.endswith("_compiled"):  # the first step compiles forward and backward, then runs
            figures["compile_s"] = figures["first_step_s"] - figures["step_s_median"]
            figures["graph_breaks"] = run["graph_breaks"][name]
        models[name] = figures
    ratios = {key: ratio_of(times[a], times[b]) for key, (a, b) in COMPILE_RATIOS.items() if a in times and b in times}
    return {
        **copy_keys(run, ("label", "size", "tokens_per_step", "errors", "torch_compile", "other_processes_cpu_share")),
        "models": models,
        "ratios": ratios,
    }


def gpu_summary(run: dict, peak: dict) -> dict:
    out = comparison_summary(run, peak)
    datasheet = run["gpu_bf16_peak_tflops_datasheet"]
    out.update(
        gpu=run["gpu"], gpu_bf16_peak_tflops_datasheet=datasheet, gpu_matmul_peak_tflops_measured=peak["flops"] / 1e12
    )
    if datasheet:
        for name in ("quill", "llama"):
            out[f"{name}_mfu"] = out["models"][name]["flops_per_s"] / (datasheet * 1e12)
    return out


def summarize(measured: dict, environment: dict) -> dict:
    """The summary of a run, from ``measured`` (section name -> what its measuring function returned, plus the
    matmul peaks timed at the start and end) and the run's environment."""
    peaks = [p for p in measured.get("matmul_peak", []) if p]
    # Best of the start and end probes: a quiet moment anywhere in the run sets the bar.
    peak = max(peaks, key=lambda p: p["flops"]) if peaks else None
    runs = [
        comparison_summary(r, peak)
        for r in [*measured.get("dense", []), measured.get("packed"), measured.get("packed4096")]
        if r
    ]
    values, bounds = headline(runs)
    kernels = [kernels_summary(r) for r in measured.get("kernels", [])]
    memory = [memory_summary(r) for r in measured.get("memory", [])]
    summary = {
        **values,
        **bounds,
        "targets": {k: t for k, t in TARGETS.items() if k in values},
        "pass": {k: values[k] >= t for k, t in TARGETS.items() if k in values},
        "headline_rule": "ratio = ratio of median step times (Quill tokens/s over Llama's); dense_ratio and "
        "matmul_peak_fraction are the minimum over the dense sizes; peak = best matmul rate seen in the run",
        "matmul_peak_gflops": peak["flops"] / 1e9 if peak else None,
        "matmul_peak_how": f"{peak['size']}x{peak['size']} {peak['how']}" if peak else None,
        "flops_formula": "6*N + 12*L*H*Q*T per token; N = matmul weights incl. LM head; T = row length (dense) "
        "or sum(len^2)/row_len (packed)",
        "runs": {r["label"]: r for r in runs},
        "kernels": {r["label"]: r for r in kernels},
        "peak_memory": {r["label"]: r for r in memory},
        "kernel_verdicts": kernel_verdicts(kernels, memory) if kernels or memory else {},
        "memory_saving_min": MEMORY_SAVING_MIN,
        "kernel_rule": "a kernel earns its place when, at some dense size, the 95% interval of its paired speedup "
        "(step time with its plain-autograd reference / with the kernel) lies above 1, or the step's peak memory grows "
        f"by >= {MEMORY_SAVING_MIN:.0%} without it (beyond the repeat spread); a measured cost on the other measure is "
        "reported as a trade-off",
        "compile": compile_summary(measured["compile"]) if measured.get("compile") else None,
        "gpu": gpu_summary(measured["gpu"], peak) if measured.get("gpu") else None,
        **environment,
    }
    return summary
