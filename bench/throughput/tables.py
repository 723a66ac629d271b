"""The printed report, from the summary alone (``summary.summarize``): one function per section."""

from __future__ import annotations


def interval_text(r: dict) -> str:
    lo, hi = r["interval"]
    return f"{r['paired_median']:.3f} [{lo:.3f}, {hi:.3f}]"


def print_environment(s: dict) -> None:
    print(f"device: {s['device_name']}; precision: {s['dtype']}; torch {s['torch']}, transformers {s['transformers']}")
    print(f"allocator: {s['allocator']}")
    print(f"interleaved: warm-up {s['warmup']}, {s['reps']} repetitions x 1 step per model, medians")
    share = s.get("other_processes_cpu_share")
    load = s.get("load_average_start"), s.get("load_average_end")
    if share is not None:
        print(
            f"machine load: other processes used {100 * share:.0f}% of the CPU time during the run; "
            f"load average {load[0]} at start, {load[1]} at end"
        )
        if share > 0.25 and s["threads"] > 1:
            print(
                "note: other processes were busy, and a multi-threaded step waits for its slowest thread; "
                "--threads 1 gives steadier figures on a shared machine (bench/README.md)"
            )


def print_runs(s: dict) -> None:
    runs = s["runs"]
    if not runs:
        return
    header = (
        f"{'run':<28}{'tok/step':>9}{'Quill tok/s':>13}{'Llama tok/s':>13}{'ratio':>7}"
        f"{'paired med [95% int.]':>24}{'Quill %peak':>13}{'Quill %probe':>14}{'others':>8}"
    )
    print("\n" + header)
    print("-" * len(header))
    for label, r in runs.items():
        q, ll = r["models"]["quill"], r["models"]["llama"]
        others = r.get("other_processes_cpu_share")
        print(
            f"{label:<28}{r['tokens_per_step']:>9}{q['tokens_per_s']:>13,.0f}{ll['tokens_per_s']:>13,.0f}"
            f"{r['quill_vs_llama']['ratio']:>7.2f}{interval_text(r['quill_vs_llama']):>24}"
            f"{100 * q['peak_fraction']:>12.1f}%{100 * q.get('probe_fraction', float('nan')):>13.1f}%"
            f"{'' if others is None else f'{100 * others:.0f}%':>8}"
        )
    print(
        f"\n{'references':<28}{'Quill eager':>13}{'Llama eager':>13}{'best/best':>11}{'ceiling tok/s':>15}"
        f"{'ceiling ratio':>15}{'ceiling %peak':>15}"
    )
    for label, r in runs.items():
        m = r["models"]
        eager = [f"{m[n]['tokens_per_s']:,.0f}" if n in m else "-" for n in ("quill_eager", "llama_eager")]
        best = f"{r['best_backends_ratio']:.2f}" if "best_backends_ratio" in r else "-"
        ceiling = m["quill_no_attention"]
        print(
            f"{label:<28}{eager[0]:>13}{eager[1]:>13}{best:>11}{ceiling['tokens_per_s']:>15,.0f}"
            f"{r['ceiling_ratio']:>15.2f}{100 * ceiling['peak_fraction']:>14.1f}%"
        )
    print(
        "ratio: Quill tokens/s over Llama's (sdpa), ratio of medians; paired: per-repetition ratios. ceiling: Quill "
        "with attention replaced by a no-op (everything else of the step still runs). others: CPU share other "
        "processes took meanwhile"
    )
    print(
        f"matmul peak: {s['matmul_peak_gflops']:,.0f} GFLOP/s ({s['matmul_peak_how']} matmuls, best of start and "
        "end); %probe: against the same matmul timed right after each repetition"
    )


def print_headline(s: dict) -> None:
    if not s["targets"]:
        return
    print()
    for key, target in s["targets"].items():
        ceiling = s.get(f"{key}_ceiling")
        bound = f"   (ceiling without attention: {ceiling:.3f})" if ceiling is not None else ""
        print(f"{key:<22}{s[key]:>7.3f}  target >= {target:<4} {'PASS' if s['pass'][key] else 'FAIL'}{bound}")
    if "dense_ratio_best_backends" in s:
        print(f"dense_ratio, each model on its faster backend (sdpa/eager): {s['dense_ratio_best_backends']:.3f}")


