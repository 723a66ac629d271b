"""The report card's statistics section: what each policy stage changed on held-out prompts, paired against the
model it started from (and DPO against its next-token control), RL's headroom and reward-model use, and the reward
model's agreement with the task scorer. Reads the numbers the stages computed (quill.stats); computes none.
"""

from dataclasses import dataclass, field
from pathlib import Path

from quill.stats import SIGNIFICANCE, verdict

MISSING = "—"
# Keys of one paired comparison `<base>_diff` (quill.stats.PairedDifference.as_metrics).
PAIRED_SUFFIXES = ("_from", "_to", "_diff", "_diff_low", "_diff_high", "_p", "_gained", "_lost", "_n")
NOTE_KEYS = ("rm_decision", "headroom_warning")  # sentences a stage wrote for the reader


@dataclass
class StageReport:
    name: str
    folder: Path
    metrics: dict = field(default_factory=dict)
    log: list = field(default_factory=list)  # the Trainer's log_history
    done: bool = False


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


def _comparison_rows(stage: StageReport) -> list[str]:
    m = stage.metrics
    bases = [k.removesuffix("_diff") for k in m if k.endswith("_diff")]
    bases.sort(key=lambda b: (b.startswith("vs_"), b != "task_accuracy" and b != "vs_control_task_accuracy", b))
    rows = []
    for base in bases:
        against, metric = (
            ("next-token control", base.removeprefix("vs_control_"))
            if base.startswith("vs_control_")
            else ("start model", base)
        )
        values = [num(m.get(f"{base}{s}")) for s in ("_from", "_to", "_diff", "_diff_low", "_diff_high", "_p")]
        if any(v is None for v in values):
            continue
        before, after, diff, low, high, p = values
        call = verdict(p, low, high)
        shown = f"**{call}**" if call == "gain" else call
        rows.append(
            f"| {stage.name} | {against} | {metric} | {int(m.get(f'{base}_n', 0)):,} | {before:.3f} | {after:.3f} | "
            f"{diff:+.3f} | {low:+.3f} to {high:+.3f} | {p:.3g} | {shown} |"
        )
    return rows


def statistics_section(stages: list[StageReport]) -> list[str]:
    """Each policy stage against its start model (and DPO against its control): paired, held-out, with intervals."""
    rows = [r for s in stages for r in _comparison_rows(s)]
    if not rows:
        return []
    out = [
        "## What each stage changed (paired, held-out)",
        "",
        "Greedy exact-match accuracy on the same held-out prompts before and after each stage (and, for DPO, after a",
        "control trained with plain next-token loss on the same chosen answers for the same steps). `difference` is",
        "after - before with Newcombe's 95% interval for paired proportions; `p` is the exact McNemar test on the",
        f"prompts whose answer changed. A change is called a **gain** (or a loss) only when p < {SIGNIFICANCE} and the",
        "interval excludes 0; anything else is `no significant change`, whatever its point estimate.",
        "",
        "| stage | compared with | metric | prompts | before | after | difference | 95% CI | p | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    return out + [""] + rl_section(stages) + reward_section(stages)


def rl_section(stages: list[StageReport]) -> list[str]:
    rl = next((s for s in stages if s.name == "rl"), None)
    if rl is None or "headroom" not in rl.metrics:
        return []
    m = rl.metrics
    k = next((key.removeprefix("pass_at_") for key in m if key.startswith("pass_at_") and "_before" not in key), None)
    lines = ["### RL: what sampling could find, and what the reward model was trusted with", ""]
    n = m.get("sampled_prompts")
    temp = m.get("sampled_temperature")
    lines.append(
        f"On {fmt(n)} held-out prompts, {k} samples each at the rollout temperature {fmt(temp)}: (before -> after RL)"
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
            f"used by RL: **{'yes' if m.get('rm_used') else 'no'}** (threshold {fmt(m.get('rm_min_agreement'))})"
        )
    for key in NOTE_KEYS:
        if m.get(key):
            lines.append(f"- {'warning: ' if key == 'headroom_warning' else ''}{m[key]}")
    return lines + [""]


def reward_section(stages: list[StageReport]) -> list[str]:
    reward = next((s for s in stages if s.name == "reward"), None)
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
    ]
