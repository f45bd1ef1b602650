/* Weight-only int8 / int4 projections y = x @ W^T (+ bias) on CPU (kernels/quant.py's format,
 * packed by kernels/cpu/quant_linear.py).
 *
 * With AVX512-VNNI (vpdpbusd: 4 u8 x s8 products summed into each 32-bit lane) the activations
 * are quantized per row and per weight group to int8, as llama.cpp's q8 activations are:
 * q = round(x * 127 / max|x|), scale max|x| / 127, sum = sum of q. The weights are the u8 side
 * (each column's own lanes), the activations the broadcast s8 side. Per group the integer dot
 * products are exact; across groups they are summed in fp32 with the scales:
 *   int8 weights: stored + 128 (offset binary, 1..255), so dot - 128 * sum is the signed dot:
 *                 acc += float(dot - 128 * sum) * (wscale * xscale)
 *                 (the activation sums come with the quantization: no weight sums to read
 *                 or compute)
 *   int4 weights: the level 0..15; w = wscale * level + woffset, so
 *                 acc += (float(dot) * wscale + float(sum) * woffset) * xscale
 *                 or, symmetric (woffset = -8 wscale: GGUF Q4_0, quantize_int4(symmetric=True);
 *                 packed without offsets), as int8 with 8 for 128:
 *                 acc += float(dot - 8 * sum) * (wscale * xscale)
 * (tests/kernels/test_cpu_quant_gemm.py mirrors these steps in torch).
 *
 * Packed layout, blocks of 16 output columns like gemm_bf16.c, so every load is 64 bytes:
 *   int8: data[block][quad][column][4]    = W[16 block + column][4 quad + 0..3] + 128
 *   int4: data[block][octet][column][4]   = level at 8 octet + 0..3 (low nibble) and
 *                                           8 octet + 4..7 (high nibble)
 *   scales, offsets: fp16 [block][group][column], times 2^shift (a per-weight power of two that
 *   keeps them in fp16's normal range; `unscale` = 2^-shift goes into the activation scale);
 *   offsets only for asymmetric int4 (GGUF Q4_1).
 *
 * gemm_dequant_bf16 instead dequantizes one panel of blocks at a time into gemm_bf16's layout
 * and runs its tiles (gemm_bf16_panels): the candidate the chooser weighs at large row counts.
 * dequantize_weight writes the whole weight as plain [out, in] (any CPU: the fallback).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "vec16.h"

/* fp16 bits -> float, any CPU (subnormals included) */
static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {   /* subnormal: normalize */
        exponent = 113u;
        while (!(mantissa & 0x400u)) { mantissa <<= 1; exponent--; }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

/* float -> bf16 bits, round to nearest even (as torch's .to(torch.bfloat16)) */
static uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* W[16 block + column][feature] for the whole weight, as fp32 (scale * level + offset) */
static void dequantize_block(const quant_weight *w, int64_t block, float *out /* [16][in] */) {
    const int64_t groups = w->in / w->group;
    const int64_t units = w->kind == QUANT_INT8 ? w->in / 4 : w->in / 8;
    const uint8_t *data = w->data + block * units * 64;
    for (int64_t column = 0; column < 16; column++) {
        float *row = out + column * w->in;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t at = (block * groups + g) * 16 + column;
            const float scale = half_to_float(w->scales[at]) * w->unscale;
            const float offset = w->offsets ? half_to_float(w->offsets[at]) * w->unscale
                                            : -8.0f * scale;   /* symmetric int4 */
            for (int64_t i = g * w->group; i < (g + 1) * w->group; i++) {
                float level;
                if (w->kind == QUANT_INT8) {
                    level = (float)((int)data[(i / 4) * 64 + column * 4 + i % 4] - 128);
                } else {
                    const uint8_t byte = data[(i / 8) * 64 + column * 4 + i % 4];
                    level = (float)(i % 8 < 4 ? byte & 0xf : byte >> 4);
                }
                row[i] = w->kind == QUANT_INT8 ? scale * level : scale * level + offset;
            }
        }
    }
}

