/* C kernels for the CPU path, each with a torch twin: built once per machine by kernels/cpu_build.py.
 *
 * 1. Matrix products straight from GGUF block-quantized weights (twin: cpu_quant.quant_matmul_twin).
 *
 * out[M, N] = x[M, K] @ W^T where row n of W, in groups of inputs, is scale * q + zero: 4-bit q in 0..15
 * (Q4_0, Q4_1, Q4_K) or signed 8-bit q (Q8_0; Q5_0, Q5_1, Q5_K and Q6_K widened). Activations and sums stay float32;
 * only the weights are small, so a decode step reads ~5x fewer bytes than with float32 weights.
 *
 * Packed layouts (built by kernels/cpu_quant.py), tiles of 16 outputs so one step feeds 16 lanes:
 *   q4: w[tiles, G, 16, 16] uint8: byte [t, g, p, i] = q[16t+i, 32g+2p] | q[16t+i, 32g+2p+1] << 4
 *   q8: w[tiles, G, GS, 16] int8:  [t, g, k, i] = q[16t+i, GS*g+k], groups of GS = 32 (16 for Q6_K)
 *   scale, zero: [tiles, G, 16] float32 (rows past N are zero; zero optional for q8).
 * Per group: dot = sum_k x[k] * q[k]; acc += scale * dot + zero * sum_k x[k]. Each row's result is
 * computed in the same order whatever M is, so a sequence gets the same numbers alone or batched.
 * 1a'. From DEC_MIN_ROWS rows (prefill), the same products with each tile's weights decoded once to floats.
 * 1b. The same products with activations quantized to int8 per group and integer dot products (section 1b).
 * 1c. Rows of a packed weight as float32: the token embedding looked up in its packed table.
 * 2. Paged decode attention and RMSNorm (twins in kernels/reference.py), which in torch cost more in
 *    per-op overhead and gathers than in arithmetic at decode batch sizes.
 * Compiled with -march=native; each kernel has AVX-512, AVX2 and plain C paths (the vec16 helpers).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16
#define ROW_BLOCK 8   /* rows a block of the int8-activation kernels (section 1b) */

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
static inline vec16 v_set1(float a) { return _mm512_set1_ps(a); }
static inline vec16 v_mul(vec16 a, vec16 b) { return _mm512_mul_ps(a, b); }
static inline vec16 v_div(vec16 a, vec16 b) { return _mm512_div_ps(a, b); }
static inline float v_hsum(vec16 a) { return _mm512_reduce_add_ps(a); }
static inline vec16 v_sub(vec16 a, vec16 b) { return _mm512_sub_ps(a, b); }
static inline vec16 v_clamp(vec16 a, float lo, float hi) {
    return _mm512_min_ps(_mm512_max_ps(a, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
}
static inline vec16 v_round(vec16 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec16 v_exp2i(vec16 p, vec16 n) { return _mm512_scalef_ps(p, n); }   /* p * 2^n, n integral */
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
static inline vec16 v_set1(float a) { __m256 v = _mm256_set1_ps(a); return (vec16){v, v}; }
static inline vec16 v_mul(vec16 x, vec16 y) { return (vec16){_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
static inline vec16 v_div(vec16 x, vec16 y) { return (vec16){_mm256_div_ps(x.a, y.a), _mm256_div_ps(x.b, y.b)}; }
static inline float v_hsum(vec16 x) {
    __m256 s = _mm256_add_ps(x.a, x.b);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
static inline vec16 v_sub(vec16 x, vec16 y) { return (vec16){_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)}; }
static inline vec16 v_clamp(vec16 x, float lo, float hi) {
    const __m256 l = _mm256_set1_ps(lo), h = _mm256_set1_ps(hi);
    return (vec16){_mm256_min_ps(_mm256_max_ps(x.a, l), h), _mm256_min_ps(_mm256_max_ps(x.b, l), h)};
}
static inline vec16 v_round(vec16 x) {
    return (vec16){_mm256_round_ps(x.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                   _mm256_round_ps(x.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
static inline __m256 exp2i8(__m256 p, __m256 n) {  /* n + 127 written into the exponent bits */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline vec16 v_exp2i(vec16 p, vec16 n) { return (vec16){exp2i8(p.a, n.a), exp2i8(p.b, n.b)}; }
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
static inline vec16 v_set1(float a) { vec16 r; for (int i = 0; i < TILE; i++) r.v[i] = a; return r; }
static inline vec16 v_mul(vec16 a, vec16 b) { for (int i = 0; i < TILE; i++) a.v[i] *= b.v[i]; return a; }
static inline vec16 v_div(vec16 a, vec16 b) { for (int i = 0; i < TILE; i++) a.v[i] /= b.v[i]; return a; }
static inline float v_hsum(vec16 a) { float s = 0.0f; for (int i = 0; i < TILE; i++) s += a.v[i]; return s; }
static inline vec16 v_sub(vec16 a, vec16 b) { for (int i = 0; i < TILE; i++) a.v[i] -= b.v[i]; return a; }
static inline vec16 v_clamp(vec16 a, float lo, float hi) {
    for (int i = 0; i < TILE; i++) a.v[i] = a.v[i] < lo ? lo : a.v[i] > hi ? hi : a.v[i];
    return a;
}
static inline vec16 v_round(vec16 a) { for (int i = 0; i < TILE; i++) a.v[i] = nearbyintf(a.v[i]); return a; }
static inline vec16 v_exp2i(vec16 p, vec16 n) {
    for (int i = 0; i < TILE; i++) p.v[i] = ldexpf(p.v[i], (int)n.v[i]);
    return p;
}
#endif

/* exp(x), x clamped to [-87, 88]: 2^n * 2^f with |f| <= 1/2 and a degree-6 polynomial (rel. error ~2e-7);
   the same approximation in every build. */
static inline vec16 v_exp(vec16 x) {
    const vec16 t = v_mul(v_clamp(x, -87.0f, 88.0f), v_set1(1.44269504f));
    const vec16 n = v_round(t), f = v_sub(t, n);
    vec16 p = v_set1(1.5403530e-4f);
    p = v_fma(p, f, v_set1(1.3333558e-3f));
    p = v_fma(p, f, v_set1(9.6181291e-3f));
    p = v_fma(p, f, v_set1(5.5504109e-2f));
    p = v_fma(p, f, v_set1(2.4022651e-1f));
    p = v_fma(p, f, v_set1(6.9314718e-1f));
    p = v_fma(p, f, v_set1(1.0f));
    return v_exp2i(p, n);
}

/* Store a tile's 16 results, or only the first n_valid of them for the last, partial tile. */
static inline void store_tile(float *dst, vec16 acc, int64_t n_valid) {
    if (n_valid == TILE) { v_store(dst, acc); return; }
#if defined(__AVX512F__)
    /* NOTE: a masked store, not memcpy: a call here keeps the callers' accumulators in memory as well */
    _mm512_mask_storeu_ps(dst, (__mmask16)((1u << n_valid) - 1u), acc);
    return;
#endif
    float tmp[TILE];
    v_store(tmp, acc);
    memcpy(dst, tmp, (size_t)n_valid * sizeof(float));
}

/* sum of each GS-input group of each row: [M, K / GS]. Rows split across threads for prefill-sized batches
   (each sum is the same serial loop on any thread, so the values do not change). */
static void group_sums(const float *x, int64_t M, int64_t K, int64_t GS, float *xsum) {
    const int64_t G = K / GS;
    #pragma omp parallel for schedule(static) if (M * K >= 65536)
    for (int64_t r = 0; r < M; r++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            for (int64_t j = 0; j < GS; j++) s += x[r * K + g * GS + j];
            xsum[r * G + g] = s;
        }
}

/* R rows (1..F_ROW_BLOCK, a compile-time constant after inlining) of one 16-output tile, all G groups.
   Each group's 16 weight loads and conversions serve all R rows; two accumulator chains a row.
   F_ROW_BLOCK: as many rows as keep the chains and accumulators in registers (3 vec16 a row): 8 rows are 24 of
   AVX-512's 32 zmm, but 48 ymm with AVX2's two-ymm vec16, which spilled (AVX2, 1 thread, K=576 -> N=960:
   8 rows 0.30 ms with 8 a block, 0.19 ms with 4; 4 rows 0.098 -> 0.085 ms). The block size changes no row's
   arithmetic, only which rows share a weight decode. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define F_ROW_BLOCK 4
#else
#define F_ROW_BLOCK 8
#endif
#define MIN_INT(a, b) ((a) < (b) ? (a) : (b))

ALWAYS_INLINE void q4_rows(const float *x, int64_t K, int64_t G, const uint8_t *w, const float *scale,
                           const float *zero, const float *xsum, const int R, float *out, int64_t N,
                           int64_t n_valid) {
    vec16 acc[F_ROW_BLOCK];
    for (int r = 0; r < R; r++) acc[r] = v_zero();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *p = w + g * 16 * TILE;
        vec16 a[F_ROW_BLOCK][2];
        for (int r = 0; r < R; r++) a[r][0] = a[r][1] = v_zero();
        for (int k = 0; k < 16; k++) {
            vec16 lo, hi;
            v_nibbles(p + k * TILE, &lo, &hi);
            for (int r = 0; r < R; r++) {
                const float *xr = x + r * K + g * 32 + 2 * k;
                a[r][0] = v_fma_s(xr[0], lo, a[r][0]);
                a[r][1] = v_fma_s(xr[1], hi, a[r][1]);
            }
        }
        const vec16 sc = v_load(scale + g * TILE), zp = v_load(zero + g * TILE);
        for (int r = 0; r < R; r++)
            acc[r] = v_fma(sc, v_add(a[r][0], a[r][1]), v_fma_s(xsum[r * G + g], zp, acc[r]));
    }
    for (int r = 0; r < R; r++) store_tile(out + r * N, acc[r], n_valid);
}

ALWAYS_INLINE void q8_rows(const float *x, int64_t K, int64_t G, int64_t GS, const int8_t *w, const float *scale,
                           const float *zero, const float *xsum, const int R, float *out, int64_t N,
                           int64_t n_valid) {
    vec16 acc[F_ROW_BLOCK];
    for (int r = 0; r < R; r++) acc[r] = v_zero();
    for (int64_t g = 0; g < G; g++) {
        const int8_t *p = w + g * GS * TILE;
        vec16 a[F_ROW_BLOCK][2];
        for (int r = 0; r < R; r++) a[r][0] = a[r][1] = v_zero();
        for (int64_t k = 0; k < GS; k += 2) {
            const vec16 q0 = v_int8(p + k * TILE), q1 = v_int8(p + (k + 1) * TILE);
            for (int r = 0; r < R; r++) {
                const float *xr = x + r * K + g * GS + k;
                a[r][0] = v_fma_s(xr[0], q0, a[r][0]);
                a[r][1] = v_fma_s(xr[1], q1, a[r][1]);
            }
        }
        const vec16 sc = v_load(scale + g * TILE);
        if (zero) {
            const vec16 zp = v_load(zero + g * TILE);
            for (int r = 0; r < R; r++)
                acc[r] = v_fma(sc, v_add(a[r][0], a[r][1]), v_fma_s(xsum[r * G + g], zp, acc[r]));
        } else {
            for (int r = 0; r < R; r++) acc[r] = v_fma(sc, v_add(a[r][0], a[r][1]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) store_tile(out + r * N, acc[r], n_valid);
}

/* ---- 1a'. Big batches (prefill): each tile's weights decoded once ------------------------------------------
 *
 * q4_rows / q8_rows convert a tile's integers to floats again for every block of rows: for a 128-token prefill
 * the weights are decoded 16 to 32 times, and the conversions cost as much as the FMAs they feed. From
 * DEC_MIN_ROWS rows on, a thread decodes its tile once into a float buffer wf[G, GS, 16] (the values v_nibbles /
 * v_int8 give: q4's row 2k of a group holds the low nibbles of byte row k, row 2k+1 the high ones) and runs all
 * its row blocks against it with plain aligned loads. The buffer (K x 64 B: 36 KB at K = 576, 96 KB at 1536)
 * streams from L2 at ~11 B a cycle, well within its bandwidth, so K is not blocked.
 * NOTE: dec_rows does, for each row and lane, exactly the float operations of q4_rows / q8_rows in the same
 * order (two FMA chains a group, then acc = fma(scale, a0 + a1, fma(xsum, zero, acc))); only where acc waits
 * between groups (memory instead of a register), which rows share a weight load and how many lanes one
 * instruction covers differ. So a row's result is bit-identical on both paths, whatever M is and whatever rows
 * it is batched with.
 * DEC_MIN_ROWS (-D to retune): on the AVX2 dev CPU (Zen 3, 1 thread, K=576 -> N=960 / 1536 -> 576) the
 * decoded path loses at 8 rows (0.196 / 0.307 ms against 0.172 / 0.296) and wins from 12 (0.228 / 0.360
 * against 0.278 / 0.445; 16 rows 0.330 / 0.558 against 0.375 / 0.595). Not measured on AVX-512. */
#ifndef DEC_MIN_ROWS
#define DEC_MIN_ROWS 12
#endif
/* dec_rows works on the widest native vector, NW lanes of the tile at a time (lanes are independent: the same
   per-lane operations as the vec16 code). On AVX2 a vec16 is 2 ymm and a row's two chains take 4 of the 16 ymm,
   so 2 rows at most fit beside the weights, each x broadcast feeding 2 FMAs of 8 chains, which ran at half the
   FMA peak; one 8-lane half at a time a row takes 2 ymm: 6 rows = 12 chains + 2 weights + 2 broadcasts
   (1 thread, K=576 -> N=960, 512 rows: 14.5 ms with 2 rows of vec16, 9.5 ms so; 5 or 7 rows: slower).
   AVX-512: 2 zmm a row, 12 rows = 24 chains + 2 weights of the 32 zmm (not measured). */
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
typedef __m256 nvec;
#define NW 8
static inline nvec n_zero(void) { return _mm256_setzero_ps(); }
static inline nvec n_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void n_store(float *p, nvec a) { _mm256_storeu_ps(p, a); }
static inline nvec n_fma_s(float a, nvec b, nvec c) { return _mm256_fmadd_ps(_mm256_set1_ps(a), b, c); }
static inline nvec n_fma(nvec a, nvec b, nvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline nvec n_add(nvec a, nvec b) { return _mm256_add_ps(a, b); }
#ifndef DEC_ROWS
#define DEC_ROWS 6
#endif
#else
typedef vec16 nvec;
#define NW TILE
#define n_zero v_zero
#define n_load v_load
#define n_store v_store
#define n_fma_s v_fma_s
#define n_fma v_fma
#define n_add v_add
#ifndef DEC_ROWS
#if defined(__AVX512F__)
#define DEC_ROWS 12
#else
#define DEC_ROWS 4
#endif
#endif
#endif

/* one tile's integers to floats: wf[G, GS, 16] */
static void decode_tile(const void *w, int bits, int64_t G, int64_t GS, float *wf) {
    if (bits == 4) {
        const uint8_t *p = w;
        for (int64_t i = 0; i < G * 16; i++) {   /* byte row i: inputs 2i (low nibbles) and 2i + 1 (high) */
            vec16 lo, hi;
            v_nibbles(p + i * TILE, &lo, &hi);
            v_store(wf + 2 * i * TILE, lo);
            v_store(wf + (2 * i + 1) * TILE, hi);
        }
    } else {
        const int8_t *p = w;
        for (int64_t i = 0; i < G * GS; i++) v_store(wf + i * TILE, v_int8(p + i * TILE));
    }
}

/* R rows (1..DEC_ROWS, compile-time after inlining) of one tile, all G groups; GS (16 or 32) compile-time.
   acc waits in memory (L1) between groups: the registers go to the chains. */
ALWAYS_INLINE void dec_rows(const float *x, int64_t K, int64_t G, const int GS, const float *wf, const float *scale,
                            const float *zero, const float *xsum, const int R, float *out, int64_t N, int64_t n_valid) {
    float acc[DEC_ROWS * TILE] __attribute__((aligned(64)));
    memset(acc, 0, sizeof acc);
    for (int64_t g = 0; g < G; g++) {
        for (int l = 0; l < TILE; l += NW) {   /* lanes l .. l + NW of the tile */
            const float *p = wf + g * GS * TILE + l;
            nvec a[DEC_ROWS][2];
            for (int r = 0; r < R; r++) a[r][0] = a[r][1] = n_zero();
            for (int k = 0; k < GS; k += 2) {
                const nvec q0 = n_load(p + k * TILE), q1 = n_load(p + (k + 1) * TILE);
                for (int r = 0; r < R; r++) {
                    const float *xr = x + r * K + g * GS + k;
                    a[r][0] = n_fma_s(xr[0], q0, a[r][0]);
                    a[r][1] = n_fma_s(xr[1], q1, a[r][1]);
                }
            }
            const nvec sc = n_load(scale + g * TILE + l);
            if (zero) {
                const nvec zp = n_load(zero + g * TILE + l);
                for (int r = 0; r < R; r++) {
                    float *ar = acc + r * TILE + l;
                    n_store(ar, n_fma(sc, n_add(a[r][0], a[r][1]), n_fma_s(xsum[r * G + g], zp, n_load(ar))));
                }
            } else {
                for (int r = 0; r < R; r++) {
                    float *ar = acc + r * TILE + l;
                    n_store(ar, n_fma(sc, n_add(a[r][0], a[r][1]), n_load(ar)));
                }
            }
        }
    }
    for (int r = 0; r < R; r++) store_tile(out + r * N, v_load(acc + r * TILE), n_valid);
}

/* R = 1..DEC_ROWS rows: R and GS made compile-time constants (cases past DEC_ROWS are dead) */
#define DEC_CASE(gs, n) case n: dec_rows(x, K, G, gs, wf, scale, zero, xsum, MIN_INT(n, DEC_ROWS), out, N, n_valid); break;
#define DEC_SWITCH(gs)                                                                                          \
    switch (R) {                                                                                                \
        DEC_CASE(gs, 1) DEC_CASE(gs, 2) DEC_CASE(gs, 3) DEC_CASE(gs, 4) DEC_CASE(gs, 5) DEC_CASE(gs, 6)          \
        DEC_CASE(gs, 7) DEC_CASE(gs, 8) DEC_CASE(gs, 9) DEC_CASE(gs, 10) DEC_CASE(gs, 11)                       \
        default: dec_rows(x, K, G, gs, wf, scale, zero, xsum, DEC_ROWS, out, N, n_valid); break;                \
    }
static void dec_block(const float *x, int64_t K, int64_t G, int64_t GS, const float *wf, const float *scale,
                      const float *zero, const float *xsum, int R, float *out, int64_t N, int64_t n_valid) {
    if (GS == 32) { DEC_SWITCH(32) } else { DEC_SWITCH(16) }
}
#undef DEC_SWITCH
#undef DEC_CASE

/* out[M, N] through decoded tiles (bits 4: GS = 32, w [tiles, G, 16, 16] bytes; bits 8: w [tiles, G, GS, 16]).
   Tasks are (tile, block of rows): with few tiles (o_proj's 36 over 16 threads) the rows are split too, so
   every thread has work; a thread decodes a tile once for its consecutive tasks on it. */
static void dec_matmul(const float *x, int64_t M, int64_t K, const void *w, int bits, const float *scale,
                       const float *zero, int64_t GS, int64_t N, float *out, const float *xsum) {
    const int64_t G = K / GS, tiles = (N + TILE - 1) / TILE, tile_bytes = bits == 4 ? G * 16 * TILE : G * GS * TILE;
    const int64_t threads = omp_get_max_threads(), min_rows = 4 * DEC_ROWS;
    int64_t splits = tiles >= 4 * threads ? 1 : (4 * threads + tiles - 1) / tiles;
    if (splits > (M + min_rows - 1) / min_rows) splits = (M + min_rows - 1) / min_rows;   /* >= 4 blocks a task */
    const int64_t rows_per = ((M + splits - 1) / splits + DEC_ROWS - 1) / DEC_ROWS * DEC_ROWS;
    splits = (M + rows_per - 1) / rows_per;
    #pragma omp parallel
    {
        /* NOTE: 64-byte aligned, so each of a decoded tile's 16-float rows is one aligned vector load */
        float *wf = aligned_alloc(64, sizeof(float) * (size_t)(G * GS * TILE));
        int64_t decoded = -1;
        #pragma omp for schedule(static) collapse(2)
        for (int64_t t = 0; t < tiles; t++) {
            for (int64_t s = 0; s < splits; s++) {
                const int64_t r_begin = s * rows_per, r_end = r_begin + rows_per < M ? r_begin + rows_per : M;
                if (r_begin >= r_end) continue;
                if (decoded != t) {
                    decode_tile((const char *)w + t * tile_bytes, bits, G, GS, wf);
                    decoded = t;
                }
                const float *st = scale + t * G * TILE, *zt = zero ? zero + t * G * TILE : NULL;
                const int64_t n_valid = N - t * TILE < TILE ? N - t * TILE : TILE;
                for (int64_t r0 = r_begin; r0 < r_end; r0 += DEC_ROWS)
                    dec_block(x + r0 * K, K, G, GS, wf, st, zt, xsum + r0 * G,
                              r_end - r0 < DEC_ROWS ? (int)(r_end - r0) : DEC_ROWS, out + r0 * N + t * TILE, N, n_valid);
            }
        }
        free(wf);
    }
}

void llm_q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *scale,
                   const float *zero, int64_t N, float *out, float *xsum) {
    const int64_t G = K / 32, tiles = (N + TILE - 1) / TILE;
    group_sums(x, M, K, 32, xsum);
    if (M >= DEC_MIN_ROWS) { dec_matmul(x, M, K, w, 4, scale, zero, 32, N, out, xsum); return; }
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n_valid = N - t * TILE < TILE ? N - t * TILE : TILE;
        const uint8_t *wt = w + t * G * 16 * TILE;
        const float *st = scale + t * G * TILE, *zt = zero + t * G * TILE;
        for (int64_t r0 = 0; r0 < M; r0 += F_ROW_BLOCK) {
            const float *xr = x + r0 * K, *xs = xsum + r0 * G;
            float *o = out + r0 * N + t * TILE;
            switch (M - r0 < F_ROW_BLOCK ? (int)(M - r0) : F_ROW_BLOCK) {
                case 1: q4_rows(xr, K, G, wt, st, zt, xs, MIN_INT(1, F_ROW_BLOCK), o, N, n_valid); break;
                case 2: q4_rows(xr, K, G, wt, st, zt, xs, MIN_INT(2, F_ROW_BLOCK), o, N, n_valid); break;
                case 3: q4_rows(xr, K, G, wt, st, zt, xs, MIN_INT(3, F_ROW_BLOCK), o, N, n_valid); break;
                case 4: q4_rows(xr, K, G, wt, st, zt, xs, MIN_INT(4, F_ROW_BLOCK), o, N, n_valid); break;
                case 5: q4_rows(xr, K, G, wt, st, zt, xs, MIN_INT(5, F_ROW_BLOCK), o, N, n_valid); break;
                case 6: q4_rows(xr, K, G, wt, st, zt, xs, MIN_INT(6, F_ROW_BLOCK), o, N, n_valid); break;
                case 7: q4_rows(xr, K, G, wt, st, zt, xs, MIN_INT(7, F_ROW_BLOCK), o, N, n_valid); break;
                default: q4_rows(xr, K, G, wt, st, zt, xs, F_ROW_BLOCK, o, N, n_valid); break;
            }
        }
    }
}

/* 8-bit weights (Q8_0, and the 5/6-bit types widened to int8): groups of GS = 32 or 16 inputs (Q6_K);
   zero may be NULL (then xsum is unused). Layout w[tiles, K / GS, GS, 16]. */
void llm_q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale,
                   const float *zero, int64_t GS, int64_t N, float *out, float *xsum) {
    const int64_t G = K / GS, tiles = (N + TILE - 1) / TILE;
    if (zero) group_sums(x, M, K, GS, xsum);
    if (M >= DEC_MIN_ROWS) { dec_matmul(x, M, K, w, 8, scale, zero, GS, N, out, xsum); return; }
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n_valid = N - t * TILE < TILE ? N - t * TILE : TILE;
        const int8_t *wt = w + t * G * GS * TILE;
        const float *st = scale + t * G * TILE, *zt = zero ? zero + t * G * TILE : NULL;
        for (int64_t r0 = 0; r0 < M; r0 += F_ROW_BLOCK) {
            const float *xr = x + r0 * K, *xs = xsum + r0 * G;
            float *o = out + r0 * N + t * TILE;
            switch (M - r0 < F_ROW_BLOCK ? (int)(M - r0) : F_ROW_BLOCK) {
                case 1: q8_rows(xr, K, G, GS, wt, st, zt, xs, MIN_INT(1, F_ROW_BLOCK), o, N, n_valid); break;
                case 2: q8_rows(xr, K, G, GS, wt, st, zt, xs, MIN_INT(2, F_ROW_BLOCK), o, N, n_valid); break;
                case 3: q8_rows(xr, K, G, GS, wt, st, zt, xs, MIN_INT(3, F_ROW_BLOCK), o, N, n_valid); break;
                case 4: q8_rows(xr, K, G, GS, wt, st, zt, xs, MIN_INT(4, F_ROW_BLOCK), o, N, n_valid); break;
                case 5: q8_rows(xr, K, G, GS, wt, st, zt, xs, MIN_INT(5, F_ROW_BLOCK), o, N, n_valid); break;
                case 6: q8_rows(xr, K, G, GS, wt, st, zt, xs, MIN_INT(6, F_ROW_BLOCK), o, N, n_valid); break;
                case 7: q8_rows(xr, K, G, GS, wt, st, zt, xs, MIN_INT(7, F_ROW_BLOCK), o, N, n_valid); break;
                default: q8_rows(xr, K, G, GS, wt, st, zt, xs, F_ROW_BLOCK, o, N, n_valid); break;
            }
        }
    }
}

/* ---- 1b. The same products with int8 activations (twin: cpu_quant.quant_matmul_int8_twin) ----------------
 *
 * Each row of x is quantized per weight group (GS inputs): d = max|x| / 127, q = round(x / d) in -127..127
 * (llm_quantize_activations). A group's integer sum isum = sum_k q_x[k] * q_w[k] is exact in int32; then,
 * in float32: acc += w_scale * (d * isum) + w_zero * (d * sum_k q_x[k]). The zero term uses the quantized
 * sum, not the exact one: the result is then the exact product of the quantized row with W, whose error
 * (x' - x) . w is smaller than (x' - x) . (w - zero) when the zero is a large offset (Q4_1's minimum).
 * Packed layouts for this path (kernels/cpu_quant.py pack_int8), 4 inputs of one output per 32-bit lane:
 *   q4: w[tiles, G, 4, 16, 4] uint8: byte [t, g, c, i, b] = q[16t+i, 32g+8c+b] | q[16t+i, 32g+8c+4+b] << 4
 *   q8: w[tiles, G, GS/4, 16, 4] int8: [t, g, c, i, b] = q[16t+i, GS*g+4c+b]
 *   scale, zero: [tiles, G, 16], float16 where that holds them exactly (GGUF's own float16 scales), else float32.
 * Instructions by build: AVX-512 VNNI vpdpbusd (u8 x s8 -> s32; signed 8-bit weights offset by +128 and
 * corrected by 128 * sum q_x); AVX-512BW and AVX2 vpmaddubsw + vpmaddwd (signed weights: |w| times x with
 * w's sign, as maddubs would saturate on the offset form); plain C loops. All give the same integer sums.
 */
#if defined(__AVX512F__) && defined(__AVX512BW__)
typedef __m512i ivec16;   /* 16 int32 lanes, one per output of the tile */
typedef __m512i wvec;     /* 64 weight bytes: 4 inputs of each of the 16 outputs */
static inline ivec16 iv_zero(void) { return _mm512_setzero_si512(); }
static inline wvec w_load(const void *p) { return _mm512_loadu_si512(p); }
static inline wvec w_lo(wvec w) { return _mm512_and_si512(w, _mm512_set1_epi8(15)); }
static inline wvec w_hi(wvec w) { return _mm512_and_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi8(15)); }
static inline ivec16 iv_add(ivec16 a, ivec16 b) { return _mm512_add_epi32(a, b); }
static inline ivec16 iv_set1(int32_t a) { return _mm512_set1_epi32(a); }
static inline vec16 iv_to_float(ivec16 a) { return _mm512_cvtepi32_ps(a); }
#if defined(__AVX512VNNI__)
#define Q8_OFFSET 128
/* acc += per lane sum of 4 u8 weights x the 4 s8 inputs at x (the same in every lane), read from memory as
   vpdpbusd's broadcast operand (GCC 12 broadcasts _mm512_set1_epi32 into a register first, an extra instruction
   a product) */
static inline ivec16 dot4_u_at(ivec16 acc, wvec w, const int8_t *x) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)x));
    return acc;
}
static inline wvec w_signed_prep(wvec w) { return _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80)); }  /* w + 128 */
/* a 4-bit group's partial sums: vpdpbusd accumulates in int32 already, so they start at the group's correction
   (p_start) and are the total as they stand (p_total) */
