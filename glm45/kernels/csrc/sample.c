/* Sampling on the host: per row, the distribution a sampled request draws from (temperature, top-k, top-p, min-p)
 * and an inverse-CDF draw from it, with the rules of glm45/engine/sampler.py's batched path (which the tests hold
 * these to), in a few passes over the row instead of a few dozen tensor operations:
 *
 *   s = logits · (1 / temperature),  e = exp(s − max s)                       (one vectorised pass)
 *   no truncation:  weights e (min-p drops e < min_p), drawn in token order
 *   top-k / top-p:  the largest e in descending order (ties: lower token first), found without sorting the
 *                   vocabulary: a histogram of e by binary exponent gives the smallest set of exponent buckets
 *                   that holds the top k tokens, or (top-p alone) probability mass ≥ top_p; only those tokens
 *                   are sorted. Weights: e / Σ(top k e) with top-k, else e / Σ e; token j is kept while the
 *                   weights before it sum below top_p and its weight is ≥ min_p · the first one's; drawn in
 *                   that order.
 *
 * A draw is the first token whose cumulative weight exceeds u · total (strictly below the total, so the token found
 * has weight of its own). Logits of −inf (masked tokens) get weight 0 and are never drawn. */
#define _GNU_SOURCE /* qsort_r */
#include <stdlib.h>
#include <string.h>

#include "common.h"

enum { BUCKETS = 64 }; /* e in (2^-(b+1), 2^-b] → bucket b; the last bucket holds everything smaller */

typedef struct {
    float inv_temperature, top_p, min_p, u;
    int64_t top_k; /* 0 or ≥ V: no top-k */
} SampleRow;

/* e[i] = exp(s[i] − max) with s = x · inv; returns Σ e (summed in double). Tokens more than 87 below the maximum
 * (−inf among them) get exactly 0. */
static double exp_row(const float *x, int64_t V, float inv, float *e) {
    vf vinv = vset1(inv), vm = vset1(-INFINITY);
    int64_t i = 0;
    for (; i + VL <= V; i += VL) vm = vmax(vmul(vload(x + i), vinv), vm);
    float m = -INFINITY, lanes[VL];
    vstore(lanes, vm);
    for (int j = 0; j < VL; j++) m = lanes[j] > m ? lanes[j] : m;
    for (; i < V; i++) m = x[i] * inv > m ? x[i] * inv : m;
    vm = vset1(m);
    for (i = 0; i + VL <= V; i += VL) {
        const vf s = vsub(vmul(vload(x + i), vinv), vm);
        vstore(e + i, vkeep_above(vexp_nonpositive(s), s, -87.0f));
    }
    for (; i < V; i++) {
        const float s = x[i] * inv - m;
        e[i] = s < -87.0f ? 0.0f : expf(s);
    }
    double total = 0.0;
    for (i = 0; i < V; i++) total += e[i];
    return total;
}

static int descending(const void *a, const void *b, void *ctx) {
    const float *e = ctx;
    const int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (e[i] != e[j]) return e[i] > e[j] ? -1 : 1;
    return i < j ? -1 : (i > j);
}

/* 127 − the biased binary exponent of v in [0, 1]: 1 → 0, [0.5, 1) → 1, …; 0 and anything tiny → the last. */
static inline int bucket_of(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    const int b = 127 - (int)((bits >> 23) & 0xff);
    return b < 0 ? 0 : (b >= BUCKETS ? BUCKETS - 1 : b);
}

/* The first index whose cumulative weight exceeds u · total; −1 when the weights are all 0. */
static int64_t draw_index(const float *w, const int32_t *order, int64_t n, float total, float u) {
    if (!(total > 0.0f)) return -1;
    float target = u * total;
    const float below = nextafterf(total, 0.0f);
    target = target < below ? target : below;
    double cdf = 0.0;
    int64_t last = -1;
    for (int64_t j = 0; j < n; j++) {
        const float v = w[order ? order[j] : j];
        if (v <= 0.0f) continue;
        cdf += v;
        last = j;
        if ((float)cdf > target) return j;
    }
    return last; /* rounding left the sum a hair below the target */
}

/* One row: its token (when `token`) and its distribution (when `probs`: V floats summing to 1, 0 where dropped).
 * Scratch: V floats and V int32. */
