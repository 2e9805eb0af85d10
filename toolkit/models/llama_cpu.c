/* The decode step of toolkit/models/llama_cpu.py in C: a standard llama, one token at a time, on the weights
 * DecodeWeights holds: wq|wk|wv and w1|w3 stacked, every matrix (out, in) row-major as in torch and run.c, in fp32 or
 * bf16.
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

typedef struct {
    int dim, n_layers, n_heads, kv_heads, head_dim, ffn_dim, vocab_size, max_seq_len;
    int bf16;                 /* the matrices are bfloat16 (uint16, the high half of a float32), else float32 */
    float eps;
    const float *emb;         /* (vocab_size, dim), fp32 */
    const float *norm;        /* (dim) */
    const void *wcls;         /* (vocab_size, dim) */
    const float *rope;        /* (max_seq_len, head_dim / 2) pairs (cos, sin) */
    const float *const *attn_norm, *const *ffn_norm;       /* n_layers pointers each, (dim) */
    const void *const *wqkv, *const *wo, *const *w13, *const *w2;  /* n_layers pointers each, (out, in) */
} Weights;

int llama_cpu_abi(void) { return 2; }  /* the layout of Weights; llama_cpu.py checks it */

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

/* e^x to about 1 ulp (Cephes' expf), branch-free so that a loop of it vectorises: libm's expf is a call per
 * element, and the softmax and SiLU exponentials took a third of a 288/6/6 step at 256 positions. */
static inline float exp_f32(float x) {
    x = fminf(fmaxf(x, -87.3f), 88.3f);  /* 2^n stays a normal float */
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The bytes a row's product asks for ahead of itself: one core's hardware prefetch alone kept a 288/6/6 step
 * 25-35 % below this (one thread, an AMD EPYC); LMKIT_PREFETCH (bytes, 0 = none) is read by llama_cpu.py. */
static long prefetch_ahead = 8192;
void llama_cpu_set_prefetch(long bytes) { prefetch_ahead = bytes; }

static inline void prefetch_row(const void *row, size_t bytes) {
    if (prefetch_ahead <= 0) return;
    const char *p = (const char *)row + prefetch_ahead;
    for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

/* y (d) = w (d, n) @ x (n): the rows split between the threads, each a dot product, as run.c's matmul. */
static void matmul_f32(float *restrict y, const float *restrict x, const float *restrict w, int n, int d) {
#pragma omp for schedule(static)
    for (int i = 0; i < d; i++) {
        const float *r = w + (size_t)i * n;
        float s = 0.0f;
        prefetch_row(r, (size_t)n * sizeof *r);
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < n; j++) s += r[j] * x[j];
        y[i] = s;
    }
}

static void matmul_bf16(float *restrict y, const float *restrict x, const uint16_t *restrict w, int n, int d) {
#pragma omp for schedule(static)
    for (int i = 0; i < d; i++) {
        const uint16_t *r = w + (size_t)i * n;
        float s = 0.0f;
        prefetch_row(r, (size_t)n * sizeof *r);
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < n; j++) s += bf16_to_f32(r[j]) * x[j];
        y[i] = s;
    }
}

/* A product inside the parallel region; the end of `omp for` is a barrier, so all of y is there after it. */
static void matmul(const Weights *w, float *y, const float *x, const void *m, int n, int d) {
    if (w->bf16) matmul_bf16(y, x, (const uint16_t *)m, n, d);
    else matmul_f32(y, x, (const float *)m, n, d);
}

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
            matmul(w, qkv, xb, w->wqkv[l], dim, nq + 2 * nkv);
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
                float *a = att + (size_t)h * T, *yh = y + h * hd, mx = -INFINITY, sum = 0.0f;
                for (int j = 0; j <= p; j++) {
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int i = 0; i < hd; i++) s += q[i] * k[(size_t)j * hd + i];
                    a[j] = s * scale;
                    mx = a[j] > mx ? a[j] : mx;
                }
#pragma omp simd reduction(+ : sum)
                for (int j = 0; j <= p; j++) {
                    a[j] = exp_f32(a[j] - mx);
                    sum += a[j];
                }
                for (int i = 0; i < hd; i++) yh[i] = 0.0f;
                float inv = 1.0f / sum;
                for (int j = 0; j <= p; j++) {
                    float aj = a[j] * inv;
#pragma omp simd
                    for (int i = 0; i < hd; i++) yh[i] += aj * v[(size_t)j * hd + i];
                }
            }
            matmul(w, out, y, w->wo[l], nq, dim);
#pragma omp single
            {
                for (int i = 0; i < dim; i++) x[i] += out[i];
                rmsnorm(xb, x, w->ffn_norm[l], dim, w->eps);
            }
            matmul(w, h13, xb, w->w13[l], dim, 2 * ffn);
#pragma omp for simd schedule(static)
            for (int j = 0; j < ffn; j++) {
                float g = h13[j];
                h13[j] = g / (1.0f + exp_f32(-g)) * h13[ffn + j];
            }
            matmul(w, out, h13, w->w2[l], ffn, dim);
#pragma omp single
            for (int i = 0; i < dim; i++) x[i] += out[i];
        }
        if (t == n - 1) {
#pragma omp single
            rmsnorm(xb, x, w->norm, dim, w->eps);
            matmul(w, logits, xb, w->wcls, dim, w->vocab_size);
        }
    }
}
