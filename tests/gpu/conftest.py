"""The GPU tests run under numba's CUDA simulator unless told otherwise.

``NUMBA_ENABLE_CUDASIM`` is set to 1 here, at import time, before anything imports numba.cuda (the CPU tests
never do); set ``NUMBA_ENABLE_CUDASIM=0`` to run these tests on a real GPU. The simulator runs every CUDA
thread in Python, so shapes stay small. The PTX check (test_ptx.py) compiles the kernels for sm_90 in a
subprocess without the simulator, so it needs no GPU either.
"""

import functools
import os
import sys
import threading
import time

import numpy as np
import pytest

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

if "numba" in sys.modules and not any(m == "numba.cuda" or m.startswith("numba.cuda.") for m in sys.modules):
    # numba read its configuration before this file set the variable; numba.cuda reads it on import
    from numba.core import config as _numba_config

    _numba_config.reload_config()


@pytest.fixture(scope="session")
def gpu():
    """The GPU backend module. Under the simulator it must be available: a missing backend fails."""
    import fastlogits as fl

    if "gpu" not in fl.available_backends():
        reason = fl._config.gpu_unavailable_reason()
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            pytest.fail(f"the GPU backend is unavailable under the CUDA simulator: {reason}")
        pytest.skip(f"no GPU here and the simulator is off (NUMBA_ENABLE_CUDASIM=0): {reason}")
    from fastlogits.gpu import backend

    return backend


@pytest.fixture()
def forbid_waits(gpu, monkeypatch):
    """forbid_waits(): from then on every copy to the host and every wait for the device fails, until
    monkeypatch.undo(): copy_to_host, synchronize, the backend's fetches, and NumPy's reading of a device
    array (which the simulator's arrays allow, and numba's would do by a copy)."""
    from numba import cuda

    def no_wait(*a, **k):
        raise AssertionError("the call waited for the device")

    def forbid():
        array_type = type(cuda.to_device(np.zeros(1)))
        monkeypatch.setattr(array_type, "copy_to_host", no_wait)
        for name in ("__array__", "__array_interface__", "__array_struct__"):
            monkeypatch.setattr(array_type, name, no_wait if name == "__array__" else property(no_wait),
                                raising=False)
        monkeypatch.setattr(gpu.cuda, "synchronize", no_wait)
        monkeypatch.setattr(gpu._Block, "fetch", no_wait)

    return forbid


def simulated():
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


