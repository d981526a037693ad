/* The captured decode step: a list of ops (built once per batch size by glm45/engine/cpu_step_programs.py) run in
 * one OpenMP region, each op split over the threads, with a barrier between ops. Compared with one torch call per
 * small op, a step then costs its bytes: no Python, no dispatcher, no fork/join per op.
 *
 * Rows: a step has R rows (tokens); row r has a token, a position, a KV slot, a block-table row and a context
 * length. Padding rows write their K/V to a scratch block and are ignored. Activations are fp32 buffers; with
 * the program's `round_bf16` set, values are rounded to bf16 where a bf16 model rounds in torch, so the result
 * follows the eager path's arithmetic (the matrix products sum in another order).
 *
 * Op slots (Op.p = pointers, Op.n = integers, Op.f = floats) are listed per kind below.
 */
#include <omp.h>
#include <sched.h>
#include "common.h"
#include "sample.h"

enum {
    OP_EMBED = 1,    /* p: Weight*, tokens(i64), out | n: R, ld_out */
    OP_RMSNORM = 2,  /* p: x, weight, out, add(or NULL) | n: R, D, ld_x, ld_out, ld_add | f: eps
                        x += add (in place, rounded) when add; out = weight * rms_norm(x) */
    OP_QUANT = 3,    /* p: x, xq, xd, xs | n: R, K, ld_x */
    OP_LINEAR = 4,   /* p: x, xq, xd, xs, (Weight*, out) × up to 3 | n: R, ld_x, count, ld_out × 3, ld_xq */
    OP_QK_ROPE = 5,  /* p: qkv, q_norm, k_norm, positions(i64), k_cache, v_cache, slots(i64), inv_freq,
                        rope table(f32 [R, rotary_dim])
                        | n: R, Hq, Hkv, hd, rotary_dim, ld_qkv, kv_dtype, fill_table | f: eps */
    OP_ATTN = 6,     /* p: qkv, k_cache, v_cache, tables(i32 [R, max_blocks]), ctx_lens(i32), out, scratch
                        | n: R, Hq, Hkv, hd, block_size, max_blocks, ld_qkv, ld_out, kv_dtype, scratch_per_thread
                        | f: scale   (scratch: f32 [threads, scratch_per_thread], see op_attn) */
    OP_SILU_MUL = 7, /* p: gate_up, out | n: rows, I, ld_in, ld_out  (gate = cols [0, I), up = [I, 2I)) */
    OP_ROUTER = 8,   /* p: x, weight(f32 [E, D]), bias(f32 [E]), ids(i64 [R, K]), weights(f32 [R, K])
                        | n: R, D, E, K, n_group, topk_group, norm_topk, ld_x | f: scaling */
    OP_GROUPED = 9,  /* p: x, xq, xd, xs, Weight*, ids(i64 [P]), out | n: P, rows_per_input, ld_x, ld_out, ld_xq */
    OP_COMBINE = 10, /* p: expert_out, weights, shared, out | n: R, K, D, ld_out
                        out = (Σ_k expert_out[r·K + k] · w[r, k]) + shared[r] */
    OP_GATHER = 11,  /* p: src, rows(i64), out | n: count, D, ld_src, ld_out */
    OP_LORA = 12,    /* p: x, slots(i64 [R]), t(f32 [R, rank]), delta(f32 [R, ld_delta]),
                        (A(f32 [S, rank, K]), Bt(f32 [S, rank, N]), out) × up to 3
                        | n: R, K, rank, ld_x, none, count, ld_delta, (N, ld_out) × 3
                        out_j[r] += Bt_j[slots[r]]ᵀ · (A_j[slots[r]] · x[r]), rounded like the eager path's bf16
                        add; rows whose slot is `none` (base rows) are skipped */
    OP_VERIFY = 13,  /* p: logits, tokens(i64 [R]), q(f32 [S, ldq]), params(SampleRow [S]), u(f32 [S, 5]),
                        next(i64 [R]), accepted(i64 [S]), probs(f32 [R, ldp]), scratch(f32 [threads, 5V])
                        | n: R, V, ld, ldq, ldp, scratch_per_thread   (see op_verify) */
    OP_DRAFT = 14,   /* p: draft logits, params, u, accepted, drafts(i64 [R]), q_out(f32 [S, ldq]), scratch
                        | n: R, V, ld, ldq, scratch_per_thread   (see op_draft) */
    OP_MASK = 15,    /* p: logits, bitmask(i32 [R, W]), masked(i64 [R]) | n: R, V, ld, W
                        rows with masked[r] ≠ 0: logits of tokens whose bit is clear (bit j of word w: token
                        32w + j, xgrammar's layout) become -inf */
    OP_ADVANCE = 16, /* p: logits, params(SampleRow [R]), u(f32 [steps, ld_steps]), run(i64 [step, live rows]),
                        tokens(i64), positions(i64), slots(i64), tables(i32 [R, max_blocks]), context(i32),
                        out(i64 [steps, ld_steps]), scratch(f32 [threads, scratch_per_thread]),
                        run_end(i64 [R, RUN_END])
                        | n: ld_steps, V, ld, block_size, max_blocks, scratch_per_thread   (see op_advance) */
    OP_ADVANCE_DRAFT = 17, /* p: next(i64 [R]), accepted(i64 [S]), drafts(i64 [R]), params(SampleRow [S]),
                              q_out(f32 [S, ldq]), q_in(f32 [S, ldq]), u(f32 [S, 5]), run_u(f32 [steps + 1, S, 5]),
                              run(i64 [step, live sequences]), tokens(i64), positions(i64), slots(i64),
                              tables(i32 [R, max_blocks]), context(i32), out(i64 [steps, S, 2]),
                              run_end(i64 [S, RUN_END])
                              | n: S, V, ldq, block_size, max_blocks   (see op_advance_draft) */
};
enum { KV_F32 = 0, KV_BF16 = 1, KV_FP8 = 2 };

typedef struct {
    int64_t kind;
    void *p[16];
    int64_t n[16];
    float f[4];
} Op;


static inline float kv_load(const void *cache, int64_t i, int64_t dtype) {
    if (dtype == KV_BF16) return bf16_to_f32(((const uint16_t *)cache)[i]);
    if (dtype == KV_FP8) return fp8_to_f32(((const uint8_t *)cache)[i]);
    return ((const float *)cache)[i];
}

static inline void kv_store(void *cache, int64_t i, float v, int64_t dtype) {
    if (dtype == KV_BF16) {
        ((uint16_t *)cache)[i] = f32_to_bf16(v);
    } else if (dtype == KV_FP8) {
        ((uint8_t *)cache)[i] = f32_to_fp8(v);
    } else {
        ((float *)cache)[i] = v;
    }
}

static void op_rmsnorm(const Op *op, int ith, int nth, int round) {
    float *x = op->p[0], *add = op->p[3];
    const float *w = op->p[1];
    float *out = op->p[2];
    int64_t r0, r1, D = op->n[1];
    split_range(op->n[0], ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        float *xr = x + r * op->n[2];
        if (add)
            for (int64_t i = 0; i < D; i++) xr[i] = rnd(xr[i] + add[r * op->n[4] + i], round);
        rms_row(xr, w, out + r * op->n[3], D, op->f[0], round);
    }
}

