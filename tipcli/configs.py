"""Every setting of every stage, declared once, and the names the stages share.

    from tipcli.configs import SelectConfig, resolve
    cfg = resolve(SelectConfig, score="runs/score", output="runs/select", keep=0.2)

Small groups (``Runtime``, ``Sampling``, ``PromptSource``, ``Scoring``, ``Selection``,
``Optim``, ``Training``, ``Grading``) are shared by the stages that need them; each stage
config composes them with its own paths. The CLI is generated from these classes, so a
field's type, default, range, choices and help are its flag. Torch-free: ``tip --help``
imports this module and nothing heavy. The machinery is in ``tipcli.settings``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tipcli.catalog import DIVERGENCES, LOSSES, STRATEGIES, strategy_problem
from tipcli.settings import (
    STAGES,
    current_names,
    from_flat,
    group,
    resolve,
    setting,
    to_flat,
    validate,
)

__all__ = ["from_flat", "resolve", "to_flat", "validate"]

# ----------------------------------------------------------------------------- names

NORMALIZERS = ("minmax", "bound", "rank")
SCOPES = ("sequence", "group")
BACKENDS = ("hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISION = ("auto", "no", "bf16")
TRACKERS = ("none", "tensorboard", "wandb", "trackio")
VERIFIERS = ("auto", "exact", "last-number", "boxed")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu|npu)(:\d+)?")


def _device_problem(device: str) -> str | None:
    if DEVICE_PATTERN.fullmatch(device):
        return None
    return f"--device must be auto, cpu, cuda or cuda:N (got '{device}')"


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``0=70GiB,cpu=200GiB`` -> {0: "70GiB", "cpu": "200GiB"}; ValueError when malformed."""
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not size or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B|B)?", size, re.I) or \
                not (key.isdigit() or key in ("cpu", "disk", "mps")):
            raise ValueError(part)
        out[int(key) if key.isdigit() else key] = size
    return out


def _max_memory_problem(text: str) -> str | None:
    try:
        parse_max_memory(text)
    except ValueError as exc:
        return (f"--max-memory: cannot read '{exc}'; write device=size pairs, e.g. "
                "0=70GiB,cpu=200GiB")
    return None


