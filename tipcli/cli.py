"""The `tip` command line: parse flags, build a config, call one library function, render.

Heavy libraries (torch, transformers) are imported inside the stage functions, so
`tip --help` is instant. Settings resolve as defaults < --config FILE < flags. Each stage
prints its output directory as the last line of stdout; everything else goes to stderr.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Optional

import typer

from tipcli.config import field_help
from tipcli.distill import DistillConfig
from tipcli.evaluate import EvalConfig
from tipcli.rollout import RolloutConfig
from tipcli.score import ScoreConfig
from tipcli.train import TrainConfig

app = typer.Typer(
    name="tip",
    help="On-policy distillation with token-importance selection: "
         "rollout -> score -> select -> train -> report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CONFIG_HELP = "Settings file (.json, .toml, .yaml); flags override it."
OVERWRITE_HELP = "Replace an existing output directory instead of resuming it."


@contextmanager
def user_errors():
    """Turn a TipError into one red line on stderr and exit code 2 (no traceback)."""
    from tipcli.errors import TipError

    try:
        yield
    except TipError as exc:
        from tipcli.progress import console

        msg = " ".join(str(exc).split())
        console.print(f"error: {msg}", style="red", markup=False, highlight=False,
                      soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def resolve_input(path: str) -> str:
    from tipcli.shards import read_path_arg

    return str(read_path_arg(path))


@app.command()
def rollout(
    student: Optional[str] = typer.Option(None, "--student", "-s", help=field_help(RolloutConfig, "student")),
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help=field_help(RolloutConfig, "prompts")),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=field_help(RolloutConfig, "output")),
    num_samples: Optional[int] = typer.Option(None, help=field_help(RolloutConfig, "num_samples")),
    temperature: Optional[float] = typer.Option(None, help=field_help(RolloutConfig, "temperature")),
    top_p: Optional[float] = typer.Option(None, help=field_help(RolloutConfig, "top_p")),
    top_k: Optional[int] = typer.Option(None, help=field_help(RolloutConfig, "top_k")),
    max_new_tokens: Optional[int] = typer.Option(None, help=field_help(RolloutConfig, "max_new_tokens")),
    seed: Optional[int] = typer.Option(None, help=field_help(RolloutConfig, "seed")),
    batch_size: Optional[int] = typer.Option(None, help=field_help(RolloutConfig, "batch_size")),
    shard_size: Optional[int] = typer.Option(None, help=field_help(RolloutConfig, "shard_size")),
    max_prompts: Optional[int] = typer.Option(None, help=field_help(RolloutConfig, "max_prompts")),
    prompt_field: Optional[str] = typer.Option(None, help=field_help(RolloutConfig, "prompt_field")),
    messages_field: Optional[str] = typer.Option(None, help=field_help(RolloutConfig, "messages_field")),
    split: Optional[str] = typer.Option(None, help=field_help(RolloutConfig, "split")),
    device: Optional[str] = typer.Option(None, help=field_help(RolloutConfig, "device")),
    dtype: Optional[str] = typer.Option(None, help=field_help(RolloutConfig, "dtype")),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help=field_help(RolloutConfig, "trust_remote_code")),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Sample responses from the student (a rollout directory)."""
    from tipcli.config import resolve
    from tipcli.progress import emit_path
    from tipcli.rollout import run_rollout

    with user_errors():
        cfg = resolve(RolloutConfig, config, student=student, prompts=prompts, output=output,
                      num_samples=num_samples, temperature=temperature, top_p=top_p, top_k=top_k,
                      max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                      shard_size=shard_size, max_prompts=max_prompts, prompt_field=prompt_field,
                      messages_field=messages_field, split=split, device=device, dtype=dtype,
                      trust_remote_code=trust_remote_code)
        path = run_rollout(cfg, overwrite=overwrite)
    emit_path(path)


