"""GPU timing for benchmarks: calls on device-resident logits timed with CUDA events (medians), the
device-to-device copy bandwidth measured in the same run as the ceiling, and PyTorch on the same GPU where
it is installed with CUDA.

Two ways to time a call, for fastlogits and PyTorch alike:

- back to back (``time_stream``, the headline figures): calls are issued one after another with an event
  pair around each and one wait at the end, as in a pipeline; the host queues the next call while the
  device works, so a call costs its device time plus whatever host time its own waits expose (fastlogits'
  logsumexp and cross_entropy on device arrays have none: their results stay on the device).
- waited (``time_events``, the ``*_wait_s`` figures): each call waits for the device before the next
  starts, so the host's time to issue a call shows in full (the latency of one call alone).

``benchmark()`` returns plain figures (a dict) for ``fastlogits bench`` and the GPU check script to print.
Bandwidths are bytes of logits read per second; the copy ceiling counts bytes read *and* written per second
(``2 * nbytes / t``), the figure a memory-bound kernel that only reads can approach. fastlogits is timed
through its public API (``fastlogits.logsumexp``, ``fastlogits.cross_entropy`` with device labels), as
users call it.
"""
import numpy as np
from numba import cuda

from fastlogits.gpu import backend as B


def time_events(fn, repeat=10, warmup=2):
    """Median seconds of fn() on the device (CUDA events around each call; the simulator gives 0)."""
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = cuda.event()
        stop = cuda.event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(max(start.elapsed_time(stop), 0.0) / 1e3)
    return float(np.median(times))


def time_stream(fn, repeat=10, warmup=2):
    """Median seconds of fn() on the device, calls issued back to back (an event pair around each, one
    wait at the end)."""
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    events = [(cuda.event(), cuda.event()) for _ in range(repeat)]
    for start, stop in events:
        start.record()
        fn()
        stop.record()
    events[-1][1].synchronize()
    return float(np.median([max(a.elapsed_time(b), 0.0) / 1e3 for a, b in events]))


