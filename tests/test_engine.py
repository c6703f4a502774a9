"""Engine behaviour end to end on tiny checkpoints: continuous batching, preemption, chunked
prefill, prefix caching, streaming, stop conditions, seeded sampling and metrics. Outputs under
every scheduling condition must equal the outputs of each request run alone."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moe import LLM, SamplingParams


FAMILY = "qwen3_moe"


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n,), generator=g).tolist()


def _write_tokenizer(d: Path, overrides: dict[int, str] | None = None) -> None:
    """A word-level tokenizer over the tiny vocabulary: token i <-> "aNNN" (0-2 are special), so
    that no token's text is a substring of another's and every decoded text is predictable.
    ``overrides`` gives some ids another text."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({(overrides or {}).get(i, f"a{i:03d}"): i for i in range(3, 320)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<s>", "</s>")])
    tok.save(str(d / "tokenizer.json"))


def _text(ids: list[int]) -> str:
    """What the tokenizer decodes ``ids`` to (special tokens 0-2 skipped)."""
    return " ".join(f"a{i:03d}" for i in ids if i > 2)


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint(FAMILY)


@pytest.fixture(scope="module")
def tok_path(path, tmp_path_factory):
    d = tmp_path_factory.mktemp("with_tokenizer")
    for f in path.iterdir():
        shutil.copy(f, d / f.name)
    _write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def llm(tok_path):
    return LLM(str(tok_path), dtype="float32", block_size=4)


@pytest.fixture(scope="module")
def ref(path):
    """Runs each request alone, with no prefix cache: the reference every scheduling must match."""
    return LLM(str(path), dtype="float32", block_size=4, enable_prefix_caching=False)


def _alone(engine: LLM, prompt, params: SamplingParams):
    return engine.generate(prompt, params)[0]


def _ids(p: list[int]) -> dict:
    return {"prompt_token_ids": p}


def _same_output(got, want, where: str = "", text: bool = True) -> None:
    g, w = got.outputs[0], want.outputs[0]
    assert got.error is None and want.error is None
    assert g.token_ids == w.token_ids, f"{where}: tokens differ"
    assert g.finish_reason == w.finish_reason and g.stop_reason == w.stop_reason, where
    if text:
        assert g.text == w.text, where
    for name, a, b in (("logprobs", g.logprobs, w.logprobs), ("prompt_logprobs", got.prompt_logprobs,
                                                               want.prompt_logprobs)):
        assert (a is None) == (b is None), f"{where}: {name}"
        if a is None:
            continue
        assert len(a) == len(b), f"{where}: {name}"
        for x, y in zip(a, b):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.keys() == y.keys(), f"{where}: {name} keys"
                for t in x:
                    assert abs(x[t] - y[t]) < 1e-4, f"{where}: {name} of token {t}"


def _requests():
    """Six requests of different lengths and limits: greedy, seeded sampling, log-probs."""
    lengths = [2, 5, 8, 13, 21, 34]
    max_tokens = [12, 3, 20, 7, 16, 1]
    prompts = [_ids(_prompt(n, 100 + n)) for n in lengths]
    params = []
    for i, m in enumerate(max_tokens):
        if i in (1, 4):
            params.append(SamplingParams(temperature=0.8, top_p=0.95, seed=1000 + i, max_tokens=m, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=2,
                                         prompt_logprobs=1 if i == 3 else None))
    return prompts, params


def _engine_idle(llm: LLM) -> None:
    """Nothing left behind: every block free and unreserved, no sequences tracked."""
    e = llm.engine
    assert not e.has_unfinished_requests()
    assert e.seqs == {}
    bm = e.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert all(r == -1 for r in bm.reserved_by)


# ---- continuous batching --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_batched_requests_equal_each_request_alone(family, checkpoint):
    p = checkpoint(family)
    alone_llm = LLM(str(p), dtype="float32", block_size=4, enable_prefix_caching=False)
    batch_llm = LLM(str(p), dtype="float32", block_size=4)
    prompts, params = _requests()
    want = [_alone(alone_llm, q, sp) for q, sp in zip(prompts, params)]
    got = batch_llm.generate(prompts, params)
    assert [o.prompt_token_ids for o in got] == [q["prompt_token_ids"] for q in prompts]
    for i, (g, w) in enumerate(zip(got, want)):
        _same_output(g, w, f"{family} request {i}")
        assert len(g.outputs[0].token_ids) == params[i].max_tokens
        assert g.finished and g.outputs[0].finish_reason == "length"
    _engine_idle(batch_llm)


