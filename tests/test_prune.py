"""Expert pruning: the most-used experts are kept, the checkpoint stays a Hugging Face one that
transformers loads, our engine matches transformers on it, and quality on the default model."""
import json

import pytest
import torch
from typer.testing import CliRunner

from moe import LLM, SamplingParams
from moe.cli import app
from moe.llm import default_model_path
from moe.prune import choose_experts, prune_checkpoint

from test_quant_default_model import TEXT, teacher_forced_logprobs

PROMPT = [5, 17, 33, 2, 9, 41, 17, 8, 60, 12]


def test_choose_experts_keeps_the_most_routed_ties_to_lower_ids():
    counts = torch.tensor([[5, 0, 9, 9, 1], [1, 1, 1, 1, 1]])
    assert choose_experts(counts, 3) == [[0, 2, 3], [0, 1, 2]]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "olmoe"])
def test_pruned_checkpoint_loads_in_transformers_and_matches_it(family, checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    src = checkpoint(family)
    llm = LLM(str(src), dtype="float32", record_expert_counts=True)
    llm.generate({"prompt_token_ids": list(range(3, 60))}, SamplingParams(max_tokens=1))
    counts = llm.expert_counts()
    E, top_k = llm.engine.model_config.num_experts, llm.engine.model_config.top_k
    keep = max(top_k, E - 2)
    report = prune_checkpoint(src, tmp_path / "pruned", keep, counts)
    assert report.bytes_out < report.bytes_in and report.tensors_dropped >= 0
    for layer, kept in report.kept.items():
        assert kept == choose_experts(counts, keep)[list(report.kept).index(layer)]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"), dtype=torch.float32).eval()
    assert getattr(hf.config, "num_local_experts", None) == keep or getattr(hf.config, "num_experts", None) == keep \
        or getattr(hf.config, "n_routed_experts", None) == keep
    # the kept experts' weights are the source's, renumbered
    src_hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    layer, kept = next(iter(report.kept.items()))
    a, b = dict(src_hf.named_parameters()), dict(hf.named_parameters())
    router = [n for n in b if n.startswith(f"model.layers.{layer}.") and n.endswith(("gate.weight", "router.weight"))
              and "shared" not in n]
    assert router and torch.equal(b[router[0]], a[router[0]][kept])
    with torch.no_grad():
        want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(PROMPT):]
    got = LLM(str(tmp_path / "pruned"), dtype="float32").generate(
        {"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert got[0].outputs[0].token_ids == want.tolist()


def test_bad_prune_requests_are_named(checkpoint, tmp_path):
    src = checkpoint("mixtral")  # 4 experts, top-2, 3 MoE layers
    counts = torch.ones(3, 4)
    with pytest.raises(ValueError, match="choose from 2 .experts per token. to 3"):
        prune_checkpoint(src, tmp_path / "a", 4, counts)
    with pytest.raises(ValueError, match="choose from 2"):
        prune_checkpoint(src, tmp_path / "b", 1, counts)
    with pytest.raises(ValueError, match=r"expert counts of shape \(2, 4\), expected \(3, 4\)"):
        prune_checkpoint(src, tmp_path / "c", 3, torch.ones(2, 4))
    with pytest.raises(ValueError, match="n_group"):
        prune_checkpoint(checkpoint("deepseek_v3"), tmp_path / "d", 6, torch.ones(2, 8))


def test_moe_prune_cli_on_the_default_model_and_its_quality(tmp_path):
    """Calibrate on one text, keep 6 of 8 experts, measure on the test text (teacher-forced)."""
    calib = tmp_path / "calib.txt"
    calib.write_text("The function returns a list of strings.\\n\\nEach module defines classes and functions. " * 20)
    res = CliRunner().invoke(app, ["prune", "--model", default_model_path(), "--keep-experts", "6",
                                   "--calibration", str(calib), "--out", str(tmp_path / "p6"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["keep"] == 6 and summary["bytes_out"] < summary["bytes_in"]
    assert all(len(v) == 6 for v in summary["kept_experts"].values())
    ref_llm = LLM(dtype="float32", max_logprobs=-1)
    ids = ref_llm.get_tokenizer().encode(TEXT)
    ref = teacher_forced_logprobs(ref_llm, ids)
    got = teacher_forced_logprobs(LLM(str(tmp_path / "p6"), dtype="float32", max_logprobs=-1), ids)
    agreement = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    print(f"pruned to 6 of 8 experts: top-1 agreement {agreement:.3f}, mean KL {kl:.3f} over {len(ids) - 1} positions")
    assert agreement >= 0.85 and kl < 0.1  # measured 0.919 / 0.029: a quarter of the experts gone costs this much
    missing = CliRunner().invoke(app, ["prune", "--model", default_model_path(), "--keep-experts", "6",
                                       "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "--calibration FILE is needed" in missing.output


def hf_moe_inputs(model_dir, ids: list[int]) -> tuple[list, int]:
    """transformers' float32 Qwen3-MoE over ``ids``: each MoE block with the rows it was given, and top-k."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    inputs = {}
    blocks = [(i, layer.mlp) for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    for i, block in blocks:
        block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        hf(input_ids=torch.tensor([ids]))
    return [(block, inputs[i]) for i, block in blocks], hf.config.num_experts_per_tok


def reap_reference(model_dir, ids: list[int]) -> torch.Tensor:
    """REAP by hand on transformers' Qwen3-MoE: each MoE block's input, softmax router, top-k renormalised,
    every expert's SwiGLU output from the stacked weights; mean of weight x ||output|| over routed tokens."""
    blocks, K = hf_moe_inputs(model_dir, ids)
    rows = []
    for block, x in blocks:
        probs = torch.softmax(x @ block.gate.weight.T, dim=-1)
        w, e = probs.topk(K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        sums, counts = torch.zeros(probs.shape[1]), torch.zeros(probs.shape[1])
        for t in range(x.shape[0]):
            for k in range(K):
                gate, up = (block.experts.gate_up_proj[e[t, k]] @ x[t]).chunk(2)
                y = block.experts.down_proj[e[t, k]] @ (torch.nn.functional.silu(gate) * up)
                sums[e[t, k]] += w[t, k] * y.norm()
                counts[e[t, k]] += 1
        rows.append(sums / counts.clamp(min=1))
    return torch.stack(rows)


def test_reap_scores_equal_a_plain_torch_computation(checkpoint):
    from moe.prune import calibration_scores

    src = checkpoint("qwen3_moe")  # 8 experts top-2, layers 0 and 1 MoE
    ids = list(range(3, 70))
    scores, counts = calibration_scores(src, [{"prompt_token_ids": ids}], "reap", dtype="float32")
    want = reap_reference(src, ids)
    assert scores.shape == (2, 8) and int(counts.sum()) == 2 * 2 * len(ids)
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-6)


def recon_reference(model_dir, ids: list[int]) -> torch.Tensor:
    """The recon ranks by hand on transformers' Qwen3-MoE: each MoE block's input; for a set of experts,
    the softmax over their router logits, top-k renormalised, the weighted sum of their SwiGLU outputs
    (from the stacked weights); drop, one at a time, the expert whose absence moves that sum least from
    the full block's; rank = the step it went at, E for the top-k left."""
    blocks, K = hf_moe_inputs(model_dir, ids)
    rows = []
    for block, x in blocks:
        E = block.gate.weight.shape[0]
        gate, up = torch.einsum("efd,td->etf", block.experts.gate_up_proj, x).chunk(2, dim=-1)
        y = torch.einsum("edf,etf->etd", block.experts.down_proj, torch.nn.functional.silu(gate) * up)
        logits = x @ block.gate.weight.T

        def out(left):
            w, j = torch.softmax(logits[:, left], dim=-1).topk(K, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            e = torch.tensor(left)[j]
            return sum(w[:, k:k + 1] * y[e[:, k], torch.arange(len(x))] for k in range(K))

        full, left, ranks = out(list(range(E))), list(range(E)), torch.full((E,), float(E))
        for step in range(E - K):
            with torch.no_grad():
                errs = [float((out([e for e in left if e != c]) - full).square().sum()) for c in left]
            gone = left[errs.index(min(errs))]
            left.remove(gone)
            ranks[gone] = step
        rows.append(ranks)
    return torch.stack(rows)


def test_recon_ranks_equal_a_plain_torch_computation(checkpoint, tmp_path):
    from moe.prune import calibration_scores

    src = checkpoint("qwen3_moe")  # 8 experts top-2, layers 0 and 1 MoE
    ids = list(range(3, 70))
    ranks, counts = calibration_scores(src, [{"prompt_token_ids": ids}], "recon", dtype="float32")
    want = recon_reference(src, ids)
    assert ranks.shape == (2, 8) and int(counts.sum()) == 2 * 2 * len(ids)
    assert torch.equal(ranks, want), (ranks, want)
    assert sorted(ranks[0].tolist()) == [0, 1, 2, 3, 4, 5, 8, 8]  # six dropped in turn, the top-2 left
    # the kept set at any --keep-experts is the set the elimination left at that size
    report = prune_checkpoint(src, tmp_path / "p", 5, ranks)
    assert all(kept == sorted(e for e in range(8) if ranks[j, e] >= 3) for j, kept in enumerate(report.kept.values()))


def test_recon_refuses_hundreds_of_experts():
    from types import SimpleNamespace

    from moe.prune import RECON_MAX_EXPERTS, ReconRecorder

    layer = SimpleNamespace(router_cfg=SimpleNamespace(num_experts=RECON_MAX_EXPERTS + 1))
    with pytest.raises(ValueError, match=r"65 experts are too many \(at most 64\); use --score reap"):
        ReconRecorder([layer])


def test_prune_cli_by_reap_reports_quality_and_bad_scores_are_named(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("The function returns a list of strings.\n\nEach module defines classes and functions. " * 40)
    res = CliRunner().invoke(app, ["prune", "--model", default_model_path(), "--keep-experts", "6", "--score", "reap",
                                   "--calibration", str(calib), "--eval-windows", "2", "--out", str(tmp_path / "p"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["score"] == "reap" and all(len(v) == 6 for v in summary["kept_experts"].values())
    q = summary["quality"]
    assert q["positions"] == 2 * 256 and 0.5 < q["top1_agreement"] <= 1 and q["perplexity"] > 1
    bad = CliRunner().invoke(app, ["prune", "--model", default_model_path(), "--keep-experts", "6", "--score", "size",
                                   "--calibration", str(calib), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--score 'size': choose freq, reap or recon" in bad.output
