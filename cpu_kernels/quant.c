/* Packed 8-bit expert weights on the CPU: int8 with a scale (and optional offset) per group of K,
 * and fp8 e4m3 with a scale per (row block, K block), as experts.quant_grouped lays them out.
 *
 * Decode reads every weight once, so the bytes it saves are the time it saves, but only if the
 * codes become floats in registers as they stream: moe_q8_gemm multiplies a few rows of x
 * (decode, verify rows) with the codes converted 16 at a time (int8: sign-extend and convert;
 * e4m3: its bits moved into fp16 bits, exact, = value * 2^-8, the 2^8 folded into the scales)
 * and summed in float32 per group, each group's sum scaled once. Longer inputs are
 * compute-bound: moe_q8_dequant writes the bf16/float32 weight once for a GEMM.
 *
 * Vector bodies: AVX-512 (16 lanes) and AVX2 + FMA + F16C (8 lanes, the same weights in float32,
 * sums in another order); plain C elsewhere.
 *
 * Weight: codes q [N, K] (row stride ldq bytes), w[n, k] = s[n / bn, g] * q[n, k] + b[n / bn, g]
 * with g = k / gs (G = ceil(K / gs) groups, scale rows of stride G); b (offsets: asymmetric int8)
 * may be NULL. fp8: bn = row block, gs = K block, b NULL. */
#include "kernels.h"

enum { Q_INT8 = 0, Q_FP8 = 1, Q_INT4_X8 = 2 /* 4-bit int codes, x rounded to 8 bits (moe_q4x8_gemm) */ };

/* up to 8 rows of x (mb of them) at a time through a row function specialized for that count:
 * CALL(rows, unroll), unroll u1 .. u4 for one to four rows and 1 for more (more rows give the FMA
 * units enough independent sums at unroll 1) */
#define ROW_BLOCK(mb, CALL, u1, u2, u3, u4)                                                                        \
    switch ((mb) < 8 ? (mb) : 8) {                                                                                 \
    case 1: CALL(1, u1); break;                                                                                    \
    case 2: CALL(2, u2); break;                                                                                    \
    case 3: CALL(3, u3); break;                                                                                    \
    case 4: CALL(4, u4); break;                                                                                    \
    case 5: CALL(5, 1); break;                                                                                     \
    case 6: CALL(6, 1); break;                                                                                     \
    case 7: CALL(7, 1); break;                                                                                     \
    default: CALL(8, 1); break;                                                                                    \
    }

#if defined(__AVX512F__)
/* 16 codes -> 16 floats (the fp8 value times 2^-8): e4m3 sign-extended to 16 bits and shifted
 * left by 7 has its sign, exponent and mantissa where fp16 keeps them, once bit 14 is cleared */
static inline __m512 codes16(const int8_t *q, int fmt) {
    const __m128i b = _mm_loadu_si128((const __m128i *)q);
    if (fmt == Q_INT8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16((short)0xbfff));
    return _mm512_cvtph_ps(h);
}

/* one row of W against M rows of x: each code times its group's scale, then U chains of fused
 * multiply-adds per x row (enough independent sums to keep the FMA units busy at one or two rows);
 * no per-group reduction, so small groups cost no more than large ones */
static inline __attribute__((always_inline)) void q8_row(const float *x, int64_t K, const int8_t *qn, int fmt,
                                                         const float *sn, int64_t G, int64_t gs, const int M,
                                                         const int U, int64_t ldq, float *out) {
    __m512 acc[4][8];
    for (int u = 0; u < U; u++)
        for (int m = 0; m < M; m++) acc[u][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const __m512 sg = _mm512_set1_ps(sn[g]);
        const int64_t k1 = (g + 1) * gs < K ? (g + 1) * gs : K;
        int64_t k = g * gs;
        for (; k + 16 * U <= k1; k += 16 * U) {
            _mm_prefetch((const char *)(qn + k + 4 * ldq), _MM_HINT_T0);
            for (int u = 0; u < U; u++) {
                const __m512 w = _mm512_mul_ps(codes16(qn + k + 16 * u, fmt), sg);
                for (int m = 0; m < M; m++)
                    acc[u][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k + 16 * u), acc[u][m]);
            }
        }
        for (; k < k1; k += 16) {
            const __m512 w = _mm512_mul_ps(codes16(qn + k, fmt), sg);
            for (int m = 0; m < M; m++) acc[0][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), acc[0][m]);
        }
    }
    for (int m = 0; m < M; m++) {
        __m512 a = acc[0][m];
        for (int u = 1; u < U; u++) a = _mm512_add_ps(a, acc[u][m]);
        out[m] = _mm512_reduce_add_ps(a);
    }
}

/* sum_g b[g] * xs[g] (a row's offsets against one x row's group sums) */
static inline float dot_groups(const float *b, const float *xs, int64_t G) {
    __m512 a = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(b + g), _mm512_loadu_ps(xs + g), a);
    if (g < G) {
        const __mmask16 m = (__mmask16)((1u << (G - g)) - 1);
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, b + g), _mm512_maskz_loadu_ps(m, xs + g), a);
    }
    return _mm512_reduce_add_ps(a);
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define Q_AVX2 1
/* AVX2 + FMA (no AVX-512): what the AVX-512 bodies compute, on 8 lanes. Each weight is the same
 * float32 (code times scale, one rounding); only the order of the float32 sums differs. */

/* 8 codes -> 8 floats, as codes16 */
static inline __m256 codes8(const int8_t *q, int fmt) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)q);
    if (fmt == Q_INT8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    return _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16((short)0xbfff)));
}

/* q8_row on 8 lanes: U chains of fused multiply-adds per x row, 8 codes a step */
static inline __attribute__((always_inline)) void q8_row(const float *x, int64_t K, const int8_t *qn, int fmt,
                                                         const float *sn, int64_t G, int64_t gs, const int M,
                                                         const int U, int64_t ldq, float *out) {
    __m256 acc[4][8];
    for (int u = 0; u < U; u++)
        for (int m = 0; m < M; m++) acc[u][m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const __m256 sg = _mm256_set1_ps(sn[g]);
        const int64_t k1 = (g + 1) * gs < K ? (g + 1) * gs : K;
        int64_t k = g * gs;
        for (; k + 8 * U <= k1; k += 8 * U) {
            _mm_prefetch((const char *)(qn + k + 4 * ldq), _MM_HINT_T0);
            for (int u = 0; u < U; u++) {
                const __m256 w = _mm256_mul_ps(codes8(qn + k + 8 * u, fmt), sg);
                for (int m = 0; m < M; m++)
                    acc[u][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[u][m]);
            }
        }
        for (; k < k1; k += 8) {
            const __m256 w = _mm256_mul_ps(codes8(qn + k, fmt), sg);
            for (int m = 0; m < M; m++) acc[0][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k), acc[0][m]);
        }
    }
    for (int m = 0; m < M; m++) {
        __m256 a = acc[0][m];
        for (int u = 1; u < U; u++) a = _mm256_add_ps(a, acc[u][m]);
        out[m] = reduce8(a);
    }
}
#endif

