/* Matrix products with GGML-packed weights, read in place: y[t, r] = sum_k x[t, k] * W[r, k].
 *
 * W is row-major, each row a run of blocks of 32 values exactly as GGUF stores them (Q8_0: fp16 d,
 * 32 int8; Q4_0: fp16 d, 16 bytes of nibbles, value (q - 8) d; Q4_1: fp16 d, fp16 m, nibbles,
 * value q d + m; low nibbles are elements 0-15, high nibbles 16-31).  Two kinds of product:
 *
 * slm_qmatmul: fp32 activations.  Q4_0/Q4_1 blocks are expanded to their dequantized values (a
 * 16-entry table per block) and multiplied in fp32; a Q8_0 block's sum_i x_i q_i is scaled by d.
 * So the result is that of the dequantized weights up to fp32 rounding of the sums.
 *
 * slm_qmatmul_int (decoding): x rounded per block of 32 to 8-bit integers (llama.cpp's arithmetic)
 * or to 15-bit ones, and exact integer dot products with each weight block (vpdpbusd), scaled in
 * fp32: the dequantized weights times the rounded x.  Faster when decoding (see the section).
 *
 * slm_qgemm_int (prefill): the same arithmetic as a matrix product over many tokens (int16 panels
 * of W, vpdpwssd).  slm_decode: one decoded token through a whole model (Llama-family or GPT-2
 * blocks), every layer in one OpenMP region, with slm_qmatmul_int's products (the last two sections).
 *
 * Built by scratchlm.quant.kernels with the machine's own flags (-march=native); an AVX-512 path
 * (integer products with AVX512-VNNI, else AVX512BW's vpmaddubsw) where the compiler targets it,
 * else portable C that the compiler vectorises as it can.
 * Threads: OpenMP, the runtime torch itself loads (libgomp), so one pool serves both.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
#endif
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>  /* (F16C alone, on AVX2 machines: _cvtsh_ss) */
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
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

/* ------------------------------------------------------------------------------------------
 * Decoding with integer activations: slm_qmatmul_int (llama.cpp's arithmetic, and a finer one).
 *
 * Each token's x is rounded per block of 32 to integers q with a fp32 scale dx, L = 127 (8 bits:
 * llama.cpp's quantize_row_q8_1 on x86, whose dx is fp16) or L = 16256 = 127 * 128 (15 bits):
 *     amax = max_i |x_i|,  dx = amax / L,  q_i = round-half-even(x_i * (L / amax))   (0 if amax = 0)
 * so |q_i| <= L and |x_i - dx q_i| <= dx / 2 (plus the rounding of L / amax and x_i * (L / amax)).
 * A block whose x holds a NaN or an infinity gets dx = NaN and q = 0, so the outputs it touches are
 * NaN, where the fp32 path's would be NaN or infinite.  Each weight block then costs exact integer
 * dot products of its 32 integers with the 32 q, scaled in fp32:
 *     Q8_0: d dx sum q_w q    Q4_0: d dx sum (q_w - 8) q    Q4_1, Q4_KR: d dx sum q_w q + m dx sum q
 *     Q6_KR: s0 dx sum_{i<16} q_w q + s1 dx sum_{i>=16} q_w q
 * i.e. sum_i w_i x^_i with x^ = dx q: the dequantized weights times the rounded activations, up to
 * fp32 rounding of the scaled sums.  vpdpbusd multiplies unsigned bytes by signed bytes, four
 * products to each int32 lane, so 15-bit q is split into two bytes, q = 128 h + l with h = q >> 7
 * in [-127, 127] and l = q & 127 in [0, 127]: sum q_w q = 128 sum q_w h + sum q_w l, twice the
 * products of 8 bits for 256x finer activations.  (8 bits change SmolLM2-135M's greedy answers, as
 * they change llama.cpp's; 15 bits keep them.)
 *
 * The rounded activations of one token are a run of groups (xgroup): 4 blocks per group for the
 * nibble types (Q4_0, Q4_1, Q4_KR), 2 for the int8 ones (Q8_0, Q6_KR), so that one group meets one
 * 512-bit vector of weight bytes.  The vector's 16 int32 lanes each sum 4 (int8 types) or 8 (nibble
 * types) products, always of one block (and of one scale's half for Q6_KR):
 *   nibble types: bytes [0, 64) = the 4 blocks' elements 0-15 (16 per block, in block order),
 *                 [64, 128) = their elements 16-31; lane l is block l/4, elements 4(l%4)..+3 of both
 *                 halves (the low and the high nibbles of 4 weight bytes);
 *   int8 types:   bytes [0, 64) = the 2 blocks' 64 values in order; lane l is block l/8, elements
 *                 4(l%8)..+3.
 * q[] holds q (8 bits) or h (15 bits), low[] holds l (15 bits).  The weights meet q[] (and h) as
 * unsigned bytes u = q_w + k: k = 0 for Q4_1/Q4_KR nibbles, 8 for Q4_0 (u is the nibble), 128 for
 * Q8_0 (u = q_w ^ 0x80), 32 for Q6_KR (q_w + 32); the lane's sum starts at -k times its sum of q[]
 * (aux.i), which leaves sum q_w q[] exactly.  They meet low[] as signed bytes q_w (Q4_0: nibble - 8).
 * The last group of a row short of blocks has zero q, low and dx, and its weight bytes past the row
 * are masked off (read as zeros).  Every (row, token) sum runs the same operations in the same
 * order whatever the rows and tokens beside it, so a token's outputs do not depend on its batch.
 */
typedef struct {
    int8_t q[128];     /* 8 bits: q; 15 bits: h = q >> 7 (the int8 types use [0, 64)) */
    uint8_t low[128];  /* 15 bits: l = q & 127 */
    float dx[16];      /* each lane's block's dx */
    union {
        float f[16];    /* Q4_1, Q4_KR: dx * (the lane's sum of q), so m * (its lanes) = m dx sum q */
        int32_t i[16];  /* Q4_0, Q8_0, Q6_KR: -k * (the lane's sum of q[]) */
    } aux;
} xgroup;

static inline int nibble_type(int type) { return type == Q4_0 || type == Q4_1 || type == Q4_KR; }
static inline int blocks_per_group(int type) { return nibble_type(type) ? 4 : 2; }
static inline int unsigned_offset(int type) {
    return type == Q4_0 ? 8 : type == Q8_0 ? 128 : type == Q6_KR ? 32 : 0;
}
static inline int group_bytes(int type) { return blocks_per_group(type) * BLOCK_BYTES[type]; }
static inline int has_min(int type) { return type == Q4_1 || type == Q4_KR; }

