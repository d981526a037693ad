/* Shared definitions of glm45's CPU kernels (glm45/kernels/cpu.py compiles them once per instruction set).
 *
 * Weights come in five formats (the `Weight` descriptor below); activations are fp32 rows. Every kernel is
 * written as "my share of the work": it takes the thread index `ith` of `nth`, so the same function serves a
 * standalone call (wrapped in its own OpenMP region) and the decode-step program (program.c), whose single
 * OpenMP region runs every op of a step with a barrier between ops.
 *
 * Numbers: sums are fp32. With `round_bf16` a result is rounded to the nearest bf16 (ties to even) and kept in
 * fp32, which reproduces where a bf16 model rounds in torch.
 */
#ifndef GLM45_COMMON_H
#define GLM45_COMMON_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_Q8 = 2, FMT_Q4 = 3, FMT_FP8 = 4 };
#define QBLOCK 32 /* int8/int4 weights: one scale (and minimum) per 32 inputs */

/* A weight matrix [N, K] (y = W x), or a stack of E of them for MoE experts. */
typedef struct {
    int64_t fmt;
    int64_t N, K;
    int64_t num_experts;    /* 1 for a plain matrix */
    int64_t fp8_block;      /* fp8: 0 = one scale per output row, else square blocks of this size */
    const void *data;       /* f32 / bf16 (uint16) / int8 / packed int4 (uint8, [N, K/2]) / e4m3 (uint8) */
    const void *scale;      /* q8: fp16 [N, K/32]; q4: fp16 [N, ceil(K/256)] (or [N, K/32] without codes);
                               fp8: float [N] or [ceil(N/b), ceil(K/b)] */
    const void *minimum;    /* q4: fp16, shaped as its scale (w = d * q + m, q in 0..15) */
    const float *bias;      /* optional [N] (plain matrices only) */
    const uint8_t *sub_scale; /* q4 in super-blocks of 8 blocks: [N, K/32], d = scale[b / 8] * sub_scale[b] */
    const int8_t *sub_min;    /* q4 in super-blocks: [N, K/32], m = minimum[b / 8] * sub_min[b] */
} Weight;

#define Q4_SUPER 8 /* int4 blocks per super-block (one fp16 scale and minimum for their 8-bit codes) */

/* The scale and minimum of int4 block b of flat row r (experts × N rows). */
static inline void q4_block(const Weight *w, int64_t r, int64_t b, float *d, float *m) {
    const int64_t nb = w->K / QBLOCK;
    if (w->sub_scale) {
        const int64_t groups = (nb + Q4_SUPER - 1) / Q4_SUPER, g = r * groups + b / Q4_SUPER;
        *d = _cvtsh_ss(((const uint16_t *)w->scale)[g]) * w->sub_scale[r * nb + b];
        *m = _cvtsh_ss(((const uint16_t *)w->minimum)[g]) * w->sub_min[r * nb + b];
    } else {
        *d = _cvtsh_ss(((const uint16_t *)w->scale)[r * nb + b]);
        *m = _cvtsh_ss(((const uint16_t *)w->minimum)[r * nb + b]);
    }
}

/* Activation rows quantized for the integer-dot formats: per block of 32, xq = round(x / d) with
 * d = max|x| / 127, and s = d * sum(xq) (the minimum term of int4). */
typedef struct {
    const float *x;  /* [M, ldx] */
    int64_t M, K, ldx; /* K: the row stride of xq (the width that was quantized) */
    int8_t *xq;      /* [M, K] or NULL */
    float *xd, *xs;  /* [M, K/32] */
} Act;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);                  /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline float fp16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

/* e4m3 → fp32. Placing e4m3's 7 exponent+mantissa bits at fp16's bits 13..7 gives an fp16 whose value is the
 * e4m3 value times 2^-8 (exponent bias 15 instead of 7), subnormals included; the kernels fold 2^8 into the
 * scale. NaN (0x7f/0xff) is not produced by quantizers and is not special-cased. */
#define FP8_RESCALE 256.0f
static inline float fp8_to_f32(uint8_t v) {
    uint16_t h = (uint16_t)(((v & 0x7f) << 7) | ((v & 0x80) << 8));
    return _cvtsh_ss(h) * FP8_RESCALE;
}

/* fp32 → e4m3, rounded to nearest (ties to even) and saturated at ±448, as torch converts. Normal values: round
 * the fp32 mantissa to 3 bits in place (the magnitude bits are monotonic, so a carry into the exponent is the
 * right rounding) and re-bias the exponent from 127 to 7; below 2^-6 the value is a multiple of 2^-9. */
