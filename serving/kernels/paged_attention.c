/* Decode attention over the paged KV cache on CPU, float32 queries: one query token per sequence.
 *
 * Why a kernel: gathering each sequence's blocks into a padded tensor for torch's SDPA reads and writes
 * the whole context once more per layer and step, and SDPA's CPU kernel is built for long queries, not the
 * few query heads per KV head of a decode. This reads every key and value once, straight from its block.
 *
 * Two cache formats, one body (`attend_task`, specialised by a constant flag the compiler folds):
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
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "half.h"

/* The float16 (scale, zero) pairs of `count` consecutive cached vectors, from params, into dst as floats:
 * one block's at a time for the vectorised loops. */
static inline void params_to_float(const uint16_t *params, int64_t count, float *dst) {
    int64_t i = 0;
#ifdef __F16C__
    for (; i + 8 <= 2 * count; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(params + i))));
#endif
    for (; i < 2 * count; i++) dst[i] = half_to_float(params[i]);
}

/* GCC/Clang vector extensions: 8 floats in whatever registers the target has (AVX2 here, two NEON
 * registers on arm64), loaded from any float-aligned address. */
typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));

static inline float hsum(v8f x) {
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

/* The 8 cache entries from element `offset` as floats: float32 entries, or int8 codes (for the int8 cache
 * the scales and zeros are applied outside the vector loops, once per token). */
static inline __attribute__((always_inline)) v8f load8(const int quantized, const void *cache, int64_t offset) {
    if (quantized) {
        const int8_t *codes = (const int8_t *)cache + offset;
#ifdef __AVX2__
        /* GCC 12 builds __builtin_convertvector's int8 -> float one element at a time. */
        return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)codes)));
#else
        v8f x;
        for (int j = 0; j < 8; j++) x[j] = codes[j];
        return x;
#endif
    }
    return *(const v8f *)((const float *)cache + offset);
}

/* One cache entry as a float (the few elements past head_dim's last multiple of 8). */
static inline __attribute__((always_inline)) float load1(const int quantized, const void *cache, int64_t offset) {
    return quantized ? (float)((const int8_t *)cache)[offset] : ((const float *)cache)[offset];
}

/* Ask for one token's vector of one head (whole cache lines) ahead of use. Blocks sit anywhere in the pool,
 * so the hardware prefetcher, which follows sequential addresses, stalls at every block boundary: the loops
 * below request the next block's token i while they compute on the current block's token i, spread over the
 * block. (Requesting the whole next block at once, as before, measured no faster than no prefetch at all;
 * spread out, the same requests made cold calls ~1.3x faster in an A/B with llama-prop's heads.) */
static inline void prefetch_vector(const char *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 1);
}

/* The query rows of one KV head's group go through each key and value together, in chunks of up to
 * ROW_CHUNK rows: every cached vector is loaded (and, int8, converted to floats) once per chunk instead of
 * once per query row. The same loops serve both formats; only load8 differs. */
#ifdef __AVX512F__
#define ROW_CHUNK 8   /* 32 vector registers: the 16 accumulators of 8 rows fit */
#else
#define ROW_CHUNK 4   /* 16 (AVX2): chunks of 8 ran int8 caches ~20% slower there (70B's 8 rows per head) */
#endif

/* scores[r * ld + i] = q_r . x_i (before any scale) for the nr (a constant after inlining) rows
 * q_r = q + r * head_dim and the n entries x_i at element base + i * stride of the cache, head_dim a multiple
 * of 8 in vectors and the rest one by one; `ahead` (NULL: none) is where the next block's x_0 sits, prefetched
 * as we go. Two keys at a time: 2 * nr independent accumulators instead of one dependent chain of FMAs per key. */
static inline __attribute__((always_inline)) void qk_rows(const int quantized, const int nr, const float *q,
        const void *cache, int64_t base, const char *ahead, int64_t stride, int64_t n, int64_t head_dim,
        float *scores, int64_t ld) {
    const int64_t entry = quantized ? 1 : (int64_t)sizeof(float);   /* bytes per element */
    for (int64_t i = 0; i < n; i += 2) {
        const int two = i + 1 < n;
        const int64_t x0 = base + i * stride, x1 = two ? x0 + stride : x0;
        if (ahead) {
            prefetch_vector(ahead + i * stride * entry, head_dim * entry);
            prefetch_vector(ahead + (i + 1) * stride * entry, head_dim * entry);
        }
        v8f a0[ROW_CHUNK] = {{0}}, a1[ROW_CHUNK] = {{0}};
        int64_t d = 0;
        for (; d + 8 <= head_dim; d += 8) {
            const v8f k0 = load8(quantized, cache, x0 + d), k1 = load8(quantized, cache, x1 + d);
            for (int r = 0; r < nr; r++) {
                const v8f qv = *(const v8f *)(q + r * head_dim + d);
                a0[r] += qv * k0;
                a1[r] += qv * k1;
            }
        }
        for (int r = 0; r < nr; r++) {
            scores[r * ld + i] = hsum(a0[r]);
            if (two) scores[r * ld + i + 1] = hsum(a1[r]);
        }
        if (d < head_dim)
            for (int r = 0; r < nr; r++)
                for (int64_t t = d; t < head_dim; t++) {
                    scores[r * ld + i] += q[r * head_dim + t] * load1(quantized, cache, x0 + t);
                    if (two) scores[r * ld + i + 1] += q[r * head_dim + t] * load1(quantized, cache, x1 + t);
                }
    }
}

