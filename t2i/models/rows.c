/* The decode step's CPU kernels (loaded by t2i/models/rows.py): rows_f32 / rows_bf16, a linear layer for a few
   rows, y[m, n] = gelu?(sum_k x[m, k] w[n, k] + bias[n]) (+ res[m, n]); step_attn_f32 / step_attn_bf16, a decode
   step's attention for every row and head (further down).

   The weight is packed once (t2i/models/rows.py) into panels of NV * 16 output columns, each panel
   [K][NV * 16] (bfloat16: [K / 2][NV * 16][2], pairs along k), zero-padded, so a thread reads its share of the
   weight as one contiguous stream. Each step of k multiplies the panel's NV vectors with every row's x[m, k]
   broadcast from memory (outer products into MR x NV accumulators: no horizontal sums, x costs a few bytes
   per step), so at 8 rows the weight streams at close to the speed of memory where a dot-product kernel
   would read four times its bytes of x from cache. float32: AVX-512 FMA; bfloat16: AVX512-BF16 dot products
   (pairs of products summed in float32), each output rounded to bfloat16 once. Threads split the panels
   (OpenMP: the runtime torch loaded). No software prefetch: the hardware's alone streamed the 49 linears of a
   muge step faster (alternated in one process: float32 29.1 against 27.0 GB/s with one line prefetched 8 steps
   of k ahead, bfloat16 30.3 against 24.7). Every pointer is contiguous; rows.py checks shapes and dtypes. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 8
#define NV 3
#define PANEL (NV * 16)

/* the first `left` of 16 lanes (all of them from 16 on) */
static inline __mmask16 mask16(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }

/* exp of 16 floats (x <= 0 here: scores minus their maximum): 2^(x log2 e) split into 2^n (scalef) and 2^f,
   |f| <= 1/2, by its Taylor series to degree 7 (relative error below 1e-8, under float32's own rounding) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* GELU of 16 floats on the float32 accumulator, as F.gelu: act 1 exact (erf by Abramowitz-Stegun 7.1.26,
   absolute error below 1.5e-7), act 2 the tanh approximation (tanh u = 1 - 2 / (exp(2u) + 1)) */
static inline __m512 gelu16(__m512 x, int act) {
    __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    if (act == 2) {
        __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
        __m512 e = exp16(_mm512_min_ps(_mm512_mul_ps(u, _mm512_set1_ps(2.0f)), _mm512_set1_ps(88.0f)));
        __m512 th = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
        return _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, th));
    }
    __m512 z = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.7071067811865476f)));
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), z, one));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 erf = _mm512_fnmadd_ps(p, exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z))), one);
    erf = _mm512_mask_sub_ps(erf, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps(), erf);
    return _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, erf));
}

static inline __attribute__((always_inline)) void panel_f32(const float *x, const float *wp, const float *bias,
                                                           const float *res, float *y, int mr, int64_t K,
                                                           int64_t N, int64_t n0, int act) {
    __m512 acc[MR][NV];
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NV; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const float *w = wp + k * PANEL;
        __m512 a[NV];
        for (int j = 0; j < NV; j++) a[j] = _mm512_loadu_ps(w + 16 * j);
#pragma GCC unroll 8
        for (int m = 0; m < MR; m++) {
            if (m < mr) {
                __m512 v = _mm512_set1_ps(x[m * K + k]);
                for (int j = 0; j < NV; j++) acc[m][j] = _mm512_fmadd_ps(v, a[j], acc[m][j]);
            }
        }
    }
    for (int j = 0; j < NV; j++) {
        int64_t n = n0 + 16 * j;
        if (n >= N) break;
        __mmask16 t = mask16(N - n);
        __m512 b = bias ? _mm512_maskz_loadu_ps(t, bias + n) : _mm512_setzero_ps();
        for (int m = 0; m < mr; m++) {
            __m512 v = _mm512_add_ps(acc[m][j], b);
            if (act) v = gelu16(v, act);
            if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(t, res + m * N + n));
            _mm512_mask_storeu_ps(y + m * N + n, t, v);
        }
    }
}

/* y [M, N] = gelu?(x [M, K] w^T (+ bias [N])) (+ res [M, N]); wp: the packed weight; bias / res may be NULL;
   act 0: no GELU, 1: exact, 2: tanh */
void rows_f32(const float *x, const float *wp, const float *bias, const float *res, float *y, int64_t M,
              int64_t K, int64_t N, int act, int threads) {
    int64_t panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const float *w = wp + p * K * PANEL;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            int mr = M - m0 < MR ? (int)(M - m0) : MR;
            const float *r = res ? res + m0 * N : NULL;
            if (mr == MR) panel_f32(x + m0 * K, w, bias, r, y + m0 * N, MR, K, N, p * PANEL, act);
            else panel_f32(x + m0 * K, w, bias, r, y + m0 * N, mr, K, N, p * PANEL, act);
        }
    }
}

