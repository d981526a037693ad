/* bf16-weight matrix-vector kernels for CPUs with AVX2 + FMA (glm45/kernels/cpu.py compiles and loads this).
 *
 * Decoding reads every active weight once per token, so it is bound by memory bandwidth; torch's bf16
 * GEMV on AVX2-only CPUs reaches about half of it. These kernels stream the bf16 weights once, widen them
 * to fp32 in registers (a bf16 is the top half of an fp32: shift left by 16) and accumulate in fp32.
 *
 *   gemv_bf16:         y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])        W [N, K], M <= 4
 *   grouped_gemv_bf16: y[r, n] = sum_k x[r, k] * W[expert[r], n, k]         W [E, N, K] (MoE decode)
 * x and y are bf16 too (row-major): the inputs are widened once, sums are fp32, and each output is rounded
 * to bf16 once, to nearest even, as torch does. K must be a multiple of 16.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m256 load_bf16(const uint16_t *p) {
    __m128i half = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* One weight row against up to 4 input rows. */
static inline void dot_rows(const uint16_t *w, const float *x, int64_t x_stride, int64_t M, int64_t K,
                            float *out, int64_t out_stride) {
    __m256 acc[4][2];
    for (int m = 0; m < 4; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m256 w0 = load_bf16(w + k), w1 = load_bf16(w + k + 8);
        for (int m = 0; m < M; m++) {
            const float *xm = x + m * x_stride + k;
            acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m][1]);
        }
    }
    for (int m = 0; m < M; m++) out[m * out_stride] = horizontal_sum(_mm256_add_ps(acc[m][0], acc[m][1]));
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);                   /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}

/* Threads pay off only when a call streams megabytes; below that, fork/join costs more than it saves. */
static inline int threads_for(int64_t weight_elements, int threads) {
    return weight_elements >= (1 << 20) ? threads : 1;
}

static float *widen(const uint16_t *x, int64_t count) {
    float *out = (float *)aligned_alloc(32, ((count * sizeof(float) + 31) / 32) * 32);
    for (int64_t i = 0; i < count; i++) out[i] = bf16_to_float(x[i]);
    return out;
}

void gemv_bf16(const uint16_t *W, const uint16_t *x, const uint16_t *bias, uint16_t *y,
               int64_t M, int64_t N, int64_t K, int threads) {
    float *x32 = widen(x, M * K);
    threads = threads_for(N * K, threads);
    #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float sums[4];
        dot_rows(W + n * K, x32, K, M, K, sums, 1);
        float b = bias ? bf16_to_float(bias[n]) : 0.0f;
        for (int64_t m = 0; m < M; m++) y[m * N + n] = float_to_bf16(sums[m] + b);
    }
    free(x32);
}

void grouped_gemv_bf16(const uint16_t *W, const uint16_t *x, const int64_t *expert, uint16_t *y,
                       int64_t R, int64_t N, int64_t K, int threads) {
    float *x32 = widen(x, R * K);
    threads = threads_for(R * N * K, threads);
    #pragma omp parallel for collapse(2) num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t r = 0; r < R; r++)
        for (int64_t n = 0; n < N; n++) {
            float sum;
            dot_rows(W + (expert[r] * N + n) * K, x32 + r * K, K, 1, K, &sum, 0);
            y[r * N + n] = float_to_bf16(sum);
        }
    free(x32);
}
