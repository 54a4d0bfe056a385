"""GPU timing for benchmarks: kernels on device-resident logits timed with CUDA events (medians), the
device-to-device copy bandwidth measured in the same run as the ceiling, and PyTorch on the same GPU where
it is installed with CUDA.

``benchmark()`` returns plain figures (a dict) for ``fastlogits bench`` and the GPU check script to print.
Bandwidths are bytes of logits read per second; the copy ceiling counts bytes read *and* written per second
(``2 * nbytes / t``), the figure a memory-bound kernel that only reads can approach.
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


def copy_bandwidth(nbytes=1 << 30, repeat=10):
    """Device-to-device copy bandwidth, bytes read + written per second."""
    a = cuda.device_array(max(1, nbytes // 4), np.float32)
    b = cuda.device_array_like(a)
    t = time_events(lambda: b.copy_to_device(a), repeat)
    return 2 * a.nbytes / t if t > 0 else float("nan")


def _device_logits(shape, dtype, seed=0):
    """Random logits on the device as the kernels read them (bfloat16 as uint16 bits), and a host copy."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape, dtype=np.float32) * 3).astype(B._NP[dtype])
    bits = x.view(np.uint16) if dtype == "bfloat16" else x
    return cuda.to_device(bits), x


def _torch_cuda():
    """PyTorch when it is installed with CUDA, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def benchmark(shape=(8192, 128256), dtypes=("float32", "bfloat16"), repeat=10, torch_too=True):
    """Figures for logsumexp and cross-entropy on device-resident logits of ``shape``: per dtype, seconds
    and GB/s (logits read) of fastlogits, and of torch.logsumexp / F.cross_entropy on the same memory
    when PyTorch has CUDA; plus the copy ceiling ("copy_GBps") and the device's name."""
    rows, V = shape
    out = {"shape": list(shape), "repeat": repeat}
    try:
        out["device"] = str(cuda.get_current_device().name)
    except Exception:  # pragma: no cover - the simulator's device has a name too
        out["device"] = "unknown"
    out["copy_GBps"] = copy_bandwidth(min(1 << 30, rows * V * 4), repeat) / 1e9
    temp = np.ones(rows)
    labels = np.random.default_rng(1).integers(0, V, rows)
    torch = _torch_cuda() if torch_too else None
    for dtype in dtypes:
        d, _ = _device_logits(shape, dtype)
        nbytes = rows * V * B._NP[dtype].itemsize
        res = {}
        t = time_events(lambda d=d, dtype=dtype: B.lse(d, dtype, temp, 0.0, 4096, 1), repeat)
        res["logsumexp_s"] = t
        t = time_events(lambda d=d, dtype=dtype: B.cross_entropy_rows(d, dtype, temp, 0.0, labels, -100, None,
                                                                      False, 4096, 1), repeat)
        res["cross_entropy_s"] = t
        if torch is not None:
            tt = torch.as_tensor(d, device="cuda")
            if dtype == "bfloat16":
                tt = tt.view(torch.bfloat16)
            lab = torch.as_tensor(labels, device="cuda")
            res["torch_logsumexp_s"] = time_events(lambda tt=tt: torch.logsumexp(tt, -1), repeat)
            res["torch_cross_entropy_s"] = time_events(
                lambda tt=tt, lab=lab: torch.nn.functional.cross_entropy(tt, lab), repeat)
        for key in list(res):
            res[key[:-2] + "_GBps"] = nbytes / res[key] / 1e9 if res[key] > 0 else float("nan")
        out[dtype] = res
    return out


def sample_benchmark(shape=(512, 128256), repeat=10, torch_too=True):
    """Median seconds of ``sample`` on device-resident float32 logits of ``shape`` (plain temperature, and
    temperature 0.8 with top_k 50 and top_p 0.9), and of the PyTorch peers on the same GPU where PyTorch
    has CUDA: ``torch.multinomial(torch.softmax(x, -1), 1)`` and Hugging Face's sampling pipeline. The
    fastlogits figures include its host synchronization (its statuses are checked on the host)."""
    from fastlogits.bench import hf_sample_pipeline
    from fastlogits.ops.sampling import sample

    d, _ = _device_logits(shape, "float32")
    out = {"shape": list(shape), "repeat": repeat,
           "plain_s": time_events(lambda: sample(d, seed=0), repeat),
           "top_k_top_p_s": time_events(lambda: sample(d, seed=0, temperature=0.8, top_k=50, top_p=0.9),
                                        repeat)}
    torch = _torch_cuda() if torch_too else None
    if torch is not None:
        t = torch.as_tensor(d, device="cuda")
        out["torch_plain_s"] = time_events(lambda: torch.multinomial(torch.softmax(t, -1), 1), repeat)
        out["torch_top_k_top_p_s"] = time_events(lambda: hf_sample_pipeline(torch, t), repeat)
    return out
