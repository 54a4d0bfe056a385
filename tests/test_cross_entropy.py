"""cross_entropy: PyTorch's semantics in full (weights, ignore_index, label smoothing and their interaction,
reductions), z-loss, the literal vectors of REFERENCES.md, and PyTorch itself where it is installed."""

import math

import numpy as np
import pytest

import fastlogits as fl
from tests import reference as ref
from tests import tolerances as tols
from tests.helpers import BF16, DTYPE_IDS, DTYPES, check, random_labels, random_logits

inf, nan = np.inf, np.nan

# REFERENCES.md's vectors; every value below was computed with PyTorch 2.13's F.cross_entropy in float64.
X = np.array([[2, 1, 0.1], [0.5, 2.5, 0.3], [1.2, 0.2, 3.1], [0, 0, 0]], dtype=np.float64)
Y = np.array([0, 1, 2, -100])
W = np.array([1, 2, 0.5])
VECTORS = {
    # (weight?, smoothing): {reduction: value}
    "plain": (
        False,
        0.0,
        {
            "none": [0.41703001627783354, 0.22004952302053787, 0.18614078697315786, 0.0],
            "mean": 0.2744067754238431,
            "sum": 0.8232203262715293,
        },
    ),
    "weight": (
        True,
        0.0,
        {
            "none": [0.41703001627783354, 0.44009904604107575, 0.09307039348657893, 0.0],
            "mean": 0.27148555880156805,
            "sum": 0.9501994558054883,
        },
    ),
    "smoothing": (
        False,
        0.1,
        {
            "none": [0.5136966829445002, 0.3600495230205379, 0.34614078697315787, 0.0],
            "mean": 0.40662899764606536,
            "sum": 1.2198869929381961,
        },
    ),
    "weight_smoothing": (
        True,
        0.1,
        {
            "none": [0.5223138498824641, 0.5250949191226976, 0.3621464459514561, 0.0],
            "mean": 0.4027300614161765,
            "sum": 1.409555214956618,
        },
    ),
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", list(VECTORS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_literal_vectors(case, reduction, dtype):
    use_w, eps, values = VECTORS[case]
    want = np.array(values[reduction])
    kw = dict(reduction=reduction, label_smoothing=eps)
    if use_w:
        kw["weight"] = W
    for chunk_size in (None, 1, 2):
        got = np.asarray(fl.cross_entropy(X.astype(dtype), Y, chunk_size=chunk_size, **kw))
        assert got.dtype == dtype
        assert got.shape == want.shape
        rtol = 1e-12 if dtype == np.float64 else 64 * tols.EPS32
        np.testing.assert_allclose(
            got, want, rtol=rtol, atol=rtol, err_msg=f"{case} {reduction} {chunk_size}"
        )
    # the reference reproduces PyTorch's values
    np.testing.assert_allclose(ref.cross_entropy(X, Y, **kw), want, rtol=1e-13, atol=1e-15)


def test_large_logit_literal():
    """REFERENCES.md: ce([[1e4, 0, 7e-7]], 2) = 9999.9999993 (float64)."""
    x = np.array([[1e4, 0.0, 7e-7]])
    got = float(fl.cross_entropy(x, np.array([2])))
    assert abs(got - 9999.9999993) <= 1e-12 * (1 + 1e4 + 1e4)
    assert float(ref.cross_entropy(x, np.array([2]))) == pytest.approx(9999.9999993, rel=1e-15)


def test_all_ignored():
    x = np.array([[1.0, 2.0, 3.0], [nan, 0.0, inf]], dtype=np.float32)
    y = np.array([-100, -100])
    for kw in ({}, dict(weight=np.array([1.0, 2.0, 3.0])), dict(label_smoothing=0.2), dict(z_loss=1e-3)):
        assert np.isnan(fl.cross_entropy(x, y, reduction="mean", **kw))
        assert float(fl.cross_entropy(x, y, reduction="sum", **kw)) == 0.0
        np.testing.assert_array_equal(np.asarray(fl.cross_entropy(x, y, reduction="none", **kw)), [0.0, 0.0])


def test_ignored_rows_do_not_leak_nan_or_inf():
    """An ignored row contributes 0 whatever it holds (like PyTorch), a counted NaN row makes the mean NaN."""
    x = np.array([[0.0, -inf, 1.0], [nan, 0.0, 1.0], [inf, 0.0, 0.0], [1.0, 2.0, 3.0]])
    y = np.array([0, -100, -100, 2])
    for eps in (0.0, 0.1):
        got = np.asarray(fl.cross_entropy(x, y, reduction="none", label_smoothing=eps))
        assert got[1] == 0 and got[2] == 0
        assert np.isfinite(got[3])
    # counted NaN / +inf rows
    assert np.isnan(fl.cross_entropy(x[1:2], np.array([1])))
    assert np.isnan(fl.cross_entropy(x[2:3], np.array([1])))
    assert np.isnan(fl.cross_entropy(x[1:], np.array([1, -100, 2]), reduction="sum"))


def test_neg_inf_logits():
    x = np.array([[0.0, -inf, 1.0]])
    assert float(fl.cross_entropy(x, np.array([1]))) == inf
    assert float(fl.cross_entropy(x, np.array([0]))) == pytest.approx(math.log1p(math.e), rel=1e-13)
    # with smoothing the -inf class enters the smoothing term: inf (like PyTorch)
    assert float(fl.cross_entropy(x, np.array([0]), label_smoothing=0.1)) == inf
    # a row of all -inf is NaN
    assert np.isnan(fl.cross_entropy(np.full((1, 3), -inf), np.array([1])))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_a_float32_loss_past_its_range_is_inf_quietly(reduction, recwarn):
    """A loss beyond float32's range (logits 3e38 and -3e38, the label on the second: 6e38) is inf, like
    PyTorch's, with no RuntimeWarning from the cast, in memory and streamed."""
    x = np.array([[3e38, -3e38], [0.0, 0.0]], np.float32)
    y = np.array([1, -100])
    for src in (x, iter([x[:1], x[1:]])):
        got = fl.cross_entropy(src, y, reduction=reduction)
        assert np.asarray(got).dtype == np.float32
        assert np.asarray(got).ravel()[0] == inf
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w) for w in recwarn]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_mean_divides_by_the_target_weights_as_pytorch_does(smoothing, recwarn):
    """"mean" divides its NLL part and its smoothing part each by the sum of the target weights, with
    IEEE's rules, as PyTorch does: class weights of both signs summing to 0 give ±inf, or NaN where the
    two parts' infinities differ in sign; zero-weight targets give 0 / 0 = NaN; in memory, streamed and
    from the accumulator, quietly. Literal torch 2.13 values (F.cross_entropy, float32)."""
    w = np.array([1.0, -1.0, 0.0], np.float32)
    cases = (([[0, 1, 2], [0, 2, 3]], [1, 0], inf, inf),     # both parts +inf
             ([[0, 0, 5], [0, 1, 0]], [1, 0], -inf, nan),    # NLL part -inf, smoothing part +inf
             ([[0, 1, 2], [2, 1, 0]], [2, 2], nan, nan))     # zero-weight targets: 0 / 0
    for x, y, *wants in cases:
        x, y, want = np.array(x, np.float32), np.array(y), wants[smoothing > 0]
        for src in (x, iter([x[:1], x[1:]])):
            np.testing.assert_equal(fl.cross_entropy(src, y, weight=w, label_smoothing=smoothing), want)
        acc = fl.stream.CrossEntropy(y, weight=w, label_smoothing=smoothing)
        acc.update(x, 0)
        np.testing.assert_equal(acc.result(), want)
    assert not [m for m in recwarn if issubclass(m.category, RuntimeWarning)], [str(m) for m in recwarn]


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_an_infinite_class_weight_with_smoothing_is_infinite_as_in_pytorch(chunk_size, recwarn):
    """Label smoothing adds w (lse - x) for every class: an infinite weight on the row's max class gives
    inf (PyTorch), not inf * 0 = NaN from the distance to the max; weights inf and -inf give NaN. In
    memory, streamed (column blocks: the max reached in a later chunk) and from the accumulator. Literal
    torch 2.13 values (F.cross_entropy, float32, label_smoothing=0.1)."""
    x = np.array([[2.0, 1.0, 0.5], [0.1, 3.0, -1.0]], np.float32)
    y = np.array([1, 0])
    cases = (([inf, 1, 1], [inf, inf], inf, nan),      # row 0's max has weight inf
             ([1, inf, 1], [inf, inf], inf, nan),      # row 1's max has weight inf
             ([1, 1, -inf], [-inf, -inf], -inf, -inf),
             ([inf, 1, -inf], [nan, nan], nan, nan))
    for w, *wants in cases:
        w = np.array(w, np.float32)
        for reduction, want in zip(("none", "sum", "mean"), wants):
            for src in (x, iter([x[:1], x[1:]])):
                got = fl.cross_entropy(src, y, weight=w, label_smoothing=0.1, reduction=reduction,
                                       chunk_size=chunk_size)
                np.testing.assert_equal(np.asarray(got), np.float32(want), err_msg=f"{w} {reduction}")
        acc = fl.stream.CrossEntropy(y, weight=w, label_smoothing=0.1, reduction="none")
        for c in range(3):
            acc.update(x[:, c:c + 1], c)
        np.testing.assert_equal(acc.result(), np.float32(wants[0]), err_msg=f"{w} accumulator")
    assert not [m for m in recwarn if issubclass(m.category, RuntimeWarning)], [str(m) for m in recwarn]


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_an_infinite_class_weight_where_one_class_holds_all_the_mass(chunk_size, recwarn):
    """Rows whose max holds probability 1 (log s = 0: the other logits -inf or 200 below): a class of p = 0
    and infinite weight adds inf, as in PyTorch, not NaN from W log s = inf * 0; a NaN weight gives NaN
    wherever it stands, the p = 1 class included (NaN * 0), as in PyTorch. Literal torch 2.13 values
    (F.cross_entropy, float32, label_smoothing=0.1, reduction="none"), but for the one documented
    difference: a class of p = 1 adds 0 whatever its weight (PyTorch: NaN for an infinite one, inf * 0;
    row 3's 240.96666 is PyTorch's loss with that weight 0)."""
    x = np.array([[0.5, -inf, -inf], [0.5, -200.0, 3.0], [1.0, -inf, -200.0], [1.0, -250.0, -200.0]],
                 np.float32)
    y = np.array([0, 2, 1, 1])
    cases = (([1, inf, 1], [inf, inf, inf, inf]),
             ([1, 1, inf], [inf, inf, inf, inf]),
             ([inf, 1, 1], [nan, inf, inf, 240.96666]),  # rows 2, 3: PyTorch nan (inf weight, p = 1)
             ([1, -inf, 1], [nan, -inf, -inf, -inf]),   # row 0: -inf + inf
             ([1, 1, -inf], [nan, -inf, nan, -inf]),    # row 2: inf + -inf
             ([nan, 1, 1], [nan, nan, nan, nan]))       # a NaN weight anywhere
    for w, want in cases:
        w = np.array(w, np.float32)
        for src in (x, iter([x[:1], x[1:]])):
            got = fl.cross_entropy(src, y, weight=w, label_smoothing=0.1, reduction="none",
                                   chunk_size=chunk_size)
            np.testing.assert_equal(got, np.float32(want), err_msg=f"{w}")
        acc = fl.stream.CrossEntropy(y, weight=w, label_smoothing=0.1, reduction="none")
        for c in (2, 0, 1):
            acc.update(x[:, c:c + 1], c)
        np.testing.assert_equal(acc.result().astype(np.float32), np.float32(want), err_msg=f"{w} accumulator")
    assert not [m for m in recwarn if issubclass(m.category, RuntimeWarning)], [str(m) for m in recwarn]


