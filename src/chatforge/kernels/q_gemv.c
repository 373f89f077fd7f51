/* chatforge's CPU kernels for batch-1 decoding (loaded with ctypes by chatforge/kernels/__init__.py).

   Decoding one token reads every weight once, so its speed is the speed at which weights stream from
   memory. These kernels read ggml's block formats as they lie in a GGUF file (Q4_0, Q4_1, Q8_0: 32
   weights per block with an fp16 scale), plain fp32 and bf16, multiply them with a few rows of fp32
   activations (y = x W^T, 1..n rows) and split the output rows between OpenMP threads (the same
   OpenMP runtime torch uses, so no second pool of threads competes with torch's).

   cf_gemv reads the blocks row by row. With exact fp32 activations the weights are widened to fp32: the
   result is the dequantized weight times x, up to fp32 rounding. Per block, with q the stored integers and
   sx the sum of the 32 activations it meets:
       Q4_0: w = d (q - 8)  ->  d * sum(q x) - 8 d sx
       Q4_1: w = d q + m    ->  d * sum(q x) + m sx
       Q8_0: w = d q        ->  d * sum(q x)
   (AVX-512 looks each block's 16 possible weights up in a table instead.) In int8 mode (int8x, llama.cpp's
   way, chatforge's default) the activations are first rounded to int8 blocks and the products are
   integer. cf_gemv8 reads the same blocks repacked in groups of 8 rows (cf_repack8), where one integer
   dot instruction serves 8 rows at once: the default layout, and at a prefill's hundreds of rows an
   int8 GEMM. The small ops around the multiplies of one decoding step (RMSNorm, rotary, attention of a
   few queries over the cache, SwiGLU) are here too, one call each, and cf_block_step runs a whole
   decoder block of a step in one call.

   Compiled once per instruction set: -mavx512f... (CF_ISA "avx512"), -mavx2 -mfma -mf16c ("avx2")
   or nothing ("generic", plain C). The same source, the #if's pick the inner loops. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CF_AVX2 1
#include <immintrin.h>
#endif
#if defined(CF_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CF_AVX512 1
#endif
#if defined(CF_AVX2) && (defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__))
#define CF_VNNI 1 /* u8 x s8 dot products of 4, summed into int32 lanes, in one instruction */
#define X8_Q8_BIAS -128.0f /* a repacked Q8_0 block's offset term: its stored w + 128 met x (see cf_repack8) */
#else
#define X8_Q8_BIAS 0.0f /* without VNNI the loop takes the 128 back off the weights first */
#endif

#define EXPORT __attribute__((visibility("default")))
#define INLINE static inline __attribute__((always_inline))

/* ggml's type ids */
enum { T_F32 = 0, T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8, T_BF16 = 30 };
#define QK 32 /* weights per block */
#define PREFETCH 8192 /* bytes ahead in each weight row that dot4 asks the cache for (512 to 8192: SmolLM2 decoding
   with exact activations on an AMD EPYC, 146 to 170 tokens/s) */

EXPORT int cf_isa(void) {
#if defined(CF_AVX512)
    return 2;
#elif defined(CF_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* ---- scalars --------------------------------------------------------------------------------- */

INLINE float f16_to_f32(uint16_t h) {
#if defined(CF_AVX2)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

INLINE uint16_t load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

INLINE float bf16_to_f32(uint16_t b) { uint32_t bits = (uint32_t)b << 16; float f; memcpy(&f, &bits, 4); return f; }

/* exp(x) for the softmax and SiLU: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], a degree-6 polynomial
   (relative error ~2e-7); plain float code that the compiler vectorises in `omp simd` loops. */
INLINE float cf_exp(float x) {
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f / 720 ;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

static int64_t block_bytes(int type) {
    switch (type) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q8_0: return 34;
    default: return 0;
    }
}

/* ---- one weight row times up to 4 activation rows ------------------------------------------------ */
/* row: the weight row's bytes; x: n activation rows of `cols` (stride ldx); sx: per activation row the
   sums of its blocks (Q4_0 and Q4_1 only); out[i] = row . x_i. N is a constant at each call site, so
   the compiler unrolls the loops over it. */

#if defined(CF_AVX2)
INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* A Q4_0 / Q4_1 block's scale d and offset m (w = d q + m; Q4_0's m is -8 d) */
INLINE void q4_scale(const int type, const uint8_t *blk, float *d, float *m) {
#if defined(CF_AVX2)
    if (type == T_Q4_1) { /* both fp16 values converted by one instruction */
        int32_t dm32;
        memcpy(&dm32, blk, 4);
        const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm32));
        *d = _mm_cvtss_f32(dm);
        *m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
        return;
    }
#endif
    *d = f16_to_f32(load_u16(blk));
    *m = type == T_Q4_0 ? -8.0f * *d : f16_to_f32(load_u16(blk + 2));
}

#if defined(CF_AVX512)
/* The block's 32 weights as two vectors (0..15, 16..31): a table of its 16 possible values d q + m,
   looked up by each nibble (the permute reads an index's low 4 bits), so they come out scaled and
   offset in one instruction each. Q8_0: widened and scaled. */
INLINE void q4_weights512(const int type, const uint8_t *blk, __m512 *lo, __m512 *hi) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    float d, m;
    q4_scale(type, blk, &d, &m);
    const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(d), _mm512_set1_ps(m));
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + (type == T_Q4_0 ? 2 : 4))));
    *lo = _mm512_permutexvar_ps(v, table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}

INLINE void q8_weights512(const uint8_t *blk, __m512 *lo, __m512 *hi) {
    const __m512 dv = _mm512_set1_ps(f16_to_f32(load_u16(blk)));
    *lo = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)))));
    *hi = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)))));
}
#elif defined(CF_AVX2)
/* The block's integers as four vectors of 8 (weights 0..7, 8..15, 16..23, 24..31), unscaled: the caller
   scales the block's dot product by d once (and adds Q4's offsets through the activations' block sums) */
INLINE void q4_ints256(const uint8_t *qs, __m256 w[4]) {
    const __m256i m15 = _mm256_set1_epi32(15);
    const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    const __m256i v0 = _mm256_cvtepu8_epi32(raw), v1 = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(raw, raw));
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, m15));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, m15));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
}

INLINE void q8_ints256(const uint8_t *qs, __m256 w[4]) {
    for (int k = 0; k < 4; k++)
        w[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * k))));
}

/* sum over the block of w x, for x's 32 values at xb */
INLINE __m256 block_dot256(const __m256 w[4], const float *xb) {
    __m256 s0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
    __m256 s1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xb + 8));
    s0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), s0);
    s1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), s1);
    return _mm256_add_ps(s0, s1);
}
#endif

/* One weight row of a block type times N activation rows: out[i] = row . x_i over nb blocks. */
INLINE void row_blocks(const int type, const uint8_t *row, const float *x, int64_t ldx, const float *sx,
                       int64_t lds, int64_t nb, const int N, float *out) {
    const int64_t bb = block_bytes(type);
#if defined(CF_AVX512)
    (void)sx, (void)lds;
    __m512 acc0[4], acc1[4];
    for (int i = 0; i < N; i++) acc0[i] = acc1[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 lo, hi;
        if (type == T_Q8_0)
            q8_weights512(row + b * bb, &lo, &hi);
        else
            q4_weights512(type, row + b * bb, &lo, &hi);
        for (int i = 0; i < N; i++) {
            const float *xb = x + i * ldx + b * QK;
            acc0[i] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc0[i]);
            acc1[i] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), acc1[i]);
        }
    }
    for (int i = 0; i < N; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i]));