int dequantize_weight(const quant_weight *w, void *out, int is_bf16) {
    const int64_t blocks = w->out / 16;
    int failed = 0;
    #pragma omp parallel reduction(|: failed)
    {
        float *scratch = malloc((size_t)(16 * w->in) * sizeof(float));
        failed = scratch == NULL;
        #pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; block++) {
            if (!scratch) continue;
            dequantize_block(w, block, scratch);
            for (int64_t k = 0; k < 16 * w->in; k++) {
                const int64_t at = block * 16 * w->in + k;
                if (is_bf16) ((uint16_t *)out)[at] = float_to_bf16(scratch[k]);
                else ((float *)out)[at] = scratch[k];
            }
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <omp.h>

#ifndef QTILE_ROWS
#define QTILE_ROWS 4        /* rows x blocks of 16 columns per tile: 12 + 12 accumulators */
#endif
#ifndef QTILE_BLOCKS
#define QTILE_BLOCKS 3
#endif
#ifndef QDECODE_BLOCKS
#define QDECODE_BLOCKS 4    /* one row (a decode step): wider tiles, one group epilogue each */
#endif
#ifndef QPREFETCH
#define QPREFETCH 1         /* the first row tile of a panel prefetches the next panel (L2) */
#endif
#ifndef QNOWAIT
#define QNOWAIT 1
#endif
#ifndef QPREFETCH_FIRST
#define QPREFETCH_FIRST 1   /* each thread's first panel is prefetched whole before it starts */
#endif
#ifndef QPREFETCH_SCALES
#define QPREFETCH_SCALES 1
#endif
#define QKIND_INT4_SYMMETRIC 2   /* QUANT_INT4 without offsets: the integer correction */
#define QMAX_BLOCKS 4       /* QTILE_BLOCKS and QDECODE_BLOCKS at most this */
#define QCHUNK_BYTES (256 * 1024)   /* quantized activation rows per chunk: about this many */

int gemm_quant_available(void) { return 1; }

/* acc += 4 u8 x s8 products per 32-bit lane, in place: with the intrinsic gcc 12 copies the
 * accumulator into a scratch register and back around every vpdpbusd in these loops (two
 * extra vector moves per product), which cost more than the products at a few rows */
static inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
    return acc;
}

static inline __m512 load_x16(const void *x, int64_t at, int is_bf16) {
    if (is_bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + at))),
            16));
    return _mm512_loadu_ps((const float *)x + at);
}

/* One row: per group of `group` features, q = round(x * (127 / amax)),
 * scale = amax / 127 * unscale, sum = sum of q. */
static void quantize_row(const void *x, int is_bf16, int64_t in, int64_t group, float unscale,
                         int8_t *q, float *scale, int32_t *sum) {
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t g = 0; g < in / group; g++) {
        __m512 v[4];
        const int parts = (int)(group / 16);
        __m512 amax = _mm512_setzero_ps();
        for (int p = 0; p < parts; p++) {
            v[p] = load_x16(x, g * group + 16 * p, is_bf16);
            amax = _mm512_max_ps(amax, _mm512_and_ps(v[p], abs_mask));
        }
        const float top = _mm512_reduce_max_ps(amax);
        const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
        const __m512 by = _mm512_set1_ps(inverse);
        __m512i total = _mm512_setzero_si512();
        for (int p = 0; p < parts; p++) {
            const __m512i levels = _mm512_cvtps_epi32(_mm512_mul_ps(v[p], by));   /* nearest even */
            total = _mm512_add_epi32(total, levels);
            _mm_storeu_si128((__m128i *)(q + g * group + 16 * p), _mm512_cvtepi32_epi8(levels));
        }
        scale[g] = top / 127.0f * unscale;
        sum[g] = _mm512_reduce_add_epi32(total);
    }
}

int quantize_rows(const void *x, int64_t x_row_stride, int is_bf16, int64_t rows, int64_t in,
                  int64_t group, float unscale, int8_t *q, float *scale, int32_t *sum) {
    const int64_t groups = in / group;
    #pragma omp parallel for schedule(static) if (rows * in >= (int64_t)1 << 16)
    for (int64_t r = 0; r < rows; r++)
        quantize_row((const char *)x + r * x_row_stride * (is_bf16 ? 2 : 4), is_bf16, in, group,
                     unscale, q + r * in, scale + r * groups, sum + r * groups);
    return 0;
}

