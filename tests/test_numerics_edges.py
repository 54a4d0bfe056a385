"""Edges an audit found, each against an independent reference: the float32 softcap's tanh near 0 (a large
cap turned every logit into 0), caps and temperatures float32 cannot hold, cross-entropy with no target
weight or no classes (PyTorch's NaN), arguments of the wrong type, PyTorch CPU tensors as logits, and the
tie rule of beam_search_step for finished beams."""
import math

import numpy as np
import pytest

import fastlogits as fl
from fastlogits._config import DEFAULT_CHUNK
from tests import reference as ref
from tests.helpers import BF16

F32 = np.float32


def test_float32_softcap_tanh_is_accurate_near_zero(rng):
    """A one-value row's logsumexp is the transformed value itself: c * tanh(x / c), computed by the C
    core's float32 tanh. Against float64 tanh over x / c from 1e-30 to 20 (the old form cancelled to 0
    below 3e-8 and was 16 ulp off near 0.02)."""
    ratios = np.geomspace(1e-30, 20.0, 4000) * rng.choice([-1.0, 1.0], 4000)
    c = F32(rng.uniform(1.0, 100.0))
    x = (ratios * np.float64(c)).astype(F32)
    got = np.array([fl.logsumexp(v[None], softcap=float(c)) for v in x], dtype=np.float64)
    # the kernel divides in float32 and multiplies by c in float32: the same two roundings here
    want = np.float64(c) * np.tanh((x / c).astype(np.float64))
    ulp = np.spacing(np.abs(want).astype(F32)).astype(np.float64)
    err = np.abs(got - want) / ulp
    assert err.max() <= 4.0, (err.max(), x[np.argmax(err)])


