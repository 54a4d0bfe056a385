# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Row reductions on the CPU: logsumexp, entropy, cross-entropy.

Design: each work item is (row, column range); a thread folds its range into a row state with the C
core's row drivers, and the states of one row are merged afterwards in a fixed order, so results do not
depend on which thread folds which range. With at least as many rows as threads a row is one range; a few
long rows are split into several (``n_segments``, more for more threads), which moves a result by
rounding only (a few ulp of float64). Short rows (fewer than 32 values computed in float32, 16 in
float64) are worked a tile of 64 rows at a time, a lane a row (tile_states; fl__lse_tile), and the logs
of a tile's sums taken in one vector loop. Scratch buffers are one per thread, allocated before the
parallel region (so an allocation failure raises MemoryError instead of crashing a thread). Results are
float64; the Python layer casts them to the API's result dtype.
"""
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.math cimport NAN, INFINITY, fabs

from fastlogits.clib cimport (fl_lse_state, fl_ent_state, fl_lse_merge, fl_lse_result, fl_ent_merge,
                              fl_ent_result)
from fastlogits.cpu._rows cimport (Block, make_block, n_segments, row_of, row_lse, fold_lse, fl_row,
                                   work_threads, address_of, fl__dist_merge, fl__dist_total,
                                   fl_row_entropy_f32, fl_row_entropy_f64, fl_row_ce_f32, fl_row_ce_f64,
                                   fl_row_value_f32, fl_row_value_f64, fl_row_stats_f32, fl_row_stats_f64,
                                   fl__log, fl__log_n, FL_TILE, FL_SHORT_F32, FL_SHORT_F64, short_rows,
                                   tile_bytes, tile_states)


# rows shorter than these (computed in float32, float64) are worked a tile of rows at a time
SHORT_F32 = FL_SHORT_F32
SHORT_F64 = FL_SHORT_F64


cdef char *alloc_buffers(int threads, int64_t per_thread) except NULL:
    cdef char *p = <char *> malloc(threads * per_thread)
    if p == NULL:
        raise MemoryError("fastlogits: cannot allocate %d scratch buffers of %d bytes"
                          % (threads, per_thread))
    return p


cdef inline fl_ent_state row_entropy(const Block *b, const fl_row *r, int64_t start, int64_t stop,
                                     char *buf) noexcept nogil:
    """The entropy state of columns [start, stop) of row r in b's compute type."""
    if b.f64:
        return fl_row_entropy_f64(r, start, stop, b.chunk, <double *> buf)
    return fl_row_entropy_f32(r, start, stop, b.chunk, <float *> buf)


ctypedef void (*tile_fn)(const Block *b, int64_t i0, double *out, char *scratch) noexcept nogil


