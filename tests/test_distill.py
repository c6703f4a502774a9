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
    other = CliRunner().invoke(app, ["distill", *common, "--lr", "1e-3", "--out", str(tmp_path / "b"), "--resume"])
    assert other.exit_code == 2 and "written with other options (lr)" in other.output


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
    assert "give 'draft' or a checkpoint directory" in fails(*base, "--student", "nowhere", "--out", str(tmp_path))
    assert "--resume: no checkpoint" in fails(*base, "--student", "draft", "--out", str(tmp_path / "c"), "--resume")
    assert "windows of 257 tokens exceed the teacher's context (256)" in fails(*base[:-2], "--student", "draft",
                                                                              "--out", str(tmp_path / "h"))
    assert "--steps 0 must be at least 1" in fails(*base, "--student", "draft", "--steps", "0", "--out", "x")
    assert "no such file" in fails("--teacher", str(teacher), "--data", str(tmp_path / "none.txt"), "--seq-len", "32",
                                   "--student", "draft", "--out", str(tmp_path / "d"))
    mixtral = make_checkpoint("mixtral", tmp_path / "m")
    shutil.copy(teacher / "tokenizer.json", mixtral / "tokenizer.json")
    dense = ["--student", "draft", "--draft-mlp", "dense", "--out", str(tmp_path / "e")]
    assert "has no dense decoder layers" in fails("--teacher", str(mixtral), "--data", str(corpus), "--seq-len", "32",
                                                  *dense)
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
