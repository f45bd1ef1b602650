/* What the two halves of pool_attention share: pool_attention.c (the per-token path and the
 * entry point) and prefill_blocks.c (prefill runs in row blocks, AVX512-BF16 only). Nothing
 * declared here is exported from the library: the entry point stays pool_attention alone. */
#ifndef LLMSERVE_POOL_ATTENTION_H
#define LLMSERVE_POOL_ATTENTION_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec16.h"

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_BF16_DOT 1
#else
#define HAVE_BF16_DOT 0
#endif

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

/* a prefill run handled in row blocks: its first token, its length, the block's first row
 * (row = (token - t0) * group + head of the group) */
typedef struct { int32_t t0, tokens, r0; } row_block;

/* the row blocks of one call (declared for every build; empty without HAVE_BF16_DOT) */
typedef struct {
    row_block *blocks;   /* [count] */
    uint8_t *in_block;   /* [tokens] 1: the token's rows are in a block; NULL: none are */
    int count;
} prefill_plan;

/* one pool_attention call over a bf16 pool, as the row-block path reads it (strides in
 * elements; out contiguous [tokens, q_heads, head_dim]) */
typedef struct {
    const uint16_t *q;
    int64_t q_token_stride, q_head_stride;
    const uint16_t *k_cache, *v_cache;
    int64_t row_stride, head_stride;
    const int32_t *req_to_token;
    int64_t table_width;
    const int32_t *slots, *seq_lens;
    int q_heads, kv_heads, head_dim;
    float scale;
    uint16_t *out;
} bf16_pool_call;

#if HAVE_BF16_DOT
#pragma GCC visibility push(hidden)
/* Plans the row blocks of a call whose sizes the bf16 dot path takes (bf16 pool, head_dim 64
 * or 128, group <= 8); plan->count is 0 when there are too few tokens, no run is long enough
 * or LLMSERVE_CPU_PREFILL_BLOCKS=0. Returns 0, or -1 out of memory (plan left empty). */
int prefill_blocks_plan(const int32_t *slots, const int32_t *seq_lens, int tokens, int group,
                        prefill_plan *plan);
/* Inside an omp parallel region, called by every thread when plan->count > 0: the (block, kv
 * head) items shared out by an omp for without a barrier. Returns 0, or -1 when this thread's
 * scratch could not be allocated (it then skips its items). */
int prefill_blocks_attend(const prefill_plan *plan, const bf16_pool_call *call);
#pragma GCC visibility pop
#endif

static inline void prefill_plan_free(prefill_plan *plan) {
    free(plan->blocks);
    free(plan->in_block);
    plan->blocks = NULL;
    plan->in_block = NULL;
    plan->count = 0;
}

#endif