static void op_linear(const Op *op, int ith, int nth, int round) {
    Act a = {op->p[0], op->n[0], op->n[6], op->n[1], op->p[1], op->p[2], op->p[3]};
    int64_t count = op->n[2], total = 0;
    for (int64_t j = 0; j < count; j++) total += ((const Weight *)op->p[4 + 2 * j])->N;
    int64_t i0, i1;
    split_range(total, ith, nth, 16, &i0, &i1);
    int64_t offset = 0;
    for (int64_t j = 0; j < count && i0 < i1; j++) {
        const Weight *w = op->p[4 + 2 * j];
        int64_t b = i0 - offset > 0 ? i0 - offset : 0, e = i1 - offset < w->N ? i1 - offset : w->N;
        if (b < e) {
            weight_rows(w, 0, b, e, &a, 0, a.M, op->p[5 + 2 * j], op->n[3 + j], round);
        }
        offset += w->N;
    }
}

/* rotate-half on one head's first 2·half dims: x_rot·cos + rotate_half(x_rot)·sin, rounded like torch */
static void rope_head(float *v, const float *cs, const float *sn, int64_t half, int round) {
    int64_t i = 0;
    for (; i + VL <= half; i += VL) {
        const vf a = vload(v + i), b = vload(v + i + half), c = vload(cs + i), s = vload(sn + i);
        vf lo0 = vmul(a, c), lo1 = vmul(b, s), hi0 = vmul(b, c), hi1 = vmul(a, s);
        if (round) lo0 = vround_bf16(lo0), lo1 = vround_bf16(lo1), hi0 = vround_bf16(hi0), hi1 = vround_bf16(hi1);
        const vf lo = vsub(lo0, lo1), hi = vadd(hi0, hi1); /* rounding is symmetric: rnd(-x) = -rnd(x) */
        vstore(v + i, round ? vround_bf16(lo) : lo);
        vstore(v + i + half, round ? vround_bf16(hi) : hi);
    }
    for (; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = rnd(rnd(a * cs[i], round) + rnd(-b * sn[i], round), round);
        v[i + half] = rnd(rnd(b * cs[i], round) + rnd(a * sn[i], round), round);
    }
}

/* QK-norm, RoPE and the K/V cache write of each row. cos and sin of a row's angles are computed by the program's
 * first QK_ROPE op (n[7] = 1) into the table (p[8]: [R, rotary_dim], cos then sin) and read by the others: every
 * layer rotates the same positions. */
static void op_qk_rope(const Op *op, int ith, int nth, int round) {
    float *qkv = op->p[0], *table = op->p[8];
    const float *qn = op->p[1], *kn = op->p[2], *inv_freq = op->p[7];
    const int64_t *pos = op->p[3], *slots = op->p[6];
    const int64_t Hq = op->n[1], Hkv = op->n[2], hd = op->n[3], rd = op->n[4], ld = op->n[5], dt = op->n[6];
    const int64_t half = rd / 2;
    int64_t r0, r1;
    split_range(op->n[0], ith, nth, 1, &r0, &r1);
    float tmp[1024];
    for (int64_t r = r0; r < r1; r++) {
        float *cs = table + r * rd, *sn = cs + half;
        if (op->n[7])
            for (int64_t i = 0; i < half; i++) {
                const float angle = (float)pos[r] * inv_freq[i];
                cs[i] = rnd(cosf(angle), round);
                sn[i] = rnd(sinf(angle), round);
            }
        float *row = qkv + r * ld;
        for (int64_t h = 0; h < Hq + Hkv; h++) {
            float *v = row + h * hd;
            const float *norm = h < Hq ? qn : kn;
            if (norm) {
                rms_row(v, norm, tmp, hd, op->f[0], round);
                memcpy(v, tmp, hd * sizeof(float));
            }
            rope_head(v, cs, sn, half, round);
        }
        /* K and V of this token into its cache slot */
        const float *k = row + Hq * hd, *vv = row + (Hq + Hkv) * hd;
        const int64_t at = slots[r] * Hkv * hd;
        if (dt == KV_F32) {
            memcpy((float *)op->p[4] + at, k, Hkv * hd * sizeof(float));
            memcpy((float *)op->p[5] + at, vv, Hkv * hd * sizeof(float));
            continue;
        }
        int64_t i = 0;
        if (dt == KV_BF16)
            for (; i + VL <= Hkv * hd; i += VL) {
                vstore_bf16((uint16_t *)op->p[4] + at + i, vload(k + i));
                vstore_bf16((uint16_t *)op->p[5] + at + i, vload(vv + i));
            }
        for (; i < Hkv * hd; i++) {
            kv_store(op->p[4], at + i, k[i], dt);
            kv_store(op->p[5], at + i, vv[i], dt);
        }
    }
}

static inline vf kv_vec(const void *cache, int64_t i, int64_t dtype) {
    if (dtype == KV_BF16) return vload_bf16((const uint16_t *)cache + i);
    if (dtype == KV_FP8) return vmul(vload_fp8((const uint8_t *)cache + i), vset1(FP8_RESCALE));
    return vload((const float *)cache + i);
}

/* Decode attention, flash-decoding's order of work. A work item is one KV head of a run of up to ATTN_RUN rows of
 * one sequence (consecutive positions: a verification's draft rows, a short prefill chunk); its queries are those
 * rows' query heads of the KV head's group, each seeing the keys before its own length. The keys go by in tiles of
 * ATTN_TILE: each tile's K and V are read from the paged cache once, widened to fp32 into the thread's scratch,
 * and met by every query of the item; scores go four keys at a time (one transposing add tree for four dot
 * products), and an online softmax keeps each query's running maximum and sum, rescaling its accumulator when the
 * maximum grows. Scratch per thread: keys and values [ATTN_TILE, hd], then the scores [Q, ATTN_TILE], accumulators
 * [Q, hd], maxima and sums of its Q ≤ ATTN_RUN · group queries (glm45_attention_scratch). hd is a multiple of VL. */
#define ATTN_TILE 32
#define ATTN_RUN 4
#define ATTN_PREFETCH 32 /* keys ahead whose K and V rows are prefetched (into L2, see prefetch_kv) */
#define ATTN_MAX_ROWS 4096
#define ATTN_SPLIT_KEYS 256 /* the fewest keys a thread takes when a KV head's keys are split */

/* How many rows from r on (at most ATTN_RUN) are consecutive positions of one sequence: the same block table
 * and context lengths stepping by one. */
static int64_t sequence_run(const int32_t *tables, const int32_t *ctx, int64_t mb, int64_t bs, int64_t r, int64_t R) {
    int64_t n = 1;
    while (r + n < R && n < ATTN_RUN && ctx[r + n] == ctx[r + n - 1] + 1 &&
           !memcmp(tables + (r + n) * mb, tables + r * mb, (size_t)((ctx[r + n] + bs - 1) / bs) * sizeof(int32_t)))
        n++;
    return n;
}

/* Element offset of KV head kvh's row for key t in a paged cache ([slot, Hkv, hd]), and a prefetch of the K and V
 * rows ATTN_PREFETCH keys ahead (one head's row every Hkv·hd elements is too sparse for the hardware prefetchers).
 * The prefetch goes to L2, not L1: with 64 sequences' caches streaming from memory (2 threads, 34 MB a call),
 * 32 keys ahead into L2 ran the op at 14–15 GB/s against 9–10 GB/s for 16 keys ahead into L1, which holds fewer
 * misses in flight; a cache that fits the last-level cache, or one sequence, ran as before. */
