/* bf16 GEMMs on AMX tiles, weights read in place: decode-sized steps (1-64 rows), and the experts
 * at any number of rows (each expert's rows in even chunks of up to 256, a weight block read once
 * per chunk; chunks of 208+ rows as 2 x 2 tiles over k segments, see dot_pairs and PAIRS_TB):
 *   moe_amx_moe      a local MoE layer after the router: dispatch, SwiGLU experts, combine;
 *   moe_amx_experts  SwiGLU experts over rows already grouped by expert;
 *   moe_amx_linear   a projection (or the LM head, float32 out);
 *   moe_amx_heads    one GEMM per head (MLA's absorbed W_UK and W_UV).
 *
 * A weight block of 16 rows is an AMX A tile read in place (16 rows x 32 bf16, row stride = the
 * weight's); the tokens are packed once per call as B tiles (pairs of k interleaved, VNNI order:
 * tile row p holds (x[t][2p], x[t][2p+1]) for 16 tokens t), so no weight is ever repacked or
 * copied (W_UK, whose rows run along the output, is the B operand instead: two rows interleaved
 * as each tile is needed). Tile dot products sum in float32; every result is rounded where the
 * op-by-op torch path rounds (gate and up to bf16, SwiGLU as moe_silu_mul, the weighting and the
 * float32 sum per token of the combine), so results equal that path up to the order of float32
 * sums (bit-identical in the tests where both run on AMX). Experts with biases add them to the
 * rounded gate/up and down results (transformers' gpt-oss: bmm, then + bias), its clamped SwiGLU
 * with each op's rounding (kernels.h's StackedExtras). Built where the compiler targets
 * AMX-BF16 (-march=native on such a CPU); moe_amx_init asks Linux for the tile state and returns -1
 * where it is refused. On a CPU with AVX512-BF16 but no AMX (AMD Zen 4 and later, Cooper Lake) the
 * same kernels run with every tile product done by vdpbf16ps (amx.h's emu_tiles: the tile layouts
 * and everything around the products unchanged) and moe_amx_init returns 1; elsewhere every entry
 * returns -1. */
#include "amx.h"

#include <omp.h>

#if defined(HAVE_TILES)
#define MAX_TB 4         /* token blocks of 16 per tile pass (four float32 sum tiles): 64 rows */
#define CHUNK_TB 16      /* token blocks of an expert's rows per chunk (256 rows): each 16-row weight
                          * block, read once per chunk, meets them from cache four blocks at a time */
#define BOUND_TB 4       /* from this many token blocks an expert runs as chunks of its own (blocks
                          * handed out as threads free up); fewer run with the other small experts,
                          * each thread a contiguous range of their weight blocks */

/* From this many token blocks a chunk's products run as dot_pairs' 2 x 2 tiles over k segments,
 * fewer as dot_blocks' 1 x 4 (the weight block read once per four token blocks, from cache after the
 * first). On AMX (machine D, one expert at m rows, old/new alternating): dot_blocks 1.4x at 64 rows
 * (F = 2816 and 1408; 1.0x at F = 512), 1.15-1.25x at 96-128, 1.04-1.12x at 160-192; level at 208-224,
 * dot_pairs ahead from there on F = 2816 (1.15x at 240, 1.04x in Mixtral's 256-row chunks). With both
 * loops' weight prefetches into L2 (below), again: 0.97-1.06x either way at 208 rows, dot_pairs 3-6%
 * ahead at 240-256 on F = 1408 / 2816, 2-5% behind on F = 512. Without AMX (emu_tiles) the crossover
 * was not measured: BOUND_TB as before. */
#if defined(HAVE_AMX)
#define PAIRS_TB 13
#else
#define PAIRS_TB BOUND_TB
#endif

/* c[tb][16 rows][16 tokens] = W[16 rows, 0:K] . B tiles (ntb token blocks of tile chunks,
 * `bstride` elements apart), float32. l8: the last block holds 1-8 tokens (emu_tiles' hint). */
