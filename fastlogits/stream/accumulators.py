"""Accumulators: fold a block of rows whose vocabulary arrives in column chunks, in any order.

Each accumulator holds one row state per row (the C core's logsumexp state: running max m and running
sum s of exp(x - m)), updated by ``update(chunk, start)`` and merged with the states of other column
ranges by ``merge`` (another accumulator of the same kind and options, or a ``state`` tuple made
elsewhere: another process, another backend, another machine). Merging is associative and commutative,
so the order of chunks and merges does not matter beyond rounding. Chunks are host arrays: the
accumulators fold on the CPU.

Each accumulator records the column ranges it has folded, and a column folded twice raises. LogSumExp,
Entropy and TopK give the result over the columns they were given, whichever those are (one shard of a
vocabulary split over devices is a whole input to them): columns never folded in are not an error.
CrossEntropy needs every column from 0 on (its labels and weights index them) and raises for a gap. A bare
state merged in carries no column ranges, so past it neither check is made.

An accumulator may be updated and merged into from several threads at once: each fold, merge and read of
its state holds the accumulator's lock (a fold runs on all the threads it is given anyway). Without it two
threads could both find a range new and fold it in twice (off by log 2), or lose each other's ranges.
"""
import contextlib
import copy
import functools
import threading
from typing import NamedTuple

import numpy as np

from fastlogits._config import int_arg, is_int
from fastlogits.cpu import _reduce
from fastlogits.cpu.backend import CODES, aligned, compute_dtype
from fastlogits.ops._doc import shared_params
from fastlogits.ops._prep import as_array, is_gpu_array, prepare, weight_sum
from fastlogits.ops.reductions import (
    as_labels,
    as_weight,
    ce_terms,
    ce_total,
    check_ce_options,
    check_reduction,
    first_past_int64,
)


class LogSumExpState(NamedTuple):
    m: np.ndarray   # running max per row (-inf: nothing yet; NaN: a NaN was seen)
    s: np.ndarray   # running sum of exp(x - m) per row


class CrossEntropyState(NamedTuple):
    m: np.ndarray        # as LogSumExpState
    s: np.ndarray
    target: np.ndarray   # the label's (transformed) logit, once its column was seen
    found: np.ndarray    # bool: the label's column was seen
    dist: np.ndarray     # label smoothing: sum of w (m - x) over the columns seen (w = 1 without weights)
    wseen: float         # the sum of w over the columns seen
    columns: int         # number of vocabulary columns folded in


class EntropyState(NamedTuple):
    m: np.ndarray   # as LogSumExpState
    s: np.ndarray
    t: np.ndarray   # running sum of exp(x - m) (x - m) per row


class TopKState(NamedTuple):
    values: np.ndarray    # (rows, j), j <= k: the largest values seen (after softcap and temperature)
    indices: np.ndarray   # (rows, j) int64: their columns
    m: np.ndarray = None  # logprobs=True: the rows' LogSumExpState (m, s); None otherwise
    s: np.ndarray = None


def _row_state(value, rows, name, dtype=np.float64, sums=False):
    """One field of another accumulator's state, as a C-contiguous array of one value per row; sums=True
    for a field of sums of exponentials, which no row has negative (NaN is a NaN row's)."""
    try:
        a = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise TypeError(f"merge: the other state's {name} must be an array of {np.dtype(dtype).name} values, "
                        f"got {value!r:.80}") from None
    if a.shape != (rows,):
        raise ValueError(f"merge: the other state's {name} must have one value per row, shape ({rows},), got "
                         f"shape {a.shape}")
    if sums and (a < 0).any():
        row = int(np.argmax(a < 0))
        raise ValueError(f"merge: the other state's {name} holds sums of exponentials, never negative, got "
                         f"{float(a[row])!r} in row {row}")
    return np.require(a, requirements="CA")        # (C reads it: aligned, as a received buffer may not be)


