"""params.yaml loading: strict keys, types and choices; the tests' demo params (tests/fixtures) are valid."""


import pytest
from support.project import ROOT

from l2rclip.config import ConfigError, Params, from_dict, load_params, to_dict, to_flat_dict


def test_fixture_params_load():
    params = load_params(ROOT / "tests" / "fixtures" / "params.yaml")  # never the user's params.yaml
    assert params.model.arch == "ViT-B-16" and params.data.source == "demo"
    assert from_dict(Params, to_dict(params)) == params  # round trip through plain dicts


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  rankformer:\n    enable: false\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.rankformer\.enable'.*enabled"):
        load_params(path)


@pytest.mark.parametrize(("raw", "match"), [
    ({"train": {"epochs": "ten"}}, r"'train.epochs': expected int, found 'ten'"),
    ({"data": {"on_bad": "ignore"}}, r"'data.on_bad': expected one of 'skip', 'fail'"),
    ({"model": "ViT-B-16"}, r"model: expected a mapping"),
    ({"train": {"grad_clip": "x"}}, r"train.grad_clip"),
])
def test_wrong_values_are_named(raw, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Params, raw)


def test_missing_file_and_numeric_coercion(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    params = from_dict(Params, {"train": {"lr_prompt": 1, "grad_clip": None}, "ranks": {"labels": [1, 2]}})
    assert params.train.lr_prompt == 1.0 and isinstance(params.train.lr_prompt, float)
    assert params.train.grad_clip is None and params.ranks.labels == (1, 2)


def test_params_are_frozen_and_flatten_to_dotted_keys():
    params = Params()
    with pytest.raises(AttributeError):
        params.seed = 3  # type: ignore[misc]
    flat = to_flat_dict(params)
    assert flat["model.rankformer.alpha_init"] == 0.1 and flat["loss.cop"] == 1.0
