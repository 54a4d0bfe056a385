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
