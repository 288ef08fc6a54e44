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

import hashlib
from pathlib import Path

import torch

from tipcli.configs import ScoreConfig, to_flat
from tipcli.dist.processes import Processes, processes
from tipcli.engines.served import ServedTeacher
from tipcli.errors import TipError
from tipcli.models.loading import (
    check_model_fits_vocab,
    check_same_vocab,
    check_tokenizer_matches,
    input_device,
    load_model,
    load_tokenizer,
    model_ref,
    real_vocab_size,
    resolve_dtype,
    tokenizer_info,
)
from tipcli.models.teacher import ShardedTeacher, WholeTeacher, load_teacher, teacher_for
from tipcli.ops.forward import collate, head_logits, response_hidden
from tipcli.ops.stats import (
    EXACT_STATISTICS,
    SERVED_STATISTICS,
    auto_chunk,
    served_stats,
    token_stats,
)
from tipcli.progress import progress_task
from tipcli.store.layout import SCORE
from tipcli.store.stagedir import StageDir, StageWriter, split_sequences


def run_score(cfg: ScoreConfig, overwrite: bool = False, student=None, teacher=None,
              tokenizer=None) -> Path:
    """Score a rollout directory and write a score directory; returns its path.

    Already loaded ``student``/``teacher``/``tokenizer`` may be passed in (the teacher as
    a model, or as the loop holds it: whole or sharded, ``tipcli.models.teacher``). Under a
    launcher each process scores its share of the shards (``tipcli.dist.processes``); with
    ``--shard-teacher`` the teacher is sharded over them."""
    run = StageWriter.for_run(SCORE, cfg, overwrite)
    rt = cfg.runtime
    procs = processes(rt.device, rt.dist_timeout)
    rollout = StageDir.open(cfg.rollout, stage="rollout")
    student_name = cfg.student or rollout.manifest["models"]["student"]["id"]
    s_tok = tokenizer or load_tokenizer(student_name, rt.trust_remote_code)
    check_tokenizer_matches(s_tok, rollout.manifest, student_name, cfg.rollout)
    device = procs.device_for(rt.device)
    dtype = resolve_dtype(rt.dtype, device)
    student = student or load_model(student_name, device, dtype, rt.trust_remote_code,
                                    rt.device_map, rt.max_memory)
    check_model_fits_vocab(student, s_tok, student_name)
    side, own = _teacher(cfg, teacher, s_tok, student_name, device, dtype, procs)
    try:
        served = isinstance(side, ServedTeacher)
        check_context(rollout, {f"the student {student_name}": student,
                                **({} if served else {f"the teacher {cfg.teacher}": side.model})})
        # what is stored: the student actually used, no more top-k columns than tokens,
        # the server's address as asked, and which statistics are exact (a served
        # teacher's divergences are estimates); --teacher-timeout may change on a resume
        resolved = {**to_flat(cfg), "student": student_name,
                    "teacher_top_k": min(cfg.scoring.teacher_top_k, real_vocab_size(s_tok)),
                    **({"teacher_url": side.url} if served else {})}
        writer = run.start({"student": model_ref(student_name, student),
                             "teacher": teacher_ref(cfg, side)},
                            tokenizer_info(s_tok), parent=rollout, config=resolved,
                            reads=(student_name,), procs=procs, launch=("teacher_timeout",))
        if not writer.complete:
            _score_shards(cfg, rollout, writer, student, side, s_tok,
                          writer.todo(len(rollout.shards)), procs)
    finally:
        if own:
            side.close()
    statistics = SERVED_STATISTICS if isinstance(side, ServedTeacher) else EXACT_STATISTICS
    return writer.finish({"statistics": statistics}, num_shards=len(rollout.shards))


def _teacher(cfg: ScoreConfig, teacher, tok, student_name: str, device, dtype, procs):
    """(the teacher as this run holds it, whether this run made it and closes it): as
    handed in (a model, or the loop's whole, sharded or served teacher), served at
    ``--teacher-url``, or loaded (whole, spread, or sharded with ``--shard-teacher``)."""
    rt = cfg.runtime
    if isinstance(teacher, (ShardedTeacher, WholeTeacher, ServedTeacher)):
        return teacher, False
    if cfg.scoring.teacher_url:
        sc = cfg.scoring
        return ServedTeacher(sc.teacher_url, cfg.teacher, tok, sc.teacher_top_k,
                             sc.teacher_concurrency, sc.teacher_timeout), False
    if teacher is None:
        check_same_vocab(tok, load_tokenizer(cfg.teacher, rt.trust_remote_code), student_name,
                         cfg.teacher)
        side = load_teacher(cfg.teacher, device, dtype, rt, procs)
        check_model_fits_vocab(side.model, tok, cfg.teacher)
        return side, True
    check_model_fits_vocab(teacher, tok, cfg.teacher)
    return teacher_for(teacher, rt.shard_teacher, procs), True


