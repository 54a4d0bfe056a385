"""Inputs that C code tends to misread: byte-swapped, unaligned, zero-stride (broadcast) and read-only arrays,
lists, memoryviews, masked arrays, non-contiguous labels and weights, more threads than cores, chunks larger
than a row, and calls from several Python threads at once."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastlogits as fl
from tests import reference as ref
from tests.helpers import BF16, FUNCTIONS, call, check, random_labels, random_logits


def _ce(name):
    return {"reduction": "none"} if name == "cross_entropy" else {}


def _labels(name, rng, x):
    return random_labels(rng, x.shape[:-1], x.shape[-1]) if name == "cross_entropy" else None


@pytest.mark.parametrize("dtype", ["<f4", ">f4", ">f8", ">f2"])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_byte_swapped(name, dtype, rng):
    """A big-endian float32 array is float32: same values, same results."""
    x = random_logits(rng, (4, 77), np.dtype(dtype).newbyteorder("="))
    xs = x.astype(dtype)
    assert np.array_equal(xs, x)
    labels = _labels(name, rng, x)
    check(name, xs, labels=labels, chunk_size=8, **_ce(name))


def test_byte_swapped_outputs_are_refused_naming_the_byte_order(rng):
    """An output dtype or out= array in the other byte order is refused as such (not as an unsupported
    dtype: '>f4' is float32); a raw file declared big-endian is told to go through a memmap."""
    x = random_logits(rng, (2, 5), np.float32)
    with pytest.raises(TypeError, match=r"dtype must be in this machine's byte order, got >f4 \(a "
                                        "byte-swapped float32"):
        fl.softmax(x, dtype=">f4")
    with pytest.raises(TypeError, match="out must be in this machine's byte order, got >f8"):
        fl.log_softmax(x, out=np.empty((2, 5), ">f8"))
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64, got >i4"):
        fl.softmax(x, dtype=">i4")


def test_raw_files_declared_big_endian_are_refused_with_the_way_to_read_them(tmp_path, rng):
    x = random_logits(rng, (3, 4), np.float64)
    path = tmp_path / "be.raw"
    x.astype(">f8").tofile(path)
    with pytest.raises(fl.stream.SourceError, match=r"little-endian.*np\.memmap") as e:
        fl.open(path, dtype=">f8", vocab=4)
    assert isinstance(e.value, TypeError)
    # what the message says to do reads it
    m = np.memmap(path, dtype=">f8").reshape(-1, 4)
    np.testing.assert_array_equal(fl.argmax(fl.open(m)), x.argmax(-1))
    np.testing.assert_allclose(fl.logsumexp(fl.open(m)), fl.logsumexp(x), rtol=1e-15)


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float64, np.float16, BF16], ids=["f32", "f64", "f16", "bf16"]
)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_unaligned(name, dtype, rng):
    """Data that starts one byte past an aligned address."""
    x = random_logits(rng, (5, 131), dtype)
    raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
    view = raw[1:].view(dtype).reshape(x.shape)
    view[...] = x
    assert not view.flags.aligned or np.dtype(dtype).itemsize == 1
    check(name, view, labels=_labels(name, rng, x), chunk_size=16, **_ce(name))


def _unaligned(a):
    """a copied to one byte past an aligned address (as np.frombuffer at an odd offset gives)."""
    raw = np.zeros(a.nbytes + 1, dtype=np.uint8)
    view = raw[1:].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned
    return view


class _AlignedOnly:
    """A kernel module whose functions check that every array they are given is aligned: C reads them
    as their element type, which an unaligned address makes undefined (UBSan's misaligned load)."""
    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        f = getattr(self.module, name)

        def checked(*args, **kw):
            for a in (*args, *kw.values()):
                assert not isinstance(a, np.ndarray) or a.flags.aligned, f"{name}: an unaligned array"
            return f(*args, **kw)
        return checked


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BF16],
                         ids=["f32", "f64", "f16", "bf16"])
