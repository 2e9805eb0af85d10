/* The decode step of toolkit/models/llama_cpu.py in C: a standard llama, one token at a time, on the weights
 * DecodeWeights holds: wq|wk|wv and w1|w3 stacked, every matrix (out, in) row-major as in torch and run.c, in fp32,
 * bf16, or int8 with one fp32 scale per row (symmetric, per output channel: row = scale * int8 row).
 *
 * Built at install as the shared library toolkit/models/_llama_cpu (setup.py; optional: without a C compiler
 * the numpy step runs) and called through ctypes, so no Python C API and no torch. One OpenMP parallel
 * region per call: the products split their rows between the threads, attention its heads, and the
 * few vector operations between them run on one thread (`omp single`) while the others wait at its barrier,
 * which costs less than waking the team for each product as run.c does.
 * The arithmetic is run.c's: fp32 sums, RMSNorm, interleaved RoPE, softmax, SiLU gate.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "exp_f32.h"

typedef struct {
    int dim, n_layers, n_heads, kv_heads, head_dim, ffn_dim, vocab_size, max_seq_len;
    int wtype;                /* the matrices: 0 float32, 1 bfloat16 (uint16, a float32's high half), 2 int8 */
    float eps;
    const float *emb;         /* (vocab_size, dim), fp32 */
    const float *norm;        /* (dim) */
    const void *wcls;         /* (vocab_size, dim) */
    const float *rope;        /* (max_seq_len, head_dim / 2) pairs (cos, sin) */
    const float *const *attn_norm, *const *ffn_norm;       /* n_layers pointers each, (dim) */
    const void *const *wqkv, *const *wo, *const *w13, *const *w2;  /* n_layers pointers each, (out, in) */
    const float *wcls_scale;  /* int8: each matrix's row scales, (out) floats, else NULL */
    const float *const *wqkv_scale, *const *wo_scale, *const *w13_scale, *const *w2_scale;
} Weights;

int llama_cpu_abi(void) { return 3; }  /* the layout of Weights; llama_cpu.py checks it */

int llama_cpu_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The bytes a block of rows asks for ahead of itself: one core's hardware prefetch alone left a 288/6/6 step at
 * 0.3-0.4x of this, and 16 kB ran 5-7 % ahead of 8 kB and of 32 kB (an AMD EPYC, 1 and 2 threads, fp32 and bf16);
 * LMKIT_PREFETCH (bytes, 0 = none) is read by llama_cpu.py. */
static long prefetch_ahead = 16384;
void llama_cpu_set_prefetch(long bytes) { prefetch_ahead = bytes; }

static inline void prefetch_row(const void *row, size_t bytes) {
    if (prefetch_ahead <= 0) return;
    const char *p = (const char *)row + prefetch_ahead;
    for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

/* The weights of a row, as floats: fp32 as they are, bf16 shifted into a float's high half, int8 converted (the
 * row's scale is applied to its sum). */
static inline float load_f32(const float *p, int j) { return p[j]; }
static inline float load_bf16(const uint16_t *p, int j) { return bf16_to_f32(p[j]); }
static inline float load_i8(const int8_t *p, int j) { return (float)p[j]; }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
/* 16 weights of a row as floats; the masked forms read only the m lanes of a row's last, partial, 16 */
static inline __m512 load16_f32(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __m512 load16_i8(const int8_t *p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
/* y[0..rows-1] = rows (1 to 4) consecutive rows of n weights, each dot x: one 16-wide sum per row, the rows
 * sharing each load of x, and one horizontal add per row at the end (gcc's own vectorisation of the plain loop
 * below spilled its sums to the stack and ran the last 32 of a 288-wide row one by one) */
#define DOT_ROWS(T)                                                                                          \
    static inline __attribute__((always_inline)) void dot_rows_##T(float *y, const float *x, const T##_t *r,    \
                                                                   int n, int rows) {                           \
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}; \
        for (int j = 0; j < n; j += 16) {                                                                       \
            const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);             \
            const __m512 xv = _mm512_maskz_loadu_ps(m, x + j);                                                  \
            for (int k = 0; k < rows; k++)                                                                      \
                acc[k] = _mm512_fmadd_ps(load16_##T(r + (size_t)k * n + j, m), xv, acc[k]);                     \
        }                                                                                                       \
        for (int k = 0; k < rows; k++) y[k] = _mm512_reduce_add_ps(acc[k]);                                     \
    }
#else
#define DOT_ROWS(T)                                                                                          \
    static inline void dot_rows_##T(float *y, const float *x, const T##_t *r, int n, int rows) {              \
        for (int k = 0; k < rows; k++) {                                                                        \
            const T##_t *row = r + (size_t)k * n;                                                               \
            float s = 0.0f;                                                                                     \
            _Pragma("omp simd reduction(+ : s)") for (int j = 0; j < n; j++) s += load_##T(row, j) * x[j];      \
            y[k] = s;                                                                                           \
        }                                                                                                       \
    }
