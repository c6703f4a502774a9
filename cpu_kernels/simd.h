/* What the CPU kernels share: dtype codes, bf16 <-> float32, and AVX-512 (16 lanes) or AVX2 + FMA
 * (8 lanes) loads/stores, exp and silu. */
#ifndef MOE_CPU_SIMD_H
#define MOE_CPU_SIMD_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, FP8 = 2 };  /* FP8: float8 e4m3fn (fp8 KV caches' rows) */

/* bytes per element of a dtype code */
static inline size_t dtype_size(int dtype) { return dtype == FP8 ? 1 : dtype == BF16 ? 2 : 4; }

/* e4m3fn -> float32, exact: magnitudes 8-126 are normal (exponent rebiased from 7 to 127), 1-7 subnormal
 * (m * 2^-9); the NaN pattern 0x7f reads as 480 (the cache never holds it: rows are scaled to +-448) */
static inline float e4m3_to_f32(uint8_t x) {
    union { uint32_t u; float f; } c;
    const uint32_t mag = x & 0x7fu;
    if (mag < 8) c.f = (float)mag * 0x1p-9f;
    else c.u = (mag << 20) + (120u << 23);
    c.u |= (uint32_t)(x & 0x80u) << 24;
    return c.f;
}

/* float32 -> e4m3fn as torch's .to(torch.float8_e4m3fn) rounds it (nearest even) for |f| <= 448 (the
 * cache's rows are scaled into it); NaN -> 0x7f */
static inline uint8_t f32_to_e4m3(float f) {
    union { uint32_t u; float f; } c;
    c.f = f;
    const uint8_t sign = (uint8_t)((c.u >> 24) & 0x80u);
    c.u &= 0x7fffffffu;
    if (c.u > 0x7f800000u) return sign | 0x7f;
    if (c.f < 0x1p-6f) return sign | (uint8_t)lrintf(c.f * 512.f);  /* subnormal: units of 2^-9 (8: 2^-6) */
    const uint32_t r = c.u + 0x7ffffu + ((c.u >> 20) & 1u);  /* 3 mantissa bits, nearest even */
    return sign | (uint8_t)((r >> 20) - (120u << 3));
}

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);  /* quiet NaN */
    c.u += 0x7fffu + ((c.u >> 16) & 1u);
    return (uint16_t)(c.u >> 16);
}

/* The sum of 16 lanes in the order of GCC's _mm512_reduce_add_ps (halves, quarters, then pairs),
 * for builds without AVX-512 that must sum as that build does. */
static inline float reduce16(const float *a) {
    float s8[8], s4[4];
    for (int j = 0; j < 8; j++) s8[j] = a[j + 8] + a[j];
    for (int j = 0; j < 4; j++) s4[j] = s8[j + 4] + s8[j];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* 8 bf16 -> 8 floats (a shift) */
static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* the sum of 8 lanes: halves, quarters, then pairs (reduce16's tree after its first step) */
static inline float reduce8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));  /* (s0 + s2), (s1 + s3) */
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define VEC 16
/* 16 elements (float32 or bf16) -> 16 floats */
static inline __m512 load16(const void *p, int dtype) {
    if (dtype == BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    return _mm512_loadu_ps(p);
}

/* 16 e4m3 values -> 16 floats, as e4m3_to_f32 reads them */
static inline __m512 load16_e4m3(const void *p) {
    const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m512i mag = _mm512_and_si512(x, _mm512_set1_epi32(0x7f));
    __m512i v = _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23));
    const __mmask16 sub = _mm512_cmplt_epu32_mask(mag, _mm512_set1_epi32(8));
    const __m512 small = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(0x1p-9f));
    v = _mm512_mask_mov_epi32(v, sub, _mm512_castps_si512(small));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(v, sign));
}

/* 2^y for y <= 0: a degree-6 polynomial of the fractional part and scalef for the integer part
 * (relative error ~2e-7); y below -160 taken as -160 (0 in float32, -inf included) */
static inline __m512 exp2_16(__m512 y) {
    y = _mm512_max_ps(y, _mm512_set1_ps(-160.f));
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);  /* [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* exp(x) for x <= 0 (softmax of max-subtracted logits): 2^(x log2 e) */
static inline __m512 exp16(__m512 x) { return exp2_16(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f))); }

