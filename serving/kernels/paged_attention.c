/* Decode attention over the paged KV cache on CPU, float32 queries: one query token per sequence.
 *
 * Why a kernel: gathering each sequence's blocks into a padded tensor for torch's SDPA reads and writes
 * the whole context once more per layer and step, and SDPA's CPU kernel is built for long queries, not the
 * few query heads per KV head of a decode. This reads every key and value once, straight from its block.
 *
 * Two cache formats, one body (`decode_attention`, specialised by a constant flag the compiler folds):
 *   float32: k/v_cache [num_blocks, block_size, num_kv_heads, head_dim] float32
 *   int8:    k/v_cache the same shape in int8 codes, k/v_params [num_blocks, block_size, num_kv_heads, 2]
 *            float16 bits (scale, zero) with x = scale * code + zero. The int8 kernel reads the codes
 *            directly (a quarter of the float32 bytes) and never writes dequantized values anywhere:
 *              q . x       = scale * (q . codes) + zero * sum(q)
 *              sum_t p_t x = sum_t (p_t * scale_t) codes_t + sum_t p_t * zero_t
 * Other layouts (all contiguous):
 *   out, q        [num_seqs, num_heads, head_dim] float32
 *   block_tables  [num_seqs, max_blocks] int32
 *   seq_lens      [num_seqs] int32, >= 1: keys/values visible to each sequence's query
 * Query heads [h * group, (h + 1) * group) share KV head h (grouped-query attention).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* IEEE half -> float, without relying on a compiler's _Float16 support; called once per token and head. */
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

/* The (scale, zero) of one cached token's vector of one KV head. */
static inline void token_params(const uint16_t *params, int64_t slot, int64_t num_kv_heads, int64_t head,
                                float *scale, float *zero) {
    const uint16_t *p = params + (slot * num_kv_heads + head) * 2;
    *scale = half_to_float(p[0]);
    *zero = half_to_float(p[1]);
}

/* GCC/Clang vector extensions: 8 floats in whatever registers the target has (AVX2 here, two NEON
 * registers on arm64), loaded from any float-aligned address. */
typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));

static inline float hsum(v8f x) {
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

/* scores[j] = scale * q . k_j for the 4 keys k_j = k + j * stride, head_dim a multiple of 8. Four tokens at
 * a time: four independent accumulations instead of one dependent chain of FMAs per token (a single chain
 * made the float32 kernel latency-bound, ~35 GFLOP/s on 2 threads), and q read once for the four. */
static inline void dot4(const float *q, const float *k, int64_t stride, int64_t head_dim, float scale,
                        float *scores) {
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int64_t d = 0; d < head_dim; d += 8) {
        const v8f qv = *(const v8f *)(q + d);
        a0 += qv * *(const v8f *)(k + d);
        a1 += qv * *(const v8f *)(k + stride + d);
        a2 += qv * *(const v8f *)(k + 2 * stride + d);
        a3 += qv * *(const v8f *)(k + 3 * stride + d);
    }
    scores[0] = scale * hsum(a0);
    scores[1] = scale * hsum(a1);
    scores[2] = scale * hsum(a2);
    scores[3] = scale * hsum(a3);
}

static inline float dot1(const float *q, const float *k, int64_t head_dim, float scale) {
    v8f a = {0};
    for (int64_t d = 0; d < head_dim; d += 8) a += *(const v8f *)(q + d) * *(const v8f *)(k + d);
    return scale * hsum(a);
}

/* acc[0:head_dim] += sum_i p[i] * v_i for the n values v_i = v + i * stride, head_dim a multiple of 32: each
 * 32-wide slice of acc stays in registers across the n tokens instead of a load and store per token. */
static inline void weighted_sum(float *acc, const float *p, const float *v, int64_t stride, int64_t n,
                                int64_t head_dim) {
    for (int64_t d = 0; d < head_dim; d += 32) {
        v8f a0 = *(v8f *)(acc + d), a1 = *(v8f *)(acc + d + 8);
        v8f a2 = *(v8f *)(acc + d + 16), a3 = *(v8f *)(acc + d + 24);
        for (int64_t i = 0; i < n; i++) {
            const float *vi = v + i * stride + d;
            const float pi = p[i];
            a0 += pi * *(const v8f *)vi;
            a1 += pi * *(const v8f *)(vi + 8);
            a2 += pi * *(const v8f *)(vi + 16);
            a3 += pi * *(const v8f *)(vi + 24);
        }
        *(v8f *)(acc + d) = a0;
        *(v8f *)(acc + d + 8) = a1;
        *(v8f *)(acc + d + 16) = a2;
        *(v8f *)(acc + d + 24) = a3;
    }
}

/* Ask for the `bytes` at p (whole cache lines) ahead of use. Blocks sit anywhere in the pool, so the
 * hardware prefetcher, which follows sequential addresses, stalls at every block boundary: the kernel
 * requests the next block while it computes on the current one. */