def _merge_lse(m, s, m2, s2):
    rows = m.shape[0]
    _reduce.merge_lse_states(m, s, _row_state(m2, rows, "m"), _row_state(s2, rows, "s", sums=True))


def _locked(method):
    """method, holding the accumulator's lock (reentrant: result calls terms)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


def _same(a, b):
    """Two options' values are the same (NaN equal to NaN: a NaN class weight is a weight like any)."""
    a, b = np.asarray(a), np.asarray(b)
    return np.array_equal(a, b, equal_nan=a.dtype.kind in "fc" and b.dtype.kind in "fc")


class _Base:
    def __init__(self, rows, temperature, softcap, threads, chunk_size):
        self.rows = int_arg(rows, "rows", "a non-negative integer", 0)
        # checks temperature and softcap now, not at the first update (float64's rules: the dtype of the
        # chunks is not known yet; float32's narrower range is checked when a chunk comes)
        r = prepare(np.zeros((self.rows, 0), np.float64), temperature=temperature, softcap=softcap,
                    backend="cpu", threads=threads, chunk_size=chunk_size)
        # one float64 per row, a private copy (the caller may reuse its array)
        self._temperature = r.temperature
        self._softcap = softcap
        self._threads = threads
        self._chunk_size = chunk_size
        self.m = np.full(self.rows, -np.inf)
        self.s = np.zeros(self.rows)
        self.columns = 0
        # the column ranges folded in, as sorted [start, end) pairs; None once a bare state of unknown
        # columns was merged. Folding a column twice would count it twice, so an overlap raises.
        self.ranges = []
        self._lock = threading.RLock()

    def __getstate__(self):          # pickle, copy: everything but the lock, which is the object's own
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __copy__(self):
        """An accumulator of its own: the state's arrays are folded into in place, so a shallow copy
        shared them (an update of the copy changed the original, and merging the two counted columns
        twice, unseen by the overlap check)."""
        return copy.deepcopy(self)

    def _check_chunk(self, chunk, start):
        """chunk as an array of shape (rows, c) and start as an int, after the usual checks."""
        if is_gpu_array(chunk):
            hint = (" (or merge the state (lse, np.ones(rows)) of fastlogits.logsumexp(chunk, "
                    "temperature=..., softcap=...) computed on the GPU with this accumulator's temperature "
                    "and softcap)"
                    if type(self) is LogSumExp else "")
            raise ValueError(f"{type(self).__name__}.update: the accumulators fold chunks on the CPU, and "
                             f"this chunk lives on a GPU: copy it to the host first{hint}")
        x = as_array(chunk, argname="chunk")
        if x.ndim != 2 or x.shape[0] != self.rows:
            raise ValueError(f"chunk must have shape (rows, c) = ({self.rows}, c), got {x.shape}")
        start = int_arg(start, "start", "a non-negative integer column index", 0)
        if start + x.shape[1] > 2**63:      # (the last column index past int64: TopK wrapped it)
            raise ValueError(f"start: columns {start}:{start + x.shape[1]} pass the largest column "
                             f"index, 2**63 - 1")
        return x, start

    @contextlib.contextmanager
    def _adding(self, ranges, columns):
        """Around a fold or merge of `columns` columns in `ranges` ([start, end) pairs; None: unknown): a
        column already folded in raises before it, and the columns are recorded once it has succeeded (a
        fold that raises records nothing). Holds the lock throughout."""
        with self._lock:
            after = self._covered(ranges)
            yield
            self.ranges = after
            self.columns += int(columns)

    def _chunk(self, chunk, start):
        """As _check_chunk, and the context of its fold (see _adding)."""
        x, start = self._check_chunk(chunk, start)
        return x, start, self._adding([(start, start + x.shape[1])], x.shape[1])

    def _covered(self, ranges):
        """The column ranges after folding in `ranges`, or a ValueError for a column folded in twice."""
        if ranges is None or self.ranges is None:
            return None
        merged = sorted(self.ranges + [r for r in ranges if r[1] > r[0]])
        for (a0, a1), (b0, b1) in zip(merged, merged[1:]):
            if b0 < a1:
                raise ValueError(f"columns {max(a0, b0)}:{min(a1, b1)} were already folded in (once in "
                                 f"columns {a0}:{a1}, again in {b0}:{b1}); each column must be folded in "
                                 "once")
        out = []
        for a, b in merged:   # keep the list short: join touching ranges
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return out

    def _prepare(self, x):
        """The prepared chunk, whole and aligned: the kernels read it as it is."""
        r = prepare(x, temperature=self._temperature, softcap=self._softcap, backend="cpu",
                    threads=self._threads, chunk_size=self._chunk_size)
        r.x = aligned(r.x)
        return r

    def _lse_states(self, x, start, weight=None, want_dist=False):
        """The prepared chunk and its row states (m, s, dist) (dist: label smoothing's distance sums, see
        CrossEntropy)."""
        if weight is not None and start + x.shape[1] > weight.shape[0]:
            raise ValueError(f"weight has {weight.shape[0]} values (one per class), but columns "
                             f"{start}:{start + x.shape[1]} were given")
        r = self._prepare(x)
        m, s, tot = (np.empty(self.rows) for _ in range(3))
        w = None
        if weight is not None:
            w = np.require(weight[start:start + x.shape[1]], compute_dtype(r.dtype), "CA")
        _reduce.lse_states(r.x, CODES[r.dtype], r.temperature, r.softcap, w, want_dist, m, s, tot, r.chunk,
                           r.threads)
        return r, m, s, tot

    def _other(self, other, State):
        """(state, column ranges, columns) of what merge was given: an accumulator of this kind, made
        with the same options, or a bare state (its ranges unknown, its columns not counted)."""
        if other is self:      # (the column ranges cannot tell once a bare state was merged)
            raise ValueError(f"merge: a {type(self).__name__} cannot be merged into itself (its columns "
                             "would count twice)")
        if isinstance(other, type(self)):
            self._check_same(other)
            with other._lock:       # one snapshot, should another thread be updating it
                return other.state, other.ranges, other.columns
        if isinstance(other, _Base):
            raise TypeError(f"merge: a {type(self).__name__} merges another {type(self).__name__} or a "
                            f"{State.__name__}, got a {type(other).__name__}")
        try:
            return State(*other), None, 0
        except TypeError:
            raise TypeError(f"merge: expected a {type(self).__name__} or a {State.__name__} "
                            f"({', '.join(State._fields)}), got {other!r:.80}") from None

    def _check_same(self, other, names=()):
        if other.rows != self.rows:
            raise ValueError(f"merge: the other {type(self).__name__} has {other.rows} rows, this one "
                             f"{self.rows}")
        for name in (*names, "_temperature", "_softcap"):
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None) or (a is not None and not _same(a, b)):
                raise ValueError(f"merge: the other {type(self).__name__} has a different "
                                 f"{name.lstrip('_')}; only accumulators of the same options can be merged")

    def __repr__(self):
        return f"{type(self).__name__}(rows={self.rows}, columns={self.columns})"


