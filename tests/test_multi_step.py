"""Multi-step decoding (``EngineConfig.num_scheduler_steps``): decode steps of the decoding sequences
(alone or up to the captured step's rows together, greedy or sampled at keyed draws) run back to
back in one C call (``moe_decode_steps``) give one-step decoding's outputs, stop where it stops, run
only for requests whose sampling they leave unchanged, and end early for work that arrives."""
import threading
import time

import pytest
import torch

from moe import LLM, SamplingParams
from moe.model_runner import ModelRunner

cpu_kernels = pytest.importorskip("cpu_kernels")
if cpu_kernels.load() is None:
    pytest.skip("the C kernels are not built here (no compiler): no captured step", allow_module_level=True)


def _llm(path, **kw) -> LLM:
    # prefix caching off: a second run of a prompt computes it as the first did
    return LLM(path, dtype="bfloat16", block_size=4, enable_prefix_caching=False, **kw)


@pytest.fixture
def calls(monkeypatch):
    """Tokens each multi-step call returned (one entry per call that ran)."""
    got: list[int] = []
    real = ModelRunner._run_steps

    def run_steps(self, batch, eos_ids):
        out = real(self, batch, eos_ids)
        if out is not None:
            got.append(len(out.sampled[0]))
        return out

    monkeypatch.setattr(ModelRunner, "_run_steps", run_steps)
    return got


def _both(llm: LLM, prompts, params):
    """Outputs with multi-step decoding (16 steps a call) and with one step a call, same engine."""
    sched = llm.engine.scheduler
    sched.max_steps = 16
    multi = llm.generate(prompts, params)
    sched.max_steps = 1
    single = llm.generate(prompts, params)
    sched.max_steps = 16
    return multi, single


def _idle(llm: LLM) -> None:
    e = llm.engine
    assert not e.has_unfinished_requests() and e.seqs == {}
    bm = e.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(r == -1 for r in bm.reserved_by)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v2", "deepseek_v3",
                                    "olmoe", "mixtral-fp8", "deepseek_v3-fp8"])
def test_multi_step_tokens_equal_one_step_a_call(family, checkpoint, calls):
    # bf16 greedy decoding across block boundaries (blocks of 4), from prompts of 1, 6 and 13 tokens:
    # the same tokens with 16 steps a call as with one (each step the captured step, its LM head and
    # the greedy argmax), and the multi-step calls did run several steps each; an fp8 KV cache too
    name, _, kv = family.partition("-")
    llm = _llm(str(checkpoint(name)), **({"kv_cache_dtype": kv} if kv else {}))
    assert llm.engine.runner.runs_steps and llm.engine.scheduler.max_steps == 16
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, 200, (n,), generator=g).tolist()} for n in (1, 6, 13)]
    sp = SamplingParams(temperature=0, max_tokens=37, ignore_eos=True)
    multi, single = [], []
    for p in prompts:  # (one at a time: a lone sequence)
        m, s = _both(llm, [p], sp)
        multi.append(m[0].outputs[0].token_ids)
        single.append(s[0].outputs[0].token_ids)
    assert multi == single and all(len(t) == 37 for t in multi)
    assert len(calls) >= 3 * 3 and max(calls) == 16  # 36 decode steps each: 16 + 16 + 4
    _idle(llm)


SAMPLED = [SamplingParams(temperature=0.8, seed=11, max_tokens=37, ignore_eos=True),
           SamplingParams(temperature=1.3, top_k=7, seed=12, max_tokens=37, ignore_eos=True),
           SamplingParams(temperature=0.7, top_p=0.6, min_p=0.1, seed=13, max_tokens=37, ignore_eos=True),
           SamplingParams(temperature=0.9, seed=14, max_tokens=37, repetition_penalty=1.2, frequency_penalty=0.5,
                          presence_penalty=0.3, logit_bias={7: 2.0}, ignore_eos=True, logprobs=3)]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral-fp8"])
