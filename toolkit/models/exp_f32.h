/* Shared by the C kernels of toolkit/models (llama_cpu.c, attractor/relax_cpu.c). */
#ifndef LMKIT_EXP_F32_H
#define LMKIT_EXP_F32_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^x to about 1 ulp (Cephes' expf), branch-free so that a loop of it vectorises: libm's expf is a call per
 * element, and the softmax and SiLU exponentials took a third of a 288/6/6 step at 256 positions. */
static inline float exp_f32(float x) {
    x = x < -87.3f ? -87.3f : x;  /* 2^n stays a normal float (comparisons, not fminf/fmaxf: gcc vectorises */
    x = x > 88.3f ? 88.3f : x;    /* them in every loop, and NaN stays NaN, as in expf) */
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

#endif