def test_finite_class_weights_whose_sum_overflows(recwarn):
    """Finite float64 weights past float64's range in sum, on a row whose max holds all the mass: the max's
    class adds w * 0 = 0, as in PyTorch (torch 2.13: 3.7333e+307), not NaN from an overflowed W times
    log s = 0; quietly (no overflow warning), in memory and from the accumulator."""
    x = np.array([[0.0, -40.0, -41.0]])
    y = np.array([1])
    w = np.array([1.79e308, 1e306, 1.0])
    got = fl.cross_entropy(x, y, weight=w, label_smoothing=0.1, reduction="none")
    np.testing.assert_allclose(got, [3.7333333333333e307], rtol=1e-12)
    acc = fl.stream.CrossEntropy(y, weight=w, label_smoothing=0.1, reduction="none")
    acc.update(x[:, 1:], 1)
    acc.update(x[:, :1], 0)
    np.testing.assert_allclose(acc.result(), got, rtol=1e-15)
    assert not [m for m in recwarn if issubclass(m.category, RuntimeWarning)], [str(m) for m in recwarn]


@pytest.mark.parametrize("source", ["array", "blocks of a row"])
def test_rows_are_summed_with_compensation(source):
    """"mean" and "sum" add the rows' losses with compensation, in memory and streamed (block sums too):
    one loss of 1e16 does not swallow a thousand losses of log 2, as a running sum (or NumPy's pairwise
    one) would; and an inf or a NaN among finite losses stays inf or NaN (the compensation of an inf sum
    is NaN and must not leak)."""
    n = 1000
    x = np.zeros((n + 1, 2))
    x[0, 1] = -1e16                    # row 0: label 1 has loss 1e16 (+ log1p(e^-1e16) = 0)
    y = np.zeros(n + 1, np.int64)
    y[0] = 1

    def run(x, y, **kw):
        src = x if source == "array" else (x[i:i + 1] for i in range(len(x)))
        return float(fl.cross_entropy(src, y, **kw))

    exact = math.fsum([1e16] + [math.log(2.0)] * n)
    assert run(x, y, reduction="sum") == exact
    assert run(x, y, reduction="mean") == exact / (n + 1)
    for bad, want in ((-inf, inf), (nan, nan)):
        xb = x.copy()
        xb[n // 2, 0] = bad            # its label's logit: loss inf (-inf logit) or NaN
        for reduction in ("sum", "mean"):
            np.testing.assert_equal(run(xb, y, reduction=reduction), want)


def test_custom_ignore_index(rng):
    x = random_logits(rng, (10, 20), np.float64)
    y = rng.integers(0, 20, size=10)
    y[[2, 5]] = 3
    for ignore in (3, -1):
        yy = y.copy()
        if ignore == -1:
            yy[[2, 5]] = -1
        for reduction in ("none", "mean", "sum"):
            check("cross_entropy", x, labels=yy, ignore_index=ignore, reduction=reduction)
        got = np.asarray(fl.cross_entropy(x, yy, ignore_index=ignore, reduction="none"))
        assert got[2] == 0 and got[5] == 0
    # with ignore_index=3, -100 is an ordinary (out-of-range) label
    y[0] = -100
    with pytest.raises((ValueError, IndexError)):
        fl.cross_entropy(x, y, ignore_index=3)


def test_zero_weights():
    x = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    w = np.array([0.0, 1.0, 1.0])
    # only the second row's target has weight: mean = its loss... which is 0 * nll; sum of weights 0 -> NaN
    assert np.isnan(fl.cross_entropy(x, np.array([0, 0]), weight=w))
    got = float(fl.cross_entropy(x, np.array([0, 1]), weight=w))
    want = float(ref.cross_entropy(x, np.array([0, 1]), weight=w))
    assert got == pytest.approx(want, rel=1e-12)


ZS = [1e-4, 0.5]


@pytest.mark.parametrize("z", ZS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, BF16], ids=["float64", "float32", "bfloat16"])
def test_z_loss(dtype, reduction, z, rng):
    x = random_logits(rng, (12, 300), dtype, scale=4.0)
    y = random_labels(rng, (12,), 300)
    check("cross_entropy", x, labels=y, z_loss=z, reduction=reduction, chunk_size=64)
    check("cross_entropy", x, labels=y, z_loss=z, reduction=reduction, label_smoothing=0.1)


