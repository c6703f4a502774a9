/* One-row decode in bf16: the matrix-vector product y[N] = W[N, K] @ x[K] (+ bias), float32 sums
 * rounded once to bf16, as torch's bf16 mv does (up to the order of the sums); and one token
 * through its routed experts in one call (moe_expert_token, below).
 *
 * At one row a projection is a pure stream of its weight. Rows are split over the threads in
 * contiguous ranges (each thread reads one long run of memory), four rows a call of dot_rows.
 * dot_rows has three builds: AVX512-BF16 (vdpbf16ps multiplies bf16 pairs and sums them in
 * float32), AVX2 + FMA (bf16 widened to float32 by a shift), and plain C; they differ only in the
 * order of the float32 sums. The SIMD builds prefetch the stream PF_AHEAD bytes ahead into L2
 * (kernels.h; into L1, prefetcht0, it ran slower than without any).
 *
 * A captured step of several rows (verify rows, a few sequences' tokens: moe.cpu_decode) reads
 * each weight once for all of them: dot_x streams a weight row against up to four x rows at a time,
 * every row's sums taking dot_rows' steps, so each row's result is its one-row result bit for bit
 * (moe_gemv_bf16_rows; the experts of several rows in moe_rows / expert_rows below). */
#include "kernels.h"

#if defined(__AVX512BF16__)
/* The 256 bytes of a weight stream PF_AHEAD bytes past p, asked into L2 (dot_rows). */
static inline void prefetch_ahead(const uint16_t *p) {
    const char *ahead = (const char *)p + PF_AHEAD;
    _mm_prefetch(ahead, _MM_HINT_T1);
    _mm_prefetch(ahead + 64, _MM_HINT_T1);
    _mm_prefetch(ahead + 128, _MM_HINT_T1);
    _mm_prefetch(ahead + 192, _MM_HINT_T1);
}

/* The same PF_AHEAD_ROWS bytes past p (dot_x_row: its 128 elements of W take up to four rows' sums,
 * so the stream needs asking further ahead), as asm: GCC dropped the intrinsics' prefetches from
 * dot_x_row's bodies at T = 2..4 (none in the object code; 17-20 against 26-27 GB/s at two rows on
 * 5632 x 1024 with them back, machine D). 2 KB ahead: 18-21 GB/s at 2-4 rows, 4 KB 21-27, 8 KB 19-26. */
static inline void prefetch_rows_ahead(const uint16_t *p) {
    const char *ahead = (const char *)p + PF_AHEAD_ROWS;
    __asm__ volatile("prefetcht1 %0\n\tprefetcht1 %1\n\tprefetcht1 %2\n\tprefetcht1 %3"
                     :: "m"(ahead[0]), "m"(ahead[64]), "m"(ahead[128]), "m"(ahead[192]));
}

/* One row of W dotted with each of T <= 4 rows xs[t], the row read once: for every x row exactly
 * dot_rows's steps (a sequential stream of 128 elements a step into four sums, the masked tail, the
 * same reduction), so each result is dot_rows's bit for bit. T is a constant wherever this inlines
 * (16 sums stay in registers). */
static inline __attribute__((always_inline)) void dot_x_row(const uint16_t *row, const uint16_t *const *xs,
                                                             const int T, int64_t K, float *out) {
    __m512 a[4][4];
    for (int t = 0; t < T; t++)
        for (int j = 0; j < 4; j++) a[t][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        prefetch_rows_ahead(row + k);
        __m512bh w[4];
        for (int j = 0; j < 4; j++) w[j] = (__m512bh)_mm512_loadu_si512(row + k + 32 * j);
        for (int t = 0; t < T; t++)
            for (int j = 0; j < 4; j++)
                a[t][j] = _mm512_dpbf16_ps(a[t][j], w[j], (__m512bh)_mm512_loadu_si512(xs[t] + k + 32 * j));
    }
    for (; k < K; k += 32) {
        const int64_t left = K - k;
        const __mmask32 m = left >= 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1);
        const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(m, row + k);
        for (int t = 0; t < T; t++)
            a[t][0] = _mm512_dpbf16_ps(a[t][0], w, (__m512bh)_mm512_maskz_loadu_epi16(m, xs[t] + k));
    }
    for (int t = 0; t < T; t++)
        out[t] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[t][0], a[t][1]), _mm512_add_ps(a[t][2], a[t][3])));
}

