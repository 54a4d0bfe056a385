"""The GPU backend: the backend interface of ``fastlogits/cpu/backend.py`` over the numba.cuda kernels.

Inputs are 2-D arrays ``x`` (rows, V) with any strides, either on the device (numba device arrays and
anything with ``__cuda_array_interface__``, seen through :func:`as_rows`) or NumPy arrays on the host.

- Device inputs: the kernels read them in place (zero-copy) and results are device arrays (float64 per
  row, as on the CPU). ``softmax`` writes into ``out`` (a device array, or a NumPy array it copies to).
- Host inputs: copied to the device (in one copy up to ``HOST_BLOCK_BYTES``, else in blocks of whole rows
  through two pinned staging buffers on two streams, the next block's upload overlapping this block's
  work), computed, and copied back: results are NumPy arrays, so the ops layer's NumPy post-processing
  works unchanged.

``threads`` is ignored. ``chunk`` is the shortest column segment a block folds: a row is split over several
blocks (merged afterwards) when there are too few rows to fill the device, and into segments of at most
MAX_SEGMENT columns, so that a large batch runs as many short blocks.
"""
import math
import sys
import threading
import warnings

import numpy as np
from numba import config as numba_config
from numba import cuda

from fastlogits._config import default_threads
from fastlogits.cpu import _sample
from fastlogits.cpu.backend import copy_rows
from fastlogits.gpu import kernels as K
from fastlogits.ops._backend import foreign_streams
from fastlogits.ops._prep import (
    NP_DTYPES,
    bf16,
    compute_dtype,
    is_gpu_array,
    not_floating,
    to_rows,
    weight_sum,
)

BF16 = bf16()
_NP = {name: NP_DTYPES[name] for name in ("float16", "bfloat16", "float32", "float64")}
# what the kernels read for each input kind (bfloat16 as its bits)
_KERNEL_DTYPE = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16),
                 "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}

HOST_BLOCK_BYTES = 256 << 20   # host inputs up to this size move to the device in one copy
PIPELINE_BLOCK_BYTES = 64 << 20  # larger ones in row blocks of about this size, through pinned buffers
TARGET_BLOCKS = 512            # split rows into segments until about this many blocks run
MIN_SEGMENT = 32
# and a block folds at most this many columns. Longer blocks spread a block's fixed cost (its last, bound-
# checked chunk, the merge in shared memory, the segments' merge) over more columns, and that outweighs a
# last partial wave: on an H200 (benchmarks/gpu_sweep.py, (8192, 128256), logsumexp) one block a row read
# bfloat16 at 2680 GB/s against 2379 GB/s with 4 blocks a row (32768 columns) and 1571 with 16; float32
# 4228 against 4106 GB/s
MAX_SEGMENT = 131072
MAX_GRID_Y = 65535             # CUDA's limit on a grid's y dimension, where the segments are launched


# ---- device arrays ------------------------------------------------------------------------------------

def _device_view(x, name="a GPU array"):
    """x as a numba device array, zero-copy. The work queued next on the default stream (this backend's)
    is ordered after the work x's producer queued on x's stream (stream_of), on the device: numba's own
    import (``as_cuda_array`` with its default ``sync=True``) waits for that stream on the host instead,
    which would make every call on a PyTorch tensor wait. That stream is kept, so that at the end of the
    public call its next work is ordered after this call's (order_streams). An array of another device
    than numba's current one is refused (check_device)."""
    if getattr(x, "__cuda_ndarray__", False):
        return x
    check_device(x, name)
    d = cuda.as_cuda_array(x, sync=False)
    ptr = stream_of(x)
    if ptr is not None and int(ptr) not in (0, 1, 2):
        ev = _order_event()
        ev.record(stream=cuda.external_stream(int(ptr)))
        ev.wait(stream=_default_stream())
        streams = foreign_streams()
        if int(ptr) not in streams:
            streams.append(int(ptr))
    return d


def device_view(x, name="a GPU array"):
    """A GPU array as a numba device array (NumPy shape and dtype), zero-copy, ordered on the device
    after its producer's work (_device_view), for the ops layer."""
    return _device_view(x, name)


def check_device(x, name):
    """A ValueError naming the argument where x is a PyTorch tensor or a CuPy array on another GPU than
    numba's current device: the kernels run in numba's current context, and another device's memory read
    there is an illegal address (or, with peer access, a slow read over the interconnect). PyTorch's
    ``torch.cuda.set_device`` does not change numba's device; ``numba.cuda.select_device`` does."""
    device = getattr(x, "device", None)
    ordinal = getattr(device, "index", None)            # PyTorch's torch.device (None: the current one)
    if not isinstance(ordinal, int):
        ordinal = getattr(device, "id", None)           # CuPy's Device
    if not isinstance(ordinal, int) or isinstance(ordinal, bool):
        return
    current = getattr(cuda.get_current_device(), "id", None)       # (the simulator's has none)
    if isinstance(current, int) and ordinal != current:
        raise ValueError(f"{name} is on GPU {ordinal}, but fastlogits runs on numba's current GPU, "
                         f"{current}: call numba.cuda.select_device({ordinal}) first, or move the array")


def stream_of(x):
    """The stream on which x's producer queues its work: its ``__cuda_array_interface__``'s "stream"
    (None for none, 1 and 2 for the legacy and per-thread default streams, else a stream handle). A
    PyTorch tensor's interface (version 2) names none, and PyTorch runs its work on its current stream
    (a side stream under ``torch.cuda.stream(s)``, which does not wait for the legacy default stream,
    nor it for them): that stream is the tensor's, as for a CUDA kernel a PyTorch extension launches
    (0 there, the legacy default stream, is this backend's own)."""
    ptr = x.__cuda_array_interface__.get("stream")
    if ptr is None:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(x, torch.Tensor):
            ptr = torch.cuda.current_stream(x.device).cuda_stream
    return ptr


def _order_event():
    ev = getattr(_local, "order_event", None)
    if ev is None:
        ev = _local.order_event = cuda.event(timing=False)
    return ev


