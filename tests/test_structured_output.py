"""Structured output (xgrammar): JSON schema, json_object, regex and choice on the embedded model."""
import json
import re

import jsonschema
import pytest
import torch

from moe import LLM, SamplingParams
from moe.structured_output import (
    StructuredOutputsParams,
    apply_grammar_masks,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "colors", "member"],
    "additionalProperties": False,
}
PROMPTS = ["Once upon a time", "The module defines the following functions", "import os\nimport sys\n"]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


def _texts(outs):
    for o in outs:
        assert o.error is None and all(c.finish_reason == "stop" for c in o.outputs), o
    return [c.text for o in outs for c in o.outputs]


def test_json_schema_output_parses_and_validates(llm):
    so = StructuredOutputsParams(json=SCHEMA)
    params = [SamplingParams(temperature=0, max_tokens=200, structured_outputs=so),
              SamplingParams(temperature=1.0, seed=5, max_tokens=200, structured_outputs=so, n=2),
              SamplingParams(temperature=0.7, seed=9, max_tokens=200, structured_outputs=StructuredOutputsParams(
                  json=json.dumps(SCHEMA)), presence_penalty=0.5)]
    for text in _texts(llm.generate(PROMPTS, params)):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_choice_and_regex(llm):
    choices = ["yes", "no", "maybe later"]
    pattern = r"[A-Z][a-z]{2,6} [0-9]{2,4}"
    outs = llm.generate(PROMPTS, [
        SamplingParams(temperature=0.9, seed=1, max_tokens=200,
                       structured_outputs=StructuredOutputsParams(json_object=True)),
        SamplingParams(temperature=1.0, seed=2, max_tokens=20, n=3,
                       structured_outputs=StructuredOutputsParams(choice=choices)),
        SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(regex=pattern)),
    ])
    texts = _texts(outs)
    assert isinstance(json.loads(texts[0]), dict)
    assert all(t in choices for t in texts[1:4])
    assert re.fullmatch(pattern, texts[4]), texts[4]


def test_a_structured_request_leaves_the_rest_of_the_batch_unchanged(llm):
    plain = [SamplingParams(temperature=0, max_tokens=20), SamplingParams(temperature=0.8, seed=4, max_tokens=20)]
    alone = [llm.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(PROMPTS, plain)]
    structured = SamplingParams(temperature=0, max_tokens=100,
                                structured_outputs=StructuredOutputsParams(json=SCHEMA))
    outs = llm.generate(PROMPTS, [*plain, structured])
    assert [o.outputs[0].token_ids for o in outs[:2]] == alone
    jsonschema.validate(json.loads(outs[2].outputs[0].text), SCHEMA)


def test_the_grammar_ends_the_output_even_when_eos_is_ignored_or_banned(llm):
    so = StructuredOutputsParams(choice=["yes", "no"])
    for params in (SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, structured_outputs=so),
                   SamplingParams(temperature=0, max_tokens=30, min_tokens=10, structured_outputs=so)):
        out = llm.generate(PROMPTS[0], params)[0].outputs[0]
        assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_eos_is_allowed_only_where_the_grammar_can_end(llm):
    e = llm.engine
    manager = e._structured_outputs()
    eos = e.eos_ids[0]
    state = manager.new_state(StructuredOutputsParams(json_object=True))
    V = e.model_config.vocab_size
    logits = torch.zeros(2, V)
    apply_grammar_masks(logits, [1], [state])
    assert torch.equal(logits[0], torch.zeros(V))  # the other row is untouched
    assert logits[1, eos] == float("-inf") and (logits[1] == 0).sum() >= 1
    for t in e.tokenizer.encode('{"a": 1}'):
        assert state.accept(t)
    logits = torch.zeros(1, V)
    apply_grammar_masks(logits, [0], [state])
    assert logits[0, eos] == 0 and not state.is_terminated
    assert state.accept(eos) and state.is_terminated


def test_compiled_grammars_are_cached_by_key(llm):
    manager = llm.engine._structured_outputs()
    a = manager.compile(StructuredOutputsParams(json=SCHEMA))
    assert manager.compile(StructuredOutputsParams(json=json.dumps(SCHEMA, indent=2))) is a  # same schema
    assert manager.compile(StructuredOutputsParams(regex="a+")) is not a


@pytest.mark.parametrize("so, message", [
    (StructuredOutputsParams(regex="[unclosed"), "Unclosed"),
    (StructuredOutputsParams(json={"type": "bogus"}), "bogus"),
])
def test_a_bad_grammar_is_rejected_when_added(llm, so, message):
    with pytest.raises(ValueError, match=r"SamplingParams\.structured_outputs=.*is invalid") as e:
        llm.engine.add_request("hi", SamplingParams(structured_outputs=so))
    assert message in str(e.value)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"), ({"regex": "a", "choice": ["b"]}, "exactly one"), ({"json": "{oops"}, "not valid JSON"),
    ({"json": [1]}, "JSON schema"), ({"choice": []}, "non-empty list"), ({"choice": ["a", ""]}, "non-empty strings"),
    ({"regex": ""}, "non-empty string"),
])
def test_structured_outputs_params_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=r"SamplingParams\.structured_outputs=") as e:
        StructuredOutputsParams(**kwargs)
    assert message in str(e.value)


def test_structured_output_without_a_tokenizer_is_a_clear_error(tmp_path):
    import shutil

    from moe.llm import default_model_path

    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(f"{default_model_path()}/{f}", tmp_path / f)
    bare = LLM(str(tmp_path), dtype="float32")
    with pytest.raises(ValueError, match="tokenizer.json"):
        bare.engine.add_request({"prompt_token_ids": [5, 6]},
                                SamplingParams(structured_outputs=StructuredOutputsParams(regex="a")))


def test_async_engine_compiles_grammars_off_the_engine_thread(llm, monkeypatch):
    """AsyncLLM compiles a request's grammar in a worker thread: a plain request keeps getting tokens
    meanwhile, the structured one then runs and validates, and a bad grammar is that request's error."""
    import asyncio
    import threading

    from moe.serving.async_llm import AsyncLLM, RequestError

    engine = llm.engine
    started, release = threading.Event(), threading.Event()
    compile_grammar = engine.prepare_structured_output

    def slow_compile(params):  # holds the compile until the plain request has produced tokens
        started.set()
        assert release.wait(60)
        compile_grammar(params)

    monkeypatch.setattr(engine, "prepare_structured_output", slow_compile)
    alloop = AsyncLLM(engine)
    alloop.start()

    async def main():
        structured = alloop.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=200, structured_outputs=(
            StructuredOutputsParams(json=SCHEMA))), "structured")
        plain_tokens = 0
        async for out in alloop.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24), "plain"):
            plain_tokens = len(out.outputs[0].token_ids)
        assert started.is_set() and plain_tokens == 24  # the plain request finished while the compile waited
        release.set()
        async for out in structured:
            pass
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
        with pytest.raises(RequestError, match="structured_outputs"):
            async for _ in alloop.generate(PROMPTS[0], SamplingParams(max_tokens=4, structured_outputs=(
                    StructuredOutputsParams(regex="(unclosed"))), "bad"):
                pass

    try:
        asyncio.run(main())
    finally:
        release.set()
        alloop.shutdown()