typedef ivec16 pvec;
static inline pvec p_start(int32_t init) { return iv_set1(init); }
static inline ivec16 p_total(pvec p, int32_t init) { (void)init; return p; }
#define DOT4_READS_MEMORY 1   /* the _at forms below are these, not the register forms of the other builds */
#else
#define Q8_OFFSET 0
/* A 4-bit group's partial sums kept as int16 pairs (vpmaddubsw) and widened once a group (vpmaddwd): 8
   products-of-pairs of at most 2*15*127 each sum to <= 30480, inside int16, so the sums stay exact. */
typedef __m512i pvec;
static inline pvec p_start(int32_t init) { (void)init; return _mm512_setzero_si512(); }
static inline pvec p_dot4_u(pvec p, wvec w, int32_t x4) {
    return _mm512_add_epi16(p, _mm512_maddubs_epi16(w, _mm512_set1_epi32(x4)));
}
static inline ivec16 p_total(pvec p, int32_t init) {
    return _mm512_add_epi32(_mm512_madd_epi16(p, _mm512_set1_epi16(1)), _mm512_set1_epi32(init));
}
static inline wvec w_signed_prep(wvec w) { return w; }
static inline ivec16 dot4_s(ivec16 acc, wvec w, int32_t x4) {
    const __mmask64 neg = _mm512_movepi8_mask(w);
    const __m512i x = _mm512_set1_epi32(x4);
    const __m512i xs = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);      /* x * sign(w) */
    const __m512i p = _mm512_maddubs_epi16(_mm512_abs_epi8(w), xs);                    /* |pair| <= 2*128*127 */
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
}
#endif
#elif defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define Q8_OFFSET 0
typedef struct { __m256i a, b; } ivec16;
typedef struct { __m256i a, b; } wvec;
static inline ivec16 iv_zero(void) { return (ivec16){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline wvec w_load(const void *p) {
    return (wvec){_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)p + 1)};
}
static inline wvec w_lo(wvec w) {
    const __m256i m = _mm256_set1_epi8(15);
    return (wvec){_mm256_and_si256(w.a, m), _mm256_and_si256(w.b, m)};
}
static inline wvec w_hi(wvec w) {
    const __m256i m = _mm256_set1_epi8(15);
    return (wvec){_mm256_and_si256(_mm256_srli_epi16(w.a, 4), m), _mm256_and_si256(_mm256_srli_epi16(w.b, 4), m)};
}
static inline ivec16 iv_add(ivec16 x, ivec16 y) {
    return (ivec16){_mm256_add_epi32(x.a, y.a), _mm256_add_epi32(x.b, y.b)};
}
static inline ivec16 iv_set1(int32_t a) { const __m256i v = _mm256_set1_epi32(a); return (ivec16){v, v}; }
static inline vec16 iv_to_float(ivec16 x) { return (vec16){_mm256_cvtepi32_ps(x.a), _mm256_cvtepi32_ps(x.b)}; }
static inline __m256i dot4_8(__m256i w_u8, __m256i x_s8) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w_u8, x_s8), _mm256_set1_epi16(1));
}
/* a 4-bit group's partial sums as int16 pairs, widened once a group (exact: see the AVX-512BW branch) */
typedef struct { __m256i a, b; } pvec;
static inline pvec p_start(int32_t init) { (void)init; return (pvec){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline pvec p_dot4_u(pvec p, wvec w, int32_t x4) {
    const __m256i x = _mm256_set1_epi32(x4);
    return (pvec){_mm256_add_epi16(p.a, _mm256_maddubs_epi16(w.a, x)),
                  _mm256_add_epi16(p.b, _mm256_maddubs_epi16(w.b, x))};
}
static inline ivec16 p_total(pvec p, int32_t init) {
    const __m256i one = _mm256_set1_epi16(1), start = _mm256_set1_epi32(init);
    return (ivec16){_mm256_add_epi32(_mm256_madd_epi16(p.a, one), start),
                    _mm256_add_epi32(_mm256_madd_epi16(p.b, one), start)};
}
static inline wvec w_signed_prep(wvec w) { return w; }
static inline ivec16 dot4_s(ivec16 acc, wvec w, int32_t x4) {
    const __m256i x = _mm256_set1_epi32(x4);
    return (ivec16){_mm256_add_epi32(acc.a, dot4_8(_mm256_abs_epi8(w.a), _mm256_sign_epi8(x, w.a))),
                    _mm256_add_epi32(acc.b, dot4_8(_mm256_abs_epi8(w.b), _mm256_sign_epi8(x, w.b)))};
}
#else
#define Q8_OFFSET 0
typedef struct { int32_t v[TILE]; } ivec16;
typedef struct { uint8_t b[4 * TILE]; } wvec;
static inline ivec16 iv_zero(void) { ivec16 r; memset(&r, 0, sizeof r); return r; }
static inline wvec w_load(const void *p) { wvec r; memcpy(r.b, p, sizeof r.b); return r; }
static inline wvec w_lo(wvec w) { for (int i = 0; i < 4 * TILE; i++) w.b[i] &= 15; return w; }
static inline wvec w_hi(wvec w) { for (int i = 0; i < 4 * TILE; i++) w.b[i] >>= 4; return w; }
static inline ivec16 iv_add(ivec16 a, ivec16 b) { for (int i = 0; i < TILE; i++) a.v[i] += b.v[i]; return a; }
static inline ivec16 iv_set1(int32_t a) { ivec16 r; for (int i = 0; i < TILE; i++) r.v[i] = a; return r; }
static inline vec16 iv_to_float(ivec16 a) {   /* through memory: vec16 may be a vector type (AVX-512F, no BW) */
    float f[TILE];
    for (int i = 0; i < TILE; i++) f[i] = (float)a.v[i];
    return v_load(f);
}
static inline ivec16 dot4_u(ivec16 acc, wvec w, int32_t x4) {
    int8_t x[4];
    memcpy(x, &x4, 4);
    for (int i = 0; i < TILE; i++)
        for (int b = 0; b < 4; b++) acc.v[i] += (int32_t)w.b[4 * i + b] * x[b];
    return acc;
}
typedef ivec16 pvec;
static inline pvec p_start(int32_t init) { return iv_set1(init); }
static inline pvec p_dot4_u(pvec p, wvec w, int32_t x4) { return dot4_u(p, w, x4); }
static inline ivec16 p_total(pvec p, int32_t init) { (void)init; return p; }
static inline wvec w_signed_prep(wvec w) { return w; }
static inline ivec16 dot4_s(ivec16 acc, wvec w, int32_t x4) {
    int8_t x[4];
    memcpy(x, &x4, 4);
    for (int i = 0; i < TILE; i++)
        for (int b = 0; b < 4; b++) acc.v[i] += (int32_t)(int8_t)w.b[4 * i + b] * x[b];
    return acc;
}
#endif

static inline int32_t load4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }
/* the kernels' products: 4 inputs at x (pointer forms) */
#ifdef DOT4_READS_MEMORY
static inline pvec p_dot4_u_at(pvec p, wvec w, const int8_t *x) { return dot4_u_at(p, w, x); }
static inline ivec16 dot4_s_at(ivec16 acc, wvec w_prepped, const int8_t *x) { return dot4_u_at(acc, w_prepped, x); }
#else
static inline pvec p_dot4_u_at(pvec p, wvec w, const int8_t *x) { return p_dot4_u(p, w, load4(x)); }
static inline ivec16 dot4_s_at(ivec16 acc, wvec w, const int8_t *x) { return dot4_s(acc, w, load4(x)); }
#endif

/* max |a_i|; and a vector of small integers (already rounded and clamped) stored as int8, returning their sum */
#if defined(__AVX512F__)
static inline float v_amax(vec16 a) { return _mm512_reduce_max_ps(_mm512_abs_ps(a)); }
static inline int32_t v_store_int8(int8_t *p, vec16 a) {
    const __m512i i = _mm512_cvtps_epi32(a);
    _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(i));
    return _mm512_reduce_add_epi32(i);
}
#else
static inline float v_amax(vec16 a) {
    float f[TILE], m = 0.0f;
    v_store(f, a);
    for (int i = 0; i < TILE; i++) m = fabsf(f[i]) > m ? fabsf(f[i]) : m;
    return m;
}
static inline int32_t v_store_int8(int8_t *p, vec16 a) {
    float f[TILE];
    int32_t s = 0;
    v_store(f, a);
    for (int i = 0; i < TILE; i++) { p[i] = (int8_t)f[i]; s += (int32_t)f[i]; }
    return s;
}
#endif

