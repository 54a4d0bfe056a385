"""Numba entry points: fastlogits' C kernels callable inside ``@numba.njit`` code.

``logsumexp_row(x)`` and ``cross_entropy_row(x, label)`` take a 1-D float32 or float64 array (any
stride) and call the C core through the address of an exported C function, so a user's compiled loop
runs them at the C kernels' speed with no interpreter in between::

    import numba, numpy as np
    from fastlogits.numba import logsumexp_row, cross_entropy_row

    @numba.njit
    def mean_nll(logits, labels):
        total = 0.0
        for i in range(logits.shape[0]):
            total += cross_entropy_row(logits[i], labels[i])
        return total / logits.shape[0]

They may also be called from plain Python (a direct ctypes call). The GPU counterparts for
users' own numba.cuda kernels are in ``fastlogits.gpu.device``.
"""
import ctypes

import llvmlite.binding
import numba
import numpy as np
from numba.core import types
from numba.extending import overload, register_jitable

from fastlogits.cpu import _exports
from fastlogits.cpu.backend import aligned

__all__ = ["logsumexp_row", "cross_entropy_row"]

_lib = ctypes.CDLL(_exports.__file__)
# Compiled code calls the C functions by name (resolved in this process, as libm's are), not through a
# ctypes pointer: a user's @njit(cache=True) function that calls them can be cached
llvmlite.binding.load_library_permanently(_exports.__file__)
_lse_nb = types.ExternalFunction("fastlogits_lse_row", types.float64(types.uintp, types.int64, types.int64,
                                                                      types.int32))
_ce_nb = types.ExternalFunction("fastlogits_ce_row", types.float64(types.uintp, types.int64, types.int64,
                                                                    types.int32, types.int64))
_lse = _lib.fastlogits_lse_row
_lse.restype = ctypes.c_double
_lse.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
_ce = _lib.fastlogits_ce_row
_ce.restype = ctypes.c_double
_ce.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64]

_CODES = {np.dtype(np.float32): 2, np.dtype(np.float64): 3}   # FL_F32, FL_F64 in fastlogits.h


def _row(x, name):
    """(x, its type's code): x checked, or an aligned copy of it where it is not aligned (C reads it as its
    element type)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: x must be a 1-D float32 or float64 NumPy array, got {type(x).__name__}")
    code = _CODES.get(x.dtype)
    if code is None or x.ndim != 1:
        raise TypeError(f"{name}: x must be a 1-D float32 or float64 array, got {x.ndim}-D {x.dtype}")
    return aligned(x), code


def logsumexp_row(x):
    """log sum exp of a 1-D float32/float64 array (any stride): -inf when empty or all -inf, +inf with a
    +inf, NaN with a NaN."""
    x, code = _row(x, "logsumexp_row")
    return _lse(x.ctypes.data, x.size, x.strides[0], code)


def cross_entropy_row(x, label):
    """-log softmax(x)[label] for a 1-D float32/float64 array (any stride); NaN where PyTorch's
    log_softmax is NaN (a NaN or +inf in x, or all -inf). A label outside [0, len(x)) raises IndexError
    here, and gives NaN inside @njit code (Numba cannot raise from a prange loop or a @cfunc)."""
    x, code = _row(x, "cross_entropy_row")
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"cross_entropy_row: label must be an integer class index, got {label!r}")
    if not 0 <= label < x.size:
        raise IndexError(f"cross_entropy_row: label {label} is out of range for {x.size} classes")
    return _ce(x.ctypes.data, x.size, x.strides[0], code, label)


# Inside @njit code the same names compile to a direct call of the C function.

def _numba_code(x, name):
    if not isinstance(x, types.Array) or x.ndim != 1 or x.dtype not in (types.float32, types.float64):
        raise numba.core.errors.TypingError(f"{name}: x must be a 1-D float32 or float64 array, got {x}")
    return _CODES[np.dtype(str(x.dtype))]


@register_jitable
def _aligned_nb(x):
    """x, or an aligned copy of it (numba's array types do not say whether an array is aligned: checked
    here, at run time)."""
    size = x.itemsize
    if x.ctypes.data % size or x.strides[0] % size:
        return x.copy()
    return x


@overload(logsumexp_row)
def _logsumexp_row_nb(x):
    code = _numba_code(x, "logsumexp_row")

    def impl(x):
        a = _aligned_nb(x)
        return _lse_nb(a.ctypes.data, a.size, a.strides[0], code)
    return impl


@overload(cross_entropy_row)
def _cross_entropy_row_nb(x, label):
    code = _numba_code(x, "cross_entropy_row")
    if not isinstance(label, types.Integer):      # a float would be truncated (NaN to INT64_MIN): refused
        raise numba.core.errors.TypingError(f"cross_entropy_row: label must be an integer class index, got "
                                            f"{label}")

    # a label outside [0, len(x)) gives NaN, as the C functions: Numba drops an exception raised in a
    # prange loop (the thread's other rows were left unwritten: garbage) or a @cfunc (0.0 returned)
    def impl(x, label):
        a = _aligned_nb(x)
        return _ce_nb(a.ctypes.data, a.size, a.strides[0], code, label)
    return impl
