/*
 * fastlogits_sample.h: seeded sampling (counter-based random numbers, Gumbel-max and the top-k, top-p,
 * min-p filters). Included by fastlogits.h; never include it directly. (It includes itself twice more,
 * with FLS_T = float and FLS_T = double, for the per-compute-type row drivers.)
 *
 * Random numbers. Philox-4x32-10 (Salmon et al. 2011; integer only, so the GPU port reproduces the same
 * words), keyed by the 64-bit seed (k0 = low half, k1 = high half). Token t of sample s of row `row` uses
 * the counter
 *     c0 = 16 * (t / 64) + t % 16,  c1 = s,  c2 = row % 2^32,  c3 = 2 * (row / 2^32) + stream
 * and output word (t / 16) % 4: one Philox call serves four tokens (t, t + 16, t + 32, t + 48), and 16
 * calls for the counters of one 64-token block run in vector lanes. stream 0 gives the high 32 bits of the
 * token's uniform, stream 1 (computed only for candidates) the next 20:
 *     u = (2 * (hi * 2^20 + (lo >> 12)) + 1) / 2^53     in (0, 1), exactly representable,
 *     g = -log(-log(u))                                 in float64 (the Gumbel noise of the token).
 * `row` is the row's index in the batch for a scalar seed, and 0 for per-row seeds (so a row's tokens do
 * not depend on the batch it sits in).
 *
 * Sampling. token = argmax over surviving tokens of x + g (x the logit after softcap and temperature, in
 * the compute type: float32, or float64 for float64 input), the lowest index on ties. This is an exact
 * draw from softmax(x) restricted to the survivors (Gumbel-max). The keys are the exact sums x + g
 * (fl_key: the rounded sum and its rounding error), so the noise counts at any |x|: a key rounded to one
 * double would drown it past |x| of about 1e14, and near-equal huge logits would draw the lowest index
 * (a float32 row masked with its most negative finite value, token 0 every time). Streaming: for every
 * token the high word gives a conservative bound g < -log(1 - u) < -log(a), a = (2^32 - 1 - hi) / 2^32;
 * a token can only win if a <= exp(x - best) (evaluated in the compute type with a margin, best rounded
 * down), and only those candidates get their exact float64 noise. The bound is tight where it matters
 * (u near 1), so a row of 128k tokens has a few dozen candidates. The chosen token is exactly the argmax
 * of x + g: results never depend on chunk size or thread count.
 *
 * Filters (Hugging Face's warper order: temperature, top-k, top-p, min-p, then renormalise):
 *   top-k: one pass keeping a heap of the k best and the tokens tied with the k-th value (all kept, as
 *          HF does); top-p and min-p then work on those candidates only, and the Gumbel-max too;
 *   top-p without top-k: a logsumexp pass (the max); a pass histogramming the probability mass over 1024
 *          value buckets between t0 = max + log(1 - top_p) - log(V) and the max (tokens below t0 hold less
 *          than 1 - top_p of the mass together, so the nucleus lies above t0), in token order whatever the
 *          chunk, which finds the bucket where the cumulative mass from the top reaches top_p of the
 *          histogram's total; a pass collecting that bucket's tokens, among which
 *          a three-way quickselect on mass finds the nucleus' threshold value tau (no sort); then a
 *          Gumbel-max pass restricted to x > tau and, of the tokens tied at tau, the last ones the
 *          nucleus needs, as HF's stable sort keeps them (fl__topp_drop; the first kept, the cut, is
 *          found among the bucket's tokens). A prefix mass within a few rounding errors (16 eps of the
 *          compute type) of top_p counts as reaching it;
 *   min-p: keep x >= x_max + log(min_p) (the same as p >= min_p * p_max, before or after renormalising),
 *          the sum exact (fl__minp_bound); a logsumexp (max) pass, then the Gumbel-max pass restricted to
 *          the survivors.
 *
 * Public entry points: fl_philox4x32_10 (Random123's function), fl_rng_make / fl_rng_word /
 * fl_rng_gumbel (the noise of one token, as the sampler computes it), and fl_row_sample_{f32,f64} (one row
 * of any dtype and stride, see fl_row; parameters in fl_sample_params, per-thread scratch in
 * fl_sample_scratch; a chunk longer than the row counts as the row's length). A row without top-k can
 * also be drawn in parts: fl_row_sample_setup_{f32,f64} once, then fl_row_gumbel_{f32,f64} over column
 * ranges (on several threads), the ranges' best keys (fl_key) merged (the lower index on ties), and
 * fl_row_rank_mass / fl_sample_logprob for the log-probabilities (fastlogits/cpu/_sample.pyx does so).
 * Define FL_COUNT_EXACT to a statement before including fastlogits.h to count the exact noise
 * evaluations (instrumentation).
 */
#ifndef FLS_T
#ifndef FL_COUNT_EXACT
#define FL_COUNT_EXACT ((void)0)
#endif
#ifndef FASTLOGITS_H
#error "fastlogits_sample.h is included by fastlogits.h only"
#endif

/* ------------------------------------------------------------------------------------------------ */
/* Philox-4x32-10                                                                                   */
/* ------------------------------------------------------------------------------------------------ */

#define FL_PHILOX_M0 0xD2511F53u
#define FL_PHILOX_M1 0xCD9E8D57u
#define FL_PHILOX_W0 0x9E3779B9u
#define FL_PHILOX_W1 0xBB67AE85u

/* The largest Gumbel noise a 52-bit uniform can give: -log(-log(1 - 2^-53)) = 36.7368... */
#define FL_GUMBEL_MAX 36.75

/* Philox-4x32-10 of counter c (in place) under key (k0, k1): Random123's philox4x32_10. */
static inline void fl_philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
    uint32_t c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
    int i;
    for (i = 0; i < 10; i++) {
        uint64_t p0 = (uint64_t)FL_PHILOX_M0 * c0;
        uint64_t p1 = (uint64_t)FL_PHILOX_M1 * c2;
        c0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        c1 = (uint32_t)p1;
        c2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c3 = (uint32_t)p0;
        k0 += FL_PHILOX_W0;
        k1 += FL_PHILOX_W1;
    }
    c[0] = c0; c[1] = c1; c[2] = c2; c[3] = c3;
}

/* The random stream of one (seed, row, sample): the key and the counter words c1, c2, c3 (stream 0). */
typedef struct fl_rng {
    uint32_t k0, k1, c1, c2, c3;
} fl_rng;

static inline fl_rng fl_rng_make(uint64_t seed, uint64_t row, uint32_t sample) {
    fl_rng g;
    g.k0 = (uint32_t)seed;
    g.k1 = (uint32_t)(seed >> 32);
    g.c1 = sample;
    g.c2 = (uint32_t)row;
    g.c3 = (uint32_t)((row >> 32) << 1);
    return g;
}

/* The 32-bit word of token t in stream 0 (high bits) or 1 (low bits). */
static inline uint32_t fl_rng_word(const fl_rng *g, int64_t t, uint32_t stream) {
    uint64_t u = (uint64_t)t;
    uint32_t c[4];
    c[0] = (uint32_t)(((u >> 6) << 4) | (u & 15u));
    c[1] = g->c1;
    c[2] = g->c2;
    c[3] = g->c3 | stream;
    fl_philox4x32_10(c, g->k0, g->k1);
    return c[(u >> 4) & 3u];
}

/* Gumbel noise from the token's two words, in float64 (see the top of the file). */
static inline double fl_gumbel_from_words(uint32_t hi, uint32_t lo) {
    uint64_t k = ((uint64_t)hi << 20) | (uint64_t)(lo >> 12);
    double u = (double)(2 * k + 1) * 1.1102230246251565404236316680908203125e-16;   /* 2^-53 */
    return -log(-log(u));
}

/* The Gumbel noise of token t. */
static inline double fl_rng_gumbel(const fl_rng *g, int64_t t) {
    return fl_gumbel_from_words(fl_rng_word(g, t, 0), fl_rng_word(g, t, 1));
}

