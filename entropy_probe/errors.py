"""User-facing errors: one line that names the problem and the fix."""


class ProbeError(Exception):
    """An error caused by the user's input. The CLI prints it as one line and exits with code 2."""

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem} — {fix}"
        super().__init__(" ".join(message.split()))
