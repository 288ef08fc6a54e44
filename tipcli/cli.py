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
from tipcli.rollout import RolloutConfig
from tipcli.score import ScoreConfig

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
        console.print(f"error: {msg}", style="red", markup=False, highlight=False)
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
def demo(
    output: str = typer.Option("runs/demo", "--output", "-o", help="Where the demo writes its stage directories."),
) -> None:
    """Run the pipeline on a built-in tiny model pair and print a summary."""
    from tipcli.demo import run_demo
    from tipcli.progress import emit_path

    with user_errors():
        path = run_demo(output)
    emit_path(path)


def main() -> None:
    app(prog_name="tip")


if __name__ == "__main__":
    sys.exit(main())
