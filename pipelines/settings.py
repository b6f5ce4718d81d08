"""Quiet, offline-safe defaults for the tools the flows embed, set before any of them is imported.

`pipelines/__init__.py` applies them, so every flow module (and a worker or `serve` process that
loads one) has them, not only a shell that ran the Makefile. Each is a default: a variable the
user exported wins.
    * Prefect's server analytics, DO_NOT_TRACK (Prefect and others), MLflow's telemetry and DVC's
      analytics are off: offline they only log connection errors, online they report usage.
    * A flow started without `PREFECT_API_URL` runs against a temporary local server that Prefect
      starts for that call; on a loaded machine it can take longer than Prefect's default timeout.

Prefect reads its settings when it is imported, so this module imports nothing but `os`.
"""

from __future__ import annotations

import os

QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def apply_quiet_defaults() -> None:
    """Set each of `QUIET_DEFAULTS` in this process's environment unless it is already set."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
