"""argmax, top_k and top_k_logprobs: ties (lowest index first, also across chunk and thread boundaries),
NaN as
the largest value, infinities, k = V, and NumPy / PyTorch on the same rows."""

import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastlogits as fl
from fastlogits.stream.accumulators import TopK
from tests import reference as ref
from tests import tolerances as tols
from tests.helpers import BF16, DTYPE_IDS, DTYPES, check, random_logits

inf, nan = np.inf, np.nan
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_argmax_literals(dtype, chunk_size):
    rows = [
        ([1.0, 3.0, 3.0, 2.0], 1),
        ([3.0, 1.0, 2.0, 3.0], 0),
        ([1.0, nan, 5.0, nan], 1),
        ([inf, nan, 1.0, 2.0], 1),
        ([1.0, inf, inf, 2.0], 1),
        ([-inf, -inf, -inf, -inf], 0),
        ([-inf, -inf, -inf, -5.0], 3),
        ([0.0, -0.0, 0.0, 0.0], 0),
        ([-0.0, 0.0, 0.0, 0.0], 0),
        ([nan, nan, nan, nan], 0),
        ([-1e4, -1e4, -1e4, -1e4 + 100], 3),
    ]
    x = np.array([r for r, _ in rows], dtype=dtype)
    want = np.array([i for _, i in rows])
    for threads in (1, 2):
        got = np.asarray(fl.argmax(x, chunk_size=chunk_size, threads=threads))
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
        for r, (row, i) in enumerate(rows):
            assert int(fl.argmax(x[r], chunk_size=chunk_size)) == i, row
    np.testing.assert_array_equal(ref.argmax(x), want)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_top_k_literals(dtype, chunk_size):
    x = np.array(
        [
            [1.0, 3.0, 3.0, 2.0, 3.0, 0.0],
            [nan, 1.0, inf, nan, -inf, 2.0],
            [-inf, -inf, 0.0, -inf, -inf, -inf],
            [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
        ],
        dtype=dtype,
    )
    want_idx = np.array([[1, 2, 4, 3], [0, 3, 2, 5], [2, 0, 1, 3], [0, 1, 2, 3]])
    vals, idx = fl.top_k(x, 4, chunk_size=chunk_size)
    vals, idx = np.asarray(vals), np.asarray(idx)
    assert vals.dtype == dtype and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(
        vals.astype(np.float64), np.take_along_axis(x, want_idx, -1).astype(np.float64)
    )
    np.testing.assert_array_equal(ref.top_k(x, 4)[1], want_idx)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 64])
