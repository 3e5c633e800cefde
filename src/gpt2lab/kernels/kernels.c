/* gpt2lab's CPU kernels for inference: fp32, int8, int4 and bf16 weights. Built by build.py on first use
 * (cc -O3 -march=native -fopenmp -ffp-contract=off) and called through ctypes. Every function that is not
 * static, the structures gpt2lab_matrix and gpt2lab_layer, and the KIND_ and EPILOGUE_ values Python passes
 * are declared once more in abi.py's tables (ctypes' declarations are built from them), which
 * tests/test_kernels.py and build.py check against this file: change both together.
 *
 * Why: a decode step of a few rows reads every weight once and is bound by memory bandwidth (one row)
 * or by loads from cache (a few rows). BLAS/oneDNN kernels stream a weight at 60-80% of what a plain
 * sum() reaches for one row on AVX2 CPUs, and are tuned for bigger matrices than 2-16 rows. The tiles
 * here keep their accumulators in named registers (gcc spills an array of vectors), and prefetch the
 * weight rows of the next tile: with int8 weights the hardware prefetcher alone keeps too few cache
 * misses in flight to reach the memory bandwidth. The whole cached forward (embedding to logits, prefill
 * or decode) is one call, so Python's per-op cost is paid once per step.
 *
 * Int8 weights (one scale per output channel) quarter the bytes per token. Their products run on
 * integers, as llama.cpp's q8_0 does, but with 16-bit activations: each input row is quantized to
 * int16 with one scale (max|x| / 32767, a relative error near 1e-5 of the row's largest element, far
 * below the int8 weights' own), and vpmaddwd sums int8 x int16 pairs exactly in int32 (two products
 * per instruction, 16 per register), chunks of 2048 in int32 lanes (no overflow: 2048 / 16 * 2 *
 * 128 * 32768 < 2^31), chunks in int64. That is 3 instructions per 16 weights where widening int8 to
 * fp32 takes 6, and the sum is exact, so its order cannot matter. With AVX-512 VNNI, vpdpwssd does the
 * multiply and the add of 32 such pairs in one instruction (the same exact sums: every path agrees bit
 * for bit on int8).
 *
 * Batch invariance: every output element y[m, n] = x[m] . w[n] is computed by the same sequence of
 * operations whatever the number of rows, the tile that holds it or the thread that runs it: for fp32
 * and bf16, one 8-lane accumulator over k in steps of 8 (fused multiply-add), a fixed horizontal sum,
 * then the k % 8 tail one fused multiply-add at a time, then the bias; for int8 an exact integer sum,
 * then sum * x_scale[m] * w_scale[n] in double, rounded once, then the bias. Attention runs per token
 * (query) over its own row's cache slots 0..pos in order. So a sequence's logits are bit-identical
 * alone or in any batch, in prefill and in decode. Without AVX2/FMA the same operations run on an
 * 8-float array with fmaf and on plain integers (same results, slower).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GPT2LAB_AVX2 1
#else
#define GPT2LAB_AVX2 0
#endif
/* build.py compiles this file once per instruction-set path (ISA_* below) and loads the one the CPU runs best:
 * AVX-512 with VNNI takes the int8 products 32 pairs per instruction (vpdpwssd: the same exact int32 sums as
 * AVX2's vpmaddwd + vpaddd, so int8 results are bit-identical on every path) */
#if GPT2LAB_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define GPT2LAB_VNNI 1
#else
#define GPT2LAB_VNNI 0
#endif

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

int gpt2lab_has_avx2(void) { return GPT2LAB_AVX2; }

/* which path this build is (ISA_*) */
int gpt2lab_isa(void) { return GPT2LAB_VNNI ? ISA_AVX512 : GPT2LAB_AVX2 ? ISA_AVX2 : ISA_PORTABLE; }

/* A weight matrix [n_out, n_in], row-major (nn.Linear's layout), of one of three kinds: fp32; int8
 * with one fp32 scale per output row (w[n, k] = q[n, k] * scale[n]; integer arithmetic, see the top);
 * bf16 (16-bit storage, fp32 arithmetic). bias may be NULL. */
enum { KIND_F32 = 0, KIND_Q8 = 1, KIND_BF16 = 2, KIND_Q4 = 3 };
/* KIND_Q4: 4-bit weights, packed, with one fp32 scale per group of Q4_GROUP inputs (see block_q4). 128, by
 * measurement: each group costs a horizontal reduction of its exact integer sums, which dominated at small
 * groups. GPT-2 124M's 85M block weights at batch 1, one thread, AVX-512 (int8: 4.9 ms): groups of 32 8.0 ms,
 * 64 5.5 ms, 128 3.9 ms; quality on the bundled model (held-out Hamlet slice, fp32 154.17): perplexity +0.12%,
 * +0.24%, +0.27%, mean KL(fp32 || int4) 1.3e-3, 1.5e-3, 1.8e-3 nats; the bar is +3%. A multiple of 128
 * (Q4_UNIT: q4_1x8 takes a group as whole units). */
enum { Q4_GROUP = 128 };
typedef struct {
    const void *w;
    const float *scale; /* KIND_Q8: [n_out]; KIND_Q4: [n_out, groups] */
    const float *bias;
    int64_t kind;
} gpt2lab_matrix;

/* what a product does with its result: store it, add it (a residual stream), or apply the MLP's
 * activation (the numbers are GPT2Config.activation_function's, see ACTIVATIONS in __init__.py) */
enum { EPILOGUE_NONE, EPILOGUE_ADD, EPILOGUE_GELU_TANH, EPILOGUE_GELU, EPILOGUE_RELU, EPILOGUE_SILU };

/* e^x in plain float operations (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, e^r by a degree-7 polynomial,
 * 2^n into the exponent bits; within 2 ulp of expf). Inlined, it is several times faster than libm's call, and,
 * being the same operations for every element (no vector body and scalar tail), it keeps every output's value
 * independent of where the element sits in a tile. Returns 0 below e^-87.3 (where expf is subnormal), inf above
 * e^88.37, NaN for NaN. */
static inline float exp_approx(float x) {
    if (!(x >= -87.3365478515625f)) return x != x ? x : 0.f;
    if (x > 88.3762626647949f) return INFINITY;
    const float n = rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f; /* ln 2 in two parts: r is exact enough */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    union { uint32_t i; float f; } scale = {(uint32_t)((int32_t)n + 127) << 23};
    return p * scale.f;
}

static inline float epilogue_apply(float v, const float *out, int epilogue) {
    switch (epilogue) {
    case EPILOGUE_ADD: return *out + v;
    /* gelu_new, 0.5 v (1 + tanh(u)), as v / (1 + e^(-2u)): the same function (0.5 (1 + tanh u) is the logistic
     * of 2u) without libm's tanhf, which took 16% of an 8-row int8 step; no cancellation near u = 0 */
    case EPILOGUE_GELU_TANH: return v / (1.f + exp_approx(-2.f * (0.7978845608028654f * (v + 0.044715f * v * v * v))));
    case EPILOGUE_GELU: return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
    case EPILOGUE_RELU: return v <= 0.f ? 0.f : v; /* NaN stays NaN, as in torch.relu */
    case EPILOGUE_SILU: return v / (1.f + expf(-v));
    default: return v;
    }
}

