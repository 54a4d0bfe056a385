"""Argument checking and normalisation shared by every public function.

Every public function turns its ``logits`` into a :class:`Rows`: a 2-D view (rows, V) of the caller's
data (never written to), the element type's name, the leading shape, and the per-row temperature. Bad
arguments raise here, with the argument's name in the message.
"""
import math
import sys
from dataclasses import dataclass

import numpy as np

from fastlogits import _config

# bfloat16 is ml_dtypes' NumPy dtype, imported on first use: ml_dtypes' import takes 0.6 s of the 0.75 s
# that `import fastlogits` took with it, and no array can hold bfloat16 before it is imported.
_BF16 = None
_NAMES = {
    np.dtype(np.float16): "float16",
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
}


def bf16():
    """NumPy's bfloat16 dtype (ml_dtypes imported here, the first time)."""
    global _BF16
    if _BF16 is None:
        import ml_dtypes

        dt = np.dtype(ml_dtypes.bfloat16)
        _NAMES[dt] = "bfloat16"            # (first: another thread may read _NAMES once _BF16 is set)
        _BF16 = dt
    return _BF16


def is_bf16(dt):
    """dt is bfloat16 (without importing ml_dtypes where nothing could be bfloat16)."""
    return "ml_dtypes" in sys.modules and dt == bf16()


def _names():
    """The supported dtypes' names by dtype: bfloat16 among them once ml_dtypes is imported."""
    if _BF16 is None and "ml_dtypes" in sys.modules:
        bf16()
    return _NAMES


class _ByName(dict):
    def __missing__(self, name):
        if name != "bfloat16":
            raise KeyError(name)
        return bf16()


NP_DTYPES = _ByName({v: k for k, v in _NAMES.items()})      # the supported dtypes by name


def __getattr__(name):
    if name == "BF16":
        return bf16()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def scalar_if_0d(a):
    """A 0-d NumPy result as a NumPy scalar (as NumPy's reductions give one); anything else as it is."""
    return a[()] if isinstance(a, np.ndarray) and a.ndim == 0 else a


F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def compute_dtype(name):
    """The arithmetic (and the reductions' result dtype) for logits of dtype `name`: float64 for
    float64, float32 for the rest."""
    return F64 if name == "float64" else F32


def weight_sum(w):
    """The sum, in float64, of class weights as the kernels read them (w in the compute dtype): label
    smoothing's total weight. Weights inf and -inf give NaN, quietly, as in PyTorch; finite ones whose sum
    overflows give inf, quietly too (fl__dist_total reads it)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.sum(w, dtype=np.float64))


@dataclass
class Rows:
    x: object            # (rows, V) array: NumPy, or a GPU array
    dtype: str           # "float16", "bfloat16", "float32" or "float64"
    lead: tuple          # the leading shape: results have this shape (plus trailing axes)
    temperature: np.ndarray  # float64 (rows,), C-contiguous
    softcap: float       # 0.0 for none
    backend: str
    chunk: int
    threads: int

    @property
    def rows(self):
        return self.x.shape[0]

    @property
    def V(self):
        return self.x.shape[1]

    @property
    def result_dtype(self):
        """Reductions return float64 for float64 input, else float32 (the compute dtype)."""
        return compute_dtype(self.dtype)


def dtype_name(dtype, argname="dtype"):
    """The name of a supported float dtype ("bfloat16" accepted as a string)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return "bfloat16"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{argname} must be float16, bfloat16, float32 or float64, got {dtype!r}") from None
    names = _names()
    if dt not in names:
        if not dt.isnative and dt.newbyteorder("=") in names:
            raise TypeError(f"{argname} must be in this machine's byte order, got {dt.str} (a byte-swapped "
                            f"{names[dt.newbyteorder('=')]})")
        raise TypeError(f"{argname} must be float16, bfloat16, float32 or float64, got {dt}")
    return names[dt]


def is_gpu_array(x):
    """A GPU array: a numba device array (or the CUDA simulator's), or anything with
    __cuda_array_interface__ (CuPy, PyTorch CUDA tensors)."""
    return not isinstance(x, np.ndarray) and (hasattr(x, "__cuda_array_interface__")
                                             or bool(getattr(x, "__cuda_ndarray__", False)))


def unmasked(a, argname, fill="..."):
    """a, or a NumPy masked array's data when no entry is masked (netCDF readers return such arrays); one
    with masked entries raises TypeError: np.asarray would drop its mask, and so would every kernel (SciPy
    and PyTorch compute over the masked entries as if they were data), so the caller says what a masked
    entry means by filling it."""
    if not isinstance(a, np.ma.MaskedArray):
        return a
    if np.ma.is_masked(a):
        raise TypeError(f"{argname} is a masked array, whose mask fastlogits would ignore; fill the masked "
                        f"entries first: {argname}.filled({fill})")
    return np.ma.getdata(a)


