/* One-row decode in bf16: the matrix-vector product y[N] = W[N, K] @ x[K] (+ bias), float32 sums
 * rounded once to bf16, as torch's bf16 mv does (up to the order of the sums); and one token
 * through its routed experts in one call (moe_expert_token, below).
 *
 * At one row a projection is a pure stream of its weight. Rows are split over the threads in
 * contiguous ranges (each thread reads one long run of memory), four rows a call of dot_rows.
 * dot_rows has three builds: AVX512-BF16 (vdpbf16ps multiplies bf16 pairs and sums them in
 * float32), AVX2 + FMA (bf16 widened to float32 by a shift), and plain C; they differ only in the
 * order of the float32 sums. The SIMD builds prefetch the stream PF_AHEAD bytes ahead into L2
 * (kernels.h; into L1, prefetcht0, it ran slower than without any). */
#include "kernels.h"

#if defined(__AVX512BF16__)
/* rows r .. r+R-1 (R <= 4) of W dotted with x, one row after the other: each row one sequential
 * stream of 128 elements a step into four sums (x stays in L1). Reading the R rows side by side
 * (four streams a row stride apart, software-prefetched a block ahead) streamed at 58-75% of a
 * 2-thread read on a Zen 4 EPYC against 90-100% this way (docs/benchmarks.md). */
static inline void dot_rows(const uint16_t *w, int64_t ldw, const uint16_t *x, int64_t K, int R, float *out) {
    for (int r = 0; r < R; r++) {
        const uint16_t *row = w + r * ldw;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 128 <= K; k += 128) {
            const char *ahead = (const char *)(row + k) + PF_AHEAD;
            _mm_prefetch(ahead, _MM_HINT_T1);
            _mm_prefetch(ahead + 64, _MM_HINT_T1);
            _mm_prefetch(ahead + 128, _MM_HINT_T1);
            _mm_prefetch(ahead + 192, _MM_HINT_T1);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(row + k), (__m512bh)_mm512_loadu_si512(x + k));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(row + k + 32),
                                  (__m512bh)_mm512_loadu_si512(x + k + 32));
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(row + k + 64),
                                  (__m512bh)_mm512_loadu_si512(x + k + 64));
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(row + k + 96),
                                  (__m512bh)_mm512_loadu_si512(x + k + 96));
        }
        for (; k < K; k += 32) { /* the tail: up to 32 elements at a time, masked */
            const int64_t left = K - k;
            const __mmask32 m = left >= 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, row + k),
                                  (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
        }
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* (load8_bf16 and reduce8: simd.h) */

/* rows r .. r+R-1 (R <= 4) of W dotted with x, one row after the other (as the AVX512-BF16 build:
 * side by side with prefetch, 18-20 GB/s against 26-27 GB/s this way, AVX2 code on a Zen 4 EPYC):
 * 32 columns a step into four sums */
