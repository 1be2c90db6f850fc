/* The sampler's kernels (loaded by t2i/models/rows.py with rows.c): draw_f32, one draw per row from
   probabilities p [R, V] (float32, contiguous), the very draw torch.multinomial(p, 1, generator=g) makes on the
   CPU, and g left in the state torch leaves it in (rows.py checks the two agree before it uses this);
   topk_mask_f32, top-k's filter (further down).

   torch draws the sample as argmax(p / q) over one exponential variate q per element, in memory order:
   q = (float)(-log1p(-u)) in double, u = the low 53 bits of two 32-bit outputs of the generator's mt19937
   (the first the high word) times 2^-53. Its cost is one scalar log1p per element (16,384 codes a row);
   here the stream is made 16 words at a time, blocks of 8 elements whose p are all zero are skipped (their
   p / q is 0 and cannot win; 0 / 0 needs both words of u zero, which is checked), and the others take a
   vectorised log whose float32 result is used only where the double's error bound cannot straddle a
   float32 rounding boundary, else glibc's log1p, as torch: the same q bit for bit.

   state: the bytes of torch.Generator.get_state() (int32 left at 8, uint64 next at 16, uint64 words at 24,
   mt19937's state[624] one per word), read and updated in place. */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MT_N 624
#define MT_M 397
#define MT_SPLIT (MT_N - MT_M) /* 227 */