#elif defined(CF_AVX2)
    float off[4] = {0, 0, 0, 0};
    __m256 acc[4], w[4];
    for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        float d, m = 0;
        if (type == T_Q8_0) {
            d = f16_to_f32(load_u16(blk));
            q8_ints256(blk + 2, w);
        } else {
            q4_scale(type, blk, &d, &m);
            q4_ints256(blk + (type == T_Q4_0 ? 2 : 4), w);
        }
        const __m256 dv = _mm256_set1_ps(d);
        for (int i = 0; i < N; i++) {
            acc[i] = _mm256_fmadd_ps(dv, block_dot256(w, x + i * ldx + b * QK), acc[i]);
            if (type != T_Q8_0) off[i] += m * sx[i * lds + b];
        }
    }
    for (int i = 0; i < N; i++) out[i] = hsum256(acc[i]) + off[i];
#else
    float acc[4] = {0, 0, 0, 0};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        for (int i = 0; i < N; i++) {
            const float *xb = x + i * ldx + b * QK;
            float s = 0;
            if (type == T_Q8_0) {
                const int8_t *q = (const int8_t *)(blk + 2);
                for (int j = 0; j < QK; j++) s += (float)q[j] * xb[j];
                acc[i] += f16_to_f32(load_u16(blk)) * s;
            } else {
                float d, m;
                q4_scale(type, blk, &d, &m);
                const uint8_t *q = blk + (type == T_Q4_0 ? 2 : 4);
                for (int j = 0; j < 16; j++) s += (float)(q[j] & 15) * xb[j] + (float)(q[j] >> 4) * xb[j + 16];
                acc[i] += d * s + m * sx[i * lds + b];
            }
        }
    }
    for (int i = 0; i < N; i++) out[i] = acc[i];
#endif
}

/* fp32 (type T_F32) or bf16 (T_BF16) weights: any number of columns */
INLINE void row_float(const int type, const uint8_t *row, const float *x, int64_t ldx, int64_t cols, const int N,
                      float *out) {
    const float *wf = (const float *)row;
    const uint16_t *wb = (const uint16_t *)row;
    int64_t k = 0;
    float tail[4] = {0, 0, 0, 0};
#if defined(CF_AVX512)
    __m512 a0[4], a1[4];
    for (int i = 0; i < N; i++) a0[i] = a1[i] = _mm512_setzero_ps();
    for (; k + 32 <= cols; k += 32) {
        __m512 w0, w1;
        if (type == T_F32) {
            w0 = _mm512_loadu_ps(wf + k);
            w1 = _mm512_loadu_ps(wf + k + 16);
        } else {
            w0 = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(wb + k))), 16));
            w1 = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(wb + k + 16))), 16));
        }
        for (int i = 0; i < N; i++) {
            a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * ldx + k), a0[i]);
            a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * ldx + k + 16), a1[i]);
        }
    }
    for (int i = 0; i < N; i++) tail[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
#elif defined(CF_AVX2)
    __m256 a0[4], a1[4];
    for (int i = 0; i < N; i++) a0[i] = a1[i] = _mm256_setzero_ps();
    for (; k + 16 <= cols; k += 16) {
        __m256 w0, w1;
        if (type == T_F32) {
            w0 = _mm256_loadu_ps(wf + k);
            w1 = _mm256_loadu_ps(wf + k + 8);
        } else {
            w0 = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(wb + k))), 16));
            w1 = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(wb + k + 8))), 16));
        }
        for (int i = 0; i < N; i++) {
            a0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * ldx + k), a0[i]);
            a1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * ldx + k + 8), a1[i]);
        }
    }
    for (int i = 0; i < N; i++) tail[i] = hsum256(_mm256_add_ps(a0[i], a1[i]));
#endif
    for (; k < cols; k++) {
        const float w = type == T_F32 ? wf[k] : bf16_to_f32(wb[k]);
        for (int i = 0; i < N; i++) tail[i] += w * x[i * ldx + k];
    }
    for (int i = 0; i < N; i++) out[i] = tail[i];
}

/* The activation rows a multiply reads: fp32 rows (x, and for AVX2's Q4 loops the sum of each block, sx),
   or in int8 mode each 32-value block quantized to int8 q with a scale d (x ~ d q) and an offset term o:
   Q4_0 -8 d sum(q) (its weights are q_w - 8), Q4_1 the block's exact sum (times its minimum). */
typedef struct {
    const float *x, *sx;
    const int8_t *q;
    const float *d, *o;
    int64_t cols, nb; /* per row: values, blocks */
} acts_t;

#if defined(CF_AVX2)
/* ---- int8 activations (llama.cpp's way): 32 products of a block in two integer instructions ---- */

/* u8 x s8 -> 8 fp32 partial sums (pairs summed in int16: at most 2 * 255 * 127, no overflow) */
INLINE __m256 dot_u8s8(__m256i u, __m256i s) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

/* a block's weights times the int8 activation block xq: the integer dot as 8 partial sums; *dw its scale,
   *mw what multiplies the activations' offset term (Q4_0: d; Q4_1: m; Q8_0: none) */
INLINE __m256 block_i8(const int type, const uint8_t *blk, __m256i xq, float *dw, float *mw) {
    if (type == T_Q8_0) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));
        *dw = f16_to_f32(load_u16(blk));
        *mw = 0;
        return dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w)); /* |w| x (x with w's sign) */
    }
    q4_scale(type, blk, dw, mw);
    if (type == T_Q4_0) *mw = *dw;
    const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + (type == T_Q4_0 ? 2 : 4))), m4 = _mm_set1_epi8(15);
    const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_and_si128(raw, m4));
    return dot_u8s8(q, xq);
}

INLINE void row_blocks_i8(const int type, const uint8_t *row, const acts_t *a, int64_t i0, int64_t b0, int64_t nb,
                          const int N, float *out) {
    const int64_t bb = block_bytes(type);
    __m256 acc[4];
    float off[4] = {0, 0, 0, 0};
    for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = b0; b < b0 + nb; b++) {
        const uint8_t *blk = row + b * bb;
        for (int i = 0; i < N; i++) {
            const int64_t at = (i0 + i) * a->nb + b;
            float dw, mw;
            const __m256 p = block_i8(type, blk, _mm256_loadu_si256((const __m256i *)(a->q + at * QK)), &dw, &mw);
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a->d[at]), p, acc[i]);
            off[i] += mw * a->o[at];
        }
    }
    for (int i = 0; i < N; i++) out[i] = hsum256(acc[i]) + off[i];
}
#endif

