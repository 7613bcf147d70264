/* Matrix products with GGML-packed weights, read in place: y[t, r] = sum_k x[t, k] * W[r, k].
 *
 * W is row-major, each row a run of blocks of 32 values exactly as GGUF stores them (Q8_0: fp16 d,
 * 32 int8; Q4_0: fp16 d, 16 bytes of nibbles, value (q - 8) d; Q4_1: fp16 d, fp16 m, nibbles,
 * value q d + m; low nibbles are elements 0-15, high nibbles 16-31).  Activations stay fp32 (no
 * activation rounding, unlike llama.cpp's int8 activations): Q4_0/Q4_1 blocks are expanded to
 * their dequantized values (a 16-entry table per block) and multiplied in fp32; a Q8_0 block's
 * sum_i x_i q_i is scaled by d.  So the result is that of the dequantized weights up to fp32
 * rounding of the sums.
 *
 * Built by scratchlm.quant.kernels with the machine's own flags (-march=native); an AVX-512 path
 * where the compiler targets it, else portable C that the compiler vectorises as it can.
 * Threads: OpenMP, the runtime torch itself loads (libgomp), so one pool serves both.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SLM_AVX512 1
#endif

/* Q4_KR and Q6_KR are K-quants re-blocked without loss into blocks of 32 (quant/kernels.py):
 * Q4_KR: fp32 d, fp32 m, 16 bytes of nibbles, value q d + m (d = Q4_K's d * sc, m = -dmin * min);
 * Q6_KR: fp32 s0, fp32 s1, 32 int8 q (Q6_K's q - 32), value q s0 (elements 0-15), q s1 (16-31). */
enum { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q4_KR = 3, Q6_KR = 4 };
static const int BLOCK_BYTES[5] = {34, 18, 20, 24, 40};

static inline float f32_at(const uint8_t *p) {
    float f;
    memcpy(&f, p, 4);
    return f;
}

static inline float fp16_to_f32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* Q8_0: a block's 32 integers q and its scale d.  Other types: the 32 dequantized values in q
 * (computed as gguf does, each operation rounded to fp32), and d = 1. */
static inline void block_ints(int type, const uint8_t *blk, float *q, float *d) {
    *d = 1.0f;
    if (type == Q8_0) {
        *d = fp16_to_f32(blk);
        for (int i = 0; i < 32; i++) q[i] = (float)(int8_t)blk[2 + i];
    } else if (type == Q6_KR) {
        const float s0 = f32_at(blk), s1 = f32_at(blk + 4);
        for (int i = 0; i < 32; i++) q[i] = (float)(int8_t)blk[8 + i] * (i < 16 ? s0 : s1);
    } else {
        const uint8_t *qs = blk + (type == Q4_0 ? 2 : type == Q4_1 ? 4 : 8);
        const float scale = type == Q4_KR ? f32_at(blk) : fp16_to_f32(blk);
        const float min = type == Q4_KR ? f32_at(blk + 4) : type == Q4_1 ? fp16_to_f32(blk + 2) : 0.0f;
        const float offset = type == Q4_0 ? 8.0f : 0.0f;
        for (int i = 0; i < 16; i++) {
            q[i] = ((float)(qs[i] & 0x0F) - offset) * scale;
            q[i + 16] = ((float)(qs[i] >> 4) - offset) * scale;
            if (type != Q4_0) { q[i] += min; q[i + 16] += min; }
        }
    }
}

#ifdef SLM_AVX512
/* Block b of a row as two vectors of 16 floats (elements 0-15, 16-31).  Q4_0/Q4_1: the block's
 * dequantized values themselves, looked up in a 16-entry table built per block exactly as gguf
 * computes them ((q - 8) d; q d + m, the product rounded before the sum), so these rows compute
 * with the dequantized weights.  Q8_0: the integers q, the caller scales by d. */
static inline __attribute__((always_inline)) void block_vectors(const int type, const uint8_t *blk,
                                                                __m512 *lo, __m512 *hi) {
    if (type == Q8_0 || type == Q6_KR) {
        const int at = type == Q8_0 ? 2 : 8;
        *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + at))));
        *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + at + 16))));
        if (type == Q6_KR) {
            *lo = _mm512_mul_ps(*lo, _mm512_set1_ps(f32_at(blk)));
            *hi = _mm512_mul_ps(*hi, _mm512_set1_ps(f32_at(blk + 4)));
        }
        return;
    }
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 table;
    if (type == Q4_0) {
        table = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8.0f)), _mm512_set1_ps(fp16_to_f32(blk)));
    } else if (type == Q4_1) {
        table = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(fp16_to_f32(blk))),
                              _mm512_set1_ps(fp16_to_f32(blk + 2)));
    } else {
        table = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(f32_at(blk))), _mm512_set1_ps(f32_at(blk + 4)));
    }
    /* vpermps reads only the low 4 bits of each index: the low nibbles need no mask */
    const int at = type == Q4_0 ? 2 : type == Q4_1 ? 4 : 8;
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + at)));
    *lo = _mm512_permutexvar_ps(bytes, table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
}

