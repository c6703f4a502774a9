"""Calibrated int4 packing (moe/calibrate.py): awq and gptq choose codes in the same format with
less output error than round-to-nearest on the tokens an expert sees; ``moe quantize`` writes
checkpoints the engine loads; bad options are clear errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from experts.formats import get_format
from moe.calibrate import Calibration, ExpertStats, awq_scale, gptq
from moe.quantize import pack_experts, quantize_checkpoint
from tiny_models import make_checkpoint

torch.set_num_threads(1)
D, FF = 128, 192  # hidden, intermediate of the tiny expert


def activations(n: int, seed: int) -> torch.Tensor:
    """Hidden states as real models have them, what AWQ and GPTQ exploit: correlated channels (a
    fixed mixing of fewer sources) and a few large ones."""
    mixing = torch.randn(32, D, generator=torch.Generator().manual_seed(0)) / 32 ** 0.5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g) @ mixing + 0.3 * torch.randn(n, D, generator=g)
    x[:, :6] *= 12.0
    return x


def expert_out(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    g, u = (x @ w13.t()).chunk(2, dim=-1)
    return (F.silu(g) * u) @ w2.t()


@pytest.fixture(scope="module")
def expert():
    g = torch.Generator().manual_seed(3)
    w13 = torch.randn(2 * FF, D, generator=g) * 0.05
    w2 = torch.randn(D, FF, generator=g) * 0.05
    x = activations(2048, seed=1)
    st = ExpertStats()
    g_, u = (x @ w13.t()).chunk(2, dim=-1)
    st.add(x, F.silu(g_) * u)
    return w13, w2, st


@pytest.mark.parametrize("group_size, symmetric", [(32, False), (128, True)])
@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_methods_lower_expert_output_error(expert, method, group_size, symmetric):
    w13, w2, st = expert
    fmt = get_format("int4", group_size=group_size, symmetric=symmetric)
    x_test = activations(1024, seed=2)  # not the calibration tokens
    ref = expert_out(w13, w2, x_test)

    def error(cal: Calibration | None) -> float:
        q13 = fmt.dequantize(pack_experts(fmt, w13, 0, 0, "gate_up", cal))
        q2 = fmt.dequantize(pack_experts(fmt, w2, 0, 0, "down", cal))
        return float((expert_out(q13, q2, x_test) - ref).square().mean())

    cal = Calibration(method, {(0, 0): st})
    if method == "awq":
        cal.down_scales[(0, 0)] = awq_scale(fmt, w2, st)
    rtn, calibrated = error(None), error(cal)
    assert calibrated < 0.8 * rtn, (method, rtn, calibrated)


def test_gptq_codes_are_the_formats_own(expert):
    """GPTQ's packed tensors pass the format's checks and its grid: every dequantized value is a code times its
    group's scale, and with H = identity (no correlations to exploit) it is round-to-nearest."""
    w13, _, st = expert
    for sym in (True, False):
        fmt = get_format("int4", group_size=64, symmetric=sym)
        packed = gptq(fmt, w13, st.h_x)
        fmt.from_tensors(packed, tuple(w13.shape))
        rtn = fmt.quantize(w13)
        plain = gptq(fmt, w13, torch.eye(D), damp=0.0)
        for k in rtn:
            assert torch.equal(plain[k], rtn[k]), k
        assert not torch.equal(packed["qweight"], rtn["qweight"])


