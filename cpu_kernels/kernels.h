/* The kernels one C file calls from another, and what the one-token MoE calls share. */
#ifndef MOE_CPU_KERNELS_H
#define MOE_CPU_KERNELS_H
#include "simd.h"

/* How far ahead (bytes) a one-row weight stream asks for its memory into L2 (prefetcht1, every
 * cache line). A 2-thread GEMV over Mixtral-shaped expert matrices on huge pages, Zen 4 EPYC, against
 * torch.sum over 1 GiB: 71% -> 82% of it when memory was fast (~56 GB/s), 91% -> 96% when slow (~34);
 * 1-4 KiB ahead alike, 8 KiB and more no better than none, prefetcht0 (into L1) worse than none.
 * A prefetch never faults, past the end of the weights too. */
#define PF_AHEAD 2048
#define PF_AHEAD_ROWS 4096 /* a stream of weights read for several rows at once (gemv.c dot_x_row) */

int moe_gemv_bf16(const uint16_t *w, int64_t N, int64_t K, int64_t ldw, const uint16_t *x, const uint16_t *bias,
                  uint16_t *y, int num_threads);
int moe_gemv_bf16_rows(const uint16_t *w, int64_t N, int64_t K, int64_t ldw, const uint16_t *const *xs, int64_t T,
                       const uint16_t *bias, uint16_t *const *ys, int num_threads);
int moe_heads_vec(const uint16_t *x, int64_t sxh, const uint16_t *w, int64_t swh, int64_t swr, int64_t N, int64_t K,
                  int64_t H, int rows_n, uint16_t *y, int64_t syh, int num_threads);
int moe_expert_token(const uint16_t *x, int64_t D, int64_t F, int n, const uint16_t *const *w13s,
                     const uint16_t *const *w2s, const float *weights, uint16_t *out, uint16_t *h, float *acc,
                     int num_threads);
/* What experts compute beyond plain SwiGLU (gpt-oss's): biases b13s[i] (2F bf16) / b2s[i] (D) on
 * expert i's projections, as linear adds them (bf16(bf16(W x) + b); NULL arrays: none), and with
 * act the clamped activation (up + 1) * g * sigmoid(alpha g), g the gate clamped above at limit and
 * up clamped to [-limit, limit] (with clamp), each op rounded to bf16 as torch's bf16 ops round it,
 * the sigmoid looked up in sig (torch.sigmoid of every bf16 bit pattern). */
typedef struct {
    const uint16_t *const *b13s, *const *b2s;
    const uint16_t *sig;
    float alpha, limit;
    int act, clamp;
} ExpertExtras;
/* ExpertExtras for experts stacked in one tensor (amx.c's tile kernels): expert e's gate/up biases at
 * b13 + e * sb13 (2F bf16), its down bias at b2 + e * sb2 (D), NULL: none; the activation as there.
 * sig needs one bf16 past its 65536 values (vector loads of two). */
typedef struct {
    const uint16_t *b13, *b2;
    int64_t sb13, sb2, act, clamp;
    float alpha, limit;
    const uint16_t *sig;
} StackedExtras;
int moe_expert_token_ex(const uint16_t *x, int64_t D, int64_t F, int n, const uint16_t *const *w13s,
                        const uint16_t *const *w2s, const ExpertExtras *ex, const float *weights, uint16_t *out,
                        uint16_t *h, float *acc, int num_threads);
int moe_rms_norm(const void *x, const void *w, void *out, int dtype, int64_t R, int64_t D, int64_t sx, int64_t so,
                 float eps, int num_threads);
int moe_rms_norm_heads(const void *x, const void *w, void *out, int dtype, int64_t T, int64_t H, int64_t D,
                       int64_t sx_t, int64_t sx_h, int64_t so_t, int64_t so_h, float eps, int num_threads);
int moe_rope(void *x, int dtype, int64_t T, int64_t H, int64_t D, int64_t st, int64_t sh, const int64_t *pos,
             int64_t npos, const float *cos_tab, const float *sin_tab, int interleaved, int num_threads);
int moe_rms_norm_rope(void *x, const void *wq, float eps_q, const void *wk, float eps_k, int dtype, int64_t T,
                      int64_t H, int64_t hq, int64_t D, int64_t st, int64_t sh, const int64_t *pos, int64_t npos,
                      const float *cos_tab, const float *sin_tab, int interleaved, int num_threads);
int moe_add_rms_norm(const void *h, const void *d, const void *w, void *h_out, void *out, int dtype, int64_t R,
                     int64_t D, float eps, int num_threads);