#ifdef SLM_AVX512
#ifdef __AVX512VNNI__
#define DPBUSD(acc, u, s) _mm512_dpbusd_epi32((acc), (u), (s))
#else
/* vpmaddubsw saturates each pair's sum to int16: exact while |u_a s_a + u_b s_b| <= 32767.  That
 * holds for nibbles (u <= 15) and Q6_KR's q_w + 32 (u <= 63) times q[] (|s| <= 127), and for l
 * (u <= 127) times q_w (|s| <= 128), but not for Q8_0's q_w + 128 (u <= 255): without VNNI, Q8_0
 * multiplies |q_w| (<= 128) by q[] carrying q_w's sign instead (Q8_SIGNED; |q[]| <= 127). */
#define DPBUSD(acc, u, s) \
    _mm512_add_epi32((acc), _mm512_madd_epi16(_mm512_maddubs_epi16((u), (s)), _mm512_set1_epi16(1)))
#define Q8_SIGNED 1
#endif
#endif

/* max |x_i| over a block of 32 values; *bad set when one is NaN or infinite. */
static inline __attribute__((always_inline)) float block_amax(const float *xb, int *bad) {
#ifdef SLM_AVX512
    const __m512 a = _mm512_loadu_ps(xb), b = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    *bad = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) || _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q) ||
           !(amax <= FLT_MAX);
#else
    float amax = 0.0f;
    *bad = 0;
    for (int i = 0; i < 32; i++) {
        const float v = fabsf(xb[i]);
        *bad |= !(v <= FLT_MAX);  /* NaN or infinite */
        amax = v > amax ? v : amax;
    }
#endif
    return amax;
}

/* One block of x (32 values) rounded to L = 127 (wide = 0) or 16256 (wide = 1): q[] (q or h) into
 * qa (elements 0-15) and qb (16-31), l into la, lb when wide; returns dx. */
static inline __attribute__((always_inline)) float quantize_block(const int wide, const float *xb, int8_t *qa,
                                                                  int8_t *qb, uint8_t *la, uint8_t *lb) {
    const float levels = wide ? 16256.0f : 127.0f;
    int bad;
    const float amax = block_amax(xb, &bad);
#ifdef SLM_AVX512
    const __m512 a = _mm512_loadu_ps(xb), b = _mm512_loadu_ps(xb + 16);
#endif
    if (bad) {
        memset(qa, 0, 16);
        memset(qb, 0, 16);
        if (wide) {
            memset(la, 0, 16);
            memset(lb, 0, 16);
        }
        return NAN;
    }
    const float id = amax == 0.0f ? 0.0f : levels / amax;
#ifdef SLM_AVX512
    /* vcvtps2dq rounds half to even (the default rounding mode), as rintf does */
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
    if (wide) {
        const __m512i seven = _mm512_set1_epi32(127);
        _mm_storeu_si128((__m128i *)qa, _mm512_cvtsepi32_epi8(_mm512_srai_epi32(q0, 7)));
        _mm_storeu_si128((__m128i *)qb, _mm512_cvtsepi32_epi8(_mm512_srai_epi32(q1, 7)));
        _mm_storeu_si128((__m128i *)la, _mm512_cvtepi32_epi8(_mm512_and_si512(q0, seven)));
        _mm_storeu_si128((__m128i *)lb, _mm512_cvtepi32_epi8(_mm512_and_si512(q1, seven)));
    } else {
        _mm_storeu_si128((__m128i *)qa, _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)qb, _mm512_cvtsepi32_epi8(q1));
    }
#else
    for (int i = 0; i < 32; i++) {
        const int32_t q = (int32_t)rintf(xb[i] * id);
        int8_t *to = i < 16 ? qa + i : qb + i - 16;
        if (wide) {
            *to = (int8_t)(q >= 0 ? q / 128 : -((-q + 127) / 128));  /* floor(q / 128), q >> 7 */
            *(i < 16 ? la + i : lb + i - 16) = (uint8_t)(q - 128 * *to);
        } else {
            *to = (int8_t)q;
        }
    }
#endif
    return amax / levels;
}

/* A group's aux from its q[], low[] and dx (above). */
static inline __attribute__((always_inline)) void group_sums(const int type, const int wide, xgroup *gr) {
    const int k = unsigned_offset(type), halves = nibble_type(type) ? 2 : 1;
#ifdef SLM_AVX512
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i sum = _mm512_setzero_si512(), low = _mm512_setzero_si512();
    for (int h = 0; h < halves; h++) {
        sum = DPBUSD(sum, ones, _mm512_loadu_si512(gr->q + 64 * h));
        if (wide) low = DPBUSD(low, _mm512_loadu_si512(gr->low + 64 * h), ones);
    }
    if (has_min(type)) {
        const __m512i all = wide ? _mm512_add_epi32(_mm512_slli_epi32(sum, 7), low) : sum;
        _mm512_storeu_ps(gr->aux.f, _mm512_mul_ps(_mm512_loadu_ps(gr->dx), _mm512_cvtepi32_ps(all)));
    } else {
        _mm512_storeu_si512(gr->aux.i, _mm512_mullo_epi32(sum, _mm512_set1_epi32(-k)));
    }
#else
    for (int l = 0; l < 16; l++) {
        int32_t sum = 0, low = 0;
        for (int h = 0; h < halves; h++)
            for (int i = 0; i < 4; i++) {
                sum += gr->q[64 * h + 4 * l + i];
                low += wide ? gr->low[64 * h + 4 * l + i] : 0;
            }
        if (has_min(type)) gr->aux.f[l] = gr->dx[l] * (float)(wide ? 128 * sum + low : sum);
        else gr->aux.i[l] = -k * sum;
    }
#endif
}

/* x (cols values, cols % 32 == 0) into its groups g[0 .. ceil(nb / blocks_per_group)). */
static inline __attribute__((always_inline)) void quantize_activations(
        const int type, const int wide, const float *x, int64_t cols, xgroup *g) {
    const int64_t nb = cols / 32;
    const int per = blocks_per_group(type), nib = nibble_type(type), lanes = nib ? 4 : 8;
    const int64_t groups = (nb + per - 1) / per;
    memset(g + groups - 1, 0, sizeof(xgroup));  /* the last group's padding */
    for (int64_t b = 0; b < nb; b++) {
        xgroup *gr = g + b / per;
        const int j = (int)(b % per), a = nib ? 16 * j : 32 * j, c = nib ? 64 + 16 * j : a + 16;
        const float d = quantize_block(wide, x + b * 32, gr->q + a, gr->q + c, gr->low + a, gr->low + c);
        for (int l = 0; l < lanes; l++) gr->dx[lanes * j + l] = d;
    }
    for (int64_t k = 0; k < groups; k++) group_sums(type, wide, g + k);
}

#ifdef SLM_AVX512
/* Bytes ahead of the current group that each pass asks the cache for: rows lie end to end, so this
 * runs into the next rows (a prefetch past the matrix faults nothing).  4 KiB ahead sped up the
 * SmolLM2 decode's matrices, which come from memory; 0.25-1 KiB did not. */
#define PREFETCH 4096

/* A group's bytes that may be read: all of a whole group; the first `bytes` of a short last one
 * (masked loads read nothing beyond them and give zeros: zero weights and scales). */
