/* Matrix-vector products for decoding: a few activation rows against a weight matrix in any of five formats.
 *
 * Decoding reads every active weight once per token, so these kernels stream each weight row once and dot it
 * with up to 4 activation rows at a time (more rows loop over groups of 4 while the row is in cache; short f32/bf16
 * rows go four at a time, see FLOAT_ROWS4):
 *   f32, bf16   widened in registers (a bf16 is the top half of an fp32), fp32 FMA;
 *   fp8 (e4m3)  widened through fp16 (see fp8_to_f32), fp32 FMA, one scale per row or per 128×128 block; up to 4
 *               activation rows of a bf16 model against per-row scales: made bf16 and bf16 dots (rows_fp8_dp);
 *   int8 (q8)   blocks of 32 with an fp16 scale; the activation row is quantized to int8 per block of 32 and
 *               the dot products are integer (maddubs, or VNNI's dpbusd): llama.cpp's route for Q8_0;
 *   int4 (q4)   blocks of 32 with a scale and minimum (w = d·q + m, q in 0..15), packed two per byte
 *               (byte j: element j in the low nibble, element j + 16 in the high one); d and m are 8-bit codes
 *               times their super-block's fp16 pair (or fp16 per block, see q4_block); integer dots as int8,
 *               plus m · Σx from the quantized activation's block sums; one activation row takes short rows in
 *               pairs (rows_q4_one).
 * f32/bf16/fp8 use the widest vectors the build has (AVX-512 or AVX2); int8/int4 work on 256-bit blocks of 32.
 */
#include <stdlib.h>

#include "common.h"

static inline float finish(float sum, const Weight *w, int64_t n, int round) {
    if (w->bias) sum += w->bias[n];
    return round ? round_bf16(sum) : sum;
}

/* ---------------------------------------------------------------- f32, bf16, fp8: widen and FMA */
/* Software prefetch of the weight rows PREFETCH_BYTES ahead, where a kernel's own reads defeat the hardware
 * prefetcher: int4 rows in pairs (rows_q4_one) and fp8 rows through bf16 dot products (rows_fp8_dp); dp_block has
 * its own. prefetch_ahead must be inlined: GCC found a separate copy free of side effects and deleted the calls, so
 * the widening path, int8 and int4 against several rows ran without it, and there, enabled, it was slower (the
 * Air-shaped bf16 decode 60–68 → 37–42 tok/s, int8 unchanged; AVX-512, 2 threads): they leave it to the hardware. */
#define PREFETCH_BYTES 4096

/* The cache lines PREFETCH_BYTES past a weight row of `bytes` bytes (rows lie one after another). */
static inline __attribute__((always_inline)) void prefetch_ahead(const void *row, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)row + PREFETCH_BYTES + o, _MM_HINT_T0);
}
/* NAME(…, mc, out) calls NAME##_mc with mc as a constant (1 to MAX): the per-row loops over the activation rows then
 * unroll and their accumulators stay in registers. With mc known only at run time GCC kept the accumulator arrays on
 * the stack, a load and a store around every FMA: one activation row streamed a bf16 matrix from memory at
 * 9 GB/s on one core where the same loop with constant rows reads 15–18. The arithmetic is the same. MAX is the
 * most rows the caller passes (counts above it are never instantiated). */
#define ROWS_BY_COUNT(NAME, TYPE, OUT, MAX)                                                                    \
    static void NAME(const TYPE *row, int64_t K, const Act *a, int64_t m0, int64_t mc, OUT) {                  \
        if (mc == 1)                                                                                           \
            NAME##_mc(row, K, a, m0, 1, out);                                                                  \
        else if (MAX == 2 || mc == 2)                                                                          \
            NAME##_mc(row, K, a, m0, 2, out);                                                                  \
        else if (mc == 3)                                                                                      \
            NAME##_mc(row, K, a, m0, MAX == 2 ? 2 : 3, out);                                                   \
        else                                                                                                   \
            NAME##_mc(row, K, a, m0, MAX, out);                                                                \
    }

/* NAME(w, e, n0, n1, a, m0, mc, y, ldy, round) calls NAME##_mc with mc (1 to 4) as a constant, as ROWS_BY_COUNT
 * does for one weight row: for kernels that take a range of weight rows. */
#define WEIGHT_ROWS_BY_COUNT(NAME)                                                                             \
    static void NAME(const Weight *w, int64_t e, int64_t n0, int64_t n1, const Act *a, int64_t m0, int64_t mc,  \
                     float *y, int64_t ldy, int round) {                                                       \
        switch (mc) {                                                                                          \
        case 1: NAME##_mc(w, e, n0, n1, a, m0, 1, y, ldy, round); break;                                       \
        case 2: NAME##_mc(w, e, n0, n1, a, m0, 2, y, ldy, round); break;                                       \
        case 3: NAME##_mc(w, e, n0, n1, a, m0, 3, y, ldy, round); break;                                       \
        default: NAME##_mc(w, e, n0, n1, a, m0, 4, y, ldy, round); break;                                      \
        }                                                                                                      \
    }

/* One weight row (widened by LOAD) against mc ≤ 4 activation rows. FMA latency, not bandwidth, limits a row
 * that sits in cache, so each row gets 4 independent accumulators when there are 1 or 2 of them, and 2 each
 * (8 in all) for 3 or 4. */