/* acc_r[0:head_dim] += sum_i p[r * ld + i] * x_i for the nr rows acc_r = acc + r * head_dim and the n entries
 * x_i at element base + i * stride: each row's slice of 16 (or a last 8) stays in registers across the n tokens
 * and each entry is loaded once for all rows; elements past the last multiple of 8 go one by one. */
static inline __attribute__((always_inline)) void pv_rows(const int quantized, const int nr, float *acc,
        const float *p, int64_t ld, const void *cache, int64_t base, const char *ahead, int64_t stride, int64_t n,
        int64_t head_dim) {
    const int64_t entry = quantized ? 1 : (int64_t)sizeof(float);
    int64_t d = 0;
    for (; d + 8 <= head_dim; d += 16) {
        const int two = d + 16 <= head_dim;
        v8f a0[ROW_CHUNK], a1[ROW_CHUNK];
        for (int r = 0; r < nr; r++) {
            a0[r] = *(v8f *)(acc + r * head_dim + d);
            a1[r] = two ? *(v8f *)(acc + r * head_dim + d + 8) : a0[r];
        }
        for (int64_t i = 0; i < n; i++) {
            if (ahead && d == 0) prefetch_vector(ahead + i * stride * entry, head_dim * entry);
            const int64_t x = base + i * stride + d;
            const v8f v0 = load8(quantized, cache, x), v1 = two ? load8(quantized, cache, x + 8) : v0;
            for (int r = 0; r < nr; r++) {
                const float pr = p[r * ld + i];
                a0[r] += pr * v0;
                a1[r] += pr * v1;
            }
        }
        for (int r = 0; r < nr; r++) {
            *(v8f *)(acc + r * head_dim + d) = a0[r];
            if (two) *(v8f *)(acc + r * head_dim + d + 8) = a1[r];
        }
    }
    for (d = head_dim & ~(int64_t)7; d < head_dim; d++)
        for (int64_t i = 0; i < n; i++) {
            const float x = load1(quantized, cache, base + i * stride + d);
            for (int r = 0; r < nr; r++) acc[r * head_dim + d] += p[r * ld + i] * x;
        }
}

/* CALL(nr) for nr = `count` (1..ROW_CHUNK), so that nr is a constant in each inlined copy. */
#if ROW_CHUNK == 8
#define WITH_CONSTANT_ROWS(count, CALL) switch (count) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); break; }
#else
#define WITH_CONSTANT_ROWS(count, CALL) switch (count) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; default: CALL(4); break; }
#endif

/* The two above for `rows` query rows in chunks of ROW_CHUNK; the first chunk prefetches. */
static inline __attribute__((always_inline)) void qk_group(const int quantized, const float *q, int64_t rows,
        const void *cache, int64_t base, const char *ahead, int64_t stride, int64_t n, int64_t head_dim,
        float *scores, int64_t ld) {
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_CHUNK, ahead = NULL) {
        const float *qc = q + r0 * head_dim;
        float *sc = scores + r0 * ld;
#define QK_ROWS(nr) qk_rows(quantized, nr, qc, cache, base, ahead, stride, n, head_dim, sc, ld)
        WITH_CONSTANT_ROWS(rows - r0 < ROW_CHUNK ? rows - r0 : ROW_CHUNK, QK_ROWS)
#undef QK_ROWS
    }
}

static inline __attribute__((always_inline)) void pv_group(const int quantized, float *acc, int64_t rows,
        const float *p, int64_t ld, const void *cache, int64_t base, const char *ahead, int64_t stride, int64_t n,
        int64_t head_dim) {
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_CHUNK, ahead = NULL) {
        float *ac = acc + r0 * head_dim;
        const float *pc = p + r0 * ld;
#define PV_ROWS(nr) pv_rows(quantized, nr, ac, pc, ld, cache, base, ahead, stride, n, head_dim)
        WITH_CONSTANT_ROWS(rows - r0 < ROW_CHUNK ? rows - r0 : ROW_CHUNK, PV_ROWS)
#undef PV_ROWS
    }
}

