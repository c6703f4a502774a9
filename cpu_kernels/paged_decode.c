/* Paged decode attention for CPUs: one query row per sequence, K/V read in place through the
 * block table (no gather), GQA query heads of a KV head computed together so every cached row is
 * read once. Built and loaded by kvcache/cpu_decode.py; semantics are kvcache/reference.py's.
 *
 * Work item = (sequence, run of KV heads), spread over OpenMP threads (the process's own runtime:
 * torch has already loaded libgomp.so.1, so this library binds to the same thread pool).
 * Per item: scores = (q . k) * scale for every cached token (float32), softmax with an optional
 * sink logit, then the weighted sum of V rows. Caches are float32 or bfloat16, as q and out are, or
 * fp8 (e4m3 rows with a float32 scale per row, beside float32 / bf16 q: each row read as its e4m3
 * values, its scale applied to its score and to its weight in the sum of V; on AVX512-BF16 the rows
 * widened to bf16, exactly, for vdpbf16ps).
 *
 * AVX-512 paths (head dims a multiple of 16): scores of 16 tokens are accumulated as 16 vectors
 * and reduced together (hsum16: 45 shuffles/adds instead of 16 horizontal reductions); bf16 K
 * rows are multiplied by the bf16 query with vdpbf16ps where the CPU has AVX512-BF16 (products
 * exact, float32 sums); the V sum keeps its accumulators in registers and loads each V row once
 * for the score rows of its KV head (4 rows x 64 dims or 2 x 128 at a time).
 * AVX2 + FMA paths (CPUs without AVX-512; head dims a multiple of 8): the same structure on 8 lanes
 * and 16 registers: scores of 8 tokens reduced together (hsum8x8), V sums of 4 rows x 16 dims,
 * 2 x 32 or 1 x 64 at a time. Per score row and dim every build sums V in token order; the
 * builds differ in the order of the q . k sums and in exp (polynomial vs expf). */
#include "kernels.h"
#if defined(_OPENMP)
#include <omp.h>
#endif

/* 16 / 8 cached elements (float32, bf16, or e4m3 with FP8) -> floats */
#if defined(__AVX512F__)
static inline __m512 loadc16(const void *p, int dtype) { return dtype == FP8 ? load16_e4m3(p) : load16(p, dtype); }
#elif defined(VEC8)
static inline __m256 loadc8(const void *p, int dtype) { return dtype == FP8 ? load8_e4m3(p) : load8(p, dtype); }
#endif

/* CALL with dt_ a constant for the caches' dtype d: the always-inline V sums it calls then test no
 * dtype per loaded vector (the fp8 widening beside the others cost ~1% of bf16 decode) */
#define WITH_DTYPE(d, CALL)                  \
    do {                                     \
        if ((d) == BF16) {                   \
            const int dt_ = BF16;            \
            CALL;                            \
        } else if ((d) == FP8) {             \
            const int dt_ = FP8;             \
            CALL;                            \
        } else {                             \
            const int dt_ = F32;             \
            CALL;                            \
        }                                    \
    } while (0)

#if defined(__AVX512F__)
/* scores of cnt <= 16 consecutive cached rows (row t at k + t * stride bytes) against one query
 * row: qf (float32, length D) or, on the vdpbf16ps path, qb (bf16). D % 16 == 0. Inlined: called
 * with cnt = 16 (a full block) its sums stay in registers (with a runtime count they went through
 * the stack). */
static inline __attribute__((always_inline)) __m512 score16(const float *qf, const uint16_t *qb, const char *k,
                                                            int64_t stride, int cnt, int64_t D, int dtype) {
    __m512 acc[16];
    for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
    if (dtype == BF16 && D % 32 == 0) {
        for (int64_t i = 0; i < D; i += 32) {
            const __m512bh qv = (__m512bh)_mm512_loadu_si512(qb + i);
            for (int t = 0; t < cnt; t++)
                acc[t] = _mm512_dpbf16_ps(acc[t], qv, (__m512bh)_mm512_loadu_si512(k + t * stride + i * 2));
        }
        return hsum16(acc);
    }
#endif
    const size_t esz = dtype_size(dtype);
    for (int64_t i = 0; i < D; i += VEC) {
        const __m512 qv = _mm512_loadu_ps(qf + i);
        for (int t = 0; t < cnt; t++) acc[t] = _mm512_fmadd_ps(qv, loadc16(k + t * stride + i * esz, dtype), acc[t]);
    }
    return hsum16(acc);
}

#if defined(__AVX512BF16__)
/* 32 e4m3 values -> their bf16 bits (exact: e4m3_to_f32's values, all normal in bf16; the subnormal
 * magnitudes 1-7 from a table) */
static inline __m512i e4m3x32_bf16(const void *p) {
    const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    const __m512i mag = _mm512_and_si512(x, _mm512_set1_epi16(0x7f));
    const __m512i sub = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x3c603c40, 0x3c203c00, 0x3bc03b80,
                                         0x3b000000);  /* 16-bit lane m: the bf16 bits of m * 2^-9 */
    __m512i b = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(120 << 7));
    b = _mm512_mask_permutexvar_epi16(b, _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), mag, sub);
    return _mm512_or_si512(b, _mm512_slli_epi16(_mm512_and_si512(x, _mm512_set1_epi16(0x80)), 8));
}

/* Scores of cnt <= 16 / HB consecutive cached rows (row t at k + t * stride bytes; bf16, or e4m3 with
 * fp8) against HB = 2 or 4 bf16 query rows (qb + h * qstride elements) of one KV head: lane (16 / HB) h + t. Each 32-dim chunk of
 * a row is loaded once for the HB queries (score16 loads it once per query); every (query, row) sum is
 * score16's, chunk by chunk into its own accumulator and reduced by the same hsum16 tree (whose result
 * for one vector does not depend on its slot), so the scores are bit-identical. D % 32 == 0. */