@pytest.mark.parametrize("family,kv", [("mixtral", "auto"), ("qwen2_moe", "auto"), ("qwen3_moe", "auto"),
                                       ("olmoe", "auto"), ("gpt_oss", "auto"), ("deepseek_v2", "auto"),
                                       ("deepseek_v3", "auto"), ("mixtral", "fp8"), ("gpt_oss", "fp8"),
                                       ("qwen3_moe", "fp8"), ("deepseek_v2", "fp8"), ("deepseek_v3", "fp8")])
def test_captured_batch1_step_equals_the_model_forward(family, kv, checkpoint, monkeypatch):
    # a step of one sequence and one token runs as the captured decode (moe/cpu_decode.py) on a
    # bf16 CPU engine: greedy tokens and log-probs equal the model's own forward's (capture off),
    # for a one-token prompt, within a block and across blocks (olmoe's clipped q/k/v clamped inside
    # the one-call attention). The rotary tables start short (8 positions):
    # the captured step grows them before its layers read them. An fp8 KV cache: its rows quantized
    # in the captured step's C call as the op path's write_kv quantizes them, read in place by both
    import cpu_kernels
    from moe.cpu_decode import CapturedDecode

    llm = LLM(str(checkpoint(family)), dtype="bfloat16", block_size=16, enable_prefix_caching=False,
              kv_cache_dtype=kv, num_scheduler_steps=1)  # (one step a call: each through CapturedDecode)
    runner = llm.engine.runner
    if cpu_kernels.load() is None:
        assert runner.captured is None
        return
    assert runner.captured is not None
    assert runner.captured.step.embeds and runner.captured.head.ok  # the embedding and the LM head in C too
    if kv == "fp8":
        assert runner.captured.runs_steps  # whole steps in C: the attention halves quantize and read fp8
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (1, 9, 40)]
    sp = SamplingParams(temperature=0, max_tokens=12, logprobs=3, ignore_eos=True)
    real, calls = CapturedDecode.__call__, []
    monkeypatch.setattr(CapturedDecode, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    rotaries = [layer.self_attn.rotary for layer in runner.model.layers]
    for rot in rotaries:
        rot._grow(8)
    captured = [llm.generate([p], sp)[0].outputs[0] for p in prompts]
    assert len(calls) == 3 * 11 + 1  # every decode step, and the one-token prompt's prefill
    assert all(rot.max_pos > 50 for rot in rotaries)
    runner.captured = None
    plain = [llm.generate([p], sp)[0].outputs[0] for p in prompts]
    for a, b in zip(captured, plain):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


@pytest.mark.parametrize("family,cached", [("default", True), ("default", False), ("mixtral", False),
                                           ("deepseek_v3", False), ("deepseek_v2", True), ("gpt_oss", False),
                                           ("qwen2_moe", False), ("mixtral-int4", False), ("mixtral-int8", False)])
def test_captured_rows_of_several_sequences_equal_one_row_steps(family, cached, checkpoint, monkeypatch, tmp_path):
    # bf16, several sequences decoding together (up to the captured step's rows, all sampled: 16 where
    # the weights stay in the last-level cache, 24 with packed experts, taken 8 at a time by the
    # kernels, else 8) run as the captured step, weights read once for all rows: each row's hidden
    # state equals that sequence's one-row captured step at the same position over the same cache,
    # bit for bit, with
    # contexts of different lengths across block boundaries and sequences joining (those steps run
    # op by op) and leaving; the weights need not fit the last-level cache (bf16: each read once a
    # step); MLA too (DeepSeek-V2 / V3), Qwen2-MoE's gated shared expert, gpt-oss's experts with biases
    # and its clamped SwiGLU (its router, which softmaxes the top k, routes the rows one at a time).
    import cpu_kernels
    from kvcache.metadata import AttentionMetadata
    from moe.cpu_decode import CapturedDecode
    from moe.models.layers import ForwardContext

    if cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here (no compiler): no captured step")
    monkeypatch.setattr(cpu_kernels, "last_level_cache_bytes", lambda: 1 << 40 if cached else 0)
    packed = "-" in family  # experts and projections packed (`moe quantize --all-linear`): their rows back to back
    if packed:
        from experts.formats import Int4Weights, Int8Weights
        from test_quant_all_linear import quantize_all_linear

        name, fmt = family.split("-")
        path = str(tmp_path / family)
        quantize_all_linear(checkpoint(name), tmp_path / family,
                            Int4Weights(32, symmetric=False) if fmt == "int4" else Int8Weights(32, symmetric=False))
    else:
        path = None if family == "default" else str(checkpoint(family))
    # (one step a call: multi-step calls run these rows in C without this hook; tests/test_multi_step.py)
    llm = LLM(path, dtype="bfloat16", block_size=4, enable_prefix_caching=False, max_num_seqs=16,
              num_scheduler_steps=1)
    runner = llm.engine.runner
    assert runner.captured.max_rows == (24 if packed else 16 if cached else 8)
    real, checked, seqs = CapturedDecode.__call__, [], [0]

    def call(self, ids, pos, ctx):
        out = real(self, ids, pos, ctx).clone()
        meta = ctx.meta
        seqs.append(meta.num_seqs)
        if meta.num_seqs > 1:
            for t, b in enumerate(b for b, q in enumerate(meta.query_lens_list) for _ in range(q)):
                n = meta.context_lens_list[b]
                blocks = meta.block_tables[b, :-(-n // meta.block_size)].tolist()
                one = AttentionMetadata.build([1], [n], [blocks], meta.block_size)
                alone = real(self, ids[t:t + 1], pos[t:t + 1], ForwardContext(one, runner.kv_caches))
                assert torch.equal(out[t:t + 1], alone), (t, b)
                checked.append(t)
        return out

    monkeypatch.setattr(CapturedDecode, "__call__", call)
    g = torch.Generator().manual_seed(3)
    lens = (1, 5, 9, 3, 17, 2, 7, 4, 11, 6, 1, 8)
    prompts = [{"prompt_token_ids": torch.randint(3, 200, (n,), generator=g).tolist()} for n in lens]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 14, 6, 11, 8, 13, 10) * 2]
    _run_engine(llm, prompts, params)
    assert len(checked) > 20
    assert (max(seqs) > 8) == (cached or packed)


@pytest.mark.parametrize("family,dims,calls", [
    ("qwen3_moe", dict(head_dim=64), [180, 48, 48, 48, 36]),
    # gpt-oss: sinks on every layer, a 40-token sliding window on two of three; its experts (biases,
    # clamped SwiGLU) in the tile experts kernel
    ("gpt_oss", dict(head_dim=32, intermediate_size=64, sliding_window=40), [180, 48, 48, 48, 36]),
    # MLA: the whole prompt in the decompressed form (per-head K, V), its 48-row chunks over the latent cache
    ("deepseek_v3", dict(kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32),
     [180, 48, 48, 48, 36])])
def test_prompts_through_the_amx_prefill_attention_keep_generations(family, dims, calls, tmp_path, monkeypatch):
    # bf16 prompts of 180 tokens (query tiles of 32 and a rest), whole and in chunks of 48 after
    # their cached prefix, through the AMX prefill kernel: every teacher-forced prompt log-prob as
    # close to the float32 engine's as SDPA's are (gpt-oss: as SDPA and the op-by-op experts'; both
    # round the probabilities to bf16, in another order; the tiny random model's bf16 log-probs sit
    # up to ~0.1 from float32's either way)
    import cpu_kernels
    from tiny_models import make_checkpoint

    path = make_checkpoint(family, tmp_path / family, **dims)
    prompt = {"prompt_token_ids": _prompt(180, 4)}
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, ignore_eos=True)
    real, rows = cpu_kernels.prefill_attention, []
    monkeypatch.setattr(cpu_kernels, "prefill_attention",
                        lambda q, *a, **k: rows.append(q.shape[0]) or real(q, *a, **k))

    def run(dtype="bfloat16", budget=None):
        kw = {} if budget is None else dict(max_num_batched_tokens=budget)
        return LLM(str(path), dtype=dtype, enable_prefix_caching=False, **kw).generate([prompt], sp)[0]

    whole, chunks = run(), run(budget=48)
    if not cpu_kernels.amx_available():
        return
    assert sorted(rows) == sorted(calls * 3)  # 3 layers
    monkeypatch.setattr(cpu_kernels, "supports_prefill", lambda *a: False)  # SDPA
    if family == "gpt_oss":  # and the experts op by op (the tile kernel's biases and clamped SwiGLU)
        monkeypatch.setattr(cpu_kernels, "amx_moe", lambda *a, **k: None)
        monkeypatch.setattr(cpu_kernels, "amx_experts", lambda *a, **k: None)
    sdpa, exact = run(), run("float32")
    ids = prompt["prompt_token_ids"]

    def dist(out):
        d = [abs(a[t] - b[t]) for t, a, b in zip(ids[1:], out.prompt_logprobs[1:], exact.prompt_logprobs[1:])]
        return max(d), sum(d) / len(d)

    ref_max, ref_mean = dist(sdpa)
    for out in (whole, chunks):
        got_max, got_mean = dist(out)
        assert got_max <= 1.5 * ref_max + 0.01 and got_mean <= 1.5 * ref_mean + 1e-3, (got_max, ref_max, got_mean,
                                                                                      ref_mean)
    if family == "qwen3_moe":  # each row's keys in the same passes whatever the chunk: bit-identical
        assert whole.prompt_logprobs == chunks.prompt_logprobs


