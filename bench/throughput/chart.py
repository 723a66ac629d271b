"""The chart, from the summary alone (so a saved JSON can be re-plotted): one panel per section."""

from __future__ import annotations

import textwrap
from pathlib import Path

RUN_BARS = [  # (model, legend, style): the two compared models, then the references where a run has them
    ("quill", "Quill", {"color": "tab:blue"}),
    ("llama", "Llama (sdpa)", {"color": "tab:orange"}),
    ("quill_eager", "Quill (eager)", {"color": "white", "edgecolor": "tab:blue", "hatch": "//"}),
    ("llama_eager", "Llama (eager)", {"color": "white", "edgecolor": "tab:orange", "hatch": "//"}),
    (
        "quill_no_attention",
        "Quill, attention removed (ceiling)",
        {"color": "white", "edgecolor": "tab:blue", "hatch": ".."},
    ),
]
COMPILE_BARS = [
    ("quill", "Quill eager", {"color": "white", "edgecolor": "tab:blue", "hatch": "//"}),
    ("llama", "Llama eager", {"color": "white", "edgecolor": "tab:orange", "hatch": "//"}),
    ("quill_compiled", "Quill compiled", {"color": "tab:blue"}),
    ("quill_plain_all_compiled", "Quill, plain kernels, compiled", {"color": "tab:cyan"}),
    ("llama_compiled", "Llama compiled", {"color": "tab:orange"}),
]
SIZE_COLORS = ["tab:purple", "tab:green", "tab:brown", "tab:gray"]


def short(label: str) -> str:
    """'dense d256-L4 s256' -> 'dense d256-L4\\ns256': two lines for tick labels."""
    return label.replace(" s", "\ns", 1) if " s" in label else label


def not_measured(ax, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_runs(ax, s: dict) -> None:
    title = "Training tokens/s relative to Llama (sdpa), same run"
    runs = s["runs"]
    if not runs:
        return not_measured(ax, title)
    width = 0.8 / len(RUN_BARS)
    top = 1.0
    for k, (name, legend, style) in enumerate(RUN_BARS):
        xs = [i for i, r in enumerate(runs.values()) if name in r["models"]]
        ys = [
            r["models"][name]["tokens_per_s"] / r["models"]["llama"]["tokens_per_s"]
            for r in runs.values()
            if name in r["models"]
        ]
        offset = (k - (len(RUN_BARS) - 1) / 2) * width
        ax.bar([x + offset for x in xs], ys, width, label=legend, **style)
        for x, y in zip(xs, ys):
            ax.text(x + offset, y + 0.03, f"{y:.2f}", ha="center", fontsize=6, rotation=90)
        top = max([top, *ys])
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylim(0, top * 1.45)
    ax.set_xticks(range(len(runs)), [short(label) for label in runs], fontsize=7)
    ax.set_ylabel("tokens/s over Llama's", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper left")


def plot_headline(ax, s: dict) -> None:
    title = "Headline ratios against their targets"
    names = list(s["targets"])
    if not names:
        return not_measured(ax, title)
    values = [s[n] for n in names]
    targets = [s["targets"][n] for n in names]
    ceilings = [s.get(f"{n}_ceiling") for n in names]
    ax.bar(range(len(names)), values, color=["tab:green" if p else "tab:red" for p in (s["pass"][n] for n in names)])
    for i, v in enumerate(values):
        ax.text(i, v + 0.03, f"{v:.2f}", ha="center", fontsize=7)
    ax.scatter(range(len(names)), targets, marker="_", s=900, color="black", label="target", zorder=3)
    xs = [i for i, c in enumerate(ceilings) if c is not None]
    ax.scatter(
        xs, [ceilings[i] for i in xs], marker="v", color="dimgray", label="ceiling (attention removed)", zorder=3
    )
    ax.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=7)
    ax.set_ylim(0, max(values + targets + [c for c in ceilings if c is not None]) * 1.3)
    ax.set_title(title + " (green: pass, red: fail)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")


def plot_kernels(ax, s: dict) -> None:
    title = "Speedup of each hand-written kernel over its reference"
    runs = s["kernels"]
    if not runs:
        return not_measured(ax, title)
    kernels = list(dict.fromkeys(k for r in runs.values() for k in r["speedup"]))
    width = 0.8 / len(runs)
    for j, (label, r) in enumerate(runs.items()):
        offset = (j - (len(runs) - 1) / 2) * width
        xs = [i for i, k in enumerate(kernels) if k in r["speedup"]]
        sp = [r["speedup"][kernels[i]] for i in xs]
        mids = [x["paired_median"] for x in sp]
        errors = [[m - x["interval"][0] for m, x in zip(mids, sp)], [x["interval"][1] - m for m, x in zip(mids, sp)]]
        ax.bar(
            [x + offset for x in xs],
            [m - 1 for m in mids],
            width,
            bottom=1,
            label=label,
            color=SIZE_COLORS[j % len(SIZE_COLORS)],
            yerr=errors,
            capsize=3,
            ecolor="black",
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(kernels)), kernels, fontsize=7)
    ax.set_ylabel("step time without / with (paired median, 95% int.)", fontsize=7)
    ax.set_title(title + "\n(> 1: the kernel is faster)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")


