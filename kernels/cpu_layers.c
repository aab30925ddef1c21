/* The whole decoder stack of a decode step in one call (built into the same library as cpu_kernels.c by
 * kernels/cpu_build.py; driven by kernels/cpu_ops.decode_stack).
 *
 * At batch 1 the per-layer ops of engine/models/layers.py cost more in Python and ctypes overhead (~10 calls a
 * layer, each with torch allocations) than in arithmetic. llm_decode_stack runs the same public kernels in
 * the same order on the same float32 inputs, so its results are bit-identical to the Python path's:
 *   rms_norm (with residual from layer 1 on) -> qkv matmul (+ bias) -> [q/k RMSNorm per head] -> rotary
 *   -> K/V store at the slot mapping -> paged decode attention -> o matmul -> rms_norm with residual
 *   -> gate_up matmul -> silu_and_mul -> down matmul.
 * Decode-only batches: one new token per row, rows < 0 in slot_mapping are padding (no K/V store).
 */
#include <stdint.h>
#include <string.h>

/* the public kernels of cpu_kernels.c */
void llm_q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *scale,
                   const float *zero, int64_t N, float *out, float *xsum);
void llm_q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale,
                   const float *zero, int64_t GS, int64_t N, float *out, float *xsum);
void llm_int8_matmul(const float *x, int64_t M, int64_t K, const void *w, const void *scale, const void *zero,
                     int64_t half_scales, int64_t bits, int64_t GS, int64_t offset, int64_t N, float *out);
void llm_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache,
                                const int64_t *block_tables, int64_t table_width, const int64_t *context_lens,
                                int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t block_size,
                                float scale, int64_t kv_half, float *out);
void llm_store_kv(const float *k, int64_t k_stride, const float *v, int64_t v_stride, int64_t T, int64_t row,
                  const int64_t *slot_mapping, void *k_cache, void *v_cache, int64_t kv_half);
void llm_rms_norm(const float *x, const float *residual, const float *weight, float eps, int64_t T, int64_t N,
                  float *out, float *residual_out);
void llm_rotary_embedding(const float *q, int64_t q_stride, const float *k, int64_t k_stride,
                          const int64_t *positions, const float *cos_sin, int64_t T, int64_t H, int64_t KVH,
                          int64_t D, float *q_out, float *k_out);
void llm_silu_and_mul(const float *x, int64_t T, int64_t I, float *out);

/* A PackedWeight (kernels/cpu_quant.py) as the kernels take it. NOTE: field order and types match
   kernels/cpu_ops._PackedWeight (ctypes). */
typedef struct {
    const void *data, *scale, *zero;   /* zero may be NULL (q8 without zero terms) */
    int64_t bits, group, out_features, in_features;
    int64_t int8_activations;          /* pack_int8's layout: llm_int8_matmul */
    int64_t half_scales;               /* float16 scale/zero (pack_int8 only) */
    int64_t offset;                    /* pack_int8's 4-bit weights, zero NULL: w = scale * (q - offset) */
} llm_packed_weight;

/* One DecoderLayer's weights. NOTE: matches kernels/cpu_ops._DecoderLayer. */
typedef struct {
    const float *input_norm, *post_norm;
    const float *q_norm, *k_norm;      /* Qwen3's per-head norms, or NULL */
    const float *qkv_bias;             /* [q + 2 kv], or NULL */
    llm_packed_weight qkv, o, gate_up, down;
} llm_decoder_layer;

/* quant_matmul's dispatch: x [M, K] -> out [M, N]; xsum: [M, K / group] scratch for the zero terms. */
static void matmul(const float *x, int64_t M, const llm_packed_weight *w, float *out, float *xsum) {
    if (w->int8_activations)
        llm_int8_matmul(x, M, w->in_features, w->data, w->scale, w->zero, w->half_scales, w->bits, w->group,
                        w->offset, w->out_features, out);
    else if (w->bits == 4)
        llm_q4_matmul(x, M, w->in_features, w->data, w->scale, w->zero, w->out_features, out,
                      w->zero ? xsum : NULL);
    else
        llm_q8_matmul(x, M, w->in_features, w->data, w->scale, w->zero, w->group, w->out_features, out,
                      w->zero ? xsum : NULL);
}

/* Floats of scratch llm_decode_stack needs for B rows (xsum_per_row: the largest in_features / group). */
int64_t llm_decode_stack_scratch_floats(int64_t B, int64_t hidden, int64_t H, int64_t KVH, int64_t D,
                                        int64_t I, int64_t xsum_per_row) {
    const int64_t q = H * D, kv = KVH * D;
    return B * ((q + 2 * kv) + (q + kv) * 2 + q + 5 * hidden + 3 * I + xsum_per_row);
}