def test_the_kernels_are_given_aligned_arrays_only(dtype, rng, monkeypatch):
    """Unaligned logits, out=, temperatures, class weights and seeds reach the C kernels through aligned
    copies (blocks of rows for the large ones), with the results of aligned arrays, bit for bit (sample
    on the finite rows)."""
    import fastlogits.cpu as cpu_pkg
    from fastlogits.cpu import backend as cpu

    x = random_logits(rng, (7, 131), dtype)
    x[2, 5] = np.nan
    x[3, :] = -np.inf
    y = random_labels(rng, (7,), 131)
    t = rng.uniform(0.5, 2.0, 7)
    w = rng.uniform(0.5, 2.0, 131)
    seeds = rng.integers(0, 2**63, 7).astype(np.uint64)
    calls = {
        "logsumexp": lambda x, t, w, s: fl.logsumexp(x, temperature=t),
        "entropy": lambda x, t, w, s: fl.entropy(x, temperature=t),
        "softmax": lambda x, t, w, s: fl.softmax(x, temperature=t),
        "log_softmax into out": lambda x, t, w, s: fl.log_softmax(
            x, temperature=t, out=_unaligned(np.zeros(x.shape, np.float32)) if not x.flags.aligned else
            np.zeros(x.shape, np.float32)),
        "cross_entropy": lambda x, t, w, s: fl.cross_entropy(x, y, weight=w, label_smoothing=0.1,
                                                             temperature=t, reduction="none"),
        "argmax": lambda x, t, w, s: fl.argmax(x),
        "top_k_logprobs": lambda x, t, w, s: fl.top_k_logprobs(x, 3, temperature=t),
        "sample": lambda x, t, w, s: fl.sample(x[4:], temperature=t[4:], top_p=0.9, seed=s[4:]),
    }
    want = {name: f(x, t, w, seeds) for name, f in calls.items()}
    for name in ("_reduce", "_maps", "_select"):
        monkeypatch.setattr(cpu, name, _AlignedOnly(getattr(cpu, name)))
    monkeypatch.setattr(cpu_pkg, "_sample", _AlignedOnly(cpu_pkg._sample))
    for name, f in calls.items():
        got = f(_unaligned(x), _unaligned(t), _unaligned(w), _unaligned(seeds))
        for g, v in zip(got, want[name]) if isinstance(got, tuple) else [(got, want[name])]:
            assert np.asarray(g).dtype == np.asarray(v).dtype, name
            np.testing.assert_array_equal(np.asarray(g, np.float64), np.asarray(v, np.float64), err_msg=name)


def test_streamed_chunks_and_accumulator_states_reach_the_kernels_aligned(rng, monkeypatch, tmp_path):
    """An accumulator's unaligned chunk or merged state, and the chunks of a row wider than the budget of
    an unaligned array (softmax's and sample's column passes), are read through aligned copies, with the
    results of aligned arrays."""
    import fastlogits.cpu as cpu_pkg
    from fastlogits.stream import accumulators, wide

    x = random_logits(rng, (3, 20000), np.float32)
    y = random_labels(rng, (3,), 20000)

    def run(x, m2, s2):
        acc = fl.stream.CrossEntropy(y, label_smoothing=0.1, reduction="none")
        acc.update(x[:, 100:], 100)
        acc.update(x[:, :100], 0)
        lse = fl.stream.LogSumExp(3)
        lse.update(x[:, :100], 0)
        lse.merge((m2, s2))
        src = fl.open(x, memory="64KiB")                 # a row is 80 KB: column passes
        return (acc.result(), lse.result(), fl.softmax(src, out=np.empty(x.shape, np.float32)),
                fl.sample(src, seed=3, top_p=0.9))

    m2, s2 = fl.stream.LogSumExp(3), None
    m2.update(x[:, 100:], 100)
    m2, s2 = m2.state.m, m2.state.s
    want = run(x, m2, s2)
    monkeypatch.setattr(accumulators, "_reduce", _AlignedOnly(accumulators._reduce))
    monkeypatch.setattr(cpu_pkg, "_maps", _AlignedOnly(cpu_pkg._maps))
    monkeypatch.setattr(wide, "_sample", _AlignedOnly(wide._sample))
    got = run(_unaligned(x), _unaligned(m2), _unaligned(s2))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_broadcast_rows(name, rng):
    """A zero-stride (read-only) view: every row is the same memory."""
    row = random_logits(rng, (300,), np.float32)
    x = np.broadcast_to(row, (6, 300))
    assert x.strides[0] == 0
    got = check(name, x, labels=_labels(name, rng, x), threads=2, **_ce(name))
    if name in ("logsumexp", "entropy", "argmax"):
        g = np.asarray(got)
        assert (g == g[0]).all()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_broadcast_columns(name, rng):
    """Zero stride along the vocabulary: a row of identical values (all ties)."""
    col = random_logits(rng, (4, 1), np.float32)
    x = np.broadcast_to(col, (4, 500))
    check(name, x, labels=_labels(name, rng, x), chunk_size=64, **_ce(name))