static inline float offsets(const float *b, const float *xs, int64_t G) {
#if defined(__AVX512F__)
    return dot_groups(b, xs, G);
#else
    float v = 0.f;
    for (int64_t g = 0; g < G; g++) v += b[g] * xs[g];
    return v;
#endif
}

/* column n of y (M rows, row stride N, ydtype) from the sums out[m], plus the offsets bn (G of them;
 * NULL: none) times x's group sums xs (rows of G), rounded once */
static inline void put_column(void *y, int ydtype, int64_t N, int64_t n, int64_t M, const float *out,
                              const float *bn, const float *xs, int64_t G) {
    for (int64_t m = 0; m < M; m++) {
        float v = out[m];
        if (bn) v += offsets(bn, xs + m * G, G);
        if (ydtype == BF16) ((uint16_t *)y)[m * N + n] = f32_to_bf16(v);
        else ((float *)y)[m * N + n] = v;
    }
}

static inline float code1(int8_t c, int fmt) {
    if (fmt == Q_INT8) return (float)c;
    const uint8_t u = (uint8_t)c;
    const uint32_t e = (u >> 3) & 0xf, m = u & 7;
    const float mag = e ? ldexpf(1.f + m / 8.f, (int)e - 7) : ldexpf(m / 8.f, -6);
    return ((u & 0x80) ? -mag : mag) / 256.f;
}

/* y[m, n] = sum_k x[m, k] w[n, k] for M <= 64 rows of float32 x (row stride K), eight at a time
 * against each weight row (its codes read once from memory, converted once per eight rows); y in
 * ydtype (row stride N), float32 sums rounded once. K % 16 == 0 and gs % 16 == 0 for the vector
 * path. Rows of W are split over the threads in contiguous ranges. Returns 0, -1 for M > 64 (or
 * no memory). */
int moe_q8_gemm(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t ldq, int fmt, const float *s,
                const float *b, int64_t G, int64_t gs, int64_t bn, int64_t N, void *y, int ydtype, int num_threads) {
    if (M < 1 || M > 64) return -1;
    float *xs = NULL; /* per row and group: sum of x over the group (offsets) */
    if (b) {
        xs = malloc(sizeof(float) * (size_t)(M * G));
        if (!xs) return -1;
        for (int64_t m = 0; m < M; m++)
            for (int64_t g = 0; g < G; g++) {
                float t = 0.f;
                for (int64_t k = g * gs; k < K && k < (g + 1) * gs; k++) t += x[m * K + k];
                xs[m * G + g] = t;
            }
    }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (N * K >= 65536)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qn = q + n * ldq;
        const float *sn = s + (n / bn) * G;
        float out[64];
#if defined(__AVX512F__) || defined(Q_AVX2)
        if (K % 16 == 0 && gs % 16 == 0) {
#define Q8_ROWS(MM, UU) q8_row(x + m0 * K, K, qn, fmt, sn, G, gs, MM, UU, ldq, out + m0)
#if defined(__AVX512F__)
            for (int64_t m0 = 0; m0 < M; m0 += 8) ROW_BLOCK(M - m0, Q8_ROWS, 4, 2, 2, 1);
#else
            for (int64_t m0 = 0; m0 < M; m0 += 8) ROW_BLOCK(M - m0, Q8_ROWS, 4, 4, 2, 2);
#endif
#undef Q8_ROWS
        } else
#endif
        {
            for (int64_t m = 0; m < M; m++) out[m] = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const int64_t k1 = (g + 1) * gs < K ? (g + 1) * gs : K;
                for (int64_t m = 0; m < M; m++) {
                    float acc = 0.f;
                    for (int64_t k = g * gs; k < k1; k++) acc += code1(qn[k], fmt) * x[m * K + k];
                    out[m] += acc * sn[g];
                }
            }
        }
        put_column(y, ydtype, N, n, M, out, b ? b + (n / bn) * G : NULL, xs, G);
    }
    free(xs);
    return 0;
}

/* The weight itself: out[n, k] = w[n, k] in odtype (row stride K), rounded once (to bf16 with
 * AVX512-BF16's conversion: nearest even, denormals flushed to zero). Returns 0. */
static inline void q8_dequant_row(const int8_t *q, int64_t ldq, int fmt, const float *s, const float *b, int64_t G,
                                  int64_t gs, int64_t bn, int64_t n, int64_t K, void *out, int odtype) {
        const int8_t *qn = q + n * ldq;
        const float *sn = s + (n / bn) * G, *bnr = b ? b + (n / bn) * G : NULL;
        char *o = (char *)out + (size_t)(n * K) * (odtype == BF16 ? 2 : 4);
        int64_t k = 0;
#if defined(__AVX512BF16__)
        if (odtype == BF16 && gs % 32 == 0) /* 32 at a time, one rounding instruction for both halves */
            for (; k + 32 <= K; k += 32) {
                const int64_t g = k / gs;
                __m512 w0 = _mm512_mul_ps(codes16(qn + k, fmt), _mm512_set1_ps(sn[g]));
                __m512 w1 = _mm512_mul_ps(codes16(qn + k + 16, fmt), _mm512_set1_ps(sn[g]));
                if (bnr) {
                    w0 = _mm512_add_ps(w0, _mm512_set1_ps(bnr[g]));
                    w1 = _mm512_add_ps(w1, _mm512_set1_ps(bnr[g]));
                }
                _mm512_storeu_si512(o + k * 2, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
            }
#endif
#if defined(__AVX512F__)
        if (gs % 16 == 0)
            for (; k + 16 <= K; k += 16) {
                const int64_t g = k / gs;
                __m512 w = _mm512_mul_ps(codes16(qn + k, fmt), _mm512_set1_ps(sn[g]));
                if (bnr) w = _mm512_add_ps(w, _mm512_set1_ps(bnr[g]));
                store16(o + k * (odtype == BF16 ? 2 : 4), w, odtype);
            }
#elif defined(Q_AVX2)
        if (gs % 8 == 0)
            for (; k + 8 <= K; k += 8) {
                const int64_t g = k / gs;
                __m256 w = _mm256_mul_ps(codes8(qn + k, fmt), _mm256_set1_ps(sn[g]));
                if (bnr) w = _mm256_add_ps(w, _mm256_set1_ps(bnr[g]));
                store8(o + k * (odtype == BF16 ? 2 : 4), w, odtype);
            }
#endif
        for (; k < K; k++) {
            const int64_t g = k / gs;
            float w = code1(qn[k], fmt) * sn[g];
            if (bnr) w += bnr[g];
            if (odtype == BF16) ((uint16_t *)o)[k] = f32_to_bf16(w);
            else ((float *)o)[k] = w;
        }
}

int moe_q8_dequant(const int8_t *q, int64_t ldq, int fmt, const float *s, const float *b, int64_t G, int64_t gs,
                   int64_t bn, int64_t N, int64_t K, void *out, int odtype, int num_threads) {
    if (num_threads <= 1 || N * K < 65536) { /* no parallel region (called per tile block by amx.c) */
        for (int64_t n = 0; n < N; n++) q8_dequant_row(q, ldq, fmt, s, b, G, gs, bn, n, K, out, odtype);
        return 0;
    }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) q8_dequant_row(q, ldq, fmt, s, b, G, gs, bn, n, K, out, odtype);
    return 0;
}

