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