/* rows r .. r+R-1 (R <= 4) of W dotted with x, one row after the other: each row one sequential
 * stream of 128 elements a step into four sums (x stays in L1), dot_x_row's steps at T = 1 written
 * out (through dot_x_row the one-row GEMV ran ~4% slower on a 5632 x 1024 weight). Reading the R
 * rows side by side (four streams a row stride apart, software-prefetched a block ahead) streamed at
 * 58-75% of a 2-thread read on a Zen 4 EPYC against 90-100% this way (docs/benchmarks.md). */
static inline void dot_rows(const uint16_t *w, int64_t ldw, const uint16_t *x, int64_t K, int R, float *out) {
    for (int r = 0; r < R; r++) {
        const uint16_t *row = w + r * ldw;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 128 <= K; k += 128) {
            prefetch_ahead(row + k);
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


/* Rows r .. r+R-1 (R <= 4) of W dotted with each of T rows xs[t] (T <= DOT_X_MAX): out[r * T + t] is
 * dot_rows's result for row r and x = xs[t], bit for bit, each weight row read from memory once (at
 * most four x rows a pass over it; a later pass finds it in L1). Other builds: dot_rows per x row
 * (the R rows then come from L1 / L2 after the first). */
#define DOT_X_MAX 64
static inline void dot_x(const uint16_t *w, int64_t ldw, const uint16_t *const *xs, int T, int64_t K, int R,
                         float *out) {
#if defined(__AVX512BF16__)
    for (int r = 0; r < R; r++) {
        const uint16_t *row = w + r * ldw;
        for (int t0 = 0; t0 < T; t0 += 4) {
            float *o = out + r * T + t0;
            switch (T - t0 >= 4 ? 4 : T - t0) {
            case 1: dot_x_row(row, xs + t0, 1, K, o); break;
            case 2: dot_x_row(row, xs + t0, 2, K, o); break;
            case 3: dot_x_row(row, xs + t0, 3, K, o); break;
            default: dot_x_row(row, xs + t0, 4, K, o); break;
            }
        }
    }
#else
    float s[4];
    for (int t = 0; t < T; t++) {
        dot_rows(w, ldw, xs[t], K, R, s);
        for (int r = 0; r < R; r++) out[r * T + t] = s[r];
    }
#endif
}

/* moe_gemv_bf16 for T <= DOT_X_MAX rows at once: ys[t] = W xs[t] (+ bias), each row bit for bit what
 * moe_gemv_bf16 computes for it, W read once (dot_x; one row through moe_gemv_bf16 itself, whose
 * dot_rows streamed a 65 MB LM head at 0.96 of a read probe against dot_x's 0.91, 2026-12-06, Zen 4).
 * Returns 0, -1 for T outside [1, DOT_X_MAX]. */
int moe_gemv_bf16_rows(const uint16_t *w, int64_t N, int64_t K, int64_t ldw, const uint16_t *const *xs, int64_t T,
                       const uint16_t *bias, uint16_t *const *ys, int num_threads) {
    if (T < 1 || T > DOT_X_MAX) return -1;
    if (T == 1) return moe_gemv_bf16(w, N, K, ldw, xs[0], bias, ys[0], num_threads);
    const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (N * K >= 65536)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t r0 = b * 4;
        const int R = N - r0 < 4 ? (int)(N - r0) : 4;
        float out[4 * DOT_X_MAX];
        dot_x(w + r0 * ldw, ldw, xs, (int)T, K, R, out);
        for (int r = 0; r < R; r++)
            for (int64_t t = 0; t < T; t++) {
                float v = out[r * T + t];
                if (bias) v = bf16_to_f32(f32_to_bf16(v)) + bf16_to_f32(bias[r0 + r]);
                ys[t][r0 + r] = f32_to_bf16(v);
            }
    }
    return 0;
}

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

#if defined(__AVX512BF16__)
/* yh[n0 .. n0 + 32 * nc) = xh @ W[:, n0 ..) (W: K rows, row stride swr, unit within a row) for
 * moe_heads_vec's x @ W form: each row's 32-column chunk loaded once (64 bytes) and put through
 * vdpbf16ps twice, against (x[k], 0) and (0, x[k]) pairs, which adds x[k] * W[k][n] to the even and
 * to the odd columns' float32 sums: per column the fused multiply-adds of the float32 path in the
 * same order (a bf16 product is exact in float32; vdpbf16ps flushes denormals), with a third of its
 * instructions. Rows read whole, one after the other: 32 chunks of a 512-column row kept 32 sums in
 * registers and read at a plain sum's rate on a Zen 4 EPYC, the float32 path (two 32-byte loads
 * widened per chunk) at 0.79 of it, passes of 256 columns (half rows) at 0.66. nc <= 16. */
static inline __attribute__((always_inline)) void xw_chunks(const uint16_t *xh, const uint16_t *wh, int64_t swr,
                                                             int64_t K, int nc, uint16_t *yh) {
    __m512 ev[16], od[16];
    for (int i = 0; i < nc; i++) ev[i] = od[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m512bh xe = (__m512bh)_mm512_set1_epi32(xh[k]);                         /* (x[k], 0) */
        const __m512bh xo = (__m512bh)_mm512_set1_epi32((int)((uint32_t)xh[k] << 16)); /* (0, x[k]) */
        const uint16_t *row = wh + k * swr;
        for (int i = 0; i < nc; i++) {
            _mm_prefetch((const char *)(row + 32 * i) + PF_AHEAD, _MM_HINT_T1);
            const __m512bh w = (__m512bh)_mm512_loadu_si512(row + 32 * i);
            ev[i] = _mm512_dpbf16_ps(ev[i], w, xe);
            od[i] = _mm512_dpbf16_ps(od[i], w, xo);
        }
    }
    for (int i = 0; i < nc; i++) { /* interleave even and odd columns back: per 128-bit lane, 4 + 4 columns */
        const __m512 lo = _mm512_unpacklo_ps(ev[i], od[i]), hi = _mm512_unpackhi_ps(ev[i], od[i]);
        const __m512 a = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(1, 0, 1, 0));
        const __m512 b = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 2, 3, 2));
        store16(yh + 32 * i, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(3, 1, 2, 0)), BF16);
        store16(yh + 32 * i + 16, _mm512_shuffle_f32x4(b, b, _MM_SHUFFLE(3, 1, 2, 0)), BF16);
    }
}
#endif

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
        int64_t n0 = 0;