/* 4-bit codes, two per byte (the low nibble the even column), their values from a 16-entry table:
 * int4 (value = code, offsets b = -zero * scale) and MXFP4 (value = FP4 e2m1, scale 2^e per 32).
 * q [N, K/2] bytes (row stride ldq), w[n, k] = s[n, g] * lut[code] (+ b[n, g]), g = k / gs. */
#if defined(__AVX512F__)
/* U steps of 32 weights in flight per x row; the even and odd columns of x (xe, xo: K/2 each per
 * row) meet the low and high nibbles, so no shuffle of the codes is needed */
static inline __attribute__((always_inline)) void q4_row(const float *xe, const float *xo, int64_t K2,
                                                         const uint8_t *qn, __m512 lut, const float *sn, int64_t G,
                                                         int64_t gs2, const int M, const int U, int64_t ldq,
                                                         float *out) {
    const __m128i low = _mm_set1_epi8(0x0f);
    __m512 acc[4][8];
    for (int u = 0; u < 2 * U; u++)
        for (int m = 0; m < M; m++) acc[u][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const __m512 sg = _mm512_set1_ps(sn[g]);
        const int64_t k1 = (g + 1) * gs2 < K2 ? (g + 1) * gs2 : K2;
        for (int64_t k = g * gs2; k < k1; k += 16 * U) {
            _mm_prefetch((const char *)(qn + k + 4 * ldq), _MM_HINT_T0);
            for (int u = 0; u < U && k + 16 * u < k1; u++) {
                const __m128i b = _mm_loadu_si128((const __m128i *)(qn + k + 16 * u));
                const __m512 wl = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low)), lut), sg);
                const __m512 wh = _mm512_mul_ps(
                    _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low)), lut), sg);
                for (int m = 0; m < M; m++) {
                    acc[2 * u][m] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xe + m * K2 + k + 16 * u), acc[2 * u][m]);
                    acc[2 * u + 1][m] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xo + m * K2 + k + 16 * u), acc[2 * u + 1][m]);
                }
            }
        }
    }
    for (int m = 0; m < M; m++) {
        __m512 a = acc[0][m];
        for (int u = 1; u < 2 * U; u++) a = _mm512_add_ps(a, acc[u][m]);
        out[m] = _mm512_reduce_add_ps(a);
    }
}
#elif defined(Q_AVX2)
/* AVX2 has no 16-entry float table in a register; a byte shuffle is one: the code values times a
 * power of two c as int8 (int4: the codes themselves, c = 1; MXFP4: 2 x e2m1, c = 2), the 1/c
 * folded into the group's scale (exact: a power of two, unless that product is subnormal). */
typedef struct { __m128i tab; float inv_c; } Q4Table;

/* The table of lut, or 0 when its values have no such form (the scalar path then runs). */
static int q4_byte_table(const float *lut, Q4Table *t) {
    int8_t b[16];
    for (int e = 0; e <= 6; e++) {
        const float c = ldexpf(1.f, e);
        int i = 0;
        for (; i < 16; i++) {
            const float v = lut[i] * c;
            if (v != rintf(v) || v < -128.f || v > 127.f) break;
            b[i] = (int8_t)v;
        }
        if (i == 16) {
            t->tab = _mm_loadu_si128((const __m128i *)b);
            t->inv_c = 1.f / c;
            return 1;
        }
    }
    return 0;
}

/* 8 int8 code values (the low 8 bytes of v) -> 8 floats times the scale */
static inline __m256 values8(__m128i v, __m256 sg) { return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), sg); }

/* q4_row on 8 lanes: 32 weights a step (16 bytes: even columns k..k+15 from the low nibbles, odd
 * ones from the high), A chains of fused multiply-adds per x row */
static inline __attribute__((always_inline)) void q4_row(const float *xe, const float *xo, int64_t K2,
                                                         const uint8_t *qn, __m128i tab, float inv_c, const float *sn,
                                                         int64_t G, int64_t gs2, const int M, const int A, int64_t ldq,
                                                         float *out) {
    const __m128i low = _mm_set1_epi8(0x0f);
    __m256 acc[4][8];
    for (int a = 0; a < A; a++)
        for (int m = 0; m < M; m++) acc[a][m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const __m256 sg = _mm256_set1_ps(sn[g] * inv_c);
        const int64_t k1 = (g + 1) * gs2 < K2 ? (g + 1) * gs2 : K2;
        for (int64_t k = g * gs2; k < k1; k += 16) {
            if ((k & 63) == 0) _mm_prefetch((const char *)(qn + k + 4 * ldq), _MM_HINT_T0);
            const __m128i b = _mm_loadu_si128((const __m128i *)(qn + k));
            const __m128i vl = _mm_shuffle_epi8(tab, _mm_and_si128(b, low));
            const __m128i vh = _mm_shuffle_epi8(tab, _mm_and_si128(_mm_srli_epi16(b, 4), low));
            const __m256 w0 = values8(vl, sg), w1 = values8(_mm_srli_si128(vl, 8), sg);
            const __m256 w2 = values8(vh, sg), w3 = values8(_mm_srli_si128(vh, 8), sg);
            for (int m = 0; m < M; m++) {
                const float *e = xe + m * K2 + k, *o = xo + m * K2 + k;
                acc[0][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(e), acc[0][m]);
                acc[1 % A][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(e + 8), acc[1 % A][m]);
                acc[2 % A][m] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(o), acc[2 % A][m]);
                acc[3 % A][m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(o + 8), acc[3 % A][m]);
            }
        }
    }
    for (int m = 0; m < M; m++) {
        __m256 a = acc[0][m];
        for (int u = 1; u < A; u++) a = _mm256_add_ps(a, acc[u][m]);
        out[m] = reduce8(a);
    }
}
#endif