/* 16 float16 values to float32 (exact). The int8 layout keeps GGUF's float16 scales as they are where that is
   exact (Q4_0/Q4_1/Q8_0/Q5_x): 2 bytes instead of 4 a scale, 1/6 of a 4-bit weight's bytes at decode. */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
    uint32_t bits;
    if (e == 31) bits = sign | 0x7f800000u | (m << 13);                 /* inf, nan */
    else if (e) bits = sign | ((e + 112) << 23) | (m << 13);            /* normal: rebias 15 -> 127 */
    else if (!m) bits = sign;                                           /* zero */
    else {                                                              /* subnormal: normalize */
        int shift = 0;
        uint32_t mm = m;
        while (!(mm & 1024)) { mm <<= 1; shift++; }
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((mm & 1023) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline vec16 v_load_half(const uint16_t *p) {
#if defined(__AVX512F__)
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    return (vec16){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
                   _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p + 1))};
#else
    float f[TILE];
    for (int i = 0; i < TILE; i++) f[i] = half_to_float(p[i]);
    return v_load(f);
#endif
}
/* a tile's 16 scales (or zeros) of group g, float16 or float32 */
static inline vec16 v_load_scales(const void *p, int half, int64_t g) {
    return half ? v_load_half((const uint16_t *)p + g * TILE) : v_load((const float *)p + g * TILE);
}

