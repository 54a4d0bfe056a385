"""Seeded sampling and beam search: exact distributions (chi-square against float64 filtered probabilities),
Hugging Face's filter semantics and test vectors, reproducibility (threads, chunk sizes, batch composition),
the documented random-number scheme (an independent NumPy Philox), edge rows and argument errors."""

import os
import platform
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlogits
from fastlogits.ops.sampling import beam_search_step, sample
from tests.helpers import cpu_flags
from tests.reference import row_scale
from tests.tolerances import assert_close, log_tol

BF16 = np.dtype(ml_dtypes.bfloat16)
P_MIN = 1e-4          # chi-square p-value below which a test fails
N_DRAWS = 20000       # draws per goodness-of-fit test (rows of the same logits, one scalar seed)


# ------------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------------

def _softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x)
    e = np.exp(x - m)
    return e / e.sum()


def _hf_above(x):
    """For each token, the probability mass after it in Hugging Face's top-p order (a stable ascending
    sort: the larger values, and the tokens tied with it that come later), which must stay below p."""
    p, i = _softmax(x), np.arange(len(x))
    return np.array([p[(x > v) | ((x == v) & (i > j))].sum() for j, v in enumerate(x)])


def ref_probs(x, temperature=1.0, top_k=None, top_p=None, min_p=None, tol=1e-12):
    """Exact float64 probabilities of one row after Hugging Face's warpers in order (temperature, top-k,
    top-p, min-p): top-k keeps every token tied with the k-th value, top-p of the tokens tied at its
    boundary the last ones it needs (HF's stable sort); a top-p mass within tol of top_p reaches it (the
    sampler's documented tolerance is 16 eps of its compute type)."""
    x = np.asarray(x, np.float64) / temperature
    if top_k is not None and 0 < top_k < len(x):
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p is not None and top_p < 1:
        x = np.where(_hf_above(x) < top_p - tol, x, -np.inf)
    if min_p is not None and min_p > 0:
        p = _softmax(x)
        x = np.where(p >= min_p * p.max(), x, -np.inf)
    return _softmax(x)


def chi_square_ok(tokens, probs):
    """Draws never hit a zero-probability token, and their counts fit probs (bins of small expectation
    merged)."""
    stats = pytest.importorskip("scipy.stats")
    tokens = np.asarray(tokens).ravel()
    counts = np.bincount(tokens, minlength=len(probs))
    drawn_out = np.flatnonzero((probs == 0) & (counts > 0))
    assert drawn_out.size == 0, f"filtered tokens drawn: {drawn_out}"
    exp = probs * len(tokens)
    big = exp >= 5
    obs = list(counts[big]) + ([counts[~big].sum()] if np.any(~big & (probs > 0)) else [])
    ex = list(exp[big]) + ([exp[~big].sum()] if np.any(~big & (probs > 0)) else [])
    if len(obs) < 2:      # one bin of every possible token: the check above was the whole test
        return
    pval = stats.chisquare(obs, np.array(ex) * (np.sum(obs) / np.sum(ex))).pvalue
    assert pval > P_MIN, (f"chi-square p-value {pval:.3g}: counts {counts.tolist()} vs expected "
                          f"{exp.round(1).tolist()}")


def key_argmax(xs, g, keep=None):
    """The documented draw: the first index of the largest exact sum xs + g over keep (xs the values in
    the compute type, g the noise), compared exactly (Python fractions) among the tokens whose rounded
    sums lie within a few ulp of the largest; 0 when no token can win (as np.argmax of all -inf)."""
    xs = np.asarray(xs, np.float64)
    s = np.where(True if keep is None else keep, xs + g, -np.inf)
    top = np.max(s)
    if not np.isfinite(top):
        return 0
    with np.errstate(over="ignore"):                     # (-inf below the most negative float64)
        cand = np.flatnonzero((s >= top - 8 * np.finfo(np.float64).eps * abs(top)) & (s > -np.inf))
    sums = [Fraction(float(xs[i])) + Fraction(float(g[i])) for i in cand]
    return int(cand[sums.index(max(sums))])


