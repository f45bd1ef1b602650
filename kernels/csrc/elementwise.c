/* RMSNorm(+residual), RoPE and SiLU*up for the CPU serving path, one pass over memory each.
 *
 * They round exactly where the torch versions in kernels/cpu_ops.py round (every bf16 torch op
 * computes in fp32 and rounds its result to bf16), so a bf16 model gets the same numbers.
 * Built with -ffp-contract=off: no fused multiply-adds that torch would not do either; and
 * with reassociation allowed, so the sums vectorize (they may add in another order).
 */
#include <math.h>
#include <stdint.h>

#include "vec16.h"

/* below this many elements a call stays on one thread (OpenMP start-up costs more) */
#define PARALLEL_MIN_ELEMENTS 32768

static inline float bf16_load(const uint16_t *p) {
    union { uint32_t u; float f; } value;
    value.u = (uint32_t)*p << 16;
    return value.f;
}

/* float -> bf16 bits, round to nearest even (NaN stays NaN) */
static inline uint16_t bf16_bits(float f) {
    union { uint32_t u; float f; } value;
    value.f = f;
    if ((value.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((value.u >> 16) | 0x40u);
    value.u += 0x7fffu + ((value.u >> 16) & 1u);
    return (uint16_t)(value.u >> 16);
}

/* the value a bf16 tensor would hold after storing f */
static inline float bf16_round(float f) {
    union { uint32_t u; float f; } value;
    value.u = (uint32_t)bf16_bits(f) << 16;
    return value.f;
}

/* Each kernel is written once as a macro over the element type, then stamped out for fp32 and
 * bf16, so the inner loops have no dtype branch and vectorize. LOAD(p, i) widens to fp32,
 * STORE(p, i, f) narrows (rounding to nearest even for bf16), ROUND(f) is the value a tensor
 * of that dtype would hold after storing f. */
#define F32_LOAD(p, i) (((const float *)(p))[i])
#define F32_STORE(p, i, f) (((float *)(p))[i] = (f))
#define F32_ROUND(f) (f)
#define BF16_LOAD(p, i) bf16_load((const uint16_t *)(p) + (i))
#define BF16_STORE(p, i, f) (((uint16_t *)(p))[i] = bf16_bits(f))
#define BF16_ROUND(f) bf16_round(f)

/* out = (s * rsqrt(mean(s^2) + eps)) * weight with s = x (+ residual), also written to sum_out.
 * All tensors [rows, hidden] contiguous, weight [hidden]; residual and sum_out may be NULL. */
#define DEFINE_RMS_NORM(NAME, LOAD, STORE, ROUND)                                              \
static void NAME(const void *x, const void *residual, const void *weight, void *out,          \
                 void *sum_out, int64_t rows, int64_t hidden, float eps) {                     \
    _Pragma("omp parallel for if (rows * hidden >= PARALLEL_MIN_ELEMENTS)")                     \
    for (int64_t r = 0; r < rows; r++) {                                                       \
        const int64_t base = r * hidden;                                                       \
        const void *src = x;                                                                   \
        if (residual) {                                                                        \
            _Pragma("omp simd")                                                                \
            for (int64_t i = 0; i < hidden; i++)                                               \
                STORE(sum_out, base + i, LOAD(x, base + i) + LOAD(residual, base + i));         \
            src = sum_out;                                                                     \
        }                                                                                      \
        float squares = 0.0f;                                                                  \
        _Pragma("omp simd reduction(+:squares)")                                               \
        for (int64_t i = 0; i < hidden; i++) squares += LOAD(src, base + i) * LOAD(src, base + i); \
        const float inv = 1.0f / sqrtf(squares / (float)hidden + eps);                         \
        _Pragma("omp simd")                                                                    \
        for (int64_t i = 0; i < hidden; i++)                                                   \
            STORE(out, base + i, ROUND(LOAD(src, base + i) * inv) * LOAD(weight, i));          \
    }                                                                                          \
}
DEFINE_RMS_NORM(rms_norm_f32, F32_LOAD, F32_STORE, F32_ROUND)
DEFINE_RMS_NORM(rms_norm_bf16, BF16_LOAD, BF16_STORE, BF16_ROUND)

void rms_norm(const void *x, const void *residual, const void *weight, void *out, void *sum_out,
              int64_t rows, int64_t hidden, float eps, int is_bf16) {
    (is_bf16 ? rms_norm_bf16 : rms_norm_f32)(x, residual, weight, out, sum_out, rows, hidden, eps);
}

/* Neox rotation in place of x [tokens, heads, head_dim] (token/head strides in elements, unit
 * last stride) by the fp32 table cos_sin [max_positions, head_dim] (cos | sin) at positions. */
#define DEFINE_ROPE(NAME, LOAD, STORE, ROUND)                                                  \
static void NAME(void *x, int64_t token_stride, int64_t head_stride, int64_t tokens,           \
                 int64_t heads, int64_t head_dim, const float *cos_sin, const int64_t *positions) { \
    const int64_t half = head_dim / 2;                                                         \
    _Pragma("omp parallel for if (tokens * heads * head_dim >= PARALLEL_MIN_ELEMENTS)")         \
    for (int64_t t = 0; t < tokens; t++) {                                                     \
        const float *table = cos_sin + positions[t] * head_dim;                                \
        for (int64_t h = 0; h < heads; h++) {                                                  \
            const int64_t base = t * token_stride + h * head_stride;                           \
            _Pragma("omp simd")                                                                \
            for (int64_t i = 0; i < half; i++) {                                               \
                const float c = ROUND(table[i]), s = ROUND(table[half + i]);                   \
                const float first = LOAD(x, base + i), second = LOAD(x, base + half + i);      \
                STORE(x, base + i, ROUND(first * c) - ROUND(second * s));                      \
                STORE(x, base + half + i, ROUND(second * c) + ROUND(first * s));               \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}
DEFINE_ROPE(rope_f32, F32_LOAD, F32_STORE, F32_ROUND)
DEFINE_ROPE(rope_bf16, BF16_LOAD, BF16_STORE, BF16_ROUND)

void rope(void *x, int64_t token_stride, int64_t head_stride, int64_t tokens, int64_t heads,
          int64_t head_dim, const float *cos_sin, const int64_t *positions, int is_bf16) {
    (is_bf16 ? rope_bf16 : rope_f32)(x, token_stride, head_stride, tokens, heads, head_dim,
                                     cos_sin, positions);
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