int moe_silu_mul(const void *gate, const void *up, void *out, int dtype, int64_t A, int64_t B, int64_t C,
                 int64_t g_sa, int64_t g_sb, int64_t u_sa, int64_t u_sb, int64_t o_sa, int64_t o_sb,
                 int num_threads);
int moe_q8_dequant(const int8_t *q, int64_t ldq, int fmt, const float *s, const float *b, int64_t G, int64_t gs,
                   int64_t bn, int64_t N, int64_t K, void *out, int odtype, int num_threads);
int moe_q8_gemm(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t ldq, int fmt, const float *s,
                const float *b, int64_t G, int64_t gs, int64_t bn, int64_t N, void *y, int ydtype, int num_threads);
int moe_q4_gemm(const float *x, int64_t M, int64_t K, const uint8_t *q, int64_t ldq, const float *lut,
                const float *s, const float *b, int64_t G, int64_t gs, int64_t N, void *y, int ydtype,
                int num_threads);
int moe_q4x8_gemm(const float *x, int64_t M, int64_t K, const uint8_t *q, int64_t ldq, const float *s,
                  const float *b, int64_t G, int64_t gs, int64_t N, void *y, int ydtype, int num_threads);
int moe_q4_dequant(const uint8_t *q, int64_t ldq, const float *lut, const float *s, const float *b, int64_t G,
                   int64_t gs, int64_t N, int64_t K, void *out, int odtype, int num_threads);
/* fp8 KV caches' scales (moe_paged_decode): row (block b, slot t, head h) of K worth k[b * sblock + t * sslot +
 * h * shead] times its e4m3 values, of V v[...] likewise (V may share K's rows and scales: MLA's latent) */
typedef struct {
    float *k, *v;
    int64_t sblock, sslot, shead;
} Fp8Scales;
int moe_quantize_e4m3(const uint16_t *x, int64_t R, int64_t D, uint8_t *q, int64_t ldq, float *scale, int64_t lds);
int moe_paged_decode(const void *q, void *out, const void *k_, const void *v_, int dtype, const Fp8Scales *fp8,
                     int64_t B, int64_t H, int64_t Hkv, int64_t Dk, int64_t Dv,
                     int64_t k_sblock, int64_t k_sslot, int64_t k_shead,
                     int64_t v_sblock, int64_t v_sslot, int64_t v_shead,
                     int64_t block_size, const int32_t *block_tables, int64_t max_blocks,
                     const int32_t *context_lens, const int32_t *query_start, int64_t window, const float *sinks,
                     float scale, int num_threads);

/* What the one-call half-layers of a batch-1 step fix once (their weights, caches, scratch): the
 * bindings' plans (cpu_kernels.GqaToken, MlaToken, MoeToken, QuantMoeToken, RouteToken) build
 * one each, and every call -- theirs, or moe_decode_step's over a captured step's layers -- passes
 * only what changes per step. Field meanings: the kernels' comments (fused.c, gemv.c, quant.c,
 * elementwise.c). */

/* A projection's packed weight (moe quantize --all-linear, ops.PackedLinearWeight): int4 codes
 * [N, K/2] (lut: their 16 values) or int8 codes [N, K] (lut NULL), float32 scales and offsets
 * (b NULL: none) per gs columns; x8: int4 codes meet x rounded to 8 bits (moe_q4x8_gemm). */
typedef struct {
    const void *q;
    const float *lut, *s, *b;
    int64_t gs, x8;
} PackedProj;

typedef struct {
    int64_t D, H, Hkv, hd, qk_norm, rows; /* rows: what the scratch holds (<= 8), a call's rows at a time */
    const uint16_t *w_qkv, *b_qkv, *q_norm, *k_norm, *w_o, *b_o;
    float eps, scale;
    uint16_t *k_cache, *v_cache;
    int64_t k_sblock, k_sslot, k_shead, v_sblock, v_sslot, v_shead, block_size, window;
    const float *sinks;
    uint16_t *scratch;
    const PackedProj *p_qkv, *p_o;
    const Fp8Scales *fp8; /* fp8 caches' scales (k_cache / v_cache then hold e4m3 rows), or NULL: bf16 caches */
    float clip;           /* > 0: q, k, v clamped to [-clip, clip] (OLMoE's clip_qkv) */
} GqaPlan;

