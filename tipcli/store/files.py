"""Small file helpers every stage uses: checksums, atomic writes, piped input paths."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tipcli.errors import TipError, first_line


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to a hidden temporary file beside ``path``, then rename it over
    ``path``: a reader (or a crash) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def save_tensors(tensors: dict[str, Any], path: str | Path) -> Path:
    """A safetensors file written atomically and readable by the group as other files are
    (safetensors creates them for the owner only); a failed write (a full disk) leaves
    nothing behind and is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise TipError(f"could not write {path}: {reason}; what was complete is kept, so free "
                       "space (or fix the folder) and run the same command again") from None
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A hidden temporary directory beside ``path`` to fill; when the block ends without an
    error it replaces ``path`` (a directory tip owns, e.g. a cache entry), else it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def read_path_arg(value: str | Path) -> Path:
    """A stage input: a path, or ``-`` to read the path from stdin (last non-empty line)."""
    if str(value) != "-":
        return Path(value)
    lines = [ln.strip() for ln in sys.stdin.read().splitlines() if ln.strip()]
    if not lines:
        raise TipError("input '-' given but nothing arrived on stdin; pipe in a stage's output "
                       "directory, e.g. `tip rollout ... | tip score - ...`")
    return Path(lines[-1])
