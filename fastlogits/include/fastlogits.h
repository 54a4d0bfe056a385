/*
 * fastlogits.h: the C core of fastlogits. Header-only; C99 and C++11; link with -lm and nothing else.
 *
 * Design. Every operation folds a row of logits into a small per-row state, chunk by chunk, and two states
 * of different column ranges merge associatively (in any order: chunks, threads, machines). The row state
 * of logsumexp is (m, s): m the running max, s = sum exp(x - m). Merging (m1, s1) with (m2, s2) gives
 * (max, s_big + s_small * exp(m_small - m_big)). The true running max is kept (-inf for an empty or
 * all -inf range) and such ranges are skipped explicitly: substituting a shift would lose rows whose first
 * chunks are all -inf.
 *
 * The file is cut in three layers:
 *   1. scalar helpers: 16-bit conversions, the state types and their merge and finalize rules;
 *   2. chunk primitives (fastlogits_impl.h, instantiated for float and double): max, sum of exp, and the
 *      second-pass maps over a chunk that sits in L1. They are plain C loops over fixed-width lanes, which
 *      GCC and Clang vectorize without fast-math flags; on x86-64 Linux with GCC 12 or later they are compiled
 *      three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, baseline; GCC 11: AVX-512F, AVX2, baseline)
 *      and the loader picks one at start-up (target_clones), so the includer's target flags do not matter.
 *      IEEE semantics do: GCC's fast-math, associative-math and finite-math-only options fold exp's
 *      add-and-subtract rounding away (every result is wrong) or drop the NaN and inf checks (the header
 *      warns when the compiler says they are on). Intrinsics serve where the vectorizer falls short, on
 *      x86-64 only (FL_NO_INTRINSICS: none): SSE2 or AVX2 for the sampler's generator (Philox), whose 32 x 32 -> 64-bit
 *      multiplies it misses, and F16C for float16 arrays;
 *   3. the public API (below), and row drivers that read any dtype and stride, apply softcap and
 *      temperature, and fold.
 *
 * Public API (all static inline; include this header, link -lm):
 *   fl_lse_state, fl_lse_init, fl_lse_update_{f32,f64,f16,bf16}, fl_lse_merge, fl_lse_result
 *       the online logsumexp of a row that arrives in pieces (16-bit values as their uint16_t bits);
 *   fl_ce_state, fl_ce_init, fl_ce_update_{f32,f64}, fl_ce_merge, fl_ce_result, fl_cross_entropy_f32
 *       cross-entropy against a class index, as PyTorch's -log_softmax(x)[label] (NaN for a label
 *       outside 0 .. n-1, where PyTorch raises: C has no exception to raise);
 *   fl_ent_state, fl_ent_init, fl_ent_update_{f32,f64,f16,bf16}, fl_ent_merge, fl_ent_result
 *       entropy (nats) of softmax, in pieces as the logsumexp state;
 *   fl_argmax_state, fl_argmax_init, fl_argmax_update_f32, fl_argmax_merge, fl_argmax_f32;
 *   fl_f16_to_f32, fl_f32_to_f16, fl_bf16_to_f32, fl_f32_to_bf16   exact / round-to-nearest-even;
 *   fl_row with fl_row_{lse,entropy,ce,softmax,argmax,topk}_{f32,f64}: one row of any dtype and stride,
 *       with softcap and temperature, folded in chunks (the kernels of the Python package);
 *   fl_simd_path()   "avx512", "avx2" or "baseline": the code path this process runs.
 * Every merge is associative and commutative: states of column ranges folded by different threads or
 * machines combine in any order.
 *
 * Numerics: NaN anywhere makes a state NaN (it never hides behind max); a +inf logit makes logsumexp +inf;
 * an all -inf range has logsumexp -inf. exp() is Cephes' polynomial (float, within 1.5 ulp) or rational
 * approximation (double, within 3 ulp), with correct subnormal results; sums of exp are accumulated in
 * float lanes for at most 16 terms, then in double (an update's chunk sums with their rounding errors
 * kept, TwoSum; fl_lse_merge adds plainly).
 */
#ifndef FASTLOGITS_H
#define FASTLOGITS_H

#define FASTLOGITS_VERSION_MAJOR 0
#define FASTLOGITS_VERSION_MINOR 1

/* C99 or later (declarations in for loops, inline, long long): one clear error, and the rest left out
 * (C89 gave some 400 errors about it) */
#if !defined(__cplusplus) && (!defined(__STDC_VERSION__) || __STDC_VERSION__ < 199901L)
#error "fastlogits.h needs C99 or later (or C++11): compile with -std=c99, -std=c11 or newer"
#else

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* x86-64 intrinsics: SSE2, AVX2 and AVX-512F code for Philox's 32 x 32 -> 64-bit multiplies (see
 * fl__philox_block in fastlogits_sample.h), F16C for float16 arrays (fl_load_f16). Define
 * FL_NO_INTRINSICS before including fastlogits.h for portable C only. */
#if !defined(FL_NO_INTRINSICS) && (defined(__x86_64__) || defined(_M_X64))
#include <immintrin.h>
#define FL_X86_INTRINSICS 1
#else
#define FL_X86_INTRINSICS 0
#endif

/* exp's round-to-integer trick needs floating-point addition as written, and the edge cases need NaN and
 * inf: under GCC's fast-math, associative-math or finite-math-only options every result may be wrong (GCC 11
 * and Clang define no macro for associative math: it goes unannounced there) */