def test_lists_are_float64():
    got = np.asarray(fl.logsumexp([0.0, -40.0]))
    assert got.dtype == np.float64
    assert abs(float(got) - 4.248354255291589e-18) <= 1e-16
    np.testing.assert_allclose(np.asarray(fl.softmax([[0.0, 0.0], [1.0, 1.0]])), 0.5, rtol=1e-15)


def test_buffers_are_arrays(rng):
    """Objects NumPy reads through the buffer protocol are logits in memory: a 2-D memoryview was taken
    for an iterable of row blocks and iterated (NotImplementedError), an array.array row likewise."""
    import array

    x = rng.standard_normal((3, 7))
    np.testing.assert_array_equal(fl.logsumexp(memoryview(x)), fl.logsumexp(x))
    np.testing.assert_array_equal(fl.softmax(memoryview(x[::2])), fl.softmax(x[::2]))
    assert fl.logsumexp(array.array("d", x[1])) == fl.logsumexp(x[1])
    check("logsumexp", np.asarray(memoryview(x.astype(np.float32))))


@pytest.mark.parametrize("call_with", [
    (lambda m: fl.logsumexp(m), "logits", r"logits.filled\(-np.inf\)"),
    (lambda m: fl.softmax(m[None]), "logits", r"logits.filled\(-np.inf\)"),
    (lambda m: fl.open(m[None]), "logits", r"logits.filled\(-np.inf\)"),
    (lambda m: fl.logsumexp(iter([m[None]])), "logits", r"logits.filled\(-np.inf\)"),
    (lambda m: fl.cross_entropy(np.zeros((4, 3)), m.astype(np.int64) % 3), "labels",
     r"labels.filled\(ignore_index\)"),
    (lambda m: fl.cross_entropy(np.zeros((3, 4)), [0, 1, 2], weight=m), "weight", r"weight.filled"),
    (lambda m: fl.logsumexp(np.zeros((4, 3)), temperature=m + 1), "temperature", r"temperature.filled"),
    (lambda m: fl.sample(np.zeros((4, 3)), top_p=m * 0 + 0.5, seed=0), "top_p", r"top_p.filled"),
    (lambda m: fl.sample(np.zeros((4, 3)), seed=m.astype(np.int64) % 3), "seed", r"seed.filled"),
    (lambda m: fl.beam_search_step(np.zeros((4, 3)), m, 2), "beam_scores", r"beam_scores.filled")])
def test_masked_arrays_are_refused(call_with, rng):
    """np.asarray drops a masked array's mask (SciPy and PyTorch then compute over the masked entries as
    if they were data): the result of logsumexp over [1, --, 3] was log(e + e^2 + e^3). A masked array
    with a masked entry is refused, naming the argument and how to fill it."""
    f, name, fill = call_with
    m = np.ma.masked_array(rng.standard_normal(4), mask=[False, True, False, False])
    with pytest.raises(TypeError, match=f"{name} is a masked array, whose mask fastlogits would ignore; "
                                        f"fill the masked entries first: {fill}"):
        f(m)


