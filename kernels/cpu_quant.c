/* Matrix products straight from GGUF block-quantized weights, for the CPU decode path.
 *
 * out[M, N] = x[M, K] @ W^T where row n of W, in groups of 32 inputs, is scale * q + zero (4-bit q in
 * 0..15: Q4_0, Q4_1, Q4_K) or scale * q (signed 8-bit q: Q8_0). Activations and sums stay float32;
 * only the weights are small, so a decode step reads ~5x fewer bytes than with float32 weights.
 *
 * Packed layouts (built by kernels/cpu_quant.py), tiles of 16 outputs so one step feeds 16 lanes:
 *   q4: w[tiles, G, 16, 16] uint8: byte [t, g, p, i] = q[16t+i, 32g+2p] | q[16t+i, 32g+2p+1] << 4
 *   q8: w[tiles, G, 32, 16] int8:  [t, g, k, i] = q[16t+i, 32g+k]
 *   scale, zero: [tiles, G, 16] float32 (rows past N are zero).
 * Per group: dot = sum_k x[k] * q[k]; acc += scale * dot + zero * sum_k x[k]. Each row's result is
 * computed in the same order whatever M is, so a sequence gets the same numbers alone or batched.
 * Compiled at first use with -march=native (kernels/cpu_quant.py); AVX-512, AVX2 and plain C paths.
 */
#include <stdint.h>
#include <string.h>

#define TILE 16
#define ROW_BLOCK 4

#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 vec16;
static inline vec16 v_zero(void) { return _mm512_setzero_ps(); }
static inline vec16 v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store(float *p, vec16 a) { _mm512_storeu_ps(p, a); }
static inline vec16 v_fma_s(float a, vec16 b, vec16 c) { return _mm512_fmadd_ps(_mm512_set1_ps(a), b, c); }
static inline vec16 v_fma(vec16 a, vec16 b, vec16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec16 v_add(vec16 a, vec16 b) { return _mm512_add_ps(a, b); }
static inline void v_nibbles(const uint8_t *p, vec16 *lo, vec16 *hi) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
static inline vec16 v_int8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef struct { __m256 a, b; } vec16;
static inline vec16 v_zero(void) { return (vec16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline vec16 v_load(const float *p) { return (vec16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void v_store(float *p, vec16 x) { _mm256_storeu_ps(p, x.a); _mm256_storeu_ps(p + 8, x.b); }
static inline vec16 v_fma_s(float s, vec16 x, vec16 c) {
    __m256 a = _mm256_set1_ps(s);
    return (vec16){_mm256_fmadd_ps(a, x.a, c.a), _mm256_fmadd_ps(a, x.b, c.b)};
}
static inline vec16 v_fma(vec16 x, vec16 y, vec16 c) {
    return (vec16){_mm256_fmadd_ps(x.a, y.a, c.a), _mm256_fmadd_ps(x.b, y.b, c.b)};
}
static inline vec16 v_add(vec16 x, vec16 y) { return (vec16){_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
static inline void v_nibbles(const uint8_t *p, vec16 *lo, vec16 *hi) {
    __m256i mask = _mm256_set1_epi32(15);
    __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    *lo = (vec16){_mm256_cvtepi32_ps(_mm256_and_si256(b0, mask)), _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask))};
    *hi = (vec16){_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4))};
}
static inline vec16 v_int8(const int8_t *p) {
    return (vec16){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))),
                   _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))))};
}
#else
typedef struct { float v[TILE]; } vec16;
static inline vec16 v_zero(void) { vec16 r; memset(&r, 0, sizeof r); return r; }
static inline vec16 v_load(const float *p) { vec16 r; memcpy(r.v, p, sizeof r.v); return r; }
static inline void v_store(float *p, vec16 a) { memcpy(p, a.v, sizeof a.v); }
static inline vec16 v_fma_s(float a, vec16 b, vec16 c) {
    for (int i = 0; i < TILE; i++) c.v[i] += a * b.v[i];
    return c;
}
static inline vec16 v_fma(vec16 a, vec16 b, vec16 c) {
    for (int i = 0; i < TILE; i++) c.v[i] += a.v[i] * b.v[i];
    return c;
}
static inline vec16 v_add(vec16 a, vec16 b) {
    for (int i = 0; i < TILE; i++) a.v[i] += b.v[i];
    return a;
}
static inline void v_nibbles(const uint8_t *p, vec16 *lo, vec16 *hi) {
    for (int i = 0; i < TILE; i++) { lo->v[i] = (float)(p[i] & 15); hi->v[i] = (float)(p[i] >> 4); }
}
static inline vec16 v_int8(const int8_t *p) {
    vec16 r;
    for (int i = 0; i < TILE; i++) r.v[i] = (float)p[i];
    return r;
}
#endif