def test_z_loss_literal():
    x = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    y = np.array([0, -100, 1])
    z = 1e-2
    l3 = math.log(3.0)
    row0 = l3 + z * l3 * l3
    row2 = l3 + z * (5 + l3) ** 2
    np.testing.assert_allclose(
        np.asarray(fl.cross_entropy(x, y, z_loss=z, reduction="none")), [row0, 0.0, row2], rtol=1e-13
    )
    assert float(fl.cross_entropy(x, y, z_loss=z, reduction="sum")) == pytest.approx(row0 + row2, rel=1e-13)
    assert float(fl.cross_entropy(x, y, z_loss=z)) == pytest.approx((row0 + row2) / 2, rel=1e-13)


@pytest.mark.parametrize("z", [0.0, 1e-3])
def test_z_loss_with_weights_per_row(z, rng):
    """The z-loss term is added to each counted row's loss, unweighted (API.md: "adds z_loss * lse² per
    counted row"; Liger-Kernel's lse_square_scale is unweighted too); "mean" averages it over the counted
    rows."""
    x = random_logits(rng, (8, 50), np.float64)
    y = random_labels(rng, (8,), 50)
    w = rng.uniform(0.1, 3.0, size=50)
    for reduction in ("none", "sum", "mean"):
        check("cross_entropy", x, labels=y, weight=w, z_loss=z, reduction=reduction, label_smoothing=0.05)