@pytest.mark.parametrize("budget", [1, 3, 8])
def test_chunked_prefill_gives_identical_outputs(path, ref, budget):
    chunked = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=budget)
    prompts, params = _requests()
    want = [_alone(ref, q, sp) for q, sp in zip(prompts, params)]
    steps = []
    orig = chunked.engine.scheduler.schedule

    def schedule():
        b = orig()
        steps.append(b.num_tokens)
        return b

    chunked.engine.scheduler.schedule = schedule
    got = chunked.generate(prompts, params)
    for i, (g, w) in enumerate(zip(got, want)):
        _same_output(g, w, f"budget {budget} request {i}")
    assert max(steps) <= budget
    _engine_idle(chunked)


def test_max_num_seqs_caps_the_running_batch(path, ref):
    capped = LLM(str(path), dtype="float32", block_size=4, max_num_seqs=2)
    sizes = []
    orig = capped.engine.scheduler.schedule

    def schedule():
        b = orig()
        sizes.append(len(b.seqs))
        return b

    capped.engine.scheduler.schedule = schedule
    prompts, params = _requests()
    got = capped.generate(prompts, params)
    for i, (g, q, sp) in enumerate(zip(got, prompts, params)):
        _same_output(g, _alone(ref, q, sp), f"request {i}")
    assert max(sizes) == 2
    _engine_idle(capped)


