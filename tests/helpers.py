"""Shared helpers: dtypes, memory layouts, awkward rows, one checker per function vs the reference."""

from pathlib import Path

import ml_dtypes
import numpy as np

import fastlogits as fl
from tests import reference as ref
from tests import tolerances as tols

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64)]
DTYPE_IDS = [d.name for d in DTYPES]

FUNCTIONS = [
    "logsumexp",
    "softmax",
    "log_softmax",
    "cross_entropy",
    "entropy",
    "argmax",
    "top_k",
    "top_k_logprobs",
]
MAPS = ["softmax", "log_softmax"]
REDUCTIONS = ["logsumexp", "entropy", "cross_entropy"]
SELECTIONS = ["argmax", "top_k", "top_k_logprobs"]

LAYOUTS = ["C", "rows", "cols", "neg", "F"]

IGNORE = -100


def random_logits(rng, shape, dtype, scale=3.0):
    """Normal logits times ``scale``, rounded to ``dtype``."""
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _filled(shape, dtype):
    """A buffer full of NaN: a kernel that reads past or between the view's elements sees them."""
    return np.full(shape, np.nan, dtype=dtype)


def make_layout(x, layout):
    """A view holding the values of ``x`` in the memory layout ``layout``.

    ``"C"``: C-contiguous; ``"rows"``: every other row of a larger buffer (for a 1-D row, an offset slice);
    ``"cols"``: every third column; ``"neg"``: negative strides on every axis; ``"F"``: Fortran order.
    The gaps of the strided views hold NaN.
    """
    x = np.asarray(x)
    if layout == "C":
        return np.ascontiguousarray(x)
    if layout == "rows":
        if x.ndim == 1:
            buf = _filled((x.shape[0] + 5,), x.dtype)
            buf[3 : 3 + x.shape[0]] = x
            return buf[3 : 3 + x.shape[0]]
        buf = _filled((2 * x.shape[0],) + x.shape[1:], x.dtype)
        buf[::2] = x
        view = buf[::2]
        return view
    if layout == "cols":
        buf = _filled(x.shape[:-1] + (3 * x.shape[-1],), x.dtype)
        buf[..., ::3] = x
        return buf[..., ::3]
    if layout == "neg":
        rev = (slice(None, None, -1),) * x.ndim
        return np.ascontiguousarray(x[rev])[rev]
    if layout == "F":
        return np.asfortranarray(x)
    raise ValueError(layout)


def huge(dtype):
    """A magnitude near the top of ``dtype``'s range (3e38 where it fits, else 6e4 for float16)."""
    return 6.0e4 if np.dtype(dtype) == np.float16 else 3.0e38


def awkward_rows(dtype, n=37, rng=None):
    """A dict ``name -> row`` of awkward length-``n`` rows (``n >= 16``) in ``dtype``."""
    assert n >= 16
    rng = np.random.default_rng(1234) if rng is None else rng
    inf, nan = np.inf, np.nan
    base = rng.standard_normal(n) * 2
    rows = {}
    rows["huge_1e4"] = np.where(np.arange(n) % 2 == 0, 1e4, -1e4)
    r = np.full(n, -1e4)
    r[[3, n - 4]] = 1e4
    rows["huge_1e4_pair"] = r
    h = huge(dtype)
    r = np.where(np.arange(n) % 3 == 0, -h, h * 0.999)
    rows["extreme"] = r
    r = np.full(n, -h)
    r[5] = h
    rows["extreme_one"] = r
    r = base.copy()
    r[[0, 6, 7, n - 1]] = -inf
    rows["some_neg_inf"] = r
    rows["all_neg_inf"] = np.full(n, -inf)
    r = base.copy()
    r[9] = inf
    rows["pos_inf"] = r
    r = base.copy()
    r[[2, 11]] = inf
    r[4] = -inf
    rows["two_pos_inf"] = r
    r = base.copy()
    r[13] = nan
    rows["nan"] = r
    r = base.copy()
    r[[1, 14]] = [inf, nan]
    rows["nan_and_inf"] = r
    r = np.full(n, -inf)
    r[-1] = nan
    rows["nan_among_neg_inf"] = r
    rows["all_equal"] = np.zeros(n)
    r = np.round(base)
    r[[6, 7, 14, n - 1]] = 5.0
    rows["ties_at_max"] = r
    r = base.copy()
    r[8] = 50.0
    rows["dominant"] = r
    r = np.full(n, -inf)
    r[7:] = -1000.0 - np.arange(n - 7) * 0.25
    rows["neg_inf_then_low"] = r
    rows["all_low"] = -1000.0 + base
    r = np.full(n, -inf)
    r[12] = 3.0
    rows["single_finite"] = r
    r = np.full(n, -inf)
    r[15] = inf
    rows["inf_and_neg_inf"] = r
    return {k: v.astype(dtype) for k, v in rows.items()}