@pytest.mark.parametrize("lead", [(), (7,), (2, 3), (2, 1, 4)], ids=["1d", "7", "2x3", "2x1x4"])
def test_label_shapes(lead, rng):
    x = random_logits(rng, lead + (33,), np.float32)
    y = rng.integers(0, 33, size=lead)
    for reduction in ("none", "mean", "sum"):
        got = check("cross_entropy", x, labels=y, reduction=reduction)
        assert np.asarray(got).shape == (lead if reduction == "none" else ())


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.int16, np.uint8])
def test_label_dtypes(label_dtype, rng):
    x = random_logits(rng, (6, 40), np.float32)
    y = rng.integers(0, 40, size=6).astype(label_dtype)
    check("cross_entropy", x, labels=y, reduction="none")


def test_labels_as_list(rng):
    x = random_logits(rng, (3, 10), np.float64)
    got = fl.cross_entropy(x, [1, 2, 3], reduction="none")
    np.testing.assert_allclose(
        np.asarray(got), ref.cross_entropy(x, np.array([1, 2, 3]), reduction="none"), rtol=1e-12
    )


def test_temperature_per_row_and_softcap(rng):
    x = random_logits(rng, (6, 100), np.float32, scale=10.0)
    y = random_labels(rng, (6,), 100)
    t = rng.uniform(0.5, 3.0, size=6)
    for reduction in ("none", "mean"):
        check("cross_entropy", x, labels=y, temperature=t, reduction=reduction, label_smoothing=0.1)
        check(
            "cross_entropy",
            x,
            labels=y,
            softcap=15.0,
            temperature=t,
            reduction=reduction,
            weight=rng.uniform(0.5, 2, size=100),
        )


