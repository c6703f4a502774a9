"""Draft-model speculative decoding: exact greedy outputs over every family, mixed batches,
preemption and prefix hits (the drafter's KV cache shares the target's block tables), rejection
sampling that keeps the target distribution, the cost model, stats, CLI flags and bad configs."""
import math
import re
from pathlib import Path

import pytest
import torch

from moe import LLM, SamplingParams
from moe.sampler import Sampler, filtered_probs, rejection_sample
from moe.spec_cost import SpecCostModel
from moe.spec_decode import SpeculativeConfig

from test_engine import _run_engine
from tiny_models import FAMILIES, make_checkpoint


@pytest.fixture(scope="module")
def drafters(tmp_path_factory):
    """Tiny drafters with the tiny targets' vocabulary (320): a one-layer dense one (Qwen3-MoE
    layout with every layer an MLP) and a one-layer, narrower Mixtral."""
    root = tmp_path_factory.mktemp("drafters")
    return {
        "dense": make_checkpoint("qwen3_moe", root / "dense", seed=1, num_hidden_layers=1, mlp_only_layers=[0]),
        "mixtral": make_checkpoint("mixtral", root / "mixtral", seed=2, num_hidden_layers=1, hidden_size=32),
    }


@pytest.fixture(scope="module")
def noisy_self(checkpoint, tmp_path_factory):
    """``noisy_self(family)``: the target with noise on its LM head, a drafter that agrees with
    it often but not always (partial acceptance)."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            model = AutoModelForCausalLM.from_pretrained(str(checkpoint(family)), dtype=torch.float32)
            torch.manual_seed(5)
            with torch.no_grad():
                w = model.get_output_embeddings().weight
                w.add_(torch.randn_like(w) * w.std() * 0.6)
            out = tmp_path_factory.mktemp(f"noisy_{family}")
            model.save_pretrained(out)
            cache[family] = out
        return cache[family]

    return get


def _spec(model, k: int = 3, **extra) -> dict:
    return {"method": "draft_model", "model": str(model), "num_speculative_tokens": k, "cost_control": False, **extra}


def _prompts(n: int, seed: int = 0, vocab: int = 320) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, vocab, (int(torch.randint(3, 20, (1,), generator=g)),),
                                               generator=g).tolist()} for _ in range(n)]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_outputs_unchanged_over_every_family(family, checkpoint, drafters, noisy_self):
    """float32: a batch of greedy requests gives the same tokens with a drafter of another family
    (nearly everything rejected), with a noisy copy of the target (partly accepted) and with the
    target itself (everything accepted: its cache is complete in every attention layout)."""
    target = checkpoint(family)
    prompts = _prompts(4, seed=len(family))
    sp = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    want = _tokens(LLM(str(target), dtype="float32").generate(prompts, sp))
    other = drafters["mixtral" if family == "qwen3_moe" else "dense"]
    for drafter in (other, noisy_self(family), target):
        llm = LLM(str(target), dtype="float32", speculative_config=_spec(drafter))
        assert _tokens(llm.generate(prompts, sp)) == want, drafter
        assert llm.engine.spec_drafted > 0
        if drafter == target:
            assert llm.engine.spec_stats().acceptance_rate == 1.0
    assert 0 < llm.engine.spec_accepted


def test_target_as_its_own_drafter_accepts_every_token(checkpoint):
    """Each step yields K + 1 tokens: max_tokens = 1 + 5 (K + 1) leaves room for K drafts in every step."""
    target = checkpoint("mixtral")
    k = 3
    llm = LLM(str(target), dtype="float32", speculative_config=_spec(target, k))
    sp = SamplingParams(temperature=0, max_tokens=1 + 5 * (k + 1), ignore_eos=True)
    llm.generate(_prompts(3), sp)
    s = llm.engine.spec_stats()
    assert s.num_verify_steps == 3 * 5 and s.num_draft_tokens == 3 * 5 * k
    assert s.mean_acceptance_length == k + 1 and s.acceptance_by_position == [1.0] * k
    st = llm.engine.stats()
    assert (st.spec_num_draft_tokens, st.spec_num_accepted_tokens) == (s.num_draft_tokens, s.num_accepted_tokens)


def test_mixed_batch_of_prefill_decode_sampled_and_plain_requests(checkpoint, noisy_self):
    """Chunked prefills beside speculating decodes, greedy and seeded sampled requests, a request
    with logit bias (never drafted) and log-probs: greedy outputs equal plain decoding's; sampled
    ones are reproducible and complete."""
    target = checkpoint("mixtral")
    prompts = _prompts(6, seed=3)
    prompts[1] = {"prompt_token_ids": list(range(5, 60))}  # long: prefilled in chunks beside decodes
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=4, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logit_bias={7: 2.0}),
              SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=9, max_tokens=18, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=15, ignore_eos=True, min_tokens=5)]
    opts = dict(dtype="float32", max_num_batched_tokens=16)
    want = LLM(str(target), **opts).generate(prompts, params)
    runs = []
    for _ in range(2):
        llm = LLM(str(target), **opts, speculative_config=_spec(noisy_self("mixtral"), 4))
        got = llm.generate(prompts, params)
        greedy = [0, 1, 3, 5]
        assert [_tokens(got)[i] for i in greedy] == [_tokens(want)[i] for i in greedy]
        for a, b in zip(got[0].outputs[0].logprobs, want[0].outputs[0].logprobs):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
        assert [len(t) for t in _tokens(got)] == [p.max_tokens for p in params]
        s = llm.engine.spec_stats()
        assert 0 < s.num_accepted_tokens < s.num_draft_tokens
        runs.append(_tokens(got))
    assert runs[0] == runs[1]


def test_drafter_cache_survives_preemption_and_prefix_hits(checkpoint):
    """A cache small enough to preempt, prompts sharing prefixes (prefix-cache hits), chunked
    prefill; with the target as drafter every draft is still accepted, so the drafter's K/V
    (in the same blocks as the target's) were complete and right after every recompute and hit."""
    target = checkpoint("qwen3_moe")
    g = torch.Generator().manual_seed(11)
    base = torch.randint(3, 320, (24,), generator=g).tolist()
    prompts = [{"prompt_token_ids": base[:int(torch.randint(8, 24, (1,), generator=g))]
                + torch.randint(3, 320, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()}
               for _ in range(8)]
    params = [SamplingParams(temperature=0, max_tokens=int(torch.randint(8, 20, (1,), generator=g)), ignore_eos=True)
              for _ in prompts]
    alone = LLM(str(target), dtype="float32", block_size=4, enable_prefix_caching=False)
    want = [alone.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    spec = _spec(target, 3)
    per_token = LLM(str(target), dtype="float32", block_size=4, speculative_config=spec).engine.kv_bytes_per_token()
    busy = LLM(str(target), dtype="float32", block_size=4, kv_cache_memory=20 * 4 * per_token,
               max_num_batched_tokens=20, speculative_config=spec)
    got, seqs, _ = _run_engine(busy, prompts, params)
    assert _tokens(got) == want
    assert sum(s.num_preemptions for s in seqs) > 0, "no preemption happened"
    assert busy.engine.block_manager.prefix_hit_tokens > 0
    s = busy.engine.spec_stats()
    assert s.num_draft_tokens > 0 and s.acceptance_rate == 1.0


def test_drafter_runs_prompts_only_when_it_drafts_and_reuses_cached_blocks_it_wrote(checkpoint):
    """The drafter runs no prompt row for a request that never drafts (a logit-biased one), yet
    that request's prompt blocks enter the prefix cache at once; a greedy request hitting them
    has the drafter catch up on the whole prompt at its first draft (target as drafter: still
    every draft accepted), and a third request hitting the same blocks reuses the drafter's K/V
    of the blocks the second one wrote."""
    target = checkpoint("mixtral")
    prompt = {"prompt_token_ids": list(range(10, 50))}  # 40 tokens: 10 blocks of 4
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(str(target), dtype="float32", block_size=4, speculative_config=_spec(target, 3))
    e = llm.engine
    want = LLM(str(target), dtype="float32").generate([prompt], plain)[0].outputs[0].token_ids

    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={7: 1.0}))
    assert e.drafter.num_tokens_run == 0 and e.spec_stats().num_draft_tokens == 0
    hits = e.block_manager.prefix_hit_tokens
    assert llm.generate([prompt], plain)[0].outputs[0].token_ids == want
    assert e.block_manager.prefix_hit_tokens - hits == 36  # all whole blocks but the last token's
    first = e.drafter.num_tokens_run
    assert first >= 40  # the whole prompt, since no cached block held the drafter's K/V
    assert llm.generate([prompt], plain)[0].outputs[0].token_ids == want
    assert e.drafter.num_tokens_run - first <= first - 36  # the 36 hit tokens' rows were reused
    s = e.spec_stats()
    assert s.num_draft_tokens > 0 and s.acceptance_rate == 1.0


def test_sampled_samples_sharing_a_prompt_accept_their_own_model(checkpoint):
    """n = 3 sampled samples of one prompt (samples 1, 2 take sample 0's prompt blocks from the
    prefix cache, the drafter's K/V with them): with the target as drafter, q = p up to rounding,
    so rejection sampling accepts (nearly) every draft; outputs are reproducible."""
    target = checkpoint("deepseek_v3")
    prompt = {"prompt_token_ids": list(range(10, 50))}
    sp = SamplingParams(n=3, temperature=0.9, top_p=0.95, seed=21, max_tokens=17, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(str(target), dtype="float32", block_size=8, speculative_config=_spec(target, 4))
        out = llm.generate(prompt, sp)[0]
        runs.append([c.token_ids for c in out.outputs])
        assert [len(t) for t in runs[-1]] == [17] * 3
        assert llm.engine.block_manager.prefix_hit_tokens >= 2 * 32
        s = llm.engine.spec_stats()
        assert s.num_draft_tokens >= 3 * 3 * 4 and s.acceptance_rate > 0.97, s.summary()
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]


def test_kv_cache_budget_counts_the_drafter(checkpoint, drafters):
    target = checkpoint("mixtral")
    plain = LLM(str(target), dtype="float32").engine.kv_bytes_per_token()
    draft_only = LLM(str(drafters["dense"]), dtype="float32").engine.kv_bytes_per_token()
    llm = LLM(str(target), dtype="float32", kv_cache_memory=64 * (plain + draft_only),
              speculative_config=_spec(drafters["dense"]))
    assert llm.engine.kv_bytes_per_token() == plain + draft_only
    assert llm.engine.kv_cache_tokens == 64 - 64 % 16
    k, _ = llm.engine.drafter.kv_caches[0]
    assert k.shape[:2] == llm.engine.kv_caches[0][0].shape[:2]  # same blocks, same block size


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square test of ``counts`` against ``probs`` (cells with p > 0)."""
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_rejection_sampling_reproduces_the_target_distribution():
    """Six-token vocabulary, temperature and top-k filtering, a drafter whose distribution differs
    from the target's, two draft tokens drawn from it; 40000 seeds. The first emitted token follows
    the target's row 0 (chi-square), the second (after an accepted first draft) row 1; tokens the
    filter cut never appear."""
    params = SamplingParams(temperature=0.9, top_k=5)
    target = torch.tensor([[1.0, 0.2, 0.7, -1.0, 0.5, -3.0], [0.1, 1.5, -0.5, 0.3, 0.9, -2.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    drafter = torch.tensor([[0.2, 1.2, -0.3, 0.4, 1.0, 0.0], [1.0, -0.5, 0.8, 0.0, 0.1, 0.3]])
    p = filtered_probs(target, [params] * 3)
    q = filtered_probs(drafter, [params] * 2)
    assert (p[:2] - q).abs().max() > 0.2  # the drafter really differs
    first, second = torch.zeros(6), torch.zeros(6)
    n = 40000
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        draft = tuple(int(torch.multinomial(q[j], 1, generator=g)) for j in range(2))
        out = rejection_sample(p, draft, q, g)
        first[out[0]] += 1
        if out[0] == draft[0] and len(out) > 1:
            second[out[1]] += 1
    assert _chi_square_p_value(first, p[0]) > 1e-3, (first / n, p[0])
    assert _chi_square_p_value(second, p[1]) > 1e-3, (second / second.sum(), p[1])
    assert first[p[0] == 0].sum() == 0 and second[p[1] == 0].sum() == 0
    # the sampler's entry point runs the same function on the rows' filtered distributions
    out = Sampler(0).verify_draft(target, params, torch.Generator().manual_seed(1), (1, 4), q)
    assert rejection_sample(p, (1, 4), q, torch.Generator().manual_seed(1)) == [t for t, _ in out]


def test_rejection_sampling_with_a_point_mass_is_the_n_gram_rule():
    """q = one-hot on each draft token: accept d with probability p(d), else draw from p without d."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    one_hot = torch.eye(3)[[1]]
    for seed in range(200):
        a = rejection_sample(p, (1,), None, torch.Generator().manual_seed(seed))
        b = rejection_sample(p, (1,), one_hot, torch.Generator().manual_seed(seed))
        assert a == b


def test_cost_model_charges_what_asking_for_drafts_costs_and_lets_plain_decoding_stand():
    # steps that asked a source for drafts and ran none (an n-gram lookup that found nothing) are
    # timed apart from plain ones: K > 0 then costs plain decoding plus that (lookups, bookkeeping),
    # which a rare, well-accepted draft does not pay back; while plain decoding stands, the calls a
    # caller skips (quiet_steps, skip) leave the choices and probes where the calls would have
    for asking, cost3, want in ((None, 1.06, 3), (1.2, 1.24, 0)):
        m = SpecCostModel(max_k=3, probe_every=8)
        for _ in range(3):
            m.observe_verify(0, 1, 1.0)
            m.observe_verify(3, 1, 1.6)
            if asking is not None:
                m.observe_verify(0, 1, asking, asked=True)
        m.observe_drafting("lookup", 10, 1, 3, 3)  # one sequence in ten finds a 3-token draft ...
        for _ in range(20):
            m.observe_acceptance(3, 3, "lookup")  # ... that is always accepted: 1.3 tokens a step
        # K = 3: 0.3 draft rows a step, on the line from (0, plain or asking) to the 3-row bin (3, 1.6)
        assert m.step_cost(0, 1, "lookup") == pytest.approx(1.0)
        assert m.step_cost(3, 1, "lookup") == pytest.approx(cost3)
        assert m.best_k(1, "lookup") == want  # 1.3 tokens for 1.06 s beats plain by 1.23x; for 1.24 s, 1.05x
    calls, skipped = SpecCostModel(max_k=3, probe_every=6), SpecCostModel(max_k=3, probe_every=6)
    for c in (calls, skipped):
        for _ in range(2):
            c.observe_verify(0, 1, 1.0)
            c.observe_verify(3, 1, 2.2)
        for _ in range(20):
            c.observe_acceptance(3, 0, "lookup")  # drafts rejected: plain decoding, with probes
    ks, quiet = [calls.choose_k(1, "lookup") for _ in range(14)], []
    while len(quiet) < 14:
        quiet.append(skipped.choose_k(1, "lookup"))
        n = min(skipped.quiet_steps(1, "lookup"), 14 - len(quiet)) if quiet[-1] == 0 else 0
        skipped.skip(1, "lookup", n)
        quiet += [0] * n
    assert ks == quiet == [0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 3, 0, 0]  # a probe every 6th step either way


def test_the_engine_skips_asking_only_while_plain_decoding_stands():
    # LLMEngine._choose_k skips the cost model's calls for the steps its plain choice is known to
    # stand; any other choice in between (here K_max for an empty batch) ends that: the next step
    # asks again, else the proposer would keep drafting with a K nobody chose
    from types import SimpleNamespace

    from moe.engine import LLMEngine

    cost = SpecCostModel(max_k=3, probe_every=64, rejudge_every=4)
    for _ in range(2):
        cost.observe_verify(0, 1, 1.0)
        cost.observe_verify(3, 1, 2.2)
    for _ in range(20):
        cost.observe_acceptance(3, 0, "lookup")
    prop = SimpleNamespace(source="lookup", k=None, probe_left=None)
    prop.set_probe = lambda size, running: setattr(prop, "probe_left", size)
    eng = SimpleNamespace(spec_cost=cost, proposer=prop, _lookup=None, _quiet=[0, 0], _skipped=False,
                          drafter=None, scheduler=SimpleNamespace(running=["seq"]))
    calls = []
    real = cost.choose_k
    cost.choose_k = lambda n, source: calls.append(n) or real(n, source)
    # the first step chose (no probe: False), the three after it were quiet (None: nothing asked)
    assert [LLMEngine._choose_k(eng) for _ in range(4)] == [False, None, None, None] and prop.k == 0
    assert calls == [1] and eng._quiet == [1, 0]  # one call: its choice stood for the three steps after
    for _ in range(2):
        LLMEngine._choose_k(eng)
    assert calls == [1, 1] and eng._quiet == [1, 2]  # asked again, then standing: two steps left
    eng.scheduler.running = []
    LLMEngine._choose_k(eng)
    assert prop.k == 3  # (an empty batch: K_max)
    eng.scheduler.running = ["seq"]
    LLMEngine._choose_k(eng)
    assert prop.k == 0 and calls == [1, 1, 0, 1]


def test_cost_model_calls_drafting_hopeless_only_when_no_acceptance_could_pay():
    # hopeless: even with every draft accepted, K + 1 tokens take more than K + 1 plain steps / min_gain
    cost = SpecCostModel(max_k=3)
    assert not cost.hopeless(1)  # (unmeasured)
    for _ in range(3):  # (a timing's first is dropped)
        cost.observe_verify(0, 1, 1.0)
        cost.observe_verify(3, 1, 3.0)  # 4 rows: 3 plain steps
        cost.observe_draft(1, 0.3)
    for _ in range(50):
        cost.observe_acceptance(3, 3)  # every draft accepted: still K = 3 in 3.9 plain steps for 4 tokens
    assert cost.hopeless(1) and cost.choose_k(1) == 0
    for _ in range(2):
        cost.observe_probe(1, 5.0, 2)  # a probe's loss: 5 s for 2 tokens, 3 plain steps over
    assert cost.probe_interval(1) == 600  # its probes follow the costs only: within 0.5% (2% / 4) of plain time
    cost.hopeless_probe_rarity = 1
    assert cost.probe_interval(1) == 150
    cheap = SpecCostModel(max_k=3)
    for _ in range(3):
        cheap.observe_verify(0, 1, 1.0)
        cheap.observe_verify(3, 1, 1.5)  # a memory-bound verify: 4 rows at 1.5 plain steps
        cheap.observe_draft(1, 0.1)
    for _ in range(50):
        cheap.observe_acceptance(3, 0)  # nothing accepted yet: plain wins, but acceptance could change that
    assert cheap.choose_k(1) == 0 and not cheap.hopeless(1)


def test_a_drafter_is_unpromising_only_when_well_measured_acceptance_is_far_from_paying():
    def model(accepted: int, drafts: int, source: str = "model") -> SpecCostModel:
        m = SpecCostModel(max_k=3)
        for _ in range(3):
            m.observe_verify(0, 1, 1.0)
            m.observe_verify(3, 1, 1.5)  # 4 rows at 1.5 plain steps: drafting pays if accepted
            m.observe_draft(1, 0.1)
        for i in range(drafts):
            m.observe_acceptance(3, 3 if i < accepted else 0, source)
        return m

    assert not model(0, 100).hopeless(1)  # (every draft accepted would pay)
    assert model(0, 100).unpromising(1) and model(10, 100).unpromising(1)  # 0.1: far below what pays
    assert not model(0, 20).unpromising(1)  # too few drafts to tell
    assert not model(90, 100).unpromising(1)  # 0.9 accepted: drafting pays
    low = model(30, 100)  # 0.3: does not pay as measured, but a K = 1 step would within two standard errors
    assert low.choose_k(1) == 0 and not low.unpromising(1)
    assert not model(0, 100, "lookup").unpromising(1, "lookup")  # a lookup's probes are nearly free


def test_cost_model_counts_a_lookups_short_drafts():
    # a lookup asked for 3 tokens that finds 1 (its continuation ends) half the time and all 3 the
    # other half, every drafted token accepted: its drafts yield 1 + (1 + .5 + .5) = 3 tokens, not
    # the 4 of three-token drafts; a drafter's full drafts (asked = length) keep E(K) = 1 + K
    m = SpecCostModel(max_k=3)
    for _ in range(10):
        m.observe_acceptance(1, 1, "lookup", asked=3)
        m.observe_acceptance(3, 3, "lookup", asked=3)
        m.observe_acceptance(3, 3, "model")
    assert [m.length_share(j, "lookup") for j in range(3)] == [1.0, 0.5, 0.5]
    assert m.expected_tokens(3, "lookup") == pytest.approx(3.0) and m.expected_tokens(1, "lookup") == 2.0
    assert m.expected_tokens(3, "model") == 4.0
    # drafts asked for 1 token say nothing about positions past it
    m.observe_acceptance(1, 1, "model", asked=1)
    assert m.length_share(1, "model") == 1.0


def test_cost_model_picks_k_from_costs_and_acceptance():
    m = SpecCostModel(max_k=4, probe_every=8)
    assert m.choose_k(1) == 4  # unmeasured: the ends first
    m.observe_verify(4, 1, 9.0)  # the first timing of a kind pays kernel builds: dropped
    m.observe_draft(1, 3.0)
    assert m.choose_k(1) == 4
    for seconds in (1.4, 1.3, 5.0, 1.5, 1.4):  # the median ignores a step slowed by a busy machine
        m.observe_verify(4, 1, seconds)
    m.observe_draft(1, 0.05)
    assert m.choose_k(1) == 0
    m.observe_verify(0, 1, 1.0)
    m.observe_verify(0, 1, 1.0)
    for _ in range(50):  # 1 in 10 drafts rejected at position 0, every draft past it accepted
        m.observe_acceptance(4, 0)
        for _ in range(9):
            m.observe_acceptance(4, 4)
    assert m.acceptance(0) == pytest.approx(0.9) and m.acceptance(3) == 1.0
    # E(4) = 1 + 4 * .9 = 4.6 tokens for 1.4 + 4 * 0.05 s: beats 1 token per second
    assert m.expected_tokens(2) == pytest.approx(2.8) and m.expected_tokens(4) == pytest.approx(4.6)
    assert m.step_cost(2, 1) == pytest.approx(1.2 + 2 * 0.05)  # interpolated between the measured ends
    assert m.choose_k(1) == 4
    # an MoE-like verify cost (2.2 plain steps for K = 3) and poor acceptance: plain decoding
    low = SpecCostModel(max_k=3, probe_every=4)
    for _ in range(2):
        low.observe_verify(0, 8, 1.0)
        low.observe_verify(3, 8, 2.2)
        low.observe_draft(8, 0.1)
    for _ in range(100):
        low.observe_acceptance(3, 0)
    ks = [low.choose_k(8) for _ in range(8)]
    assert ks == [0, 0, 0, 3, 0, 0, 0, 3]  # K_max every probe_every-th step keeps acceptance current
    assert low.choose_k(2) == 3  # another batch-size bucket is measured afresh
    # a predicted gain under min_gain (1.1) is not taken: 1.9 tokens for 1.8 s is 1.06x plain
    edge = SpecCostModel(max_k=1)
    for _ in range(3):
        edge.observe_verify(0, 1, 1.0)
        edge.observe_verify(1, 1, 1.7)
        edge.observe_draft(1, 0.1)
    for _ in range(10):
        edge.observe_acceptance(1, 1 if _ < 9 else 0)
    assert edge.speedup(1, 1) == pytest.approx(1.9 / 1.8) and edge.best_k(1) == 0
    edge.min_gain = 1.0
    assert edge.best_k(1) == 1
    # probes: the interval follows the measured probe loss (catch-up included) once there is one
    assert low.probe_interval(8) == 4  # fixed
    low.probe_every = None
    # 100 drafts, none accepted: even two standard errors up no K pays, so probes run 4x rarer
    assert low.unpromising(8) and low.probe_interval(8) == 4 * 75
    low.hopeless_probe_rarity = 1  # (below: the budget as it stands for a drafter that might pay)
    assert low.probe_interval(8) == math.ceil((2.2 + 3 * 0.1 - 1.0) / 0.02)  # the cost line's loss: 75
    for _ in range(3):  # probe steps of 4 s that yielded 9 tokens for 8 sequences: loss 4 - 9/8
        low.observe_probe(8, 4.0, 9)
        low.observe_probe(8, 1.0, 9, ["lookup"])  # a lookup's probes (nearly free) are its own
    assert low.probe_interval(8) == math.ceil((4.0 - 9 / 8) / 0.02)
    assert low.probe_interval(8, "lookup") == 16  # (no loss: as often as allowed)
    low.sources = 2  # n-gram lookup first and a drafter: each probes, within half the budget
    assert low.probe_interval(8) == math.ceil((4.0 - 9 / 8) / 0.01)


def test_cost_model_weighs_lookup_drafts_on_their_own_acceptance_and_any_verify_length():
    """n-gram drafts come in any length: the verify line runs through the plain step and the longest
    verify measured; they cost no drafter step; their acceptance is counted apart from a drafter's."""
    m = SpecCostModel(max_k=4, probe_every=8)
    for _ in range(3):
        m.observe_verify(2, 1, 1.4)
        m.observe_verify(0, 1, 1.0)
    assert m.step_cost(4, 1, "lookup") == pytest.approx(1.8) and m.step_cost(4, 1) is None  # no drafter step yet
    assert m.choose_k(1, "lookup") == 4  # prior acceptance 0.8: E(4) = 3.36 tokens in 1.8 s beats 1 in 1 s
    for _ in range(20):
        m.observe_acceptance(2, 0, "lookup")
    assert m.choose_k(1, "lookup") == 0 and m.acceptance(0) == m.prior_acceptance


def test_cost_model_counts_the_share_of_sequences_that_draft_and_costs_steps_by_their_rows():
    """At batch 32 n-gram lookup finds a draft for about a quarter of the sequences: the step yields
    1 + share * (E(K) - 1) tokens per sequence and runs share * fill * K extra rows per sequence,
    costed on the line through the plain step and the steps measured at such row counts."""
    m = SpecCostModel(max_k=3, probe_every=8)
    for _ in range(3):
        m.observe_verify(0, 32, 1.0)
        m.observe_verify(0.75, 32, 1.3)  # a quarter drafting 3 tokens each: 0.75 rows per sequence
    for _ in range(4):
        m.observe_drafting("lookup", 32, 8, 24, 3)  # 8 of 32 had a draft, each of all 3 tokens
    for _ in range(20):
        m.observe_acceptance(3, 3, "lookup")  # every draft accepted: E(3) = 4 for a drafting sequence
    assert m.expected_tokens(3, "lookup") == pytest.approx(4.0)
    assert m.step_tokens(3, "lookup") == pytest.approx(1 + 0.25 * 3)
    assert m.draft_rows(3, "lookup") == pytest.approx(0.75)
    assert m.step_cost(3, 32, "lookup") == pytest.approx(1.3)  # measured at those rows
    assert m.step_cost(1, 32, "lookup") == pytest.approx(1.1)  # interpolated: 0.25 rows
    assert m.speedup(3, 32, "lookup") == pytest.approx(1.75 / 1.3)
    assert m.choose_k(32, "lookup") == 3  # x1.35 clears min_gain
    # the same acceptance if every sequence drafted would predict 4 / 1.3 = x3.1 ...
    for _ in range(40):  # ... but if only one in 32 has a draft, the batch gains too little
        m.observe_drafting("lookup", 32, 1, 3, 3)
    assert m.speedup(3, 32, "lookup") < 1.1 and m.choose_k(32, "lookup") == 0


def test_cost_model_keeps_plain_decoding_while_drafting_steps_run_slower_than_plain_ones():
    """The check on the prediction: the model predicts a gain, the source's drafting steps (whole
    steps, drafting included) run slower than plain decoding; after ``realized_window`` of them
    the source keeps K = 0 for ``veto_steps`` choices (probes aside), then may draft again."""
    m = SpecCostModel(max_k=3, probe_every=1000, realized_window=4, veto_steps=10)
    for _ in range(3):
        m.observe_verify(0, 32, 1.0)
        m.observe_verify(3, 32, 1.3)
    for _ in range(20):
        m.observe_acceptance(3, 3, "lookup")
    assert m.choose_k(32, "lookup") == 3  # predicted: 4 tokens for 1.3 s
    for _ in range(3):
        m.observe_realized(["lookup"], 32, 1.5, 40)  # 40 tokens in 1.5 s: 0.83x plain's 32 in 1 s
        assert m.choose_k(32, "lookup") == 3  # (the window is not full yet)
    assert m.realized(32, "lookup") == pytest.approx(40 / 1.5 / 32)
    m.observe_realized(["model"], 32, 1.5, 40)  # another source's steps do not count against this one
    assert m.choose_k(32, "lookup") == 3
    m.observe_realized(["lookup"], 32, 1.5, 40)
    assert [m.choose_k(32, "lookup") for _ in range(10)] == [0] * 10
    assert m.choose_k(32, "lookup") == 3 and m.choose_k(8, "lookup") == 3  # over; (other sizes untouched)
    for _ in range(4):  # drafting steps that pay keep it drafting
        m.observe_realized(["lookup"], 32, 1.0, 60)
    assert m.choose_k(32, "lookup") == 3


def test_cost_model_asks_for_a_plain_step_now_and_then_while_drafting_wins():
    """verify(0) is measured only in plain steps: while drafting wins, one plain step every
    ``refresh_every`` drafting steps keeps it current (once per count: a step that could not be
    timed does not keep drafting off)."""
    m = SpecCostModel(max_k=3, refresh_every=4)
    m.observe_verify(0, 8, 1.0)
    for _ in range(3):
        m.observe_verify(1.5, 8, 1.2)
        assert not m.refresh_plain(8)
    m.observe_verify(2.0, 8, 1.2)
    assert m.refresh_plain(8) and not m.refresh_plain(8)  # asked once; the count starts over
    for _ in range(4):
        m.observe_verify(2.0, 8, 1.2)
    m.observe_verify(0, 8, 1.0)  # a plain step came anyway: no refresh needed
    assert not m.refresh_plain(8) and not m.refresh_plain(2)  # (another bucket drafted nothing yet)


def test_engine_chooses_k_and_stays_exact(checkpoint, drafters):
    """With cost control on the engine measures and chooses K per step (0 included); greedy
    output is unchanged whatever it picks."""
    target = checkpoint("mixtral")
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = _tokens(LLM(str(target), dtype="float32").generate(_prompts(2), sp))
    llm = LLM(str(target), dtype="float32", speculative_config=_spec(drafters["dense"], 3, cost_control=True))
    chosen = []
    orig = llm.engine.spec_cost.choose_k

    def spy(batch_size, source="model"):
        chosen.append(orig(batch_size, source))
        return chosen[-1]

    llm.engine.spec_cost.choose_k = spy
    llm.engine.spec_cost.rejudge_every = 16  # (a standing plain choice asked again every 16 steps: enough calls to see)
    assert _tokens(llm.generate(_prompts(2), sp)) == want
    assert 3 in chosen and 0 in chosen  # a random drafter accepts ~nothing: plain steps win
    after = chosen[chosen.index(0):]  # (calls: steps whose plain choice is known to stand skip them)
    assert len(after) >= 4 and after.count(0) >= len(after) - 1  # plain from then on, a probe at most


def _never_accepted(drafter) -> None:
    """Make ``drafter`` pick token 0 (which the tiny targets never emit) at every step: its real
    forward still runs (its cache fills), its drafts are never accepted."""
    orig_step = drafter.step

    def wrong_step(seqs, ids, positions):
        logits = orig_step(seqs, ids, positions)
        logits[:, 0] = logits.max() + 1
        return logits

    drafter.step = wrong_step


def test_zero_acceptance_drafter_falls_back_to_plain_steps_that_cost_it_nothing(checkpoint, drafters):
    """Counters, not timings: a drafter whose drafts are never accepted (one that predicts token 0,
    which the target never emits) ends with K = 0; in those steps the drafter runs no row at all (it
    catches up only when it drafts again), probes are rare, and the output stays exact."""
    target = checkpoint("mixtral")
    sp = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    prompts = _prompts(2, seed=5)
    want = _tokens(LLM(str(target), dtype="float32").generate(prompts, sp))
    llm = LLM(str(target), dtype="float32", speculative_config=_spec(drafters["dense"], 3, cost_control=True))
    e = llm.engine
    _never_accepted(e.drafter)
    seqs = [e.seqs[e.add_request(p, sp)] for p in prompts]
    steps = []  # (K chosen, drafter rows run in the step)
    while e.has_unfinished_requests():
        rows = e.drafter.num_tokens_run
        e.step()
        steps.append((e.proposer.k, e.drafter.num_tokens_run - rows))
    assert [q.output_token_ids for q in seqs] == want
    assert e.spec_stats().num_draft_tokens > 0 and e.spec_accepted == 0
    ks = [k for k, _ in steps]
    assert ks[-30:].count(0) >= 28, ks  # learned, then plain (a probe at most every 16 steps)
    assert all(rows == 0 for k, rows in steps[1:] if k == 0), steps  # a plain step runs no drafter row
    plain_from = ks.index(0)
    probes = [i for i, k in enumerate(ks) if k and i > plain_from]
    assert all(b - a > 16 for a, b in zip([plain_from] + probes, probes)), ks  # K_max at most every 16 steps


def test_probes_draft_for_a_share_of_the_batch_and_are_not_taken_as_verify_costs(checkpoint, drafters):
    """Once plain steps win, a probe drafts for ceil(batch / 8) sequences only (the others run
    no drafter row): those that owe the drafter the fewest rows; its step time does not enter the
    verify costs."""
    target = checkpoint("mixtral")
    sp = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)
    prompts = _prompts(9, seed=6)
    want = _tokens(LLM(str(target), dtype="float32").generate(prompts, sp))
    llm = LLM(str(target), dtype="float32", speculative_config=_spec(drafters["dense"], 3, cost_control=True))
    e = llm.engine
    _never_accepted(e.drafter)  # K = 0 wins, probes remain
    e.spec_cost.probe_every = 10
    seqs = [e.seqs[e.add_request(p, sp)] for p in prompts]
    drafting = []
    orig_run = e.runner.run

    def run(batch, eos_ids):
        drafting[:] = [s.seq for s in batch.seqs if s.draft]
        return orig_run(batch, eos_ids)

    e.runner.run = run
    probes = []  # (sequences drafting, verify timings recorded) of each probe step
    rows_run = []  # of each probe step: drafter rows run, and the fewest any other sequence owed
    while e.has_unfinished_requests():
        seen = sum(t.seen for t in e.spec_cost._verify.values())
        drafted = e.spec_stats().num_verify_steps
        owed = {id(q): e.drafter.owed(q) for q in seqs if not q.is_finished}
        rows = e.drafter.num_tokens_run
        e.step()
        if e.proposer.probe_left is not None:
            probes.append((e.spec_stats().num_verify_steps - drafted,
                           sum(t.seen for t in e.spec_cost._verify.values()) - seen))
            mine = {id(q) for q in drafting}
            assert max(owed[i] for i in mine) <= min(v for i, v in owed.items() if i not in mine), owed
            rows_run.append(e.drafter.num_tokens_run - rows)
    assert [q.output_token_ids for q in seqs] == want
    assert probes and all(p == (2, 0) for p in probes), probes  # ceil(9 / 8) = 2 of 9, no cost taken
    # the same two sequences come back: after their first probe they owe only the steps since
    assert len(rows_run) > 2 and all(r <= 2 * (10 + 3) for r in rows_run[1:]), rows_run


