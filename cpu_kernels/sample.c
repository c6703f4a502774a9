/* Sampling a token from each row of logits: temperature, top-k, top-p, min-p, one keyed uniform draw.
 *
 * The draw of sequence key k at position p is SplitMix64's output p + 1 of stream k (ops/sample.py's
 * keyed_uniform computes the same 53 bits in Python), so a token depends on its sequence, its position
 * and its logits alone: not on the batch, the step it ran in, or how many steps one call ran. The token
 * is the inverse CDF of the filtered distribution at that uniform, over the kept tokens in token order.
 * ops/sample.py's draw_rows_torch is the torch reference: the same kept tokens and the same uniform
 * (its exp and sums rounded differently: a uniform within rounding of the edge between two tokens may
 * pick the other one). */
#include "kernels.h"

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* uniform in [0, 1): the top 53 bits of SplitMix64's output pos + 1 of stream key */
static inline double keyed_uniform(uint64_t key, int64_t pos) {
    return (double)(mix64(key + (uint64_t)(pos + 1) * 0x9E3779B97F4A7C15ull) >> 11) * 0x1.0p-53;
}

static inline void swap2(float *v, int32_t *ix, int64_t i, int64_t j) {
    const float t = v[i];
    v[i] = v[j];
    v[j] = t;
    const int32_t u = ix[i];
    ix[i] = ix[j];
    ix[j] = u;
}

/* [lo, hi) rearranged around the median of its first, middle and last values: [lo, *a) larger,
 * [*a, *b) equal (never empty: the pivot is one of them), [*b, hi) smaller */
static void partition3(float *v, int32_t *ix, int64_t lo, int64_t hi, int64_t *a, int64_t *b) {
    const float x = v[lo], y = v[lo + (hi - lo) / 2], z = v[hi - 1];
    const float piv = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
    int64_t lt = lo, i = lo, gt = hi;
    while (i < gt) {
        if (v[i] > piv) swap2(v, ix, lt++, i++);
        else if (v[i] < piv) swap2(v, ix, i, --gt);
        else i++;
    }
    *a = lt;
    *b = gt;
}

/* the k largest of [0, n) moved to [0, k) (quickselect) */
static void keep_top_k(float *v, int32_t *ix, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n;
    while (hi - lo > 1) {
        int64_t a, b;
        partition3(v, ix, lo, hi, &a, &b);
        if (k <= a) hi = a;
        else if (k <= b) break;
        else lo = b;
    }
}

/* The fewest largest of [0, n) whose mass reaches target, moved to [0, K): largest first, the tokens
 * whose mass before them is below target. Selection by mass: the answer stays in the unsettled range
 * [lo, hi) with acc the mass settled above it, acc < target <= acc + mass of [lo, hi). Returns K >= 1. */
static int64_t keep_mass(float *v, int32_t *ix, int64_t n, double target) {
    double acc = 0;
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t a, b;
        partition3(v, ix, lo, hi, &a, &b);
        double above = 0;
        for (int64_t i = lo; i < a; i++) above += v[i];
        if (acc + above >= target) {
            hi = a;  /* (a > lo: acc < target) */
            continue;
        }
        acc += above;
        const double each = v[a], need = target - acc;
        if ((double)(b - a) * each >= need) {
            int64_t m = (int64_t)ceil(need / each);
            m = m < 1 ? 1 : (m > b - a ? b - a : m);
            return a + m;
        }
        acc += (double)(b - a) * each;
        lo = b;
    }
    return lo > 0 ? lo : (n > 0 ? 1 : 0);  /* (rounding left the target above every mass: all settled) */
}

/* A row's kept tokens: e > lo, and of those with e == lo the first ties in token order. */
typedef struct {
    float lo;
    int64_t ties;
} Kept;

static inline int kept(float x, Kept k, int64_t *ties_seen) {
    return x > k.lo || (x == k.lo && (*ties_seen)++ < k.ties);
}

/* The kept tokens listed in v / ix [0, n): as Kept (the least of them, and how many equal it). */
static Kept kept_of(const float *v, int64_t n) {
    Kept out = {v[0], 0};
    for (int64_t i = 1; i < n; i++) out.lo = v[i] < out.lo ? v[i] : out.lo;
    for (int64_t i = 0; i < n; i++) out.ties += v[i] == out.lo;
    return out;
}