static inline __attribute__((always_inline)) __m512 score_heads(const uint16_t *qb, int64_t qstride, const char *k,
                                                                int64_t stride, int cnt, int64_t D, int HB, int fp8) {
    const int TB = 16 / HB;
    __m512 acc[16];
    for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 32) {
        __m512bh q[4];
        for (int h = 0; h < HB; h++) q[h] = (__m512bh)_mm512_loadu_si512(qb + h * qstride + i);
        for (int t = 0; t < cnt; t++) {
            const __m512bh kv = (__m512bh)(fp8 ? e4m3x32_bf16(k + t * stride + i)
                                               : _mm512_loadu_si512(k + t * stride + i * 2));
            for (int h = 0; h < HB; h++) acc[TB * h + t] = _mm512_dpbf16_ps(acc[TB * h + t], q[h], kv);
        }
    }
    return hsum16(acc);
}
#endif

/* acc[0 .. 16*nc) += p[t] * v_row(t)[0 .. 16*nc) over cnt rows (row t at v + t * stride bytes) */
static inline __attribute__((always_inline)) void vsum(float *acc, int nc, const float *p, const char *v,
                                                       int64_t stride, int64_t cnt, int dtype) {
    const size_t esz = dtype_size(dtype);
    __m512 a0 = _mm512_loadu_ps(acc), a1 = a0, a2 = a0, a3 = a0;
    if (nc > 1) a1 = _mm512_loadu_ps(acc + 16);
    if (nc > 2) a2 = _mm512_loadu_ps(acc + 32);
    if (nc > 3) a3 = _mm512_loadu_ps(acc + 48);
    for (int64_t t = 0; t < cnt; t++) {
        const __m512 pb = _mm512_set1_ps(p[t]);
        const char *r = v + t * stride;
        a0 = _mm512_fmadd_ps(pb, loadc16(r, dtype), a0);
        if (nc > 1) a1 = _mm512_fmadd_ps(pb, loadc16(r + 16 * esz, dtype), a1);
        if (nc > 2) a2 = _mm512_fmadd_ps(pb, loadc16(r + 32 * esz, dtype), a2);
        if (nc > 3) a3 = _mm512_fmadd_ps(pb, loadc16(r + 48 * esz, dtype), a3);
    }
    _mm512_storeu_ps(acc, a0);
    if (nc > 1) _mm512_storeu_ps(acc + 16, a1);
    if (nc > 2) _mm512_storeu_ps(acc + 32, a2);
    if (nc > 3) _mm512_storeu_ps(acc + 48, a3);
}

/* acc rows accs[i] (i < HG), dims c0 .. c0 + 16*DC: += ps[i][t] * v_row(t) over cnt rows (row t at
 * v + t * stride bytes): each V vector loaded once for HG score rows, HG*DC accumulators in
 * registers; per row and dim the same sums in the same order as vsum */
#define VSUM_ROWS(NAME, HG, DC)                                                                              \
    static inline __attribute__((always_inline)) void NAME(float *const *accs, int64_t c0,                     \
                                                           const float *const *ps, const char *v, int64_t stride, \
                                                           int64_t cnt, int dtype) {                             \
        const size_t esz = dtype_size(dtype);                                                               \
        __m512 a[HG][DC];                                                                                       \
        for (int i = 0; i < HG; i++)                                                                            \
            for (int c = 0; c < DC; c++) a[i][c] = _mm512_loadu_ps(accs[i] + c0 + 16 * c);                    \
        for (int64_t t = 0; t < cnt; t++) {                                                                     \
            __m512 x[DC];                                                                                       \
            for (int c = 0; c < DC; c++) x[c] = loadc16(v + t * stride + 16 * c * esz, dtype);                 \
            for (int i = 0; i < HG; i++) {                                                                      \
                const __m512 pb = _mm512_set1_ps(ps[i][t]);                                                     \
                for (int c = 0; c < DC; c++) a[i][c] = _mm512_fmadd_ps(pb, x[c], a[i][c]);                    \
            }                                                                                                   \
        }                                                                                                       \
        for (int i = 0; i < HG; i++)                                                                            \
            for (int c = 0; c < DC; c++) _mm512_storeu_ps(accs[i] + c0 + 16 * c, a[i][c]);                    \
    }
VSUM_ROWS(vsum_rows_4x64, 4, 4)
VSUM_ROWS(vsum_rows_2x128, 2, 8)
#elif defined(VEC8)
/* lane t of the result = sum of the 8 lanes of v[t] */
static inline __m256 hsum8x8(const __m256 *v) {
    /* hadd(a, b) per 128-bit lane: [a0+a1, a2+a3, b0+b1, b2+b3] */
    const __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);  /* [rows 0-3 low | rows 0-3 high] */
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

/* scores of cnt <= 8 consecutive cached rows (row t at k + t * stride bytes) against one float32
 * query row qf of length D, D % 8 == 0 */
static inline __m256 score8(const float *qf, const char *k, int64_t stride, int cnt, int64_t D, int dtype) {
    __m256 acc[8];
    for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
    const size_t esz = dtype_size(dtype);
    for (int64_t i = 0; i < D; i += VEC8) {
        const __m256 qv = _mm256_loadu_ps(qf + i);
        for (int t = 0; t < cnt; t++) acc[t] = _mm256_fmadd_ps(qv, loadc8(k + t * stride + i * esz, dtype), acc[t]);
    }
    return hsum8x8(acc);
}

/* acc rows accs[i] (i < HG), dims c0 .. c0 + 8*DC: += ps[i][t] * v_row(t) over cnt rows (row t at
 * v + t * stride bytes): each V vector loaded once for HG score rows; per row and dim the sums in
 * token order, whatever HG */