def test_only_steps_without_prompt_chunks_are_timed_as_verify_or_plain_steps(checkpoint):
    """A step that runs a prompt chunk beside decoding rows costs what the chunk costs: cost control
    takes step timings only from steps whose every row decodes (judged before the step moves the
    sequences on: a one-token prompt chunk must not pass for a decode row afterwards)."""
    target = checkpoint("mixtral")
    spec = {"method": "ngram", "num_speculative_tokens": 3, "cost_control": True}
    llm = LLM(str(target), dtype="float32", max_num_batched_tokens=9, speculative_config=spec)
    e = llm.engine
    steps, timed = [], []
    orig_run, orig_observe = e.runner.run, e.spec_cost.observe_verify

    def run(batch, eos_ids):
        steps.append(all(s.samples and s.num_new_tokens == 1 + len(s.draft) for s in batch.seqs))
        return orig_run(batch, eos_ids)

    def observe_verify(rows, batch_size, seconds, asked=False):
        timed.append(len(steps))
        orig_observe(rows, batch_size, seconds, asked)

    e.runner.run, e.spec_cost.observe_verify = run, observe_verify
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for p in _prompts(8, seed=11):  # eight decoding sequences leave one token of the budget of 9 ...
        e.add_request(p, sp)
    for _ in range(3):
        e.step()
    e.add_request({"prompt_token_ids": list(range(3, 15))}, sp)  # ... for this prompt: one-token chunks
    while e.has_unfinished_requests():
        e.step()
    assert timed and all(steps[i - 1] for i in timed), (steps, timed)
    assert not all(steps)  # (there were steps with prompt chunks, and none of them was timed)


