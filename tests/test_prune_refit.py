"""``moe prune --refit``: the kept experts' down projections solved to reproduce the unpruned layers.

Against a plain torch least-squares reference built from transformers' own router and expert weights; only
the down projections change in the written files; our engine still matches transformers on the result; a
layer the refit cannot model is refused; on the default model the refit raises agreement over pruning alone.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from moe import LLM, SamplingParams
from moe.cli import app
from moe.llm import default_model_path
from moe.prune import prune_checkpoint
from moe.refit import moe_blocks, refit_checkpoint, refit_layer

from test_quant_default_model import TEXT, teacher_forced_logprobs

PROMPT = [5, 17, 33, 2, 9, 41, 17, 8, 60, 12]
PROSE = Path(__file__).parent / "data" / "prose"


def pruned(checkpoint, family: str, out: Path) -> tuple[Path, Path]:
    src = checkpoint(family)
    llm = LLM(str(src), dtype="float32", record_expert_counts=True)
    llm.generate({"prompt_token_ids": list(range(3, 60))}, SamplingParams(max_tokens=1))
    cfg = llm.engine.model_config
    prune_checkpoint(src, out, max(cfg.top_k, cfg.num_experts - 2), llm.expert_counts())
    return src, out


def test_refit_solves_a_plain_ridge_least_squares(checkpoint, tmp_path):
    """One layer refit on random inputs equals the ridge solution built by hand: targets from the unpruned
    block's own forward, features from the pruned block's own router output and per-token SwiGLU."""
    from transformers import AutoModelForCausalLM

    from moe.config import read_config_json
    from moe.models import parse_config

    src, out = pruned(checkpoint, "qwen3_moe", tmp_path / "p")  # no shared expert: the block's output is routed
    teacher = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    layer = next(iter(moe_blocks(student)))
    t_block, s_block = moe_blocks(teacher)[layer], moe_blocks(student)[layer]
    E, D, F_ = s_block.experts.down_proj.shape
    x = torch.randn(700, D, generator=torch.Generator().manual_seed(0))
    ridge = 0.05
    with torch.no_grad():
        y = t_block(x[None])[0]
        _, weights_TK, ids_TK = s_block.gate(x)
        feats = torch.zeros(len(x), E * F_)
        for t in range(len(x)):
            for w, e in zip(weights_TK[t], ids_TK[t]):
                gate, up = (s_block.experts.gate_up_proj[e] @ x[t]).chunk(2)
                feats[t, e * F_:(e + 1) * F_] = w * torch.nn.functional.silu(gate) * up
        w0 = torch.cat([s_block.experts.down_proj[e].T for e in range(E)])
        lam = ridge * float((feats.double() ** 2).sum(0).mean())
        a = torch.cat([feats.double(), lam ** 0.5 * torch.eye(E * F_, dtype=torch.float64)])
        b = torch.cat([y.double(), lam ** 0.5 * w0.double()])
        want = torch.linalg.lstsq(a, b).solution.float()  # [E * F, D]
        before_want = float(((feats @ w0 - y) ** 2).sum() / (y ** 2).sum())
        before, after = refit_layer(t_block, s_block, parse_config(read_config_json(src)).router,
                                    parse_config(read_config_json(out)).router, x, ridge, chunk=256, check=True)
    got = torch.cat([s_block.experts.down_proj[e].T for e in range(E)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert before == pytest.approx(before_want, rel=1e-4)
    assert after == pytest.approx(float(((feats @ want - y) ** 2).sum() / (y ** 2).sum()), rel=1e-3)
    assert after < before


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_refit_rewrites_only_the_down_projections_and_the_engine_still_matches_transformers(family, checkpoint,
                                                                                            tmp_path):
    """Mixtral names them w2, Qwen2-MoE has a gated shared expert (left alone), OLMoE plain."""
    from transformers import AutoModelForCausalLM

    src, out = pruned(checkpoint, family, tmp_path / "p")
    before = {n: t.clone() for f in sorted(out.glob("*.safetensors")) for n, t in load_file(f).items()}
    config = (out / "config.json").read_text()
    wins = torch.randint(3, 100, (6, 65), generator=torch.Generator().manual_seed(1))
    report = refit_checkpoint(src, out, wins)
    assert report and all(r.tokens == 6 * 65 and r.error_after < r.error_before for r in report)
    after = {n: t for f in sorted(out.glob("*.safetensors")) for n, t in load_file(f).items()}
    assert after.keys() == before.keys() and (out / "config.json").read_text() == config
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    down = {n for n in after if ".experts." in n and n.endswith((".down_proj.weight", ".w2.weight"))
            and "shared" not in n}
    assert changed == down and all(after[n].dtype == before[n].dtype for n in after)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(PROMPT):]
    got = LLM(str(out), dtype="float32").generate(
        {"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert got[0].outputs[0].token_ids == want.tolist()


def test_refit_refuses_what_it_cannot_model(checkpoint, tmp_path, monkeypatch):
    import moe.refit

    wins = torch.randint(3, 100, (2, 33))
    src, out = pruned(checkpoint, "gpt_oss", tmp_path / "g")  # a biased router, clamped interleaved experts
    with pytest.raises(ValueError, match="not a linear gate over stacked SwiGLU experts without biases"):
        refit_checkpoint(src, out, wins)
    src, out = pruned(checkpoint, "qwen3_moe", tmp_path / "q")
    files = {f: f.read_bytes() for f in out.glob("*.safetensors")}
    with pytest.raises(ValueError, match="must be > 0"):
        refit_checkpoint(src, out, wins, ridge=0)
    real = moe.refit.route
    monkeypatch.setattr(moe.refit, "route", lambda logits, cfg, bias=None: (lambda r: (r[0] * 1.5, r[1]))(
        real(logits, cfg, bias)))  # a routing that is not the model's: caught before anything is written
    with pytest.raises(ValueError, match="does not compute what refit models"):
        refit_checkpoint(src, out, wins)
    assert {f: f.read_bytes() for f in out.glob("*.safetensors")} == files


def test_moe_prune_refit_on_the_default_model_raises_agreement(tmp_path, monkeypatch):
    """Calibrate (and refit) on prose, measure on the test text: the refit keeps more of the unpruned model."""
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join((PROSE / f).read_text() for f in ("README.md", "architecture.md")))
    ref_llm = LLM(dtype="float32", max_logprobs=-1)
    ids = ref_llm.get_tokenizer().encode(TEXT)
    ref = teacher_forced_logprobs(ref_llm, ids)
    quality = {}
    for refit in (False, True):
        out = tmp_path / f"p{int(refit)}"
        args = ["prune", "--model", default_model_path(), "--keep-experts", "6", "--score", "reap", "--calibration",
                str(calib), "--eval-windows", "0", "--out", str(out), "--json"] + ["--refit"] * refit
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        summary = json.loads(res.stdout)
        got = teacher_forced_logprobs(LLM(str(out), dtype="float32", max_logprobs=-1), ids)
        quality[refit] = (float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
                          float((ref.exp() * (ref - got)).sum(-1).mean()))
        assert (summary["refit"] is not None) == refit
    print(f"agreement / KL over {len(ids) - 1} positions: pruned {quality[False]}, refit {quality[True]}")
    assert all(r["error_after"] < r["error_before"] for r in summary["refit"])
    assert quality[True][1] < quality[False][1] and quality[True][0] >= quality[False][0]
    bad = CliRunner().invoke(app, ["prune", "--model", default_model_path(), "--keep-experts", "6", "--calibration",
                                   str(PROSE / "ABOUT"), "--refit", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "fewer than one 256-token window" in bad.output
    ridge = CliRunner().invoke(app, ["prune", "--model", default_model_path(), "--keep-experts", "6", "--calibration",
                                     str(calib), "--refit", "--refit-ridge", "0", "--out", str(tmp_path / "y")])
    assert ridge.exit_code == 2 and "--refit-ridge 0.0: must be > 0" in ridge.output
    assert not (tmp_path / "y").exists()  # refused before anything was written
    import moe.refit

    real = moe.refit.route
    monkeypatch.setattr(moe.refit, "route", lambda logits, cfg, bias=None: (lambda r: (r[0] * 1.5, r[1]))(
        real(logits, cfg, bias)))  # a refit that declines after pruning: the user is told what the output holds
    declined = CliRunner().invoke(app, ["prune", "--model", default_model_path(), "--keep-experts", "6",
                                        "--calibration", str(calib), "--refit", "--out", str(tmp_path / "z")])
    assert declined.exit_code == 2 and "does not compute what refit models" in declined.output
    assert f"{tmp_path / 'z'} holds the pruned checkpoint, not refit" in declined.output
