/* gpt2lab's CPU kernels for decoding, fp32. Built by kernels.py on first use
 * (cc -O3 -march=native -fopenmp) and called through ctypes; plain C that the compiler vectorises.
 *
 * Why: a decode step of a few rows reads every weight once and is bound by memory bandwidth (one row)
 * or by loads from cache (a few rows). BLAS/oneDNN kernels stream a weight at 60-80% of what a plain
 * sum() reaches for one row on AVX2 CPUs, and are tuned for bigger matrices than 2-16 rows. Here a
 * thread keeps eight weight rows in flight for one input row, and reuses every weight load for two
 * input rows when there are several. The whole decode step (embedding to logits) is one call, so
 * Python's per-op cost is paid once per token.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

enum { EPILOGUE_NONE, EPILOGUE_GELU_TANH, EPILOGUE_ADD };

static inline float epilogue_apply(float v, float *out, int epilogue) {
    if (epilogue == EPILOGUE_GELU_TANH) return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    if (epilogue == EPILOGUE_ADD) return *out + v;
    return v;
}

/* s[c] = w[c] . x for the 8 consecutive weight rows at w: eight streams in flight for one input row */
static inline void dot_8x1(const float *restrict w, int64_t n_in, const float *restrict x, float s[8]) {
    const float *w0 = w, *w1 = w0 + n_in, *w2 = w1 + n_in, *w3 = w2 + n_in;
    const float *w4 = w3 + n_in, *w5 = w4 + n_in, *w6 = w5 + n_in, *w7 = w6 + n_in;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t k = 0; k < n_in; k++) {
        const float u = x[k];
        s0 += w0[k] * u, s1 += w1[k] * u, s2 += w2[k] * u, s3 += w3[k] * u;
        s4 += w4[k] * u, s5 += w5[k] * u, s6 += w6[k] * u, s7 += w7[k] * u;
    }
    s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3, s[4] = s4, s[5] = s5, s[6] = s6, s[7] = s7;
}

/* sa[c] = w[c] . xa and sb[c] = w[c] . xb for the 4 weight rows at w: each weight load serves two rows */
static inline void dot_4x2(const float *restrict w, int64_t n_in, const float *restrict xa,
                           const float *restrict xb, float sa[4], float sb[4]) {
    const float *w0 = w, *w1 = w0 + n_in, *w2 = w1 + n_in, *w3 = w2 + n_in;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
    for (int64_t k = 0; k < n_in; k++) {
        const float u = xa[k], v = xb[k], p = w0[k], q = w1[k], r = w2[k], t = w3[k];
        a0 += p * u, a1 += q * u, a2 += r * u, a3 += t * u;
        b0 += p * v, b1 += q * v, b2 += r * v, b3 += t * v;
    }
    sa[0] = a0, sa[1] = a1, sa[2] = a2, sa[3] = a3;
    sb[0] = b0, sb[1] = b1, sb[2] = b2, sb[3] = b3;
}

/* y[m, n] = epilogue(b[n] + sum_k w[n, k] * x[m, k]) for m < n_rows, n < n_out; w is [n_out, n_in]
 * row-major (nn.Linear's layout), b may be NULL; EPILOGUE_ADD adds into y (a residual stream).
 * Called inside a parallel region: the team's threads split the output columns in blocks of 8. */
static void team_linear(const float *restrict x, const float *restrict w, const float *restrict b,
                        float *restrict y, int64_t n_rows, int64_t n_out, int64_t n_in, int epilogue) {
    const int64_t n_blocks = (n_out + 7) / 8;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; blk++) {
        const int64_t n = blk * 8;
        float s[8];
        if (n + 8 > n_out) { /* the last n_out % 8 columns, one at a time */
            for (int64_t m = 0; m < n_rows; m++)
                for (int64_t c = n; c < n_out; c++) {
                    const float *wc = w + c * n_in, *xm = x + m * n_in;
                    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                    for (int64_t k = 0; k < n_in; k++) acc += wc[k] * xm[k];
                    y[m * n_out + c] = epilogue_apply(acc + (b ? b[c] : 0.f), &y[m * n_out + c], epilogue);
                }
            continue;
        }
        int64_t m = 0;
        for (; m + 2 <= n_rows; m += 2) { /* pairs of input rows */
            const float *xa = x + m * n_in, *xb = xa + n_in;
            float sb[8];
            dot_4x2(w + n * n_in, n_in, xa, xb, s, sb);
            dot_4x2(w + (n + 4) * n_in, n_in, xa, xb, s + 4, sb + 4);
            float *ya = y + m * n_out + n, *yb = ya + n_out;
            for (int c = 0; c < 8; c++) {
                ya[c] = epilogue_apply(s[c] + (b ? b[n + c] : 0.f), &ya[c], epilogue);
                yb[c] = epilogue_apply(sb[c] + (b ? b[n + c] : 0.f), &yb[c], epilogue);
            }
        }
        if (m < n_rows) { /* one row left (or the only one) */
            dot_8x1(w + n * n_in, n_in, x + m * n_in, s);
            float *ym = y + m * n_out + n;
            for (int c = 0; c < 8; c++) ym[c] = epilogue_apply(s[c] + (b ? b[n + c] : 0.f), &ym[c], epilogue);
        }
    }
}