def test_a_probe_drafts_for_the_decoding_sequences_that_owe_the_drafter_fewest_rows():
    """A drafter runs a sequence's whole context the first time it drafts for it: a probe takes the
    sequences it is closest to (drafted for lately, or short), not whichever the scheduler asks
    first; sequences still in their prompt are not candidates; the slots are those and no others."""
    from types import SimpleNamespace

    from moe.drafter import DraftModelProposer
    from moe.spec_decode import take_probe_slot

    owed = {}
    drafter = SimpleNamespace(owed=lambda seq: owed[id(seq)])
    prop = DraftModelProposer(drafter, 3, 1000, torch.Generator())
    seqs = [SimpleNamespace(num_tokens=40, num_computed_tokens=39, generator=None) for _ in range(6)]
    mid_prompt = SimpleNamespace(num_tokens=40, num_computed_tokens=8, generator=None)
    for seq, n in zip(seqs + [mid_prompt], (50, 7, 300, 12, 9, 40, 0)):
        owed[id(seq)] = n
    prop.set_probe(2, seqs + [mid_prompt])
    assert prop.probe_only == {id(seqs[1]), id(seqs[4])} and prop.probe_left == 2
    assert [take_probe_slot(prop, q, 3) for q in seqs] == [0, 3, 0, 0, 3, 0]
    prop.set_probe(None, seqs)
    assert prop.probe_left is None and take_probe_slot(prop, seqs[0], 3) == 3


