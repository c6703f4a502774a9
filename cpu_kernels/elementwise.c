/* Fused elementwise CPU kernels: rotary embedding in place, and SwiGLU's silu(gate) * up.
 * Each replaces a chain of torch ops (float conversion, halves, four products, concatenation,
 * conversion back) with one pass over the data, rounding as torch does: float32 math, one
 * rounding to the output dtype per torch op it stands for. Built with -ffp-contract=off so the
 * scalar paths round each product as torch's kernels do. Vector bodies: AVX-512 (16 lanes) or
 * AVX2 + FMA (8 lanes, CPUs without AVX-512), each lane computed as the AVX-512 body computes it. */
#include "kernels.h"

/* Lanes of the vector bodies this library was built with: 16 (AVX-512), 8 (AVX2 + FMA) or 1 (scalar
 * C only), so that a test can tell a build that silently lost its vector bodies. */
int moe_simd_lanes(void) {
#if defined(__AVX512F__)
    return 16;
#elif defined(VEC8)
    return 8;
#else
    return 1;
#endif
}

static inline float loadf(const void *p, int64_t i, int dtype) {
    return dtype == BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void storef(void *p, int64_t i, float x, int dtype) {
    if (dtype == BF16) ((uint16_t *)p)[i] = f32_to_bf16(x);
    else ((float *)p)[i] = x;
}

/* One row of moe_rope: row [D] (dtype) rotated in place by cos/sin [D/2] (see there). */
static inline void rope_row(char *row, const float *c, const float *s, int64_t D, int dtype, int interleaved) {
    const int64_t half = D / 2;
    const size_t esz = dtype == BF16 ? 2 : 4;
    int64_t i = 0;
#if defined(__AVX512F__)
    if (!interleaved)
        for (; i + VEC <= half; i += VEC) {
            const __m512 x1 = load16(row + i * esz, dtype), x2 = load16(row + (i + half) * esz, dtype);
            const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
            /* products rounded before the sum, as x1 * cos - x2 * sin in torch */
            store16(row + i * esz, _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv)), dtype);
            store16(row + (i + half) * esz, _mm512_add_ps(_mm512_mul_ps(x2, cv), _mm512_mul_ps(x1, sv)), dtype);
        }
#elif defined(VEC8)
    if (!interleaved)
        for (; i + VEC8 <= half; i += VEC8) {
            const __m256 x1 = load8(row + i * esz, dtype), x2 = load8(row + (i + half) * esz, dtype);
            const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
            store8(row + i * esz, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)), dtype);
            store8(row + (i + half) * esz, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)), dtype);
        }
    else if (dtype == BF16)  /* 8 pairs (2i, 2i+1) = 8 32-bit words: the even element in the low half */
        for (; i + VEC8 <= half; i += VEC8) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(row + 4 * i)), hi = _mm256_set1_epi32((int)0xffff0000u);
            const __m256 x1 = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), x2 = _mm256_castsi256_ps(_mm256_and_si256(w, hi));
            const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
            const __m256 o1 = _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv));
            const __m256 o2 = _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv));
            _mm256_storeu_si256((__m256i *)(row + 4 * i), _mm256_or_si256(_mm256_srli_epi32(bf16_bits8(o1), 16),
                                                                          _mm256_and_si256(bf16_bits8(o2), hi)));
        }
    else  /* float32: pairs 0,1,4,5 | 2,3,6,7 after the even/odd shuffles; cos/sin permuted to match */
        for (; i + VEC8 <= half; i += VEC8) {
            const float *p = (const float *)row + 2 * i;
            const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
            const __m256 x1 = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)), x2 = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
            const __m256i perm = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
            const __m256 cv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(c + i), perm);
            const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + i), perm);
            const __m256 o1 = _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv));
            const __m256 o2 = _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv));
            _mm256_storeu_ps((float *)p, _mm256_unpacklo_ps(o1, o2));  /* pairs 0-1 | 2-3 */
            _mm256_storeu_ps((float *)p + 8, _mm256_unpackhi_ps(o1, o2));  /* pairs 4-5 | 6-7 */
        }