def test_ties_across_chunks(threads, chunk_size, rng):
    """Many equal values in a long row: the lowest indices win, whatever the chunking."""
    x = rng.integers(0, 4, size=(5, 3001)).astype(np.float32)
    check("argmax", x, threads=threads, chunk_size=chunk_size)
    check("top_k", x, k=50, threads=threads, chunk_size=chunk_size)
    check("top_k_logprobs", x, k=50, threads=threads, chunk_size=chunk_size)
    # the max value 3 appears many times: the answer is its first occurrence
    np.testing.assert_array_equal(
        np.asarray(fl.argmax(x, threads=threads, chunk_size=chunk_size)), np.argmax(x, axis=-1)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_argmax_of_a_few_ties_anywhere_in_a_row(dtype, rng):
    """The one-pass argmax keeps each vector lane's best value and the vector where it first saw it, and
    takes the lowest index among the lanes that hold the max: the max put at 2 or 3 random places (a
    later vector's low lane, an earlier vector's high lane, the tail past the lanes), +inf among them or
    all -inf, rows of 1 to 300 values, against NumPy's first occurrence."""
    for n in list(range(1, 40)) + [63, 64, 65, 100, 257, 300]:
        x = rng.standard_normal((64, n)).astype(dtype)
        for r in range(64):
            at = rng.choice(n, size=min(n, int(rng.integers(2, 4))), replace=False)
            x[r, at] = [3.0 + 10.0, np.inf, -np.inf][r % 3]
            if r % 3 == 2:
                x[r] = -np.inf
        np.testing.assert_array_equal(np.asarray(fl.argmax(x, threads=1)), np.argmax(x, axis=-1), str(n))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_k_equals_v_is_a_sort(dtype, rng):
    for n in (1, 2, 17, 300):
        x = random_logits(rng, (3, n), dtype)
        vals, idx = fl.top_k(x, n)
        order = np.argsort(-x.astype(np.float64), axis=-1, kind="stable")
        np.testing.assert_array_equal(np.asarray(idx), order)
        lp, idx = fl.top_k_logprobs(x, n)
        np.testing.assert_array_equal(np.asarray(idx), order)
        s = np.exp(np.asarray(lp, dtype=np.float64)).sum(axis=-1)
        np.testing.assert_allclose(
            s, 1.0, atol=float(np.max(tols.softmax_sum_tol(dtype, ref.row_scale(x), n)))
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_top_k_logprobs_are_gathered_log_softmax(dtype, rng):
    x = random_logits(rng, (4, 500), dtype)
    lp, idx = fl.top_k_logprobs(x, 10, temperature=0.8)
    lsm = np.asarray(fl.log_softmax(x, temperature=0.8, dtype=np.float64))
    np.testing.assert_allclose(
        np.asarray(lp, dtype=np.float64),
        np.take_along_axis(lsm, np.asarray(idx), -1),
        rtol=0,
        atol=float(np.max(2 * tols.log_tol(dtype, 20.0, ref.row_scale(x, None, 0.8)))),
    )
    assert (np.diff(np.asarray(lp), axis=-1) <= 0).all()


def test_top_k_logprobs_temperature_changes_values_not_order(rng):
    x = random_logits(rng, (3, 200), np.float64)
    lp1, i1 = fl.top_k_logprobs(x, 7)
    lp2, i2 = fl.top_k_logprobs(x, 7, temperature=np.array([0.5, 1.0, 2.0]))
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i2))
    np.testing.assert_allclose(np.asarray(lp1)[1], np.asarray(lp2)[1], rtol=1e-12)
    assert not np.allclose(np.asarray(lp1)[0], np.asarray(lp2)[0])


def test_against_numpy_and_torch(rng):
    torch = pytest.importorskip("torch")
    for dtype in (np.float32, np.float64):
        x = random_logits(rng, (6, 1000), dtype)
        x[1, [10, 500]] = nan
        x[2, [3, 999]] = inf
        x[3, :] = np.round(x[3, :])
        t = torch.from_numpy(x)
        np.testing.assert_array_equal(np.asarray(fl.argmax(x)), np.argmax(x, axis=-1))
        np.testing.assert_array_equal(np.asarray(fl.argmax(x)), torch.argmax(t, dim=-1).numpy())
        vals, idx = fl.top_k(x, 20)
        tv, _ = torch.topk(t, 20, dim=-1)
        # PyTorch does not order ties; the values agree (NaN first)
        np.testing.assert_array_equal(np.asarray(vals), tv.numpy())
        np.testing.assert_array_equal(np.asarray(idx), ref.top_k_order(x, 20))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_k_0_gives_empty_results_as_torch_topk(dtype, rng, tmp_path):
    """k = 0: values (or log-probabilities) and indices of shape (..., 0), in the dtypes k > 0 gives, as
    torch.topk(x, 0) returns (V = 0 included); from a file too, with rows wider than the budget, and from
    the TopK accumulator. Arguments are still checked. k below 0 or past V raises, naming k."""
    x = random_logits(rng, (2, 3, 41), dtype)
    for fn in (fl.top_k, fl.top_k_logprobs):
        want_v = fn(x, 1)[0].dtype
        for a in (x, x[0, 0], x[:, :, :0], x[..., ::2]):
            v, i = fn(a, 0)
            assert v.shape == i.shape == a.shape[:-1] + (0,), (fn.__name__, a.shape)
            assert v.dtype == want_v and i.dtype == np.int64
        with pytest.raises(ValueError, match="k must be between 0 and the vocabulary size 41, got -1"):
            fn(x, -1)
        with pytest.raises(ValueError, match="temperature"):
            fn(x, 0, temperature=-1.0)
    np.save(tmp_path / "x.npy", random_logits(rng, (3, 70001), np.float32))
    for memory in (None, 64 * 1024):
        v, i = fl.top_k_logprobs(fl.open(tmp_path / "x.npy", memory=memory), 0)
        assert v.shape == i.shape == (3, 0) and i.dtype == np.int64
    for logprobs in (False, True):
        v, i = TopK(2, 0, logprobs=logprobs).update(x[0, :2], 0).result()
        assert v.shape == i.shape == (2, 0)
    # torch 2.13: torch.topk(torch.zeros(2, 3, 0), 0) gives values and indices of shape (2, 3, 0)
    assert fl.top_k(x[:, :, :0], 0)[0].shape == fl.top_k(x[:, :, :0], 0)[1].shape == (2, 3, 0)
    try:
        import torch
    except ImportError:
        return
    tv, ti = torch.topk(torch.zeros(2, 3, 0), 0)
    assert tuple(tv.shape) == tuple(ti.shape) == (2, 3, 0)


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_16bit_ties_from_rounding(dtype, rng):
    """16-bit rows have many exact ties; the reference sees the same rounded values."""
    x = random_logits(rng, (4, 5000), dtype, scale=2.0)
    for chunk_size in (None, 13):
        check("argmax", x, chunk_size=chunk_size)
        check("top_k", x, k=100, chunk_size=chunk_size, threads=2)
        check("top_k_logprobs", x, k=100, chunk_size=chunk_size)