/* One GS-input group of a row to int8 (the twin: cpu_quant.quantize_activations): d = max|x| / 127 and
   q = round-half-even(x * (1 / d)) in float32, exactly as the twin computes them (an all-zero group: d = 0, q = 0);
   returns d, the sum of q in *qsum. */
static inline float quantize_group(const float *xg, int64_t GS, int8_t *qg, int32_t *qsum) {
    float amax = 0.0f;
    for (int64_t j = 0; j < GS; j += TILE) {
        const float a = v_amax(v_load(xg + j));
        amax = a > amax ? a : amax;
    }
    const float dg = amax / 127.0f, inv = dg > 0.0f ? 1.0f / dg : 0.0f;
    int32_t s = 0;
    for (int64_t j = 0; j < GS; j += TILE)
        s += v_store_int8(qg + j, v_clamp(v_round(v_mul(v_load(xg + j), v_set1(inv))), -127.0f, 127.0f));
    *qsum = s;
    return dg;
}

/* ~0.5 ns an input: serial for decode rows, split over rows for prompt chunks (each row alike on any thread) */
#define QUANTIZE_IN_PARALLEL(M, K) ((M) * (K) >= 65536)

/* Quantize each GS-input group of each row: q [M, K] int8; d [M, G] the scales; qsum [M, G] the sums of q, as
   int32 (the layout the twin's tests read; the kernels below use act_blocks). */