def teacher_ref(cfg: ScoreConfig, side) -> dict:
    """The teacher's provenance in the manifest; a served one by its name and address."""
    if isinstance(side, ServedTeacher):
        key = hashlib.sha256(f"served:{side.url}:{side.name}".encode()).hexdigest()
        return {"id": cfg.teacher, "url": side.url, "revision": None, "fingerprint": key}
    return model_ref(cfg.teacher, side.model)


def _score_shards(cfg: ScoreConfig, rollout, writer, student, teacher, tok, todo: list[int],
                  procs: Processes) -> None:
    """Score this process's ``todo`` shards; ``teacher`` is whole, sharded (then every
    process runs as many batches as the busiest one, idle ones on a one-token input) or
    served (its top-k asked for each batch's responses)."""
    sc = cfg.scoring
    vocab = real_vocab_size(tok)
    top_k = min(sc.teacher_top_k, vocab)
    s_logits = head_logits(student, vocab, sc.score_temperature)
    served = isinstance(teacher, ServedTeacher)
    t_logits = None if served else head_logits(teacher.model, vocab, sc.score_temperature)
    s_dev = input_device(student)
    chunk = auto_chunk(sc.score_chunk_size, vocab, s_dev if served else teacher.device)
    total = sum(rollout.shards[i]["num_tokens"] for i in todo)
    batches = sum(-(-rollout.shards[i]["num_sequences"] // sc.score_batch_size) for i in todo)
    # a sharded teacher's forward is a collective: every process runs the busiest's count
    most = max(procs.gather(batches)) if isinstance(teacher, ShardedTeacher) else batches
    with progress_task("score", total, procs.main) as advance:
        for si in todo:
            shard = rollout.load_shard(si)
            seqs = split_sequences(shard)
            parts: dict[str, list[torch.Tensor]] = {}
            for a in range(0, len(seqs), sc.score_batch_size):
                batch = collate(seqs[a:a + sc.score_batch_size], tok.pad_token_id)
                with torch.no_grad():
                    hs = response_hidden(student, batch, s_dev)
                if served:
                    stats = served_stats(hs, batch.tokens_P, s_logits,
                                         _asked(teacher, seqs[a:a + sc.score_batch_size], si, a),
                                         chunk)
                else:
                    with torch.no_grad():
                        ht = teacher.hidden(batch.input_ids_BT, batch.attention_mask_BT)
                        ht = ht[batch.rows_P.to(ht.device), batch.cols_P.to(ht.device)]
                        with teacher.gathered_head():
                            stats = token_stats(hs, ht, batch.tokens_P, s_logits, t_logits,
                                                top_k, chunk)
                for k, v in stats.items():
                    parts.setdefault(k, []).append(v)
                advance(int(batch.tokens_P.numel()), tokens=int(batch.tokens_P.numel()))
            out = dict(shard)
            out.update({k: torch.cat(v) for k, v in parts.items()})
            out["prompt_lengths"] = shard["prompt_offsets"].diff()
            check_finite({k: out[k] for k in parts}, si, cfg.output)
            writer.write_shard(si, out)
    for _ in range(most - batches):  # in step with the busiest process
        teacher.idle(s_dev)


def _asked(teacher: ServedTeacher, seqs, shard: int, first: int) -> dict[str, torch.Tensor]:
    """The served teacher's answers for a batch of sequences (those from ``first`` on in
    ``shard``, so named in errors), joined in order."""
    names = [f"shard {shard}, sequence {first + i}"
             + (f" (prompt {int(s['prompt_index'])})" if "prompt_index" in s else "")
             for i, s in enumerate(seqs)]
    answers = teacher.score([(s["prompt_ids"].tolist(), s["response_ids"].tolist())
                             for s in seqs], names)
    return {k: torch.cat([a[k] for a in answers]) for k in answers[0]}


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


def check_context(rollout: StageDir, models: dict) -> None:
    """Each of ``models`` (by role and name; a model's context is its config's
    ``max_position_embeddings``, where it has one) holds the rollout's longest sequence:
    scored past its context, a model gives numbers without a word of warning."""
    contexts = {role: getattr(getattr(m, "config", None), "max_position_embeddings", None)
                for role, m in models.items()}
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