def _record_draft_sources(llm) -> list[str]:
    """The source ("lookup" or "model") of every draft the engine's steps verify, in order."""
    sources: list[str] = []
    orig = llm.engine.runner.run

    def spy(batch, eos_ids):
        sources.extend(s.draft_source for s in batch.seqs if s.draft)
        return orig(batch, eos_ids)

    llm.engine.runner.run = spy
    return sources


def test_ngram_first_drafts_by_lookup_where_it_matches_and_by_the_drafter_elsewhere(checkpoint, noisy_self):
    """ngram_first: a sequence whose suffix recurred takes the lookup's draft, the others the
    drafter's (both in one run); greedy outputs unchanged, sampled ones reproducible."""
    target = checkpoint("mixtral")
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9] * 4}, *_prompts(2, seed=8)]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * 2 + [
        SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)]
    want = _tokens(LLM(str(target), dtype="float32").generate(prompts[:2], params[:2]))
    runs = []
    for _ in range(2):
        llm = LLM(str(target), dtype="float32", speculative_config=_spec(noisy_self("mixtral"), 3, ngram_first=True))
        sources = _record_draft_sources(llm)
        got = _tokens(llm.generate(prompts, params))
        assert got[:2] == want
        assert sources.count("lookup") > 0 and sources.count("model") > 0, sources
        runs.append(got)
    assert runs[0] == runs[1]


