/* bf16-weight matrix-vector kernels for CPUs with AVX2 + FMA (glm45/kernels/cpu.py compiles and loads this).
 *
 * Decoding reads every active weight once per token, so it is bound by memory bandwidth; torch's bf16
 * GEMV on AVX2-only CPUs reaches about half of it. These kernels stream the bf16 weights once, widen them
 * to fp32 in registers (a bf16 is the top half of an fp32: shift left by 16) and accumulate in fp32.
 *
 *   gemv_bf16:         y[m, n] = sum_k x[m, k] * W[n, k]                    W [N, K], M <= 4
 *   grouped_gemv_bf16: y[r, n] = sum_k x[r, k] * W[expert[r], n, k]         W [E, N, K] (MoE decode)
 * x and y are fp32, row-major; K must be a multiple of 16.
 */
#include <immintrin.h>
#include <stdint.h>

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

void gemv_bf16(const uint16_t *W, const float *x, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) dot_rows(W + n * K, x, K, M, K, y + n, N);
}

void grouped_gemv_bf16(const uint16_t *W, const float *x, const int64_t *expert, float *y,
                       int64_t R, int64_t N, int64_t K, int threads) {
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t r = 0; r < R; r++)
        for (int64_t n = 0; n < N; n++)
            dot_rows(W + (expert[r] * N + n) * K, x + r * K, K, 1, K, y + r * N + n, 0);
}
