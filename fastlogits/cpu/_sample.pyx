# cython: language_level=3
"""Sampling on the CPU (being written)."""
