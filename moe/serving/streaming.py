"""Pieces of the streamed answer: SSE framing, what each choice has sent, logprobs in OpenAI's shapes,
and the fan-in of several requests' outputs (a completion with a list of prompts)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from ..outputs import CompletionOutput, RequestOutput


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class ChoiceStream:
    """What one choice has sent so far. The engine's deltas already hold back text that could
    still become a stop string (:meth:`moe.sequence.Sequence.take_stream_text`)."""

    def __init__(self):
        self.text_sent = 0
        self.finished = False

    def advance(self, delta: CompletionOutput) -> tuple[str, list[int], list[dict[int, float]] | None]:
        self.text_sent += len(delta.text)
        self.finished = delta.finish_reason is not None
        return delta.text, delta.token_ids, delta.logprobs


def _top(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:n]


def token_text(tok, t: int) -> str:
    """One token's text for logprobs; ``token_id:N`` (vLLM's form for token ids as tokens) when the
    checkpoint has no tokenizer."""
    return tok.decode([t], skip_special_tokens=False) if tok is not None else f"token_id:{t}"


def completion_logprobs(tok, token_ids: list[int], lps: list[dict[int, float] | None], n: int, offset: int) -> dict:
    """OpenAI's legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset (an entry
    of None, an echoed prompt's first token: null log-prob and top)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for t, entry in zip(token_ids, lps):
        s = token_text(tok, t)
        tokens.append(s)
        token_lps.append(entry.get(t) if entry is not None else None)
        tops.append({token_text(tok, k): v for k, v in _top(entry, n)} if n and entry is not None else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok, token_ids: list[int], lps: list[dict[int, float]], n: int) -> dict:
    """OpenAI's chat shape: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""
    def item(t: int, lp: float | None) -> dict:
        s = token_text(tok, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    content = []
    for t, entry in zip(token_ids, lps):
        content.append({**item(t, entry.get(t)), "top_logprobs": [item(k, v) for k, v in _top(entry, n)]})
    return {"content": content}


_DONE = object()


async def merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's position. Leaving early
    (or an error in one) cancels them all, which aborts their requests."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                q.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 -- handed to the consumer
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, _DONE))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