static inline int64_t kv_row(const int32_t *table, int64_t t, int64_t bs, int64_t Hkv, int64_t hd, int64_t kvh) {
    return ((int64_t)table[t / bs] * bs + t % bs) * Hkv * hd + kvh * hd;
}

static inline __attribute__((always_inline)) void prefetch_kv(const void *kc, const void *vc, const int32_t *table, int64_t t, int64_t L, int64_t bs,
                               int64_t Hkv, int64_t hd, int64_t kvh, int64_t kv_size) {
    if (t + ATTN_PREFETCH >= L) return;
    const int64_t next = kv_row(table, t + ATTN_PREFETCH, bs, Hkv, hd, kvh) * kv_size;
    for (int64_t b = 0; b < hd * kv_size; b += 64) {
        _mm_prefetch((const char *)kc + next + b, _MM_HINT_T1);
        _mm_prefetch((const char *)vc + next + b, _MM_HINT_T1);
    }
}

/* A query's scores over one tile (n keys) → e^(s·scale − m) in place, with its running maximum m and sum
 * updated; returns the factor its accumulator is rescaled by (0 on its first tile, when m was -inf). */
static inline float softmax_tile(float *s, int64_t n, float scale, float *row_max, float *row_sum) {
    float mx = *row_max;
    for (int64_t i = 0; i < n; i++) {
        s[i] *= scale;
        mx = s[i] > mx ? s[i] : mx;
    }
    const float rescale = expf(*row_max - mx);
    *row_max = mx;
    vf total = vzero();
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        const vf e = vexp_nonpositive(vsub(vload(s + i), vset1(mx)));
        vstore(s + i, e);
        total = vadd(total, e);
    }
    float sum = vhsum(total);
    for (; i < n; i++) sum += (s[i] = expf(s[i] - mx));
    *row_sum = *row_sum * rescale + sum;
    return rescale;
}

static void attend_run_fp32(const Op *op, int64_t r0, int64_t rows, int64_t kvh, int64_t begin, int64_t end,
                            float *scratch) {
    const float *qkv = op->p[0];
    const void *kc = op->p[1], *vc = op->p[2];
    const int32_t *table = (const int32_t *)op->p[3] + r0 * op->n[5], *ctx = (const int32_t *)op->p[4] + r0;
    const int64_t Hq = op->n[1], Hkv = op->n[2], hd = op->n[3], bs = op->n[4], ldq = op->n[6];
    const int64_t dt = op->n[8], group = Hq / Hkv, Q = rows * group;
    const int64_t L = ctx[rows - 1] < end ? ctx[rows - 1] : end; /* keys [begin, L) of this part */
    const int64_t kv_size = dt == KV_F32 ? 4 : dt == KV_BF16 ? 2 : 1;
    const float scale = op->f[0];
    float *keys = scratch, *values = keys + ATTN_TILE * hd, *scores = values + ATTN_TILE * hd;
    float *acc = scores + Q * ATTN_TILE, *row_max = acc + Q * hd, *row_sum = row_max + Q;
    for (int64_t i = 0; i < Q; i++) {
        row_max[i] = -INFINITY, row_sum[i] = 0.0f;
        memset(acc + i * hd, 0, hd * sizeof(float));
    }
    for (int64_t t0 = begin; t0 < L; t0 += ATTN_TILE) {
        const int64_t tn = L - t0 < ATTN_TILE ? L - t0 : ATTN_TILE;
        for (int64_t i = 0; i < tn; i++) {
            const int64_t t = t0 + i, base = kv_row(table, t, bs, Hkv, hd, kvh);
            prefetch_kv(kc, vc, table, t, L, bs, Hkv, hd, kvh, kv_size);
            for (int64_t d = 0; d < hd; d += VL) {
                vstore(keys + i * hd + d, kv_vec(kc, base + d, dt));
                vstore(values + i * hd + d, kv_vec(vc, base + d, dt));
            }
        }
        /* The queries of a row see the same keys: they go two at a time, sharing each key and value load. */
        int64_t pair;
        for (int64_t qi = 0; qi < Q; qi += 1 + pair) {
            const int64_t j = qi / group, n = ctx[j] - t0 < tn ? ctx[j] - t0 : tn;
            pair = qi + 1 < Q && (qi + 1) / group == j;
            if (n <= 0) continue; /* this row's keys ended in an earlier tile */
            const float *q0 = qkv + (r0 + j) * ldq + (kvh * group + qi % group) * hd, *q1 = q0 + hd * pair;
            float *s0 = scores + qi * ATTN_TILE, *s1 = s0 + ATTN_TILE * pair;
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) {
                vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
                vf b0 = vzero(), b1 = vzero(), b2 = vzero(), b3 = vzero();
                const float *k = keys + i * hd;
                for (int64_t d = 0; d < hd; d += VL) {
                    const vf x0 = vload(q0 + d), x1 = vload(q1 + d);
                    const vf k0 = vload(k + d), k1 = vload(k + hd + d), k2 = vload(k + 2 * hd + d),
                             k3 = vload(k + 3 * hd + d);
                    a0 = vfma(x0, k0, a0), a1 = vfma(x0, k1, a1), a2 = vfma(x0, k2, a2), a3 = vfma(x0, k3, a3);
                    b0 = vfma(x1, k0, b0), b1 = vfma(x1, k1, b1), b2 = vfma(x1, k2, b2), b3 = vfma(x1, k3, b3);
                }
                vhsum4(a0, a1, a2, a3, s0 + i);
                vhsum4(b0, b1, b2, b3, s1 + i);
            }
            for (; i < n; i++) {
                vf a = vzero(), b = vzero();
                for (int64_t d = 0; d < hd; d += VL) {
                    const vf k = vload(keys + i * hd + d);
                    a = vfma(vload(q0 + d), k, a), b = vfma(vload(q1 + d), k, b);
                }
                s0[i] = vhsum(a), s1[i] = vhsum(b);
            }
            float rescale[2];
            for (int c = 0; c <= pair; c++) rescale[c] = softmax_tile(c ? s1 : s0, n, scale, row_max + qi + c,
                                                                      row_sum + qi + c);
            /* a += Σ_i p_i · v_i, a slice of the dimensions at a time in registers */
            float *acc0 = acc + qi * hd, *acc1 = acc0 + hd * pair;
            for (int64_t d0 = 0; d0 < hd; d0 += 4 * VL) {
                const int64_t width = hd - d0 < 4 * VL ? (hd - d0) / VL : 4;
                vf o0[4], o1[4];
                for (int w = 0; w < width; w++) {
                    o0[w] = vmul(vload(acc0 + d0 + w * VL), vset1(rescale[0]));
                    o1[w] = vmul(vload(acc1 + d0 + w * VL), vset1(rescale[pair]));
                }
                for (i = 0; i < n; i++) {
                    const vf p0 = vset1(s0[i]), p1 = vset1(s1[i]);
                    const float *v = values + i * hd + d0;
                    for (int w = 0; w < width; w++) {
                        const vf x = vload(v + w * VL);
                        o0[w] = vfma(p0, x, o0[w]), o1[w] = vfma(p1, x, o1[w]);
                    }
                }
                for (int w = 0; w < width; w++) {
                    vstore(acc1 + d0 + w * VL, o1[w]); /* the same row as acc0 for a lone query: acc0 wins */
                    vstore(acc0 + d0 + w * VL, o0[w]);
                }
            }
        }
    }
}