/* F.linear(x, w, b) for x [n_rows, n_in] -> y [n_rows, n_out] */
void gpt2lab_linear(const float *x, const float *w, const float *b, float *y, int64_t n_rows, int64_t n_out,
                    int64_t n_in, int n_threads) {
#pragma omp parallel num_threads(n_threads)
    team_linear(x, w, b, y, n_rows, n_out, n_in, EPILOGUE_NONE);
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

/* ---- a whole decode step: one token per row -> logits, in one call ------------------------------
 * The same arithmetic as GPT2.forward with the KV cache (GPT-2's pre-LayerNorm blocks, tanh-GELU,
 * tied or untied head) in one OpenMP region: the threads split every matrix product by output
 * columns and the attention by (row, head), and meet at a barrier between steps. */

typedef struct {
    const float *ln_1_w, *ln_1_b, *attn_w, *attn_b, *attn_proj_w, *attn_proj_b;
    const float *ln_2_w, *ln_2_b, *fc_w, *fc_b, *mlp_proj_w, *mlp_proj_b;
    float *k_cache, *v_cache; /* this layer's cache, [max_batch, n_head, max_seq, head_dim] */
    float attn_scale;
} gpt2lab_layer;

/* logits [n_rows, vocab] for tokens[r] at positions[r] of cache row first_row + r, writing their keys
 * and values into the cache (a query at position p sees slots 0..p). Scratch: x and h of
 * n_rows * n_embd floats, big of n_rows * max(3 * n_embd, n_inner). */
void gpt2lab_decode(const gpt2lab_layer *layers, int64_t n_layer, const float *wte, const float *wpe,
                    const float *ln_f_w, const float *ln_f_b, const float *head_w, const int64_t *tokens,
                    const int64_t *positions, int64_t n_rows, int64_t first_row, int64_t n_embd, int64_t n_head,
                    int64_t n_inner, int64_t vocab, int64_t max_seq, float eps, float *x, float *h, float *big,
                    float *logits, int n_threads) {
    const int64_t C = n_embd, D = n_embd / n_head;
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t i = 0; i < C; i++) x[r * C + i] = wte[tokens[r] * C + i] + wpe[positions[r] * C + i];
#pragma omp parallel num_threads(n_threads)
    {
        for (int64_t l = 0; l < n_layer; l++) {
            const gpt2lab_layer *L = &layers[l];
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n_rows; r++) layer_norm(x + r * C, L->ln_1_w, L->ln_1_b, h + r * C, C, eps);
            team_linear(h, L->attn_w, L->attn_b, big, n_rows, 3 * C, C, EPILOGUE_NONE); /* [q | k | v] rows */
#pragma omp for schedule(static)
            for (int64_t rh = 0; rh < n_rows * n_head; rh++) {
                const int64_t r = rh / n_head, hd = rh % n_head, pos = positions[r], len = pos + 1;
                const float *qkv = big + r * 3 * C, *q = qkv + hd * D;
                const int64_t offset = ((first_row + r) * n_head + hd) * max_seq * D;
                float *kh = L->k_cache + offset, *vh = L->v_cache + offset;
                for (int64_t d = 0; d < D; d++) {
                    kh[pos * D + d] = qkv[C + hd * D + d];
                    vh[pos * D + d] = qkv[2 * C + hd * D + d];
                }
                float scores[len];
                float top = -INFINITY, total = 0.f;
                for (int64_t s = 0; s < len; s++) {
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; d++) dot += q[d] * kh[s * D + d];
                    scores[s] = dot * L->attn_scale;
                    if (scores[s] > top) top = scores[s];
                }
                for (int64_t s = 0; s < len; s++) total += (scores[s] = expf(scores[s] - top));
                float *out = h + r * C + hd * D; /* h is free again: it takes the attention output */
                for (int64_t d = 0; d < D; d++) out[d] = 0.f;
                for (int64_t s = 0; s < len; s++) {
                    const float weight = scores[s] / total;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) out[d] += weight * vh[s * D + d];
                }
            }
            team_linear(h, L->attn_proj_w, L->attn_proj_b, x, n_rows, C, C, EPILOGUE_ADD);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n_rows; r++) layer_norm(x + r * C, L->ln_2_w, L->ln_2_b, h + r * C, C, eps);
            team_linear(h, L->fc_w, L->fc_b, big, n_rows, n_inner, C, EPILOGUE_GELU_TANH);
            team_linear(big, L->mlp_proj_w, L->mlp_proj_b, x, n_rows, C, n_inner, EPILOGUE_ADD);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n_rows; r++) layer_norm(x + r * C, ln_f_w, ln_f_b, h + r * C, C, eps);
        team_linear(h, head_w, NULL, logits, n_rows, vocab, C, EPILOGUE_NONE);
    }
}
