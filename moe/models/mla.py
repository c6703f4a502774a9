"""DeepSeek multi-head latent attention (MLA) with a compressed KV cache.

The cache holds, per token, the normalized latent ``c`` (kv_lora_rank) and the shared rotary
key ``k_pe`` (qk_rope_head_dim): one "head" of ``kv_lora_rank + rope`` dims instead of full
K and V for every head. Decode rows and chunks of up to 16 rows attend in the absorbed form: the
per-head key up-projection W_UK is folded into the query and the value up-projection W_UV is
applied after attention, so keys and values are read straight from the latent cache (V is a view
of its first kv_lora_rank dims). Longer prompt chunks attend in whichever form costs fewer FLOPs
(:meth:`MLAttention.decompresses`): the decompressed form (per-head K and V from the latents, as
the reference implementation computes them) reads fewer dims per query-key pair and pays for
decompressing the chunk's cached prefix, so a fresh prompt always takes it.
"""
from __future__ import annotations

import torch
from torch import nn

from kvcache import AttentionMetadata, causal_attention, paged_attention, seq_kv, write_kv
from kvcache.attention import KERNEL_MAX_QUERY
from ops import per_head as _per_head
from parallel import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, get_tp_size

from ..config import ModelConfig
from .layers import ForwardContext, RMSNorm
from .rope import RotaryEmbedding


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        m = cfg.mla
        self.layer_idx = layer_idx
        tp = get_tp_size()
        if cfg.num_heads % tp:
            raise ValueError(f"num_attention_heads ({cfg.num_heads}) is not divisible by tensor_parallel ({tp})")
        self.num_heads = cfg.num_heads // tp  # heads split over TP ranks; the latent cache is replicated
        self.nope, self.rope_dim, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.kv_lora_rank = m.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        if m.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, [cfg.num_heads * qk_dim], dtype=dtype)
        else:
            self.q_a_proj = ReplicatedLinear(cfg.hidden_size, m.q_lora_rank, bias=cfg.attention_bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, 1e-6, dtype)
            self.q_b_proj = ColumnParallelLinear(m.q_lora_rank, [cfg.num_heads * qk_dim], dtype=dtype)
        self.q_lora = m.q_lora_rank is not None
        self.kv_a_proj_with_mqa = ReplicatedLinear(cfg.hidden_size, m.kv_lora_rank + self.rope_dim,
                                                   bias=cfg.attention_bias, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, 1e-6, dtype)
        self.kv_b_proj = ColumnParallelLinear(m.kv_lora_rank, [cfg.num_heads * (self.nope + self.v_dim)], dtype=dtype)
        self.o_proj = RowParallelLinear(cfg.num_heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias,
                                        dtype=dtype)
        self.rotary = RotaryEmbedding(self.rope_dim, cfg.max_position_embeddings, cfg.rope, cfg.rope_interleaved)
        self.scale = cfg.softmax_scale or qk_dim ** -0.5

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T, H = x_TD.shape[0], self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_TD))) if self.q_lora else self.q_proj(x_TD)
        q_nope, q_pe = q.view(T, H, self.nope + self.rope_dim).split([self.nope, self.rope_dim], dim=-1)
        latent = self.kv_a_proj_with_mqa(x_TD)
        c_TC, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_TC = self.kv_a_layernorm(c_TC)
        q_pe, k_pe = self.rotary(positions_T, q_pe, k_pe.unsqueeze(1))

        # [blocks, block_size, 1, C + rope] and its first C dims (a view) as V
        cache, v_cache = ctx.kv_caches[self.layer_idx]
        meta = ctx.meta
        write_kv(cache, None, torch.cat([c_TC.unsqueeze(1), k_pe], dim=-1), None, meta.slot_mapping)
        chunks = [i for i, (n, L) in enumerate(zip(meta.query_lens_list, meta.context_lens_list))
                  if self.decompresses(n, L)]
        if not chunks:
            o = self._attend_absorbed(q_nope, q_pe, cache, v_cache, meta)
        else:  # the chunks decompresses() picks in the decompressed form, the other sequences absorbed
            o = q.new_empty(T, H, self.v_dim)
            starts = meta.query_start_loc.tolist()
            for i in chunks:
                o[starts[i]:starts[i + 1]] = self._attend_mha(q_nope[starts[i]:starts[i + 1]],
                                                              q_pe[starts[i]:starts[i + 1]], cache, meta, i)
            short = sorted(set(range(meta.num_seqs)) - set(chunks))
            if short:
                sub, rows = meta.select(short)
                o[rows] = self._attend_absorbed(q_nope[rows], q_pe[rows], cache, v_cache, sub)
        return self.o_proj(o.reshape(T, H * self.v_dim))

    @property
    def mha_min_query(self) -> int:
        """Prompt chunks of fewer rows always attend absorbed (the decode kernel takes them)."""
        return KERNEL_MAX_QUERY + 1

    def decompresses(self, query_len: int, context_len: int) -> bool:
        """Whether a prompt chunk of ``query_len`` rows over ``context_len`` keys (its own rows
        included) attends in the decompressed form: the form of fewer FLOPs. Per head, with C latent
        dims and ``pairs`` the chunk's causal query-key pairs: the absorbed form runs W_UK and W_UV
        on every row, T C (nope + v), and reads C + rope dims for each pair's score and C for its
        value; the decompressed form runs kv_b_proj on every key, L C (nope + v), and reads
        nope + rope and v dims a pair (padded to one size, SDPA's flash kernel). So a fresh prompt
        (L = T) is always cheaper decompressed, and after a prefix P = L - T the decompressed form
        pays P C (nope + v) for the prefix's keys against what the pairs save. Measured on the
        DeepSeek-V3-shaped benchmark model (TTFT, both forms alternating, machine D): fresh prompts
        of 32 / 64 / 128 rows 1.05x / 1.06x / 1.10x decompressed, as the model says; 64 rows after 64
        or 512 cached tokens 0.93x / 0.90x (the model: absorbed). With a long prefix the rule tends
        to T > C (nope + v) / saving, 187 rows at DeepSeek-V3's dims, the only rule before."""
        if query_len < self.mha_min_query:
            return False
        T, L = query_len, context_len
        pairs = T * (L - T) + T * (T + 1) // 2
        d = max(self.nope + self.rope_dim, self.v_dim)  # head dims padded to one size
        proj = self.kv_lora_rank * (self.nope + self.v_dim)
        absorbed = T * proj + pairs * (2 * self.kv_lora_rank + self.rope_dim)
        decompressed = L * proj + pairs * 2 * d
        return decompressed < absorbed

    def _attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache, v_cache,
                         meta: AttentionMetadata) -> torch.Tensor:
        """Attention over the latent cache with W_UK folded into the query and W_UV applied after:
        one KV "head" of C + rope dims read once for all heads (decode rows, short prompts)."""
        w_uk, w_uv = self._absorbed()
        q_lat = _per_head(q_nope, w_uk, "thn,hnc->thc")
        q_full = torch.cat([q_lat, q_pe], dim=-1)  # [T, H, C + rope]
        o_lat = paged_attention(q_full, cache, v_cache, meta, self.scale)
        return _per_head(o_lat, w_uv, "thc,hvc->thv")

    def _attend_mha(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache, meta: AttentionMetadata,
                    i: int) -> torch.Tensor:
        """Sequence ``i``'s rows (a prompt chunk) in the decompressed form, as the reference
        implementation computes it: per-head K and V from its cached latents through kv_b_proj,
        then causal attention with nope + rope dims per head. For a long chunk this costs ~3x fewer
        FLOPs than the absorbed form's C + rope dims per head (and no per-head GEMMs)."""
        L = meta.context_lens_list[i]
        H, nope, vd = self.num_heads, self.nope, self.v_dim
        kv = seq_kv(cache, meta, i, L, q_nope.dtype)[:, 0]  # [L, C + rope]
        kv_h = self.kv_b_proj(kv[:, : self.kv_lora_rank].contiguous()).view(L, H, nope + vd)
        k = torch.cat([kv_h[..., :nope], kv[:, None, self.kv_lora_rank:].expand(L, H, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return causal_attention(q, k, kv_h[..., nope:], self.scale)

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK ``[H, nope, C]`` and W_UV ``[H, v, C]``: views of kv_b_proj's weight."""
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w_kv[:, : self.nope], w_kv[:, self.nope:]

    def warm_up(self, rows: list[int]) -> int:
        """Run the two per-head GEMMs at every row count in ``rows`` once (see moe.warmup)."""
        w_uk, w_uv = self._absorbed()
        H = self.num_heads
        for t in rows:
            _per_head(w_uk.new_zeros(t, H, self.nope), w_uk, "thn,hnc->thc")
            _per_head(w_uv.new_zeros(t, H, self.kv_lora_rank), w_uv, "thc,hvc->thv")
        return 2 * len(rows)