#define MAXKEYS 4096

/* softmax over s[0 .. n) in place (float32), returns nothing; s has room for a multiple of 16 */
static inline void softmax_inplace(float *s, int64_t n) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
    float m = _mm512_reduce_max_ps(mx);
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    __m512 vm = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
    for (j = 0; j < n; j += 16) {
        __mmask16 t = mask16(n - j);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, s + j), vm));
        e = _mm512_maskz_mov_ps(t, e);
        sum = _mm512_add_ps(sum, e);
        _mm512_mask_storeu_ps(s + j, t, e);
    }
    float inv = 1.0f / _mm512_reduce_add_ps(sum);
    __m512 vi = _mm512_set1_ps(inv);
    for (j = 0; j < n; j += 16) {
        __mmask16 t = mask16(n - j);
        _mm512_mask_storeu_ps(s + j, t, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, s + j), vi));
    }
}

/* 16 values of a float32 (size 4) or bfloat16 (size 2) array as float32, masked; and back, rounded once */
static inline __m512 load16(const void *p, __mmask16 t, int size) {
    if (size == 2) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(t, p)), 16));
    return _mm512_maskz_loadu_ps(t, p);
}

static inline void store16(void *p, __mmask16 t, __m512 v, int size) {
#ifdef __AVX512BF16__
    if (size == 2) {
        _mm256_mask_storeu_epi16(p, t, (__m256i)_mm512_cvtneps_pbh(v));
        return;
    }
#endif
    _mm512_mask_storeu_ps(p, t, v);
}

/* One decode step's attention, every (row b, head h) of qkv [B, 3, H, D] (the new position's q, k, v): k and v
   written into the caches kc, vc [B, H, L, D] at `start`, then y[b, h] = softmax(scale q . k[idx]) v[idx] over
   the n cache positions idx (the mask row's), in float32, y [B, H, D] rounded once. Elements of `size` bytes:
   float32 or bfloat16, one body for both (size is a constant in each caller). */
static inline __attribute__((always_inline)) void step_attn(const char *qkv, char *kc, char *vc, int64_t B,
                                                           int64_t H, int64_t L, int64_t D, int64_t start,
                                                           const int64_t *idx, int64_t n, float scale, char *y,
                                                           int threads, int size) {
    int64_t row = D * size; /* bytes of one head's vector */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H;
        const char *q = qkv + (b * 3 * H + h) * row;
        char *kb = kc + bh * L * row, *vb = vc + bh * L * row;
        memcpy(kb + start * row, qkv + (b * 3 * H + H + h) * row, (size_t)row);
        memcpy(vb + start * row, qkv + (b * 3 * H + 2 * H + h) * row, (size_t)row);
        float s[MAXKEYS];
        for (int64_t j = 0; j < n; j++) {
            const char *k = kb + idx[j] * row;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 16) {
                __mmask16 t = mask16(D - d);
                acc = _mm512_fmadd_ps(load16(q + d * size, t, size), load16(k + d * size, t, size), acc);
            }
            s[j] = _mm512_reduce_add_ps(acc) * scale;
        }
        softmax_inplace(s, n);
        for (int64_t d = 0; d < D; d += 16) {
            __mmask16 t = mask16(D - d);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), load16(vb + idx[j] * row + d * size, t, size), acc);
            store16(y + bh * row + d * size, t, acc, size);
        }
    }
}

void step_attn_f32(const float *qkv, float *kc, float *vc, int64_t B, int64_t H, int64_t L, int64_t D,
                   int64_t start, const int64_t *idx, int64_t n, float scale, float *y, int threads) {
    step_attn((const char *)qkv, (char *)kc, (char *)vc, B, H, L, D, start, idx, n, scale, (char *)y, threads, 4);
}

#ifdef __AVX512BF16__

