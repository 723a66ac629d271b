"""`quill run recipes/gpt2-124m --smoke`: every stage of the GPU recipe runs, for a few steps at tiny size on one
CPU process, on the real-schema copies of its Hub datasets (tests/hub_datasets.py) served by the loopback Hub."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_outputs import REPO, is_done

STAGES = ("tokenizer", "pretrain", "sft", "dpo", "reward", "rl")


@pytest.mark.slow
def test_gpt2_124m_smoke_runs_every_stage_on_real_schema_data(hub_with_datasets, tmp_path):
    out = tmp_path / "gpt2-smoke"
    env = hub_with_datasets.env(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "quill.cli", "run", "recipes/gpt2-124m", "--smoke", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    for stage in STAGES:
        assert is_done(out / stage), stage
    assert json.loads((out / "pretrain" / "config.json").read_text())["hidden_size"] == 32  # tiny, not 124M
    fetched = {r["path"].split("/resolve/")[0] for r in hub_with_datasets.log if "/resolve/" in r["path"]}
    for repo in ("fineweb-edu", "smoltalk", "ultrafeedback_binarized"):
        assert any(repo in path for path in fetched), (repo, fetched)  # the data came from the loopback Hub