def test_float64_softcap_tanh_is_accurate_near_zero(rng):
    """The same for float64 logits, against mpmath: below 0.5 a Chebyshev fit (the old form was 16000 ulp
    off near 1e-5, outside the float64 contract for caps of 1e5)."""
    mpmath = pytest.importorskip("mpmath")
    ratios = np.concatenate([np.geomspace(1e-300, 40.0, 1500), rng.uniform(0.45, 0.6, 500),
                             [5e-324, 2.2250738585072014e-308]]) * rng.choice([-1.0, 1.0], 2002)
    c = float(rng.uniform(1.0, 1e5))
    x = ratios * c
    got = np.array([fl.logsumexp(np.array([v]), softcap=c) for v in x])
    with mpmath.workdps(40):
        want = np.array([float(mpmath.mpf(c) * mpmath.tanh(mpmath.mpf(v / c))) for v in x])
    err = np.abs(got - want) / np.spacing(np.abs(want))
    assert err.max() <= 4.0, (err.max(), x[np.argmax(err)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_huge_softcaps_keep_the_bits_of_small_logits(dtype, rng):
    """c tanh(x / c) for a cap so large that x / c is subnormal or 0: the transformed value is x to a few
    ulp, against mpmath (c times x / c lost x's bits: a cap of 1e38 made 1e-7 into 1.4e-7, and a small
    temperature carried the error into a logsumexp 300 times the tolerance; found by a numerics audit).
    One-value rows (their logsumexp is the value), then the audit's rows with temperatures."""
    mpmath = pytest.importorskip("mpmath")
    big = 3e38 if dtype == np.float32 else 1.7e308
    caps = [big, big / 3, 1e30 if dtype == np.float32 else 1e300]
    x = (np.geomspace(1e-30, 1e3, 300) * rng.choice([-1.0, 1.0], 300)).astype(dtype)
    with mpmath.workdps(60):
        for c in caps:
            got = np.array([fl.logsumexp(v[None], softcap=c) for v in x], np.float64)
            want = np.array([float(mpmath.mpf(c) * mpmath.tanh(mpmath.mpf(float(v)) / mpmath.mpf(c)))
                             for v in x])
            err = np.abs(got - want) / np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
            assert err.max() <= 4.0, (c, err.max(), x[np.argmax(err)])
        eps = 2.0**-23 if dtype == np.float32 else 2.0**-52
        for row, c, t in (([1e-3, 0.0], big, 1e-30), ([1.2345e-4, -1e-4], big, 1e-30),
                          ([1e-7, 0.0], big / 3, 1e-30)):
            v = np.array(row, dtype)
            z = [mpmath.mpf(c) * mpmath.tanh(mpmath.mpf(float(a)) / mpmath.mpf(c)) / mpmath.mpf(t) for a in v]
            want = float(mpmath.log(sum(mpmath.exp(a) for a in z)))
            M = float(max(abs(a) for a in z))
            assert abs(fl.logsumexp(v, softcap=c, temperature=t) - want) <= 16 * eps * (1 + M + abs(want))
    v = np.array([0.0, 1e-7], dtype)
    np.testing.assert_allclose(fl.softmax(v, softcap=1e38, temperature=1e-7), [1 / (1 + math.e),
                                                                               math.e / (1 + math.e)],
                               rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_softcap_keeps_the_sign_of_zero_and_edges(dtype):
    """c * tanh(-0 / c) is -0 (as PyTorch gives); inf and NaN go to +-c and NaN."""
    x = np.array([[-0.0, -1.0, 0.0, np.inf, -np.inf]], dtype=dtype)
    v, i = fl.top_k(x, 5, softcap=5.0)
    got = dict(zip(i[0].tolist(), v[0].astype(np.float64).tolist()))
    assert np.signbit(got[0]) and not np.signbit(got[2])
    assert got[3] == 5.0 and got[4] == -5.0
    assert np.isnan(fl.top_k(np.array([[np.nan, 1.0]], dtype=dtype), 1, softcap=5.0)[0][0, 0])


def test_softcap_turns_infinities_into_finite_logits_as_pytorch_does():
    """The README's rule: with softcap the edge table holds for c * tanh(x / c), so -inf is -c (a masked
    logit gets a probability), a row holding +inf is finite and an all -inf row uniform, as PyTorch's
    c * tanh(x / c) gives. Against that formula in float64."""
    c = 5.0
    x = np.array([[0.0, -np.inf, 1.0], [0.0, np.inf, 1.0], [-np.inf] * 3])
    z = c * np.tanh(x / c)
    lse = np.log(np.exp(z).sum(axis=1))
    np.testing.assert_allclose(fl.logsumexp(x, softcap=c), lse, rtol=1e-14)
    np.testing.assert_allclose(fl.softmax(x, softcap=c), np.exp(z - lse[:, None]), rtol=1e-14)
    np.testing.assert_allclose(fl.softmax(x[2:], softcap=c), np.full((1, 3), 1 / 3), rtol=1e-14)
    np.testing.assert_allclose(fl.cross_entropy(x, np.array([1, 1, 0]), softcap=c, reduction="none"),
                               lse - z[[0, 1, 2], [1, 1, 0]], rtol=1e-14, atol=1e-14)
    tokens = fl.sample(np.repeat(x[:1], 20000, axis=0), softcap=c, seed=3)
    p = np.exp(z[0, 1] - lse[0])                         # 0.0018: drawn about 36 times in 20000
    assert 0 < np.count_nonzero(tokens == 1) < 20000 * p * 3


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_large_softcaps_against_the_reference(dtype, rng):
    """c * tanh(x / c) for caps up to float32's largest: a float64 reference of the same (rounded) input
    values; the float32 compute type holds logits ~12 to about 1e-6 relative, float64 to 1e-12."""
    x = (rng.standard_normal((3, 50)) * 4).astype(dtype)
    M = float(np.abs(x.astype(np.float64)).max())
    eps = 1e-12 if dtype == np.float64 else 16 * 2.0**-23          # README's accuracy contract
    for c in (1e4, 1e8, 1e20, 3e38):
        want = ref.logsumexp(x, softcap=c)
        np.testing.assert_allclose(fl.logsumexp(x, softcap=c), want, rtol=0,
                                   atol=eps * (1 + M + np.abs(want).max()), err_msg=f"softcap={c}")
        got = fl.softmax(x, softcap=c, dtype=np.float32 if dtype != np.float64 else None)
        np.testing.assert_allclose(got, ref.softmax(x, softcap=c), rtol=eps * (1 + M), atol=1e-37,
                                   err_msg=f"softcap={c}")


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
def test_caps_and_temperatures_float32_cannot_hold(dtype):
    x = np.array([[0.0, 1.0, -1.0]], dtype=dtype)
    for kw in ({"softcap": 1e39}, {"softcap": 1e-46}, {"temperature": 1e-50}, {"temperature": 1e39},
               {"temperature": np.array([1e-45])}):
        with pytest.raises(ValueError, match=r"outside float32.s range .* \(float64 logits take it\)"):
            fl.logsumexp(x, **kw)
    with pytest.raises(ValueError, match="outside float32's range"):
        fl.sample(x, temperature=1e-45, seed=0)
    assert fl.sample(x, temperature=0.0, seed=0)[0] == 1          # greedy is still fine
    # float64 logits hold them: c * tanh(x / c) tends to x, and to 0 for a tiny cap
    x64 = x.astype(np.float64)
    assert fl.logsumexp(x64, softcap=1e39)[0] == pytest.approx(math.log(1 + math.e + 1 / math.e), rel=1e-12)
    np.testing.assert_allclose(fl.softmax(x64, softcap=1e-46), [[1 / 3] * 3], rtol=1e-12)
    np.testing.assert_allclose(fl.softmax(x64, temperature=1e-50), [[0.0, 1.0, 0.0]])


def test_cross_entropy_with_no_target_weight_is_nan_as_in_pytorch():
    """F.cross_entropy(x, [0], weight=[0, 1, 1], label_smoothing=0.1) is NaN (its NLL part is 0 / 0): the
    smoothing term must not turn it into inf. Literal PyTorch 2.13 values."""
    x = np.array([[1.0, 2.0, 3.0], [0.5, 0.1, -1.0]])
    w = np.array([0.0, 1.0, 1.0])
    for eps in (0.0, 0.1, 1.0):
        assert np.isnan(fl.cross_entropy(x, np.array([0, 0]), weight=w, label_smoothing=eps))
        assert np.isnan(fl.cross_entropy(x, np.array([0, -100]), weight=w, label_smoothing=eps))
    # one target of weight 1 is enough for a number (PyTorch 2.13, float64)
    got = fl.cross_entropy(x, np.array([0, 1]), weight=w, label_smoothing=0.1)
    assert got == pytest.approx(1.100961046048517, rel=1e-12)


def test_cross_entropy_of_an_empty_vocabulary_when_every_row_is_ignored():
    """V = 0 and every row ignored: no exception (API.md). PyTorch 2.13: with label_smoothing every
    reduction is NaN (eps / C with C = 0); with an empty weight none = [0, 0], sum = 0, mean = NaN."""
    x, y = np.zeros((2, 0)), np.array([-100, -100])
    for reduction in ("none", "sum", "mean"):
        assert np.all(np.isnan(fl.cross_entropy(x, y, label_smoothing=0.1, reduction=reduction)))
    np.testing.assert_array_equal(fl.cross_entropy(x, y, weight=np.zeros(0), reduction="none"), [0.0, 0.0])
    assert fl.cross_entropy(x, y, weight=np.zeros(0), reduction="sum") == 0.0
    assert np.isnan(fl.cross_entropy(x, y, weight=np.zeros(0)))


@pytest.mark.parametrize("kw, error, match", [
    ({"weight": "abc"}, TypeError, "weight must be an array of floats"),
    ({"label_smoothing": None}, TypeError, "label_smoothing must be a float, got None"),
    ({"z_loss": None}, TypeError, "z_loss must be a float, got None"),
    ({"z_loss": "0.1"}, TypeError, "z_loss must be a float"),
    ({"ignore_index": 2**70}, ValueError, "ignore_index must fit in int64"),
    ({"ignore_index": -100.7}, TypeError, "ignore_index must be an integer"),
    ({"ignore_index": True}, TypeError, "ignore_index must be an integer"),
    ({"temperature": None}, TypeError, "temperature must be a float or an array of floats, got None"),
    ({"temperature": "2"}, TypeError, "temperature must be a float"),
    ({"temperature": np.array(["2"])}, TypeError, "temperature must be a float"),
    ({"softcap": True}, TypeError, "softcap must be None or a float"),
    # NumPy's bools as Python's (np.True_ was read as 1.0; found by an API audit)
    ({"softcap": np.True_}, TypeError, "softcap must be None or a float"),
    ({"label_smoothing": np.True_}, TypeError, "label_smoothing must be a float, got np.True_"),
    ({"z_loss": np.False_}, TypeError, "z_loss must be a float, got np.False_"),
    ({"softcap": "3"}, TypeError, "softcap must be None or a float"),
    # an int too large for a float, complex or bool weights: named, not a bare OverflowError or a warning
    ({"temperature": 10**400}, ValueError, "temperature must be .* too large for a float"),
    ({"softcap": 10**400}, ValueError, "softcap must be .* too large for a float"),
    ({"label_smoothing": 10**400}, ValueError, "label_smoothing must be .* too large for a float"),
    ({"z_loss": -10**400}, ValueError, "z_loss must be .* too large for a float"),
    ({"weight": [1.0, 2.0, 10**400]}, TypeError, "weight must be an array of floats"),
    ({"weight": np.array([1, 2, 3], complex)}, TypeError, "weight must be .* got dtype complex128"),
    ({"weight": np.array([True, False, True])}, TypeError, "weight must be .* got dtype bool"),
])
def test_arguments_of_the_wrong_type_are_named(kw, error, match):
    x = np.ones((2, 3), np.float32)
    with pytest.raises(error, match=match):
        fl.cross_entropy(x, np.array([0, 1]), **kw)


def test_uint64_labels_past_int64_name_their_row():
    y = np.array([0, 2**63 + 5], np.uint64)
    with pytest.raises(IndexError, match=r"label 9223372036854775813 at row 1 is out of range for 3"):
        fl.cross_entropy(np.ones((2, 3)), y)


def test_an_out_that_overlaps_itself_is_refused():
    x = np.ones((2, 3), np.float32)
    out = np.lib.stride_tricks.as_strided(np.zeros(3, np.float32), (2, 3), (0, 4))
    with pytest.raises(ValueError, match="out overlaps itself"):
        fl.softmax(x, out=out)


def test_an_out_whose_rows_overlap_is_refused(rng):
    """Rows that interleave onto each other (nonzero strides) were accepted, and written over each other
    (row sums 1.157 and 1.210; found by an audit); an odd layout whose elements are all apart is
    written."""
    x = rng.standard_normal((3, 5)).astype(np.float32)
    buf = np.zeros(20, np.float32)
    rows = np.lib.stride_tricks.as_strided(buf, (3, 5), (8, 4))       # row i starts 2 elements on
    for f in (fl.softmax, fl.log_softmax):
        with pytest.raises(ValueError, match=r"out overlaps itself \(shape \(3, 5\), strides \(8, 4\)"):
            f(x, out=rows)
        with pytest.raises(ValueError, match="out overlaps itself"):
            f(iter([x]), out=rows)                                    # a streamed source's out too
    assert not buf.any()
    # rows 3 elements apart, columns 2: offsets 0, 2, 4, 3, 5, 7, ... never meet
    buf = np.zeros(16, np.float32)
    odd = np.lib.stride_tricks.as_strided(buf, (3, 3), (12, 8))
    assert fl.softmax(x[:, :3], out=odd) is odd
    np.testing.assert_allclose(odd, ref.softmax(x[:, :3]), rtol=2e-6)


def test_overlaps_itself_against_every_address(rng, monkeypatch):
    """The layout test against the byte addresses of every element, over random shapes and strides
    (negative, zero, smaller than an element, interleaved); past the exact limit an odd layout is
    unsettled and refused as maybe overlapping, while a plain one is still settled."""
    from fastlogits.ops import _prep

    for _ in range(3000):
        nd = int(rng.integers(1, 4))
        shape = tuple(int(n) for n in rng.integers(0, 5, nd))
        isz = int(rng.choice([2, 4, 8]))
        strides = tuple(int(st) for st in rng.integers(-3, 4, nd) * int(rng.choice([1, 2, 4])))
        taken = set()
        clash = False
        for idx in np.ndindex(*shape):
            start = sum(i * st for i, st in zip(idx, strides))
            here = set(range(start, start + isz))
            clash |= bool(taken & here)
            taken |= here
        assert _prep.overlaps_itself(shape, strides, isz) == clash, (shape, strides, isz)
    monkeypatch.setattr(_prep, "EXACT_OVERLAP_LIMIT", 8)
    assert _prep.overlaps_itself((3, 3), (12, 8), 4) is None
    assert _prep.overlaps_itself((3, 30), (120, 4), 4) is False
    x = np.ones((3, 3), np.float32)
    out = np.lib.stride_tricks.as_strided(np.zeros(16, np.float32), (3, 3), (12, 8))
    with pytest.raises(ValueError, match=r"out may overlap itself .* \(a C-order one\)"):
        fl.softmax(x, out=out)


def test_empty_outs_are_not_overlaps():
    """An empty out has no values to share a place, though NumPy gives its axes zero strides: softmax of
    V = 0 or of no rows fills it (it was refused as overlapping itself; found by a soak agent)."""
    for shape in [(3, 0), (0, 5), (2, 0, 4), (2, 3, 0)]:
        x = np.zeros(shape, np.float32)
        out = np.empty(shape, np.float32)
        assert 0 in out.strides
        for f in (fl.softmax, fl.log_softmax):
            assert f(x, out=out) is out
            assert f(x).shape == shape


def test_torch_cpu_tensors_are_logits(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 50)).astype(np.float32)
    t = torch.from_numpy(x.copy())
    np.testing.assert_array_equal(fl.logsumexp(t), fl.logsumexp(x))
    np.testing.assert_array_equal(fl.top_k(t[:, ::2], 3)[1], fl.top_k(x[:, ::2], 3)[1])   # a strided view
    tb = t.to(torch.bfloat16)
    np.testing.assert_array_equal(fl.logsumexp(tb), fl.logsumexp(tb.float().numpy().astype(BF16)))
    tg = t.clone().requires_grad_(True)
    np.testing.assert_array_equal(fl.softmax(tg), fl.softmax(x))
    np.testing.assert_array_equal(t.numpy(), x)                    # never written to


def test_torch_negative_views_are_read_as_their_values(rng):
    """A lazily negated PyTorch view (the negative bit: DLPack does not carry it) is read as its values."""
    torch = pytest.importorskip("torch")
    z = torch.from_numpy(rng.standard_normal((3, 6)) + 1j * rng.standard_normal((3, 6))).to(torch.complex64)
    v = z.conj().imag
    assert v.is_neg()
    want = -z.imag.numpy()
    np.testing.assert_array_equal(fl.argmax(v), fl.argmax(want))
    np.testing.assert_allclose(fl.logsumexp(v), fl.logsumexp(want), rtol=1e-6)


def test_torch_conjugated_complex_views_are_refused_as_complex():
    """A conjugated complex tensor (the conjugate bit: DLPack does not carry it either) is complex logits:
    TypeError, as API.md says, not PyTorch's RuntimeError from reading it."""
    torch = pytest.importorskip("torch")
    z = torch.ones(3, dtype=torch.complex64).conj()
    assert z.is_conj()
    with pytest.raises(TypeError, match="complex"):
        fl.logsumexp(z)


def test_beam_scores_are_read_as_other_numeric_arguments(rng):
    """beam_scores given as a bfloat16 or grad-requiring PyTorch tensor, or a bfloat16 NumPy array, are
    their values (as temperatures and weights are read), with float32 scores."""
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((4, 9)).astype(np.float32)
    s = np.array([-0.5, -1.25, -2.0, -0.75], np.float32)        # exact in bfloat16
    want = fl.beam_search_step(x, s, 2)
    for scores in (torch.from_numpy(s).to(torch.bfloat16), torch.from_numpy(s).requires_grad_(True),
                   s.astype(BF16)):
        got = fl.beam_search_step(x, scores, 2)
        assert got[0].dtype == np.float32
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_a_zero_d_seed_array_is_one_seed():
    x = np.random.default_rng(1).standard_normal((4, 30))
    np.testing.assert_array_equal(fl.sample(x, seed=np.array(7)), fl.sample(x, seed=7))
    np.testing.assert_array_equal(fl.sample(x, seed=np.uint64(7)), fl.sample(x, seed=7))


def test_beam_search_ties_of_finished_beams_go_to_the_lowest_tokens():
    """All continuations of a finished beam (score -inf) tie at -inf; the documented tie rule (lower
    parent, then lower token) picks its lowest token ids, whatever their logits."""
    x = np.array([[0.0, 1, 2, 3, 4, 5]] * 2)
    s, p, t = fl.beam_search_step(x, np.array([-np.inf, -np.inf]), 2)
    assert np.all(s == -np.inf) and p.tolist() == [[0, 0, 0, 0]] and t.tolist() == [[0, 1, 2, 3]]
    # a live beam's continuations come first; the dead beam's fill in by the same rule
    x = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]))
    s, p, t = fl.beam_search_step(x, np.array([0.0, -np.inf]), 2)
    assert p.tolist() == [[0, 0, 0, 0]] and t.tolist() == [[3, 2, 1, 0]]
    x = np.log(np.array([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.9, 0.1]]))
    s, p, t = fl.beam_search_step(x, np.array([-np.inf, -np.inf, 0.0, -1.0]), 2)
    assert p.tolist() == [[0, 0, 1, 1], [0, 1, 0, 1]] and t.tolist() == [[0, 1, 0, 1], [0, 0, 1, 1]]