#define SHIFT 20
#define NBUCKETS 1024
/* the bucket of 0 <= x <= 1: its bits' top 12 (sign 0, exponent, 3 mantissa bits), monotone in x */
static inline int bucket_of(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (int)(u >> SHIFT);
}

static inline float bucket_floor(int b) {
    const uint32_t u = (uint32_t)b << SHIFT;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* Every token's e narrowed to the largest: the fewest whose count reaches k (by_mass 0), or whose
 * mass reaches p times all of it (by_mass 1). One pass counts the tokens and adds their mass by bucket
 * of e (two histograms, even and odd tokens, so that neighbours in one bucket do not wait on each
 * other); from the top bucket down, the bucket B where the count or mass is reached is the only one to
 * select in: a second pass lists B's tokens (and with list, the ones above it) in v / ix, and
 * keep_top_k / keep_mass pick B's part. Returns the kept tokens as Kept; with list, v / ix [0, *n)
 * list them. v, ix: V + 64 entries (vector stores run up to 16 past what they keep). */
static Kept narrow(const float *e, int64_t V, int by_mass, double amount, float *v, int32_t *ix, int list,
                   int64_t *n) {
    int32_t cnt[2][NBUCKETS];
    float mass[2][NBUCKETS];
    memset(cnt, 0, sizeof cnt);
    memset(mass, 0, sizeof mass);
    int64_t i = 0;
    for (; i + 2 <= V; i += 2) {
        const int b0 = bucket_of(e[i]), b1 = bucket_of(e[i + 1]);
        cnt[0][b0]++;
        mass[0][b0] += e[i];
        cnt[1][b1]++;
        mass[1][b1] += e[i + 1];
    }
    if (i < V) {
        cnt[0][bucket_of(e[i])]++;
        mass[0][bucket_of(e[i])] += e[i];
    }
    if (by_mass) {
        double total = 0;
        for (int b = 0; b < NBUCKETS; b++) total += (double)mass[0][b] + (double)mass[1][b];
        amount *= total;
    }
    int64_t n_above = 0;
    double m_above = 0;
    int B = NBUCKETS - 1;
    for (; B > 0; B--) {
        const int64_t c = cnt[0][B] + cnt[1][B];
        const double m = (double)mass[0][B] + (double)mass[1][B];
        if (by_mass ? m_above + m >= amount : (double)(n_above + c) >= amount) break;
        n_above += c;
        m_above += m;
    }
    const int64_t nb = cnt[0][B] + cnt[1][B];
    const float lo = bucket_floor(B), hi = bucket_floor(B + 1);
    const int64_t at = list ? n_above + 16 : 0;  /* B's tokens: [at, at + nb) */
    int64_t a = 0, b = at;
    i = 0;
#if defined(__AVX512F__)
    __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi);
    for (; i + 16 <= V; i += 16, iv = _mm512_add_epi32(iv, _mm512_set1_epi32(16))) {
        const __m512 x = _mm512_loadu_ps(e + i);
        const __mmask16 ge = _mm512_cmp_ps_mask(x, lov, _CMP_GE_OQ), up = _mm512_cmp_ps_mask(x, hiv, _CMP_GE_OQ);
        const __mmask16 in = ge & ~up;
        /* (compressed in registers, stored whole: a compress straight to memory is slow on some CPUs) */
        if (list && up) {
            _mm512_storeu_ps(v + a, _mm512_maskz_compress_ps(up, x));
            _mm512_storeu_si512(ix + a, _mm512_maskz_compress_epi32(up, iv));
            a += __builtin_popcount(up);
        }
        if (in) {
            _mm512_storeu_ps(v + b, _mm512_maskz_compress_ps(in, x));
            _mm512_storeu_si512(ix + b, _mm512_maskz_compress_epi32(in, iv));
            b += __builtin_popcount(in);
        }
    }
#endif
    for (; i < V; i++) {
        if (e[i] >= hi) {
            if (list) {
                v[a] = e[i];
                ix[a++] = (int32_t)i;
            }
        } else if (e[i] >= lo) {
            v[b] = e[i];
            ix[b++] = (int32_t)i;
        }
    }
    int64_t K;
    if (by_mass) {
        K = keep_mass(v + at, ix + at, nb, amount - m_above);
    } else {
        K = (int64_t)amount - n_above;
        K = K < 1 ? 1 : (K > nb ? nb : K);
        keep_top_k(v + at, ix + at, nb, K);
    }
    const Kept out = kept_of(v + at, K);  /* (every token above B is larger than B's least) */
    if (list) {
        memmove(v + n_above, v + at, (size_t)K * sizeof(float));
        memmove(ix + n_above, ix + at, (size_t)K * sizeof(int32_t));
        *n = n_above + K;
    }
    return out;
}

