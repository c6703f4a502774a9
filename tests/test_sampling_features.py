"""n > 1, presence / frequency / repetition penalties and logit_bias: against a reference
implementation on small logits, and through the engine (the embedded default model)."""
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from moe import LLM, SamplingParams
from moe.sampler import Sampler, apply_logit_bias, apply_penalties, process_logits
from ops.sample import seed_key

PROMPT = "The history of the city begins with a small village by the river, where farmers and"


# ---- reference: plain Python, one logit at a time -----------------------------------------------
def reference_logits(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    """logit_bias, then HF/vLLM repetition penalty over prompt + output tokens (positive logits
    divided, negative multiplied), then OpenAI's ``- count * frequency - (count > 0) * presence``
    over output tokens."""
    out = list(logits)
    for t, b in (p.logit_bias or {}).items():
        out[t] += b
    seen = set(prompt) | set(output)
    for t in range(len(out)):
        if t in seen:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        c = output.count(t)
        out[t] -= c * p.frequency_penalty + (1 if c else 0) * p.presence_penalty
    return out


def _hist(prompt, output):
    return SimpleNamespace(prompt_token_ids=prompt, output_token_ids=output, grammar=None)


CASES = [
    (SamplingParams(presence_penalty=1.5), [1, 2], [3, 3, 4]),
    (SamplingParams(frequency_penalty=0.7), [1, 2], [3, 3, 3, 4]),
    (SamplingParams(frequency_penalty=-0.5, presence_penalty=-1.0), [], [0, 9, 9]),
    (SamplingParams(repetition_penalty=1.8), [1, 5, 5], [2, 7]),
    (SamplingParams(repetition_penalty=0.6), [1, 5], []),
    (SamplingParams(logit_bias={0: 100.0, 4: -3.5}), [1], [2]),
    (SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, logit_bias={3: 2.0}),
     [3, 6, 1], [3, 8, 8, 6]),
]


def test_penalties_and_bias_match_the_reference_row_by_row_in_one_batch():
    g = torch.Generator().manual_seed(0)
    V = 10
    logits = torch.randn(len(CASES) + 1, V, generator=g) * 3
    params = [c[0] for c in CASES] + [SamplingParams()]  # the last row uses no feature
    seqs = [_hist(c[1], c[2]) for c in CASES] + [_hist([1, 2], [3])]
    got = process_logits(logits, params, seqs)
    for r, (p, prompt, output) in enumerate(CASES):
        want = reference_logits(logits[r].tolist(), prompt, output, p)
        assert got[r].tolist() == pytest.approx(want, rel=1e-6, abs=1e-5), r
    assert torch.equal(got[-1], logits[-1])  # untouched, bit for bit
    assert not torch.equal(got, logits) and logits.data_ptr() != got.data_ptr()  # the input is not changed


def test_apply_penalties_is_batched_over_rows_with_different_settings():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    out = apply_penalties(logits, [[0, 1], []], [[2, 2], [0]], [0.0, 1.0], [0.5, 0.0], [2.0, 1.0])
    assert out.tolist() == [[1.0, -4.0, 0.5 - 2 * 0.5, 0.5], [2.0 - 1.0, -2.0, 1.0, 0.5]]
    biased = logits.clone()
    apply_logit_bias(biased, [{3: 10.0}, None])
    assert biased.tolist() == [[2.0, -2.0, 1.0, 10.5], [2.0, -2.0, 1.0, 0.5]]


def test_greedy_sees_penalties_and_bias():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    s = Sampler(0)
    assert s(logits, [SamplingParams(temperature=0)], [None], [0], [[]]).token_ids == [0]
    hist = [_hist([3], [0, 0])]
    assert s(logits, [SamplingParams(temperature=0, frequency_penalty=1.0)], [None], [0], [[]], hist).token_ids == [1]
    assert s(logits, [SamplingParams(temperature=0, logit_bias={3: 6.0})], [None], [0], [[]], hist).token_ids == [3]
    assert s(logits, [SamplingParams(temperature=0, repetition_penalty=2.0)], [None], [0], [[]], hist).token_ids == [1]