def test_engine_tells_cost_control_which_sequences_each_source_drafted_for(checkpoint, noisy_self):
    """Per step and source asked to draft: the decoding sequences asked, those drafted for and
    their draft tokens, as the batch ran them (ngram_first: the lookup's, then the drafter's)."""
    target = checkpoint("mixtral")
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9] * 4}, *_prompts(3, seed=8)]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm = LLM(str(target), dtype="float32",
              speculative_config=_spec(noisy_self("mixtral"), 3, ngram_first=True, cost_control=True))
    e = llm.engine
    assert e.spec_cost.sources == 2  # the two sources probe apart, within one budget
    ran, told = [], []
    orig_run, orig_told = e.runner.run, e.spec_cost.observe_drafting

    def run(batch, eos_ids):  # (what each sequence is, read before the step moves it on)
        decoding = [s for s in batch.seqs if s.samples and s.num_new_tokens == 1 + len(s.draft)]
        ran.append({src: (len(decoding), [len(s.draft) for s in decoding if s.draft and s.draft_source == src])
                    for src in ("lookup", "model")})
        return orig_run(batch, eos_ids)

    def observe_drafting(source, asked, drafted, tokens, k):
        told.append((len(ran), source, asked, drafted, tokens))
        orig_told(source, asked, drafted, tokens, k)

    verified, orig_acc = [], e.spec_cost.observe_acceptance

    def observe_acceptance(draft_len, accepted, source, asked=None):  # each draft against the K it was asked for
        verified.append((source, draft_len, asked))
        orig_acc(draft_len, accepted, source, asked)

    e.runner.run, e.spec_cost.observe_drafting = run, observe_drafting
    e.spec_cost.observe_acceptance = observe_acceptance
    e.spec_cost.choose_k = lambda batch_size, source="model": 3  # both sources asked at every step
    for p in prompts:
        e.add_request(p, sp)
    while e.has_unfinished_requests():
        e.step()
    checked = 0
    for step, source, asked, drafted, tokens in told:
        num_decoding, mine = ran[step - 1][source]
        assert (asked, drafted, tokens) == (num_decoding, len(mine), sum(mine)), (step, source)
        checked += 1
    assert checked and {src for _, src, _, d, _ in told if d} == {"lookup", "model"}
    assert verified and all(asked == 3 and 0 < n <= 3 for _, n, asked in verified)
    for src in ("lookup", "model"):
        mine = [n for s, n, _ in verified if s == src]
        assert e.spec_cost._asked_at[src] == [len(mine)] * 3
        assert e.spec_cost._long_at[src] == [sum(n > j for n in mine) for j in range(3)]


