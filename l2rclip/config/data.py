"""The data sections of params.yaml: `ranks`, `data`, `split` and `preprocess`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Interval
from pydantic import Strict, model_validator

from l2rclip.config.fields import (
    SECTION,
    Bool,
    Count,
    Float,
    Int,
    NonNegative,
    NonNegativeInt,
    Str,
)

Label = Int | Float | Str  # a rank label is a scalar: an age, a decade, a group name


@dataclass(frozen=True)
class RanksConfig:
    """The ordered classes: an integer range `start..stop` or an explicit `labels` list."""

    __pydantic_config__ = SECTION

    start: Int | None = 1
    """First integer label (ignored when `labels` is given)."""
    stop: Int | None = 10
    """Last integer label, included."""
    labels: tuple[Label, ...] | None = None
    """Explicit labels in rank order, e.g. Adience's age groups (null: start..stop)."""
    values: tuple[Float, ...] | None = None
    """Numeric value of each label (null: the label itself, which must then be numeric)."""
    names: Str | tuple[Str, ...] = "words"
    """Rank names in prompts: `words` (number words of the values), `labels` (labels as text) or a list."""
    name_format: Str = "{}"
    """Wraps each name, e.g. "{}s" turns "1950" into "1950s"."""
    unit: Str = ""
    """Unit of the values on figure axes ("years" -> "true value (years)"); "" for unitless ranks."""


@dataclass(frozen=True)
class DemoConfig:
    """The embedded generated counting set (1..10 objects per image)."""

    __pydantic_config__ = SECTION

    n_per_rank: Count = 60
    """Generated images per count 1..10."""
    image_size: Count = 96
    """Side of the generated square images, in pixels."""


@dataclass(frozen=True)
class DataConfig:
    """Where images and labels come from, and what to do with bad rows."""

    __pydantic_config__ = SECTION

    source: Str = "demo"
    """demo | csv | folder | fgnet | utkface | morph | adience | hci | aesthetics | clap2015."""
    root: Str = "data/demo"
    """Image root (for demo: where the generated set is written); DVC tracks it."""
    list_file: Str | None = None
    """Label/split list for csv and benchmark sources."""
    on_bad: Literal["skip", "fail"] = "skip"
    """skip: report bad rows and go on | fail: stop at the first bad row."""
    decode_workers: Count | None = None
    """Threads decoding images during validation (decoding releases the GIL; null: one per CPU)."""
    max_image_pixels: Count = 89_478_485
    """Decompression-bomb limit (width x height) in prepare, predict and serving (default: PIL's)."""
    category: Str | None = None
    """Keep one category of a source with several (aesthetics: animals | nature | people | urban); null: all."""
    demo: DemoConfig = field(default_factory=DemoConfig)
    """The generated demo set."""
    allow_outside_root: Bool = False
    """false: a listed path leaving `root` (../x.png, an absolute path elsewhere) is a bad row."""
    duplicates: Literal["drop_conflicts", "keep_first", "fail"] = "drop_conflicts"
    """Identical files (same bytes) with different labels: keep none | keep the first row | stop."""


@dataclass(frozen=True)
class SplitConfig:
    """How images are divided into train / val / test (and calib), per fold."""

    __pydantic_config__ = SECTION

    protocol: Literal["kfold", "given", "repeats", "logo"] = "kfold"
    """kfold (grouped, stratified) | given (the source's folds) | repeats | logo (leave one group out)."""
    n_folds: Annotated[int, Strict(), Interval(ge=2)] = 5
    """Folds of the kfold protocol."""
    val_fraction: Annotated[float, Strict(), Interval(ge=0, le=0.5)] = 0.1
    """Validation share carved from each fold's training part, never from test (0: none)."""
    few_shot: Count | None = None
    """k training images per rank, or null for all."""
    shift_keep: Annotated[float, Strict(), Interval(gt=0, le=1)] | None = None
    """Label shift: keep this share of the training images of the `shift_ranks` most frequent ranks."""
    shift_ranks: Count | None = None
    """How many most frequent training ranks `shift_keep` thins (null: half of them)."""
    n_repeats: Count = 10
    """repeats: number of random draws (HCI: 10)."""
    n_train: Count = 210
    """repeats: training images per rank."""
    n_val: NonNegativeInt = 5
    """repeats: validation images per rank."""
    n_test: Count = 50
    """repeats: test images per rank."""
    missing_ranks: Literal["error", "warn"] = "error"
    """A rank without training images in a fold: error | warn (rare ages, e.g. FG-NET's one 69-year-old)."""
    holdout_fraction: Annotated[float, Strict(), Interval(ge=0, lt=1)] = 0.0
    """Share of groups (by a stable hash with `holdout_salt`) that leaves every fold: the retrain gate's set."""
    holdout_salt: Str = "l2rclip-gate"
    """Changing it (or the fraction) redefines the gate set."""
    calib_fraction: Annotated[float, Strict(), Interval(ge=0, le=0.5)] = 0.0
    """Conformal calibration share carved from each fold's training part after validation (0: none)."""

    @model_validator(mode="after")
    def _one_way_to_thin(self) -> SplitConfig:
        if self.few_shot is not None and self.shift_keep is not None:
            raise ValueError("few_shot and shift_keep are both set; choose one")
        return self


@dataclass(frozen=True)
class PreprocessConfig:
    """The `preprocess` stage: every image decoded once into a uint8 store (l2rclip.data.store)."""

    __pydantic_config__ = SECTION

    enabled: Bool = True
    """false: train and evaluate decode the image files every epoch instead (slow; for comparison)."""
    margin: NonNegative = 0.0
    """Stored side = input size * (1 + margin); 0 keeps evaluation from the store identical to the files."""
    shard_size: Count = 4096
    """Images per memory-mapped .npy shard."""
    workers: Count | None = None
    """Decoding threads (null: one per CPU)."""