/* A Gumbel-max key: the exact sum x + g of a token's value and its noise, held unevaluated as hi + lo
 * (hi the rounded sum, lo its rounding error: Knuth's TwoSum, exact in IEEE double). Keys compare by hi,
 * then by lo, which is the order of the exact sums; a key rounded to one double would lose the noise
 * once |x| passes about 1e14 (near-equal huge logits would all draw the lowest index). */
typedef struct fl_key {
    double hi, lo;
} fl_key;

/* The key below every token's: the start of a search. */
static inline fl_key fl_key_none(void) {
    fl_key k;
    k.hi = -FL_INF;
    k.lo = 0.0;
    return k;
}

/* The key of value x and noise g (TwoSum: no rounding is lost, whatever their magnitudes). */
static inline fl_key fl_key_of(double x, double g) {
    fl_key k;
    k.lo = 0.0;
    k.hi = fl__add_exact(x, g, &k.lo);
    return k;
}

/* a's exact sum is larger than b's. */
static inline int fl_key_above(fl_key a, fl_key b) {
    return a.hi > b.hi || (a.hi == b.hi && a.lo > b.lo);
}

static inline int fl_key_equal(fl_key a, fl_key b) {
    return a.hi == b.hi && a.lo == b.lo;
}

/* A double at or below the key's exact sum (hi is the sum rounded to nearest: a negative lo puts the sum
 * between hi's lower neighbour and hi). */
static inline double fl_key_floor(fl_key k) {
    return k.lo < 0.0 ? nextafter(k.hi, -FL_INF) : k.hi;
}

/* The stream-0 words of the 64 tokens of block b (tokens 64 b .. 64 b + 63): w[t - 64 b], from the 16
 * Philox calls of counters ctr0 .. ctr0 + 15 (ctr0 = 16 b) in vector lanes. The lanes are 64 bits wide,
 * the 32-bit state in the low half (the high half holds garbage, masked off before each multiply and at
 * the end). Philox's multiplies are 32 x 32 -> 64 bits, one pmuludq each on x86, which GCC's vectorizer
 * does not find here: it multiplies the 64-bit lanes in full (AVX-512's vpmullq, 3 micro-ops on Intel;
 * with AVX2 shifts and adds; without it scalar code), so x86-64 CPUs take fl__philox_block_avx512, _avx2
 * or _sse2 below, and this portable code serves other CPUs (see fl__philox_block). */
FL_MULTIVERSION static FL_UNUSED void fl__philox_lanes(uint32_t *w, uint32_t ctr0, const fl_rng *g) {
    uint64_t a0[16], a1[16], a2[16], a3[16];
    uint64_t k0 = g->k0, k1 = g->k1;
    const uint64_t lo32 = 0xffffffffu;
    int i, j;
    for (j = 0; j < 16; j++) {
        a0[j] = (uint32_t)(ctr0 + (uint32_t)j); a1[j] = g->c1; a2[j] = g->c2; a3[j] = g->c3;
    }
    for (i = 0; i < 10; i++) {
        FL_LANE_LOOP
        for (j = 0; j < 16; j++) {
            uint64_t p0 = (a0[j] & lo32) * (uint64_t)FL_PHILOX_M0;
            uint64_t p1 = (a2[j] & lo32) * (uint64_t)FL_PHILOX_M1;
            a0[j] = (p1 >> 32) ^ a1[j] ^ k0;
            a2[j] = (p0 >> 32) ^ a3[j] ^ k1;
            a1[j] = p1;
            a3[j] = p0;
        }
        k0 = (uint32_t)(k0 + FL_PHILOX_W0);
        k1 = (uint32_t)(k1 + FL_PHILOX_W1);
    }
    for (j = 0; j < 16; j++) {
        w[j] = (uint32_t)a0[j]; w[16 + j] = (uint32_t)a1[j]; w[32 + j] = (uint32_t)a2[j];
        w[48 + j] = (uint32_t)a3[j];
    }
}

#if FL_X86_INTRINSICS
/* The same words with SSE2 (part of every x86-64): 2 lanes of 64 bits a vector, pmuludq multiplies. */
static FL_UNUSED void fl__philox_block_sse2(uint32_t *w, uint32_t ctr0, const fl_rng *g) {
    __m128i a0[8], a1[8], a2[8], a3[8];
    const __m128i m0 = _mm_set1_epi64x(FL_PHILOX_M0), m1 = _mm_set1_epi64x(FL_PHILOX_M1);
    const __m128i c0 = _mm_set1_epi64x(ctr0);
    uint32_t k0 = g->k0, k1 = g->k1;
    int i, j;
    for (j = 0; j < 8; j++) {     /* low halves ctr0 + 2 j and ctr0 + 2 j + 1 (32-bit adds wrap as uint32) */
        a0[j] = _mm_add_epi32(c0, _mm_set_epi32(0, 2 * j + 1, 0, 2 * j));
        a1[j] = _mm_set1_epi64x(g->c1); a2[j] = _mm_set1_epi64x(g->c2); a3[j] = _mm_set1_epi64x(g->c3);
    }
    for (i = 0; i < 10; i++) {
        const __m128i kk0 = _mm_set1_epi64x(k0), kk1 = _mm_set1_epi64x(k1);
        for (j = 0; j < 8; j++) {
            __m128i p0 = _mm_mul_epu32(a0[j], m0), p1 = _mm_mul_epu32(a2[j], m1);
            a0[j] = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi64(p1, 32), a1[j]), kk0);
            a2[j] = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi64(p0, 32), a3[j]), kk1);
            a1[j] = p1;
            a3[j] = p0;
        }
        k0 += FL_PHILOX_W0;
        k1 += FL_PHILOX_W1;
    }
    for (j = 0; j < 8; j += 2) {          /* the low halves of lanes 2 j .. 2 j + 3, four words a store */
#define FL__LOW_HALVES(a, b) \
    _mm_castps_si128(_mm_shuffle_ps(_mm_castsi128_ps(a), _mm_castsi128_ps(b), _MM_SHUFFLE(2, 0, 2, 0)))
        _mm_storeu_si128((__m128i *)(void *)(w + 2 * j), FL__LOW_HALVES(a0[j], a0[j + 1]));
        _mm_storeu_si128((__m128i *)(void *)(w + 16 + 2 * j), FL__LOW_HALVES(a1[j], a1[j + 1]));
        _mm_storeu_si128((__m128i *)(void *)(w + 32 + 2 * j), FL__LOW_HALVES(a2[j], a2[j + 1]));
        _mm_storeu_si128((__m128i *)(void *)(w + 48 + 2 * j), FL__LOW_HALVES(a3[j], a3[j + 1]));
#undef FL__LOW_HALVES
    }
}
#endif

#if FL_X86_INTRINSICS && (FL_HAVE_MULTIVERSION || defined(__AVX2__))
/* The same words with AVX2: 4 lanes of 64 bits a vector, vpmuludq multiplies. */
FL_TARGET_AVX2 static FL_UNUSED void fl__philox_block_avx2(uint32_t *w, uint32_t ctr0, const fl_rng *g) {
    __m256i a0[4], a1[4], a2[4], a3[4];
    const __m256i m0 = _mm256_set1_epi64x(FL_PHILOX_M0), m1 = _mm256_set1_epi64x(FL_PHILOX_M1);
    const __m256i c0 = _mm256_set1_epi64x(ctr0), low = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    uint32_t k0 = g->k0, k1 = g->k1;
    int i, j;
    for (j = 0; j < 4; j++) {     /* low halves ctr0 + 4 j .. ctr0 + 4 j + 3 */
        a0[j] = _mm256_add_epi32(c0, _mm256_setr_epi32(4 * j, 0, 4 * j + 1, 0, 4 * j + 2, 0, 4 * j + 3, 0));
        a1[j] = _mm256_set1_epi64x(g->c1); a2[j] = _mm256_set1_epi64x(g->c2);
        a3[j] = _mm256_set1_epi64x(g->c3);
    }
    for (i = 0; i < 10; i++) {
        const __m256i kk0 = _mm256_set1_epi64x(k0), kk1 = _mm256_set1_epi64x(k1);
        for (j = 0; j < 4; j++) {
            __m256i p0 = _mm256_mul_epu32(a0[j], m0), p1 = _mm256_mul_epu32(a2[j], m1);
            a0[j] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), a1[j]), kk0);
            a2[j] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), a3[j]), kk1);
            a1[j] = p1;
            a3[j] = p0;
        }
        k0 += FL_PHILOX_W0;
        k1 += FL_PHILOX_W1;
    }
    for (j = 0; j < 4; j++) {             /* the low halves of lanes 4 j .. 4 j + 3 */
        _mm_storeu_si128((__m128i *)(void *)(w + 4 * j),
                         _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(a0[j], low)));
        _mm_storeu_si128((__m128i *)(void *)(w + 16 + 4 * j),
                         _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(a1[j], low)));
        _mm_storeu_si128((__m128i *)(void *)(w + 32 + 4 * j),
                         _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(a2[j], low)));
        _mm_storeu_si128((__m128i *)(void *)(w + 48 + 4 * j),
                         _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(a3[j], low)));
    }
}
#endif