def test_entropy_of_float64_chunks_whose_maxima_are_past_the_double_range_apart():
    """Merging the entropy states of chunks with maxima 1e308 and -1e308: their gap overflows to -inf and
    the smaller state's weight exp(gap) is 0, but its t term s * gap was inf * 0 = NaN. The merge now skips
    a vanished state, as the GPU's ent_merge does (found by two soak agents). Whatever the chunking, the
    threads or the accumulator's order, the entropy is that of the row without its vanishing values."""
    from fastlogits.stream.accumulators import Entropy

    n = 5000
    z = np.concatenate([np.full(n, -1e308), np.full(n, 1e308)])
    want = np.log(n)                         # n equal maxima; the others weigh exp(-2e308) = 0
    for row in (z, z[::-1]):
        for chunk in (1, 7, n, None):
            for threads in (1, 4):
                got = fl.entropy(row, chunk_size=chunk, threads=threads)
                np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"chunk {chunk}, {threads} threads")
    x = np.array([1e308, -1e308])           # entropy 0 (within the exp floor's 2e-305 in one chunk)
    for chunk in (1, 2):
        np.testing.assert_allclose(fl.entropy(x, chunk_size=chunk), 0.0, rtol=0, atol=1e-300)
    for order in ((0, 1), (1, 0)):
        acc = Entropy(1)
        for j in order:
            acc.update(x[None, j:j + 1], j)
        np.testing.assert_allclose(acc.result(), [0.0], rtol=0, atol=1e-300)
    got = fl.entropy(np.array([1e300, -1e300, 1e300]), temperature=1e-8, chunk_size=1)
    np.testing.assert_allclose(got, np.log(2), rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32], ids=lambda d: np.dtype(d).name)