/* y[m, n] = sum_k x[m, k] w[n, k] for M <= 64 float32 rows of x (row stride K), 4-bit w, eight rows
 * at a time as moe_q8_gemm; y in ydtype (row stride N), float32 sums rounded once. Vector path:
 * K % 32 == 0 and gs % 32 == 0. Returns 0, -1 for M > 64 (or no memory). */
int moe_q4_gemm(const float *x, int64_t M, int64_t K, const uint8_t *q, int64_t ldq, const float *lut,
                const float *s, const float *b, int64_t G, int64_t gs, int64_t N, void *y, int ydtype,
                int num_threads) {
    if (M < 1 || M > 64) return -1;
    const int64_t K2 = K / 2;
    float *xeo = malloc(sizeof(float) * (size_t)(M * (K + G))); /* even columns, odd columns, group sums */
    if (!xeo) return -1;
    float *xe = xeo, *xo = xeo + M * K2, *xs = xeo + M * K;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t i = 0; i < K2; i++) {
            xe[m * K2 + i] = x[m * K + 2 * i];
            xo[m * K2 + i] = x[m * K + 2 * i + 1];
        }
        for (int64_t g = 0; b && g < G; g++) {
            float t = 0.f;
            for (int64_t k = g * gs; k < K && k < (g + 1) * gs; k++) t += x[m * K + k];
            xs[m * G + g] = t;
        }
    }
#if defined(Q_AVX2)
    Q4Table t;
    const int vec = K % 32 == 0 && gs % 32 == 0 && q4_byte_table(lut, &t);
#endif
#pragma omp parallel for num_threads(num_threads) schedule(static) if (N * K >= 131072)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qn = q + n * ldq;
        const float *sn = s + n * G;
        float out[64];
#if defined(__AVX512F__)
        if (K % 32 == 0 && gs % 32 == 0) {
            const __m512 lv = _mm512_loadu_ps(lut);
#define Q4_ROWS(MM, UU) q4_row(xe + m0 * K2, xo + m0 * K2, K2, qn, lv, sn, G, gs / 2, MM, UU, ldq, out + m0)
            for (int64_t m0 = 0; m0 < M; m0 += 8) ROW_BLOCK(M - m0, Q4_ROWS, 2, 1, 1, 1);
#undef Q4_ROWS
        } else
#elif defined(Q_AVX2)
        if (vec) {
#define Q4_ROWS(MM, AA) q4_row(xe + m0 * K2, xo + m0 * K2, K2, qn, t.tab, t.inv_c, sn, G, gs / 2, MM, AA, ldq, out + m0)
            for (int64_t m0 = 0; m0 < M; m0 += 8) ROW_BLOCK(M - m0, Q4_ROWS, 4, 4, 2, 2);
#undef Q4_ROWS
        } else
#endif
        {
            for (int64_t m = 0; m < M; m++) out[m] = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const int64_t k1 = (g + 1) * gs < K ? (g + 1) * gs : K;
                for (int64_t m = 0; m < M; m++) {
                    float acc = 0.f;
                    for (int64_t k = g * gs; k < k1; k++)
                        acc += lut[(qn[k / 2] >> (4 * (k & 1))) & 15] * x[m * K + k];
                    out[m] += acc * sn[g];
                }
            }
        }
        put_column(y, ydtype, N, n, M, out, b ? b + n * G : NULL, xs, G);
    }
    free(xeo);
    return 0;
}

/* int4 codes times activations rounded to 8 bits (a "W4A8" product, as llama.cpp's 4-bit x 8-bit
 * dot products): each row of x, in blocks of 32 columns, becomes xq = round(x / d) in [-127, 127]
 * with d = max|x| / 127 over the block, and y[m, n] = sum_k w[n, k] d xq[m, k] -- the weight times
 * the rounded x. The codes (0..15, lut = the codes) meet xq in integer products (AVX512-VNNI
 * vpdpbusd; AVX2 vpmaddubsw), summed per block and scaled once per block (s d); the offsets b meet
 * the rounded x's group sums. A 4-bit weight then costs a few integer instructions per 64 columns
 * instead of a conversion, a table lookup and a multiply per 16: batch-1 decode is compute-bound
 * on float codes (5-6 GB/s of int4 weights on 2 cores against a 13-16 GB/s probe). */
enum { XB = 32 }; /* columns per activation block */

/* One row of x (K floats, K % 32 == 0) -> its even and odd columns as int8 (xe, xo: K/2 each), the
 * block scales d (K/32) and the rounded row's group sums xs (G, groups of gs columns) */
static void quant_x8(const float *x, int64_t K, int64_t gs, int8_t *xe, int8_t *xo, float *d, float *xs) {
    for (int64_t g = 0; g < (K + gs - 1) / gs; g++) xs[g] = 0.f;
    for (int64_t j = 0; j < K / XB; j++) {
        const float *xb = x + j * XB;
        float a = 0.f;
        for (int i = 0; i < XB; i++) a = fabsf(xb[i]) > a ? fabsf(xb[i]) : a; /* (fmaxf: a libm call) */
        const float id = a > 0.f ? 127.f / a : 0.f;
        int sum = 0;
        for (int i = 0; i < XB; i += 2) {
            const int ve = (int)nearbyintf(xb[i] * id), vo = (int)nearbyintf(xb[i + 1] * id);
            xe[j * XB / 2 + i / 2] = (int8_t)ve;
            xo[j * XB / 2 + i / 2] = (int8_t)vo;
            sum += ve + vo;
        }
        d[j] = a / 127.f;
        xs[j * XB / gs] += d[j] * (float)sum;
    }
}

/* the scale of each of the nb <= 4 blocks of 32 columns from block j0 on: s of its group (gs 32, 64
 * or 128 columns) times the row's d */
