/* RMSNorm(+residual), RoPE and SiLU*up for the CPU serving path, one pass over memory each.
 *
 * They round exactly where the torch versions in kernels/cpu/ops.py round (every bf16 torch op
 * computes in fp32 and rounds its result to bf16), so a bf16 model gets the same numbers.
 * Built with -ffp-contract=off: no fused multiply-adds that torch would not do either; and
 * with reassociation allowed, so the sums vectorize (they may add in another order).
 */
#include <math.h>
#include <stdint.h>

#include "kernels.h"
#include "vec16.h"

/* below this many elements a call stays on one thread (OpenMP start-up costs more) */
#define PARALLEL_MIN_ELEMENTS 32768

/* float -> bf16 bits, round to nearest even (NaN stays NaN) */
static inline uint16_t bf16_bits(float f) {
    union { uint32_t u; float f; } value;
    value.f = f;
    if ((value.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((value.u >> 16) | 0x40u);
    value.u += 0x7fffu + ((value.u >> 16) & 1u);
    return (uint16_t)(value.u >> 16);
}

/* the value a bf16 tensor would hold after storing f */
static inline float bf16_round(float f) { return bf16_to_float(bf16_bits(f)); }

/* Each kernel is written once as a macro over the element type, then stamped out for fp32 and
 * bf16, so the inner loops have no dtype branch and vectorize. LOAD(p, i) widens to fp32,
 * STORE(p, i, f) narrows (rounding to nearest even for bf16), ROUND(f) is the value a tensor
 * of that dtype would hold after storing f. */
#define F32_LOAD(p, i) (((const float *)(p))[i])
#define F32_STORE(p, i, f) (((float *)(p))[i] = (f))
#define F32_ROUND(f) (f)
#define BF16_LOAD(p, i) bf16_to_float(((const uint16_t *)(p))[i])
#define BF16_STORE(p, i, f) (((uint16_t *)(p))[i] = bf16_bits(f))
#define BF16_ROUND(f) bf16_round(f)

/* the value a tensor of that dtype holds after storing each lane */
static inline v16f round16(v16f value, int is_bf16) { return is_bf16 ? round_bf16(value) : value; }

/* out = (s * rsqrt(mean(s^2) + eps)) * weight with s = x (+ residual), also written to sum_out.
 * All tensors [rows, hidden] contiguous, weight [hidden]; residual and sum_out may be NULL.
 * 16 values at a time, the last hidden % 16 one by one. */
#define DEFINE_RMS_NORM(NAME, IS_BF16, LOAD, STORE, ROUND)                                     \
static void NAME(const void *x, const void *residual, const void *weight, void *out,          \
                 void *sum_out, int64_t rows, int64_t hidden, float eps) {                     \
    const int64_t full = hidden / 16 * 16;                                                     \
    _Pragma("omp parallel for if (rows * hidden >= PARALLEL_MIN_ELEMENTS)")                     \
    for (int64_t r = 0; r < rows; r++) {                                                       \
        const int64_t base = r * hidden;                                                       \
        const void *src = x;                                                                   \
        if (residual) {                                                                        \
            for (int64_t i = 0; i < full; i += 16)                                             \
                store16(sum_out, base + i, IS_BF16, load16(x, base + i, IS_BF16)               \
                                                    + load16(residual, base + i, IS_BF16));    \
            for (int64_t i = full; i < hidden; i++)                                            \
                STORE(sum_out, base + i, LOAD(x, base + i) + LOAD(residual, base + i));         \
            src = sum_out;                                                                     \
        }                                                                                      \
        v16f square_sums = splat(0.0f);                                                        \
        for (int64_t i = 0; i < full; i += 16) {                                               \
            const v16f value = load16(src, base + i, IS_BF16);                                 \
            square_sums += value * value;                                                      \
        }                                                                                      \
        float squares = sum16(square_sums);                                                    \
        for (int64_t i = full; i < hidden; i++) squares += LOAD(src, base + i) * LOAD(src, base + i); \
        const float inv = 1.0f / sqrtf(squares / (float)hidden + eps);                         \
        for (int64_t i = 0; i < full; i += 16)                                                 \
            store16(out, base + i, IS_BF16,                                                    \
                    round16(load16(src, base + i, IS_BF16) * splat(inv), IS_BF16)              \
                    * load16(weight, i, IS_BF16));                                             \
        for (int64_t i = full; i < hidden; i++)                                                \
            STORE(out, base + i, ROUND(LOAD(src, base + i) * inv) * LOAD(weight, i));          \
    }                                                                                          \
}
DEFINE_RMS_NORM(rms_norm_f32, 0, F32_LOAD, F32_STORE, F32_ROUND)
DEFINE_RMS_NORM(rms_norm_bf16, 1, BF16_LOAD, BF16_STORE, BF16_ROUND)

void rms_norm(const void *x, const void *residual, const void *weight, void *out, void *sum_out,
              int64_t rows, int64_t hidden, float eps, int is_bf16) {
    (is_bf16 ? rms_norm_bf16 : rms_norm_f32)(x, residual, weight, out, sum_out, rows, hidden, eps);
}

/* Neox rotation of one head: src[at .. at + 2 * half) by the fp32 table row (cos | sin), rounded
 * as torch rounds in the model's dtype, written to dst (may be src) and, if not NULL, to copy. */
#define DEFINE_ROPE_HEAD(NAME, IS_BF16, LOAD, STORE, ROUND)                                    \
static inline void NAME(const void *src, int64_t src_at, void *dst, int64_t dst_at,           \
                        void *copy, int64_t copy_at, const float *table, int64_t half) {       \
    const int64_t full = half / 16 * 16;                                                       \
    for (int64_t i = 0; i < full; i += 16) {                                                   \
        const v16f c = round16(load16(table, i, 0), IS_BF16);                                  \
        const v16f s = round16(load16(table, half + i, 0), IS_BF16);                           \
        const v16f first = load16(src, src_at + i, IS_BF16);                                   \
        const v16f second = load16(src, src_at + half + i, IS_BF16);                           \
        const v16f new_first = round16(first * c, IS_BF16) - round16(second * s, IS_BF16);     \
        const v16f new_second = round16(second * c, IS_BF16) + round16(first * s, IS_BF16);    \
        store16(dst, dst_at + i, IS_BF16, new_first);                                          \
        store16(dst, dst_at + half + i, IS_BF16, new_second);                                  \
        if (copy) {                                                                            \
            store16(copy, copy_at + i, IS_BF16, new_first);                                    \
            store16(copy, copy_at + half + i, IS_BF16, new_second);                            \
        }                                                                                      \
    }                                                                                          \
    for (int64_t i = full; i < half; i++) {                                                    \
        const float c = ROUND(table[i]), s = ROUND(table[half + i]);                           \
        const float first = LOAD(src, src_at + i), second = LOAD(src, src_at + half + i);      \
        const float new_first = ROUND(first * c) - ROUND(second * s);                          \
        const float new_second = ROUND(second * c) + ROUND(first * s);                         \
        STORE(dst, dst_at + i, new_first);                                                     \
        STORE(dst, dst_at + half + i, new_second);                                             \
        if (copy) {                                                                            \
            STORE(copy, copy_at + i, new_first);                                               \
            STORE(copy, copy_at + half + i, new_second);                                       \
        }                                                                                      \
    }                                                                                          \
}
DEFINE_ROPE_HEAD(rope_head_f32, 0, F32_LOAD, F32_STORE, F32_ROUND)
DEFINE_ROPE_HEAD(rope_head_bf16, 1, BF16_LOAD, BF16_STORE, BF16_ROUND)

/* Neox rotation in place of x [tokens, heads, head_dim] (token/head strides in elements, unit
 * last stride) by the fp32 table cos_sin [max_positions, head_dim] (cos | sin) at positions. */
#define DEFINE_ROPE(NAME, ROPE_HEAD)                                                           \
static void NAME(void *x, int64_t token_stride, int64_t head_stride, int64_t tokens,           \
                 int64_t heads, int64_t head_dim, const float *cos_sin, const int64_t *positions) { \
    _Pragma("omp parallel for if (tokens * heads * head_dim >= PARALLEL_MIN_ELEMENTS)")         \
    for (int64_t t = 0; t < tokens; t++)                                                       \
        for (int64_t h = 0; h < heads; h++) {                                                  \
            const int64_t at = t * token_stride + h * head_stride;                             \
            ROPE_HEAD(x, at, x, at, NULL, 0, cos_sin + positions[t] * head_dim, head_dim / 2); \
        }                                                                                      \
}
DEFINE_ROPE(rope_f32, rope_head_f32)
DEFINE_ROPE(rope_bf16, rope_head_bf16)

void rope(void *x, int64_t token_stride, int64_t head_stride, int64_t tokens, int64_t heads,
          int64_t head_dim, const float *cos_sin, const int64_t *positions, int is_bf16) {
    (is_bf16 ? rope_bf16 : rope_f32)(x, token_stride, head_stride, tokens, heads, head_dim,
                                     cos_sin, positions);
}

#define DEFINE_ROPE_STORE(NAME, ROPE_HEAD, ELEMENT)                                            \
static void NAME(const new_qkv *n, const pool_rows *p, const float *cos_sin,                  \
                 const int64_t *positions) {                                                   \
    const int64_t half = n->head_dim / 2, bytes = n->head_dim * (int64_t)sizeof(ELEMENT);     \
    _Pragma("omp parallel for if (n->tokens * (n->q_heads + 2 * n->kv_heads) * n->head_dim \
                                  >= PARALLEL_MIN_ELEMENTS)")                                  \
    for (int64_t t = 0; t < n->tokens; t++) {                                                  \
        const float *table = cos_sin + positions[t] * n->head_dim;                             \
        for (int64_t h = 0; h < n->q_heads; h++) {                                             \
            const int64_t at = t * n->q_token_stride + h * n->q_head_stride;                   \
            ROPE_HEAD(n->q, at, n->q, at, NULL, 0, table, half);                               \
        }                                                                                      \
        for (int64_t h = 0; h < n->kv_heads; h++) {                                            \
            const int64_t at = t * n->k_token_stride + h * n->k_head_stride;                   \
            const int64_t pool_at = p->rows[t] * p->row_stride + h * p->head_stride;           \
            ROPE_HEAD(n->k, at, n->k, at, p->k_cache, pool_at, table, half);                   \
            memcpy((ELEMENT *)p->v_cache + pool_at,                                            \
                   (const ELEMENT *)n->v + t * n->v_token_stride + h * n->v_head_stride,       \
                   (size_t)bytes);                                                             \
        }                                                                                      \
    }                                                                                          \
}
DEFINE_ROPE_STORE(rope_store_kv_f32, rope_head_f32, float)
DEFINE_ROPE_STORE(rope_store_kv_bf16, rope_head_bf16, uint16_t)

/* RoPE on q and k in place (as rope()), then the rotated k and v written to the pool rows.
 * Returns 0, -1 if a pool row is outside [0, capacity), -2 if a position is outside
 * [0, max_positions); nothing is written then. */
int rope_store_kv(const new_qkv *n, const pool_rows *p, const float *cos_sin,
                  int64_t max_positions, const int64_t *positions, int is_bf16) {
    for (int64_t t = 0; t < n->tokens; t++) {
        if (p->rows[t] < 0 || p->rows[t] >= p->capacity) return -1;
        if (positions[t] < 0 || positions[t] >= max_positions) return -2;
    }
    (is_bf16 ? rope_store_kv_bf16 : rope_store_kv_f32)(n, p, cos_sin, positions);
    return 0;
}

/* silu(gate) * up for 16 values, rounded as torch rounds bf16: bf16(bf16(silu(gate)) * up) */
static inline v16f silu_mul16(v16f gate, v16f up, int is_bf16) {
    v16f act = gate / (splat(1.0f) + vexp(-gate));
    if (is_bf16) act = round_bf16(act);
    return act * up;
}

#define DEFINE_SILU_AND_MUL(NAME, IS_BF16, LOAD, STORE)                                         \
static void NAME(const void *x, int64_t row_stride, void *out, int64_t rows, int64_t inter) {  \
    const int64_t full = inter / 16 * 16;                                                      \
    _Pragma("omp parallel for if (rows * inter >= PARALLEL_MIN_ELEMENTS)")                      \
    for (int64_t r = 0; r < rows; r++) {                                                       \
        const int64_t gate_at = r * row_stride, out_at = r * inter;                            \
        for (int64_t i = 0; i < full; i += 16)                                                 \
            store16(out, out_at + i, IS_BF16,                                                  \
                    silu_mul16(load16(x, gate_at + i, IS_BF16),                                \
                               load16(x, gate_at + inter + i, IS_BF16), IS_BF16));             \
        if (full < inter) {   /* the row's last few values, through a padded vector */         \
            float gate[16] = {0}, up[16] = {0};                                                \
            for (int64_t k = 0; full + k < inter; k++) {                                       \
                gate[k] = LOAD(x, gate_at + full + k);                                         \
                up[k] = LOAD(x, gate_at + inter + full + k);                                   \
            }                                                                                  \
            v16f gate_vec, up_vec;                                                             \
            memcpy(&gate_vec, gate, sizeof(gate));                                             \
            memcpy(&up_vec, up, sizeof(up));                                                   \
            const v16f product = silu_mul16(gate_vec, up_vec, IS_BF16);                        \
            for (int64_t k = 0; full + k < inter; k++) STORE(out, out_at + full + k, product[k]); \
        }                                                                                      \
    }                                                                                          \
}
DEFINE_SILU_AND_MUL(silu_and_mul_f32, 0, F32_LOAD, F32_STORE)
DEFINE_SILU_AND_MUL(silu_and_mul_bf16, 1, BF16_LOAD, BF16_STORE)

/* out [rows, inter] = silu(gate) * up, from x [rows, 2 * inter] = (gate | up) with rows
 * row_stride elements apart (unit last stride); out contiguous. */
void silu_and_mul(const void *x, int64_t row_stride, void *out, int64_t rows, int64_t inter,
                  int is_bf16) {
    (is_bf16 ? silu_and_mul_bf16 : silu_and_mul_f32)(x, row_stride, out, rows, inter);
}

/* out[r] = the first column of row r holding its maximum (a NaN counts as the maximum), as
 * torch.argmax; x [rows, cols] fp32, rows row_stride apart. torch's CPU argmax is a scalar loop. */
void argmax_rows(const float *x, int64_t row_stride, int64_t rows, int64_t cols, int64_t *out) {
    #pragma omp parallel for if (rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * row_stride;
        const int64_t full = cols / 16 * 16;
        v16f peak = splat(-INFINITY);
        v16i nan_seen = (v16i){0};
        for (int64_t i = 0; i < full; i += 16) {
            v16f block;
            memcpy(&block, row + i, sizeof(block));
            nan_seen |= block != block;
            peak = vmax(peak, block);
        }
        float best = max16(peak);
        int any_nan = 0;
        for (int i = 0; i < 16; i++) any_nan |= nan_seen[i] != 0;
        for (int64_t i = full; i < cols; i++) {
            any_nan |= row[i] != row[i];
            best = row[i] > best ? row[i] : best;
        }
        int64_t index = 0;
        for (int64_t i = 0; i < cols; i++) {
            if (any_nan ? row[i] != row[i] : row[i] == best) {
                index = i;
                break;
            }
        }
        out[r] = index;
    }
}
