/* A captured batch-1 step's half-layers in one call (moe.cpu_decode.CapturedDecode). After each
 * layer's weight stream the interpreter's working set is out of the caches, so every Python-level
 * op between two one-call half-layers costs ~10 us; calling the same kernels from one C loop leaves
 * a step one call from Python. Each half calls the kernel its plan calls (moe_gqa_token,
 * moe_mla_token, moe_route_token + moe_moe_token / moe_qx_moe_token) with the same arguments, so
 * the loop computes bit for bit what the plans' calls one by one compute. */
#include <time.h>

#include "kernels.h"

enum { STEP_PYTHON = 0, STEP_GQA = 1, STEP_MLA = 2, STEP_MOE = 3, STEP_QX_MOE = 4 };

/* One half-layer: its kernel and plan, and where it writes. */
typedef struct {
    int64_t kind;               /* STEP_*; STEP_PYTHON: the caller's (the loop stops there) */
    const void *plan;           /* GqaPlan, MlaPlan, MoePlan or QxMoePlan */
    const RoutePlan *route;     /* experts: their router (its ids / weights then); NULL: ids / wts below */
    const int64_t *ids;         /* [rows, K] without a router (a dense MLP: expert 0 of weight 1) */
    const float *wts;
    int64_t K;
    const float *cos_tab, *sin_tab; /* attention: the rotary tables (the caller updates them as they grow) */
    int64_t interleaved;
    const uint16_t *nw;         /* the next norm's weight and eps */
    float neps;
    uint16_t *h_out, *y_out;    /* [rows, D]: h + y and norm(h + y), the next half's inputs */
} StepHalf;

/* The step's embedding and the first layer's input norm (F.embedding, then rms_norm). */
typedef struct {
    const uint16_t *emb;        /* [vocab, D] */
    int64_t vocab;
    const uint16_t *nw;
    float eps;
    uint16_t *h, *x;            /* [rows, D]: the embedded rows and their norm */
} StepEmbed;

/* Halves [start, n) of a step of T rows, row t at pos[t], written at slots[t]: without toff, rows of
 * one sequence (its token, or a verify step's token and drafts: row t attending over len - (T - 1 - t)
 * cached rows of table); with toff, rows of several sequences (their tokens, and drafts), row t's
 * blocks at table + toff[t], attending over lens[t] cached rows (moe_gqa_token, moe_mla_token).
 * h, x: half start's inputs ([T, D]: the residual stream and its normed rows), or, with ids given
 * (start 0), the token ids the loop embeds and norms first (-1: an id outside the vocabulary, nothing
 * run; the caller embeds them its way); each later half
 * reads its predecessor's h_out / y_out; the last writes h_last / y_last instead of its own.
 * Returns the index of the first half not run: n when all ran; a caller's half, a router tie or a
 * kernel declining stops the loop before that half, which the caller then runs its own way (a
 * declined GQA call at T > 1 may have written earlier rows' K/V; the caller writes them again). */
