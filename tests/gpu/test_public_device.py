"""GPU arrays through the public API (under the simulator in CI): device arrays in, device arrays out,
results equal to the CPU's on the same logits."""
import numpy as np
import pytest

import fastlogits as fl
from tests.helpers import awkward_rows

# the simulator computes with NumPy scalars, which warn where the GPU silently gives inf or NaN
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _scalar(a):
    """A "mean" or "sum" loss of device logits: a 0-d device array (like PyTorch's), as a float."""
    assert not isinstance(a, np.ndarray) and tuple(a.shape) == (), f"not a 0-d device array: {a!r}"
    return float(a.copy_to_host())


@pytest.fixture()
def cuda(gpu):
    from numba import cuda
    return cuda


def test_device_arrays_in_and_out(cuda, rng):
    awkward = np.stack(list(awkward_rows(np.float32, 130, rng).values())).astype(np.float32)
    x = np.concatenate([awkward[:6], rng.standard_normal((3, 130)).astype(np.float32)])
    y = rng.integers(0, 130, x.shape[0])
    dx = cuda.to_device(x)
    tol = dict(rtol=2e-5, atol=2e-5, equal_nan=True)
    for name in ("logsumexp", "entropy"):
        got = getattr(fl, name)(dx, temperature=0.8)
        assert not isinstance(got, np.ndarray), f"{name} of a device array came back to the host"
        np.testing.assert_allclose(_host(got), getattr(fl, name)(x, temperature=0.8), **tol)
    for name in ("softmax", "log_softmax"):
        got = getattr(fl, name)(dx)
        assert not isinstance(got, np.ndarray) and tuple(got.shape) == x.shape
        np.testing.assert_allclose(_host(got), getattr(fl, name)(x), **tol)
    np.testing.assert_array_equal(_host(fl.argmax(dx)), fl.argmax(x))
    v, i = fl.top_k(dx, 3)
    np.testing.assert_array_equal(_host(i), fl.top_k(x, 3)[1])
    np.testing.assert_allclose(_host(v), fl.top_k(x, 3)[0], **tol)
    lp, i = fl.top_k_logprobs(dx, 2)
    np.testing.assert_allclose(_host(lp), fl.top_k_logprobs(x, 2)[0], **tol)
    per_row = fl.cross_entropy(dx, y, reduction="none", label_smoothing=0.1)
    assert not isinstance(per_row, np.ndarray)
    np.testing.assert_allclose(_host(per_row), fl.cross_entropy(x, y, reduction="none", label_smoothing=0.1),
                               **tol)
    clean = cuda.to_device(x[6:])
    assert _scalar(fl.cross_entropy(clean, cuda.to_device(y[6:]))) == pytest.approx(
        float(fl.cross_entropy(x[6:], y[6:])), rel=2e-5)
    with pytest.raises(ValueError, match="backend='cpu'"):
        fl.logsumexp(dx, backend="cpu")


def test_device_bfloat16_bits_and_leading_axes(cuda, rng):
    import ml_dtypes
    x = rng.standard_normal((2, 3, 257)).astype(ml_dtypes.bfloat16)
    dx = cuda.to_device(x.view(np.uint16))
    # bfloat16 device data (its uint16 bits) declared with prepare(dtype="bfloat16")
    from fastlogits.ops import _backend
    from fastlogits.ops._prep import prepare
    r = prepare(dx, dtype="bfloat16")
    assert r.dtype == "bfloat16" and r.lead == (2, 3)
    got = _backend.get("gpu").lse(r.x, r.dtype, r.temperature, r.softcap, r.chunk, r.threads)
    np.testing.assert_allclose(_host(got).reshape(2, 3), fl.logsumexp(x), rtol=2e-5)
    out = fl.softmax(cuda.to_device(x.astype(np.float32)), dtype="bfloat16")
    want = fl.softmax(x.astype(np.float32), dtype="bfloat16").astype(np.float32)
    np.testing.assert_allclose(_host(out).view(ml_dtypes.bfloat16).astype(np.float32), want, rtol=1e-2)


