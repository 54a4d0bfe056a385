"""pytest-benchmark suites: fastlogits against PyTorch (where installed) and NumPy/SciPy on the same array.

Disabled in the normal test run (``--benchmark-disable`` in pyproject.toml), where each benchmark runs
once as a smoke test and checks its result against the float64 reference. Measure with
``pytest benchmarks --benchmark-enable --benchmark-columns=median,ops``; the shape is set by
FASTLOGITS_BENCH_SHAPE (64x32000 when unset, the smoke run's; the issue's is 512x128256).
"""
import os

import numpy as np
import pytest

import fastlogits as fl
from tests import reference as ref

_enabled = os.environ.get("FASTLOGITS_BENCH_SHAPE")
ROWS, VOCAB = (int(v) for v in (_enabled or "64x32000").split("x"))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((ROWS, VOCAB), dtype=np.float32) * 3).astype(np.float32)
    return x, rng.integers(0, VOCAB, ROWS)


def _check(got, want):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, None], ids=["1thread", "allthreads"])
def test_logsumexp_fastlogits(benchmark, data, threads):
    x, _ = data
    got = benchmark(fl.logsumexp, x, threads=threads)
    _check(got, ref.logsumexp(x))


@pytest.mark.parametrize("threads", [1, None], ids=["1thread", "allthreads"])
def test_cross_entropy_fastlogits(benchmark, data, threads):
    x, y = data
    got = benchmark(fl.cross_entropy, x, y, threads=threads)
    _check(got, ref.cross_entropy(x, y))


@pytest.mark.parametrize("threads", [1, None], ids=["1thread", "allthreads"])
def test_softmax_fastlogits(benchmark, data, threads):
    x, _ = data
    got = benchmark(fl.softmax, x, threads=threads)
    np.testing.assert_allclose(got[:4].astype(np.float64), ref.softmax(x[:4]), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("threads", [1, None], ids=["1thread", "allthreads"])
def test_map_into_out_fastlogits(benchmark, data, threads, log):
    """Into a given out= (no page faults): the peers are torch's out= and NumPy's multiply into out."""
    x, _ = data
    out = np.empty_like(x)
    benchmark(fl.log_softmax if log else fl.softmax, x, out=out, threads=threads)
    want = (ref.log_softmax if log else ref.softmax)(x[:4])
    np.testing.assert_allclose(out[:4].astype(np.float64), want, rtol=1e-4, atol=1e-5 if log else 1e-12)


def test_multiply_into_out_numpy(benchmark, data):
    """A read and a write of the array: the floor for a map into out= (one thread)."""
    x, _ = data
    out = np.empty_like(x)
    benchmark(np.multiply, x, np.float32(1.5), out=out)
    np.testing.assert_array_equal(out[:4], x[:4] * np.float32(1.5))


def test_logsumexp_scipy(benchmark, data):
    sp = pytest.importorskip("scipy.special")
    x, _ = data
    _check(benchmark(sp.logsumexp, x, axis=-1), ref.logsumexp(x))


def test_cross_entropy_scipy(benchmark, data):
    sp = pytest.importorskip("scipy.special")
    x, y = data
    rows = np.arange(x.shape[0])
    _check(benchmark(lambda: np.mean(sp.logsumexp(x, axis=-1) - x[rows, y])), ref.cross_entropy(x, y))


def test_softmax_scipy(benchmark, data):
    sp = pytest.importorskip("scipy.special")
    x, _ = data
    got = benchmark(sp.softmax, x, axis=-1)
    np.testing.assert_allclose(got[:4].astype(np.float64), ref.softmax(x[:4]), rtol=1e-4, atol=1e-12)


@pytest.fixture(params=[1, None], ids=["1thread", "allthreads"])
def torch_threads(request):
    """torch on as many threads as the fastlogits case of the same id (its own default differs)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(request.param or fl._config.default_threads())
    yield torch
    torch.set_num_threads(before)


@pytest.fixture
def torch_1thread():
    """torch on one thread, for the one-thread fastlogits cases."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


def test_logsumexp_torch(benchmark, data, torch_threads):
    x, _ = data
    t = torch_threads.from_numpy(x)
    _check(benchmark(torch_threads.logsumexp, t, -1).numpy(), ref.logsumexp(x))


def test_cross_entropy_torch(benchmark, data, torch_threads):
    x, y = data
    t, ty = torch_threads.from_numpy(x), torch_threads.from_numpy(y)
    _check(benchmark(torch_threads.nn.functional.cross_entropy, t, ty).numpy(), ref.cross_entropy(x, y))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_map_into_out_torch(benchmark, data, torch_threads, log):
    x, _ = data
    t, out = torch_threads.from_numpy(x), torch_threads.empty(x.shape)
    benchmark(torch_threads.log_softmax if log else torch_threads.softmax, t, -1, out=out)
    want = (ref.log_softmax if log else ref.softmax)(x[:4])
    got = out[:4].numpy().astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 if log else 1e-12)


