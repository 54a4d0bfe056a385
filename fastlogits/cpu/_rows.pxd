# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Internal declarations: the row drivers of fastlogits.h, and the block that the kernels share.

A *block* is a 2-D array of logits as it lies in memory (any dtype, any strides in bytes), with a
temperature per row and a softcap. ``row_of`` turns row i of a block into the C core's ``fl_row``.
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_STRIDES
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int64_t
from fastlogits.clib cimport fl_lse_state, fl_ent_state, fl_lse_merge


cdef extern from "fastlogits.h" nogil:
    enum:
        FL_F16
        FL_BF16
        FL_F32
        FL_F64
        FL_TILE
        FL_SHORT_F32
        FL_SHORT_F64

    ctypedef struct fl_row:
        const char *data
        int64_t n
        int64_t stride
        int dtype
        double temperature
        double softcap

    fl_lse_state fl_row_lse_f32(const fl_row *r, int64_t start, int64_t stop, int64_t chunk, float *buf)
    fl_lse_state fl_row_lse_f64(const fl_row *r, int64_t start, int64_t stop, int64_t chunk, double *buf)
    fl_ent_state fl_row_entropy_f32(const fl_row *r, int64_t start, int64_t stop, int64_t chunk,
                                    float *buf)
    fl_ent_state fl_row_entropy_f64(const fl_row *r, int64_t start, int64_t stop, int64_t chunk,
                                    double *buf)
    fl_lse_state fl_row_ce_f32(const fl_row *r, int64_t start, int64_t stop, int64_t chunk,
                               const float *w, double *dist, double *wsum, float *buf)
    fl_lse_state fl_row_ce_f64(const fl_row *r, int64_t start, int64_t stop, int64_t chunk,
                               const double *w, double *dist, double *wsum, double *buf)
    void fl__dist_merge(double *d, double *w, double m, double d2, double w2, double m2, double M)
    double fl__dist_total(double d, double W, double log_s)
    double fl__log(double x)
    void fl__log_n(const double *x, double *y, int64_t n)
    float fl_row_value_f32(const fl_row *r, int64_t j)
    double fl_row_value_f64(const fl_row *r, int64_t j)
    fl_lse_state fl_row_softmax_exp_f32(const fl_row *r, int64_t start, int64_t stop, int64_t chunk,
                                        float *y, float *my, float *buf)
    fl_lse_state fl_row_softmax_exp_f64(const fl_row *r, int64_t start, int64_t stop, int64_t chunk,
                                        double *y, double *my, double *buf)
    void fl_row_softmax_f32(const fl_row *r, int64_t start, int64_t stop, int64_t chunk,
                            const fl_lse_state *st, int log_, const float *my, float *e, char *out,
                            int64_t out_stride, int out_dtype, float *buf, float *ybuf)
    void fl_row_softmax_f64(const fl_row *r, int64_t start, int64_t stop, int64_t chunk,
                            const fl_lse_state *st, int log_, const double *my, double *e, char *out,
                            int64_t out_stride, int out_dtype, double *buf, double *ybuf)
    void fl_tile_load_f32(const fl_row *r, int64_t row_stride, const double *temperature, int64_t nr,
                          float *t, float *buf)
    void fl_tile_load_f64(const fl_row *r, int64_t row_stride, const double *temperature, int64_t nr,
                          double *t, double *buf)
    void fl__lse_tile_f32(const float *t, int64_t n, double *m, double *s)
    void fl__log_softmax_rows_f32(const float *x, int64_t ldx, float *y, int64_t ldy, int64_t nr, int64_t n,
                                  const double *m, const double *ls)
    void fl__log_softmax_rows_f64(const double *x, int64_t ldx, double *y, int64_t ldy, int64_t nr,
                                  int64_t n, const double *m, const double *ls)
    void fl__softmax_rows_f32(const float *x, int64_t ldx, float *y, int64_t ldy, int64_t nr, int64_t n,
                              const double *m, const double *s)
    void fl__softmax_rows_f64(const double *x, int64_t ldx, double *y, int64_t ldy, int64_t nr, int64_t n,
                              const double *m, const double *s)
    void fl__lse_tile_f64(const double *t, int64_t n, double *m, double *s)
    void fl__ent_tile_f32(const float *t, int64_t n, double *m, double *s, double *tt)
    void fl__ent_tile_f64(const double *t, int64_t n, double *m, double *s, double *tt)
    void fl_tile_map_f32(const float *t, int64_t n, int64_t nr, const double *m, const double *s, int log_,
                         char *out, int64_t out_row, int64_t out_col, int out_dtype, float *xbuf,
                         float *ybuf)
    void fl_tile_map_f64(const double *t, int64_t n, int64_t nr, const double *m, const double *s, int log_,
                         char *out, int64_t out_row, int64_t out_col, int out_dtype, double *xbuf,
                         double *ybuf)
    int fl_row_map_once_f32(const fl_row *r, int log_, char *out, int64_t out_stride, int out_dtype,
                            float *buf, float *ybuf)
    int fl_row_map_once_f64(const fl_row *r, int log_, char *out, int64_t out_stride, int out_dtype,
                            double *buf, double *ybuf)
    fl_ent_state fl_row_stats_f32(const fl_row *r, int64_t chunk, float *buf, int64_t *argmax)
    fl_ent_state fl_row_stats_f64(const fl_row *r, int64_t chunk, double *buf, int64_t *argmax)
    int64_t fl_row_argmax_f32(const fl_row *r, int64_t chunk, float *buf)
    int64_t fl_row_argmax_f64(const fl_row *r, int64_t chunk, double *buf)
    void fl_row_topk_f32(const fl_row *r, int64_t k, int64_t chunk, float *buf, float *hv,
                         int64_t *hi, float *out_v, int64_t *out_i, fl_lse_state *st)
    void fl_row_topk_f64(const fl_row *r, int64_t k, int64_t chunk, double *buf, double *hv,
                         int64_t *hi, double *out_v, int64_t *out_i, fl_lse_state *st)


