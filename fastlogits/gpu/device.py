"""Device functions of the row states, for the GPU kernels and for users' own numba.cuda kernels.

The states and their edge semantics are the C core's (``fastlogits/include/fastlogits.h``):

- logsumexp: ``(m, s)``, ``m`` the running max (``-inf`` while empty or all ``-inf``, ``nan`` once a NaN was
  seen), ``s = sum exp(x - m)``. A ``+inf`` logit gives ``(inf, 1)``, so the result is ``+inf``.
- entropy: ``(m, s, t)`` with ``t = sum exp(x - m) * (x - m)``.

Start a state at ``(-inf, 0.0)`` (``(-inf, 0.0, 0.0)``); ``lse_update`` folds one logit in, ``lse_merge``
joins the states of two column ranges (associative and commutative), ``lse_result`` finalizes.

Example, inside a user kernel::

    import math
    from numba import cuda
    from fastlogits.gpu.device import lse_update, lse_result

    @cuda.jit
    def row_lse(x, out):
        r = cuda.grid(1)
        if r < x.shape[0]:
            m, s = -math.inf, 0.0
            for j in range(x.shape[1]):
                m, s = lse_update(m, s, x[r, j])
            out[r] = lse_result(m, s)

Keep ``s`` in float64 (start it at ``0.0``); ``m`` takes the logits' type.
"""
import math

from numba import cuda

__all__ = ["lse_update", "lse_merge", "lse_result", "ent_update", "ent_merge", "ent_result", "better"]

INT64_MAX = 9223372036854775807


@cuda.jit(device=True)
def lse_update(m, s, x):
    """Fold logit x into the logsumexp state (m, s); returns the new (m, s)."""
    if x > m:
        # a new max; from m = -inf this gives s = 1, and x = +inf gives (inf, 1)
        return x, s * math.exp(m - x) + 1.0
    if x <= m:
        if x == -math.inf or m == math.inf:
            return m, s
        return m, s + math.exp(x - m)
    nan = m + x  # x or m is NaN: the state stays NaN
    return nan, s + nan


@cuda.jit(device=True)
def lse_merge(m1, s1, m2, s2):
    """The state of the union of two column ranges (the C core's fl_lse_merge)."""
    if m1 != m1 or m2 != m2:
        return math.nan, math.nan
    if m2 == -math.inf:
        return m1, s1
    if m1 == -math.inf:
        return m2, s2
    if m1 == math.inf or m2 == math.inf:
        return math.inf, 1.0
    if m1 >= m2:
        return m1, s1 + s2 * math.exp(m2 - m1)
    return m2, s2 + s1 * math.exp(m1 - m2)


@cuda.jit(device=True)
def lse_result(m, s):
    """log sum exp of the state: -inf for nothing or all -inf, +inf if a +inf was seen, NaN if a NaN was."""
    if m == -math.inf or m == math.inf or m != m:
        return m
    return m + math.log(s)


@cuda.jit(device=True)
def ent_update(m, s, t, x):
    """Fold logit x into the entropy state (m, s, t)."""
    if x > m:
        if m == -math.inf or x == math.inf:
            return x, 1.0, 0.0
        d = m - x
        f = math.exp(d)
        if f > 0:
            return x, s * f + 1.0, (t + s * d) * f
        return x, 1.0, 0.0   # the old terms vanish (and s * d may overflow)
    if x <= m:
        if x == -math.inf or m == math.inf:
            return m, s, t
        d = x - m
        e = math.exp(d)
        if e > 0:
            return m, s + e, t + e * d
        return m, s, t
    nan = m + x
    return nan, s + nan, t + nan


@cuda.jit(device=True)
def ent_merge(m1, s1, t1, m2, s2, t2):
    """The entropy state of the union of two column ranges (the C core's fl_ent_merge)."""
    if m1 != m1 or m2 != m2:
        return math.nan, math.nan, math.nan
    if m2 == -math.inf:
        return m1, s1, t1
    if m1 == -math.inf:
        return m2, s2, t2
    if m1 == math.inf or m2 == math.inf:
        return math.inf, 1.0, 0.0
    if m1 >= m2:
        d = m2 - m1
        f = math.exp(d)
        if f > 0:
            return m1, s1 + s2 * f, t1 + (t2 + s2 * d) * f
        return m1, s1, t1
    d = m1 - m2
    f = math.exp(d)
    if f > 0:
        return m2, s2 + s1 * f, t2 + (t1 + s1 * d) * f
    return m2, s2, t2


@cuda.jit(device=True)
def ent_result(m, s, t):
    """Shannon entropy (nats); NaN for an empty, all -inf, +inf or NaN row (its softmax is NaN)."""
    if m == -math.inf or m == math.inf or m != m:
        return math.nan
    return math.log(s) - t / s


@cuda.jit(device=True)
def better(a, ia, b, ib):
    """Is (a, ia) ranked above (b, ib)? NaN above everything, then larger values, then lower indices
    (the C core's top-k order; a strict total order on distinct indices)."""
    if a != a:
        return b == b or ia < ib
    if b != b:
        return False
    return a > b or (a == b and ia < ib)