#define FLOAT_ROWS(NAME, TYPE, LOAD, SCALAR)                                                                   \
    static inline __attribute__((always_inline)) void NAME##_mc(const TYPE *row, int64_t K, const Act *a,     \
                                                                int64_t m0, const int64_t mc, float out[4]) { \
        vf acc[4][4];                                                                                          \
        for (int m = 0; m < 4; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = vzero();                   \
        const float *x0 = a->x + m0 * a->ldx;                                                                  \
        int64_t k = 0;                                                                                         \
        if (mc <= 2) {                                                                                         \
            for (; k + 4 * VL <= K; k += 4 * VL) {                                                             \
                vf w0 = LOAD(row + k), w1 = LOAD(row + k + VL), w2 = LOAD(row + k + 2 * VL),                   \
                   w3 = LOAD(row + k + 3 * VL);                                                                \
                for (int m = 0; m < mc; m++) {                                                                 \
                    const float *xm = x0 + m * a->ldx + k;                                                     \
                    acc[m][0] = vfma(w0, vload(xm), acc[m][0]);                                                \
                    acc[m][1] = vfma(w1, vload(xm + VL), acc[m][1]);                                           \
                    acc[m][2] = vfma(w2, vload(xm + 2 * VL), acc[m][2]);                                       \
                    acc[m][3] = vfma(w3, vload(xm + 3 * VL), acc[m][3]);                                       \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (; k + 2 * VL <= K; k += 2 * VL) {                                                                 \
            vf w0 = LOAD(row + k), w1 = LOAD(row + k + VL);                                                    \
            for (int m = 0; m < mc; m++) {                                                                     \
                const float *xm = x0 + m * a->ldx + k;                                                         \
                acc[m][0] = vfma(w0, vload(xm), acc[m][0]);                                                    \
                acc[m][1] = vfma(w1, vload(xm + VL), acc[m][1]);                                               \
            }                                                                                                  \
        }                                                                                                      \
        for (int m = 0; m < mc; m++) {                                                                         \
            float s = vhsum(vadd(vadd(acc[m][0], acc[m][1]), vadd(acc[m][2], acc[m][3])));                     \
            const float *xm = x0 + m * a->ldx;                                                                 \
            for (int64_t t = k; t < K; t++) s += SCALAR(row[t]) * xm[t];                                       \
            out[m] = s;                                                                                        \
        }                                                                                                      \
    }                                                                                                          \
    ROWS_BY_COUNT(NAME, TYPE, float out[4], 4)

static inline float f32_id(float v) { return v; }
FLOAT_ROWS(row_f32, float, vload, f32_id)
FLOAT_ROWS(row_bf16, uint16_t, vload_bf16, bf16_to_f32)

/* Four weight rows at once against mc ≤ 2 activation rows, for short rows (K ≤ SHORT_K): there a row's dot product is
 * a handful of FMAs, and one row at a time would spend as long on its horizontal sum and its dependent FMA chain as on
 * the arithmetic. Two accumulators per (weight row, activation row) keep 8–16 chains independent, and one transposing
 * add tree sums four rows together. K must be a multiple of VL. Measured at bs=1 (2 threads, AVX-512): the bundled
 * model (K = 256, weights in cache) decodes 1.2–1.25× faster; with SHORT_K = 1024 the `small` benchmark model
 * (K = 512, 140 MB streamed from memory) lost about 10%, so longer rows keep the one-row loop. */
#define SHORT_K 256
#define FLOAT_ROWS4(NAME, TYPE, LOAD)                                                                          \
    static inline __attribute__((always_inline)) void NAME##_mc(const TYPE *row, int64_t K, const Act *a,     \
                                                                int64_t m0, const int64_t mc,                 \
                                                                float out[2][4]) {                            \
        vf acc[2][4][2];                                                                                       \
        for (int m = 0; m < 2; m++)                                                                            \
            for (int o = 0; o < 4; o++) acc[m][o][0] = acc[m][o][1] = vzero();                                 \
        const float *x0 = a->x + m0 * a->ldx;                                                                  \
        int64_t k = 0;                                                                                         \
        for (; k + 2 * VL <= K; k += 2 * VL) {                                                                 \
            vf w[4][2];                                                                                        \
            for (int o = 0; o < 4; o++) {                                                                      \
                w[o][0] = LOAD(row + o * K + k);                                                               \
                w[o][1] = LOAD(row + o * K + k + VL);                                                          \
            }                                                                                                  \
            for (int m = 0; m < mc; m++) {                                                                     \
                vf xa = vload(x0 + m * a->ldx + k), xb = vload(x0 + m * a->ldx + k + VL);                      \
                for (int o = 0; o < 4; o++) {                                                                  \
                    acc[m][o][0] = vfma(w[o][0], xa, acc[m][o][0]);                                            \
                    acc[m][o][1] = vfma(w[o][1], xb, acc[m][o][1]);                                            \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        if (k < K) { /* one vector left */                                                                     \
            for (int m = 0; m < mc; m++) {                                                                     \
                vf xa = vload(x0 + m * a->ldx + k);                                                            \
                for (int o = 0; o < 4; o++) acc[m][o][0] = vfma(LOAD(row + o * K + k), xa, acc[m][o][0]);      \
            }                                                                                                  \
        }                                                                                                      \
        for (int m = 0; m < mc; m++)                                                                           \
            vhsum4(vadd(acc[m][0][0], acc[m][0][1]), vadd(acc[m][1][0], acc[m][1][1]),                         \
                   vadd(acc[m][2][0], acc[m][2][1]), vadd(acc[m][3][0], acc[m][3][1]), out[m]);                \
    }                                                                                                          \
    ROWS_BY_COUNT(NAME, TYPE, float out[2][4], 2)

FLOAT_ROWS4(rows4_f32, float, vload)
FLOAT_ROWS4(rows4_bf16, uint16_t, vload_bf16)

/* fp8 rows accumulate per 128-wide block when the scales are per block. */
static inline float fp8_raw(uint8_t v) { return fp8_to_f32(v) / FP8_RESCALE; }
FLOAT_ROWS(row_fp8_raw, uint8_t, vload_fp8, fp8_raw)

static void rows_float(const Weight *w, int64_t e, int64_t n0, int64_t n1, const Act *a, int64_t m0, int64_t mc,
                       float *y, int64_t ldy, int round) {
    const int64_t K = w->K;
    float out[4];
    int64_t n = n0;
    if (mc <= 2 && K <= SHORT_K && K % VL == 0) {
        float out4[2][4];
        for (; n + 4 <= n1; n += 4) {
            if (w->fmt == FMT_F32) {
                rows4_f32((const float *)w->data + (e * w->N + n) * K, K, a, m0, mc, out4);
            } else {
                rows4_bf16((const uint16_t *)w->data + (e * w->N + n) * K, K, a, m0, mc, out4);
            }
            for (int m = 0; m < mc; m++)
                for (int o = 0; o < 4; o++) y[(m0 + m) * ldy + n + o] = finish(out4[m][o], w, n + o, round);
        }
    }
    for (; n < n1; n++) {
        if (w->fmt == FMT_F32) {
            row_f32((const float *)w->data + (e * w->N + n) * K, K, a, m0, mc, out);
        } else {
            row_bf16((const uint16_t *)w->data + (e * w->N + n) * K, K, a, m0, mc, out);
        }
        for (int m = 0; m < mc; m++) y[(m0 + m) * ldy + n] = finish(out[m], w, n, round);
    }
}

static void rows_fp8(const Weight *w, int64_t e, int64_t n0, int64_t n1, const Act *a, int64_t m0, int64_t mc,
                     float *y, int64_t ldy, int round) {
    const int64_t K = w->K, B = w->fp8_block;
    const uint8_t *base = (const uint8_t *)w->data + e * w->N * K;
    const float *scale = (const float *)w->scale;
    float out[4], part[4];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = base + n * K;
        if (B == 0) {
            row_fp8_raw(row, K, a, m0, mc, out);
            float s = scale[e * w->N + n] * FP8_RESCALE;
            for (int m = 0; m < mc; m++) out[m] *= s;
        } else {
            int64_t kb = (K + B - 1) / B;
            const float *srow = scale + (e * ((w->N + B - 1) / B) + n / B) * kb;
            for (int m = 0; m < mc; m++) out[m] = 0.0f;
            for (int64_t b = 0; b < kb; b++) {
                Act sub = *a;
                sub.x = a->x + b * B;
                int64_t len = (b + 1) * B <= K ? B : K - b * B;
                row_fp8_raw(row + b * B, len, &sub, m0, mc, part);
                for (int m = 0; m < mc; m++) out[m] += part[m] * srow[b] * FP8_RESCALE;
            }
        }
        for (int m = 0; m < mc; m++) y[(m0 + m) * ldy + n] = finish(out[m], w, n, round);
    }
}

/* ---------------------------------------------------------------- int8 / int4: integer dots */
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

static inline __attribute__((always_inline)) void rows_q8_mc(const Weight *w, int64_t e, int64_t n0, int64_t n1,
                                                             const Act *a, int64_t m0, const int64_t mc, float *y,
                                                             int64_t ldy, int round) {
    const int64_t K = w->K, nb = K / QBLOCK, xnb = a->K / QBLOCK;
    const int8_t *base = (const int8_t *)w->data + e * w->N * K;
    const uint16_t *dbase = (const uint16_t *)w->scale + e * w->N * nb;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *row = base + n * K;
        const uint16_t *d = dbase + n * nb;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = 0; b < nb; b++) {
            __m256i wq = _mm256_loadu_si256((const __m256i *)(row + b * QBLOCK));
            __m256i wabs = _mm256_sign_epi8(wq, wq);  /* |w| as unsigned; the sign moves onto x */
            float dw = fp16_to_f32(d[b]);
            for (int m = 0; m < mc; m++) {
                const int64_t r = m0 + m;
                __m256i xq = _mm256_loadu_si256((const __m256i *)(a->xq + r * a->K + b * QBLOCK));
                __m256i p = dot_u8s8(_mm256_setzero_si256(), wabs, _mm256_sign_epi8(xq, wq));
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * a->xd[r * xnb + b]), acc[m]);
            }
        }
        for (int m = 0; m < mc; m++) y[(m0 + m) * ldy + n] = finish(hsum256(acc[m]), w, n, round);
    }
}

WEIGHT_ROWS_BY_COUNT(rows_q8)

/* The scales and minimums of int4 blocks [s0, s1) of flat row r (s0 a multiple of 8), 8 blocks a vector: from their
 * super-blocks' fp16 pairs and 8-bit codes, or from per-block fp16 values (checkpoints of the older layout). */
static inline void q4_decode_span(const Weight *w, int64_t r, int64_t s0, int64_t s1, float *ds, float *ms) {
    const int64_t nb = w->K / QBLOCK, groups = (nb + Q4_SUPER - 1) / Q4_SUPER;
    int64_t b = s0;
    if (w->sub_scale) {
        const uint16_t *D = (const uint16_t *)w->scale + r * groups, *M = (const uint16_t *)w->minimum + r * groups;
        const uint8_t *sc = w->sub_scale + r * nb;
        const int8_t *mn = w->sub_min + r * nb;
        for (; b + Q4_SUPER <= s1; b += Q4_SUPER) {
            const __m256 d = _mm256_set1_ps(fp16_to_f32(D[b / Q4_SUPER]));
            const __m256 m = _mm256_set1_ps(fp16_to_f32(M[b / Q4_SUPER]));
            const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sc + b)));
            const __m256i o = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(mn + b)));
            _mm256_storeu_ps(ds + b - s0, _mm256_mul_ps(d, _mm256_cvtepi32_ps(c)));
            _mm256_storeu_ps(ms + b - s0, _mm256_mul_ps(m, _mm256_cvtepi32_ps(o)));
        }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        if (b < s1) { /* a last partial super-block (short rows: the Air shape's expert down projection has 4 blocks) */
            const __mmask16 live = (__mmask16)((1u << (s1 - b)) - 1);
            const __m256 d = _mm256_set1_ps(fp16_to_f32(D[b / Q4_SUPER]));
            const __m256 m = _mm256_set1_ps(fp16_to_f32(M[b / Q4_SUPER]));
            const __m256i c = _mm256_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, sc + b));
            const __m256i o = _mm256_cvtepi8_epi32(_mm_maskz_loadu_epi8(live, mn + b));
            _mm256_storeu_ps(ds + b - s0, _mm256_mul_ps(d, _mm256_cvtepi32_ps(c)));
            _mm256_storeu_ps(ms + b - s0, _mm256_mul_ps(m, _mm256_cvtepi32_ps(o)));
            return;
        }
#endif
    } else {
        const uint16_t *d = (const uint16_t *)w->scale + r * nb, *m = (const uint16_t *)w->minimum + r * nb;
        for (; b + 8 <= s1; b += 8) {
            _mm256_storeu_ps(ds + b - s0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + b))));
            _mm256_storeu_ps(ms + b - s0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + b))));
        }
    }
    for (; b < s1; b++) q4_block(w, r, b, ds + b - s0, ms + b - s0);
}

/* Rows [n0, n1) of an int4 matrix against mc ≤ 4 activation rows, Q4_SPAN blocks at a time: the span's weight
 * scales are decoded, multiplied by each activation row's block scales and the minimum term m · Σx summed, all 8
 * blocks a vector, so a block then costs its integer dot product and one broadcast per activation row. (With the
 * scales decoded one block at a time inside the loop, the super-block layout ran 1.25–1.8× slower than an fp16 pair
 * per block; this way both run at the speed the per-block layout had, 1.6 ms for a 75,776 × 1,024 matrix.) */
#define Q4_SPAN 256

/* Blocks [s0, s1) of an int4 row, their scales ds and minimums ms decoded (q4_decode_span), against one activation
 * row's block scales xd and sums xs: sx[b - s0] = d_b · xd_b for the dot products, and the minimum term Σ m_b · xs_b
 * added to *minacc (8 blocks a vector) and *mins (the rest). */
static inline void q4_span_scales(const float *ds, const float *ms, int64_t s0, int64_t s1, const float *xd,
                                  const float *xs, float *sx, __m256 *minacc, float *mins) {
    const int64_t whole = s0 + (s1 - s0) / 8 * 8;
    int64_t b = s0;
    for (; b < whole; b += 8) {
        _mm256_storeu_ps(sx + b - s0, _mm256_mul_ps(_mm256_loadu_ps(ds + b - s0), _mm256_loadu_ps(xd + b)));
        *minacc = _mm256_fmadd_ps(_mm256_loadu_ps(ms + b - s0), _mm256_loadu_ps(xs + b), *minacc);
    }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    if (b < s1) { /* the last few blocks in masked lanes (the decoded arrays hold 8 a vector) */
        const __mmask8 live = (__mmask8)((1u << (s1 - b)) - 1);
        _mm256_storeu_ps(sx + b - s0, _mm256_maskz_mul_ps(live, _mm256_loadu_ps(ds + b - s0),
                                                          _mm256_maskz_loadu_ps(live, xd + b)));
        *minacc = _mm256_fmadd_ps(_mm256_maskz_loadu_ps(live, ms + b - s0), _mm256_maskz_loadu_ps(live, xs + b),
                                  *minacc);
        return;
    }
#endif
    for (; b < s1; b++) sx[b - s0] = ds[b - s0] * xd[b], *mins += ms[b - s0] * xs[b];
}

/* Int4 blocks go two at a time: a pair's 32 packed bytes hold, in their low nibbles, elements 0–15 of each block and,
 * in their high nibbles, elements 16–31, so masking and shifting them gives two vectors of codes without moving a
 * byte between lanes; the activations are reordered to match once per call (q4_pair_activations) and each weight row
 * costs, per pair, a load, three bit operations, two integer dots, one conversion and one FMA, where taking the blocks
 * one at a time needs a lane insert, a conversion and an FMA per block. (Both builds of the kernels in one process,
 * alternating, 2 threads, AVX-512: one activation row against the Air-shaped 151,552 × 1,024 head 0.74× the time,
 * expert gate/up 0.90×, q/k/v 0.81×; four rows 0.82–0.86×; a 1,024 × 4,096 matrix against two rows 0.72×. The
 * Air-shaped int4 decode, old and new in alternating processes: 188–232 → 245–288 tok/s.) */