def test_softmax_torch(benchmark, data, torch_threads):
    x, _ = data
    got = benchmark(torch_threads.softmax, torch_threads.from_numpy(x), -1).numpy()
    np.testing.assert_allclose(got[:4].astype(np.float64), ref.softmax(x[:4]), rtol=1e-4, atol=1e-12)


# ---- a call's fixed cost: a small classifier's batch (32 rows of 10 classes), whatever the shape above ----

@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(1)
    return (rng.standard_normal((32, 10)) * 3).astype(np.float32), rng.integers(0, 10, 32)


SMALL_OPS = ["logsumexp", "softmax", "log_softmax", "cross_entropy", "argmax"]


def _small_ref(op, x, y):
    return {"logsumexp": ref.logsumexp, "softmax": ref.softmax, "log_softmax": ref.log_softmax,
            "argmax": ref.argmax}[op](x) if op != "cross_entropy" else ref.cross_entropy(x, y)


@pytest.mark.parametrize("op", SMALL_OPS)
def test_small_fastlogits(benchmark, small, op):
    x, y = small
    call = {"cross_entropy": lambda: fl.cross_entropy(x, y)}.get(op, lambda: getattr(fl, op)(x))
    got = benchmark(call)
    (np.testing.assert_array_equal if op == "argmax" else _check)(got, _small_ref(op, x, y))


@pytest.mark.parametrize("op", SMALL_OPS)
def test_small_torch(benchmark, small, op):
    torch = pytest.importorskip("torch")
    t, ty = torch.from_numpy(small[0]), torch.from_numpy(small[1])
    F = torch.nn.functional
    call = {"logsumexp": lambda: torch.logsumexp(t, -1), "softmax": lambda: torch.softmax(t, -1),
            "log_softmax": lambda: torch.log_softmax(t, -1), "cross_entropy": lambda: F.cross_entropy(t, ty),
            "argmax": lambda: torch.argmax(t, -1)}[op]
    got = benchmark(call).numpy()
    (np.testing.assert_array_equal if op == "argmax" else _check)(got, _small_ref(op, *small))


# ---- many short rows: a classifier's outputs over a dataset (65536 rows of 10 classes), a cost a row ----

@pytest.fixture(scope="module")
def short_rows():
    rng = np.random.default_rng(2)
    return (rng.standard_normal((65536, 10)) * 3).astype(np.float32), rng.integers(0, 10, 65536)


@pytest.mark.parametrize("op", ["logsumexp", "cross_entropy", "argmax"])
def test_short_rows_fastlogits(benchmark, short_rows, op):
    x, y = short_rows
    if op == "logsumexp":
        _check(benchmark(fl.logsumexp, x, threads=1), ref.logsumexp(x))
    elif op == "cross_entropy":
        _check(benchmark(fl.cross_entropy, x, y, reduction="none", threads=1),
               ref.cross_entropy(x, y, reduction="none"))
    else:
        np.testing.assert_array_equal(benchmark(fl.argmax, x, threads=1), ref.argmax(x))