def order_streams():
    """At the end of a public call (ops._backend.ordered): the work queued next on the streams of the
    call's foreign arrays (their producers', stream_of) is ordered after the work this call queued on the
    default stream, on the device: the producer may then read the results, or reuse the inputs' memory
    (PyTorch's allocator does so on its stream), with no wait on the host."""
    pending = foreign_streams()
    if not pending:
        return
    streams = list(pending)
    pending.clear()
    ev = _order_event()
    ev.record(stream=_default_stream())
    for ptr in streams:
        ev.wait(stream=cuda.external_stream(ptr))


class _Interface:
    """An object exposing another array interface (a reshaped view of the same memory): a
    ``__cuda_array_interface__``, or for host memory (the simulator's arrays) an ``__array_interface__``."""

    def __init__(self, iface, owner, host=False):
        setattr(self, "__array_interface__" if host else "__cuda_array_interface__", iface)
        self._owner = owner    # keeps the memory alive


def _view(d, shape, strides, offset=0):
    """A zero-copy view of device array d's memory, of ``shape`` and byte ``strides``, its first element
    ``offset`` bytes from d's: built from the address, as neither numba's slicing (see _row_block) nor its
    reshape can for every stride. Under the simulator, the same arithmetic over the NumPy array its
    FakeCUDAArray wraps. (d is ordered already: _device_view.)"""
    host = hasattr(d, "_ary")
    src = d._ary.__array_interface__ if host else d.__cuda_array_interface__
    iface = dict(src, data=(src["data"][0] + offset, False), shape=tuple(shape), strides=tuple(strides))
    if host:
        return type(d)(np.asarray(_Interface(iface, d, host=True)))
    return cuda.as_cuda_array(_Interface(iface, d), sync=False)


def _rows_view(d):
    """A 2-D (rows, V) zero-copy view of device array d when its strides allow one, else None."""
    shape = tuple(d.shape)
    itemsize = np.dtype(d.dtype).itemsize
    strides = tuple(d.strides) if d.strides else tuple(
        int(np.prod(shape[i + 1:], dtype=np.int64)) * itemsize for i in range(len(shape)))
    V = shape[-1]
    lead = shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    # leading axes merge into one when each one's stride is the next one's times its length
    # (axes of length 1 do not matter)
    axes = [(n, st) for n, st in zip(lead, strides[:-1]) if n != 1]
    for (_, s1), (n2, s2) in zip(axes, axes[1:]):
        if s1 != s2 * n2:
            return None
    row_stride = axes[-1][1] if axes else V * itemsize
    return _view(d, (rows, V), (row_stride, strides[-1]))


def _row_block(d, sl):
    """Rows ``sl`` (a slice of step 1) of 2-D device array d, a zero-copy view. Not d[sl]: numba's slicing
    (its dummyarray, numba-cuda 0.30) measures a negative stride's extent as empty, so that rows of a
    (6, 5) array of strides (20, -4) come out (6, 0), a view over a null pointer that a kernel would then
    write through (found on an H200 as an illegal address, with an out= over reversed columns)."""
    if sl.start == 0 and sl.stop == d.shape[0]:
        return d
    return _view(d, (sl.stop - sl.start, d.shape[1]), d.strides, sl.start * d.strides[0])


def rows_out(out):
    """A GPU ``out`` as a 2-D (rows, V) device array over the caller's memory, for the maps to write in
    place; a ValueError where its leading axes do not merge into one (a copy would not be written)."""
    d = _device_view(out, "out")
    v = d if d.ndim == 2 else _rows_view(d)
    if v is None:
        raise ValueError(f"out: a device array of shape {tuple(d.shape)} and strides {tuple(d.strides)} "
                         "whose leading axes do not merge into rows cannot be written in place; pass a "
                         "contiguous out, or none")
    return v


class _AtAddresses:
    """A NumPy array interface at a device array's addresses: never read, only for np.shares_memory's
    arithmetic on (address, shape, strides)."""

    def __init__(self, cai):
        self.__array_interface__ = {"data": (cai["data"][0], True), "shape": tuple(cai["shape"]),
                                    "strides": cai.get("strides"), "typestr": cai["typestr"], "version": 3}


def overlaps(a, b):
    """Whether device arrays a and b share memory: exactly, as np.shares_memory decides for host arrays
    (disjoint interleaved views do not), by the addresses alone."""
    views = []
    for x in (a, b):
        if any(n == 0 for n in x.shape):
            return False
        # the simulator's arrays are host arrays; any other device array says where it is through its
        # __cuda_array_interface__ (numba's own arrays included)
        views.append(x._ary if hasattr(x, "_ary") else np.asarray(_AtAddresses(x.__cuda_array_interface__)))
    too_hard = getattr(np, "exceptions", np).TooHardError      # (np.exceptions: NumPy 1.25 and later)
    try:
        return bool(np.shares_memory(views[0], views[1], max_work=10**6))
    except too_hard:      # (strides too awkward to decide cheaply): assume they do
        return True


# element types as read from a device array's dtype: "<V2" is how ml_dtypes and PyTorch export bfloat16
# through __cuda_array_interface__
_KIND_OF = {**{npd: n for n, npd in _NP.items()}, np.dtype("V2"): "bfloat16"}


def kind_name(x, d, dtype, argname):
    """The element type name ("float16", "bfloat16", "float32", "float64") of GPU array x (d: its numba
    view); dtype="bfloat16" re-declares 2-byte data. A TypeError naming argname for anything else."""
    dt = np.dtype(d.dtype)
    if dtype is not None and (dtype == "bfloat16" or np.dtype(dtype) == BF16):
        if dt != BF16 and (dt.itemsize != 2 or dt.kind not in "uiV"):
            raise TypeError(f"{argname}: dtype='bfloat16' re-declares 2-byte data, but {argname} has "
                            f"dtype {dt}")
        return "bfloat16"
    name = _KIND_OF.get(dt)
    if name == "float16" and str(getattr(x, "dtype", "")) == "torch.bfloat16":
        # earlier PyTorch releases exported bfloat16 as "<f2", float16's typestr: the tensor's dtype decides
        return "bfloat16"
    if name is None:
        raise not_floating(argname, dt, device=True)
    return name


def out_kind(out, dtype):
    """The element type name of a GPU ``out`` array (see kind_name)."""
    return kind_name(out, _device_view(out, "out"), dtype, "out")


