"""logsumexp, softmax, log_softmax and entropy: literal values, the edge table of REFERENCES.md, huge
magnitudes,
and SciPy / PyTorch on the same inputs where they are installed."""

import math

import numpy as np
import pytest

import fastlogits as fl
from tests import reference as ref
from tests import tolerances as tols
from tests.helpers import BF16, DTYPE_IDS, DTYPES, check

inf, nan = np.inf, np.nan
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------- literals


def test_logsumexp_0_minus40_mpmath():
    """mpmath: log(1 + e^-40) = 4.248354255291589e-18. PyTorch returns 0, SciPy the exact value; both are
    within the absolute tolerance, so only the absolute error is asserted."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    exact = float(mpmath.log(1 + mpmath.exp(-40)))
    assert exact == pytest.approx(4.248354255291589e-18, rel=1e-15)
    got = fl.logsumexp(np.array([0.0, -40.0]))
    assert np.asarray(got).dtype == np.float64
    assert abs(float(got) - 4.248354255291589e-18) <= 1e-16


def test_logsumexp_mpmath_rows():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    rows = [
        [-1000.0, -1000.5, -999.0],
        [1e4, 1e4 - 1e-3, 0.0],
        [0.1, 0.2, 0.3, 0.4, -30.0],
        [-745.0, -746.0, -800.0],
        [709.0, 708.0, 700.0],
    ]
    for row in rows:
        exact = float(mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in row)))
        got = float(fl.logsumexp(np.array(row)))
        tol = 1e-12 * (1 + max(abs(v) for v in row) + abs(exact))
        assert abs(got - exact) <= tol, (row, got, exact)


EDGE = {
    # row: (logsumexp, softmax, log_softmax), the fastlogits column of REFERENCES.md's table
    "all_neg_inf": ([-inf, -inf, -inf], -inf, [nan, nan, nan], [nan, nan, nan]),
    "neg_inf_0": ([-inf, 0.0], 0.0, [0.0, 1.0], [-inf, 0.0]),
    "inf_0": ([inf, 0.0], inf, [nan, nan], [nan, nan]),
    "nan_0": ([nan, 0.0], nan, [nan, nan], [nan, nan]),
    "1000_1000_neg_inf": ([1000.0, 1000.0, -inf], 1000.0 + LN2, [0.5, 0.5, 0.0], [-LN2, -LN2, -inf]),
}


@pytest.mark.parametrize("chunk_size", [None, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(EDGE))
def test_edge_table(case, dtype, chunk_size):
    row, lse, sm, lsm = EDGE[case]
    x = np.array(row, dtype=dtype)
    red = tols.reduction_dtype(dtype)
    scale = ref.row_scale(x)
    got = np.asarray(fl.logsumexp(x, chunk_size=chunk_size))
    assert got.dtype == red
    tols.assert_close(got, lse, tols.log_tol(dtype, lse, scale, red), red, f"logsumexp {case}")
    got = np.asarray(fl.softmax(x, chunk_size=chunk_size))
    assert got.dtype == dtype
    tols.assert_close(got, sm, tols.prob_tol(dtype, np.array(sm), scale, dtype), dtype, f"softmax {case}")
    got = np.asarray(fl.log_softmax(x, chunk_size=chunk_size))
    assert got.dtype == dtype
    tols.assert_close(
        got, lsm, tols.log_tol(dtype, np.array(lsm), scale, dtype), dtype, f"log_softmax {case}"
    )
    # and the reference agrees with the table
    tols.assert_close(ref.logsumexp(x), lse, 1e-12 * (1 + scale), None, "reference")
    tols.assert_close(ref.softmax(x), sm, 1e-15, None, "reference")
    tols.assert_close(ref.log_softmax(x), lsm, 1e-12 * (1 + scale), None, "reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_entropy_literals(dtype):
    cases = [
        ([0.0] * 10, math.log(10)),
        ([0.0, -inf, -inf], 0.0),
        ([-inf, 0.0], 0.0),
        ([0.0, 0.0], LN2),
        ([5.0, -inf, 5.0, -inf], LN2),
        ([-1000.0, -1000.0, -inf], LN2),
        ([-inf, -inf], nan),
        ([inf, 0.0], nan),
        ([nan, 0.0], nan),
    ]
    for row, want in cases:
        x = np.array(row, dtype=dtype)
        got = np.asarray(fl.entropy(x))
        red = tols.reduction_dtype(dtype)
        assert got.dtype == red
        tols.assert_close(got, want, tols.log_tol(dtype, want, ref.row_scale(x), red), red, f"entropy {row}")
    # p = [1/4, 3/4]
    x = np.array([0.0, math.log(3.0)], dtype=np.float64)
    want = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert float(fl.entropy(x)) == pytest.approx(want, rel=1e-12)
    # at T = 2 the logits [0, 2 ln 3] become [0, ln 3]
    assert float(fl.entropy(2 * x, temperature=2.0)) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_entropy_of_a_certain_row_is_exactly_zero(dtype, rng):
    """A row whose other logits are -inf (a masked row: top-k, grammar) or lie far below its max has entropy
    exactly 0, as PyTorch's -sum p log p (0 log 0 = 0; e^-2000 is 0 in float64) gives: every chunking and
    thread split. Before, each such logit added its clamped exp(-87.3) * -87.3 (1e-36) to the sum."""
    V = int(rng.integers(3000, 9000))
    x = np.full((3, V), -inf)
    x[1, :] = -2000.0 - rng.random(V) * 1e4       # far below the max, finite
    x[2, ::2] = -inf
    hot = rng.integers(0, V, 3)
    x[np.arange(3), hot] = rng.uniform(-5, 5, 3)
    x = x.astype(dtype)
    for chunk_size, threads in ((None, None), (64, 2), (1000, 3), (7, 1)):
        got = np.asarray(fl.entropy(x, chunk_size=chunk_size, threads=threads), np.float64)
        np.testing.assert_array_equal(got, 0.0, err_msg=f"chunk_size={chunk_size}, threads={threads}")


def test_temperature_softcap_literals():
    x = np.array([2.0, 4.0])
    assert float(fl.logsumexp(x, temperature=2.0)) == pytest.approx(math.log(math.e + math.e**2), rel=1e-13)
    assert float(fl.logsumexp(np.array([100.0]), softcap=10.0)) == pytest.approx(
        10 * math.tanh(10), rel=1e-13
    )
    # the softcap comes before the temperature
    got = float(fl.logsumexp(np.array([100.0, 0.0]), softcap=10.0, temperature=2.0))
    assert got == pytest.approx(math.log(math.exp(5 * math.tanh(10)) + 1.0), rel=1e-13)
    # one temperature per row
    x = np.array([[0.0, 1.0], [0.0, 1.0]])
    got = np.asarray(fl.logsumexp(x, temperature=np.array([1.0, 0.5])))
    np.testing.assert_allclose(got, [math.log(1 + math.e), math.log(1 + math.e**2)], rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, DTYPES[1], np.float16], ids=["float32", "bfloat16", "float16"])
def test_huge_magnitudes_stay_finite(dtype):
    """Near the top of the range nothing may overflow into inf or NaN: x - max, never x - lse or exp(x)."""
    h = float(np.array(3e38 if np.dtype(dtype) != np.float16 else 6e4, dtype=dtype).astype(np.float64))
    x = np.array([h, -h, h], dtype=dtype)
    lse = float(fl.logsumexp(x))
    assert math.isfinite(lse) and lse == pytest.approx(h + LN2, rel=1e-6)
    np.testing.assert_allclose(np.asarray(fl.softmax(x)).astype(np.float64), [0.5, 0.0, 0.5], atol=1e-3)
    lsm = np.asarray(fl.log_softmax(x)).astype(np.float64)
    # like PyTorch: (x - max) - log(sum), so the largest entries keep -ln 2 (within the output's rounding)
    np.testing.assert_allclose(lsm[[0, 2]], [-LN2, -LN2], rtol=2.0**-8)
    assert lsm[1] < -1e4
    assert float(fl.entropy(x)) == pytest.approx(LN2, rel=1e-5)
    assert float(fl.cross_entropy(x[None], np.array([2]))) == pytest.approx(LN2, rel=1e-5)
    assert int(fl.argmax(x)) == 0
    lp, idx = fl.top_k_logprobs(x, 2)
    np.testing.assert_array_equal(np.asarray(idx), [0, 2])
    np.testing.assert_allclose(np.asarray(lp), [-LN2, -LN2], rtol=1e-5)


def test_float32_max_pairs():
    big = float(np.finfo(np.float32).max)
    x = np.array([[big, big], [-big, -big], [big, -big]], dtype=np.float32)
    lse = np.asarray(fl.logsumexp(x))
    assert np.isfinite(lse).all()
    np.testing.assert_allclose(lse, [big, -big, big], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fl.softmax(x)), [[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(fl.log_softmax(x))[:2], np.full((2, 2), -LN2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fl.entropy(x)), [LN2, LN2, 0.0], atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_huge_1e4(dtype):
    x = np.array([[1e4, 1e4, -1e4], [1e4, -1e4, -1e4], [-1e4, -1e4, -1e4]], dtype=dtype)
    for name in ("logsumexp", "softmax", "log_softmax", "entropy"):
        check(name, x)
    h = float(x[0, 0])  # 1e4 in float16 and wider, 9984 in bfloat16
    np.testing.assert_allclose(
        np.asarray(fl.logsumexp(x)).astype(np.float64), [h + LN2, h, -h + math.log(3)], rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(fl.softmax(x)).astype(np.float64)[:, 0], [0.5, 1.0, 1 / 3], rtol=3e-3
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 8, 9, None])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_neg_inf_chunks_then_low_values(dtype, chunk_size):
    """REFERENCES.md: a state whose first chunks are all -inf must keep -inf as its max, not a substituted 0
    (which returns -inf for a row whose later values are near -1000)."""
    x = np.array([-inf] * 8 + [-1000.0, -1003.0], dtype=dtype)
    a, b = float(x[8]), float(x[9])  # -1003 is -1004 in bfloat16
    want = a + math.log1p(math.exp(b - a))
    for threads in (1, 2):
        got = float(fl.logsumexp(x, chunk_size=chunk_size, threads=threads))
        assert got == pytest.approx(want, rel=1e-6), (got, want)
        p = np.asarray(fl.softmax(x, chunk_size=chunk_size, threads=threads)).astype(np.float64)
        np.testing.assert_allclose(p[8:], [math.exp(a - want), math.exp(b - want)], rtol=4e-3)
        assert (p[:8] == 0).all()
    check("entropy", x, chunk_size=chunk_size)
    check("log_softmax", x, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_low_no_underflow(dtype):
    """Without the max shift, exp(-1000) underflows to 0 and logsumexp becomes -inf."""
    x = np.full((2, 300), -1000.0, dtype=dtype)
    got = np.asarray(fl.logsumexp(x)).astype(np.float64)
    np.testing.assert_allclose(got, -1000.0 + math.log(300), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fl.softmax(x)).astype(np.float64), 1 / 300, rtol=3e-3)


# --------------------------------------------------------------------------------------------------- SciPy


def _random_rows(rng):
    return [rng.standard_normal((4, 100)) * s for s in (0.1, 3.0, 30.0, 1000.0)] + [
        rng.standard_normal((2, 3, 17)) * 5,
        rng.standard_normal(1025) * 10,
    ]


def test_scipy_random(rng):
    special = pytest.importorskip("scipy.special")
    for x in _random_rows(rng):
        scale = ref.row_scale(x)
        want = special.logsumexp(x, axis=-1)
        tols.assert_close(
            fl.logsumexp(x), want, tols.log_tol(np.float64, want, scale), None, "scipy logsumexp"
        )
        want = special.softmax(x, axis=-1)
        tols.assert_close(
            fl.softmax(x), want, tols.prob_tol(np.float64, want, scale[..., None]), None, "scipy softmax"
        )
        want = special.log_softmax(x, axis=-1)
        tols.assert_close(
            fl.log_softmax(x),
            want,
            tols.log_tol(np.float64, want, scale[..., None]),
            None,
            "scipy log_softmax",
        )
        # entropy of the softmax, from scipy.stats
        stats = pytest.importorskip("scipy.stats")
        want = stats.entropy(special.softmax(x, axis=-1), axis=-1)
        tols.assert_close(
            fl.entropy(x), want, tols.log_tol(np.float64, want, scale) * 10, None, "scipy entropy"
        )


@pytest.mark.parametrize("case", list(EDGE))
def test_scipy_edge_rows(case):
    """SciPy's results on the edge table, where fastlogits follows SciPy (logsumexp and softmax everywhere,
    log_softmax except the +inf row, where fastlogits follows PyTorch's NaN)."""
    special = pytest.importorskip("scipy.special")
    x = np.array(EDGE[case][0])
    with np.errstate(all="ignore"):
        lse, sm, lsm = special.logsumexp(x), special.softmax(x), special.log_softmax(x)
    np.testing.assert_array_equal(np.isnan(np.asarray(fl.logsumexp(x))), np.isnan(lse))
    tols.assert_close(fl.logsumexp(x), lse, 1e-12 * 2000, None, f"scipy logsumexp {case}")
    tols.assert_close(fl.softmax(x), sm, 1e-12, None, f"scipy softmax {case}")
    if case != "inf_0":
        tols.assert_close(fl.log_softmax(x), lsm, 1e-12 * 2000, None, f"scipy log_softmax {case}")


