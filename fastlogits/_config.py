"""Process-wide settings: the default backend, thread count and chunk size, and what this build has."""
import contextlib
import os
import threading

_state = threading.local()
_default_backend = "cpu"
DEFAULT_CHUNK = 4096


def _env_threads():
    v = os.environ.get("FASTLOGITS_NUM_THREADS", "").strip()
    if v:
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"FASTLOGITS_NUM_THREADS must be a positive integer, got {v!r}") from None
        if n < 1:
            raise ValueError(f"FASTLOGITS_NUM_THREADS must be a positive integer, got {v!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads():
    """FASTLOGITS_NUM_THREADS if set, else every core this process may run on."""
    return _env_threads()


def resolve_threads(threads):
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not hasattr(threads, "__index__"):
        raise TypeError(f"threads must be a positive integer or None, got {threads!r}")
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return int(threads)


def resolve_chunk(chunk_size):
    if chunk_size is None:
        return DEFAULT_CHUNK
    if isinstance(chunk_size, bool) or not hasattr(chunk_size, "__index__"):
        raise TypeError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


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
    except ImportError as e:
        return f"the GPU backend does not load ({e})"
    return availability()


def _check_backend(name):
    if name not in ("cpu", "gpu"):
        raise ValueError(f"backend must be 'cpu', 'gpu' or None, got {name!r}")
    return name


def set_backend(name):
    """Set the process default backend ("cpu" or "gpu") used when a call says backend=None and its data
    is not on a GPU."""
    global _default_backend
    name = _check_backend(name)
    if name == "gpu":
        reason = gpu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"fastlogits: backend 'gpu' is not available: {reason}")
    _default_backend = name


def get_backend():
    """The backend used when a call says backend=None (the innermost use_backend, else set_backend)."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _default_backend


@contextlib.contextmanager
def use_backend(name):
    """Within the block, backend=None means `name` (in this thread)."""
    name = _check_backend(name)
    if name == "gpu":
        reason = gpu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"fastlogits: backend 'gpu' is not available: {reason}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def get_include():
    """The folder holding the header-only C API ``fastlogits.h`` (for C, C++ and Cython builds)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


def show_config(as_dict=False):
    """Print (or return, with as_dict=True) what this build has: the SIMD code path chosen on this
    processor, whether OpenMP is on, the default thread count and the available backends."""
    from fastlogits import __version__
    from fastlogits.cpu import _info

    cfg = {
        "version": __version__,
        "simd": _info.simd_path(),
        "openmp": _info.openmp_enabled(),
        "threads": default_threads(),
        "backends": available_backends(),
        "default_backend": get_backend(),
        "include": get_include(),
    }
    if not as_dict:
        for k, v in cfg.items():
            print(f"{k:16s} {v}")
        reason = gpu_unavailable_reason()
        if reason is not None:
            print(f"{'gpu':16s} unavailable: {reason}")
        return None
    return cfg
