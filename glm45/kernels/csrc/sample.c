/* Sampling on the host: per row, the distribution a sampled request draws from (temperature, top-k, top-p, min-p)
 * and an inverse-CDF draw from it, with the rules of glm45/engine/sampler.py's batched path (which the tests hold
 * these to), in a few passes over the row instead of a few dozen tensor operations:
 *
 *   s = logits · (1 / temperature),  e = exp(s − max s)                       (one vectorised pass)
 *   no truncation:  weights e (min-p drops e < min_p), drawn in token order
 *   top-k / top-p:  the largest e in descending order (ties: lower token first), found without sorting the
 *                   vocabulary: the highest of a few thresholds (2^-4, 2^-8, …) above which lie at least k
 *                   tokens, or (top-p alone) probability mass ≥ top_p, and only the tokens above it are sorted.
 *                   Weights: e / Σ(top k e) with top-k, else e / Σ e; token j is kept while the weights before
 *                   it sum below top_p and its weight is ≥ min_p · the first one's; drawn in that order.
 *
 * A draw is the first token whose cumulative weight exceeds u · total (strictly below the total, so the token found
 * has weight of its own). Logits of −inf (masked tokens) get weight 0 and are never drawn. */
#define _GNU_SOURCE /* qsort_r */
#include <stdlib.h>
#include <string.h>

#include "sample.h"

/* Sums of whole rows run in double vector lanes: the vocabulary-wide passes stream at memory speed instead of
 * waiting on one long chain of additions, and a float's rounding over thousands of terms (~1e-6, enough to move a
 * draw across a token boundary) stays out of the totals. */
#ifdef __AVX512F__
typedef __m512d vd;
#define vd_zero() _mm512_setzero_pd()
static inline vd vd_add_lanes(vd acc, vf v) {
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    return _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
}
static inline double vd_sum(vd acc) { return _mm512_reduce_add_pd(acc); }
#else
typedef __m256d vd;
#define vd_zero() _mm256_setzero_pd()
static inline vd vd_add_lanes(vd acc, vf v) {
    acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    return _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}
static inline double vd_sum(vd acc) {
    double lanes[4];
    _mm256_storeu_pd(lanes, acc);
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}
#endif

static double vsum_positive(const float *w, int64_t V) {
    vd acc = vd_zero();
    int64_t i = 0;
    for (; i + VL <= V; i += VL) acc = vd_add_lanes(acc, vmax(vload(w + i), vzero()));
    double total = vd_sum(acc);
    for (; i < V; i++) total += w[i] > 0.0f ? w[i] : 0.0f;
    return total;
}

/* e[i] = exp(s[i] − max) with s = x · inv; returns Σ e. Tokens more than 87 below the maximum (−inf among them)
 * get exactly 0. */
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
    return vsum_positive(e, V);
}

/* Bit j set when v's lane j ≥ t; `kept` gets v where set, else 0. */
#ifdef __AVX512F__
static inline unsigned vmask_ge(vf v, vf t, vf *kept) {
    const __mmask16 m = _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ);
    *kept = _mm512_maskz_mov_ps(m, v);
    return m;
}
#else
static inline unsigned vmask_ge(vf v, vf t, vf *kept) {
    const __m256 m = _mm256_cmp_ps(v, t, _CMP_GE_OQ);
    *kept = _mm256_and_ps(m, v);
    return (unsigned)_mm256_movemask_ps(m);
}
#endif

/* How many of e are ≥ t, and their sum. */
static int64_t count_above(const float *e, int64_t V, float t, double *mass) {
    vf kept, vt = vset1(t);
    vd acc = vd_zero();
    int64_t count = 0, i = 0;
    for (; i + VL <= V; i += VL) {
        count += __builtin_popcount(vmask_ge(vload(e + i), vt, &kept));
        acc = vd_add_lanes(acc, kept);
    }
    double sum = vd_sum(acc);
    for (; i < V; i++)
        if (e[i] >= t) count++, sum += e[i];
    *mass = sum;
    return count;
}

/* The indices of e ≥ t, in order; returns how many. */
static int64_t collect_above(const float *e, int64_t V, float t, int32_t *out) {
    vf kept, vt = vset1(t);
    int64_t n = 0, i = 0;
    for (; i + VL <= V; i += VL)
        for (unsigned m = vmask_ge(vload(e + i), vt, &kept); m; m &= m - 1) out[n++] = (int32_t)(i + __builtin_ctz(m));
    for (; i < V; i++)
        if (e[i] >= t) out[n++] = (int32_t)i;
    return n;
}

