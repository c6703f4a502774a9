"""Drafters for speculative decoding: a small checkpoint with the target's vocabulary
(:class:`DraftModel`) or a DeepSeek-V3 checkpoint's MTP layer (:class:`MTPDrafter`) drafts, the
target verifies; :class:`DraftModelProposer` runs either for the scheduler.

KV cache: a drafter has its own cache tensors with the target's block size and number of
blocks, and uses the target's block tables (as vLLM does for its KV cache groups). So the block
manager's allocations, frees, preemptions and prefix-cache hits cover both models at once; the
engine budgets both models' bytes per token when it sizes the cache.

A draft model keeps its cache complete up to a per-sequence mark (``written``) and runs only when
it drafts: neither prompt chunks nor decode rows run through it after a target step
(:meth:`DraftModel.catch_up`, called by the model runner, only moves the marks); the sequence's next
drafting step first runs every row the drafter owes, batched with it. So a request that never
drafts (cost control's K = 0 fallback, a request that is not speculated) costs the drafter nothing,
not even its prompt. Prefix caching does not wait for the drafter: the block manager's
``aux_written`` flags say which cached blocks hold the drafter's K/V too, and a sequence that hits a
cached prefix reuses the drafter's side only of those leading blocks (the drafter recomputes the
rest when it first drafts). Drafting
(:meth:`DraftModelProposer.propose`, called by the scheduler once a step's blocks are allocated)
runs K one-row steps per sequence, batched over the speculating sequences: step ``j`` feeds the
last token (j = 0) or draft ``j`` at position ``computed + j`` and writes its K/V there. The
target's verify rows are ``[last, d_1 .. d_K]`` at the same positions, so the drafter already
holds the K/V of the accepted ones (all but ``d_K``, which it writes when it drafts next). Rejected
rows' K/V lie past the computed length in both caches and are overwritten later.

Greedy requests draft the drafter's argmax; sampled requests draw from the drafter's distribution
after the request's temperature / top-k / top-p / min-p (the same filtering the target's rows
get), and keep it (q) for rejection sampling (:meth:`moe.sampler.Sampler.verify_draft`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from kvcache import AttentionMetadata
from kvcache.block_manager import BlockManager

from .config import read_config_json
from .cpu_decode import CapturedDecode
from .loader import load_weights
from .models import ForwardContext, MoECausalLM, parse_config, rules_for
from .models.quant_weights import checkpoint_rules, plan_experts
from .sampler import draw_token, filtered_probs
from .scheduler import ScheduledBatch, ScheduledSeq
from .sequence import Sequence
from .spec_cost import SpecCostModel
from .spec_decode import Draft, DraftCounts, NgramProposer, draft_room, take_probe_slot

if TYPE_CHECKING:
    from .model_runner import Sampled


class Drafter(Protocol):
    """What the engine asks of a drafter: a draft model (:class:`DraftModel`) or an MTP layer
    (:class:`MTPDrafter`, which reads the target's hidden states)."""

    def kv_bytes_per_token(self, fp8: bool) -> int: ...

    def allocate_kv_cache(self, num_blocks: int, block_size: int, fp8: bool) -> None: ...

    def step(self, seqs: list[Sequence], ids: list[int], positions: list[int]) -> torch.Tensor: ...

    def catch_up(self, batch: ScheduledBatch, hidden_TD: torch.Tensor, sampled: Sampled) -> None: ...

    # whether it runs on the target's hidden states, so that a multi-step call keeps each step's rows
    # for it (:meth:`catch_up_steps`); a drafter that reads only tokens owes those rows instead
    reads_hidden: bool

    def catch_up_steps(self, seqs: list[ScheduledSeq], tokens: list[list[int]], hidden_SBD: torch.Tensor,
                       last_only: bool) -> None:
        """After a multi-step call (``ModelRunner._run_steps``; asked only where :attr:`reads_hidden`):
        sequence ``b`` ran ``len(tokens[b])`` decode steps from ``seqs[b].start``, step ``i`` choosing
        ``tokens[b][i]``, its row's hidden state ``hidden_SBD[i, b]``. ``last_only``: keep only each
        sequence's last row (a dormant drafter, which then misses the others)."""
        ...

    def owed(self, seq: Sequence) -> int:
        """Rows of ``seq`` the drafter must run before it can draft for it."""
        ...

    def whole(self, seq: Sequence) -> bool:
        """Does the drafter hold all of ``seq``'s context (so its drafts measure its acceptance)? A
        drafter that reads only tokens always does; an MTP layer misses the rows of steps whose
        catch-up the engine skipped (``ModelRunner.skip_drafter``)."""
        ...

    num_tokens_run: int  # rows run through the drafter so far


class _OwnKVCache:
    """A drafter's KV cache: tensors of the target's block size and count (so the target's block
    tables address them), from its model's ``kv_cache_spec``."""

    model: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    block_size: int

    def kv_bytes_per_token(self, fp8: bool) -> int:
        return sum(s.bytes_per_token(self.dtype, fp8) for s in self.model.kv_cache_spec())

    def allocate_kv_cache(self, num_blocks: int, block_size: int, fp8: bool) -> None:
        """Cache tensors of the target's shape in blocks: the same block ids mean the same tokens."""
        self.block_size = block_size
        self.kv_caches = [s.allocate(num_blocks, block_size, self.dtype, self.device, fp8)
                          for s in self.model.kv_cache_spec()]


class DraftModel(_OwnKVCache):
    """The drafter's weights and KV cache, and its forward over rows given by position."""

    CATCH_UP_ROWS = 2048  # rows per drafter pass when catching up on prompts
    reads_hidden = False  # (a multi-step call's rows are owed: it runs them from the tokens when it drafts)

    def __init__(self, path: str | Path, target_vocab_size: int, dtype: torch.dtype, device: torch.device):
        hf = read_config_json(path)
        plan = plan_experts(hf)  # the checkpoint's own format (packed experts load as such)
        self.cfg = cfg = replace(parse_config(hf), experts=plan)
        if cfg.vocab_size != target_vocab_size:
            raise ValueError(f"the drafter {str(path)!r} has vocab_size {cfg.vocab_size} but the target has "
                             f"{target_vocab_size}: a drafter must share the target's vocabulary (train one "
                             "from the target with `moe distill --student draft`)")
        self.device = device
        with torch.device(device):
            self.model = MoECausalLM(cfg, dtype)
        load_weights(self.model, path, checkpoint_rules(plan, rules_for(cfg.architecture), path), cfg.num_layers,
                     cfg.tie_word_embeddings)
        self.model.eval()
        self.dtype = dtype
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.captured: CapturedDecode | None = None
        self.num_tokens_run = 0
        # id(seq) -> (seq, written, its num_preemptions then): positions [0, written) of the
        # sequence hold this drafter's K/V (see catch_up)
        self._written: dict[int, tuple[Sequence, int, int]] = {}
        # the engine's scheduler.block_manager_of: where the blocks' aux_written flags live
        # (None: no prefix cache to share, a prefix hit is recomputed by the drafter)
        self.block_manager_of: Callable[[Sequence], BlockManager] | None = None

    def allocate_kv_cache(self, num_blocks: int, block_size: int, fp8: bool) -> None:
        super().allocate_kv_cache(num_blocks, block_size, fp8)
        self.captured = CapturedDecode.capture(self.model, self.kv_caches)

    @torch.inference_mode()
    def forward(self, ids: list[int], positions: list[int], query_lens: list[int], context_lens: list[int],
                block_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states of the rows (sequence by sequence, ``query_lens`` each, ending at ``context_lens``)."""
        meta = AttentionMetadata.build(query_lens, context_lens, block_tables, self.block_size, self.device)
        ctx = ForwardContext(meta, self.kv_caches)
        ids_T = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos_T = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.num_tokens_run += len(ids)
        if self.captured is not None and len(ids) <= self.captured.max_rows:  # (each row ends its sequence's rows)
            return self.captured(ids_T, pos_T, ctx)
        return self.model(ids_T, pos_T, ctx)

    def written(self, seq: Sequence) -> int:
        """Positions of ``seq`` whose drafter K/V are written (0 for a sequence not seen yet)."""
        entry = self._written.get(id(seq))
        return entry[1] if entry is not None and entry[2] == seq.num_preemptions else 0

    def _set_written(self, seq: Sequence, n: int) -> None:
        self._written[id(seq)] = (seq, n, seq.num_preemptions)

    def owed(self, seq: Sequence) -> int:
        return seq.num_computed_tokens - self.written(seq)

    def whole(self, seq: Sequence) -> bool:
        return True  # (rows it missed are owed: it runs them from the tokens when it drafts next)

    def _gap_rows(self, seq: Sequence, upto: int) -> list[tuple[int, int]]:
        """The (token, position) rows of ``seq`` this drafter owes before position ``upto``."""
        w = self.written(seq)
        return list(zip(seq.token_ids[w:upto], range(w, upto)))

    def step(self, seqs: list[Sequence], ids: list[int], positions: list[int]) -> torch.Tensor:
        """One drafting step, one row per sequence (its ``ids`` at ``positions``): ``[B, V]`` float
        logits. The rows a sequence owes (see :meth:`catch_up`) run first: in the same pass, or
        when they are many (a prompt), in passes of at most ``CATCH_UP_ROWS`` rows before it."""
        gaps = [self._gap_rows(seq, p) for seq, p in zip(seqs, positions)]
        if sum(map(len, gaps)) > self.CATCH_UP_ROWS:
            self._run_in_passes(seqs, gaps)
            gaps = [[] for _ in seqs]
        rows = [g + [(t, p)] for g, t, p in zip(gaps, ids, positions)]
        hidden = self._run_rows(seqs, rows)
        for seq, p in zip(seqs, positions):
            self._set_written(seq, p + 1)
            if self.block_manager_of is not None:  # (the rows up to the last token are final)
                self.block_manager_of(seq).mark_aux_written(seq.block_table, min(p + 1, seq.num_tokens))
        last = torch.tensor([len(r) for r in rows]).cumsum(0) - 1
        hidden = hidden[last.to(hidden.device)]
        if self.captured is not None and len(seqs) <= self.captured.max_rows:
            return self.captured.logits(hidden).cpu()
        return self.model.compute_logits(hidden).cpu()

    def _run_in_passes(self, seqs: list[Sequence], gaps: list[list[tuple[int, int]]]) -> None:
        """Run each sequence's owed rows in order, packed into passes of at most ``CATCH_UP_ROWS``
        rows (a long gap is split over passes; each piece's context ends at its last row)."""
        batch_seqs: list[Sequence] = []
        batch_rows: list[list[tuple[int, int]]] = []
        room = self.CATCH_UP_ROWS
        for seq, gap in zip(seqs, gaps):
            while gap:
                piece, gap = gap[:room], gap[room:]
                batch_seqs.append(seq)
                batch_rows.append(piece)
                room -= len(piece)
                if room == 0:
                    self._run_rows(batch_seqs, batch_rows)
                    batch_seqs, batch_rows, room = [], [], self.CATCH_UP_ROWS
        if batch_seqs:
            self._run_rows(batch_seqs, batch_rows)

    def catch_up(self, batch: ScheduledBatch, hidden_TD: torch.Tensor, sampled: Sampled) -> None:
        """After a target step: account for the rows the target just ran, without running any.
        A new or recomputed sequence (after preemption) starts with the drafter's K/V of the
        leading prefix-cache hit blocks that hold them (``aux_written``); everything else, prompt
        and decode rows alike, the drafter runs when the sequence next drafts (:meth:`step`). Of a
        verified draft the drafting steps wrote the rows ``[last, d_1 .. d_{K-1}]``, which stay
        written as far as the target accepted them. (``hidden_TD``, the target's hidden states of
        the step's rows in batch order, is for drafters that run on them, such as an MTP layer: the
        step's own tensor, which they may keep.
        ``sampled``: the (token, logprobs) each batch index emitted, accepted drafts first.)"""
        for b, s in enumerate(batch.seqs):
            start, seq = s.start, s.seq
            entry = self._written.get(id(seq))
            if entry is None or entry[2] != seq.num_preemptions:
                bm = self.block_manager_of(seq) if self.block_manager_of is not None else None
                self._set_written(seq, bm.aux_written_prefix(seq.block_table, start) if bm is not None else 0)
            if s.draft:  # the rows past the accepted ones hold rejected tokens
                kept = start + max(len(sampled.get(b, ())), 1)
                self._set_written(seq, min(self.written(seq), kept))
        if len(self._written) > 2 * len(batch.seqs):  # finished sequences' entries (their blocks went back)
            self._written = {k: v for k, v in self._written.items() if not v[0].is_finished}

    def _run_rows(self, seqs: list[Sequence], rows: list[list[tuple[int, int]]]) -> torch.Tensor:
        """Each sequence's consecutive (token, position) rows, its last one ending its context."""
        return self.forward([t for r in rows for t, _ in r], [p for r in rows for _, p in r], [len(r) for r in rows],
                            [r[-1][1] + 1 for r in rows], [s.block_table.blocks for s in seqs])


class DraftModelProposer:
    """The scheduler's proposer for ``draft_model`` / ``draft`` / ``mtp``: K batched drafter steps,
    and with ``lookup`` (``ngram_first``) n-gram lookup first: a sequence whose suffix recurred
    takes the lookup's draft (free), the others the drafter's. This is the one place a step's
    drafts are chosen."""

    source = "model"

    def __init__(self, drafter: Drafter, k: int, max_model_len: int, generator: torch.Generator,
                 cost: SpecCostModel | None = None, lookup: NgramProposer | None = None):
        self.drafter = drafter
        self.k = k  # draft tokens per sequence this step (the engine's cost control may lower it)
        self.k_max = k
        self.max_model_len = max_model_len
        self.generator = generator  # draws for requests without their own seed (the sampler's)
        self.cost = cost
        self.lookup = lookup  # its own k, chosen likewise
        self.probe_left: int | None = None  # set by the engine's cost control for a probe step
        self.probe_only: set[int] | None = None
        self.counts = DraftCounts()

    def set_probe(self, size: int | None, running: list[Sequence]) -> None:
        """A probe drafts for the ``size`` sequences that owe the drafter the fewest rows: those it
        drafted for lately (or short prompts), rather than whichever come first, each of which
        would have the drafter run its whole context (at 32 concurrent, hundreds of rows a probe)."""
        self.probe_left = size
        if size is None:
            self.probe_only = None
            return
        decoding = [seq for seq in running if seq.num_tokens - seq.num_computed_tokens == 1]  # (not mid-prompt)
        self.probe_only = {id(seq) for seq in sorted(decoding, key=self.drafter.owed)[:size]}

    def room(self, seq: Sequence, budget: int) -> int:
        if not self.k and seq.generator is None and (self.lookup is None or not self.lookup.k):
            return 0  # (asked of every decoding sequence at every step: the common K = 0 answer first)
        found = self.lookup.room(seq, budget) if self.lookup is not None else 0
        room = 0 if found else min(draft_room(seq, self.k, self.max_model_len, self.k_max), budget)
        self.counts.ask(self.k, room)  # (asked for every sequence: those the lookup drafts for it does not)
        return found or take_probe_slot(self, seq, room)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], rooms: list[int]) -> list[Draft]:
        drafts: list[Draft | None] = [None] * len(seqs)
        if self.lookup is not None:
            drafts = [Draft(tuple(t)) if t else None for t in self.lookup.take_found(seqs)]
        run = [b for b, d in enumerate(drafts) if d is None]
        for b, d in zip(run, self._draft([seqs[b] for b in run], [rooms[b] for b in run])):
            drafts[b] = d
        return drafts

    def _draft(self, seqs: list[Sequence], rooms: list[int]) -> list[Draft]:
        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for j in range(max(rooms, default=0)):
            active = [b for b, r in enumerate(rooms) if r > j]
            ids = [tokens[b][-1] if j else seqs[b].token_ids[-1] for b in active]
            positions = [seqs[b].num_computed_tokens + j for b in active]
            t0 = time.perf_counter()
            logits = self.drafter.step([seqs[b] for b in active], ids, positions)
            self._pick(logits, [seqs[b] for b in active], [tokens[b] for b in active], [probs[b] for b in active])
            seconds = time.perf_counter() - t0
            self.counts.seconds += seconds
            if self.cost is not None:
                # (with the rows caught up on: drafting now and then pays for the plain steps between;
                # the median of recent steps keeps one probe's catch-up from weighing much)
                self.cost.observe_draft(len(active), seconds)
        return [Draft(tuple(t), torch.stack(q) if q else None, "model") for t, q in zip(tokens, probs)]

    def _pick(self, logits_BV: torch.Tensor, seqs: list[Sequence], tokens: list[list[int]],
              probs: list[list[torch.Tensor]]) -> None:
        """Append each sequence's next draft token: the argmax for greedy requests, else a draw from
        the filtered distribution q (kept for verification)."""
        greedy = logits_BV.max(dim=-1).indices.tolist()
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        q_SV = filtered_probs(logits_BV[sampled], [seqs[i].params for i in sampled]) if sampled else None
        for i, seq in enumerate(seqs):
            if seq.params.greedy:
                tokens[i].append(greedy[i])
        for r, i in enumerate(sampled):
            q_V = q_SV[r]
            tokens[i].append(draw_token(q_V, seqs[i].generator or self.generator))
            probs[i].append(q_V)


class _PendingRows:
    """Rows of one sequence the target computed and its MTP layer has not run yet: positions
    ``start .. start + len(ids) - 1``, each with ``t_{i+1}`` (``ids``) and the target's ``h_i``."""

    def __init__(self, seq: Sequence, start: int):
        self.seq = seq
        self.preemptions = seq.num_preemptions
        self.start = start
        self.ids: list[int] = []
        # the target's hidden states of those rows: a step's tensor (all its rows), or (step tensor, first row, rows)
        self.hidden: list[torch.Tensor | tuple[torch.Tensor, int, int]] = []


class MTPDrafter(_OwnKVCache):
    """DeepSeek-V3's multi-token-prediction layer as the drafter (``method: "mtp"``): row ``i``
    takes token ``t_{i+1}`` and the target's hidden state ``h_i`` (after its final norm) and its
    logits predict ``t_{i+2}`` (:mod:`moe.models.mtp`). Its K/V sit at slot ``i`` of its own cache,
    with the target's block tables, like a draft model's.

    After each target step :meth:`catch_up` keeps the positions the target computed (for a verified
    draft: the accepted rows), with the target's hidden states, as the sequence's pending rows, the
    last row's input being the token just sampled. They run when the sequence next drafts (step 0 of
    :meth:`step`: all its pending rows in one pass, replacing the drafting steps' K/V there; the last
    row's output gives the first draft), so steps that draft nothing (cost control's K = 0) cost no
    MTP pass (a multi-step call's rows come through :meth:`catch_up_steps`); a sequence's pending
    rows run at once when they pass ``PENDING_BYTES``, in passes of at most ``CATCH_UP_ROWS``. Step
    ``j > 0`` runs draft token ``d_j`` at position ``c + j - 1`` with the MTP's own previous output as the
    hidden state (the first MTP layer reused for every K). A prefix-cache hit keeps the hit blocks'
    MTP K/V, whose last slot was computed with the token that followed there, which may differ:
    drafts may be a little worse there, outputs are exact regardless. Steps the engine keeps from it
    (a dormant drafter: ``ModelRunner.skip_drafter``) leave their positions' MTP K/V unwritten: the
    sequence is then no longer :meth:`whole` (see :meth:`_restart`)."""

    PENDING_BYTES = 8 << 20  # hidden states kept per sequence before its rows run anyway
    CATCH_UP_ROWS = 2048  # rows per MTP pass when running pending rows (a prompt, a long plain stretch)
    reads_hidden = True

    def __init__(self, mtp: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        self.model = mtp
        self.dtype = dtype
        self.device = device
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        # id(seq) -> (seq, computed length it holds for, logits of the next draft [V], hidden state to chain [D])
        self._next: dict[int, tuple[Sequence, int, torch.Tensor, torch.Tensor]] = {}
        self._pending: dict[int, _PendingRows] = {}
        self._gapped: dict[int, Sequence] = {}  # sequences with rows it never ran (see whole)
        self._row_bytes = mtp.cfg.hidden_size * dtype.itemsize  # one row of the target's hidden states
        self.num_tokens_run = 0
        self.captured: CapturedDecode | None = None

    def allocate_kv_cache(self, num_blocks: int, block_size: int, fp8: bool) -> None:
        super().allocate_kv_cache(num_blocks, block_size, fp8)
        self.captured = CapturedDecode.capture_mtp(self.model, self.kv_caches)

    @torch.inference_mode()
    def _forward(self, ids: list[int], hidden_TD: torch.Tensor, positions: list[int], query_lens: list[int],
                 seqs: list[Sequence]) -> torch.Tensor:
        """The MTP layer's output for the rows; as many rows as the captured step takes run as it
        does, from the fused input."""
        ends = torch.tensor(query_lens).cumsum(0).tolist()
        context_lens = [positions[e - 1] + 1 for e in ends]
        meta = AttentionMetadata.build(query_lens, context_lens, [s.block_table.blocks for s in seqs],
                                       self.block_size, self.device)
        self.num_tokens_run += len(ids)
        ids_T = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos_T = torch.tensor(positions, dtype=torch.long, device=self.device)
        ctx = ForwardContext(meta, self.kv_caches)
        if self.captured is not None and len(ids) <= self.captured.max_rows:
            return self.captured.from_hidden(self.model.fuse(ids_T, hidden_TD.to(self.dtype)), pos_T, ctx)
        return self.model(ids_T, hidden_TD.to(self.dtype), pos_T, ctx)

    def _logits(self, out_TD: torch.Tensor) -> torch.Tensor:
        if self.captured is not None and out_TD.shape[0] <= self.captured.max_rows:
            return self.captured.logits(out_TD).cpu()
        return self.model.compute_logits(out_TD).cpu()

    def _pending_of(self, seq: Sequence) -> _PendingRows | None:
        rows = self._pending.get(id(seq))
        return rows if rows is not None and rows.preemptions == seq.num_preemptions and rows.ids else None

    def _run_pending(self, seqs: list[Sequence]) -> None:
        """Each sequence's pending rows, in passes of at most ``CATCH_UP_ROWS`` rows (a long run split
        over passes, in order); the last row's output is the sequence's next first draft."""
        pieces = []  # (seq, first position, ids, hidden rows)
        for seq in seqs:
            r = self._pending.pop(id(seq))
            h = torch.cat([x if isinstance(x, torch.Tensor) else x[0][x[1]:x[1] + x[2]] for x in r.hidden])
            for a in range(0, len(r.ids), self.CATCH_UP_ROWS):
                pieces.append((seq, r.start + a, r.ids[a:a + self.CATCH_UP_ROWS], h[a:a + self.CATCH_UP_ROWS]))
        batch: list = []
        for piece in pieces + [None]:
            if batch and (piece is None or sum(len(p[2]) for p in batch) + len(piece[2]) > self.CATCH_UP_ROWS):
                self._run_pieces(batch)
                batch = []
            if piece is not None:
                batch.append(piece)

    def _run_pieces(self, pieces: list) -> None:
        out_TD = self._forward([t for p in pieces for t in p[2]], torch.cat([p[3] for p in pieces]),
                               [i for p in pieces for i in range(p[1], p[1] + len(p[2]))],
                               [len(p[2]) for p in pieces], [p[0] for p in pieces])
        last = (torch.tensor([len(p[2]) for p in pieces]).cumsum(0) - 1).to(out_TD.device)
        logits = self._logits(out_TD[last])
        for (seq, start, ids, _), lg, h in zip(pieces, logits, out_TD[last]):
            self._next[id(seq)] = (seq, start + len(ids), lg, h)  # (a later piece of the sequence overwrites)

    def step(self, seqs: list[Sequence], ids: list[int], positions: list[int]) -> torch.Tensor:
        """Drafting step ``j`` for rows ``ids`` at ``positions`` = c + j: step 0 runs the pending rows
        (their last row's output makes the logits); later steps run the MTP at position c + j - 1 on
        its own previous output."""
        if all(s.num_computed_tokens == p for s, p in zip(seqs, positions)):
            owing = [s for s in seqs if self._pending_of(s) is not None]
            if owing:
                self._run_pending(owing)
        first = [self._next.get(id(s)) for s in seqs]
        if any(f is None or f[1] != s.num_computed_tokens for f, s in zip(first, seqs)):
            raise RuntimeError("MTP drafting without the target's hidden state of the last position: "
                               "catch_up must run after every target step")
        if all(f[1] == p for f, p in zip(first, positions)):
            return torch.stack([f[2] for f in first])
        prev = torch.stack([f[3] for f in first])
        out_TD = self._forward(ids, prev, [p - 1 for p in positions], [1] * len(seqs), seqs)
        logits = self._logits(out_TD)
        for s, f, lg, h in zip(seqs, first, logits, out_TD):
            self._next[id(s)] = (s, f[1], lg, h)  # the chain moves on; its first entry stays keyed by c
        return logits

    def owed(self, seq: Sequence) -> int:
        rows = self._pending_of(seq)
        return len(rows.ids) if rows is not None else 0

    def whole(self, seq: Sequence) -> bool:
        return self._gapped.get(id(seq)) is not seq

    def _restart(self, seq: Sequence, start: int, rows: _PendingRows | None) -> _PendingRows:
        """``seq``'s pending rows from ``start`` on (``rows``: its current ones, :meth:`_pending_of`): a
        new or recomputed sequence, or one whose rows stopped short of ``start`` (steps whose catch-up
        the engine skipped, or rows dropped by a preemption past which a prefix hit resumed it): the
        MTP's K/V there stay unwritten, so its drafts for the sequence are worse from then on (outputs
        stay exact) and it is no longer whole."""
        if rows is not None:
            end = rows.start + len(rows.ids)
        else:
            ran = self._next.get(id(seq))
            end = ran[1] if ran is not None and ran[0] is seq else None
        if end is not None and start > end:
            self._gapped[id(seq)] = seq
        rows = self._pending[id(seq)] = _PendingRows(seq, start)
        return rows

    def catch_up(self, batch: ScheduledBatch, hidden_TD: torch.Tensor, sampled: Sampled) -> None:
        # (per target step: ~1% of a batch-1 step of the default model, so kept lean) the rows keep
        # the step's tensor, each step's its own (no copy: a clone was ~10 us), with their place in
        # it where the step has other rows too (no view op per sequence: ~1-2 us each)
        one = len(batch.seqs) == 1
        base = 0
        full: list[Sequence] = []
        for b, s in enumerate(batch.seqs):
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            # the positions the target computed this step: a chunk, or the last token and accepted
            # drafts; t_{i+1} of the last row is the token just sampled
            new = sampled.get(b, ())
            m = len(new) if s.draft else n
            ids = seq.token_ids[start + 1:start + m + 1]
            if len(ids) < m:
                ids += [t for t, _ in new[:m - len(ids)]]
            if len(ids) == m:
                self._keep(seq, start, ids, hidden_TD if one and m == n else (hidden_TD, base, m), full)
            base += n
        self._settle(len(batch.seqs), full)

    def catch_up_steps(self, seqs: list[ScheduledSeq], tokens: list[list[int]], hidden_SBD: torch.Tensor,
                       last_only: bool) -> None:
        """A multi-step call's rows: step ``i`` of sequence ``b`` ran position ``start + i`` and chose
        ``t_{start+i+1} = tokens[b][i]``; its hidden state is ``hidden_SBD[i, b]`` (kept as a view)."""
        full: list[Sequence] = []
        for b, (s, ids) in enumerate(zip(seqs, tokens)):
            first = len(ids) - 1 if last_only else 0
            if ids:
                self._keep(s.seq, s.start + first, ids[first:], hidden_SBD[first:len(ids), b], full)
        self._settle(len(seqs), full)

    def _keep(self, seq: Sequence, start: int, ids: list[int], hidden, full: list[Sequence]) -> None:
        """Positions ``start ..`` of ``seq`` as pending rows (``hidden``: their rows, see _PendingRows)."""
        rows = self._pending_of(seq)
        if rows is None or rows.start + len(rows.ids) != start:
            rows = self._restart(seq, start, rows)
        rows.ids += ids
        rows.hidden.append(hidden)
        if len(rows.ids) * self._row_bytes > self.PENDING_BYTES:
            full.append(seq)

    def _settle(self, batch_size: int, full: list[Sequence]) -> None:
        """Drop finished sequences' entries; run the rows of sequences whose pending rows are full."""
        if len(self._next) + len(self._pending) + len(self._gapped) > 2 * batch_size:  # (finished sequences')
            self._next = {k: v for k, v in self._next.items() if not v[0].is_finished}
            self._pending = {k: v for k, v in self._pending.items() if not v.seq.is_finished}
            self._gapped = {k: v for k, v in self._gapped.items() if not v.is_finished}
        if full:
            self._run_pending(full)