def test_sampled_multi_step_tokens_equal_one_step_a_call(family, checkpoint, calls):
    # sampled decoding (temperature; top-k; top-p with min-p; penalties and a bias, with log-probs), each
    # request seeded: the C loop processes each step's logits and draws its token at the sequence's key
    # and the token's position as the one-step sampler does, so the tokens (and log-probs, made from the
    # raw logits the loop keeps) are the same with 16 steps a call as with one; they are draws (not the
    # greedy tokens)
    name, _, kv = family.partition("-")
    llm = _llm(str(checkpoint(name)), **({"kv_cache_dtype": kv} if kv else {}))
    g = torch.Generator().manual_seed(3)
    prompt = {"prompt_token_ids": torch.randint(3, 200, (6,), generator=g).tolist()}
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=37, ignore_eos=True))[0]
    for sp in SAMPLED:
        calls.clear()
        (m,), (s,) = _both(llm, [prompt], sp)
        assert m.outputs[0].token_ids == s.outputs[0].token_ids and len(m.outputs[0].token_ids) == 37
        assert m.outputs[0].logprobs == s.outputs[0].logprobs and (sp.logprobs is None) == (not m.outputs[0].logprobs)
        assert m.outputs[0].token_ids != greedy.outputs[0].token_ids
        assert max(calls) == 16
    # another seed, other draws
    other = llm.generate([prompt], SamplingParams(temperature=0.8, seed=99, max_tokens=37, ignore_eos=True))[0]
    assert llm.generate([prompt], SAMPLED[0])[0].outputs[0].token_ids != other.outputs[0].token_ids
    _idle(llm)


def test_multi_step_stops_where_plain_decoding_stops(calls):
    # the default model (with its tokenizer): stop tokens, EOS (as the C loop sees it: a stop id),
    # stop strings (cut from the text after the call), min_tokens (stop ids banned in the loop until then) and
    # max_tokens end the output exactly where one step a call ends it, text and reasons included
    llm = _llm(None)
    prompt = "def parse(line):\n"
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))[0].outputs[0]
    toks = ref.token_ids
    t = next(x for i, x in enumerate(toks) if 20 <= i and toks.index(x) < i)  # a token seen before, late
    early = toks.index(t)
    stop_text = ref.text[len(ref.text) // 2:][:3]
    cases = [SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[t], ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[t], min_tokens=early + 2, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=60, stop=[stop_text], ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=60, stop=[stop_text], include_stop_str_in_output=True,
                            ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=60)]
    for sp in cases:
        calls.clear()
        (m,), (s,) = _both(llm, [prompt], sp)
        a, b = m.outputs[0], s.outputs[0]
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (b.token_ids, b.text, b.finish_reason,
                                                                         b.stop_reason), sp
        assert calls or len(a.token_ids) == 1, sp
    eos_llm = llm.engine
    saved = eos_llm.eos_ids
    eos_llm.eos_ids = (t,)  # as the model's EOS: the C loop ends the call on it
    try:
        calls.clear()
        (m,), (s,) = _both(llm, [prompt], SamplingParams(temperature=0, max_tokens=60))
        assert m.outputs[0].token_ids == s.outputs[0].token_ids == toks[:early + 1]
        # the prompt's step gave token 0; the calls gave the rest and the last ended on the EOS
        assert m.outputs[0].finish_reason == "stop" and sum(calls) == early
    finally:
        eos_llm.eos_ids = saved
    _idle(llm)


