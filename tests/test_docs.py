"""The Examples sections of the public docstrings run and print what they say (numpydoc style, as SciPy's
are checked): a documented value that drifted from the code's fails here."""
import doctest
import importlib

import pytest

MODULES = ["fastlogits.ops.reductions", "fastlogits.ops.selection", "fastlogits.ops.sampling",
           "fastlogits.stream.accumulators"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see above)"


def _readme_blocks():
    import os
    import re

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(path, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_readme_api_tour_runs():
    """README's first example (the API tour) runs as written, and its comments' claims hold (a new-user
    audit found an example in the prose that did not run: cross_entropy([[3e38, -3e38, 3e38]], 2))."""
    import numpy as np

    import fastlogits as fl

    tour = _readme_blocks()[0]
    assert tour.startswith("import numpy as np, fastlogits as fl")
    ns = {}
    exec(compile(tour, "README.md", "exec"), ns)
    x, acc = ns["x"], ns["acc"]
    got = acc.result()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, fl.logsumexp(x), rtol=16 * 2.0**-23)
    assert len(acc.state) == 2
    np.testing.assert_allclose(fl.cross_entropy([3e38, -3e38, 3e38], 2), np.log(2), rtol=1e-6)


def test_readme_numba_example_runs():
    import numpy as np

    pytest.importorskip("numba")
    block = next(b for b in _readme_blocks() if "def mean_nll" in b)
    ns = {}
    exec(compile(block, "README.md", "exec"), ns)
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    y = np.array([0, 5, 39])
    import fastlogits as fl

    np.testing.assert_allclose(ns["mean_nll"](x, y), fl.cross_entropy(x, y), rtol=1e-6)


ROW_FUNCTIONS = ["logsumexp", "entropy", "softmax", "log_softmax", "cross_entropy", "argmax", "top_k",
                 "top_k_logprobs", "sample", "beam_search_step"]


@pytest.mark.parametrize("name", ROW_FUNCTIONS)
def test_every_parameter_is_documented(name):
    """help() explains every argument of the public row functions (numpydoc "name : ..." entries; the
    shared ones put there by fastlogits.ops._doc.shared_params, whose markers must all be used)."""
    import inspect
    import re

    import fastlogits as fl

    fn = getattr(fl, name)
    doc = inspect.getdoc(fn)
    assert "{" + "shared}" not in doc and not re.search(r"^\{\w+\}$", doc, re.M), doc
    section = doc.split("Parameters\n----------\n", 1)[1]
    documented = set(re.findall(r"^(\w+) :", section, re.M))
    missing = [p for p in inspect.signature(fn).parameters if p not in documented]
    assert not missing, f"{name}: {missing} not in its Parameters section"


@pytest.mark.parametrize("name", ["LogSumExp", "CrossEntropy", "Entropy", "TopK"])
def test_every_accumulator_option_is_documented(name):
    """help() of an accumulator explains every argument of its constructor (it named none of temperature,
    softcap, threads and chunk_size; found by a docs audit)."""
    import inspect
    import re

    import fastlogits as fl

    cls = getattr(fl.stream, name)
    doc = inspect.getdoc(cls)
    assert "{options}" not in doc, doc
    documented = set(re.findall(r"^(\w+) :", doc.split("Parameters\n----------\n", 1)[1], re.M))
    missing = [p for p in inspect.signature(cls).parameters if p not in documented]
    assert not missing, f"{name}: {missing} not in its Parameters section"
    assert not documented - set(inspect.signature(cls).parameters), documented