def test_bfloat16_exported_as_void(cuda, rng):
    """PyTorch and ml_dtypes export bfloat16 through __cuda_array_interface__ as "<V2": such device data is
    read as bfloat16. Its bits as a uint16 device array are refused with that advice (a view as V2)."""
    x = (rng.standard_normal((3, 300)) * 4).astype(np.float32)
    import ml_dtypes
    xb = x.astype(ml_dtypes.bfloat16)
    dv = cuda.to_device(xb.view(np.dtype("V2")))
    np.testing.assert_allclose(_host(fl.logsumexp(dv)), fl.logsumexp(xb), rtol=2e-5, atol=2e-5)
    du = cuda.to_device(xb.view(np.uint16))
    with pytest.raises(TypeError, match=r"got integer dtype uint16; bfloat16 bits on a GPU are read "
                                        r"through a 2-byte void view, x.view\('V2'\)$"):
        fl.logsumexp(du)
    np.testing.assert_array_equal(_host(fl.logsumexp(du.view(np.dtype("V2")))), _host(fl.logsumexp(dv)))
    y = np.array([0, 299, 7])
    assert _scalar(fl.cross_entropy(dv, cuda.to_device(y))) == pytest.approx(float(fl.cross_entropy(xb, y)),
                                                                           rel=2e-5)


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32])
def test_cross_entropy_device_labels(cuda, rng, label_dtype):
    """Device logits and device labels: the terms are combined on the device, and equal the CPU's for every
    reduction, with class weights, label smoothing, z-loss and ignored rows; labels of shape (2, 3) for
    logits of shape (2, 3, V)."""
    V = 70
    x = (rng.standard_normal((2, 3, V)) * 3).astype(np.float32)
    x[0, 1, 5] = np.inf                      # a row whose loss is NaN
    y = rng.integers(0, V, (2, 3)).astype(label_dtype)
    y[1, 2] = -100
    w = rng.random(V) + 0.5
    dx, dy = cuda.to_device(x), cuda.to_device(y)
    for kw in (dict(), dict(weight=w, label_smoothing=0.2, z_loss=1e-3), dict(label_smoothing=0.1)):
        for reduction in ("none", "mean", "sum"):
            got = fl.cross_entropy(dx, dy, reduction=reduction, **kw)
            want = fl.cross_entropy(x, y.astype(np.int64), reduction=reduction, **kw)
            if reduction == "none":
                assert not isinstance(got, np.ndarray) and tuple(got.shape) == (2, 3)
                got = _host(got)
            else:
                got = _scalar(got)
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, equal_nan=True,
                                       err_msg=f"{reduction} {sorted(kw)}")
    clean = cuda.to_device(np.ascontiguousarray(x[1]))
    for kw in (dict(), dict(weight=w, label_smoothing=0.3, z_loss=1e-2)):
        for reduction in ("mean", "sum"):
            got = _scalar(fl.cross_entropy(clean, cuda.to_device(y[1]), reduction=reduction, **kw))
            want = float(fl.cross_entropy(x[1], y[1].astype(np.int64), reduction=reduction, **kw))
            assert np.isfinite(want) and got == pytest.approx(want, rel=2e-5), (reduction, sorted(kw))
    # results are the caller's: a second call does not write into the first one's (float64: no cast)
    d64 = cuda.to_device(x.astype(np.float64))
    first = fl.cross_entropy(d64, dy, reduction="none")
    kept = _host(first).copy()
    fl.cross_entropy(cuda.to_device(x.astype(np.float64) * 2), dy, reduction="none")
    assert np.array_equal(_host(first), kept, equal_nan=True)
    ignored = cuda.to_device(np.full((2, 3), -1, label_dtype))
    assert np.isnan(_scalar(fl.cross_entropy(dx, ignored, ignore_index=-1)))          # like PyTorch
    assert _scalar(fl.cross_entropy(dx, ignored, ignore_index=-1, reduction="sum")) == 0.0
    # counted rows whose targets all weigh 0: NaN (PyTorch's 0 / 0), with smoothing too, not inf
    w0 = np.ones(V)
    w0[np.asarray(y).reshape(-1)[np.asarray(y).reshape(-1) >= 0]] = 0.0
    for eps in (0.0, 0.2):
        assert np.isnan(_scalar(fl.cross_entropy(dx, dy, weight=w0, label_smoothing=eps)))
        assert np.isnan(fl.cross_entropy(x, y.astype(np.int64), weight=w0, label_smoothing=eps))
    # the result dtype: float32, float64 for float64 logits (cast on the device)
    assert np.dtype(fl.cross_entropy(dx, dy).dtype) == np.float32
    assert np.dtype(fl.cross_entropy(d64, dy, reduction="sum").dtype) == np.float64