void llm_quantize_activations(const float *x, int64_t M, int64_t K, int64_t GS, int8_t *q, float *d,
                              int32_t *qsum) {
    const int64_t G = K / GS;
    #pragma omp parallel for schedule(static) if (QUANTIZE_IN_PARALLEL(M, K))
    for (int64_t r = 0; r < M; r++)
        for (int64_t g = 0; g < G; g++)
            d[r * G + g] = quantize_group(x + r * K + g * GS, GS, q + r * K + g * GS, qsum + r * G + g);
}

/* The quantized rows as the kernels read them: ROW_BLOCK rows at a time, each group's ROW_BLOCK rows side by side
   (q [blocks, G, ROW_BLOCK, GS]), so that one pointer and constant offsets reach every row's inputs in the inner
   loop — a pointer a row would not fit in the registers beside the accumulators. Per row and group ([blocks, G,
   ROW_BLOCK]): d; dq = d * qsum, the zero term's factor; start = the integer sum's correction, -offset * qsum
   (an offset weight, and VNNI's +128 on 8-bit weights). All precomputed, so a group's float step is a convert, a
   multiply and one or two FMAs a row, their scalars read as broadcast operands. */
typedef struct { int8_t *q; float *d, *dq; int32_t *start; } act_blocks;

static void act_blocks_alloc(act_blocks *a, int64_t M, int64_t K, int64_t G) {
    const size_t rows = (size_t)((M + ROW_BLOCK - 1) / ROW_BLOCK * ROW_BLOCK);
    a->q = malloc(rows * (size_t)K);
    a->d = malloc(sizeof(float) * rows * (size_t)G);
    a->dq = malloc(sizeof(float) * rows * (size_t)G);
    a->start = malloc(sizeof(int32_t) * rows * (size_t)G);
}
static void act_blocks_free(act_blocks *a) { free(a->q); free(a->d); free(a->dq); free(a->start); }

static void quantize_blocks(const float *x, int64_t M, int64_t K, int64_t GS, int32_t start_per_qsum,
                            act_blocks a) {
    const int64_t G = K / GS;
    #pragma omp parallel for schedule(static) if (QUANTIZE_IN_PARALLEL(M, K))
    for (int64_t r = 0; r < M; r++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t at = (r / ROW_BLOCK * G + g) * ROW_BLOCK + r % ROW_BLOCK;
            int32_t qsum;
            const float dg = quantize_group(x + r * K + g * GS, GS, a.q + at * GS, &qsum);
            a.d[at] = dg;
            a.dq[at] = dg * (float)qsum;
            a.start[at] = start_per_qsum * qsum;
        }
}

/* acc += zero * dq (with a zero), then acc += scale * (isum * d): one group's float step, the same in every build
   and in the twin's order */
ALWAYS_INLINE vec16 int_group_step(vec16 acc, ivec16 isum, vec16 sc, const vec16 *zp, float d, float dq) {
    if (zp) acc = v_fma(v_set1(dq), *zp, acc);
    return v_fma(sc, v_mul(iv_to_float(isum), v_set1(d)), acc);
}

/* R rows (of one act_blocks block) of one 16-output tile over 4-bit weights: each 64-byte load (8 inputs of 16
   outputs) serves R rows. w = scale * q + zero, or with no zero (Q4_0) scale * (q - offset), the offset * qsum
   coming off the integer sum through its start. */
ALWAYS_INLINE void q4i_rows(const int8_t *q, const float *d, const float *dq, const int32_t *start, int64_t G,
                            const uint8_t *w, const void *scale, const void *zero, int half, const int R,
                            float *out, int64_t N, int64_t n_valid) {
    vec16 acc[ROW_BLOCK];
    for (int r = 0; r < R; r++) acc[r] = v_zero();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *p = w + g * 16 * TILE;
        const int8_t *qg = q + g * ROW_BLOCK * 32;
        const int64_t m = g * ROW_BLOCK;
        pvec s[ROW_BLOCK];
        for (int r = 0; r < R; r++) s[r] = p_start(start[m + r]);
        for (int c = 0; c < 4; c++) {
            const wvec v = w_load(p + c * 4 * TILE), lo = w_lo(v), hi = w_hi(v);
            for (int r = 0; r < R; r++)
                s[r] = p_dot4_u_at(p_dot4_u_at(s[r], lo, qg + r * 32 + 8 * c), hi, qg + r * 32 + 8 * c + 4);
        }
        const vec16 sc = v_load_scales(scale, half, g), zp = zero ? v_load_scales(zero, half, g) : v_zero();
        for (int r = 0; r < R; r++)
            acc[r] = int_group_step(acc[r], p_total(s[r], start[m + r]), sc, zero ? &zp : NULL, d[m + r], dq[m + r]);
    }
    for (int r = 0; r < R; r++) store_tile(out + r * N, acc[r], n_valid);
}

ALWAYS_INLINE void q8i_rows(const int8_t *q, const float *d, const float *dq, const int32_t *start, int64_t G,
                            int64_t GS, const int8_t *w, const void *scale, const void *zero, int half, const int R,
                            float *out, int64_t N, int64_t n_valid) {
    vec16 acc[ROW_BLOCK];
    for (int r = 0; r < R; r++) acc[r] = v_zero();
    for (int64_t g = 0; g < G; g++) {
        const int8_t *p = w + g * GS * TILE;
        const int8_t *qg = q + g * ROW_BLOCK * GS;
        const int64_t m = g * ROW_BLOCK;
        ivec16 s[ROW_BLOCK];
        for (int r = 0; r < R; r++) s[r] = iv_set1(start[m + r]);   /* VNNI: undoes the +128 on w */
        for (int64_t c = 0; c < GS / 4; c++) {
            const wvec v = w_signed_prep(w_load(p + c * 4 * TILE));
            for (int r = 0; r < R; r++) s[r] = dot4_s_at(s[r], v, qg + r * GS + 4 * c);
        }
        const vec16 sc = v_load_scales(scale, half, g), zp = zero ? v_load_scales(zero, half, g) : v_zero();
        for (int r = 0; r < R; r++)
            acc[r] = int_group_step(acc[r], s[r], sc, zero ? &zp : NULL, d[m + r], dq[m + r]);
    }
    for (int r = 0; r < R; r++) store_tile(out + r * N, acc[r], n_valid);
}

/* One call for both widths: bits 4 (GS = 32; a zero, or none and an offset) or 8 (GS 32 or 16, zero optional);
   scale and zero [tiles, G, 16] float16 (half_scales) or float32. */
void llm_int8_matmul(const float *x, int64_t M, int64_t K, const void *w, const void *scale, const void *zero,
                     int64_t half_scales, int64_t bits, int64_t GS, int64_t offset, int64_t N, float *out) {
    const int half = half_scales != 0;
    const size_t sbytes = half ? 2 : 4;
    const int64_t G = K / GS, tiles = (N + TILE - 1) / TILE;
    act_blocks a;
    act_blocks_alloc(&a, M, K, G);
    quantize_blocks(x, M, K, GS, bits == 4 ? -(int32_t)offset : -Q8_OFFSET, a);
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n_valid = N - t * TILE < TILE ? N - t * TILE : TILE;
        const char *st = (const char *)scale + (size_t)(t * G * TILE) * sbytes;
        const char *zt = zero ? (const char *)zero + (size_t)(t * G * TILE) * sbytes : NULL;
        for (int64_t r0 = 0; r0 < M; r0 += ROW_BLOCK) {
            const int8_t *qb = a.q + r0 * K;     /* block r0 / ROW_BLOCK: ROW_BLOCK * K bytes a block */
            const float *db = a.d + r0 * G, *dqb = a.dq + r0 * G;
            const int32_t *sb = a.start + r0 * G;
            float *o = out + r0 * N + t * TILE;
            const int R = M - r0 < ROW_BLOCK ? (int)(M - r0) : ROW_BLOCK;
            if (bits == 4) {
                const uint8_t *wt = (const uint8_t *)w + t * G * 16 * TILE;
#define Q4I(n) q4i_rows(qb, db, dqb, sb, G, wt, st, zt, half, n, o, N, n_valid)
                switch (R) {
                    case 1: Q4I(1); break; case 2: Q4I(2); break; case 3: Q4I(3); break; case 4: Q4I(4); break;
                    case 5: Q4I(5); break; case 6: Q4I(6); break; case 7: Q4I(7); break; default: Q4I(8); break;
                }
#undef Q4I
            } else {
                const int8_t *wt = (const int8_t *)w + t * G * GS * TILE;
#define Q8I(n) q8i_rows(qb, db, dqb, sb, G, GS, wt, st, zt, half, n, o, N, n_valid)
                switch (R) {
                    case 1: Q8I(1); break; case 2: Q8I(2); break; case 3: Q8I(3); break; case 4: Q8I(4); break;
                    case 5: Q8I(5); break; case 6: Q8I(6); break; case 7: Q8I(7); break; default: Q8I(8); break;
                }
#undef Q8I
            }
        }
    }
    act_blocks_free(&a);
}

