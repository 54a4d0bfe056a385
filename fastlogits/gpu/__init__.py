"""The GPU backend (numba.cuda). Imported only when used: ``import fastlogits`` never needs CUDA.

``backend`` implements the backend interface (see ``fastlogits/ops/_backend.py``), ``kernels`` holds the
kernels, ``device`` the device functions users may call from their own numba.cuda kernels. Under numba's
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) everything runs on the CPU, slowly: that is how CI tests it.
"""


def _numpy_compat():
    """numba-cuda 0.30 (the last release; it is in maintenance) registers an implementation of
    ``np.row_stack`` whenever it compiles a kernel, and NumPy 2.5 removed that alias of ``np.vstack``: every
    kernel would fail to compile with "module 'numpy' has no attribute 'row_stack'" (numba-cuda issue 907).
    Where NumPy lacks it, the alias is put back, as it was: ``np.vstack`` itself. (The ``gpu`` extra asks for
    NumPy < 2.5; this serves environments that already have 2.5, such as CUDA images.)"""
    import numpy as np

    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack


_numpy_compat()


def availability():
    """None when the GPU backend can run here (a CUDA device numba-cuda can use, or its simulator), else
    a sentence saying why not."""
    import importlib.util

    if importlib.util.find_spec("numba_cuda") is None:
        # numba's own numba.cuda (older numba) imports, but is not the numba-cuda the kernels are written
        # for: its simulator has no default_stream, for one
        return "numba-cuda is not installed; install fastlogits[gpu] (pip install 'numba-cuda[cu13]')"
    try:
        from numba import cuda
    except ImportError as e:
        return f"numba-cuda does not import ({e}); reinstall fastlogits[gpu]"
    except Exception as e:  # pragma: no cover - a broken install: say so, never fail the caller
        return f"numba.cuda does not import ({type(e).__name__}: {e})"
    try:
        if not cuda.is_available():
            return "numba-cuda finds no usable CUDA device or driver"
    except Exception as e:  # pragma: no cover - depends on the driver
        return f"CUDA initialisation failed: {e}"
    return None


def synchronize():
    """Wait for the GPU's queued work (fastlogits' calls on device arrays return without waiting), then
    raise what that work found: an IndexError for a device label out of range in an earlier
    ``cross_entropy`` call of this thread (that call's loss is NaN), or the ValueError for a row an earlier
    ``sample`` call could not sample (its token is -1). The next GPU call raises it too."""
    from fastlogits.ops import _backend
    _backend.get("gpu").synchronize()
