"""The datasets recipes/gpt2-124m names, in their real schemas (tests/hub_datasets.py), served by the loopback Hub:
each stage's loader accepts them and hands its trainer one shape.

- HuggingFaceH4/ultrafeedback_binarized: a string `prompt` beside whole conversations in `chosen`/`rejected`.
  DPO and reward derive the prompt (the shared user turn) and keep only the answers; RL's prompts are chat messages.
- HuggingFaceTB/smoltalk (config all): `messages` conversations for SFT.
- HuggingFaceFW/fineweb-edu (config sample-10BT): `text` for the tokenizer and pretraining.
"""

from __future__ import annotations

import json

LOAD_EVERY_STAGE = """
    import json
    from quill.data.sources import load_mixture

    UF = "HuggingFaceH4/ultrafeedback_binarized"
    cases = {
        "dpo": [{"path": UF, "split": "train_prefs", "max_samples": 16}],
        "reward": [{"path": UF, "split": "train_prefs", "max_samples": 16}],
        "rl": [{"path": UF, "split": "train_prefs", "max_samples": 16}],
        "sft": [{"path": "HuggingFaceTB/smoltalk", "name": "all", "max_samples": 16}],
        "pretrain": [{"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "max_samples": 16}],
    }
    out = {}
    for stage, sources in cases.items():
        train = load_mixture(sources, seed=0, eval_size=4, stage=stage)["train"]
        out[stage] = {"columns": sorted(train.column_names), "row": train[0]}
    print("RESULT " + json.dumps(out))
"""


def test_every_stage_loads_its_real_schema_dataset_from_the_hub(hub_with_datasets):
    proc = hub_with_datasets.run_python(LOAD_EVERY_STAGE, timeout=300)
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])

    for stage in ("dpo", "reward"):
        row = result[stage]["row"]
        # The derived prompt is the user turn; chosen/rejected keep only the assistant's answers.
        assert [m["role"] for m in row["prompt"]] == ["user"], (stage, row["prompt"])
        assert row["prompt"][0]["content"].startswith("Explain the Python topic"), row["prompt"]
        assert [m["role"] for m in row["chosen"]] == ["assistant"], (stage, row["chosen"])
        assert [m["role"] for m in row["rejected"]] == ["assistant"], (stage, row["rejected"])
        assert row["chosen"] != row["rejected"]

    rl = result["rl"]["row"]["prompt"]
    assert isinstance(rl, list) and [m["role"] for m in rl] == ["user"], rl  # a chat prompt, not raw text

    assert "messages" in result["sft"]["columns"]
    assert isinstance(result["pretrain"]["row"]["text"], str) and result["pretrain"]["row"]["text"]