#endif
    for (; i < half; i++) {
        const int64_t i1 = interleaved ? 2 * i : i, i2 = interleaved ? 2 * i + 1 : i + half;
        const float x1 = loadf(row, i1, dtype), x2 = loadf(row, i2, dtype);
        storef(row, i1, x1 * c[i] - x2 * s[i], dtype);
        storef(row, i2, x2 * c[i] + x1 * s[i], dtype);
    }
}

/* Whether every position of pos[T] is a row of a table of npos rows. */
static int positions_in(const int64_t *pos, int64_t T, int64_t npos) {
    for (int64_t t = 0; t < T; t++)
        if (pos[t] < 0 || pos[t] >= npos) return 0;
    return 1;
}

/* x [T, H, D] (element strides st, sh; unit stride within a head) rotated in place by the angles
 * of positions pos[T]: cos/sin are float32 [npos, D/2]. Pairs (i, i + D/2), or (2i, 2i+1) when
 * interleaved. Returns 0; -2, with nothing written, when a position is not a row of the tables
 * (the caller grows them and calls again: the check costs the caller nothing). */
int moe_rope(void *x, int dtype, int64_t T, int64_t H, int64_t D, int64_t st, int64_t sh, const int64_t *pos,
             int64_t npos, const float *cos_tab, const float *sin_tab, int interleaved, int num_threads) {
    if (!positions_in(pos, T, npos)) return -2;
    const int64_t half = D / 2;
    const size_t esz = dtype == BF16 ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * H * D >= 16384)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_tab + pos[t] * half, *s = sin_tab + pos[t] * half;
        for (int64_t h = 0; h < H; h++)
            rope_row((char *)x + (t * st + h * sh) * esz, c, s, D, dtype, interleaved);
    }
    return 0;
}

/* out[a, b, :] = silu(gate[a, b, :]) * up[a, b, :] over [A, B, C] (element strides per tensor for
 * a and b, unit stride over c). In bf16 the silu result is rounded before the product, as
 * F.silu(gate) * up does. Returns 0. */
int moe_silu_mul(const void *gate, const void *up, void *out, int dtype, int64_t A, int64_t B, int64_t C,
                 int64_t g_sa, int64_t g_sb, int64_t u_sa, int64_t u_sb, int64_t o_sa, int64_t o_sb,
                 int num_threads) {
    const size_t esz = dtype == BF16 ? 2 : 4;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static) if (A * B * C >= 16384)
    for (int64_t a = 0; a < A; a++) {
        for (int64_t b = 0; b < B; b++) {
            const char *g = (const char *)gate + (a * g_sa + b * g_sb) * esz;
            const char *u = (const char *)up + (a * u_sa + b * u_sb) * esz;
            char *o = (char *)out + (a * o_sa + b * o_sb) * esz;
            int64_t i = 0;
#if defined(__AVX512F__)
            for (; i + VEC <= C; i += VEC) {
                __m512 si = silu16(load16(g + i * esz, dtype));
                if (dtype == BF16) si = round_bf16(si); /* F.silu's own rounding to bf16 */
                store16(o + i * esz, _mm512_mul_ps(si, load16(u + i * esz, dtype)), dtype);
            }
#elif defined(VEC8)
            for (; i < C; i += VEC8) {
                /* the last C % 8 elements through a zero-padded copy: every element takes the same
                 * arithmetic wherever it sits in the row */
                const int64_t n = C - i < VEC8 ? C - i : VEC8;
                char gt[VEC8 * 4] = {0}, ut[VEC8 * 4] = {0}, ot[VEC8 * 4];
                const char *gp = g + i * esz, *up_ = u + i * esz;
                char *op = o + i * esz;
                if (n < VEC8) {
                    memcpy(gt, gp, n * esz);
                    memcpy(ut, up_, n * esz);
                    gp = gt, up_ = ut, op = ot;
                }
                __m256 si = silu8(load8(gp, dtype));
                if (dtype == BF16) si = round_bf16_8(si); /* F.silu's own rounding to bf16 */
                store8(op, _mm256_mul_ps(si, load8(up_, dtype)), dtype);
                if (n < VEC8) memcpy(o + i * esz, ot, n * esz);
            }
#endif
            for (; i < C; i++) {
                const float gv = loadf(g, i, dtype);
                const float e = expf(-fabsf(gv));
                float si = gv * (gv >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
                if (dtype == BF16) si = bf16_to_f32(f32_to_bf16(si));
                storef(o, i, si * loadf(u, i, dtype), dtype);
            }
        }
    }
    return 0;
}