#if defined(__FAST_MATH__) || defined(__ASSOCIATIVE_MATH__) || \
    (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#warning "fastlogits.h needs IEEE arithmetic: under fast-math, associative-math or finite-math-only options its results are wrong"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------------ */
/* Portability                                                                                      */
/* ------------------------------------------------------------------------------------------------ */

#if defined(__GNUC__) || defined(__clang__)
#define FL_INLINE static inline __attribute__((always_inline))
#define FL_UNUSED __attribute__((unused))
#else
#define FL_INLINE static inline
#define FL_UNUSED
#endif

/* Run-time dispatch between AVX-512, AVX2 and baseline code (GCC on x86-64 Linux with glibc's ifunc; not
 * under ThreadSanitizer, which instruments the load-time resolvers and crashed there). Define
 * FL_NO_MULTIVERSION to compile one version with the includer's flags (other GCC builds do too, keeping
 * no-trapping-math: without it their float selects stayed scalar, 2-8x slower).
 * no-trapping-math lets GCC turn `c ? a : b` on floats into vector blends: it only stops the compiler from
 * preserving floating-point exception *flags*; values, NaN and inf included, are unchanged (Clang assumes
 * this by default). Nothing here reads the exception flags. no-associative-math: a -fassociative-math that
 * GCC disabled for the includer's file (it needs no-trapping-math) would otherwise come back inside these
 * functions, with no macro to warn, and break exp's rounding trick (results off by 0.08). */
/* GCC before 12 vectorizes nothing at -O2: these functions ask for it */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 12
#define FL__VECTORIZE , "tree-vectorize"
#else
#define FL__VECTORIZE
#endif
#if !defined(FL_NO_MULTIVERSION) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) \
    && defined(__linux__) && defined(__GLIBC__) && (__GNUC__ >= 11) && !defined(__SANITIZE_THREAD__)
#if __GNUC__ >= 12
/* clones for the ISA levels x86-64-v4 (AVX-512 F, BW, DQ, VL) and x86-64-v3 (AVX2, FMA, F16C) */
#define FL__CLONES "arch=x86-64-v4", "arch=x86-64-v3", "default"
#define FL__CPU_AVX512() __builtin_cpu_supports("x86-64-v4")
#define FL__CPU_AVX2() __builtin_cpu_supports("x86-64-v3")
#define FL__CPU_F16C() __builtin_cpu_supports("x86-64-v3")
#else
/* GCC 11's resolvers know no ISA levels (it refuses arch=x86-64-v4 clones, and arch=haswell ones would be
 * picked on Intel's Haswell alone: __builtin_cpu_is), and a clone takes one feature: AVX-512F and AVX2
 * clones, without FMA. On an AMD EPYC, logsumexp of float32 at 12.5 GB/s a thread, as GCC 12's build,
 * against 3.6 for GCC 11's baseline code at -O3 and 1.0 at -O2. GCC 10 and older: one version. */
#define FL__CLONES "avx512f", "avx2", "default"
#define FL__CPU_AVX512() __builtin_cpu_supports("avx512f")
#define FL__CPU_AVX2() __builtin_cpu_supports("avx2")
#define FL__CPU_F16C() (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
#endif
#define FL_MULTIVERSION __attribute__((target_clones(FL__CLONES), \
                                       optimize("no-trapping-math", "no-associative-math" FL__VECTORIZE)))
#define FL_HAVE_MULTIVERSION 1
#elif defined(__GNUC__) && !defined(__clang__)
#define FL_MULTIVERSION __attribute__((optimize("no-trapping-math", "no-associative-math" FL__VECTORIZE)))
#define FL_HAVE_MULTIVERSION 0
#else
#define FL_MULTIVERSION
#define FL_HAVE_MULTIVERSION 0
#endif
/* The floating-point options of FL_MULTIVERSION for an inline function whose body a multiversioned one
 * takes: without them its float selects were compiled as branches (GCC 12 kept fl__tile_states' exp loops
 * scalar, "control flow in loop"). */
#if defined(__GNUC__) && !defined(__clang__)
#define FL_INLINE_OPT FL_INLINE __attribute__((optimize("no-trapping-math", "no-associative-math" FL__VECTORIZE)))
#else
#define FL_INLINE_OPT FL_INLINE
#endif
/* Functions for AVX2 (and F16C) or AVX-512F CPUs only, which the dispatch calls on them; single-version
 * builds compile them only when their flags allow those instructions. */
#if FL_HAVE_MULTIVERSION
#define FL_TARGET_AVX2 __attribute__((target("avx2")))
#define FL_TARGET_AVX2_F16C __attribute__((target("avx2,f16c")))
#define FL_TARGET_AVX512F __attribute__((target("avx512f")))
#else
#define FL_TARGET_AVX2
#define FL_TARGET_AVX2_F16C
#define FL_TARGET_AVX512F
#endif

/* The inner loops over FL_LANES lanes are what the vectorizer turns into vector instructions; complete
 * unrolling (GCC -O3) would turn them into scalar code first. */
#if defined(__GNUC__) && !defined(__clang__)
#define FL_LANE_LOOP _Pragma("GCC unroll 1")
#else
#define FL_LANE_LOOP
#endif

/* A hint to fetch the cache line at address `addr` (an integer, so that no out-of-bounds pointer exists in
 * C's sense); it never faults, even past the end of an array. */
#if defined(__GNUC__) || defined(__clang__)
#define FL_PREFETCH(addr) __builtin_prefetch((const void *)(uintptr_t)(addr), 0, 3)
#else
#define FL_PREFETCH(addr) ((void)0)
#endif

#define FL_INF ((double)INFINITY)

/* Vocabulary elements folded per step by the fl_lse_update_* functions (16 KB of float: L1-resident). */
#define FL_CHUNK 4096

/* Input element types. */
enum { FL_F16 = 0, FL_BF16 = 1, FL_F32 = 2, FL_F64 = 3 };

/* Which code path the loader chose for this process: "avx512", "avx2" or "baseline". */
static inline const char *fl_simd_path(void) {
#if FL_HAVE_MULTIVERSION
    __builtin_cpu_init();
    if (FL__CPU_AVX512()) return "avx512";
    if (FL__CPU_AVX2()) return "avx2";
    return "baseline";
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
    return "avx512";   /* one version, compiled for the includer's target (FL_NO_MULTIVERSION, Clang) */
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "baseline";
#endif
}

/* ------------------------------------------------------------------------------------------------ */
/* 1. Scalar helpers                                                                                */
/* ------------------------------------------------------------------------------------------------ */

FL_INLINE float fl__f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
FL_INLINE uint32_t fl__bits_from_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
FL_INLINE double fl__f64_from_bits(uint64_t u) { double f; memcpy(&f, &u, 8); return f; }
FL_INLINE uint64_t fl__bits_from_f64(double f) { uint64_t u; memcpy(&u, &f, 8); return u; }

/* IEEE half -> float, exact for every input (subnormals, inf, NaN). Branch-free so loops vectorize:
 * shifting the exponent and mantissa into float position and multiplying by 2^112 rebiases the exponent
 * and normalizes subnormals in one step. A NaN keeps its payload and comes out quiet, as F16C's vcvtph2ps
 * gives it (see fl_load_f16). */
FL_INLINE float fl_f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t em = (uint32_t)h & 0x7fffu;
    float f = fl__f32_from_bits(em << 13) * 5192296858534827628530496329220096.0f;   /* 2^112 */
    uint32_t u = fl__bits_from_f32(f);
    u = em >= 0x7c00u ? (0x7f800000u | (em << 13)) : u;   /* inf, and NaN with its payload */
    u = em > 0x7c00u ? (u | 0x400000u) : u;                /* a NaN quiet */
    return fl__f32_from_bits(u | sign);
}

/* float -> IEEE half, round to nearest even; overflow gives inf, NaN stays NaN (quiet). */
FL_INLINE uint16_t fl_f32_to_f16(float x) {
    uint32_t u = fl__bits_from_f32(x);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    /* normal range: rebias and round on bit 13 */
    uint32_t odd = (a >> 13) & 1u;
    uint32_t nrm = (a + 0xc8000fffu + odd) >> 13;          /* 0xc8000000 = (15 - 127) << 23 */
    /* subnormal range: let the FPU align the mantissa by adding 0.5 */
    uint32_t sub = fl__bits_from_f32(fl__f32_from_bits(a) + 0.5f) - 0x3f000000u;
    uint32_t r = a < 0x38800000u ? sub : nrm;
    r = a >= 0x47800000u ? 0x7c00u : r;                     /* >= 65536: inf */
    r = a > 0x7f800000u ? 0x7e00u : r;                      /* NaN */
    return (uint16_t)(r | sign);
}