def test_rows_without_the_new_fields_sample_exactly_as_before():
    """A batch mixing plain and processed rows: the plain rows draw the same tokens as a batch of
    plain rows alone (same generators), and the processed row's distribution is the reference's."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g)
    plain = SamplingParams(temperature=0.9, top_k=20, seed=3)
    hist = [_hist([1], [2, 2]), _hist([1], [4]), _hist([3], [])]

    keys = [seed_key(i) for i in range(3)]
    alone = Sampler(0)(logits[[0, 2]], [plain, plain], [keys[0], keys[2]], [5, 7], [[], []]).token_ids
    mixed = Sampler(0)(logits, [plain, SamplingParams(temperature=0.9, presence_penalty=2.0), plain], keys, [5, 6, 7],
                       [[], [], []], hist).token_ids
    assert [mixed[0], mixed[2]] == alone


@pytest.mark.parametrize("field, value, message", [
    ("n", 0, "at least 1"), ("n", 1.5, "integer"),
    ("presence_penalty", 2.5, "[-2, 2]"), ("frequency_penalty", -3, "[-2, 2]"), ("presence_penalty", "x", "number"),
    ("repetition_penalty", 0.0, "> 0"), ("repetition_penalty", float("nan"), "> 0"),
    ("logit_bias", {5: 101}, "[-100, 100]"), ("logit_bias", {-1: 1.0}, "token id"), ("logit_bias", [1], "dict"),
    ("logit_bias", {"a": 1.0}, "token id"), ("structured_outputs", {"json": {}}, "StructuredOutputsParams"),
])
def test_invalid_fields_name_themselves(field, value, message):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.*is invalid") as e:
        SamplingParams(**{field: value})
    assert message in str(e.value)


def test_logit_bias_accepts_json_style_string_keys():
    assert SamplingParams(logit_bias={"12": 5, 7: -1.5}).logit_bias == {12: 5.0, 7: -1.5}


# ---- through the engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


def test_logit_bias_outside_the_vocabulary_is_rejected(llm):
    with pytest.raises(ValueError, match=r"SamplingParams\.logit_bias=.*outside the vocabulary"):
        llm.engine.add_request("hi", SamplingParams(logit_bias={10**6: 1.0}))
    assert not llm.engine.has_unfinished_requests()


def test_more_logprobs_than_max_logprobs_are_rejected(llm):
    assert llm.config.max_logprobs == 20  # vLLM's default
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=21 is more than .*max_logprobs=20"):
            llm.engine.add_request("hi", SamplingParams(**{field: 21}))
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2, logprobs=20))[0].outputs[0]
    assert all(len(d) >= 20 for d in out.logprobs)
    with pytest.raises(ValueError, match="max_logprobs=-2"):
        LLM(max_logprobs=-2)


def test_logit_bias_forces_a_token_and_penalties_change_greedy_output(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    forced = llm.generate(PROMPT, replace(params, logit_bias={42: 100.0}))[0].outputs[0].token_ids
    assert forced == [42] * 24
    rep = llm.generate(PROMPT, replace(params, repetition_penalty=5.0))[0].outputs[0].token_ids
    assert rep != base
    # with a strong repetition penalty no token of the prompt is chosen while others are available
    assert len(set(rep)) > len(set(base))


def test_n_greedy_gives_n_equal_samples(llm):
    params = SamplingParams(temperature=0, max_tokens=16)
    one = llm.generate(PROMPT, params)[0]
    out = llm.generate(PROMPT, replace(params, n=3))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
    assert [c.token_ids for c in out.outputs] == [one.outputs[0].token_ids] * 3
    assert out.metrics.num_generated == 48 and out.metrics.num_prompt_tokens == len(out.prompt_token_ids)


def test_n_seeded_samples_are_reproducible_and_equal_each_sample_alone(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=7, n=3)
    a = [c.token_ids for c in llm.generate(PROMPT, params)[0].outputs]
    b = [c.token_ids for c in llm.generate(PROMPT, params)[0].outputs]
    assert a == b and len({tuple(x) for x in a}) > 1  # reproducible, and the samples differ
    alone = [llm.generate(PROMPT, replace(params, n=1, seed=7 + i))[0].outputs[0].token_ids for i in range(3)]
    assert a == alone


def test_n_samples_share_the_prompt_blocks(llm):
    e = llm.engine
    bm = e.block_manager
    rid = e.add_request(PROMPT + " a different tail so nothing is cached yet",
                        SamplingParams(temperature=0.8, seed=1, max_tokens=8, n=3))
    seqs = e.samples[rid]
    prompt_len = seqs[0].num_prompt_tokens
    full = prompt_len // bm.block_size
    assert full >= 1
    q0 = bm.prefix_query_tokens
    e.step()  # sample 0 prefills; the others wait for its prompt blocks
    assert seqs[0].num_output_tokens == 1 and all(s.num_computed_tokens == 0 for s in seqs[1:])
    h1 = bm.prefix_hit_tokens  # (sample 0 may hit blocks earlier tests cached)
    e.step()  # the others are admitted and take its full prompt blocks from the prefix cache
    shared = seqs[0].block_table.blocks[:full]
    for s in seqs[1:]:
        assert s.block_table.blocks[:full] == shared
    assert all(bm.blocks[b].ref_count == 3 for b in shared)
    assert bm.prefix_hit_tokens - h1 == 2 * full * bm.block_size and bm.prefix_query_tokens - q0 == 3 * prompt_len
    while e.has_unfinished_requests():
        e.step()
    assert bm.num_free_blocks == bm.num_blocks and rid not in e.samples and rid not in e.seqs


def test_n_streaming_deltas_carry_their_sample_and_finish_once(llm):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=10, n=3)
    final = llm.generate(PROMPT, params)[0]
    texts, ids = ["", "", ""], [[], [], []]
    finished = []
    for out in llm.generate_stream(PROMPT, params):
        d = out.delta
        texts[d.index] += d.text
        ids[d.index] += d.token_ids
        finished.append(out.finished)
    assert finished.count(True) == 1 and finished[-1]
    assert texts == [c.text for c in final.outputs] and ids == [c.token_ids for c in final.outputs]


def test_abort_of_an_n_request_frees_every_sample(llm):
    e = llm.engine
    rid = e.add_request(PROMPT, SamplingParams(max_tokens=50, n=4, seed=0))
    for _ in range(3):
        e.step()
    e.abort(rid)
    assert not e.has_unfinished_requests() and e.block_manager.num_free_blocks == e.block_manager.num_blocks
    assert rid not in e.seqs and rid not in e.samples


def test_stats_report_load_and_prefix_cache(llm):
    e = llm.engine
    e.add_request(PROMPT, SamplingParams(max_tokens=4))
    s = e.stats()
    assert (s.num_running, s.num_waiting) == (0, 1) and s.num_total_blocks == e.block_manager.num_blocks
    e.step()
    s = e.stats()
    assert s.num_running == 1 and s.num_waiting == 0 and s.num_free_blocks < s.num_total_blocks
    assert s.kv_cache_usage == pytest.approx(1 - s.num_free_blocks / s.num_total_blocks) and s.kv_cache_usage > 0
    assert s.prefix_cache_hits <= s.prefix_cache_queries and s.prefix_cache_hits > 0  # the prompt ran before
    while e.has_unfinished_requests():
        e.step()
    assert e.stats().kv_cache_usage == 0


def test_requests_that_process_logits_are_not_drafted(llm):
    spec = LLM(dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                    "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    prompt = "The module defines the following functions"
    plain = SamplingParams(temperature=0, max_tokens=40)
    spec.generate(prompt, plain)
    assert spec.engine.stats().spec_num_draft_tokens > 0
    before = spec.engine.spec_drafted
    for p in (replace(plain, presence_penalty=0.5), replace(plain, logit_bias={7: 1.0}),
              replace(plain, repetition_penalty=1.2)):
        out = spec.generate(prompt, p)[0].outputs[0]
        assert out.token_ids == llm.generate(prompt, p)[0].outputs[0].token_ids  # exact, as without speculation
    assert spec.engine.spec_drafted == before