def test_cross_entropy_bad_device_labels(cuda, rng, monkeypatch):
    """A device label out of range is found on the device, without a wait in the call: the loss is NaN,
    and the IndexError naming the label and its row is raised by fastlogits.gpu.synchronize() or the
    thread's next GPU call, once. Host labels are checked at once. A device label array of the wrong
    dtype or shape is explained as for host labels."""
    import fastlogits.gpu
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    dx = cuda.to_device(x)
    y = np.zeros((2, 3), np.int64)
    y[1, 0] = 40
    y[1, 2] = -5
    with pytest.raises(IndexError, match=r"label 40 at row \(1, 0\) is out of range for 40 classes"):
        fl.cross_entropy(dx, y)                       # host labels: checked before anything runs
    got = fl.cross_entropy(dx, cuda.to_device(y))
    assert np.isnan(_scalar(got))
    with pytest.raises(IndexError, match=r"label 40 at row \(1, 0\) is out of range for 40 classes.*"
                                         r"found on the device by an earlier cross_entropy call"):
        fastlogits.gpu.synchronize()
    fastlogits.gpu.synchronize()                      # reported once
    per_row = fl.cross_entropy(cuda.to_device(x[1]), cuda.to_device(np.array([0, 3, -5], np.int32)),
                               reduction="none")
    p = _host(per_row)                                # (waits for the device, reads no report)
    assert np.isnan(p[2]) and np.all(np.isfinite(p[:2]))
    with pytest.raises(IndexError, match=r"label -5 at row 2 is out of range .*ignore_index=-100"):
        fl.logsumexp(dx)                              # the next GPU call, once the device has reported
    np.testing.assert_allclose(_host(fl.logsumexp(dx)), fl.logsumexp(x), rtol=2e-5)
    # sum and ignore_index: the bad row is not an ignored one
    y3 = np.array([7, -1, 99], np.int64)
    assert np.isnan(_scalar(fl.cross_entropy(cuda.to_device(x[0]), cuda.to_device(y3), ignore_index=-1,
                                             reduction="sum")))
    with pytest.raises(IndexError, match=r"label 99 at row 2 .*ignore_index=-1\)"):
        fastlogits.gpu.synchronize()
    # bad calls queued before the report is read (the backend, which does not check; a real GPU runs them
    # before the host looks): the first is reported, and the later ones counted, as invalid too
    from fastlogits.ops import _backend
    from fastlogits.ops._prep import prepare
    B = _backend.get("gpu")
    r = prepare(cuda.to_device(x[0]))
    for n_bad in (1, 2):
        for labels in (np.array([1, 50, 2], np.int64), np.array([60, 0, 0], np.int64),
                       np.array([0, 1, 2], np.int64), np.array([0, 1, 70], np.int64))[:n_bad + 2]:
            B.cross_entropy_device(r.x, r.dtype, r.temperature, r.softcap, cuda.to_device(labels), -100,
                                   None, 0.0, 0.0, r.chunk, "mean", np.dtype(np.float32), (3,))
        later = r"1 later GPU call also .*: its" if n_bad == 1 else r"2 later GPU calls also .*: their"
        with pytest.raises(IndexError, match=rf"label 50 at row 1 .*; {later} results .* are invalid too"):
            fastlogits.gpu.synchronize()
        fastlogits.gpu.synchronize()                  # the count goes with the report
    # a report whose call is no longer kept (more than ERROR_CALLS_KEPT calls of the thread since) is still
    # raised, with the row and the value the device found
    from fastlogits.gpu import backend as GB
    monkeypatch.setattr(GB, "ERROR_CALLS_KEPT", 2)
    for labels in (np.array([1, 50, 2]), np.array([0, 1, 2]), np.array([0, 1, 2]), np.array([0, 77, 2])):
        B.cross_entropy_device(r.x, r.dtype, r.temperature, r.softcap, cuda.to_device(labels), -100,
                               None, 0.0, 0.0, r.chunk, "mean", np.dtype(np.float32), (3,))
    with pytest.raises(ValueError, match=r"an earlier GPU call found bad input on the device at row 1 \(a "
                                         r"label out of range, .*: 50\); 1 later GPU call also found"):
        fastlogits.gpu.synchronize()
    monkeypatch.undo()
    with pytest.raises(TypeError, match="labels must be integers"):
        fl.cross_entropy(dx, cuda.to_device(np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match="leading shape"):
        fl.cross_entropy(dx, cuda.to_device(np.zeros(6, np.int64)))
    # a non-contiguous device label array takes the host path: same result
    y2 = np.zeros((2, 6), np.int64)
    y2[:, ::2] = rng.integers(0, 40, (2, 3))
    got = _scalar(fl.cross_entropy(dx, cuda.to_device(y2)[:, ::2]))
    assert got == pytest.approx(float(fl.cross_entropy(x, y2[:, ::2])), rel=2e-5)


def test_temperature_upload_follows_each_call(cuda, rng):
    """The kept device copy of the temperatures is reused only while they are unchanged."""
    x = rng.standard_normal((3, 50)).astype(np.float32)
    dx = cuda.to_device(x)
    for t in (1.0, 2.0, np.array([0.5, 1.0, 3.0]), np.array([0.5, 1.0, 4.0]), 1.0):
        np.testing.assert_allclose(_host(fl.logsumexp(dx, temperature=t)), fl.logsumexp(x, temperature=t),
                                   rtol=2e-5, err_msg=str(t))


@pytest.mark.parametrize("in_dtype", ["float32", "bfloat16", "float64"])
def test_bfloat16_maps_stay_on_the_device(cuda, rng, in_dtype):
    """softmax / log_softmax to bfloat16 of device logits are rounded on the device and written into the
    device result (new, or the caller's out of bfloat16 bits: uint16, or "<V2" as PyTorch exports it):
    equal to the CPU's bits but where the float32 results straddle a rounding boundary (then one ulp);
    the awkward rows (all -inf, +inf, NaN, huge) included. Host logits into a device out too."""
    import ml_dtypes
    BF = np.dtype(ml_dtypes.bfloat16)
    rows = awkward_rows(np.float32, 300, rng)
    x = np.stack(list(rows.values()) + [rng.standard_normal(300) * 5]).astype(np.float64)
    xh = x.astype(BF) if in_dtype == "bfloat16" else x.astype(in_dtype)
    dx = cuda.to_device(xh.view(np.dtype("V2")) if in_dtype == "bfloat16" else xh)

    def check(got_bits, want):
        g = np.asarray(got_bits).view(np.uint16).astype(np.int32)
        w = want.view(np.uint16).astype(np.int32)
        gn, wn = np.isnan(g.astype(np.uint16).view(BF).astype(np.float32)), np.isnan(want.astype(np.float32))
        np.testing.assert_array_equal(gn, wn)
        assert np.abs(g - w)[~wn].max() <= 1

    for name in ("softmax", "log_softmax"):
        want = getattr(fl, name)(xh, dtype="bfloat16")
        got = getattr(fl, name)(dx, dtype="bfloat16")
        assert not isinstance(got, np.ndarray) and np.dtype(got.dtype) == np.uint16
        check(got.copy_to_host(), want)
        for out in (cuda.device_array(x.shape, np.uint16),
                    cuda.to_device(np.zeros(x.shape, BF).view(np.dtype("V2")))):
            res = getattr(fl, name)(dx, out=out, dtype="bfloat16")
            assert res is out
            check(out.copy_to_host(), want)
        res = getattr(fl, name)(dx, out=cuda.to_device(np.zeros(x.shape, BF).view(np.dtype("V2"))))
        check(res.copy_to_host(), want)                # "<V2" is bfloat16 without dtype= too
        host_in = getattr(fl, name)(xh, backend="gpu", out=cuda.device_array(x.shape, np.uint16),
                                    dtype="bfloat16")
        check(host_in.copy_to_host(), want)
    with pytest.raises(TypeError, match="out: dtype='bfloat16' re-declares 2-byte data, but out has dtype "
                                        "float32"):
        fl.softmax(dx, out=cuda.device_array(x.shape, np.float32), dtype="bfloat16")
    with pytest.raises(ValueError, match="disagrees"):
        fl.softmax(dx, out=cuda.device_array(x.shape, np.float32), dtype="float16")
    with pytest.raises(ValueError, match="backend='gpu'"):
        fl.softmax(xh, backend="cpu", out=cuda.device_array(x.shape, np.float32))


def test_device_out_layouts_and_overlap(cuda, rng):
    """A device out is written in place through a (rows, V) view of the caller's memory: strided last
    axes and 3-D outs whose leading axes merge work; leading axes that do not merge raise (a reshaped copy
    would never be written); an out over the logits' own memory is refused, as on the CPU."""
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    dx = cuda.to_device(x)
    want = fl.softmax(x)
    for sl in (np.s_[:, :, ::-1], np.s_[:, :, :], np.s_[:1]):
        base = cuda.to_device(np.full((2, 3, 5), 7.0, np.float32))
        out = base[sl]
        got = fl.log_softmax(dx[sl], out=out)
        assert got is out
        np.testing.assert_allclose(_host(base)[sl], fl.log_softmax(x[sl]), rtol=2e-6, atol=1e-6)
    for sl in (np.s_[::-1], np.s_[:, ::-1]):
        out = cuda.to_device(np.full((2, 3, 5), 7.0, np.float32))[sl]
        with pytest.raises(ValueError, match="leading axes do not merge"):
            fl.softmax(dx, out=out)
    strided = cuda.to_device(np.zeros((2, 6, 5), np.float32))[:, ::2]
    fl.softmax(dx, out=strided)                       # rows 6 apart in memory merge: leading (2, 3)
    np.testing.assert_allclose(_host(strided), want, rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="out overlaps logits"):
        fl.softmax(dx, out=dx)
    with pytest.raises(ValueError, match="out overlaps logits"):
        fl.softmax(dx[:, :2], out=dx[:, 1:])
    d = cuda.to_device(rng.standard_normal((4, 6)).astype(np.float32))
    fl.softmax(d[:2], out=d[2:])                      # disjoint rows of one array are fine
    np.testing.assert_allclose(_host(d)[2:], fl.softmax(_host(d)[:2]), rtol=2e-6, atol=1e-7)
    h = _host(d)
    fl.softmax(d[:, ::2], out=d[:, 1::2])             # and interleaved columns, as on the CPU
    np.testing.assert_allclose(_host(d)[:, 1::2], fl.softmax(h[:, ::2]), rtol=2e-6, atol=1e-7)
    zero = cuda.to_device(np.zeros((1, 5), np.float32))
    flat = type(zero)(np.lib.stride_tricks.as_strided(zero._ary, (3, 5), (0, 4))) if hasattr(zero, "_ary") \
        else None
    if flat is not None:                              # (the simulator's arrays can carry a zero stride)
        with pytest.raises(ValueError, match="out overlaps itself"):
            fl.softmax(dx[0], out=flat)


def test_host_row_blocks_into_device_outs_with_negative_strides(cuda, gpu, monkeypatch, rng):
    """Host logits moved in row blocks, mapped into a device out over reversed columns (or rows): each
    block writes its rows of the caller's memory. (numba's own slice of such an out comes out empty, a
    null pointer: a kernel wrote through it on an H200; the simulator now refuses that slice too.)"""
    x = rng.standard_normal((5, 40)).astype(np.float32)
    monkeypatch.setattr(gpu, "HOST_BLOCK_BYTES", 2 * 40 * 4)           # blocks of two rows
    for sl in (np.s_[:, ::-1], np.s_[::-1], np.s_[::-1, ::-2]):
        base = cuda.to_device(np.full((5, 80), 7.0, np.float32))[:, :40] if sl != np.s_[::-1, ::-2] \
            else cuda.to_device(np.full((5, 80), 7.0, np.float32))
        out = base[sl]
        assert fl.log_softmax(x, out=out, backend="gpu") is out
        np.testing.assert_allclose(_host(base)[sl], fl.log_softmax(x, backend="cpu"), rtol=2e-6, atol=1e-6)


def test_empty_device_maps(cuda, gpu, monkeypatch):
    """softmax of empty device logits gives an empty device array (its own result was refused as an out
    that overlaps itself: an empty array's axes have zero strides); an empty device out is filled. No
    backend work is done: numba cannot slice an empty device array on a GPU (one element over a null
    pointer), where the simulator's arrays can."""
    def no_work(*a, **k):
        raise AssertionError("backend work for an empty map")

    monkeypatch.setattr(gpu, "softmax", no_work)
    monkeypatch.setattr(gpu, "rows_out", no_work)
    for shape in [(3, 0), (0, 5), (2, 0, 4)]:
        dx = cuda.to_device(np.zeros(shape, np.float32))
        for f in (fl.softmax, fl.log_softmax):
            got = f(dx)
            assert not isinstance(got, np.ndarray) and hasattr(got, "copy_to_host") and got.shape == shape
            out = cuda.to_device(np.zeros(shape, np.float32))
            assert f(dx, out=out) is out


def test_overlap_of_device_addresses(gpu):
    """backend.overlaps on real device arrays goes by their __cuda_array_interface__ addresses (the
    simulator's arrays are host arrays): np.shares_memory's exact answer, no memory read."""
    at = gpu._AtAddresses
    base = 0x7F0000000000

    def cai(offset, shape, strides, typestr="<f4"):
        return np.asarray(at({"data": (base + offset, False), "shape": shape, "strides": strides,
                              "typestr": typestr}))

    evens, odds = cai(0, (4, 3), (24, 8)), cai(4, (4, 3), (24, 8))      # interleaved columns of (4, 6)
    assert not np.shares_memory(evens, odds)
    assert np.shares_memory(evens, cai(8, (4, 2), (24, 4)))             # columns 2..3 meet column 2
    assert not np.shares_memory(cai(0, (2, 6), None), cai(48, (2, 6), None))   # rows 0-1 and 2-3
    assert np.shares_memory(cai(0, (2, 6), None), cai(44, (1, 1), None))
    assert np.shares_memory(cai(0, (3,), None, "<V2"), cai(4, (1,), None, "<V2"))

    class Device:                  # a foreign device array: only its interface, never read
        def __init__(self, offset, shape, strides):
            self.shape = shape
            self.__cuda_array_interface__ = {"data": (base + offset, False), "shape": shape,
                                             "strides": strides, "typestr": "<f4", "version": 3}

    assert not gpu.overlaps(Device(0, (4, 3), (24, 8)), Device(4, (4, 3), (24, 8)))
    assert gpu.overlaps(Device(0, (4, 3), (24, 8)), Device(8, (4, 2), (24, 4)))
    assert not gpu.overlaps(Device(0, (2, 6), None), Device(0, (0, 6), None))


def test_streamed_statistics_follow_the_backend(gpu, rng, monkeypatch):
    """fastlogits stats / demo's pass (stream.run.stats) runs its row blocks on the backend asked for (it
    ran on the CPU whatever --backend said), with the same results."""
    from fastlogits.stream import run

    x = (rng.standard_normal((5, 40)) * 3).astype(np.float32)
    x[2, 7] = np.inf
    y = rng.integers(0, 40, 5)
    y[1] = -100
    calls = []
    real = gpu.stats
    monkeypatch.setattr(gpu, "stats", lambda *a: calls.append(1) or real(*a))
    got = run.stats(x, y, backend="gpu")
    assert calls, "the GPU backend was not used"
    want = run.stats(x, y, backend="cpu")
    for key in ("nll", "entropy"):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=2e-5, equal_nan=True, err_msg=key)
    np.testing.assert_array_equal(got["argmax"], want["argmax"])


