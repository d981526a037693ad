/* Standalone entry points for torch-side callers (glm45/kernels/cpu.py): each wraps a kernel in its own OpenMP
 * region. The decode-step program (program.c) calls the same kernels inside one region for the whole step. */
#include <omp.h>
#include <stdlib.h>

#include "common.h"

/* Threads pay off only when a call streams a lot of weights; below that, fork/join costs more than it saves. */
static int threads_for(int64_t weight_elements, int threads) { return weight_elements >= (1 << 18) ? threads : 1; }

typedef struct {
    int8_t *xq;
    float *xd, *xs;
} QScratch;

static QScratch quantized(const Weight *w, Act *a) {
    QScratch s = {0};
    if (!weight_needs_qact(w)) return s;
    int64_t nb = a->K / QBLOCK;
    s.xq = (int8_t *)malloc(a->M * a->K);
    s.xd = (float *)malloc(a->M * nb * sizeof(float));
    s.xs = (float *)malloc(a->M * nb * sizeof(float));
    quantize_act_rows(a->x, a->ldx, 0, a->M, a->K, s.xq, s.xd, s.xs);
    a->xq = s.xq, a->xd = s.xd, a->xs = s.xs;
    return s;
}

static void release(QScratch s) {
    free(s.xq);
    free(s.xd);
    free(s.xs);
}

/* y[M, N] = x[M, K] · Wᵀ (+ bias). */
void glm45_linear(const Weight *w, const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy, int round,
                  int threads) {
    Act a = {x, M, w->K, ldx, NULL, NULL, NULL};
    QScratch s = quantized(w, &a);
    int nth = threads_for(w->N * w->K * (M > 4 ? M / 4 : 1), threads); /* many rows: their products are work too */
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        int64_t n0, n1;
        split_range(w->N, omp_get_thread_num(), omp_get_num_threads(), 16, &n0, &n1);
        if (n1 > n0) weight_rows(w, 0, n0, n1, &a, 0, M, y, ldy, round);
    }
    release(s);
}

/* y[r] = W[expert[r]] · x[r] for R rows (MoE decoding: one row per (token, chosen expert) pair). */
void glm45_grouped_linear(const Weight *w, const float *x, int64_t R, int64_t ldx, const int64_t *expert, float *y,
                          int64_t ldy, int round, int threads) {
    Act a = {x, R, w->K, ldx, NULL, NULL, NULL};
    QScratch s = quantized(w, &a);
    int nth = threads_for(R * w->N * w->K, threads);
#pragma omp parallel num_threads(nth) if (nth > 1)
    expert_pairs(w, expert, R, 1, &a, y, ldy, omp_get_thread_num(), omp_get_num_threads(), round);
    release(s);
}

/* Rows [n0, n1) of expert `expert`'s matrix as fp32, [n1 - n0, K]. */
void glm45_dequantize(const Weight *w, int64_t expert, int64_t n0, int64_t n1, float *out, int threads) {
    int nth = threads_for((n1 - n0) * w->K, threads);
#pragma omp parallel for num_threads(nth) if (nth > 1) schedule(static)
    for (int64_t n = n0; n < n1; n++) dequant_row(w, expert, n, out + (n - n0) * w->K);
}

/* The fewest rows the GEMM order pays for (bf16 weights, a bf16 model), or 0 in a build without bf16 dot products
 * (glm45_linear_bf16 is then missing): torch-side callers send that many rows to glm45_linear_bf16. */
int64_t glm45_gemm_min_rows(void) {
#if defined(__AVX512BF16__)
    return GEMM_MIN_ROWS;
#else
    return 0;
#endif
}

/* y = w · x / rms(x) for R rows of D values of a bf16 model (x, w and y bf16; row strides ldx, ldy): the captured
 * step's RMSNorm (fp32, each product rounded to bf16 as torch rounds a bf16 model's), for torch-side callers. */
void glm45_rms_norm_bf16(const uint16_t *x, int64_t R, int64_t D, int64_t ldx, const uint16_t *w, float eps,
                         uint16_t *y, int64_t ldy, int threads) {
    int nth = threads_for(R * D * 8, threads);
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        float *row = malloc(3 * D * sizeof(float)), *wf = row + D, *out = wf + D;
        widen_bf16_row(w, wf, D);
        int64_t r0, r1;
        split_range(R, omp_get_thread_num(), omp_get_num_threads(), 1, &r0, &r1);
        for (int64_t r = r0; r < r1; r++) {
            widen_bf16_row(x + r * ldx, row, D);
            rms_row(row, wf, out, D, eps, 1);
            narrow_bf16_row(out, y + r * ldy, D);
        }
        free(row);
    }
}

#if defined(__AVX512BF16__)
/* y[M, N] = x[M, K] · Wᵀ (+ bias), x and y bf16 (rounded once), for a bf16 matrix with even K. */
void glm45_linear_bf16(const Weight *w, const uint16_t *x, int64_t M, int64_t ldx, uint16_t *y, int64_t ldy,
                       int threads) {
    int nth = threads_for(w->N * w->K * (M / 4), threads);
#pragma omp parallel num_threads(nth) if (nth > 1)
    bf16_gemm(w, x, M, ldx, y, ldy, omp_get_thread_num(), omp_get_num_threads());
}
#endif

/* Which instruction set this build targets (checked by the loader against its file name). */
const char *glm45_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#else
    return "avx2";
#endif
}
