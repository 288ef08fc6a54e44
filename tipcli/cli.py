"""The `tip` command line, generated from the stage configs in ``tipcli.configs``.

Each command's flags are its config's settings (type, default, range, choices and help
come from the fields); it resolves defaults < --config FILE < flags, calls one library
function and prints that stage's output directory as the last line of stdout (everything
else goes to stderr). Only the torch-free configs are imported here, so `tip --help` is
instant; a stage's module is imported when its command runs.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

import typer
from rich.markup import escape

try:  # typer >= 0.26 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

from tipcli import __version__
from tipcli.configs import STAGE_CONFIGS
from tipcli.errors import TipError, first_line, interrupted
from tipcli.settings import help_text, leaf_map, leaves, old_names, resolve

# command: the library function as "module:function", and its flags beyond the config's
# (each command's help is its config's docstring)
COMMANDS = {
    "rollout": ("tipcli.stages.rollout:run_rollout", ("overwrite",)),
    "score": ("tipcli.stages.score:run_score", ("overwrite",)),
    "select": ("tipcli.stages.select:run_select_cli", ("overwrite",)),
    "train": ("tipcli.stages.train:run_train_cli", ("overwrite", "resume")),
    "report": ("tipcli.stages.report:run_report_cli", ()),
    "eval": ("tipcli.stages.evaluate:run_eval_cli", ("overwrite",)),
    "distill": ("tipcli.stages.distill:run_distill", ("overwrite",)),
    "demo": ("tipcli.stages.demo:run_demo", ()),
    "student": ("tipcli.stages.student:run_student_cli", ("overwrite",)),
}
EXTRAS = {
    "config": typer.Option(None, "--config", help="Settings file (.json, .toml, .yaml; keys are "
                           "the flag names); flags override it."),
    "overwrite": typer.Option(False, "--overwrite", help="Replace an existing output directory "
                              "(one tip wrote) instead of resuming it."),
    "resume": typer.Option(False, "--resume", help="Continue an unfinished run in --output from "
                           "its latest checkpoint."),
}
EXTRA_TYPES = {"config": str | None, "overwrite": bool, "resume": bool}
OLD = "old__"  # the parameters of old flag names (see settings.old_names)
PANELS = {"sampling": "Sampling", "scoring": "Scoring", "selection": "Selection",
          "training": "Training", "optim": "Optimisation", "source": "Prompt records",
          "grading": "Grading", "runtime": "Models and devices"}


class Group(typer.core.TyperGroup):
    """Usage errors (unknown flag, a value of the wrong type) as one line, exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click_errors.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            fail(f"{exc.format_message()}{where}", exc.exit_code)
        except click_errors.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except typer.Abort:
            fail("interrupted", 130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(name="tip", cls=Group, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, help="On-policy distillation with "
                  "token-importance selection: rollout -> score -> select -> train -> report.")


def fail(message: str, code: int = 2) -> None:
    """One red line on stderr, then exit ``code``."""
    from tipcli.progress import console

    console.print(f"error: {' '.join(message.split())}", style="red", markup=False,
                  highlight=False, soft_wrap=True)
    sys.exit(code)


def _version(value: bool) -> None:
    if value:
        print(f"tip {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """On-policy distillation with token-importance selection."""


def _parameter(leaf) -> inspect.Parameter:
    base = next((a for a in getattr(leaf.type, "__args__", ()) if a is not type(None)),
                leaf.type)
    meta, help = leaf.meta, escape(help_text(leaf))
    panel = PANELS.get(leaf.path[0]) if len(leaf.path) > 1 else None
    if meta["argument"]:
        info = typer.Argument(..., metavar=meta["argument"], help=help, show_default=False)
    elif base is bool:  # a switch; one that is on by default can be turned off
        names = f"{leaf.flag}/--no-{leaf.flag[2:]}" if leaf.default else leaf.flag
        info = typer.Option(None, names, help=help, show_default=False, rich_help_panel=panel)
    else:
        names = [leaf.flag] + ([meta["short"]] if meta["short"] else [])
        info = typer.Option(None, *names, help=help, show_default=False, rich_help_panel=panel)
    annotation = str if meta["argument"] else list[str] | None if meta.get("many") else \
        base | None
    return inspect.Parameter(leaf.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=annotation)


def _old_parameter(name: str, leaf) -> inspect.Parameter:
    """A hidden flag under a setting's old name (tip 0.1's), read for one more release."""
    base = next((a for a in getattr(leaf.type, "__args__", ()) if a is not type(None)),
                leaf.type)
    info = typer.Option(None, "--" + name.replace("_", "-"), hidden=True)
    return inspect.Parameter(OLD + name, inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=base | None)


def _register(name: str, target: str, extras: tuple[str, ...]) -> None:
    cls = STAGE_CONFIGS[name]
    args = [leaf.name for leaf in leaves(cls) if leaf.meta["argument"]]
    many = [leaf.name for leaf in leaves(cls) if leaf.meta.get("many")]

    def command(**kw: Any) -> None:
        from tipcli.progress import emit_path
        from tipcli.store.files import read_path_arg

        run_kw = {k: kw.pop(k) for k in extras}
        for leaf in many:  # a flag given once is its string
            if isinstance(kw.get(leaf), list):
                kw[leaf] = kw[leaf][0] if len(kw[leaf]) == 1 else (kw[leaf] or None)
        config, cfg = kw.pop("config"), None
        old = {k.removeprefix(OLD): kw.pop(k) for k in list(kw) if k.startswith(OLD)}
        kw.update({k: v for k, v in old.items() if v is not None})  # resolve maps them
        try:
            kw.update({a: str(read_path_arg(kw[a])) for a in args})
            cfg = resolve(cls, config, **kw)
            module, func = target.split(":")
            out = getattr(importlib.import_module(module), func)(cfg, **run_kw)
        except TipError as exc:
            fail(str(exc))
        except OSError as exc:  # a full disk, a read-only folder, ...
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or first_line(exc)}; what was complete is kept, so "
                 "fix that and run the same command again")
        except KeyboardInterrupt:
            fail(interrupted(name, cfg), 130)
        if os.environ.get("RANK", "0") == "0":  # one line, also under a launcher
            emit_path(out)

    params = [_parameter(leaf) for leaf in leaves(cls)]
    params += [_old_parameter(name, leaf_map(cls)[new]) for name, new in old_names(cls).items()]
    params += [inspect.Parameter(e, inspect.Parameter.KEYWORD_ONLY, default=EXTRAS[e],
                                 annotation=EXTRA_TYPES[e]) for e in ("config", *extras)]
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    text = " ".join((cls.__doc__ or "").split()).split(": ", 1)[-1]
    command.__doc__ = text[:1].upper() + text[1:]
    app.command(name)(command)


for _name, (_target, _extras) in COMMANDS.items():
    _register(_name, _target, _extras)


def main() -> None:
    try:
        app(prog_name="tip")
    except SystemExit as exc:
        _leave_launched(exc.code)
        raise


def _leave_launched(code: object) -> None:
    """Under a launcher, end the process without tearing the process group down: gloo's
    threads, destroyed at interpreter exit, now and then abort a finished process
    ("terminate called without an active exception", exit -6), and the launcher then
    reports a complete run as failed. After a success every process waits for the others,
    so none leaves while another still talks to it."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if status == 0:
        dist.barrier()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