def test_a_max_found_in_a_later_chunk_keeps_the_largest_term_one(dtype, rng):
    """A chunk that raised a row's running max was summed in one pass around the old max, so the new max's
    term was exp(d) e^-d, 1 within float's exp error: log s fell below 0 by a few 1e-8, enough for a
    logsumexp below the row's max, log-probabilities above 0 and a negative cross-entropy where the loss
    is tiny ([0.1, 0 x 4095, 25.18] labelled 4096: -3.2e-7, the loss 4.75e-8; found by a numerics audit).
    Rows like a confident LM's, the top token past the first chunk: the loss >= 0 (and within the accuracy
    contract), logsumexp >= the max and log-probabilities <= 0, whatever the chunk size, through every
    function of the fold. (The loss is not relatively accurate where it is below float's epsilon: the
    float lane that holds the max adds its other terms to 1; README's contract is absolute.)"""
    from fastlogits.numba import cross_entropy_row, logsumexp_row
    from tests import tolerances as tols

    V, rows = 3 * 4096 + 5, 48
    x = (rng.standard_normal((rows, V)) * 2).astype(dtype)
    top = rng.integers(4096, V, rows)
    x[np.arange(rows), top] = rng.uniform(10, 30, rows).astype(dtype)
    x[0] = 0
    x[0, 0], x[0, 4096], top[0] = 0.1, 25.18, 4096        # the audit's row
    want = ref.cross_entropy(x, top, reduction="none")
    for chunk in (None, 1024, 4096, 5000):
        got = fl.cross_entropy(x, top, reduction="none", chunk_size=chunk)
        assert (got >= 0).all(), f"chunk {chunk}: {got.min()}"
        tols.assert_close(got, want, tols.log_tol(dtype, want, ref.row_scale(x)), what=f"chunk {chunk}")
        lse = fl.logsumexp(x, chunk_size=chunk)
        assert (lse.astype(np.float64) >= x.astype(np.float64).max(axis=1)).all()
        lp, idx = fl.top_k_logprobs(x, 1, chunk_size=chunk)
        np.testing.assert_array_equal(idx[:, 0], top)
        assert (lp <= 0).all() and (fl.log_softmax(x, chunk_size=chunk) <= 0).all()
    if dtype == np.float32:       # the C functions the numba entry points call fold alike
        assert cross_entropy_row(x[0], 4096) >= 0 and logsumexp_row(x[0]) >= x[0, 4096]
        assert abs(cross_entropy_row(x[0], 4096) - want[0]) <= tols.log_tol(dtype, want[0], x[0, 4096])


