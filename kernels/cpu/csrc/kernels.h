/* The C kernels' entry points, shared by their sources and by forward_layers.c. */
#ifndef LLMSERVE_KERNELS_H
#define LLMSERVE_KERNELS_H

#include <stdint.h>

/* Where one step's new q, k, v lie: views of [tokens, heads, head_dim] with unit last stride. */
typedef struct {
    void *q, *k;
    const void *v;
    int64_t q_token_stride, q_head_stride, k_token_stride, k_head_stride;
    int64_t v_token_stride, v_head_stride;
    int64_t tokens, q_heads, kv_heads, head_dim;
} new_qkv;

/* Where they go: the pool [capacity, kv_heads, head_dim] (k and v share strides) at rows. */
typedef struct {
    void *k_cache, *v_cache;
    int64_t row_stride, head_stride, capacity;
    const int64_t *rows;
} pool_rows;

void rms_norm(const void *x, const void *residual, const void *weight, void *out, void *sum_out,
              int64_t rows, int64_t hidden, float eps, int is_bf16);
int rope_store_kv(const new_qkv *n, const pool_rows *p, const float *cos_sin,
                  int64_t max_positions, const int64_t *positions, int is_bf16);
void silu_and_mul(const void *x, int64_t row_stride, void *out, int64_t rows, int64_t inter,
                  int is_bf16);
int pool_attention(const void *q, int64_t q_token_stride, int64_t q_head_stride,
                   const void *k_cache, const void *v_cache, int64_t row_stride,
                   int64_t head_stride, int is_bf16, const int32_t *req_to_token,
                   int64_t table_width, int64_t table_rows, int64_t table_columns,
                   const int32_t *slots, const int32_t *seq_lens, int tokens, int q_heads,
                   int kv_heads, int head_dim, float scale, void *out);
/* writes blocks [block, block + blocks) of a weight in gemm_bf16's packed layout into panel */
typedef void (*panel_source)(const void *context, int64_t block, int blocks, uint16_t *panel);

/* A weight-only quantized [out, in] weight packed for csrc/gemm_quant.c (layout there). */
enum { QUANT_INT8 = 0, QUANT_INT4 = 1 };
typedef struct {
    int64_t kind;               /* QUANT_INT8 or QUANT_INT4 */
    int64_t group;              /* input features per scale: 32 or 64 */
    int64_t out, in;            /* out % 16 == 0, in % group == 0 */
    const uint8_t *data;        /* [out / 16, in / 4 (int8, + 128) or in / 8 (int4), 64] */
    const uint16_t *scales;     /* fp16 [out / 16, in / group, 16], times 2^shift */
    const uint16_t *offsets;    /* fp16, as scales (int4), or NULL (int8; int4 with -8 scale) */
    float unscale;              /* 2^-shift */
} quant_weight;

int gemm_bf16_available(void);
int gemm_bf16_panels(const uint16_t *x, int64_t x_row_stride, const uint16_t *packed,
                     panel_source source, const void *context, const uint16_t *bias,
                     uint16_t *y, int64_t y_row_stride, int64_t rows_total, int64_t out,
                     int64_t in);
int gemm_bf16(const uint16_t *x, int64_t x_row_stride, const uint16_t *packed,
              const uint16_t *bias, uint16_t *y, int64_t y_row_stride, int64_t rows_total,
              int64_t out, int64_t in);
int gemm_quant_available(void);
int gemm_quant(const void *x, int64_t x_row_stride, int is_bf16, const quant_weight *w,
               const void *bias, void *y, int64_t y_row_stride, int64_t rows_total);
int gemm_dequant_available(void);
int gemm_dequant_bf16(const uint16_t *x, int64_t x_row_stride, const quant_weight *w,
                      const uint16_t *bias, uint16_t *y, int64_t y_row_stride, int64_t rows);
int dequantize_weight(const quant_weight *w, void *out, int is_bf16);
int quantize_rows(const void *x, int64_t x_row_stride, int is_bf16, int64_t rows, int64_t in,
                  int64_t group, float unscale, int8_t *q, float *scale, int32_t *sum);

#endif