#if defined(HAVE_AMX)
static void dot_block(const uint16_t *w, int64_t ldw, int64_t K, const uint16_t *b, int64_t bstride, int ntb,
                      int l8, float *c, const uint16_t *pf) {
    (void)l8;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    /* the next weight block's 16 rows, one line each per step, while this one computes: into L2
     * where a block is 16 KB or more (K >= 512; with the token tiles and this block they would
     * overflow L1 and evict lines before their loads: 1.02-1.26x at 4-64 rows, machine D), else
     * into L1 (K = 256: 0.92x into L2 at 4-8 rows) */
    const int l2 = K >= 512;
    for (int64_t k = 0; k < K; k += KC, b += TILE) {
        if (pf && l2)
            for (int r = 0; r < 16; r++) _mm_prefetch((const char *)(pf + r * ldw + k), _MM_HINT_T1);
        else if (pf)
            for (int r = 0; r < 16; r++) _mm_prefetch((const char *)(pf + r * ldw + k), _MM_HINT_T0);
        _tile_loadd(4, w + k, ldw * 2);
        _tile_loadd(5, b, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (ntb > 1) {
            _tile_loadd(6, b + bstride, 64);
            _tile_dpbf16ps(1, 4, 6);
        }
        if (ntb > 2) {
            _tile_loadd(7, b + 2 * bstride, 64);
            _tile_dpbf16ps(2, 4, 7);
        }
        if (ntb > 3) {
            _tile_loadd(5, b + 3 * bstride, 64);
            _tile_dpbf16ps(3, 4, 5);
        }
    }
    _tile_stored(0, c, 64);
    if (ntb > 1) _tile_stored(1, c + 256, 64);
    if (ntb > 2) _tile_stored(2, c + 512, 64);
    if (ntb > 3) _tile_stored(3, c + 768, 64);
}

#else
static void dot_block(const uint16_t *w, int64_t ldw, int64_t K, const uint16_t *b, int64_t bstride, int ntb,
                      int l8, float *c, const uint16_t *pf) {
    (void)pf;  /* (emu_tiles prefetches its own rows, further ahead) */
    emu_tiles(w, ldw, K, b, bstride, ntb, l8, c, 0);
}
#endif

/* dot_block over ntb <= CHUNK_TB token blocks, four at a time (the weight rows stay in cache);
 * pf (or NULL): the next block's weight rows, fetched during the first pass */
static void dot_blocks(const uint16_t *w, int64_t ldw, int64_t K, const uint16_t *b, int64_t bstride, int ntb,
                       int l8, float *c, const uint16_t *pf) {
    for (int g = 0; g < ntb; g += MAX_TB) {
        const int n = ntb - g < MAX_TB ? ntb - g : MAX_TB;
        dot_block(w, ldw, K, b + g * bstride, bstride, n, g + n == ntb && l8, c + g * 256, g == 0 ? pf : NULL);
    }
}

/* The compute-bound form of dot_blocks for two weight blocks at once (chunks of PAIRS_TB+ token blocks):
 * ca[tb] = Wa . B[tb] and cb[tb] = Wb . B[tb] for tb < ntb, float32 [16 rows][16 tokens] each. Tiles
 * 2 x 2 (two weight blocks x two token blocks: four loads feed four products, against five for
 * dot_block's 1 x 4), and k in segments of KSEG: the two weight blocks' 32 rows x KSEG (16 KB),
 * copied once per segment into tile order, stay in L1 while every token pair of the chunk passes,
 * the float32 sums parked in ca/cb between segments (stored and reloaded exactly, so each sum sees
 * the same products in the same order as dot_block: bit-identical results). With the token tiles
 * prefetched, 1.15-1.24x the 1 x 4 loop in the experts kernel at 2048 tokens, the copy another
 * 1.04-1.12x (docs/benchmarks.md). */
#if defined(HAVE_AMX)
#define KSEG 256
#define PD 2  /* token tiles prefetched this many k steps ahead */
static void dot_pairs(const uint16_t *wa, const uint16_t *wb, int64_t ldw, int64_t K, const uint16_t *b,
                      int64_t bstride, int ntb, float *ca, float *cb, const uint16_t *pfa, const uint16_t *pfb) {
    uint16_t seg[2 * (KSEG / KC) * TILE] __attribute__((aligned(64)));  /* the segment's weight tiles */
    for (int64_t k0 = 0; k0 < K; k0 += KSEG) {
        const int64_t k1 = K - k0 < KSEG ? K : k0 + KSEG;
        /* the two blocks' rows x this segment copied once into tile order (tile s of wa, then of wb,
         * each 16 rows of 64 bytes back to back): read in place, rows a row stride apart (2 KB for
         * D = 1024) fall in a few L1 sets and evict each other before the next token pair */
        for (int64_t k = k0, s = 0; k < k1; k += KC, s++)
            for (int r = 0; r < 16; r++) {
                _mm512_store_si512(seg + (2 * s) * TILE + r * 32, _mm512_loadu_si512(wa + r * ldw + k));
                _mm512_store_si512(seg + (2 * s + 1) * TILE + r * 32, _mm512_loadu_si512(wb + r * ldw + k));
            }
        for (int g = 0; g < ntb; g += 2) {
            const uint16_t *b0 = b + g * bstride + (k0 / KC) * TILE;
            float *a0 = ca + g * 256, *c0 = cb + g * 256;
            if (g + 1 < ntb) {  /* sums: 0 = (a, g), 1 = (a, g+1), 2 = (b, g), 3 = (b, g+1) */
                if (k0 == 0) {
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                } else {
                    _tile_loadd(0, a0, 64);
                    _tile_loadd(1, a0 + 256, 64);
                    _tile_loadd(2, c0, 64);
                    _tile_loadd(3, c0 + 256, 64);
                }
                const uint16_t *b1 = b0 + bstride;
                /* where the token tiles PD steps ahead lie: this pair's, then the next pair's in
                 * this segment, then the first pair's of the next segment */
                const uint16_t *next = g + 2 < ntb ? b + (g + 2) * bstride + (k0 / KC) * TILE
                                     : k1 < K ? b + (k1 / KC) * TILE : NULL;
                const int64_t nk = (k1 - k0) / KC;
                for (int64_t k = k0, s = 0; k < k1; k += KC, s++, b0 += TILE, b1 += TILE) {
                    /* token tiles into L1 ahead of their loads (from L2 they stall the tiles) */
                    const uint16_t *p0 = s + PD < nk ? b0 + PD * TILE : next ? next + (s + PD - nk) * TILE : NULL;
                    if (p0)
                        for (int l = 0; l < 16; l++) {
                            _mm_prefetch((const char *)(p0 + 32 * l), _MM_HINT_T0);
                            _mm_prefetch((const char *)(p0 + bstride + 32 * l), _MM_HINT_T0);
                        }
                    if (g == 0) {  /* the weights' next segment (or the next blocks' first), a line per row,
                                    * into L2 as dot_block's (the segment copy reads them once; into L1
                                    * they met the token tiles' traffic: 1.02-1.04x into L2) */
                        const int64_t q = k + KSEG;
                        const uint16_t *na = q < K ? wa + q : pfa ? pfa + (q - K) : NULL;
                        const uint16_t *nb = q < K ? wb + q : pfb ? pfb + (q - K) : NULL;
                        if (na)
                            for (int r = 0; r < 16; r++) {
                                _mm_prefetch((const char *)(na + r * ldw), _MM_HINT_T1);
                                _mm_prefetch((const char *)(nb + r * ldw), _MM_HINT_T1);
                            }
                    }
                    _tile_loadd(4, seg + (2 * s) * TILE, 64);
                    _tile_loadd(6, b0, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_loadd(7, b1, 64);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_loadd(5, seg + (2 * s + 1) * TILE, 64);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, a0, 64);
                _tile_stored(1, a0 + 256, 64);
                _tile_stored(2, c0, 64);
                _tile_stored(3, c0 + 256, 64);
            } else {  /* an odd last token block: 2 x 1 */
                if (k0 == 0) {
                    _tile_zero(0);
                    _tile_zero(2);
                } else {
                    _tile_loadd(0, a0, 64);
                    _tile_loadd(2, c0, 64);
                }
                for (int64_t k = k0, s = 0; k < k1; k += KC, s++, b0 += TILE) {
                    _tile_loadd(4, seg + (2 * s) * TILE, 64);
                    _tile_loadd(6, b0, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_loadd(5, seg + (2 * s + 1) * TILE, 64);
                    _tile_dpbf16ps(2, 5, 6);
                }
                _tile_stored(0, a0, 64);
                _tile_stored(2, c0, 64);
            }
        }
    }
}

#else
/* (without AMX: the two blocks one after the other, all of k at once, each against every token
 * block from cache) */
static void dot_pairs(const uint16_t *wa, const uint16_t *wb, int64_t ldw, int64_t K, const uint16_t *b,
                      int64_t bstride, int ntb, float *ca, float *cb, const uint16_t *pfa, const uint16_t *pfb) {
    (void)pfa;
    (void)pfb;
    emu_tiles(wa, ldw, K, b, bstride, ntb, 0, ca, 0);
    emu_tiles(wb, ldw, K, b, bstride, ntb, 0, cb, 0);
}
#endif

/* Experts of 1..ROW_MAX rows (batched decode: 32 sequences x top-4 over 32 experts leave ~4 rows
 * each) read each 16-row weight block one row after the other, every row one sequential stream
 * dotted with the expert's few token rows (in L1), prefetched into L2 RP_AHEAD elements (8 KB)
 * ahead, instead of the tiles' 16 rows side by side. On the Zen 4 EPYC (tile products on vdpbf16ps,
 * emu_tiles), every expert at m rows: 1.4-1.7x emu_tiles at 1-8 rows on Qwen3-MoE's expert shape,
 * 1.2-1.6x on Mixtral's; past 8 rows the products outweigh the stream and the tiles stay. Without the
 * prefetch the rows streamed well only up to 4 (the core's loads and the memory's latency then add
 * up rather than overlap: 9-10 GB/s on one core at 8 rows against 16 with it). With AMX the tiles'
 * products cost next to nothing and they win from 4 rows (Mixtral's shape at 16 tokens, ~4 rows an
 * expert: 0.80x this way), but an expert of 1-3 rows streams better a row at a time (Qwen3-MoE's
 * shape: the experts kernel 1.2-1.4x at 8 tokens; the engine's decode of 16 sequences 1.07x, of 32
 * 1.035x, machine D, docs/benchmarks.md). ROW_PATH: the most rows the row kernel takes. */
#define ROW_PATH 8
#if defined(HAVE_AMX)
#define ROW_MAX 3
#else
#define ROW_MAX ROW_PATH
#endif
#define RP_AHEAD 4096

/* out[t] lane r = W[r, 0:K] . x_t for 16 rows r (row stride ldw) and M token rows xs[t] (M a
 * constant where inlined, so the sums stay in registers); K % 32 == 0. Where the M rows of x pass
 * RP_X elements (16 KB), k goes in segments that keep them in L1 (Mixtral's down rows: 12 rows of
 * 2816 from L2 streamed at 0.8x emu_tiles), each segment through the 16 rows in turn; the prefetch
 * then runs RP_AHEAD elements ahead in that order. */
#define RP_X 8192
static inline __attribute__((always_inline)) void rows_dot16_m(const uint16_t *w, int64_t ldw, int64_t K,
                                                               const uint16_t *const *xs, const int M, __m512 *out) {
    __m512 part[ROW_PATH][16];
    const int64_t ks = M * K <= RP_X ? K : RP_X / M / 64 * 64;
    const int d = ks >= K ? 0 : RP_AHEAD / ks > 1 ? (int)(RP_AHEAD / ks) : 1;  /* rows ahead, segmented */
    for (int64_t k0 = 0; k0 < K; k0 += ks) {
        const int64_t k1 = K - k0 < ks ? K : k0 + ks;
        for (int r = 0; r < 16; r++) {
            const uint16_t *row = w + r * ldw;
            /* the stream RP_AHEAD on: along this row, or (segmented) this segment d rows on, past
             * the 16th the next segment's (a prefetch past the end never faults) */
            const uint16_t *ahead = !d ? row + RP_AHEAD : r + d < 16 ? w + (r + d) * ldw : w + (r + d - 16) * ldw + ks;
            __m512 a[ROW_PATH], b[ROW_PATH];
            for (int t = 0; t < M; t++) a[t] = b[t] = _mm512_setzero_ps();
            int64_t k = k0;
            for (; k + 64 <= k1; k += 64) {
                const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + k);
                const __m512bh w1 = (__m512bh)_mm512_loadu_si512(row + k + 32);
                _mm_prefetch((const char *)(ahead + k), _MM_HINT_T1);
                _mm_prefetch((const char *)(ahead + k + 32), _MM_HINT_T1);
                for (int t = 0; t < M; t++) {
                    a[t] = _mm512_dpbf16_ps(a[t], w0, (__m512bh)_mm512_loadu_si512(xs[t] + k));
                    b[t] = _mm512_dpbf16_ps(b[t], w1, (__m512bh)_mm512_loadu_si512(xs[t] + k + 32));
                }
            }
            if (k < k1) {
                const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + k);
                for (int t = 0; t < M; t++) a[t] = _mm512_dpbf16_ps(a[t], w0, (__m512bh)_mm512_loadu_si512(xs[t] + k));
            }
            for (int t = 0; t < M; t++)
                part[t][r] = k0 ? _mm512_add_ps(part[t][r], _mm512_add_ps(a[t], b[t])) : _mm512_add_ps(a[t], b[t]);
        }
    }
    for (int t = 0; t < M; t++) out[t] = hsum16(part[t]);
}

/* rows_dot16_m for 1 <= m <= ROW_PATH */
static void rows_dot16(const uint16_t *w, int64_t ldw, int64_t K, const uint16_t *const *xs, int m, __m512 *out) {
    switch (m) {
    case 1: rows_dot16_m(w, ldw, K, xs, 1, out); break;
    case 2: rows_dot16_m(w, ldw, K, xs, 2, out); break;
    case 3: rows_dot16_m(w, ldw, K, xs, 3, out); break;
    case 4: rows_dot16_m(w, ldw, K, xs, 4, out); break;
    case 5: rows_dot16_m(w, ldw, K, xs, 5, out); break;
    case 6: rows_dot16_m(w, ldw, K, xs, 6, out); break;
    case 7: rows_dot16_m(w, ldw, K, xs, 7, out); break;
    default: rows_dot16_m(w, ldw, K, xs, 8, out); break;
    }
}

/* Where an expert's weight rows come from: bf16 in place (w != NULL: expert e at w + e * s, rows of
 * K), or packed codes (quant.c's layouts: int8/fp8 codes, or 4-bit ones with a value table)
 * dequantized to bf16 sixteen rows at a time into the thread's buffer, an A tile's worth of rows,
 * so the packed bytes are what streams from memory. */
typedef struct {
    const uint16_t *w;
    int64_t s;
    const uint16_t *xw;  /* bf16: expert xe's weight here instead of at w + xe * s (a shared expert), */
    int64_t xe;          /* xe -1 without one */
    const char *q;       /* codes: expert e at q + e * eq bytes, rows ldq bytes apart */
    int64_t eq, ldq;
    int fmt;             /* Q_INT8 / Q_FP8 codes (lut NULL), or 4-bit through lut */
    const float *lut, *sc, *off;  /* scales (offsets or NULL): expert e at + e * es, rows of G */
    int64_t es, G, gs, bn;
} wsrc;

/* rows r0 .. r0+15 of expert e's [N, K] weight, bf16 with row stride K */
static const uint16_t *rows16(const wsrc *src, int64_t e, int64_t r0, int64_t K, uint16_t *buf) {
    if (src->w) return (e == src->xe ? src->xw : src->w + e * src->s) + r0 * K;
    const char *q = src->q + e * src->eq + r0 * src->ldq;
    const float *sc = src->sc + e * src->es + (r0 / src->bn) * src->G;
    const float *off = src->off ? src->off + e * src->es + (r0 / src->bn) * src->G : NULL;
    if (src->lut) moe_q4_dequant((const uint8_t *)q, src->ldq, src->lut, sc, off, src->G, src->gs, 16, K, buf, BF16, 1);
    else moe_q8_dequant((const int8_t *)q, src->ldq, src->fmt, sc, off, src->G, src->gs, src->bn, 16, K, buf, BF16, 1);
    return buf;
}

/* rows r0.. of expert e's bf16 weight in place, or NULL for packed codes (nothing to prefetch) */
static const uint16_t *plain_rows(const wsrc *src, int64_t e, int64_t r0, int64_t K) {
    return src->w ? (e == src->xe ? src->xw : src->w + e * src->s) + r0 * K : NULL;
}

/* bf16 bits of 16 floats already rounded to bf16 (low halves zero) */
static inline __m512i bits(__m512 v) { return _mm512_castps_si512(v); }

/* The activation of 16 lanes of gate g and up u (bf16 values, biases added): silu(g) * u rounded
 * as moe_silu_mul rounds it, or ex's clamped SwiGLU (kernels.h's expert_act, lane by lane: the same
 * comparisons, roundings and sigmoid table). */
static inline __m512 act16(__m512 g, __m512 u, const StackedExtras *ex) {
    if (!ex || !ex->act) return round_bf16(_mm512_mul_ps(round_bf16(silu16(g)), u));
    if (ex->clamp) {  /* (NaN compares false: kept) */
        const __m512 lim = _mm512_set1_ps(ex->limit), hi = _mm512_set1_ps(bf16_to_f32(f32_to_bf16(ex->limit)));
        const __m512 nlim = _mm512_set1_ps(-ex->limit), lo = _mm512_set1_ps(bf16_to_f32(f32_to_bf16(-ex->limit)));
        g = _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask(g, lim, _CMP_GT_OQ), hi);
        u = _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(u, nlim, _CMP_LT_OQ), lo);
        u = _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(u, lim, _CMP_GT_OQ), hi);
    }
    const __m512i at = _mm512_srli_epi32(bits(round_bf16(_mm512_mul_ps(g, _mm512_set1_ps(ex->alpha)))), 16);
    const __m512i sg = _mm512_slli_epi32(_mm512_i32gather_epi32(at, (const void *)ex->sig, 2), 16);
    const __m512 u1 = round_bf16(_mm512_add_ps(u, _mm512_set1_ps(1.f)));
    return round_bf16(_mm512_mul_ps(round_bf16(_mm512_mul_ps(u1, g)), _mm512_castsi512_ps(sg)));
}

