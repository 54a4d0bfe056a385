"""Sources: logit dumps read lazily, in row blocks and column ranges, into buffers the caller reuses.

A source has ``shape`` (its leading shape plus V; for standard input and iterables the number of rows is
unknown until the end, and ``shape[0]`` is None), ``dtype`` (a name: "float16", "bfloat16", "float32",
"float64"), ``nbytes`` (None when unknown) and two ways to be read:

- ``read(r0, r1, c0=0, c1=None, out=None)``: rows r0..r1 and columns c0..c1 as a 2-D array (random access;
  files and array-likes only, ``random_access`` is True);
- ``blocks(max_rows)``: the rows in order, as 2-D arrays of at most max_rows rows (every source).

Files are read with ``os.preadv`` into preallocated buffers (never memory-mapped, so page tables do not
fill up with a dump larger than memory); a truncated file, a bad header or an unsupported dtype raises
:class:`SourceError`, which says what was expected and what was found.
"""
import builtins
import contextlib
import io
import itertools
import json
import math
import mmap
import os
import stat
import struct
import sys
import threading
import tokenize

import numpy as np

from fastlogits._config import int_arg
from fastlogits.ops._prep import NP_DTYPES, as_bf16, dtype_name, host_array, is_bf16, unmasked


class SourceError(ValueError):
    """A logit dump that cannot be read as asked: the message says what was expected and what was found."""


class SourceDtypeError(SourceError, TypeError):
    """A logit dump whose values are not float logits (integers, bools, complex numbers, objects, raw
    2-byte values not declared bfloat16): a SourceError, and a TypeError, as the same values in memory
    raise."""