/* One row of moe_rms_norm's statistics: 1 / sqrt(mean(x^2) + eps) of xr [D]. */
static inline float rms_inv(const char *xr, int64_t D, int dtype, float eps) {
    const size_t esz = dtype == BF16 ? 2 : 4;
    int64_t i = 0;
    float ss = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + VEC <= D; i += VEC) {
        const __m512 v = load16(xr + i * esz, dtype);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    ss = _mm512_reduce_add_ps(acc);
#elif defined(VEC8)
    {  /* the AVX-512 build's 16 lanes as two halves, reduced in reduce16's order */
        __m256 lo = _mm256_setzero_ps(), hi = lo;
        for (; i + 16 <= D; i += 16) {
            const __m256 a = load8(xr + i * esz, dtype), b = load8(xr + (i + 8) * esz, dtype);
            lo = _mm256_add_ps(lo, _mm256_mul_ps(a, a));
            hi = _mm256_add_ps(hi, _mm256_mul_ps(b, b));
        }
        ss = reduce8(_mm256_add_ps(hi, lo));
    }
#else
    {  /* the AVX-512 build's sums in its order (16 lanes, then its reduction tree): the same
        * statistics, so the same results, on every CPU */
        float lane[16] = {0};
        for (; i + 16 <= D; i += 16)
            for (int j = 0; j < 16; j++) {
                const float v = loadf(xr, i + j, dtype);
                lane[j] += v * v;
            }
        ss = reduce16(lane);
    }
#endif
    for (; i < D; i++) {
        const float v = loadf(xr, i, dtype);
        ss += v * v;
    }
    return 1.f / sqrtf(ss / (float)D + eps);
}

/* One row of moe_rms_norm scaled: orow [D] = xr * inv (rounded), times w (see there). */
static inline void rms_apply(const char *xr, char *orow, const void *w, int64_t D, int dtype, float inv) {
    const size_t esz = dtype == BF16 ? 2 : 4;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + VEC <= D; i += VEC) {
        __m512 y = _mm512_mul_ps(load16(xr + i * esz, dtype), _mm512_set1_ps(inv));
        if (w) {
            if (dtype == BF16) y = round_bf16(y);  /* rounded to bf16 before the weight, as .to(x.dtype) does */
            y = _mm512_mul_ps(y, load16((const char *)w + i * esz, dtype));
        }
        store16(orow + i * esz, y, dtype);
    }
#elif defined(VEC8)
    for (; i + VEC8 <= D; i += VEC8) {
        __m256 y = _mm256_mul_ps(load8(xr + i * esz, dtype), _mm256_set1_ps(inv));
        if (w) {
            if (dtype == BF16) y = round_bf16_8(y);  /* y rounded to bf16 before the weight */
            y = _mm256_mul_ps(y, load8((const char *)w + i * esz, dtype));
        }
        store8(orow + i * esz, y, dtype);
    }
#endif
    for (; i < D; i++) {
        float y = loadf(xr, i, dtype) * inv;
        if (w) {
            if (dtype == BF16) y = bf16_to_f32(f32_to_bf16(y));
            y *= loadf(w, i, dtype);
        }
        storef(orow, i, y, dtype);
    }
}

