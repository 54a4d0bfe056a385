/*
 * fastlogits_impl.h: chunk primitives and row drivers for one compute type. Included twice by
 * fastlogits.h, with FL_T = float (FL_SUF f32) and FL_T = double (FL_SUF f64); never include it directly.
 *
 * Chunk primitives work on a contiguous chunk that sits in L1, as fixed-width lanes (FL_LANES values, one
 * 512-bit vector) so that GCC and Clang vectorize the reductions without reassociation flags. They and the
 * chunk states built of them (fl_lse_chunk_pf, fl_ent_chunk, fl__softmax_terms: the primitives inlined,
 * one call a chunk) are the only multiversioned functions: everything around them is scalar bookkeeping
 * once per chunk.
 * A reduction runs its lanes over whole vectors only, combines them pairwise (log2 FL_LANES vector steps,
 * where a sum in lane order took FL_LANES - 1 dependent scalar ones), and adds the last, partial vector in
 * a scalar of its own. So a range shorter than one vector (rows of a few classes) sets up no lanes, and
 * GCC keeps the lanes, which the scalar tail never touches, in registers: while the tail added into lane
 * 0 it kept fl__sumexp_max's float accumulator on the stack, stored and reloaded every vector
 * (tests/test_embedding.py checks the package's loops). float32 logsumexp with GCC 12: V = 2 rows 50 -> 29
 * ns a row, V = 100 89 -> 75, V = 1000 409 -> 333, long rows 14.0 -> 18.7 GB/s a thread; with Clang 19 at
 * -O3 -march=x86-64-v3: V = 10 62 -> 42 ns, long rows the same, but V = 1000 476 -> 613 ns.
 */
#ifndef FL_T
#error "fastlogits_impl.h is included by fastlogits.h only"
#endif

#define FL_CAT2_(a, b) a##_##b
#define FL_CAT2(a, b) FL_CAT2_(a, b)
#define FL_FN(name) FL_CAT2(name, FL_SUF)
#define FL_EXP_FLOOR (sizeof(FL_T) == 4 ? (FL_T)-87.3 : (FL_T)-708.0)
#define FL_SCAN (FL_SCAN_BYTES / (int)sizeof(FL_T))     /* fl__scan_above's block: 32 floats, 16 doubles */

/* The pairwise combine of a reduction's lanes into lane 0: step(h) folds lanes h .. 2h - 1 into 0 .. h - 1,
 * for h = FL_LANES / 2 down to 1, each a loop of constant length (a vector operation, then smaller ones;
 * the same additions in the same order as before). Written as one loop over h, GCC 12 compiled a general
 * loop nest through the stack, which cost more than the rest of a row of 16 floats: float32 logsumexp by
 * fl_lse_update_f32, V = 16 rows 35.5 -> 21.1 ns a row, V = 100 63.6 -> 50.0, long rows the same (Clang
 * 19 the same throughout). */
#if FL_LANES == 16
#define FL__PAIRWISE(step) do { step(8); step(4); step(2); step(1); } while (0)
#elif FL_LANES == 8
#define FL__PAIRWISE(step) do { step(4); step(2); step(1); } while (0)
#else
#error "FL_LANES must be 8 or 16"
#endif

/* Largest value of x[0:n), NaN ignored (-inf when n == 0); *has_nan tells whether a NaN was seen. */
FL_INLINE FL_T FL_FN(fl__max_lanes)(const FL_T *x, int64_t n, int *has_nan) {
    FL_T a = -(FL_T)INFINITY, z = 0;
    int64_t i = 0;
    int j;
    if (n >= FL_LANES) {
        FL_T acc[FL_LANES], nan[FL_LANES];
        for (j = 0; j < FL_LANES; j++) { acc[j] = -(FL_T)INFINITY; nan[j] = 0; }
        for (; i + FL_LANES <= n; i += FL_LANES) {
            FL_LANE_LOOP
            for (j = 0; j < FL_LANES; j++) {
                FL_T v = x[i + j];
                acc[j] = v > acc[j] ? v : acc[j];
                nan[j] += v - v;        /* 0, or NaN for NaN and +-inf: rescanned below */
            }
        }
#define FL__STEP(h) for (j = 0; j < (h); j++) {                         \
            acc[j] = acc[j + (h)] > acc[j] ? acc[j + (h)] : acc[j];             \
            nan[j] += nan[j + (h)];                                             \
        }
        FL__PAIRWISE(FL__STEP);
#undef FL__STEP
        a = acc[0];
        z = nan[0];
    }
    for (; i < n; i++) {
        FL_T v = x[i];
        a = v > a ? v : a;
        z += v - v;
    }
    *has_nan = 0;
    if (z != z)                         /* an infinity or a NaN: tell them apart (rare) */
        for (i = 0; i < n; i++) *has_nan |= x[i] != x[i];
    return a;
}

FL_MULTIVERSION static FL_UNUSED FL_T FL_FN(fl__max)(const FL_T *x, int64_t n, int *has_nan) {
    return FL_FN(fl__max_lanes)(x, n, has_nan);
}

/* Index of the first largest value of x[0:n), NaN ignored (0 when all are -inf, or n == 0), and that value
 * in *best; *has_nan as fl__max's. One pass: each lane keeps its largest value and the vector where it
 * first saw it (only a larger value replaces it), and the lanes' results go to the lowest index among
 * equal values. (fl__max, then fl__first_above's scan for the max, took 1.4 times NumPy's argmax over
 * float32 rows of 1000 values.) The vectors are counted in FL_IT: n at most FL_ARGMAX_SPAN (a float32
 * chunk of 2^35 values overflowed the count and ran past the lanes: a review). */
#ifndef FL_ARGMAX_SPAN
#define FL_ARGMAX_SPAN ((int64_t)1 << 30)   /* (a test compiles the header with a small one) */
#endif
FL_MULTIVERSION static FL_UNUSED int64_t FL_FN(fl__argmax_lanes)(const FL_T *x, int64_t n, FL_T *best,
                                                                 int *has_nan) {
    FL_T b = -(FL_T)INFINITY, z = 0;
    int64_t at = 0, i = 0;
    int j;
    if (n >= FL_LANES) {
        FL_T acc[FL_LANES], nan[FL_LANES];
        FL_IT pos[FL_LANES], vec = 0;
        for (j = 0; j < FL_LANES; j++) { acc[j] = -(FL_T)INFINITY; nan[j] = 0; pos[j] = 0; }
        for (; i + FL_LANES <= n; i += FL_LANES, vec++) {
            FL_LANE_LOOP
            for (j = 0; j < FL_LANES; j++) {
                FL_T v = x[i + j];
                FL_IT up = -(FL_IT)(v > acc[j]);     /* (a mask: as a select, GCC kept the loop scalar) */
                pos[j] = (pos[j] & ~up) | (vec & up);
                acc[j] = v > acc[j] ? v : acc[j];
                nan[j] += v - v;        /* 0, or NaN for NaN and +-inf: rescanned below */
            }
        }
        FL_T mx[FL_LANES];
        FL_IT first;
        for (j = 0; j < FL_LANES; j++) mx[j] = acc[j];
#define FL__STEP(h) for (j = 0; j < (h); j++) {                         \
            mx[j] = mx[j + (h)] > mx[j] ? mx[j + (h)] : mx[j];                  \
            nan[j] += nan[j + (h)];                                             \
        }
        FL__PAIRWISE(FL__STEP);
#undef FL__STEP
        b = mx[0];
        z = nan[0];
        first = vec;                    /* the first vector where a lane holding b first saw it */
        for (j = 0; j < FL_LANES; j++) first = acc[j] == b && pos[j] < first ? pos[j] : first;
        for (j = 0; acc[j] != b || pos[j] != first; j++) {}
        at = (int64_t)first * FL_LANES + j;
    }
    for (; i < n; i++) {
        FL_T v = x[i];
        if (v > b) {
            b = v;
            at = i;
        }
        z += v - v;
    }
    *best = b;
    *has_nan = 0;
    if (z != z)                         /* an infinity or a NaN: tell them apart (rare) */
        for (i = 0; i < n; i++) *has_nan |= x[i] != x[i];
    return at;
}

/* Lane sums are flushed to double every FL_FLUSH vectors: at most 16 float additions per lane. */
#define FL_FLUSH 16

/* sum exp(x - m) over x[0:n); m finite, no NaN in x (terms below 1e-38 relative may be off: they
 * cannot change the sum, whose largest term is 1).
 * This loop is bound by arithmetic on data in L1. Meanwhile it prefetches the memory that the next,
 * memory-bound, step will read: one cache line at pf + k * pf_step for the k-th vector (pf = 0: none). */
