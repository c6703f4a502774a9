/* Whole sub-layers of a batch-1 decode step in one call: at one token a layer's weights stream in
 * ~0.1-0.5 ms, and the dozen Python-level ops around them (each a wrapper, a tensor allocation
 * and a ctypes call) add ~150 us per layer. These functions call the same kernels in the same
 * order with the same roundings (moe_gemv_bf16, moe_rms_norm, moe_rope, moe_heads_vec,
 * moe_paged_decode), so their results are bit-identical to the op-by-op path they replace. They
 * take several rows too (a captured step's verify rows or a few sequences' tokens), each row as a
 * one-row call computes it, the projections' weights read once for the rows (project_rows). */
#include "kernels.h"

/* y = W x (+ bias) in bf16, as ops.linear computes it at one row: the bf16 GEMV (bias added before
 * the one rounding), or for a packed weight ops.packed_linear: q4/q8 GEMM of x in float32 rounded
 * to bf16, then the bf16 bias added (a second rounding, as torch's bf16 addition). ydtype F32 (a
 * packed weight, no bias: the LM head's float32 logits) leaves the GEMM's sums unrounded. Returns
 * 0, -1 without memory (or for a bf16 weight asked for float32). */
int moe_project(const uint16_t *w, const PackedProj *p, int64_t N, int64_t K, const uint16_t *x,
                const uint16_t *bias, void *y, int ydtype, int nt) {
    if (!p) return ydtype == BF16 ? moe_gemv_bf16(w, N, K, K, x, bias, y, nt) : -1;
    float *xf = malloc(sizeof(float) * (size_t)K);
    if (!xf) return -1;
    for (int64_t k = 0; k < K; k++) xf[k] = bf16_to_f32(x[k]);
    const int64_t G = (K + p->gs - 1) / p->gs;
    const int rc = p->x8    ? moe_q4x8_gemm(xf, 1, K, p->q, K / 2, p->s, p->b, G, p->gs, N, y, ydtype, nt)
                   : p->lut ? moe_q4_gemm(xf, 1, K, p->q, K / 2, p->lut, p->s, p->b, G, p->gs, N, y, ydtype, nt)
                            : moe_q8_gemm(xf, 1, K, p->q, K, 0 /* int8 */, p->s, p->b, G, p->gs, 1, N, y, ydtype, nt);
    free(xf);
    if (rc != 0) return -1;
    if (bias) {
        uint16_t *yb = y;
        for (int64_t n = 0; n < N; n++) yb[n] = f32_to_bf16(bf16_to_f32(yb[n]) + bf16_to_f32(bias[n]));
    }
    return 0;
}

/* y rows = W x rows (+ bias) in bf16 for T <= 8 rows (x row stride ldx, y row stride ldy), each row as
 * moe_project computes it at one row: a bf16 weight through moe_gemv_bf16_rows (read once for all
 * rows, each row's sums moe_gemv_bf16's), a packed one row by row. Returns 0, -1 without memory. */
static int project_rows(const uint16_t *w, const PackedProj *p, int64_t N, int64_t K, const uint16_t *x, int64_t ldx,
                        int64_t T, const uint16_t *bias, uint16_t *y, int64_t ldy, int nt) {
    if (p || T == 1) {
        for (int64_t t = 0; t < T; t++)
            if (moe_project(w, p, N, K, x + t * ldx, bias, y + t * ldy, BF16, nt) != 0) return -1;
        return 0;
    }
    const uint16_t *xs[8];
    uint16_t *ys[8];
    for (int64_t t = 0; t < T; t++) {
        xs[t] = x + t * ldx;
        ys[t] = y + t * ldy;
    }
    return moe_gemv_bf16_rows(w, N, K, K, xs, T, bias, ys, nt);
}

/* An attention half's end for T rows: out = o_proj(o) (o: rows ldo apart, K wide), then each row's
 * residual tail. Returns 0, -1 without memory. */
