/* Attention of single query tokens over the token-level KV pool, for the CPU serving path.
 *
 * Each query token t attends to the first seq_lens[t] tokens of request slots[t]: pool rows
 * req_to_token[slots[t], 0 .. seq_lens[t]). A decode step has one query per request; a prefill
 * chunk can be written the same way (token i of a chunk after `prefix` cached tokens sees
 * prefix + i + 1 tokens). K/V rows are read where they lie in the pool: no gather, no copy.
 *
 * Work item = (query token, kv head): every query head of the group is done in the same pass
 * over the K/V rows. Scores and sums are fp32. With AVX512-BF16 and a bf16 pool, the tokens of
 * a prefill chunk go in row blocks instead (the section "prefill: blocks of query rows"): many
 * query rows per pass over the keys. Built by kernels/cpu/native.py with -fopenmp against the
 * libgomp torch has loaded, so it runs on torch's OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "vec16.h"

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

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

/* n fp32 values to out + offset (elements) in the output dtype (bf16: round to nearest even) */
static inline void store_row(const float *values, void *out, int64_t offset, int is_bf16, int n) {
    int i = 0;
    if (is_bf16) {
        for (; i + 16 <= n; i += 16) {
            v16f block;
            memcpy(&block, values + i, sizeof(block));
            store16(out, offset + i, 1, block);
        }
        for (; i < n; i++) {   /* head_dim not a multiple of 16: the rest one at a time */
            v16f one = splat(values[i]);
            const v16h half = narrow16(one);
            ((uint16_t *)out)[offset + i] = half[0];
        }
    } else {
        memcpy((float *)out + offset, values, sizeof(float) * (size_t)n);
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
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_BF16_DOT 1
#else
#define HAVE_BF16_DOT 0
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

/* ---- prefill: blocks of query rows over shared keys (AVX512-BF16) ---------------------------
 * The new tokens of one request's chunk are consecutive query tokens of one slot, token i
 * seeing n0 + i keys: a run. Its query rows (token, head of the group) are cut into blocks of
 * BLOCK_ROWS, and one work item is (block, kv head). The rows sit in the lanes of ROW_VECS
 * vectors: each K pair is broadcast once for 16 rows (vdpbf16ps, no horizontal sums) and the
 * softmax is lane-wise. Keys go by tiles of KEY_TILE with an online softmax (running max and
 * sum per row; the output sums rescaled when a row's max grows). P.V runs in bf16 pairs too:
 * the tile's probabilities are rounded to bf16 (as torch's SDPA does for bf16), V rows are
 * interleaved in key pairs once per tile; sums stay fp32. A row's result depends only on its
 * own query and keys, not on the rows it shares a block with nor on how its prompt was chunked.
 * Runs shorter than MIN_RUN_TOKENS, decode tokens and other sizes take the per-token path.
 * Measured on the 2-core EPYC (Zen 4), 9 q / 3 kv heads, d 64: a 2048-token chunk 72 -> 32 ms
 * per layer on one core; a cold 2,670-token prefill's attention 2.5 -> 1.0 s on two. ROW_VECS
 * 2 or 3 and KEY_TILE 32 or 64 (-D to try others) timed within 5% of each other there. */
/* a prefill run handled in row blocks (used where HAVE_BF16_DOT; declared for every build) */
typedef struct { int32_t t0, tokens, r0; } row_block;   /* run's first token, its length, row */
#if HAVE_BF16_DOT
#ifndef ROW_VECS
#define ROW_VECS 3
#endif
#define BLOCK_ROWS (16 * ROW_VECS)
#ifndef KEY_TILE
#define KEY_TILE 64
#endif
#define KEY_STEP 8            /* keys whose scores are summed together */
#define D_STEP 8              /* output dims accumulated together in P.V */
#define MIN_RUN_TOKENS 4


typedef struct {   /* one thread's scratch for attend_block, 64-byte aligned */
    uint32_t q[ROW_VECS][MAX_HEAD_DIM / 2][16];   /* bf16 query pairs, rows in lanes */
    float s[KEY_TILE][ROW_VECS][16];              /* a tile's scores, then probabilities */
    uint32_t p[KEY_TILE / 2][ROW_VECS][16];       /* bf16 probabilities of key pairs */
    uint32_t v[KEY_TILE / 2][MAX_HEAD_DIM];       /* bf16 V of key pairs, per dimension */
    float o[ROW_VECS][MAX_HEAD_DIM][16];          /* output sums, rows in lanes */
} block_scratch;

/* exp(x) for x <= 0 (softmax terms) within ~3e-7: 2^(x log2 e) by a degree-5 polynomial on
 * [-1/2, 1/2] and vscalefps; below -100 (and -inf) gives 0 */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.3266971e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6754599e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507425e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022122e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314694e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* scores of NK keys (pool rows rows[0 .. NK)) for the block's rows into s[0 .. NK) */
static inline __attribute__((always_inline)) void block_scores(
        const int CH, const int NK, const block_scratch *w, const uint16_t *k_cache,
        int64_t row_stride, int64_t head_offset, const int32_t *rows, float scale,
        float (*s)[ROW_VECS][16]) {
    const uint32_t *key[KEY_STEP];
    for (int j = 0; j < NK; j++)
        key[j] = (const uint32_t *)(k_cache + (int64_t)rows[j] * row_stride + head_offset);
    __m512 acc[ROW_VECS][KEY_STEP];
    for (int r = 0; r < ROW_VECS; r++)
        for (int j = 0; j < NK; j++) acc[r][j] = _mm512_setzero_ps();
    for (int p = 0; p < 8 * CH; p++) {
        __m512i query[ROW_VECS];
        for (int r = 0; r < ROW_VECS; r++) query[r] = _mm512_load_si512(w->q[r][p]);
        for (int j = 0; j < NK; j++) {
            const __m512i pair = _mm512_set1_epi32((int)key[j][p]);
            for (int r = 0; r < ROW_VECS; r++)
                acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)query[r], (__m512bh)pair);
        }
    }
    for (int j = 0; j < NK; j++)
        for (int r = 0; r < ROW_VECS; r++)
            _mm512_store_ps(s[j][r], _mm512_mul_ps(acc[r][j], _mm512_set1_ps(scale)));
}

