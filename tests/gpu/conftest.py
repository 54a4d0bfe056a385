"""The GPU tests run under numba's CUDA simulator unless told otherwise.

``NUMBA_ENABLE_CUDASIM`` is set to 1 here, at import time, before anything imports numba.cuda (the CPU tests
never do); set ``NUMBA_ENABLE_CUDASIM=0`` to run these tests on a real GPU. The simulator runs every CUDA
thread in Python, so shapes stay small. The PTX check (test_ptx.py) compiles the kernels for sm_90 in a
subprocess without the simulator, so it needs no GPU either.
"""

import os
import sys

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


REPORT = []     # lines for the terminal summary: agreement rates the GPU tests measured


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("fastlogits: GPU agreement")
        for line in REPORT:
            terminalreporter.write_line(line)