/* L layers over B decode rows.
   x_in: [B, hidden] embeddings; positions, slot_mapping, context_lens: [B]; block_tables: [B, table_width];
   cos_sin: [max_pos, D]; k_caches[l], v_caches[l]: [num_blocks, block_size, KVH, D], float32 or (kv_half)
   float16 (stored as torch's .to(torch.float16) rounds);
   scratch: llm_decode_stack_scratch_floats(...) floats; x_out, residual_out: [B, hidden] -- with final_norm
   (the model's last RMSNorm, eps final_eps), its output and the residual sum it normalised, as the layer loop's
   norm(x, residual) returns them; with NULL, the last layer's output and residual. */
void llm_decode_stack(const llm_decoder_layer *layers, int64_t L, int64_t B, int64_t hidden, int64_t H,
                      int64_t KVH, int64_t D, int64_t I, float eps, float attn_scale, const float *x_in,
                      const int64_t *positions, const float *cos_sin, const int64_t *slot_mapping,
                      const int64_t *block_tables, int64_t table_width, const int64_t *context_lens,
                      void *const *k_caches, void *const *v_caches, int64_t kv_half, int64_t block_size,
                      float *scratch,
                      float *x_out, float *residual_out, const float *final_norm, float final_eps) {
    const int64_t q = H * D, kv = KVH * D, qkv_w = q + 2 * kv;
    float *qkv = scratch, *qn = qkv + B * qkv_w, *kn = qn + B * q, *q_rot = kn + B * kv, *k_rot = q_rot + B * q;
    float *attn = k_rot + B * kv, *o = attn + B * q, *xn = o + B * hidden;
    float *res[2] = {xn + B * hidden, xn + 2 * B * hidden};
    float *x = xn + 3 * B * hidden, *gu = x + B * hidden, *act = gu + B * 2 * I, *xsum = act + B * I;
    /* each residual add writes the buffer the current residual is not in */
#define NEXT_RESIDUAL (residual == res[0] ? res[1] : res[0])
    const float *residual = x_in;   /* layer 0: the embeddings are the residual (DecoderLayer) */
    const float *x_cur = x_in;
    for (int64_t l = 0; l < L; l++) {
        const llm_decoder_layer *ly = layers + l;
        float *res_next;
        if (l == 0) llm_rms_norm(x_cur, NULL, ly->input_norm, eps, B, hidden, xn, NULL);
        else {
            res_next = NEXT_RESIDUAL;
            llm_rms_norm(x_cur, residual, ly->input_norm, eps, B, hidden, xn, res_next);
            residual = res_next;
        }
        matmul(xn, B, &ly->qkv, qkv, xsum);
        if (ly->qkv_bias)   /* out.add_(bias): one rounding per element, as torch's add */
            for (int64_t r = 0; r < B; r++)
                for (int64_t i = 0; i < qkv_w; i++) qkv[r * qkv_w + i] += ly->qkv_bias[i];
        const float *qs = qkv, *ks = qkv + q;
        int64_t q_stride = qkv_w, k_stride = qkv_w;
        if (ly->q_norm) {   /* per-head RMSNorm of q and k (rows of D), into contiguous copies */
            for (int64_t r = 0; r < B; r++) {
                llm_rms_norm(qkv + r * qkv_w, NULL, ly->q_norm, eps, H, D, qn + r * q, NULL);
                llm_rms_norm(qkv + r * qkv_w + q, NULL, ly->k_norm, eps, KVH, D, kn + r * kv, NULL);
            }
            qs = qn, ks = kn, q_stride = q, k_stride = kv;
        }
        llm_rotary_embedding(qs, q_stride, ks, k_stride, positions, cos_sin, B, H, KVH, D, q_rot, k_rot);
        llm_store_kv(k_rot, kv, qkv + q + kv, qkv_w, B, kv, slot_mapping, k_caches[l], v_caches[l], kv_half);
        llm_paged_decode_attention(q_rot, k_caches[l], v_caches[l], block_tables, table_width, context_lens, B, H,
                                   KVH, D, block_size, attn_scale, kv_half, attn);
        matmul(attn, B, &ly->o, o, xsum);
        res_next = NEXT_RESIDUAL;
        llm_rms_norm(o, residual, ly->post_norm, eps, B, hidden, xn, res_next);
        residual = res_next;
        matmul(xn, B, &ly->gate_up, gu, xsum);
        llm_silu_and_mul(gu, B, I, act);
        matmul(act, B, &ly->down, x, xsum);
        x_cur = x;
    }
    if (final_norm) llm_rms_norm(x_cur, residual, final_norm, final_eps, B, hidden, x_out, residual_out);
    else {
        memcpy(x_out, x_cur, sizeof(float) * (size_t)(B * hidden));
        memcpy(residual_out, residual, sizeof(float) * (size_t)(B * hidden));
    }
#undef NEXT_RESIDUAL
}