# An independent NumPy implementation of the documented generator (fastlogits_sample.h).
M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def np_philox(c0, c1, c2, c3, k0, k1):
    c = [np.asarray(v, np.uint64) & 0xFFFFFFFF for v in np.broadcast_arrays(c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = c[0] * np.uint64(M0)
        p1 = c[2] * np.uint64(M1)
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & np.uint64(0xFFFFFFFF),
             (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & np.uint64(0xFFFFFFFF)]
        k0 = (k0 + np.uint64(W0)) & np.uint64(0xFFFFFFFF)
        k1 = (k1 + np.uint64(W1)) & np.uint64(0xFFFFFFFF)
    return np.stack(c)


def np_gumbel(seed, row, s, tokens):
    t = np.asarray(tokens, np.uint64)
    ctr = ((t >> np.uint64(6)) << np.uint64(4)) | (t & np.uint64(15))
    word = ((t >> np.uint64(4)) & np.uint64(3)).astype(np.int64)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    c3 = (row >> 32) << 1
    hi = np_philox(ctr, s, row & 0xFFFFFFFF, c3, k0, k1)[word, np.arange(len(t))]
    lo = np_philox(ctr, s, row & 0xFFFFFFFF, c3 | 1, k0, k1)[word, np.arange(len(t))]
    k = (hi << np.uint64(20)) | (lo >> np.uint64(12))
    u = (2 * k + 1).astype(np.float64) * 2.0**-53
    return hi, lo, -np.log(-np.log(u))


# ------------------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------------------

def test_philox_known_answers():
    from fastlogits.cpu import _sample
    assert _sample.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _sample.philox4x32_10((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == (
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert _sample.philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
                                 (0xA4093822, 0x299F31D0)) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)
    out = np_philox(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert out.ravel().tolist() == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("seed,row,s", [(0, 0, 0), (2**64 - 1, 5, 3), (123456789, 2**33 + 7, 1)])
def test_noise_matches_documented_scheme(seed, row, s):
    from fastlogits.cpu import _sample
    tokens = np.array([0, 1, 15, 16, 63, 64, 1000, 128255, 2**31 + 5], np.int64)
    hi, lo, g = _sample.noise(seed, row, s, tokens)
    nhi, nlo, ng = np_gumbel(seed, row, s, tokens)
    np.testing.assert_array_equal(hi, nhi)
    np.testing.assert_array_equal(lo, nlo)
    np.testing.assert_array_equal(g, ng)


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8}, {"min_p": 0.05},
                                {"top_k": 40, "top_p": 0.9, "min_p": 0.01},
                                {"top_p": 0.5, "temperature": 3.0}, {"top_k": 700, "top_p": 0.97}])
@pytest.mark.parametrize("V,dtype", [(300, np.float32), (5000, np.float32), (1000, np.float64)])
def test_tokens_are_the_argmax_of_logits_plus_documented_noise(rng, kw, V, dtype):
    """The sampler's choice is exactly argmax(x / T + g) over the survivors, g from the documented
    generator: what a port (the GPU backend) must reproduce."""
    rows = 6
    x = (rng.standard_normal((rows, V)) * 2).astype(dtype)
    seed = int(rng.integers(0, 2**63))
    got = sample(x, seed=seed, chunk_size=1000, **kw)
    T = kw.get("temperature", 1.0)
    for i in range(rows):
        xs = (x[i] / dtype(T)).astype(np.float64)       # in the compute dtype, as the kernel
        keep = ref_probs(xs, 1.0, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"),
                         tol=16 * np.finfo(dtype).eps) > 0
        _, _, g = np_gumbel(seed, i, 0, np.arange(V))
        assert got[i] == key_argmax(xs, g, keep), i


def exactness_case(data, max_V=200, chunks=(None, 7, 64)):
    """One case of the exactness property, drawn by Hypothesis: a row (with ties and -inf) of float32 or
    float64, a temperature, filters, a seed and a chunk size; returns (kwargs for sample, the token the
    documented generator and the reference filters give)."""
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    V = data.draw(st.integers(1, max_V))
    levels = data.draw(st.sampled_from([None, 3, 8]))      # few distinct values: many ties
    if levels is None:
        x = np.array(data.draw(st.lists(st.floats(-30, 30, width=32), min_size=V, max_size=V)), dtype)
    else:
        x = np.array(data.draw(st.lists(st.integers(0, levels), min_size=V, max_size=V)), dtype) * 0.7
    if V > 1 and data.draw(st.booleans()):
        x[data.draw(st.integers(0, V - 2))] = -np.inf
    T = data.draw(st.sampled_from([1.0, 0.5, 2.0]))
    kw = {"top_k": data.draw(st.sampled_from([None, 1, 2, 5, 50])),
          "top_p": data.draw(st.sampled_from([None, 0.2, 0.5, 0.9, 0.99])),
          "min_p": data.draw(st.sampled_from([None, 0.01, 0.2, 0.7]))}
    seed = data.draw(st.integers(0, 2**64 - 1))
    chunk = data.draw(st.sampled_from(chunks))
    xs = (x / dtype(T)).astype(np.float64)
    keep = _ref_keep(xs, kw["top_k"], kw["top_p"], kw["min_p"], 16 * np.finfo(dtype).eps)
    _, _, g = np_gumbel(seed, 0, 0, np.arange(V))
    want = key_argmax(xs, g, keep)
    return dict(logits=x, temperature=T, seed=seed, chunk_size=chunk, **kw), want


@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_exactness_property(data):
    """Random rows (with ties and -inf), dtypes and filters: the token is the argmax of x / T + g over
    exactly the survivors of the reference filters."""
    kw, want = exactness_case(data)
    assert int(sample(**kw)) == want


def _ref_keep(x, top_k, top_p, min_p, tol):
    """The survivors of HF's filters (top-k's boundary ties kept, top-p's last ones it needs), p's
    tolerance as documented."""
    if top_k is not None and 0 < top_k < len(x):
        x = np.where(x < np.sort(x)[::-1][top_k - 1], -np.inf, x)
    if top_p is not None and top_p < 1:
        x = np.where(_hf_above(x) < max(top_p - tol, top_p / 2), x, -np.inf)
    if min_p is not None and min_p > 0:
        with np.errstate(invalid="ignore"):       # (x - max exact: x near the max, or far below log(min_p))
            x = np.where(x - np.max(x) >= np.log(min_p), x, -np.inf)
    return x > -np.inf


# ------------------------------------------------------------------------------------------------------
# Exact distributions
# ------------------------------------------------------------------------------------------------------

CONFIGS = [
    {},
    {"temperature": 0.6},
    {"temperature": 2.5},
    {"top_k": 4},
    {"top_p": 0.7},
    {"min_p": 0.15},
    {"top_k": 6, "top_p": 0.8},
    {"top_k": 8, "min_p": 0.1},
    {"top_p": 0.85, "min_p": 0.05},
    {"temperature": 0.8, "top_k": 7, "top_p": 0.9, "min_p": 0.03},
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_goodness_of_fit(rng, kw):
    V = 12
    x = rng.standard_normal(V) * 1.5
    x32 = x.astype(np.float32)
    probs = ref_probs(x32.astype(np.float64), kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p"),
                      kw.get("min_p"), tol=16 * np.finfo(np.float32).eps)
    tokens = sample(np.tile(x32, (N_DRAWS, 1)), seed=int(rng.integers(2**62)), **kw)
    chi_square_ok(tokens, probs)


def test_goodness_of_fit_float64_and_num_samples(rng):
    x = rng.standard_normal(9)
    kw = {"temperature": 0.9, "top_p": 0.75}
    tokens = sample(np.tile(x, (N_DRAWS // 4, 1)), seed=7, num_samples=4, **kw)
    assert tokens.shape == (N_DRAWS // 4, 4)
    probs = ref_probs(x, **kw, tol=16 * np.finfo(np.float64).eps)
    chi_square_ok(tokens, probs)
    # one row, many samples: the samples of a row are independent draws too
    chi_square_ok(sample(x, seed=8, num_samples=N_DRAWS, **kw), probs)


@pytest.mark.parametrize("kw", [{"top_p": 0.9}, {"top_p": 0.3}, {"min_p": 0.02}, {"top_k": 30}, {},
                                {"top_k": 1500, "top_p": 0.8}, {"top_p": 0.95, "min_p": 0.001}])
def test_goodness_of_fit_long_row(rng, kw):
    """A vocabulary of several chunks (the streaming paths), bucketed by probability."""
    stats = pytest.importorskip("scipy.stats")
    V, n = 3000, 6000
    x = (rng.standard_normal(V) * 2.5).astype(np.float32)
    probs = ref_probs(x.astype(np.float64), 1.0, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"),
                      tol=16 * np.finfo(np.float32).eps)
    tokens = sample(np.tile(x, (n, 1)), seed=int(rng.integers(2**62)), chunk_size=1000, **kw)
    assert np.all(probs[tokens] > 0)
    # buckets of tokens by decreasing probability, each of expected count >= 50
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order]) * n
    bucket = np.minimum((cum // 50).astype(int), int(cum[-1] // 50) - 1)
    bucket = np.unique(bucket, return_inverse=True)[1]
    bucket_of = np.empty(V, int)
    bucket_of[order] = bucket
    nb = bucket.max() + 1
    if nb == 1:                 # one bucket (top-p kept a token or two): the support check is the test
        return
    obs = np.bincount(bucket_of[tokens], minlength=nb)
    ex = np.bincount(bucket_of, weights=probs * n, minlength=nb)
    assert stats.chisquare(obs, ex * obs.sum() / ex.sum()).pvalue > P_MIN


# ------------------------------------------------------------------------------------------------------
# Hugging Face semantics
# ------------------------------------------------------------------------------------------------------

def support(x, draws=4000, **kw):
    """The tokens that ever get drawn from row x."""
    t = sample(np.tile(x, (draws, 1)), seed=11, **kw)
    return sorted(set(np.asarray(t).ravel().tolist()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hf_top_p_vectors(dtype):
    dist = np.log(np.array([[0.3, 0.1, 0.1, 0.5], [0.15, 0.3, 0.3, 0.25]])).astype(dtype)
    assert support(dist[0], top_p=0.8) == [0, 3]
    assert support(dist[1], top_p=0.8) == [1, 2, 3]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hf_min_p_vectors(dtype):
    dist = np.log(np.array([[0.9, 0.0274, 0.047, 0.0274], [0.15, 0.3, 0.3, 0.25], [0.97, 0.01, 0.01, 0.01]]))
    dist = dist.astype(dtype)
    assert support(dist[0], min_p=0.05) == [0, 2]
    assert support(dist[1], min_p=0.05) == [0, 1, 2, 3]
    assert support(dist[2], min_p=0.05) == [0]


def test_top_k_keeps_ties_at_the_kth_value():
    x = np.array([3.0, 2.0, 1.0, 2.0, 0.5, 2.0, -1.0], np.float32)
    t = sample(np.tile(x, (N_DRAWS, 1)), top_k=2, seed=3)
    chi_square_ok(t, ref_probs(x, top_k=2))
    assert sorted(set(t.tolist())) == [0, 1, 3, 5]
    # ties decided late in a long row (the k-th value changes while streaming)
    x = np.zeros(5000, np.float32)
    x[[10, 4000]] = 1.0
    x[[5, 700, 2500, 4999]] = 0.5
    assert support(x, draws=3000, top_k=4, chunk_size=256) == [5, 10, 700, 2500, 4000, 4999]


def test_top_p_keeps_the_last_of_the_tokens_tied_at_its_boundary():
    """Of the tokens tied at the nucleus' boundary, top-p keeps as many as the mass needs, the last ones,
    as Hugging Face's TopPLogitsWarper does (a stable ascending sort drops the first): the smallest
    nucleus. It kept all of them (found by a sampling audit: 4 tokens of 0.25 at top_p=0.5). Its test
    vectors (REFERENCES.md) too, and with top-k, min-p and every path: a row split over threads, and
    rows through the log-probabilities' pass."""
    x = np.log(np.array([0.4, 0.2, 0.2, 0.2]))
    assert support(x, top_p=0.5) == [0, 3]
    assert support(x, top_p=0.7) == [0, 2, 3]
    assert support(x, top_p=0.4) == [0]
    assert support(np.log(np.full(4, 0.25)), top_p=0.5) == [2, 3]
    assert support(np.log(np.full(4, 0.25)), top_p=0.2) == [3]
    assert support(np.log([0.5, 0.25, 0.125, 0.125]), top_p=0.8) == [0, 1, 3]
    hf = np.log(np.array([[0.3, 0.1, 0.1, 0.5], [0.15, 0.3, 0.3, 0.25]]))
    assert support(hf[0], top_p=0.8) == [0, 3] and support(hf[1], top_p=0.8) == [1, 2, 3]
    x = np.log(np.array([0.1, 0.15, 0.15, 0.15, 0.15, 0.3]))     # top-k keeps all ties, top-p two of them
    assert support(x, top_k=3, top_p=0.55) == [3, 4, 5]
    assert support(x, top_k=3, top_p=0.55, min_p=0.4) == [3, 4, 5]
    assert support(x, top_p=0.55, min_p=0.6) == [5]
    # min-p's threshold above top-p's drops top-p's cut: tokens 1 and 2 lie exactly at it (0.5 of the max)
    # and survive, though top-p alone cut its ties from token 4 on (a mutation audit: a stale cut kept [0]
    # or [0, 2])
    h, c = np.log(0.5), np.log(0.1)
    x = np.array([0.0, h, h, c, c, c, c, -5.0])
    assert support(x, top_p=0.94) == [0, 1, 2, 4, 5, 6]
    for kw in ({}, {"top_k": 7}, {"threads": 2, "chunk_size": 2}):
        assert support(x, top_p=0.94, min_p=0.5, **kw) == [0, 1, 2], kw
    # min-p's threshold exactly at top-p's (log 0.5 below a max of 0: equal, not above) leaves top-p's cut
    # alone (a mutation audit: >= dropped the cut and kept every tie)
    x = np.array([0.0, h, h, h])
    for kw in ({}, {"top_k": 3}):
        assert support(x, top_p=0.5, min_p=0.5, **kw) == [0, 3], kw
    # a float32 nucleus short of top_p by 8 eps32 reaches it (the slack is 16 of the compute type's eps, not
    # float64's: a mutation audit), where HF's float32 cumsum keeps token 1 too (README: Sampling)
    assert support(np.log(np.array([0.5, 0.3, 0.2])).astype(np.float32), top_p=0.5 + 8 * 2.0**-23) == [0]
    q = np.log(0.25)                              # and on top-k's candidates (fl__filter_threshold)
    x = np.array([0.0, 0.0] + [q] * 8 + [-30.0, -30.0], np.float32)
    assert support(x, top_k=10, top_p=0.5 + 8 * 2.0**-23) == [0, 1]
    # the goal: top_p less the slack, never below top_p / 2, and 1 (no top-p) stays 1 (the GPU's and wide
    # rows' filters run on it as given)
    from fastlogits.cpu import _sample
    eps = 2.0**-23
    np.testing.assert_array_equal(_sample.topp_goal(np.array([1.0, 0.5, 16 * eps]), eps),
                                  [1.0, 0.5 - 16 * eps, 8 * eps])
    assert _sample.topp_goal(1.0, eps) == 1.0
    # a row tied at the lowest finite value but for a -inf: the -inf is no tie (HF keeps the last two)
    f32min = np.finfo(np.float32).min
    assert support(np.array([-np.inf, f32min, f32min, f32min, f32min], np.float32), top_p=0.5) == [3, 4]
    for dtype in (np.float16, np.float32, np.float64):
        xs = np.log(np.full((1, 1000), 1e-3)).astype(dtype)          # 1000 ties; threads=2 splits the row
        for kw in ({}, {"threads": 2}, {"return_logprobs": True}, {"top_k": 700}):
            got = sample(xs, top_p=0.3, seed=2, num_samples=4000, **kw)
            t = got[0] if isinstance(got, tuple) else got
            assert t.min() == 700 and np.unique(t).size == 300, (dtype, kw)
            if isinstance(got, tuple):
                np.testing.assert_allclose(got[1], np.log(1 / 300), rtol=1e-5)


# A seed under which token 31 of row 0, sample 0, has the largest high random word, 2^32 - 1 (found by a
# search over seeds with a C program on fastlogits.h): its Gumbel noise may reach 36.7, and the sampler's
# conservative test cannot rule it out by its word, only by the filters' threshold.
MAX_WORD_SEED, MAX_WORD_TOKEN = 39896521, 31


def test_the_largest_random_word_is_documented():
    from fastlogits.cpu import _sample
    hi, _, g = _sample.noise(MAX_WORD_SEED, 0, 0, np.array([MAX_WORD_TOKEN], np.int64))
    assert hi[0] == 2**32 - 1
    np.testing.assert_array_equal(np_gumbel(MAX_WORD_SEED, 0, 0, [MAX_WORD_TOKEN])[0], hi)
    assert g[0] > 20


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [{"top_p": 0.5}, {"min_p": 0.5}, {"top_p": 0.9, "min_p": 0.3}, {"top_k": 1},
                                {"top_k": 3, "top_p": 0.5}])
@pytest.mark.parametrize("V", [64, 70001])
def test_a_filtered_token_never_wins_with_the_largest_word(dtype, kw, V):
    """Token 31 lies far below the threshold of every filter here, and its noise (> 20) would beat the
    only survivor's: it must never be drawn (it was, by top-p and min-p, with probability 2 / 2^32 per
    filtered token and draw). The one row is also drawn split over column ranges (threads=2)."""
    x = np.zeros(V, dtype)
    x[0], x[MAX_WORD_TOKEN] = 12.0, -5.0          # token 0 holds most of the mass
    keep = ref_probs(x, 1.0, kw.get("top_k"), kw.get("top_p"), kw.get("min_p")) > 0
    assert keep[0] and not keep[MAX_WORD_TOKEN]
    for threads in (1, 2):
        for chunk in (None, 16, 100):
            t = int(sample(x, seed=MAX_WORD_SEED, threads=threads, chunk_size=chunk, **kw))
            assert keep[t], (threads, chunk, t)


def test_filters_compose_in_hf_order():
    # top-p applies to the top-k-renormalised distribution: with top_k=2 the two best hold 0.4/0.7 and
    # 0.3/0.7, so top_p=0.5 keeps only the first; on the full distribution it would keep two
    x = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    assert support(x, top_k=2, top_p=0.5) == [0]
    assert support(x, top_p=0.5) == [0, 1]
    # min-p after top-p: the ratio to the top token does not change when renormalising
    assert support(x, top_p=0.95, min_p=0.3) == [0, 1, 2]


# ------------------------------------------------------------------------------------------------------
# Reproducibility
# ------------------------------------------------------------------------------------------------------

def assert_same_logprobs(got, want, x, kw):
    """Two runs' log-probabilities agree up to rounding: each is x/T - lse with lse summed in its own order
    (chunks, threads), so they may differ by the contract's tolerance twice over, which scales with the row's
    ``max|x/T|``: an absolute 1e-6 failed at lse = 24.4, 0.55 of its float32 ulp apart."""
    scale = row_scale(x, temperature=kw.get("temperature", 1.0))
    assert_close(got, want, 2 * log_tol(x.dtype, want, scale[..., None]), what="log-probs")


REPRO = [{}, {"temperature": 0.5}, {"top_k": 20}, {"top_p": 0.9}, {"min_p": 0.05},
         {"top_k": 50, "top_p": 0.95, "min_p": 0.01}]


@pytest.mark.parametrize("kw", REPRO, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_same_tokens_whatever_threads_and_chunks(rng, kw):
    x = (rng.standard_normal((16, 2000)) * 3).astype(np.float32)
    x[3, 100:300] = -np.inf
    want = sample(x, seed=42, num_samples=3, return_logprobs=True, **kw)
    for threads in (1, 2, 3):
        for chunk in (7, 64, 100, None):
            got = sample(x, seed=42, num_samples=3, return_logprobs=True, threads=threads, chunk_size=chunk,
                         **kw)
            np.testing.assert_array_equal(got[0], want[0])       # tokens and ranks: exactly
            np.testing.assert_array_equal(got[2], want[2])
            assert_same_logprobs(got[1], want[1], x, kw)
    # non-contiguous and negative strides, and other leading shapes
    xf = np.asfortranarray(x)
    np.testing.assert_array_equal(sample(xf, seed=42, **kw), want[0][:, 0])
    xr = x[:, ::-1].copy()[:, ::-1]
    np.testing.assert_array_equal(sample(xr, seed=42, **kw), want[0][:, 0])
    np.testing.assert_array_equal(sample(x.reshape(4, 4, -1), seed=42, **kw), want[0][:, 0].reshape(4, 4))
    # sample 0 of many is the single sample
    np.testing.assert_array_equal(sample(x, seed=42, **kw), want[0][:, 0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16], ids=["float32", "float64", "bfloat16"])
def test_a_top_p_at_its_rounding_edge_draws_the_same_tokens_whatever_the_chunk(rng, dtype):
    """Each row's top_p puts the mass of its top j tokens at the edge of top-p's slack (16 eps): whether
    they reach it is decided within rounding, so by how the masses were added. Their sums took the chunk
    size's order (tables indexed within a chunk, and the logsumexp's chunk-by-chunk s as the whole),
    and the tokens drawn changed with it: 902 of 4000 such rows between chunks of 1, 2, 3, 7 and the
    default (an invariance audit; API.md promises the same tokens whatever the chunk size)."""
    eps = 2.0 ** (-52 if dtype == np.float64 else -23)
    for V, digits, R in ((3, 2, 200), (17, 2, 200), (40, 2, 200), (3000, 1, 600)):   # (3000: buckets of many)
        x = np.round(rng.standard_normal((R, V)) * 2, digits).astype(dtype)
        xf = x.astype(np.float64)
        p = np.exp(xf - xf.max(1, keepdims=True))
        cum = np.cumsum(-np.sort(-p / p.sum(1, keepdims=True), 1), 1)
        j = rng.integers(0, V - 1, R)
        slack = 16 * eps * rng.choice([1, 1, 1 + 1e-3, 1 - 1e-3, 1 + 1e-2, 1 - 1e-2], R)
        top_p = np.minimum(cum[np.arange(R), j] + slack, 1.0)
        want = sample(x, top_p=top_p, seed=7, num_samples=4, return_logprobs=True)
        for threads, chunk in ((1, 1), (2, 2), (1, 3), (2, 7), (2, None)):
            got = sample(x, top_p=top_p, seed=7, num_samples=4, return_logprobs=True, threads=threads,
                         chunk_size=chunk)
            np.testing.assert_array_equal(got[0], want[0], err_msg=f"V={V} chunk={chunk}")
            assert_same_logprobs(got[1], want[1], x, {})      # the same nucleus, its sum in its own order


@pytest.mark.parametrize("kw", REPRO, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16], ids=["float32", "float64", "bfloat16"])
def test_few_long_rows_split_over_threads(rng, kw, dtype):
    """Fewer rows than threads: a row's draws (and log-probability passes) run over column ranges on
    several threads, merged in order: the tokens and ranks of one thread, exactly."""
    x = (rng.standard_normal((2, 3000)) * 3).astype(dtype)
    x[1, 500:900] = -np.inf
    want = sample(x, seed=7, num_samples=3, return_logprobs=True, threads=1, chunk_size=64, **kw)
    for threads in (2, 3, 5, 8):
        for chunk in (64, 100):
            got = sample(x, seed=7, num_samples=3, return_logprobs=True, threads=threads, chunk_size=chunk,
                         **kw)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[2], want[2])
            assert_same_logprobs(got[1], want[1], x, kw)
            np.testing.assert_array_equal(sample(x[1:], seed=[7], threads=threads, chunk_size=chunk, **kw),
                                          sample(x[1:], seed=[7], threads=1, **kw))


@pytest.mark.parametrize("bad", ["nan", "posinf", "both", "all_neg_inf"])
def test_bad_long_row_split_over_threads(bad):
    """A row drawn by column ranges reports what a single pass reports: a NaN before a +inf, wherever
    they sit."""
    x = np.zeros(5000, np.float32)
    if bad in ("nan", "both"):
        x[4500] = np.nan
    if bad in ("posinf", "both"):
        x[10] = np.inf
    if bad == "all_neg_inf":
        x[:] = -np.inf
    want = {"nan": "holds a NaN", "both": "holds a NaN", "posinf": r"holds a \+inf",
            "all_neg_inf": "no possible token"}[bad]
    for threads in (1, 4):
        for kw in ({}, {"min_p": 0.1}):
            with pytest.raises(ValueError, match=want):
                sample(x, seed=1, threads=threads, chunk_size=64, **kw)


def test_per_row_seeds_make_rows_batch_invariant(rng):
    x = (rng.standard_normal((10, 500)) * 2).astype(np.float32)
    seeds = rng.integers(0, 2**62, 10)
    kw = {"top_k": 30, "top_p": 0.9}
    full = sample(x, seed=seeds, **kw)
    for i in range(10):
        assert sample(x[i:i + 1], seed=seeds[i:i + 1], **kw)[0] == full[i]
    perm = rng.permutation(10)
    np.testing.assert_array_equal(sample(x[perm], seed=seeds[perm], **kw), full[perm])
    # the row id: with one scalar seed, row i differs from row 0 of a 1-row batch with the same seed
    same = sample(np.tile(x[0], (200, 1)), seed=5)
    assert len(set(same.tolist())) > 1


def test_per_row_seeds_as_python_ints_past_int64(rng):
    """A list of Python ints with some past int64 ([2**63, 5]: NumPy makes it float64, losing bits) is
    taken exactly, as the uint64 array of the same seeds; out-of-range ones name their row. A list of
    per-row top_k past int64 is "no top-k" there, as the scalar is."""
    x = (rng.standard_normal((4, 300)) * 3).astype(np.float32)
    seeds = [2**64 - 1, int(rng.integers(0, 2**62)), 2**63 + int(rng.integers(0, 2**62)), 2**63 + 1]
    want = sample(x, seed=np.array(seeds, np.uint64))
    np.testing.assert_array_equal(sample(x, seed=seeds), want)
    np.testing.assert_array_equal(sample(x, seed=tuple(seeds)), want)
    # the lowest bit matters: 2**63 + 1 as float64 would be 2**63
    u = np.zeros((1, 300), np.float32)
    assert not np.array_equal(sample(u, seed=[2**63 + 1], num_samples=64),
                              sample(u, seed=[2**63], num_samples=64))
    with pytest.raises(ValueError, match=r"in \[0, 2\*\*64\), got 18446744073709551616 \(row 2\)"):
        sample(x, seed=[1, 2**63, 2**64, 3])
    with pytest.raises(TypeError, match="seed"):
        sample(x, seed=[2**63, 1.0, 2, 3])
    ks = [2**70, 3, 2**64, 7]
    np.testing.assert_array_equal(sample(x, seed=5, top_k=ks), sample(x, seed=5, top_k=[0, 3, 0, 7]))


def test_seed_none_draws_fresh_randomness():
    x = np.zeros((50, 1000), np.float32)
    a, b = sample(x), sample(x)
    assert not np.array_equal(a, b)
    assert np.array_equal(sample(x, seed=3), sample(x, seed=3))
    assert not np.array_equal(sample(x, seed=3), sample(x, seed=4))


# ------------------------------------------------------------------------------------------------------
# Per-row parameters, log-probabilities
# ------------------------------------------------------------------------------------------------------

def test_per_row_parameters_match_single_rows(rng):
    rows = 8
    x = (rng.standard_normal((rows, 400)) * 2).astype(np.float32)
    T = np.array([0, 0.5, 1, 1.5, 0.8, 1, 1, 0.7])
    k = np.array([0, 5, 0, 50, 400, 1, 0, 10])
    p = np.array([1, 0.9, 0.5, 1, 0.7, 0.9, 1, 0.95])
    mp = np.array([0, 0, 0.1, 0.05, 0, 0, 0.3, 0.02])
    seeds = np.arange(100, 100 + rows)
    got, lp, rk = sample(x, temperature=T, top_k=k, top_p=p, min_p=mp, seed=seeds, return_logprobs=True)
    for i in range(rows):
        one = sample(x[i], temperature=T[i], top_k=int(k[i]), top_p=p[i], min_p=mp[i], seed=int(seeds[i]),
                     return_logprobs=True)
        assert (got[i], lp[i], rk[i]) == one
    assert got[0] == np.argmax(x[0])


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "top_k": 10}, {"top_p": 0.8}, {"min_p": 0.1},
                                {"top_k": 20, "min_p": 0.05, "top_p": 0.9}])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logprobs_and_ranks(rng, kw, dtype):
    x = (rng.standard_normal((20, 300)) * 2).astype(dtype)
    t, lp, rk = sample(x, seed=1, num_samples=2, return_logprobs=True, **kw)
    assert t.shape == lp.shape == rk.shape == (20, 2)
    assert lp.dtype == (np.float64 if dtype == np.float64 else np.float32) and rk.dtype == np.int64
    T = kw.get("temperature", 1.0)
    for i in range(20):
        xs = (x[i] / dtype(T)).astype(np.float64)
        probs = ref_probs(xs, 1.0, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"),
                          tol=16 * np.finfo(dtype).eps)
        for s in range(2):
            np.testing.assert_allclose(lp[i, s], np.log(probs[t[i, s]]), rtol=1e-5, atol=1e-6)
            assert rk[i, s] == np.sum(xs > xs[t[i, s]])


def test_greedy_logprobs():
    t, lp, rk = sample(np.array([1.0, 5.0, 5.0]), temperature=0, return_logprobs=True)
    assert (t, lp, rk) == (1, 0.0, 0)


# ------------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------------

def test_disabled_filters_change_nothing(rng):
    x = (rng.standard_normal((30, 200)) * 2).astype(np.float32)
    base = sample(x, seed=9)
    for kw in ({"top_p": 1.0}, {"top_k": 200}, {"top_k": 10**6}, {"top_k": 10**30}, {"top_k": 0},
               {"top_k": np.full(30, 2**64 - 1, np.uint64)}, {"top_k": [10**30] * 30}, {"min_p": 0.0},
               {"top_k": None, "top_p": None, "min_p": None}):
        np.testing.assert_array_equal(sample(x, seed=9, **kw), base)


def test_inf_entries_never_drawn_and_dominant_token(rng):
    x = rng.standard_normal((200, 100)).astype(np.float32)
    x[:, ::3] = -np.inf
    for kw in ({}, {"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}, {"top_k": 80}):
        t = sample(x, seed=1, **kw)
        assert np.all(t % 3 != 0)
    # one token holds all the mass
    y = np.full((100, 50), -np.inf, np.float32)
    y[:, 17] = 0.0
    for kw in ({}, {"top_k": 3}, {"top_p": 0.5}, {"min_p": 0.5}, {"temperature": 100.0}):
        assert np.all(sample(y, seed=2, **kw) == 17)
    z = np.zeros((100, 50), np.float32)
    z[:, 33] = 1e4
    assert np.all(sample(z, seed=2) == 33)
    # only -inf beyond the top-k: the candidates hold -inf values
    w = np.full((50, 40), -np.inf, np.float32)
    w[:, [3, 9]] = [1.0, 2.0]
    assert set(sample(w, seed=3, top_k=5).tolist()) == {3, 9}


def test_tiny_temperature_is_greedy_without_ties(rng):
    x = (rng.standard_normal((100, 1000)) * 2).astype(np.float32)
    np.testing.assert_array_equal(sample(x, temperature=1e-6, seed=1), sample(x, temperature=0))
    np.testing.assert_array_equal(sample(x, temperature=0, top_k=5, top_p=0.1, seed=1), np.argmax(x, -1))
    # with tied maxima, temperature 0 takes the lowest index; a tiny temperature picks either at random
    y = np.zeros((2000, 10), np.float32)
    y[:, [2, 7]] = 5.0
    assert np.all(sample(y, temperature=0) == 2)
    t = sample(y, temperature=1e-6, seed=4)
    assert set(t.tolist()) == {2, 7} and 0.45 < np.mean(t == 2) < 0.55


def test_bad_rows_raise():
    x = np.zeros((3, 5), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*row 1\b"):
        sample(x, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        sample(x, seed=0, temperature=0)
    with pytest.raises(ValueError, match="NaN"):
        sample(x, seed=0, top_k=2)
    with pytest.raises(ValueError, match="NaN"):
        sample(x, seed=0, top_p=0.5)
    y = np.zeros((2, 5), np.float32)
    y[1] = -np.inf
    for kw in ({}, {"top_k": 2}, {"top_p": 0.5}, {"min_p": 0.1}, {"temperature": 0}):
        with pytest.raises(ValueError, match=r"no possible token.*row 1\b"):
            sample(y, seed=0, **kw)
    # finite logits that x / T takes past float32's range: the message says so (it said every logit was
    # -inf; found by a sampling audit)
    with pytest.raises(ValueError, match=r"no possible token \(every logit is -inf after softcap and "
                                         r"temperature, in the compute type: x / T may overflow\)"):
        sample(np.full(4, -3.4e38, np.float32), temperature=1e-3, seed=1)
    z = np.zeros(5, np.float32)
    z[3] = np.inf
    for kw in ({}, {"top_k": 2}, {"top_p": 0.5}, {"return_logprobs": True}):
        with pytest.raises(ValueError, match=r"\+inf"):
            sample(z, seed=0, **kw)
    assert sample(z, temperature=0) == 3
    assert sample(z, softcap=30.0, temperature=0) == 3


def test_dtypes_and_softcap(rng):
    import ml_dtypes

    x = (rng.standard_normal((300, 64)) * 3).astype(np.float32)
    for dt in (np.float16, ml_dtypes.bfloat16, np.float64):
        xd = x.astype(dt)
        np.testing.assert_array_equal(sample(xd, seed=5, top_k=10), sample(xd.astype(np.float32), seed=5,
                                                                            top_k=10))
    c = 2.0
    capped = (c * np.tanh(x.astype(np.float64) / c)).astype(np.float32)
    agree = np.mean(sample(x, softcap=c, seed=6) == sample(capped, seed=6))
    assert agree > 0.98
    chi_square_ok(sample(np.tile(x[0], (N_DRAWS, 1)), softcap=c, seed=7), ref_probs(capped[0]))


def test_shapes():
    x = np.zeros((2, 3, 10), np.float32)
    assert sample(x, seed=0).shape == (2, 3)
    assert sample(x, seed=0, num_samples=4).shape == (2, 3, 4)
    assert sample(x[0, 0], seed=0).shape == ()
    assert sample(x[0, 0], seed=0, num_samples=3).shape == (3,)
    t, lp, rk = sample(x, seed=0, num_samples=2, return_logprobs=True)
    assert t.shape == lp.shape == rk.shape == (2, 3, 2)
    assert sample(np.zeros((0, 10), np.float32), seed=0).shape == (0,)
    per_row = sample(x, seed=np.arange(6).reshape(2, 3), top_k=np.ones((2, 3), int))
    assert per_row.shape == (2, 3)


@pytest.mark.parametrize("kw,match", [
    ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_k": "3"}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_k": np.array([1, 2])}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": np.nan}, "top_p"),
    ({"min_p": -0.1}, "min_p"), ({"min_p": 2.0}, "min_p"),
    ({"top_p": 10**400}, "top_p must be in .* too large"), ({"temperature": 10**400}, "temperature must be"),
    ({"temperature": -1.0}, "temperature"), ({"temperature": np.inf}, "temperature"),
    ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": 2**64}, "seed"),
    ({"seed": np.arange(4)}, "seed"),
    ({"seed": np.array([1.0, 2.0, 3.0])}, "seed"), ({"seed": np.array([-1, 2, 3])}, "seed"),
    ({"num_samples": 0}, "num_samples"), ({"num_samples": 1.0}, "num_samples"),
    ({"softcap": -1.0}, "softcap"), ({"chunk_size": 0}, "chunk_size"), ({"threads": 0}, "threads"),
])
def test_bad_arguments(kw, match):
    x = np.zeros((3, 5), np.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        sample(x, **kw)


@pytest.mark.parametrize("top_k, where", [(-2**70, ""), ([1, -2**70, 3], r" \(row 1\)"),
                                           ([5, 2**70, -2**64], r" \(row 2\)")])
def test_a_negative_top_k_past_int64_is_a_value_error_naming_it(top_k, where):
    """A Python int below int64 is a bad value (ValueError), reported as given: not a TypeError for an
    object array, nor the value clipped to int64."""
    bad = min(top_k) if isinstance(top_k, list) else top_k
    with pytest.raises(ValueError, match=f"top_k must be >= 0 .*got {bad}{where}$"):
        sample(np.zeros((3, 5), np.float32), top_k=top_k, seed=0)


@pytest.mark.parametrize("top_k", [2.0, np.float32(2), np.array([2.0, 1.0, 3.0]), [2.0, 1, 3]])
def test_a_float_top_k_is_a_type_error_even_when_whole(top_k):
    """top_k is an integer, as k of top_k, num_samples and beam_width are (and torch.topk's k): 2.0 was
    taken as 2, while 2.5 was refused (a docs audit)."""
    with pytest.raises(TypeError, match="top_k must be an integer or integers"):
        sample(np.zeros((3, 5), np.float32), top_k=top_k, seed=0)
    np.testing.assert_array_equal(sample(np.zeros((3, 5), np.float32), top_k=np.array([2, 1, 3]), seed=0),
                                  sample(np.zeros((3, 5), np.float32), top_k=[2, 1, 3], seed=0))


def test_bad_logits():
    with pytest.raises(TypeError):
        sample(np.zeros((2, 5), np.int32), seed=0)
    with pytest.raises(ValueError, match="vocabulary"):
        sample(np.zeros((2, 0), np.float32), seed=0)


# ------------------------------------------------------------------------------------------------------
# Beam search
# ------------------------------------------------------------------------------------------------------

def ref_beam(logits, beam_scores, W):
    x = np.asarray(logits, np.float64)
    lse = np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) + x.max(-1, keepdims=True)
    sc = (np.asarray(beam_scores, np.float64)[:, None] + x - lse)
    rows, V = x.shape
    b = rows // W
    sc = sc.reshape(b, W * V)
    parents = np.repeat(np.arange(W), V)[None, :].repeat(b, 0)
    tokens = np.tile(np.arange(V), W)[None, :].repeat(b, 0)
    order = np.lexsort((tokens, parents, -sc), axis=-1)[:, :2 * W]
    return (np.take_along_axis(sc, order, -1), np.take_along_axis(parents, order, -1),
            np.take_along_axis(tokens, order, -1))


@pytest.mark.parametrize("W,V", [(1, 5), (3, 50), (4, 1000), (2, 2)])
def test_beam_search_step_against_numpy(rng, W, V):
    batch = 3
    x = (rng.standard_normal((batch * W, V)) * 2).astype(np.float64)
    bs = rng.standard_normal(batch * W) - 5
    s, p, t = beam_search_step(x, bs, W)
    rs, rp, rt = ref_beam(x, bs, W)
    assert s.shape == p.shape == t.shape == (batch, 2 * W)
    np.testing.assert_array_equal(p, rp)
    np.testing.assert_array_equal(t, rt)
    np.testing.assert_allclose(s, rs, rtol=1e-12, atol=1e-12)
    assert s.dtype == np.float64 and p.dtype == t.dtype == np.int64
    s32, p32, t32 = beam_search_step(x.astype(np.float32), bs.astype(np.float32), W, chunk_size=7, threads=1)
    assert s32.dtype == np.float32
    np.testing.assert_allclose(s32, rs, rtol=1e-5, atol=1e-5)


def test_beam_search_step_ties_go_to_lower_parent_and_token():
    x = np.zeros((4, 6), np.float32)     # every continuation ties within an item
    s, p, t = beam_search_step(x, np.zeros(4, np.float32), 2)
    assert p.tolist() == [[0, 0, 0, 0]] * 2 and t.tolist() == [[0, 1, 2, 3]] * 2
    # equal beams: the lower parent first
    x = np.log(np.array([[0.7, 0.3], [0.7, 0.3]]))
    s, p, t = beam_search_step(x, np.array([-1.0, -1.0]), 2)
    assert p.tolist() == [[0, 1, 0, 1]] and t.tolist() == [[0, 0, 1, 1]]


def test_beam_search_step_nan_scores_come_first():
    """A NaN score ranks above every number, as in top_k and torch.topk (so in Hugging Face's beam
    search): a beam gone NaN (a NaN or +inf logit, a NaN beam score) fills its item's first places and is
    never dropped (it sorted last, and with V >= 2 W live continuations it vanished without a trace: found
    by a sampling audit). The NaN continuations come in top_k's order of the beam's logits; the item's
    other places are its best live continuations."""
    for bad, tokens in (("nan", [3, 0, 1, 2]), ("posinf", [3, 0, 1, 2]), ("score", [0, 1, 2, 3])):
        x, bs = np.zeros((2, 10)), np.zeros(2)
        if bad == "score":
            bs[1] = np.nan
        else:
            x[1, 3] = np.nan if bad == "nan" else np.inf
        for dtype in (np.float16, np.float32, np.float64):
            s, p, t = beam_search_step(x.astype(dtype), bs, 2)
            assert np.isnan(s).all() and p.tolist() == [[1, 1, 1, 1]] and t.tolist() == [tokens]
    # a NaN beam next to live ones: its continuations first, then the live beams' best
    x = np.log(np.array([[0.6, 0.3, 0.1], [0.9, 0.05, 0.05], [0.5, 0.5, 1.0]]))
    x[2, 2] = -np.inf
    for bs in (np.array([0.0, np.nan, -10.0]), np.array([0.0, -np.inf, np.nan])):
        s, p, t = beam_search_step(x, bs, 3)
        j = int(np.flatnonzero(np.isnan(bs))[0])
        assert p[0, :3].tolist() == [j] * 3 and t[0, :3].tolist() == [0, 1, 2] and np.isnan(s[0, :3]).all()
        assert p[0, 3:].tolist() == [0, 0, 0] and t[0, 3:].tolist() == [0, 1, 2]
        np.testing.assert_allclose(s[0, 3:], np.log([0.6, 0.3, 0.1]), rtol=1e-12)


def test_beam_search_step_ties_of_rounded_log_probabilities():
    """Logits one ulp apart whose float32 log-probabilities round to the same value: the beam's top 2W are
    chosen by logit, and equal scores of a beam keep that order (the more likely token first), so the
    candidates and their order agree (found by a soak agent: token 2 was chosen, then ranked after the
    dropped token 1). Across beams the lower parent still wins a tie."""
    one_up = np.nextafter(np.float32(1), np.float32(2))
    x = np.array([[100.0, 1.0, one_up]], np.float32)
    from fastlogits import top_k_logprobs

    lp, i = top_k_logprobs(x, 3)
    assert lp[0, 1] == lp[0, 2] and i[0].tolist() == [0, 2, 1]    # equal rounded log-probabilities
    for bs_dtype in (np.float32, np.float64):
        s, p, t = beam_search_step(x, np.zeros(1, bs_dtype), 1)
        assert t.tolist() == [[0, 2]] and p.tolist() == [[0, 0]]
    x = np.array([[100.0, 1.0, one_up, one_up, 0.5], [100.0, -50, -50, -50, -50]], np.float32)
    s, p, t = beam_search_step(x, np.array([0, -1000], np.float32), 2)
    assert t.tolist() == [[0, 2, 3, 1]] and p.tolist() == [[0, 0, 0, 0]] and s[0, 1] == s[0, 2] == s[0, 3]
    # two beams with the same rounded score: the lower parent first, whatever the tokens
    x = np.array([[100.0, 1.0, 0.0], [100.0, 0.0, one_up]], np.float32)
    s, p, t = beam_search_step(x, np.zeros(2, np.float32), 2)
    assert p.tolist() == [[0, 1, 0, 1]] and t.tolist() == [[0, 0, 1, 2]]


def test_beam_search_step_bad_arguments():
    x = np.zeros((6, 10), np.float32)
    with pytest.raises(ValueError, match="multiple of beam_width"):
        beam_search_step(x, np.zeros(6), 4)
    with pytest.raises(ValueError, match="beam_scores"):
        beam_search_step(x, np.zeros(5), 3)
    with pytest.raises(ValueError, match="beam_width"):
        beam_search_step(x, np.zeros(6), 0)
    with pytest.raises(TypeError, match="beam_width"):
        beam_search_step(x, np.zeros(6), 1.5)
    with pytest.raises(ValueError, match="2-D"):
        beam_search_step(np.zeros((2, 3, 10)), np.zeros(6), 3)
    with pytest.raises(ValueError, match="vocabulary"):
        beam_search_step(np.zeros((2, 1)), np.zeros(2), 1)


# ------------------------------------------------------------------------------------------------------
# The C API
# ------------------------------------------------------------------------------------------------------

C_SAMPLER = r"""
#include <stdio.h>
#include <stdlib.h>
static long n_exact = 0;
#define FL_COUNT_EXACT n_exact++
#include "fastlogits.h"
/* argv: V, the row's file (float32), seed, temperature, top_p; the scratch the header documents, no more */
int main(int argc, char **argv) {
    if (argc != 6) return 2;
    long V = atol(argv[1]), chunk = 4096;
    float *x = malloc(sizeof(float) * V);
    FILE *f = fopen(argv[2], "rb");
    if (!f || fread(x, sizeof(float), V, f) != (size_t)V) return 3;
    fclose(f);
    fl_sample_scratch sc = {malloc(8 * chunk), NULL, NULL, malloc(8 * V), malloc(8 * V), malloc(16 * V)};
    fl_sample_params p = {strtoull(argv[3], NULL, 10), 0, 0, atof(argv[5]), 0.0, 1, 0};
    fl_row r = {(const char *)x, V, 4, FL_F32, atof(argv[4]), 0.0};
    int64_t tok = -1;
    int st = fl_row_sample_f32(&r, &p, chunk, &sc, &tok, NULL, NULL);
    printf("%d %lld %ld\n", st, (long long)tok, n_exact);
    return 0;
}
"""


def _c_sampler(tmp_path):
    """The C sampler built (under AddressSanitizer where this machine has its runtime)."""
    import shutil
    import subprocess

    import fastlogits

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    (tmp_path / "s.c").write_text(C_SAMPLER)
    flags = ["-O2", "-g", "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", fastlogits.get_include()]
    out = ["-o", str(tmp_path / "s"), "-lm"]
    if subprocess.run([cc, *flags, "-fsanitize=address", str(tmp_path / "s.c"), *out],
                      capture_output=True).returncode != 0:
        subprocess.run([cc, *flags, str(tmp_path / "s.c"), *out], check=True)

    def draw(x, seed, temperature, top_p):
        import subprocess

        x.astype(np.float32).tofile(tmp_path / "x.bin")
        res = subprocess.run([str(tmp_path / "s"), str(x.size), str(tmp_path / "x.bin"), str(seed),
                              repr(temperature), repr(top_p)], capture_output=True, text=True,
                             env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
        assert res.returncode == 0, res.stderr[-2000:]
        return tuple(int(v) for v in res.stdout.split())
    return draw


def test_c_api_matches_and_few_tokens_get_exact_noise(tmp_path, rng):
    draw = _c_sampler(tmp_path)
    V = 100_000
    for scale in (1.0, 3.0):
        x = (rng.standard_normal(V) * scale).astype(np.float32)
        seed = int(rng.integers(2**63))
        st, tok, n_exact = draw(x, seed, 0.9, 1.0)
        assert st == 0 and tok == sample(x[None], temperature=0.9, seed=[seed])[0]
        assert n_exact < 300, n_exact        # of 100000 tokens: the cheap test rejects the rest


def test_c_api_top_p_of_a_row_shorter_than_the_chunk(tmp_path, rng):
    """The top-p pass took the chunk for the row's length when sizing its work space in tmp (2 n
    doubles): a chunk longer than the row overran it (found by an embedding audit under ASan)."""
    draw = _c_sampler(tmp_path)
    for V in (1, 37, 1000):
        x = (rng.standard_normal(V) * 2).astype(np.float32)
        seed = int(rng.integers(2**63))
        st, tok, _ = draw(x, seed, 1.0, 0.9)
        assert st == 0 and tok == sample(x[None], top_p=0.9, seed=[seed])[0]


PHILOX_WORDS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "fastlogits.h"
/* argv: seed, row, sample, V, the row's file (float32), then block numbers. Prints the 64 stream-0 words
   of each block as the sampler makes them, then the token fl_row_sample_f32 draws from the row. */
int main(int argc, char **argv) {
    uint64_t seed = strtoull(argv[1], NULL, 10), row = strtoull(argv[2], NULL, 10);
    fl_rng g = fl_rng_make(seed, row, (uint32_t)atol(argv[3]));
    long V = atol(argv[4]), chunk = 4096;
    uint32_t w[64];
    for (int a = 6; a < argc; a++) {
        fl__philox_block(w, (uint32_t)(16 * strtoull(argv[a], NULL, 10)), &g);
        for (int j = 0; j < 64; j++) printf("%u ", w[j]);
        printf("\n");
    }
    float *x = malloc(sizeof(float) * V);
    FILE *f = fopen(argv[5], "rb");
    if (!f || fread(x, sizeof(float), V, f) != (size_t)V) return 3;
    fclose(f);
    fl_sample_scratch sc = {malloc(8 * chunk), NULL, NULL, NULL, NULL, NULL};
    fl_sample_params p = {seed, row, 0, 1.0, 0.0, 1, 0};
    fl_row r = {(const char *)x, V, 4, FL_F32, 1.0, 0.0};
    int64_t tok = -1;
    int st = fl_row_sample_f32(&r, &p, chunk, &sc, &tok, NULL, NULL);
    printf("%d %lld\n", st, (long long)tok);
    return 0;
}
"""

_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
_V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2", "movbe"}


@pytest.mark.parametrize("flags, needs", [
    ([], set()),                                                   # the dispatch: this CPU's path
    (["-DFL_NO_MULTIVERSION"], set()),                             # SSE2 intrinsics (x86-64)
    (["-DFL_NO_MULTIVERSION", "-mavx2"], {"avx2"}),                # AVX2 intrinsics
    (["-DFL_NO_MULTIVERSION", "-march=x86-64-v4"], _V4),           # AVX-512F intrinsics
    (["-DFL_NO_INTRINSICS"], set()),                               # the portable lanes' clones
    (["-DFL_NO_INTRINSICS", "-DFL_NO_MULTIVERSION", "-march=x86-64-v4"], _V4),   # portable, as AVX-512
    (["-DFL_NO_INTRINSICS", "-DFL_NO_MULTIVERSION"], set()),       # the portable lanes, baseline
], ids=["dispatch", "sse2", "avx2", "avx512", "portable-dispatch", "portable-v4", "portable"])
def test_philox_words_of_every_code_path(tmp_path, rng, flags, needs):
    """Philox's block words (the sampler's noise) from each code path the header has (SSE2, AVX2 and
    AVX-512F intrinsics, the portable vector lanes), compiled warning-free, against the NumPy generator,
    and the token a row draws against the Python package's."""
    import shutil
    import subprocess

    import fastlogits

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    if any(f.startswith("-m") for f in flags) and not _X86_64:
        pytest.skip("x86-64 flags")
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - cpu_flags())}")
    (tmp_path / "w.c").write_text(PHILOX_WORDS)
    subprocess.run([cc, "-O2", "-std=c99", "-Wall", "-Wextra", "-Werror", *flags, "-I",
                    fastlogits.get_include(), str(tmp_path / "w.c"), "-o", str(tmp_path / "w"),
                    "-lm"], check=True)
    V = 3000
    x = (rng.standard_normal(V) * 2).astype(np.float32)
    x.tofile(tmp_path / "x.bin")
    blocks = [0, 1, 46, int(rng.integers(2**28)), 2**28 - 1]       # counters up to 2^32 - 1
    for seed, row, s in [(0, 0, 0), (int(rng.integers(2**64, dtype=np.uint64)), 2**33 + 5, 7),
                         (2**64 - 1, 2**32 - 1, 2**32 - 1)]:
        args = [seed, row, s, V, tmp_path / "x.bin", *blocks]
        out = subprocess.run([str(tmp_path / "w"), *map(str, args)], capture_output=True, text=True,
                             check=True).stdout.split("\n")
        for b, line in zip(blocks, out):
            want = np_philox(16 * b + np.arange(16), s, row & 0xFFFFFFFF, (row >> 32) << 1, seed & 0xFFFFFFFF,
                             seed >> 32)
            assert [int(v) for v in line.split()] == want.ravel().tolist(), (b, seed, row, s)
        st, tok = (int(v) for v in out[len(blocks)].split())         # (sample 0 of the row)
        assert st == 0 and tok == key_argmax(x, np_gumbel(seed, row, 0, np.arange(V))[2])
        if row == 0:
            assert tok == sample(x[None], seed=[seed])[0]


# ------------------------------------------------------------------------------------------------------
# Sources (streamed by blocks of rows)
# ------------------------------------------------------------------------------------------------------

def test_sources_stream_by_row_blocks(tmp_path, rng):
    import fastlogits

    x = (rng.standard_normal((3, 20, 3000)) * 2).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    T = rng.uniform(0.5, 1.5, (3, 20))
    kw = {"temperature": T, "top_k": 50, "top_p": 0.9, "num_samples": 2, "return_logprobs": True}
    want = sample(x, seed=7, **kw)
    src = fastlogits.open(tmp_path / "x.npy", memory=262144)     # blocks of 2 rows (40 bytes a value)
    got = sample(src, seed=7, **kw)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    seeds = rng.integers(0, 2**62, (3, 20))
    np.testing.assert_array_equal(sample(fastlogits.open(tmp_path / "x.npy", memory=65536), seed=seeds),
                                  sample(x, seed=seeds))
    blocks = iter([x.reshape(60, 3000)[:25], x.reshape(60, 3000)[25:]])      # an iterable of row blocks
    np.testing.assert_array_equal(sample(blocks, seed=7, min_p=0.1), sample(x.reshape(60, 3000), seed=7,
                                                                            min_p=0.1))
    x[1, 3, 5] = np.nan
    np.save(tmp_path / "y.npy", x)
    with pytest.raises(ValueError, match=r"NaN.*row \(1, 3\)"):
        sample(fastlogits.open(tmp_path / "y.npy", memory=65536), seed=1)


def test_beam_search_step_of_a_source(rng):
    x = rng.standard_normal((6, 50)).astype(np.float32)
    want = beam_search_step(x, np.zeros(6), 3)
    got = beam_search_step(iter([x[:4], x[4:]]), np.zeros(6), 3)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("x", [
    np.concatenate([[1e308, -1e308, -1e308], np.zeros(997)]),     # a span past the largest float64
    np.arange(2000) * 5e-324,                                        # a subnormal span
    np.concatenate([[3.0], np.arange(1999) * 5e-324]),
], ids=["span-overflows", "span-subnormal", "subnormal-tail"])
@pytest.mark.parametrize("kw", [{"top_k": 999, "top_p": 0.5}, {"top_k": 1500, "top_p": 0.9}, {"top_p": 0.3}])
def test_top_p_over_extreme_float64_spans(x, kw):
    """The top-p threshold of top-k's candidates histograms their values over the span max - min; a span
    that overflows (scale 0) or is subnormal (scale inf) made a NaN bucket index (a crash). The token is
    the argmax of x + g over the reference survivors."""
    seed = 12345
    got = int(sample(x, seed=seed, **kw))
    with np.errstate(over="ignore"):             # x - max overflows to -inf: probability 0
        keep = _ref_keep(x, kw.get("top_k"), kw.get("top_p"), None, 16 * np.finfo(np.float64).eps)
    _, _, g = np_gumbel(seed, 0, 0, np.arange(x.shape[0]))
    assert got == key_argmax(x, g, keep)


# Rows of near-equal huge logits, where a key rounded to one float64 loses the noise (ulp(1e16) = 2):
# a float32 row masked with its most negative finite value (uniform, as torch.softmax gives), a float64
# row of ties past 2^53, and distinct float64 values an ulp or a few apart past 1e15 (ulp 0.125).
HUGE_ROWS = {
    "float32-masked": np.full(6, np.finfo(np.float32).min, np.float32),
    "float64-ties": np.full(6, 1e16),
    "float64-near": 1e15 + np.array([0.0, 0.125, 0.25, 0.5, 1.0, 1.5]),
    "float64-max": np.full(6, np.finfo(np.float64).max),
    # an ulp of 1 (the max 2^52 + 12345) above ties one and two ulps down, which top_p=0.25 needs some of:
    # the nucleus' lower bound (lse + log(1 - p) - log(V), as the GPU's still is), rounded at each of its
    # steps, came out an ulp or two too high and left them out (an audit)
    "float64-ulp-below": np.array([2.0**52 + 12345] + [2.0**52 + 12344] * 10),
    "float64-2ulp-below": np.array([2.0**52 + 12345] + [2.0**52 + 12343] * 26),
}
HUGE_KW = [{}, {"top_k": 3}, {"top_p": 0.6}, {"top_p": 0.25}, {"min_p": 0.5}, {"top_k": 5, "top_p": 0.9},
           {"top_k": 5, "min_p": 0.5}]


@pytest.mark.parametrize("kw", HUGE_KW, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain")
@pytest.mark.parametrize("name", list(HUGE_ROWS))
def test_near_equal_huge_logits_draw_by_their_noise(name, kw):
    """The key is the exact sum x + g: its noise counts at any |x|. A key rounded to one float64 drew
    token 0 every time from these rows (a masked row, ties past 2^53); now the draws fit the float64
    probabilities (x - max is exact here) and each is the exact argmax of the documented noise."""
    x = HUGE_ROWS[name]
    n = 6000
    got = sample(np.tile(x, (n, 1)), seed=2024, **kw)
    chi_square_ok(got, ref_probs(x, **kw))
    keep = _ref_keep(x.astype(np.float64), kw.get("top_k"), kw.get("top_p"), kw.get("min_p"),
                     16 * np.finfo(x.dtype).eps)
    for i in range(40):
        assert got[i] == key_argmax(x, np_gumbel(2024, i, 0, np.arange(x.size))[2], keep), i


@pytest.mark.parametrize("kw", [{}, {"min_p": 0.5}, {"top_p": 0.5}], ids=["plain", "min_p", "top_p"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_huge_tied_row_split_over_threads_draws_by_its_noise(dtype, kw):
    """One long row of ties at the dtype's most negative value, its draws over column ranges on several
    threads and merged (the merge compares the exact keys too): each sample the exact argmax."""
    V = 3001
    x = np.full((1, V), np.finfo(dtype).min, dtype)
    keep = _ref_keep(x[0].astype(np.float64), None, kw.get("top_p"), kw.get("min_p"),
                     16 * np.finfo(dtype).eps)
    for threads, chunk in ((1, None), (4, 64), (3, 1000)):
        got = sample(x, seed=[99], num_samples=12, threads=threads, chunk_size=chunk, **kw)
        want = [key_argmax(x[0], np_gumbel(99, 0, s, np.arange(V))[2], keep) for s in range(12)]
        assert got[0].tolist() == want, (threads, chunk)
    if "top_p" not in kw:
        return
    # top-p's cut among all-tied values, counted across chunks (fl__nth_equal): HF keeps the last 1501 of
    # the 3001 ties at top_p=0.5, and 20000 draws reach the first of them (a mutation audit: a count off
    # by one a chunk moved the cut 23 tokens on)
    for threads in (1, 3):
        got = sample(x, top_p=0.5, seed=[5], num_samples=20000, threads=threads, chunk_size=64)
        assert got.min() == 1500 and got.max() == V - 1, threads


@pytest.mark.parametrize("kw", [{"top_k": 5}, {"top_p": 0.5}, {}, {"min_p": 0.1}, {"top_k": 5, "top_p": 0.5}])
@pytest.mark.parametrize("chunk", [None, 16, 4000])
def test_a_nan_after_a_posinf_names_the_nan(kw, chunk):
    """NaN anywhere in a row is the row's status, also after a +inf (the top-k pass stopped at the +inf)."""
    x = np.random.default_rng(0).standard_normal((2, 4000)).astype(np.float32)
    x[1, 3], x[1, 3990] = np.inf, np.nan
    with pytest.raises(ValueError, match=r"holds a NaN \(row 1\)"):
        sample(x, seed=1, chunk_size=chunk, **kw)


@pytest.mark.parametrize("dtype, gap", [(np.float32, 1e-4), (np.float64, 1e-13)])
@pytest.mark.parametrize("path", ["rows", "top-k", "split", "wide"])
def test_top_p_of_large_logits_keeps_the_exact_nucleus(dtype, gap, path):
    """Logits near 1e4 (a low temperature makes them): the logsumexp rounded to the compute type is off
    by up to ulp(lse) / 2, 4e-4 relative in float32 and 1e-12 in float64, far above the 16-eps tolerance
    of top-p, so masses are weighed against the exact max. p0 being token 0's probability, top_p = p0 -
    gap keeps token 0 alone and p0 + gap keeps tokens 0 and 1 (gap: about 800 eps of the compute type),
    on every path: many rows, the top-k path, one row split over threads, a row wider than the budget."""
    from fastlogits.stream import wide
    from fastlogits.stream.sources import ArraySource

    x = np.full(64, -np.inf, dtype)
    x[:3] = [10000.0, 9999.78, 9997.0]
    p0 = _softmax(x.astype(np.float64))[0]
    for top_p, keep in ((p0 - gap, [0]), (p0 + gap, [0, 1])):
        if path == "wide":
            _, t, _, _ = wide.sample_row(ArraySource(x[None]), temperature=1.0, softcap=0.0, top_k=0,
                                         top_p=top_p, min_p=0.0, seed=3, row_id=0, num_samples=2000,
                                         logprobs=False, cols=5)
        elif path == "split":
            t = sample(x, top_p=top_p, seed=3, num_samples=2000, threads=2, chunk_size=4)
        else:
            t = sample(np.tile(x, (2000, 1)), top_p=top_p, seed=3, top_k=3 if path == "top-k" else None)
        assert sorted(set(np.asarray(t).ravel().tolist())) == keep, (top_p, keep)


def test_a_temperature_that_overflows_the_compute_type_is_named():
    """float32 logits of 3e38 at T = 0.25 overflow to +inf in the compute type (as in PyTorch): the row
    cannot be sampled, and the error says where the +inf came from (the input holds none)."""
    x = np.array([[3e38, 1.0], [0.0, 1.0]], np.float32)
    with pytest.raises(ValueError, match=r"\+inf logit \(after softcap and temperature.*x / T may overflow.*"
                       r"\(row 0\)"):
        sample(x, temperature=0.25, seed=0)
    assert sample(x.astype(np.float64), temperature=0.25, seed=0)[0] == 0     # float64 holds 1.2e39


def test_per_row_parameters_are_private_copies():
    """Per-row top_k (and the other filters) reach the kernels as a checked private copy, as labels do:
    the caller's int64 array, contiguous, was passed through, and another thread could change it after
    the check."""
    from fastlogits.ops.sampling import _per_row

    k = np.array([1, 2, 3], np.int64)
    got = _per_row(k, "top_k", (3,), 3, np.int64, 0, lambda v: v >= 0, "an integer >= 0")
    np.testing.assert_array_equal(got, k)
    assert not np.shares_memory(got, k)


@pytest.mark.parametrize("path", ["memory", "top_k", "top_p", "streamed wide rows", "streamed top_k"])
def test_logprobs_of_huge_logits_keep_log_sum(tmp_path, path):
    """Log-probabilities are (x - m) - log(sum), as log-softmax forms them: x - (m + log(sum)) rounded
    log(2) away next to m = 1e20 (0.0 for two equal logits; -0.75 at 1e15)."""
    V = 20000 if path.startswith("streamed") else 3
    for big in (1e15, 1e20):
        x = np.zeros((1, V))
        x[0, :2] = big
        kw = {"top_k": 2} if "top_k" in path else {"top_p": 0.9} if path == "top_p" else {}
        if path.startswith("streamed"):
            np.save(tmp_path / "x.npy", x)
            src = fastlogits.open(tmp_path / "x.npy", memory="64KiB")     # a row wider than the budget
            got = sample(src, seed=1, num_samples=4, return_logprobs=True, **kw)[1]
        else:
            got = sample(x, seed=1, num_samples=4, return_logprobs=True, **kw)[1]
        np.testing.assert_allclose(got, np.full((1, 4), -np.log(2.0)), rtol=1e-15)
    x32 = np.array([30.0, 30.0], np.float32)        # x / T = 3e19 in float32
    got = sample(x32, temperature=1e-18, seed=1, return_logprobs=True)[1]
    np.testing.assert_allclose(got, -np.log(2.0), rtol=1e-6)