static inline uint8_t f32_to_fp8(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    const uint8_t sign = (uint8_t)((bits >> 24) & 0x80);
    const float a = fabsf(v);
    if (!(a < 464.0f)) return sign | 0x7e; /* beyond the last rounding midpoint (and NaN): 448 */
    if (a < 0.015625f) return sign | (uint8_t)nearbyintf(a * 512.0f);
    uint32_t mag = bits & 0x7fffffffu;
    mag += 0x7ffffu + ((mag >> 20) & 1u);
    const uint32_t code = (mag >> 20) - (120u << 3);
    return sign | (uint8_t)(code > 0x7e ? 0x7e : code);
}

/* [begin, end) of `n` items for thread ith of nth, in chunks of `align`. */
static inline void split_range(int64_t n, int ith, int nth, int64_t align, int64_t *begin, int64_t *end) {
    int64_t chunks = (n + align - 1) / align;
    int64_t per = chunks / nth, extra = chunks % nth;
    int64_t c0 = ith * per + (ith < extra ? ith : extra);
    int64_t c1 = c0 + per + (ith < extra ? 1 : 0);
    *begin = c0 * align < n ? c0 * align : n;
    *end = c1 * align < n ? c1 * align : n;
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- the widest float vectors of this build: 16 lanes with AVX-512, 8 with AVX2 ---- */
#ifdef __AVX512F__
#define VL 16
typedef __m512 vf;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vhsum(v) _mm512_reduce_add_ps(v)
static inline vf vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vf vload_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vf vload_fp8(const uint8_t *p) {
    /* sign-extended, shifted by 7: the sign lands in bits 15 and 14, the 7 magnitude bits in 13..7; clearing bit 14
     * leaves the fp16 described above fp8_to_f32 (three operations where masking each part took six) */
    __m256i v = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)), 7);
    return _mm512_cvtph_ps(_mm256_and_si256(v, _mm256_set1_epi16((short)0xbf80)));
}
#else
#define VL 8
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vhsum(v) hsum256(v)
static inline vf vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vf vload_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vf vload_fp8(const uint8_t *p) {
    __m128i v = _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p)), 7);
    return _mm256_cvtph_ps(_mm_and_si128(v, _mm_set1_epi16((short)0xbf80)));
}
#endif

/* ---- more of the widest vectors' operations, and e^x on them ---- */
#ifdef __AVX512F__
#define vset1(v) _mm512_set1_ps(v)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vmin(a, b) _mm512_min_ps(a, b)
#define vdiv(a, b) _mm512_div_ps(a, b)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#define vround(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline vf vpow2i(vf n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#else
#define vset1(v) _mm256_set1_ps(v)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vmax(a, b) _mm256_max_ps(a, b)
#define vmin(a, b) _mm256_min_ps(a, b)
#define vdiv(a, b) _mm256_div_ps(a, b)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#define vround(v) _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline vf vpow2i(vf n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#endif

/* e^x for x in [-87, 88] (clamped to it): 2^n · p(r), n = round(x / ln 2), |r| ≤ ln 2 / 2, p a degree-6 Taylor
 * polynomial (relative error below 2e-7). */
static inline vf vexp_clamped(vf x) {
    vf n = vround(vmul(x, vset1(1.44269504f)));
    vf r = vsub(vsub(x, vmul(n, vset1(0.693145751953125f))), vmul(n, vset1(1.428606765330187e-06f)));
    vf p = vset1(1.0f / 720.0f);
    p = vfma(p, r, vset1(1.0f / 120.0f));
    p = vfma(p, r, vset1(1.0f / 24.0f));
    p = vfma(p, r, vset1(1.0f / 6.0f));
    p = vfma(p, r, vset1(0.5f));
    p = vfma(p, r, vset1(1.0f));
    p = vfma(p, r, vset1(1.0f));
    return vmul(p, vpow2i(n));
}

/* e^x for x ≤ 0 (softmax after subtracting the maximum); below -87, e^-87. */
static inline vf vexp_nonpositive(vf x) { return vexp_clamped(vmax(x, vset1(-87.0f))); }

/* e^x for any x (clamped to [-87, 88]). */
static inline vf vexp(vf x) { return vexp_clamped(vmin(vmax(x, vset1(-87.0f)), vset1(88.0f))); }

/* Each lane rounded to bf16 (nearest, ties to even) and widened back, as round_bf16; NaN stays NaN. */
#ifdef __AVX512F__
static inline vf vround_bf16(vf v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))),
                                       _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(r), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                              _mm512_castsi512_ps(_mm512_set1_epi32(0x7fc00000)));
}
#else
static inline vf vround_bf16(vf v) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))),
                                       _mm256_set1_epi32((int)0xffff0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)),
                            _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
