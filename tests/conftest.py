"""Shared fixtures and marker behaviour.

- ``realdata``: tests that read the real scanner series under ``../shared/data`` (beside the checkout); skipped when
  that folder is absent, since the project must pass its tests on a fresh clone without it.
- ``gpu``: skipped when CUDA is not available.
- ``slow``: long tests; run by default, deselect with ``-m 'not slow'``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_real = pytest.mark.skip(reason=f"real data folder absent: {SHARED_DATA}")
    have_real = (SHARED_DATA / "dicom").is_dir()
    cuda = None
    for item in items:
        if "gpu" in item.keywords:
            if cuda is None:
                cuda = _cuda_available()
            if not cuda:
                item.add_marker(skip_gpu)
        if "realdata" in item.keywords and not have_real:
            item.add_marker(skip_real)


@pytest.fixture
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when it is absent."""
    if not (SHARED_DATA / "dicom").is_dir():
        pytest.skip(f"real data folder absent: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module): tiny
    convolutions gain nothing from a second thread, and on a shared 2-core machine two OpenMP threads per process
    make every test several times slower under load."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def deid_key(monkeypatch):
    """A fixed de-identification key for tests (never a file inside the outputs)."""
    monkeypatch.setenv("SITEADAPT_DEID_KEY", "test-key-not-secret")
    return "test-key-not-secret"