#define VSUM_ROWS8(NAME, HG, DC)                                                                             \
    static inline __attribute__((always_inline)) void NAME(float *const *accs, int64_t c0,                     \
                                                           const float *const *ps, const char *v, int64_t stride, \
                                                           int64_t cnt, int dtype) {                             \
        const size_t esz = dtype_size(dtype);                                                               \
        __m256 a[HG][DC];                                                                                       \
        for (int i = 0; i < HG; i++)                                                                            \
            for (int c = 0; c < DC; c++) a[i][c] = _mm256_loadu_ps(accs[i] + c0 + 8 * c);                     \
        for (int64_t t = 0; t < cnt; t++) {                                                                     \
            __m256 x[DC];                                                                                       \
            for (int c = 0; c < DC; c++) x[c] = loadc8(v + t * stride + 8 * c * esz, dtype);                   \
            for (int i = 0; i < HG; i++) {                                                                      \
                const __m256 pb = _mm256_set1_ps(ps[i][t]);                                                     \
                for (int c = 0; c < DC; c++) a[i][c] = _mm256_fmadd_ps(pb, x[c], a[i][c]);                    \
            }                                                                                                   \
        }                                                                                                       \
        for (int i = 0; i < HG; i++)                                                                            \
            for (int c = 0; c < DC; c++) _mm256_storeu_ps(accs[i] + c0 + 8 * c, a[i][c]);                     \
    }
VSUM_ROWS8(vsum8_rows_4x16, 4, 2)
VSUM_ROWS8(vsum8_rows_2x32, 2, 4)
VSUM_ROWS8(vsum8_rows_1x8, 1, 1)
VSUM_ROWS8(vsum8_rows_1x64, 1, 8)
#endif

/* The next block's rows of this item's heads (rows of `bytes`, stride apart), to be fetched while
 * the current block computes: one sequence streams from memory on one core, and the hardware
 * prefetcher alone leaves it latency-bound. The AVX-512 bodies spread the prefetches over the
 * block's work (pf_step: a few lines after each score or V-sum call); issued all at once (16 KB
 * for Qwen3-MoE's 4 KV heads of 128), they filled the core's miss buffers and stalled it (a
 * quarter of the kernel's cycles on the Zen 4 EPYC). */
typedef struct {
    const char *p;
    int64_t stride, bytes, rows, t, o;  /* rows left from row t, offset o in it */
} pf_cursor;

static inline void pf_step(pf_cursor *c, int64_t lines) {
#if defined(__GNUC__)
    for (; lines > 0 && c->t < c->rows; lines--) {
        __builtin_prefetch(c->p + c->t * c->stride + c->o, 0, 2);
        if ((c->o += 64) >= c->bytes) {
            c->o = 0;
            c->t++;
        }
    }
#else
    (void)c;
    (void)lines;
#endif
}

/* lines of the cursor's rows, and their share per call over `calls` calls */
static inline int64_t pf_share(const pf_cursor *c, int64_t calls) {
    const int64_t lines = c->rows * ((c->bytes + 63) / 64);
    return calls > 0 ? (lines + calls - 1) / calls : lines;
}

/* x[i] = exp(x[i] - m), returns the sum */
static inline float exp_sub_sum(float *x, int64_t n, float m) {
    float sum = 0.f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m);
    for (; i + VEC <= n; i += VEC) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#elif defined(VEC8)
    __m256 acc = _mm256_setzero_ps();
    const __m256 mv = _mm256_set1_ps(m);
    for (; i + VEC8 <= n; i += VEC8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = reduce8(acc);
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    return sum;
}

/* Score row sj (keys lo .. lo + n) made its softmax over its own keys [rlo, rlen), with the sink
 * *sink (NULL: none) as one more logit with no value; keys outside get weight 0. */
static inline void softmax_row(float *sj, int64_t n, int64_t lo, int64_t rlo, int64_t rlen, const float *sink) {
    float *sr = sj + (rlo - lo);
    const int64_t m_n = rlen - rlo;
    float m = -INFINITY;
    int64_t i0 = 0;
#if defined(__AVX512F__)
    if (m_n >= 16) {
        __m512 mx = _mm512_loadu_ps(sr);
        for (i0 = 16; i0 + 16 <= m_n; i0 += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + i0));
        m = _mm512_reduce_max_ps(mx);
    }
#endif
    for (int64_t i = i0; i < m_n; i++) m = sr[i] > m ? sr[i] : m;
    const float sk = sink ? *sink : -INFINITY;
    if (sk > m) m = sk;
    const float sum = (sink ? expf(sk - m) : 0.f) + exp_sub_sum(sr, m_n, m);
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < m_n; i++) sr[i] *= inv;
    for (int64_t i = 0; i < rlo - lo; i++) sj[i] = 0.f;
    for (int64_t i = rlen - lo; i < n; i++) sj[i] = 0.f;
}

/* row (n elements, float32 or bf16) -> float32 */
static inline void load_row(const void *src, int dtype, int64_t n, float *dst) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const size_t esz = dtype_size(dtype);
    for (; i + VEC <= n; i += VEC) _mm512_storeu_ps(dst + i, loadc16((const char *)src + i * esz, dtype));
#elif defined(VEC8)
    const size_t esz = dtype_size(dtype);
    for (; i + VEC8 <= n; i += VEC8) _mm256_storeu_ps(dst + i, loadc8((const char *)src + i * esz, dtype));
#endif
    for (; i < n; i++)
        dst[i] = dtype == BF16  ? bf16_to_f32(((const uint16_t *)src)[i])
                 : dtype == FP8 ? e4m3_to_f32(((const uint8_t *)src)[i])
                                : ((const float *)src)[i];
}