def print_kernels(s: dict) -> None:
    for label, r in s["kernels"].items():
        print(
            f"\n{label}: speedup of each hand-written kernel = step time with its plain-autograd reference / "
            "stock Quill's"
        )
        header = f"{'kernel':<12}{'tok/s without':>15}{'speedup':>9}{'paired med [95% int.]':>24}{'min-max':>15}"
        print(header + "\n" + "-" * len(header))
        print(f"{'(stock)':<12}{r['models']['quill']['tokens_per_s']:>15,.0f}")
        for kernel, sp in r["speedup"].items():
            tokens = r["models"][f"quill_plain_{kernel}"]["tokens_per_s"]
            lo, hi = sp["min_max"]
            print(f"{kernel:<12}{tokens:>15,.0f}{sp['ratio']:>9.3f}{interval_text(sp):>24}{f'{lo:.3f}-{hi:.3f}':>15}")
        spreads = [m["spread_iqr_over_median"] for m in r["models"].values()]
        coverage = next(iter(r["speedup"].values()))["interval_coverage"]
        print(
            f"step-time spread (IQR / median) per model: {min(spreads):.1%}-{max(spreads):.1%}; "
            f"interval coverage {coverage:.1%}"
        )


def print_memory(s: dict) -> None:
    for label, r in s["peak_memory"].items():
        print(f"\n{label}: {r['measure']} during {r['steps']} training steps, a fresh process per measurement (MiB)")
        header = f"{'model':<26}{'peak':>18}{'step growth':>18}{'without kernel: extra step memory':>36}"
        print(header + "\n" + "-" * len(header))
        for name, m in r["models"].items():
            extra = r["without_kernel"].get(name.removeprefix("quill_plain_"))
            extra_text = ""
            if extra and name.startswith("quill_plain_"):
                fraction = "-" if extra["extra_fraction_without"] is None else f"{extra['extra_fraction_without']:+.0%}"
                extra_text = f"{extra['extra_mb_without']:+.0f} MB ({fraction}), spread {extra['repeat_spread_mb']:.0f}"
            peak = "/".join(f"{v:.0f}" for v in m["peak_mb"]) or "error"
            step = "/".join(f"{v:.0f}" for v in m["step_mb"]) or "error"
            print(f"{name:<26}{peak:>18}{step:>18}{extra_text:>36}")
            for error in m["errors"]:
                print(f"  {name}: {error}")


def print_verdicts(s: dict) -> None:
    if not s["kernel_verdicts"]:
        return
    print(f"\nkernel verdicts ({s['kernel_rule']}):")
    for kernel, v in s["kernel_verdicts"].items():
        verdict = "earns its place" if v["earns_its_place"] else "does NOT earn its place"
        print(f"  {kernel:<12}{verdict:<26}{v['reason']}")


def print_compile(s: dict) -> None:
    c = s.get("compile")
    if not c:
        return
    print(
        f"\n{c['label']}: {c['torch_compile']}. A model compiled later reuses frames traced for an earlier one: "
        "its graph breaks there are not counted again, and its first step can be shorter"
    )
    header = f"{'model':<28}{'tok/s':>10}{'first step s':>14}{'compile s':>11}{'new graph breaks':>18}"
    print(header + "\n" + "-" * len(header))
    for name, m in c["models"].items():
        compile_s = f"{m['compile_s']:.1f}" if "compile_s" in m else "-"
        breaks = str(sum(m["graph_breaks"].values())) if "graph_breaks" in m else "-"
        print(f"{name:<28}{m['tokens_per_s']:>10,.0f}{m['first_step_s']:>14.1f}{compile_s:>11}{breaks:>18}")
    for name, error in c["errors"].items():
        print(f"{name:<28}compile FAILED: {error}")
    for name, m in c["models"].items():
        for reason, n in m.get("graph_breaks", {}).items():
            print(f"  {name}: {n} graph break(s): {reason}")
    for key, r in c["ratios"].items():
        print(f"  {key:<44}{r['ratio']:>7.3f}   paired {interval_text(r)}")


def print_gpu(s: dict) -> None:
    g = s.get("gpu")
    if not g:
        return
    q, ll = g["models"]["quill"], g["models"]["llama"]
    print(f"\n== GPU: {g['gpu']}, 124M (depth 12, vocab 50304), seq 1024 ==")
    print(
        f"Quill {q['tokens_per_s']:,.0f} tok/s, Llama {ll['tokens_per_s']:,.0f} tok/s, ratio "
        f"{g['quill_vs_llama']['ratio']:.2f}; measured matmul peak "
        f"{g['gpu_matmul_peak_tflops_measured']:.0f} TFLOP/s"
    )
    if g["gpu_bf16_peak_tflops_datasheet"]:
        print(
            f"MFU vs {g['gpu_bf16_peak_tflops_datasheet']:.0f} TFLOP/s data-sheet bf16 peak: "
            f"Quill {100 * g['quill_mfu']:.1f}%, Llama {100 * g['llama_mfu']:.1f}%"
        )


def print_report(s: dict) -> None:
    print_environment(s)
    print_runs(s)
    print_headline(s)
    print_kernels(s)
    print_memory(s)
    print_verdicts(s)
    print_compile(s)
    print_gpu(s)
