"""Resumable training state, written and read without pickle.

A checkpoint is ``OUTPUT/checkpoints/step-NNNNNN/``::

    model.safetensors        the student's weights
    optimizer.safetensors    AdamW's per-parameter state tensors (state.<i>.<name>)
    optimizer.json           its parameter groups (hyper-parameters), scalar state, and
                             ``keys``: the i-th parameter's key in the state dict (its
                             index, or under FSDP its name)
    scheduler.json           the learning-rate schedule's state
    rng-<rank>.safetensors   each process's torch random state
    trainer.json             the step reached, the number of processes that wrote it
    checkpoint.json          written last: the step and the sha256 of every file above

Only these files are read back, and only after their checksums match ``checkpoint.json``:
JSON and safetensors, never a pickle, so a file planted in a checkpoint runs nothing (one
the index does not list is never opened; in ``sharded/``, below, it is refused). A
checkpoint is written under a hidden temporary name and renamed when complete; the
previous one is removed after that.

Under FSDP (``--fsdp``) no process gathers the whole state: ``sharded/`` holds every
process's shards of the model's and AdamW's tensors, written by torch.distributed.checkpoint
with its safetensors storage (each file's header says, in JSON, where its shards lie;
DCP's own pickled ``.metadata`` is not used), ``optimizer.json`` AdamW's hyper-parameters;
``model.safetensors`` and ``optimizer.safetensors`` are absent. On resume each process
reads the pieces of the saved shards that make up its own, on any number of processes.
torch's reader takes every ``*.safetensors`` file of that folder, so resume refuses a
checkpoint whose ``sharded/`` holds any file its index does not list (one line: remove it).

At its end a run writes ``OUTPUT/state/``: the same files but the weights (the output's
own are the same) and the random state, for a later run to continue its AdamW state and
its schedule (``--continue-from``; each iteration of ``tip distill``). ``trainer.json``
there and in checkpoints also holds the schedule: ``global_step`` (its position),
``schedule_steps``, ``warmup`` and ``lr``.

The state is whole, so a run resumes on another number of processes: the data order
depends on the global batch alone (processes x --train-batch-size x --grad-accum, kept in
the train manifest's ``inputs``), and a process that had no random state of its own takes
process 0's. A launch with another global batch is refused (``tipcli.stages.train``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tipcli.dist import fsdp as fsdp2
from tipcli.errors import TipError
from tipcli.store.files import save_tensors, sha256_file, write_atomic, write_json_atomic
from tipcli.store.layout import CHECKPOINTS, METRICS

INDEX = "checkpoint.json"
SHARDED = "sharded"  # under --fsdp: every process's shards (torch.distributed.checkpoint)
STATE = "state"  # OUTPUT/state/: the optimizer and schedule at a run's end (--continue-from)


def checkpoint_dirs(output: str | Path) -> list[Path]:
    """Complete checkpoints (those with an index), oldest first."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / INDEX).is_file())


def save_checkpoint(tr) -> Path:
    """Write the trainer's state as step-N; keep only the newest checkpoint."""
    root = Path(tr.cfg.output) / CHECKPOINTS
    final = root / f"step-{tr.state.step:06d}"

    def done() -> None:  # main process: the new one complete, the others go
        truncate_metrics(tr.cfg.output, tr.state.step)
        final.parent.mkdir(parents=True, exist_ok=True)
        (final.parent / f".{final.name}.tmp").rename(final)
        for old in root.iterdir():
            if old != final:
                shutil.rmtree(old) if old.is_dir() else old.unlink()

    _write(tr, final, weights=True, finish=done,
           fix="resume with --resume (the previous checkpoint is kept)")
    return final


def save_state(tr) -> Path:
    """The optimizer's state and the schedule's position after a run's last step, into
    ``OUTPUT/state/`` for ``--continue-from``: a checkpoint without the weights (the
    output's own are the same) and without random state (a run seeds its own)."""
    final = Path(tr.cfg.output) / STATE

    def done() -> None:
        if final.exists():
            shutil.rmtree(final)
        (final.parent / f".{final.name}.tmp").rename(final)

    _write(tr, final, weights=False, finish=done, fix="run the same command again")
    return final


