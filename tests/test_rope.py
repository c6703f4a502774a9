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