def test_masked_arrays_with_nothing_masked_are_their_data(rng):
    """netCDF readers return masked arrays with no entry masked: nothing would be dropped, so they are read
    as their data, logits and every other argument."""
    x = rng.standard_normal((4, 9)).astype(np.float32)
    y = rng.integers(0, 9, 4)
    w = rng.uniform(0.5, 2, 9)
    t = rng.uniform(0.5, 2, 4)
    mk = lambda a: np.ma.masked_array(a, mask=False)        # noqa: E731
    np.testing.assert_array_equal(fl.logsumexp(mk(x), temperature=mk(t)), fl.logsumexp(x, temperature=t))
    np.testing.assert_array_equal(fl.cross_entropy(mk(x), mk(y), weight=mk(w), reduction="none"),
                                  fl.cross_entropy(x, y, weight=w, reduction="none"))
    np.testing.assert_array_equal(fl.sample(mk(x), top_p=mk(t / 2), seed=mk(np.arange(4))),
                                  fl.sample(x, top_p=t / 2, seed=np.arange(4)))
    np.testing.assert_array_equal(fl.logsumexp(fl.open(mk(x))), fl.logsumexp(x))


@pytest.mark.parametrize("threads", [3, 7, 64])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_more_threads_than_cores_or_rows(name, threads, rng):
    x = random_logits(rng, (5, 1000), np.float32)
    check(name, x, labels=_labels(name, rng, x), threads=threads, **_ce(name))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_chunk_larger_than_row(name, rng):
    x = random_logits(rng, (3, 100), np.float64)
    check(name, x, labels=_labels(name, rng, x), chunk_size=10**9, **_ce(name))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_one_long_row_two_threads(name, rng):
    """One row of a real vocabulary, split across threads (or not), chunked."""
    x = random_logits(rng, (1, 151936), np.float32, scale=4.0)
    check(name, x, labels=_labels(name, rng, x), threads=2, chunk_size=1000, **_ce(name))
    check(name, x[0], labels=np.int64(7) if name == "cross_entropy" else None, threads=2, **_ce(name))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_many_short_rows(name, rng):
    x = random_logits(rng, (20000, 3), np.float32)
    check(name, x, labels=_labels(name, rng, x), threads=2, k=2, **_ce(name))


def test_noncontiguous_labels_and_weights(rng):
    x = random_logits(rng, (6, 40), np.float32)
    y_big = random_labels(rng, (12,), 40)
    y = y_big[::-2]
    assert not y.flags.contiguous
    w_big = rng.uniform(0.5, 2.0, size=80)
    w = w_big[::2]
    for reduction in ("none", "mean", "sum"):
        check("cross_entropy", x, labels=y, weight=w, reduction=reduction, label_smoothing=0.1)
        check("cross_entropy", x, labels=y, weight=w.astype(np.float32), reduction=reduction)
    # labels for a (2, 3) block, in Fortran order
    x3 = random_logits(rng, (2, 3, 40), np.float64)
    y3 = np.asfortranarray(rng.integers(0, 40, size=(2, 3)))
    check("cross_entropy", x3, labels=y3, reduction="none")