/* One tile: rows x blocks (both at most the QTILE_ sizes, constants when inlined) of y over
 * the whole input width, from quantized activations (xq rows of `in` bytes, xs/xsum rows of
 * `groups`) and the weight blocks starting at `block`. */
static inline __attribute__((always_inline)) void quant_tile(
    const int rows, const int blocks, const int kind,
    const int8_t *xq, const float *xs, const int32_t *xsum,
    const quant_weight *w, int64_t block, const void *bias, void *y, int64_t y_row_stride,
    int is_bf16, const uint8_t *next, int next_blocks)
{
    const int64_t in = w->in, groups = in / w->group;
    const int64_t unit = kind == QUANT_INT8 ? 4 : 8;          /* features per 64-byte load */
    const int64_t units = in / unit, per_group = w->group / unit;
    const uint8_t *data = w->data + block * units * 64;
    const uint16_t *scales = w->scales + block * groups * 16;
    const uint16_t *offsets = w->offsets ? w->offsets + block * groups * 16 : 0;
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[QTILE_ROWS][QMAX_BLOCKS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < blocks; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        /* int4 with few accumulators: low and high nibbles into separate ones, so two
         * dependency chains per accumulator pair hide vpdpbusd's latency (integers: exact) */
        const int split = kind != QUANT_INT8 && rows * blocks <= 4;
        __m512i dot[QTILE_ROWS][QMAX_BLOCKS], dot_hi[QTILE_ROWS][QMAX_BLOCKS];
        for (int j = 0; j < blocks; j++)
            for (int i = 0; i < rows; i++) dot[i][j] = dot_hi[i][j] = _mm512_setzero_si512();
        for (int64_t u = g * per_group; u < (g + 1) * per_group; u++) {
            __m512i wv[QMAX_BLOCKS];
            for (int j = 0; j < blocks; j++)
                wv[j] = _mm512_loadu_si512((const void *)(data + (j * units + u) * 64));
            if (next)   /* into L2: the hardware prefetcher alone leaves the first tile waiting */
                for (int j = 0; j < next_blocks; j++)
                    _mm_prefetch((const char *)(next + (j * units + u) * 64), _MM_HINT_T1);
            if (kind == QUANT_INT8) {
                for (int i = 0; i < rows; i++) {
                    int32_t four;
                    __builtin_memcpy(&four, xq + i * in + 4 * u, sizeof(four));
                    const __m512i a = _mm512_set1_epi32(four);
                    for (int j = 0; j < blocks; j++)
                        dot[i][j] = dpbusd(dot[i][j], wv[j], a);
                }
            } else {
                __m512i lo[QMAX_BLOCKS], hi[QMAX_BLOCKS];
                for (int j = 0; j < blocks; j++) {
                    lo[j] = _mm512_and_si512(wv[j], low);
                    hi[j] = _mm512_and_si512(_mm512_srli_epi16(wv[j], 4), low);
                }
                for (int i = 0; i < rows; i++) {
                    int32_t four[2];
                    __builtin_memcpy(four, xq + i * in + 8 * u, sizeof(four));
                    const __m512i a0 = _mm512_set1_epi32(four[0]), a1 = _mm512_set1_epi32(four[1]);
                    for (int j = 0; j < blocks; j++) {
                        dot[i][j] = dpbusd(dot[i][j], lo[j], a0);
                        if (split) dot_hi[i][j] = dpbusd(dot_hi[i][j], hi[j], a1);
                        else dot[i][j] = dpbusd(dot[i][j], hi[j], a1);
                    }
                }
            }
        }
        if (next && QPREFETCH_SCALES && g % 2 == 0)   /* the next panel's scales (offsets) */
            for (int j = 0; j < next_blocks; j++) {
                const int64_t at = ((block + blocks + j) * groups + g) * 16;
                _mm_prefetch((const char *)(w->scales + at), _MM_HINT_T1);
                if (offsets) _mm_prefetch((const char *)(w->offsets + at), _MM_HINT_T1);
            }
        for (int j = 0; j < blocks; j++) {
            const int64_t at = (j * groups + g) * 16;
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + at)));
            if (kind != QUANT_INT4) {   /* int8, symmetric int4: an integer correction */
                for (int i = 0; i < rows; i++) {
                    const __m512i sum = split ? _mm512_add_epi32(dot[i][j], dot_hi[i][j])
                                              : dot[i][j];
                    const __m512i correction = _mm512_set1_epi32(
                        xsum[i * groups + g] * (kind == QUANT_INT8 ? 128 : 8));
                    const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, correction));
                    const __m512 sa = _mm512_mul_ps(s, _mm512_set1_ps(xs[i * groups + g]));
                    acc[i][j] = _mm512_add_ps(acc[i][j], _mm512_mul_ps(d, sa));
                }
            } else {
                const __m512 o =
                    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(offsets + at)));
                for (int i = 0; i < rows; i++) {
                    const __m512i sum = split ? _mm512_add_epi32(dot[i][j], dot_hi[i][j])
                                              : dot[i][j];
                    const __m512 d = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), s);
                    const __m512 m = _mm512_mul_ps(_mm512_set1_ps((float)xsum[i * groups + g]), o);
                    const __m512 t = _mm512_add_ps(d, m);
                    acc[i][j] = _mm512_add_ps(acc[i][j],
                                              _mm512_mul_ps(t, _mm512_set1_ps(xs[i * groups + g])));
                }
            }
        }
    }
    for (int j = 0; j < blocks; j++) {
        __m512 b = _mm512_setzero_ps();
        if (bias) b = load_x16(bias, 16 * j, is_bf16);
        for (int i = 0; i < rows; i++) {
            const __m512 v = bias ? _mm512_add_ps(acc[i][j], b) : acc[i][j];
            if (is_bf16) {
                const v16h half = narrow16((v16f)v);
                memcpy((uint16_t *)y + i * y_row_stride + 16 * j, &half, sizeof(half));
            } else
                _mm512_storeu_ps((float *)y + i * y_row_stride + 16 * j, v);
        }
    }
}