@pytest.mark.parametrize("chunk", [2, 64, None])
def test_a_float64_entropy_of_many_chunks_keeps_its_rounding(chunk):
    """The entropy fold added each chunk's sums (s and t) to the row's plainly, the same rounding error
    for every chunk where their sums repeat: 2^20 float64 logits of -7 after a 0 lost 37000 ulp of entropy
    in chunks of 2 (3x the accuracy contract), 1500 in chunks of 64, 35 at the default (an accuracy audit;
    PyTorch 13000). The errors are gathered exactly (fl__ent_fold) and added at the row's end: within an
    ulp of mpmath's, on one thread and two, in the one-pass stats (the CLI's) and the accumulator too."""
    mpmath = pytest.importorskip("mpmath")
    from fastlogits.stream import Entropy
    from fastlogits.stream.run import stats

    V = 1 << 20
    x = np.full(V, -7.0)
    x[0] = 0.0
    with mpmath.workdps(40):
        e = (V - 1) * mpmath.exp(-7)
        want = mpmath.log(1 + e) + 7 * e / (1 + e)          # log s - t / s, t = sum e^(x - m) (x - m)
    got = {f"entropy, {t} threads": fl.entropy(x, chunk_size=chunk, threads=t)[()] for t in (1, 2)}
    got["stats"] = stats(x[None], chunk_size=chunk, threads=1)["entropy"][0]
    got["Entropy"] = Entropy(1, chunk_size=chunk, threads=1).update(x[None]).result()[0]
    # every other chunk all -inf (a masked vocabulary): such a chunk adds nothing, and handed the errors
    # to the sums before (9127 ulp in chunks of 2, a review)
    c = chunk or DEFAULT_CHUNK
    masked = np.stack([x.reshape(-1, c), np.full((V // c, c), -np.inf)], 1).reshape(-1)
    got["entropy, masked chunks"] = fl.entropy(masked, chunk_size=chunk, threads=1)[()]
    # every chunk holding the max (0), the rest -7: chunks whose max ties the row's keep their errors too
    tied = x.copy()
    tied[::c] = 0.0
    k = V // c
    with mpmath.workdps(40):
        e = (V - k) * mpmath.exp(-7)
        want_tied = mpmath.log(k + e) + 7 * e / (k + e)
    v = fl.entropy(tied, chunk_size=chunk, threads=1)[()]
    with mpmath.workdps(40):
        # (within a chunk of 4096 the lanes' sums lose 3 ulp here)
        assert float(abs(mpmath.mpf(float(v)) - want_tied) / np.spacing(float(want_tied))) <= 4
    for name, v in got.items():
        with mpmath.workdps(40):
            err = float(abs(mpmath.mpf(float(v)) - want) / np.spacing(float(want)))
        assert err <= 1, (name, err)


@pytest.mark.parametrize("weight", [None, 0.5])
@pytest.mark.parametrize("chunk", [64, None])
def test_a_float64_label_smoothing_sum_of_many_chunks_keeps_its_rounding(chunk, weight):
    """Label smoothing's distance sum, sum w (m - x), added chunk by chunk with its rounding errors kept
    (fl__dist_fold, fl__dist_done): a float64 row of 2^20 logits of -0.1 after a 0 is within a few ulp of
    mpmath's loss, with class weights too (a plain sum of its chunks' sums lost thousands at chunks of 64:
    a mutation audit)."""
    mpmath = pytest.importorskip("mpmath")
    V, eps = 1 << 20, 0.5
    x = np.full(V, -0.1)
    x[0] = 0.0
    with mpmath.workdps(40):
        a = mpmath.mpf(0.1)                                   # m - x, exactly (the double nearest 0.1)
        lse = mpmath.log(1 + (V - 1) * mpmath.exp(-a))
        want = ((1 - eps) * (lse + a) + eps / V * (V * lse + (V - 1) * a)) * (weight or 1)
    got = fl.cross_entropy(x[None], np.array([3]), label_smoothing=eps, reduction="none", chunk_size=chunk,
                           threads=1, weight=None if weight is None else np.full(V, weight))[0]
    with mpmath.workdps(40):
        err = float(abs(mpmath.mpf(float(got)) - want) / np.spacing(float(want)))
    assert err <= 4, err


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk", [None, 1 << 20])
def test_a_float64_label_smoothing_sum_within_a_chunk_keeps_its_rounding(chunk, weighted, rng):
    """Within a chunk, label smoothing's distances were added to their lane's total one at a time: where a
    lane's large distances come first, each smaller one after them rounds to the large total's ulp. An
    accuracy audit's float64 row of 4097 values from -726 to 823 lost 67 ulp of the loss at smoothing
    0.999, where PyTorch's was 0.2. Sorted rows of such values (far from the max, nearer, and a few ulp
    below it) lost 18-22; fl__dist sums blocks of 128 values and adds them by TwoSum: within 4 ulp of
    mpmath's (with class weights of 1, the weighted loop)."""
    mpmath = pytest.importorskip("mpmath")
    M, V, eps = 823.1684798381834, 4097, 0.999
    levels = np.array([M - 1549.0, M - 31.92] + [M - k * np.spacing(M) for k in range(1, 5)])
    for _ in range(3):
        x = levels[rng.choice(6, V, p=[0.52, 0.14, 0.085, 0.085, 0.085, 0.085])]
        x[rng.integers(V)] = M
        x.sort()
        y = int(rng.integers(V))
        with mpmath.workdps(40):
            xs = [mpmath.mpf(float(v)) for v in x]
            lse = M + mpmath.log(mpmath.fsum(mpmath.exp(v - M) for v in xs))
            want = (1 - eps) * (lse - xs[y]) + mpmath.mpf(eps) / V * mpmath.fsum(lse - v for v in xs)
        got = fl.cross_entropy(x[None], np.array([y]), label_smoothing=eps, reduction="none", threads=1,
                               chunk_size=chunk, weight=np.ones(V) if weighted else None)[0]
        with mpmath.workdps(40):
            err = float(abs(mpmath.mpf(float(got)) - want) / np.spacing(float(want)))
        assert err <= 4, err   # (2.5 at most in 60 rows; 17-22 before)


@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_keeps_the_block_sums_rounding_errors(weighted):
    """fl__dist adds its blocks of 128 distances to the lane totals by TwoSum and adds the errors at the
    end: a float64 row whose lane 0 holds a distance of 2^53 and then 1 in each later block (the rest at
    the max) has the distance sum 2^53 + 63, where dropping the errors gives 2^53 (32 ulp of the loss;
    a mutation audit)."""
    mpmath = pytest.importorskip("mpmath")
    V, eps = 128 * 64, 0.5
    x = np.zeros(V)
    x[0] = -2.0 ** 53
    x[128::128] = -1.0
    got = fl.cross_entropy(x[None], np.array([1]), label_smoothing=eps, reduction="none", threads=1,
                           chunk_size=1 << 20, weight=np.ones(V) if weighted else None)[0]
    with mpmath.workdps(60):
        xs = [mpmath.mpf(float(v)) for v in x]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs))
        want = (1 - mpmath.mpf(eps)) * (lse - xs[1]) + mpmath.mpf(eps) / V * mpmath.fsum(lse - v for v in xs)
        assert float(abs(mpmath.mpf(float(got)) - want) / np.spacing(float(want))) <= 1


def test_label_smoothing_keeps_the_weight_sums_rounding_errors():
    """A chunk that raises the row's max shifts the distances before it by W (M - m), W their weights'
    sum, which fl__dist sums in blocks by TwoSum too: weights 2^53, then 1 in each later block of the
    first chunk, the max raised by 40 in the second; W = 2^53 + 63, not 2^53 (40 ulp of the loss)."""
    mpmath = pytest.importorskip("mpmath")
    C, eps = 8192, 0.5
    V = 2 * C
    x = np.zeros(V)
    x[C] = 40.0
    w = np.zeros(V)
    w[0] = 2.0 ** 53
    w[128:C:128] = 1.0
    got = fl.cross_entropy(x[None], np.array([1]), label_smoothing=eps, weight=w, reduction="none",
                           threads=1, chunk_size=C)[0]
    with mpmath.workdps(60):
        xs = [mpmath.mpf(float(v)) for v in x]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs))
        want = mpmath.mpf(eps) / V * mpmath.fsum(mpmath.mpf(float(w[c])) * (lse - xs[c])
                                                 for c in range(V) if w[c])
        assert float(abs(mpmath.mpf(float(got)) - want) / np.spacing(float(want))) <= 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_infinite_class_weight_in_the_lanes_before_a_new_max(dtype, rng):
    """An infinite class weight where the lanes sum (not a short row's tail), a later chunk raising the max:
    the weight sum W is inf, its TwoSum errors NaN and left out, and the loss inf as in PyTorch (NaN when
    the errors were added; a mutation audit)."""
    V = 1024
    x = rng.standard_normal((1, V)).astype(dtype)
    x[0, 700] = 10
    w = np.ones(V, dtype)
    w[5] = np.inf
    got = fl.cross_entropy(x, np.array([3]), weight=w, label_smoothing=0.1, reduction="none", threads=1,
                           chunk_size=256)
    assert np.isposinf(np.asarray(got, np.float64)).all(), got


