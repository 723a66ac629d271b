"""The training stages, in pipeline order: the one list the CLI, the recipe runner, the report and eval read.

Each stage is a module `quill.stages.<name>` with `ARG_TYPES` (its config dataclasses) and `main(argv)`;
docs/recipes.md has the whole contract. Importing this package imports no stage (they pull in torch and TRL).
"""

STAGES = ("tokenizer", "pretrain", "sft", "dpo", "reward", "rl", "distill", "seq2seq", "mlm", "classify", "qa")
# Stages whose output is a sequence classifier (a reward model) rather than a causal LM.
CLASSIFIER_STAGES = ("reward",)


def stage_module(name: str) -> str:
    return f"{__name__}.{name}"