/* ---- 1c. Rows of a packed weight as float32 (twin: kernels/packed_rows.packed_rows) ----------------------
   The token embedding read from the packed table: for each id, every value is q * scale, then + zero (or, for
   pack_int8's zero-less 4-bit weights, + scale * -offset), each rounded apart as the twin's multiply and add
   (the build's -ffp-contract=off keeps them unfused). A handful of rows a step: plain scalar code. */
static inline float scale_at(const void *p, int half, int64_t at) {
    return half ? half_to_float(((const uint16_t *)p)[at]) : ((const float *)p)[at];
}
/* int8_layout: pack_int8's data (q4 [tiles, G, 4, 16, 4], q8 [tiles, G, GS/4, 16, 4]), else pack's
   (q4 [tiles, G, 16, 16], q8 [tiles, G, GS, 16]); scale and zero [tiles, G, 16]. ids [B] -> out [B, K].
   Returns how many ids were outside [0, N) (their rows are left unwritten): the caller raises. */
int64_t llm_packed_rows(const void *w, const void *scale, const void *zero, int64_t half_scales, int64_t bits,
                        int64_t GS, int64_t offset, int64_t int8_layout, int64_t N, int64_t K, const int64_t *ids,
                        int64_t B, float *out) {
    const int64_t G = K / GS;
    const int half = half_scales != 0;
    int64_t bad = 0;
    for (int64_t r = 0; r < B; r++) {
        if (ids[r] < 0 || ids[r] >= N) { bad++; continue; }
        const int64_t t = ids[r] / TILE, lane = ids[r] % TILE;
        for (int64_t g = 0; g < G; g++) {
            const int64_t at = (t * G + g) * TILE + lane, block = t * G + g;
            const float sc = scale_at(scale, half, at);
            const int add = zero != NULL || offset != 0;
            const float z = zero ? scale_at(zero, half, at) : sc * -(float)offset;
            float *o = out + r * K + g * GS;
            float q[32];
            if (bits == 4 && int8_layout) {          /* byte [c, b]: inputs 8c+b (low nibble), 8c+4+b (high) */
                const uint8_t *p = (const uint8_t *)w + block * 4 * TILE * 4 + lane * 4;
                for (int c = 0; c < 4; c++)
                    for (int b = 0; b < 4; b++) {
                        const uint8_t v = p[c * TILE * 4 + b];
                        q[8 * c + b] = (float)(v & 15), q[8 * c + 4 + b] = (float)(v >> 4);
                    }
            } else if (bits == 4) {                  /* byte k: inputs 2k (low nibble), 2k+1 (high) */
                const uint8_t *p = (const uint8_t *)w + block * 16 * TILE + lane;
                for (int k = 0; k < 16; k++) {
                    const uint8_t v = p[k * TILE];
                    q[2 * k] = (float)(v & 15), q[2 * k + 1] = (float)(v >> 4);
                }
            } else if (int8_layout) {                /* [c, b]: input 4c+b */
                const int8_t *p = (const int8_t *)w + block * GS * TILE + lane * 4;
                for (int64_t c = 0; c < GS / 4; c++)
                    for (int b = 0; b < 4; b++) q[4 * c + b] = (float)p[c * TILE * 4 + b];
            } else {
                const int8_t *p = (const int8_t *)w + block * GS * TILE + lane;
                for (int64_t k = 0; k < GS; k++) q[k] = (float)p[k * TILE];
            }
            for (int64_t k = 0; k < GS; k++) {
                const float v = q[k] * sc;
                o[k] = add ? v + z : v;
            }
        }
    }
    return bad;
}

/* K/V rows as float32, or as float16 (kv_half): a float16 cache holds twice the tokens in the same memory, as
   llama.cpp's default f16 cache does. Halves widen exactly (v_load_half), so the sums are the float32 sums of
   the stored values. */
ALWAYS_INLINE vec16 kv_load(const void *cache, int64_t at, const int half) {
    return half ? v_load_half((const uint16_t *)cache + at) : v_load((const float *)cache + at);
}
ALWAYS_INLINE float kv_value(const void *cache, int64_t at, const int half) {
    return half ? half_to_float(((const uint16_t *)cache)[at]) : ((const float *)cache)[at];
}

/* float32 -> float16, round to nearest even (as torch's .to(torch.float16)); overflow gives inf. */
static inline uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);          /* >= 65520: rounds past the largest half */
    if (a < 0x38800000u) {                                             /* below 2^-14: a subnormal half (or 0) */
        float v;
        memcpy(&v, &a, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(v * 16777216.0f));   /* units of 2^-24, exact scaling */
    }
    return (uint16_t)(sign | ((a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13));   /* rebias 127 -> 15 */
}
/* Where the CPU converts in hardware (F16C / AVX-512F: round to nearest even, subnormals, inf and NaN as the
   scalar form above), 16 at a time. */
void llm_float_to_half(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__AVX2__) && defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) out[i] = float_to_half(x[i]);
}

/* New keys and values into the paged cache (the twin: reference.store_kv): k, v rows of `row` floats
   (KVH * D) at row strides k_stride, v_stride (views into the qkv rows); slot_mapping [T], < 0 skips a row;
   caches [num_blocks * block_size, row], float32 or (kv_half) float16 rounded as torch's .to(). */
void llm_store_kv(const float *k, int64_t k_stride, const float *v, int64_t v_stride, int64_t T, int64_t row,
                  const int64_t *slot_mapping, void *k_cache, void *v_cache, int64_t kv_half) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        if (kv_half) {
            llm_float_to_half(k + t * k_stride, row, (uint16_t *)k_cache + slot * row);
            llm_float_to_half(v + t * v_stride, row, (uint16_t *)v_cache + slot * row);
        } else {
            memcpy((float *)k_cache + slot * row, k + t * k_stride, sizeof(float) * (size_t)row);
            memcpy((float *)v_cache + slot * row, v + t * v_stride, sizeof(float) * (size_t)row);
        }
    }
}

/* One query token per sequence over its paged K/V (the twin: reference.paged_decode_attention). q, out: [B, H, D];
   k_cache, v_cache: [num_blocks, block_size, KVH, D], float32 or (kv_half) float16; block_tables: [B, table_width];
   context_lens: [B] (the current token's K/V already stored). One task per (sequence, KV head): its `group` query
   heads share each K/V row, read (and widened from float16) once for all of them; a thread takes a sequence's tasks
   together. Exact softmax over the scores (max, exp, sum); the weighted V sum keeps each 16-wide slice of each
   head's output in registers across the tokens. Each head's sums run in one fixed order (a score: the 16-lane FMA
   chain over D, then across lanes; an output slice: even and odd tokens in two chains, then added), whatever the
   group size, the batch or the thread. */
#define ATTN_MAX_GROUP 8          /* query heads a KV head, in registers; more take the loop over heads */
#define ATTN_STACK_FLOATS 8192    /* scores and row offsets on the stack up to this size, else malloc */

#define ATTN_PREFETCH 8           /* tokens ahead: K and V rows sit in scattered blocks, out of the prefetchers' sight */

/* bring one K or V row (D values) towards the core ahead of its use; no effect on any result */
ALWAYS_INLINE void prefetch_row(const void *cache, int64_t row, int64_t D, const int half) {
    const char *p = (const char *)cache + row * (half ? 2 : 4);
    for (int64_t b = 0; b < D * (half ? 2 : 4); b += 64) __builtin_prefetch(p + b);
}

/* head g's scores over the tokens: scores[g * padded + t] = (q_g . K_t) * scale, for g < NG. On the way it
   prefetches whole cache slots ahead, K and V of every KV head (slot_len values from the row's start, head_off
   before it): the sequence's other KV heads, next on this thread, then find them in cache, and the slots of a
   block, read whole, are one stream to the memory. */
ALWAYS_INLINE void attn_scores(const float *qb, const void *k_cache, const void *v_cache, const int64_t *rows,
                               int64_t ctx, int64_t padded, const int NG, int64_t D, float scale, float *scores,
                               const int half, int64_t head_off, int64_t slot_len) {
    const int64_t full = D / TILE * TILE;
    for (int64_t t = 0; t < ctx; t++) {
        if (t + ATTN_PREFETCH < ctx) {
            prefetch_row(k_cache, rows[t + ATTN_PREFETCH] - head_off, slot_len, half);
            prefetch_row(v_cache, rows[t + ATTN_PREFETCH] - head_off, slot_len, half);
        }
        vec16 acc[ATTN_MAX_GROUP];
        for (int g = 0; g < NG; g++) acc[g] = v_zero();
        for (int64_t c = 0; c < full; c += TILE) {
            const vec16 kv = kv_load(k_cache, rows[t] + c, half);
            for (int g = 0; g < NG; g++) acc[g] = v_fma(v_load(qb + g * D + c), kv, acc[g]);
        }
        for (int g = 0; g < NG; g++) {
            float dot = v_hsum(acc[g]);
            for (int64_t c = full; c < D; c++) dot += qb[g * D + c] * kv_value(k_cache, rows[t] + c, half);
            scores[g * padded + t] = dot * scale;
        }
    }
}

