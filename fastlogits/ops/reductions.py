"""Row reductions and maps: logsumexp, softmax, log_softmax, entropy, cross_entropy."""
import math
import os

import numpy as np

from fastlogits._config import is_int
from fastlogits.cpu import _reduce
from fastlogits.ops import _backend
from fastlogits.ops._backend import ordered
from fastlogits.ops._doc import shared_params
from fastlogits.ops._prep import (
    F32_MAX,
    NP_DTYPES,
    as_array,
    as_float,
    check_own_places,
    dtype_name,
    host_array,
    is_gpu_array,
    number_array,
    prepare,
    row_name,
    scalar_if_0d,
    unmasked,
)
from fastlogits.stream import run as stream_run
from fastlogits.stream.sources import ArraySource, as_source, shares_memory


def _finish(r, values):
    """Per-row float64 results -> the API's result dtype and the leading shape (on the device for device
    inputs)."""
    return scalar_if_0d(_backend.get(r.backend).finish(values, r.result_dtype, r.lead))


@ordered
@shared_params
def logsumexp(logits, *, temperature=1.0, softcap=None, backend=None, threads=None, chunk_size=None):
    """log sum exp(x / T) over the last axis.

    Parameters
    ----------
    {logits}
    {temperature}
    {shared}

    Returns
    -------
    ndarray of shape (...) (a NumPy scalar for 1-D logits), float32 (float64 for float64 input)
        A row of all -inf gives -inf (like SciPy), a row holding +inf gives +inf, NaN anywhere gives NaN;
        an empty vocabulary gives -inf.

    Examples
    --------
    >>> import numpy as np, fastlogits
    >>> float(fastlogits.logsumexp(np.array([1000.0, 1000.0, -np.inf])))     # 1000 + ln 2
    1000.6931471805599
    """
    src = as_source(logits)
    if src is not None:
        return stream_run.reduce("logsumexp", src, dict(
            temperature=temperature, softcap=softcap, backend=backend, threads=threads,
            chunk_size=chunk_size))
    r = prepare(logits, temperature=temperature, softcap=softcap, backend=backend, threads=threads,
                chunk_size=chunk_size)
    return _finish(r, _backend.get(r.backend).lse(r.x, r.dtype, r.temperature, r.softcap, r.chunk,
                                                  r.threads))


@ordered
@shared_params
def entropy(logits, *, temperature=1.0, softcap=None, backend=None, threads=None, chunk_size=None):
    """Shannon entropy, in nats, of softmax(x / T) over the last axis.

    -inf logits are impossible classes (0 log 0 = 0). A row whose softmax is NaN (all -inf, a +inf, a
    NaN) has NaN entropy. Returns float32 of shape (...) (float64 for float64 input; a NumPy scalar for
    1-D logits).

    Parameters
    ----------
    {logits}
    {temperature}
    {shared}

    Examples
    --------
    >>> import numpy as np, fastlogits
    >>> round(float(fastlogits.entropy(np.zeros(4))), 6) == round(float(np.log(4)), 6)
    True
    """
    src = as_source(logits)
    if src is not None:
        return stream_run.reduce("entropy", src, dict(
            temperature=temperature, softcap=softcap, backend=backend, threads=threads,
            chunk_size=chunk_size))
    r = prepare(logits, temperature=temperature, softcap=softcap, backend=backend, threads=threads,
                chunk_size=chunk_size)
    return _finish(r, _backend.get(r.backend).entropy(r.x, r.dtype, r.temperature, r.softcap, r.chunk,
                                                      r.threads))