/* ---- the 8-lane accumulator: AVX2 registers or a portable emulation with identical rounding ---- */
#if GPT2LAB_AVX2
typedef __m256 vec8;
static inline vec8 v_zero(void) { return _mm256_setzero_ps(); }
static inline vec8 v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline vec8 v_load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vec8 v_fma(vec8 a, vec8 b, vec8 c) { return _mm256_fmadd_ps(a, b, c); }
static inline float v_hsum(vec8 v) { /* ((l0 + l1) + (l2 + l3)) with l_i = v_i + v_{i+4} */
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 sums = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, sums);
    return _mm_cvtss_f32(_mm_add_ss(sums, sh));
}
#else
typedef struct { float f[8]; } vec8;
static inline vec8 v_zero(void) { vec8 v; for (int i = 0; i < 8; i++) v.f[i] = 0.f; return v; }
static inline vec8 v_load(const float *p) { vec8 v; for (int i = 0; i < 8; i++) v.f[i] = p[i]; return v; }
static inline float bf16_to_f32(uint16_t h) { union { uint32_t u; float f; } v = {(uint32_t)h << 16}; return v.f; }
static inline vec8 v_load_bf16(const uint16_t *p) { vec8 v; for (int i = 0; i < 8; i++) v.f[i] = bf16_to_f32(p[i]); return v; }
static inline vec8 v_fma(vec8 a, vec8 b, vec8 c) { for (int i = 0; i < 8; i++) c.f[i] = fmaf(a.f[i], b.f[i], c.f[i]); return c; }
static inline float v_hsum(vec8 v) {
    float l0 = v.f[0] + v.f[4], l1 = v.f[1] + v.f[5], l2 = v.f[2] + v.f[6], l3 = v.f[3] + v.f[7];
    return (l0 + l1) + (l2 + l3);
}
#endif

#if GPT2LAB_AVX2
static inline float bf16_to_f32(uint16_t h) { union { uint32_t u; float f; } v = {(uint32_t)h << 16}; return v.f; }
#endif

/* element k of weight row w (of any kind) as fp32 */
static inline __attribute__((always_inline)) float w_at(const void *w, int64_t k, int kind) {
    if (kind == KIND_Q8) return (float)((const int8_t *)w)[k];
    if (kind == KIND_BF16) return bf16_to_f32(((const uint16_t *)w)[k]);
    return ((const float *)w)[k];
}
static inline __attribute__((always_inline)) vec8 w_load(const void *w, int64_t k, int kind) {
    if (kind == KIND_BF16) return v_load_bf16((const uint16_t *)w + k);
    return v_load((const float *)w + k);
}
static inline __attribute__((always_inline)) const void *w_row(const void *w, int64_t row, int64_t n_in, int kind) {
    const int64_t size = kind == KIND_Q8 ? 1 : kind == KIND_BF16 ? 2 : 4;
    return (const char *)w + row * n_in * size;
}
/* A tile's weight rows are contiguous (tile_bytes), and so are consecutive tiles': while a tile works
 * through them (consumed: the bytes it has read so far), prefetch the same offset of the next tile, a
 * sequential stream the memory system can run ahead on. The hardware prefetchers alone follow a tile's
 * rows as separate short streams (a row of int8 GPT-2 is 12 cache lines) and keep too few misses in
 * flight: measured, int8 decoding at batch 1 went from 9 to 6 ms a step. Prefetches never fault, so they
 * may point past a matrix's end. */
#define PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)
#define PREFETCH_NEXT(w, tile_bytes, consumed, step_bytes) \
    do { \
        const char *next_ = (const char *)(w) + (tile_bytes) + (consumed); \
        for (int64_t o_ = 0; o_ < (step_bytes); o_ += 64) PREFETCH(next_ + o_); \
    } while (0)

/* the end of every float dot product: fixed horizontal sum, then the tail k0..n_in-1 in order */
static inline __attribute__((always_inline)) float finish(vec8 acc, const void *w, const float *x, int64_t k0,
                                                          int64_t n_in, int kind) {
    float s = v_hsum(acc);
    for (int64_t k = k0; k < n_in; k++) s = fmaf(w_at(w, k, kind), x[k], s);
    return s;
}

/* ---- fp32 and bf16 weights: fp32 products ----
 * A register tile: R input rows x C weight rows (outputs), each with its own accumulator. Always
 * inlined with constant R, C and kind. out[r * C + c] = x[r] . w[c]. The edges of a matrix take these;
 * the bulk of fp32 work takes the two tiles below with named accumulators (same arithmetic). */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx, const void *w, int64_t n_in,
                                                       int R, int C, int kind, float *out) {
    vec8 acc[16]; /* R * C <= 16 */
    for (int i = 0; i < R * C; i++) acc[i] = v_zero();
    const int64_t k8 = n_in & ~(int64_t)7;
    for (int64_t k = 0; k < k8; k += 8) {
        vec8 wv[8];
        for (int c = 0; c < C; c++) wv[c] = w_load(w_row(w, c, n_in, kind), k, kind);
        for (int r = 0; r < R; r++) {
            const vec8 xv = v_load(x + r * ldx + k);
            for (int c = 0; c < C; c++) acc[r * C + c] = v_fma(wv[c], xv, acc[r * C + c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            out[r * C + c] = finish(acc[r * C + c], w_row(w, c, n_in, kind), x + r * ldx, k8, n_in, kind);
}

#if GPT2LAB_AVX2
#define F_W(c) w_load(w_row(w, c, n_in, kind), k, kind)
#define F_X(r) _mm256_loadu_ps(x + (r) * ldx + k)
#define F_FMA(acc, a, b) acc = _mm256_fmadd_ps(a, b, acc)
/* 4 rows x 3 outputs (12 accumulators, 3 weights and 1 input: the 16 ymm registers), fp32 or bf16
 * weights; prefetches the next tile's weight rows */
static inline __attribute__((always_inline)) void float_4x3(const float *x, int64_t ldx, const void *w, int64_t n_in,
                                                            int kind, float *out) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
    const int64_t k8 = n_in & ~(int64_t)7, esize = kind == KIND_BF16 ? 2 : 4;
    for (int64_t k = 0; k < k8; k += 8) {
        if ((k & 8) == 0) PREFETCH_NEXT(w, 3 * n_in * esize, k / 8 * 3 * 8 * esize, 6 * 8 * esize);
        const __m256 w0 = F_W(0), w1 = F_W(1), w2 = F_W(2);
        __m256 xv = F_X(0);
        F_FMA(a00, w0, xv); F_FMA(a01, w1, xv); F_FMA(a02, w2, xv);
        xv = F_X(1);
        F_FMA(a10, w0, xv); F_FMA(a11, w1, xv); F_FMA(a12, w2, xv);
        xv = F_X(2);
        F_FMA(a20, w0, xv); F_FMA(a21, w1, xv); F_FMA(a22, w2, xv);
        xv = F_X(3);
        F_FMA(a30, w0, xv); F_FMA(a31, w1, xv); F_FMA(a32, w2, xv);
    }
    const __m256 acc[12] = {a00, a01, a02, a10, a11, a12, a20, a21, a22, a30, a31, a32};
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 3; c++)
            out[r * 3 + c] = finish(acc[r * 3 + c], w_row(w, c, n_in, kind), x + r * ldx, k8, n_in, kind);
}
/* 1 row x 8 outputs: eight weight streams, the next eight rows prefetched */
static inline __attribute__((always_inline)) void float_1x8(const float *x, const void *w, int64_t n_in, int kind,
                                                            float *out) {
    const int64_t ldx = 0;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    const int64_t k8 = n_in & ~(int64_t)7, esize = kind == KIND_BF16 ? 2 : 4;
    for (int64_t k = 0; k < k8; k += 8) {
        PREFETCH_NEXT(w, 8 * n_in * esize, k / 8 * 8 * 8 * esize, 8 * 8 * esize);
        const __m256 xv = F_X(0);
        F_FMA(a0, F_W(0), xv); F_FMA(a1, F_W(1), xv); F_FMA(a2, F_W(2), xv); F_FMA(a3, F_W(3), xv);
        F_FMA(a4, F_W(4), xv); F_FMA(a5, F_W(5), xv); F_FMA(a6, F_W(6), xv); F_FMA(a7, F_W(7), xv);
    }
    const __m256 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int c = 0; c < 8; c++) out[c] = finish(acc[c], w_row(w, c, n_in, kind), x, k8, n_in, kind);
}
#endif

/* the dot products of R rows x C outputs starting at output n, then bias and epilogue (fp32, bf16) */
static inline __attribute__((always_inline)) void tile_store(const float *x, int64_t ldx, const gpt2lab_matrix *W,
                                                             int64_t n_in, int64_t n_out, int64_t n, float *y,
                                                             int R, int C, int epilogue) {
    float out[16];
    const int kind = W->kind == KIND_BF16 ? KIND_BF16 : KIND_F32;
    const void *w = w_row(W->w, n, n_in, kind);
#if GPT2LAB_AVX2
    if (R == 4 && C == 3) {
        if (kind == KIND_BF16) float_4x3(x, ldx, w, n_in, KIND_BF16, out);
        else float_4x3(x, ldx, w, n_in, KIND_F32, out);
    } else if (R == 1 && C == 8) {
        if (kind == KIND_BF16) float_1x8(x, w, n_in, KIND_BF16, out);
        else float_1x8(x, w, n_in, KIND_F32, out);
    } else
#endif
    if (kind == KIND_BF16) tile(x, ldx, w, n_in, R, C, KIND_BF16, out);
    else tile(x, ldx, w, n_in, R, C, KIND_F32, out);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float v = out[r * C + c];
            if (W->bias) v += W->bias[n + c];
            float *dst = y + r * n_out + n + c;
            *dst = epilogue_apply(v, dst, epilogue);
        }
}