FL_INLINE float fl_bf16_to_f32(uint16_t h) { return fl__f32_from_bits((uint32_t)h << 16); }

/* float -> bfloat16, round to nearest even; NaN stays NaN (quiet). */
FL_INLINE uint16_t fl_f32_to_bf16(float x) {
    uint32_t u = fl__bits_from_f32(x);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : r;
    return (uint16_t)r;
}

/* The logsumexp state of a row or of a range of its columns. */
typedef struct fl_lse_state {
    double m; /* running max: -inf when empty, NaN once a NaN was seen */
    double s; /* sum of exp(x - m) */
} fl_lse_state;

/* The entropy state: the logsumexp state and t = sum exp(x - m) * (x - m). */
typedef struct fl_ent_state {
    double m, s, t;
} fl_ent_state;

FL_INLINE int fl__isnan(double x) { return x != x; }

/* log(x), branch-free so that a loop of them vectorizes: the core takes logs of sums of exps (log s), a
 * row each, and libm's log, a call a row, was a quarter of the time of a row of 16 float32 logits.
 * fdlibm's e_log.c without its branches: x = 2^k (1 + f), sqrt(2)/2 <= 1 + f < sqrt(2), and log(1 + f) =
 * f - (f^2/2 - s (f^2/2 + R(s^2))) with s = f / (2 + f) and R fdlibm's polynomial of degree 7 in s^2, for
 * every f (fdlibm switches to another formula for some f; this one is as accurate there). Within 0.75 ulp
 * with FMA, 0.83 without, over 2e7 random normal numbers against long double's logl (glibc's log is
 * correctly rounded but for about 1 in 2^40; this one about 98% of the time). Subnormals are scaled by
 * 2^54 first; 0 gives -inf, +inf itself, a negative number or NaN gives NaN, as log does.
 * fdlibm's notice: Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved. Developed at
 * SunPro, a Sun Microsystems, Inc. business. Permission to use, copy, modify, and distribute this
 * software is freely granted, provided that this notice is preserved. */
FL_INLINE double fl__log_any(double x) {
    double xs = x < 2.2250738585072014e-308 ? x * 18014398509481984.0 : x;       /* DBL_MIN, 2^54 */
    uint64_t u = fl__bits_from_f64(xs);
    uint64_t hx = (u >> 32) + (0x3ff00000u - 0x3fe6a09eu);      /* the exponent of x / (sqrt(2)/2) */
    int64_t k = (int64_t)(hx >> 20) - 0x3ff;
    double f, kd, hfsq, s, z, w, r, y;
    hx = (hx & 0x000fffffu) + 0x3fe6a09eu;                       /* 1 + f in [sqrt(2)/2, sqrt(2)) */
    f = fl__f64_from_bits((hx << 32) | (u & 0xffffffffu)) - 1.0;
    /* k as a double, without a conversion instruction that AVX2 lacks */
    kd = fl__f64_from_bits(0x4338000000000000ull + (uint64_t)k) - 6755399441055744.0;
    kd = x < 2.2250738585072014e-308 ? kd - 54.0 : kd;
    hfsq = 0.5 * f * f;
    s = f / (2.0 + f);
    z = s * s;
    w = z * z;
    r = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01
                                                                         + w * 1.479819860511658591e-01)))
        + w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
    y = kd * 6.93147180369123816490e-01 - ((hfsq - (s * (hfsq + r) + kd * 1.90821492927058770002e-10)) - f);
    y = x == 0 ? -FL_INF : y;
    y = x == FL_INF ? FL_INF : y;
    return x < 0 || x != x ? NAN : y;
}

/* fl__log_any in a loop, y[i] = log(x[i]) (y may be x), and for one value: the log of every sum the
 * package takes, the same bits from either (the same clone of the same code; tests/test_short_rows.py
 * checks), so that a row's log-softmax, logsumexp and cross-entropy agree however they were reached. */
FL_MULTIVERSION static FL_UNUSED void fl__log_n(const double *x, double *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = fl__log_any(x[i]);
}

FL_MULTIVERSION static FL_UNUSED double fl__log(double x) { return fl__log_any(x); }

static inline void fl_lse_init(fl_lse_state *st) { st->m = -FL_INF; st->s = 0.0; }

/* a + b rounded to nearest, its rounding error added to *err (Knuth's TwoSum: exact in IEEE double for
 * finite a and b, whatever their magnitudes): the running sums that keep their errors, min-p's bound and
 * the sampler's keys. Inlined everywhere, the multiversioned kernels' lane loops included: called there,
 * its SSE code after their AVX-512 code made float32 softmax of (16, 128256) 8x slower than PyTorch's on
 * an Intel Xeon (48.6 against 6.4 ms, one thread). */
FL_INLINE_OPT double fl__add_exact(double a, double b, double *err) {
    double s = a + b, ar = s - b;
    *err += (a - ar) + (b - (s - ar));
    return s;
}

/* Merge the state of other columns into `into`. Associative and commutative. */
static inline void fl_lse_merge(fl_lse_state *into, const fl_lse_state *other) {
    double m1 = into->m, m2 = other->m;
    if (fl__isnan(m1) || fl__isnan(m2)) { into->m = NAN; into->s = NAN; return; }
    if (m2 == -FL_INF) return;
    if (m1 == -FL_INF) { *into = *other; return; }
    if (m1 == FL_INF || m2 == FL_INF) { into->m = FL_INF; into->s = 1.0; return; }
    if (m1 >= m2) into->s += other->s * exp(m2 - m1);
    else { into->s = other->s + into->s * exp(m1 - m2); into->m = m2; }
}

/* log sum exp of everything folded in: -inf for nothing or all -inf, +inf if a +inf was seen, NaN if a
 * NaN was seen. */
static inline double fl_lse_result(const fl_lse_state *st) {
    if (st->m == -FL_INF || st->m == FL_INF || fl__isnan(st->m)) return st->m;
    return st->m + fl__log(st->s);
}

static inline void fl_ent_init(fl_ent_state *st) { st->m = -FL_INF; st->s = 0.0; st->t = 0.0; }

