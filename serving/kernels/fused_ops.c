/* The elementwise steps around a decoder layer's matmuls, fused on CPU in float32: residual add + RMSNorm,
 * rotary embedding of q and k, SiLU(gate) * up, and the quantized store of new keys and values into an
 * int8 KV cache.
 *
 * Why kernels: in torch each of these is a chain of small ops (RMSNorm alone: add, pow, mean, add, rsqrt,
 * mul, mul), each one a pass over the activations with its own allocation and dispatch; a profile of
 * llama-prop's offline workload put ~11% of the engine's time in them. Here each is one pass over a row
 * while it sits in L1, split over rows between torch's OpenMP threads. The formulas are those of
 * serving/layers/{norm,rotary,activation}.py (the reference the tests compare with); every row is computed
 * in the same order whatever the batch or the thread count, so a row's result does not depend on its batch.
 */
#include <math.h>
#include <stdint.h>

#include "half.h"

/* Elements below which a call stays on one thread: waking the pool costs more than the pass (measured at
 * a decode step's 64 rows of llama-prop). */
#define PARALLEL_MIN 16384

/* out = weight * (s * rsqrt(mean(s^2) + eps)) with s = x + residual, which is also stored in res_out;
 * without a residual (residual and res_out NULL) s = x. All [rows, width] contiguous, weight [width]. */
void add_rms_norm_f32(float *out, float *res_out, const float *x, const float *residual, const float *weight,
                      int64_t rows, int64_t width, float eps, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) if(rows * width >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        const float *s = xr;
        float sq = 0.f;
        if (residual) {
            const float *rr = residual + r * width;
            float *sr = res_out + r * width;
            #pragma omp simd reduction(+:sq)
            for (int64_t i = 0; i < width; i++) {
                const float v = xr[i] + rr[i];
                sr[i] = v;
                sq += v * v;
            }
            s = sr;
        } else {
            #pragma omp simd reduction(+:sq)
            for (int64_t i = 0; i < width; i++) sq += xr[i] * xr[i];
        }
        const float inv = 1.f / sqrtf(sq / (float)width + eps);
        float *o = out + r * width;
        #pragma omp simd
        for (int64_t i = 0; i < width; i++) o[i] = weight[i] * (s[i] * inv);
    }
}

/* One head of rotate_half's layout: out = x * cos + cat(-x2, x1) * sin over [head_dim]. out may be x (in
 * place): element i reads only x[i] and x[i + half] and writes only those two. */
static inline void rotate_head(float *out, const float *x, const float *c, const float *s, int64_t half) {
    #pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        out[i] = x1 * c[i] - x2 * s[i];
        out[i + half] = x2 * c[i + half] + x1 * s[i + half];
    }
}

/* Rotary embedding of token t's q and k heads with the cos/sin rows [tokens, head_dim] of its position.
 * q_in/k_in rows are `*_in_stride` floats apart (views into the fused qkv projection's output), q_out/k_out
 * rows `*_out_stride` apart; a head's head_dim floats are contiguous and heads follow each other. k_out may
 * be k_in (and q_out q_in) for an in-place rotation. */
void rotary_f32(float *q_out, const float *q_in, float *k_out, const float *k_in, const float *cos,
                const float *sin, int64_t tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                int64_t q_in_stride, int64_t q_out_stride, int64_t k_in_stride, int64_t k_out_stride,
                int num_threads) {
    const int64_t half = head_dim / 2;
    #pragma omp parallel for num_threads(num_threads) schedule(static) \
        if(tokens * (num_heads + num_kv_heads) * head_dim >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < num_heads; h++)
            rotate_head(q_out + t * q_out_stride + h * head_dim, q_in + t * q_in_stride + h * head_dim, c, s, half);
        for (int64_t h = 0; h < num_kv_heads; h++)
            rotate_head(k_out + t * k_out_stride + h * head_dim, k_in + t * k_in_stride + h * head_dim, c, s, half);
    }
}

/* out [rows, width] = silu(gate) * up, where row r of x holds [gate | up] (2 * width floats) and rows are
 * x_stride floats apart; silu(g) = g / (1 + exp(-g)) as torch computes it. */
void silu_and_mul_f32(float *out, const float *x, int64_t rows, int64_t width, int64_t x_stride,
                      int num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) if(rows * width >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = x + r * x_stride, *u = g + width;
        float *o = out + r * width;
        #pragma omp simd
        for (int64_t i = 0; i < width; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* The step's new keys (or values) quantized into an int8 KV cache, with the codes and parameters that
 * serving/layers/kv_quant.py's quantize computes, bit for bit (the tests compare them): for each token and
 * KV head, lo/hi = min/max of its vector x, scale = half(max((hi - lo) / 254, 2^-14)),
 * zero = half((hi + lo) / 2), code = clamp(round_half_even(float32((x - zero) / scale)), -127, 127).
 * Why the quotients go through double: -ffast-math lets the compiler replace a division by a multiplication
 * with the divisor's reciprocal, whose float32 result is off by an ulp for some inputs (and a code by one
 * where that crosses a rounding midpoint). Rounded to float32, the double product with a double reciprocal
 * is the correctly rounded float32 quotient: the exact quotient of a float32 by a float16 is either a float32
 * (the product's relative error, <= 2^-52, rounds back to it) or at least 2^-36 (relative) from any float32
 * rounding midpoint (it cannot be one: the midpoint's 25 significant bits times the divisor's odd part do not
 * fit a float32's 24), so the product rounds to the same float32 as the exact quotient.
 * Layouts: x holds `tokens` rows x_stride floats apart, each [num_kv_heads, head_dim]; codes
 * [slots, num_kv_heads, head_dim] int8 and params [slots, num_kv_heads, 2] float16 bits (the cache's blocks,
 * flattened); slots [tokens] int64, each inside the cache (the caller checks). */
void kv_store_i8(int8_t *codes, uint16_t *params, const float *x, const int64_t *slots, int64_t tokens,
                 int64_t num_kv_heads, int64_t head_dim, int64_t x_stride, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) \
        if(tokens * num_kv_heads * head_dim >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; t++) {
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const float *v = x + t * x_stride + h * head_dim;
            const int64_t entry = slots[t] * num_kv_heads + h;
            int8_t *code = codes + entry * head_dim;
            float lo = v[0], hi = v[0];
            for (int64_t i = 1; i < head_dim; i++) {
                lo = v[i] < lo ? v[i] : lo;
                hi = v[i] > hi ? v[i] : hi;
            }
            float range = (float)((double)(hi - lo) / 254.0);
            range = range < 6.103515625e-05f ? 6.103515625e-05f : range;     /* float16's smallest normal */
            const uint16_t scale_bits = float_to_half(range), zero_bits = float_to_half((hi + lo) * 0.5f);
            const float zero = half_to_float(zero_bits);
            const double inverse = 1.0 / (double)half_to_float(scale_bits);
            #pragma omp simd
            for (int64_t i = 0; i < head_dim; i++) {
                float c = rintf((float)((double)(v[i] - zero) * inverse));
                c = c < -127.f ? -127.f : (c > 127.f ? 127.f : c);
                code[i] = (int8_t)c;
            }
            params[2 * entry] = scale_bits;
            params[2 * entry + 1] = zero_bits;
        }
    }
}