/* rows m0..m1-1 x outputs n0..n1-1 of y = epilogue(x W^T + b): tiles of 4 rows x 3 outputs, edges with
 * smaller tiles; the arithmetic per element is the same in every tile */
static void block_float(const float *x, const gpt2lab_matrix *W, float *y, int64_t m0, int64_t m1, int64_t n0,
                        int64_t n1, int64_t n_out, int64_t n_in, int epilogue) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) {
        const float *xm = x + m * n_in;
        float *ym = y + m * n_out;
        int64_t n = n0;
        for (; n + 3 <= n1; n += 3) tile_store(xm, n_in, W, n_in, n_out, n, ym, 4, 3, epilogue);
        for (; n < n1; n++) tile_store(xm, n_in, W, n_in, n_out, n, ym, 4, 1, epilogue);
    }
    for (; m + 2 <= m1; m += 2) {
        const float *xm = x + m * n_in;
        float *ym = y + m * n_out;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) tile_store(xm, n_in, W, n_in, n_out, n, ym, 2, 4, epilogue);
        for (; n < n1; n++) tile_store(xm, n_in, W, n_in, n_out, n, ym, 2, 1, epilogue);
    }
    for (; m < m1; m++) {
        const float *xm = x + m * n_in;
        float *ym = y + m * n_out;
        int64_t n = n0;
        for (; n + 8 <= n1; n += 8) tile_store(xm, n_in, W, n_in, n_out, n, ym, 1, 8, epilogue);
        for (; n < n1; n++) tile_store(xm, n_in, W, n_in, n_out, n, ym, 1, 1, epilogue);
    }
}

static inline int omp_threads(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ---- int8 weights: integer products with int16 activations (see the top) ---- */

/* The int16 copy of a layer input: rows of n_in values and one scale per row (x ~ q * scale). */
typedef struct {
    int16_t *q;
    float *scale;
} q16_rows;

/* q = round(x * 32767 / max|x|) (ties to even, the default rounding of lrintf and of cvtps2dq, so both
 * paths agree). A row holding NaN or infinity gets a NaN scale: its outputs are NaN, as fp32's would
 * be, never finite numbers made from garbage. */
static void quantize_row_q16(const float *x, int64_t n, int16_t *q, float *scale) {
    float amax = 0.f;
    int64_t i = 0;
#if GPT2LAB_AVX2
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 vmax = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int l = 0; l < 8; l++) amax = lanes[l] > amax ? lanes[l] : amax;
#endif
    int finite = 1;
    for (int64_t j = 0; j < n; j++) finite &= isfinite(x[j]) != 0; /* max_ps drops NaN: look at every value */
    for (; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    if (!finite) {
        *scale = NAN;
        memset(q, 0, (size_t)n * sizeof *q);
        return;
    }
    *scale = amax / 32767.f;
    /* a row below 32767 / FLT_MAX (~1e-34) would get an infinite inv (inf * x: -32768 after packs, whatever
     * x's sign, and lrintf(inf) is undefined): such a row counts as zero, as the PyTorch twin does */
    const float inv = amax > 0.f && isfinite(32767.f / amax) ? 32767.f / amax : 0.f;
    i = 0;
#if GPT2LAB_AVX2
    const __m256 vinv = _mm256_set1_ps(inv);
    for (; i + 16 <= n; i += 16) {
        const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));
        const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vinv));
        /* packs works per 128-bit lane: put the 64-bit quarters back in order */
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
        _mm256_storeu_si256((__m256i *)(q + i), packed);
    }
#endif
    for (; i < n; i++) q[i] = (int16_t)lrintf(x[i] * inv);
}

#if GPT2LAB_AVX2
static inline int64_t hsum_i32(__m256i v) {
    const __m256i s = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                       _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    const __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return _mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1);
}
#define Q_CHUNK 2048 /* elements summed in int32 lanes before they go to int64 (see the top) */
/* One int8 x int16 multiply-add step of Q_STEP elements: AVX2's vpmaddwd + vpaddd over 16, or with AVX-512
 * VNNI vpdpwssd over 32 (two products per int32 lane either way, exact: 2048 / 16 * 2 * 128 * 32768 < 2^31
 * per lane and chunk, and fewer with 32). The tiles below are written once over these. */