static inline void fl_ent_merge(fl_ent_state *into, const fl_ent_state *other) {
    double m1 = into->m, m2 = other->m, f;
    if (fl__isnan(m1) || fl__isnan(m2)) { into->m = into->s = into->t = NAN; return; }
    if (m2 == -FL_INF) return;
    if (m1 == -FL_INF) { *into = *other; return; }
    if (m1 == FL_INF || m2 == FL_INF) { into->m = FL_INF; into->s = 1.0; into->t = 0.0; return; }
    /* f = 0: the smaller range's terms vanish; skipped, as s * (m2 - m1) may overflow (maxima of +-1e308
     * are 2e308 apart: inf * 0 was NaN) */
    if (m1 >= m2) {
        f = exp(m2 - m1);
        if (f > 0) {
            into->s += other->s * f;
            into->t += (other->t + other->s * (m2 - m1)) * f;
        }
    } else {
        f = exp(m1 - m2);
        if (f > 0) {
            into->t = other->t + (into->t + into->s * (m1 - m2)) * f;
            into->s = other->s + into->s * f;
        } else {
            into->t = other->t;
            into->s = other->s;
        }
        into->m = m2;
    }
}

/* The rounding errors err that fl__ent_fold gathered, added to s and t (and cleared). */
static inline void fl__ent_done(fl_ent_state *st, double err[2]) {
    st->s += err[0];
    st->t += err[1];
    err[0] = err[1] = 0.0;
}

/* A chunk's state c folded into a row's running *st, the rounding errors of s's and t's additions gathered
 * in err[0] and err[1] while the max stays (TwoSum, as fl_lse_fold gathers logsumexp's), then handed to
 * s and t before a chunk moves the max (fl_ent_merge rescales them) and by fl__ent_done at the row's end.
 * Added plainly, the errors of repeated chunk sums grew with their number: float64 2^20 logits of -7
 * after a 0, in chunks of 2, lost 37000 ulp of entropy (3x the accuracy contract; an accuracy audit). */
static inline void fl__ent_fold(fl_ent_state *st, double err[2], const fl_ent_state *c) {
    double m1 = st->m, m2 = c->m, f;
    if (m1 > -FL_INF && m1 < FL_INF && m2 <= m1) {     /* (not NaN; a chunk of all -inf adds nothing) */
        f = exp(m2 - m1);
        if (f > 0) {                                       /* (else its terms vanish: fl_ent_merge) */
            st->s = fl__add_exact(st->s, c->s * f, &err[0]);
            st->t = fl__add_exact(st->t, (c->t + c->s * (m2 - m1)) * f, &err[1]);
        }
        return;
    }
    fl__ent_done(st, err);
    fl_ent_merge(st, c);
}

/* Shannon entropy (nats) of softmax of everything folded in; NaN for an empty, all -inf, +inf or NaN
 * row, where the softmax itself is NaN. */
static inline double fl_ent_result(const fl_ent_state *st) {
    if (st->m == -FL_INF || st->m == FL_INF || fl__isnan(st->m)) return NAN;
    return fl__log(st->s) - st->t / st->s;
}

/* Label smoothing's distance sum of a column range: d = sum w[c] (m - x[c]) from the range's max m, with
 * w's sum over the range (w = 1 without class weights). Its terms are never negative (for weights >= 0),
 * so d keeps its precision however large the logits, where W lse - sum w x cancels. A range whose max is
 * not finite has d relative to 0 instead: inf (or NaN for a zero weight, as 0 * log 0 in PyTorch) for
 * -inf logits, and the row's smoothing term is NaN anyway once its max is +inf or NaN. fl__dist_shift
 * moves d to a larger max `to`; fl__dist_merge merges the sums of two ranges into the first at their
 * merged max M. */
static inline double fl__dist_shift(double d, double w, double from, double to) {
    return w != 0.0 && to != from ? d + w * (to - from) : d;
}

/* One weighted distance w (m - x) of fl__dist; 0 at the max whatever the weight (see fl__dist). A macro:
 * an inline function without the kernels' optimize attribute is not inlined into them, and a call per
 * element is 5x slower. */
#define FL__WDIST(w, d) ((d) == 0.0 ? 0.0 : (w) * (d))

static inline void fl__dist_merge(double *d, double *w, double m, double d2, double w2, double m2, double M) {
    *d = fl__dist_shift(*d, *w, m, M) + fl__dist_shift(d2, w2, m2, M);
    *w += w2;
}

/* A chunk's distance sum d2 (from the row's max M, which the chunk may have raised from m) folded into the
 * row's running *d as fl__dist_merge does, the addition's rounding error gathered in *err (TwoSum; the
 * shifts add terms, so the errors need no rescaling) for fl__dist_done at the row's end. Added plainly,
 * the errors of repeated chunk sums grew with their number (float64 label smoothing: 67 ulp at the
 * default chunk, 33000 in chunks of 1, where PyTorch's were within 1; an accuracy audit). */
static inline void fl__dist_fold(double *d, double *w, double *err, double m, double d2, double w2,
                                 double M) {
    *d = fl__add_exact(fl__dist_shift(*d, *w, m, M), d2, err);
    *w += w2;
}

/* The running distance sum d with its gathered rounding errors err; where a sum met an inf or NaN, its
 * errors are NaN and d stands as it is. */
static inline double fl__dist_done(double d, double err) { return err - err == 0.0 ? d + err : d; }

/* A row's smoothing sum, sum w (lse - x) = d + W log s, from its distance sum d (fl__dist) and weight sum W.
 * W log s is the sum of w log s over the classes: 0 where log s is (the max holds all the mass), whatever
 * the weights, an infinite one included (W * 0 would make it NaN where PyTorch's sum is inf) and finite
 * ones whose sum W overflows; but a NaN weight makes the sum NaN, as in PyTorch. (An infinite weight on
 * the max's own class adds 0 here, where PyTorch's w * log 1 is NaN: W cannot tell where it stands.) */
static inline double fl__dist_total(double d, double W, double log_s) {
    return log_s == 0.0 && W == W ? d : d + W * log_s;
}

/* ------------------------------------------------------------------------------------------------ */
/* 2. Vectorizable exp                                                                              */
/* ------------------------------------------------------------------------------------------------ */

/* n = k - magic: the integer to which adding the rounding constant `magic` (1.5 * 2^23 or 1.5 * 2^52,
 * plus a bias) rounded k. Where arithmetic carries excess precision (x87: FLT_EVAL_METHOD 2, and GNU C
 * and C++ do not round at assignments by default), k was never rounded to the format, so n is taken from
 * k's bits (a store to memory rounds): k and magic lie in one binade whose ulp is 1. Elsewhere (SSE,
 * NEON) the plain difference, which vectorizes everywhere. */
#if defined(__FLT_EVAL_METHOD__) && __FLT_EVAL_METHOD__ != 0
#define FL__N32(k, magic) ((float)(int32_t)(fl__bits_from_f32(k) - fl__bits_from_f32(magic)))
#define FL__N64(k, magic) ((double)(int64_t)(fl__bits_from_f64(k) - fl__bits_from_f64(magic)))
#else
#define FL__N32(k, magic) ((k) - (magic))
#define FL__N64(k, magic) ((k) - (magic))
#endif

