"""Runs one scheduled batch through the model: builds the flattened inputs and attention
metadata, computes logits only for the rows that need them, samples.

With ``data_parallel`` > 1 a rank runs only its DP group's sequences of the batch (their
K/V live in this group's caches); the MoE layers exchange tokens with the other groups. The
sampler still draws for every sampling sequence of the batch (other groups' rows with dummy
logits, their tokens discarded), so every rank's random generators (rejection sampling's) advance
exactly as in the single-process engine; the engine then gathers each group's results."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvcache import AttentionMetadata, OneRowMetadata
from ops import top_logprobs
from parallel import get_parallel_state
from parallel.dispatch import NO_STEP, DispatchStep

from .cpu_decode import CapturedDecode
from .models import ForwardContext, MoECausalLM
from .sampler import Sampler, SampleResult, logit_processing, sample_row
from .scheduler import ScheduledBatch, ScheduledSeq, partition_batch

if TYPE_CHECKING:
    from .drafter import Drafter


@dataclass(frozen=True)
class StepResult:
    # batch index -> [(token, logprobs)]: one token, or with speculation the accepted drafts plus one
    sampled: dict[int, list[tuple[int, dict[int, float] | None]]]
    prompt_logprobs: dict[int, list[dict[int, float]]]  # batch index -> entries for prompt tokens


def accept_greedy(draft: tuple[int, ...], rows: list[tuple[int, dict | None]]) -> list[tuple[int, dict | None]]:
    """Row ``j`` holds the model's greedy token after draft token ``j`` (row 0: after the last real
    token). Keep rows while they confirm the next draft token; the first disagreeing row (or the
    row after the whole draft) is the model's own next token."""
    out = []
    for j, row in enumerate(rows):
        out.append(row)
        if j >= len(draft) or row[0] != draft[j]:
            break
    return out


@dataclass(frozen=True)
class StepInputs:
    """One step's flattened inputs for this rank and where its results come from."""

    input_ids: torch.Tensor  # [T] this rank's tokens of the step
    positions: torch.Tensor  # [T]
    ctx: ForwardContext
    sample_rows: list[int]  # flattened row of each sampled row (a sequence's last token, and its drafts')
    sample_idx: list[int]  # batch index of each sampled row
    # every sampling sequence of the batch, one entry per sampled row: under data parallelism
    # other groups' rows too (dummy logits; they only advance the random generators)
    all_idx: list[int]
    lp_rows: list[int]  # rows whose logits score the next prompt token
    lp_owner: list[tuple[int, int]]  # (batch index, prompt position predicted) of each lp row
    # every row is sampled: decode tokens (and their drafts) of this rank's sequences, no prompt rows
    all_sampled: bool = False


Sampled = dict[int, list[tuple[int, dict[int, float] | None]]]  # batch index -> [(token, logprobs)]