/* exp((l[i] - m) / t) for i < V into e (each <= 1, the largest 1) */
static void scaled_exp(const float *l, int64_t V, float m, float t, float *e) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 mv = _mm512_set1_ps(m), tv = _mm512_set1_ps(t);
    for (; i + 16 <= V; i += 16)
        _mm512_storeu_ps(e + i, exp16(_mm512_div_ps(_mm512_sub_ps(_mm512_loadu_ps(l + i), mv), tv)));
#elif defined(VEC8)
    const __m256 mv = _mm256_set1_ps(m), tv = _mm256_set1_ps(t);
    for (; i + 8 <= V; i += 8)
        _mm256_storeu_ps(e + i, exp8(_mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(l + i), mv), tv)));
#endif
    for (; i < V; i++) e[i] = expf((l[i] - m) / t);
}

/* The kept token where the kept tokens' cumulative mass (token order) first exceeds u times their mass
 * (fallback: the last kept one with mass, else dflt). With AVX-512, 16 tokens at a time: a block whose
 * kept mass stays below the target is added whole; the block that passes it, and any block with a
 * tie at lo, token by token. */
static int64_t draw(const float *e, int64_t V, Kept k, double u, int64_t dflt) {
    int64_t i = 0, seen = 0, last = dflt;
    double total = 0;
#if defined(__AVX512F__)
    const __m512 lo = _mm512_set1_ps(k.lo);
    __m512 sum = _mm512_setzero_ps();
    int64_t eq = 0;
    for (; i + 16 <= V; i += 16) {
        const __m512 x = _mm512_loadu_ps(e + i);
        sum = _mm512_mask_add_ps(sum, _mm512_cmp_ps_mask(x, lo, _CMP_GT_OQ), sum, x);
        eq += __builtin_popcount(_mm512_cmp_ps_mask(x, lo, _CMP_EQ_OQ));
    }
    total = (double)_mm512_reduce_add_ps(sum) + (double)k.lo * (double)(eq < k.ties ? eq : k.ties);
    seen = eq;
#endif
    for (; i < V; i++)
        if (kept(e[i], k, &seen)) total += e[i];
    const double target = u * total;
    double acc = 0;
    i = 0;
    seen = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= V; i += 16) {
        const __m512 x = _mm512_loadu_ps(e + i);
        if (!_mm512_cmp_ps_mask(x, lo, _CMP_EQ_OQ)) {
            const __mmask16 gt = _mm512_cmp_ps_mask(x, lo, _CMP_GT_OQ);
            if (!gt) continue;
            const double block = (double)_mm512_mask_reduce_add_ps(gt, x);
            if (acc + block <= target) {
                acc += block;
                last = i + 31 - __builtin_clz((unsigned)gt);
                continue;
            }
        }
        for (int64_t j = i; j < i + 16; j++) {
            if (!kept(e[j], k, &seen) || e[j] == 0) continue;
            acc += e[j];
            last = j;
            if (acc > target) return j;
        }
    }
#endif
    for (; i < V; i++) {
        if (!kept(e[i], k, &seen) || e[i] == 0) continue;
        acc += e[i];
        last = i;
        if (acc > target) return i;
    }
    return last;  /* (rounding: the target at the very top) */
}

/* One row's token (see moe_sample_rows); e: scratch of V floats, v / ix: V + 64 floats / int32 */
static int64_t sample_row(const float *l, int64_t V, const SampleRow *s, int64_t pos, float *e, float *v,
                          int32_t *ix) {
    int64_t best;
    moe_argmax_rows(l, 1, V, V, &best);  /* the first NaN, else the first largest */
    const float m = l[best];
    if (!(s->temperature > 0) || m != m || m == INFINITY || m == -INFINITY) return best;  /* greedy; no spread */
    scaled_exp(l, V, m, s->temperature, e);
    Kept k = {0.f, V};  /* every token */
    const int top_k = s->top_k > 0 && s->top_k < V, top_p = s->top_p < 1;
    if (top_k || top_p) {
        int64_t n = 0;
        k = narrow(e, V, !top_k, top_k ? (double)s->top_k : s->top_p, v, ix, top_k && top_p, &n);
        if (top_k && top_p) {  /* top-p over the top-k tokens' mass */
            double total = 0;
            for (int64_t i = 0; i < n; i++) total += v[i];
            k = kept_of(v, keep_mass(v, ix, n, s->top_p * total));
        }
    }
    if (s->min_p > k.lo) k = (Kept){s->min_p, V};  /* min-p: at least min_p times the largest (1) */
    return draw(e, V, k, keyed_uniform((uint64_t)s->key, pos), best);
}