def as_rows(x, dtype):
    """logits as (x2d, lead, dtype name). A GPU array: x2d is a 2-D (rows, V) device array over the same
    memory (a device copy only when the leading axes cannot be merged), bfloat16 as its uint16 bits. A
    NumPy array (already checked by the ops layer): a 2-D view of it (a copy only where strides need it),
    copied to the device later, in row blocks. Every GPU call starts here: bad input found on the device by
    an earlier call is raised first (raise_device_errors)."""
    raise_device_errors()
    if not is_gpu_array(x):
        x = np.asarray(x)
        return (*to_rows(x), "bfloat16" if x.dtype == BF16 else x.dtype.name)
    d = _device_view(x, "logits")
    dt = np.dtype(d.dtype)
    name = kind_name(x, d, dtype, "logits")
    if name == "bfloat16" and dt != np.uint16:
        d = d.view(np.uint16)
    if d.ndim == 0:
        raise ValueError("logits must have at least one axis (the vocabulary), got a scalar")
    shape = tuple(d.shape)
    lead = shape[:-1]
    if d.ndim == 2:
        return d, lead, name
    v = _rows_view(d)
    if v is None:        # leading axes that do not merge (rare): a compact copy, through the host
        host = _host_copy(d)
        rows = int(np.prod(lead, dtype=np.int64))
        v = cuda.to_device(np.ascontiguousarray(host).reshape(rows, shape[-1]))
    return v, lead, name


# ---- launching ----------------------------------------------------------------------------------------