/* expert e's bias at row f of its [2F] gate/up (NULL ex or no biases: none) */
static inline const uint16_t *bias13(const StackedExtras *ex, int64_t e, int64_t f) {
    return ex && ex->b13 ? ex->b13 + e * ex->sb13 + f : NULL;
}

/* expert e's down bias (NULL: none) */
static inline const uint16_t *bias2(const StackedExtras *ex, int64_t e) {
    return ex && ex->b2 ? ex->b2 + e * ex->sb2 : NULL;
}

/* Gate/up rows [16i, 16i+16) and [F+16i, F+16i+16) of one expert: a = silu(g) * u (with ex: biases
 * added, ex's activation), written as the down GEMM's B tiles a_p[tb][F/32][16][16][2] (two
 * activation rows make one row of pairs). */
static void gate_up_block(const wsrc *w13, const StackedExtras *ex, int64_t e, int64_t D, int64_t F, int64_t i,
                          const uint16_t *xp, int ntb, int l8, uint16_t *ap, float *cg, float *cu, uint16_t *wbuf) {
    if (ntb >= PAIRS_TB) {  /* compute-bound: gate and up blocks as one 2 x 2 pass (wbuf holds 32 rows) */
        dot_pairs(rows16(w13, e, 16 * i, D, wbuf), rows16(w13, e, F + 16 * i, D, wbuf + 16 * D), D, D, xp,
                  (D / KC) * TILE, ntb, cg, cu, plain_rows(w13, e, 16 * (i + 1), D),
                  plain_rows(w13, e, F + 16 * (i + 1), D));
    } else {  /* streaming the weights: one block at a time, the next one prefetched */
        dot_blocks(rows16(w13, e, 16 * i, D, wbuf), D, D, xp, (D / KC) * TILE, ntb, l8, cg,
                   plain_rows(w13, e, F + 16 * i, D));
        dot_blocks(rows16(w13, e, F + 16 * i, D, wbuf), D, D, xp, (D / KC) * TILE, ntb, l8, cu,
                   plain_rows(w13, e, 16 * (i + 1), D));
    }
    const uint16_t *bg = bias13(ex, e, 16 * i), *bu = bias13(ex, e, F + 16 * i);
    for (int tb = 0; tb < ntb; tb++) {
        for (int r = 0; r < 16; r += 2) {
            __m512 a[2];
            for (int j = 0; j < 2; j++) {
                __m512 g = round_bf16(_mm512_loadu_ps(cg + tb * 256 + (r + j) * 16));
                __m512 u = round_bf16(_mm512_loadu_ps(cu + tb * 256 + (r + j) * 16));
                if (bg) {  /* row r + j's biases, one per row: every token's lane */
                    g = round_bf16(_mm512_add_ps(g, _mm512_set1_ps(bf16_to_f32(bg[r + j]))));
                    u = round_bf16(_mm512_add_ps(u, _mm512_set1_ps(bf16_to_f32(bu[r + j]))));
                }
                a[j] = act16(g, u, ex);
            }
            const int64_t f = 16 * i + r;  /* even: the pair (f, f + 1) */
            uint16_t *row = ap + (tb * (F / KC) + f / KC) * TILE + ((f % KC) / 2) * 32;
            _mm512_storeu_si512(row, _mm512_or_si512(_mm512_srli_epi32(bits(a[0]), 16),
                                                     _mm512_and_si512(bits(a[1]), _mm512_set1_epi32((int)0xffff0000u))));
        }
    }
}

