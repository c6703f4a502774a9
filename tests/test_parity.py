"""Greedy parity with transformers, float32, for every supported family: generated tokens must be
identical and every returned log-prob within 1e-3 of transformers' log-softmax of its logits."""
from __future__ import annotations

import pytest
import torch

from moe import LLM, SamplingParams
from tiny_models import FAMILIES

# The models are tiny: one intra-op thread is fastest, and far faster on a shared, busy machine.

TOL = 1e-3
N_SINGLE = 32
N_BATCH = 20
BATCH_LENGTHS = (3, 9, 17, 30)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n,), generator=g).tolist()  # 0-2 are pad/bos/eos


SINGLE_PROMPT = _prompt(11, 1000)
BATCH_PROMPTS = [_prompt(n, 2000 + n) for n in BATCH_LENGTHS]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def path(family, checkpoint):
    return checkpoint(family)


@pytest.fixture(scope="module")
def hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_greedy(hf):
    """``hf_greedy(prompt, n) -> (tokens, logprobs [n, V])``: transformers' greedy generate, cached."""
    return _greedy_runner(hf)


def _greedy_runner(hf):
    cache: dict = {}

    def run(prompt: list[int], n: int):
        key = (tuple(prompt), n)
        if key not in cache:
            from transformers import GenerationConfig

            gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                                  bos_token_id=None)
            with torch.no_grad():
                g = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                generation_config=gc, output_logits=True, return_dict_in_generate=True)
            tokens = g.sequences[0, len(prompt):].tolist()
            assert len(tokens) == n, "transformers stopped early: the reference must run all n steps"
            cache[key] = tokens, torch.stack(g.logits)[:, 0].float().log_softmax(-1)
        return cache[key]

    return run


@pytest.fixture(scope="module")
def llm(path):
    return LLM(str(path), dtype="float32", block_size=4)


@pytest.fixture(scope="module")
def llm_chunked(path):
    """Block size 8 and a 16-token budget: long prompts are prefilled in chunks next to decodes."""
    return LLM(str(path), dtype="float32", block_size=8, max_num_batched_tokens=16)


def _check_top_logprobs(entry: dict[int, float], actual: int, ref_V: torch.Tensor, n: int, where: str) -> None:
    """``entry`` holds the actual token and the top ``n``; values within TOL of the reference."""
    assert actual in entry, f"{where}: the actual token {actual} is missing"
    assert n <= len(entry) <= n + 1, f"{where}: {len(entry)} entries for top-{n}"
    for t, v in entry.items():
        assert abs(v - ref_V[t].item()) <= TOL, f"{where}: token {t}: {v} vs transformers {ref_V[t].item()}"
    top = ref_V.topk(n + 1).values
    nth, next_ = top[n - 1].item(), top[n].item()
    for t in entry:
        if t != actual:  # every other entry really is among the top n (up to the tolerance)
            assert ref_V[t].item() >= nth - TOL, f"{where}: token {t} is not in transformers' top {n}"
    for t in ref_V.topk(n).indices.tolist():
        if ref_V[t].item() > next_ + TOL:  # clearly in the top n: must be returned
            assert t in entry, f"{where}: transformers' top-{n} token {t} is missing"


def _check_against_hf(out, prompt: list[int], n: int, hf_greedy, k: int, where: str) -> None:
    ref_tokens, ref_lp = hf_greedy(prompt, n)
    comp = out.outputs[0]
    assert out.error is None
    assert comp.token_ids == ref_tokens, f"{where}: tokens differ from transformers"
    assert comp.finish_reason == "length"
    assert len(comp.logprobs) == n
    for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        _check_top_logprobs(entry, tok, ref_lp[i], k, f"{where} step {i}")


def test_single_prompt_greedy_tokens_and_logprobs_match_transformers(family, llm, hf_greedy):
    sp = SamplingParams(temperature=0, max_tokens=N_SINGLE, logprobs=5, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": SINGLE_PROMPT}, sp)[0]
    assert out.prompt_token_ids == SINGLE_PROMPT
    _check_against_hf(out, SINGLE_PROMPT, N_SINGLE, hf_greedy, 5, family)


@pytest.mark.parametrize("engine", ["block4", "block8_chunked"])
def test_mixed_length_batch_matches_transformers_run_per_prompt(family, engine, llm, llm_chunked, hf_greedy):
    target = llm if engine == "block4" else llm_chunked
    sp = SamplingParams(temperature=0, max_tokens=N_BATCH, logprobs=5, ignore_eos=True)
    outs = target.generate([{"prompt_token_ids": p} for p in BATCH_PROMPTS], sp)
    assert [o.prompt_token_ids for o in outs] == BATCH_PROMPTS
    for prompt, out in zip(BATCH_PROMPTS, outs):
        _check_against_hf(out, prompt, N_BATCH, hf_greedy, 5, f"{family}/{engine} prompt of {len(prompt)}")


@pytest.mark.parametrize("budget", [None, 8])
def test_prompt_logprobs_match_transformers_forward(family, path, budget, llm, hf, hf_greedy):
    # the 30-token prompt: in one step at the default budget, with budget 8 its prefill runs in 4 chunks
    prompt = BATCH_PROMPTS[-1]
    target = llm if budget is None else LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=budget)
    sp = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3, ignore_eos=True)
    out = target.generate({"prompt_token_ids": prompt}, sp)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt)
    assert plp[0] is None
    for j in range(1, len(prompt)):
        _check_top_logprobs(plp[j], prompt[j], ref[j - 1], 3, f"{family} budget {budget} prompt position {j}")
    assert out.outputs[0].token_ids == hf_greedy(prompt, N_BATCH)[0][:3]
    # no sampled log-probs were asked for
    assert out.outputs[0].logprobs is None