/* An activation row's int8 blocks [0, nb) reordered for q4_pair_dot: per pair (b, b + 1), the first halves of both
 * blocks, then their second halves (64 bytes a pair); a lone last block's partner is zeros. */
static inline void q4_pair_activations(const int8_t *xq, int64_t nb, int8_t *out) {
    for (int64_t b = 0; b < nb; b += 2) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + b * QBLOCK));
        const __m256i x1 = b + 1 < nb ? _mm256_loadu_si256((const __m256i *)(xq + (b + 1) * QBLOCK))
                                      : _mm256_setzero_si256();
        _mm256_storeu_si256((__m256i *)(out + b * QBLOCK), _mm256_permute2x128_si256(x0, x1, 0x20));
        _mm256_storeu_si256((__m256i *)(out + (b + 1) * QBLOCK), _mm256_permute2x128_si256(x0, x1, 0x31));
    }
}

/* Blocks b and b + 1 (absent when `lone`) of int4 row `row` against their reordered activations xp: 8 integer
 * partial sums, lanes 0–3 block b's and 4–7 block b + 1's. */
static inline __m256i q4_pair_dot(const uint8_t *row, int64_t b, int lone, const int8_t *xp, __m256i low) {
    const uint8_t *p = row + b * (QBLOCK / 2);
    const __m256i packed = lone ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p))
                                : _mm256_loadu_si256((const __m256i *)p);
    const __m256i lo = _mm256_and_si256(packed, low), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
    return dot_u8s8(dot_u8s8(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i *)xp)), hi,
                    _mm256_loadu_si256((const __m256i *)(xp + QBLOCK)));
}

/* q4_pair_dot's partial sums scaled by their blocks' sx, [sx_b × 4, sx_b+1 × 4], and added to acc. */
static inline __m256 q4_pair_fma(__m256i dot, const float *sx, __m256 acc) {
    const __m256 scale = _mm256_permutevar8x32_ps(
        _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd((const double *)sx))),
        _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc);
}

/* One activation row against int4 rows of at most Q4_SPAN blocks, two weight rows at a time: a row costs about 35
 * cycles besides its blocks (its scales decoded and multiplied, its reduction), as much as 12 blocks' dot products
 * at K = 512, so the pair shares the activation loads, the loop and one transposing reduction. An odd last row is
 * paired with itself. (2 threads: 16,384 × 512 195 → 147 µs, 65,536 × 128 593 → 405 µs; equal at K = 2,048, and at
 * K = 8,192 up to 10% slower, so longer rows keep rows_q4; the Air-shaped head, 151,552 × 1,024 streamed from
 * memory, 2.64 → 2.19 ms with the prefetch.) */
#define Q4_ONE_MAX_BLOCKS 64
static void rows_q4_one(const Weight *w, int64_t e, int64_t n0, int64_t n1, const Act *a, int64_t m0, float *y,
                        int64_t ldy, int round) {
    const int64_t K = w->K, nb = K / QBLOCK, xnb = a->K / QBLOCK;
    const uint8_t *base = (const uint8_t *)w->data + e * w->N * (K / 2);
    const float *xd = a->xd + m0 * xnb, *xs = a->xs + m0 * xnb;
    const __m256i low = _mm256_set1_epi8(0x0f);
    float ds[Q4_SPAN], ms[Q4_SPAN], sx[2][Q4_SPAN + 1];
    int8_t xp[(Q4_ONE_MAX_BLOCKS + 1) * QBLOCK];
    q4_pair_activations(a->xq + m0 * a->K, nb, xp);
    for (int64_t n = n0; n < n1; n += 2) {
        const int64_t rows[2] = {n, n + 1 < n1 ? n + 1 : n};
        __m256 minacc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        float mins[2] = {0.0f, 0.0f};
        for (int j = 0; j < 2; j++) {
            q4_decode_span(w, e * w->N + rows[j], 0, nb, ds, ms);
            q4_span_scales(ds, ms, 0, nb, xd, xs, sx[j], &minacc[j], &mins[j]);
            sx[j][nb] = 0.0f; /* a lone last block's partner */
        }
        const uint8_t *r0 = base + rows[0] * (K / 2), *r1 = base + rows[1] * (K / 2);
        prefetch_ahead(r0, K); /* the pair's interleaved reads defeat the hardware prefetcher: 2.6 → 4.4 ms without */
        __m256 a0 = minacc[0], c0 = minacc[1];
        for (int64_t b = 0; b < nb; b += 2) {
            const int lone = b + 1 == nb;
            a0 = q4_pair_fma(q4_pair_dot(r0, b, lone, xp + b * QBLOCK, low), sx[0] + b, a0);
            c0 = q4_pair_fma(q4_pair_dot(r1, b, lone, xp + b * QBLOCK, low), sx[1] + b, c0);
        }
        /* [row 0's 8 partial sums, row 1's] → their two totals */
        const __m256 h = _mm256_hadd_ps(a0, c0);
        __m128 t = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        t = _mm_hadd_ps(t, t);
        y[m0 * ldy + rows[0]] = finish(_mm_cvtss_f32(t) + mins[0], w, rows[0], round);
        if (rows[1] != rows[0])
            y[m0 * ldy + rows[1]] = finish(_mm_cvtss_f32(_mm_shuffle_ps(t, t, 1)) + mins[1], w, rows[1], round);
    }
}
#if defined(__AVX512BW__) && defined(__AVX512VL__)
/* Eight rows' sums at once: out[j] = Σ lanes of v[j] (a transposing add tree). */
static inline __m256 hsum8x8(const __m256 v[8]) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* One activation row against short int4 rows (one super-block: at most 8 blocks, the layout with 8-bit codes), eight
 * weight rows at a time: their fp16 scale and minimum pairs are read as one vector each, a row's block scales and
 * minimums a vector from its codes, the pairs' scales picked from that vector in registers, and the eight rows'
 * sums made by one add tree — where a row at a time paid a scale decode, a minimum sum and a reduction of its own
 * for four blocks of work (the Air shape's expert down projection: 0.61× the time, in one process alternating; the
 * Air shape's int4 decode, the kernels swapped between passes, paired median 1.08×, 0.84–1.22). Rows past the last
 * eight go to rows_q4_one. */
#define Q4_SHORT_MAX_BLOCKS 8
static void rows_q4_short(const Weight *w, int64_t e, int64_t n0, int64_t n1, const Act *a, int64_t m0, float *y,
                          int64_t ldy, int round) {
    const int64_t K = w->K, nb = K / QBLOCK, xnb = a->K / QBLOCK, whole = n0 + (n1 - n0) / 8 * 8;
    const uint8_t *base = (const uint8_t *)w->data + e * w->N * (K / 2);
    const __mmask8 live = (__mmask8)((1u << nb) - 1);
    const __m256 xd = _mm256_maskz_loadu_ps(live, a->xd + m0 * xnb);
    const __m256 xs = _mm256_maskz_loadu_ps(live, a->xs + m0 * xnb);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i pick[4];
    for (int q = 0; q < 4; q++) /* pair q's lanes: [sx_2q × 4, sx_2q+1 × 4] */
        pick[q] = _mm256_set_epi32(2 * q + 1, 2 * q + 1, 2 * q + 1, 2 * q + 1, 2 * q, 2 * q, 2 * q, 2 * q);
    int8_t xp[9 * QBLOCK];
    q4_pair_activations(a->xq + m0 * a->K, nb, xp);
    for (int64_t n = n0; n < whole; n += 8) {
        const int64_t r = e * w->N + n; /* one super-block a row: its fp16 pair at r */
        const __m256 D = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w->scale + r)));
        const __m256 M = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w->minimum + r)));
        __m256 acc[8], mins[8];
        for (int j = 0; j < 8; j++) {
            const __m128i sc8 = _mm_maskz_loadu_epi8(live, w->sub_scale + (r + j) * nb);
            const __m128i mn8 = _mm_maskz_loadu_epi8(live, w->sub_min + (r + j) * nb);
            const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc8));
            const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(mn8));
            const __m256 sx = _mm256_mul_ps(sc, xd);
            mins[j] = _mm256_mul_ps(mn, xs);
            const uint8_t *row = base + (n + j) * (K / 2);
            acc[j] = _mm256_setzero_ps();
            for (int64_t b = 0, q = 0; b < nb; b += 2, q++) {
                const __m256i dot = q4_pair_dot(row, b, b + 1 == nb, xp + b * QBLOCK, low);
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_permutevar8x32_ps(sx, pick[q]), acc[j]);
            }
        }
        float out[8];
        _mm256_storeu_ps(out, _mm256_fmadd_ps(D, hsum8x8(acc), _mm256_mul_ps(M, hsum8x8(mins))));
        for (int j = 0; j < 8; j++) y[m0 * ldy + n + j] = finish(out[j], w, n + j, round);
    }
    if (whole < n1) rows_q4_one(w, e, whole, n1, a, m0, y, ldy, round);
}
#endif

/* Rows [n0, n1) of an int4 matrix against MC activation rows (a constant, see ROWS_BY_COUNT), each weight row read
 * once, its block pairs' codes shared by the rows (q4_pair_dot's order). With the row count known only at run time
 * (the accumulators on the stack), two rows streamed the Air-shaped head (151,552 × 1,024) from memory in 13.6 ms
 * against 5.2 ms for one; this way 5.1–6.8 ms. */