/* one tile's scores -> probabilities as bf16 key pairs in w->p (rows not seeing a key: 0); the
 * running max m and sum l per row updated, the output sums rescaled where a max grew */
static inline __attribute__((always_inline)) void block_softmax(
        const int CH, block_scratch *w, int tile_keys, int first_key, int fewest_keys,
        const __m512i *visible, __m512 *m, __m512 *l) {
    const int all_see = fewest_keys - first_key;   /* keys before this one: every row sees */
    for (int j = all_see > 0 ? all_see : 0; j < tile_keys; j++)
        for (int r = 0; r < ROW_VECS; r++) {
            const __mmask16 hidden = _mm512_cmple_epi32_mask(visible[r],
                                                             _mm512_set1_epi32(first_key + j));
            _mm512_store_ps(w->s[j][r], _mm512_mask_mov_ps(_mm512_load_ps(w->s[j][r]), hidden,
                                                           _mm512_set1_ps(-INFINITY)));
        }
    const __m512i pair_words = _mm512_set_epi16(   /* dword i = (word i, word 16 + i) */
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int r = 0; r < ROW_VECS; r++) {
        __m512 peak = m[r];
        for (int j = 0; j < tile_keys; j++) peak = _mm512_max_ps(peak, _mm512_load_ps(w->s[j][r]));
        __m512 total = _mm512_setzero_ps();
        for (int j = 0; j < tile_keys; j += 2) {
            const __m512 even = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(w->s[j][r]), peak));
            const __m512 odd = j + 1 < tile_keys
                ? exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(w->s[j + 1][r]), peak))
                : _mm512_setzero_ps();
            total = _mm512_add_ps(total, _mm512_add_ps(even, odd));
            const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(odd, even);   /* even low */
            _mm512_store_si512(w->p[j / 2][r], _mm512_permutexvar_epi16(pair_words, halves));
        }
        const __m512 rescale = exp_nonpositive(_mm512_sub_ps(m[r], peak));   /* 0 at first */
        l[r] = _mm512_fmadd_ps(l[r], rescale, total);
        const __mmask16 grew = _mm512_cmp_ps_mask(peak, m[r], _CMP_GT_OQ);
        m[r] = peak;
        if (grew == 0) continue;
        for (int d = 0; d < 16 * CH; d++)
            _mm512_store_ps(w->o[r][d], _mm512_mul_ps(_mm512_load_ps(w->o[r][d]), rescale));
    }
}