/* For each row r of float32 logits x [R, V] (row stride ld): a token drawn from it as rows[r] says, at
 * position pos[r] of its sequence: temperature 0 takes the greedy choice (the first NaN, else the first
 * largest: moe_argmax_rows'); otherwise softmax(x / temperature), the top_k largest kept (0: all), of
 * those the fewest largest whose mass reaches top_p (1: all), of those the ones at least min_p times the
 * largest, and the token where the kept tokens' cumulative mass first exceeds u * their mass, u the
 * keyed uniform of (key, pos[r]), summed in token order (of tied tokens at the edge of the kept ones,
 * the first in token order are kept). A row with a NaN takes its first NaN, one whose largest is
 * infinite its first largest. scratch: R (2 V + 64) floats and R (V + 64) int32 (rows drawn in parallel
 * over threads). */
int moe_sample_rows(const float *x, int64_t R, int64_t V, int64_t ld, const SampleRow *rows, const int64_t *pos,
                    float *scratch, int32_t *iscratch, int64_t *out, int nt) {
    if (V < 1 || V > INT32_MAX) return -1;
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (R > 1 && nt > 1)
    for (int64_t r = 0; r < R; r++)
        out[r] = sample_row(x + r * ld, V, rows + r, pos[r], scratch + r * (2 * V + 64),
                            scratch + r * (2 * V + 64) + V, iscratch + r * (V + 64));
    return 0;
}

/* Row r of float32 logits x [R, V] (row stride ld) changed in place as the sampler's logit processing
 * changes it (moe/sampler.py process_logits: float32, each op rounded): its biases added, then where
 * repetition != 1 every seen token's logit divided by it (positive) or multiplied (otherwise), then
 * where presence or frequency is set (logit - count * frequency) - (count > 0 ? presence : 0); then the
 * tokens its grammar's mask disallows -inf; then while ban_left > 0 its banned tokens' logits -inf (the
 * sampler's min_tokens ban). */
void moe_penalize_rows(float *x, int64_t R, int64_t V, int64_t ld, const SampleRow *rows) {
    for (int64_t r = 0; r < R; r++) {
        const SampleRow *s = rows + r;
        float *l = x + r * ld;
        for (int64_t j = 0; j < s->n_bias; j++) l[s->bias_ids[j]] += s->bias_vals[j];
        if (s->repetition != 1 && s->seen)
            for (int64_t v = 0; v < V; v++)
                if (s->seen[v]) l[v] = l[v] > 0 ? l[v] / s->repetition : l[v] * s->repetition;
        if ((s->frequency != 0 || s->presence != 0) && s->counts)
            for (int64_t v = 0; v < V; v++) {
                const float c = (float)s->counts[v];
                l[v] = (l[v] - c * s->frequency) - (s->counts[v] > 0 ? s->presence : 0.f);
            }
        if (s->mask)
            for (int64_t v = 0; v < V; v++)
                if (!((uint32_t)s->mask[v >> 5] >> (v & 31) & 1u)) l[v] = -INFINITY;
        if (s->ban_left > 0)
            for (int64_t j = 0; j < s->n_ban; j++) l[s->ban_ids[j]] = -INFINITY;
    }
}

/* Each row's chosen token counted in its output (counts, seen), where the row keeps them; one token
 * fewer before its ban lifts. */
void moe_note_tokens(SampleRow *rows, int64_t R, const int64_t *tokens) {
    for (int64_t r = 0; r < R; r++) {
        if (rows[r].ban_left > 0) rows[r].ban_left--;
        if (rows[r].counts) rows[r].counts[tokens[r]]++;
        if (rows[r].seen) rows[r].seen[tokens[r]] = 1;
    }
}

/* keyed_uniform of (keys[i], pos[i]) for i < n (a check on ops/sample.py's keyed_uniform) */
int moe_keyed_uniform(const int64_t *keys, const int64_t *pos, int64_t n, double *out) {
    for (int64_t i = 0; i < n; i++) out[i] = keyed_uniform((uint64_t)keys[i], pos[i]);
    return 0;
}