static inline __attribute__((always_inline)) void rows_q4_mc(const Weight *w, int64_t e, int64_t n0, int64_t n1,
                                                             const Act *a, int64_t m0, const int MC, float *y,
                                                             int64_t ldy, int round) {
    const int64_t K = w->K, nb = K / QBLOCK, xnb = a->K / QBLOCK, stride = (nb + 1) / 2 * 2 * QBLOCK;
    const uint8_t *base = (const uint8_t *)w->data + e * w->N * (K / 2);
    const __m256i low = _mm256_set1_epi8(0x0f);
    float ds[Q4_SPAN], ms[Q4_SPAN], sx[4][Q4_SPAN + 1];
    int8_t held[4 * Q4_SPAN * QBLOCK];
    int8_t *xp = MC * stride <= (int64_t)sizeof(held) ? held : malloc(MC * stride);
    for (int m = 0; m < MC; m++) q4_pair_activations(a->xq + (m0 + m) * a->K, nb, xp + m * stride);
    for (int64_t n = n0; n < n1; n++) {
        const int64_t r = e * w->N + n;
        const uint8_t *row = base + n * (K / 2);
        __m256 acc[4], minacc[4];
        float mins[4] = {0, 0, 0, 0};
        for (int m = 0; m < MC; m++) acc[m] = minacc[m] = _mm256_setzero_ps();
        for (int64_t s0 = 0; s0 < nb; s0 += Q4_SPAN) { /* spans hold whole pairs: Q4_SPAN is even */
            const int64_t s1 = s0 + Q4_SPAN < nb ? s0 + Q4_SPAN : nb;
            q4_decode_span(w, r, s0, s1, ds, ms);
            for (int m = 0; m < MC; m++) {
                q4_span_scales(ds, ms, s0, s1, a->xd + (m0 + m) * xnb, a->xs + (m0 + m) * xnb, sx[m], &minacc[m],
                               &mins[m]);
                sx[m][s1 - s0] = 0.0f; /* a lone last block's partner */
            }
            for (int64_t b = s0; b < s1; b += 2) {
                const int lone = b + 1 == s1;
                const uint8_t *p = row + b * (QBLOCK / 2);
                const __m256i packed = lone ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p))
                                            : _mm256_loadu_si256((const __m256i *)p);
                const __m256i lo = _mm256_and_si256(packed, low);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                for (int m = 0; m < MC; m++) {
                    const int8_t *x = xp + m * stride + b * QBLOCK;
                    const __m256i dot = dot_u8s8(dot_u8s8(_mm256_setzero_si256(), lo,
                                                          _mm256_loadu_si256((const __m256i *)x)),
                                                 hi, _mm256_loadu_si256((const __m256i *)(x + QBLOCK)));
                    acc[m] = q4_pair_fma(dot, sx[m] + b - s0, acc[m]);
                }
            }
        }
        for (int m = 0; m < MC; m++)
            y[(m0 + m) * ldy + n] = finish(hsum256(_mm256_add_ps(acc[m], minacc[m])) + mins[m], w, n, round);
    }
    if (xp != held) free(xp);
}

WEIGHT_ROWS_BY_COUNT(rows_q4)

/* ---------------------------------------------------------------- bf16 dot products (AVX512-BF16) */
/* Many activation rows against bf16 weights, on CPUs with bf16 dot products (vdpbf16ps: 32 products a vector,
 * added pairwise into 16 fp32 lanes). With `round` set, every activation a bf16 model multiplies is a bf16 value,
 * so the rows convert to bf16 exactly; the products are exact and the sums fp32, in another order than torch's
 * (and values below 2^-126 flush to zero). A pass takes 4 weight rows × 4 activation rows into 16 accumulators:
 * 16 dot products per 8 loads, where widening bf16 to fp32 costs a load per FMA and becomes the limit from two
 * rows on (2 threads, a 151,552 × 1,024 head streamed from memory: 2 rows 10.9 → 7.7 ms, 3 rows 14.3 → 8.2 ms; at
 * 64 rows the Air-shaped benchmark model's expert and projection GEMVs ran 2.5–3× faster). One row goes this way
 * too: it streams its weights from memory as fast as the widening path (0.97–1.16×, K = 512 to 4,096) and is faster
 * in cache (1.1–1.3×), and a row's products then come out the same whether a call has one row or two (the orders
 * below are per row up to two rows), so the one-program MTP step, which computes two rows where drafting on its own
 * computes one, draws the same drafts. */
#if defined(__AVX512BF16__)
#define DP_MIN_ROWS 1
/* cpu.MAX_KERNEL_ROWS + 1: from this many rows, torch-side calls and captured steps take packed weights to the GEMM */
#define PACKED_GEMM_ROWS 5
#define DP_CHUNK 16 /* weight rows that every group of activation rows passes over while they are in cache */
#define DP_STREAM_AHEAD 4096 /* bytes ahead on one weight stream that dp_block prefetches */
#define DP_STREAM_MIN_K 512 /* rows at least this long are read whole in turn at one or two activation rows */

/* Rows of x as bf16, each padded with zeros to Kp (a multiple of 32) so the kernels load whole vectors: in
 * `scratch` when its `capacity` (values) holds them, else in memory the caller frees (the result is not scratch). */
static uint16_t *bf16_rows(const float *x, int64_t ldx, int64_t rows, int64_t K, int64_t Kp, uint16_t *scratch,
                           int64_t capacity) {
    uint16_t *out = rows * Kp <= capacity ? scratch : malloc(rows * Kp * sizeof(uint16_t) + 64);
    for (int64_t r = 0; r < rows; r++) {
        const float *src = x + r * ldx;
        uint16_t *dst = out + r * Kp;
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
            _mm256_storeu_si256((__m256i *)(dst + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
        for (; k < K; k++) dst[k] = f32_to_bf16(src[k]);
        for (; k < Kp; k++) dst[k] = 0;
    }
    return out;
}

/* NO weight rows from `row` (stride K) against MC bf16 activation rows: out[o][m] ends as 16 partial sums. The
 * accumulators are locals (an array behind a pointer would be stored to memory on every pass). */
static inline __attribute__((always_inline)) void dp_block(const uint16_t *row, int64_t K, const uint16_t *const xb[4],
                                                           const int MC, const int NO, const int STREAM,
                                                           __m512 out[4][4]) {
    if (MC <= 2 && STREAM) {
        /* One or two activation rows: each weight row is read whole in turn, so the NO rows are one sequential
         * stream. Taking the rows side by side (below) read a 151,552 × 1,024 head from memory at 13–19 GB/s for
         * 2 rows against 28–35 GB/s this way (2 threads; one row through the widening path: 28–35); from 3 rows
         * on, the side-by-side order's fewer activation loads per product win (16,384 × 4,096: 5.5 against
         * 7.1–7.4 ms at 3 rows), and so does it for rows of 256 inputs in cache (3,072 × 256: 20–30 against
         * 30–40 µs), the bundled model's. Two accumulators a row keep two products in flight. */
        for (int o = 0; o < NO; o++) {
            const uint16_t *r = row + o * K;
            __m512 even[2], odd[2];
            for (int m = 0; m < MC; m++) even[m] = odd[m] = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 64 <= K; k += 64) {
                if (MC > 1) { /* one row is read as fast without it (from memory, 2 threads: 0.92–0.97× with it) */
                    _mm_prefetch((const char *)(r + k) + DP_STREAM_AHEAD, _MM_HINT_T0);
                    _mm_prefetch((const char *)(r + k) + DP_STREAM_AHEAD + 64, _MM_HINT_T0);
                }
                const __m512bh w0 = (__m512bh)_mm512_loadu_si512(r + k);
                const __m512bh w1 = (__m512bh)_mm512_loadu_si512(r + k + 32);
                for (int m = 0; m < MC; m++) {
                    even[m] = _mm512_dpbf16_ps(even[m], w0, (__m512bh)_mm512_loadu_si512(xb[m] + k));
                    odd[m] = _mm512_dpbf16_ps(odd[m], w1, (__m512bh)_mm512_loadu_si512(xb[m] + k + 32));
                }
            }
            if (k < K) { /* a last 32 or fewer inputs (the activation rows are zero-padded to a multiple of 32) */
                const __mmask32 mask = k + 32 <= K ? 0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
                const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(mask, r + k);
                for (int m = 0; m < MC; m++)
                    even[m] = _mm512_dpbf16_ps(even[m], w0, (__m512bh)_mm512_loadu_si512(xb[m] + k));
            }
            for (int m = 0; m < MC; m++) out[o][m] = _mm512_add_ps(even[m], odd[m]);
        }
        return;
    }
    /* Weights stream from memory (an expert's rows are read once per call): prefetching the rows a few passes ahead
     * (at least 4 KB) ran the 64-row expert GEMVs 2–2.5× faster than relying on the hardware prefetcher. */
    const int64_t ahead = K >= 512 ? 4 : 2048 / K;
    __m512 acc[4][4];
    for (int o = 0; o < NO; o++)
        for (int m = 0; m < MC; m++) acc[o][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 mask = k + 32 <= K ? 0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
        __m512bh xv[4];
        for (int m = 0; m < MC; m++) xv[m] = (__m512bh)_mm512_loadu_si512(xb[m] + k);
        for (int o = 0; o < NO; o++) {
            _mm_prefetch((const char *)(row + (o + ahead) * K + k), _MM_HINT_T0);
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, row + o * K + k);
            for (int m = 0; m < MC; m++) acc[o][m] = _mm512_dpbf16_ps(acc[o][m], wv, xv[m]);
        }
    }
    for (int o = 0; o < NO; o++)
        for (int m = 0; m < MC; m++) out[o][m] = acc[o][m];
}

#define DP_CASE(MC, NO) dp_block(W + n * K, K, xb, MC, NO, STREAM, acc)
/* y[m][n] for weight rows n in [n0, n1) of W (one expert's [N, K]) and mc ≤ 4 activation rows; STREAM (a constant,
 * so that each order is compiled on its own): rows of DP_STREAM_MIN_K inputs or more. */
static inline __attribute__((always_inline)) void dp_rows_order(const Weight *w, const uint16_t *W, int64_t n0,
                                                                int64_t n1, const uint16_t *const xb[4], int mc,
                                                                float *const y[4], int round, const int STREAM) {
    const int64_t K = w->K;
    __m512 acc[4][4];
    for (int64_t n = n0; n < n1; n += 4) {
        const int no = n1 - n < 4 ? (int)(n1 - n) : 4;
        if (no == 4) {
            switch (mc) {
            case 1: DP_CASE(1, 4); break;
            case 2: DP_CASE(2, 4); break;
            case 3: DP_CASE(3, 4); break;
            default: DP_CASE(4, 4); break;
            }
        } else { /* a last pass of fewer than 4 weight rows, one at a time (unused activation slots repeat a row) */
            for (int o = 0; o < 4; o++)
                for (int m = 0; m < 4; m++) acc[o][m] = _mm512_setzero_ps();
            for (int o = 0; o < no; o++) {
                __m512 one[4][4];
                dp_block(W + (n + o) * K, K, xb, 4, 1, STREAM, one);
                for (int m = 0; m < mc; m++) acc[o][m] = one[0][m];
            }
        }
        for (int m = 0; m < mc; m++) {
            float out[4];
            if (no == 4) { /* four outputs as one vector: at short K a scalar epilogue cost as much as the dots */
                __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold512(acc[0][m]), fold512(acc[1][m])),
                                          _mm256_hadd_ps(fold512(acc[2][m]), fold512(acc[3][m])));
                __m128 v = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
                if (w->bias) v = _mm_add_ps(v, _mm_loadu_ps(w->bias + n));
                if (round) v = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32((__m128i)_mm_cvtneps_pbh(v)), 16));
                _mm_storeu_ps(y[m] + n, v);
                continue;
            }
            vhsum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m], out);
            for (int o = 0; o < no; o++) y[m][n + o] = finish(out[o], w, n + o, round);
        }
    }
}
#undef DP_CASE

