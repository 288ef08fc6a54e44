"""Stage directories: a ``manifest.json`` plus ``*.safetensors`` shards.

The format is documented in ``docs/format.md``. Ragged data is stored flat with
offsets: ``prompt_offsets`` (N+1) index ``prompt_ids``, ``response_offsets`` (N+1)
index every per-token field. Shards are written under a temporary name and renamed
when complete; the manifest is rewritten (atomically) after every shard, with
``"complete": false`` until the stage finishes, so a killed run never looks done and a
re-run resumes after the last complete shard.

Reading::

    d = StageDir.open("runs/score", stage="score")
    for seq in d.iter_sequences():
        seq["rkl"]            # float32 [m], one value per response token
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tipcli import __version__
from tipcli.errors import TipError
from tipcli.files import sha256_file, umask, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# How each tensor name is laid out. Names not listed here are per token.
SEQUENCE_FIELDS = {"prompt_offsets", "response_offsets", "prompt_index", "sample_index",
                   "finish_reason", "prompt_lengths"}
PROMPT_TOKEN_FIELDS = {"prompt_ids"}

FINISH_EOS, FINISH_LENGTH = 0, 1


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a directory tip wrote, or None when there is none (no checks)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        return None
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a stage run that finished."""
    m = read_manifest(path)
    return bool(m and m.get("complete") is True)


# ----------------------------------------------------------------------------- reading


class StageDir:
    """A complete stage directory: its manifest and lazily loaded shards."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, stage: str | tuple[str, ...] | None = None) -> StageDir:
        path = Path(path)
        stages = (stage,) if isinstance(stage, str) else stage
        want = f"a {' or '.join(stages)} directory" if stages else "a stage directory"
        mpath = path / MANIFEST
        if not path.exists():
            raise TipError(f"{path} does not exist; expected {want}")
        if not mpath.is_file():
            raise TipError(f"{path} has no {MANIFEST}; expected {want} written by tip")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise TipError(f"{mpath} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TipError(f"{path} has schema version {version}; this tip reads version "
                           f"{SCHEMA_VERSION}")
        if stages and manifest.get("stage") not in stages:
            raise TipError(f"{path} is a {manifest.get('stage')} directory; expected {want}")
        if not manifest.get("complete"):
            raise TipError(f"{path} is incomplete (its {manifest.get('stage')} run did not "
                           "finish); run that stage again to resume it")
        return cls(path, manifest)

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def num_sequences(self) -> int:
        return sum(s["num_sequences"] for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards)

    def manifest_sha256(self) -> str:
        return sha256_file(self.path / MANIFEST)

    def open_parent(self, stage: str) -> StageDir:
        """The directory this one was made from, refused if it changed since."""
        parent = self.manifest.get("parent") or {}
        if not parent.get("path"):
            raise TipError(f"{self.path} records no {stage} directory it was made from; "
                           f"run tip {self.stage} again")
        d = StageDir.open(parent["path"], stage=stage)
        if d.manifest_sha256() != parent.get("manifest_sha256"):
            raise TipError(f"{d.path} was rewritten after {self.path} was made from it; run "
                           f"tip {self.stage} again on it (with --overwrite, or another -o)")
        return d

    def load_shard(self, index: int,
                   fields: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of shard ``index`` (only ``fields`` when given), checksum verified."""
        entry = self.shards[index]
        fpath = self.path / entry["file"]
        if not fpath.is_file():
            raise TipError(f"{fpath} is missing; the directory is damaged, re-run its stage")
        if sha256_file(fpath) != entry["sha256"]:
            raise TipError(f"{fpath} does not match the checksum in {MANIFEST}; the file was "
                           "changed or damaged, re-run its stage")
        if fields is None:
            return load_file(str(fpath))
        with safe_open(str(fpath), framework="pt") as f:
            return {k: f.get_tensor(k) for k in fields if k in f.keys()}

    def iter_shards(self, fields: tuple[str, ...] | None = None
                    ) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self.shards)):
            yield self.load_shard(i, fields)

    def iter_sequences(self) -> Iterator[dict[str, torch.Tensor]]:
        for shard in self.iter_shards():
            yield from split_sequences(shard)