def test_cli_commands_run_on_the_backend_asked_for(gpu, tmp_path, rng, monkeypatch):
    """softmax and topk with --backend gpu run their row blocks on the GPU (each command passes --backend
    on to its calls; main() sets no process-wide backend any more), with the CPU's results."""
    from fastlogits.cli import main

    x = (rng.standard_normal((6, 50)) * 3).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    calls = []
    for name in ("softmax", "top_k"):
        real = getattr(gpu, name)
        monkeypatch.setattr(gpu, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    src = str(tmp_path / "x.npy")
    assert main(["softmax", src, str(tmp_path / "p.npy"), "--backend", "gpu"]) == 0
    assert main(["topk", src, str(tmp_path / "t.npy"), "-k", "4", "--backend", "gpu"]) == 0
    assert set(calls) == {"softmax", "top_k"}, calls
    assert fl.get_backend() == "cpu"
    want = fl.softmax(x, backend="cpu")
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), want, rtol=2e-5, atol=1e-7)
    lp, idx = fl.top_k_logprobs(x, 4, backend="cpu")
    t = np.load(tmp_path / "t.npy")
    np.testing.assert_array_equal(t["ids"], idx)
    np.testing.assert_allclose(t["logprobs"], lp, rtol=2e-5, atol=2e-5)