#if FL_X86_INTRINSICS && (FL_HAVE_MULTIVERSION || defined(__AVX512F__))
#if defined(__cplusplus) && defined(__GNUC__) && !defined(__clang__)
/* GCC 12.2's avx512fintrin.h sets a variable from itself, which C++ -Wall calls uninitialized (GCC PR
 * 105593, fixed in 12.3) */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
/* The same words with AVX-512F: 8 lanes of 64 bits a vector, vpmuludq multiplies. */
FL_TARGET_AVX512F static FL_UNUSED void fl__philox_block_avx512(uint32_t *w, uint32_t ctr0, const fl_rng *g) {
    __m512i a0[2], a1[2], a2[2], a3[2];
    const __m512i m0 = _mm512_set1_epi64(FL_PHILOX_M0), m1 = _mm512_set1_epi64(FL_PHILOX_M1);
    const __m512i c0 = _mm512_set1_epi64(ctr0);
    uint32_t k0 = g->k0, k1 = g->k1;
    int i, j;
    for (j = 0; j < 2; j++) {     /* low halves ctr0 + 8 j .. ctr0 + 8 j + 7 */
        a0[j] = _mm512_add_epi32(c0, _mm512_setr_epi64(8 * j, 8 * j + 1, 8 * j + 2, 8 * j + 3, 8 * j + 4,
                                                       8 * j + 5, 8 * j + 6, 8 * j + 7));
        a1[j] = _mm512_set1_epi64(g->c1); a2[j] = _mm512_set1_epi64(g->c2); a3[j] = _mm512_set1_epi64(g->c3);
    }
    for (i = 0; i < 10; i++) {
        const __m512i kk0 = _mm512_set1_epi64(k0), kk1 = _mm512_set1_epi64(k1);
        for (j = 0; j < 2; j++) {
            __m512i p0 = _mm512_mul_epu32(a0[j], m0), p1 = _mm512_mul_epu32(a2[j], m1);
            a0[j] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), a1[j]), kk0);
            a2[j] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), a3[j]), kk1);
            a1[j] = p1;
            a3[j] = p0;
        }
        k0 += FL_PHILOX_W0;
        k1 += FL_PHILOX_W1;
    }
    for (j = 0; j < 2; j++) {             /* the low halves of lanes 8 j .. 8 j + 7 (vpmovqd) */
        _mm256_storeu_si256((__m256i *)(void *)(w + 8 * j), _mm512_cvtepi64_epi32(a0[j]));
        _mm256_storeu_si256((__m256i *)(void *)(w + 16 + 8 * j), _mm512_cvtepi64_epi32(a1[j]));
        _mm256_storeu_si256((__m256i *)(void *)(w + 32 + 8 * j), _mm512_cvtepi64_epi32(a2[j]));
        _mm256_storeu_si256((__m256i *)(void *)(w + 48 + 8 * j), _mm512_cvtepi64_epi32(a3[j]));
    }
}
#if defined(__cplusplus) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

/* The words of block b as above, by the fastest code for this CPU. fl__philox_lanes' 64-bit multiplies
 * cost, in ns a token on an AMD EPYC with AVX2 (GCC 12 -O3): 9.9 compiled for x86-64 and 2.9 for
 * x86-64-v3, against 1.6 for the SSE2 intrinsics and 1.1 for the AVX2 ones, the same words; on an Intel
 * Xeon with AVX-512, 0.90 for its x86-64-v4 clone (vpmullq) against 0.72 for the AVX2 intrinsics and 0.33
 * for the AVX-512F ones (a disassembly audit; float32 sample of (16, 128256) 34% faster). */
static inline void fl__philox_block(uint32_t *w, uint32_t ctr0, const fl_rng *g) {
#if FL_X86_INTRINSICS && FL_HAVE_MULTIVERSION
    if (__builtin_cpu_supports("avx512f")) fl__philox_block_avx512(w, ctr0, g);
    else if (__builtin_cpu_supports("avx2")) fl__philox_block_avx2(w, ctr0, g);
    else fl__philox_block_sse2(w, ctr0, g);
#elif FL_X86_INTRINSICS && defined(__AVX512F__)
    fl__philox_block_avx512(w, ctr0, g);
#elif FL_X86_INTRINSICS && defined(__AVX2__)
    fl__philox_block_avx2(w, ctr0, g);
#elif FL_X86_INTRINSICS
    fl__philox_block_sse2(w, ctr0, g);
#else
    fl__philox_lanes(w, ctr0, g);
#endif
}

/* ------------------------------------------------------------------------------------------------ */
/* Parameters, scratch, results                                                                     */
/* ------------------------------------------------------------------------------------------------ */

/* Row statuses. */
enum { FL_SAMPLE_OK = 0, FL_SAMPLE_NAN = 1, FL_SAMPLE_POSINF = 2, FL_SAMPLE_EMPTY = 3 };

typedef struct fl_sample_params {
    uint64_t seed;
    uint64_t row_id;     /* the row's index for a scalar seed, 0 for per-row seeds */
    int64_t top_k;       /* 0 (or >= n): no top-k */
    double top_p;        /* 1: no top-p */
    double min_p;        /* 0: no min-p */
    int64_t num_samples; /* draws with replacement; sample index s is in the counter */
    int greedy;          /* temperature 0: argmax (lowest index on ties) */
} fl_sample_params;

/* Scratch memory for one thread. buf: chunk values of the compute type (8 * chunk bytes); hv, hi: the
 * top-k heap (top_k values of 8 bytes and top_k indices); cv, ci: candidate values and indices (n each),
 * tmp: 2 n doubles of work space (all three needed when top-k or top-p is used). */
typedef struct fl_sample_scratch {
    void *buf;
    void *hv;
    int64_t *hi;
    double *cv;
    int64_t *ci;
    double *tmp;
} fl_sample_scratch;

/* What the draws of a row without top-k need, computed once by fl_row_sample_setup_{f32,f64}; the draws
 * (fl_row_gumbel) and the log-probabilities (fl_row_rank_mass) can then run over column ranges, on
 * several threads, their results merged: the best key (the lower index on ties), sums of counts and
 * masses. */
typedef struct fl_sample_prep {
    fl_lse_state st;   /* the row's logsumexp state, when need_lse */
    double theta;      /* survivors: the tokens with x > theta (-inf: all), and those with x == theta */
    int64_t cut;       /* from token cut on (0: all; top-p keeps the last of its boundary ties) */
    int need_lse;      /* the logsumexp pass was made (and checked the row for NaN and +inf) */
} fl_sample_prep;

/* w[i] = exp(v[i] - shift), vectorized (fl__exp: within 2 ulp). */
FL_MULTIVERSION static FL_UNUSED void fl__exp_shift(const double *v, double *w, int64_t n, double shift) {
    for (int64_t i = 0; i < n; i++) w[i] = fl__exp(v[i] - shift);
}

/* Of T tokens tied at the nucleus' boundary value, each of mass q, with the mass `above` (< p) of the
 * tokens above them: how many Hugging Face's TopPLogitsWarper drops. It sorts the tokens ascending (a
 * stable sort: tied tokens in token order), and drops those whose cumulative mass from the bottom is at
 * most 1 - p, that is those that leave a mass of at least p above them: of the tied tokens it keeps the
 * last (highest) ones, as many as the mass above needs to reach p, the smallest nucleus. (The same
 * closed form in every sampler: the streamed one, fastlogits/stream/wide.py, and the GPU's.) */