def host_array(obj, argname="logits"):
    """A host array-like as a NumPy array: DLPack producers (a PyTorch CPU tensor, bfloat16 included) are
    read in place, anything else through np.asarray (a masked array is refused)."""
    obj = unmasked(obj, argname, "-np.inf" if argname == "logits" else "...")
    if hasattr(obj, "__dlpack__") and not isinstance(obj, np.ndarray):
        if hasattr(obj, "detach"):
            obj = obj.detach()       # a tensor that requires grad: read, never written
        if hasattr(obj, "resolve_neg"):
            obj = obj.resolve_neg()  # a lazily negated view (DLPack carries no negative bit): materialised
        if hasattr(obj, "resolve_conj"):
            obj = obj.resolve_conj()   # likewise a conjugated complex one (refused as complex afterwards)
        if str(getattr(obj, "dtype", "")) == "torch.bfloat16":    # NumPy has no DLPack bfloat16
            import torch
            return np.from_dlpack(obj.view(torch.int16)).view(bf16())
        try:
            return np.from_dlpack(obj)
        except (BufferError, TypeError, RuntimeError):
            pass
    try:
        return np.asarray(obj)
    except TypeError as e:    # a PyTorch float8, sparse or meta tensor: its words, and the argument's name
        raise TypeError(f"{argname}: a {type(obj).__name__} that cannot be read as an array ({e})") from None


def number_array(value, argname="value"):
    """A numeric argument (temperatures, weights, per-row filters) as a NumPy array: read as host_array
    reads logits (a PyTorch tensor in place), bfloat16 values as float32 (exactly: NumPy's kind for
    bfloat16 is "V", not "f")."""
    a = host_array(value, argname)
    return a.astype(np.float32) if is_bf16(a.dtype) else a


def as_array(logits, dtype=None, argname="logits"):
    """logits as an array with a supported float dtype (GPU arrays are left where they are). dtype=
    "bfloat16" re-declares 2-byte data (e.g. a |V2 or uint16 array) as bfloat16."""
    if is_gpu_array(logits):
        return logits
    logits = unmasked(logits, argname, "-np.inf")     # (masked classes: impossible ones)
    try:
        x = logits if isinstance(logits, np.ndarray) else host_array(logits, argname)
    except ValueError as e:
        if isinstance(logits, (list, tuple)):      # ragged: most likely blocks meant to be streamed
            hint = "; to stream row blocks, pass an iterator: iter(blocks)" if argname == "logits" else ""
            raise ValueError(f"{argname}: a list or tuple is read as one array, and this one is ragged "
                             f"({e}){hint}") from None
        raise
    if dtype is not None and dtype_name(dtype) == "bfloat16" and not is_bf16(x.dtype):
        if x.dtype.itemsize != 2 or x.dtype.kind not in "uiV":
            raise TypeError(f"{argname}: dtype='bfloat16' re-declares 2-byte data, but {argname} has "
                            f"dtype {x.dtype}")
        x = as_bf16(x)
    if x.dtype not in _names() and x.dtype.newbyteorder("=") not in _names():
        raise not_floating(argname, x.dtype)
    if x.ndim == 0:
        raise ValueError(f"{argname} must have at least one axis (the vocabulary), got a scalar")
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))   # the kernels read native byte order
    return x


def as_bf16(x):
    """2-byte data (|V2, uint16, int16) re-declared as bfloat16 bits; big-endian integers are swapped
    first, as big-endian floats are."""
    if x.dtype.kind in "ui" and not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x.view(bf16())


# the most elements whose byte offsets overlaps_itself lists (8 bytes each) to settle an odd layout
EXACT_OVERLAP_LIMIT = 1 << 24


def overlaps_itself(shape, strides, itemsize):
    """Whether two elements of an array (shape, strides in bytes, elements of itemsize bytes) share memory:
    True, False, or None where that was not settled (an odd layout of more than EXACT_OVERLAP_LIMIT
    elements). Any view that slicing, transposing or reshaping makes passes the quick test: with its axes
    in increasing order of |stride|, each stride steps past the whole extent of the axes before it."""
    if 0 in shape:
        return False
    axes = sorted((abs(st), n) for st, n in zip(strides, shape) if n > 1)
    if any(st == 0 for st, _ in axes):
        return True
    extent = itemsize
    for st, n in axes:
        if st < extent:
            break
        extent += (n - 1) * st
    else:
        return False
    size = math.prod(n for _, n in axes)
    if size > EXACT_OVERLAP_LIMIT:
        return None
    offsets = np.zeros(1, np.int64)
    for st, n in axes:
        offsets = (offsets[:, None] + np.arange(n, dtype=np.int64) * st).reshape(-1)
    offsets.sort()
    return bool(np.any(np.diff(offsets) < itemsize))