/* row . x_i for activation rows i0..i0+N-1, over columns k0..k1 (whole blocks for the block types) */
INLINE void row_dot(const int type, const uint8_t *row, const acts_t *a, int64_t i0, int64_t k0, int64_t k1,
                    const int N, float *out) {
    const int64_t b0 = k0 / QK, nb = (k1 - k0) / QK, cols = a->cols;
#if defined(CF_AVX2)
    if (a->q) {
        switch (type) {
        case T_Q4_0: row_blocks_i8(T_Q4_0, row, a, i0, b0, nb, N, out); return;
        case T_Q4_1: row_blocks_i8(T_Q4_1, row, a, i0, b0, nb, N, out); return;
        default: row_blocks_i8(T_Q8_0, row, a, i0, b0, nb, N, out); return;
        }
    }
#endif
    const float *x = a->x + i0 * cols + k0, *sx = a->sx ? a->sx + i0 * a->nb + b0 : 0;
    switch (type) {
    case T_Q4_0: row_blocks(T_Q4_0, row + b0 * 18, x, cols, sx, a->nb, nb, N, out); break;
    case T_Q4_1: row_blocks(T_Q4_1, row + b0 * 20, x, cols, sx, a->nb, nb, N, out); break;
    case T_Q8_0: row_blocks(T_Q8_0, row + b0 * 34, x, cols, 0, a->nb, nb, N, out); break;
    case T_F32: row_float(T_F32, row + k0 * 4, x, cols, k1 - k0, N, out); break;
    default: row_float(T_BF16, row + k0 * 2, x, cols, k1 - k0, N, out); break;
    }
}

/* Four weight rows (rb bytes apart) times one activation row, whole rows, for the block types: each
   activation block is loaded once for the four, and four independent sums keep the vector units busy.
   Rows of a few hundred columns (a 135M model's) spend a good part of their time starting and ending;
   four at a time, they do that a quarter as often. The caller takes rows a quarter of its range apart:
   four sequential streams from memory, which measured 1.1-2.5x faster than four neighbouring rows (on
   those the loads of one cache line wait on each other); each row is prefetched PREFETCH bytes ahead.
   Returns 0 where it has no such loop (the caller then takes the rows one by one). */
INLINE int dot4(const int type, const uint8_t *w, int64_t rb, const acts_t *a, float *out) {
    const int64_t nb = a->nb, bb = block_bytes(type);
    const float *x = a->x, *sx = a->sx;
    if (!bb) return 0;
#if defined(CF_AVX2)
    if (a->q) {
        __m256 acc[4];
        float off[4] = {0, 0, 0, 0};
        for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const __m256i xq = _mm256_loadu_si256((const __m256i *)(a->q + b * QK));
            const float dx = a->d[b], ox = a->o[b];
            for (int r = 0; r < 4; r++) {
                _mm_prefetch((const char *)(w + r * rb + b * bb + PREFETCH), _MM_HINT_T0);
                float dw, mw;
                const __m256 p = block_i8(type, w + r * rb + b * bb, xq, &dw, &mw);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), p, acc[r]);
                off[r] += mw * ox;
            }
        }
        for (int r = 0; r < 4; r++) out[r] = hsum256(acc[r]) + off[r];
        return 1;
    }