/* One row of moe_rms_norm: xr [D] -> orow [D] (see there). */
static inline void rms_row(const char *xr, char *orow, const void *w, int64_t D, int dtype, float eps) {
    rms_apply(xr, orow, w, D, dtype, rms_inv(xr, D, dtype, eps));
}

/* RMSNorm of rows x [R, D] (row stride sx, unit stride within a row) into out [R, D] (row stride
 * so), as the reference implementations do for low-precision activations: statistics in float32,
 * y = x * rsqrt(mean(x^2) + eps) rounded to the input dtype, then weight * y rounded again.
 * w (dtype, [D]) may be NULL (no scale). Returns 0. */
int moe_rms_norm(const void *x, const void *w, void *out, int dtype, int64_t R, int64_t D, int64_t sx, int64_t so,
                 float eps, int num_threads) {
    return moe_rms_norm_heads(x, w, out, dtype, R, 1, D, sx, 0, so, 0, eps, num_threads);
}

/* moe_rms_norm of the T x H rows of x [T, H, D] (row (t, h) at x + t sx_t + h sx_h elements, unit
 * stride within it: e.g. the heads of q inside a wider qkv row) into out [T, H, D] (strides so_t,
 * so_h); out may be x (in place: a row is read whole before it is written). Returns 0. */
int moe_rms_norm_heads(const void *x, const void *w, void *out, int dtype, int64_t T, int64_t H, int64_t D,
                       int64_t sx_t, int64_t sx_h, int64_t so_t, int64_t so_h, float eps, int num_threads) {
    const size_t esz = dtype == BF16 ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * H * D >= 32768)
    for (int64_t r = 0; r < T * H; r++) {
        const int64_t t = r / H, h = r % H;
        rms_row((const char *)x + (t * sx_t + h * sx_h) * esz, (char *)out + (t * so_t + h * so_h) * esz, w, D,
                dtype, eps);
    }
    return 0;
}

/* moe_rms_norm_heads then moe_rope on the same rows in place, each row normalized then rotated while
 * in cache (one pass over them where the two calls make two): heads h < hq of x [T, H, D] (element
 * strides st, sh; unit stride within a head) take the norm weight wq and eps_q (a qkv row's q heads),
 * the others wk and eps_k (its k heads); positions, tables and pairs as moe_rope. Bit-identical to
 * the two calls. Returns 0, or -2 as moe_rope. */
int moe_rms_norm_rope(void *x, const void *wq, float eps_q, const void *wk, float eps_k, int dtype, int64_t T,
                      int64_t H, int64_t hq, int64_t D, int64_t st, int64_t sh, const int64_t *pos, int64_t npos,
                      const float *cos_tab, const float *sin_tab, int interleaved, int num_threads) {
    if (!positions_in(pos, T, npos)) return -2;
    const int64_t half = D / 2;
    const size_t esz = dtype == BF16 ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * H * D >= 16384)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_tab + pos[t] * half, *s = sin_tab + pos[t] * half;
        /* every head's statistics first, then each head scaled and rotated: the heads' sums, each a
         * chain of dependent adds, run side by side rather than between the other passes */
        float inv[H];
        for (int64_t h = 0; h < H; h++)
            inv[h] = rms_inv((const char *)x + (t * st + h * sh) * esz, D, dtype, h < hq ? eps_q : eps_k);
        for (int64_t h = 0; h < H; h++) {
            char *row = (char *)x + (t * st + h * sh) * esz;
            rms_apply(row, row, h < hq ? wq : wk, D, dtype, inv[h]);
            rope_row(row, c, s, D, dtype, interleaved);
        }
    }
    return 0;
}

/* A residual add and the next RMSNorm in one call: h_out = h + d rounded to the dtype (torch's add),
 * then out = moe_rms_norm(h_out), row by row (the row normalized while in cache; out may be d). R
 * contiguous rows of D. Returns 0. */