/* The float32 block c[tb][16 rows][16 tokens] of token block tb as each token's 16 sums:
 * v[t] = column t of its tile. */
static inline void token_columns(const float *c, int64_t tb, __m512 v[16]) {
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(c + tb * 256 + i * 16);
    transpose16(r);
    for (int t = 0; t < 16; t++) v[t] = _mm512_castsi512_ps(r[t]);
}

/* token t's 16 sums v as y[t, 16j:16j+16]: bf16 (dtype BF16), or the bf16-rounded value as float32
 * (dtype F32: logits); + bias (b: bias[16j:16j+16], added after the rounding, as a separate addition
 * does) */
static inline void store_token(__m512 v, int64_t t, int64_t j, const uint16_t *bias, __m512 b, void *y, int64_t ldy,
                               int dtype) {
    if (bias) v = _mm512_add_ps(round_bf16(v), b);
    if (dtype == BF16) store16((uint16_t *)y + t * ldy + 16 * j, v, BF16);
    else _mm512_storeu_ps((float *)y + t * ldy + 16 * j, round_bf16(v));
}

/* y[t, 16j:16j+16] for t < m from the float32 block c[tb][16 rows][16 tokens], as store_token */
static void store_block(const float *c, int64_t m, int64_t j, const uint16_t *bias, void *y, int64_t ldy, int dtype) {
    const __m512 b = bias ? load16(bias + 16 * j, BF16) : _mm512_setzero_ps();
    __m512 col[16];
    for (int64_t t = 0; t < m; t++) {
        if (t % 16 == 0) token_columns(c, t / 16, col);
        store_token(col[t % 16], t, j, bias, b, y, ldy, dtype);
    }
}


/* Down rows [16j, 16j+16) for the expert's m tokens, y[t, 16j:16j+16] (bf16; streaming the weights,
 * the next block prefetched), or with `pair` rows [32j, 32j+32) in one 2 x 2 pass (chunks of PAIRS_TB+
 * token blocks; wbuf holds 32 rows). */
static void down_block(const wsrc *w2, const StackedExtras *ex, int64_t e, int64_t F, int64_t j, int pair,
                       const uint16_t *ap, int ntb, int64_t m, uint16_t *y, int64_t ldy, float *c, float *c2,
                       uint16_t *wbuf) {
    if (pair) {
        dot_pairs(rows16(w2, e, 32 * j, F, wbuf), rows16(w2, e, 32 * j + 16, F, wbuf + 16 * F), F, F, ap,
                  (F / KC) * TILE, ntb, c, c2, plain_rows(w2, e, 32 * (j + 1), F), plain_rows(w2, e, 32 * j + 48, F));
        store_block(c, m, 2 * j, bias2(ex, e), y, ldy, BF16);
        store_block(c2, m, 2 * j + 1, bias2(ex, e), y, ldy, BF16);
        return;
    }
    dot_blocks(rows16(w2, e, 16 * j, F, wbuf), F, F, ap, (F / KC) * TILE, ntb, last8(m), c,
               plain_rows(w2, e, 16 * (j + 1), F));  /* (a prefetch past the end never faults) */
    store_block(c, m, j, bias2(ex, e), y, ldy, BF16);
}

/* An expert of m <= ROW_PATH rows (x rows xr[t] = x + row(t) * ldx), gate/up rows [16i, 16i+16) and
 * [F+16i, F+16i+16) through rows_dot16: a = silu(g) * u (rounded as gate_up_block) into the rows
 * of a [m, F] (row-major: the down rows' token rows). */
static void gate_up_rows(const wsrc *w13, const StackedExtras *ex, int64_t e, int64_t D, int64_t F, int64_t i,
                         const uint16_t *x, int64_t ldx, const int64_t *rows, int m, uint16_t *a, uint16_t *wbuf) {
    const uint16_t *xs[ROW_PATH];
    for (int t = 0; t < m; t++) xs[t] = x + rows[t] * ldx;
    __m512 g[ROW_PATH], u[ROW_PATH];
    rows_dot16(rows16(w13, e, 16 * i, D, wbuf), D, D, xs, m, g);
    rows_dot16(rows16(w13, e, F + 16 * i, D, wbuf), D, D, xs, m, u);
    const uint16_t *bg = bias13(ex, e, 16 * i), *bu = bias13(ex, e, F + 16 * i);
    const __m512 vg = bg ? load16(bg, BF16) : _mm512_setzero_ps(), vu = bg ? load16(bu, BF16) : vg;
    for (int t = 0; t < m; t++) {
        __m512 gt = round_bf16(g[t]), ut = round_bf16(u[t]);
        if (bg) {
            gt = round_bf16(_mm512_add_ps(gt, vg));
            ut = round_bf16(_mm512_add_ps(ut, vu));
        }
        store16(a + t * F + 16 * i, act16(gt, ut, ex), BF16);
    }
}