static inline int64_t fl__topp_drop(int64_t T, double q, double above, double p) {
    double need = ceil((p - above) / q);      /* the tied tokens c = 0, 1, ... kept: above + c q < p */
    int64_t kept = need < (double)T ? (need > 1.0 ? (int64_t)need : 1) : T;     /* (q = 0: all) */
    return T - kept;
}

/* The smallest value tau among v[0:n) such that the mass strictly above it, the sum of w_i (the
 * tokens' masses: probabilities in any common scale, p in the same) over v_i > tau, is below p (so every
 * value > tau is kept, and of the tokens equal to tau the last ones, all but *drop: the nucleus of top-p,
 * fl__topp_drop), `above` being the mass of the tokens above all of v (0 for the whole distribution;
 * below p). The mass of all of v must reach p. Three-way quickselect on mass: expected O(n); v and w are
 * reordered together. */
static inline double fl__topp_threshold(double *v, double *w, int64_t n, double p, double above,
                                        int64_t *drop) {
    int64_t lo = 0, hi = n;
    while (hi > lo) {
        double a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi - 1], pv, mg = 0.0, me = 0.0;
        int64_t lt = lo, i = lo, gt = hi;
        pv = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        while (i < gt) {                     /* [lo, lt) > pv, [lt, i) == pv, [gt, hi) < pv */
            double x = v[i], y = w[i];
            if (x > pv) { v[i] = v[lt]; w[i] = w[lt]; v[lt] = x; w[lt] = y; lt++; i++; }
            else if (x < pv) { gt--; v[i] = v[gt]; w[i] = w[gt]; v[gt] = x; w[gt] = y; }
            else i++;
        }
        for (i = lo; i < lt; i++) mg += w[i];
        if (lt > lo && above + mg >= p) { hi = lt; continue; }   /* tau is above the pivot */
        for (i = lt; i < gt; i++) me += w[i];
        if (above + mg + me >= p || gt == hi) {
            *drop = fl__topp_drop(gt - lt, w[lt], above + mg, p);      /* (tied values: equal masses) */
            return pv;
        }
        above += mg + me;
        lo = gt;
    }
    *drop = 0;
    return v[lo < n ? lo : n - 1];         /* not reached while the invariants hold */
}

/* The top-p threshold of candidates v[0:n) (max m) with masses w[0:n) (both reordered): first a
 * histogram of the mass over 256 value buckets between the smallest candidate and m (branch-free), which
 * finds the one bucket where the cumulative mass reaches p; then the quickselect on that bucket only. */
static inline double fl__topp_bucketed(double *v, double *w, int64_t n, double m, double p, int64_t *drop) {
    double mass[257], vmin = m, scale, above = 0.0;
    int64_t i, nb = 0;
    int b, hit = 256;
    for (i = 0; i < n; i++) vmin = v[i] < vmin ? v[i] : vmin;
    scale = 255.999 / (m - vmin);
    /* (a span that overflows, 1e308 to -1e308, gives a scale of 0, a subnormal span one of inf: either
     * would make a NaN bucket index) */
    if (n < 512 || !(m - vmin > 0.0) || vmin == -FL_INF || !(scale > 0.0 && scale < FL_INF))
        return fl__topp_threshold(v, w, n, p, 0.0, drop);
    for (b = 0; b < 257; b++) mass[b] = 0.0;
    for (i = 0; i < n; i++) mass[(int)((m - v[i]) * scale)] += w[i];
    for (b = 0; b < 256; b++) {
        if (above + mass[b] >= p) { hit = b; break; }
        above += mass[b];
    }
    if (hit == 256) return fl__topp_threshold(v, w, n, p, 0.0, drop);  /* rounding: never reached p */
    for (i = 0; i < n; i++) {
        if ((int)((m - v[i]) * scale) == hit) {
            double tv = v[i], tw = w[i];
            v[i] = v[nb]; w[i] = w[nb]; v[nb] = tv; w[nb] = tw; nb++;
        }
    }
    /* the bucket's largest value has the mass `above` above it (< p): the quickselect's invariant */
    return fl__topp_threshold(v, w, nb, p, above, drop);
}

/* min-p's threshold: the smallest double at or above the exact sum m + log(min_p) (TwoSum's error says which
 * way it rounded), so that x survives where x - m >= log(min_p). The sum rounded to nearest could land an
 * ulp below it where |m| is huge: float64 logits near 2^52 and min_p = 0.5 kept the tokens one below the max,
 * whose p / p_max is 1 / e. */
static inline double fl__minp_bound(double m, double min_p) {
    double err = 0.0, t = fl__add_exact(m, log(min_p), &err);
    return err > 0.0 ? nextafter(t, FL_INF) : t;
}

/* Min-p over top-p's threshold *theta, whose boundary ties *cut leaves out (a count of them, or the token
 * they are kept from; 0: none): min-p's where it is the larger, and then no tie is left out. Every
 * sampler's, and the wide rows' (through _sample). */
static inline void fl__with_min_p(double *theta, int64_t *cut, double m, double min_p) {
    if (min_p > 0.0) {
        double t = fl__minp_bound(m, min_p);
        if (t > *theta) { *theta = t; *cut = 0; }
    }
}

/* Top-p's goal for masses summed in a type of machine epsilon eps: a mass within 16 eps of top_p reaches it
 * (the sums' rounding), but the goal is never below top_p / 2; 1 (no top-p) stays 1. Every sampler's, the
 * GPU's and the wide rows' (through _sample). */
static inline double fl__topp_goal(double top_p, double eps) {
    double p = top_p - 16.0 * eps;
    return top_p >= 1.0 ? 1.0 : p > 0.5 * top_p ? p : 0.5 * top_p;
}

/* The threshold of the filters top_p (p < 1) and min_p (> 0) over candidate values cv[0:n) (the whole
 * distribution, or what top-k left), whose max is m and sum of exp(cv - m) is sum; tmp: 2 n doubles of
 * scratch. Tokens with value > the result survive, and of those equal to it all but the first *drop
 * (top-p's boundary ties, fl__topp_drop; 0 where min-p's threshold is the larger). eps: the machine
 * epsilon of the type the masses were summed in (fl__topp_goal). The masses are exp(cv - m) against
 * p * sum, not exp(cv - lse) against p: the max is exact, the logsumexp rounded (by ulp(lse) / 2, far more
 * than top-p's slack where |lse| is large: at a low temperature, say). */
static inline double fl__filter_threshold(const double *cv, int64_t n, double m, double sum, double top_p,
                                          double min_p, double eps, double *tmp, int64_t *drop) {
    double theta = -FL_INF;
    *drop = 0;
    if (top_p < 1.0) {
        memcpy(tmp, cv, (size_t)n * sizeof(double));
        fl__exp_shift(cv, tmp + n, n, m);
        theta = fl__topp_bucketed(tmp, tmp + n, n, m, fl__topp_goal(top_p, eps) * sum, drop);
    }
    fl__with_min_p(&theta, drop, m, min_p);
    return theta;
}

/* Whether a candidate (value v, token i) survives the filters' threshold theta and cut (fl_sample_prep). */
static inline int fl__survives(double v, int64_t i, double theta, int64_t cut) {
    return v > theta || (v == theta && i >= cut);
}

static FL_UNUSED int fl__cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The (j + 1)-th smallest token ci[i] among the candidates whose value cv[i] is v (j < their number);
 * tmp: n int64 of scratch. */
static inline int64_t fl__nth_index(const double *cv, const int64_t *ci, int64_t n, double v, int64_t j,
                                    int64_t *tmp) {
    int64_t i, nt = 0;
    for (i = 0; i < n; i++)
        if (cv[i] == v) tmp[nt++] = ci[i];
    qsort(tmp, (size_t)nt, sizeof(int64_t), fl__cmp_i64);
    return tmp[j];
}