/* exp(x) in float: Cephes expf's polynomial after a Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2.
 * Rounding to n uses the add-and-subtract 1.5 * 2^23 trick (no floorf, which blocks vectorization), and
 * 2^n is applied as two factors so that results in the subnormal range are right. NaN propagates;
 * x < -104 gives 0; x > 88.72 gives inf. */
FL_INLINE float fl__expf(float x) {
    float xc = x < -104.0f ? -104.0f : x;
    xc = xc > 88.7228f ? 88.7228f : xc;
    float k = xc * 1.44269504088896341f + 12582912.0f;
    float n = FL__N32(k, 12582912.0f);
    int32_t ni = (int32_t)(fl__bits_from_f32(k) - 0x4b400000u);
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t n1 = ni >> 1, n2 = ni - n1;
    float s1 = fl__f32_from_bits((uint32_t)(n1 + 127) << 23);
    float s2 = fl__f32_from_bits((uint32_t)(n2 + 127) << 23);
    float y = p * s1 * s2;
    y = x < -104.0f ? 0.0f : y;
    y = x > 88.7228f ? (float)INFINITY : y;
    return y;
}

/* exp(x) in double: Cephes exp's rational approximation after the same reduction; within 2 ulp (1.7
 * measured), subnormal results right, NaN propagates. */
FL_INLINE double fl__exp(double x) {
    double xc = x < -745.2 ? -745.2 : x;
    xc = xc > 709.79 ? 709.79 : xc;
    double k = xc * 1.4426950408889634073599 + 6755399441055744.0;
    double n = FL__N64(k, 6755399441055744.0);
    int64_t ni = (int64_t)(fl__bits_from_f64(k) - 0x4338000000000000ull);
    double r = xc - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    double rr = r * r;
    double px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr
                     + 9.99999999999999999910e-1);
    double qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr
                 + 2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
    double p = 1.0 + 2.0 * (px / (qx - px));
    int64_t n1 = ni >> 1, n2 = ni - n1;
    double s1 = fl__f64_from_bits((uint64_t)(n1 + 1023) << 52);
    double s2 = fl__f64_from_bits((uint64_t)(n2 + 1023) << 52);
    double y = p * s1 * s2;
    y = x < -745.2 ? 0.0 : y;
    y = x > 709.79 ? (double)INFINITY : y;
    return y;
}

/* exp(x) for x <= 0 inside sums whose largest term is 1 (x = logit - running max): results below
 * 2^-126 are not needed there, so x is clamped at -87.3 (a term of 1e-38 at most), and the instruction
 * count is cut to the bone (this loop bounds the speed of logsumexp and cross-entropy):
 * - the rounding constant 1.5 * 2^23 + 127 + b leaves n + 127 + b in the low bits of k, so `bits(k) << 23`
 *   is 2^(n + b) at once (b = 0 here; fl__expf_up's 32 keeps its results normal);
 * - e^r = 1 + r (1 + r q(r)), q of degree 4 fitted (minimax, relative) to (e^r - 1 - r) / r^2 on
 *   |r| <= ln2 / 2: six multiply-adds, exact at 0, within 1.2 ulp with FMA (1.7 without).
 * NaN in, NaN out; inputs above 88 (never passed here but for chunks that are then redone) give garbage.
 * fl__expf_core: exp(xc) * 2^b for xc already clamped, magic = 1.5 * 2^23 + 127 + b. */
FL_INLINE float fl__expf_core(float xc, float magic) {
    float k = xc * 1.44269504088896341f + magic;
    float n = FL__N32(k, magic);
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float q = 1.3812552206218243e-3f;
    q = q * r + 8.3687053993344307e-3f;
    q = q * r + 4.1668426245450974e-2f;
    q = q * r + 1.6666521131992340e-1f;
    q = q * r + 4.9999994039535522e-1f;
    float p = (q * r + 1.0f) * r + 1.0f;
    return p * fl__f32_from_bits(fl__bits_from_f32(k) << 23);
}

FL_INLINE float fl__expf_neg(float x) {
    return fl__expf_core(x < -87.3f ? -87.3f : x, 12583039.0f);    /* 1.5 * 2^23 + 127 */
}

/* The same in double (Cephes exp's rational approximation; bias = 1023 + b). */
FL_INLINE double fl__exp_core(double xc, uint64_t bias) {
    double k = xc * 1.4426950408889634073599 + 6755399441055744.0;
    double n = FL__N64(k, 6755399441055744.0);
    uint64_t ni = fl__bits_from_f64(k) - 0x4338000000000000ull;
    double r = xc - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    double rr = r * r;
    double px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr
                     + 9.99999999999999999910e-1);
    double qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr
                 + 2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
    return (1.0 + 2.0 * (px / (qx - px))) * fl__f64_from_bits((ni + bias) << 52);
}

FL_INLINE double fl__exp_neg(double x) {
    return fl__exp_core(x < -708.0 ? -708.0 : x, 1023u);
}

/* exp(x) * 2^32 for x <= 0 (2^64 in double): softmax's terms exp(logit - max), normal numbers for every x
 * down to -104 (-745.2), the clamp, where exp(x) is below half the smallest subnormal. Scaled by 2^-32 /
 * s (a normal number), they become probabilities rounded once, small ones (subnormal) included, and
 * -inf logits' are exactly 0. NaN in, NaN out. */
FL_INLINE float fl__expf_up(float x) {
    return fl__expf_core(x < -104.0f ? -104.0f : x, 12583071.0f);   /* 1.5 * 2^23 + 127 + 32 */
}

FL_INLINE double fl__exp_up(double x) {
    return fl__exp_core(x < -745.2 ? -745.2 : x, 1087u);
}

/* The softcap c tanh(x / c) (c > 0), through exp: tanh|z| = (1 - e) / (1 + e) with z = x / c and e =
 * exp(-2|z|), a few ulp. Below |z| = 0.28, 1 - e cancels (12 ulp near 0.02, and tanh(z) = 0 for |z| <
 * 3e-8, which turned a large cap into all-zero logits): there, x (1 + p(z^2)) with p from tanh's Taylor
 * series to z^9, whose next term is below 0.3 ulp. x times the series, not c times z times it: for a large
 * cap z is subnormal, or 0, and c z lost x's bits (a cap of 1e38 made x = 1e-7 into 1.4e-7; found by a
 * numerics audit), where z^2 only underflows to a term that no longer counts. */
FL_INLINE float fl__softcapf(float x, float c) {
    float z = x / c;
    float a = z < 0.0f ? -z : z;
    float e = fl__expf(-2.0f * a);
    float t = (1.0f - e) / (1.0f + e);
    float a2 = a * a;
    float p = a2 * (-1.0f / 3.0f + a2 * (2.0f / 15.0f + a2 * (-17.0f / 315.0f + a2 * (62.0f / 2835.0f))));
    return a < 0.28f ? x * (1.0f + p) : c * (z < 0.0f ? -t : t);     /* (x * ...: -0 keeps its sign) */
}