/* down rows [16j, 16j+16) of that expert: y[t, 16j:16j+16] from a's rows */
static void down_rows(const wsrc *w2, const StackedExtras *ex, int64_t e, int64_t F, int64_t j, const uint16_t *a,
                      int m, uint16_t *y, int64_t ldy, uint16_t *wbuf) {
    const uint16_t *as[ROW_PATH];
    for (int t = 0; t < m; t++) as[t] = a + t * F;
    __m512 o[ROW_PATH];
    rows_dot16(rows16(w2, e, 16 * j, F, wbuf), F, F, as, m, o);
    const uint16_t *b = bias2(ex, e);
    const __m512 vb = b ? load16(b + 16 * j, BF16) : _mm512_setzero_ps();
    for (int t = 0; t < m; t++) store16(y + t * ldy + 16 * j, b ? _mm512_add_ps(round_bf16(o[t]), vb) : o[t], BF16);
}
#endif

/* Asks Linux for the AMX tile state (once per process; torch's oneDNN asks for it too). 0; 1 when
 * built for AVX512-BF16 without AMX (the tile products on vdpbf16ps); -1 when refused or built with
 * neither. */
int moe_amx_init(void) {
#if defined(HAVE_AMX)
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 0 : -1;
#elif defined(HAVE_TILES)
    return 1;
#else
    return -1;
#endif
}

#if defined(HAVE_TILES)
/* rows per chunk of an expert of n >= 64 rows: even chunks of up to CHUNK_TB * 16, a multiple of 16
 * (300 rows: 160 + 140, not 256 + 44, whose 44 would stream the weights again for few products) */
static int64_t chunk_rows(int64_t n) {
    const int64_t nch = (n + CHUNK_TB * 16 - 1) / (CHUNK_TB * 16);
    return ((n + nch - 1) / nch + 15) / 16 * 16;
}

/* One chunk of an expert of 64+ rows: rows [r0, r0 + m) of expert e (chunk_rows: even chunks). */
typedef struct {
    int64_t e, r0, m;
} chunk_item;

/* How many of the chunks it[0..n) (largest first) to split over nt threads so that the rest, handed
 * out whole largest first, leave no thread more than 1/16 over its even share of their rows (the
 * threads wait on the last at the loop's end; splitting the first ones evens it out). */
static int64_t whole_from(const chunk_item *it, int64_t n, int nt) {
    if (nt < 2) return 0;
    for (int64_t s = 0; s < n; s++) {
        int64_t load[nt], sum = 0, most = 0;
        memset(load, 0, sizeof load);
        for (int64_t b = s; b < n; b++) {
            int j = 0;
            for (int t = 1; t < nt; t++) j = load[t] < load[j] ? t : j;
            load[j] += it[b].m;
            sum += it[b].m;
        }
        for (int t = 0; t < nt; t++) most = load[t] > most ? load[t] : most;
        if (most * nt * 16 <= sum * 17) return s;
    }
    return n;
}

/* The experts over rows grouped by expert (counts[e] rows each, in order; row r is x row idx[r]
 * when idx is given) into the same rows of y; ex: their biases and activation (NULL: plain SwiGLU). */
static int run_experts(const uint16_t *x, int64_t ldx, const int64_t *idx, const int64_t *counts, int64_t E,
                        int64_t D, int64_t F, const wsrc *w13, const wsrc *w2, const StackedExtras *ex, uint16_t *y,
                        int64_t ldy, uint16_t *xp, uint16_t *ap, int num_threads) {
    int64_t starts[E + 1], xoff[E + 1];
    starts[0] = xoff[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        starts[e + 1] = starts[e] + counts[e];
        xoff[e + 1] = xoff[e] + (counts[e] + 15) / 16 * D * 16;
    }
    const int64_t tok_chunks = xoff[E] / TILE, nc = D / KC;  /* every expert's token blocks x D/32 chunks */
    /* Experts of 1-63 rows (decode-sized: one chunk of 1-3 token blocks, streaming the weights) run
     * together: all their gate/up blocks in one loop, one barrier, all their down blocks in another,
     * rather than a barrier per expert (32 of them a layer in batched decode on Qwen3-MoE's shape,
     * where the per-expert barriers held ~1/5 of the kernel's time). Their activations follow the
     * chunk buffers in ap, at aoff[e]. */
    const int64_t slots = num_threads > 2 ? num_threads : 2;  /* chunk activation buffers at the front of ap */
    int64_t small[E], aoff[E], nsmall = 0;
    for (int64_t e = 0, at = slots * CHUNK_TB * 16 * F; e < E; e++)
        if (counts[e] > 0 && counts[e] < BOUND_TB * 16) {
            small[nsmall++] = e;
            aoff[e] = at;
            at += (counts[e] + 15) / 16 * 16 * F;
        }
    /* Experts of 64+ rows as chunks of up to CHUNK_TB * 16 rows (chunk_rows), largest first: the first
     * nsplit split over the threads block by block (below), the others whole, each on one thread,
     * handed out largest first as threads free up: no barrier inside a chunk, and its activations
     * stay in the cache of the core that computed them (the Qwen3-MoE shape at 2048 tokens, 32
     * experts of ~256 rows: 1.17-1.21x the kernel splitting every expert; Mixtral's, 8 of ~512:
     * 1.05-1.07x). An expert of several chunks has them on several threads at once rather than split
     * block by block (whose down GEMMs read every thread's activations): Mixtral's shape 1.05-1.07x
     * at uniform routing (two threads on one expert's chunks read its weights from memory once),
     * 0.99-1.04x with the bench checkpoints' skewed routing. */
    int64_t nbig = 0;
    for (int64_t e = 0; e < E; e++)
        if (counts[e] >= BOUND_TB * 16) nbig += (counts[e] + CHUNK_TB * 16 - 1) / (CHUNK_TB * 16);
    chunk_item *big = malloc(sizeof(chunk_item) * (size_t)(nbig ? nbig : 1));
    if (!big) return -4;
    nbig = 0;
    for (int64_t e = 0; e < E; e++) {
        if (counts[e] < BOUND_TB * 16) continue;
        const int64_t csz = chunk_rows(counts[e]);
        for (int64_t r0 = 0; r0 < counts[e]; r0 += csz) {
            const chunk_item c = {e, r0, counts[e] - r0 < csz ? counts[e] - r0 : csz};
            int64_t q = nbig++;  /* (stable: equal chunks keep expert and row order) */
            for (; q > 0 && big[q - 1].m < c.m; q--) big[q] = big[q - 1];
            big[q] = c;
        }
    }
    const int64_t nsplit = whole_from(big, nbig, num_threads);
#pragma omp parallel num_threads(num_threads)
    {
        configure_tiles();
        float c0[CHUNK_TB * 256] __attribute__((aligned(64))), c1[CHUNK_TB * 256] __attribute__((aligned(64)));
        /* a packed weight's dequantized rows (of D for gate/up, of F for down): 16, or 32 for dot_pairs */
        uint16_t *wbuf = (w13->w && w2->w) ? NULL : malloc(sizeof(uint16_t) * 32 * (size_t)(D > F ? D : F));
        /* pack every expert's tokens: the flat chunk index q runs over (expert, token block, chunk) */
#pragma omp for schedule(static)
        for (int64_t q = 0; q < tok_chunks; q++) {
            int64_t e = 0;
            while (xoff[e + 1] <= q * TILE) e++;
            if (counts[e] <= ROW_MAX) continue;  /* (read in place by the row path) */
            const int64_t local = q - xoff[e] / TILE;
            if (idx) pack_chunk(x, ldx, idx + starts[e], counts[e], D, local / nc, local % nc, xp + xoff[e]);
            else pack_chunk(x + starts[e] * ldx, ldx, NULL, counts[e], D, local / nc, local % nc, xp + xoff[e]);
        }
        if (nsmall) {  /* each thread a contiguous range of (expert, block): its own weight streams */
#pragma omp for schedule(static)
            for (int64_t q = 0; q < nsmall * (F / 16); q++) {
                const int64_t e = small[q / (F / 16)];
                if (counts[e] <= ROW_MAX) {
                    int64_t rows[ROW_PATH];
                    for (int64_t t = 0; t < counts[e]; t++) rows[t] = idx ? idx[starts[e] + t] : starts[e] + t;
                    gate_up_rows(w13, ex, e, D, F, q % (F / 16), x, ldx, rows, (int)counts[e], ap + aoff[e], wbuf);
                    continue;
                }
                gate_up_block(w13, ex, e, D, F, q % (F / 16), xp + xoff[e], (int)((counts[e] + 15) / 16),
                              last8(counts[e]), ap + aoff[e], c0, c1, wbuf);
            }
#pragma omp for schedule(static) nowait
            for (int64_t q = 0; q < nsmall * (D / 16); q++) {
                const int64_t e = small[q / (D / 16)];
                if (counts[e] <= ROW_MAX) {
                    down_rows(w2, ex, e, F, q % (D / 16), ap + aoff[e], (int)counts[e], y + starts[e] * ldy, ldy,
                              wbuf);
                    continue;
                }
                down_block(w2, ex, e, F, q % (D / 16), 0, ap + aoff[e], (int)((counts[e] + 15) / 16), counts[e],
                           y + starts[e] * ldy, ldy, c0, c1, wbuf);
            }
        }
        int buf = 0;
        for (int64_t b = 0; b < nsplit; b++) {
            const int64_t e = big[b].e, m = big[b].m, r = starts[e] + big[b].r0;
            const int ntb = (int)((m + 15) / 16);
            const uint16_t *xe = xp + xoff[e] + (big[b].r0 / 16) * (D / KC) * TILE;
            uint16_t *a = ap + buf * CHUNK_TB * F * 16;
            /* the barrier ending this loop also ends everyone's down GEMM of the chunk before
             * last, the one that read this activation buffer. Every chunk here has 4+ token blocks
             * (chunk_rows' even chunks of an expert of 64+ rows): its blocks go to threads 4 at a
             * time as they free up (the two cores do not always run at one speed; 1.2-1.3x at 2048
             * rows) */
#pragma omp for schedule(dynamic, 4)
            for (int64_t i = 0; i < F / 16; i++)
                gate_up_block(w13, ex, e, D, F, i, xe, ntb, last8(m), a, c0, c1, wbuf);
            /* down: 32-row blocks (2 x 2 tiles) handed out as threads free up when compute-bound,
             * else 16-row blocks in contiguous ranges */
            if (ntb >= PAIRS_TB) {
#pragma omp for schedule(dynamic, 2) nowait
                for (int64_t j = 0; j < D / 32; j++)
                    down_block(w2, ex, e, F, j, 1, a, ntb, m, y + r * ldy, ldy, c0, c1, wbuf);
            } else {
#pragma omp for schedule(static) nowait
                for (int64_t j = 0; j < D / 16; j++)
                    down_block(w2, ex, e, F, j, 0, a, ntb, m, y + r * ldy, ldy, c0, c1, wbuf);
            }
            buf ^= 1;
        }
        if (nsplit < nbig) {
            /* (the split chunks' last down blocks read a buffer some thread's first whole chunk is
             * about to write) */
            if (nsplit) {
#pragma omp barrier
            }
            uint16_t *a = ap + omp_get_thread_num() * CHUNK_TB * F * 16;
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t b = nsplit; b < nbig; b++) {
                const int64_t e = big[b].e, m = big[b].m, r = starts[e] + big[b].r0;
                const int ntb = (int)((m + 15) / 16);
                const uint16_t *xe = xp + xoff[e] + (big[b].r0 / 16) * (D / KC) * TILE;
                for (int64_t i = 0; i < F / 16; i++)
                    gate_up_block(w13, ex, e, D, F, i, xe, ntb, last8(m), a, c0, c1, wbuf);
                const int pair = ntb >= PAIRS_TB;
                for (int64_t j = 0; j < D / (pair ? 32 : 16); j++)
                    down_block(w2, ex, e, F, j, pair, a, ntb, m, y + r * ldy, ldy, c0, c1, wbuf);
            }
        }
        free(wbuf);
        release_tiles();
    }
    free(big);
    return 0;
}
#endif

