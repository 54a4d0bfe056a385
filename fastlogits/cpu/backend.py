"""The CPU backend: the backend interface (see ``fastlogits/ops/_backend.py``) over the Cython kernels.

Each function takes a 2-D NumPy array ``x`` of shape (rows, V) with any strides, ``dtype`` (the element
type's name: "float16", "bfloat16", "float32" or "float64"; ``x`` holds such elements), ``temperature`` (a
C-contiguous float64 array, one per row), ``softcap`` (0.0 for none), ``chunk`` (vocabulary elements per
step) and ``threads``; it returns new arrays.

Logits laid out by columns (a transposed or Fortran-order array) are copied into C order a block of rows
at a time before the kernels see them, and a map's output laid out by columns is written through such a
block (see ``blocks``).
"""
import numpy as np

try:
    from fastlogits.cpu import _layout, _maps, _reduce, _select
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "fastlogits' compiled CPU kernels are missing or do not load "
        f"({e}). Reinstall with a C compiler available: 'pip install --force-reinstall fastlogits' "
        "(from a source tree: 'pip install .')."
    ) from e

from fastlogits.ops._prep import compute_dtype, weight_sum

CODES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}

LINE = 64                 # bytes in a cache line
# rows shorter than these (computed in float32, float64) are worked a tile of rows at a time
SHORT = {np.dtype(np.float32): _reduce.SHORT_F32, np.dtype(np.float64): _reduce.SHORT_F64}
BLOCK_BYTES = 1 << 20     # a block of rows copied into C order: about this size, L2's


def by_columns(a):
    """Whether a 2-D array is laid out by columns: its rows closer together in memory than its
    columns. A row kernel would read one element a cache line from it, and that line holds the same
    column of the neighbouring rows, gone from the cache by the time they are read: float32 (1024,
    32000) logsumexp over such a view took 220 ms, against 10 ms in C order."""
    s0, s1 = a.strides
    return 0 < abs(s0) < abs(s1) and a.shape[0] > 1


def through_blocks(a):
    """Whether the kernels take a 2-D array through C-order block buffers (blocks): laid out by columns,
    or not aligned (an address or a stride that is not a multiple of the element size, as np.frombuffer
    at an odd offset or a field of a packed record gives), which C may not access as its element type."""
    return by_columns(a) or not a.flags.aligned


def aligned(a):
    """a, or an aligned copy of it where through_blocks would copy it for not being aligned: for a
    chunk that a kernel reads whole (an accumulator's, a streamed row's)."""
    return a if a.flags.aligned else a.copy()


ALL = slice(None)


def blocks(a, threads, out=False):
    """(rows, block) pairs that cover a 2-D array: just (ALL, a) unless through_blocks(a); else slices
    of rows and C-order buffers of them, about BLOCK_BYTES (L2's size) or a row per thread, in whole
    cache lines of each column, so that each line is read from memory once. Long rows by columns thus
    take 64 bytes of rows at least (16 float32 rows), and the last block takes the rest, up to twice
    the others: a (4, 2**21) float32 array laid out by columns is copied whole (a memory audit;
    PyTorch copies it whole too). The buffer is reused: each block is meant to be done with before the
    next. With out=True the buffer starts empty and is written back into its rows of a when the next
    pair is asked for (so the loop over the pairs must run to its end)."""
    if not through_blocks(a) or a.size == 0:
        return ((ALL, a),)
    return _copied_blocks(a, threads, out)


