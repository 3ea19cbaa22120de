"""Fixtures shared by the platform tests that train through the CLI or the LightningModule."""

from __future__ import annotations

import pytest

from .platform_utils import single_thread, write_corpus


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the machines running CI share two cores between processes."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, request):
    """A small text corpus written once per module: CORPUS_DOCS documents where the module sets it."""
    n_docs = getattr(request.module, "CORPUS_DOCS", None)
    folder = tmp_path_factory.mktemp("corpus")
    return write_corpus(folder) if n_docs is None else write_corpus(folder, n_docs=n_docs)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store folder per module (each test its own experiment): creating the tables costs seconds."""
    return tmp_path_factory.mktemp("store")
