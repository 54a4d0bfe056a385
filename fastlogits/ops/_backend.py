"""Dispatch to a backend module. Both implement one interface (see fastlogits/cpu/backend.py):

    lse(x, dtype, temperature, softcap, chunk, threads) -> float64 (rows,) (the GPU backend: for device
        logits, a device array in the result dtype, float32 or float64)
    entropy(x, dtype, temperature, softcap, chunk, threads) -> as lse
    softmax(x, dtype, temperature, softcap, log, out, out_dtype, chunk, threads) -> out
    cross_entropy_rows(x, dtype, temperature, softcap, labels, ignore_index, weight, smoothing, chunk,
                       threads) -> (nll, smooth, lse), float64 (rows,) each (smooth is not read unless
        smoothing: the CPU gives None)
    argmax(x, dtype, temperature, softcap, chunk, threads) -> int64 (rows,)
    top_k(x, dtype, temperature, softcap, k, logprobs, chunk, threads) -> (values | logprobs, indices)
    stats(x, dtype, temperature, softcap, labels, ignore_index, chunk, threads) -> (nll, entropy, argmax)
    sample(x, dtype, temperature, softcap, top_k, top_p, min_p, seeds, row_ids, num_samples, logprobs,
           chunk, threads) -> (tokens, logprobs | None, ranks | None, status), NumPy arrays
    finish(values, dtype, shape), empty(shape, dtype), to_host(values), to_device_like(values, like)

and the GPU backend also, for device logits, device_labels(labels, lead), cross_entropy_device(x, dtype,
temperature, softcap, labels, ignore_index, weight, eps, z, chunk, reduction, result_dtype, lead) -> the
loss as a device array (all on the device, no wait), and synchronize(); for device arrays given to the
public functions (see ops/_prep.py and ops/reductions.py), as_rows(x, dtype) (a (rows, V) view, its
leading shape and dtype name), rows_out(out) (a device out= as (rows, V) over its memory), out_kind(out,
dtype) (its dtype name) and overlaps(a, b).

The GPU backend is imported only when asked for, so ``import fastlogits`` never needs CUDA.
"""
import functools
import threading

from fastlogits import _config
from fastlogits.cpu import backend as cpu_backend


class _Calls(threading.local):
    """Per thread: the depth of nested public calls, and the foreign GPU streams. (Class attributes as the
    defaults: getattr with a default on a missing attribute of a threading.local cost 1.1 us a call.)"""
    depth = 0
    streams = None


_calls = _Calls()


def foreign_streams():
    """This thread's list of foreign GPU streams (the GPU backend's _device_view adds the streams of the
    arrays' producers) whose next work the end of the outer public call orders after its own (ordered).
    It lives here, not in the GPU backend, so that a thread that never used the GPU never touches that
    module: another thread may be importing it."""
    streams = _calls.streams
    if streams is None:
        streams = _calls.streams = []
    return streams


def get(name):
    if name == "cpu":
        return cpu_backend
    reason = _config.gpu_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fastlogits: backend 'gpu' is not available: {reason}")
    from fastlogits.gpu import backend
    return backend


def gpu_rows(x, dtype):
    """A GPU array as (x2d, lead, dtype name), via the GPU backend."""
    return get("gpu").as_rows(x, dtype)


def ordered(fn):
    """A public function that may take GPU arrays: when it returns (or raises), the work that the
    producers of its foreign GPU arrays queue next on their streams (a PyTorch side stream, say) is ordered
    after the kernels it queued (gpu.backend.order_streams), with no wait on the host. Nested public calls
    order once, at the outer call's end; nothing is done in a thread that queued nothing on a foreign
    stream (foreign_streams)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        calls = _calls
        depth = calls.depth
        calls.depth = depth + 1
        try:
            return fn(*args, **kwargs)
        finally:
            calls.depth = depth
            if depth == 0 and calls.streams:
                get("gpu").order_streams()
    return call
