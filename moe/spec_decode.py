"""Speculative decoding by n-gram lookup ("prompt lookup").

A decoding sequence whose last ``n`` tokens (``prompt_lookup_max`` down to ``prompt_lookup_min``)
occurred earlier in its own prompt or output proposes the up to ``num_speculative_tokens`` tokens
that followed that earlier occurrence. The step then runs the last token and the draft as one
chunk: row ``j``'s logits give the model's greedy token after draft token ``j``, so the draft is
accepted up to the first disagreement, plus one token of the model's own (see
:func:`moe.model_runner.accept_greedy`). Each accepted token is the token plain greedy decoding
would have produced, so outputs are unchanged (up to float rounding of a multi-row step), while
one pass over the weights can yield several tokens. Rejected rows leave K/V past the sequence's
computed length, overwritten by later steps.

Sampled requests verify the draft by speculative sampling (:meth:`moe.sampler.Sampler.verify_draft`):
each token is distributed exactly as in plain sampling, though a seeded request draws different
random numbers than without speculation. Requests speculate once past their ``min_tokens``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence as Seq
from dataclasses import dataclass

from .sequence import Sequence

METHODS = ("ngram",)


@dataclass(frozen=True)
class NgramConfig:
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    @staticmethod
    def parse(spec: Mapping | None) -> "NgramConfig | None":
        """vLLM's ``speculative_config`` dict: ``{"method": "ngram", "num_speculative_tokens": 4,
        "prompt_lookup_max": 4, "prompt_lookup_min": 2}``; None: no speculation."""
        if spec is None:
            return None
        if not isinstance(spec, Mapping):
            raise ValueError(f"speculative_config must be a dict such as {{'method': 'ngram', "
                             f"'num_speculative_tokens': 4}}, not {type(spec).__name__}")
        d = dict(spec)
        method = d.pop("method", "ngram")
        if method not in METHODS:
            raise ValueError(f"speculative_config method {method!r} is not supported: "
                             f"choose one of {', '.join(METHODS)}")
        fields = set(NgramConfig.__dataclass_fields__)
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}; "
                             f"valid: method, {', '.join(sorted(fields))}")
        cfg = NgramConfig(**d)
        for name in fields:
            v = getattr(cfg, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"speculative_config {name}={v!r} must be a positive integer")
        if cfg.prompt_lookup_min > cfg.prompt_lookup_max:
            raise ValueError(f"speculative_config prompt_lookup_min ({cfg.prompt_lookup_min}) exceeds "
                             f"prompt_lookup_max ({cfg.prompt_lookup_max})")
        return cfg


def propose_ngram(tokens: Seq[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix
    (``n_max`` down to ``n_min`` tokens) of ``tokens``; [] when none occurs."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = list(tokens[L - n:])
        last = suffix[-1]
        for i in range(L - n - 1, -1, -1):  # the occurrence must end before the suffix itself
            if tokens[i + n - 1] == last and list(tokens[i:i + n]) == suffix:
                return list(tokens[i + n:i + n + k])
    return []


class NgramProposer:
    """The scheduler's proposer: drafts for eligible sequences."""

    def __init__(self, cfg: NgramConfig, max_model_len: int):
        self.cfg = cfg
        self.max_model_len = max_model_len

    def __call__(self, seq: Sequence) -> list[int]:
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:  # (EOS and stop ids are banned until then)
            return []
        # room: the draft and the model's own next token must fit max_tokens and the context
        room = min(self.cfg.num_speculative_tokens, self.max_model_len - seq.num_tokens - 1)
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - seq.num_output_tokens - 1)
        if room < 1:
            return []
        return propose_ngram(seq.token_ids, room, self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max)