/* out_g = sum_t p_g[t] V_t for g < NG (p: the normalised scores) */
ALWAYS_INLINE void attn_values(const float *scores, const void *v_cache, const int64_t *rows, int64_t ctx,
                               int64_t padded, const int NG, int64_t D, float *ob, const int half) {
    int64_t c = 0;
    for (; c + TILE <= D; c += TILE) {
        vec16 a0[ATTN_MAX_GROUP], a1[ATTN_MAX_GROUP];
        for (int g = 0; g < NG; g++) a0[g] = a1[g] = v_zero();
        int64_t t = 0;
        for (; t + 1 < ctx; t += 2) {
            const vec16 v0 = kv_load(v_cache, rows[t] + c, half), v1 = kv_load(v_cache, rows[t + 1] + c, half);
            for (int g = 0; g < NG; g++) {
                a0[g] = v_fma_s(scores[g * padded + t], v0, a0[g]);
                a1[g] = v_fma_s(scores[g * padded + t + 1], v1, a1[g]);
            }
        }
        if (t < ctx) {
            const vec16 v0 = kv_load(v_cache, rows[t] + c, half);
            for (int g = 0; g < NG; g++) a0[g] = v_fma_s(scores[g * padded + t], v0, a0[g]);
        }
        for (int g = 0; g < NG; g++) v_store(ob + g * D + c, v_add(a0[g], a1[g]));
    }
    for (; c < D; c++)
        for (int g = 0; g < NG; g++) {
            float a = 0.0f;
            for (int64_t t = 0; t < ctx; t++) a += scores[g * padded + t] * kv_value(v_cache, rows[t] + c, half);
            ob[g * D + c] = a;
        }
}

static void softmax_rows(float *scores, int64_t ctx, int64_t padded, int64_t group) {
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * padded, mx = -INFINITY, sum = 0.0f;
        for (int64_t t = ctx; t < padded; t++) s[t] = -INFINITY;
        for (int64_t t = 0; t < ctx; t++) mx = s[t] > mx ? s[t] : mx;
        const vec16 neg_mx = v_set1(-mx);
        for (int64_t t = 0; t < padded; t += TILE) v_store(s + t, v_exp(v_add(v_load(s + t), neg_mx)));
        for (int64_t t = 0; t < ctx; t++) sum += s[t];
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < ctx; t++) s[t] *= inv;
    }
}

/* NG query heads (a compile-time count after inlining) of one KV head */
ALWAYS_INLINE void attn_heads(const float *qb, const void *k_cache, const void *v_cache, const int64_t *rows,
                              int64_t ctx, int64_t padded, const int NG, int64_t D, float scale, float *scores,
                              float *ob, const int half, int64_t head_off, int64_t slot_len) {
    attn_scores(qb, k_cache, v_cache, rows, ctx, padded, NG, D, scale, scores, half, head_off, slot_len);
    softmax_rows(scores, ctx, padded, NG);
    attn_values(scores, v_cache, rows, ctx, padded, NG, D, ob, half);
}

/* a sequence's tokens [0, ctx) -> the offsets of their KV head kh's rows in the paged cache */
static void token_rows(const int64_t *table, int64_t ctx, int64_t block_size, int64_t KVH, int64_t kh, int64_t D,
                       int64_t *rows) {
    for (int64_t t = 0; t < ctx; t++) rows[t] = ((table[t / block_size] * block_size + t % block_size) * KVH + kh) * D;
}

ALWAYS_INLINE void decode_attention_head(const float *qb, const void *k_cache, const void *v_cache,
                                         const int64_t *table, int64_t ctx, int64_t group, int64_t KVH, int64_t kh,
                                         int64_t D, int64_t block_size, float scale, float *ob, const int half) {
    const int64_t padded = (ctx + TILE - 1) / TILE * TILE, n_scores = (padded > 0 ? padded : TILE) * group;
    float stack_scores[ATTN_STACK_FLOATS];
    int64_t stack_rows[ATTN_STACK_FLOATS / 2];
    const int on_stack = n_scores <= ATTN_STACK_FLOATS && ctx <= ATTN_STACK_FLOATS / 2;
    float *scores = on_stack ? stack_scores : malloc(sizeof(float) * (size_t)n_scores);
    int64_t *rows = on_stack ? stack_rows : malloc(sizeof(int64_t) * (size_t)(ctx > 0 ? ctx : 1));
    token_rows(table, ctx, block_size, KVH, kh, D, rows);
#define ATTN_HEADS(ng) \
    attn_heads(qb, k_cache, v_cache, rows, ctx, padded, ng, D, scale, scores, ob, half, kh * D, KVH * D)
    switch (group) {
        case 1: ATTN_HEADS(1); break; case 2: ATTN_HEADS(2); break; case 3: ATTN_HEADS(3); break;
        case 4: ATTN_HEADS(4); break; case 5: ATTN_HEADS(5); break; case 6: ATTN_HEADS(6); break;
        case 7: ATTN_HEADS(7); break; case 8: ATTN_HEADS(8); break;
        default:   /* one head at a time: the same sums, head by head */
            for (int64_t g = 0; g < group; g++)
                attn_heads(qb + g * D, k_cache, v_cache, rows, ctx, padded, 1, D, scale, scores + g * padded,
                           ob + g * D, half, kh * D, KVH * D);
    }
#undef ATTN_HEADS
    if (!on_stack) {
        free(rows);
        free(scores);
    }
}

void llm_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache,
                                const int64_t *block_tables, int64_t table_width, const int64_t *context_lens,
                                int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t block_size,
                                float scale, int64_t kv_half, float *out) {
    const int64_t group = H / KVH;
    /* a sequence's KV heads to one thread in a row, which reads its slots whole (see attn_scores); with few
       rows, one head a task, so both threads share even a single long sequence */
    const int64_t chunk = B >= 4 ? KVH : 1;
    #pragma omp parallel for schedule(dynamic, chunk) collapse(2)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t kh = 0; kh < KVH; kh++) {
            const float *qb = q + (b * H + kh * group) * D;
            float *ob = out + (b * H + kh * group) * D;
            const int64_t *table = block_tables + b * table_width;
            if (kv_half)
                decode_attention_head(qb, k_cache, v_cache, table, context_lens[b], group, KVH, kh, D, block_size,
                                      scale, ob, 1);
            else
                decode_attention_head(qb, k_cache, v_cache, table, context_lens[b], group, KVH, kh, D, block_size,
                                      scale, ob, 0);
        }
    }
}

/* ---- Prefill: a sequence's new tokens against its paged K/V, the same bits as a decode step a token ----
 * (the twin: reference.paged_prefill_attention). Token i of a sequence with q_len new tokens and context_len in
 * all attends to context_len - q_len + i + 1 keys. What differs from a decode row per token is only how a score is
 * summed: a task (sequence, KV head, PREFILL_QUERIES new tokens) first lays its keys out transposed in panels of
 * 16 (kt[panel][dim][16], widened from float16 once), so one vector holds one dimension of 16 keys, and a score
 * needs no horizontal sum per key: lane j of the decode kernel's FMA chain (dims j, j + 16, ...) becomes
 * accumulator j of 16 keys, and the same tree of adds across lanes as v_hsum (score_tree) ends it, then the same
 * tail and scale. Softmax and the weighted V sum are the decode kernel's own functions. */
#define PREFILL_QUERIES 16   /* new tokens a task: a sequence's long prompt still splits across the threads */

/* the cross-lane sum of v_hsum over acc[0..15] (each 16 keys wide): lanes j and j + 8, then + 4, + 2, + 1 in the
   SIMD builds (_mm512_reduce_add_ps and the AVX2 form share this tree); in lane order in the plain one */
static inline vec16 score_tree(vec16 *acc) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    for (int j = 0; j < 8; j++) acc[j] = v_add(acc[j], acc[j + 8]);
    for (int j = 0; j < 4; j++) acc[j] = v_add(acc[j], acc[j + 4]);
    for (int j = 0; j < 2; j++) acc[j] = v_add(acc[j], acc[j + 2]);
    return v_add(acc[0], acc[1]);
#else
    vec16 s = v_zero();
    for (int j = 0; j < TILE; j++) s = v_add(s, acc[j]);
    return s;
#endif
}

/* scores[t] = (q . K_t) * scale for the keys of panels [0, panels): attn_scores' value for each, bit for bit */
static void prefill_scores(const float *qg, const float *kt, int64_t panels, int64_t D, float scale, float *scores) {
    const int64_t full = D / TILE * TILE;
    for (int64_t p = 0; p < panels; p++) {
        const float *kp = kt + p * D * TILE;
        vec16 acc[TILE];
        for (int j = 0; j < TILE; j++) acc[j] = v_zero();
        for (int64_t c = 0; c < full; c += TILE)
            for (int j = 0; j < TILE; j++) acc[j] = v_fma(v_set1(qg[c + j]), v_load(kp + (c + j) * TILE), acc[j]);
        vec16 dot = score_tree(acc);
        for (int64_t c = full; c < D; c++) dot = v_add(dot, v_mul(v_set1(qg[c]), v_load(kp + c * TILE)));
        v_store(scores + p * TILE, v_mul(dot, v_set1(scale)));
    }
}