/* out[i * T + t] = row_i . x_t for R rows (stride row_bytes) and T tokens, R * T <= 4. */
static inline __attribute__((always_inline)) void rows_dot(
        const int type, const int R, const int T, const uint8_t *row, int64_t row_bytes, int64_t nb,
        const float *x, int64_t xs, float *out) {
    const int bb = BLOCK_BYTES[type];
    __m512 acc[4];
    for (int i = 0; i < R * T; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        for (int i = 0; i < R; i++) {
            const uint8_t *blk = row + i * row_bytes + b * bb;
            __m512 lo, hi;
            block_vectors(type, blk, &lo, &hi);
            if (type == Q8_0) {
                const __m512 d = _mm512_set1_ps(fp16_to_f32(blk));
                for (int t = 0; t < T; t++) {
                    const float *xb = x + t * xs + b * 32;
                    __m512 p = _mm512_mul_ps(lo, _mm512_loadu_ps(xb));
                    p = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), p);
                    acc[i * T + t] = _mm512_fmadd_ps(p, d, acc[i * T + t]);
                }
            } else {
                for (int t = 0; t < T; t++) {
                    const float *xb = x + t * xs + b * 32;
                    acc[i * T + t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc[i * T + t]);
                    acc[i * T + t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), acc[i * T + t]);
                }
            }
        }
    }
    for (int i = 0; i < R * T; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
}
#else
static inline __attribute__((always_inline)) void rows_dot(
        const int type, const int R, const int T, const uint8_t *row, int64_t row_bytes, int64_t nb,
        const float *x, int64_t xs, float *out) {
    const int bb = BLOCK_BYTES[type];
    for (int i = 0; i < R; i++) {
        float acc[4] = {0, 0, 0, 0};
        for (int64_t b = 0; b < nb; b++) {
            float q[32], d;
            block_ints(type, row + i * row_bytes + b * bb, q, &d);
            for (int t = 0; t < T; t++) {
                const float *xb = x + t * xs + b * 32;
                float p = 0.0f;
                for (int j = 0; j < 32; j++) p += q[j] * xb[j];
                acc[t] += p * d;
            }
        }
        for (int t = 0; t < T; t++) out[i * T + t] = acc[t];
    }
}
#endif

#define ROW_CHUNK 16

/* One function per type, each with its own OpenMP region: an outlined region shared by the
 * types would test the type in the inner loop (gcc outlines before propagating constants). */
