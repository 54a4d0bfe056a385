# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Copies between memory layouts: a 2-D array of 2-, 4- or 8-byte elements into another of the same shape,
any strides on either side, a tile at a time (``copy``), or rows at any address a memcpy each
(``copy_runs``, for unaligned arrays); and the reads of a Fortran-order file's rows, a column at a time
(``read_columns``).

The row kernels read a row of a transposed or Fortran-order array one element per cache line, and each
line holds the same column of the neighbouring rows: by the time they are read, it has left the cache. So
such rows are copied into C order a block at a time (cpu/backend.py ``blocks``), and a map's result out to
such an array. NumPy's copy of a transposed array goes a row at a time (float32 (32000, 1024).T: 265 ms,
25x a contiguous copy).

When either side is laid out by columns, its columns are the outer axis: a tile is TILE steps along it
(columns) by up to TILE_IN elements along the inner axis, where that side's memory runs (rows), so each
step reads or writes a run of consecutive lines there, and the other side (the C-order block, in L2)
takes the tile's TILE_IN rows a line each. Consecutive tiles follow along the outer axis, and each step
prefetches the lines of the step TILE ahead: a row or column further on, which no hardware prefetcher
predicts. One thread, float32, blocks of rows as cpu/backend.py makes them, in ns an element: (32000,
1024).T 4.1 without prefetching, 0.8 with; (1000, 8192).T 2.3, 1.9 prefetching each run's two ends, 0.6
all of its lines.
"""
from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.errno cimport EINTR, errno
from libc.stdlib cimport llabs
from libc.string cimport memcpy, strerror
from posix.unistd cimport pread

from fastlogits.cpu._rows cimport address_of

ctypedef fused elem:
    uint16_t
    uint32_t
    uint64_t

cdef enum:
    TILE = 32           # steps along the outer axis in a tile, and the prefetch distance in steps
    TILE_IN = 128       # elements along the inner axis: float32, 8 lines a step (32 and 256 were slower)


cdef extern from *:
    """
    /* Prefetch the lines of bytes lo, lo + step, ... up to hi (and hi) from p, for reading (into L2,
     * which takes more misses in flight than L1) or writing. Integer arithmetic: they may lie past the
     * array (the last tile's step TILE ahead), where a prefetch is harmless but a pointer may not point.
     * A macro: GCC drops the calls to a helper function that prefetches, taking it for one without
     * effects. */
    #define FL__AT(p, off) ((const void *)((uintptr_t)(p) + (uintptr_t)(off)))
    #define FL__SPAN(p, lo, hi, step, rw, loc) do {                                        \
        for (int64_t o_ = (lo); o_ < (hi); o_ += (step)) __builtin_prefetch(FL__AT(p, o_), rw, loc); \
        __builtin_prefetch(FL__AT(p, hi), rw, loc);                                    \
    } while (0)
    #define FL__SPAN_READ(p, lo, hi, step) FL__SPAN(p, lo, hi, step, 0, 2)
    #define FL__SPAN_WRITE(p, lo, hi, step) FL__SPAN(p, lo, hi, step, 1, 3)
    """
    void prefetch_read "FL__SPAN_READ"(const void *p, int64_t lo, int64_t hi, int64_t step) noexcept nogil
    void prefetch_write "FL__SPAN_WRITE"(const void *p, int64_t lo, int64_t hi, int64_t step) noexcept nogil


cdef void copy_tile(const elem *src, int64_t so, int64_t si, elem *dst, int64_t wo, int64_t wi,
                    int64_t nout, int64_t nin) noexcept nogil:
    """dst[k, u] = src[k, u] for k < nout, u < nin, strides in elements: (so, si) for the source, (wo,
    wi) for the destination. A side whose memory runs along the inner axis gets the lines of step k +
    TILE prefetched at step k: each line of it, or each element's where they lie a line apart or more."""
    cdef int64_t k, u, a, b, e = sizeof(elem)
    cdef bint src_runs = llabs(si) <= llabs(so), dst_runs = llabs(wi) <= llabs(wo)
    cdef int64_t src_step = max(64, llabs(si) * e), dst_step = max(64, llabs(wi) * e)
    for k in range(nout):
        if src_runs:
            a = (k + TILE) * so * e
            b = a + (nin - 1) * si * e
            prefetch_read(src, min(a, b), max(a, b), src_step)
        if dst_runs:
            a = (k + TILE) * wo * e
            b = a + (nin - 1) * wi * e
            prefetch_write(dst, min(a, b), max(a, b), dst_step)
        for u in range(nin):
            dst[k * wo + u * wi] = src[k * so + u * si]


cdef void copy_2d(const elem *src, int64_t so, int64_t si, elem *dst, int64_t wo, int64_t wi,
                  int64_t nout, int64_t nin, int threads) noexcept nogil:
    """copy_tile over the whole array: a thread's tiles in order along the outer axis."""
    cdef int64_t tout = (nout + TILE - 1) // TILE, tin = (nin + TILE_IN - 1) // TILE_IN, t, k0, u0
    for t in prange(tout * tin, num_threads=threads, schedule="static"):
        k0 = t % tout * TILE
        u0 = t // tout * TILE_IN
        copy_tile(src + k0 * so + u0 * si, so, si, dst + k0 * wo + u0 * wi, wo, wi,
                  min(TILE, nout - k0), min(TILE_IN, nin - u0))