# ---- preemption ---------------------------------------------------------------------------------


def _run_engine(llm: LLM, prompts, params):
    """Drive the engine directly, keeping the Sequence objects to inspect afterwards."""
    e = llm.engine
    rids = [e.add_request(q, sp) for q, sp in zip(prompts, params)]
    seqs = [e.seqs[r] for r in rids]
    done = {}
    preempted_steps = 0
    orig = e.scheduler.schedule

    def schedule():
        nonlocal preempted_steps
        b = orig()
        preempted_steps += b.num_preempted > 0
        return b

    e.scheduler.schedule = schedule
    try:
        for _ in range(10000):
            if not e.has_unfinished_requests():
                break
            for out in e.step():
                if out.finished:
                    assert out.request_id not in done
                    done[out.request_id] = out
    finally:
        del e.scheduler.schedule
    assert not e.has_unfinished_requests(), "the engine did not finish"
    return [done[r] for r in rids], seqs, preempted_steps


@pytest.mark.parametrize("budget", [2048, 8])
def test_preemption_under_a_tiny_kv_cache_changes_no_output(path, ref, budget):
    block = 4
    per_token = ref.engine.kv_bytes_per_token()
    # 12 blocks = 48 tokens: each request needs up to 32, so about 1.5 sequences fit
    tight = LLM(str(path), dtype="float32", block_size=block, kv_cache_memory=per_token * block * 12,
                max_num_batched_tokens=budget)
    assert tight.engine.block_manager.num_blocks == 12
    prompts = [_ids(_prompt(n, 300 + n)) for n in (10, 12, 9, 11, 7)]
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(temperature=0.7, top_k=20, seed=9, max_tokens=20, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    ]
    want = [_alone(ref, q, sp) for q, sp in zip(prompts, params)]
    got, seqs, preempted_steps = _run_engine(tight, prompts, params)
    assert sum(s.num_preemptions for s in seqs) > 0 and preempted_steps > 0, "no preemption happened"
    for i, (g, w) in enumerate(zip(got, want)):
        _same_output(g, w, f"request {i}")
        assert len(g.outputs[0].token_ids) == params[i].max_tokens
    _engine_idle(tight)


# ---- prefix caching -----------------------------------------------------------------------------


def _record_starts(llm: LLM, monkeypatch) -> dict[str, int]:
    """request id -> the first scheduled position (tokens reused from the prefix cache)."""
    first: dict[str, int] = {}
    orig = llm.engine.scheduler.schedule

    def schedule():
        b = orig()
        for s in b.seqs:
            first.setdefault(s.seq.request_id, s.start)
        return b

    monkeypatch.setattr(llm.engine.scheduler, "schedule", schedule)
    return first


SHARED = _prompt(26, 77)


