"""A stage that trains nothing, for the runner and CLI tests: it sleeps `seconds`, raises if `crash`, else records
the arguments it was given in args.json and marks its folder done. Tests copy it into a recipe folder and name it
with `module: fake_stage`; fake stages of other shapes import from it."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from quill.arguments import ModelArguments, OutputArguments
from quill.errors import run_guarded
from quill.options import parse_stage_args
from quill.output import mark_done as mark_stage_done


@dataclass
class FakeArguments:
    learning_rate: float = 1e-3
    seconds: float = 0.0  # how long it "trains"
    crash: bool = False


ARG_TYPES = (FakeArguments, ModelArguments, OutputArguments)


def train(fake, model, output, *rest):
    time.sleep(fake.seconds)
    if fake.crash:
        raise RuntimeError("boom")
    out = Path(output.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen = {
        "learning_rate": fake.learning_rate,
        "model": model.model_name_or_path,
        "tokenizer": model.tokenizer_name_or_path,
        "overwrite": output.overwrite,
    }
    if rest:
        seen["reward_model"] = rest[0].reward_model_path
    (out / "args.json").write_text(json.dumps(seen))
    (out / "metrics.json").write_text("{}")
    mark_stage_done(out, {"seen": seen})
    return {}


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