def test_calls_from_many_python_threads(rng):
    """No shared scratch or global thread settings: concurrent calls give the sequential results."""
    xs = [
        random_logits(rng, (8, 3000 + 17 * i), [np.float32, np.float64, BF16, np.float16][i % 4])
        for i in range(8)
    ]
    ys = [rng.integers(0, x.shape[1], size=8) for x in xs]

    def work(i):
        x, y = xs[i], ys[i]
        kw = dict(threads=1 + i % 2, chunk_size=[None, 7, 100, 1][i % 4])
        return (
            np.asarray(fl.logsumexp(x, **kw)),
            np.asarray(fl.softmax(x, **kw)),
            np.asarray(fl.cross_entropy(x, y, reduction="none", **kw)),
            np.asarray(fl.top_k(x, 5, **kw)[1]),
            np.asarray(fl.entropy(x, **kw)),
        )

    want = [work(i) for i in range(len(xs))]
    with ThreadPoolExecutor(max_workers=4) as ex:
        for _ in range(3):
            got = list(ex.map(work, range(len(xs))))
            for g, w in zip(got, want, strict=True):
                for a, b in zip(g, w, strict=True):
                    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_temperature_as_float32_array_and_numpy_scalar(name, rng):
    x = random_logits(rng, (4, 50), np.float32)
    labels = _labels(name, rng, x)
    check(name, x, labels=labels, temperature=np.float32(0.75), **_ce(name))
    check(name, x, labels=labels, temperature=np.array([0.5, 1.0, 2.0, 4.0], dtype=np.float32), **_ce(name))


@pytest.mark.parametrize("name", ["top_k", "top_k_logprobs"])
def test_k_as_numpy_integer(name, rng):
    x = random_logits(rng, (3, 20), np.float32)
    check(name, x, k=np.int64(4))
    check(name, x, k=np.int32(20))


def test_dtype_given_as_string(rng):
    x = random_logits(rng, (3, 20), np.float32)
    assert np.asarray(fl.softmax(x, dtype="float64")).dtype == np.float64
    assert np.asarray(fl.log_softmax(x, dtype="float16")).dtype == np.float16
    check("softmax", x, dtype=np.dtype("float64"))


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["0", "2x0", "0x3"])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_no_rows(name, lead):
    """Zero rows: empty results of the right shape and dtype (a mean over no rows is NaN, a sum 0)."""
    x = np.zeros(lead + (10,), dtype=np.float32)
    if name == "cross_entropy":
        y = np.zeros(lead, dtype=np.int64)
        np.testing.assert_array_equal(np.asarray(fl.cross_entropy(x, y, reduction="none")), np.zeros(lead))
        assert np.asarray(fl.cross_entropy(x, y, reduction="none")).shape == lead
        assert float(fl.cross_entropy(x, y, reduction="sum")) == 0.0
        assert np.isnan(fl.cross_entropy(x, y, reduction="mean"))
        return
    got = call(name, x, k=3)
    if name in ("top_k", "top_k_logprobs"):
        assert np.asarray(got[0]).shape == lead + (3,) and np.asarray(got[1]).shape == lead + (3,)
        assert np.asarray(got[1]).dtype == np.int64
    elif name in ("softmax", "log_softmax"):
        assert np.asarray(got).shape == x.shape and np.asarray(got).dtype == np.float32
    else:
        assert np.asarray(got).shape == lead


def test_empty_vocabulary_logsumexp():
    """REFERENCES.md: logsumexp of an empty row is -inf (SciPy); raising a ValueError is acceptable too."""
    x = np.zeros((3, 0), dtype=np.float32)
    try:
        got = np.asarray(fl.logsumexp(x))
    except ValueError:
        return
    np.testing.assert_array_equal(got, np.full(3, -np.inf))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_python_number_arguments(name, rng):
    """An int temperature, an int softcap, an int array of temperatures."""
    x = random_logits(rng, (3, 40), np.float32)
    labels = _labels(name, rng, x)
    check(name, x, labels=labels, temperature=2, **_ce(name))
    check(name, x, labels=labels, softcap=3, **_ce(name))
    check(name, x, labels=labels, temperature=np.array([1, 2, 3]), **_ce(name))


def test_the_kernels_refuse_what_is_not_two_dimensional():
    """The Cython kernels read a block's shape and strides from the buffer protocol: anything but a 2-D
    (rows, V) array is refused there, not read past its one or three axes."""
    from fastlogits.cpu import _reduce

    for x in (np.zeros(5, np.float32), np.zeros((2, 3, 4), np.float32)):
        with pytest.raises(ValueError, match=f"2-D \\(rows, V\\) array, got {x.ndim} axes"):
            _reduce.lse(x, 2, np.ones(2), 0.0, np.empty(2), 16, 1)


