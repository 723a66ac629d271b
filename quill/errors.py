"""The one error type users see.

A QuillError is bad input or a fault we anticipated: the CLI prints its message as a single line
(no traceback unless --debug) and exits non-zero. Messages name the problem and the fix, e.g.
``QuillError("sft.yaml: unknown key 'learning_rat'", fix="did you mean 'learning_rate'?")``.
"""


class QuillError(Exception):
    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}; fix: {fix}")


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if it has none): fits a one-line QuillError."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
