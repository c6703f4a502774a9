"""What generate returns: vLLM's RequestOutput / CompletionOutput shape, plus timing metrics."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_generated: int = 0
    num_prompt_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finished_time is None or self.first_token_time is None or self.num_generated < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_generated - 1)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None
    delta: CompletionOutput | None = field(default=None, repr=False)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and counters (LLMEngine.stats()); counters count since start."""

    num_running: int  # sequences (an n > 1 request counts n)
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens whose K/V were found there
    spec_num_draft_tokens: int  # speculative decoding: draft tokens run
    spec_num_accepted_tokens: int  # and those the model confirmed
