"""The report card's statistics, as text: the lead table of what each stage changed (each policy stage paired against
the model it started from, overall and on / off the demonstrator's slice, against its control or teacher, and models
scored against another on the same held-out rows),
the planted-mistake disclosure, the ablation table, the per-task comparisons, RL's headroom and reward-model use, and
the reward model's agreement with the task scorer. Reads the numbers the stages computed (quill.stats); computes none.
"""

from dataclasses import dataclass, field
from pathlib import Path

from quill.stats import SIGNIFICANCE, verdict

MISSING = "—"
# Keys of one paired comparison `<base>_diff` (quill.stats.PairedDifference.as_metrics).
PAIRED_SUFFIXES = ("_from", "_to", "_diff", "_diff_low", "_diff_high", "_p", "_gained", "_lost", "_n")
NOTE_KEYS = ("rm_decision", "headroom_warning")  # sentences a stage wrote for the reader
# What a stage's `vs_control_*` comparison is against, by the built-in stage it ran as.
CONTROLS = {"dpo": "next-token control", "distill": "SFT control"}
# The accuracies the lead table shows, in its column order (quill.metrics.accuracy_groups names the slice groups).
LEAD_GROUPS = (
    ("task_accuracy", "all held-out prompts"),
    ("on_slice_accuracy", "on the slice"),
    ("off_slice_accuracy", "off the slice"),
)
# The one number a stage without held-out accuracy is judged by: (key, what it is, its chance level or None).
HEADLINES = (
    ("rm_agreement_auc", "agreement with the task scorer (within-group AUC)", 0.5),
    ("preference_accuracy", "held-out preference accuracy", None),
    ("eval_accuracy", "held-out accuracy", None),  # classify
    ("eval_exact_match", "held-out exact match (%)", None),  # qa, seq2seq: percent, as SQuAD and BLEU report it
    ("eval_loss", "held-out loss", None),
    ("bytes_per_token", "bytes per token", None),
)


@dataclass
class StageReport:
    name: str
    folder: Path
    metrics: dict = field(default_factory=dict)
    log: list = field(default_factory=list)  # the Trainer's log_history
    done: bool = False
    kind: str = ""  # the built-in stage it ran as (rlvr runs as rl): its marker's `stage`, else its name
    settings: dict = field(default_factory=dict)  # the arguments its marker recorded (fingerprint settings)

    def __post_init__(self):
        self.kind = self.kind or self.name