def test_device_calls_never_wait_for_the_device(cuda, rng, monkeypatch, forbid_waits):
    """Every operation on device logits queues its kernels and returns device results without waiting for
    the device, as PyTorch's CUDA calls do: no copy to the host and no synchronize inside the call (host
    arguments go up, they never come back). Results equal the CPU's."""
    x = (rng.standard_normal((4, 200)) * 3).astype(np.float32)
    x[2, 7] = -np.inf
    y = rng.integers(0, 200, 4)
    y[3] = -100
    T = rng.uniform(0.5, 1.5, 4)
    calls = {
        "logsumexp": lambda a, lab: fl.logsumexp(a, temperature=T),
        "softmax": lambda a, lab: fl.softmax(a, softcap=20.0),
        "log_softmax": lambda a, lab: fl.log_softmax(a, temperature=0.7),
        "entropy": lambda a, lab: fl.entropy(a),
        "argmax": lambda a, lab: fl.argmax(a),
        "top_k": lambda a, lab: fl.top_k(a, 5),
        "top_k_logprobs": lambda a, lab: fl.top_k_logprobs(a, 5, temperature=T),
        "cross_entropy none": lambda a, lab: fl.cross_entropy(a, lab, reduction="none", label_smoothing=0.1),
        "cross_entropy mean": lambda a, lab: fl.cross_entropy(a, lab, z_loss=1e-3),
        "cross_entropy sum": lambda a, lab: fl.cross_entropy(a, lab, weight=np.linspace(0.5, 2, 200),
                                                             reduction="sum"),
        "sample": lambda a, lab: fl.sample(a, seed=5, top_p=0.9, return_logprobs=True),
        "beam_search_step": lambda a, lab: fl.beam_search_step(a, np.log(T / 2), 2),
    }
    dx, dy = cuda.to_device(x), cuda.to_device(y)
    for fn in calls.values():               # compiled, and scratch kept, before the check
        fn(dx, y)
    forbid_waits()
    got = {(name, kind): fn(dx, lab) for name, fn in calls.items()
           for kind, lab in (("host labels", y), ("device labels", dy))
           if kind == "device labels" or name.startswith("cross_entropy")}
    monkeypatch.undo()
    for (name, kind), g in got.items():
        g = g if isinstance(g, tuple) else (g,)
        want = calls[name](x, y)
        want = want if isinstance(want, tuple) else (want,)
        assert not any(isinstance(a, (np.ndarray, np.generic, float)) for a in g), (name, kind)
        for a, b in zip(g, want):
            np.testing.assert_allclose(_host(a), b, rtol=2e-5, atol=2e-5, err_msg=f"{name}, {kind}")