@pytest.mark.parametrize("op", ["logsumexp", "cross_entropy", "argmax"])
def test_short_rows_torch(benchmark, short_rows, op, torch_1thread):
    torch = torch_1thread
    t, ty = torch.from_numpy(short_rows[0]), torch.from_numpy(short_rows[1])
    if op == "logsumexp":
        _check(benchmark(torch.logsumexp, t, -1).numpy(), ref.logsumexp(short_rows[0]))
    elif op == "cross_entropy":
        got = benchmark(torch.nn.functional.cross_entropy, t, ty, reduction="none").numpy()
        _check(got, ref.cross_entropy(*short_rows, reduction="none"))
    else:
        np.testing.assert_array_equal(benchmark(torch.argmax, t, -1).numpy(), ref.argmax(short_rows[0]))


# ---- logits laid out by columns: a transposed (V, rows) matrix, as W @ H gives them, one thread ----------

@pytest.fixture(scope="module")
def by_columns():
    rng = np.random.default_rng(3)
    rows, vocab = (1024, 32000) if _enabled else (64, 2000)
    a = (rng.standard_normal((vocab, rows), dtype=np.float32) * 3).astype(np.float32)
    return a.T, rng.integers(0, vocab, rows)


@pytest.mark.parametrize("op", ["logsumexp", "softmax", "cross_entropy"])
def test_by_columns_fastlogits(benchmark, by_columns, op):
    x, y = by_columns
    if op == "logsumexp":
        _check(benchmark(fl.logsumexp, x, threads=1), ref.logsumexp(x))
    elif op == "softmax":
        _check(benchmark(fl.softmax, x, threads=1), ref.softmax(x))
    else:
        _check(benchmark(fl.cross_entropy, x, y, reduction="none", threads=1),
               ref.cross_entropy(x, y, reduction="none"))


@pytest.mark.parametrize("op", ["logsumexp", "softmax", "cross_entropy"])
def test_by_columns_torch(benchmark, by_columns, op, torch_1thread):
    torch = torch_1thread
    x, y = by_columns
    t, ty = torch.from_numpy(x.T).T, torch.from_numpy(y)
    if op == "logsumexp":
        _check(benchmark(torch.logsumexp, t, -1).numpy(), ref.logsumexp(x))
    elif op == "softmax":
        _check(benchmark(torch.softmax, t, -1).numpy(), ref.softmax(x))
    else:
        got = benchmark(torch.nn.functional.cross_entropy, t, ty, reduction="none").numpy()
        _check(got, ref.cross_entropy(x, y, reduction="none"))


@pytest.mark.parametrize("threads", [1, None], ids=["1thread", "allthreads"])
def test_top_k_fastlogits(benchmark, data, threads):
    x, _ = data
    vals, idx = benchmark(fl.top_k, x, 50, threads=threads)
    np.testing.assert_array_equal(idx, ref.top_k_order(x, 50))


def test_top_k_torch(benchmark, data, torch_threads):
    x, _ = data
    got = benchmark(torch_threads.topk, torch_threads.from_numpy(x), 50)
    np.testing.assert_array_equal(got.indices.numpy(), ref.top_k_order(x, 50))


@pytest.mark.parametrize("threads", [1, None], ids=["1thread", "allthreads"])
def test_argmax_fastlogits(benchmark, data, threads):
    x, _ = data
    np.testing.assert_array_equal(benchmark(fl.argmax, x, threads=threads), np.argmax(x, axis=-1))


def test_argmax_numpy(benchmark, data):
    x, _ = data
    np.testing.assert_array_equal(benchmark(np.argmax, x, axis=-1), ref.argmax(x))
