"""fastlogits.stream's accumulators: a row block cut into random column chunks, fed in shuffled order to
several accumulators and merged in random order, equals the one-shot result; states round-trip."""

import numpy as np
import pytest

import fastlogits as fl
from fastlogits.stream import CrossEntropy, Entropy, EntropyState, LogSumExp, TopK, TopKState
from tests import reference as ref
from tests import tolerances as tols
from tests.helpers import BF16, DTYPE_IDS, DTYPES, random_labels, random_logits

inf, nan = np.inf, np.nan


def _cuts(rng, n, max_pieces=12):
    k = int(rng.integers(1, min(max_pieces, n) + 1))
    inner = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False)) if n > 1 and k > 1 else []
    edges = [0, *map(int, inner), n]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _feed(rng, make, x, n_acc):
    """Feed the column chunks of ``x`` to ``n_acc`` accumulators (random assignment, shuffled order), then
    merge them all into one in random order; return it."""
    pieces = _cuts(rng, x.shape[1])
    rng.shuffle(pieces)
    accs = [make() for _ in range(n_acc)]
    for i, (a, b) in enumerate(pieces):
        accs[int(rng.integers(n_acc)) if i >= n_acc else i].update(x[:, a:b], a)
    order = list(rng.permutation(n_acc))
    into = accs[order[0]]
    for j in order[1:]:
        into.merge(accs[j])
    return into


def _lse_check(got, x, what):
    got = np.asarray(got)
    want = ref.logsumexp(x)
    dtype = x.dtype
    tols.assert_close(got, want, tols.log_tol(dtype, want, ref.row_scale(x)), None, what)


@pytest.mark.parametrize("n_acc", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_logsumexp_random_chunks(dtype, n_acc, rng):
    for n in (1, 2, 37, 1000):
        x = random_logits(rng, (6, n), dtype, scale=5.0)
        acc = _feed(rng, lambda: LogSumExp(6), x, n_acc)
        _lse_check(acc.result(), x, f"LogSumExp n={n}")
        # result equals the one-shot function
        one = np.asarray(fl.logsumexp(x)).astype(np.float64)
        np.testing.assert_allclose(
            np.asarray(acc.result(), dtype=np.float64),
            one,
            atol=float(np.max(2 * tols.log_tol(dtype, one, ref.row_scale(x)))),
            rtol=0,
        )


def test_logsumexp_awkward_chunks(rng):
    """-inf chunks (a chunk of all -inf keeps -inf as its max), NaN, +inf, values near -1000."""
    x = np.full((5, 40), -inf)
    x[0, 30:] = -1000.0 - np.arange(10)
    x[1, :] = rng.standard_normal(40)
    x[1, 5] = nan
    x[2, :] = rng.standard_normal(40)
    x[2, 33] = inf
    x[4, :] = 1e4 * np.sign(rng.standard_normal(40))
    for _ in range(5):
        acc = _feed(rng, lambda: LogSumExp(5), x, 3)
        got = np.asarray(acc.result(), dtype=np.float64)
        _lse_check(got, x, "awkward chunks")
        assert np.isfinite(got[0]) and np.isnan(got[1]) and got[2] == inf and got[3] == -inf


def test_logsumexp_ordered_chunks_minus_inf_first():
    x = np.array([[-inf] * 10 + [-1000.0, -1001.0]])
    acc = LogSumExp(1)
    for a in range(0, 12, 2):
        acc.update(x[:, a : a + 2], a)
    got = float(np.asarray(acc.result())[0])
    assert got == pytest.approx(-1000.0 + np.log1p(np.exp(-1.0)), rel=1e-12)


def test_empty_accumulator_is_minus_inf():
    np.testing.assert_array_equal(np.asarray(LogSumExp(3).result()), [-inf, -inf, -inf])


def test_state_round_trip(rng):
    x = random_logits(rng, (4, 300), np.float64)
    acc = LogSumExp(4)
    acc.update(x[:, :100], 0)
    acc.update(x[:, 100:], 100)
    state = acc.state
    assert len(state) == 2
    m, s = (np.asarray(a) for a in state)
    assert m.shape == (4,) and s.shape == (4,)
    # plain arrays: the running max and the sum of exp(x - max)
    np.testing.assert_allclose(m, x.max(axis=1), rtol=0, atol=0)
    np.testing.assert_allclose(m + np.log(s), ref.logsumexp(x), rtol=1e-12)
    fresh = LogSumExp(4)
    fresh.merge(state)
    np.testing.assert_allclose(np.asarray(fresh.result()), np.asarray(acc.result()), rtol=1e-14)
    # a state merged into an accumulator holding other columns
    other = LogSumExp(4)
    y = random_logits(rng, (4, 50), np.float64)
    other.update(y, 300)
    other.merge(state)
    _lse_check(other.result(), np.concatenate([x, y], axis=1), "state merged into other columns")


def test_merge_states_made_elsewhere(rng):
    """A state computed by hand (as another machine would send it) merges like an accumulator's."""
    x = random_logits(rng, (3, 200), np.float64, scale=20.0)
    x[2, :120] = -inf  # this row's first part is empty: its max is -inf and its sum 0
    part = x[:, :120]
    m = part.max(axis=1)
    with np.errstate(invalid="ignore"):
        s = np.where(np.isfinite(m), np.exp(part - np.where(np.isfinite(m), m, 0)[:, None]).sum(axis=1), 0.0)
    acc = LogSumExp(3)
    acc.update(x[:, 120:], 120)
    acc.merge((m, s))
    _lse_check(acc.result(), x, "hand-made state")
    acc2 = LogSumExp(3)
    acc2.merge((m.astype(np.float32), s.astype(np.float32)))
    acc2.update(x[:, 120:], 120)
    got = np.asarray(acc2.result(), dtype=np.float64)
    np.testing.assert_allclose(got, ref.logsumexp(x), rtol=1e-6)


def _ce_reference(x, labels, **kw):
    return ref.cross_entropy(x, labels, **kw)


CE_CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(weight=True),
    dict(label_smoothing=0.1),
    dict(weight=True, label_smoothing=0.2, reduction="sum"),
    dict(ignore_index=3),
    dict(z_loss=1e-3, reduction="none"),
]