def _map(logits, log, temperature, softcap, out, dtype, backend, threads, chunk_size):
    src = as_source(logits)
    if src is None and isinstance(out, (str, os.PathLike)) and not is_gpu_array(logits):
        # an array (a memmap, say) whose map goes to a file: the caller's own array (big-endian data is
        # swapped as it is read), so that a map of the output's file is recognised
        src = ArraySource(logits if isinstance(logits, np.ndarray) else host_array(logits))
    if src is not None:
        return stream_run.softmax(src, log, out, dict(
            temperature=temperature, softcap=softcap, dtype=dtype, backend=backend, threads=threads,
            chunk_size=chunk_size))
    x = as_array(logits)
    r = prepare(x, temperature=temperature, softcap=softcap, backend=backend, threads=threads,
                chunk_size=chunk_size)
    B = _backend.get(r.backend)
    name = "log_softmax" if log else "softmax"
    shape = tuple(x.shape)
    fresh = out is None
    if fresh:
        out_name = dtype_name(dtype) if dtype is not None else r.dtype
        if is_gpu_array(x):   # bfloat16 on the device: its uint16 bits (numba has no bfloat16)
            out = B.empty(shape, np.uint16 if out_name == "bfloat16" else NP_DTYPES[out_name])
        else:
            out = np.empty(shape, NP_DTYPES[out_name])
    elif is_gpu_array(out):
        if r.backend != "gpu":
            raise ValueError(f"{name}: out is a GPU array, but the backend is {r.backend!r}; "
                             f"use backend='gpu'")
        if tuple(out.shape) != shape:
            raise ValueError(f"{name}: out must have the shape of logits {shape}, got {tuple(out.shape)}")
        out_name = B.out_kind(out, dtype)
        if dtype is not None and dtype_name(dtype) != out_name:
            raise ValueError(f"{name}: dtype={dtype_name(dtype)} disagrees with out's dtype {out_name}")
        if is_gpu_array(x) and B.overlaps(out, x):
            raise ValueError(f"{name}: out overlaps logits; the caller's logits are never written to")
    else:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"{name}: out must be a NumPy or GPU array, got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"{name}: out must have the shape of logits {shape}, got {out.shape}")
        out_name = dtype_name(out.dtype, "out")
        if dtype is not None and dtype_name(dtype) != out_name:
            raise ValueError(f"{name}: dtype={dtype_name(dtype)} disagrees with out.dtype={out_name}")
        if not out.flags.writeable:
            raise ValueError(f"{name}: out is read-only")
        check_own_places(out.shape, out.strides, out.dtype.itemsize, name)
        # the caller's array, not only x: big-endian logits were swapped into a copy
        if any(isinstance(a, np.ndarray) and shares_memory(out, a) for a in (x, logits)):
            raise ValueError(f"{name}: out overlaps logits; the caller's logits are never written to")
    if 0 in shape:
        # nothing to write; and numba cannot slice an empty device array (it sees one element over a
        # null pointer: "non-empty slice into empty slice"), so no backend work at all
        return out
    if is_gpu_array(out):
        try:
            out2 = B.rows_out(out)   # (rows, V) over the caller's memory, or a ValueError
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        check_own_places(out2.shape, out2.strides, out2.dtype.itemsize, name)
    else:
        out2 = out.reshape(r.x.shape)    # a view, or a copy where out's leading axes do not merge
    B.softmax(r.x, r.dtype, r.temperature, r.softcap, log, out2, out_name, r.chunk, r.threads)
    if not fresh and isinstance(out, np.ndarray) and out.size and not np.shares_memory(out2, out):
        out[...] = out2.reshape(out.shape)
    return out


@ordered
@shared_params
def softmax(logits, *, temperature=1.0, softcap=None, out=None, dtype=None, backend=None, threads=None,
            chunk_size=None):
    """softmax(x / T) over the last axis.

    Returns an array of the logits' shape, in the logits' dtype unless ``dtype=`` (or ``out=``) says
    otherwise. A row of all -inf, or holding +inf or NaN, is all NaN (like PyTorch); -inf entries of
    other rows get probability 0. Arithmetic is float32 (float64 for float64 input).

    Parameters
    ----------
    {logits}
    {temperature}
    {out}
    {shared}

    Examples
    --------
    >>> import numpy as np, fastlogits
    >>> fastlogits.softmax(np.array([1000.0, 1000.0, -np.inf]))
    array([0.5, 0.5, 0. ])
    """
    return _map(logits, False, temperature, softcap, out, dtype, backend, threads, chunk_size)


@ordered
@shared_params
def log_softmax(logits, *, temperature=1.0, softcap=None, out=None, dtype=None, backend=None,
                threads=None, chunk_size=None):
    """log softmax(x / T) over the last axis, computed as (x - max) - log sum exp(x - max).

    Same conventions as :func:`softmax`; -inf entries give -inf.

    Parameters
    ----------
    {logits}
    {temperature}
    {out}
    {shared}

    Examples
    --------
    >>> import numpy as np, fastlogits
    >>> fastlogits.log_softmax(np.array([0.0, -np.inf]))
    array([  0., -inf])
    """
    return _map(logits, True, temperature, softcap, out, dtype, backend, threads, chunk_size)