def plot_memory(ax, s: dict) -> None:
    title = "Extra step memory without each kernel"
    runs = s["peak_memory"]
    if not runs:
        return not_measured(ax, title)
    kernels = list(dict.fromkeys(k for r in runs.values() for k in r["without_kernel"]))
    width = 0.8 / len(runs)
    for j, (label, r) in enumerate(runs.items()):
        offset = (j - (len(runs) - 1) / 2) * width
        xs = [i for i, k in enumerate(kernels) if k in r["without_kernel"]]
        ys = [100 * (r["without_kernel"][kernels[i]]["extra_fraction_without"] or 0.0) for i in xs]
        ax.bar([x + offset for x in xs], ys, width, label=label, color=SIZE_COLORS[j % len(SIZE_COLORS)])
        for x, y, i in zip(xs, ys, xs):
            mb = r["without_kernel"][kernels[i]]["extra_mb_without"]
            ax.text(x + offset, y + (1 if y >= 0 else -4), f"{mb:+.0f}MB", ha="center", fontsize=5)
    ax.axhline(0, color="black", linewidth=0.8)
    if s.get("memory_saving_min"):
        ax.axhline(100 * s["memory_saving_min"], color="gray", linestyle="--", linewidth=0.8, label="threshold")
    ax.set_xticks(range(len(kernels)), kernels, fontsize=7)
    ax.set_ylabel("% of stock Quill's step growth (peak RSS)", fontsize=7)
    ax.set_title(title + "\n(> 0: the kernel saves memory)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")


def plot_compile(ax, s: dict) -> None:
    c = s.get("compile")
    title = "torch.compile: tokens/s relative to compiled Llama"
    if not c or "llama_compiled" not in c["models"]:
        return not_measured(ax, title if not c else title + f"\n(failed: {', '.join(c['errors'])})")
    base = c["models"]["llama_compiled"]["tokens_per_s"]
    bars = [(n, legend, style) for n, legend, style in COMPILE_BARS if n in c["models"]]
    for i, (name, _legend, style) in enumerate(bars):
        m = c["models"][name]
        y = m["tokens_per_s"] / base
        ax.bar(i, y, 0.7, **style)
        note = f"{y:.2f}" + (f"\ncompile {m['compile_s']:.0f}s" if "compile_s" in m else "")
        ax.text(i, y + 0.02, note, ha="center", fontsize=6)
    ax.set_xticks(
        range(len(bars)),
        [legend.replace(", ", ",\n").replace(" compiled", "\ncompiled") for _, legend, _ in bars],
        fontsize=6,
    )
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylim(0, max(c["models"][n]["tokens_per_s"] / base for n, _, _ in bars) * 1.35)
    failed = f"; FAILED: {', '.join(c['errors'])}" if c["errors"] else ""
    ax.set_title(f"{title}\n{c['label']}{failed}", fontsize=9)


def plot_notes(ax, s: dict) -> None:
    ax.axis("off")
    share = s.get("other_processes_cpu_share")
    lines = [
        f"{s['device_name']}",
        f"{s['dtype']}, {s['threads']} threads, torch {s['torch']}",
        f"allocator: {s['allocator']}",
        f"{s['reps']} interleaved repetitions, medians",
    ]
    if share is not None:
        lines.append(f"other processes took {100 * share:.0f}% of the CPU during the run")
    if s.get("matmul_peak_gflops"):
        lines.append(f"matmul peak {s['matmul_peak_gflops']:,.0f} GFLOP/s ({s['matmul_peak_how']})")
    for kernel, v in s["kernel_verdicts"].items():
        verdict = "earns its place" if v["earns_its_place"] else "does not earn its place"
        lines.append(f"{kernel}: {verdict} ({v['reason']})")
    text = "\n".join(textwrap.fill(line, 62, subsequent_indent="  ") for line in lines)
    ax.text(0, 1, text, va="top", fontsize=7, family="monospace", transform=ax.transAxes)


def save_chart(s: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    plot_runs(axes[0][0], s)
    plot_headline(axes[0][1], s)
    plot_notes(axes[0][2], s)
    plot_kernels(axes[1][0], s)
    plot_memory(axes[1][1], s)
    plot_compile(axes[1][2], s)
    fig.suptitle(f"Quill vs Llama training throughput, and what Quill's own kernels earn ({s['date']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