@pytest.mark.parametrize("n_acc", [1, 3])
@pytest.mark.parametrize("case", range(len(CE_CASES)))
@pytest.mark.parametrize("dtype", [np.float64, np.float32, BF16], ids=["float64", "float32", "bfloat16"])
def test_cross_entropy_random_chunks(dtype, case, n_acc, rng):
    kw = dict(CE_CASES[case])
    n, rows = 211, 9
    x = random_logits(rng, (rows, n), dtype, scale=4.0)
    y = random_labels(rng, (rows,), n, ignore_index=kw.get("ignore_index", -100))
    if kw.pop("weight", False):
        kw["weight"] = rng.uniform(0.3, 2.0, size=n)
    acc = _feed(rng, lambda: CrossEntropy(y, **kw), x, n_acc)
    got = np.asarray(acc.result(), dtype=np.float64)
    one = np.asarray(fl.cross_entropy(x, y, **kw), dtype=np.float64)
    want = _ce_reference(x, y, **kw)
    scale = ref.row_scale(x)
    tol = tols.log_tol(dtype, want, scale.max()) * (3 if "weight" in kw else 1)
    if kw.get("reduction", "mean") == "sum":
        tol = tol * rows
    tols.assert_close(got, want, tol, None, f"CrossEntropy {kw}")
    tols.assert_close(got, one, 2 * tol, None, f"CrossEntropy vs cross_entropy {kw}")
    # the state round-trips through a new accumulator
    fresh = CrossEntropy(y, **kw)
    fresh.merge(acc.state)
    np.testing.assert_allclose(np.asarray(fresh.result(), dtype=np.float64), got, rtol=1e-12, atol=1e-300)


def test_cross_entropy_keeps_its_own_weights(rng):
    """The accumulator keeps a copy of the class weights (float64 ones too, which a call does not copy):
    the caller's array changed between updates changes nothing."""
    x = rng.standard_normal((3, 40))
    y = np.array([0, 7, 39])
    w = rng.uniform(0.5, 2.0, 40)
    for eps in (0.0, 0.2):
        want = _ce_reference(x, y, weight=w.copy(), label_smoothing=eps)
        acc = CrossEntropy(y, weight=w, label_smoothing=eps)
        acc.update(x[:, :20], 0)
        w_saved = w.copy()
        w[:] = 100.0
        acc.update(x[:, 20:], 20)
        w[:] = w_saved
        np.testing.assert_allclose(acc.result(), want, rtol=1e-12)


def test_cross_entropy_all_ignored():
    acc = CrossEntropy(np.array([-100, -100]))
    acc.update(np.zeros((2, 5)), 0)
    assert np.isnan(acc.result())
    acc = CrossEntropy(np.array([-100, -100]), reduction="sum")
    acc.update(np.zeros((2, 5)), 0)
    assert float(acc.result()) == 0.0


def test_cross_entropy_target_in_late_chunk(rng):
    """The target logit arrives in whichever chunk holds its column."""
    x = random_logits(rng, (3, 100), np.float64)
    y = np.array([0, 55, 99])
    acc = CrossEntropy(y, reduction="none")
    for a in (90, 50, 0, 60):
        b = {90: 100, 50: 60, 0: 50, 60: 90}[a]
        acc.update(x[:, a:b], a)
    np.testing.assert_allclose(
        np.asarray(acc.result()), ref.cross_entropy(x, y, reduction="none"), rtol=1e-12
    )