@pytest.mark.parametrize("chunk", [64, 1000, None, 1 << 20])
def test_a_float64_sum_of_many_chunks_keeps_its_rounding(chunk):
    """Each chunk that leaves a row's max adds its sum of exp to the running one with a rounding error, the
    same error for every chunk where the chunks' sums repeat: a float64 row of zeros after a max of 20
    lost 100 ulp of logsumexp in 2^14 chunks of 64 (17 in a row of 4e6 at the default chunk; an accuracy
    audit; PyTorch 1.5). The errors are gathered exactly (TwoSum) and added at the end: the results are
    within an ulp of mpmath's (m + log s rounds twice), for every function of the fold (and the C API's
    fl_lse_update, through the Numba entry point). Their sums within a chunk flush every 16 vectors, so
    a chunk of the whole row (2^20) loses 12 ulp to them: that chunk tests softmax alone, whose sum
    added every term to its lane's total (below)."""
    mpmath = pytest.importorskip("mpmath")
    from fastlogits.numba import cross_entropy_row, logsumexp_row

    V = 1 << 20
    x = np.zeros(V)
    x[0] = 20.0
    with mpmath.workdps(40):
        lse = mpmath.mpf(20) + mpmath.log(1 + (V - 1) * mpmath.exp(-20))
    got = {} if chunk == 1 << 20 else {
        "logsumexp": fl.logsumexp(x, chunk_size=chunk, threads=1),
        "cross_entropy": fl.cross_entropy(x[None], np.array([3]), reduction="none", chunk_size=chunk,
                                          threads=1)[0],
        "top_k_logprobs": -fl.top_k_logprobs(x, 2, chunk_size=chunk, threads=1)[0][1],
        "log_softmax": -fl.log_softmax(x, chunk_size=chunk, threads=1)[1]}
    if chunk is None:
        got.update(logsumexp_row=logsumexp_row(x), cross_entropy_row=cross_entropy_row(x, 3))
    for name, v in got.items():        # (top-k's and log-softmax's -log p of a zero is lse too)
        with mpmath.workdps(40):
            err = float(abs(mpmath.mpf(float(v)) - lse) / np.spacing(float(lse)))
        assert err <= 1, (name, err)
    # softmax's sum, of its stored terms: chunk sums kept as the fold's, and within a chunk summed in
    # blocks from 0 (fl__sum; the lane holding the max's term 1 lost the small terms' rounding, 8e4 ulp
    # of p in one chunk of the row): p within a few ulp (it was off by 459 to 81936 at these chunks)
    p = fl.softmax(x, chunk_size=chunk, threads=1)
    with mpmath.workdps(40):
        for j, want in ((0, 1 / mpmath.exp(lse - 20)), (1, 1 / mpmath.exp(lse))):
            err = float(abs(mpmath.mpf(float(p[j])) - want) / np.spacing(float(want)))
            assert err <= 16, (j, err)
