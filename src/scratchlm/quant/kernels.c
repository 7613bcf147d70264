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
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* ------------------------------------------------------------------------------------------
 * Decoding with int8 activations (llama.cpp's arithmetic): slm_qmatmul_int8.
 *
 * Each token's x is rounded per block of 32 as llama.cpp's quantize_row_q8_1 does on x86:
 *     amax = max_i |x_i|,  dx = amax / 127,  q_i = round-half-even(x_i * (127 / amax))   (0 if amax = 0)
 * so q_i is in [-127, 127] and |x_i - dx q_i| <= dx / 2 (plus one rounding of the scale).  dx stays
 * fp32 (llama.cpp keeps fp16).  A block whose x holds a NaN or an infinity gets dx = NaN and q = 0,
 * so the outputs it touches are NaN, as the fp32 path's would be NaN or infinite.  Each weight block
 * then costs one exact integer dot product of its 32 integers with the 32 q, scaled in fp32:
 *     Q8_0: d dx sum q_w q    Q4_0: d dx sum (q_w - 8) q    Q4_1, Q4_KR: d dx sum q_w q + m dx sum q
 *     Q6_KR: s0 dx sum_{i<16} q_w q + s1 dx sum_{i>=16} q_w q
 * i.e. sum_i w_i x^_i with x^ = dx q: the dequantized weights times the rounded activations, up to
 * fp32 rounding of the scaled sums.
 *
 * The rounded activations of one token are a run of groups (xgroup): 4 blocks per group for the
 * nibble types (Q4_0, Q4_1, Q4_KR), 2 for the int8 ones (Q8_0, Q6_KR), so that one group meets one
 * 512-bit vector of weight bytes.  The vector's 16 int32 lanes each sum 4 (int8 types) or 8 (nibble
 * types) products, always of one block (and of one scale's half for Q6_KR):
 *   nibble types: q[0..64) = the 4 blocks' elements 0-15 (16 bytes per block, in block order),
 *                 q[64..128) = their elements 16-31; lane l is block l/4, elements 4(l%4)..+3 of
 *                 both halves (the low and the high nibbles of 4 weight bytes);
 *   int8 types:   q[0..64) = the 2 blocks' 64 values in order; lane l is block l/8, elements
 *                 4(l%8)..+3.
 * Weights are read as unsigned bytes u = q_w + k (vpdpbusd multiplies unsigned by signed bytes):
 * k = 0 for Q4_1/Q4_KR nibbles, 8 for Q4_0 (u is the nibble), 128 for Q8_0 (u = q_w ^ 0x80), 32 for
 * Q6_KR, and the lane's sum starts at -k times its q's sum (aux.i), which leaves sum q_w q exactly.
 * The last group of a row short of blocks is padded with zero q and dx (and is read from a
 * zero-padded copy of the weights, so nothing past the row is read).  Every (row, token) sum runs
 * the same operations in the same order whatever the number of rows and tokens beside it, so a
 * token's outputs do not depend on the batch it is decoded in.
 */
typedef struct {
    int8_t q[128];  /* as above; the int8 types use q[0..64) */
    float dx[16];   /* each lane's block's dx */
    union {
        float f[16];    /* Q4_1, Q4_KR: dx * (the lane's sum of q), so m * (its 4 lanes) = m dx sum q */
        int32_t i[16];  /* Q4_0, Q8_0, Q6_KR: -k * (the lane's sum of q) */
    } aux;
} xgroup;

static inline int nibble_type(int type) { return type == Q4_0 || type == Q4_1 || type == Q4_KR; }
static inline int blocks_per_group(int type) { return nibble_type(type) ? 4 : 2; }
static inline int unsigned_offset(int type) { return type == Q4_0 ? 8 : type == Q8_0 ? 128 : type == Q6_KR ? 32 : 0; }

#ifdef SLM_AVX512
#ifdef __AVX512VNNI__
#define DPBUSD(acc, u, s) _mm512_dpbusd_epi32((acc), (u), (s))
#else
/* vpmaddubsw saturates each pair's sum to int16: exact while |u_a s_a + u_b s_b| <= 32767, i.e.
 * for u <= 127 (nibbles, Q6_KR's q + 32, Q8_0's |q_w| below); Q8_0's u = q_w + 128 is not used here. */
#define DPBUSD(acc, u, s) \
    _mm512_add_epi32((acc), _mm512_madd_epi16(_mm512_maddubs_epi16((u), (s)), _mm512_set1_epi16(1)))
#endif
#if !defined(__AVX512VNNI__)
#define Q8_SIGNED 1  /* Q8_0 as |q_w| times q with q_w's sign: no offset, no saturation */
#endif
#endif

/* One block of x (32 values) rounded: its 32 q into lo (elements 0-15) and hi (16-31); returns dx. */
static inline float quantize_block(const float *xb, int8_t *lo, int8_t *hi) {
#ifdef SLM_AVX512
    const __m512 a = _mm512_loadu_ps(xb), b = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const int bad = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) || _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q) ||
                    !(amax <= FLT_MAX);
