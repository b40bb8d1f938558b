"""Shared fixtures: a temporary MLflow store per test, one local Ray instance per session, tiny data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(autouse=True, scope="session")
def decoded_data_cache(tmp_path_factory):
    """Decoded image folders are cached in a folder of the test session, never in the user's ~/.cache."""
    os.environ["CNNOPT_CACHE"] = str(tmp_path_factory.mktemp("cnnopt-cache"))


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store; the test runs in its own working directory."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance, sized for the 2-core CI machine, shared by every test that needs it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_data():
    """The real digits data, loaded once."""
    from cnnopt.experiment.config import DataConfig
    from cnnopt.data.datasets import load_data

    return load_data(DataConfig())
