"""Sampling and beam search of sources whose rows are wider than the memory budget: the radix selects
against a sorted float64 reference, the wide-row sampler against the documented generator and Hugging
Face's filters (tests/test_sampling.py's references), sources of every kind against the same rows in
memory, rows that cannot be sampled, and the memory the passes use."""
import gc
import io
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlogits as fl
from fastlogits.cpu import _sample
from fastlogits.ops._prep import BF16
from fastlogits.stream import wide
from fastlogits.stream.sources import ArraySource, StdinSource
from tests.test_sampling import HUGE_KW, HUGE_ROWS, assert_same_logprobs, exactness_case

V_WIDE = 20011        # float16 to float64 rows wider than a 64 KiB budget (odd: chunks end mid-block)


@pytest.fixture
def small_budget():
    old = fl.get_memory_budget()
    fl.set_memory_budget("64KiB")
    yield
    fl.set_memory_budget(old)


@pytest.fixture
def wide_rows(monkeypatch):
    """Counts the rows drawn by the wide-row sampler (so a test knows it ran)."""
    calls = []
    real = wide.sample_row

    def counted(row, **kw):
        calls.append(kw)
        return real(row, **kw)
    monkeypatch.setattr(wide, "sample_row", counted)
    return calls


# ---- the radix selects ----------------------------------------------------------------------------------

def _passes(v, cols):
    def passes():
        for c0 in range(0, v.shape[0], cols):
            yield c0, v[c0:c0 + cols]
    return passes