/* the tile at rows [row, row + rows) x blocks [block, block + blocks), weight kind KIND (a
 * constant in each expansion, so every tile shape is its own unrolled code) */
#define QTILE(ROWS, BLOCKS)                                                                    \
    quant_tile(ROWS, BLOCKS, KIND, xq + row * in, xs + row * groups, xsum + row * groups, w,  \
               block, bias ? (const char *)bias + block * 16 * size : 0,                     \
               (char *)y + (row * y_row_stride + block * 16) * size, y_row_stride, is_bf16,   \
               next, next_blocks)
#define QTILE_ROWS_OF(BLOCKS)                                                                  \
    switch (rows) {                                                                            \
    QCASE_ROWS(6, BLOCKS) QCASE_ROWS(5, BLOCKS) QCASE_ROWS(4, BLOCKS) QCASE_ROWS(3, BLOCKS)    \
    QCASE_ROWS(2, BLOCKS)                                                                      \
    default: QTILE(1, BLOCKS); break;                                                          \
    }
/* a case only for tile shapes that occur: up to QTILE_ROWS x QTILE_BLOCKS, one row up to
 * QDECODE_BLOCKS wide */
#define QCASE_ROWS(ROWS, BLOCKS)                                                               \
    case ROWS: if (ROWS <= QTILE_ROWS && BLOCKS <= QTILE_BLOCKS) QTILE(ROWS, BLOCKS); break;
#define DEFINE_RUN_TILE(NAME, KIND_VALUE)                                                      \
    static void NAME(const quant_weight *w, const int8_t *xq, const float *xs,                 \
                     const int32_t *xsum, const void *bias, void *y, int64_t y_row_stride,     \
                     int is_bf16, int64_t row, int rows, int64_t block, int blocks,            \
                     const uint8_t *next, int next_blocks) {                                   \
        enum { KIND = KIND_VALUE };                                                            \
        const int64_t in = w->in, groups = in / w->group, size = is_bf16 ? 2 : 4;              \
        switch (blocks) {                                                                      \
        case 4: QTILE_ROWS_OF(4) break;                                                        \
        case 3: QTILE_ROWS_OF(3) break;                                                        \
        case 2: QTILE_ROWS_OF(2) break;                                                        \
        default: QTILE_ROWS_OF(1) break;                                                       \
        }                                                                                      \
    }