def test_multi_step_for_requests_whose_sampling_it_keeps(monkeypatch):
    # greedy and sampled requests go multi-step, with biases, penalties, a pending min_tokens and
    # log-probs too (made from each step's raw logits, kept by the loop). Outputs, log-probs included,
    # equal one step a call throughout
    llm = _llm(None)
    steps: list[tuple[int, int]] = []  # (sequences in the batch, steps asked)
    real = ModelRunner.run

    def run(self, batch, eos_ids):
        steps.append((len(batch.seqs), batch.seqs[0].steps))
        return real(self, batch, eos_ids)

    monkeypatch.setattr(ModelRunner, "run", run)
    one = ["The tutorial", "import sys\n"]
    for sp, multi in ((SamplingParams(temperature=0, max_tokens=20, logprobs=2), True),
                      (SamplingParams(temperature=0, max_tokens=20, logprobs=0), True),
                      (SamplingParams(temperature=0.8, seed=9, max_tokens=30, logprobs=5, repetition_penalty=1.2,
                                      logit_bias={7: 2.0}, min_tokens=10), True),
                      # min_tokens pending: EOS and stop ids banned in the loop until they are out
                      (SamplingParams(temperature=0, max_tokens=20, min_tokens=20, ignore_eos=True), True),
                      (SamplingParams(temperature=0, max_tokens=40, min_tokens=25), True),
                      (SamplingParams(temperature=0.9, seed=8, max_tokens=40, min_tokens=30, stop_token_ids=[11, 13]),
                       True),
                      (SamplingParams(temperature=0.8, seed=3, max_tokens=20), True),
                      (SamplingParams(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05, seed=4, max_tokens=20), True),
                      # biases and penalties: applied in the loop as the sampler applies them, counts kept there
                      (SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3), True),
                      (SamplingParams(temperature=0, max_tokens=30, frequency_penalty=1.5, presence_penalty=0.7,
                                      logit_bias={5: 3.0, 17: -2.5}, ignore_eos=True), True),
                      (SamplingParams(temperature=0.8, seed=6, max_tokens=30, presence_penalty=-1.0,
                                      frequency_penalty=0.4, repetition_penalty=0.8, ignore_eos=True), True)):
        steps.clear()
        m, s = _both(llm, one[:1], sp)
        assert m[0].outputs[0].token_ids == s[0].outputs[0].token_ids and m[0].outputs[0].logprobs == \
            s[0].outputs[0].logprobs
        assert any(k > 1 for _, k in steps) == multi, sp
        assert sp.logprobs is None or all(len(d) >= 1 + (sp.logprobs > 0) for d in m[0].outputs[0].logprobs)
    # a logprobs request beside a greedy one: multi-step together
    params = [SamplingParams(temperature=0.8, seed=5, max_tokens=8, logprobs=1),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)]
    steps.clear()
    m = llm.generate(one, params)
    assert any(n == 2 and k > 1 for n, k in steps)
    max_steps, llm.engine.scheduler.max_steps = llm.engine.scheduler.max_steps, 1
    s = llm.generate(one, params)
    assert [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in m] == \
        [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in s]
    # a call keeps at most LOGPROB_BYTES of raw logits: here 3 steps of one row
    llm.engine.scheduler.max_steps = max_steps
    monkeypatch.setattr(ModelRunner, "LOGPROB_BYTES", 3 * 4 * llm.engine.model_config.vocab_size)
    calls: list[int] = []
    real_steps = ModelRunner._run_steps

    def run_steps(self, batch, eos_ids):
        out = real_steps(self, batch, eos_ids)
        calls.append(len(out.sampled[0]) if out is not None else 0)
        return out

    monkeypatch.setattr(ModelRunner, "_run_steps", run_steps)
    m = llm.generate(one[:1], params[0])
    assert max(calls) == 3 and m[0].outputs[0].logprobs == s[0].outputs[0].logprobs
    _idle(llm)


