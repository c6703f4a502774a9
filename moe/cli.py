"""The ``moe`` command line: generate, info (and more as the framework grows).

The engine flags are listed once, in ``ENGINE_FLAGS``, and mapped onto
:class:`moe.config.EngineConfig` fields by :func:`engine_options`; a command takes them all with
``@with_engine_flags``. Sampling flags map onto :class:`moe.SamplingParams` in ``generate``.
"""
from __future__ import annotations

import copy
import inspect
import json
import sys
from dataclasses import fields
from typing import Any, Callable, Optional

import typer

from .config import EngineConfig

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fast inference for Mixture-of-Experts language models.")


def _default(name: str) -> Any:
    """EngineConfig's default for a field: the flag's default is the API's."""
    return next(f.default for f in fields(EngineConfig) if f.name == name)


# flag parameter -> (type, typer option); a parameter named after an EngineConfig field sets that
# field (its meaning is documented there); the others are translated by engine_options.
ENGINE_FLAGS: dict[str, tuple[Any, Any]] = {
    "model": (Optional[str], typer.Option(None, "--model", "-m", help="Checkpoint directory (default: embedded "
                                                                      "model).")),
    "dtype": (str, typer.Option(_default("dtype"), help="auto, bfloat16, float16 or float32.")),
    "kv_cache_memory": (Optional[str], typer.Option(_default("kv_cache_memory"), help="KV cache size, e.g. 2GiB.")),
    "kv_cache_dtype": (str, typer.Option(_default("kv_cache_dtype"),
                                         help="auto (the model dtype) or fp8 (e4m3, half the bytes).")),
    "offload_experts": (bool, typer.Option(_default("offload_experts"), "--offload-experts",
                                           help="Keep routed experts in the files.")),
    "expert_cache": (Optional[str], typer.Option(_default("expert_cache"),
                                                 help="With --offload-experts: resident experts, e.g. 4GiB.")),
    "speculative_tokens": (int, typer.Option(0, help="Speculative decoding: draft tokens per step at most (0 with "
                                                     "no method or draft model: off; by n-gram lookup unless "
                                                     "--speculative-method or --draft-model says otherwise).")),
    "speculative_method": (Optional[str], typer.Option(None, help="ngram, draft_model (needs --draft-model), draft "
                                                                   "(the default model's shipped drafter) or mtp (the "
                                                                   "model's MTP layer, or the head --draft-model "
                                                                   "names; the default model ships one).")),
    "draft_model": (Optional[str], typer.Option(None, help="Drafter checkpoint for speculative decoding (same "
                                                           "vocabulary as the model), or an MTP head's with "
                                                           "--speculative-method mtp.")),
    "ngram_first": (bool, typer.Option(False, "--ngram-first", help="With a drafter: draft by n-gram lookup where "
                                                                     "the text repeats, by the drafter elsewhere.")),
    "max_model_len": (Optional[int], typer.Option(_default("max_model_len"))),
    "max_num_seqs": (int, typer.Option(_default("max_num_seqs"), help="Sequences in the running batch at most.")),
    "max_num_batched_tokens": (int, typer.Option(_default("max_num_batched_tokens"),
                                                 help="Tokens per step at most (chunked prefill).")),
    "num_scheduler_steps": (int, typer.Option(_default("num_scheduler_steps"),
                                              help="Greedy decode steps run back to back in one call at "
                                                   "most (1: off).")),
    "block_size": (int, typer.Option(_default("block_size"), help="KV cache block size in tokens.")),
    "enable_prefix_caching": (bool, typer.Option(_default("enable_prefix_caching"),
                                                 "--enable-prefix-caching/--no-enable-prefix-caching")),
    "quantization": (Optional[str], typer.Option(_default("quantization"),
                                                 help="Pack routed experts on load (int8, fp8, int4, ...).")),
    "warmup": (bool, typer.Option(_default("warmup"), "--warmup", help="Build every GEMM kernel shape at load (CPU; "
                                                                       "seconds on large models), so no request pays "
                                                                       "for it.")),
    "generation_config": (str, typer.Option(_default("generation_config"),
                                            help="Default sampling parameters: auto (the checkpoint's "
                                                 "generation_config.json), vllm (none of the model's) or a "
                                                 "directory holding a generation_config.json.")),
    "override_generation_config": (Optional[str], typer.Option(None, help="JSON laid over those defaults, e.g. "
                                                                          "'{\"temperature\": 0.6}'.")),
    "max_logprobs": (int, typer.Option(_default("max_logprobs"), help="Log-probs a request may ask for per token "
                                                                      "at most (-1: any).")),
    "sharding": (Optional[str], typer.Option(_default("sharding"), "--sharding", envvar="MOE_SHARDING",
                                             help="Sharding YAML for a multi-rank run (moe launch sets "
                                                  "MOE_SHARDING).")),
}