def fmt(value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def num(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def comparison_keys(metrics: dict) -> list[str]:
    """Every key that belongs to a paired comparison (a `<base>_diff` with its siblings)."""
    bases = [k.removesuffix("_diff") for k in metrics if k.endswith("_diff")]
    return [f"{b}{suffix}" for b in bases for suffix in PAIRED_SUFFIXES if f"{b}{suffix}" in metrics]


def against(kind: str, base: str) -> tuple[str, str]:
    """(what the comparison `<base>_diff` is against, the metric compared): the start model, a stage's control
    (DPO: next-token loss on the chosen answers; distill: SFT on the same prompts), the teacher, or another model
    scored on the same held-out rows (`<metric>_vs_<name>`, a stage's `paired_with`)."""
    if base.startswith("vs_control_"):
        return CONTROLS.get(kind, "its control"), base.removeprefix("vs_control_")
    if base.startswith("vs_teacher_"):
        return "teacher", base.removeprefix("vs_teacher_")
    if "_vs_" in base:
        metric, other = base.split("_vs_", 1)
        return f"`{other}`", metric
    return "start model", base


def paired(metrics: dict, base: str) -> tuple | None:
    """(before, after, difference, low, high, p) of the comparison `<base>_diff`, or None where one is missing."""
    values = [num(metrics.get(f"{base}{s}")) for s in ("_from", "_to", "_diff", "_diff_low", "_diff_high", "_p")]
    return None if any(v is None for v in values) else tuple(values)


def shown_verdict(p: float, low: float, high: float) -> str:
    call = verdict(p, low, high)
    return call if call == "no significant change" else f"**{call}**"  # a significant change stands out


def names(stages) -> str:
    """`a`, `b` and `c`."""
    quoted = [f"`{name}`" for name in stages]
    return ", ".join(quoted[:-1]) + f" and {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


# -- the lead table: what each stage changed ---------------------------------------------------------------------


def accuracy_cell(metrics: dict, base: str) -> str:
    """`start → end: difference [95% CI], p, verdict`; just start → end for a run recorded without the statistics."""
    values = paired(metrics, base)
    if values is None:
        before, after = num(metrics.get(f"{base}_before")), num(metrics.get(base))
        return f"{before:.3f} → {after:.3f}" if None not in (before, after) else fmt(after)
    before, after, diff, low, high, p = values
    return (
        f"{before:.3f} → {after:.3f}: {diff:+.3f} [{low:+.3f}, {high:+.3f}], p {p:.3g}, {shown_verdict(p, low, high)}"
    )


def headline_cell(metrics: dict, key: str, chance: float | None) -> str:
    before, after = num(metrics.get(f"{key}_before")), num(metrics.get(key))
    low, high = num(metrics.get(f"{key}_low")), num(metrics.get(f"{key}_high"))
    text = f"{fmt(before)} → {fmt(after)}" if before is not None else fmt(after)
    if low is not None and high is not None:
        text += f" [{low:.3f}, {high:.3f}]"
        if chance is not None:  # what the interval says, in words
            text += ", above chance" if low > chance else ", not distinguishable from chance"
    return text


def reward_model_note(metrics: dict) -> str:
    if "rm_used" not in metrics:
        return ""
    auc = num(metrics.get("rm_agreement_auc"))
    agreement = f" (AUC {auc:.3f})" if auc is not None else ""
    return f"; reward model used: {'yes' if metrics['rm_used'] else 'no'}{agreement}"


def lead_rows(stages: list) -> list[list[str]]:
    """One row per policy stage (its accuracy against its start model), one for DPO against its control, and each
    other stage's headline number, in run order. Every row has all LEAD_GROUPS cells."""
    rows = []
    for s in stages:
        m = s.metrics
        if "task_accuracy_diff" in m or num(m.get("task_accuracy")) is not None:
            measured = f"greedy accuracy vs its start model{reward_model_note(m)}"
            rows.append([s.name, measured, *(accuracy_cell(m, g) for g, _ in LEAD_GROUPS)])
            for other in ("control", "teacher"):
                if f"vs_{other}_task_accuracy_diff" in m:
                    cells = [accuracy_cell(m, f"vs_{other}_{g}") for g, _ in LEAD_GROUPS]
                    label = against(s.kind, f"vs_{other}_task_accuracy")[0]
                    rows.append([f"{s.name} vs {other}", f"greedy accuracy vs the {label}", *cells])
            continue
        versus = sorted(k.removesuffix("_diff") for k in m if k.endswith("_diff") and "_vs_" in k)
        for base in versus:  # held-out rows scored by this model and another (`paired_with`), paired per row
            other, metric = against(s.kind, base)
            cell = accuracy_cell(m, base)
            rows.append(
                [f"{s.name} vs {other}", f"held-out {metric} vs {other}", cell, *[MISSING] * (len(LEAD_GROUPS) - 1)]
            )
        if versus:
            continue
        for key, label, chance in HEADLINES:
            if num(m.get(key)) is not None:
                # The slice columns where the stage measured its number per slice (the reward model's agreement).
                keyed = [f"{group.removesuffix('accuracy')}{key}" for group, _ in LEAD_GROUPS[1:]]
                cells = [headline_cell(m, k, chance) if num(m.get(k)) is not None else MISSING for k in keyed]
                rows.append([s.name, label, headline_cell(m, key, chance), *cells])
                break
    return rows


def lead_table(stages: list) -> list[str]:
    """The lead table; the slice columns only where some stage measured the slice."""
    sliced = any(k.startswith(("on_slice_accuracy", "off_slice_accuracy")) for s in stages for k in s.metrics)
    width = 2 + (len(LEAD_GROUPS) if sliced else 1)
    header = ["stage", "measured", *(label for _, label in LEAD_GROUPS)]
    return table(header[:width], [row[:width] for row in lead_rows(stages)])


def lead_section(stages: list, demonstrator: dict) -> list[str]:
    title = "## What each stage changed (paired, held-out)"
    if not lead_rows(stages):
        return [title, "", "No stage recorded a held-out number to judge it by.", ""]
    return [
        title,
        "",
        *lead_table(stages),
        "",
        "Held-out greedy exact-match accuracy, each policy stage on the same prompts as the model it started from: "
        "start → end, the paired difference [Newcombe's 95% interval], the exact McNemar p, and a verdict that says "
        f"**gain** or **loss** only when p < {SIGNIFICANCE} and the interval excludes 0. Other stages show the one "
        "number they are judged by (start → end [95% interval] where measured).",
        "",
        *disclosure(stages, demonstrator),
    ]


def disclosure(stages: list, demonstrator: dict) -> list[str]:
    """The planted mistake in plain words, from the run's recorded `demonstrator` argument; nothing when it is clean
    or unknown."""
    rate = num(demonstrator.get("rate"))
    task, part, mistake = (demonstrator.get(k) for k in ("task", "slice", "mistake"))
    if not rate or not (task and part and mistake):
        return []
    text = (
        f"**A planted mistake, disclosed.** The default data's demonstrator makes a planted mistake: on `{task}` "
        f"prompts asking for {part} order it answers in {mistake} order in {rate:.0%} of its demonstrations (the SFT "
        "answers and the task documents in pretraining); everything else it answers right."
    )
    copiers = [s for s in stages if s.kind == "sft"]
    learners = [s.name for s in stages if s.kind in ("dpo", "reward", "rl")]
    if copiers:
        text += f" {names(s.name for s in copiers)} is trained to copy those demonstrations."
    if learners:
        text += (
            f" {names(learners)} learn from the task's scorer (its labels and rewards, or a reward model trained on "
            "them), never from the demonstrator."
        )
    text += f" *On the slice* are the held-out `{task}` prompts asking for {part} order, *off the slice* all others."
    for s in copiers:
        on, off = num(s.metrics.get("on_slice_accuracy")), num(s.metrics.get("off_slice_accuracy"))
        if on is not None and off is not None:
            text += (
                f" After `{s.name}` the model answers {on:.1%} of the slice's held-out prompts right, {off:.1%} off it."
            )
    return [text, ""]


def ablation_section(stages: list, demonstrator: dict, folder: str) -> list[str]:
    rate = num(demonstrator.get("rate"))
    title = f"demonstrator rate {rate:g}" if rate is not None else "demonstrator rate unknown"
    return [
        f"## Ablation: {title}",
        "",
        f"The same columns for the run in `{folder}`, read from its own stage folders.",
        "",
        *lead_table(stages),
        "",
    ]


# -- details ---------------------------------------------------------------------------------------------------


def _comparison_rows(stage: StageReport, skip: set[str]) -> list[str]:
    m = stage.metrics
    bases = [k.removesuffix("_diff") for k in m if k.endswith("_diff") and k.removesuffix("_diff") not in skip]
    bases.sort(key=lambda b: (b.startswith("vs_"), b))
    rows = []
    for base in bases:
        compared_with, metric = against(stage.kind, base)
        values = paired(m, base)
        if values is None:
            continue
        before, after, diff, low, high, p = values
        rows.append(
            f"| {stage.name} | {compared_with} | {metric} | {int(m.get(f'{base}_n', 0)):,} | {before:.3f} | "
            f"{after:.3f} | {diff:+.3f} | {low:+.3f} to {high:+.3f} | {p:.3g} | {shown_verdict(p, low, high)} |"
        )
    return rows


def details_section(stages: list[StageReport]) -> list[str]:
    """Per-task paired comparisons (the lead table has the overall and slice ones), RL and the reward model."""
    lead = {f"{prefix}{g}" for g, _ in LEAD_GROUPS for prefix in ("", "vs_control_", "vs_teacher_")}
    lead |= {k.removesuffix("_diff") for s in stages for k in s.metrics if k.endswith("_diff") and "_vs_" in k}
    rows = [r for s in stages for r in _comparison_rows(s, lead)]
    out = []
    if rows:
        out = [
            "### Per task (paired, held-out)",
            "",
            "The lead table's comparisons, task by task: `difference` is after - before with Newcombe's 95% interval.",
            "",
            "| stage | compared with | metric | prompts | before | after | difference | 95% CI | p | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    out += [line for s in stages if s.kind == "rl" for line in rl_section(s)] + reward_section(stages)
    return ["## Details", "", *out] if out else []


def rl_section(rl: StageReport) -> list[str]:
    m = rl.metrics
    if "headroom" not in m:
        return []
    k = next((key.removeprefix("pass_at_") for key in m if key.startswith("pass_at_") and "_before" not in key), None)
    lines = [f"### {rl.name}: what sampling could find, and what the reward model was trusted with", ""]
    lines.append(
        f"On {fmt(m.get('sampled_prompts'))} held-out prompts, {k} samples each at the rollout temperature "
        f"{fmt(m.get('sampled_temperature'))}: (before -> after {rl.name})"
    )
    lines.append("")
    for key, label in (
        ("task_accuracy", "greedy accuracy"),
        ("sampled_accuracy", "sampled pass@1"),
        (f"pass_at_{k}", f"pass@{k}"),
        ("headroom", f"headroom pass@{k} - greedy"),
    ):
        lines.append(f"- {label}: {fmt(m.get(f'{key}_before'))} -> {fmt(m.get(key))}")
    if "groups_with_task_reward_variance" in m:
        share = m["groups_with_task_reward_variance"]
        lines.append(f"- GRPO groups whose task reward varied (the only ones it learns from): {share:.1%}")
    if "rm_agreement_auc" in m:
        lines.append(
            f"- reward model agreement with the task scorer on these samples (within-group AUC): "
            f"{m['rm_agreement_auc']:.3f} (95% CI {fmt(m.get('rm_agreement_auc_low'))} to "
            f"{fmt(m.get('rm_agreement_auc_high'))}, {fmt(m.get('rm_agreement_pairs'))} right/wrong pairs); "
            f"used by {rl.name}: **{'yes' if m.get('rm_used') else 'no'}** (threshold {fmt(m.get('rm_min_agreement'))})"
        )
    for key in NOTE_KEYS:
        if m.get(key):
            lines.append(f"- {'warning: ' if key == 'headroom_warning' else ''}{m[key]}")
    return lines + [""]


def reward_section(stages: list[StageReport]) -> list[str]:
    reward = next((s for s in stages if s.kind == "reward"), None)
    if reward is None or "rm_agreement_auc" not in reward.metrics:
        return []
    m = reward.metrics
    return [
        "### Reward model: agreement with the task scorer on the policy's own samples",
        "",
        "Within-group AUC (a prompt's right samples scored above its wrong ones) on "
        f"{fmt(m.get('rm_agreement_prompts'))} held-out prompts with both: "
        f"{fmt(m.get('rm_agreement_auc_before'))} before training (untrained head) -> "
        f"{fmt(m['rm_agreement_auc'])} after (95% CI {fmt(m.get('rm_agreement_auc_low'))} to "
        f"{fmt(m.get('rm_agreement_auc_high'))}, {fmt(m.get('rm_agreement_pairs'))} right/wrong pairs).",
        "",
        *(
            f"- {label.capitalize()} ({fmt(m.get(f'{p}rm_agreement_prompts'))} prompts): "
            f"{fmt(m.get(f'{p}rm_agreement_auc_before'))} -> {fmt(m[f'{p}rm_agreement_auc'])} (95% CI "
            f"{fmt(m.get(f'{p}rm_agreement_auc_low'))} to {fmt(m.get(f'{p}rm_agreement_auc_high'))})."
            for p, label in ((group.removesuffix("accuracy"), label) for group, label in LEAD_GROUPS[1:])
            if num(m.get(f"{p}rm_agreement_auc")) is not None
        ),
        "",
    ]
