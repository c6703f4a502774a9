"""Speculative decoding by n-gram lookup: proposals, greedy verification, and unchanged outputs."""
import pytest
import torch

from moe import LLM, SamplingParams
from moe.model_runner import accept_greedy
from moe.spec_decode import NgramConfig, propose_ngram

from test_engine import _run_engine
from test_quant_default_model import TEXT

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def test_propose_ngram_takes_the_longest_most_recent_match():
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 6, 7, 1, 6, 7]
    # suffix [6, 7] last occurred at 5..6 (followed by 1, 6, 7), before that at 1..2
    assert propose_ngram(tokens, 3, 1, 2) == [1, 6, 7]
    assert propose_ngram(tokens, 1, 1, 2) == [1]
    # a longer suffix [1, 6, 7] never occurred earlier: falls back to the 2-gram
    assert propose_ngram(tokens, 2, 1, 3) == [1, 6]
    assert propose_ngram([1, 2, 3], 4, 1, 3) == []  # nothing repeats
    assert propose_ngram([4, 4], 4, 1, 3) == [4]  # the occurrence may overlap the suffix's start
    assert propose_ngram([9], 4, 1, 3) == []


def test_accept_greedy_keeps_confirmed_drafts_and_one_model_token():
    rows = [(11, None), (12, None), (99, None), (14, None)]
    assert accept_greedy((11, 12, 13), rows) == rows[:3]  # 13 rejected: the model's 99 instead
    assert accept_greedy((11, 12, 14), rows[:3] + [(7, None)]) == rows[:3]
    assert accept_greedy((5,), [(6, None), (1, None)]) == [(6, None)]  # first draft rejected
    assert accept_greedy((11, 12), [(11, None), (12, None), (3, None)]) == [(11, None), (12, None), (3, None)]