static inline void dot_rows(const uint16_t *w, int64_t ldw, const uint16_t *x, int64_t K, int R, float *out) {
    for (int r = 0; r < R; r++) {
        const uint16_t *row = w + r * ldw;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            _mm_prefetch((const char *)(row + k) + PF_AHEAD, _MM_HINT_T1);
            a0 = _mm256_fmadd_ps(load8_bf16(row + k), load8_bf16(x + k), a0);
            a1 = _mm256_fmadd_ps(load8_bf16(row + k + 8), load8_bf16(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(load8_bf16(row + k + 16), load8_bf16(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(load8_bf16(row + k + 24), load8_bf16(x + k + 24), a3);
        }
        float s = reduce8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; k < K; k++) s += bf16_to_f32(row[k]) * bf16_to_f32(x[k]);
        out[r] = s;
    }
}
#else
/* rows r .. r+R-1 (R <= 4) of W dotted with x: eight partial sums per row */
static inline void dot_rows(const uint16_t *w, int64_t ldw, const uint16_t *x, int64_t K, int R, float *out) {
    for (int r = 0; r < R; r++) {
        const uint16_t *row = w + r * ldw;
        float acc[8] = {0};
        int64_t k = 0;
        for (; k + 8 <= K; k += 8)
            for (int j = 0; j < 8; j++) acc[j] += bf16_to_f32(row[k + j]) * bf16_to_f32(x[k + j]);
        float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
        for (; k < K; k++) s += bf16_to_f32(row[k]) * bf16_to_f32(x[k]);
        out[r] = s;
    }
}
#endif

/* W: N rows of K bf16 (row stride ldw elements, unit within a row); x: K bf16; bias: N bf16 or NULL;
 * y: N bf16. Returns 0. */
int moe_gemv_bf16(const uint16_t *w, int64_t N, int64_t K, int64_t ldw, const uint16_t *x, const uint16_t *bias,
                  uint16_t *y, int num_threads) {
    const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (N * K >= 65536)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t r0 = b * 4;
        const int R = N - r0 < 4 ? (int)(N - r0) : 4;
        float out[4];
        dot_rows(w + r0 * ldw, ldw, x, K, R, out);
        for (int r = 0; r < R; r++) {
            float v = out[r];
            if (bias) v = bf16_to_f32(f32_to_bf16(v)) + bf16_to_f32(bias[r0 + r]); /* mv, then + b, as linear */
            y[r0 + r] = f32_to_bf16(v);
        }
    }
    return 0;
}

/* One row through a GEMM per head (MLA's absorbed attention at batch 1): y[h] = W[h] @ x[h] for
 * rows_n (W[h] is [N, K]: dot products, as moe_gemv_bf16), else y[h] = x[h] @ W[h] (W[h] is [K, N]:
 * its rows scaled by x[h] and summed, N a multiple of 16); float32 sums rounded once to bf16.
 * x: H rows of K (head stride sxh); W: head stride swh, row stride swr (unit within a row); y: H rows
 * of N (head stride syh). Heads are split over the threads. Returns 0. */
int moe_heads_vec(const uint16_t *x, int64_t sxh, const uint16_t *w, int64_t swh, int64_t swr, int64_t N, int64_t K,
                  int64_t H, int rows_n, uint16_t *y, int64_t syh, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (H * N * K >= 65536)
    for (int64_t h = 0; h < H; h++) {
        const uint16_t *xh = x + h * sxh, *wh = w + h * swh;
        uint16_t *yh = y + h * syh;
        if (rows_n) {
            for (int64_t r0 = 0; r0 < N; r0 += 4) {
                const int R = N - r0 < 4 ? (int)(N - r0) : 4;
                float out[4];
                dot_rows(wh + r0 * swr, swr, xh, K, R, out);
                for (int r = 0; r < R; r++) yh[r0 + r] = f32_to_bf16(out[r]);
            }
            continue;
        }
#if defined(__AVX512F__)
        /* up to 1024 columns a pass, their sums in L1: rows of N <= 1024 are read whole, one after the
         * other (a stream; in passes of 256 columns the rows' halves ran at ~half the read rate) */
        for (int64_t n0 = 0; n0 < N; n0 += 1024) {
            const int nv = N - n0 >= 1024 ? 64 : (int)((N - n0) / 16);
            __m512 acc[64];
            for (int i = 0; i < nv; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k++) {
                const __m512 xk = _mm512_set1_ps(bf16_to_f32(xh[k]));
                const uint16_t *row = wh + k * swr + n0;
                for (int i = 0; i < nv; i += 2) _mm_prefetch((const char *)(row + 16 * i) + PF_AHEAD, _MM_HINT_T1);
                for (int i = 0; i < nv; i++) acc[i] = _mm512_fmadd_ps(load16(row + 16 * i, BF16), xk, acc[i]);
            }
            for (int i = 0; i < nv; i++) store16(yh + n0 + 16 * i, acc[i], BF16);
        }
#else
        for (int64_t n0 = 0; n0 < N; n0 += 256) { /* 256 sums over K rows */
            const int nv = N - n0 >= 256 ? 16 : (int)((N - n0) / 16);
            float acc[256] = {0};
            for (int64_t k = 0; k < K; k++) {
                const float xk = bf16_to_f32(xh[k]);
                const uint16_t *row = wh + k * swr + n0;
                for (int i = 0; i < 16 * nv; i++) acc[i] = fmaf(bf16_to_f32(row[i]), xk, acc[i]);
            }
            for (int i = 0; i < 16 * nv; i++) yh[n0 + i] = f32_to_bf16(acc[i]);
        }
#endif
    }
    return 0;
}

/* One token through n routed experts (decode at batch 1), with the roundings of the op-by-op path
 * (experts.grouped.GroupedExperts.forward_token): per expert h = W13 @ x (bf16), a = silu(gate) * up
 * (moe_silu_mul), y = W2 @ a (bf16), y * weight (bf16); the n results summed as the combine does:
 * one bf16 addition for two, a float32 sum rounded once for more. w13s[i]: [2F, D] rows, w2s[i]:
 * [D, F] rows (unit strides), weights: the routing weights already rounded to bf16, in the order
 * given. scratch: 2F + F bf16 + D float32. One parallel region: the threads split each GEMV's rows
 * (a row is always the same thread's, so the per-row sums need no locks). Returns 0. */
int moe_expert_token(const uint16_t *x, int64_t D, int64_t F, int n, const uint16_t *const *w13s,
                     const uint16_t *const *w2s, const float *weights, uint16_t *out, uint16_t *h, float *acc,
                     int num_threads) {
    uint16_t *a = h + 2 * F;
    const int64_t blocks13 = (2 * F + 3) / 4, blocks2 = (D + 3) / 4;
#pragma omp parallel num_threads(num_threads)
    for (int e = 0; e < n; e++) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks13; b++) {
            const int64_t r0 = b * 4;
            const int R = 2 * F - r0 < 4 ? (int)(2 * F - r0) : 4;
            float s[4];
            dot_rows(w13s[e] + r0 * D, D, x, D, R, s);
            for (int r = 0; r < R; r++) h[r0 + r] = f32_to_bf16(s[r]);
        }
#pragma omp single
        moe_silu_mul(h, h + F, a, BF16, 1, 1, F, 0, 0, 0, 0, 0, 0, 1);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks2; b++) {
            const int64_t r0 = b * 4;
            const int R = D - r0 < 4 ? (int)(D - r0) : 4;
            float s[4];
            dot_rows(w2s[e] + r0 * F, F, a, F, R, s);
            for (int r = 0; r < R; r++) {
                const float y = bf16_to_f32(f32_to_bf16(bf16_to_f32(f32_to_bf16(s[r])) * weights[e]));
                const int64_t i = r0 + r;
                if (e == 0) acc[i] = y;
                else if (n == 2) acc[i] = bf16_to_f32(f32_to_bf16(acc[i] + y));
                else acc[i] += y;
                if (e == n - 1) out[i] = f32_to_bf16(acc[i]);
            }
        }
    }
    return 0;
}