int moe_decode_step(const StepHalf *halves, int64_t n, int64_t start, const StepEmbed *embed, const int64_t *ids,
                    const uint16_t *h, const uint16_t *x, int64_t T, int64_t D, const int64_t *pos,
                    const int32_t *table, int32_t len, const int64_t *toff, const int32_t *lens,
                    const int64_t *slots, uint16_t *h_last, uint16_t *y_last, int nt) {
    if (ids) {
        for (int64_t t = 0; t < T; t++)
            if (ids[t] < 0 || ids[t] >= embed->vocab) return -1;
        for (int64_t t = 0; t < T; t++)
            memcpy(embed->h + t * D, embed->emb + ids[t] * D, sizeof(uint16_t) * (size_t)D);
        moe_rms_norm(embed->h, embed->nw, embed->x, BF16, T, D, D, D, embed->eps, nt);
        h = embed->h;
        x = embed->x;
    }
    for (int64_t i = start; i < n; i++) {
        const StepHalf *s = halves + i;
        uint16_t *ho = i == n - 1 ? h_last : s->h_out, *yo = i == n - 1 ? y_last : s->y_out;
        int rc = 1;
        if (s->kind == STEP_GQA) {
            rc = moe_gqa_token(s->plan, x, T, pos, s->cos_tab, s->sin_tab, (int)s->interleaved, table, len, toff,
                               lens, slots, yo, h, s->nw, s->neps, ho, nt);
        } else if (s->kind == STEP_MLA) {
            rc = moe_mla_token(s->plan, x, T, pos, s->cos_tab, s->sin_tab, (int)s->interleaved, table, len, toff,
                               lens, slots, yo, h, s->nw, s->neps, ho, nt);
        } else if (s->kind == STEP_MOE || s->kind == STEP_QX_MOE) {
            const int64_t *ids = s->ids;
            const float *wts = s->wts;
            int64_t K = s->K;
            if (s->route) {
                if (moe_route_token(s->route, x, T, nt) != 0) return i; /* a tie: the caller routes */
                ids = s->route->ids;
                wts = s->route->weights;
                K = s->route->K;
            }
            rc = s->kind == STEP_MOE ? moe_moe_token(s->plan, x, T, K, ids, wts, yo, h, s->nw, s->neps, ho, nt)
                                     : moe_qx_moe_token(s->plan, x, T, K, ids, wts, yo, h, s->nw, s->neps, ho, nt);
        }
        if (rc != 0) return i;
        h = ho;
        x = yo;
    }
    return n;
}

/* The LM head of T rows x [T, D] into float32 logits [T, V], each row as a one-row step's head
 * computes it (ops.lm_head_logits at one row): a bf16 weight w [V, D] through moe_gemv_bf16_rows
 * (rows rows at a time, the weight read once for them; each row moe_gemv_bf16's), rounded to bf16
 * (tmp: rows x V bf16), then widened; a packed one (p) through its q4 / q8 GEMM of each row in
 * float32, float32 out. Returns 0, -1 without memory. */
