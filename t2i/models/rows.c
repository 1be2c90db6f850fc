/* A linear layer for a few rows (a decode step): y[m, n] = sum_k x[m, k] w[n, k] + bias[n] (+ res[m, n]).

   The weight is packed once (t2i/models/rows.py) into panels of NV * 16 output columns, each panel
   [K][NV * 16] (bfloat16: [K / 2][NV * 16][2], pairs along k), zero-padded, so a thread reads its share of the
   weight as one contiguous stream. Each step of k multiplies the panel's NV vectors with every row's x[m, k]
   broadcast from memory (outer products into MR x NV accumulators: no horizontal sums, x costs a few bytes
   per step), so at 8 rows the weight streams at close to the speed of memory where a dot-product kernel
   would read four times its bytes of x from cache. float32: AVX-512 FMA; bfloat16: AVX512-BF16 dot products
   (pairs of products summed in float32), each output rounded to bfloat16 once. Threads split the panels
   (OpenMP: the runtime torch loaded). Every pointer is contiguous. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define MR 8
#define NV 3
#define PANEL (NV * 16)

static inline __attribute__((always_inline)) void panel_f32(const float *x, const float *wp, const float *bias,
                                                           const float *res, float *y, int mr, int64_t K,
                                                           int64_t N, int64_t n0) {
    __m512 acc[MR][NV];
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NV; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const float *w = wp + k * PANEL;
        _mm_prefetch((const char *)(w + 8 * PANEL), _MM_HINT_T0);
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
        __mmask16 t = N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
        __m512 b = bias ? _mm512_maskz_loadu_ps(t, bias + n) : _mm512_setzero_ps();
        for (int m = 0; m < mr; m++) {
            __m512 v = _mm512_add_ps(acc[m][j], b);
            if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(t, res + m * N + n));
            _mm512_mask_storeu_ps(y + m * N + n, t, v);
        }
    }
}

/* y [M, N] = x [M, K] w^T (+ bias [N]) (+ res [M, N]); wp: the packed weight; bias / res may be NULL */
void rows_f32(const float *x, const float *wp, const float *bias, const float *res, float *y, int64_t M,
              int64_t K, int64_t N, int threads) {
    int64_t panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const float *w = wp + p * K * PANEL;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            int mr = M - m0 < MR ? (int)(M - m0) : MR;
            const float *r = res ? res + m0 * N : NULL;
            if (mr == MR) panel_f32(x + m0 * K, w, bias, r, y + m0 * N, MR, K, N, p * PANEL);
            else panel_f32(x + m0 * K, w, bias, r, y + m0 * N, mr, K, N, p * PANEL);
        }
    }
}

#ifdef __AVX512BF16__
static inline __m512 bf16x16_to_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* K2: K / 2 rounded up; x rows have K bf16 (an odd K's last pair is read with a zero) */
static inline __attribute__((always_inline)) void panel_bf16(const uint16_t *x, const uint16_t *wp,
                                                            const uint16_t *bias, const uint16_t *res, uint16_t *y,
                                                            int mr, int64_t K, int64_t N, int64_t n0) {
    __m512 acc[MR][NV];
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NV; j++) acc[m][j] = _mm512_setzero_ps();
    int64_t pairs = K / 2;
    for (int64_t k2 = 0; k2 < pairs; k2++) {
        const uint16_t *w = wp + k2 * PANEL * 2;
        _mm_prefetch((const char *)(w + 8 * PANEL * 2), _MM_HINT_T0);
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
        __mmask16 t = N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
        __m512 b = bias ? bf16x16_to_f32(_mm256_maskz_loadu_epi16(t, bias + n)) : _mm512_setzero_ps();
        for (int m = 0; m < mr; m++) {
            __m512 v = _mm512_add_ps(acc[m][j], b);
            if (res) v = _mm512_add_ps(v, bf16x16_to_f32(_mm256_maskz_loadu_epi16(t, res + m * N + n)));
            _mm256_mask_storeu_epi16(y + m * N + n, t, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

void rows_bf16(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, const uint16_t *res, uint16_t *y,
               int64_t M, int64_t K, int64_t N, int threads) {
    int64_t panels = (N + PANEL - 1) / PANEL, K2 = (K + 1) / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const uint16_t *w = wp + p * K2 * PANEL * 2;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            int mr = M - m0 < MR ? (int)(M - m0) : MR;
            const uint16_t *r = res ? res + m0 * N : NULL;
            if (mr == MR) panel_bf16(x + m0 * K, w, bias, r, y + m0 * N, MR, K, N, p * PANEL);
            else panel_bf16(x + m0 * K, w, bias, r, y + m0 * N, mr, K, N, p * PANEL);
        }
    }
}
#endif