@shared_params
class LogSumExp(_Base):
    """Running logsumexp of ``rows`` rows whose columns arrive in chunks.

    Parameters
    ----------
    rows : int >= 0
        The number of rows; each chunk given to ``update`` has shape (rows, c).
    {options}

    Examples
    --------
    >>> import numpy as np
    >>> from fastlogits.stream import LogSumExp
    >>> x = np.random.default_rng(0).normal(size=(3, 10))
    >>> acc = LogSumExp(3)
    >>> _ = acc.update(x[:, 6:], 6).update(x[:, :6], 0)
    >>> bool(np.allclose(acc.result(), np.log(np.exp(x).sum(1))))
    True
    """

    def __init__(self, rows, *, temperature=1.0, softcap=None, threads=None, chunk_size=None):
        super().__init__(rows, temperature, softcap, threads, chunk_size)

    def update(self, chunk, start=0):
        """Fold in columns start .. start + c of every row; chunk has shape (rows, c)."""
        x, start, adding = self._chunk(chunk, start)
        with adding:
            _, m, s, _ = self._lse_states(x, start)
            _merge_lse(self.m, self.s, m, s)
        return self

    @property
    @_locked
    def state(self):
        """LogSumExpState (m, s): copies of the running max and sum per row, to merge elsewhere."""
        return LogSumExpState(self.m.copy(), self.s.copy())

    def merge(self, other):
        """Fold in the state of other columns: a LogSumExp of the same temperature and softcap, or a
        (m, s) pair of arrays."""
        (m2, s2), ranges, columns = self._other(other, LogSumExpState)
        with self._adding(ranges, columns):
            _merge_lse(self.m, self.s, m2, s2)
        return self

    @_locked
    def result(self):
        """logsumexp per row, float64 (rows,)."""
        out = np.empty(self.rows)
        _reduce.lse_results(self.m, self.s, out)
        return out