FL_INLINE double FL_FN(fl__sumexp)(const FL_T *x, int64_t n, FL_T m, uintptr_t pf, uintptr_t pf_step) {
    double t = 0.0;
    int64_t i = 0;
    int j;
    if (n >= FL_LANES) {
        double tot[FL_LANES];
        FL_T acc[FL_LANES];
        for (j = 0; j < FL_LANES; j++) tot[j] = 0.0;
        while (i + FL_LANES <= n) {
            int64_t stop = i + FL_FLUSH * FL_LANES < n ? i + FL_FLUSH * FL_LANES : n;
            for (j = 0; j < FL_LANES; j++) acc[j] = 0;
            for (; i + FL_LANES <= stop; i += FL_LANES) {
                if (pf) FL_PREFETCH(pf + (uintptr_t)(i / FL_LANES) * pf_step);
                FL_LANE_LOOP
                for (j = 0; j < FL_LANES; j++) acc[j] += FL_EXP_NEG(x[i + j] - m);
            }
            for (j = 0; j < FL_LANES; j++) tot[j] += acc[j];
        }
#define FL__STEP(h) for (j = 0; j < (h); j++) tot[j] += tot[j + (h)]
        FL__PAIRWISE(FL__STEP);
#undef FL__STEP
        t = tot[0];
    }
    for (; i < n; i++) t += FL_EXP_NEG(x[i] - m);
    return t;
}

/* fl__sumexp as a function of its own (multiversioned): the second pass of a chunk whose max is known. */
FL_MULTIVERSION static FL_UNUSED double FL_FN(fl__sumexp_from)(const FL_T *x, int64_t n, FL_T m) {
    return FL_FN(fl__sumexp)(x, n, m, 0, 0);
}

/* One pass over a chunk, for rows whose running max m is already known (every chunk but the first): sum
 * exp(x - m) and the chunk's max (*cmax, NaN ignored). A NaN in the chunk makes the sum NaN (the exp
 * propagates it). The caller keeps the result only when the sum is not NaN and the chunk does not raise
 * the max (see fl_lse_fold); otherwise it folds the chunk again in two passes (rare: the max of a row is
 * usually found early). */
FL_MULTIVERSION static FL_UNUSED double FL_FN(fl__sumexp_max)(const FL_T *x, int64_t n, FL_T m, FL_T *cmax,
                                                              uintptr_t pf, uintptr_t pf_step) {
    double t = 0.0;
    FL_T a = -(FL_T)INFINITY;
    int64_t i = 0;
    int j;
    if (n >= FL_LANES) {
        double tot[FL_LANES];
        FL_T acc[FL_LANES], mx[FL_LANES];
        for (j = 0; j < FL_LANES; j++) { tot[j] = 0.0; mx[j] = -(FL_T)INFINITY; }
        while (i + FL_LANES <= n) {
            int64_t stop = i + FL_FLUSH * FL_LANES < n ? i + FL_FLUSH * FL_LANES : n;
            for (j = 0; j < FL_LANES; j++) acc[j] = 0;
            for (; i + FL_LANES <= stop; i += FL_LANES) {
                if (pf) FL_PREFETCH(pf + (uintptr_t)(i / FL_LANES) * pf_step);
                FL_LANE_LOOP
                for (j = 0; j < FL_LANES; j++) {
                    FL_T v = x[i + j];
                    mx[j] = v > mx[j] ? v : mx[j];
                    acc[j] += FL_EXP_NEG(v - m);
                }
            }
            for (j = 0; j < FL_LANES; j++) tot[j] += acc[j];
        }
#define FL__STEP(h) for (j = 0; j < (h); j++) {                         \
            tot[j] += tot[j + (h)];                                             \
            mx[j] = mx[j + (h)] > mx[j] ? mx[j + (h)] : mx[j];                  \
        }
        FL__PAIRWISE(FL__STEP);
#undef FL__STEP
        t = tot[0];
        a = mx[0];
    }
    for (; i < n; i++) {
        FL_T v = x[i];
        a = v > a ? v : a;
        t += FL_EXP_NEG(v - m);
    }
    *cmax = a;
    return t;
}

/* sum exp(x - m) and sum exp(x - m) * (x - m) over x[0:n); m finite, no NaN in x. x - m is clamped
 * where exp() flushes (as in fl__sumexp), so -inf logits add almost exactly 0 to the first sum (a term
 * of 1e-38 or 1e-308, below its rounding) and exactly 0 to the second: 0 log 0 = 0, -inf logits are
 * impossible classes, and a one-hot row has entropy 0, not the clamped terms' -87.3 * 1e-38 each. */
FL_INLINE double FL_FN(fl__sumexp_t)(const FL_T *x, int64_t n, FL_T m, double *t, uintptr_t pf,
                                     uintptr_t pf_step) {
    double s = 0.0, st = 0.0;
    int64_t i = 0;
    int j;
    if (n >= FL_LANES) {
        double tot[FL_LANES], tt[FL_LANES];
        FL_T acc[FL_LANES], act[FL_LANES];
        for (j = 0; j < FL_LANES; j++) { tot[j] = 0.0; tt[j] = 0.0; }
        while (i + FL_LANES <= n) {
            int64_t stop = i + FL_FLUSH * FL_LANES < n ? i + FL_FLUSH * FL_LANES : n;
            for (j = 0; j < FL_LANES; j++) { acc[j] = 0; act[j] = 0; }
            for (; i + FL_LANES <= stop; i += FL_LANES) {
                if (pf) FL_PREFETCH(pf + (uintptr_t)(i / FL_LANES) * pf_step);   /* as in fl__sumexp */
                FL_LANE_LOOP
                for (j = 0; j < FL_LANES; j++) {
                    FL_T d = x[i + j] - m;
                    FL_T dc = d < FL_EXP_FLOOR ? FL_EXP_FLOOR : d;
                    FL_T e = FL_EXP_NEG(dc);
                    acc[j] += e;
                    act[j] += d < FL_EXP_FLOOR ? (FL_T)0 : e * dc;
                }
            }
            for (j = 0; j < FL_LANES; j++) { tot[j] += acc[j]; tt[j] += act[j]; }
        }
#define FL__STEP(h) for (j = 0; j < (h); j++) { tot[j] += tot[j + (h)]; tt[j] += tt[j + (h)]; }
        FL__PAIRWISE(FL__STEP);
#undef FL__STEP
        s = tot[0];
        st = tt[0];
    }
    for (; i < n; i++) {
        FL_T d = x[i] - m;
        FL_T dc = d < FL_EXP_FLOOR ? FL_EXP_FLOOR : d;
        FL_T e = FL_EXP_NEG(dc);
        s += e;
        st += d < FL_EXP_FLOOR ? (FL_T)0 : e * dc;
    }
    *t = st;
    return s;
}

/* sum x[0:n), accumulated in double lanes (float partial sums of values near the float range would
 * overflow). The lanes sum blocks of FL_SUM_BLOCK values from 0, added to their totals by TwoSum, the
 * errors kept (the first block is the totals: a short row takes no TwoSum): a lane whose total holds a
 * row's max term (1) loses its small terms' rounding in that block alone. Added to it one at a time, a
 * float64 softmax of one chunk of 2^20 values, -20 but a max of 0, had its sum off by 9e-12 and its
 * probabilities by 8e4 ulp (an accuracy audit; blocks of 64 values: 5 ulp, of 128: 9, where rows of 100
 * float64 values cost 6% more; logsumexp's sums are fl__sumexp's, flushed every 16 vectors). */
#define FL_SUM_BLOCK 128
FL_INLINE double FL_FN(fl__sum)(const FL_T *x, int64_t n) {
    double t = 0.0;
    int64_t i = 0;
    int j;
    if (n >= FL_LANES) {
        double acc[FL_LANES], err[FL_LANES], blk[FL_LANES];
        int64_t end = n > FL_SUM_BLOCK ? FL_SUM_BLOCK : n;
        for (j = 0; j < FL_LANES; j++) acc[j] = 0.0;
        for (; i + FL_LANES <= end; i += FL_LANES)          /* the first block: the totals themselves */
            FL_LANE_LOOP
            for (j = 0; j < FL_LANES; j++) acc[j] += (double)x[i + j];
        if (i + FL_LANES <= n) {
            for (j = 0; j < FL_LANES; j++) err[j] = 0.0;
            while (i + FL_LANES <= n) {
                end = n - i > FL_SUM_BLOCK ? i + FL_SUM_BLOCK : n;
                for (j = 0; j < FL_LANES; j++) blk[j] = 0.0;
                for (; i + FL_LANES <= end; i += FL_LANES)
                    FL_LANE_LOOP
                    for (j = 0; j < FL_LANES; j++) blk[j] += (double)x[i + j];
                FL_LANE_LOOP
                for (j = 0; j < FL_LANES; j++) acc[j] = fl__add_exact(acc[j], blk[j], &err[j]);
            }
            for (j = 0; j < FL_LANES; j++) acc[j] += err[j] - err[j] == 0.0 ? err[j] : 0.0;   /* (inf: 0) */
        }
#define FL__STEP(h) for (j = 0; j < (h); j++) acc[j] += acc[j + (h)]
        FL__PAIRWISE(FL__STEP);
#undef FL__STEP
        t = acc[0];
    }
    for (; i < n; i++) t += (double)x[i];
    return t;
}

/* The start of the first block of FL_SCAN values of x[0:n) that holds a candidate, a value above t (at
 * least t when at_least) or a NaN, or the start of the last, partial block (n - result < FL_SCAN): the
 * caller scans that block one value at a time. Above t: a candidate for a top-k heap whose root is t (once
 * the heap is full, candidates are rare); at least t: the first element equal to a max t, or a token tied
 * with the root. (At least t is not above the float below t: a CPU that treats subnormals as zero, DAZ,
 * reads the float below 0 as -0.) */
