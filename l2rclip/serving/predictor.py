"""The model a user loads: predict images, folders and CSV lists with a saved or registered model.

A `Predictor` wraps one l2rclip model folder (local, or fetched from MLflow by a `runs:/` or
`models:/` URI), computes the rank prototypes once at load, and turns images into the same table
the evaluate stage writes (`l2rclip.evaluation.predictions.predictions_table`), one row per input in input
order. An input that cannot be read gets its error on its own row and the rest go on: in a
folder of ten thousand photos one truncated file must not cost the other 9,999 predictions.

Prediction streams: `Predictor.stream` yields the table batch by batch while threads read the next
batches (`l2rclip.serving.reading`), and `write_rows` appends each batch to a temporary file that
replaces the output only when complete, so a folder of any size runs in bounded memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from l2rclip.data.sources.base import list_files
from l2rclip.data.store import ImageStore
from l2rclip.data.validate import DEFAULT_MAX_PIXELS, check_max_pixels, to_rgb
from l2rclip.evaluation.conformal import Calibration, ConformalError
from l2rclip.evaluation.predictions import batch_outputs, predictions_table
from l2rclip.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, ModelFileError, load_model, save_model
from l2rclip.models.heads import OrdinalHeadModel
from l2rclip.models.kinds import backbone_label
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.runtime import pick_device
from l2rclip.serving.reading import Batch, PathReader, Read, prediction_store, read_batches

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("runs:/", "models:/")
# Keys of load_model's metadata that save_model writes itself or that are live objects, not JSON.
_REBUILT_META = frozenset({"format", "version", "model", "ranks", "rank_space", "config", "recipe", "preprocess"})


def resolve_model_dir(uri: str, tracking_uri: str | None = None, download_to: str | Path | None = None) -> Path:
    """The local l2rclip model folder behind `uri`.

    A local folder is used as is (or searched, when it is a downloaded MLflow model that holds the
    folder as an artifact). `runs:/<run_id>/<path>`, `models:/<name>@<alias>` and
    `models:/<name>/<version>` are downloaded first, since the pyfunc model logged by
    `l2rclip.serving.registry` keeps the l2rclip folder inside its artifacts.

    Args:
        uri: a folder, or an MLflow `runs:/` or `models:/` URI.
        tracking_uri: MLflow store, also the model registry, for URIs (default:
            `l2rclip.tracking.runs.default_tracking_uri()`).
        download_to: where MLflow URIs are downloaded (default: a new temporary folder that the
            caller owns).

    Raises:
        ModelFileError: nothing at `uri`, or no (or more than one) l2rclip model inside it.
    """
    if not uri.startswith(MLFLOW_SCHEMES):
        return _find_model_folder(Path(uri), uri)
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from l2rclip.tracking.runs import default_tracking_uri

    store = tracking_uri or default_tracking_uri()
    target = Path(download_to) if download_to else Path(tempfile.mkdtemp(prefix="l2rclip-model-"))
    try:
        with mlflow_store(store):  # models:/ URIs are resolved against MLflow's global registry URI
            local = download_artifacts(artifact_uri=uri, dst_path=str(target))
    except MlflowException as error:
        if not download_to:
            shutil.rmtree(target, ignore_errors=True)
        raise ModelFileError(f"{uri}: cannot fetch the model from MLflow at {store}: {error.message}") from None
    return _find_model_folder(Path(local), uri)


@contextmanager
def mlflow_store(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking (and so registry) URI at `uri` for a block, then restore it exactly.

    Some MLflow calls take no store argument (`log_model`, resolving `models:/` URIs), so the global
    must be switched. MLflow's own switch also writes `MLFLOW_TRACKING_URI` into the environment and
    unsets it on the way back; the variable is put back as it was, so that no later code (and no
    later stage in this process) sees another store.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _find_model_folder(root: Path, uri: str) -> Path:
    """`root` when it is a model folder, else the one model folder somewhere under it."""
    expected = f"an l2rclip model folder ({CONFIG_FILE} + {WEIGHTS_FILE}) or an MLflow model holding one"
    if not root.exists():
        raise ModelFileError(f"{uri}: expected {expected}; nothing exists at {root}")
    if (root / CONFIG_FILE).is_file():
        return root
    found = sorted(path.parent for path in root.rglob(CONFIG_FILE) if (path.parent / WEIGHTS_FILE).is_file())
    if len(found) != 1:
        what = "none" if not found else f"{len(found)}: {', '.join(map(str, found))}"
        raise ModelFileError(f"{uri}: expected {expected}; found {what} under {root}")
    return found[0]


def _read_json(path: Path) -> Any:
    """A JSON file's content, with the path in the error when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"expected a calibration JSON file at {path}; nothing is there") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConformalError(f"{path}: expected a JSON calibration, found unreadable text ({error})") from None


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Image paths from image files, folders (recursive, sorted) and CSV lists with a `path` column.

    Paths that do not exist are kept, and a folder gives every file in it (other types, dangling
    symlinks, symlink loops too), so that each is reported on its own row with its reason
    (`unsupported_extension`, `dangling_symlink`, ...) rather than silently dropped. Relative paths
    in a CSV start from the CSV's folder, so a list travels with its images.

    Raises:
        ValueError: a CSV file that cannot be read as a table with a `path` column (named).
    """
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(list_files(item))  # non-images too: each gets its reason on its row
        elif item.suffix.lower() == ".csv" and item.is_file():
            paths.extend(item.parent / path for path in _listed_paths(item))
        else:
            paths.append(item)
    return paths


def _listed_paths(listing: Path) -> list[str]:
    """The `path` column of a CSV list; errors name the file (pandas' own do not)."""
    expected = "expected a CSV with a `path` column"
    try:
        table = pd.read_csv(listing, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{listing}: {expected}; found an empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"{listing}: {expected}; found unreadable text ({error})") from None
    if "path" not in table.columns:
        raise ValueError(f"{listing}: {expected}; found columns {', '.join(table.columns) or '(none)'}")
    return table["path"].tolist()


def check_output_file(path: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
    """`path` as the output file, once it is known that a file can be written there.

    Checked before any work, so that an hour of predictions is not lost to a typo: not a folder,
    not one of the `inputs` (which would be overwritten), an existing file writable, and the
    nearest existing parent a folder this process may create files in.

    Raises:
        ValueError: why no file can be written at `path`.
    """
    out = Path(path)
    why = f"cannot write the predictions to {out}"
    if out.is_dir():
        raise ValueError(f"{why}: expected a file name, found a folder")
    if out.exists() and any(out.resolve() == Path(item).resolve() for item in inputs):
        raise ValueError(f"{why}: it is one of the inputs, which would be overwritten")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"{why}: the file exists and is not writable")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{why}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{why}: no permission to create files in {parent}")
    return out


@dataclass
class WrittenRows:
    """What `write_rows` wrote: row counts and the first failed row, not the rows themselves."""

    rows: int = 0
    failed: int = 0
    example: tuple[str, str] | None = None  # (path, error) of the first row with an error

    def add(self, chunk: pd.DataFrame) -> None:
        """Count the rows of `chunk` (a predictions table with `path` and `error`)."""
        failed = chunk[chunk["error"] != ""]
        if self.example is None and not failed.empty:
            self.example = (str(failed["path"].iloc[0]), str(failed["error"].iloc[0]))
        self.rows += len(chunk)
        self.failed += len(failed)


def write_rows(chunks: Iterable[pd.DataFrame], out: Path) -> WrittenRows:
    """Write tables with the same columns as one CSV at `out`, each as it comes, atomically.

    The rows go to a temporary file beside `out` (same folder: `os.replace` is atomic there),
    appended chunk by chunk, so nothing is kept in memory; it replaces `out` only when the last
    chunk is written. On any error or Ctrl+C the temporary file is removed and an old `out` stays
    as it was. No chunk at all gives an empty file.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    written, first = WrittenRows(), True
    try:
        for chunk in chunks:
            chunk.to_csv(temporary, mode="w" if first else "a", header=first, index=False, float_format="%.6g")
            written.add(chunk)
            first = False
        if first:
            temporary.touch()
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return written


def write_table(table: pd.DataFrame, out: Path) -> None:
    """Write `table` as CSV at `out` atomically: a complete new file or the old one untouched."""
    write_rows([table], out)


class Predictor:
    """A loaded model with its prototypes cached, predicting tables of images.

    Args:
        model: L2RCLIP (its prototypes are cached here unless the file had them) or an ordinal
            head baseline (no prototypes).
        meta: `load_model`'s metadata (`rank_space`, `preprocess`, `config`, ...); a `conformal`
            entry (a registered model's calibration) adds the interval columns to predictions.
        device: where to run.
        amp: mixed precision on CUDA, as the evaluate stage uses by default; ignored elsewhere.
        max_pixels: decompression-bomb limit of every image read (`data.max_image_pixels`).
        alpha: the intervals' level (default: the calibration's first); needs a calibration.

    Raises:
        ConformalError: `alpha` without a calibration, or one the calibration cannot support.
    """

    def __init__(
        self,
        model: L2RCLIP | OrdinalHeadModel,
        meta: dict[str, Any],
        device: torch.device,
        amp: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        alpha: float | None = None,
    ):
        self.max_pixels = check_max_pixels(max_pixels)
        self.model = model.eval()
        self.meta = meta
        self.rank_space = meta["rank_space"]
        self.transform = meta["preprocess"]
        self.device = device
        self.amp = amp
        self.calibration = (
            Calibration.from_dict(meta["conformal"], "the model's conformal calibration")
            if meta.get("conformal")
            else None
        )
        if self.calibration is None and alpha is not None:
            raise ConformalError(
                f"alpha {alpha} was asked for, but the model has no conformal calibration; "
                "use a registered model (it carries its fold's calibration) or pass the "
                "calibrate stage's calibration.json"
            )
        self.alpha = self.calibration.resolve_alpha(alpha) if self.calibration else None
        model.cache_prototypes()  # (M, E): the only text-tower pass this predictor makes (if any)

    @classmethod
    def load(
        cls,
        uri: str | Path,
        device: str = "auto",
        tracking_uri: str | None = None,
        amp: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        alpha: float | None = None,
        calibration: str | Path | dict[str, Any] | None = None,
    ) -> Predictor:
        """Load a model folder or an MLflow `runs:/` / `models:/` URI (see `resolve_model_dir`).

        `calibration` (a calibrate stage's calibration.json, or its content) replaces the model's
        own, e.g. for a fold's `best/` folder, which has none until it is registered.
        """
        torch_device = pick_device(device)
        with tempfile.TemporaryDirectory(prefix="l2rclip-model-") as download:
            model, meta = load_model(resolve_model_dir(str(uri), tracking_uri, download), device=torch_device)
        if label := backbone_label(meta):  # the demo CLIP or random weights: say which
            log.warning("%s: %s", uri, label)
        if calibration is not None:
            where = "calibration" if isinstance(calibration, dict) else str(calibration)
            data = calibration if isinstance(calibration, dict) else _read_json(Path(calibration))
            meta["conformal"] = Calibration.from_dict(data, where).to_dict()
        return cls(model, meta, torch_device, amp, max_pixels, alpha)

    def save(self, folder: str | Path) -> Path:
        """Write the model with its cached prototypes, so that a loader never runs the text tower."""
        extra = {key: value for key, value in self.meta.items() if key not in _REBUILT_META}
        return save_model(self.model, folder, self.meta["config"], self.rank_space, extra=extra)

    def open_store(self, folder: str | Path) -> ImageStore:
        """The preprocess stage's image store at `folder`, if it can stand in for this model's files.

        Raises:
            StoreError: why not (see `l2rclip.serving.reading.prediction_store`).
        """
        return prediction_store(folder, self.meta["recipe"])

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 64,
        num_workers: int | str | None = 0,
        with_probabilities: bool = False,
        progress: bool = True,
        store: ImageStore | None = None,
    ) -> pd.DataFrame:
        """Predict image files; one row per path, in input order (see `predict`, `stream_paths`)."""
        return self._table(self.stream_paths(paths, batch_size, num_workers, with_probabilities, progress, store))

    def stream_paths(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 64,
        num_workers: int | str | None = 0,
        with_probabilities: bool = False,
        progress: bool = True,
        store: ImageStore | None = None,
    ) -> Generator[pd.DataFrame, None, None]:
        """`stream` over image files, reading from `store` (an `open_store`) the files it holds unchanged."""
        reader = PathReader(paths, self.transform, self.max_pixels, store)
        yield from self._stream(
            reader, [str(p) for p in paths], batch_size, num_workers, with_probabilities, progress
        )
        if store is not None:
            log.info("%d of %d images read from the image store %s", reader.from_store, len(paths), store.folder)

    def predict_images(
        self, images: Sequence[Image.Image], with_probabilities: bool = False, batch_size: int = 64
    ) -> pd.DataFrame:
        """Predict in-memory PIL images (path column `image[<i>]`), without a progress bar."""
        return self.predict(
            list(images),
            to_rgb,
            [f"image[{i}]" for i in range(len(images))],
            batch_size,
            with_probabilities=with_probabilities,
            progress=False,
        )

    def predict(
        self,
        items: Sequence[Any],
        read: Callable[[Any], Image.Image],
        names: Sequence[str],
        batch_size: int = 64,
        num_workers: int | str | None = 0,
        with_probabilities: bool = False,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Predict any inputs that `read` turns into PIL images: the whole table of `stream`."""
        return self._table(self.stream(items, read, names, batch_size, num_workers, with_probabilities, progress))

    def stream(
        self,
        items: Sequence[Any],
        read: Callable[[Any], Image.Image],
        names: Sequence[str],
        batch_size: int = 64,
        num_workers: int | str | None = 0,
        with_probabilities: bool = False,
        progress: bool = True,
    ) -> Generator[pd.DataFrame, None, None]:
        """The prediction table of any inputs that `read` turns into PIL images, one chunk per batch.

        Args:
            items: the inputs (paths, images, encoded strings...).
            read: input -> PIL image; called on reading threads (must be thread-safe).
            names: the `path` column, one per input.
            batch_size: images per forward pass.
            num_workers: threads reading and transforming inputs ahead of the model (None: one
                per CPU, `auto`: as data loaders; 0: in this thread, between batches).
            with_probabilities: add one probability column per rank, named by its label
                (`p_<label>`, e.g. `p_20` for age 20; `RankSpace.probability_columns`).
            progress: show a progress bar.

        Yields:
            Consecutive rows of the table, in input order, one chunk per batch: `path`,
            `pred_rank` (nullable int), `pred_label`, `pred_name`, `pred_value`, `expected_value`,
            `std`, `entropy`, `confidence`, with a calibration `interval_low`, `interval_high`
            (labels), `interval_low_value`, `interval_high_value` and `interval_level`, the
            `p_<label>` columns when asked, and `error` ("" when the input was read, else why
            not; its prediction columns are then empty). The index is the input position.
        """
        return self._stream(
            lambda position: self.transform(read(items[position])),
            names,
            batch_size,
            num_workers,
            with_probabilities,
            progress,
            count=len(items),
        )

    def _stream(
        self,
        read: Read,
        names: Sequence[str],
        batch_size: int,
        num_workers: int | str | None,
        with_probabilities: bool,
        progress: bool,
        count: int | None = None,
    ) -> Generator[pd.DataFrame, None, None]:
        """`stream` of the inputs that `read` gives by position, one per name."""
        if count is not None and len(names) != count:
            raise ValueError(f"predict: expected one name per input, found {len(names)} for {count}")
        text_features = self.model.prototypes()  # (M, E), cached: no text-tower pass
        empty = np.empty((0, len(self.rank_space)))
        failed = 0
        with (
            tqdm(total=len(names), desc="predicting", unit="img", disable=not progress) as bar,
            closing(read_batches(len(names), read, batch_size, num_workers)) as batches,
        ):
            for batch in batches:
                probs, point = (empty, None)  # a batch of unreadable inputs only
                if batch.images is not None:
                    probs, point = batch_outputs(  # (B_ok, M), (B_ok,) or None
                        self.model, {"images": batch.images}, self.device, self.amp, text_features
                    )
                failed += len(batch.errors)
                bar.update(len(batch.positions))
                yield self._rows(batch, names, probs, point, with_probabilities)
        if failed:
            log.warning("%d of %d inputs could not be read (see the error column)", failed, len(names))

    def _rows(
        self,
        batch: Batch,
        names: Sequence[str],
        probs: np.ndarray,
        point: np.ndarray | None,
        with_probabilities: bool,
    ) -> pd.DataFrame:
        """The table rows of one batch: predictions of the read inputs, errors of the others."""
        paths = pd.Series([str(names[i]) for i in batch.positions], index=batch.positions)
        found = predictions_table(
            pd.DataFrame({"path": paths.loc[batch.good]}),
            probs,
            self.rank_space,
            with_probabilities,
            self.calibration,
            self.alpha,
            point,
        )
        labels = [c for c in ("pred_label", "interval_low", "interval_high") if c in found.columns]
        found = found.astype(dict.fromkeys(labels, object)).set_axis(batch.good).reindex(batch.positions)
        found["path"] = paths
        found["pred_rank"] = found["pred_rank"].astype("Int64")
        found["error"] = [batch.errors.get(i, "") for i in batch.positions]
        return found

    def _table(self, chunks: Iterable[pd.DataFrame]) -> pd.DataFrame:
        """The whole table of a stream (empty, with its columns, for no input)."""
        parts = list(chunks)
        if not parts:
            return self._rows(Batch([]), [], np.empty((0, len(self.rank_space))), None, False)
        return pd.concat(parts, ignore_index=True)
