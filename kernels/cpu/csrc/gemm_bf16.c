/* bf16 projections y = x @ W^T (+ bias) on CPUs with AVX512-BF16, fp32 accumulation.
 *
 * The weight is packed once at load (kernels/cpu/linear.py) into blocks of 16 output columns:
 * packed[block][pair][column][2] = W[16 * block + column][2 * pair + {0, 1}], so one 64-byte load
 * holds two input features of 16 columns, what one vdpbf16ps multiplies by a broadcast pair of x.
 * A tile of TILE_ROWS rows x TILE_BLOCKS blocks (24 accumulators) walks the whole input width;
 * threads split the tiles of a chunk of rows, a panel of weight blocks per thread, so a panel is
 * read from memory once per chunk and from cache for the chunk's other row tiles.
 *
 * Against oneDNN on its reordered weights, SmolLM2-135M's projections on a 2-core EPYC
 * (bench/cpu_gemm.py): 1.4x at 1 row, 1.24x at 32 rows, 1.04x at 2048. Sums run in another
 * order than oneDNN's: a few results in 100,000 differ from F.linear's by one bf16 unit.
 */
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "vec16.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#include <omp.h>

#define TILE_ROWS 8
#define TILE_BLOCKS 3                      /* 16 columns each */
#define CHUNK_BYTES (512 * 1024)           /* rows of x per chunk: about this many bytes */

/* one tile: rows [0, rows) x blocks [0, blocks) of y, both at most the TILE_ sizes; always
 * inlined with constant rows/blocks so the accumulators live in registers */
static inline __attribute__((always_inline)) void gemm_tile(
    const int rows, const int blocks,
    const uint16_t *x, int64_t x_row_stride,    /* first row of the tile, elements per row */
    const uint16_t *packed, int64_t pairs,      /* first block of the tile; pairs = in / 2 */
    const uint16_t *bias,                       /* bf16 [16 * blocks] of the tile, or NULL */
    uint16_t *y, int64_t y_row_stride,          /* first output of the tile, elements per row */
    const uint16_t *next, int next_blocks)      /* next panel's weights, to prefetch (or NULL) */
{
    __m512 acc[TILE_ROWS][TILE_BLOCKS];
    for (int j = 0; j < blocks; j++) {
        const __m512 init = bias ? (__m512)load16(bias, 16 * j, 1) : _mm512_setzero_ps();
        for (int i = 0; i < rows; i++) acc[i][j] = init;
    }
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh w[TILE_BLOCKS];
        for (int j = 0; j < blocks; j++)
            w[j] = (__m512bh)_mm512_loadu_si512((const void *)(packed + (j * pairs + p) * 32));
        if (next)   /* into L2: the hardware prefetcher alone leaves the first row tile waiting */
            for (int j = 0; j < next_blocks; j++)
                _mm_prefetch((const char *)(next + (j * pairs + p) * 32), _MM_HINT_T1);
        for (int i = 0; i < rows; i++) {
            int32_t pair_bits;   /* x[i][2p], x[i][2p + 1] as one 32-bit lane */
            __builtin_memcpy(&pair_bits, x + i * x_row_stride + 2 * p, sizeof(pair_bits));
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair_bits);
            for (int j = 0; j < blocks; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, w[j]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < blocks; j++)
            _mm256_storeu_si256((__m256i *)(y + i * y_row_stride + 16 * j),
                                (__m256i)_mm512_cvtneps_pbh(acc[i][j]));
}

#define TILE(ROWS, BLOCKS) \
    gemm_tile(ROWS, BLOCKS, xt, x_row_stride, wt, pairs, bt, yt, y_row_stride, next, next_blocks)
#define TILE_FOR_ROWS(BLOCKS)                                                                  \
    switch (rows) {                                                                            \
    case 8: TILE(8, BLOCKS); break;                                                            \
    case 7: TILE(7, BLOCKS); break;                                                            \
    case 6: TILE(6, BLOCKS); break;                                                            \
    case 5: TILE(5, BLOCKS); break;                                                            \
    case 4: TILE(4, BLOCKS); break;                                                            \
    case 3: TILE(3, BLOCKS); break;                                                            \
    case 2: TILE(2, BLOCKS); break;                                                            \
    default: TILE(1, BLOCKS); break;                                                           \
    }

int gemm_bf16_available(void) { return 1; }

/* y [rows, out] = x [rows, in] @ W^T (+ bias [out]), W packed as above, read from `packed`
 * or, where `source` is given, written panel by panel into a per-thread scratch by it (once per
 * panel and chunk of rows: a quantized weight dequantized, csrc/gemm_quant.c); out % 16 == 0
 * and in % 2 == 0 (checked by the caller). Returns 0, or -1 when out of memory. */
