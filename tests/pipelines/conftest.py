"""The Prefect server every flow test of this folder reports to by default."""

from pathlib import Path

import pytest
from prefect.settings import PREFECT_HOME, temporary_settings
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="session")
def harness(prefect_home):
    """Flows run against a temporary Prefect server (started once: it takes seconds).

    A test that starts a server of its own still asks for this one: outside its `reporting_to`
    block the process then has an API to report to, where Prefect would otherwise start an
    unmanaged ephemeral server for late events and stop it only at interpreter exit.
    """
    with (
        temporary_settings(updates={PREFECT_HOME: prefect_home}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        yield