/* the tile's V rows as bf16 key pairs: w->v[jp][d] = (V[2 jp][d], V[2 jp + 1][d]) */
static inline __attribute__((always_inline)) void block_pack_values(
        const int CH, block_scratch *w, const uint16_t *v_cache, int64_t row_stride,
        int64_t head_offset, const int32_t *rows, int tile_keys) {
    const __m512i low = _mm512_set_epi16(   /* dword i = (x word i, y word i), i < 16 */
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));   /* i = 16 .. 31 */
    for (int j = 0; j < tile_keys; j += 2) {
        const uint16_t *even = v_cache + (int64_t)rows[j] * row_stride + head_offset;
        const uint16_t *odd = j + 1 < tile_keys
            ? v_cache + (int64_t)rows[j + 1] * row_stride + head_offset : NULL;
        for (int c = 0; c < CH / 2; c++) {   /* 32 dimensions at a time */
            const __m512i x = _mm512_loadu_si512(even + 32 * c);
            const __m512i y = odd != NULL ? _mm512_loadu_si512(odd + 32 * c)
                                          : _mm512_setzero_si512();
            _mm512_store_si512(w->v[j / 2] + 32 * c, _mm512_permutex2var_epi16(x, low, y));
            _mm512_store_si512(w->v[j / 2] + 32 * c + 16, _mm512_permutex2var_epi16(x, high, y));
        }
    }
}

/* o += P . V over the tile's key pairs */
static inline __attribute__((always_inline)) void block_values(const int CH, block_scratch *w,
                                                               int tile_keys) {
    const int pairs = (tile_keys + 1) / 2;
    for (int d0 = 0; d0 < 16 * CH; d0 += D_STEP) {
        __m512 acc[ROW_VECS][D_STEP];
        for (int r = 0; r < ROW_VECS; r++)
            for (int d = 0; d < D_STEP; d++) acc[r][d] = _mm512_load_ps(w->o[r][d0 + d]);
        for (int jp = 0; jp < pairs; jp++) {
            __m512i prob[ROW_VECS];
            for (int r = 0; r < ROW_VECS; r++) prob[r] = _mm512_load_si512(w->p[jp][r]);
            for (int d = 0; d < D_STEP; d++) {
                const __m512i value = _mm512_set1_epi32((int)w->v[jp][d0 + d]);
                for (int r = 0; r < ROW_VECS; r++)
                    acc[r][d] = _mm512_dpbf16_ps(acc[r][d], (__m512bh)prob[r], (__m512bh)value);
            }
        }
        for (int r = 0; r < ROW_VECS; r++)
            for (int d = 0; d < D_STEP; d++) _mm512_store_ps(w->o[r][d0 + d], acc[r][d]);
    }
}

