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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tipcli import __version__
from tipcli.configs import STAGE_CONFIGS, current_config
from tipcli.dist.processes import Processes
from tipcli.errors import TipError, first_line
from tipcli.settings import leaf_map, to_flat, validate
from tipcli.store.files import save_tensors, sha256_file, write_atomic, write_json_atomic
from tipcli.store.layout import MANIFEST, PROGRESS, SHARD, STAGES, Stage, pattern
from tipcli.store.outputs import check_output, prepare_output

SCHEMA_VERSION = 1

# How each tensor name is laid out. Names not listed here are per token.
SEQUENCE_FIELDS = {"prompt_offsets", "response_offsets", "prompt_index", "sample_index",
                   "finish_reason", "prompt_lengths"}
PROMPT_TOKEN_FIELDS = {"prompt_ids"}

FINISH_EOS, FINISH_LENGTH = 0, 1


def shard_name(index: int) -> str:
    return SHARD.format(index)


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


def manifest_problem(m: Any) -> str | None:
    """What is wrong with a manifest's layout, or None (a crash or an edit can leave one
    that is valid JSON but not a manifest tip can read)."""
    if not isinstance(m, dict):
        return "is not a JSON object"
    version = m.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        return (f"has schema_version {json.dumps(version)}; this tip reads version "
                f"{SCHEMA_VERSION}")
    kinds = {"stage": str, "complete": bool, "config": dict, "models": dict, "tokenizer": dict,
             "shards": list, "summary": dict}
    for key, kind in kinds.items():
        if not isinstance(m.get(key), kind):
            return f"lacks a valid '{key}'"
    if not isinstance(m["tokenizer"].get("fingerprint"), str) or \
            not _is_int(m["tokenizer"].get("vocab_size")):
        return "lacks the tokenizer's fingerprint and vocab_size"
    if m.get("parent") is not None and not isinstance(m["parent"], dict):
        return "has a 'parent' that is not an object"
    for i, entry in enumerate(m["shards"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or \
                Path(entry["file"]).name != entry["file"] or entry["file"].startswith("."):
            return f"lists shard {i} without a plain file name"
        if not isinstance(entry.get("sha256"), str) or not all(
                _is_int(entry.get(k)) for k in ("num_sequences", "num_tokens")):
            return f"lists shard {i} without its checksum and counts"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a stage run that finished."""
    m = read_manifest(path)
    return bool(m and m.get("complete") is True)


# ----------------------------------------------------------------------------- reading


# settings that change how a run reads, never what it writes: a resume may change them
NOT_COMPARED = ("verify_checksums",)


class StageDir:
    """A complete stage directory: its manifest and lazily loaded shards."""

    def __init__(self, path: Path, manifest: dict[str, Any], verify: bool = False):
        self.path = path
        self.manifest = manifest
        self.verify = verify

    @classmethod
    def open(cls, path: str | Path, stage: str | tuple[str, ...] | None = None,
             verify: bool = False) -> StageDir:
        """The complete stage directory at ``path`` (of one of ``stage``). Its shards are
        checked against their manifest's checksums as they are read with ``verify``
        (``--verify-checksums``); else their size and header are."""
        path = Path(path)
        stages = (stage,) if isinstance(stage, str) else stage
        want = f"a {' or '.join(stages)} directory" if stages else "a stage directory"
        mpath = path / MANIFEST
        if not path.exists():
            raise TipError(f"{path} does not exist; expected {want}")
        if not mpath.is_file():
            raise TipError(f"{path} has no {MANIFEST}; expected {want} written by tip")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f" ({exc.msg} at line {exc.lineno})" if hasattr(exc, "lineno") else ""
            raise TipError(f"{mpath} is not valid JSON{where}: the directory is damaged (a "
                           "crash while it was written?); run its stage again") from None
        problem = manifest_problem(manifest)
        if problem:
            raise TipError(f"{mpath} {problem}; the directory is damaged or was not written "
                           "by this tip: run its stage again")
        if stages and manifest.get("stage") not in stages:
            raise TipError(f"{path} is a {manifest.get('stage')} directory; expected {want}")
        if not manifest.get("complete"):
            raise TipError(f"{path} is incomplete (its {manifest.get('stage')} run did not "
                           "finish); run that stage again to resume it")
        described = STAGES.get(manifest["stage"])
        if described is not None and described.sharded and not manifest["shards"]:
            raise TipError(f"{mpath} lists no shards, so the directory is damaged or was not "
                           f"written by this tip: run its {manifest['stage']} stage again")
        return cls(path, manifest, verify)

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def config(self) -> dict[str, Any]:
        """The settings it was written with, under today's names."""
        return current_config(self.stage, self.manifest["config"])

    def setting(self, name: str) -> Any:
        """One setting it was written with, under today's name; a setting its stage gained
        after the directory was written is at its default (what that tip did)."""
        config = self.config
        if name in config:
            return config[name]
        leaf = leaf_map(STAGE_CONFIGS[self.stage]).get(name) \
            if self.stage in STAGE_CONFIGS else None
        if leaf is None:
            raise KeyError(f"a {self.stage} stage has no setting {name!r}")
        return leaf.default

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def policy_version(self) -> int:
        """The policy version of the student that sampled its data (``tipcli.records``); 0
        for a directory written before tip recorded it."""
        version = self.manifest["summary"].get("policy_version", 0)
        return version if isinstance(version, int) else 0

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
        d = StageDir.open(parent["path"], stage=stage, verify=self.verify)
        if d.manifest_sha256() != parent.get("manifest_sha256"):
            raise TipError(f"{d.path} was rewritten after {self.path} was made from it; run "
                           f"tip {self.stage} again on it (with --overwrite, or another -o)")
        return d

    def load_shard(self, index: int,
                   fields: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of shard ``index`` (only ``fields`` when given): its file checked
        against the manifest's checksum with ``verify``, else against its size."""
        entry = self.shards[index]
        fpath = self.path / entry["file"]
        if not fpath.is_file():
            raise TipError(f"{fpath} is missing; the directory is damaged, re-run its stage")
        size = entry.get("bytes")  # absent from directories written before tip recorded it
        if isinstance(size, int) and fpath.stat().st_size != size:
            raise TipError(f"{fpath} is {fpath.stat().st_size} bytes, not the {size} its "
                           f"{MANIFEST} records; the file was changed or damaged, re-run its "
                           "stage")
        if self.verify and sha256_file(fpath) != entry["sha256"]:
            raise TipError(f"{fpath} does not match the checksum in {MANIFEST}; the file was "
                           "changed or damaged, re-run its stage")
        try:
            if fields is None:
                return load_file(str(fpath))
            with safe_open(str(fpath), framework="pt") as f:
                return {k: f.get_tensor(k) for k in fields if k in f.keys()}
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise TipError(f"{fpath} is not a readable safetensors file ({first_line(exc)}); "
                           "the directory is damaged, re-run its stage") from None

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


def settings_diff(then: dict[str, Any], now: dict[str, Any]) -> str:
    """The settings that differ, as flags with the run's value and this one's:
    ``--temperature was 1.0, now 0.5``."""
    def value(config: dict[str, Any], key: str) -> str:
        return json.dumps(config[key], sort_keys=True) if key in config else "unset"

    def shown(config: dict[str, Any], key: str) -> str:
        text = value(config, key)
        return text if len(text) <= 60 else text[:57] + "..."

    keys = [k for k in dict.fromkeys((*then, *now)) if value(then, k) != value(now, k)]
    return "; ".join(f"--{k.replace('_', '-')} was {shown(then, k)}, now {shown(now, k)}"
                     for k in keys)


class StageWriter:
    """One run of a stage into its output directory, written shard by shard; it resumes
    an interrupted run.

    Made first, before any model loads (``StageWriter.for_run``): the settings are
    checked, and so is the output (``tipcli.store.outputs``: not one of the inputs the
    stage's description names, nothing foreign in it); nothing is written and no process
    waits for another. ``start`` then prepares the directory (the main process), or finds
    the same run interrupted (resumed) or finished (``complete``); the stage writes its
    shards or files and calls ``finish``.

    A re-run continues an incomplete directory only when everything that decides its
    content is the same: the resolved config, the parent directory's manifest, the
    models' fingerprints and ``inputs`` (e.g. the prompts' checksum). Settings named in
    ``launch`` describe how the work is split over processes (train's per-process batch):
    they may change, where ``inputs`` holds what they must keep (the global batch).
    ``sources`` are the paths the run reads, which the output must not be or hold.

    With several processes (``procs``), every process first checks that all resolved the
    same settings (``Processes.agree``); the main process prepares the directory, each
    process writes its own shards and records them in ``.progress-<rank>.json``, and the
    main process folds every record into the manifest in ``finish``; a re-run after a
    crash keeps every shard recorded with a matching checksum.
    """

    def __init__(self, stage: Stage, output: str | Path, config: dict[str, Any],
                 overwrite: bool = False, sources: tuple = ()):
        self.stage, self.path, self.config = stage, Path(output), config
        self.overwrite, self.sources = overwrite, tuple(sources)
        self.procs, self.launch = Processes(), ()
        self.manifest: dict[str, Any] = {}
        self.done: dict[int, dict[str, Any]] = {}
        self.found_complete = False
        check_output(self.path, stage.name, self.sources, overwrite)

    @classmethod
    def for_run(cls, stage: Stage, cfg: Any, overwrite: bool = False) -> StageWriter:
        """The writer of ``cfg``'s run of ``stage`` (its output, its settings, the inputs its
        settings name), after checking every setting."""
        validate(cfg)
        sources: list[str] = []
        for name in stage.inputs:  # several teachers: NAME=MODEL each
            given = getattr(cfg, name)
            for v in [given] if isinstance(given, str) else given:
                sources += [v, v.split("=", 1)[-1]] if "=" in v else [v]
        return cls(stage, cfg.output, to_flat(cfg), overwrite, tuple(sources))

    def start(self, models: dict[str, Any], tokenizer: dict[str, Any],
              parent: StageDir | None = None, inputs: dict[str, Any] | None = None,
              config: dict[str, Any] | None = None, reads: tuple = (),
              procs: Processes = Processes(), launch: tuple[str, ...] = ()) -> StageWriter:
        """Start, resume or find finished the directory (every process calls it: a
        collective step). ``config`` (default: the run's settings) is what a resumed run
        must equal, with the ``parent`` directory and the ``inputs``' checksums. ``reads``:
        paths it reads beyond its settings' (the output may not be or hold them either)."""
        procs.agree(self.config)
        self.procs, self.launch = procs, launch
        self.manifest = {
            "schema_version": SCHEMA_VERSION,
            "stage": self.stage.name,
            "complete": False,
            "tip_version": __version__,
            "config": self.config if config is None else config,
            "models": models,
            "inputs": inputs or {},
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
        if procs.main:
            sources = (*self.sources, *reads, parent.path if parent is not None else None)
            prepare_output(self.path, self.stage.name, sources, self.overwrite)
            self._prepare()
        procs.barrier()
        if not procs.main:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
            self.done = self._valid(self.manifest)
        self.found_complete = bool(self.manifest["complete"])
        return self

    def _prepare(self) -> None:
        old = read_manifest(self.path)
        if old is not None and old.get("stage") == self.manifest["stage"] and \
                manifest_problem(old) is None:
            changed = self._changed(old)
            if changed:
                raise TipError(f"output directory {self.path} holds a different "
                               f"{old['stage']} run ({changed}); pass --overwrite to replace "
                               "it, or choose another -o")
            self.done = self._valid(old)
            self.manifest["complete"] = old["complete"] and \
                len(self.done) == len(old["shards"])
            self.manifest["summary"] = old["summary"]
        elif old is not None or (self.path / MANIFEST).exists():
            raise TipError(f"output directory {self.path} holds another tip run (or a damaged "
                           "one); pass --overwrite to replace it, or choose another -o")
        elif self.path.is_dir() and any(not e.name.startswith(".") for e in self.path.iterdir()):
            raise TipError(f"output directory {self.path} holds an earlier {self.manifest['stage']}"
                           " run in an older format; pass --overwrite to replace it, or choose "
                           "another -o")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".*.tmp"):
            stale.unlink()
        if not self.manifest["complete"]:
            self._save()

    def _changed(self, old: dict[str, Any]) -> str:
        """What differs between ``old`` and this run, in words ('' when nothing)."""
        new = self.manifest
        skip = (*self.launch, *NOT_COMPARED)
        then = {k: v for k, v in current_config(old["stage"], old["config"]).items()
                if k not in skip}
        now = {k: v for k, v in new["config"].items() if k not in skip}
        if json.dumps(then, sort_keys=True) != json.dumps(now, sort_keys=True):
            return "its settings differ: " + settings_diff(then, now)
        if (old.get("parent") or {}).get("manifest_sha256") != \
                (new.get("parent") or {}).get("manifest_sha256"):
            return "its input directory changed since"
        for role, ref in new["models"].items():
            if (old["models"].get(role) or {}).get("fingerprint") != ref.get("fingerprint"):
                return f"the {role} model's files at {ref.get('id')} changed since"
        for name, value in new["inputs"].items():
            if old.get("inputs", {}).get(name) != value:
                return f"the {name.removesuffix('_sha256')} changed since"
        return ""

    def _valid(self, old: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Shards recorded in ``old`` or in a process's progress file whose files exist
        with the recorded checksum, by index."""
        entries = list(enumerate(old["shards"]))
        for progress in sorted(self.path.glob(pattern(PROGRESS))):
            try:
                entries += [(int(i), e) for i, e in json.loads(progress.read_text()).items()]
            except (ValueError, AttributeError, TypeError):
                continue  # a torn progress file: its shards are simply done again
        good = {}
        for i, entry in entries:
            ok = isinstance(entry, dict) and entry.get("file") == shard_name(i)
            f = self.path / shard_name(i)
            if ok and f.is_file() and sha256_file(f) == entry.get("sha256"):
                good[i] = entry
        return good

    def _save(self) -> None:
        """The manifest, listing the leading run of finished shards (the others, done by
        other processes, are in their progress files until ``finish``)."""
        n = 0
        while n in self.done:
            n += 1
        self.manifest["shards"] = [self.done[i] for i in range(n)]
        write_json_atomic(self.path / MANIFEST, self.manifest)

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def is_done(self, index: int) -> bool:
        return index in self.done

    def todo(self, num_shards: int) -> list[int]:
        """The shards this process still has to write (its share, less those done)."""
        return [i for i in self.procs.mine(range(num_shards)) if i not in self.done]

    def write_file(self, name: str, text: str) -> Path:
        """A file of the stage beside the manifest (an evaluation's results), atomically."""
        return write_atomic(self.path / name, text)

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor],
                    **entry_extra: Any) -> dict[str, Any]:
        """Write shard ``index`` atomically and record it (in the manifest, or with several
        processes in this process's progress file)."""
        final = save_tensors(tensors, self.path / shard_name(index))
        r_off = tensors["response_offsets"]
        entry = {"file": final.name, "num_sequences": int(r_off.numel() - 1),
                 "num_tokens": int(r_off[-1]), "sha256": sha256_file(final),
                 "bytes": final.stat().st_size, **entry_extra}
        self.done[index] = entry
        if self.procs.world == 1:
            self._save()
        else:
            mine = {str(i): e for i, e in self.done.items()
                    if self.procs.mine([i]) == [i]}
            write_json_atomic(self.path / PROGRESS.format(self.procs.rank), mine)
        return entry

    def finish(self, summary: dict[str, Any] | None = None,
               num_shards: int | None = None) -> Path:
        """Mark the directory complete (every process calls it; the main one writes)."""
        self.procs.barrier()
        # a directory found finished is left as it is: a rerun on another number of
        # processes does not change the manifest the next stage records as its parent
        if self.procs.main and not self.found_complete:
            if self.procs.world > 1:
                self.done.update(self._valid({"shards": []}))
            missing = [i for i in range(num_shards or 0) if i not in self.done]
            if missing:
                raise TipError(f"{self.path}: shard {missing[0]} was not written by any "
                               "process; run the same command again to finish it")
            self.manifest["summary"].update(summary or {})
            if self.procs.world > 1:
                self.manifest["summary"]["num_processes"] = self.procs.world
            self.manifest["complete"] = True
            self._save()
            for progress in self.path.glob(pattern(PROGRESS)):
                progress.unlink()
        self.procs.barrier()
        return self.path