#endif
#if defined(CF_AVX512)
    (void)sx;
    __m512 a0[4], a1[4];
    for (int r = 0; r < 4; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m512 x0 = _mm512_loadu_ps(x + b * QK), x1 = _mm512_loadu_ps(x + b * QK + 16);
        for (int r = 0; r < 4; r++) {
            _mm_prefetch((const char *)(w + r * rb + b * bb + PREFETCH), _MM_HINT_T0);
            __m512 lo, hi;
            if (type == T_Q8_0)
                q8_weights512(w + r * rb + b * bb, &lo, &hi);
            else
                q4_weights512(type, w + r * rb + b * bb, &lo, &hi);
            a0[r] = _mm512_fmadd_ps(lo, x0, a0[r]);
            a1[r] = _mm512_fmadd_ps(hi, x1, a1[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
    return 1;
#elif defined(CF_AVX2)
    __m256 acc[4], wv[4];
    float off[4] = {0, 0, 0, 0};
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        for (int r = 0; r < 4; r++) {
            const uint8_t *blk = w + r * rb + b * bb;
            _mm_prefetch((const char *)(blk + PREFETCH), _MM_HINT_T0);
            float d, m = 0;
            if (type == T_Q8_0) {
                d = f16_to_f32(load_u16(blk));
                q8_ints256(blk + 2, wv);
            } else {
                q4_scale(type, blk, &d, &m);
                q4_ints256(blk + (type == T_Q4_0 ? 2 : 4), wv);
                off[r] += m * sx[b];
            }
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), block_dot256(wv, xb), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum256(acc[r]) + off[r];
    return 1;
#else
    (void)w, (void)rb, (void)x, (void)sx, (void)nb, (void)out;
    return 0;
#endif
}

#define ROW_GROUP 8 /* weight rows multiplied together, a column chunk at a time */
#define COL_CHUNK 1024 /* columns per chunk when several activation rows share it: theirs stay in L1 */

/* Output rows r0..r1 of cf_gemv. One activation row: each weight row whole. Several: groups of
   ROW_GROUP weight rows, each chunk of COL_CHUNK columns of up to 4 activation rows (16 kB) times
   every row of the group, so the activations are read from L1 and the weights once from memory. */
static void rows_range(int type, const uint8_t *w, int64_t row_bytes, int64_t r0, int64_t r1, const acts_t *a,
                       int64_t n, float *y, int64_t ldy, const float *bias) {
    const int64_t cols = a->cols, chunk = n > 1 ? COL_CHUNK : cols;
    float out[4], part[ROW_GROUP][4];
    if (n == 1 && r1 - r0 >= 4) { /* one activation row: rows r, r + q, r + 2q, r + 3q together */
        const int64_t q = (r1 - r0) / 4;
        int64_t i = 0;
        for (; i < q && dot4(type, w + (r0 + i) * row_bytes, q * row_bytes, a, out); i++)
            for (int r = 0; r < 4; r++) y[r0 + i + r * q] = out[r] + (bias ? bias[r0 + i + r * q] : 0.0f);
        if (i == q) r0 += 4 * q; /* the rest, fewer than 4 rows, one by one below */
    }
    for (int64_t g0 = r0; g0 < r1; g0 += ROW_GROUP) {
        const int64_t g1 = g0 + ROW_GROUP < r1 ? g0 + ROW_GROUP : r1;
        for (int64_t i0 = 0; i0 < n; i0 += 4) {
            const int64_t m = n - i0 < 4 ? n - i0 : 4;
            memset(part, 0, sizeof(part));
            for (int64_t k0 = 0; k0 < cols; k0 += chunk) {
                const int64_t k1 = k0 + chunk < cols ? k0 + chunk : cols;
                for (int64_t r = g0; r < g1; r++) {
                    const uint8_t *row = w + r * row_bytes;
                    switch (m) { /* constant N per call: the loops over activation rows unroll */
                    case 1: row_dot(type, row, a, i0, k0, k1, 1, out); break;
                    case 2: row_dot(type, row, a, i0, k0, k1, 2, out); break;
                    case 3: row_dot(type, row, a, i0, k0, k1, 3, out); break;
                    default: row_dot(type, row, a, i0, k0, k1, 4, out); break;
                    }
                    for (int64_t i = 0; i < m; i++) part[r - g0][i] += out[i];
                }
            }
            for (int64_t r = g0; r < g1; r++)
                for (int64_t i = 0; i < m; i++) y[(i0 + i) * ldy + r] = part[r - g0][i] + (bias ? bias[r] : 0.0f);
        }
    }
}

#if defined(CF_AVX2)
/* int8 mode's activations: each block of 32 values as int8 q with x ~ d q (d = max |x| / 127, q rounded),
   and its offset term (Q4_0: -8 d sum(q); Q4_1: the exact sum of x) */
static void quantize_acts(int type, const float *x, int64_t blocks, int8_t *q, float *d, float *o) {
    for (int64_t b = 0; b < blocks; b++) {
        const float *xb = x + b * QK;
        float amax = 0, sum = 0;
        for (int j = 0; j < QK; j++) {
            amax = fmaxf(amax, fabsf(xb[j]));
            sum += xb[j];
        }
        const float db = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
        int sq = 0;
        for (int j = 0; j < QK; j++) {
            const int v = (int)nearbyintf(xb[j] * inv);
            q[b * QK + j] = (int8_t)v;
            sq += v;
        }
        d[b] = db;
        /* Q8_0 repacked for VNNI holds w + 128 (see cf_repack8): 128 sum(q) too many */
        o[b] = type == T_Q4_0 ? -8.0f * db * (float)sq : type == T_Q4_1 ? sum : X8_Q8_BIAS * db * (float)sq;
    }
}
#endif

/* Threads for `work` multiply-adds: one more per 256k of them (~15 us of work), at most nthreads. A fork
   and join costs a few microseconds when the threads are idle, and a whole time slice when another
   process has taken a core: small multiplies stay on one thread. */
static int threads_for(int64_t work, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    int64_t most = work / 262144;
    return most < 1 ? 1 : (most < nthreads ? (int)most : nthreads);
}

/* y[i, r] = sum_k W[r, k] x[i, k] (+ bias[r]) for r < rows, i < n. W: `rows` rows of `row_bytes` bytes of
   `type`; x: n x cols fp32, contiguous; y: row i at y + i * ldy. int8x (block types, AVX2 and up): the
   activations quantized to int8 blocks first (quantize_acts), the products then integer (about half the
   work of widening every weight to fp32; x's rounding, 1/254 of each block's largest value, is what that
   costs); else exact up to fp32 rounding. Returns 0, -1 for a shape the type cannot have, -2 out of memory. */
EXPORT int cf_gemv(int type, const void *w, int64_t row_bytes, int64_t rows, int64_t cols, const float *x, int64_t n,
                   float *y, int64_t ldy, const float *bias, int int8x, int nthreads) {
    const int quant = type == T_Q4_0 || type == T_Q4_1 || type == T_Q8_0;
    if (quant ? (cols % QK || row_bytes < cols / QK * block_bytes(type)) :
                (type != T_F32 && type != T_BF16) || row_bytes < cols * (type == T_F32 ? 4 : 2))
        return -1;
    acts_t a = {x, 0, 0, 0, 0, cols, cols / QK};
    void *scratch = 0;
#if defined(CF_AVX2)
    if (quant && int8x) {
        scratch = malloc((size_t)(n * cols) + 2 * sizeof(float) * (size_t)(n * a.nb));
        if (!scratch) return -2;
        float *d = (float *)scratch, *o = d + n * a.nb;
        int8_t *q = (int8_t *)(o + n * a.nb);
        quantize_acts(type, x, n * a.nb, q, d, o);
        a.q = q, a.d = d, a.o = o;
    }
#else
    (void)int8x;
#endif
#if !defined(CF_AVX512) /* the AVX-512 loop folds the offsets into its tables */
    if (!a.q && (type == T_Q4_0 || type == T_Q4_1)) { /* per activation row, the sum of each block */
        float *sx = (float *)malloc(sizeof(float) * (size_t)(n * a.nb));
        if (!sx) return -2;
        for (int64_t i = 0; i < n * a.nb; i++) {
            float s = 0;
            for (int j = 0; j < QK; j++) s += x[i * QK + j];
            sx[i] = s;
        }
        a.sx = sx;
        scratch = sx;
    }
#endif
    const int nt = threads_for(rows * cols * (n < 4 ? n : 4), nthreads);
    if (nt == 1) {
        rows_range(type, (const uint8_t *)w, row_bytes, 0, rows, &a, n, y, ldy, bias);
    } else {
#pragma omp parallel num_threads(nt)
        {
#ifdef _OPENMP
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
            const int t = 0, T = 1;
#endif
            /* contiguous slices of whole 16-row groups: each thread streams its own part of W */
            const int64_t groups = (rows + 15) / 16;
            const int64_t g0 = groups * t / T, g1 = groups * (t + 1) / T;
            const int64_t r0 = g0 * 16, r1 = g1 * 16 < rows ? g1 * 16 : rows;
            if (r0 < r1) rows_range(type, (const uint8_t *)w, row_bytes, r0, r1, &a, n, y, ldy, bias);
        }
    }
    free(scratch);
    return 0;
}

/* ---- 8 rows interleaved, for int8 activations (the idea of llama.cpp's repacked Q4_0; our own layout) ----
   A Q4_0 / Q4_1 / Q8_0 matrix repacked by cf_repack8: rows 8g..8g+7 form group g, and each block column b
   of a group holds the 8 rows' fp16 scales, (Q4_1) their 8 fp16 minimums, then chunks of 32 bytes, chunk c
   holding quant bytes 4c..4c+3 of row 0, then of row 1, ... row 7 (Q4: 4 chunks; Q8_0: 8, each byte
   stored as w + 128, unsigned, for the u8 x s8 instruction). So the 32-bit lane r of a chunk is 4 of row
   r's weights (Q4: 4c..4c+3 in the low nibbles, 16+4c..19+4c in the high ones): one integer dot
   instruction multiplies 4 weights of each of 8 rows by the same 4 activations and leaves row r's sum in
   lane r, and the 8 rows' scales are one vector. Per block of 8 Q4 rows: 4 loads, 8 dot instructions and
   3 float ops, where a row at a time takes a horizontal sum and scalar scale work per row. Rows past the
   matrix's end (its last group) are zeros. */
#define X8_TILE 4 /* groups a thread multiplies by all activation rows before the next ones */
#define X8_AHEAD 12288 /* bytes ahead of the block being read that each block's loads are prefetched: measured on
   an AMD EPYC over a 135M model's 120 matrices (66 MB, one thread): 1 kB ahead 24 GB/s, 4 kB 28, 8 kB 31-34,
   12 kB 33-35, 16 kB 26-31; one 84 MB matrix went from 34 to 47 GB/s (torch's fp32 sum: 43) */
INLINE int64_t x8_bytes(int type) { return 8 * block_bytes(type); } /* one block column of a group */
INLINE int64_t x8_head(int type) { return type == T_Q4_1 ? 32 : 16; } /* its scales (and minimums) */
INLINE int x8_packed(int type) { return type == T_Q4_0 || type == T_Q4_1 || type == T_Q8_0; }

/* Repack `rows` rows (row_bytes apart) of Q4_0 / Q4_1 blocks into groups of 8 (out: ceil(rows/8) groups
   of nb * x8_bytes bytes). Returns -1 for another type. */
EXPORT int cf_repack8(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t cols, uint8_t *out) {
    if (!x8_packed(type) || cols % QK) return -1;
    const int64_t nb = cols / QK, bb = block_bytes(type), xb = x8_bytes(type), hdr = x8_head(type);
    const int64_t groups = (rows + 7) / 8, chunks = type == T_Q8_0 ? 8 : 4, at = bb - 4 * chunks;
    memset(out, 0, (size_t)(groups * nb * xb));
    for (int64_t r = 0; r < rows; r++) {
        const int64_t g = r / 8, lane = r % 8;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + r * row_bytes + b * bb;
            uint8_t *dst = out + (g * nb + b) * xb;
            memcpy(dst + 2 * lane, blk, 2);
            if (type == T_Q4_1) memcpy(dst + 16 + 2 * lane, blk + 2, 2);
            for (int64_t c = 0; c < chunks; c++) {
                memcpy(dst + hdr + 32 * c + 4 * lane, blk + at + 4 * c, 4);
                if (type == T_Q8_0)
                    for (int j = 0; j < 4; j++) dst[hdr + 32 * c + 4 * lane + j] ^= 0x80;
            }
        }
    }
    return 0;
}

/* out[i, :] = fp32 row idx[i] (or i) of a repacked matrix */
EXPORT int cf_dequantize8(int type, const uint8_t *w, int64_t rows, int64_t cols, const int64_t *idx, float *out,
                          int nthreads) {
    if (!x8_packed(type) || cols % QK) return -1;
    const int64_t nb = cols / QK, xb = x8_bytes(type), hdr = x8_head(type);
    const int nt = threads_for(rows * cols, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t i = 0; i < rows; i++) {
        const int64_t r = idx ? idx[i] : i, g = r / 8, lane = r % 8;
        float *o = out + i * cols;
        for (int64_t b = 0; b < nb; b++, o += QK) {
            const uint8_t *src = w + (g * nb + b) * xb;
            const float d = f16_to_f32(load_u16(src + 2 * lane));
            if (type == T_Q8_0) {
                for (int c = 0; c < 8; c++)
                    for (int j = 0; j < 4; j++) o[4 * c + j] = d * (float)(int8_t)(src[hdr + 32 * c + 4 * lane + j] ^ 0x80);
                continue;
            }
            const float m = type == T_Q4_1 ? f16_to_f32(load_u16(src + 16 + 2 * lane)) : -8.0f * d;
            for (int c = 0; c < 4; c++)
                for (int j = 0; j < 4; j++) {
                    const uint8_t q = src[hdr + 32 * c + 4 * lane + j];
                    o[4 * c + j] = d * (float)(q & 15) + m;
                    o[16 + 4 * c + j] = d * (float)(q >> 4) + m;
                }
        }
    }
    return 0;
}

#if defined(CF_AVX2)
/* 4 bytes of every lane of u (u8) times the same 4 of x (s8), summed into the int32 lanes of acc */
INLINE __m256i dot4_u8s8(__m256i acc, __m256i u, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, x);
#elif defined(CF_VNNI)
    return _mm256_dpbusd_avx_epi32(acc, u, x);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
#endif
}

INLINE __m256i bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }

/* per lane (row) r: the sum over one block's 32 weights of row r times the activation block xq (int32) */
INLINE __m256i x8_dot(const int type, const uint8_t *qs, const int8_t *xq) {
    __m256i s = _mm256_setzero_si256();
    if (type == T_Q8_0) {
        for (int c = 0; c < 8; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c)), x = bcast4(xq + 4 * c);
#if defined(CF_VNNI)
            s = dot4_u8s8(s, v, x); /* (w + 128) x: X8_Q8_BIAS takes the 128 sum(x) off */
#else /* w back to signed; |w| times x with w's sign keeps each pair of products within int16 */
            const __m256i w = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
            s = dot4_u8s8(s, _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
#endif
        }
        return s;
    }
    const __m256i m4 = _mm256_set1_epi8(15);
#if defined(CF_VNNI)
    for (int c = 0; c < 4; c++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        s = dot4_u8s8(s, _mm256_and_si256(v, m4), bcast4(xq + 4 * c));
        s = dot4_u8s8(s, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), bcast4(xq + 16 + 4 * c));
    }
    return s;