def _write(tr, final: Path, weights: bool, finish, fix: str) -> None:
    """Write the trainer's state into ``final`` by way of a hidden temporary directory
    beside it (``finish``, on the main process, puts it in place). Every process calls it."""
    acc, step = tr.acc, tr.state.step
    tmp = final.parent / f".{final.name}.tmp"
    try:
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if tr.fsdp:  # every process writes its own shards; no whole state anywhere
            meta = {"sharded": fsdp2.save_sharded(tr.module, tr.optimizer, tmp / SHARDED,
                                                  weights=weights, frozen=not tr.lora)}
        else:
            model_sd, optim_sd = tr.full_state()
            tensors, meta = _split_optimizer(optim_sd)
        if acc.is_main_process:
            if not tr.fsdp:
                if weights:
                    save_tensors(_contiguous(model_sd), tmp / "model.safetensors")
                save_tensors(tensors, tmp / "optimizer.safetensors")
            write_json_atomic(tmp / "optimizer.json", meta)
            write_json_atomic(tmp / "scheduler.json", tr.scheduler.state_dict())
            write_json_atomic(tmp / "trainer.json", tr.position())
        acc.wait_for_everyone()
        if weights:
            save_tensors(_rng_state(), tmp / f"rng-{acc.process_index}.safetensors")
            acc.wait_for_everyone()
        if acc.is_main_process:
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            write_json_atomic(tmp / INDEX, {"step": step, "files": {
                f: sha256_file(tmp / f) for f in files}})
            finish()
    except (OSError, TipError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
            str(exc).split(";")[0]
        raise TipError(f"could not write {final} ({reason}); free space or fix "
                       f"permissions, then {fix}") from None
    acc.wait_for_everyone()


def load_checkpoint(tr, path: Path) -> None:
    """Restore the trainer from ``path`` after checking every file against its index."""
    index = _read_index(path)
    sharded = _verified(path, index, weights=True)
    if sharded != tr.fsdp:
        raise TipError(f"{path} was written {'with' if sharded else 'without'} --fsdp; resume "
                       "it the same way")
    _restore(tr, path, sharded, weights=True)
    position = json.loads((path / "trainer.json").read_text())
    tr.state.step = int(position["step"])
    tr.state.offset = int(position.get("global_step", tr.state.step)) - tr.state.step
    # a process the checkpoint had none for (resumed on more processes) takes process 0's
    rank_rng = f"rng-{tr.acc.process_index}.safetensors"
    if rank_rng not in index["files"]:
        rank_rng = "rng-0.safetensors"
    _set_rng_state(load_file(str(path / rank_rng)))


def read_state(path: str | Path) -> dict[str, Any]:
    """The position a ``save_state`` directory records (``trainer.json``), after every
    file is checked against its index."""
    path = Path(path)
    sharded = _verified(path, _read_index(path, CONTINUE_FIX), weights=False)
    position = json.loads((path / "trainer.json").read_text())
    return {**position, "fsdp": sharded}


def load_state(tr, path: str | Path) -> None:
    """Continue the run ``save_state`` ended in ``path``: its optimizer state and its
    schedule's position (checked by ``read_state`` first)."""
    path = Path(path)
    _restore(tr, path, tr.fsdp, weights=False)
    tr.state.offset = int(json.loads((path / "trainer.json").read_text())["global_step"])


CONTINUE_FIX = "drop --continue-from to start a new schedule"


def _verified(path: Path, index: dict[str, Any], weights: bool) -> bool:
    """Check every file of ``path`` against its ``index`` and that the files a restore
    reads are there; returns whether it holds FSDP shards."""
    fix = "start again with --overwrite" if weights else CONTINUE_FIX
    for name, digest in index["files"].items():
        if sha256_file(path / name) != digest:
            raise TipError(f"{path / name} does not match {path / INDEX}; "
                           f"{'the checkpoint' if weights else 'the state'} was changed or "
                           f"damaged: {fix}")
    sharded = any(f.startswith(SHARDED + "/") for f in index["files"])
    if sharded:
        _refuse_unlisted(path, index["files"])
    needed = {"optimizer.json", "scheduler.json", "trainer.json",
              *(("rng-0.safetensors",) if weights else ()),
              *(() if sharded else ("optimizer.safetensors",)),
              *(("model.safetensors",) if weights and not sharded else ())}
    missing = sorted(needed - set(index["files"]))
    if missing:
        raise TipError(f"{path} lacks {', '.join(missing)} (damaged); {fix}")
    return sharded


def _restore(tr, path: Path, sharded: bool, weights: bool) -> None:
    """Load the optimizer's (and with ``weights`` the model's) state and the schedule's."""
    meta = json.loads((path / "optimizer.json").read_text())
    if sharded:
        fsdp2.load_sharded(tr.module, tr.optimizer, path / SHARDED, meta["sharded"],
                           weights=weights, frozen=not tr.lora)
    else:
        model_sd, optim_sd = {}, {}
        if tr.reads_full_state:
            if weights:
                model_sd = load_file(str(path / "model.safetensors"))
            optim_sd = _join_optimizer(load_file(str(path / "optimizer.safetensors")), meta)
        tr.load_full_state(model_sd if weights else None, optim_sd)
    tr.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))