FL_MULTIVERSION static FL_UNUSED int64_t FL_FN(fl__scan_above)(const FL_T *x, int64_t n, FL_T t,
                                                               int at_least) {
    int64_t i = 0;
    for (; i + FL_SCAN <= n; i += FL_SCAN) {
        FL_IT any = 0;      /* integer flags, one loop: a vector OR, reduced as a tree (written as an OR
                             * over lanes, GCC reduced it in 16 scalar steps, 3.6x slower) */
        if (at_least) {
            FL_LANE_LOOP
            for (int u = 0; u < FL_SCAN; u++) any |= !(x[i + u] < t);
        } else {
            FL_LANE_LOOP
            for (int u = 0; u < FL_SCAN; u++) any |= !(x[i + u] <= t);
        }
        if (any != 0) return i;
    }
    return i;
}

/* sum w (ref - x) over x[0:n) (w = 1 when w is NULL), and *wsum = sum w: label smoothing's distances from
 * the running max (see fl__dist_merge), in double lanes, summed in blocks as fl__sum's (TwoSum, errors
 * kept; a float64 row of 4097 values from -726 to 834 at smoothing 0.999 was 67 ulp off where PyTorch's
 * was 0.2: an accuracy audit). A logit at the max adds 0 whatever its weight: PyTorch's term w (lse - x)
 * is inf for an infinite weight there, which the shift to lse (W (lse - m)) gives, where w * 0 would have
 * made it NaN. */
FL_MULTIVERSION static FL_UNUSED double FL_FN(fl__dist)(const FL_T *x, const FL_T *w, int64_t n, double ref,
                                                        double *wsum) {
    double a = 0.0, wt = 0.0;
    int64_t i = 0, end;
    int j;
    if (n >= FL_LANES) {
        double acc[FL_LANES], wa[FL_LANES], blk[FL_LANES], wb[FL_LANES], err[FL_LANES], werr[FL_LANES];
        for (j = 0; j < FL_LANES; j++) acc[j] = wa[j] = err[j] = werr[j] = 0.0;
        while (i + FL_LANES <= n) {
            end = n - i > FL_SUM_BLOCK ? i + FL_SUM_BLOCK : n;
            for (j = 0; j < FL_LANES; j++) blk[j] = wb[j] = 0.0;
            if (w) {
                for (; i + FL_LANES <= end; i += FL_LANES)
                    FL_LANE_LOOP
                    for (j = 0; j < FL_LANES; j++) {
                        double d = ref - (double)x[i + j];
                        blk[j] += FL__WDIST((double)w[i + j], d);
                        wb[j] += (double)w[i + j];
                    }
                FL_LANE_LOOP
                for (j = 0; j < FL_LANES; j++) wa[j] = fl__add_exact(wa[j], wb[j], &werr[j]);
            } else {
                for (; i + FL_LANES <= end; i += FL_LANES)
                    FL_LANE_LOOP
                    for (j = 0; j < FL_LANES; j++) blk[j] += ref - (double)x[i + j];
            }
            FL_LANE_LOOP
            for (j = 0; j < FL_LANES; j++) acc[j] = fl__add_exact(acc[j], blk[j], &err[j]);
        }
        for (j = 0; j < FL_LANES; j++) {                    /* (an inf or NaN sum: its errors are NaN) */
            acc[j] += err[j] - err[j] == 0.0 ? err[j] : 0.0;
            wa[j] += werr[j] - werr[j] == 0.0 ? werr[j] : 0.0;
        }
#define FL__STEP(h) for (j = 0; j < (h); j++) { acc[j] += acc[j + (h)]; wa[j] += wa[j + (h)]; }
        FL__PAIRWISE(FL__STEP);
#undef FL__STEP
        a = acc[0];
        wt = wa[0];
    }
    if (w) {
        for (; i < n; i++) {
            double d = ref - (double)x[i];
            a += FL__WDIST((double)w[i], d);
            wt += (double)w[i];
        }
        *wsum = wt;
    } else {
        for (; i < n; i++) a += ref - (double)x[i];
        *wsum = (double)n;
    }
    return a;
}

/* y = exp(x - m) * f (softmax: f = FL_UP / s, m the row's max; see FL_EXP_UP), or y = (x - m) - log_s
 * (log-softmax). */
FL_MULTIVERSION static FL_UNUSED void FL_FN(fl__softmax)(const FL_T *x, FL_T *y, int64_t n, FL_T m, FL_T f) {
    for (int64_t i = 0; i < n; i++) y[i] = FL_EXP_UP(x[i] - m) * f;
}

/* y = y * f, in place: softmax's terms scaled to probabilities. */
FL_MULTIVERSION static FL_UNUSED void FL_FN(fl__scale)(FL_T *y, int64_t n, FL_T f) {
    for (int64_t i = 0; i < n; i++) y[i] *= f;
}

FL_MULTIVERSION static FL_UNUSED void FL_FN(fl__log_softmax)(const FL_T *x, FL_T *y, int64_t n, FL_T m,
                                                             FL_T log_s) {
    for (int64_t i = 0; i < n; i++) y[i] = (x[i] - m) - log_s;
}

/* Log-softmax in double into a double output (float logits written as float64): x - m of float32
 * logits can pass float32's range (3e38 - -3e38) where the result fits a double, as in PyTorch. */
FL_MULTIVERSION static FL_UNUSED void FL_FN(fl__log_softmax_wide)(const FL_T *x, double *y, int64_t n,
                                                                  double m, double log_s) {
    for (int64_t i = 0; i < n; i++) y[i] = ((double)x[i] - m) - log_s;
}

/* x = softcap * tanh(x / softcap) when softcap > 0, then x = x / temperature; in place. */
FL_MULTIVERSION static FL_UNUSED void FL_FN(fl__transform)(FL_T *x, int64_t n, FL_T softcap,
                                                           FL_T temperature) {
    if (softcap > 0)
        for (int64_t i = 0; i < n; i++) x[i] = FL_SOFTCAP(x[i], softcap);
    if (temperature != 1)
        for (int64_t i = 0; i < n; i++) x[i] = x[i] / temperature;
}

/* The logsumexp state of a contiguous chunk; pf, pf_step: what to prefetch meanwhile (see fl__sumexp).
 * The chunk primitives a state is made of are inlined into one function (so are fl_ent_chunk's and
 * softmax's): a row of a few classes is a chunk, and a call a primitive cost more than the work (float32
 * logsumexp through fl_row_lse, V = 16 rows: 18.8 -> 15.6 ns a row; the same arithmetic, bit for bit). */
FL_MULTIVERSION static FL_UNUSED fl_lse_state FL_FN(fl_lse_chunk_pf)(const FL_T *x, int64_t n, uintptr_t pf,
                                                                     uintptr_t pf_step) {
    fl_lse_state st;
    int has_nan;
    FL_T m = FL_FN(fl__max_lanes)(x, n, &has_nan);
    st.m = m;
    st.s = 1.0;
    if (has_nan) { st.m = NAN; st.s = NAN; }
    else if (m == -(FL_T)INFINITY) st.s = 0.0;
    else if (m != (FL_T)INFINITY) st.s = FL_FN(fl__sumexp)(x, n, m, pf, pf_step);
    return st;
}

/* Fold a contiguous chunk into a running state: one pass when the state's max is finite and the chunk
 * does not raise it (or hold a NaN or inf); else the chunk's own state merged in (a second pass around
 * the new max the first pass found, or for a NaN or inf, fl_lse_chunk_pf's).
 * A chunk that raised the max was kept from one pass too, when by at most 64: but then the new max's term
 * was exp(cmax - m) > 1, rescaled by exp(m - cmax), so the row's largest term was 1 only within float's
 * exp error (a few 1e-8), where the two passes make it exactly 1, and the sum at least 1: log s came out
 * below 0, logsumexp below the row's max, log-probabilities above 0 and cross-entropy negative (float32
 * [0.1, 0 x 4095, 25.18] labelled 4096: -3.2e-7 where the loss is 4.75e-8; PyTorch, which subtracts the
 * row's max first, -0.0; found by a numerics audit). The chunks that raise a row's max are few (about ln
 * of the number of chunks, in random order) and in cache for the second pass.
 * *comp gathers the rounding errors of the running sum's additions (TwoSum: exact), for the caller to add
 * to s once the row is done. Where the chunks' sums repeat, so do those errors, and they grew with the
 * number of chunks: a float64 row of 4e6 zeros after a max of 20 lost 17 ulp of logsumexp over its 488
 * chunks (an accuracy audit; PyTorch 1). A chunk that raises the max hands them to s first (fl_lse_merge
 * rescales s alone). */
