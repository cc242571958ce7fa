"""Shared test set-up: CPU-only machines interpret Triton kernels; GPU tests skip cleanly."""
from __future__ import annotations

import os
import zlib

import torch

# Triton reads this at import time: set it before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), "build", "inductor-cache"))

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI (CI=true, as .ci/run runs under it) draws the same examples on every run: a property test that
# fails there fails on every rerun, and a new counterexample turns up on a developer's machine, where
# the default profile draws fresh ones (and keeps them in .hypothesis/ to replay).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Each test draws from torch's global RNG as if it ran alone: a draw no longer depends on which
    tests ran before it, so a failure reproduces with `pytest NODEID` (FASTFACE_TEST_SEED shifts all)."""
    base = int(os.environ.get("FASTFACE_TEST_SEED", "0"))
    torch.manual_seed(base + zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on the shared 2-core box two made tiny ops and networks ~30x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
