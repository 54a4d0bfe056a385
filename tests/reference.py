"""An independent float64 NumPy reference for fastlogits' row reductions and maps.

Every function upcasts its input to float64 (16-bit inputs keep the values they already have: the
reference sees the same rounded numbers as the library), applies the softcap ``c * tanh(x / c)``, divides
by the temperature (a scalar, or one value per row: an array of the leading shape), and then computes in
float64 with the edge semantics of API.md:

- NaN anywhere in a row: that row's reductions and maps are NaN;
- a row holding ``+inf``: logsumexp ``+inf``; softmax, log-softmax, entropy and cross-entropy NaN
  (like PyTorch);
- a row of all ``-inf``: logsumexp ``-inf``; softmax, log-softmax, entropy and cross-entropy NaN;
- ``-inf`` entries are impossible classes: probability 0, and ``0 * log 0`` counts as 0 in the entropy;
- argmax / top-k: NaN is the largest value (like NumPy and PyTorch), the lowest index wins a tie.

Nothing here imports fastlogits; the benchmarks import this module too. Results are float64 arrays (0-d for a
single row or a reduced loss); ``top_k`` returns the input's values in the input's dtype, or, given a
softcap or a temperature, the transformed values in float64 (fastlogits rounds them to the input's dtype).
"""

import numpy as np

__all__ = [
    "transform",
    "row_scale",
    "logsumexp",
    "softmax",
    "log_softmax",
    "entropy",
    "cross_entropy",
    "argmax",
    "top_k",
    "top_k_logprobs",
    "top_k_order",
]


def _f64(logits):
    """The logits as a new float64 array (bfloat16 and float16 values upcast exactly)."""
    return np.array(logits, copy=True).astype(np.float64)


def _temperature(temperature, lead_shape):
    t = np.asarray(temperature, dtype=np.float64)
    if t.ndim == 0:
        return t
    if t.shape != tuple(lead_shape):
        raise ValueError(f"temperature has shape {t.shape}, expected () or {tuple(lead_shape)}")
    return t[..., None]


def transform(logits, softcap=None, temperature=1.0):
    """``softcap * tanh(x / softcap)`` (given a softcap), then divided by the temperature, in float64."""
    y = _f64(logits)
    if y.ndim == 0:
        raise ValueError("logits must have at least one dimension")
    with np.errstate(invalid="ignore", over="ignore"):
        if softcap is not None:
            c = float(softcap)
            z = y / c
            # c tanh z = x (1 - z^2 / 3 + 2 z^4 / 15 - ...) where z is small, to 5e-20: for a large cap z
            # is subnormal (or 0), and c tanh(z) would lose x's bits
            y = np.where(np.abs(z) < 1e-3, y * (1.0 - z * z / 3.0 + 2.0 * z ** 4 / 15.0), c * np.tanh(z))
        y = y / _temperature(temperature, y.shape[:-1])
    return y


def row_scale(logits, softcap=None, temperature=1.0):
    """Per row, the largest finite ``|x / T|`` after the softcap (0 for a row with no finite entry): the
    ``max|x/T|`` of the tolerance contract. (It was at least ``softcap / T`` while the softcap lost x's
    bits for a large cap, ``c`` times ``x / c``; it is relative to x now.)
    """
    y = transform(logits, softcap, temperature)
    a = np.where(np.isfinite(y), np.abs(y), 0.0)
    s = a.max(axis=-1) if y.shape[-1] else np.zeros(y.shape[:-1])
    return np.asarray(s, dtype=np.float64)


