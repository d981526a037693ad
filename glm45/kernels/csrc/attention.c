/* Causal attention over a prefill chunk for bf16 models, on CPUs with bf16 dot products (AVX512-BF16).
 *
 * Flash-attention's order of work: a tile of 12 query rows meets the keys 32 at a time; its scores stay in
 * registers as fp32 (bf16 products are exact, their sums fp32), an online softmax keeps each row's running
 * maximum and sum, and the tile's probabilities, rounded to bf16 as flash attention rounds them, are multiplied
 * into fp32 accumulators of the output. Nothing of size queries × keys is ever written to memory. Queries of
 * one KV head's group share its keys (grouped-query attention), read from the paged cache through the
 * sequence's slot list.
 *
 * Both products use vdpbf16ps, which multiplies adjacent pairs of bf16 values: the keys are packed so that one
 * vector holds a pair of dimensions of 16 keys ([D/2][keys][2]), the values so that one holds 16 dimensions of
 * a pair of keys ([keys/2][D][2]); a query's pair of dimensions, or a probability pair of two keys, is
 * broadcast against them. Twelve rows a tile keep 24 accumulators and the two key (or value) vectors in registers, so
 * each vector loaded serves 24 products: with tiles of 4 rows an Air-shaped layer (8 heads, 2 KV heads, 128
 * dimensions) took 21.9 ms at 2,048 tokens and 367–414 ms at 8,192 on the 2-core machine, with 8 rows 15.6 and 245,
 * with 12 (and 96-row work items) 16.2 and 228–239 (the two builds alternating in one process, outputs identical);
 * torch's CPU flash attention took 55 ms at 2,048.
 */
#include <omp.h>
#include <stdlib.h>

#include "common.h"

#if defined(__AVX512BF16__)
#define TILE_ROWS 12
#define TILE_KEYS 32
#define BLOCK_ROWS 96 /* query rows of one work item (a head's rows are split so both threads get work) */
#define MAX_DIM 256

/* e^x for x ≤ 0, exactly 0 for masked lanes (x = -inf). */
static inline __m512 exp_or_zero(__m512 x) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), vexp_nonpositive(x));
}

/* One tile of up to 4 query rows (query i of the chunk sits at position offset + i and sees keys 0..offset + i)
 * of query head h, against KV head g's packed keys kp [D/2][Tkp] and values vp [Tkp/2][D] (32-bit pairs). */
static void tile(const uint16_t *q, int64_t q_stride, const uint32_t *kp, const uint32_t *vp, int64_t Tkp, int64_t D,
                 int64_t first_row, int rows, int64_t offset, float scale, float *out, int64_t out_stride) {
    float acc[TILE_ROWS][MAX_DIM] __attribute__((aligned(64)));
    uint32_t probs[TILE_ROWS][TILE_KEYS / 2] __attribute__((aligned(64)));
    const uint32_t *qw[TILE_ROWS];
    float row_max[TILE_ROWS], row_sum[TILE_ROWS];
    int64_t last_key[TILE_ROWS];
    for (int r = 0; r < TILE_ROWS; r++) {
        const int rr = r < rows ? r : rows - 1; /* missing rows repeat the last one; their results are dropped */
        qw[r] = (const uint32_t *)(q + (first_row + rr) * q_stride);
        last_key[r] = offset + first_row + rr;
        row_max[r] = -INFINITY, row_sum[r] = 0.0f;
        memset(acc[r], 0, D * sizeof(float));
    }
    const int64_t end = last_key[TILE_ROWS - 1] + 1, pairs = D / 2;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t n0 = 0; n0 < end; n0 += TILE_KEYS) {
        __m512 s[TILE_ROWS][2];
        for (int r = 0; r < TILE_ROWS; r++) s[r][0] = s[r][1] = _mm512_setzero_ps();
        for (int64_t i = 0; i < pairs; i++) {
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + i * Tkp + n0);
            const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + i * Tkp + n0 + 16);
            for (int r = 0; r < TILE_ROWS; r++) {
                const __m512bh b = (__m512bh)_mm512_set1_epi32((int)qw[r][i]);
                s[r][0] = _mm512_dpbf16_ps(s[r][0], b, k0);
                s[r][1] = _mm512_dpbf16_ps(s[r][1], b, k1);
            }
        }
        for (int r = 0; r < TILE_ROWS; r++) {
            const __m512i first = _mm512_add_epi32(lane, _mm512_set1_epi32((int)n0));
            const __m512i limit = _mm512_set1_epi32((int)last_key[r]);
            const __mmask16 in0 = _mm512_cmple_epi32_mask(first, limit);
            const __mmask16 in1 = _mm512_cmple_epi32_mask(_mm512_add_epi32(first, _mm512_set1_epi32(16)), limit);
            const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
            const __m512 s0 = _mm512_mask_mul_ps(minus_inf, in0, s[r][0], _mm512_set1_ps(scale));
            const __m512 s1 = _mm512_mask_mul_ps(minus_inf, in1, s[r][1], _mm512_set1_ps(scale));
            const float tile_max = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
            const float new_max = tile_max > row_max[r] ? tile_max : row_max[r];
            __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
            if (new_max != -INFINITY) { /* a row's first tile always holds key 0, so only repeated rows skip */
                const __m512 m = _mm512_set1_ps(new_max);
                p0 = exp_or_zero(_mm512_sub_ps(s0, m));
                p1 = exp_or_zero(_mm512_sub_ps(s1, m));
                const float alpha = row_max[r] == -INFINITY ? 0.0f : expf(row_max[r] - new_max);
                row_sum[r] = row_sum[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
                if (alpha != 1.0f)
                    for (int64_t d = 0; d < D; d += 16)
                        _mm512_store_ps(acc[r] + d, _mm512_mul_ps(_mm512_load_ps(acc[r] + d), _mm512_set1_ps(alpha)));
                row_max[r] = new_max;
            }
            /* keys n0..n0+15 then n0+16..n0+31 as bf16: 16 pairs of adjacent keys */
            _mm512_store_si512(probs[r], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        }
        const int64_t key_pairs = (end - n0 < TILE_KEYS ? end - n0 + 1 : TILE_KEYS) / 2;
        const uint32_t *vtile = vp + (n0 / 2) * D;
        for (int64_t d = 0; d < D; d += 32) { /* 32 dimensions a pass: each broadcast serves two vectors */
            __m512 a[TILE_ROWS][2];
            for (int r = 0; r < TILE_ROWS; r++)
                a[r][0] = _mm512_load_ps(acc[r] + d), a[r][1] = _mm512_load_ps(acc[r] + d + 16);
            for (int64_t j = 0; j < key_pairs; j++) {
                const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vtile + j * D + d);
                const __m512bh v1 = (__m512bh)_mm512_loadu_si512(vtile + j * D + d + 16);
                for (int r = 0; r < TILE_ROWS; r++) {
                    const __m512bh b = (__m512bh)_mm512_set1_epi32((int)probs[r][j]);
                    a[r][0] = _mm512_dpbf16_ps(a[r][0], b, v0);
                    a[r][1] = _mm512_dpbf16_ps(a[r][1], b, v1);
                }
            }
            for (int r = 0; r < TILE_ROWS; r++)
                _mm512_store_ps(acc[r] + d, a[r][0]), _mm512_store_ps(acc[r] + d + 16, a[r][1]);
        }
    }
    for (int r = 0; r < rows; r++) {
        const __m512 inv = _mm512_set1_ps(1.0f / row_sum[r]);
        for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(out + (first_row + r) * out_stride + d, _mm512_mul_ps(_mm512_load_ps(acc[r] + d), inv));
    }
}