static inline void FL_FN(fl_lse_fold)(fl_lse_state *st, double *comp, const FL_T *x, int64_t n,
                                      uintptr_t pf, uintptr_t pf_step) {
    fl_lse_state c;
    int have = 0;                                   /* c holds the chunk's state */
    if (n <= 0) return;
    /* one pass around the state's max rounded to FL_T, when FL_T holds it within 64 (a state merged from
     * float64 work may have a max beyond float's range, or one that float rounds by more: above 2^30 its
     * spacing passes 128, and the rescaling by exp(sh - m) below would overflow) */
    if (st->m >= -FL_T_MAX && st->m <= FL_T_MAX && fabs((double)(FL_T)st->m - st->m) <= 64.0) {
        FL_T sh = (FL_T)st->m, cmax;
        double s = FL_FN(fl__sumexp_max)(x, n, sh, &cmax, pf, pf_step);
        if (s == s && (double)cmax <= st->m) {      /* (then cmax <= sh: every term's exponent <= 0) */
            if ((double)sh != st->m) s *= exp((double)sh - st->m);   /* a state merged from elsewhere */
            st->s = fl__add_exact(st->s, s, comp);
            return;
        }
        if (s == s && cmax < (FL_T)INFINITY) {   /* a finite new max, no NaN: the max pass is done */
            c.m = cmax;
            c.s = FL_FN(fl__sumexp_from)(x, n, cmax);
            have = 1;
        }
    }
    if (!have) c = FL_FN(fl_lse_chunk_pf)(x, n, pf, pf_step);
    st->s += *comp;                                 /* (fl_lse_merge rescales s alone) */
    *comp = 0.0;
    fl_lse_merge(st, &c);
}

/* The entropy state of a contiguous chunk. */
FL_MULTIVERSION static FL_UNUSED fl_ent_state FL_FN(fl_ent_chunk)(const FL_T *x, int64_t n, uintptr_t pf,
                                                                   uintptr_t pf_step) {
    fl_ent_state st;
    int has_nan;
    FL_T m = FL_FN(fl__max_lanes)(x, n, &has_nan);
    st.m = m;
    st.s = 1.0;
    st.t = 0.0;
    if (has_nan) { st.m = st.s = st.t = NAN; }
    else if (m == -(FL_T)INFINITY) st.s = 0.0;
    else if (m != (FL_T)INFINITY) st.s = FL_FN(fl__sumexp_t)(x, n, m, &st.t, pf, pf_step);
    return st;
}

/* ---------------------------------------------------------------------------------------------- */
/* Row drivers                                                                                     */
/* ---------------------------------------------------------------------------------------------- */

/* Element j of row r, transformed, in the compute type (as the chunk loaders compute it). */
static inline FL_T FL_FN(fl_row_value)(const fl_row *r, int64_t j) {
    FL_T v = (FL_T)fl__load_one(r->data + j * r->stride, r->dtype);
    /* no call for a plain row: cross-entropy reads a value a row (float32 (262144, 16), one thread, same
     * runs: 9.1-9.9 -> 8.6-9.2 ms) */
    if (!fl__row_plain(r))
        FL_FN(fl__transform)(&v, 1, (FL_T)r->softcap, (FL_T)r->temperature);
    return v;
}

/* Columns [start, start + len) of row r, transformed, as a contiguous array: the row's own memory when
 * it needs no conversion, else `buf` (at least len values) filled. */
static inline const FL_T *FL_FN(fl_row_chunk)(const fl_row *r, int64_t start, int64_t len, FL_T *buf) {
    const char *p = r->data + start * r->stride;
    int plain = fl__row_plain(r);
    int64_t i;
    if (r->stride == (int64_t)sizeof(FL_T) && r->dtype == (sizeof(FL_T) == 4 ? FL_F32 : FL_F64)) {
        if (plain) return (const FL_T *)(const void *)p;     /* (aligned: see fl_row) */
        memcpy(buf, p, (size_t)len * sizeof(FL_T));
    } else if (sizeof(FL_T) == 4 && r->stride == 2 && r->dtype == FL_F16) {
        fl_load_f16((float *)buf, (const uint16_t *)(const void *)p, len);
    } else if (sizeof(FL_T) == 4 && r->stride == 2 && r->dtype == FL_BF16) {
        fl_load_bf16((float *)buf, (const uint16_t *)(const void *)p, len);
    } else {
        for (i = 0; i < len; i++) buf[i] = (FL_T)fl__load_one(p + i * r->stride, r->dtype);
    }
    if (!plain) FL_FN(fl__transform)(buf, len, (FL_T)r->softcap, (FL_T)r->temperature);
    return buf;
}

/* Where the row's data for columns from `next` on lies, for prefetching while a chunk is computed on: 0
 * (no prefetch) unless the row is contiguous. *step: bytes of source per vector of compute values. */
static inline uintptr_t FL_FN(fl_row_prefetch)(const fl_row *r, int64_t next, uintptr_t *step) {
    *step = (uintptr_t)FL_LANES * (uintptr_t)fl_dtype_size[r->dtype];
    if (r->stride != fl_dtype_size[r->dtype]) return 0;
    return (uintptr_t)r->data + (uintptr_t)next * (uintptr_t)r->stride;
}

/* logsumexp state of columns [start, stop) of r, in chunks of `chunk` (buf holds chunk values). */
static inline fl_lse_state FL_FN(fl_row_lse)(const fl_row *r, int64_t start, int64_t stop, int64_t chunk,
                                              FL_T *buf) {
    fl_lse_state st;
    double comp = 0.0;
    fl_lse_init(&st);
    for (int64_t c0 = start; c0 < stop; c0 += chunk) {
        int64_t len = stop - c0 < chunk ? stop - c0 : chunk;
        uintptr_t step, pf = FL_FN(fl_row_prefetch)(r, c0 + len, &step);
        FL_FN(fl_lse_fold)(&st, &comp, FL_FN(fl_row_chunk)(r, c0, len, buf), len, pf, step);
    }
    st.s += comp;
    return st;
}

/* Softmax's terms of a contiguous chunk, y[i] = exp(x[i] - *my) / FL_UP (see FL_EXP_UP), where *my is the
 * larger of the chunk's max and prev (a running max: a max of FL_T values, or NaN), and their sum (the
 * return value); -1 when that max is not finite or the chunk holds a NaN (nothing is stored then). */
FL_MULTIVERSION static FL_UNUSED double FL_FN(fl__softmax_terms)(const FL_T *x, int64_t n, FL_T *y,
                                                                 double prev, FL_T *my) {
    int has_nan;
    FL_T cmax = FL_FN(fl__max_lanes)(x, n, &has_nan);
    FL_T m = (double)cmax > prev ? cmax : (FL_T)prev;
    *my = m;
    if (has_nan || !(m > -FL_INF && m < FL_INF)) return -1.0;
    for (int64_t i = 0; i < n; i++) y[i] = FL_EXP_UP(x[i] - m);
    return FL_FN(fl__sum)(y, n);
}

/* Softmax of a whole row that is one contiguous chunk, into y: fl_row_softmax_exp then fl_row_softmax in
 * one call, the same arithmetic (the terms, their sum s, then each term times FL_UP / s). 0 where the row needs the general path instead (a NaN, a max that is not finite, or a
 * scale factor below the smallest normal; y may hold the terms then, which that path overwrites).
 * float32 softmax of (409600, 16), one thread: 16.6 -> 12.6 ms; (65536, 100) 5.2 -> 4.3. */
FL_MULTIVERSION static FL_UNUSED int FL_FN(fl__softmax_row)(const FL_T *x, int64_t n, FL_T *y) {
    int has_nan;
    FL_T m = FL_FN(fl__max_lanes)(x, n, &has_nan);
    double s, f;
    if (has_nan || !(m > -FL_INF && m < FL_INF)) return 0;
    for (int64_t i = 0; i < n; i++) y[i] = FL_EXP_UP(x[i] - m);
    s = FL_FN(fl__sum)(y, n) * FL_UP;
    f = 1.0 / s * FL_UP;
    if (!(f >= (sizeof(FL_T) == 4 ? (double)FLT_MIN : DBL_MIN))) return 0;
    for (int64_t i = 0; i < n; i++) y[i] *= (FL_T)f;
    return 1;
}

/* Log-softmax of a whole row that is one contiguous chunk, into y: its logsumexp state (fl_lse_chunk_pf's)
 * and fl_row_softmax's map in one call, the same arithmetic. 0 where the row needs the general path (a
 * NaN, or a max that is not finite), with nothing stored. */
FL_MULTIVERSION static FL_UNUSED int FL_FN(fl__log_softmax_row)(const FL_T *x, int64_t n, FL_T *y) {
    int has_nan;
    FL_T m = FL_FN(fl__max_lanes)(x, n, &has_nan), log_s;
    if (has_nan || !(m > -FL_INF && m < FL_INF)) return 0;
    log_s = (FL_T)fl__log(FL_FN(fl__sumexp)(x, n, m, 0, 0));
    for (int64_t i = 0; i < n; i++) y[i] = (x[i] - m) - log_s;
    return 1;
}

/* Softmax's first pass over a contiguous chunk: folds it into the running state *st, whose max becomes *my,
 * and stores its terms y[i] = exp(x[i] - *my) / FL_UP, whose sum the state takes (times FL_UP, exactly).
 * Where that max is not finite (a NaN or +inf: the row's softmax is NaN; all -inf so far: the chunk's
 * probabilities are 0), nothing is stored and the chunk's state is fl_lse_chunk_pf's. *comp: the running
 * sum's rounding errors, as fl_lse_fold gathers them. */