#if GPT2LAB_VNNI
static inline int64_t hsum_i32_512(__m512i v) {
    const __m512i s = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                       _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
    return _mm512_reduce_add_epi64(s);
}
typedef __m512i qvec;
#define Q_STEP 32
#define QV_ZERO() _mm512_setzero_si512()
#define Q_W(c) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + (c) * n_in + k)))
#define Q_X(r) _mm512_loadu_si512((const void *)(x + (r) * ldx + k))
#define Q_MADD(acc, a, b) acc = _mm512_dpwssd_epi32(acc, a, b)
#define QV_HSUM hsum_i32_512
#else
typedef __m256i qvec;
#define Q_STEP 16
#define QV_ZERO() _mm256_setzero_si256()
#define Q_W(c) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + (c) * n_in + k)))
#define Q_X(r) _mm256_loadu_si256((const __m256i *)(x + (r) * ldx + k))
#define Q_MADD(acc, a, b) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define QV_HSUM hsum_i32
#endif
/* 4 rows x 2 outputs over k0..k1 (a multiple of Q_STEP, at most Q_CHUNK long), added to out[r * 2 + c] */
static inline __attribute__((always_inline)) void q16_4x2(const int16_t *x, int64_t ldx, const int8_t *w,
                                                          int64_t n_in, int64_t k0, int64_t k1, int64_t *out) {
    qvec a00 = QV_ZERO(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    for (int64_t k = k0; k < k1; k += Q_STEP) {
        if (k % 32 == 0) PREFETCH_NEXT(w, 2 * n_in, 2 * k, 64); /* a cache line per 32 elements of 2 rows */
        const qvec w0 = Q_W(0), w1 = Q_W(1);
        qvec xv = Q_X(0);
        Q_MADD(a00, w0, xv); Q_MADD(a01, w1, xv);
        xv = Q_X(1);
        Q_MADD(a10, w0, xv); Q_MADD(a11, w1, xv);
        xv = Q_X(2);
        Q_MADD(a20, w0, xv); Q_MADD(a21, w1, xv);
        xv = Q_X(3);
        Q_MADD(a30, w0, xv); Q_MADD(a31, w1, xv);
    }
    out[0] += QV_HSUM(a00); out[1] += QV_HSUM(a01); out[2] += QV_HSUM(a10); out[3] += QV_HSUM(a11);
    out[4] += QV_HSUM(a20); out[5] += QV_HSUM(a21); out[6] += QV_HSUM(a30); out[7] += QV_HSUM(a31);
}
/* 1 row x 8 outputs over k0..k1, the next eight weight rows prefetched */
static inline __attribute__((always_inline)) void q16_1x8(const int16_t *x, const int8_t *w, int64_t n_in,
                                                          int64_t k0, int64_t k1, int64_t *out) {
    const int64_t ldx = 0;
    qvec a0 = QV_ZERO(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t k = k0; k < k1; k += Q_STEP) {
        PREFETCH_NEXT(w, 8 * n_in, 8 * k, 8 * Q_STEP);
        const qvec xv = Q_X(0);
        Q_MADD(a0, Q_W(0), xv); Q_MADD(a1, Q_W(1), xv); Q_MADD(a2, Q_W(2), xv); Q_MADD(a3, Q_W(3), xv);
        Q_MADD(a4, Q_W(4), xv); Q_MADD(a5, Q_W(5), xv); Q_MADD(a6, Q_W(6), xv); Q_MADD(a7, Q_W(7), xv);
    }
    out[0] += QV_HSUM(a0); out[1] += QV_HSUM(a1); out[2] += QV_HSUM(a2); out[3] += QV_HSUM(a3);
    out[4] += QV_HSUM(a4); out[5] += QV_HSUM(a5); out[6] += QV_HSUM(a6); out[7] += QV_HSUM(a7);
}
#endif

/* out[r * C + c] = sum_k x[r][k] * w[c][k], exactly, for R rows x C outputs. Always inlined with
 * constant R and C: 4 x 2 and 1 x 8 take the register tiles, anything else (the edges, a CPU without
 * AVX2) plain integers, with the same result. */
static inline __attribute__((always_inline)) void tile_q16(const int16_t *x, int64_t ldx, const int8_t *w,
                                                           int64_t n_in, int R, int C, int64_t *out) {
    for (int i = 0; i < R * C; i++) out[i] = 0;
    int64_t k16 = 0;
#if GPT2LAB_AVX2
    if ((R == 4 && C == 2) || (R == 1 && C == 8)) {
        k16 = n_in & ~(int64_t)(Q_STEP - 1);
        for (int64_t k0 = 0; k0 < k16; k0 += Q_CHUNK) {
            const int64_t k1 = k0 + Q_CHUNK < k16 ? k0 + Q_CHUNK : k16;
            if (R == 4) q16_4x2(x, ldx, w, n_in, k0, k1, out);
            else q16_1x8(x, w, n_in, k0, k1, out);
        }
    }
#endif
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            int64_t sum = 0;
            for (int64_t k = k16; k < n_in; k++) sum += (int32_t)x[r * ldx + k] * w[c * n_in + k];
            out[r * C + c] += sum;
        }
}

static inline __attribute__((always_inline)) void tile_q16_store(const q16_rows *xq, int64_t m, const gpt2lab_matrix *W,
                                                                 int64_t n_in, int64_t n_out, int64_t n, float *y,
                                                                 int R, int C, int epilogue) {
    int64_t out[8];
    tile_q16(xq->q + m * n_in, n_in, (const int8_t *)W->w + n * n_in, n_in, R, C, out);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float v = (float)((double)out[r * C + c] * ((double)xq->scale[m + r] * (double)W->scale[n + c]));
            if (W->bias) v += W->bias[n + c];
            float *dst = y + (m + r) * n_out + n + c;
            *dst = epilogue_apply(v, dst, epilogue);
        }
}

/* rows m0..m1-1 x outputs n0..n1-1 of y = epilogue(x W^T + b) for int8 W, from x's int16 copy */
static void block_q16(const q16_rows *xq, const gpt2lab_matrix *W, float *y, int64_t m0, int64_t m1, int64_t n0,
                      int64_t n1, int64_t n_out, int64_t n_in, int epilogue) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) {
        int64_t n = n0;
        for (; n + 2 <= n1; n += 2) tile_q16_store(xq, m, W, n_in, n_out, n, y, 4, 2, epilogue);
        for (; n < n1; n++) tile_q16_store(xq, m, W, n_in, n_out, n, y, 4, 1, epilogue);
    }
    for (; m < m1; m++) {
        int64_t n = n0;
        for (; n + 8 <= n1; n += 8) tile_q16_store(xq, m, W, n_in, n_out, n, y, 1, 8, epilogue);
        for (; n < n1; n++) tile_q16_store(xq, m, W, n_in, n_out, n, y, 1, 1, epilogue);
    }
}

/* ---- int4 weights: group-wise symmetric 4-bit, int16 activations (model/quantize.py's "int4") ----
 * A row is stored in units of 128 inputs, 64 bytes each: 16-bit word j (little-endian) of a unit holds input
 * 32 s + j in its nibble s (bits 4s..4s+3), as q + 8 for q in [-8, 7]; a row's last unit is padded with 8s
 * (zeros). One shift and one mask of a 64-byte load give 32 consecutive inputs as int16 lanes (a slice):
 * 2 instructions per 32 weights besides the multiply-add, where a byte layout needs a widening too. One fp32
 * scale per Q4_GROUP inputs (scale[n * groups + g], w = q * scale). The products take the same int16 rows as
 * int8 (quantize_row_q16): per group an exact integer sum (|sum| <= 128 * 8 * 32768 < 2^31), then acc +=
 * (double)sum * (double)scale in group order, and y = (float)(acc * x_scale) once. Every path (AVX-512 VNNI,
 * AVX2, portable) and every tile computes exactly these operations, so results are bit-identical across
 * paths, batch sizes and thread counts, and model/quantize.py's int4_linear repeats them in PyTorch. The
 * group sums of 8 outputs are reduced together (a transposed horizontal-add tree), sharing that cost. */
#define Q4_UNIT 128
static inline int64_t q4_row_bytes(int64_t n_in) { return (n_in + Q4_UNIT - 1) / Q4_UNIT * (Q4_UNIT / 2); }
static inline int64_t q4_groups(int64_t n_in) { return (n_in + Q4_GROUP - 1) / Q4_GROUP; }
static inline int q4_at(const uint8_t *row, int64_t k) { /* input k of a packed row, in [-8, 7] */
    const int64_t r = k % Q4_UNIT, s = r / 32, j = r % 32;
    const uint8_t b = row[k / Q4_UNIT * (Q4_UNIT / 2) + 2 * j + s / 2];
    return (s % 2 ? b >> 4 : b & 15) - 8;
}
/* the exact sum over inputs k0..k1-1 of x * w for one packed row */
static inline int64_t q4_dot_scalar(const int16_t *x, const uint8_t *row, int64_t k0, int64_t k1) {
    int64_t s = 0;
    for (int64_t k = k0; k < k1; k++) s += (int32_t)x[k] * q4_at(row, k);
    return s;
}