@app.command()
def score(
    rollout_dir: str = typer.Argument(..., metavar="ROLLOUT_DIR", help="Rollout directory, or - to read its path from stdin."),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help=field_help(ScoreConfig, "teacher")),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=field_help(ScoreConfig, "output")),
    student: Optional[str] = typer.Option(None, "--student", "-s", help=field_help(ScoreConfig, "student")),
    top_k: Optional[int] = typer.Option(None, help=field_help(ScoreConfig, "top_k")),
    temperature: Optional[float] = typer.Option(None, help=field_help(ScoreConfig, "temperature")),
    batch_size: Optional[int] = typer.Option(None, help=field_help(ScoreConfig, "batch_size")),
    chunk_size: Optional[int] = typer.Option(None, help=field_help(ScoreConfig, "chunk_size")),
    device: Optional[str] = typer.Option(None, help=field_help(ScoreConfig, "device")),
    dtype: Optional[str] = typer.Option(None, help=field_help(ScoreConfig, "dtype")),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help=field_help(ScoreConfig, "trust_remote_code")),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Score a rollout: per-token teacher and student statistics (a score directory)."""
    from tipcli.config import resolve
    from tipcli.progress import emit_path
    from tipcli.score import run_score

    with user_errors():
        cfg = resolve(ScoreConfig, config, rollout=resolve_input(rollout_dir), teacher=teacher,
                      output=output, student=student, top_k=top_k, temperature=temperature,
                      batch_size=batch_size, chunk_size=chunk_size, device=device, dtype=dtype,
                      trust_remote_code=trust_remote_code)
        path = run_score(cfg, overwrite=overwrite)
    emit_path(path)


@app.command()
def train(
    input_dir: str = typer.Argument(..., metavar="INPUT", help="Score or selection directory (rollout for *-full losses), or - to read its path from stdin."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=field_help(TrainConfig, "output")),
    student: Optional[str] = typer.Option(None, "--student", "-s", help=field_help(TrainConfig, "student")),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help=field_help(TrainConfig, "teacher")),
    loss: Optional[str] = typer.Option(None, help=field_help(TrainConfig, "loss")),
    strategy: Optional[str] = typer.Option(None, help=field_help(TrainConfig, "strategy")),
    keep: Optional[float] = typer.Option(None, help=field_help(TrainConfig, "keep")),
    scope: Optional[str] = typer.Option(None, help=field_help(TrainConfig, "scope")),
    divergence: Optional[str] = typer.Option(None, help=field_help(TrainConfig, "divergence")),
    normalize: Optional[str] = typer.Option(None, help=field_help(TrainConfig, "normalize")),
    group_size: Optional[int] = typer.Option(None, help=field_help(TrainConfig, "group_size")),
    lr: Optional[float] = typer.Option(None, help=field_help(TrainConfig, "lr")),
    weight_decay: Optional[float] = typer.Option(None, help=field_help(TrainConfig, "weight_decay")),
    warmup: Optional[int] = typer.Option(None, help=field_help(TrainConfig, "warmup")),
    epochs: Optional[int] = typer.Option(None, help=field_help(TrainConfig, "epochs")),
    max_steps: Optional[int] = typer.Option(None, help=field_help(TrainConfig, "max_steps")),
    batch_size: Optional[int] = typer.Option(None, help=field_help(TrainConfig, "batch_size")),
    grad_accum: Optional[int] = typer.Option(None, help=field_help(TrainConfig, "grad_accum")),
    max_grad_norm: Optional[float] = typer.Option(None, help=field_help(TrainConfig, "max_grad_norm")),
    chunk_size: Optional[int] = typer.Option(None, help=field_help(TrainConfig, "chunk_size")),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing", help=field_help(TrainConfig, "gradient_checkpointing")),
    shuffle: Optional[bool] = typer.Option(None, "--shuffle/--no-shuffle", help=field_help(TrainConfig, "shuffle")),
    seed: Optional[int] = typer.Option(None, help=field_help(TrainConfig, "seed")),
    save_every: Optional[int] = typer.Option(None, help=field_help(TrainConfig, "save_every")),
    mixed_precision: Optional[str] = typer.Option(None, help=field_help(TrainConfig, "mixed_precision")),
    device: Optional[str] = typer.Option(None, help=field_help(TrainConfig, "device")),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help=field_help(TrainConfig, "trust_remote_code")),
    resume: bool = typer.Option(False, "--resume", help="Continue an unfinished run in --output from its latest checkpoint."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Distil the teacher into the student on the kept tokens (a trained model directory)."""
    from tipcli.config import resolve
    from tipcli.progress import emit_path
    from tipcli.train import run_train

    with user_errors():
        cfg = resolve(TrainConfig, config, input=resolve_input(input_dir), output=output,
                      student=student, teacher=teacher, loss=loss, strategy=strategy, keep=keep,
                      scope=scope, divergence=divergence, normalize=normalize,
                      group_size=group_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                      epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                      grad_accum=grad_accum, max_grad_norm=max_grad_norm, chunk_size=chunk_size,
                      gradient_checkpointing=gradient_checkpointing, shuffle=shuffle, seed=seed,
                      save_every=save_every, mixed_precision=mixed_precision, device=device,
                      trust_remote_code=trust_remote_code)
        path = run_train(cfg, overwrite=overwrite, resume=resume)
    emit_path(path)