/* attn_values for NG heads, NG a compile-time count in each branch */
ALWAYS_INLINE void attn_values_n(const float *scores, const void *v_cache, const int64_t *rows, int64_t ctx,
                                 int64_t padded, int NG, int64_t D, float *ob, const int half) {
    switch (NG) {
        case 1: attn_values(scores, v_cache, rows, ctx, padded, 1, D, ob, half); break;
        case 2: attn_values(scores, v_cache, rows, ctx, padded, 2, D, ob, half); break;
        case 3: attn_values(scores, v_cache, rows, ctx, padded, 3, D, ob, half); break;
        case 4: attn_values(scores, v_cache, rows, ctx, padded, 4, D, ob, half); break;
        case 5: attn_values(scores, v_cache, rows, ctx, padded, 5, D, ob, half); break;
        case 6: attn_values(scores, v_cache, rows, ctx, padded, 6, D, ob, half); break;
        case 7: attn_values(scores, v_cache, rows, ctx, padded, 7, D, ob, half); break;
        default: attn_values(scores, v_cache, rows, ctx, padded, ATTN_MAX_GROUP, D, ob, half); break;
    }
}

/* the keys of rows[0, ctx) into transposed panels kt[panel][dim][16] (widened from float16 16 at a time); keys past
   ctx up to the last panel's end are 0 */
ALWAYS_INLINE void transpose_keys(const void *k_cache, const int64_t *rows, int64_t ctx, int64_t panels, int64_t D,
                                  float *kt, const int half) {
    for (int64_t t = 0; t < panels * TILE; t++) {
        float *col = kt + (t / TILE) * D * TILE + t % TILE;
        int64_t c = 0;
        if (t < ctx) {
            for (; c + TILE <= D; c += TILE) {
                float dims[TILE];
                v_store(dims, kv_load(k_cache, rows[t] + c, half));
                for (int j = 0; j < TILE; j++) col[(c + j) * TILE] = dims[j];
            }
            for (; c < D; c++) col[c * TILE] = kv_value(k_cache, rows[t] + c, half);
        }
        for (; c < D; c++) col[c * TILE] = 0.0f;
    }
}

/* one task of llm_paged_prefill_attention: new tokens [first, last) of sequence s, KV head kh */
ALWAYS_INLINE void prefill_task(const float *q, const void *k_cache, const void *v_cache, const int64_t *table,
                                int64_t q_start, int64_t q_len, int64_t context_len, int64_t first, int64_t last,
                                int64_t H, int64_t KVH, int64_t kh, int64_t D, int64_t block_size, float scale,
                                float *out, const int half) {
    const int64_t group = H / KVH, start = context_len - q_len;   /* start: keys before the new tokens */
    const int64_t ctx_max = start + last, panels_max = (ctx_max + TILE - 1) / TILE;
    int64_t *rows = malloc(sizeof(int64_t) * (size_t)ctx_max);
    float *kt = malloc(sizeof(float) * (size_t)(panels_max * D * TILE));
    float *scores = malloc(sizeof(float) * (size_t)(panels_max * TILE * group));
    token_rows(table, ctx_max, block_size, KVH, kh, D, rows);
    transpose_keys(k_cache, rows, ctx_max, panels_max, D, kt, half);
    for (int64_t i = first; i < last; i++) {
        const int64_t ctx = start + i + 1, panels = (ctx + TILE - 1) / TILE, padded = panels * TILE;
        const float *qb = q + ((q_start + i) * H + kh * group) * D;
        float *ob = out + ((q_start + i) * H + kh * group) * D;
        for (int64_t g = 0; g < group; g++) prefill_scores(qb + g * D, kt, panels, D, scale, scores + g * padded);
        if (group <= ATTN_MAX_GROUP) {   /* decode_attention_head's split: its heads together, else one by one */
            softmax_rows(scores, ctx, padded, group);
            attn_values_n(scores, v_cache, rows, ctx, padded, (int)group, D, ob, half);
        } else {
            for (int64_t g = 0; g < group; g++) {
                softmax_rows(scores + g * padded, ctx, padded, 1);
                attn_values(scores + g * padded, v_cache, rows, ctx, padded, 1, D, ob + g * D, half);
            }
        }
    }
    free(scores);
    free(kt);
    free(rows);
}

void llm_paged_prefill_attention(const float *q, const void *k_cache, const void *v_cache,
                                 const int64_t *block_tables, int64_t table_width, const int64_t *cu_seqlens,
                                 const int64_t *context_lens, int64_t S, int64_t H, int64_t KVH, int64_t D,
                                 int64_t block_size, float scale, int64_t kv_half, float *out) {
    int64_t tasks_per_head = 0;   /* tasks: (sequence, KV head, query chunk), numbered sequence by sequence */
    for (int64_t s = 0; s < S; s++)
        tasks_per_head += (cu_seqlens[s + 1] - cu_seqlens[s] + PREFILL_QUERIES - 1) / PREFILL_QUERIES;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks_per_head * KVH; task++) {
        const int64_t kh = task % KVH;
        int64_t s = 0, chunk = task / KVH;
        for (;; s++) {   /* the task's sequence and its chunk there */
            const int64_t n = (cu_seqlens[s + 1] - cu_seqlens[s] + PREFILL_QUERIES - 1) / PREFILL_QUERIES;
            if (chunk < n) break;
            chunk -= n;
        }
        const int64_t q_len = cu_seqlens[s + 1] - cu_seqlens[s], first = chunk * PREFILL_QUERIES;
        const int64_t last = first + PREFILL_QUERIES < q_len ? first + PREFILL_QUERIES : q_len;
        const int64_t *table = block_tables + s * table_width;
        if (kv_half)
            prefill_task(q, k_cache, v_cache, table, cu_seqlens[s], q_len, context_lens[s], first, last, H, KVH, kh,
                         D, block_size, scale, out, 1);
        else
            prefill_task(q, k_cache, v_cache, table, cu_seqlens[s], q_len, context_lens[s], first, last, H, KVH, kh,
                         D, block_size, scale, out, 0);
    }
}

/* RMSNorm with an optional residual add (the twin: reference.rms_norm, float32):
   if residual: x += residual, residual_out = x; out = x * rsqrt(mean(x^2) + eps) * weight.
   x, out, residual_out: [T, N] rows; residual may be NULL. The sum of squares in 16 lanes (then across
   them): a row's result does not depend on T or on the thread that computed it. */
static void rms_norm_row(const float *xr, const float *res, const float *weight, float eps, int64_t N, float *o,
                         float *ro) {
    int64_t i = 0;
    if (res) {
        for (; i + TILE <= N; i += TILE) v_store(ro + i, v_add(v_load(xr + i), v_load(res + i)));
        for (; i < N; i++) ro[i] = xr[i] + res[i];
        xr = ro;
    }
    vec16 acc = v_zero();
    for (i = 0; i + TILE <= N; i += TILE) {
        const vec16 a = v_load(xr + i);
        acc = v_add(acc, v_mul(a, a));
    }
    float ss = v_hsum(acc);
    for (; i < N; i++) ss += xr[i] * xr[i];
    const float inv = 1.0f / sqrtf(ss / (float)N + eps);
    const vec16 vinv = v_set1(inv);
    for (i = 0; i + TILE <= N; i += TILE) v_store(o + i, v_mul(v_mul(v_load(xr + i), vinv), v_load(weight + i)));
    for (; i < N; i++) o[i] = xr[i] * inv * weight[i];
}

void llm_rms_norm(const float *x, const float *residual, const float *weight, float eps, int64_t T, int64_t N,
                  float *out, float *residual_out) {
    #pragma omp parallel for schedule(static) if (T * N >= 16384)
    for (int64_t r = 0; r < T; r++)
        rms_norm_row(x + r * N, residual ? residual + r * N : NULL, weight, eps, N, out + r * N,
                     residual ? residual_out + r * N : NULL);
}

/* Neox-style rotary embedding (the twin: reference.rotary_embedding), writing new q and k:
   q: [T, H, D] with row stride q_stride (heads contiguous), k: [T, KVH, D] with row stride k_stride;
   cos_sin: [max_pos, D] (cos in the first half, sin in the second); q_out, k_out contiguous. */
static void rotate_heads(const float *x, int64_t heads, int64_t D, const float *cos, const float *sin, float *out) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; h++) {
        const float *x1 = x + h * D, *x2 = x1 + half;
        float *o1 = out + h * D, *o2 = o1 + half;
        for (int64_t i = 0; i < half; i++) {
            const float a = x1[i] * cos[i], b = x2[i] * sin[i], c = x2[i] * cos[i], d = x1[i] * sin[i];
            o1[i] = a - b;
            o2[i] = c + d;
        }
    }
}

void llm_rotary_embedding(const float *q, int64_t q_stride, const float *k, int64_t k_stride,
                          const int64_t *positions, const float *cos_sin, int64_t T, int64_t H, int64_t KVH,
                          int64_t D, float *q_out, float *k_out) {
    for (int64_t t = 0; t < T; t++) {
        const float *cos = cos_sin + positions[t] * D, *sin = cos + D / 2;
        rotate_heads(q + t * q_stride, H, D, cos, sin, q_out + t * H * D);
        rotate_heads(k + t * k_stride, KVH, D, cos, sin, k_out + t * KVH * D);
    }
}

/* silu(gate) * up (the twin: reference.silu_and_mul): x [T, 2I] rows of gate then up -> out [T, I]. */
void llm_silu_and_mul(const float *x, int64_t T, int64_t I, float *out) {
    const vec16 one = v_set1(1.0f), minus_one = v_set1(-1.0f);
    #pragma omp parallel for schedule(static) if (T * I >= 16384)
    for (int64_t t = 0; t < T; t++) {
        const float *gate = x + t * 2 * I, *up = gate + I;
        float *o = out + t * I;
        int64_t i = 0;
        for (; i + TILE <= I; i += TILE) {   /* gate / (1 + exp(-gate)) * up: IEEE division, as the tail's */
            const vec16 g = v_load(gate + i);
            v_store(o + i, v_mul(v_div(g, v_add(one, v_exp(v_mul(g, minus_one)))), v_load(up + i)));
        }
        for (; i < I; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}