def labels_on_host(labels):
    """Labels as host data: GPU labels (numba, CuPy, PyTorch; any strides) copied by the GPU backend,
    whichever backend computes (NumPy cannot read a PyTorch CUDA tensor, nor numba copy a negative
    stride)."""
    return _backend.get("gpu").to_host(labels, "labels") if is_gpu_array(labels) else labels


def as_labels(labels):
    """labels as a NumPy array of integers (their shape and values not yet checked): anything else raises
    TypeError (None, floats, bools: before any shape check, as for every argument), a ragged list
    ValueError, naming the argument."""
    labels = unmasked(labels, "labels", "ignore_index")     # (masked rows: ignored ones)
    try:
        lab = np.asarray(labels)
    except ValueError as e:
        raise ValueError(f"labels: a list or tuple is read as one array, and this one is ragged ({e})") \
            from None
    if lab.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers (class indices), got dtype {lab.dtype}")
    return lab


def check_labels(labels, lead, V, ignore_index):
    """labels as a private C-contiguous int64 copy, one per row; out-of-range labels raise, naming the
    label and its row."""
    lab = as_labels(labels)
    if lab.shape != tuple(lead):
        raise ValueError(f"labels must have the leading shape of logits {tuple(lead)} (one class index per "
                         f"row), got shape {lab.shape}")
    i = first_past_int64(lab)
    if i >= 0:
        raise label_error(int(lab.reshape(-1)[i]), i, lead, V, ignore_index)
    # a private copy: the kernels read it after this check, with the GIL released (another thread
    # changing the caller's labels in between would make them read out of bounds)
    lab = np.array(lab, dtype=np.int64, order="C", copy=True).reshape(-1)
    i = _reduce.first_bad_label(lab, ignore_index, V)
    if i >= 0:
        raise label_error(int(lab[i]), i, lead, V, ignore_index)
    return lab


def first_past_int64(labels):
    """The flat index of the first label that int64 cannot hold (a uint64 past 2^63, which a cast would
    wrap, to ignore_index perhaps), or -1."""
    if labels.dtype.kind != "u" or labels.dtype.itemsize < 8 or not labels.size:
        return -1
    big = np.iinfo(np.int64).max
    return -1 if labels.max() <= big else int(np.argmax(labels.reshape(-1) > big))


def label_error(label, i, lead, V, ignore_index, note=None):
    """The IndexError for label ``label`` out of range at flat row ``i`` (``note``: how it was found)."""
    return IndexError(f"labels: label {label} at {row_name(i, lead)} is out of range for {V} classes "
                      f"(valid: 0..{V - 1}, or ignore_index={ignore_index})" + (f"; {note}" if note else ""))


@ordered
@shared_params
def cross_entropy(logits, labels, *, weight=None, ignore_index=-100, label_smoothing=0.0,
                  reduction="mean", z_loss=0.0, temperature=1.0, softcap=None, backend=None, threads=None,
                  chunk_size=None):
    """Cross-entropy of logits (..., V) against class indices (...), like PyTorch's F.cross_entropy.

    ``l_n = -w[y_n] log p_n[y_n]`` (p = softmax(x / T)); with label smoothing eps,
    ``l_n = (1 - eps) l_n + (eps / V) R_n`` with ``R_n = -sum_c w[c] log p_n[c]``; rows with
    ``y_n == ignore_index`` give 0. ``"mean"`` divides by the sum of ``w[y_n]`` over counted rows (the
    smoothing term too, as PyTorch does); an all-ignored input gives NaN for "mean" and 0 for "sum".
    ``z_loss`` adds ``z_loss * logsumexp(x / T)**2`` per counted row (PaLM), not multiplied by the class
    weight; "mean" averages it over the counted rows (as Liger-Kernel does).
    Returns float32 (float64 for float64 input): a scalar, or shape (...) for ``reduction="none"``. For
    GPU logits, a device array (0-d for "mean" and "sum", like PyTorch), returned without waiting for the
    device; device labels are checked there, and a label out of range makes the loss NaN and raises
    IndexError at the next GPU call or ``fastlogits.gpu.synchronize()`` (host labels raise at once).

    Parameters
    ----------
    {logits}
    labels : integer array of the leading shape (...)
        Class indices in [0, V), or ``ignore_index``; a label out of range raises IndexError naming it
        and its row.
    weight : array of V floats, optional
        Per-class weights (PyTorch's ``weight``). With label smoothing, a weight w adds w (-log p) of its
        class: an infinite weight gives ±inf where p < 1, and as in PyTorch, a zero weight NaN where
        p = 0 and a NaN weight NaN wherever it stands; where p is 1 (-log p = 0) the class adds 0,
        whatever its weight (PyTorch: NaN for an infinite one, inf * 0).
    ignore_index : int
        Rows with this label count for nothing (default -100).
    label_smoothing : float in [0, 1]
    reduction : {"mean", "sum", "none"}
    z_loss : float >= 0
    {temperature}
    {shared}

    Examples
    --------
    >>> import numpy as np, fastlogits
    >>> x = np.array([[2, 1, 0.1], [0.5, 2.5, 0.3], [1.2, 0.2, 3.1], [0, 0, 0]])
    >>> round(float(fastlogits.cross_entropy(x, np.array([0, 1, 2, -100]))), 12)
    0.274406775424
    """
    src = as_source(logits)
    if src is not None:
        return stream_run.cross_entropy(src, labels, dict(
            weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
            z_loss=z_loss, temperature=temperature, softcap=softcap, backend=backend, threads=threads,
            chunk_size=chunk_size))
    check_reduction(reduction)
    r, eps, z, ignore_index, w = _ce_prepare(
        logits, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        temperature=temperature, softcap=softcap, backend=backend, threads=threads, chunk_size=chunk_size)
    B = _backend.get(r.backend)
    if r.backend == "gpu" and is_gpu_array(r.x):
        return _cross_entropy_on_device(B, r, labels, eps, z, ignore_index, w, reduction)
    loss, sums = _ce_rows_terms(B, r, labels, eps, z, ignore_index, w, reduction == "none",
                                sums=reduction != "none")
    if reduction == "none":
        return _finish(r, B.to_device_like(loss, r.x))
    return ce_total(sums, reduction, r.result_dtype, eps > 0)