#else /* pairs summed in int16: 8 chunks of at most 2 * 15 * 127 stay below 32767, widened once */
    for (int c = 0; c < 4; c++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(v, m4), bcast4(xq + 4 * c)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), bcast4(xq + 16 + 4 * c)));
    }
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
#endif
}

INLINE void x8_prefetch(const uint8_t *src, int64_t xb) {
    for (int64_t at = 0; at < xb; at += 64) _mm_prefetch((const char *)(src + X8_AHEAD + at), _MM_HINT_T0);
}

/* group g's 8 sums (one lane per row) for N activation rows into y, bias added, rows past `rows` dropped */
INLINE void x8_store(const __m256 *acc, const int N, int64_t g, int64_t rows, int64_t i0, float *y, int64_t ldy,
                     const float *bias) {
    for (int i = 0; i < N; i++) {
        float out[8];
        _mm256_storeu_ps(out, acc[i]);
        for (int r = 0; r < 8 && g * 8 + r < rows; r++) y[(i0 + i) * ldy + g * 8 + r] = out[r] + (bias ? bias[g * 8 + r] : 0.0f);
    }
}

/* The exact loop: fp32 activations (x, and for Q4 sx: each block's sum), the weights widened one position
   of 8 rows at a time: lane r of a chunk's byte j is row r's weight there (Q4: 4c+j in the low nibble,
   16+4c+j in the high one; Q8_0: 4c+j, less 128), multiplied by the one activation every row meets. */
INLINE void x8_groups_f32(const int type, const uint8_t *w, int64_t g0, int64_t g1, const acts_t *a, int64_t i0,
                          const int N, int64_t rows, float *y, int64_t ldy, const float *bias) {
    const int64_t nb = a->nb, xb = x8_bytes(type), hdr = x8_head(type), cols = a->cols;
    const __m256i m4 = _mm256_set1_epi32(15);
    for (int64_t g = g0; g < g1; g++) {
        __m256 acc[4];
        for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
        const uint8_t *base = w + g * nb * xb;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *src = base + b * xb;
            x8_prefetch(src, xb);
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)src));
            __m256 s0[4], s1[4];
            for (int i = 0; i < N; i++) s0[i] = s1[i] = _mm256_setzero_ps();
            for (int c = 0; c < (type == T_Q8_0 ? 8 : 4); c++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(src + hdr + 32 * c));
                if (type == T_Q8_0) v = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
                for (int j = 0; j < 4; j++) {
                    const float *xs = a->x + i0 * cols + b * QK + 4 * c + j;
                    if (type == T_Q8_0) { /* byte j, sign-extended */
                        const __m256 wv = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * j), 24));
                        for (int i = 0; i < N; i++) s0[i] = _mm256_fmadd_ps(wv, _mm256_broadcast_ss(xs + i * cols), s0[i]);
                        continue;
                    }
                    const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8 * j), m4));
                    const __m256 hi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8 * j + 4), m4));
                    for (int i = 0; i < N; i++) {
                        s0[i] = _mm256_fmadd_ps(lo, _mm256_broadcast_ss(xs + i * cols), s0[i]);
                        s1[i] = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(xs + i * cols + 16), s1[i]);
                    }
                }
            }
            for (int i = 0; i < N; i++) {
                acc[i] = _mm256_fmadd_ps(d, _mm256_add_ps(s0[i], s1[i]), acc[i]);
                if (type != T_Q8_0) { /* the offsets (Q4_1 minimums, Q4_0's -8 d) meet each block's sum */
                    const __m256 m = type == T_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 16)))
                                                    : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
                    acc[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(a->sx[(i0 + i) * nb + b]), acc[i]);
                }
            }
        }
        x8_store(acc, N, g, rows, i0, y, ldy, bias);
    }
}

