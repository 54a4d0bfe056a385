# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Selection on the CPU: argmax and top-k, one pass over each row (top-k with a large k: a few).

Design: one row per work item (selection states are small but their merge is not needed here: rows are
plentiful in practice). Values are compared after softcap and temperature, as every other function sees
them. top-k keeps a heap of k candidates per thread, and a block of values that cannot enter it is skipped
in vector code; where k is a large part of the row (k * 32 > V + 4096) it selects instead, a byte of the
values' keys a pass, and radix-sorts the k (fl_row_topk in fastlogits_impl.h).
"""
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.math cimport NAN, INFINITY

from fastlogits.clib cimport fl_lse_state
from fastlogits.cpu._rows cimport (Block, make_block, row_of, fl_row, work_threads, address_of,
                                   fl_row_argmax_f32, fl_row_argmax_f64, fl_row_topk_f32, fl_row_topk_f64,
                                   fl__log)


def argmax(x, int dtype, temperature, double softcap, int64_t[::1] out, int64_t chunk, int threads):
    """out[i] = index of the largest value of row i (lowest index on ties; first NaN wins)."""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t i
    cdef fl_row r
    cdef char *buf = NULL
    threads = work_threads(&b, 1, threads)
    cdef char *bufs = <char *> malloc(threads * chunk * 8)
    if bufs == NULL:
        raise MemoryError("fastlogits: cannot allocate scratch buffers")
    with nogil, parallel(num_threads=threads):
        buf = bufs + threadid() * chunk * 8
        for i in prange(b.rows, schedule="guided"):
            r = row_of(&b, i)
            if b.f64:
                out[i] = fl_row_argmax_f64(&r, chunk, <double *> buf)
            else:
                out[i] = fl_row_argmax_f32(&r, chunk, <float *> buf)
    free(bufs)


def top_k(x, int dtype, temperature, double softcap, int64_t k, values, int64_t[:, ::1] indices,
          double[:, ::1] logprobs, int64_t chunk, int threads):
    """The k largest values of each row, best first (NaN first, then larger, then lower index), into
    values (C-contiguous (rows, k), float32 or float64 as the compute dtype) and indices. When logprobs
    is not None, the row's logsumexp state is folded in the same pass and logprobs[i, j] =
    (values[i, j] - m) - log s (NaN where the row's softmax is NaN)."""
    cdef Block b = make_block(x, dtype, temperature, softcap, chunk)
    cdef int64_t i, j
    cdef fl_row r
    cdef char *buf = NULL
    cdef fl_lse_state *st = NULL
    cdef double log_s, v
    cdef bint want_lp = logprobs is not None
    cdef char *vals = <char *> address_of(values)
    cdef int64_t st_off = chunk * 8 + k * 16   # per thread: chunk, heap values, heap indices, state
    cdef int64_t per_thread = st_off + sizeof(fl_lse_state)
    threads = work_threads(&b, 1, threads)
    cdef char *bufs = <char *> malloc(threads * per_thread)
    if bufs == NULL:
        raise MemoryError("fastlogits: cannot allocate scratch buffers")
    with nogil, parallel(num_threads=threads):
        buf = bufs + threadid() * per_thread
        st = <fl_lse_state *> (buf + st_off)
        for i in prange(b.rows, schedule="guided"):
            r = row_of(&b, i)
            if b.f64:
                fl_row_topk_f64(&r, k, chunk, <double *> buf, <double *> (buf + chunk * 8),
                                <int64_t *> (buf + chunk * 8 + k * 8), <double *> vals + i * k,
                                &indices[i, 0], st if want_lp else NULL)
            else:
                fl_row_topk_f32(&r, k, chunk, <float *> buf, <float *> (buf + chunk * 8),
                                <int64_t *> (buf + chunk * 8 + k * 8), <float *> vals + i * k,
                                &indices[i, 0], st if want_lp else NULL)
            if want_lp:
                log_s = fl__log(st.s)
                for j in range(k):
                    v = (<double *> vals)[i * k + j] if b.f64 else (<float *> vals)[i * k + j]
                    # (x - m) - log s, as log_softmax computes it; NaN where softmax is NaN
                    logprobs[i, j] = (v - st.m) - log_s if -INFINITY < st.m < INFINITY else NAN
    free(bufs)
