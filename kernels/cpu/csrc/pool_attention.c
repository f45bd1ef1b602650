/* Attention of single query tokens over the token-level KV pool, for the CPU serving path.
 *
 * Each query token t attends to the first seq_lens[t] tokens of request slots[t]: pool rows
 * req_to_token[slots[t], 0 .. seq_lens[t]). A decode step has one query per request; a prefill
 * chunk can be written the same way (token i of a chunk after `prefix` cached tokens sees
 * prefix + i + 1 tokens). K/V rows are read where they lie in the pool: no gather, no copy.
 *
 * Work item = (query token, kv head): every query head of the group is done in the same pass
 * over the K/V rows. Scores and sums are fp32. With AVX512-BF16 and a bf16 pool, the tokens of
 * a prefill chunk go in row blocks instead (prefill_blocks.c, planned and run from here): many
 * query rows per pass over the keys. Built by kernels/cpu/native.py with -fopenmp against the
 * libgomp torch has loaded, so it runs on torch's OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "pool_attention.h"
#include "vec16.h"

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

/* ---- head_dim = 16 * CH, group <= MAX_VEC_GROUP: 16-float vectors (one AVX-512 register) -----
 * Scores for 16 keys at a time: a K row is loaded once and dotted with every query head of the
 * group (16-lane partial sums); each head's 16 partial-sum vectors are then folded into one
 * vector of 16 scores by a shuffle tree (no per-key horizontal sums). With AVX512-BF16 a bf16
 * pool is dotted in bf16 pairs with fp32 accumulation (vdpbf16ps: each product exact in fp32),
 * so K rows are never widened. exp is a vector polynomial. P.V: each V row is widened once and
 * multiply-added into group x CH register accumulators. */