@app.command("eval")
def eval_(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=field_help(EvalConfig, "model")),
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help=field_help(EvalConfig, "prompts")),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=field_help(EvalConfig, "output")),
    verifier: Optional[str] = typer.Option(None, help=field_help(EvalConfig, "verifier")),
    answer_field: Optional[str] = typer.Option(None, help=field_help(EvalConfig, "answer_field")),
    num_samples: Optional[int] = typer.Option(None, help=field_help(EvalConfig, "num_samples")),
    temperature: Optional[float] = typer.Option(None, help=field_help(EvalConfig, "temperature")),
    top_p: Optional[float] = typer.Option(None, help=field_help(EvalConfig, "top_p")),
    max_new_tokens: Optional[int] = typer.Option(None, help=field_help(EvalConfig, "max_new_tokens")),
    batch_size: Optional[int] = typer.Option(None, help=field_help(EvalConfig, "batch_size")),
    max_prompts: Optional[int] = typer.Option(None, help=field_help(EvalConfig, "max_prompts")),
    seed: Optional[int] = typer.Option(None, help=field_help(EvalConfig, "seed")),
    prompt_field: Optional[str] = typer.Option(None, help=field_help(EvalConfig, "prompt_field")),
    messages_field: Optional[str] = typer.Option(None, help=field_help(EvalConfig, "messages_field")),
    split: Optional[str] = typer.Option(None, help=field_help(EvalConfig, "split")),
    device: Optional[str] = typer.Option(None, help=field_help(EvalConfig, "device")),
    dtype: Optional[str] = typer.Option(None, help=field_help(EvalConfig, "dtype")),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help=field_help(EvalConfig, "trust_remote_code")),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Generate answers and grade them: accuracy with a 95% interval (results directory)."""
    from tipcli.config import resolve
    from tipcli.evaluate import render_summary, run_eval
    from tipcli.progress import emit_path

    with user_errors():
        cfg = resolve(EvalConfig, config, model=model, prompts=prompts, output=output,
                      verifier=verifier, answer_field=answer_field, num_samples=num_samples,
                      temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, max_prompts=max_prompts, seed=seed,
                      prompt_field=prompt_field, messages_field=messages_field, split=split,
                      device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        result = run_eval(cfg)
    render_summary(cfg, result)
    emit_path(result.output if result.output else f"{result.accuracy:.4f}")


from tipcli.report import ReportConfig  # noqa: E402  (light: no torch at import)
from tipcli.select import SelectConfig  # noqa: E402


@app.command()
def select(
    score_dir: str = typer.Argument(..., metavar="SCORE_DIR", help="Score directory, or - to read its path from stdin."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=field_help(SelectConfig, "output")),
    strategy: Optional[str] = typer.Option(None, help=field_help(SelectConfig, "strategy")),
    keep: Optional[float] = typer.Option(None, help=field_help(SelectConfig, "keep")),
    scope: Optional[str] = typer.Option(None, help=field_help(SelectConfig, "scope")),
    divergence: Optional[str] = typer.Option(None, help=field_help(SelectConfig, "divergence")),
    normalize: Optional[str] = typer.Option(None, help=field_help(SelectConfig, "normalize")),
    group_size: Optional[int] = typer.Option(None, help=field_help(SelectConfig, "group_size")),
    alpha: Optional[float] = typer.Option(None, help=field_help(SelectConfig, "alpha")),
    tau_h: Optional[float] = typer.Option(None, help=field_help(SelectConfig, "tau_h")),
    tau_d: Optional[float] = typer.Option(None, help=field_help(SelectConfig, "tau_d")),
    seed: Optional[int] = typer.Option(None, help=field_help(SelectConfig, "seed")),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Choose the tokens to train on: a selection mask over a score directory."""
    from tipcli.config import resolve
    from tipcli.progress import emit_path
    from tipcli.select import run_select

    with user_errors():
        cfg = resolve(SelectConfig, config, score=resolve_input(score_dir), output=output,
                      strategy=strategy, keep=keep, scope=scope, divergence=divergence,
                      normalize=normalize, group_size=group_size, alpha=alpha, tau_h=tau_h,
                      tau_d=tau_d, seed=seed)
        path = run_select(cfg, overwrite=overwrite)
    emit_path(path)