/* The same in double. Below |z| = 0.5, 1 - e cancels (7000 ulp near 1e-5): there tanh z = z + z^3 g(z^2),
 * g the degree-10 Chebyshev fit of (tanh(a) / a - 1) / a^2 on a^2 in [0, 0.25] (within 1.1e-18 of it),
 * and c tanh z = x (1 + z^2 g(z^2)). */
FL_INLINE double fl__softcap(double x, double c) {
    double z = x / c;
    double a = z < 0.0 ? -z : z;
    double e = fl__exp(-2.0 * a);
    double t = (1.0 - e) / (1.0 + e);
    double u = a * a;
    double g = -0.0000229533046533373290281;
    g = g * u + 0.0000881958030574506437743;
    g = g * u - 0.000236353642941362434543;
    g = g * u + 0.000589466741910190505897;
    g = g * u - 0.00145576081386558738619;
    g = g * u + 0.00359212179694987048952;
    g = g * u - 0.00886323519865913438443;
    g = g * u + 0.0218694885258675977473;
    g = g * u - 0.0539682539680897542681;
    g = g * u + 0.133333333333332309162;
    g = g * u - 0.333333333333333332276;
    return a < 0.5 ? x * (1.0 + u * g) : c * (z < 0.0 ? -t : t);     /* (x * ...: -0 keeps its sign) */
}

/* ------------------------------------------------------------------------------------------------ */
/* 2b. Contiguous 16-bit conversions over arrays (vectorized)                                       */
/* ------------------------------------------------------------------------------------------------ */

/* Blocks of 16 in an inner loop of known trip count, then the tail: GCC vectorizes the loads so at -O2
 * too, where its cost model leaves a plain loop over n (which needs a remainder loop) scalar, 4-7 times
 * slower. */
#define FL__CONVERT(dst, src, n, convert)                                         \
    do {                                                                          \
        int64_t i_ = 0;                                                           \
        int j_;                                                                   \
        for (; i_ + 16 <= (n); i_ += 16) {                                        \
            FL_LANE_LOOP                                                          \
            for (j_ = 0; j_ < 16; j_++) (dst)[i_ + j_] = convert((src)[i_ + j_]); \
        }                                                                         \
        for (; i_ < (n); i_++) (dst)[i_] = convert((src)[i_]);                    \
    } while (0)

FL_MULTIVERSION static FL_UNUSED void fl__load_f16_lanes(float *dst, const uint16_t *src, int64_t n) {
    FL__CONVERT(dst, src, n, fl_f16_to_f32);
}

/* (A plain loop: GCC vectorizes this one at -O3 and not in blocks of 16, whose float-to-half selects it
 * then leaves scalar.) */
FL_MULTIVERSION static FL_UNUSED void fl__store_f16_lanes(uint16_t *dst, const float *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = fl_f32_to_f16(src[i]);
}

FL_MULTIVERSION static FL_UNUSED void fl_load_bf16(float *dst, const uint16_t *src, int64_t n) {
    FL__CONVERT(dst, src, n, fl_bf16_to_f32);
}

FL_MULTIVERSION static FL_UNUSED void fl_store_bf16(uint16_t *dst, const float *src, int64_t n) {
    FL__CONVERT(dst, src, n, fl_f32_to_bf16);
}

/* IEEE half conversions with F16C (x86-64-v3 and later: vcvtph2ps, vcvtps2ph, 8 values an instruction),
 * bit for bit the results of fl_f16_to_f32 and fl_f32_to_f16 (tested on every half and on floats around
 * every half): the hardware rounds to nearest even as they do, and on the way in keeps a NaN's payload,
 * quiet; on the way out a NaN becomes fl_f32_to_f16's quiet NaN 0x7e00 (with its sign). */
#if FL_X86_INTRINSICS && (FL_HAVE_MULTIVERSION || (defined(__F16C__) && defined(__AVX2__)))
#define FL_HAVE_F16C 1
FL_TARGET_AVX2_F16C static FL_UNUSED void fl__load_f16_f16c(float *dst, const uint16_t *src, int64_t n) {
    int64_t i, nv = n - n % 8;
    for (i = 0; i < nv; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) dst[i] = fl_f16_to_f32(src[i]);
}

FL_TARGET_AVX2_F16C static FL_UNUSED void fl__store_f16_f16c(uint16_t *dst, const float *src, int64_t n) {
    int64_t i, nv = n - n % 8;
    int j;
    for (i = 0; i < nv; i += 8) {
        __m256 v = _mm256_loadu_ps(src + i);
        _mm_storeu_si128((__m128i *)(void *)(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT |
                                                                           _MM_FROUND_NO_EXC));
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)))     /* a NaN (rare): 0x7e00, its sign */
            for (j = 0; j < 8; j++) dst[i + j] = fl_f32_to_f16(src[i + j]);
    }
    for (; i < n; i++) dst[i] = fl_f32_to_f16(src[i]);
}
#else
#define FL_HAVE_F16C 0
#endif

/* float <-> IEEE half over arrays: F16C where the CPU has it (x86-64-v3), else the portable loops. */
static inline void fl_load_f16(float *dst, const uint16_t *src, int64_t n) {
#if FL_HAVE_F16C && FL_HAVE_MULTIVERSION
    if (FL__CPU_F16C()) { fl__load_f16_f16c(dst, src, n); return; }
#elif FL_HAVE_F16C
    fl__load_f16_f16c(dst, src, n);
    return;
#endif
    fl__load_f16_lanes(dst, src, n);
}

static inline void fl_store_f16(uint16_t *dst, const float *src, int64_t n) {
#if FL_HAVE_F16C && FL_HAVE_MULTIVERSION
    if (FL__CPU_F16C()) { fl__store_f16_f16c(dst, src, n); return; }
#elif FL_HAVE_F16C
    fl__store_f16_f16c(dst, src, n);
    return;
#endif
    fl__store_f16_lanes(dst, src, n);
}

/* One element of any input dtype, as a double. */
FL_INLINE double fl__load_one(const char *p, int dtype) {
    uint16_t h; float f; double d;
    switch (dtype) {
    case FL_F16: memcpy(&h, p, 2); return fl_f16_to_f32(h);
    case FL_BF16: memcpy(&h, p, 2); return fl_bf16_to_f32(h);
    case FL_F32: memcpy(&f, p, 4); return f;
    default: memcpy(&d, p, 8); return d;
    }
}

/* double -> float rounded to odd: truncated, with the last bit set where v was inexact. Rounding that
 * float again to a format of at most 22 significant bits (half, bfloat16) gives v rounded once, as if
 * directly (through a float rounded to nearest, 1 + 2^-11 + 2^-30 would become the tie 1 + 2^-11, then 1
 * in half). NaN and inf are left to the plain conversion. */