def test_multi_step_call_ends_at_its_time_budget_and_when_work_arrives(monkeypatch, calls):
    # a call ends after MULTI_STEP_SECONDS (0: one step a call), and when the engine is woken (a request
    # arrived, from another thread) after the step it is in; the output is plain decoding's either way
    llm = _llm(None, num_scheduler_steps=400)
    e = llm.engine
    prompt = "class Stack:\n"
    sp = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    e.scheduler.max_steps = 1
    want = llm.generate([prompt], sp)[0].outputs[0].token_ids
    e.scheduler.max_steps = 400
    monkeypatch.setattr(ModelRunner, "MULTI_STEP_SECONDS", 0.0)
    assert llm.generate([prompt], sp)[0].outputs[0].token_ids == want
    assert calls == [1] * 298  # (the prompt's step and the last, a lone step left, are ordinary steps)
    calls.clear()
    monkeypatch.setattr(ModelRunner, "MULTI_STEP_SECONDS", 60.0)
    e.add_request(prompt, sp, "r")
    e.step()  # the prompt: one token
    woke = threading.Timer(0.02, e.wake)
    woke.start()
    t0 = time.perf_counter()
    outs = e.step()
    took = time.perf_counter() - t0
    woke.join()
    assert len(calls) == 1 and 0 < calls[0] < 299 and took < 30, (calls, took)  # woken, not done
    tokens = list(outs[0].outputs[0].token_ids)
    while e.has_unfinished_requests():
        tokens = list(e.step()[0].outputs[0].token_ids)
    assert tokens == want
    _idle(llm)


def test_num_scheduler_steps_is_checked_and_off_where_a_step_is_not_whole_in_c(checkpoint):
    # off at 1; off where a half of the step runs op by op (offloaded experts: their MoE half), or
    # while expert counts are recorded; OLMoE's clipped qkv is in the one-call attention
    with pytest.raises(ValueError, match="num_scheduler_steps=0 must be at least 1"):
        LLM(None, num_scheduler_steps=0)
    assert _llm(None, num_scheduler_steps=1).engine.scheduler.max_steps == 1
    assert _llm(None, record_expert_counts=True).engine.scheduler.max_steps == 1
    e = _llm(str(checkpoint("mixtral")), offload_experts=True).engine
    assert e.runner.captured is not None and not e.runner.runs_steps and e.scheduler.max_steps == 1
    e = _llm(str(checkpoint("olmoe"))).engine
    assert e.runner.runs_steps and e.scheduler.max_steps == 16


@pytest.mark.parametrize("spec,dormant,runs", [
    ({"method": "ngram", "num_speculative_tokens": 3}, False, True),
    ({"method": "draft", "num_speculative_tokens": 3}, False, True),  # (a draft model runs the tokens it owes)
    ({"method": "draft", "num_speculative_tokens": 3, "ngram_first": True}, False, True),
    ({"method": "mtp", "num_speculative_tokens": 1}, False, True),  # (an MTP head gets the call's rows)
    ({"method": "mtp", "num_speculative_tokens": 1}, True, True)])