/* one (row block, kv head) item; q, out: [tokens, q_heads, head_dim] bf16 (out contiguous) */
static inline __attribute__((always_inline)) void attend_block(
        const int CH, block_scratch *w, row_block block, int h, int group, int q_heads,
        const uint16_t *q, int64_t q_token_stride, int64_t q_head_stride,
        const uint16_t *k_cache, const uint16_t *v_cache, int64_t row_stride, int64_t head_stride,
        const int32_t *rows, const int32_t *seq_lens, float scale, uint16_t *out) {
    const int head_dim = 16 * CH, last_row = block.tokens * group - 1;
    int fewest = INT32_MAX, most = 0;
    int32_t visible_keys[BLOCK_ROWS];
    for (int lane = 0; lane < BLOCK_ROWS; lane++) {   /* lanes past the run repeat its last row */
        const int row = block.r0 + lane < last_row ? block.r0 + lane : last_row;
        const int t = block.t0 + row / group, g = row % group;
        const uint32_t *src = (const uint32_t *)(q + t * q_token_stride
                                                 + (int64_t)(h * group + g) * q_head_stride);
        for (int p = 0; p < 8 * CH; p++) w->q[lane / 16][p][lane % 16] = src[p];
        visible_keys[lane] = seq_lens[t];
        fewest = seq_lens[t] < fewest ? seq_lens[t] : fewest;
        most = seq_lens[t] > most ? seq_lens[t] : most;
    }
    __m512i visible[ROW_VECS];
    __m512 m[ROW_VECS], l[ROW_VECS];
    for (int r = 0; r < ROW_VECS; r++) {
        visible[r] = _mm512_loadu_si512(visible_keys + 16 * r);
        m[r] = _mm512_set1_ps(-INFINITY);
        l[r] = _mm512_setzero_ps();
    }
    memset(w->o, 0, sizeof(w->o));
    const int64_t head_offset = (int64_t)h * head_stride;
    for (int first = 0; first < most; first += KEY_TILE) {
        const int tile_keys = most - first < KEY_TILE ? most - first : KEY_TILE;
        int j = 0;
        for (; j + KEY_STEP <= tile_keys; j += KEY_STEP)
            block_scores(CH, KEY_STEP, w, k_cache, row_stride, head_offset, rows + first + j,
                         scale, w->s + j);
        for (; j < tile_keys; j++)
            block_scores(CH, 1, w, k_cache, row_stride, head_offset, rows + first + j, scale,
                         w->s + j);
        block_softmax(CH, w, tile_keys, first, fewest, visible, m, l);
        block_pack_values(CH, w, v_cache, row_stride, head_offset, rows + first, tile_keys);
        block_values(CH, w, tile_keys);
    }
    for (int lane = 0; lane < BLOCK_ROWS && block.r0 + lane <= last_row; lane++) {
        const int row = block.r0 + lane, r = lane / 16, t = block.t0 + row / group;
        float sums[16];
        _mm512_storeu_ps(sums, l[r]);
        const float inv = 1.0f / sums[lane % 16];
        float result[MAX_HEAD_DIM];
        for (int d = 0; d < head_dim; d++) result[d] = w->o[r][d][lane % 16] * inv;
        store_row(result, out, ((int64_t)t * q_heads + h * group + row % group) * head_dim, 1,
                  head_dim);
    }
}

static void attend_block_64(block_scratch *w, row_block block, int h, int group, int q_heads,
                            const uint16_t *q, int64_t q_token_stride, int64_t q_head_stride,
                            const uint16_t *k_cache, const uint16_t *v_cache, int64_t row_stride,
                            int64_t head_stride, const int32_t *rows, const int32_t *seq_lens,
                            float scale, uint16_t *out) {
    attend_block(4, w, block, h, group, q_heads, q, q_token_stride, q_head_stride, k_cache,
                 v_cache, row_stride, head_stride, rows, seq_lens, scale, out);
}

