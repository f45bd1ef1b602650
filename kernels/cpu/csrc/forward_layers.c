/* Every decoder layer of a bf16 Llama-family model (projections bf16, or weight-only int8/int4)
 * in one call, for the CPU serving path.
 *
 * MODEL KNOWLEDGE IN C: this file re-encodes the Llama layer order that the model's Python loop
 * (LlamaModel._layers in engine_svc/models/llama.py) defines: RMSNorm, QKV product (+ bias),
 * RoPE + K/V store, pool attention, output product, RMSNorm (+ residual), gate/up product,
 * SiLU*up, down product. A change to that loop must be made here too;
 * tests/engine/test_native_layers.py runs both on one mixed batch and requires bit-for-bit equal
 * logits and K/V (the C loop is reached through kernels/cpu/layer_loop.py).
 *
 * The same kernels, in the same order and on the same values, so the numbers are identical;
 * what goes is ~9 Python calls, ctypes crossings and tensor allocations per layer
 * (a decode step here: 32.2 -> 28.4 ms for 32 requests, 12.6 -> 8.7 ms for one).
 * Decode and prefill tokens are alike to the attention kernel: each token is a query over the
 * first seq_lens[t] tokens of its table row.
 * A projection whose bit is set in step->hooked runs through step->hook instead of the C
 * kernels: kernels/cpu/layer_loop.py sets it where the measured choice
 * (kernels/cpu/gemm_choice.py) picks oneDNN for this step's row count, so the Python loop and
 * this one run the same GEMMs. A quantized projection (its bit set in the layer's `quantized`)
 * runs through gemm_quant (VNNI), or gemm_dequant_bf16 where step->dequant has its bit.
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

/* one layer's tensors: norms bf16 [hidden]; projections packed for gemm_bf16, or (their bit
 * `which` set in `quantized`) a quant_weight; pools [capacity, kv_heads, head_dim] */
typedef struct {
    const void *input_norm, *qkv_proj, *qkv_bias, *o_proj, *post_norm, *gate_up_proj, *down_proj;
    void *k_cache, *v_cache;
    int64_t quantized;
} layer_tensors;

/* the model's sizes and what every layer shares */
typedef struct {
    int64_t layers, hidden, q_heads, kv_heads, head_dim, inter;
    float eps, scale;
    int64_t capacity, row_stride, head_stride;     /* of every layer's k and v pool */
    const int32_t *req_to_token;                   /* [table_rows, table_columns] */
    int64_t table_rows, table_columns;
    const float *cos_sin;                          /* [max_positions, head_dim] fp32 */
    int64_t max_positions;
} layer_stack;

/* a projection run outside the C kernel: (layer, which: 0 qkv, 1 o, 2 gate_up, 3 down) reads
 * its input from and writes its output to the step's tensors, as gemm_bf16 would; 0 on success */
typedef int (*gemm_hook)(int64_t layer, int64_t which);
enum { PROJ_QKV, PROJ_O, PROJ_GATE_UP, PROJ_DOWN };

/* one step: its tokens and the bf16 scratch tensors (all contiguous) */
typedef struct {
    int64_t tokens;
    const int64_t *positions, *out_rows;           /* [tokens] */
    const int32_t *slots, *seq_lens;               /* [tokens] table row, visible keys */
    void *hidden;      /* [tokens, hidden]: the embeddings in, the last layer's output out */
    void *residual;    /* [tokens, hidden]: the residual stream out */
    void *normed;      /* [tokens, hidden] */
    void *qkv;         /* [tokens, (q_heads + 2 * kv_heads) * head_dim] */
    void *attn;        /* [tokens, q_heads * head_dim] */
    void *gate_up;     /* [tokens, 2 * inter] */
    void *act;         /* [tokens, inter] */
    int64_t hooked;    /* bit `which` set: that projection goes to hook */
    gemm_hook hook;    /* NULL when hooked is 0 */
    int64_t dequant;   /* bit `which` set: a quantized projection goes to gemm_dequant_bf16 */
} step_tensors;