/* One call's shapes and derived sizes, shared by its threads. */
typedef struct {
    float *out;
    const float *q;
    const void *k_cache, *v_cache;
    const uint16_t *k_params, *v_params;
    const int32_t *block_tables, *seq_lens;
    int64_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks;
    float scale;
    int64_t group, slot_stride, block_stride, heads_per_task, tasks_per_seq, rows, longest;
} Attention;

static Attention attention_shapes(float *out, const float *q, const void *k_cache, const void *v_cache,
        const uint16_t *k_params, const uint16_t *v_params, const int32_t *block_tables,
        const int32_t *seq_lens, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
        int64_t block_size, int64_t max_blocks, float scale, int num_threads) {
    /* A task is one sequence's KV heads [h0, h0 + heads_per_task): with all of them, a task reads whole
     * slots, contiguous memory the prefetcher streams. Few sequences are split by head to use every thread. */
    const int64_t heads_per_task = num_seqs >= 4 * (int64_t)num_threads ? num_kv_heads : 1;
    Attention a = {.out = out, .q = q, .k_cache = k_cache, .v_cache = v_cache, .k_params = k_params,
                   .v_params = v_params, .block_tables = block_tables, .seq_lens = seq_lens,
                   .num_seqs = num_seqs, .num_heads = num_heads, .num_kv_heads = num_kv_heads,
                   .head_dim = head_dim, .block_size = block_size, .max_blocks = max_blocks, .scale = scale,
                   .group = num_heads / num_kv_heads, .slot_stride = num_kv_heads * head_dim,
                   .block_stride = block_size * num_kv_heads * head_dim, .heads_per_task = heads_per_task,
                   .tasks_per_seq = num_kv_heads / heads_per_task,
                   .rows = heads_per_task * (num_heads / num_kv_heads),   /* query heads per task */
                   .longest = 1};
    for (int64_t s = 0; s < num_seqs; s++)
        if (seq_lens[s] > a.longest) a.longest = seq_lens[s];
    return a;
}

/* One thread's scratch, for any task of the call. */
typedef struct {
    float *scores;        /* [rows, len] of the current task */
    float *acc;           /* [rows, head_dim] */
    float *row_max, *row_sum;
    float *q_sum;         /* int8: sum(q) of each query row */
    float *zero_acc;      /* int8: sum_t p_t * zero_t of each query row */
    float *block_params;  /* int8: one block's (scale, zero) [block_size, num_kv_heads, 2] as floats */
} Workspace;

static Workspace workspace_new(const Attention *a) {
    Workspace w = {malloc(sizeof(float) * a->rows * a->longest), malloc(sizeof(float) * a->rows * a->head_dim),
                   malloc(sizeof(float) * a->rows), malloc(sizeof(float) * a->rows),
                   malloc(sizeof(float) * a->rows), malloc(sizeof(float) * a->rows),
                   malloc(sizeof(float) * a->block_size * a->num_kv_heads * 2)};
    return w;
}

static void workspace_free(Workspace *w) {
    free(w->scores);
    free(w->acc);
    free(w->row_max);
    free(w->row_sum);
    free(w->q_sum);
    free(w->zero_acc);
    free(w->block_params);
}

/* One task: `quantized` is a constant in each caller, so each cache format gets its own specialised copy
 * (the parallel regions sit in the callers: OpenMP outlines a region before inlining, and one region shared
 * by both formats would test the format inside the inner loops). */