def _copied_blocks(a, threads, out):
    rows, row_bytes = a.shape[0], a.shape[1] * a.itemsize
    per_line = max(LINE // abs(a.strides[0]), 1) if by_columns(a) else 1     # (else perhaps a zero stride)
    # a row a thread at least, and the last block takes the rest: a block of fewer rows than threads
    # would split them into column ranges (n_segments), and results would move by rounding from those of
    # the same rows in C order
    n = max(per_line, BLOCK_BYTES // row_bytes, threads)
    n = (n + per_line - 1) // per_line * per_line
    count = max(rows // n, 1)
    buf = np.empty((rows - (count - 1) * n, a.shape[1]), a.dtype)
    for i in range(count):
        r = slice(i * n, rows if i == count - 1 else (i + 1) * n)
        b = buf[:r.stop - r.start]
        if not out:
            copy_rows(a[r], b, threads)
        yield r, b
        if out:
            copy_rows(b, a[r], threads)


def row_blocks(a, dtype, threads):
    """blocks(a, threads) for logits, but a itself where its rows are short (the kernels work them a tile
    of rows at a time: fl__lse_tile) and laid out by columns and aligned: a tile's column of rows is then
    a run of memory, read in place (float32 logsumexp of a (409600, 16) array's transpose, one thread:
    11.4 ms through C-order blocks, 5.5 in place)."""
    if by_columns(a) and a.shape[1] < SHORT[compute_dtype(dtype)] and a.flags.aligned:
        return ((ALL, a),)
    return blocks(a, threads)


def copy_rows(a, out, threads):
    """out[...] = a, two 2-D arrays of one shape and dtype, by the tiled copy where either is laid out by
    columns and both are aligned (NumPy's copy of such an array goes a row at a time, 25x slower), by a
    memcpy a row on all threads where one is not aligned and both have rows of consecutive elements (an
    unaligned array's block: NumPy's copy runs on one thread), else by NumPy: the blocks' copies, and the
    GPU backend's uploads of host logits (which start no OpenMP threads for aligned rows)."""
    if (by_columns(a) or by_columns(out)) and a.flags.aligned and out.flags.aligned:
        _layout.copy(a, out, threads)
    elif not (a.flags.aligned and out.flags.aligned) and a.dtype == out.dtype and runs(a) and runs(out):
        _layout.copy_runs(a, out, threads)
    else:
        np.copyto(out, a)
    return out


def runs(a):
    """Whether each row of a 2-D array is a run of consecutive elements, for copy_runs' memcpy a row."""
    return a.shape[1] <= 1 or a.strides[1] == a.itemsize


def lse(x, dtype, temperature, softcap, chunk, threads):
    out = np.empty(x.shape[0], np.float64)
    for r, xb in row_blocks(x, dtype, threads):
        _reduce.lse(xb, CODES[dtype], temperature[r], softcap, out[r], chunk, threads)
    return out


def entropy(x, dtype, temperature, softcap, chunk, threads):
    out = np.empty(x.shape[0], np.float64)
    for r, xb in row_blocks(x, dtype, threads):
        _reduce.entropy(xb, CODES[dtype], temperature[r], softcap, out[r], chunk, threads)
    return out


def softmax(x, dtype, temperature, softcap, log, out, out_dtype, chunk, threads):
    """Fills out (rows, V), of element type out_dtype (a name as for dtype)."""
    if not through_blocks(out):
        # (softmax's short rows by columns go through C-order blocks all the same: written from the tile in
        # place, a row at a time with an exp a value again, float32 (409600, 16).T took 17.4 ms, through
        # the blocks' plain path 13.1-13.4; log-softmax's are read in place, 12.6 against 16.9)
        for r, xb in row_blocks(x, dtype, threads) if log else blocks(x, threads):
            _maps.softmax(xb, CODES[dtype], temperature[r], softcap, out[r], CODES[out_dtype], log, chunk,
                          threads)
        return out
    for r, ob in blocks(out, threads, out=True):
        for r2, xb in blocks(x[r], threads):
            _maps.softmax(xb, CODES[dtype], temperature[r][r2], softcap, ob[r2], CODES[out_dtype], log,
                          chunk, threads)
    return out


def cross_entropy_rows(x, dtype, temperature, softcap, labels, ignore_index, weight, smoothing, chunk,
                       threads):
    """Per-row (nll, smooth, lse), float64: nll = lse - x[label] (unweighted), smooth = -sum_c w_c log p_c
    (w = 1 without weights; None unless smoothing), 0 for ignored rows. labels: int64 (rows,), checked."""
    rows = x.shape[0]
    nll, lse_ = np.empty(rows, np.float64), np.empty(rows, np.float64)
    smooth = np.empty(rows, np.float64) if smoothing else None
    w = None
    wtotal = float(x.shape[1])
    if weight is not None and smoothing:     # (without smoothing the kernel reads no weights)
        w = np.require(weight, compute_dtype(dtype), "CA")
        wtotal = weight_sum(w)
    for r, xb in row_blocks(x, dtype, threads) if not smoothing else blocks(x, threads):
        _reduce.cross_entropy(xb, CODES[dtype], temperature[r], softcap, labels[r], ignore_index, w, wtotal,
                              bool(smoothing), nll[r], None if smooth is None else smooth[r], lse_[r], chunk,
                              threads)
    return nll, smooth, lse_


def stats(x, dtype, temperature, softcap, labels, ignore_index, chunk, threads):
    """One pass per row: (nll, entropy, argmax); nll as cross_entropy's unweighted per-row loss (0 for
    ignored rows; all 0 when labels is None, which skips it)."""
    rows = x.shape[0]
    nll, ent, top = np.empty(rows), np.empty(rows), np.empty(rows, np.int64)
    for r, xb in blocks(x, threads):
        lab = np.empty(0, np.int64) if labels is None else labels[r]
        _reduce.stats(xb, CODES[dtype], temperature[r], softcap, lab, ignore_index, nll[r], ent[r], top[r],
                      chunk, threads)
    return nll, ent, top


def argmax(x, dtype, temperature, softcap, chunk, threads):
    out = np.empty(x.shape[0], np.int64)
    for r, xb in blocks(x, threads):
        _select.argmax(xb, CODES[dtype], temperature[r], softcap, out[r], chunk, threads)
    return out


def top_k(x, dtype, temperature, softcap, k, logprobs, chunk, threads):
    """(values, indices): the k best of each row, best first; values are the transformed logits in the
    compute dtype, or, when logprobs, their log-probabilities (float64), from the same pass."""
    rows = x.shape[0]
    values = np.empty((rows, k), compute_dtype(dtype))
    indices = np.empty((rows, k), np.int64)
    lp = np.empty((rows, k), np.float64) if logprobs else None
    for r, xb in blocks(x, threads):
        _select.top_k(xb, CODES[dtype], temperature[r], softcap, k, values[r], indices[r],
                      None if lp is None else lp[r], chunk, threads)
    return (lp if logprobs else values), indices


def sample(x, dtype, temperature, softcap, top_k, top_p, min_p, seeds, row_ids, num_samples, logprobs,
           chunk, threads):
    """Seeded draws (see fastlogits/include/fastlogits_sample.h). Per-row arrays: temperature (0:
    greedy), top_k (int64, 0: none), top_p (float64, 1: none), min_p (float64, 0: none), seeds and
    row_ids (uint64). Returns (tokens, logprobs, ranks, status): tokens int64 (rows, num_samples);
    logprobs float64 and ranks int64 of the same shape when asked for, else None; status int32 (rows,),
    0 for a good row, 1 NaN, 2 +inf at a positive temperature, 3 no possible token."""
    from fastlogits.cpu import _sample

    rows = x.shape[0]
    tokens = np.zeros((rows, num_samples), np.int64)
    lp = np.zeros((rows, num_samples), np.float64) if logprobs else None
    ranks = np.zeros((rows, num_samples), np.int64) if logprobs else None
    status = np.zeros(rows, np.int32)
    for r, xb in blocks(x, threads):
        _sample.sample(xb, CODES[dtype], temperature[r], softcap, top_k[r], top_p[r], min_p[r], seeds[r],
                       row_ids[r], tokens[r], None if lp is None else lp[r],
                       None if ranks is None else ranks[r], status[r], chunk, threads)
    return tokens, lp, ranks, status


# ---- results, for the ops layer (the GPU backend keeps device results on the device) ----------------

def finish(values, dtype, shape):
    values = np.asarray(values)
    if values.dtype == dtype:          # (np.errstate costs more than a small call's kernel)
        return values.reshape(shape)
    with np.errstate(over="ignore"):   # a float32 result beyond float32's range is inf, by design
        return values.astype(dtype).reshape(shape)


def empty(shape, dtype):
    return np.empty(shape, dtype)


def to_host(values):
    return values


def to_device_like(values, like):
    return values