/* silu(g) = g * sigmoid(g), the sigmoid from exp(-|g|) (never overflows): g >= 0: 1 / (1 + e),
 * else e / (1 + e) */
static inline __m512 silu16(__m512 g) {
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 r = _mm512_div_ps(one, _mm512_add_ps(one, e));
    return _mm512_mul_ps(g, _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), r, e));
}

/* 16 floats rounded to bf16 precision (nearest even, as torch does), kept as floats; NaN stays NaN */
static inline __m512 round_bf16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                           _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u))), nan, x);
}

/* lane t of the result = sum of the 16 lanes of v[t] (45 shuffles and adds for 16 horizontal sums) */
static inline __m512 hsum16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per 128-bit lane: tokens 4i .. 4i+3, that lane's partial sums */
        b[i] = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]))),
            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]))));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* 16 floats -> 16 elements (float32, or bf16 rounded to nearest even as torch does) */
static inline void store16(void *p, __m512 x, int dtype) {
    if (dtype == BF16) {
        __m512i u = _mm512_castps_si512(x);
        const __m512i r = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
        const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        u = _mm512_mask_or_epi32(_mm512_add_epi32(u, r), nan, u, _mm512_set1_epi32(0x400000));
        _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    } else {
        _mm512_storeu_ps(p, x);
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 + FMA (no AVX-512: e.g. AMD Zen 2/3): the same operations on 8 lanes, each lane computed as
 * the AVX-512 build computes it (same polynomial, same roundings), so element-wise results agree
 * bit for bit with that build's vector body. */
#include <immintrin.h>
#define VEC8 8
/* 8 elements (float32 or bf16) -> 8 floats */
static inline __m256 load8(const void *p, int dtype) {
    if (dtype == BF16) return load8_bf16((const uint16_t *)p);
    return _mm256_loadu_ps(p);
}

/* 8 e4m3 values -> 8 floats, as e4m3_to_f32 reads them */
static inline __m256 load8_e4m3(const void *p) {
    const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    const __m256i mag = _mm256_and_si256(x, _mm256_set1_epi32(0x7f));
    const __m256 normal =
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23)));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(0x1p-9f));
    const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag);
    const __m256 v = _mm256_blendv_ps(normal, sub, _mm256_castsi256_ps(small));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
    return _mm256_or_ps(v, _mm256_castsi256_ps(sign));
}

/* the bits of 8 floats rounded to bf16 (nearest even, as torch does) in their upper halves; NaN
 * quieted as f32_to_bf16 does */
static inline __m256i bf16_bits8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                           _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
}

/* 8 floats rounded to bf16 precision, kept as floats; NaN stays NaN */
static inline __m256 round_bf16_8(__m256 x) {
    const __m256 r = _mm256_castsi256_ps(_mm256_and_si256(bf16_bits8(x), _mm256_set1_epi32((int)0xffff0000u)));
    return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

/* 8 floats -> 8 elements (float32, or bf16 rounded to nearest even as torch does) */
static inline void store8(void *p, __m256 x, int dtype) {
    if (dtype == BF16) {
        const __m256i h = _mm256_srli_epi32(bf16_bits8(x), 16);  /* 0 .. 0xffff: packus keeps them */
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), _MM_SHUFFLE(3, 1, 2, 0));
        _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
    } else {
        _mm256_storeu_ps(p, x);
    }
}

/* exp(x) for x <= 0 as exp16 computes it: the same polynomial of the fractional part; p * 2^n as
 * two exact power-of-two products (2^n alone leaves float32's normal range below n = -126), the
 * second rounding once, as scalef does */
static inline __m256 exp8(__m256 x) {
    const __m256 y = _mm256_max_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(-160.f));
    const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(y, n);  /* [-0.5, 0.5] */
    __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i n1 = _mm256_max_epi32(ni, _mm256_set1_epi32(-100)), n2 = _mm256_sub_epi32(ni, n1);  /* n2 in [-60, 0] */
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

/* silu(g) as silu16: the sigmoid from exp(-|g|); g >= 0: 1 / (1 + e), else (1 / (1 + e)) * e */
static inline __m256 silu8(__m256 g) {
    const __m256 one = _mm256_set1_ps(1.f);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.f), g)));  /* 0 - |g| */
    const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
    return _mm256_mul_ps(g, _mm256_blendv_ps(r, _mm256_mul_ps(r, e), _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ)));
}

#endif
#endif