@shared_params
class CrossEntropy(_Base):
    """Running cross-entropy of rows whose columns arrive in chunks, with F.cross_entropy's options.

    ``labels`` has one class index per row; ``result()`` gives what :func:`fastlogits.cross_entropy`
    gives for the whole rows, in float64 (the vocabulary size is the number of columns folded in).

    Label smoothing's term ``sum_c w_c (lse - x_c)`` is kept as the distance sum ``dist = sum_c w_c (m -
    x_c)`` from the row's running max m, with ``wseen = sum_c w_c``: its terms are never negative (for
    weights >= 0), so it keeps its precision however large the logits are (``W lse - sum w x`` would
    cancel), and a new max m' adds ``wseen (m' - m)``.

    Parameters
    ----------
    labels : array_like of int, shape (rows,)
        One class index per row (a column of the whole vocabulary), or ``ignore_index``.
    weight : array_like of float, shape (V,), optional
        A weight per class, as F.cross_entropy's; V is then the vocabulary that must be folded in.
    ignore_index : int
        Rows with this label count for nothing (default -100).
    label_smoothing : float in [0, 1]
        As F.cross_entropy's (default 0).
    reduction : {"mean", "sum", "none"}
        As F.cross_entropy's (default "mean").
    z_loss : float >= 0
        Adds ``z_loss * lse**2`` per counted row, as fastlogits.cross_entropy (default 0).
    {options}
    """

    def __init__(self, labels, *, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                 z_loss=0.0, temperature=1.0, softcap=None, threads=None, chunk_size=None):
        lab = as_labels(labels)
        if lab.ndim != 1:
            raise ValueError(f"labels must be 1-D (one class index per row), got shape {lab.shape}")
        super().__init__(lab.shape[0], temperature, softcap, threads, chunk_size)
        self.label_smoothing, self.z_loss, self.ignore_index = check_ce_options(label_smoothing, z_loss,
                                                                                ignore_index)
        check_reduction(reduction)
        self.reduction = reduction
        i = first_past_int64(lab)
        if i < 0:
            negative = (lab < 0) & (lab != self.ignore_index)     # (the columns bound the rest later)
            i = int(np.argmax(negative)) if negative.any() else -1
        if i >= 0:
            raise IndexError(f"labels: label {int(lab[i])} at row {i} is out of range")
        self.labels = lab.astype(np.int64)
        self.weight = as_weight(weight, copy=True)     # kept across updates
        if self.weight is not None and self.weight.ndim != 1:
            raise ValueError(f"weight must be 1-D (one value per class), got shape {self.weight.shape}")
        self.target = np.zeros(self.rows)
        self.found = np.zeros(self.rows, bool)
        self.dist = np.zeros(self.rows)
        self.wseen = 0.0

    def _merge_states(self, m, s, dist, wseen):
        """Merge the logsumexp states and smoothing distance sums of other columns into this one."""
        m_old = self.m.copy()
        _merge_lse(self.m, self.s, m, s)
        if self.label_smoothing > 0:
            self.wseen = _reduce.merge_dist_states(self.dist, self.wseen, m_old, dist, wseen, m, self.m)
        else:
            self.wseen += wseen

    def update(self, chunk, start=0):
        """Fold in columns start .. start + c of every row; chunk has shape (rows, c)."""
        x, start, adding = self._chunk(chunk, start)
        with adding:
            r, m, s, dist = self._lse_states(x, start, self.weight, self.label_smoothing > 0)
            c = r.V
            wseen = float(c)
            if self.weight is not None:      # as the kernels weigh: in the compute dtype, summed in float64
                w = self.weight[start:start + c].astype(compute_dtype(r.dtype))
                wseen = weight_sum(w)
            self._merge_states(m, s, dist, wseen)
            here = (self.labels >= start) & (self.labels < start + c) & (self.labels != self.ignore_index)
            cols = np.where(here, self.labels - start, -1).astype(np.int64)
            _reduce.row_values(r.x, CODES[r.dtype], r.temperature, r.softcap, cols, self.target)
            self.found |= here
        return self

    @property
    @_locked
    def state(self):
        """CrossEntropyState: copies of the row states, to merge elsewhere."""
        return CrossEntropyState(self.m.copy(), self.s.copy(), self.target.copy(), self.found.copy(),
                                 self.dist.copy(), self.wseen, self.columns)

    def merge(self, other):
        """Fold in the state of other columns: a CrossEntropy (of the same labels and options), or a
        CrossEntropyState."""
        st, ranges, _ = self._other(other, CrossEntropyState)
        rows = self.rows
        found = _row_state(st.found, rows, "found", bool)
        target = _row_state(st.target, rows, "target")
        dist = _row_state(st.dist, rows, "dist")
        m2, s2 = _row_state(st.m, rows, "m"), _row_state(st.s, rows, "s", sums=True)
        columns = st.columns
        if not is_int(columns) or int(columns) < 0:
            raise ValueError(f"merge: the other state's columns must be a non-negative integer, got "
                             f"{columns!r}")
        try:
            wseen = float(st.wseen)
        except (TypeError, ValueError):
            raise ValueError(f"merge: the other state's wseen must be a number, got {st.wseen!r}") from None
        with self._adding(ranges, columns):
            self._merge_states(m2, s2, dist, wseen)
            self.target = np.where(found, target, self.target)
            self.found |= found
        return self

    def _check_same(self, other, names=()):
        super()._check_same(other, ("labels", "weight", "ignore_index", "label_smoothing", "z_loss",
                                    "reduction"))

    @_locked
    def terms(self, per_row=False):
        """The loss's per-row values (when per_row) and sums (see fastlogits.ops.reductions.ce_terms),
        for callers that reduce over many accumulators (streaming)."""
        V = self.columns
        if self.ranges is not None and self.ranges not in ([], [(0, V)]):
            ends = [0] + [b for _, b in self.ranges]
            e, a = next((e, a) for e, (a, _) in zip(ends, self.ranges) if a != e)   # the first gap
            raise ValueError(f"columns {e}:{a} were never folded in (folded in: "
                             f"{', '.join(f'{a}:{b}' for a, b in self.ranges)}); the loss needs every column")
        if self.weight is not None and self.weight.shape[0] != V:
            raise ValueError(f"weight has {self.weight.shape[0]} values (one per class), but {V} columns "
                             "were folded in")
        counted = self.labels != self.ignore_index
        if np.any(counted & (self.labels >= V)):
            i = int(np.argmax(counted & (self.labels >= V)))
            raise IndexError(f"labels: label {int(self.labels[i])} at row {i} is out of range for the {V} "
                             "columns folded in")
        if np.any(counted & ~self.found):
            i = int(np.argmax(counted & ~self.found))
            raise ValueError(f"row {i}: the column of its label {int(self.labels[i])} was never folded in")
        eps = self.label_smoothing
        nll, lse = np.empty(self.rows), np.empty(self.rows)
        smooth = np.empty(self.rows) if eps > 0 else None
        _reduce.ce_results(self.m, self.s, self.dist, self.target, self.labels, self.ignore_index, self.wseen,
                           eps > 0, nll, smooth, lse)
        return ce_terms(nll, smooth, lse, self.labels, self.ignore_index, self.weight, eps, self.z_loss, V,
                        per_row)

    @_locked
    def result(self):
        """The loss: a float64 scalar, or per row for reduction="none"."""
        loss, sums = self.terms(per_row=self.reduction == "none")
        return loss if self.reduction == "none" else ce_total(sums, self.reduction,
                                                              smoothing=self.label_smoothing > 0)