cdef int for_tiles(const Block *b, tile_fn fn, double *out, int threads) except -1:
    """fn(b, i0, out, scratch) for the tile of short rows from each i0, on `threads` threads, each with
    tile_bytes(b) of scratch of its own."""
    cdef int64_t i, per = tile_bytes(b)
    cdef char *tiles = alloc_buffers(threads, per)
    cdef char *buf = NULL
    with nogil, parallel(num_threads=threads):
        buf = tiles + threadid() * per
        for i in prange((b.rows + FL_TILE - 1) // FL_TILE, schedule="guided"):
            fn(b, i * FL_TILE, out, buf)
    free(tiles)
    return 0


cdef void lse_tile(const Block *b, int64_t i0, double *out, char *scratch) noexcept nogil:
    """out[i] = logsumexp of row i for the tile of short rows from i0 (tile_states; the logs of the tile
    in one vector loop, fl_lse_result's formula)."""
    cdef double m[FL_TILE]
    cdef double s[FL_TILE]
    cdef int64_t k
    tile_states(b, i0, min(b.rows - i0, FL_TILE), m, s, NULL, scratch)
    fl__log_n(s, s, FL_TILE)
    for k in range(min(b.rows - i0, FL_TILE)):
        out[i0 + k] = m[k] + s[k] if -INFINITY < m[k] < INFINITY else m[k]


def lse(x, int dtype, temperature, double softcap, double[::1] out, int64_t chunk, int threads):
    """out[i] = logsumexp of row i of x (after softcap and temperature)."""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t nseg = n_segments(&b, threads), i
    cdef char *buf = NULL
    cdef fl_lse_state s
    threads = work_threads(&b, nseg, threads)
    if short_rows(&b, nseg):
        for_tiles(&b, lse_tile, &out[0], threads)
        return
    cdef char *bufs = alloc_buffers(threads, chunk * 8)
    if nseg == 1:
        # a range a row: each result is written as its row is folded, on every thread, with no array of
        # states whose results (a log each) were taken after the parallel loop, on one thread (float32
        # (262144, 16) on two threads, in the same runs: entropy 7.3-8.1 -> 5.9-7.3 ms, logsumexp
        # 5.8-6.8 -> 6.1-6.2; one thread: the same)
        with nogil, parallel(num_threads=threads):
            buf = bufs + threadid() * chunk * 8
            for i in prange(b.rows, schedule="guided"):
                s = row_lse(&b, i, 0, b.n, buf)
                out[i] = fl_lse_result(&s)
        free(bufs)
        return
    cdef fl_lse_state *st = <fl_lse_state *> malloc(b.rows * nseg * sizeof(fl_lse_state))
    if st == NULL:
        free(bufs)
        raise MemoryError("fastlogits: cannot allocate row states")
    with nogil:
        fold_lse(&b, nseg, st, bufs, chunk * 8, threads)
        for i in range(b.rows):
            out[i] = fl_lse_result(&st[i * nseg])
    free(st)
    free(bufs)


cdef void entropy_tile(const Block *b, int64_t i0, double *out, char *scratch) noexcept nogil:
    """out[i] = entropy of row i for the tile of short rows from i0 (fl_ent_result's formula, the logs of
    the tile in one vector loop)."""
    cdef double m[FL_TILE]
    cdef double s[FL_TILE]
    cdef double t[FL_TILE]
    cdef double ls[FL_TILE]
    cdef int64_t k
    tile_states(b, i0, min(b.rows - i0, FL_TILE), m, s, t, scratch)
    fl__log_n(s, ls, FL_TILE)
    for k in range(min(b.rows - i0, FL_TILE)):
        out[i0 + k] = ls[k] - t[k] / s[k] if -INFINITY < m[k] < INFINITY else NAN


def entropy(x, int dtype, temperature, double softcap, double[::1] out, int64_t chunk, int threads):
    """out[i] = Shannon entropy (nats) of softmax of row i (after softcap and temperature)."""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t nseg = n_segments(&b, threads), items = b.rows * nseg
    cdef int64_t it, i, g, start, stop
    cdef fl_row r
    cdef char *buf = NULL
    cdef fl_ent_state s
    threads = work_threads(&b, nseg, threads)
    if short_rows(&b, nseg):
        for_tiles(&b, entropy_tile, &out[0], threads)
        return
    cdef char *bufs = alloc_buffers(threads, chunk * 8)
    if nseg == 1:
        # a range a row: as in lse
        with nogil, parallel(num_threads=threads):
            buf = bufs + threadid() * chunk * 8
            for i in prange(b.rows, schedule="guided"):
                r = row_of(&b, i)
                s = row_entropy(&b, &r, 0, b.n, buf)
                out[i] = fl_ent_result(&s)
        free(bufs)
        return
    cdef fl_ent_state *st = <fl_ent_state *> malloc(items * sizeof(fl_ent_state))
    if st == NULL:
        free(bufs)
        raise MemoryError("fastlogits: cannot allocate row states")
    with nogil, parallel(num_threads=threads):
        buf = bufs + threadid() * chunk * 8
        for it in prange(items, schedule="guided"):
            i = it // nseg
            g = it % nseg
            r = row_of(&b, i)
            start = g * b.n // nseg
            stop = (g + 1) * b.n // nseg
            st[it] = row_entropy(&b, &r, start, stop, buf)
    with nogil:
        for i in range(b.rows):
            for g in range(1, nseg):
                fl_ent_merge(&st[i * nseg], &st[i * nseg + g])
            out[i] = fl_ent_result(&st[i * nseg])
    free(st)
    free(bufs)


cdef inline fl_lse_state row_ce(const Block *b, const fl_row *r, int64_t start, int64_t stop, const char *w,
                                double *dist, double *wsum, char *buf) noexcept nogil:
    """fl_row_ce of columns [start, stop) of row r in b's compute type (w: the weights, or NULL; dist:
    NULL without label smoothing)."""
    if b.f64:
        return fl_row_ce_f64(r, start, stop, b.chunk, <const double *> w, dist, wsum, <double *> buf)
    return fl_row_ce_f32(r, start, stop, b.chunk, <const float *> w, dist, wsum, <float *> buf)


cdef inline void ce_finish(bint ignored, const fl_lse_state *st, double log_s, const double *d,
                           const double *xt, double wtotal, bint smoothing, double *nll, double *smooth,
                           double *lse_out) noexcept nogil:
    """A row's cross-entropy parts from its merged state st, the log of its sum (fl__log(st.s), read where
    its max is finite), its label smoothing distance sum d (fl__dist's, folded by fl__dist_fold and merged
    by fl__dist_merge; read only when smoothing) and its label's logit xt; all 0 for an ignored row (whose
    st, d and xt are not read)."""
    cdef double m
    if ignored:
        lse_out[0] = nll[0] = 0.0
        if smoothing:
            smooth[0] = 0.0
        return
    m = st.m
    if m == INFINITY or m == -INFINITY or m != m:
        # all -inf, a +inf or a NaN: log_softmax is NaN there (PyTorch)
        lse_out[0] = nll[0] = NAN
        if smoothing:
            smooth[0] = NAN
        return
    lse_out[0] = m + log_s          # fl_lse_result's formula
    # (m - x) + log s, not lse - x: exact when x and m are huge and close (x = 3e38)
    nll[0] = (m - xt[0]) + log_s
    # sum w (lse - x) = sum w (m - x) + W log s: no cancellation however large x is
    if smoothing:
        smooth[0] = fl__dist_total(d[0], wtotal, log_s)


cdef enum:
    CE_BATCH = FL_TILE      # whole rows folded before their logs are taken, in ce_rows


cdef void ce_rows(const Block *b, int64_t i0, int64_t i1, const int64_t *labels, int64_t ignore_index,
                  const char *w, double wtotal, bint smoothing, double *nll, double *sm, double *lse_out,
                  char *buf, bint tiled) noexcept nogil:
    """Rows i0 .. i1 (at most CE_BATCH) whole: each folded (a tile of short rows at
    once when tiled, without label smoothing: buf holds tile_bytes then), then all finished (ce_finish).
    Their logs are taken in one vector loop (fl__log_n), which also keeps the states' sums apart from the
    logs that wait for them (a log as each row was folded waited for its row's sum: float32 (262144, 16),
    one thread, 12.3 ms against 11.0 for the states of every row kept and finished in a second pass,
    which costs their memory)."""
    cdef fl_lse_state st[CE_BATCH]
    cdef double m[CE_BATCH]
    cdef double s[CE_BATCH]
    cdef double d[CE_BATCH]
    cdef double xt[CE_BATCH]
    cdef double wsum = 0.0       # (set by row_ce with d; 0 keeps GCC from warning)
    cdef int64_t i, k
    cdef fl_row r
    if tiled:
        tile_states(b, i0, i1 - i0, m, s, NULL, buf)
    for i in range(i0, i1):
        k = i - i0
        if labels[i] == ignore_index:
            s[k] = 1.0
            continue
        r = row_of(b, i)
        if tiled:
            st[k].m = m[k]
            st[k].s = s[k]
        else:
            st[k] = row_ce(b, &r, 0, b.n, w, &d[k] if smoothing else NULL, &wsum, buf)
            s[k] = st[k].s
        xt[k] = fl_row_value_f64(&r, labels[i]) if b.f64 else fl_row_value_f32(&r, labels[i])
    fl__log_n(s, s, i1 - i0)
    for i in range(i0, i1):
        k = i - i0
        ce_finish(labels[i] == ignore_index, &st[k], s[k], &d[k], &xt[k], wtotal, smoothing, &nll[i],
                  &sm[i] if smoothing else NULL, &lse_out[i])


def cross_entropy(x, int dtype, temperature, double softcap, const int64_t[::1] labels,
                  int64_t ignore_index, weight, double wtotal, bint smoothing, double[::1] nll,
                  double[::1] smooth, double[::1] lse_out, int64_t chunk, int threads):
    """Per row i with labels[i] != ignore_index (labels already checked to lie in [0, V)):
    lse_out[i] = logsumexp, nll[i] = -log p[label] (unweighted), and when smoothing,
    smooth[i] = -sum_c w[c] log p[c] (w = 1 when weight is None; wtotal = sum of w), each formed from the
    row's max m (ce_finish): (m - x[label]) + log s, and sum_c w[c] (m - x[c]) + wtotal log s
    (fl__dist_total). Ignored rows get 0. weight: None or a
    C-contiguous array of V values in the compute dtype; smooth: None unless smoothing. A row whose
    log-softmax is NaN (all -inf, a +inf, a NaN) gives NaN.

    Rows that are one range each (at least as many rows as threads) are done CE_BATCH at a time, whole
    (ce_rows); the ranges of rows split into several are kept (states, smoothing sums, the label's
    logit) and merged afterwards. (Kept for every row, they cost as much memory traffic as the logits of
    short rows: float32 (262144, 16) on one thread took 18 ms where the allocations were fresh pages,
    15 now.)"""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t nseg = n_segments(&b, threads), items = b.rows * nseg
    cdef int64_t it, i, g, start, stop, nb, bsz
    cdef fl_row r
    cdef char *buf = NULL
    cdef double m1
    cdef bint ignored
    cdef const char *w = NULL
    cdef double *sm = NULL
    if smoothing:
        if smooth is None or smooth.shape[0] < b.rows:
            raise ValueError("fastlogits: cross_entropy with label smoothing needs a smooth array of a "
                             "value a row")
        sm = &smooth[0] if b.rows else NULL
    if weight is not None:
        w = <const char *> address_of(weight)
    threads = work_threads(&b, nseg, threads)
    cdef bint tiled = short_rows(&b, nseg) and not smoothing
    cdef int64_t per = max(chunk * 8, tile_bytes(&b)) if tiled else chunk * 8
    cdef char *bufs = alloc_buffers(threads, per)
    if nseg == 1:
        # batches of CE_BATCH rows, fewer where that leaves a thread without one (64 rows of 128256 were
        # one batch, on one thread of 2: 12.9 ms where logsumexp took 5.6)
        bsz = min(CE_BATCH, max((b.rows + threads - 1) // threads, 1))
        nb = (b.rows + bsz - 1) // bsz
        with nogil, parallel(num_threads=threads):
            buf = bufs + threadid() * per
            for it in prange(nb, schedule="guided"):
                ce_rows(&b, it * bsz, min((it + 1) * bsz, b.rows), &labels[0], ignore_index, w,
                        wtotal, smoothing, &nll[0], sm, &lse_out[0], buf, tiled)
        free(bufs)
        return
    cdef fl_lse_state *st = <fl_lse_state *> malloc(items * sizeof(fl_lse_state))
    cdef double *ds = <double *> malloc(items * sizeof(double))
    cdef double *ws = <double *> malloc(items * sizeof(double))
    cdef double *xl = <double *> malloc(b.rows * sizeof(double))    # each row's label logit
    if st == NULL or ds == NULL or ws == NULL or xl == NULL:
        free(bufs)
        free(st)
        free(ds)
        free(ws)
        free(xl)
        raise MemoryError("fastlogits: cannot allocate row states")
    with nogil, parallel(num_threads=threads):
        buf = bufs + threadid() * chunk * 8
        for it in prange(items, schedule="guided"):
            i = it // nseg
            g = it % nseg
            if labels[i] == ignore_index:
                continue
            r = row_of(&b, i)
            start = g * b.n // nseg
            stop = (g + 1) * b.n // nseg
            st[it] = row_ce(&b, &r, start, stop, w, &ds[it] if smoothing else NULL, &ws[it], buf)
            # the label's logit, read by the range holding it while the row is in cache (read after the
            # loop, a cache miss a row: float32 (65536, 100) took 12.5 ms, now 8.3; logsumexp 6.4)
            if start <= labels[i] < stop:
                xl[i] = fl_row_value_f64(&r, labels[i]) if b.f64 else fl_row_value_f32(&r, labels[i])
    with nogil:
        for i in range(b.rows):
            if labels[i] != ignore_index:
                for g in range(1, nseg):
                    m1 = st[i * nseg].m
                    fl_lse_merge(&st[i * nseg], &st[i * nseg + g])
                    if smoothing:
                        fl__dist_merge(&ds[i * nseg], &ws[i * nseg], m1, ds[i * nseg + g],
                                       ws[i * nseg + g], st[i * nseg + g].m, st[i * nseg].m)
            ignored = labels[i] == ignore_index       # (its states were not written)
            ce_finish(ignored, &st[i * nseg], 0.0 if ignored else fl__log(st[i * nseg].s), &ds[i * nseg],
                      &xl[i], wtotal, smoothing, &nll[i], &sm[i] if smoothing else NULL, &lse_out[i])
    free(st)
    free(ds)
    free(ws)
    free(xl)
    free(bufs)


# ---- row states, for the accumulators of fastlogits.stream --------------------------------------------

def lse_states(x, int dtype, temperature, double softcap, weight, bint want_dist, double[::1] m_out,
               double[::1] s_out, double[::1] dist_out, int64_t chunk, int threads):
    """The logsumexp state (m, s) of each row of x (columns of one chunk of the vocabulary); when
    want_dist, also label smoothing's dist_out[i] = sum_c w[c] (m - x[c]) of the row's (transformed)
    logits from its max m (relative to 0 where m is not finite: fl__dist_merge), with weight (None, for
    w = 1, or a C-contiguous array of V values in the compute dtype)."""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t i
    cdef fl_row r
    cdef fl_lse_state s
    cdef char *buf = NULL
    cdef double acc, wacc
    cdef const char *w = NULL
    if weight is not None:
        w = <const char *> address_of(weight)
    threads = work_threads(&b, 1, threads)
    cdef char *bufs = alloc_buffers(threads, chunk * 8)
    with nogil, parallel(num_threads=threads):
        buf = bufs + threadid() * chunk * 8
        for i in prange(b.rows, schedule="guided"):
            r = row_of(&b, i)
            acc = 0.0
            wacc = 0.0
            s = row_ce(&b, &r, 0, b.n, w, &acc if want_dist else NULL, &wacc, buf)
            m_out[i] = s.m
            s_out[i] = s.s
            dist_out[i] = acc
    free(bufs)


def merge_lse_states(double[::1] m, double[::1] s, const double[::1] m2, const double[::1] s2):
    """(m, s) <- merge((m, s), (m2, s2)), row by row, with the C core's rule."""
    cdef int64_t i
    cdef fl_lse_state a, b
    with nogil:
        for i in range(m.shape[0]):
            a.m = m[i]
            a.s = s[i]
            b.m = m2[i]
            b.s = s2[i]
            fl_lse_merge(&a, &b)
            m[i] = a.m
            s[i] = a.s


def merge_dist_states(double[::1] d, double w, const double[::1] m, const double[::1] d2, double w2,
                      const double[::1] m2, const double[::1] merged):
    """Label smoothing's distance sums d (of columns of weight sum w, row maxes m) <- merged with those of
    other columns (d2, w2, m2), at the rows' merged maxes (fl__dist_merge); returns the weight sum w + w2."""
    cdef int64_t i
    cdef double wi
    with nogil:
        for i in range(d.shape[0]):
            wi = w
            fl__dist_merge(&d[i], &wi, m[i], d2[i], w2, m2[i], merged[i])
    return w + w2


def lse_results(const double[::1] m, const double[::1] s, double[::1] out):
    cdef int64_t i
    cdef fl_lse_state a
    with nogil:
        for i in range(m.shape[0]):
            a.m = m[i]
            a.s = s[i]
            out[i] = fl_lse_result(&a)


def logs(const double[::1] x, double[::1] out):
    """out[i] = log x[i] by the C core's log (fl__log_n), the bits its kernels take of a row's sum: for the
    log-probabilities formed in Python from merged states (out may be x)."""
    if x.shape[0]:
        with nogil:
            fl__log_n(&x[0], &out[0], x.shape[0])


def ce_results(const double[::1] m, const double[::1] s, const double[::1] d, const double[::1] target,
               const int64_t[::1] labels, int64_t ignore_index, double wtotal, bint smoothing,
               double[::1] nll, double[::1] smooth, double[::1] lse_out):
    """cross_entropy's per-row parts from merged row states (the accumulators'), finished as the kernels
    finish them (ce_finish): m, s the states, d the smoothing distance sums (read only when smoothing),
    target the labels' logits, wtotal the weights' sum; smooth: None unless smoothing."""
    cdef int64_t i
    cdef fl_lse_state a
    cdef bint ignored
    if smoothing and smooth is None:
        raise ValueError("ce_results: label smoothing needs the smooth terms")
    with nogil:
        for i in range(m.shape[0]):
            ignored = labels[i] == ignore_index
            a.m = m[i]
            a.s = s[i]
            ce_finish(ignored, &a, fl__log(a.s), &d[i], &target[i], wtotal, smoothing, &nll[i],
                      &smooth[i] if smoothing else NULL, &lse_out[i])


def row_values(x, int dtype, temperature, double softcap, const int64_t[::1] cols, double[::1] out):
    """out[i] = x[i, cols[i]] after softcap and temperature, computed as the kernels compute it
    (cols[i] < 0: left alone)."""
    cdef Block b = make_block(x, dtype, temperature, softcap, 1)
    cdef int64_t i
    cdef fl_row r
    with nogil:
        for i in range(b.rows):
            if cols[i] < 0:
                continue
            r = row_of(&b, i)
            out[i] = fl_row_value_f64(&r, cols[i]) if b.f64 else fl_row_value_f32(&r, cols[i])


def ent_states(x, int dtype, temperature, double softcap, double[::1] m_out, double[::1] s_out,
               double[::1] t_out, int64_t chunk, int threads):
    """The entropy state (m, s, t) of each row of x (columns of one chunk of the vocabulary)."""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t i
    cdef fl_row r
    cdef fl_ent_state e
    cdef char *buf = NULL
    threads = work_threads(&b, 1, threads)
    cdef char *bufs = alloc_buffers(threads, chunk * 8)
    with nogil, parallel(num_threads=threads):
        buf = bufs + threadid() * chunk * 8
        for i in prange(b.rows, schedule="guided"):
            r = row_of(&b, i)
            e = row_entropy(&b, &r, 0, b.n, buf)
            m_out[i] = e.m
            s_out[i] = e.s
            t_out[i] = e.t
    free(bufs)


def merge_ent_states(double[::1] m, double[::1] s, double[::1] t, const double[::1] m2,
                     const double[::1] s2, const double[::1] t2):
    """(m, s, t) <- merge((m, s, t), (m2, s2, t2)) row by row."""
    cdef int64_t i
    cdef fl_ent_state a, b
    with nogil:
        for i in range(m.shape[0]):
            a.m = m[i]
            a.s = s[i]
            a.t = t[i]
            b.m = m2[i]
            b.s = s2[i]
            b.t = t2[i]
            fl_ent_merge(&a, &b)
            m[i] = a.m
            s[i] = a.s
            t[i] = a.t


def ent_results(const double[::1] m, const double[::1] s, const double[::1] t, double[::1] out):
    """out[i] = the entropy of row state (m, s, t)[i] (fl_ent_result)."""
    cdef int64_t i
    cdef fl_ent_state a
    with nogil:
        for i in range(m.shape[0]):
            a.m = m[i]
            a.s = s[i]
            a.t = t[i]
            out[i] = fl_ent_result(&a)


cdef inline fl_lse_state lse_part(const fl_ent_state *e) noexcept nogil:
    """The logsumexp state (m, s) that an entropy state holds."""
    cdef fl_lse_state st
    st.m = e.m
    st.s = e.s
    return st


def stats(x, int dtype, temperature, double softcap, const int64_t[::1] labels, int64_t ignore_index,
          double[::1] nll, double[::1] ent, int64_t[::1] top, int64_t chunk, int threads):
    """One pass per row for an evaluation summary: entropy, argmax and, for rows whose label is not
    ignore_index (labels checked by the caller; an empty labels array means none), -log p[label] as
    cross_entropy computes it (0 for ignored rows)."""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t i
    cdef fl_row r
    cdef fl_ent_state e
    cdef fl_lse_state st
    cdef double xt = 0.0, lse
    cdef bint ignored
    cdef char *buf = NULL
    cdef bint have_labels = labels.shape[0] > 0
    threads = work_threads(&b, 1, threads)
    cdef char *bufs = alloc_buffers(threads, chunk * 8)
    with nogil, parallel(num_threads=threads):
        buf = bufs + threadid() * chunk * 8
        for i in prange(b.rows, schedule="guided"):
            r = row_of(&b, i)
            if b.f64:
                e = fl_row_stats_f64(&r, chunk, <double *> buf, &top[i])
            else:
                e = fl_row_stats_f32(&r, chunk, <float *> buf, &top[i])
            ent[i] = fl_ent_result(&e)
            ignored = not have_labels or labels[i] == ignore_index
            if not ignored:
                xt = fl_row_value_f64(&r, labels[i]) if b.f64 else fl_row_value_f32(&r, labels[i])
            st = lse_part(&e)      # (assigned whole, and lse too: Cython makes them thread-private)
            lse = 0.0
            ce_finish(ignored, &st, fl__log(e.s), NULL, &xt, 0.0, False, &nll[i], NULL, &lse)
    free(bufs)


# ---- cross_entropy's loss from its per-row parts (in memory, streamed, and the accumulators) ----------

def first_bad_label(const int64_t[::1] labels, int64_t ignore_index, int64_t V):
    """The index of the first label that is neither ignore_index nor in [0, V), or -1."""
    cdef int64_t i, bad = -1
    with nogil:
        for i in range(labels.shape[0]):
            if labels[i] != ignore_index and not 0 <= labels[i] < V:
                bad = i
                break
    return bad


cdef inline void add_to(double *s, double *c, double v) noexcept nogil:
    """s <- s + v, with Neumaier's compensation c (the sum is s + c)."""
    cdef double t = s[0] + v
    if fabs(s[0]) >= fabs(v):
        c[0] += (s[0] - t) + v
    else:
        c[0] += (v - t) + s[0]
    s[0] = t


cdef inline double total(double s, double c) noexcept nogil:
    """A compensated sum's value (s alone where it is inf or NaN: the compensation is then NaN)."""
    return s + c if -INFINITY < s < INFINITY else s


def compensated_sum(const double[::1] v):
    """The sum of v, with Neumaier's compensation (as ce_terms sums rows): for sums of block sums."""
    cdef double s = 0.0, c = 0.0
    cdef int64_t i
    for i in range(v.shape[0]):
        add_to(&s, &c, v[i])
    return total(s, c)


def ce_terms(const double[::1] nll, const double[::1] smooth, const double[::1] lse,
             const int64_t[::1] labels, int64_t ignore_index, const double[::1] weight, double eps,
             double z, int64_t V, double[::1] out, bint sums=True):
    """PyTorch's cross-entropy per row from its parts, and its sums. Per row n (all terms 0 where
    labels[n] == ignore_index; nll, smooth and lse are not read there): loss = w[y] nll, then with label
    smoothing eps > 0, loss = (1 - eps) loss + (eps / V) smooth (smooth: None when eps == 0); the z-loss
    term is z lse^2. out (None, or one per row) gets loss plus the z-loss term. weight: None (w = 1) or V
    values. Returns the compensated sums of the loss's two parts, (1 - eps) w[y] nll and (eps / V) smooth
    (PyTorch divides each by the target weights' sum: with a sum of 0 that keeps its NaN + inf = NaN), of
    w[y] and of the z-loss terms, and the number of counted rows; for V = 0 and eps > 0, eps / V is inf
    and every (ignored) row's loss is NaN, as in PyTorch. sums=False (per-row losses alone, for
    reduction="none"): the four sums are left at 0 (they took 4.0 of 4.4 ms at 409600 rows)."""
    cdef int64_t i, y, count = 0, n = labels.shape[0]
    cdef bint weighted = weight is not None, smoothing = eps > 0, zl = z > 0, rows = out is not None
    cdef double part, spart, wy, zt, a = eps / <double> V
    cdef double ns = 0.0, nc = 0.0, ss = 0.0, sc = 0.0, ws = 0.0, wc = 0.0, zs = 0.0, zc = 0.0
    if smoothing and smooth is None:
        raise ValueError("ce_terms: label smoothing needs the smooth terms")
    with nogil:
        for i in range(n):
            y = labels[i]
            part = 0.0
            spart = 0.0
            wy = 0.0
            zt = 0.0
            if y != ignore_index:
                count += 1
                wy = weight[y] if weighted else 1.0
                part = wy * nll[i]
                if zl:
                    zt = (z * lse[i]) * lse[i]     # (z lse) first: no overflow where the term is finite
            if smoothing:
                part = (1.0 - eps) * part
                spart = a * (smooth[i] if y != ignore_index else 0.0)
                if sums:
                    add_to(&ss, &sc, spart)
            if sums:
                add_to(&ns, &nc, part)
                if weighted:        # (else w[y] = 1: the sum is the count; and without z-loss its sum is
                    add_to(&ws, &wc, wy)    # 0: 409600 rows, 1.88 -> 1.62 ms)
                if zl:
                    add_to(&zs, &zc, zt)
            if rows:
                out[i] = (part + spart) + zt
    if sums and not weighted:
        ws = <double> count
    return total(ns, nc), total(ss, sc), total(ws, wc), total(zs, zc), count