def test_multi_step_runs_where_speculation_drafts_nothing(spec, dormant, runs, monkeypatch, calls):
    # with speculation, a step on which cost control asks no source for drafts (every K 0, no probe)
    # runs multi-step; a dormant drafter then skips the call's rows (an MTP head keeps the last one, so
    # no plain step must follow before it drafts). The call's steps past the first use up the quiet
    # steps left, the rest counted with cost control as plain choices (so its probes fall due per
    # token). Cost control is made to choose here: quiet runs of 5 steps, every third choice a probe
    # (its own choices follow timings). Outputs equal plain decoding's
    from moe.engine import LLMEngine
    from moe.spec_cost import SpecCostModel

    prompt, sp = "def main():\n", SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    want = _llm(None).generate([prompt], sp)[0].outputs[0].token_ids
    calls.clear()
    llm = _llm(None, speculative_config=spec)
    choices = [0]
    runs_of: list[tuple[int, bool, int, bool, bool]] = []  # per step: (steps asked, a probe, quiet left,
    # drafter skipped, a quiet step)
    skipped: list[int] = []
    forced: list[bool] = []
    real_run, real_skip = ModelRunner.run, SpecCostModel.skip

    def choose_k(self):
        if self._quiet[1]:
            self._quiet[1] -= 1
            choices[-1] = None
            return None
        proposers = [p for p in (self.proposer, self._lookup) if p is not None]
        if self._skipped:  # (as cost control does: the drafter missed rows, so a plain step it sees first)
            for p in proposers:
                p.k = 0
                p.set_probe(None, self.scheduler.running)
            self._quiet = [len(self.scheduler.running), 0]
            choices.append(False)
            return False
        probe = len(choices) % 3 == 0
        for p in proposers:
            p.k = spec["num_speculative_tokens"] if probe else 0
            p.set_probe(1 if probe else None, self.scheduler.running)
        self._probing = [p.source for p in proposers] if probe else []
        self._quiet, self._dormant = [len(self.scheduler.running), 0 if probe else 5], dormant
        choices.append(probe)
        return probe

    def run(self, batch, eos_ids):
        runs_of.append((batch.seqs[0].steps, bool(choices[-1]), llm.engine._quiet[1], self.skip_drafter,
                        choices[-1] is None))
        if batch.seqs[0].steps > 1:
            forced.append(llm.engine._skipped)
        return real_run(self, batch, eos_ids)

    def skip(self, batch_size, source, steps):
        skipped.append(steps)
        return real_skip(self, batch_size, source, steps)

    monkeypatch.setattr(LLMEngine, "_choose_k", choose_k)
    monkeypatch.setattr(ModelRunner, "run", run)
    monkeypatch.setattr(SpecCostModel, "skip", skip)
    assert llm.generate([prompt], sp)[0].outputs[0].token_ids == want
    multi = [r for r in runs_of if r[0] > 1]
    assert bool(multi) == runs and not any(r[1] for r in multi)
    assert any(r[1] for r in runs_of)  # (probes ran, one step each)
    # (skipped on a quiet step of a dormant drafter: not on the step of the choice itself)
    assert all(s == (dormant and quiet and q > 0) for _, _, q, s, quiet in multi)
    assert not any(forced)  # (a multi-step call never makes the step after it a plain one for the drafter)
    # each call past the quiet steps left counted with cost control, per source asked
    sources = 2 if spec.get("ngram_first") else 1
    assert sum(skipped) == sources * sum(max(0, n - 1 - r[2]) for n, r in zip(calls, multi)) > 0 \
        if runs else not skipped
    assert sum(calls) > 40 if runs else not calls


def test_an_mtp_head_drafts_alike_after_multi_step_calls(monkeypatch, calls):
    # an MTP head reads the target's hidden state of every row: a multi-step call hands it each step's
    # rows (the LM head's input, copied in C), so its drafts equal those it makes after one step a call.
    # Drafting (K = 1 for both sequences) falls at the steps whose sequence length is a multiple of 7,
    # the calls in between end there; the drafts each drafting step verified, the acceptance and the
    # outputs are compared with one step a call and with plain decoding
    from moe.engine import LLMEngine

    prompts = ["def main():\n", "import os\nimport sys\n"]
    sp = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in _llm(None).generate(prompts, sp)]

    def choose_k(self):
        n = min((s.num_tokens for s in self.scheduler.running), default=1)  # (none running: the prompts' step)
        self.proposer.k = 1 if n % 7 == 0 else 0
        self.proposer.set_probe(None, self.scheduler.running)
        self._quiet, self._dormant, self._probing = [0, 0], False, []
        return False

    def steps_allowed(self, probe):
        n = min((s.num_tokens for s in self.scheduler.running), default=1)
        return 1 if self.proposer.k else min(self._max_steps, 7 - n % 7)

    def drafts(steps):
        llm = _llm(None, speculative_config={"method": "mtp", "num_speculative_tokens": 1},
                   num_scheduler_steps=steps)
        seen = []
        real = ModelRunner.run

        def run(self, batch, eos_ids):
            if any(s.draft for s in batch.seqs):
                seen.append([(s.seq.num_tokens, s.draft) for s in batch.seqs])
            return real(self, batch, eos_ids)

        monkeypatch.setattr(ModelRunner, "run", run)
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        monkeypatch.setattr(ModelRunner, "run", real)
        stats = llm.engine.spec_stats()
        return out, seen, (stats.num_draft_tokens, stats.num_accepted_tokens)

    monkeypatch.setattr(LLMEngine, "_choose_k", choose_k)
    monkeypatch.setattr(LLMEngine, "_steps_allowed", steps_allowed)
    multi = drafts(16)
    assert len(calls) > 6 and max(calls) > 3
    calls.clear()
    single = drafts(1)
    assert not calls
    assert multi[0] == single[0] == want
    assert multi[1] == single[1] and len(multi[1]) > 6
    assert multi[2] == single[2] and multi[2][1] > 0