static inline void prefetch_block(const void *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off, 0, 1);
}

static inline __attribute__((always_inline)) void decode_attention(
        const int quantized, float *out, const float *q, const void *k_cache, const void *v_cache,
        const uint16_t *k_params, const uint16_t *v_params, const int32_t *block_tables,
        const int32_t *seq_lens, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
        int64_t block_size, int64_t max_blocks, float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t slot_stride = num_kv_heads * head_dim;
    const int64_t block_stride = block_size * slot_stride;
    /* A task is one sequence's KV heads [h0, h0 + heads_per_task): with all of them, a task reads whole
     * slots, contiguous memory the prefetcher streams. Few sequences are split by head to use every thread. */
    const int64_t heads_per_task = num_seqs >= 4 * (int64_t)num_threads ? num_kv_heads : 1;
    const int64_t tasks_per_seq = num_kv_heads / heads_per_task;
    const int64_t rows = heads_per_task * group;   /* query heads per task */
    /* What one task reads of a block: from its first KV head's entry of the first slot to its last one's of
     * the last slot (what the vectorised loops prefetch of the next block). */
    const int64_t task_block_bytes = (block_size * slot_stride - (num_kv_heads - heads_per_task) * head_dim)
                                     * (int64_t)sizeof(float);
    /* float32 caches with head_dim a multiple of the vector width take the vectorised loops (dot4,
     * weighted_sum); int8 caches and other widths the scalar ones. */
    const int vector_qk = !quantized && head_dim % 8 == 0;
    const int vector_pv = !quantized && head_dim % 32 == 0;
    int64_t longest = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (seq_lens[s] > longest) longest = seq_lens[s];

#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * rows * longest);   /* [rows, len] of the current task */
        float *acc = malloc(sizeof(float) * rows * head_dim);
        float *row_max = malloc(sizeof(float) * rows);
        float *row_sum = malloc(sizeof(float) * rows);
        float *q_sum = malloc(sizeof(float) * rows);               /* int8: sum(q) of each query row */
        float *zero_acc = malloc(sizeof(float) * rows);            /* int8: sum_t p_t * zero_t */

        /* Dynamic: context lengths differ by orders of magnitude between sequences. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_seqs * tasks_per_seq; task++) {
            const int64_t s = task / tasks_per_seq;
            const int64_t h0 = (task % tasks_per_seq) * heads_per_task;
            const int64_t len = seq_lens[s];
            const int32_t *table = block_tables + s * max_blocks;
            const float *qt = q + (s * num_heads + h0 * group) * head_dim;   /* [rows, head_dim] */
            for (int64_t r = 0; r < rows; r++) {
                row_max[r] = -INFINITY;
                zero_acc[r] = 0.0f;
                float sum = 0.0f;
                if (quantized)
                    for (int64_t d = 0; d < head_dim; d++) sum += qt[r * head_dim + d];
                q_sum[r] = sum;
            }

            for (int64_t start = 0; start < len; start += block_size) {
                const int64_t slot0 = (int64_t)table[start / block_size] * block_size;
                const int64_t n = len - start < block_size ? len - start : block_size;
                if (vector_qk) {
                    /* The next block's keys, or at the last block the first block's values. */
                    const int64_t next = start + block_size < len ? start + block_size : 0;
                    const float *ahead = (const float *)(next ? k_cache : v_cache)
                        + (int64_t)table[next / block_size] * block_stride + h0 * head_dim;
                    prefetch_block(ahead, task_block_bytes);
                    for (int64_t hh = 0; hh < heads_per_task; hh++) {
                        const float *k = (const float *)k_cache + slot0 * slot_stride + (h0 + hh) * head_dim;
                        for (int64_t g = 0; g < group; g++) {
                            const int64_t r = hh * group + g;
                            const float *qr = qt + r * head_dim;
                            float *sc = scores + r * len + start;
                            int64_t i = 0;
                            for (; i + 4 <= n; i += 4) dot4(qr, k + i * slot_stride, slot_stride, head_dim, scale, sc + i);
                            for (; i < n; i++) sc[i] = dot1(qr, k + i * slot_stride, head_dim, scale);
                            for (i = 0; i < n; i++)
                                if (sc[i] > row_max[r]) row_max[r] = sc[i];
                        }
                    }
                    continue;
                }
                for (int64_t i = 0; i < n; i++) {
                    const int64_t base = (slot0 + i) * slot_stride + h0 * head_dim;
                    for (int64_t hh = 0; hh < heads_per_task; hh++) {
                        float k_scale = 1.0f, k_zero = 0.0f;
                        if (quantized) token_params(k_params, slot0 + i, num_kv_heads, h0 + hh, &k_scale, &k_zero);
                        for (int64_t g = 0; g < group; g++) {
                            const int64_t r = hh * group + g;
                            const float *qr = qt + r * head_dim;
                            float dot = 0.0f;
                            if (quantized) {
                                const int8_t *k = (const int8_t *)k_cache + base + hh * head_dim;
#pragma omp simd reduction(+ : dot)
                                for (int64_t d = 0; d < head_dim; d++) dot += qr[d] * (float)k[d];
                                dot = k_scale * dot + k_zero * q_sum[r];
                            } else {
                                const float *k = (const float *)k_cache + base + hh * head_dim;
#pragma omp simd reduction(+ : dot)
                                for (int64_t d = 0; d < head_dim; d++) dot += qr[d] * k[d];
                            }
                            dot *= scale;
                            scores[r * len + start + i] = dot;
                            if (dot > row_max[r]) row_max[r] = dot;
                        }
                    }
                }
            }

            for (int64_t r = 0; r < rows; r++) {
                float *row = scores + r * len;
                const float m = row_max[r];
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int64_t t = 0; t < len; t++) {
                    row[t] = expf(row[t] - m);
                    sum += row[t];
                }
                row_sum[r] = sum;
            }

            for (int64_t j = 0; j < rows * head_dim; j++) acc[j] = 0.0f;
            for (int64_t start = 0; start < len; start += block_size) {
                const int64_t slot0 = (int64_t)table[start / block_size] * block_size;
                const int64_t n = len - start < block_size ? len - start : block_size;
                if (vector_pv) {
                    if (start + block_size < len)
                        prefetch_block((const float *)v_cache + (int64_t)table[(start + block_size) / block_size]
                                       * block_stride + h0 * head_dim, task_block_bytes);
                    for (int64_t hh = 0; hh < heads_per_task; hh++) {
                        const float *v = (const float *)v_cache + slot0 * slot_stride + (h0 + hh) * head_dim;
                        for (int64_t g = 0; g < group; g++) {
                            const int64_t r = hh * group + g;
                            weighted_sum(acc + r * head_dim, scores + r * len + start, v, slot_stride, n, head_dim);
                        }
                    }
                    continue;
                }
                for (int64_t i = 0; i < n; i++) {
                    const int64_t base = (slot0 + i) * slot_stride + h0 * head_dim;
                    for (int64_t hh = 0; hh < heads_per_task; hh++) {
                        float v_scale = 1.0f, v_zero = 0.0f;
                        if (quantized) token_params(v_params, slot0 + i, num_kv_heads, h0 + hh, &v_scale, &v_zero);
                        for (int64_t g = 0; g < group; g++) {
                            const int64_t r = hh * group + g;
                            const float p = scores[r * len + start + i];
                            float *a = acc + r * head_dim;
                            if (quantized) {
                                const int8_t *v = (const int8_t *)v_cache + base + hh * head_dim;
                                const float ps = p * v_scale;
                                zero_acc[r] += p * v_zero;
#pragma omp simd
                                for (int64_t d = 0; d < head_dim; d++) a[d] += ps * (float)v[d];
                            } else {
                                const float *v = (const float *)v_cache + base + hh * head_dim;
#pragma omp simd
                                for (int64_t d = 0; d < head_dim; d++) a[d] += p * v[d];
                            }
                        }
                    }
                }
            }

            float *o = out + (s * num_heads + h0 * group) * head_dim;
            for (int64_t r = 0; r < rows; r++) {
                const float inv = 1.0f / row_sum[r];
                for (int64_t d = 0; d < head_dim; d++)
                    o[r * head_dim + d] = (acc[r * head_dim + d] + zero_acc[r]) * inv;
            }
        }
        free(scores);
        free(acc);
        free(row_max);
        free(row_sum);
        free(q_sum);
        free(zero_acc);
    }
}

void paged_decode_attention_f32(float *out, const float *q, const float *k_cache, const float *v_cache,
                                const int32_t *block_tables, const int32_t *seq_lens, int64_t num_seqs,
                                int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                int64_t max_blocks, float scale, int num_threads) {
    decode_attention(0, out, q, k_cache, v_cache, NULL, NULL, block_tables, seq_lens, num_seqs, num_heads,
                     num_kv_heads, head_dim, block_size, max_blocks, scale, num_threads);
}

void paged_decode_attention_i8(float *out, const float *q, const int8_t *k_cache, const int8_t *v_cache,
                               const uint16_t *k_params, const uint16_t *v_params, const int32_t *block_tables,
                               const int32_t *seq_lens, int64_t num_seqs, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                               float scale, int num_threads) {
    decode_attention(1, out, q, k_cache, v_cache, k_params, v_params, block_tables, seq_lens, num_seqs,
                     num_heads, num_kv_heads, head_dim, block_size, max_blocks, scale, num_threads);
}
