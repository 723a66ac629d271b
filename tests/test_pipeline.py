"""The main job end to end, CI-sized: `quill run recipes/tiny` with a tiny model and a few steps per stage.

Every stage folder must load where the project is not importable, the final model must answer a chat message
through pipeline(), and the RL stage's push must round-trip through a Hub-protocol server.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_remote_code import run_isolated

REPO = Path(__file__).resolve().parents[1]
STAGES = ["tokenizer", "pretrain", "sft", "dpo", "reward", "rl", "rlvr"]

# Small enough for a 2-core CI machine (the whole chain in well under 3 minutes), big enough to exercise everything.
TINY = [
    "tokenizer.vocab_size=512",
    "tokenizer.dataset_mixture=[{path: quill:default/pretrain_train, max_samples: 300}]",
    "tokenizer.eval_size=20",
    "pretrain.model_config={depth: 2, hidden_size: 64, num_attention_heads: 2, intermediate_size: 128}",
    "pretrain.dataset_mixture=[{path: quill:default/pretrain_train, max_samples: 300}]",
    "pretrain.eval_size=20",
    "pretrain.max_length=128",
    "sft.dataset_mixture=[{path: quill:default/sft_train, max_samples: 200}]",
    "sft.eval_size=20",
    "sft.max_length=128",
    "dpo.dataset_mixture=[{path: quill:default/rl_train, max_samples: 40}]",
    "dpo.eval_size=8",
    "dpo.pair_samples=2",
    "reward.dataset_mixture=[{path: quill:default/rl_train, max_samples: 40}]",
    "reward.eval_size=8",
    "reward.pair_samples=2",
    "reward.agreement_samples=2",
    "reward.agreement_prompts=8",
    "rl.dataset_mixture=[{path: quill:default/rl_train, max_samples: 32}]",
    "rl.num_generations=4",
    "rl.generation_batch_size=8",
    "rl.max_completion_length=8",
    "rl.per_device_train_batch_size=4",
    "rl.eval_sample_prompts=8",
    "rlvr.dataset_mixture=[{path: quill:default/rl_train, max_samples: 32}]",
    "rlvr.num_generations=4",
    "rlvr.generation_batch_size=8",
    "rlvr.max_completion_length=8",
    "rlvr.per_device_train_batch_size=4",
    "rlvr.eval_sample_prompts=8",
    "task_eval_limit=24",  # enough held-out rows that both sides of the demonstrator slice are scored
    "eval_max_new_tokens=8",
    "per_device_train_batch_size=4",
    "per_device_eval_batch_size=8",
    "max_steps=3",
    "save_steps=2",
    "logging_steps=1",
]


def chain_cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    """`quill run` of `recipe` into `out` at the CI size, the RL stage pushing to the Hub-protocol server."""
    cmd = [sys.executable, "-m", "quill.cli", "run", str(recipe), "--output-dir", str(out), *TINY]
    return [*cmd, "rl.push_to_hub=true", "rl.hub_model_id=user/quill-tiny-rl", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, hub_server_module):
    out = tmp_path_factory.mktemp("run") / "tiny"
    env = hub_server_module.env(QUILL_CACHE=str(tmp_path_factory.getbasetemp() / "quill-cache"))
    cmd = chain_cmd(REPO / "recipes" / "tiny", out)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc, hub_server_module


def test_every_training_stage_counts_its_tokens_without_a_warning(finished_run):
    out, proc, _ = finished_run
    for stage in STAGES[1:]:
        assert json.loads((out / stage / "metrics.json").read_text())["tokens_seen"] > 0, stage
    # The Trainer's token count warns on every step of a trainer whose batches hold no input_ids (GRPO's).
    assert "Tried to track the number of tokens seen" not in proc.stderr


def test_chain_writes_every_stage_and_a_report(finished_run):
    out, _, _ = finished_run
    for stage in STAGES:
        marker = json.loads((out / stage / "quill_stage.json").read_text())
        assert marker["done"] is True, stage
        assert (out / stage / "metrics.json").exists(), stage
    for stage in STAGES[1:]:
        folder = out / stage
        for name in [
            "config.json",
            "model.safetensors",
            "modeling_quill.py",
            "configuration_quill.py",
            "tokenizer.json",
            "chat_template.jinja",
            "README.md",
        ]:
            assert (folder / name).exists(), f"{stage}/{name}"
        # A reward model does not generate; every causal stage carries its generation settings.
        assert (folder / "generation_config.json").exists() == (stage != "reward"), stage
        assert not (folder / "checkpoints").exists(), stage  # resume points are cleaned up once the stage is done
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert "AutoModelForSequenceClassification" in auto_map and "AutoModelForCausalLM" in auto_map
    # Chaining: SFT started from pretrain, DPO and reward from SFT (recorded in each marker; cards never hold
    # local paths, which the Hub refuses and which would publish the user's folders).
    for stage, base in (("sft", "pretrain"), ("dpo", "sft"), ("reward", "sft"), ("rl", "sft"), ("rlvr", "sft")):
        assert json.loads((out / stage / "quill_stage.json").read_text())["base_model"] == str(out / base)
        assert str(out.parent) not in (out / stage / "README.md").read_text()
    report = (out / "report.md").read_text()
    assert all(stage in report for stage in STAGES[1:])
    # Post-training is judged on held-out prompts, paired with its start model (and DPO with its control); RL
    # records its headroom and whether it trusted the reward model, and says why.
    metrics = {s: json.loads((out / s / "metrics.json").read_text()) for s in ("sft", "dpo", "reward", "rl", "rlvr")}
    for stage in ("sft", "dpo", "rl", "rlvr"):
        assert {"task_accuracy_diff_low", "task_accuracy_diff_high", "task_accuracy_p"} <= set(metrics[stage])
        # The demonstrator's slice (number_sorting's descending prompts) and the rest, paired like the whole set.
        assert {"on_slice_accuracy_p", "off_slice_accuracy_p"} <= set(metrics[stage]), stage
    assert "vs_control_task_accuracy_p" in metrics["dpo"] and metrics["dpo"]["pairs_built"] > 0
    assert "rm_agreement_auc" in metrics["reward"]
    # RLHF trains on the reward model's score alone (recipe: verifiable_reward false); RLVR on the scorer alone.
    assert metrics["rl"]["rm_used"] is True and metrics["rl"]["rm_decision"] and "rm_used" not in metrics["rlvr"]
    for stage in ("rl", "rlvr"):
        assert {"pass_at_8", "headroom", "sampled_accuracy"} <= set(metrics[stage])
    logged = {
        s: {k for row in json.loads((out / s / "training_log.json").read_text()) for k in row} for s in STAGES[5:]
    }
    assert "rewards/reward_model/mean" in logged["rl"] and "rewards/task_reward/mean" not in logged["rl"]
    assert "rewards/task_reward/mean" in logged["rlvr"] and "rewards/reward_model/mean" not in logged["rlvr"]
    assert "What each stage changed (paired, held-out)" in report and "next-token control" in report


def test_generation_config_stops_at_end_of_turn(finished_run):
    out, _, _ = finished_run
    tok = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    for stage in ["sft", "dpo", "rl", "rlvr"]:
        gen = json.loads((out / stage / "generation_config.json").read_text())
        assert ids["<|end|>"] in gen["eos_token_id"] and ids["<|eos|>"] in gen["eos_token_id"], stage
        assert gen["pad_token_id"] == ids["<|pad|>"]


def test_every_stage_loads_without_the_project_and_the_final_model_chats(finished_run, tmp_path):
    out, _, _ = finished_run
    result = run_isolated(
        f"""
        import json
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline
        kinds = {{}}
        for stage in ["pretrain", "sft", "dpo", "rl"]:
            model = AutoModelForCausalLM.from_pretrained({str(out)!r} + "/" + stage, trust_remote_code=True)
            kinds[stage] = type(model).__name__
        reward = AutoModelForSequenceClassification.from_pretrained({str(out / "reward")!r}, trust_remote_code=True)
        kinds["reward"] = type(reward).__name__
        chat = pipeline("text-generation", model={str(out / "rl")!r}, trust_remote_code=True)
        reply = chat([{{"role": "user", "content": "What is 2 + 3?"}}], max_new_tokens=8, do_sample=False)
        print(json.dumps({{"kinds": kinds, "reply": reply[0]["generated_text"][-1]}}))
    """,
        tmp_path,
    )
    assert result["kinds"]["reward"] == "QuillForSequenceClassification"
    assert all(result["kinds"][s] == "QuillForCausalLM" for s in ["pretrain", "sft", "dpo", "rl"])
    assert result["reply"]["role"] == "assistant" and isinstance(result["reply"]["content"], str)


def test_pushed_model_answers_from_the_hub_in_a_fresh_process(finished_run):
    """The RL stage's push: the Hub repo holds the finished folder's files byte for byte (all but the local marker),
    and in a fresh process the model pulled from the Hub gives the local folder's greedy reply to the same prompt."""
    import hashlib

    out, _, hub = finished_run
    proc = hub.run_python(
        """
        import hashlib, json, os, sys
        from huggingface_hub import snapshot_download
        from transformers import pipeline
        pulled = snapshot_download("user/quill-tiny-rl")
        files = {}
        for root, _, names in os.walk(pulled):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    files[os.path.relpath(os.path.join(root, name), pulled)] = hashlib.sha256(f.read()).hexdigest()
        replies = []
        for model in ("user/quill-tiny-rl", sys.argv[1]):
            chat = pipeline("text-generation", model=model, trust_remote_code=True)
            reply = chat([{"role": "user", "content": "What is 2 + 3?"}], max_new_tokens=8, do_sample=False)
            replies.append(reply[0]["generated_text"][-1])
        print(json.dumps({"files": files, "replies": replies}))
    """,
        str(out / "rl"),
    )
    pulled = json.loads(proc.stdout.strip().splitlines()[-1])
    local = {
        str(path.relative_to(out / "rl")): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in (out / "rl").rglob("*")
        if path.is_file() and path.name != "quill_stage.json"  # the marker says the local folder is done
    }
    assert {"model.safetensors", "config.json", "modeling_quill.py", "README.md"} <= set(local)
    # .gitattributes comes from the Hub's own first commit, not from the folder.
    hub_files = {name: digest for name, digest in pulled["files"].items() if name != ".gitattributes"}
    assert hub_files == local
    from_hub, from_folder = pulled["replies"]
    assert from_hub["role"] == "assistant" and isinstance(from_hub["content"], str)
    assert from_hub == from_folder