FL_INLINE float fl__f64_to_f32_odd(double v) {
    float f = (float)v;
    if ((double)f != v && v == v) {
        uint32_t u = fl__bits_from_f32(f);
        if (fabs((double)f) > fabs(v)) u -= 1;     /* rounded away from 0: the truncation is one below */
        f = fl__f32_from_bits(u | 1u);
    }
    return f;
}

/* Store one double as any dtype (rounding once, to nearest even). */
FL_INLINE void fl__store_one(char *p, int dtype, double v) {
    uint16_t h; float f = (float)v;
    switch (dtype) {
    case FL_F16: h = fl_f32_to_f16(fl__f64_to_f32_odd(v)); memcpy(p, &h, 2); break;
    case FL_BF16: h = fl_f32_to_bf16(fl__f64_to_f32_odd(v)); memcpy(p, &h, 2); break;
    case FL_F32: memcpy(p, &f, 4); break;
    default: memcpy(p, &v, 8); break;
    }
}

static const int fl_dtype_size[4] = {2, 2, 4, 8};

/* One row of logits as it lies in memory. Values are transformed as x -> softcap * tanh(x / softcap)
 * (when softcap > 0), then divided by temperature. data and stride must be multiples of the element's
 * size (its alignment): the row drivers read the elements as their C type, and an unaligned one is
 * undefined behaviour (UBSan reports it; a vectorizing compiler may fault on it). Copy an unaligned row
 * first, as the Python package does. */
typedef struct fl_row {
    const char *data;  /* element 0, aligned to its size */
    int64_t n;         /* number of elements */
    int64_t stride;    /* bytes from one element to the next (a multiple of its size); may be negative */
    int dtype;         /* FL_F16, FL_BF16, FL_F32 or FL_F64 */
    double temperature; /* logits are divided by it; 1 for none */
    double softcap;    /* 0 for none */
} fl_row;

/* Whether the row's values are used as they are (no softcap, a temperature of 1): no transform call. */
static inline int fl__row_plain(const fl_row *r) { return r->temperature == 1.0 && r->softcap == 0.0; }


/* ------------------------------------------------------------------------------------------------ */
/* 2c. Chunk primitives, one set per compute type                                                   */
/* ------------------------------------------------------------------------------------------------ */

#define FL_SCAN_BYTES 128       /* fl__scan_above's block: two 512-bit vectors */
#define FL_TILE 64              /* short rows: rows in a tile (see fl__lse_tile) */
#define FL_SHORT_F32 32         /* ... for rows of fewer values than these */
#define FL_SHORT_F64 16
/* top-k by selection (fl__topk_select) where k * FL_TOPK_SELECT > n + FL_TOPK_SELECT_COST (n: the row's
 * length), else by a heap: about where the two took the same time (float32; selection's passes cost
 * 256-bin histograms, a fixed cost that short rows feel) */
#define FL_TOPK_SELECT 32
#define FL_TOPK_SELECT_COST 4096

#define FL_T float
#define FL_SUF f32
#define FL_LANES 16
#define FL_IT int32_t        /* an integer of FL_T's width */
#define FL_UT uint32_t       /* ... unsigned */
#define FL_EXP_NEG fl__expf_neg
#define FL_EXP_UP fl__expf_up
#define FL_UP 2.3283064365386963e-10    /* 2^-32: FL_EXP_UP's scale, undone */
#define FL_SOFTCAP fl__softcapf
#define FL_T_MAX ((double)FLT_MAX)
#include "fastlogits_impl.h"
#undef FL_T_MAX
#undef FL_T
#undef FL_SUF
#undef FL_LANES
#undef FL_IT
#undef FL_UT
#undef FL_EXP_NEG
#undef FL_EXP_UP
#undef FL_UP
#undef FL_SOFTCAP

#define FL_T double
#define FL_SUF f64
#define FL_LANES 8
#define FL_IT int64_t
#define FL_UT uint64_t
#define FL_EXP_NEG fl__exp_neg
#define FL_EXP_UP fl__exp_up
#define FL_UP 5.421010862427522e-20     /* 2^-64 */
#define FL_SOFTCAP fl__softcap
#define FL_T_MAX DBL_MAX
#include "fastlogits_impl.h"
#undef FL_T_MAX
#undef FL_T
#undef FL_SUF
#undef FL_LANES
#undef FL_IT
#undef FL_UT
#undef FL_EXP_NEG
#undef FL_EXP_UP
#undef FL_UP
#undef FL_SOFTCAP

/* ------------------------------------------------------------------------------------------------ */
/* 3. Public API: the logsumexp state over plain arrays                                             */
/* ------------------------------------------------------------------------------------------------ */

/* Fold n float32 values into the state, in chunks that stay in L1. */
static inline void fl_lse_update_f32(fl_lse_state *st, const float *x, size_t n) {
    double comp = 0.0;
    for (size_t c0 = 0; c0 < n; c0 += FL_CHUNK) {
        size_t len = n - c0 < FL_CHUNK ? n - c0 : FL_CHUNK;
        fl_lse_fold_f32(st, &comp, x + c0, (int64_t)len, (uintptr_t)(x + c0) + len * sizeof(float), 64);
    }
    st->s += comp;
}

static inline void fl_lse_update_f64(fl_lse_state *st, const double *x, size_t n) {
    double comp = 0.0;
    for (size_t c0 = 0; c0 < n; c0 += FL_CHUNK) {
        size_t len = n - c0 < FL_CHUNK ? n - c0 : FL_CHUNK;
        fl_lse_fold_f64(st, &comp, x + c0, (int64_t)len, (uintptr_t)(x + c0) + len * sizeof(double), 64);
    }
    st->s += comp;
}

#define FL_CONVERT_BLOCK 1024

/* The body of the 16-bit fl_*_update functions: n values given as their bits (x), converted to float a
 * block at a time by `load` and folded into the state st by the float32 `update`. */
#define FL__FOLD_CONVERTED(update, load, st, x, n)                         \
    do {                                                                   \
        float buf_[FL_CONVERT_BLOCK];                                      \
        while ((n) > 0) {                                                  \
            size_t c_ = (n) < FL_CONVERT_BLOCK ? (n) : FL_CONVERT_BLOCK;   \
            load(buf_, (x), (int64_t)c_);                                  \
            update((st), buf_, c_);                                        \
            (x) += c_; (n) -= c_;                                          \
        }                                                                  \
    } while (0)

/* Fold n IEEE half values (given as their bits). */
static inline void fl_lse_update_f16(fl_lse_state *st, const uint16_t *x, size_t n) {
    FL__FOLD_CONVERTED(fl_lse_update_f32, fl_load_f16, st, x, n);
}