#if defined(__AVX512BF16__)
/* attend_run for a bf16 model's bf16 cache on CPUs with bf16 dot products (vdpbf16ps, 32 products a vector): the
 * queries (bf16 values already: the step rounds them) and the keys are multiplied as bf16 pairs straight from the
 * cache, and each tile's values are packed two keys to a 32-bit lane, so that a probability pair (rounded to bf16,
 * as flash attention and torch's CPU kernel round them) is broadcast against 16 dimensions of both keys. Same
 * results layout as attend_run (finish_run combines them); needs rows · group ≤ 3 · ATTN_TILE and hd % 32 == 0. */
static void attend_run_bf16(const Op *op, int64_t r0, int64_t rows, int64_t kvh, int64_t begin, int64_t end,
                            float *scratch) {
    const float *qkv = op->p[0];
    const uint16_t *kc = op->p[1], *vc = op->p[2];
    const int32_t *table = (const int32_t *)op->p[3] + r0 * op->n[5], *ctx = (const int32_t *)op->p[4] + r0;
    const int64_t Hq = op->n[1], Hkv = op->n[2], hd = op->n[3], bs = op->n[4], ldq = op->n[6];
    const int64_t group = Hq / Hkv, Q = rows * group, chunks = hd / 32;
    const int64_t L = ctx[rows - 1] < end ? ctx[rows - 1] : end;
    const float scale = op->f[0];
    uint16_t *qb = (uint16_t *)scratch;                          /* [Q, hd] bf16 queries */
    uint32_t *packed = (uint32_t *)(scratch + Q * hd / 2);       /* [ATTN_TILE / 2, hd] value pairs */
    float *scores = scratch + 2 * ATTN_TILE * hd;
    float *acc = scores + Q * ATTN_TILE, *row_max = acc + Q * hd, *row_sum = row_max + Q;
    const uint16_t *key[ATTN_TILE];
    for (int64_t qi = 0; qi < Q; qi++) {
        const float *q = qkv + (r0 + qi / group) * ldq + (kvh * group + qi % group) * hd;
        for (int64_t d = 0; d < hd; d += 16)
            _mm256_storeu_si256((__m256i *)(qb + qi * hd + d), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(q + d)));
        row_max[qi] = -INFINITY, row_sum[qi] = 0.0f;
        memset(acc + qi * hd, 0, hd * sizeof(float));
    }
    for (int64_t t0 = begin; t0 < L; t0 += ATTN_TILE) {
        const int64_t tn = L - t0 < ATTN_TILE ? L - t0 : ATTN_TILE;
        for (int64_t i = 0; i < tn; i++) {
            const int64_t t = t0 + i;
            key[i] = kc + kv_row(table, t, bs, Hkv, hd, kvh);
            prefetch_kv(kc, vc, table, t, L, bs, Hkv, hd, kvh, 2);
        }
        for (int64_t i = 0; i < tn; i += 2) { /* value pairs: key i in the low half of each lane, key i + 1 high */
            const uint16_t *v0 = vc + (key[i] - kc), *v1 = i + 1 < tn ? vc + (key[i + 1] - kc) : NULL;
            for (int64_t d = 0; d < hd; d += 16) {
                const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v0 + d)));
                const __m512i hi = v1 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                            _mm256_loadu_si256((const __m256i *)(v1 + d))), 16)
                                      : _mm512_setzero_si512();
                _mm512_storeu_si512(packed + (i / 2) * hd + d, _mm512_or_si512(lo, hi));
            }
        }
        int64_t pair;
        for (int64_t qi = 0; qi < Q; qi += 1 + pair) {
            const int64_t j = qi / group, n = ctx[j] - t0 < tn ? ctx[j] - t0 : tn;
            pair = qi + 1 < Q && (qi + 1) / group == j;
            if (n <= 0) continue;
            const uint16_t *x0 = qb + qi * hd, *x1 = x0 + hd * pair;
            float *s0 = scores + qi * ATTN_TILE, *s1 = s0 + ATTN_TILE * pair;
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) {
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
                for (int64_t c = 0; c < chunks; c++) {
                    const __m512bh y0 = (__m512bh)_mm512_loadu_si512(x0 + 32 * c);
                    const __m512bh y1 = (__m512bh)_mm512_loadu_si512(x1 + 32 * c);
                    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(key[i] + 32 * c);
                    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(key[i + 1] + 32 * c);
                    const __m512bh k2 = (__m512bh)_mm512_loadu_si512(key[i + 2] + 32 * c);
                    const __m512bh k3 = (__m512bh)_mm512_loadu_si512(key[i + 3] + 32 * c);
                    a0 = _mm512_dpbf16_ps(a0, y0, k0), a1 = _mm512_dpbf16_ps(a1, y0, k1);
                    a2 = _mm512_dpbf16_ps(a2, y0, k2), a3 = _mm512_dpbf16_ps(a3, y0, k3);
                    b0 = _mm512_dpbf16_ps(b0, y1, k0), b1 = _mm512_dpbf16_ps(b1, y1, k1);
                    b2 = _mm512_dpbf16_ps(b2, y1, k2), b3 = _mm512_dpbf16_ps(b3, y1, k3);
                }
                vhsum4(a0, a1, a2, a3, s0 + i);
                vhsum4(b0, b1, b2, b3, s1 + i);
            }
            for (; i < n; i++) {
                __m512 a = _mm512_setzero_ps(), b = a;
                for (int64_t c = 0; c < chunks; c++) {
                    const __m512bh k = (__m512bh)_mm512_loadu_si512(key[i] + 32 * c);
                    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(x0 + 32 * c), k);
                    b = _mm512_dpbf16_ps(b, (__m512bh)_mm512_loadu_si512(x1 + 32 * c), k);
                }
                s0[i] = _mm512_reduce_add_ps(a), s1[i] = _mm512_reduce_add_ps(b);
            }
            float rescale[2];
            for (int c = 0; c <= pair; c++) {
                float *sc = c ? s1 : s0;
                rescale[c] = softmax_tile(sc, n, scale, row_max + qi + c, row_sum + qi + c);
                uint16_t *pb = (uint16_t *)sc; /* the probabilities in bf16, in place (each write trails its read) */
                int64_t k = 0;
                for (; k + 16 <= n; k += 16)
                    _mm256_storeu_si256((__m256i *)(pb + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sc + k)));
                for (; k < n; k++) pb[k] = f32_to_bf16(sc[k]);
                if (n & 1) pb[n] = 0; /* the odd last key's partner */
            }
            const uint16_t *p0 = (const uint16_t *)s0, *p1 = (const uint16_t *)s1;
            float *acc0 = acc + qi * hd, *acc1 = acc0 + hd * pair;
            for (int64_t d0 = 0; d0 < hd; d0 += 64) {
                const int64_t width = hd - d0 < 64 ? (hd - d0) / 16 : 4;
                __m512 o0[4], o1[4];
                for (int w = 0; w < width; w++) {
                    o0[w] = _mm512_mul_ps(_mm512_loadu_ps(acc0 + d0 + 16 * w), _mm512_set1_ps(rescale[0]));
                    o1[w] = _mm512_mul_ps(_mm512_loadu_ps(acc1 + d0 + 16 * w), _mm512_set1_ps(rescale[pair]));
                }
                for (i = 0; i < n; i += 2) {
                    uint32_t w0, w1;
                    memcpy(&w0, p0 + i, 4), memcpy(&w1, p1 + i, 4);
                    const __m512bh e0 = (__m512bh)_mm512_set1_epi32((int)w0), e1 = (__m512bh)_mm512_set1_epi32((int)w1);
                    const uint32_t *v = packed + (i / 2) * hd + d0;
                    for (int w = 0; w < width; w++) {
                        const __m512bh x = (__m512bh)_mm512_loadu_si512(v + 16 * w);
                        o0[w] = _mm512_dpbf16_ps(o0[w], e0, x), o1[w] = _mm512_dpbf16_ps(o1[w], e1, x);
                    }
                }
                for (int w = 0; w < width; w++) {
                    _mm512_storeu_ps(acc1 + d0 + 16 * w, o1[w]);
                    _mm512_storeu_ps(acc0 + d0 + 16 * w, o0[w]);
                }
            }
        }
    }
}
#endif

