/* Causal attention of prompt rows over a sequence's paged KV cache on AMX tiles (prefill: a whole
 * prompt, or a chunk of it after its cached prefix).
 *
 * K and V of the sequence are packed once per call into B tiles (K: 16 keys x 32 dims in VNNI
 * pairs of dims; V: 32 keys x 16 dims in pairs of keys), read from the cache blocks through the
 * block table. A work item is 32 query rows of one head (two A tiles); it meets its keys LT at a
 * time: all scores of the LT keys (2 x 2 tiles: two query tiles x two key tiles, float32, kept in
 * the thread's cache), then a softmax over them in float32 (row max, exp, row sum; keys past a
 * row's position masked), the probabilities rounded to bf16 (as torch's CPU flash attention rounds
 * them before the product with V), then O += P . V on 2 x 2 tiles with O's float32 sums loaded
 * into the tiles (rescaled first when a later key tile raised a row's max: the online softmax of
 * flash attention, once per LT keys rather than per small block). The output is O / sum, rounded
 * to bf16. Items go longest first, the heads of one KV head next to each other (its packed K/V
 * stay in cache). Scores, sums and the product are those of the float32 reference up to the order
 * of float32 sums, the exp polynomial and P's rounding. Without AMX, on AVX512-BF16 (Zen 4), the
 * two products run on vdpbf16ps through amx.h's emu_tiles_ex over the same packed K and V, the
 * rest unchanged: 3.0-3.6x torch's CPU flash attention there (64-2048-token prompts; that kernel
 * widens bf16 to float32 for MKL's sgemm on this CPU). */
#include "amx.h"

#if defined(HAVE_TILES)
#define QT 32      /* query rows per work item: two A tiles */
#define LT 512     /* keys per softmax pass */
#define SLD (LT + 16)  /* row strides of the score (float32) and probability (bf16) buffers, padded: */
#define PLD (LT + 32)  /* rows 2 or 4 KB apart would share a few L1 sets */

/* S[32][nk32] = qb[32][D] . keys t0 .. t0+nk32-1 (kp: B tiles [key block of 16][D/32]), float32 */
#if defined(HAVE_AMX)
static void scores(const uint16_t *qb, int64_t D, const uint16_t *kp, int64_t t0, int64_t nk32, float *S) {
    const int64_t nc = D / KC;
    for (int64_t j = 0; j < nk32; j += 32) {
        const uint16_t *b = kp + ((t0 + j) / 16) * nc * TILE;  /* key blocks j and j+16: nc tiles each */
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t c = 0; c < nc; c++) {
            if (j + 32 < nk32) {  /* the next two key blocks' tiles of this step, into L1 */
                const char *pa = (const char *)(b + (2 * nc + c) * TILE), *pb = (const char *)(b + (3 * nc + c) * TILE);
                for (int l = 0; l < 16; l++) {
                    _mm_prefetch(pa + l * 64, _MM_HINT_T0);
                    _mm_prefetch(pb + l * 64, _MM_HINT_T0);
                }
            }
            _tile_loadd(4, qb + c * KC, D * 2);
            _tile_loadd(6, b + c * TILE, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, b + (nc + c) * TILE, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, qb + 16 * D + c * KC, D * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, S + j, SLD * 4);
        _tile_stored(1, S + j + 16, SLD * 4);
        _tile_stored(2, S + 16 * SLD + j, SLD * 4);
        _tile_stored(3, S + 16 * SLD + j + 16, SLD * 4);
    }
}
#else
/* (without AMX: vdpbf16ps, the 16-key blocks as emu_tiles' B operand, 16 query rows at a time) */
static void scores(const uint16_t *qb, int64_t D, const uint16_t *kp, int64_t t0, int64_t nk32, float *S) {
    const int64_t nc = D / KC;
    for (int h = 0; h < 2; h++)
        emu_tiles_ex(qb + h * 16 * D, D, D, kp + (t0 / 16) * nc * TILE, nc * TILE, TILE, (int)(nk32 / 16), 0,
                     S + h * 16 * SLD, SLD, 16, 0);
}
#endif