/* Instantiate the row drivers for float and double. */
#define FLS_T float
#define FLS_SUF f32
#define FLS_EXP fl__expf
#define FLS_NEXTAFTER nextafterf
#define FLS_EPS 1.1920928955078125e-07
#include "fastlogits_sample.h"
#undef FLS_T
#undef FLS_SUF
#undef FLS_EXP
#undef FLS_NEXTAFTER
#undef FLS_EPS

#define FLS_T double
#define FLS_SUF f64
#define FLS_EXP fl__exp
#define FLS_NEXTAFTER nextafter
#define FLS_EPS 2.220446049250313e-16
#include "fastlogits_sample.h"
#undef FLS_T
#undef FLS_SUF
#undef FLS_EXP
#undef FLS_NEXTAFTER
#undef FLS_EPS

#else /* FLS_T: the per-compute-type part */

#define FLS_CAT2_(a, b) a##_##b
#define FLS_CAT2(a, b) FLS_CAT2_(a, b)
#define FLS_FN(name) FLS_CAT2(name, FLS_SUF)
#define FLS_SCAN (FL_SCAN_BYTES / (int64_t)sizeof(FLS_T))    /* fl__scan_above's block */

/* best rounded down to the compute type (for the conservative float test). */
FL_INLINE FLS_T FLS_FN(fl__round_down)(double best) {
    FLS_T b = (FLS_T)best;
    if ((double)b > best) b = FLS_NEXTAFTER(b, -(FLS_T)INFINITY);
    return b;
}

/* The smallest value of the compute type that is >= theta. */
FL_INLINE FLS_T FLS_FN(fl__round_up)(double theta) {
    FLS_T t = (FLS_T)theta;
    if ((double)t < theta) t = FLS_NEXTAFTER(t, (FLS_T)INFINITY);
    return t;
}

/* A value of the compute type at or below the best key's exact sum (for the conservative float test). */
FL_INLINE FLS_T FLS_FN(fl__best_floor)(fl_key best) {
    return FLS_FN(fl__round_down)(fl_key_floor(best));
}

/* The conservative test of one token: can x + g beat best (bl = best rounded down)? w: its high word.
 * Tokens below theta are out, whatever their word: a word of 2^32 - 1 or 2^32 - 2 gives a = 0, which
 * passes a <= e even where e = 0. exp(x - bl) gets a margin of 0.2% (it covers the exp's and the
 * subtraction's rounding and the word's conversion). */
FL_INLINE int FLS_FN(fl__may_win)(FLS_T x, uint32_t w, FLS_T bl, FLS_T theta) {
    FLS_T e = FLS_EXP(x - bl) * (FLS_T)1.002;
    FLS_T a = (FLS_T)(int32_t)((~w) >> 1) * (FLS_T)4.656612873077392578125e-10;
    return (a <= e) & (x >= theta);
}

/* The words of the 64-token block starting at token 64 * (ctr0 / 16), and the tokens x[0:64) of it that
 * may win (flags); returns how many may. */
FL_MULTIVERSION static FL_UNUSED int FLS_FN(fl__gumbel_block)(const FLS_T *x, uint32_t *w, uint32_t ctr0,
                                                              const fl_rng *g, FLS_T bl, FLS_T theta,
                                                              unsigned char *flags) {
    int j, cnt = 0;
    fl__philox_block(w, ctr0, g);
    for (j = 0; j < 64; j++) {
        FLS_T v = x[j];
        FLS_T e = FLS_EXP(v - bl) * (FLS_T)1.002;
        FLS_T a = (FLS_T)(int32_t)((~w[j]) >> 1) * (FLS_T)4.656612873077392578125e-10;
        int f = (a <= e) & (v >= theta);                 /* (as fl__may_win) */
        flags[j] = (unsigned char)f;
        cnt += f;
    }
    return cnt;
}

/* The exact key of token t (value x, high word hi) against the best so far; tokens come in increasing
 * order, so a tie keeps the earlier (lower) index. */
FL_INLINE void FLS_FN(fl__gumbel_exact)(FLS_T x, uint32_t hi, int64_t t, const fl_rng *g, fl_key *best,
                                        int64_t *best_i) {
    fl_key key = fl_key_of((double)x, fl_gumbel_from_words(hi, fl_rng_word(g, t, 1)));
    FL_COUNT_EXACT;
    if (fl_key_above(key, *best)) { *best = key; *best_i = t; }
}

/* Gumbel-max over columns [c0, c0 + len), whose transformed values are x[0:len), restricted to x >=
 * theta: updates (*best, *best_i). w: 64 words, flags: 64 bytes of scratch. */
static inline void FLS_FN(fl__gumbel_chunk)(const FLS_T *x, int64_t c0, int64_t len, FLS_T theta,
                                            const fl_rng *g, fl_key *best, int64_t *best_i, uint32_t *w,
                                            unsigned char *flags) {
    int64_t t = c0, end = c0 + len;
    while (t < end) {
        int64_t b0 = t - (t & 63), bend = b0 + 64 < end ? b0 + 64 : end, j;
        uint32_t ctr0 = (uint32_t)((uint64_t)b0 >> 2);
        FLS_T bl = FLS_FN(fl__best_floor)(*best);
        if (t == b0 && bend == b0 + 64) {
            if (FLS_FN(fl__gumbel_block)(x + (t - c0), w, ctr0, g, bl, theta, flags)) {
                for (j = 0; j < 64; j++) {
                    FLS_T v = x[t - c0 + j];
                    /* recheck against the best found meanwhile in this block (the first block of a row) */
                    if (flags[j] && FLS_FN(fl__may_win)(v, w[j], FLS_FN(fl__best_floor)(*best),
                                                        theta))
                        FLS_FN(fl__gumbel_exact)(v, w[j], b0 + j, g, best, best_i);
                }
            }
        } else {                                   /* a block cut by the chunk's ends */
            fl__philox_block(w, ctr0, g);
            for (j = t - b0; j < bend - b0; j++) {
                FLS_T v = x[b0 + j - c0];
                if (FLS_FN(fl__may_win)(v, w[j], FLS_FN(fl__best_floor)(*best), theta))
                    FLS_FN(fl__gumbel_exact)(v, w[j], b0 + j, g, best, best_i);
            }
        }
        t = bend;
    }
}

/* Greedy: the index of the largest transformed value (lowest on ties; softcap applies, temperature does
 * not matter). Status NaN for a row holding a NaN, EMPTY for a row of all -inf. */
static inline int FLS_FN(fl__greedy)(const fl_row *r, int64_t chunk, FLS_T *buf, int64_t *out) {
    fl_row rr = *r;
    int64_t i;
    FLS_T v;
    rr.temperature = 1.0;
    i = FLS_FN(fl_row_argmax)(&rr, chunk, buf);
    v = FLS_FN(fl_row_value)(&rr, i);
    if (v != v) return FL_SAMPLE_NAN;
    if (v == -(FLS_T)INFINITY) return FL_SAMPLE_EMPTY;
    *out = i;
    return FL_SAMPLE_OK;
}

/* One pass keeping the k best values (heap hv/hi, root the worst) and the tokens tied with the root
 * (ties[0:*nt), the root's value); -inf ties are not kept (impossible tokens). Status NaN (a NaN
 * anywhere in the row, even after a +inf, as the other paths) or POSINF. */
