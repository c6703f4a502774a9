"""The batch-1 step on CPU, captured once: the way a GPU engine replays a captured CUDA graph.

A step of one sequence and one new token (decode at batch 1, or a one-token prompt) is mostly
fixed costs: a few hundred small torch ops per layer. :meth:`CapturedDecode.capture` looks at the
model once, at load, and plans each half-layer:

- attention + residual add + post-attention norm as one C call (:func:`cpu_kernels.gqa_token`,
  :class:`cpu_kernels.MlaToken`) where the half is plain: CPU, bf16, one TP rank, bf16 KV caches (or
  fp8, its rows quantized as the op path's ``write_kv`` does), no MLA biases; projections bf16 or
  packed (``moe quantize --all-linear``, computed as ``ops.linear`` computes them; MLA's kv_b_proj
  bf16);
- router as one C call (:class:`cpu_kernels.RouteToken`: the gate's GEMV, scoring and selection,
  as ``routing.route`` computes them on CPU) where the gate is bf16, then the routed experts +
  shared expert + residual add + next norm as one C call (the experts' ``forward_token``:
  :func:`cpu_kernels.moe_token` / ``quant_moe_token``) where every expert is local and the shared
  expert is plain and ungated; a dense MLP as that call with the MLP as its one expert of weight 1;
- any other half runs the layer's own ``forward`` with :func:`add_norm`, as the model does.

The one-call halves run from one C loop (:class:`cpu_kernels.DecodeStep`: a step is one call from
Python, the embedding and first norm included; :meth:`CapturedDecode.logits` is the LM head of its
rows in one more), which hands a half back where it is an op-by-op one, a router meets a NaN or
a kernel declines; that half then runs here and the loop resumes after it. Each C call computes
exactly what the op path computes (the kernels' tests and
``tests/test_cpu_kernels.py::test_one_call_layers_equal_the_op_by_op_path`` hold them to it), so
a call that declines at run time (returns None, nothing written) is followed by the op path for
that half alone. :class:`moe.model_runner.ModelRunner` runs the captured step for a step of one
sequence and one token, and for a step of up to ``max_rows`` rows that are all sampled (decode
tokens of several sequences, verify steps' tokens and drafts: :func:`step_rows` says where each row
attends) where every half is one call: each row is computed as a one-token step of its sequence
computes it (so greedy speculative decoding yields plain decoding's tokens in bf16 too, and a
sequence's tokens do not depend on the batch it decodes in), with each weight read from memory once
for all rows (bf16 weights through the kernels' multi-row GEMVs, each expert once for the rows that
chose it; packed weights a row after another, back to back); every other step runs
``MoECausalLM.forward``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

import cpu_kernels
from parallel import get_tp_size

from .models import MoECausalLM, weight_bytes
from .models.decoder import DecoderLayer
from .models.layers import Attention, DenseMLP, ForwardContext, RMSNorm, SparseMoE, add_norm
from .models.mla import MLAttention

# (positions_T, h_TD, x_TD, ctx) -> (h + half(x), norm(h + half(x)))
Half = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ForwardContext], tuple[torch.Tensor, torch.Tensor]]

_ID_0, _WEIGHT_1 = torch.zeros(1, dtype=torch.int64), torch.ones(1)  # one expert, weight 1


def _bf16_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)


def step_rows(meta) -> tuple[torch.Tensor, int, cpu_kernels.SeqRows | None]:
    """Where a captured step's rows attend: one sequence's ``(its block table row, its context length,
    None)`` (its rows end it), or several sequences' ``(the step's block table, its longest context,
    their rows)`` (:class:`cpu_kernels.SeqRows`)."""
    if meta.num_seqs == 1:
        return meta.block_tables[0], meta.context_lens_list[0], None
    table = meta.block_tables
    return table, meta.max_context_len, cpu_kernels.SeqRows.of(meta.query_lens_list, meta.context_lens_list,
                                                                table.stride(0))


class _OpsAttention:
    """The layer's own attention, then the residual add and norm (op by op)."""

    def __init__(self, attn: torch.nn.Module, norm: RMSNorm):
        self.attn, self.norm = attn, norm
        self.into: cpu_kernels.Outputs | None = None  # a one-call half's results (CapturedDecode.capture)

    def __call__(self, positions_T: torch.Tensor, h_TD: torch.Tensor, x_TD: torch.Tensor,
                 ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        return add_norm(h_TD, self.attn(positions_T, x_TD, ctx), self.norm)

    def step_half(self, rows: int) -> cpu_kernels.StepHalf | None:
        """This half for :class:`cpu_kernels.DecodeStep` (None: run here, op by op)."""
        return None


def _one_row_weight(layer: torch.nn.Module) -> torch.Tensor | tuple | None:
    """What a one-call kernel reads for ``layer``'s weight: the bf16 tensor, or a packed weight's
    kernel arguments (:meth:`ops.PackedLinearWeight.kernel_args`; None where ops.linear takes the
    torch reference for it)."""
    w = layer.weight
    return w if isinstance(w, torch.Tensor) else w.kernel_args()


class _TokenAttention(_OpsAttention):
    """An attention half whose ``plan`` (:class:`cpu_kernels.GqaToken` or :class:`cpu_kernels.MlaToken`)
    runs the attention, the residual add and the norm in one call; op by op where the plan declines."""

    plan: cpu_kernels.GqaToken | cpu_kernels.MlaToken
    rotary: torch.nn.Module

    def __call__(self, positions_T: torch.Tensor, h_TD: torch.Tensor, x_TD: torch.Tensor,
                 ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        rot, meta = self.rotary, ctx.meta
        # (CapturedDecode grew the rotary tables for the step's position: read them here)
        table, context_len, rows = step_rows(meta)
        out = self.plan(x_TD, positions_T, rot.cos, rot.sin, rot.interleaved, table, context_len, meta.slot_mapping,
                        (h_TD, self.norm.weight, self.norm.eps), self.into, rows)
        return out if out is not None else super().__call__(positions_T, h_TD, x_TD, ctx)

    def step_half(self, rows: int) -> cpu_kernels.StepHalf:
        return cpu_kernels.StepHalf(self.plan, (self.norm.weight, self.norm.eps))


class _GqaToken(_TokenAttention):
    """:class:`Attention` + residual add + norm in one :func:`cpu_kernels.gqa_token` call (bf16 or
    packed projections, each computed as ``ops.linear`` computes it)."""

    def __init__(self, attn: Attention, norm: RMSNorm, k_cache: torch.Tensor, v_cache: torch.Tensor):
        super().__init__(attn, norm)
        norms = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.qk_norm else (None, None, 0.0)
        # the weights, norms and caches checked once; a call passes what changes per step
        self.plan = cpu_kernels.GqaToken(_one_row_weight(attn.qkv_proj), attn.qkv_proj.bias, attn.num_heads,
                                         attn.num_kv_heads, attn.qk_norm, *norms, k_cache, v_cache,
                                         attn.sliding_window, attn.sinks, attn.scale, _one_row_weight(attn.o_proj),
                                         attn.o_proj.bias, attn.clip_qkv)
        self.rotary = attn.rotary

    @staticmethod
    def fits(attn: Attention, k_cache, v_cache) -> bool:
        projs = [_one_row_weight(attn.qkv_proj), _one_row_weight(attn.o_proj)]
        rows = cpu_kernels.cache_rows(k_cache, v_cache)
        plain = rows[:2] if rows is not None and rows[2] is None else ()  # (fp8 rows: no dtype to check)
        return (rows is not None and not attn.o_proj.split and all(w is not None for w in projs)
                and _bf16_cpu(*plain, *(w for w in projs if isinstance(w, torch.Tensor))))


class _MlaToken(_TokenAttention):
    """:class:`MLAttention` + residual add + norm in one :class:`cpu_kernels.MlaToken` call (the
    weights checked once at capture)."""

    def __init__(self, attn: MLAttention, norm: RMSNorm, cache: torch.Tensor):
        super().__init__(attn, norm)
        q_a = (_one_row_weight(attn.q_a_proj), attn.q_a_layernorm.weight, attn.q_a_layernorm.eps,
               _one_row_weight(attn.q_b_proj)) if attn.q_lora else (None, None, 0.0, _one_row_weight(attn.q_proj))
        # the weights, norms and cache checked once; a call passes what changes per step
        self.plan = cpu_kernels.MlaToken(*q_a, _one_row_weight(attn.kv_a_proj_with_mqa), attn.kv_a_layernorm.weight,
                                         attn.kv_a_layernorm.eps, attn.kv_b_proj.weight, _one_row_weight(attn.o_proj),
                                         attn.num_heads, attn.nope, attn.rope_dim, attn.v_dim, cache, attn.scale)
        self.rotary = attn.rotary

    @staticmethod
    def fits(attn: MLAttention, cache) -> bool:
        projs = [attn.kv_a_proj_with_mqa, attn.o_proj] + ([attn.q_a_proj] if attn.q_lora else [])
        weights = [_one_row_weight(p) for p in projs + [attn.q_b_proj if attn.q_lora else attn.q_proj]]
        rows = cpu_kernels.cache_rows(cache, cache)
        plain = rows[:1] if rows is not None and rows[2] is None else ()  # (fp8 rows: no dtype to check)
        return (rows is not None and not attn.o_proj.split and all(p.bias is None for p in projs)
                and all(w is not None for w in weights) and isinstance(attn.kv_b_proj.weight, torch.Tensor)
                and _bf16_cpu(*plain, attn.kv_b_proj.weight, *(w for w in weights if isinstance(w, torch.Tensor))))


class _OpsMlp:
    """The layer's own MLP or MoE block, then the residual add and norm (op by op)."""

    def __init__(self, mlp: torch.nn.Module, norm: RMSNorm):
        self.mlp, self.norm = mlp, norm
        self.into: cpu_kernels.Outputs | None = None  # a one-call half's results (CapturedDecode.capture)

    def __call__(self, positions_T: torch.Tensor, h_TD: torch.Tensor, x_TD: torch.Tensor,
                 ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        return add_norm(h_TD, self.mlp(x_TD, ctx), self.norm)

    def step_half(self, rows: int) -> cpu_kernels.StepHalf | None:
        """This half for :class:`cpu_kernels.DecodeStep` (None: run here, op by op)."""
        return None


class _DenseToken(_OpsMlp):
    """A dense MLP + residual add + norm in one :class:`cpu_kernels.MoeToken` call: the MLP as the
    one expert of weight 1 (the one-call path's arithmetic)."""

    def __init__(self, mlp: DenseMLP, norm: RMSNorm):
        super().__init__(mlp, norm)
        self.plan = cpu_kernels.MoeToken(mlp.gate_up_proj.weight.unsqueeze(0), mlp.down_proj.weight.unsqueeze(0))

    def __call__(self, positions_T: torch.Tensor, h_TD: torch.Tensor, x_TD: torch.Tensor,
                 ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        T = x_TD.shape[0]
        ids, weights = (_ID_0, _WEIGHT_1) if T == 1 else (_ID_0.expand(T, 1), _WEIGHT_1.expand(T, 1))
        out = self.plan(x_TD, ids, weights, (h_TD, self.norm.weight, self.norm.eps), self.into)
        return out if out is not None else super().__call__(positions_T, h_TD, x_TD, ctx)

    def step_half(self, rows: int) -> cpu_kernels.StepHalf:
        return cpu_kernels.StepHalf(self.plan, (self.norm.weight, self.norm.eps), ids=_ID_0.expand(rows, 1),
                                    weights=_WEIGHT_1.expand(rows, 1))

    @staticmethod
    def fits(mlp: DenseMLP) -> bool:
        return mlp.plain and _bf16_cpu(mlp.gate_up_proj.weight)


class _MoEToken(_OpsMlp):
    """Router in one call where it fits (else the block's ``route``), then routed experts + shared
    expert + residual add + norm in one call (the experts' ``forward_token``); when that declines,
    the block's ops for the routed token."""

    def __init__(self, moe: SparseMoE, norm: RMSNorm):
        super().__init__(moe, norm)
        se, gate = moe.shared_expert, moe.shared_expert_gate
        # (w13, w2), and a gated one's gate row (Qwen2-MoE: the output times sigmoid(gate . x))
        self.shared = None if se is None else (se.gate_up_proj.weight, se.down_proj.weight) + (
            (gate.weight,) if gate is not None else ())
        self.router = self._router(moe)

    @staticmethod
    def _router(moe: SparseMoE) -> cpu_kernels.RouteToken | None:
        """``moe.route`` for a step's rows (one token, or a verify step's few) as one C call, where
        the kernel computes what it computes."""
        rc, gate, bias = moe.router_cfg, moe.gate, moe.e_score_correction_bias
        if rc.use_correction_bias and bias is None:
            return None
        scoring = "topk_softmax" if rc.topk_before_softmax else rc.scoring  # (gpt-oss: softmax over the top k)
        return cpu_kernels.RouteToken.make(gate.weight, gate.bias, scoring, rc.top_k,
                                           bias if rc.use_correction_bias else None, rc.num_groups, rc.topk_groups,
                                           rc.group_score == "top2_sum", rc.renormalize,
                                           1e-20 if rc.scoring == "sigmoid" else 0.0, rc.scaling_factor)

    def __call__(self, positions_T: torch.Tensor, h_TD: torch.Tensor, x_TD: torch.Tensor,
                 ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        moe = self.mlp
        routed = self.router(x_TD) if self.router is not None else None  # (results in the plan's tensors)
        if routed is not None:
            weights_TK, ids_TK = routed
            moe.count(ids_TK, ctx)
        elif x_TD.shape[0] == 1:  # a NaN (or no plan): the block's own routing
            weights_TK, ids_TK = moe.route(x_TD, ctx)
        else:  # row by row, as one-row steps route (the gate's GEMV at one row)
            rows = [moe.route(x_TD[t:t + 1], ctx) for t in range(x_TD.shape[0])]
            weights_TK, ids_TK = torch.cat([w for w, _ in rows]), torch.cat([i for _, i in rows])
        out = moe.experts.forward_token(x_TD, ids_TK, weights_TK, self.shared,
                                        residual=(h_TD, self.norm.weight, self.norm.eps), into=self.into)
        if out is not None:
            return out
        # routed (and counted) already: the rest op by op, row by row at several rows (as one-row
        # steps compute it: e.g. packed experts with biases, which the C call declines)
        rows = [add_norm(h_TD[t:t + 1], moe.experts_and_shared(x_TD[t:t + 1], weights_TK[t:t + 1], ids_TK[t:t + 1],
                                                                ctx), self.norm) for t in range(x_TD.shape[0])]
        return rows[0] if len(rows) == 1 else (torch.cat([h for h, _ in rows]), torch.cat([x for _, x in rows]))

    def step_half(self, rows: int) -> cpu_kernels.StepHalf | None:
        plan = self.mlp.experts.token_plan(self.shared)
        if self.router is None or plan is None:
            return None
        return cpu_kernels.StepHalf(plan, (self.norm.weight, self.norm.eps), route=self.router)

    def experts_plan(self) -> cpu_kernels.MoeToken | cpu_kernels.QuantMoeToken | None:
        """Its experts' one call (bf16, with biases and gpt-oss's clamped SwiGLU; or packed), or None
        (packed experts with those: op by op, a row at a time)."""
        return self.mlp.experts.token_plan(self.shared)

    def count(self, T: int, ctx: ForwardContext) -> None:
        """Count the experts the router plan chose for a step of T rows the C loop ran."""
        self.mlp.count(self.router.ids[:T], ctx)

    @staticmethod
    def fits(moe: SparseMoE) -> bool:
        se = moe.shared_expert
        gate = moe.shared_expert_gate
        return (moe.fused_local and moe.gate.weight.device.type == "cpu"
                and (se is None or (se.plain and (gate is None or (gate.bias is None and gate.weight_format is None)))))


class CapturedDecode:
    """A whole batch-1 step planned once for a model (module docstring): ``captured(ids_T, positions_T, ctx)``
    returns what ``model(ids_T, positions_T, ctx)`` returns, for one sequence and one token, or for
    ``T <= max_rows`` rows ending their sequences (decode tokens of several sequences, verify steps'
    tokens and drafts), each row computed as a one-token step at its position computes it."""

    # rows a step takes (see __init__): where bf16 experts stream from memory, where the weights stay
    # in the last-level cache, where the experts are packed (at most cpu_kernels.RouteToken.MAX_ROWS)
    STREAMED_ROWS, CACHED_ROWS, PACKED_ROWS = 8, 16, 24

    def __init__(self, model: MoECausalLM, halves: list[tuple[Half, Half]], head: torch.nn.Module | None = None,
                 embeds: bool = True):
        self.model, self.halves = model, halves
        self._flat = [h for pair in halves for h in pair]
        # (a given head: its logits are head(h).float(), as an MTP layer's are)
        plain = get_tp_size() == 1 and (head is not None or type(model).compute_logits is MoECausalLM.compute_logits)
        head = head if head is not None else model.lm_head
        head_w = _one_row_weight(head) if plain and head.per_rank == head.vocab else None
        # Steps of several rows (verify rows, several sequences' tokens) run here where every half is
        # one call (an op-by-op half at T rows computes otherwise than at one), each row as a one-token
        # step computes it, each weight read from memory once for all rows: bf16 weights through the
        # kernels' multi-row GEMVs (each expert once for the rows that chose it), packed ones a row
        # after another, back to back, so the rows after the first find them in the caches (the LM head
        # too), where the experts and LM head have their one call; otherwise only where the model fits
        # the last-level cache (those halves then take the rows one at a time). How many
        # rows: the multi-row GEMV's products are vdpbf16ps dot products (no tiles), so past a few rows
        # the op path's tile GEMMs win where bf16 weights stream from memory. Plain decoding against the
        # op path, machine D, in one process: the default model (bf16, cached) 3.5x / 2.0x / 1.5x /
        # 1.25x at 2 / 8 / 12 / 16 concurrent sequences (1.11x at 20, 0.97x at 24); Mixtral's shape in
        # bf16 (streamed) 1.23x / 1.19x / 1.04x at 2 / 4 / 8; in int4 (`--all-linear --activations
        # int8`, packed experts streamed) 2.7x / 2.1x / 1.7x / 1.9x / 1.24x at 2 / 4 / 8 / 16 / 24
        # (0.98x at 32).
        one_call = all(type(h) in (_GqaToken, _MlaToken, _MoEToken, _DenseToken) for h in self._flat)
        fits = weight_bytes(model)["total"] <= cpu_kernels.last_level_cache_bytes()
        experts = [h.experts_plan() for h in self._flat if isinstance(h, _MoEToken)]
        packed = any(isinstance(p, cpu_kernels.QuantMoeToken) for p in experts)
        if not one_call or not (fits or (head_w is not None and all(p is not None for p in experts))):
            self.max_rows = 1
        else:
            self.max_rows = self.PACKED_ROWS if packed else self.CACHED_ROWS if fits else self.STREAMED_ROWS
        # The one-call halves run from one C loop (cpu_kernels.DecodeStep): between two of them no
        # Python op runs, whose cost after each weight stream (cold caches) was ~0.5 ms a step on
        # Mixtral's shape. The loop hands a half back here where it is an op-by-op one, a router
        # meets a NaN or a kernel declines; each half writes to the loop's buffers.
        first_norm = model.layers[0].input_layernorm
        embed = (model.embed_tokens.weight, first_norm.weight, first_norm.eps) \
            if embeds and plain and type(first_norm) is RMSNorm else None
        self.step = cpu_kernels.DecodeStep([h.step_half(self.max_rows) for h in self._flat],
                                           model.cfg.hidden_size, self.max_rows, embed)
        # the LM head of the step's rows in one C call (each as a one-token step's), where it is plain
        self.head = cpu_kernels.LogitsRows(head_w) if head_w is not None else None
        for i, half in enumerate(self._flat[:-1]):  # (the last half's result is new: the caller keeps it)
            if type(half) not in (_OpsAttention, _OpsMlp):
                half.into = self.step.outputs(i)
        self._moe = [i for i, h in enumerate(self._flat) if isinstance(h, _MoEToken) and self.step.plans[i] is not None]
        # the rotary tables each attention half reads, set on the loop again when they grow
        # id(rotary) -> (rotary, its max_pos when its tables were set (-1: not yet), the (cos, sin) set --
        # held so they live while the loop points at them --, [half indices])
        self._rotary: dict[int, tuple] = {}
        for i, h in enumerate(self._flat):
            if isinstance(h, (_GqaToken, _MlaToken)):
                self._rotary.setdefault(id(h.rotary), (h.rotary, -1, None, []))[3].append(i)

    @classmethod
    def capture(cls, model: MoECausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> CapturedDecode | None:
        """The plan for ``model`` with its caches, or None where no half-layer would run as one call
        (not on CPU, not bf16, the C kernels not built, every half split or special)."""
        return cls._capture(model, list(model.layers), model.norm, kv_caches)

    @classmethod
    def capture_mtp(cls, mtp: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
                    ) -> CapturedDecode | None:
        """The plan for a one-layer MTP model (:class:`moe.models.MTPModel`): its decoder layer with
        ``shared_head.norm`` as the final norm and its head; run by :meth:`from_hidden` on the fused input
        (``mtp.fuse``), its logits by :meth:`logits`. None where :meth:`capture` would give None, or for
        several MTP layers (each runs alone, as its own step)."""
        if mtp.num_layers != 1:
            return None
        layer = mtp.layers[0]
        head = layer.shared_head.head if layer.shared_head.head is not None else mtp.lm_head
        return cls._capture(mtp, [layer], layer.shared_head.norm, kv_caches, head=head, embeds=False)

    @classmethod
    def _capture(cls, model: torch.nn.Module, layers: list[DecoderLayer], final_norm: RMSNorm,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], **kw) -> CapturedDecode | None:
        emb = model.embed_tokens.weight
        if not layers or not _bf16_cpu(emb) or cpu_kernels.load() is None:
            return None
        next_norms = [layer.input_layernorm for layer in layers[1:]] + [final_norm]
        halves, fused = [], 0
        for layer, next_norm, (k_cache, v_cache) in zip(layers, next_norms, kv_caches):
            attn, norm, mlp = layer.self_attn, layer.post_attention_layernorm, layer.mlp
            if isinstance(attn, MLAttention) and _MlaToken.fits(attn, k_cache):
                first: Half = _MlaToken(attn, norm, k_cache)
            elif isinstance(attn, Attention) and _GqaToken.fits(attn, k_cache, v_cache):
                first = _GqaToken(attn, norm, k_cache, v_cache)
            else:
                first = _OpsAttention(attn, norm)
            if isinstance(mlp, SparseMoE) and _MoEToken.fits(mlp):
                second: Half = _MoEToken(mlp, next_norm)
            elif isinstance(mlp, DenseMLP) and _DenseToken.fits(mlp):
                second = _DenseToken(mlp, next_norm)
            else:
                second = _OpsMlp(mlp, next_norm)
            fused += (type(first) is not _OpsAttention) + (type(second) is not _OpsMlp)
            halves.append((first, second))
        return cls(model, halves, **kw) if fused else None

    def _grow_rotaries(self, end: int) -> None:
        """Grow the rotary tables to ``end`` positions (the layers read them after); set the loop's
        again where they moved (new tables come only with a new ``max_pos``, a plain attribute: the
        tables themselves are buffers, whose every read goes through ``Module.__getattr__``)."""
        for key, (rot, seen, _, halves) in self._rotary.items():
            if end > rot.max_pos:
                rot.grow_to(end)
            if rot.max_pos != seen:
                tables = (rot.cos, rot.sin)
                for i in halves:
                    self.step.rotary(i, *tables, rot.interleaved)
                self._rotary[key] = (rot, rot.max_pos, tables, halves)

    def _begin(self, T: int, ctx: ForwardContext) -> tuple[tuple, torch.Tensor]:
        """Where the step's rows attend (:func:`step_rows`), with the rotary tables grown to its
        longest sequence, and the buffer the loop's last half writes into."""
        where = step_rows(ctx.meta)
        if self._rotary:
            self._grow_rotaries(ctx.meta.max_context_len)
        return where, torch.empty(T, self.step.D, dtype=torch.bfloat16)

    def __call__(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        (table, context_len, rows), last = self._begin(input_ids_T.shape[0], ctx)
        run = self.step.from_ids(input_ids_T, positions_T, table, context_len, ctx.meta.slot_mapping, last, rows)
        if run is None:  # (the loop does not embed here, or an id is outside the vocabulary)
            return self.from_hidden(self.model.embed_tokens(input_ids_T), positions_T, ctx)
        return self._loop(run, positions_T, ctx, last, (table, context_len, rows))

    def from_hidden(self, h_TD: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The step from the residual stream's first value ``h_TD`` (an embedding, or an MTP layer's fused input)."""
        where, last = self._begin(h_TD.shape[0], ctx)
        table, context_len, rows = where
        run = self.step(0, h_TD, self.model.layers[0].input_layernorm(h_TD), positions_T, table, context_len,
                        ctx.meta.slot_mapping, last, rows)
        return self._loop(run, positions_T, ctx, last, where)

    def _loop(self, run, positions_T: torch.Tensor, ctx: ForwardContext, last: torch.Tensor,
              where: tuple) -> torch.Tensor:
        halves, meta, step = self._flat, ctx.meta, self.step
        table, context_len, rows = where
        T, n = positions_T.shape[0], len(halves)
        i = 0
        while True:
            stop, h, x = run
            if ctx.record_expert_counts:
                for j in self._moe:
                    if i <= j < stop:
                        halves[j].count(T, ctx)
            if stop == n:
                return x
            h, x = halves[stop](positions_T, h, x, ctx)  # the half the loop handed back, its own way
            i = stop + 1
            if i == n:
                return x
            run = step(i, h, x, positions_T, table, context_len, meta.slot_mapping, last, rows)

    @property
    def runs_steps(self) -> bool:
        """Whether :meth:`decode_steps` runs whole steps in C: the loop embeds and runs every half, the
        head is one call."""
        return self.head is not None and self.step.runs_whole

    def decode_steps(self, tokens: list[int], starts: list[int], block_table: torch.Tensor, block_size: int,
                     steps: int, stop: tuple[int, ...] = (), budget_s: float = float("inf"), wake=None,
                     rows_out: torch.Tensor | None = None, sample=None, processing=None,
                     raw=None, on_step=None) -> list[list[int]]:
        """Up to ``steps`` decode steps of ``len(tokens)`` sequences (at most :attr:`max_rows`) in one C
        call, sequence t's next token ``tokens[t]`` at position ``starts[t]``, its blocks row t of
        ``block_table`` (:meth:`cpu_kernels.DecodeStep.decode_steps`): each sequence's tokens that many
        captured steps, their :meth:`logits` and the sampler's choice (greedy, or with ``sample`` row t's
        keyed draw ``sample[t] = (temperature, top_k, top_p, min_p, key)``: ``ops.sample.draw_rows``; its
        logits processed first as ``processing[t]`` says: ``cpu_kernels.sample.LogitProcessing``)
        give one after another, bit for bit, ending after a step in which some sequence chose a token
        in ``stop``, after ``budget_s`` seconds or when ``wake`` changes; [] each where the loop does not
        run the first step (the caller takes it its own way). ``rows_out`` (bf16 ``[steps, T, D]``)
        receives each step's rows :meth:`logits` read; with ``sample``, ``raw[t]`` (float32 ``[steps, V]``
        or None) each step's logits of row t before any processing (its log-probs' source), and
        ``on_step(i, tokens)`` runs before each step's draws (grammars: their masks)."""
        if not self.runs_steps:
            return [[] for _ in tokens]
        if self._rotary:
            self._grow_rotaries(max(starts) + steps)
        return self.step.decode_steps(self.head, tokens, starts, block_table, block_size, steps, stop, budget_s,
                                      wake, rows_out, sample, processing, raw, on_step)

    def logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        """The LM head of a captured step's rows, each as a one-token step's (float32 ``[T, V]``)."""
        logits = self.head(hidden_TD) if self.head is not None else None
        if logits is not None:
            return logits
        model = self.model
        if hidden_TD.shape[0] == 1:
            return model.compute_logits(hidden_TD)
        return torch.cat([model.compute_logits(hidden_TD[t:t + 1]) for t in range(hidden_TD.shape[0])])
