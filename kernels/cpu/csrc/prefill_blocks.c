/* Prefill chunks of pool_attention in blocks of query rows over shared keys (AVX512-BF16,
 * a bf16 pool, head_dim 64/128, groups 1-8); pool_attention.c plans and runs them through
 * prefill_blocks_plan and prefill_blocks_attend (pool_attention.h). Without AVX512-BF16
 * this file compiles to nothing and every token takes the per-token path.
 *
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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool_attention.h"

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

/* one (row block, kv head) item of the call: attend_block specialised for head_dim 64 (CH 4)
 * and 128 (CH 8), each with its constant trip counts */
static void attend_block_item(block_scratch *w, row_block block, int h, const bf16_pool_call *c) {
    const int group = c->q_heads / c->kv_heads;
    const int32_t *rows = c->req_to_token + (int64_t)c->slots[block.t0] * c->table_width;
    if (c->head_dim == 64)
        attend_block(4, w, block, h, group, c->q_heads, c->q, c->q_token_stride, c->q_head_stride,
                     c->k_cache, c->v_cache, c->row_stride, c->head_stride, rows, c->seq_lens,
                     c->scale, c->out);
    else
        attend_block(8, w, block, h, group, c->q_heads, c->q, c->q_token_stride, c->q_head_stride,
                     c->k_cache, c->v_cache, c->row_stride, c->head_stride, rows, c->seq_lens,
                     c->scale, c->out);
}

/* ---- which tokens go in row blocks ---- */
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

int prefill_blocks_plan(const int32_t *slots, const int32_t *seq_lens, int tokens, int group,
                        prefill_plan *plan) {
    plan->blocks = NULL;
    plan->in_block = NULL;
    plan->count = 0;
    if (tokens < MIN_RUN_TOKENS || !prefill_blocks_enabled()) return 0;
    plan->blocks = (row_block *)malloc(sizeof(row_block) * (size_t)tokens);
    plan->in_block = (uint8_t *)calloc((size_t)tokens, 1);
    if (plan->blocks == NULL || plan->in_block == NULL) {
        prefill_plan_free(plan);
        return -1;
    }
    plan->count = plan_row_blocks(slots, seq_lens, tokens, group, plan->blocks, plan->in_block);
    return 0;
}

int prefill_blocks_attend(const prefill_plan *plan, const bf16_pool_call *call) {
    const int kv_heads = call->kv_heads;
    block_scratch *w = (block_scratch *)aligned_alloc(64, sizeof(block_scratch));
    #pragma omp for schedule(dynamic, 1) nowait
    for (int64_t item = 0; item < (int64_t)plan->count * kv_heads; item++) {
        if (w == NULL) continue;
        attend_block_item(w, plan->blocks[item / kv_heads], (int)(item % kv_heads), call);
    }
    const int status = w == NULL ? -1 : 0;
    free(w);
    return status;
}
#endif