@shared_params
class Entropy(_Base):
    """Running entropy (nats) of softmax of rows whose columns arrive in chunks: the logsumexp state and
    t = sum exp(x - m) (x - m), merged with the C core's rule.

    Parameters
    ----------
    rows : int >= 0
        The number of rows; each chunk given to ``update`` has shape (rows, c).
    {options}
    """

    def __init__(self, rows, *, temperature=1.0, softcap=None, threads=None, chunk_size=None):
        super().__init__(rows, temperature, softcap, threads, chunk_size)
        self.t = np.zeros(self.rows)

    def update(self, chunk, start=0):
        """Fold in columns start .. start + c of every row; chunk has shape (rows, c)."""
        x, start, adding = self._chunk(chunk, start)
        with adding:
            r = self._prepare(x)
            m, s, t = (np.empty(self.rows) for _ in range(3))
            _reduce.ent_states(r.x, CODES[r.dtype], r.temperature, r.softcap, m, s, t, r.chunk, r.threads)
            _reduce.merge_ent_states(self.m, self.s, self.t, m, s, t)
        return self

    @property
    @_locked
    def state(self):
        """EntropyState (m, s, t): copies of the row states, to merge elsewhere."""
        return EntropyState(self.m.copy(), self.s.copy(), self.t.copy())

    def merge(self, other):
        """Fold in the state of other columns: an Entropy of the same temperature and softcap, or an
        EntropyState (m, s, t) of arrays."""
        (m, s, t), ranges, columns = self._other(other, EntropyState)
        m, t = _row_state(m, self.rows, "m"), _row_state(t, self.rows, "t")
        s = _row_state(s, self.rows, "s", sums=True)
        with self._adding(ranges, columns):
            _reduce.merge_ent_states(self.m, self.s, self.t, m, s, t)
        return self

    @_locked
    def result(self):
        """Entropy per row, float64 (rows,)."""
        out = np.empty(self.rows)
        _reduce.ent_results(self.m, self.s, self.t, out)
        return out