def test_prefix_caching_reuses_blocks_and_changes_no_output(path, ref, monkeypatch):
    cached = LLM(str(path), dtype="float32", block_size=4)
    starts = _record_starts(cached, monkeypatch)
    a = _ids(SHARED + _prompt(5, 78))
    b = _ids(SHARED + _prompt(7, 79))
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    out_a = cached.generate(a, sp)[0]
    assert starts[out_a.request_id] == 0
    _same_output(out_a, _alone(ref, a, sp), "first")
    # the identical prompt again: every full block before the last token is reused
    again = cached.generate(a, sp)[0]
    assert starts[again.request_id] == 28
    _same_output(again, out_a, "repeat")
    out_b = cached.generate(b, sp)[0]
    assert starts[out_b.request_id] == 24, "the second request did not reuse the 6 shared full blocks"
    _same_output(out_b, _alone(ref, b, sp), "second")
    # a request wanting prompt log-probs computes its whole prompt even when it is cached
    sp_lp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    lp = cached.generate(b, sp_lp)[0]
    assert starts[lp.request_id] == 0
    _same_output(lp, _alone(ref, b, sp_lp), "prompt logprobs")
    # several sharers in one call, next to an unrelated request
    c = _ids(SHARED + _prompt(3, 80))
    many = cached.generate([c, _ids(_prompt(9, 81)), b], sp)
    assert starts[many[0].request_id] == 24  # its 7th block differs from every earlier prompt's
    assert starts[many[2].request_id] >= 24  # b ran before: at least the shared prefix is reused
    for got, q in zip(many, [c, _ids(_prompt(9, 81)), b]):
        _same_output(got, _alone(ref, q, sp), "batch")
    _engine_idle(cached)


def test_cached_prefix_survives_an_unrelated_request_in_between(path, monkeypatch):
    """With hundreds of never-used blocks free, an unrelated request must not evict a finished
    request's cached prefix (blocks are meant to be evicted oldest-freed first)."""
    cached = LLM(str(path), dtype="float32", block_size=4)
    assert cached.engine.block_manager.num_blocks > 100
    starts = _record_starts(cached, monkeypatch)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    cached.generate(_ids(SHARED + [5]), sp)
    cached.generate(_ids(_prompt(30, 91)), sp)
    out = cached.generate(_ids(SHARED + [6]), sp)[0]
    assert starts[out.request_id] == 24


# ---- streaming ----------------------------------------------------------------------------------


def _stream(llm: LLM, prompts, params):
    pieces: dict[str, list] = {}
    finals = {}
    for out in llm.generate_stream(prompts, params):
        assert out.request_id not in finals, "an increment after the final one"
        d = out.delta
        assert d is not None
        texts, ids = pieces.setdefault(out.request_id, ([], []))
        texts.append(d.text)
        ids.extend(d.token_ids)
        # the running totals agree with the output's cumulative view at every increment
        assert out.outputs[0].token_ids == ids
        if out.finished:
            finals[out.request_id] = out
    return pieces, finals


def test_streaming_deltas_concatenate_to_the_final_output(llm):
    prompts = ["a005 a017 a033", "a101 a102 a103 a104 a105 a106 a107", _ids(_prompt(12, 5))]
    params = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=3, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)]
    pieces, finals = _stream(llm, prompts, params)
    want = llm.generate(prompts, params)
    assert len(finals) == 3
    for w in want:
        rid = next(r for r, f in finals.items() if f.prompt_token_ids == w.prompt_token_ids)
        f = finals[rid]
        texts, ids = pieces[rid]
        assert ids == f.outputs[0].token_ids == w.outputs[0].token_ids
        assert "".join(texts) == f.outputs[0].text == w.outputs[0].text
        assert f.outputs[0].text == " " + _text(ids)
        assert len(texts) == len(ids)  # one increment per generated token


def test_streaming_deltas_concatenate_to_the_final_text_with_a_stop_string(llm):
    prompt = "a005 a017 a033 a040"
    base = _alone(llm, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)).outputs[0]
    k, tok = _first_new_token(base.token_ids, start=2)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=_text([tok]))
    pieces, finals = _stream(llm, [prompt], [sp])
    (rid, final), = finals.items()
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].token_ids == base.token_ids[:k + 1]
    assert final.outputs[0].text == base.text[:base.text.index(_text([tok]))]
    assert "".join(pieces[rid][0]) == final.outputs[0].text, "streamed text includes the stop string"


def test_streaming_never_sends_the_start_of_a_stop_string_across_tokens(llm):
    """A stop string made of the end of one token and the start of the next: the first token's
    tail is held back (never streamed) until the next token shows whether the stop completes."""
    prompt = "a005 a017 a033 a040"
    base = _alone(llm, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)).outputs[0]
    k, tok = _first_new_token(base.token_ids, start=2)
    nxt = base.token_ids[k + 1]
    stop = f"{tok:03d}"[1:] + " a" + f"{nxt:03d}"[:1]  # e.g. "05 a0": digits of token k, " a" of token k+1
    want = base.text[:base.text.index(stop)]
    pieces, finals = _stream(llm, [prompt], [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                            stop=stop)])
    (rid, final), = finals.items()
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].text == want
    sent = ""
    for piece in pieces[rid][0]:
        sent += piece
        assert want.startswith(sent), f"streamed {sent!r}, past the final text {want!r}"
    assert sent == want


