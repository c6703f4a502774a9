"""Bad input fails early with a clear error that names the problem; a bad request in a batch
fails alone, and the engine keeps working."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from moe import LLM, SamplingParams
from moe.models import SUPPORTED_ARCHITECTURES


FAMILY = "mixtral"


@pytest.fixture(scope="module")
def path(checkpoint) -> Path:
    return checkpoint(FAMILY)


@pytest.fixture
def copy(path, tmp_path):
    """A fresh, editable copy of the checkpoint."""
    d = tmp_path / "ckpt"
    shutil.copytree(path, d)
    return d


@pytest.fixture(scope="module")
def llm(path) -> LLM:
    return LLM(str(path), dtype="float32", block_size=4)


_DELETE = object()


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _load(d: Path, **kw) -> LLM:
    return LLM(str(d), dtype="float32", block_size=4, kv_cache_memory="1MiB", **kw)


# ---- the checkpoint -----------------------------------------------------------------------------


def test_missing_model_dir(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        LLM(str(missing))
    assert str(missing) in str(e.value)


def test_dir_without_config_json(copy):
    (copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json") as e:
        _load(copy)
    assert str(copy) in str(e.value)


def test_config_json_that_is_not_json(copy):
    (copy / "config.json").write_text('{"architectures": ["MixtralForCausalLM"], ')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        _load(copy)


def test_dir_without_safetensors(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        _load(copy)


@pytest.mark.parametrize("keep", [0.6, 0.02])  # data cut short; header cut short
def test_truncated_safetensors(copy, keep):
    f = copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        _load(copy)
    assert "model.safetensors" in str(e.value)


def test_corrupt_safetensors_header(copy):
    f = copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00garbage, not a json header!!!\xff"
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        _load(copy)
    assert "model.safetensors" in str(e.value)


def test_index_listing_a_missing_shard(copy):
    from safetensors import safe_open

    with safe_open(str(copy / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors") as e:
        _load(copy)
    assert "missing" in str(e.value)


def test_index_that_is_not_an_index(copy):
    (copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        _load(copy)


def test_unknown_architecture_lists_the_supported_ones(copy):
    _edit_config(copy, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ValueError, match="unsupported architecture") as e:
        _load(copy)
    msg = str(e.value)
    assert "LlamaForCausalLM" in msg
    assert len(SUPPORTED_ARCHITECTURES) == 7
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in msg


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
                                   "num_local_experts", "num_experts_per_tok", "intermediate_size"])
def test_config_missing_a_required_field(copy, field):
    _edit_config(copy, **{field: _DELETE})
    with pytest.raises(ValueError, match=f"lacks the field '{field}'"):
        _load(copy)


def test_config_from_another_model_names_the_mismatched_tensor(copy):
    _edit_config(copy, intermediate_size=64)  # the experts in the file are 96 wide
    with pytest.raises(ValueError, match=r"experts\.\d+\.w[123]\.weight in model\.safetensors") as e:
        _load(copy)
    assert "96" in str(e.value) and "64" in str(e.value)


def test_checkpoint_lacking_a_tensor(copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(copy / "model.safetensors"))
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 tensor") as e:
        _load(copy)
    assert "layers.1.self_attn.o_proj.weight" in str(e.value)


@pytest.mark.parametrize("kw, match", [
    (dict(dtype="float8"), "dtype='float8' is not supported"),
    (dict(block_size=3), "block_size=3 must be a power of two"),
    (dict(max_num_seqs=0), "max_num_seqs=0"),
    (dict(max_model_len=1000), "max_model_len=1000 exceeds the model's max_position_embeddings"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens=0"),
    (dict(kv_cache_memory="lots"), "cannot read 'lots' as a size"),
    (dict(kv_cache_memory=100), "smaller than one KV block"),
    (dict(experts_backend="cuda-magic"), "experts_backend='cuda-magic'"),
])
def test_bad_engine_options(path, kw, match):
    kw = {"dtype": "float32", **kw}
    with pytest.raises(ValueError, match=match):
        LLM(str(path), **kw)


def test_unknown_engine_option_is_named_with_the_valid_ones(path):
    # LLM passes its keyword arguments to EngineConfig: a typo fails before anything loads
    with pytest.raises(TypeError, match=r"'max_num_seq' is not an engine option \(did you mean 'max_num_seqs'\?\)") \
            as e:
        LLM(str(path), max_num_seq=4)
    assert "block_size" in str(e.value) and "warmup" in str(e.value)
    with pytest.raises(TypeError, match="'colour' is not an engine option: the options are dtype, "):
        LLM(str(path), colour="blue")


# ---- sampling parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("kw, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=9, max_tokens=8), "min_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=-2), "prompt_logprobs"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(stop_token_ids=[3, -1]), "stop_token_ids"),
])
def test_bad_sampling_params_raise_on_construction(kw, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**kw)


def test_good_sampling_params_edge_values():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=1.0, max_tokens=1, min_tokens=1, logprobs=0,
                   stop="x", stop_token_ids=[0])
    SamplingParams(max_tokens=None, min_tokens=100)


# ---- requests -----------------------------------------------------------------------------------

BAD_PROMPTS = {
    "empty": ({"prompt_token_ids": []}, "the prompt is empty"),
    "too_long": ({"prompt_token_ids": [5] * 300}, "the prompt has 300 tokens but max_model_len is 256"),
    "exactly_max_model_len": ({"prompt_token_ids": [5] * 256}, "the prompt has 256 tokens but max_model_len is 256"),
    "id_equal_to_vocab": ({"prompt_token_ids": [5, 320, 7]},
                          r"token id\(s\) \[320\] are outside the vocabulary \[0, 320\)"),
    "negative_id": ({"prompt_token_ids": [-1, 4]}, r"\[-1\] are outside the vocabulary"),
    "non_integer_id": ({"prompt_token_ids": [4, 2.5]}, r"must be integers, got \[2.5\]"),
    "text_without_tokenizer": ("hello there", "no tokenizer.json"),
    "dict_without_prompt": ({"text": "hi"}, "needs 'prompt' or 'prompt_token_ids'"),
    "not_a_prompt": (12345, "a prompt must be a string"),
}


@pytest.mark.parametrize("name", list(BAD_PROMPTS))
def test_bad_prompt_is_rejected_by_add_request_with_a_clear_message(llm, name):
    prompt, match = BAD_PROMPTS[name]
    before = dict(llm.engine.seqs)
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request(prompt, SamplingParams(max_tokens=4))
    assert llm.engine.seqs == before and not llm.engine.has_unfinished_requests()


def test_request_that_cannot_fit_in_the_kv_cache(path):
    small = LLM(str(path), dtype="float32", block_size=4, kv_cache_memory=LLM(
        str(path), dtype="float32", block_size=4, kv_cache_memory="1MiB").engine.kv_bytes_per_token() * 64)
    assert small.engine.kv_cache_tokens == 64
    out = small.generate({"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=100))[0]
    assert out.error is not None and "kv_cache_memory" in out.error and out.outputs[0].finish_reason == "error"
    ok = small.generate({"prompt_token_ids": [5] * 10}, SamplingParams(temperature=0, max_tokens=54,
                                                                         ignore_eos=True))[0]
    assert ok.error is None and len(ok.outputs[0].token_ids) == 54  # exactly fills the cache


def test_wrong_number_of_sampling_params(llm):
    with pytest.raises(ValueError, match="got 2 sampling_params for 3 prompts"):
        llm.generate([{"prompt_token_ids": [5]}] * 3, [SamplingParams(), SamplingParams()])


def test_bad_and_good_prompts_mixed_in_one_call(llm):
    good = [{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": list(range(40, 61))},
            {"prompt_token_ids": [300]}]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    alone = [llm.generate(g, sp)[0] for g in good]
    names = list(BAD_PROMPTS)
    prompts = [good[0], BAD_PROMPTS[names[0]][0], BAD_PROMPTS[names[1]][0], good[1]] + \
        [BAD_PROMPTS[n][0] for n in names[2:]] + [good[2]]
    outs = llm.generate(prompts, sp)
    assert len(outs) == len(prompts)
    good_idx = [0, 3, len(prompts) - 1]
    for i, out in enumerate(outs):
        if i in good_idx:
            want = alone[good_idx.index(i)]
            assert out.error is None
            assert out.outputs[0].token_ids == want.outputs[0].token_ids
            assert out.outputs[0].finish_reason == "length"
            for a, b in zip(out.outputs[0].logprobs, want.outputs[0].logprobs):
                assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
        else:
            name = names[[1, 2].index(i) if i in (1, 2) else i - 2]
            assert out.finished
            assert out.error is not None and out.outputs[0].finish_reason == "error", name
            assert re.search(BAD_PROMPTS[name][1], out.error), (name, out.error)
            assert out.outputs[0].token_ids == []
    # the same engine keeps working, and streaming reports bad requests too
    later = llm.generate(good[1], sp)[0]
    assert later.outputs[0].token_ids == alone[1].outputs[0].token_ids
    streamed = list(llm.generate_stream([BAD_PROMPTS["empty"][0], good[0]], sp))
    errors = [o for o in streamed if o.error is not None]
    assert len(errors) == 1 and errors[0].finished and errors[0].outputs[0].finish_reason == "error"
    final = [o for o in streamed if o.error is None and o.finished]
    assert len(final) == 1 and final[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    e = llm.engine
    assert not e.has_unfinished_requests() and e.block_manager.num_free_blocks == e.block_manager.num_blocks
