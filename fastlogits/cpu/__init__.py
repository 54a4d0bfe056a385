"""The CPU backend: Cython kernels over the C core in ``fastlogits/include``."""
