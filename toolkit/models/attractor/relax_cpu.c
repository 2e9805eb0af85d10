/* The attractor's relaxation (toolkit/models/attractor/relax.py, `Relaxation`) in C for CPU training: the K
 * outer steps forward, keeping a tape, and the hand-written backward, one call each through ctypes.
 *
 * The numbers are relax.py's fast path with the seed's switches (detached steps, per-wave normalisation, breaks
 * on or off); the state stays in the model's (N, W, D) layout, D = H waves of d. In torch each of the ~40
 * operations of a step works on 65 k numbers and costs more in dispatch than in arithmetic; here a step is two
 * passes over the windows (the break rule between them needs every window's tension), split between the
 * OpenMP threads by window. Built at install as toolkit/models/attractor/_relax_cpu (setup.py, optional).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../exp_f32.h"

#define INLINE static inline __attribute__((always_inline))
#define TENSION_COS_WEIGHT 0.35f
#define LOW_TENSION 0.08f
#define LOW_TENSION_STEPS 4.0f
#define HIGH_TENSION 0.18f
#define BREAK_ALPHA 0.1f
#define BREAK_REF 0.12f
#define NO_CHANGE 1e-6f
#define NORM_EPS 1e-12f

int relax_cpu_abi(void) { return 1; }

typedef struct {
    int N, W, H, d, K, rows, breaks;
    const float *M;          /* (W, W) coupling */
    const float *two_w1t;    /* (H, d, d) [h][k][e] = 2 W1[h][e][k] */
    const float *two_b1;     /* (H, d) */
    const float *four_w2;    /* (H, d) */
    const float *mstep_w1;   /* (H, d, d) [h][e][k] = -step W1[h][e][k] */
    const float *mstep_w1t;  /* (H, d, d) its transpose, [h][k][e] */
} Shape;