def _segments(rows, V, chunk):
    """(nseg, seglen): how each row's columns are split over blocks: into segments of at most MAX_SEGMENT
    columns, and more while the grid has under TARGET_BLOCKS blocks, down to segments of ``chunk``; at
    most MAX_GRID_Y segments (a row past 65535 * MAX_SEGMENT, 8.6e9 logits, gets longer ones)."""
    if V == 0:
        return 1, 0
    want = max(-(-TARGET_BLOCKS // max(rows, 1)), -(-V // MAX_SEGMENT))
    most = max(1, V // max(int(chunk), MIN_SEGMENT))
    nseg = min(want, most, MAX_GRID_Y)
    seglen = -(-V // nseg)
    return -(-V // seglen), seglen


def _grid1(n):
    """Launch configuration of a one-thread-per-row kernel."""
    tpb = 32 if n <= 32 else K.TPB
    return max(1, -(-n // tpb)), tpb


_local = threading.local()
SCRATCH_MAX_BYTES = 16 << 20


def _shape(shape):
    """shape (an int or a sequence of ints) as a tuple of Python ints."""
    return (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)


def _scratch(name, slot, shape, dtype, stream=0):
    """A device array for temporary use, kept for later calls in this thread: a device allocation can
    cost more than the small kernels that use it. One per (name, slot); work that uses it is ordered on
    one stream per slot. (Called about a dozen times a call: kept to a dict lookup and two compares.)"""
    cache = getattr(_local, "scratch", None)
    if cache is None:
        cache = _local.scratch = {}
    shape = _shape(shape)
    dtype = np.dtype(dtype)
    a = cache.get((name, slot))
    if a is None or tuple(a.shape) != shape or a.dtype != dtype:
        a = cache[(name, slot)] = cuda.device_array(shape, dtype, stream=stream)
    return a


def _array(shape, dtype, name=None, slot=0, stream=0):
    """A device array for temporary use: the kept scratch array (name, slot) when named and small (at
    most SCRATCH_MAX_BYTES), else a new one."""
    shape = _shape(shape)
    if name is not None and math.prod(shape) * np.dtype(dtype).itemsize <= SCRATCH_MAX_BYTES:
        return _scratch(name, slot, shape, dtype, stream)
    return cuda.device_array(shape, dtype, stream=stream)


def _launch(kernel, grid, tpb=K.TPB, stream=0):
    """kernel configured for (grid, tpb) on stream, ready to call."""
    with warnings.catch_warnings():
        # numba-cuda warns (when configuring) for every grid under 128 blocks; the per-row finishing
        # kernels of small batches and the one-block combining kernels are such grids, by design
        warnings.filterwarnings("ignore", message="Grid size .* under-utilization")
        return kernel[grid, tpb, stream]


def _upload(name, slot, host, stream=0):
    """Small host array ``host`` on the device, in the kept scratch array (name, slot) when it fits one;
    not copied again while that array still holds these values (a call's temperatures are most often the
    last call's; nothing is copied for an empty one). The copy is queued on ``stream`` (for 0, the default
    stream as a stream object): a copy from pageable memory queued so does not wait for the device's queued
    work, where a plain copy (stream 0) first waits for all of it."""
    stream = stream or _default_stream()
    if host.nbytes > SCRATCH_MAX_BYTES:
        return cuda.to_device(host, stream=stream)
    a = _scratch(name, slot, host.shape, host.dtype, stream)
    sent = getattr(_local, "sent", None)
    if sent is None:
        sent = _local.sent = {}
    last = sent.get((name, slot))
    if host.size and (last is None or last[0] is not a or not np.array_equal(last[1], host)):
        a.copy_to_device(host, stream=stream)
        sent[(name, slot)] = (a, np.array(host, copy=True))
    return a


def _default_stream():
    """The default stream (the one stream 0 names) as a stream object, kept per thread."""
    s = getattr(_local, "default_stream", None)
    if s is None:
        s = _local.default_stream = cuda.default_stream()
    return s


class _Block:
    """A block of whole rows on the device: ``sl`` its rows, ``d`` its logits (as the kernels read them),
    ``dtemp`` their temperatures, ``stream`` the stream its work is queued on (0: the default stream),
    ``slot`` which set of scratch arrays it uses, ``host`` whether results go back to the host."""

    def __init__(self, sl, d, temperature, stream, slot, host):
        self.sl, self.d, self.stream, self.slot, self.host = sl, d, stream, slot, host
        self.rows, self.V = (int(n) for n in tuple(d.shape))
        self.dtemp = self.upload("temperature", np.ascontiguousarray(temperature[sl], np.float64))

    def launch(self, kernel, grid, tpb=K.TPB):
        return _launch(kernel, grid, tpb, self.stream)

    def array(self, shape, dtype, name=None):
        """A device array on this block's stream; a kept scratch array when named and small."""
        return _array(shape, dtype, name, self.slot, self.stream)

    def upload(self, name, host):
        return _upload(name, self.slot, host, self.stream)

    def fetch(self, dev, dst, convert=None):
        """dst[rows of this block] = dev (a device result of this block), waiting for it."""
        host = dev.copy_to_host(stream=self.stream)
        if self.stream:
            self.stream.synchronize()
        dst[self.sl] = host if convert is None else convert(host)


def _blocks(x, dtype, temperature):
    """The logits as device blocks of whole rows. A device array is one block, read in place. A host
    array moves in blocks of about HOST_BLOCK_BYTES through two pinned staging buffers on two streams:
    block b + 1 is uploaded while block b is computed and fetched (its results are fetched, which waits
    for its stream, before block b + 2 reuses its staging buffer)."""
    kd = _KERNEL_DTYPE[dtype]
    if is_gpu_array(x):
        d = _device_view(x, "logits")
        if np.dtype(d.dtype) != kd:
            d = d.view(kd)
        rows = int(tuple(d.shape)[0])
        if rows:
            yield _Block(slice(0, rows), d, temperature, 0, 0, False)
        return
    rows, V = x.shape
    if rows == 0:
        return
    row_bytes = max(1, V * kd.itemsize)
    budget = HOST_BLOCK_BYTES
    try:      # leave room on a device that is nearly full (the results and a second block need some)
        budget = min(budget, cuda.current_context().get_memory_info()[0] // 4)
    except Exception:  # pragma: no cover - depends on the driver
        pass
    if rows * row_bytes <= budget:          # one block: a plain synchronous copy, no staging
        xs = x if x.dtype == kd else x.view(kd)
        if not xs.flags.c_contiguous:
            xs = copy_rows(xs, np.empty(xs.shape, kd), default_threads())
        yield _Block(slice(0, rows), cuda.to_device(xs), temperature, 0, 0, True)
        return
    step = max(1, min(rows, min(budget, PIPELINE_BLOCK_BYTES) // row_bytes))
    starts = range(0, rows, step)
    streams = (cuda.stream(), cuda.stream())
    staging = [_staging(0, (step, V), kd), _staging(1, (step, V), kd)]

    def upload(b):
        sl = slice(starts[b], min(rows, starts[b] + step))
        buf = staging[b % 2][: sl.stop - sl.start]
        src = x[sl]
        copy_rows(src if src.dtype == kd else src.view(kd), buf, default_threads())
        st = streams[b % 2]
        d = cuda.to_device(buf, stream=st)
        return _Block(sl, d, temperature, st, 1 + b % 2, True)

    nxt = upload(0)
    try:
        for b in range(len(starts)):
            cur = nxt
            if b + 1 < len(starts):
                nxt = upload(b + 1)
            yield cur
            cur.stream.synchronize()
    finally:
        # a caller that stops early (an exception) leaves copies from the pinned buffers in flight, and the
        # next call may refill or free those buffers: the copies finish first
        for st in streams:
            st.synchronize()


def _staging(slot, shape, dtype):
    """Pinned host buffer number ``slot`` (0 or 1) of this thread, of at least ``shape``, kept for later
    calls (pinned allocations are slow): viewed as ``shape`` of ``dtype``."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    cache = getattr(_local, "staging", None)
    if cache is None:
        cache = _local.staging = {}
    buf = cache.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = cache[slot] = cuda.pinned_array(max(nbytes, 1), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def _empty(shape, dtype, device):
    return cuda.device_array(shape, dtype) if device else np.empty(shape, dtype)


def _weights(dtype, weight=None):
    cd = compute_dtype(dtype)
    if weight is None:
        return _scratch("no weights", 0, 1, cd)     # never read
    return _upload("weights", 0, np.ascontiguousarray(weight, dtype=cd))


def _stats(blk, kern, softcap, mode, w, chunk, best=False):
    """The per-segment states (pm, ps, pt) of block blk, (rows, nseg) each; for the modes SUM and WSUM
    also the distance sums' weight sums pw; with best, also the segments' best (value, index), (pv, pi),
    from the same pass."""
    nseg, seglen = _segments(blk.rows, blk.V, chunk)
    dist = mode in (K.SUM, K.WSUM)
    pm = blk.array((blk.rows, nseg), np.float64, "pm")
    ps = blk.array((blk.rows, nseg), np.float64, "ps")
    pt = blk.array((blk.rows, nseg), np.float64, "pt")
    pw = blk.array((blk.rows, nseg) if dist else (1, 1), np.float64, "pw")
    pv = blk.array((blk.rows, nseg) if best else (1, 1), np.float64, "best values")
    pi = blk.array((blk.rows, nseg) if best else (1, 1), np.int64, "best indices")
    blk.launch(kern.stats_part[mode, best], (blk.rows, nseg))(blk.d, blk.dtemp, float(softcap), seglen, w, pm,
                                                               ps, pt, pw, pv, pi)
    return (pm, ps, pt) + ((pw,) if dist else ()) + ((pv, pi) if best else ())


def _reduce(x, dtype, temperature, softcap, chunk, mode):
    device = is_gpu_array(x)
    # a device result is written in the API's result dtype (the compute dtype): no cast kernel afterwards
    out = _empty(x.shape[0], compute_dtype(dtype) if device else np.float64, device)
    kern = K.for_kind(dtype)
    w = _weights(dtype)
    for blk in _blocks(x, dtype, temperature):
        pm, ps, pt = _stats(blk, kern, softcap, mode, w, chunk)
        res = blk.array(blk.rows, np.float64, "result") if blk.host else out
        blk.launch(K.stats_finish, *_grid1(blk.rows))(pm, ps, pt, mode, res)
        if blk.host:
            blk.fetch(res, out)
    return out


def lse(x, dtype, temperature, softcap, chunk, threads):
    return _reduce(x, dtype, temperature, softcap, chunk, K.LSE)


def entropy(x, dtype, temperature, softcap, chunk, threads):
    return _reduce(x, dtype, temperature, softcap, chunk, K.ENTROPY)


def softmax(x, dtype, temperature, softcap, log, out, out_dtype, chunk, threads):
    """Fills out (rows, V), of element type out_dtype (a name as for dtype): a device array written in
    place, or a NumPy array the result is copied to. bfloat16 results are rounded from the compute type's
    result on the device (through float32, to nearest even, as the CPU does) and written as their bits."""
    kern = K.for_kind(dtype)
    w = _weights(dtype)
    out_dev = is_gpu_array(out)
    bf16 = out_dtype == "bfloat16"
    kd = np.dtype(np.uint16) if bf16 else _NP[out_dtype]
    mapk = kern.softmax_map_bf16 if bf16 else kern.softmax_map
    wide = bool(log) and out_dtype == "float64" and dtype != "float64"    # (see kernels.softmax_map)
    if out_dev:        # the caller's device array, as the map writes it (bfloat16 as its bits)
        dv = _device_view(out, "out")
        dv = dv if np.dtype(dv.dtype) == kd else dv.view(kd)
    for blk in _blocks(x, dtype, temperature):
        pm, ps, pt = _stats(blk, kern, softcap, K.LSE, w, chunk)
        lse_ = blk.array(blk.rows, np.float64, "lse")
        blk.launch(K.stats_finish, *_grid1(blk.rows))(pm, ps, pt, K.LSE, lse_)
        nseg, seglen = _segments(blk.rows, blk.V, chunk)
        y = _row_block(dv, blk.sl) if out_dev else blk.array((blk.rows, blk.V), kd)
        if blk.V:
            blk.launch(mapk, (blk.rows, nseg))(blk.d, blk.dtemp, float(softcap), seglen, pm, ps, bool(log),
                                               wide, y)
        if not out_dev:
            blk.fetch(y, out, (lambda h: h.view(BF16)) if bf16 else None)
    return out


def cross_entropy_rows(x, dtype, temperature, softcap, labels, ignore_index, weight, smoothing, chunk,
                       threads, out=None):
    """Per-row (nll, smooth, lse), float64: nll = lse - x[label] (unweighted), smooth = -sum_c w_c log p_c
    (only when smoothing; w = 1 without weights), 0 for ignored rows. labels: int64 (rows,), checked; or,
    with device logits, a 1-D int32/int64 device array (from device_labels), read in place: a label out of
    range gives NaN there (cross_entropy_device reports it). out: three arrays to write them into (for
    device logits, device arrays), else new ones."""
    kern = K.for_kind(dtype)
    device = is_gpu_array(x)
    rows_all = x.shape[0]
    nll, smooth, lse_ = out if out is not None else (_empty(rows_all, np.float64, device) for _ in range(3))
    wtotal = float(x.shape[1])
    mode = K.SUM if smoothing else K.LSE
    if weight is not None and smoothing:     # (without smoothing the weights are not read here)
        w_host = np.ascontiguousarray(weight, dtype=compute_dtype(dtype))
        wtotal = weight_sum(w_host)
        mode = K.WSUM
    w = _weights(dtype, weight if mode == K.WSUM else None)
    on_device = device and is_gpu_array(labels)
    if not on_device:
        labels = to_host(labels, "labels") if is_gpu_array(labels) else np.asarray(labels)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
    for blk in _blocks(x, dtype, temperature):
        parts = _stats(blk, kern, softcap, mode, w, chunk)
        pm, ps, pt = parts[:3]
        pw = parts[3] if smoothing else pt        # (not read without smoothing)
        dlab = labels if on_device else blk.upload("labels", np.ascontiguousarray(labels[blk.sl]))
        outs = [blk.array(blk.rows, np.float64, name) if blk.host else o
                for o, name in ((nll, "nll"), (smooth, "smooth"), (lse_, "lse"))]
        blk.launch(kern.ce_finish, *_grid1(blk.rows))(blk.d, blk.dtemp, float(softcap), dlab,
                                                      int(ignore_index), wtotal, bool(smoothing), pm, ps, pt,
                                                      pw, *outs)
        if blk.host:
            for host, dev in zip((nll, smooth, lse_), outs):
                blk.fetch(dev, host)
    return nll, smooth, lse_


def device_labels(labels, lead):
    """Device labels as the kernels read them in place: a 1-D C-contiguous int32 or int64 device array,
    from labels of shape ``lead`` (the logits' leading shape; flattened when contiguous). None for
    anything else (the caller takes the host path, which checks and explains)."""
    if not is_gpu_array(labels):
        return None
    d = _device_view(labels, "labels")
    if np.dtype(d.dtype) not in (np.dtype(np.int32), np.dtype(np.int64)) or tuple(d.shape) != tuple(lead):
        return None
    rows = int(np.prod(lead, dtype=np.int64))
    if d.ndim != 1:
        if not d.is_c_contiguous():
            return None
        d = d.reshape(rows)
    elif rows > 1 and d.strides[0] != d.dtype.itemsize:
        return None
    return d


def cross_entropy_device(x, dtype, temperature, softcap, labels, ignore_index, weight, eps, z, chunk,
                         reduction, result_dtype, lead):
    """Cross-entropy of device logits, all on the device with no wait for it (kernels.ce_reduce combines
    the per-row terms): the per-row loss for reduction "none", else a 1-element array holding the loss,
    of result_dtype (new device arrays). labels: from device_labels (read in place, checked on the
    device: a label out of range makes the loss NaN and is reported by raise_device_errors later, naming
    it with ``lead``, the logits' leading shape), or checked int64 host labels."""
    rows = int(x.shape[0])
    if not is_gpu_array(labels):
        labels = _upload("labels", 0, np.ascontiguousarray(labels, dtype=np.int64))
    # intermediates in kept scratch arrays
    parts = tuple(_array(rows, np.float64, "cross-entropy " + name) for name in ("nll", "smooth", "lse"))
    nll, smooth, lse_ = cross_entropy_rows(x, dtype, temperature, softcap, labels, ignore_index, weight,
                                           eps > 0, chunk, 1, out=parts)
    if weight is None:
        w = _scratch("no class weights", 0, 1, np.float64)      # never read
    else:
        w = _upload("class weights", 0, np.ascontiguousarray(weight, dtype=np.float64))
    per_row = reduction == "none"
    loss = _array(rows, result_dtype, None if per_row else "cross-entropy loss")
    total = _scratch("no total", 0, 1, result_dtype) if per_row else cuda.device_array(1, result_dtype)
    code = {"none": K.CE_NONE, "mean": K.CE_MEAN, "sum": K.CE_SUM}[reduction]
    call = _label_call(lead, int(x.shape[1]), int(ignore_index))
    _launch(K.ce_reduce, 1)(labels, int(ignore_index), int(x.shape[1]), w, weight is not None, float(eps),
                            float(z), nll, smooth, lse_, code, call, loss, total, _device_errors())
    return loss if per_row else total


# ---- bad input found on the device, reported later (no wait in the call) ------------------------------

ERROR_CALLS_KEPT = 1024


def _device_errors():
    """This thread's report of bad input found on the device: (call, row, value, later), call -1 while
    there is none, later the number of calls that found bad input after it (kernels.report), in mapped
    memory (written by kernels, read here with no copy and no wait). A cross_entropy call reports a label
    out of range (value: the label), a sample call a row it cannot sample (value: the row's status)."""
    e = getattr(_local, "device_errors", None)
    if e is None:
        e = cuda.mapped_array(4, np.int64, portable=True)      # (for every device of the process)
        e[0] = -1
        e[3] = 0
        _local.device_errors = e
    return e


def _error_call(make):
    """A number for this call, kept with make(row, value): the exception its report raises (the last
    ERROR_CALLS_KEPT calls of this thread)."""
    calls = getattr(_local, "error_calls", None)
    if calls is None:
        calls = _local.error_calls = {}
        _local.next_call = 0
    n = _local.next_call
    _local.next_call = n + 1
    calls[n] = make
    while len(calls) > ERROR_CALLS_KEPT:
        del calls[next(iter(calls))]
    return n


def _label_call(lead, V, ignore_index):
    """The number of a cross_entropy call whose device labels are checked on the device (the logits'
    leading shape ``lead``, V classes): its report raises the IndexError naming the label and its row."""
    from fastlogits.ops.reductions import label_error

    note = "found on the device by an earlier cross_entropy call, whose loss is NaN"
    return _error_call(lambda row, label: label_error(label, row, lead, V, ignore_index, note=note))


def raise_device_errors():
    """Raise the error for bad input that an earlier call of this thread found on the device, if the
    device has reported it by now (clearing the report). Called at the start of every GPU call and by
    ``fastlogits.gpu.synchronize``. Calls queued behind the first that found bad input too (a real GPU
    runs them before the host looks) are counted in its message: their results are invalid as well."""
    e = getattr(_local, "device_errors", None)
    if e is None or int(e[0]) < 0:
        return
    cuda.synchronize()           # the report's row and value are written before its call number
    call, row, value, later = (int(v) for v in e)
    e[0] = -1
    e[3] = 0
    make = _local.error_calls.get(call)
    if make is None:             # (more than ERROR_CALLS_KEPT calls ago)
        err = ValueError(f"an earlier GPU call found bad input on the device at row {row} (a label out of "
                         f"range, or a row that cannot be sampled: {value})")
    else:
        err = make(row, value)
    if later:
        calls = "1 later GPU call" if later == 1 else f"{later} later GPU calls"
        their = "its" if later == 1 else "their"
        err = type(err)(f"{err}; {calls} also found bad input on the device before this was raised: "
                        f"{their} results (NaN losses, tokens -1) are invalid too")
    raise err


def synchronize():
    """Wait for this device's queued work; then raise what it found (see raise_device_errors)."""
    cuda.synchronize()
    raise_device_errors()


def _select(x, dtype, temperature, softcap, k, logprobs, chunk):
    kern = K.for_kind(dtype)
    device = is_gpu_array(x)
    rows_all = x.shape[0]
    cd = compute_dtype(dtype)
    values = _empty((rows_all, k), cd, device)
    indices = _empty((rows_all, k), np.int64, device)
    lp = _empty((rows_all, k), np.float64, device) if logprobs else None
    for blk in _blocks(x, dtype, temperature) if k else ():       # (k = 0: nothing to select)
        rows = blk.rows
        nseg, seglen = _segments(rows, blk.V, chunk)
        pv = blk.array((rows, nseg, k), np.float64, "pv")
        pi = blk.array((rows, nseg, k), np.int64, "pi")
        pm = blk.array((rows, nseg), np.float64, "pm")
        ps = blk.array((rows, nseg), np.float64, "ps")
        blk.launch(kern.topk_part, (rows, nseg))(blk.d, blk.dtemp, float(softcap), seglen, bool(logprobs), pv,
                                                 pi, pm, ps)
        if blk.host:
            vals = blk.array((rows, k), cd, "values")
            idx = blk.array((rows, k), np.int64, "indices")
            lp_d = blk.array((rows, k) if logprobs else (1, 1), np.float64, "logprobs")
        else:
            vals, idx = values, indices
            lp_d = lp if logprobs else blk.array((1, 1), np.float64, "logprobs")
        blk.launch(K.topk_finish, *_grid1(rows))(pv, pi, pm, ps, bool(logprobs), vals, idx, lp_d)
        if blk.host:
            blk.fetch(vals, values)
            blk.fetch(idx, indices)
            if logprobs:
                blk.fetch(lp_d, lp)
    return values, indices, lp


def stats(x, dtype, temperature, softcap, labels, ignore_index, chunk, threads):
    """Per row, from one pass over the logits: (nll, entropy, argmax); nll as cross_entropy's unweighted
    per-row loss (0 for ignored rows; all 0 when labels is None)."""
    kern = K.for_kind(dtype)
    device = is_gpu_array(x)
    rows_all = x.shape[0]
    nll, ent = _empty(rows_all, np.float64, device), _empty(rows_all, np.float64, device)
    top = _empty(rows_all, np.int64, device)
    has_labels = labels is not None
    if has_labels:
        labels = to_host(labels, "labels") if is_gpu_array(labels) else np.asarray(labels)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
    w = _weights(dtype)
    for blk in _blocks(x, dtype, temperature):
        rows = blk.rows
        parts = _stats(blk, kern, softcap, K.ENTROPY, w, chunk, best=True)
        dlab = blk.upload("labels", labels[blk.sl] if has_labels else np.zeros(1, np.int64))
        outs = [blk.array(rows, dt, name) if blk.host else o
                for o, name, dt in ((nll, "nll", np.float64), (ent, "entropy", np.float64),
                                    (top, "argmax", np.int64))]
        blk.launch(kern.stats_fused_finish, *_grid1(rows))(blk.d, blk.dtemp, float(softcap), dlab, has_labels,
                                                           int(ignore_index), *parts, *outs)
        if blk.host:
            for host, dev in zip((nll, ent, top), outs):
                blk.fetch(dev, host)
    return nll, ent, top


def argmax(x, dtype, temperature, softcap, chunk, threads):
    """Index of each row's largest element, the lowest on ties, the first NaN if any (top-1); 0 for an
    empty vocabulary."""
    if x.shape[1] == 0:
        z = np.zeros(x.shape[0], np.int64)
        return cuda.to_device(z) if is_gpu_array(x) else z
    _, idx, _ = _select(x, dtype, temperature, softcap, 1, False, chunk)
    if isinstance(idx, np.ndarray):
        return np.ascontiguousarray(idx[:, 0])
    return idx.reshape(idx.shape[0])


def top_k(x, dtype, temperature, softcap, k, logprobs, chunk, threads):
    """(values, indices): the k best of each row, best first; values are the transformed logits in the
    compute dtype, or, when logprobs, their log-probabilities (float64), from the same pass."""
    values, indices, lp = _select(x, dtype, temperature, softcap, int(k), bool(logprobs), chunk)
    return (lp if logprobs else values), indices


# ---- sampling ---------------------------------------------------------------------------------------------

MAX_GRID = 65535       # blocks of a grid-stride kernel
SIM_GRID = 2           # under the simulator: each block costs a Python thread per CUDA thread


def _stride_grid(items):
    """Blocks for a kernel that loops over `items` work items with a grid stride."""
    return max(1, min(items, SIM_GRID if numba_config.ENABLE_CUDASIM else MAX_GRID))


def _sample_params(V, dtype, temperature, top_k, top_p, min_p, logprobs):
    """Per row (host arrays): greedy, the temperature (1 for greedy rows), k (0: no top-k), p (lowered by
    the tolerance; 1: no top-p), min_p, and what `prepare` computes: 0 nothing, 1 top-k's threshold only,
    2 the max and logsumexp first."""
    temperature = np.asarray(temperature, np.float64)
    greedy = temperature == 0
    temp = np.where(greedy, 1.0, temperature)
    k = np.where(greedy | (top_k <= 0) | (top_k >= V), 0, top_k).astype(np.int64)
    p = np.where(greedy, 1.0, _sample.topp_goal(top_p, float(np.finfo(compute_dtype(dtype)).eps)))
    mp = np.where(greedy, 0.0, min_p)
    need = np.where(greedy, 0, np.where((p < 1.0) | (mp > 0.0) | bool(logprobs), 2, np.where(k > 0, 1, 0)))
    return greedy, temp, k, p, mp, need


def _sample_block(blk, kern, softcap, prm, seeds, row_ids, ns, logprobs, chunk, results=None):
    """Queue the sampling kernels of one block: device (tokens (R, ns), log-probabilities (R, ns) (a
    (1, 1) placeholder without logprobs), status (R,), prank (R, nseg, ns) or None). results: the arrays
    to write tokens, log-probabilities and status into (new ones for device results), else kept scratch."""
    greedy, _, k, p, mp, need = prm
    sl, R, V = blk.sl, blk.rows, blk.V
    up = {name: blk.upload("sample " + name, np.ascontiguousarray(a[sl], dt)) for name, a, dt in
          (("greedy", greedy, np.uint8), ("need", need, np.uint8), ("top_k", k, np.int64),
           ("top_p", p, np.float64), ("min_p", mp, np.float64), ("seeds", seeds, np.uint64),
           ("row_ids", row_ids, np.uint64))}
    rowmax = blk.array(R, np.float64, "sample rowmax")
    if need[sl].any():
        theta = blk.array(R, np.float64, "sample theta")
        cut = blk.array(R, np.int64, "sample cut")
        blk.launch(kern.prepare, _stride_grid(R))(blk.d, blk.dtemp, float(softcap), up["need"], up["top_k"],
                                                    up["top_p"], up["min_p"], rowmax, theta, cut)
    else:         # no filter: every token survives (kept uploads, no copy while the rows are as many)
        theta = blk.upload("sample no threshold", np.full(R, -np.inf))
        cut = blk.upload("sample no cut", np.zeros(R, np.int64))
    nseg, seglen = _segments(R * ns, V, chunk)
    seglen = -(-seglen // 64) * 64
    nseg = -(-V // seglen)
    pkey = blk.array((R, nseg, ns, 2), np.float64, "sample pkey")
    pidx = blk.array((R, nseg, ns), np.int64, "sample pidx")
    pflag = blk.array((R, nseg), np.int64, "sample pflag")
    psum = blk.array((R, nseg), np.float64, "sample psum")
    blk.launch(kern.draw, _stride_grid(R * nseg * ns))(blk.d, blk.dtemp, float(softcap), up["greedy"], theta,
                                                        cut, up["seeds"], up["row_ids"], seglen,
                                                        bool(logprobs), rowmax, pkey, pidx, pflag, psum)
    if results is None:
        results = (blk.array((R, ns), np.int64, "sample tokens"),
                   blk.array((R, ns) if logprobs else (1, 1), np.float64, "sample logprobs"),
                   blk.array(R, np.int32, "sample status"))
    tok_d, lp_d, st_d = results
    blk.launch(kern.finish, *_grid1(R * ns))(blk.d, blk.dtemp, float(softcap), up["greedy"], theta, rowmax,
                                             pkey, pidx, pflag, psum, bool(logprobs), tok_d, lp_d, st_d)
    prank = None
    if logprobs:
        prank = blk.array((R, nseg, ns), np.int64, "sample prank")
        blk.launch(kern.rank, _stride_grid(R * nseg * ns))(blk.d, blk.dtemp, float(softcap), up["greedy"],
                                                            tok_d, st_d, seglen, prank)
    return tok_d, lp_d, st_d, prank


def sample(x, dtype, temperature, softcap, top_k, top_p, min_p, seeds, row_ids, num_samples, logprobs,
           chunk, threads):
    """Seeded draws, the same tokens as the CPU backend's (see fastlogits/gpu/sample_kernels.py): the
    CPU backend's interface; results are NumPy arrays (rows, num_samples), and status (rows,)."""
    from fastlogits.gpu import sample_kernels as SK

    rows, V = (int(n) for n in tuple(x.shape))
    ns = int(num_samples)
    prm = _sample_params(V, dtype, temperature, top_k, top_p, min_p, logprobs)
    tokens = np.zeros((rows, ns), np.int64)
    lp = np.zeros((rows, ns), np.float64) if logprobs else None
    ranks = np.zeros((rows, ns), np.int64) if logprobs else None
    status = np.zeros(rows, np.int32)
    kern = SK.for_kind(dtype)
    for blk in _blocks(x, dtype, prm[1]):
        tok_d, lp_d, st_d, prank = _sample_block(blk, kern, softcap, prm, seeds, row_ids, ns, logprobs, chunk)
        if logprobs:
            blk.fetch(lp_d, lp)
            blk.fetch(prank, ranks, lambda h: h.sum(axis=1))
        blk.fetch(tok_d, tokens)
        blk.fetch(st_d, status)
    return tokens, lp, ranks, status


def sample_device(x, dtype, temperature, softcap, top_k, top_p, min_p, seeds, row_ids, num_samples, logprobs,
                  chunk, lead, lp_dtype):
    """sample() of device logits, all on the device with no wait for it: (tokens, log-probabilities of
    lp_dtype or None, ranks or None), new device arrays (rows, num_samples). A row that cannot be sampled
    gets token -1 (rank -1, log-probability NaN) and is reported later (raise_device_errors) with the
    ValueError that sample raises at once for host logits; ``lead`` (the logits' leading shape) names its
    row."""
    from fastlogits.gpu import sample_kernels as SK
    from fastlogits.ops.sampling import bad_row_error

    rows, V = (int(n) for n in tuple(x.shape))
    ns = int(num_samples)
    if rows == 0:
        def empty(dt, want=True):
            return cuda.device_array((0, ns), dt) if want else None
        return empty(np.int64), empty(lp_dtype, logprobs), empty(np.int64, logprobs)
    prm = _sample_params(V, dtype, temperature, top_k, top_p, min_p, logprobs)
    blk = next(_blocks(x, dtype, prm[1]))        # (a device array of rows is one block)
    lp_d = cuda.device_array((rows, ns), np.float64) if logprobs else _array((1, 1), np.float64, "sample lp")
    results = (cuda.device_array((rows, ns), np.int64), lp_d, _array(rows, np.int32, "sample status"))
    tok_d, lp_d, st_d, prank = _sample_block(blk, SK.for_kind(dtype), softcap, prm, seeds, row_ids, ns,
                                             logprobs, chunk, results)
    ranks = None
    if logprobs:
        ranks = cuda.device_array((rows, ns), np.int64)
        _launch(SK.rank_total, *_grid1(rows * ns))(prank, st_d, ranks)
    call = _error_call(lambda row, st: bad_row_error(st, row, lead, note="found on the device by an earlier "
                                                     "sample call, which gave it token -1"))
    _launch(SK.report, 1)(st_d, call, _device_errors())
    return tok_d, (finish(lp_d, lp_dtype, (rows, ns)) if logprobs else None), ranks


def beam_search_step_device(x, dtype, temperature, softcap, beam_scores, W, k, chunk, round32, out_dtype):
    """beam_search_step of device logits, all on the device with no wait for it: the top-k
    log-probabilities pass (k = min(2 W, V)), then sample_kernels.beam_merge. beam_scores: checked host
    scores (uploaded) or a device array of shape (rows,), read in place. round32: the log-probabilities
    are rounded to float32 before they are added, as the host path's are. Returns new device arrays
    (scores of out_dtype, parents, tokens), each (rows // W, 2 W)."""
    from fastlogits.gpu import sample_kernels as SK

    rows = int(x.shape[0])
    out = (cuda.device_array((rows // W, 2 * W), out_dtype), cuda.device_array((rows // W, 2 * W), np.int64),
           cuda.device_array((rows // W, 2 * W), np.int64))
    if rows == 0:
        return out
    _, idx, lp = _select(x, dtype, temperature, softcap, k, True, chunk)
    if is_gpu_array(beam_scores):
        bs = _device_view(beam_scores, "beam_scores")
    else:
        bs = _upload("beam scores", 0, np.ascontiguousarray(beam_scores, np.float64))
    _launch(SK.beam_merge, *_grid1(rows * k))(lp, idx, bs, int(W), bool(round32), *out)
    return out


# ---- results of device inputs, for the ops layer --------------------------------------------------------

@cuda.jit
def _cast(src, dst):
    i = cuda.grid(1)
    if i < src.size:
        dst[i] = src[i]


def finish(values, dtype, shape):
    """values (NumPy, or a 1-D/2-D contiguous device array) as `dtype`, reshaped to `shape`, where they
    are: device results stay on the device (converted there by a small kernel)."""
    dtype = np.dtype(dtype)
    if isinstance(values, np.ndarray):
        with np.errstate(over="ignore"):
            return values.astype(dtype, copy=False).reshape(shape)
    if np.dtype(values.dtype) != dtype:
        flat = values.reshape(values.size)
        out = cuda.device_array(values.size, dtype)
        if values.size:
            _cast[(values.size + 255) // 256, 256](flat, out)
        values = out
    return values.reshape(shape)


def empty(shape, dtype):
    """A device array for results of a device input."""
    return cuda.device_array(shape, np.dtype(dtype))


def to_host(values, name="a GPU array"):
    """NumPy values as they are; a device array (numba's, or any with __cuda_array_interface__) copied
    to the host, whatever its strides (_host_copy: a kernel for a strided one, so an array of another GPU
    is refused as the kernels' inputs are, naming it)."""
    return values if isinstance(values, np.ndarray) else _host_copy(_device_view(values, name))


def _host_copy(d):
    """numba device array d copied to the host. numba refuses to copy an array with a negative stride
    ("D->H copy not implemented"): such axes are copied through a view of the same memory with the
    stride's sign turned (its first element then the lowest address) and turned back on the host."""
    turn = tuple(i for i, st in enumerate(d.strides) if st < 0)
    if not turn:
        return d.copy_to_host()
    if d.size == 0:
        return np.empty(tuple(d.shape), d.dtype)
    lowest = sum((d.shape[i] - 1) * d.strides[i] for i in turn)
    host = _view(d, d.shape, [abs(st) for st in d.strides], lowest).copy_to_host()
    return np.ascontiguousarray(np.flip(host, axis=turn))


def to_device_like(values, like):
    """Host values back on the device when `like` (the input) is there."""
    return cuda.to_device(np.ascontiguousarray(values)) if is_gpu_array(like) else values
