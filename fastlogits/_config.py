"""Process-wide settings: the default backend, thread count and chunk size, and what this build has."""
import contextlib
import contextvars
import operator
import os

_using = contextvars.ContextVar("fastlogits_use_backend", default=())   # use_backend's stack
_default_backend = "cpu"
DEFAULT_CHUNK = 4096
MAX_THREADS = 4096      # more is a typo, not a machine (and each thread gets a scratch buffer)


def is_int(value):
    """An integer argument: a Python or NumPy int, or a 0-d integer array (what operator.index takes),
    not a bool. (Every NumPy array has __index__, which raises for a float or an array of several.)"""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def int_arg(value, name, what, lo, hi=None):
    """value as an int, for the integer argument `name` described as `what` ("a positive integer", say):
    a TypeError for anything but an integer (a float or a bool is refused, not truncated), a ValueError
    outside [lo, hi]."""
    if not is_int(value):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be {what}, got {v}")
    return v


def _env_threads():
    v = os.environ.get("FASTLOGITS_NUM_THREADS", "").strip()
    if v:
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"FASTLOGITS_NUM_THREADS must be an integer from 1 to {MAX_THREADS}, got "
                             f"{v!r}") from None
        if not 1 <= n <= MAX_THREADS:
            raise ValueError(f"FASTLOGITS_NUM_THREADS must be an integer from 1 to {MAX_THREADS}, got {v!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# GNU OpenMP's thread pool does not survive fork(): a child forked after its parent ran a parallel region
# of 2 or more threads (ours, PyTorch's, numba's: one libgomp serves the process) hangs in its own first
# one, as PyTorch's kernels do. Which library ran threads before a fork cannot be told reliably (NumPy's
# OpenBLAS alone starts threads at import), so a forked child runs on one thread, whatever it asks for, as
# PyTorch's DataLoader sets its forked workers to one; multiprocessing's "spawn" and "forkserver" children
# are fresh processes and use every core.
_forked = False


def _after_fork_in_child():
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


_default_threads = None


def default_threads():
    """FASTLOGITS_NUM_THREADS if set, else every core this process may run on, read once, when first
    needed, as PyTorch reads OMP_NUM_THREADS (reading the environment costs a few microseconds a call, a
    tenth of a small call); 1 in a forked child (see _after_fork_in_child)."""
    global _default_threads
    if _forked:
        return 1
    if _default_threads is None:
        _default_threads = _env_threads()
    return _default_threads


GRAIN_CHUNKS = 4       # the default thread count gives a thread at least this many chunks of logits


def resolve_threads(threads, work=None, grain=None):
    """threads checked, as an int. None: default_threads(), but given ``work`` (the call's logits) and
    ``grain`` (the fewest logits worth a thread), no more than work // grain threads, at least 1: a thread
    woken for a few microseconds of work costs more than it saves, many times more on a busy machine
    (PyTorch's grain size, 32768 elements, does the same). A count given explicitly is kept (the kernels
    wake no more threads than they have work items)."""
    if threads is None:
        threads = default_threads()
        if work is not None:
            threads = max(1, min(threads, work // grain))
    elif not is_int(threads):
        raise TypeError(f"threads must be a positive integer or None, got {threads!r}")
    else:
        threads = int(threads)
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be an integer from 1 to {MAX_THREADS} or None, got {threads!r}")
    return 1 if _forked else threads


def resolve_chunk(chunk_size):
    if chunk_size is None:
        return DEFAULT_CHUNK
    return int_arg(chunk_size, "chunk_size", "a positive integer or None", 1)


def available_backends():
    """The backends this machine can run: always "cpu"; "gpu" when numba-cuda finds a CUDA device (or
    runs its simulator, NUMBA_ENABLE_CUDASIM=1)."""
    out = ["cpu"]
    if gpu_unavailable_reason() is None:
        out.append("gpu")
    return out


def gpu_unavailable_reason():
    """None when the GPU backend can run, else a sentence saying why not."""
    try:
        from fastlogits.gpu import availability
    except Exception as e:  # pragma: no cover - a broken install: say so, never fail the caller
        return f"the GPU backend does not load ({type(e).__name__}: {e})"
    return availability()


def _check_backend(name):
    if name not in ("cpu", "gpu"):
        raise ValueError(f"backend must be 'cpu' or 'gpu', got {name!r}")
    if name == "gpu":
        reason = gpu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"fastlogits: backend 'gpu' is not available: {reason}")
    return name


def set_backend(name):
    """Set the process default backend ("cpu" or "gpu") used when a call says backend=None and its data
    is not on a GPU."""
    global _default_backend
    _default_backend = _check_backend(name)


def get_backend():
    """The backend used when a call says backend=None (the innermost use_backend, else set_backend)."""
    stack = _using.get()
    return stack[-1][0] if stack else _default_backend


def use_backend(name):
    """A context manager: within the block, backend=None means `name`, in this thread or asyncio task
    (and what starts inside the block with a copy of its context, as contextvars go); other threads keep
    the process default of set_backend. The name is checked at the call."""
    return _use(_check_backend(name))


@contextlib.contextmanager
def _use(name):
    entry = (name, object())          # this block's own entry: blocks may end out of order (generators)
    _using.set(_using.get() + (entry,))
    try:
        yield
    finally:
        stack = _using.get()
        if entry in stack:            # (absent when the block ends in another context: nothing to undo)
            i = len(stack) - 1 - stack[::-1].index(entry)
            _using.set(stack[:i] + stack[i + 1:])


def get_include():
    """The folder holding the header-only C API ``fastlogits.h`` (for C, C++ and Cython builds)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


def show_config(as_dict=False):
    """Print (or return, with as_dict=True) what this build has: the SIMD code path chosen on this
    processor, whether OpenMP is on, the default thread count and the available backends."""
    from fastlogits import __version__
    from fastlogits.cpu import _info

    openmp = _info.openmp_enabled()
    try:
        threads = default_threads() if openmp else 1      # (without OpenMP every call runs on one thread)
    except ValueError as e:           # a bad FASTLOGITS_NUM_THREADS: reported, not raised
        threads = f"invalid: {e}"
    reason = gpu_unavailable_reason()
    cfg = {
        "version": __version__,
        "simd": _info.simd_path(),
        "openmp": openmp,
        "threads": threads,
        "backends": available_backends(),
        "default_backend": get_backend(),
        "include": get_include(),
        "gpu": "available" if reason is None else f"unavailable: {reason}",
    }
    if not as_dict:
        for k, v in cfg.items():
            print(f"{k:16s} {v}" + (" (a build without OpenMP)" if k == "threads" and not openmp else ""))
        return None
    return cfg