static void dp_rows(const Weight *w, const uint16_t *W, int64_t n0, int64_t n1, const uint16_t *const xb[4], int mc,
                    float *const y[4], int round) {
    if (w->K >= DP_STREAM_MIN_K)
        dp_rows_order(w, W, n0, n1, xb, mc, y, round, 1);
    else
        dp_rows_order(w, W, n0, n1, xb, mc, y, round, 0);
}

static void rows_bf16_dp(const Weight *w, int64_t e, int64_t n0, int64_t n1, const Act *a, int64_t m0, int64_t mc,
                         float *y, int64_t ldy, int round) {
    const int64_t K = w->K, Kp = (K + 31) / 32 * 32;
    uint16_t *xb = bf16_rows(a->x + m0 * a->ldx, a->ldx, mc, K, Kp, NULL, 0);
    const uint16_t *W = (const uint16_t *)w->data + e * w->N * K;
    for (int64_t t0 = n0; t0 < n1; t0 += DP_CHUNK) {
        const int64_t t1 = t0 + DP_CHUNK < n1 ? t0 + DP_CHUNK : n1;
        for (int64_t m = 0; m < mc; m += 4) {
            const int c = mc - m < 4 ? (int)(mc - m) : 4;
            const uint16_t *xr[4];
            float *yr[4];
            for (int i = 0; i < 4; i++) {
                xr[i] = xb + (m + (i < c ? i : 0)) * Kp;
                yr[i] = y + (m0 + m + (i < c ? i : 0)) * ldy;
            }
            dp_rows(w, W, t0, t1, xr, c, yr, round);
        }
    }
    free(xb);
}

/* Many activation rows against bf16 weights (a batch of decodes, an LM head over many rows, an expert many rows
 * chose): the outer-product order of a GEMM. A panel of GEMM_NR weight rows is repacked so that one vector holds
 * a pair of inputs of 16 weight rows ([K/2][GEMM_NR] 32-bit pairs), and each pair of an activation row, broadcast,
 * meets two such vectors: 32 outputs of up to GEMM_MR rows stay in 24 accumulators for the whole of K, two vector
 * loads and 12 broadcasts a pair for 24 products and no horizontal sums, where the 4 × 4 dot-product blocks above
 * load a vector per two products and add each output's 16 lanes at the end. The repacking (a 16 × 16 transpose of
 * 32-bit pairs, four rounds of permutes) costs about a read and a write of the panel: on the 2-core machine, in one
 * process, glm45_linear at 64 rows went from 246–275 to 315–342 GFLOP/s (1,024 × 512, 4,096 × 1,024), and is
 * slower than the dot products below about 24 rows, hence GEMM_MIN_ROWS. The products are exact and summed in
 * fp32, each output's pairs one after another: another order than the dot products'. */
#define GEMM_NR 32
#define GEMM_MR 12
#define PACK_AHEAD 4 /* 64-byte pieces ahead on each of a panel's 16 row streams that pack_panel prefetches */

/* out[i] = in[.][i] of a 16 × 16 block of 32-bit values: four rounds, each swapping one bit of the row index with
 * the same bit of the column index (round d: rows i and i + d trade the column blocks of width d that differ). */
static const int32_t TRANSPOSE_IDX[4][2][16] __attribute__((aligned(64))) = {
    /* d = 8, 4, 2, 1: [0] row i keeps its columns with bit d clear, [1] row i + d keeps those with bit d set */
    {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}, {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
    {{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}, {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}},
    {{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}, {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}},
    {{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}, {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}},
};

static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
#pragma GCC unroll 4
    for (int round = 0; round < 4; round++) {
        const int d = 8 >> round;
        const __m512i lo = _mm512_load_si512(TRANSPOSE_IDX[round][0]), hi = _mm512_load_si512(TRANSPOSE_IDX[round][1]);
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            if (i & d) continue;
            const __m512i a = r[i], b = r[i + d];
            r[i] = _mm512_permutex2var_epi32(a, lo, b);
            r[i + d] = _mm512_permutex2var_epi32(a, hi, b);
        }
    }
}

/* Weight rows [0, nr) (nr ≤ GEMM_NR; missing rows are zeros) of a bf16 matrix with K (even) inputs, as
 * panel[p][j] = the 32-bit pair (W[j][2p], W[j][2p + 1]). */
static void pack_panel(const uint16_t *W, int64_t K, int64_t nr, uint32_t *panel) {
    const int64_t pairs = K / 2;
    for (int64_t half = 0; half < GEMM_NR; half += 16)
        for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
            const int64_t np = pairs - p0 < 16 ? pairs - p0 : 16;
            const __mmask16 mask = (__mmask16)((1u << np) - 1);
            __m512i r[16];
            for (int j = 0; j < 16; j++) {
                if (half + j >= nr) {
                    r[j] = _mm512_setzero_si512();
                    continue;
                }
                const uint32_t *row = (const uint32_t *)(W + (half + j) * K) + p0;
                _mm_prefetch((const char *)(row + 16 * PACK_AHEAD), _MM_HINT_T0);
                r[j] = _mm512_maskz_loadu_epi32(mask, row);
            }
            transpose16(r);
            for (int64_t i = 0; i < np; i++) _mm512_storeu_si512(panel + (p0 + i) * GEMM_NR + half, r[i]);
        }
}

/* MR (a constant) activation rows x + m·ldx (bf16, K even) against a packed panel: row m's nr outputs at
 * y + m·ldy (bytes) = the products, plus bias, rounded to bf16 when `round`; fp32 outputs, or with OUT_BF16 bf16
 * ones (rounded). */
static inline __attribute__((always_inline)) void gemm_tile(const uint32_t *panel, int64_t pairs, const uint16_t *x,
                                                            int64_t ldx, char *y, int64_t ldy, int64_t nr,
                                                            const float *bias, int round, const int MR,
                                                            const int OUT_BF16) {
    __m512 c[GEMM_MR][2];
    for (int m = 0; m < MR; m++) c[m][0] = c[m][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        const __m512bh b0 = (__m512bh)_mm512_load_si512(panel + p * GEMM_NR);
        const __m512bh b1 = (__m512bh)_mm512_load_si512(panel + p * GEMM_NR + 16);
        for (int m = 0; m < MR; m++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(((const int32_t *)(x + m * ldx))[p]);
            c[m][0] = _mm512_dpbf16_ps(c[m][0], a, b0);
            c[m][1] = _mm512_dpbf16_ps(c[m][1], a, b1);
        }
    }
    const __mmask16 k0 = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
    const __mmask16 k1 = nr >= 32 ? 0xffff : nr <= 16 ? 0 : (__mmask16)((1u << (nr - 16)) - 1);
    const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(k0, bias) : _mm512_setzero_ps();
    const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(k1, bias + 16) : _mm512_setzero_ps();
    for (int m = 0; m < MR; m++) {
        __m512 v0 = _mm512_add_ps(c[m][0], bias0), v1 = _mm512_add_ps(c[m][1], bias1);
        if (OUT_BF16) {
            _mm256_mask_storeu_epi16((uint16_t *)(y + m * ldy), k0, (__m256i)_mm512_cvtneps_pbh(v0));
            _mm256_mask_storeu_epi16((uint16_t *)(y + m * ldy) + 16, k1, (__m256i)_mm512_cvtneps_pbh(v1));
            continue;
        }
        if (round) v0 = vround_bf16(v0), v1 = vround_bf16(v1);
        _mm512_mask_storeu_ps((float *)(y + m * ldy), k0, v0);
        _mm512_mask_storeu_ps((float *)(y + m * ldy) + 16, k1, v1);
    }
}

#define GEMM_TILE(MR)                                                                                          \
    (out_bf16 ? gemm_tile(panel, pairs, xm, ldx, ym, ldy, nr, bias, round, MR, 1)                               \
              : gemm_tile(panel, pairs, xm, ldx, ym, ldy, nr, bias, round, MR, 0))
/* Rows x + m·ldx, m < mc (any number), against one packed panel, GEMM_MR at a time (ldy in bytes). */
static void gemm_panel(const uint32_t *panel, int64_t pairs, const uint16_t *x, int64_t ldx, char *y, int64_t ldy,
                       int64_t mc, int64_t nr, const float *bias, int round, int out_bf16) {
    for (int64_t m = 0; m < mc; m += GEMM_MR) {
        const uint16_t *xm = x + m * ldx;
        char *ym = y + m * ldy;
        switch (mc - m < GEMM_MR ? mc - m : GEMM_MR) {
        case 1: GEMM_TILE(1); break;
        case 2: GEMM_TILE(2); break;
        case 3: GEMM_TILE(3); break;
        case 4: GEMM_TILE(4); break;
        case 5: GEMM_TILE(5); break;
        case 6: GEMM_TILE(6); break;
        case 7: GEMM_TILE(7); break;
        case 8: GEMM_TILE(8); break;
        case 9: GEMM_TILE(9); break;
        case 10: GEMM_TILE(10); break;
        case 11: GEMM_TILE(11); break;
        default: GEMM_TILE(12); break;
        }
    }
}
#undef GEMM_TILE

/* Row n of expert e of a packed matrix, dequantized and rounded to bf16 (ties to even), as dequant_row then
 * narrow_bf16_row give it: int8 and int4 a block of 32 at a time straight to bf16 (one conversion of two fp32
 * vectors), the others through fp32 (`f32`, K values). */
static void dequant_row_bf16(const Weight *w, int64_t e, int64_t n, float *f32, uint16_t *out) {
    const int64_t K = w->K, nb = K / QBLOCK, r = e * w->N + n;
    if (w->fmt == FMT_Q8) {
        const int8_t *row = (const int8_t *)w->data + r * K;
        const uint16_t *d = (const uint16_t *)w->scale + r * nb;
        for (int64_t b = 0; b < nb; b++) {
            const __m512 scale = _mm512_set1_ps(fp16_to_f32(d[b]));
            const __m256i q = _mm256_loadu_si256((const __m256i *)(row + b * QBLOCK));
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
            _mm512_storeu_si512(out + b * QBLOCK,
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, scale), _mm512_mul_ps(lo, scale)));
        }
        return;
    }
    if (w->fmt == FMT_Q4) { /* byte j of a block: element j in its low nibble, element j + 16 in its high one */
        const uint8_t *row = (const uint8_t *)w->data + r * (K / 2);
        const __m128i low = _mm_set1_epi8(0x0f);
        float ds[Q4_SPAN], ms[Q4_SPAN];
        for (int64_t s0 = 0; s0 < nb; s0 += Q4_SPAN) {
            const int64_t s1 = s0 + Q4_SPAN < nb ? s0 + Q4_SPAN : nb;
            q4_decode_span(w, r, s0, s1, ds, ms);
            for (int64_t b = s0; b < s1; b++) {
                const __m128i packed = _mm_loadu_si128((const __m128i *)(row + b * (QBLOCK / 2)));
                const __m512 d = _mm512_set1_ps(ds[b - s0]), m = _mm512_set1_ps(ms[b - s0]);
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(packed, low)));
                const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(high));
                _mm512_storeu_si512(out + b * QBLOCK, (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, d, m),
                                                                                   _mm512_fmadd_ps(lo, d, m)));
            }
        }
        return;
    }
    dequant_row(w, e, n, f32);
    narrow_bf16_row(f32, out, K);
}

