/* Grouped bf16 GEMM for CPUs without a bf16 dot product (AVX2 + FMA):
 *
 *     y[r, n] = sum_k x[r, k] * w[e(r), n, k]        rows r of expert e: offsets[e] <= r < offsets[e + 1]
 *
 * One projection is the case of one expert. Why it exists: oneDNN has no bf16 GEMM without
 * AVX512-BF16, and torch's float32 route converts the whole weight to float32 on every call (for
 * a few rows that conversion is most of the time). Here each task widens a block of weight rows
 * once into a small float32 buffer (bf16 -> float32 is a shift) and runs every row of its expert
 * against it, so the weight is read from memory once per call and never written back.
 * x is widened to float32 once up front. Sums are float32, in k order, rounded to bf16 once, as a
 * bf16 GEMM with float32 accumulation does; the order of the sums differs from torch's, so results
 * agree with torch to float32 rounding, not bit for bit.
 *
 * Work is split over (expert, block of NB = 16 weight rows) tasks. A task widens its block
 * transposed (wt[k][16]: 8 x 8 register transposes), then runs a 6 x 16 register tile over it
 * (BLIS-style outer products: per k, two weight vectors and six broadcast x values feed twelve
 * FMAs, and every output sums in k order), so the weight block is read from L1/L2 once per six
 * rows instead of the x and w rows both streaming per dot product (1.2-1.6x the 4 x 3 dot-product
 * tile this replaced: 8 experts x 2816 x 1024 at 64-256 rows each, 83-94 -> 121-155 GFLOP/s on two
 * AVX2 cores). Returns -1 where not built (no AVX2). */
#include "simd.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define NB 16 /* weight rows per task: two 8-lane vectors of outputs (16 x K float32, L2-resident) */
#define MR 6  /* x rows per register tile: 6 x 2 accumulators + 2 weight vectors + 1 broadcast */

/* an 8 x 8 float transpose in registers */
static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20); r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20); r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31); r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31); r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* wt[k][i] = w row i (of nb <= NB; rows past nb zero) at column k, as float32 */
static void widen_transposed(const uint16_t *w, int64_t ldw, int64_t nb, int64_t K, float *wt) {
    int64_t k0 = 0;
    if (nb == NB)
        for (; k0 + 8 <= K; k0 += 8)
            for (int h = 0; h < NB / 8; h++) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = load8_bf16(w + (h * 8 + i) * ldw + k0);
                transpose8(r);
                for (int k = 0; k < 8; k++) _mm256_store_ps(wt + (k0 + k) * NB + h * 8, r[k]);
            }
    for (; k0 < K; k0++)
        for (int64_t i = 0; i < NB; i++) wt[k0 * NB + i] = i < nb ? bf16_to_f32(w[i * ldw + k0]) : 0.f;
}

/* out[j][i] = sum_k wt[k][i] * x[j][k] for mr <= MR rows of x; always inlined with a constant mr
 * so the 12 accumulators stay in registers */
static inline __attribute__((always_inline)) void tile(int mr, const float *wt, int64_t K, const float *xf,
                                                       int64_t ldx, float out[MR][NB]) {
    __m256 acc[MR][2];
    for (int j = 0; j < mr; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m256 w0 = _mm256_load_ps(wt + k * NB), w1 = _mm256_load_ps(wt + k * NB + 8);
        for (int j = 0; j < mr; j++) {
            const __m256 xb = _mm256_broadcast_ss(xf + j * ldx + k);
            acc[j][0] = _mm256_fmadd_ps(w0, xb, acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(w1, xb, acc[j][1]);
        }
    }
    for (int j = 0; j < mr; j++) {
        _mm256_storeu_ps(out[j], acc[j][0]);
        _mm256_storeu_ps(out[j] + 8, acc[j][1]);
    }
}

#define TILE_CASE(m) case m: tile(m, wt, K, xf, ldx, out); break;

static void tile_any(int mr, const float *wt, int64_t K, const float *xf, int64_t ldx, float out[MR][NB]) {
    switch (mr) {
        TILE_CASE(6) TILE_CASE(5) TILE_CASE(4) TILE_CASE(3) TILE_CASE(2) TILE_CASE(1)
        default: break;
    }
}

int moe_grouped_gemm_bf16(const uint16_t *w, int64_t E, int64_t N, int64_t K, int64_t ldw, int64_t esw,
                          const uint16_t *x, int64_t ldx, const int64_t *offsets,
                          uint16_t *y, int64_t ldy, int y_f32, int num_threads) {
    const int64_t R = offsets[E] - offsets[0], r0 = offsets[0];
    if (R <= 0 || N <= 0) return 0;
    float *xf = (float *)malloc((size_t)R * K * sizeof(float));
    if (!xf) return -2;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (R * K >= 65536)
    for (int64_t r = 0; r < R; r++) {
        const uint16_t *src = x + (r0 + r) * ldx;
        float *dst = xf + r * K;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, load8_bf16(src + k));
        for (; k < K; k++) dst[k] = bf16_to_f32(src[k]);
    }
    const int64_t nblocks = (N + NB - 1) / NB;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (R * N * K >= 262144)
    {
        float *wt = (float *)aligned_alloc(64, (size_t)NB * K * sizeof(float));  /* NB * 4 bytes: 64-multiple */
        if (!wt) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < E * nblocks; task++) {
            if (!wt) continue;
            const int64_t e = task / nblocks, n0 = (task % nblocks) * NB;
            const int64_t rows = offsets[e + 1] - offsets[e];
            if (rows <= 0) continue;
            const int64_t nb = N - n0 < NB ? N - n0 : NB;
            widen_transposed(w + e * esw + n0 * ldw, ldw, nb, K, wt);
            const float *xe = xf + (offsets[e] - r0) * K;
            for (int64_t m = 0; m < rows; m += MR) {
                const int mr = rows - m < MR ? (int)(rows - m) : MR;
                float out[MR][NB];
                tile_any(mr, wt, K, xe + m * K, K, out);
                for (int j = 0; j < mr; j++) {
                    const int64_t row = offsets[e] + m + j;
                    for (int64_t a = 0; a < nb; a++) {
                        if (y_f32) ((float *)y)[row * ldy + n0 + a] = out[j][a];
                        else y[row * ldy + n0 + a] = f32_to_bf16(out[j][a]);
                    }
                }
            }
        }
        free(wt);
    }
    free(xf);
    return failed ? -2 : 0;
}

#else

int moe_grouped_gemm_bf16(const uint16_t *w, int64_t E, int64_t N, int64_t K, int64_t ldw, int64_t esw,
                          const uint16_t *x, int64_t ldx, const int64_t *offsets,
                          uint16_t *y, int64_t ldy, int y_f32, int num_threads) {
    (void)w; (void)E; (void)N; (void)K; (void)ldw; (void)esw; (void)x; (void)ldx; (void)offsets;
    (void)y; (void)ldy; (void)y_f32; (void)num_threads;
    return -1;
}

#endif