def test_returns_float32_scalar_for_16bit(rng):
    for dtype in (np.float16, BF16, np.float32):
        x = random_logits(rng, (4, 10), dtype)
        got = np.asarray(fl.cross_entropy(x, np.array([0, 1, 2, 3])))
        assert got.dtype == np.float32 and got.shape == ()


# --------------------------------------------------------------------------------------------------- PyTorch


TORCH_CASES = [
    dict(),
    dict(weight=True),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.7, weight=True),
    dict(ignore_index=2),
    dict(ignore_index=2, weight=True, label_smoothing=0.3),
    dict(label_smoothing=1.0),
    dict(label_smoothing=1.0, weight=True, ignore_index=0),
]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", range(len(TORCH_CASES)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_against_torch(dtype, case, reduction, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    kw = dict(TORCH_CASES[case])
    n_classes = 37
    lead = (3, 5) if case % 2 else (11,)
    x = random_logits(rng, lead + (n_classes,), dtype, scale=3.0)
    ignore = kw.get("ignore_index", -100)
    y = random_labels(rng, lead, n_classes, ignore_index=ignore)
    if kw.pop("weight", False):
        kw["weight"] = rng.uniform(0.2, 3.0, size=n_classes)
    tx = torch.from_numpy(x.astype(np.float64).reshape(-1, n_classes))
    ty = torch.from_numpy(y.reshape(-1).astype(np.int64))
    tkw = dict(kw)
    if "weight" in tkw:
        tkw["weight"] = torch.from_numpy(tkw["weight"])
    want = F.cross_entropy(tx, ty, reduction=reduction, **tkw).numpy()
    if reduction == "none":
        want = want.reshape(lead)
    # the reference is PyTorch
    np.testing.assert_allclose(
        ref.cross_entropy(x, y, reduction=reduction, **kw), want, rtol=1e-12, atol=1e-14
    )
    # and fastlogits is the reference within the tolerance table
    got = check("cross_entropy", x, labels=y, reduction=reduction, chunk_size=[None, 5, 1][case % 3], **kw)
    scale = ref.row_scale(x)
    if reduction == "none":
        tols.assert_close(
            got, want, 2 * tols.log_tol(dtype, want, scale) * (3 if "weight" in kw else 1), None, "torch"
        )


