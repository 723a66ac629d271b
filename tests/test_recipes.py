"""Every shipped recipe parses: each stage config against its stage's arguments, with the runner's chaining."""

from pathlib import Path

import pytest

from quill.recipe import load_recipe, plan_recipe

# Stages each shipped recipe runs; the rest run the whole chain.
STAGES = {
    "tiny": ["tokenizer", "pretrain", "sft", "dpo", "reward", "rl", "rlvr"],  # RLHF and RLVR side by side
    "tiny-midtrain": ["tokenizer", "pretrain", "midtrain", "sft"],
    "tiny-distill": ["tokenizer", "pretrain", "teacher", "student", "distill"],
    "tiny-seq2seq": ["tokenizer", "decoder", "seq2seq"],
    "tiny-encoder": ["tokenizer", "mlm", "classify_scratch", "classify", "qa_scratch", "qa"],
    "gpt2-124m": ["tokenizer", "pretrain", "sft", "dpo", "reward", "rl", "student", "distill"],
    "bert-base": ["tokenizer", "mlm", "classify", "qa"],
    "t5-small": ["tokenizer", "seq2seq"],
}
RECIPES = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*/recipe.yaml"))


@pytest.mark.parametrize("recipe_dir", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_plans_every_stage(recipe_dir, tmp_path):
    recipe = load_recipe(recipe_dir)
    # GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU unless use_cpu is set.
    plans = plan_recipe(recipe, tmp_path / "out", overrides=["use_cpu=true"])
    names = [p.spec.name for p in plans]
    assert names == STAGES.get(recipe_dir.name, ["tokenizer", "pretrain", "sft", "dpo", "reward", "rl"])