static void attend_block_128(block_scratch *w, row_block block, int h, int group, int q_heads,
                             const uint16_t *q, int64_t q_token_stride, int64_t q_head_stride,
                             const uint16_t *k_cache, const uint16_t *v_cache, int64_t row_stride,
                             int64_t head_stride, const int32_t *rows, const int32_t *seq_lens,
                             float scale, uint16_t *out) {
    attend_block(8, w, block, h, group, q_heads, q, q_token_stride, q_head_stride, k_cache,
                 v_cache, row_stride, head_stride, rows, seq_lens, scale, out);
}
#endif

/* ---- which tokens go in row blocks ---- */
#if HAVE_BF16_DOT   /* the row-block path exists only with the bf16 dot product */
static int prefill_blocks_enabled(void) {   /* read at every call (~1 us): A/B in one process */
    const char *value = getenv("LLMSERVE_CPU_PREFILL_BLOCKS");
    return !(value != NULL && strcmp(value, "0") == 0);
}

/* Runs of >= MIN_RUN_TOKENS consecutive tokens of one slot, token i of a run seeing
 * seq_lens[t0] + i keys (seq_lens[t0] >= 1), cut into row blocks (the last rows first: they
 * see the most keys, so the longest items start first); in_block[t] = 1 for their tokens.
 * Returns the number of blocks (at most tokens). */
static int plan_row_blocks(const int32_t *slots, const int32_t *seq_lens, int tokens, int group,
                           row_block *blocks, uint8_t *in_block) {
    int count = 0;
    for (int t0 = 0; t0 < tokens;) {
        int t = t0 + 1;
        while (t < tokens && slots[t] == slots[t0] && seq_lens[t] == seq_lens[t - 1] + 1) t++;
        const int run = t - t0;
        if (run >= MIN_RUN_TOKENS && seq_lens[t0] >= 1) {
            memset(in_block + t0, 1, (size_t)run);
            for (int r0 = (run * group - 1) / BLOCK_ROWS * BLOCK_ROWS; r0 >= 0; r0 -= BLOCK_ROWS)
                blocks[count++] = (row_block){t0, run, r0};
        }
        t0 = t;
    }
    return count;
}
#endif

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
    int failed = 0, n_blocks = 0;
    row_block *blocks = NULL;   /* prefill runs in row blocks (AVX512-BF16, bf16 pool) */
    uint8_t *in_block = NULL;   /* [tokens] 1: the token's rows are in a block */
#if HAVE_BF16_DOT
    if (bf16_dot && tokens >= MIN_RUN_TOKENS && prefill_blocks_enabled()) {
        blocks = (row_block *)malloc(sizeof(row_block) * (size_t)tokens);
        in_block = (uint8_t *)calloc((size_t)tokens, 1);
        if (blocks == NULL || in_block == NULL) {
            free(blocks);
            free(in_block);
            return -1;
        }
        n_blocks = plan_row_blocks(slots, seq_lens, tokens, group, blocks, in_block);
    }
#endif
    #pragma omp parallel
    {
#if HAVE_BF16_DOT
        if (n_blocks > 0) {
            block_scratch *w = (block_scratch *)aligned_alloc(64, sizeof(block_scratch));
            if (w == NULL) {
                #pragma omp atomic write
                failed = 1;
            }
            #pragma omp for schedule(dynamic, 1) nowait
            for (int64_t item = 0; item < (int64_t)n_blocks * kv_heads; item++) {
                if (w == NULL) continue;
                const row_block block = blocks[item / kv_heads];
                (head_dim == 64 ? attend_block_64 : attend_block_128)(
                    w, block, (int)(item % kv_heads), group, q_heads, (const uint16_t *)q,
                    q_token_stride, q_head_stride, (const uint16_t *)k_cache,
                    (const uint16_t *)v_cache, row_stride, head_stride,
                    req_to_token + (int64_t)slots[block.t0] * table_width, seq_lens, scale,
                    (uint16_t *)out);
            }
            free(w);
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
    free(blocks);
    free(in_block);
    return failed ? -1 : 0;
}