static inline void block_scales(const float *sn, const float *d, int64_t j0, int nb, int64_t gs, float *sd) {
    for (int j = 0; j < 4; j++) sd[j] = j < nb ? sn[(j0 + j) * XB / gs] * d[j0 + j] : 0.f;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* 64 bytes of one weight row (128 columns, 4 blocks of x) against M rows of x, into acc[m]; mk: the
 * bytes present (a row's last step may be short: its missing blocks get scale 0). A step's 32-bit
 * lanes 4j..4j+3 hold block j's sums (lane i: bytes 4i..4i+3, columns 2k + 8i .. 2k + 8i + 7). */
static inline __attribute__((always_inline)) void q4x8_step(const int8_t *xe, const int8_t *xo, const float *d,
                                                            int64_t K2, int64_t KB, const uint8_t *qn,
                                                            const float *sn, int64_t gs, int64_t k, __mmask64 mk,
                                                            const int M, __m512 *acc) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i four = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const int64_t j0 = k / 16;
    const int full = mk == ~(__mmask64)0;
    const __m512i b = full ? _mm512_loadu_si512(qn + k) : _mm512_maskz_loadu_epi8(mk, qn + k);
    const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
    __m128 s4 = _mm_setzero_ps(); /* the 4 blocks' weight scales (a short step: block_scales per row) */
    if (full) {
        if (gs == 32) s4 = _mm_loadu_ps(sn + j0);
        else if (gs == 64) {
            const __m128 s2 = _mm_castpd_ps(_mm_load_sd((const double *)(sn + j0 / 2)));
            s4 = _mm_unpacklo_ps(s2, s2);
        } else s4 = _mm_set1_ps(sn[j0 / 4]);
    }
    for (int m = 0; m < M; m++) {
        __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_maskz_loadu_epi8(mk, xe + m * K2 + k));
        p = _mm512_dpbusd_epi32(p, hi, _mm512_maskz_loadu_epi8(mk, xo + m * K2 + k));
        __m128 sd;
        if (full) sd = _mm_mul_ps(s4, _mm_loadu_ps(d + m * KB + j0));
        else {
            float t[4];
            block_scales(sn, d + m * KB, j0, (int)(_mm_popcnt_u64(mk) / 16), gs, t);
            sd = _mm_loadu_ps(t);
        }
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(four, _mm512_castps128_ps512(sd)),
                                 acc[m]);
    }
}

/* M rows of x against one weight row: steps of 64 bytes in pairs (two sums per row), a short last */
static inline __attribute__((always_inline)) void q4x8_row(const int8_t *xe, const int8_t *xo, const float *d,
                                                           int64_t K2, int64_t KB, const uint8_t *qn, const float *sn,
                                                           int64_t gs, const int M, float *out) {
    const __mmask64 all = ~(__mmask64)0;
    __m512 a0[4], a1[4];
    for (int m = 0; m < M; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 128 <= K2; k += 128) {
        q4x8_step(xe, xo, d, K2, KB, qn, sn, gs, k, all, M, a0);
        q4x8_step(xe, xo, d, K2, KB, qn, sn, gs, k + 64, all, M, a1);
    }
    if (k + 64 <= K2) {
        q4x8_step(xe, xo, d, K2, KB, qn, sn, gs, k, all, M, a0);
        k += 64;
    }
    if (k < K2) q4x8_step(xe, xo, d, K2, KB, qn, sn, gs, k, ((__mmask64)1 << (K2 - k)) - 1, M, a1);
    for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
}

/* One x row against one weight row as q4x8_row, its sum left in 16 lanes with the offsets (bn: the
 * row's G of them, or NULL) times the rounded x's group sums xs folded in */
static inline __attribute__((always_inline)) __m512 q4x8_sum1(const int8_t *xe, const int8_t *xo, const float *d,
                                                              int64_t K2, int64_t KB, const uint8_t *qn,
                                                              const float *sn, int64_t gs, const float *bn,
                                                              const float *xs, int64_t G) {
    const __mmask64 all = ~(__mmask64)0;
    __m512 a0[1] = {_mm512_setzero_ps()}, a1[1] = {_mm512_setzero_ps()};
    int64_t k = 0;
    for (; k + 128 <= K2; k += 128) {
        _mm_prefetch((const char *)(qn + k) + PF_AHEAD, _MM_HINT_T1);
        _mm_prefetch((const char *)(qn + k) + PF_AHEAD + 64, _MM_HINT_T1);
        q4x8_step(xe, xo, d, K2, KB, qn, sn, gs, k, all, 1, a0);
        q4x8_step(xe, xo, d, K2, KB, qn, sn, gs, k + 64, all, 1, a1);
    }
    if (k + 64 <= K2) {
        q4x8_step(xe, xo, d, K2, KB, qn, sn, gs, k, all, 1, a0);
        k += 64;
    }
    if (k < K2) q4x8_step(xe, xo, d, K2, KB, qn, sn, gs, k, ((__mmask64)1 << (K2 - k)) - 1, 1, a1);
    __m512 a = _mm512_add_ps(a0[0], a1[0]);
    for (int64_t g = 0; bn && g < G; g += 16) {
        const __mmask16 mg = G - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g)) - 1);
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mg, bn + g), _mm512_maskz_loadu_ps(mg, xs + g), a);
    }
    return a;
}

/* One x row against four weight rows (stride ldq; scales s and offsets b: rows of G), one row after
 * the other (rows read side by side stream slowly, as in gemv.c), and one reduction for the four
 * sums: a 512-byte row (K = 1024) alone spends about as long in its reduction, offsets and store as
 * in its products. out: the four results. */
static inline void q4x8_rows4(const int8_t *xe, const int8_t *xo, const float *d, int64_t K2, int64_t KB,
                              const uint8_t *q, int64_t ldq, const float *s, const float *b, const float *xs,
                              int64_t G, int64_t gs, float *out) {
    __m512 a[4];
    for (int r = 0; r < 4; r++)
        a[r] = q4x8_sum1(xe, xo, d, K2, KB, q + r * ldq, s + r * G, gs, b ? b + r * G : NULL, xs, G);
    /* pairs interleaved, then quadruples: each 128-bit lane [r0 r1 r2 r3], the four lanes added */
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, 0x44), _mm512_shuffle_ps(t01, t23, 0xee));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
#define Q4X8_ROWS4 1

