"""Training guards every stage installs: stop on a non-finite loss or gradient on any backend, stop cleanly when the
job is preempted, keep checkpoints free of pickled arguments.

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

Preemption (SIGTERM from SLURM, Kubernetes or a launcher; SIGUSR1, which SLURM's `--signal` sends ahead of time):
the stage finishes the optimizer step under way, saves a checkpoint with the Trainer's own save (so the re-run
resumes exactly as after a kill) and exits with PREEMPTED_EXIT, printing one line that says how to resume.
"""

import json
import signal
import sys
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from quill.errors import PREEMPT_SIGNALS, PREEMPTED_EXIT, QuillError
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


# -- preemption --------------------------------------------------------------------------------------------------


def _save_period(args) -> int:
    """Optimizer steps between points a checkpoint resumes exactly from: GRPO's generation buffer spans
    steps_per_generation x num_iterations / gradient_accumulation_steps steps (quill.stages.rl); 1 elsewhere."""
    per_generation = getattr(args, "steps_per_generation", None)
    if not per_generation:
        return 1
    return max(1, round(per_generation * getattr(args, "num_iterations", 1) / args.gradient_accumulation_steps))


class StopOnPreemption(TrainerCallback):
    """On SIGTERM or SIGUSR1 while the trainer trains: finish the step, save a complete checkpoint, stop training;
    `exit_if_preempted` (run_stage calls it after `train()`) then exits with PREEMPTED_EXIT.

    The signal handler only records the signal, so later signals (a second SIGTERM during the save) change nothing:
    the step, the save and the checkpoint rotation always run to the end. Every rank takes part in one all-reduce of
    the flag per step (the launcher may signal only some ranks), so all ranks save the same step and stop together.
    Outside `train()` the previous handlers apply: before it nothing is lost, after it the finished folder is
    written crash-safely (quill.output), so a kill there resumes or completes on the re-run."""

    def __init__(self, stage: str):
        self.stage = stage
        self.signal: str | None = None  # the first signal received
        self.stopped_at: int | None = None  # the step whose checkpoint the stop saved
        self.previous: dict = {}

    def _record(self, signum, frame) -> None:
        self.signal = self.signal or signal.Signals(signum).name  # nothing else: this may run mid-save

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.previous = {sig: signal.signal(sig, self._record) for sig in PREEMPT_SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % _save_period(args):
            return  # inside a GRPO generation buffer: a checkpoint here would not resume the same run
        if any_rank(self.signal is not None, args.device):
            self.stopped_at = state.global_step
            control.should_save = control.should_training_stop = True
            control.should_evaluate = False  # the grace period is for the save, not for a mid-run evaluation

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped_at is None:  # trained to the end: signals mean what they meant before
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)


def exit_if_preempted(trainer) -> None:
    """After `trainer.train()`: if a preemption stopped it, say how to resume and exit with PREEMPTED_EXIT."""
    stop = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnPreemption)), None)
    if stop is None or stop.stopped_at is None:
        return
    trainer.accelerator.wait_for_everyone()  # the main process has written its part of the checkpoint
    for sig in PREEMPT_SIGNALS:  # from here on, more signals cannot change the outcome: ignored, not the default
        signal.signal(sig, signal.SIG_IGN)  # (Python restores a handler's default at exit, which would kill us)
    if trainer.accelerator.is_main_process:
        ckpt = Path(trainer.args.output_dir) / f"checkpoint-{stop.stopped_at}"
        print(
            f"[quill] {stop.stage}: stopped by {stop.signal} after step {stop.stopped_at}, checkpoint saved in {ckpt}; "
            f"run the same command again to resume from it (exit code {PREEMPTED_EXIT}: preempted)",
            file=sys.stderr,
            flush=True,
        )
    raise SystemExit(PREEMPTED_EXIT)