def test_the_server_loop_wakes_the_engine_for_each_command(monkeypatch):
    # AsyncLLM's adds and aborts reach the engine thread at a step boundary: each also wakes the engine,
    # so a multi-step call in progress ends after its current step instead of at its end
    from moe.serving.async_llm import AsyncLLM

    llm = _llm(None)
    woken = []
    monkeypatch.setattr(llm.engine, "wake", lambda: woken.append(1))
    loop = AsyncLLM(llm.engine)
    loop.abort("nobody")
    loop.shutdown(timeout=0)
    assert len(woken) == 2


def test_a_streamed_request_gets_its_tokens_at_the_stream_budget(monkeypatch, calls):
    # a request whose client reads its tokens as they come (LLM.generate_stream, a server's streamed
    # answer) keeps its multi-step calls to STREAM_STEP_SECONDS (here 0: one step a call); one read
    # whole keeps MULTI_STEP_SECONDS (here a minute: 16 steps a call); the tokens are the same
    import asyncio

    from moe.serving.async_llm import AsyncLLM

    llm = _llm(None)
    monkeypatch.setattr(ModelRunner, "MULTI_STEP_SECONDS", 60.0)
    monkeypatch.setattr(ModelRunner, "STREAM_STEP_SECONDS", 0.0)
    prompt, sp = "def parse(text):\n", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    whole = llm.generate([prompt], sp)[0].outputs[0].token_ids
    assert calls and max(calls) == 16
    calls.clear()
    streamed = [t for out in llm.generate_stream([prompt], sp) for t in out.delta.token_ids]
    assert streamed == whole and calls == [1] * len(calls) and len(calls) > 30
    # through the server loop: its stream flag reaches the engine
    seen: list[bool] = []
    real = ModelRunner._run_steps

    def run_steps(self, batch, eos_ids):
        seen.append(batch.seqs[0].seq.streams)
        return real(self, batch, eos_ids)

    monkeypatch.setattr(ModelRunner, "_run_steps", run_steps)
    server = AsyncLLM(llm.engine)
    server.start()

    async def one(stream: bool) -> list[int]:
        return [t async for out in server.generate(prompt, sp, stream=stream) for t in out.delta.token_ids]

    try:
        for stream in (False, True):
            seen.clear()
            assert asyncio.run(one(stream)) == whole and seen and set(seen) == {stream}
    finally:
        server.shutdown()
    # and through the HTTP app: "stream": true marks the request, an answer sent whole does not
    import httpx

    from moe.serving.api_server import ServerConfig, build_app

    asked: list[bool] = []
    add = llm.engine.add_request

    def recording(prompt, params, request_id=None, stream=False):
        asked.append(stream)
        return add(prompt, params, request_id, stream=stream)

    monkeypatch.setattr(llm.engine, "add_request", recording)
    server = AsyncLLM(llm.engine)
    app = build_app(server, ServerConfig(model_path="m", served_model_names=["default"]))
    server.start()

    async def post(body: dict):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            return await c.post("/v1/completions", json=body)

    try:
        for stream in (False, True):
            r = asyncio.run(post({"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream}))
            assert r.status_code == 200
    finally:
        server.shutdown()
    assert asked == [False, True]
    _idle(llm)


@pytest.mark.parametrize("family,cached", [("default", True), ("mixtral", False), ("deepseek_v3", False)])
def test_several_sequences_multi_step_together(family, cached, checkpoint, monkeypatch):
    # greedy and sampled sequences decoding together (up to the captured step's rows: 16 where the weights stay in
    # the last-level cache, 8 where they stream) run their steps back to back as one C call over all
    # their rows, each row as a one-token step computes it: the same tokens as one step a call, with
    # prompts of different lengths across blocks, sequences of different max_tokens (a call stops at
    # the shortest), a stop token of one ending the call for all, and more sequences than rows waiting
    import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "last_level_cache_bytes", lambda: 1 << 40 if cached else 0)
    llm = _llm(None if family == "default" else str(checkpoint(family)), max_num_seqs=16)
    rows = llm.engine.runner.captured.max_rows
    assert llm.engine.scheduler.max_step_rows == rows == (16 if cached else 8)
    seen: list[tuple[int, int]] = []  # (sequences, steps) of each multi-step call
    real = ModelRunner._run_steps

    def run_steps(self, batch, eos_ids):
        out = real(self, batch, eos_ids)
        if out is not None:
            seen.append((len(batch.seqs), len(out.sampled[0])))
            assert all(len(v) == len(out.sampled[0]) for v in out.sampled.values())
        return out

    monkeypatch.setattr(ModelRunner, "_run_steps", run_steps)
    g = torch.Generator().manual_seed(2)
    lens = (1, 5, 9, 3, 17, 2, 7, 4, 11, 6)
    prompts = [{"prompt_token_ids": torch.randint(3, 200, (n,), generator=g).tolist()} for n in lens]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (30, 45, 12, 38, 25, 41, 19, 33,
                                                                                    27, 40)]
    for i in (1, 4, 8):  # sampled rows beside greedy ones: each draws as it would alone
        params[i] = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=i, max_tokens=params[i].max_tokens,
                                   ignore_eos=True)
    sched = llm.engine.scheduler
    sched.max_steps = 1
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    stop_at = want[3][20]
    params[3] = SamplingParams(temperature=0, max_tokens=38, stop_token_ids=[stop_at], ignore_eos=True)
    want3 = llm.generate([prompts[3]], params[3])[0].outputs[0].token_ids
    sched.max_steps = 16
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got[:3] + got[4:] == want[:3] + want[4:] and got[3] == want3
    assert max(n for n, _ in seen) == min(rows, len(lens)) and max(k for _, k in seen) > 4
    _idle(llm)


