"""Online serving: :class:`AsyncLLM` (the engine on its own thread, for asyncio), the
OpenAI-compatible HTTP server (``api_server``), its metrics, and the ``moe bench serve`` client.

Nothing is imported eagerly: the CLI loads this package for every command."""
from __future__ import annotations


def __getattr__(name: str):
    if name == "AsyncLLM":
        from .async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)