/* a . b with 16 running sums, one per lane, so that the loop vectorises without reordering a sum */
INLINE float dot_f32(const float *a, const float *b, int n) {
    float acc[16] = {0}, sum = 0.0f;
    int k = 0;
    for (; k + 16 <= n; k += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[k + l] * b[k + l];
    for (; k < n; k++) sum += a[k] * b[k];
    for (int l = 0; l < 16; l++) sum += acc[l];
    return sum;
}

/* each wave of x (H x d) divided by its norm clamped at 1e-12; the clamped norms go to `norms` (H) */
INLINE void unit_waves(float *x, float *norms, int H, int d) {
    for (int h = 0; h < H; h++) {
        float *w = x + h * d;
        float n = fmaxf(sqrtf(dot_f32(w, w, d)), NORM_EPS);
        norms[h] = n;
        for (int k = 0; k < d; k++) w[k] /= n;
    }
}

/* g <- (g - y (y . g)) / n per wave, the backward of `unit_waves` (no radial term below the clamp) */
INLINE void unit_waves_backward(float *g, const float *y, const float *norms, int H, int d) {
    for (int h = 0; h < H; h++) {
        float *gw = g + h * d;
        const float *yw = y + h * d;
        float dot = norms[h] > NORM_EPS ? dot_f32(yw, gw, d) : 0.0f;
        for (int k = 0; k < d; k++) gw[k] = (gw[k] - yw[k] * dot) / norms[h];
    }
}

/* u (W, D) = M X: the coupling of one window */
INLINE void couple(const Shape *s, const float *restrict X, float *restrict u, const int W, const int d) {
    int D = s->H * d;
    for (int i = 0; i < W; i++) {
        float *ui = u + i * D;
        memset(ui, 0, sizeof(float) * D);
        for (int j = 0; j < W; j++) {
            float m = s->M[i * W + j];
            const float *xj = X + j * D;
            for (int k = 0; k < D; k++) ui[k] += m * xj[k];
        }
    }
}

/* The energy step, zeroing and normalisation of one window: from X (W, D) to Y (W, D), with the sigmoids,
 * the zeroed mask and the clamped wave norms (W, H) for the tape; returns the window's tension. */
INLINE float energy_step_body(const Shape *s, const float *restrict X, float *restrict u, float *restrict sg,
                              float *restrict zeroed, float *restrict Y, float *restrict nY, const int W, const int d) {
    int H = s->H, D = H * d;
    float slope[W * d];
    couple(s, X, u, W, d);
    /* per wave, the W positions at once: each row of a head's matrix serves W rows of u (a small product in
     * registers, not W dot products) */
    for (int h = 0; h < H; h++) {
        const float *a = s->two_w1t + h * d * d, *m = s->mstep_w1 + h * d * d, *b1 = s->two_b1 + h * d;
        const float *w2 = s->four_w2 + h * d;
        for (int i = 0; i < W; i++)
            for (int e = 0; e < d; e++) sg[i * D + h * d + e] = b1[e];
        for (int k = 0; k < d; k++)
            for (int i = 0; i < W; i++) {
                float x = u[i * D + h * d + k], *z = sg + i * D + h * d;
                const float *ak = a + k * d;
                for (int e = 0; e < d; e++) z[e] += x * ak[e];
            }
        for (int i = 0; i < W; i++) {
            float *z = sg + i * D + h * d, *sl = slope + i * d;
            for (int e = 0; e < d; e++) z[e] = 1.0f / (1.0f + exp_f32(-z[e]));
            for (int e = 0; e < d; e++) sl[e] = (z[e] - z[e] * z[e]) * w2[e];
            memcpy(Y + i * D + h * d, u + i * D + h * d, sizeof(float) * d);
        }
        for (int e = 0; e < d; e++)
            for (int i = 0; i < W; i++) {
                float x = slope[i * d + e], *y = Y + i * D + h * d;
                const float *me = m + e * d;
                for (int k = 0; k < d; k++) y[k] += x * me[k];
            }
    }
    for (int j = 0; j < W * D; j++) {
        int bad = !isfinite(Y[j]);
        zeroed[j] = bad ? 1.0f : 0.0f;
        Y[j] = bad ? 0.0f : Y[j];
    }
    for (int i = 0; i < W; i++) unit_waves(Y + i * D, nY + i * H, H, d);
    /* tension: mean over neighbours of |a - b|^2 / D + 0.35 (1 - cos), from the dot products and the squared
     * norms of normalised waves (a wave's is 1, or 0 where it was zeroed) */
    float acc = 0.0f, sq_prev = 0.0f;
    for (int h = 0; h < H; h++) sq_prev += nY[h] > NORM_EPS;
    for (int i = 0; i + 1 < W; i++) {
        float sq = 0.0f, dot;
        for (int h = 0; h < H; h++) sq += nY[(i + 1) * H + h] > NORM_EPS;
        dot = dot_f32(Y + (i + 1) * D, Y + i * D, D);
        float cos = dot / (fmaxf(sqrtf(sq), 1e-8f) * fmaxf(sqrtf(sq_prev), 1e-8f));
        acc += (sq + sq_prev - 2.0f * dot) - TENSION_COS_WEIGHT * D * cos;
        sq_prev = sq;
    }
    return acc / (W - 1) / D + TENSION_COS_WEIGHT;
}

/* the A1 shape's W = 8 and d = 32 as constants: loops of known length, unrolled, without the checks and
 * remainders of a loop whose length is a variable (forward and backward 1.5-1.8x faster here) */
static float energy_step(const Shape *s, const float *X, float *u, float *sg, float *zeroed, float *Y, float *nY) {
    if (s->W == 8 && s->d == 32) return energy_step_body(s, X, u, sg, zeroed, Y, nY, 8, 32);
    return energy_step_body(s, X, u, sg, zeroed, Y, nY, s->W, s->d);
}

/* Forward: K steps from X0 (N, W, D). Out: states (K, N, W, D), the post-step (after the break) states; tape:
 * sg, zeroed, Y (K, N, W, D), nY (K, N, W, H), and with breaks dn, coef (K, N, W) and n_moved (K, N, W, H).
 * `direction` (N, W, D): unit vectors where a break finds no change to follow; `T` (N) and `a` (N) work space. */
void relax_cpu_forward(int N, int W, int H, int d, int K, int rows, int breaks, const float *M, const float *two_w1t,
                       const float *two_b1, const float *four_w2, const float *mstep_w1, const float *mstep_w1t,
                       const float *X0, const float *direction, float *states, float *sg, float *zeroed, float *Y, float *nY,
                       float *dn, float *coef, float *n_moved, float *T, float *a) {
    Shape s = {N, W, H, d, K, rows, breaks, M, two_w1t, two_b1, four_w2, mstep_w1, mstep_w1t};
    int D = H * d, P = N / rows;
    size_t win = (size_t)W * D;
    float low_count[P > 0 ? P : 1];
    for (int p = 0; p < P; p++) low_count[p] = 0.0f;
    for (int k = 0; k < K; k++) {
        const float *X = k == 0 ? X0 : states + (size_t)(k - 1) * N * win;
        size_t o = (size_t)k * N * win;
#pragma omp parallel
        {
            float *u = malloc(sizeof(float) * win);
#pragma omp for schedule(static)
            for (int n = 0; n < N; n++)
                T[n] = energy_step(&s, X + n * win, u, sg + o + n * win, zeroed + o + n * win, Y + o + n * win,
                                   nY + ((size_t)k * N + n) * W * H);
            free(u);
        }
        float *out = states + o;
        if (!breaks) {
            memcpy(out, Y + o, sizeof(float) * N * win);
            continue;
        }
        /* the break rule per group of `rows` windows (window n = r P + p is in group p) */
        for (int p = 0; p < P; p++) {
            float sum = 0.0f, mx = -INFINITY;
            for (int r = 0; r < rows; r++) {
                float t = T[r * P + p];
                sum += t;
                mx = (t > mx || isnan(t)) ? t : mx;
            }
            float mean = sum / rows;
            low_count[p] = (low_count[p] + 1.0f) * (mean < LOW_TENSION);
            int fire = mx > HIGH_TENSION || low_count[p] >= LOW_TENSION_STEPS;
            low_count[p] *= !fire;
            float alpha = fminf(fmaxf(BREAK_REF - mean, 0.1f * BREAK_REF), 2.0f * BREAK_REF) * (BREAK_ALPHA / BREAK_REF);
            for (int r = 0; r < rows; r++) a[r * P + p] = fire ? alpha : 0.0f;
        }
        /* every position moves by a along its unit change Y - X, or along its direction where that is ~0 */
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            for (int i = 0; i < W; i++) {
                size_t at = n * win + (size_t)i * D;
                const float *x = X + at, *y = Y + o + at, *r = direction + at;
                float *m = out + at;
                for (int j = 0; j < D; j++) m[j] = y[j] - x[j];
                float norm = sqrtf(fmaxf(dot_f32(m, m, D), 1e-30f));
                int changed = norm > NO_CHANGE;
                float c = changed ? a[n] / norm : 0.0f, b = changed ? 0.0f : a[n];
                for (int j = 0; j < D; j++) m[j] = y[j] + m[j] * c + r[j] * b;
                size_t w = ((size_t)k * N + n) * W + i;
                dn[w] = norm;
                coef[w] = c;
                unit_waves(m, n_moved + w * H, H, d);
            }
        }
    }
}