def awkward_matrix(dtype, n=37):
    rows = awkward_rows(dtype, n)
    return list(rows), np.stack(list(rows.values()))


def random_labels(rng, lead, n_classes, ignore_fraction=0.2, ignore_index=IGNORE):
    labels = rng.integers(0, n_classes, size=lead).astype(np.int64)
    if labels.ndim and labels.size > 1:
        mask = rng.random(lead) < ignore_fraction
        labels = np.where(mask, ignore_index, labels)
    return labels


def assert_indices(got, want, y, tol, what=""):
    """Index arrays equal, except where the two candidates' (float64, transformed) values lie within ``tol``.

    ``y`` is the transformed float64 logits; ``tol`` broadcasts against a row (pass ``tol[..., None]``).
    """
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: index shape {got.shape} != {want.shape}"
    assert got.dtype == np.int64, f"{what}: index dtype {got.dtype} is not int64"
    if np.array_equal(got, want):
        return
    n = y.shape[-1]
    assert ((got >= 0) & (got < n)).all(), f"{what}: index out of range: {got}"
    g = got if got.ndim == y.ndim else got[..., None]
    w = want if want.ndim == y.ndim else want[..., None]
    yg = np.take_along_axis(y, g, axis=-1)
    yw = np.take_along_axis(y, w, axis=-1)
    tol = np.broadcast_to(tol, yg.shape)
    same = (g == w) | (np.abs(yg - yw) <= tol) | (np.isnan(yg) & np.isnan(yw)) | (yg == yw)
    if not same.all():
        bad = np.argwhere(~same)[:5]
        raise AssertionError(
            f"{what}: indices differ where values are not tied, at {bad.tolist()}: "
            f"got {g[~same][:5]} ({yg[~same][:5]}), want {w[~same][:5]} ({yw[~same][:5]})"
        )
    if got.ndim == y.ndim and got.shape[-1] > 1:
        s = np.sort(got, axis=-1)
        assert (s[..., 1:] != s[..., :-1]).all(), f"{what}: repeated indices {got}"


def assert_unchanged(x, copy, what=""):
    """``x`` holds the same bytes as ``copy`` (NaN payloads included)."""
    a = np.ascontiguousarray(x).view(np.uint8)
    b = np.ascontiguousarray(copy).view(np.uint8)
    assert np.array_equal(a, b), f"{what}: the caller's logits were modified"


def _native(dtype):
    """The dtype in native byte order (a big-endian float32 input may give native float32 results)."""
    return np.dtype(dtype).newbyteorder("=")


def _brief(kw):
    """kwargs for a message: arrays as their shape and dtype."""
    return {
        k: (f"array{v.shape}:{v.dtype}" if isinstance(v, np.ndarray) and v.ndim else v) for k, v in kw.items()
    }


