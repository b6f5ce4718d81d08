"""Shared test set-up: offline, quiet, small."""

import os
from pathlib import Path

import pytest
from support.models import log_tiny_pyfunc

# No test may reach a model hub or phone home; set before any library reads them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> dict:
    """A tiny model logged as a pyfunc in a fresh SQLite store, with a few demo images and its predictions."""
    return log_tiny_pyfunc(tmp_path_factory)