#define Q4X8_STEP 64
#elif defined(__AVX2__) && defined(__FMA__)
/* q4x8_row on 8 lanes, 32 bytes (64 columns, 2 blocks) a step: pairs of u8 x s8 products in 16
 * bits (at most 2 x 15 x 127 each, 4 x for low + high nibbles: no saturation), then pairs of those
 * in 32 bits; lanes 4j..4j+3 hold block j's sums. */
static inline __attribute__((always_inline)) void q4x8_step(const int8_t *xe, const int8_t *xo, const float *d,
                                                            int64_t K2, int64_t KB, const uint8_t *qn,
                                                            const float *sn, int64_t gs, int64_t k, const int M,
                                                            __m256 *acc) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256i two = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const int64_t j0 = k / 16;
    const __m256i b = _mm256_loadu_si256((const __m256i *)(qn + k));
    const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    const __m128 s2 = gs == 32 ? _mm_castpd_ps(_mm_load_sd((const double *)(sn + j0))) : _mm_set1_ps(sn[j0 * XB / gs]);
    for (int m = 0; m < M; m++) {
        const __m256i p16 = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(xe + m * K2 + k))),
            _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xo + m * K2 + k))));
        const __m128 sd = _mm_mul_ps(s2, _mm_castpd_ps(_mm_load_sd((const double *)(d + m * KB + j0))));
        const __m256 sv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(sd), two);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones)), sv, acc[m]);
    }
}

/* M rows of x against one weight row: steps of 32 bytes in pairs, a last half step (16 bytes, one
 * block) on xmm */
static inline __attribute__((always_inline)) void q4x8_row(const int8_t *xe, const int8_t *xo, const float *d,
                                                           int64_t K2, int64_t KB, const uint8_t *qn, const float *sn,
                                                           int64_t gs, const int M, float *out) {
    __m256 a0[4], a1[4];
    for (int m = 0; m < M; m++) a0[m] = a1[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K2; k += 64) {
        q4x8_step(xe, xo, d, K2, KB, qn, sn, gs, k, M, a0);
        q4x8_step(xe, xo, d, K2, KB, qn, sn, gs, k + 32, M, a1);
    }
    if (k + 32 <= K2) {
        q4x8_step(xe, xo, d, K2, KB, qn, sn, gs, k, M, a0);
        k += 32;
    }
    float tail[4] = {0.f, 0.f, 0.f, 0.f};
    if (k < K2) { /* 16 bytes: one block */
        const int64_t j = k / 16;
        const __m128i l4 = _mm_set1_epi8(0x0f), b = _mm_loadu_si128((const __m128i *)(qn + k));
        const __m128i lo = _mm_and_si128(b, l4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), l4);
        for (int m = 0; m < M; m++) {
            const __m128i ve = _mm_loadu_si128((const __m128i *)(xe + m * K2 + k));
            const __m128i vo = _mm_loadu_si128((const __m128i *)(xo + m * K2 + k));
            const __m128i p16 = _mm_add_epi16(_mm_maddubs_epi16(lo, ve), _mm_maddubs_epi16(hi, vo));
            const __m128i p = _mm_madd_epi16(p16, _mm_set1_epi16(1));
            __m128i t = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0x4e));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
            tail[m] = (float)_mm_cvtsi128_si32(t) * (sn[j * XB / gs] * d[m * KB + j]);
        }
    }
    for (int m = 0; m < M; m++) out[m] = reduce8(_mm256_add_ps(a0[m], a1[m])) + tail[m];
}
#define Q4X8_STEP 32
#endif

/* M rows of x against one weight row (qn, its scales sn): out[m] */
static void q4x8_rows(const int8_t *xe, const int8_t *xo, const float *d, int64_t K2, int64_t KB, const uint8_t *qn,
                      const float *sn, int64_t gs, int64_t M, float *out) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
#if defined(Q4X8_STEP)
        const int64_t o = m0 * K2;
        switch (M - m0 < 4 ? M - m0 : 4) {
        case 1: q4x8_row(xe + o, xo + o, d + m0 * KB, K2, KB, qn, sn, gs, 1, out + m0); break;
        case 2: q4x8_row(xe + o, xo + o, d + m0 * KB, K2, KB, qn, sn, gs, 2, out + m0); break;
        case 3: q4x8_row(xe + o, xo + o, d + m0 * KB, K2, KB, qn, sn, gs, 3, out + m0); break;
        default: q4x8_row(xe + o, xo + o, d + m0 * KB, K2, KB, qn, sn, gs, 4, out + m0); break;
        }
#else
        for (int64_t m = m0; m < M && m < m0 + 4; m++) {
            float acc = 0.f;
            for (int64_t j = 0; j < KB; j++) {
                int sum = 0;
                for (int64_t i = j * XB / 2; i < (j + 1) * XB / 2; i++)
                    sum += (qn[i] & 15) * xe[m * K2 + i] + (qn[i] >> 4) * xo[m * K2 + i];
                acc += (float)sum * (sn[j * XB / gs] * d[m * KB + j]);
            }
            out[m] = acc;
        }
#endif
    }
}

/* y = x w^T as moe_q4_gemm for int4 codes (their values 0..15, offsets b = -zero * s) with x rounded
 * to 8 bits per 32 columns (above); M <= 64 rows, four at a time against each weight row; gs 32, 64
 * or 128, K % 32 == 0. Returns 0, -1 for other shapes (or no memory). */
int moe_q4x8_gemm(const float *x, int64_t M, int64_t K, const uint8_t *q, int64_t ldq, const float *s,
                  const float *b, int64_t G, int64_t gs, int64_t N, void *y, int ydtype, int num_threads) {
    if (M < 1 || M > 64 || K % XB || (gs != 32 && gs != 64 && gs != 128) || G != (K + gs - 1) / gs) return -1;
    const int64_t K2 = K / 2, KB = K / XB;
    void *buf = malloc((size_t)(M * K) + sizeof(float) * (size_t)(M * (KB + G)));
    if (!buf) return -1;
    int8_t *xe = buf, *xo = xe + M * K2;
    float *d = (float *)(xo + M * K2), *xs = d + M * KB;
    for (int64_t m = 0; m < M; m++) quant_x8(x + m * K, K, gs, xe + m * K2, xo + m * K2, d + m * KB, xs + m * G);
#if defined(Q4X8_ROWS4)
    if (M == 1) { /* decode: weight rows four at a time */
#pragma omp parallel for num_threads(num_threads) schedule(static) if (N * K >= 131072)
        for (int64_t n0 = 0; n0 < N; n0 += 4) {
            float out[4];
            const int64_t nr = N - n0 < 4 ? N - n0 : 4;
            if (nr == 4) q4x8_rows4(xe, xo, d, K2, KB, q + n0 * ldq, ldq, s + n0 * G, b ? b + n0 * G : NULL, xs, G, gs,
                                    out);
            else
                for (int64_t r = 0; r < nr; r++)
                    out[r] = _mm512_reduce_add_ps(q4x8_sum1(xe, xo, d, K2, KB, q + (n0 + r) * ldq, s + (n0 + r) * G,
                                                            gs, b ? b + (n0 + r) * G : NULL, xs, G));
            for (int64_t r = 0; r < nr; r++) /* the offsets are in */
                put_column(y, ydtype, N, n0 + r, 1, out + r, NULL, xs, G);
        }
        free(buf);
        return 0;
    }
#endif
#pragma omp parallel for num_threads(num_threads) schedule(static) if (N * K >= 131072)
    for (int64_t n = 0; n < N; n++) {
        float out[64];
        q4x8_rows(xe, xo, d, K2, KB, q + n * ldq, s + n * G, gs, M, out);
        put_column(y, ydtype, N, n, M, out, b ? b + n * G : NULL, xs, G);
    }
    free(buf);
    return 0;
}

