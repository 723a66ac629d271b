"""`quill attention DIR TEXT` draws a layers x heads grid of attention heatmaps and saves the weights beside it: the
weights are the model's (rows sum to 1, nothing above the diagonal, equal to a softmax computed here from the
model's own projections), and bad input gets one line."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_model import save_checkpoint
from tiny_outputs import run_quill, stage_env

from quill.tools.attention import CELL_INCHES

TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return stage_env(tmp_path_factory.getbasetemp())  # offline, no progress bars: stderr holds the one error line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attention") / "ckpt"
    save_checkpoint(folder)  # a Quill folder: 2 layers, 2 heads, its own tokenizer
    return folder


def test_attention_grid_and_weights(checkpoint, env, tmp_path):
    png = tmp_path / "maps" / "att.png"
    done = run_quill(["attention", str(checkpoint), TEXT, "--output", str(png)], env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = np.load(png.with_suffix(".npz"))
    weights, tokens = saved["attentions"], list(saved["tokens"])
    assert weights.shape == (2, 2, len(tokens), len(tokens))  # layers x heads x queries x keys
    assert tokens[0] == "<|bos|>"
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)  # each query's weights are a distribution
    assert np.all(np.triu(weights, k=1) == 0.0)  # causal: no query looks ahead
    with Image.open(png) as image:  # 2 rows (layers) x 2 columns (heads) of CELL_INCHES at 100 dpi
        assert image.size == (int(2 * CELL_INCHES * 100), int(2 * CELL_INCHES * 100))

    # The first layer's weights, recomputed here from its projections: softmax(q k^T / sqrt(d) + causal mask).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    ids = AutoTokenizer.from_pretrained(checkpoint)(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    np.testing.assert_allclose(weights[0], out.attentions[0][0].numpy(), atol=1e-6)
    assert not np.allclose(weights[0, 0], np.tril(np.ones_like(weights[0, 0])) / np.arange(1, len(tokens) + 1)[:, None])

    # One layer: a 1 x 2 grid, twice as wide as tall.
    one = tmp_path / "one.png"
    done = run_quill(["attention", str(checkpoint), TEXT, "--layers", "1", "--output", str(one)], env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(one) as image:
        assert image.size == (int(2 * CELL_INCHES * 100), int(CELL_INCHES * 100))
    np.testing.assert_array_equal(np.load(one.with_suffix(".npz"))["attentions"], weights[1:2])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--layers", "5"], "--layers 5: the model has layers 0..1"),
        (["--layers", "a"], "--layers expected comma-separated layer numbers"),
        (["--max-tokens", "3"], "a heatmap over more than 3 cannot be read"),
        (["--output", "x.jpg"], "is not a .png file"),
    ],
)
def test_attention_bad_input_is_one_line(checkpoint, env, tmp_path, args, expected):
    done = run_quill(["attention", str(checkpoint), TEXT, *args], env, cwd=tmp_path)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "attention").exists()
