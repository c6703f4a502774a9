"""``moe distill`` on tiny checkpoints: the KL to the teacher falls, the output loads in transformers and in
our engine (same greedy tokens), resuming is bit-exact, recovery beats pruning alone, bad options are named."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moe import LLM, SamplingParams
from moe.cli import app
from moe.distill_data import windows, token_stream, read_documents
from moe.prune import calibration_counts, prune_checkpoint, pruned_quality
from moe.tokenizer import Tokenizer

from tiny_models import make_checkpoint

PROSE = Path(__file__).resolve().parent / "data" / "prose"  # frozen copies of docs (see ABOUT there)
EOT = "<|endoftext|>"
# --alpha 0: a random teacher's next tokens have nothing to do with the text's, so only the KL is learnt
FAST = ["--steps", "16", "--seq-len", "32", "--batch-size", "4", "--top-k", "8", "--eval-windows", "8",
        "--alpha", "0", "--save-every", "4", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Real prose: frozen copies of the project's docs, paragraphs as documents."""
    text = "\n\n".join((PROSE / f).read_text() for f in ("architecture.md", "quantization.md"))
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus) -> Path:
    """A tiny Qwen3-MoE (8 experts top-2, one dense layer) with a 320-token BPE tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    out = make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("teacher") / "t", bos_token_id=0, eos_token_id=0)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus.read_text()], trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert tok.get_vocab_size() == 320
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT, "bos_token": EOT}))
    return out


def run_distill(*args: str) -> dict:
    res = CliRunner().invoke(app, ["distill", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_draft_distillation_lowers_kl_and_loads_in_transformers_and_our_engine(teacher, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "draft"
    report = run_distill("--teacher", str(teacher), "--student", "draft", "--draft-layers", "1", "--data",
                         str(corpus), "--out", str(out), *FAST)
    before, after = report["heldout_before"], report["heldout_after"]
    assert report["finished"] and report["steps"] == 16
    assert after["kl"] < 0.9 * before["kl"], (before, after)  # measured 3.17 -> 2.76 in 16 steps
    assert report["initialised_from_teacher"] > 0  # embeddings, head, norms and layer 0 came from the teacher
    saved = json.loads((out / "training_report.json").read_text())
    assert saved["heldout_after"] == after and saved["command"].startswith("moe distill")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 1
    prompt = Tokenizer(out).encode("The engine schedules requests")
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    got = LLM(str(out), dtype="float32").generate(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert got[0].outputs[0].token_ids == want[0, len(prompt):].tolist()


def test_dense_drafter_and_resume_continue_bit_for_bit(teacher, corpus, tmp_path):
    common = ["--teacher", str(teacher), "--student", "draft", "--draft-mlp", "dense", "--draft-intermediate", "48",
              "--data", str(corpus), *FAST]
    straight = run_distill(*common, "--out", str(tmp_path / "a"))
    part = run_distill(*common, "--out", str(tmp_path / "b"), "--stop-after", "6")
    assert not part["finished"] and part["steps"] == 6 and not (tmp_path / "b" / "model.safetensors").exists()
    resumed = run_distill(*common, "--out", str(tmp_path / "b"), "--resume")
    assert resumed["heldout_after"] == straight["heldout_after"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [0] and cfg["intermediate_size"] == 48
    other = CliRunner().invoke(app, ["distill", *common, "--lr", "2e-3", "--out", str(tmp_path / "b"), "--resume"])
    assert other.exit_code == 2 and "written with other options (lr)" in other.output


def test_bf16_autocast_trains_as_float32_does_and_resumes_only_as_bf16(teacher, corpus, tmp_path):
    """--bf16 runs the forward passes under bf16 autocast (other numbers than float32's, so not a no-op)
    and learns as much (held-out KL measured 0.1377 -> 0.1066 both ways); the report and command name it; a
    float32 checkpoint does not resume as bf16."""
    common = ["--teacher", str(teacher), "--student", "draft", "--data", str(corpus), "--device", "cpu", *FAST]
    fp32 = run_distill(*common, "--out", str(tmp_path / "f"))
    bf16 = run_distill(*common, "--out", str(tmp_path / "b"), "--bf16")
    assert bf16["options"]["bf16"] and bf16["device"] == "cpu" and fp32["device"] == "cpu"
    assert "--bf16" in bf16["command"] and "--bf16 True" not in bf16["command"] and "--bf16" not in fp32["command"]
    assert (tmp_path / "f" / "model.safetensors").read_bytes() != (tmp_path / "b" / "model.safetensors").read_bytes()
    before, f, b = fp32["heldout_before"]["kl"], fp32["heldout_after"]["kl"], bf16["heldout_after"]["kl"]
    print(f"held-out KL {before:.4f} (bf16 start {bf16['heldout_before']['kl']:.4f}) -> float32 {f:.4f}, bf16 {b:.4f}")
    assert bf16["heldout_before"]["kl"] == pytest.approx(before, rel=0.02)
    assert b < 0.9 * before and b == pytest.approx(f, rel=0.05), (before, f, b)
    part = run_distill(*common, "--out", str(tmp_path / "p"), "--stop-after", "4")
    assert not part["finished"]
    other = CliRunner().invoke(app, ["distill", *common, "--bf16", "--out", str(tmp_path / "p"), "--resume"])
    assert other.exit_code == 2 and "written with other options (bf16)" in other.output


def test_defaults_follow_the_student_kind(teacher, corpus, tmp_path):
    """A drafter or MTP head learns from scratch (lr 1e-3, alpha 0.1, top-32); recovering a checkpoint
    starts at the teacher's own weights (lr 3e-4, alpha 0, top-64); given values are kept."""
    from moe.distill import DistillConfig

    def cfg(student, **kw):
        return DistillConfig(teacher=str(teacher), student=student, data=str(corpus), out=str(tmp_path),
                             seq_len=32, **kw)

    assert [(c.lr, c.alpha, c.top_k) for c in (cfg("draft"), cfg("mtp"), cfg(str(teacher)))] == [
        (1e-3, 0.1, 32), (1e-3, 0.1, 32), (3e-4, 0.0, 64)]
    assert (lambda c: (c.lr, c.alpha, c.top_k))(cfg(str(teacher), lr=1e-3, alpha=0.2, top_k=8)) == (1e-3, 0.2, 8)


def test_hard_label_teacher_is_the_teachers_first_choice(teacher, corpus, tmp_path, monkeypatch):
    import moe.distill as distill_module

    for label in ("teacher", "data"):
        seen = []
        orig = distill_module.distill_loss

        def spy(logits, labels, top, alpha, orig=orig, seen=seen):
            seen.append(torch.equal(labels, top.top1_NL.long()))
            return orig(logits, labels, top, alpha)

        monkeypatch.setattr(distill_module, "distill_loss", spy)
        fast = [a if a != "0" or FAST[i - 1] != "--alpha" else "1" for i, a in enumerate(FAST)]
        run_distill("--teacher", str(teacher), "--student", "draft", "--data", str(corpus), "--hard-label", label,
                    "--out", str(tmp_path / label), *fast)
        monkeypatch.undo()
        assert len(seen) == 16 and all(seen) == (label == "teacher") and not any(seen) == (label == "data")


def _head_logits_in_torch(teacher: Path, head_dir: Path, mlp: str, wins: torch.Tensor) -> torch.Tensor:
    """The training module (moe.distill_mtp.MTPHead) with the saved head's tensors put back by name."""
    from safetensors.torch import load_file

    from moe.distill_mtp import MTPHead

    head = MTPHead(teacher, mlp).eval()
    prefix = f"model.layers.{head.first_layer}."
    own = {"enorm.weight", "hnorm.weight", "eh_proj.weight"}
    state = {(n if n in own else "shared_head_norm.weight" if n == "shared_head.norm.weight" else "layer." + n): t
             for n, t in ((k[len(prefix):], v) for k, v in load_file(head_dir / "model.safetensors").items())}
    head.load_state_dict(state, strict=True)
    with torch.no_grad():
        return head(wins)


@pytest.mark.parametrize("mlp", ["moe", "dense"])
def test_mtp_head_distillation_lowers_kl_and_drafts_exactly_in_our_engine(teacher, corpus, tmp_path, mlp):
    """--student mtp: a DeepSeek-layout MTP layer on the teacher's hidden states; the engine loads it as
    speculative method mtp with a model, its logits equal the training module's, greedy outputs stay the same."""
    from safetensors.torch import load_file

    from moe.config import read_config_json
    from moe.loader import load_mtp
    from moe.models import ForwardContext, parse_config
    from kvcache import AttentionMetadata

    out = tmp_path / "mtp"
    report = run_distill("--teacher", str(teacher), "--student", "mtp", "--draft-mlp", mlp, "--data", str(corpus),
                         "--out", str(out), *FAST)
    before, after = report["heldout_before"], report["heldout_after"]
    assert report["finished"] and after["kl"] < 0.9 * before["kl"], (before, after)
    assert report["initialised_from_teacher"] > 0  # attention and norms from the teacher's last layer
    N = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and (N in cfg["mlp_only_layers"]) == (mlp == "dense")
    names = set(load_file(out / "model.safetensors"))
    assert all(n.startswith(f"model.layers.{N}.") for n in names)
    assert {f"model.layers.{N}.{n}.weight" for n in ("enorm", "hnorm", "eh_proj", "shared_head.norm")} <= names
    assert not any("embed_tokens" in n or "shared_head.head" in n for n in names)  # the target's serve

    # the engine's MTP layer over a window, through its paged cache, equals the training module
    spec = {"method": "mtp", "model": str(out), "num_speculative_tokens": 2, "cost_control": False}
    llm = LLM(str(teacher), dtype="float32", speculative_config=spec)
    mtp = llm.engine.drafter.model
    assert mtp.layers[0].shared_head.head is None and mtp.embed_tokens is llm.engine.model.embed_tokens
    win = windows(token_stream(read_documents(corpus), Tokenizer(teacher)), 32)[:1]
    want = _head_logits_in_torch(teacher, out, mlp, win)[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = hf.model(input_ids=win[:, :-1]).last_hidden_state[0, :-1]
    T = hidden.shape[0]
    own = load_mtp(out, parse_config(read_config_json(out)), torch.float32, "cpu", target=llm.engine.model)
    caches = [s.allocate(T // 4 + 1, 4, torch.float32, "cpu") for s in own.kv_cache_spec()]
    meta = AttentionMetadata.build([T], [T], [list(range(T // 4 + 1))], 4, "cpu")
    with torch.no_grad():
        got = own.compute_logits(own(win[0, 1:T + 1], hidden, torch.arange(T), ForwardContext(meta, caches)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    prompts = [{"prompt_token_ids": w.tolist()} for w in windows(token_stream(read_documents(corpus),
                                                                                  Tokenizer(teacher)), 12)[5:9]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = LLM(str(teacher), dtype="float32").generate(prompts, params)
    spec_out = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in spec_out] == [o.outputs[0].token_ids for o in plain]
    assert llm.engine.spec_drafted > 0
    if mlp == "moe":  # a head given to a model it was not trained for is refused, naming both sizes
        other = make_checkpoint("qwen3_moe", tmp_path / "other", vocab_size=400)
        with pytest.raises(ValueError, match="vocabulary 320, the target 64 and 400: it was trained for another"):
            LLM(str(other), dtype="float32", speculative_config=spec)


@pytest.mark.parametrize("lora,train,lr", [(0, "router+experts", "1e-3"), (4, "router+experts", "1e-3"),
                                           (0, "all", "1e-4")])
def test_recovery_raises_agreement_above_pruning_alone(teacher, corpus, tmp_path, lora, train, lr):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    tok = Tokenizer(teacher)
    wins = windows(token_stream(read_documents(corpus), tok), 32)
    counts = calibration_counts(teacher, [{"prompt_token_ids": w.tolist()} for w in wins[:16]])
    prune_checkpoint(teacher, tmp_path / "p", 4, counts)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text((PROSE / "serving.md").read_text())
    eval_wins = windows(token_stream(read_documents(heldout), tok), 32)[:32]
    pruned = pruned_quality(teacher, tmp_path / "p", eval_wins, dtype="float32")
    report = run_distill("--teacher", str(teacher), "--student", str(tmp_path / "p"), "--data", str(corpus),
                         "--eval-data", str(heldout), "--out", str(tmp_path / "r"), "--lora-rank", str(lora),
                         "--train", train, "--steps", "40", "--batch-size", "8", "--seq-len", "32", "--top-k", "8",
                         "--alpha", "0", "--lr", lr, "--eval-windows", "32")
    trained = report["trainable_parameters"]
    before, after = ({n: t for f in sorted((tmp_path / d).glob("*.safetensors")) for n, t in load_file(f).items()}
                     for d in ("p", "r"))
    frozen = [n for n in before if ".experts." not in n and not n.endswith("mlp.gate.weight")]
    assert frozen and before.keys() == after.keys()
    if train == "all":  # every weight trains: attention, norms, embeddings, LM head too
        assert trained == {"all": sum(t.numel() for t in before.values())}
        assert not any(torch.equal(before[n], after[n]) for n in frozen
                       if n.endswith(("proj.weight", "embed_tokens.weight", "lm_head.weight")))
    else:
        assert ("lora" in trained) == bool(lora) and "router" in trained and ("experts" in trained) != bool(lora)
        assert all(torch.equal(before[n], after[n]) for n in frozen)
    recovered = pruned_quality(teacher, tmp_path / "r", eval_wins, dtype="float32")
    print(f"lora {lora}, train {train}: top-1 agreement pruned {pruned['top1_agreement']:.3f} -> recovered "
          f"{recovered['top1_agreement']:.3f}; held-out KL {report['heldout_before']['kl']:.4f} -> "
          f"{report['heldout_after']['kl']:.4f}")
    assert recovered["top1_agreement"] > pruned["top1_agreement"]
    assert report["heldout_after"]["kl"] < report["heldout_before"]["kl"]
    assert AutoConfig.from_pretrained(str(tmp_path / "r")).num_experts == 4


def test_hidden_weight_matches_each_layers_output_to_the_teachers(teacher, corpus, tmp_path):
    """--hidden-weight adds each layer's output error (over the teacher's mean square) to the loss: the logged
    term is that by hand from transformers' hidden states, and the recovered layers end nearer the teacher's
    than a recovery on the KL alone from the same pruned start."""
    from transformers import AutoModelForCausalLM

    from moe.distill import hidden_match

    tok = Tokenizer(teacher)
    wins = windows(token_stream(read_documents(corpus), tok), 32)
    counts = calibration_counts(teacher, [{"prompt_token_ids": w.tolist()} for w in wins[:16]])
    prune_checkpoint(teacher, tmp_path / "p", 4, counts)
    x = wins[:8, :-1]

    def layer_error(student: Path) -> float:
        s, t = (AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32) for d in (student, teacher))
        with torch.no_grad():
            hs, ht = (m(input_ids=x, output_hidden_states=True).hidden_states for m in (s, t))
        by_hand = sum(((a - b) ** 2).sum() / (b ** 2).sum() for a, b in zip(hs[1:], ht[1:])) / (len(ht) - 1)
        assert float(hidden_match(hs, ht)) == pytest.approx(float(by_hand), rel=1e-5)
        return float(by_hand)

    fast = ["--teacher", str(teacher), "--student", str(tmp_path / "p"), "--data", str(corpus), "--steps", "30",
            "--batch-size", "8", "--seq-len", "32", "--top-k", "8", "--eval-windows", "8", "--lr", "1e-3"]
    kl_only = run_distill(*fast, "--out", str(tmp_path / "kl"))
    matched = run_distill(*fast, "--out", str(tmp_path / "h"), "--hidden-weight", "1")
    assert [len(h) for h in kl_only["loss_history_every_10"]] == [3] * 3
    assert [len(h) for h in matched["loss_history_every_10"]] == [4] * 3  # step, kl, ce, hidden
    start, plain, with_hidden = (layer_error(tmp_path / d) for d in ("p", "kl", "h"))
    print(f"layer-output error: pruned {start:.4f}, KL only {plain:.4f}, with --hidden-weight 1 {with_hidden:.4f}")
    assert with_hidden < plain and with_hidden < start
    assert matched["options"]["hidden_weight"] == 1.0 and "--hidden-weight 1.0" in matched["command"]


def test_bad_distill_options_are_named(teacher, corpus, tmp_path):
    def fails(*args: str) -> str:
        res = CliRunner().invoke(app, ["distill", *args])
        assert res.exit_code == 2, res.output
        return res.output

    base = ["--teacher", str(teacher), "--data", str(corpus), "--seq-len", "32"]
    assert "--draft-layers 3: choose from 1 to 2" in fails(*base, "--student", "draft", "--draft-layers", "3",
                                                           "--out", str(tmp_path / "a"))
    assert "--lora-rank applies to recovering" in fails(*base, "--student", "draft", "--lora-rank", "4",
                                                        "--out", str(tmp_path / "b"))
    assert "--train 'everything': choose router+experts or all" in fails(*base, "--student", "draft", "--train",
                                                                          "everything", "--out", str(tmp_path / "i"))
    assert "drop it to --train all" in fails(*base, "--student", str(teacher), "--train", "all", "--lora-rank", "4",
                                             "--out", str(tmp_path / "j"))
    assert "give 'draft', 'mtp' or a checkpoint directory" in fails(*base, "--student", "nowhere",
                                                                    "--out", str(tmp_path))
    assert "--resume: no checkpoint" in fails(*base, "--student", "draft", "--out", str(tmp_path / "c"), "--resume")
    assert "windows of 257 tokens exceed the teacher's context (256)" in fails(*base[:-2], "--student", "draft",
                                                                              "--out", str(tmp_path / "h"))
    assert "--hard-label 'gold': choose data or teacher" in fails(*base, "--student", "draft", "--hard-label", "gold",
                                                                   "--out", str(tmp_path / "m"))
    assert "--steps 0 must be at least 1" in fails(*base, "--student", "draft", "--steps", "0", "--out", "x")
    if not torch.cuda.is_available():
        assert "torch sees no CUDA GPU here" in fails(*base, "--student", "draft", "--device", "cuda",
                                                      "--out", str(tmp_path / "r"))
    assert "--device 'tpu0': not a device torch knows" in fails(*base, "--student", "draft", "--device", "tpu0",
                                                                 "--out", str(tmp_path / "t"))
    assert "no such file" in fails("--teacher", str(teacher), "--data", str(tmp_path / "none.txt"), "--seq-len", "32",
                                   "--student", "draft", "--out", str(tmp_path / "d"))
    mixtral = make_checkpoint("mixtral", tmp_path / "m")
    shutil.copy(teacher / "tokenizer.json", mixtral / "tokenizer.json")
    dense = ["--student", "draft", "--draft-mlp", "dense", "--out", str(tmp_path / "e")]
    assert "has no dense decoder layers" in fails("--teacher", str(mixtral), "--data", str(corpus), "--seq-len", "32",
                                                  *dense)
    assert "heads are built for" in fails("--teacher", str(mixtral), "--data", str(corpus), "--seq-len", "32",
                                          "--student", "mtp", "--out", str(tmp_path / "k"))
    assert "not to --student mtp" in fails(*base, "--student", "mtp", "--lora-rank", "4", "--out", str(tmp_path / "l"))
    assert "has no such layers (drop --hidden-weight)" in fails(*base, "--student", "draft", "--hidden-weight", "1",
                                                                "--out", str(tmp_path / "n"))
    assert "--hidden-weight -1.0 >= 0" in fails(*base, "--student", str(teacher), "--hidden-weight", "-1",
                                                "--out", str(tmp_path / "o"))
    shallow = make_checkpoint("qwen3_moe", tmp_path / "s", vocab_size=320, num_hidden_layers=1)
    assert "matches layers one to one, and the student has 1 against the teacher's 3" in fails(
        *base, "--student", str(shallow), "--hidden-weight", "1", "--out", str(tmp_path / "q"))
    other_vocab = make_checkpoint("qwen3_moe", tmp_path / "v", vocab_size=400)
    assert "vocabulary (400) differs from the teacher's (320)" in fails(*base, "--student", str(other_vocab),
                                                                         "--out", str(tmp_path / "f"))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x").write_text("x")
    assert "not empty" in fails(*base, "--student", "draft", "--out", str(tmp_path / "g"))


def test_the_default_models_drafter_ships_loads_and_agrees_more_than_before_distillation():
    from moe.llm import default_model_path

    drafter = Path(default_model_path()) / "drafter"
    report = json.loads((drafter / "training_report.json").read_text())
    assert report["finished"] and report["command"].startswith("moe distill --teacher moe/default_model")
    before, after = report["heldout_before"], report["heldout_after"]
    assert after["top1_agreement"] > before["top1_agreement"] and after["kl"] < before["kl"]
    llm = LLM(str(drafter), dtype="bfloat16")
    teacher_cfg = json.loads((Path(default_model_path()) / "config.json").read_text())
    assert llm.engine.model_config.vocab_size == teacher_cfg["vocab_size"]
    assert (drafter / "tokenizer.json").read_bytes() == (Path(default_model_path()) / "tokenizer.json").read_bytes()
    out = llm.generate("The module defines", SamplingParams(temperature=0, max_tokens=8))
    assert not out[0].error and len(out[0].outputs[0].token_ids) == 8


def test_the_default_models_mtp_head_ships_and_method_mtp_uses_it():
    """``speculative_config={"method": "mtp"}`` on the default model (no MTP layer of its own) takes the
    head shipped beside it; drafts are accepted and greedy outputs equal plain decoding's."""
    from moe.llm import default_model_path
    from moe.spec_decode import default_mtp_path

    head = default_mtp_path()
    report = json.loads((head / "training_report.json").read_text())
    assert report["finished"] and report["command"].startswith("moe distill --teacher moe/default_model --student mtp")
    before, after = report["heldout_before"], report["heldout_after"]
    assert after["top1_agreement"] > before["top1_agreement"] and after["kl"] < before["kl"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["The module defines", "In the standard library"]
    plain = LLM(default_model_path(), dtype="float32").generate(prompts, params)
    llm = LLM(default_model_path(), dtype="float32",
              speculative_config={"method": "mtp", "num_speculative_tokens": 2, "cost_control": False})
    assert llm.engine.drafter.model.layers[0].self_attn.num_kv_heads == 2  # the head's GQA layer
    got = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]
    assert llm.engine.spec_accepted > 0


def test_mtp_head_rows_run_as_the_captured_step_equal_the_op_path():
    """bf16 on CPU: one sequence's MTP rows run from the fused input through the captured step's C loop
    (CapturedDecode.capture_mtp) and its LM head rows in one C call; the drafts (every draft token of
    every step) and the outputs equal those of the MTP layer run op by op."""
    from moe.llm import default_model_path

    spec = {"method": "mtp", "num_speculative_tokens": 3, "cost_control": False}
    prompts = ["The module defines", "Python is a language that"]
    runs = []
    for captured in (True, False):
        llm = LLM(default_model_path(), dtype="bfloat16", speculative_config=spec)
        drafter = llm.engine.drafter
        calls = []
        if captured:
            orig_run = drafter.captured.from_hidden
            drafter.captured.from_hidden = lambda *a: calls.append(1) or orig_run(*a)
        else:
            drafter.captured = None
        drafts = []
        orig = llm.engine.proposer.propose

        def spy(seqs, rooms, orig=orig, drafts=drafts):
            out = orig(seqs, rooms)
            drafts.extend(d.tokens for d in out)
            return out

        llm.engine.proposer.propose = spy
        out = [llm.generate(p, SamplingParams(temperature=0, max_tokens=40))[0] for p in prompts]  # (batch 1)
        assert not captured or len(calls) > 20
        runs.append((drafts, [o.outputs[0].token_ids for o in out]))
    assert runs[0] == runs[1] and any(runs[0][0])


def test_token_id_data_is_read_as_it_is_and_bad_lines_are_named(tmp_path):
    """A .jsonl --data file (a teacher's own generations, for a checkpoint without a tokenizer):
    one list of token ids per line, joined in order; anything else in it is refused by line."""
    from moe.distill_data import data_stream

    good = tmp_path / "gen.jsonl"
    good.write_text("[5, 6, 7]\n\n[8, 9]\n")
    assert data_stream(good, tmp_path).tolist() == [5, 6, 7, 8, 9]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[5, 6]\n{"text": "hi"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: a .jsonl data file holds one JSON list of token ids"):
        data_stream(bad, tmp_path)