#if defined(__AVX512BF16__)
        if (N <= 512 + 16) { /* (wider rows keep whole-row passes of the float32 path below) */
            const int nc = (int)(N / 32);
            if (nc == 16) xw_chunks(xh, wh, swr, K, 16, yh); /* (MLA's 512-dim latent: the sums in registers) */
            else if (nc > 0) xw_chunks(xh, wh, swr, K, nc, yh);
            n0 = 32 * nc;
        }
#endif
#if defined(__AVX512F__)
        /* up to 1024 columns a pass, their sums in L1: rows of N <= 1024 are read whole, one after the
         * other (a stream; in passes of 256 columns the rows' halves ran at ~half the read rate) */
        for (; n0 < N; n0 += 1024) {
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
        for (; n0 < N; n0 += 256) { /* 256 sums over K rows */
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
    return moe_expert_token_ex(x, D, F, n, w13s, w2s, NULL, weights, out, h, acc, num_threads);
}

/* moe_expert_token with ex's biases and activation (NULL: plain SwiGLU, no biases). */
int moe_expert_token_ex(const uint16_t *x, int64_t D, int64_t F, int n, const uint16_t *const *w13s,
                        const uint16_t *const *w2s, const ExpertExtras *ex, const float *weights, uint16_t *out,
                        uint16_t *h, float *acc, int num_threads) {
    uint16_t *a = h + 2 * F;
    const int64_t blocks13 = (2 * F + 3) / 4, blocks2 = (D + 3) / 4;
#pragma omp parallel num_threads(num_threads)
    for (int e = 0; e < n; e++) {
        const uint16_t *b13 = ex && ex->b13s ? ex->b13s[e] : NULL, *b2 = ex && ex->b2s ? ex->b2s[e] : NULL;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks13; b++) {
            const int64_t r0 = b * 4;
            const int R = 2 * F - r0 < 4 ? (int)(2 * F - r0) : 4;
            float s[4];
            dot_rows(w13s[e] + r0 * D, D, x, D, R, s);
            for (int r = 0; r < R; r++) h[r0 + r] = with_bias(s[r], b13, r0 + r);
        }
#pragma omp single
        expert_act(h, F, ex, a);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks2; b++) {
            const int64_t r0 = b * 4;
            const int R = D - r0 < 4 ? (int)(D - r0) : 4;
            float s[4];
            dot_rows(w2s[e] + r0 * F, F, a, F, R, s);
            for (int r = 0; r < R; r++) {
                const float y = bf16_to_f32(f32_to_bf16(bf16_to_f32(with_bias(s[r], b2, r0 + r)) * weights[e]));
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

/* The plan's experts' extras (ExpertExtras) for n experts of ids id (b13s, b2s: n pointers each, filled
 * where the plan has biases). */
static ExpertExtras plan_extras(const MoePlan *a, const int64_t *id, int64_t n, const uint16_t **b13s,
                                const uint16_t **b2s) {
    ExpertExtras ex = {NULL, NULL, a->sig, a->alpha, a->limit, (int)a->act, (int)a->clamp};
    if (a->b13) {
        for (int64_t i = 0; i < n; i++) b13s[i] = a->b13 + id[i] * a->sb13;
        ex.b13s = b13s;
    }
    if (a->b2) {
        for (int64_t i = 0; i < n; i++) b2s[i] = a->b2 + id[i] * a->sb2;
        ex.b2s = b2s;
    }
    return ex;
}

/* A token's MoE layer at batch 1 (experts.grouped.GroupedExperts.forward_token): experts ids[0..K)
 * of the plan's stacked weights w13 [E, 2F, D] and w2 [E, D, F] (expert strides s13, s2 elements),
 * in ascending id order, each routing weight rounded to bf16 (the combine's arithmetic), through
 * moe_expert_token_ex (the plan's biases and activation); then, with a shared expert sh13 [2Fs, D] /
 * sh2 [D, Fs], its output (the same kernel, weight 1; with shg, gated: gate_shared_expert) added in
 * bf16, as SparseMoE adds it. K <= 64. scratch (a->h, a->acc): 3 max(F, Fs) + D bf16 and D float32.
 * Returns 0, or -2 for an id outside [0, E). */
static int moe_row(const MoePlan *a, const uint16_t *x, int64_t K, const int64_t *ids, const float *wts,
                   uint16_t *out, const uint16_t *resid, const uint16_t *nw, float neps, uint16_t *h_out,
                   int num_threads) {
    const int64_t D = a->D, F = a->F, Fs = a->Fs;
    int64_t id[64];
    float w[64];
    if (sort_experts(ids, wts, K, a->E, id, w) != 0) return -2;
    const uint16_t *p13[64], *p2[64], *b13s[64], *b2s[64];
    for (int64_t i = 0; i < K; i++) {
        p13[i] = a->w13 + id[i] * a->s13;
        p2[i] = a->w2 + id[i] * a->s2;
    }
    const ExpertExtras ex = plan_extras(a, id, K, b13s, b2s);
    const int64_t Fm = a->sh13 && Fs > F ? Fs : F;
    moe_expert_token_ex(x, D, F, (int)K, p13, p2, &ex, w, out, a->h, a->acc, num_threads);
    if (a->sh13)
        add_shared_expert(x, D, a->sh13, a->sh2, a->shg, a->sig, Fs, out, a->h + 3 * Fm, a->h, a->acc, num_threads);
    then_norm(out, D, resid, nw, neps, h_out);
    return 0;
}

/* T <= 8 rows (a verify step's) through their experts at once, each expert read once for the rows
 * that chose it: task i (experts in ascending id order; w13s[i] [2F, D], w2s[i] [D, F]) takes cnt[i]
 * rows, row[i * T + j] (an index into x / out, rows of D) at routing weight wt[i * T + j] (rounded to
 * bf16) and place at[i * T + j] among that row's K experts. Each row's result is moe_expert_token's
 * for its K experts in ascending order, bit for bit (dot_x sums as dot_rows, the same roundings and
 * combine). scratch: h T x 3F bf16, acc T x D float32. One parallel region, as moe_expert_token. */
static void expert_rows(const uint16_t *x, int64_t T, int64_t D, int64_t F, int n, const uint16_t *const *w13s,
                        const uint16_t *const *w2s, const ExpertExtras *ex, const int64_t *cnt, const int64_t *row,
                        const float *wt, const int64_t *at, int64_t K, uint16_t *out, uint16_t *h, float *acc,
                        int num_threads) {
    const int64_t blocks13 = (2 * F + 3) / 4, blocks2 = (D + 3) / 4;
#pragma omp parallel num_threads(num_threads)
    for (int e = 0; e < n; e++) {
        const int64_t c = cnt[e], *rows = row + e * T;
        const uint16_t *b13 = ex && ex->b13s ? ex->b13s[e] : NULL, *b2 = ex && ex->b2s ? ex->b2s[e] : NULL;
        const uint16_t *xs[8], *as[8];
        uint16_t *hs[8];
        for (int64_t j = 0; j < c; j++) {
            xs[j] = x + rows[j] * D;
            hs[j] = h + rows[j] * 3 * F;
            as[j] = hs[j] + 2 * F;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks13; b++) {
            const int64_t r0 = b * 4;
            const int R = 2 * F - r0 < 4 ? (int)(2 * F - r0) : 4;
            float s[4 * 8];
            dot_x(w13s[e] + r0 * D, D, xs, (int)c, D, R, s);
            for (int r = 0; r < R; r++)
                for (int64_t j = 0; j < c; j++) hs[j][r0 + r] = with_bias(s[r * c + j], b13, r0 + r);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < c; j++) expert_act(hs[j], F, ex, hs[j] + 2 * F);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks2; b++) {
            const int64_t r0 = b * 4;
            const int R = D - r0 < 4 ? (int)(D - r0) : 4;
            float s[4 * 8];
            dot_x(w2s[e] + r0 * F, F, as, (int)c, F, R, s);
            for (int r = 0; r < R; r++)
                for (int64_t j = 0; j < c; j++) {
                    const int64_t i = r0 + r, t = rows[j], place = at[e * T + j];
                    const float yb = bf16_to_f32(with_bias(s[r * c + j], b2, i));
                    const float y = bf16_to_f32(f32_to_bf16(yb * wt[e * T + j]));
                    float *a = acc + t * D + i;
                    if (place == 0) *a = y;
                    else if (K == 2) *a = bf16_to_f32(f32_to_bf16(*a + y));
                    else *a += y;
                    if (place == K - 1) out[t * D + i] = f32_to_bf16(*a);
                }
        }
    }
}

/* moe_row for T <= 8 rows at once (T > 1: a verify step's rows): the union of the rows' experts,
 * each read once (expert_rows), then the shared expert once for all rows, added in bf16, and each
 * row's residual tail; every row bit for bit moe_row's. scratch: h T x (3 max(F, Fs) + D) bf16 (the
 * shared expert's output after the activations), acc T x D float32. Returns 0, -2 for an id outside
 * [0, E), -1 without memory. */
static int moe_rows(const MoePlan *a, const uint16_t *x, int64_t T, int64_t K, const int64_t *ids, const float *wts,
                    uint16_t *out, const uint16_t *resid, const uint16_t *nw, float neps, uint16_t *h_out, int nt) {
    const int64_t D = a->D, F = a->F, Fs = a->Fs;
    const int64_t Fm = a->sh13 && Fs > F ? Fs : F;
    if (T == 1) /* (the one-row kernel: dot_rows, not dot_x at one row, which ran ~4% slower) */
        return moe_row(a, x, K, ids, wts, out, resid, nw, neps, h_out, nt);
    ExpertTasks tk;
    const int rc = expert_tasks(ids, wts, T, K, a->E, &tk);
    if (rc != 0) return rc;
    const int n = (int)tk.n;
    const uint16_t *w13s[512], *w2s[512]; /* (n <= T K <= 512) */
    for (int i = 0; i < n; i++) {
        w13s[i] = a->w13 + tk.eid[i] * a->s13;
        w2s[i] = a->w2 + tk.eid[i] * a->s2;
    }
    int64_t *cnt = tk.cnt, *row = tk.row, *at = tk.at;
    float *wt = tk.wt;
    const uint16_t *b13s[512], *b2s[512];
    const ExpertExtras ex = plan_extras(a, tk.eid, n, b13s, b2s);
    expert_rows(x, T, D, F, n, w13s, w2s, &ex, cnt, row, wt, at, K, out, a->h, a->acc, nt);
    if (a->sh13) { /* weight 1, the one expert of each row */
        uint16_t *tmp = a->h + T * 3 * Fm;
        cnt[0] = T;
        for (int64_t t = 0; t < T; t++) {
            row[t] = t;
            wt[t] = 1.f;
            at[t] = 0;
        }
        expert_rows(x, T, D, Fs, 1, &a->sh13, &a->sh2, NULL, cnt, row, wt, at, 1, tmp, a->h, a->acc, nt);
        if (a->shg)
            for (int64_t t = 0; t < T; t++) gate_shared_expert(x + t * D, D, a->shg, a->sig, tmp + t * D, nt);
        for (int64_t i = 0; i < T * D; i++) out[i] = f32_to_bf16(bf16_to_f32(out[i]) + bf16_to_f32(tmp[i]));
    }
    expert_tasks_free(&tk);
    for (int64_t t = 0; t < T; t++)
        then_norm(out + t * D, D, resid ? resid + t * D : NULL, nw, neps, h_out ? h_out + t * D : NULL);
    return 0;
}

/* moe_row for T rows (ids, wts: T rows of K; x, out, resid, h_out: T rows of D), a->rows (<= 8) at a
 * time through moe_rows, with the plan's experts (w13, s13, w2, s2, E, F), shared expert (sh13, sh2,
 * Fs) and scratch (h, acc: for a->rows rows). */
int moe_moe_token(const MoePlan *a, const uint16_t *x, int64_t T, int64_t K, const int64_t *ids, const float *wts,
                  uint16_t *out, const uint16_t *resid, const uint16_t *nw, float neps, uint16_t *h_out, int nt) {
    const int64_t D = a->D, R = a->rows;
    for (int64_t t = 0; t < T; t += R) {
        const int rc = moe_rows(a, x + t * D, T - t < R ? T - t : R, K, ids + t * K, wts + t * K, out + t * D,
                                resid ? resid + t * D : NULL, nw, neps, h_out ? h_out + t * D : NULL, nt);
        if (rc != 0) return rc;
    }
    return 0;
}