DEFINE_RUN_TILE(run_tile_int8, QUANT_INT8)
DEFINE_RUN_TILE(run_tile_int4, QUANT_INT4)
DEFINE_RUN_TILE(run_tile_int4_symmetric, QKIND_INT4_SYMMETRIC)

/* every cache line of blocks [block, block + blocks) into L2: levels, scales, offsets */
static void prefetch_panel(const quant_weight *w, int64_t block, int blocks, int64_t units,
                           int64_t groups) {
    const char *data = (const char *)(w->data + block * units * 64);
    for (int64_t at = 0; at < blocks * units * 64; at += 64) _mm_prefetch(data + at, _MM_HINT_T1);
    for (int64_t at = 0; at < blocks * groups * 32; at += 64) {
        _mm_prefetch((const char *)(w->scales + block * groups * 16) + at, _MM_HINT_T1);
        if (w->offsets)
            _mm_prefetch((const char *)(w->offsets + block * groups * 16) + at, _MM_HINT_T1);
    }
}

/* Blocks per tile for one row: the widest (up to QDECODE_BLOCKS, at least 2) that splits the
 * blocks most evenly over the threads (36 blocks on 2 threads: 3, not 4's 5 + 4 panels). */
static int decode_blocks(int64_t blocks, int threads) {
    int best = QDECODE_BLOCKS;
    int64_t best_load = INT64_MAX;
    for (int width = QDECODE_BLOCKS; width >= 2; width--) {
        const int64_t panels = (blocks + width - 1) / width;
        const int64_t load = (panels + threads - 1) / threads * width;   /* blocks, busiest */
        if (load < best_load) { best_load = load; best = width; }
    }
    return best;
}

/* y [rows, out] = x [rows, in] @ W^T (+ bias [out]); x, bias and y bf16 (is_bf16) or fp32,
 * unit column strides. Returns 0, or -1 when out of memory. */
int gemm_quant(const void *x, int64_t x_row_stride, int is_bf16, const quant_weight *w,
               const void *bias, void *y, int64_t y_row_stride, int64_t rows_total) {
    const int64_t in = w->in, groups = in / w->group, blocks_total = w->out / 16;
    const int64_t size = is_bf16 ? 2 : 4;
    if (rows_total <= 0) return 0;
    int8_t *xq = malloc((size_t)(rows_total * in));
    float *xs = malloc((size_t)(rows_total * groups) * sizeof(float));
    int32_t *xsum = malloc((size_t)(rows_total * groups) * sizeof(int32_t));
    if (!xq || !xs || !xsum) {
        free(xq); free(xs); free(xsum);
        return -1;
    }
    /* a few rows: quantized here, so the team meets at no extra barrier */
    const int small = rows_total * in <= (int64_t)1 << 14;
    if (small)
        for (int64_t r = 0; r < rows_total; r++)
            quantize_row((const char *)x + r * x_row_stride * size, is_bf16, in, w->group,
                         w->unscale, xq + r * in, xs + r * groups, xsum + r * groups);
    const int parallel = rows_total * w->out * in >= (int64_t)1 << 16;
    const int tile_rows = rows_total == 1 ? 1 : QTILE_ROWS;
    const int tile_blocks = rows_total == 1
        ? decode_blocks(blocks_total, parallel ? omp_get_max_threads() : 1) : QTILE_BLOCKS;
    const int64_t panels = (blocks_total + tile_blocks - 1) / tile_blocks;
    const int64_t units = w->kind == QUANT_INT8 ? in / 4 : in / 8;   /* 64 bytes each */
    void (*run)(const quant_weight *, const int8_t *, const float *, const int32_t *,
                const void *, void *, int64_t, int, int64_t, int, int64_t, int,
                const uint8_t *, int) = w->kind == QUANT_INT8 ? run_tile_int8
                                        : w->offsets ? run_tile_int4 : run_tile_int4_symmetric;
    int64_t chunk = QCHUNK_BYTES / in / QTILE_ROWS * QTILE_ROWS;
    chunk = chunk < 16 * QTILE_ROWS ? 16 * QTILE_ROWS : chunk;
    #pragma omp parallel if (parallel)
    {
        if (!small) {
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < rows_total; r++)
                quantize_row((const char *)x + r * x_row_stride * size, is_bf16, in, w->group,
                             w->unscale, xq + r * in, xs + r * groups, xsum + r * groups);
        }
        int started = !QPREFETCH_FIRST;
        for (int64_t first = 0; first < rows_total; first += chunk) {
            const int64_t end = first + chunk < rows_total ? first + chunk : rows_total;
            const int64_t row_tiles = (end - first + tile_rows - 1) / tile_rows;
            /* consecutive items share a panel: each thread streams its own panels; chunks and
             * tiles are independent, so no barrier until the region ends */
#if QNOWAIT
            #pragma omp for collapse(2) schedule(static) nowait
#else
            #pragma omp for collapse(2) schedule(static)
#endif
            for (int64_t panel = 0; panel < panels; panel++) {
                for (int64_t tile = 0; tile < row_tiles; tile++) {
                    const int64_t block = panel * tile_blocks, row = first + tile * tile_rows;
                    const int blocks = blocks_total - block < tile_blocks
                                       ? (int)(blocks_total - block) : tile_blocks;
                    const int rows = end - row < tile_rows ? (int)(end - row) : tile_rows;
                    const int64_t next_block = block + tile_blocks;
                    const uint8_t *next = QPREFETCH && tile == 0 && next_block < blocks_total
                                          ? w->data + next_block * units * 64 : 0;
                    const int next_blocks = blocks_total - next_block < tile_blocks
                                            ? (int)(blocks_total - next_block) : tile_blocks;
                    if (!started) {   /* this thread's first panel: no tile before fetched it */
                        prefetch_panel(w, block, blocks, units, groups);
                        started = 1;
                    }
                    run(
                        w, xq, xs, xsum, bias, y, y_row_stride, is_bf16, row, rows, block,
                        blocks, next, next_blocks);
                }
            }
        }
    }
    free(xq); free(xs); free(xsum);
    return 0;
}