def test_against_torch_edge_rows():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.array([[0.0, -inf, 1.0], [nan, 0, 1], [inf, 0, 0], [1, 2, 3], [-inf, -inf, -inf], [-inf, 5, -inf]])
    y = np.array([0, 1, 2, 2, 0, 1])
    for eps in (0.0, 0.2):
        want = F.cross_entropy(
            torch.from_numpy(x), torch.from_numpy(y), reduction="none", label_smoothing=eps
        ).numpy()
        got = np.asarray(fl.cross_entropy(x, y, reduction="none", label_smoothing=eps))
        tols.assert_close(got, want, 1e-12 * 10, None, f"edge rows, smoothing {eps}")


def test_smoothing_sum_of_logits_near_the_float_range():
    """The label-smoothing term sums distances from the max: 6e38 between logits of +-3e38 must not
    overflow a float partial sum (the C core and the GPU kernels accumulate it in double)."""
    x = np.tile(np.array([3e38, -3e38], np.float32), 40)[None, :]
    x[0, :3] = [1.0, 2.0, 3.0]
    for y in (0, 2):
        want = ref.cross_entropy(x, np.array([y]), reduction="none", label_smoothing=0.1)
        got = fl.cross_entropy(x, np.array([y]), reduction="none", label_smoothing=0.1)
        # the exact value (~1e38 here) is finite in float32
        assert np.isfinite(want).all() and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("V", [9, 257])
def test_row_batches_of_every_size_on_every_thread_count(rng, V, smoothing):
    """Whole rows are done in batches of up to 64, fewer where a thread would be left without one (64 rows
    were one batch, on one thread): every batch size and last, short batch, against the reference, with
    ignored rows and short rows (a tile of rows at a time) among them."""
    for rows in (1, 5, 63, 64, 65, 130, 200):
        x = rng.standard_normal((rows, V)) * 4
        x[rng.random((rows, V)) < 0.05] = -np.inf
        y = random_labels(rng, (rows,), V)
        y[rng.random(rows) < 0.1] = -100
        kw = dict(label_smoothing=smoothing, reduction="none")
        want = ref.cross_entropy(x, y, **kw)
        for threads in (1, 2, 3, 7):
            got = fl.cross_entropy(x, y, threads=threads, **kw)
            # (absolute near 0: a loss of 1e-3 is lse - x[label], with lse near 2)
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14,
                                       err_msg=f"{rows} rows, {threads} threads")


def _offset_rows(rng, dtype, offset, rows=3, n=1001):
    """Rows of logits offset + 3 N(0, 1): the spread is small against their magnitude."""
    return (offset + 3.0 * rng.standard_normal((rows, n))).astype(dtype)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("offset", [-1e12, 1e6, 1e9, 1e12])