def check_own_places(shape, strides, itemsize, name="out"):
    """A ValueError when elements of an output array (host or device) share a place: a zero stride, or
    strides that make rows or columns interleave onto each other (np.lib.stride_tricks.as_strided can).
    An empty array has no values to share one (NumPy and numba give its axes zero strides)."""
    if 0 in shape:
        return
    if any(st == 0 and n > 1 for st, n in zip(strides, shape)):
        raise ValueError(f"{name}: out overlaps itself (a zero stride): every value needs its own place")
    verdict = overlaps_itself(shape, strides, itemsize)
    if verdict is not False:
        raise ValueError(f"{name}: out {'overlaps' if verdict else 'may overlap'} itself (shape "
                         f"{tuple(shape)}, strides {tuple(strides)} of {itemsize}-byte elements): every "
                         "value needs its own place; pass an array without overlapping elements (a C-order "
                         "one)")


def need_vocab(name, V):
    """A ValueError for a function that picks a token (argmax, sample) when there is none to pick, as
    NumPy's argmax and PyTorch's raise; a source with no rows too (its blocks never reach the check)."""
    if V == 0:
        raise ValueError(f"{name}: logits has an empty vocabulary (last axis of length 0)")


def to_rows(x):
    """(x2d, lead): a 2-D (rows, V) view of x when its strides allow one, else a copy."""
    lead, V = x.shape[:-1], x.shape[-1]
    if x.ndim == 2:
        return x, lead
    if x.ndim == 1:
        return x[None, :], lead
    return x.reshape(math.prod(lead), V), lead


def broadcast_rows(a, lead, argname):
    """A scalar, or an array broadcast to the leading shape (one value per row)."""
    if not a.ndim:
        return a
    try:
        return np.broadcast_to(a, lead)
    except ValueError:
        raise ValueError(f"{argname} must be a scalar or one value per row (an array that broadcasts to the "
                         f"leading shape {lead}), got shape {a.shape}") from None


# float32's smallest normal and largest finite numbers: a temperature or softcap outside them cannot be
# held by the float32 arithmetic of float16, bfloat16 and float32 logits (it would round to 0 or inf)
F32_TINY, F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def _f32_range(v, argname, name, where=""):
    return ValueError(f"{argname} {v!r}{where} is outside float32's range [{F32_TINY:.4g}, {F32_MAX:.4g}], "
                      f"the arithmetic of {name} logits (float64 logits take it)")


def row_name(pos, lead=None):
    """How messages name a row: "row 5" where there is one leading axis, "row (1, 0)" past one. pos: a
    flat row number in the leading shape `lead`, or the row's position along each axis (lead None)."""
    if lead is not None:
        pos = np.unravel_index(int(pos), lead) if len(lead) else (int(pos),)
    pos = tuple(int(j) for j in pos)
    return f"row {pos[0]}" if len(pos) == 1 else f"row {pos}"