@pytest.mark.parametrize("spec, match", [
    ({"method": "eagle"}, "method 'eagle' is not supported: choose one of ngram, draft_model, draft, mtp"),
    ({"method": "draft_model"}, "needs 'model'"),
    ({"method": "draft_model", "model": "/nonexistent/drafter"}, "'/nonexistent/drafter' is not a checkpoint"),
    ({"method": "ngram", "model": "/x"}, "is for methods 'draft_model' and 'mtp'"),
    ({"method": "mtp", "model": "/x"}, "is not a checkpoint directory"),
    ({"method": "draft_model", "model": "/x", "num_speculative_tokens": 0}, "must be a positive integer"),
    ({"method": "ngram", "ngram_first": True}, "ngram_first is for methods draft_model, draft, mtp"),
])
def test_bad_configs_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.parse(spec)


def test_drafter_with_another_vocabulary_is_refused(checkpoint, tmp_path):
    small = make_checkpoint("mixtral", tmp_path / "v256", num_hidden_layers=1, vocab_size=256)
    with pytest.raises(ValueError, match="vocab_size 256 but the target has 320"):
        LLM(str(checkpoint("mixtral")), dtype="float32", speculative_config=_spec(small))


def test_draft_method_without_a_shipped_drafter_says_how_to_get_one(monkeypatch, tmp_path):
    import moe.spec_decode as sd

    monkeypatch.setattr(sd, "default_drafter_path", lambda: tmp_path / "drafter")
    with pytest.raises(ValueError, match="holds none: train one with `moe distill"):
        SpeculativeConfig.parse({"method": "draft"})


