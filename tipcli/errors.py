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


def interrupted(command: str, cfg) -> str:
    """What Ctrl-C leaves behind, and how to go on (``cfg``: the command's config, or None
    when it was interrupted before one existed)."""
    out = getattr(cfg, "output", "")
    if command == "train" and out:
        how = ("run the same command with --resume to continue from its last checkpoint"
               if cfg.save_every else "no checkpoint was saved (--save-every 0); start again "
               "with --overwrite")
        return f"interrupted: {out} is kept unfinished; {how}"
    if command in ("rollout", "score", "select", "distill", "demo", "student") and out:
        return (f"interrupted: {out} keeps everything that was complete; run the same command "
                "again to resume")
    return "interrupted: nothing was written"
