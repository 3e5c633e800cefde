/* gpt2lab's CPU kernels for inference: fp32 and weight-only int8. Built by kernels.py on first use
 * (cc -O3 -march=native -fopenmp -ffp-contract=off) and called through ctypes.
 *
 * Why: a decode step of a few rows reads every weight once and is bound by memory bandwidth (one row)
 * or by loads from cache (a few rows). BLAS/oneDNN kernels stream a weight at 60-80% of what a plain
 * sum() reaches for one row on AVX2 CPUs, and are tuned for bigger matrices than 2-16 rows. Int8
 * weights (one scale per output channel) quarter the bytes per token; they are widened to fp32 in
 * registers and accumulate in fp32. The whole cached forward (embedding to logits, prefill or decode)
 * is one call, so Python's per-op cost is paid once per step.
 *
 * Batch invariance: every output element y[m, n] = x[m] . w[n] is computed by the same sequence of
 * operations whatever the number of rows, the tile that holds it or the thread that runs it: one
 * 8-lane fp32 accumulator over k in steps of 8 (fused multiply-add), a fixed horizontal sum, then the
 * k % 8 tail one fused multiply-add at a time, then the scale and the bias. Attention runs per token
 * (query) over its own row's cache slots 0..pos in order. So a sequence's logits are bit-identical
 * alone or in any batch, in prefill and in decode. Without AVX2/FMA the same operations run on an
 * 8-float array with fmaf (same results, slower).
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

int gpt2lab_has_avx2(void) { return GPT2LAB_AVX2; }

/* A weight matrix [n_out, n_in], row-major (nn.Linear's layout), of one of three kinds: fp32; int8
 * with one fp32 scale per output row (w[n, k] = q[n, k] * scale[n]); bf16 (16-bit storage, fp32
 * arithmetic). bias may be NULL. */
enum { KIND_F32 = 0, KIND_Q8 = 1, KIND_BF16 = 2 };
typedef struct {
    const void *w;
    const float *scale; /* KIND_Q8 only */
    const float *bias;
    int64_t kind;
} gpt2lab_matrix;

/* what a product does with its result: store it, add it (a residual stream), or apply the MLP's
 * activation (the numbers are GPT2Config.activation_function's, see kernels.py ACTIVATIONS) */
enum { EPILOGUE_NONE, EPILOGUE_ADD, EPILOGUE_GELU_TANH, EPILOGUE_GELU, EPILOGUE_RELU, EPILOGUE_SILU };

static inline float epilogue_apply(float v, const float *out, int epilogue) {
    switch (epilogue) {
    case EPILOGUE_ADD: return *out + v;
    case EPILOGUE_GELU_TANH: return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case EPILOGUE_GELU: return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
    case EPILOGUE_RELU: return v > 0.f ? v : 0.f;
    case EPILOGUE_SILU: return v / (1.f + expf(-v));
    default: return v;
    }
}

/* ---- the 8-lane accumulator: AVX2 registers or a portable emulation with identical rounding ---- */
#if GPT2LAB_AVX2
typedef __m256 vec8;
static inline vec8 v_zero(void) { return _mm256_setzero_ps(); }
static inline vec8 v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline vec8 v_load_q(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
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
static inline vec8 v_load_q(const int8_t *p) { vec8 v; for (int i = 0; i < 8; i++) v.f[i] = (float)p[i]; return v; }
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
    if (kind == KIND_Q8) return v_load_q((const int8_t *)w + k);
    if (kind == KIND_BF16) return v_load_bf16((const uint16_t *)w + k);
    return v_load((const float *)w + k);
}
static inline __attribute__((always_inline)) const void *w_row(const void *w, int64_t row, int64_t n_in, int kind) {
    const int64_t size = kind == KIND_Q8 ? 1 : kind == KIND_BF16 ? 2 : 4;
    return (const char *)w + row * n_in * size;
}

/* the end of every dot product: fixed horizontal sum, then the tail k0..n_in-1 in order */
static inline __attribute__((always_inline)) float finish(vec8 acc, const void *w, const float *x, int64_t k0,
                                                          int64_t n_in, int kind) {
    float s = v_hsum(acc);
    for (int64_t k = k0; k < n_in; k++) s = fmaf(w_at(w, k, kind), x[k], s);
    return s;
}

/* A register tile: R input rows x C weight rows (outputs), each with its own accumulator. Always
 * inlined with constant R, C and kind, so the arrays live in registers. out[r * C + c] = x[r] . w[c]. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx, const void *w, int64_t n_in,
                                                       int R, int C, int kind, float *out) {
    vec8 acc[16]; /* R * C <= 16: a fixed size, so the compiler keeps it in registers */
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

/* the dot products of R rows x C outputs starting at output n, then scale, bias and epilogue */
static inline __attribute__((always_inline)) void tile_store(const float *x, int64_t ldx, const gpt2lab_matrix *W,
                                                             int64_t n_in, int64_t n_out, int64_t n, float *y,
                                                             int R, int C, int epilogue) {
    float out[16];
    if (W->kind == KIND_Q8) tile(x, ldx, w_row(W->w, n, n_in, KIND_Q8), n_in, R, C, KIND_Q8, out);
    else if (W->kind == KIND_BF16) tile(x, ldx, w_row(W->w, n, n_in, KIND_BF16), n_in, R, C, KIND_BF16, out);
    else tile(x, ldx, w_row(W->w, n, n_in, KIND_F32), n_in, R, C, KIND_F32, out);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float v = out[r * C + c];
            if (W->kind == KIND_Q8) v *= W->scale[n + c];
            if (W->bias) v += W->bias[n + c];
            float *dst = y + r * n_out + n + c;
            *dst = epilogue_apply(v, dst, epilogue);
        }
}