def test_prompt_logprobs_of_a_batch_with_chunked_prefill(family, llm_chunked, hf):
    """Several prompts wanting prompt log-probs in one call, prefilled in chunks side by side."""
    sp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2, ignore_eos=True)
    outs = llm_chunked.generate([{"prompt_token_ids": p} for p in BATCH_PROMPTS[1:]], sp)
    for prompt, out in zip(BATCH_PROMPTS[1:], outs):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for j in range(1, len(prompt)):
            _check_top_logprobs(out.prompt_logprobs[j], prompt[j], ref[j - 1], 2, f"{family} len {len(prompt)} pos {j}")


def test_mla_form_follows_the_flop_count():
    # DeepSeek-V3's dims (latent 512, nope 128, rope 64, v 128): per head, the absorbed form costs
    # T*C*(nope+v) + pairs*(2C+rope), the decompressed one L*C*(nope+v) + pairs*2*192
    import types

    import moe.models.mla as mla

    dims = types.SimpleNamespace(kv_lora_rank=512, nope=128, rope_dim=64, v_dim=128, mha_min_query=17)

    def decompresses(t, prefix=0):
        return mla.MLAttention.decompresses(dims, t, prefix + t)

    assert not decompresses(16)  # the decode kernel's rows stay absorbed
    assert all(decompresses(t) for t in (17, 32, 64, 128, 2048))  # a fresh prompt: no prefix to decompress
    assert not decompresses(64, 64) and not decompresses(64, 512)  # the prefix costs more than the pairs save
    assert decompresses(128, 128) and not decompresses(128, 256)  # 16.8M < 17.3M; 33.6M > 28.9M
    assert decompresses(187, 10 ** 6) and not decompresses(186, 10 ** 6)  # long prefix: T > C(nope+v)/704


@pytest.mark.parametrize("mla_family", ["deepseek_v2", "deepseek_v3"])
def test_mla_long_prompts_in_the_decompressed_form_match_transformers(mla_family, checkpoint, monkeypatch):
    # prompt chunks MLAttention.decompresses picks attend with per-head K/V decompressed from the
    # latent cache: every chunk of 2+ rows here, so that the tiny prompts take that path — whole prompts, chunks after
    # earlier chunks (budget 8: causal with an offset) and the rest of a prompt after a prefix-cache
    # hit, next to absorbed decode rows
    import moe.models.mla as mla
    from transformers import AutoModelForCausalLM

    path = checkpoint(mla_family)
    monkeypatch.setattr(mla.MLAttention, "decompresses", lambda self, query_len, context_len: query_len >= 2)
    calls = []
    real = mla.MLAttention._attend_mha
    monkeypatch.setattr(mla.MLAttention, "_attend_mha", lambda *a: calls.append(1) or real(*a))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    hit = BATCH_PROMPTS[-1][:16] + BATCH_PROMPTS[1]  # shares 4 blocks with the 30-token prompt
    greedy = _greedy_runner(hf)
    for budget in (2048, 8):
        llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=budget)
        sp = SamplingParams(temperature=0, max_tokens=N_BATCH, logprobs=3, prompt_logprobs=2, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in BATCH_PROMPTS[1:]], sp)
        for prompt, out in zip(BATCH_PROMPTS[1:], outs):
            with torch.no_grad():
                ref = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
            for j in range(1, len(prompt)):
                _check_top_logprobs(out.prompt_logprobs[j], prompt[j], ref[j - 1], 2, f"{mla_family} {budget} pos {j}")
        sp = SamplingParams(temperature=0, max_tokens=N_BATCH, logprobs=3, ignore_eos=True)
        outs.append(llm.generate({"prompt_token_ids": hit}, sp)[0])  # (prompt log-probs would skip the cache)
        assert llm.engine.block_manager.prefix_hit_tokens == 16
        for prompt, out in zip(BATCH_PROMPTS[1:] + [hit], outs):
            _check_against_hf(out, prompt, N_BATCH, greedy, 3, f"{mla_family} budget {budget}")
    assert calls