def engine_options(flags: dict[str, Any]) -> dict[str, Any]:
    """``LLM(**engine_options(flags))``: the engine flags' values as EngineConfig's keyword arguments."""
    options = dict(flags)
    options["speculative_config"] = speculative_config(options.pop("speculative_method"), options.pop("draft_model"),
                                                       options.pop("speculative_tokens"), options.pop("ngram_first"))
    options["load_progress"] = sys.stderr.isatty()
    if options.get("override_generation_config") is not None:
        try:
            options["override_generation_config"] = json.loads(options["override_generation_config"])
        except ValueError as e:
            raise typer.BadParameter(f"--override-generation-config is not JSON ({e}): give an object such as "
                                     "'{\"temperature\": 0.6}'") from None
    return options


def speculative_config(method: str | None, draft_model: str | None, tokens: int,
                       ngram_first: bool = False) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` from the speculative flags (validated by the engine's config)."""
    if method is None:
        method = "draft_model" if draft_model else ("ngram" if tokens else None)
    if method is None:
        if ngram_first:
            raise typer.BadParameter("--ngram-first needs a drafter: add --speculative-method draft or --draft-model")
        return None
    spec: dict[str, Any] = {"method": method}
    if ngram_first:
        spec["ngram_first"] = True
    if draft_model is not None:
        spec["model"] = draft_model
    if tokens:
        spec["num_speculative_tokens"] = tokens
    return spec


def with_engine_flags(command: Callable[..., Any] | None = None, /, **defaults: Any) -> Any:
    """Give a typer command every engine flag; it receives them as ``engine``, ready for ``LLM(**engine)``.
    ``@with_engine_flags(name=value)`` starts those flags at the command's own defaults instead of the API's."""
    if command is None:
        return lambda c: with_engine_flags(c, **defaults)
    unknown = set(defaults) - set(ENGINE_FLAGS)
    if unknown:
        raise TypeError(f"not engine flags: {sorted(unknown)}")
    sig = inspect.signature(command, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "engine"]
    flags = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                               default=_with_default(option, defaults[name]) if name in defaults else option)
             for name, (annotation, option) in ENGINE_FLAGS.items()]

    def run(**kwargs: Any) -> Any:
        engine = engine_options({name: kwargs.pop(name) for name in ENGINE_FLAGS})
        return command(engine=engine, **kwargs)

    run.__name__, run.__doc__ = command.__name__, command.__doc__
    run.__signature__ = sig.replace(parameters=own + flags)  # what typer reads the options from
    run.__annotations__ = {p.name: p.annotation for p in own + flags}
    return run


def _with_default(option: Any, value: Any) -> Any:
    """A copy of a typer option with another default."""
    option = copy.copy(option)
    option.default = value
    return option


def _read_chat_template(path: str) -> str:
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--chat-template {path}: cannot read it ({e.strerror})") from None


@app.command()
@with_engine_flags
def generate(
    prompts: list[str] = typer.Argument(None, help="Prompt text(s); read from stdin when omitted."),
    max_tokens: Optional[int] = typer.Option(None, help="Maximum new tokens per prompt (default: the model's "
                                                        "max_new_tokens, else 64)."),
    temperature: Optional[float] = typer.Option(None, help="0 for greedy (default: the model's, else 0.8)."),
    top_p: Optional[float] = typer.Option(None, help="Default: the model's, else 0.95."),
    top_k: Optional[int] = typer.Option(None, help="0 disables top-k (default: the model's, else 0)."),
    min_p: Optional[float] = typer.Option(None, help="Default: the model's, else 0."),
    seed: Optional[int] = typer.Option(None, help="Per-request seed for reproducible sampling."),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Apply the checkpoint's chat template."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="With --chat: a Jinja chat "
                                                "template file to use instead of the checkpoint's."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they are generated."),
    logprobs: Optional[int] = typer.Option(None, help="Print the top-N log-probs of each token (JSON)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per prompt."),
    stats: bool = typer.Option(False, "--stats", help="Print TTFT, TPOT, throughput and speculative decoding's "
                                                      "acceptance to stderr."),
    *,
    engine: dict[str, Any],
) -> None:
    """Generate text for one or more prompts (on every rank under a launcher; rank 0 prints)."""
    import os
    import time

    from . import LLM, SamplingParams

    if not prompts:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    try:
        llm = LLM(**engine)
        # a flag given > the checkpoint's generation_config.json > this command's own defaults
        given = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, max_tokens=max_tokens)
        kw = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 64, **llm.engine.default_sampling_params,
              **{k: v for k, v in given.items() if v is not None}}
        params = SamplingParams(**kw, seed=seed, stop=stop or None, logprobs=logprobs)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if llm.engine.parallel.rank != 0:  # every rank generates the same outputs; one prints them
        sys.stdout = open(os.devnull, "w")
    if chat:
        tok = llm.get_tokenizer()
        try:
            if tok is None:
                raise ValueError("this checkpoint has no tokenizer.json: --chat needs it")
            template = _read_chat_template(chat_template) if chat_template else None
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], chat_template=template)
                       for p in prompts]
        except ValueError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
    t0 = time.perf_counter()
    if stream and not json_out and len(prompts) == 1:
        outs = []
        typer.echo(prompts[0], nl=False)
        for out in llm.generate_stream(prompts, params):
            if out.error:
                typer.echo(f"\nerror: {out.error}", err=True)
                raise typer.Exit(2)
            typer.echo(out.delta.text if out.delta else "", nl=False)
            if out.finished:
                outs.append(out)
        typer.echo("")
    else:
        outs = llm.generate(prompts, params)
        for out in outs:
            if out.error:
                typer.echo(f"error: {out.error}", err=True)
                continue
            c = out.outputs[0]
            if json_out:
                typer.echo(json.dumps({"prompt": out.prompt, "text": c.text, "token_ids": c.token_ids,
                                       "finish_reason": c.finish_reason,
                                       "logprobs": [{str(k): v for k, v in d.items()} for d in c.logprobs]
                                       if c.logprobs else None}))
            else:
                typer.echo(f"{out.prompt}{c.text}")
                if c.logprobs:
                    typer.echo(json.dumps([{str(k): round(v, 4) for k, v in d.items()} for d in c.logprobs]))
    if stats:
        wall = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        for o in outs:
            m = o.metrics
            typer.echo(f"ttft={m.ttft or 0:.3f}s tpot={(m.tpot or 0) * 1e3:.1f}ms latency={m.latency or 0:.3f}s "
                       f"tokens={len(o.outputs[0].token_ids)}", err=True)
        typer.echo(f"throughput={n / wall:.1f} tok/s over {wall:.2f}s", err=True)
        e = llm.engine
        if e.proposer is not None:
            typer.echo(f"speculative decoding: {e.spec_stats().summary()}, method {e.spec.method}", err=True)
        from .models.quant_weights import expert_cache

        cache = expert_cache(llm.engine.model)
        if cache is not None:
            s = cache.stats
            typer.echo(f"expert cache: {cache.capacity / 2**20:.1f} MiB, hits={s.hits} misses={s.misses} "
                       f"hit_rate={s.hits / max(s.lookups, 1):.3f} prefetch_loads={s.prefetch_loads} "
                       f"prefetch_hits={s.prefetch_hits} evictions={s.evictions} "
                       f"bytes_loaded={s.bytes_loaded} stall={s.stall_seconds:.3f}s", err=True)
    if any(o.error for o in outs):
        raise typer.Exit(1)


@app.command()
def info(model: Optional[str] = typer.Argument(None, help="Checkpoint directory (default: embedded model)."),
         json_out: bool = typer.Option(False, "--json")) -> None:
    """Parameters, active parameters per token, experts and memory of a checkpoint (no weights loaded)."""
    from .config import read_config_json
    from .llm import default_model_path
    from .models import parse_config
    from .params import count_params

    path = model or default_model_path()
    try:
        cfg = parse_config(read_config_json(path))
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    counts = count_params(cfg)
    kv_per_token = _kv_bytes_per_token(cfg)
    report = {
        "model": str(path), "architecture": cfg.architecture, "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "experts": cfg.num_experts, "experts_per_token": cfg.top_k,
        "moe_layers": sum(cfg.sparse_layers), "shared_expert": bool(cfg.shared_expert_intermediate_size),
        **counts.as_dict(),
        "weight_bytes": {"bfloat16": 2 * counts.total, "float32": 4 * counts.total,
                         **_packed_weight_bytes(cfg, counts)},
        "active_weight_bytes_per_token_bf16": 2 * counts.active,
        "kv_cache_bytes_per_token_bf16": kv_per_token,
        "kv_cache_bytes_per_token_fp8": _kv_bytes_per_token(cfg, fp8=True),
        "attention": "MLA (latent KV cache)" if cfg.mla else "GQA",
        "max_position_embeddings": cfg.max_position_embeddings,
    }
    if json_out:
        typer.echo(json.dumps(report))
        return
    for k, v in report.items():
        if isinstance(v, int) and k.endswith("params"):
            v = f"{v:,} ({v / 1e9:.3f}B)"
        elif isinstance(v, dict):
            v = ", ".join(f"{kk}: {_gib(vv)}" for kk, vv in v.items())
        elif k.endswith(("bytes_per_token_bf16", "bytes_per_token_fp8")):
            v = f"{v:,} bytes" if v < 1 << 20 else _gib(v)
        typer.echo(f"{k:38s} {v}")


def _packed_weight_bytes(cfg, counts) -> dict[str, int]:
    """Whole-model bytes with the routed experts packed in each format (the rest in bf16)."""
    from experts.formats import REPORT_FORMATS, expert_nbytes, get_format

    out = {}
    for name in REPORT_FORMATS:
        try:
            per_expert = expert_nbytes(get_format(name), cfg.hidden_size, cfg.moe_intermediate_size)
        except ValueError:  # a shape the format cannot pack (e.g. not a multiple of its block)
            continue
        out[f"{name} experts"] = 2 * (counts.total - counts.routed_experts) + \
            sum(cfg.sparse_layers) * cfg.num_experts * per_expert
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _kv_bytes_per_token(cfg, fp8: bool = False) -> int:
    """KV cache bytes per token over all layers (one process), bf16 or fp8, from the model's own spec."""
    import torch

    from .params import build_meta_model

    return sum(spec.bytes_per_token(torch.bfloat16, fp8) for spec in build_meta_model(cfg).kv_cache_spec())


from .cli_parallel import register  # noqa: E402  (plan and launch live beside the parallel code)

register(app)
from .cli_quant import register as register_quant  # noqa: E402

register_quant(app)
from .cli_serve import register as register_serve  # noqa: E402  (serve, bench serve)

register_serve(app)
from .cli_distill import register as register_distill  # noqa: E402

register_distill(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
