"""DeepSeek-V3 multi-token prediction (moe/models/mtp.py): a tiny checkpoint with an MTP layer in the
published layout loads without changing the target; a missing or misshaped MTP tensor is a clear
error naming it; the MTP head's logits, run a few tokens at a time through the paged KV cache, equal a
plain torch reference of the published architecture computed over the whole sequence at once."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvcache import AttentionMetadata
from moe import LLM, SamplingParams
from moe.config import read_config_json
from moe.loader import load_mtp
from moe.models import ForwardContext, MTPModel, parse_config
from parallel import init_single_process
from tiny_models import make_mtp_checkpoint

N = 3  # num_hidden_layers of the tiny DeepSeek-V3: its MTP layer is model.layers.3
MTP = f"model.layers.{N}."


@pytest.fixture(scope="module")
def mtp_path(tmp_path_factory) -> Path:
    return make_mtp_checkpoint(tmp_path_factory.mktemp("mtp"))


@pytest.fixture(scope="module")
def mtp_path_target_head(tmp_path_factory) -> Path:
    """No shared_head.head (the target's lm_head serves), and the layer's own embed_tokens."""
    return make_mtp_checkpoint(tmp_path_factory.mktemp("mtp_own_embed"), own_head=False, own_embed=True)


def _load(path: Path, **kw) -> MTPModel | None:
    init_single_process()
    return load_mtp(path, parse_config(read_config_json(path)), torch.float32, "cpu", **kw)


# ---- the plain torch reference ------------------------------------------------------------------

def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reference_logits(path: Path, tokens: torch.Tensor, hidden_TD: torch.Tensor) -> torch.Tensor:
    return reference(path, tokens, hidden_TD)[1]


def reference(path: Path, tokens: torch.Tensor, hidden_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out_TD, logits_TV)``. Row i: ``out`` (after shared_head.norm) and the logits of t_{i+2}, from
    t_{i+1} = ``tokens[i + 1]`` and h_i = ``hidden_TD[i]`` at position i, the whole sequence in one
    causal pass (DeepSeek-V3 report, section 2.2, embedding first in eh_proj as the published weights
    are laid out). The decoder layer is transformers' DeepseekV3 layer, fed the checkpoint's layer-N
    tensors; the MTP fusion, norms and head are written out here."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3DecoderLayer,
                                                                      DeepseekV3RotaryEmbedding)

    hf = DeepseekV3Config.from_pretrained(str(path))
    hf._attn_implementation = "eager"
    w = _tensors(path)
    own = {"enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens"}
    block = {k[len(MTP):]: v for k, v in w.items() if k.startswith(MTP) and k[len(MTP):].split(".")[0] not in own}
    E = hf.n_routed_experts
    experts = [block.pop(f"mlp.experts.{e}.{p}_proj.weight") for e in range(E) for p in ("gate", "up", "down")]
    block["mlp.experts.gate_up_proj"] = torch.stack([torch.cat(experts[3 * e: 3 * e + 2]) for e in range(E)])
    block["mlp.experts.down_proj"] = torch.stack([experts[3 * e + 2] for e in range(E)])
    layer = DeepseekV3DecoderLayer(hf, N).float().eval()
    layer.load_state_dict(block, strict=True)

    def rms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + hf.rms_norm_eps) * g

    embed = w.get(MTP + "embed_tokens.weight", w["model.embed_tokens.weight"])
    head = w.get(MTP + "shared_head.head.weight", w["lm_head.weight"])
    T = hidden_TD.shape[0]
    x = torch.cat([rms(embed[tokens[1:T + 1]], w[MTP + "enorm.weight"]), rms(hidden_TD, w[MTP + "hnorm.weight"])],
                  dim=-1) @ w[MTP + "eh_proj.weight"].T
    pos = torch.arange(T)[None]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        y = layer(x[None], attention_mask=mask, position_ids=pos,
                  position_embeddings=DeepseekV3RotaryEmbedding(hf)(x[None], pos))[0]
    out = rms(y, w[MTP + "shared_head.norm.weight"])
    return out, out @ head.T


def paged_logits(mtp: MTPModel, seqs: list[tuple[torch.Tensor, torch.Tensor]], chunks: list[int],
                 block_size: int = 4) -> list[torch.Tensor]:
    """Each sequence ``(tokens, hidden_TD)`` run in ``chunks`` rows per step, all sequences in every
    step's batch, through the paged cache with scattered blocks; its logits rows in order."""
    blocks_per_seq = -(-sum(chunks) // block_size)
    perm = torch.randperm(blocks_per_seq * len(seqs), generator=torch.Generator().manual_seed(0)).tolist()
    tables = [perm[i * blocks_per_seq:(i + 1) * blocks_per_seq] for i in range(len(seqs))]
    caches = [spec.allocate(len(perm), block_size, torch.float32, "cpu") for spec in mtp.kv_cache_spec()]
    outs: list[list[torch.Tensor]] = [[] for _ in seqs]
    done = 0
    for q in chunks:
        meta = AttentionMetadata.build([q] * len(seqs), [done + q] * len(seqs), tables, block_size)
        ids = torch.cat([tokens[1 + done: 1 + done + q] for tokens, _ in seqs])
        hidden = torch.cat([h[done: done + q] for _, h in seqs])
        positions = torch.arange(done, done + q).repeat(len(seqs))
        with torch.no_grad():
            logits = mtp.compute_logits(mtp(ids, hidden, positions, ForwardContext(meta, caches)))
        for i, rows in enumerate(logits.split(q)):
            outs[i].append(rows)
        done += q
    return [torch.cat(o) for o in outs]


def _sequence(seed: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (T + 1,), generator=g), torch.randn(T, 64, generator=g)


# ---- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("long_first_chunk", [False, True], ids=["absorbed", "decompressed-prefill"])
def test_mtp_logits_equal_the_reference(mtp_path, long_first_chunk):
    mtp = _load(mtp_path)
    attn = mtp.layers[0].self_attn
    # a first chunk long enough for MLA's decompressed form (or not), then short chunks and decodes
    first = attn.mha_min_query + 1 if long_first_chunk else 6
    assert attn.decompresses(first, first) == long_first_chunk
    chunks = [first, 3, 1, 1, 1]
    seqs = [_sequence(s, sum(chunks)) for s in (1, 2)]
    for (tokens, hidden), got in zip(seqs, paged_logits(mtp, seqs, chunks)):
        want = reference_logits(mtp_path, tokens, hidden)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mtp_uses_the_layers_embedding_and_the_targets_head(mtp_path_target_head):
    mtp = _load(mtp_path_target_head)
    assert mtp.layers[0].shared_head.head is None and mtp.lm_head is not None
    w = _tensors(mtp_path_target_head)
    torch.testing.assert_close(mtp.embed_tokens.weight, w[MTP + "embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(mtp.lm_head.weight, w["lm_head.weight"], rtol=0, atol=0)
    chunks = [5, 1, 1]
    seqs = [_sequence(3, sum(chunks))]
    got = paged_logits(mtp, seqs, chunks)[0]
    torch.testing.assert_close(got, reference_logits(mtp_path_target_head, *seqs[0]), rtol=1e-4, atol=1e-4)


def test_mtp_shares_the_loaded_targets_embedding_and_head(mtp_path, mtp_path_target_head):
    llm = LLM(str(mtp_path_target_head), dtype="float32")
    target = llm.engine.model
    shared = load_mtp(mtp_path_target_head, llm.engine.model_config, torch.float32, "cpu", target=target)
    assert shared.lm_head is target.lm_head  # no shared_head.head in this checkpoint
    assert shared.embed_tokens is not target.embed_tokens  # the layer has its own embed_tokens
    llm_own_head = LLM(str(mtp_path), dtype="float32")
    t2 = llm_own_head.engine.model
    shared2 = load_mtp(mtp_path, llm_own_head.engine.model_config, torch.float32, "cpu", target=t2)
    assert shared2.embed_tokens is t2.embed_tokens and shared2.lm_head is None
    seqs = [_sequence(4, 5)]
    torch.testing.assert_close(paged_logits(shared2, seqs, [5])[0], paged_logits(_load(mtp_path), seqs, [5])[0],
                               rtol=0, atol=0)


def test_target_is_unaffected_by_the_mtp_layer(mtp_path, checkpoint, caplog):
    """Same greedy tokens and log-probs as the same checkpoint without MTP tensors, and no warning
    about checkpoint tensors the model has no place for."""
    with caplog.at_level(logging.WARNING, logger="moe"):
        with_mtp = LLM(str(mtp_path), dtype="float32", block_size=4)
    assert not [r for r in caplog.records if "ignored" in r.getMessage()]
    assert len(with_mtp.engine.model.layers) == N
    plain = LLM(str(checkpoint("deepseek_v3")), dtype="float32", block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3)
    prompts = [{"prompt_token_ids": [5, 17, 99, 4, 250, 31]}, {"prompt_token_ids": [7, 8, 9]}]
    for a, b in zip(with_mtp.generate(prompts, params), plain.generate(prompts, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


def test_no_mtp_layers_gives_none(checkpoint, tmp_path):
    assert _load(checkpoint("mixtral")) is None
    path = tmp_path / "ds"
    shutil.copytree(checkpoint("deepseek_v3"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (path / "config.json").write_text(json.dumps(cfg))
    assert _load(path) is None


def test_declared_but_absent_mtp_layer_is_a_clear_error(checkpoint):
    # transformers writes num_nextn_predict_layers=1 but no MTP tensors, as do some exports
    assert read_config_json(checkpoint("deepseek_v3"))["num_nextn_predict_layers"] == 1
    with pytest.raises(ValueError, match=r"holds no tensor of multi-token-prediction layer 0 \(model\.layers\.3\.\*\)"):
        _load(checkpoint("deepseek_v3"))


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    shard = dst / "model-mtp.safetensors"
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name, shape", [
    ("eh_proj.weight", (64, 128)),
    ("enorm.weight", (64,)),
    ("shared_head.norm.weight", (64,)),
    ("self_attn.kv_b_proj.weight", (128, 32)),
    ("mlp.experts.5.up_proj.weight", (32, 64)),
    ("mlp.gate.e_score_correction_bias", (8,)),
])
def test_missing_mtp_tensor_is_named(mtp_path, tmp_path, name, shape):
    path = _edited(mtp_path, tmp_path / "ckpt", lambda t: t.pop(MTP + name))
    with pytest.raises(ValueError, match=rf"lacks {MTP + name} \(shape \({', '.join(map(str, shape))},?\)\)"):
        _load(path)


@pytest.mark.parametrize("name, bad", [
    ("eh_proj.weight", (64, 100)),
    ("hnorm.weight", (63,)),
    ("shared_head.head.weight", (321, 64)),
    ("self_attn.q_b_proj.weight", (96, 25)),
    ("mlp.experts.0.down_proj.weight", (64, 31)),
])
def test_misshaped_mtp_tensor_is_named_with_both_shapes(mtp_path, tmp_path, name, bad):
    want = tuple(load_file(str(mtp_path / "model-mtp.safetensors"))[MTP + name].shape)

    def edit(t: dict) -> None:
        t[MTP + name] = torch.zeros(bad)

    path = _edited(mtp_path, tmp_path / "ckpt", edit)
    with pytest.raises(ValueError) as e:
        _load(path)
    msg = str(e.value)
    assert MTP + name in msg and f"has shape {bad}" in msg and f"expected {want}" in msg


def test_mtp_on_a_non_deepseek_checkpoint_is_refused(checkpoint, tmp_path):
    path = tmp_path / "mixtral"
    shutil.copytree(checkpoint("mixtral"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM checkpoints, not MixtralForCausalLM"):
        _load(path)


def test_kv_cache_spec_is_the_targets_layout(mtp_path, checkpoint):
    llm = LLM(str(checkpoint("deepseek_v3")), dtype="float32")
    assert _load(mtp_path).kv_cache_spec() == llm.engine.model.kv_cache_spec()[:1]


def test_packed_experts_mtp_equals_the_reference_on_its_dequantized_weights(mtp_path, tmp_path):
    """A `moe quantize` output keeps the MTP layer (its experts packed like the others') and it loads
    through the target's experts plan."""
    from dataclasses import replace

    from experts.formats import Int8Weights
    from experts.quant_layer import QuantGroupedExperts
    from moe.models.quant_weights import plan_experts
    from moe.quantize import quantize_checkpoint
    from tiny_models import dequantized_copy

    fmt = Int8Weights(32)
    quantize_checkpoint(mtp_path, tmp_path / "q", fmt)
    hf = read_config_json(tmp_path / "q")
    init_single_process()
    cfg = replace(parse_config(hf), experts=plan_experts(hf))
    mtp = load_mtp(tmp_path / "q", cfg, torch.float32, "cpu")
    assert isinstance(mtp.layers[0].mlp.experts, QuantGroupedExperts)
    chunks = [5, 2, 1]
    seqs = [_sequence(5, sum(chunks))]
    got = paged_logits(mtp, seqs, chunks)[0]
    want = reference_logits(dequantized_copy(tmp_path / "q", tmp_path / "dq", fmt), *seqs[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_second_draft_step_feeds_the_mtp_output_back(mtp_path):
    """K = 2 drafts: after the rows of the target's hidden states, a draft row at the next position
    takes the first draft token and the MTP's own output as its hidden state; it attends to the cached
    rows and equals the reference over the extended sequence."""
    mtp = _load(mtp_path)
    tokens, hidden = _sequence(6, 7)
    caches = [spec.allocate(4, 4, torch.float32, "cpu") for spec in mtp.kv_cache_spec()]
    table = [[2, 0, 3]]
    with torch.no_grad():
        meta = AttentionMetadata.build([7], [7], table, 4)
        out = mtp(tokens[1:8], hidden, torch.arange(7), ForwardContext(meta, caches))
        draft = mtp.compute_logits(out[-1:]).argmax(-1)
        meta = AttentionMetadata.build([1], [8], table, 4)
        out2 = mtp(draft, out[-1:], torch.tensor([7]), ForwardContext(meta, caches))
        logits2 = mtp.compute_logits(out2)
    ref_out, _ = reference(mtp_path, tokens, hidden)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    _, ref_logits2 = reference(mtp_path, torch.cat([tokens, draft]), torch.cat([hidden, ref_out[-1:]]))
    torch.testing.assert_close(logits2, ref_logits2[-1:], rtol=1e-4, atol=1e-4)
