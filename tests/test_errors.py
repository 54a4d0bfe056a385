"""Bad arguments raise clear errors that name the argument; the caller's logits are never written to."""

import re

import numpy as np
import pytest

import fastlogits as fl
from tests.helpers import BF16, DTYPE_IDS, DTYPES, FUNCTIONS, MAPS, assert_unchanged, call, random_logits

# ------------------------------------------------------------------------------------------------ arguments


def _args(name, x):
    """Positional extras for ``name``: k for the top-k functions, labels for cross_entropy."""
    lead, n = x.shape[:-1], x.shape[-1]
    return dict(k=min(2, n), labels=np.zeros(lead, dtype=np.int64))


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, -np.inf], ids=["zero", "negative", "nan", "-inf"])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_bad_temperature(name, bad):
    x = np.ones((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="temperature"):
        call(name, x, temperature=bad, **_args(name, x))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_bad_temperature_per_row(name):
    x = np.ones((3, 5), dtype=np.float32)
    for t in (np.array([1.0, 0.0, 1.0]), np.array([1.0, 2.0, np.nan]), np.array([-1.0, 1.0, 1.0])):
        with pytest.raises(ValueError, match="temperature"):
            call(name, x, temperature=t, **_args(name, x))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_temperature_of_wrong_shape(name):
    x = np.ones((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="temperature"):
        call(name, x, temperature=np.ones(4), **_args(name, x))


@pytest.mark.parametrize("bad", [0.0, -2.0, np.nan])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_bad_softcap(name, bad):
    """API.md: softcap is None or a float c > 0."""
    x = np.ones((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="softcap"):
        call(name, x, softcap=bad, **_args(name, x))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128,
                                   np.longdouble, np.object_])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_non_float_logits(name, dtype):
    x = np.ones((3, 5), dtype=dtype)
    kind = {"i": "integer ", "u": "integer ", "b": "bool ", "c": "complex "}.get(np.dtype(dtype).kind, "")
    with pytest.raises(TypeError, match=rf"^logits must be floating point \(float16, bfloat16, float32 or "
                                        rf"float64\), got {kind}dtype {np.dtype(dtype)}$"):
        call(name, x, **_args(name, x))


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_two_byte_integer_logits_point_to_the_bfloat16_declaration(name, dtype):
    """bfloat16 bits held as uint16 or int16 (a raw dump, a framework's view): the TypeError says how to
    declare them (fastlogits.open(x, dtype="bfloat16")), and the declared array gives the bfloat16
    results."""
    bits = np.random.default_rng(0).standard_normal((3, 5)).astype(BF16).view(dtype)
    with pytest.raises(TypeError, match=rf"got integer dtype {np.dtype(dtype)}; bfloat16 bits held as "
                                        r"2-byte integers are declared so with "
                                        r"fastlogits.open\(x, dtype='bfloat16'\)$"):
        call(name, bits, **_args(name, bits))
    np.testing.assert_array_equal(fl.logsumexp(fl.open(bits, dtype="bfloat16")),
                                  fl.logsumexp(bits.view(BF16)))


@pytest.mark.parametrize("kind", ["float8", "sparse", "meta"])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_unreadable_torch_tensor_names_the_argument(name, kind):
    """A PyTorch tensor NumPy cannot hold (float8, sparse, on the meta device) raises PyTorch's TypeError
    with the argument's name in front."""
    torch = pytest.importorskip("torch")
    t = {"float8": lambda: torch.ones(2, 3).to(torch.float8_e4m3fn),
         "sparse": lambda: torch.ones(2, 3).to_sparse(),
         "meta": lambda: torch.ones(2, 3, device="meta")}[kind]()
    with pytest.raises(TypeError, match=r"^logits: a Tensor that cannot be read as an array \(.+\)$"):
        call(name, t, **_args(name, np.zeros((2, 3))))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_python_int_list_logits(name):
    x = [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(TypeError, match="logits"):
        call(name, x, **_args(name, np.zeros((2, 3))))


@pytest.mark.parametrize("bad", [0, -1, -7])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_bad_chunk_size(name, bad):
    x = np.ones((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        call(name, x, chunk_size=bad, **_args(name, x))


@pytest.mark.parametrize("k", [-1, -(2**70), 6, 100])
@pytest.mark.parametrize("name", ["top_k", "top_k_logprobs"])
def test_bad_k(name, k):
    x = np.ones((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"\bk\b"):
        getattr(fl, name)(x, k)


@pytest.mark.parametrize("bad", [np.array(2.5), np.array([1, 2]), np.float64(2.0), np.True_],
                         ids=["0-d float array", "1-d int array", "numpy float", "numpy bool"])
def test_integer_arguments_refuse_arrays_that_are_not_one_integer(bad):
    """k, threads, chunk_size, ignore_index and beam_width take an int, a NumPy int or a 0-d integer
    array; a float array (which has __index__, raising only when called) is refused naming the argument,
    never truncated: ignore_index=np.array(0.5) silently ignored the rows labelled 0."""
    x = np.zeros((2, 5), np.float32)
    y = np.array([0, 1])
    calls = {"k": lambda v: fl.top_k(x, v), "threads": lambda v: fl.logsumexp(x, threads=v),
             "chunk_size": lambda v: fl.logsumexp(x, chunk_size=v),
             "ignore_index": lambda v: fl.cross_entropy(x, y, ignore_index=v, reduction="none"),
             "beam_width": lambda v: fl.beam_search_step(x, np.zeros(2), v)}
    for name, f in calls.items():
        with pytest.raises(TypeError, match=rf"^{name} must be "):
            f(bad)
    assert fl.top_k(x, np.array(2))[1].shape == (2, 2)        # a 0-d integer array is an integer
    got = fl.cross_entropy(x, y, ignore_index=np.int32(0), reduction="none")
    np.testing.assert_allclose(got, [0.0, np.log(5)], rtol=1e-6)


@pytest.mark.parametrize("source", ["array", "blocks", "accumulator"])
def test_ragged_labels_name_the_argument(source):
    x = np.zeros((2, 5), np.float32)
    ragged = [[0, 1], [2]]
    with pytest.raises(ValueError, match="^labels: a list or tuple is read as one array, and this one is"):
        if source == "accumulator":
            fl.stream.CrossEntropy(ragged)
        else:
            fl.cross_entropy(x if source == "array" else iter([x]), ragged)


def test_label_out_of_range_names_value_and_row():
    x = np.zeros((8, 10), dtype=np.float32)
    y = np.arange(8) % 10
    y[5] = 999
    with pytest.raises((ValueError, IndexError), match="999") as info:
        fl.cross_entropy(x, y)
    assert re.search(r"\b5\b", str(info.value)), f"the row index 5 is not in: {info.value}"


def test_negative_label_names_value_and_row():
    x = np.zeros((8, 10), dtype=np.float64)
    y = np.zeros(8, dtype=np.int64)
    y[6] = -7
    with pytest.raises((ValueError, IndexError), match="-7") as info:
        fl.cross_entropy(x, y, reduction="none")
    assert re.search(r"\b6\b", str(info.value)), f"the row index 6 is not in: {info.value}"


def test_label_equal_to_vocab_size():
    x = np.zeros((3, 10), dtype=np.float32)
    with pytest.raises((ValueError, IndexError), match="10"):
        fl.cross_entropy(x, np.array([0, 10, 1]), reduction="sum")


def test_label_out_of_range_multi_dim():
    x = np.zeros((2, 3, 4), dtype=np.float32)
    y = np.zeros((2, 3), dtype=np.int64)
    y[1, 2] = 4444
    with pytest.raises((ValueError, IndexError), match="4444"):
        fl.cross_entropy(x, y)


@pytest.mark.parametrize("shape", [(4,), (3, 1), (2,), (6,), ()])
def test_labels_of_wrong_shape(shape):
    x = np.zeros((3, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="labels"):
        fl.cross_entropy(x, np.zeros(shape, dtype=np.int64))


@pytest.mark.parametrize("source", ["array", "blocks", "accumulator"])
@pytest.mark.parametrize("bad", [None, np.array([0.5, 1.0, 2.0]), np.array([True, False, True]), 1.5],
                         ids=["None", "floats", "bools", "a float"])
def test_labels_that_are_not_integers(source, bad):
    """A TypeError naming labels and their dtype, before any shape check, wherever labels are taken (the
    accumulator checked the shape first: CrossEntropy(None) said 'must be 1-D'; found by an API audit)."""
    x = np.zeros((3, 10), dtype=np.float32)
    with pytest.raises(TypeError, match=r"^labels must be integers \(class indices\), got dtype "):
        if source == "accumulator":
            fl.stream.CrossEntropy(bad)
        else:
            fl.cross_entropy(x if source == "array" else iter([x]), bad)


def test_weight_of_wrong_length():
    x = np.zeros((3, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="weight"):
        fl.cross_entropy(x, np.array([0, 1, 2]), weight=np.ones(9))


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_label_smoothing(bad):
    x = np.zeros((3, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="label_smoothing"):
        fl.cross_entropy(x, np.array([0, 1, 2]), label_smoothing=bad)


def test_bad_reduction():
    x = np.zeros((3, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="reduction"):
        fl.cross_entropy(x, np.array([0, 1, 2]), reduction="average")


@pytest.mark.parametrize("name", FUNCTIONS)
def test_zero_dim_logits(name):
    with pytest.raises((ValueError, TypeError), match="logits"):
        call(name, np.float32(1.0), k=1, labels=np.int64(0))


def test_gpu_backend_without_gpu_says_why():
    if "gpu" in fl.available_backends():
        pytest.skip("this machine has a GPU backend")
    x = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(RuntimeError) as info:
        fl.logsumexp(x, backend="gpu")
    assert len(str(info.value)) > 10


def test_unknown_backend():
    x = np.ones((2, 3), dtype=np.float32)
    with pytest.raises((ValueError, RuntimeError), match="backend|tpu"):
        fl.logsumexp(x, backend="tpu")


# ------------------------------------------------------------------------------------------------ no writes


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_logits_never_written(name, dtype, rng):
    x = random_logits(rng, (4, 97), dtype)
    x[0, 3] = -np.inf
    x[1, 4] = np.nan
    keep = x.copy()
    y = rng.integers(0, 97, size=4)
    for kw in (dict(), dict(temperature=0.5, softcap=3.0), dict(chunk_size=7, threads=2)):
        call(name, x, k=5, labels=y, **kw)
        assert_unchanged(x, keep, f"{name} {kw}")
    if name in MAPS:
        call(name, x, out=np.empty_like(x), temperature=np.array([0.5, 1, 2, 3]))
        assert_unchanged(x, keep, f"{name} out=")
        call(name, x, dtype=np.float64)
        assert_unchanged(x, keep, f"{name} dtype=")
    if name == "cross_entropy":
        call(name, x, labels=y, label_smoothing=0.1, weight=np.ones(97), z_loss=1e-3, reduction="none")
        assert_unchanged(x, keep, f"{name} smoothing")


def test_read_only_logits_accepted(rng):
    x = random_logits(rng, (3, 50), BF16)
    x.setflags(write=False)
    y = np.array([1, 2, 3])
    for name in FUNCTIONS:
        call(name, x, k=3, labels=y)