#if GPT2LAB_AVX2
/* the sum of each of 8 vectors' int32 lanes, lane c of the result holding vector c's (exact) */
static inline __m256i q4_hsum8(__m256i a0, __m256i a1, __m256i a2, __m256i a3, __m256i a4, __m256i a5, __m256i a6,
                               __m256i a7) {
    const __m256i s0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    const __m256i s1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a4, a5), _mm256_hadd_epi32(a6, a7));
    return _mm256_add_epi32(_mm256_permute2x128_si256(s0, s1, 0x20), _mm256_permute2x128_si256(s0, s1, 0x31));
}
/* unit u (inputs 128 u..128 u + 127) of output c's row times x's, added to acc: one load, then a shift and a
 * mask per slice of 32 (nibble s is inputs 32 s..32 s + 31). The nibbles are q + 8: a group's accumulators
 * start at -8 * x's pair sums (once per group for 8 outputs, not a subtraction per weight). */
#if GPT2LAB_VNNI
#define Q4_MADD(acc, c) do { \
        const __m512i v_ = _mm512_loadu_si512((const void *)(w + (c) * rb + u * 64)); \
        acc = _mm512_dpwssd_epi32(acc, _mm512_and_si512(v_, mask), x0); \
        acc = _mm512_dpwssd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v_, 4), mask), x1); \
        acc = _mm512_dpwssd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v_, 8), mask), x2); \
        acc = _mm512_dpwssd_epi32(acc, _mm512_srli_epi16(v_, 12), x3); \
    } while (0)
#define Q4_FOLD(v) _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1))
#else
#define Q4_HALF(acc, v, xp) do { /* 16-bit words 16 h..16 h + 15 of the unit: inputs 32 s + 16 h + 0..15 */ \
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_and_si256(v, mask), _mm256_loadu_si256((const __m256i *)(xp)))); \
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), \
                                                      _mm256_loadu_si256((const __m256i *)((xp) + 32)))); \
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 8), mask), \
                                                      _mm256_loadu_si256((const __m256i *)((xp) + 64)))); \
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_srli_epi16(v, 12), \
                                                      _mm256_loadu_si256((const __m256i *)((xp) + 96)))); \
    } while (0)
#define Q4_MADD(acc, c) do { \
        const uint8_t *p_ = w + (c) * rb + u * 64; \
        Q4_HALF(acc, _mm256_loadu_si256((const __m256i *)p_), x + 128 * u); \
        Q4_HALF(acc, _mm256_loadu_si256((const __m256i *)(p_ + 32)), x + 128 * u + 16); \
    } while (0)
#define Q4_FOLD(v) (v)
#endif
/* 1 row x 8 outputs: acc[c] (double) of y = x . w[c] before the row's scale, in the canonical order above */
static inline __attribute__((always_inline)) void q4_1x8(const int16_t *x, const uint8_t *w, const float *scale,
                                                         int64_t n_in, double *acc) {
    const int64_t rb = q4_row_bytes(n_in), ng = q4_groups(n_in), full = n_in / Q4_UNIT; /* whole units */
    const __m256i index = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)ng));
    __m256d lo = _mm256_setzero_pd(), hi = lo;
#if GPT2LAB_VNNI
    const __m512i mask = _mm512_set1_epi16(15), minus8 = _mm512_set1_epi16(-8);
    typedef __m512i q4acc;
#define Q4_ZERO _mm512_setzero_si512()
#else
    const __m256i mask = _mm256_set1_epi16(15), minus8 = _mm256_set1_epi16(-8);
    typedef __m256i q4acc;
#define Q4_ZERO _mm256_setzero_si256()
#endif
    for (int64_t g = 0; g < ng; g++) {
        const int64_t u0 = g * (Q4_GROUP / Q4_UNIT), u1 = u0 + Q4_GROUP / Q4_UNIT < full ? u0 + Q4_GROUP / Q4_UNIT : full;
        q4acc offset = Q4_ZERO;
        for (int64_t k = 128 * u0; k < 128 * u1; k += 32) {
#if GPT2LAB_VNNI
            offset = _mm512_dpwssd_epi32(offset, minus8, _mm512_loadu_si512((const void *)(x + k)));
#else
            offset = _mm256_add_epi32(offset, _mm256_add_epi32(
                _mm256_madd_epi16(minus8, _mm256_loadu_si256((const __m256i *)(x + k))),
                _mm256_madd_epi16(minus8, _mm256_loadu_si256((const __m256i *)(x + k + 16)))));
#endif
        }
        q4acc a0 = offset, a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t u = u0; u < u1; u++) {
            PREFETCH_NEXT(w, 8 * rb, 8 * u * 64, 8 * 64);
#if GPT2LAB_VNNI
            const __m512i x0 = _mm512_loadu_si512((const void *)(x + 128 * u));
            const __m512i x1 = _mm512_loadu_si512((const void *)(x + 128 * u + 32));
            const __m512i x2 = _mm512_loadu_si512((const void *)(x + 128 * u + 64));
            const __m512i x3 = _mm512_loadu_si512((const void *)(x + 128 * u + 96));
#endif
            Q4_MADD(a0, 0); Q4_MADD(a1, 1); Q4_MADD(a2, 2); Q4_MADD(a3, 3);
            Q4_MADD(a4, 4); Q4_MADD(a5, 5); Q4_MADD(a6, 6); Q4_MADD(a7, 7);
        }
        __m256i sums = q4_hsum8(Q4_FOLD(a0), Q4_FOLD(a1), Q4_FOLD(a2), Q4_FOLD(a3), Q4_FOLD(a4), Q4_FOLD(a5),
                                Q4_FOLD(a6), Q4_FOLD(a7));
        const int64_t k_end = (g + 1) * Q4_GROUP < n_in ? (g + 1) * Q4_GROUP : n_in;
        if (k_end > Q4_UNIT * u1) { /* the last group's inputs past the whole units (n_in % 128 != 0) */
            int32_t s[8];
            _mm256_storeu_si256((__m256i *)s, sums);
            for (int c = 0; c < 8; c++) s[c] += (int32_t)q4_dot_scalar(x, w + c * rb, Q4_UNIT * u1, k_end);
            sums = _mm256_loadu_si256((const __m256i *)s);
        }
        const __m256 sc = _mm256_i32gather_ps(scale + g, index, 4);
        lo = _mm256_add_pd(lo, _mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(sums)),
                                             _mm256_cvtps_pd(_mm256_castps256_ps128(sc))));
        hi = _mm256_add_pd(hi, _mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(sums, 1)),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(sc, 1))));
    }
#undef Q4_ZERO
    _mm256_storeu_pd(acc, lo);
    _mm256_storeu_pd(acc + 4, hi);
}
#endif

/* one row x one output, the same operations one group at a time (edges, and every tile without AVX2) */
static inline double q4_1x1(const int16_t *x, const uint8_t *row, const float *scale, int64_t n_in) {
    double acc = 0.0;
    for (int64_t g = 0, ng = q4_groups(n_in); g < ng; g++) {
        const int64_t k1 = (g + 1) * Q4_GROUP < n_in ? (g + 1) * Q4_GROUP : n_in;
        acc += (double)q4_dot_scalar(x, row, g * Q4_GROUP, k1) * (double)scale[g];
    }
    return acc;
}