def as_float(value, argname, need):
    """float(value), or an error naming the argument: TypeError for what is not a number, ValueError for an
    int too large for a float (10**400)."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{argname} must be {need}, got an integer too large for a float "
                         f"({len(str(abs(int(value))))} digits)") from None
    except (TypeError, ValueError):
        raise TypeError(f"{argname} must be {need}, got {value!r}") from None


ONES_MAX = 1 << 22       # rows of the shared array of ones (32 MiB); more rows get a fresh one a call
_ones = np.ones(0)


def ones(rows):
    """rows float64 ones, read-only: views of one array shared by every call (a temperature of 1 made a
    fresh array a call, 8 bytes a row of fresh pages, and with it glibc gave the results fresh pages too:
    float32 (262144, 16) logsumexp or entropy in a loop, one thread, 1257 -> 99 page faults a call)."""
    global _ones
    shared = _ones
    if shared.shape[0] < rows:
        if rows > ONES_MAX:
            return np.ones(rows)
        shared = np.ones(max(rows, min(2 * shared.shape[0], ONES_MAX)))
        shared.flags.writeable = False
        _ones = shared          # (a thread holding the last one keeps it alive)
    return shared[:rows]


def temperatures(temperature, lead, rows, argname="temperature", allow_zero=False, name="float64"):
    """One float64 temperature per row: a scalar, or an array of the leading shape (``name``: the logits'
    dtype name; below float64, a temperature must be a normal float32)."""
    if temperature.__class__ is float and temperature == 1.0:      # the default
        return ones(rows)
    f32 = name != "float64"
    if isinstance(temperature, (float, int)) and not isinstance(temperature, bool):   # the common case
        t = as_float(temperature, argname, "a finite float " + (">= 0" if allow_zero else "> 0"))
        if math.isfinite(t) and (t >= 0 if allow_zero else t > 0) and (
                not f32 or t == 0 or F32_TINY <= t <= F32_MAX):
            return ones(rows) if t == 1.0 else np.full(rows, t)
    if isinstance(temperature, (bool, str, bytes)) or temperature is None:
        raise TypeError(f"{argname} must be a float or an array of floats, got {temperature!r}")
    temperature = unmasked(temperature, argname)
    try:
        t = number_array(temperature, argname)
        if t.dtype.kind not in "fiu":
            raise TypeError
        t = t.astype(np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{argname} must be a float or an array of floats, got {temperature!r}") from None
    t = broadcast_rows(t, lead, argname)

    def first(bad):
        i = np.argwhere(np.atleast_1d(bad))[0]
        return np.atleast_1d(t)[tuple(i)], f" ({row_name(i)})" if t.ndim else ""

    bad = ~(np.isfinite(t) & ((t >= 0) if allow_zero else (t > 0)))
    if np.any(bad):
        val, where = first(bad)
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{argname} must be finite and {need}, got {float(val)!r}{where}")
    if f32:
        bad = (t != 0) & ((t < F32_TINY) | (t > F32_MAX))
        if np.any(bad):
            raise _f32_range(float(first(bad)[0]), argname, name, first(bad)[1])
    return np.require(np.broadcast_to(t, lead).reshape(rows), np.float64, "CA")   # (C reads it: aligned)


def not_floating(argname, dt, device=False):
    """The TypeError for logits of a dtype the kernels do not take (float128 said 'got float128 dtype
    float128'); for 2-byte integers, how to declare them bfloat16 bits (host or device arrays)."""
    kind = {"i": "integer ", "u": "integer ", "b": "bool ", "c": "complex "}.get(dt.kind, "")
    hint = ""
    if dt.kind in "iu" and dt.itemsize == 2:
        hint = ("; bfloat16 bits on a GPU are read through a 2-byte void view, x.view('V2')" if device else
                "; bfloat16 bits held as 2-byte integers are declared so with fastlogits.open(x, "
                "dtype='bfloat16')")
    return TypeError(f"{argname} must be floating point (float16, bfloat16, float32 or float64), got "
                     f"{kind}dtype {dt}{hint}")


def softcap_value(softcap, name="float64"):
    """softcap as a float (0.0 for None); below float64 it must be a normal float32 (see temperatures)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, (bool, np.bool_, str, bytes)):
        raise TypeError(f"softcap must be None or a float > 0, got {softcap!r}")
    c = as_float(softcap, "softcap", "None or a float > 0")
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    if name != "float64" and not F32_TINY <= c <= F32_MAX:
        raise _f32_range(c, "softcap", name)
    return c


def resolve_backend(backend, x):
    """backend=None: a GPU array runs on the GPU, anything else on the process default."""
    if backend is None:
        return "gpu" if is_gpu_array(x) else _config.get_backend()
    if backend not in ("cpu", "gpu"):
        raise ValueError(f"backend must be 'cpu', 'gpu' or None, got {backend!r}")
    if backend == "cpu" and is_gpu_array(x):
        raise ValueError("backend='cpu' was asked for logits that live on a GPU; copy them to the host "
                         "first or use backend='gpu'")
    return backend


def prepare(logits, *, temperature=1.0, softcap=None, backend=None, threads=None, chunk_size=None,
            dtype=None, allow_zero_temperature=False, grain_chunks=_config.GRAIN_CHUNKS):
    """Check and normalise the arguments every function shares. grain_chunks: the chunks of logits that
    the default thread count gives a thread at least (fewer for work that costs more per logit)."""
    x = as_array(logits, dtype=dtype)
    backend = resolve_backend(backend, x)
    if backend == "gpu":
        from fastlogits.ops._backend import gpu_rows
        x2, lead, name = gpu_rows(x, dtype)
    else:
        name = _names()[x.dtype]
        x2, lead = to_rows(x)
    chunk = _config.resolve_chunk(chunk_size)
    return Rows(
        x=x2,
        dtype=name,
        lead=lead,
        temperature=temperatures(temperature, lead, x2.shape[0], allow_zero=allow_zero_temperature,
                                 name=name),
        softcap=softcap_value(softcap, name),
        backend=backend,
        chunk=min(chunk, max(1, x2.shape[1])),
        threads=_config.resolve_threads(threads, x2.shape[0] * x2.shape[1], grain_chunks * chunk),
    )