def test_rerun_skips_finished_stages(finished_run):
    out, first, hub = finished_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    cmd = chain_cmd(REPO / "recipes" / "tiny", out)
    env = hub.env(QUILL_CACHE=str(out.parent.parent / "quill-cache"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == before


def test_listing_dpo_again_is_a_second_round_from_the_first_rounds_model(finished_run, tmp_path):
    """Iterative preference optimisation: a recipe that lists the DPO stage again builds the second round's pairs
    from the first round's model (its own answers), and trains that model."""
    out, _, hub = finished_run
    recipe = tmp_path / "recipe"
    shutil.copytree(REPO / "recipes" / "tiny", recipe)
    with open(recipe / "recipe.yaml", "a") as f:
        f.write("  - {name: dpo2, stage: dpo, config: dpo.yaml, from: dpo}\n")
    run = tmp_path / "run"
    for stage in ("tokenizer", "dpo"):  # a copy: this run's record and report must not replace the chain's
        shutil.copytree(out / stage, run / stage)
    round2 = [o.replace("dpo.", "dpo2.", 1) for o in TINY if o.startswith("dpo.")]
    cmd = chain_cmd(recipe, run, "--from", "dpo2", *round2)
    env = hub.env(QUILL_CACHE=str(out.parent.parent / "quill-cache"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "dpo2" / "quill_stage.json").read_text())["base_model"] == str(run / "dpo")
    metrics = json.loads((run / "dpo2" / "metrics.json").read_text())
    assert metrics["pairs_built"] > 0 and "task_accuracy_p" in metrics
    # The stage logs under its kind; this run has one DPO stage, dpo2, whose pairs were built at its start.
    assert [line for line in proc.stderr.splitlines() if line.startswith("[quill] dpo: ") and " pairs from " in line]