def _cross_entropy_on_device(B, r, labels, eps, z, ignore_index, w, reduction):
    """cross_entropy of device logits, all on the device: the result is a device array (0-d for "mean"
    and "sum", like PyTorch's), and the call does not wait for the device. Host labels are checked here;
    device labels are read in place and checked on the device: one out of range makes the loss NaN and
    raises IndexError at this thread's next GPU call or fastlogits.gpu.synchronize()."""
    dlab = B.device_labels(labels, r.lead)
    if dlab is None:
        dlab = check_labels(labels_on_host(labels), r.lead, r.V, ignore_index)
    out = B.cross_entropy_device(r.x, r.dtype, r.temperature, r.softcap, dlab, ignore_index, w, eps, z,
                                 r.chunk, reduction, r.result_dtype, r.lead)
    return out.reshape(r.lead if reduction == "none" else ())


def _ce_prepare(logits, *, weight, ignore_index, label_smoothing, z_loss, temperature, softcap, backend,
                threads, chunk_size):
    """The prepared rows and the checked (eps, z, ignore_index, weight) of a cross-entropy call."""
    r = prepare(logits, temperature=temperature, softcap=softcap, backend=backend, threads=threads,
                chunk_size=chunk_size)
    eps, z, ignore_index = check_ce_options(label_smoothing, z_loss, ignore_index)
    return r, eps, z, ignore_index, check_weight(weight, r.V)


def check_weight(weight, V):
    """Class weights for V classes as a float64 array (None stays None): a TypeError for anything but
    real numbers, a ValueError for a shape other than (V,)."""
    w = as_weight(weight)
    if w is not None and w.shape != (V,):
        raise ValueError(f"weight must have one value per class, shape ({V},), got shape {w.shape}")
    return w


def as_weight(weight, copy=False):
    """Class weights as a float64 array (None stays None), a private copy with copy; anything but real
    numbers (complex, bool, objects such as ints past float64) raises TypeError."""
    if weight is None:
        return None
    weight = unmasked(weight, "weight")
    try:
        w = number_array(weight, "weight")
    except (TypeError, ValueError):
        w = None
    if w is None or w.dtype.kind not in "fiu":
        got = f"dtype {weight.dtype}" if isinstance(weight, np.ndarray) else repr(weight)[:60]
        raise TypeError(f"weight must be an array of floats (one per class), got {got}")
    return np.array(w, np.float64) if copy else np.asarray(w, np.float64)


