"""Invariants with hypothesis: a constant added to a row changes only logsumexp (by that constant); results
do not
depend on chunk size or thread count beyond the tolerance (selections not at all); softmax rows sum to 1;
log_softmax is log(softmax); top_k(k=1) is argmax."""

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastlogits as fl
from tests import reference as ref
from tests import tolerances as tols

DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]


@st.composite
def grid_logits(draw, max_rows=4, max_v=300, dtype=None):
    """Logits on a grid of 2^-8 in [-64, 64]: adding an integer constant up to 100 is exact in float32."""
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    rows = draw(st.integers(1, max_rows))
    n = draw(st.integers(1, max_v))
    ints = draw(hnp.arrays(np.int32, (rows, n), elements=st.integers(-(2**14), 2**14)))
    return (ints.astype(np.float64) / 256.0).astype(dtype)


special_floats = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 1e4, -1e4, 3.0, 3.0])


@st.composite
def awkward_logits(draw):
    """Small rows mixing ordinary values, ties, infinities and NaN."""
    dtype = draw(st.sampled_from([np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]))
    rows = draw(st.integers(1, 4))
    n = draw(st.integers(1, 40))
    elems = st.one_of(st.integers(-5, 5).map(float), special_floats)
    return draw(hnp.arrays(np.float64, (rows, n), elements=elems)).astype(dtype)


chunk_sizes = st.sampled_from([None, 1, 2, 3, 7, 64])
threads = st.sampled_from([None, 1, 2])


def _f(a):
    return np.asarray(a, dtype=np.float64)


@given(x=grid_logits(), c=st.integers(-100, 100))
def test_shift_changes_only_logsumexp(x, c):
    xc = x + x.dtype.type(c)
    assert np.array_equal(xc - x.dtype.type(c), x)  # exact on the grid
    dt = x.dtype
    scale = ref.row_scale(x)
    scale_c = ref.row_scale(xc)
    s = np.maximum(scale, scale_c)
    a, b = _f(fl.logsumexp(x)), _f(fl.logsumexp(xc))
    tols.assert_close(b - c, a, 2 * tols.log_tol(dt, np.abs(a) + abs(c), s), None, "logsumexp(x + c) - c")
    tols.assert_close(
        fl.log_softmax(xc),
        _f(fl.log_softmax(x)),
        2 * tols.log_tol(dt, _f(fl.log_softmax(x)), s[:, None], dt),
        dt,
        "log_softmax shift",
    )
    p = _f(fl.softmax(x))
    tols.assert_close(fl.softmax(xc), p, 2 * tols.prob_tol(dt, p, s[:, None], dt), dt, "softmax shift")
    h = _f(fl.entropy(x))
    tols.assert_close(fl.entropy(xc), h, 2 * tols.log_tol(dt, h, s), None, "entropy shift")
    y = np.zeros(x.shape[0], dtype=np.int64)
    ce = _f(fl.cross_entropy(x, y, reduction="none"))
    tols.assert_close(
        fl.cross_entropy(xc, y, reduction="none"), ce, 2 * tols.log_tol(dt, ce, s), None, "ce shift"
    )
    np.testing.assert_array_equal(np.asarray(fl.argmax(xc)), np.asarray(fl.argmax(x)))
    k = min(3, x.shape[1])
    np.testing.assert_array_equal(np.asarray(fl.top_k(xc, k)[1]), np.asarray(fl.top_k(x, k)[1]))
    lp_x, i_x = fl.top_k_logprobs(x, k)
    lp_c, i_c = fl.top_k_logprobs(xc, k)
    np.testing.assert_array_equal(np.asarray(i_c), np.asarray(i_x))
    tols.assert_close(
        lp_c, _f(lp_x), 2 * tols.log_tol(dt, _f(lp_x), s[:, None]), None, "top_k_logprobs shift"
    )


@given(x=grid_logits(max_v=500), cs=chunk_sizes, th=threads)
def test_chunk_size_and_threads_do_not_matter(x, cs, th):
    dt = x.dtype
    s = ref.row_scale(x)
    kw = dict(chunk_size=cs, threads=th)
    for name, tol in (("logsumexp", tols.log_tol), ("entropy", tols.log_tol)):
        base = _f(getattr(fl, name)(x))
        tols.assert_close(getattr(fl, name)(x, **kw), base, 2 * tol(dt, base, s), None, name)
    base = _f(fl.softmax(x))
    tols.assert_close(fl.softmax(x, **kw), base, 2 * tols.prob_tol(dt, base, s[:, None], dt), dt, "softmax")
    base = _f(fl.log_softmax(x))
    tols.assert_close(
        fl.log_softmax(x, **kw), base, 2 * tols.log_tol(dt, base, s[:, None], dt), dt, "log_softmax"
    )
    y = np.arange(x.shape[0]) % x.shape[1]
    base = _f(fl.cross_entropy(x, y, reduction="none", label_smoothing=0.1))
    tols.assert_close(
        fl.cross_entropy(x, y, reduction="none", label_smoothing=0.1, **kw),
        base,
        2 * tols.log_tol(dt, base, s),
        None,
        "cross_entropy",
    )
    # selections are exact: ties go to the lowest index whatever the chunking
    np.testing.assert_array_equal(np.asarray(fl.argmax(x, **kw)), np.asarray(fl.argmax(x)))
    k = min(4, x.shape[1])
    v1, i1 = fl.top_k(x, k, **kw)
    v0, i0 = fl.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i0))
    np.testing.assert_array_equal(np.asarray(v1), np.asarray(v0))
    np.testing.assert_array_equal(np.asarray(i1), ref.top_k_order(x, k))