/* SwiGLU experts over rows grouped by expert: rows [s_e, s_e + counts[e]) of x [R, D] (row stride
 * ldx; s_e the sum of the counts before e) go through expert e: h = W13_e @ x (W13_e = w13 +
 * e * s13, [2F, D], gate rows first), a = silu(h[:F]) * h[F:], y = W2_e @ a (W2_e = w2 + e * s2,
 * [D, F]) into the same rows of y (row stride ldy). With ex (else NULL): the biases added to h and y
 * as linear adds them, and ex's activation (gpt-oss's clamped SwiGLU). Weights: unit stride within rows. Needs
 * D % 32 == F % 32 == 0; any counts (an expert's rows run in chunks of 256). Scratch: xp of
 * sum_e ceil(counts[e]/16) * D * 16 bf16 and ap of (256 max(2, num_threads) + the sum over experts of
 * 1-63 rows of their rows rounded up to 16) * F bf16: (256 max(2, num_threads) + min(R + 15E, 64E)) * F
 * for R rows in all. Returns 0; -1 when built without tiles (neither AMX nor AVX512-BF16); -4 when out
 * of memory (nothing written). */
int moe_amx_experts(const uint16_t *x, int64_t ldx, const int64_t *counts, int64_t E, int64_t D, int64_t F,
                    const uint16_t *w13, int64_t s13, const uint16_t *w2, int64_t s2, const StackedExtras *ex,
                    uint16_t *y, int64_t ldy, uint16_t *xp, uint16_t *ap, int num_threads) {
#if defined(HAVE_TILES)
    const wsrc a13 = {.w = w13, .s = s13, .xe = -1}, a2 = {.w = w2, .s = s2, .xe = -1};
    return run_experts(x, ldx, NULL, counts, E, D, F, &a13, &a2, ex, y, ldy, xp, ap, num_threads);
#else
    (void)x; (void)ldx; (void)counts; (void)E; (void)D; (void)F; (void)w13; (void)s13; (void)w2; (void)s2;
    (void)ex; (void)y; (void)ldy; (void)xp; (void)ap; (void)num_threads;
    return -1;
#endif
}

/* The whole local MoE step after the router: token t of x [T, D] (row stride ldx) goes to experts
 * ids[t, 0:K] (0 <= id < E) with weights wts[t, 0:K] (float32, rounded to bf16 here, as the
 * combine does); out [T, D] = sum over k, in ascending expert order, of bf16(expert(x_t) * w) in
 * float32, rounded once -- dispatch, experts and combine (LocalDispatcher) in one call. With sw13
 * and sw2 (else NULL): a shared expert of the same dims ([2F, D], [D, F], unit row strides, bf16 and
 * plain SwiGLU like the others) through which every token goes too, its row added to the rounded
 * sum and rounded again (routed experts, then + shared expert, each a bf16 tensor): the shared
 * expert's weights stream in the same parallel loops as the routed ones'. Scratch, with K' = K + 1
 * and E' = E + 1 where there is a shared expert (else K and E): xp of (T*K' + 16*E') * D bf16, ap as
 * moe_amx_experts for E' experts and T*K' rows, ys of T*K'*D bf16 (each row's result in expert
 * order), rows of 3*T*K' int64.
 * Returns 0; -1 without tiles; -3 for an id out of range; -4 when out of memory (nothing written: use
 * the dispatcher). */
