/* What the tile kernels (amx.c, amx_attention.c) share: whether this build has AMX-BF16 or, without
 * it, AVX512-BF16 to do the same tile products with vdpbf16ps (amx.c only), the tile configuration,
 * and packing rows into B tiles. */
#ifndef MOE_CPU_AMX_H
#define MOE_CPU_AMX_H
#include "kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
#define HAVE_TILES 1
#include <sys/syscall.h>
#include <unistd.h>
#elif defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_TILES 1     /* amx.c's tile products on vdpbf16ps (emu_tiles, below) */
#endif

#if defined(HAVE_TILES)
#define KC 32            /* k elements per A-tile row: 64 bytes of bf16 */
#define TILE (16 * KC)   /* bf16 elements of one B tile: 16 k-pairs x 16 tokens x 2 */
/* whether m tokens leave 1-8 in their last block of 16 (the AVX512-BF16 products then use 8 lanes) */
static inline int last8(int64_t m) { return m % 16 != 0 && m % 16 <= 8; }
#endif

#if defined(HAVE_AMX)
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tiles 0-3: float32 sums for up to four token blocks; 4: weights; 5-7: tokens */
static inline void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    _tile_loadconfig(&c);
}
static inline void release_tiles(void) { _tile_release(); }
#elif defined(HAVE_TILES)
static inline void configure_tiles(void) {}
static inline void release_tiles(void) {}

/* a[0], a[1] (two bf16: one k pair) in all 16 lanes */
static inline __m512bh pair16(const uint16_t *a) {
    int32_t v;
    memcpy(&v, a, 4);
    return (__m512bh)_mm512_set1_epi32(v);
}

/* A's rows r < n at columns k .. k+31 where the products read them: in place (*la = lda), or, for
 * rows a multiple of 4 KB apart (hidden sizes of 2048, 4096: every row's line in one L1 set, so
 * the broadcasts of 16 rows evicted each other at every pair), copied once into buf (*la = KC). */
static inline const uint16_t *a_slice(const uint16_t *a, int64_t lda, int64_t k, int n, uint16_t *buf, int64_t *la) {
    if (lda % 2048) {
        *la = lda;
        return a + k;
    }
    for (int r = 0; r < n; r++) _mm512_store_si512(buf + r * KC, _mm512_loadu_si512(a + r * lda + k));
    *la = KC;
    return buf;
}

/* What a run of AMX tile products computes, on vdpbf16ps: C_j[16 rows][16 columns] (+)= A[16 rows,
 * 0:K] . B_j for j < nb, float32, C_j's row r at c + j * cj + r * ldc. A's rows at a + r * lda
 * (bf16, in place; a_slice); B_j's tiles at b + j * bstride + (k / KC) * bk (tile row p: the 16
 * columns' pairs (k + 2p, k + 2p + 1)), as the AMX kernels pack them. Each sum lane takes A's pair
 * broadcast times B's row of pairs, pair after pair along k. Blocks go in twos against 8 A rows (16
 * sums: a broadcast feeds two products), an odd last block against all 16 rows (one load of B's row
 * feeds 16). A's rows EMU_PF ahead (the block after next, in the weights' order) are prefetched into
 * L2 a line per row and k step: 16 rows read side by side stream at 14-16 GB/s on the Zen 4 EPYC,
 * 15-19 GB/s with it (decode-sized blocks).
 * l8 (last8(m)): the odd last block holds columns 0-7 only (the rest zeros: tokens past m): 8
 * lanes then, whose vdpbf16ps issue twice as fast (1.15x at 8 rows on the Zen 4 EPYC), lanes 8-15
 * stored as zeros. accumulate: add to c's sums (else they start at zero). K % 32 == 0. */
