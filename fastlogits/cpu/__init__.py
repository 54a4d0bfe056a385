"""The CPU backend: Cython kernels over the C core in ``fastlogits/include``."""
import importlib.util as _util
import os as _os

if _util.find_spec("fastlogits.cpu._reduce") is None:
    # fastlogits imported from a source tree whose kernels were never built: most often Python started in
    # a clone after `pip install .`, where the clone hides the installed package (NumPy says as much)
    raise ImportError(
        f"fastlogits' compiled kernels are not built in {_os.path.dirname(_os.path.abspath(__file__))}. "
        "If that is a source tree, it hides an installed fastlogits when Python starts there: run Python "
        "from another directory, or build the kernels in place with pip install -e . (or python setup.py "
        "build_ext --inplace).")