typedef struct {
    __mmask64 first, second;  /* the bytes of the windows [0, 64) and [span - 64, span) inside the group */
} group_mask;

static inline group_mask mask_for(int span, int bytes) {
    group_mask k;
    k.first = bytes >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << bytes) - 1);
    const int in_second = bytes - (span - 64);
    k.second = in_second >= 64 ? ~(__mmask64)0 : in_second <= 0 ? 0 : (((__mmask64)1 << in_second) - 1);
    return k;
}

/* Byte gathers that are the same for every group of a type, built once per call. */
typedef struct {
    __m512i payload; /* the group's 64 payload bytes (nibbles or int8 q) out of its two windows */
    __m512i scale;   /* fp16 types: 32 words, each lane's d then each lane's m; fp32 types: dwords */
    __m512i scale2;  /* Q4_KR: each lane's m (dwords) */
    group_mask tail; /* the bytes of a row's short last group */
} gathers;

/* A group's bytes are read as two 64-byte windows, [0, 64) and [span - 64, span): index i of the
 * group's bytes in a two-source permute (vpermt2b/w/d: bit 6, 5 or 4 of the index picks the second
 * window) for elements of 1, 2 or 4 bytes. */
static inline int window_index(int span, int byte, int size) {
    return byte + size <= 64 ? byte / size : (64 + byte - (span - 64)) / size;
}

static gathers make_gathers(const int type, int64_t nb) {
    gathers g;
    g.tail = mask_for(group_bytes(type), (int)(nb % blocks_per_group(type)) * BLOCK_BYTES[type]);
    const int bb = BLOCK_BYTES[type], span = group_bytes(type), nib = nibble_type(type);
    /* the payload: nibble types 4 x 16 bytes after a 2, 4 or 8-byte head; int8 types 2 x 32 after a
     * 2 or 8-byte head */
    const int head = type == Q4_0 || type == Q8_0 ? 2 : type == Q4_1 ? 4 : 8, run = nib ? 16 : 32;
    uint8_t payload[64];
    for (int n = 0; n < 64; n++) payload[n] = (uint8_t)window_index(span, (n / run) * bb + head + n % run, 1);
    g.payload = _mm512_loadu_si512(payload);
    g.scale2 = _mm512_setzero_si512();
    if (type == Q4_KR) {  /* fp32 d, m at bytes 0, 4 of each block */
        int32_t d[16], m[16];
        for (int l = 0; l < 16; l++) {
            d[l] = window_index(span, (l / 4) * bb, 4);
            m[l] = window_index(span, (l / 4) * bb + 4, 4);
        }
        g.scale = _mm512_loadu_si512(d);
        g.scale2 = _mm512_loadu_si512(m);
    } else if (nib) {  /* fp16 d, m at bytes 0, 2 of each block: all in the first window (3 bb + 4 <= 64) */
        uint16_t w[32];
        for (int l = 0; l < 16; l++) {
            w[l] = (uint16_t)((l / 4) * bb / 2);
            w[16 + l] = (uint16_t)((l / 4) * bb / 2 + 1);
        }
        g.scale = _mm512_loadu_si512(w);
    } else if (type == Q8_0) {  /* fp16 d at bytes 0 and 34: words 0 and 17 of the first window */
        uint16_t w[32] = {0};
        for (int l = 0; l < 16; l++) w[l] = (uint16_t)(l < 8 ? 0 : 17);
        g.scale = _mm512_loadu_si512(w);
    } else {  /* Q6_KR: fp32 s0, s1 at bytes 0, 4 and 40, 44: dwords 0, 1, 10, 11 of the first window */
        int32_t d[16];
        for (int l = 0; l < 16; l++) d[l] = (l / 8) * 10 + (l % 8) / 4;
        g.scale = _mm512_loadu_si512(d);
    }
    return g;
}

static inline __attribute__((always_inline)) __m512i load_window(const uint8_t *p, const int masked,
                                                                  __mmask64 k) {
    return masked ? _mm512_maskz_loadu_epi8(k, p) : _mm512_loadu_si512(p);
}

/* One group of one row's weights, as its products need them. */
typedef struct {
    __m512i u[2];  /* unsigned bytes q_w + k that meet q[0..64) and q[64..128) (Q8_SIGNED: Q8_0's q_w) */
    __m512i s[2];  /* signed bytes q_w that meet low[] (15 bits) */
    __m512 d, m;   /* each lane's scale (Q6_KR: s0 or s1) and min */
} weights;

/* The group at p (masked: only the bytes of k are read). */
static inline __attribute__((always_inline)) weights weight_group(
        const int type, const int wide, const uint8_t *p, const int masked, group_mask k, const gathers *g) {
    weights w;
    const int span = group_bytes(type);
    const __m512i a = load_window(p, masked, k.first);
    w.m = _mm512_setzero_ps();
    if (nibble_type(type)) {
        const __m512i b = load_window(p + span - 64, masked, k.second);
        const __m512i nibbles = _mm512_permutex2var_epi8(a, g->payload, b), low4 = _mm512_set1_epi8(0x0F);
        w.u[0] = _mm512_and_si512(nibbles, low4);
        w.u[1] = _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), low4);
        for (int h = 0; h < 2; h++)
            w.s[h] = wide && type == Q4_0 ? _mm512_sub_epi8(w.u[h], _mm512_set1_epi8(8)) : w.u[h];
        if (type == Q4_KR) {
            w.d = _mm512_permutex2var_ps(_mm512_castsi512_ps(a), g->scale, _mm512_castsi512_ps(b));
            w.m = _mm512_permutex2var_ps(_mm512_castsi512_ps(a), g->scale2, _mm512_castsi512_ps(b));
        } else {
            const __m512i dm = _mm512_permutexvar_epi16(g->scale, a);
            w.d = _mm512_cvtph_ps(_mm512_castsi512_si256(dm));
            if (type == Q4_1) w.m = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(dm, 1));
        }
        return w;
    }
    /* int8 types: the two blocks' 32 q each (a short group: the second block's bytes masked) */
    const int at = type == Q8_0 ? 2 : 8, bb = BLOCK_BYTES[type];
    const __m512i q = masked
        ? _mm512_permutex2var_epi8(a, g->payload, load_window(p + span - 64, 1, k.second))
        : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + at))),
                             _mm256_loadu_si256((const __m256i *)(p + bb + at)), 1);
    w.s[0] = w.s[1] = q;
    if (type == Q8_0) {
#ifdef Q8_SIGNED
        w.u[0] = q;  /* taken with its sign by the caller */
#else
        w.u[0] = _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80));
#endif
        w.d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(g->scale, a)));
    } else {
        w.u[0] = _mm512_add_epi8(q, _mm512_set1_epi8(32));
        w.d = _mm512_permutexvar_ps(g->scale, _mm512_castsi512_ps(a));
    }
    w.u[1] = w.u[0];
    return w;
}

