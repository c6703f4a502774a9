/* What the CPU kernels share: dtype codes, bf16 <-> float32, and AVX-512 loads/stores and exp. */
#ifndef MOE_CPU_SIMD_H
#define MOE_CPU_SIMD_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1 };

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

#if defined(__AVX512F__)
#include <immintrin.h>
#define VEC 16
/* 16 elements (float32 or bf16) -> 16 floats */
static inline __m512 load16(const void *p, int dtype) {
    if (dtype == BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    return _mm512_loadu_ps(p);
}

/* exp(x) for x <= 0 (softmax of max-subtracted logits); 2^(x log2 e) by a degree-6 polynomial of
 * the fractional part and scalef for the integer part (relative error ~2e-7) */
static inline __m512 exp16(__m512 x) {
    const __m512 y = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(-160.f));
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

#endif
#endif