/* The 4-bit weight itself: out[n, k] = w[n, k] in odtype (row stride K), rounded once (as
 * moe_q8_dequant). Returns 0. */
static inline void q4_dequant_row(const uint8_t *q, int64_t ldq, const float *lut, const float *s, const float *b,
                                  int64_t G, int64_t gs, int64_t n, int64_t K, void *out, int odtype,
                                  const void *tab) {
        const uint8_t *qn = q + n * ldq;
        const float *sn = s + n * G, *bnr = b ? b + n * G : NULL;
        char *o = (char *)out + (size_t)(n * K) * (odtype == BF16 ? 2 : 4);
        const size_t esz = odtype == BF16 ? 2 : 4;
        int64_t k = 0;
#if defined(__AVX512F__)
        if (gs % 32 == 0) {
            const __m512 lv = _mm512_loadu_ps(lut);
            const __m128i low = _mm_set1_epi8(0x0f);
            /* low nibbles are the even columns: interleave them with the high ones */
            const __m512i i0 = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
            const __m512i i1 = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
            for (; k + 32 <= K; k += 32) {
                const int64_t g = k / gs;
                const __m128i bb = _mm_loadu_si128((const __m128i *)(qn + k / 2));
                const __m512 sg = _mm512_set1_ps(sn[g]), bg = _mm512_set1_ps(bnr ? bnr[g] : 0.f);
                const __m512 wl = _mm512_add_ps(
                    _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bb, low)), lv), sg), bg);
                const __m512 wh = _mm512_add_ps(_mm512_mul_ps(
                    _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bb, 4), low)), lv), sg), bg);
#if defined(__AVX512BF16__)
                if (odtype == BF16) { /* both halves rounded by one instruction */
                    _mm512_storeu_si512(o + k * esz, (__m512i)_mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(wl, i1, wh),
                                                                                  _mm512_permutex2var_ps(wl, i0, wh)));
                    continue;
                }
#endif
                store16(o + k * esz, _mm512_permutex2var_ps(wl, i0, wh), odtype);
                store16(o + (k + 16) * esz, _mm512_permutex2var_ps(wl, i1, wh), odtype);
            }
        }
#elif defined(Q_AVX2)
        if (tab) { /* gs % 32 == 0: bytes of the even and odd columns interleaved before they widen */
            const Q4Table *t = tab;
            const __m128i low = _mm_set1_epi8(0x0f);
            for (; k + 32 <= K; k += 32) {
                const int64_t g = k / gs;
                const __m128i bb = _mm_loadu_si128((const __m128i *)(qn + k / 2));
                const __m128i vl = _mm_shuffle_epi8(t->tab, _mm_and_si128(bb, low));
                const __m128i vh = _mm_shuffle_epi8(t->tab, _mm_and_si128(_mm_srli_epi16(bb, 4), low));
                const __m128i c0 = _mm_unpacklo_epi8(vl, vh), c1 = _mm_unpackhi_epi8(vl, vh);
                const __m256 sg = _mm256_set1_ps(sn[g] * t->inv_c), bg = _mm256_set1_ps(bnr ? bnr[g] : 0.f);
                store8(o + k * esz, _mm256_add_ps(values8(c0, sg), bg), odtype);
                store8(o + (k + 8) * esz, _mm256_add_ps(values8(_mm_srli_si128(c0, 8), sg), bg), odtype);
                store8(o + (k + 16) * esz, _mm256_add_ps(values8(c1, sg), bg), odtype);
                store8(o + (k + 24) * esz, _mm256_add_ps(values8(_mm_srli_si128(c1, 8), sg), bg), odtype);
            }
        }
#endif
        for (; k < K; k++) {
            const int64_t g = k / gs;
            float w = lut[(qn[k / 2] >> (4 * (k & 1))) & 15] * sn[g];
            if (bnr) w += bnr[g];
            if (odtype == BF16) ((uint16_t *)o)[k] = f32_to_bf16(w);
            else ((float *)o)[k] = w;
        }
}

int moe_q4_dequant(const uint8_t *q, int64_t ldq, const float *lut, const float *s, const float *b, int64_t G,
                   int64_t gs, int64_t N, int64_t K, void *out, int odtype, int num_threads) {
    const void *tab = NULL; /* AVX2: the byte table of the codes' values (NULL: scalar rows) */
#if defined(Q_AVX2)
    Q4Table t;
    if (gs % 32 == 0 && q4_byte_table(lut, &t)) tab = &t;
#endif
    if (num_threads <= 1 || N * K < 65536) {
        for (int64_t n = 0; n < N; n++) q4_dequant_row(q, ldq, lut, s, b, G, gs, n, K, out, odtype, tab);
        return 0;
    }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) q4_dequant_row(q, ldq, lut, s, b, G, gs, n, K, out, odtype, tab);
    return 0;
}

/* one x row through an 8-bit (lut NULL) or 4-bit expert weight [N, K] */
static int qgemv(const float *x, int64_t K, const void *q, int fmt, const float *lut, const float *s, const float *b,
                 int64_t G, int64_t gs, int64_t bn, int64_t N, uint16_t *y, int nt) {
    if (lut && fmt == Q_INT4_X8) return moe_q4x8_gemm(x, 1, K, q, K / 2, s, b, G, gs, N, y, BF16, nt);
    if (lut) return moe_q4_gemm(x, 1, K, q, K / 2, lut, s, b, G, gs, N, y, BF16, nt);
    return moe_q8_gemm(x, 1, K, q, K, fmt, s, b, G, gs, bn, N, y, BF16, nt);
}