int gemm_bf16_panels(const uint16_t *x, int64_t x_row_stride, const uint16_t *packed,
                     panel_source source, const void *context, const uint16_t *bias,
                     uint16_t *y, int64_t y_row_stride, int64_t rows_total, int64_t out,
                     int64_t in)
{
    const int64_t pairs = in / 2, blocks_total = out / 16;
    const int64_t panels = (blocks_total + TILE_BLOCKS - 1) / TILE_BLOCKS;
    int64_t chunk = CHUNK_BYTES / (2 * in) / TILE_ROWS * TILE_ROWS;
    chunk = chunk < 8 * TILE_ROWS ? 8 * TILE_ROWS : chunk;
    const int parallel = rows_total * out * in >= (int64_t)1 << 16;
    const int64_t panel_elements = TILE_BLOCKS * pairs * 32;
    uint16_t *scratch = NULL;   /* one panel per thread */
    if (source) {
        scratch = malloc((size_t)((parallel ? omp_get_max_threads() : 1) * panel_elements)
                         * sizeof(uint16_t));
        if (!scratch) return -1;
    }
    #pragma omp parallel if (parallel)
    {
        uint16_t *own = source ? scratch + omp_get_thread_num() * panel_elements : NULL;
        for (int64_t first = 0; first < rows_total; first += chunk) {
            const int64_t end = first + chunk < rows_total ? first + chunk : rows_total;
            const int64_t row_tiles = (end - first + TILE_ROWS - 1) / TILE_ROWS;
            int64_t held = -1;   /* the panel in `own` */
            /* consecutive items share a panel: each thread keeps its panels' weights in cache */
            #pragma omp for collapse(2) schedule(static)
            for (int64_t panel = 0; panel < panels; panel++) {
                for (int64_t tile = 0; tile < row_tiles; tile++) {
                    const int64_t block = panel * TILE_BLOCKS, row = first + tile * TILE_ROWS;
                    const int blocks = blocks_total - block < TILE_BLOCKS
                                       ? (int)(blocks_total - block) : TILE_BLOCKS;
                    const int rows = end - row < TILE_ROWS ? (int)(end - row) : TILE_ROWS;
                    const uint16_t *xt = x + row * x_row_stride;
                    const uint16_t *wt = own ? own : packed + block * pairs * 32;
                    const uint16_t *bt = bias ? bias + block * 16 : 0;
                    uint16_t *yt = y + row * y_row_stride + block * 16;
                    if (own && held != panel) {
                        source(context, block, blocks, own);
                        held = panel;
                    }
                    /* the first row tile of a panel also prefetches the next panel, most often
                     * this thread's next one (the static schedule hands out panels in order) */
                    const int64_t next_block = block + TILE_BLOCKS;
                    const uint16_t *next = !own && tile == 0 && next_block < blocks_total
                                           ? packed + next_block * pairs * 32 : 0;
                    const int next_blocks = blocks_total - next_block < TILE_BLOCKS
                                            ? (int)(blocks_total - next_block) : TILE_BLOCKS;
                    if (blocks == 3) { TILE_FOR_ROWS(3) }
                    else if (blocks == 2) { TILE_FOR_ROWS(2) }
                    else { TILE_FOR_ROWS(1) }
                }
            }
        }
    }
    free(scratch);
    return 0;
}

/* y [rows, out] = x [rows, in] @ W^T (+ bias [out]), W packed as above. Returns 0. */
int gemm_bf16(const uint16_t *x, int64_t x_row_stride,    /* bf16 [rows, in], unit column stride */
              const uint16_t *packed,                      /* bf16 [out / 16, in / 2, 32] */
              const uint16_t *bias,                        /* bf16 [out] or NULL */
              uint16_t *y, int64_t y_row_stride,           /* bf16 [rows, out], unit columns */
              int64_t rows_total, int64_t out, int64_t in)
{
    return gemm_bf16_panels(x, x_row_stride, packed, NULL, NULL, bias, y, y_row_stride,
                            rows_total, out, in);
}

#else  /* no AVX512-BF16: callers use oneDNN */

int gemm_bf16_available(void) { return 0; }

int gemm_bf16_panels(const uint16_t *x, int64_t x_row_stride, const uint16_t *packed,
                     panel_source source, const void *context, const uint16_t *bias,
                     uint16_t *y, int64_t y_row_stride, int64_t rows_total, int64_t out,
                     int64_t in)
{
    (void)x; (void)x_row_stride; (void)packed; (void)source; (void)context; (void)bias; (void)y;
    (void)y_row_stride; (void)rows_total; (void)out; (void)in;
    return -2;
}

int gemm_bf16(const uint16_t *x, int64_t x_row_stride, const uint16_t *packed,
              const uint16_t *bias, uint16_t *y, int64_t y_row_stride, int64_t rows_total,
              int64_t out, int64_t in)
{
    (void)x; (void)x_row_stride; (void)packed; (void)bias; (void)y; (void)y_row_stride;
    (void)rows_total; (void)out; (void)in;
    return -1;
}

#endif