/* s[g] = q[g] . row for g < G (q rows of length n, float32; row float32 or bf16) */
static inline void dots(const float *q, int64_t G, const void *row, int dtype, int64_t n, float *s, float *tmp) {
#if defined(__AVX512F__)
    if (n % VEC == 0) {
        const size_t esz = dtype_size(dtype);
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
            const int64_t m = G - g0 < 4 ? G - g0 : 4;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t i = 0; i < n; i += VEC) {
                const __m512 r = loadc16((const char *)row + i * esz, dtype);
                const float *qi = q + g0 * n + i;
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qi), r, a0);
                if (m > 1) a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qi + n), r, a1);
                if (m > 2) a2 = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 2 * n), r, a2);
                if (m > 3) a3 = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 3 * n), r, a3);
            }
            s[g0] = _mm512_reduce_add_ps(a0);
            if (m > 1) s[g0 + 1] = _mm512_reduce_add_ps(a1);
            if (m > 2) s[g0 + 2] = _mm512_reduce_add_ps(a2);
            if (m > 3) s[g0 + 3] = _mm512_reduce_add_ps(a3);
        }
        return;
    }
#endif
    load_row(row, dtype, n, tmp);
    for (int64_t g = 0; g < G; g++) {
        float acc = 0.f;
        for (int64_t i = 0; i < n; i++) acc += q[g * n + i] * tmp[i];
        s[g] = acc;
    }
}

/* acc[g] += p[g * stride] * row for g < G (acc rows of length n) */
static inline void axpys(float *acc, int64_t G, const float *p, int64_t stride, const void *row, int dtype,
                         int64_t n, float *tmp) {
#if defined(__AVX512F__)
    if (n % VEC == 0) {
        const size_t esz = dtype_size(dtype);
        for (int64_t i = 0; i < n; i += VEC) {
            const __m512 r = loadc16((const char *)row + i * esz, dtype);
            for (int64_t g = 0; g < G; g++) {
                float *a = acc + g * n + i;
                _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[g * stride]), r, _mm512_loadu_ps(a)));
            }
        }
        return;
    }
#endif
    load_row(row, dtype, n, tmp);
    for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < n; i++) acc[g * n + i] += p[g * stride] * tmp[i];
}

/* one block of an item's walk over its cached rows [lo, len): the block holding rows
 * [t0, t0 + block_size) (its rows of heads h0.. start at the returned pointer), the item's rows
 * [*a, *e) in it; *pf: the next block's rows (back: the previous block's; row_bytes each), for the
 * caller to prefetch */
static inline const char *walk_block(const char *cache, const int32_t *table, int64_t t0, int64_t lo, int64_t len,
                                     int64_t block_size, int64_t sblock, int64_t sslot, int64_t shead, int64_t h0,
                                     int64_t row_bytes, size_t esz, int64_t *a, int64_t *e, pf_cursor *pf, int back) {
    *a = t0 > lo ? t0 : lo;
    *e = t0 + block_size < len ? t0 + block_size : len;
    *pf = (pf_cursor){0};
    if (back ? t0 - block_size >= lo - lo % block_size : t0 + block_size < len) {
        pf->p = cache + (table[t0 / block_size + (back ? -1 : 1)] * sblock + h0 * shead) * esz;
        pf->rows = back || len - t0 - block_size >= block_size ? block_size : len - t0 - block_size;
        pf->stride = sslot * (int64_t)esz;
        pf->bytes = row_bytes;
    }
    return cache + (table[t0 / block_size] * sblock + h0 * shead) * esz;
}

#if defined(__AVX512BF16__)
/* One query row over one KV head (MLA's latent cache, or MQA, at batch 1), bf16, H % (4 threads) == 0,
 * Dk % 32 == 0, Dv % 64 == 0: the threads split the cached rows for the scores (each row's K read by one
 * thread for all H heads; split by heads, every thread read every row twice, for scores and V), then
 * the heads for the softmax and, 4 at a time, for the weighted sums of V (split by V's dims instead,
 * each thread's half rows read 2-3x slower in the engine). Each score is score_heads' over 4 heads x
 * 4 rows, each softmax row and each (head, dim) sum over the rows in token order are the item path's:
 * the output is bit-identical to it. Returns 0, -1 without memory. */