/* groups g0..g1 times N activation rows from i0 */
INLINE void x8_groups(const int type, const uint8_t *w, int64_t g0, int64_t g1, const acts_t *a, int64_t i0, const int N,
                      int64_t rows, float *y, int64_t ldy, const float *bias) {
    const int64_t nb = a->nb, xb = x8_bytes(type), hdr = x8_head(type);
    for (int64_t g = g0; g < g1; g++) {
        __m256 acc[4];
        for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
        const uint8_t *base = w + g * nb * xb;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *src = base + b * xb;
            x8_prefetch(src, xb);
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)src));
            const __m256 m = type == T_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 16))) : d;
            for (int i = 0; i < N; i++) {
                const int64_t at = (i0 + i) * nb + b;
                const __m256 s = _mm256_cvtepi32_ps(x8_dot(type, src + hdr, a->q + at * QK));
                acc[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(a->o[at]), _mm256_fmadd_ps(d, _mm256_mul_ps(_mm256_set1_ps(a->d[at]), s), acc[i]));
            }
        }
        x8_store(acc, N, g, rows, i0, y, ldy, bias);
    }
}
#endif

#if defined(CF_AVX512) && defined(__AVX512VNNI__)
#define CF_X8_512 1
/* x8_groups with 512-bit vectors (AVX-512 VNNI): two chunks of a group's block (64 bytes) per load and per
   dot instruction, lanes 0-7 the first chunk's 8 rows, 8-15 the next one's, each half meeting its own 4
   activations (one load of the activation block, spread over the lanes by a permute per instruction):
   half the instructions per weight of x8_groups. The two halves of each sum are added at the end, and the
   offset term goes half into each. Measured on the AMD EPYC (one thread, from cache): 1.05-1.25x x8_groups'
   weights per second for one activation row, 1.05-1.25x for four. */
INLINE void x8_groups512(const int type, const uint8_t *w, int64_t g0, int64_t g1, const acts_t *a, int64_t i0,
                         const int N, int64_t rows, float *y, int64_t ldy, const float *bias) {
    const int64_t nb = a->nb, xb = x8_bytes(type), hdr = x8_head(type);
    const __m512i m4 = _mm512_set1_epi8(15);
    const int q8 = type == T_Q8_0;
    const int first[4] = {0, q8 ? 2 : 4, q8 ? 4 : 2, 6};
    __m512i idx[4];
    for (int k = 0; k < 4; k++)
        idx[k] = _mm512_mask_blend_epi32(0xff00, _mm512_set1_epi32(first[k]), _mm512_set1_epi32(first[k] + 1));
    for (int64_t g = g0; g < g1; g++) {
        __m512 acc[4];
        for (int i = 0; i < N; i++) acc[i] = _mm512_setzero_ps();
        const uint8_t *base = w + g * nb * xb;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *src = base + b * xb;
            x8_prefetch(src, xb);
            const __m512 d = _mm512_cvtph_ps(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)src)));
            const __m512 m = type == T_Q4_1 ? _mm512_cvtph_ps(_mm256_broadcastsi128_si256(
                                                  _mm_loadu_si128((const __m128i *)(src + 16)))) : d;
            __m512i v[4];
            if (type == T_Q8_0) {
                for (int k = 0; k < 4; k++) v[k] = _mm512_loadu_si512(src + hdr + 64 * k);
            } else {
                const __m512i w01 = _mm512_loadu_si512(src + hdr), w23 = _mm512_loadu_si512(src + hdr + 64);
                v[0] = _mm512_and_si512(w01, m4), v[1] = _mm512_and_si512(_mm512_srli_epi16(w01, 4), m4);
                v[2] = _mm512_and_si512(w23, m4), v[3] = _mm512_and_si512(_mm512_srli_epi16(w23, 4), m4);
            }
            for (int i = 0; i < N; i++) {
                const int64_t at = (i0 + i) * nb + b;
                const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(a->q + at * QK)));
                __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[0], _mm512_permutexvar_epi32(idx[0], xv));
                s = _mm512_dpbusd_epi32(s, v[1], _mm512_permutexvar_epi32(idx[1], xv));
                s = _mm512_dpbusd_epi32(s, v[2], _mm512_permutexvar_epi32(idx[2], xv));
                s = _mm512_dpbusd_epi32(s, v[3], _mm512_permutexvar_epi32(idx[3], xv));
                acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(0.5f * a->o[at]),
                                         _mm512_fmadd_ps(d, _mm512_mul_ps(_mm512_set1_ps(a->d[at]), _mm512_cvtepi32_ps(s)), acc[i]));
            }
        }
        __m256 sum[4];
        for (int i = 0; i < N; i++)
            sum[i] = _mm256_add_ps(_mm512_castps512_ps256(acc[i]), _mm512_extractf32x8_ps(acc[i], 1));
        x8_store(sum, N, g, rows, i0, y, ldy, bias);
    }
}
#endif

/* cf_gemv over a repacked matrix (cf_repack8), always with int8 activations; -1 without AVX2 or for another type */
EXPORT int cf_gemv8(int type, const uint8_t *w, int64_t rows, int64_t cols, const float *x, int64_t n, float *y,
                    int64_t ldy, const float *bias, int int8x, int nthreads) {
#if defined(CF_AVX2)
    if (!x8_packed(type) || cols % QK) return -1;
    acts_t a = {x, 0, 0, 0, 0, cols, cols / QK};
    float *scratch;
    if (int8x) { /* int8 blocks of x, their scales and offset terms */
        scratch = (float *)malloc((size_t)(n * cols) + 2 * sizeof(float) * (size_t)(n * a.nb));
        if (!scratch) return -2;
        float *d = scratch, *o = d + n * a.nb;
        int8_t *q = (int8_t *)(o + n * a.nb);
        const int64_t per = (n * a.nb + 63) / 64; /* a prefill's many rows: quantized by every thread */
#pragma omp parallel for num_threads(nthreads > 1 ? nthreads : 1) if (n > 16 && nthreads > 1)
        for (int64_t c = 0; c < 64; c++) {
            const int64_t b0 = c * per, b1 = b0 + per < n * a.nb ? b0 + per : n * a.nb;
            if (b0 < b1) quantize_acts(type, x + b0 * QK, b1 - b0, q + b0 * QK, d + b0, o + b0);
        }
        a.q = q, a.d = d, a.o = o;
    } else { /* each block's sum of x */
        scratch = (float *)malloc(sizeof(float) * (size_t)(n * a.nb));
        if (!scratch) return -2;
        for (int64_t i = 0; i < n * a.nb; i++) {
            float s = 0;
            for (int j = 0; j < QK; j++) s += x[i * QK + j];
            scratch[i] = s;
        }
        a.sx = scratch;
    }
    const int64_t groups = (rows + 7) / 8;
    const int nt = threads_for(rows * cols * (n < 4 ? n : 4) / (int8x ? 2 : 1), nthreads);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int t = 0, T = 1;
#endif
        const int64_t first = groups * t / T, last = groups * (t + 1) / T;
        /* X8_TILE groups (a few kB each) stay in L1 while every activation row passes them, 4 at a time */
        for (int64_t g0 = first; g0 < last; g0 += X8_TILE)
        for (int64_t i0 = 0; i0 < n; i0 += 4) {
            const int64_t g1 = g0 + X8_TILE < last ? g0 + X8_TILE : last;
            const int m = n - i0 < 4 ? (int)(n - i0) : 4;
#define X8_CALL(fn, T_, N_) fn(T_, w, g0, g1, &a, i0, N_, rows, y, ldy, bias)
#define X8_TYPES(fn, N_) do { if (type == T_Q4_0) X8_CALL(fn, T_Q4_0, N_); else if (type == T_Q4_1) X8_CALL(fn, T_Q4_1, N_); \
                              else X8_CALL(fn, T_Q8_0, N_); } while (0)
#define X8_ROWS(fn) do { switch (m) { case 1: X8_TYPES(fn, 1); break; case 2: X8_TYPES(fn, 2); break; \
                                      case 3: X8_TYPES(fn, 3); break; default: X8_TYPES(fn, 4); } } while (0)
