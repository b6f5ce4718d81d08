"""params.yaml -> frozen dataclasses.

params.yaml is the project's only configuration. Every section is a frozen dataclass so that a
resolved configuration can be hashed, logged and compared, and so that a misspelled key is an
error at load time (naming the dotted key and the keys that would have been accepted) instead of
a silently ignored setting. Constructors elsewhere take plain arguments, never a `Params`.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A params file or mapping does not match the expected schema."""


@dataclass(frozen=True)
class RanksConfig:
    """The ordered classes. Either an integer range `start..stop` or an explicit `labels` list.

    `values` gives each label's numeric value (default: the label itself, which must then be
    numeric); `names` is `words` (number words of the values), `labels` (the labels as text) or
    an explicit list; `name_format` wraps each name, e.g. "{}s" turns "1950" into "1950s".
    """

    start: int | None = 1
    stop: int | None = 10
    labels: tuple[Any, ...] | None = None
    values: tuple[float, ...] | None = None
    names: str | tuple[str, ...] = "words"
    name_format: str = "{}"


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
    """

    source: str = "demo"
    root: str = "data/demo"
    list_file: str | None = None
    on_bad: Literal["skip", "fail"] = "skip"
    decode_workers: int | None = None
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass(frozen=True)
class SplitConfig:
    """How images are divided into train / val / test, per fold.

    `n_folds` is for `kfold`; `n_repeats` and the per-rank counts `n_train`/`n_val`/`n_test` are
    for `repeats` (HCI: 210 / 5 / 50 per decade, 10 repeats). `shift_keep` keeps that share of
    the training images of the `shift_ranks` most frequent training ranks (null: half of them).
    `missing_ranks` says whether a rank without training images in a fold is an error or a
    warning (rare ages, e.g. FG-NET's single 69-year-old, make it unavoidable there).
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
    """What training uses when the CLIP weights cannot be had (offline): a pipeline check.

    The fallback backbone is randomly initialised, so its image tower learns from scratch: it
    needs a larger learning rate (`lr_image`) and more `epochs` than a pretrained tower
    fine-tuned gently.
    """

    enabled: bool = True
    arch: str = "L2RCLIP-Tiny"
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
    `probe_c`), and the ordinal heads `coral` / `corn` on the image tower.
    """

    arch: str = "ViT-B-16"
    pretrained: str = "openai"
    method: Literal[METHODS] = "l2rclip"  # type: ignore[valid-type]
    prompt_template: str = "a photo of {}."
    probe_c: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    image_tower: Literal["train", "frozen"] = "train"
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
    num_workers: int = 0
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
    """Evaluation settings: CS@theta threshold (in rank-value units) and calibration bins."""

    cs_theta: float = 5.0
    ece_bins: int = 15


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: experiment name; `enabled: false` records nothing (the pipeline runs the same)."""

    enabled: bool = True
    experiment: str = "l2rclip"


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    seed: int = 0
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ranks: RanksConfig = field(default_factory=RanksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read a params file into `Params`, rejecting unknown keys and wrongly typed values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: expected a YAML file at {path}")
    with path.open(encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) or {}
    try:
        return from_dict(Params, raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping; errors name the dotted key that is wrong."""
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
    return cls(**kwargs)


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

