"""Run a Quill stage with a callback that records, on every rank, whether the parameters are sharded DTensors.

    accelerate launch --config_file X tests/sharding_probe.py STAGE [stage arguments ...]

Each rank writes `$QUILL_PROBE_DIR/rank<R>.json` at every optimizer step: the parameter classes, each parameter's
local (this rank's shard) and full shapes, and how much of the data this process read itself (packed rows it drew
from a training stream, sources it opened). Test-only: the stage runs unchanged apart from the extra callback and
those counters.
"""

import importlib
import json
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

READ = {"stream_rows": 0, "streams_opened": 0}


class ShardingProbe(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        params = dict(model.named_parameters())
        record = {
            "step": state.global_step,
            "model_class": type(model).__name__,
            "dtensor": {name: isinstance(p, DTensor) for name, p in params.items()},
            "local_shapes": {
                name: list(p.to_local().shape if isinstance(p, DTensor) else p.shape) for name, p in params.items()
            },
            "full_shapes": {name: list(p.shape) for name, p in params.items()},
            "read": dict(READ),
        }
        out = Path(os.environ["QUILL_PROBE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))


def count_reads() -> None:
    import quill.data.streaming as streaming
    import quill.stages.common as common

    iterate, load_stream = streaming.PackedStream.__iter__, common.load_stream

    def counted_iter(self):
        for row in iterate(self):
            READ["stream_rows"] += 1
            yield row

    def counted_load_stream(*args, **kwargs):
        READ["streams_opened"] += 1
        return load_stream(*args, **kwargs)

    streaming.PackedStream.__iter__ = counted_iter
    common.load_stream = counted_load_stream


def main() -> None:
    stage, argv = sys.argv[1], sys.argv[2:]
    count_reads()
    module = importlib.import_module(f"quill.stages.{stage}")
    start_stage = module.start_stage

    def probed_start_stage(*args, **kwargs):
        started = start_stage(*args, **kwargs)
        started.callbacks.append(ShardingProbe())
        return started

    module.start_stage = probed_start_stage
    module.main(argv)


if __name__ == "__main__":
    main()