def test_cli_flags_and_stats():
    """``moe generate --draft-model`` (the default model as its own drafter) prints the acceptance."""
    from typer.testing import CliRunner

    from moe.cli import app, speculative_config
    from moe.llm import default_model_path

    assert speculative_config(None, "/d", 0) == {"method": "draft_model", "model": "/d"}
    assert speculative_config("draft", None, 2) == {"method": "draft", "num_speculative_tokens": 2}
    assert speculative_config(None, None, 0) is None
    assert speculative_config("draft", None, 0, ngram_first=True) == {"method": "draft", "ngram_first": True}
    with pytest.raises(Exception, match="--ngram-first needs a drafter"):
        speculative_config(None, None, 0, ngram_first=True)
    res = CliRunner().invoke(app, ["generate", "--draft-model", default_model_path(), "--speculative-tokens", "2",
                                   "--dtype", "float32", "--stats", "--temperature", "0", "--max-tokens", "7",
                                   "--no-stream", "--speculative-method", "draft_model", "The module"])
    assert res.exit_code == 0, res.output
    m = re.search(r"speculative decoding: (\d+) of (\d+) draft tokens accepted \(rate 1.00\), mean acceptance "
                  r"length [\d.]+, per position \[1.00 1.00\], method draft_model", res.stderr)
    assert m and m.group(1) == m.group(2) != "0", res.stderr


# ---- MTP (DeepSeek-V3's multi-token-prediction layer as the drafter) ----------------------------

@pytest.fixture(scope="module")
def mtp_target(tmp_path_factory):
    from tiny_models import make_mtp_checkpoint

    return make_mtp_checkpoint(tmp_path_factory.mktemp("mtp_target"))


MTP = {"method": "mtp", "num_speculative_tokens": 2, "cost_control": False}


def test_mtp_greedy_outputs_unchanged_under_preemption_prefix_hits_and_chunks(mtp_target):
    """float32: greedy requests sharing prefixes, chunked prefill, a cache small enough to preempt,
    a sampled request beside them: the greedy outputs equal plain decoding's."""
    g = torch.Generator().manual_seed(4)
    base = torch.randint(3, 320, (20,), generator=g).tolist()
    prompts = [{"prompt_token_ids": base[:int(torch.randint(6, 20, (1,), generator=g))]
                + torch.randint(3, 320, (3,), generator=g).tolist()} for _ in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True) for _ in prompts]
    params[2] = SamplingParams(temperature=0.8, seed=1, max_tokens=14, ignore_eos=True)
    want = _tokens(LLM(str(mtp_target), dtype="float32", block_size=4).generate(prompts, params))
    per_token = LLM(str(mtp_target), dtype="float32", block_size=4,
                    speculative_config=MTP).engine.kv_bytes_per_token()
    busy = LLM(str(mtp_target), dtype="float32", block_size=4, kv_cache_memory=16 * 4 * per_token,
               max_num_batched_tokens=12, speculative_config=MTP)
    got, seqs, _ = _run_engine(busy, prompts, params)
    greedy = [i for i in range(6) if i != 2]
    assert [_tokens(got)[i] for i in greedy] == [want[i] for i in greedy]
    assert len(_tokens(got)[2]) == 14
    assert sum(s.num_preemptions for s in seqs) > 0 and busy.engine.block_manager.prefix_hit_tokens > 0
    assert busy.engine.spec_drafted > 0


def test_mtp_drafts_are_the_mtp_layers_predictions(mtp_target):
    """Each step's drafts d1, d2 equal a plain torch reference (tests/test_mtp.py) run over the
    whole sequence: d1 from the last token and the target's hidden state before it (transformers),
    d2 from d1 and the MTP's own output."""
    from test_mtp import reference
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(mtp_target), dtype=torch.float32).eval()
    llm = LLM(str(mtp_target), dtype="float32", speculative_config=MTP)
    proposer = llm.engine.proposer
    seen = []
    orig = proposer.propose

    def spy(seqs, rooms):
        drafts = orig(seqs, rooms)
        seen.extend((list(s.token_ids), d.tokens) for s, d in zip(seqs, drafts))
        return drafts

    proposer.propose = spy
    llm.generate({"prompt_token_ids": [5, 77, 12, 190, 33, 8]}, SamplingParams(temperature=0, max_tokens=9,
                                                                                 ignore_eos=True))
    assert len(seen) >= 3 and sum(len(d) == 2 for _, d in seen) >= 2
    for tokens, draft in seen:
        with torch.no_grad():
            h = hf.model(torch.tensor([tokens])).last_hidden_state[0]
        t = torch.tensor(tokens)
        out, logits = reference(mtp_target, t, h[:-1])
        assert int(logits[-1].argmax()) == draft[0]
        if len(draft) > 1:  # (the last step's room may allow one)
            _, logits2 = reference(mtp_target, torch.cat([t, torch.tensor(draft[:1])]), torch.cat([h[:-1], out[-1:]]))
            assert int(logits2[-1].argmax()) == draft[1]


