"""``moe serve`` (the OpenAI-compatible server) and ``moe bench serve`` (the client that measures
any such server). Flags map onto EngineConfig / ServeOptions / BenchConfig here, in one place."""
from __future__ import annotations

from typing import Optional

import typer


def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint directory (default: embedded model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default; 0.0.0.0 opens it)."),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="MOE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1/*."),
    served_model_name: list[str] = typer.Option([], help="Model id(s) clients use (default: the model path)."),
    max_num_seqs: int = typer.Option(64, help="Requests in the running batch at most."),
    max_num_batched_tokens: int = typer.Option(2048, help="Tokens per step at most (chunked prefill)."),
    max_queued_requests: int = typer.Option(1024, help="Waiting requests at most; beyond it new ones get 429."),
    shutdown_timeout: float = typer.Option(30.0, help="On SIGTERM, seconds running requests get to finish."),
    health_step_timeout: float = typer.Option(60.0, help="/health is 503 when busy with no step for this long."),
    chat_template: Optional[str] = typer.Option(None, help="Jinja chat template file (overrides the checkpoint's)."),
    dtype: str = typer.Option("auto", help="auto, bfloat16, float16 or float32."),
    kv_cache_memory: Optional[str] = typer.Option(None, help="KV cache size, e.g. 2GiB."),
    kv_cache_dtype: str = typer.Option("auto", help="auto (the model dtype) or fp8."),
    block_size: int = typer.Option(16),
    max_model_len: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0, help="Engine seed (requests without their own seed)."),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching"),
    quantization: Optional[str] = typer.Option(None, help="Pack routed experts on load (e.g. int8, fp8, int4)."),
    offload_experts: bool = typer.Option(False, "--offload-experts"),
    expert_cache: Optional[str] = typer.Option(None),
    speculative_tokens: int = typer.Option(0, help="N-gram speculative decoding: draft tokens per step (0: off)."),
    warmup: bool = typer.Option(False, "--warmup", help="Build every GEMM kernel shape at load (CPU)."),
    sharding: Optional[str] = typer.Option(None, "--sharding", envvar="MOE_SHARDING",
                                           help="Sharding YAML (run under torchrun / mpirun / srun; rank 0 serves)."),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (rank 0 under a launcher)."""
    import logging

    from .serving.launcher import ServeOptions
    from .serving.launcher import serve as run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_kwargs = dict(
        model=model, dtype=dtype, kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
        block_size=block_size, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
        max_num_batched_tokens=max_num_batched_tokens, seed=seed, enable_prefix_caching=enable_prefix_caching,
        quantization=quantization, offload_experts=offload_experts, expert_cache=expert_cache, warmup=warmup,
        sharding=sharding, speculative_config={"method": "ngram", "num_speculative_tokens": speculative_tokens}
        if speculative_tokens else None)
    opts = ServeOptions(host=host, port=port, api_key=api_key, served_model_name=list(served_model_name),
                        max_queued_requests=max_queued_requests, shutdown_timeout=shutdown_timeout,
                        health_step_timeout=health_step_timeout, chat_template=chat_template, log_level=log_level)
    try:
        code = run(engine_kwargs, opts)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    from .serving.bench import bench_serve

    app.command("serve")(serve)
    bench = typer.Typer(no_args_is_help=True, help="Benchmarks of a running server.")
    bench.command("serve")(bench_serve)
    app.add_typer(bench, name="bench")