/* Fold n bfloat16 values (given as their bits). */
static inline void fl_lse_update_bf16(fl_lse_state *st, const uint16_t *x, size_t n) {
    FL__FOLD_CONVERTED(fl_lse_update_f32, fl_load_bf16, st, x, n);
}

/* Fold n values into the entropy state (as the fl_lse_update_* twins: the 16-bit ones take the bits). */
static inline void fl_ent_update_f32(fl_ent_state *st, const float *x, size_t n) {
    double err[2] = {0.0, 0.0};
    for (size_t c0 = 0; c0 < n; c0 += FL_CHUNK) {
        size_t len = n - c0 < FL_CHUNK ? n - c0 : FL_CHUNK;
        fl_ent_state c = fl_ent_chunk_f32(x + c0, (int64_t)len, (uintptr_t)(x + c0) + len * sizeof(float),
                                          64);
        fl__ent_fold(st, err, &c);
    }
    fl__ent_done(st, err);
}

static inline void fl_ent_update_f64(fl_ent_state *st, const double *x, size_t n) {
    double err[2] = {0.0, 0.0};
    for (size_t c0 = 0; c0 < n; c0 += FL_CHUNK) {
        size_t len = n - c0 < FL_CHUNK ? n - c0 : FL_CHUNK;
        fl_ent_state c = fl_ent_chunk_f64(x + c0, (int64_t)len, (uintptr_t)(x + c0) + len * sizeof(double),
                                          64);
        fl__ent_fold(st, err, &c);
    }
    fl__ent_done(st, err);
}

static inline void fl_ent_update_f16(fl_ent_state *st, const uint16_t *x, size_t n) {
    FL__FOLD_CONVERTED(fl_ent_update_f32, fl_load_f16, st, x, n);
}

static inline void fl_ent_update_bf16(fl_ent_state *st, const uint16_t *x, size_t n) {
    FL__FOLD_CONVERTED(fl_ent_update_f32, fl_load_bf16, st, x, n);
}

/* The cross-entropy state of one row against class `label`, for a row that arrives in pieces: the
 * logsumexp state and the label's logit once its column was seen. */
typedef struct fl_ce_state {
    fl_lse_state lse;
    int64_t label;
    double target; /* the label's logit, valid when found */
    int found;
} fl_ce_state;

static inline void fl_ce_init(fl_ce_state *st, int64_t label) {
    fl_lse_init(&st->lse);
    st->label = label;
    st->target = NAN;
    st->found = 0;
}

/* Whether column `label` lies in start .. start + n, for any int64 values (the difference in uint64: no
 * signed overflow, even for a negative start). */
static inline int fl__column_in(int64_t label, int64_t start, size_t n) {
    return label >= start && (uint64_t)label - (uint64_t)start < (uint64_t)n;
}

/* Fold n float32 logits: columns start .. start + n of the row. */
static inline void fl_ce_update_f32(fl_ce_state *st, const float *x, size_t n, int64_t start) {
    fl_lse_update_f32(&st->lse, x, n);
    if (fl__column_in(st->label, start, n)) {
        st->target = x[(uint64_t)st->label - (uint64_t)start];
        st->found = 1;
    }
}

static inline void fl_ce_update_f64(fl_ce_state *st, const double *x, size_t n, int64_t start) {
    fl_lse_update_f64(&st->lse, x, n);
    if (fl__column_in(st->label, start, n)) {
        st->target = x[(uint64_t)st->label - (uint64_t)start];
        st->found = 1;
    }
}

/* Merge the state of other columns of the same row (same label). */
static inline void fl_ce_merge(fl_ce_state *into, const fl_ce_state *other) {
    fl_lse_merge(&into->lse, &other->lse);
    if (other->found) { into->target = other->target; into->found = 1; }
}

/* -log softmax(row)[label], computed as (m - x_label) + log s (exact even for huge logits). NaN when the
 * label's column was never seen, or when log-softmax is NaN: a NaN or a +inf in the row, or all -inf
 * (as PyTorch). */
static inline double fl_ce_result(const fl_ce_state *st) {
    double m = st->lse.m;
    if (!st->found || !(m > -FL_INF && m < FL_INF)) return NAN;
    return (m - st->target) + fl__log(st->lse.s);
}

/* Cross-entropy of one contiguous float32 row of n logits against class `label`. NaN for a label
 * outside [0, n) and wherever fl_ce_result is NaN. */
static inline double fl_cross_entropy_f32(const float *row, size_t n, int64_t label) {
    fl_ce_state st;
    fl_ce_init(&st, label);
    fl_ce_update_f32(&st, row, n, 0);
    return fl_ce_result(&st);
}

/* The argmax state: the best value so far and its column; the lowest column wins ties, and a NaN counts
 * as the largest value (the first NaN wins), as in NumPy and PyTorch. */
typedef struct fl_argmax_state {
    double value; /* -inf when empty */
    int64_t index; /* -1 when empty */
} fl_argmax_state;

static inline void fl_argmax_init(fl_argmax_state *st) { st->value = -FL_INF; st->index = -1; }

/* Merge the state of other columns (in any order). */
static inline void fl_argmax_merge(fl_argmax_state *into, const fl_argmax_state *other) {
    double a = into->value, b = other->value;
    int take;
    if (other->index < 0) return;
    if (into->index < 0) { *into = *other; return; }
    if (fl__isnan(b)) take = !fl__isnan(a) || other->index < into->index;
    else if (fl__isnan(a)) take = 0;
    else take = b > a || (b == a && other->index < into->index);
    if (take) *into = *other;
}

/* Fold n float32 values: columns start .. start + n. */
static inline void fl_argmax_update_f32(fl_argmax_state *st, const float *x, size_t n, int64_t start) {
    for (size_t c0 = 0; c0 < n; c0 += FL_CHUNK) {
        size_t len = n - c0 < FL_CHUNK ? n - c0 : FL_CHUNK, i = 0;
        int has_nan;
        fl_argmax_state c;
        float m = fl__max_f32(x + c0, (int64_t)len, &has_nan);
        if (has_nan) while (x[c0 + i] == x[c0 + i]) i++;          /* the first NaN */
        else while (i < len && x[c0 + i] != m) i++;               /* the first max */
        if (i == len) continue;                                    /* empty */
        c.value = x[c0 + i];
        c.index = start + (int64_t)(c0 + i);
        fl_argmax_merge(st, &c);
    }
}

/* The index of the largest of n contiguous float32 values (see fl_argmax_state); -1 when n == 0. */
static inline int64_t fl_argmax_f32(const float *x, size_t n) {
    fl_argmax_state st;
    fl_argmax_init(&st);
    fl_argmax_update_f32(&st, x, n, 0);
    return st.index;
}

/* Seeded sampling: a counter-based generator and the sampling row states. */
#include "fastlogits_sample.h"

#ifdef __cplusplus
}
#endif

#endif /* C99 or later */
#endif /* FASTLOGITS_H */