static inline void q4_store(const q16_rows *xq, int64_t m, const gpt2lab_matrix *W, int64_t n_out, int64_t n,
                            const double *acc, int C, float *y, int epilogue) {
    for (int c = 0; c < C; c++) {
        float v = (float)(acc[c] * (double)xq->scale[m]);
        if (W->bias) v += W->bias[n + c];
        float *dst = y + m * n_out + n + c;
        *dst = epilogue_apply(v, dst, epilogue);
    }
}

/* rows m0..m1-1 x outputs n0..n1-1 of y = epilogue(x W^T + b) for int4 W, from x's int16 copy: row by row
 * (the weights of a block stay in L2 while the rows pass over them), 8 outputs at a time */
static void block_q4(const q16_rows *xq, const gpt2lab_matrix *W, float *y, int64_t m0, int64_t m1, int64_t n0,
                     int64_t n1, int64_t n_out, int64_t n_in, int epilogue) {
    const uint8_t *w = (const uint8_t *)W->w;
    const int64_t rb = q4_row_bytes(n_in), ng = q4_groups(n_in);
    for (int64_t m = m0; m < m1; m++) {
        const int16_t *x = xq->q + m * n_in;
        int64_t n = n0;
        double acc[8];
#if GPT2LAB_AVX2
        for (; n + 8 <= n1; n += 8) {
            q4_1x8(x, w + n * rb, W->scale + n * ng, n_in, acc);
            q4_store(xq, m, W, n_out, n, acc, 8, y, epilogue);
        }
#endif
        for (; n < n1; n++) {
            acc[0] = q4_1x1(x, w + n * rb, W->scale + n * ng, n_in);
            q4_store(xq, m, W, n_out, n, acc, 1, y, epilogue);
        }
    }
}

/* y[n_rows, n_out] = epilogue(x[n_rows, n_in] W^T + b), called inside a parallel region: the team
 * splits the outputs into column blocks small enough to stay in L2 while every row passes over them
 * (rows go in chunks of 64, so x stays in cache too). One row: blocks of 8 outputs, eight weight
 * streams in flight per thread. For int8 W the rows are first quantized to xq (scratch of n_rows *
 * n_in), unless `quantized` says xq holds them already. */
static void team_linear(const float *x, const gpt2lab_matrix *W, float *y, int64_t n_rows, int64_t n_out,
                        int64_t n_in, int epilogue, const q16_rows *xq, int quantized) {
    const int q8 = W->kind == KIND_Q8 || W->kind == KIND_Q4; /* both take the int16 rows */
    if (q8 && !quantized) {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < n_rows; m++) quantize_row_q16(x + m * n_in, n_in, xq->q + m * n_in, xq->scale + m);
    }
    const int64_t row_bytes = W->kind == KIND_Q4 ? q4_row_bytes(n_in) : n_in * (q8 ? 1 : W->kind == KIND_BF16 ? 2 : 4);
    int64_t nb = n_rows == 1 ? 8 : (int64_t)(196608 / row_bytes) / 24 * 24;
    if (nb < 24 && n_rows > 1) nb = 24;
    const int64_t n_blocks = (n_out + nb - 1) / nb;
    const int64_t row_chunk = 64;
    const int64_t n_chunks = (n_rows + row_chunk - 1) / row_chunk;
    /* handed out a few blocks at a time, not split in equal shares up front: a thread that another process
     * keeps off its core for a while leaves its blocks to the others instead of stalling the whole team at
     * the next barrier (every block computes the same arithmetic whoever runs it) */
    const int64_t per_thread = n_chunks * n_blocks / (16 * (int64_t)omp_threads());
    const int grab = per_thread > 1 ? (int)per_thread : 1;
#pragma omp for schedule(dynamic, grab) collapse(2)
    for (int64_t rc = 0; rc < n_chunks; rc++)
        for (int64_t blk = 0; blk < n_blocks; blk++) {
            const int64_t n0 = blk * nb, n1 = n0 + nb < n_out ? n0 + nb : n_out;
            const int64_t m0 = rc * row_chunk, m1 = m0 + row_chunk < n_rows ? m0 + row_chunk : n_rows;
            if (W->kind == KIND_Q4) block_q4(xq, W, y, m0, m1, n0, n1, n_out, n_in, epilogue);
            else if (q8) block_q16(xq, W, y, m0, m1, n0, n1, n_out, n_in, epilogue);
            else block_float(x, W, y, m0, m1, n0, n1, n_out, n_in, epilogue);
        }
}

/* F.linear(x, W, b) for x [n_rows, n_in] -> y [n_rows, n_out]; W of any kind (see gpt2lab_matrix).
 * xq_scratch: n_rows * n_in int16 and xs_scratch n_rows floats when W is int8 (else unused). */
void gpt2lab_linear(const float *x, const gpt2lab_matrix *W_in, float *y, int64_t n_rows, int64_t n_out,
                    int64_t n_in, int16_t *xq_scratch, float *xs_scratch, int n_threads) {
    const gpt2lab_matrix W = *W_in;
    const q16_rows xq = {xq_scratch, xs_scratch};
#pragma omp parallel num_threads(n_threads)
    team_linear(x, &W, y, n_rows, n_out, n_in, EPILOGUE_NONE, &xq, 0);
}