def test_mtp_with_ngram_first_drafts_by_both_and_keeps_greedy_outputs(mtp_target):
    """ngram_first with an MTP layer: the lookup drafts where the suffix recurred, the MTP layer elsewhere
    (its catch-up runs after steps that verified the lookup's drafts too); greedy outputs unchanged."""
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9] * 4}, {"prompt_token_ids": [11, 40, 250, 3, 77, 19]}]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = _tokens(LLM(str(mtp_target), dtype="float32").generate(prompts, params))
    llm = LLM(str(mtp_target), dtype="float32", speculative_config={**MTP, "ngram_first": True})
    sources = _record_draft_sources(llm)
    assert _tokens(llm.generate(prompts, params)) == want
    assert sources.count("lookup") > 0 and sources.count("model") > 0, sources


def test_mtp_rows_wait_for_a_draft_so_steps_drafting_nothing_run_no_mtp_pass(mtp_target):
    """While cost control keeps K = 0 the MTP layer runs nothing (its rows wait with the target's hidden
    states); past PENDING_BYTES a sequence's rows run anyway; when drafting resumes, all pending rows run
    in one pass first. Greedy outputs equal plain decoding's throughout."""
    prompts = [{"prompt_token_ids": [11, 40, 250, 3, 77, 19]}, {"prompt_token_ids": [5, 6, 7, 8]}]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = _tokens(LLM(str(mtp_target), dtype="float32").generate(prompts, params))
    for cap in (None, 64 * 4 * 3):  # (float32 rows of hidden size 64: the cap passes every 3 positions)
        llm = LLM(str(mtp_target), dtype="float32", speculative_config={**MTP, "cost_control": True})
        e, drafter = llm.engine, llm.engine.drafter
        drafter.CATCH_UP_ROWS = 5  # (the pending rows of a prompt and of 12 steps run in passes of 5 rows)
        if cap:
            drafter.PENDING_BYTES = cap
        steps = []
        e.spec_cost.choose_k = lambda batch_size, source="model": 2 if len(steps) >= 12 else 0
        orig = e.runner.run

        def spy(batch, eos_ids):
            steps.append((drafter.num_tokens_run, [len(s.draft) for s in batch.seqs]))
            return orig(batch, eos_ids)

        e.runner.run = spy
        assert _tokens(llm.generate(prompts, params)) == want
        quiet = [run for run, _ in steps[:12]]  # (rows the MTP ran before each of the first 12 steps)
        if cap is None:
            assert quiet == [0] * 12  # nothing ran while K = 0
            # then every computed position at once, and one row each for the second draft token
            assert steps[12][0] == sum(len(p["prompt_token_ids"]) + 11 for p in prompts) + len(prompts)
        else:
            assert quiet[-1] > 0  # the capped rows ran while K = 0
        assert any(any(d) for _, d in steps[12:]) and e.spec_accepted > 0


def _dormant_run(llm, prompts, params):
    """Generate with cost control made to choose K = 0 in quiet stretches of 6 steps while two sequences
    run (drafting hopeless), then K = 2 once one has finished; returns the outputs and per step (rows
    skipped by the drafter, draft lengths, whole flags of the drafting sequences), and the acceptances
    cost control was given."""
    e = llm.engine
    cost, steps = e.spec_cost, []
    cost.choose_k = lambda n, source="model": 2 if n == 1 else 0
    cost.quiet_steps = lambda n, source="model": 5 if n == 2 else 0
    cost.hopeless = lambda n, source="model": n == 2
    recorded = []
    orig_obs = cost.observe_acceptance
    cost.observe_acceptance = lambda *a, **k: recorded.append(a) or orig_obs(*a, **k)
    orig = e.runner.run

    def spy(batch, eos_ids):
        steps.append((e.runner.skip_drafter, [len(s.draft) for s in batch.seqs],
                      [e.drafter.whole(s.seq) for s in batch.seqs if s.draft]))
        return orig(batch, eos_ids)

    e.runner.run = spy
    return llm.generate(prompts, params), steps, recorded


@pytest.mark.parametrize("drafter", ["mtp", "draft_model"])
def test_a_dormant_drafter_skips_quiet_steps_and_drafts_exactly_after(drafter, mtp_target, checkpoint, drafters):
    """While cost control keeps plain decoding and drafting is hopeless (no acceptance could pay), the
    drafter is not kept up to date: quiet steps followed by more quiet steps skip its catch-up, and the
    first step that asks again (here: a sequence finished inside a stretch) is a plain one it sees. When
    drafting resumes, greedy outputs still equal plain decoding's; an MTP layer, which missed those rows,
    drafts for its gapped sequence without its acceptance feeding cost control; a draft model runs the
    rows it missed from the tokens."""
    if drafter == "mtp":
        target, spec = mtp_target, {**MTP, "cost_control": True}
    else:
        target, spec = checkpoint("mixtral"), _spec(drafters["dense"], 2, cost_control=True)
    prompts = [{"prompt_token_ids": [11, 40, 250, 3, 77, 19]}, {"prompt_token_ids": [5, 6, 7, 8]}]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=11, ignore_eos=True)]
    want = _tokens(LLM(str(target), dtype="float32").generate(prompts, params))
    llm = LLM(str(target), dtype="float32", speculative_config=spec)
    got, steps, recorded = _dormant_run(llm, prompts, params)
    assert _tokens(got) == want
    skipped = [i for i, (skip, _, _) in enumerate(steps) if skip]
    assert len(skipped) >= 6 and not steps[0][0]  # (the prompts' step always reaches the drafter)
    assert any(not steps[i][0] for i in range(1, skipped[-1]))  # (each stretch's last step too)
    one = next(i for i, (_, d, _) in enumerate(steps) if len(d) == 1)  # the first step after the short one
    assert steps[one - 1][0] and not any(steps[one][1])  # its stretch was cut: a plain step first
    drafting = [w for _, d, whole in steps[one:] for w in whole]
    assert drafting and llm.engine.spec_drafted > 0
    if drafter == "mtp":
        assert not any(drafting) and not any(a[2] == "model" for a in recorded)
    else:
        assert all(drafting) and recorded


def test_mtp_on_a_checkpoint_without_one_is_refused(checkpoint):
    with pytest.raises(ValueError, match="has no multi-token-prediction layer"):
        LLM(str(checkpoint("mixtral")), dtype="float32", speculative_config=MTP)
    with pytest.raises(ValueError, match="holds no tensor of multi-token-prediction layer 0"):  # declared, not shipped
        LLM(str(checkpoint("deepseek_v3")), dtype="float32", speculative_config=MTP)