def saved_processes(output: str | Path) -> int | None:
    """How many processes wrote the newest checkpoint in ``output`` (None: unknown)."""
    done = checkpoint_dirs(output)
    try:
        n = json.loads((done[-1] / "trainer.json").read_text()).get("processes") if done \
            else None
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def _read_index(path: Path, fix: str = "start again with --overwrite") -> dict[str, Any]:
    try:
        index = json.loads((path / INDEX).read_text())
        ok = isinstance(index, dict) and isinstance(index.get("files"), dict) and all(
            isinstance(k, str) and re.fullmatch(rf"({SHARDED}/)?[\w][\w.-]*", k)
            and isinstance(v, str) for k, v in index["files"].items())
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise TipError(f"{path / INDEX} is not a checkpoint index tip wrote; {fix}")
    return index


def _refuse_unlisted(path: Path, listed: dict[str, str]) -> None:
    """torch's reader takes every safetensors file in ``sharded/``, listed or not: a file
    the index does not list there would be read unchecked, so it is refused."""
    extra = sorted(str(p.relative_to(path)) for p in (path / SHARDED).rglob("*")
                   if not p.is_dir() and str(p.relative_to(path)) not in listed)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise TipError(f"{path / extra[0]}{more} is not listed in {path / INDEX}, so tip did "
                       "not write it, and torch would read it with the checkpoint's shards: "
                       "remove it, then resume again")


def load_latest(tr) -> None:
    """Resume from the newest complete checkpoint, or start from step 0 when none."""
    root = Path(tr.cfg.output) / CHECKPOINTS
    if tr.acc.is_main_process and root.is_dir():
        for stale in root.glob(".step-*.tmp"):  # a checkpoint a crash left half-written
            shutil.rmtree(stale, ignore_errors=True)
    tr.acc.wait_for_everyone()
    done = checkpoint_dirs(tr.cfg.output)
    if done:
        load_checkpoint(tr, done[-1])
    if tr.acc.is_main_process:
        truncate_metrics(tr.cfg.output, tr.state.step)
    tr.acc.wait_for_everyone()


def truncate_metrics(output: str | Path, step: int) -> None:
    """Drop metric lines past ``step`` (a killed run may have logged steps it did not save)."""
    path = Path(output) / METRICS
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            break  # a line torn by a crash, and everything after it
    write_json_lines(path, keep)


def write_json_lines(path: Path, lines: list[str]) -> None:
    write_atomic(path, "".join(ln + "\n" for ln in lines))


# ----------------------------------------------------------------------------- state pieces


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tied weights stored once per name (copied)."""
    seen: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in sd.items():
        t = v.detach().cpu()
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        out[k] = t.clone().contiguous() if key in seen else t.contiguous()
        seen[key] = t
    return out


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state_dict as safetensors tensors and JSON for everything else.

    Its state is keyed by parameter index (``Optimizer.state_dict``) or by parameter name
    (FSDP's full state dicts, names holding dots); the keys are listed in order in the JSON
    (``keys``, ints staying ints) and the tensors named by position, ``state.<i>.<name>``."""
    tensors, scalars, keys = {}, {}, []
    for i, (key, state) in enumerate(sd["state"].items()):
        keys.append(key)
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{i}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "keys": keys}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    keys = meta.get("keys")  # absent from older checkpoints, whose keys are indices

    def key(i: str):
        return keys[int(i)] if keys is not None else int(i)

    state: dict[Any, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, i, field = name.split(".", 2)
        state.setdefault(key(i), {})[field] = value
    for name, value in meta.get("scalars", {}).items():
        i, field = name.split(".", 1)
        state.setdefault(key(i), {})[field] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