static int out_rows(const uint16_t *w, const PackedProj *p, const uint16_t *bias, int64_t D, int64_t K,
                    const uint16_t *o, int64_t ldo, int64_t T, uint16_t *out, const uint16_t *resid,
                    const uint16_t *nw, float neps, uint16_t *h_out, int nt) {
    if (project_rows(w, p, D, K, o, ldo, T, bias, out, D, nt) != 0) return -1;
    for (int64_t t = 0; t < T; t++)
        then_norm(out + t * D, D, resid ? resid + t * D : NULL, nw, neps, h_out ? h_out + t * D : NULL);
    return 0;
}

/* Row t's of T rows: its blocks, and in *len_t the cached tokens it attends over (without toff the
 * rows of one sequence ending its len tokens, with toff row t's table row and lens[t]). */
static inline const int32_t *row_blocks(const int32_t *table, int32_t len, const int64_t *toff, const int32_t *lens,
                                        int64_t T, int64_t t, int32_t *len_t) {
    *len_t = toff ? lens[t] : len - (int32_t)(T - 1 - t);
    return toff ? table + toff[t] : table;
}

/* An attention half's kernel for up to its plan's rows (gqa_rows, mla_rows), and its calls for T
 * rows, R at a time: one sequence's rows t .. t + n - 1 end its first len - (T - t - n) tokens. */
typedef int (*AttnRows)(const void *plan, const uint16_t *x, int64_t T, const int64_t *pos, const float *cos_tab,
                        const float *sin_tab, int interleaved, const int32_t *table, int32_t len, const int64_t *toff,
                        const int32_t *lens, const int64_t *slots, uint16_t *out, const uint16_t *resid,
                        const uint16_t *nw, float neps, uint16_t *h_out, int nt);

static int attn_in_chunks(AttnRows f, const void *plan, int64_t D, int64_t R, const uint16_t *x, int64_t T,
                          const int64_t *pos, const float *cos_tab, const float *sin_tab, int interleaved,
                          const int32_t *table, int32_t len, const int64_t *toff, const int32_t *lens,
                          const int64_t *slots, uint16_t *out, const uint16_t *resid, const uint16_t *nw, float neps,
                          uint16_t *h_out, int nt) {
    for (int64_t t = 0; t < T; t += R) {
        const int64_t n = T - t < R ? T - t : R;
        if (f(plan, x + t * D, n, pos + t, cos_tab, sin_tab, interleaved, table, len - (int32_t)(T - t - n),
              toff ? toff + t : NULL, lens ? lens + t : NULL, slots + t, out + t * D, resid ? resid + t * D : NULL,
              nw, neps, h_out ? h_out + t * D : NULL, nt) != 0)
            return -1;
    }
    return 0;
}

/* DeepSeek's multi-head latent attention for one decode token (moe.models.mla.MLAttention.forward
 * at T = 1, bf16, no biases, one tensor-parallel rank):
 *   q = q_b(rms(q_a(x)))  (w_qa NULL: q = q_proj(x), w_qb being q_proj)     [H, nope + rope]
 *   [c | k_pe] = kv_a(x); c = rms(c)                                         [C + rope]
 *   q_pe, k_pe rotated at pos[0]; the latent row [c | k_pe] written at cache slot slots[0]
 *   q_lat[h] = q_nope[h] @ W_UK[h]; attention of [q_lat | q_pe] over the sequence's cached rows
 *   (V = the first C dims); o[h] = W_UV[h] @ o_lat[h]; out = o_proj(o)      [D]
 * w_kvb: [H * (nope + v), C] (W_UK[h] its rows h*(nope+v) .. +nope, W_UV[h] the next v). The cache
 * is [blocks, block_size, 1, C + rope] with element strides (c_sblock, c_sslot), c_sblock =
 * block_size * c_sslot (bf16, or with fp8 e4m3 rows and their scales, written as write_fp8 writes them); table: the sequence's blocks, len: its tokens after this one is written.
 * p_qa, p_qb, p_kva, p_o: those projections' packed weights (NULL: the bf16 w_*; W_UK / W_UV stay
 * bf16). scratch: rows x (q_lora + H*(nope+rope) + (C+rope) + H*(C+rope) + H*C + H*v) bf16. Returns 0,
 * -1 without memory. */
