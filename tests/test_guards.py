"""The non-finite guard (pipelines/stages/guards.py) under a loss scaler: overflow steps, which the scaler skips, pass;
a real NaN still stops the stage, with one line.

accelerate sets up fp16 (autocast plus a GradScaler) only on accelerator devices: on CPU, `fp16: true` trains in
fp32 and scales nothing. These tests give the trainer's accelerator what it gives a GPU, a real
`torch.amp.GradScaler("cpu")` and fp16 autocast (torch runs it on CPU), so the run below is real fp16 training.
The scaler's initial scale, 2**24, overflows the fp16 gradients on the first steps: it skips those steps and halves
its scale until they are finite, the routine fp16 start-up. The NaN case breaks the forward pass at one step.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_outputs import REPO

SETUP = """
import torch
from transformers import Trainer, TrainingArguments
import quill.model
from quill.model import QuillConfig, QuillForCausalLM
from quill.stages.guards import StopOnNonFiniteLoss

INIT_SCALE = 2.0**24

def build(out, steps, nan_at_call=None):
    torch.manual_seed(0)
    model = QuillForCausalLM(QuillConfig(depth=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                         vocab_size=64))
    if nan_at_call is not None:
        calls = {"n": 0}
        def poison(module, inputs, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] == nan_at_call else output
        model.model.embed_tokens.register_forward_hook(poison)
    rows = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(64)]
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                             max_grad_norm=1.0, use_cpu=True, fp16=True, report_to=[], save_strategy="no",
                             logging_steps=1, disable_tqdm=True, logging_nan_inf_filter=False)
    guard = StopOnNonFiniteLoss()
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[guard])
    # What accelerate gives fp16 on a GPU (it is prepared into the optimizer when training starts).
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    trainer.accelerator.native_amp = True
    guard.attach(trainer)
    return trainer
"""


def test_loss_scaler_overflow_steps_are_skipped_not_fatal(tmp_path):
    namespace: dict = {}
    exec(textwrap.dedent(SETUP), namespace)  # noqa: S102 - the test's own setup code, shared with a subprocess
    init_scale, steps = namespace["INIT_SCALE"], 10
    trainer = namespace["build"](str(tmp_path), steps=steps)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()  # no QuillError although the first steps' gradients are inf

    # Each skipped step halves the scale (and none grows it back within 2000 steps): count them from it.
    skipped = round(math.log2(init_scale / trainer.accelerator.scaler.get_scale()))
    assert 1 <= skipped < steps, skipped
    norms = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    assert not all(math.isfinite(n) for n in norms[:skipped]) and all(math.isfinite(n) for n in norms[skipped:])
    after = trainer.model.state_dict()
    assert all(t.isfinite().all() for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # ... and the later ones trained


def test_without_a_scaler_the_same_overflowing_gradients_stop_the_stage(tmp_path):
    """The control: with no scaler to skip them, non-finite gradients are not routine and the guard stops."""
    from quill.errors import QuillError

    namespace: dict = {}
    exec(textwrap.dedent(SETUP), namespace)  # noqa: S102
    trainer = namespace["build"](str(tmp_path), steps=4)
    trainer.accelerator.scaler, trainer.accelerator.native_amp = None, False
    trainer.model.lm_head.weight.register_hook(lambda g: g * float("inf"))  # finite loss, inf gradients
    with pytest.raises(QuillError, match=r"gradients became NaN or inf at step 1"):
        trainer.train()


def test_a_real_nan_under_the_loss_scaler_stops_with_one_line(tmp_path):
    code = textwrap.dedent(SETUP) + textwrap.dedent(
        """
        import sys
        from quill.errors import run_guarded
        # Forward calls 1-3 are steps 1-3 (one micro-batch each); the 4th forward returns NaN.
        run_guarded(lambda: build(sys.argv[1], steps=8, nan_at_call=4).train())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    assert errors[0].startswith("error: loss became NaN or inf at step 4;") and "fix:" in errors[0]