/* The output of a run of rows for one KV head from the partial results of `parts` threads' scratch (consecutive,
 * the first at `scratch`), each over its own range of keys: o = Σ_s e^(m_s − M) acc_s / Σ_s e^(m_s − M) l_s. */
static void finish_run(const Op *op, int64_t r0, int64_t rows, int64_t kvh, const float *scratch, int64_t parts,
                       int round) {
    const int64_t Hq = op->n[1], Hkv = op->n[2], hd = op->n[3], ldo = op->n[7], stride = op->n[9];
    const int64_t group = Hq / Hkv, Q = rows * group, acc_at = 2 * ATTN_TILE * hd + Q * ATTN_TILE;
    float *out = op->p[5];
    for (int64_t qi = 0; qi < Q; qi++) {
        float top = -INFINITY, total = 0.0f, weight[64];
        for (int64_t s = 0; s < parts; s++) {
            const float m = scratch[s * stride + acc_at + Q * hd + qi];
            top = m > top ? m : top;
        }
        for (int64_t s = 0; s < parts; s++) {
            const float *part = scratch + s * stride + acc_at;
            weight[s] = part[Q * hd + qi] == -INFINITY ? 0.0f : expf(part[Q * hd + qi] - top);
            total += weight[s] * part[Q * hd + Q + qi];
        }
        float *o = out + (r0 + qi / group) * ldo + (kvh * group + qi % group) * hd;
        for (int64_t d = 0; d < hd; d++) {
            float sum = 0.0f;
            for (int64_t s = 0; s < parts; s++) sum += weight[s] * scratch[s * stride + acc_at + qi * hd + d];
            o[d] = rnd(sum / total, round);
        }
    }
}

/* The scratch one thread of op_attn needs, in floats. */
int64_t glm45_attention_scratch(int64_t hd, int64_t group) {
    return 2 * ATTN_TILE * hd + ATTN_RUN * group * (ATTN_TILE + hd + 2);
}

/* Work: runs × KV heads. With fewer of them than threads, each one's keys are split into as many parts as there are
 * threads for it (at least ATTN_SPLIT_KEYS keys a part), each thread keeps its part's partial result in its scratch,
 * and after a barrier the first thread of each item combines them. */
typedef void (*AttendFn)(const Op *, int64_t, int64_t, int64_t, int64_t, int64_t, float *);

static void op_attn(const Op *op, int ith, int nth, int round) {
    const int32_t *tables = op->p[3], *ctx = op->p[4];
    const int64_t R = op->n[0], Hkv = op->n[2], bs = op->n[4], mb = op->n[5];
    AttendFn attend_run = attend_run_fp32;
#if defined(__AVX512BF16__)
    /* a bf16 model's queries are bf16 values, so their products with a bf16 cache's keys are exact either way */
    if (round && op->n[8] == KV_BF16 && op->n[3] % 32 == 0 && ATTN_RUN * (op->n[1] / Hkv) <= 3 * ATTN_TILE)
        attend_run = attend_run_bf16;
#endif
    float *scratch = (float *)op->p[6] + (int64_t)ith * op->n[9];
    int64_t i0, i1;
    if (R > ATTN_MAX_ROWS) { /* beyond any captured size: every row on its own */
        split_range(R * Hkv, ith, nth, 1, &i0, &i1);
        for (int64_t i = i0; i < i1; i++) {
            attend_run(op, i / Hkv, 1, i % Hkv, 0, INT64_MAX, scratch);
            finish_run(op, i / Hkv, 1, i % Hkv, scratch, 1, round);
        }
        return;
    }
    int64_t starts[ATTN_MAX_ROWS], lengths[ATTN_MAX_ROWS], runs = 0, longest = 0;
    for (int64_t r = 0; r < R; r += lengths[runs++]) {
        starts[runs] = r;
        lengths[runs] = sequence_run(tables, ctx, mb, bs, r, R);
        const int64_t L = ctx[r + lengths[runs] - 1];
        longest = L > longest ? L : longest;
    }
    const int64_t items = runs * Hkv;
    int64_t parts = items < nth ? nth / items : 1;
    if (parts > longest / ATTN_SPLIT_KEYS) parts = longest / ATTN_SPLIT_KEYS > 1 ? longest / ATTN_SPLIT_KEYS : 1;
    if (parts > 64) parts = 64;
    if (parts == 1) {
        split_range(items, ith, nth, 1, &i0, &i1);
        for (int64_t i = i0; i < i1; i++) {
            attend_run(op, starts[i / Hkv], lengths[i / Hkv], i % Hkv, 0, INT64_MAX, scratch);
            finish_run(op, starts[i / Hkv], lengths[i / Hkv], i % Hkv, scratch, 1, round);
        }
        return;
    }
    const int64_t item = ith / parts, part = ith % parts; /* threads ≥ items · parts have no part */
    if (item < items) {
        const int64_t r0 = starts[item / Hkv], rows = lengths[item / Hkv], L = ctx[r0 + rows - 1];
        const int64_t chunk = (L + parts - 1) / parts, span = (chunk + ATTN_TILE - 1) / ATTN_TILE * ATTN_TILE;
        attend_run(op, r0, rows, item % Hkv, part * span, (part + 1) * span, scratch);
    }
#pragma omp barrier
    if (item < items && part == 0)
        finish_run(op, starts[item / Hkv], lengths[item / Hkv], item % Hkv, scratch, parts, round);
}

static void op_silu_mul(const Op *op, int ith, int nth, int round) {
    const float *in = op->p[0];
    float *out = op->p[1];
    const int64_t I = op->n[1];
    int64_t r0, r1;
    split_range(op->n[0], ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) silu_mul_row(in + r * op->n[2], out + r * op->n[3], I, round);
}

