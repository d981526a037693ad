/* The routed experts of a bf16 model over many tokens (a prefill chunk) in one call: what `Experts._by_expert`
 * computes with a dozen torch ops an expert (gather, products, SiLU, weighting, index_add), expert after expert
 * inside one OpenMP region. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__AVX512BF16__)
static void *scratch(int64_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* An expert's rows ready for one product: as bf16 for the GEMM, else as fp32 (and int8 for int8/int4 weights). */
typedef struct {
    int gemm;
    uint16_t *b16;
    Act a;
} Rows;

static Rows rows_for(const Weight *w, int64_t n, int64_t packed_gemm_rows, uint16_t *b16, float *f32, int8_t *xq,
                     float *xd, float *xs) {
    const int gemm = n >= (w->fmt == FMT_BF16 ? GEMM_MIN_ROWS : packed_gemm_rows);
    const int q = !gemm && weight_needs_qact(w);
    const Rows r = {gemm, b16, {f32, n, w->K, w->K, q ? xq : NULL, q ? xd : NULL, q ? xs : NULL}};
    return r;
}

/* Row r of an expert's input, written as fp32 (bf16 values) in row r of `rows->a.x`, made ready for its product:
 * bf16 for the GEMM, else as it is, and as int8 too for int8/int4 weights. */
static void ready_row(const Rows *rows, int64_t r) {
    const int64_t K = rows->a.K;
    if (rows->gemm) {
        narrow_bf16_row(rows->a.x + r * K, rows->b16 + r * K, K);
        return;
    }
    if (rows->a.xq) quantize_act_rows(rows->a.x, K, r, r + 1, K, rows->a.xq, rows->a.xd, rows->a.xs);
}

/* out[t] (bf16, zeroed by the caller) accumulates, expert by expert, for each (token t, its weight w) routed to the
 * expert: bf16(w · down(bf16(silu(gate) · up))), (gate | up) = gate_up · x[t], each product rounded to bf16 and each
 * sum rounded as the torch path rounds them. The assignments come sorted by expert: token_of_row and weight_of_row
 * [Σ rows_per_expert], rows_per_expert [E]; a token appears at most once per expert. The products take the kernels
 * `cpu.linear` takes for as many rows: a bf16 matrix the GEMM from GEMM_MIN_ROWS rows, packed weights (dequantized
 * to bf16 panel by panel) from `packed_gemm_rows`, else the dot products of `glm45_linear`. */
void glm45_moe_bf16(const Weight *gate_up, const Weight *down, const uint16_t *x, int64_t ldx,
                    const int64_t *token_of_row, const float *weight_of_row, const int64_t *rows_per_expert,
                    uint16_t *out, int64_t ldo, int64_t packed_gemm_rows, int threads) {
    const int64_t E = gate_up->num_experts, D = gate_up->K, I = down->K;
    int64_t most = 0;
    for (int64_t e = 0; e < E; e++) most = rows_per_expert[e] > most ? rows_per_expert[e] : most;
    const int64_t widest = D > I ? D : I;
    uint16_t *xb = scratch(most * D * sizeof(uint16_t)), *hb = scratch(most * I * sizeof(uint16_t));
    float *xf = scratch(most * D * sizeof(float)), *gu = scratch(most * 2 * I * sizeof(float));
    float *h = scratch(most * I * sizeof(float)), *y = scratch(most * D * sizeof(float));
    int8_t *xq = scratch(most * widest);
    float *xd = scratch(most * (widest / QBLOCK + 1) * sizeof(float));
    float *xs = scratch(most * (widest / QBLOCK + 1) * sizeof(float));
#pragma omp parallel num_threads(threads)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        int64_t start = 0;
        for (int64_t e = 0; e < E; e++) {
            const int64_t n = rows_per_expert[e];
            const int64_t *tokens = token_of_row + start;
            const float *weights = weight_of_row + start;
            start += n;
            if (n == 0) continue;
            const Rows in = rows_for(gate_up, n, packed_gemm_rows, xb, xf, xq, xd, xs);
            const Rows mid = rows_for(down, n, packed_gemm_rows, hb, h, xq, xd, xs);
            int64_t r0, r1;
            split_range(n, ith, nth, 1, &r0, &r1);
            for (int64_t r = r0; r < r1; r++) {
                const uint16_t *src = x + tokens[r] * ldx;
                if (in.gemm) {
                    memcpy(xb + r * D, src, D * sizeof(uint16_t));
                    continue;
                }
                widen_bf16_row(src, xf + r * D, D);
                ready_row(&in, r);
            }
#pragma omp barrier
            bf16_expert_products(gate_up, e, in.gemm, xb, D, &in.a, gu, 2 * I, ith, nth);
#pragma omp barrier
            for (int64_t r = r0; r < r1; r++) {
                silu_mul_row(gu + r * 2 * I, h + r * I, I, 1);
                ready_row(&mid, r);
            }
#pragma omp barrier
            bf16_expert_products(down, e, mid.gemm, hb, I, &mid.a, y, D, ith, nth);
#pragma omp barrier
            /* Each token's row is one thread's; the next expert's gather writes only xb, xf and the int8 rows, and a
             * barrier comes before anything reads or writes what this loop reads. */
            for (int64_t r = r0; r < r1; r++) {
                uint16_t *o = out + tokens[r] * ldo;
                const float *yr = y + r * D, w = weights[r];
                int64_t d = 0;
                for (; d + VL <= D; d += VL)
                    vstore_bf16(o + d, vadd(vload_bf16(o + d), vround_bf16(vmul(vload(yr + d), vset1(w)))));
                for (; d < D; d++) o[d] = f32_to_bf16(bf16_to_f32(o[d]) + round_bf16(yr[d] * w));
            }
        }
    }
    free(xb), free(hb), free(xf), free(gu), free(h), free(y), free(xq), free(xd), free(xs);
}
#endif
