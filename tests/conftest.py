"""Fixtures: a per-test random generator whose seed a failure reports, awkward inputs, hypothesis.

Replay a failure with the seed from its report: ``FASTLOGITS_TEST_SEED=<seed> pytest tests -k <test>``.
"""

import os
import secrets

import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a test requirement, but keep the rest usable
    settings = None

SEED_KEY = pytest.StashKey[int]()

if settings is not None:
    settings.register_profile(
        "fastlogits",
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
    settings.register_profile("thorough", parent=settings.get_profile("fastlogits"), max_examples=400)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastlogits"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than about 10 s (deselect with -m 'not slow')")


def pytest_report_header(config):
    fixed = os.environ.get("FASTLOGITS_TEST_SEED")
    if fixed:
        return f"rng seed fixed by FASTLOGITS_TEST_SEED={fixed}"
    return "rng: a fresh random seed per test, reported on failure (replay with FASTLOGITS_TEST_SEED=<seed>)"


@pytest.fixture
def rng(request):
    """``np.random.Generator`` seeded per test from a random seed that a failure's report prints."""
    fixed = os.environ.get("FASTLOGITS_TEST_SEED")
    seed = int(fixed) if fixed else secrets.randbits(64)
    request.node.stash[SEED_KEY] = seed
    return np.random.default_rng(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.failed and SEED_KEY in item.stash:
        seed = item.stash[SEED_KEY]
        rep.sections.append(
            ("rng seed", f"this test's seed: {seed}; replay with FASTLOGITS_TEST_SEED={seed}")
        )
    return rep


@pytest.fixture
def awkward():
    """``awkward(dtype, n=37)`` -> dict of awkward rows (huge, infinities, NaN, ties, dominant logit ...)."""
    from tests.helpers import awkward_rows

    return awkward_rows