static inline uint32_t twist1(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

static inline __m512i twist16(__m512i u, __m512i v) {
    __m512i y = _mm512_or_si512(_mm512_and_si512(u, _mm512_set1_epi32((int)0x80000000u)),
                                _mm512_and_si512(v, _mm512_set1_epi32(0x7fffffff)));
    __mmask16 odd = _mm512_test_epi32_mask(v, _mm512_set1_epi32(1));
    return _mm512_mask_xor_epi32(_mm512_srli_epi32(y, 1), odd, _mm512_srli_epi32(y, 1),
                                 _mm512_set1_epi32((int)0x9908b0dfu));
}

/* dst = the mt19937 state after src (out of place): dst[i] = src[i + M] ^ twist(src[i], src[i + 1]) for
   i < N - M, dst[i - (N - M)] in place of src[i + M] after that (already made), dst[0] as src[N] */
static void regen(const uint32_t *src, uint32_t *dst) {
    int i = 0;
    for (; i + 16 <= MT_SPLIT; i += 16)
        _mm512_storeu_si512(dst + i, _mm512_xor_si512(_mm512_loadu_si512(src + i + MT_M),
                            twist16(_mm512_loadu_si512(src + i), _mm512_loadu_si512(src + i + 1))));
    for (; i < MT_SPLIT; i++) dst[i] = src[i + MT_M] ^ twist1(src[i], src[i + 1]);
    for (; i + 16 <= MT_N - 1; i += 16)
        _mm512_storeu_si512(dst + i, _mm512_xor_si512(_mm512_loadu_si512(dst + i - MT_SPLIT),
                            twist16(_mm512_loadu_si512(src + i), _mm512_loadu_si512(src + i + 1))));
    for (; i < MT_N - 1; i++) dst[i] = dst[i - MT_SPLIT] ^ twist1(src[i], src[i + 1]);
    dst[MT_N - 1] = dst[MT_M - 1] ^ twist1(src[MT_N - 1], dst[0]);
}

static inline uint32_t temper1(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

static inline __m512i temper16(__m512i y) {
    y = _mm512_xor_si512(y, _mm512_srli_epi32(y, 11));
    y = _mm512_xor_si512(y, _mm512_and_si512(_mm512_slli_epi32(y, 7), _mm512_set1_epi32((int)0x9d2c5680u)));
    y = _mm512_xor_si512(y, _mm512_and_si512(_mm512_slli_epi32(y, 15), _mm512_set1_epi32((int)0xefc60000u)));
    return _mm512_xor_si512(y, _mm512_srli_epi32(y, 18));
}

/* q of one element from its two raw (untempered) words, as torch computes it */
static inline float q1(uint32_t hi, uint32_t lo) {
    uint64_t bits = (((uint64_t)temper1(hi) << 32) | temper1(lo)) & ((1ull << 53) - 1);
    return (float)(-1.0 * log1p(-((double)bits * 0x1p-53)));
}

/* log of 8 doubles in (0, 1]: x = 2^e m, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1),
   by its series to s^23 (|s| <= 0.1716: the next term is below 2^-60 of the sum); e ln 2 in two parts (the
   first exact). Measured within 1.5 x 2^-52 (relative) of glibc's log1p over 30M values spread over (0, 1], near
   1 and near 0; BOUND is 2^-44, 170 times that. */
static inline __m512d log8(__m512d x) {
    __m512d m = _mm512_getmant_pd(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
    __m512d e = _mm512_getexp_pd(x);
    __mmask8 big = _mm512_cmp_pd_mask(m, _mm512_set1_pd(1.4142135623730951), _CMP_GT_OQ);
    m = _mm512_mask_mul_pd(m, big, m, _mm512_set1_pd(0.5));
    e = _mm512_mask_add_pd(e, big, e, _mm512_set1_pd(1.0));
    __m512d f = _mm512_sub_pd(m, _mm512_set1_pd(1.0));
    __m512d s = _mm512_div_pd(f, _mm512_add_pd(f, _mm512_set1_pd(2.0)));
    __m512d z = _mm512_mul_pd(s, s);
    __m512d p = _mm512_set1_pd(1.0 / 23);
    for (int k = 21; k >= 3; k -= 2) p = _mm512_fmadd_pd(p, z, _mm512_set1_pd(1.0 / k));
    __m512d logm = _mm512_fmadd_pd(_mm512_mul_pd(_mm512_add_pd(s, s), z), p, _mm512_add_pd(s, s));
    __m512d lo = _mm512_fmadd_pd(e, _mm512_set1_pd(1.9082149292705877e-10), logm);
    return _mm512_fmadd_pd(e, _mm512_set1_pd(6.93147180369123816490e-01), lo);
}

#define BOUND 0x1p-44 /* relative error allowed for log8's result */

/* q of 8 elements from 16 raw words (hi, lo, hi, lo, ...) */
static inline __m256 q8(const uint32_t *w) {
    __m512i t = temper16(_mm512_loadu_si512(w));
    __m512i bits = _mm512_and_si512(_mm512_ror_epi64(t, 32), _mm512_set1_epi64((1ll << 53) - 1));
    __m512d u = _mm512_mul_pd(_mm512_cvtepu64_pd(bits), _mm512_set1_pd(0x1p-53));
    __m512d a = _mm512_sub_pd(_mm512_setzero_pd(), log8(_mm512_sub_pd(_mm512_set1_pd(1.0), u)));
    __m256 q = _mm512_cvtpd_ps(a);
    __m256 qlo = _mm512_cvtpd_ps(_mm512_mul_pd(a, _mm512_set1_pd(1.0 - BOUND)));
    __m256 qhi = _mm512_cvtpd_ps(_mm512_mul_pd(a, _mm512_set1_pd(1.0 + BOUND)));
    __mmask8 sure = _mm256_cmp_ps_mask(q, qlo, _CMP_EQ_OQ) & _mm256_cmp_ps_mask(q, qhi, _CMP_EQ_OQ);
    if (sure != 0xff) {
        float out[8];
        _mm256_storeu_ps(out, q);
        for (int j = 0; j < 8; j++)
            if (!((sure >> j) & 1)) out[j] = q1(w[2 * j], w[2 * j + 1]);
        q = _mm256_loadu_ps(out);
    }
    return q;
}

/* torch.set_flush_denormal(True) is on (MXCSR's DAZ / FTZ; torch sets them in the calling thread only, so its
   own result on subnormal values then depends on which thread read which part): such inputs are left to torch */
static inline int flushing(void) { return (_mm_getcsr() & 0x8040) != 0; }
static inline int subnormal(float x) { return x != 0.0f && fabsf(x) < FLT_MIN; }

/* argmax of one row as torch's: the first maximum, a NaN above everything (the first NaN) */
static int64_t draw_row(const float *p, const uint32_t *w, int64_t V) {
    float best = 0.0f;
    int64_t arg = 0, j = 0;
    for (; j + 8 <= V; j += 8) {
        __m256 pv = _mm256_loadu_ps(p + j);
        __mmask8 nz = _mm256_cmp_ps_mask(pv, _mm256_setzero_ps(), _CMP_GT_OQ);
        /* an element whose p is 0 matters only as 0 / 0 (NaN): q = 0 needs u = 0, so its low word is 0 */
        __mmask16 zero = _mm512_testn_epi32_mask(_mm512_loadu_si512(w + 2 * j), _mm512_set1_epi32(-1));
        if (!nz && !(zero & 0xaaaa)) continue;
        __m256 v = _mm256_div_ps(pv, q8(w + 2 * j));
        __mmask8 nan = _mm256_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        if (nan) return j + __builtin_ctz(nan);
        float mx = _mm512_mask_reduce_max_ps(0xff, _mm512_castps256_ps512(v)); /* the upper 8 lanes masked off */
        if (mx > best) {
            best = mx;
            arg = j + __builtin_ctz(_mm256_cmp_ps_mask(v, _mm256_set1_ps(mx), _CMP_EQ_OQ));
        }
    }
    for (; j < V; j++) {
        float v = p[j] / q1(w[2 * j], w[2 * j + 1]);
        if (v != v) return j;
        if (v > best) best = v, arg = j;
    }
    return arg;
}

/* words [0, need): the next `need` raw words of the generator whose get_state() bytes are `state`, which is
   advanced past them (as torch's mt19937 would be after `need` calls); words has room for need + 2 * 624 */
static void stream(uint8_t *state, uint32_t *words, int64_t need) {
    int32_t left;
    uint64_t next;
    uint32_t st[MT_N];
    memcpy(&left, state + 8, 4);
    memcpy(&next, state + 16, 8);
    for (int i = 0; i < MT_N; i++) {
        uint64_t x;
        memcpy(&x, state + 24 + 8 * i, 8);
        st[i] = (uint32_t)x;
    }
    int64_t have = left - 1; /* torch: words st[next .. next + left - 1) remain before it makes the next state */
    if (have > need) have = need;
    memcpy(words, st + next, (size_t)have * 4);
    const uint32_t *prev = st;
    int64_t taken = -1; /* words used of the last state made (-1: none made) */
    while (have < need) {
        regen(prev, words + have);
        prev = words + have;
        taken = need - have < MT_N ? need - have : MT_N;
        have += MT_N;
    }
    if (taken < 0) {
        next += (uint64_t)need;
        left -= (int32_t)need;
    } else {
        memcpy(st, prev, sizeof st);
        next = (uint64_t)taken;
        left = MT_N + 1 - (int32_t)taken;
    }
    memcpy(state + 8, &left, 4);
    memcpy(state + 16, &next, 8);
    for (int i = 0; i < MT_N; i++) {
        uint64_t x = st[i];
        memcpy(state + 24 + 8 * i, &x, 8);
    }
}

/* out [n] = what torch.empty(n).exponential_(generator=g) holds (float32), state advanced as it is */
void exponential_f32(uint8_t *state, uint32_t *words, int64_t n, float *out, int threads) {
    stream(state, words, 2 * n);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n / 8 * 8; j += 8) _mm256_storeu_ps(out + j, q8(words + 2 * j));
    for (int64_t j = n / 8 * 8; j < n; j++) out[j] = q1(words[2 * j], words[2 * j + 1]);
}

/* 0: out [R] holds the draws and state is advanced by 2 R V words; 1: a row has a negative, infinite or NaN
   p, or no positive one (torch.multinomial raises for it), or a subnormal p under flushing: nothing is drawn,
   state unchanged, torch's call.
   words: scratch for at least 2 R V + 2 * 624 uint32. */
int draw_f32(const float *p, int64_t R, int64_t V, uint8_t *state, uint32_t *words, int64_t *out, int threads) {
    int bad = 0, flush = flushing();
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad)
    for (int64_t r = 0; r < R; r++) {
        int any = 0;
        for (int64_t j = 0; j < V; j++) {
            float x = p[r * V + j];
            if (!(x >= 0.0f) || x == INFINITY || (flush && subnormal(x))) bad = 1;
            any |= x > 0.0f;
        }
        if (!any) bad = 1;
    }
    if (bad) return 1;
    stream(state, words, 2 * R * V);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < R; r++) out[r] = draw_row(p + r * V, words + 2 * r * V, V);
    return 0;
}

