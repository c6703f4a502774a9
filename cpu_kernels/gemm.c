/* Grouped bf16 GEMM for CPUs without a bf16 dot product (AVX2 + FMA):
 *
 *     y[r, n] = sum_k x[r, k] * w[e(r), n, k]        rows r of expert e: offsets[e] <= r < offsets[e + 1]
 *
 * One projection is the case of one expert. Why it exists: oneDNN has no bf16 GEMM without
 * AVX512-BF16, and torch's float32 route converts the whole weight to float32 on every call (for
 * a few rows that conversion is most of the time). Here each task widens a block of weight rows
 * once into a small float32 buffer (bf16 -> float32 is a shift) and runs every row of its expert
 * against it, so the weight is read from memory once per call and never written back.
 * x is widened to float32 once up front. Sums are float32 (8 lanes, then the lanes added), rounded
 * to bf16 once, as a bf16 GEMM with float32 accumulation does; the order of the sums differs from
 * torch's, so results agree with torch to float32 rounding, not bit for bit.
 *
 * Work is split over (expert, block of NB weight rows) tasks; inside a task a 4 x 3 register tile
 * (4 weight rows, 3 x rows, 12 accumulators) runs along k. Returns -1 where not built (no AVX2). */
#include "simd.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define NB 16 /* weight rows widened per task (16 x K float32: L2-resident for K up to ~8k) */

/* acc[i][j] = w row i . x row j over K (K8 = K rounded down to 8; the rest scalar) for NR <= 4
 * weight rows and MR <= 3 x rows; always inlined with constant NR, MR so the tile stays in registers */
static inline __attribute__((always_inline)) void tile(int NR, int MR, const float *wf, int64_t K,
                                                       const float *xf, int64_t ldx, float out[4][3]) {
    __m256 acc[4][3];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MR; j++) acc[i][j] = _mm256_setzero_ps();
    const int64_t K8 = K & ~(int64_t)7;
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 xv[3];
        for (int j = 0; j < MR; j++) xv[j] = _mm256_loadu_ps(xf + j * ldx + k);
        for (int i = 0; i < NR; i++) {
            const __m256 wv = _mm256_loadu_ps(wf + i * K + k);
            for (int j = 0; j < MR; j++) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MR; j++) {
            float s = reduce8(acc[i][j]);
            for (int64_t k = K8; k < K; k++) s += wf[i * K + k] * xf[j * ldx + k];
            out[i][j] = s;
        }
}

#define TILE_CASE(nr, mr) case (nr) * 4 + (mr): tile(nr, mr, wf, K, xf, ldx, out); break;

static void tile_any(int nr, int mr, const float *wf, int64_t K, const float *xf, int64_t ldx, float out[4][3]) {
    switch (nr * 4 + mr) {
        TILE_CASE(4, 3) TILE_CASE(4, 2) TILE_CASE(4, 1)
        TILE_CASE(3, 3) TILE_CASE(3, 2) TILE_CASE(3, 1)
        TILE_CASE(2, 3) TILE_CASE(2, 2) TILE_CASE(2, 1)
        TILE_CASE(1, 3) TILE_CASE(1, 2) TILE_CASE(1, 1)
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
        float *wf = (float *)malloc((size_t)NB * K * sizeof(float));
        if (!wf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < E * nblocks; task++) {
            if (!wf) continue;
            const int64_t e = task / nblocks, n0 = (task % nblocks) * NB;
            const int64_t rows = offsets[e + 1] - offsets[e];
            if (rows <= 0) continue;
            const int64_t nb = N - n0 < NB ? N - n0 : NB;
            const uint16_t *wsrc = w + e * esw + n0 * ldw;
            for (int64_t i = 0; i < nb; i++) {
                int64_t k = 0;
                for (; k + 8 <= K; k += 8) _mm256_storeu_ps(wf + i * K + k, load8_bf16(wsrc + i * ldw + k));
                for (; k < K; k++) wf[i * K + k] = bf16_to_f32(wsrc[i * ldw + k]);
            }
            const float *xe = xf + (offsets[e] - r0) * K;
            for (int64_t m = 0; m < rows; m += 3) {
                const int mr = rows - m < 3 ? (int)(rows - m) : 3;
                for (int64_t i = 0; i < nb; i += 4) {
                    const int nr = nb - i < 4 ? (int)(nb - i) : 4;
                    float out[4][3];
                    tile_any(nr, mr, wf + i * K, K, xe + m * K, K, out);
                    for (int j = 0; j < mr; j++) {
                        const int64_t row = offsets[e] + m + j;
                        for (int a = 0; a < nr; a++) {
                            const int64_t col = n0 + i + a;
                            if (y_f32) ((float *)y)[row * ldy + col] = out[a][j];
                            else y[row * ldy + col] = f32_to_bf16(out[a][j]);
                        }
                    }
                }
            }
        }
        free(wf);
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
