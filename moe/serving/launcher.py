"""``moe serve``: build the engine, then rank 0 serves HTTP (uvicorn) and the other ranks follow.

Shutdown: the first SIGTERM / SIGINT stops admitting (new requests get 503), lets the running
requests finish for up to ``shutdown_timeout`` seconds, aborts the rest and exits 0. A second
SIGINT exits at once. An engine that dies (a failed step, a dead rank) ends the server with
exit code 1 and the error in the log.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("moe.serving")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: list[str] = field(default_factory=list)
    max_queued_requests: int = 1024
    shutdown_timeout: float = 30.0
    health_step_timeout: float = 60.0
    chat_template: str | None = None  # a file
    log_level: str = "info"


class _DrainingServer:
    """uvicorn.Server whose exit signal drains first (built lazily: uvicorn imports only here)."""

    def __new__(cls, config, state, opts: ServeOptions):
        import uvicorn

        class Server(uvicorn.Server):
            exit_code = 0

            def handle_exit(self, sig, frame) -> None:  # runs in the main thread, between bytecodes
                if state.draining or self.should_exit:
                    self.force_exit = True if sig == signal.SIGINT else self.force_exit
                    self.should_exit = True
                    return
                state.draining = True
                loop = getattr(self, "_moe_loop", None)
                if loop is None:
                    self.should_exit = True
                else:
                    loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

            async def _drain(self) -> None:
                llm = state.llm
                deadline = time.monotonic() + opts.shutdown_timeout
                log.info("shutting down: %d request(s) running, waiting up to %.0f s", llm.num_requests,
                         opts.shutdown_timeout)
                while llm.num_requests and time.monotonic() < deadline and llm.dead is None:
                    await asyncio.sleep(0.05)
                if llm.num_requests:
                    log.warning("aborting %d request(s) still running after --shutdown-timeout", llm.num_requests)
                    llm.abort_all()
                    for _ in range(100):  # let their answers go out
                        if not llm.num_requests:
                            break
                        await asyncio.sleep(0.02)
                self.should_exit = True

            async def startup(self, sockets=None) -> None:
                self._moe_loop = asyncio.get_running_loop()
                await super().startup(sockets)

        return Server(config)


def serve(engine_kwargs: dict[str, Any], opts: ServeOptions) -> int:
    """Run the server until shutdown; the process exit code."""
    from ..llm import LLM
    from .async_llm import AsyncLLM

    llm = LLM(**engine_kwargs)
    engine = llm.engine
    async_llm = AsyncLLM(engine)
    if engine.parallel.rank != 0:
        # a launcher forwards SIGTERM / SIGINT to every rank; the followers stay until rank 0 has
        # drained and broadcasts its stop (or its death breaks the next broadcast)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            async_llm.run_worker()
        except BaseException as e:  # noqa: BLE001 -- any end of a follower is reported
            print(f"error: rank {engine.parallel.rank}: the server ended: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        return 0
    if opts.chat_template is not None:
        from pathlib import Path

        if engine.tokenizer is None:
            raise ValueError("--chat-template needs a checkpoint with tokenizer.json")
        engine.tokenizer.chat_template = Path(opts.chat_template).read_text()
    return _serve_http(async_llm, llm.config.model, opts, default_name=engine_kwargs.get("model") or "default")


def _serve_http(async_llm, model_path: str, opts: ServeOptions, default_name: str) -> int:
    import uvicorn

    from .api_server import ServerConfig, build_app

    names = opts.served_model_name or [default_name]  # the path as given (vLLM); "default" for the embedded model
    app = build_app(async_llm, ServerConfig(model_path=model_path, served_model_names=names, api_key=opts.api_key,
                                            max_queued_requests=opts.max_queued_requests,
                                            health_step_timeout=opts.health_step_timeout))
    state = app.state.server
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    server = _DrainingServer(config, state, opts)

    def on_dead(e: BaseException) -> None:  # engine thread: a dead engine (or rank) ends the server
        server.exit_code = 1
        server.should_exit = True

    async_llm.on_dead = on_dead
    async_llm.start()
    log.info("serving %s as %s on http://%s:%d", model_path, names, opts.host, opts.port)
    try:
        server.run()
    finally:
        async_llm.shutdown()
    if async_llm.dead is not None:
        print(f"error: the engine died: {type(async_llm.dead).__name__}: {async_llm.dead}", file=sys.stderr)
        return 1
    return server.exit_code
