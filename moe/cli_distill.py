"""``moe distill``: train a student (a drafter, an MTP head, or a pruned checkpoint to recover) on a teacher's
log-probs.

:func:`register` adds the command to a typer app (moe/cli.py calls it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def distill(
    teacher: str = typer.Option(..., "--teacher", help="Teacher checkpoint directory (our engine runs it)."),
    student: str = typer.Option(..., "--student", help="'draft' (a small drafter cut from the teacher), 'mtp' (an "
                                                       "MTP-style head on the teacher's hidden states, for "
                                                       "--speculative-method mtp) or a checkpoint directory to "
                                                       "recover (e.g. a pruned teacher)."),
    data: Path = typer.Option(..., "--data", help="Training text: a file, or a directory of .txt/.md/.rst files "
                                                  "(documents separated by blank lines); or a .jsonl file of "
                                                  "token ids (one JSON list per line)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the student checkpoint."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data",
                                             help="Held-out text (default: every 20th window of --data)."),
    draft_layers: int = typer.Option(1, "--draft-layers", help="Drafter: decoder layers (copied from the "
                                                               "teacher's first layers)."),
    draft_mlp: str = typer.Option("moe", "--draft-mlp", help="Drafter / MTP head layers: moe (the teacher's) or "
                                                             "dense."),
    draft_intermediate: Optional[int] = typer.Option(None, "--draft-intermediate",
                                                     help="Dense drafter: MLP width (default: the config's)."),
    train: str = typer.Option("router+experts", "--train", help="Recovery: what trains, router+experts (the rest "
                                                                "frozen) or all (every weight)."),
    lora_rank: int = typer.Option(0, "--lora-rank", help="Recovery: train rank-r adapters on the experts "
                                                         "(merged at the end) instead of the experts themselves."),
    steps: int = typer.Option(200, "--steps"),
    seq_len: int = typer.Option(256, "--seq-len"),
    batch_size: int = typer.Option(8, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: 1e-3 for a drafter or MTP "
                                                        "head, 3e-4 to recover a checkpoint)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Weight of the hard-label cross-entropy beside the "
                                                                "KL (default: 0.1 for a drafter or MTP head, 0 to "
                                                                "recover a checkpoint)."),
    hard_label: str = typer.Option("data", "--hard-label", help="The cross-entropy's label: data (the text's next "
                                                                "token) or teacher (the teacher's first choice)."),
    hidden_weight: float = typer.Option(0.0, "--hidden-weight", help="Recovery: weight of a loss matching every "
                                        "layer's output to the teacher's (its squared error over the teacher's "
                                        "mean square; the teacher runs beside the student in torch)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Teacher log-probs kept per position (default: 32 for "
                                                              "a drafter or MTP head, 64 to recover a checkpoint)."),
    seed: int = typer.Option(0, "--seed"),
    teacher_windows: int = typer.Option(0, "--teacher-windows", help="Windows the teacher scores for training "
                                                                     "(0: steps x batch size, at most all)."),
    eval_windows: int = typer.Option(64, "--eval-windows"),
    teacher_dtype: str = typer.Option("auto", "--teacher-dtype", help="dtype the engine runs the teacher in."),
    save_every: int = typer.Option(50, "--save-every", help="Steps between checkpoints."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    device: str = typer.Option("auto", "--device", help="Where the student trains: auto (a CUDA GPU when torch "
                                                        "sees one, else the CPU), cpu, cuda or cuda:N."),
    bf16: bool = typer.Option(False, "--bf16", help="Forward passes under bf16 autocast (mixed precision: weights, "
                                                    "optimizer state and losses stay float32)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in OUT/distill_state."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="Stop after this many steps of this run "
                                                                        "(checkpointed; continue with --resume)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty --out."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Distil a teacher into a student: forward KL on the teacher's top-k log-probs (computed by our engine)
    plus --alpha x the next-token cross-entropy; writes a Hugging Face checkpoint both transformers and
    ``moe generate --model OUT`` load (an MTP head: the head alone, for ``--speculative-method mtp
    --draft-model OUT``), with OUT/training_report.json."""
    from .distill import DistillConfig
    from .distill import distill as run

    try:
        cfg = DistillConfig(teacher=teacher, student=student, data=str(data), out=str(out),
                            eval_data=str(eval_data) if eval_data else None, draft_layers=draft_layers,
                            draft_mlp=draft_mlp, draft_intermediate=draft_intermediate, train=train,
                            lora_rank=lora_rank, steps=steps, seq_len=seq_len, batch_size=batch_size, lr=lr,
                            alpha=alpha, hard_label=hard_label, hidden_weight=hidden_weight, top_k=top_k, seed=seed,
                            teacher_windows=teacher_windows,
                            eval_windows=eval_windows, teacher_dtype=teacher_dtype, save_every=save_every,
                            threads=threads, device=device, bf16=bf16)
        if stop_after is not None and stop_after < 1:
            raise ValueError(f"--stop-after {stop_after} must be at least 1")
        report = run(cfg, resume=resume, force=force, stop_after=stop_after, progress=True)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if json_out:
        typer.echo(json.dumps(report))
    elif not report["finished"]:
        typer.echo(f"stopped at step {report['steps']} of {steps}; continue with --resume")
    else:
        b, a = report["heldout_before"], report["heldout_after"]
        typer.echo(f"wrote {out}: {report['steps']} steps in {report['seconds']:.0f} s; held-out KL to the teacher "
                   f"{b['kl']:.4f} -> {a['kl']:.4f}, top-1 agreement {b['top1_agreement']:.3f} -> "
                   f"{a['top1_agreement']:.3f}, perplexity {b['perplexity']:.2f} -> {a['perplexity']:.2f} "
                   f"(teacher {report['teacher_heldout_perplexity']:.2f})")


def register(app: typer.Typer) -> None:
    """Add ``distill`` to ``app``."""
    app.command("distill")(distill)
