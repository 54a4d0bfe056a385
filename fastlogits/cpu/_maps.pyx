# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Softmax and log-softmax on the CPU: a logsumexp pass, then a pass that writes the map.

Design: the same (row, column range) work items as the reductions (see _reduce.pyx). The first pass folds
each range into a logsumexp state, the states of a row are merged, and the second pass reads the
finished state and writes every range, converting to the output dtype and stride as it goes.
"""
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free

from fastlogits.clib cimport fl_lse_state
from fastlogits.cpu._rows cimport (Block, make_block, n_segments, row_of, fold_lse, fl_row, work_threads,
                                   address_of, fl_row_softmax_f32, fl_row_softmax_f64)


def softmax(x, int dtype, temperature, double softcap, out, int out_dtype, bint log_, int64_t chunk,
            int threads, state=None):
    """Writes softmax (or log-softmax when log_) of each row of x into out, a 2-D array of the same
    shape (any strides) whose element type is out_dtype. state: None, or the rows' finished logsumexp
    states (m, s) as two float64 arrays, when x holds only some columns of its rows (streaming a row
    larger than memory): then the first pass is skipped."""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t nseg = n_segments(&b, threads), items = b.rows * nseg
    cdef int64_t it, i, g, start, stop
    cdef fl_row r
    cdef char *buf = NULL
    cdef char *obase = <char *> address_of(out)
    cdef int64_t orow = out.strides[0], ocol = out.strides[1]
    threads = work_threads(&b, nseg, threads)
    cdef char *bufs = <char *> malloc(threads * chunk * 16)
    cdef fl_lse_state *st = <fl_lse_state *> malloc(max(items, 1) * sizeof(fl_lse_state))
    if bufs == NULL or st == NULL:
        free(bufs)
        free(st)
        raise MemoryError("fastlogits: cannot allocate scratch buffers")
    cdef const double[::1] sm, ss
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
            r = row_of(&b, i)
            start = g * b.n // nseg
            stop = (g + 1) * b.n // nseg
            if b.f64:
                fl_row_softmax_f64(&r, start, stop, chunk, &st[i * nseg], log_, obase + i * orow,
                                   ocol, out_dtype, <double *> buf, <double *> (buf + chunk * 8))
            else:
                fl_row_softmax_f32(&r, start, stop, chunk, &st[i * nseg], log_, obase + i * orow,
                                   ocol, out_dtype, <float *> buf, <float *> (buf + chunk * 8))
    free(st)
    free(bufs)