def check_reduction(reduction):
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def check_ce_options(label_smoothing, z_loss, ignore_index):
    """(label_smoothing, z_loss, ignore_index) checked, as a float, a float and an int."""
    eps = _number(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    z = _number(z_loss, "z_loss")
    if not (z >= 0 and math.isfinite(z)):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    return eps, z, check_ignore_index(ignore_index)


def _number(value, argname):
    """value as a float; None, a bool (NumPy's too) or a string is refused (naming the argument)."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise TypeError(f"{argname} must be a float, got {value!r}")
    return as_float(value, argname, "a float")


def check_ignore_index(ignore_index):
    """ignore_index as an int64-sized int (a float is refused, as PyTorch refuses it)."""
    if not is_int(ignore_index):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    i = int(ignore_index)
    if not -2**63 <= i < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {i}")
    return i


def _ce_rows_terms(B, r, labels, eps, z, ignore_index, w, per_row, sums=True):
    """ce_terms of the backend's per-row results, combined on the host."""
    lab = check_labels(labels_on_host(labels), r.lead, r.V, ignore_index)
    nll, smooth, lse = B.cross_entropy_rows(r.x, r.dtype, r.temperature, r.softcap, lab, ignore_index, w,
                                            eps > 0, r.chunk, r.threads)
    nll, smooth, lse = B.to_host(nll), B.to_host(smooth) if eps > 0 else None, B.to_host(lse)
    return ce_terms(nll, smooth, lse, lab, ignore_index, w, eps, z, r.V, per_row, sums)


def cross_entropy_terms(logits, labels, *, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                        temperature=1.0, softcap=None, backend=None, threads=None, chunk_size=None,
                        per_row=False):
    """ce_terms of in-memory logits, and the prepared rows."""
    r, eps, z, ignore_index, w = _ce_prepare(
        logits, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        temperature=temperature, softcap=softcap, backend=backend, threads=threads, chunk_size=chunk_size)
    return _ce_rows_terms(_backend.get(r.backend), r, labels, eps, z, ignore_index, w, per_row), r


def ce_terms(nll, smooth, lse, labels, ignore_index, weight, eps, z, V, per_row, sums=True):
    """PyTorch's cross-entropy from per-row parts (nll = lse - x[label], smooth = -sum_c w_c log p_c, None
    when eps == 0; neither read for ignored rows): (the per-row loss plus its z-loss term, float64, 0 for
    ignored rows, or None unless per_row; the sums (of the loss's NLL part and its smoothing part, of the
    target weights w[y], of the z-loss terms; compensated; 0 when not sums, for per-row losses alone) and
    the number of counted rows). labels: checked int64."""
    def f64(a):      # (C reads them: aligned; np.require cost 3 us a call where there was nothing to do)
        if a is None or (a.__class__ is np.ndarray and a.dtype == np.float64 and a.flags.c_contiguous
                         and a.flags.aligned):
            return a
        return np.require(a, np.float64, "CA")

    out = np.empty(labels.shape[0]) if per_row else None
    totals = _reduce.ce_terms(f64(nll), f64(smooth), f64(lse), labels, ignore_index, f64(weight), eps, z, V,
                              out, sums)
    return out, totals


def _ieee_div(a, b):
    """a / b for Python floats with IEEE's results where Python raises: ±inf, or NaN for 0 / 0."""
    if b != 0 or math.isnan(b):
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def ce_total(sums, reduction, dtype=np.float64, smoothing=False):
    """The "mean" or "sum" reduction from ce_terms' sums, as a scalar of dtype (a float32 beyond its range
    is inf, quietly). As PyTorch: "mean" divides the NLL part and (with label smoothing) the smoothing
    part each by the sum of the target weights, with IEEE's division: all rows ignored (or only
    zero-weight targets) gives 0 / 0 = NaN, and weights of both signs that sum to 0 give ±inf (or NaN,
    where the two parts' infinities have opposite signs); the z-loss is divided by the number of counted
    rows (Liger-Kernel)."""
    nll_sum, smooth_sum, wy_sum, z_sum, count = (float(v) for v in sums)
    if reduction == "sum":
        total = (nll_sum + smooth_sum) + z_sum
    else:              # (z_sum != 0 means count > 0)
        total = _ieee_div(nll_sum, wy_sum) + (_ieee_div(smooth_sum, wy_sum) if smoothing else 0.0) \
            + (z_sum / count if z_sum else 0.0)
    if not abs(total) > F32_MAX or math.isinf(total):     # (no float32 overflow: no errstate, 2.4 us)
        return np.dtype(dtype).type(total)
    with np.errstate(over="ignore"):
        return np.dtype(dtype).type(total)