#define DEFINE_MATMUL(NAME, TYPE)                                                                  \
static void NAME(const uint8_t *w, int64_t rows, int64_t cols, const float *x, int64_t n_tok,      \
                 int64_t xs, float *y, int64_t ys, int nthreads) {                                \
    const int type = TYPE;                                                                         \
    const int64_t nb = cols / 32, row_bytes = nb * BLOCK_BYTES[TYPE];                              \
    const int64_t chunks = (rows + ROW_CHUNK - 1) / ROW_CHUNK;                                     \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                             \
    for (int64_t c = 0; c < chunks; c++) {                                                         \
        const int64_t end = (c + 1) * ROW_CHUNK < rows ? (c + 1) * ROW_CHUNK : rows;               \
        float out[4];                                                                              \
        int64_t r = c * ROW_CHUNK;                                                                 \
        if (n_tok == 1) { /* decoding: Q4 four rows at a time, four independent sums */            \
            for (; type != Q8_0 && type != Q6_KR && r + 4 <= end; r += 4) {                        \
                rows_dot(TYPE, 4, 1, w + r * row_bytes, row_bytes, nb, x, xs, out);                \
                for (int i = 0; i < 4; i++) y[r + i] = out[i];                                     \
            }                                                                                      \
            for (; r < end; r++) {                                                                 \
                rows_dot(TYPE, 1, 1, w + r * row_bytes, row_bytes, nb, x, xs, out);                \
                y[r] = out[0];                                                                     \
            }                                                                                      \
            continue;                                                                              \
        }                                                                                          \
        for (; r < end; r++) {                                                                     \
            const uint8_t *row = w + r * row_bytes;                                                \
            int64_t t = 0;                                                                         \
            for (; t + 4 <= n_tok; t += 4) {                                                       \
                rows_dot(TYPE, 1, 4, row, row_bytes, nb, x + t * xs, xs, out);                     \
                for (int i = 0; i < 4; i++) y[(t + i) * ys + r] = out[i];                          \
            }                                                                                      \
            for (; t < n_tok; t++) {                                                               \
                rows_dot(TYPE, 1, 1, row, row_bytes, nb, x + t * xs, xs, out);                     \
                y[t * ys + r] = out[0];                                                            \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}
DEFINE_MATMUL(matmul_q8_0, Q8_0)
DEFINE_MATMUL(matmul_q4_0, Q4_0)
DEFINE_MATMUL(matmul_q4_1, Q4_1)
DEFINE_MATMUL(matmul_q4_kr, Q4_KR)
DEFINE_MATMUL(matmul_q6_kr, Q6_KR)

/* y[t * ys + r] = sum_k x[t * xs + k] W[r, k] for r < rows, t < n_tok. */
void slm_qmatmul(int type, const uint8_t *w, int64_t rows, int64_t cols, const float *x, int64_t n_tok,
                 int64_t xs, float *y, int64_t ys, int nthreads) {
    switch (type) {
        case Q8_0: matmul_q8_0(w, rows, cols, x, n_tok, xs, y, ys, nthreads); break;
        case Q4_0: matmul_q4_0(w, rows, cols, x, n_tok, xs, y, ys, nthreads); break;
        case Q4_1: matmul_q4_1(w, rows, cols, x, n_tok, xs, y, ys, nthreads); break;
        case Q4_KR: matmul_q4_kr(w, rows, cols, x, n_tok, xs, y, ys, nthreads); break;
        case Q6_KR: matmul_q6_kr(w, rows, cols, x, n_tok, xs, y, ys, nthreads); break;
    }
}

/* Row idx of W, dequantized into o (cols floats), as gguf computes the values: Q8_0 q*d, Q4_0
 * (q-8)*d, Q4_1 q*d + m, each operation rounded to fp32 (built with -ffp-contract=off). */
static inline __attribute__((always_inline)) void dequantize_row(const int type, const uint8_t *row,
                                                                 int64_t nb, float *o) {
    const int bb = BLOCK_BYTES[type];
    for (int64_t b = 0; b < nb; b++, o += 32) {
        const uint8_t *blk = row + b * bb;
#ifdef SLM_AVX512
        __m512 lo, hi;
        block_vectors(type, blk, &lo, &hi);
        if (type == Q8_0) {
            const __m512 d = _mm512_set1_ps(fp16_to_f32(blk));
            lo = _mm512_mul_ps(lo, d);
            hi = _mm512_mul_ps(hi, d);
        }
        _mm512_storeu_ps(o, lo);
        _mm512_storeu_ps(o + 16, hi);
#else
        float q[32], d;
        block_ints(type, blk, q, &d);
        for (int j = 0; j < 32; j++) o[j] = type == Q8_0 ? q[j] * d : q[j];
#endif
    }
}

#define DEFINE_DEQUANTIZE(NAME, TYPE)                                                              \
static void NAME(const uint8_t *w, int64_t cols, const int64_t *idx, int64_t n, float *out,       \
                 int nthreads) {                                                                  \
    const int64_t nb = cols / 32, row_bytes = nb * BLOCK_BYTES[TYPE];                              \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                             \
    for (int64_t i = 0; i < n; i++)                                                                \
        dequantize_row(TYPE, w + idx[i] * row_bytes, nb, out + i * cols);                          \
}
DEFINE_DEQUANTIZE(dequantize_q8_0, Q8_0)
DEFINE_DEQUANTIZE(dequantize_q4_0, Q4_0)
DEFINE_DEQUANTIZE(dequantize_q4_1, Q4_1)
DEFINE_DEQUANTIZE(dequantize_q4_kr, Q4_KR)
DEFINE_DEQUANTIZE(dequantize_q6_kr, Q6_KR)

/* out[i, :] = the dequantized row idx[i] of W (cols values each). */
void slm_dequantize_rows(int type, const uint8_t *w, int64_t cols, const int64_t *idx, int64_t n,
                         float *out, int nthreads) {
    switch (type) {
        case Q8_0: dequantize_q8_0(w, cols, idx, n, out, nthreads); break;
        case Q4_0: dequantize_q4_0(w, cols, idx, n, out, nthreads); break;
        case Q4_1: dequantize_q4_1(w, cols, idx, n, out, nthreads); break;
        case Q4_KR: dequantize_q4_kr(w, cols, idx, n, out, nthreads); break;
        case Q6_KR: dequantize_q6_kr(w, cols, idx, n, out, nthreads); break;
    }
}