static inline void FL_FN(fl_softmax_fold)(fl_lse_state *st, double *comp, const FL_T *x, int64_t n, FL_T *y,
                                          FL_T *my) {
    double t = FL_FN(fl__softmax_terms)(x, n, y, st->m, my);
    if (t >= 0 && st->m == (double)*my) {         /* the max stays: the sum's error is kept */
        st->s = fl__add_exact(st->s, t * FL_UP, comp);
        return;
    }
    st->s += *comp;                               /* the max moves (or the row is not finite): s alone */
    *comp = 0.0;
    if (t < 0) {
        fl_lse_state c = FL_FN(fl_lse_chunk_pf)(x, n, 0, 0);
        fl_lse_merge(st, &c);
        return;
    }
    /* an empty state (a row's first chunk) scales by exp(-inf) = 0: no call */
    st->s = (st->s == 0.0 ? 0.0 : st->s * exp(st->m - (double)*my)) + t * FL_UP;
    st->m = *my;
}

/* Entropy state of columns [start, stop) of r. */
static inline fl_ent_state FL_FN(fl_row_entropy)(const fl_row *r, int64_t start, int64_t stop,
                                                 int64_t chunk, FL_T *buf) {
    fl_ent_state st, c;
    double err[2] = {0.0, 0.0};
    fl_ent_init(&st);
    for (int64_t c0 = start; c0 < stop; c0 += chunk) {
        int64_t len = stop - c0 < chunk ? stop - c0 : chunk;
        uintptr_t step, pf = FL_FN(fl_row_prefetch)(r, c0 + len, &step);
        c = FL_FN(fl_ent_chunk)(FL_FN(fl_row_chunk)(r, c0, len, buf), len, pf, step);
        fl__ent_fold(&st, err, &c);
    }
    fl__ent_done(&st, err);
    return st;
}

/* Cross-entropy pass over columns [start, stop): the logsumexp state, and, when dist is not NULL, label
 * smoothing's distance sum *dist = sum w[c] (m - x[c]) from the state's max m, with *wsum = sum w[c]
 * (x transformed; w = 1 when w is NULL; see fl__dist_merge). */
static inline fl_lse_state FL_FN(fl_row_ce)(const fl_row *r, int64_t start, int64_t stop, int64_t chunk,
                                             const FL_T *w, double *dist, double *wsum, FL_T *buf) {
    fl_lse_state st;
    double m0, d, cw, comp = 0.0, derr = 0.0;
    fl_lse_init(&st);
    if (dist) *dist = *wsum = 0.0;
    for (int64_t c0 = start; c0 < stop; c0 += chunk) {
        int64_t len = stop - c0 < chunk ? stop - c0 : chunk;
        uintptr_t step, pf = FL_FN(fl_row_prefetch)(r, c0 + len, &step);
        const FL_T *x = FL_FN(fl_row_chunk)(r, c0, len, buf);
        m0 = st.m;
        FL_FN(fl_lse_fold)(&st, &comp, x, len, pf, step);
        if (dist) {
            d = FL_FN(fl__dist)(x, w ? w + c0 : NULL, len, st.m > -FL_INF && st.m < FL_INF ? st.m : 0.0,
                                &cw);
            fl__dist_fold(dist, wsum, &derr, m0, d, cw, st.m);
        }
    }
    st.s += comp;
    if (dist) *dist = fl__dist_done(*dist, derr);
    return st;
}

/* Writes y[0:n) to out (any dtype, any stride in bytes), converting. */
static inline void FL_FN(fl_store)(char *out, int64_t stride, int dtype, const FL_T *y, int64_t n) {
    int64_t i;
    if (dtype == (sizeof(FL_T) == 4 ? FL_F32 : FL_F64) && stride == (int64_t)sizeof(FL_T)) {
        memcpy(out, y, (size_t)n * sizeof(FL_T));
    } else if (sizeof(FL_T) == 4 && stride == 2 && dtype == FL_F16) {
        fl_store_f16((uint16_t *)(void *)out, (const float *)y, n);
    } else if (sizeof(FL_T) == 4 && stride == 2 && dtype == FL_BF16) {
        fl_store_bf16((uint16_t *)(void *)out, (const float *)y, n);
    } else {
        for (i = 0; i < n; i++) fl__store_one(out + i * stride, dtype, (double)y[i]);
    }
}

/* Softmax (log_ == 0) or log-softmax of a row that is one chunk (r->n values at most a chunk), of any
 * dtype, transform, layout and output, in one call where the row allows it: the row as fl_row_chunk gives
 * it (in place, or converted and transformed into buf), fl__softmax_row or fl__log_softmax_row's
 * arithmetic (fl_row_softmax's two passes, bit for bit), into out when it is a contiguous row of the
 * compute type, else into ybuf and stored. 0 where the row needs the general path (nothing stored, or
 * terms the general path overwrites; and a log-softmax of float logits into float64, which that path
 * forms in double). One thread: float16 log-softmax of (16384, 100) 2.3 -> 1.9 ms; float32 with softcap
 * 4.8 -> 2.9. */
static inline int FL_FN(fl_row_map_once)(const fl_row *r, int log_, char *out, int64_t out_stride,
                                         int out_dtype, FL_T *buf, FL_T *ybuf) {
    const FL_T *x;
    int direct = out_dtype == (sizeof(FL_T) == 4 ? FL_F32 : FL_F64) && out_stride == (int64_t)sizeof(FL_T);
    FL_T *y = direct ? (FL_T *)(void *)out : ybuf;
    int ok;
    if (log_ && sizeof(FL_T) == 4 && out_dtype == FL_F64) return 0;    /* in double: fl_row_softmax's */
    x = FL_FN(fl_row_chunk)(r, 0, r->n, buf);
    ok = log_ ? FL_FN(fl__log_softmax_row)(x, r->n, y) : FL_FN(fl__softmax_row)(x, r->n, y);
    if (ok && !direct) FL_FN(fl_store)(out, out_stride, out_dtype, y, r->n);
    return ok;
}

/* Short rows, a lane a row. A row of a few classes is less than a vector or two: worked a row at a time,
 * its max and sum are a vector each, folded across lanes, plus a scalar tail, and fixed costs a row
 * dominate (float32 logsumexp of V = 16 rows: 50 ns a row, V = 10: 40, V = 24: 57). Below FL_SHORT
 * values (two vectors), rows go FL_TILE at a time through a tile of them laid out by columns,
 * t[j * FL_TILE + i] = value j of row i, and each lane of the vector loops works on a row: no folds
 * across lanes, no tails. float32 (262144, V), one thread, logsumexp: V = 16 12.9 -> 4.5 ms, V = 8 10.0
 * -> 2.9, V = 24 19.3 -> 9.8; log_softmax V = 16 12.7 -> 5.9; cross_entropy 16.7 -> 7.2; float64 V = 8
 * logsumexp 13.4 -> 4.5. At two whole vectors a row at a time is as fast, and from there the row's fold
 * adds its terms in float lanes, which the tile would have to copy to give the same bits. */

/* Rows [0, nr) of a tile (nr <= FL_TILE) from n contiguous values each, row i at x + i * ld (a C-order
 * block's rows: read along rows, stored along columns). Meanwhile the rows of the next tile are
 * prefetched, a row's first and last lines with each row copied (a prefetch instruction never faults): the
 * tile's work reads no memory, and the hardware's prefetcher alone left the next copy waiting (float32
 * (409600, 16), one thread: logsumexp 10.1 -> 6.0 ms). */
FL_MULTIVERSION static FL_UNUSED void FL_FN(fl__tile_copy)(const FL_T *x, int64_t ld, int64_t nr, int64_t n,
                                                          FL_T *t) {
    uintptr_t next = (uintptr_t)x + (uintptr_t)(nr * ld) * sizeof(FL_T), step = (uintptr_t)ld * sizeof(FL_T);
    for (int64_t i = 0; i < nr; i++) {
        FL_PREFETCH(next + (uintptr_t)i * step);
        FL_PREFETCH(next + (uintptr_t)i * step + (uintptr_t)(n - 1) * sizeof(FL_T));
        for (int64_t j = 0; j < n; j++) t[j * FL_TILE + i] = x[i * ld + j];
    }
}

/* The same from rows laid out by columns: value j of row i at x[j * ld + i] (a transposed or Fortran-order
 * array, read in place: a column of a tile's rows is a run of memory), prefetching the next tile's runs. */
FL_MULTIVERSION static FL_UNUSED void FL_FN(fl__tile_copy_cols)(const FL_T *x, int64_t ld, int64_t nr,
                                                               int64_t n, FL_T *t) {
    for (int64_t j = 0; j < n; j++) {
        uintptr_t next = (uintptr_t)(x + j * ld) + (uintptr_t)nr * sizeof(FL_T);
        for (uintptr_t p = 0; p < (uintptr_t)nr * sizeof(FL_T); p += 64) FL_PREFETCH(next + p);
        for (int64_t i = 0; i < nr; i++) t[j * FL_TILE + i] = x[j * ld + i];
    }
}

/* Rows r[0], ..., r[nr - 1] (rows of r->n values, row i at r->data + i * row_stride with temperature[i];
 * any dtype and strides, transformed) as a tile; rows nr .. FL_TILE - 1 are 0, so that every lane
 * computes on numbers. buf: r->n values. */
