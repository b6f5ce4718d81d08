"""Screenshots of the MLflow and Prefect UIs for the docs, taken with headless Chromium.

    python docs/screenshots/take.py --store mlflow.db --experiment l2rclip-demo \
        --prefect-api http://127.0.0.1:4200/api --out docs/screenshots

It starts `mlflow server` on the SQLite store (a free port on 127.0.0.1), finds the pipeline's
parent run, the fold run that holds the registered model and the model version of the
`champion` alias, and photographs their pages; with `--prefect-api` (a running `prefect server
start`, which serves its UI at the API's host) it photographs the newest flow run that has
artifacts and the newest artifact of each key (decision, report, tables). Chromium comes from the Debian package (`apt install chromium`);
nothing here needs a network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float = 90) -> None:
    """Poll `url` until it answers 200, or fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


def shoot(url: str, path: Path, height: int = 1400) -> Path:
    """Render `url` in headless Chromium (JavaScript run for up to 20 s of virtual time) into `path`."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise FileNotFoundError("expected Chromium on PATH (Debian: apt install chromium); found none")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1500,{height}", "--virtual-time-budget=20000", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"{path}: {url}")
    return path


def mlflow_pages(store: Path, experiment: str, out: Path) -> None:
    """The parent run, the fold run holding the registered model, and the champion version."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                               f"sqlite:///{store.resolve()}", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/health")
        client = MlflowClient(base)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"experiment {experiment!r} is not in {store}")
        eid = found.experiment_id
        parents = client.search_runs([eid], "tags.`l2rclip.pipeline_key` != ''", order_by=["start_time DESC"],
                                     max_results=1)
        if not parents:
            raise ValueError(f"experiment {experiment!r} in {store} has no pipeline run")
        shoot(f"{base}/#/experiments/{eid}/runs", out / "mlflow_experiment_runs.png")
        shoot(f"{base}/#/experiments/{eid}/runs/{parents[0].info.run_id}", out / "mlflow_parent_run.png")
        versions = client.search_model_versions(order_by=["creation_timestamp DESC"], max_results=1)
        if versions:
            version = versions[0]
            shoot(f"{base}/#/experiments/{eid}/runs/{version.run_id}", out / "mlflow_fold_run.png")
            shoot(f"{base}/#/models/{version.name}/versions/{version.version}", out / "mlflow_model_version.png")
    finally:
        server.terminate()
        server.wait(timeout=30)


def prefect_page(api: str, out: Path) -> None:
    """The newest flow run with artifacts, and the newest artifact of each key (the UI is served beside the API).

    The server must have been started with `PREFECT_UI_API_URL` set to `api` when its port is not
    4200, or the UI looks for the API at 4200 and renders an error.
    """
    os.environ["PREFECT_API_URL"] = api
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = [a for a in client.read_artifacts(limit=50) if a.flow_run_id]
    if not artifacts:
        raise ValueError(f"no flow run with artifacts on {api}")
    newest = max(artifacts, key=lambda a: a.created).flow_run_id
    ui = api.removesuffix("/api")
    shoot(f"{ui}/runs/flow-run/{newest}", out / "prefect_flow_run.png")
    latest = {a.key: a for a in sorted(artifacts, key=lambda a: a.created)}  # the newest of each key
    for key, artifact in latest.items():
        shoot(f"{ui}/artifacts/artifact/{artifact.id}", out / f"prefect_artifact_{key}.png")


def main() -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=Path("mlflow.db"), help="MLflow SQLite store")
    parser.add_argument("--experiment", default="l2rclip-demo", help="MLflow experiment name")
    parser.add_argument("--prefect-api", help="a running Prefect server's API URL")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"), help="folder for the PNGs")
    args = parser.parse_args()
    mlflow_pages(args.store, args.experiment, args.out)
    if args.prefect_api:
        prefect_page(args.prefect_api, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
