"""params.yaml -> frozen dataclasses.

params.yaml is the project's only configuration. Every section is a frozen dataclass so that a
resolved configuration can be hashed, logged and compared, and so that a misspelled key is an
error at load time (naming the dotted key and the keys that would have been accepted) instead of
a silently ignored setting. Numeric settings are checked against their ranges (`RANGES`) and
the rules tying keys together at load time too, so a stage fails before it touches an output.
Constructors elsewhere take plain arguments, never a `Params`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A params file or mapping does not match the expected schema."""


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads `1e-05` as a float (YAML 1.2, as DVC writes floats).

    PyYAML follows YAML 1.1, where a float needs a '.', so the `1e-05` that `dvc exp run -S
    key=1e-5` writes into params.yaml would otherwise come back as a string.
    """


ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))


@dataclass(frozen=True)
class RanksConfig:
    """The ordered classes. Either an integer range `start..stop` or an explicit `labels` list.

    `values` gives each label's numeric value (default: the label itself, which must then be
    numeric); `names` is `words` (number words of the values), `labels` (the labels as text) or
    an explicit list; `name_format` wraps each name, e.g. "{}s" turns "1950" into "1950s".
    `unit` is the unit of the values, shown in figure axis labels ("years" -> "true value (years)");
    "" for unitless ranks. It only labels figures (l2rclip.plots).
    """

    start: int | None = 1
    stop: int | None = 10
    labels: tuple[Any, ...] | None = None
    values: tuple[float, ...] | None = None
    names: str | tuple[str, ...] = "words"
    name_format: str = "{}"
    unit: str = ""


@dataclass(frozen=True)
class DemoConfig:
    """The embedded generated counting set (1..10 objects per image)."""

    n_per_rank: int = 60
    image_size: int = 96


@dataclass(frozen=True)
class DataConfig:
    """Where images and labels come from, and what to do with bad rows.

    `decode_workers` is the number of threads that decode images during validation (null: one
    per CPU); decoding releases the GIL, so threads speed it up without copying data.
    `max_image_pixels` is the one decompression-bomb limit (width x height), applied by
    `l2rclip.data.validate.open_image` in prepare, predict and the served model (default: PIL's).
    `allow_outside_root: false` makes a listed path that leaves `root` (`../x.png`, an absolute
    path elsewhere) a bad row: DVC tracks `root`, not what lies outside it.
    `duplicates` is what happens to identical files (same bytes) listed with different labels:
    `drop_conflicts` keeps none of them (which label is right is unknown), `keep_first` keeps the
    first row, `fail` stops. Identical files with the same label always keep the first row.
    `category` keeps one category of a source that has several (aesthetics: animals, nature,
    people, urban; null: all).
    """

    source: str = "demo"
    root: str = "data/demo"
    list_file: str | None = None
    on_bad: Literal["skip", "fail"] = "skip"
    decode_workers: int | None = None
    max_image_pixels: int = 89_478_485
    category: str | None = None
    demo: DemoConfig = field(default_factory=DemoConfig)
    allow_outside_root: bool = False
    duplicates: Literal["drop_conflicts", "keep_first", "fail"] = "drop_conflicts"


@dataclass(frozen=True)
class SplitConfig:
    """How images are divided into train / val / test, per fold.

    `n_folds` is for `kfold`; `n_repeats` and the per-rank counts `n_train`/`n_val`/`n_test` are
    for `repeats` (HCI: 210 / 5 / 50 per decade, 10 repeats). `shift_keep` keeps that share of
    the training images of the `shift_ranks` most frequent training ranks (null: half of them).
    `missing_ranks` says whether a rank without training images in a fold is an error or a
    warning (rare ages, e.g. FG-NET's single 69-year-old, make it unavoidable there).
    `calib_fraction` carves the conformal calibration split from each fold's training part after
    validation (0: none; see `ConformalConfig`).
    """

    protocol: Literal["kfold", "given", "repeats", "logo"] = "kfold"
    n_folds: int = 5
    val_fraction: float = 0.1
    few_shot: int | None = None
    shift_keep: float | None = None
    shift_ranks: int | None = None
    n_repeats: int = 10
    n_train: int = 210
    n_val: int = 5
    n_test: int = 50
    missing_ranks: Literal["error", "warn"] = "error"
    # Promotion holdout (l2rclip.data.holdout): this share of groups, chosen by a stable hash with
    # `holdout_salt`, leaves every fold and is the retrain gate's set. 0: none (published protocols).
    holdout_fraction: float = 0.0
    holdout_salt: str = "l2rclip-gate"
    calib_fraction: float = 0.0


@dataclass(frozen=True)
class PromptConfig:
    """Rank prompts `[SOT] c_1..c_N r_k^1..r_k^T . [EOT]` (METHOD.md section 2).

    `context_init` is a phrase whose token embeddings initialise the context (then N is the
    phrase's token count) or `random` (N = `n_context`, drawn from N(0, 0.02^2)).
    `interpolation` is `linear`, `inverse_distance`, `gaussian` (rank embeddings mixed from
    `n_base` learnable base embeddings) or `plain` (one free embedding per rank, CoOp).
    """

    context_init: str = "a photo of a person aged"
    n_context: int = 8
    context_shared: bool = True
    rank_tokens: int = 1
    rank_init: Literal["names", "random"] = "names"
    interpolation: Literal["linear", "inverse_distance", "gaussian", "plain"] = "linear"
    n_base: int = 2
    gaussian_sigma: float = 1.0
    # Reference-parity switches (l2rclip/parity.py): ours | OrdinalCLIP's definition.
    inverse_distance_eps: float = 1e-3
    gaussian_unit: Literal["base_spacing", "rank"] = "base_spacing"


@dataclass(frozen=True)
class RankFormerConfig:
    """RankFormer: attention across ranks on the learnable prompt block, before the text encoder."""

    enabled: bool = True
    attention: Literal["token", "full"] = "token"
    layers: int = 1
    heads: int = 8
    mlp_ratio: float = 4.0
    rank_position: bool = False
    alpha_init: float = 0.1
    dropout: float = 0.0


@dataclass(frozen=True)
class FallbackConfig:
    """What training uses when the CLIP weights cannot be had (offline).

    `pretrained: auto` takes the demo CLIP shipped for `arch` (`L2RCLIP-Demo`: pretrained on drawn
    shapes, labelled as such) and random weights for an arch without one (`L2RCLIP-Tiny`: a
    pipeline check); `demo`, `none` or a file choose explicitly. A random backbone's image tower
    learns from scratch: it trains with `lr_image` and `epochs` instead of train.lr_image and
    train.epochs (a pretrained one, the demo CLIP included, keeps the train settings).
    """

    enabled: bool = True
    arch: str = "L2RCLIP-Tiny"
    pretrained: str = "auto"
    lr_image: float = 1e-3
    epochs: int = 40


METHODS = ("l2rclip", "ordinalclip", "coop", "zero_shot", "linear_probe", "coral", "corn")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, method and prompt model. `pretrained`: open_clip tag, local weights file, or `none`.

    `method` picks the model trained in the same harness: `l2rclip` (prompts + RankFormer + cop,
    each part switchable below), the presets `ordinalclip` (RankFormer and cop off) and `coop`
    (plain prompts, CE only), `zero_shot` (`prompt_template` per rank, no training),
    `linear_probe` (logistic regression on frozen features, C chosen on validation from
    `probe_c`), and the ordinal heads `coral` / `corn` on the image tower, scored with
    `head_rule` (`threshold`: the published count of P(y > k) > 0.5; `mode`: argmax and expectation).
    """

    arch: str = "ViT-B-16"
    pretrained: str = "openai"
    method: Literal[METHODS] = "l2rclip"  # type: ignore[valid-type]
    prompt_template: str = "a photo of {}."
    probe_c: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    image_tower: Literal["train", "frozen"] = "train"
    head_rule: Literal["threshold", "mode"] = "threshold"  # coral/corn: published count rule | mode
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    rankformer: RankFormerConfig = field(default_factory=RankFormerConfig)


@dataclass(frozen=True)
class LossConfig:
    """Weights of the named loss terms (0 switches a term off) and the `cop` inner weights."""

    ce: float = 1.0
    kl_t2i: float = 1.0
    cop: float = 1.0
    cop_batch: float = 1.0
    supcon: float = 1.0
    cop_tightness: float = 1.0
    cop_diversity: float = 1.0
    supcon_temperature: float = 0.07
    # Reference-parity switches (l2rclip/parity.py): ours | the authors' code.
    supcon_form: Literal["ours", "reference"] = "ours"
    cop_batch_weights: Literal["matrix", "pairs"] = "matrix"
    kl_t2i_target: Literal["uniform", "softmax10"] = "uniform"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; learning rates per parameter group."""

    schedule: Literal["one_stage", "two_stage"] = "one_stage"
    epochs: int = 10
    stage1_epochs: int = 5
    batch_size: int = 32
    optimizer: Literal["adam", "radam", "adamw"] = "adam"
    lr_prompt: float = 1e-4
    lr_rankformer: float = 1e-4
    lr_image: float = 1e-5
    lr_head: float = 1e-3
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    grad_clip: float | None = 1.0
    num_workers: int | Literal["auto"] = "auto"
    device: str = "auto"
    amp: bool = True
    select_metric: str = "mae"
    eval_batch_size: int = 64
    feature_cache: str = "outputs/cache"
    # Data-parallel training (l2rclip/distributed.py): devices x nodes processes under torchrun.
    devices: int = 1
    nodes: int = 1
    rdzv_endpoint: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings: CS@theta threshold (in rank-value units) and calibration bins.

    `paper_mae` is the unit in which the protocol's papers report MAE: `value` (ages, years) or
    `index` (rank-index units, one rank = 1: HCI, Adience, aesthetics); result tables use it.
    """

    cs_theta: float = 5.0
    ece_bins: int = 15
    paper_mae: Literal["value", "index"] = "value"


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: experiment name; `enabled: false` records nothing (the pipeline runs the same).

    `system_metrics`: MLflow's system-metrics monitor (CPU, memory, disk, network, GPU with
    pynvml) samples every `system_metrics_interval` seconds on the fold run while it trains.
    """

    enabled: bool = True
    experiment: str = "l2rclip"
    system_metrics: bool = True
    system_metrics_interval: float = 10.0
    # The model registry (l2rclip.stages.register): `register: false` trains, evaluates and
    # reports but registers no model version (ablation variants); `model_name` is the registered
    # model (null or empty: derived from `data.root`, see `model_name`).
    register: bool = True
    model_name: str | None = None


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # safe in `models:/<name>@champion` and in shells


def model_name(params: Params) -> str:
    """The registered model of this project's dataset: `tracking.model_name`, else from `data.root`.

    The default is `l2rclip-<name of the data root folder>` (`data/demo` -> `l2rclip-demo`,
    `data/my_faces` -> `l2rclip-my_faces`, `../shared/data/fgnet` -> `l2rclip-fgnet`), other
    characters than letters, digits, `_`, `.` and `-` replaced by `_`: one lineage per dataset,
    so two CSV datasets never share one, and the retrain gate never compares models of two
    datasets. A root without a name of its own (`.`, `..`) gives `l2rclip-<data.source>`: the
    name must not depend on where a clone of the project lies.
    """
    if params.tracking.model_name:
        return params.tracking.model_name
    folder = Path(os.path.normpath(params.data.root)).name
    stem = folder if folder not in ("", ".", "..") else params.data.source
    return f"l2rclip-{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}"


@dataclass(frozen=True)
class PreprocessConfig:
    """The `preprocess` stage: every image decoded once into a uint8 store (l2rclip.data.store).

    `margin` enlarges the stored side beyond the model input (room for training crops; 0 keeps
    evaluation from the store identical to evaluation from the files); `enabled: false` makes
    train and evaluate decode the files every epoch instead (the old path, for comparison).
    """

    enabled: bool = True
    margin: float = 0.0
    shard_size: int = 4096
    workers: int | None = None


@dataclass(frozen=True)
class ServingConfig:
    """Limits of one request to the served model, stored in the registered model's config.

    `mlflow models serve` reads a whole request body before the model sees it and has no size
    limit of its own: put a proxy with a body cap in front of it (README). The model refuses
    more than `max_rows` rows, or more than `max_request_bytes` of base64 image text in all.
    """

    max_rows: int = 64
    max_request_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class ConformalConfig:
    """Split conformal prediction intervals, calibrated on each fold's `calib` split.

    `method` is the interval a registered model serves (both are calibrated and evaluated):
    `ordinal` (contiguous ranks grown around the argmax by probability) or `residual`
    (expectation +- a quantile of |value - expectation|). `alpha`: miscoverage levels (the
    intervals aim at coverage 1 - alpha); the first is served unless `predict --alpha` asks for
    another. `temperature`: fit a softmax temperature on the validation split first.
    """

    method: Literal["ordinal", "residual"] = "ordinal"
    alpha: tuple[float, ...] = (0.1,)
    temperature: bool = False


@dataclass(frozen=True)
class PretrainConfig:
    """The `pretrain` stage: the demo CLIP, trained from scratch on drawn, captioned shapes.

    Its own `seed` (the corpus and the initialisation; the corpus's seed space is apart from the
    demo set's whatever the seeds) so that the project's `seed` does not retrain the shipped
    weights. `eval_seed` / `eval_per_count`: the demo-generator images of the zero-shot check run
    every `eval_every` steps; `eval_template`: its prompt. `threads`: torch threads (null: torch's
    default); `workers`: processes drawing the corpus. `experiment`: MLflow experiment, null: none.
    """

    arch: str = "L2RCLIP-Demo"
    seed: int = 0
    steps: int = 2400
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 150
    image_size: int = 96
    workers: int = 1
    threads: int | None = None
    log_every: int = 10
    eval_every: int = 400
    eval_seed: int = 0
    eval_per_count: int = 100
    eval_template: str = "a photo of {} shapes."
    experiment: str | None = "l2rclip-pretrain"


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    seed: int = 0
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ranks: RanksConfig = field(default_factory=RanksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    conformal: ConformalConfig = field(default_factory=ConformalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass(frozen=True)
class Range:
    """The interval a numeric setting must lie in (a `None` bound is unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        """Whether `value` lies in the interval (a word a key allows, like `auto`, is not a number)."""
        if isinstance(value, str):
            return True
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


COUNT, NON_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, low_open=True)

# The range of every numeric setting, by dotted key (`key[]`: each item of a list). Checked at
# load time, after the types, so that a bad value stops a stage before it touches any output.
# A null value (where the key allows null) is not checked. Add a line here with a new key.
RANGES: dict[str, Range] = {
    "seed": NON_NEGATIVE,  # numpy seed sequences take non-negative seeds only
    "folds[]": NON_NEGATIVE,
    "data.decode_workers": COUNT,
    "data.demo.n_per_rank": COUNT,
    "data.demo.image_size": COUNT,
    "split.n_folds": Range(2),
    "split.val_fraction": Range(0, 0.5),
    "split.few_shot": COUNT,
    "split.shift_keep": Range(0, 1, low_open=True),
    "split.shift_ranks": COUNT,
    "split.n_repeats": COUNT,
    "split.n_train": COUNT,
    "split.n_val": NON_NEGATIVE,
    "split.n_test": COUNT,
    "split.holdout_fraction": Range(0, 1, high_open=True),
    "split.calib_fraction": Range(0, 0.5),
    "conformal.alpha[]": Range(0, 1, low_open=True, high_open=True),
    "preprocess.margin": NON_NEGATIVE,
    "preprocess.shard_size": COUNT,
    "preprocess.workers": COUNT,
    "model.probe_c[]": POSITIVE,
    "model.fallback.lr_image": POSITIVE,
    "model.fallback.epochs": COUNT,
    "model.prompt.n_context": COUNT,
    "model.prompt.rank_tokens": COUNT,
    "model.prompt.n_base": Range(2),
    "model.prompt.gaussian_sigma": POSITIVE,
    "model.rankformer.layers": COUNT,
    "model.rankformer.heads": COUNT,
    "model.rankformer.mlp_ratio": POSITIVE,
    "model.rankformer.dropout": Range(0, 1, high_open=True),
    **{f"loss.{term}": NON_NEGATIVE for term in ("ce", "kl_t2i", "cop", "cop_batch", "supcon",
                                                 "cop_tightness", "cop_diversity")},
    "loss.supcon_temperature": POSITIVE,
    "train.epochs": COUNT,
    "train.stage1_epochs": NON_NEGATIVE,
    "train.batch_size": COUNT,
    **{f"train.lr_{group}": POSITIVE for group in ("prompt", "rankformer", "image", "head")},
    "train.weight_decay": NON_NEGATIVE,
    "train.warmup_epochs": NON_NEGATIVE,
    "train.grad_clip": POSITIVE,
    "train.num_workers": NON_NEGATIVE,
    "train.eval_batch_size": COUNT,
    "eval.cs_theta": NON_NEGATIVE,
    "eval.ece_bins": COUNT,
    "tracking.system_metrics_interval": POSITIVE,
    **{f"pretrain.{key}": COUNT for key in ("steps", "batch_size", "image_size", "threads", "log_every",
                                            "eval_every", "eval_per_count")},
    **{f"pretrain.{key}": NON_NEGATIVE for key in ("seed", "warmup_steps", "workers", "eval_seed",
                                                   "weight_decay")},
    "pretrain.lr": POSITIVE,
}


def section_problems(section: Any, prefix: str = "") -> list[str]:
    """What is wrong with the settings of one config section (not its subsections).

    Each problem names the dotted key, the expected range and the value found: the `RANGES` of
    the section's keys, then the rules that tie keys together (`_RULES`).
    """
    problems = []
    for f in dataclasses.fields(section):
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(section, f.name)
        items = ([(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, tuple)
                 else [(key, value)])
        expected = RANGES.get(f"{key}[]" if isinstance(value, tuple) else key)
        problems += [f"'{name}': expected a value {expected}, found {item!r}" for name, item in items
                     if expected is not None and item is not None and not expected.admits(item)]
    rule = _RULES.get(type(section))
    return problems + (rule(section, prefix) if rule else [])


def _split_rules(split: SplitConfig, prefix: str) -> list[str]:
    if split.few_shot is not None and split.shift_keep is not None:
        return [f"'{prefix}.few_shot' and '{prefix}.shift_keep' are both set; choose one"]
    return []


def _params_rules(params: Params, prefix: str) -> list[str]:
    """The folds the pipeline runs must exist where the protocol fixes their number."""
    if len(set(params.folds)) != len(params.folds):
        return [f"'folds': expected distinct fold numbers, found {list(params.folds)}"]
    count = {"kfold": ("split.n_folds", params.split.n_folds),
             "repeats": ("split.n_repeats", params.split.n_repeats)}.get(params.split.protocol)
    if count is None:  # given / logo: the number of folds comes from the data (train checks splits.csv)
        return []
    absent = [fold for fold in params.folds if fold >= count[1]]
    if absent:
        return [f"'folds': expected fold numbers in 0..{count[1] - 1} ({count[0]} is {count[1]} for "
                f"protocol {params.split.protocol}), found {absent}"]
    return []


def _tracking_rules(tracking: TrackingConfig, prefix: str) -> list[str]:
    if tracking.model_name and not MODEL_NAME.fullmatch(tracking.model_name):
        return [f"'{prefix}.model_name': expected letters, digits, '_', '.' and '-', starting with a letter or "
                f"digit (it is part of models:/<name>@champion URIs), or null for the default; found "
                f"{tracking.model_name!r}"]
    return []


_RULES: dict[type, Any] = {SplitConfig: _split_rules, Params: _params_rules, TrackingConfig: _tracking_rules}


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read a params file into `Params`, rejecting unknown keys, wrong types and out-of-range values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: expected a YAML file at {path}")
    with path.open(encoding="utf-8") as handle:
        raw = yaml.load(handle, Loader=ParamsLoader) or {}  # a SafeLoader: no arbitrary objects
    try:
        return from_dict(Params, raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping, checked against its types and `RANGES`.

    Errors name the dotted key that is wrong (all out-of-range keys of a section at once).
    """
    where = prefix or "<top level>"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, found {type(raw).__name__} {raw!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown key '{key}'; expected one of: {', '.join(sorted(known))}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name)
              for name, value in raw.items()}
    section = cls(**kwargs)
    problems = section_problems(section, prefix)
    if problems:
        raise ConfigError("; ".join(problems))
    return section


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against type `tp`, converting lists to tuples and ints to floats."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"'{key}': expected {_describe(tp)}, found {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"'{key}': expected one of {allowed}, found {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}': expected a list, found {value!r}")
        item_type = get_args(tp)[0]
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"'{key}': expected {tp.__name__}, found {value!r}")
    return value


def _describe(tp: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in get_args(tp))


def to_flat_dict(params: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config dataclass into dotted keys (for MLflow params and DVC `-S` overrides)."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            flat.update(to_flat_dict(value, key + "."))
        else:
            flat[key] = value
    return flat


def to_dict(params: Any) -> dict[str, Any]:
    """Nested plain-dict form of a config dataclass (tuples become lists), for JSON/YAML."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value
    return {f.name: (to_dict(getattr(params, f.name))
                     if dataclasses.is_dataclass(getattr(params, f.name))
                     else plain(getattr(params, f.name)))
            for f in dataclasses.fields(params)}