static inline int FLS_FN(fl__topk_pass)(const fl_row *r, int64_t k, int64_t chunk, FLS_T *buf, FLS_T *hv,
                                        int64_t *hi, int64_t *ties, int64_t *nt_out) {
    int64_t size = 0, nt = 0, c0, i;
    int has_nan, posinf = 0;
    for (c0 = 0; c0 < r->n; c0 += chunk) {
        int64_t len = r->n - c0 < chunk ? r->n - c0 : chunk;
        const FLS_T *x = FLS_FN(fl_row_chunk)(r, c0, len, buf);
        FLS_T m = FLS_FN(fl__max)(x, len, &has_nan);
        if (has_nan) return FL_SAMPLE_NAN;
        if (m == (FLS_T)INFINITY) posinf = 1;
        if (posinf) continue;             /* a bad row: only a NaN could change its status now */
        if (size == k && m < hv[0]) continue;
        i = 0;
        for (; i < len && size < k; i++) FLS_FN(fl__heap_push)(hv, hi, &size, x[i], c0 + i);
        /* then only values at or above the root matter (above it when it is -inf: -inf ties are not
         * kept): blocks without one are skipped in vector code */
        while (i < len) {
            int64_t end;
            i += FLS_FN(fl__scan_above)(x + i, len - i, hv[0], hv[0] > -(FLS_T)INFINITY);
            end = len - i < FLS_SCAN ? len : i + FLS_SCAN;
            for (; i < end; i++) {
                FLS_T v = x[i];
                if (v > hv[0]) {
                    FLS_T ev = hv[0];
                    int64_t ei = hi[0];
                    hv[0] = v; hi[0] = c0 + i;
                    FLS_FN(fl__sift_down)(hv, hi, k, 0);
                    if (hv[0] == ev && ev > -(FLS_T)INFINITY) ties[nt++] = ei;
                    else nt = 0;
                } else if (v == hv[0] && v > -(FLS_T)INFINITY) {
                    ties[nt++] = c0 + i;
                }
            }
        }
    }
    *nt_out = nt;
    return posinf ? FL_SAMPLE_POSINF : FL_SAMPLE_OK;
}

/* Top-p over a whole row: the bucket of each token of x[0:n) (token c0 + i of the row), (m - x) * scale for
 * x >= t0, clamped to [0, FL_TOPP_BUCKETS], and below t0 one of 8 buckets after that, by its token (so that
 * the histogram's adds form no long store-to-load chains); and its mass exp(x - m) (m the row's max: its
 * probability times the row's sum of exp(x - m)). The clamp from below is for a value above
 * m or a NaN, which the row read by the logsumexp pass cannot hold, but the caller's array, read again
 * here, can, when another thread writes it during the call: the result may change then, but the index
 * stays in the table (a value of 1e30 gave INT_MIN and a crash). */
#ifndef FL_TOPP_BUCKETS
#define FL_TOPP_BUCKETS 1024
#endif
FL_INLINE int32_t FLS_FN(fl__topp_bucket)(FLS_T v, FLS_T m, FLS_T scale) {
    FLS_T q = (m - v) * scale;
    q = q < (FLS_T)FL_TOPP_BUCKETS ? q : (FLS_T)FL_TOPP_BUCKETS;
    return (int32_t)(q > (FLS_T)0 ? q : (FLS_T)0);
}

FL_MULTIVERSION static FL_UNUSED void FLS_FN(fl__topp_weights)(const FLS_T *x, int64_t n, int64_t c0,
                                                                FLS_T m, FLS_T scale, FLS_T t0, int32_t *bi,
                                                                FLS_T *w) {
    for (int64_t i = 0; i < n; i++) {
        FLS_T v = x[i];
        int32_t b = FLS_FN(fl__topp_bucket)(v, m, scale);
        bi[i] = v >= t0 ? b : FL_TOPP_BUCKETS + 1 + (int32_t)(((c0 + i) >> 2) & 7);
        w[i] = FLS_EXP(v - m);
    }
}

/* Pass 2 of top-p: flags[i] = 1 for the tokens of x[0:n) whose bucket (fl__topp_bucket, as pass 1's)
 * lies in [lo_b, lo_b + span]; returns how many. No exp. */
FL_MULTIVERSION static FL_UNUSED int64_t FLS_FN(fl__topp_flags)(const FLS_T *x, int64_t n, FLS_T m,
                                                                FLS_T scale, FLS_T t0, int32_t lo_b,
                                                                uint32_t span, unsigned char *flags) {
    int64_t cnt = 0;
    for (int64_t i = 0; i < n; i++) {
        FLS_T v = x[i];
        int32_t b = FLS_FN(fl__topp_bucket)(v, m, scale);
        int f = (v >= t0) & ((uint32_t)(b - lo_b) <= span);
        flags[i] = (unsigned char)f;
        cnt += f;
    }
    return cnt;
}

/* The number of values of a row equal to v. */
static inline int64_t FLS_FN(fl__count_equal)(const fl_row *r, int64_t chunk, FLS_T *buf, FLS_T v) {
    int64_t c0, i, cnt = 0;
    for (c0 = 0; c0 < r->n; c0 += chunk) {
        int64_t len = r->n - c0 < chunk ? r->n - c0 : chunk;
        const FLS_T *x = FLS_FN(fl_row_chunk)(r, c0, len, buf);
        for (i = 0; i < len; i++) cnt += x[i] == v;
    }
    return cnt;
}

/* The token of the (j + 1)-th value of a row equal to v (j < their number), counting from token 0. */
static inline int64_t FLS_FN(fl__nth_equal)(const fl_row *r, int64_t chunk, FLS_T *buf, FLS_T v, int64_t j) {
    int64_t c0, i;
    for (c0 = 0; c0 < r->n; c0 += chunk) {
        int64_t len = r->n - c0 < chunk ? r->n - c0 : chunk, cnt = 0;
        const FLS_T *x = FLS_FN(fl_row_chunk)(r, c0, len, buf);
        for (i = 0; i < len; i++) cnt += x[i] == v;
        if (cnt <= j) { j -= cnt; continue; }
        for (i = 0; i < len; i++)
            if (x[i] == v && j-- == 0) return c0 + i;
    }
    return 0;                                      /* not reached */
}

/* The top-p threshold tau of a whole row (max m, sum s of exp(x - m); p already lowered by the tolerance),
 * in two passes and no sort: only tokens above t0 = m + log(1 - p) - log(V) can be in the nucleus (those
 * below hold less than 1 - p of the mass, as s >= 1); pass 1 histograms the mass of those over
 * FL_TOPP_BUCKETS value buckets between t0 and m, and the rest's in 8 more, which finds the bucket where
 * the cumulative mass (from the top) reaches p of the whole; pass 2 collects that bucket's tokens (in token
 * order), and a quickselect on mass among them gives tau, and the cut (fl_sample_prep) among them too: the
 * tokens tied at tau all lie in that bucket. Masses are exp(x - m), against p times their own sum (see
 * fl__filter_threshold).
 * The tokens drawn do not depend on the chunk size: each mass is added to the table of its token (token
 * mod 4) in token order, and t0 and the goal come from m and those tables alone, where the chunk's place
 * and the logsumexp's rounding (s, folded chunk by chunk) decided a mass within rounding of the goal
 * (an invariance audit: 24 of 600 rows built near it drew other tokens at chunks of 1024 and 4096). */
