/* Attention of single query tokens over the token-level KV pool, for the CPU serving path.
 *
 * Each query token t attends to the first seq_lens[t] tokens of request slots[t]: pool rows
 * req_to_token[slots[t], 0 .. seq_lens[t]). A decode step has one query per request; a prefill
 * chunk can be written the same way (token i of a chunk after `prefix` cached tokens sees
 * prefix + i + 1 tokens). K/V rows are read where they lie in the pool: no gather, no copy.
 *
 * Work item = (query token, kv head), one query head at a time: the K/V rows it reads stay in
 * L1 for the group's next head. Scores are kept in fp32; bf16 inputs are widened on load. Built by kernels/cpu_native.py
 * with -fopenmp against the libgomp torch has loaded, so it runs on torch's OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

static inline float bf16_to_float(uint16_t bits) {
    union { uint32_t u; float f; } value;
    value.u = (uint32_t)bits << 16;
    return value.f;
}

/* load one head row (head_dim values) as fp32 */
static inline void load_row(const void *base, int64_t offset, int is_bf16, int head_dim,
                            float *dst) {
    if (is_bf16) {
        const uint16_t *src = (const uint16_t *)base + offset;
        #pragma omp simd
        for (int i = 0; i < head_dim; i++) dst[i] = bf16_to_float(src[i]);
    } else {
        memcpy(dst, (const float *)base + offset, sizeof(float) * (size_t)head_dim);
    }
}

/* softmax of s[0 .. n) in place; returns the sum of the exponentials (0 when n == 0) */
static inline float softmax_unnormalized(float *s, int n) {
    float peak = -INFINITY;
    for (int j = 0; j < n; j++) peak = s[j] > peak ? s[j] : peak;
    float sum = 0.0f;
    for (int j = 0; j < n; j++) { s[j] = expf(s[j] - peak); sum += s[j]; }
    return sum;
}

/* Any head_dim: one (query token, kv head) item. query: [group, head_dim] fp32, pre-scaled;
 * rows: pool row of each visible key; scores: scratch [n_keys]; out: [group, head_dim]. */
static void attend_item_any(const float *query, const void *k_cache, const void *v_cache,
                            int is_bf16, int64_t row_stride, int64_t head_offset,
                            const int32_t *rows, int n_keys, int group, int head_dim,
                            float *scores, float *out) {
    float row[MAX_HEAD_DIM];
    for (int g = 0; g < group; g++) {
        const float *qg = query + g * head_dim;
        for (int j = 0; j < n_keys; j++) {
            load_row(k_cache, (int64_t)rows[j] * row_stride + head_offset, is_bf16, head_dim, row);
            float dot = 0.0f;
            #pragma omp simd reduction(+:dot)
            for (int i = 0; i < head_dim; i++) dot += qg[i] * row[i];
            scores[j] = dot;
        }
        const float sum = softmax_unnormalized(scores, n_keys);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        float *og = out + g * head_dim;
        memset(og, 0, sizeof(float) * (size_t)head_dim);
        for (int j = 0; j < n_keys; j++) {
            load_row(v_cache, (int64_t)rows[j] * row_stride + head_offset, is_bf16, head_dim, row);
            const float weight = scores[j] * inv;
            #pragma omp simd
            for (int i = 0; i < head_dim; i++) og[i] += weight * row[i];
        }
    }
}

/* head_dim = 16 * CHUNKS: 16-float vectors (one AVX-512 register), accumulators in registers */
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static inline v16f load16(const void *base, int64_t offset, int is_bf16) {
    v16f out;
    if (is_bf16) {
        v16h half;
        memcpy(&half, (const uint16_t *)base + offset, sizeof(half));
        v16u wide = __builtin_convertvector(half, v16u) << 16;
        memcpy(&out, &wide, sizeof(out));
    } else {
        memcpy(&out, (const float *)base + offset, sizeof(out));
    }
    return out;
}

static inline float sum16(v16f v) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

