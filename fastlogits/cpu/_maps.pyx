# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Softmax and log-softmax on the CPU: a logsumexp pass, then a pass that writes the map.

Design: the same (row, column range) work items as the reductions (see _reduce.pyx). The first pass folds
each range into a logsumexp state, the states of a row are merged, and the second pass reads the
finished state and writes every range, converting to the output dtype and stride as it goes.

Softmax computes one exp per logit, as PyTorch's does: its first pass stores the terms exp(x - m_k) that
the logsumexp sums (m_k: the running max with chunk k folded in), in the output itself when it has the
compute type and is contiguous, else in scratch memory (a row a thread, or every row when rows are split
into ranges), and the second pass scales them by exp(m_k - m) / s. Where that scratch would pass
TERMS_LIMIT bytes, and for log-softmax (whose map needs no exp) or a streamed slice of rows, the second
pass computes from the logits again.

A row that is one chunk (a classifier's, say) takes both passes in one call (fl_row_map_once: the same
arithmetic, bit for bit), where two row drivers cost more than the row: float32 (409600, 16), one thread,
softmax 16.6 -> 12.6 ms, log-softmax 17.1 -> 12.3 ms. It reads a row of another dtype, or one with a
temperature or softcap, converted and transformed once into a buffer (the two passes did it twice).

