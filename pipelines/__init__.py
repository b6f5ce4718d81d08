"""Prefect flows around the DVC pipeline: Prefect decides *when* and *where*, DVC what to rebuild.

Flows (each also a command, `python -m pipelines.<name> --help`):
    pipeline    `dvc repro` with retries on transient failures; returns the cross-validated report.
    ablation    variants of the params as DVC experiments, compared in a table and a plot.
    retrain     rebuild when data, params or code changed, then promote the new model only when it
                beats the champion on the same test images.
    deploy      serve `retrain` on a cron schedule, or register it and `experiment` on a process
                work pool run by `prefect worker start` (needs a running `prefect server start`).
    fanout      `experiment`: one DVC experiment per work-pool run, so an ablation trains on N machines.
    folds       one experiment's folds as fanned-out experiments, summarised as the report stage does.

The package sets the quiet defaults of `pipelines.settings` first, before a flow module imports
Prefect, MLflow or DVC.
"""

from pipelines.settings import apply_quiet_defaults

apply_quiet_defaults()