#if defined(HAVE_TILES)
/* dispatch, experts and combine of moe_amx_moe with weights from w13 and w2 */
static int run_moe(const uint16_t *x, int64_t ldx, int64_t T, const int64_t *ids, const float *wts, int64_t K,
                   int64_t E, int64_t D, int64_t F, const wsrc *w13, const wsrc *w2, const StackedExtras *ex,
                   uint16_t *out, uint16_t *xp, uint16_t *ap, uint16_t *ys, int64_t *rows, int num_threads) {
    /* a shared expert (w13->xe == E, its weights at w13->xw, w2->xw) takes every token too, a token's last row */
    const int shared = w13->xe == E;
    const int64_t Ex = E + (shared != 0), Kx = K + (shared != 0);
    int64_t counts[Ex], at[Ex];
    memset(counts, 0, sizeof counts);
    for (int64_t i = 0; i < T * K; i++) {
        if (ids[i] < 0 || ids[i] >= E) return -3;
        counts[ids[i]]++;
    }
    if (shared) counts[E] = T;
    for (int64_t e = 0, s = 0; e < Ex; e++) {
        at[e] = s;
        s += counts[e];
    }
    int64_t *tok = rows, *pos = rows + T * Kx;
    float *w = (float *)(rows + 2 * T * Kx);
    for (int64_t i = 0; i < T * K; i++) {  /* a stable counting sort: tokens ascending per expert */
        const int64_t r = at[ids[i]]++;
        tok[r] = i / K;
        pos[i / K * Kx + i % K] = r;
        w[r] = bf16_to_f32(f32_to_bf16(wts[i]));
    }
    for (int64_t t = 0; shared && t < T; t++) {  /* (after every routed row: last in each token's order) */
        const int64_t r = at[E]++;
        tok[r] = t;
        pos[t * Kx + K] = r;
        w[r] = 1.0f;
    }
    for (int64_t t = 0; t < T; t++) {  /* a token's rows in ascending position: ascending expert order */
        int64_t *p = pos + t * Kx;
        for (int64_t k = 1; k < K; k++)
            for (int64_t q = k; q > 0 && p[q - 1] > p[q]; q--) {
                const int64_t v = p[q];
                p[q] = p[q - 1];
                p[q - 1] = v;
            }
    }
    if (run_experts(x, ldx, tok, counts, Ex, D, F, w13, w2, ex, ys, D, xp, ap, num_threads) != 0) return -4;
    /* the combine, a token at a time: its K rows read in turn (each contiguous) rather than every
     * row added into a float32 [T, D] sum in expert order (scattered read-modify-writes: 1.4x the
     * kernel's non-GEMM time on Qwen3-MoE's shape); the same float32 operations in the same order.
     * A shared expert's row is added to the routed sum rounded to bf16, rounded again (the routed
     * experts' result, then + shared, as two bf16 tensors add) */
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < T; t++) {
        const int64_t *p = pos + t * Kx;
        for (int64_t j = 0; j < D / 16; j++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k++) {
                const __m512 v = load16(ys + p[k] * D + 16 * j, BF16);
                acc = _mm512_add_ps(acc, round_bf16(_mm512_mul_ps(v, _mm512_set1_ps(w[p[k]]))));
            }
            if (shared) acc = _mm512_add_ps(round_bf16(acc), load16(ys + p[K] * D + 16 * j, BF16));
            store16(out + t * D + 16 * j, acc, BF16);
        }
    }
    return 0;
}
#endif

int moe_amx_moe(const uint16_t *x, int64_t ldx, int64_t T, const int64_t *ids, const float *wts, int64_t K,
                int64_t E, int64_t D, int64_t F, const uint16_t *w13, int64_t s13, const uint16_t *w2, int64_t s2,
                const uint16_t *sw13, const uint16_t *sw2, const StackedExtras *ex, uint16_t *out, uint16_t *xp,
                uint16_t *ap, uint16_t *ys, int64_t *rows, int num_threads) {
#if defined(HAVE_TILES)
    const int64_t xe = sw13 != NULL && sw2 != NULL ? E : -1;
    const wsrc a13 = {.w = w13, .s = s13, .xw = sw13, .xe = xe}, a2 = {.w = w2, .s = s2, .xw = sw2, .xe = xe};
    return run_moe(x, ldx, T, ids, wts, K, E, D, F, &a13, &a2, ex, out, xp, ap, ys, rows, num_threads);
#else
    (void)x; (void)ldx; (void)T; (void)ids; (void)wts; (void)K; (void)E; (void)D; (void)F; (void)w13; (void)s13;
    (void)w2; (void)s2; (void)sw13; (void)sw2; (void)ex; (void)out; (void)xp; (void)ap; (void)ys; (void)rows;
    (void)num_threads;
    return -1;
#endif
}

/* moe_amx_moe on packed experts (quant.c's layouts): codes of expert e at q13 + e * eq13 bytes
 * ([2F, D] rows of ldq13 bytes) and q2 + e * eq2 ([D, F]); scales (offsets or NULL) at
 * s13 + e * es13 ([2F / bn, G13]) and s2 + e * es2; fmt Q_INT8 / Q_FP8, or 4-bit codes through
 * lut. Each 16-row weight block is dequantized to bf16 (rounded once, as moe_q8_dequant /
 * moe_q4_dequant) into a buffer the tiles read, so results equal dequantize-then-GEMM up to the
 * order of float32 sums. Returns as moe_amx_moe. */
int moe_amx_moe_packed(const uint16_t *x, int64_t ldx, int64_t T, const int64_t *ids, const float *wts, int64_t K,
                       int64_t E, int64_t D, int64_t F, int fmt, const float *lut, int64_t gs, int64_t bn,
                       const char *q13, int64_t eq13, int64_t ldq13, const float *s13, const float *b13, int64_t es13,
                       int64_t G13, const char *q2, int64_t eq2, int64_t ldq2, const float *s2, const float *b2,
                       int64_t es2, int64_t G2, const StackedExtras *ex, uint16_t *out, uint16_t *xp, uint16_t *ap,
                       uint16_t *ys, int64_t *rows, int num_threads) {
#if defined(HAVE_TILES)
    const wsrc a13 = {.q = q13, .eq = eq13, .ldq = ldq13, .fmt = fmt, .lut = lut, .sc = s13, .off = b13, .es = es13,
                      .G = G13, .gs = gs, .bn = bn, .xe = -1};
    const wsrc a2 = {.q = q2, .eq = eq2, .ldq = ldq2, .fmt = fmt, .lut = lut, .sc = s2, .off = b2, .es = es2,
                     .G = G2, .gs = gs, .bn = bn, .xe = -1};
    return run_moe(x, ldx, T, ids, wts, K, E, D, F, &a13, &a2, ex, out, xp, ap, ys, rows, num_threads);
#else
    (void)x; (void)ldx; (void)T; (void)ids; (void)wts; (void)K; (void)E; (void)D; (void)F; (void)fmt; (void)lut;
    (void)ex;
    (void)gs; (void)bn; (void)q13; (void)eq13; (void)ldq13; (void)s13; (void)b13; (void)es13; (void)G13; (void)q2;
    (void)eq2; (void)ldq2; (void)s2; (void)b2; (void)es2; (void)G2; (void)out; (void)xp; (void)ap; (void)ys;
    (void)rows; (void)num_threads;
    return -1;
#endif
}

/* y[t, :] = W @ x[t, :] (+ bias) for m <= 64 rows: x [m, K] (row stride ldx), W [N, K] (row
 * stride ldw), bias [N] bf16 or NULL, y [m, N] (row stride ldy) bf16, or float32 holding the
 * bf16-rounded values (dtype F32: logits). Needs K % 32 == N % 16 == 0. Scratch xp: 4 * K * 16
 * bf16. Returns 0, or -1 when built without tiles. */