def _awkward(rng, n, dtype):
    """Values with ties, -inf, both zeros, subnormals and huge magnitudes."""
    v = rng.standard_normal(n) * rng.choice([1.0, 50.0])
    v[rng.random(n) < 0.2] = rng.choice([0.5, -0.0, 0.0], size=1)[0]
    v[rng.random(n) < 0.05] = -np.inf
    v[rng.random(n) < 0.02] = np.finfo(dtype).tiny / 4 * rng.choice([-1, 1])
    v[rng.random(n) < 0.01] = np.finfo(dtype).max * rng.choice([-1, 1])
    return v.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_count_select_is_the_kth_largest(rng, dtype):
    for _ in range(20):
        n = int(rng.integers(1, 3000))
        v = _awkward(rng, n, dtype)
        k = int(rng.integers(1, n + 1))
        got, above, own, goal = wide._select(_passes(v, int(rng.integers(1, n + 1))), np.dtype(dtype), k)
        assert got == np.sort(v)[::-1][k - 1] and goal == k, (n, k)
        assert (above, own) == (np.count_nonzero(v > got), np.count_nonzero(v == got)), (n, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mass_select_is_the_nucleus_boundary(rng, dtype):
    """The largest value whose tokens at or above it hold the fraction p of the mass exp(x - m) of the
    tokens at or above theta, against a float64 sort; with the mass above it and the goal."""
    for _ in range(30):
        n = int(rng.integers(1, 3000))
        v = _awkward(rng, n, dtype) / dtype(40)
        v[v > 1e30] = 3.0
        m = float(np.max(v))
        if m == -np.inf:
            continue
        theta = -np.inf if rng.random() < 0.5 else float(np.sort(v)[::-1][int(rng.integers(0, n))])
        p = float(rng.uniform(0.01, 0.99))
        x = np.sort(v.astype(np.float64))[::-1]
        w = np.where(x >= theta, np.exp(x - m), 0.0)
        levels = np.unique(x)[::-1]
        cum = np.array([w[x >= lv].sum() for lv in levels])
        goal = p * w.sum()
        if np.any(np.abs(cum - goal) < 1e-9 * goal):
            continue                                  # within rounding of the boundary
        want = levels[np.argmax(cum >= goal)]
        got, above, own, g = wide._select(_passes(v, int(rng.integers(1, n + 1))), np.dtype(dtype), p,
                                          mass=(theta, m))
        assert got == want, (n, p, theta)
        np.testing.assert_allclose([above, own, g], [w[x > want].sum(), w[x == want].sum(), goal], rtol=1e-9,
                                   atol=1e-300)


# ---- the wide-row sampler -------------------------------------------------------------------------------

@given(data=st.data())
@settings(max_examples=80, deadline=None)
def test_wide_row_exactness_property(data):
    """Random rows (ties, -inf) and filters, read in chunks of 1 to V columns: the token is the argmax of
    x / T + g over exactly the survivors of the reference filters (tests/test_sampling.py)."""
    kw, want = exactness_case(data, chunks=(1, 3, 64, 1000))
    x = kw["logits"]
    status, tokens, _, _ = wide.sample_row(
        ArraySource(x[None]), temperature=kw["temperature"], softcap=0.0, top_k=kw["top_k"] or 0,
        top_p=kw["top_p"] or 1.0, min_p=kw["min_p"] or 0.0, seed=kw["seed"], row_id=0, num_samples=1,
        logprobs=False, cols=kw["chunk_size"])
    if np.all(x == -np.inf):
        assert status == wide.EMPTY
    else:
        assert status == wide.OK and tokens[0] == want


def _rows(rng, dtype, rows=6, V=V_WIDE):
    x = rng.standard_normal((rows, V)) * 3
    x[0, rng.integers(0, V, 40)] = 7.0                   # ties at the top
    x[1, ::3] = -np.inf
    x[2, :] = np.round(x[2] * 2) / 2                     # few levels: ties at every boundary
    x[2, rng.integers(0, V, 300)] = -0.0
    x[3, :-5] = -np.inf                                  # five possible tokens
    x[4 % rows] *= 100.0                                 # a peaked row
    return x.astype(dtype)


CONFIGS = [{}, {"top_k": 50}, {"top_p": 0.9}, {"min_p": 0.05}, {"top_k": 1000, "top_p": 0.5, "min_p": 0.01},
           {"temperature": 0.7, "top_k": 7}, {"top_k": 1}, {"top_p": 1e-4}, {"min_p": 1.0},
           {"top_k": V_WIDE - 1, "top_p": 0.999}, {"softcap": 5.0, "top_p": 0.8}]


def _top_p_zone(x, i, kw):
    """Row i's values (in the compute type) where its cumulative mass, from the top over its top-k
    survivors, lands within rounding of top_p, with the next value down, and their mass: there the two
    samplers, which add the mass in other orders, may keep different tokens (documented). The mass is
    cumulated token by token, so a value counts where top-p's cut among its ties lands within rounding
    (softcap's saturated ties at the top: their number kept can differ by one). Returns (the row's
    values, the smallest and largest such value, their mass), the mass 0 when there are none."""
    def arg(name, default):
        a = kw.get(name, default)
        return default if a is None else float(np.broadcast_to(a, x.shape[:1])[i])
    top_p, top_k, T = arg("top_p", 1.0), int(arg("top_k", 0)), arg("temperature", 1.0)
    if top_p >= 1.0 or T == 0.0:
        return None, np.inf, -np.inf, 0.0
    code = {np.dtype(np.float16): 0, BF16: 1, np.dtype(np.float32): 2, np.dtype(np.float64): 3}[x.dtype]
    v = np.empty(x.shape[1], np.float64 if code == 3 else np.float32)
    _sample.values(x[i:i + 1], code, np.array([T]), float(kw.get("softcap") or 0.0), v)
    tol, values = 16 * np.finfo(v.dtype).eps, v.astype(np.float64)
    v = np.sort(values)[::-1]
    v = v[v > -np.inf]
    if 0 < top_k < x.shape[1]:
        v = v[v >= v[min(top_k, v.size) - 1]]
    w = np.exp(v - v[0])
    level, first = np.unique(-v, return_index=True)            # distinct values, from the top
    mass = np.add.reduceat(w, first) / w.sum()
    near = np.logical_or.reduceat(np.abs(np.cumsum(w) / w.sum() - max(top_p - tol, top_p / 2)) < 1e-6,
                                  first)
    near[1:] |= near[:-1]                                      # and the next value down
    if not near.any():
        return values, np.inf, -np.inf, 0.0
    return values, float(-level[near].max()), float(-level[near].min()), float(mass[near].sum())


def _same_draws(got, want, x, kw, rtol):
    """Tokens and ranks equal and log-probabilities equal to rounding, except where top-p's boundary
    lies within rounding: there a token may differ only if one of the two lies in that zone, and the
    log-probabilities by the zone's mass."""
    tokens, lp, ranks = (a.reshape(x.shape[0], -1) for a in got)
    want_t, want_lp, want_r = (a.reshape(x.shape[0], -1) for a in want)
    assert lp.dtype == want_lp.dtype
    for i in range(x.shape[0]):
        values, low, high, zone = _top_p_zone(x, i, kw)
        for s in range(tokens.shape[1]):
            if tokens[i, s] != want_t[i, s]:
                assert any(low <= values[t] <= high for t in (tokens[i, s], want_t[i, s])), (i, s)
                continue
            assert ranks[i, s] == want_r[i, s], (i, s)
            np.testing.assert_allclose(lp[i, s], want_lp[i, s], rtol=rtol, atol=rtol + 2 * zone)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64], ids=str)
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_wide_rows_draw_the_in_memory_tokens(tmp_path, rng, small_budget, wide_rows, dtype, kw):
    x = _rows(rng, dtype)
    np.save(tmp_path / "x.npy", x)
    src = fl.open(tmp_path / "x.npy", dtype="bfloat16" if dtype == BF16 else None)
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    want = fl.sample(x, seed=seed, num_samples=3, return_logprobs=True, **kw)
    got = fl.sample(src, seed=seed, num_samples=3, return_logprobs=True, **kw)
    assert len(wide_rows) == x.shape[0]
    _same_draws(got, want, x, kw, 1e-12 if dtype == np.float64 else 2e-6)