#else  /* no AVX512-VNNI: callers dequantize (dequantize_weight, gemm_dequant_bf16) */

int gemm_quant_available(void) { return 0; }

int quantize_rows(const void *x, int64_t x_row_stride, int is_bf16, int64_t rows, int64_t in,
                  int64_t group, float unscale, int8_t *q, float *scale, int32_t *sum) {
    (void)x; (void)x_row_stride; (void)is_bf16; (void)rows; (void)in; (void)group;
    (void)unscale; (void)q; (void)scale; (void)sum;
    return -1;
}

int gemm_quant(const void *x, int64_t x_row_stride, int is_bf16, const quant_weight *w,
               const void *bias, void *y, int64_t y_row_stride, int64_t rows_total) {
    (void)x; (void)x_row_stride; (void)is_bf16; (void)w; (void)bias; (void)y;
    (void)y_row_stride; (void)rows_total;
    return -2;
}

#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

/* 64 bytes of 16 columns x 4 features (levels as int8 or as u8 0..15) -> the two pair vectors
 * of gemm_bf16's layout (features 0, 1 and 2, 3 of each column), w = scale * level + offset */
static inline void dequant_four(__m512i levels, int is_signed, const __m512 scale[4],
                                const __m512 offset[4], int with_offset, __m512i *pair0,
                                __m512i *pair1) {
    __m512 f[4];
    const __m128i parts[4] = {_mm512_extracti32x4_epi32(levels, 0),
                              _mm512_extracti32x4_epi32(levels, 1),
                              _mm512_extracti32x4_epi32(levels, 2),
                              _mm512_extracti32x4_epi32(levels, 3)};
    for (int t = 0; t < 4; t++) {   /* columns 4t .. 4t + 3, four features each */
        const __m512i wide = is_signed ? _mm512_cvtepi8_epi32(parts[t])
                                       : _mm512_cvtepu8_epi32(parts[t]);
        f[t] = _mm512_mul_ps(scale[t], _mm512_cvtepi32_ps(wide));
        if (with_offset) f[t] = _mm512_add_ps(f[t], offset[t]);
    }
    /* 32-bit units (a bf16 pair each): column c's features 0-1 then 2-3, columns 0-7 / 8-15 */
    const __m512i first = (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]);
    const __m512i second = (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14,
                                           16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15,
                                          17, 19, 21, 23, 25, 27, 29, 31);
    *pair0 = _mm512_permutex2var_epi32(first, even, second);
    *pair1 = _mm512_permutex2var_epi32(first, odd, second);
}