/* The bits of the 16 keys j .. j+15 that fall in [lo, hi) */
static inline __mmask16 span16(int64_t j, int64_t lo, int64_t hi) {
    const int64_t a = lo - j < 0 ? 0 : lo - j > 16 ? 16 : lo - j, b = hi - j < 0 ? 0 : hi - j > 16 ? 16 : hi - j;
    return (__mmask16)(((1u << b) - 1) & ~((1u << a) - 1));
}

/* Row r's softmax step over its visible scores s[lo:hi) (of nk32; lo > 0 under a sliding window):
 * the running max mrow and sum lrow updated, bf16 probabilities into p[0:nk32] (zeros outside);
 * returns the factor the row's earlier sums take (exp(old max - new max)). A row that sees every
 * score of the pass (all but the diagonal's and a window's edge) takes them without masks. */
static float softmax_row(const float *s, int64_t lo, int64_t hi, int64_t nk32, float scale, float *mrow, float *lrow,
                         uint16_t *p) {
    const int whole = lo == 0 && hi == nk32;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    if (whole) {
        __m512 m1 = mx;
        for (int64_t j = 0; j < nk32; j += 32) {
            mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
            m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + j + 16));
        }
        mx = _mm512_max_ps(mx, m1);
    } else {
        for (int64_t j = lo / 16 * 16; j < hi; j += 16) {
            const __mmask16 mk = span16(j, lo, hi);
            mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_maskz_loadu_ps(mk, s + j));
        }
    }
    const float mnew = fmaxf(*mrow, _mm512_reduce_max_ps(mx) * scale);  /* scale > 0 */
    /* exp(s * scale - mnew) = 2^(s * scale * log2(e) - mnew * log2(e)) */
    const __m512 sc = _mm512_set1_ps(scale * 1.44269504088896341f), nm = _mm512_set1_ps(-mnew * 1.44269504088896341f);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < nk32; j += 32) {
        const __mmask16 m0 = whole ? 0xffff : span16(j, lo, hi), m1 = whole ? 0xffff : span16(j + 16, lo, hi);
        if (!(m0 | m1)) {
            _mm512_storeu_si512(p + j, _mm512_setzero_si512());
            continue;
        }
        const __m512 p0 = _mm512_maskz_mov_ps(m0, exp2_16(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), sc, nm)));
        const __m512 p1 = _mm512_maskz_mov_ps(m1, exp2_16(_mm512_fmadd_ps(_mm512_loadu_ps(s + j + 16), sc, nm)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
        _mm512_storeu_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
    const float a = *mrow == -INFINITY ? 0.f : expf(*mrow - mnew);
    *lrow = *lrow * a + _mm512_reduce_add_ps(sum);
    *mrow = mnew;
    return a;
}

/* O[32][Dv] (+)= P[32][nk32] . values t0 .. t0+nk32-1 (vp: B tiles [key block of 32][Dv/16]);
 * `first`: O starts from zero instead of its stored sums */
#if defined(HAVE_AMX)
static void pv(const uint16_t *P, const uint16_t *vp, int64_t t0, int64_t nk32, int64_t Dv, int first, float *O) {
    const int64_t nd = Dv / 16;
    for (int64_t n = 0; n < nd; n += 2) {
        float *o = O + n * 16;
        if (first) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
        } else {
            _tile_loadd(0, o, Dv * 4);
            _tile_loadd(1, o + 16, Dv * 4);
            _tile_loadd(2, o + 16 * Dv, Dv * 4);
            _tile_loadd(3, o + 16 * Dv + 16, Dv * 4);
        }
        const uint16_t *vb = vp + ((t0 / 32) * nd + n) * TILE;
        for (int64_t kk = 0; kk < nk32; kk += 32, vb += nd * TILE) {
            if (kk + 32 < nk32)  /* the next step's two V tiles (contiguous), into L1 */
                for (int l = 0; l < 32; l++) _mm_prefetch((const char *)(vb + nd * TILE) + l * 64, _MM_HINT_T0);
            _tile_loadd(4, P + kk, PLD * 2);
            _tile_loadd(6, vb, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, vb + TILE, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, P + 16 * PLD + kk, PLD * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, o, Dv * 4);
        _tile_stored(1, o + 16, Dv * 4);
        _tile_stored(2, o + 16 * Dv, Dv * 4);
        _tile_stored(3, o + 16 * Dv + 16, Dv * 4);
    }
}
#else
/* (without AMX: the 16-dim blocks of V as emu_tiles' B operand, k running over keys in pairs) */
static void pv(const uint16_t *P, const uint16_t *vp, int64_t t0, int64_t nk32, int64_t Dv, int first, float *O) {
    const int64_t nd = Dv / 16;
    for (int h = 0; h < 2; h++)
        emu_tiles_ex(P + h * 16 * PLD, PLD, nk32, vp + (t0 / 32) * nd * TILE, TILE, nd * TILE, (int)nd, 0,
                     O + h * 16 * Dv, Dv, 16, !first);
}
#endif

/* One work item: the m <= 32 query rows in qb [32][D] (zeros past m), row r at position pos0 + r
 * (it sees keys pos0 + r - window + 1 .. pos0 + r; window 0: from key 0), over the packed keys/values
 * of its KV head; the head's sink (NULL: none) is one more logit in each row's softmax, with no
 * value. Out row r at out + r * so_t (bf16). Scratch: S [32][SLD] float32, P [32][PLD] bf16, O [32][Dv]
 * float32. */
static void attend(const uint16_t *qb, int64_t m, int64_t pos0, int64_t window, const float *sink, int64_t D,
                   int64_t Dv, const uint16_t *kp, const uint16_t *vp, float scale, float *S, uint16_t *P, float *O,
                   uint16_t *out, int64_t so_t) {
    const int64_t nkeys = pos0 + m;
    /* the first key any row sees, down to a 32-key boundary (V's packed blocks) */
    const int64_t tbeg = window > 0 && pos0 - window + 1 > 0 ? (pos0 - window + 1) / 32 * 32 : 0;
    float mrow[QT], lrow[QT], alpha[QT];
    for (int r = 0; r < QT; r++) {
        mrow[r] = -INFINITY;
        lrow[r] = 0.f;
    }
    for (int64_t t0 = tbeg; t0 < nkeys; t0 += LT) {
        const int64_t nk = nkeys - t0 < LT ? nkeys - t0 : LT, nk32 = (nk + 31) / 32 * 32;
        scores(qb, D, kp, t0, nk32, S);
        for (int64_t r = 0; r < m; r++) {
            int64_t hi = pos0 + r - t0 + 1, lo = window > 0 ? pos0 + r - window + 1 - t0 : 0;  /* in this tile */
            if (hi > nk) hi = nk;
            if (lo < 0) lo = 0;
            if (hi <= lo) {  /* none of the row's keys in this tile: no weight, no rescale */
                memset(P + r * PLD, 0, sizeof(uint16_t) * nk32);
                alpha[r] = 1.f;
            } else {
                alpha[r] = softmax_row(S + r * SLD, lo, hi, nk32, scale, &mrow[r], &lrow[r], P + r * PLD);
            }
        }
        if (t0 > tbeg)
            for (int64_t r = 0; r < m; r++) {
                if (alpha[r] == 1.f) continue;
                const __m512 a = _mm512_set1_ps(alpha[r]);
                for (int64_t d = 0; d < Dv; d += 16)
                    _mm512_storeu_ps(O + r * Dv + d, _mm512_mul_ps(_mm512_loadu_ps(O + r * Dv + d), a));
            }
        pv(P, vp, t0, nk32, Dv, t0 == tbeg, O);
    }
    for (int64_t r = 0; r < m; r++) {
        const float l = lrow[r] + (sink ? expf(*sink - mrow[r]) : 0.f);
        const __m512 inv = _mm512_set1_ps(1.f / l);
        for (int64_t d = 0; d < Dv; d += 16)
            store16(out + r * so_t + d, _mm512_mul_ps(_mm512_loadu_ps(O + r * Dv + d), inv), BF16);
    }
}
#endif

/* out[i, h, :] = softmax(scale * q[i, h] . K[lo:j+1]) . V[lo:j+1] for the Q prompt rows i of one
 * sequence, row i at position j = L - Q + i of its L >= Q cached tokens, K/V of KV head h / (H / Hkv),
 * lo = j - window + 1 under a sliding window (window > 0), else 0; with sinks (float32 [H], or NULL)
 * head h's softmax has sinks[h] as one more logit (unscaled), with no value. bf16 throughout: q[i, h,
 * d] at q + i*sq_t + h*sq_h + d; token t of the cache at block bt[t / bs], slot t % bs: K row at k +
 * bt[t/bs]*sk_b + (t%bs)*sk_t + hk*sk_h (D dims), V likewise (Dv dims; V may be K's leading dims,
 * MLA's latent cache); out[i, h, :] at out + i*so_t + h*so_h. Needs D % 32 == Dv % 32 == 0. Scratch:
 * kp of Hkv * ceil(L/32)*32 * D bf16, vp of the same with Dv. With fp8 (else NULL) the caches hold fp8
 * rows (kvcache/fp8.py: e4m3, strides in bytes, a scale per row in *fp8), widened to bf16 first as
 * dequantize_fp8 widens them. Returns 0, -1 when built without AMX, -3 when out of memory. */
int moe_amx_prefill_attention(const uint16_t *q, int64_t sq_t, int64_t sq_h, const uint16_t *k, int64_t sk_b,
                              int64_t sk_t, int64_t sk_h, const uint16_t *v, int64_t sv_b, int64_t sv_t, int64_t sv_h,
                              int64_t bs, const int32_t *bt, uint16_t *out, int64_t so_t, int64_t so_h, int64_t Q,
                              int64_t L, int64_t H, int64_t Hkv, int64_t D, int64_t Dv, int64_t window,
                              const float *sinks, const Fp8Scales *fp8, float scale, uint16_t *kp, uint16_t *vp,
                              int num_threads) {
#if defined(HAVE_TILES)
    const int64_t Lp = (L + 31) / 32 * 32, nc = D / KC, nkb = Lp / 16, nvb = Lp / 32, nd = Dv / 16;
    const int64_t group = H / Hkv, nqt = (Q + QT - 1) / QT;
    /* keys before the first row's window are never read: not packed (from a 32-key boundary) */
    const int64_t kb0 = window > 0 && L - Q - window + 1 > 0 ? (L - Q - window + 1) / 32 : 0;
    int64_t *koff = malloc(sizeof(int64_t) * 2 * (size_t)L), *voff = koff + L;  /* token -> row offset */
    if (!koff) return -3;
    for (int64_t t = 0; t < L; t++) {
        koff[t] = bt[t / bs] * sk_b + (t % bs) * sk_t;
        voff[t] = bt[t / bs] * sv_b + (t % bs) * sv_t;
    }
    uint16_t *deq = NULL;
    if (fp8) {
        /* fp8 rows (strides in bytes): the ones packed below widened to bf16 rows [L][Hkv][D] (and V's
         * [L][Hkv][Dv] unless V is K's leading dims, MLA's latent) as kvcache/fp8.py's dequantize_fp8
         * widens them for SDPA: bf16(value * bf16(the row's scale)) */
        const int v_in_k = v == k && sv_b == sk_b && sv_t == sk_t && sv_h == sk_h;
        deq = malloc(sizeof(uint16_t) * (size_t)(L * Hkv * (D + (v_in_k ? 0 : Dv))));
        if (!deq) {
            free(koff);
            return -3;
        }
        uint16_t *vdeq = v_in_k ? deq : deq + L * Hkv * D;
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t t = 32 * kb0; t < L; t++)
            for (int64_t h = 0; h < Hkv; h++) {
                const int64_t at = bt[t / bs] * fp8->sblock + (t % bs) * fp8->sslot + h * fp8->shead;
                const float ks = bf16_to_f32(f32_to_bf16(fp8->k[at])), vs = bf16_to_f32(f32_to_bf16(fp8->v[at]));
                const uint8_t *kr = (const uint8_t *)k + koff[t] + h * sk_h;
                const uint8_t *vr = (const uint8_t *)v + voff[t] + h * sv_h;
                uint16_t *kd = deq + (t * Hkv + h) * D, *vd = vdeq + (t * Hkv + h) * Dv;
                for (int64_t i = 0; i < D; i++) kd[i] = f32_to_bf16(e4m3_to_f32(kr[i]) * ks);
                if (!v_in_k)
                    for (int64_t i = 0; i < Dv; i++) vd[i] = f32_to_bf16(e4m3_to_f32(vr[i]) * vs);
            }
        for (int64_t t = 0; t < L; t++) {
            koff[t] = t * Hkv * D;
            voff[t] = t * Hkv * (v_in_k ? D : Dv);
        }
        k = deq, sk_h = D, v = vdeq, sv_h = v_in_k ? D : Dv;
    }
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < Hkv * (nkb - 2 * kb0) * nc; i++) {  /* K: (head, block of 16 keys, 32 dims) */
            const int64_t hk = i / ((nkb - 2 * kb0) * nc), loc = i % ((nkb - 2 * kb0) * nc) + 2 * kb0 * nc;
            pack_chunk(k + hk * sk_h, 1, koff, L, D, loc / nc, loc % nc, kp + hk * Lp * D);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < Hkv * (nvb - kb0) * nd; i++) {  /* V: (head, 32 keys, 16 dims) */
            const int64_t hk = i / ((nvb - kb0) * nd), kb = (i / nd) % (nvb - kb0) + kb0, n = i % nd;
            pair_rows(v + hk * sv_h + n * 16, 1, voff + kb * 32, L - kb * 32,  /* keys past L: zeros */
                      vp + hk * Lp * Dv + (kb * nd + n) * TILE);
        }
        uint16_t *qb = aligned_alloc(64, sizeof(uint16_t) * QT * D), *P = aligned_alloc(64, sizeof(uint16_t) * QT * PLD);
        float *S = aligned_alloc(64, sizeof(float) * QT * SLD), *O = aligned_alloc(64, sizeof(float) * QT * Dv);
        if (!qb || !P || !S || !O) {
#pragma omp atomic write
            failed = 1;
        } else {
            configure_tiles();
            memset(P, 0, sizeof(uint16_t) * QT * PLD);  /* rows past a short item's m stay finite */
        }