int moe_amx_linear(const uint16_t *x, int64_t ldx, int64_t m, const uint16_t *w, int64_t ldw, int64_t N, int64_t K,
                   const uint16_t *bias, void *y, int64_t ldy, int dtype, uint16_t *xp, int num_threads) {
#if defined(HAVE_TILES)
    if (m <= ROW_MAX) {  /* a few rows: each weight row streamed once against all of them, as the experts */
        const uint16_t *xs[ROW_PATH];
        for (int64_t t = 0; t < m; t++) xs[t] = x + t * ldx;
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t j = 0; j < N / 16; j++) {
            __m512 o[ROW_PATH];
            rows_dot16(w + 16 * j * ldw, ldw, K, xs, (int)m, o);
            const __m512 b = bias ? load16(bias + 16 * j, BF16) : _mm512_setzero_ps();
            for (int64_t t = 0; t < m; t++) store_token(o[t], t, j, bias, b, y, ldy, dtype);
        }
        return 0;
    }
    const int ntb = (int)((m + 15) / 16);
    const int64_t nc = K / KC;
#pragma omp parallel num_threads(num_threads)
    {
        configure_tiles();
        float c[MAX_TB * 256];
#pragma omp for schedule(static)
        for (int64_t q = 0; q < ntb * nc; q++) pack_chunk(x, ldx, NULL, m, K, q / nc, q % nc, xp);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < N / 16; j++) {
            dot_block(w + 16 * j * ldw, ldw, K, xp, nc * TILE, ntb, last8(m), c,
                      j + 1 < N / 16 ? w + 16 * (j + 1) * ldw : NULL);
            store_block(c, m, j, bias, y, ldy, dtype);
        }
        release_tiles();
    }
    return 0;
#else
    (void)x; (void)ldx; (void)m; (void)w; (void)ldw; (void)N; (void)K; (void)bias; (void)y; (void)ldy; (void)dtype;
    (void)xp; (void)num_threads;
    return -1;
#endif
}

#if defined(HAVE_TILES)
/* c[tb][16 tokens][16 n] = X[tb] (A tiles: 16 token rows of K, row stride K) . W[0:K, n0:n0+16] */
#if defined(HAVE_AMX)
static void dot_block_xw(const uint16_t *xa, int64_t K, const uint16_t *w, int64_t ldw, int ntb, float *c) {
    uint16_t tile[TILE] __attribute__((aligned(64)));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < K; k += KC) {
        pair_rows(w + k * ldw, ldw, NULL, 32, tile);  /* rows k..k+31, interleaved as needed */
        _tile_loadd(5, tile, 64);
        _tile_loadd(4, xa + k, K * 2);
        _tile_dpbf16ps(0, 4, 5);
        if (ntb > 1) {
            _tile_loadd(6, xa + 16 * K + k, K * 2);
            _tile_dpbf16ps(1, 6, 5);
        }
        if (ntb > 2) {
            _tile_loadd(7, xa + 32 * K + k, K * 2);
            _tile_dpbf16ps(2, 7, 5);
        }
        if (ntb > 3) {
            _tile_loadd(4, xa + 48 * K + k, K * 2);
            _tile_dpbf16ps(3, 4, 5);
        }
    }
    _tile_stored(0, c, 64);
    if (ntb > 1) _tile_stored(1, c + 256, 64);
    if (ntb > 2) _tile_stored(2, c + 512, 64);
    if (ntb > 3) _tile_stored(3, c + 768, 64);
}
#else
#define XW_SEG 16  /* B tiles interleaved at a time: 512 rows of W (16 KB) */
static void dot_block_xw(const uint16_t *xa, int64_t K, const uint16_t *w, int64_t ldw, int ntb, float *c) {
    uint16_t tiles[XW_SEG * TILE] __attribute__((aligned(64)));
    for (int64_t k0 = 0; k0 < K; k0 += XW_SEG * KC) {
        const int64_t kn = K - k0 < XW_SEG * KC ? K - k0 : XW_SEG * KC;
        for (int64_t k = 0; k < kn; k += KC) pair_rows(w + (k0 + k) * ldw, ldw, NULL, 32, tiles + (k / KC) * TILE);
        for (int tb = 0; tb < ntb; tb++) emu_tiles(xa + tb * 16 * K + k0, K, kn, tiles, 0, 1, 0, c + tb * 256, k0 > 0);
    }
}
#endif
#endif

/* One GEMM per head for m <= 64 rows (MLA's absorbed attention): for each head h,
 * y[t, h, :] = x[t, h, :] @ W_h^T when W_h is [N, K] (w_rows_n: rows of K), or x[t, h, :] @ W_h
 * when W_h is [K, N] (rows of N). x[t, h, k] at x + t*ldx + h*hx + k; W_h at w + h*hw with row
 * stride ldw; y[t, h, n] (bf16) at y + t*ldy + h*hy + n. Float32 sums rounded once, as bmm.
 * Needs K % 32 == N % 16 == 0. Scratch: H * ceil(m/16) * 16 * K bf16. Returns 0, or -1 when built
 * without tiles. */
int moe_amx_heads(const uint16_t *x, int64_t ldx, int64_t hx, int64_t m, const uint16_t *w, int64_t ldw, int64_t hw,
                  int64_t N, int64_t K, int64_t H, int w_rows_n, uint16_t *y, int64_t ldy, int64_t hy,
                  uint16_t *scratch, int num_threads) {
#if defined(HAVE_TILES)
    const int ntb = (int)((m + 15) / 16);
    const int64_t nc = K / KC, per_head = (int64_t)ntb * 16 * K;
#pragma omp parallel num_threads(num_threads)
    {
        configure_tiles();
        float c[MAX_TB * 256];
        if (w_rows_n) {  /* tokens as B tiles: pack each head's rows */
#pragma omp for schedule(static)
            for (int64_t q = 0; q < H * ntb * nc; q++) {
                const int64_t h = q / (ntb * nc), local = q % (ntb * nc);
                pack_chunk(x + h * hx, ldx, NULL, m, K, local / nc, local % nc, scratch + h * per_head);
            }
        } else {  /* tokens as A tiles: each head's rows copied contiguous, zero rows to a multiple of 16 */
#pragma omp for schedule(static)
            for (int64_t q = 0; q < H * ntb * 16; q++) {
                const int64_t h = q / (ntb * 16), t = q % (ntb * 16);
                uint16_t *dst = scratch + h * per_head + t * K;
                if (t < m) memcpy(dst, x + t * ldx + h * hx, K * 2);
                else memset(dst, 0, K * 2);
            }
        }
#pragma omp for schedule(static)
        for (int64_t q = 0; q < H * (N / 16); q++) {
            const int64_t h = q / (N / 16), j = q % (N / 16);
            if (w_rows_n) {
                dot_block(w + h * hw + 16 * j * ldw, ldw, K, scratch + h * per_head, nc * TILE, ntb, last8(m), c,
                          NULL);
                store_block(c, m, j, NULL, y + h * hy, ldy, BF16);
            } else {
                dot_block_xw(scratch + h * per_head, K, w + h * hw + 16 * j, ldw, ntb, c);
                for (int64_t t = 0; t < m; t++)
                    store16(y + t * ldy + h * hy + 16 * j, _mm512_loadu_ps(c + (t / 16) * 256 + (t % 16) * 16), BF16);
            }
        }
        release_tiles();
    }
    return 0;
#else
    (void)x; (void)ldx; (void)hx; (void)m; (void)w; (void)ldw; (void)hw; (void)N; (void)K; (void)H; (void)w_rows_n;
    (void)y; (void)ldy; (void)hy; (void)scratch; (void)num_threads;
    return -1;
#endif
}