@shared_params
class TopK(_Base):
    """Running top-k (values after softcap and temperature, and indices) of rows whose columns arrive in
    chunks; with ``logprobs=True`` the log-probabilities under softmax(x / T) instead of the values. The
    order is fastlogits.top_k's: NaN first (as PyTorch's topk), then larger values, then lower indices.
    Values are float64, as computed (x / T in float32 for float32 and 16-bit chunks): not rounded back to
    a 16-bit chunk's dtype as fastlogits.top_k's are.

    Parameters
    ----------
    rows : int >= 0
        The number of rows; each chunk given to ``update`` has shape (rows, c).
    k : int >= 0
        Entries kept per row (fewer while fewer columns were folded in).
    logprobs : bool
        Keep log-probabilities (a running logsumexp beside the top k) instead of the values.
    {options}
    """

    def __init__(self, rows, k, *, logprobs=False, temperature=1.0, softcap=None, threads=None,
                 chunk_size=None):
        super().__init__(rows, temperature, softcap, threads, chunk_size)
        self.k = int_arg(k, "k", "a non-negative integer", 0)
        self.values = np.empty((self.rows, 0))
        self.indices = np.empty((self.rows, 0), np.int64)
        self._lse = LogSumExp(rows, temperature=temperature, softcap=softcap, threads=threads,
                              chunk_size=chunk_size) if logprobs else None

    def update(self, chunk, start=0):
        """Fold in columns start .. start + c of every row; chunk has shape (rows, c)."""
        from fastlogits.ops.selection import _top_k

        x, start, adding = self._chunk(chunk, start)
        with adding:
            # values in the compute dtype (not rounded back to a 16-bit input dtype): log-probs come from
            # them
            if x.shape[1]:                     # (an empty chunk adds no candidates, as it adds nothing
                _, v, i = _top_k(x, min(self.k, x.shape[1]), False, self._temperature, self._softcap,
                                 "cpu", self._threads, self._chunk_size)     # to the other accumulators)
                self._keep(np.asarray(v, np.float64), i + start)
            if self._lse is not None:
                self._lse.update(x, start)
        return self

    def _keep(self, v, i):
        """Keep the k first of the held values and v (indices i), in top_k's order."""
        v = np.concatenate([self.values, v], axis=1)
        i = np.concatenate([self.indices, i], axis=1)
        nan = np.isnan(v)
        order = np.lexsort((i, -np.where(nan, 0.0, v), ~nan), axis=1)[:, :self.k]
        self.values = np.take_along_axis(v, order, 1)
        self.indices = np.take_along_axis(i, order, 1)

    @property
    @_locked
    def state(self):
        """TopKState (values, indices, m, s): copies of the kept values, to merge elsewhere."""
        m, s = self._lse.state if self._lse is not None else (None, None)
        return TopKState(self.values.copy(), self.indices.copy(), m, s)

    def merge(self, other):
        """Fold in the state of other columns: a TopK of the same k, logprobs, temperature and softcap,
        or a TopKState (values, indices, m, s): values and indices of shape (rows, j), j <= k, with the
        logsumexp state (m, s) of the columns when logprobs=True (None otherwise)."""
        st, ranges, columns = self._other(other, TopKState)
        v = np.asarray(st.values, dtype=np.float64)
        i = np.asarray(st.indices)
        if v.ndim != 2 or v.shape[0] != self.rows or v.shape[1] > self.k or i.shape != v.shape:
            raise ValueError(f"merge: the other state's values and indices must both have shape (rows, j) = "
                             f"({self.rows}, j) with j <= k = {self.k}, got {v.shape} and {i.shape}")
        if i.dtype.kind not in "iu" or (i.size and i.min() < 0):
            raise ValueError("merge: the other state's indices must be non-negative integers (columns)")
        if (st.m is None) != (self._lse is None):
            raise ValueError(f"merge: this TopK has logprobs={self._lse is not None}, so the other state's "
                             f"m and s must {'be arrays' if self._lse is not None else 'be None'}")
        with self._adding(ranges, columns):
            if self._lse is not None:
                self._lse.merge((st.m, st.s))
            self._keep(v, i.astype(np.int64))
        return self

    def _check_same(self, other, names=()):
        super()._check_same(other, ("k",))
        if (other._lse is None) != (self._lse is None):
            raise ValueError("merge: the other TopK has a different logprobs; only accumulators of the same "
                             "options can be merged")

    @_locked
    def result(self):
        """(values or log-probabilities, indices), float64 and int64, each (rows, min(k, columns)): new
        arrays (a caller changing them in place changed the accumulator's state)."""
        if self._lse is None:
            return self.values.copy(), self.indices.copy()
        m, log_s = self._lse.m[:, None], np.empty((self.rows, 1))
        _reduce.logs(self._lse.s, log_s[:, 0])
        with np.errstate(invalid="ignore"):
            lp = np.where(np.isfinite(m), (self.values - m) - log_s, np.nan)
        return lp, self.indices.copy()