static void op_router(const Op *op, int ith, int nth) {
    const float *x = op->p[0], *bias = op->p[2];
    const void *W = op->p[1];
    int64_t *ids = op->p[3];
    float *wout = op->p[4];
    const int64_t D = op->n[1], E = op->n[2], K = op->n[3], G = op->n[4], TG = op->n[5], ld = op->n[7];
    int64_t r0, r1;
    split_range(op->n[0], ith, nth, 1, &r0, &r1);
    float score[1024], choice[1024];
    for (int64_t r = r0; r < r1; r++) {
        const Weight router = {FMT_F32, E, D, 1, 0, W, NULL, NULL, NULL};
        const Act a = {x, op->n[0], D, ld, NULL, NULL, NULL};
        weight_rows(&router, 0, 0, E, &a, r, 1, score - r * E, E, 0);  /* score[e] = x[r] · W[e] */
        for (int64_t e = 0; e < E; e++) {
            score[e] = 1.0f / (1.0f + expf(-score[e]));
            choice[e] = score[e] + bias[e];
        }
        if (G > 1) { /* keep the topk_group groups with the best sums of their two best biased scores */
            const int64_t per = E / G;
            float gscore[64];
            int keep[64] = {0};
            for (int64_t g = 0; g < G; g++) {
                float a = -INFINITY, b = -INFINITY;
                for (int64_t e = g * per; e < (g + 1) * per; e++) {
                    if (choice[e] > a) { b = a; a = choice[e]; } else if (choice[e] > b) { b = choice[e]; }
                }
                gscore[g] = a + b;
            }
            for (int64_t t = 0; t < TG; t++) {
                int64_t best = -1;
                for (int64_t g = 0; g < G; g++)
                    if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
                keep[best] = 1;
            }
            for (int64_t e = 0; e < E; e++)
                if (!keep[e / per]) choice[e] = -INFINITY;
        }
        float total = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (choice[e] != -INFINITY && (best < 0 || choice[e] > choice[best])) best = e;
            if (best < 0) best = 0; /* unreachable for valid configs */
            ids[r * K + k] = best;
            wout[r * K + k] = score[best];
            total += score[best];
            choice[best] = -INFINITY;
        }
        for (int64_t k = 0; k < K; k++) {
            float v = wout[r * K + k];
            if (op->n[6]) v = v / (total + 1e-20f);
            wout[r * K + k] = v * op->f[0];
        }
    }
}

static void op_grouped(const Op *op, int ith, int nth, int round) {
    Act a = {op->p[0], 0, op->n[4], op->n[2], op->p[1], op->p[2], op->p[3]};
    expert_pairs(op->p[4], op->p[5], op->n[0], op->n[1], &a, op->p[6], op->n[3], ith, nth, round);
}

static void op_combine(const Op *op, int ith, int nth, int round) {
    const float *eo = op->p[0], *w = op->p[1], *shared = op->p[2];
    float *out = op->p[3];
    const int64_t K = op->n[1], D = op->n[2];
    int64_t r0, r1;
    split_range(op->n[0], ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++)
        for (int64_t d = 0; d < D; d++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += eo[(r * K + k) * D + d] * w[r * K + k];
            out[r * op->n[3] + d] = rnd(rnd(s, round) + shared[r * D + d], round);
        }
}

/* LoRA per row (served adapters, engine/lora.py): a row's adapter slot picks its factors. Rows are split over the
 * threads, and each thread runs both products of its rows for every output of the layer: one op, one barrier. */
static float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[16] = {0.0f}, s = 0.0f;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) acc[k] += a[i + k] * b[i + k];
    for (int k = 0; k < 16; k++) s += acc[k];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void op_lora(const Op *op, int ith, int nth, int round) {
    const float *x = op->p[0];
    const int64_t *slots = op->p[1];
    const int64_t K = op->n[1], rank = op->n[2];
    int64_t r0, r1;
    split_range(op->n[0], ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        const int64_t s = slots[r];
        if (s == op->n[4]) continue;
        float *t = (float *)op->p[2] + r * rank, *d = (float *)op->p[3] + r * op->n[6];
        for (int64_t j = 0; j < op->n[5]; j++) {
            const float *A = op->p[4 + 3 * j], *Bt = op->p[5 + 3 * j];
            const int64_t N = op->n[7 + 2 * j];
            float *y = (float *)op->p[6 + 3 * j] + r * op->n[8 + 2 * j];
            for (int64_t q = 0; q < rank; q++) t[q] = dot_f32(A + (s * rank + q) * K, x + r * op->n[3], K);
            memset(d, 0, N * sizeof(float));
            for (int64_t q = 0; q < rank; q++) {
                const float *b = Bt + (s * rank + q) * N, tq = t[q];
                for (int64_t o = 0; o < N; o++) d[o] += tq * b[o];
            }
            for (int64_t o = 0; o < N; o++) y[o] = rnd(y[o] + rnd(d[o], round), round);
        }
    }
}

/* A row's first maximum; a NaN counts as the maximum, as in torch and numpy. */
static int64_t argmax_row(const float *x, int64_t V) {
    /* One pass: sixteen lanes (two vectors) each keep their largest value and the first index holding it (a
     * strictly greater value replaces it), and whether they saw a NaN; the lanes' winner is the largest value at
     * the smallest index, and the scalar tail's indices come after every lane's. */
    float m = x[0];
    int64_t at = 0, i = 0;
    int any_nan = 0;
    if (V >= 16) {
        __m256 best0 = _mm256_loadu_ps(x), best1 = _mm256_loadu_ps(x + 8);
        __m256i idx0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i idx1 = _mm256_add_epi32(idx0, _mm256_set1_epi32(8)), at0 = idx0, at1 = idx1;
        __m256 nan = _mm256_or_ps(_mm256_cmp_ps(best0, best0, _CMP_UNORD_Q),
                                  _mm256_cmp_ps(best1, best1, _CMP_UNORD_Q));
        const __m256i step = _mm256_set1_epi32(16);
        for (i = 16; i + 16 <= V; i += 16) {
            const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
            idx0 = _mm256_add_epi32(idx0, step);
            idx1 = _mm256_add_epi32(idx1, step);
            const __m256 gt0 = _mm256_cmp_ps(v0, best0, _CMP_GT_OQ), gt1 = _mm256_cmp_ps(v1, best1, _CMP_GT_OQ);
            best0 = _mm256_blendv_ps(best0, v0, gt0);
            best1 = _mm256_blendv_ps(best1, v1, gt1);
            at0 = _mm256_blendv_epi8(at0, idx0, _mm256_castps_si256(gt0));
            at1 = _mm256_blendv_epi8(at1, idx1, _mm256_castps_si256(gt1));
            nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(v0, v0, _CMP_UNORD_Q),
                                                 _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q)));
        }
        float lane[16];
        int32_t lane_at[16];
        _mm256_storeu_ps(lane, best0);
        _mm256_storeu_ps(lane + 8, best1);
        _mm256_storeu_si256((__m256i *)lane_at, at0);
        _mm256_storeu_si256((__m256i *)(lane_at + 8), at1);
        m = lane[0];
        at = lane_at[0];
        for (int j = 1; j < 16; j++)
            if (lane[j] > m || (lane[j] == m && lane_at[j] < at)) {
                m = lane[j];
                at = lane_at[j];
            }
        any_nan = _mm256_movemask_ps(nan) != 0;
    }
    for (; i < V; i++) {
        if (x[i] > m) {
            m = x[i];
            at = i;
        }
        any_nan |= x[i] != x[i];
    }
    if (any_nan)
        for (int64_t k = 0; k < V; k++)
            if (x[k] != x[k]) return k;
    return at;
}

/* Each of R rows' argmax (argmax_row), for the tests. */
void glm45_argmax_rows(const float *x, int64_t R, int64_t V, int64_t ld, int64_t *out) {
    for (int64_t r = 0; r < R; r++) out[r] = argmax_row(x + r * ld, V);
}