typedef struct {
    int64_t D, q_lora, H, nope, rope, C, v, rows; /* rows: what the scratch holds (<= 8), a call's rows at a time */
    const uint16_t *w_qa, *qa_norm, *w_qb, *w_kva, *kva_norm, *w_kvb, *w_o;
    float q_eps, kv_eps, scale;
    uint16_t *cache;
    int64_t c_sblock, c_sslot, block_size;
    uint16_t *scratch;
    const PackedProj *p_qa, *p_qb, *p_kva, *p_o;
    const Fp8Scales *fp8; /* an fp8 cache's scales (cache then holds e4m3 rows, H * C >= C + rope), or NULL */
} MlaPlan;

typedef struct {
    int64_t D, F, E, s13, s2, Fs, rows; /* rows: what the scratch holds (<= 8), a call's rows at a time */
    const uint16_t *w13, *w2, *sh13, *sh2, *shg, *sig; /* shg: a gated shared expert's (else NULL) */
    uint16_t *h;
    float *acc;
    const uint16_t *b13, *b2; /* the experts' stacked biases [E, 2F] / [E, D] (strides sb13, sb2), or NULL */
    int64_t sb13, sb2, act, clamp; /* act, clamp, alpha, limit: ExpertExtras' (sig its table) */
    float alpha, limit;
} MoePlan;

typedef struct {
    int64_t D, F, E, fmt, gs, bn, eq13, es13, G13, eq2, es2, G2, Fs, rows; /* rows: a call's rows at a time (<= 8) */
    const float *lut;
    const char *q13;
    const float *s13, *b13;
    const char *q2;
    const float *s2, *b2;
    const uint16_t *sh13, *sh2, *shg, *sig; /* shg, sig: a gated shared expert's (else NULL) */
    float *fscratch;
    uint16_t *hscratch;
    const uint16_t *eb13, *eb2; /* the experts' bf16 biases [E, 2F] / [E, D] (strides sb13, sb2), or NULL */
    int64_t sb13, sb2, act, clamp; /* act, clamp, alpha, limit: ExpertExtras' (sig its table) */
    float alpha, limit;
} QxMoePlan;

typedef struct {
    int64_t D, ldw, scoring, E, K, G, topk_groups, group_top2, renormalize;
    const uint16_t *gate, *gate_bias;
    const float *bias;
    float eps, scale;
    float *s, *weights;
    int64_t *ids;
} RoutePlan;

int moe_project(const uint16_t *w, const PackedProj *p, int64_t N, int64_t K, const uint16_t *x,
                const uint16_t *bias, void *y, int ydtype, int nt);
int moe_gqa_token(const GqaPlan *a, const uint16_t *x, int64_t T, const int64_t *pos, const float *cos_tab,
                  const float *sin_tab, int interleaved, const int32_t *table, int32_t len, const int64_t *toff,
                  const int32_t *lens, const int64_t *slots, uint16_t *out, const uint16_t *resid, const uint16_t *nw,
                  float neps, uint16_t *h_out, int nt);
int moe_mla_token(const MlaPlan *a, const uint16_t *x, int64_t T, const int64_t *pos, const float *cos_tab,
                  const float *sin_tab, int interleaved, const int32_t *table, int32_t len, const int64_t *toff,
                  const int32_t *lens, const int64_t *slots, uint16_t *out, const uint16_t *resid, const uint16_t *nw,
                  float neps, uint16_t *h_out, int nt);
int moe_moe_token(const MoePlan *a, const uint16_t *x, int64_t T, int64_t K, const int64_t *ids, const float *wts,
                  uint16_t *out, const uint16_t *resid, const uint16_t *nw, float neps, uint16_t *h_out, int nt);
int moe_qx_moe_token(const QxMoePlan *a, const uint16_t *x, int64_t T, int64_t K, const int64_t *ids,
                     const float *wts, uint16_t *out, const uint16_t *resid, const uint16_t *nw, float neps,
                     uint16_t *h_out, int nt);
int moe_route_token(const RoutePlan *a, const uint16_t *x, int64_t T, int nt);
int moe_argmax_rows(const float *x, int64_t R, int64_t V, int64_t ld, int64_t *out);
/* How one row of logits is sampled (sample.c): temperature 0 is greedy; top_k 0 and top_p 1 are off;
 * key names the sequence's stream of uniform draws. What moe_penalize_rows applies before (a decode
 * loop's; NULL / 0 / 1: none): n_bias logit biases (bias_ids, bias_vals), OpenAI's presence and
 * frequency penalties over counts (each token's occurrences in the output) and the repetition penalty
 * over seen (1: the token is in the prompt or the output), and while ban_left > 0 (min_tokens pending)
 * its n_ban ban_ids (EOS and stop ids) at -inf; moe_note_tokens counts each chosen token. With mask
 * given (a grammar's bitmask: token v allowed where bit v % 32 of mask[v / 32] is set), the tokens it
 * disallows go to -inf after the penalties. With raw given, a decode loop copies step i's logits before
 * any processing to raw + i V (the row's log-probs are computed from them after the call). */
