"""The errors users see, and how a Quill process exits.

A QuillError is bad input or a fault we anticipated. Its message names the problem and the fix, e.g.
``QuillError("sft.yaml: unknown key 'learning_rat'", fix="did you mean 'learning_rate'?")``. `run_guarded` is the
exit policy of every Quill process (the CLI, each stage, each tool): a QuillError prints one line and exits 2,
anything else one line and exit 1 (the traceback only with --debug / QUILL_DEBUG=1), Ctrl-C exits 130. Secrets
found in the environment (Hub tokens) are blanked out of every message first.
"""

import difflib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
DEBUG_ENV = "QUILL_DEBUG"
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # the Hub token travels only through the environment
SECRET_KEYS = ("hub_token",)  # options that would carry a secret: refused on the command line
# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": a stage stopped by SIGTERM/SIGUSR1 at a
# saved checkpoint (quill.stages.guards). Not 1 (a crash), 2 (a QuillError), 130 (Ctrl-C) or a kill's code, so a
# scheduler or `quill run` can tell "requeue me".
PREEMPTED_EXIT = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what clusters send before they stop a job (SLURM: --signal)


class QuillError(Exception):
    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}; fix: {fix}")


class StageFailed(QuillError):
    """A stage process failed and printed its own `error:` line: the runner adds what to do next, not a second error."""

    def __init__(self, problem: str, fix: str, returncode: int):
        super().__init__(problem, fix)
        self.returncode = returncode


def one_line(err: BaseException | str, limit: int | None = 300) -> str:
    """An error message on one line (whitespace collapsed), cut at `limit` characters; its type if it is empty."""
    text = redact(" ".join(str(err).split())) or (type(err).__name__ if isinstance(err, BaseException) else "")
    return text if limit is None or len(text) <= limit else text[:limit] + " ..."


# ---------------------------------------------------------------------------------------------------------------


def unknown_key_error(key: str, valid: Sequence[str] | dict, where: str, what: str = "key") -> QuillError:
    fix = did_you_mean(key, list(valid)) or "run the stage with --help to list the valid keys"
    return QuillError(f"{where}: unknown {what} '{key}'", fix)


def did_you_mean(word: str, choices: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in choices}
    if word.lower() in lower:
        return f"did you mean '{lower[word.lower()]}'?"
    guess = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{guess[0]}'?" if guess else None


def nearby_file_hint(p: Path) -> str:
    if p.parent.is_dir():
        names = [c.name for c in p.parent.iterdir() if c.suffix in (".yaml", ".yml")]
        guess = difflib.get_close_matches(p.name, names, n=1, cutoff=0.6)
        if guess:
            return f"did you mean '{p.parent / guess[0]}'?"
    return "check the path (relative paths start from the current directory)"


def display_path(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def redact(text: str) -> str:
    """`text` with every secret the environment holds replaced by '***'."""
    for name in SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 8:  # a short value would blank ordinary words
            text = text.replace(secret, "***")
    return text


def debug_enabled(debug: bool | None = None) -> bool:
    if debug is not None:
        return debug
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def run_guarded(fn: Callable[[], T], debug: bool | None = None) -> T:
    """Runs fn; turns every exception into one line on stderr and an exit code (SystemExit passes through).

    With debug (None: read QUILL_DEBUG when the error happens, so a `--debug` parsed inside fn still counts) the
    traceback is printed first.
    """
    try:
        return fn()
    except SystemExit:
        raise
    except StageFailed as e:
        print(f"quill: {one_line(e, limit=None)}", file=sys.stderr, flush=True)
        raise SystemExit(e.returncode) from None
    except QuillError as e:
        _fail(one_line(e, limit=None), 2, debug)
    except KeyboardInterrupt:
        _fail("interrupted", 130, debug, show_traceback=False)
    except Exception as e:
        message = f"{type(e).__name__}: {one_line(e, limit=500)}"
        if not debug_enabled(debug):
            message += " (run with --debug for the traceback)"
        _fail(message, 1, debug)
    raise AssertionError("unreachable")


def _fail(message: str, code: int, debug: bool | None, show_traceback: bool = True) -> None:
    sys.stdout.flush()
    tqdm = sys.modules.get("tqdm.std")  # a progress bar mid-redraw would share the error's line: end it first
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    if show_traceback and debug_enabled(debug):
        traceback.print_exc()
    # Under a multi-process launcher every rank reports; say which one.
    world = os.environ.get("WORLD_SIZE", "1")
    prefix = f"[rank {os.environ.get('RANK', '?')}] " if world.isdigit() and int(world) > 1 else ""
    print(f"{prefix}error: {redact(message)}", file=sys.stderr, flush=True)
    raise SystemExit(code)