#endif

/* Each lane as bf16 (f32_to_bf16's rounding) into p[0..VL). */
static inline void vstore_bf16(uint16_t *p, vf v) {
#ifdef __AVX512F__
    const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(vround_bf16(v)), 16);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(bits));
#else
    const __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(vround_bf16(v)), 16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
#endif
}

/* v where s ≥ limit, else 0 */
#ifdef __AVX512F__
static inline vf vkeep_above(vf v, vf s, float limit) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, vset1(limit), _CMP_GE_OQ), v);
}
#else
static inline vf vkeep_above(vf v, vf s, float limit) {
    return _mm256_and_ps(_mm256_cmp_ps(s, vset1(limit), _CMP_GE_OQ), v);
}
#endif

/* The four horizontal sums of v0..v3 at once (a transposing add tree): out[i] = Σ lanes of vi. */
static inline void hsum4_256(__m256 v0, __m256 v1, __m256 v2, __m256 v3, float out[4]) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
#ifdef __AVX512F__
static inline __m256 fold512(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#define vhsum4(v0, v1, v2, v3, out) hsum4_256(fold512(v0), fold512(v1), fold512(v2), fold512(v3), out)
#else
#define vhsum4(v0, v1, v2, v3, out) hsum4_256(v0, v1, v2, v3, out)
#endif

static inline float rnd(float v, int round) { return round ? round_bf16(v) : v; }

/* n bf16 values as fp32 (exact), and n fp32 values as bf16 (rounded to nearest even). */
static inline void widen_bf16_row(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) vstore(dst + i, vload_bf16(src + i));
    for (; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}
static inline void narrow_bf16_row(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) vstore_bf16(dst + i, vload(src + i));
    for (; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

/* One row of SwiGLU: o[i] = silu(g[i]) · u[i] with u = g + I (gate, then up), each product rounded to bf16 as torch
 * rounds a bf16 model's when `round`. */
static inline void silu_mul_row(const float *g, float *o, int64_t I, int round) {
    const float *u = g + I;
    int64_t i = 0;
    for (; i + VL <= I; i += VL) {
        vf gv = vload(g + i), s = vdiv(gv, vadd(vset1(1.0f), vexp(vsub(vzero(), gv))));
        s = vmul(round ? vround_bf16(s) : s, vload(u + i));
        vstore(o + i, round ? vround_bf16(s) : s);
    }
    for (; i < I; i++) o[i] = rnd(rnd(g[i] / (1.0f + expf(-g[i])), round) * u[i], round);
}

/* out = w · x / rms(x) for one row of D values (eps inside the root), each product rounded to bf16 when `round`. */
static inline void rms_row(const float *x, const float *w, float *out, int64_t D, float eps, int round) {
    vf acc = vzero();
    int64_t i = 0;
    for (; i + VL <= D; i += VL) acc = vfma(vload(x + i), vload(x + i), acc);
    float ss = vhsum(acc);
    for (; i < D; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
    for (i = 0; i + VL <= D; i += VL) {
        vf y = vmul(vload(x + i), vset1(inv));
        if (round) y = vround_bf16(y);
        y = vmul(vload(w + i), y);
        vstore(out + i, round ? vround_bf16(y) : y);
    }
    for (; i < D; i++) out[i] = rnd(w[i] * rnd(x[i] * inv, round), round);
}

/* ---- kernels shared between files ---- */
/* From this many activation rows a bf16 model's products go through the GEMM order (gemv.c, AVX512-BF16 only). */
#define GEMM_MIN_ROWS 32
void weight_rows(const Weight *w, int64_t expert, int64_t n0, int64_t n1, const Act *a, int64_t m0, int64_t mc,
                 float *y, int64_t ldy, int round);
void quantize_act_rows(const float *x, int64_t ldx, int64_t m0, int64_t m1, int64_t K, int8_t *xq, float *xd,
                       float *xs);
int weight_needs_qact(const Weight *w);
void expert_pairs(const Weight *w, const int64_t *experts, int64_t P, int64_t per, const Act *a, float *y, int64_t ldy,
                  int ith, int nth, int round);
void dequant_row(const Weight *w, int64_t expert, int64_t n, float *out);
#if defined(__AVX512BF16__)
void bf16_gemm(const Weight *w, const uint16_t *x, int64_t M, int64_t ldx, uint16_t *y, int64_t ldy, int ith,
               int nth);
void bf16_expert_products(const Weight *w, int64_t e, int gemm, const uint16_t *xb, int64_t ldxb, const Act *a,
                          float *y, int64_t ldy, int ith, int nth);
#endif

#endif