#if defined(CF_X8_512)
            if (int8x)
                X8_ROWS(x8_groups512);
#else
            if (int8x)
                X8_ROWS(x8_groups);
#endif
            else
                X8_ROWS(x8_groups_f32);
#undef X8_ROWS
#undef X8_TYPES
#undef X8_CALL
        }
    }
    free(scratch);
    return 0;
#else
    (void)type, (void)w, (void)rows, (void)cols, (void)x, (void)n, (void)y, (void)ldy, (void)bias, (void)int8x;
    (void)nthreads;
    return -1;
#endif
}

/* out[i, :] = the fp32 weights of row idx[i] (or row i without idx) of W, i < rows */
EXPORT int cf_dequantize(int type, const void *w, int64_t row_bytes, int64_t rows, int64_t cols, const int64_t *idx,
                         float *out, int nthreads) {
    const int64_t bb = block_bytes(type), nb = cols / QK;
    if (type != T_F32 && type != T_BF16 && (!bb || cols % QK)) return -1;
    const int nt = threads_for(rows * cols, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row = (const uint8_t *)w + (idx ? idx[r] : r) * row_bytes;
        float *o = out + r * cols;
        if (type == T_F32) {
            memcpy(o, row, sizeof(float) * (size_t)cols);
        } else if (type == T_BF16) {
            for (int64_t k = 0; k < cols; k++) o[k] = bf16_to_f32(load_u16(row + 2 * k));
        } else {
            for (int64_t b = 0; b < nb; b++, o += QK) {
                const uint8_t *blk = row + b * bb;
                const float d = f16_to_f32(load_u16(blk));
                if (type == T_Q8_0) {
                    const int8_t *q = (const int8_t *)(blk + 2);
                    for (int j = 0; j < QK; j++) o[j] = d * (float)q[j];
                } else {
                    const float m = type == T_Q4_0 ? -8.0f * d : f16_to_f32(load_u16(blk + 2));
                    const uint8_t *q = blk + (type == T_Q4_0 ? 2 : 4);
                    for (int j = 0; j < 16; j++) {
                        o[j] = d * (float)(q[j] & 15) + m;
                        o[j + 16] = d * (float)(q[j] >> 4) + m;
                    }
                }
            }
        }
    }
    return 0;
}

/* ---- the small ops of a decoding step ------------------------------------------------------------ */

/* out[i] = x[i] / rms(x[i]) * w (or * (1 + w)) for n rows of dim; out may be x */
EXPORT void cf_rmsnorm(const float *x, const float *w, float *out, int64_t n, int64_t dim, float eps, int plus_one) {
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * dim;
        float *oi = out + i * dim;
        float ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int64_t k = 0; k < dim; k++) ss += xi[k] * xi[k];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        if (plus_one) {
#pragma omp simd
            for (int64_t k = 0; k < dim; k++) oi[k] = xi[k] * inv * (1.0f + w[k]);
        } else {
#pragma omp simd
            for (int64_t k = 0; k < dim; k++) oi[k] = w[k] * (xi[k] * inv);
        }
    }
}

/* Rotary embedding in place, half-split pairs (x_j, x_{j+D/2}): x (B, H, T, D) with strides sb, sh, st
   (elements; the last dim contiguous), cos and sin (B, T, D) contiguous. */
EXPORT void cf_rope(float *x, int64_t B, int64_t H, int64_t T, int64_t D, int64_t sb, int64_t sh, int64_t st,
                    const float *cos_, const float *sin_) {
    const int64_t half = D / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) {
                float *v = x + b * sb + h * sh + t * st;
                const float *c = cos_ + (b * T + t) * D, *s = sin_ + (b * T + t) * D;
#pragma omp simd
                for (int64_t j = 0; j < half; j++) {
                    const float x1 = v[j], x2 = v[j + half];
                    v[j] = x1 * c[j] - x2 * s[j];
                    v[j + half] = x2 * c[j + half] + x1 * s[j + half];
                }
            }
}

/* out (N, F) = silu(h[:, :F]) * h[:, F:] for h (N, 2F) */
EXPORT void cf_swiglu(const float *h, float *out, int64_t n, int64_t f) {
    for (int64_t i = 0; i < n; i++) {
        const float *g = h + i * 2 * f, *u = g + f;
        float *o = out + i * f;
#pragma omp simd
        for (int64_t k = 0; k < f; k++) o[k] = g[k] / (1.0f + cf_exp(-g[k])) * u[k];
    }
}

/* Attention of Tq queries over S cached keys, grouped heads (H query heads share each of KVH key/value
   heads). q (B, H, Tq, D), k and v (B, KVH, S, D): strides in elements (the last dim contiguous). mask:
   NULL, or bytes (B, Tq, S) at strides mb, mt (0 to broadcast), nonzero where a key may be seen; with
   causal, query i also sees only keys j <= S - Tq + i. out (B, Tq, H, D) contiguous: the layout the
   output projection reads. Keys a query may not see get no weight; one that may see none gets zeros. */
EXPORT int cf_attention(const float *q, int64_t qb, int64_t qh, int64_t qt, const float *k, int64_t kb, int64_t kh,
                        int64_t ks, const float *v, int64_t vb, int64_t vh, int64_t vs, const uint8_t *mask,
                        int64_t mb, int64_t mt, int causal, int64_t B, int64_t H, int64_t KVH, int64_t Tq, int64_t S,
                        int64_t D, float scale, float *out, int nthreads) {
    if (KVH <= 0 || H % KVH) return -1;
    const int64_t group = H / KVH, jobs = B * H * Tq;
    const int nt = threads_for(jobs * S * D * 4, nthreads);
    int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *p = (float *)malloc(sizeof(float) * (size_t)(S > 0 ? S : 1));
        float *acc = (float *)malloc(sizeof(float) * (size_t)D);
#pragma omp for schedule(static)
        for (int64_t job = 0; job < jobs; job++) {
            if (!p || !acc) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            const int64_t b = job / (H * Tq), h = job / Tq % H, t = job % Tq, g = h / group;
            const float *qv = q + b * qb + h * qh + t * qt;
            const float *kbase = k + b * kb + g * kh, *vbase = v + b * vb + g * vh;
            const uint8_t *mrow = mask ? mask + b * mb + t * mt : 0;
            const int64_t last = causal ? S - Tq + t : S - 1; /* the last key it may see */
            float best = -INFINITY;
            for (int64_t j = 0; j < S; j++) {
                if (j > last || (mrow && !mrow[j])) {
                    p[j] = -INFINITY;
                    continue;
                }
                const float *kv = kbase + j * ks;
                float s = 0;
#pragma omp simd reduction(+ : s)
                for (int64_t e = 0; e < D; e++) s += qv[e] * kv[e];
                p[j] = s * scale;
                best = p[j] > best ? p[j] : best;
            }
            float *o = out + ((b * Tq + t) * H + h) * D;
            for (int64_t e = 0; e < D; e++) acc[e] = 0;
            if (best == -INFINITY) { /* sees nothing */
                memcpy(o, acc, sizeof(float) * (size_t)D);
                continue;
            }
            float total = 0;
#pragma omp simd reduction(+ : total)
            for (int64_t j = 0; j < S; j++) {
                const float e = p[j] == -INFINITY ? 0.0f : cf_exp(p[j] - best);
                p[j] = e;
                total += e;
            }
            for (int64_t j = 0; j < S; j++) {
                const float pj = p[j];
                if (pj == 0.0f) continue;
                const float *vv = vbase + j * vs;
#pragma omp simd
                for (int64_t e = 0; e < D; e++) acc[e] += pj * vv[e];
            }
            const float inv = 1.0f / total;
#pragma omp simd
            for (int64_t e = 0; e < D; e++) o[e] = acc[e] * inv;
        }
        free(p);
        free(acc);
    }
    return failed ? -2 : 0;
}

