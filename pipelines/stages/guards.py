"""Training guards every stage installs: stop on a non-finite loss or gradient on any backend, keep checkpoints free
of pickled arguments.

The non-finite guard checks twice per optimizer step, on every rank, and all ranks agree before any of them stops
(one rank stopping alone would leave the others waiting in a collective):

- the loss, before `accelerator.backward` (every HF and TRL trainer backpropagates through it). Under DeepSpeed
  the optimizer step runs inside that call, so this is the check that comes before the update there.
- the gradients, before the optimizer step: the local gradients (a DTensor's local shard under FSDP2) on DDP and
  FSDP; under DeepSpeed, whether the engine applied its step (ZeRO skips a step whose gradient norm is not
  finite, so the weights are intact when the guard stops).

With a loss scaler (fp16: torch's GradScaler, or DeepSpeed's) inf/NaN gradients are the routine overflow steps the
scaler skips and recovers from by lowering its scale: the guard lets them pass and only the loss check stops those
runs.
"""

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from quill.errors import QuillError
from quill.output import write_json

FIX = (
    "lower learning_rate or set max_grad_norm; the last good checkpoint is kept and the stage resumes from it when "
    "re-run"
)


def any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is true on any rank (a no-op without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def _local_grads_finite(model) -> bool:
    grads = []
    for p in model.parameters():
        if p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP2: this rank's shard
            if grad.numel():
                grads.append(grad.detach())
    return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop the stage before a NaN/inf update is applied, so no checkpoint ever holds a diverged model.

    `attach(trainer)` (run_stage does it) installs the loss check around the trainer's backward pass."""

    def __init__(self):
        self.trainer = None
        self.step = 0

    def attach(self, trainer) -> None:
        self.trainer = trainer
        accelerator = trainer.accelerator
        backward = accelerator.backward

        def checked_backward(loss, **kwargs):
            bad = not bool(torch.isfinite(loss.detach()).all())
            if any_rank(bad, loss.device):
                raise QuillError(f"loss became NaN or inf at step {self.step + 1}", FIX)
            return backward(loss, **kwargs)

        accelerator.backward = checked_backward

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        if trainer is None:  # not attached (a trainer built outside run_stage): check what we can see
            bad = not _local_grads_finite(model)
        elif trainer.is_deepspeed_enabled:
            engine = trainer.model_wrapped
            # The engine has stepped already (inside backward); fp16's loss scaler skips overflow steps routinely.
            bad = not engine.fp16_enabled() and not engine.was_step_applied()
        elif trainer.accelerator.scaler is not None:
            return  # torch's GradScaler skips inf/NaN steps and lowers its scale: a routine overflow
        else:
            bad = not _local_grads_finite(model)
        device = trainer.accelerator.device if trainer is not None else "cpu"
        if any_rank(bad, device):
            raise QuillError(f"gradients became NaN or inf at step {state.global_step + 1}", FIX)


class CheckpointHygiene(TrainerCallback):
    """Checkpoints keep no pickled arguments: `training_args.bin` becomes `training_args.json` (tokens redacted)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (ckpt / "training_args.bin").unlink(missing_ok=True)
            if ckpt.is_dir():
                write_json(ckpt / "training_args.json", json.loads(args.to_json_string()))