def test_zero_width_chunk_and_result_then_continue(rng):
    x = random_logits(rng, (3, 60), np.float64)
    acc = LogSumExp(3)
    acc.update(x[:, 10:10], 10)
    acc.update(x[:, :30], 0)
    first = np.asarray(acc.result(), dtype=np.float64).copy()
    np.testing.assert_allclose(first, ref.logsumexp(x[:, :30]), rtol=1e-12)
    # result() does not close the accumulator
    acc.update(x[:, 30:], 30)
    np.testing.assert_allclose(np.asarray(acc.result()), ref.logsumexp(x), rtol=1e-12)
    assert np.asarray(acc.result()).shape == (3,)


def test_mixed_chunk_dtypes(rng):
    """Chunks of different dtypes may feed one accumulator (a float16 part and a float32 part of a row)."""
    x16 = random_logits(rng, (4, 50), np.float16)
    x32 = random_logits(rng, (4, 70), np.float32)
    xb = random_logits(rng, (4, 30), BF16)
    acc = LogSumExp(4)
    acc.update(x32, 50)
    acc.update(x16, 0)
    acc.update(xb, 120)
    full = np.concatenate([x16.astype(np.float64), x32.astype(np.float64), xb.astype(np.float64)], axis=1)
    _lse_check(acc.result(), full.astype(np.float32), "mixed dtypes")