Short rows (fewer than 32 values computed in float32, 16 in float64: a classifier's) go a tile of 64 rows
at a time instead, a lane a row (map_tile; see fl__lse_tile): float32 (409600, 16), one thread, alone,
log-softmax 22.3 -> 11.0 ms, softmax 11.9 -> 10.0 (which then computes each exp twice: the states', and
the map's).
"""
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.math cimport INFINITY

from fastlogits.clib cimport fl_lse_state
from fastlogits.cpu._rows cimport (Block, make_block, n_segments, row_of, fold_lse, merge_ranges, fl_row,
                                   work_threads, address_of, FL_F32, FL_F64, fl_row_softmax_exp_f32,
                                   fl_row_softmax_exp_f64, fl_row_softmax_f32, fl_row_softmax_f64,
                                   fl_row_map_once_f32, fl_row_map_once_f64, row_lse, FL_TILE, short_rows,
                                   tile_bytes, tile_states, fl__log_n, fl__log_softmax_rows_f32,
                                   fl__log_softmax_rows_f64, fl__softmax_rows_f32, fl__softmax_rows_f64,
                                   fl_tile_map_f32, fl_tile_map_f64)

# rows of one chunk in one call (fl_row_map_once); the tests switch it off to compare with the two passes
ONE_CALL = True

# the most scratch memory, in bytes, that softmax takes to hold its terms; beyond, it computes exp twice
TERMS_LIMIT = 1 << 26


cdef inline void exp_pass(const Block *b, int64_t i, int64_t start, int64_t stop, char *y, char *my,
                          fl_lse_state *st, char *buf) noexcept nogil:
    """Softmax's first pass over columns [start, stop) of row i: its state into *st, its terms into y (an
    array of the compute type from column start) and the chunks' maxes into my."""
    cdef fl_row r = row_of(b, i)
    if b.f64:
        st[0] = fl_row_softmax_exp_f64(&r, start, stop, b.chunk, <double *> y, <double *> my, <double *> buf)
    else:
        st[0] = fl_row_softmax_exp_f32(&r, start, stop, b.chunk, <float *> y, <float *> my, <float *> buf)


cdef inline bint row_at_once(const Block *b, int64_t i, bint log_, char *out, int64_t ocol, int out_dtype,
                             char *buf) noexcept nogil:
    """Softmax (or log-softmax when log_) of row i (one chunk) into out (its element 0) in one call, when
    the row allows it (see fl_row_map_once). buf: 2 chunks of doubles."""
    cdef fl_row r = row_of(b, i)
    if b.f64:
        return fl_row_map_once_f64(&r, log_, out, ocol, out_dtype, <double *> buf,
                                   <double *> (buf + b.chunk * 8))
    return fl_row_map_once_f32(&r, log_, out, ocol, out_dtype, <float *> buf, <float *> (buf + b.chunk * 8))


cdef inline void map_pass(const Block *b, int64_t i, int64_t start, int64_t stop, const fl_lse_state *st,
                          bint log_, const char *my, char *e, char *out, int64_t ocol, int out_dtype,
                          char *buf) noexcept nogil:
    """The map of columns [start, stop) of row i into out (the row's element 0), given the row's state:
    from exp_pass's terms and maxes, or from the logits when my is NULL. buf: 2 chunks of doubles."""
    cdef fl_row r = row_of(b, i)
    if b.f64:
        fl_row_softmax_f64(&r, start, stop, b.chunk, st, log_, <const double *> my, <double *> e, out, ocol,
                           out_dtype, <double *> buf, <double *> (buf + b.chunk * 8))
    else:
        fl_row_softmax_f32(&r, start, stop, b.chunk, st, log_, <const float *> my, <float *> e, out, ocol,
                           out_dtype, <float *> buf, <float *> (buf + b.chunk * 8))


cdef void map_tile(const Block *b, int64_t i0, bint log_, bint plain, char *obase, int64_t orow,
                   int64_t ocol, int out_dtype, char *scratch, char *buf) noexcept nogil:
    """Softmax (log-softmax when log_) of the tile of short rows from i0 into out (row i at obase + i *
    orow): their states (tile_states) at once, then the rows written: in one call from the logits where
    they are plain (rows of the compute type in and out, contiguous, no transform: fl__softmax_rows,
    fl__log_softmax_rows, with the logs of the sums in one vector loop), else from the tile, which holds
    them transformed in the compute type (fl_tile_map: fl_row_softmax on each, any layout and output;
    also the rows whose max is not finite). The same arithmetic either way. scratch: tile_bytes; buf: 2
    rows of doubles (b.n may pass the chunk)."""
    cdef double m[FL_TILE]
    cdef double s[FL_TILE]
    cdef double ls[FL_TILE]
    cdef int64_t k, nr = min(b.rows - i0, FL_TILE)
    cdef const char *x = b.data + i0 * b.row_stride
    cdef char *y = obase + i0 * orow
    cdef bint finite = True
    tile_states(b, i0, nr, m, s, NULL, scratch)
    if plain:
        if log_:
            fl__log_n(s, ls, FL_TILE)
        if log_ and b.f64:
            fl__log_softmax_rows_f64(<const double *> x, b.row_stride // 8, <double *> y, orow // 8, nr,
                                     b.n, m, ls)
        elif log_:
            fl__log_softmax_rows_f32(<const float *> x, b.row_stride // 4, <float *> y, orow // 4, nr,
                                     b.n, m, ls)
        elif b.f64:
            fl__softmax_rows_f64(<const double *> x, b.row_stride // 8, <double *> y, orow // 8, nr, b.n, m,
                                 s)
        else:
            fl__softmax_rows_f32(<const float *> x, b.row_stride // 4, <float *> y, orow // 4, nr, b.n, m,
                                 s)
        for k in range(nr):
            finite = finite and -INFINITY < m[k] < INFINITY
        if finite:
            return
    # every row from the tile (after the plain call: its rows whose max is not finite, all NaN)
    if b.f64:
        fl_tile_map_f64(<const double *> scratch, b.n, nr, m, s, log_, y, orow, ocol, out_dtype,
                        <double *> buf, <double *> (buf + b.n * 8))
    else:
        fl_tile_map_f32(<const float *> scratch, b.n, nr, m, s, log_, y, orow, ocol, out_dtype,
                        <float *> buf, <float *> (buf + b.n * 8))


def softmax(x, int dtype, temperature, double softcap, out, int out_dtype, bint log_, int64_t chunk,
            int threads, state=None):
    """Writes softmax (or log-softmax when log_) of each row of x into out, a 2-D array of the same
    shape (any strides) whose element type is out_dtype. state: None, or the rows' finished logsumexp
    states (m, s) as two float64 arrays, when x holds only some columns of its rows (streaming a row
    larger than memory): then the first pass is skipped."""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t nseg = n_segments(&b, threads), items = b.rows * nseg
    cdef int64_t it, i, g, start
    cdef char *buf = NULL
    cdef char *obase = <char *> address_of(out)
    cdef int64_t orow = out.strides[0], ocol = out.strides[1]
    threads = work_threads(&b, nseg, threads)
    # softmax's terms: in out, or in scratch, one row a thread (each thread's rows whole) or every row
    cdef int64_t isz = 8 if b.f64 else 4
    cdef bint direct = out_dtype == (FL_F64 if b.f64 else FL_F32) and ocol == isz
    cdef bint tiled = state is None and short_rows(&b, nseg)     # a tile of rows at a time, a lane a row
    cdef bint once = not log_ and state is None and not tiled
    cdef bint whole = nseg == 1
    # a row that is one chunk: both passes in one call; a tile's rows of the compute type read and written
    # in place: the tile's plain map
    cdef bint one_call = ONE_CALL and b.n <= chunk
    cdef bint plain_rows = (direct and b.n <= chunk and b.softcap == 0 and b.col_stride == isz
                            and b.dtype == (FL_F64 if b.f64 else FL_F32))
    cdef int64_t nck = ((b.n + nseg - 1) // nseg + chunk - 1) // chunk      # chunks in a range, at most
    cdef int64_t term_rows = 0 if direct else (threads if whole else b.rows)
    if term_rows * b.n * isz > TERMS_LIMIT:
        once = False
    cdef char *terms = NULL
    cdef char *maxes = NULL
    cdef char *y = NULL
    cdef char *e = NULL
    cdef char *my = NULL
    cdef char *bufs = <char *> malloc(threads * chunk * 16)
    cdef fl_lse_state *st = <fl_lse_state *> malloc(max(items, 1) * sizeof(fl_lse_state))
    if once:
        terms = <char *> malloc(max(term_rows * b.n * isz, 1))
        maxes = <char *> malloc(max((threads if whole else items) * nck * isz, 1))
    if bufs == NULL or st == NULL or (once and (terms == NULL or maxes == NULL)):
        free(bufs)
        free(st)
        free(terms)
        free(maxes)
        raise MemoryError("fastlogits: cannot allocate scratch buffers")
    cdef const double[::1] sm, ss
    cdef int64_t per = tile_bytes(&b) + max(b.n, 1) * 16
    cdef char *tiles = NULL
    cdef bint plain = False
    if tiled:
        tiles = <char *> malloc(threads * per)
        if tiles == NULL:
            free(bufs)
            free(st)
            raise MemoryError("fastlogits: cannot allocate scratch buffers")
        plain = plain_rows and orow % isz == 0 and b.row_stride % isz == 0
        for i in range(b.rows):
            plain = plain and b.temperature[i] == 1.0
        with nogil, parallel(num_threads=threads):
            buf = tiles + threadid() * per
            for it in prange((b.rows + FL_TILE - 1) // FL_TILE, schedule="guided"):
                map_tile(&b, it * FL_TILE, log_, plain, obase, orow, ocol, out_dtype, buf,
                         buf + tile_bytes(&b))
        free(tiles)
    elif log_ and state is None and whole:  # a row a thread: its state, then its map (the row in cache)
        with nogil, parallel(num_threads=threads):
            buf = bufs + threadid() * chunk * 16
            for i in prange(b.rows, schedule="guided"):
                if one_call and row_at_once(&b, i, 1, obase + i * orow, ocol, out_dtype, buf):
                    continue
                st[i] = row_lse(&b, i, 0, b.n, buf)
                map_pass(&b, i, 0, b.n, &st[i], 1, NULL, NULL, obase + i * orow, ocol, out_dtype, buf)
    elif not once:
        if state is not None:
            sm, ss = state
            for i in range(b.rows):
                st[i * nseg].m = sm[i]
                st[i * nseg].s = ss[i]
        else:
            with nogil:
                fold_lse(&b, nseg, st, bufs, chunk * 16, threads)
        with nogil, parallel(num_threads=threads):
            buf = bufs + threadid() * chunk * 16
            for it in prange(items, schedule="guided"):
                i = it // nseg
                g = it % nseg
                map_pass(&b, i, g * b.n // nseg, (g + 1) * b.n // nseg, &st[i * nseg], log_, NULL, NULL,
                         obase + i * orow, ocol, out_dtype, buf)
    elif whole:             # each row by one thread, both passes at once: its terms still in cache
        with nogil, parallel(num_threads=threads):
            buf = bufs + threadid() * chunk * 16
            my = maxes + threadid() * nck * isz
            e = NULL if direct else terms + threadid() * b.n * isz
            for i in prange(b.rows, schedule="guided"):
                y = obase + i * orow if direct else e
                if one_call and row_at_once(&b, i, 0, obase + i * orow, ocol, out_dtype, buf):
                    continue
                exp_pass(&b, i, 0, b.n, y, my, &st[i], buf)
                map_pass(&b, i, 0, b.n, &st[i], 0, my, e, obase + i * orow, ocol, out_dtype, buf)
    else:                   # a few rows, split into ranges: every range's terms, the states merged, the map
        with nogil, parallel(num_threads=threads):
            buf = bufs + threadid() * chunk * 16
            for it in prange(items, schedule="guided"):
                i = it // nseg
                g = it % nseg
                start = g * b.n // nseg
                y = obase + i * orow + start * isz if direct else terms + (i * b.n + start) * isz
                exp_pass(&b, i, start, (g + 1) * b.n // nseg, y, maxes + it * nck * isz, &st[it], buf)
        with nogil:
            merge_ranges(st, b.rows, nseg)
        with nogil, parallel(num_threads=threads):
            buf = bufs + threadid() * chunk * 16
            for it in prange(items, schedule="guided"):
                i = it // nseg
                g = it % nseg
                start = g * b.n // nseg
                e = NULL if direct else terms + (i * b.n + start) * isz
                map_pass(&b, i, start, (g + 1) * b.n // nseg, &st[i * nseg], 0, maxes + it * nck * isz, e,
                         obase + i * orow, ocol, out_dtype, buf)
    free(maxes)
    free(terms)
    free(st)
    free(bufs)