def test_multi_step_under_a_tiny_kv_cache(calls):
    # with 12 blocks of 4 tokens for five requests of up to 30 tokens, sequences are preempted and
    # recomputed; multi-step calls take only blocks that are free (never preempting for their steps),
    # every request ends with all its tokens, and every block comes back. (bf16 recomputation runs
    # other kernels than decoding, so tokens are compared within a run, not against another.)
    ref = _llm(None)
    per_token = ref.engine.kv_bytes_per_token()
    llm = _llm(None, kv_cache_memory=per_token * 4 * 12)
    assert llm.engine.block_manager.num_blocks == 12
    prompts = [{"prompt_token_ids": list(range(40 + 9 * i, 40 + 9 * i + n))} for i, n in enumerate((10, 12, 9, 11, 7))]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (20, 18, 20, 16, 22)]
    params[1] = SamplingParams(temperature=0.8, seed=5, max_tokens=18, ignore_eos=True)
    e = llm.engine
    rids = [e.add_request(q, sp) for q, sp in zip(prompts, params)]
    seqs = [e.seqs[r] for r in rids]
    done = {}
    for _ in range(2000):
        if not e.has_unfinished_requests():
            break
        for out in e.step():
            if out.finished:
                done[out.request_id] = out
    assert len(done) == 5 and sum(s.num_preemptions for s in seqs) > 0 and calls
    for r, sp in zip(rids, params):
        assert len(done[r].outputs[0].token_ids) == sp.max_tokens
    _idle(llm)