@app.command()
def report(
    stage_dir: str = typer.Argument(..., metavar="DIR", help="Score or selection directory, or - to read its path from stdin."),
    json_file: Optional[str] = typer.Option(None, "--json", help=field_help(ReportConfig, "json")),
    png: Optional[str] = typer.Option(None, "--png", help=field_help(ReportConfig, "png")),
    export: Optional[str] = typer.Option(None, "--export", help=field_help(ReportConfig, "export")),
    show: Optional[int] = typer.Option(None, "--show", help=field_help(ReportConfig, "show")),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Token-importance report: quadrants, (h, d) histogram, strategy coverage."""
    from tipcli.config import resolve
    from tipcli.progress import emit_path
    from tipcli.report import run_report

    with user_errors():
        cfg = resolve(ReportConfig, config, path=resolve_input(stage_dir), json=json_file,
                      png=png, export=export, show=show)
        run_report(cfg)
    emit_path(cfg.path)


@app.command()
def distill(
    student: Optional[str] = typer.Option(None, "--student", "-s", help=field_help(DistillConfig, "student")),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help=field_help(DistillConfig, "teacher")),
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help=field_help(DistillConfig, "prompts")),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=field_help(DistillConfig, "output")),
    iterations: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "iterations")),
    prompts_per_iteration: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "prompts_per_iteration")),
    num_samples: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "num_samples")),
    max_new_tokens: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "max_new_tokens")),
    temperature: Optional[float] = typer.Option(None, help=field_help(DistillConfig, "temperature")),
    top_p: Optional[float] = typer.Option(None, help=field_help(DistillConfig, "top_p")),
    rollout_batch_size: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "rollout_batch_size")),
    top_k: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "top_k")),
    strategy: Optional[str] = typer.Option(None, help=field_help(DistillConfig, "strategy")),
    keep: Optional[float] = typer.Option(None, help=field_help(DistillConfig, "keep")),
    scope: Optional[str] = typer.Option(None, help=field_help(DistillConfig, "scope")),
    divergence: Optional[str] = typer.Option(None, help=field_help(DistillConfig, "divergence")),
    normalize: Optional[str] = typer.Option(None, help=field_help(DistillConfig, "normalize")),
    group_size: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "group_size")),
    loss: Optional[str] = typer.Option(None, help=field_help(DistillConfig, "loss")),
    lr: Optional[float] = typer.Option(None, help=field_help(DistillConfig, "lr")),
    warmup: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "warmup")),
    epochs: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "epochs")),
    max_steps: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "max_steps")),
    batch_size: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "batch_size")),
    grad_accum: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "grad_accum")),
    eval_prompts: Optional[str] = typer.Option(None, help=field_help(DistillConfig, "eval_prompts")),
    eval_max_prompts: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "eval_max_prompts")),
    verifier: Optional[str] = typer.Option(None, help=field_help(DistillConfig, "verifier")),
    seed: Optional[int] = typer.Option(None, help=field_help(DistillConfig, "seed")),
    device: Optional[str] = typer.Option(None, help=field_help(DistillConfig, "device")),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help=field_help(DistillConfig, "trust_remote_code")),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """The on-policy loop: rollout -> score -> select -> train, N times (resumable)."""
    from tipcli.config import resolve
    from tipcli.distill import run_distill
    from tipcli.progress import emit_path

    with user_errors():
        cfg = resolve(DistillConfig, config, student=student, teacher=teacher, prompts=prompts,
                      output=output, iterations=iterations,
                      prompts_per_iteration=prompts_per_iteration, num_samples=num_samples,
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      rollout_batch_size=rollout_batch_size, top_k=top_k, strategy=strategy,
                      keep=keep, scope=scope, divergence=divergence, normalize=normalize,
                      group_size=group_size, loss=loss, lr=lr, warmup=warmup, epochs=epochs,
                      max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                      eval_prompts=eval_prompts, eval_max_prompts=eval_max_prompts,
                      verifier=verifier, seed=seed, device=device,
                      trust_remote_code=trust_remote_code)
        path = run_distill(cfg)
    emit_path(path)


@app.command()
def demo(
    output: str = typer.Option("runs/demo", "--output", "-o", help="Where the demo writes its run."),
    quick: bool = typer.Option(False, "--quick", help="A seconds-long version (one short iteration)."),
) -> None:
    """Distil the embedded addition task (soft-or, keep 0.5): report and accuracy before/after."""
    from tipcli.demo import run_demo
    from tipcli.progress import emit_path

    with user_errors():
        path = run_demo(output, quick=quick)
    emit_path(path)


def main() -> None:
    app(prog_name="tip")


if __name__ == "__main__":
    sys.exit(main())