typedef struct {
    float temperature, top_p, min_p;
    int64_t top_k, key;
    float presence, frequency, repetition;
    int64_t n_bias;
    const int32_t *bias_ids;
    const float *bias_vals;
    int32_t *counts;
    uint8_t *seen;
    int64_t n_ban;
    const int64_t *ban_ids;
    int64_t ban_left;
    float *raw;
    const int32_t *mask;
} SampleRow;
int moe_sample_rows(const float *x, int64_t R, int64_t V, int64_t ld, const SampleRow *rows, const int64_t *pos,
                    float *scratch, int32_t *iscratch, int64_t *out, int nt);
void moe_penalize_rows(float *x, int64_t R, int64_t V, int64_t ld, const SampleRow *rows);
void moe_note_tokens(SampleRow *rows, int64_t R, const int64_t *tokens);
int moe_logprob_rows(const float *x, int64_t R, int64_t V, int64_t ld, const int64_t *chosen, int64_t n,
                     int64_t *ids, float *vals, int nt);

/* A token's K <= 64 routed experts in ascending id order with their routing weights rounded to
 * bf16 (the combine's order and arithmetic). Returns 0, or -2 for an id outside [0, E). */
static inline int sort_experts(const int64_t *ids, const float *wts, int64_t K, int64_t E, int64_t *id, float *w) {
    if (K < 1 || K > 64) return -2;
    for (int64_t i = 0; i < K; i++) {
        if (ids[i] < 0 || ids[i] >= E) return -2;
        int64_t j = i; /* insertion sort */
        for (; j > 0 && id[j - 1] > ids[i]; j--) {
            id[j] = id[j - 1];
            w[j] = w[j - 1];
        }
        id[j] = ids[i];
        w[j] = bf16_to_f32(f32_to_bf16(wts[i]));
    }
    return 0;
}

/* The experts of T <= 8 rows (ids, wts: T rows of K <= 64), each row's in ascending id order with its
 * weights rounded as sort_experts gives them, merged into n tasks in ascending id order: task i is
 * expert eid[i] for cnt[i] rows, its j-th row[i * T + j] (ascending) at weight wt[i * T + j] and place
 * at[i * T + j] among that row's K experts. A several-row MoE call runs the tasks in turn, so each
 * expert is read once for the rows that chose it and each row meets its experts in its own order.
 * Returns 0, -2 for an id outside [0, E), -1 without memory; free with expert_tasks_free. */
typedef struct {
    int64_t n, T;
    int64_t *eid, *cnt, *row, *at;
    float *wt;
} ExpertTasks;

static inline int expert_tasks(const int64_t *ids, const float *wts, int64_t T, int64_t K, int64_t E,
                               ExpertTasks *tk) {
    int64_t id[8][64], cur[8] = {0};
    float w[8][64];
    if (T < 1 || T > 8) return -1;
    for (int64_t t = 0; t < T; t++)
        if (sort_experts(ids + t * K, wts + t * K, K, E, id[t], w[t]) != 0) return -2;
    const int64_t most = T * K; /* at most one task per (row, expert) */
    int64_t *buf = malloc(sizeof(int64_t) * (size_t)(2 * most + 2 * most * T) + sizeof(float) * (size_t)(most * T));
    if (!buf) return -1;
    tk->T = T;
    tk->eid = buf;
    tk->cnt = buf + most;
    tk->row = tk->cnt + most;
    tk->at = tk->row + most * T;
    tk->wt = (float *)(tk->at + most * T);
    int64_t n = 0;
    for (;;) { /* the next smallest id, then every row at it */
        int64_t e = -1;
        for (int64_t t = 0; t < T; t++)
            if (cur[t] < K && (e < 0 || id[t][cur[t]] < e)) e = id[t][cur[t]];
        if (e < 0) break;
        tk->eid[n] = e;
        tk->cnt[n] = 0;
        for (int64_t t = 0; t < T; t++)
            if (cur[t] < K && id[t][cur[t]] == e) {
                const int64_t j = n * T + tk->cnt[n]++;
                tk->row[j] = t;
                tk->wt[j] = w[t][cur[t]];
                tk->at[j] = cur[t]++;
            }
        n++;
    }
    tk->n = n;
    return 0;
}