static inline __attribute__((always_inline)) void attend_task(const int quantized, const Attention *a,
                                                               Workspace *w, int64_t task) {
    const int64_t group = a->group, slot_stride = a->slot_stride, block_stride = a->block_stride;
    const int64_t heads_per_task = a->heads_per_task, tasks_per_seq = a->tasks_per_seq, rows = a->rows;
    const int64_t num_heads = a->num_heads, num_kv_heads = a->num_kv_heads, head_dim = a->head_dim;
    const int64_t block_size = a->block_size, max_blocks = a->max_blocks;
    const float scale = a->scale;
    const float *q = a->q;
    float *out = a->out;
    const void *k_cache = a->k_cache, *v_cache = a->v_cache;
    const uint16_t *k_params = a->k_params, *v_params = a->v_params;
    const int32_t *block_tables = a->block_tables, *seq_lens = a->seq_lens;
    float *scores = w->scores, *acc = w->acc, *row_max = w->row_max, *row_sum = w->row_sum;
    float *q_sum = w->q_sum, *zero_acc = w->zero_acc, *block_params = w->block_params;
    const int64_t entry = quantized ? 1 : (int64_t)sizeof(float);   /* bytes per cache element */
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
        /* The next block's keys, or at the last block the first block's values. */
        const int64_t next = start + block_size < len ? start + block_size : 0;
        const char *ahead = (const char *)(next ? k_cache : v_cache)
            + ((int64_t)table[next / block_size] * block_stride + h0 * head_dim) * entry;
        if (quantized) {
            params_to_float(k_params + slot0 * num_kv_heads * 2, n * num_kv_heads, block_params);
            prefetch_vector((const char *)((next ? k_params : v_params)
                            + (int64_t)table[next / block_size] * block_size * num_kv_heads * 2),
                            block_size * num_kv_heads * 2 * (int64_t)sizeof(uint16_t));
        }
        for (int64_t hh = 0; hh < heads_per_task; hh++) {
            qk_group(quantized, qt + hh * group * head_dim, group, k_cache,
                     slot0 * slot_stride + (h0 + hh) * head_dim, ahead + hh * head_dim * entry,
                     slot_stride, n, head_dim, scores + hh * group * len + start, len);
            for (int64_t g = 0; g < group; g++) {
                const int64_t r = hh * group + g;
                float *sc = scores + r * len + start;
                for (int64_t i = 0; i < n; i++) {
                    const float *pair = block_params + (i * num_kv_heads + h0 + hh) * 2;   /* scale, zero */
                    const float dot = quantized ? pair[0] * sc[i] + pair[1] * q_sum[r] : sc[i];
                    sc[i] = scale * dot;
                    if (sc[i] > row_max[r]) row_max[r] = sc[i];
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
        const char *ahead = start + block_size < len ? (const char *)v_cache
            + ((int64_t)table[(start + block_size) / block_size] * block_stride + h0 * head_dim) * entry
            : NULL;
        if (quantized) {
            params_to_float(v_params + slot0 * num_kv_heads * 2, n * num_kv_heads, block_params);
            if (ahead)
                prefetch_vector((const char *)(v_params + (int64_t)table[(start + block_size) / block_size]
                                               * block_size * num_kv_heads * 2),
                                block_size * num_kv_heads * 2 * (int64_t)sizeof(uint16_t));
        }
        for (int64_t hh = 0; hh < heads_per_task; hh++) {
            float *p = scores + hh * group * len + start;   /* this head's rows, len apart */
            if (quantized)
                /* sum_t p_t x_t = sum_t (p_t * scale_t) codes_t + sum_t p_t * zero_t */
                for (int64_t g = 0; g < group; g++)
                    for (int64_t i = 0; i < n; i++) {
                        const float *pair = block_params + (i * num_kv_heads + h0 + hh) * 2;
                        zero_acc[hh * group + g] += p[g * len + i] * pair[1];
                        p[g * len + i] *= pair[0];
                    }
            pv_group(quantized, acc + hh * group * head_dim, group, p, len, v_cache,
                     slot0 * slot_stride + (h0 + hh) * head_dim,
                     ahead ? ahead + hh * head_dim * entry : NULL, slot_stride, n, head_dim);
        }
    }

    float *o = out + (s * num_heads + h0 * group) * head_dim;
    for (int64_t r = 0; r < rows; r++) {
        const float inv = 1.0f / row_sum[r];
        for (int64_t d = 0; d < head_dim; d++)
            o[r * head_dim + d] = (acc[r * head_dim + d] + zero_acc[r]) * inv;
    }
}

void paged_decode_attention_f32(float *out, const float *q, const float *k_cache, const float *v_cache,
                                const int32_t *block_tables, const int32_t *seq_lens, int64_t num_seqs,
                                int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                int64_t max_blocks, float scale, int num_threads) {
    const Attention a = attention_shapes(out, q, k_cache, v_cache, NULL, NULL, block_tables, seq_lens, num_seqs,
                                         num_heads, num_kv_heads, head_dim, block_size, max_blocks, scale,
                                         num_threads);
#pragma omp parallel num_threads(num_threads)
    {
        Workspace w = workspace_new(&a);
        /* Dynamic: context lengths differ by orders of magnitude between sequences. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_seqs * a.tasks_per_seq; task++) attend_task(0, &a, &w, task);
        workspace_free(&w);
    }
}

void paged_decode_attention_i8(float *out, const float *q, const int8_t *k_cache, const int8_t *v_cache,
                               const uint16_t *k_params, const uint16_t *v_params, const int32_t *block_tables,
                               const int32_t *seq_lens, int64_t num_seqs, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                               float scale, int num_threads) {
    const Attention a = attention_shapes(out, q, k_cache, v_cache, k_params, v_params, block_tables, seq_lens,
                                         num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks,
                                         scale, num_threads);
#pragma omp parallel num_threads(num_threads)
    {
        Workspace w = workspace_new(&a);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_seqs * a.tasks_per_seq; task++) attend_task(1, &a, &w, task);
        workspace_free(&w);
    }
}
