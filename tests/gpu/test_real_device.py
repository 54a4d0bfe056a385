"""GPU-only tier: shapes the simulator cannot run in reasonable time, and zero-copy from other libraries.
Skipped under the simulator (run with NUMBA_ENABLE_CUDASIM=0 on a machine with an NVIDIA GPU)."""
import math

import numpy as np
import pytest
from numba import cuda

import fastlogits as fl

from .conftest import simulated

pytestmark = pytest.mark.skipif(simulated(), reason="real-GPU tier: run with NUMBA_ENABLE_CUDASIM=0 on a GPU")


@cuda.jit
def _fill(x, seed):
    """x[r, j] = a deterministic pseudo-random value in [-8, 8) (an integer hash of the flat index)."""
    r = cuda.blockIdx.x
    for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        h = (np.int64(r) * x.shape[1] + j) * 2654435761 + seed
        h = (h ^ (h >> 13)) & 0xFFFFFF
        x[r, j] = h * (16.0 / 16777216.0) - 8.0


def test_real_vocabulary(gpu, rng):
    x = (rng.standard_normal((64, 128256)) * 4).astype(np.float32)
    d = cuda.to_device(x)
    for name in ("logsumexp", "entropy"):
        got = getattr(gpu, "lse" if name == "logsumexp" else name)(d, "float32", np.ones(64), 0.0, 4096, 1)
        want = getattr(fl, name)(x, backend="cpu")
        np.testing.assert_allclose(got.copy_to_host(), want, rtol=2e-5, atol=2e-5)
    v, i = fl.top_k(x, 50, backend="gpu")
    cv, ci = fl.top_k(x, 50, backend="cpu")
    np.testing.assert_array_equal(i, ci)
    got = fl.cross_entropy(x, np.arange(64), backend="gpu", reduction="none")
    np.testing.assert_allclose(got, fl.cross_entropy(x, np.arange(64), backend="cpu", reduction="none"),
                               rtol=2e-5, atol=2e-5)


def test_few_long_rows_split_over_blocks(gpu, rng):
    x = (rng.standard_normal((2, 3_000_000)) * 3).astype(np.float32)
    np.testing.assert_allclose(fl.logsumexp(x, backend="gpu"), fl.logsumexp(x, backend="cpu"), rtol=2e-5)
    np.testing.assert_array_equal(fl.argmax(x, backend="gpu"), fl.argmax(x, backend="cpu"))


def test_index_past_2_31_elements(gpu):
    """rows * V past 2^31 elements (float16, 4.3 GB on the device): the last rows are right."""
    V = 128256
    rows = (2**31) // V + 2
    try:
        d = cuda.device_array((rows, V), np.float16)
    except Exception as e:           # a smaller device
        pytest.skip(f"cannot allocate {rows * V * 2 / 2**30:.1f} GiB on this device: {e}")
    _fill[rows, 256](d, 12345)
    got = gpu.lse(d, "float16", np.ones(rows), 0.0, 4096, 1).copy_to_host()
    tail = d[rows - 3:].copy_to_host()
    np.testing.assert_allclose(got[-3:], fl.logsumexp(tail, backend="cpu"), rtol=2e-5)
    assert math.isfinite(got[0])
    # sampling reads the same rows: per-row seeds (row id 0), so the tail alone draws the same tokens
    from fastlogits.cpu import backend as cpu

    def args(n):
        return (np.ones(n), 0.0, np.full(n, 50, np.int64), np.full(n, 0.9), np.zeros(n),
                np.arange(n, dtype=np.uint64)[::-1].copy(), np.zeros(n, np.uint64), 2, True, 4096, 1)

    tok, lp, rank, status = gpu.sample(d, "float16", *args(rows))
    ctok, clp, crank, cstatus = cpu.sample(tail, "float16", *args(3))
    assert not status.any() and not cstatus.any()
    np.testing.assert_array_equal(tok[-3:], ctok)
    np.testing.assert_array_equal(rank[-3:], crank)


def test_sample_real_vocabulary_same_tokens(gpu, rng):
    """CPU and GPU draw the same tokens at a real vocabulary (random rows, per-row seeds and filters)."""
    from fastlogits import check

    from .conftest import REPORT

    totals = np.zeros(4, np.int64)
    for dtype in ("float32", "bfloat16"):
        x, kw = check.sample_inputs(rng, 1024, 128256, dtype)
        totals += check.sample_agreement(x, kw, num_samples=4)
    pairs, same, draws, same_draws = (int(v) for v in totals)
    REPORT.append(f"sample on the GPU, V = 128256: {same}/{pairs} (row, seed) pairs draw the same tokens as "
                  f"the CPU ({same / pairs:.3%}), {same_draws}/{draws} draws")
    assert same >= check.MIN_SAME_TOKEN_RATE * pairs, REPORT[-1]