def copy_bandwidth(nbytes=1 << 30, repeat=10):
    """Device-to-device copy bandwidth, bytes read + written per second."""
    a = cuda.device_array(max(1, nbytes // 4), np.float32)
    b = cuda.device_array_like(a)
    t = time_events(lambda: b.copy_to_device(a), repeat)
    return 2 * a.nbytes / t if t > 0 else float("nan")


def _host_block(shape, dtype, seed=0):
    """The host rows that _device_logits repeats down the device array (at most 256)."""
    rows, V = shape
    n = max(1, min(rows, 256))
    return (np.random.default_rng(seed).standard_normal((n, V), dtype=np.float32) * 3).astype(B._NP[dtype])


def _device_logits(shape, dtype, seed=0):
    """Random logits on the device as the kernels read them (bfloat16 as uint16 bits): a block of at most
    256 random rows, repeated down the array (drawing 10^9 normals on the host would take most of the
    GPU check's time; the figures are unchanged, the array being far larger than the device's caches)."""
    rows, V = shape
    x = _host_block(shape, dtype, seed)
    n = x.shape[0]
    bits = np.ascontiguousarray(x.view(np.uint16) if dtype == "bfloat16" else x)
    d = cuda.device_array(shape, bits.dtype)
    for i in range(0, rows, n):
        k = min(n, rows - i)
        d[i:i + k].copy_to_device(bits[:k])
    return d


def _torch_cuda():
    """PyTorch when it is installed with CUDA, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def torch_view(torch, d, dtype):
    """The device logits ``d`` of ``_device_logits`` as a PyTorch tensor on the same memory (bfloat16 bits
    through int16, a type every PyTorch reads from ``__cuda_array_interface__``)."""
    if dtype == "bfloat16":
        return torch.as_tensor(d.view(np.int16), device="cuda").view(torch.bfloat16)
    return torch.as_tensor(d, device="cuda")


def benchmark(shape=(8192, 128256), dtypes=("float32", "bfloat16"), repeat=10, torch_too=True):
    """Figures for logsumexp and cross-entropy (reduction "mean", device int64 labels) on device-resident
    logits of ``shape``: per dtype, seconds and GB/s (logits read) of fastlogits, and of torch.logsumexp /
    F.cross_entropy on the same memory when PyTorch has CUDA, back to back (``<op>_s``) and waited
    (``<op>_wait_s``); plus the copy ceiling ("copy_GBps") and the device's name."""
    import fastlogits as fl

    rows, V = shape
    out = {"shape": list(shape), "repeat": repeat}
    try:
        out["device"] = str(cuda.get_current_device().name)
    except Exception:  # pragma: no cover - the simulator's device has a name too
        out["device"] = "unknown"
    out["copy_GBps"] = copy_bandwidth(min(1 << 30, rows * V * 4), repeat) / 1e9
    labels = np.random.default_rng(1).integers(0, V, rows)
    dlab = cuda.to_device(labels)
    torch = _torch_cuda() if torch_too else None
    for dtype in dtypes:
        d = _device_logits(shape, dtype)
        dx = d.view(B.BF16) if dtype == "bfloat16" else d     # the API's bfloat16 device array
        nbytes = rows * V * B._NP[dtype].itemsize
        calls = {"logsumexp": lambda dx=dx: fl.logsumexp(dx),
                 "cross_entropy": lambda dx=dx: fl.cross_entropy(dx, dlab)}
        if torch is not None:
            tt = torch_view(torch, d, dtype)
            lab = torch.as_tensor(labels, device="cuda")
            calls["torch_logsumexp"] = lambda tt=tt: torch.logsumexp(tt, -1)
            calls["torch_cross_entropy"] = lambda tt=tt, lab=lab: torch.nn.functional.cross_entropy(tt, lab)
        res = {}
        for name, fn in calls.items():
            res[name + "_s"] = time_stream(fn, repeat)
            res[name + "_wait_s"] = time_events(fn, repeat)
        for key in list(res):
            res[key[:-2] + "_GBps"] = nbytes / res[key] / 1e9 if res[key] > 0 else float("nan")
        res.update(verify(shape, dtype, labels, calls["logsumexp"](), calls["cross_entropy"]()))
        out[dtype] = res
    return out


def verify(shape, dtype, labels, lse, ce):
    """fastlogits' results on the benchmark's device logits against the float64 reference, within the
    tolerance ``fastlogits check`` documents: logsumexp's first and last rows, and the mean cross-entropy
    of all rows (the device rows repeat a host block, so the reference is that block's). Returns
    ``{op}_max_diff`` and ``{op}_ok`` for logsumexp and cross_entropy."""
    from fastlogits.bench import reference, verified_rows
    from fastlogits.check import _compare

    x = _host_block(shape, dtype)
    xv = x.view(B.BF16) if dtype == "bfloat16" else x
    n = x.shape[0]
    out = {}
    some = verified_rows(shape[0])
    out["logsumexp_max_diff"], out["logsumexp_ok"] = _compare(
        "logsumexp", lse.copy_to_host()[some], reference("logsumexp", xv[some % n], None), xv[some % n],
        dtype)
    rows = np.arange(shape[0])
    lse_ref = np.array([float(reference("logsumexp", xv[i:i + 1], None)[0]) for i in range(n)])
    terms = lse_ref[rows % n] - xv[rows % n, labels].astype(np.float64)
    want = np.float32(np.mean(terms))
    got = ce.copy_to_host() if hasattr(ce, "copy_to_host") else np.asarray(ce)
    out["cross_entropy_max_diff"], out["cross_entropy_ok"] = _compare("cross_entropy", got, want, xv, dtype)
    return out


def sample_benchmark(shape=(512, 128256), repeat=10, torch_too=True):
    """Median seconds of ``sample`` on device-resident float32 logits of ``shape`` (plain temperature, and
    temperature 0.8 with top_k 50 and top_p 0.9), and of the PyTorch peers on the same GPU where PyTorch
    has CUDA: ``torch.multinomial(torch.softmax(x, -1), 1)`` and Hugging Face's sampling pipeline. Device
    logits give device tokens with no wait inside the call, as PyTorch's do."""
    from fastlogits.bench import hf_sample_pipeline
    from fastlogits.ops.sampling import sample

    d = _device_logits(shape, "float32")
    cases = {"plain": {}, "top_k_top_p": {"temperature": 0.8, "top_k": 50, "top_p": 0.9}}
    out = {"shape": list(shape), "repeat": repeat}
    for case, kw in cases.items():
        out[case + "_s"] = time_events(lambda kw=kw: sample(d, seed=0, **kw), repeat)
    # checked, each timed call: the first rows draw the CPU's tokens with the same seed (the backends
    # differ only where two candidates tie to within rounding: one row in 8 may)
    n = min(8, shape[0])
    host = _host_block(shape, "float32")[:n]
    same = {case: int(np.sum(sample(d, seed=0, **kw).copy_to_host()[:n]
                             == sample(host, seed=0, backend="cpu", **kw))) for case, kw in cases.items()}
    out.update(rows_checked=n, same_rows=min(same.values()), ok=min(same.values()) >= n - 1,
               **{case + "_same_rows": k for case, k in same.items()})
    torch = _torch_cuda() if torch_too else None
    if torch is not None:
        t = torch_view(torch, d, "float32")
        out["torch_plain_s"] = time_events(lambda: torch.multinomial(torch.softmax(t, -1), 1), repeat)
        out["torch_top_k_top_p_s"] = time_events(lambda: hf_sample_pipeline(torch, t), repeat)
    return out