static inline void FL_FN(fl_tile_load)(const fl_row *r, int64_t row_stride, const double *temperature,
                                      int64_t nr, FL_T *t, FL_T *buf) {
    const int64_t sz = (int64_t)sizeof(FL_T);
    int64_t n = r->n, i, j;
    int plain = r->dtype == (sz == 4 ? FL_F32 : FL_F64) && r->softcap == 0.0;
    for (i = 0; plain && i < nr; i++) plain = temperature[i] == 1.0;
    if (plain && r->stride == sz && row_stride % sz == 0) {
        FL_FN(fl__tile_copy)((const FL_T *)(const void *)r->data, row_stride / sz, nr, n, t);
    } else if (plain && row_stride == sz && r->stride % sz == 0) {
        FL_FN(fl__tile_copy_cols)((const FL_T *)(const void *)r->data, r->stride / sz, nr, n, t);
    } else {
        for (i = 0; i < nr; i++) {
            fl_row ri = *r;
            const FL_T *x;
            ri.data = r->data + i * row_stride;
            ri.temperature = temperature[i];
            x = FL_FN(fl_row_chunk)(&ri, 0, n, buf);
            for (j = 0; j < n; j++) t[j * FL_TILE + i] = x[j];
        }
    }
    for (j = 0; j < n; j++)
        for (i = nr; i < FL_TILE; i++) t[j * FL_TILE + i] = 0;
}

/* The logsumexp states of the FL_TILE rows of a tile of n columns, as fl_lse_chunk_pf gives them for each
 * row, bit for bit: NaN for a NaN, (+inf, 1) for a +inf, (-inf, 0) for all -inf, and the sum of exp(x - m)
 * in its order, in double: the first FL_LANES terms (when there are as many) pairwise as fl__sumexp
 * combines its lanes, the rest in column order (its tail). So every operation, whichever path it takes to
 * a row's state, takes the same log of the same sum. With tt (entropy), also fl_ent_chunk's
 * t = sum exp(x - m) (x - m), its terms formed in FL_T as fl__sumexp_t forms them (0 for a -inf) and added
 * in the same order (NaN with the row's NaN; 0 where the max is not finite, which fl_ent_result ignores). */
FL_INLINE_OPT void FL_FN(fl__tile_states)(const FL_T *t, int64_t n, double *m, double *s, double *tt,
                                          const int want_t) {
    int64_t i0, j;
    int l;
    for (i0 = 0; i0 < FL_TILE; i0 += FL_LANES) {
        FL_T mx[FL_LANES], nan[FL_LANES], sh[FL_LANES];
        double tot[FL_LANES], tot_t[FL_LANES];
        for (l = 0; l < FL_LANES; l++) { mx[l] = -(FL_T)INFINITY; nan[l] = 0; tot[l] = 0.0; tot_t[l] = 0.0; }
        for (j = 0; j < n; j++) {
            const FL_T *c = t + j * FL_TILE + i0;
            FL_LANE_LOOP
            for (l = 0; l < FL_LANES; l++) {
                FL_T v = c[l];
                mx[l] = v > mx[l] ? v : mx[l];
                nan[l] = v == v ? nan[l] : v;
            }
        }
        /* rows whose max is not finite sum around 0 instead: numbers, replaced below */
        for (l = 0; l < FL_LANES; l++) sh[l] = mx[l] > -(FL_T)INFINITY && mx[l] < (FL_T)INFINITY ? mx[l] : 0;
        j = 0;
        if (n >= FL_LANES) {
            double e[FL_LANES][FL_LANES], et[FL_LANES][FL_LANES];      /* [k][l]: row l's term k */
            for (j = 0; j < FL_LANES; j++) {
                const FL_T *c = t + j * FL_TILE + i0;
                FL_LANE_LOOP
                for (l = 0; l < FL_LANES; l++) {
                    FL_T d = c[l] - sh[l], ej = FL_EXP_NEG(d);    /* (it clamps d at FL_EXP_FLOOR) */
                    e[j][l] = (double)ej;
                    if (want_t) et[j][l] = (double)(d < FL_EXP_FLOOR ? (FL_T)0 : ej * d);
                }
            }
#define FL__STEP(h) for (int k = 0; k < (h); k++) {                      \
                FL_LANE_LOOP                                                    \
                for (l = 0; l < FL_LANES; l++) {                                \
                    e[k][l] += e[k + (h)][l];                                   \
                    if (want_t) et[k][l] += et[k + (h)][l];                     \
                }                                                               \
            }
            FL__PAIRWISE(FL__STEP);
#undef FL__STEP
            for (l = 0; l < FL_LANES; l++) { tot[l] = e[0][l]; if (want_t) tot_t[l] = et[0][l]; }
        }
        for (; j < n; j++) {
            const FL_T *c = t + j * FL_TILE + i0;
            FL_LANE_LOOP
            for (l = 0; l < FL_LANES; l++) {
                FL_T d = c[l] - sh[l], ej = FL_EXP_NEG(d);    /* (it clamps d at FL_EXP_FLOOR) */
                tot[l] += (double)ej;
                if (want_t) tot_t[l] += (double)(d < FL_EXP_FLOOR ? (FL_T)0 : ej * d);
            }
        }
        for (l = 0; l < FL_LANES; l++) {
            int finite = mx[l] > -(FL_T)INFINITY && mx[l] < (FL_T)INFINITY;
            double sv = mx[l] == (FL_T)INFINITY ? 1.0 : mx[l] == -(FL_T)INFINITY ? 0.0 : tot[l];
            m[i0 + l] = nan[l] == nan[l] ? (double)mx[l] : NAN;
            s[i0 + l] = nan[l] == nan[l] ? sv : NAN;
            if (want_t) tt[i0 + l] = nan[l] == nan[l] ? (finite ? tot_t[l] : 0.0) : NAN;
        }
    }
}

FL_MULTIVERSION static FL_UNUSED void FL_FN(fl__lse_tile)(const FL_T *t, int64_t n, double *m, double *s) {
    FL_FN(fl__tile_states)(t, n, m, s, NULL, 0);
}

/* The entropy states (m, s, t) of a tile's rows: fl_ent_chunk's, bit for bit. */
FL_MULTIVERSION static FL_UNUSED void FL_FN(fl__ent_tile)(const FL_T *t, int64_t n, double *m, double *s,
                                                          double *tt) {
    FL_FN(fl__tile_states)(t, n, m, s, tt, 1);
}

/* Log-softmax of rows [0, nr) of n contiguous values each, row i at x + i * ldx, into y + i * ldy, given
 * their states' maxes m and the logs of their sums ls: fl__log_softmax's arithmetic, a tile of rows in one
 * call. */
FL_MULTIVERSION static FL_UNUSED void FL_FN(fl__log_softmax_rows)(const FL_T *x, int64_t ldx, FL_T *y,
                                                                  int64_t ldy, int64_t nr, int64_t n,
                                                                  const double *m, const double *ls) {
    for (int64_t i = 0; i < nr; i++) {
        FL_T mi = (FL_T)m[i], li = (FL_T)ls[i];
        for (int64_t j = 0; j < n; j++) y[i * ldy + j] = (x[i * ldx + j] - mi) - li;
    }
}

/* Softmax of the same rows given their states (m, s): fl__softmax's arithmetic, with fl_row_softmax's factor
 * FL_UP / s, a tile of rows in one call. */
FL_MULTIVERSION static FL_UNUSED void FL_FN(fl__softmax_rows)(const FL_T *x, int64_t ldx, FL_T *y,
                                                              int64_t ldy, int64_t nr, int64_t n,
                                                              const double *m, const double *s) {
    for (int64_t i = 0; i < nr; i++) {
        FL_T mi = (FL_T)m[i], f = (FL_T)(FL_UP / s[i]);
        for (int64_t j = 0; j < n; j++) y[i * ldy + j] = FL_EXP_UP(x[i * ldx + j] - mi) * f;
    }
}

/* Softmax's first pass over columns [start, stop) of r: their logsumexp state, with the terms stored,
 * y[c - start] = exp(x[c] - my[k]) / FL_UP for the columns c of the k-th chunk (see fl_softmax_fold).
 * fl_row_softmax scales them to probabilities once the row's state is known: softmax computes one exp per
 * logit, as PyTorch's does. */
static inline fl_lse_state FL_FN(fl_row_softmax_exp)(const fl_row *r, int64_t start, int64_t stop,
                                                     int64_t chunk, FL_T *y, FL_T *my, FL_T *buf) {
    fl_lse_state st;
    double comp = 0.0;
    fl_lse_init(&st);
    for (int64_t c0 = start, k = 0; c0 < stop; c0 += chunk, k++) {
        int64_t len = stop - c0 < chunk ? stop - c0 : chunk;
        FL_FN(fl_softmax_fold)(&st, &comp, FL_FN(fl_row_chunk)(r, c0, len, buf), len, y + (c0 - start),
                               &my[k]);
    }
    st.s += comp;
    return st;
}

/* Softmax (log_ == 0) or log-softmax of columns [start, stop) of r, given the row's finished logsumexp
 * state, written to out (element `start` of the row at out + start * out_stride). A row whose state is
 * not finite (all -inf, +inf or NaN seen) is all NaN, like PyTorch. buf and ybuf hold chunk values.
 * my: NULL, or (softmax) the maxes of fl_row_softmax_exp, whose terms are in out when it has the compute
 * type and is contiguous (fl_row_softmax_exp wrote there), else in e (e[c - start] for column c): then a
 * chunk's probabilities are its terms times FL_UP exp(my[k] - m) / s (a product of normal numbers, rounded
 * once if it is subnormal), where that factor is a normal number: in every chunk but all -inf ones and
 * those before a max higher by about 65 (664 in double), which compute exp(x - m) / s from the logits (as
 * log-softmax and a streamed slice do). */