static int mla_rows(const void *plan, const uint16_t *x, int64_t T, const int64_t *pos, const float *cos_tab,
                    const float *sin_tab, int interleaved, const int32_t *table, int32_t len, const int64_t *toff,
                    const int32_t *lens, const int64_t *slots, uint16_t *out, const uint16_t *resid,
                    const uint16_t *nw, float neps, uint16_t *h_out, int nt) {
    const MlaPlan *a = plan;
    const int64_t D = a->D, q_lora = a->q_lora, H = a->H, nope = a->nope, rope = a->rope, C = a->C, v = a->v;
    const int64_t c_sblock = a->c_sblock, c_sslot = a->c_sslot;
    const uint16_t *w_kvb = a->w_kvb;
    uint16_t *cache = a->cache;
    const int64_t qk = nope + rope, L = C + rope;
    const int64_t S = q_lora + H * qk + L + H * L + H * C + H * v; /* a row's scratch */
    uint16_t *qa = a->scratch, *q = qa + q_lora, *lat = q + H * qk, *qfull = lat + L, *olat = qfull + H * L,
             *o = olat + H * C; /* row 0's; row t's t * S further */
    if (a->w_qa || a->p_qa) {
        if (project_rows(a->w_qa, a->p_qa, q_lora, D, x, D, T, NULL, qa, S, nt) != 0) return -1;
        for (int64_t t = 0; t < T; t++)
            moe_rms_norm(qa + t * S, a->qa_norm, qa + t * S, BF16, 1, q_lora, q_lora, q_lora, a->q_eps, nt);
        if (project_rows(a->w_qb, a->p_qb, H * qk, q_lora, qa, S, T, NULL, q, S, nt) != 0) return -1;
    } else if (project_rows(a->w_qb, a->p_qb, H * qk, D, x, D, T, NULL, q, S, nt) != 0) {
        return -1;
    }
    if (project_rows(a->w_kva, a->p_kva, L, D, x, D, T, NULL, lat, S, nt) != 0) return -1;
    for (int64_t t = 0; t < T; t++) { /* row t: as a one-row call at its position (its latent written first) */
        uint16_t *q_t = q + t * S, *lat_t = lat + t * S, *qfull_t = qfull + t * S, *olat_t = olat + t * S;
        int32_t len_t;
        const int32_t *table_t = row_blocks(table, len, toff, lens, T, t, &len_t);
        /* the latent row: into the cache (bf16), or (fp8) built in olat_t's room and quantized into it */
        uint16_t *row = a->fp8 ? olat_t : cache + slots[t] * c_sslot;
        moe_rms_norm(lat_t, a->kva_norm, row, BF16, 1, C, L, L, a->kv_eps, nt);
        memcpy(row + C, lat_t + C, sizeof(uint16_t) * (size_t)rope);
        /* (the captured step grows the tables to its positions before its loop: no check here) */
        moe_rope(row + C, BF16, 1, 1, rope, L, rope, pos + t, INT64_MAX, cos_tab, sin_tab, interleaved, 1);
        if (a->fp8) {
            const int64_t s = slots[t], at = (s / a->block_size) * a->fp8->sblock + (s % a->block_size) * a->fp8->sslot;
            moe_quantize_e4m3(row, 1, L, (uint8_t *)cache + s * c_sslot, L, a->fp8->k + at, 1);
        }
        moe_heads_vec(q_t, qk, w_kvb, (nope + v) * C, C, C, nope, H, 0, qfull_t, L, nt);
        for (int64_t h = 0; h < H; h++)
            memcpy(qfull_t + h * L + C, q_t + h * qk + nope, sizeof(uint16_t) * (size_t)rope);
        moe_rope(qfull_t + C, BF16, 1, H, rope, H * L, L, pos + t, INT64_MAX, cos_tab, sin_tab, interleaved, 1);
        moe_paged_decode(qfull_t, olat_t, cache, cache, BF16, a->fp8, 1, H, 1, L, C, c_sblock, c_sslot, L, c_sblock,
                         c_sslot, L, a->block_size, table_t, 0, &len_t, NULL, 0, NULL, a->scale, nt);
        moe_heads_vec(olat_t, C, w_kvb + nope * C, (nope + v) * C, C, v, C, H, 1, o + t * S, v, nt);
    }
    return out_rows(a->w_o, a->p_o, NULL, D, H * v, o, S, T, out, resid, nw, neps, h_out, nt);
}