/* acc[t] += the row's group at p times token t's group (x + t xs), lane by lane. */
static inline __attribute__((always_inline)) void accumulate_group(
        const int type, const int wide, const int T, const uint8_t *p, const int masked, group_mask k,
        const gathers *g, const xgroup *x, int64_t xs, __m512 *acc) {
    const weights w = weight_group(type, wide, p, masked, k, g);
    const int halves = nibble_type(type) ? 2 : 1;
    for (int t = 0; t < T; t++) {
        const xgroup *xg = x + t * xs;
        __m512i sum = unsigned_offset(type) ? _mm512_loadu_si512(xg->aux.i) : _mm512_setzero_si512();
#ifdef Q8_SIGNED
        if (type == Q8_0) {  /* |q_w| times q[] with q_w's sign: no offset */
            const __m512i q = _mm512_loadu_si512(xg->q), zero = _mm512_setzero_si512();
            const __m512i signed_q = _mm512_mask_sub_epi8(q, _mm512_movepi8_mask(w.u[0]), zero, q);
            sum = DPBUSD(zero, _mm512_abs_epi8(w.u[0]), signed_q);
        } else
#endif
        for (int h = 0; h < halves; h++) sum = DPBUSD(sum, w.u[h], _mm512_loadu_si512(xg->q + 64 * h));
        if (wide) {  /* 128 sum q_w h + sum q_w l */
            __m512i low = _mm512_setzero_si512();
            for (int h = 0; h < halves; h++) low = DPBUSD(low, _mm512_loadu_si512(xg->low + 64 * h), w.s[h]);
            sum = _mm512_add_epi32(_mm512_slli_epi32(sum, 7), low);
        }
        const __m512 scale = _mm512_mul_ps(w.d, _mm512_loadu_ps(xg->dx));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[t]);
        if (has_min(type)) acc[t] = _mm512_fmadd_ps(w.m, _mm512_loadu_ps(xg->aux.f), acc[t]);
    }
}

/* out[t] = row . token t for T tokens (groups x, x + xs, ...).  One row at a time: a single stream
 * of weight bytes, which the hardware prefetcher follows (four rows side by side, as the fp32 path
 * reads them, ran slower once the weights came from memory); two sums per token (even and odd
 * groups) keep two chains of dependent adds in flight.  The lane sums are below 2^24, so their
 * conversion is exact. */
static inline __attribute__((always_inline)) void row_dot_int(
        const int type, const int wide, const int T, const uint8_t *row, int64_t nb, const gathers *g,
        const xgroup *x, int64_t xs, float *out) {
    const int per = blocks_per_group(type), span = group_bytes(type);
    const int64_t full = nb / per;
    const group_mask all = {~(__mmask64)0, ~(__mmask64)0};
    __m512 even[4], odd[4];
    for (int t = 0; t < T; t++) even[t] = odd[t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= full; k += 2) {
        for (int l = 0; l < 2 * span; l += 64)
            _mm_prefetch((const char *)(row + k * span + PREFETCH + l), _MM_HINT_T0);
        accumulate_group(type, wide, T, row + k * span, 0, all, g, x + k, xs, even);
        accumulate_group(type, wide, T, row + (k + 1) * span, 0, all, g, x + k + 1, xs, odd);
    }
    if (k < full) {  /* an odd whole group */
        accumulate_group(type, wide, T, row + k * span, 0, all, g, x + k, xs, even);
        k++;
    }
    if (nb % per)  /* the short last group */
        accumulate_group(type, wide, T, row + full * span, 1, g->tail, g, x + full, xs, k % 2 ? odd : even);
    for (int t = 0; t < T; t++) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(even[t], odd[t]));
}
#else
/* Portable: per block, the integer dot products and their scaling (the same sums, fp32 rounding in
 * another order; a 15-bit block's sum may pass 2^24 and round when converted). */
static inline __attribute__((always_inline)) void row_dot_int(
        const int type, const int wide, const int T, const uint8_t *row, int64_t nb, const xgroup *x,
        int64_t xs, float *out) {
    const int per = blocks_per_group(type), nib = nibble_type(type), bb = BLOCK_BYTES[type];
    for (int t = 0; t < T; t++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * bb;
            const xgroup *xg = x + t * xs + b / per;
            const int j = (int)(b % per), a = nib ? 16 * j : 32 * j, c = nib ? 64 + 16 * j : a + 16;
            const float dx = xg->dx[nib ? 4 * j : 8 * j];
            int32_t s0 = 0, s1 = 0, sq = 0;  /* sum q_w q over elements 0-15, 16-31; sum q */
            for (int e = 0; e < 16; e++) {
                const int32_t q0 = wide ? 128 * xg->q[a + e] + xg->low[a + e] : xg->q[a + e];
                const int32_t q1 = wide ? 128 * xg->q[c + e] + xg->low[c + e] : xg->q[c + e];
                if (nib) {
                    const uint8_t *qs = blk + (type == Q4_0 ? 2 : type == Q4_1 ? 4 : 8);
                    s0 += (qs[e] & 0x0F) * q0;
                    s1 += (qs[e] >> 4) * q1;
                } else {
                    const int8_t *qw = (const int8_t *)(blk + (type == Q8_0 ? 2 : 8));
                    s0 += qw[e] * q0;
                    s1 += qw[16 + e] * q1;
                }
                sq += q0 + q1;
            }
            if (type == Q8_0) acc += fp16_to_f32(blk) * dx * (float)(s0 + s1);
            else if (type == Q6_KR) acc += f32_at(blk) * dx * (float)s0 + f32_at(blk + 4) * dx * (float)s1;
            else if (type == Q4_0) acc += fp16_to_f32(blk) * dx * (float)(s0 + s1 - 8 * sq);
            else {
                const float d = type == Q4_1 ? fp16_to_f32(blk) : f32_at(blk);
                const float mn = type == Q4_1 ? fp16_to_f32(blk + 2) : f32_at(blk + 4);
                acc += d * dx * (float)(s0 + s1) + mn * (dx * (float)sq);
            }
        }
        out[t] = acc;
    }
}
#endif

/* y[t + u, r] for rows [r0, r1) and T tokens from t: one loop per T, so each keeps its sums in registers. */
#ifdef SLM_AVX512
#define GATHERS_DECL(TYPE) const gathers g = make_gathers(TYPE, nb);
#define ROW_DOT(TYPE, WIDE, T, row, out) row_dot_int(TYPE, WIDE, T, row, nb, &g, xt, xs, out)
#else
#define GATHERS_DECL(TYPE)
#define ROW_DOT(TYPE, WIDE, T, row, out) row_dot_int(TYPE, WIDE, T, row, nb, xt, xs, out)
#endif
#define ROWS_INT(TYPE, WIDE, T)                                                                    \
    for (int64_t r = r0; r < r1; r++) {                                                            \
        float out[T];                                                                              \
        ROW_DOT(TYPE, WIDE, T, w + r * row_bytes, out);                                            \
        for (int u = 0; u < T; u++) y[(t + u) * ys + r] = out[u];                                  \
    }