@given(x=awkward_logits(), cs=chunk_sizes, th=threads)
def test_awkward_rows_match_reference_and_do_not_depend_on_chunks(x, cs, th):
    from tests.helpers import check

    for name in ("logsumexp", "softmax", "log_softmax", "entropy", "argmax", "top_k", "top_k_logprobs"):
        check(name, x, chunk_size=cs, threads=th)
    y = np.arange(x.shape[0]) % x.shape[1]
    check("cross_entropy", x, labels=y, chunk_size=cs, threads=th, reduction="none")


@given(x=grid_logits(max_v=2000), t=st.floats(0.05, 20.0))
def test_softmax_sums_to_one(x, t):
    dt = x.dtype
    s = ref.row_scale(x, None, t)
    p = _f(fl.softmax(x, temperature=t))
    assert (p >= 0).all() and (p <= 1).all()
    err = np.abs(p.sum(axis=-1) - 1.0)
    assert (err <= tols.softmax_sum_tol(dt, s, x.shape[1], dt)).all(), err


@given(x=grid_logits(max_v=1000), t=st.floats(0.1, 10.0))
def test_log_softmax_is_log_of_softmax(x, t):
    dt = x.dtype
    s = ref.row_scale(x, None, t)[:, None]
    lsm = _f(fl.log_softmax(x, temperature=t))
    p = _f(fl.softmax(x, temperature=t))
    keep = p > 1e-30
    assume(keep.any())
    with np.errstate(divide="ignore"):
        err = np.abs(lsm - np.log(p))
    tol = np.broadcast_to(
        2 * tols.log_tol(dt, lsm, s) + 2 * tols.COMPUTE[tols.compute_name(dt)]["prob"] * (1 + s), err.shape
    )
    assert (err[keep] <= tol[keep]).all()


@given(x=awkward_logits(), cs=chunk_sizes)
def test_top_k_1_is_argmax(x, cs):
    vals, idx = fl.top_k(x, 1, chunk_size=cs)
    am = np.asarray(fl.argmax(x, chunk_size=cs))
    np.testing.assert_array_equal(np.asarray(idx)[:, 0], am)
    np.testing.assert_array_equal(am, np.argmax(x.astype(np.float64), axis=-1))
    np.testing.assert_array_equal(
        np.asarray(vals)[:, 0].astype(np.float64),
        np.take_along_axis(x, am[:, None], -1)[:, 0].astype(np.float64),
    )


@given(x=grid_logits(max_v=200))
def test_top_k_is_sorted_and_consistent(x):
    k = x.shape[1]
    vals, idx = fl.top_k(x, k)
    vals, idx = _f(vals), np.asarray(idx)
    assert (np.diff(vals, axis=-1) <= 0).all()
    np.testing.assert_array_equal(np.sort(idx, axis=-1), np.broadcast_to(np.arange(k), idx.shape))
    np.testing.assert_array_equal(vals, np.take_along_axis(x, idx, -1).astype(np.float64))


transforms = st.one_of(
    st.just({}),
    st.builds(lambda t: {"temperature": t}, st.floats(0.05, 20.0)),
    st.builds(lambda c: {"softcap": c}, st.floats(0.5, 100.0)),
    st.builds(lambda c, t: {"softcap": c, "temperature": t}, st.floats(0.5, 100.0), st.floats(0.1, 10.0)),
)


@given(x=grid_logits(max_v=400, dtype=None), tr=transforms, cs=chunk_sizes, th=threads, data=st.data())
def test_every_function_matches_reference(x, tr, cs, th, data):
    from tests.helpers import check

    if data.draw(st.booleans()) and "temperature" in tr:
        tr = dict(
            tr,
            temperature=np.asarray(
                data.draw(hnp.arrays(np.float64, x.shape[:1], elements=st.floats(0.1, 8)))
            ),
        )
    x = x * x.dtype.type(data.draw(st.sampled_from([1, 4, 64])))
    for name in ("logsumexp", "softmax", "log_softmax", "entropy", "argmax", "top_k", "top_k_logprobs"):
        check(name, x, chunk_size=cs, threads=th, **tr)
    y = np.asarray(data.draw(hnp.arrays(np.int64, x.shape[:1], elements=st.integers(-1, x.shape[1] - 1))))
    y = np.where(y < 0, -100, y)
    for reduction in ("none", "sum", "mean"):
        check(
            "cross_entropy",
            x,
            labels=y,
            chunk_size=cs,
            threads=th,
            reduction=reduction,
            label_smoothing=data.draw(st.sampled_from([0.0, 0.1])),
            **tr,
        )