static int descending(const void *a, const void *b, void *ctx) {
    const float *e = ctx;
    const int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (e[i] != e[j]) return e[i] > e[j] ? -1 : 1;
    return i < j ? -1 : (i > j);
}

/* idx[0, n) (ascending token ids) sorted by e descending, ties by id ascending. Up to a few hundred: qsort; beyond,
 * a stable radix sort on ~bits(e) (e ≥ 0, so its bits order like its values), a byte a pass, skipping bytes all
 * keys share. Scratch: 3n words. */
static void sort_descending(const float *e, int32_t *idx, int64_t n, uint32_t *scratch) {
    if (n <= 256) {
        qsort_r(idx, n, sizeof(int32_t), descending, (void *)e);
        return;
    }
    uint32_t *keys = scratch, *keys2 = scratch + n;
    int32_t *idx2 = (int32_t *)(scratch + 2 * n), *from_idx = idx;
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &e[idx[i]], sizeof bits);
        keys[i] = ~bits;
    }
    for (int shift = 0; shift < 32; shift += 8) {
        int64_t count[257] = {0};
        for (int64_t i = 0; i < n; i++) count[((keys[i] >> shift) & 255) + 1]++;
        if (count[((keys[0] >> shift) & 255) + 1] == n) continue;
        for (int b = 0; b < 256; b++) count[b + 1] += count[b];
        for (int64_t i = 0; i < n; i++) {
            const int64_t at = count[(keys[i] >> shift) & 255]++;
            keys2[at] = keys[i];
            idx2[at] = from_idx[i];
        }
        uint32_t *k = keys;
        keys = keys2, keys2 = k;
        int32_t *x = from_idx;
        from_idx = idx2, idx2 = x;
    }
    if (from_idx != idx) memcpy(idx, from_idx, n * sizeof(int32_t));
}

static float draw_target(float total, float u) {
    /* strictly below the total even where u · total rounds up to it, so the token found has weight of its own */
    const float target = u * total, below = nextafterf(total, 0.0f);
    return target < below ? target : below;
}

/* In `order`: the first position whose cumulative weight exceeds u · total; −1 when the weights are all 0. */
static int64_t draw_ordered(const float *w, const int32_t *order, int64_t n, float total, float u) {
    if (!(total > 0.0f)) return -1;
    const float target = draw_target(total, u);
    double cdf = 0.0;
    int64_t last = -1;
    for (int64_t j = 0; j < n; j++) {
        const float v = w[order[j]];
        if (v <= 0.0f) continue;
        cdf += v;
        last = j;
        if ((float)cdf > target) return j;
    }
    return last; /* rounding left the sum a hair below the target */
}

enum { DRAW_BLOCK = 8 * VL };

/* In column order, the same rule: whole blocks are skipped by their vector sums, the block that crosses the
 * target is walked one weight at a time. */
static int64_t draw_columns(const float *w, int64_t V, float total, float u) {
    if (!(total > 0.0f)) return -1;
    const float target = draw_target(total, u);
    double cdf = 0.0;
    int64_t last_block = -1, i = 0;
    for (; i + DRAW_BLOCK <= V; i += DRAW_BLOCK) {
        vf acc = vzero();
        for (int64_t j = 0; j < DRAW_BLOCK; j += VL) acc = vadd(acc, vmax(vload(w + i + j), vzero()));
        const float block = vhsum(acc);
        if (!(block > 0.0f)) continue;
        last_block = i;
        if ((float)(cdf + block) <= target) {
            cdf += block;
            continue;
        }
        for (int64_t j = i; j < i + DRAW_BLOCK; j++) {
            if (w[j] <= 0.0f) continue;
            cdf += w[j];
            if ((float)cdf > target) return j;
        }
    }
    int64_t last = -1;
    for (; i < V; i++) {
        if (w[i] <= 0.0f) continue;
        cdf += w[i];
        last = i;
        if ((float)cdf > target) return i;
    }
    if (last < 0 && last_block >= 0) /* rounding left the sum a hair below the target: the last weight */
        for (int64_t j = last_block; j < last_block + DRAW_BLOCK; j++) last = w[j] > 0.0f ? j : last;
    return last;
}