static inline double FLS_FN(fl__topp_row)(const fl_row *r, int64_t chunk, fl_sample_scratch *sc, double m,
                                          double s, double p, int64_t *cut) {
    double mass[4][FL_TOPP_BUCKETS + 9], above = 0.0, total = 0.0;
    double t0d = m + ((log1p(-p) - log((double)r->n)) - 1e-3);     /* one rounding at |m| */
    double goal;
    FLS_T *buf = (FLS_T *)sc->buf, t0, scale, mt = (FLS_T)m;
    int32_t *bi = (int32_t *)(void *)sc->tmp;
    unsigned char *flags = (unsigned char *)(void *)sc->tmp;      /* pass 2: in place of bi */
    FLS_T *w;
    double tau, *cv, *cw;
    int64_t c0, i, nc = 0, drop;
    int b, hit = -1;
    int32_t lo_b;
    uint32_t span;
    if (chunk > r->n) chunk = r->n;   /* tmp holds 2 n doubles: chunk bucket numbers, then chunk weights */
    w = (FLS_T *)(void *)(sc->tmp + (chunk + 1) / 2);
    *cut = 0;
    t0 = FLS_FN(fl__round_down)(t0d);
    /* |m| so large that m + (t0d - m) rounds to m: the next value down holds every token that can be in
     * the nucleus but m's; where there is none (m the lowest finite value), all are tied at m (s counts
     * them, exactly) */
    if (!(t0 < mt)) t0 = FLS_NEXTAFTER(mt, -(FLS_T)INFINITY);
    if (t0 == -(FLS_T)INFINITY) {
        drop = fl__topp_drop(FLS_FN(fl__count_equal)(r, chunk, buf, mt), 1.0, 0.0, p * s);
        if (drop > 0) *cut = FLS_FN(fl__nth_equal)(r, chunk, buf, mt, drop);
        return m;
    }
    scale = (FLS_T)((FL_TOPP_BUCKETS - 0.01) / (m - (double)t0));
    if (!(scale < (FLS_T)INFINITY)) return m;     /* not reached: m - t0 is at least 1e-3 or an ulp */
    memset(mass, 0, sizeof(mass));
    for (c0 = 0; c0 < r->n; c0 += chunk) {
        int64_t len = r->n - c0 < chunk ? r->n - c0 : chunk;
        const FLS_T *x = FLS_FN(fl_row_chunk)(r, c0, len, buf);
        /* four tables (no store-to-load chains), token t's the (t mod 4)-th */
        double *m0 = mass[c0 & 3], *m1 = mass[(c0 + 1) & 3], *m2 = mass[(c0 + 2) & 3],
               *m3 = mass[(c0 + 3) & 3];
        FLS_FN(fl__topp_weights)(x, len, c0, mt, scale, t0, bi, w);
        for (i = 0; i + 4 <= len; i += 4) {
            m0[bi[i]] += (double)w[i];
            m1[bi[i + 1]] += (double)w[i + 1];
            m2[bi[i + 2]] += (double)w[i + 2];
            m3[bi[i + 3]] += (double)w[i + 3];
        }
        for (; i < len; i++) mass[(c0 + i) & 3][bi[i]] += (double)w[i];
    }
    for (b = 0; b < FL_TOPP_BUCKETS + 9; b++) total += mass[0][b] + mass[1][b] + mass[2][b] + mass[3][b];
    goal = p * total;
    for (b = 0; b <= FL_TOPP_BUCKETS; b++) {
        double mb = mass[0][b] + mass[1][b] + mass[2][b] + mass[3][b];
        if (above + mb >= goal) { hit = b; break; }
        above += mb;
    }
    if (hit < 0) {                                 /* rounding kept the mass below p: all the row */
        lo_b = 0;
        span = FL_TOPP_BUCKETS;
        above = 0.0;
    } else {
        lo_b = hit;
        span = 0;
    }
    for (c0 = 0; c0 < r->n; c0 += chunk) {
        int64_t len = r->n - c0 < chunk ? r->n - c0 : chunk;
        const FLS_T *x = FLS_FN(fl_row_chunk)(r, c0, len, buf);
        if (!FLS_FN(fl__topp_flags)(x, len, mt, scale, t0, lo_b, span, flags)) continue;
        memset(flags + len, 0, 8);                /* the last group's tail (tmp holds 16 n bytes) */
        for (i = 0; i < len; i += 8) {            /* eight flags at a time: most are all clear */
            int64_t j;
            uint64_t f8;
            memcpy(&f8, flags + i, 8);
            if (!f8) continue;
            for (j = i; j < i + 8; j++) {
                if (flags[j]) {
                    sc->cv[nc] = (double)x[j];
                    sc->ci[nc] = c0 + j;
                    nc++;
                }
            }
        }
    }
    if (nc == 0) return m;                         /* not reached */
    cv = sc->tmp;                                  /* the quickselect reorders copies: tmp is free now */
    cw = sc->tmp + nc;
    memcpy(cv, sc->cv, (size_t)nc * sizeof(double));
    for (i = 0; i < nc; i++) cw[i] = exp(cv[i] - m);
    tau = fl__topp_threshold(cv, cw, nc, goal, above, &drop);
    if (drop > 0)                                  /* the first tie kept: the (drop + 1)-th */
        for (i = 0; i < nc; i++)
            if (sc->cv[i] == tau && drop-- == 0) { *cut = sc->ci[i]; break; }
    return tau;
}

/* The number of x[0:n) above xt (added to *rank), and the sum of exp(x - m) over x >= theta (m >= every
 * x). Fixed-width lanes, flushed to double every 16 vectors, as fl__sumexp. */
FL_MULTIVERSION static FL_UNUSED double FLS_FN(fl__rank_mass)(const FLS_T *x, int64_t n, FLS_T xt,
                                                              FLS_T theta, FLS_T m, int64_t *rank) {
    double tot = 0.0;
    int64_t cnt = 0, i = 0;
    FLS_T acc[16];
    int32_t c[16];
    int j;
    while (i + 16 <= n) {
        int64_t stop = i + 256 < n ? i + 256 : n;
        for (j = 0; j < 16; j++) { acc[j] = 0; c[j] = 0; }
        for (; i + 16 <= stop; i += 16) {
            FL_LANE_LOOP
            for (j = 0; j < 16; j++) {
                FLS_T v = x[i + j];
                FLS_T e = FLS_EXP(v - m);      /* the select after the exp keeps the loop vectorized */
                c[j] += v > xt;
                acc[j] += v >= theta ? e : (FLS_T)0;
            }
        }
        for (j = 0; j < 16; j++) { tot += acc[j]; cnt += c[j]; }
    }
    for (; i < n; i++) {
        cnt += x[i] > xt;
        tot += x[i] >= theta ? (double)FLS_EXP(x[i] - m) : 0.0;
    }
    *rank += cnt;
    return tot;
}

/* The next part of columns [a, c1) of a row set up in *pp (theta_t: its threshold in the compute type):
 * its length, at most chunk, ending at the cut, and in *th the threshold of its survivors: x > theta
 * before the cut (the next value up), x >= theta from it on. */
FL_INLINE int64_t FLS_FN(fl__part)(const fl_sample_prep *pp, int64_t a, int64_t c1, int64_t chunk,
                                   FLS_T theta_t, FLS_T *th) {
    int64_t len = c1 - a < chunk ? c1 - a : chunk;
    if (a < pp->cut && a + len > pp->cut) len = pp->cut - a;
    *th = a < pp->cut ? FLS_NEXTAFTER(theta_t, (FLS_T)INFINITY) : theta_t;
    return len;
}

/* The setup of a row without top-k (top_k 0 or >= n; not greedy) into *pp: the logsumexp pass when a
 * filter or the log-probabilities (want_lp) need it, and the filters' threshold and cut. Status OK, NAN,
 * POSINF or EMPTY (found by the logsumexp pass; without it, by the draws). */
static inline int FLS_FN(fl_row_sample_setup)(const fl_row *r, const fl_sample_params *p, int want_lp,
                                              int64_t chunk, fl_sample_scratch *sc, fl_sample_prep *pp) {
    pp->need_lse = p->top_p < 1.0 || p->min_p > 0.0 || want_lp;
    pp->st.m = 0.0;
    pp->st.s = 0.0;
    pp->theta = -FL_INF;
    pp->cut = 0;
    if (pp->need_lse) {
        pp->st = FLS_FN(fl_row_lse)(r, 0, r->n, chunk, (FLS_T *)sc->buf);
        if (pp->st.m != pp->st.m) return FL_SAMPLE_NAN;
        if (pp->st.m == FL_INF) return FL_SAMPLE_POSINF;
        if (pp->st.m == -FL_INF) return FL_SAMPLE_EMPTY;
    }
    if (p->top_p < 1.0)
        pp->theta = FLS_FN(fl__topp_row)(r, chunk, sc, pp->st.m, pp->st.s, fl__topp_goal(p->top_p, FLS_EPS),
                                         &pp->cut);
    fl__with_min_p(&pp->theta, &pp->cut, pp->st.m, p->min_p);
    return FL_SAMPLE_OK;
}

/* The Gumbel-max of sample s over columns [c0, c1) of a row set up in *pp: updates (*best, *best_i)
 * (start them at fl_key_none() and -1; a range's tokens come in increasing order, so ties keep the lower
 * index; ranges merge by fl_key_above, the lower index on equal keys).
 * Without a logsumexp pass the chunks are checked here: NAN if the range holds a NaN, else POSINF if it
 * holds a +inf, else OK. buf: chunk values of scratch. */
