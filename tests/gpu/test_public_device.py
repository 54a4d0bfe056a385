"""GPU arrays through the public API (under the simulator in CI): device arrays in, device arrays out,
results equal to the CPU's on the same logits."""
import numpy as np
import pytest

import fastlogits as fl
from tests.helpers import awkward_rows


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


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
    assert float(fl.cross_entropy(clean, cuda.to_device(y[6:]))) == pytest.approx(
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