def test_accumulator_rejects_wrong_rows():
    acc = LogSumExp(3)
    with pytest.raises(ValueError):
        acc.update(np.zeros((4, 5)), 0)
    with pytest.raises(ValueError):
        acc.merge(LogSumExp(4))
    ce = CrossEntropy(np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        ce.update(np.zeros((2, 5)), 0)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_cross_entropy_smoothing_at_large_offsets(rng, weighted):
    """Label smoothing's distance sums (from each range's max) are shifted to the merged max when chunks
    and accumulators merge in any order, so the term keeps float64's precision at logits near 1e9, where
    W lse - sum w x lost 2e-9 relative. A hand-made state (distances from its own max, the weight sum of
    its columns), as another machine would send it, merges the same way."""
    rows, n = 5, 400
    x = 1e9 + 3.0 * rng.standard_normal((rows, n))
    x[0, :150] -= 40.0            # the max of row 0 arrives late
    x[1, 300:] = -inf             # row 1 ends in -inf: its smoothing term is inf
    y = random_labels(rng, (rows,), 150)
    y[1] = 7                      # (random_labels may ignore a row)
    kw = dict(label_smoothing=0.1, reduction="none")
    if weighted:
        kw["weight"] = rng.uniform(0.2, 2.0, n)
    want = ref.cross_entropy(x, y, **kw)
    assert want[1] == inf
    for n_acc in (1, 3):
        got = _feed(rng, lambda: CrossEntropy(y, **kw), x, n_acc).result()
        np.testing.assert_allclose(got, want, rtol=1e-13, err_msg=f"{n_acc} accumulators")
    # the last 100 columns' state made by hand
    part = x[:, 300:]
    w = kw["weight"][300:] if weighted else np.ones(100)
    m = part.max(axis=1)
    with np.errstate(invalid="ignore"):
        s = np.where(np.isfinite(m), np.exp(part - np.where(np.isfinite(m), m, 0)[:, None]).sum(axis=1), 0.0)
        dist = np.where(np.isfinite(m), (w * (m[:, None] - part)).sum(axis=1), (w * -part).sum(axis=1))
    found = y >= 300
    state = fl.stream.CrossEntropyState(m, s, np.zeros(rows), found, dist, float(w.sum()), 100)
    acc = CrossEntropy(y, **kw)
    acc.update(x[:, :300], 0)
    acc.merge(state)
    np.testing.assert_allclose(acc.result(), want, rtol=1e-13)
    # and its own state round-trips
    fresh = CrossEntropy(y, **kw)
    fresh.merge(acc.state)
    np.testing.assert_array_equal(fresh.result(), acc.result())


def _awkward(rng, x):
    """x with the awkward rows: all -inf, a NaN, a +inf, ties, a -inf tail (rows 0-4 of >= 6)."""
    n = x.shape[1]
    x[0] = -inf
    x[1, n // 2] = nan
    x[2, n - 1] = inf
    x[3] = np.round(x[3])                     # ties
    x[4, n // 3:] = -inf
    return x


@pytest.mark.parametrize("n_acc", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_entropy_random_chunks(dtype, n_acc, rng):
    for n in (1, 2, 37, 1000):
        x = random_logits(rng, (7, n), dtype, scale=5.0)
        if n > 2:
            x = _awkward(rng, x)
        temperature = float(rng.uniform(0.5, 2.0))
        acc = _feed(rng, lambda t=temperature: Entropy(7, temperature=t), x, n_acc)
        want = ref.entropy(x, temperature=temperature)
        got = acc.result()
        tols.assert_close(got, want, tols.log_tol(dtype, want, ref.row_scale(x, temperature=temperature)),
                          None, f"Entropy n={n}")
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize("logprobs", [False, True], ids=["values", "logprobs"])
@pytest.mark.parametrize("n_acc", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_top_k_random_chunks(dtype, n_acc, logprobs, rng):
    """Merged in any order, the k largest (NaN first, ties by the lower column) equal the one-shot top_k,
    indices exactly; with logprobs, the log-probabilities of the whole rows."""
    for n in (1, 5, 37, 300):
        x = random_logits(rng, (7, n), dtype, scale=4.0)
        if n > 2:
            x = _awkward(rng, x)
        x[5] = np.round(x[5].astype(np.float64) / 2).astype(dtype)   # many ties, across chunks
        k = int(rng.integers(1, n + 3))
        acc = _feed(rng, lambda k=k: TopK(7, k, logprobs=logprobs, temperature=0.7), x, n_acc)
        got, idx = acc.result()
        assert idx.shape == (7, min(k, n)) and idx.dtype == np.int64
        # x / T is computed in the compute type (float32 below float64), as PyTorch does: the order is its
        cd = np.dtype(tols.reduction_dtype(dtype))
        y = x.astype(cd) / cd.type(0.7)
        want_idx = ref.top_k_order(y, min(k, n))
        if logprobs:
            want = np.take_along_axis(ref.log_softmax(x, temperature=0.7), want_idx, 1)
            tol = tols.log_tol(dtype, want, ref.row_scale(x, temperature=0.7)[:, None])
            finite = np.isfinite(want)
            np.testing.assert_array_less(np.abs(got[finite] - want[finite]), tol[finite])
            np.testing.assert_array_equal(got[~finite], want[~finite])     # NaN rows, -inf tokens
        else:
            np.testing.assert_array_equal(got, np.take_along_axis(y, want_idx, 1))
        np.testing.assert_array_equal(idx, want_idx, err_msg=f"n={n} k={k}")


@pytest.mark.parametrize("make", [
    lambda y: LogSumExp(5), lambda y: Entropy(5), lambda y: CrossEntropy(y, label_smoothing=0.1),
    lambda y: TopK(5, 3), lambda y: TopK(5, 3, logprobs=True)],
    ids=["lse", "entropy", "ce", "topk", "topk-lp"])
def test_empty_chunks_add_nothing(make, rng):
    """A chunk of shape (rows, 0) is a chunk (API.md: "chunk is (rows, c)"), before, between and after the
    others, in every accumulator: TopK refused it (a top-0 of nothing), found by an embedding audit."""
    x = random_logits(rng, (5, 40), np.float32, scale=3.0)
    y = rng.integers(0, 40, 5)
    acc, plain = make(y), make(y)
    for a, b in ((0, 0), (0, 17), (17, 17), (17, 40), (40, 40)):
        acc.update(x[:, a:b], a)
    for a, b in ((0, 17), (17, 40)):
        plain.update(x[:, a:b], a)

    def arrays(acc):
        r = acc.result()
        return [np.asarray(a) for a in (r if isinstance(r, tuple) else (r,))]

    for got, want in zip(arrays(acc), arrays(plain)):          # bit for bit: the empties add nothing
        np.testing.assert_array_equal(got, want)
    # and near the one-chunk result (float32 rounding of a different merge order: 16 eps32 (1 + M))
    np.testing.assert_allclose(arrays(acc)[0], arrays(make(y).update(x, 0))[0], rtol=2e-5, atol=2e-5)


def test_entropy_and_top_k_states_made_elsewhere(rng):
    """States computed by hand with NumPy (as another machine would send them) merge like accumulators'."""
    x = random_logits(rng, (4, 300), np.float64, scale=10.0)
    x[3, 200:] = -inf                 # the hand-made part of row 3 is empty: m = -inf, s = t = 0
    part = x[:, 200:]
    m = part.max(axis=1)
    shift = np.where(np.isfinite(m), m, 0)[:, None]
    with np.errstate(invalid="ignore"):
        e = np.exp(part - shift)
        s = e.sum(axis=1)
        t = np.where(e > 0, e * (part - shift), 0).sum(axis=1)
    acc = Entropy(4).update(x[:, :200], 0).merge(EntropyState(m, s, t))
    want = ref.entropy(x)
    tols.assert_close(acc.result(), want, tols.log_tol(np.float64, want, ref.row_scale(x)), None, "Entropy")
    fresh = Entropy(4).merge(acc.state)
    np.testing.assert_array_equal(fresh.result(), acc.result())

    order = np.argsort(-part, axis=1, kind="stable")[:, :6]
    hand = (np.take_along_axis(part, order, 1), order + 200)
    got = TopK(4, 6).update(x[:, :200], 0).merge(hand).result()          # (values, indices) suffices
    want = ref.top_k(x, 6)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    lp = TopK(4, 6, logprobs=True).update(x[:, :200], 0).merge(TopKState(*hand, m, s)).result()
    want = ref.top_k_logprobs(x, 6)
    tol = tols.log_tol(np.float64, want[0], ref.row_scale(x)[:, None])
    tols.assert_close(lp[0], want[0], tol, None, "TopK logprobs")
    np.testing.assert_array_equal(lp[1], want[1])
    fresh = TopK(4, 6, logprobs=True).merge(TopK(4, 6, logprobs=True).update(x, 0).state)
    tols.assert_close(fresh.result()[0], want[0], tol, None, "TopK state")


def test_merge_refuses_other_kinds_options_and_bad_states(rng):
    x = rng.standard_normal((3, 40))
    with pytest.raises(ValueError, match="different temperature"):
        LogSumExp(3).update(x[:, :20], 0).merge(LogSumExp(3, temperature=2.0).update(x[:, 20:], 20))
    with pytest.raises(ValueError, match="different temperature"):
        LogSumExp(3, temperature=[1.0, 2.0, 1.0]).merge(LogSumExp(3, temperature=1.0))
    # the same temperatures, one given per row: merged, as the whole row gives
    t = np.full(3, 0.5)
    got = LogSumExp(3, temperature=t).update(x[:, :20], 0).merge(LogSumExp(3, temperature=0.5).update(
        x[:, 20:], 20)).result()
    np.testing.assert_allclose(got, ref.logsumexp(x, temperature=0.5), rtol=1e-12)
    y = rng.integers(0, 40, 3)
    with pytest.raises(ValueError, match="different reduction"):
        CrossEntropy(y).update(x[:, :20], 0).merge(CrossEntropy(y, reduction="sum").update(x[:, 20:], 20))
    with pytest.raises(ValueError, match="different softcap"):
        Entropy(3).update(x[:, :20], 0).merge(Entropy(3, softcap=5.0).update(x[:, 20:], 20))
    with pytest.raises(ValueError, match="different k"):
        TopK(3, 2).merge(TopK(3, 3).update(x[:, 20:], 20))
    with pytest.raises(ValueError, match="different logprobs"):
        TopK(3, 2).merge(TopK(3, 2, logprobs=True).update(x[:, 20:], 20))
    with pytest.raises(TypeError, match="a LogSumExp merges another LogSumExp or a LogSumExpState, got a "
                                        "Entropy"):
        LogSumExp(3).merge(Entropy(3))
    with pytest.raises(TypeError, match=r"expected a Entropy or a EntropyState \(m, s, t\)"):
        Entropy(3).merge((np.zeros(3), np.ones(3)))
    with pytest.raises(TypeError, match="expected a LogSumExp"):
        LogSumExp(3).merge(5)
    with pytest.raises(TypeError, match="the other state's m must be an array of float64 values, got 'a'"):
        LogSumExp(3).merge("ab")
    with pytest.raises(TypeError, match="the other state's t must be an array of float64 values"):
        Entropy(3).merge((np.zeros(3), np.ones(3), [None, {}, 1]))
    # a sum of exponentials below 0 comes from no row (a NaN one is a NaN row's, merged as such)
    bad_s = np.array([1.0, -0.5, np.nan])
    lse = LogSumExp(3).update(x[:, :20], 0)
    lse_before = lse.result()
    ce = CrossEntropy(y).update(x[:, :20], 0)
    ce_state = ce.state
    for acc, state in ((lse, (np.zeros(3), bad_s)), (Entropy(3), (np.zeros(3), bad_s, np.zeros(3))),
                       (ce, ce_state._replace(s=bad_s, columns=20)),
                       (TopK(3, 2, logprobs=True), (np.zeros((3, 0)), np.zeros((3, 0), np.int64), np.zeros(3),
                                                    bad_s))):
        with pytest.raises(ValueError, match=r"the other state's s holds sums of exponentials, never "
                                             r"negative, got -0\.5 in row 1$"):
            acc.merge(state)
    np.testing.assert_array_equal(lse.result(), lse_before)
    assert lse.ranges == [(0, 20)] and ce.ranges == [(0, 20)]
    nan_row = LogSumExp(3).update(x[:, :20], 0).merge((np.zeros(3), np.abs(bad_s))).result()
    assert np.isnan(nan_row[2]) and np.isfinite(nan_row[:2]).all()
    top = TopK(3, 2).update(x[:, :20], 0)
    before = top.result()
    with pytest.raises(ValueError, match=r"j <= k = 2, got \(3, 3\)"):
        top.merge((np.zeros((3, 3)), np.zeros((3, 3), np.int64)))
    with pytest.raises(ValueError, match="indices must be non-negative integers"):
        top.merge((np.zeros((3, 1)), -np.ones((3, 1), np.int64)))
    with pytest.raises(ValueError, match="logprobs=False, so the other state's m and s must be None"):
        top.merge((np.zeros((3, 1)), np.ones((3, 1), np.int64), np.zeros(3), np.ones(3)))
    with pytest.raises(ValueError, match="logprobs=True, so the other state's m and s must be arrays"):
        TopK(3, 2, logprobs=True).merge((np.zeros((3, 1)), np.ones((3, 1), np.int64)))
    with pytest.raises(ValueError, match="already folded in"):
        top.merge(TopK(3, 2).update(x[:, 19:21], 19))
    # nothing was changed by the refused merges
    np.testing.assert_array_equal(top.result()[1], before[1])
    np.testing.assert_array_equal(top.merge(TopK(3, 2).update(x[:, 20:], 20)).result()[1],
                                  ref.top_k(x, 2)[1])


def test_merging_an_accumulator_into_itself_is_refused_even_after_a_bare_state(rng):
    """Once a bare state was merged the column ranges are unknown, so the overlap check cannot see a merge
    of the accumulator into itself: it is refused by identity (it would count every column twice)."""
    x = rng.standard_normal((3, 8))
    for make in (lambda: LogSumExp(3), lambda: CrossEntropy(np.array([0, 5, 7])), lambda: Entropy(3),
                 lambda: TopK(3, 2, logprobs=True)):
        a, b = make(), make()
        a.update(x[:, :4], 0)
        b.update(x[:, 4:], 4)
        a.merge(b.state)
        assert a.ranges is None
        with pytest.raises(ValueError, match="merged into itself"):
            a.merge(a)
        b.update(x[:, :4], 0)                       # the same columns, folded the other way round
        np.testing.assert_array_equal(np.asarray(a.result()[0] if isinstance(a, TopK) else a.result()),
                                      np.asarray(b.result()[0] if isinstance(b, TopK) else b.result()))


def test_accumulators_keep_their_own_copy_of_per_row_temperatures(rng):
    """A per-row temperature array is copied when the accumulator is made: the caller reusing its buffer
    changes neither later chunks nor what merge compares."""
    x = rng.standard_normal((2, 10))
    t = np.array([0.5, 2.0])
    want = ref.logsumexp(x / t[:, None])
    for make in (lambda t: LogSumExp(2, temperature=t), lambda t: Entropy(2, temperature=t),
                 lambda t: CrossEntropy(np.array([1, 3]), temperature=t, reduction="none"),
                 lambda t: TopK(2, 3, temperature=t)):
        buf = t.copy()
        acc = make(buf)
        acc.update(x[:, :5], 0)
        buf[:] = 1.0
        acc.update(x[:, 5:], 5)
        whole = make(t).update(x, 0)
        np.testing.assert_allclose(np.asarray(acc.result()[0] if isinstance(acc, TopK) else acc.result()),
                                   np.asarray(whole.result()[0] if isinstance(acc, TopK) else whole.result()),
                                   rtol=1e-12)
        with pytest.raises(ValueError, match="different temperature"):
            acc.merge(make(buf))                    # made at T = 1: not the same options
    lse = LogSumExp(2, temperature=t)
    lse.update(x, 0)
    t[:] = 1.0
    np.testing.assert_allclose(lse.result(), want, rtol=1e-13)


def test_cross_entropy_accumulator_refuses_uint64_labels_past_int64():
    """A uint64 label of 2**64 - 100 is out of range, as fastlogits.cross_entropy says, not -100 (the
    default ignore_index) after a wrap to int64, which would drop the row quietly."""
    x = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
    for label in (2**64 - 100, 2**63 + 5):
        lab = np.array([0, label], np.uint64)
        with pytest.raises(IndexError, match=f"label {label} at row 1"):
            fl.cross_entropy(x, lab)
        with pytest.raises(IndexError, match=f"label {label} at row 1"):
            CrossEntropy(lab)
    lab = np.array([0, 1], np.uint64)                 # in range: accepted, the same loss
    assert CrossEntropy(lab).update(x, 0).result() == pytest.approx(float(fl.cross_entropy(x, lab)),
                                                                    rel=1e-6)


def test_a_state_made_on_the_gpu_merges_as_the_hint_says(rng):
    """update() refuses a GPU chunk and suggests merging (lse, np.ones(rows)) of its logsumexp: that state
    merges to the same result (fastlogits.logsumexp on the CPU stands in for the GPU's here)."""
    x = rng.standard_normal((3, 12))
    acc = LogSumExp(3).update(x[:, :5], 0)

    class OnDevice:                           # what fastlogits takes for a GPU array
        __cuda_array_interface__ = {}

    with pytest.raises(ValueError, match=r"copy it to the host first .*\(lse, np\.ones\(rows\)\)"):
        acc.update(OnDevice(), 5)
    acc.merge((fl.logsumexp(x[:, 5:].astype(np.float64)), np.ones(3)))
    np.testing.assert_allclose(acc.result(), ref.logsumexp(x), rtol=1e-13)
    with pytest.raises(ValueError, match=r"s must have one value per row, shape \(3,\), got shape \(\)"):
        acc.merge((np.zeros(3), 1.0))


def _together(fns):
    """Run the functions in threads released at once; the exceptions they raised, in order (None: ran)."""
    import threading

    gate, errors = threading.Barrier(len(fns)), [None] * len(fns)

    def run(i):
        gate.wait()
        try:
            fns[i]()
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("kind", ["LogSumExp", "CrossEntropy"])
def test_updates_from_several_threads_at_once(kind, rng):
    """Threads updating one accumulator at once: the same range from two threads is folded in once (the
    other raises), and disjoint ranges from four are all recorded. Without a lock both threads found the
    range new and folded it in twice (logsumexp off by log 2), and ranges were lost (a false "columns were
    never folded in"), in most runs (found by a concurrency audit)."""
    rows, V = 4, 4000
    x = random_logits(rng, (rows, V), np.float32)
    y = random_labels(rng, rows, V)
    if kind == "LogSumExp":
        make, want = (lambda: LogSumExp(rows, threads=1)), fl.logsumexp(x.astype(np.float64))
    else:
        make = lambda: CrossEntropy(y, reduction="none", threads=1)  # noqa: E731
        want = fl.cross_entropy(x.astype(np.float64), y, reduction="none")
    for _ in range(10):
        a = make()
        errors = _together([lambda a=a: a.update(x, 0)] * 2)
        assert sorted(map(str, map(type, errors))) == sorted(map(str, [type(None), ValueError])), errors
        assert a.columns == V and a.ranges == [(0, V)]
        np.testing.assert_allclose(a.result(), want, rtol=1e-6)
        b = make()
        cuts = [(0, 1000), (1000, 2000), (2000, 3000), (3000, V)]
        assert _together([lambda c=c, b=b: b.update(x[:, c[0]:c[1]], c[0]) for c in cuts]) == [None] * 4
        assert b.columns == V and b.ranges == [(0, V)]
        np.testing.assert_allclose(b.result(), want, rtol=1e-6)


def test_accumulators_pickle_and_copy(rng):
    """An accumulator crosses processes (pickle) and copies with its state and column ranges, and a lock of
    its own: the lock made them unpicklable (found by a review)."""
    import copy
    import pickle

    x = random_logits(rng, (3, 40), np.float32)
    y = random_labels(rng, 3, 40)
    for make in (lambda: LogSumExp(3), lambda: CrossEntropy(y, reduction="none"), lambda: Entropy(3),
                 lambda: TopK(3, 4)):
        a = make().update(x[:, :25], 0)
        for b in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
            assert b.ranges == [(0, 25)] and b._lock is not a._lock
            b.update(x[:, 25:], 25)
            want = make().update(x[:, :25], 0).update(x[:, 25:], 25).result()
            for g, w in zip(*(v if isinstance(v, tuple) else (v,) for v in (b.result(), want)), strict=True):
                np.testing.assert_array_equal(g, w)


def test_columns_past_int64_are_refused_by_every_accumulator():
    """update(start=) whose columns pass 2**63 - 1: a ValueError naming start from every accumulator (TopK
    returned indices wrapped negative, CrossEntropy and TopK raised OverflowError from inside, LogSumExp
    and Entropy recorded the range; found by an error-parity audit). The last column 2**63 - 1 itself is
    fine. A start that is no integer is a TypeError (it was a ValueError)."""
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    for make in (lambda: LogSumExp(2), lambda: Entropy(2), lambda: TopK(2, 2),
                 lambda: CrossEntropy(np.zeros(2, np.int64))):
        for start in (2**63 - 5, 2**63, 2**64):
            with pytest.raises(ValueError, match=r"start: columns \d+:\d+ pass the largest column index"):
                make().update(x, start)
    for bad in (1.0, True, None, "0"):      # a TypeError, as for every other integer argument
        with pytest.raises(TypeError, match="start must be a non-negative integer column index"):
            LogSumExp(2).update(x, bad)
    v, i = TopK(2, 2).update(x, 2**63 - 6).result()
    assert i.tolist() == [[2**63 - 1, 2**63 - 2]] * 2 and v.tolist() == [[5.0, 4.0], [11.0, 10.0]]


def _arrays(result):
    return [np.asarray(r) for r in (result if isinstance(result, tuple) else (result,))]


@pytest.mark.parametrize("make", [lambda: LogSumExp(2), lambda: Entropy(2),
                                  lambda: CrossEntropy([0, 1], reduction="none"), lambda: TopK(2, 2),
                                  lambda: TopK(2, 2, logprobs=True)],
                         ids=["LogSumExp", "Entropy", "CrossEntropy", "TopK", "TopK-logprobs"])
def test_a_copy_is_an_accumulator_of_its_own(make):
    """copy.copy shared the state's arrays, which folds write in place: an update of the copy changed the
    original, and merging two copies of one empty accumulator counted columns twice (logsumexp off by
    log 2), unseen by the overlap check. A result is a new array too (TopK's were its state)."""
    import copy

    x = np.random.default_rng(3).standard_normal((2, 4))
    whole = _arrays(make().update(x).result())
    a = make()
    b = copy.copy(a)
    a.update(x[:, :2], 0)
    b.update(x[:, 2:], 2)
    for got, want in zip(_arrays(a.result()), _arrays(make().update(x[:, :2]).result())):
        np.testing.assert_array_equal(got, want)          # b's update left a alone
    a.merge(b)
    for r in _arrays(a.result()):
        r[...] = 0                                        # a caller's in-place change of a result
    for got, want in zip(_arrays(a.result()), whole):
        np.testing.assert_allclose(got, want, rtol=1e-13)


def test_cross_entropy_merges_with_nan_weights():
    """The same weights, one of them NaN, were "a different weight" (NaN != NaN) at merge."""
    x = np.random.default_rng(7).standard_normal((3, 6))
    lab = [0, 4, 5]
    w = np.array([1, np.nan, 1, 1, 1, 1.0])
    a = CrossEntropy(lab, weight=w).update(x[:, :3])
    a.merge(CrossEntropy(lab, weight=w).update(x[:, 3:], 3))
    np.testing.assert_allclose(a.result(), fl.cross_entropy(x, lab, weight=w), rtol=1e-13)
    np.testing.assert_allclose(a.result(), np.mean(ref.logsumexp(x) - x[np.arange(3), lab]), rtol=1e-13)
    with pytest.raises(ValueError, match="different weight"):
        CrossEntropy(lab, weight=w).merge(CrossEntropy(lab, weight=np.where(np.isnan(w), 2.0, w)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_one_chunk_gives_the_in_memory_results_bit_for_bit(dtype, rng):
    """An accumulator fed a whole row block in one chunk holds the row states the in-memory kernels fold,
    and finishes them as they do (the C core's log, its cross-entropy formula): the same bits. (NumPy's
    log differs from the core's on about 1 row in 12; the streamed losses and log-probabilities differed.)"""
    rows, V = 600, 300
    x = random_logits(rng, (rows, V), dtype, scale=4.0)
    x[::7] *= 40.0                                       # large magnitudes: log s far from 0 and 1
    labels = random_labels(rng, rows, V)
    w = rng.uniform(0.1, 2.0, V).astype(dtype)
    for kw in ({}, {"label_smoothing": 0.1}, {"weight": w, "label_smoothing": 0.05}):
        want = fl.cross_entropy(x, labels, reduction="none", **kw)
        got = CrossEntropy(labels, reduction="none", **kw).update(x).result()
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=f"CrossEntropy {kw}")
    for kw in ({}, {"temperature": 0.7}):
        np.testing.assert_array_equal(LogSumExp(rows, **kw).update(x).result().astype(dtype),
                                      fl.logsumexp(x, **kw))
        np.testing.assert_array_equal(Entropy(rows, **kw).update(x).result().astype(dtype),
                                      fl.entropy(x, **kw))
        lp, idx = TopK(rows, 5, logprobs=True, **kw).update(x).result()
        want_lp, want_idx = fl.top_k_logprobs(x, 5, **kw)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(lp.astype(dtype), want_lp, err_msg=f"TopK {kw}")
    # the one-pass stats of an evaluation (the CLI's): cross_entropy's and entropy's bits (a mutation audit:
    # libc's log there went unseen)
    from fastlogits.stream.run import stats
    got = stats(x, labels, threads=1)
    np.testing.assert_array_equal(got["nll"].astype(dtype), fl.cross_entropy(x, labels, reduction="none"))
    np.testing.assert_array_equal(got["entropy"].astype(dtype), fl.entropy(x))