@pytest.mark.parametrize("bad, match", [
    ({"method": "eagle"}, "method 'eagle' is not supported: choose one of ngram"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens=0 must be a positive integer"),
    ({"prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min .5. exceeds prompt_lookup_max .2."),
    ({"draft_model": "x"}, r"unknown keys \['draft_model'\]"),
    ("ngram", "must be a dict"),
])
def test_bad_speculative_config_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        NgramConfig.parse(bad)
    with pytest.raises(ValueError, match=match):
        LLM(speculative_config=bad)


PROMPTS = ["The module defines the following functions", "A list is a mutable sequence, and a tuple is",
           "import os\nimport sys\n", "Once upon a time"]


def _mixed_params():
    return [
        SamplingParams(temperature=0, max_tokens=40, logprobs=2),
        SamplingParams(temperature=0.8, seed=3, max_tokens=30),  # sampled: never speculates
        SamplingParams(temperature=0, max_tokens=37, stop=["functions"], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=45, min_tokens=10, ignore_eos=True),
    ]


def _summary(outs):
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


def test_speculation_changes_no_output_and_accepts_drafts():
    """float32, default model: in a mixed batch (greedy with logprobs, sampled, stop string,
    min_tokens) the greedy requests give the same tokens, text, finish reasons and log-probs with
    and without speculation (the sampled one draws other random numbers: its own test below)."""
    params = _mixed_params()
    want = LLM(dtype="float32").generate(PROMPTS, params)
    spec = LLM(dtype="float32", speculative_config=NGRAM)
    got = spec.generate(PROMPTS, params)
    greedy = [0, 2, 3]
    assert [_summary(got)[i] for i in greedy] == [_summary(want)[i] for i in greedy]
    assert len(got[1].outputs[0].token_ids) == 30 and got[1].outputs[0].finish_reason == "length"
    for a, b in zip(got[0].outputs[0].logprobs, want[0].outputs[0].logprobs):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert len(got[0].outputs[0].logprobs) == 40
    assert spec.engine.spec_drafted > 0 and 0 < spec.engine.spec_accepted <= spec.engine.spec_drafted
    assert got[2].outputs[0].text.endswith("functions") and got[2].outputs[0].finish_reason == "stop"


def test_streamed_deltas_of_speculative_steps_carry_every_token_and_logprob():
    """A verify step yields several tokens: its delta has all of them, with a log-prob entry each."""
    llm = LLM(dtype="float32", speculative_config=NGRAM)
    params = SamplingParams(temperature=0, max_tokens=40, logprobs=2)
    text, ids, lps, sizes = "", [], [], []
    for out in llm.generate_stream(PROMPTS[0], params):
        d = out.delta
        text, ids, lps = text + d.text, ids + d.token_ids, lps + d.logprobs
        sizes.append(len(d.token_ids))
        assert len(d.logprobs) == len(d.token_ids)
    final = out.outputs[0]
    assert max(sizes) > 1, "no step accepted a draft: pick a more repetitive prompt"
    assert (text, ids, lps) == (final.text, final.token_ids, final.logprobs)


def test_speculation_under_preemption_and_one_row_budget():
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(dtype="float32", block_size=4).generate(PROMPTS, sp)]
    per_token = LLM(dtype="float32", block_size=4).engine.kv_bytes_per_token()
    tight = LLM(dtype="float32", block_size=4, kv_cache_memory=12 * 4 * per_token, speculative_config=NGRAM)
    got, seqs, _ = _run_engine(tight, [{"prompt_token_ids": tight.get_tokenizer().encode(p)} for p in PROMPTS],
                               [sp] * len(PROMPTS))
    assert sum(s.num_preemptions for s in seqs) > 0, "no preemption happened"
    assert [o.outputs[0].token_ids for o in got] == want
    assert tight.engine.spec_accepted > 0
    # a token budget of 1 leaves no room for drafts: plain decoding
    one = LLM(dtype="float32", block_size=4, max_num_batched_tokens=1, speculative_config=NGRAM)
    assert [o.outputs[0].token_ids for o in one.generate(PROMPTS[:2], sp)] == want[:2]
    assert one.engine.spec_drafted == 0


def test_speculation_matches_transformers_on_a_tiny_checkpoint(checkpoint):
    """Mixtral-shaped tiny checkpoint, float32: greedy tokens with speculation equal transformers'."""
    from transformers import AutoModelForCausalLM

    path = checkpoint("mixtral")
    prompt = [3, 17, 45, 17, 45, 9, 3, 17]
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(str(path), dtype="float32", speculative_config=NGRAM)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert out[0].outputs[0].token_ids == ref
    assert llm.engine.spec_drafted > 0


def test_speculative_sampling_keeps_the_target_distribution():
    """A one-token draft over a 4-token vocabulary, 20000 seeds: the first emitted token follows
    row 0's distribution, and after an accepted draft the second follows row 1's."""
    from moe.sampler import Sampler

    logits = torch.tensor([[1.0, 0.2, 0.7, -1.0], [0.1, 1.5, -0.5, 0.3]])
    params = SamplingParams(temperature=0.9, top_p=0.95)
    sampler = Sampler(0)
    from moe.sampler import _filtered_probs
    p0, p1 = _filtered_probs(logits, [params, params])
    first, second = torch.zeros(4), torch.zeros(4)
    n = 20000
    for i in range(n):
        out = sampler.verify_draft(logits, params, torch.Generator().manual_seed(i), (2,))
        first[out[0][0]] += 1
        if out[0][0] == 2:
            assert len(out) == 2
            second[out[1][0]] += 1
        else:
            assert len(out) == 1
    assert torch.allclose(first / n, p0, atol=0.015), (first / n, p0)
    assert torch.allclose(second / second.sum(), p1, atol=0.02), (second / second.sum(), p1)
    assert float(p0[3]) == 0 and first[3] == 0  # top-p's cut stays cut


def test_sampled_requests_speculate_and_stay_reproducible():
    sp = [SamplingParams(temperature=0.7, seed=11, max_tokens=48), SamplingParams(temperature=1.0, seed=5,
                                                                                  max_tokens=48, top_k=20)]
    runs = []
    for _ in range(2):
        llm = LLM(dtype="float32", speculative_config=NGRAM)
        runs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], sp)])
        assert llm.engine.spec_drafted > 0 and llm.engine.spec_accepted > 0
    assert runs[0] == runs[1] and all(len(t) == 48 for t in runs[0])


