/* Decode attention over the paged KV cache on CPU, float32: one query token per sequence.
 *
 * Why a kernel: gathering each sequence's blocks into a padded tensor for torch's SDPA reads and writes
 * the whole context once more per layer and step, and SDPA's CPU kernel is built for long queries, not the
 * few query heads per KV head of a decode. This reads every key and value once, straight from its block.
 *
 * Layouts (all contiguous):
 *   out, q        [num_seqs, num_heads, head_dim]
 *   k/v_cache     [num_blocks, block_size, num_kv_heads, head_dim]
 *   block_tables  [num_seqs, max_blocks] int32
 *   seq_lens      [num_seqs] int32, >= 1: keys/values visible to each sequence's query
 * Query heads [h * group, (h + 1) * group) share KV head h (grouped-query attention).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

void paged_decode_attention_f32(float *out, const float *q, const float *k_cache, const float *v_cache,
                                const int32_t *block_tables, const int32_t *seq_lens, int64_t num_seqs,
                                int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                int64_t max_blocks, float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t slot_stride = num_kv_heads * head_dim;
    const int64_t block_stride = block_size * slot_stride;
    /* A task is one sequence's KV heads [h0, h0 + heads_per_task): with all of them, a task reads whole
     * slots, contiguous memory the prefetcher streams. Few sequences are split by head to use every thread. */
    const int64_t heads_per_task = num_seqs >= 4 * (int64_t)num_threads ? num_kv_heads : 1;
    const int64_t tasks_per_seq = num_kv_heads / heads_per_task;
    const int64_t rows = heads_per_task * group;   /* query heads per task */
    int64_t longest = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (seq_lens[s] > longest) longest = seq_lens[s];

#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * rows * longest);   /* [rows, len] of the current task */
        float *acc = malloc(sizeof(float) * rows * head_dim);
        float *row_max = malloc(sizeof(float) * rows);
        float *row_sum = malloc(sizeof(float) * rows);

        /* Dynamic: context lengths differ by orders of magnitude between sequences. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_seqs * tasks_per_seq; task++) {
            const int64_t s = task / tasks_per_seq;
            const int64_t h0 = (task % tasks_per_seq) * heads_per_task;
            const int64_t len = seq_lens[s];
            const int32_t *table = block_tables + s * max_blocks;
            const float *qt = q + (s * num_heads + h0 * group) * head_dim;   /* [rows, head_dim] */
            for (int64_t r = 0; r < rows; r++) row_max[r] = -INFINITY;

            for (int64_t start = 0; start < len; start += block_size) {
                const float *kb = k_cache + (int64_t)table[start / block_size] * block_stride + h0 * head_dim;
                const int64_t n = len - start < block_size ? len - start : block_size;
                for (int64_t i = 0; i < n; i++) {
                    for (int64_t r = 0; r < rows; r++) {
                        const float *k = kb + i * slot_stride + (r / group) * head_dim;
                        const float *qr = qt + r * head_dim;
                        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                        for (int64_t d = 0; d < head_dim; d++) dot += qr[d] * k[d];
                        dot *= scale;
                        scores[r * len + start + i] = dot;
                        if (dot > row_max[r]) row_max[r] = dot;
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
                const float *vb = v_cache + (int64_t)table[start / block_size] * block_stride + h0 * head_dim;
                const int64_t n = len - start < block_size ? len - start : block_size;
                for (int64_t i = 0; i < n; i++) {
                    for (int64_t r = 0; r < rows; r++) {
                        const float *v = vb + i * slot_stride + (r / group) * head_dim;
                        const float p = scores[r * len + start + i];
                        float *a = acc + r * head_dim;
#pragma omp simd
                        for (int64_t d = 0; d < head_dim; d++) a[d] += p * v[d];
                    }
                }
            }

            float *o = out + (s * num_heads + h0 * group) * head_dim;
            for (int64_t r = 0; r < rows; r++) {
                const float inv = 1.0f / row_sum[r];
                for (int64_t d = 0; d < head_dim; d++) o[r * head_dim + d] = acc[r * head_dim + d] * inv;
            }
        }
        free(scores);
        free(acc);
        free(row_max);
        free(row_sum);
    }
}