# --------------------------------------------------------------------------------------------------- PyTorch


def test_torch_random_and_edges(rng):
    torch = pytest.importorskip("torch")
    rows = _random_rows(rng) + [np.array(EDGE[c][0] + [0.0] * (3 - len(EDGE[c][0])))[None] for c in EDGE]
    for x in rows:
        t = torch.from_numpy(np.ascontiguousarray(x))
        scale = ref.row_scale(x)
        want = torch.logsumexp(t, dim=-1).numpy()
        tols.assert_close(
            fl.logsumexp(x), want, tols.log_tol(np.float64, want, scale), None, "torch logsumexp"
        )
        want = torch.softmax(t, dim=-1).numpy()
        tols.assert_close(
            fl.softmax(x), want, tols.prob_tol(np.float64, want, scale[..., None]), None, "torch softmax"
        )
        want = torch.log_softmax(t, dim=-1).numpy()
        tols.assert_close(
            fl.log_softmax(x),
            want,
            tols.log_tol(np.float64, want, scale[..., None]),
            None,
            "torch log_softmax",
        )


def test_torch_float32_and_bfloat16(rng):
    """PyTorch in float32 on the same (rounded) values: agreement within the float32 tolerance."""
    torch = pytest.importorskip("torch")
    for dtype in (np.float32, DTYPES[1], np.float16):
        x = (rng.standard_normal((3, 5000)) * 8).astype(dtype)
        t = torch.from_numpy(x.astype(np.float32))
        scale = ref.row_scale(x)
        want = torch.logsumexp(t, dim=-1).double().numpy()
        tols.assert_close(
            fl.logsumexp(x), want, 2 * tols.log_tol(dtype, want, scale), None, "torch logsumexp"
        )
        want = torch.log_softmax(t, dim=-1).double().numpy()
        tols.assert_close(
            fl.log_softmax(x),
            want,
            2 * tols.log_tol(dtype, want, scale[..., None], dtype),
            dtype,
            "torch log_softmax",
        )


