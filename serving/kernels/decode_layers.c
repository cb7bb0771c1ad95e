/* A small decode step through every Llama decoder layer in one call: float32 on CPU, a few rows.
 *
 * Why: at a decode step of a few rows each op is short (llama-prop at batch 1: ~4.8 ms a token, of which
 * the matmuls' weight reads are ~2.3 ms), and the eager layer calls ~40 torch and ctypes ops per layer from
 * Python, each a few microseconds; a profile put ~2 ms of the token in them. This runs the same kernels
 * in the same order with the same thread count (small_linear.c, fused_ops.c, paged_attention.c, included
 * here), so its outputs are bit-identical to the eager path's; only the Python between them is gone.
 *
 * Per layer (the eager LlamaDecoderLayer): s = hidden + residual (layer 0: s = hidden), x = RMSNorm(s);
 * qkv = x Wqkv^T; q, k rotated (rotate_half); k, v stored at the rows' cache slots; a = attention(q) over
 * the paged cache; s += a Wo^T, x = RMSNorm(s); hidden = (silu(x Wg^T) * x Wu^T) Wd^T. After the last
 * layer hidden = RMSNorm(hidden + residual), in place.
 *
 * Layouts (contiguous): hidden [m, hidden_size] (in: the embeddings, out: the final norm's output);
 * weights: 6 pointers a layer (input norm [E], Wqkv [(H + 2 KVH) D, E], Wo [E, H D], post norm [E],
 * W[gate|up] [2 I, E], Wd [E, I]); caches: 2 a layer (k, v: [blocks, block_size, KVH, D] float32), or with
 * int8_cache 4 a layer (k, v codes [blocks, block_size, KVH, D] int8, then k, v params [blocks, block_size,
 * KVH, 2] float16: paged_attention.c's int8 format, written by fused_ops.c's kv_store_i8); cos, sin [m, D];
 * slots [m] int64; block_tables [m, max_blocks] int32; seq_lens [m] int32 (after this step's token);
 * scratch m * (3 E + (H + 2 KVH) D + 2 H D + 3 I) floats.
 */
#include <string.h>

#include "fused_ops.c"
#include "paged_attention.c"
#include "small_linear.c"

enum { IN_NORM, QKV, O_PROJ, POST_NORM, GATE_UP, DOWN, WEIGHTS_PER_LAYER };

void llama_decode_layers_f32(float *hidden, float *scratch, const float *const *weights, float *const *caches,
                            const float *final_norm, const float *cos, const float *sin, const int64_t *slots,
                            const int32_t *block_tables, const int32_t *seq_lens, int64_t m,
                            int64_t num_layers, int64_t hidden_size, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, int64_t intermediate, int64_t block_size, int64_t max_blocks,
                            int64_t int8_cache, float eps, float scale, int num_threads) {
    const int64_t e = hidden_size, q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
    const int64_t qkv_size = q_size + 2 * kv_size;
    float *residual = scratch, *x = residual + m * e, *o = x + m * e, *qkv = o + m * e;
    float *q = qkv + m * qkv_size, *attn = q + m * q_size, *gate_up = attn + m * q_size;
    float *act = gate_up + 2 * m * intermediate;
    for (int64_t l = 0; l < num_layers; l++) {
        const float *const *w = weights + l * WEIGHTS_PER_LAYER;
        if (l == 0) {
            memcpy(residual, hidden, sizeof(float) * m * e);
            add_rms_norm_f32(x, NULL, hidden, NULL, w[IN_NORM], m, e, eps, num_threads);
        } else {
            add_rms_norm_f32(x, residual, hidden, residual, w[IN_NORM], m, e, eps, num_threads);
        }
        small_linear_f32(qkv, x, w[QKV], NULL, m, qkv_size, e, num_threads);
        rotary_f32(q, qkv, qkv + q_size, qkv + q_size, cos, sin, m, num_heads, num_kv_heads, head_dim,
                   qkv_size, q_size, qkv_size, qkv_size, num_threads);
        const float *k = qkv + q_size, *v = k + kv_size;
        if (int8_cache) {
            void *const *c = (void *const *)caches + 4 * l;
            kv_store_i8(c[0], c[2], k, slots, m, num_kv_heads, head_dim, qkv_size, num_threads);
            kv_store_i8(c[1], c[3], v, slots, m, num_kv_heads, head_dim, qkv_size, num_threads);
            paged_decode_attention_i8(attn, q, c[0], c[1], c[2], c[3], block_tables, seq_lens, m, num_heads,
                                      num_kv_heads, head_dim, block_size, max_blocks, scale, num_threads);
        } else {
            float *k_cache = caches[2 * l], *v_cache = caches[2 * l + 1];
            for (int64_t t = 0; t < m; t++) {
                memcpy(k_cache + slots[t] * kv_size, k + t * qkv_size, sizeof(float) * kv_size);
                memcpy(v_cache + slots[t] * kv_size, v + t * qkv_size, sizeof(float) * kv_size);
            }
            paged_decode_attention_f32(attn, q, k_cache, v_cache, block_tables, seq_lens, m, num_heads,
                                       num_kv_heads, head_dim, block_size, max_blocks, scale, num_threads);
        }
        small_linear_f32(o, attn, w[O_PROJ], NULL, m, e, q_size, num_threads);
        add_rms_norm_f32(x, residual, o, residual, w[POST_NORM], m, e, eps, num_threads);
        small_linear_f32(gate_up, x, w[GATE_UP], NULL, m, 2 * intermediate, e, num_threads);
        silu_and_mul_f32(act, gate_up, m, intermediate, 2 * intermediate, num_threads);
        small_linear_f32(hidden, act, w[DOWN], NULL, m, e, intermediate, num_threads);
    }
    add_rms_norm_f32(x, residual, hidden, residual, final_norm, m, e, eps, num_threads);
    memcpy(hidden, x, sizeof(float) * m * e);
}