def reason(e):
    """What an exception of a file parser says, for a message (tokenize's TokenError, which NumPy's .npy
    header parser lets through, holds a (text, position) pair: its text), else its type's name."""
    if isinstance(e, tokenize.TokenError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


def _itemsize(name):
    return NP_DTYPES[name].itemsize


class _Closing:
    """A source holding an open file: closed by close(), at the end of a with block, or when collected."""

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def named_error(e, message):
    """The OSError e again, of its type and errno, with `message` (naming the file) as its text: a caller
    may still test e.errno (ENOSPC, EFBIG), and the command line prints the message alone."""
    return type(e)(e.errno, message) if e.errno is not None else type(e)(message)


class _RandomAccess:
    """A source with read(): its blocks are reads."""

    random_access = True

    def blocks(self, max_rows):
        for r0 in range(0, self.rows, max_rows):
            yield self.read(r0, min(self.rows, r0 + max_rows))


class _FileSource(_RandomAccess, _Closing):
    """Rows of an array stored at `offset` in a file: C-ordered, or a 2-D array in Fortran order (a column
    after another: np.save of a transposed array writes one), whose rows are read a column segment at a
    time into a block laid out by columns, as the CPU kernels take a transposed array."""

    reads_into_out = True      # read(out=) fills out (a view of it) when it is large enough

    def __init__(self, path, shape, dtype, offset, fmt, byteswap=False, fortran=False, fd=None):
        """fd: read an open file (a duplicate of the descriptor) instead of opening `path`, which then
        only names it in messages."""
        self.path = os.fspath(path)
        self.byteswap = byteswap
        self.shape = tuple(int(d) for d in shape)
        if len(self.shape) == 0:
            raise SourceError(f"{self.path}: expected logits with at least one axis, found a scalar")
        self.fortran = fortran and len(self.shape) > 1
        self.dtype = dtype
        self.offset = offset
        self.format = fmt
        self.V = self.shape[-1]
        self.rows = math.prod(self.shape[:-1])
        self.nbytes = self.rows * self.V * _itemsize(dtype)
        # reads in flight (other threads may read one source at once), and the descriptor close() let go
        # of while there were some: the last of them closes it, so that no read goes to a closed number,
        # which a file opened meanwhile may have taken
        self._lock, self._readers, self._closing = threading.Lock(), 0, None
        self._fd = os.open(self.path, os.O_RDONLY) if fd is None else os.dup(fd)
        size = os.fstat(self._fd).st_size
        if size < offset + self.nbytes:
            self.close()
            raise SourceError(
                f"{self.path}: truncated {fmt} file: shape {self.shape} of {dtype} needs {self.nbytes} bytes "
                f"of data after a {offset}-byte header ({offset + self.nbytes} in all), found {size} bytes")

    def close(self):
        """Closes the file, once the reads in flight in other threads are done (they finish; later ones
        raise)."""
        # the descriptor is let go before it is closed: a signal handled between the two (Ctrl-C right
        # after os.close returns) must not leave a number that a later close() would close again, when it
        # may name another file by then
        if not hasattr(self, "_lock"):
            return
        with self._lock:
            fd, self._fd = getattr(self, "_fd", None), None
            if fd is not None and self._readers:
                fd, self._closing = None, fd
        if fd is not None:
            os.close(fd)

    def __repr__(self):
        return f"<fastlogits source {self.format} {self.path!r} shape={self.shape} dtype={self.dtype}>"

    @contextlib.contextmanager
    def _reading(self):
        """The open descriptor, for one read: a ValueError once the source was closed; a read error as an
        OSError naming the file."""
        with self._lock:
            fd = self._fd
            if fd is None:
                raise ValueError(f"{self.path}: this source was closed; open the file again")
            self._readers += 1
        try:
            yield fd
        except OSError as e:
            if e.filename is not None:
                raise
            raise named_error(e, f"{self.path}: cannot read ({e.strerror})") from None
        finally:
            with self._lock:
                self._readers -= 1
                fd = None
                if not self._readers:
                    fd, self._closing = self._closing, None
            if fd is not None:
                os.close(fd)

    def _pread_into(self, fd, buf, pos):
        view = memoryview(buf.reshape(-1).view(np.uint8))   # bytes (bfloat16 has no buffer format)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise SourceError(f"{self.path}: file shrank while being read (expected {len(view)} bytes at "
                                  f"offset {pos})")
            done += n

    def protect(self, out):
        """A ValueError if the output array `out` lies in a mapping of this file (a memmap of the dump
        being read, or any array over such a map's memory); else the source, for the call to read."""
        if _maps_file(out, self.path):
            raise _overlap_error(f"the file being read, {self.path}")
        return self

    def read(self, r0, r1, c0=0, c1=None, out=None):
        c1 = self.V if c1 is None else c1
        if not (0 <= r0 <= r1 <= self.rows and 0 <= c0 <= c1 <= self.V):
            raise IndexError(f"rows {r0}:{r1}, columns {c0}:{c1} outside shape ({self.rows}, {self.V})")
        dt = NP_DTYPES[self.dtype]
        shape = (r1 - r0, c1 - c0)
        with self._reading() as fd:
            out = (self._read_columns if self.fortran else self._read_rows)(fd, r0, c0, shape, dt, out)
        if self.byteswap:
            out.view(f"u{dt.itemsize}").byteswap(inplace=True)   # a big-endian file, read into native order
        return out

    def _read_rows(self, fd, r0, c0, shape, dt, out):
        """Rows r0.. and columns c0.. (`shape`) of a C-order file, into `out` when it is large enough:
        one read for whole rows, else one a row."""
        if out is None or out.shape[0] < shape[0] or out.shape[1] < shape[1] or out.dtype != dt:
            out = np.empty(shape, dt)
        else:
            out = out[:shape[0], :shape[1]]
        isz = dt.itemsize
        if c0 == 0 and shape[1] == self.V and out.flags.c_contiguous:
            self._pread_into(fd, out, self.offset + r0 * self.V * isz)
        else:
            for i in range(shape[0]):
                self._pread_into(fd, out[i], self.offset + ((r0 + i) * self.V + c0) * isz)
        return out

    def _read_columns(self, fd, r0, c0, shape, dt, out):
        """Rows r0.. and columns c0.. (`shape`) of a Fortran-order file, into an array whose columns are
        contiguous (a view of `out` when it is one large enough, as row_blocks passes the buffer of the
        block before). Each column's rows are a segment of the file: the whole slab in one read when the
        block holds every row; whole columns a tile at a time, the block's rows copied out, when a column's
        other rows are a few KiB (one read per column would cost more); else one read per column
        (``_layout.read_columns``, the GIL released)."""
        from fastlogits.cpu import _layout

        n, c = shape
        isz, height = dt.itemsize, self.rows * dt.itemsize
        if (out is None or out.ndim != 2 or out.dtype != dt or not out.flags.writeable
                or out.shape[0] < n or out.shape[1] < c or (out.shape[0] > 1 and out.strides[0] != isz)):
            out = np.empty(shape, dt, order="F")
        out = out[:n, :c]
        pos = self.offset + c0 * height + r0 * isz
        if n == 0 or c == 0:
            pass
        elif n == self.rows and out.flags.f_contiguous:
            self._pread_into(fd, out.T, pos)
        elif (self.rows - n) * isz <= COALESCE_BYTES:
            tile = np.empty((min(c, max(1, TILE_BYTES // height)), self.rows), dt)   # a column a row
            for j in range(0, c, tile.shape[0]):
                k = min(tile.shape[0], c - j)
                self._pread_into(fd, tile[:k], self.offset + (c0 + j) * height)
                out[:, j:j + k] = tile[:k, r0:r0 + n].T
        elif _layout.read_columns(fd, out, pos, height) < c:
            raise SourceError(f"{self.path}: file shrank while being read (expected {n * isz} bytes at "
                              f"each of {c} columns from offset {pos})")
        return out


def _bf16_redeclares(dt):
    """Whether dtype="bfloat16" may re-declare data of dtype dt: raw 2-byte values (|V2, bfloat16 itself,
    uint16, int16), not float16 or any other size: those are values of their own."""
    return dt.itemsize == 2 and dt.kind in "Vui"


def _native(dt):
    """The dtype dt in native byte order: big-endian float data is swapped as it is read."""
    return dt.newbyteorder("=") if dt.kind == "f" and not dt.isnative else dt


def _byte_bounds(arr):
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:  # pragma: no cover - NumPy 1.x
        byte_bounds = np.byte_bounds
    return byte_bounds(arr)


def _file_extents(arr):
    """The files under the memory of array `arr` (not empty), by the process' mappings (/proc/self/maps,
    Linux): (device, inode, name, first byte, end byte) of the file bytes each mapping of them holds
    within arr's bounds. None where the mappings cannot be read (not Linux)."""
    try:
        with builtins.open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:  # pragma: no cover - not Linux
        return None
    lo, hi = _byte_bounds(arr)
    out = []
    for line in maps:
        parts = line.split(maxsplit=5)
        a, b = (int(v, 16) for v in parts[0].split("-"))
        if a < hi and lo < b and len(parts) == 6 and parts[4] != "0":
            off = int(parts[2], 16)
            out.append((parts[3], parts[4], parts[5], off + max(lo, a) - a, off + min(hi, b) - a))
    return out


def _memmap_name(arr):
    while isinstance(arr, np.ndarray) and not isinstance(arr, np.memmap):
        arr = arr.base
    return getattr(arr, "filename", None)


def _maps_file(arr, path):
    """Whether the memory of array `arr` lies in a mapping of the file at `path`: on Linux, by the process'
    mappings (the file's device and inode, or its name); elsewhere, by the file name of the np.memmap it
    views."""
    if arr.size == 0:
        return False
    extents = _file_extents(arr)
    if extents is None:  # pragma: no cover - not Linux
        name = _memmap_name(arr)
        return bool(name) and os.path.exists(name) and os.path.samefile(name, path)
    st, real = os.stat(path), os.path.realpath(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    return any((d == dev and ino == str(st.st_ino)) or name == real for d, ino, name, _, _ in extents)


def _over_file_map(arr):
    """Whether array `arr` views a memory map (np.memmap, mmap.mmap): its base chain ends in one."""
    while isinstance(arr, np.ndarray) and arr.base is not None:
        arr = arr.base
    return isinstance(arr, mmap.mmap)


def shares_memory(a, b):
    """np.shares_memory(a, b) of two host arrays, and also where they lie in two maps of the same file
    bytes (two np.memmap of one .npy, at different addresses: writing one changes the other). The maps'
    file bytes are compared by their bounds, so two interleaved views of one file count as sharing."""
    if np.shares_memory(a, b):
        return True
    if a.size == 0 or b.size == 0 or not (_over_file_map(a) and _over_file_map(b)):
        return False
    ea, eb = _file_extents(a), _file_extents(b)
    if ea is None or eb is None:  # pragma: no cover - not Linux: by file name, whatever the bytes
        na, nb = _memmap_name(a), _memmap_name(b)
        return bool(na and nb) and os.path.exists(na) and os.path.exists(nb) and os.path.samefile(na, nb)
    return any(d1 == d2 and i1 == i2 and lo1 < hi2 and lo2 < hi1
               for d1, i1, _, lo1, hi1 in ea for d2, i2, _, lo2, hi2 in eb)


def _overlap_error(what, first=True):
    """The ValueError for an out array over the logits: found before any row was written (first), or
    only when a later block was read, after rows of earlier blocks may have been written over it."""
    if first:
        return ValueError(f"out overlaps {what}; the caller's logits are never written to")
    return ValueError(f"out overlaps {what}: out must not share memory with the logits (the rows written "
                      "for earlier blocks may already be in them)")


def _bf16_refusal(dt):
    found = f"the values are {_native(dt).name}" if dt.kind == "f" else f"it holds {dt}"
    return f"dtype='bfloat16' re-declares raw 2-byte data (|V2, uint16, int16), but {found}"


COALESCE_BYTES = 2 << 10   # a Fortran file's column rows a block skips, read along below this: a read
                           # costs about as much as copying 2-4 KiB (one per element: 0.6 us)
TILE_BYTES = 1 << 20       # the whole columns read at a time then

NPY_HEADER_MAX = 1 << 20     # bytes of a .npy header (NumPy writes under 64 KiB; its own limit is 10000)


def npy_header(f, path):
    """(shape, fortran_order, dtype, data offset) of the .npy file open as f, checked: a SourceError naming
    path for anything that is not a valid header (for logits and for labels alike)."""
    from numpy.lib import format as npf

    try:
        version = npf.read_magic(f)
        # version 3.0 differs from 2.0 only in allowing UTF-8 in the header, which the 2.0 reader reads
        read_header = {(1, 0): npf.read_array_header_1_0, (2, 0): npf.read_array_header_2_0,
                       (3, 0): npf.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy format version {version}")
        # the header's length, checked before NumPy reads that many bytes (a corrupt v2 length: 4 GiB)
        width = 2 if version == (1, 0) else 4
        field = f.read(width)
        if len(field) < width:
            raise ValueError(f"the file ends in its header's length: expected {width} bytes, found "
                             f"{len(field)}")
        size = int.from_bytes(field, "little")
        if size > NPY_HEADER_MAX:
            raise ValueError(f"its header claims {size} bytes, expected at most {NPY_HEADER_MAX}")
        f.seek(-width, os.SEEK_CUR)
        shape, fortran, dt = read_header(f, max_header_size=NPY_HEADER_MAX)
    except OSError:
        raise
    except Exception as e:    # NumPy's header parser: ValueError, and for some corrupt headers
        # tokenize's TokenError (found by a fuzz: 378 of 4000 random corruptions)
        raise SourceError(f"{path}: not a valid .npy file ({reason(e)})") from None
    if any(isinstance(d, bool) for d in shape):       # (NumPy's own reader refuses (True, 3) too)
        raise SourceError(f"{path}: not a valid .npy file (shape {shape}: expected integers)")
    if any(d < 0 for d in shape):
        raise SourceError(f"{path}: not a valid .npy file (a negative dimension in shape {shape})")
    return shape, fortran, dt, f.tell()


def read_npy(path):
    """A whole, small .npy file (labels) as an array, checked as a logits file is: the header, and the
    data's size against it before anything is allocated (a header claiming 2**36 values of a 32-byte
    file, or bytes past the data, is a SourceError naming the file)."""
    with builtins.open(path, "rb") as f:
        shape, fortran, dt, offset = npy_header(f, path)
        if dt.hasobject:
            raise SourceError(f"{path}: expected an array of numbers, found an object array")
        need = math.prod(shape) * dt.itemsize
        found = os.fstat(f.fileno()).st_size - offset
        if found != need:
            raise SourceError(f"{path}: its header's shape {tuple(shape)} of {dt} describes {need} bytes of "
                              f"data after a {offset}-byte header, found {found}")
        a = np.fromfile(f, dtype=dt, count=math.prod(shape))
    return a.reshape(shape, order="F" if fortran else "C")


def open_npy(path, dtype=None):
    """A .npy file, read lazily; dtype="bfloat16" re-declares a 2-byte (|V2, <u2, <i2) file."""
    path = os.fspath(path)
    with builtins.open(path, "rb") as f:
        shape, fortran, dt, offset = npy_header(f, path)
    if fortran and len(shape) > 2:
        raise SourceError(f"{path}: expected a C-ordered .npy array or a 2-D Fortran-ordered one, found a "
                          f"Fortran-ordered array of shape {tuple(shape)} (save it in C order: "
                          "np.save(path, np.ascontiguousarray(a)))")
    if dt.hasobject:
        raise SourceDtypeError(f"{path}: expected float logits, found an object array")
    swap = not dt.isnative and dt.itemsize > 1      # big-endian data: swapped as it is read
    if swap and _big_endian(dtype) == dt.str:       # the file's own byte-swapped dtype, declared
        dtype = dt.newbyteorder("=")
    dt = dt.newbyteorder("=") if swap else dt
    if dtype is not None and dtype_name(dtype) == "bfloat16":
        if not _bf16_redeclares(dt):
            raise SourceError(f"{path}: {_bf16_refusal(dt)}")
        name = "bfloat16"
    else:
        if is_bf16(dt):         # a header that names bfloat16 (np.save of bfloat16 writes |V2 instead)
            name = "bfloat16"
        elif dt.kind == "V" and dt.itemsize == 2:
            raise SourceDtypeError(f"{path}: the file holds raw 2-byte values ({dt.str}); if they are "
                                   "bfloat16, open it with dtype='bfloat16' (--dtype bfloat16 on the "
                                   "command line)")
        else:
            try:
                name = dtype_name(dt)
            except TypeError:
                raise SourceDtypeError(f"{path}: expected float16, bfloat16, float32 or float64 logits, "
                                       f"found {dt}") from None
        if dtype is not None and dtype_name(dtype) != name:
            raise SourceError(f"{path}: dtype={dtype!r} was asked for, but the file holds {name}")
    src = _FileSource(path, shape, name, offset, "npy", byteswap=swap, fortran=fortran)
    extra = os.fstat(src._fd).st_size - offset - src.nbytes
    if extra > 0:           # np.save writes none: rows past the header's shape would be dropped
        src.close()
        raise SourceError(f"{path}: its header's shape {src.shape} of {name} describes {src.nbytes} bytes of "
                          f"data after a {offset}-byte header, found {extra} bytes more: a header that "
                          "does not match the data")
    return src


def _big_endian(dtype):
    """dtype's string (such as '>f4') when it names a big-endian dtype, else None."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return None
    return dt.str if dt.byteorder == ">" else None


def open_raw(path, dtype, vocab, offset=0, fd=None):
    """Raw little-endian rows of `vocab` values of `dtype`, back to back (fd: in that open file, which
    `path` then only names)."""
    path = os.fspath(path)
    if dtype is None or vocab is None:
        raise SourceError(f"{path}: a raw file needs dtype= and vocab= (--dtype and --vocab on the command "
                          "line): its rows are not self-describing")
    big = _big_endian(dtype)
    if big:
        raise SourceDtypeError(f"{path}: a raw file is read as little-endian, and dtype={big!r} is "
                               f"big-endian: pass np.memmap({path!r}, dtype={big!r}).reshape(-1, vocab) as "
                               "the logits instead (an array-like source)")
    name = dtype_name(dtype)
    vocab = check_vocab(vocab)
    size = (os.path.getsize(path) if fd is None else os.fstat(fd).st_size) - offset
    row_bytes = vocab * _itemsize(name)
    if size % row_bytes:
        raise SourceError(f"{path}: {size} bytes is not a whole number of rows of {vocab} {name} values "
                          f"({row_bytes} bytes each): {size // row_bytes} rows and {size % row_bytes} bytes "
                          "left over (wrong vocab or dtype, or a truncated file)")
    return _FileSource(path, (size // row_bytes, vocab), name, offset, "raw", fd=fd)


ST_HEADER_MAX = 100 * 2**20     # bytes of a safetensors header (the format's own limit)
_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


class _Object(dict):
    """A JSON object read by json.loads, which keeps the last of a key given twice: `twice` is the first
    such key, or None."""
    def __init__(self, pairs):
        super().__init__(pairs)
        seen = set()
        self.twice = next((k for k, _ in pairs if k in seen or seen.add(k)), None)


def open_safetensors(path, tensor=None, dtype=None):
    """A .safetensors file (header parsed here: the safetensors package's NumPy loader has no BF16); dtype,
    when given, must be the tensor's, or "bfloat16" to re-declare a U16 or I16 tensor, as for .npy."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with builtins.open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(f"{path}: expected a safetensors file (an 8-byte header length first), found "
                              f"{size} bytes in all")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise SourceError(f"{path}: corrupt safetensors header: its length field says {n} bytes, the "
                              f"file has {size - 8} after it")
        if n > ST_HEADER_MAX:
            raise SourceError(f"{path}: corrupt safetensors header: its length field says {n} bytes, "
                              f"expected at most {ST_HEADER_MAX} (the format's limit)")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_Object)
        except ValueError as e:     # not UTF-8, not JSON, or an integer of more than 4300 digits
            raise SourceError(f"{path}: corrupt safetensors header (not JSON: {reason(e)})") from None
        except RecursionError:
            raise SourceError(f"{path}: corrupt safetensors header (expected a JSON object of tensor "
                              "entries, found values nested too deep to read)") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (expected a JSON object)")
    if header.twice is not None:
        raise SourceError(f"{path}: corrupt safetensors header: {header.twice!r} is listed more than once "
                          "(expected each tensor once)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    bad = next((k for k in tensors if not k.isprintable()), None)
    if bad is not None:     # (JSON's escapes make lone surrogates and control codes, which no terminal shows)
        raise SourceError(f"{path}: corrupt safetensors header: a tensor name that is not printable "
                          f"UTF-8 text, {ascii(bad)}")
    if not tensors:
        raise SourceError(f"{path}: the safetensors file holds no tensor")
    if tensor is None:
        if len(tensors) > 1:
            names = ", ".join(sorted(tensors))
            raise SourceError(f"{path}: the file holds {len(tensors)} tensors ({names}); say which with "
                              "tensor= (--tensor on the command line)")
        tensor = next(iter(tensors))
    if tensor not in tensors:
        raise SourceError(f"{path}: no tensor named {tensor!r}; the file holds: {', '.join(sorted(tensors))}")
    data = size - 8 - n
    spans = {k: _st_entry(path, k, v) for k, v in tensors.items()}
    end = 0     # the format's rule: the tensors' data is back to back, no holes, no overlaps
    for k, (_, _, b0, b1) in sorted(spans.items(), key=lambda kv: kv[1][2:]):
        if b0 != end:
            raise SourceError(f"{path}: corrupt safetensors header: tensor {k!r} starts at byte {b0} of the "
                              f"data, expected {end} (the tensors' data must be back to back)")
        end = b1
    if end > data:
        raise SourceError(f"{path}: truncated safetensors file: its tensors need {end} bytes of data after "
                          f"the {8 + n}-byte header, found {data}")
    if end < data:
        raise SourceError(f"{path}: corrupt safetensors file: {data - end} bytes after the last tensor's "
                          "data")
    name, shape, b0, _ = spans[tensor]
    st_dtype = tensors[tensor]["dtype"]
    bf16 = dtype is not None and dtype_name(dtype) == "bfloat16"
    if name is None and bf16 and st_dtype in ("U16", "I16"):
        name = "bfloat16"
    elif name is None:
        bits = st_dtype in ("U16", "I16")
        hint = " (if they are bfloat16 bits, open it with dtype='bfloat16')" if bits else ""
        raise SourceDtypeError(f"{path}: tensor {tensor!r} holds {st_dtype} values; expected F16, BF16, "
                               f"F32 or F64 logits{hint}")
    elif dtype is not None and dtype_name(dtype) != name:
        raise SourceError(f"{path}: dtype={dtype!r} was asked for, but the tensor holds {name}")
    src = _FileSource(path, shape, name, 8 + n + b0, "safetensors")
    src.tensor = tensor
    return src


def _st_entry(path, key, info):
    """(dtype name, shape, begin, end) of one tensor's header entry, checked."""
    if getattr(info, "twice", None) is not None:
        raise SourceError(f"{path}: corrupt safetensors entry for {key!r}: {info.twice!r} is given more than "
                          "once (expected dtype, shape and data_offsets once each)")
    try:
        st_dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError):
        raise SourceError(f"{path}: corrupt safetensors entry for {key!r} (expected dtype, shape and "
                          f"data_offsets), found {info!r}") from None

    def ints(v, n=None):
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v))

    if not isinstance(st_dtype, str):
        raise SourceError(f"{path}: corrupt safetensors entry for {key!r}: expected a dtype name such as "
                          f"\"F32\", found {st_dtype!r}")
    if not ints(shape):
        raise SourceError(f"{path}: corrupt safetensors entry for {key!r}: expected a shape of non-negative "
                          f"integers, found {shape!r}")
    if not ints(offsets, 2) or offsets[0] > offsets[1]:
        raise SourceError(f"{path}: corrupt safetensors entry for {key!r}: expected data_offsets [begin, "
                          f"end] with 0 <= begin <= end, found {offsets!r}")
    b0, b1 = offsets
    if st_dtype not in _ST_DTYPES:      # other tensors of any dtype may share the file; only sizes matter
        return None, shape, b0, b1
    name = _ST_DTYPES[st_dtype]
    need = math.prod(shape) * _itemsize(name)
    if b1 - b0 != need:
        raise SourceError(f"{path}: tensor {key!r}: shape {shape} of {name} needs {need} bytes, its "
                          f"offsets span {b1 - b0}")
    return name, shape, b0, b1


class ArraySource(_RandomAccess):
    """Any sliceable array-like of shape (..., V): a NumPy array or memmap, an h5py dataset, a zarr array."""

    format = "array"

    def __init__(self, array, dtype=None):
        array = unmasked(array, "logits", "-np.inf")
        self.array = array
        self.shape = tuple(int(d) for d in array.shape)
        if len(self.shape) == 0:
            raise SourceError("expected logits with at least one axis, found a scalar")
        dt = np.dtype(array.dtype)
        if dtype is not None and dtype_name(dtype) == "bfloat16":
            if not _bf16_redeclares(dt):
                raise SourceError(_bf16_refusal(dt))
            self.dtype = "bfloat16"
        else:
            self.dtype = "bfloat16" if is_bf16(dt) else dtype_name(_native(dt), "logits")
        self.V = self.shape[-1]
        self.rows = math.prod(self.shape[:-1])
        self.nbytes = self.rows * self.V * _itemsize(self.dtype)
        self._flat = len(self.shape) == 2
        # whether a read makes a new array (plan() then counts three blocks, not two): a 2-D NumPy
        # array's (a memmap's) in native order is a view; an h5py or zarr slice, the stacked rows of an
        # N-D array and a byte-swapped copy are new
        self.allocates = not (isinstance(array, np.ndarray) and self._flat and dt.isnative)

    def __repr__(self):
        return f"<fastlogits source {type(self.array).__name__} shape={self.shape} dtype={self.dtype}>"

    def _rows(self, r0, r1, c0, c1):
        if self._flat:
            return self.array[r0:r1, c0:c1]
        lead = self.shape[:-1]
        if len(lead) == 0:     # (h5py and zarr index with ints and slices only)
            return np.asarray(self.array[c0:c1])[None]
        # rows of a (..., V) array-like: slice row by row through the leading index
        return np.stack([self.array[np.unravel_index(r, lead) + (slice(c0, c1),)] for r in range(r0, r1)]) \
            if r1 > r0 else np.empty((0, c1 - c0), NP_DTYPES[self.dtype])

    def protect(self, out):
        """This source for one call writing to the output array `out`, each block it reads checked against
        out (an array-like's slices may be views of an array in memory): a ValueError if they share
        memory. The source itself is left as it is, for other calls and threads."""
        return _Guarded(self, out)

    def read(self, r0, r1, c0=0, c1=None, out=None, *, protect=None):
        c1 = self.V if c1 is None else c1
        block = np.asarray(self._rows(r0, r1, c0, c1))
        if protect is not None and shares_memory(block, protect):
            raise _overlap_error(f"rows {r0}:{r1} of the source", first=r0 == 0 and c0 == 0)
        if block.shape != (r1 - r0, c1 - c0):
            raise SourceError(f"{type(self.array).__name__}: rows {r0}:{r1}, columns {c0}:{c1} came back "
                              f"with shape {block.shape}, expected {(r1 - r0, c1 - c0)}")
        if self.dtype == "bfloat16" and not is_bf16(block.dtype):
            block = as_bf16(block)
        return block.astype(_native(block.dtype), copy=False)


class _Guarded(_RandomAccess):
    """An ArraySource for one call of a map: its reads are checked against the call's output array."""

    def __init__(self, source, out):
        self._source, self._out = source, out

    def __getattr__(self, name):          # shape, dtype, rows, V, ... of the source
        return getattr(self._source, name)

    def read(self, r0, r1, c0=0, c1=None, out=None):
        return self._source.read(r0, r1, c0, c1, out=out, protect=self._out)


class IterSource:
    """An iterable of 2-D row blocks (rows, V), read once, in order; the number of rows is known at the
    end."""

    random_access = False
    format = "iterable"
    nbytes = None

    def __init__(self, iterable, dtype=None, vocab=None):
        self._it = iter(iterable)
        self._declared = dtype
        self._first = self._first_raw = None
        try:
            self._first = next(self._it)
        except StopIteration:
            if vocab is None:
                # (an iterator given twice is empty the second time: a generator is read once)
                spent = (" (or an iterator that an earlier call read to its end)" if self._it is iterable
                         else "")
                raise SourceError(f"an empty iterable of row blocks{spent}: nothing says how wide its rows "
                                  "are (yield at least one block; an empty one, (0, V), says it)") from None
        if self._first is not None:
            self._first = self._check(self._first, 0)
            self.V = self._first.shape[1]
            self.dtype = "bfloat16" if is_bf16(self._first.dtype) else dtype_name(self._first.dtype, "logits")
        else:
            self.V = int(vocab)
            self.dtype = dtype_name(dtype or "float32")
        self.shape = (None, self.V)
        self.rows = None
        self._used = False

    def __repr__(self):
        return f"<fastlogits source iterable V={self.V} dtype={self.dtype}>"

    def protect(self, out):
        """This source for one call writing to the output array `out`: a ValueError now if the first block
        shares memory with out, and as each later block is read if it does (blocks not yet read may only
        be checked then: an iterable's blocks must not share memory with out). The source itself is left
        as it is: a call refused here has read nothing, and the next call may read it."""
        if self._first is not None and shares_memory(self._first_raw, out):
            raise _overlap_error("row block 0")
        return _GuardedIter(self, out)

    def _check(self, block, i, protect=None):
        b = host_array(block)
        if protect is not None and shares_memory(b, protect):
            raise _overlap_error(f"row block {i}", first=i == 0)
        if i == 0:
            self._first_raw = b
        if self._declared is not None and dtype_name(self._declared) == "bfloat16" and not is_bf16(b.dtype):
            if not _bf16_redeclares(b.dtype):
                raise SourceError(f"row block {i}: {_bf16_refusal(b.dtype)}")
            b = as_bf16(b)
        if b.ndim != 2:
            raise SourceError(f"row block {i}: expected a 2-D (rows, V) block, found shape {b.shape}")
        if i and b.shape[1] != self.V:
            raise SourceError(f"row block {i}: expected rows of {self.V} values (as the first block), found "
                              f"{b.shape[1]}")
        b = b.astype(_native(b.dtype), copy=False)
        if i and b.dtype != NP_DTYPES[self.dtype]:
            raise SourceError(f"row block {i}: expected {self.dtype} (as the first block), found {b.dtype}")
        return b

    def blocks(self, max_rows, protect=None):
        """The row blocks, at most max_rows each; with protect (an output array), a ValueError for a block
        that shares memory with it."""
        if self._used:
            raise SourceError("this iterable of row blocks was already consumed; a source of this kind is "
                              "read once")
        self._used = True
        self.rows = 0
        i = 0
        block, self._first, self._first_raw = self._first, None, None
        while block is not None:
            for r0 in range(0, block.shape[0], max_rows):
                part = block[r0:r0 + max_rows]
                self.rows += part.shape[0]
                yield part
            i += 1
            try:
                block = self._check(next(self._it), i, protect)
            except StopIteration:
                block = None


class _GuardedIter:
    """An IterSource for one call of a map: its blocks are checked against the call's output array."""

    def __init__(self, source, out):
        self._source, self._out = source, out

    def __getattr__(self, name):          # shape, dtype, rows, V, ... of the source
        return getattr(self._source, name)

    def __repr__(self):
        return repr(self._source)

    def blocks(self, max_rows):
        return self._source.blocks(max_rows, protect=self._out)


def self_describing(head):
    """What a file starting with the bytes `head` (64 or so) is when it is a dump that describes itself:
    "a .npy file" (NumPy's magic), "a safetensors file" (an 8-byte header length of at most the format's
    limit, then printable JSON text starting '{"'), else None. Read as raw rows, either would give its
    header as logits."""
    if head.startswith(b"\x93NUMPY"):
        return "a .npy file"
    if len(head) >= 10:
        n = int.from_bytes(head[:8], "little")
        text = head[8:8 + n]
        if 2 <= n <= ST_HEADER_MAX and text.startswith(b'{"') and all(32 <= b < 127 for b in text):
            return "a safetensors file"
    return None


class StdinSource(_Closing):
    """Raw rows on a binary stream (standard input by default): `vocab` values of `dtype` each, read once,
    in order, into two buffers that alternate (a block or chunk is valid until the next one after it is
    read), sized by the caller's plan: row blocks, or column chunks of one row when a row does not fit."""

    random_access = False
    format = "stdin"
    nbytes = None

    def __init__(self, dtype, vocab, stream=None, path=None):
        name = "standard input" if path is None else path
        if dtype is None or vocab is None:
            raise SourceError(f"reading raw rows from {name} needs dtype= and vocab= (--dtype and --vocab "
                              "on the command line)")
        self.dtype = dtype_name(dtype)
        self.V = check_vocab(vocab)
        self.shape = (None, self.V)
        self.rows = None
        self.name, self.path = name, path      # path: a pipe, opened at the first read (a FIFO waits there)
        self.format = "stdin" if path is None else "pipe"
        if stream is None and path is None and sys.stdin is None:
            raise SourceError("standard input is closed (the process was started with descriptor 0 "
                              "closed, as by <&-): there are no rows to read")
        if stream is None and path is None:
            # the file under sys.stdin's buffer: a read blocked on a stalled pipe then holds no buffer lock
            # (the interpreter's exit, after Ctrl-C, takes that lock and aborts if a reader holds it)
            stream = getattr(sys.stdin.buffer, "raw", sys.stdin.buffer)
        self.stream = stream
        self._isz = _itemsize(self.dtype)
        self._total = 0
        self._used = False

    def __repr__(self):
        where = "stdin" if self.path is None else self.path
        return f"<fastlogits source {where} V={self.V} dtype={self.dtype}>"

    def close(self):
        """Closes a pipe opened by its path (at the end of the pass, or now); standard input stays open."""
        if getattr(self, "path", None) is not None and self.stream is not None:
            self.stream.close()

    def _start(self):
        if self._used:
            raise SourceError(f"{self.name} was already read; a source of this kind is read once")
        self._used = True
        self.rows = 0
        if self.stream is None:
            self.stream = builtins.open(self.path, "rb", buffering=0)  # noqa: SIM115 - read to its end

    def _fill(self, buf):
        """Read into buf (an array) until it is full or the stream ends; the number of bytes read. The
        first bytes of the stream must not be a dump that describes itself (self_describing)."""
        view = memoryview(buf.reshape(-1).view(np.uint8))
        got = 0
        while got < len(view):
            n = self.stream.readinto(view[got:])
            if not n:
                break
            got += n
        if self._total == 0:
            kind = self_describing(bytes(view[:min(got, 64)]))
            if kind is not None:
                raise SourceError(f"{self.name}: expected raw rows, found {kind}, whose header would be read "
                                  "as logits: open the file by its path (a .npy or .safetensors dump is "
                                  "read at offsets)")
        self._total += got
        return got

    def _left_over(self, extra):
        row_bytes = self.V * self._isz
        return SourceError(f"{self.name}: {self._total} bytes is not a whole number of rows of {self.V} "
                           f"{self.dtype} values ({row_bytes} bytes each): {extra} bytes left over")

    def blocks(self, max_rows):
        self._start()
        row_bytes = self.V * self._isz
        bufs = [np.empty((max_rows, self.V), NP_DTYPES[self.dtype]) for _ in range(2)]
        try:
            for k in itertools.count():
                buf = bufs[k % 2]
                got = self._fill(buf)
                if got % row_bytes:
                    raise self._left_over(got % row_bytes)
                n = got // row_bytes
                if n:
                    self.rows += n
                    yield buf[:n]
                if n < max_rows:
                    return
        finally:
            self.close()

    def chunks(self, cols):
        """(row, c0, chunk of shape (1, c)) for every row and its columns in order, at most cols a chunk."""
        self._start()
        cols = min(cols, self.V) or 1
        bufs = [np.empty((1, cols), NP_DTYPES[self.dtype]) for _ in range(2)]
        k = 0
        try:
            for i in itertools.count():
                for c0 in range(0, self.V, cols):
                    buf = bufs[k % 2][:, :min(cols, self.V - c0)]
                    k += 1
                    got = self._fill(buf)
                    if got == 0 and c0 == 0:
                        return
                    if got < buf.nbytes:
                        raise self._left_over(c0 * self._isz + got)
                    yield i, c0, buf
                self.rows = i + 1
        finally:
            self.close()


def check_vocab(vocab, argname="vocab"):
    """vocab as a positive int: a float or a bool is refused, not truncated (TypeError, as for every
    integer argument), and one below 1 (ValueError)."""
    return int_arg(vocab, argname, "a positive integer (the number of values per row)", 1)


def open(path, *, dtype=None, vocab=None, tensor=None, memory=None):  # noqa: A001 - the API's name
    """Open a logit dump as a source for every row function (README: "Streaming dumps larger than memory").

    ``path``: a ``.npy`` file (read lazily; ``dtype="bfloat16"`` re-declares a ``|V2`` file), a
    ``.safetensors`` file (``tensor=`` picks one when there are several; BF16 supported), ``"-"`` for raw rows
    on standard input (or the path of a pipe: a FIFO, ``/dev/stdin``, a shell's ``<(zcat dump.gz)``), or
    any other path as raw binary (``dtype`` and ``vocab`` required). ``path`` may also be logits that
    are already in host memory or made by code: an array-like (a NumPy array, a PyTorch CPU tensor, an
    h5py dataset, ...; a list or tuple is one array, as NumPy reads it) or an iterator of 2-D row blocks,
    where ``dtype="bfloat16"`` declares 2-byte data (|V2, uint16, int16) as bfloat16. For logits that
    describe themselves, a ``dtype`` or ``vocab`` given must agree with them, and ``tensor`` is for
    safetensors only (a SourceError otherwise). ``memory``: the memory budget of calls on this source
    (default: ``fastlogits.set_memory_budget``).
    """
    if memory is not None:
        from fastlogits.stream.run import parse_memory
        parse_memory(memory)         # a bad budget fails here, not at the first call
    if not isinstance(path, (str, bytes, os.PathLike)):
        src = _open_object(path, dtype, vocab, tensor)
    elif isinstance(path, str) and path == "-":
        if tensor is not None:
            raise SourceError("standard input: tensor= (--tensor) names a tensor of a .safetensors file; "
                              "standard input holds raw rows")
        src = StdinSource(dtype, vocab)
    else:
        p = os.fsdecode(os.fspath(path))
        try:
            mode = os.stat(p).st_mode
        except OSError as e:       # missing, or there but out of reach (a folder we may not enter, a loop
            what = "no such file" if isinstance(e, FileNotFoundError) else f"cannot read it ({e.strerror})"
            raise named_error(e, f"{p}: {what}") from None      # of links): os.path.exists said missing
        if stat.S_ISDIR(mode):
            raise SourceError(f"{p}: is a folder, expected a logit dump (.npy, .safetensors or raw)")
        regular = stat.S_ISREG(mode)
        head = b""
        if regular:
            with builtins.open(p, "rb") as f:
                head = f.read(64)
        # a .safetensors file by its name or its contents (as a .npy file is found by its magic)
        safetensors = p.lower().endswith(".safetensors") or self_describing(head) == "a safetensors file"
        if tensor is not None and not safetensors:
            raise SourceError(f"{p}: tensor= (--tensor) names a tensor of a .safetensors file; this file is "
                              "not one")
        if not regular:
            # a pipe (/dev/stdin, <(zcat ...), a FIFO) or a device: read once, in order, as standard input
            if safetensors or p.lower().endswith(".npy"):
                raise SourceError(f"{p}: expected a regular file (a .npy or .safetensors dump is read at "
                                  "offsets), found a pipe or device; raw rows may come through a pipe")
            src = StdinSource(dtype, vocab, path=p)
            src.memory = memory
            return src
        if head.startswith(b"\x93NUMPY"):
            src = open_npy(p, dtype)
        elif safetensors:
            src = open_safetensors(p, tensor, dtype)
        elif p.lower().endswith(".npy"):
            raise SourceError(f"{p}: expected a .npy file (magic \\x93NUMPY), found {head[:6]!r}")
        else:
            src = open_raw(p, dtype, vocab)
        if vocab is not None and check_vocab(vocab) != src.V:
            raise SourceError(f"{p}: vocab={vocab!r} was given, but the file's rows hold {src.V} values")
    src.memory = memory
    return src


def _open_object(obj, dtype, vocab, tensor):
    """fastlogits.open of logits in memory or made by code: an array-like or an iterable of row blocks."""
    if tensor is not None:
        raise SourceError("tensor= (--tensor) names a tensor of a .safetensors file; these logits are not "
                          "one")
    from fastlogits.ops._prep import is_gpu_array

    if is_gpu_array(obj):
        raise TypeError("fastlogits.open reads logits into host memory, and these are on a GPU: pass them to "
                        "the functions directly")
    if isinstance(obj, (io.IOBase, str, bytes, bytearray, dict)):
        raise TypeError(f"fastlogits.open takes a path, an array-like or an iterable of row blocks, got "
                        f"{type(obj).__name__}" + (" (pass the file's path, or '-' for standard input)"
                                                   if isinstance(obj, io.IOBase) else ""))
    if hasattr(obj, "__dlpack__") and not isinstance(obj, np.ndarray):
        obj = host_array(obj)                  # a PyTorch CPU tensor, read in place
    if isinstance(obj, (list, tuple, memoryview)):
        try:
            obj = np.asarray(obj)              # one array, as NumPy reads it
        except ValueError as e:
            raise ValueError(f"a list or tuple is read as one array, and this one is ragged ({e}); to "
                             "stream row blocks, pass an iterator: iter(blocks)") from None
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__getitem__"):
        src = ArraySource(obj, dtype)
    elif hasattr(obj, "__iter__"):
        src = IterSource(obj, dtype, vocab)
    else:
        raise TypeError(f"fastlogits.open takes a path, an array-like or an iterable of row blocks, got "
                        f"{type(obj).__name__}")
    if dtype is not None and dtype_name(dtype) != src.dtype:
        raise SourceError(f"dtype={dtype!r} was given, but the logits are {src.dtype}")
    if vocab is not None and check_vocab(vocab) != src.V:
        raise SourceError(f"vocab={vocab!r} was given, but the rows hold {src.V} values")
    return src


def _is_buffer(obj):
    """Whether obj exports the buffer protocol (a memoryview, an array.array)."""
    try:
        memoryview(obj).release()
    except TypeError:
        return False
    return True


def as_source(obj):
    """obj as a source, or None when obj is an in-memory array (which the kernels take directly)."""
    if isinstance(obj, np.ndarray):     # the common case, first: a call on a small array is mostly this
        return None
    if isinstance(obj, (_FileSource, ArraySource, IterSource, StdinSource)):
        return obj
    from fastlogits.ops._prep import is_gpu_array

    if isinstance(obj, (np.ndarray, np.generic)) or is_gpu_array(obj) or hasattr(obj, "__dlpack__"):
        return None        # in memory (a PyTorch CPU tensor too): the kernels read it in place
    if isinstance(obj, (str, bytes, os.PathLike)):
        raise TypeError("logits: a path is not logits; open it first: fastlogits.open(path)")
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__getitem__"):
        return ArraySource(obj, None)
    if hasattr(obj, "__array__") or hasattr(obj, "__array_interface__") or _is_buffer(obj):
        return None        # NumPy reads these whole (a 2-D memoryview was iterated: NotImplementedError)
    if hasattr(obj, "__iter__") and not isinstance(obj, (list, tuple)):
        return IterSource(obj, None)
    return None
