"""What each stage is: its name, the settings naming what it reads, the files it writes.

Every stage writes one directory. Each file and folder name in it is defined here, once,
beside the stage that writes it; the stage modules, ``--overwrite``
(``tipcli.store.outputs``: it deletes these names and nothing else) and the readers take
them from here. A stage writes through ``tipcli.store.stagedir.StageWriter`` (settings and
output checked before any model loads; then it starts or resumes the directory and marks
it complete). Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# every stage
MANIFEST = "manifest.json"              # settings, models, tokenizer, shards, summary
HIDDEN_TMP = ".*.tmp"                   # what an interrupted write leaves; removed on resume
PROGRESS = ".progress-{}.json"          # a process's finished shards (several processes)
# rollout, score, select
SHARD = "shard-{:05d}.safetensors"
PROMPT_RECORDS = "prompts.jsonl"        # rollout: the prompt records it sampled, every field
# train: a transformers checkpoint at the top, plus
METRICS = "metrics.jsonl"               # one line per optimizer step
CHECKPOINTS = "checkpoints"             # the latest resumable state (--save-every)
LOGS = "logs"                           # --report-to's files (train and distill)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors",
               "model-*-of-*.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt")
# eval
RESULTS = "results.jsonl"               # one line per response
LEGACY_EVAL_SUMMARY = "summary.json"    # where tip 0.1 kept an evaluation's summary
# distill
ITERATION = "iter-{:03d}"               # one iteration's stages
ITERATION_ROW = "iteration.json"        # an iteration's summary, once it has finished
ITERATION_PROMPTS = "prompts.jsonl"     # the prompts it sampled
EVALUATIONS = "eval-*"                  # the starting student's and the teacher's


def pattern(name: str) -> str:
    """A name with a ``{}`` field as a glob pattern: ``shard-{:05d}...`` gives
    ``shard-[0-9][0-9][0-9][0-9][0-9]...``, ``{}`` gives ``*``."""
    m = re.search(r"\{(:0?(\d+)d)?\}", name)
    if m is None:
        return name
    return name[:m.start()] + ("[0-9]" * int(m.group(2)) if m.group(2) else "*") + name[m.end():]


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]   # settings holding paths it reads (never its output)
    files: tuple[str, ...]    # what it writes into its output (names or patterns)
    sharded: bool = False     # its data lies in shards: a finished one lists at least one

    @property
    def patterns(self) -> tuple[str, ...]:
        """What ``--overwrite`` may delete: these files, leftovers of interrupted writes."""
        return (*map(pattern, self.files), HIDDEN_TMP, pattern(PROGRESS))


ROLLOUT = Stage("rollout", ("prompts", "student"), (MANIFEST, SHARD, PROMPT_RECORDS),
                sharded=True)
SCORE = Stage("score", ("rollout", "teacher", "student"), (MANIFEST, SHARD), sharded=True)
SELECT = Stage("select", ("score",), (MANIFEST, SHARD), sharded=True)
TRAIN = Stage("train", ("input", "student", "teacher"),
              (MANIFEST, METRICS, CHECKPOINTS, LOGS, *MODEL_FILES))
EVAL = Stage("eval", ("model", "prompts"), (MANIFEST, RESULTS, LEGACY_EVAL_SUMMARY))
DISTILL = Stage("distill", ("prompts", "student", "teacher", "eval_prompts"),
                (MANIFEST, ITERATION, EVALUATIONS, LOGS))
STUDENT = Stage("student", ("teacher",), (MANIFEST, *MODEL_FILES))
STAGES = {s.name: s for s in (ROLLOUT, SCORE, SELECT, TRAIN, EVAL, DISTILL, STUDENT)}
