"""`quill`: run a recipe, a single stage, or the tools around them.

    quill run RECIPE_DIR [--output-dir D] [--from S] [--until S] [--overwrite] [--accelerate-config X] [key=value ...]
    quill <stage> --config FILE [key=value ...]     stage: tokenizer, pretrain, sft, dpo, reward, rl
    quill eval | report | chat ...                 quill.evaluation / quill.report / quill.chat
    quill --debug <command> ...                    full tracebacks (same as QUILL_DEBUG=1, which stages inherit)

Errors a user can fix (QuillError) print as one line and exit 2; anything else prints one line and exits 1, with the
traceback only under --debug; Ctrl-C exits 130.
"""

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from quill.errors import QuillError

T = TypeVar("T")

STAGE_NAMES = ("tokenizer", "pretrain", "sft", "dpo", "reward", "rl")  # same list as quill.recipe
TOOLS = {"eval": "quill.evaluation", "report": "quill.report", "chat": "quill.chat"}
DEBUG_ENV = "QUILL_DEBUG"

USAGE = __doc__.split("\n\n")[1]


def debug_enabled(debug: bool | None = None) -> bool:
    if debug is not None:
        return debug
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def run_guarded(fn: Callable[[], T], debug: bool | None = None) -> T:
    """Runs fn; turns every exception into one line on stderr and an exit code (SystemExit passes through).

    QuillError -> exit 2, KeyboardInterrupt -> 130, anything else -> 1. With debug (None: read QUILL_DEBUG when the
    error happens, so a `--debug` parsed inside fn still counts) the traceback is printed first.
    """
    try:
        return fn()
    except SystemExit:
        raise
    except QuillError as e:
        _fail(" ".join(str(e).split()), 2, debug)  # one line even if a message was built with newlines
    except KeyboardInterrupt:
        _fail("interrupted", 130, debug, show_traceback=False)
    except Exception as e:
        text = " ".join(str(e).split())
        if len(text) > 500:
            text = text[:500] + " ..."
        message = f"{type(e).__name__}: {text}" if text else type(e).__name__
        if not debug_enabled(debug):
            message += " (run with --debug for the traceback)"
        _fail(message, 1, debug)
    raise AssertionError("unreachable")


def _fail(message: str, code: int, debug: bool | None, show_traceback: bool = True) -> None:
    sys.stdout.flush()
    if show_traceback and debug_enabled(debug):
        traceback.print_exc()
    # Under a multi-process launcher every rank reports; say which one.
    world = os.environ.get("WORLD_SIZE", "1")
    prefix = f"[rank {os.environ.get('RANK', '?')}] " if world.isdigit() and int(world) > 1 else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


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
        raise QuillError("no command given", "e.g. quill run recipes/tiny (quill --help lists the commands)")
    command, rest = argv[0], argv[1:]
    if command == "run":
        _run(rest)
    elif command in STAGE_NAMES:
        _delegate(f"quill.stages.{command}", f"quill {command}", rest)
    elif command in TOOLS:
        _delegate(TOOLS[command], f"quill {command}", rest)
    else:
        from quill.config import did_you_mean

        fix = did_you_mean(command, ["run", *STAGE_NAMES, *TOOLS]) or "quill --help lists the commands"
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
    p.add_argument("recipe", help="recipe folder (with recipe.yaml), or the name of one in recipes/")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="option for every stage that takes it; stage.key=value for one stage",
    )
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", help="run folder (default: the recipe's)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="start at this stage (earlier ones must be done)")
    p.add_argument("--until", dest="until_stage", metavar="STAGE", help="stop after this stage")
    p.add_argument("--overwrite", action="store_true", help="redo finished stages from scratch")
    p.add_argument(
        "--accelerate-config",
        "--accelerate_config",
        dest="accelerate_config",
        metavar="FILE",
        help="run every stage under accelerate launch with this config (a file or a name in "
        "recipes/accelerate/, e.g. cpu_ddp)",
    )
    p.add_argument("--debug", action="store_true", help="full tracebacks, here and in the stages")
    return p


def _run(argv: list[str]) -> None:
    args = _run_parser().parse_intermixed_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    from quill.recipe import run_recipe

    run_recipe(
        args.recipe,
        output_dir=args.output_dir,
        from_stage=args.from_stage,
        until_stage=args.until_stage,
        overrides=args.overrides,
        overwrite=args.overwrite,
        debug=debug_enabled(),
        accelerate_config=args.accelerate_config,
    )


def _delegate(module_name: str, prog: str, argv: list[str]) -> Any:
    """Imports `module_name` lazily and calls its main(argv); a module not written yet is a clear error."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise QuillError(
                f"'{prog}' is not available: {module_name} does not exist", "check the command name"
            ) from None
        raise
    entry = getattr(module, "main", None)
    if not callable(entry):
        raise QuillError(f"'{prog}' is not available: {module_name} has no main()", "check the command name")
    sys.argv = [prog, *argv]  # so --help and argparse-based tools show `quill <command>`
    rc = entry(argv)
    if isinstance(rc, int) and rc:
        raise SystemExit(rc)
    return rc


if __name__ == "__main__":
    main()
