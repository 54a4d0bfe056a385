"""softmax and log_softmax: ``out=``, ``dtype=``, result dtypes, rows summing to 1, the input left alone."""

import numpy as np
import pytest
from scipy.special import logsumexp

import fastlogits as fl
from tests import reference as ref
from tests import tolerances as tols
from tests.helpers import BF16, DTYPE_IDS, DTYPES, assert_unchanged, check, make_layout, random_logits

MAPS = ["softmax", "log_softmax"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", MAPS)
def test_result_dtype_is_input_dtype(name, dtype, rng):
    x = random_logits(rng, (3, 40), dtype)
    got = getattr(fl, name)(x)
    assert isinstance(got, np.ndarray)
    assert got.dtype == dtype
    assert got.shape == x.shape


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", MAPS)
def test_dtype_argument(name, dtype, out_dtype, rng):
    x = random_logits(rng, (4, 129), dtype)
    check(name, x, dtype=out_dtype)


@pytest.mark.parametrize("layout", ["C", "cols", "F", "neg"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", MAPS)
def test_out(name, dtype, layout, rng):
    """``out=`` is filled and returned (the same object), whatever its memory layout."""
    x = random_logits(rng, (5, 77), dtype)
    out = make_layout(np.zeros(x.shape, dtype=dtype), layout)
    got = check(name, x, out=out, chunk_size=8)
    assert got is out


@pytest.mark.parametrize("name", MAPS)
def test_out_other_dtype(name, rng):
    """An out of another float dtype receives the values in its dtype."""
    x = random_logits(rng, (3, 50), np.float32)
    for out_dtype in (np.float64, np.float16, BF16):
        out = np.empty(x.shape, dtype=out_dtype)
        got = check(name, x, out=out)
        assert got is out


@pytest.mark.parametrize("name", MAPS)
def test_out_with_temperature_and_leading_shape(name, rng):
    x = random_logits(rng, (2, 3, 64), np.float32)
    t = rng.uniform(0.5, 2.0, size=(2, 3))
    out = np.empty_like(x)
    got = check(name, x, out=out, temperature=t, softcap=4.0)
    assert got is out


@pytest.mark.parametrize("name", MAPS)
def test_out_never_aliases_input_silently(name, rng):
    """With ``out=`` given, the caller's logits are still untouched (results land only in out)."""
    x = random_logits(rng, (4, 300), np.float32)
    keep = x.copy()
    out = np.full_like(x, np.nan)
    getattr(fl, name)(x, out=out, threads=2, chunk_size=7)
    assert_unchanged(x, keep)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("name", MAPS)
def test_out_over_big_endian_logits_is_refused(name, rng):
    """Big-endian logits are swapped into a copy for the kernels; an out over the caller's own bytes is
    still refused (it was checked against the copy, and the logits were overwritten)."""
    x = random_logits(rng, (4, 300), np.float32).astype(">f4")
    keep = x.copy()
    alias = np.ndarray(x.shape, "<f4", buffer=x)
    with pytest.raises(ValueError, match="out overlaps logits"):
        getattr(fl, name)(x, out=alias)
    assert_unchanged(x, keep)


@pytest.mark.parametrize("name", MAPS)
def test_out_wrong_shape(name, rng):
    x = random_logits(rng, (4, 30), np.float32)
    with pytest.raises((ValueError, TypeError), match="out"):
        getattr(fl, name)(x, out=np.empty((4, 31), dtype=np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_softmax_rows_sum_to_one(dtype, rng):
    for n in (1, 2, 129, 4097, 32000):
        x = random_logits(rng, (3, n), dtype, scale=5.0)
        p = np.asarray(fl.softmax(x)).astype(np.float64)
        assert (p >= 0).all() and (p <= 1).all()
        scale = ref.row_scale(x)
        tol = tols.softmax_sum_tol(dtype, scale, n, dtype)
        err = np.abs(p.sum(axis=-1) - 1.0)
        assert (err <= tol).all(), (n, err, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_log_softmax_is_log_of_softmax(dtype, rng):
    x = random_logits(rng, (4, 1000), dtype, scale=4.0)
    lsm = np.asarray(fl.log_softmax(x, dtype=np.float64))
    p = np.asarray(fl.softmax(x, dtype=np.float64))
    scale = ref.row_scale(x)[..., None]
    keep = p > 1e-30
    with np.errstate(divide="ignore"):
        err = np.abs(lsm - np.log(p))
    tol = tols.log_tol(dtype, lsm, scale) + tols.COMPUTE[tols.compute_name(dtype)]["prob"] * (1 + scale) * 2
    assert (err[keep] <= np.broadcast_to(tol, err.shape)[keep]).all()


def test_exp_of_log_softmax_matches_softmax_16bit(rng):
    """float16 output: each value within the float16 rounding of the float64 reference."""
    x = random_logits(rng, (3, 700), np.float16, scale=3.0)
    check("softmax", x)
    check("log_softmax", x)
    p = np.asarray(fl.softmax(x))
    assert p.dtype == np.float16


@pytest.mark.parametrize("name", MAPS)
def test_maps_keep_minus_inf_as_zero_probability(name):
    x = np.array([[0.0, -np.inf, 1.0, -np.inf], [-np.inf, -np.inf, -np.inf, 7.0]], dtype=np.float32)
    got = np.asarray(getattr(fl, name)(x, chunk_size=2))
    if name == "softmax":
        assert got[0, 1] == 0 and got[0, 3] == 0 and (got[1, :3] == 0).all() and got[1, 3] == 1
    else:
        assert (
            got[0, 1] == -np.inf and got[0, 3] == -np.inf and (got[1, :3] == -np.inf).all() and got[1, 3] == 0
        )


@pytest.mark.parametrize("layout", ["F", "cols", "neg"])
@pytest.mark.parametrize("name", MAPS)
def test_out_three_dims(name, layout, rng):
    """A 3-D out= that cannot be reshaped to 2-D without a copy is still filled in place."""
    x = random_logits(rng, (2, 3, 40), np.float32)
    out = make_layout(np.zeros(x.shape, dtype=np.float32), layout)
    got = check(name, x, out=out, temperature=rng.uniform(0.5, 2, size=(2, 3)))
    assert got is out


@pytest.mark.parametrize("in_dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("out_dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_tiny_probabilities_round_to_16bit(in_dtype, out_dtype):
    """Probabilities from 1e-4 down to 1e-9 (float16 subnormals) round to nearest in the output dtype."""
    p = np.concatenate([[1 - 1e-3], np.geomspace(1e-4, 1e-9, 40)])
    x = np.log(p).astype(in_dtype)
    got = np.asarray(fl.softmax(x, dtype=out_dtype)).astype(np.float64)
    want = ref.softmax(x)
    np.testing.assert_array_equal(got, want.astype(out_dtype).astype(np.float64))
    check("softmax", x, dtype=out_dtype)
    check("log_softmax", x, dtype=out_dtype)


def _round_significand(v, bits):
    """v rounded to `bits` significant bits, to nearest even (normal range), exactly: frexp's significand
    times 2**bits is exact in float64, and np.round rounds half to even."""
    m, e = np.frexp(v)
    return np.ldexp(np.round(m * 2.0**bits) / 2.0**bits, e)


@pytest.mark.parametrize("out_dtype, bits", [(np.float16, 11), (BF16, 8)], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", MAPS)
def test_float64_results_round_once_to_16bit(name, out_dtype, bits, rng):
    """float64 results stored as float16 / bfloat16 round once, to nearest even: not through a float, which
    rounds values just past a tie onto it (1 + 2^-11 + 2^-30 to 1 + 2^-11, then to 1 in float16). Logits
    at or below -800 next to a 0 have log-softmax equal to themselves (their exp underflows against 1), so
    the values stored are known exactly; they sit a hair either side of ties of the output format."""
    k = rng.integers(10, 15, 200)                          # magnitudes 2^10 .. 2^15: below -800
    j = rng.integers(0, 2**(bits - 1), 200)                 # which tie of the binade
    tie = 1.0 + (2.0 * j + 1.0) * 2.0**-bits               # halfway between two representable values
    off = rng.choice([-1.0, 1.0], 200) * 2.0**-30
    v = -np.ldexp(tie + off, k)
    x = np.concatenate([[0.0], v])
    lsm = np.asarray(fl.log_softmax(x, dtype=out_dtype)).astype(np.float64)
    np.testing.assert_array_equal(lsm[1:], _round_significand(v, bits))
    if name == "softmax":                                  # random rows; NumPy's float16 cast rounds once
        x = rng.standard_normal((100, 1000)) * 4
        got = np.asarray(fl.softmax(x, dtype=out_dtype)).astype(np.float64)
        want = np.asarray(fl.softmax(x))
        if out_dtype is np.float16:
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float64))
        else:
            norm = want > 2.0**-126                           # bfloat16 normals (the reference's range)
            np.testing.assert_array_equal(got[norm], _round_significand(want[norm], bits))


@pytest.mark.parametrize("layout", ["dtype=", "out contiguous", "out strided", "streamed"])
def test_log_softmax_of_float32_into_float64_does_not_overflow(layout, rng):
    """Float32 logits written as float64 log-probabilities: x - m is formed in double, so [3e38, -3e38]
    gives -6e38 (torch.log_softmax(x, dtype=torch.float64) gives -6.00000001e+38), not float32's -inf;
    ordinary rows agree with the float64 reference to float32's accuracy, on one thread or split."""
    x = rng.standard_normal((3, 300)).astype(np.float32) * 5
    x[0, :2] = [3e38, -3e38]
    x[1, 7] = -np.inf
    x[2, 0] = -3.3e38
    x[2, 1] = 3.3e38
    x64 = x.astype(np.float64)
    want = x64 - logsumexp(x64, axis=1, keepdims=True)
    for threads in (1, 2):
        if layout == "dtype=":
            got = fl.log_softmax(x, dtype=np.float64, threads=threads, chunk_size=64)
        elif layout == "streamed":
            got = np.empty((3, 300))
            fl.log_softmax(iter([x[:1], x[1:]]), out=got, threads=threads)
        else:
            got = np.empty((3, 600))[:, ::2] if layout == "out strided" else np.empty((3, 300))
            fl.log_softmax(x, out=got, threads=threads, chunk_size=64)
        assert got.dtype == np.float64 and np.isfinite(got[[0, 2]]).all() and got[1, 7] == -np.inf
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=2e-6)
    assert want[0, 1] < -6e38 and want[2, 0] < -6e38       # (past float32: -3.4e38)


def _rising_max_rows(dtype, n, chunk, rng):
    """Rows whose max rises from chunk to chunk, so that softmax's first pass takes the terms of early chunks
    from a lower max than the row's and its second pass rescales them: by a little, by more than exp's
    range in the compute type (those chunks' factor exp(m_k - m) / s is not a normal number: computed
    again from the logits), an all -inf first chunk (computed again: zeros), a row with -inf, a row with
    +inf (NaN), one all -inf (NaN)."""
    jump = 100.0 if dtype == np.float32 else 735.0            # past exp's normal range in the compute type
    x = rng.standard_normal((6, n)) * 2
    x[0, :chunk] = -np.inf
    x[0, chunk:3 * chunk] = np.minimum(x[0, chunk:3 * chunk], 4.5)
    x[0, chunk + 2] = 5.0                                    # the max of chunks 1 and 2
    x[0, 3 * chunk:4 * chunk] += 60.0
    x[0, 6 * chunk + 3] = 5.0 + jump                         # chunks 1 and 2: a factor below the normals
    x[1, 2 * chunk:3 * chunk] += 30.0                        # rises of 30 and 40: rescaled terms
    x[1, 5 * chunk:6 * chunk] += 70.0
    x[2, ::5] = -np.inf
    x[2, -1] = 50.0                                          # the max in the last chunk
    x[3, 4] = np.inf
    x[4] = -np.inf
    x[5, chunk + 1] = jump / 2
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("path", ["whole rows", "split rows", "16-bit out", "strided out", "float64 out",
                                  "split rows, 16-bit out", "no scratch"])
def test_softmax_rescales_terms_from_a_rising_max(dtype, path, rng, monkeypatch):
    """softmax computes one exp per logit: its first pass stores exp(x - m_k), m_k the running max when the
    chunk was folded, in out or in scratch memory, and its second pass scales them by exp(m_k - m) / s.
    Every way through that (a thread per row or rows split into ranges; terms in out, in scratch or, past
    TERMS_LIMIT, computed twice) against the float64 reference."""
    import fastlogits.cpu._maps as maps

    n, chunk = 403, 16
    x = _rising_max_rows(dtype, n, chunk, rng)
    kw = dict(chunk_size=chunk, threads=2)
    if "16-bit" in path or path == "no scratch":
        kw["dtype"] = BF16 if dtype == np.float32 else np.float16
    if path == "strided out":
        kw["out"] = np.zeros((x.shape[0], 2 * n), dtype)[:, ::2]
    if path == "float64 out":
        kw["dtype"] = np.float64 if dtype == np.float32 else np.float32
    if path == "no scratch":
        monkeypatch.setattr(maps, "TERMS_LIMIT", 0)
    # a row a call, with two threads: each row split into two ranges
    for r in ([row for row in x] if path.startswith("split rows") else [x]):
        got = np.asarray(check("softmax", r, **kw)).astype(np.float64)
        kept = ~np.isnan(got).all(axis=-1)                   # rows not all NaN: -inf logits give exactly 0
        assert (got[kept][r[kept] == -np.inf] == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("chunk", [4, None])
def test_softmax_probabilities_in_the_subnormal_range(dtype, chunk):
    """Probabilities below the smallest normal number are the reference's, rounded once to the output
    dtype, and 0 below half the smallest subnormal: softmax's terms are not clamped where the logsumexp's
    are (terms below 1e-38 cannot move a sum whose largest term is 1), and where a max found later makes
    a chunk's factor exp(m_k - m) / s subnormal (chunk 4: the max comes last), the chunk is computed again
    rather than scaled by a factor with a few bits left."""
    f = np.finfo(dtype)
    lo = -103.0 if dtype == np.float32 else -744.0
    d = np.concatenate([np.linspace(lo + 20.0, lo, 41), [lo - 1.2, lo - 30.0, -np.inf, -1.0, 0.0]])
    x = (d + 7.25).astype(dtype)
    got = np.asarray(fl.softmax(x, chunk_size=chunk)).astype(np.float64)
    want = ref.softmax(x)
    deep = want < f.smallest_subnormal * 2**9                 # rounding steps of 0.2% and more
    assert deep.sum() > 10
    np.testing.assert_array_equal(got[deep], want[deep].astype(dtype).astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=16 * f.eps, atol=f.smallest_subnormal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", MAPS)
def test_rows_in_one_call_are_the_general_paths_bit_for_bit(name, dtype, rng, monkeypatch):
    """A row that is one chunk is computed in one call (fl_row_map_once: read in place, or converted and
    transformed once into a buffer; fl__softmax_row, fl__log_softmax_row), else in two passes. Same
    arithmetic: the same bits with the one call switched off, for every input dtype, a strided view,
    a temperature and a softcap, outputs of other dtypes, edge rows included, against the reference
    too."""
    from fastlogits.cpu import _maps

    f = getattr(fl, name)
    big = {np.dtype(np.float16): 6e4, np.dtype(np.float64): 1e308}.get(np.dtype(dtype), 3e38)
    for V in (1, 2, 15, 16, 17, 33, 100, 1000):
        x = random_logits(rng, (40, V), dtype)
        x[1] = -np.inf
        x[2, V // 2] = np.inf
        x[3, V // 3] = np.nan
        x[4, :V // 2] = -np.inf
        x[5] = rng.choice([-big, big], V)
        x[6] = 1e4 if dtype == np.float16 else 1e30
        wide = np.zeros((40, 2 * V), dtype)
        wide[:, ::2] = x
        outs = [None, np.float16, np.float32, np.float64]
        calls = [(x, {}), (wide[:, ::2], {}), (x, {"temperature": 0.7}), (x, {"softcap": 30.0}),
                 (x, {"temperature": rng.uniform(0.5, 2, 40), "softcap": 5.0})]
        for logits, kw in calls:
            for out in outs:
                fast = f(logits, dtype=out, threads=2, **kw)
                monkeypatch.setattr(_maps, "ONE_CALL", False)
                slow = f(logits, dtype=out, threads=2, **kw)
                monkeypatch.setattr(_maps, "ONE_CALL", True)
                assert fast.dtype == slow.dtype and fast.tobytes() == slow.tobytes(), (V, kw, out)
        check(name, x[[0, 7, 8]], what=f"V={V}")