/* Rows [n, n + nr) of expert e's matrix as bf16 (row stride K), to be packed into a panel: a bf16 matrix's own, or
 * packed (int8, int4, fp8) weights dequantized into `b16` and rounded to bf16 (dequant_row_bf16), as the torch route
 * that multiplies them in bf16 rounds them. */
static const uint16_t *panel_rows(const Weight *w, int64_t e, int64_t n, int64_t nr, float *f32, uint16_t *b16) {
    const int64_t K = w->K;
    if (w->fmt == FMT_BF16) return (const uint16_t *)w->data + (e * w->N + n) * K;
    for (int64_t r = 0; r < nr; r++) dequant_row_bf16(w, e, n + r, f32, b16 + r * K);
    return b16;
}

/* Weight rows [t0, t1) of expert e of a packed matrix dequantized to bf16 into `chunk` (rows counted from 0; `f32`:
 * K values of scratch), then met by `count` bf16 activation rows x[i] (zero-padded to a multiple of 32) four at a
 * time in bf16 dot products: y[i][t0 .. t1) (fp32, rounded to bf16 with `round`). */
static void dequantized_chunk_rows(const Weight *w, int64_t e, int64_t t0, int64_t t1, float *f32, uint16_t *chunk,
                                   const uint16_t *const *x, float *const *y, int64_t count, int round) {
    for (int64_t n = t0; n < t1; n++) dequant_row_bf16(w, e, n, f32, chunk + (n - t0) * w->K);
    Weight shifted = *w; /* the chunk's rows counted from 0: its bias and outputs shifted to match */
    shifted.bias = w->bias ? w->bias + t0 : NULL;
    for (int64_t j = 0; j < count; j += 4) {
        const int mc = count - j < 4 ? (int)(count - j) : 4;
        const uint16_t *xr[4];
        float *yr[4];
        for (int i = 0; i < 4; i++) { /* unused slots repeat the first row */
            xr[i] = x[j + (i < mc ? i : 0)];
            yr[i] = y[j + (i < mc ? i : 0)] + t0;
        }
        dp_rows(&shifted, chunk, 0, t1 - t0, xr, mc, yr, round);
    }
}

/* rows_bf16_dp's contract for packed weights (int8, int4, fp8) against fewer than GEMM_MIN_ROWS rows of a bf16 model:
 * DP_CHUNK weight rows at a time dequantized to bf16 and met by the activation rows four at a time in bf16 dot
 * products (dequantized_chunk_rows), the order a bf16 matrix takes at that many rows. */
static void rows_packed_dp(const Weight *w, int64_t e, int64_t n0, int64_t n1, const Act *a, int64_t m0, int64_t mc,
                           float *y, int64_t ldy, int round) {
    const int64_t K = w->K, Kp = (K + 31) / 32 * 32;
    uint16_t *xb = bf16_rows(a->x + m0 * a->ldx, a->ldx, mc, K, Kp, NULL, 0);
    uint16_t *chunk = malloc(DP_CHUNK * K * sizeof(uint16_t));
    float *f32 = malloc(K * sizeof(float));
    const uint16_t **xr = malloc(mc * sizeof(*xr));
    float **yr = malloc(mc * sizeof(*yr));
    for (int64_t m = 0; m < mc; m++) xr[m] = xb + m * Kp, yr[m] = y + (m0 + m) * ldy;
    for (int64_t t0 = n0; t0 < n1; t0 += DP_CHUNK)
        dequantized_chunk_rows(w, e, t0, t0 + DP_CHUNK < n1 ? t0 + DP_CHUNK : n1, f32, chunk, xr, yr, mc, round);
    free(xb);
    free(chunk);
    free(f32);
    free(xr);
    free(yr);
}

/* Weight rows [n0, n1) of expert e against mc bf16 activation rows xb (row stride ldx, even, as K is), each
 * panel packed in turn: y[m][n] (fp32, or bf16 with out_bf16; row stride ldy). */
static void gemm_rows(const Weight *w, int64_t e, int64_t n0, int64_t n1, const uint16_t *xb, int64_t ldx,
                      int64_t mc, void *y, int64_t ldy, int round, int out_bf16) {
    const int64_t K = w->K;
    uint32_t *panel = aligned_alloc(64, ((K / 2) * GEMM_NR * sizeof(uint32_t) + 63) / 64 * 64);
    float *f32 = w->fmt == FMT_BF16 ? NULL : malloc(K * sizeof(float));
    uint16_t *b16 = w->fmt == FMT_BF16 ? NULL : malloc(GEMM_NR * K * sizeof(uint16_t));
    const int64_t out_size = out_bf16 ? sizeof(uint16_t) : sizeof(float);
    for (int64_t n = n0; n < n1; n += GEMM_NR) {
        const int64_t nr = n1 - n < GEMM_NR ? n1 - n : GEMM_NR;
        pack_panel(panel_rows(w, e, n, nr, f32, b16), K, nr, panel);
        gemm_panel(panel, K / 2, xb, ldx, (char *)y + n * out_size, ldy * out_size, mc, nr,
                   w->bias ? w->bias + n : NULL, round, out_bf16);
    }
    free(panel);
    free(f32);
    free(b16);
}

/* rows_bf16_dp's contract, for mc ≥ GEMM_MIN_ROWS activation rows and an even K. */
static void rows_bf16_gemm(const Weight *w, int64_t e, int64_t n0, int64_t n1, const Act *a, int64_t m0, int64_t mc,
                           float *y, int64_t ldy, int round) {
    const int64_t K = w->K, Kp = (K + 31) / 32 * 32;
    uint16_t *xb = bf16_rows(a->x + m0 * a->ldx, a->ldx, mc, K, Kp, NULL, 0);
    gemm_rows(w, e, n0, n1, xb, Kp, mc, y + m0 * ldy, ldy, round, 0);
    free(xb);
}

/* y[M, N] (bf16) = x[M, K] (bf16, row stride ldx) · Wᵀ (+ bias) for a bf16 or packed matrix with even K: many rows
 * of a bf16 model from torch (prefill), without widening them to fp32 and back. */
void bf16_gemm(const Weight *w, const uint16_t *x, int64_t M, int64_t ldx, uint16_t *y, int64_t ldy, int ith,
               int nth) {
    int64_t n0, n1;
    split_range(w->N, ith, nth, GEMM_NR, &n0, &n1);
    if (n0 < n1) gemm_rows(w, 0, n0, n1, x, ldx, M, y, ldy, 1, 1);
}

/* Thread ith's share of y = x · W_eᵀ for a.M rows of a bf16 model, as `glm45_linear_bf16` (`gemm`: from xb, the rows
 * as bf16 with row stride ldxb) or `glm45_linear` (from `a`: fp32 rows, int8 ones for int8/int4 weights) compute
 * them: y fp32, rounded to bf16. */
void bf16_expert_products(const Weight *w, int64_t e, int gemm, const uint16_t *xb, int64_t ldxb, const Act *a,
                          float *y, int64_t ldy, int ith, int nth) {
    int64_t n0, n1;
    if (gemm) {
        split_range(w->N, ith, nth, GEMM_NR, &n0, &n1);
        if (n0 < n1) gemm_rows(w, e, n0, n1, xb, ldxb, a->M, y, ldy, 1, 0);
        return;
    }
    split_range(w->N, ith, nth, 16, &n0, &n1);
    if (n0 < n1) weight_rows(w, e, n0, n1, a, 0, a->M, y, ldy, 1);
}

/* fp8 rows (one fp32 scale each) against up to 4 activation rows of a bf16 model, with bf16 dot products: an e4m3 byte,
 * sign-extended to 16 bits and shifted left by 4, has its sign in bit 15 and exponent and mantissa in bits 10..4,
 * which read as a bf16 are the fp8 value × 2^-120; adding 120 to the exponent of every byte whose exponent is not
 * zero makes it the fp8 value itself. Subnormal fp8 values (below 2^-6 of a row's unit) become bf16 subnormals,
 * which the dot product reads as zero. Three operations and one dot product per 32 weights, where widening to
 * fp32 takes about twelve: the fp8 GEMV is then bound by memory instead of arithmetic. */
static inline __m512bh fp8_as_bf16(const uint8_t *p) {
    const __m512i v = _mm512_slli_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)), 4);
    const __m512i bits = _mm512_and_si512(v, _mm512_set1_epi16((short)0x87f0));
    const __mmask32 normal = _mm512_test_epi16_mask(bits, _mm512_set1_epi16(0x0780));
    return (__m512bh)_mm512_mask_add_epi16(bits, normal, bits, _mm512_set1_epi16(120 << 7));
}

/* MC (a constant, ≤ 4) activation rows at once: each fp8 vector is made bf16 once for all of them, so two rows cost
 * about what one does (16,384 × 4,096 from memory, 2 threads: 2.3–3.1 ms for one row; two rows through the widening
 * path took 4.1–7.2). */
/* sums[m] = the lanes of fp8 row inputs [k0, k1) (a multiple of 32 apart) against MC bf16 activation rows xb (row
 * stride K), two accumulators a row keeping two products in flight. */
static inline __attribute__((always_inline)) void fp8_dp_span(const uint8_t *row, const uint16_t *xb, int64_t K,
                                                              int64_t k0, int64_t k1, const int MC, __m512 sums[4]) {
    __m512 even[4], odd[4];
    for (int m = 0; m < MC; m++) even[m] = odd[m] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {
        const __m512bh w0 = fp8_as_bf16(row + k), w1 = fp8_as_bf16(row + k + 32);
        for (int m = 0; m < MC; m++) {
            even[m] = _mm512_dpbf16_ps(even[m], w0, (__m512bh)_mm512_loadu_si512(xb + m * K + k));
            odd[m] = _mm512_dpbf16_ps(odd[m], w1, (__m512bh)_mm512_loadu_si512(xb + m * K + k + 32));
        }
    }
    if (k < k1) { /* a last 32 */
        const __m512bh w0 = fp8_as_bf16(row + k);
        for (int m = 0; m < MC; m++)
            even[m] = _mm512_dpbf16_ps(even[m], w0, (__m512bh)_mm512_loadu_si512(xb + m * K + k));
    }
    for (int m = 0; m < MC; m++) sums[m] = _mm512_add_ps(even[m], odd[m]);
}