cdef struct Block:
    const char *data
    int64_t rows
    int64_t n
    int64_t row_stride      # bytes
    int64_t col_stride      # bytes
    int dtype               # FL_F16 ... FL_F64
    bint f64                # compute in double (float64 input)
    const double *temperature   # one per row
    double softcap          # 0: none
    int64_t chunk


cdef inline fl_row row_of(const Block *b, int64_t i) noexcept nogil:
    cdef fl_row r
    r.data = b.data + i * b.row_stride
    r.n = b.n
    r.stride = b.col_stride
    r.dtype = b.dtype
    r.temperature = b.temperature[i]
    r.softcap = b.softcap
    return r


cdef inline size_t address_of(object a) except? 0:
    """The address of a NumPy array's first element, by the buffer protocol (without a format, so any
    dtype, bfloat16 too): __array_interface__ builds a dict for it, a few microseconds a call."""
    cdef Py_buffer view
    PyObject_GetBuffer(a, &view, PyBUF_STRIDES)
    cdef size_t p = <size_t> view.buf
    PyBuffer_Release(&view)
    return p


cdef inline Block make_block(object x, int dtype, object temperature, double softcap,
                             int64_t chunk) except *:
    """x: a 2-D NumPy array (any strides); temperature: a C-contiguous float64 array, one per row (kept
    alive by the caller)."""
    cdef Block b
    cdef Py_buffer view
    PyObject_GetBuffer(x, &view, PyBUF_STRIDES)    # x's address, shape and strides in one call
    if view.ndim != 2:
        PyBuffer_Release(&view)
        raise ValueError(f"fastlogits: the kernels take a 2-D (rows, V) array, got {view.ndim} axes")
    b.data = <const char *> view.buf
    b.rows = view.shape[0]
    b.n = view.shape[1]
    b.row_stride = view.strides[0]
    b.col_stride = view.strides[1]
    PyBuffer_Release(&view)
    b.dtype = dtype
    b.f64 = dtype == FL_F64
    b.temperature = <const double *> address_of(temperature)
    b.softcap = softcap
    b.chunk = chunk
    return b


cdef inline int64_t n_segments(const Block *b, int threads) noexcept nogil:
    """How many column ranges to split each row into (range g of nseg is columns
    [g * n // nseg, (g + 1) * n // nseg), computed inline in prange bodies so the bounds stay
    private), so that a few long rows still keep every thread
    busy: 1 when there are at least as many rows as threads."""
    cdef int64_t per_row, most
    if b.rows >= threads or b.rows == 0:
        return 1
    per_row = (threads + b.rows - 1) // b.rows
    most = b.n // (4 * b.chunk)         # each range at least a few chunks long
    if most < 1:
        return 1
    return per_row if per_row < most else most