/* `token`, or when no token had weight (every logit −inf or NaN) the row's first maximum, NaN counting as the
 * maximum as in argmax: a degenerate row still yields a valid id. */
static int64_t or_first_max(int64_t token, const float *x, int64_t V) {
    if (token >= 0) return token;
    int64_t best = 0;
    for (int64_t i = 1; i < V; i++)
        if (x[best] == x[best] && (x[i] != x[i] || x[i] > x[best])) best = i;
    return best;
}

static const float THRESHOLDS[] = {0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-24f, 0x1p-40f, 0x1p-64f, 0x1p-96f,
                                   0x1p-126f, -1.0f};

/* One row: its token (when `token`) and its distribution (when `probs`: V floats summing to 1, 0 where dropped).
 * Scratch: 5V words (`SAMPLE_SCRATCH`). */
void sample_row(const float *x, int64_t V, const SampleRow *p, int64_t *token, float *probs, float *scratch) {
    float *e = scratch;
    int32_t *order = (int32_t *)(scratch + V);
    const double Z = exp_row(x, V, p->inv_temperature, e);
    if (!(Z > 0.0)) { /* no finite logit: no distribution (NaN, as softmax gives), and the first maximum */
        if (token) *token = or_first_max(-1, x, V);
        if (probs)
            for (int64_t i = 0; i < V; i++) probs[i] = NAN;
        return;
    }
    const int64_t k = p->top_k > 0 && p->top_k < V ? p->top_k : V;
    const int truncates = k < V || p->top_p < 1.0f;
    if (!truncates) {
        double total = Z;
        if (p->min_p > 0.0f) { /* e's maximum is 1, so min_p · max p is min_p in e's units */
            for (int64_t i = 0; i < V; i++) e[i] = e[i] < p->min_p ? 0.0f : e[i];
            total = vsum_positive(e, V);
        }
        if (token) *token = or_first_max(draw_columns(e, V, (float)total, p->u), x, V);
        if (probs)
            for (int64_t i = 0; i < V; i++) probs[i] = (float)(e[i] / total);
        return;
    }
    /* the highest threshold above which lie the top k, or top_p of the mass (a margin for rounding) */
    float t = -1.0f;
    for (size_t j = 0; j + 1 < sizeof THRESHOLDS / sizeof *THRESHOLDS; j++) {
        double mass;
        const int64_t count = count_above(e, V, THRESHOLDS[j], &mass);
        if (k < V ? count >= k : mass >= (double)p->top_p * Z * (1.0 + 1e-6)) {
            t = THRESHOLDS[j];
            break;
        }
    }
    int64_t n = collect_above(e, V, t, order);
    sort_descending(e, order, n, (uint32_t *)(scratch + 2 * V));
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
        const int64_t j = draw_ordered(e, order, kept, (float)total, p->u);
        *token = or_first_max(j < 0 ? -1 : order[j], x, V);
    }
    if (probs) {
        memset(probs, 0, V * sizeof(float));
        for (int64_t j = 0; j < kept; j++) probs[order[j]] = (float)(e[order[j]] / total);
    }
}

/* Rows of logits [R, ld] → tokens [R] (or NULL) and distributions [R, ld_probs] (or NULL). Scratch: 5V words,
 * reused row after row. */
void glm45_sample(const float *logits, int64_t ld, int64_t R, int64_t V, const SampleRow *rows, int64_t *tokens,
                  float *probs, int64_t ld_probs, float *scratch) {
    for (int64_t r = 0; r < R; r++)
        sample_row(logits + r * ld, V, &rows[r], tokens ? tokens + r : NULL, probs ? probs + r * ld_probs : NULL,
                   scratch);
}

int64_t draw_weights(const float *w, int64_t V, float u) {
    const int64_t i = draw_columns(w, V, (float)vsum_positive(w, V), u);
    return i < 0 ? 0 : i; /* no weight at all (a row of −inf or NaN logits upstream): a valid id all the same */
}

/* Rows of non-negative weights [R, ld] → per row `draw_weights`. */
void glm45_draw(const float *weights, int64_t ld, int64_t R, int64_t V, const float *u, int64_t *tokens) {
    for (int64_t r = 0; r < R; r++) tokens[r] = draw_weights(weights + r * ld, V, u[r]);
}