/* rows m0..m1-1 x outputs n0..n1-1 of y = epilogue(x W^T + b): tiles of 4 rows x 3 outputs (12
 * accumulators), edges with smaller tiles; the arithmetic per element is the same in every tile */
static void block_many(const float *x, const gpt2lab_matrix *W, float *y, int64_t m0, int64_t m1, int64_t n0,
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

/* y[n_rows, n_out] = epilogue(x[n_rows, n_in] W^T + b), called inside a parallel region: the team
 * splits the outputs into column blocks small enough to stay in L2 while every row passes over them
 * (rows go in chunks of 64, so x stays in cache too). One row: blocks of 8 outputs, eight weight
 * streams in flight per thread. */
static void team_linear(const float *x, const gpt2lab_matrix *W, float *y, int64_t n_rows, int64_t n_out,
                        int64_t n_in, int epilogue) {
    const int64_t elem = W->kind == KIND_Q8 ? 1 : W->kind == KIND_BF16 ? 2 : 4;
    int64_t nb = n_rows == 1 ? 8 : (int64_t)(196608 / (n_in * elem)) / 24 * 24;
    if (nb < 24 && n_rows > 1) nb = 24;
    const int64_t n_blocks = (n_out + nb - 1) / nb;
    const int64_t row_chunk = 64;
    const int64_t n_chunks = (n_rows + row_chunk - 1) / row_chunk;
#pragma omp for schedule(static) collapse(2)
    for (int64_t rc = 0; rc < n_chunks; rc++)
        for (int64_t blk = 0; blk < n_blocks; blk++) {
            const int64_t n0 = blk * nb, n1 = n0 + nb < n_out ? n0 + nb : n_out;
            const int64_t m0 = rc * row_chunk, m1 = m0 + row_chunk < n_rows ? m0 + row_chunk : n_rows;
            block_many(x, W, y, m0, m1, n0, n1, n_out, n_in, epilogue);
        }
}

/* F.linear(x, W, b) for x [n_rows, n_in] -> y [n_rows, n_out]; W of any kind (see gpt2lab_matrix) */
void gpt2lab_linear(const float *x, const gpt2lab_matrix *W_in, float *y, int64_t n_rows, int64_t n_out,
                    int64_t n_in, int n_threads) {
    const gpt2lab_matrix W = *W_in;
#pragma omp parallel num_threads(n_threads)
    team_linear(x, &W, y, n_rows, n_out, n_in, EPILOGUE_NONE);
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
 * n_tok * max(3 * n_embd, n_inner), hl of n_logits * n_embd, scores of n_threads * max_seq. */
void gpt2lab_forward(const gpt2lab_layer *layers, int64_t n_layer, const gpt2lab_matrix *wte, const float *wpe,
                     const float *ln_f_w, const float *ln_f_b, const gpt2lab_matrix *head, const int64_t *tokens,
                     const int64_t *positions, const int64_t *cache_rows, int64_t n_tok, const int64_t *logit_tokens,
                     int64_t n_logits, int64_t n_embd, int64_t n_head, int64_t n_inner, int64_t vocab, int64_t max_seq,
                     float eps, int64_t activation, float *x, float *h, float *big, float *hl, float *scores_all,
                     float *logits, int n_threads) {
    const int64_t C = n_embd, D = n_embd / n_head;
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
#pragma omp for schedule(static)
            for (int64_t t = 0; t < n_tok; t++) layer_norm(x + t * C, L->ln_1_w, L->ln_1_b, h + t * C, C, eps);
            team_linear(h, &L->attn, big, n_tok, 3 * C, C, EPILOGUE_NONE); /* [q | k | v] rows */
#pragma omp for schedule(static)
            for (int64_t th = 0; th < n_tok * n_head; th++) { /* keys and values of every token first */
                const int64_t t = th / n_head, hd = th % n_head, pos = positions[t];
                const float *qkv = big + t * 3 * C;
                const int64_t offset = ((cache_rows[t] * n_head + hd) * max_seq + pos) * D;
                memcpy(L->k_cache + offset, qkv + C + hd * D, D * sizeof(float));
                memcpy(L->v_cache + offset, qkv + 2 * C + hd * D, D * sizeof(float));
            }
#pragma omp for schedule(dynamic, 4)
            for (int64_t th = 0; th < n_tok * n_head; th++) {
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
                for (int64_t s = 0; s < len; s++) total += (scores[s] = expf(scores[s] - top));
                float *out = h + t * C + hd * D; /* h is free again: it takes the attention output */
                for (int64_t d = 0; d < D; d++) out[d] = 0.f;
                for (int64_t s = 0; s < len; s++) {
                    const float weight = scores[s] / total;
                    const float *vs = vh + s * D;
                    for (int64_t d = 0; d < D; d++) out[d] = fmaf(weight, vs[d], out[d]);
                }
            }
            team_linear(h, &L->attn_proj, x, n_tok, C, C, EPILOGUE_ADD);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < n_tok; t++) layer_norm(x + t * C, L->ln_2_w, L->ln_2_b, h + t * C, C, eps);
            team_linear(h, &L->fc, big, n_tok, n_inner, C, (int)activation);
            team_linear(big, &L->mlp_proj, x, n_tok, C, n_inner, EPILOGUE_ADD);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_logits; i++)
            layer_norm(x + logit_tokens[i] * C, ln_f_w, ln_f_b, hl + i * C, C, eps);
        team_linear(hl, head, logits, n_logits, vocab, C, EPILOGUE_NONE);
    }
}
