"""The l2rclip model as an MLflow pyfunc: what `mlflow models serve` and `mlflow.pyfunc.load_model` run.

The pyfunc is a thin shell around `Predictor`: its only artifact is an l2rclip model folder (with
the prototypes cached, so serving never runs the text tower), and its input is a DataFrame with
an `image` column of base64-encoded image files, which is what a JSON request to `/invocations`
can carry. A pytorch-flavour model would take tensors (and by default demands an input example to
infer them); an image service wants files in and a table out, so we log a pyfunc whose signature
is inferred from a real request and its real answer, stored with it as the example request.

The pyfunc is logged as MLflow "models from code": the logged model holds the source file
`l2rclip/serving/served_model.py` (three lines that import `L2RCLIPModel`), not a cloudpickle of the
object. Loading a pickle runs whatever code it holds, so anyone who can write the artifact store
could run code on the server; loading this model runs only readable source (the weights are
safetensors, the config JSON). That source is carried by the model itself: the l2rclip package
goes in as MLflow `code_paths`, and its requirements are the distributions the served code
imports, pinned to the versions that logged it (`l2rclip.serving.environment`), so the model
installs wherever MLflow deploys: `mlflow models serve -m models:/<name>@champion` with
`--env-manager virtualenv` (MLflow's default), `uv` or `local`, or `mlflow models
generate-dockerfile` (docs/deployment.md).

Request limits (`RequestLimits`: rows, bytes of base64 image text, pixels per image) are the
logged model's `model_config`, so the server applies the limits the model was registered with.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.tracking import MlflowClient
from PIL import Image

from l2rclip.config import DataConfig, ServingConfig
from l2rclip.data.validate import DEFAULT_MAX_PIXELS, load_rgb
from l2rclip.serving.environment import PACKAGE_DIR, requirements
from l2rclip.serving.predictor import Predictor, mlflow_store
from l2rclip.tracking.runs import default_tracking_uri

log = logging.getLogger(__name__)

INPUT_COLUMN = "image"
MODEL_ARTIFACT = "model"
MODEL_CODE = Path(__file__).with_name("served_model.py")  # the models-from-code file MLflow logs


def encode_image(image: Image.Image) -> str:
    """A PIL image as base64 PNG text, the form the pyfunc's `image` column takes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the served model (params `serving.*`, `data.max_image_pixels`).

    `mlflow models serve` reads the whole body before the model sees it and has no body cap of
    its own; these limits bound the work and memory a request can cause once it is read (the
    proxy in front bounds the body itself, docs/serving.md). Stored as the logged model's `model_config`.
    """

    max_rows: int = ServingConfig.max_rows
    max_request_bytes: int = ServingConfig.max_request_bytes
    max_image_pixels: int = DataConfig.max_image_pixels

    def __post_init__(self) -> None:
        keys = {
            "max_rows": "serving.max_rows",
            "max_request_bytes": "serving.max_request_bytes",
            "max_image_pixels": "data.max_image_pixels",
        }
        for name, key in keys.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected a positive integer, found {value!r}")

    def check(self, images: list[Any]) -> None:
        """Refuse a request with too many rows or too much image text, before decoding any of it.

        Raises:
            MlflowException: INVALID_PARAMETER_VALUE, which the scoring server answers with 400.
        """
        if len(images) > self.max_rows:
            raise MlflowException.invalid_parameter_value(
                f"expected at most serving.max_rows = {self.max_rows} images per request, found "
                f"{len(images)}; send them in several requests"
            )
        size = sum(len(image) for image in images if isinstance(image, str))
        if size > self.max_request_bytes:
            raise MlflowException.invalid_parameter_value(
                f"expected at most serving.max_request_bytes = {self.max_request_bytes} bytes of base64 "
                f"image text per request, found {size}; send fewer or smaller images per request"
            )


def decode_image(text: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Base64 text of an image file -> upright RGB image (raises on bad base64, bad bytes, too many pixels)."""
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error as error:
        raise ValueError(f"expected base64 text of an image file, found invalid base64 ({error})") from None
    return load_rgb(io.BytesIO(data), max_pixels=max_pixels)