/* MTP with one draft token, rows [x_n, d] per sequence s (rows 2s, 2s + 1), verified as Python's
 * speculative.verify would (same uniforms, same float32 arithmetic, so the same tokens). Greedy sequences (inverse
 * temperature 0): next = each row's argmax, accepted when next[2s] == d. Sampled ones: p = each row's distribution;
 * d is accepted when u0 · q(d) ≤ p_0(d), and then next = [d, a draw from p_1 with u3]; else next[2s] = a draw from
 * max(0, p_0 − q) (p_0 when that has no mass) with u1, and next[2s + 1] = the same token (its MTP pair is written
 * again before it is read). Rows are split over the threads first, sequences after a barrier. */
static void op_verify(const Op *op, int ith, int nth) {
    const int64_t R = op->n[0], V = op->n[1], ld = op->n[2], ldq = op->n[3], ldp = op->n[4];
    const float *logits = op->p[0], *q = op->p[2], *u = op->p[4];
    const int64_t *tokens = op->p[1];
    const SampleRow *params = op->p[3];
    int64_t *next = op->p[5], *accepted = op->p[6];
    float *probs = op->p[7], *e = (float *)op->p[8] + ith * op->n[5];
    int64_t r0, r1;
    split_range(R, ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        if (params[r / 2].inv_temperature == 0.0f)
            next[r] = argmax_row(logits + r * ld, V);
        else
            sample_row(logits + r * ld, V, &params[r / 2], NULL, probs + r * ldp, e);
    }
#pragma omp barrier
    split_range(R / 2, ith, nth, 1, &r0, &r1);
    for (int64_t s = r0; s < r1; s++) {
        const int64_t d = tokens[2 * s + 1];
        if (params[s].inv_temperature == 0.0f) {
            accepted[s] = next[2 * s] == d;
            continue;
        }
        float *p0 = probs + 2 * s * ldp, *p1 = p0 + ldp;
        const float *qs = q + s * ldq, *us = u + 5 * s;
        accepted[s] = us[0] * qs[d] <= p0[d];
        if (accepted[s]) {
            next[2 * s] = d;
            next[2 * s + 1] = draw_weights(p1, V, us[3]);
            continue;
        }
        int mass = 0;
        for (int64_t i = 0; i < V; i++) {
            const float v = p0[i] - qs[i];
            p1[i] = v > 0.0f ? v : 0.0f;
            mass |= v > 0.0f;
        }
        next[2 * s] = next[2 * s + 1] = draw_weights(mass ? p1 : p0, V, us[1]);
    }
}

/* A constraint's token masks on the rows that have one, as glm45.grammar.masks.apply sets them. */
static void op_mask(const Op *op, int ith, int nth) {
    const int64_t V = op->n[1], ld = op->n[2], W = op->n[3];
    float *logits = op->p[0];
    const uint32_t *bitmask = op->p[1];
    const int64_t *masked = op->p[2];
    int64_t r0, r1;
    split_range(op->n[0], ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        if (!masked[r]) continue;
        const uint32_t *bits = bitmask + r * W;
        float *x = logits + r * ld;
        for (int64_t i = 0; i < V; i++)
            if (!(bits[i >> 5] >> (i & 31) & 1u)) x[i] = -INFINITY;
    }
}

/* The next draft of each sequence of op_verify: greedy, each row's argmax; sampled, at the row whose MTP pair the
 * next step extends (2s + accepted), the draft distribution q (into q_out) and a draw from it with u4, as
 * speculative.choose_drafts makes them. */
static void op_draft(const Op *op, int ith, int nth) {
    const int64_t R = op->n[0], V = op->n[1], ld = op->n[2], ldq = op->n[3];
    const float *logits = op->p[0], *u = op->p[2];
    const SampleRow *params = op->p[1];
    const int64_t *accepted = op->p[3];
    int64_t *drafts = op->p[4];
    float *q = op->p[5], *e = (float *)op->p[6] + ith * op->n[4];
    int64_t r0, r1;
    split_range(R, ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        const int64_t s = r / 2;
        if (params[s].inv_temperature == 0.0f) {
            drafts[r] = argmax_row(logits + r * ld, V);
        } else if (r == 2 * s + accepted[s]) {
            sample_row(logits + r * ld, V, &params[s], NULL, q + s * ldq, e);
            drafts[r] = draw_weights(q + s * ldq, V, u[5 * s + 4]);
        }
    }
}

/* A row (or MTP sequence) of a run takes `token`: it is done once the token is one of its stop ids (-1: none) or the
 * last of its budget, and when every live one is done the run ends (glm45_run_steps). Its entry of run_end holds
 * [RUN_STOP_IDS stop ids, budget, done]. */
#define RUN_STOP_IDS 8
#define RUN_END (RUN_STOP_IDS + 2)
static inline void run_take(int64_t *run_end, int64_t i, int64_t token) {
    int64_t *end = run_end + i * RUN_END;
    int finished = --end[RUN_STOP_IDS] <= 0;
    for (int j = 0; j < RUN_STOP_IDS; j++) finished |= end[j] == token;
    if (finished) end[RUN_STOP_IDS + 1] = 1;
}

/* Row r's input for the next step of a run: `token` at position `pos`, its KV slot from the row's block table, and
 * the context up to it. */
static inline void set_row(int64_t r, int64_t token, int64_t pos, const int32_t *tables, int64_t bs, int64_t max_blocks,
                           int64_t *tokens, int64_t *positions, int64_t *slots, int32_t *context) {
    tokens[r] = token;
    positions[r] = pos;
    slots[r] = (int64_t)tables[r * max_blocks + pos / bs] * bs + pos % bs;
    context[r] = (int32_t)(pos + 1);
}

/* The end of one decode step of several run in one call (glm45_run_steps): each of the run[1] live rows takes its
 * next token — the argmax (inverse temperature 0) or sample_row's draw with the step's uniform u[step, r], as the
 * host sampler takes them — records it in out[step, r], and becomes the next step's input: that token at the next
 * position, whose KV slot its block table gives, with one more token of context. Padding rows stay as they are. */
static void op_advance(const Op *op, int ith, int nth) {
    const int64_t lds = op->n[0], V = op->n[1], ld = op->n[2], bs = op->n[3], max_blocks = op->n[4];
    const float *logits = op->p[0], *u = op->p[2];
    const SampleRow *params = op->p[1];
    const int64_t step = ((const int64_t *)op->p[3])[0];
    int64_t *tokens = op->p[4], *positions = op->p[5], *slots = op->p[6], *out = (int64_t *)op->p[9] + step * lds;
    const int32_t *tables = op->p[7];
    int32_t *context = op->p[8];
    float *e = (float *)op->p[10] + ith * op->n[5];
    int64_t r0, r1;
    split_range(((const int64_t *)op->p[3])[1], ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        int64_t token;
        if (params[r].inv_temperature == 0.0f) {
            token = argmax_row(logits + r * ld, V);
        } else {
            SampleRow p = params[r];
            p.u = u[step * lds + r];
            sample_row(logits + r * ld, V, &p, &token, NULL, e);
        }
        out[r] = token;
        run_take(op->p[11], r, token);
        set_row(r, token, positions[r] + 1, tables, bs, max_blocks, tokens, positions, slots, context);
    }
}