def copy(src, dst, int threads):
    """dst[...] = src: two 2-D NumPy arrays of one shape and one element size (2, 4 or 8 bytes, any
    dtype: the bits are copied), aligned (their addresses and strides multiples of the element size)."""
    cdef int64_t size = src.itemsize
    if src.ndim != 2 or dst.shape != src.shape or dst.itemsize != size or size not in (2, 4, 8):
        raise ValueError(f"fastlogits: copy takes two 2-D arrays of one shape and element size, got "
                         f"{src.shape} ({src.dtype}) and {dst.shape} ({dst.dtype})")
    if not (src.flags.aligned and dst.flags.aligned):
        raise ValueError("fastlogits: copy takes aligned arrays (addresses and strides multiples of the "
                         "element size)")
    cdef int64_t rows = src.shape[0], cols = src.shape[1]
    cdef int64_t sr = src.strides[0] // size, sc = src.strides[1] // size
    cdef int64_t dr = dst.strides[0] // size, dc = dst.strides[1] // size
    if rows == 0 or cols == 0:
        return
    cdef size_t ps = address_of(src), pd = address_of(dst)
    if llabs(sr) < llabs(sc) or llabs(dr) < llabs(dc):      # a side laid out by columns: outer axis
        sr, sc, dr, dc, rows, cols = sc, sr, dc, dr, cols, rows
    with nogil:
        if size == 2:
            copy_2d(<const uint16_t *> ps, sr, sc, <uint16_t *> pd, dr, dc, rows, cols, threads)
        elif size == 4:
            copy_2d(<const uint32_t *> ps, sr, sc, <uint32_t *> pd, dr, dc, rows, cols, threads)
        else:
            copy_2d(<const uint64_t *> ps, sr, sc, <uint64_t *> pd, dr, dc, rows, cols, threads)


def copy_runs(src, dst, int threads):
    """dst[...] = src: two 2-D NumPy arrays of one shape and element size whose rows are each a run of
    consecutive elements (the last axis's stride is the element size), at any address: a memcpy a row,
    rows shared among the threads. For unaligned arrays (np.frombuffer at an odd offset), which the
    kernels may not read as their element type and which NumPy copies on one thread."""
    cdef int64_t size = src.itemsize
    if (src.ndim != 2 or dst.shape != src.shape or dst.itemsize != size
            or (src.size and src.shape[1] > 1 and (src.strides[1] != size or dst.strides[1] != size))):
        raise ValueError(f"fastlogits: copy_runs takes two 2-D arrays of one shape and element size with "
                         f"rows of consecutive elements, got {src.shape} ({src.dtype}, strides "
                         f"{src.strides}) and {dst.shape} ({dst.dtype}, strides {dst.strides})")
    cdef int64_t rows = src.shape[0], run = src.shape[1] * size, r
    cdef int64_t sr = src.strides[0], dr = dst.strides[0]
    cdef const char *ps = <const char *> address_of(src)
    cdef char *pd = <char *> address_of(dst)
    if rows == 0 or run == 0:
        return
    for r in prange(rows, nogil=True, num_threads=threads, schedule="static"):
        memcpy(pd + r * dr, ps + r * sr, run)


def read_columns(int fd, out, int64_t pos, int64_t stride):
    """Read the columns of `out`, a 2-D NumPy array whose columns are contiguous (n, c), from the file
    descriptor fd: column j's n values from byte pos + j * stride (the rows r0..r0 + n of a Fortran-order
    file, a column at a time), with the GIL released. Returns the number of columns read whole: c, or
    fewer where the file ended (a file that shrank)."""
    if out.ndim != 2:
        raise ValueError(f"fastlogits: read_columns takes a 2-D array, got shape {out.shape}")
    cdef int64_t size = out.itemsize, n = out.shape[0], c = out.shape[1]
    if n == 0 or c == 0:
        return c
    if n > 1 and out.strides[0] != size:
        raise ValueError(f"fastlogits: read_columns takes a 2-D array with contiguous columns, got shape "
                         f"{out.shape}, strides {out.strides}")
    cdef char *base = <char *> address_of(out)
    cdef int64_t step = out.strides[1], seg = n * size, j = 0, done
    cdef ssize_t got = 1
    cdef int err = 0
    with nogil:
        while j < c and got > 0:
            done = 0
            while done < seg:
                got = pread(fd, base + j * step + done, seg - done, pos + j * stride + done)
                if got < 0 and errno == EINTR:
                    continue
                if got <= 0:
                    err = errno if got < 0 else 0
                    break
                done += got
            if got > 0:
                j += 1
    if err:
        raise OSError(err, strerror(err).decode("utf-8", "replace"))
    return j