static inline __attribute__((always_inline)) void rows_fp8_dp_mc(const Weight *w, int64_t e, int64_t n0, int64_t n1,
                                                                 const Act *a, int64_t m0, const int MC, float *y,
                                                                 int64_t ldy, int round) {
    const int64_t K = w->K, B = w->fp8_block;
    /* an expert's GEMV calls this once per 16 weight rows: the activation rows go on the stack when they fit */
    uint16_t stack[16384];
    uint16_t *xb = bf16_rows(a->x + m0 * a->ldx, a->ldx, MC, K, K, stack, 16384);
    const uint8_t *base = (const uint8_t *)w->data + e * w->N * K;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = base + n * K;
        prefetch_ahead(row, K);
        __m512 sums[4];
        if (B == 0) { /* one scale a row, applied to the row's sum */
            fp8_dp_span(row, xb, K, 0, K, MC, sums);
            const float s = ((const float *)w->scale)[e * w->N + n];
            for (int m = 0; m < MC; m++) y[(m0 + m) * ldy + n] = finish(_mm512_reduce_add_ps(sums[m]) * s, w, n, round);
            continue;
        }
        /* square blocks of scales: each block's sums scaled as vectors */
        const float *block_scale = (const float *)w->scale + (e * ((w->N + B - 1) / B) + n / B) * ((K + B - 1) / B);
        __m512 total[4];
        for (int m = 0; m < MC; m++) total[m] = _mm512_setzero_ps();
        for (int64_t k0 = 0; k0 < K; k0 += B) {
            fp8_dp_span(row, xb, K, k0, k0 + B < K ? k0 + B : K, MC, sums);
            const __m512 s = _mm512_set1_ps(block_scale[k0 / B]);
            for (int m = 0; m < MC; m++) total[m] = _mm512_fmadd_ps(sums[m], s, total[m]);
        }
        for (int m = 0; m < MC; m++) y[(m0 + m) * ldy + n] = finish(_mm512_reduce_add_ps(total[m]), w, n, round);
    }
    if (xb != stack) free(xb);
}

WEIGHT_ROWS_BY_COUNT(rows_fp8_dp)

/* expert_pairs for bf16 weights and at least DP_MIN_ROWS input rows: each expert's pairs go 4 at a time through
 * dp_rows. Work units are (expert, chunk of DP_CHUNK weight rows, group of ≤ 4 pairs), chunk-major within an
 * expert so a chunk's groups follow each other while it is in cache. Every thread converts the (few) input rows to
 * bf16 itself. */
static void expert_pairs_dp(const Weight *w, const int64_t *start, const int64_t *order, int64_t P, int64_t per,
                            const Act *a, float *y, int64_t ldy, int ith, int nth, int round) {
    const int64_t E = w->num_experts, K = w->K, Kp = (K + 31) / 32 * 32;
    const int64_t chunks = (w->N + DP_CHUNK - 1) / DP_CHUNK;
    int64_t total = 0;
    for (int64_t e = 0; e < E; e++) total += (start[e + 1] - start[e] + 3) / 4 * chunks;
    int64_t u0, u1;
    split_range(total, ith, nth, 1, &u0, &u1);
    if (u0 >= u1) return;
    uint16_t *xb = bf16_rows(a->x, a->ldx, P / per, K, Kp, NULL, 0);
    for (int64_t e = 0, offset = 0; e < E && offset < u1; e++) {
        const int64_t count = start[e + 1] - start[e], groups = (count + 3) / 4, units = groups * chunks;
        const int64_t first = u0 > offset ? u0 : offset, stop = u1 < offset + units ? u1 : offset + units;
        const uint16_t *W = (const uint16_t *)w->data + e * w->N * K;
        for (int64_t u = first; u < stop; u++) {
            const int64_t c = (u - offset) / groups, g = (u - offset) % groups;
            const int64_t n0 = c * DP_CHUNK, n1 = n0 + DP_CHUNK < w->N ? n0 + DP_CHUNK : w->N;
            const int mc = count - 4 * g < 4 ? (int)(count - 4 * g) : 4;
            const uint16_t *xr[4];
            float *yr[4];
            for (int i = 0; i < 4; i++) {
                const int64_t p = order[start[e] + 4 * g + (i < mc ? i : 0)];
                xr[i] = xb + (p / per) * Kp;
                yr[i] = y + p * ldy;
            }
            dp_rows(w, W, n0, n1, xr, mc, yr, round);
        }
        offset += units;
    }
    free(xb);
}
#endif

/* ---------------------------------------------------------------- entry points shared with program.c */
int weight_needs_qact(const Weight *w) { return w->fmt == FMT_Q8 || w->fmt == FMT_Q4; }

void quantize_act_rows(const float *x, int64_t ldx, int64_t m0, int64_t m1, int64_t K, int8_t *xq, float *xd,
                       float *xs) {
    /* 4 vectors a block: the same operations in the same order as one value at a time (|v| max, d = amax/127,
     * round(v · 1/d) to nearest even), so the codes are the same bit for bit */
    const int64_t nb = K / QBLOCK;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undoes the packs' lane interleaving */
    for (int64_t m = m0; m < m1; m++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *v = x + m * ldx + b * QBLOCK;
            const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
                         v3 = _mm256_loadu_ps(v + 24);
            __m256 big = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, magnitude), _mm256_and_ps(v1, magnitude)),
                                       _mm256_max_ps(_mm256_and_ps(v2, magnitude), _mm256_and_ps(v3, magnitude)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(big), _mm256_extractf128_ps(big, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h), d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            const __m256 scale = _mm256_set1_ps(inv);
            const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, scale)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, scale)),
                          i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, scale)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, scale));
            const __m256i codes = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            _mm256_storeu_si256((__m256i *)(xq + m * K + b * QBLOCK), _mm256_permutevar8x32_epi32(codes, order));
            __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
            xd[m * nb + b] = d;
            xs[m * nb + b] = d * (float)_mm_cvtsi128_si32(s4);
        }
    }
}

/* y[m, n] for n in [n0, n1) and activation rows [m0, m0 + mc), of expert `expert`'s matrix. With more than 4
 * activation rows, the weight rows go in tiles of 8 and every group of 4 activation rows passes over a tile
 * while it is in cache, so the weights are read from memory once whatever the number of rows. */
void weight_rows(const Weight *w, int64_t expert, int64_t n0, int64_t n1, const Act *a, int64_t m0, int64_t mc,
                 float *y, int64_t ldy, int round) {
#if defined(__AVX512BF16__)
    if (w->fmt == FMT_BF16 && round && mc >= GEMM_MIN_ROWS && w->K % 2 == 0) {
        rows_bf16_gemm(w, expert, n0, n1, a, m0, mc, y, ldy, round);
        return;
    }
    if (w->fmt == FMT_BF16 && round && mc >= DP_MIN_ROWS) {
        rows_bf16_dp(w, expert, n0, n1, a, m0, mc, y, ldy, round);
        return;
    }
    if (w->fmt == FMT_FP8 && round && mc <= 4 && w->fp8_block % 32 == 0 && w->K % 32 == 0) {
        rows_fp8_dp(w, expert, n0, n1, a, m0, mc, y, ldy, round);
        return;
    }
    if (w->fmt != FMT_BF16 && w->fmt != FMT_F32 && round && mc >= PACKED_GEMM_ROWS && w->K % 2 == 0) {
        /* packed weights against many rows of a bf16 model (a batch of decodes): dequantized to bf16, then the
         * order a bf16 matrix takes at that many rows — from GEMM_MIN_ROWS each panel dequantized as it is packed,
         * as torch-side calls of five rows or more take them (`cpu.linear`), below it 16 weight rows at a time
         * through bf16 dot products (the Air shape's int4 head against 16 rows 15.5 → 13.7 ms, a step of 8
         * requests 0.95× the time). The integer dots, four activation rows a pass, decoded every block's scales
         * again for each pass (64 requests of 128 tokens in int4, one round each: the Air shape 277 → 328 tok/s,
         * `small` 1,314 → 1,384) */
        if (mc >= GEMM_MIN_ROWS)
            rows_bf16_gemm(w, expert, n0, n1, a, m0, mc, y, ldy, round);
        else
            rows_packed_dp(w, expert, n0, n1, a, m0, mc, y, ldy, round);
        return;
    }
#endif
    const int64_t tile = mc > 4 ? 8 : n1 - n0;
    for (int64_t t0 = n0; t0 < n1; t0 += tile) {
        const int64_t t1 = t0 + tile < n1 ? t0 + tile : n1;
        for (int64_t m = m0; m < m0 + mc; m += 4) {
            int64_t c = m0 + mc - m < 4 ? m0 + mc - m : 4;
            switch (w->fmt) {
            case FMT_F32:
            case FMT_BF16: rows_float(w, expert, t0, t1, a, m, c, y, ldy, round); break;
            case FMT_FP8: rows_fp8(w, expert, t0, t1, a, m, c, y, ldy, round); break;
            case FMT_Q8: rows_q8(w, expert, t0, t1, a, m, c, y, ldy, round); break;
            case FMT_Q4:
#if defined(__AVX512BW__) && defined(__AVX512VL__)
                if (c == 1 && w->sub_scale && w->K / QBLOCK <= Q4_SHORT_MAX_BLOCKS)
                    rows_q4_short(w, expert, t0, t1, a, m, y, ldy, round);
                else
#endif
                if (c == 1 && w->K / QBLOCK <= Q4_ONE_MAX_BLOCKS)
                    rows_q4_one(w, expert, t0, t1, a, m, y, ldy, round);
                else
                    rows_q4(w, expert, t0, t1, a, m, c, y, ldy, round);
                break;
            }
        }
    }
}

/* Weight rows [n0, n1) of expert e against pair p's input row (p / per), into pair p's output row. */
static void pair_rows(const Weight *w, int64_t e, int64_t n0, int64_t n1, const Act *a, int64_t p, int64_t per,
                      float *y, int64_t ldy, int round) {
    Act one = *a;
    const int64_t row = p / per;
    one.M = row + 1;
    /* weight_rows writes row `row` of its output: point it at pair p's row */
    weight_rows(w, e, n0, n1, &one, row, 1, y + (p - row) * ldy, ldy, round);
}

/* expert_pairs for int8/int4 weights: an expert's pairs go up to 4 at a time (from 3 pairs on), their int8 activation
 * rows gathered, so a chunk's codes are unpacked and its scales decoded once for up to 4 pairs (a batch of decodes,
 * where many rows choose each expert); units are (expert, chunk, group of ≤ 4 pairs), chunk-major within an expert.
 * (64 requests of 128 tokens in int4, one round each: the Air shape 328 → 392 tok/s, `small` 1,384 → 1,571.)
 * In a bf16 model's step an expert that PACKED_GEMM_ROWS pairs or more chose is one unit per chunk instead: the
 * chunk dequantized to bf16 once, then bf16 dot products four pairs a pass (dp_rows), as a plain matrix against
 * that many rows takes the GEMM: the integer dots cost about twice the bf16 ones a product, and their passes
 * decoded the chunk's scales again for every four pairs. */