def test_top_k_results_are_fresh_arrays(rng):
    x = random_logits(rng, (3, 30), np.float32)
    vals, idx = fl.top_k(x, 3)
    assert not np.shares_memory(np.asarray(vals), x)


@pytest.mark.parametrize("k", [100, 1000, 4096])
@pytest.mark.parametrize("chunk_size", [None, 7, 1024])
def test_large_k_with_ties(k, chunk_size, rng):
    x = rng.integers(-20, 20, size=(3, 4097)).astype(np.float32)
    x[0, ::5] = -inf
    x[1, [5, 4000]] = nan
    for threads in (1, 2):
        check("top_k", x, k=k, chunk_size=chunk_size, threads=threads)
        check("top_k_logprobs", x, k=k, chunk_size=chunk_size, threads=threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_top_k_by_selection(dtype, rng):
    """Where k is a large part of the row (k * 32 > n + 4096), the k best are selected a byte of a key at a
    time (fl__topk_select in fastlogits_impl.h), not kept in a heap: many ties (-0 beside +0 among them),
    NaN, infinities, tiny and huge values, every chunking and thread count, transformed values, rows with a
    stride, and k = V, against the reference's indices and values."""
    n = 1500
    x = np.empty((6, 2 * n))
    x[0] = rng.integers(-6, 6, 2 * n)                           # ties
    x[0, rng.random(2 * n) < 0.3] = -0.0
    x[1] = rng.standard_normal(2 * n) * 3
    x[2] = rng.standard_normal(2 * n)
    x[2, rng.integers(0, 2 * n, 9)] = nan
    x[2, rng.integers(0, 2 * n, 40)] = -inf
    x[2, rng.integers(0, 2 * n, 3)] = inf
    x[3] = rng.standard_normal(2 * n) * 1e-42                   # subnormal in float32, 0 in 16 bits
    x[4] = rng.standard_normal(2 * n) * 3e38                    # inf where the dtype ends
    x[5] = -np.abs(rng.standard_normal(2 * n))                  # negative keys only
    with np.errstate(over="ignore"):
        x = x.astype(dtype)
    rows = x[:, ::2]                                            # rows of n values, a stride of 2
    for k in (175, 700, n):                                    # (174 and below: the heap)
        for chunk, threads in ((None, 1), (7, 2), (512, 1), (None, 2)):
            vals, idx = check("top_k", rows, k=k, chunk_size=chunk, threads=threads)
            # ties exactly as the reference orders them: lowest index first (check allows any order)
            np.testing.assert_array_equal(idx, ref.top_k_order(rows, k))
    check("top_k", rows[[0, 1, 2, 3, 5]], k=900, temperature=0.7)    # (3e38 / 0.7: inf in float32)
    check("top_k", np.ascontiguousarray(rows[1:3]), k=200, softcap=5.0, chunk_size=100)
    check("top_k_logprobs", rows, k=300, chunk_size=256, threads=2)


def test_top_k_more_than_finite_values():
    """k larger than the number of finite entries: the -inf entries follow, lowest index first."""
    x = np.full((2, 50), -inf, dtype=np.float32)
    x[0, [40, 3]] = [1.0, 2.0]
    x[1, 49] = 0.0
    vals, idx = fl.top_k(x, 5, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(idx), [[3, 40, 0, 1, 2], [49, 0, 1, 2, 3]])
    np.testing.assert_array_equal(np.asarray(vals), [[2, 1, -inf, -inf, -inf], [0, -inf, -inf, -inf, -inf]])
    lp, idx = fl.top_k_logprobs(x, 5)
    np.testing.assert_array_equal(np.asarray(idx), [[3, 40, 0, 1, 2], [49, 0, 1, 2, 3]])
    assert (np.asarray(lp)[:, 2:] == -inf).all() and float(np.asarray(lp)[1, 0]) == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_top_k_block_skip_finds_every_candidate(dtype, rng):
    """Once the heap is full, blocks of 32 floats (16 doubles) without a value above its root or a NaN are
    skipped in vector code: a candidate in the last, partial block, a NaN after the heap filled, a value
    tied with the root (which must not enter: the lower index wins), an ascending row (every value enters)
    and random rows, at lengths around the block sizes, against the reference order."""
    for n in (17, 31, 32, 33, 64, 95, 1000, 4099):
        x = rng.standard_normal((6, n)).astype(dtype)
        x[1, -1] = 50.0                                  # the best value last, in the partial block
        x[2, n - 1 - n // 3] = nan                       # a NaN after the heap filled
        x[2, -1] = 40.0
        x[3] = np.arange(n, dtype=dtype)                 # ascending: every value a candidate
        x[4] = np.round(x[4])                            # ties with the root, later indices
        x[5, : n // 2] = -inf                            # the heap fills with -inf first
        for k in sorted({1, 5, min(17, n)}):
            for chunk_size in (None, 7, 40):
                check("top_k", x, k=k, chunk_size=chunk_size, threads=1)
                check("top_k_logprobs", x, k=k, chunk_size=chunk_size, threads=1)


DAZ_SCRIPT = r"""
import ctypes, sys
import numpy as np
import fastlogits as fl
from fastlogits.stream import run as stream_run
from fastlogits.stream.sources import ArraySource

lib = ctypes.CDLL(sys.argv[1])
lib.set_daz()
assert float(np.float32(1e-40) * np.float32(1.0)) == 0.0, "DAZ/FTZ did not take effect"
out = {}
for dt in (np.float32, np.float64):
    tiny = np.finfo(dt).smallest_subnormal
    rows = [[-np.inf, 0.0, -np.inf], [-1.0] * 40 + [0.0] + [-1.0] * 23, [-1.0] * 4099 + [0.0],
            [tiny, 0.0, 3 * tiny, -1.0] * 20, [-np.inf] * 70 + [-0.0, 0.0]]
    out[np.dtype(dt).name] = [
        [int(fl.argmax(np.array(r, dt), threads=1, chunk_size=c)) for r in rows for c in (None, 16)],
        [int(i) for r in rows for i in stream_run.stats(ArraySource(np.array([r], dt)), labels=None,
                                                       threads=1)["argmax"]],
        sorted({int(t) for t in fl.sample(np.array([0.0] * 8 + [-1.0] * 56, dt), top_k=1, seed=0,
                                          num_samples=256, threads=1)}),
    ]
print(repr(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"),
                    reason="MXCSR: x86-64")
def test_argmax_and_top_k_ties_when_the_cpu_treats_subnormals_as_zero(tmp_path):
    """A CPU that treats subnormals as zero (DAZ, set by torch.set_flush_denormal(True) or any library
    built with -ffast-math) reads the float below 0 as -0: argmax found the max's index as the first value
    above the float below the max, read past the row for a max of 0 (index 10 of 3 values), and top-k
    sampling dropped the tokens tied at 0 with the k-th value. Both compare with the max itself now."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler on PATH")
    src = tmp_path / "daz.c"
    src.write_text("#include <xmmintrin.h>\nvoid set_daz(void) { _mm_setcsr(_mm_getcsr() | 0x8040); }\n")
    lib = tmp_path / "libdaz.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", DAZ_SCRIPT, str(lib)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    got = eval(res.stdout.strip())
    want_argmax = [1, 40, 4099, 0, 70]           # under DAZ, subnormals compare equal to 0
    for name in ("float32", "float64"):
        argmax, stats_argmax, tokens = got[name]
        assert argmax == [a for a in want_argmax for _ in (None, 16)], (name, argmax)
        assert stats_argmax == want_argmax, (name, stats_argmax)
        assert tokens == list(range(8)), (name, tokens)