cdef inline int work_threads(const Block *b, int64_t nseg, int threads) noexcept nogil:
    """The threads a parallel region over the b.rows * nseg items of a block opens: no more than there
    are items (a thread with nothing to do still costs its wake-up), at least 1."""
    cdef int64_t items = b.rows * nseg
    return <int> (threads if threads <= items else max(items, 1))


cdef inline fl_lse_state row_lse(const Block *b, int64_t i, int64_t start, int64_t stop,
                                 char *buf) noexcept nogil:
    """The logsumexp state of columns [start, stop) of row i (buf: a chunk of the compute type)."""
    cdef fl_row r = row_of(b, i)
    if b.f64:
        return fl_row_lse_f64(&r, start, stop, b.chunk, <double *> buf)
    return fl_row_lse_f32(&r, start, stop, b.chunk, <float *> buf)


# ---- short rows: FL_TILE rows at a time, a lane a row (see fl__lse_tile) --------------------------------

cdef inline bint short_rows(const Block *b, int64_t nseg) noexcept nogil:
    """Whether b's rows, whole (nseg == 1), are worked a tile of FL_TILE rows at a time."""
    return nseg == 1 and b.n < (FL_SHORT_F64 if b.f64 else FL_SHORT_F32)


cdef inline int64_t tile_bytes(const Block *b) noexcept nogil:
    """The scratch a thread needs for tile_states: a tile, and a row of the compute type."""
    return (FL_TILE + 1) * max(b.n, 1) * 8


cdef inline void tile_states(const Block *b, int64_t i0, int64_t nr, double *m, double *s, double *t,
                             char *scratch) noexcept nogil:
    """The logsumexp states (m[k], s[k]) of rows i0 + k, k < nr <= FL_TILE, of a block of short rows, and
    when t is not NULL their entropy states' t[k]; m, s and t hold FL_TILE values (those past nr are the
    zero rows'). scratch: tile_bytes(b)."""
    cdef fl_row r = row_of(b, i0)
    cdef char *buf = scratch + FL_TILE * max(b.n, 1) * 8
    if b.f64:
        fl_tile_load_f64(&r, b.row_stride, b.temperature + i0, nr, <double *> scratch, <double *> buf)
        if t == NULL:
            fl__lse_tile_f64(<const double *> scratch, b.n, m, s)
        else:
            fl__ent_tile_f64(<const double *> scratch, b.n, m, s, t)
    else:
        fl_tile_load_f32(&r, b.row_stride, b.temperature + i0, nr, <float *> scratch, <float *> buf)
        if t == NULL:
            fl__lse_tile_f32(<const float *> scratch, b.n, m, s)
        else:
            fl__ent_tile_f32(<const float *> scratch, b.n, m, s, t)


cdef inline void fold_lse(const Block *b, int64_t nseg, fl_lse_state *st, char *bufs, int64_t per_thread,
                          int threads) noexcept nogil:
    """The logsumexp state of every row into st[i * nseg]: range g of row i folded by some thread into
    st[i * nseg + g] (bufs: one scratch buffer of per_thread bytes a thread), then the ranges of each row
    merged in order, so the result does not depend on which thread folds which range (the number of
    ranges, n_segments, moves it by rounding only)."""
    cdef int64_t it, i, g
    cdef char *buf = NULL
    with parallel(num_threads=threads):
        buf = bufs + threadid() * per_thread
        for it in prange(b.rows * nseg, schedule="guided"):
            i = it // nseg
            g = it % nseg
            st[it] = row_lse(b, i, g * b.n // nseg, (g + 1) * b.n // nseg, buf)
    merge_ranges(st, b.rows, nseg)


cdef inline void merge_ranges(fl_lse_state *st, int64_t rows, int64_t nseg) noexcept nogil:
    """The nseg range states of each row (st[i * nseg + g]) merged in order into st[i * nseg]."""
    cdef int64_t i, g
    for i in range(rows):
        for g in range(1, nseg):
            fl_lse_merge(&st[i * nseg], &st[i * nseg + g])
