"""Shared fixtures and marker behaviour.

- ``realdata``: tests that read the real scanner series under ``../shared/data`` (beside the checkout); skipped when
  that folder is absent, since the project must pass its tests on a fresh clone without it.
- ``gpu``: skipped when CUDA is not available.
- ``slow``: tests over ~10 s on 2 idle cores (counting module/session fixture set-up they alone pay for); run by
  default, deselected by ``make test-fast`` (``-m "not slow"``).

Fixtures shared by several modules: ``shared_data``, ``one_thread``, ``deid_key``, ``s3`` (a local S3-compatible
server), ``prepared_env`` / ``evaluated`` (ingested 3D + 2D segmentation sites, then evaluated fake predictions) and
``cls_env`` (an ingested classification task). Their data builders are plain functions in ``tests/helpers/``; a test
module never imports another test module (``tests/test_layout_of_tests.py``).
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


# ---- shared fixtures (test modules never import each other: data builders are in tests/helpers/) -------------------
@pytest.fixture
def s3(monkeypatch):
    """A local S3-compatible server (moto) on 127.0.0.1 at a free port, empty but for the bucket ``helpers.s3.BUCKET``;
    the AWS_* variables point every client of the test at it. Yields a boto3 client. Skips without moto."""
    moto_server = pytest.importorskip("moto.server")
    import urllib.request

    from helpers.s3 import BUCKET

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        # moto keeps its state per process, not per server: start from an empty store
        urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")).read()
        for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        from siteadapt.kfp.locations import s3_client

        client = s3_client()
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        server.stop()


@pytest.fixture
def prepared_env(tmp_path, deid_key):
    """Settings of a 3D heart task (MR-like source ``src``, CT-like target ``tgt``) and a 2D lungs site ``xa``, all
    three ingested under tmp_path (6 subjects each); nothing preprocessed yet."""
    from helpers.sites import heart_xr_settings, write_volume_site, write_xr_site
    from siteadapt.steps.ingest import ingest

    write_volume_site(tmp_path / "raw/src", 6, "MR", 0)
    write_volume_site(tmp_path / "raw/tgt", 6, "CT", 1)
    write_xr_site(tmp_path / "raw/xa", 6)
    s = heart_xr_settings(tmp_path)
    for name, site in s.sites.items():
        ingest(site.images, name, s.paths.ingested, labels=site.labels, modality=site.modality,
               pixel_spacing_mm=site.pixel_spacing_mm)
    return s


@pytest.fixture
def cls_env(tmp_path, deid_key):
    """A classification task ingested under tmp_path: ``ad`` (20 PNGs, labels.csv with rows to reject) and ``ped``
    (40 PNGs in a folder per class plus an unlabeled one). Returns (settings, ingest results, ad's and ped's classes)."""
    from helpers.sites import PNEUMONIA_CLASSES, pneumonia_settings, write_png_site_csv, write_png_site_folders
    from siteadapt.steps.ingest import ingest

    ys_ad = write_png_site_csv(tmp_path / "raw/ad", 20, 0)
    ys_ped = write_png_site_folders(tmp_path / "raw/ped", 40, 1)
    s = pneumonia_settings(tmp_path)
    res = {n: ingest(site.images, n, s.paths.ingested, labels=site.labels, modality=site.modality,
                     pixel_spacing_mm=site.pixel_spacing_mm, classes=PNEUMONIA_CLASSES)
           for n, site in s.sites.items()}
    return s, res, ys_ad, ys_ped


@pytest.fixture
def evaluated(prepared_env):
    """``prepared_env`` with the target ``tgt`` preprocessed, hand-made predictions of four methods (supervised
    perfect, the others shifted or eroded; sifa with two seeds) and each evaluated: the input of report tests."""
    from helpers.sites import fake_predictions
    from siteadapt.steps.evaluate import evaluate
    from siteadapt.steps.preprocess import preprocess

    s = prepared_env
    s = s.model_copy(update={"paths": s.paths.model_copy(update={
        "predictions": s.paths.prepared.parent / "pred", "metrics": s.paths.prepared.parent / "metrics",
        "reports": s.paths.prepared.parent / "reports"})})
    preprocess(s, "tgt")
    fake_predictions(s, "tgt", "supervised")  # perfect
    fake_predictions(s, "tgt", "noadapt", shift=6)
    fake_predictions(s, "tgt", "histmatch", erode=1, shift=3)
    fake_predictions(s, "tgt", "sifa", erode=1)
    fake_predictions(s, "tgt", "sifa", seed=7, erode=1, shift=1)
    for m in ("supervised", "noadapt", "histmatch", "sifa"):
        evaluate(s, "tgt", m)
    evaluate(s, "tgt", "sifa", seed=7)
    return s