def predict_frame(
    predictor: Predictor, model_input: pd.DataFrame, limits: RequestLimits | None = None
) -> pd.DataFrame:
    """The pyfunc's prediction: one row per input row, probabilities included, JSON-safe.

    Missing values (the prediction columns of an undecodable row) become None, because the
    scoring server writes the table as JSON, where NaN is invalid and pandas' NA cannot be written.
    Images are decoded under the predictor's pixel limit; an image over it gets its error on its
    own row, like any unreadable image.

    Raises:
        MlflowException: no `image` column, or the request breaks `limits` (default: the
            params defaults); the scoring server answers 400 with the message.
    """
    if INPUT_COLUMN not in model_input.columns:
        raise MlflowException.invalid_parameter_value(
            f"expected a DataFrame with an {INPUT_COLUMN!r} column of base64-encoded images; "
            f"found columns {', '.join(map(str, model_input.columns)) or '(none)'}"
        )
    images = model_input[INPUT_COLUMN].tolist()
    (limits or RequestLimits()).check(images)
    table = predictor.predict(
        images,
        partial(decode_image, max_pixels=predictor.max_pixels),
        [f"image[{i}]" for i in range(len(images))],
        with_probabilities=True,
        progress=False,
    )
    return table.astype(object).where(table.notna(), None)


class L2RCLIPModel(PythonModel):
    """MLflow pyfunc: base64 images in an `image` column -> the Predictor's table."""

    def load_context(self, context: PythonModelContext) -> None:
        """Load the `model` artifact (prototypes cached) under the limits in the model config."""
        self.limits = RequestLimits(**(context.model_config or {}))
        self.predictor = Predictor.load(context.artifacts[MODEL_ARTIFACT], max_pixels=self.limits.max_image_pixels)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Predict every row of `model_input` (see `predict_frame`)."""
        return predict_frame(self.predictor, model_input, self.limits)


def log_pyfunc(
    model_dir: str | Path,
    run_id: str,
    tracking_uri: str | None = None,
    artifact_path: str = "model",
    limits: RequestLimits | None = None,
    calibration: dict[str, Any] | None = None,
) -> str:
    """Log an l2rclip model folder as a models-from-code pyfunc of an existing run; returns its URI.

    The logged model's source run is `run_id` and the run lists it among its outputs (MLflow's
    model <-> run link). MLflow logs a model only into the active run, so the run is started
    again for it and ended afterwards; a run that had ended gets back its status and end time
    (a fold run's duration stays its training's, not the time until registration).

    Args:
        model_dir: the model folder (or any URI `Predictor.load` accepts).
        run_id: the run that produced the model (the fold run that trained it); ended afterwards.
        tracking_uri: MLflow store (default: `default_tracking_uri()`).
        artifact_path: the logged model's name within the run.
        limits: request limits the served model applies (default: the params defaults), stored
            as the model's `model_config`.
        calibration: a conformal calibration (`Calibration.to_dict`) stored with the model, so
            the served table carries the interval columns.

    Returns:
        The logged model's URI (`models:/<model_id>`), ready for registration or loading.
    """
    limits = limits or RequestLimits()
    predictor = Predictor.load(
        model_dir, device="cpu", max_pixels=limits.max_image_pixels, calibration=calibration
    )
    example = pd.DataFrame({INPUT_COLUMN: [encode_image(Image.new("RGB", (64, 64), (128, 128, 128)))]})
    with warnings.catch_warnings():  # MLflow's hint on missing integers concerns enforced inputs, not outputs
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(example, predict_frame(predictor, example, limits).infer_objects())
    with tempfile.TemporaryDirectory(prefix="l2rclip-pyfunc-") as tmp:
        folder = predictor.save(Path(tmp) / "l2rclip-model")
        uri = tracking_uri or default_tracking_uri()
        before = MlflowClient(uri).get_run(run_id).info
        with mlflow_store(uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=artifact_path,
                python_model=str(MODEL_CODE),
                artifacts={MODEL_ARTIFACT: str(folder)},
                model_config=asdict(limits),
                signature=signature,
                input_example=example,
                pip_requirements=requirements(),
                code_paths=[str(PACKAGE_DIR)],
            )
    if before.end_time:  # the run had ended: put its status and end back (reopening it changed them)
        MlflowClient(uri).set_terminated(run_id, before.status, end_time=before.end_time)
    log.info("logged %s as pyfunc model %s under run %s", model_dir, info.model_uri, run_id)
    return info.model_uri