/* y [R, V] = x with every value below its row's k-th largest set to -inf, as
   x.masked_fill(x < x.topk(k).values[..., -1:], -inf) (the same k-th value: a radix select over the floats'
   order-keeping integer keys, 11 + 11 + 10 bits, where topk sorts). 1: a row holds a NaN (topk ranks NaN
   above everything) or, under torch.set_flush_denormal(True), a subnormal value: left to torch, nothing
   written. */
static inline uint32_t fkey(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u);
}

static inline float unkey(uint32_t k) {
    uint32_t b = (k & 0x80000000u) ? k ^ 0x80000000u : ~k;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* the bin of hist [n] (counts) the k-th from the top falls in; k becomes its rank within that bin */
static inline uint32_t pick_bin(const int32_t *hist, int n, int64_t *k) {
    int b = n - 1;
    for (; b > 0 && hist[b] < *k; b--) *k -= hist[b];
    return (uint32_t)b;
}

static float kth_largest(const float *x, int64_t V, int64_t k, uint32_t *cand) {
    int32_t hist[2048];
    memset(hist, 0, sizeof hist);
    for (int64_t j = 0; j < V; j++) hist[fkey(x[j]) >> 21]++;
    uint32_t b1 = pick_bin(hist, 2048, &k);
    int64_t n = 0;
    memset(hist, 0, sizeof hist);
    for (int64_t j = 0; j < V; j++) {
        uint32_t key = fkey(x[j]);
        if ((key >> 21) == b1) {
            cand[n++] = key;
            hist[(key >> 10) & 0x7ff]++;
        }
    }
    uint32_t b2 = pick_bin(hist, 2048, &k);
    memset(hist, 0, 1024 * sizeof hist[0]);
    for (int64_t j = 0; j < n; j++)
        if (((cand[j] >> 10) & 0x7ff) == b2) hist[cand[j] & 0x3ff]++;
    uint32_t b3 = pick_bin(hist, 1024, &k);
    return unkey((b1 << 21) | (b2 << 10) | b3);
}

int topk_mask_f32(const float *x, float *y, int64_t R, int64_t V, int64_t k, uint32_t *scratch, int threads) {
    int bad = 0, flush = flushing();
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad)
    for (int64_t r = 0; r < R; r++) {
        const float *row = x + r * V;
        __mmask16 refuse = 0; /* a NaN, or a subnormal value under flushing */
        int64_t j = 0;
        for (; j + 16 <= V; j += 16) {
            __m512 v = _mm512_loadu_ps(row + j);
            refuse |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            if (flush) refuse |= _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(FLT_MIN), _CMP_LT_OQ) &
                              _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_OQ);
        }
        for (; j < V; j++) refuse |= row[j] != row[j] || (flush && subnormal(row[j]));
        if (refuse) bad = 1;
    }
    if (bad) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float *row = x + r * V;
        float *out = y + r * V;
        __m512 kth = _mm512_set1_ps(kth_largest(row, V, k, scratch + r * V)), ninf = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < V; j += 16) {
            __mmask16 t = V - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (V - j)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(t, row + j);
            _mm512_mask_storeu_ps(out + j, t, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, kth, _CMP_LT_OQ), v, ninf));
        }
    }
    return 0;
}