def test_cross_entropy_on_device_of_edge_losses_as_on_the_host(cuda):
    """Device logits give the host's (and PyTorch's) losses where they are edge cases (found by an audit
    helper): an empty vocabulary with label smoothing (every row ignored: (eps / V) * 0 = inf * 0 = NaN,
    not 0) and a z-loss term of a huge float64 logsumexp, z lse^2 = 1e306 (formed (z lse) lse on both, not
    overflowing to inf on the host)."""
    y = np.array([-100, -100])
    for reduction in ("none", "sum", "mean"):
        kw = dict(label_smoothing=0.1, reduction=reduction)
        got = fl.cross_entropy(cuda.to_device(np.zeros((2, 0))), y, **kw).copy_to_host()
        np.testing.assert_equal(got, fl.cross_entropy(np.zeros((2, 0)), y, **kw))
        assert np.all(np.isnan(got))
    x = np.array([[1e155, 0.0]])
    for reduction in ("none", "sum", "mean"):
        kw = dict(z_loss=1e-4, reduction=reduction)
        got = fl.cross_entropy(cuda.to_device(x), np.array([1]), **kw).copy_to_host()
        host = fl.cross_entropy(x, np.array([1]), **kw)
        np.testing.assert_allclose(got, 1e306, rtol=1e-15)        # 1e155 + 1e-4 (1e155)^2, exactly 1e306
        np.testing.assert_allclose(host, 1e306, rtol=1e-15)
