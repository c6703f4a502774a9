"""``moe quantize --all-linear``: attention, dense MLPs, shared experts and the LM head packed too
(int4 / int8; embeddings, norms, routers kept), loaded as packed linear layers
(:class:`ops.PackedLinearWeight`) and run by ``ops.linear``'s kernels.

- Greedy tokens equal transformers' (the torch reference) on the float32 weights the packed codes
  stand for, for a GQA family (Qwen3-MoE: q/k norms, a dense layer) and an MLA family
  (DeepSeek-V3: q LoRA, shared experts, a dense first layer); log-probs as our engine computes
  them on that float checkpoint.
- bf16 batch-1 decode: the one-call GQA and MLA attention stream packed projections; the dense
  MLP's and the MoE-with-shared-expert one-call paths decline packed layers; the captured step
  equals the op-by-op path.
- Bad combinations are clear errors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from experts.formats import Int4Weights, Int8Weights, WeightFormat
from moe import LLM, SamplingParams
from moe.models.quant_weights import PACKED_LINEAR
from ops import PackedLinearWeight
from tiny_models import dequantized_copy

torch.set_num_threads(1)

PROMPTS = [[5, 17, 99, 3], [200, 7], [42]]
CASES = [  # (family, format)
    ("qwen3_moe", Int4Weights(32, symmetric=False)),
    ("deepseek_v3", Int4Weights(64, symmetric=True)),
    ("deepseek_v3", Int8Weights(32, symmetric=False)),
]


def quantize_all_linear(src: Path, out: Path, fmt: WeightFormat) -> dict:
    from typer.testing import CliRunner

    from moe.cli import app

    args = ["quantize", "--model", str(src), "--format", fmt.name, "--group-size", str(fmt.group_size),
            "--out", str(out), "--all-linear", "--json"] + (["--sym"] if fmt.symmetric else ["--asym"])
    if fmt.name == "int4" and fmt.activations != "float":
        args += ["--activations", fmt.activations]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def torch_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (float32, no cache: every step recomputes the sequence)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def packed_layers(llm: LLM) -> dict[str, PackedLinearWeight]:
    return {name: m.weight for name, m in llm.engine.model.named_modules()
            if isinstance(getattr(m, "weight", None), PackedLinearWeight)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1].name}-g{c[1].group_size}")
def test_all_linear_matches_torch_reference(case, checkpoint, tmp_path):
    family, fmt = case
    src = checkpoint(family)
    out = tmp_path / "q"
    report = quantize_all_linear(src, out, fmt)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "moe_experts", **fmt.to_config(), "modules": ["experts", "linear"]}
    with safe_open(str(out / "model-00001.safetensors"), "pt") as h:
        names = set(h.keys())
    # packed: attention, dense MLP, shared expert, LM head; kept: embedding, norms, routers (and MLA's kv_b_proj)
    assert "lm_head.qweight" in names and "lm_head.weight" not in names
    dense = {"qwen3_moe": 2, "deepseek_v3": 0}[family]  # the family's dense MLP layer
    assert "model.layers.0.self_attn.o_proj.qweight" in names and f"model.layers.{dense}.mlp.down_proj.qweight" in names
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight"} <= names
    assert ("model.layers.0.self_attn.kv_b_proj.weight" in names) == (family == "deepseek_v3")
    assert report["linear_tensors"] == sum(n.endswith(".qweight") and ".experts." not in n for n in names)

    llm = LLM(str(out), dtype="float32", kv_cache_memory=1 << 20)
    packed = packed_layers(llm)
    expected = [n for n, _ in llm.engine.model.named_modules() if PACKED_LINEAR.fullmatch(n)]
    assert expected and sorted(packed) == sorted(expected)
    assert all(w.bits == (4 if fmt.name == "int4" else 8) for w in packed.values())
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    got = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp)]

    deq = dequantized_copy(out, tmp_path / "deq", fmt)
    for p, o in zip(PROMPTS, got):
        assert o.token_ids == torch_greedy(deq, p, 8)
    ref = LLM(str(deq), dtype="float32", kv_cache_memory=1 << 20)
    assert not packed_layers(ref)
    for a, b in zip(got, (o.outputs[0] for o in ref.generate([{"prompt_token_ids": p} for p in PROMPTS], sp))):
        assert a.token_ids == b.token_ids
        for da, db in zip(a.logprobs, b.logprobs):
            assert da.keys() == db.keys() and all(abs(da[t] - db[t]) < 1e-3 for t in da)


@pytest.mark.parametrize("family, fmt, one_call", [("qwen3_moe", Int4Weights(32, symmetric=False), True),
                                                   ("qwen3_moe", Int4Weights(64, activations="int8"), True),
                                                   ("qwen3_moe", Int8Weights(64, symmetric=True), True),
                                                   ("deepseek_v3", Int8Weights(32, symmetric=False), True),
                                                   ("deepseek_v3", Int4Weights(32, symmetric=False), False)],
                         ids=["qwen3_moe-int4", "qwen3_moe-int4-x8", "qwen3_moe-int8", "deepseek_v3-int8",
                              "deepseek_v3-int4"])
def test_batch1_decode_with_packed_layers_equals_op_path(family, fmt, one_call, checkpoint, tmp_path, one_calls):
    # the one-call attention (GQA and MLA) streams packed projections as ops.linear does, except
    # int4 with K not a multiple of 32 (the tiny MLA's q_b_proj, K = q_lora_rank 24: ops.linear
    # takes the torch reference there, so the one-call path declines); the one-call dense MLP and
    # MoE-with-shared-expert paths decline packed weights (op path)
    import cpu_kernels
    from moe.cpu_decode import _GqaToken, _MlaToken, _MoEToken, _OpsMlp

    if cpu_kernels.load() is None:
        pytest.skip("the C kernels are not built here (no compiler): no captured step")
    out = tmp_path / "q"
    quantize_all_linear(checkpoint(family), out, fmt)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    # the captured step runs its MlaToken / GqaToken plans (weights checked once)
    target, half = (cpu_kernels.MlaToken, _MlaToken) if family == "deepseek_v3" else (cpu_kernels.GqaToken, _GqaToken)
    calls = one_calls(target)  # whether each call ran (did not decline)
    llm = LLM(str(out), dtype="bfloat16", block_size=16)
    captured = llm.engine.runner.captured
    # Qwen3-MoE's MoE halves (routed experts only) one call each; DeepSeek-V3's have a packed shared expert
    want = [_MoEToken if hasattr(layer.mlp, "experts") and layer.mlp.shared_expert is None else _OpsMlp
            for layer in llm.engine.model.layers]
    if not one_call and _MoEToken not in want:  # no half would run as one call: no plan at all
        assert captured is None
    else:
        assert all((type(attn) is half) == one_call for attn, _ in captured.halves)
        assert [type(mlp) for _, mlp in captured.halves] == want and _OpsMlp in want
    if captured is not None:
        assert captured.head.ok  # the packed LM head of the rows in C too
    fast = [llm.generate([p], sp)[0].outputs[0] for p in prompts]  # one sequence a step: the captured step
    assert (bool(calls) and all(calls)) == one_call
    llm.engine.runner.captured = None  # every step through MoECausalLM.forward
    ops = [llm.generate([p], sp)[0].outputs[0] for p in prompts]
    for a, b in zip(fast, ops):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_all_linear_bad_combinations(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from moe.cli import app
    from moe.quantize import quantize_checkpoint

    src = checkpoint("qwen3_moe")
    runner = CliRunner()
    for fmt in ("fp8_block", "mxfp4"):
        res = runner.invoke(app, ["quantize", "--model", str(src), "--format", fmt, "--all-linear",
                                  "--out", str(tmp_path / fmt)])
        assert res.exit_code == 2 and "--all-linear packs attention" in res.output and "int4 or int8" in res.output
    res = runner.invoke(app, ["quantize", "--model", str(src), "--format", "int8", "--activations", "int8",
                              "--out", str(tmp_path / "a8")])
    assert res.exit_code == 2 and "--activations applies to int4 only" in res.output
    # a checkpoint whose metadata claims packed linear layers in a format they cannot take, or modules we do not know
    q = tmp_path / "q"
    quantize_checkpoint(src, q, Int4Weights(32), all_linear=True)
    hf = json.loads((q / "config.json").read_text())
    mxfp4 = {"quant_method": "moe_experts", "format": "mxfp4", "modules": ["experts", "linear"]}
    for i, (qc, match) in enumerate([({**hf["quantization_config"], "modules": ["experts", "attention"]},
                                      "modules=.*--all-linear"),
                                     (mxfp4, "packed linear layers are int4 or int8")]):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        for f in q.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        (bad / "config.json").write_text(json.dumps(dict(hf, quantization_config=qc)))
        with pytest.raises(ValueError, match=match):
            LLM(str(bad), dtype="float32")


def test_all_linear_warm_up_and_serving_options(checkpoint, tmp_path):
    # LLM(..., warmup=True) (what a server runs) skips the packed layers and still generates
    out = tmp_path / "q"
    quantize_all_linear(checkpoint("qwen3_moe"), out, Int4Weights(32, symmetric=False))
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    warm = LLM(str(out), dtype="bfloat16", warmup=True)
    cold = LLM(str(out), dtype="bfloat16")
    a = warm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp)
    b = cold.generate([{"prompt_token_ids": p} for p in PROMPTS], sp)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