static inline int FLS_FN(fl_row_gumbel)(const fl_row *r, const fl_sample_params *p, const fl_sample_prep *pp,
                                        uint32_t s, int64_t c0, int64_t c1, int64_t chunk, FLS_T *buf,
                                        fl_key *best, int64_t *best_i) {
    fl_rng g = fl_rng_make(p->seed, p->row_id, s);
    FLS_T theta_t = pp->theta == -FL_INF ? -(FLS_T)INFINITY : FLS_FN(fl__round_up)(pp->theta), th;
    uint32_t w[64];
    unsigned char flags[64];
    int has_nan, posinf = 0;
    int64_t a, len;
    for (a = c0; a < c1; a += len) {
        const FLS_T *x;
        FLS_T cm;
        len = FLS_FN(fl__part)(pp, a, c1, chunk, theta_t, &th);
        x = FLS_FN(fl_row_chunk)(r, a, len, buf);
        cm = FLS_FN(fl__max)(x, len, &has_nan);
        if (!pp->need_lse) {
            if (has_nan) return FL_SAMPLE_NAN;
            if (cm == (FLS_T)INFINITY) posinf = 1;
            if (posinf) continue;             /* a bad row: only a NaN could change its status now */
        }
        if (cm < th || (double)cm + FL_GUMBEL_MAX < fl_key_floor(*best)) continue;
        FLS_FN(fl__gumbel_chunk)(x, a, len, th, &g, best, best_i, w, flags);
    }
    return posinf ? FL_SAMPLE_POSINF : FL_SAMPLE_OK;
}

/* For the log-probability and rank of token t, over columns [c0, c1) of a row set up in *pp (with the
 * logsumexp pass): adds to *rank the number of tokens with a larger value than t's, and returns the sum
 * of exp(x - max) over the survivors. */
static inline double FLS_FN(fl_row_rank_mass)(const fl_row *r, const fl_sample_prep *pp, int64_t t,
                                              int64_t c0, int64_t c1, int64_t chunk, FLS_T *buf,
                                              int64_t *rank) {
    FLS_T xt = FLS_FN(fl_row_value)(r, t);
    FLS_T theta_t = pp->theta == -FL_INF ? -(FLS_T)INFINITY : FLS_FN(fl__round_up)(pp->theta), th;
    double ssum = 0.0;
    int64_t a, len;
    for (a = c0; a < c1; a += len) {
        len = FLS_FN(fl__part)(pp, a, c1, chunk, theta_t, &th);
        ssum += FLS_FN(fl__rank_mass)(FLS_FN(fl_row_chunk)(r, a, len, buf), len, xt, th, (FLS_T)pp->st.m,
                                      rank);
    }
    return ssum;
}

/* Token t's log-probability under the filtered, renormalised distribution, from the survivors' sum
 * of exp(x - max) (fl_row_rank_mass over the whole row): (x - m) - log(sum), as log-softmax forms it
 * (x - (m + log(sum)) loses log(sum) in m's rounding once |m| passes about 1e14). */
static inline double FLS_FN(fl_sample_logprob)(const fl_row *r, const fl_sample_prep *pp, int64_t t,
                                               double ssum) {
    double ls = fl__log(pp->theta > -FL_INF ? ssum : pp->st.s);
    return ((double)FLS_FN(fl_row_value)(r, t) - pp->st.m) - ls;
}

/* Draws p->num_samples tokens from row r (see the top of the file) into tokens[s]; when logprobs is not
 * NULL, also the token's log-probability under the filtered, renormalised distribution, and in ranks[s]
 * how many of the row's tokens have a larger (transformed) logit. Returns a status: OK, or NAN (a NaN in
 * the row), POSINF (a +inf logit at a positive temperature), EMPTY (no possible token: all -inf or an
 * empty row); nothing is written then. */
static inline int FLS_FN(fl_row_sample)(const fl_row *r, const fl_sample_params *p, int64_t chunk,
                                        fl_sample_scratch *sc, int64_t *tokens, double *logprobs,
                                        int64_t *ranks) {
    int64_t n = r->n, k = p->top_k, s, i, nc;
    FLS_T *buf = (FLS_T *)sc->buf;
    if (n <= 0) return FL_SAMPLE_EMPTY;
    if (p->greedy) {
        int64_t t = 0;
        int st = FLS_FN(fl__greedy)(r, chunk, buf, &t);
        if (st != FL_SAMPLE_OK) return st;
        for (s = 0; s < p->num_samples; s++) {
            tokens[s] = t;
            if (logprobs) { logprobs[s] = 0.0; ranks[s] = 0; }
        }
        return FL_SAMPLE_OK;
    }
    if (k >= n) k = 0;
    if (k > 0) {
        /* top-k: candidates are the heap and the ties; everything else happens on them */
        FLS_T *hv = (FLS_T *)sc->hv;
        int64_t nt = 0, drop, cut = 0;
        double m, sum = 0.0, theta, log_s, ssum = 0.0;
        int st = FLS_FN(fl__topk_pass)(r, k, chunk, buf, hv, sc->hi, sc->ci + k, &nt);
        if (st != FL_SAMPLE_OK) return st;
        m = -FL_INF;
        for (i = 0; i < k; i++) { sc->cv[i] = (double)hv[i]; sc->ci[i] = sc->hi[i]; }
        for (i = 0; i < nt; i++) sc->cv[k + i] = (double)hv[0];
        nc = k + nt;
        for (i = 0; i < nc; i++) m = sc->cv[i] > m ? sc->cv[i] : m;
        if (m == -FL_INF) return FL_SAMPLE_EMPTY;
        for (i = 0; i < nc; i++) sum += exp(sc->cv[i] - m);
        theta = fl__filter_threshold(sc->cv, nc, m, sum, p->top_p, p->min_p, FLS_EPS, sc->tmp, &drop);
        if (drop > 0) cut = fl__nth_index(sc->cv, sc->ci, nc, theta, drop, (int64_t *)(void *)sc->tmp);
        for (i = 0; i < nc; i++)
            if (fl__survives(sc->cv[i], sc->ci[i], theta, cut)) ssum += exp(sc->cv[i] - m);
        log_s = fl__log(ssum);
        for (s = 0; s < p->num_samples; s++) {
            fl_rng g = fl_rng_make(p->seed, p->row_id, (uint32_t)s);
            fl_key best = fl_key_none();
            int64_t bi = -1, bj = -1;
            for (i = 0; i < nc; i++) {
                fl_key key;
                if (!fl__survives(sc->cv[i], sc->ci[i], theta, cut) || sc->cv[i] == -FL_INF) continue;
                key = fl_key_of(sc->cv[i], fl_rng_gumbel(&g, sc->ci[i]));
                if (fl_key_above(key, best) || (fl_key_equal(key, best) && sc->ci[i] < bi)) {
                    best = key;
                    bi = sc->ci[i];
                    bj = i;
                }
            }
            tokens[s] = bi;
            if (logprobs) {
                int64_t rank = 0;
                for (i = 0; i < nc; i++) rank += sc->cv[i] > sc->cv[bj];
                logprobs[s] = (sc->cv[bj] - m) - log_s;       /* as fl_sample_logprob */
                ranks[s] = rank;
            }
        }
        return FL_SAMPLE_OK;
    } else {
        fl_sample_prep pp;
        int st = FLS_FN(fl_row_sample_setup)(r, p, logprobs != NULL, chunk, sc, &pp);
        if (st != FL_SAMPLE_OK) return st;
        for (s = 0; s < p->num_samples; s++) {
            fl_key best = fl_key_none();
            double ssum;
            int64_t bi = -1, rank = 0;
            st = FLS_FN(fl_row_gumbel)(r, p, &pp, (uint32_t)s, 0, n, chunk, buf, &best, &bi);
            if (st != FL_SAMPLE_OK) return st;
            if (bi < 0) return FL_SAMPLE_EMPTY;
            tokens[s] = bi;
            if (!logprobs) continue;
            ssum = FLS_FN(fl_row_rank_mass)(r, &pp, bi, 0, n, chunk, buf, &rank);
            logprobs[s] = FLS_FN(fl_sample_logprob)(r, &pp, bi, ssum);
            ranks[s] = rank;
        }
        return FL_SAMPLE_OK;
    }
}

#undef FLS_FN
#undef FLS_SCAN
#undef FLS_CAT2
#undef FLS_CAT2_

#endif /* FLS_T */