def test_grammar_requests_multi_step_equal_one_step_a_call(monkeypatch, calls):
    # structured output in the loop: before each step's draws the loop hands the grammars the tokens the
    # step before chose and applies the masks they write (SampleRow.mask, after the penalties), then the
    # runner takes those tokens back for the engine to advance the grammars as after any step. JSON
    # schema, json_object, regex and choice, greedy and sampled (with a penalty), beside a plain request:
    # the same text as one step a call, several steps per call. With ignore_eos or a pending min_tokens
    # (the grammar may end before a stop token, or meet the ban) a grammar request takes one step a call
    pytest.importorskip("xgrammar")
    import json

    import jsonschema

    from moe.structured_output import StructuredOutputsParams

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]},
                                                        "maxItems": 4}},
              "required": ["name", "tags"], "additionalProperties": False}
    llm = _llm(None, max_num_seqs=8)
    prompts = ["Once upon a time", "import os\n", "The module defines", "class A:\n"]
    so = StructuredOutputsParams
    params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=so(json=schema)),
              SamplingParams(temperature=0.9, seed=3, max_tokens=80, presence_penalty=0.4,
                             structured_outputs=so(json_object=True)),
              SamplingParams(temperature=0, max_tokens=30, structured_outputs=so(regex=r"[A-Z][a-z]{2,6} [0-9]{2,4}")),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)]
    for batch in ([0], [1], [2], [0, 1, 2, 3]):
        calls.clear()
        m, s = _both(llm, [prompts[i] for i in batch], [params[i] for i in batch])
        assert [o.outputs[0].token_ids for o in m] == [o.outputs[0].token_ids for o in s], batch
        assert max(calls) > 1, batch
        for i, o in zip(batch, m):
            c = o.outputs[0]
            if i == 0:
                jsonschema.validate(json.loads(c.text), schema)
            if i in (0, 2):  # (the sampled json_object one may run to max_tokens)
                assert c.finish_reason == "stop", (i, c.text)
    choice = SamplingParams(temperature=1.0, seed=8, max_tokens=20, n=3,
                            structured_outputs=so(choice=["yes", "no", "maybe later"]))
    m, s = _both(llm, [prompts[0]], choice)
    assert [c.text for c in m[0].outputs] == [c.text for c in s[0].outputs]
    assert all(c.text in ("yes", "no", "maybe later") for c in m[0].outputs)
    for alone, most in ((SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                        structured_outputs=so(json=schema)), 0),
                        # multi-step once min_tokens are out: at most the 10 tokens after them
                        (SamplingParams(temperature=0, max_tokens=40, min_tokens=30,
                                        structured_outputs=so(json=schema)), 10)):
        calls.clear()
        m, s = _both(llm, [prompts[0]], alone)
        assert m[0].outputs[0].token_ids == s[0].outputs[0].token_ids and sum(calls) <= most
    _idle(llm)


def test_an_error_in_the_loops_step_callback_ends_the_call_and_is_raised(monkeypatch):
    # an exception inside on_step (a grammar's) is not swallowed by ctypes: the call ends there and
    # decode_steps raises it; the grammars' accepted tokens are taken back
    pytest.importorskip("xgrammar")
    from moe.structured_output import GrammarState, StructuredOutputsParams

    llm = _llm(None)
    schema = {"type": "object", "properties": {"name": {"type": "string", "minLength": 20}}, "required": ["name"]}
    sp = SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(json=schema))
    fills = []
    real = GrammarState.fill_mask

    def failing(self, masks, row):  # (the first fill is the prompt step's, the sampler's; then the loop's)
        fills.append(row)
        if len(fills) == 4:
            raise RuntimeError("grammar broke")
        return real(self, masks, row)

    monkeypatch.setattr(GrammarState, "fill_mask", failing)
    rollbacks = []
    real_rollback = GrammarState.rollback
    monkeypatch.setattr(GrammarState, "rollback", lambda self, n: rollbacks.append(n) or real_rollback(self, n))
    with pytest.raises(RuntimeError, match="grammar broke"):
        llm.generate("Once upon a time", sp)
    assert len(fills) == 4 and rollbacks == [2]  # loop steps 1, 2 took a token each; its third fill failed