/* T <= 8 tokens' MoE layer on packed experts (experts.quant_layer.QuantGroupedExperts; one token at
 * batch 1, or a verify step's / several sequences' rows): as moe_moe_token in gemv.c, each expert
 * through moe_q8_gemm (lut NULL) or moe_q4_gemm / moe_q4x8_gemm (h = W13 x rounded to bf16,
 * silu(gate) * up as moe_silu_mul, y = W2 a rounded to bf16), with the roundings of dispatch ->
 * experts -> combine: routing weights rounded to bf16, products rounded, one bf16 addition for two
 * experts and a float32 sum rounded once for more, each row's experts in ascending id order. The
 * rows' experts run in ascending order (expert_tasks), each expert's rows back to back, so its codes
 * come from memory once and from the caches for the rows after the first; each row's result is its
 * one-row result, bit for bit. Codes of expert e at q13 + e * eq13 bytes ([2F, D] rows) and
 * q2 + e * eq2 ([D, F]); scales (offsets) at s13 + e * es13 ([2F / bn, G13]) and s2 + e * es2. A bf16
 * shared expert (sh13, sh2; NULL: none; gated with shg) is added in bf16 after. With the plan's
 * biases (eb13, eb2: each added to its GEMV's bf16 result, as the op path adds it) and activation
 * (gpt-oss's: ExpertExtras). K <= 64. scratch: fscratch 2 max(D, F) + T D float32 (the rows' sums),
 * hscratch 3 max(F, Fs) + 2 D bf16. Returns 0, -2 for an id outside [0, E), -1 when a kernel fails (no
 * memory). */
static int qx_moe_rows(const QxMoePlan *a, const uint16_t *x, int64_t T, int64_t K, const int64_t *ids,
                       const float *wts, uint16_t *out, const uint16_t *resid, const uint16_t *nw, float neps,
                       uint16_t *h_out, int nt) {
    const int64_t D = a->D, F = a->F, Fs = a->Fs;
    const int fmt = (int)a->fmt;
    ExpertTasks tk;
    int rc = expert_tasks(ids, wts, T, K, a->E, &tk);
    if (rc != 0) return rc;
    const int64_t DF = D > F ? D : F, Fm = Fs > F ? Fs : F;
    float *xf = a->fscratch, *af = xf + DF, *acc = af + DF; /* acc: T rows of D */
    uint16_t *h = a->hscratch, *act = h + 2 * F, *y = h + 3 * Fm, *sh = y + D;
    int64_t in_xf = -1; /* the row xf holds */
    const ExpertExtras ex = {NULL, NULL, a->sig, a->alpha, a->limit, (int)a->act, (int)a->clamp};
    for (int64_t i = 0; i < tk.n && rc == 0; i++) {
        const int64_t e = tk.eid[i];
        const uint16_t *eb13 = a->eb13 ? a->eb13 + e * a->sb13 : NULL, *eb2 = a->eb2 ? a->eb2 + e * a->sb2 : NULL;
        for (int64_t j = i * T; j < i * T + tk.cnt[i]; j++) {
            const int64_t t = tk.row[j], place = tk.at[j];
            if (t != in_xf)
                for (int64_t k = 0; k < D; k++) xf[k] = bf16_to_f32(x[t * D + k]);
            in_xf = t;
            rc = qgemv(xf, D, a->q13 + e * a->eq13, fmt, a->lut, a->s13 + e * a->es13,
                       a->b13 ? a->b13 + e * a->es13 : NULL, a->G13, a->gs, a->bn, 2 * F, h, nt);
            if (rc != 0) break;
            if (eb13)
                for (int64_t k = 0; k < 2 * F; k++) h[k] = with_bias(bf16_to_f32(h[k]), eb13, k);
            expert_act(h, F, &ex, act);
            for (int64_t k = 0; k < F; k++) af[k] = bf16_to_f32(act[k]);
            rc = qgemv(af, F, a->q2 + e * a->eq2, fmt, a->lut, a->s2 + e * a->es2,
                       a->b2 ? a->b2 + e * a->es2 : NULL, a->G2, a->gs, a->bn, D, y, nt);
            if (rc != 0) break;
            if (eb2)
                for (int64_t d = 0; d < D; d++) y[d] = with_bias(bf16_to_f32(y[d]), eb2, d);
            float *acc_t = acc + t * D;
            for (int64_t d = 0; d < D; d++) {
                const float v = bf16_to_f32(f32_to_bf16(bf16_to_f32(y[d]) * tk.wt[j]));
                if (place == 0) acc_t[d] = v;
                else if (K == 2) acc_t[d] = bf16_to_f32(f32_to_bf16(acc_t[d] + v));
                else acc_t[d] += v;
            }
        }
    }
    expert_tasks_free(&tk);
    if (rc != 0) return -1;
    for (int64_t t = 0; t < T; t++) {
        uint16_t *out_t = out + t * D;
        for (int64_t d = 0; d < D; d++) out_t[d] = f32_to_bf16(acc[t * D + d]);
        if (a->sh13 && add_shared_expert(x + t * D, D, a->sh13, a->sh2, a->shg, a->sig, Fs, out_t, sh, h, xf, nt) != 0)
            return -1;
        then_norm(out_t, D, resid ? resid + t * D : NULL, nw, neps, h_out ? h_out + t * D : NULL);
    }
    return 0;
}

/* The packed MoE layer for T rows (ids, wts: T rows of K; x, out, resid, h_out: T rows of D), a->rows
 * (<= 8) at a time through qx_moe_rows, with the plan's packed experts, shared expert and scratch. */
int moe_qx_moe_token(const QxMoePlan *a, const uint16_t *x, int64_t T, int64_t K, const int64_t *ids,
                     const float *wts, uint16_t *out, const uint16_t *resid, const uint16_t *nw, float neps,
                     uint16_t *h_out, int nt) {
    const int64_t D = a->D, R = a->rows;
    for (int64_t t = 0; t < T; t += R) {
        const int rc = qx_moe_rows(a, x + t * D, T - t < R ? T - t : R, K, ids + t * K, wts + t * K, out + t * D,
                                   resid ? resid + t * D : NULL, nw, neps, h_out ? h_out + t * D : NULL, nt);
        if (rc != 0) return rc;
    }
    return 0;
}