int moe_logits_rows(const uint16_t *x, int64_t T, int64_t D, const uint16_t *w, const PackedProj *p, int64_t V,
                    uint16_t *tmp, int64_t rows, float *logits, int nt) {
    if (p) {
        for (int64_t t = 0; t < T; t++)
            if (moe_project(NULL, p, V, D, x + t * D, NULL, logits + t * V, F32, nt) != 0) return -1;
        return 0;
    }
    for (int64_t t0 = 0; t0 < T; t0 += rows) {
        const int64_t n = T - t0 < rows ? T - t0 : rows;
        const uint16_t *xs[8];
        uint16_t *ys[8];
        for (int64_t t = 0; t < n; t++) {
            xs[t] = x + (t0 + t) * D;
            ys[t] = tmp + t * V;
        }
        if (moe_gemv_bf16_rows(w, V, D, D, xs, n, NULL, ys, nt) != 0) return -1;
        for (int64_t i = 0; i < n * V; i++) logits[t0 * V + i] = bf16_to_f32(tmp[i]);
    }
    return 0;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Decode steps of T <= 32 sequences back to back (T = 1: a batch-1 step), each what an engine
 * step computes for them: step i embeds row t's token ids[i T + t] at position pos0[t] + i (its K/V
 * at slot blocks[p / bs] * bs + p % bs of its blocks: table, or with toff given table + toff[t]; it
 * attends over p + 1 cached rows), runs every half (moe_decode_step,
 * one sequence's row, or T sequences' rows at lens[t]: none may be the caller's), the LM head of the
 * T rows (moe_logits_rows) and each row's token, written to ids[(i + 1) T + t] as the next step's: the
 * greedy choice (moe_argmax_rows: the first NaN, else the first largest logit), or with sample given
 * row t's draw as sample[t] says at the token's position pos0[t] + i + 1 (after its logit processing,
 * moe_penalize_rows, whose counts then take the token: moe_note_tokens; moe_sample_rows, scratch
 * sval / sidx of T (2 V + 64) floats and T (V + 64) int32). Stops after
 * max_steps steps, after a step in which some row chose a token in stop[0, n_stop), once budget_ns
 * have passed since the call began, or once *wake differs from wake0 (the engine has work waiting).
 * With on_step given, it is called in each step after the LM head, before the tokens are drawn, with
 * the step's index and its input tokens (ids + i T: the tokens the step before chose): a caller's
 * grammars take those tokens and write the rows' masks (SampleRow.mask); nonzero ends the call
 * before the step is counted.
 * With y_rows given, step i's normed last rows (the LM head's input, T x D bf16) are copied to
 * y_rows + i T D (an MTP drafter's hidden states). Returns the steps completed; a step the loop does
 * not complete (a router's NaN, a kernel declining, a token outside the embedding) ends the call
 * before it is counted, for the caller to run its own way (the K/V it may have written are the ones
 * that step writes again). */
int moe_decode_steps(const StepHalf *halves, int64_t n, const StepEmbed *embed, int64_t D, int64_t T, int64_t *ids,
                      const int64_t *pos0, const int32_t *table, const int64_t *toff, int64_t bs,
                      uint16_t *h_last, uint16_t *y_last, const uint16_t *w, const PackedProj *p, int64_t V,
                      uint16_t *tmp, int64_t rows, float *logits, const int64_t *stop, int64_t n_stop,
                      int64_t max_steps, int64_t budget_ns, const volatile int64_t *wake, int64_t wake0,
                      uint16_t *y_rows, SampleRow *sample, float *sval, int32_t *sidx,
                      int (*on_step)(int64_t, const int64_t *), int nt) {
    const int64_t t0 = now_ns();
    int64_t pos[32], slots[32];
    int32_t lens[32];
    if (T < 1 || T > 32 || (T > 1 && !toff)) return 0;
    for (int64_t i = 0; i < max_steps; i++) {
        for (int64_t t = 0; t < T; t++) {
            const int32_t *blocks = toff ? table + toff[t] : table;
            pos[t] = pos0[t] + i;
            slots[t] = (int64_t)blocks[pos[t] / bs] * bs + pos[t] % bs;
            if (toff) lens[t] = (int32_t)(pos[t] + 1);
        }
        if (moe_decode_step(halves, n, 0, embed, ids + i * T, NULL, NULL, T, D, pos, table,
                            toff ? 0 : (int32_t)(pos[0] + 1), toff, toff ? lens : NULL, slots, h_last, y_last,
                            nt) != n)
            return (int)i;
        if (y_rows) memcpy(y_rows + i * T * D, y_last, (size_t)(T * D) * sizeof(uint16_t));
        if (moe_logits_rows(y_last, T, D, w, p, V, tmp, rows, logits, nt) != 0) return (int)i;
        int64_t *next = ids + (i + 1) * T;
        if (sample) {
            int64_t at[32];
            for (int64_t t = 0; t < T; t++) at[t] = pos[t] + 1;
            for (int64_t t = 0; t < T; t++)
                if (sample[t].raw) memcpy(sample[t].raw + i * V, logits + t * V, (size_t)V * sizeof(float));
            if (on_step && on_step(i, ids + i * T) != 0) return (int)i;
            moe_penalize_rows(logits, T, V, V, sample);
            if (moe_sample_rows(logits, T, V, V, sample, at, sval, sidx, next, nt) != 0) return (int)i;
            moe_note_tokens(sample, T, next);
        } else {
            moe_argmax_rows(logits, T, V, V, next);
        }
        int stopped = 0;
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < n_stop; j++) stopped |= next[t] == stop[j];
        if (stopped || *wake != wake0 || now_ns() - t0 >= budget_ns) return (int)i + 1;
    }
    return (int)max_steps;
}
