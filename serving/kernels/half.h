/* IEEE float16 <-> float32 for the int8 KV cache's parameters, without relying on a compiler's _Float16
 * support: F16C where the target has it, else integer arithmetic (which -ffast-math cannot change), both
 * rounding to nearest even as torch's .to(float16) does. */
#ifndef SERVING_KERNELS_HALF_H
#define SERVING_KERNELS_HALF_H

#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0) {                       /* zero or subnormal: mantissa * 2^-24 */
        const float f = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    if (exponent == 31) bits = sign | 0x7f800000u | (mantissa << 13);
    else bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_half(float f) {
#ifdef __F16C__
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u));  /* inf, NaN */
    if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);      /* >= 65520 rounds to infinity */
    if (x < 0x33000000u) return (uint16_t)sign;                   /* <= 2^-25 rounds to zero */
    uint32_t h, rest, halfway;
    if (x >= 0x38800000u) {                                       /* normal float16 */
        h = (x >> 13) - (112u << 10);
        rest = x & 0x1fffu;
        halfway = 0x1000u;
    } else {                                                      /* subnormal: units of 2^-24 */
        const uint32_t shift = 126u - (x >> 23), mantissa = (x & 0x7fffffu) | 0x800000u;
        h = mantissa >> shift;
        rest = mantissa & ((1u << shift) - 1u);
        halfway = 1u << (shift - 1u);
    }
    if (rest > halfway || (rest == halfway && (h & 1u))) h++;     /* a carry moves into the exponent */
    return (uint16_t)(sign | h);
#endif
}

#endif