/* out[i, h] = softmax(scale · q[i, h] · Kᵀ) V over keys 0..Tk − Tq + i, for the Tq queries of one sequence's chunk:
 * q [Tq, H, D] bf16, out [Tq, H, D] fp32; key n of KV head g at k_cache[(slots[n] · KV + g) · D] (bf16), the same for
 * values. Returns 0, or -1 when the shape is not one this kernel takes (D not a multiple of 32, or above 256). */
int glm45_causal_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *slots,
                           float *out, int64_t Tq, int64_t Tk, int64_t H, int64_t KV, int64_t D, float scale,
                           int threads) {
    if (D % 32 != 0 || D > MAX_DIM || H % KV != 0 || Tq > Tk) return -1;
    const int64_t Tkp = (Tk + TILE_KEYS - 1) / TILE_KEYS * TILE_KEYS, pairs = D / 2, group = H / KV;
    uint32_t *kp = aligned_alloc(64, KV * pairs * Tkp * sizeof(uint32_t));
    uint32_t *vp = aligned_alloc(64, KV * (Tkp / 2) * D * sizeof(uint32_t));
    if (!kp || !vp) {
        free(kp), free(vp);
        return -1;
    }
    const int64_t blocks = (Tq + BLOCK_ROWS - 1) / BLOCK_ROWS, offset = Tk - Tq;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t n = 0; n < Tkp; n++) /* pack: padded keys are zeros */
            for (int64_t g = 0; g < KV; g++) {
                const uint32_t *krow = n < Tk ? (const uint32_t *)(k_cache + (slots[n] * KV + g) * D) : NULL;
                for (int64_t i = 0; i < pairs; i++) kp[(g * pairs + i) * Tkp + n] = krow ? krow[i] : 0;
            }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < Tkp / 2; j++)
            for (int64_t g = 0; g < KV; g++) {
                const uint16_t *v0 = 2 * j < Tk ? v_cache + (slots[2 * j] * KV + g) * D : NULL;
                const uint16_t *v1 = 2 * j + 1 < Tk ? v_cache + (slots[2 * j + 1] * KV + g) * D : NULL;
                uint32_t *dst = vp + (g * (Tkp / 2) + j) * D;
                for (int64_t d = 0; d < D; d++)
                    dst[d] = (v0 ? v0[d] : 0) | (uint32_t)(v1 ? v1[d] : 0) << 16;
            }
        /* later blocks see more keys: hand them out from the most expensive down */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < H * blocks; item++) {
            const int64_t block = blocks - 1 - item / H, h = item % H, g = h / group;
            const int64_t first = block * BLOCK_ROWS, last = first + BLOCK_ROWS < Tq ? first + BLOCK_ROWS : Tq;
            for (int64_t row = first; row < last; row += TILE_ROWS) {
                const int rows = last - row < TILE_ROWS ? (int)(last - row) : TILE_ROWS;
                tile(q + h * D, H * D, kp + g * pairs * Tkp, vp + g * (Tkp / 2) * D, Tkp, D, row, rows, offset, scale,
                     out + h * D, H * D);
            }
        }
    }
    free(kp), free(vp);
    return 0;
}
#else
int glm45_causal_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *slots,
                           float *out, int64_t Tq, int64_t Tk, int64_t H, int64_t KV, int64_t D, float scale,
                           int threads) {
    (void)q, (void)k_cache, (void)v_cache, (void)slots, (void)out, (void)Tq, (void)Tk, (void)H, (void)KV, (void)D;
    (void)scale, (void)threads;
    return -1; /* no bf16 dot products: torch's attention runs instead */
}
#endif