INLINE void head_norm(float *v, const float *w, int64_t D, float eps, int plus_one) {
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t e = 0; e < D; e++) ss += v[e] * v[e];
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
#pragma omp simd
    for (int64_t e = 0; e < D; e++) v[e] = plus_one ? v[e] * inv * (1.0f + w[e]) : w[e] * (v[e] * inv);
}

INLINE void head_rope(float *v, const float *c, const float *s, int64_t D) {
    const int64_t half = D / 2;
#pragma omp simd
    for (int64_t j = 0; j < half; j++) {
        const float x1 = v[j], x2 = v[j + half];
        v[j] = x1 * c[j] - x2 * s[j];
        v[j + half] = x2 * c[j + half] + x1 * s[j + half];
    }
}

/* One attention layer of a decoding step, from the qkv projection's output to the input of the output
   projection. qkv (B, T, (H + 2 KVH) D): each token's query heads, key heads, value heads. Per head,
   optionally RMSNorm (weights qn, kn) and rotary (cos, sin (B, T, D)), both in place; the keys and
   values go into the cache kc, vc (this layer's (B, KVH, slots, D), strides cb, ch, cs) at slots
   start..start+T-1; then every query attends over slots 0..start+T-1 as in cf_attention (mask over
   those slots, or causal). out (B, T, H D). */
EXPORT int cf_attention_step(float *qkv, int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t D, const float *qn,
                             const float *kn, float eps, int plus_one, const float *cos_, const float *sin_, float *kc,
                             float *vc, int64_t cb, int64_t ch, int64_t cs, int64_t start, const uint8_t *mask,
                             int64_t mb, int64_t mt, int causal, float scale, float *out, int nthreads) {
    const int64_t W = (H + 2 * KVH) * D;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            float *row = qkv + (b * T + t) * W;
            const float *c = cos_ ? cos_ + (b * T + t) * D : 0, *s = sin_ ? sin_ + (b * T + t) * D : 0;
            for (int64_t h = 0; h < H + KVH; h++) {
                float *v = row + h * D;
                const float *w = h < H ? qn : kn;
                if (w) head_norm(v, w, D, eps, plus_one);
                if (c) head_rope(v, c, s, D);
            }
            for (int64_t g = 0; g < KVH; g++) {
                const int64_t at = b * cb + g * ch + (start + t) * cs;
                memcpy(kc + at, row + (H + g) * D, sizeof(float) * (size_t)D);
                memcpy(vc + at, row + (H + KVH + g) * D, sizeof(float) * (size_t)D);
            }
        }
    return cf_attention(qkv, T * W, D, W, kc, cb, ch, cs, vc, cb, ch, cs, mask, mb, mt, causal, B, H, KVH, T,
                        start + T, D, scale, out, nthreads);
}

/* ---- a whole decoder block of a decoding step ---------------------------------------------------- */

/* A linear layer as cf_block_step reads it, 7 int64s: ggml type, weight pointer, out features, in features,
   bias pointer (0: none), packed (cf_repack8's groups: cf_gemv8; else rows: cf_gemv), bytes per row. */
static int linear_run(const int64_t *m, const float *x, int64_t n, float *y, int int8x, int nthreads) {
    const void *w = (const void *)(intptr_t)m[1];
    const float *bias = (const float *)(intptr_t)m[4];
    return m[5] ? cf_gemv8((int)m[0], (const uint8_t *)w, m[2], m[3], x, n, y, m[2], bias, int8x, nthreads)
                : cf_gemv((int)m[0], w, m[6], m[2], m[3], x, n, y, m[2], bias, int8x, nthreads);
}

/* One pre-norm decoder block (Llama's: RMSNorm, attention, RMSNorm, SwiGLU MLP) for a decoding step's
   n = B T rows of the residual stream: y = x + out(attn(norm1(x))), then y += down(swiglu(up(norm2(y)))),
   each piece done by the function that does it alone (cf_rmsnorm, cf_gemv / cf_gemv8, cf_attention_step,
   cf_swiglu). One call per layer instead of about ten from Python: for a 135M model Python's calls took
   about as long as the multiplies. desc: C, H, KVH, D, F (the MLP's hidden width), plus_one, then pointers
   to the two norms' weights and the per-head query and key norms' (0: none), then the linears qkv, out,
   up (gate and up, 2F outputs) and down, 7 int64s each (linear_run). fdesc: the norms' eps, the attention's
   scale. The attention's arguments are cf_attention_step's. Returns 0, or -1 if a piece refused. */
EXPORT int cf_block_step(const float *x, float *y, int64_t B, int64_t T, const int64_t *desc, const float *fdesc,
                         const float *cos_, const float *sin_, float *kc, float *vc, int64_t cb, int64_t ch, int64_t cs,
                         int64_t start, const uint8_t *mask, int64_t mb, int64_t mt, int causal, int int8x,
                         int nthreads) {
    const int64_t C = desc[0], H = desc[1], KVH = desc[2], D = desc[3], F = desc[4], n = B * T;
    const int64_t W = (H + 2 * KVH) * D;
    const int plus_one = (int)desc[5];
    const float *n1 = (const float *)(intptr_t)desc[6], *n2 = (const float *)(intptr_t)desc[7];
    const float *qn = (const float *)(intptr_t)desc[8], *kn = (const float *)(intptr_t)desc[9];
    const int64_t *lin = desc + 10;
    const float eps = fdesc[0], scale = fdesc[1];
    float *buf = (float *)malloc(sizeof(float) * (size_t)(n * (2 * C + W + H * D + 3 * F)));
    if (!buf) return -2;
    float *h = buf, *qkv = h + n * C, *att = qkv + n * W, *up = att + n * H * D, *act = up + 2 * n * F,
          *branch = act + n * F;
    int rc = 0;
    cf_rmsnorm(x, n1, h, n, C, eps, plus_one);
    rc |= linear_run(lin, h, n, qkv, int8x, nthreads);
    rc |= cf_attention_step(qkv, B, T, H, KVH, D, qn, kn, eps, plus_one, cos_, sin_, kc, vc, cb, ch, cs, start, mask,
                            mb, mt, causal, scale, att, nthreads);
    rc |= linear_run(lin + 7, att, n, branch, int8x, nthreads);
    for (int64_t i = 0; i < n * C; i++) y[i] = x[i] + branch[i];
    cf_rmsnorm(y, n2, h, n, C, eps, plus_one);
    rc |= linear_run(lin + 14, h, n, up, int8x, nthreads);
    cf_swiglu(up, act, n, F);
    rc |= linear_run(lin + 21, act, n, branch, int8x, nthreads);
    for (int64_t i = 0; i < n * C; i++) y[i] += branch[i];
    free(buf);
    return rc ? -1 : 0;
}
