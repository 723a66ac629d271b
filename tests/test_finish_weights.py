"""A stage is marked finished, and its checkpoints deleted, only when the finished folder holds loadable weights
(quill.output.finish_folder): a save that wrote no model files (FSDP with SHARDED_STATE_DICT, as transformers 5's
`save_model` does) or a torn one leaves the stage folder, its checkpoints included, as it was."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny_outputs import is_done

from quill.errors import QuillError
from quill.output import finish_folder


def stage_with_checkpoint(tmp_path):
    folder = tmp_path / "sft"
    ckpt = folder / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(ckpt / "model.safetensors"))
    return folder, ckpt


def config_only(staged):  # what a sharded-state-dict save leaves: no model files
    (staged / "config.json").write_text("{}")


def torn(staged):
    config_only(staged)
    (staged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")


@pytest.mark.parametrize("write", [config_only, torn], ids=["no_weights", "torn_weights"])
def test_finish_refuses_a_folder_without_loadable_weights(tmp_path, write):
    folder, ckpt = stage_with_checkpoint(tmp_path)
    with pytest.raises(QuillError, match="holds no model weights|not a readable safetensors file"):
        finish_folder(folder, write, {"stage": "sft"})
    assert not is_done(folder) and (ckpt / "model.safetensors").is_file()  # the only copy of the weights is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no staged folder left behind


def test_finish_with_weights_marks_done_and_drops_checkpoints(tmp_path):
    folder, ckpt = stage_with_checkpoint(tmp_path)

    def full(staged):
        config_only(staged)
        save_file({"w": torch.zeros(2)}, str(staged / "model.safetensors"))

    finish_folder(folder, full, {"stage": "sft"})
    assert is_done(folder) and not ckpt.exists()