def test_smoothing_keeps_its_precision_at_large_offsets(rng, offset, weighted):
    """Label smoothing's sum_c w_c (lse - x_c) is kept as distances from the running max (their terms are
    never negative), not as W lse - sum w x, which cancels: float64 lost 2e-12 relative at logits near 1e6
    and 2e-6 near 1e12 (PyTorch keeps 2e-16). Every chunking and thread count merges the distances at a
    new max: chunks of 7, 64 and all columns, 1 and 4 threads (4 threads split each of 3 rows in segments)."""
    x = _offset_rows(rng, np.float64, offset)
    y = random_labels(rng, (x.shape[0],), x.shape[1])
    kw = dict(label_smoothing=0.1, reduction="none")
    if weighted:
        kw["weight"] = rng.uniform(0.2, 2.0, x.shape[1])
    want = ref.cross_entropy(x, y, **kw)
    for chunk in (7, 64, None):
        for threads in (1, 4):
            got = fl.cross_entropy(x, y, chunk_size=chunk, threads=threads, **kw)
            np.testing.assert_allclose(got, want, rtol=1e-13, err_msg=f"chunk {chunk}, {threads} threads")
    # float32 logits at the same offsets: the distances are formed in double, so only float32's own
    # rounding of the logits and of exp remains
    x32 = _offset_rows(rng, np.float32, min(abs(offset), 1e9))
    want32 = ref.cross_entropy(x32, y, **kw)
    for chunk in (7, None):
        got = fl.cross_entropy(x32, y, chunk_size=chunk, threads=4, **kw)
        np.testing.assert_allclose(got, want32, rtol=2e-6)


def test_smoothing_against_torch_at_large_offsets(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = _offset_rows(rng, np.float64, 1e9, rows=4, n=300)
    y = random_labels(rng, (4,), 300)
    w = rng.uniform(0.2, 2.0, 300)
    for kw in (dict(), dict(weight=w)):
        tw = {k: torch.from_numpy(v) for k, v in kw.items()}
        want = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(y), label_smoothing=0.2,
                               reduction="none", **tw).numpy()
        got = fl.cross_entropy(x, y, label_smoothing=0.2, reduction="none", chunk_size=16, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-13)


def test_smoothing_with_minus_inf_chunks():
    """A chunk (or a thread's segment) of only -inf comes before or after the finite columns: its distances
    are infinite, so the smoothing term is inf, as PyTorch's -sum log p; NaN where such a column has weight 0
    (PyTorch: 0 * -inf). Whatever the chunking, and at a large offset."""
    n = 64
    for offset in (0.0, 1e9):
        fin = offset + np.linspace(-3, 3, n - 16)
        rows = [np.concatenate([np.full(16, -inf), fin]), np.concatenate([fin, np.full(16, -inf)])]
        x = np.array(rows)
        y = np.array([20, 3])
        w_zero = np.ones(n)
        w_zero[[0, n - 1]] = 0.0         # a -inf column of each row has weight 0
        for chunk in (8, 16, None):
            for threads in (1, 4):
                kw = dict(label_smoothing=0.1, reduction="none", chunk_size=chunk, threads=threads)
                got = fl.cross_entropy(x, y, **kw)
                assert np.all(got == inf), (offset, chunk, threads, got)
                got = fl.cross_entropy(x, y, weight=w_zero, **kw)
                assert np.all(np.isnan(got)), (offset, chunk, threads, got)
                # without -inf the term is finite and exact at any chunking
                xf = np.where(np.isinf(x), offset - 5.0, x)
                np.testing.assert_allclose(fl.cross_entropy(xf, y, **kw),
                                           ref.cross_entropy(xf, y, label_smoothing=0.1, reduction="none"),
                                           rtol=1e-13)


def test_a_z_loss_term_near_the_double_range_does_not_overflow():
    """z lse^2 is formed (z lse) lse: 1e-4 (1e155)^2 = 1e306 is a double, though lse^2 = 1e310 is not (it
    overflowed to inf; found by an audit helper). In memory, streamed, and from the accumulator."""
    x, y = np.array([[1e155, 0.0]]), np.array([1])
    for reduction in ("none", "sum", "mean"):
        for src in (x, iter([x])):
            np.testing.assert_allclose(fl.cross_entropy(src, y, z_loss=1e-4, reduction=reduction), 1e306,
                                       rtol=1e-15)
        acc = fl.stream.CrossEntropy(y, z_loss=1e-4, reduction=reduction).update(x, 0)
        np.testing.assert_allclose(acc.result(), 1e306, rtol=1e-15)
