"""Where a stage may write, and what ``--overwrite`` may delete.

Rules, checked before anything is written:

- the output is a directory (or does not exist yet) whose parent is a directory;
- it is not one of the run's inputs (a stage directory, a model, a prompts file) nor a
  folder holding one;
- a non-empty output holds a run tip wrote (its ``manifest.json``); anything else is
  refused, with or without ``--overwrite``;
- ``--overwrite`` deletes only the files and folders that stage writes
  (``tipcli.store.layout``), never the working directory, the home directory or ``/``; if the
  directory holds anything else, it is refused and nothing is deleted.

Report files (``--json``, ``--png``, ``--export``) must go into an existing directory
that is not a stage directory, and not onto a directory.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from tipcli.errors import TipError
from tipcli.store.layout import (
    HIDDEN_TMP,
    LEGACY_EVAL_SUMMARY,
    MANIFEST,
    RESULTS,
    SHARD,
    STAGES,
    pattern,
)

UNKNOWN = (MANIFEST, pattern(SHARD))  # a manifest torn by a crash: still tip's directory


def real(path: str | Path) -> Path:
    """``path`` with symlinks resolved; a one-line error for a symlink loop."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # a loop: RuntimeError before 3.13, then OSError
        raise TipError(f"{path} cannot be resolved ({exc}); choose another path") from None


def written_stage(path: Path) -> str | None:
    """The stage of the run tip wrote into ``path``, if any."""
    mpath = path / MANIFEST
    if mpath.is_file():
        try:
            m = json.loads(mpath.read_text())
        except (ValueError, OSError):
            return "unknown"  # a manifest torn by a crash: still tip's directory
        return m.get("stage", "unknown") if isinstance(m, dict) else None
    if (path / LEGACY_EVAL_SUMMARY).is_file() and (path / RESULTS).is_file():
        return "eval"  # an evaluation tip 0.1 wrote
    return None


def check_output(path: str | Path, stage: str, inputs: Iterable[str | Path | None] = (),
                 overwrite: bool = False) -> None:
    """Refuse ``path`` as the output of ``stage`` where the rules above say so; changes
    nothing (stages call it before loading any model)."""
    path = Path(path)
    target = real(path)
    if path.exists() and not path.is_dir():
        raise TipError(f"output {path} exists and is not a directory; choose another -o")
    for up in target.parents:
        if up.exists() and not up.is_dir():
            raise TipError(f"output {path} is inside {up}, which is a file; choose another -o")
        if up.exists():
            break
    for given in inputs:
        if not given or not Path(given).exists():  # a hub id is no local path
            continue
        source = real(given)
        if target == source or target in source.parents:
            what = "is" if target == source else "holds"
            raise TipError(f"output {path} {what} this run's input {given}; choose another -o "
                           "(nothing was written)")
    if not path.is_dir() or not any(path.iterdir()):
        return
    found = written_stage(path)
    if found is None:
        raise TipError(f"output directory {path} is not empty and holds no run written by tip; "
                       "choose another -o (nothing was deleted)")
    if overwrite:
        if target in {Path("/"), real(Path.home()), real(Path.cwd())}:
            raise TipError(f"--overwrite will not empty {path} (the working, home or root "
                           "directory); choose another -o")
        foreign = _foreign(path, found)
        if foreign:
            raise TipError(f"--overwrite would delete {path / foreign[0]}, which tip did not "
                           f"write ({len(foreign)} such entries); move it away or choose "
                           "another -o (nothing was deleted)")


def prepare_output(path: str | Path, stage: str, inputs: Iterable[str | Path | None] = (),
                   overwrite: bool = False) -> Path:
    """``check_output``, then with ``overwrite`` empty the directory of what tip wrote."""
    check_output(path, stage, inputs, overwrite)
    path = Path(path)
    if overwrite and path.is_dir():
        found = written_stage(path)
        for e in path.iterdir() if found else ():
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink()
    return path


def _foreign(path: Path, stage: str) -> list[str]:
    """Entries of ``path`` that ``stage`` does not write."""
    known = STAGES.get(stage)
    patterns = known.patterns if known else (*UNKNOWN, HIDDEN_TMP)
    return sorted(e.name for e in path.iterdir()
                  if not any(fnmatch.fnmatch(e.name, p) for p in patterns))


def check_output_file(path: str | Path, flag: str,
                      stage_dirs: Iterable[str | Path] = ()) -> Path:
    """A file a command writes (``--json FILE``): its folder exists and is no stage
    directory, and it is not itself a directory."""
    path = Path(path)
    if path.is_dir():
        raise TipError(f"{flag} {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise TipError(f"{flag} {path}: the folder {parent} does not exist; create it first")
    where = real(parent)
    if written_stage(parent) is not None or any(where == real(d) for d in stage_dirs):
        raise TipError(f"{flag} {path} would write into the stage directory {parent}; "
                       "choose a file outside it")
    if path.exists() and not os.access(path, os.W_OK):
        raise TipError(f"{flag} {path} is not writable")
    return path