def parse_layers(text: str) -> list[int]:
    """``5,7,12`` or ``0-3,8`` -> [5, 7, 12] or [0, 1, 2, 3, 8], as given; ValueError (the
    part it cannot read) when malformed."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(part)
        out += range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
    return out


def _layers_problem(flag: str):
    def check(text: str) -> str | None:
        try:
            layers = parse_layers(text)
        except ValueError as exc:
            return (f"{flag}: cannot read '{exc}'; write decoder layer indices counted from 0, "
                    "e.g. 5,7,12 or 4-7")
        twice = sorted({i for i in layers if layers.count(i) > 1})
        if twice:
            return f"{flag} names layer {twice[0]} twice; name each layer once"
        return None if layers else f"{flag} names no layer"
    return check


_NAMED = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.+)")


def _teacher_url_problem(url: str) -> str | None:
    """An address urllib can ask: http(s)://HOST[:PORT][/PATH], no query; a trailing /v1
    (the OpenAI clients' base_url) is allowed and dropped by the served teacher."""
    from urllib.parse import urlsplit

    named = _NAMED.fullmatch(url)
    if named and not url.startswith(("http://", "https://")):  # NAME=URL: several teachers
        url = named.group(2)
    if not url.startswith(("http://", "https://")):
        return f"--teacher-url must start with http:// or https:// (got '{url}')"
    try:
        parts = urlsplit(url)
        _ = parts.port  # reading it checks the port
    except ValueError as exc:
        return (f"--teacher-url '{url}' is not a valid address ({exc}); write "
                "http://HOST:PORT, e.g. http://127.0.0.1:8000 or http://[::1]:8000")
    if not parts.hostname or parts.query or parts.fragment or any(c.isspace() for c in url):
        return (f"--teacher-url '{url}' is not a server's address; write http://HOST:PORT, "
                "e.g. http://127.0.0.1:8000")
    return None


def _verifier_problem(name: str) -> str | None:
    if name in VERIFIERS or ":" in name:
        return None
    return f"--verifier must be one of {', '.join(VERIFIERS)} or module:function (got '{name}')"


def _model(help: str, short: str | None = None, required: bool = True):
    return setting("", help + (" Hub id, local directory or .gguf file." if required else ""),
                   required=required, short=short)


def _teachers():
    return setting("", "Teacher model: hub id, local directory or .gguf file; or NAME=MODEL, "
                   "repeated: several teachers, each prompt scored by the one its "
                   "--teacher-field names (docs/design.md).", required=True, short="-t",
                   many=True)


def named_teachers(teacher: str | list[str]) -> dict[str, str] | None:
    """{name: model} of ``--teacher NAME=MODEL`` (repeated); None for one plain teacher
    (a model that is not of that form, or an existing path that is)."""
    values = [teacher] if isinstance(teacher, str) else list(teacher)
    if len(values) == 1 and (not _NAMED.fullmatch(values[0]) or Path(values[0]).exists()):
        return None
    out: dict[str, str] = {}
    for v in values:
        m = _NAMED.fullmatch(v)
        if m is None:
            raise ValueError(f"--teacher {v}: several teachers are each NAME=MODEL "
                             "(--teacher math=M1 --teacher code=M2)")
        if m.group(1) in out:
            raise ValueError(f"--teacher names {m.group(1)} twice: give each teacher its own "
                             "name")
        out[m.group(1)] = m.group(2)
    return out


def teacher_urls(teacher_url: str | list[str]) -> dict[str, str]:
    """With several teachers: {name: its server's address} of ``--teacher-url NAME=URL``."""
    urls = [teacher_url] if isinstance(teacher_url, str) else teacher_url
    return {m.group(1): m.group(2) for m in (_NAMED.fullmatch(u) for u in urls if u) if m}


def named_teachers_or_none(teacher) -> dict[str, str] | None:
    """``named_teachers``, None also where it is refused (its problem is reported apart)."""
    try:
        return named_teachers(teacher) if teacher else None
    except ValueError:
        return None


def _teachers_problems(teacher, scoring, runtime) -> list[str]:
    """Several teachers: each named once, each server named for one of them (NAME=URL),
    not sharded when one is held at a time. One teacher: one plain server address at
    most."""
    try:
        several = named_teachers(teacher) if teacher else None
    except ValueError as exc:
        return [str(exc)]
    urls = [scoring.teacher_url] if isinstance(scoring.teacher_url, str) else \
        scoring.teacher_url
    if several is None:
        if len(urls) > 1:
            return ["one teacher takes one --teacher-url; several servers are for several "
                    "teachers (--teacher NAME=MODEL --teacher-url NAME=URL, each repeated)"]
        return [f"--teacher-url {u}: NAME=URL names one of several teachers; with one teacher "
                "give the server's address alone" for u in urls
                if u and not u.startswith(("http://", "https://"))][:1]
    out = [] if scoring.teacher_field else ["--teacher-field is empty: name the prompt field "
                                            "that routes each prompt to its teacher"]
    for u in urls:
        m = _NAMED.fullmatch(u) if u else None
        if u and (m is None or u.startswith(("http://", "https://"))):
            out.append(f"--teacher-url {u}: with several teachers each server is NAME=URL "
                       "(--teacher-url math=http://HOST:PORT)")
        elif m and m.group(1) not in several:
            out.append(f"--teacher-url {u} names no teacher of --teacher ({', '.join(several)})")
    served = [m for m in several.values() if m.startswith(("http://", "https://"))]
    for m in served[:1]:  # NAME=URL in --teacher: what a served teacher needs
        problem = _teacher_url_problem(m)
        out += [problem] if problem else dataclasses.replace(scoring, teacher_url=m).rules()
    if runtime.shard_teacher and scoring.teacher_at_a_time:
        out.append("--teacher-at-a-time loads each teacher for a shard on one process, but "
                   "--shard-teacher shares every teacher out over all processes: choose one")
    return out


def _output(help: str = "Output directory.", required: bool = True):
    return setting("", help, required=required, short="-o")


def _seed(help: str):
    return setting(0, help)


# ----------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Runtime:
    """Where and how models run."""

    device: str = setting("auto", "Device: auto (CUDA when present), cpu, cuda, cuda:1 ...",
                          check=_device_problem)
    dtype: str = setting("auto", "Model dtype: auto (bf16 on GPU, fp32 on CPU).", choices=DTYPES)
    trust_remote_code: bool = setting(False, "Allow model code from the hub (only if you "
                                             "trust it).")
    device_map: str = setting("", "Spread a model too large for one device over several (and "
                              "the CPU, then disk) with accelerate: auto, balanced, sequential "
                              "(score's models; train's teacher).",
                              choices=("", "auto", "balanced", "balanced_low_0", "sequential"))
    max_memory: str = setting("", "With --device-map, memory per device, e.g. "
                              "0=70GiB,1=70GiB,cpu=200GiB.", check=_max_memory_problem)
    shard_teacher: bool = setting(False, "Shard the teacher over the launched processes with "
                                  "FSDP2, for inference (score, distill's scoring, the *-full "
                                  "losses): each holds about 1/N of it, all compute at once.")
    dist_timeout: float = setting(60.0, "Under a launcher: minutes a process waits for the "
                                  "others (the process group's timeout; a long generation on "
                                  "one process keeps the rest waiting).", gt=0)

    def rules(self) -> list[str]:
        if self.shard_teacher and self.device_map:
            return ["--shard-teacher and --device-map both place the teacher: choose one"]
        return []


@dataclass(frozen=True)
class Checks:
    """How much of an input stage directory is checked before it is read."""

    verify_checksums: bool = setting(False, "Check every input shard against the sha256 in "
                                     "its manifest before reading it (without: its size is "
                                     "checked; a resume always checks checksums).")


@dataclass(frozen=True)
class PromptSource:
    """Which records of a prompt source are used, and where their prompt is."""

    prompt_field: str = setting("prompt", "Record field holding the prompt text.")
    messages_field: str = setting("messages", "Record field holding chat messages.")
    split: str = setting("train", "Dataset split, for datasets with several.")
    max_prompts: int = setting(0, "Use only the first N prompts (0 = all).", ge=0)


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled."""

    num_samples: int = setting(1, "Responses sampled per prompt.", ge=1)
    temperature: float = setting(1.0, "Sampling temperature (0 = greedy).", ge=0)
    top_p: float = setting(1.0, "Nucleus sampling mass (1 = off).", gt=0, le=1)
    sample_top_k: int = setting(0, "Sample among the k most likely tokens (0 = off).", ge=0)
    max_new_tokens: int = setting(256, "Most tokens per response.", ge=1)
    sample_batch_size: int = setting(8, "Sequences generated together.", ge=1)
    long_prompts: str = setting("error", "A prompt too long for the model's context with "
                                "--max-new-tokens: error, or truncate (keep its end, warn).",
                                choices=("error", "truncate"))
    backend: str = setting("hf", "Sampling engine: hf (transformers) or vllm (pip install "
                           "'tipcli[vllm]').", choices=BACKENDS)
    vllm_gpu_memory: float = setting(0.85, "--backend vllm on a GPU: the share of its memory "
                                     "vLLM may take (lower it where training shares the GPU).",
                                     gt=0, le=1)


@dataclass(frozen=True)
class Scoring:
    """How the score stage computes per-token statistics."""

    teacher_top_k: int = setting(64, "Teacher top-k ids and log-probs stored per token (0 = "
                                 "none).", ge=0)
    score_temperature: float = setting(1.0, "Temperature applied to both models' logits.",
                                       gt=0)
    score_batch_size: int = setting(8, "Sequences per scoring forward pass.", ge=1)
    score_chunk_size: int = setting(0, "Positions whose logits exist at once (0 = auto: about "
                                       "2^22 logits).", ge=0)
    teacher_url: str = setting("", "A vLLM server (OpenAI-compatible, http://HOST:PORT, a "
                               "trailing /v1 allowed) serving --teacher: ask "
                               "it for the teacher's top-k instead of loading the teacher "
                               "(divergences become top-k estimates; docs/scale.md). With "
                               "several teachers NAME=URL, repeated, for those served.",
                               check=_teacher_url_problem, many=True)
    teacher_field: str = setting("teacher", "With several teachers (--teacher NAME=MODEL "
                                 "repeated): the prompt field naming each prompt's teacher.")
    teacher_at_a_time: bool = setting(False, "With several teachers: keep one in memory at a "
                                      "time, each shard scored teacher by teacher (for "
                                      "teachers that do not fit together; slower: each is "
                                      "loaded again for every shard).")
    cross_tokenizer: str = setting("auto", "A teacher with another tokenizer: auto (aligned by "
                                   "character offsets when the tokenizers differ), force (aligned "
                                   "even when they are the same), off (refused; docs/design.md).",
                                   choices=("auto", "force", "off"))
    teacher_concurrency: int = setting(8, "With --teacher-url: requests to the server at once.",
                                       ge=1)
    teacher_timeout: float = setting(300.0, "With --teacher-url: seconds to wait for the "
                                     "server's answer to one request; a response's retries "
                                     "stop after 3 times this in all.", gt=0)

    def rules(self) -> list[str]:
        if not self.teacher_url:
            return []
        problems = []
        if self.teacher_top_k < 1:
            problems.append("--teacher-url needs --teacher-top-k of at least 1 (the server's "
                            "top-k is what the divergences are estimated from)")
        if self.score_temperature != 1.0:
            problems.append("--teacher-url gives the teacher's log-probs at temperature 1: "
                            "--score-temperature must be 1")
        return problems


@dataclass(frozen=True)
class Selection:
    """Which response tokens are trained on (docs/selection.md)."""

    strategy: str = setting("soft-or", f"{', '.join(STRATEGIES)}, or quadrant:Q1+Q3 (any + "
                            "of Q1..Q4).", check=strategy_problem)
    keep: float = setting(0.5, "Fraction of response tokens kept (quadrant sets: at most this "
                               "many; ignored by all).", gt=0, le=1)
    scope: str = setting("sequence", "Budget per sequence, or per normalisation group.",
                         choices=SCOPES)
    divergence: str = setting("rkl", "Divergence behind d.", choices=DIVERGENCES)
    normalize: str = setting("minmax", "minmax (the paper's: 98th-percentile entropy clip), "
                             "bound or rank.", choices=NORMALIZERS)
    group_size: int = setting(64, "Consecutive sequences per normalisation group.", ge=1)
    alpha: float = setting(1.0, "entropy-sample: keep probability proportional to h^alpha.",
                           ge=0)
    tau_h: float | None = setting(None, "Absolute threshold on h (default: group median).",
                                     ge=0, le=1)
    tau_d: float | None = setting(None, "Absolute threshold on d (default: group median).",
                                     ge=0, le=1)


@dataclass(frozen=True)
class Optim:
    """AdamW, its schedule and the batches of a step."""

    lr: float = setting(1e-6, "Peak learning rate of AdamW.", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", ge=0)
    warmup: int = setting(0, "Linear warmup steps before the cosine decay.", ge=0)
    schedule_steps: int = setting(0, "Steps the warmup-then-cosine schedule spans (0 = this "
                                  "run's; a --continue-from run keeps the schedule it "
                                  "continues). tip distill sets it to the whole loop's.", ge=0)
    epochs: int = setting(1, "Passes over the data (ignored when --max-steps is set).", ge=1)
    max_steps: int = setting(0, "Optimizer steps to run (0 = --epochs passes).", ge=0)
    train_batch_size: int = setting(4, "Sequences per micro-batch, per process.", ge=1)
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", ge=1)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 = no clipping).", ge=0)
    shuffle: bool = setting(True, "Shuffle sequences each epoch (seeded).")


@dataclass(frozen=True)
class Training:
    """The distillation loss and how a training step runs."""

    loss: str = setting("rkl-topk", "Loss on the kept tokens (docs/training.md).",
                        choices=tuple(LOSSES))
    train_chunk_size: int = setting(256, "Kept positions whose logits exist at once.", ge=1)
    gradient_checkpointing: bool = setting(False, "Recompute the body's activations in "
                                                  "backward.")
    mixed_precision: str = setting("auto", "auto (bf16 on GPU, none on CPU), no, bf16.",
                                   choices=MIXED_PRECISION)
    report_to: str = setting("none", "Also log metrics to tensorboard, wandb or trackio "
                             "(files under the output directory).", choices=TRACKERS)
    fsdp: bool = setting(False, "Shard the student's parameters, gradients and optimizer "
                               "state over the processes with FSDP2 (launch with torchrun or "
                               "accelerate launch --multi_gpu; docs/training.md).")


def _targets_problem(text: str) -> str | None:
    if text == "all-linear" or re.fullmatch(r"[\w.]+(,[\w.]+)*", text):
        return None
    return (f"--lora-targets must be all-linear or module names separated by commas, such as "
            f"q_proj,v_proj (got '{text}')")


@dataclass(frozen=True)
class Lora:
    """LoRA adapters (peft): trained instead of every weight when --lora-r > 0."""

    lora_r: int = setting(0, "LoRA rank: train adapters of this rank on a frozen base (0 = "
                             "train every weight).", ge=0)
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (the update is scaled by "
                                      "alpha / r).", gt=0)
    lora_dropout: float = setting(0.0, "Dropout on the adapters' input.", ge=0, lt=1)
    lora_targets: str = setting("all-linear", "Modules given adapters: all-linear (every "
                                "linear layer of the decoder, not the head) or names such as "
                                "q_proj,v_proj.", check=_targets_problem)


@dataclass(frozen=True)
class Grading:
    """How responses are graded against reference answers."""

    verifier: str = setting("auto", f"Grader: {', '.join(VERIFIERS)} or module:function.",
                            check=_verifier_problem)
    answer_field: str = setting("answer", "Record field holding the reference answer.")


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class RolloutConfig:
    """`tip rollout`: sample responses from the student (a rollout directory)."""

    OLD_NAMES: ClassVar[dict[str, str]] = {"top_k": "sample_top_k",
                                           "batch_size": "sample_batch_size"}

    student: str = _model("Student model:", short="-s")
    prompts: str = setting("", "Prompts: .jsonl, .parquet, .csv, a saved dataset or a hub name.",
                           required=True, short="-p")
    output: str = _output()
    sampling: Sampling = group(Sampling)
    seed: int = _seed("Random seed; the same seed gives the same rollouts on CPU.")
    shard_size: int = setting(256, "Sequences per output shard (a multiple of "
                              "--sample-batch-size).",
                              ge=1)
    source: PromptSource = group(PromptSource)
    runtime: Runtime = group(Runtime)

    def rules(self) -> list[str]:
        if self.shard_size % self.sampling.sample_batch_size:
            return ["--shard-size must be a multiple of --sample-batch-size"]
        return []


@dataclass(frozen=True)
class ScoreConfig:
    """`tip score`: score a rollout: per-token teacher and student statistics (a score
    directory)."""

    OLD_NAMES: ClassVar[dict[str, str]] = {
        "top_k": "teacher_top_k", "temperature": "score_temperature",
        "batch_size": "score_batch_size", "chunk_size": "score_chunk_size"}

    rollout: str = setting("", "Rollout directory, or - to read its path from stdin.",
                           required=True, argument="ROLLOUT_DIR")
    teacher: str = _teachers()
    output: str = _output()
    student: str = _model("Student model (default: the rollout's student).", short="-s",
                          required=False)
    scoring: Scoring = group(Scoring)
    runtime: Runtime = group(Runtime)
    checks: Checks = group(Checks)

    def rules(self) -> list[str]:
        # (tip distill refuses the same, and --device-map, which here spreads the student)
        if self.scoring.teacher_url and self.runtime.shard_teacher:
            return ["--teacher-url serves the teacher elsewhere, so there is none here to "
                    "shard: drop --shard-teacher (or --teacher-url, to load the teacher here)"]
        return _teachers_problems(self.teacher, self.scoring, self.runtime)


@dataclass(frozen=True)
class SelectConfig:
    """`tip select`: choose the tokens to train on: a selection mask over a score directory."""

    score: str = setting("", "Score directory, or - to read its path from stdin.",
                         required=True, argument="SCORE_DIR")
    output: str = _output()
    selection: Selection = group(Selection)
    seed: int = _seed("Seed for sampling and tie-breaking (same seed = same mask).")
    checks: Checks = group(Checks)


@dataclass(frozen=True)
class TrainConfig:
    """`tip train`: distil the teacher into the student on the kept tokens (a trained model
    directory)."""

    OLD_NAMES: ClassVar[dict[str, str]] = {"batch_size": "train_batch_size",
                                           "chunk_size": "train_chunk_size"}

    input: str = setting("", "Score or selection directory (rollout for *-full losses), or - "
                             "to read its path from stdin.", required=True, argument="INPUT")
    output: str = _output("Output directory: the trained model, metrics and checkpoints.")
    student: str = _model("Student model to train (default: the input's student).",
                          short="-s", required=False)
    teacher: str = _model("Teacher model, loaded during training for the *-full losses.",
                          short="-t", required=False)
    training: Training = group(Training)
    lora: Lora = group(Lora)
    selection: Selection = group(Selection)
    optim: Optim = group(Optim)
    seed: int = _seed("Seed of data order, selection and initialisation.")
    save_every: int = setting(0, "Save a resumable checkpoint every N steps (0 = never; none "
                             "after the last step, where the model is saved).", ge=0)
    continue_from: str = setting("", "A finished tip train directory whose run this one "
                                 "continues: its optimizer state and schedule position (the "
                                 "input must be sampled from its student).")
    save_state: bool = setting(True, "Write the optimizer state and schedule position at the "
                               "end (OUTPUT/state/), for a later --continue-from.")
    merged_output: str = setting("", "With --lora-r: also write the student with its adapters "
                                 "merged into its weights here (a save_pretrained directory).")
    runtime: Runtime = group(Runtime)
    checks: Checks = group(Checks)

    def rules(self) -> list[str]:
        p = []
        loss = LOSSES.get(self.training.loss)
        if loss is not None and loss.needs_teacher and not self.teacher:
            p.append(f"--loss {self.training.loss} needs --teacher")
        if self.runtime.device not in ("auto", "cpu", "cuda"):
            p.append("--device must be auto, cpu or cuda for tip train (accelerate places "
                     "each process on its own device)")
        if self.merged_output and not self.lora.lora_r:
            p.append("--merged-output writes a LoRA student merged into its base: it needs "
                     "--lora-r > 0")
        return p


@dataclass(frozen=True)
class EvalConfig:
    """`tip eval`: generate answers and grade them: accuracy with a 95% interval (a results
    directory)."""

    OLD_NAMES: ClassVar[dict[str, str]] = {"top_k": "sample_top_k",
                                           "batch_size": "sample_batch_size"}

    model: str = _model("Model to evaluate:", short="-m")
    prompts: str = setting("", "Prompts with reference answers: .jsonl, .parquet, .csv, dataset.",
                           required=True, short="-p")
    output: str = _output("Output directory for per-prompt results (empty = write nothing).",
                          required=False)
    grading: Grading = group(Grading)
    group_field: str = setting("", "Also the accuracy per value of this prompt field (the "
                               "teacher that routes each prompt, a task, a source).")
    sampling: Sampling = group(Sampling, temperature=0.0, sample_batch_size=32)
    seed: int = _seed("Random seed for sampling.")
    source: PromptSource = group(PromptSource)
    runtime: Runtime = group(Runtime)


@dataclass(frozen=True)
class ReportConfig:
    """`tip report`: token-importance report: quadrants, (h, d) histogram, strategy coverage."""

    path: str = setting("", "Score or selection directory, or - to read its path from stdin.",
                        required=True, argument="DIR")
    json: str = setting("", "Write every number shown to this JSON file.")
    png: str = setting("", "Write the (h, d) heat map and coverage curves to this PNG file.")
    export: str = setting("", "Write one row per response to this .jsonl or .parquet file.",
                          check=lambda p: None if p.endswith((".jsonl", ".parquet")) else
                          "--export must end in .jsonl or .parquet")
    show: int = setting(0, "Print N responses, tokens coloured by quadrant, selected underlined.",
                        ge=0)
    selection: Selection = group(Selection)
    seed: int = _seed("Seed of the sampled strategies.")


@dataclass(frozen=True)
class DistillConfig:
    """`tip distill`: the on-policy loop: rollout -> score -> select -> train, N times
    (resumable)."""

    OLD_NAMES: ClassVar[dict[str, str]] = {
        "top_k": "teacher_top_k", "rollout_batch_size": "sample_batch_size",
        "batch_size": "train_batch_size", "chunk_size": "train_chunk_size"}

    student: str = _model("Starting student:", short="-s")
    teacher: str = _teachers()
    prompts: str = setting("", "Training prompts: .jsonl, .parquet, .csv or a dataset.",
                           required=True, short="-p")
    output: str = _output("Run directory; every iteration's stages are kept inside.")
    iterations: int = setting(2, "On-policy iterations (rollout -> score -> select -> train).",
                              ge=1)
    prompts_per_iteration: int = setting(0, "Prompts sampled for each iteration (0 = all).",
                                         ge=0)
    sampling: Sampling = group(Sampling, num_samples=4, max_new_tokens=128,
                                sample_batch_size=16)
    scoring: Scoring = group(Scoring)
    selection: Selection = group(Selection)
    training: Training = group(Training)
    lora: Lora = group(Lora)
    optim: Optim = group(Optim, lr=1e-5, train_batch_size=8)
    eval_prompts: str = setting("", "Held-out prompts to evaluate the student on, before the "
                                "first iteration and after each (empty = no evaluation).")
    eval_max_prompts: int = setting(0, "Evaluate on the first N eval prompts (0 = all).", ge=0)
    eval_metric: str = setting("accuracy", "accuracy (grade answers against the prompts' answer "
                               "field), kl (the student's reverse KL to the teacher on its own "
                               "samples, and forward KL on the teacher's), or both.",
                               choices=("accuracy", "kl", "both"))
    eval_every: int = setting(1, "Evaluate after every N-th iteration (and after the last).",
                              ge=1)
    keep_students: str = setting("all", "Trained students kept: all, or last (an iteration's "
                                 "weights are deleted once the next iteration is trained).",
                                 choices=("all", "last"))
    grading: Grading = group(Grading)
    seed: int = _seed("Seed of sampling, selection and training.")
    source: PromptSource = group(PromptSource)
    runtime: Runtime = group(Runtime)

    def rules(self) -> list[str]:
        problems = _teachers_problems(self.teacher, self.scoring, self.runtime)
        kl = self.eval_prompts and self.eval_metric != "accuracy"
        if named_teachers_or_none(self.teacher) is not None:
            if kl:
                problems.append("--eval-metric kl compares the student with one teacher: use "
                                "--eval-metric accuracy with several teachers")
            if LOSSES[self.training.loss].needs_teacher:
                problems.append(f"--loss {self.training.loss} needs one teacher in training: "
                                "use a *-topk loss or rkl-sampled with several teachers")
        if self.runtime.shard_teacher and kl:
            problems.append("--eval-metric kl samples the teacher's own answers, which a "
                            "sharded teacher cannot do yet: use --eval-metric accuracy with "
                            "--shard-teacher")
        if self.scoring.teacher_url:
            if kl:
                problems.append("--eval-metric kl needs the teacher's whole distribution and "
                                "its own answers, which a served teacher (--teacher-url) "
                                "does not give: use --eval-metric accuracy")
            if LOSSES[self.training.loss].needs_teacher:
                problems.append(f"--loss {self.training.loss} needs the teacher in this "
                                "process, but it is served (--teacher-url): use a *-topk "
                                "loss or rkl-sampled")
            if self.runtime.shard_teacher or self.runtime.device_map:
                problems.append("--teacher-url serves the teacher elsewhere: drop "
                                "--shard-teacher and --device-map")
        return problems


@dataclass(frozen=True)
class DemoConfig:
    """`tip demo`: distil the embedded addition task (soft-or, keep 0.5): report and accuracy
    before and after."""

    output: str = setting("runs/demo", "Where the demo writes its run.", short="-o")
    quick: bool = setting(False, "A seconds-long version (one short iteration).")
    models: str = setting("", "A folder with student/ and teacher/ to run the demo on "
                          "(default: the pair the package ships; with --rebuild, where to "
                          "build: default tip's cache).")
    rebuild: bool = setting(False, "Train a new pair first (a few minutes; another CPU builds "
                            "other models), then run the demo on it.")
    cross_teacher: bool = setting(False, "Distil from the teacher with another tokenizer "
                                  "(teacher-bpe/: a byte-level BPE), aligned by character "
                                  "offsets (--cross-tokenizer), with --loss rkl-sampled.")


@dataclass(frozen=True)
class StudentConfig:
    """`tip student`: cut a smaller student from a teacher by removing decoder layers (a
    model directory)."""

    teacher: str = setting("", "Teacher model to cut: hub id, local directory or .gguf file.",
                           required=True, argument="TEACHER")
    output: str = _output("Output directory: the student (a save_pretrained directory) and a "
                          "manifest of the layers kept.")
    drop_layers: str = setting("", "Decoder layers to remove, counted from 0: 5,7,12 or 4-7.",
                               check=_layers_problem("--drop-layers"))
    keep_layers: str = setting("", "Decoder layers to keep instead (the others are removed): "
                               "0-9,20-29.", check=_layers_problem("--keep-layers"))

    def rules(self) -> list[str]:
        if not self.drop_layers and not self.keep_layers:
            return ["--drop-layers or --keep-layers is required: the decoder layers to remove, "
                    "or those to keep"]
        if self.drop_layers and self.keep_layers:
            return ["--drop-layers and --keep-layers exclude each other: give one of them"]
        return []


def current_config(stage: str, flat: dict) -> dict:
    """A stage's settings as its manifest stores them, under today's names (a directory
    that tip 0.1 wrote keeps the old ones)."""
    cls = STAGE_CONFIGS.get(stage)
    return flat if cls is None else current_names(cls, flat, notice=False)[0]


STAGE_CONFIGS = {"rollout": RolloutConfig, "score": ScoreConfig, "select": SelectConfig,
                 "train": TrainConfig, "eval": EvalConfig, "report": ReportConfig,
                 "distill": DistillConfig, "demo": DemoConfig, "student": StudentConfig}
STAGES.update(STAGE_CONFIGS)  # settings files that are a stage's manifest are read by them