static inline void expert_tasks_free(ExpertTasks *tk) { free(tk->eid); }

/* h = W x for row i of a projection, rounded to bf16, plus a bias as linear adds it (b: NULL, none). */
static inline uint16_t with_bias(float s, const uint16_t *b, int64_t i) {
    return b ? f32_to_bf16(bf16_to_f32(f32_to_bf16(s)) + bf16_to_f32(b[i])) : f32_to_bf16(s);
}

/* An expert's activation a [F] from h = [gate | up] [2F]: SwiGLU (moe_silu_mul), or ex's clamped form. */
static inline void expert_act(const uint16_t *h, int64_t F, const ExpertExtras *ex, uint16_t *a) {
    if (!ex || !ex->act) {
        moe_silu_mul(h, h + F, a, BF16, 1, 1, F, 0, 0, 0, 0, 0, 0, 1);
        return;
    }
    const float lim = ex->limit;
    const uint16_t hi = f32_to_bf16(lim), lo = f32_to_bf16(-lim);
    for (int64_t f = 0; f < F; f++) {
        uint16_t g = h[f], u = h[F + f];
        if (ex->clamp) { /* (a NaN compares false: kept, as torch's clamp keeps it) */
            if (bf16_to_f32(g) > lim) g = hi;
            if (bf16_to_f32(u) < -lim) u = lo;
            else if (bf16_to_f32(u) > lim) u = hi;
        }
        const float gf = bf16_to_f32(g);
        const float sg = bf16_to_f32(ex->sig[f32_to_bf16(gf * ex->alpha)]);
        const float u1 = bf16_to_f32(f32_to_bf16(bf16_to_f32(u) + 1.f));
        a[f] = f32_to_bf16(bf16_to_f32(f32_to_bf16(u1 * gf)) * sg);
    }
}

/* A gated shared expert's output y (D bf16) times sigmoid(g), g = shg . x (Qwen2-MoE's
 * shared_expert_gate, shg: D bf16), each rounding the op path's: g as moe_gemv_bf16 computes it (what
 * ops.linear runs at one row), its sigmoid looked up in sig (torch.sigmoid of every bf16 bit pattern),
 * the product rounded to bf16. */
static inline void gate_shared_expert(const uint16_t *x, int64_t D, const uint16_t *shg, const uint16_t *sig,
                                      uint16_t *y, int nt) {
    uint16_t g;
    moe_gemv_bf16(shg, 1, D, D, x, NULL, &g, nt);
    const float s = bf16_to_f32(sig[g]);
    for (int64_t d = 0; d < D; d++) y[d] = f32_to_bf16(s * bf16_to_f32(y[d]));
}

/* out += a bf16 shared expert's output (sh13 [2 Fs, D], sh2 [D, Fs]; with shg given, gated:
 * gate_shared_expert), one bf16 addition, as the MoE block adds it; tmp: D bf16, h: 3 Fs bf16, acc:
 * D float32. Returns 0 or the kernel's error. */
static inline int add_shared_expert(const uint16_t *x, int64_t D, const uint16_t *sh13, const uint16_t *sh2,
                                    const uint16_t *shg, const uint16_t *sig, int64_t Fs, uint16_t *out,
                                    uint16_t *tmp, uint16_t *h, float *acc, int nt) {
    const float one = 1.f;
    const int rc = moe_expert_token(x, D, Fs, 1, &sh13, &sh2, &one, tmp, h, acc, nt);
    if (rc != 0) return rc;
    if (shg) gate_shared_expert(x, D, shg, sig, tmp, nt);
    for (int64_t d = 0; d < D; d++) out[d] = f32_to_bf16(bf16_to_f32(out[d]) + bf16_to_f32(tmp[d]));
    return 0;
}
/* The residual tail of a batch-1 sub-layer: with resid given, h_out = resid + out (bf16) and out
 * becomes norm(h_out) (weights nw, eps), as the decoder's add and next norm compute them. */
static inline void then_norm(uint16_t *out, int64_t D, const uint16_t *resid, const uint16_t *nw, float eps,
                             uint16_t *h_out) {
    if (resid) moe_add_rms_norm(resid, out, nw, h_out, out, BF16, 1, D, eps, 1);
}
#endif