int moe_add_rms_norm(const void *h, const void *d, const void *w, void *h_out, void *out, int dtype, int64_t R,
                     int64_t D, float eps, int num_threads) {
    const size_t esz = dtype == BF16 ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (R * D >= 32768)
    for (int64_t r = 0; r < R; r++) {
        const char *hr = (const char *)h + r * D * esz, *dr = (const char *)d + r * D * esz;
        char *hor = (char *)h_out + r * D * esz;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + VEC <= D; i += VEC)
            store16(hor + i * esz, _mm512_add_ps(load16(hr + i * esz, dtype), load16(dr + i * esz, dtype)), dtype);
#elif defined(VEC8)
        for (; i + VEC8 <= D; i += VEC8)
            store8(hor + i * esz, _mm256_add_ps(load8(hr + i * esz, dtype), load8(dr + i * esz, dtype)), dtype);
#endif
        for (; i < D; i++) storef(hor, i, loadf(hr, i, dtype) + loadf(dr, i, dtype), dtype);
        rms_row(hor, (char *)out + r * D * esz, w, D, dtype, eps);
    }
    return 0;
}

/* dst[slots[t], h, :] = src[t, h, :] for t < T: new K/V rows into a paged cache [slots, H, D]
 * (element strides d_slot, d_head, unit within a head) from src [T, H, D] with any element
 * strides (s_t, s_h, s_d), same dtype. Returns 0. */
int moe_write_rows(const void *src, void *dst, int dtype, int64_t T, int64_t H, int64_t D, int64_t s_t, int64_t s_h,
                   int64_t s_d, const int64_t *slots, int64_t d_slot, int64_t d_head, int num_threads) {
    const size_t esz = dtype == BF16 ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * H * D >= 65536)
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < H; h++) {
            const char *s = (const char *)src + (t * s_t + h * s_h) * esz;
            char *d = (char *)dst + (slots[t] * d_slot + h * d_head) * esz;
            if (s_d == 1) {
                memcpy(d, s, D * esz);
            } else if (esz == 2) {
                for (int64_t i = 0; i < D; i++) ((uint16_t *)d)[i] = *(const uint16_t *)(s + i * s_d * 2);
            } else {
                for (int64_t i = 0; i < D; i++) ((float *)d)[i] = *(const float *)(s + i * s_d * 4);
            }
        }
    }
    return 0;
}

/* dst[m, n] = float(src[n, m]) for src [N, M] (row stride s_n elements, unit stride over m) and
 * dst [M, N] float32 contiguous: a GEMM's transposed output (weights times activations) turned
 * into row-major float32 rows in one pass. Tiles of 64 source rows stay in L1 while their M
 * columns are written out as runs of 64 floats. Returns 0. */
int moe_transpose_to_f32(const void *src, int dtype, int64_t N, int64_t M, int64_t s_n, float *dst,
                         int num_threads) {
    const int64_t tiles = (N + 63) / 64;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (N * M >= 65536)
    for (int64_t tile = 0; tile < tiles; tile++) {
        const int64_t n0 = tile * 64, n1 = n0 + 64 < N ? n0 + 64 : N;
        for (int64_t m = 0; m < M; m++) {
            float *d = dst + m * N;
            if (dtype == BF16) {
                const uint16_t *s = (const uint16_t *)src + m;
                for (int64_t n = n0; n < n1; n++) d[n] = bf16_to_f32(s[n * s_n]);
            } else {
                const float *s = (const float *)src + m;
                for (int64_t n = n0; n < n1; n++) d[n] = s[n * s_n];
            }
        }
    }
    return 0;
}

/* index of the largest of v[0:n] not yet taken (ties: the lower index, as a stable descending sort) */
static inline int64_t argmax_free(const float *v, const unsigned char *taken, int64_t n) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

/* The router's scores of one token from its float32 logits [E]: softmax (scoring 1; a NaN logit
 * makes every score NaN, as torch's softmax) or sigmoid (scoring 2), in float32 with libm's expf. */