#define DEFINE_ATTEND_ITEM(CHUNKS)                                                              \
static void attend_item_##CHUNKS(const float *query, const void *k_cache, const void *v_cache,  \
                                 int is_bf16, int64_t row_stride, int64_t head_offset,           \
                                 const int32_t *rows, int n_keys, int group, float *scores,       \
                                 float *out) {                                                   \
    for (int g = 0; g < group; g++) {                                                            \
        v16f q_vec[CHUNKS];                                                                      \
        memcpy(q_vec, query + g * 16 * CHUNKS, sizeof(q_vec));                                   \
        for (int j = 0; j < n_keys; j++) {                                                       \
            const int64_t base = (int64_t)rows[j] * row_stride + head_offset;                    \
            v16f acc = q_vec[0] * load16(k_cache, base, is_bf16);                                \
            for (int c = 1; c < CHUNKS; c++) acc += q_vec[c] * load16(k_cache, base + 16 * c, is_bf16); \
            scores[j] = sum16(acc);                                                              \
        }                                                                                        \
        const float sum = softmax_unnormalized(scores, n_keys);                                  \
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;                                        \
        v16f acc[CHUNKS];                                                                        \
        for (int c = 0; c < CHUNKS; c++) acc[c] = (v16f){0};                                     \
        for (int j = 0; j < n_keys; j++) {                                                       \
            const int64_t base = (int64_t)rows[j] * row_stride + head_offset;                    \
            const float weight = scores[j] * inv;                                                \
            for (int c = 0; c < CHUNKS; c++) acc[c] += weight * load16(v_cache, base + 16 * c, is_bf16); \
        }                                                                                        \
        memcpy(out + g * 16 * CHUNKS, acc, sizeof(acc));                                         \
    }                                                                                            \
}
DEFINE_ATTEND_ITEM(4)   /* head_dim 64 */
DEFINE_ATTEND_ITEM(8)   /* head_dim 128 */

/* Returns 0, or -1 for unsupported sizes / out of memory. out is fp32 and contiguous. */
int pool_attention(const void *q,              /* [tokens, q_heads, head_dim], q dtype = pool's */
                   int64_t q_token_stride,     /* elements between tokens of q */
                   int64_t q_head_stride,      /* elements between heads of q */
                   const void *k_cache,        /* [capacity, kv_heads, head_dim] */
                   const void *v_cache,        /* same layout as k_cache */
                   int64_t row_stride,         /* elements between pool rows (k and v) */
                   int64_t head_stride,        /* elements between heads of a pool row */
                   int is_bf16,                /* 1: q and pool are bf16, 0: fp32 */
                   const int32_t *req_to_token,/* [max_requests, table_width] */
                   int64_t table_width,        /* elements between rows of req_to_token */
                   const int32_t *slots,       /* [tokens] table row of each query token */
                   const int32_t *seq_lens,    /* [tokens] visible keys of each query token */
                   int tokens, int q_heads, int kv_heads, int head_dim, float scale,
                   float *out)                 /* [tokens, q_heads, head_dim] fp32 */
{
    const int group = q_heads / kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || group * kv_heads != q_heads) return -1;
    int max_keys = 1;
    for (int t = 0; t < tokens; t++) max_keys = seq_lens[t] > max_keys ? seq_lens[t] : max_keys;
    int failed = 0;
    #pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)max_keys);
        float query[MAX_GROUP * MAX_HEAD_DIM];
        if (scores == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < (int64_t)tokens * kv_heads; item++) {
            if (scores == NULL) continue;
            const int t = (int)(item / kv_heads), h = (int)(item % kv_heads);
            float *dst = out + ((int64_t)t * q_heads + (int64_t)h * group) * head_dim;
            const int n_keys = seq_lens[t];
            if (n_keys <= 0) {
                memset(dst, 0, sizeof(float) * (size_t)(group * head_dim));
                continue;
            }
            for (int g = 0; g < group; g++) {
                const int64_t offset = (int64_t)t * q_token_stride + (int64_t)(h * group + g) * q_head_stride;
                load_row(q, offset, is_bf16, head_dim, query + g * head_dim);
                for (int i = 0; i < head_dim; i++) query[g * head_dim + i] *= scale;
            }
            const int32_t *rows = req_to_token + (int64_t)slots[t] * table_width;
            const int64_t head_offset = (int64_t)h * head_stride;
            if (head_dim == 64)
                attend_item_4(query, k_cache, v_cache, is_bf16, row_stride, head_offset, rows,
                              n_keys, group, scores, dst);
            else if (head_dim == 128)
                attend_item_8(query, k_cache, v_cache, is_bf16, row_stride, head_offset, rows,
                              n_keys, group, scores, dst);
            else
                attend_item_any(query, k_cache, v_cache, is_bf16, row_stride, head_offset, rows,
                                n_keys, group, head_dim, scores, dst);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