#else
    float amax = 0.0f;
    int bad = 0;
    for (int i = 0; i < 32; i++) {
        const float v = fabsf(xb[i]);
        bad |= !(v <= FLT_MAX);  /* NaN or infinite */
        amax = v > amax ? v : amax;
    }
#endif
    if (bad) {
        memset(lo, 0, 16);
        memset(hi, 0, 16);
        return NAN;
    }
    const float id = amax == 0.0f ? 0.0f : 127.0f / amax;
#ifdef SLM_AVX512
    /* vcvtps2dq rounds half to even (the default rounding mode), as rintf does */
    _mm_storeu_si128((__m128i *)lo, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)))));
    _mm_storeu_si128((__m128i *)hi, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)))));
#else
    for (int i = 0; i < 16; i++) {
        lo[i] = (int8_t)rintf(xb[i] * id);
        hi[i] = (int8_t)rintf(xb[16 + i] * id);
    }
#endif
    return amax / 127.0f;
}

/* A group's aux from its q and dx (above). */
static inline void group_sums(const int type, xgroup *gr) {
    const int k = unsigned_offset(type);
#ifdef SLM_AVX512
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i sum = DPBUSD(_mm512_setzero_si512(), ones, _mm512_loadu_si512(gr->q));
    if (nibble_type(type)) sum = DPBUSD(sum, ones, _mm512_loadu_si512(gr->q + 64));
    if (type == Q4_1 || type == Q4_KR)
        _mm512_storeu_ps(gr->aux.f, _mm512_mul_ps(_mm512_loadu_ps(gr->dx), _mm512_cvtepi32_ps(sum)));
    else
        _mm512_storeu_si512(gr->aux.i, _mm512_mullo_epi32(sum, _mm512_set1_epi32(-k)));
#else
    for (int l = 0; l < 16; l++) {
        int sum = 0;
        for (int i = 0; i < 4; i++) sum += gr->q[4 * l + i] + (nibble_type(type) ? gr->q[64 + 4 * l + i] : 0);
        if (type == Q4_1 || type == Q4_KR) gr->aux.f[l] = gr->dx[l] * (float)sum;
        else gr->aux.i[l] = -k * sum;
    }
#endif
}

/* x (cols values, cols % 32 == 0) into its groups g[0 .. ceil(nb / blocks_per_group)). */
static void quantize_activations(const int type, const float *x, int64_t cols, xgroup *g) {
    const int64_t nb = cols / 32;
    const int per = blocks_per_group(type), nib = nibble_type(type), lanes = nib ? 4 : 8;
    const int64_t groups = (nb + per - 1) / per;
    memset(g + groups - 1, 0, sizeof(xgroup));  /* the last group's padding */
    for (int64_t b = 0; b < nb; b++) {
        xgroup *gr = g + b / per;
        const int j = (int)(b % per);
        int8_t *lo = gr->q + (nib ? 16 * j : 32 * j), *hi = nib ? gr->q + 64 + 16 * j : lo + 16;
        const float d = quantize_block(x + b * 32, lo, hi);
        for (int l = 0; l < lanes; l++) gr->dx[lanes * j + l] = d;
    }
    for (int64_t k = 0; k < groups; k++) group_sums(type, g + k);
}

#ifdef SLM_AVX512

/* Bytes ahead of the current group that each pass asks the cache for: rows lie end to end, so this
 * runs into the next rows (a prefetch past the matrix faults nothing).  4 KiB ahead took the
 * SmolLM2 decode's matrices from 7.5 to 6.6 ms a token, 1 thread; 0.25-1 KiB did nothing. */
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
    __m512i qs;     /* nibble types: the group's 64 nibble bytes out of its two 64-byte windows */
    __m512i scale;  /* fp16 types: 32 words, each lane's d then each lane's m; fp32 types: dwords */
    __m512i scale2; /* Q4_KR: each lane's m (dwords) */
    group_mask tail; /* the bytes of a row's short last group */
} gathers;