@pytest.fixture(autouse=True, scope="package")
def _fast_simulator_switching():
    """The simulator polls its Python threads at every barrier: a shorter GIL switch interval makes the
    GPU tests about twice as fast. Restored afterwards."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(autouse=True, scope="package")
def _atomic_simulator_shared_arrays():
    """The simulator's cuda.shared.array (FakeCUDAShared.array, numba-cuda 0.30) creates a block's array
    on the first call from a source line with a get, then a set, of a dict shared by the block's Python
    threads: two threads can both miss and get different arrays, so that one thread's shared writes are
    lost to the rest. It happens only in the first block of a launch (the dict is kept for the later
    ones); a top-k test once saw row 0 come out wrong from it. Here the get-or-create is atomic, keyed by
    the calling line as numba-cuda keys it. Restored afterwards; nothing changes on a real GPU."""
    from numba.core import config

    if not config.ENABLE_CUDASIM:
        yield
        return
    import numpy as np
    from numba.core import types as numba_types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    cls = kernelapi.FakeCUDAShared
    original = cls.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:      # dynamic shared memory, or numba's error
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, numba_types.Type):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    cls.array = array
    yield
    cls.array = original


@pytest.fixture(autouse=True, scope="package")
def _numba_device_array_rules():
    """The simulator's device arrays are NumPy arrays, and its launches take any grid: they allow what
    numba refuses on a GPU. Here they refuse it as numba-cuda 0.30 does (cudadrv/devicearray.py, with its
    own dummyarray for the address arithmetic), so that code only the simulator accepts fails in CI (an
    H200 run found a slice of an empty array and a 3-D transpose so): a copy to the host of negative
    strides, a reshape or ravel that needs a copy, a transpose of more than 2 axes (numba transposes 2
    into a new array, a copy, never a view), a slice of an empty array, a view as another item size of a
    non-contiguous array, a slice of an array with a negative stride that numba gets wrong (it comes out
    empty), and a launch of an empty grid or block, or of more than 1024 threads a block or 65535 blocks
    along y or z. Restored afterwards; nothing changes on a real GPU."""
    from numba.core import config

    if not config.ENABLE_CUDASIM:
        yield
        return
    import importlib.util
    import pathlib

    import numba_cuda
    from numba.cuda.simulator import kernel as sim_kernel
    from numba.cuda.simulator.cudadrv import devicearray as sim

    # numba's dummyarray (pure Python; under the simulator numba.cuda.cudadrv.dummyarray is a stub)
    path = pathlib.Path(numba_cuda.__file__).parent / "numba" / "cuda" / "cudadrv" / "dummyarray.py"
    spec = importlib.util.spec_from_file_location("_numba_dummyarray", path)
    dummyarray = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dummyarray)
    cls = sim.FakeCUDAArray
    names = ("copy_to_host", "reshape", "ravel", "transpose", "__getitem__", "view")
    saved = {name: cls.__dict__[name] for name in names}
    normalize = sim_kernel.normalize_kernel_dimensions

    def dummy(a):
        return dummyarray.Array.from_desc(0, a.shape, a.strides, a.dtype.itemsize)

    def copy_to_host(self, ary=None, stream=0):
        if any(st < 0 for st in self._ary.strides):
            raise NotImplementedError(f"D->H copy not implemented for negative strides: {self._ary.strides}")
        return saved["copy_to_host"](self, ary, stream)

    def reshape(self, *newshape, **kws):
        shape = newshape[0] if len(newshape) == 1 and isinstance(newshape[0], (tuple, list)) else newshape
        if tuple(shape) != self._ary.shape:
            d = dummy(self._ary)
            if d.reshape(*shape, **kws)[1] != [d.extent]:
                raise NotImplementedError("operation requires copying")
        return saved["reshape"](self, *newshape, **kws)

    def ravel(self, order="C", stream=0):
        d = dummy(self._ary)
        if d.ravel(order=order)[1] != [d.extent]:
            raise NotImplementedError("operation requires copying")
        return saved["ravel"](self, order)

    def transpose(self, axes=None):
        if axes and tuple(axes) == tuple(range(self._ary.ndim)):
            return self
        if self._ary.ndim != 2:
            raise NotImplementedError("transposing a non-2D DeviceNDArray isn't supported")
        return sim.FakeCUDAArray(np.ascontiguousarray(saved["transpose"](self, axes)._ary))

    def getitem(self, idx):
        a = self._ary
        if a.size == 0:          # numba's view of a null pointer, as numba computes its extent
            arr = dummy(a)[idx]
            extents = list(arr.iter_contiguous_extent())
            begin, end = extents[0] if len(extents) == 1 else arr.extent
            if end != begin:
                raise RuntimeError("non-empty slice into empty slice")
        ret = saved["__getitem__"](self, idx)
        # (kernels index elements through here, as compiled code does not: only slices are checked)
        if a.ndim and min(a.strides) < 0 and any(isinstance(i, slice) or i is Ellipsis
                                                  for i in (idx if isinstance(idx, tuple) else (idx,))):
            arr = dummy(a)[idx]
            if arr.is_array and tuple(arr.shape) != tuple(ret.shape):
                raise RuntimeError(f"numba slices a device array of shape {a.shape} and strides {a.strides} "
                                   f"by {idx!r} to shape {arr.shape}, where NumPy gives {ret.shape}: its "
                                   "dummyarray counts a negative stride's extent as empty")
        return ret

    def view(self, dtype):
        if np.dtype(dtype).itemsize != self._ary.dtype.itemsize and not self._ary.flags.c_contiguous:
            raise ValueError("To change to a dtype of a different size, the array must be C-contiguous")
        return saved["view"](self, dtype)

    def launch_dims(griddim, blockdim):
        g, b = normalize(griddim, blockdim)
        if 0 in g or 0 in b or b[0] * b[1] * b[2] > 1024 or max(g[1:]) > 65535 or g[0] >= 2**31:
            raise ValueError(f"CUDA_ERROR_INVALID_VALUE: a launch of grid {g} and block {b}")
        return g, b

    for name, fn in zip(names, (copy_to_host, reshape, ravel, transpose, getitem, view)):
        setattr(cls, name, fn)
    sim_kernel.normalize_kernel_dimensions = launch_dims
    yield
    for name in names:
        setattr(cls, name, saved[name])
    sim_kernel.normalize_kernel_dimensions = normalize


@functools.cache
def _real_gpu():
    from numba import cuda

    return cuda.is_available()


_BROKEN = []    # on a real GPU: the test after which the device reported an error, and the error


@pytest.fixture(autouse=True)
def _device_left_working(request):
    """On a real GPU: a test after which the device reports an error (an illegal address, a trap: errors
    that every later CUDA call of the process returns) fails at its teardown with that error, so that the
    report names the test that broke the context. Under pytest-xdist its worker then exits
    (pytest_runtest_logfinish) and a new one, with a new context, runs the tests left; in a single process
    they are skipped, naming that test. Nothing is done under the simulator."""
    if simulated() or not _real_gpu():
        yield
        return
    if _BROKEN:
        pytest.skip(f"the CUDA context of this process was broken after {_BROKEN[0]}")
    yield
    from numba import cuda

    try:
        cuda.synchronize()
    except Exception as e:      # numba's CudaAPIError or CudaDriverError
        _BROKEN.append(f"{request.node.nodeid} ({e})")
        pytest.fail(f"the device reported an error after this test; every later CUDA call of this process "
                    f"fails with it: {type(e).__name__}: {e}", pytrace=False)


def pytest_runtest_logfinish(nodeid, location):
    if _BROKEN and os.environ.get("PYTEST_XDIST_WORKER"):
        time.sleep(1.0)         # (the reports are on their way to the controller)
        os._exit(3)             # xdist starts a new worker for the tests this one had left


REPORT = []     # lines for the terminal summary: agreement rates the GPU tests measured


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("fastlogits: GPU agreement")
        for line in REPORT:
            terminalreporter.write_line(line)