def test_per_row_arguments_and_seeds(tmp_path, rng, small_budget, wide_rows):
    x = _rows(rng, np.float32)
    np.save(tmp_path / "x.npy", x)
    kw = dict(temperature=np.array([0.0, 0.5, 1.0, 2.0, 0.0, 1.3]),
              top_k=np.array([0, 3, V_WIDE, 10**9, 5, 40]), top_p=np.array([1.0, 0.3, 0.9, 0.95, 0.5, 0.7]),
              min_p=np.array([0.0, 0.0, 0.1, 0.0, 0.2, 0.02]))
    seeds = rng.integers(0, 2**63, 6)
    for seed in (seeds, int(seeds[0])):
        want = fl.sample(x, seed=seed, num_samples=4, return_logprobs=True, **kw)
        got = fl.sample(fl.open(tmp_path / "x.npy"), seed=seed, num_samples=4, return_logprobs=True, **kw)
        _same_draws(got, want, x, kw, 2e-6)
    assert wide_rows and wide_rows[0]["temperature"] == 0.0


@pytest.mark.parametrize("kind", ["stdin", "iterable", "3-d"])
def test_wide_rows_of_every_source_kind(tmp_path, rng, small_budget, wide_rows, kind):
    x = _rows(rng, np.float32)
    if kind == "stdin":
        src = StdinSource("float32", V_WIDE, stream=io.BytesIO(x.tobytes()))
    elif kind == "iterable":
        src = iter([x[:4], x[4:]])
    else:
        x = x.reshape(2, 3, V_WIDE)
        np.save(tmp_path / "x.npy", x)
        src = fl.open(tmp_path / "x.npy")
    want = fl.sample(x, top_k=100, top_p=0.9, seed=3)
    got = fl.sample(src, top_k=100, top_p=0.9, seed=3)
    assert got.shape == want.shape and len(wide_rows) == 6
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad, message", [
    (np.nan, "holds a NaN"), (np.inf, r"holds a \+inf logit"), (-np.inf, "has no possible token")])
