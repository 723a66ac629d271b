"""What a stage does differently when its model is spread over processes: FSDP2 on CPU, the final full-model save
under FSDP and ZeRO-3, and a held-out loss that does not depend on how rows fall on ranks.

- accelerate 1.15 turns FSDP on only for accelerator devices: on CPU its state says MULTI_CPU and the Trainer wraps
  the model in DDP, silently (`accelerate launch` with an FSDP config plus `use_cpu`). `enable_fsdp_on_cpu` makes
  such a launch shard for real (torch's `fully_shard` trains over gloo), so CPU runs exercise the FSDP code paths.
- The final save gathers full weights whatever the checkpoint format: FSDP's state dict type is switched to
  FULL_STATE_DICT (as TRL's scripts do) and ZeRO-3 gathers its 16-bit weights, so a recipe can keep fast sharded
  checkpoints and still finish with a loadable `model.safetensors`.
- `eval_loss` is a global token-weighted mean (see its docstring for what transformers 5 does instead).
- A dead process (`watch_ranks`): every collective gives up after `ddp_timeout` seconds (transformers passes that
  timeout on for GPU launches only, so CPU runs waited gloo's 30 minutes), and a failed collective becomes one line
  naming the rank that died, instead of gloo's "Connection reset by peer [127.0.0.1]:38064".
"""

import contextlib
import json
import math
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch


def enable_fsdp_on_cpu() -> bool:
    """Under a CPU launch with an FSDP config (ACCELERATE_USE_FSDP=true, several processes over gloo), set
    accelerate's state to FSDP before the Trainer builds its Accelerator. Returns whether it did."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or torch.cuda.is_available():
        return False
    from accelerate.state import AcceleratorState, DistributedType, PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin, TorchDynamoPlugin

    if PartialState().distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` sets from the config
    state = AcceleratorState(_from_accelerator=True, fsdp_plugin=plugin, dynamo_plugin=TorchDynamoPlugin())
    # What AcceleratorState does for GPUs: FSDP on both states (a later Accelerator copies PartialState's type).
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


@contextlib.contextmanager
def own_class(model):
    """FSDP2 swaps a sharded module's class for a generated `FSDP<Name>` subclass; saved as is, `save_pretrained`
    copies torch's FSDP source files as the model's code and writes `_fsdp_init.FSDP<Name>` into config.json's
    auto_map. During the block the model has its own class back."""
    from torch.distributed.fsdp import FSDPModule

    swapped = type(model)
    if not isinstance(model, FSDPModule):
        yield model
        return
    model.__class__ = next(c for c in swapped.__mro__[1:] if not issubclass(c, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = swapped


def save_full_model(trainer, folder: Path) -> None:
    """Every process calls this: the full weights are gathered (FSDP, ZeRO-3) and written on the main process."""
    accelerator = trainer.accelerator
    if trainer.is_deepspeed_enabled:
        engine = trainer.model_wrapped
        # ZeRO-3 gathers the partitioned weights only when its config says so; the final model always needs them.
        engine._config.zero_config.gather_16bit_weights_on_model_save = True
        # As Trainer.save_model does, but its ZeRO-2 state dict is cloned tensor by tensor (deepspeed's
        # clone_tensors_for_torch_save), so tied weights lose their shared storage: _save_gathered drops the copies.
        _save_gathered(accelerator, accelerator.unwrap_model(trainer.model), accelerator.get_state_dict(engine), folder)
        return
    if not trainer.is_fsdp_enabled:
        trainer.save_model(str(folder))
        return
    plugin = accelerator.state.fsdp_plugin
    plugin.set_state_dict_type("FULL_STATE_DICT")  # a sharded state dict would save no model files
    if getattr(plugin, "fsdp_version", 1) != 2:
        trainer.save_model(str(folder))
        return
    state_dict = accelerator.get_state_dict(trainer.model)  # a collective: every rank takes part
    with own_class(trainer.model) as model:
        _save_gathered(accelerator, model, state_dict, folder)


def _save_gathered(accelerator, model, state_dict: dict, folder: Path) -> None:
    """Write a gathered state dict on the main process. Gathered tensors share no storage, so save_pretrained would
    keep both sides of a tied pair (lm_head beside the embedding): the tied copy is dropped, as a plain save does."""
    if not accelerator.is_main_process:
        return
    for tied, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if tied in state_dict and source in state_dict and torch.equal(state_dict[tied], state_dict[source]):
            del state_dict[tied]
    model.save_pretrained(folder, state_dict=state_dict)


def eval_loss(trainer) -> float:
    """Held-out loss of `trainer.eval_dataset`: a token-weighted mean over all its rows, the same on one process or
    many (up to float summation order), computed with the trainer's own collator and `compute_loss`.

    transformers 5's `evaluate()` averages token counts across ranks and repeats each rank's batch loss by the
    configured batch size before `gather_for_metrics` drops the padding rows, which weights ranks unequally: two
    CPU processes reported 6.31 where one process gave 6.19 on the same weights. Here row i is scored on rank
    i % world (no row twice), each rank sums loss x tokens and tokens, and the sums are all-reduced. Every rank runs
    the same number of forward passes, because FSDP and ZeRO-3 gather weights inside forward: a rank out of rows
    scores a row with weight 0.
    """
    loader = trainer.get_eval_dataloader()  # the dataset with unused columns removed, and the stage's collator
    dataset, collate = loader.dataset, loader.collate_fn
    accelerator, size = trainer.accelerator, trainer.args.per_device_eval_batch_size
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(dataset), world))
    batches = math.ceil(math.ceil(len(dataset) / world) / size)
    device = accelerator.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # sum of loss x tokens, tokens
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(batches):
                rows, weight = mine[b * size : (b + 1) * size], 1.0
                if not rows:
                    rows, weight = [0], 0.0
                batch = collate([dataset[i] for i in rows])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                tokens = (batch["labels"][..., 1:] != -100).sum().double()
                loss = trainer.compute_loss(model, batch).detach().double()
                totals += weight * torch.stack([loss * tokens, tokens])
    finally:
        model.train(was_training)
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item()


# -- a process of the run dies --------------------------------------------------------------------------------------

EXIT_GRACE = 5.0  # seconds a rank whose collective failed may take to finish exiting before it counts as alive
RANK_KEY = "quill/rank/{}"  # the store the launcher hosts outlives any worker: where each rank says where it runs


def watch_ranks(trainer) -> None:
    """Before `trainer.train()` on every rank of a multi-process run: bound every collective by the run's
    `ddp_timeout`, record where this rank runs (host, pid) in the process group's store, and make a collective that
    fails because another rank died raise a QuillError that names it (the launcher stops the other ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    from torch.distributed.distributed_c10d import _get_default_store, _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=trainer.args.ddp_timeout))
    store, rank, world = _get_default_store(), dist.get_rank(), dist.get_world_size()
    store.set(RANK_KEY.format(rank), json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    train = trainer.train

    def watched_train(*args, **kwargs):
        try:
            return train(*args, **kwargs)
        except (RuntimeError, dist.DistError) as err:  # gloo raises RuntimeError, NCCL DistBackendError
            named = dead_rank_error(err, trainer, store, rank, world)
            if named is None:
                raise
            raise named from err

    trainer.train = watched_train


def dead_rank_error(err: Exception, trainer, store, rank: int, world: int):
    """A QuillError naming the ranks that died, if `err` is a collective that failed because some did; else None."""
    import torch.distributed as dist

    from quill.errors import QuillError, one_line
    from quill.output import checkpoints, is_complete_checkpoint

    if not isinstance(err, dist.DistError) and not any(w in str(err) for w in ("gloo", "NCCL", "ProcessGroup")):
        return None  # not a collective (gloo's errors name their source file): the error speaks for itself
    local, silent = {}, []
    for other in (r for r in range(world) if r != rank):
        try:
            where = json.loads(store.get(RANK_KEY.format(other)))
        except Exception:  # the store went with the process that hosted it
            silent.append(other)
            continue
        if where["host"] == socket.gethostname():
            local[other] = where["pid"]
        else:  # a process of another machine cannot be seen from here: it counts as silent, not dead
            silent.append(other)
    # A killed rank's sockets close while the kernel still tears the process down, so the collective can fail a
    # moment before the process shows as exited: give it EXIT_GRACE seconds to finish dying (CI once caught it alive).
    deadline = time.monotonic() + EXIT_GRACE
    while any(_alive(pid) for pid in local.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    dead = sorted(r for r, pid in local.items() if not _alive(pid))
    silent = sorted(silent + [r for r in local if r not in dead])
    folder = Path(trainer.args.output_dir).parent
    complete = [p.name for p in checkpoints(folder) if is_complete_checkpoint(p)]
    resume = f"it resumes from {complete[-1]}" if complete else "no checkpoint was complete, so it starts over"
    step = trainer.state.global_step
    if dead:
        names = ", ".join(str(r) for r in dead)
        problem = f"rank {names} of this {world}-process run died during training (step {step})"
    else:  # every process is alive (or out of sight): one stopped answering within the timeout
        problem = (f"a collective on rank {rank} of {world} failed during training (step {step}) and no rank has "
                   f"died: rank {', '.join(map(str, silent))} did not answer within ddp_timeout="
                   f"{trainer.args.ddp_timeout} s ({one_line(err, 160)})")  # fmt: skip
    return QuillError(problem, f"see that rank's log for why; re-run the same command: {resume}")


def _alive(pid: int) -> bool:
    """Whether process `pid` of this machine runs (a zombie, dead but not yet reaped by the launcher, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