/* The backward of one window n through the K steps, from the end: G is the gradient of its state; the heads'
 * gradients are added to this thread's sums. */
INLINE void window_backward(const Shape *s, int n, const float *restrict X0, const float *restrict states,
                            const float *restrict sg, const float *restrict zeroed, const float *restrict Y,
                            const float *restrict nY, const float *restrict dn, const float *restrict coef,
                            const float *restrict n_moved, const float *restrict g_states,
                            const float *restrict g_final, const float *restrict g_last_Y, float *restrict G,
                            float *restrict Gp, float *restrict u, float *restrict q, float *restrict gz,
                            float *restrict a_w1t, float *restrict a_ms, float *restrict a_b1, float *restrict a_w2,
                            const int W, const int d) {
    int N = s->N, H = s->H, K = s->K, breaks = s->breaks, D = H * d;
    size_t win = (size_t)W * D;
    const float *four_w2 = s->four_w2, *mstep_w1t = s->mstep_w1t;
    if (g_final) memcpy(G, g_final + n * win, sizeof(float) * win);
    else memset(G, 0, sizeof(float) * win);
    for (int k = K - 1; k >= 0; k--) {
        size_t o = ((size_t)k * N + n) * win;
        const float *X = k == 0 ? X0 + n * win : states + o - (size_t)N * win;
        const float *y = Y + o;
        if (g_states)
            for (size_t j = 0; j < win; j++) G[j] += g_states[o + j];
        if (breaks) {  /* out = normalise(Y + coef (Y - X) + b r): back to Y (G) and to X (Gp) */
            for (int i = 0; i < W; i++) {
                size_t w = ((size_t)k * N + n) * W + i;
                float *g = G + i * D, *gp = Gp + i * D, c = coef[w], nn = dn[w];
                const float *x = X + i * D, *yi = y + i * D;
                unit_waves_backward(g, states + o + i * D, n_moved + w * H, H, d);
                for (int j = 0; j < D; j++) gp[j] = yi[j] - x[j];  /* delta, until gp is written below */
                float g_n = dot_f32(g, gp, D) * c / (nn * nn);
                for (int j = 0; j < D; j++) {
                    float g_delta = g[j] * c - gp[j] * g_n;
                    g[j] += g_delta;
                    gp[j] = -g_delta;
                }
            }
        }
        if (k == K - 1 && g_last_Y)
            for (size_t j = 0; j < win; j++) G[j] += g_last_Y[n * win + j];
        for (int i = 0; i < W; i++) unit_waves_backward(G + i * D, y + i * D, nY + (((size_t)k * N + n) * W + i) * H, H, d);
        for (size_t j = 0; j < win; j++) G[j] -= G[j] * zeroed[o + j];
        couple(s, X, u, W, d);
        /* Y = u + (s (1 - s) 4 w2) (-step W1), s = sigmoid(u 2 W1^T + 2 b1): the heads' gradients, per
         * wave over the W positions at once (as in the forward) */
        for (int h = 0; h < H; h++) {
            const float *mt = mstep_w1t + h * d * d, *w2 = four_w2 + h * d;
            float *ams = a_ms + h * d * d, *aw1 = a_w1t + h * d * d;
            for (int i = 0; i < W; i++) {
                const float *sh = sg + o + i * D + h * d;
                for (int e = 0; e < d; e++) q[i * d + e] = sh[e] - sh[e] * sh[e];
            }
            for (int e = 0; e < d; e++) {  /* g_mstep += slope^T G, summed over the W positions first */
                float acc[d];
                for (int j = 0; j < d; j++) acc[j] = 0.0f;
                for (int i = 0; i < W; i++) {
                    float sl = q[i * d + e] * w2[e];
                    const float *g = G + i * D + h * d;
                    for (int j = 0; j < d; j++) acc[j] += sl * g[j];
                }
                for (int j = 0; j < d; j++) ams[e * d + j] += acc[j];
            }
            for (int i = 0; i < W; i++) {  /* gz = G (-step W1)^T */
                const float *g = G + i * D + h * d;
                float acc[d];
                for (int e = 0; e < d; e++) acc[e] = 0.0f;
                for (int j = 0; j < d; j++) {
                    float x = g[j];
                    const float *mj = mt + j * d;
                    for (int e = 0; e < d; e++) acc[e] += x * mj[e];
                }
                for (int e = 0; e < d; e++) gz[i * d + e] = acc[e];
            }
            for (int i = 0; i < W; i++) {  /* g_w2, then gz becomes the gradient of z = u 2 W1^T + 2 b1 */
                const float *sh = sg + o + i * D + h * d;
                float *gzi = gz + i * d, *qi = q + i * d;
                for (int e = 0; e < d; e++) {
                    a_w2[h * d + e] += gzi[e] * qi[e];
                    float vv = gzi[e] * w2[e] * qi[e];
                    gzi[e] = vv - 2.0f * vv * sh[e];
                    a_b1[h * d + e] += gzi[e];
                }
            }
            for (int j = 0; j < d; j++) {  /* g_two_w1t += u^T gz, summed over the W positions first */
                float acc[d];
                for (int e = 0; e < d; e++) acc[e] = 0.0f;
                for (int i = 0; i < W; i++) {
                    float x = u[i * D + h * d + j];
                    const float *gzi = gz + i * d;
                    for (int e = 0; e < d; e++) acc[e] += x * gzi[e];
                }
                for (int e = 0; e < d; e++) aw1[j * d + e] += acc[e];
            }
        }
        if (breaks) memcpy(G, Gp, sizeof(float) * win);
        else memset(G, 0, sizeof(float) * win);
    }
}

