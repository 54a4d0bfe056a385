"""Sampling on backend="gpu": the same tokens as backend="cpu" (the rate is reported in the terminal summary),
exactly the argmax of the documented generator's noise over the reference filters' survivors, log-probs and
ranks against float64 NumPy, statuses of edge rows, and device arrays in and out. Under the CUDA simulator
the shapes stay small (about 7 ms a barrier); the real-GPU tier (test_real_device.py) adds a real vocabulary.
"""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlogits import check
from fastlogits.ops._prep import is_gpu_array
from fastlogits.ops.sampling import beam_search_step, sample
from tests.helpers import awkward_rows
from tests.test_sampling import (
    HUGE_ROWS,
    MAX_WORD_SEED,
    MAX_WORD_TOKEN,
    _ref_keep,
    exactness_case,
    key_argmax,
    np_gumbel,
    ref_probs,
)

from .conftest import REPORT

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64)]


def test_cpu_and_gpu_draw_the_same_tokens(gpu, rng):
    """Random inputs with per-row seeds: the share of (row, seed) pairs whose draws are the same on both
    backends, and of single draws. 1024 pairs: 768 rows with per-row temperatures (greedy among them) and
    one sample, 256 with per-row filter combinations and two (the simulator takes ~15 ms a draw and ~0.1 s
    for a filtered row's thresholds)."""
    totals = np.zeros(4, np.int64)
    for dtype, rows, V, filters in [("float32", 640, 100, False), ("float16", 128, 160, False),
                                    ("float32", 160, 100, True), ("bfloat16", 48, 129, True),
                                    ("float64", 48, 77, True)]:
        x, kw = check.sample_inputs(rng, rows, V, dtype, filters)
        totals += check.sample_agreement(x, kw, num_samples=2 if filters else 1)
    pairs, same_pairs, draws, same_draws = (int(v) for v in totals)
    rate = same_pairs / pairs
    REPORT.append(f"sample, CPU vs GPU same tokens: {same_pairs}/{pairs} (row, seed) pairs ({rate:.2%}), "
                  f"{same_draws}/{draws} draws")
    assert rate >= check.MIN_SAME_TOKEN_RATE, REPORT[-1]


FILTERS = [{}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8}, {"min_p": 0.05},
           {"top_k": 40, "top_p": 0.9, "min_p": 0.01}, {"top_p": 0.5, "temperature": 3.0},
           {"temperature": 1e-6}]


