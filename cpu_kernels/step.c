/* A captured batch-1 step's half-layers in one call (moe.cpu_decode.CapturedDecode). After each
 * layer's weight stream the interpreter's working set is out of the caches, so every Python-level
 * op between two one-call half-layers costs ~10 us; calling the same kernels from one C loop leaves
 * a step one call from Python. Each half calls the kernel its plan calls (moe_gqa_token,
 * moe_mla_token, moe_route_token + moe_moe_token / moe_qx_moe_token) with the same arguments, so
 * the loop computes bit for bit what the plans' calls one by one compute. */
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

/* Halves [start, n) of a step of T rows of one sequence (its token, or a verify step's token and
 * drafts: row t at pos[t], written at slots[t], attending over len - (T - 1 - t) cached rows).
 * h, x: half start's inputs ([T, D]: the residual stream and its normed rows); each later half
 * reads its predecessor's h_out / y_out; the last writes h_last / y_last instead of its own.
 * Returns the index of the first half not run: n when all ran; a caller's half, a router tie or a
 * kernel declining stops the loop before that half, which the caller then runs its own way (a
 * declined GQA call at T > 1 may have written earlier rows' K/V; the caller writes them again). */
int moe_decode_step(const StepHalf *halves, int64_t n, int64_t start, const uint16_t *h, const uint16_t *x,
                    int64_t T, const int64_t *pos, const int32_t *table, int32_t len, const int64_t *slots,
                    uint16_t *h_last, uint16_t *y_last, int nt) {
    for (int64_t i = start; i < n; i++) {
        const StepHalf *s = halves + i;
        uint16_t *ho = i == n - 1 ? h_last : s->h_out, *yo = i == n - 1 ? y_last : s->y_out;
        int rc = 1;
        if (s->kind == STEP_GQA) {
            rc = moe_gqa_token(s->plan, x, T, pos, s->cos_tab, s->sin_tab, (int)s->interleaved, table, len, slots, yo,
                               h, s->nw, s->neps, ho, nt);
        } else if (s->kind == STEP_MLA && T == 1) {
            rc = moe_mla_token(s->plan, x, pos, s->cos_tab, s->sin_tab, (int)s->interleaved, table, len, slots, yo, h,
                               s->nw, s->neps, ho, nt);
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
