"""`tip score`: teacher and student statistics for every response token.

    tip score runs/rollout --teacher runs/tiny/teacher -o runs/score --top-k 64

For each response token: student and teacher log-prob of the sampled token, student and
teacher entropy, reverse KL, forward KL and JSD (exact over the real vocabulary), and
the teacher's top-k ids and log-probs. One score shard per rollout shard, carrying the
rollout's tensors too, so later stages need only the score directory. A killed run,
started again, resumes after its last complete shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tipcli.config import option, to_dict


@dataclass(frozen=True)
class ScoreConfig:
    rollout: str = option("", "Rollout directory to score.")
    teacher: str = option("", "Teacher model: hub id, local directory or .gguf file.")
    output: str = option("", "Output directory.")
    student: str = option("", "Student model (default: the rollout's student).")
    top_k: int = option(64, "Teacher top-k ids and log-probs stored per token (0 = none).")
    temperature: float = option(1.0, "Temperature applied to both models' logits.")
    batch_size: int = option(8, "Sequences per forward pass.")
    chunk_size: int = option(0, "Positions whose logits exist at once (0 = auto: about 2^22 logits).")
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:1 ...")
    dtype: str = option("auto", "Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")
    trust_remote_code: bool = option(False, "Allow model code from the hub (only if you trust it).")

    def validate(self) -> list[str]:
        p = []
        if not self.rollout:
            p.append("a rollout directory is required")
        if not self.teacher:
            p.append("--teacher is required")
        if not self.output:
            p.append("-o/--output is required")
        if self.top_k < 0:
            p.append("--top-k must be >= 0")
        if self.temperature <= 0:
            p.append("--temperature must be > 0")
        if self.batch_size < 1:
            p.append("--batch-size must be at least 1")
        if self.chunk_size < 0:
            p.append("--chunk-size must be >= 0 (0 = auto)")
        return p


def run_score(cfg: ScoreConfig, overwrite: bool = False, student=None, teacher=None,
              tokenizer=None) -> Path:
    """Score a rollout directory and write a score directory; returns its path.

    Already loaded ``student``/``teacher``/``tokenizer`` may be passed in."""
    from tipcli.models import (check_model_fits_vocab, check_same_vocab, load_model,
                               load_tokenizer, model_ref, resolve_device, resolve_dtype,
                               tokenizer_info)
    from tipcli.shards import StageDir, StageWriter
    from tipcli.errors import TipError

    rollout = StageDir.open(cfg.rollout, stage="rollout")
    student_name = cfg.student or rollout.manifest["models"]["student"]["id"]
    s_tok = tokenizer or load_tokenizer(student_name, cfg.trust_remote_code)
    t_tok = load_tokenizer(cfg.teacher, cfg.trust_remote_code) if teacher is None else s_tok
    check_same_vocab(s_tok, t_tok, student_name, cfg.teacher)
    if tokenizer_info(s_tok)["fingerprint"] != rollout.manifest["tokenizer"]["fingerprint"]:
        raise TipError(f"student {student_name} tokenizer differs from the one that wrote "
                       f"{cfg.rollout}; pass the rollout's student with --student")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    student = student or load_model(student_name, device, dtype, cfg.trust_remote_code)
    teacher = teacher or load_model(cfg.teacher, device, dtype, cfg.trust_remote_code)
    for m, name in ((student, student_name), (teacher, cfg.teacher)):
        check_model_fits_vocab(m, s_tok, name)
    resolved = {**to_dict(cfg), "student": student_name}
    writer = StageWriter(cfg.output, "score", resolved,
                         {"student": model_ref(student_name, student),
                          "teacher": model_ref(cfg.teacher, teacher)},
                         tokenizer_info(s_tok), parent=rollout, overwrite=overwrite)
    if not writer.complete:
        _score_shards(cfg, rollout, writer, student, teacher, s_tok)
    return writer.finish()


def _score_shards(cfg, rollout, writer, student, teacher, tok) -> None:
    import torch

    from tipcli.forward import collate, response_hidden
    from tipcli.models import real_vocab_size
    from tipcli.progress import progress
    from tipcli.shards import split_sequences
    from tipcli.stats import auto_chunk, head_logits, token_stats

    vocab = real_vocab_size(tok)
    s_logits = head_logits(student, vocab, cfg.temperature)
    t_logits = head_logits(teacher, vocab, cfg.temperature)
    s_dev = next(student.parameters()).device
    t_dev = next(teacher.parameters()).device
    done_tokens = sum(s["num_tokens"] for s in rollout.shards[:writer.num_done])
    with progress() as bar:
        task = bar.add_task("score", total=rollout.num_tokens, tokens=0)
        bar.update(task, advance=done_tokens)
        scored = 0
        for si in range(writer.num_done, len(rollout.shards)):
            shard = rollout.load_shard(si)
            seqs = split_sequences(shard)
            parts: dict[str, list[torch.Tensor]] = {}
            for a in range(0, len(seqs), cfg.batch_size):
                batch = collate(seqs[a:a + cfg.batch_size], tok.pad_token_id)
                with torch.no_grad():
                    hs = response_hidden(student, batch, s_dev)
                    ht = response_hidden(teacher, batch, t_dev)
                    stats = token_stats(hs, ht, batch.tokens_P, s_logits, t_logits, cfg.top_k,
                                        auto_chunk(cfg.chunk_size, vocab))
                for k, v in stats.items():
                    parts.setdefault(k, []).append(v)
                scored += int(batch.tokens_P.numel())
                bar.update(task, advance=int(batch.tokens_P.numel()), tokens=scored)
            out = dict(shard)
            out.update({k: torch.cat(v) for k, v in parts.items()})
            out["prompt_lengths"] = shard["prompt_offsets"].diff()
            writer.write_shard(si, out)