/* The end of one MTP step (build_draft_step's ops) of several run in one call: each of the run[1] live sequences
 * (rows 2s, 2s + 1: [x_n, d] at positions n, n + 1) records the tokens the step took in out[step, s] (the target's
 * t_n, and t_d when d was accepted, else -1) and goes on from the pair the next step extends, as the executor would:
 * pending token t_{n+a} at position n + 1 + a and its draft (the draft step's at row 2s + a), a the acceptance. A
 * sampled sequence's next draft distribution becomes the one it verifies against, and its next step's 5 uniforms
 * come from run_u[step + 1]. */
static void op_advance_draft(const Op *op, int ith, int nth) {
    const int64_t S = op->n[0], V = op->n[1], ldq = op->n[2], bs = op->n[3], max_blocks = op->n[4];
    const int64_t *next = op->p[0], *accepted = op->p[1], *drafts = op->p[2];
    const SampleRow *params = op->p[3];
    const float *q_out = op->p[4], *run_u = op->p[7];
    float *q_in = op->p[5], *u = op->p[6];
    const int64_t step = ((const int64_t *)op->p[8])[0];
    int64_t *tokens = op->p[9], *positions = op->p[10], *slots = op->p[11], *out = (int64_t *)op->p[14] + step * S * 2;
    const int32_t *tables = op->p[12];
    int32_t *context = op->p[13];
    int64_t s0, s1;
    split_range(((const int64_t *)op->p[8])[1], ith, nth, 1, &s0, &s1);
    for (int64_t s = s0; s < s1; s++) {
        const int64_t a = accepted[s] != 0, pos = positions[2 * s] + 1 + a;
        out[2 * s] = next[2 * s];
        out[2 * s + 1] = a ? next[2 * s + 1] : -1;
        run_take(op->p[15], s, next[2 * s]);
        if (a) run_take(op->p[15], s, next[2 * s + 1]);
        set_row(2 * s, next[2 * s + a], pos, tables, bs, max_blocks, tokens, positions, slots, context);
        set_row(2 * s + 1, drafts[2 * s + a], pos + 1, tables, bs, max_blocks, tokens, positions, slots, context);
        if (params[s].inv_temperature != 0.0f) {
            memcpy(q_in + s * ldq, q_out + s * ldq, V * sizeof(float));
            memcpy(u + 5 * s, run_u + ((step + 1) * S + s) * 5, 5 * sizeof(float));
        }
    }
}

static void run_op(const Op *op, int ith, int nth, int round) {
    int64_t r0, r1;
    switch (op->kind) {
    case OP_EMBED:
        split_range(op->n[0], ith, nth, 1, &r0, &r1);
        for (int64_t r = r0; r < r1; r++) {
            float *o = (float *)op->p[2] + r * op->n[1];
            dequant_row(op->p[0], 0, ((const int64_t *)op->p[1])[r], o);
            if (round)
                for (int64_t i = 0; i < ((const Weight *)op->p[0])->K; i++) o[i] = round_bf16(o[i]);
        }
        break;
    case OP_RMSNORM: op_rmsnorm(op, ith, nth, round); break;
    case OP_QUANT:
        split_range(op->n[0], ith, nth, 1, &r0, &r1);
        quantize_act_rows(op->p[0], op->n[2], r0, r1, op->n[1], op->p[1], op->p[2], op->p[3]);
        break;
    case OP_LINEAR: op_linear(op, ith, nth, round); break;
    case OP_QK_ROPE: op_qk_rope(op, ith, nth, round); break;
    case OP_ATTN: op_attn(op, ith, nth, round); break;
    case OP_SILU_MUL: op_silu_mul(op, ith, nth, round); break;
    case OP_ROUTER: op_router(op, ith, nth); break;
    case OP_GROUPED: op_grouped(op, ith, nth, round); break;
    case OP_COMBINE: op_combine(op, ith, nth, round); break;
    case OP_LORA: op_lora(op, ith, nth, round); break;
    case OP_VERIFY: op_verify(op, ith, nth); break;
    case OP_DRAFT: op_draft(op, ith, nth); break;
    case OP_MASK: op_mask(op, ith, nth); break;
    case OP_ADVANCE: op_advance(op, ith, nth); break;
    case OP_ADVANCE_DRAFT: op_advance_draft(op, ith, nth); break;
    case OP_GATHER:
        split_range(op->n[0], ith, nth, 1, &r0, &r1);
        for (int64_t r = r0; r < r1; r++)
            memcpy((float *)op->p[2] + r * op->n[3],
                   (const float *)op->p[0] + ((const int64_t *)op->p[1])[r] * op->n[2], op->n[1] * sizeof(float));
        break;
    }
}

/* The barrier between ops: a sense-reversing counter the threads spin on (pausing, then yielding the CPU after a
 * while, so an oversubscribed machine is not starved). OpenMP's barrier cost about 0.25 µs an op here, as much as a
 * small op's work; an op with barriers inside (op_attn, op_verify) keeps OpenMP's. */
typedef struct {
    int count, sense;
} StepBarrier;

static void step_barrier(StepBarrier *b, int *local_sense, int nth) {
    if (nth == 1) return;
    const int sense = *local_sense = !*local_sense;
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == nth) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->sense, sense, __ATOMIC_RELEASE);
        return;
    }
    for (int64_t spins = 0; __atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != sense; spins++) {
        if (spins < (1 << 16))
            _mm_pause();
        else
            sched_yield();
    }
}

static int all_done(const int64_t *run_end, int64_t live) {
    for (int64_t i = 0; i < live; i++)
        if (!run_end[i * RUN_END + RUN_STOP_IDS + 1]) return 0;
    return 1;
}

/* Run a captured program up to `steps` times in a row (a step's ops in order, a barrier after each op), all threads
 * in one region; run[0] (when given) holds the step's index, which the ops of a run read, and run[1] how many rows
 * (MTP: sequences) are live. One step is a captured step; several are decode steps whose last op (OP_ADVANCE,
 * OP_ADVANCE_DRAFT) feeds each row's token to the next, and the run ends early once the live entries of run_end are
 * all done. Returns the steps run.
 *
 * Thread 0 writes the index before the step's first op: every thread reads it only after a barrier that thread 0
 * passed after the write, and the previous step's reads came before the barrier that ended that step. Every thread
 * reads the done flags after a step's last barrier and before the next step's last op writes them again, so all
 * threads see the same flags and end the run together. */
int64_t glm45_run_steps(const Op *ops, int64_t count, int64_t steps, int64_t *run, const int64_t *run_end, int round,
                        int threads) {
    StepBarrier barrier = {0, 0};
    int64_t ran = steps;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        int sense = 0;
        for (int64_t s = 0; s < steps; s++) {
            if (run && ith == 0) run[0] = s;
            for (int64_t i = 0; i < count; i++) {
                run_op(&ops[i], ith, nth, round);
                step_barrier(&barrier, &sense, nth);
            }
            if (run_end && all_done(run_end, run[1])) {
                if (ith == 0) ran = s + 1;
                break;
            }
        }
    }
    return ran;
}

/* Run a captured step: every op in order, all threads in one region, a barrier after each op. */
void glm45_run_program(const Op *ops, int64_t count, int round, int threads) {
    glm45_run_steps(ops, count, 1, NULL, NULL, round, threads);
}

int64_t glm45_op_size(void) { return sizeof(Op); }