#endif
typedef float f32_t;
typedef uint16_t bf16_t;
typedef int8_t i8_t;
DOT_ROWS(f32)
DOT_ROWS(bf16)
DOT_ROWS(i8)

/* y (d) = w (d, n) @ x (n): blocks of four rows split between the threads (as run.c splits its rows); a row's
 * sum is the same whichever thread computes it. int8 rows are then scaled by their row's scale. */
#define MATMUL(T)                                                                                            \
    static void matmul_##T(float *restrict y, const float *restrict x, const T##_t *restrict w,                 \
                           const float *restrict scale, int n, int d) {                                         \
        const int blocks = (d + 3) / 4;                                                                         \
        _Pragma("omp for schedule(static)") for (int b = 0; b < blocks; b++) {                                  \
            const int i = 4 * b, rows = d - i < 4 ? d - i : 4;                                                  \
            prefetch_row(w + (size_t)i * n, (size_t)rows * n * sizeof(T##_t));                                  \
            /* the constant 4 lets the compiler keep the four sums in registers; a last block of 1-3 rows */   \
            if (rows == 4) dot_rows_##T(y + i, x, w + (size_t)i * n, n, 4);                                     \
            else dot_rows_##T(y + i, x, w + (size_t)i * n, n, rows);                                            \
            if (scale)                                                                                          \
                for (int k = i; k < i + rows; k++) y[k] *= scale[k];                                            \
        }                                                                                                       \
    }
MATMUL(f32)
MATMUL(bf16)
MATMUL(i8)

/* A product inside the parallel region; the end of `omp for` is a barrier, so all of y is there after it. */
static void matmul(const Weights *w, float *y, const float *x, const void *m, const float *scale, int n, int d) {
    if (w->wtype == 2) matmul_i8(y, x, (const int8_t *)m, scale, n, d);
    else if (w->wtype == 1) matmul_bf16(y, x, (const uint16_t *)m, NULL, n, d);
    else matmul_f32(y, x, (const float *)m, NULL, n, d);
}

/* layer l's row scales of a matrix, NULL unless int8 */
#define SCALE(table, l) ((table) ? (table)[l] : NULL)

static void rmsnorm(float *out, const float *x, const float *g, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * g[i];
}

static void rotate(float *v, const float *rope, int n_heads, int head_dim) {
    for (int h = 0; h < n_heads; h++) {
        float *p = v + h * head_dim;
        for (int i = 0; i < head_dim / 2; i++) {
            float c = rope[2 * i], s = rope[2 * i + 1], a = p[2 * i], b = p[2 * i + 1];
            p[2 * i] = a * c - b * s;
            p[2 * i + 1] = a * s + b * c;
        }
    }
}

/* One head's attention over positions 0..n-1 of its cache (n, hd): scores four keys to a loop, and the values
 * summed four positions to a loop, so that q and yh are loaded once for four positions (the per-position
 * loop over a 48-wide head was a quarter of a 288/6/6 step at 256 positions). */
static void attend(float *restrict yh, float *restrict a, const float *restrict q, const float *restrict k,
                   const float *restrict v, int n, int hd, float scale) {
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = k + (size_t)j * hd, *k1 = k0 + hd, *k2 = k1 + hd, *k3 = k2 + hd;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int i = 0; i < hd; i++) {
            const float qi = q[i];
            s0 += qi * k0[i];
            s1 += qi * k1[i];
            s2 += qi * k2[i];
            s3 += qi * k3[i];
        }
        a[j] = s0 * scale, a[j + 1] = s1 * scale, a[j + 2] = s2 * scale, a[j + 3] = s3 * scale;
    }
    for (; j < n; j++) {
        const float *kj = k + (size_t)j * hd;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < hd; i++) s += q[i] * kj[i];
        a[j] = s * scale;
    }
    float mx = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : mx)
    for (j = 0; j < n; j++) mx = fmaxf(mx, a[j]);