/* Backward: from the gradients of the states (K, N, W, D, or NULL), of the final state and of the last step's Y
 * (N, W, D each, or NULL), the gradient of X0 (gX0, N, W, D) and of the folded heads, summed over the windows:
 * g_two_w1t (H, d, d), g_two_b1 (H, d), g_four_w2 (H, d), g_mstep_w1 (H, d, d), which the caller zeroes. */
void relax_cpu_backward(int N, int W, int H, int d, int K, int rows, int breaks, const float *M, const float *two_w1t,
                        const float *two_b1, const float *four_w2, const float *mstep_w1, const float *mstep_w1t,
                        const float *X0, const float *states, const float *sg, const float *zeroed, const float *Y, const float *nY,
                        const float *dn, const float *coef, const float *n_moved, const float *g_states,
                        const float *g_final, const float *g_last_Y, float *gX0, float *g_two_w1t, float *g_two_b1,
                        float *g_four_w2, float *g_mstep_w1) {
    Shape s = {N, W, H, d, K, rows, breaks, M, two_w1t, two_b1, four_w2, mstep_w1, mstep_w1t};
    int D = H * d;
    size_t win = (size_t)W * D, hdd = (size_t)H * d * d, hd = (size_t)H * d;
#pragma omp parallel
    {
        float *acc = calloc(2 * hdd + 2 * hd, sizeof(float));  /* this thread's sums: w1t, mstep, b1, w2 */
        float *a_w1t = acc, *a_ms = acc + hdd, *a_b1 = acc + 2 * hdd, *a_w2 = acc + 2 * hdd + hd;
        float *G = malloc(sizeof(float) * win), *Gp = malloc(sizeof(float) * win), *u = malloc(sizeof(float) * win);
        float *q = malloc(sizeof(float) * W * d), *gz = malloc(sizeof(float) * W * d);
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            if (W == 8 && d == 32)
                window_backward(&s, n, X0, states, sg, zeroed, Y, nY, dn, coef, n_moved, g_states, g_final, g_last_Y,
                                G, Gp, u, q, gz, a_w1t, a_ms, a_b1, a_w2, 8, 32);
            else
                window_backward(&s, n, X0, states, sg, zeroed, Y, nY, dn, coef, n_moved, g_states, g_final, g_last_Y,
                                G, Gp, u, q, gz, a_w1t, a_ms, a_b1, a_w2, W, d);
            memcpy(gX0 + n * win, G, sizeof(float) * win);
        }
#pragma omp critical
        {
            for (size_t j = 0; j < hdd; j++) g_two_w1t[j] += a_w1t[j], g_mstep_w1[j] += a_ms[j];
            for (size_t j = 0; j < hd; j++) g_two_b1[j] += a_b1[j], g_four_w2[j] += a_w2[j];
        }
        free(acc);
        free(G);
        free(Gp);
        free(u);
        free(q);
        free(gz);
    }
}
