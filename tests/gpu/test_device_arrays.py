"""Device arrays in, device arrays out: the GPU backend's interface used directly (as_rows and the backend
functions), under the simulator with its device arrays."""

import ml_dtypes
import numpy as np
import pytest
from numba import cuda

import fastlogits as fl
from fastlogits.gpu.kernels import store_bf16

BF16 = np.dtype(ml_dtypes.bfloat16)
ONES = np.ones(1)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def host(a):
    assert not isinstance(a, np.ndarray), "a device input gave a host result"
    return a.copy_to_host()


def temps(rows):
    return np.ones(rows)


def test_as_rows_shapes_and_dtypes(gpu, rng):
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    d, lead, name = gpu.as_rows(cuda.to_device(x), None)
    assert (tuple(d.shape), lead, name) == ((6, 5), (2, 3), "float32")
    np.testing.assert_array_equal(host(d), x.reshape(6, 5))
    d, lead, name = gpu.as_rows(cuda.to_device(x[0, 0]), None)
    assert (tuple(d.shape), lead) == ((1, 5), ())
    wide = cuda.to_device(np.concatenate([x, x[:, :1]], axis=1))    # (2, 4, 5)
    d, lead, _ = gpu.as_rows(wide[:, :3], None)      # leading axes that do not merge (a real numba device
    assert lead == (2, 3)                             # array transposes only in 2-D: a slice instead)
    np.testing.assert_array_equal(host(d), x.reshape(6, 5))
    bits = x[0].astype(BF16).view(np.uint16)
    d, lead, name = gpu.as_rows(cuda.to_device(bits), "bfloat16")
    assert name == "bfloat16" and np.dtype(d.dtype) == np.uint16
    d2, _, name2 = gpu.as_rows(cuda.to_device(x[0].astype(BF16)), None)
    assert name2 == "bfloat16"
    with pytest.raises(TypeError, match="floating point"):
        gpu.as_rows(cuda.to_device(np.arange(5)), None)
    with pytest.raises(TypeError, match="bfloat16"):
        gpu.as_rows(cuda.to_device(x), "bfloat16")


def test_device_results(gpu, rng):
    x = (rng.standard_normal((3, 40)) * 3).astype(np.float32)
    x[1, 4] = np.inf
    d, _, name = gpu.as_rows(cuda.to_device(x), None)
    t = temps(3)
    from fastlogits.cpu import backend as cpu

    for fn in ("lse", "entropy"):
        got = host(getattr(gpu, fn)(d, name, t, 0.0, 4096, 1))
        np.testing.assert_allclose(got, getattr(cpu, fn)(x, name, t, 0.0, 4096, 1), rtol=2e-5)
    got = host(gpu.argmax(d, name, t, 0.0, 4096, 1))
    assert got.tolist() == cpu.argmax(x, name, t, 0.0, 4096, 1).tolist()
    v, i = gpu.top_k(d, name, t, 0.0, 3, True, 4096, 1)
    cv, ci = cpu.top_k(x, name, t, 0.0, 3, True, 4096, 1)
    np.testing.assert_array_equal(host(i), ci)
    np.testing.assert_allclose(host(v), cv, rtol=2e-5)
    labels = np.array([0, 5, -100])
    got = gpu.cross_entropy_rows(d, name, t, 0.0, labels, -100, None, True, 4096, 1)
    want = cpu.cross_entropy_rows(x, name, t, 0.0, labels, -100, None, True, 4096, 1)
    for g, w in zip(got, want):
        np.testing.assert_allclose(host(g), w, rtol=2e-5, atol=1e-5)
    out = cuda.device_array((3, 40), np.float32)
    gpu.softmax(d, name, t, 0.0, False, out, "float32", 4096, 1)
    want = fl.softmax(x, backend="cpu")
    np.testing.assert_allclose(host(out), want, rtol=2e-5, atol=1e-30)
    out_h = np.empty((3, 40), BF16)  # a host out for device logits (what the ops layer passes)
    gpu.softmax(d, name, t, 0.0, True, out_h, "bfloat16", 4096, 1)
    want = fl.log_softmax(x, backend="cpu", dtype="bfloat16")
    np.testing.assert_allclose(out_h.astype(np.float64), want.astype(np.float64), rtol=2**-7)
    np.testing.assert_array_equal(host(d), x)  # the caller's logits were not written to