#pragma omp simd reduction(+ : sum)
    for (j = 0; j < n; j++) {
        a[j] = exp_f32(a[j] - mx);
        sum += a[j];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (j = 0; j < n; j++) a[j] *= inv;
    for (int i = 0; i < hd; i++) yh[i] = 0.0f;
    for (j = 0; j + 4 <= n; j += 4) {
        const float *v0 = v + (size_t)j * hd, *v1 = v0 + hd, *v2 = v1 + hd, *v3 = v2 + hd;
        const float a0 = a[j], a1 = a[j + 1], a2 = a[j + 2], a3 = a[j + 3];
#pragma omp simd
        for (int i = 0; i < hd; i++) yh[i] += a0 * v0[i] + a1 * v1[i] + a2 * v2[i] + a3 * v3[i];
    }
    for (; j < n; j++) {
        const float *vj = v + (size_t)j * hd;
        const float aj = a[j];
#pragma omp simd
        for (int i = 0; i < hd; i++) yh[i] += aj * vj[i];
    }
}

/* Feed tokens[0..n-1] at positions pos..pos+n-1: their keys and values go into the caches (per layer,
 * (kv_heads, max_seq_len, head_dim)); the next-token logits after the last go into logits (vocab_size).
 * scratch holds 3 dim + 2 (n_heads + 2 kv_heads) head_dim + n_heads max_seq_len + 2 ffn_dim floats. */
void llama_cpu_forward(const Weights *w, float *const *k_cache, float *const *v_cache, float *scratch,
                       const int32_t *tokens, int n, int pos, float *logits) {
    const int dim = w->dim, hd = w->head_dim, nq = w->n_heads * hd, nkv = w->kv_heads * hd, ffn = w->ffn_dim;
    const int rep = w->n_heads / w->kv_heads, T = w->max_seq_len;
    const float scale = 1.0f / sqrtf((float)hd);
    float *x = scratch, *xb = x + dim, *out = xb + dim, *qkv = out + dim, *y = qkv + nq + 2 * nkv;
    float *att = y + nq, *h13 = att + (size_t)w->n_heads * T;

#pragma omp parallel
    for (int t = 0; t < n; t++) {
        const int p = pos + t;
        const float *rope = w->rope + (size_t)p * hd;
#pragma omp single
        memcpy(x, w->emb + (size_t)tokens[t] * dim, dim * sizeof(float));
        for (int l = 0; l < w->n_layers; l++) {
            float *kc = k_cache[l], *vc = v_cache[l];
#pragma omp single
            rmsnorm(xb, x, w->attn_norm[l], dim, w->eps);
            matmul(w, qkv, xb, w->wqkv[l], SCALE(w->wqkv_scale, l), dim, nq + 2 * nkv);
#pragma omp single
            {
                rotate(qkv, rope, w->n_heads, hd);
                rotate(qkv + nq, rope, w->kv_heads, hd);
                for (int h = 0; h < w->kv_heads; h++) {
                    memcpy(kc + ((size_t)h * T + p) * hd, qkv + nq + h * hd, hd * sizeof(float));
                    memcpy(vc + ((size_t)h * T + p) * hd, qkv + nq + nkv + h * hd, hd * sizeof(float));
                }
            }
#pragma omp for schedule(static)
            for (int h = 0; h < w->n_heads; h++) {
                const float *q = qkv + h * hd;
                const float *k = kc + (size_t)(h / rep) * T * hd, *v = vc + (size_t)(h / rep) * T * hd;
                float *a = att + (size_t)h * T, *yh = y + h * hd;
                attend(yh, a, q, k, v, p + 1, hd, scale);
            }
            matmul(w, out, y, w->wo[l], SCALE(w->wo_scale, l), nq, dim);
#pragma omp single
            {
                for (int i = 0; i < dim; i++) x[i] += out[i];
                rmsnorm(xb, x, w->ffn_norm[l], dim, w->eps);
            }
            matmul(w, h13, xb, w->w13[l], SCALE(w->w13_scale, l), dim, 2 * ffn);
#pragma omp for simd schedule(static)
            for (int j = 0; j < ffn; j++) {
                float g = h13[j];
                h13[j] = g / (1.0f + exp_f32(-g)) * h13[ffn + j];
            }
            matmul(w, out, h13, w->w2[l], SCALE(w->w2_scale, l), ffn, dim);
#pragma omp single
            for (int i = 0; i < dim; i++) x[i] += out[i];
        }
        if (t == n - 1) {
#pragma omp single
            rmsnorm(xb, x, w->norm, dim, w->eps);
            matmul(w, logits, xb, w->wcls, w->wcls_scale, dim, w->vocab_size);
        }
    }
}
