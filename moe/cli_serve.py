"""``moe serve`` (the OpenAI-compatible server) and ``moe bench serve`` (the client that measures
any such server). Flags map onto EngineConfig / ServeOptions / BenchConfig here, in one place."""
from __future__ import annotations

from typing import Any, Optional

import typer

from .cli import with_engine_flags


@with_engine_flags(max_num_batched_tokens=2048)  # vLLM's server default on CPU (its LLM's: 4096, ours too)
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default; 0.0.0.0 opens it)."),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="MOE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1/*."),
    served_model_name: list[str] = typer.Option([], help="Model id(s) clients use (default: the model path)."),
    max_queued_requests: int = typer.Option(1024, help="Waiting requests at most; beyond it new ones get 429."),
    shutdown_timeout: float = typer.Option(30.0, help="On SIGTERM, seconds running requests get to finish."),
    health_step_timeout: float = typer.Option(60.0, help="/health is 503 when busy with no step for this long."),
    chat_template: Optional[str] = typer.Option(None, help="Jinja chat template file (overrides the checkpoint's)."),
    seed: int = typer.Option(0, help="Engine seed (requests without their own seed)."),
    log_level: str = typer.Option("info"),
    *,
    engine: dict[str, Any],
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (rank 0 under a launcher)."""
    import logging

    from .serving.launcher import ServeOptions
    from .serving.launcher import serve as run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = ServeOptions(host=host, port=port, api_key=api_key, served_model_name=list(served_model_name),
                        max_queued_requests=max_queued_requests, shutdown_timeout=shutdown_timeout,
                        health_step_timeout=health_step_timeout, chat_template=chat_template, log_level=log_level)
    try:
        code = run(dict(engine, seed=seed), opts)
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