static inline int group_bytes(int type) { return blocks_per_group(type) * BLOCK_BYTES[type]; }

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
    /* the payload bytes: nibble types 4 x 16 bytes after a 2, 4 or 8-byte head; int8 types 2 x 32
     * after a 2 or 8-byte head */
    const int head = type == Q4_0 || type == Q8_0 ? 2 : type == Q4_1 ? 4 : 8, run = nib ? 16 : 32;
    uint8_t qs[64];
    for (int n = 0; n < 64; n++) qs[n] = (uint8_t)window_index(span, (n / run) * bb + head + n % run, 1);
    g.qs = _mm512_loadu_si512(qs);
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

static inline __attribute__((always_inline)) __m512i load_window(const uint8_t *p, const int masked, __mmask64 k) {
    return masked ? _mm512_maskz_loadu_epi8(k, p) : _mm512_loadu_si512(p);
}

/* One group of one row (p: its first byte; masked: only the bytes of k are read): the unsigned
 * weight bytes that meet q[0..64) (lo) and q[64..128) (hi, nibble types), each lane's weight scale
 * d (Q6_KR: s0 or s1) and offset m. */
static inline __attribute__((always_inline)) void weight_group(
        const int type, const uint8_t *p, const int masked, group_mask k, const gathers *g,
        __m512i *lo, __m512i *hi, __m512 *d, __m512 *m) {
    const int span = group_bytes(type);
    const __m512i a = load_window(p, masked, k.first);
    if (nibble_type(type)) {
        const __m512i b = load_window(p + span - 64, masked, k.second);
        const __m512i nibbles = _mm512_permutex2var_epi8(a, g->qs, b), low4 = _mm512_set1_epi8(0x0F);
        *lo = _mm512_and_si512(nibbles, low4);
        *hi = _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), low4);
        if (type == Q4_KR) {
            *d = _mm512_permutex2var_ps(_mm512_castsi512_ps(a), g->scale, _mm512_castsi512_ps(b));
            *m = _mm512_permutex2var_ps(_mm512_castsi512_ps(a), g->scale2, _mm512_castsi512_ps(b));
        } else {
            const __m512i dm = _mm512_permutexvar_epi16(g->scale, a);
            *d = _mm512_cvtph_ps(_mm512_castsi512_si256(dm));
            *m = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(dm, 1));
        }
        return;
    }
    /* int8 types: the two blocks' 32 q each (a short group: the second block's bytes masked) */
    const int at = type == Q8_0 ? 2 : 8, bb = BLOCK_BYTES[type];
    const __m512i w = masked ? _mm512_permutex2var_epi8(a, g->qs, load_window(p + span - 64, 1, k.second))
        : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + at))),
                             _mm256_loadu_si256((const __m256i *)(p + bb + at)), 1);
    if (type == Q8_0) {
#ifdef Q8_SIGNED
        *lo = w;  /* signed: the caller takes |q_w| and moves its sign onto q */
#else
        *lo = _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));
#endif
        *d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(g->scale, a)));
    } else {
        *lo = _mm512_add_epi8(w, _mm512_set1_epi8(32));
        *d = _mm512_permutexvar_ps(g->scale, _mm512_castsi512_ps(a));
    }
    *hi = _mm512_setzero_si512();
    *m = _mm512_setzero_ps();
}

/* acc[t] += the row's group at p times token t's group (x + t xs), lane by lane. */
static inline __attribute__((always_inline)) void accumulate_group(
        const int type, const int T, const uint8_t *p, const int masked, group_mask k, const gathers *g,
        const xgroup *x, int64_t xs, __m512 *acc) {
    __m512i lo, hi;
    __m512 d, m;
    weight_group(type, p, masked, k, g, &lo, &hi, &d, &m);
    for (int t = 0; t < T; t++) {
        const xgroup *xg = x + t * xs;
        __m512i sum;
#ifdef Q8_SIGNED
        if (type == Q8_0) {
            const __mmask64 negative = _mm512_movepi8_mask(lo);
            const __m512i q = _mm512_loadu_si512(xg->q);
            sum = DPBUSD(_mm512_setzero_si512(), _mm512_abs_epi8(lo),
                         _mm512_mask_sub_epi8(q, negative, _mm512_setzero_si512(), q));
        } else
#endif
        {
            sum = unsigned_offset(type) ? _mm512_loadu_si512(xg->aux.i) : _mm512_setzero_si512();
            sum = DPBUSD(sum, lo, _mm512_loadu_si512(xg->q));
        }
        if (nibble_type(type)) sum = DPBUSD(sum, hi, _mm512_loadu_si512(xg->q + 64));
        const __m512 scale = _mm512_mul_ps(d, _mm512_loadu_ps(xg->dx));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[t]);
        if (type == Q4_1 || type == Q4_KR) acc[t] = _mm512_fmadd_ps(m, _mm512_loadu_ps(xg->aux.f), acc[t]);
    }
}