#define INT_ROW_CHUNK 16

/* One function per type and width; tokens up to four at a time.  x: n_tok runs of xs groups.  The
 * rows are shared out by an orphaned `omp for`: called inside a parallel region (slm_qmatmul_int's,
 * or slm_decode's, which runs a whole token in one), the region's threads split them and meet at
 * its end; called outside any, one thread does them all. */
#define DEFINE_MATMUL_INT(NAME, TYPE, WIDE)                                                        \
static void NAME(const uint8_t *w, int64_t rows, int64_t cols, const xgroup *x, int64_t n_tok,     \
                 int64_t xs, float *y, int64_t ys) {                                               \
    const int64_t nb = cols / 32, row_bytes = nb * BLOCK_BYTES[TYPE];                              \
    const int64_t chunks = (rows + INT_ROW_CHUNK - 1) / INT_ROW_CHUNK;                             \
    GATHERS_DECL(TYPE)                                                                             \
    _Pragma("omp for schedule(static)")                                                            \
    for (int64_t c = 0; c < chunks; c++) {                                                         \
        const int64_t r0 = c * INT_ROW_CHUNK;                                                      \
        const int64_t r1 = r0 + INT_ROW_CHUNK < rows ? r0 + INT_ROW_CHUNK : rows;                  \
        for (int64_t t = 0; t < n_tok; t += 4) {                                                   \
            const xgroup *xt = x + t * xs;                                                         \
            switch (n_tok - t < 4 ? n_tok - t : 4) {                                               \
                case 1: ROWS_INT(TYPE, WIDE, 1) break;                                             \
                case 2: ROWS_INT(TYPE, WIDE, 2) break;                                             \
                case 3: ROWS_INT(TYPE, WIDE, 3) break;                                             \
                default: ROWS_INT(TYPE, WIDE, 4) break;                                            \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}
DEFINE_MATMUL_INT(matmul_int8_q8_0, Q8_0, 0)
DEFINE_MATMUL_INT(matmul_int8_q4_0, Q4_0, 0)
DEFINE_MATMUL_INT(matmul_int8_q4_1, Q4_1, 0)
DEFINE_MATMUL_INT(matmul_int8_q4_kr, Q4_KR, 0)
DEFINE_MATMUL_INT(matmul_int8_q6_kr, Q6_KR, 0)
DEFINE_MATMUL_INT(matmul_int15_q8_0, Q8_0, 1)
DEFINE_MATMUL_INT(matmul_int15_q4_0, Q4_0, 1)
DEFINE_MATMUL_INT(matmul_int15_q4_1, Q4_1, 1)
DEFINE_MATMUL_INT(matmul_int15_q4_kr, Q4_KR, 1)
DEFINE_MATMUL_INT(matmul_int15_q6_kr, Q6_KR, 1)

typedef void (*matmul_int_fn)(const uint8_t *, int64_t, int64_t, const xgroup *, int64_t, int64_t, float *,
                              int64_t);
static const matmul_int_fn MATMUL_INT[2][5] = {
    {matmul_int8_q8_0, matmul_int8_q4_0, matmul_int8_q4_1, matmul_int8_q4_kr, matmul_int8_q6_kr},
    {matmul_int15_q8_0, matmul_int15_q4_0, matmul_int15_q4_1, matmul_int15_q4_kr, matmul_int15_q6_kr},
};

/* slm_qmatmul's product with x rounded to `bits` (8 or 15) per block of 32 (above).  Returns 0, -1
 * when the scratch for the rounded activations cannot be allocated, -2 for other bits. */
int slm_qmatmul_int(int type, int bits, const uint8_t *w, int64_t rows, int64_t cols, const float *x,
                    int64_t n_tok, int64_t xs, float *y, int64_t ys, int nthreads) {
    if (bits != 8 && bits != 15) return -2;
    if (n_tok <= 0) return 0;
    const int wide = bits == 15, per = blocks_per_group(type);
    const int64_t groups = (cols / 32 + per - 1) / per;
    xgroup *q = aligned_alloc(64, (size_t)(n_tok * groups) * sizeof(xgroup));
    if (q == NULL) return -1;
    for (int64_t t = 0; t < n_tok; t++) {
        if (wide) quantize_activations(type, 1, x + t * xs, cols, q + t * groups);
        else quantize_activations(type, 0, x + t * xs, cols, q + t * groups);
    }
    const matmul_int_fn matmul = MATMUL_INT[wide][type];
    #pragma omp parallel num_threads(nthreads)
    matmul(w, rows, cols, q, n_tok, groups, y, ys);
    free(q);
    return 0;
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

/* ---- Decoding a whole token in one call ---------------------------------------------------------
 *
 * slm_decode runs n_tok new tokens (one per sequence, the rows of a batch) through every layer of a
 * decoder whose matrices are all packed (Llama-family or GPT-2), and writes their next-token
 * logits: what Transformer.forward computes for input_ids [n_tok, 1] with a KV cache, with one
 * OpenMP region for the token instead of the ~15 torch operations and 4 matrix products a layer costs when each is
 * its own call.  The matrix products are slm_qmatmul_int's, the same rows of the same rounded
 * activations; the rest is plain fp32 C in the order the model writes it:
 *   per layer  h = norm(x);  q | k | v = h Wqkvᵀ (+ b);  q, k rotated (rotate-half, angle
 *              position · inv_freq) unless the model has learned positions;  k, v stored at cache
 *              position `past`;  each query head attends (softmax of q·k / √hd) to positions
 *              0 .. past of its kv head (query head j reads kv head j / (n_head / n_kv_head)),
 *              skipping positions the key mask marks 0 except its own;  x += att Woᵀ (+ b);
 *              h = norm'(x);  gated: g | u = h Wguᵀ, x += (silu(g) u) Wdᵀ;  else u = h Wuᵀ (+ b),
 *              x += gelu_tanh(u) Wdᵀ (+ b)
 *   then       logits = norm_f(x) W_headᵀ,
 * norm being RMSNorm (x / rms(x) γ) or LayerNorm ((x − mean) / √(var + eps) γ + β).
 * Sums run in another order than torch's kernels, so results agree with the eager model to fp32
 * rounding, amplified where a rounded activation lands on the other side of a step (the tests
 * bound it and compare greedy answers). */

typedef struct {
    const uint8_t *w;   /* blocks: rows × (cols / 32 · BLOCK_BYTES[type]) bytes */
    const float *bias;  /* [rows] or NULL */
    int64_t rows, cols;
    int64_t type;
} slm_linear;

typedef struct {
    const float *attn_norm, *attn_norm_bias;  /* the norms' γ [n_embd], and β (LayerNorm; else NULL) */
    const float *mlp_norm, *mlp_norm_bias;
    slm_linear qkv;                            /* rows: q (n_head · hd), then k and v (n_kv_head · hd each) */
    slm_linear o;
    slm_linear up;                             /* gated: gate (intermediate rows), then up; else up */
    slm_linear down;
} slm_block;

typedef struct {
    int64_t n_layer, n_embd, n_head, n_kv_head, head_dim, intermediate;
    int64_t layer_norm;  /* 1: LayerNorm, 0: RMSNorm */
    int64_t gated;       /* 1: SwiGLU (Llama), 0: GELU with the tanh approximation (GPT-2) */
    float norm_eps;
    const float *inv_freq;  /* [head_dim / 2] (RoPE), or NULL: learned positions, already in x */
    const slm_block *blocks;
    const float *final_norm, *final_norm_bias;
    slm_linear lm_head;
} slm_model;

/* Σ a_i b_i in 16 lanes (vectorised without reassociating), then the lanes summed. */
static inline float dot(const float *a, const float *b, int64_t n) {
    float lanes[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lanes[j] += a[i + j] * b[i + j];
    float sum = 0.0f;
    for (int j = 0; j < 16; j++) sum += lanes[j];
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* RMSNorm (bias NULL, layer_norm 0) or LayerNorm (the biased variance, as torch's) of x [n]. */
static void norm(const slm_model *m, const float *x, const float *weight, const float *bias, float *out) {
    const int64_t n = m->n_embd;
    float mean = 0.0f;
    if (m->layer_norm) {
        for (int64_t i = 0; i < n; i++) mean += x[i];
        mean /= (float)n;
        for (int64_t i = 0; i < n; i++) out[i] = x[i] - mean;
        x = out;
    }
    const float scale = 1.0f / sqrtf(dot(x, x, n) / (float)n + m->norm_eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * scale * weight[i] + (bias == NULL ? 0.0f : bias[i]);
}

static inline float gelu_tanh(float u) {
    return 0.5f * u * (1.0f + tanhf(0.7978845608028654f * (u + 0.044715f * u * u * u)));
}

/* Rotate one head's [hd] vector in place by position · inv_freq (rotate-half pairs i, i + hd/2). */
static void rope(float *v, int64_t hd, const float *cosines, const float *sines) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cosines[i] - b * sines[i];
        v[i + half] = b * cosines[i] + a * sines[i];
    }
}

/* y[n_tok, rows] = x Wᵀ (+ b) for x [n_tok, cols], x rounded into xq first by one thread; called by
 * every thread of the region (the rows shared out, a barrier at the end). */
static void decode_linear(const slm_linear *lin, int wide, const float *x, int64_t n_tok, xgroup *xq,
                          float *y) {
    const int type = (int)lin->type, per = blocks_per_group(type);
    const int64_t groups = (lin->cols / 32 + per - 1) / per;
    #pragma omp single
    for (int64_t t = 0; t < n_tok; t++) {
        if (wide) quantize_activations(type, 1, x + t * lin->cols, lin->cols, xq + t * groups);
        else quantize_activations(type, 0, x + t * lin->cols, lin->cols, xq + t * groups);
    }
    MATMUL_INT[wide][type](lin->w, lin->rows, lin->cols, xq, n_tok, groups, y, lin->rows);
    if (lin->bias != NULL) {
        #pragma omp single
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t r = 0; r < lin->rows; r++) y[t * lin->rows + r] += lin->bias[r];
    }
}

/* x [n_tok, n_embd]: the new tokens' embeddings (overwritten); positions [n_tok]: their position ids;
 * keys, values: the cache, [n_layer, n_tok, n_kv_head, max_length, head_dim] fp32, positions
 * 0 .. past − 1 filled; key_mask: NULL, or [n_tok, mask_stride] with 0 at padding positions;
 * logits [n_tok, lm_head rows].  Returns 0, -1 when scratch memory cannot be had, -2 for other bits. */
int slm_decode(const slm_model *m, int bits, float *x, int64_t n_tok, const int64_t *positions,
               float *keys, float *values, int64_t max_length, int64_t past, const int64_t *key_mask,
               int64_t mask_stride, float *logits, int nthreads) {
    if (bits != 8 && bits != 15) return -2;
    const int wide = bits == 15;
    const int64_t d = m->n_embd, hd = m->head_dim, nh = m->n_head, nkv = m->n_kv_head, group = nh / nkv;
    const int64_t qkv_rows = (nh + 2 * nkv) * hd, span = past + 1;
    int64_t widest = d > m->intermediate ? d : m->intermediate;
    widest = widest > nh * hd ? widest : nh * hd;
    const size_t floats = (size_t)(n_tok * (2 * d + qkv_rows + nh * hd + 2 * m->intermediate + nh * span) + hd);
    float *h = malloc(floats * sizeof(float));
    xgroup *xq = aligned_alloc(64, (size_t)(n_tok * (widest / 32 + 1)) * sizeof(xgroup));
    if (h == NULL || xq == NULL) {
        free(h);
        free(xq);
        return -1;
    }
    float *qkv = h + n_tok * d, *att = qkv + n_tok * qkv_rows, *out = att + n_tok * nh * hd;
    float *gu = out + n_tok * d, *scores = gu + n_tok * 2 * m->intermediate, *angles = scores + n_tok * nh * span;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t layer_floats = n_tok * nkv * max_length * hd;
    #pragma omp parallel num_threads(nthreads)
    for (int64_t l = 0; l < m->n_layer; l++) {
        const slm_block *blk = m->blocks + l;
        float *layer_keys = keys + l * layer_floats, *layer_values = values + l * layer_floats;
        #pragma omp single
        for (int64_t t = 0; t < n_tok; t++) norm(m, x + t * d, blk->attn_norm, blk->attn_norm_bias, h + t * d);
        decode_linear(&blk->qkv, wide, h, n_tok, xq, qkv);
        #pragma omp single
        for (int64_t t = 0; t < n_tok; t++) {  /* rotate q and k, store k and v in the cache */
            float *cosines = angles, *sines = angles + hd / 2, *row = qkv + t * qkv_rows;
            for (int64_t i = 0; m->inv_freq != NULL && i < hd / 2; i++) {
                const float angle = (float)positions[t] * m->inv_freq[i];
                cosines[i] = cosf(angle);
                sines[i] = sinf(angle);
            }
            for (int64_t j = 0; m->inv_freq != NULL && j < nh + nkv; j++) rope(row + j * hd, hd, cosines, sines);
            for (int64_t j = 0; j < nkv; j++) {
                const int64_t at = ((t * nkv + j) * max_length + past) * hd;
                memcpy(layer_keys + at, row + (nh + j) * hd, hd * sizeof(float));
                memcpy(layer_values + at, row + (nh + nkv + j) * hd, hd * sizeof(float));
            }
        }
        #pragma omp for schedule(static)
        for (int64_t th = 0; th < n_tok * nh; th++) {  /* one query head of one token */
            const int64_t t = th / nh, j = th % nh;
            const float *q = qkv + t * qkv_rows + j * hd;
            const float *k = layer_keys + (t * nkv + j / group) * max_length * hd;
            const float *v = layer_values + (t * nkv + j / group) * max_length * hd;
            const int64_t *mask = key_mask == NULL ? NULL : key_mask + t * mask_stride;
            float *p = scores + th * span, *o = att + th * hd, top = -INFINITY, total = 0.0f;
            for (int64_t s = 0; s < span; s++) {
                p[s] = mask == NULL || mask[s] != 0 || s == past ? dot(q, k + s * hd, hd) * scale : -INFINITY;
                top = p[s] > top ? p[s] : top;
            }
            for (int64_t s = 0; s < span; s++) {
                p[s] = expf(p[s] - top);
                total += p[s];
            }
            for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
            for (int64_t s = 0; s < span; s++) {
                const float w = p[s] / total;
                if (w != 0.0f)
                    for (int64_t i = 0; i < hd; i++) o[i] += w * v[s * hd + i];
            }
        }
        decode_linear(&blk->o, wide, att, n_tok, xq, out);
        #pragma omp single
        for (int64_t t = 0; t < n_tok; t++) {
            for (int64_t i = 0; i < d; i++) x[t * d + i] += out[t * d + i];
            norm(m, x + t * d, blk->mlp_norm, blk->mlp_norm_bias, h + t * d);
        }
        decode_linear(&blk->up, wide, h, n_tok, xq, gu);
        #pragma omp single
        for (int64_t t = 0; t < n_tok; t++) {
            if (m->gated) {  /* silu(gate) · up, token t's into gu[t · intermediate ..] */
                const float *g = gu + t * 2 * m->intermediate, *u = g + m->intermediate;
                float *a = gu + t * m->intermediate;  /* (before the gate it reads, or on it: no later row's) */
                for (int64_t i = 0; i < m->intermediate; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
            } else {
                float *u = gu + t * m->intermediate;
                for (int64_t i = 0; i < m->intermediate; i++) u[i] = gelu_tanh(u[i]);
            }
        }
        decode_linear(&blk->down, wide, gu, n_tok, xq, out);
        #pragma omp single
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t i = 0; i < d; i++) x[t * d + i] += out[t * d + i];
    }
    for (int64_t t = 0; t < n_tok; t++) norm(m, x + t * d, m->final_norm, m->final_norm_bias, h + t * d);
    #pragma omp parallel num_threads(nthreads)
    decode_linear(&m->lm_head, wide, h, n_tok, xq, logits);
    free(h);
    free(xq);
    return 0;
}

/* ---- Prefill: many tokens at once ---------------------------------------------------------------
 *
 * slm_qgemm_int: y = x Wᵀ for many rows of x, with x rounded per block of 32 as slm_qmatmul_int
 * rounds it (to 15 or 8 bits), and each weight block's exact integer dot products with it (int32)
 * scaled in fp32: the same arithmetic, organised as a matrix product.  Sixteen rows of W at a time
 * are expanded into int16 "panels" (each block: 16 pairs of columns, 16 rows each) with their
 * scales and mins, and every token meets a panel through vpdpwssd (16 rows × one column pair of
 * one token per instruction, accumulated in int32 over the block), eight tokens per pass so a
 * panel's loads serve eight.  AVX512-VNNI only; elsewhere it returns -3 and the caller takes the
 * exact fp32 product of the dequantized rows. */

#if defined(SLM_AVX512) && defined(__AVX512VNNI__)
#define GEMM_TOKENS 8

/* A block's 32 integers as int16 and its scales: value = q d (Q6_KR: d0 for elements 0-15, d1 for
 * 16-31) + m. */
static inline __attribute__((always_inline)) void block_q16(const int type, const uint8_t *blk, int16_t *q,
                                                           float *d0, float *d1, float *m) {
    *m = 0.0f;
    switch (type) {
        case Q8_0:
            *d0 = *d1 = fp16_to_f32(blk);
            for (int i = 0; i < 32; i++) q[i] = (int8_t)blk[2 + i];
            break;
        case Q4_0:
        case Q4_1:
        case Q4_KR: {
            const int head = type == Q4_0 ? 2 : type == Q4_1 ? 4 : 8, bias = type == Q4_0 ? 8 : 0;
            *d0 = *d1 = type == Q4_KR ? f32_at(blk) : fp16_to_f32(blk);
            if (type == Q4_1) *m = fp16_to_f32(blk + 2);
            if (type == Q4_KR) *m = f32_at(blk + 4);
            for (int i = 0; i < 16; i++) {
                q[i] = (int16_t)((blk[head + i] & 15) - bias);
                q[i + 16] = (int16_t)((blk[head + i] >> 4) - bias);
            }
            break;
        }
        default:  /* Q6_KR */
            *d0 = f32_at(blk);
            *d1 = f32_at(blk + 4);
            for (int i = 0; i < 32; i++) q[i] = (int8_t)blk[8 + i];
    }
}

/* Rows r0 .. r0 + 16 of W (rows past `rows` as zeros) into a panel: per block, 16 column pairs of
 * 16 rows (int16 pairs, 1 KiB), then the rows' d0, d1 and m (16 floats each). */
#define PANEL_BLOCK_BYTES (1024 + 3 * 64)
static void expand_panel(const int type, const uint8_t *w, int64_t rows, int64_t nb, int64_t r0, uint8_t *panel) {
    const int64_t row_bytes = nb * BLOCK_BYTES[type];
    for (int64_t b = 0; b < nb; b++) {
        int16_t *pairs = (int16_t *)(panel + b * PANEL_BLOCK_BYTES);
        float *scales = (float *)(panel + b * PANEL_BLOCK_BYTES + 1024);
        for (int lane = 0; lane < 16; lane++) {
            int16_t q[32] = {0};
            float d0 = 0.0f, d1 = 0.0f, m = 0.0f;
            if (r0 + lane < rows) block_q16(type, w + (r0 + lane) * row_bytes + b * BLOCK_BYTES[type], q, &d0, &d1, &m);
            for (int j = 0; j < 16; j++) {
                pairs[j * 32 + 2 * lane] = q[2 * j];
                pairs[j * 32 + 2 * lane + 1] = q[2 * j + 1];
            }
            scales[lane] = d0;
            scales[16 + lane] = d1;
            scales[32 + lane] = m;
        }
    }
}

/* x rounded: per token, its int16 q [cols], and per block dx and dx · Σq (for the mins). */
typedef struct {
    const int16_t *q;
    const float *dx, *sx;
    int64_t cols, nb;
} gemm_x;

/* y[t, r0 .. r0+16) for TT tokens from t0 (TT a constant after inlining). */
static inline __attribute__((always_inline)) void panel_tokens(const int type, const int TT, const uint8_t *panel,
                                                              const gemm_x *x, int64_t t0, float *y, int64_t ys,
                                                              __mmask16 lanes) {
    __m512 f[GEMM_TOKENS];
    for (int t = 0; t < TT; t++) f[t] = _mm512_setzero_ps();
    const int split = type == Q6_KR ? 8 : 16;
    for (int64_t b = 0; b < x->nb; b++) {
        const __m512i *pairs = (const __m512i *)(panel + b * PANEL_BLOCK_BYTES);
        const float *scales = (const float *)(panel + b * PANEL_BLOCK_BYTES + 1024);
        for (int half = 0; half < 16 / split; half++) {
            __m512i acc[GEMM_TOKENS];
            for (int t = 0; t < TT; t++) acc[t] = _mm512_setzero_si512();
            for (int j = half * split; j < (half + 1) * split; j++) {
                const __m512i wv = _mm512_load_si512(pairs + j);
                for (int t = 0; t < TT; t++) {
                    int32_t xp;
                    memcpy(&xp, x->q + (t0 + t) * x->cols + b * 32 + 2 * j, 4);
                    acc[t] = _mm512_dpwssd_epi32(acc[t], wv, _mm512_set1_epi32(xp));
                }
            }
            const __m512 d = _mm512_load_ps(scales + 16 * half);
            for (int t = 0; t < TT; t++) {
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(x->dx[(t0 + t) * x->nb + b]));
                f[t] = _mm512_add_ps(f[t], _mm512_mul_ps(_mm512_cvtepi32_ps(acc[t]), scale));
            }
        }
        if (has_min(type)) {
            const __m512 m = _mm512_load_ps(scales + 32);
            for (int t = 0; t < TT; t++)
                f[t] = _mm512_add_ps(f[t], _mm512_mul_ps(m, _mm512_set1_ps(x->sx[(t0 + t) * x->nb + b])));
        }
    }
    for (int t = 0; t < TT; t++) _mm512_mask_storeu_ps(y + (t0 + t) * ys, lanes, f[t]);
}

#define DEFINE_GEMM(NAME, TYPE)                                                                    \
static void NAME(const uint8_t *w, int64_t rows, const gemm_x *x, int64_t n_tok, float *y, int64_t ys, \
                 uint8_t *panels) {                                                                \
    const int64_t n_panels = (rows + 15) / 16;                                                     \
    _Pragma("omp for schedule(static)")                                                            \
    for (int64_t p = 0; p < n_panels; p++) {                                                       \
        uint8_t *panel = panels + (int64_t)omp_get_thread_num() * x->nb * PANEL_BLOCK_BYTES;       \
        expand_panel(TYPE, w, rows, x->nb, 16 * p, panel);                                         \
        const __mmask16 lanes = rows - 16 * p >= 16 ? 0xFFFF : (__mmask16)((1u << (rows - 16 * p)) - 1); \
        int64_t t = 0;                                                                             \
        for (; t + GEMM_TOKENS <= n_tok; t += GEMM_TOKENS)                                         \
            panel_tokens(TYPE, GEMM_TOKENS, panel, x, t, y + 16 * p, ys, lanes);                   \
        switch (n_tok - t) {                                                                       \
            case 7: panel_tokens(TYPE, 7, panel, x, t, y + 16 * p, ys, lanes); break;              \
            case 6: panel_tokens(TYPE, 6, panel, x, t, y + 16 * p, ys, lanes); break;              \
            case 5: panel_tokens(TYPE, 5, panel, x, t, y + 16 * p, ys, lanes); break;              \
            case 4: panel_tokens(TYPE, 4, panel, x, t, y + 16 * p, ys, lanes); break;              \
            case 3: panel_tokens(TYPE, 3, panel, x, t, y + 16 * p, ys, lanes); break;              \
            case 2: panel_tokens(TYPE, 2, panel, x, t, y + 16 * p, ys, lanes); break;              \
            case 1: panel_tokens(TYPE, 1, panel, x, t, y + 16 * p, ys, lanes); break;              \
            default: break;                                                                        \
        }                                                                                          \
    }                                                                                              \
}
DEFINE_GEMM(gemm_q8_0, Q8_0)
DEFINE_GEMM(gemm_q4_0, Q4_0)
DEFINE_GEMM(gemm_q4_1, Q4_1)
DEFINE_GEMM(gemm_q4_kr, Q4_KR)
DEFINE_GEMM(gemm_q6_kr, Q6_KR)
typedef void (*gemm_fn)(const uint8_t *, int64_t, const gemm_x *, int64_t, float *, int64_t, uint8_t *);
static const gemm_fn GEMM[5] = {gemm_q8_0, gemm_q4_0, gemm_q4_1, gemm_q4_kr, gemm_q6_kr};
#endif

/* y[t * ys + r] = x[t] · W[r] for r < rows, t < n_tok, x rounded to `bits` (8 or 15).  Returns 0; -1
 * without memory for the scratch; -2 for other bits; -3 where the build has no AVX512-VNNI. */
int slm_qgemm_int(int type, int bits, const uint8_t *w, int64_t rows, int64_t cols, const float *x,
                  int64_t n_tok, int64_t xs, float *y, int64_t ys, int nthreads) {
#if defined(SLM_AVX512) && defined(__AVX512VNNI__)
    if (bits != 8 && bits != 15) return -2;
    const float levels = bits == 15 ? 16256.0f : 127.0f;
    const int64_t nb = cols / 32;
    int16_t *q = aligned_alloc(64, (size_t)(n_tok * cols) * sizeof(int16_t) + 64);
    float *dx = malloc((size_t)(2 * n_tok * nb) * sizeof(float));
    uint8_t *panels = aligned_alloc(64, (size_t)(nthreads * nb) * PANEL_BLOCK_BYTES);
    if (q == NULL || dx == NULL || panels == NULL) {
        free(q);
        free(dx);
        free(panels);
        return -1;
    }
    float *sx = dx + n_tok * nb;
    const gemm_x gx = {q, dx, sx, cols, nb};
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t b = 0; b < nb; b++) {
                const float *xb = x + t * xs + b * 32;
                int bad;
                const float amax = block_amax(xb, &bad);
                const float id = amax == 0.0f ? 0.0f : levels / amax;
                int32_t sum = 0;
                for (int i = 0; i < 32; i++) {
                    const int32_t v = bad ? 0 : (int32_t)rintf(xb[i] * id);
                    q[t * cols + b * 32 + i] = (int16_t)v;
                    sum += v;
                }
                dx[t * nb + b] = bad ? NAN : amax / levels;
                sx[t * nb + b] = dx[t * nb + b] * (float)sum;
            }
        GEMM[type](w, rows, &gx, n_tok, y, ys, panels);
    }
    free(q);
    free(dx);
    free(panels);
    return 0;
#else
    (void)type; (void)bits; (void)w; (void)rows; (void)cols; (void)x; (void)n_tok; (void)xs; (void)y; (void)ys;
    (void)nthreads;
    return -3;
#endif
}