/* A token's MoE layer at batch 1 (experts.grouped.GroupedExperts.forward_token): experts ids[0..K)
 * of the stacked weights w13 [E, 2F, D] and w2 [E, D, F] (expert strides s13, s2 elements), in
 * ascending id order, each routing weight rounded to bf16 (the combine's arithmetic), through
 * moe_expert_token; then, with sh13 [2Fs, D] / sh2 [D, Fs] given, a shared expert's output (the
 * same kernel, weight 1) added in bf16, as SparseMoE adds it. K <= 64. scratch: 3 max(F, Fs) + D
 * bf16 and D float32. Returns 0, or -2 for an id outside [0, E). */
static int moe_row(const uint16_t *x, int64_t D, int64_t F, int64_t K, const int64_t *ids, const float *wts, int64_t E,
                   const uint16_t *w13, int64_t s13, const uint16_t *w2, int64_t s2, const uint16_t *sh13,
                   const uint16_t *sh2, int64_t Fs, uint16_t *out, uint16_t *h, float *acc, const uint16_t *resid,
                   const uint16_t *nw, float neps, uint16_t *h_out, int num_threads) {
    int64_t id[64];
    float w[64];
    if (sort_experts(ids, wts, K, E, id, w) != 0) return -2;
    const uint16_t *p13[64], *p2[64];
    for (int64_t i = 0; i < K; i++) {
        p13[i] = w13 + id[i] * s13;
        p2[i] = w2 + id[i] * s2;
    }
    const int64_t Fm = sh13 && Fs > F ? Fs : F;
    moe_expert_token(x, D, F, (int)K, p13, p2, w, out, h, acc, num_threads);
    if (sh13) add_shared_expert(x, D, sh13, sh2, Fs, out, h + 3 * Fm, h, acc, num_threads);
    then_norm(out, D, resid, nw, neps, h_out);
    return 0;
}

/* moe_row for T rows one after another (ids, wts: T rows of K; x, out, resid, h_out: T rows of D), with
 * the plan's experts (w13, s13, w2, s2, E, F), shared expert (sh13, sh2, Fs) and scratch (h, acc). */
int moe_moe_token(const MoePlan *a, const uint16_t *x, int64_t T, int64_t K, const int64_t *ids, const float *wts,
                  uint16_t *out, const uint16_t *resid, const uint16_t *nw, float neps, uint16_t *h_out, int nt) {
    const int64_t D = a->D;
    for (int64_t t = 0; t < T; t++) {
        const int rc = moe_row(x + t * D, D, a->F, K, ids + t * K, wts + t * K, a->E, a->w13, a->s13, a->w2, a->s2,
                               a->sh13, a->sh2, a->Fs, out + t * D, a->h, a->acc, resid ? resid + t * D : NULL, nw,
                               neps, h_out ? h_out + t * D : NULL, nt);
        if (rc != 0) return rc;
    }
    return 0;
}