def test_a_temperature_of_one_is_a_shared_read_only_array(monkeypatch, rng):
    """A scalar temperature of 1 (every call's default) is a view of one shared array of ones, not a fresh
    array a call (its pages cost as many faults as the result's); it cannot be written, other temperatures
    are fresh arrays, and rows past the shared size get a fresh one. Results are those of explicit ones."""
    from fastlogits.ops import _prep

    monkeypatch.setattr(_prep, "_ones", np.ones(0))     # (earlier calls grew the shared array: start anew)
    a = _prep.temperatures(1.0, (7,), 7)
    b = _prep.temperatures(1, (5,), 5)          # (the same array: at least as long)
    assert np.shares_memory(a, b) and not a.flags.writeable and np.all(a == 1.0) and a.dtype == np.float64
    with pytest.raises(ValueError):
        a[0] = 2.0
    t = _prep.temperatures(0.5, (5,), 5)
    assert t.flags.writeable and np.all(t == 0.5)
    monkeypatch.setattr(_prep, "ONES_MAX", 8)
    big = _prep.temperatures(1.0, (9,), 9)
    assert not np.shares_memory(big, a) and np.all(big == 1.0)
    x = rng.standard_normal((9, 40)).astype(np.float32)
    np.testing.assert_array_equal(fl.logsumexp(x), fl.logsumexp(x, temperature=np.ones(9)))
    np.testing.assert_allclose(fl.logsumexp(x), ref.logsumexp(x), rtol=2e-6)


def test_bfloat16_works_with_ml_dtypes_imported_late(tmp_path):
    """`import fastlogits` leaves ml_dtypes (0.6 s of its 0.75 s import) until bfloat16 is needed: in fresh
    processes, a bfloat16 array made after it (its output bfloat16 too) and a raw file declared bfloat16
    both work, with their values right."""
    import subprocess
    import sys

    x = np.random.default_rng(5).standard_normal((3, 7)).astype(np.float32)
    want = ref.logsumexp(x.astype(BF16).astype(np.float64))
    path = str(tmp_path / "x.bin")
    x.astype(BF16).tofile(path)
    start = "import sys\nimport numpy as np\nimport fastlogits as fl\nassert 'ml_dtypes' not in sys.modules\n"
    array = ("import ml_dtypes\n"
             f"x = np.fromfile({path!r}, ml_dtypes.bfloat16).reshape(3, 7)\n"
             "print(np.asarray(fl.logsumexp(x), np.float64).tolist(), fl.log_softmax(x).dtype)\n")
    source = (f"src = fl.open({path!r}, dtype='bfloat16', vocab=7)\n"
              "print(np.asarray(fl.logsumexp(src), np.float64).tolist())\n")
    for code in (array, source):
        out = subprocess.run([sys.executable, "-c", start + code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        values, dtype = out.stdout.strip().rsplit("]", 1)
        np.testing.assert_allclose(eval(values + "]"), want, rtol=2e-6)
        assert dtype.strip() == ("bfloat16" if code is array else "")


def test_a_cpu_call_ignores_a_gpu_backend_another_thread_is_importing(monkeypatch):
    """While one thread's first GPU call imports the GPU backend, the module sits half-initialized in
    sys.modules: CPU calls in other threads must not touch it (they ordered, at their end, GPU streams they
    never used, and raised AttributeError after computing their result)."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "fastlogits.gpu.backend", types.ModuleType("fastlogits.gpu.backend"))
    x = np.random.default_rng(8).standard_normal((5, 33))
    np.testing.assert_allclose(fl.logsumexp(x, backend="cpu"), ref.logsumexp(x), rtol=1e-13)
    y = np.array([0, 3, 32, 1, 7])
    np.testing.assert_allclose(fl.cross_entropy(x, y, reduction="none"),
                               ref.logsumexp(x) - x[np.arange(5), y], rtol=1e-12)