def call(name, x, *, k=None, labels=None, **kw):
    fn = getattr(fl, name)
    if name in ("top_k", "top_k_logprobs"):
        return fn(x, k, **kw)
    if name == "cross_entropy":
        return fn(x, labels, **kw)
    return fn(x, **kw)


def check(name, x, *, k=None, labels=None, softcap=None, temperature=1.0, what="", **kw):
    """Call ``fastlogits.<name>`` on ``x`` and compare with the reference under the tolerance table.

    ``kw`` goes to the library only (threads, chunk_size, backend, out, dtype, reduction ...). Returns the
    library's result.
    """
    x = np.asarray(x) if not isinstance(x, np.ndarray) else x
    xin = x.copy()
    dt = x.dtype
    lead, n = x.shape[:-1], x.shape[-1]
    tkw = {}
    if softcap is not None:
        tkw["softcap"] = softcap
    if not (np.ndim(temperature) == 0 and temperature == 1.0):
        tkw["temperature"] = temperature
    what = what or f"{name}[{dt.name}, shape {x.shape}, {_brief(tkw)}, {_brief(kw)}]"
    if k is None and name in ("top_k", "top_k_logprobs"):
        k = min(5, n)
    got = call(name, x, k=k, labels=labels, **tkw, **kw)
    # the caller's logits are never written to
    assert_unchanged(x, xin, what)
    scale = ref.row_scale(x, softcap, temperature)
    red_dt = tols.reduction_dtype(dt)
    if name == "logsumexp":
        want = ref.logsumexp(x, **tkw)
        got_a = np.asarray(got)
        assert got_a.dtype == red_dt, f"{what}: dtype {got_a.dtype} != {red_dt}"
        tols.assert_close(got_a, want, tols.log_tol(dt, want, scale, red_dt), red_dt, what)
    elif name in MAPS:
        if kw.get("dtype") is not None:
            out_dt = np.dtype(kw["dtype"])
        elif kw.get("out") is not None:
            out_dt = kw["out"].dtype
        else:
            out_dt = dt
        got_a = np.asarray(got)
        assert _native(got_a.dtype) == _native(out_dt), f"{what}: dtype {got_a.dtype} != {out_dt}"
        if kw.get("out") is not None:
            assert got is kw["out"], f"{what}: out= was given but another array was returned"
        want = getattr(ref, name)(x, **tkw)
        if name == "softmax":
            tol = tols.prob_tol(dt, want, scale[..., None], out_dt)
        else:
            tol = tols.log_tol(dt, want, scale[..., None], out_dt)
        tols.assert_close(got_a, want, tol, out_dt, what)
    elif name == "entropy":
        want = ref.entropy(x, **tkw)
        got_a = np.asarray(got)
        assert got_a.dtype == red_dt, f"{what}: dtype {got_a.dtype} != {red_dt}"
        tols.assert_close(got_a, want, tols.log_tol(dt, want, scale, red_dt), red_dt, what)
    elif name == "cross_entropy":
        reduction = kw.get("reduction", "mean")
        ce_kw = {
            a: kw[a] for a in ("weight", "ignore_index", "label_smoothing", "reduction", "z_loss") if a in kw
        }
        want = ref.cross_entropy(x, labels, **ce_kw, **tkw)
        got_a = np.asarray(got)
        assert got_a.dtype == red_dt, f"{what}: dtype {got_a.dtype} != {red_dt}"
        want_rows = ref.cross_entropy(x, labels, **dict(ce_kw, reduction="none"), **tkw)
        w = np.ones(n) if kw.get("weight") is None else np.asarray(kw["weight"], dtype=np.float64)
        counted = np.asarray(labels) != kw.get("ignore_index", IGNORE)
        wmax = np.abs(w).max() if n else 1.0
        z = kw.get("z_loss", 0.0)
        lse = ref.logsumexp(x, **tkw)
        # per row: weights scale the NLL and smoothing terms; the z-loss term z*lse^2 has error 2*z*|lse|*err
        row_tol = np.where(
            counted,
            tols.log_tol(dt, want_rows, scale)
            * wmax
            * (1.0 + 2.0 * z * np.abs(np.where(np.isfinite(lse), lse, 0.0))),
            0.0,
        )
        if reduction == "none":
            tols.assert_close(got_a, want, row_tol, red_dt, what)
        else:
            t = tols.sum_tol(row_tol, want_rows)
            if reduction == "mean":
                wsum = np.where(counted, w[np.where(counted, labels, 0)], 0.0).sum()
                denom = min(wsum, counted.sum()) if z else wsum
                t = t / denom if denom else 0.0
            t = t + tols.log_tol(dt, want, 0.0, red_dt)
            tols.assert_close(got_a, want, t, red_dt, what)
    elif name == "argmax":
        got_a = np.asarray(got)
        assert got_a.dtype == np.int64, f"{what}: dtype {got_a.dtype} != int64"
        y = ref.transform(x, softcap, temperature)
        want = ref.argmax(y)
        if tkw:
            assert_indices(got_a, want, y, tols.log_tol(dt, 0.0, scale)[..., None], what)
        else:
            np.testing.assert_array_equal(got_a, want, err_msg=what)
    elif name == "top_k":
        vals, idx = got
        vals, idx = np.asarray(vals), np.asarray(idx)
        assert _native(vals.dtype) == _native(dt), f"{what}: values dtype {vals.dtype} != {dt}"
        assert idx.dtype == np.int64, f"{what}: indices dtype {idx.dtype} != int64"
        assert vals.shape == lead + (k,) and idx.shape == lead + (k,), (
            f"{what}: shapes {vals.shape} {idx.shape}"
        )
        y = ref.transform(x, softcap, temperature)
        want_idx = ref.top_k_order(y, k)
        if tkw:
            assert_indices(idx, want_idx, y, tols.log_tol(dt, 0.0, scale)[..., None], what)
            # the values are the transformed logits (after softcap and temperature) in the input's dtype
            want_vals = np.take_along_axis(y, idx, axis=-1)
            tols.assert_close(vals, want_vals, tols.log_tol(dt, want_vals, scale[..., None], dt), dt, what)
        else:
            np.testing.assert_array_equal(idx, want_idx, err_msg=what)
            want_vals = np.take_along_axis(x, want_idx, axis=-1)
            np.testing.assert_array_equal(vals.astype(np.float64), want_vals.astype(np.float64), err_msg=what)
    elif name == "top_k_logprobs":
        lp, idx = got
        lp, idx = np.asarray(lp), np.asarray(idx)
        assert lp.dtype == red_dt, f"{what}: logprobs dtype {lp.dtype} != {red_dt}"
        assert idx.dtype == np.int64, f"{what}: indices dtype {idx.dtype} != int64"
        want_lp, want_idx = ref.top_k_logprobs(x, k, **tkw)
        y = ref.transform(x, softcap, temperature)
        tol = tols.log_tol(dt, want_lp, scale[..., None], red_dt)
        nan_rows = np.isnan(want_lp).any(axis=-1)
        if nan_rows.any():
            assert np.isnan(lp[nan_rows]).all(), (
                f"{what}: NaN rows must give NaN log-probs, got {lp[nan_rows]}"
            )
            ok = ~nan_rows
            if ok.any():
                tols.assert_close(lp[ok], want_lp[ok], tol[ok], red_dt, what)
                assert_indices(
                    idx[ok], want_idx[ok], y[ok], tols.log_tol(dt, 0.0, scale[ok])[..., None], what
                )
        else:
            # the k-th log-prob may belong to a different token of (near) equal value
            tols.assert_close(lp, want_lp, tol, red_dt, what)
            assert_indices(idx, want_idx, y, tols.log_tol(dt, 0.0, scale)[..., None], what)
    else:
        raise ValueError(name)
    return got


def cpu_flags():
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln.split(":")[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
