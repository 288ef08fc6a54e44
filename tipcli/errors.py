"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class TipError(Exception):
    """A problem with the user's input or files, with a message that says how to fix it."""


class ConfigError(TipError):
    """One or more invalid settings; the message lists all of them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
