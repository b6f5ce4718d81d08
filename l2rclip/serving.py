"""The l2rclip model as an MLflow pyfunc: what `mlflow models serve` and `mlflow.pyfunc.load_model` run.

The pyfunc is a thin shell around `Predictor`: its only artifact is an l2rclip model folder (with
the prototypes cached, so serving never runs the text tower), and its input is a DataFrame with
an `image` column of base64-encoded image files, which is what a JSON request to `/invocations`
can carry. A pytorch-flavour model would take tensors (and by default demands an input example to
infer them); an image service wants files in and a table out, so we log a pyfunc whose signature
is inferred from a real request and its real answer, stored with it as the example request.

The logged model imports `l2rclip` when loaded (no code is copied into it), so serve it where
l2rclip is installed: `mlflow models serve -m models:/<name>@champion --env-manager local`.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.pyfunc import PythonModel, PythonModelContext
from PIL import Image

from l2rclip.data.validate import load_rgb
from l2rclip.predict import Predictor, mlflow_store
from l2rclip.tracking import default_tracking_uri

log = logging.getLogger(__name__)

INPUT_COLUMN = "image"
MODEL_ARTIFACT = "model"
# Installed distributions the pyfunc needs at load time, pinned to the versions that logged it.
_REQUIRED = ("l2rclip", "mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "pandas", "pillow")


def encode_image(image: Image.Image) -> str:
    """A PIL image as base64 PNG text, the form the pyfunc's `image` column takes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: str) -> Image.Image:
    """Base64 text of an image file -> upright RGB image (raises on bad base64 or bad image bytes)."""
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error as error:
        raise ValueError(f"expected base64 text of an image file, found invalid base64 ({error})") from None
    return load_rgb(io.BytesIO(data))


def predict_frame(predictor: Predictor, model_input: pd.DataFrame) -> pd.DataFrame:
    """The pyfunc's prediction: one row per input row, probabilities included, JSON-safe.

    Missing values (the prediction columns of an undecodable row) become None, because the
    scoring server writes the table as JSON, where NaN is invalid and pandas' NA cannot be written.

    Raises:
        ValueError: `model_input` has no `image` column.
    """
    if INPUT_COLUMN not in model_input.columns:
        raise ValueError(f"expected a DataFrame with an {INPUT_COLUMN!r} column of base64-encoded images; "
                         f"found columns {', '.join(map(str, model_input.columns)) or '(none)'}")
    images = model_input[INPUT_COLUMN].tolist()
    table = predictor.predict(images, decode_image, [f"image[{i}]" for i in range(len(images))],
                              with_probabilities=True, progress=False)
    return table.astype(object).where(table.notna(), None)


class L2RCLIPModel(PythonModel):
    """MLflow pyfunc: base64 images in an `image` column -> the Predictor's table."""

    def load_context(self, context: PythonModelContext) -> None:
        """Load the l2rclip model folder logged as the `model` artifact (prototypes cached)."""
        self.predictor = Predictor.load(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Predict every row of `model_input` (see `predict_frame`)."""
        return predict_frame(self.predictor, model_input)


def requirements() -> list[str]:
    """Pip requirements of the logged model: the distributions it imports, at the versions here."""
    return [f"{name}=={version(name).split('+')[0]}" for name in _REQUIRED]


def log_pyfunc(model_dir: str | Path, run_id: str, tracking_uri: str | None = None,
               artifact_path: str = "model", calibration: dict[str, Any] | None = None) -> str:
    """Log an l2rclip model folder as a pyfunc model under an existing run; returns its model URI.

    Args:
        model_dir: the model folder (or any URI `Predictor.load` accepts).
        run_id: the run to log under (e.g. the pipeline's parent run); it is ended afterwards.
        tracking_uri: MLflow store (default: `default_tracking_uri()`).
        artifact_path: the logged model's name within the run.
        calibration: a conformal calibration (`Calibration.to_dict`) stored with the model, so
            the served table carries the interval columns.

    Returns:
        The logged model's URI (`models:/<model_id>`), ready for registration or loading.
    """
    predictor = Predictor.load(model_dir, device="cpu", calibration=calibration)
    example = pd.DataFrame({INPUT_COLUMN: [encode_image(Image.new("RGB", (64, 64), (128, 128, 128)))]})
    with warnings.catch_warnings():  # MLflow's hint on missing integers concerns enforced inputs, not outputs
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(example, predict_frame(predictor, example).infer_objects())
    with tempfile.TemporaryDirectory(prefix="l2rclip-pyfunc-") as tmp:
        folder = predictor.save(Path(tmp) / "l2rclip-model")
        with mlflow_store(tracking_uri or default_tracking_uri()), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name=artifact_path, python_model=L2RCLIPModel(),
                                           artifacts={MODEL_ARTIFACT: str(folder)}, signature=signature,
                                           input_example=example,
                                           pip_requirements=requirements(), code_paths=None)
    log.info("logged %s as pyfunc model %s under run %s", model_dir, info.model_uri, run_id)
    return info.model_uri