static inline void FL_FN(fl_row_softmax)(const fl_row *r, int64_t start, int64_t stop, int64_t chunk,
                                          const fl_lse_state *st, int log_, const FL_T *my, FL_T *e,
                                          char *out, int64_t out_stride, int out_dtype, FL_T *buf,
                                          FL_T *ybuf) {
    int finite = st->m > -FL_INF && st->m < FL_INF;
    /* an output of the compute type, contiguous, is written in place; any other goes through ybuf (or e) */
    int direct = out_dtype == (sizeof(FL_T) == 4 ? FL_F32 : FL_F64) && out_stride == (int64_t)sizeof(FL_T);
    /* the log-softmax of float logits into float64: computed in double (fl__log_softmax_wide) */
    int wide = log_ && finite && sizeof(FL_T) == 4 && out_dtype == FL_F64;
    FL_T m = (FL_T)st->m;
    for (int64_t c0 = start, k = 0; c0 < stop; c0 += chunk, k++) {
        int64_t len = stop - c0 < chunk ? stop - c0 : chunk, i;
        FL_T *y = direct ? (FL_T *)(void *)(out + c0 * out_stride) : my ? e + (c0 - start) : ybuf;
        double f = 0.0;
        if (wide) {
            const FL_T *x = FL_FN(fl_row_chunk)(r, c0, len, buf);
            double ls = fl__log(st->s);
            if (out_stride == 8) {
                FL_FN(fl__log_softmax_wide)(x, (double *)(void *)(out + c0 * out_stride), len, st->m, ls);
            } else {
                for (i = 0; i < len; i++)
                    fl__store_one(out + (c0 + i) * out_stride, FL_F64, ((double)x[i] - st->m) - ls);
            }
            continue;
        }
        if (my && finite)           /* 0: all -inf chunk; exp(0) = 1 exactly, the common case: no call */
            f = ((double)my[k] == st->m ? 1.0 : exp((double)my[k] - st->m)) / st->s * FL_UP;
        if (!finite) {
            for (i = 0; i < len; i++) y[i] = (FL_T)NAN;
        } else if (f >= (sizeof(FL_T) == 4 ? (double)FLT_MIN : DBL_MIN)) {
            FL_FN(fl__scale)(y, len, (FL_T)f);
        } else {
            const FL_T *x = FL_FN(fl_row_chunk)(r, c0, len, buf);
            if (log_) FL_FN(fl__log_softmax)(x, y, len, m, (FL_T)fl__log(st->s));
            else FL_FN(fl__softmax)(x, y, len, m, (FL_T)(FL_UP / st->s));
        }
        if (!direct) FL_FN(fl_store)(out + c0 * out_stride, out_stride, out_dtype, y, len);
    }
}

/* Softmax (log_ == 0) or log-softmax of a tile's rows [0, nr) from the tile itself, given their states
 * (m, s), into out (row i at out + i * out_row, any dtype, columns out_col bytes apart): each row is a
 * row of the compute type, FL_TILE values apart, for fl_row_softmax (its arithmetic, its output paths, its
 * NaN rows). For rows that are not plain (a transform, another layout or output dtype), which the tile
 * holds transformed. xbuf, ybuf: n values each. */
static inline void FL_FN(fl_tile_map)(const FL_T *t, int64_t n, int64_t nr, const double *m, const double *s,
                                     int log_, char *out, int64_t out_row, int64_t out_col, int out_dtype,
                                     FL_T *xbuf, FL_T *ybuf) {
    for (int64_t i = 0; i < nr; i++) {
        fl_row ri = {(const char *)(const void *)(t + i), n, FL_TILE * (int64_t)sizeof(FL_T),
                     sizeof(FL_T) == 4 ? FL_F32 : FL_F64, 1.0, 0.0};
        fl_lse_state st;
        st.m = m[i];
        st.s = s[i];
        FL_FN(fl_row_softmax)(&ri, 0, n, n, &st, log_, NULL, NULL, out + i * out_row, out_col, out_dtype,
                              xbuf, ybuf);
    }
}

/* The index of the first candidate in x[0:n) (see fl__scan_above), which the caller knows is there (n - 1
 * if it is not: never past x). With t = +inf, not at_least, it finds the first NaN; with a max t of x (no
 * NaN in x), at_least, the first element equal to it. */
static inline int64_t FL_FN(fl__first_above)(const FL_T *x, int64_t n, FL_T t, int at_least) {
    int64_t i = FL_FN(fl__scan_above)(x, n, t, at_least);
    while (i + 1 < n && (at_least ? x[i] < t : x[i] <= t)) i++;
    return i;
}

/* Index of the largest element of r (transformed), the lowest on ties; the first NaN if there is one
 * (like NumPy and PyTorch); 0 for a row of all -inf. */
static inline int64_t FL_FN(fl_row_argmax)(const fl_row *r, int64_t chunk, FL_T *buf) {
    FL_T best = -(FL_T)INFINITY, m;
    int64_t best_i = 0, at;
    int has_nan;
    for (int64_t c0 = 0; c0 < r->n; c0 += chunk) {
        int64_t len = r->n - c0 < chunk ? r->n - c0 : chunk;
        const FL_T *x = FL_FN(fl_row_chunk)(r, c0, len, buf);
        for (int64_t o = 0; o < len; o += FL_ARGMAX_SPAN) {      /* (a chunk may be the whole row) */
            int64_t l = len - o < FL_ARGMAX_SPAN ? len - o : FL_ARGMAX_SPAN;
            at = FL_FN(fl__argmax_lanes)(x + o, l, &m, &has_nan);
            if (has_nan) return c0 + o + FL_FN(fl__first_above)(x + o, l, (FL_T)INFINITY, 0);
            if (m > best) {
                best = m;
                best_i = c0 + o + at;
            }
        }
    }
    return best_i;
}

/* One pass for an evaluation summary of a row: its entropy state (which holds the logsumexp state too, so
 * cross-entropy needs only the label's logit) and its argmax (as fl_row_argmax). */
static inline fl_ent_state FL_FN(fl_row_stats)(const fl_row *r, int64_t chunk, FL_T *buf, int64_t *argmax) {
    fl_ent_state st, c;
    double err[2] = {0.0, 0.0};
    FL_T best = -(FL_T)INFINITY;
    int64_t best_i = 0;
    int found_nan = 0;
    fl_ent_init(&st);
    for (int64_t c0 = 0; c0 < r->n; c0 += chunk) {
        int64_t len = r->n - c0 < chunk ? r->n - c0 : chunk;
        uintptr_t step, pf = FL_FN(fl_row_prefetch)(r, c0 + len, &step);
        const FL_T *x = FL_FN(fl_row_chunk)(r, c0, len, buf);
        c = FL_FN(fl_ent_chunk)(x, len, pf, step);
        fl__ent_fold(&st, err, &c);
        if (found_nan) continue;
        if (c.m != c.m) {                                   /* the first NaN wins */
            best_i = c0 + FL_FN(fl__first_above)(x, len, (FL_T)INFINITY, 0);
            found_nan = 1;
        } else if ((FL_T)c.m > best) {
            best = (FL_T)c.m;
            best_i = c0 + FL_FN(fl__first_above)(x, len, best, 1);
        }
    }
    *argmax = best_i;
    fl__ent_done(&st, err);
    return st;
}

/* top-k: a heap of the k best (value, index) pairs seen, its root the worst of them. "Better" orders
 * NaN above everything (PyTorch's topk), then larger values, then lower indices. */
FL_INLINE int FL_FN(fl__better)(FL_T a, int64_t ia, FL_T b, int64_t ib) {
    if (a != a) return b == b || ia < ib;
    if (b != b) return 0;
    return a > b || (a == b && ia < ib);
}

static inline void FL_FN(fl__sift_down)(FL_T *hv, int64_t *hi, int64_t k, int64_t p) {
    for (;;) {
        int64_t c = 2 * p + 1, w = p;
        if (c < k && FL_FN(fl__better)(hv[w], hi[w], hv[c], hi[c])) w = c;
        if (c + 1 < k && FL_FN(fl__better)(hv[w], hi[w], hv[c + 1], hi[c + 1])) w = c + 1;
        if (w == p) return;
        FL_T tv = hv[p]; hv[p] = hv[w]; hv[w] = tv;
        int64_t ti = hi[p]; hi[p] = hi[w]; hi[w] = ti;
        p = w;
    }
}

/* Adds (v, i) to the heap hv/hi of *size entries, below its capacity: sift up. */
static inline void FL_FN(fl__heap_push)(FL_T *hv, int64_t *hi, int64_t *size, FL_T v, int64_t i) {
    int64_t p = (*size)++;
    hv[p] = v; hi[p] = i;
    while (p > 0 && FL_FN(fl__better)(hv[(p - 1) / 2], hi[(p - 1) / 2], hv[p], hi[p])) {
        int64_t q = (p - 1) / 2;
        FL_T tv = hv[p]; hv[p] = hv[q]; hv[q] = tv;
        int64_t ti = hi[p]; hi[p] = hi[q]; hi[q] = ti;
        p = q;
    }
}