def split_sequences(shard: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Cut a flat shard into one dict per sequence (views, no copies)."""
    p_off = shard["prompt_offsets"].tolist() if "prompt_offsets" in shard else None
    r_off = shard["response_offsets"].tolist()
    out = []
    for i in range(len(r_off) - 1):
        seq: dict[str, torch.Tensor] = {}
        for name, t in shard.items():
            if name in ("prompt_offsets", "response_offsets"):
                continue
            if name in SEQUENCE_FIELDS:
                seq[name] = t[i]
            elif name in PROMPT_TOKEN_FIELDS:
                if p_off is not None:
                    seq[name] = t[p_off[i]:p_off[i + 1]]
            else:
                seq[name] = t[r_off[i]:r_off[i + 1]]
        out.append(seq)
    return out


def offsets(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if lengths:
        out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out


# ----------------------------------------------------------------------------- writing


class StageWriter:
    """Writes one stage directory shard by shard, resuming an interrupted run.

    ``resume_key`` is what must match for a re-run to continue an incomplete
    directory (the resolved config and the parent manifest's checksum).
    """

    def __init__(self, path: str | Path, stage: str, config: dict[str, Any],
                 models: dict[str, Any], tokenizer: dict[str, Any],
                 parent: StageDir | None = None, overwrite: bool = False):
        self.path = Path(path)
        self.manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "stage": stage,
            "complete": False,
            "tip_version": __version__,
            "config": config,
            "models": models,
            "tokenizer": tokenizer,
            "parent": None if parent is None else {
                "stage": parent.stage,
                "path": str(parent.path.resolve()),
                "manifest_sha256": parent.manifest_sha256(),
                "manifest": parent.manifest,
            },
            "shards": [],
            "summary": {},
        }
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        mpath = self.path / MANIFEST
        if self.path.exists() and not self.path.is_dir():
            raise TipError(f"output {self.path} exists and is not a directory; choose another -o")
        if self.path.is_dir() and any(self.path.iterdir()):
            if overwrite:
                self._clear()
            elif not mpath.is_file():
                raise TipError(f"output directory {self.path} is not empty and holds no tip "
                               "manifest; choose another -o or pass --overwrite")
            else:
                old = json.loads(mpath.read_text())
                if self._resume_key(old) != self._resume_key(self.manifest):
                    raise TipError(f"output directory {self.path} holds a different "
                                   f"{old.get('stage')} run (other settings or inputs); "
                                   "choose another -o or pass --overwrite")
                self.manifest["shards"] = self._valid_shards(old["shards"])
                self.manifest["complete"] = old.get("complete", False) and \
                    len(self.manifest["shards"]) == len(old["shards"])
                self.manifest["summary"] = old.get("summary", {})
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".*.tmp"):
            stale.unlink()
        if not self.manifest["complete"]:
            self._save()

    @staticmethod
    def _resume_key(m: dict[str, Any]) -> tuple:
        parent = m.get("parent") or {}
        return (m.get("schema_version"), m.get("stage"),
                json.dumps(m.get("config"), sort_keys=True), parent.get("manifest_sha256"))

    def _valid_shards(self, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The leading shards whose files exist with the recorded checksum."""
        good = []
        for entry in shards:
            f = self.path / entry["file"]
            if not f.is_file() or sha256_file(f) != entry["sha256"]:
                break
            good.append(entry)
        return good

    def _clear(self) -> None:
        for child in self.path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _save(self) -> None:
        write_json_atomic(self.path / MANIFEST, self.manifest)

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def num_done(self) -> int:
        """How many shards are already written (a resumed run skips them)."""
        return len(self.manifest["shards"])

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor],
                    **entry_extra: Any) -> dict[str, Any]:
        """Write shard ``index`` (must be the next one) atomically and record it."""
        if index != self.num_done:
            raise RuntimeError(f"shard {index} written out of order (next is {self.num_done})")
        name = shard_name(index)
        tmp = self.path / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        final = self.path / name
        os.chmod(tmp, 0o666 & ~umask())  # safetensors creates files readable by the owner only
        os.replace(tmp, final)
        r_off = tensors["response_offsets"]
        entry = {"file": name, "num_sequences": int(r_off.numel() - 1),
                 "num_tokens": int(r_off[-1]), "sha256": sha256_file(final), **entry_extra}
        self.manifest["shards"].append(entry)
        self._save()
        return entry

    def finish(self, summary: dict[str, Any] | None = None) -> Path:
        if summary:
            self.manifest["summary"].update(summary)
        self.manifest["complete"] = True
        self._save()
        return self.path
