# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Seeded sampling on the CPU: one row per work item, driven by the C core's fl_row_sample_{f32,f64}.

Design: the draw of a row depends only on (seed, row id, sample index, token id) through a counter-based
generator (Philox-4x32-10, see fastlogits_sample.h), so rows can go to any thread in any order and the
result does not depend on the thread count or the chunk size. With fewer rows than threads, a row without
top-k is set up by one thread (fl_row_sample_setup: its logsumexp and the filters' threshold) and its
draws go over column ranges, on every thread (fl_row_gumbel), merged in order: the best key, the lower
index on ties, which is the token one pass finds. Scratch memory is one block per thread (for no more
threads than rows), allocated before the parallel region: the chunk buffer, the top-k heap, and (when
top-k or top-p is used) 4 V values of 8 bytes for candidates (the heap's ties, the bucket where a nucleus
ends) and work space; the split draws take a chunk buffer per thread only.
"""
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int64_t, int32_t, uint32_t, uint64_t
from libc.math cimport INFINITY
from libc.stdlib cimport malloc, free

import numpy as np

from fastlogits.cpu._rows cimport Block, make_block, n_segments, row_of, fl_row, work_threads


cdef extern from "fastlogits.h" nogil:
    ctypedef struct fl_sample_params:
        uint64_t seed
        uint64_t row_id
        int64_t top_k
        double top_p
        double min_p
        int64_t num_samples
        int greedy

    ctypedef struct fl_sample_scratch:
        void *buf
        void *hv
        int64_t *hi
        double *cv
        int64_t *ci
        double *tmp

    int fl_row_sample_f32(const fl_row *r, const fl_sample_params *p, int64_t chunk,
                          fl_sample_scratch *sc, int64_t *tokens, double *logprobs, int64_t *ranks)
    int fl_row_sample_f64(const fl_row *r, const fl_sample_params *p, int64_t chunk,
                          fl_sample_scratch *sc, int64_t *tokens, double *logprobs, int64_t *ranks)

    ctypedef struct fl_sample_prep:
        pass
    int fl_row_sample_setup_f32(const fl_row *r, const fl_sample_params *p, int want_lp, int64_t chunk,
                                fl_sample_scratch *sc, fl_sample_prep *pp)
    int fl_row_sample_setup_f64(const fl_row *r, const fl_sample_params *p, int want_lp, int64_t chunk,
                                fl_sample_scratch *sc, fl_sample_prep *pp)
    ctypedef struct fl_key:
        double hi
        double lo
    fl_key fl_key_none()
    fl_key fl_key_of(double x, double g)
    bint fl_key_above(fl_key a, fl_key b)
    double fl_key_floor(fl_key k)
    int fl_row_gumbel_f32(const fl_row *r, const fl_sample_params *p, const fl_sample_prep *pp, uint32_t s,
                          int64_t c0, int64_t c1, int64_t chunk, float *buf, fl_key *best, int64_t *best_i)
    int fl_row_gumbel_f64(const fl_row *r, const fl_sample_params *p, const fl_sample_prep *pp, uint32_t s,
                          int64_t c0, int64_t c1, int64_t chunk, double *buf, fl_key *best, int64_t *best_i)
    double fl_row_rank_mass_f32(const fl_row *r, const fl_sample_prep *pp, int64_t t, int64_t c0, int64_t c1,
                                int64_t chunk, float *buf, int64_t *rank)
    double fl_row_rank_mass_f64(const fl_row *r, const fl_sample_prep *pp, int64_t t, int64_t c0, int64_t c1,
                                int64_t chunk, double *buf, int64_t *rank)
    double fl_sample_logprob_f32(const fl_row *r, const fl_sample_prep *pp, int64_t t, double ssum)
    double fl_sample_logprob_f64(const fl_row *r, const fl_sample_prep *pp, int64_t t, double ssum)
    enum:
        FL_SAMPLE_OK
        FL_SAMPLE_NAN
        FL_SAMPLE_POSINF
        FL_SAMPLE_EMPTY


# a row's status from the samplers (fastlogits_sample.h's), for the Python and GPU drivers too
OK, NAN, POSINF, EMPTY = FL_SAMPLE_OK, FL_SAMPLE_NAN, FL_SAMPLE_POSINF, FL_SAMPLE_EMPTY


cdef inline fl_sample_scratch scratch_at(char *base, int64_t off_hv, int64_t off_hi, int64_t off_cv,
                                         int64_t off_ci, int64_t off_tmp) noexcept nogil:
    # built whole and assigned whole, so that Cython makes the variable thread-private
    cdef fl_sample_scratch sc
    sc.buf = <void *> base
    sc.hv = <void *> (base + off_hv)
    sc.hi = <int64_t *> (base + off_hi)
    sc.cv = <double *> (base + off_cv)
    sc.ci = <int64_t *> (base + off_ci)
    sc.tmp = <double *> (base + off_tmp)
    return sc


cdef inline fl_sample_params params_of(uint64_t seed, uint64_t row_id, int64_t top_k, double top_p,
                                       double min_p, int64_t ns, bint greedy) noexcept nogil:
    cdef fl_sample_params p
    p.seed = seed
    p.row_id = row_id
    p.top_k = top_k
    p.top_p = top_p
    p.min_p = min_p
    p.num_samples = ns
    p.greedy = greedy
    return p


def sample(x, int dtype, temperature, double softcap, const int64_t[::1] top_k, const double[::1] top_p,
           const double[::1] min_p, const uint64_t[::1] seeds, const uint64_t[::1] row_ids,
           int64_t[:, ::1] tokens, double[:, ::1] logprobs, int64_t[:, ::1] ranks, int32_t[::1] status,
           int64_t chunk, int threads):
    """Draws tokens.shape[1] samples of each row of x into tokens; with logprobs (not None), also each
    token's log-probability under the filtered distribution and its rank (ranks). Per row: top_k (0:
    none), top_p (1: none), min_p (0: none), seeds and row_ids (the generator's key and row counter);
    a temperature of 0 is greedy. status[i]: 0 ok, 1 NaN in the row, 2 +inf at a positive temperature,
    3 no possible token; the row's outputs are left unwritten unless 0."""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t i, ns = tokens.shape[1]
    cdef int64_t kmax = 0                  # the largest top_k in use (the heap's size)
    cdef bint need_candidates = False      # some row uses top-k or top-p (V-sized candidate arrays)
    for i in range(b.rows):
        if 0 < top_k[i] < b.n:
            kmax = max(kmax, top_k[i])
            need_candidates = True
        if top_p[i] < 1.0:
            need_candidates = True
    cdef int64_t nv = b.n if need_candidates else 0
    cdef int64_t off_hv = chunk * 8
    cdef int64_t off_hi = off_hv + kmax * 8
    cdef int64_t off_cv = off_hi + kmax * 8
    cdef int64_t off_ci = off_cv + nv * 8
    cdef int64_t off_tmp = off_ci + nv * 8
    cdef int64_t per_thread = off_tmp + nv * 16 + 64
    cdef bint want_lp = logprobs is not None
    cdef fl_row r
    cdef int64_t nseg = n_segments(&b, max(1, threads))    # > 1: fewer rows than threads, split below
    cdef int split_threads = work_threads(&b, nseg, threads)
    threads = work_threads(&b, 1, threads)
    cdef fl_sample_params p
    cdef fl_sample_scratch sc
    cdef char *base = NULL
    cdef char *bufs = <char *> malloc(threads * per_thread)
    if bufs == NULL:
        raise MemoryError("fastlogits: cannot allocate %d scratch buffers of %d bytes"
                          % (threads, per_thread))
    cdef unsigned char[::1] split = np.zeros(b.rows, np.uint8)
    cdef fl_sample_prep *prep = NULL
    cdef char *chunk_bufs = NULL
    if nseg > 1:
        prep = <fl_sample_prep *> malloc(b.rows * sizeof(fl_sample_prep))
        chunk_bufs = <char *> malloc(split_threads * (chunk * 8 + 64))    # the split draws need no more
        if prep == NULL or chunk_bufs == NULL:
            free(bufs)
            free(prep)
            free(chunk_bufs)
            raise MemoryError("fastlogits: cannot allocate the sampling setup of %d rows" % b.rows)
    with nogil, parallel(num_threads=threads):
        base = bufs + threadid() * per_thread
        sc = scratch_at(base, off_hv, off_hi, off_cv, off_ci, off_tmp)
        for i in prange(b.rows, schedule="dynamic"):
            r = row_of(&b, i)
            p = params_of(seeds[i], row_ids[i], top_k[i], top_p[i], min_p[i], ns, r.temperature == 0.0)
            if nseg > 1 and not p.greedy and not (0 < p.top_k < b.n):
                # its draws go over column ranges, on every thread (below); here its setup
                split[i] = 1
                if b.f64:
                    status[i] = fl_row_sample_setup_f64(&r, &p, want_lp, chunk, &sc, &prep[i])
                else:
                    status[i] = fl_row_sample_setup_f32(&r, &p, want_lp, chunk, &sc, &prep[i])
            elif b.f64:
                status[i] = fl_row_sample_f64(&r, &p, chunk, &sc, &tokens[i, 0],
                                              &logprobs[i, 0] if want_lp else NULL,
                                              &ranks[i, 0] if want_lp else NULL)
            else:
                status[i] = fl_row_sample_f32(&r, &p, chunk, &sc, &tokens[i, 0],
                                              &logprobs[i, 0] if want_lp else NULL,
                                              &ranks[i, 0] if want_lp else NULL)
    if nseg > 1:
        try:
            draw_split(&b, nseg, split, prep, seeds, row_ids, top_k, top_p, min_p, tokens, logprobs, ranks,
                       status, chunk_bufs, chunk * 8 + 64, chunk, split_threads)
        finally:
            free(prep)
            free(chunk_bufs)
    free(bufs)


cdef draw_split(const Block *b, int64_t nseg, const unsigned char[::1] split, const fl_sample_prep *prep,
                const uint64_t[::1] seeds, const uint64_t[::1] row_ids, const int64_t[::1] top_k,
                const double[::1] top_p, const double[::1] min_p, int64_t[:, ::1] tokens,
                double[:, ::1] logprobs, int64_t[:, ::1] ranks, int32_t[::1] status, char *bufs,
                int64_t per_thread, int64_t chunk, int threads):
    """The draws of the rows set up for it (split[i]): each (row, column range, sample) an item for any
    thread, Gumbel-max over its range; then, per (row, sample), the ranges merged in order (the best key,
    the lower index on ties: the token a single pass would find) and the statuses (a NaN anywhere first);
    the log-probabilities likewise (counts and masses summed over the ranges in order)."""
    cdef int64_t ns = tokens.shape[1], items = b.rows * nseg * ns
    cdef int64_t it, i, g, s, bi, rk
    cdef double ssum
    cdef fl_key best
    cdef int st
    cdef bint want_lp = logprobs is not None
    cdef double[:, ::1] gbest = no_keys(items)    # each item's best key
    cdef int64_t[::1] gidx = np.full(items, -1, np.int64)
    cdef int32_t[::1] gst = np.zeros(items, np.int32)
    cdef double[::1] gsum = np.zeros(items if want_lp else 1)
    cdef int64_t[::1] grank = np.zeros(items if want_lp else 1, np.int64)
    cdef fl_row r
    cdef fl_sample_params p
    cdef char *buf = NULL
    cdef int phase
    for phase in range(2 if want_lp else 1):      # 0: the draws, 1: the log-probability passes
        with nogil, parallel(num_threads=threads):
            buf = bufs + threadid() * per_thread
            for it in prange(items, schedule="dynamic"):
                i = it // (nseg * ns)
                g = (it // ns) % nseg
                s = it % ns
                if not split[i] or status[i] != FL_SAMPLE_OK:
                    continue
                r = row_of(b, i)
                if phase == 0:
                    p = params_of(seeds[i], row_ids[i], top_k[i], top_p[i], min_p[i], ns, False)
                    if b.f64:
                        gst[it] = fl_row_gumbel_f64(&r, &p, &prep[i], <uint32_t> s, g * b.n // nseg,
                                                    (g + 1) * b.n // nseg, chunk, <double *> buf,
                                                    <fl_key *> &gbest[it, 0], &gidx[it])
                    else:
                        gst[it] = fl_row_gumbel_f32(&r, &p, &prep[i], <uint32_t> s, g * b.n // nseg,
                                                    (g + 1) * b.n // nseg, chunk, <float *> buf,
                                                    <fl_key *> &gbest[it, 0], &gidx[it])
                elif b.f64:
                    gsum[it] = fl_row_rank_mass_f64(&r, &prep[i], tokens[i, s], g * b.n // nseg,
                                                    (g + 1) * b.n // nseg, chunk, <double *> buf, &grank[it])
                else:
                    gsum[it] = fl_row_rank_mass_f32(&r, &prep[i], tokens[i, s], g * b.n // nseg,
                                                    (g + 1) * b.n // nseg, chunk, <float *> buf, &grank[it])
        for i in range(b.rows):
            if not split[i] or status[i] != FL_SAMPLE_OK:
                continue
            r = row_of(b, i)
            for s in range(ns):
                if phase == 1:
                    ssum = 0.0
                    rk = 0
                    for g in range(nseg):
                        ssum += gsum[(i * nseg + g) * ns + s]
                        rk += grank[(i * nseg + g) * ns + s]
                    ranks[i, s] = rk
                    if b.f64:
                        logprobs[i, s] = fl_sample_logprob_f64(&r, &prep[i], tokens[i, s], ssum)
                    else:
                        logprobs[i, s] = fl_sample_logprob_f32(&r, &prep[i], tokens[i, s], ssum)
                    continue
                best.hi = -INFINITY
                best.lo = 0.0
                bi = -1
                st = FL_SAMPLE_OK
                for g in range(nseg):
                    it = (i * nseg + g) * ns + s
                    if gst[it] == FL_SAMPLE_NAN or (gst[it] == FL_SAMPLE_POSINF and st == FL_SAMPLE_OK):
                        st = gst[it]
                    if gidx[it] >= 0 and (bi < 0 or fl_key_above((<fl_key *> &gbest[it, 0])[0], best)):
                        best = (<fl_key *> &gbest[it, 0])[0]
                        bi = gidx[it]
                if st == FL_SAMPLE_OK and bi < 0:
                    st = FL_SAMPLE_EMPTY
                if st != FL_SAMPLE_OK:
                    status[i] = st
                    break
                tokens[i, s] = bi


cdef extern from "fastlogits.h" nogil:
    ctypedef struct fl_rng:
        pass
    void fl_philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1)
    fl_rng fl_rng_make(uint64_t seed, uint64_t row, uint32_t sample)
    uint32_t fl_rng_word(const fl_rng *g, int64_t t, uint32_t stream)
    double fl_rng_gumbel(const fl_rng *g, int64_t t)
    # the pieces of one row's passes, for rows drawn in parts (fastlogits/stream/wide.py)
    const float *fl_row_chunk_f32(const fl_row *r, int64_t start, int64_t len, float *buf)
    const double *fl_row_chunk_f64(const fl_row *r, int64_t start, int64_t len, double *buf)
    float fl__round_up_f32(double theta)
    double fl__round_up_f64(double theta)
    void fl__gumbel_chunk_f32(const float *x, int64_t c0, int64_t len, float theta, const fl_rng *g,
                              fl_key *best, int64_t *best_i, uint32_t *w, unsigned char *flags)
    void fl__gumbel_chunk_f64(const double *x, int64_t c0, int64_t len, double theta, const fl_rng *g,
                              fl_key *best, int64_t *best_i, uint32_t *w, unsigned char *flags)
    double fl__rank_mass_f32(const float *x, int64_t n, float xt, float theta, float m, int64_t *rank)
    double fl__rank_mass_f64(const double *x, int64_t n, double xt, double theta, double m, int64_t *rank)
    void fl__exp_shift(const double *v, double *w, int64_t n, double shift)
    void fl__with_min_p(double *theta, int64_t *cut, double m, double min_p)
    double fl__topp_goal(double top_p, double eps)
    double FL_GUMBEL_MAX


def with_min_p(double theta, int64_t cut, double m, double min_p):
    """(theta, cut) after min-p (fl__with_min_p): its threshold, rounded up, where it is above top-p's theta,
    and then no tie is cut."""
    fl__with_min_p(&theta, &cut, m, min_p)
    return theta, cut


def topp_goal(top_p, double eps):
    """Top-p's goal (fl__topp_goal) for masses summed in a type of machine epsilon eps: of a float, or of
    each value of an array (a float64 array back)."""
    cdef double[::1] p
    cdef int64_t i
    if np.ndim(top_p) == 0:
        return fl__topp_goal(top_p, eps)
    a = np.array(top_p, np.float64)
    p = a.reshape(-1)
    for i in range(p.shape[0]):
        p[i] = fl__topp_goal(p[i], eps)
    return a


ctypedef fused real:
    float
    double


def values(x, int dtype, temperature, double softcap, real[::1] out):
    """The values of the one row of x (1, n) after softcap and temperature, in the compute type (out: n
    float32, or float64 for float64 logits), as every kernel computes them."""
    cdef Block b = make_block(x, dtype, temperature, softcap, max(1, x.shape[1]))
    cdef fl_row r = row_of(&b, 0)
    cdef int64_t j, n = b.n
    if out.shape[0] != n or n == 0:
        return
    if real is float:
        p32 = fl_row_chunk_f32(&r, 0, n, &out[0])
        if p32 != &out[0]:
            for j in range(n):
                out[j] = p32[j]
    else:
        p64 = fl_row_chunk_f64(&r, 0, n, &out[0])
        if p64 != &out[0]:
            for j in range(n):
                out[j] = p64[j]


def gumbel_values(const real[::1] v, int64_t tok0, double theta, uint64_t seed, uint64_t row_id,
                  double[:, ::1] best, int64_t[::1] best_i):
    """The Gumbel-max of tokens tok0 .. tok0 + len(v) - 1 (values v, as `values` gives them) restricted to
    v >= theta, for samples 0 .. len(best) - 1: updates each sample's best key (best[s]: fl_key's hi, lo)
    and token (start them at (-inf, 0) and -1 and pass a row's parts in increasing order: ties keep the
    lower token, as one pass over the row would). The same keys and tokens as fl_row_sample."""
    cdef int64_t n = v.shape[0], s, j
    cdef uint32_t w[64]
    cdef unsigned char flags[64]
    cdef fl_rng g
    cdef double vmax = -INFINITY
    cdef float t32 = -INFINITY if theta == -INFINITY else fl__round_up_f32(theta)
    cdef double t64 = -INFINITY if theta == -INFINITY else fl__round_up_f64(theta)
    cdef fl_key *key
    if best.shape[1] != 2 or best_i.shape[0] != best.shape[0]:
        raise ValueError("gumbel_values: best must be (samples, 2) and best_i (samples,)")
    if n == 0:
        return
    for j in range(n):
        vmax = v[j] if v[j] > vmax else vmax
    with nogil:
        for s in range(best.shape[0]):
            key = <fl_key *> &best[s, 0]
            if vmax < theta or vmax + FL_GUMBEL_MAX < fl_key_floor(key[0]):      # no token here can win
                continue
            g = fl_rng_make(seed, row_id, <uint32_t> s)
            if real is float:
                fl__gumbel_chunk_f32(&v[0], tok0, n, t32, &g, key, &best_i[s], w, flags)
            else:
                fl__gumbel_chunk_f64(&v[0], tok0, n, t64, &g, key, &best_i[s], w, flags)


def no_keys(int64_t n):
    """n keys below every token's, as (n, 2) float64 rows (fl_key's hi, lo): fl_key_none, where a
    search over tokens starts."""
    keys = np.zeros((n, 2))
    keys[:, 0] = fl_key_none().hi
    return keys


def key_argmax(const double[::1] v, const double[::1] g):
    """The first index of the largest key v[i] + g[i] (fl_key: the exact sum, as the sampler compares
    keys), or -1 where no key beats fl_key_none (all values -inf)."""
    cdef int64_t i, bi = -1
    cdef fl_key k, best = fl_key_none()
    if g.shape[0] != v.shape[0]:
        raise ValueError("key_argmax: v and g must have the same length")
    for i in range(v.shape[0]):
        k = fl_key_of(v[i], g[i])
        if fl_key_above(k, best):
            best = k
            bi = i
    return bi


cdef extern from "fastlogits.h" nogil:
    uint32_t fl__topk_key_f32(float x)
    uint64_t fl__topk_key_f64(double x)


cdef inline uint64_t _key(real x) noexcept nogil:
    """The value's key: unsigned, in the order of the values (NaN the largest), one key for -0 and +0; top-k's
    selection's (fl__topk_key in fastlogits_impl.h)."""
    if real is float:
        return fl__topk_key_f32(x)
    else:
        return fl__topk_key_f64(x)


def radix_counts(const real[::1] v, int shift, int width, uint64_t prefix, int64_t[::1] hist):
    """A radix select's counting pass over values v: hist[d] += the number of values whose key has the
    digit d in bits [shift, shift + width) and the bits above them equal to prefix (every value when
    there are none above: the first pass). Keys: unsigned, in the order of the values, -0 and +0 one."""
    cdef int64_t i, n = v.shape[0]
    cdef int hi = shift + width
    cdef bint every = hi >= <int> (8 * sizeof(real))
    cdef uint64_t k, mask = (<uint64_t> 1 << width) - 1
    with nogil:
        for i in range(n):
            k = _key(v[i])
            if every or k >> hi == prefix:
                hist[(k >> shift) & mask] += 1


def radix_mass(const real[::1] v, int shift, int width, uint64_t prefix, double theta, double m,
               double[::1] hist):
    """As radix_counts, adding the mass exp(v - m) of the values v >= theta instead of counts (the same
    float64 mass for a value in every pass)."""
    cdef int64_t i, j, b0, cnt, n = v.shape[0]
    cdef int hi = shift + width
    cdef bint every = hi >= <int> (8 * sizeof(real))
    cdef uint64_t k, mask = (<uint64_t> 1 << width) - 1
    cdef double vals[256]
    cdef double w[256]
    cdef uint64_t digit[256]
    with nogil:
        for b0 in range(0, n, 256):
            cnt = 0
            for i in range(b0, min(n, b0 + 256)):
                if not v[i] >= theta:
                    continue
                k = _key(v[i])
                if every or k >> hi == prefix:
                    vals[cnt] = v[i]
                    digit[cnt] = (k >> shift) & mask
                    cnt = cnt + 1
            if cnt:
                fl__exp_shift(vals, w, cnt, m)
                for j in range(cnt):
                    hist[digit[j]] += w[j]


def rank_mass_values(const real[::1] v, const double[::1] xt, double theta, double m, int64_t[::1] ranks,
                     double[::1] mass):
    """For each sample s: adds to ranks[s] the number of v above xt[s] (its token's value), and to
    mass[s] the sum of exp(v - m) over v >= theta (m >= every value), as fl_row_rank_mass does."""
    cdef int64_t n = v.shape[0], s
    cdef float t32 = -INFINITY if theta == -INFINITY else fl__round_up_f32(theta)
    cdef double t64 = -INFINITY if theta == -INFINITY else fl__round_up_f64(theta)
    if n == 0:
        return
    with nogil:
        for s in range(xt.shape[0]):
            if real is float:
                mass[s] += fl__rank_mass_f32(&v[0], n, <float> xt[s], t32, <float> m, &ranks[s])
            else:
                mass[s] += fl__rank_mass_f64(&v[0], n, xt[s], t64, m, &ranks[s])


def philox4x32_10(counter, key):
    """Philox-4x32-10 of a counter (4 uint32) under a key (2 uint32): the 4 output words (a tuple)."""
    cdef uint32_t c[4]
    cdef int j
    for j in range(4):
        c[j] = counter[j]
    fl_philox4x32_10(c, key[0], key[1])
    return tuple(c[j] for j in range(4))


def noise(uint64_t seed, uint64_t row, uint32_t sample, const int64_t[::1] tokens):
    """(hi, lo, g): the two random words (uint32) and the float64 Gumbel noise of each token, as the
    sampler computes them (for tests and for other implementations to check against)."""
    cdef int64_t i, n = tokens.shape[0]
    cdef fl_rng g = fl_rng_make(seed, row, sample)
    hi = np.empty(n, np.uint32)
    lo = np.empty(n, np.uint32)
    out = np.empty(n, np.float64)
    cdef uint32_t[::1] hv = hi
    cdef uint32_t[::1] lv = lo
    cdef double[::1] ov = out
    for i in range(n):
        hv[i] = fl_rng_word(&g, tokens[i], 0)
        lv[i] = fl_rng_word(&g, tokens[i], 1)
        ov[i] = fl_rng_gumbel(&g, tokens[i])
    return hi, lo, out
