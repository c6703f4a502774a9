"""Unit tests of moe/models/rope.py: YaRN and the other rope types against transformers."""
from __future__ import annotations

import pytest
import torch


def _hf_yarn_configs():
    from transformers import DeepseekV3Config, GptOssConfig, Qwen3MoeConfig

    return {
        "gpt_oss_no_truncate": GptOssConfig(
            hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}),
        "deepseek_mscale": DeepseekV3Config(
            hidden_size=64, num_attention_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 0.707, "mscale_all_dim": 1.0}),
        "qwen_yarn_defaults": Qwen3MoeConfig(
            hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=4096,
            rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 8.0,
                             "original_max_position_embeddings": 512}),
        "explicit_attention_factor": Qwen3MoeConfig(
            hidden_size=128, num_attention_heads=4, head_dim=64, max_position_embeddings=4096,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "attention_factor": 1.3,
                             "beta_fast": 16, "beta_slow": 2, "original_max_position_embeddings": 2048}),
    }


@pytest.mark.parametrize("name", ["gpt_oss_no_truncate", "deepseek_mscale", "qwen_yarn_defaults",
                                  "explicit_attention_factor"])
def test_yarn_inverse_frequencies_match_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moe.config import rope_parameters
    from moe.models.rope import rope_inv_freq

    cfg = _hf_yarn_configs()[name]
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    hf = cfg.to_dict()
    dim = hf.get("qk_rope_head_dim") or hf["head_dim"]
    inv, factor = rope_inv_freq(dim, rope_parameters(hf), hf["max_position_embeddings"])
    assert inv.shape == hf_inv.shape
    torch.testing.assert_close(inv, hf_inv.float(), atol=0, rtol=1e-6)
    assert factor == pytest.approx(float(hf_factor), rel=1e-6)


def test_default_and_linear_rope_and_unknown_type():
    from moe.models.rope import rope_inv_freq

    inv, f = rope_inv_freq(8, {"rope_theta": 10000.0}, 128)
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.1, 0.01, 0.001]))
    assert f == 1.0
    inv2, _ = rope_inv_freq(8, {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}, 128)
    torch.testing.assert_close(inv2, inv / 4)
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        rope_inv_freq(8, {"rope_type": "dynamic", "factor": 2.0}, 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norms", [False, True])
def test_positions_past_the_tables_grow_them_and_rotate_as_positions_within(dtype, norms):
    # the C rotations check every position against the tables' rows (nothing written past them) and
    # the rotary grows its tables then: rows at positions past the first tables rotate as the
    # reference rotates them at those positions, q and k of one qkv row alike
    import cpu_kernels
    from cpu_kernels.elementwise import PositionPastTable, rope_reference
    from moe.models.layers import RMSNorm
    from moe.models.rope import RotaryEmbedding

    rot = RotaryEmbedding(16, 64, {"rope_theta": 10000.0})
    first = rot.max_pos
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([3, first - 1, first, 3 * first + 5])
    qkv = torch.randn(4, 6, 16, generator=g).to(dtype)  # 4 q heads, 2 k heads
    x = qkv.clone()
    if cpu_kernels.load() is not None:  # the kernel leaves x untouched past the tables
        with pytest.raises(PositionPastTable):
            cpu_kernels.rope_(x, positions, rot.cos, rot.sin, False)
        assert torch.equal(x, qkv)
    qn, kn = RMSNorm(16, 1e-6, dtype), RMSNorm(16, 1e-6, dtype)
    qn.weight.data.uniform_(0.5, 1.5, generator=g)
    kn.weight.data.uniform_(0.5, 1.5, generator=g)
    q, k = rot.rotate_pair_(positions, x[:, :4], x[:, 4:], (qn, kn) if norms else None)
    assert rot.max_pos > 3 * first + 5
    want = qkv.clone()
    if norms:
        want = torch.cat([qn(want[:, :4].contiguous()), kn(want[:, 4:].contiguous())], dim=1)
    want = rope_reference(want, positions, rot.cos, rot.sin, False)
    torch.testing.assert_close(torch.cat([q, k], dim=1), want, atol=0, rtol=0)
    fresh = RotaryEmbedding(16, 64, {"rope_theta": 10000.0})  # one-tensor rotation grows the same way
    torch.testing.assert_close(fresh.rotate_(positions, qkv.clone()), rope_reference(qkv, positions, rot.cos,
                                                                                      rot.sin, False),
                               atol=0, rtol=0)