/* y = x @ W^T (+ bias) through the C kernels, or through the hook where the step says so */
static int project(const step_tensors *s, const layer_tensors *w, int64_t layer, int which,
                   const uint16_t *x, int64_t x_stride, const void *packed, const void *bias,
                   uint16_t *y, int64_t out, int64_t in) {
    if ((s->hooked >> which) & 1) return s->hook(layer, which) ? -5 : 0;
    if ((w->quantized >> which) & 1) {
        const int rc = (s->dequant >> which) & 1
            ? gemm_dequant_bf16(x, x_stride, packed, bias, y, out, s->tokens)
            : gemm_quant(x, x_stride, 1, packed, bias, y, out, s->tokens);
        return rc ? -6 : 0;
    }
    gemm_bf16(x, x_stride, packed, bias, y, out, s->tokens, out, in);
    return 0;
}

/* Returns 0; else where the first failing kernel stopped: -1 a pool row, -2 a position
 * (rope_store_kv: nothing of that layer written), -3 a slot or seq_len outside the table,
 * -4 sizes pool_attention does not take or out of memory, -5 the hook failed, -6 a quantized
 * projection failed (out of memory). */
int forward_layers(const layer_stack *m, const layer_tensors *layers, const step_tensors *s) {
    const int64_t n = s->tokens, q_size = m->q_heads * m->head_dim;
    const int64_t kv_size = m->kv_heads * m->head_dim, qkv_width = q_size + 2 * kv_size;
    uint16_t *hidden = s->hidden, *normed = s->normed, *qkv = s->qkv, *attn = s->attn;
    uint16_t *gate_up = s->gate_up, *act = s->act;
    for (int64_t l = 0; l < m->layers; l++) {
        const layer_tensors *w = &layers[l];
        if (l == 0) {   /* the embeddings start the residual stream */
            rms_norm(hidden, NULL, w->input_norm, normed, NULL, n, m->hidden, m->eps, 1);
            memcpy(s->residual, hidden, (size_t)(n * m->hidden) * sizeof(uint16_t));
        } else {
            rms_norm(hidden, s->residual, w->input_norm, normed, s->residual, n, m->hidden,
                     m->eps, 1);
        }
        int rc = project(s, w, l, PROJ_QKV, normed, m->hidden, w->qkv_proj, w->qkv_bias, qkv,
                         qkv_width, m->hidden);
        if (rc != 0) return rc;
        const new_qkv fresh = {qkv, qkv + q_size, qkv + q_size + kv_size, qkv_width, m->head_dim,
                               qkv_width, m->head_dim, qkv_width, m->head_dim, n, m->q_heads,
                               m->kv_heads, m->head_dim};
        const pool_rows pool = {w->k_cache, w->v_cache, m->row_stride, m->head_stride,
                                m->capacity, s->out_rows};
        const int stored = rope_store_kv(&fresh, &pool, m->cos_sin, m->max_positions,
                                         s->positions, 1);
        if (stored != 0) return stored;
        const int attended = pool_attention(
            qkv, qkv_width, m->head_dim, w->k_cache, w->v_cache, m->row_stride, m->head_stride, 1,
            m->req_to_token, m->table_columns, m->table_rows, m->table_columns, s->slots,
            s->seq_lens, (int)n, (int)m->q_heads, (int)m->kv_heads, (int)m->head_dim, m->scale,
            attn);
        if (attended != 0) return attended == -2 ? -3 : -4;
        rc = project(s, w, l, PROJ_O, attn, q_size, w->o_proj, NULL, hidden, m->hidden, q_size);
        if (rc != 0) return rc;
        rms_norm(hidden, s->residual, w->post_norm, normed, s->residual, n, m->hidden, m->eps, 1);
        rc = project(s, w, l, PROJ_GATE_UP, normed, m->hidden, w->gate_up_proj, NULL, gate_up,
                     2 * m->inter, m->hidden);
        if (rc != 0) return rc;
        silu_and_mul(gate_up, 2 * m->inter, act, n, m->inter, 1);
        rc = project(s, w, l, PROJ_DOWN, act, m->inter, w->down_proj, NULL, hidden, m->hidden,
                     m->inter);
        if (rc != 0) return rc;
    }
    return 0;
}