/* A key that orders values as fl__better does: a larger key, a larger value; every NaN the largest key;
 * -0 and +0 (equal values) the same key. */
FL_INLINE FL_UT FL_FN(fl__topk_key)(FL_T v) {
    FL_T z = v + (FL_T)0;                              /* -0 + 0 = +0 */
    FL_UT u, sign = (FL_UT)1 << (8 * sizeof(FL_T) - 1);
    memcpy(&u, &z, sizeof u);
    u ^= ((FL_UT)0 - (u >> (8 * sizeof(FL_T) - 1))) | sign;    /* negative: all bits flipped; else the sign's */
    return v != v ? (FL_UT)~(FL_UT)0 : u;
}

/* The k best elements of r by selection (for k a large part of the row): the k-th best key is found a
 * byte at a time from the top, a pass over the row a byte (a histogram of the byte's values among the keys
 * that share the bytes above it with the k-th best, as PyTorch's GPU radix select); a last pass gathers
 * the k best in index order, and they are sorted by key, stably (ties stay in index order), a byte at a
 * time from the bottom (hv/hi the other buffer). Every step costs O(n) or O(k) whatever the values' order,
 * where a heap's replacements and pops cost log k each, mostly mispredicted branches. float32, one thread,
 * heap -> selection: (8192, 1000), k = 500: 731 -> 366 ms; (512, 32000), k = 2000: 538 -> 354; (64,
 * 128256), k = 5000: 215 -> 169, k = 10000: 375 -> 182 (torch.topk 370, 285, 127, 165). The keys are also
 * the sampler's wide rows' (_sample.pyx). Arguments as fl_row_topk's (k >= 1). */
static FL_UNUSED void FL_FN(fl__topk_select)(const fl_row *r, int64_t k, int64_t chunk, FL_T *buf, FL_T *hv,
                                              int64_t *hi, FL_T *out_v, int64_t *out_i, fl_lse_state *st) {
    const int W = 8 * (int)sizeof(FL_T);
    int64_t hist[4][256];     /* four histograms, summed: repeated bins do not wait on one counter */
    int64_t need = k, m = 0, eq = 0, i, c0, b;
    FL_UT prefix = 0;
    int shift = W, s;
    double comp = 0.0;
    if (st) fl_lse_init(st);
    for (s = W - 8;; s -= 8) {
        memset(hist, 0, sizeof hist);
        for (c0 = 0; c0 < r->n; c0 += chunk) {
            int64_t len = r->n - c0 < chunk ? r->n - c0 : chunk;
            const FL_T *x = FL_FN(fl_row_chunk)(r, c0, len, buf);
            if (s == W - 8) {
                if (st) {
                    uintptr_t step, pf = FL_FN(fl_row_prefetch)(r, c0 + len, &step);
                    FL_FN(fl_lse_fold)(st, &comp, x, len, pf, step);
                }
                for (i = 0; i < len; i++) hist[i & 3][FL_FN(fl__topk_key)(x[i]) >> s]++;
            } else {
                for (i = 0; i < len; i++) {
                    FL_UT key = FL_FN(fl__topk_key)(x[i]);
                    if (key >> shift == prefix) hist[i & 3][(key >> s) & 255]++;
                }
            }
        }
        for (b = 0; b < 256; b++) hist[0][b] += hist[1][b] + hist[2][b] + hist[3][b];
        for (b = 255; hist[0][b] < need; b--) need -= hist[0][b];    /* the byte of the k-th best */
        prefix = (FL_UT)(prefix << 8 | (FL_UT)b);      /* (a shift of W - 8 bits at most) */
        shift = s;
        if (hist[0][b] == need || s == 0) break;       /* all that share the bytes so far, or the whole key */
    }
    if (st) st->s += comp;
    /* the k best, in index order: keys above the prefix, and the first `need` that share it; where k is a
     * large part of the row, each value is written at m, taken or not (no branch, which would be
     * mispredicted about as often as k / n) */
    for (c0 = 0; c0 < r->n && m < k; c0 += chunk) {
        int64_t len = r->n - c0 < chunk ? r->n - c0 : chunk;
        const FL_T *x = FL_FN(fl_row_chunk)(r, c0, len, buf);
        if (k * 4 > r->n) {
            for (i = 0; i < len && m < k; i++) {
                FL_UT top = FL_FN(fl__topk_key)(x[i]) >> shift;
                int64_t tied = top == prefix;
                out_v[m] = x[i]; out_i[m] = c0 + i;
                m += (top > prefix) | (tied & (eq < need));
                eq += tied;
            }
        } else {
            for (i = 0; i < len; i++) {
                FL_UT top = FL_FN(fl__topk_key)(x[i]) >> shift;
                if (top > prefix || (top == prefix && eq++ < need)) {
                    out_v[m] = x[i]; out_i[m] = c0 + i; m++;
                }
            }
        }
    }
    /* stable sort by key, largest first: a byte at a time from the lowest (a byte's order reversed) */
    {
        FL_T *sv = out_v, *dv = hv, *tv;
        int64_t *si = out_i, *di = hi, *ti;
        for (s = 0; s < W; s += 8) {
            int64_t cnt[256], pos = 0;
            memset(cnt, 0, sizeof cnt);
            for (i = 0; i < k; i++) cnt[255 - (int)((FL_FN(fl__topk_key)(sv[i]) >> s) & 255)]++;
            for (b = 0; b < 256 && cnt[b] == 0; b++) {}
            if (cnt[b] == k) continue;                 /* one byte value for all: the order stands */
            for (b = 0; b < 256; b++) { int64_t c = cnt[b]; cnt[b] = pos; pos += c; }
            for (i = 0; i < k; i++) {
                int64_t p = cnt[255 - (int)((FL_FN(fl__topk_key)(sv[i]) >> s) & 255)]++;
                dv[p] = sv[i]; di[p] = si[i];
            }
            tv = sv; sv = dv; dv = tv;
            ti = si; si = di; di = ti;
        }
        if (sv != out_v) {
            memcpy(out_v, sv, (size_t)k * sizeof(FL_T));
            memcpy(out_i, si, (size_t)k * sizeof(int64_t));
        }
    }
}

/* The k best elements of r (transformed; 0 <= k <= r->n), best first, into out_v and out_i. hv and hi are
 * scratch space of k values; buf holds chunk values. When st is not NULL, the row's logsumexp state is
 * folded in the same pass (for log-probabilities; k = 0 computes only that). A heap of the k best seen
 * where k is a small part of the row (most values are then skipped in vector code), else selection
 * (fl__topk_select). */
static inline void FL_FN(fl_row_topk)(const fl_row *r, int64_t k, int64_t chunk, FL_T *buf, FL_T *hv,
                                      int64_t *hi, FL_T *out_v, int64_t *out_i, fl_lse_state *st) {
    int64_t size = 0, i, c0;
    double comp = 0.0;
    if (k > 0 && k * FL_TOPK_SELECT > r->n + FL_TOPK_SELECT_COST) {
        FL_FN(fl__topk_select)(r, k, chunk, buf, hv, hi, out_v, out_i, st);
        return;
    }
    if (st) fl_lse_init(st);
    for (c0 = 0; c0 < r->n; c0 += chunk) {
        int64_t len = r->n - c0 < chunk ? r->n - c0 : chunk;
        const FL_T *x = FL_FN(fl_row_chunk)(r, c0, len, buf);
        if (st) {
            uintptr_t step, pf = FL_FN(fl_row_prefetch)(r, c0 + len, &step);
            FL_FN(fl_lse_fold)(st, &comp, x, len, pf, step);
        }
        if (k <= 0) continue;                          /* no heap to fill (and hv[0] to read) */
        i = 0;
        for (; i < len && size < k; i++) FL_FN(fl__heap_push)(hv, hi, &size, x[i], c0 + i);
        /* Later elements have higher indices, so they enter only if strictly better than the root: above
         * it, or a NaN while it is not one (a heap of NaNs admits nothing more). Blocks without such a
         * value are skipped in vector code. */
        while (i < len && hv[0] == hv[0]) {
            int64_t end;
            i += FL_FN(fl__scan_above)(x + i, len - i, hv[0], 0);
            end = len - i < FL_SCAN ? len : i + FL_SCAN;
            for (; i < end; i++) {
                FL_T v = x[i];
                if (v > hv[0] || (v != v && hv[0] == hv[0])) {
                    hv[0] = v; hi[0] = c0 + i;
                    FL_FN(fl__sift_down)(hv, hi, k, 0);
                }
            }
        }
    }
    if (st) st->s += comp;
    /* Pop the worst to the back: out is best first. */
    for (i = size - 1; i >= 0; i--) {
        out_v[i] = hv[0]; out_i[i] = hi[0];
        hv[0] = hv[i]; hi[0] = hi[i];
        FL_FN(fl__sift_down)(hv, hi, i, 0);
    }
}

#undef FL_FN
#undef FL_CAT2
#undef FL_CAT2_
#undef FL_FLUSH
#undef FL_EXP_FLOOR
#undef FL_SCAN
#undef FL__PAIRWISE