/* T rows as gqa_rows takes them (below: one sequence's, or with toff several sequences'), a->rows at
 * a time, each computing what a one-row call at its position computes; projections (not the
 * absorbed W_UK / W_UV, read per row) read once for the rows. */
int moe_mla_token(const MlaPlan *a, const uint16_t *x, int64_t T, const int64_t *pos, const float *cos_tab,
                  const float *sin_tab, int interleaved, const int32_t *table, int32_t len, const int64_t *toff,
                  const int32_t *lens, const int64_t *slots, uint16_t *out, const uint16_t *resid, const uint16_t *nw,
                  float neps, uint16_t *h_out, int nt) {
    return attn_in_chunks(mla_rows, a, a->D, a->rows, x, T, pos, cos_tab, sin_tab, interleaved, table, len, toff, lens,
                          slots, out, resid, nw, neps, h_out, nt);
}

/* Grouped-query attention for one decode token (moe.models.layers.Attention.forward at T = 1,
 * bf16, one tensor-parallel rank):
 *   [q | k | v] = qkv_proj(x) (+ bias)                       [(H + 2 Hkv) hd]
 *   qk_norm 2: RMSNorm over all q dims and all k dims; then with clip > 0 q, k, v clamped to
 *   [-clip, clip]; qk_norm 1: RMSNorm per head (weights [hd])
 *   q, k rotated at pos[0] (the whole head); k, v written at cache slot slots[0]
 *   attention over the sequence's cached rows (window > 0: the last `window`; sinks: float32 [H]
 *   or NULL); out = o_proj(o) (+ bias)                         [D]
 * Caches [blocks, block_size, Hkv, hd] with element strides (sblock, sslot, shead), sblock =
 * block_size * sslot: bf16, or with fp8 e4m3 rows and their scales (k, v written as the op path's
 * kvcache.fp8.write_fp8 writes them). p_qkv / p_o: the projections' packed weights (NULL: w_qkv / w_o in bf16).
 * scratch: rows x ((H + 2 Hkv) hd + H hd) bf16. T > 1: T rows, row t at pos[t], written at slots[t],
 * so each computes what a one-row call at its position computes: without toff, rows of one sequence
 * (the decode token and its drafts: a verify step), row t attending over the first len - (T - 1 - t)
 * cached rows of table; with toff, rows of several sequences, row t's blocks at table + toff[t],
 * attending over its first lens[t]. Up to a->rows rows at a time, whose bf16 projections read their
 * weights once for all of them (moe_gemv_bf16_rows: each row's sums as moe_gemv_bf16's); x, out,
 * resid, h_out: T rows of D.
 * Returns 0, -1 without memory (nothing written then at one row; at T rows earlier rows' K/V may be
 * written: the caller's op path writes them again). */