def test_speculation_registers_whole_blocks_for_the_prefix_cache():
    """Accepted draft tokens join the sequence before its full blocks are hashed: a follow-up
    prompt that extends a speculated output hits the cache for (nearly) all of it and gives the
    same output as a fresh engine."""
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(dtype="float32", block_size=4, speculative_config=NGRAM)
    first = llm.generate(PROMPTS[0], sp)[0]
    assert llm.engine.spec_accepted > 0
    ids = first.prompt_token_ids + first.outputs[0].token_ids
    e = llm.engine
    rid = e.add_request({"prompt_token_ids": ids}, sp)
    seq = e.seqs[rid]
    before = e.runner.num_tokens_run
    e.step()  # admits it: only what the cache lacks is computed (the last, partial blocks)
    assert e.runner.num_tokens_run - before <= 8, (e.runner.num_tokens_run - before, len(ids))
    while e.has_unfinished_requests():
        e.step()
    fresh = LLM(dtype="float32", block_size=4).generate({"prompt_token_ids": ids}, sp)[0]
    assert seq.token_ids[len(ids):] == fresh.outputs[0].token_ids


def test_speculation_with_shared_prefixes_preemption_and_chunked_prefill():
    """Randomized: greedy requests sharing prefixes (prefix-cache hits), a cache small enough to
    preempt, a token budget that chunks prefills, speculation on — each output equals the request
    run alone without any of it (float32, default model)."""
    g = torch.Generator().manual_seed(7)
    tok = LLM(dtype="float32").get_tokenizer()
    base = tok.encode(TEXT)[:40]
    prompts = []
    for i in range(10):
        cut = int(torch.randint(8, 40, (1,), generator=g))
        tail = torch.randint(3, 4000, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        prompts.append(base[:cut] + tail)
    lens = [int(torch.randint(8, 30, (1,), generator=g)) for _ in prompts]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
    alone = LLM(dtype="float32", block_size=4, enable_prefix_caching=False)
    want = [alone.generate({"prompt_token_ids": p}, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    per_token = alone.engine.kv_bytes_per_token()
    busy = LLM(dtype="float32", block_size=4, kv_cache_memory=40 * 4 * per_token, max_num_batched_tokens=24,
               speculative_config=NGRAM)
    got, seqs, _ = _run_engine(busy, [{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in got] == want
    assert sum(s.num_preemptions for s in seqs) > 0 and busy.engine.spec_accepted > 0
    assert busy.engine.block_manager.prefix_hit_tokens > 0


def test_verify_steps_through_the_captured_rows_keep_plain_decodings_outputs(monkeypatch):
    """bf16, one request at a time: a verify step (the token and its n-gram drafts) runs through the
    captured step, its one-call halves computing each row as a one-token step computes it, the LM
    head too: greedy tokens and log-probs equal plain decoding's, bit for bit
    (an op-by-op verify step rounds otherwise than one-row steps in bf16)."""
    import cpu_kernels

    if cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here (no compiler): no captured step")
    sp = SamplingParams(temperature=0, max_tokens=40, logprobs=2, ignore_eos=True)
    plain = LLM(dtype="bfloat16")
    want = [plain.generate([p], sp)[0].outputs[0] for p in PROMPTS]
    spec = LLM(dtype="bfloat16", speculative_config={**NGRAM, "cost_control": False})
    assert spec.engine.runner.captured is not None
    # the default model's weights fit the last-level caches of CPUs this runs on; the choice is speed's
    spec.engine.runner.captured.max_rows = 8
    _assert_verify_rows_equal(spec, PROMPTS, sp, want, monkeypatch)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_captured_verify_rows_equal_one_row_steps_on_tiny_families(family, checkpoint, monkeypatch):
    """The captured verify rows on tiny checkpoints: DeepSeek-V3 (MLA), gpt-oss (sinks, sliding window, a router that
    softmaxes the top k and so routes row by row, experts with biases and a clamped SwiGLU: the C
    call declines and each row runs op by op, as a one-row step does), Qwen2-MoE (its gated shared
    expert in the MoE call) and Mixtral give plain decoding's outputs (a wrong row position, slot or
    context length would not; on these tiny shapes an op-path verify happens to round as one-row
    steps do too: the default model's test above is the one that tells the two apart)."""
    import cpu_kernels

    if cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here (no compiler): no captured step")
    spec = LLM(str(checkpoint(family)), dtype="bfloat16", speculative_config={**NGRAM, "cost_control": False})
    captured = spec.engine.runner.captured
    assert captured.max_rows > 1  # (tiny: the weights fit the cache; gpt-oss's rows then one at a time)
    captured.max_rows = 8  # (the weights fit any last-level cache this runs on; the choice is speed's)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8] * 4 + list(range(20, 20 + n))} for n in (1, 6)]
    sp = SamplingParams(temperature=0, max_tokens=24, logprobs=2, ignore_eos=True)
    plain = LLM(str(checkpoint(family)), dtype="bfloat16")
    want = [plain.generate([p], sp)[0].outputs[0] for p in prompts]
    _assert_verify_rows_equal(spec, prompts, sp, want, monkeypatch)


def test_bf16_verify_rows_run_captured_whatever_the_cache(checkpoint, monkeypatch, tmp_path):
    """The captured verify rows read each weight from memory once for all rows (bf16: multi-row GEMVs,
    each expert once for the rows that chose it; packed: each weight's rows back to back), so they run
    wherever every half is one call, the model in the last-level cache or not, and keep plain
    decoding's outputs: 8 rows where bf16 experts stream from memory, 24 with packed experts."""
    import cpu_kernels
    from experts.formats import Int4Weights
    from test_quant_all_linear import quantize_all_linear

    if cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here (no compiler): no captured step")
    monkeypatch.setattr(cpu_kernels, "last_level_cache_bytes", lambda: 0)  # nothing fits
    spec = LLM(str(checkpoint("mixtral")), dtype="bfloat16", speculative_config={**NGRAM, "cost_control": False})
    assert spec.engine.runner.captured.max_rows == 8
    prompts = [{"prompt_token_ids": [5, 6, 7, 8] * 4 + list(range(20, 20 + n))} for n in (1, 6)]
    sp = SamplingParams(temperature=0, max_tokens=24, logprobs=2, ignore_eos=True)
    plain = LLM(str(checkpoint("mixtral")), dtype="bfloat16")
    want = [plain.generate([p], sp)[0].outputs[0] for p in prompts]
    _assert_verify_rows_equal(spec, prompts, sp, want, monkeypatch)
    packed = tmp_path / "int4"
    quantize_all_linear(checkpoint("mixtral"), packed, Int4Weights(32, symmetric=False))
    captured = LLM(str(packed), dtype="bfloat16").engine.runner.captured
    assert captured is not None and captured.max_rows == 24


def _assert_verify_rows_equal(spec, prompts, sp, want, monkeypatch):
    """``spec`` (greedy, one request at a time) runs verify steps of several rows through the
    captured step and gives ``want``'s tokens and log-probs."""
    from moe.cpu_decode import CapturedDecode

    real, rows = CapturedDecode.__call__, []
    monkeypatch.setattr(CapturedDecode, "__call__", lambda self, ids, pos, ctx: rows.append(len(ids)) or real(
        self, ids, pos, ctx))
    got = [spec.generate([p], sp)[0].outputs[0] for p in prompts]
    assert max(rows) > 1 and spec.engine.spec_accepted > 0
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
