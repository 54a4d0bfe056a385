"""Streaming a source through the row functions in bounded memory.

The planner turns the memory budget into row blocks (whole rows, several a block) or, when a single row
does not fit, into column chunks of one row at a time. Row blocks go through the same in-memory
functions as arrays; column chunks go through the accumulators (row states merged chunk by chunk). A
reader thread reads the next block into a second buffer while the kernels work on the current one
(``os.preadv`` and the kernels both release the GIL), so I/O overlaps compute; buffers are reused, so
peak memory is set by the budget, not by the dump's size.
"""
import contextlib
import contextvars
import errno
import math
import numbers
import os
import queue
import re
import secrets
import shutil
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

from fastlogits.ops._prep import (
    NP_DTYPES,
    broadcast_rows,
    check_own_places,
    compute_dtype,
    number_array,
    scalar_if_0d,
)
from fastlogits.stream.sources import named_error

DEFAULT_BUDGET = 256 * 2**20
BLOCK_BYTES = 16 * 2**20     # the largest input block a plan makes, whatever the budget
_budget = DEFAULT_BUDGET

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory(memory, argname="memory"):
    """Bytes from a number or a string such as "64MiB", "1.5G", "300MB", "1TiB", "1e9" (at least 64 KiB)."""
    if isinstance(memory, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", memory)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{argname} must be a byte count such as 268435456 or '256MiB', got {memory!r}")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    elif isinstance(memory, (bool, np.bool_)) or not isinstance(memory, numbers.Real):
        raise TypeError(f"{argname} must be a byte count such as 268435456 or '256MiB', got {memory!r}")
    else:
        try:
            value = float(memory)
        except OverflowError:            # an int past float's range
            value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"{argname} must be a finite byte count, got {memory!r}")
    if not value >= 1 << 16:
        # (the bytes said too: "64kb" is 64000, below 64 KiB = 65536)
        given = (f"{memory!r} ({math.floor(value)} bytes)" if isinstance(memory, str) and m.group(2)
                 else repr(memory))
        raise ValueError(f"{argname} must be at least 64 KiB (65536 bytes), got {given}")
    return int(value)


def set_memory_budget(memory):
    """Set the default memory budget of calls on sources (256 MiB unless set): bytes or e.g. "1GiB"."""
    global _budget
    _budget = parse_memory(memory)


def get_memory_budget():
    """The default memory budget of calls on sources, in bytes."""
    return _budget


@dataclass
class Plan:
    rows: int      # rows per block; 0 when a row does not fit: column chunks
    cols: int      # columns per chunk (V for row blocks)


