"""Runs one scheduled batch through the model: builds the flattened inputs and attention
metadata, computes logits only for the rows that need them, samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache import AttentionMetadata

from .models import ForwardContext, MoECausalLM
from .sampler import Sampler, SampleResult, top_logprobs
from .scheduler import ScheduledBatch


@dataclass(frozen=True)
class StepResult:
    sampled: dict[int, tuple[int, dict[int, float] | None]]  # batch index -> (token, logprobs)
    prompt_logprobs: dict[int, list[dict[int, float]]]  # batch index -> entries for prompt tokens


class ModelRunner:
    def __init__(self, model: MoECausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 sampler: Sampler, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.device = device

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, eos_ids: tuple[int, ...]) -> StepResult:
        ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []  # flattened row of each sampling sequence's last token
        sample_idx: list[int] = []
        lp_rows: list[int] = []  # rows whose logits score the next prompt token
        lp_owner: list[tuple[int, int]] = []  # (batch index, prompt position predicted)
        for b, s in enumerate(batch.seqs):
            seq, start, n = s.seq, s.start, s.num_new_tokens
            base = len(ids)
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            if s.samples:
                sample_rows.append(base + n - 1)
                sample_idx.append(b)
            if seq.wants_prompt_logprobs:
                first = max(start, len(seq.prompt_logprobs) - 1)
                for p in range(first, min(start + n, seq.num_prompt_tokens - 1)):
                    lp_rows.append(base + p - start)
                    lp_owner.append((b, p + 1))
        meta = AttentionMetadata.build(
            [s.num_new_tokens for s in batch.seqs],
            [s.start + s.num_new_tokens for s in batch.seqs],
            [s.seq.block_table.blocks for s in batch.seqs],
            self.block_size, self.device)
        ctx = ForwardContext(meta, self.kv_caches)
        hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device), ctx)

        sampled: dict[int, tuple[int, dict[int, float] | None]] = {}
        if sample_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
            seqs = [batch.seqs[b].seq for b in sample_idx]
            banned = [self._banned(seq, eos_ids) for seq in seqs]
            res: SampleResult = self.sampler(logits.cpu(), [q.params for q in seqs], [q.generator for q in seqs],
                                             banned)
            for j, b in enumerate(sample_idx):
                sampled[b] = (res.token_ids[j], res.logprobs[j])
        prompt_lps: dict[int, list[dict[int, float]]] = {}
        if lp_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(lp_rows, device=self.device)]).cpu()
            lps = torch.log_softmax(logits, dim=-1)
            for j, (b, pos) in enumerate(lp_owner):
                seq = batch.seqs[b].seq
                entry = top_logprobs(lps[j], seq.token_ids[pos], seq.params.prompt_logprobs)
                prompt_lps.setdefault(b, []).append(entry)
        return StepResult(sampled, prompt_lps)

    @staticmethod
    def _banned(seq, eos_ids: tuple[int, ...]) -> list[int]:
        """Before min_tokens, EOS and stop tokens may not be drawn."""
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return []
        return list((() if p.ignore_eos else eos_ids)) + list(p.stop_token_ids or [])