/* out[t] = row . token t for T tokens (groups x, x + xs, ...).  One row at a time: a single stream
 * of weight bytes, which the hardware prefetcher follows (four rows side by side ran 1.3-2.8x
 * slower once the weights came from memory); two sums per token (even and odd groups) keep two
 * chains of dependent adds in flight. */
static inline __attribute__((always_inline)) void row_dot_int8(
        const int type, const int T, const uint8_t *row, int64_t nb, const gathers *g, const xgroup *x,
        int64_t xs, float *out) {
    const int per = blocks_per_group(type), span = group_bytes(type);
    const int64_t full = nb / per;
    const group_mask all = {~(__mmask64)0, ~(__mmask64)0};
    __m512 even[4], odd[4];
    for (int t = 0; t < T; t++) even[t] = odd[t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= full; k += 2) {
        for (int l = 0; l < 2 * span; l += 64) _mm_prefetch((const char *)(row + k * span + PREFETCH + l), _MM_HINT_T0);
        accumulate_group(type, T, row + k * span, 0, all, g, x + k, xs, even);
        accumulate_group(type, T, row + (k + 1) * span, 0, all, g, x + k + 1, xs, odd);
    }
    if (k < full) accumulate_group(type, T, row + k++ * span, 0, all, g, x + full - 1, xs, even);
    if (nb % per)  /* the short last group */
        accumulate_group(type, T, row + full * span, 1, g->tail, g, x + full, xs, k % 2 ? odd : even);
    for (int t = 0; t < T; t++) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(even[t], odd[t]));
}
#else
/* Portable: per block, the integer dot product and its scaling (the same sums, fp32 rounding in
 * another order). */
static inline __attribute__((always_inline)) void row_dot_int8(
        const int type, const int T, const uint8_t *row, int64_t nb, const xgroup *x, int64_t xs, float *out) {
    const int per = blocks_per_group(type), nib = nibble_type(type), bb = BLOCK_BYTES[type];
    {
        for (int t = 0; t < T; t++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = row + b * bb;
                const xgroup *xg = x + t * xs + b / per;
                const int j = (int)(b % per);
                const int8_t *lo = xg->q + (nib ? 16 * j : 32 * j), *hi = nib ? xg->q + 64 + 16 * j : lo + 16;
                const float dx = xg->dx[nib ? 4 * j : 8 * j];
                int32_t s0 = 0, s1 = 0, sx = 0;  /* sum q_w q over elements 0-15, 16-31; sum q */
                if (nib) {
                    const uint8_t *qs = blk + (type == Q4_0 ? 2 : type == Q4_1 ? 4 : 8);
                    for (int e = 0; e < 16; e++) {
                        s0 += (qs[e] & 0x0F) * lo[e];
                        s1 += (qs[e] >> 4) * hi[e];
                        sx += lo[e] + hi[e];
                    }
                } else {
                    const int8_t *qw = (const int8_t *)(blk + (type == Q8_0 ? 2 : 8));
                    for (int e = 0; e < 16; e++) {
                        s0 += qw[e] * lo[e];
                        s1 += qw[16 + e] * hi[e];
                    }
                }
                if (type == Q8_0) acc += fp16_to_f32(blk) * dx * (float)(s0 + s1);
                else if (type == Q6_KR) acc += f32_at(blk) * dx * (float)s0 + f32_at(blk + 4) * dx * (float)s1;
                else if (type == Q4_0) acc += fp16_to_f32(blk) * dx * (float)(s0 + s1 - 8 * sx);
                else {
                    const float d = type == Q4_1 ? fp16_to_f32(blk) : f32_at(blk);
                    const float mn = type == Q4_1 ? fp16_to_f32(blk + 2) : f32_at(blk + 4);
                    acc += d * dx * (float)(s0 + s1) + mn * (dx * (float)sx);
                }
            }
            out[t] = acc;
        }
    }
}
#endif