def plan(source, memory=None, out_itemsize=0):
    """Row blocks when a row fits the budget, else column chunks of one row. Per value in flight: two
    input buffers (one read ahead) and, for maps, the output; the kernels' own scratch is a few chunks.
    A source whose reads make new arrays (source.allocates: an h5py or zarr dataset's slices) holds
    three: the next block is read while the consumer's loop still names the one before the block it
    works on (two buffers were 1.5 times the budget there; found by a memory audit). A Fortran-order
    file's blocks are laid out by columns, and copied into C order to be worked on (on the CPU a few
    rows at a time, for the GPU the whole block): one more buffer."""
    if memory is None:
        memory = getattr(source, "memory", None)
    budget = _budget if memory is None else parse_memory(memory)
    isz = NP_DTYPES[source.dtype].itemsize
    fortran = getattr(source, "fortran", False)
    per_value = (3 if getattr(source, "allocates", False) else 2) * isz + out_itemsize
    rows = budget // (source.V * (per_value + fortran * isz) + 64) if source.V else 1 << 16
    if rows >= 1:
        # A bigger block is no faster: past a few tens of MB the copy out of the page cache no longer
        # stays in the last-level cache for the kernels to read (measured: 256 MiB blocks 4.4-5.0 GB/s,
        # 16-32 MiB blocks 5.6-5.9 GB/s, stats over a 2 GB float16 dump on this 2-core machine).
        # A Fortran-order file is read a column segment a block at a time: the whole budget, for longer
        # segments and fewer reads.
        cap = rows if fortran else max(1, BLOCK_BYTES // max(1, source.V * isz))
        return Plan(rows=int(min(rows, cap, 1 << 16)), cols=source.V)
    return Plan(rows=0, cols=int(budget // per_value))


def _ahead(reads):
    """Items of `reads` (callables; None ends), each read on a reader thread while the consumer works on
    the previous one. At most two items exist at a time, so a source can alternate two buffers.

    The reader is a daemon thread, joined when the items end: when the consumer raises instead (Ctrl-C,
    SIGTERM, a bad block), the read in progress is left to finish on its own, so that a read blocked on a
    stalled pipe holds up neither the unwinding nor the interpreter's exit."""
    reads = iter(reads)
    requests, results = queue.SimpleQueue(), queue.SimpleQueue()

    def work():
        for read in iter(requests.get, None):
            try:
                results.put((True, read()))
            except BaseException as e:   # noqa: BLE001 - re-raised in the consumer
                results.put((False, e))

    # reads run in a copy of the caller's context (its use_backend, for an iterable that calls fastlogits)
    reader = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="fastlogits-reader",
                              daemon=True)
    reader.start()
    ended = False
    try:
        pending = next(reads, None)
        if pending is not None:
            requests.put(pending)
        while pending is not None:
            ok, item = results.get()
            if not ok:
                raise item
            if item is None:
                break
            pending = next(reads, None)
            if pending is not None:
                requests.put(pending)
            yield item
        ended = True
    finally:
        requests.put(None)
        if ended:
            reader.join()


def _read_ahead(source, spans):
    """(r0, c0, block) for each (r0, r1, c0, c1) of `spans`: rows r0..r1 and columns c0..c1 of a
    random-access source, read one ahead into two buffers that alternate (a block is valid until the next
    one is asked for). A source that reads into the buffer it is given (a file: reads_into_out) keeps
    each buffer at its largest, a row's last, shorter chunk a view of it; one that makes a new array
    each time (an array-like's slices) has the block two back let go before the read. Either way no more
    than two blocks are held: storing the short chunk's view, or the block two back, in place of the
    buffer held a third (1.5 times the memory budget; found by a memory audit)."""
    bufs = [None, None]
    into = getattr(source, "reads_into_out", False)

    def reader(k, r0, r1, c0, c1):
        def read():
            buf, bufs[k % 2] = bufs[k % 2], None       # (the block two back: no longer valid)
            block = source.read(r0, r1, c0, c1, out=buf if into else None)
            keep = into and buf is not None and np.shares_memory(block, buf)
            bufs[k % 2] = buf if keep else block
            return r0, c0, block
        return read
    yield from _ahead(reader(k, *span) for k, span in enumerate(spans))


def row_blocks(source, rows):
    """(r0, block) for consecutive blocks of at most `rows` rows, read one block ahead into two buffers
    that alternate (a block is valid until the next one is asked for)."""
    if source.random_access:
        spans = ((r0, min(source.rows, r0 + rows), 0, source.V) for r0 in range(0, source.rows, rows))
        for r0, _, block in _read_ahead(source, spans):
            yield r0, block
    else:
        blocks = source.blocks(rows)
        start = [0]

        def read():
            block = next(blocks, None)
            if block is None:
                return None
            start[0] += block.shape[0]
            return start[0] - block.shape[0], block

        def reads():
            while True:
                yield read
        yield from _ahead(reads())


def column_chunks(source, cols):
    """(row, c0, chunk (1, c)) for every row and its columns in order, read one chunk ahead."""
    if source.random_access:
        yield from _read_ahead(source, ((i, i + 1, c0, min(source.V, c0 + cols)) for i in range(source.rows)
                                        for c0 in range(0, source.V, cols)))
    elif hasattr(source, "chunks"):      # standard input: read a row chunk by chunk
        chunks = source.chunks(cols)

        def reads():
            while True:
                yield lambda: next(chunks, None)
        yield from _ahead(reads())
    else:                                # an iterable: its blocks are in memory already
        for r0, block in row_blocks(source, 1):
            for i in range(block.shape[0]):
                for c0 in range(0, block.shape[1], cols):
                    yield r0 + i, c0, block[i:i + 1, c0:c0 + cols]


def column_stripes(source, cols):
    """(c0, stripe (rows, c)) for consecutive ranges of at most `cols` columns of all the rows of a
    random-access source, read one ahead (a Fortran-order file's stripe is one read)."""
    spans = ((0, source.rows, c0, min(source.V, c0 + cols)) for c0 in range(0, source.V, cols))
    for _, c0, stripe in _read_ahead(source, spans):
        yield c0, stripe


def folded_rows(source, cols, make, progress):
    """(r0, r1, accumulators) for the rows of a source too wide for the budget (`cols` columns of a row
    fit it): make(r0, r1) gives the accumulators of rows r0..r1 (None for one not wanted), each of which
    has folded in every column chunk of those rows when it is yielded. A row at a time, its chunks read
    in turn; but a Fortran-order file's rows all at once, over stripes of columns (a read each, where a
    row's chunk is a read per element), in half the budget (the other half for the accumulators' states
    and the kernels' C-order copy). progress counts each row once, at its last chunk."""
    width = cols // (2 * source.rows) if getattr(source, "fortran", False) and source.rows else 0
    if width:
        accs = make(0, source.rows)
        for c0, stripe in column_stripes(source, width):
            for a in accs:
                if a is not None:
                    a.update(stripe, c0)
            progress(source.rows if c0 + stripe.shape[1] == source.V else 0, stripe.nbytes)
        yield 0, source.rows, accs
        return
    accs, row = None, -1
    for i, c0, chunk in column_chunks(source, cols):
        if c0 == 0:
            if accs is not None:
                yield row, row + 1, accs
            accs, row = make(i, i + 1), i
        for a in accs:
            if a is not None:
                a.update(chunk, c0)
        progress(int(c0 + chunk.shape[1] == source.V), chunk.nbytes)
    if accs is not None:
        yield row, row + 1, accs


def single_rows(source, cols):
    """(i, one-row random-access source) for every row, for work that reads a row twice (the two passes
    of a map): rows of random-access sources are read where they are, a row of an iterable is in memory
    already, and a row from standard input is spooled to a temporary file first (bounded memory)."""
    from fastlogits.stream.sources import ArraySource, open_raw

    if source.random_access:
        for i in range(source.rows):
            yield i, _RowView(source, i)
    elif hasattr(source, "chunks"):
        # one anonymous file, reused row after row: it has no name to leave behind, whatever interrupts
        # the pass (a second Ctrl-C during the cleanup of a first left a folder holding a whole row)
        with tempfile.TemporaryFile(prefix="fastlogits-spool-") as f:
            def spooled(i):
                f.flush()
                return open_raw(f"<row {i} of {source!r}, spooled>", source.dtype, source.V, fd=f.fileno())

            row = -1
            for i, c0, chunk in column_chunks(source, cols):
                if c0 == 0:
                    if row >= 0:
                        with spooled(row) as spool:
                            yield row, spool
                    f.seek(0)
                    f.truncate()
                    row = i
                try:
                    write_all(f, _bytes(chunk))
                except OSError as e:       # a full disk: the anonymous file has no name to report
                    raise named_error(e, f"{tempfile.gettempdir()}: cannot spool row {i} of {source!r} to a "
                                      f"temporary file there ({e.strerror or e}); TMPDIR names the folder "
                                      "for temporary files") from None
            if row >= 0:
                with spooled(row) as spool:
                    yield row, spool
    else:
        for r0, block in row_blocks(source, 1):
            for i in range(block.shape[0]):
                yield r0 + i, ArraySource(block[i:i + 1])


def _bytes(a):
    """The bytes of an array, C-ordered, as a buffer (no copy when it is contiguous already)."""
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def write_all(f, data):
    """Write every byte of the buffer `data` to the binary file f. A BufferedWriter may return fewer bytes
    than it was given, without raising: standard output to a pipe whose reader left during a 16 MB write
    took 65536 bytes and reported success (found by an audit); the rest is written again, which raises
    BrokenPipeError there."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = f.write(view)
        if not n:
            raise OSError(f"{getattr(f, 'name', 'the output')}: a write took none of {view.nbytes} bytes")
        view = view[n:]


class RowArg:
    """A per-row argument of a streamed call (temperature, labels): a scalar, or one value per row,
    sliced block by block."""

    def __init__(self, value, name, source, dtype=np.float64, per_row=False):
        self.name = name
        a = number_array(value, name)
        if a.shape == (1,) and source.shape[0] is None and not per_row:
            a = a.reshape(())       # one value broadcasts over rows not yet counted, as in memory
        # per_row (labels): a 0-d value is the one row's value of a 1-D source, else never a broadcast
        self.scalar = a.ndim == 0 and not (per_row and tuple(source.shape[:-1]) == ())
        if not self.scalar:
            lead = tuple(source.shape[:-1])
            if source.shape[0] is not None and a.shape != lead:
                if per_row:
                    raise ValueError(f"{name} must have one value per row (shape {lead}), got shape "
                                     f"{a.shape}")
                a = broadcast_rows(a, lead, name)     # as in memory
            a = a.reshape(-1)
        self.value = a if dtype is None else a.astype(dtype, copy=False)

    @staticmethod
    def _lead(value, source, name):
        """The leading shape of per-row values: the source's, or the values' own (1-D) for a source whose
        rows are counted as they are read."""
        if source.shape[0] is not None:
            return tuple(source.shape[:-1])
        if name == "labels":
            from fastlogits.ops.reductions import as_labels

            value = as_labels(value)
        shape = np.shape(value)
        if len(shape) > 1 or (name == "labels" and len(shape) != 1):
            what = "1-D" if name == "labels" else "a scalar or 1-D"
            raise ValueError(f"{name} must be {what} (one value per row) for a source whose rows are counted "
                             f"as they are read, got shape {shape}")
        return shape

    @classmethod
    def temperature(cls, value, source):
        """The temperature of a streamed call, checked before the pass as in memory (a float, or values
        broadcast to the leading shape), so that an error names its row in the whole source (a block's
        own check counts rows from the block's first)."""
        from fastlogits.ops._prep import temperatures

        lead = cls._lead(value, source, "temperature")
        t = temperatures(value, lead, math.prod(lead), name=source.dtype)
        return cls(value if np.ndim(value) == 0 else t.reshape(lead), "temperature", source)

    @classmethod
    def labels(cls, value, source, ignore_index):
        """The labels of a streamed call, checked before the pass as in memory (integers of the leading
        shape, each a class of the source or ignore_index), naming a bad one's row in the whole source."""
        from fastlogits.ops.reductions import check_labels

        lead = cls._lead(value, source, "labels")
        flat = check_labels(value, lead, source.V, ignore_index)
        return cls(flat.reshape(lead), "labels", source, dtype=None, per_row=True)

    def block(self, r0, r1):
        if self.scalar:
            return self.value[()]
        if r1 > self.value.shape[0]:
            raise ValueError(f"{self.name} has {self.value.shape[0]} values, but the source has more rows "
                             f"(at least {r1})")
        return self.value[r0:r1]

    def check_rows(self, rows):
        if not self.scalar and self.value.shape[0] != rows:
            raise ValueError(f"{self.name} has {self.value.shape[0]} values, but the source has {rows} rows")


def _lead(source, rows):
    """The leading shape of per-row results (the number of rows read, for sources that only know it at
    the end)."""
    return (rows,) if source.shape[0] is None else tuple(source.shape[:-1])


def no_progress(rows, nbytes):
    """The default `progress`: a driver calls progress(rows, nbytes) after each block (the CLI shows a
    bar)."""


# ---- the row functions of a source ----------------------------------------------------------------------

# For each reduction: the accumulator that folds a row too large for the budget, and how to make it.
def _row_accumulator(op, rows, temperature, kw):
    from fastlogits.stream import accumulators as acc

    common = {k: kw.get(k) for k in ("softcap", "threads", "chunk_size")}
    if op == "logsumexp":
        return acc.LogSumExp(rows, temperature=temperature, **common)
    if op == "entropy":
        return acc.Entropy(rows, temperature=temperature, **common)
    if op == "argmax":
        return acc.TopK(rows, 1, temperature=temperature, **common)
    if op in ("top_k", "top_k_logprobs"):
        return acc.TopK(rows, kw["k"], logprobs=op == "top_k_logprobs", temperature=temperature, **common)
    raise ValueError(op)


def check_backend(backend):
    """The backend a streamed call asks for must exist, as for an array; rows too wide for the budget are
    folded by the CPU's accumulators whichever it is."""
    from fastlogits.ops import _backend
    from fastlogits.ops._prep import resolve_backend

    _backend.get(resolve_backend(backend, None))


def reduce(op, source, kw, memory=None, progress=None):
    """logsumexp, entropy, argmax, top_k or top_k_logprobs of every row of a source (kw: the call's
    keyword arguments; `k` for the top-k functions)."""
    import fastlogits as fl
    from fastlogits.ops.selection import _check_k

    check_backend(kw.get("backend"))
    kw = dict(kw)
    if "k" in kw:
        kw["k"] = _check_k(kw["k"], source.V)
    temp = RowArg.temperature(kw.pop("temperature", 1.0), source)
    progress = progress or no_progress
    p = plan(source, memory)
    parts, rows = [], 0
    if p.rows:
        fn = getattr(fl, op)
        for r0, block in row_blocks(source, p.rows):
            t = temp.block(r0, r0 + block.shape[0])
            res = fn(block, temperature=t, **kw)
            parts.append(tuple(np.asarray(r) for r in res) if isinstance(res, tuple) else np.asarray(res))
            rows = r0 + block.shape[0]
            progress(block.shape[0], block.nbytes)
    else:
        def make(r0, r1):
            return (_row_accumulator(op, r1 - r0, temp.block(r0, r1), kw),)

        for _, r1, (accum,) in folded_rows(source, p.cols, make, progress):
            parts.append(_finish_row(op, accum, source))
            rows = r1
    temp.check_rows(rows)
    lead = _lead(source, rows)
    if op in ("top_k", "top_k_logprobs"):
        k = kw["k"]
        vdt = NP_DTYPES[source.dtype] if op == "top_k" else _result_dtype(source, op)
        vals = np.concatenate([v for v, _ in parts]) if parts else np.empty((0, k), vdt)
        idx = np.concatenate([i for _, i in parts]) if parts else np.empty((0, k), np.int64)
        return vals.reshape(lead + (k,)), idx.reshape(lead + (k,))
    out = np.concatenate(parts) if parts else np.empty(0, _result_dtype(source, op))
    return scalar_if_0d(out.reshape(lead))


def _result_dtype(source, op):
    if op == "argmax":
        return np.dtype(np.int64)
    return compute_dtype(source.dtype)


def _finish_row(op, accum, source):
    """One row's result from its accumulator, in the dtype the in-memory function returns."""
    if op == "argmax":
        return accum.result()[1][:, 0]
    if op == "top_k":
        v, i = accum.result()
        return v.astype(NP_DTYPES[source.dtype]), i
    if op == "top_k_logprobs":
        v, i = accum.result()
        with np.errstate(over="ignore"):   # a log-probability past float32's range is -inf, as in memory
            return v.astype(_result_dtype(source, op)), i
    return accum.result().astype(_result_dtype(source, op))


def cross_entropy(source, labels, kw, memory=None, progress=None):
    """Cross-entropy of a source against labels (one per row), as fastlogits.cross_entropy."""
    from fastlogits.cpu import _reduce
    from fastlogits.ops.reductions import (
        ce_total,
        check_ce_options,
        check_reduction,
        check_weight,
        cross_entropy_terms,
    )
    from fastlogits.stream.accumulators import CrossEntropy

    check_backend(kw.get("backend"))
    kw = dict(kw)
    reduction = kw.pop("reduction", "mean")
    check_reduction(reduction)
    # the options before the labels, whose check reads ignore_index; the weights before any read, as in
    # memory (wide rows found a wrong length after the whole pass)
    check_ce_options(kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), kw.get("ignore_index", -100))
    check_weight(kw.get("weight"), source.V)
    temp = RowArg.temperature(kw.pop("temperature", 1.0), source)
    lab = RowArg.labels(labels, source, kw.get("ignore_index", -100))
    progress = progress or no_progress
    p = plan(source, memory)
    per_row, parts, rows = [], [], 0
    none = reduction == "none"

    def add(loss, block_sums):
        if none:
            per_row.append(loss)
        parts.append(block_sums)

    if p.rows:
        for r0, block in row_blocks(source, p.rows):
            r1 = r0 + block.shape[0]
            add(*cross_entropy_terms(block, lab.block(r0, r1), temperature=temp.block(r0, r1), per_row=none,
                                     **kw)[0])
            rows = r1
            progress(block.shape[0], block.nbytes)
    else:
        opts = {k: kw.get(k) for k in ("weight", "ignore_index", "label_smoothing", "z_loss", "softcap",
                                       "threads", "chunk_size") if k in kw}

        def make(r0, r1):
            return (CrossEntropy(lab.block(r0, r1), temperature=temp.block(r0, r1), **opts),)

        for _, r1, (accum,) in folded_rows(source, p.cols, make, progress):
            add(*accum.terms(per_row=none))
            rows = r1
    temp.check_rows(rows)
    lab.check_rows(rows)
    rdt = _result_dtype(source, "cross_entropy")
    if reduction == "none":
        out = np.concatenate(per_row) if per_row else np.empty(0)
        with np.errstate(over="ignore"):          # a float32 loss beyond its range is inf, by design
            return scalar_if_0d(out.astype(rdt).reshape(_lead(source, rows)))
    sums = [_reduce.compensated_sum(np.array(col, np.float64)) for col in zip(*parts)] or [0.0] * 5
    return ce_total(sums, reduction, rdt, (kw.get("label_smoothing") or 0.0) > 0)


def softmax(source, log, out, kw, memory=None, progress=None):
    """softmax or log_softmax of a source, written to `out` (an array of the source's shape, or a path:
    a .npy file, or raw rows for any other name but a text one) block by block; returns out."""
    import fastlogits as fl
    from fastlogits.cpu import _maps
    from fastlogits.cpu.backend import aligned
    from fastlogits.ops._prep import dtype_name, prepare
    from fastlogits.stream.accumulators import LogSumExp

    check_backend(kw.get("backend"))
    kw = dict(kw)
    dtype, argname = kw.pop("dtype", None), "dtype"
    if dtype is None and isinstance(out, np.ndarray):
        dtype, argname = out.dtype, "out"   # as the in-memory maps: an out array sets the result's dtype
    out_name = dtype_name(dtype or source.dtype, argname)
    temp = RowArg.temperature(kw.pop("temperature", 1.0), source)
    progress = progress or no_progress
    if out is None:
        raise ValueError(f"{'log_softmax' if log else 'softmax'} of a source writes to out=: a path (.npy or "
                         "raw) or an array of the source's shape")
    p = plan(source, memory, out_itemsize=NP_DTYPES[out_name].itemsize)
    fn = fl.log_softmax if log else fl.softmax
    with _Sink(out, source, out_name, fn.__name__) as sink:
        source = sink.source
        if p.rows:
            for r0, block in row_blocks(source, p.rows):
                r1 = r0 + block.shape[0]
                sink.write(r0, 0, fn(block, temperature=temp.block(r0, r1), dtype=out_name, **kw))
                progress(block.shape[0], block.nbytes)
        else:
            common = {k: kw.get(k) for k in ("softcap", "threads", "chunk_size")}
            # a read-once source is spooled through two more input buffers: half the chunk fits the budget
            cols = p.cols if source.random_access else max(1, p.cols // 2)
            ybuf = np.empty((1, cols), NP_DTYPES[out_name])
            for i, row in single_rows(source, cols):
                t = temp.block(i, i + 1)
                acc = LogSumExp(1, temperature=t, **common)
                for _, c0, chunk in column_chunks(row, cols):
                    acc.update(chunk, c0)
                state = (acc.m, acc.s)
                chunk = None           # a pass's last buffer, freed before the next pass reads two more
                for _, c0, chunk in column_chunks(row, cols):
                    r = prepare(chunk, temperature=t, backend="cpu", **common)
                    y = ybuf[:, :chunk.shape[1]]
                    _maps.softmax(aligned(r.x), _code(r.dtype), r.temperature, r.softcap, y, _code(out_name),
                                  log, r.chunk, r.threads, state)
                    sink.write(i, c0, y)
                    progress(int(c0 + chunk.shape[1] == source.V), chunk.nbytes)
                chunk = r = None
        temp.check_rows(sink.rows)
    return sink.result


def _code(name):
    from fastlogits.cpu.backend import CODES
    return CODES[name]


class _RowView:
    """One row of a random-access source, as a source of one row (for the two passes of a map)."""

    random_access = True

    def __init__(self, source, i):
        self.source, self.i = source, i
        self.rows, self.V, self.dtype = 1, source.V, source.dtype

    @property
    def reads_into_out(self):
        return getattr(self.source, "reads_into_out", False)

    @property
    def allocates(self):
        return getattr(self.source, "allocates", False)

    def read(self, r0, r1, c0=0, c1=None, out=None):
        return self.source.read(self.i + r0, self.i + r1, c0, c1, out=out)


def _reads_file(source, path):
    """Whether the source reads the file at `path` (the same file by any name: a hard link, a symbolic
    link), as a file source or through a map of it."""
    from fastlogits.stream.sources import _maps_file

    if not os.path.exists(path):
        return False
    own = getattr(source, "path", None)
    if own is not None and os.path.exists(own) and os.path.samefile(own, path):
        return True
    stream = getattr(source, "stream", None)        # standard input redirected from a file (< path)
    try:
        st = os.fstat(stream.fileno()) if stream is not None else None
    except (AttributeError, OSError, ValueError):
        st = None
    if st is not None and stat.S_ISREG(st.st_mode) and os.path.samestat(st, os.stat(path)):
        return True
    array = getattr(source, "array", None)
    return isinstance(array, np.ndarray) and _maps_file(array, path)


STDOUT = "-"        # an output of this name goes to standard output


def check_not_input(source, path):
    """A ValueError if an output at `path` (STDOUT: standard output) would be the file that `source`
    reads."""
    stdout = path == STDOUT
    if _reads_file(source, "/proc/self/fd/1" if stdout else path):
        raise ValueError(f"{'standard output' if stdout else path}: is the file being read; the results "
                         "would replace the logits: write them to another file")


TEXT_NAMES = (".csv", ".tsv", ".txt", ".json", ".jsonl")


def check_map_path(path, name="softmax"):
    """path, where a map (softmax, log_softmax) may write: a .npy file, or raw rows under any other name
    but a text one, which would hold binary rows (the command line's topk and sample write text there)."""
    if path.lower().endswith(TEXT_NAMES):
        raise ValueError(f"{name} writes .npy or raw rows, not text: got {path!r} (use a .npy name, or "
                         "another name, such as .bin, for raw rows)")
    return path


class _Sink:
    """Where a streamed map writes: an array, a file written under a temporary name and renamed when
    complete (see atomic_output), or standard output (raw rows, as they come)."""

    def __init__(self, out, source, out_name, name):
        self.source = source     # what the call reads: for an out array, guarded against overlapping it
        self.dtype = NP_DTYPES[out_name]
        self.V = source.V
        self.rows = 0
        self._array = self._out = None
        self._atomic = None
        self.stdout = False
        if isinstance(out, np.ndarray):
            if (source.shape[0] is not None and out.shape != tuple(source.shape)) or out.ndim == 0 \
                    or out.shape[-1] != self.V:
                raise ValueError(f"out must have the source's shape {tuple(source.shape)}, got {out.shape}")
            if out.dtype != self.dtype:
                raise ValueError(f"{name}: dtype={out_name} disagrees with out.dtype={out.dtype}")
            if not out.flags.writeable:
                raise ValueError("out is read-only")
            check_own_places(out.shape, out.strides, out.dtype.itemsize)
            if hasattr(source, "protect"):
                self.source = source.protect(out)      # as in memory: out may not overlap the logits
            self._out_rows = rows = int(np.prod(out.shape[:-1], dtype=np.int64))
            view = out.reshape(rows, self.V)
            # rows written through a (rows, V) view of out, or row by row where its axes do not merge
            # (a reshaped copy would never reach out)
            self._array = view if out.size == 0 or np.shares_memory(view, out) else None
            self._out = out
            self.result = out
        elif isinstance(out, (str, os.PathLike)):
            self.path = check_map_path(os.fspath(out), name)
            check_not_input(source, self.path)
            self.npy = self.path.lower().endswith(".npy")
            self.stdout = self.path == STDOUT
            self.lead = None if source.shape[0] is None else tuple(source.shape[:-1])
            self.result = self.path
        else:
            from fastlogits.ops._prep import is_gpu_array

            where = (" (a source is written block by block from the host: copy the result to the GPU "
                     "afterwards)") if is_gpu_array(out) else ""
            raise TypeError(f"out must be a path or a NumPy array, got {type(out).__name__}{where}")

    def __enter__(self):
        if self._out is None and self.stdout:
            sys.stdout.flush()
            self._f = sys.stdout.buffer
        elif self._out is None:
            self._atomic = atomic_output(self.path)
            tmp = self._atomic.__enter__()
            self._f = None
            try:
                self._f = open(tmp, "wb")  # noqa: SIM115 - closed in __exit__
                if self.npy and self.lead is None and not self._f.seekable():
                    raise ValueError(f"{self.path}: a .npy file whose number of rows is known only at "
                                     "the end needs its header rewritten, which a pipe or device cannot "
                                     "do: write to a regular file, or raw rows (another name)")
                if self.npy:
                    lead = self.lead if self.lead is not None else (0,)   # (0,): rewritten at the end
                    self._header_len = _write_npy_header(self._f, lead, self.V, self.dtype)
            except BaseException as e:   # __exit__ will not run: leave no .partial file (a full disk, Ctrl-C)
                try:
                    if self._f is not None:
                        with contextlib.suppress(OSError):      # (its own error is e's, by now)
                            self._f.close()
                finally:
                    self._atomic.__exit__(type(e), e, e.__traceback__)
                if isinstance(e, OSError) and self.path not in str(e):   # the header's write, say
                    raise self._cannot_write(e) from None
                raise
        return self

    def write(self, r0, c0, block):
        block = np.asarray(block)
        if self._out is not None:
            if r0 + block.shape[0] > self._out_rows:
                raise ValueError(f"out has {self._out_rows} rows, but the source has more (at least "
                                 f"{r0 + block.shape[0]})")
            if self._array is not None:
                self._array[r0:r0 + block.shape[0], c0:c0 + block.shape[1]] = block
            else:
                at = np.unravel_index(np.arange(r0, r0 + block.shape[0]), self._out.shape[:-1])
                self._out[at + (slice(c0, c0 + block.shape[1]),)] = block
        else:
            try:
                write_all(self._f, _bytes(block.astype(self.dtype, copy=False)))
            except BrokenPipeError:
                if self.stdout:      # (the command line exits quietly when a | head stops reading)
                    raise
                raise self._reader_gone() from None
            except OSError as e:     # a full disk, a file size limit: named by the output's path
                raise self._cannot_write(e) from None
        if c0 + block.shape[1] >= self.V:
            self.rows = max(self.rows, r0 + block.shape[0])

    def __exit__(self, exc_type, exc, tb):
        if self._out is not None:
            if exc_type is None and self.rows != self._out_rows:
                raise ValueError(f"out has {self._out_rows} rows, but the source had {self.rows}: the rest "
                                 "of out was not written")
            return False
        if self.stdout:
            self._f.flush()
            return False
        try:
            try:
                if exc_type is None and self.npy and self.lead is None:
                    self._f.seek(0)
                    _write_npy_header(self._f, (self.rows,), self.V, self.dtype, self._header_len)
            finally:
                try:
                    self._f.close()      # (the last buffered rows are written here: a full disk shows)
                except BrokenPipeError:
                    if exc_type is None:
                        raise self._reader_gone() from None
                except OSError as e:
                    if exc_type is None:
                        raise self._cannot_write(e) from None
        except BaseException as e:       # the output is not whole: its temporary file goes, not renamed
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        self._atomic.__exit__(exc_type, exc, tb)
        return False

    def _cannot_write(self, e):
        where = "standard output" if self.stdout else self.path
        return named_error(e, f"{where}: cannot write ({e.strerror or e})")

    def _reader_gone(self):
        """A named pipe's reader went away: an error (not BrokenPipeError, which the command line takes for
        a | head on standard output, and exits 0), since rows were lost."""
        return OSError(f"{self.path}: the pipe's reader went away after {self.rows} rows; the rest were not "
                       "written")


def _write_npy_header(f, lead, V, dtype, length=None):
    """A .npy (version 1.0) header for shape lead + (V,), padded to `length` bytes (so that a header
    written before the number of rows is known can be rewritten in place)."""
    from fastlogits.ops._prep import is_bf16
    descr = "|V2" if is_bf16(dtype) else np.lib.format.dtype_to_descr(dtype)
    shape = tuple(int(d) for d in lead) + (int(V),)
    d = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    length = length or (len(d) + 10 + 64 + 63) // 64 * 64   # room for a longer shape later
    pad = length - 10 - len(d) - 1
    header = b"\x93NUMPY\x01\x00" + (length - 10).to_bytes(2, "little") + (d + " " * pad + "\n").encode()
    write_all(f, header)
    return length


def _written_in_place(target):
    """Whether an output at `target` (links resolved) is written in place rather than replaced: an
    existing FIFO, device or socket (a pipe to another program, /dev/null), which a rename would
    replace by a file."""
    return os.path.exists(target) and not os.path.isfile(target)


def descriptor_of(path):
    """(pid, fd) where `path` names an open file descriptor (/dev/stdout, /dev/fd/N, /proc/PID/fd/N,
    through links: the shell's `>(cmd)` gives /dev/fd/63), else None. One of this process's is written
    as it is, at its offset (as - writes standard output): the link behind it names a pipe that no path
    reaches ("pipe:[687605]"), or a file that a rename would take from the shell's redirection, or that
    a reopening would truncate. Another process's is opened by its name, in place (a regular file
    behind it is truncated, as by the shell's >)."""
    p = os.path.abspath(os.fspath(path))
    for _ in range(40):           # (the kernel's own limit on links followed)
        folder, name = os.path.split(p)
        real = os.path.realpath(folder)
        m = re.fullmatch(r"/proc/(\d+)(?:/task/\d+)?/fd", real)
        if m and name.isdigit():
            return int(m.group(1)), int(name)
        if not os.path.islink(p):
            return None
        p = os.path.join(real, os.readlink(p))
    return None


def _writable_descriptor(fd):
    """Whether descriptor_of's (pid, fd) is open for writing: this process's by its own flags (the file
    behind it may be one this user could not open, as a shell's 3>file of root's), another's by access()
    of the file."""
    pid, n = fd
    if pid != os.getpid():
        return os.access(f"/proc/{pid}/fd/{n}", os.W_OK)
    import fcntl

    try:
        return fcntl.fcntl(n, fcntl.F_GETFL) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
    except OSError:        # not open
        return False


def _target(path):
    """The file an output at `path` writes: the end of its links (which need not exist yet), or an
    OSError for a loop of links."""
    try:
        return os.path.realpath(path, strict=True)
    except OSError as e:
        if e.errno == errno.ELOOP:       # (the shell refuses such a name too)
            raise named_error(e, f"{path}: cannot write there ({e.strerror})") from None
        return os.path.realpath(path)    # a missing file or folder: the checks below say which


def _new_file(folder):
    """A new empty file in `folder` under a name of its own, made with the permissions a new file gets
    (0666 less the umask, as open(path, "w") makes it). The name is short: the output's own may have the
    255 bytes a name can have."""
    while True:
        path = os.path.join(folder, f".fl-{os.getpid()}-{secrets.token_hex(4)}.partial")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def check_output_path(path):
    """An error now, before any work, if a file cannot be written at `path`: its folder is missing or
    not writable, the name is a folder's, or it names a read-only file or a loop of links. A symbolic
    link is followed: its target is what gets written."""
    if not os.fspath(path):
        raise ValueError("the output's name is empty")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder; expected the name of the file to write")
    if os.fspath(path).endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        raise IsADirectoryError(f"{path}: names a folder (it ends in a separator), and there is none; "
                                "expected the name of the file to write")
    fd = descriptor_of(path)
    if fd is not None:
        if not _writable_descriptor(fd):
            raise PermissionError(f"{path}: cannot write there (not a descriptor open for writing)")
        return
    target = _target(path)
    if _written_in_place(target):
        if not os.access(target, os.W_OK):
            raise PermissionError(f"{path}: cannot write there, {target} is not writable")
        return
    folder = os.path.dirname(target)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{path}: cannot write there, {folder} is a file, not a folder")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: cannot write there, no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{path}: cannot write there, the folder {folder} is not writable")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise PermissionError(f"{path}: is read-only; make it writable or choose another name")


def atomic_output(path):
    """A context manager giving a temporary path next to `path` (a link's target: the link stays),
    renamed to it when the block ends normally and removed when it raises (Ctrl-C, a crash, a full disk):
    no half-written file is ever left under the final name. A file it replaces keeps its permissions.
    An existing FIFO or device (a pipe, /dev/null) is given as it is, to be written in place; a name of
    one of this process's descriptors (/dev/stdout, /dev/fd/N) as a duplicate of it (an int, which
    open() takes), written at its offset."""
    return _Atomic(os.fspath(path))


class _Atomic(contextlib.AbstractContextManager):
    def __init__(self, path):
        self.path = path
        self.in_place = False

    def __enter__(self):
        check_output_path(self.path)
        fd = descriptor_of(self.path)
        if fd is not None:
            self.in_place = True
            return os.dup(fd[1]) if fd[0] == os.getpid() else self.path
        self.target = _target(self.path)
        if _written_in_place(self.target):
            self.in_place = True
            return self.target
        self.tmp = None
        try:
            self.tmp = _new_file(os.path.dirname(self.target))
            if os.path.isfile(self.target):
                shutil.copymode(self.target, self.tmp)
        except OSError as e:         # named by the caller's path, not the temporary one
            if self.tmp is not None:
                with contextlib.suppress(OSError):
                    os.remove(self.tmp)
            raise named_error(e, f"{self.path}: cannot write there ({e.strerror or e})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if self.in_place:
            return False
        try:
            if exc_type is None:
                try:
                    os.replace(self.tmp, self.target)
                except OSError as e:     # named by the caller's path (an append-only file, say)
                    raise named_error(e, f"{self.path}: cannot write there ({e.strerror or e})") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.tmp)      # after a rename, nothing is left to remove
        return False


def stats(source, labels=None, *, ignore_index=-100, temperature=1.0, softcap=None, backend=None,
          threads=None, chunk_size=None, memory=None, progress=None):
    """One pass over a source (or an in-memory array) for an evaluation summary: per row the NLL (with
    labels), entropy and argmax, and whether the argmax is the label. Returns a dict of per-row arrays.
    Row blocks go through one fused kernel (the entropy state holds the logsumexp state, and the argmax
    falls out of the same chunk maxima); rows too long for the budget through the accumulators."""
    from fastlogits.ops import _backend
    from fastlogits.ops._prep import prepare
    from fastlogits.ops.reductions import check_ignore_index, check_labels
    from fastlogits.stream.accumulators import CrossEntropy, Entropy, TopK
    from fastlogits.stream.sources import ArraySource, as_source

    source = as_source(source) or ArraySource(np.asarray(source))
    check_backend(backend)
    ignore_index = check_ignore_index(ignore_index)
    temp = RowArg.temperature(temperature, source)
    lab = None if labels is None else RowArg.labels(labels, source, ignore_index)
    common = {"softcap": softcap, "threads": threads, "chunk_size": chunk_size}
    progress = progress or no_progress
    p = plan(source, memory)
    nll, ent, top, rows = [], [], [], 0
    if p.rows:
        for r0, block in row_blocks(source, p.rows):
            r1 = r0 + block.shape[0]
            r = prepare(block, temperature=temp.block(r0, r1), backend=backend, **common)
            y = None if lab is None else check_labels(lab.block(r0, r1), r.lead, r.V, ignore_index)
            a, b, c = _backend.get(r.backend).stats(r.x, r.dtype, r.temperature, r.softcap, y, ignore_index,
                                                    r.chunk, r.threads)
            nll.append(a)
            ent.append(b)
            top.append(c)
            rows = r1
            progress(block.shape[0], block.nbytes)
    else:
        def make(r0, r1):
            t = temp.block(r0, r1)
            return (CrossEntropy(lab.block(r0, r1), ignore_index=ignore_index, temperature=t, **common)
                    if lab is not None else None,
                    Entropy(r1 - r0, temperature=t, **common), TopK(r1 - r0, 1, temperature=t, **common))

        for _, r1, (ce, en, tk) in folded_rows(source, p.cols, make, progress):
            if ce is not None:
                nll.append(ce.terms(per_row=True)[0])
            ent.append(en.result())
            top.append(tk.result()[1][:, 0])
            rows = r1
    temp.check_rows(rows)
    out = {"rows": rows, "entropy": np.concatenate(ent) if ent else np.empty(0),
           "argmax": np.concatenate(top).astype(np.int64) if top else np.empty(0, np.int64)}
    if lab is not None:
        lab.check_rows(rows)
        y = lab.value.reshape(-1).astype(np.int64)
        out["nll"] = np.concatenate(nll) if nll else np.empty(0)
        out["counted"] = y != ignore_index
        out["correct"] = out["argmax"] == y
    return out
