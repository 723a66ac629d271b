"""Every model a stage computes with is placed on the training device by quill.loading (issue: the RL reward model,
the judge, the pair builder's models and the start-policy eval ran on the CPU in fp32 beside a GPU trainer).

The stages run as subprocesses, as the runner starts them; a `sitecustomize` on their PYTHONPATH wraps
`quill.loading.place` before any stage imports it, and logs each (kind, model path, device) it placed. A load site
that loads its model another way never reaches `place`, so its entry is missing. On CPU the device is cpu either way:
what is checked is that the placement ran, for every kind of model each stage loads."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_model import save_checkpoint
from tiny_outputs import REPO, preference_argv, rl_argv

SPY = """
import json, os

import quill.loading as loading

_place = loading.place


def place(model, kind):
    model = _place(model, kind)
    entry = {"kind": kind, "path": model.name_or_path, "device": str(next(model.parameters()).device),
             "training_device": str(loading.training_device())}
    with open(os.environ["QUILL_PLACEMENT_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")
    return model


loading.place = place
"""

# Model loads outside quill.loading, each with the reason it is not a stage's: tools that own their device.
NOT_A_STAGE = {
    "pipelines/tools/serve.py": "transformers serve's model manager loads and places the served model",
    "pipelines/tools/attention.py": "the attention-heatmap tool reads one forward pass's attentions on the CPU",
}


def test_every_model_load_in_the_package_goes_through_the_loader():
    """A new `...from_pretrained(` of a model outside quill.loading would skip the placement: only tokenizer and
    config loads, and the tools above, may do that."""
    found = set()
    for path in (REPO / "pipelines").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):  # calls only: docstrings may show a load to the user
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained"):
                continue
            if not re.search(r"(Tokenizer|Config)$", ast.unparse(node.func.value)) and rel != "pipelines/loading.py":
                found.add(rel)
    assert found <= set(NOT_A_STAGE), f"models loaded outside quill.loading in {sorted(found - set(NOT_A_STAGE))}"


def run_spied(module: str, argv: list[str], env: dict, tmp_path: Path) -> list[tuple]:
    """Run a stage with the placement spy; the (kind, path) of every model it placed, each on its training device."""
    hook, log = tmp_path / "spy", tmp_path / f"{module.rsplit('.', 1)[-1]}_placed.jsonl"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SPY)
    env = {**env, "PYTHONPATH": str(hook), "QUILL_PLACEMENT_LOG": str(log)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for e in entries:
        assert e["device"] == e["training_device"], e
    return [(e["kind"], e["path"]) for e in entries]


# A few prompts with answers, answered and labelled by the start model: pair building runs before the trainer.
POLICY_PAIRS = [
    "dataset_mixture=[{path: quill:default/rl_train, max_samples: 12}]",
    "eval_size=4",
    "pairs_from=policy",
    "pair_samples=1",
    "pair_max_new_tokens=4",
    "pair_use_reference=true",
    "max_steps=1",
]


@pytest.mark.slow
def test_every_stage_places_every_model_it_computes_with(tiny_post, tmp_path):
    sft, reward = str(tiny_post["sft"]), str(tiny_post["reward"])
    env = tiny_post["env"]

    # RL: the policy (its start eval and sampling run before GRPOTrainer) and the reward model scoring every batch.
    argv = rl_argv(tmp_path / "rl", tiny_post["sft"], tiny_post["reward"], "max_steps=2", "task_eval_limit=2")
    assert set(run_spied("quill.stages.rl", argv, env, tmp_path)) == {("policy", sft), ("reward", reward)}

    # Reward on policy pairs labelled by a reward model: the trained classifier, the causal copy that samples the
    # answers, and the labeller.
    argv = preference_argv("reward", tmp_path / "reward", tiny_post["sft"], *POLICY_PAIRS, "agreement_samples=2",
                           "task_eval_limit=2", "pair_labeller=reward_model", f"labeller_model={reward}")  # fmt: skip
    placed = set(run_spied("quill.stages.reward", argv, env, tmp_path))
    assert placed == {("policy", sft), ("sampler", sft), ("reward", reward)}

    # DPO on policy pairs labelled by a judge: the policy (it answers the prompts before DPOTrainer exists) and the
    # judge.
    argv = preference_argv("dpo", tmp_path / "dpo", tiny_post["sft"], *POLICY_PAIRS, "task_eval_limit=2",
                           "pair_labeller=judge", f"labeller_model={sft}")  # fmt: skip
    assert set(run_spied("quill.stages.dpo", argv, env, tmp_path)) == {("policy", sft), ("judge", sft)}


@pytest.mark.parametrize("cls", ["QuillForCausalLM", "QuillForSequenceClassification"])
def test_quill_eval_places_its_model(cls, tmp_path, monkeypatch):
    import quill.model
    from quill import loading
    from quill.tools.eval import evaluate_model

    labels = {"num_labels": 1} if cls == "QuillForSequenceClassification" else {}
    save_checkpoint(tmp_path / "m", cls=getattr(quill.model, cls), **labels)
    placed, place = [], loading.place

    def spy(model, kind):
        placed.append((kind, model.name_or_path))
        return place(model, kind)

    monkeypatch.setattr(loading, "place", spy)
    evaluate_model(tmp_path / "m", limit=2, max_new_tokens=2)
    assert placed == [("eval", str(tmp_path / "m"))]
