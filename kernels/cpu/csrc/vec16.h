/* 16-float vectors (one AVX-512 register; two AVX2 ones elsewhere) for the CPU kernels:
 * bf16 widening/narrowing, max, and exp as a polynomial (glibc's expf does not vectorize here).
 * The bf16 -> fp32 widening lives here once, scalar (bf16_to_float) and 16-wide (widen_bf16),
 * for every C source. */
#ifndef LLMSERVE_VEC16_H
#define LLMSERVE_VEC16_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static inline v16f splat(float x) { return (v16f){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

/* lanes of a where mask is set (all ones), else lanes of b */
static inline v16f select16(v16i mask, v16f a, v16f b) {
    return (v16f)((mask & (v16i)a) | (~mask & (v16i)b));
}

static inline v16f vmax(v16f a, v16f b) { return select16(a > b, a, b); }

/* bf16 bits -> the fp32 value they stand for: bf16 is the upper half of an fp32 */
static inline float bf16_to_float(uint16_t bits) {
    union { uint32_t u; float f; } value;
    value.u = (uint32_t)bits << 16;
    return value.f;
}

/* 16-bit lanes zero-extended to 32 bits */
static inline v16u widen16(v16h half) {
#if defined(__AVX512F__)   /* one vpmovzxwd; gcc splits the generic conversion in two */
    return (v16u)_mm512_cvtepu16_epi32((__m256i)half);
#else
    return __builtin_convertvector(half, v16u);
#endif
}

static inline v16h pack16(v16u wide) {   /* low 16 bits of each lane */
#if defined(__AVX512F__)   /* one vpmovdw; gcc picks a slow word permute otherwise */
    return (v16h)_mm512_cvtepi32_epi16((__m512i)wide);
#else
    return __builtin_convertvector(wide, v16h);
#endif
}

/* bf16_to_float on 16 lanes */
static inline v16f widen_bf16(v16h half) {
    return (v16f)(widen16(half) << 16);
}

/* 16 values at base + offset (elements), widened to fp32 when is_bf16 */
static inline v16f load16(const void *base, int64_t offset, int is_bf16) {
    v16f out;
    if (is_bf16) {
        v16h half;
        memcpy(&half, (const uint16_t *)base + offset, sizeof(half));
        out = widen_bf16(half);
    } else {
        memcpy(&out, (const float *)base + offset, sizeof(out));
    }
    return out;
}

/* fp32 -> bf16 bits, round to nearest even; NaN stays NaN. With AVX512-BF16 one vcvtneps2bf16
 * (2x faster RMSNorm/RoPE, 1.4x SiLU here), which flushes results below bf16's smallest normal
 * (1.2e-38) to zero where torch keeps them as subnormals: values no activation reaches. */
static inline v16h narrow16(v16f f) {
#if defined(__AVX512BF16__)
    return (v16h)_mm512_cvtneps_pbh((__m512)f);
#else
    const v16u bits = (v16u)f;
    const v16u rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const v16i is_nan = (v16i)((bits & 0x7fffffffu) > 0x7f800000u);
    const v16u quiet = (bits >> 16) | 0x40u;
    return pack16((v16u)((is_nan & (v16i)quiet) | (~is_nan & (v16i)rounded)));
#endif
}

/* the value a bf16 tensor holds after storing f */
static inline v16f round_bf16(v16f f) { return widen_bf16(narrow16(f)); }

static inline void store16(void *base, int64_t offset, int is_bf16, v16f value) {
    if (is_bf16) {
        const v16h half = narrow16(value);
        memcpy((uint16_t *)base + offset, &half, sizeof(half));
    } else {
        memcpy((float *)base + offset, &value, sizeof(value));
    }
}

static inline float sum16(v16f v) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

static inline float max16(v16f v) {
    float m = v[0];
    for (int i = 1; i < 16; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* exp(x) within 2 ulp of expf for x in [-80, 88]; 0 below -80, exp(88) above 88.
 * Cephes' reduction: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 polynomial. */
static inline v16f vexp(v16f x) {
    const v16i keep = x >= splat(-80.0f);
    x = vmax(x, splat(-80.0f));
    x = select16(x > splat(88.0f), splat(88.0f), x);
    /* n = round(x / ln2): x / ln2 + 128.5 > 0, so truncation is floor */
    const v16i n = __builtin_convertvector(x * splat(1.44269504088896341f) + splat(128.5f), v16i)
                   - 128;
    const v16f nf = __builtin_convertvector(n, v16f);
    const v16f r = (x - nf * splat(0.693359375f)) + nf * splat(2.12194440e-4f);
    v16f p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * (r * r) + r + splat(1.0f);
    const v16i scaled = (v16i)p + (n << 23);   /* p * 2^n; -116 <= n <= 127: stays finite */
    return (v16f)(scaled & keep);
}

#endif