#pragma omp barrier
        if (!failed) {
            /* the longest rows (last query tiles) first; the heads of one KV head next to each other */
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < H * nqt; i++) {
                const int64_t qi = nqt - 1 - i / H, h = i % H, q0 = qi * QT, m = Q - q0 < QT ? Q - q0 : QT;
                for (int64_t r = 0; r < QT; r++) {
                    if (r < m) memcpy(qb + r * D, q + (q0 + r) * sq_t + h * sq_h, sizeof(uint16_t) * D);
                    else memset(qb + r * D, 0, sizeof(uint16_t) * D);
                }
                const int64_t hk = h / group;
                attend(qb, m, L - Q + q0, window, sinks ? sinks + h : NULL, D, Dv, kp + hk * Lp * D, vp + hk * Lp * Dv, scale, S, P, O,
                       out + q0 * so_t + h * so_h, so_t);
            }
            release_tiles();
        }
        free(qb);
        free(P);
        free(S);
        free(O);
    }
    free(koff);
    free(deq);
    return failed ? -3 : 0;
#else
    (void)q; (void)sq_t; (void)sq_h; (void)k; (void)sk_b; (void)sk_t; (void)sk_h; (void)v; (void)sv_b; (void)sv_t;
    (void)sv_h; (void)bs; (void)bt; (void)out; (void)so_t; (void)so_h; (void)Q; (void)L; (void)H; (void)Hkv; (void)D;
    (void)Dv; (void)window; (void)sinks; (void)fp8; (void)scale; (void)kp; (void)vp; (void)num_threads;
    return -1;
#endif
}