@pytest.mark.parametrize("kw", FILTERS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_tokens_are_the_argmax_of_logits_plus_documented_noise(gpu, rng, kw):
    """The independent reference: a NumPy Philox and float64 filters (tests/test_sampling.py). Segments
    of 64 columns (chunk_size) and two samples exercise the segment merge and the sample counter."""
    rows, V = 4, 300
    x = (rng.standard_normal((rows, V)) * 2).astype(np.float32)
    x[1, ::7] = np.float32(1.5)                         # ties
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    got = sample(x, seed=seed, num_samples=2, chunk_size=64, backend="gpu", **kw)
    T = np.float32(kw.get("temperature", 1.0))
    for i in range(rows):
        xs = (x[i] / T).astype(np.float64)             # in the compute dtype, as the kernels
        keep = _ref_keep(xs, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"), 16 * np.finfo(np.float32).eps)
        for s in range(2):
            _, _, g = np_gumbel(seed, i, s, np.arange(V))
            assert got[i, s] == key_argmax(xs, g, keep), (i, s)


def test_top_p_keeps_the_last_of_the_tokens_tied_at_its_boundary(gpu):
    """As the CPU (tests/test_sampling.py): of the tokens tied at the nucleus' edge, the last ones it
    needs, found by `prepare`'s pass over the row (nth_equal) wherever they lie: Hugging Face's vectors,
    with top-k and min-p, over 64-column segments, and a row of 299 ties (the first kept, 213, is in
    another thread's run of columns than the row's start), in every dtype; the same tokens and
    log-probabilities as the CPU's."""
    cases = [([0.4, 0.2, 0.2, 0.2], {"top_p": 0.5}, [0, 3]), ([0.25] * 4, {"top_p": 0.5}, [2, 3]),
             ([0.3, 0.25, 0.25, 0.1, 0.1], {"top_k": 3, "top_p": 0.5}, [0, 2]),
             ([0.1, 0.15, 0.15, 0.15, 0.15, 0.3], {"top_k": 3, "top_p": 0.55, "min_p": 0.4}, [3, 4, 5]),
             # min-p's threshold above top-p's drops top-p's cut (tokens 1, 2 lie exactly at it)
             ([1.0, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, np.exp(-5)], {"top_p": 0.94}, [0, 1, 2, 4, 5, 6]),
             ([1.0, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, np.exp(-5)], {"top_p": 0.94, "min_p": 0.5}, [0, 1, 2]),
             ([1.0, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, np.exp(-5)], {"top_k": 7, "top_p": 0.94, "min_p": 0.5},
              [0, 1, 2])]
    for probs, kw, keep in cases:
        x = np.log(np.array(probs))[None]
        got = sample(np.repeat(x, 8, axis=0), seed=5, num_samples=40, backend="gpu", **kw)
        assert sorted(set(got.ravel().tolist())) == keep, (probs, kw)
    for dtype in DTYPES:
        # 299 ties under one token (mass ~0.06); at -2.5 under 0, 299 float64 masses of theirs add up
        # below 299 of them (a count truncated, not rounded, kept one tie more: a mutation audit)
        for tie, top in ((-3.0, 1.0), (-2.5, 0.0)):
            x = np.full((1, 300), tie).astype(dtype)
            x[0, 7] = top
            kw = dict(top_p=0.4, seed=3, num_samples=64, chunk_size=64, return_logprobs=True)
            tok, lp, _ = sample(x, backend="gpu", **kw)
            ctok, clp, _ = sample(x, backend="cpu", **kw)
            np.testing.assert_array_equal(tok, ctok)
            np.testing.assert_allclose(lp, clp, rtol=1e-6)
            if tie == -3.0:
                assert tok.min() == 7 and tok[tok != 7].min() >= 213, dtype       # 87 of the 299 kept


@pytest.mark.parametrize("kw", [{}, {"top_k": 3}, {"min_p": 0.5}, {"top_p": 0.6}, {"top_p": 0.25},
                                {"top_k": 5, "top_p": 0.9}],
                         ids=["plain", "top_k", "min_p", "top_p", "top_p-0.25", "top_k-top_p"])
def test_near_equal_huge_logits_draw_by_their_noise(gpu, kw):
    """Near-equal huge logits (tests/test_sampling.py's rows, where a key rounded to one float64 loses the
    noise), and a row of 200 masked float32 tokens over 4 segments (their merge compares the exact keys
    too): each draw the exact argmax of x + g, the CPU's token."""
    seed = 77
    for x in [*HUGE_ROWS.values(), np.full(200, np.finfo(np.float32).min, np.float32)]:
        V = x.shape[0]
        keep = _ref_keep(x.astype(np.float64), kw.get("top_k"), kw.get("top_p"), kw.get("min_p"),
                         16 * np.finfo(x.dtype).eps)
        got = sample(x[None], seed=[seed], num_samples=3, chunk_size=64, backend="gpu", **kw)
        want = [key_argmax(x, np_gumbel(seed, 0, s, np.arange(V))[2], keep) for s in range(3)]
        assert got[0].tolist() == want, x[:2]
        np.testing.assert_array_equal(got, sample(x[None], seed=[seed], num_samples=3, **kw))


@given(data=st.data())
@settings(max_examples=30, deadline=None)
def test_exactness_property(gpu, data):
    """Hypothesis draws rows (few distinct values: ties at every boundary; a -inf), a temperature, filters,
    a seed and a chunk size (tests/test_sampling.py): the GPU's token is the argmax of the documented noise
    over the reference filters' survivors."""
    kw, want = exactness_case(data, max_V=150, chunks=(None, 64))
    assert int(sample(backend="gpu", **kw)) == want


@pytest.mark.parametrize("dtype", DTYPES, ids=[d.name for d in DTYPES])
def test_logprobs_and_ranks(gpu, rng, dtype):
    """Tokens and ranks equal the CPU's; log-probabilities match float64 NumPy over the survivors."""
    rows, V = 5, 300
    x = (rng.standard_normal((rows, V)) * 3).astype(dtype)
    T = np.array([0.8, 1.0, 0.0, 1.3, 1.0])
    kw = dict(temperature=T, top_p=np.array([0.7, 1.0, 1.0, 0.9, 1.0]), top_k=np.array([0, 10, 0, 0, 0]),
              min_p=np.array([0.0, 0.0, 0.0, 0.02, 0.0]), softcap=20.0, seed=9, num_samples=3,
              return_logprobs=True, chunk_size=128)
    tok, lp, rank = sample(x, backend="gpu", **kw)
    ctok, clp, crank = sample(x, backend="cpu", **kw)
    np.testing.assert_array_equal(tok, ctok)
    np.testing.assert_array_equal(rank, crank)
    assert lp.dtype == clp.dtype
    f64 = dtype == np.float64
    ct = np.float64 if f64 else np.float32
    for i in range(rows):
        xs = 20.0 * np.tanh(x[i].astype(ct) / ct(20.0))
        xs = (xs if T[i] == 0 else (xs / ct(T[i]))).astype(np.float64)
        for s in range(3):
            t = tok[i, s]
            assert rank[i, s] == (0 if T[i] == 0 else int(np.sum(xs > xs[t])))
            if T[i] == 0:
                assert t == int(np.argmax(xs)) and lp[i, s] == 0.0
                continue
            keep = _ref_keep(xs, kw["top_k"][i] or None, kw["top_p"][i], kw["min_p"][i],
                             16 * np.finfo(ct).eps)
            assert keep[t]
            m = xs[keep].max()
            want = xs[t] - (m + np.log(np.sum(np.exp(xs[keep] - m))))
            tol = 1e-12 if f64 else 2e-5 * (1 + np.abs(xs[np.isfinite(xs)]).max())
            assert abs(float(lp[i, s]) - want) <= tol, (i, s, lp[i, s], want)


@pytest.mark.parametrize("kw", [{}, {"top_p": 0.9}, {"top_k": 2}, {"min_p": 0.2}],
                         ids=["plain", "top_p", "top_k", "min_p"])
def test_logprobs_of_huge_logits_keep_log_sum(gpu, kw):
    """(x - M) - log(sum), as on the CPU: x - (M + log(sum)) rounded log(2) away next to M = 1e20."""
    for big in (1e15, 1e20):
        x = np.zeros((2, 5))
        x[:, :2] = big
        lp = sample(x, backend="gpu", seed=3, num_samples=2, return_logprobs=True, **kw)[1]
        np.testing.assert_allclose(lp, np.full((2, 2), -np.log(2.0)), rtol=1e-15)


@pytest.mark.parametrize("kw", [{}, {"top_p": 0.5}, {"top_k": 3}, {"min_p": 0.2}, {"temperature": 0.0}],
                         ids=["plain", "top_p", "top_k", "min_p", "greedy"])
def test_edge_rows_status_and_tokens(gpu, kw):
    """Every awkward row (NaN, +inf, all -inf, ties, extremes...) gets the CPU's status, and good rows
    its token (backend level: one call for all rows, where sample() would stop at the first bad row)."""
    from fastlogits.cpu import backend as cpu

    rows = awkward_rows(np.float32, 37)
    x = np.stack(list(rows.values()))
    n = x.shape[0]
    args = (np.full(n, kw.get("temperature", 1.0)), 0.0, np.full(n, kw.get("top_k", 0), np.int64),
            np.full(n, kw.get("top_p", 1.0)), np.full(n, kw.get("min_p", 0.0)), np.full(n, 77, np.uint64),
            np.arange(n, dtype=np.uint64), 2, True, 16, 1)
    g = gpu.sample(x, "float32", *args)
    c = cpu.sample(x, "float32", *args)
    np.testing.assert_array_equal(g[3], c[3], err_msg=str(list(rows)))
    ok = c[3] == 0
    assert ok.any() and (~ok).any()
    np.testing.assert_array_equal(g[0][ok], c[0][ok])       # tokens
    np.testing.assert_array_equal(g[2][ok], c[2][ok])       # ranks
    tol = 2e-5 * (1 + np.abs(np.where(np.isfinite(x), x, 0)).max(axis=1, keepdims=True))
    assert np.all(np.abs(g[1] - c[1])[ok] <= tol[ok])                   # log-probabilities


def test_bad_row_raises_the_cpu_error(gpu):
    x = np.zeros((3, 40), np.float32)
    x[1, 5] = np.nan
    for be in ("gpu", "cpu"):
        with pytest.raises(ValueError, match=r"holds a NaN \(row 1\)"):
            sample(x, seed=1, backend=be)


def test_device_arrays_in_device_arrays_out(gpu, rng):
    from numba import cuda

    x = (rng.standard_normal((2, 3, 200)) * 2).astype(np.float32)
    d = cuda.to_device(x)
    t = sample(d, seed=5, top_p=0.9)                 # backend None: where the data lives
    assert is_gpu_array(t) and t.shape == (2, 3)
    np.testing.assert_array_equal(t.copy_to_host(), sample(x, seed=5, top_p=0.9, backend="cpu"))
    tok, lp, rank = sample(d, seed=5, num_samples=2, return_logprobs=True)
    ctok, clp, crank = sample(x, seed=5, num_samples=2, return_logprobs=True, backend="cpu")
    assert all(is_gpu_array(a) for a in (tok, lp, rank)) and tok.shape == (2, 3, 2)
    np.testing.assert_array_equal(tok.copy_to_host(), ctok)
    np.testing.assert_array_equal(rank.copy_to_host(), crank)
    np.testing.assert_allclose(lp.copy_to_host(), clp, rtol=2e-5, atol=2e-5)


def test_device_sampling_never_waits_for_the_device(gpu, rng, monkeypatch, forbid_waits):
    """sample of device logits queues its kernels and returns device results: no copy to the host and no
    wait inside the call (it fetched the tokens and the rows' statuses, and sent the tokens back)."""
    from numba import cuda

    x = (rng.standard_normal((4, 300)) * 2).astype(np.float32)
    d = cuda.to_device(x)
    T = rng.uniform(0.5, 1.5, 4)
    want = sample(x, seed=3, temperature=T, top_k=40, min_p=0.02, num_samples=3, return_logprobs=True,
                  backend="cpu")
    sample(d, seed=9, return_logprobs=True)          # compiled and its scratch kept before the check
    forbid_waits()
    got = sample(d, seed=3, temperature=T, top_k=40, min_p=0.02, num_samples=3, return_logprobs=True)
    none = sample(cuda.to_device(np.zeros((0, 7), np.float32)), seed=1, num_samples=2, return_logprobs=True)
    monkeypatch.undo()
    assert [a.shape for a in none] == [(0, 2)] * 3 and all(is_gpu_array(a) for a in none)
    assert all(is_gpu_array(a) for a in got)
    assert got[1].dtype == np.float32                  # as the host path gives log-probabilities
    np.testing.assert_array_equal(got[0].copy_to_host(), want[0])
    np.testing.assert_array_equal(got[2].copy_to_host(), want[2])
    np.testing.assert_allclose(got[1].copy_to_host(), want[1], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bad, what", [(np.nan, "holds a NaN"), (np.inf, r"holds a \+inf"),
                                       (-np.inf, "no possible token")])
def test_device_rows_that_cannot_be_sampled_are_reported_later(gpu, bad, what, monkeypatch):
    """A device row that cannot be sampled gets token -1 (rank -1, log-probability NaN), the others their
    tokens; the ValueError the host path raises at once names the row at the next synchronize() (or the
    thread's next GPU call), once."""
    from numba import cuda

    import fastlogits
    import fastlogits.gpu

    x = np.zeros((2, 3, 40), np.float32)
    x[1, 2, 7] = bad
    if bad == -np.inf:
        x[1, 2] = -np.inf
    tok, lp, rank = sample(cuda.to_device(x), seed=4, return_logprobs=True)
    where = r".*\(row \(1, 2\)\); found on the device by an earlier sample call"
    with pytest.raises(ValueError, match=what + where):
        fastlogits.gpu.synchronize()
    fastlogits.gpu.synchronize()                      # reported once
    t, lp, rank = tok.copy_to_host(), lp.copy_to_host(), rank.copy_to_host()
    assert t[1, 2] == -1 and rank[1, 2] == -1 and np.isnan(lp[1, 2])
    good = np.ones((2, 3), bool)
    good[1, 2] = False
    want = sample(x[0], seed=4, return_logprobs=True, backend="cpu")       # rows 0..2: the same seeds
    np.testing.assert_array_equal(t[0], want[0])
    assert np.all(t[good] >= 0) and np.all(np.isfinite(lp[good]))
    sample(cuda.to_device(x), seed=4)
    cuda.synchronize()
    with pytest.raises(ValueError, match=what):       # the thread's next GPU call raises it
        fastlogits.logsumexp(cuda.to_device(np.zeros((1, 4), np.float32)))
    # queued behind a bad cross_entropy call, before its report reached the host (a real GPU's timing,
    # emulated by skipping the entry check the simulator's synchronous kernels make too early): the first
    # error is raised, and says that this call's tokens are invalid too
    from fastlogits.gpu import backend as GB
    fastlogits.cross_entropy(cuda.to_device(x[0]), cuda.to_device(np.array([0, 40, 0])))
    with monkeypatch.context() as m:
        m.setattr(GB, "raise_device_errors", lambda: None)
        tok = sample(cuda.to_device(x), seed=4)
    with pytest.raises(IndexError, match=r"label 40 at row 1 .*; 1 later GPU call also found bad input"):
        fastlogits.gpu.synchronize()
    fastlogits.gpu.synchronize()
    assert tok.copy_to_host()[1, 2] == -1


def test_tokens_do_not_depend_on_segments_or_batch(gpu, rng):
    """Per-row seeds: a row draws the same tokens alone or in a batch, whatever the column segments."""
    x = (rng.standard_normal((6, 300)) * 2).astype(np.float32)
    seeds = rng.integers(0, 2**64, 6, dtype=np.uint64)
    kw = dict(top_p=0.9, num_samples=2)
    whole = sample(x, seed=seeds, backend="gpu", **kw)
    np.testing.assert_array_equal(sample(x, seed=seeds, chunk_size=64, backend="gpu", **kw), whole)
    np.testing.assert_array_equal(sample(x[2:5], seed=seeds[2:5], backend="gpu", **kw), whole[2:5])


def _beam_cases(rng):
    """(logits, beam_scores, beam_width): random rows, and the awkward ones: finished beams (-inf), a NaN
    row, a NaN score, equal beams and tied logits, V below 2 W, and an odd beam width."""
    x = (rng.standard_normal((12, 40)) * 2).astype(np.float32)
    bs = np.log(rng.uniform(0.1, 1.0, 12))
    yield x, bs, 2
    y = x.copy()
    y[1] = np.round(y[1])                          # tied logits within a beam
    y[2] = y[3]                                    # two beams alike ...
    b = bs.copy()
    b[2] = b[3]                                    # ... with equal scores: the lower parent first
    b[4:6] = -np.inf                               # a finished item
    b[6] = -np.inf                                 # a finished beam next to a live one
    y[8, 5] = np.nan                               # a NaN row
    b[10] = np.nan                                 # a NaN score
    yield y, b, 2
    yield x[:12, :3], bs, 3                        # V = 3 < 2 W: k = V continuations a beam
    yield x[:, ::3].astype(np.float64), bs, 4      # float64, a strided view; V = 14
    yield np.zeros((3, 5), np.float16), np.zeros(3), 1
    # NaN scores before a live beam's continuations, -inf ones included (a NaN row, then a NaN beam score)
    yield np.array([[0, np.nan, 0], [0, -np.inf, -np.inf]], np.float32), np.zeros(2), 2
    yield np.array([[0, 1, 0], [0, -np.inf, -np.inf]], np.float32), np.array([np.nan, 0.0]), 2


def test_beam_search_step(gpu, rng):
    """backend="gpu" takes the CPU's continuations, with host and device logits: scores within the
    agreement tolerance, parents and tokens exactly. Device logits give device results."""
    from numba import cuda

    for x, bs, W in _beam_cases(rng):
        c = beam_search_step(x, bs, W, backend="cpu")
        g = beam_search_step(x, bs, W, backend="gpu")
        d = beam_search_step(cuda.to_device(np.ascontiguousarray(x)), bs, W)
        assert not any(isinstance(a, np.ndarray) for a in d)
        d = tuple(a.copy_to_host() for a in d)
        for got in (g, d):
            assert [a.dtype for a in got] == [a.dtype for a in c]
            np.testing.assert_array_equal(got[1], c[1])
            np.testing.assert_array_equal(got[2], c[2])
            np.testing.assert_allclose(got[0], c[0], rtol=2e-5, atol=2e-5)
    # device beam scores with host logits are read from the device; bad ones are named
    x, bs, W = next(_beam_cases(rng))
    c = beam_search_step(x, bs, W, backend="cpu")
    g = beam_search_step(x, cuda.to_device(bs), W, backend="gpu")
    for got, want in zip(g, c):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    for logits in (x, cuda.to_device(x)):
        with pytest.raises(ValueError, match=r"beam_scores must have shape \(12,\)"):
            beam_search_step(logits, cuda.to_device(bs[:6]), W, backend="gpu")
        with pytest.raises(TypeError, match="beam_scores must be a float array, got dtype bool"):
            beam_search_step(logits, cuda.to_device(bs > 0), W, backend="gpu")


def test_device_beam_search_step_never_waits_for_the_device(gpu, rng, monkeypatch, forbid_waits):
    """beam_search_step of device logits is all on the device: beam scores from the host (uploaded) or
    from the device (read in place, float32, float64 or int64), and no copy to the host or wait."""
    from numba import cuda

    x = (rng.standard_normal((8, 50)) * 2).astype(np.float32)
    bs = np.log(rng.uniform(0.1, 1.0, 8))
    bs[3] = -np.inf
    d = cuda.to_device(x)
    scores = [bs, bs.astype(np.float32), np.round(bs * 3).clip(-50).astype(np.int64)]
    want = [beam_search_step(x, b, 4, backend="cpu") for b in scores]
    dev = [cuda.to_device(b) for b in scores]
    for b in dev:
        beam_search_step(d, b, 4)                  # compiled before the check
    forbid_waits()
    got = [beam_search_step(d, b, 4) for b in [scores[0]] + dev]
    none = beam_search_step(cuda.to_device(np.zeros((0, 7), np.float32)), np.zeros(0), 2)
    monkeypatch.undo()
    assert [a.shape for a in none] == [(0, 4)] * 3 and all(is_gpu_array(a) for a in none)
    for g, w in zip(got, [want[0]] + want):
        assert all(is_gpu_array(a) for a in g)
        g = tuple(a.copy_to_host() for a in g)
        assert g[0].dtype == w[0].dtype
        np.testing.assert_array_equal(g[1], w[1])
        np.testing.assert_array_equal(g[2], w[2])
        np.testing.assert_allclose(g[0], w[0], rtol=2e-5, atol=2e-5)


def test_cli_sample_on_the_gpu(gpu, tmp_path, rng):
    """`fastlogits sample --backend gpu` streams row blocks (a small budget) and writes the CPU's tokens."""
    import subprocess
    import sys

    x = (rng.standard_normal((8, 3000)) * 3).astype(np.float32)          # rows of 12 KB: 64 KiB holds few
    np.save(tmp_path / "x.npy", x)
    args = ["sample", tmp_path / "x.npy", tmp_path / "s.npy", "--top-k", "20", "--temperature", "0.8",
            "--seed", "7", "--logprobs", "--backend", "gpu", "--memory", "64KiB"]
    res = subprocess.run([sys.executable, "-m", "fastlogits.cli", *map(str, args)], capture_output=True)
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "s.npy")
    tokens, lp, ranks = sample(x, top_k=20, temperature=0.8, seed=7, return_logprobs=True, backend="cpu")
    np.testing.assert_array_equal(got["token"], tokens)
    np.testing.assert_array_equal(got["rank"], ranks)
    np.testing.assert_allclose(got["logprob"], lp, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kw", [{"top_p": 0.5}, {"min_p": 0.5}, {"top_k": 3, "top_p": 0.5}])
def test_a_filtered_token_never_wins_with_the_largest_word(gpu, kw):
    """Token 31 has the largest random word under this seed (tests/test_sampling.py) and lies below every
    filter's threshold: neither backend draws it."""
    x = np.zeros((1, 64), np.float32)
    x[0, 0], x[0, MAX_WORD_TOKEN] = 12.0, -5.0
    keep = ref_probs(x[0], 1.0, kw.get("top_k"), kw.get("top_p"), kw.get("min_p")) > 0
    for backend in ("gpu", "cpu"):
        t = int(np.asarray(sample(x, seed=MAX_WORD_SEED, backend=backend, **kw))[0])
        assert keep[t], (backend, t)


def test_top_p_reached_exactly_keeps_no_more(gpu):
    """The GPU sampler's top-p tolerance (a mutation audit: tol = 0 kept tokens 2 and 3 too): two tokens
    hold exactly 0.8 of the mass, and top_p is that plus the 16 eps the docs allow: they alone are drawn,
    as on the CPU (tests/test_mutants.py)."""
    a = math.log(0.25)
    x = np.tile(np.array([0.0, 0.0, a, a]), (300, 1))
    tok = sample(x, top_p=0.8 + 16 * np.finfo(np.float64).eps, seed=1, backend="gpu")
    counts = np.bincount(tok, minlength=4)
    assert counts[2:].sum() == 0 and min(counts[:2]) > 100, counts
