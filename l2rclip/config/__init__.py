"""params.yaml -> frozen dataclasses, checked by a schema (pydantic) with one-line errors.

params.yaml is the project's only configuration. Every section is a frozen dataclass
(`l2rclip.config.data`, `.model`, `.evaluation`, the whole in `.params`), so that a resolved
configuration can be hashed, logged and compared. Loading (`.loading`) refuses, before a stage
touches any output, what YAML lets through (duplicate keys, unsafe tags, alias bombs) and what the
schema does not admit (unknown keys, wrong types, out-of-range values, contradicting keys), each
in one line naming the file and the dotted key. The same schema, written as JSON Schema
(`l2rclip config schema`, committed as params.schema.json), lets editors complete and check
params.yaml. Constructors elsewhere take plain arguments, never a `Params`.
"""

from l2rclip.config.data import DataConfig, DemoConfig, PreprocessConfig, RanksConfig, SplitConfig
from l2rclip.config.evaluation import MODEL_NAME, ConformalConfig, EvalConfig, ServingConfig, TrackingConfig
from l2rclip.config.fields import ConfigError
from l2rclip.config.loading import (
    ParamsLoader,
    from_dict,
    json_schema,
    load_params,
    read_yaml,
    section_problems,
    to_dict,
    to_flat_dict,
)
from l2rclip.config.model import (
    METHODS,
    FallbackConfig,
    LossConfig,
    ModelConfig,
    PromptConfig,
    RankFormerConfig,
    TrainConfig,
)
from l2rclip.config.params import Params, model_name
from l2rclip.config.pretraining import PretrainConfig

__all__ = [
    "METHODS",
    "MODEL_NAME",
    "ConfigError",
    "ConformalConfig",
    "DataConfig",
    "DemoConfig",
    "EvalConfig",
    "FallbackConfig",
    "LossConfig",
    "ModelConfig",
    "Params",
    "ParamsLoader",
    "PreprocessConfig",
    "PretrainConfig",
    "PromptConfig",
    "RankFormerConfig",
    "RanksConfig",
    "ServingConfig",
    "SplitConfig",
    "TrackingConfig",
    "TrainConfig",
    "from_dict",
    "json_schema",
    "load_params",
    "model_name",
    "read_yaml",
    "section_problems",
    "to_dict",
    "to_flat_dict",
]