/* y (token idx) entered into the sorted top list tv / ti of *k <= n entries if it is above the last of
 * a full list (so earlier ties stay first) */
static inline void enter_top(float *tv, int64_t *ti, int64_t *k, int64_t n, float y, int64_t idx) {
    if (*k == n && !(y > tv[n - 1])) return;
    int64_t p = *k < n ? (*k)++ : n - 1;
    for (; p > 0 && tv[p - 1] < y; p--) {
        tv[p] = tv[p - 1];
        ti[p] = ti[p - 1];
    }
    tv[p] = y;
    ti[p] = idx;
}

/* Row r's log-softmax over float32 logits x [R, V] (row stride ld) at chosen[r] and at its n <= 64
 * largest logits (largest first, ties in token order), written to ids / vals [r (n + 1), (r + 1) (n + 1)):
 * chosen first. Each value is (x - m) - log(s) as torch's log_softmax forms it, m the row's largest and
 * s the sum of exp(x - m) (float32 lanes over 512 tokens at a time, then double). Returns 0, 1 where some row's largest is NaN or
 * infinite (its log-softmax is NaN: the caller takes torch's), -1 for n outside [0, 64]. */
int moe_logprob_rows(const float *x, int64_t R, int64_t V, int64_t ld, const int64_t *chosen, int64_t n,
                     int64_t *ids, float *vals, int nt) {
    if (V < 1 || n < 0 || n > 64) return -1;
    int bad = 0;
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (R > 1 && nt > 1) reduction(| : bad)
    for (int64_t r = 0; r < R; r++) {
        const float *l = x + r * ld;
        int64_t best;
        moe_argmax_rows(l, 1, V, V, &best);
        const float m = l[best];
        if (m != m || m == INFINITY || m == -INFINITY) {
            bad = 1;
            continue;
        }
        float tv[64];
        int64_t ti[64], k = 0, i = 0;
        double s = 0;
#if defined(__AVX512F__)
        /* one pass: the sum, and the list entered only by lanes above its last once it is full */
        const __m512 mv = _mm512_set1_ps(m);
        __m512 acc = _mm512_setzero_ps();
        for (; i + 16 <= V; i += 16) {
            const __m512 v = _mm512_loadu_ps(l + i);
            acc = _mm512_add_ps(acc, exp16(_mm512_sub_ps(v, mv)));
            if ((i & 511) == 496) {  /* every 512 tokens the lanes' sums go into s (rounding stays small) */
                s += (double)_mm512_reduce_add_ps(acc);
                acc = _mm512_setzero_ps();
            }
            if (!n) continue;
            __mmask16 up = k < n ? (__mmask16)0xffff : _mm512_cmp_ps_mask(v, _mm512_set1_ps(tv[n - 1]), _CMP_GT_OQ);
            for (; up; up &= (__mmask16)(up - 1)) enter_top(tv, ti, &k, n, l[i + __builtin_ctz(up)], i + __builtin_ctz(up));
        }
        s += (double)_mm512_reduce_add_ps(acc);
        for (int64_t j = i; j < V; j++) s += (double)expf(l[j] - m);
#else
        int64_t e = 0;
#if defined(VEC8)
        const __m256 mv = _mm256_set1_ps(m);
        __m256 acc = _mm256_setzero_ps();
        float lanes[8];
        for (; e + 8 <= V; e += 8) {
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(l + e), mv)));
            if ((e & 511) == 504 || e + 16 > V) {  /* (as above: into s every 512 tokens, and at the end) */
                _mm256_storeu_ps(lanes, acc);
                for (int q = 0; q < 8; q++) s += (double)lanes[q];
                acc = _mm256_setzero_ps();
            }
        }
#endif
        for (; e < V; e++) s += (double)expf(l[e] - m);
#endif
        for (; n && i < V; i++) enter_top(tv, ti, &k, n, l[i], i);
        const float ls = (float)log(s);
        int64_t *oi = ids + r * (n + 1);
        float *ov = vals + r * (n + 1);
        oi[0] = chosen[r];
        ov[0] = (l[chosen[r]] - m) - ls;
        for (int64_t j = 0; j < n; j++) {
            oi[j + 1] = j < k ? ti[j] : -1;
            ov[j + 1] = j < k ? (tv[j] - m) - ls : -INFINITY;
        }
    }
    return bad;
}
