"""`tip score`: teacher and student statistics for every response token.

    tip score runs/rollout --teacher runs/tiny/teacher -o runs/score --teacher-top-k 64

For each response token: student and teacher log-prob of the sampled token, student and
teacher entropy, reverse KL, forward KL and JSD (exact over the real vocabulary), and
the teacher's top-k ids and log-probs. One score shard per rollout shard, carrying the
rollout's tensors too, so later stages need only the score directory. A killed run,
started again, resumes after its last complete shard. A model whose context is shorter
than the rollout's longest sequence is refused before scoring, and a statistic that is
NaN or infinite (NaN weights, float16 overflow) stops the run before its shard is written.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from tipcli.configs import ScoreConfig, to_flat
from tipcli.dist.processes import Processes, processes
from tipcli.errors import TipError
from tipcli.models import loading
from tipcli.models.loading import (
    check_model_fits_vocab,
    check_tokenizer_matches,
    context_length,
    input_device,
    load_tokenizer,
    model_ref,
    real_vocab_size,
    resolve_dtype,
    tokenizer_info,
)
from tipcli.models.teacher import StudentSide, Teacher, make_teacher
from tipcli.ops.forward import collate, head_logits, response_hidden
from tipcli.ops.stats import auto_chunk
from tipcli.progress import progress_task
from tipcli.records import RolloutBatch, ScoredBatch
from tipcli.store.files import sha256_file
from tipcli.store.layout import PROMPT_RECORDS, SCORE
from tipcli.store.stagedir import StageDir, StageWriter


def run_score(cfg: ScoreConfig, overwrite: bool = False, student=None, teacher=None,
              tokenizer=None) -> Path:
    """Score a rollout directory and write a score directory; returns its path.

    Already loaded ``student``/``teacher``/``tokenizer`` may be passed in (the teacher as
    a model, or a ``Teacher`` as the loop holds it, ``tipcli.models.teacher``). Under a
    launcher each process scores its share of the shards (``tipcli.dist.processes``); with
    ``--shard-teacher`` the teacher is sharded over them."""
    run = StageWriter.for_run(SCORE, cfg, overwrite)
    rt = cfg.runtime
    procs = processes(rt.device, rt.dist_timeout)
    rollout = StageDir.open(cfg.rollout, stage="rollout", verify=cfg.checks.verify_checksums)
    student_name = cfg.student or rollout.manifest["models"]["student"]["id"]
    s_tok = tokenizer or load_tokenizer(student_name, rt.trust_remote_code)
    check_tokenizer_matches(s_tok, rollout.manifest, student_name, cfg.rollout)
    device = procs.device_for(rt.device)
    dtype = resolve_dtype(rt.dtype, device)
    student = student or loading.load_model(student_name, device, dtype, rt.trust_remote_code,
                                    rt.device_map, rt.max_memory)
    check_model_fits_vocab(student, s_tok, student_name)
    own = teacher is None or isinstance(teacher, torch.nn.Module)
    teacher = make_teacher(cfg.teacher, s_tok, rt, procs, device, dtype, scoring=cfg.scoring,
                           model=teacher, student=student_name)
    try:
        give_prompts(teacher, rollout, s_tok)
        check_context(rollout, {f"the student {student_name}": context_length(student),
                                f"the teacher {cfg.teacher}": teacher.context()})
        writer = run.start({"student": model_ref(student_name, student),
                            "teacher": teacher.ref()}, tokenizer_info(s_tok), parent=rollout,
                           config=_resolved(cfg, student_name, s_tok, teacher),
                           reads=(student_name,), procs=procs, launch=("teacher_timeout",))
        if not writer.complete:
            _score_shards(cfg, rollout, writer, student, teacher, s_tok,
                          writer.todo(len(rollout.shards)), procs)
    finally:
        if own:
            teacher.close()
    summary = {"statistics": teacher.statistics, "policy_version": rollout.policy_version}
    if hasattr(teacher, "summary"):  # several teachers: tokens and exactness of each
        summary["teachers"] = teacher.summary(rollout)
    return writer.finish(summary, num_shards=len(rollout.shards))


def _resolved(cfg: ScoreConfig, student_name: str, tok, teacher) -> dict:
    """What is stored as the settings: the student actually used, no more top-k columns
    than tokens, a served teacher's address as asked (--teacher-timeout may change on a
    resume)."""
    out = {**to_flat(cfg), "student": student_name,
           "teacher_top_k": min(cfg.scoring.teacher_top_k, real_vocab_size(tok))}
    if getattr(teacher, "url", None):
        out["teacher_url"] = teacher.url
    return out


def _score_shards(cfg: ScoreConfig, rollout: StageDir, writer, student, teacher: Teacher,
                  tok, todo: list[int], procs: Processes) -> None:
    """Score this process's ``todo`` shards. A collective teacher (sharded) runs as many
    batches on every process as the busiest one has, idle ones on a one-token input."""
    sc = cfg.scoring
    vocab = real_vocab_size(tok)
    top_k = min(sc.teacher_top_k, vocab)
    s_logits = head_logits(student, vocab, sc.score_temperature)
    s_dev = input_device(student)
    chunk = auto_chunk(sc.score_chunk_size, vocab,
                       teacher.device if teacher.in_process else s_dev)
    total = sum(rollout.shards[i]["num_tokens"] for i in todo)
    batches = sum(-(-rollout.shards[i]["num_sequences"] // sc.score_batch_size) for i in todo)
    most = max(procs.gather(batches)) if teacher.collective else batches
    version = rollout.policy_version
    with progress_task("score", total, procs.main) as advance:
        for si in todo:
            batch = RolloutBatch.from_tensors(rollout.load_shard(si), version)
            scored = score_batch(batch, si, student, s_logits, s_dev, teacher, tok, sc,
                                 top_k, chunk, advance)
            check_finite(scored.statistics(), si, cfg.output)
            writer.write_shard(si, scored.tensors(), policy_version=version)
    for _ in range(most - batches):  # in step with the busiest process
        teacher.idle()


def score_batch(batch: RolloutBatch, shard: int, student, s_logits, s_dev, teacher: Teacher,
                tok, sc, top_k: int, chunk: int, advance=None) -> ScoredBatch:
    """A rollout batch scored ``sc.score_batch_size`` sequences at a time: the student's
    hidden states here, the rest from the teacher (``Teacher.signals``)."""
    seqs = batch.sequences()
    names = [f"shard {shard}, sequence {i}"
             + (f" (prompt {int(s['prompt_index'])})" if "prompt_index" in s else "")
             for i, s in enumerate(seqs)]
    runs = [(None, list(range(len(seqs))))]
    if getattr(teacher, "one_at_a_time", False):  # several teachers, one loaded at a time
        route = [teacher.route(s, n) for s, n in zip(seqs, names)]
        runs = [(t, [i for i in range(len(seqs)) if route[i] == t])
                for t in range(len(teacher.names))]
    parts: dict[str, list[torch.Tensor]] = {}
    scored: list[int] = []  # the sequences in the order scored
    for held, order in runs:
        if not order:
            continue
        with teacher.holding(held) if held is not None else contextlib.nullcontext():
            for a in range(0, len(order), sc.score_batch_size):
                at = order[a:a + sc.score_batch_size]
                part = [seqs[i] for i in at]
                collated = collate(part, tok.pad_token_id)
                with torch.no_grad():
                    hs = response_hidden(student, collated, s_dev)
                stats = teacher.signals(collated, part, [names[i] for i in at],
                                        StudentSide(hs, s_logits), top_k, chunk)
                for k, v in stats.items():
                    parts.setdefault(k, []).append(v)
                scored += at
                if advance:
                    advance(int(collated.tokens_P.numel()), tokens=int(collated.tokens_P.numel()))
    stats = {k: torch.cat(v) for k, v in parts.items()}
    if scored != sorted(scored):  # teacher by teacher: back in the shard's order
        lengths = [int(seqs[i]["response_ids"].numel()) for i in scored]
        back = sorted(range(len(scored)), key=scored.__getitem__)
        stats = {k: torch.cat([pieces[j] for j in back])
                 for k, pieces in ((k, v.split(lengths)) for k, v in stats.items())}
    return ScoredBatch.from_statistics(batch, stats)


def give_prompts(teacher: Teacher, rollout: StageDir, tok) -> None:
    """Hand the teacher the prompt records ``rollout`` was sampled from (a teacher with
    another tokenizer renders them with its own chat template; several teachers route by
    them); they must be the prompts the rollout's student saw (the same token ids,
    ``prompts_sha256``)."""
    if not hasattr(teacher, "use_prompts"):
        return
    from dataclasses import fields

    from tipcli.configs import PromptSource
    from tipcli.models.prompts import encode_prompt, load_prompts
    from tipcli.stages.rollout import ids_sha256

    conf = rollout.manifest["config"]
    source = PromptSource(**{f.name: conf[f.name] for f in fields(PromptSource)
                             if f.name in conf})
    records, where = rollout_records(rollout), rollout.path / PROMPT_RECORDS
    if records is None:  # a rollout of an earlier tip: the prompts file it names
        records, where = load_prompts(conf["prompts"], source), conf["prompts"]
    if ids_sha256([encode_prompt(tok, r, source) for r in records]) != \
            rollout.manifest.get("inputs", {}).get("prompts_sha256"):
        raise TipError(f"the prompts {where} are not those {rollout.path} was sampled "
                       "from (changed since, or cut to fit the student's context): a teacher "
                       "with another tokenizer renders each prompt from its record, and several "
                       "teachers are routed by it; sample the rollout again from these prompts")
    teacher.use_prompts(records, source)


def rollout_records(rollout: StageDir) -> list[dict] | None:
    """The prompt records ``rollout`` sampled, every field, from its own copy (checked
    against the manifest's checksum); None for a rollout that keeps none."""
    kept = rollout.manifest.get("summary", {}).get("prompt_records")
    path = rollout.path / PROMPT_RECORDS
    if not kept or not path.is_file():
        return None
    if sha256_file(path) != kept["sha256"]:
        raise TipError(f"{path} does not match its checksum in {rollout.path}/manifest.json "
                       "(changed since tip rollout wrote it): sample the rollout again")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_finite(stats: dict[str, torch.Tensor], shard: int, output: str) -> None:
    """Every statistic of ``shard`` is finite: a NaN or an infinity is never written."""
    for name, values in stats.items():
        bad = int((~torch.isfinite(values)).sum()) if values.is_floating_point() else 0
        if bad:
            raise TipError(f"shard {shard}'s {name} is NaN or infinite at {bad} of its "
                           f"{values.numel()} values, so it is not written: likely a teacher "
                           "or student with NaN or infinite weights, or logits that overflow in "
                           "float16 (--dtype); check the models, then run the same command "
                           f"again: the complete shards in {output} are kept")


def check_context(rollout: StageDir, contexts: dict[str, int | None]) -> None:
    """Each model's context (by role and name: its config's ``max_position_embeddings``;
    None where not known) holds the rollout's longest sequence: scored past its context, a
    model gives numbers without a word of warning."""
    if not any(contexts.values()):
        return
    longest, where = 0, ""
    for si in range(len(rollout.shards)):
        shard = rollout.load_shard(si, ("prompt_offsets", "response_offsets"))
        lengths_N = shard["prompt_offsets"].diff() + shard["response_offsets"].diff()
        if lengths_N.numel() and int(lengths_N.max()) > longest:
            longest = int(lengths_N.max())
            where = f"sequence {int(lengths_N.argmax())} of shard {si}"
    for role, context in contexts.items():
        if context and longest > context:
            raise TipError(f"{role} has a context of {context} tokens (max_position_embeddings), "
                           f"but {where} of {rollout.path} is {longest} tokens long (prompt and "
                           "response): score with a model whose context holds the rollout's "
                           "sequences, or sample shorter ones (tip rollout --max-new-tokens, "
                           "shorter prompts)")