def test_torch_entropy(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((5, 300)) * 4
    want = torch.distributions.Categorical(logits=torch.from_numpy(x)).entropy().numpy()
    tols.assert_close(
        fl.entropy(x), want, tols.log_tol(np.float64, want, ref.row_scale(x)) * 10, None, "torch entropy"
    )


def test_bfloat16_and_tensor_arguments_are_read_as_their_values(rng):
    """Per-row temperatures and class weights given as bfloat16 (NumPy's kind "V") or as PyTorch tensors
    (bfloat16 included, where torch is installed) are read as the numbers they hold, as float16 ones are."""
    x = rng.standard_normal((3, 40)).astype(np.float32)
    y = np.array([1, 7, 39])
    t = np.array([0.5, 1.0, 3.0])
    w = rng.uniform(0.5, 2.0, 40).astype(BF16)
    want_t = fl.logsumexp(x, temperature=t)
    want_w = fl.cross_entropy(x, y, weight=w.astype(np.float64), label_smoothing=0.1)
    np.testing.assert_allclose(want_t, ref.logsumexp(x / t[:, None]), rtol=1e-6)
    np.testing.assert_array_equal(fl.logsumexp(x, temperature=t.astype(BF16)), want_t)
    assert fl.cross_entropy(x, y, weight=w, label_smoothing=0.1) == want_w
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(fl.logsumexp(x, temperature=torch.tensor(t, dtype=torch.bfloat16)), want_t)
    assert fl.cross_entropy(x, y, weight=torch.tensor(w.astype(np.float32), dtype=torch.bfloat16),
                            label_smoothing=0.1) == want_w