def test_abort_ends_with_a_final_output_that_sends_the_held_back_text(llm):
    """engine.abort returns the request's last output: finished, "abort", its delta the text held
    back for a stop string that can no longer complete; the blocks are free."""
    prompt = "a005 a017 a033 a040"
    m = 4
    text_m = _alone(llm, prompt, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)).outputs[0].text
    e = llm.engine
    rid = e.add_request(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                               stop=text_m[-2:] + "\x00"))  # never completes
    sent, tokens = "", []
    while len(tokens) < m:
        for out in e.step():
            sent += out.delta.text
            tokens += out.delta.token_ids
    assert sent == text_m[:-2]  # the last two characters could still start the stop string
    (last,) = e.abort(rid)
    assert last.finished and last.delta.finish_reason == last.outputs[0].finish_reason == "abort"
    assert last.delta.text == text_m[-2:] and last.delta.token_ids == [] and last.outputs[0].text == text_m
    assert e.abort(rid) == []  # already gone
    _engine_idle(llm)


# ---- stop conditions ----------------------------------------------------------------------------

STOP_PROMPT = "a011 a222 a033 a144 a055 a266"


def _first_new_token(tokens: list[int], start: int) -> tuple[int, int]:
    """The first index >= start whose token did not occur before it (and its token); special
    tokens (0-2, skipped when decoding) are passed over."""
    for k in range(start, len(tokens)):
        if tokens[k] > 2 and tokens[k] not in tokens[:k]:
            return k, tokens[k]
    raise AssertionError(f"greedy output {tokens} has no new token after index {start}: pick another prompt")


@pytest.fixture(scope="module")
def base(llm):
    """The unconstrained greedy continuation of STOP_PROMPT."""
    return _alone(llm, STOP_PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)).outputs[0]


def test_max_tokens_and_ignore_eos_finish_by_length(llm, base):
    for m in (1, 7):
        out = _alone(llm, STOP_PROMPT, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)).outputs[0]
        assert out.token_ids == base.token_ids[:m] and out.finish_reason == "length" and out.stop_reason is None
        assert out.text == " " + _text(base.token_ids[:m])


def test_max_model_len_caps_generation(tok_path, base):
    capped = LLM(str(tok_path), dtype="float32", block_size=4, max_model_len=12)
    out = _alone(capped, STOP_PROMPT, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)).outputs[0]
    assert out.token_ids == base.token_ids[:6] and out.finish_reason == "length"


def test_stop_token_ids(llm, base):
    k, tok = _first_new_token(base.token_ids, start=3)
    out = _alone(llm, STOP_PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                  stop_token_ids=[999, tok])).outputs[0]
    assert out.token_ids == base.token_ids[:k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tok


def test_logprobs_stay_raw_while_min_tokens_bans_stop_tokens(llm):
    """Sampled log-probs are the model's raw distribution (moe/sampler.py: "before temperature and
    filtering"): banning stop tokens before min_tokens must change which tokens may be drawn, not
    the reported log-probs."""
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    plain = _alone(llm, STOP_PROMPT, sp).outputs[0]
    # a likely runner-up at the first step that is never the greedy choice in these 4 steps
    lp0 = plain.logprobs[0]
    banned = next(t for t in sorted(lp0, key=lp0.get, reverse=True) if t not in plain.token_ids)
    # p > 2.5e-3: banning it would shift every log-prob by more than 20x the tolerance below
    assert lp0[banned] > -6.0, "the banned token must carry real probability mass for this test to bite"
    sp_min = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, min_tokens=4,
                            stop_token_ids=[banned])
    out = _alone(llm, STOP_PROMPT, sp_min).outputs[0]
    assert out.token_ids == plain.token_ids
    for i, (a, b) in enumerate(zip(out.logprobs, plain.logprobs)):
        tok = plain.token_ids[i]
        assert abs(a[tok] - b[tok]) < 1e-4, f"step {i}: chosen token log-prob {a[tok]} vs raw {b[tok]}"


def test_stop_token_ids_are_banned_before_min_tokens(llm, base):
    k, tok = _first_new_token(base.token_ids, start=2)
    m = k + 3
    out = _alone(llm, STOP_PROMPT, SamplingParams(temperature=0, max_tokens=30, min_tokens=m, ignore_eos=True,
                                                  stop_token_ids=[tok])).outputs[0]
    assert out.token_ids[:k] == base.token_ids[:k]
    assert tok not in out.token_ids[:m]
    assert len(out.token_ids) > m
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == tok and out.stop_reason == tok
    else:
        assert out.finish_reason == "length" and len(out.token_ids) == 30


