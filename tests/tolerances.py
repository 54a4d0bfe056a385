"""The one table of tolerances that every test uses.

Contract (errors measured against ``tests/reference.py``, which sees the same, already rounded, input values):

- float64 input computes in float64: ``|err| <= 1e-12 * (1 + M + |ref|)`` for log-domain results and
  ``|err| <= 1e-12 * (1 + M) * p + tiny`` for probabilities;
- float32, float16 and bfloat16 inputs compute in float32: log-domain results (logsumexp, log_softmax,
  cross-entropy, entropy, top-k log-probs) ``|err| <= 16 * eps32 * (1 + M + |ref|)``; probabilities (softmax)
  ``|err| <= 16 * eps32 * (1 + M) * p + 1e-37``;
- then a result stored in a narrower dtype adds that dtype's rounding: ``rel * |ref| + smallest subnormal``
  (float16: 2^-11, bfloat16: 2^-8, float32: 2^-24);

where ``M`` is the row's largest finite ``|x / T|`` after the softcap (``tests.reference.row_scale``).
Tune the constants here, nowhere else.
"""

import ml_dtypes
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)

# by the dtype the library computes in
COMPUTE = {
    "float64": {"log": 1e-12, "prob": 1e-12, "prob_abs": 1e-300},
    "float32": {"log": 16 * EPS32, "prob": 16 * EPS32, "prob_abs": 1e-37},
}

# by the dtype a result is stored in: (relative rounding, smallest subnormal)
OUTPUT = {
    "float64": (0.0, 0.0),
    "float32": (2.0**-24, 2.0**-149),
    "float16": (2.0**-11, 2.0**-24),
    "bfloat16": (2.0**-8, 2.0**-133),
}

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def name(dtype):
    """``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``."""
    return np.dtype(dtype).name


def compute_name(in_dtype):
    """The dtype the library computes in for this input dtype."""
    return "float64" if name(in_dtype) == "float64" else "float32"


def reduction_dtype(in_dtype):
    """The dtype of a reduction's result (logsumexp, losses, entropy, log-probs)."""
    return np.dtype(np.float64) if name(in_dtype) == "float64" else np.dtype(np.float32)


def _rounding(out_dtype, ref):
    if out_dtype is None:
        return 0.0
    rel, sub = OUTPUT[name(out_dtype)]
    return rel * np.abs(ref) + sub


def _finite(a):
    return np.where(np.isfinite(a), a, 0.0)


def log_tol(in_dtype, ref, scale, out_dtype=None):
    """Tolerance for log-domain results: ``rtol * (1 + M + |ref|)`` plus the output rounding.

    ``scale`` broadcasts against ``ref`` (per row for a reduction: pass ``scale[..., None]`` for a map).
    """
    ref = _finite(np.asarray(ref, dtype=np.float64))
    c = COMPUTE[compute_name(in_dtype)]
    return c["log"] * (1.0 + scale + np.abs(ref)) + _rounding(out_dtype, ref)


def prob_tol(in_dtype, ref, scale, out_dtype=None):
    """Tolerance for probabilities: ``rtol * (1 + M) * p + tiny`` plus the output rounding."""
    ref = _finite(np.asarray(ref, dtype=np.float64))
    c = COMPUTE[compute_name(in_dtype)]
    return c["prob"] * (1.0 + scale) * ref + c["prob_abs"] + _rounding(out_dtype, ref)


def sum_tol(row_tols, row_values):
    """Tolerance of a sum over rows of per-row results with tolerances ``row_tols``.

    Adds the rounding of accumulating ``n`` terms in float32 (pairwise-like growth).
    """
    row_tols = np.asarray(row_tols, dtype=np.float64).ravel()
    row_values = _finite(np.asarray(row_values, dtype=np.float64)).ravel()
    n = max(row_values.size, 1)
    return row_tols.sum() + 4 * EPS32 * np.ceil(np.log2(n + 1)) * np.abs(row_values).sum()


def softmax_sum_tol(in_dtype, scale, n_classes, out_dtype=None):
    """How far a softmax row may sum from 1."""
    c = COMPUTE[compute_name(in_dtype)]
    rel, sub = OUTPUT[name(out_dtype)] if out_dtype is not None else (0.0, 0.0)
    return c["prob"] * (1.0 + scale) + n_classes * c["prob_abs"] + rel + n_classes * sub + 4 * EPS32


def assert_close(got, ref, tol, out_dtype=None, what=""):
    """``got`` equals ``ref`` within ``tol`` elementwise; NaN where ``ref`` is NaN, the same infinity where
    ``ref`` is infinite. Where ``|ref|`` overflows ``out_dtype``, ``got`` may be that dtype's largest finite
    value or the infinity of the same sign."""
    got_arr = np.asarray(got)
    ref = np.asarray(ref, dtype=np.float64)
    assert got_arr.shape == ref.shape, f"{what}: shape {got_arr.shape} != expected {ref.shape}"
    g = got_arr.astype(np.float64)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), ref.shape)
    ok = np.zeros(ref.shape, dtype=bool)
    nan = np.isnan(ref)
    ok |= nan & np.isnan(g)
    inf = np.isinf(ref)
    ok |= inf & (g == ref)
    fin = ~nan & ~inf
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(g - ref)
        ok |= fin & (err <= tol)
        if out_dtype is not None and name(out_dtype) != "float64":
            big = float(finfo(out_dtype).max)
            over = fin & (np.abs(ref) > big)
            ok |= over & ((np.abs(g) >= big) & (np.sign(g) == np.sign(ref)))
    if not ok.all():
        bad = np.argwhere(~ok)
        lines = []
        for pos in bad[:8]:
            p = tuple(pos)
            lines.append(f"  at {p}: got {g[p]!r}, expected {ref[p]!r}, |err| {err[p]!r}, tol {tol[p]!r}")
        raise AssertionError(f"{what}: {len(bad)} of {ref.size} values out of tolerance\n" + "\n".join(lines))


def finfo(dtype):
    """``np.finfo`` that also knows bfloat16."""
    if name(dtype) == "bfloat16":
        return ml_dtypes.finfo(ml_dtypes.bfloat16)
    return np.finfo(dtype)