static void sample_row(const float *x, int64_t V, const SampleRow *p, int64_t *token, float *probs, float *e,
                       int32_t *order) {
    const double Z = exp_row(x, V, p->inv_temperature, e);
    const int64_t k = p->top_k > 0 && p->top_k < V ? p->top_k : V;
    const int truncates = k < V || p->top_p < 1.0f;
    if (!truncates) {
        double total = Z;
        if (p->min_p > 0.0f) { /* e's maximum is 1, so min_p · max p is min_p in e's units */
            total = 0.0;
            for (int64_t i = 0; i < V; i++) {
                e[i] = e[i] < p->min_p ? 0.0f : e[i];
                total += e[i];
            }
        }
        if (token) *token = draw_index(e, NULL, V, (float)total, p->u);
        if (probs)
            for (int64_t i = 0; i < V; i++) probs[i] = (float)(e[i] / total);
        return;
    }
    /* the fewest largest exponent buckets that hold the top k, or top_p of the mass */
    int64_t count[BUCKETS] = {0};
    double mass[BUCKETS] = {0};
    for (int64_t i = 0; i < V; i++) {
        const int b = bucket_of(e[i]);
        count[b]++;
        mass[b] += e[i];
    }
    int last = BUCKETS - 1;
    int64_t held = 0;
    double held_mass = 0.0;
    for (int b = 0; b < BUCKETS; b++) {
        held += count[b];
        held_mass += mass[b];
        if (k < V ? held >= k : held_mass >= (double)p->top_p * Z * (1.0 + 1e-6)) { /* a margin for rounding */
            last = b;
            break;
        }
    }
    int64_t n = 0;
    for (int64_t i = 0; i < V; i++)
        if (bucket_of(e[i]) <= last) order[n++] = (int32_t)i;
    qsort_r(order, n, sizeof(int32_t), descending, e);
    if (n > k) n = k;
    double norm = Z;
    if (k < V) {
        norm = 0.0;
        for (int64_t j = 0; j < n; j++) norm += e[order[j]];
    }
    /* weights in place of e for the candidates, in order; kept ones summed */
    const float first = (float)(e[order[0]] / norm);
    double before = 0.0, total = 0.0;
    int64_t kept = 0;
    for (int64_t j = 0; j < n; j++) {
        const float w = (float)(e[order[j]] / norm);
        if (!(before < p->top_p) || w < p->min_p * first) {
            e[order[j]] = 0.0f;
        } else {
            e[order[j]] = w;
            total += w;
            kept = j + 1;
        }
        before += w;
    }
    if (token) {
        const int64_t j = draw_index(e, order, kept, (float)total, p->u);
        *token = j < 0 ? -1 : order[j];
    }
    if (probs) {
        memset(probs, 0, V * sizeof(float));
        for (int64_t j = 0; j < kept; j++) probs[order[j]] = (float)(e[order[j]] / total);
    }
}

/* Rows of logits [R, ld] → tokens [R] (or NULL) and distributions [R, ld_probs] (or NULL). Scratch: V floats + V
 * int32, reused row after row. */
void glm45_sample(const float *logits, int64_t ld, int64_t R, int64_t V, const SampleRow *rows, int64_t *tokens,
                  float *probs, int64_t ld_probs, void *scratch) {
    float *e = scratch;
    int32_t *order = (int32_t *)(e + V);
    for (int64_t r = 0; r < R; r++)
        sample_row(logits + r * ld, V, &rows[r], tokens ? tokens + r : NULL, probs ? probs + r * ld_probs : NULL, e,
                   order);
}

/* Rows of non-negative weights [R, ld] → the first column whose cumulative weight exceeds u[r] · the row's total,
 * in column order (−1 for a row of zeros). */
void glm45_draw(const float *weights, int64_t ld, int64_t R, int64_t V, const float *u, int64_t *tokens) {
    for (int64_t r = 0; r < R; r++) {
        const float *w = weights + r * ld;
        double total = 0.0;
        for (int64_t i = 0; i < V; i++) total += w[i] > 0.0f ? w[i] : 0.0f;
        tokens[r] = draw_index(w, NULL, V, (float)total, u[r]);
    }
}
