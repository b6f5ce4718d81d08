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


@pytest.fixture
def simulated_hub(tmp_path_factory, monkeypatch):
    """A simulated connected user: a private, offline Hugging Face cache (see tests/simulated_hub.py).

    `simulated_hub.add(arch, tag)` puts random weights where open_clip looks for the tag's.
    """
    from support.simulated_hub import install

    return install(tmp_path_factory.mktemp("hf_home"), monkeypatch)


@pytest.fixture
def tiny_tags(simulated_hub, tmp_path_factory, monkeypatch):
    """A tiny GELU architecture with two registered tags whose weights are in the simulated cache:
    `sim_quickgelu` (trained with QuickGELU) and `sim_laion` (mean/std 0.5, bilinear)."""
    from support.simulated_hub import TINY_GELU_ARCH, register_tiny_tags

    tags = register_tiny_tags(tmp_path_factory.mktemp("arch"), monkeypatch)
    for seed, tag in enumerate(tags):
        simulated_hub.add(TINY_GELU_ARCH, tag, seed=seed)
    return TINY_GELU_ARCH, tags