static int gqa_rows(const void *plan, const uint16_t *x, int64_t T, const int64_t *pos, const float *cos_tab,
                    const float *sin_tab, int interleaved, const int32_t *table, int32_t len, const int64_t *toff,
                    const int32_t *lens, const int64_t *slots, uint16_t *out, const uint16_t *resid,
                    const uint16_t *nw, float neps, uint16_t *h_out, int nt) {
    const GqaPlan *a = plan;
    const int64_t D = a->D, H = a->H, Hkv = a->Hkv, hd = a->hd, S = (2 * H + 2 * Hkv) * hd;
    const float eps = a->eps;
    uint16_t *k_cache = a->k_cache, *v_cache = a->v_cache;
    if (project_rows(a->w_qkv, a->p_qkv, (H + 2 * Hkv) * hd, D, x, D, T, a->b_qkv, a->scratch, S, nt) != 0) return -1;
    for (int64_t t = 0; t < T; t++) {  /* row t: as a one-row call at its position */
        const int64_t slot = slots[t];
        int32_t len_t;
        const int32_t *table_t = row_blocks(table, len, toff, lens, T, t, &len_t);
        uint16_t *q = a->scratch + t * S, *k = q + H * hd, *v = k + Hkv * hd, *o = v + Hkv * hd;
        if (a->qk_norm == 2) {
            moe_rms_norm(q, a->q_norm, q, BF16, 1, H * hd, H * hd, H * hd, eps, 1);
            moe_rms_norm(k, a->k_norm, k, BF16, 1, Hkv * hd, Hkv * hd, Hkv * hd, eps, 1);
        }
        if (a->clip > 0) {  /* after a norm over all dims, before a per-head one (Attention.forward's order) */
            const float c = a->clip;
            const uint16_t hi = f32_to_bf16(c), lo = f32_to_bf16(-c);
            for (int64_t i = 0; i < (H + 2 * Hkv) * hd; i++) { /* q | k | v; NaN compares false: kept, as clamp */
                const float f = bf16_to_f32(q[i]);
                q[i] = f > c ? hi : f < -c ? lo : q[i];
            }
        }
        if (a->qk_norm == 1) {
            moe_rms_norm(q, a->q_norm, q, BF16, H, hd, hd, hd, eps, 1);
            moe_rms_norm(k, a->k_norm, k, BF16, Hkv, hd, hd, hd, eps, 1);
        }
        moe_rope(q, BF16, 1, H + Hkv, hd, (H + Hkv) * hd, hd, pos + t, INT64_MAX, cos_tab, sin_tab, interleaved, 1);
        for (int64_t h = 0; h < Hkv; h++) {
            if (a->fp8) {  /* e4m3 rows (strides in bytes) and their scales, as the op path's write_kv */
                const Fp8Scales *f = a->fp8;
                const int64_t at = (slot / a->block_size) * f->sblock + (slot % a->block_size) * f->sslot + h * f->shead;
                moe_quantize_e4m3(k + h * hd, 1, hd, (uint8_t *)k_cache + slot * a->k_sslot + h * a->k_shead, hd,
                                  f->k + at, 1);
                moe_quantize_e4m3(v + h * hd, 1, hd, (uint8_t *)v_cache + slot * a->v_sslot + h * a->v_shead, hd,
                                  f->v + at, 1);
                continue;
            }
            memcpy(k_cache + slot * a->k_sslot + h * a->k_shead, k + h * hd, sizeof(uint16_t) * (size_t)hd);
            memcpy(v_cache + slot * a->v_sslot + h * a->v_shead, v + h * hd, sizeof(uint16_t) * (size_t)hd);
        }
        moe_paged_decode(q, o, k_cache, v_cache, BF16, a->fp8, 1, H, Hkv, hd, hd, a->k_sblock, a->k_sslot, a->k_shead,
                         a->v_sblock, a->v_sslot, a->v_shead, a->block_size, table_t, 0, &len_t, NULL, a->window,
                         a->sinks, a->scale, nt);
    }
    const int64_t o_at = (H + 2 * Hkv) * hd;
    return out_rows(a->w_o, a->p_o, a->b_o, D, H * hd, a->scratch + o_at, S, T, out, resid, nw, neps, h_out, nt);
}

int moe_gqa_token(const GqaPlan *a, const uint16_t *x, int64_t T, const int64_t *pos, const float *cos_tab,
                  const float *sin_tab, int interleaved, const int32_t *table, int32_t len, const int64_t *toff,
                  const int32_t *lens, const int64_t *slots, uint16_t *out, const uint16_t *resid, const uint16_t *nw,
                  float neps, uint16_t *h_out, int nt) {
    return attn_in_chunks(gqa_rows, a, a->D, a->rows, x, T, pos, cos_tab, sin_tab, interleaved, table, len, toff, lens,
                          slots, out, resid, nw, neps, h_out, nt);
}
