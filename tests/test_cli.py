"""The moe command line, end to end on the embedded default model."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe.cli import app
from moe.llm import default_model_path

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_default_model_is_shipped_inside_the_package():
    d = Path(default_model_path())
    assert d.parent == ROOT / "moe"
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (d / f).is_file(), f
    assert (d / "model.safetensors").stat().st_size < 30 * 2**20


def test_generate_as_a_module_in_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "moe", "generate", "The module", "--max-tokens", "12",
                          "--temperature", "0", "--no-stream"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip()
    assert text.startswith("The module") and len(text) > len("The module") + 5


def test_generate_json_greedy_is_reproducible_and_matches_the_api():
    args = ["generate", "In the", "--max-tokens", "10", "--temperature", "0", "--json"]
    a, b = runner.invoke(app, args), runner.invoke(app, args)
    assert a.exit_code == 0, a.output
    rec = json.loads(a.stdout.strip().splitlines()[-1])
    assert rec["prompt"] == "In the" and len(rec["token_ids"]) == 10 and rec["finish_reason"] == "length"
    assert a.stdout == b.stdout
    from moe import LLM, SamplingParams

    api = LLM().generate("In the", SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert api.token_ids == rec["token_ids"] and api.text == rec["text"]


def test_generate_flags_over_the_models_defaults():
    # no flag: the model's defaults (here laid over by --override-generation-config), then the command's
    base = ["generate", "In the", "--json", "--override-generation-config", '{"temperature": 0, "max_new_tokens": 7}']
    res = runner.invoke(app, base)
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    greedy = json.loads(runner.invoke(app, ["generate", "In the", "--json", "--temperature", "0", "--max-tokens",
                                            "7"]).stdout.strip().splitlines()[-1])
    assert rec["token_ids"] == greedy["token_ids"] and len(rec["token_ids"]) == 7
    res = runner.invoke(app, [*base, "--max-tokens", "3"])
    assert len(json.loads(res.stdout.strip().splitlines()[-1])["token_ids"]) == 3


def test_generate_streams_and_reports_stats():
    res = runner.invoke(app, ["generate", "import", "--max-tokens", "8", "--seed", "1", "--stats"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("import")
    assert "ttft=" in res.stderr and "throughput=" in res.stderr
    assert "expert cache" not in res.stderr


def test_generate_with_speculative_decoding_prints_the_same_text():
    args = ["generate", "The module defines", "--max-tokens", "48", "--temperature", "0", "--no-stream"]
    plain = runner.invoke(app, args)
    spec = runner.invoke(app, args + ["--speculative-tokens", "4", "--stats"])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert spec.stdout == plain.stdout
    m = re.search(r"speculative decoding: (\d+) of (\d+) draft tokens accepted", spec.stderr)
    assert m and 0 < int(m.group(1)) <= int(m.group(2)), spec.stderr


def test_generate_stats_report_the_expert_cache_when_offloading():
    res = runner.invoke(app, ["generate", "import", "--max-tokens", "8", "--temperature", "0", "--stats",
                              "--offload-experts", "--expert-cache", "1MiB", "--kv-cache-dtype", "fp8"])
    assert res.exit_code == 0, res.output
    m = re.search(r"expert cache: 1.0 MiB, hits=(\d+) misses=(\d+) hit_rate=([\d.]+)", res.stderr)
    assert m, res.stderr
    hits, misses = int(m.group(1)), int(m.group(2))
    assert misses > 0 and abs(float(m.group(3)) - hits / (hits + misses)) < 1e-3


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--model", "/nonexistent/ckpt"], "does not exist"),
    (["generate", "x", "--temperature", "-1"], "temperature"),
    (["generate", "x", "--max-tokens", "0"], "max_tokens"),
    (["info", "/nonexistent/ckpt"], "does not exist"),
    (["generate", "x", "--override-generation-config", "{temperature"], "--override-generation-config is not JSON"),
    (["generate", "x", "--override-generation-config", '{"temperature": -1}'], "SamplingParams.temperature"),
    (["generate", "x", "--generation-config", "/nonexistent"], "no generation_config.json there"),
])
def test_bad_arguments_exit_with_a_clear_message(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and message in res.stderr, (res.exit_code, res.output)


def test_engine_flags_map_onto_engine_config_fields():
    # one list of engine flags: at their defaults they build the API's default EngineConfig
    from dataclasses import replace

    from moe.cli import ENGINE_FLAGS, engine_options
    from moe.config import EngineConfig

    defaults = {name: option.default for name, (_, option) in ENGINE_FLAGS.items()}
    options = engine_options(defaults)
    cfg = EngineConfig.from_options("ckpt", **{k: v for k, v in options.items() if k != "model"})
    assert cfg == replace(EngineConfig("ckpt"), load_progress=cfg.load_progress)
    spec = engine_options({**defaults, "speculative_tokens": 3})["speculative_config"]
    assert spec == {"method": "ngram", "num_speculative_tokens": 3}


def test_serve_starts_with_the_servers_token_budget(monkeypatch):
    """vLLM's CPU defaults: 4096 tokens a step for the offline API (and moe generate), 2048 for the server;
    a flag given on the command line still wins."""
    import moe.serving.launcher as launcher
    from moe.cli import with_engine_flags
    from moe.config import EngineConfig

    seen = []
    monkeypatch.setattr(launcher, "serve", lambda engine, opts: seen.append(engine["max_num_batched_tokens"]) or 0)
    for args in ([], ["--max-num-batched-tokens", "512"]):
        res = runner.invoke(app, ["serve", "--model", "ckpt", *args])
        assert res.exit_code == 0, res.output
    assert seen == [2048, 512] and EngineConfig("ckpt").max_num_batched_tokens == 4096
    with pytest.raises(TypeError, match="not engine flags: \\['max_batch'\\]"):
        with_engine_flags(max_batch=3)(lambda engine: None)


def test_info_reports_params_and_experts():
    res = runner.invoke(app, ["info", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["experts"] >= 8 and rep["experts_per_token"] == 2
    assert 0 < rep["active_params"] < rep["total_params"]
    assert rep["weight_bytes"]["bfloat16"] == 2 * rep["total_params"]
    # packed experts: int4 (scales included) is at most 0.3x the bf16 bytes of the experts
    dense_bf16 = 2 * (rep["total_params"] - rep["routed_expert_params"])
    int4_experts = rep["weight_bytes"]["int4 experts"] - dense_bf16
    assert 0 < int4_experts <= 0.3 * 2 * rep["routed_expert_params"]
    assert rep["weight_bytes"]["int4 experts"] < rep["weight_bytes"]["int8 experts"] < rep["weight_bytes"]["bfloat16"]


def test_default_model_matches_transformers_greedy():
    """The shipped checkpoint is a standard HF checkpoint: transformers loads it and agrees."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe import LLM, SamplingParams

    llm = LLM(dtype="float32")
    ids = llm.get_tokenizer().encode("The interpreter reads")
    ours = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None)[0, len(ids):]
    assert ours[0].outputs[0].token_ids == ref.tolist()