/* Store a tile's 16 results, or only the first n_valid of them for the last, partial tile. */
static inline void store_tile(float *dst, vec16 acc, int64_t n_valid) {
    if (n_valid == TILE) { v_store(dst, acc); return; }
    float tmp[TILE];
    v_store(tmp, acc);
    memcpy(dst, tmp, (size_t)n_valid * sizeof(float));
}

/* sum of each 32-input group of each row: [M, G] */
static void group_sums(const float *x, int64_t M, int64_t K, float *xsum) {
    const int64_t G = K / 32;
    for (int64_t r = 0; r < M; r++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            for (int j = 0; j < 32; j++) s += x[r * K + g * 32 + j];
            xsum[r * G + g] = s;
        }
}

void llm_q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *scale,
                   const float *zero, int64_t N, float *out, float *xsum) {
    const int64_t G = K / 32, tiles = (N + TILE - 1) / TILE;
    group_sums(x, M, K, xsum);
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n_valid = N - t * TILE < TILE ? N - t * TILE : TILE;
        for (int64_t r0 = 0; r0 < M; r0 += ROW_BLOCK) {
            const int rn = M - r0 < ROW_BLOCK ? (int)(M - r0) : ROW_BLOCK;
            vec16 acc[ROW_BLOCK];
            for (int r = 0; r < ROW_BLOCK; r++) acc[r] = v_zero();
            for (int64_t g = 0; g < G; g++) {
                const int64_t tg = t * G + g;
                const uint8_t *p = w + tg * 16 * TILE;
                vec16 d_even[ROW_BLOCK], d_odd[ROW_BLOCK];
                for (int r = 0; r < ROW_BLOCK; r++) { d_even[r] = v_zero(); d_odd[r] = v_zero(); }
                for (int k = 0; k < 16; k++) {
                    vec16 lo, hi;
                    v_nibbles(p + k * TILE, &lo, &hi);
                    for (int r = 0; r < rn; r++) {
                        const float *xr = x + (r0 + r) * K + g * 32 + 2 * k;
                        d_even[r] = v_fma_s(xr[0], lo, d_even[r]);
                        d_odd[r] = v_fma_s(xr[1], hi, d_odd[r]);
                    }
                }
                const vec16 sc = v_load(scale + tg * TILE), zp = v_load(zero + tg * TILE);
                for (int r = 0; r < rn; r++)
                    acc[r] = v_fma(sc, v_add(d_even[r], d_odd[r]), v_fma_s(xsum[(r0 + r) * G + g], zp, acc[r]));
            }
            for (int r = 0; r < rn; r++) store_tile(out + (r0 + r) * N + t * TILE, acc[r], n_valid);
        }
    }
}

void llm_q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale,
                   int64_t N, float *out) {
    const int64_t G = K / 32, tiles = (N + TILE - 1) / TILE;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n_valid = N - t * TILE < TILE ? N - t * TILE : TILE;
        for (int64_t r0 = 0; r0 < M; r0 += ROW_BLOCK) {
            const int rn = M - r0 < ROW_BLOCK ? (int)(M - r0) : ROW_BLOCK;
            vec16 acc[ROW_BLOCK];
            for (int r = 0; r < ROW_BLOCK; r++) acc[r] = v_zero();
            for (int64_t g = 0; g < G; g++) {
                const int64_t tg = t * G + g;
                const int8_t *p = w + tg * 32 * TILE;
                vec16 d_even[ROW_BLOCK], d_odd[ROW_BLOCK];
                for (int r = 0; r < ROW_BLOCK; r++) { d_even[r] = v_zero(); d_odd[r] = v_zero(); }
                for (int k = 0; k < 32; k += 2) {
                    const vec16 q0 = v_int8(p + k * TILE), q1 = v_int8(p + (k + 1) * TILE);
                    for (int r = 0; r < rn; r++) {
                        const float *xr = x + (r0 + r) * K + g * 32 + k;
                        d_even[r] = v_fma_s(xr[0], q0, d_even[r]);
                        d_odd[r] = v_fma_s(xr[1], q1, d_odd[r]);
                    }
                }
                const vec16 sc = v_load(scale + tg * TILE);
                for (int r = 0; r < rn; r++) acc[r] = v_fma(sc, v_add(d_even[r], d_odd[r]), acc[r]);
            }
            for (int r = 0; r < rn; r++) store_tile(out + (r0 + r) * N + t * TILE, acc[r], n_valid);
        }
    }
}