static void layer_norm(const float *restrict x, const float *restrict w, const float *restrict b,
                       float *restrict y, int64_t n, float eps) {
    float mean = 0.f, var = 0.f;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
    for (int64_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.f / sqrtf(var / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = (x[i] - mean) * inv * w[i] + b[i];
}

static inline float dot(const float *a, const float *b, int64_t n) {
    vec8 acc = v_zero();
    const int64_t n8 = n & ~(int64_t)7;
    for (int64_t k = 0; k < n8; k += 8) acc = v_fma(v_load(a + k), v_load(b + k), acc);
    return finish(acc, a, b, n8, n, KIND_F32);
}

/* ---- a whole cached forward: tokens -> logits, in one call ------------------------------------
 * The same arithmetic as GPT2.forward with the KV cache (GPT-2's pre-LayerNorm blocks, the MLP's
 * activation, tied or untied head) in one OpenMP region: the threads split every matrix product by output
 * columns and the attention by (token, head), and meet at a barrier between steps. A token is any
 * (cache row, position) pair: a decode step has one per sequence, a prefill a whole prompt per
 * sequence. Every layer writes all tokens' keys and values before any token attends, and a token at
 * position p attends to slots 0..p of its own cache row. */

typedef struct {
    const float *ln_1_w, *ln_1_b;
    gpt2lab_matrix attn, attn_proj;
    const float *ln_2_w, *ln_2_b;
    gpt2lab_matrix fc, mlp_proj;
    float *k_cache, *v_cache; /* this layer's cache, [max_batch, n_head, max_seq, head_dim] */
    float attn_scale;
} gpt2lab_layer;

/* logits [n_logits, vocab] for tokens t = logit_tokens[i], after writing every token's keys and values
 * into the cache (token t at positions[t] of cache row cache_rows[t]). wte: the embedding, of any
 * kind (int8: its scale per row); head: the LM head (no bias). Scratch: x and h of n_tok * n_embd floats, big of
 * n_tok * max(3 * n_embd, n_inner), hl of n_logits * n_embd, scores of n_threads * max_seq; for int8
 * weights xq of n_tok * max(n_embd, n_inner) int16 and xs of n_tok floats (else unused). */
/* token th / n_head's key and value for head th % n_head (from its [q | k | v] row of big) into its cache slot */
static inline void store_kv(const gpt2lab_layer *L, const float *big, const int64_t *positions,
                            const int64_t *cache_rows, int64_t th, int64_t n_head, int64_t C, int64_t D,
                            int64_t max_seq) {
    const int64_t t = th / n_head, hd = th % n_head;
    const float *qkv = big + t * 3 * C;
    const int64_t offset = ((cache_rows[t] * n_head + hd) * max_seq + positions[t]) * D;
    memcpy(L->k_cache + offset, qkv + C + hd * D, D * sizeof(float));
    memcpy(L->v_cache + offset, qkv + 2 * C + hd * D, D * sizeof(float));
}

/* token th / n_head's attention output for head th % n_head, over slots 0..position of its cache row, into h */
static inline void attend(const gpt2lab_layer *L, const float *big, float *h, const int64_t *positions,
                          const int64_t *cache_rows, int64_t th, int64_t n_head, int64_t C, int64_t D,
                          int64_t max_seq, float *scores_all) {
    const int64_t t = th / n_head, hd = th % n_head, len = positions[t] + 1;
    const float *q = big + t * 3 * C + hd * D;
    const int64_t offset = (cache_rows[t] * n_head + hd) * max_seq * D;
    const float *kh = L->k_cache + offset, *vh = L->v_cache + offset;
    float *scores = scores_all;
#ifdef _OPENMP
    scores += (int64_t)omp_get_thread_num() * max_seq;
#endif
    float top = -INFINITY, total = 0.f;
    for (int64_t s = 0; s < len; s++) {
        scores[s] = dot(q, kh + s * D, D) * L->attn_scale;
        if (scores[s] > top) top = scores[s];
    }
    for (int64_t s = 0; s < len; s++) total += (scores[s] = exp_approx(scores[s] - top));
    float *out = h + t * C + hd * D; /* h is free again: it takes the attention output */
    for (int64_t d = 0; d < D; d++) out[d] = 0.f;
    for (int64_t s = 0; s < len; s++) {
        const float weight = scores[s] / total;
        const float *vs = vh + s * D;
        for (int64_t d = 0; d < D; d++) out[d] = fmaf(weight, vs[d], out[d]);
    }
}

/* ---- LoRA adapters per token (gpt2lab.model.multi_lora): punica / S-LoRA's idea, each token adds its own
 * adapter's low-rank product (x A^T) B^T * scale to a projection's output, the base product being shared.
 * One token's delta is computed by one thread in a fixed order, so it is the same whatever else the forward
 * holds (batch invariance); a token of no adapter (slot -1) is untouched. */
typedef struct {
    const float *a, *bt; /* A [rank, n_in], B transposed [rank, n_out], fp32; a == NULL: not adapted */
    int64_t rank;
    float scale;
} gpt2lab_lora_pair;

typedef struct {
    const int64_t *token_slot;       /* [n_tok]: the adapter slot of each token, -1 for none */
    const gpt2lab_lora_pair *pairs;  /* [n_slots][n_layer][4]: attn, attn_proj, fc, mlp_proj */
    float *tmp;                      /* scratch of n_tok * max_rank floats */
    int64_t max_rank;
} gpt2lab_lora;

/* y[t] += (x[t] A^T) B^T * scale for every token t of an adapter adapting projection j of layer l */
static void lora_add(const gpt2lab_lora *lo, int64_t l, int64_t n_layer, int j, const float *x, int64_t n_in,
                     float *y, int64_t n_out, int64_t n_tok) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tok; t++) {
        const int64_t s = lo->token_slot[t];
        if (s < 0) continue;
        const gpt2lab_lora_pair *P = &lo->pairs[(s * n_layer + l) * 4 + j];
        if (!P->a) continue;
        float *u = lo->tmp + t * lo->max_rank;
        for (int64_t r = 0; r < P->rank; r++) u[r] = dot(x + t * n_in, P->a + r * n_in, n_in);
        float *yt = y + t * n_out;
        for (int64_t r = 0; r < P->rank; r++) { /* rank by rank over contiguous outputs: vectorized */
            const float w = u[r] * P->scale, *br = P->bt + r * n_out;
            for (int64_t o = 0; o < n_out; o++) yt[o] = fmaf(br[o], w, yt[o]);
        }
    }
}

/* Returns 0, or without doing anything 1 when a token id is outside [0, vocab), 2 when a position is outside
 * [0, max_seq) (the caller says which: it indexes memory). */
int gpt2lab_forward(const gpt2lab_layer *layers, int64_t n_layer, const gpt2lab_matrix *wte, const float *wpe,
                     const float *ln_f_w, const float *ln_f_b, const gpt2lab_matrix *head, const int64_t *tokens,
                     const int64_t *positions, const int64_t *cache_rows, int64_t n_tok, const int64_t *logit_tokens,
                     int64_t n_logits, int64_t n_embd, int64_t n_head, int64_t n_inner, int64_t vocab, int64_t max_seq,
                     float eps, int64_t activation, float *x, float *h, float *big, float *hl, float *scores_all,
                     int16_t *xq_scratch, float *xs_scratch, float *logits, int n_threads, const gpt2lab_lora *lora) {
    const int64_t C = n_embd, D = n_embd / n_head;
    const q16_rows xq = {xq_scratch, xs_scratch};
    int one_per_row = 1; /* every token in a cache row of its own (rows are given in increasing order) */
    for (int64_t t = 0; t < n_tok; t++) {
        if (tokens[t] < 0 || tokens[t] >= vocab) return 1;
        if (positions[t] < 0 || positions[t] >= max_seq) return 2;
        if (t > 0 && cache_rows[t] <= cache_rows[t - 1]) one_per_row = 0;
    }
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tok; t++) {
            const int64_t tok = tokens[t];
            const float *pe = wpe + positions[t] * C;
            float *xt = x + t * C;
            const void *e = w_row(wte->w, tok, C, (int)wte->kind);
            if (wte->kind == KIND_Q8) {
                const float s = wte->scale[tok];
                for (int64_t i = 0; i < C; i++) xt[i] = w_at(e, i, KIND_Q8) * s + pe[i];
            } else if (wte->kind == KIND_BF16) {
                for (int64_t i = 0; i < C; i++) xt[i] = w_at(e, i, KIND_BF16) + pe[i];
            } else {
                for (int64_t i = 0; i < C; i++) xt[i] = w_at(e, i, KIND_F32) + pe[i];
            }
        }
        for (int64_t l = 0; l < n_layer; l++) {
            const gpt2lab_layer *L = &layers[l];
            const int q_attn = L->attn.kind == KIND_Q8 || L->attn.kind == KIND_Q4;
            const int q_fc = L->fc.kind == KIND_Q8 || L->fc.kind == KIND_Q4;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < n_tok; t++) { /* an int8 product's input is quantized here, saving a barrier */
                layer_norm(x + t * C, L->ln_1_w, L->ln_1_b, h + t * C, C, eps);
                if (q_attn) quantize_row_q16(h + t * C, C, xq.q + t * C, xq.scale + t);
            }
            team_linear(h, &L->attn, big, n_tok, 3 * C, C, EPILOGUE_NONE, &xq, q_attn); /* [q | k | v] rows */
            if (lora) lora_add(lora, l, n_layer, 0, h, C, big, 3 * C, n_tok);
            if (one_per_row) { /* a decode step: a token attends to its own row only, whose new slot it writes */
#pragma omp for schedule(dynamic, 1)
                for (int64_t th = 0; th < n_tok * n_head; th++) {
                    store_kv(L, big, positions, cache_rows, th, n_head, C, D, max_seq);
                    attend(L, big, h, positions, cache_rows, th, n_head, C, D, max_seq, scores_all);
                }
            } else {
#pragma omp for schedule(static)
                for (int64_t th = 0; th < n_tok * n_head; th++) /* keys and values of every token first */
                    store_kv(L, big, positions, cache_rows, th, n_head, C, D, max_seq);
#pragma omp for schedule(dynamic, 4)
                for (int64_t th = 0; th < n_tok * n_head; th++)
                    attend(L, big, h, positions, cache_rows, th, n_head, C, D, max_seq, scores_all);
            }
            team_linear(h, &L->attn_proj, x, n_tok, C, C, EPILOGUE_ADD, &xq, 0);
            if (lora) lora_add(lora, l, n_layer, 1, h, C, x, C, n_tok);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < n_tok; t++) {
                layer_norm(x + t * C, L->ln_2_w, L->ln_2_b, h + t * C, C, eps);
                if (q_fc) quantize_row_q16(h + t * C, C, xq.q + t * C, xq.scale + t);
            }
            if (lora) { /* the delta goes in before the activation: the same values as the fused epilogue */
                team_linear(h, &L->fc, big, n_tok, n_inner, C, EPILOGUE_NONE, &xq, q_fc);
                lora_add(lora, l, n_layer, 2, h, C, big, n_inner, n_tok);
#pragma omp for schedule(static)
                for (int64_t i = 0; i < n_tok * n_inner; i++) big[i] = epilogue_apply(big[i], NULL, (int)activation);
            } else {
                team_linear(h, &L->fc, big, n_tok, n_inner, C, (int)activation, &xq, q_fc);
            }
            team_linear(big, &L->mlp_proj, x, n_tok, C, n_inner, EPILOGUE_ADD, &xq, 0);
            if (lora) lora_add(lora, l, n_layer, 3, big, n_inner, x, C, n_tok);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_logits; i++)
            layer_norm(x + logit_tokens[i] * C, ln_f_w, ln_f_b, hl + i * C, C, eps);
        team_linear(hl, head, logits, n_logits, vocab, C, EPILOGUE_NONE, &xq, 0);
    }
    return 0;
}