class ModelRunner:
    # multi-step decoding (ScheduledSeq.steps): one C call runs greedy steps for at most this long, so a
    # stream's tokens come at least this often; a request that arrives ends it sooner (:attr:`wake`).
    # Batch-1 decode against one step a call (machine C, 2 threads): 25 ms gave the Mixtral / Qwen3-MoE /
    # DeepSeek-V3 benchmark shapes (9-12, 6-8, 6-9 ms a step) 1.02x / 1.04x / 1.12x, 100 ms 1.07x /
    # 1.12x / 1.11x, 200 ms 1.08x / 1.12x; the default model (0.25 ms a step) 1.65x at 16 steps a call
    MULTI_STEP_SECONDS = 0.1
    # ... and for this long where a sequence of the call streams (a client reads its tokens as they come):
    # one chunk every 20 ms at most, below a step of vLLM's CPU build on the benchmark shapes (its
    # inter-token latency), at a few percent of the multi-step gain (a return to Python costs ~0.5 ms)
    STREAM_STEP_SECONDS = 0.02
    # ... and with no more steps than keep the raw logits of its rows returning log-probs in this many
    # bytes (float32 [steps, V] each: 16 steps of a 152k vocabulary are ~10 MB a row)
    LOGPROB_BYTES = 64 << 20

    def __init__(self, model: MoECausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 sampler: Sampler, device: torch.device, drafter: Drafter | None = None):
        self.model = model
        # draft-model speculation: runs over the rows of every step too, so its cache stays complete
        self.drafter = drafter
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.device = device
        self.num_tokens_run = 0  # tokens this rank has run through the model (its DP group's)
        self.record_expert_counts = False  # MoE layers add up tokens per expert (LLMEngine.expert_counts)
        # this step's rows bypass the drafter (the engine's dormant drafter; a multi-step call's but the last)
        self.skip_drafter = False
        # a batch-1 step planned once (CPU, bf16); None where it would not help
        self.captured = CapturedDecode.capture(model, kv_caches)
        # a step of one sequence and one token: its inputs in tensors kept from step to step (CPU)
        self.one_row = OneRowMetadata(block_size) if torch.device(device).type == "cpu" else None
        # bumped by the engine when work arrives: a multi-step call ends after its current step
        self.wake = ctypes.c_int64(0)

    @property
    def runs_steps(self) -> bool:
        """Whether several decode steps of a step's sequences (up to ``captured.max_rows``) run as
        one C call here (multi-step decoding, :meth:`_run_steps`): the captured step runs whole steps,
        in one process. (A drafter reading hidden states gets their rows (``Drafter.catch_up_steps``);
        a draft model runs their tokens when it drafts next.)"""
        return (self.captured is not None and self.captured.runs_steps and self.one_row is not None
                and get_parallel_state().world_size == 1)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, eos_ids: tuple[int, ...]) -> StepResult:
        """Results for the batch's sequences this rank runs (all of them unless data_parallel > 1),
        keyed by batch index."""
        if batch.seqs[0].steps > 1:
            result = self._run_steps(batch, eos_ids)
            if result is not None:
                return result
        inputs = self._prepare(batch)
        hidden = self._run_model(inputs)
        sampled: Sampled = {}
        if inputs.all_idx:
            logits = self._sampling_logits(inputs, hidden)
            sampled = self._sample(batch, inputs, logits, eos_ids)
            sampled.update(self._verify_drafts(batch, inputs, logits))
        if self.drafter is not None and not self.skip_drafter:  # (after verification: an MTP runs on the accepted rows)
            self.drafter.catch_up(batch, hidden, sampled)
        return StepResult(sampled, self._prompt_logprobs(batch, inputs, hidden))

    def _run_steps(self, batch: ScheduledBatch, eos_ids: tuple[int, ...]) -> StepResult | None:
        """Up to ``steps`` decode steps of the batch's sequences in one C call
        (:meth:`CapturedDecode.decode_steps`): the tokens the sampler would pick step after step (greedy,
        or drawn at each sequence's key and position), ending after a step in which one chose a stop
        token, after :attr:`MULTI_STEP_SECONDS` (:attr:`STREAM_STEP_SECONDS` where one streams) or when
        :attr:`wake` moves. None where its first step does not run there (the step then runs as any other)."""
        if not self.runs_steps:  # (the captured step taken away since: tests comparing paths)
            return None
        ss = batch.seqs
        stop = tuple(dict.fromkeys(t for s in ss for t in (() if s.seq.params.ignore_eos else eos_ids)
                                   + tuple(s.seq.params.stop_token_ids or ())))
        s0 = ss[0]
        if len(ss) == 1:
            table = self.one_row.build(s0.seq.token_ids[s0.start], s0.start + 1, s0.seq.block_table.blocks).block_tables
        else:
            width = max(len(s.seq.block_table.blocks) for s in ss)
            table = torch.tensor([s.seq.block_table.blocks + [0] * (width - len(s.seq.block_table.blocks)) for s in ss],
                                 dtype=torch.int32)
        V, steps = self.model.cfg.vocab_size, s0.steps
        # rows returning log-probs keep each step's raw logits through the call (at most LOGPROB_BYTES)
        want_lp = [s.seq.params.logprobs is not None for s in ss]
        if any(want_lp):
            steps = max(1, min(steps, self.LOGPROB_BYTES // (sum(want_lp) * V * 4)))
        raw = [torch.empty(steps, V) if w else None for w in want_lp] if any(want_lp) else None
        # a drafter reading the target's hidden states (an MTP layer) gets each step's rows
        reads = self.drafter is not None and self.drafter.reads_hidden
        rows = torch.empty(steps, len(ss), self.model.cfg.hidden_size, dtype=torch.bfloat16) if reads else None
        sample = processing = None
        banned = [self._banned(s.seq, eos_ids) for s in ss]  # (min_tokens pending)
        if raw is not None or not all(s.seq.params.greedy and not s.seq.params.processes_logits and not b
                                      for s, b in zip(ss, banned)):
            if any(s.seq.sample_key is None for s in ss):
                return None  # (a sequence made outside the engine: its draws take a new key each)
            sample = [sample_row(s.seq.params, s.seq.sample_key) for s in ss]
            processing = [logit_processing(s.seq.params, s.seq, V, b) if s.seq.params.processes_logits or b else None
                          for s, b in zip(ss, banned)]
        on_step, undo = self._grammar_steps(ss, processing, V)
        try:
            tokens = self.captured.decode_steps([s.seq.token_ids[s.start] for s in ss], [s.start for s in ss], table,
                                                self.block_size, steps, stop, self._budget(ss), self.wake, rows,
                                                sample, processing, raw, on_step)
        finally:
            undo()
        if not tokens[0]:
            return None
        self.num_tokens_run += len(ss) * len(tokens[0])
        if reads:
            self.drafter.catch_up_steps(ss, tokens, rows, last_only=self.skip_drafter)
        sampled: Sampled = {}
        for b, row in enumerate(tokens):
            lps: list[dict[int, float] | None] = [None] * len(row)
            if want_lp[b]:  # as the sampler makes them, from the raw logits
                lps = top_logprobs(raw[b][:len(row)], row, [ss[b].seq.params.logprobs] * len(row))
            sampled[b] = list(zip(row, lps))
        return StepResult(sampled, {})

    @staticmethod
    def _grammar_steps(ss: list[ScheduledSeq], processing: list | None, vocab_size: int):
        """For a multi-step call's rows with a grammar: each row's mask in its ``processing`` entry and
        the loop's ``on_step``, which gives the grammars each step's input tokens (the tokens the step
        before chose) and writes their masks before the step's draws, as the sampler masks a step's
        logits; and ``undo()``, which takes those tokens back after the call (the engine advances the
        grammars by the call's tokens as after any step). ``(None, no-op)`` without grammars."""
        rows = [t for t, s in enumerate(ss) if s.seq.grammar is not None]
        if not rows:
            return None, lambda: None
        from .structured_output import allocate_masks

        masks = allocate_masks(len(ss), vocab_size)
        for t in rows:
            processing[t] = processing[t]._replace(mask=masks[t])
        grammars = [ss[t].seq.grammar for t in rows]
        accepted = [0] * len(rows)

        def on_step(i: int, tokens) -> bool:
            for j, (t, grammar) in enumerate(zip(rows, grammars)):
                if i > 0:
                    if not grammar.accept(tokens[t]):
                        return False  # (drawn under its mask: not expected)
                    accepted[j] += 1
                grammar.fill_mask(masks, t)
            return True

        def undo() -> None:
            for grammar, n in zip(grammars, accepted):
                grammar.rollback(n)

        return on_step, undo

    def _budget(self, seqs: list[ScheduledSeq]) -> float:
        """How long a multi-step call of these sequences may run: shorter where one streams."""
        return self.STREAM_STEP_SECONDS if any(s.seq.streams for s in seqs) else self.MULTI_STEP_SECONDS

    def _prepare(self, batch: ScheduledBatch) -> StepInputs:
        st = get_parallel_state()
        if self.one_row is not None and len(batch.seqs) == 1 and st.dp_size == 1:
            s = batch.seqs[0]
            if s.num_new_tokens == 1 and not s.draft and not s.seq.wants_prompt_logprobs:
                return self._prepare_one(s)
        step = NO_STEP
        mine = range(len(batch.seqs))
        if st.dp_size > 1:
            groups = partition_batch(batch, st.dp_size)
            mine = groups[st.dp_rank]
            step = DispatchStep(dp_num_tokens=tuple(sum(batch.seqs[b].num_new_tokens for b in g) for g in groups))
        ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sample_idx: list[int] = []
        lp_rows: list[int] = []
        lp_owner: list[tuple[int, int]] = []
        for b in mine:
            s = batch.seqs[b]
            seq, start, n = s.seq, s.start, s.num_new_tokens
            base = len(ids)
            ids.extend(seq.token_ids[start:start + n - len(s.draft)])
            ids.extend(s.draft)  # speculative tokens: their rows verify them
            positions.extend(range(start, start + n))
            if s.samples:
                first = n - 1 - len(s.draft)
                sample_rows.extend(range(base + first, base + n))
                sample_idx.extend([b] * (len(s.draft) + 1))
            if seq.wants_prompt_logprobs:
                first = max(start, len(seq.prompt_logprobs) - 1)
                for p in range(first, min(start + n, seq.num_prompt_tokens - 1)):
                    lp_rows.append(base + p - start)
                    lp_owner.append((b, p + 1))
        run = [batch.seqs[b] for b in mine]
        meta = AttentionMetadata.build(
            [s.num_new_tokens for s in run],
            [s.start + s.num_new_tokens for s in run],
            [s.seq.block_table.blocks for s in run],
            self.block_size, self.device)
        ctx = ForwardContext(meta, self.kv_caches, record_expert_counts=self.record_expert_counts, dispatch_step=step)
        all_idx = [b for b, s in enumerate(batch.seqs) if s.samples] if st.dp_size > 1 else sample_idx
        all_sampled = len(sample_rows) == len(ids) and not lp_rows and step is NO_STEP
        return StepInputs(torch.tensor(ids, dtype=torch.long, device=self.device),
                          torch.tensor(positions, dtype=torch.long, device=self.device), ctx,
                          sample_rows, sample_idx, all_idx, lp_rows, lp_owner, all_sampled)

    def _prepare_one(self, s: ScheduledSeq) -> StepInputs:
        """:meth:`_prepare` for a step of one sequence and one new token (batch-1 decode), in
        :attr:`one_row`'s tensors."""
        one, seq = self.one_row, s.seq
        meta = one.build(seq.token_ids[s.start], s.start + 1, seq.block_table.blocks)
        ctx = ForwardContext(meta, self.kv_caches, record_expert_counts=self.record_expert_counts)
        rows = [0] if s.samples else []
        return StepInputs(one.ids, one.positions, ctx, rows, list(rows), list(rows), [], [])

    def _captured_rows(self, inputs: StepInputs) -> bool:
        """Whether the captured step runs this step: one sequence and one token, or at most
        ``captured.max_rows`` rows that are all sampled (decode tokens of several sequences, a
        verify step's tokens and drafts), each computed as a one-token step computes it."""
        T = inputs.input_ids.shape[0]
        return self.captured is not None and (
            (T == 1 and inputs.ctx.meta.num_seqs == 1) or (inputs.all_sampled and T <= self.captured.max_rows))

    def _run_model(self, inputs: StepInputs) -> torch.Tensor:
        """The step's hidden states: the captured step where it runs, else the model."""
        self.num_tokens_run += inputs.input_ids.shape[0]
        if self._captured_rows(inputs):
            return self.captured(inputs.input_ids, inputs.positions, inputs.ctx)
        return self.model(inputs.input_ids, inputs.positions, inputs.ctx)

    def _sampling_logits(self, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of every row in ``inputs.all_idx`` (zeros for other data-parallel groups' rows), on the CPU."""
        rows = inputs.sample_rows
        if len(rows) != hidden.shape[0] or (rows and rows[-1] != len(rows) - 1):  # (all rows in order: decode)
            hidden = hidden[torch.tensor(rows, dtype=torch.long, device=self.device)]
        if self._captured_rows(inputs):  # each row as a one-token step's LM head
            logits = self.captured.logits(hidden)
        else:
            logits = self.model.compute_logits(hidden).cpu()
        if len(inputs.all_idx) == len(inputs.sample_idx):
            return logits
        full = logits.new_zeros(len(inputs.all_idx), self.model.cfg.vocab_size)
        where = {b: j for j, b in enumerate(inputs.all_idx)}
        if inputs.sample_idx:
            full[torch.tensor([where[b] for b in inputs.sample_idx])] = logits
        return full

    @staticmethod
    def _verified_by_sampling(batch: ScheduledBatch, b: int) -> bool:
        """A sampled (not greedy) request's draft is verified by speculative sampling, row by row."""
        return bool(batch.seqs[b].draft) and not batch.seqs[b].seq.params.greedy

    def _sample(self, batch: ScheduledBatch, inputs: StepInputs, logits: torch.Tensor,
                eos_ids: tuple[int, ...]) -> Sampled:
        """One draw per row of every sequence not verified by sampling (all rows of the batch; a sampled
        row draws at its sequence's key and the token's position); greedy drafts kept while the model
        confirms them."""
        all_idx = inputs.all_idx
        plain = [j for j, b in enumerate(all_idx) if not self._verified_by_sampling(batch, b)]
        sampled: Sampled = {}
        if not plain:
            return sampled
        seqs = [batch.seqs[all_idx[j]].seq for j in plain]
        banned = [self._banned(seq, eos_ids) for seq in seqs]
        # the position of the token each row samples: a sequence's rows sample its next positions in order
        positions, nth = [], {}
        for j in plain:
            b = all_idx[j]
            s = batch.seqs[b]
            nth[b] = nth.get(b, -1) + 1
            positions.append(s.start + s.num_new_tokens - len(s.draft) + nth[b])
        res: SampleResult = self.sampler(logits[plain] if len(plain) < len(all_idx) else logits,
                                         [q.params for q in seqs], [q.sample_key for q in seqs], positions, banned,
                                         seqs)
        mine = set(inputs.sample_idx)
        for r, j in enumerate(plain):
            b = all_idx[j]
            if b in mine:
                sampled.setdefault(b, []).append((res.token_ids[r], res.logprobs[r]))
        for b, rows in sampled.items():
            if batch.seqs[b].draft:
                sampled[b] = accept_greedy(batch.seqs[b].draft, rows)
        return sampled

    def _verify_drafts(self, batch: ScheduledBatch, inputs: StepInputs, logits: torch.Tensor) -> Sampled:
        """Sampled requests' drafts, verified by speculative sampling over their rows."""
        rows: dict[int, list[int]] = {}
        for j, b in enumerate(inputs.all_idx):
            if self._verified_by_sampling(batch, b):
                rows.setdefault(b, []).append(j)
        out: Sampled = {}
        for b, js in rows.items():
            s, seq = batch.seqs[b], batch.seqs[b].seq
            out[b] = self.sampler.verify_draft(logits[js], seq.params, seq.generator, s.draft, s.draft_probs)
        return out

    def _prompt_logprobs(self, batch: ScheduledBatch, inputs: StepInputs,
                         hidden: torch.Tensor) -> dict[int, list[dict[int, float]]]:
        prompt_lps: dict[int, list[dict[int, float]]] = {}
        if not inputs.lp_rows:
            return prompt_lps
        logits = self.model.compute_logits(hidden[torch.tensor(inputs.lp_rows, device=self.device)]).cpu()
        seqs = [batch.seqs[b].seq for b, _ in inputs.lp_owner]
        entries = top_logprobs(logits.float(), [seq.token_ids[pos] for seq, (_, pos) in zip(seqs, inputs.lp_owner)],
                               [seq.params.prompt_logprobs for seq in seqs])
        for (b, _), entry in zip(inputs.lp_owner, entries):
            prompt_lps.setdefault(b, []).append(entry)
        return prompt_lps

    @staticmethod
    def _banned(seq, eos_ids: tuple[int, ...]) -> list[int]:
        """Before min_tokens, EOS and stop tokens may not be drawn."""
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return []
        return list((() if p.ignore_eos else eos_ids)) + list(p.stop_token_ids or [])