def test_awq_scale_is_folded_exactly(expert):
    """awq divides up's rows by s and multiplies down's columns by s: in float the expert is unchanged."""
    w13, w2, st = expert
    fmt = get_format("int4", group_size=32)
    s = awq_scale(fmt, w2, st)
    assert not torch.allclose(s, torch.ones_like(s))  # the outlier channels got a scale
    w13s = w13.clone()
    w13s[FF:] /= s[:, None]
    x = activations(64, seed=5)
    torch.testing.assert_close(expert_out(w13s, w2 * s, x), expert_out(w13, w2, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family, method", [
    ("mixtral", "awq"), ("mixtral", "gptq"),
    ("gpt_oss", "gptq"),  # stacked experts, biases, clamped SwiGLU (awq: clipping only)
    ("deepseek_v3", "awq"),  # a dense first layer, a shared expert
])
def test_calibrated_checkpoint_loads_and_generates(tmp_path, family, method):
    from moe import LLM, SamplingParams

    src = make_checkpoint(family, tmp_path / "src")
    prompts = [torch.randint(3, 320, (64,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(4)]
    fmt = get_format("int4", group_size=32, symmetric=False)
    quantize_checkpoint(src, tmp_path / "q", fmt, method=method, calibration=prompts)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["calibration"] == {"method": method, "tokens": 256} and qc["format"] == "int4"
    rtn = tmp_path / "rtn"
    quantize_checkpoint(src, rtn, fmt)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "q" / "model-00001.safetensors"), "pt") as a, \
            safe_open(str(rtn / "model-00001.safetensors"), "pt") as b:
        names = [n for n in a.keys() if n.endswith("qweight")]
        assert names and any(not torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in names)
    out = LLM(str(tmp_path / "q"), dtype="float32", kv_cache_memory=1 << 20).generate(
        [{"prompt_token_ids": prompts[0][:16]}], SamplingParams(max_tokens=8, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 8


def test_bad_method_options(tmp_path):
    src = make_checkpoint("mixtral", tmp_path / "src")
    fmt = get_format("int4")
    with pytest.raises(ValueError, match="needs a calibration text"):
        quantize_checkpoint(src, tmp_path / "a", fmt, method="gptq")
    with pytest.raises(ValueError, match="uses none"):
        quantize_checkpoint(src, tmp_path / "b", fmt, calibration=[[1, 2, 3]])
    with pytest.raises(ValueError, match="unknown"):
        quantize_checkpoint(src, tmp_path / "c", fmt, method="smoothquant", calibration=[[1, 2, 3]])
    with pytest.raises(ValueError, match="group-wise formats"):
        quantize_checkpoint(src, tmp_path / "d", get_format("mxfp4"), method="gptq", calibration=[[1, 2, 3]])


def test_cli_quantize_with_calibration(tmp_path):
    from typer.testing import CliRunner

    from moe.cli import app
    from moe.llm import default_model_path

    src = default_model_path()  # the text is tokenized with the model's tokenizer
    text = tmp_path / "calib.txt"
    text.write_text("The module defines the following functions.\n\nEach returns a new object.\n" * 20)
    runner = CliRunner()
    r = runner.invoke(app, ["quantize", "--model", str(src), "--format", "int4", "--calibration", str(text),
                            "--calibration-window", "64", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["calibration"]["method"] == "gptq" and qc["calibration"]["tokens"] > 64  # gptq: the default with text
    assert (qc["group_size"], qc["symmetric"]) == (32, False)  # int4's defaults (experts.formats.DEFAULT_OPTIONS)
    r = runner.invoke(app, ["quantize", "--model", str(src), "--format", "int8", "--out", str(tmp_path / "q8")])
    qc = json.loads((tmp_path / "q8" / "config.json").read_text())["quantization_config"]
    assert r.exit_code == 0 and (qc["group_size"], qc["symmetric"]) == (128, True) and "calibration" not in qc
    r = runner.invoke(app, ["quantize", "--model", str(src), "--format", "int4", "--method", "awq",
                            "--out", str(tmp_path / "q2")])
    assert r.exit_code == 2 and "needs a calibration text" in r.output
    r = runner.invoke(app, ["quantize", "--model", str(src), "--format", "mxfp4", "--group-size", "32",
                            "--out", str(tmp_path / "q3")])
    assert r.exit_code == 2 and "--group-size applies to int8/int4 only" in r.output