def test_wide_rows_that_cannot_be_sampled(tmp_path, rng, small_budget, bad, message):
    x = _rows(rng, np.float32, rows=4)
    if bad == -np.inf:
        x[2] = -np.inf
    else:
        x[2, 777] = bad
    np.save(tmp_path / "x.npy", x)
    for kw in ({}, {"top_k": 5}, {"top_p": 0.5}):
        with pytest.raises(ValueError, match=message + r".*\(row 2\)"):
            fl.sample(x, seed=1, **kw)
        with pytest.raises(ValueError, match=message + r".*\(row 2\)"):
            fl.sample(fl.open(tmp_path / "x.npy"), seed=1, **kw)
    if bad == np.inf:                  # greedy rows take +inf: the first one wins, as argmax
        x[2, 900] = np.inf
        np.save(tmp_path / "x.npy", x)
        got = fl.sample(fl.open(tmp_path / "x.npy"), temperature=0)
        np.testing.assert_array_equal(got, fl.sample(x, temperature=0))
        assert got[2] == 777


def test_wide_sampling_memory_is_bounded(tmp_path, rng):
    """Rows of 2^19 float32 (2 MiB) under a 256 KiB budget, with every filter: the passes hold a chunk
    at a time (the in-memory sampler would take 2 MiB of row and 16 MiB of candidates a row; tracemalloc
    measures about 0.25 MiB)."""
    x = rng.standard_normal((2, 1 << 19)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    src = fl.open(tmp_path / "x.npy", memory="256KiB")
    gc.collect()                     # what earlier tests left is not this call's
    tracemalloc.start()
    try:
        got = fl.sample(src, top_k=5000, top_p=0.9, min_p=0.001, seed=9, num_samples=2, return_logprobs=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    want = fl.sample(x, top_k=5000, top_p=0.9, min_p=0.001, seed=9, num_samples=2, return_logprobs=True)
    np.testing.assert_array_equal(got[0], want[0])
    # (4 MiB: NumPy itself allocates about 1 MiB once after some thousands of array-interface calls)
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB under a 256 KiB budget"


# ---- beam search of sources -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["file", "stdin"])
@pytest.mark.parametrize("budget", ["64KiB", "256MiB"])
def test_beam_search_step_of_a_source(tmp_path, rng, kind, budget):
    W = 3
    x = _rows(rng, np.float32, rows=2 * W)
    scores = np.log(rng.dirichlet(np.ones(2 * W)))
    scores[4] = -np.inf                                    # a finished beam
    np.save(tmp_path / "x.npy", x)
    src = (fl.open(tmp_path / "x.npy", memory=budget) if kind == "file"
           else StdinSource("float32", V_WIDE, stream=io.BytesIO(x.tobytes())))
    src.memory = budget
    want = fl.beam_search_step(x, scores, W, temperature=0.8)
    got = fl.beam_search_step(src, scores, W, temperature=0.8)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    with pytest.raises(ValueError, match="beam_scores has shape"):
        fl.beam_search_step(StdinSource("float32", V_WIDE, stream=io.BytesIO(x.tobytes())), scores[:3], W)
    with pytest.raises(ValueError, match="not a multiple of beam_width=4"):
        fl.beam_search_step(fl.open(tmp_path / "x.npy"), scores, 4)


HF_CASES = [  # (probabilities, filters, the tokens Hugging Face's warpers keep)
    ([0.3, 0.1, 0.1, 0.5], {"top_p": 0.8}, [0, 3]),
    ([0.15, 0.3, 0.3, 0.25], {"top_p": 0.8}, [1, 2, 3]),
    ([0.4, 0.2, 0.2, 0.2], {"top_p": 0.5}, [0, 3]),                  # ties at the boundary: the last
    ([0.4, 0.2, 0.2, 0.2], {"top_p": 0.4}, [0]),
    ([0.5, 0.25, 0.125, 0.125], {"top_p": 0.75}, [0, 1]),            # a mass exactly at p reaches it
    ([0.125, 0.5, 0.125, 0.25], {"top_p": 0.625}, [1, 3]),
    ([0.9, 0.0274, 0.047, 0.0274], {"min_p": 0.05}, [0, 2]),
    ([0.97, 0.01, 0.01, 0.01], {"min_p": 0.05}, [0]),
    ([0.3, 0.2, 0.2, 0.2, 0.1], {"top_k": 2}, [0, 1, 2, 3]),          # ties with the k-th value
    ([0.3, 0.25, 0.25, 0.1, 0.1], {"top_k": 3, "top_p": 0.5}, [0, 2]),
    ([0.25, 0.25, 0.25, 0.25], {"top_p": 0.5}, [2, 3]),
    ([0.1, 0.15, 0.15, 0.15, 0.15, 0.3], {"top_k": 3, "top_p": 0.55}, [3, 4, 5]),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("probs, kw, keep", HF_CASES)
def test_hf_vectors_in_wide_rows(rng, dtype, probs, kw, keep):
    """Hugging Face's filter vectors spread over a wide row of impossible tokens, read in chunks: the
    tokens drawn are exactly those HF keeps."""
    V = 5003
    at = np.sort(rng.choice(V, len(probs), replace=False))
    x = np.full(V, -np.inf, dtype)
    x[at] = np.log(np.array(probs)).astype(dtype)
    status, tokens, _, _ = wide.sample_row(
        ArraySource(x[None]), temperature=1.0, softcap=0.0, top_k=kw.get("top_k", 0),
        top_p=kw.get("top_p", 1.0), min_p=kw.get("min_p", 0.0), seed=int(rng.integers(0, 2**63)), row_id=0,
        num_samples=3000, logprobs=False, cols=int(rng.integers(1, 2000)))
    assert status == wide.OK
    assert sorted(set(tokens.tolist())) == at[keep].tolist()


@pytest.mark.parametrize("kw", [{"top_p": 0.5}, {"min_p": 0.5}, {"top_k": 3, "top_p": 0.5}, {"top_k": 1}])
def test_a_filtered_token_never_wins_in_a_wide_row(kw):
    """Token 31 has the largest random word under this seed (tests/test_sampling.py) and lies below every
    filter's threshold: the wide-row passes never draw it either."""
    from tests.test_sampling import MAX_WORD_SEED, MAX_WORD_TOKEN

    x = np.zeros((1, V_WIDE), np.float32)
    x[0, 0], x[0, MAX_WORD_TOKEN] = 12.0, -5.0
    for cols in (7, 64, 4096):
        status, tokens, _, _ = wide.sample_row(
            ArraySource(x), temperature=1.0, softcap=0.0, top_k=kw.get("top_k", 0),
            top_p=kw.get("top_p", 1.0), min_p=kw.get("min_p", 0.0), seed=MAX_WORD_SEED, row_id=0,
            num_samples=1, logprobs=False, cols=cols)
        assert status == wide.OK and tokens[0] == 0, cols


def _sample_in_chunks(x, cols, **kw):
    """wide.sample_row of the 1-D row x read in chunks of cols columns, with every filter's default."""
    args = dict(temperature=1.0, softcap=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, row_id=0,
                num_samples=1, logprobs=False) | kw
    return wide.sample_row(ArraySource(x[None]), cols=cols, **args)


def test_wide_row_log_probabilities_at_huge_logits():
    """A wide row's log-probabilities are formed as log-softmax forms them, (x - m) - log s: exact at any
    m (a mutation audit: x - (m + log s) gave -0.375 at m = 1e15, where the answer is -0.3133)."""
    mpmath = pytest.importorskip("mpmath")
    x = np.array([1e15, 1e15 - 1.0])
    for kw in ({}, {"top_k": 2}):
        status, tokens, lp, _ = _sample_in_chunks(x, 1, seed=5, num_samples=8, logprobs=True, **kw)
        with mpmath.workdps(40):
            want = [float(-mpmath.log(1 + mpmath.exp(-1 if t == 0 else 1))) for t in tokens]
        assert status == wide.OK and set(tokens.tolist()) == {0, 1}
        np.testing.assert_allclose(lp, want, rtol=1e-15, atol=0)


def test_wide_rows_cut_top_p_ties_as_in_memory():
    """Top-p's tie cut in a wide row, as in memory and as Hugging Face keeps them (tests/test_sampling.py's
    rows; each a mutation audit's survivor): min-p's threshold above top-p's drops the cut (tokens 1
    and 2 lie exactly at it), in passes and on top-k's survivors; a top-k whose k-th value has ties left
    out of the k, of which top-p drops exactly one; and a boundary value one ulp below one whose key ends
    the last radix pass's top bucket (the mass above it counts that bucket)."""
    def support(x, cols, **kw):
        status, t, _, _ = _sample_in_chunks(x, cols, seed=3, num_samples=3000, **kw)
        assert status == wide.OK
        got = sorted(set(t.tolist()))
        assert got == sorted(set(fl.sample(np.tile(x, (3000, 1)), seed=3, **kw).ravel().tolist())), kw
        return got

    h, c = np.log(0.5), np.log(0.1)
    x = np.array([0.0, h, h, c, c, c, c, -5.0])
    assert support(x, 3, top_p=0.94) == [0, 1, 2, 4, 5, 6]
    assert support(x, 3, top_p=0.94, min_p=0.5) == [0, 1, 2]
    assert support(x, 64, top_k=7, top_p=0.94, min_p=0.5) == [0, 1, 2]
    assert support(x, 64, top_k=4, top_p=0.94) == [0, 1, 2, 4, 5, 6]
    a = np.array([0x3F800000 | 0x3FF], np.uint32).view(np.float32)[0]      # 1 + 1023 ulp: low 10 bits set
    b = np.nextafter(a, np.float32(-np.inf))
    assert support(np.array([a, b, b, b, b], np.float32), 2, top_p=0.5) == [0, 3, 4]


@pytest.mark.parametrize("kw", HUGE_KW, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain")
@pytest.mark.parametrize("name", list(HUGE_ROWS))
@pytest.mark.filterwarnings("error::RuntimeWarning")     # (the largest float64 as top-p's bound: no warning)
def test_near_equal_huge_logits_in_a_wide_row(name, kw):
    """Near-equal huge logits (tests/test_sampling.py): read in chunks, a wide row's draws (the passes,
    and top-k's survivors drawn in memory) compare the exact keys x + g too, as the in-memory sampler."""
    from tests.test_sampling import _ref_keep, key_argmax, np_gumbel

    x = HUGE_ROWS[name]
    keep = _ref_keep(x.astype(np.float64), kw.get("top_k"), kw.get("top_p"), kw.get("min_p"),
                     16 * np.finfo(x.dtype).eps)
    want = [key_argmax(x, np_gumbel(31, 0, s, np.arange(x.shape[0]))[2], keep) for s in range(30)]
    for cols in (1, 4, 64):
        status, tokens, _, _ = _sample_in_chunks(x, cols, seed=31, num_samples=30, **kw)
        assert status == wide.OK and tokens.tolist() == want, cols
    np.testing.assert_array_equal(fl.sample(x[None], seed=[31], num_samples=30, **kw)[0], want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_with_the_kth_value_across_chunks(rng, dtype):
    """A few k are found with the max in one pass, and top-p, min-p and the draw run on them in memory.
    Tokens tied with the k-th value that the chunks' top-k leave out still survive: one pass counts them
    for top-p's mass, and the draw runs in passes when they survive every filter. Rows of few levels
    put the k-th value's ties in many chunks; tokens, log-probabilities and ranks are the in-memory
    sampler's (on the k-th value, above it after top-p or min-p, and with ties that all fit)."""
    V, k = 4099, 37
    for _ in range(40):
        x = rng.integers(-3, 4, V).astype(dtype)
        x[rng.integers(0, V, 30)] = rng.standard_normal(30) + 3.5      # fewer than k above the levels
        x[rng.random(V) < 0.3] = -np.inf
        kw = dict(top_k=k, top_p=float(rng.choice([1.0, 0.95, 0.6, 0.2])),
                  min_p=float(rng.choice([0.0, 0.3])), temperature=float(rng.choice([1.0, 0.5])),
                  seed=int(rng.integers(0, 2**63)), num_samples=3, logprobs=True)
        cols = int(rng.integers(16 * k, 4 * 16 * k))
        status, tokens, lp, ranks = _sample_in_chunks(x, cols, **kw)
        want = fl.sample(x, top_k=k, top_p=kw["top_p"], min_p=kw["min_p"] or None,
                         temperature=kw["temperature"], seed=kw["seed"], num_samples=3, return_logprobs=True)
        assert status == wide.OK
        np.testing.assert_array_equal(tokens, want[0])
        assert_same_logprobs(lp, want[1], x, kw)
        np.testing.assert_array_equal(ranks, want[2])


def test_top_k_and_top_p_of_a_wide_row_read_it_once(rng, monkeypatch):
    """With a few k, top-k with top-p and min-p (and log-probabilities) read the row once, the passes'
    reading of a plain draw, where a radix select on the mass would read it three times more."""
    reads = []
    real = wide.column_chunks
    monkeypatch.setattr(wide, "column_chunks", lambda row, cols: reads.append(cols) or real(row, cols))
    x = rng.standard_normal(50021).astype(np.float32)
    kw = dict(top_k=50, top_p=0.9, min_p=0.01, seed=int(rng.integers(0, 2**63)), num_samples=4)
    status, tokens, lp, _ = _sample_in_chunks(x, 4096, logprobs=True, **kw)
    assert status == wide.OK and len(reads) == 1
    want = fl.sample(x, top_k=50, top_p=0.9, min_p=0.01, seed=kw["seed"], num_samples=4, return_logprobs=True)
    np.testing.assert_array_equal(tokens, want[0])
    assert_same_logprobs(lp, want[1], x, kw)
    reads.clear()
    assert _sample_in_chunks(x, 4096, seed=kw["seed"], num_samples=4)[0] == wide.OK and len(reads) == 2


@pytest.mark.parametrize("wide_budget", [True, False])
@pytest.mark.parametrize("name, value, message", [
    ("top_k", -5, "top_k must be >= 0"), ("top_p", 1.5, "top_p must be in"),
    ("min_p", -0.1, "min_p must be in"), ("temperature", -1.0, "temperature must be finite and >= 0"),
    ("seed", -3, "negative seed")])
def test_a_bad_per_row_argument_names_its_row_in_the_whole_source(tmp_path, rng, wide_budget, name, value,
                                                                   message):
    """A per-row argument is checked over the whole source before any row is read: the error names the
    row as in memory (blocks of rows, and wide rows, used to count from their own first row)."""
    x = rng.standard_normal((2, 3, 9000)).astype(np.float32)
    x[0, 0, 5] = np.nan                               # a bad row read before the bad argument's row
    np.save(tmp_path / "x.npy", x)
    defaults = {"top_k": 5, "top_p": 0.9, "min_p": 0.0, "temperature": 1.0, "seed": 7}
    arg = np.full((2, 3), defaults[name], dtype=np.int64 if name in ("top_k", "seed") else np.float64)
    arg[1, 1] = value
    kw = {name: arg} if name == "seed" else {name: arg, "seed": 7}
    src = fl.open(tmp_path / "x.npy", memory="64KiB" if wide_budget else "1MiB")
    for logits in (x, src):
        with pytest.raises(ValueError, match=message + r".*\(row \(1, 1\)\)"):
            fl.sample(logits, **kw)


def test_one_row_sources_name_no_row(tmp_path, rng):
    x = rng.standard_normal(V_WIDE).astype(np.float32)
    x[5] = np.nan
    np.save(tmp_path / "x.npy", x)
    for logits in (x, fl.open(tmp_path / "x.npy", memory="64KiB"), fl.open(tmp_path / "x.npy")):
        with pytest.raises(ValueError, match=r"holds a NaN$"):
            fl.sample(logits, seed=1)


def test_disabled_filters_take_no_scratch(tmp_path, rng, wide_rows):
    """top_p=1 and top_k=0 or >= V filter nothing: rows that fit the budget without the top-k/top-p
    scratch stay in row blocks (the wide-row passes are slower)."""
    x = rng.standard_normal((4, 3000)).astype(np.float32)      # 24 KB a row with its two buffers
    np.save(tmp_path / "x.npy", x)
    src = fl.open(tmp_path / "x.npy", memory="64KiB")
    for kw in ({"top_p": 1.0}, {"top_k": 0}, {"top_k": np.full(4, 3000)}, {"top_p": 1.0, "top_k": 10**9}):
        np.testing.assert_array_equal(fl.sample(src, seed=2, **kw), fl.sample(x, seed=2, **kw))
    assert wide_rows == []
    fl.sample(src, seed=2, top_p=0.9)                           # 120 KB a row with the scratch
    assert len(wide_rows) == 4


@pytest.mark.parametrize("budget", ["64KiB", "256MiB"])
def test_per_row_arguments_broadcast_as_in_memory(tmp_path, rng, budget):
    """Per-row arguments broadcast to the leading shape by NumPy's rules, streamed (rows in blocks, or wide
    rows under a small budget) as in memory: shape (3,) or (1,) for a (2, 3) leading shape, and bfloat16 or
    float16 values (read as float32). The same tokens and log-probabilities."""
    x = rng.standard_normal((2, 3, V_WIDE)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cases = (dict(temperature=np.array([0.5, 1.0, 2.0]), top_k=np.array([3, 0, 50])),
             dict(top_p=np.array([0.9]), min_p=np.array([[0.05], [0.0]])),
             dict(temperature=np.array([0.75, 1.5], BF16)[:, None],
                  top_p=np.array([0.5, 0.9, 1.0], np.float16)))
    for kw in cases:
        want = fl.sample(x, seed=11, num_samples=2, return_logprobs=True, **kw)
        as_f64 = {k: v if k == "top_k" else np.asarray(v, np.float64) for k, v in kw.items()}
        np.testing.assert_array_equal(fl.sample(x, seed=11, num_samples=2, **as_f64), want[0])
        got = fl.sample(fl.open(tmp_path / "x.npy", memory=budget), seed=11, num_samples=2,
                        return_logprobs=True, **kw)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=2e-6)
    with pytest.raises(ValueError, match=r"top_k must be a scalar or one value per row \(an array that "
                                         r"broadcasts to the leading shape \(2, 3\)\), got shape \(2,\)"):
        fl.sample(fl.open(tmp_path / "x.npy", memory=budget), top_k=np.array([1, 2]), seed=0)
    with pytest.raises(ValueError, match=r"seed must have one value per row \(shape \(2, 3\)\)"):
        fl.sample(fl.open(tmp_path / "x.npy", memory=budget), seed=np.arange(3), num_samples=1)


def test_a_bad_scalar_argument_is_shown_as_given(rng):
    """A scalar temperature, top_k or top_p of the wrong type is named as the caller gave it, on a source as
    in memory (a source showed it as a 0-d array: array('1', dtype='<U1'); found by an error-parity
    audit)."""
    x = rng.standard_normal((3, 5)).astype(np.float32)
    for kw, shown in ((dict(temperature="1"), "'1'"), (dict(top_k=2.5), "2.5"), (dict(top_k=True), "True"),
                      (dict(top_p="0.5"), "'0.5'")):
        messages = []
        for logits in (x, fl.open(x)):
            with pytest.raises(TypeError) as e:
                fl.sample(logits, seed=1, **kw)
            messages.append(str(e.value))
        assert messages[0] == messages[1] and messages[0].endswith(f"got {shown}"), messages