#define EMU_PF 32
static inline void emu_tiles_ex(const uint16_t *a, int64_t lda, int64_t K, const uint16_t *b, int64_t bstride,
                                int64_t bk, int nb, int l8, float *c, int64_t ldc, int64_t cj, int accumulate) {
    uint16_t buf[16 * KC] __attribute__((aligned(64)));
    int64_t la;
    if ((nb & 1) && l8 && !accumulate) {  /* 8 lanes (ymm) for the odd block's 1-8 columns, 8-15 zero */
        const int j = nb - 1;
        float *cc = c + j * cj;
        __m256 s[16];
        for (int r = 0; r < 16; r++) s[r] = _mm256_setzero_ps();
        const uint16_t *bj = b + j * bstride;
        for (int64_t k = 0; k < K; k += KC, bj += bk) {
            for (int r = 0; r < 16; r++) _mm_prefetch((const char *)(a + (EMU_PF + r) * lda + k), _MM_HINT_T1);
            const uint16_t *ak = a_slice(a, lda, k, 16, buf, &la);
            for (int p = 0; p < 16; p++) {
                const __m256bh v = (__m256bh)_mm256_loadu_si256((const __m256i *)(bj + 32 * p));
                for (int r = 0; r < 16; r++) {
                    int32_t w;
                    memcpy(&w, ak + r * la + 2 * p, 4);
                    s[r] = _mm256_dpbf16_ps(s[r], (__m256bh)_mm256_set1_epi32(w), v);
                }
            }
        }
        for (int r = 0; r < 16; r++) {
            _mm256_storeu_ps(cc + r * ldc, s[r]);
            _mm256_storeu_ps(cc + r * ldc + 8, _mm256_setzero_ps());
        }
    } else if (nb & 1) {
        const int j = nb - 1;
        float *cc = c + j * cj;
        __m512 s[16];
        for (int r = 0; r < 16; r++) s[r] = accumulate ? _mm512_loadu_ps(cc + r * ldc) : _mm512_setzero_ps();
        const uint16_t *bj = b + j * bstride;
        for (int64_t k = 0; k < K; k += KC, bj += bk) {
            for (int r = 0; r < 16; r++) _mm_prefetch((const char *)(a + (EMU_PF + r) * lda + k), _MM_HINT_T1);
            const uint16_t *ak = a_slice(a, lda, k, 16, buf, &la);
            for (int p = 0; p < 16; p++) {
                const __m512bh v = (__m512bh)_mm512_loadu_si512(bj + 32 * p);
                for (int r = 0; r < 16; r++) s[r] = _mm512_dpbf16_ps(s[r], pair16(ak + r * la + 2 * p), v);
            }
        }
        for (int r = 0; r < 16; r++) _mm512_storeu_ps(cc + r * ldc, s[r]);
    }
    for (int j = 0; j + 1 < nb; j += 2)
        for (int r0 = 0; r0 < 16; r0 += 8) {
            float *c0 = c + j * cj + r0 * ldc, *c1 = c0 + cj;
            __m512 s0[8], s1[8];
            for (int r = 0; r < 8; r++) {
                s0[r] = accumulate ? _mm512_loadu_ps(c0 + r * ldc) : _mm512_setzero_ps();
                s1[r] = accumulate ? _mm512_loadu_ps(c1 + r * ldc) : _mm512_setzero_ps();
            }
            const uint16_t *ar = a + r0 * lda, *b0 = b + j * bstride, *b1 = b0 + bstride;
            for (int64_t k = 0; k < K; k += KC, b0 += bk, b1 += bk) {
                for (int r = 0; r < 8; r++) _mm_prefetch((const char *)(ar + (EMU_PF + r) * lda + k), _MM_HINT_T1);
                const uint16_t *ak = a_slice(ar, lda, k, 8, buf, &la);
                for (int p = 0; p < 16; p++) {
                    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(b0 + 32 * p);
                    const __m512bh v1 = (__m512bh)_mm512_loadu_si512(b1 + 32 * p);
                    for (int r = 0; r < 8; r++) {
                        const __m512bh w = pair16(ak + r * la + 2 * p);
                        s0[r] = _mm512_dpbf16_ps(s0[r], w, v0);
                        s1[r] = _mm512_dpbf16_ps(s1[r], w, v1);
                    }
                }
            }
            for (int r = 0; r < 8; r++) {
                _mm512_storeu_ps(c0 + r * ldc, s0[r]);
                _mm512_storeu_ps(c1 + r * ldc, s1[r]);
            }
        }
}

/* emu_tiles_ex as the matrix kernels lay things out: B's k tiles TILE apart, c as [nb][16][16] */
static inline void emu_tiles(const uint16_t *a, int64_t lda, int64_t K, const uint16_t *b, int64_t bstride, int nb,
                             int l8, float *c, int accumulate) {
    emu_tiles_ex(a, lda, K, b, bstride, TILE, nb, l8, c, 16, 256, accumulate);
}
#endif

#if defined(HAVE_TILES)
/* A 16 x 16 block of 32-bit lanes transposed in registers: r[i] lane j <- r[j] lane i. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {  /* pairs of rows: 32-bit interleaves */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  /* 64-bit interleaves */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* each 128-bit lane q of r[i] now holds row group i/4's 4 x 4 block at columns 4q + (0..3) */
    for (int i = 0; i < 4; i++) {  /* 128-bit lanes across the four row groups */
        const __m512i a = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88), b = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        const __m512i c = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88), d = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
        t[i] = _mm512_shuffle_i32x4(a, c, 0x88);
        t[i + 8] = _mm512_shuffle_i32x4(a, c, 0xdd);
        t[i + 4] = _mm512_shuffle_i32x4(b, d, 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(b, d, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Token rows x[t, 0:K] (t < m, row stride ldx; row idx[t] when idx is given) -> B tiles
 * out[tb][K/32][16][16][2], zeros past m; chunk `c` of token block `tb` only (the caller splits
 * the chunks over threads). */
static inline void pack_chunk(const uint16_t *x, int64_t ldx, const int64_t *idx, int64_t m, int64_t K, int64_t tb,
                              int64_t c, uint16_t *out) {
    __m512i r[16];  /* token t's 16 k-pairs, turned into tile row p's pair p of every token */
    for (int t = 0; t < 16; t++) {
        const int64_t row = tb * 16 + t;
        r[t] = row < m ? _mm512_loadu_si512(x + (idx ? idx[row] : row) * ldx + c * KC) : _mm512_setzero_si512();
    }
    transpose16(r);
    uint16_t *o = out + (tb * (K / KC) + c) * TILE;
    for (int p = 0; p < 16; p++) _mm512_storeu_si512(o + p * 32, r[p]);
}

/* B tile from 32 rows of a [rows, N] matrix, 16 columns from w: tile row p holds the pairs
 * (W[2p][n], W[2p+1][n]) for the 16 n -- two rows interleaved (VNNI order along the rows). Row j
 * at w + (idx ? idx[j] : j) * ldw; rows from `rows` on read as zeros. */
static inline void pair_rows(const uint16_t *w, int64_t ldw, const int64_t *idx, int64_t rows, uint16_t *tile) {
    const __m256i z = _mm256_setzero_si256();
    for (int p = 0; p < 16; p++) {
        const int64_t r0 = 2 * p, r1 = r0 + 1;
        const __m512i lo = _mm512_cvtepu16_epi32(
            r0 < rows ? _mm256_loadu_si256((const __m256i *)(w + (idx ? idx[r0] : r0) * ldw)) : z);
        const __m512i hi = _mm512_cvtepu16_epi32(
            r1 < rows ? _mm256_loadu_si256((const __m256i *)(w + (idx ? idx[r1] : r1) * ldw)) : z);
        _mm512_storeu_si512(tile + p * 32, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}
#endif
#endif