static void route_scores(const float *l, int64_t E, int scoring, float *s) {
    if (scoring == 2) {
        for (int64_t e = 0; e < E; e++) s[e] = 1.f / (1.f + expf(-l[e]));
        return;
    }
    float m = -INFINITY, sum = 0.f;
    int nan = 0;
    for (int64_t e = 0; e < E; e++) {
        nan |= l[e] != l[e];
        m = l[e] > m ? l[e] : m;
    }
    for (int64_t e = 0; e < E; e++) sum += s[e] = expf(l[e] - m);
    for (int64_t e = 0; e < E; e++) s[e] = nan ? NAN : s[e] / sum;
}

/* routing.route for one token: scores (route_scores; scoring 3, gpt-oss's top k before the softmax:
 * the logits, the softmax over the K chosen as their weights, eps 0) written to s [E], then the expert choice:
 * selection = scores (+ bias[E] when given); with G > 1 groups only the experts of the topk_groups
 * best groups stay (group score: sum of its two best selections, or its best); the K best
 * remaining experts, in descending order, go to ids [K]; their unbiased scores, divided by their
 * sum (+ eps) when renormalize, times scale, to weights [K] -- the order of operations of
 * routing.route. Of equal values the lower index (group) comes first, as routing.top_k_ids' stable
 * sort takes them. A token with a NaN selection returns 1 and is left for the caller to route with
 * torch from s (where NaNs go is torch's sort's business). */
static int route_token(const float *l, int scoring, const float *bias, int64_t E, int64_t K, int64_t G,
                       int64_t topk_groups, int group_top2, int renormalize, float eps, float scale, float *s,
                       float *weights, int64_t *ids) {
    const int64_t per = E / G;
    float sel[E], gs[G];
    unsigned char taken[E > G ? E : G];
    if (scoring == 3) /* gpt-oss: the K best logits (s: the logits), then a softmax over those K */
        memcpy(s, l, (size_t)E * sizeof(float));
    else
        route_scores(l, E, scoring, s);
    for (int64_t e = 0; e < E; e++) {
        sel[e] = bias ? s[e] + bias[e] : s[e];
        if (sel[e] != sel[e]) return 1;
    }
    if (G > 1) {
        for (int64_t g = 0; g < G; g++) {
            const float *v = sel + g * per;
            float a = -INFINITY, b = -INFINITY;  /* best, second best */
            for (int64_t i = 0; i < per; i++) {
                if (v[i] > a) { b = a; a = v[i]; }
                else if (v[i] > b) b = v[i];
            }
            gs[g] = group_top2 ? a + b : a;
        }
        memset(taken, 0, G);
        for (int64_t j = 0; j < topk_groups; j++) taken[argmax_free(gs, taken, G)] = 1;
        for (int64_t g = 0; g < G; g++)
            if (!taken[g])
                for (int64_t i = 0; i < per; i++) sel[g * per + i] = -INFINITY;
    }
    memset(taken, 0, E);
    float sum = 0.f;
    for (int64_t k = 0; k < K; k++) {
        const int64_t e = argmax_free(sel, taken, E);
        taken[e] = 1;
        ids[k] = e;
        sum += weights[k] = scoring == 3 ? expf(s[e] - s[ids[0]]) : s[e];
    }
    for (int64_t k = 0; k < K; k++) {
        float w = weights[k];
        if (renormalize || scoring == 3) w = w / (sum + eps);
        weights[k] = w * scale;
    }
    return 0;
}

/* route_token for each token t of float32 logits [T, E]: scores to scores [T, E], choices to
 * weights / ids [T, K], ties[t] = 1 for a token left to torch (a NaN). Returns the number of such tokens. */