#define MAX_VEC_GROUP 8
#define KEY_BLOCK 16
#define PREFETCH_KEYS 16   /* measured: 8-48 alike; into L2 (locality 1) beat L1 by ~1.4x */
#if defined(__AVX512F__)   /* vec16.h brought in immintrin.h */
static inline v16f madd(v16f a, v16f b, v16f c) {
    return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
#else
static inline v16f madd(v16f a, v16f b, v16f c) { return a * b + c; }
#endif
#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v16i){__VA_ARGS__})
#endif

/* a[i] -> lane i of the result holds the sum of a[i]'s 16 lanes */
static inline v16f fold16(const v16f *a) {
    v16f l1[8], l2[4], l3[2];
    for (int i = 0; i < 8; i++)   /* lanes: 8 partials of a[2i], then 8 of a[2i+1] */
        l1[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
              + SHUFFLE(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)   /* lanes: 4 partials of each of 4 keys */
        l2[i] = SHUFFLE(l1[2 * i], l1[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
              + SHUFFLE(l1[2 * i], l1[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)   /* lanes: 2 partials of each of 8 keys */
        l3[i] = SHUFFLE(l2[2 * i], l2[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
              + SHUFFLE(l2[2 * i], l2[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SHUFFLE(l3[0], l3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + SHUFFLE(l3[0], l3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* 16-lane partial dot products of one key row with each query head of the group. bf16_dot:
 * query and pool are bf16 and vdpbf16ps multiplies them in pairs; otherwise query is fp32. */
static inline __attribute__((always_inline)) void dot_key(
        const int G, const int CH, const int bf16_dot, const void *query, const void *k_cache,
        int is_bf16, int64_t base, v16f *partial /* [G][KEY_BLOCK], this key's column */) {
#if HAVE_BF16_DOT
    if (bf16_dot) {
        __m512i k[4];
        for (int w = 0; w < CH / 2; w++)
            k[w] = _mm512_loadu_si512((const uint16_t *)k_cache + base + 32 * w);
        for (int g = 0; g < G; g++) {
            const uint16_t *qg = (const uint16_t *)query + g * 16 * CH;
            __m512 acc = _mm512_setzero_ps();
            for (int w = 0; w < CH / 2; w++)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qg + 32 * w),
                                       (__m512bh)k[w]);
            partial[g * KEY_BLOCK] = (v16f)acc;
        }
        return;
    }
#endif
    (void)bf16_dot;
    v16f k[8];
    for (int c = 0; c < CH; c++) k[c] = load16(k_cache, base + 16 * c, is_bf16);
    for (int g = 0; g < G; g++) {
        const float *qg = (const float *)query + g * 16 * CH;
        v16f acc = splat(0.0f);
        for (int c = 0; c < CH; c++) {
            v16f q_part;
            memcpy(&q_part, qg + 16 * c, sizeof(q_part));
            acc = madd(q_part, k[c], acc);
        }
        partial[g * KEY_BLOCK] = acc;
    }
}

/* softmax numerators of s[0 .. n) in place (s has room up to padded; the tail becomes 0);
 * returns 1 / their sum */
static inline float softmax_block(float *s, int n, int padded) {
    for (int j = n; j < padded; j++) s[j] = -INFINITY;
    v16f peak_vec = splat(-INFINITY);
    for (int j = 0; j < padded; j += 16) {
        v16f block;
        memcpy(&block, s + j, sizeof(block));
        peak_vec = vmax(peak_vec, block);
    }
    const v16f peak = splat(max16(peak_vec));
    v16f total = splat(0.0f);
    for (int j = 0; j < padded; j += 16) {
        v16f block;
        memcpy(&block, s + j, sizeof(block));
        block = vexp(block - peak);
        memcpy(s + j, &block, sizeof(block));
        total += block;
    }
    const float sum = sum16(total);
    return sum > 0.0f ? 1.0f / sum : 0.0f;
}

/* one (query token, kv head) item. query: [G][16*CH], fp32 pre-scaled, or raw bf16 with
 * bf16_dot (then score_scale applies); scores: scratch of G * round_up(n_keys, 16) floats;
 * out: [G][16*CH] fp32 */
static inline __attribute__((always_inline)) void attend_item_vec(
        const int G, const int CH, const int bf16_dot, const void *query, float score_scale,
        const void *k_cache, const void *v_cache, int is_bf16, int64_t row_stride,
        int64_t head_offset, const int32_t *rows, int n_keys, float *scores, float *out) {
    const int padded = (n_keys + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;
    const int row_bytes = 16 * CH * (is_bf16 ? 2 : 4);
    const int64_t elem = is_bf16 ? 2 : 4;
    /* pass 1: scores[g][j] = q_g . k_j */
    for (int j0 = 0; j0 < n_keys; j0 += KEY_BLOCK) {
        v16f partial[MAX_VEC_GROUP * KEY_BLOCK];
        for (int jj = 0; jj < KEY_BLOCK; jj++) {
            const int j = j0 + jj;
            if (j >= n_keys) {
                for (int g = 0; g < G; g++) partial[g * KEY_BLOCK + jj] = splat(0.0f);
                continue;
            }
            if (j + PREFETCH_KEYS < n_keys) {   /* both rows of a key a few keys ahead */
                const int64_t ahead = ((int64_t)rows[j + PREFETCH_KEYS] * row_stride + head_offset) * elem;
                for (int byte = 0; byte < row_bytes; byte += 64) {
                    __builtin_prefetch((const char *)k_cache + ahead + byte, 0, 1);
                    __builtin_prefetch((const char *)v_cache + ahead + byte, 0, 1);
                }
            }
            dot_key(G, CH, bf16_dot, query, k_cache, is_bf16,
                    (int64_t)rows[j] * row_stride + head_offset, partial + jj);
        }
        for (int g = 0; g < G; g++) {
            const v16f block = fold16(partial + g * KEY_BLOCK) * splat(score_scale);
            memcpy(scores + (int64_t)g * padded + j0, &block, sizeof(block));
        }
    }
    float inv_sum[MAX_VEC_GROUP];
    for (int g = 0; g < G; g++) inv_sum[g] = softmax_block(scores + (int64_t)g * padded, n_keys, padded);
    /* pass 2: out_g = sum_j p[g][j] v_j / sum_g */
    v16f acc[MAX_VEC_GROUP][8];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < CH; c++) acc[g][c] = splat(0.0f);
    for (int j = 0; j < n_keys; j++) {
        const int64_t base = (int64_t)rows[j] * row_stride + head_offset;
        v16f v[8];
        for (int c = 0; c < CH; c++) v[c] = load16(v_cache, base + 16 * c, is_bf16);
        for (int g = 0; g < G; g++) {
            const v16f weight = splat(scores[(int64_t)g * padded + j]);
            for (int c = 0; c < CH; c++) acc[g][c] = madd(weight, v[c], acc[g][c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < CH; c++) {
            const v16f scaled = acc[g][c] * splat(inv_sum[g]);
            memcpy(out + (g * CH + c) * 16, &scaled, sizeof(scaled));
        }
}

/* the specializations the dispatcher picks from: group 1..MAX_VEC_GROUP x head_dim 64/128,
 * each with fp32 queries (any pool) and bf16 pair dot products (bf16 pool, AVX512-BF16 only) */
typedef void (*attend_vec_fn)(const void *, float, const void *, const void *, int, int64_t,
                              int64_t, const int32_t *, int, float *, float *);
#define DEFINE_VEC(G, CH, DOT)                                                                     \
static void attend_vec_##G##_##CH##_##DOT(const void *query, float score_scale,                    \
        const void *k_cache, const void *v_cache, int is_bf16, int64_t row_stride,                 \
        int64_t head_offset, const int32_t *rows, int n_keys, float *scores, float *out) {         \
    attend_item_vec(G, CH, DOT, query, score_scale, k_cache, v_cache, is_bf16, row_stride,         \
                    head_offset, rows, n_keys, scores, out);                                       \
}
#define DEFINE_VEC_GROUPS(CH, DOT) DEFINE_VEC(1, CH, DOT) DEFINE_VEC(2, CH, DOT)                   \
    DEFINE_VEC(3, CH, DOT) DEFINE_VEC(4, CH, DOT) DEFINE_VEC(5, CH, DOT) DEFINE_VEC(6, CH, DOT)    \
    DEFINE_VEC(7, CH, DOT) DEFINE_VEC(8, CH, DOT)
#define VEC_TABLE(CH, DOT) {                                                                       \
    attend_vec_1_##CH##_##DOT, attend_vec_2_##CH##_##DOT, attend_vec_3_##CH##_##DOT,               \
    attend_vec_4_##CH##_##DOT, attend_vec_5_##CH##_##DOT, attend_vec_6_##CH##_##DOT,               \
    attend_vec_7_##CH##_##DOT, attend_vec_8_##CH##_##DOT}
DEFINE_VEC_GROUPS(4, 0)   /* head_dim 64 */
DEFINE_VEC_GROUPS(8, 0)   /* head_dim 128 */
static const attend_vec_fn VEC_64[MAX_VEC_GROUP] = VEC_TABLE(4, 0);
static const attend_vec_fn VEC_128[MAX_VEC_GROUP] = VEC_TABLE(8, 0);
#if HAVE_BF16_DOT
DEFINE_VEC_GROUPS(4, 1)
DEFINE_VEC_GROUPS(8, 1)
static const attend_vec_fn DOT_64[MAX_VEC_GROUP] = VEC_TABLE(4, 1);
static const attend_vec_fn DOT_128[MAX_VEC_GROUP] = VEC_TABLE(8, 1);
#endif

static attend_vec_fn pick_vec(int group, int head_dim, int is_bf16, int *bf16_dot) {
    *bf16_dot = 0;
    if (group > MAX_VEC_GROUP || (head_dim != 64 && head_dim != 128)) return NULL;
#if HAVE_BF16_DOT
    if (is_bf16) {
        *bf16_dot = 1;
        return (head_dim == 64 ? DOT_64 : DOT_128)[group - 1];
    }
#endif
    (void)is_bf16;
    return (head_dim == 64 ? VEC_64 : VEC_128)[group - 1];
}

/* Returns 0; -1 for unsupported sizes or out of memory; -2 when a slot or seq_len lies outside
 * the table (nothing read then). out is contiguous, in q's dtype. */
int pool_attention(const void *q,              /* [tokens, q_heads, head_dim], q dtype = pool's */
                   int64_t q_token_stride,     /* elements between tokens of q */
                   int64_t q_head_stride,      /* elements between heads of q */
                   const void *k_cache,        /* [capacity, kv_heads, head_dim] */
                   const void *v_cache,        /* same layout as k_cache */
                   int64_t row_stride,         /* elements between pool rows (k and v) */
                   int64_t head_stride,        /* elements between heads of a pool row */
                   int is_bf16,                /* 1: q and pool are bf16, 0: fp32 */
                   const int32_t *req_to_token,/* [table_rows, table_columns] */
                   int64_t table_width,        /* elements between rows of req_to_token */
                   int64_t table_rows,         /* slots must lie in [0, table_rows) */
                   int64_t table_columns,      /* seq_lens must be <= table_columns */
                   const int32_t *slots,       /* [tokens] table row of each query token */
                   const int32_t *seq_lens,    /* [tokens] visible keys of each query token */
                   int tokens, int q_heads, int kv_heads, int head_dim, float scale,
                   void *out)                  /* [tokens, q_heads, head_dim], q's dtype */
{
    const int group = q_heads / kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || group * kv_heads != q_heads) return -1;
    int bf16_dot;
    const attend_vec_fn vec = pick_vec(group, head_dim, is_bf16, &bf16_dot);
    int max_keys = 1;
    for (int t = 0; t < tokens; t++) {
        if (slots[t] < 0 || slots[t] >= table_rows || seq_lens[t] > table_columns) return -2;
        max_keys = seq_lens[t] > max_keys ? seq_lens[t] : max_keys;
    }
    /* scores scratch: the vector path keeps every head of the group, padded to KEY_BLOCK */
    const size_t scratch = (size_t)group * (size_t)((max_keys + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK);
    int failed = 0;
    prefill_plan plan = {NULL, NULL, 0};   /* prefill runs in row blocks (AVX512-BF16, bf16 pool) */
    const uint8_t *in_block = NULL;        /* [tokens] 1: the token's rows are in a block */
#if HAVE_BF16_DOT
    if (bf16_dot && prefill_blocks_plan(slots, seq_lens, tokens, group, &plan) != 0) return -1;
    in_block = plan.in_block;
    const bf16_pool_call call = {
        (const uint16_t *)q, q_token_stride, q_head_stride, (const uint16_t *)k_cache,
        (const uint16_t *)v_cache, row_stride, head_stride, req_to_token, table_width, slots,
        seq_lens, q_heads, kv_heads, head_dim, scale, (uint16_t *)out};
#endif
    #pragma omp parallel
    {
#if HAVE_BF16_DOT
        if (plan.count > 0 && prefill_blocks_attend(&plan, &call) != 0) {
            #pragma omp atomic write
            failed = 1;
        }
#endif
        float *scores = (float *)malloc(sizeof(float) * scratch);
        float query[MAX_GROUP * MAX_HEAD_DIM];          /* fp32, pre-scaled */
        uint16_t query_bf16[MAX_GROUP * MAX_HEAD_DIM];  /* as stored, for bf16_dot */
        float result[MAX_GROUP * MAX_HEAD_DIM];         /* one item's output heads, fp32 */
        if (scores == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 2)
        for (int64_t item = 0; item < (int64_t)tokens * kv_heads; item++) {
            if (scores == NULL) continue;
            const int t = (int)(item / kv_heads), h = (int)(item % kv_heads);
            if (in_block != NULL && in_block[t]) continue;
            const int64_t dst = ((int64_t)t * q_heads + (int64_t)h * group) * head_dim;
            const int n_keys = seq_lens[t];
            if (n_keys <= 0) {
                memset((char *)out + dst * (is_bf16 ? 2 : 4), 0,
                       (size_t)(group * head_dim) * (is_bf16 ? 2 : 4));
                continue;
            }
            for (int g = 0; g < group; g++) {
                const int64_t offset = (int64_t)t * q_token_stride + (int64_t)(h * group + g) * q_head_stride;
                if (bf16_dot) {
                    memcpy(query_bf16 + g * head_dim, (const uint16_t *)q + offset,
                           sizeof(uint16_t) * (size_t)head_dim);
                } else {
                    load_row(q, offset, is_bf16, head_dim, query + g * head_dim);
                    for (int i = 0; i < head_dim; i++) query[g * head_dim + i] *= scale;
                }
            }
            const int32_t *rows = req_to_token + (int64_t)slots[t] * table_width;
            const int64_t head_offset = (int64_t)h * head_stride;
            if (vec != NULL)
                vec(bf16_dot ? (const void *)query_bf16 : (const void *)query,
                    bf16_dot ? scale : 1.0f, k_cache, v_cache, is_bf16, row_stride, head_offset,
                    rows, n_keys, scores, result);
            else
                attend_item_any(query, k_cache, v_cache, is_bf16, row_stride, head_offset, rows,
                                n_keys, group, head_dim, scores, result);
            store_row(result, out, dst, is_bf16, group * head_dim);
        }
        free(scores);
    }
    prefill_plan_free(&plan);
    return failed ? -1 : 0;
}