/* ---- Sampling: the two full-vocabulary scans of a sampling step (sampling/transforms.py TopK,
 * sampling/pipeline.py sample) ----
 * Their results equal the PyTorch code's exactly: a selection and comparisons do not round, and the
 * inverse-CDF sums are the same float64 additions in the same order (torch's CPU cumsum adds in index
 * order). They only skip work: after top-k, all but k of 50k probabilities are zero, and adding 0.0 to
 * a sum leaves it unchanged, so blocks of zeros are skipped; the scan for the k-th value only looks at
 * a value beating the k-th best so far, which a block of 8 rules out with one comparison. */

static void heap_sift_down(float *heap, int64_t n, int64_t i) { /* min-heap: heap[0] the smallest */
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) return;
        if (c + 1 < n && heap[c + 1] < heap[c]) c++;
        if (!(heap[c] < heap[i])) return;
        const float t = heap[c];
        heap[c] = heap[i];
        heap[i] = t;
        i = c;
    }
}

/* The k-th highest value of row[0..n), repeats counted (torch.topk(row, k).values[k - 1]), 1 <= k <= n;
 * heap has room for k floats. Returns NAN, and *has_nan = 1, when the row holds a NaN. */
static float kth_highest(const float *row, int64_t n, int64_t k, float *heap, int *has_nan) {
    for (int64_t i = 0; i < k; i++) {
        if (isnan(row[i])) { *has_nan = 1; return NAN; }
        heap[i] = row[i];
    }
    for (int64_t i = k / 2 - 1; i >= 0; i--) heap_sift_down(heap, k, i);
    int64_t i = k;
#if GPT2LAB_AVX2
    for (; i + 8 <= n; i += 8) {
        /* lanes above the k-th best so far, or NaN (unordered): usually none */
        int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(heap[0]), _CMP_NLE_UQ));
        while (bits) {
            const float v = row[i + __builtin_ctz(bits)];
            bits &= bits - 1;
            if (isnan(v)) { *has_nan = 1; return NAN; }
            if (v > heap[0]) { heap[0] = v; heap_sift_down(heap, k, 0); }
        }
    }
#endif
    for (; i < n; i++) {
        const float v = row[i];
        if (isnan(v)) { *has_nan = 1; return NAN; }
        if (v > heap[0]) { heap[0] = v; heap_sift_down(heap, k, 0); }
    }
    return heap[0];
}

/* transformers' TopKLogitsWarper on rows [rows, vocab], in place: every score below the row's
 * ks[row]-th highest becomes -inf (ties with it stay); ks[row] == 0 leaves the row alone, else
 * 1 <= ks[row] <= vocab. heap: room for max(ks) floats; thresholds: for rows floats. Returns 0, or 1 without
 * changing anything when a row holds a NaN (torch.topk's order for NaN is the PyTorch code's to keep: the
 * caller runs it). */
int gpt2lab_top_k_(float *scores, int64_t rows, int64_t vocab, const int64_t *ks, float *heap, float *thresholds) {
    int has_nan = 0;
    for (int64_t r = 0; r < rows; r++) {
        if (ks[r] == 0) continue;
        thresholds[r] = kth_highest(scores + r * vocab, vocab, ks[r], heap, &has_nan);
        if (has_nan) return 1;
    }
    for (int64_t r = 0; r < rows; r++) {
        if (ks[r] == 0) continue;
        float *row = scores + r * vocab;
        const float threshold = thresholds[r];
        for (int64_t i = 0; i < vocab; i++) row[i] = row[i] < threshold ? -INFINITY : row[i];
    }
    return 0;
}

/* The float64 running sum of row[0..n) in index order, stopped at the first index where it exceeds
 * target (returned; *sum is the sum so far), or the whole sum (returns n). Zeros are skipped: x + 0.0 == x. */
static int64_t running_sum(const float *row, int64_t n, double target, double *sum) {
    double acc = 0.0;
    int64_t i = 0;
#if GPT2LAB_AVX2
    for (; i + 8 <= n; i += 8) {
        int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), _mm256_setzero_ps(), _CMP_NEQ_UQ));
        while (bits) {
            const int64_t j = i + __builtin_ctz(bits);
            bits &= bits - 1;
            acc += (double)row[j];
            if (acc > target) { *sum = acc; return j; }
        }
    }
#endif
    for (; i < n; i++) {
        acc += (double)row[i];
        if (acc > target) { *sum = acc; return i; }
    }
    *sum = acc;
    return n;
}

/* Per row of probabilities [rows, vocab]: totals[r], the float64 sum in index order (the last entry of
 * torch.cumsum(row, dtype=float64); NaN if the row holds one). */
void gpt2lab_row_totals(const float *probs, int64_t rows, int64_t vocab, double *totals) {
    for (int64_t r = 0; r < rows; r++) running_sum(probs + r * vocab, vocab, INFINITY, totals + r);
}

/* Per row: the first index whose float64 running sum exceeds targets[r] (torch.searchsorted(cumsum,
 * target, right=True)); targets[r] < the row's total, so that index holds a probability above 0. */
void gpt2lab_inverse_cdf(const float *probs, int64_t rows, int64_t vocab, const double *targets, int64_t *picked) {
    double sum;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t i = running_sum(probs + r * vocab, vocab, targets[r], &sum);
        picked[r] = i < vocab ? i : vocab; /* vocab: past the end, as searchsorted would say */
    }
}