def _state(y):
    """Per row of an already transformed float64 array: ``(shifted, log_s, lse, bad)``.

    ``shifted = y - max`` (exact up to one rounding), ``log_s = log Σ exp(shifted)``, ``lse = max + log_s``;
    ``bad`` marks the rows whose maps are NaN (a NaN, a +inf, or nothing but -inf). Maps are computed from
    ``shifted - log_s``, never from ``y - lse``: the latter loses ``log_s`` when ``|max|`` is large.
    """
    lead = y.shape[:-1]
    if y.shape[-1] == 0:
        empty = np.full(lead, -np.inf)
        return y.copy(), empty, empty, np.ones(lead, dtype=bool)
    has_nan = np.isnan(y).any(axis=-1)
    clean = np.where(np.isnan(y), -np.inf, y)
    m = clean.max(axis=-1)
    finite = np.isfinite(m)
    shift = np.where(finite, m, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = clean - shift[..., None]
        e = np.exp(shifted)
    # Take the first maximal element out of the sum (it contributes exactly 1) and use log1p, as SciPy does:
    # logsumexp([0, -40]) keeps its 4.25e-18.
    first = np.argmax(clean, axis=-1)
    np.put_along_axis(e, first[..., None], 0.0, axis=-1)
    with np.errstate(invalid="ignore"):
        log_s = np.log1p(e.sum(axis=-1))
    lse = shift + log_s
    lse = np.where(m == np.inf, np.inf, lse)
    lse = np.where(m == -np.inf, -np.inf, lse)
    lse = np.where(has_nan, np.nan, lse)
    bad = np.isnan(lse) | np.isinf(lse)
    return shifted, log_s, lse, bad


def _lse_of(y):
    """logsumexp over the last axis of a float64 array that is already transformed."""
    return _state(y)[2]


def _log_softmax_of(y):
    shifted, log_s, _, bad = _state(y)
    with np.errstate(invalid="ignore"):
        out = shifted - log_s[..., None]
    out[bad] = np.nan
    return out


def logsumexp(logits, *, softcap=None, temperature=1.0):
    """``log Σ exp(x / T)`` per row: shape ``logits.shape[:-1]``."""
    return np.asarray(_lse_of(transform(logits, softcap, temperature)))


def log_softmax(logits, *, softcap=None, temperature=1.0):
    return _log_softmax_of(transform(logits, softcap, temperature))


def softmax(logits, *, softcap=None, temperature=1.0):
    with np.errstate(invalid="ignore"):
        return np.exp(_log_softmax_of(transform(logits, softcap, temperature)))


def entropy(logits, *, softcap=None, temperature=1.0):
    """Shannon entropy of softmax(x / T) in nats; ``0 * log 0`` is 0 (``-inf`` entries)."""
    y = transform(logits, softcap, temperature)
    shifted, log_s, _, bad = _state(y)
    with np.errstate(invalid="ignore", over="ignore"):
        neg_logp = log_s[..., None] - shifted
        p = np.exp(-neg_logp)
        terms = np.where(p > 0, p * neg_logp, 0.0)
    h = terms.sum(axis=-1)
    h = np.where(bad, np.nan, h)
    return np.asarray(h)


def cross_entropy(
    logits,
    labels,
    *,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="mean",
    z_loss=0.0,
    softcap=None,
    temperature=1.0,
):
    """PyTorch's ``F.cross_entropy`` with class-index targets, plus ``z_loss * lse²`` per counted row.

    ``labels`` has the leading shape of ``logits``. ``"none"`` gives 0 for ignored rows; ``"mean"`` divides by
    the summed target weights of the counted rows (their count without weights), so an all-ignored input
    is NaN, and ``"sum"`` of it is 0. The z-loss term ``z * lse²`` is added unweighted to every counted row's
    loss, and ``"mean"`` averages it over the counted rows (Liger-Kernel's ``lse_square_scale``).
    """
    y = transform(logits, softcap, temperature)
    lead, n_classes = y.shape[:-1], y.shape[-1]
    labels = np.asarray(labels)
    if labels.shape != lead:
        raise ValueError(f"labels has shape {labels.shape}, expected {lead}")
    labels = labels.astype(np.int64)
    counted = labels != ignore_index
    bad = counted & ((labels < 0) | (labels >= n_classes))
    if bad.any():
        where = np.argwhere(bad)[0]
        raise IndexError(f"label {labels[tuple(where)]} at row {tuple(where)} out of range [0, {n_classes})")
    w = np.ones(n_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    safe = np.where(counted, labels, 0)
    lse = _lse_of(y)
    with np.errstate(invalid="ignore", over="ignore"):
        logp = _log_softmax_of(y)
        logp_target = np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
        w_target = np.where(counted, w[safe], 0.0)
        nll = np.where(counted, -w_target * logp_target, 0.0)
        loss = nll
        if label_smoothing:
            smooth = -(w * logp).sum(axis=-1)
            smooth = np.where(counted, smooth, 0.0)
            loss = (1.0 - label_smoothing) * nll + (label_smoothing / n_classes) * smooth
        z = np.where(counted, z_loss * lse * lse, 0.0) if z_loss else np.zeros(lead)
        if reduction == "none":
            return np.asarray(loss + z)
        if reduction == "sum":
            return np.asarray(loss.sum() + z.sum())
        if reduction == "mean":
            # Liger-Kernel's convention: the weighted losses over the summed target weights, plus the mean
            # z-loss over the counted rows (the two agree without weights)
            return np.asarray(loss.sum() / w_target.sum() + (z.sum() / counted.sum() if z_loss else 0.0))
    raise ValueError(f"unknown reduction {reduction!r}")


def top_k_order(values, k):
    """Indices of the k largest entries per row: NaN largest, descending, lowest index first on ties."""
    v = np.asarray(values).astype(np.float64)
    lead, n = v.shape[:-1], v.shape[-1]
    flat = v.reshape(-1, n)
    out = np.empty((flat.shape[0], k), dtype=np.int64)
    idx = np.arange(n)
    for r, row in enumerate(flat):
        nan = np.isnan(row)
        key_value = -np.where(nan, 0.0, row)
        # lexsort: the last key is the primary one. NaN first, then by value descending, then by index.
        order = np.lexsort((idx, key_value, ~nan))
        out[r] = order[:k]
    return out.reshape(lead + (k,))


def _transformed(softcap, temperature):
    return softcap is not None or np.ndim(temperature) > 0 or temperature != 1.0


def argmax(logits, *, softcap=None, temperature=1.0):
    """Index of the largest (transformed) value per row, NaN largest, the lowest index on ties (``np.argmax``
    exactly)."""
    y = transform(logits, softcap, temperature)
    return np.asarray(np.argmax(y, axis=-1).astype(np.int64))


def top_k(logits, k, *, softcap=None, temperature=1.0):
    """``(values, indices)``: the k largest (transformed) logits per row; values in the input's dtype without
    a transform, else the transformed values in float64."""
    if _transformed(softcap, temperature):
        y = transform(logits, softcap, temperature)
        idx = top_k_order(y, k)
        return np.take_along_axis(y, idx, axis=-1), idx
    x = np.asarray(logits)
    idx = top_k_order(x, k)
    return np.take_along_axis(x, idx, axis=-1), idx


def top_k_logprobs(logits, k, *, softcap=None, temperature=1.0):
    """``(logprobs, indices)`` of the k most likely tokens; logprobs in float64."""
    y = transform(logits, softcap, temperature)
    idx = top_k_order(y, k)
    lp = log_softmax(logits, softcap=softcap, temperature=temperature)
    return np.take_along_axis(lp, idx, axis=-1), idx