def test_stop_string_spanning_two_tokens(llm, base):
    k, _ = _first_new_token(base.token_ids, start=3)
    stop = _text(base.token_ids[k:k + 2])
    assert " " in stop and base.text.index(stop) == base.text.index(_text([base.token_ids[k]]))
    out = _alone(llm, STOP_PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop)).outputs[0]
    assert out.token_ids == base.token_ids[:k + 2]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[:base.text.index(stop)]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_truncates_text(llm, base, include):
    k, tok = _first_new_token(base.token_ids, start=3)
    stop = _text([tok])
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=["a999", stop],
                        include_stop_str_in_output=include)
    out = _alone(llm, STOP_PROMPT, sp).outputs[0]
    assert out.token_ids == base.token_ids[:k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    idx = base.text.index(stop)
    assert out.text == (base.text[:idx + len(stop)] if include else base.text[:idx])


def test_stop_string_seen_before_min_tokens_does_not_stop_later(llm, base):
    """Stop strings count only from min_tokens on (vLLM): an occurrence in text generated before
    min_tokens must not end the request at min_tokens nor cut the text back to it."""
    k, tok = _first_new_token(base.token_ids, start=1)
    m = k + 3  # well within the engine's 64-character look-back
    stop = _text([tok])
    sp = SamplingParams(temperature=0, max_tokens=40, min_tokens=m, ignore_eos=True, stop=stop)
    out = _alone(llm, STOP_PROMPT, sp).outputs[0]
    later = [j for j in range(m - 1, 40) if base.token_ids[j] == tok]
    if later:  # the next occurrence at or after min_tokens ends it
        j = later[0]
        assert out.token_ids == base.token_ids[:j + 1] and out.finish_reason == "stop"
        head = _alone(llm, STOP_PROMPT, SamplingParams(temperature=0, max_tokens=j, ignore_eos=True)).outputs[0]
        assert out.text == base.text[:base.text.index(stop, len(head.text))]
    else:
        assert out.token_ids == base.token_ids and out.finish_reason == "length"
        assert out.text == base.text


def test_stop_string_at_the_start_of_a_long_token(path, base, tmp_path):
    """A token whose text is long (runs of spaces or '=' are common in real vocabularies) must not
    hide a stop string at its start: the search has to cover all of the newly produced text."""
    k, tok = _first_new_token(base.token_ids, start=3)
    long_text = "zz" + "y" * 70
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    _write_tokenizer(tmp_path, {tok: long_text})
    llm = LLM(str(tmp_path), dtype="float32", block_size=4)
    assert llm.get_tokenizer().encode(STOP_PROMPT) == [11, 222, 33, 144, 55, 266]  # the prompt is unchanged
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop="zz")
    out = _alone(llm, STOP_PROMPT, sp).outputs[0]
    assert out.token_ids == base.token_ids[:k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == "zz"
    assert out.text == base.text[:base.text.index(_text([tok]))]


@pytest.fixture(scope="module")
def eos_setup(path, tmp_path_factory, ref):
    """A copy of the checkpoint whose EOS id is a token the greedy continuation produces."""
    prompt = _ids(_prompt(6, 55))
    tokens = _alone(ref, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)).outputs[0].token_ids
    k, eos = _first_new_token(tokens, start=3)
    d = tmp_path_factory.mktemp("eos")
    for f in path.iterdir():
        shutil.copy(f, d / f.name)
    for name in ("config.json", "generation_config.json"):
        if (d / name).is_file():
            cfg = json.loads((d / name).read_text())
            cfg["eos_token_id"] = eos
            (d / name).write_text(json.dumps(cfg))
    llm = LLM(str(d), dtype="float32", block_size=4)
    assert llm.engine.eos_ids == (eos,)
    return llm, prompt, tokens, k, eos


def test_eos_stops_unless_ignored(eos_setup):
    llm, prompt, tokens, k, eos = eos_setup
    out = _alone(llm, prompt, SamplingParams(temperature=0, max_tokens=30)).outputs[0]
    assert out.token_ids == tokens[:k + 1] and out.finish_reason == "stop" and out.stop_reason is None
    out = _alone(llm, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)).outputs[0]
    assert out.token_ids == tokens and out.finish_reason == "length"


def test_eos_is_banned_before_min_tokens(eos_setup):
    llm, prompt, tokens, k, eos = eos_setup
    m = k + 2
    out = _alone(llm, prompt, SamplingParams(temperature=0, max_tokens=30, min_tokens=m)).outputs[0]
    assert out.token_ids[:k] == tokens[:k] and eos not in out.token_ids[:m] and len(out.token_ids) > m
    assert out.finish_reason in ("stop", "length")
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == eos