/* K2: K / 2 rounded up; x rows have K bf16 (an odd K's last pair is read with a zero) */
static inline __attribute__((always_inline)) void panel_bf16(const uint16_t *x, const uint16_t *wp,
                                                            const uint16_t *bias, const uint16_t *res, uint16_t *y,
                                                            int mr, int64_t K, int64_t N, int64_t n0, int act) {
    __m512 acc[MR][NV];
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NV; j++) acc[m][j] = _mm512_setzero_ps();
    int64_t pairs = K / 2;
    for (int64_t k2 = 0; k2 < pairs; k2++) {
        const uint16_t *w = wp + k2 * PANEL * 2;
        __m512i a[NV];
        for (int j = 0; j < NV; j++) a[j] = _mm512_loadu_si512((const void *)(w + 32 * j));
#pragma GCC unroll 8
        for (int m = 0; m < MR; m++) {
            if (m < mr) {
                int32_t two;
                memcpy(&two, x + m * K + 2 * k2, 4);
                __m512i v = _mm512_set1_epi32(two);
                for (int j = 0; j < NV; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)v, (__m512bh)a[j]);
            }
        }
    }
    if (K & 1) { /* the last k alone: its pair partner in the packed weight is zero */
        const uint16_t *w = wp + pairs * PANEL * 2;
        for (int m = 0; m < mr; m++) {
            __m512i v = _mm512_set1_epi32((int32_t)x[m * K + K - 1]);
            for (int j = 0; j < NV; j++)
                acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)v,
                                             (__m512bh)_mm512_loadu_si512((const void *)(w + 32 * j)));
        }
    }
    for (int j = 0; j < NV; j++) {
        int64_t n = n0 + 16 * j;
        if (n >= N) break;
        __mmask16 t = mask16(N - n);
        __m512 b = bias ? load16(bias + n, t, 2) : _mm512_setzero_ps();
        for (int m = 0; m < mr; m++) {
            __m512 v = _mm512_add_ps(acc[m][j], b);
            if (act) v = gelu16(v, act);
            if (res) v = _mm512_add_ps(v, load16(res + m * N + n, t, 2));
            store16(y + m * N + n, t, v, 2);
        }
    }
}

void rows_bf16(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, const uint16_t *res, uint16_t *y,
               int64_t M, int64_t K, int64_t N, int act, int threads) {
    int64_t panels = (N + PANEL - 1) / PANEL, K2 = (K + 1) / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const uint16_t *w = wp + p * K2 * PANEL * 2;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            int mr = M - m0 < MR ? (int)(M - m0) : MR;
            const uint16_t *r = res ? res + m0 * N : NULL;
            if (mr == MR) panel_bf16(x + m0 * K, w, bias, r, y + m0 * N, MR, K, N, p * PANEL, act);
            else panel_bf16(x + m0 * K, w, bias, r, y + m0 * N, mr, K, N, p * PANEL, act);
        }
    }
}
/* step_attn over a bfloat16 qkv and caches (the scores, softmax and weighted sum in float32) */
void step_attn_bf16(const uint16_t *qkv, uint16_t *kc, uint16_t *vc, int64_t B, int64_t H, int64_t L, int64_t D,
                    int64_t start, const int64_t *idx, int64_t n, float scale, uint16_t *y, int threads) {
    step_attn((const char *)qkv, (char *)kc, (char *)vc, B, H, L, D, start, idx, n, scale, (char *)y, threads, 2);
}
#endif

/* A 64-bit fingerprint of n bytes (any dtype), at the speed of memory: 8 lanes of rotate-xor-multiply over
   the 64-bit words of each 1 MiB chunk (chunks in parallel, folded in order: the same for any thread count).
   Not cryptographic: it tells whether a weight changed (t2i/models/attention.py keeps packed copies by it). */
static inline uint64_t fold64(uint64_t h, uint64_t x) {
    h ^= x;
    h = (h << 31) | (h >> 33);
    return h * 0x9e3779b97f4a7c15ull;
}

uint64_t fingerprint(const uint8_t *p, int64_t n, int threads) {
    const int64_t chunk = 1 << 20;
    int64_t chunks = (n + chunk - 1) / chunk;
    uint64_t out = 0xcbf29ce484222325ull ^ (uint64_t)n;
    uint64_t *part = (uint64_t *)malloc((size_t)(chunks > 0 ? chunks : 1) * 8);
    if (part == NULL) return 0; /* rows.py: 0 is "could not": nothing is kept by it */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const uint8_t *q = p + c * chunk;
        int64_t len = n - c * chunk < chunk ? n - c * chunk : chunk, i = 0;
        __m512i h = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);
        const __m512i mul = _mm512_set1_epi64((long long)0x9e3779b97f4a7c15ull);
        for (; i + 64 <= len; i += 64)
            h = _mm512_mullo_epi64(_mm512_rol_epi64(_mm512_xor_si512(h, _mm512_loadu_si512(q + i)), 31), mul);
        uint64_t lanes[8], r = (uint64_t)c;
        _mm512_storeu_si512(lanes, h);
        for (int j = 0; j < 8; j++) r = fold64(r, lanes[j]);
        for (; i < len; i += 8) { /* the last bytes, 8 at a time, zero-padded */
            uint64_t x = 0;
            memcpy(&x, q + i, len - i < 8 ? (size_t)(len - i) : 8);
            r = fold64(r, x);
        }
        part[c] = r;
    }
    for (int64_t c = 0; c < chunks; c++) out = fold64(out, part[c]);
    free(part);
    return out ? out : 1;
}
