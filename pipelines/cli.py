"""`quill`: run a recipe, a single stage, or one of the tools around them.

    quill run RECIPE [--output-dir D] [--from S] [--until S] [--overwrite] [--accelerate-config X] [--smoke] [k=v ...]
    quill <stage> --config FILE [key=value ...]     stage: tokenizer, pretrain, sft, dpo, reward, rl
    quill eval | report | chat | serve | attention ...   quill.tools.<command> (each has --help)
    quill --debug <command> ...                    full tracebacks (same as QUILL_DEBUG=1, which stages inherit)

RECIPE is a recipe folder or the name of a shipped one (`tiny`, `gpt2-124m`). Errors a user can fix print as one
line and exit 2; anything else prints one line and exits 1 (quill.errors.run_guarded).
"""

import argparse
import importlib
import os
import sys

from quill.errors import DEBUG_ENV, QuillError, debug_enabled, did_you_mean, run_guarded
from quill.stages import STAGES, stage_module

TOOLS = {
    "eval": "quill.tools.eval",
    "report": "quill.tools.report",
    "chat": "quill.tools.chat",
    "serve": "quill.tools.serve",
    "attention": "quill.tools.attention",
}
USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_guarded(lambda: _dispatch(argv))


def _dispatch(argv: list[str]) -> None:
    while argv and argv[0].startswith("-"):
        flag = argv.pop(0)
        if flag == "--debug":
            os.environ[DEBUG_ENV] = "1"  # inherited by stage subprocesses
        elif flag in ("-h", "--help"):
            print(f"usage:\n{USAGE}")
            return
        elif flag == "--version":
            from importlib.metadata import version

            print(f"quill {version('quill')}")
            return
        else:
            raise QuillError(f"unknown option {flag}", "quill --help lists the commands and their options")
    if not argv:
        raise QuillError("no command given", "e.g. quill run tiny (quill --help lists the commands)")
    command, rest = argv[0], argv[1:]
    if command == "run":
        _run(rest)
    elif command in STAGES or command in TOOLS:
        module = importlib.import_module(stage_module(command) if command in STAGES else TOOLS[command])
        sys.argv = [f"quill {command}", *rest]  # so --help and argparse-based tools show `quill <command>`
        module.main(rest)
    else:
        fix = did_you_mean(command, ["run", *STAGES, *TOOLS]) or "quill --help lists the commands"
        raise QuillError(f"unknown command '{command}'", fix)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a one-line QuillError instead of usage text plus exit 2."""

    def error(self, message: str) -> None:
        fix = f"{self.prog} --help shows the usage"
        if "unrecognized arguments" in message:
            fix = "pass stage options as key=value, e.g. learning_rate=1e-4, or sft.learning_rate=1e-4 for one stage"
        raise QuillError(f"{self.prog}: {message}", fix)


def _run_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="quill run",
        allow_abbrev=False,
        description="Run a recipe's stages in order; finished stages are skipped, interrupted ones resume.",
    )
    p.add_argument("recipe", help="recipe folder (with recipe.yaml), or the name of a shipped one (tiny, gpt2-124m)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="option for every stage that takes it; stage.key=value for one stage",
    )
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", help="run folder (default: the recipe's)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="start at this stage (earlier ones must be done)")
    p.add_argument("--until", dest="until_stage", metavar="STAGE", help="stop after this stage")
    p.add_argument("--overwrite", action="store_true", help="redo the selected stages from scratch")
    p.add_argument(
        "--accelerate-config",
        "--accelerate_config",
        dest="accelerate_config",
        metavar="FILE",
        help="run every stage under accelerate launch with this config (a file, or a shipped name: "
        "cpu, cpu_ddp, single_gpu, multi_gpu, fsdp2, deepspeed_zero2, deepspeed_zero3, multi_node)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="check that the recipe runs end to end, not a training run: every stage for 2 steps at tiny size as "
        "one CPU process, each dataset capped at 64 rows (read before more is downloaded), into <output_dir>-smoke",
    )
    p.add_argument("--debug", action="store_true", help="full tracebacks, here and in the stages")
    return p


def _run(argv: list[str]) -> None:
    args = _run_parser().parse_intermixed_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    from quill.runner import run_recipe

    run_recipe(
        args.recipe,
        output_dir=args.output_dir,
        from_stage=args.from_stage,
        until_stage=args.until_stage,
        overrides=args.overrides,
        overwrite=args.overwrite,
        debug=debug_enabled(),
        accelerate_config=args.accelerate_config,
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