/* panel_source for gemm_bf16_panels: blocks [block, block + blocks) into bf16 [blocks][in/2][32] */
static void dequant_panel(const void *context, int64_t block, int blocks, uint16_t *panel) {
    const quant_weight *w = context;
    const int64_t groups = w->in / w->group, pairs = w->in / 2;
    const int int8 = w->kind == QUANT_INT8;
    const int64_t unit = int8 ? 4 : 8, per_group = w->group / unit, units = w->in / unit;
    const __m512 unscale = _mm512_set1_ps(w->unscale);
    __m512i spread[4];   /* lane l of part t: column 4t + l / 4 */
    for (int t = 0; t < 4; t++) {
        int32_t idx[16];
        for (int l = 0; l < 16; l++) idx[l] = 4 * t + l / 4;
        spread[t] = _mm512_loadu_si512(idx);
    }
    for (int j = 0; j < blocks; j++) {
        const uint8_t *data = w->data + (block + j) * units * 64;
        __m512i *out = (__m512i *)(panel + j * pairs * 32);
        for (int64_t g = 0; g < groups; g++) {
            const int64_t at = ((block + j) * groups + g) * 16;
            const __m512 s = _mm512_mul_ps(
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->scales + at))), unscale);
            const __m512 o = w->offsets ? _mm512_mul_ps(_mm512_cvtph_ps(
                _mm256_loadu_si256((const __m256i *)(w->offsets + at))), unscale)
                                        : _mm512_mul_ps(s, _mm512_set1_ps(-8.0f));   /* int4 */
            __m512 scale[4], offset[4];
            for (int t = 0; t < 4; t++) {
                scale[t] = _mm512_permutexvar_ps(spread[t], s);
                offset[t] = _mm512_permutexvar_ps(spread[t], o);
            }
            for (int64_t u = g * per_group; u < (g + 1) * per_group; u++) {
                const __m512i bytes = _mm512_loadu_si512((const void *)(data + u * 64));
                __m512i p0, p1;
                if (int8) {   /* offset binary: xor 0x80 gives the signed level */
                    dequant_four(_mm512_xor_si512(bytes, _mm512_set1_epi8((char)0x80)), 1, scale,
                                 offset, 0, &p0, &p1);
                    _mm512_storeu_si512(out + 2 * u, p0);
                    _mm512_storeu_si512(out + 2 * u + 1, p1);
                } else {
                    const __m512i low = _mm512_set1_epi8(0x0f);
                    dequant_four(_mm512_and_si512(bytes, low), 0, scale, offset, 1, &p0, &p1);
                    _mm512_storeu_si512(out + 4 * u, p0);
                    _mm512_storeu_si512(out + 4 * u + 1, p1);
                    dequant_four(_mm512_and_si512(_mm512_srli_epi16(bytes, 4), low), 0, scale,
                                 offset, 1, &p0, &p1);
                    _mm512_storeu_si512(out + 4 * u + 2, p0);
                    _mm512_storeu_si512(out + 4 * u + 3, p1);
                }
            }
        }
    }
}

int gemm_dequant_available(void) { return 1; }

/* As gemm_quant for bf16 x and y, through bf16 weights: each panel of blocks dequantized once
 * per chunk of rows, then gemm_bf16's tiles. Returns 0, or -1 when out of memory. */
int gemm_dequant_bf16(const uint16_t *x, int64_t x_row_stride, const quant_weight *w,
                      const uint16_t *bias, uint16_t *y, int64_t y_row_stride, int64_t rows) {
    return gemm_bf16_panels(x, x_row_stride, NULL, dequant_panel, w, bias, y, y_row_stride, rows,
                            w->out, w->in);
}

#else

int gemm_dequant_available(void) { return 0; }

int gemm_dequant_bf16(const uint16_t *x, int64_t x_row_stride, const quant_weight *w,
                      const uint16_t *bias, uint16_t *y, int64_t y_row_stride, int64_t rows) {
    (void)x; (void)x_row_stride; (void)w; (void)bias; (void)y; (void)y_row_stride; (void)rows;
    return -2;
}

#endif
