# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Seeded sampling on the CPU: one row per work item, driven by the C core's fl_row_sample_{f32,f64}.

Design: the draw of a row depends only on (seed, row id, sample index, token id) through a counter-based
generator (Philox-4x32-10, see fastlogits_sample.h), so rows can go to any thread in any order and the
result does not depend on the thread count or the chunk size. Scratch memory is one block per thread,
allocated before the parallel region (for no more threads than rows): the chunk buffer, the top-k heap,
and (when top-k or top-p is used) 4 V values of 8 bytes for candidates (the heap's ties, the bucket
where a nucleus ends) and work space.
"""
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int64_t, int32_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free

import numpy as np

from fastlogits.cpu._rows cimport Block, make_block, row_of, fl_row


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
           int64_t kmax, bint need_candidates, int64_t chunk, int threads):
    """Draws tokens.shape[1] samples of each row of x into tokens; with logprobs (not None), also each
    token's log-probability under the filtered distribution and its rank (ranks). Per row: top_k (0:
    none), top_p (1: none), min_p (0: none), seeds and row_ids (the generator's key and row counter);
    a temperature of 0 is greedy. status[i]: 0 ok, 1 NaN in the row, 2 +inf at a positive temperature,
    3 no possible token; the row's outputs are left unwritten unless 0. kmax: the largest top_k in use
    (heap size); need_candidates: some row uses top-k or top-p (V-sized candidate arrays)."""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t i, ns = tokens.shape[1]
    cdef int64_t nv = b.n if need_candidates else 0
    cdef int64_t off_hv = chunk * 8
    cdef int64_t off_hi = off_hv + kmax * 8
    cdef int64_t off_cv = off_hi + kmax * 8
    cdef int64_t off_ci = off_cv + nv * 8
    cdef int64_t off_tmp = off_ci + nv * 8
    cdef int64_t per_thread = off_tmp + nv * 16 + 64
    cdef bint want_lp = logprobs is not None
    cdef fl_row r
    threads = max(1, min(threads, b.rows))
    cdef fl_sample_params p
    cdef fl_sample_scratch sc
    cdef char *base
    cdef char *bufs = <char *> malloc(threads * per_thread)
    if bufs == NULL:
        raise MemoryError("fastlogits: cannot allocate %d scratch buffers of %d bytes"
                          % (threads, per_thread))
    with nogil, parallel(num_threads=threads):
        base = bufs + threadid() * per_thread
        sc = scratch_at(base, off_hv, off_hi, off_cv, off_ci, off_tmp)
        for i in prange(b.rows, schedule="dynamic"):
            r = row_of(&b, i)
            p = params_of(seeds[i], row_ids[i], top_k[i], top_p[i], min_p[i], ns, r.temperature == 0.0)
            if b.f64:
                status[i] = fl_row_sample_f64(&r, &p, chunk, &sc, &tokens[i, 0],
                                              &logprobs[i, 0] if want_lp else NULL,
                                              &ranks[i, 0] if want_lp else NULL)
            else:
                status[i] = fl_row_sample_f32(&r, &p, chunk, &sc, &tokens[i, 0],
                                              &logprobs[i, 0] if want_lp else NULL,
                                              &ranks[i, 0] if want_lp else NULL)
    free(bufs)


cdef extern from "fastlogits.h" nogil:
    ctypedef struct fl_rng:
        pass
    void fl_philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1)
    fl_rng fl_rng_make(uint64_t seed, uint64_t row, uint32_t sample)
    uint32_t fl_rng_word(const fl_rng *g, int64_t t, uint32_t stream)
    double fl_rng_gumbel(const fl_rng *g, int64_t t)


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
