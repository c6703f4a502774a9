"""Structured output: a request's text is constrained to a JSON schema, a regex, or a choice.

The grammar library is xgrammar (what vLLM and SGLang use): a request's grammar is compiled once
against the model's vocabulary (compiled grammars are cached by their key, so identical schemas
compile once), each sample keeps a matcher, the sampler masks that sample's logits row with the
matcher's token bitmask (other rows are untouched), and the engine advances the matcher with each
accepted token. The stop (EOS) tokens are allowed only where the grammar can end.

xgrammar and transformers (whose tokenizer wrapper xgrammar reads the vocabulary from) are
imported only when a request asks for structured output.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: ``json`` (a JSON schema, as a dict or JSON text), ``regex``, ``choice``
    (the output is one of these strings), ``json_object`` (any JSON object)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        def bad(why: str) -> ValueError:
            return ValueError(f"SamplingParams.structured_outputs={self!r} is invalid: {why}")

        given = [n for n in ("json", "regex", "choice") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise bad(f"set exactly one of json, regex, choice, json_object (got {', '.join(given) or 'none'})")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except json.JSONDecodeError as e:
                    raise bad(f"json is not valid JSON text: {e}") from None
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise bad("json must be a JSON schema (an object), as a dict or JSON text")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise bad("regex must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise bad("choice must be a non-empty list of non-empty strings")
        if not isinstance(self.json_object, bool):
            raise bad("json_object must be true or false")

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar depends on: (kind, canonical text)."""
        if self.json is not None:
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            return "json", json.dumps(schema, sort_keys=True)
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        return "json_object", ""


class GrammarState:
    """One sample's position in its grammar."""

    def __init__(self, matcher: Any):
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it."""
        return bool(self.matcher.accept_token(token))

    @property
    def is_terminated(self) -> bool:
        """Has the grammar ended (a stop token was accepted where it could end)?"""
        return bool(self.matcher.is_terminated())

    def fill_mask(self, masks: torch.Tensor, row: int) -> None:
        """Write row ``row`` of ``masks`` (:func:`allocate_masks`): the tokens allowed next."""
        self.matcher.fill_next_token_bitmask(masks, row)

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` accepted tokens."""
        if n:
            self.matcher.rollback(n)


def allocate_masks(rows: int, vocab_size: int) -> torch.Tensor:
    """Grammar bitmasks for ``rows`` rows: int32 ``[rows, ceil(vocab / 32)]``, token v allowed where bit
    v % 32 of word v // 32 is set (what ``moe_penalize_rows`` reads as ``SampleRow.mask``)."""
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab_size)


class StructuredOutputManager:
    """Compiles requests' grammars against one model's vocabulary and masks logits rows."""

    MAX_CACHED = 256  # compiled grammars kept (least recently used dropped first)

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        try:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast
        except ImportError as e:
            raise ValueError(f"structured output needs the xgrammar and transformers packages ({e}): "
                             "pip install xgrammar transformers") from None
        self._xgr = xgr
        # xgrammar reads the vocabulary (and whether it is byte-level) from a transformers tokenizer
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok, eos_token=tokenizer.eos_token,
                                     bos_token=tokenizer.bos_token)
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # cached below, by key
        self._compiled: dict[tuple[str, str], Any] = {}
        # compiles may run off the engine thread (the server compiles a request's grammar in a worker
        # thread before the engine sees it), so the cache has one lock
        self._lock = threading.RLock()

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar for ``params`` (cached); ValueError naming the field if it is bad."""
        with self._lock:
            return self._compile(params)

    def _compile(self, params: StructuredOutputsParams) -> Any:
        key = params.key
        grammar = self._compiled.pop(key, None)
        if grammar is None:
            kind, text = key
            try:
                if kind == "json":
                    # compact JSON: free whitespace would let a weak model pad the output forever
                    grammar = self.compiler.compile_json_schema(text, any_whitespace=False)
                elif kind == "json_object":
                    grammar = self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
                elif kind == "regex":
                    grammar = self.compiler.compile_regex(text)
                else:  # choice: an EBNF alternation of the literal strings (JSON string escapes)
                    alternatives = " | ".join(json.dumps(c) for c in json.loads(text))
                    grammar = self.compiler.compile_grammar(f"root ::= {alternatives}")
            except RuntimeError as e:
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                why = why.split("] ", 1)[-1]  # drop xgrammar's "[time] file:line" prefix
                raise ValueError(f"SamplingParams.structured_outputs={params!r} is invalid: {why}") from None
            if len(self._compiled) >= self.MAX_CACHED:
                self._compiled.pop(next(iter(self._compiled)))
        self._compiled[key] = grammar  # (re)inserted last: most recently used
        return grammar

    def new_state(self, params: StructuredOutputsParams) -> GrammarState:
        return GrammarState(self._xgr.GrammarMatcher(self.compile(params)))


def apply_grammar_masks(logits_BV: torch.Tensor, rows: list[int], states: list[GrammarState]) -> None:
    """Mask (in place, to -inf) the tokens each row's grammar does not allow next; only ``rows``."""
    import xgrammar as xgr

    bitmask = allocate_masks(logits_BV.shape[0], logits_BV.shape[1])
    for row, state in zip(rows, states):
        state.fill_mask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits_BV, bitmask, indices=rows)
