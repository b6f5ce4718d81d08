"""The `reference` bundle: the params that make each definition match the authors' code.

Every definition that our implementation chose differently from the authors' code (docs/method.md,
section 7b) is its own params key, defaulting to our choice. `REFERENCE` lists, for exactly those
definitions, the value that reproduces the reference code, and nothing else; it is applied as
ordinary `-S key=value` overrides (`l2rclip parity reference` prints them), so the resolved
params.yaml of a run says what ran, and a later `-S` on any single key still wins:

    dvc exp run --name ref $(l2rclip parity reference) -S loss.kl_t2i_target=uniform

| key | ours (default) | reference |
|---|---|---|
| `loss.supcon_form` | 1/temperature, all M prototypes, mean(i2t, t2i) | exp(logit_scale), batch labels, sum |
| `loss.cop_batch_weights` | normalised over the (B, B) gap matrix | over the pairs i < j only |
| `loss.kl_t2i_target` | exactly uniform over the rank's images | softmax(10 * one_hot) (OrdinalCLIP) |
| `model.prompt.inverse_distance_eps` | 1e-3 | 1e-5 (OrdinalCLIP `inv_prop`) |
| `model.prompt.gaussian_unit`, `gaussian_sigma` | base spacing, 1.0 | rank, 1/sqrt(2): exp(-d^2) (`normal`) |
| `model.prompt.rank_offsets` | true: each rank starts at its own name | false: bases start at the end names |
| `model.head_rule` | threshold (already the published rule) | threshold (coral-pytorch) |

Ordinality is not a switch: both definitions are always reported (see `l2rclip.metrics`).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from typing import Any

from l2rclip.config import ConfigError, Params, from_dict, to_dict, to_flat_dict

REFERENCE: dict[str, Any] = {
    "loss.supcon_form": "reference",
    "loss.cop_batch_weights": "pairs",
    "loss.kl_t2i_target": "softmax10",
    "model.prompt.inverse_distance_eps": 1e-5,
    "model.prompt.gaussian_unit": "rank",
    "model.prompt.gaussian_sigma": math.sqrt(0.5),  # exp(-d^2 / (2 sigma^2)) = exp(-d^2)
    "model.prompt.rank_offsets": False,  # OrdinalCLIP interpolates the base embeddings themselves
    "model.head_rule": "threshold",
}
BUNDLES: dict[str, dict[str, Any]] = {"reference": REFERENCE}


def with_overrides(params: Params, overrides: Mapping[str, Any]) -> Params:
    """`params` with dotted-key overrides applied in order, validated like a params file.

    This is what `dvc exp run -S key=value ...` does to params.yaml; an unknown key is an error.
    """
    known = to_flat_dict(params)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"unknown params key '{unknown[0]}' in overrides; expected a dotted key of params.yaml")
    raw = to_dict(params)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        section = raw
        for name in parents:
            section = section[name]
        section[leaf] = value
    return from_dict(Params, raw)


def yaml_scalar(value: Any) -> str:
    """A value as YAML text that PyYAML reads back as the same type.

    Floats always get a '.': PyYAML reads `1e-05` as a string, `1.0e-05` as a float.
    """
    if not isinstance(value, float):
        return str(value)
    text = repr(value)
    return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text


def dvc_set_args(bundle: Mapping[str, Any]) -> list[str]:
    """`-S key=value` arguments of `dvc exp run` for a bundle (values in YAML spelling)."""
    return [arg for key, value in bundle.items() for arg in ("-S", f"{key}={yaml_scalar(value)}")]


def shell_words(bundle: Mapping[str, Any]) -> str:
    """The `-S` arguments as one shell-quoted line, for `$(l2rclip parity reference)`."""
    return " ".join(shlex.quote(arg) for arg in dvc_set_args(bundle))