static int one_kv_head(const uint16_t *q, uint16_t *out, const char *k, const char *v, int64_t H, int64_t Dk,
                       int64_t Dv, int64_t k_sblock, int64_t k_sslot, int64_t v_sblock, int64_t v_sslot,
                       int64_t block_size, const int32_t *table, int64_t len, int64_t window, float scale,
                       int num_threads) {
    const int64_t lo = (window > 0 && len > window) ? len - window : 0, n = len - lo;
    const int64_t b0 = lo / block_size, nb = (len + block_size - 1) / block_size - b0;
    float *s = malloc(sizeof(float) * (size_t)(H * n + H * Dv)); /* scores [H, n], then sums [H, Dv] */
    if (!s) return -1;
    float *acc = s + H * n;
    const int64_t ks = k_sslot * 2, vs = v_sslot * 2;
#pragma omp parallel num_threads(num_threads)
    {
#if defined(_OPENMP)
        const int64_t nt = omp_get_num_threads(), ti = omp_get_thread_num();
#else
        const int64_t nt = 1, ti = 0;
#endif
        /* scores of this thread's blocks, the last first (as the item path's, below), the previous
         * block prefetched while one computes */
        const int64_t bA = b0 + nb * ti / nt, bE = b0 + nb * (ti + 1) / nt;
        for (int64_t bi = bE - 1; bi >= bA; bi--) {
            const int64_t t0 = bi * block_size;
            int64_t a, e;
            pf_cursor pf;
            const char *kb = walk_block(k, table, t0, lo, len, block_size, k_sblock, k_sslot, 0, 0, Dk * 2, 2, &a, &e,
                                        &pf, 1);
            if (bi == bA) pf.rows = 0;
            const int64_t per = pf_share(&pf, (H / 4) * ((e - a + 3) / 4));
            for (int64_t ts = a; ts < e; ts += 4) {
                const int cnt = e - ts < 4 ? (int)(e - ts) : 4;
                const char *kr = kb + (ts - t0) * ks;
                for (int64_t j = 0; j < H; j += 4) {
                    const __m512 sc = cnt == 4 ? score_heads(q + j * Dk, Dk, kr, ks, 4, Dk, 4, 0)
                                               : score_heads(q + j * Dk, Dk, kr, ks, cnt, Dk, 4, 0);
                    float sv[16];
                    _mm512_storeu_ps(sv, _mm512_mul_ps(sc, _mm512_set1_ps(scale)));
                    for (int h = 0; h < 4; h++)
                        for (int t = 0; t < cnt; t++) s[(j + h) * n + (ts - lo) + t] = sv[4 * h + t];
                    pf_step(&pf, per);
                }
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t j = 0; j < H; j++) softmax_row(s + j * n, n, lo, lo, len, NULL);
        /* this thread's heads [jA, jE) (runs of 4) of the weighted sums of V */
        const int64_t jA = 4 * ((H / 4) * ti / nt), jE = 4 * ((H / 4) * (ti + 1) / nt);
        memset(acc + jA * Dv, 0, sizeof(float) * (size_t)((jE - jA) * Dv));
        for (int64_t t0 = b0 * block_size; t0 < len && jE > jA; t0 += block_size) {
            int64_t a, e;
            pf_cursor pf;
            const char *vb = walk_block(v, table, t0, lo, len, block_size, v_sblock, v_sslot, 0, 0, Dv * 2, 2,
                                        &a, &e, &pf, 0);
            const int64_t per = pf_share(&pf, (jE - jA) / 4);
            const char *vh = vb + (a - t0) * vs;
            for (int64_t j = jA; j < jE; j += 4) {
                float *accs[4];
                const float *ps[4];
                for (int i = 0; i < 4; i++) {
                    accs[i] = acc + (j + i) * Dv;
                    ps[i] = s + (j + i) * n + (a - lo);
                }
                for (int64_t c0 = 0; c0 < Dv; c0 += 64) vsum_rows_4x64(accs, c0, ps, vh + c0 * 2, vs, e - a, BF16);
                pf_step(&pf, per);
            }
        }
        for (int64_t j = jA; j < jE; j++)
            for (int64_t i = 0; i < Dv; i += VEC) store16(out + j * Dv + i, _mm512_loadu_ps(acc + j * Dv + i), BF16);
    }
    free(s);
    return 0;
}
#endif

/* x[j * n + (t - lo)] *= the scale of row t of head h0 + (j % rh) / G, for the r score rows j and
 * rows t in [lo, len) */
static void scale_rows(float *x, int64_t r, int64_t n, int64_t lo, int64_t len, int64_t rh, int64_t G, int64_t h0,
                       const float *sc, const Fp8Scales *ks, const int32_t *table, int64_t block_size) {
    for (int64_t t0 = lo - lo % block_size; t0 < len; t0 += block_size) {
        const float *sb = sc + table[t0 / block_size] * ks->sblock + h0 * ks->shead;
        const int64_t a = t0 > lo ? t0 : lo, e = t0 + block_size < len ? t0 + block_size : len;
        for (int64_t j = 0; j < r; j++) {
            const float *sh = sb + ((j % rh) / G) * ks->shead;
            float *xj = x + j * n - lo;
            for (int64_t t = a; t < e; t++) xj[t] *= sh[(t - t0) * ks->sslot];
        }
    }
}

/* Strides are in elements. k/v: [blocks, block_size, kv_heads, dim] with unit last stride (V may
 * be a strided view of K, as MLA's latent cache is). q/out: [T, H, dim] contiguous. Sequence b owns
 * query rows query_start[b] .. query_start[b+1]-1 (query_start NULL: row b alone), the newest last:
 * with Q rows and context_lens[b] = L cached tokens (its own rows' included), row i attends to the
 * first L - (Q - 1 - i) tokens (causal). Each cached row is read once for all of a sequence's query
 * rows. window > 0 keeps the last `window` keys of each row; sinks (float32 [H]) or NULL. The caches
 * hold dtype's elements, or with ks (else NULL) fp8 (kvcache/fp8.py): e4m3 rows (strides in bytes),
 * each score and each row's weight in the sum of V times that row's scale. Returns 0. */
int moe_paged_decode(const void *q, void *out, const void *k_, const void *v_, int dtype, const Fp8Scales *ks,
                     int64_t B, int64_t H, int64_t Hkv, int64_t Dk, int64_t Dv,
                     int64_t k_sblock, int64_t k_sslot, int64_t k_shead,
                     int64_t v_sblock, int64_t v_sslot, int64_t v_shead,
                     int64_t block_size, const int32_t *block_tables, int64_t max_blocks,
                     const int32_t *context_lens, const int32_t *query_start, int64_t window, const float *sinks,
                     float scale, int num_threads) {
    const char *k = k_, *v = v_;
    const int cdt = ks ? FP8 : dtype;  /* the caches' elements */
    const int64_t G = H / Hkv;
#if defined(__AVX512BF16__)
    /* (from 2 MB of K rows, more than a core's L2 holds. Below, the item path keeps each thread's rows
     * in its L2 for the V sums and was 5-10% faster on the Zen 4 EPYC; the split was 1.12x faster at
     * 2048 rows of MLA's 576 dims, 1.03-1.17x at 4096) */
    if (B == 1 && Hkv == 1 && !query_start && !sinks && num_threads > 1 && dtype == BF16 && cdt == BF16 &&
        Dk % 32 == 0 && Dv % 64 == 0 && H % (4 * num_threads) == 0 &&
        (window > 0 && context_lens[0] > window ? window : context_lens[0]) * Dk * 2 >= (2 << 20) &&
        one_kv_head(q, out, k_, v_, H, Dk, Dv, k_sblock, k_sslot, v_sblock, v_sslot, block_size, block_tables,
                    context_lens[0], window, scale, num_threads) == 0)
        return 0; /* (without memory: the item path below) */
#endif
    if (B == 1 && Hkv == 1 && !query_start && !sinks && num_threads > 1 && num_threads <= 64 && H % num_threads == 0) {
        /* one sequence, one KV head (MLA's latent cache, MQA at batch 1): its query heads as that many
         * sequences of H / num_threads heads over the same block table (row stride 0), one per thread;
         * every head's arithmetic is as before */
        int32_t lens[64];
        for (int i = 0; i < num_threads; i++) lens[i] = context_lens[0];
        return moe_paged_decode(q, out, k_, v_, dtype, ks, num_threads, H / num_threads, 1, Dk, Dv, k_sblock,
                                k_sslot, k_shead, v_sblock, v_sslot, v_shead, block_size, block_tables, 0, lens, NULL,
                                window, NULL, scale, num_threads);
    }
    const size_t qsz = dtype_size(dtype), esz = dtype_size(cdt);  /* q and out; the caches */
    int64_t max_len = 0, max_q = 1;
    for (int64_t b = 0; b < B; b++) {
        max_len = context_lens[b] > max_len ? context_lens[b] : max_len;
        if (query_start && query_start[b + 1] - query_start[b] > max_q) max_q = query_start[b + 1] - query_start[b];
    }
    /* work item = (sequence, run of KV heads): whole sequences when there are enough of them (each
     * cached row read as one contiguous run of all heads), else split heads to feed every thread */
    int64_t chunks = (4 * (int64_t)num_threads + B - 1) / (B > 0 ? B : 1);
    chunks = chunks < 1 ? 1 : (chunks > Hkv ? Hkv : chunks);
    const int64_t hpc = (Hkv + chunks - 1) / chunks;
    chunks = (Hkv + hpc - 1) / hpc;
    const int64_t R = hpc * G * max_q; /* score rows per item, at most: (query row, query head) */
    const int64_t Dmax = Dk > Dv ? Dk : Dv;

#pragma omp parallel num_threads(num_threads)
    {
        /* per-thread scratch: q (R x Dk), one K/V row, scores (R x max_len), accumulators (R x Dv), G dots */
        float *qf = malloc(sizeof(float) * (size_t)(R * Dk + Dmax + R * max_len + R * Dv + G));
        float *row = qf + R * Dk;
        float *s = row + Dmax;
        float *acc = s + R * max_len;
        float *sc = acc + R * Dv;

#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * chunks; item++) {
            const int64_t b = item / chunks, h0 = (item % chunks) * hpc;
            const int64_t h1 = h0 + hpc < Hkv ? h0 + hpc : Hkv;
            const int64_t rh = (h1 - h0) * G; /* query heads h0*G .. h1*G */
            const int64_t q0 = query_start ? query_start[b] : b;
            const int64_t nq = query_start ? query_start[b + 1] - q0 : 1;
            const int64_t r = nq * rh; /* score row j: query row j / rh, head h0*G + j % rh */
            const int64_t len = context_lens[b];
            const int64_t first = len - nq + 1; /* the first query row's context */
            const int64_t lo = (window > 0 && first > window) ? first - window : 0;
            const int64_t n = len - lo;
            const int32_t *table = block_tables + b * max_blocks;
            for (int64_t j = 0; j < r; j++)
                load_row((const char *)q + (((q0 + j / rh) * H + h0 * G + j % rh) * Dk) * qsz, dtype, Dk, qf + j * Dk);
            /* scores, block by block (no division per token), the last block first: the V sums then
             * begin with the rows read last, still in this core's L2 when V is a view of K (MLA's
             * latent cache; 2-5% faster at 130-4096 cached rows on the Zen 4 EPYC) */
            for (int64_t t0 = (len - 1) - (len - 1) % block_size; t0 >= lo - lo % block_size; t0 -= block_size) {
                int64_t a, e;
                pf_cursor pf;
                const char *kb = walk_block(k, table, t0, lo, len, block_size, k_sblock, k_sslot, k_shead, h0,
                                            ((h1 - h0 - 1) * k_shead + Dk) * (int64_t)esz, esz, &a, &e, &pf, 1);
#if defined(__AVX512BF16__)
                if (dtype == BF16 && (cdt == BF16 || cdt == FP8) && Dk % 32 == 0 && G % 2 == 0) {
                    /* query heads HB at a time (rows j .. j+HB-1 share query row and KV head), 16 / HB
                     * cached rows a pass: MLA's one latent row serves all of a thread's heads */
                    const int HB = G % 4 == 0 ? 4 : 2, TB = 16 / HB;
                    const int64_t per = pf_share(&pf, (r / HB) * ((e - a + TB - 1) / TB));
                    const int64_t kst = k_sslot * (int64_t)esz;
                    for (int64_t ts = a; ts < e; ts += TB) {
                        const int cnt = e - ts < TB ? (int)(e - ts) : TB;
                        for (int64_t j = 0; j < r; j += HB) {
                            const int64_t hk = (j % rh) / G;
                            const uint16_t *qb = (const uint16_t *)q + ((q0 + j / rh) * H + h0 * G + j % rh) * Dk;
                            const char *kr = kb + ((ts - t0) * k_sslot + hk * k_shead) * esz;
                            __m512 sc; /* (full passes with a constant row count: their sums stay in registers) */
                            if (HB == 4)
                                sc = cnt == 4 ? score_heads(qb, Dk, kr, kst, 4, Dk, 4, cdt == FP8)
                                              : score_heads(qb, Dk, kr, kst, cnt, Dk, 4, cdt == FP8);
                            else
                                sc = cnt == 8 ? score_heads(qb, Dk, kr, kst, 8, Dk, 2, cdt == FP8)
                                              : score_heads(qb, Dk, kr, kst, cnt, Dk, 2, cdt == FP8);
                            float sv[16];
                            _mm512_storeu_ps(sv, _mm512_mul_ps(sc, _mm512_set1_ps(scale)));
                            for (int h = 0; h < HB; h++)
                                for (int t = 0; t < cnt; t++) s[(j + h) * n + (ts - lo) + t] = sv[TB * h + t];
                            pf_step(&pf, per);
                        }
                    }
                    continue;
                }
#endif
#if defined(__AVX512F__)
                if (Dk % VEC == 0) {
                    const int64_t per = pf_share(&pf, r * ((e - a + 15) / 16));
                    for (int64_t ts = a; ts < e; ts += 16) {
                        const int cnt = e - ts < 16 ? (int)(e - ts) : 16;
                        for (int64_t j = 0; j < r; j++) {
                            const int64_t hk = (j % rh) / G;
                            const uint16_t *qb = (const uint16_t *)q + ((q0 + j / rh) * H + h0 * G + j % rh) * Dk;
                            const char *kr = kb + ((ts - t0) * k_sslot + hk * k_shead) * esz;
                            const __m512 sv = _mm512_mul_ps(
                                cnt == 16 ? score16(qf + j * Dk, qb, kr, k_sslot * (int64_t)esz, 16, Dk, cdt)
                                          : score16(qf + j * Dk, qb, kr, k_sslot * (int64_t)esz, cnt, Dk, cdt),
                                _mm512_set1_ps(scale));
                            _mm512_mask_storeu_ps(s + j * n + (ts - lo), (__mmask16)((1u << cnt) - 1), sv);
                            pf_step(&pf, per);
                        }
                    }
                    continue;
                }
#endif
                pf_step(&pf, pf_share(&pf, 1));  /* (the other bodies: the walk's next block at once) */
#if !defined(__AVX512F__) && defined(VEC8)
                if (Dk % VEC8 == 0) {
                    for (int64_t ts = a; ts < e; ts += 8) {
                        const int cnt = e - ts < 8 ? (int)(e - ts) : 8;
                        for (int64_t j = 0; j < r; j++) {
                            const int64_t hk = (j % rh) / G;
                            const __m256 sv = _mm256_mul_ps(score8(qf + j * Dk, kb + ((ts - t0) * k_sslot + hk * k_shead) * esz,
                                                                   k_sslot * (int64_t)esz, cnt, Dk, cdt),
                                                            _mm256_set1_ps(scale));
                            float *dst = s + j * n + (ts - lo);
                            if (cnt == 8) {
                                _mm256_storeu_ps(dst, sv);
                            } else {
                                float tmp[8];
                                _mm256_storeu_ps(tmp, sv);
                                memcpy(dst, tmp, sizeof(float) * (size_t)cnt);
                            }
                        }
                    }
                    continue;
                }
#endif
                for (int64_t t = a; t < e; t++) {
                    for (int64_t qi = 0; qi < nq; qi++) {
                        for (int64_t hk = 0; hk < h1 - h0; hk++) {
                            const int64_t j0 = qi * rh + hk * G;
                            dots(qf + j0 * Dk, G, kb + ((t - t0) * k_sslot + hk * k_shead) * esz, cdt, Dk, sc, row);
                            for (int64_t g = 0; g < G; g++) s[(j0 + g) * n + (t - lo)] = sc[g] * scale;
                        }
                    }
                }
            }
            if (cdt == FP8) scale_rows(s, r, n, lo, len, rh, G, h0, ks->k, ks, table, block_size);  /* K's scales */
            /* softmax per score row over its own keys [rlo, rlen) (the sink is one more logit with no
             * value); keys outside get weight 0 */
            for (int64_t j = 0; j < r; j++) {
                const int64_t rlen = len - (nq - 1 - j / rh);
                softmax_row(s + j * n, n, lo, (window > 0 && rlen > window) ? rlen - window : 0, rlen,
                            sinks ? sinks + h0 * G + j % rh : NULL);
            }
            if (cdt == FP8) scale_rows(s, r, n, lo, len, rh, G, h0, ks->v, ks, table, block_size);  /* V's, into p */
            memset(acc, 0, sizeof(float) * (size_t)(r * Dv));
            /* weighted sum of V */
#if defined(__AVX512F__)
            if (Dv % VEC == 0) {
                /* block by block (in memory order); per score row and 64 dims the accumulators stay in
                 * registers over the block's rows */
                for (int64_t t0 = lo - lo % block_size; t0 < len; t0 += block_size) {
                    int64_t a, e;
                    pf_cursor pf;
                    const char *vb = walk_block(v, table, t0, lo, len, block_size, v_sblock, v_sslot, v_shead, h0,
                                                ((h1 - h0 - 1) * v_shead + Dv) * (int64_t)esz, esz, &a, &e, &pf, 0);
                    const int64_t per = pf_share(&pf, h1 - h0);
                    /* the score rows of one KV head (its G query heads, for each query row) share
                     * each loaded V row: 4 rows x 64 dims or 2 rows x 128 dims of accumulators */
                    const int64_t m = nq * G;
                    const int hg = (m % 4 == 0 && Dv % 64 == 0) ? 4 : (m % 2 == 0 && Dv % 128 == 0) ? 2 : 1;
                    for (int64_t hk = 0; hk < h1 - h0; hk++) {
                        const char *vh = vb + ((a - t0) * v_sslot + hk * v_shead) * esz;
                        for (int64_t i0 = 0; i0 < m; i0 += hg) {
                            float *accs[4];
                            const float *ps[4];
                            for (int i = 0; i < hg; i++) {
                                const int64_t j = ((i0 + i) / G) * rh + hk * G + (i0 + i) % G;
                                accs[i] = acc + j * Dv;
                                ps[i] = s + j * n + (a - lo);
                            }
                            const int64_t vs = v_sslot * (int64_t)esz;
                            if (hg == 4) {
                                WITH_DTYPE(cdt, for (int64_t c0 = 0; c0 < Dv; c0 += 64)
                                                    vsum_rows_4x64(accs, c0, ps, vh + c0 * esz, vs, e - a, dt_));
                            } else if (hg == 2) {
                                WITH_DTYPE(cdt, for (int64_t c0 = 0; c0 < Dv; c0 += 128)
                                                    vsum_rows_2x128(accs, c0, ps, vh + c0 * esz, vs, e - a, dt_));
                            } else {
                                WITH_DTYPE(cdt, for (int64_t c0 = 0; c0 < Dv; c0 += 64)
                                                    vsum(accs[0] + c0, Dv - c0 >= 64 ? 4 : (int)((Dv - c0) / VEC),
                                                         ps[0], vh + c0 * esz, vs, e - a, dt_));
                            }
                        }
                        pf_step(&pf, per);
                    }
                }
                goto store;
            }
#elif defined(VEC8)
            if (Dv % VEC8 == 0) {
                /* as the AVX-512 body, on 16 registers: 4 score rows x 16 dims, 2 x 32 or 1 x 64 */
                for (int64_t t0 = lo - lo % block_size; t0 < len; t0 += block_size) {
                    int64_t a, e;
                    pf_cursor pf;
                    const char *vb = walk_block(v, table, t0, lo, len, block_size, v_sblock, v_sslot, v_shead, h0,
                                                ((h1 - h0 - 1) * v_shead + Dv) * (int64_t)esz, esz, &a, &e, &pf, 0);
                    pf_step(&pf, pf_share(&pf, 1));
                    const int64_t m = nq * G;
                    const int hg = (m % 4 == 0 && Dv % 16 == 0) ? 4 : (m % 2 == 0 && Dv % 32 == 0) ? 2 : 1;
                    for (int64_t hk = 0; hk < h1 - h0; hk++) {
                        const char *vh = vb + ((a - t0) * v_sslot + hk * v_shead) * esz;
                        const int64_t vs = v_sslot * (int64_t)esz;
                        for (int64_t i0 = 0; i0 < m; i0 += hg) {
                            float *accs[4];
                            const float *ps[4];
                            for (int i = 0; i < hg; i++) {
                                const int64_t j = ((i0 + i) / G) * rh + hk * G + (i0 + i) % G;
                                accs[i] = acc + j * Dv;
                                ps[i] = s + j * n + (a - lo);
                            }
                            if (hg == 4) {
                                WITH_DTYPE(cdt, for (int64_t c0 = 0; c0 < Dv; c0 += 16)
                                                    vsum8_rows_4x16(accs, c0, ps, vh + c0 * esz, vs, e - a, dt_));
                            } else if (hg == 2) {
                                WITH_DTYPE(cdt, for (int64_t c0 = 0; c0 < Dv; c0 += 32)
                                                    vsum8_rows_2x32(accs, c0, ps, vh + c0 * esz, vs, e - a, dt_));
                            } else {
                                int64_t c0 = 0;
                                WITH_DTYPE(cdt, for (; c0 + 64 <= Dv; c0 += 64)
                                                    vsum8_rows_1x64(accs, c0, ps, vh + c0 * esz, vs, e - a, dt_));
                                for (; c0 < Dv; c0 += 8) vsum8_rows_1x8(accs, c0, ps, vh + c0 * esz, vs, e - a, cdt);
                            }
                        }
                    }
                }
                goto store;
            }
#endif
            for (int64_t t0 = lo - lo % block_size; t0 < len; t0 += block_size) {
                int64_t a, e;
                pf_cursor pf;
                const char *vb = walk_block(v, table, t0, lo, len, block_size, v_sblock, v_sslot, v_shead, h0,
                                            ((h1 - h0 - 1) * v_shead + Dv) * (int64_t)esz, esz, &a, &e, &pf, 0);
                pf_step(&pf, pf_share(&pf, 1));
                for (int64_t t = a; t < e; t++)
                    for (int64_t qi = 0; qi < nq; qi++)
                        for (int64_t hk = 0; hk < h1 - h0; hk++) {
                            const int64_t j0 = qi * rh + hk * G;
                            axpys(acc + j0 * Dv, G, s + j0 * n + (t - lo), n,
                                  vb + ((t - t0) * v_sslot + hk * v_shead) * esz, cdt, Dv, row);
                        }
            }
#if defined(__AVX512F__) || defined(VEC8)
        store:;
#endif
            for (int64_t qi = 0; qi < nq; qi++) {
                char *o = (char *)out + (((q0 + qi) * H + h0 * G) * Dv) * qsz;
                const float *src = acc + qi * rh * Dv;
                if (dtype == BF16) {
                    int64_t i = 0;
#if defined(VEC8)
                    for (; i + VEC8 <= rh * Dv; i += VEC8) store8(o + i * 2, _mm256_loadu_ps(src + i), BF16);
#endif
                    for (; i < rh * Dv; i++) ((uint16_t *)o)[i] = f32_to_bf16(src[i]);
                } else {
                    memcpy(o, src, sizeof(float) * (size_t)(rh * Dv));
                }
            }
        }
        free(qf);
    }
    return 0;
}

/* The fp8 cache's rows of R bf16 rows x [R, D] (kvcache/fp8.py's quantize_fp8, bit for bit): row r's
 * scale = max(amax |x_r|, FLT_MIN) / 448 into scale[r * lds], its values x / scale (each a float32
 * division, clamped to +-448) rounded to e4m3 into q + r * ldq. Returns 0. */
int moe_quantize_e4m3(const uint16_t *x, int64_t R, int64_t D, uint8_t *q, int64_t ldq, float *scale, int64_t lds) {
    for (int64_t r = 0; r < R; r++) {
        const uint16_t *xr = x + r * D;
        float amax = 0.f;
        for (int64_t i = 0; i < D; i++) {
            const float a = fabsf(bf16_to_f32(xr[i]));
            amax = a > amax || a != a ? a : amax;  /* (NaN propagates, as torch's amax) */
        }
        const float s = (amax < 0x1p-126f ? 0x1p-126f : amax) / 448.f;
        for (int64_t i = 0; i < D; i++) {
            float v = bf16_to_f32(xr[i]) / s;
            v = v < -448.f ? -448.f : v > 448.f ? 448.f : v;
            q[r * ldq + i] = f32_to_e4m3(v);
        }
        scale[r * lds] = s;
    }
    return 0;
}