/* y[t0 + t, r] for rows [r0, r1) and T tokens from t0: one loop per T, so each keeps its sums in registers. */
#ifdef SLM_AVX512
#define ROWS_INT8(TYPE, T)                                                                         \
    for (int64_t r = r0; r < r1; r++) {                                                            \
        float out[T];                                                                              \
        row_dot_int8(TYPE, T, w + r * row_bytes, nb, &g, xt, xs, out);                             \
        for (int u = 0; u < T; u++) y[(t + u) * ys + r] = out[u];                                  \
    }
#define GATHERS_DECL(TYPE) const gathers g = make_gathers(TYPE, nb);
#else
#define ROWS_INT8(TYPE, T)                                                                         \
    for (int64_t r = r0; r < r1; r++) {                                                            \
        float out[T];                                                                              \
        row_dot_int8(TYPE, T, w + r * row_bytes, nb, xt, xs, out);                                 \
        for (int u = 0; u < T; u++) y[(t + u) * ys + r] = out[u];                                  \
    }
#define GATHERS_DECL(TYPE)
#endif
#define INT8_ROW_CHUNK 16

/* One function per type (each its own OpenMP region, as DEFINE_MATMUL); tokens up to four at a time. */
#define DEFINE_MATMUL_INT8(NAME, TYPE)                                                             \
static void NAME(const uint8_t *w, int64_t rows, int64_t cols, const xgroup *x, int64_t n_tok,     \
                 int64_t xs, float *y, int64_t ys, int nthreads) {                                \
    const int64_t nb = cols / 32, row_bytes = nb * BLOCK_BYTES[TYPE];                              \
    const int64_t chunks = (rows + INT8_ROW_CHUNK - 1) / INT8_ROW_CHUNK;                           \
    GATHERS_DECL(TYPE)                                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                             \
    for (int64_t c = 0; c < chunks; c++) {                                                         \
        const int64_t r0 = c * INT8_ROW_CHUNK;                                                     \
        const int64_t r1 = r0 + INT8_ROW_CHUNK < rows ? r0 + INT8_ROW_CHUNK : rows;                \
        for (int64_t t = 0; t < n_tok; t += 4) {                                                   \
            const xgroup *xt = x + t * xs;                                                         \
            switch (n_tok - t < 4 ? n_tok - t : 4) {                                               \
                case 1: ROWS_INT8(TYPE, 1) break;                                                  \
                case 2: ROWS_INT8(TYPE, 2) break;                                                  \
                case 3: ROWS_INT8(TYPE, 3) break;                                                  \
                default: ROWS_INT8(TYPE, 4) break;                                                 \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}
DEFINE_MATMUL_INT8(matmul_int8_q8_0, Q8_0)
DEFINE_MATMUL_INT8(matmul_int8_q4_0, Q4_0)
DEFINE_MATMUL_INT8(matmul_int8_q4_1, Q4_1)
DEFINE_MATMUL_INT8(matmul_int8_q4_kr, Q4_KR)
DEFINE_MATMUL_INT8(matmul_int8_q6_kr, Q6_KR)

/* slm_qmatmul's product with int8 activations (above).  Returns 0, or -1 when the scratch for the
 * rounded activations cannot be allocated. */
int slm_qmatmul_int8(int type, const uint8_t *w, int64_t rows, int64_t cols, const float *x, int64_t n_tok,
                     int64_t xs, float *y, int64_t ys, int nthreads) {
    const int per = blocks_per_group(type);
    const int64_t groups = (cols / 32 + per - 1) / per;
    xgroup *q = aligned_alloc(64, (size_t)(n_tok * groups) * sizeof(xgroup));
    if (q == NULL) return -1;
    for (int64_t t = 0; t < n_tok; t++) quantize_activations(type, x + t * xs, cols, q + t * groups);
    switch (type) {
        case Q8_0: matmul_int8_q8_0(w, rows, cols, q, n_tok, groups, y, ys, nthreads); break;
        case Q4_0: matmul_int8_q4_0(w, rows, cols, q, n_tok, groups, y, ys, nthreads); break;
        case Q4_1: matmul_int8_q4_1(w, rows, cols, q, n_tok, groups, y, ys, nthreads); break;
        case Q4_KR: matmul_int8_q4_kr(w, rows, cols, q, n_tok, groups, y, ys, nthreads); break;
        case Q6_KR: matmul_int8_q6_kr(w, rows, cols, q, n_tok, groups, y, ys, nthreads); break;
    }
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