def test_device_cross_entropy_sums_with_compensation(gpu):
    """The device path's "mean" and "sum" (ce_reduce) add the rows' losses with compensation, as the CPU
    does: one loss of 1e16 does not swallow 40 losses of log 2 (a plain sum, per thread or in the block's
    tree, does); an inf or NaN loss stays inf or NaN; and the mean divides its two parts as IEEE and
    PyTorch do (class weights of both signs summing to 0 give ±inf, or NaN for infinities of both signs)."""
    import math

    n = 40
    x = np.zeros((n + 1, 2))
    x[0, 1] = -1e16                    # row 0: label 1 has loss 1e16
    y = np.zeros(n + 1, np.int64)
    y[0] = 1
    exact = math.fsum([1e16] + [math.log(2.0)] * n)

    def loss(x, y, **kw):
        return float(host(fl.cross_entropy(cuda.to_device(x), cuda.to_device(np.array(y)), **kw)))

    assert loss(x, y, reduction="sum") == exact
    assert loss(x, y, reduction="mean") == exact / (n + 1)
    for bad, want in ((-np.inf, np.inf), (np.nan, np.nan)):
        xb = x.copy()
        xb[n // 2, 0] = bad
        for reduction in ("sum", "mean"):
            np.testing.assert_equal(loss(xb, y, reduction=reduction), want)
    w = np.array([1.0, -1.0, 0.0], np.float32)      # the CPU test's cases (torch 2.13's values)
    for xs, ys, *wants in (([[0, 1, 2], [0, 2, 3]], [1, 0], np.inf, np.inf),
                           ([[0, 0, 5], [0, 1, 0]], [1, 0], -np.inf, np.nan),
                           ([[0, 1, 2], [2, 1, 0]], [2, 2], np.nan, np.nan)):
        for eps, want in zip((0.0, 0.1), wants):
            np.testing.assert_equal(loss(np.array(xs, np.float32), ys, weight=w, label_smoothing=eps), want)
    # Neumaier's other branch (a term larger than the running sum), in one thread's rows: losses log 3,
    # 1e16 log 3 and -1e16 log 3 sum to log 3 (a mutation audit: a one-branch sum gave 2)
    x = np.zeros((257, 3))
    y = np.full(257, -100)
    y[[0, 128, 256]] = [0, 1, 2]
    w = np.array([1.0, 1e16, -1e16])
    assert loss(x, y, weight=w, reduction="sum") == pytest.approx(math.log(3), rel=1e-15)
    # label smoothing's total weight from the weights as the kernels read them: float32(1e8 + 1) is 1e8
    got = loss(np.zeros((1, 3), np.float32), [1], weight=np.array([1e8 + 1, 1, -1e8]), label_smoothing=1.0,
               reduction="sum")
    assert got == pytest.approx(math.log(3) / 3, rel=1e-6)


def test_host_logits_unchanged(gpu, rng):
    x = (rng.standard_normal((3, 30)) * 3).astype(BF16)
    copy = x.copy()
    for name in ("logsumexp", "softmax", "entropy", "argmax"):
        getattr(fl, name)(x, backend="gpu", temperature=2.0, softcap=4.0)
    fl.cross_entropy(x, np.array([1, 2, 3]), backend="gpu", label_smoothing=0.1)
    assert np.array_equal(x.view(np.uint16), copy.view(np.uint16))


def test_strided_device_logits(gpu, rng):
    x = (rng.standard_normal((4, 60)) * 3).astype(np.float64)
    dv = cuda.to_device(x)[::2, ::-3]  # non-contiguous, negative column stride
    d, _, name = gpu.as_rows(dv, None)
    got = host(gpu.lse(d, name, temps(2), 0.0, 4096, 1))
    np.testing.assert_allclose(got, fl.logsumexp(x[::2, ::-3], backend="cpu"), rtol=1e-12)


def test_benchmark_smoke(gpu):
    """fastlogits.gpu.timing runs end to end (the simulator's timings are meaningless)."""
    from fastlogits.gpu import timing

    res = timing.benchmark((2, 40), dtypes=("bfloat16",), repeat=1, torch_too=False)
    assert set(res["bfloat16"]) >= {"logsumexp_s", "logsumexp_GBps", "cross_entropy_s", "cross_entropy_GBps"}
    assert "copy_GBps" in res
    smp = timing.sample_benchmark((2, 64), repeat=1, torch_too=False)
    assert {"plain_s", "top_k_top_p_s"} <= set(smp) and smp["shape"] == [2, 64]
    # both timed calls are checked against the CPU's draws (the filtered one was not: a bench audit)
    assert smp["ok"] and smp["plain_same_rows"] == smp["top_k_top_p_same_rows"] == smp["rows_checked"] == 2
    from fastlogits import bench

    table = bench.gpu_table(dict(res, sampling=smp))
    assert "| logsumexp | bfloat16 |" in table and "| top_k_top_p (torch: HF pipeline) |" in table


def test_the_sampling_benchmarks_filtered_draws_are_checked(gpu, monkeypatch):
    """A wrong top-k/top-p draw on the GPU (here: token 0 on every row) fails the benchmark's check, and
    bench reports it; only the plain draw was compared with the CPU's (a bench audit)."""
    from fastlogits import bench
    from fastlogits.gpu import timing
    from fastlogits.ops import sampling

    real = sampling.sample

    def wrong_when_filtered(x, **kw):
        out = real(x, **kw)
        if kw.get("top_k") and kw.get("backend") != "cpu":
            return cuda.to_device(np.zeros(out.shape, np.int64))
        return out

    monkeypatch.setattr(sampling, "sample", wrong_when_filtered)
    smp = timing.sample_benchmark((4, 64), repeat=1, torch_too=False)
    assert smp["plain_same_rows"] == 4 and smp["top_k_top_p_same_rows"] < 3 and not smp["ok"], smp
    (line,) = bench.wrong_results([], {"sampling": smp})
    assert "4 of 4 rows the same plain" in line and "with top-k and top-p" in line


def test_the_benchmarks_check_covers_the_last_rows(gpu):
    """The GPU benchmark's logsumexp was checked on its first 4 rows only: a wrong last row (the last
    blocks' rows) passed. Its first and last rows are checked, against the host block they repeat."""
    from fastlogits.gpu import timing

    shape = (300, 40)                                 # (the device rows repeat a block of 256)
    x = timing._host_block(shape, "float32")
    rows = np.arange(shape[0]) % x.shape[0]
    lse = np.log(np.exp(x.astype(np.float64)).sum(-1))[rows].astype(np.float32)
    labels = np.zeros(shape[0], np.int64)
    ce = np.float32(np.mean(lse - x[rows, 0]))

    class Host:                                       # a device array's copy_to_host
        def __init__(self, a):
            self.a = a

        def copy_to_host(self):
            return self.a

    assert timing.verify(shape, "float32", labels, Host(lse), ce)["logsumexp_ok"]
    bad = lse.copy()
    bad[-1] *= 1.001
    assert not timing.verify(shape, "float32", labels, Host(bad), ce)["logsumexp_ok"]


def test_stats_matches_cpu(gpu, rng):
    """backend.stats (nll, entropy, argmax per row, one fused pass), as the streaming statistics call it:
    random and edge rows (NaN, +inf, all -inf, ties), rows split over several blocks (small chunk)."""
    from fastlogits.cpu import backend as cpu
    from tests.helpers import awkward_rows

    edge = awkward_rows(np.float32, 50)
    x = np.concatenate([(rng.standard_normal((3, 50)) * 3).astype(np.float32), np.stack(list(edge.values()))])
    n = x.shape[0]
    t = rng.uniform(0.5, 2.0, n)
    labels = rng.integers(0, 50, n)
    labels[1] = -100
    bf = x.astype(ml_dtypes.bfloat16)
    for dtype, xs, lab, chunk in (("float32", x, labels, 4096), ("float32", x, None, 4096),
                                  ("float32", x, labels, 16), ("bfloat16", bf, labels, 16)):
        got = gpu.stats(xs, dtype, t, 0.0, lab, -100, chunk, 1)
        want = cpu.stats(xs, dtype, t, 0.0, lab, -100, chunk, 1)
        scale = 1 + np.abs(np.where(np.isfinite(x), x / t[:, None], 0)).max(axis=1)
        for a, b in zip(got[:2], want[:2]):
            assert np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(np.isinf(a), np.isinf(b))
            fin = np.isfinite(b)
            assert np.all(np.abs(a - b)[fin] <= 2e-5 * scale[fin]), (dtype, chunk, list(edge))
        np.testing.assert_array_equal(got[2], want[2])


def test_segments(gpu):
    """How rows are split over blocks: at most MAX_SEGMENT columns a block (many rows of a large
    vocabulary: a block a row, measured fastest on an H200; a longer row in several), more segments while
    the grid is small, never segments shorter than the chunk, every column in exactly one segment, and
    never more segments than a grid's y dimension launches (65535)."""
    from fastlogits.gpu import backend as B

    cases = {
        (8192, 128256, 4096): 1,          # a large batch: a block a row
        (8192, 1_000_000, 4096): 8,       # a longer row: segments of at most MAX_SEGMENT
        (600, 1000, 4096): 1,             # enough rows, a short vocabulary: a block a row
        (2, 4_000_000, 4096): 256,        # few rows: segments until TARGET_BLOCKS blocks run
        (3, 1000, 100): 10,               # ... but none shorter than the chunk
        (1, 50, 4096): 1,
        (7, 0, 4096): 1,
        (1, 65535 * 131072, 4096): 65535,           # the most segments CUDA launches (grid y)
        (1, 65535 * 131072 + 1, 4096): 65535,       # a longer row (17 GB of float16): longer segments
        (3, 2**40 + 7, 4096): 65535,
    }
    for (rows, V, chunk), want in cases.items():
        nseg, seglen = B._segments(rows, V, chunk)
        assert nseg == want, (rows, V, chunk, nseg)
        assert (nseg - 1) * seglen < V <= nseg * seglen or V == 0, (rows, V, nseg, seglen)
        if V // chunk >= -(-V // B.MAX_SEGMENT) and V <= B.MAX_GRID_Y * B.MAX_SEGMENT:
            assert seglen <= B.MAX_SEGMENT, (rows, V, seglen)     # (the chunk allows segments that short)


def test_foreign_arrays_are_ordered_on_the_device(gpu, monkeypatch):
    """An array from another library is imported without numba's host wait (as_cuda_array(sync=False));
    the default stream, where the kernels run, waits on the device for its producer's stream: the one its
    __cuda_array_interface__ names, or for a PyTorch tensor (whose interface names none) PyTorch's
    current stream. The default streams (0 from PyTorch, 1, 2) and no stream need nothing. When the
    public call ends, each such stream waits for the call's work on the default stream: once, at the end
    of the outer call. (The ordering itself needs a GPU: test_real_device.py.)"""
    import sys
    import types

    from fastlogits.ops import _backend
    from fastlogits.ops._backend import ordered

    calls = []

    class FakeEvent:
        def record(self, stream):
            calls.append(("record", stream))

        def wait(self, stream):
            calls.append(("wait", stream))

    class FakeCuda:
        @staticmethod
        def as_cuda_array(x, sync=True):
            calls.append(("import", sync))
            return cuda.to_device(x.host)

        @staticmethod
        def event(timing=True):
            calls.append(("event", timing))
            return FakeEvent()

        @staticmethod
        def external_stream(ptr):
            return ("stream", ptr)

        default_stream = staticmethod(lambda: "default stream")

    class Foreign:
        def __init__(self, host, stream):
            self.host = host
            self.__cuda_array_interface__ = {"shape": host.shape, "typestr": host.dtype.str, "version": 3,
                                             "data": (0, False), "strides": None, "stream": stream}

    torch = types.ModuleType("torch")            # a stand-in: its current stream is what PyTorch says
    current = {"stream": 0}

    class Tensor(Foreign):
        device = "cuda:0"

        def __init__(self, host):
            super().__init__(host, None)
            del self.__cuda_array_interface__["stream"]          # version 2: no stream

    def current_stream(device):
        assert device == "cuda:0"
        return types.SimpleNamespace(cuda_stream=current["stream"])

    torch.Tensor = Tensor
    torch.cuda = types.SimpleNamespace(current_stream=current_stream)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(gpu, "cuda", FakeCuda)
    for name in ("order_event", "default_stream"):
        monkeypatch.setattr(gpu._local, name, None, raising=False)
    monkeypatch.setattr(_backend._calls, "streams", None, raising=False)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for a in (Foreign(x, None), Foreign(x, 1), Foreign(x, 2), Tensor(x)):      # (PyTorch's stream: 0)
        calls.clear()
        d = gpu._device_view(a)
        assert calls == [("import", False)], a.__cuda_array_interface__
        np.testing.assert_array_equal(d.copy_to_host(), x)
    gpu.order_streams()
    assert calls == [("import", False)]

    @ordered
    def public(*arrays, inner=False):
        for a in arrays:
            gpu._device_view(a)
        if inner:                    # a public call inside another orders nothing itself
            public(Foreign(x, 0x7F10))
            assert calls[-1] == "kernels"            # (and no event recorded after it)
        calls.append("kernels")

    calls.clear()
    current["stream"] = 0x7F08
    public(Foreign(x, 0x7F00), Tensor(x), Foreign(x, 0x7F00), inner=True)
    wait = [("wait", "default stream")]
    assert calls == [("import", False), ("event", False), ("record", ("stream", 0x7F00)), *wait,
                     ("import", False), ("record", ("stream", 0x7F08)), *wait,
                     ("import", False), ("record", ("stream", 0x7F00)), *wait,
                     ("import", False), ("record", ("stream", 0x7F10)), *wait, "kernels", "kernels",
                     ("record", "default stream"), ("wait", ("stream", 0x7F00)), ("wait", ("stream", 0x7F08)),
                     ("wait", ("stream", 0x7F10))]
    calls.clear()
    with pytest.raises(ZeroDivisionError):       # a call that raises has queued work too
        ordered(lambda: (gpu._device_view(Foreign(x, 0x7F00)), 1 / 0))()
    assert calls[-2:] == [("record", "default stream"), ("wait", ("stream", 0x7F00))]
    calls.clear()
    public(Foreign(x, None))
    assert calls == [("import", False), "kernels"]          # nothing left over from earlier calls
    import fastlogits as fl

    for name in ("logsumexp", "entropy", "softmax", "log_softmax", "cross_entropy", "argmax", "top_k",
                 "top_k_logprobs", "sample", "beam_search_step"):       # every public function of arrays
        assert getattr(fl, name).__code__ is ordered(len).__code__, name


@cuda.jit
def _store_all(src, out):
    i = cuda.grid(1)
    if i < src.shape[1]:
        store_bf16(out, 0, i, src[0, i])


def test_store_bf16_rounds_as_ml_dtypes(gpu, rng):
    """The bfloat16 store of the maps: round to nearest, ties to even, as ml_dtypes rounds; overflow to
    inf, subnormals, signed zeros, and NaN (a NaN of its sign)."""
    bits = np.concatenate([
        rng.integers(0, 1 << 32, 300, dtype=np.uint64).astype(np.uint32),
        (rng.integers(0, 1 << 16, 40, dtype=np.uint32) << 16) | 0x8000,              # exact ties
        (rng.integers(0, 1 << 16, 40, dtype=np.uint32) << 16) | 0x7FFF,              # just below
        np.array([0, 0x80000000, 1, 0x007FFFFF, 0x7F7FFFFF, 0x7F7F8000, 0x7F800000, 0xFF800000,
                  0x7FC00000, 0xFFC00001, 0x7F800001], np.uint32)])
    src = bits.view(np.float32)[None, :]
    out = cuda.to_device(np.zeros_like(src, dtype=np.uint16))
    _store_all[(src.shape[1] + 127) // 128, 128](cuda.to_device(src), out)
    got = out.copy_to_host()[0]
    want = src[0].astype(BF16).view(np.uint16)
    nan = np.isnan(src[0])
    np.testing.assert_array_equal(got[~nan], want[~nan])
    g = got[nan].view(BF16).astype(np.float32)
    assert np.isnan(g).all() and np.array_equal(np.signbit(g), np.signbit(src[0][nan]))


def test_store_bf16_rounds_float64_once(gpu, rng):
    """A float64 value just past a bfloat16 tie rounds away from it (through a float32 rounded to nearest
    it would land on the tie and go to even): the stored value is the float64 rounded once, exactly."""
    k = rng.integers(-20, 20, 200)
    tie = 1.0 + (2.0 * rng.integers(0, 2**7, 200) + 1.0) * 2.0**-8
    v = rng.choice([-1.0, 1.0], 200) * np.ldexp(tie + rng.choice([-1.0, 1.0], 200) * 2.0**-30, k)
    src = np.concatenate([v, [0.0, -0.0, 1.0, 3e38, -np.inf]])[None, :]
    out = cuda.to_device(np.zeros(src.shape, np.uint16))
    _store_all[(src.shape[1] + 127) // 128, 128](cuda.to_device(src), out)
    got = out.copy_to_host()[0].view(BF16).astype(np.float64)
    m, e = np.frexp(src[0])                         # exact: the significand rounded to 8 bits, half to even
    want = np.ldexp(np.round(m * 2.0**8) / 2.0**8, e)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[201])


def test_accumulators_and_sources_say_what_to_do_with_device_arrays(gpu, rng, tmp_path):
    """A device chunk given to an accumulator, or a device out given for a source, is refused with what to
    do instead (the accumulators' error advised backend='gpu', which they do not take; found by an audit
    agent), and the state (lse, np.ones(rows)) of a logsumexp computed on the device merges as advised."""
    from numba import cuda

    x = rng.standard_normal((2, 40)).astype(np.float32)
    for acc in (fl.stream.LogSumExp(2), fl.stream.CrossEntropy(np.array([1, 2]))):
        with pytest.raises(ValueError, match=r"fold chunks on the CPU, and this chunk lives on a GPU: copy") \
                as e:
            acc.update(cuda.to_device(np.ascontiguousarray(x[:, :20])), 0)
        # only a LogSumExp merges a bare (lse, np.ones(rows)) state, made with its own temperature and softcap
        assert ("(lse, np.ones(rows))" in str(e.value)) == isinstance(acc, fl.stream.LogSumExp)
    acc = fl.stream.LogSumExp(2).update(x[:, :20], 0)
    lse = fl.logsumexp(cuda.to_device(np.ascontiguousarray(x[:, 20:])), backend="gpu")
    acc.merge((np.asarray(lse.copy_to_host(), np.float64), np.ones(2)))
    np.testing.assert_allclose(acc.result(), fl.logsumexp(x), rtol=2e-6)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(TypeError, match="a source is written block by block from the host"):
        fl.softmax(fl.open(tmp_path / "x.npy"), out=cuda.device_array((2, 40), np.float32), backend="gpu")


def test_device_arrays_refuse_what_numba_refuses_on_a_gpu(gpu):
    """Under the simulator the device arrays and launches keep numba's rules on a GPU (conftest's
    _numba_device_array_rules): each case refused here is refused on a GPU too (a launch there with a CUDA
    error rather than a ValueError); the first two once failed fastlogits' tests on an H200 only."""
    from .conftest import simulated

    if not simulated():
        pytest.skip("the rules are numba's own on a GPU")
    x = cuda.to_device(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    with pytest.raises(RuntimeError, match="non-empty slice into empty slice"):
        cuda.to_device(np.zeros((3, 0), np.float32))[1:]
    with pytest.raises(NotImplementedError, match="non-2D"):
        x.transpose((1, 0, 2))
    with pytest.raises(NotImplementedError, match="negative strides"):
        x[:, :, ::-1].copy_to_host()
    with pytest.raises(NotImplementedError, match="requir.* cop"):
        x[:, :2].reshape(4, 4)
    with pytest.raises(NotImplementedError, match="non-contiguous"):
        x[:, ::2].ravel()
    with pytest.raises(ValueError, match="C-contiguous"):
        x[:, :, :2].view(np.float16)
    with pytest.raises(RuntimeError, match=r"to shape \(2, 0\), where NumPy gives \(2, 4\)"):
        x[0, :, ::-1][1:]                        # numba: rows of reversed columns come out empty
    for grid, block in [(0, 32), ((4, 0), 32), (1, 0), (1, 1025), ((1, 65536), 32)]:
        with pytest.raises(ValueError, match="CUDA_ERROR_INVALID_VALUE"):
            _store_all[grid, block](x[0], cuda.device_array((3, 4), np.uint16))
    # what numba allows stays allowed: views, their copies, a 2-D transpose (a new array, not a view)
    np.testing.assert_array_equal(x[:, ::2].copy_to_host(), np.arange(24).reshape(2, 3, 4)[:, ::2])
    np.testing.assert_array_equal(x.reshape(6, 4).copy_to_host(), np.arange(24).reshape(6, 4))
    t = x[0].T
    np.testing.assert_array_equal(t.copy_to_host(), np.arange(12).reshape(3, 4).T)
    assert t.is_c_contiguous()
    assert x[1:1].shape == (0, 3, 4) and x[:, :, :2].view(np.int32).shape == (2, 3, 2)


class _AtHostAddress:
    """A device array as numba's real one looks to the backend's address arithmetic (shape, strides,
    dtype, size and a __cuda_array_interface__), over host memory, and the NumPy view of an interface."""

    def __init__(self, a):
        self.shape, self.strides, self.dtype, self.size = a.shape, a.strides, a.dtype, a.size
        self.__cuda_array_interface__ = {"shape": a.shape, "strides": a.strides, "typestr": a.dtype.str,
                                         "data": (a.__array_interface__["data"][0], False), "version": 3}

    def copy_to_host(self):
        return np.array(self.as_cuda_array(self)._ary)

    @staticmethod
    def as_cuda_array(obj, sync=True):
        """numba's as_cuda_array for interfaces over host memory: a simulator array viewing it."""
        view = type("View", (), {"__array_interface__": {**obj.__cuda_array_interface__, "version": 3}})()
        return type(cuda.to_device(np.zeros(1)))(np.asarray(view))


def test_row_blocks_of_arrays_with_negative_strides(gpu, monkeypatch):
    """backend._row_block takes rows of a device array by its __cuda_array_interface__ (numba's own slice
    of an array with a negative stride comes out empty: a null pointer, written through on an H200). Here
    the interface is a host array's, imported by a stand-in for numba's as_cuda_array, so that the
    address arithmetic is checked against NumPy's on real memory, writes included. (On a GPU the public
    API checks it: test_host_row_blocks_into_device_outs_with_negative_strides.)"""
    from .conftest import simulated

    if not simulated():
        pytest.skip("host memory as a device array: the simulator's arrays only")
    monkeypatch.setattr(gpu.cuda, "as_cuda_array", _AtHostAddress.as_cuda_array, raising=False)
    base = np.arange(120, dtype=np.float32).reshape(6, 20)
    for view in (base[:, ::-4], base[::-1, 3::2], base[::-2, ::-3], base[:, :5]):
        rows = view.shape[0]
        whole = _AtHostAddress(view)
        assert gpu._row_block(whole, slice(0, rows)) is whole
        for sl in (slice(1, rows), slice(0, 1), slice(rows - 2, rows - 1)):
            got = gpu._row_block(_AtHostAddress(view), sl)._ary
            np.testing.assert_array_equal(got, view[sl])
            got[...] = -1.0                              # a view: writes land in the caller's rows
            assert np.all(view[sl] == -1.0)
            base[...] = np.arange(120, dtype=np.float32).reshape(6, 20)


def test_host_copies_of_arrays_with_negative_strides(gpu, monkeypatch):
    """backend.to_host (labels, beam scores) and as_rows' fallback copy a device array of any strides:
    numba refuses a negative one, so such axes are copied through a view with the sign turned and turned
    back on the host. The address arithmetic runs on host memory (see _AtHostAddress); a device array of
    leading axes that do not merge, with a negative stride, goes through the public API (on a GPU too)."""
    from .conftest import simulated

    if simulated():                  # host memory as a device array: the simulator's arrays only
        monkeypatch.setattr(gpu.cuda, "as_cuda_array", _AtHostAddress.as_cuda_array, raising=False)
        base = np.arange(2 * 3 * 20, dtype=np.float64).reshape(2, 3, 20)
        for view in (base[:, :, ::-3], base[::-1, ::-1, 1::4], base[:, ::-2, :], base[::-1, :1, ::-1],
                     base[0, 0, ::-1], base[:, 1:2, :7]):
            got = gpu._host_copy(_AtHostAddress(view))
            assert got.shape == view.shape and not np.shares_memory(got, base)
            np.testing.assert_array_equal(got, view)
        assert gpu._host_copy(_AtHostAddress(base[:, :0, ::-1])).shape == (2, 0, 20)
        monkeypatch.undo()
    x = np.random.default_rng(5).standard_normal((2, 3, 16)).astype(np.float32)
    d = cuda.to_device(x)[:, ::-1]                 # leading axes that do not merge: copied once
    np.testing.assert_allclose(fl.logsumexp(d).copy_to_host(), fl.logsumexp(x[:, ::-1]), rtol=2e-6)
    labels = cuda.to_device(np.arange(6) % 16)[::-1]
    np.testing.assert_allclose(fl.cross_entropy(x.reshape(6, 16), labels, reduction="none"),
                               fl.cross_entropy(x.reshape(6, 16), np.arange(6)[::-1] % 16, reduction="none"),
                               rtol=2e-6)


def test_arrays_of_another_gpu_are_refused_naming_them(gpu, monkeypatch, rng):
    """A PyTorch tensor on cuda:1 (or a CuPy array on device 1) while numba's current device is 0: the
    kernels would read another device's memory in numba's context (an illegal address). Refused, naming
    the argument and both devices (a GPU-code audit); one on the current device, and numba's own arrays,
    are read as before. (The simulator's device has no id: a stand-in current device 0 here.)"""
    import types

    monkeypatch.setattr(gpu.cuda, "get_current_device", lambda: types.SimpleNamespace(id=0))
    # (the simulator imports no foreign interface: the stand-in's data, as in the test above)
    monkeypatch.setattr(gpu.cuda, "as_cuda_array", lambda a, sync=True: cuda.to_device(a.host), raising=False)
    x = rng.standard_normal((3, 7)).astype(np.float32)

    class Foreign:                     # a library's device array: its interface and its device
        def __init__(self, host, device):
            self.host, self.shape, self.dtype = host, host.shape, host.dtype
            self.device = device
            self.__cuda_array_interface__ = {"shape": host.shape, "typestr": host.dtype.str, "version": 3,
                                             "data": (0, False), "strides": None, "stream": None}

    torch_dev = lambda i: types.SimpleNamespace(type="cuda", index=i)      # noqa: E731
    cupy_dev = lambda i: types.SimpleNamespace(id=i)                      # noqa: E731
    for dev in (torch_dev(1), cupy_dev(3)):
        n = getattr(dev, "index", None) or dev.id
        with pytest.raises(ValueError, match=rf"^logits is on GPU {n}, but fastlogits runs on numba's "
                                             rf"current GPU, 0: call numba.cuda.select_device\({n}\) first"):
            fl.logsumexp(Foreign(x, dev), backend="gpu")
        for logits in (cuda.to_device(x), x):     # (host logits: the copy of device labels is named too)
            with pytest.raises(ValueError, match=rf"^labels is on GPU {n}"):
                fl.cross_entropy(logits, Foreign(np.array([0, 6, 2]), dev))
        with pytest.raises(ValueError, match=rf"^out is on GPU {n}"):
            fl.softmax(cuda.to_device(x), out=Foreign(np.empty_like(x), dev), backend="gpu")
    for dev in (torch_dev(0), cupy_dev(0), None):
        got = fl.logsumexp(Foreign(x, dev), backend="gpu")
        np.testing.assert_allclose(host(got), np.log(np.exp(x.astype(np.float64)).sum(1)), rtol=2e-6)
