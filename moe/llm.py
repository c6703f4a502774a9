"""The public generate API, in vLLM's shape: ``LLM(model).generate(prompts, sampling_params)``."""
from __future__ import annotations

import logging
from importlib import resources
from typing import Any, Iterator, Sequence as Seq

import torch

from .config import EngineConfig
from .engine import LLMEngine
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger("moe")

Prompt = str | dict


def default_model_path() -> str:
    """The small MoE the project trains and ships inside the package."""
    return str(resources.files("moe") / "default_model")


class LLM:
    """Load a checkpoint once, then generate for batches of prompts.

    >>> llm = LLM("./mixtral-checkpoint", dtype="bfloat16", kv_cache_memory="4GiB")
    >>> outs = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=32))

    The keyword arguments are :class:`~moe.config.EngineConfig`'s fields, each documented there.
    Speculative decoding with a small drafter of the same vocabulary (greedy outputs unchanged,
    sampled ones distributed as without it; see moe/drafter.py):

    >>> llm = LLM("./ckpt", speculative_config={"method": "draft_model", "model": "./ckpt-draft",
    ...                                         "num_speculative_tokens": 4})
    ``sharding`` (a YAML path, a dict of its keys, or a ShardingConfig) spreads the model over
    the ranks a launcher starts: run the same script under ``torchrun --nproc-per-node N``
    (or mpirun / srun); every rank takes part and returns the same outputs.
    """

    def __init__(self, model: str | None = None, **options: Any):
        self.config = EngineConfig.from_options(model or default_model_path(), **options)
        self.engine = LLMEngine(self.config)

    def expert_counts(self) -> torch.Tensor:
        """Tokens routed to each expert, ``[moe_layers, num_experts]`` (needs ``record_expert_counts=True``)."""
        return self.engine.expert_counts()

    def expert_placement(self, expert_parallel: int, redundant_experts: int = 0) -> list[list[int]]:
        """A load-balanced expert placement for a sharding file (``placement:``, one list of logical
        experts per EP rank, with ``redundant_experts`` replicas of the busiest), from the counts
        recorded so far summed over layers (EPLB-style, :func:`parallel.placement_from_counts`)."""
        from parallel import placement_from_counts

        counts = self.expert_counts().sum(0)
        return placement_from_counts(counts.tolist(), expert_parallel, len(counts) + redundant_experts)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` uses when given no ``sampling_params``: the checkpoint's
        generation_config.json defaults (``generation_config="auto"``) over SamplingParams'."""
        return SamplingParams(**self.engine.default_sampling_params)

    def _add_all(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None,
                 stream: bool = False) -> list[str | RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)  # (None: the engine's defaults, get_default_sampling_params)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts: "
                                 "pass one SamplingParams or one per prompt")
        slots: list[str | RequestOutput] = []
        for prompt, p in zip(prompts, params):
            try:
                slots.append(self.engine.add_request(prompt, p, stream=stream))
            except ValueError as e:
                # a bad request gets an error output; the others still run
                log.warning("request rejected: %s", e)
                slots.append(_error_output(prompt, str(e)))
        return slots

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """One :class:`RequestOutput` per prompt, in order. A rejected prompt's output carries
        ``error`` (and ``finish_reason == "error"``) while the rest are generated normally."""
        slots = self._add_all(prompts, sampling_params)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[s] if isinstance(s, str) else s for s in slots]

    def chat(self, messages: list[dict] | Seq[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` dicts) or to a
        list of them, rendered with ``chat_template`` (Jinja text) or the checkpoint's template.
        One :class:`RequestOutput` per conversation; the rendered text is tokenized as is (the
        template writes any special tokens itself)."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this checkpoint has no tokenizer.json: chat needs it to render and tokenize messages")
        single = isinstance(messages, list) and (not messages or isinstance(messages[0], dict))
        conversations = [messages] if single else list(messages)
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template)
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params)

    def generate_stream(self, prompts: Prompt | Seq[Prompt],
                        sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> Iterator[RequestOutput]:
        """Yield increments as they are produced: each ``RequestOutput.delta`` holds the new text
        and token ids of that request since its previous increment (text that could still become
        a stop string waits for the increment that decides it, so the pieces add up to the final text).
        Multi-step decoding hands out tokens at least every ``ModelRunner.STREAM_STEP_SECONDS`` here."""
        for s in self._add_all(prompts, sampling_params, stream=True):
            if not isinstance(s, str):
                yield s
        while self.engine.has_unfinished_requests():
            yield from self.engine.step()


def _error_output(prompt: Prompt, message: str) -> RequestOutput:
    import time

    text = prompt if isinstance(prompt, str) else (prompt.get("prompt") if isinstance(prompt, dict) else None)
    ids = list(prompt.get("prompt_token_ids", [])) if isinstance(prompt, dict) else []
    comp = CompletionOutput(0, "", [], None, "error")
    return RequestOutput("", text, ids, [comp], True, RequestMetrics(time.perf_counter()), error=message, delta=comp)