# ---- seeded sampling ----------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    prompt = _ids(_prompt(9, 400))
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    first = _alone(llm, prompt, sp).outputs[0].token_ids
    assert _alone(llm, prompt, sp).outputs[0].token_ids == first
    others = [(_ids(_prompt(n, 401 + n)), SamplingParams(temperature=t, seed=s, max_tokens=12, ignore_eos=True,
                                                         top_k=k))
              for n, t, s, k in ((4, 1.0, None, 0), (17, 0.0, None, 0), (6, 0.7, 99, 10), (9, 1.3, None, 50))]
    for pos in (0, 2, 4):
        batch = [q for q, _ in others]
        params = [p for _, p in others]
        batch.insert(pos, prompt)
        params.insert(pos, sp)
        outs = llm.generate(batch, params)
        assert outs[pos].outputs[0].token_ids == first, f"seeded request at position {pos} changed"
    other_seed = SamplingParams(temperature=1.0, seed=4321, max_tokens=16, ignore_eos=True)
    assert _alone(llm, prompt, other_seed).outputs[0].token_ids != first


def test_unseeded_sampling_is_reproducible_across_engines_with_the_same_engine_seed(path):
    prompts = [_ids(_prompt(5, 500)), _ids(_prompt(8, 501))]
    sp = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in LLM(str(path), dtype="float32", seed=7).generate(prompts, sp)]
    b = [o.outputs[0].token_ids for o in LLM(str(path), dtype="float32", seed=7).generate(prompts, sp)]
    assert a == b


def test_prompt_logprobs_of_a_one_token_prompt(llm):
    out = llm.generate({"prompt_token_ids": [42]}, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))[0]
    assert out.prompt_logprobs == [None]


# ---- metrics and bookkeeping --------------------------------------------------------------------


def test_metrics_are_present_and_consistent(llm):
    outs = llm.generate([_ids(_prompt(7, 600)), _ids(_prompt(3, 601))],
                        [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                         SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)])
    for out, n in zip(outs, (8, 1)):
        m = out.metrics
        assert m.num_generated == n == len(out.outputs[0].token_ids)
        assert m.ttft is not None and m.ttft > 0
        assert m.latency is not None and m.latency >= m.ttft
        assert m.first_scheduled_time >= m.arrival_time
        assert m.first_token_time >= m.first_scheduled_time
    assert outs[0].metrics.tpot is not None and outs[0].metrics.tpot > 0
    assert outs[1].metrics.tpot is None  # one token: no time per output token


def test_abort_frees_the_request_and_the_rest_finish(llm, ref):
    e = llm.engine
    p1, p2 = _ids(_prompt(10, 700)), _ids(_prompt(6, 701))
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    r1 = e.add_request(p1, sp)
    r2 = e.add_request(p2, sp)
    e.step()
    e.step()
    e.abort(r1)
    done = {}
    while e.has_unfinished_requests():
        for out in e.step():
            assert out.request_id != r1
            if out.finished:
                done[out.request_id] = out
    assert list(done) == [r2]
    _same_output(done[r2], _alone(ref, p2, sp), "survivor", text=False)  # ref has no tokenizer
    _engine_idle(llm)


def test_expert_counts_add_up_to_the_tokens_run():
    llm = LLM(dtype="float32", record_expert_counts=True)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [list(range(10, 30)), list(range(40, 47))]
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    counts = llm.expert_counts()
    cfg = llm.engine.model_config
    assert counts.shape == (sum(cfg.sparse_layers), cfg.num_experts) and counts.dtype == torch.int64
    run = sum(len(p) + 6 - 1 for p in prompts)  # every prompt token and each sampled token but the last
    assert counts.sum(1).tolist() == [run * cfg.top_k] * counts.shape[0]
    with pytest.raises(ValueError, match="record_expert_counts=True"):
        LLM().expert_counts()


def test_cpu_engine_keeps_freed_activations_for_reuse():
    # after a CPU engine starts, 8 and 24 MiB activations freed and allocated again reuse the heap
    # instead of fresh mappings that page-fault in; the control run without the tuning faults. (The
    # first of each size may fault either way: the heap grows to hold it once, by as much as the
    # engine's start left too little free; counted from the second on)
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import resource, sys, torch
        import moe.engine
        if sys.argv[1] == "off":
            moe.engine._reuse_freed_memory = lambda: None
        from moe import LLM
        LLM(dtype="float32")
        for n in [2 << 20, 6 << 20]:
            torch.empty(n).fill_(1.0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for n in [2 << 20, 6 << 20] * 20:
            x = torch.empty(n).fill_(1.0)
            del x
        print("FAULTS", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    faults = {}
    for mode in ("on", "off"):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        faults[mode] = int(r.stdout.split("FAULTS")[1])
    assert faults["on"] < 300 and faults["off"] > 2000, faults
