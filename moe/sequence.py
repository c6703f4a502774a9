"""One request's state as it moves through the engine."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from kvcache import BlockTable

from .outputs import RequestMetrics
from .sampling_params import SamplingParams
from .structured_output import GrammarState


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    generator: torch.Generator | None = None  # rejection sampling's and a drafter's draws (the request's seed)
    sample_key: int | None = None  # its tokens' draws (ops.sample.keyed_uniform); None: a key drawn at each draw
    streams: bool = False  # a client reads its tokens as they come (multi-step calls keep to a shorter budget)
    token_ids: list[int] = field(default_factory=list)  # prompt then output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: BlockTable = field(default_factory=BlockTable)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    # incremental detokenization
    text: str = ""
    text_sent: int = 0  # characters of ``text`` already handed out in streamed deltas
    prefix_offset: int = 0
    read_offset: int = 0
    num_preemptions: int = 0
    expected_len: int = 0  # prompt + max_tokens, capped at max_model_len (sizes the KV reservation)
    dp_rank: int = 0  # the data-parallel group that runs it (fixed when queued: its K/V live there)
    sample_index: int = 0  # which of its request's n samples this is
    # sample 0 of the same request, for samples 1..n-1: they wait until its prompt is in the prefix cache
    leader: Sequence | None = field(default=None, repr=False, compare=False)
    grammar: GrammarState | None = field(default=None, repr=False, compare=False)  # structured output

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.prefix_offset = max(len(self.prompt_token_ids) - 5, 0)
        self.read_offset = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def waits_for_leader(self) -> bool:
        """A later sample of an n > 1 request is admitted once sample 0 has computed its prompt
        (and so cached its full blocks), so that it shares them instead of recomputing them."""
        lead = self.leader
        return lead is not None and not lead.is_finished and lead.num_output_tokens == 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    def take_stream_text(self) -> str:
        """The text not yet streamed that is safe to stream: all of it once the sequence has
        finished; before that, all but a tail that could still grow into a stop string (sent once
        the next tokens decide it). So streamed pieces add up to exactly the final text."""
        text = self.text
        upto = len(text)
        if self.finish_reason is None:
            upto -= stop_holdback(text, self.params.stop_strings)
        piece = text[self.text_sent:upto]
        self.text_sent = max(self.text_sent, upto)
        return piece


def stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` are the start of some stop string (the longest
    such tail): ``stop_holdback("say EN", ("END",)) == 2``."""
    keep = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:k]):
                keep = k
                break
    return keep