int moe_route_select(const float *logits, int scoring, const float *bias, int64_t T, int64_t E, int64_t K,
                     int64_t G, int64_t topk_groups, int group_top2, int renormalize, float eps, float scale,
                     float *scores, float *weights, int64_t *ids, unsigned char *ties, int num_threads) {
    int64_t flagged = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(+ : flagged) if (T * E >= 16384)
    for (int64_t t = 0; t < T; t++) {
        ties[t] = (unsigned char)route_token(logits + t * E, scoring, bias, E, K, G, topk_groups, group_top2,
                                             renormalize, eps, scale, scores + t * E, weights + t * K, ids + t * K);
        flagged += ties[t];
    }
    return (int)flagged;
}

/* The router of T bf16 rows x [T, D] in one call, row by row: logits = gate [E, D] (row stride ldw)
 * @ x (+ gate bias), rounded to bf16 as moe_gemv_bf16 (ops.linear's path at one row), widened to
 * float32, then route_token into s [T, E], weights / ids [T, K]. Returns 1 when a row's selection
 * has a NaN (the caller routes them all its way), else 0. */
int moe_route_token(const RoutePlan *a, const uint16_t *x, int64_t T, int nt) {
    const int64_t E = a->E, K = a->K, D = a->D;
    uint16_t y[E];
    float l[E];
    for (int64_t t = 0; t < T; t++) {
        moe_gemv_bf16(a->gate, E, D, a->ldw, x + t * D, a->gate_bias, y, nt);
        for (int64_t e = 0; e < E; e++) l[e] = bf16_to_f32(y[e]);
        if (route_token(l, (int)a->scoring, a->bias, E, K, a->G, a->topk_groups, (int)a->group_top2,
                        (int)a->renormalize, a->eps, a->scale, a->s + t * E, a->weights + t * K, a->ids + t * K))
            return 1;
    }
    return 0;
}

/* For each row of float32 x [R, V] (row stride ld): the index of its first NaN, else of its first
 * largest value -- what torch.max(dim=-1).indices gives on CPU (a greedy sampler's choice). One
 * pass: per lane the first index of that lane's largest value, then the smallest index among the
 * lanes holding the row's largest; a block with a NaN ends the row at its first NaN. Returns 0. */
int moe_argmax_rows(const float *x, int64_t R, int64_t V, int64_t ld, int64_t *out) {
    for (int64_t r = 0; r < R; r++) {
        const float *v = x + r * ld;
        int64_t best = -1, i = 0;
        float m = -INFINITY;
#if defined(__AVX512F__)
        if (V >= 16) {
            __m512 mv = _mm512_set1_ps(-INFINITY);
            __m512i iv = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                       14, 15);
            const __m512i sixteen = _mm512_set1_epi32(16);
            int nan_at = -1;
            for (; i + 16 <= V && V < INT32_MAX; i += 16, idx = _mm512_add_epi32(idx, sixteen)) {
                const __m512 a = _mm512_loadu_ps(v + i);
                if (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q)) { nan_at = (int)i; break; }
                const __mmask16 gt = _mm512_cmp_ps_mask(a, mv, _CMP_GT_OQ);  /* strictly larger: first stays */
                mv = _mm512_mask_mov_ps(mv, gt, a);
                iv = _mm512_mask_mov_epi32(iv, gt, idx);
            }
            if (nan_at >= 0) {
                for (int64_t j = nan_at;; j++)
                    if (v[j] != v[j]) { best = j; break; }
                out[r] = best;
                continue;
            }
            if (i > 0) {
                m = _mm512_reduce_max_ps(mv);
                const __mmask16 at = _mm512_cmp_ps_mask(mv, _mm512_set1_ps(m), _CMP_EQ_OQ);
                const __m512i cand = _mm512_mask_mov_epi32(_mm512_set1_epi32(INT32_MAX), at, iv);
                best = _mm512_reduce_min_epi32(cand);
            }
        }
#endif
        for (; i < V; i++) {
            if (v[i] != v[i]) { best = i; break; }
            if (best < 0 || v[i] > m) { m = v[i]; best = i; }
        }
        out[r] = best < 0 ? 0 : best;
    }
    return 0;
}