def test_torch_cuda_tensor_zero_copy(gpu):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    t = torch.randn(4, 3, 1000, device="cuda") * 3
    d, lead, name = gpu.as_rows(t, None)
    assert lead == (4, 3) and name == "float32"
    assert d.__cuda_array_interface__["data"][0] == t.data_ptr()       # zero-copy
    got = gpu.lse(d, name, np.ones(12), 0.0, 4096, 1).copy_to_host()
    want = torch.logsumexp(t, -1).reshape(-1).cpu().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5)
    bits = t.to(torch.bfloat16).view(torch.int16)
    d, _, name = gpu.as_rows(bits, "bfloat16")
    got = gpu.lse(d, name, np.ones(12), 0.0, 4096, 1).copy_to_host()
    want = torch.logsumexp(t.to(torch.bfloat16).float(), -1).reshape(-1).cpu().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_torch_tensors_through_the_public_api(gpu, rng):
    """PyTorch CUDA tensors straight into the public API, bfloat16 included ("<V2"), and the cross-entropy
    with device labels against F.cross_entropy on the same tensors; rows of a real vocabulary, so that a
    row is split into segments (MAX_SEGMENT) and folded in full chunks."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    F = torch.nn.functional
    g = torch.Generator(device="cuda").manual_seed(int(rng.integers(1 << 30)))
    x32 = torch.randn(256, 128256, device="cuda", generator=g) * 4
    y = torch.randint(0, 128256, (256,), device="cuda", generator=g)
    y[::7] = -100
    w = torch.rand(128256, device="cuda", generator=g) + 0.5
    for t in (x32, x32.to(torch.bfloat16)):
        ref = t.float()
        got = fl.logsumexp(t)
        np.testing.assert_allclose(cuda.as_cuda_array(got).copy_to_host(),
                                   torch.logsumexp(ref, -1).cpu().numpy(), rtol=2e-5, atol=2e-5)
        for kw in (dict(), dict(label_smoothing=0.1)):
            want = F.cross_entropy(ref, y, **kw).item()
            got = fl.cross_entropy(t, y, **kw)
            assert tuple(got.shape) == () and not isinstance(got, np.ndarray), "mean: a 0-d device array"
            assert float(got.copy_to_host()) == pytest.approx(want, rel=2e-5), kw
        want = F.cross_entropy(ref, y, weight=w, label_smoothing=0.2, reduction="sum").item()
        got = fl.cross_entropy(t, y, weight=w.cpu().numpy(), label_smoothing=0.2, reduction="sum")
        assert float(got.copy_to_host()) == pytest.approx(want, rel=2e-5)
        per_row = fl.cross_entropy(t, y.to(torch.int32), reduction="none")
        np.testing.assert_allclose(cuda.as_cuda_array(per_row).copy_to_host(),
                                   F.cross_entropy(ref, y, reduction="none").cpu().numpy(), rtol=2e-5,
                                   atol=2e-5)
    # a beam search step with PyTorch beam scores (read in place), and host logits with device scores
    bs = torch.log(torch.rand(256, device="cuda", generator=g) + 0.1)
    host = x32.cpu().numpy()
    want = fl.beam_search_step(host, bs.cpu().numpy(), 4, backend="cpu")
    for got in (fl.beam_search_step(x32, bs, 4), fl.beam_search_step(host, bs, 4, backend="gpu")):
        got = [cuda.as_cuda_array(a).copy_to_host() if not isinstance(a, np.ndarray) else a for a in got]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])
        np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=2e-5)
    # earlier PyTorch releases exported bfloat16 as "<f2" (float16's typestr): the tensor's dtype decides
    class OldTorchBF16:
        dtype = torch.bfloat16

        def __init__(self, t):
            self.t = t
            self.__cuda_array_interface__ = dict(t.__cuda_array_interface__, typestr="<f2")

    t = x32[:4].to(torch.bfloat16)
    got = fl.logsumexp(OldTorchBF16(t))
    np.testing.assert_allclose(cuda.as_cuda_array(got).copy_to_host(),
                               torch.logsumexp(t.float(), -1).cpu().numpy(), rtol=2e-5, atol=2e-5)
    bad = y.clone()
    bad[5] = 128256
    got = fl.cross_entropy(x32, bad)          # checked on the device, reported without a wait in the call
    import fastlogits.gpu
    with pytest.raises(IndexError, match="label 128256 at row 5 .* found on the device"):
        fastlogits.gpu.synchronize()
    assert np.isnan(got.copy_to_host())
    fastlogits.gpu.synchronize()              # reported once


def test_tensor_from_another_stream(gpu, rng):
    """A tensor still being written on a PyTorch side stream (PyTorch's streams do not wait for the legacy
    default stream, nor it for them, and a PyTorch tensor's __cuda_array_interface__ names no stream):
    fastlogits' kernels wait for PyTorch's current stream on the device, with no wait on the host, and
    read the finished values; the side stream's next work waits for them and reads their results."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    g = torch.Generator(device="cuda").manual_seed(int(rng.integers(1 << 30)))
    base = torch.randn(2048, 128256, device="cuda", generator=g)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        t = base
        for _ in range(8):                  # queued work, still running when fastlogits is called
            t = torch.tanh(t) * 4 + 0.5
        lse = fl.logsumexp(t)
        ce = fl.cross_entropy(t, torch.zeros(2048, dtype=torch.int64, device="cuda"), reduction="none")
        # the side stream's next work reads the results: it waits for fastlogits' kernels, on the device
        read = torch.as_tensor(lse, device="cuda") + 0.0
    torch.cuda.synchronize()
    np.testing.assert_allclose(lse.copy_to_host(), torch.logsumexp(t, -1).cpu().numpy(), rtol=2e-5)
    np.testing.assert_array_equal(read.cpu().numpy(), lse.copy_to_host())
    np.testing.assert_allclose(ce.copy_to_host(), (torch.logsumexp(t, -1) - t[:, 0]).cpu().numpy(),
                               rtol=2e-5, atol=2e-5)
