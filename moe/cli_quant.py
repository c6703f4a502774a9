"""``moe quantize``: pack a checkpoint's routed experts (int8, int4, fp8_block, mxfp4; ``--all-linear``:
every linear layer, int4/int8);
``moe prune``: keep each MoE layer's most-used experts.

:func:`register` adds the commands to a typer app (moe/cli.py calls it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def format_from_flags(name: str, group_size: int | None, asym: bool | None, scale_dtype: str,
                      activations: str | None = None):
    """The WeightFormat the flags describe (unset ones: the format's ``DEFAULT_OPTIONS``); flags a
    format does not take are an error, not ignored."""
    from experts.formats import DEFAULT_OPTIONS, FORMATS, get_format

    if name not in FORMATS:
        raise ValueError(f"--format {name!r} is unknown: choose {', '.join(FORMATS)}")
    if name in ("int8", "int4"):
        options = dict(DEFAULT_OPTIONS[name], scale_dtype=scale_dtype)
        if group_size is not None:
            options["group_size"] = group_size
        if asym is not None:
            options["symmetric"] = not asym
        if activations is not None:
            if name != "int4":
                raise ValueError(f"--activations applies to int4 only; {name} multiplies float activations")
            options["activations"] = activations
        return get_format(name, **options)
    if asym:
        raise ValueError(f"--asym applies to int8/int4 only; {name} is symmetric")
    if activations is not None:
        raise ValueError(f"--activations applies to int4 only; {name} multiplies float activations")
    if group_size is not None:
        raise ValueError(f"--group-size applies to int8/int4 only; {name} has a fixed block")
    return get_format(name)


def quantize(
    model: str = typer.Option(..., "--model", "-m", help="Source checkpoint directory (bf16/fp16/fp32)."),
    fmt: str = typer.Option(..., "--format", help="int4, int8, fp8_block or mxfp4."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the quantized checkpoint to."),
    group_size: Optional[int] = typer.Option(None, "--group-size",
                                             help="int4/int8: columns per scale (32, 64 or 128; "
                                                  "default int4 32, int8 128)."),
    asym: Optional[bool] = typer.Option(None, "--asym/--sym",
                                        help="int4/int8: asymmetric (per-group zero points) or symmetric codes "
                                             "(default int4 asymmetric, int8 symmetric)."),
    scale_dtype: str = typer.Option("bfloat16", "--scale-dtype", help="int4/int8 scales: bfloat16 or float32."),
    max_shard_size: str = typer.Option("2GiB", "--max-shard-size", help="Size of each output safetensors file."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    calibration: Optional[Path] = typer.Option(None, "--calibration",
                                               help="int4/int8: text like your workload's, run through the model "
                                                    "to see each expert's inputs (for --method awq/gptq)."),
    method: Optional[str] = typer.Option(None, "--method",
                                         help="rtn (round to nearest; the default without --calibration), "
                                              "gptq (the default with it) or awq."),
    calibration_window: int = typer.Option(512, "--calibration-window",
                                           help="Tokens per calibration prompt (the text is cut into windows)."),
    all_linear: bool = typer.Option(False, "--all-linear",
                                    help="int4/int8: also pack attention, dense MLPs, shared experts and the LM "
                                         "head (embeddings, norms and routers kept), as llama.cpp's Q4_K_M does."),
    activations: Optional[str] = typer.Option(None, "--activations",
                                              help="int4: float (default) or int8 -- decode steps round the "
                                                   "activations to 8 bits per 32 columns and multiply them with "
                                                   "the codes in integers, as llama.cpp does (faster on CPUs, "
                                                   "a little less exact; docs/quantization.md)."),
) -> None:
    """Write a copy of a checkpoint with its routed experts packed; everything else is copied unchanged.
    ``moe generate --model OUT`` then reads the format from OUT/config.json."""
    import sys

    from .config import parse_bytes
    from .quantize import quantize_checkpoint

    try:
        weight_format = format_from_flags(fmt, group_size, asym, scale_dtype, activations)
        prompts = None
        if calibration is not None:
            from .tokenizer import Tokenizer

            ids = Tokenizer(Path(model)).encode(calibration.read_text())
            prompts = [ids[i:i + calibration_window] for i in range(0, len(ids), calibration_window)]
            prompts = [p for p in prompts if len(p) > 1]
            if not prompts:
                raise ValueError(f"--calibration {calibration} holds no text")
        chosen = method or ("gptq" if calibration is not None else "rtn")
        report = quantize_checkpoint(model, out, weight_format, max_shard_bytes=parse_bytes(max_shard_size),
                                     overwrite=force, progress=sys.stderr.isatty(), method=chosen,
                                     calibration=prompts, all_linear=all_linear)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)
    if json_out:
        typer.echo(json.dumps(report.as_dict()))
        return
    ratio = report.expert_bytes_in / max(report.expert_bytes_out, 1)
    typer.echo(f"wrote {out} ({len(report.files)} file(s), {report.total_bytes_out / 2**20:.1f} MiB): "
               f"{report.expert_tensors} expert tensors packed as {weight_format.name} "
               f"({report.expert_bytes_in / 2**20:.1f} -> {report.expert_bytes_out / 2**20:.1f} MiB, {ratio:.1f}x), "
               + (f"{report.linear_tensors} linear weights packed, " if all_linear else "")
               + f"{report.other_tensors} copied")


def prune(
    model: str = typer.Option(..., "--model", "-m", help="Source checkpoint directory (unquantized)."),
    keep_experts: int = typer.Option(..., "--keep-experts", help="Routed experts each MoE layer keeps."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the pruned checkpoint to."),
    calibration: Optional[Path] = typer.Option(None, "--calibration",
                                               help="Text file: one calibration prompt per paragraph "
                                                    "(blank-line separated; default: the whole file as one)."),
    max_prompt_tokens: int = typer.Option(512, help="Longest calibration prompt, in tokens (longer ones split)."),
    score: str = typer.Option("freq", "--score", help="freq (tokens routed to the expert), reap (mean router "
                                                      "weight x expert output norm over its tokens) or recon (the "
                                                      "experts whose removal least changes each layer's output, "
                                                      "dropped one at a time)."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Text to measure the pruned model's quality on "
                                                                   "(default: the calibration text)."),
    eval_windows: int = typer.Option(16, "--eval-windows", help="256-token windows of that text to measure "
                                                                "(0: skip the quality report)."),
    refit: bool = typer.Option(False, "--refit", help="Then refit the kept experts' down projections so each "
                                                     "pruned layer reproduces the unpruned one on the calibration "
                                                     "text (least squares, layer after layer; needs transformers)."),
    refit_windows: int = typer.Option(256, "--refit-windows", help="256-token windows of the calibration text "
                                                                   "the refit solves over (at most)."),
    refit_ridge: float = typer.Option(1.0, "--refit-ridge", help="How strongly the refit keeps the original "
                                                                 "weights (x the normal matrix's mean diagonal)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Run calibration text through the model, score each expert (``--score``), and write a copy keeping
    each MoE layer's ``--keep-experts`` best experts (transformers loads it too), optionally refit to the
    unpruned layers (``--refit``); then report the pruned model's top-1 agreement with the original and
    its perplexity, teacher-forced on ``--heldout`` text."""
    from .distill_data import read_documents, token_stream, windows
    from .prune import SCORES, calibration_scores, prune_checkpoint, pruned_quality, score_names
    from .tokenizer import Tokenizer

    try:
        if score not in SCORES:
            raise ValueError(f"--score {score!r}: choose {score_names()}")
        if calibration is None:
            raise ValueError("--calibration FILE is needed: expert usage is measured on text like your workload's")
        if eval_windows < 0:
            raise ValueError(f"--eval-windows {eval_windows} must be >= 0")
        if refit and refit_windows < 1:
            raise ValueError(f"--refit-windows {refit_windows} must be >= 1")
        if refit and refit_ridge <= 0:
            raise ValueError(f"--refit-ridge {refit_ridge}: must be > 0")
        text = calibration.read_text()
        tok = Tokenizer(Path(model))
        # a prompt plus its one generated token must fit the model's context
        context = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings")
        max_prompt_tokens = min(max_prompt_tokens, context - 1) if context else max_prompt_tokens
        prompts = []
        for para in (p for p in text.split("\n\n") if p.strip()):
            ids = tok.encode(para)
            prompts += [{"prompt_token_ids": ids[i:i + max_prompt_tokens]}
                        for i in range(0, len(ids), max_prompt_tokens)]
        scores, counts = calibration_scores(model, prompts, score)
        report = prune_checkpoint(model, out, keep_experts, scores, overwrite=force)
        refit_report = None
        if refit:
            from .refit import refit_checkpoint

            stream = token_stream(read_documents(calibration), tok)
            if stream.numel() < 257:
                raise ValueError(f"--refit: {calibration} holds {stream.numel()} tokens, fewer than one 256-token "
                                 "window; give more calibration text")
            wins = windows(stream, 256)
            try:
                refit_report = refit_checkpoint(model, out, wins[:refit_windows], ridge=refit_ridge,
                                                log=None if json_out else typer.echo)
            except ValueError as e:
                raise ValueError(f"{e} ({out} holds the pruned checkpoint, not refit)") from None
        quality = None
        if eval_windows:
            wins = windows(token_stream(read_documents(heldout or calibration), tok), 256)[:eval_windows]
            quality = pruned_quality(model, out, wins)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)
    summary = {"out": str(out), "keep": keep_experts, "score": score, "calibration_prompts": len(prompts),
               "routed_per_layer": int(counts[0].sum()), "bytes_in": report.bytes_in, "bytes_out": report.bytes_out,
               "tensors_dropped": report.tensors_dropped, "kept_experts": {str(k): v for k, v in report.kept.items()},
               "refit": refit_report and [vars(r) for r in refit_report],
               "quality": quality and dict(quality, text=str(heldout or calibration))}
    if json_out:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"wrote {out}: {keep_experts} experts per MoE layer by {score}, {report.bytes_in / 2**20:.1f} -> "
               f"{report.bytes_out / 2**20:.1f} MiB ({report.tensors_dropped} expert tensors dropped)")
    if quality:
        typer.echo(f"quality on {heldout or calibration} ({quality['positions']} positions): top-1 agreement with "
                   f"the unpruned model {quality['top1_agreement']:.3f}, perplexity {quality['perplexity']:.2f} "
                   f"(unpruned {quality['reference_perplexity']:.2f})")


def register(app: typer.Typer) -> None:
    """Add ``quantize`` and ``prune`` to ``app``."""
    app.command("quantize")(quantize)
    app.command("prune")(prune)
