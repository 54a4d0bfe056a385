"""The CPU backend: the backend interface (see ``fastlogits/ops/_backend.py``) over the Cython kernels.

Each function takes a 2-D NumPy array ``x`` of shape (rows, V) with any strides, ``dtype`` (the element
type's name: "float16", "bfloat16", "float32" or "float64"; ``x`` holds such elements), ``temperature`` (a
C-contiguous float64 array, one per row), ``softcap`` (0.0 for none), ``chunk`` (vocabulary elements per
step) and ``threads``; it returns new arrays.
"""
import numpy as np

try:
    from fastlogits.cpu import _maps, _reduce, _select
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "fastlogits' compiled CPU kernels are missing or do not load "
        f"({e}). Reinstall with a C compiler available: 'pip install --force-reinstall fastlogits' "
        "(from a source tree: 'pip install .')."
    ) from e

from fastlogits.ops._prep import compute_dtype, weight_sum

CODES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}


def lse(x, dtype, temperature, softcap, chunk, threads):
    out = np.empty(x.shape[0], np.float64)
    _reduce.lse(x, CODES[dtype], temperature, softcap, out, chunk, threads)
    return out


def entropy(x, dtype, temperature, softcap, chunk, threads):
    out = np.empty(x.shape[0], np.float64)
    _reduce.entropy(x, CODES[dtype], temperature, softcap, out, chunk, threads)
    return out


def softmax(x, dtype, temperature, softcap, log, out, out_dtype, chunk, threads):
    """Fills out (rows, V), of element type out_dtype (a name as for dtype)."""
    _maps.softmax(x, CODES[dtype], temperature, softcap, out, CODES[out_dtype], log, chunk, threads)
    return out


def cross_entropy_rows(x, dtype, temperature, softcap, labels, ignore_index, weight, smoothing, chunk,
                       threads):
    """Per-row (nll, smooth, lse), float64: nll = lse - x[label] (unweighted), smooth = -sum_c w_c log p_c
    (only when smoothing; w = 1 without weights), 0 for ignored rows. labels: int64 (rows,), checked."""
    rows = x.shape[0]
    nll, smooth, lse_ = (np.empty(rows, np.float64) for _ in range(3))
    w = None
    wtotal = float(x.shape[1])
    if weight is not None and smoothing:     # (without smoothing the kernel reads no weights)
        w = np.ascontiguousarray(weight, dtype=compute_dtype(dtype))
        wtotal = weight_sum(w)
    _reduce.cross_entropy(x, CODES[dtype], temperature, softcap, labels, ignore_index, w, wtotal,
                          bool(smoothing), nll, smooth, lse_, chunk, threads)
    return nll, smooth, lse_


def stats(x, dtype, temperature, softcap, labels, ignore_index, chunk, threads):
    """One pass per row: (nll, entropy, argmax); nll as cross_entropy's unweighted per-row loss (0 for
    ignored rows; all 0 when labels is None, which skips it)."""
    rows = x.shape[0]
    nll, ent, top = np.empty(rows), np.empty(rows), np.empty(rows, np.int64)
    lab = np.empty(0, np.int64) if labels is None else labels
    _reduce.stats(x, CODES[dtype], temperature, softcap, lab, ignore_index, nll, ent, top, chunk, threads)
    return nll, ent, top


def argmax(x, dtype, temperature, softcap, chunk, threads):
    out = np.empty(x.shape[0], np.int64)
    _select.argmax(x, CODES[dtype], temperature, softcap, out, chunk, threads)
    return out


def top_k(x, dtype, temperature, softcap, k, logprobs, chunk, threads):
    """(values, indices): the k best of each row, best first; values are the transformed logits in the
    compute dtype, or, when logprobs, their log-probabilities (float64), from the same pass."""
    rows = x.shape[0]
    values = np.empty((rows, k), compute_dtype(dtype))
    indices = np.empty((rows, k), np.int64)
    lp = np.empty((rows, k), np.float64) if logprobs else None
    _select.top_k(x, CODES[dtype], temperature, softcap, k, values, indices, lp, chunk, threads)
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
    _sample.sample(x, CODES[dtype], temperature, softcap, top_k, top_p, min_p, seeds, row_ids, tokens, lp,
                   ranks, status, chunk, threads)
    return tokens, lp, ranks, status


# ---- results, for the ops layer (the GPU backend keeps device results on the device) ----------------

def finish(values, dtype, shape):
    with np.errstate(over="ignore"):   # a float32 result beyond float32's range is inf, by design
        return np.asarray(values).astype(dtype, copy=False).reshape(shape)


def empty(shape, dtype):
    return np.empty(shape, dtype)


def to_host(values):
    return values


def to_device_like(values, like):
    return values