static void expert_pairs_int(const Weight *w, const int64_t *start, const int64_t *order, int64_t P, int64_t per,
                             const Act *a, float *y, int64_t ldy, int64_t chunk, int ith, int nth, int round) {
    const int64_t E = w->num_experts, chunks = (w->N + chunk - 1) / chunk, xnb = a->K / QBLOCK;
    int64_t total = 0;
#if defined(__AVX512BF16__)
    const int64_t whole_from = round ? PACKED_GEMM_ROWS : INT64_MAX;
#else
    const int64_t whole_from = INT64_MAX;
#endif
    /* experts with one or two pairs take them one at a time: gathering two rows cost what sharing saved (bs=2) */
#define PAIRS_GROUP(count) ((count) >= whole_from ? (count) : (count) < 3 ? 1 : 4)
    for (int64_t e = 0; e < E; e++) {
        const int64_t count = start[e + 1] - start[e];
        total += (count + PAIRS_GROUP(count) - 1) / PAIRS_GROUP(count) * chunks;
    }
    int64_t u0, u1;
    split_range(total, ith, nth, 1, &u0, &u1);
    int8_t *gq = malloc(4 * a->K);
    float *gd = malloc(8 * xnb * sizeof(float)), *gy = malloc(4 * w->N * sizeof(float));
    Act g = {a->x, 4, a->K, a->ldx, gq, gd, gd + 4 * xnb};
#if defined(__AVX512BF16__)
    const int64_t K = w->K, Kp = (K + 31) / 32 * 32;
    uint16_t *xb = NULL, *chunk_b16 = NULL; /* made at this thread's first whole-expert unit */
    float *row_f32 = NULL, **yr = NULL;
    const uint16_t **xr = NULL;
#endif
    for (int64_t e = 0, offset = 0; e < E && offset < u1; e++) {
        const int64_t count = start[e + 1] - start[e], size = PAIRS_GROUP(count);
        const int64_t groups = (count + size - 1) / size, units = groups * chunks;
        const int64_t first = u0 > offset ? u0 : offset, stop = u1 < offset + units ? u1 : offset + units;
        for (int64_t u = first; u < stop; u++) {
            const int64_t c = (u - offset) / groups, g0 = (u - offset) % groups * size;
            const int64_t n0 = c * chunk, n1 = n0 + chunk < w->N ? n0 + chunk : w->N;
            const int64_t gc = count - g0 < size ? count - g0 : size;
            const int64_t *pairs = order + start[e] + g0;
#if defined(__AVX512BF16__)
            if (count >= whole_from) {
                if (!xb) {
                    xb = bf16_rows(a->x, a->ldx, P / per, K, Kp, NULL, 0);
                    chunk_b16 = malloc(chunk * K * sizeof(uint16_t));
                    row_f32 = malloc(K * sizeof(float));
                    xr = malloc(P * sizeof(*xr));
                    yr = malloc(P * sizeof(*yr));
                }
                for (int64_t j = 0; j < gc; j++) xr[j] = xb + (pairs[j] / per) * Kp, yr[j] = y + pairs[j] * ldy;
                dequantized_chunk_rows(w, e, n0, n1, row_f32, chunk_b16, xr, yr, gc, round);
                continue;
            }
#endif
            if (gc == 1) {
                pair_rows(w, e, n0, n1, a, pairs[0], per, y, ldy, round);
                continue;
            }
            for (int64_t j = 0; j < gc; j++) {
                const int64_t row = pairs[j] / per;
                memcpy(gq + j * a->K, a->xq + row * a->K, a->K);
                memcpy(gd + j * xnb, a->xd + row * xnb, xnb * sizeof(float));
                memcpy(gd + (4 + j) * xnb, a->xs + row * xnb, xnb * sizeof(float));
            }
            g.M = gc;
            weight_rows(w, e, n0, n1, &g, 0, gc, gy, w->N, round);
            for (int64_t j = 0; j < gc; j++)
                memcpy(y + pairs[j] * ldy + n0, gy + j * w->N + n0, (n1 - n0) * sizeof(float));
        }
        offset += units;
    }
    free(gq);
    free(gd);
    free(gy);
#if defined(__AVX512BF16__)
    free(xb);
    free(chunk_b16);
    free(row_f32);
    free(xr);
    free(yr);
#endif
#undef PAIRS_GROUP
}

/* The expert GEMVs of P (row, expert) pairs, thread ith's share: y[p] = W[experts[p]] · x[p / per] (per > 1 when
 * several pairs read one input row, as the routed experts' gate/up do). Pairs are taken expert by expert, and for
 * each chunk of an expert's matrix (16 rows; 64 of rows shorter than 512, where a call's own cost weighed: the
 * Air-shaped int4 down projection, 4 blocks a row, 0.74× the time with q4_decode_span's masked tails, in one process
 * alternating) every pair routed to that expert runs while the chunk is in cache, so an expert's weights leave
 * memory once per call however many rows chose it. The work units (expert, chunk, pair) are
 * split evenly over the threads; every thread orders the pairs itself (a counting sort of a few hundred ids). */
void expert_pairs(const Weight *w, const int64_t *experts, int64_t P, int64_t per, const Act *a, float *y, int64_t ldy,
                  int ith, int nth, int round) {
    const int64_t E = w->num_experts, chunk = w->K < 512 ? 64 : 16, chunks = (w->N + chunk - 1) / chunk;
    int64_t *start = calloc(E + 1, sizeof(int64_t)), *cursor = malloc(E * sizeof(int64_t) + 1);
    int64_t *order = malloc(P * sizeof(int64_t) + 1);
    for (int64_t p = 0; p < P; p++) start[experts[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    memcpy(cursor, start, E * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) order[cursor[experts[p]]++] = p;
#if defined(__AVX512BF16__)
    if (w->fmt == FMT_BF16 && round && P / per >= DP_MIN_ROWS) {
        expert_pairs_dp(w, start, order, P, per, a, y, ldy, ith, nth, round);
        free(start);
        free(cursor);
        free(order);
        return;
    }
#endif
    if ((w->fmt == FMT_Q8 || w->fmt == FMT_Q4) && P / per > 1) {
        expert_pairs_int(w, start, order, P, per, a, y, ldy, chunk, ith, nth, round);
        free(start);
        free(cursor);
        free(order);
        return;
    }
    int64_t u0, u1;
    split_range(P * chunks, ith, nth, 1, &u0, &u1);
    for (int64_t e = 0, offset = 0; e < E && offset < u1; e++) {
        const int64_t count = start[e + 1] - start[e], units = count * chunks;
        const int64_t first = u0 > offset ? u0 : offset, stop = u1 < offset + units ? u1 : offset + units;
        for (int64_t u = first; u < stop; u++) {
            const int64_t c = (u - offset) / count, p = order[start[e] + (u - offset) % count];
            const int64_t n0 = c * chunk, n1 = n0 + chunk < w->N ? n0 + chunk : w->N;
            pair_rows(w, e, n0, n1, a, p, per, y, ldy, round);
        }
        offset += units;
    }
    free(start);
    free(cursor);
    free(order);
}

/* Row n of expert `expert`, as fp32 (embedding lookups and the prefill path's dequantization). */
void dequant_row(const Weight *w, int64_t expert, int64_t n, float *out) {
    const int64_t K = w->K, nb = K / QBLOCK, r = expert * w->N + n;
    switch (w->fmt) {
    case FMT_F32: memcpy(out, (const float *)w->data + r * K, K * sizeof(float)); break;
    case FMT_BF16:
        for (int64_t k = 0; k < K; k++) out[k] = bf16_to_f32(((const uint16_t *)w->data)[r * K + k]);
        break;
    case FMT_FP8: {
        const uint8_t *row = (const uint8_t *)w->data + r * K;
        const float *scale = (const float *)w->scale;
        const int64_t B = w->fp8_block;
        if (B == 0) { /* the same products as the scalar loop, a vector at a time (the prefill's GEMM panels) */
            int64_t k = 0;
            for (; k + VL <= K; k += VL)
                vstore(out + k, vmul(vmul(vload_fp8(row + k), vset1(FP8_RESCALE)), vset1(scale[r])));
            for (; k < K; k++) out[k] = fp8_to_f32(row[k]) * scale[r];
            break;
        }
        /* square blocks: one scale over each B inputs of the row, a vector at a time within a block */
        const float *block_scale = scale + (expert * ((w->N + B - 1) / B) + n / B) * ((K + B - 1) / B);
        for (int64_t k0 = 0; k0 < K; k0 += B) {
            const int64_t k1 = k0 + B < K ? k0 + B : K;
            const float s = block_scale[k0 / B];
            int64_t k = k0;
            for (; k + VL <= k1; k += VL)
                vstore(out + k, vmul(vmul(vload_fp8(row + k), vset1(FP8_RESCALE)), vset1(s)));
            for (; k < k1; k++) out[k] = fp8_to_f32(row[k]) * s;
        }
        break;
    }
    case FMT_Q8: {
        const int8_t *row = (const int8_t *)w->data + r * K;
        const uint16_t *d = (const uint16_t *)w->scale + r * nb;
        for (int64_t b = 0; b < nb; b++) {
            const vf scale = vset1(fp16_to_f32(d[b]));
            for (int64_t k = b * QBLOCK; k < (b + 1) * QBLOCK; k += VL) vstore(out + k, vmul(vload_i8(row + k), scale));
        }
        break;
    }
    case FMT_Q4: { /* d · q + m, a vector of 8 codes at a time (byte j: element j low, element j + 16 high) */
        const uint8_t *row = (const uint8_t *)w->data + r * (K / 2);
        const __m128i low = _mm_set1_epi8(0x0f);
        for (int64_t b = 0; b < nb; b++) {
            float db, mb;
            q4_block(w, r, b, &db, &mb);
            const __m128i packed = _mm_loadu_si128((const __m128i *)(row + b * (QBLOCK / 2)));
            const __m128i codes[2] = {_mm_and_si128(packed, low), _mm_and_si128(_mm_srli_epi16(packed, 4), low)};
            const __m256 d = _mm256_set1_ps(db), m = _mm256_set1_ps(mb);
            for (int h = 0; h < 2; h++)
                for (int q = 0; q < 2; q++) {
                    const __m128i eight = q ? _mm_srli_si128(codes[h], 8) : codes[h];
                    _mm256_storeu_ps(out + b * QBLOCK + h * 16 + q * 8,
                                     _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight)), d, m));
                }
        }
        break;
    }
    }
}
