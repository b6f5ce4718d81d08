"""params.yaml loading: strict keys, types and choices; the tests' demo params (tests/fixtures) are valid."""

import json
from itertools import pairwise
from pathlib import Path

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


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"train": {"epochs": "ten"}}, r"'train.epochs': expected int, found 'ten'"),
        ({"data": {"on_bad": "ignore"}}, r"'data.on_bad': expected one of 'skip', 'fail'"),
        ({"model": "ViT-B-16"}, r"model: expected a mapping"),
        ({"train": {"grad_clip": "x"}}, r"train.grad_clip"),
    ],
)
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


# --- YAML that YAML itself lets through, and values deep code would trip on: one line, exit 2 -------------


def billion_laughs() -> str:
    """Nine levels of nine aliases: 9^9 strings once expanded, from a file of 1 KB."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{name}: &{name} [{', '.join([f'*{before}'] * 9)}]" for before, name in pairwise("abcdefghi")]
    return "\n".join([*lines, "ranks:", "  labels: *i"]) + "\n"


BAD_FILES = {  # name -> (params file text, what the one-line error must say)
    "syntax": (
        "seed: 0\nfolds: [0, 1\nranks:\n  start: 1\n",
        "bad.yaml:3:6: YAML error: expected ',' or ']', but got ':'",
    ),
    "duplicate_key": (
        "seed: 0\nranks:\n  start: 1\n  stop: 5\n  start: 2\n",
        "bad.yaml:5:3: duplicate key 'ranks.start' (first at line 3, again at line 5)",
    ),
    "unsafe_tag": (
        "seed: !!python/object/apply:os.system ['touch {marker}']\n",
        "bad.yaml:1:7: 'seed' has the tag !!python/object/apply:os.system, which a params file cannot",
    ),
    "yaml_bomb": (billion_laughs(), "values through YAML aliases (*name); expected at most 10000"),
    "list_in_labels": (
        "ranks:\n  labels: [[1, 2], 3]\n",
        "bad.yaml: 'ranks.labels[0]': expected int, float or str, found [1, 2]",
    ),
    "negative_max_image_pixels": (
        "data:\n  max_image_pixels: -5\n",
        "bad.yaml: 'data.max_image_pixels': expected a value >= 1, found -5",
    ),
}


def bad_file(tmp_path: Path, case: str) -> tuple[Path, str]:
    text, message = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("{marker}", str(tmp_path / "executed")))
    return path, message


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_yaml_is_one_line_naming_file_and_key(tmp_path, case):
    path, message = bad_file(tmp_path, case)
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "executed").exists()  # safe loading: the tag was never constructed


def exit_status(entry) -> int:
    """What a command's process would exit with (argparse's `parser.exit` raises SystemExit)."""
    try:
        return entry()
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("case", BAD_FILES)
@pytest.mark.parametrize("command", ["l2rclip prepare", "l2rclip check", "stages.demo_data", "stages.train"])
def test_bad_yaml_through_the_cli_and_stage_mains_exits_2_with_one_line(
    tmp_path, capsys, monkeypatch, case, command
):
    from l2rclip import cli
    from l2rclip.stages import demo_data, train

    monkeypatch.chdir(tmp_path)  # relative defaults (data/demo, outputs/...) stay inside the test's folder
    path, message = bad_file(tmp_path, case)
    out = tmp_path / "out"
    entries = {
        "l2rclip prepare": lambda: cli.main(["prepare", "--params", str(path), "--out", str(out)]),
        "l2rclip check": lambda: cli.main(["check", "--params", str(path), "--steps", "0"]),
        "stages.demo_data": lambda: demo_data.main(["--params", str(path), "--out", str(out)]),
        "stages.train": lambda: train.main(
            ["--params", str(path), "--fold", "0", "--prepared", str(tmp_path / "prepared"), "--out", str(out)]
        ),
    }
    assert exit_status(entries[command]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()  # refused before any output is touched


def test_aliases_and_merge_keys_within_the_limit_still_load(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "train: &common\n  epochs: 3\nmodel:\n  fallback:\n    <<: {epochs: 7}\n    lr_image: 0.01\n"
        "eval: {cs_theta: 2}\nconformal:\n  alpha: &levels [0.1, 0.2]\n"
    )
    params = load_params(path)
    assert params.train.epochs == 3 and params.model.fallback.epochs == 7 and params.conformal.alpha == (0.1, 0.2)


def test_an_empty_section_and_an_empty_file_read_as_the_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("tracking:\n  # enabled: false\n")
    assert load_params(path) == Params()
    path.write_text("# nothing set\n")
    assert load_params(path) == Params()


def test_the_committed_json_schema_is_the_generated_one(capsys):
    """params.schema.json is written by `l2rclip config schema > params.schema.json`; rerun it after a change."""
    from l2rclip import cli

    assert cli.main(["config", "schema"]) == 0
    assert (ROOT / "params.schema.json").read_text(encoding="utf-8") == capsys.readouterr().out
    assert (ROOT / "params.yaml").read_text().startswith("# yaml-language-server: $schema=params.schema.json\n")


def test_the_reference_in_the_docs_is_the_generated_one(tmp_path, capsys):
    """docs/configuration.md's key tables: `l2rclip config reference --write docs/configuration.md`."""
    from l2rclip import cli

    page = tmp_path / "configuration.md"
    page.write_text((ROOT / "docs" / "configuration.md").read_text(encoding="utf-8"), encoding="utf-8")
    assert cli.main(["config", "reference", "--write", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = page.read_text(encoding="utf-8")
    assert all(f"| `{key.rsplit('.', 1)[-1]}` |" in documented for key in to_flat_dict(Params()))


def test_config_validate_says_valid_or_names_the_problem(tmp_path, capsys):
    from l2rclip import cli

    assert cli.main(["config", "validate", "--params", str(ROOT / "params.yaml")]) == 0
    assert capsys.readouterr().out.strip().endswith("params.yaml: valid")
    path, message = bad_file(tmp_path, "duplicate_key")
    assert cli.main(["config", "validate", "--params", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_editors_schema_admits_the_shipped_params_and_refuses_what_loading_refuses():
    jsonschema = pytest.importorskip("jsonschema")
    from l2rclip.config import read_yaml

    validator = jsonschema.Draft202012Validator(json.loads((ROOT / "params.schema.json").read_text()))
    files = [ROOT / "params.yaml", ROOT / "tests" / "fixtures" / "params.yaml"]
    presets = sorted((ROOT / "protocols").glob("*.yaml"))
    documents = [read_yaml(f) for f in files] + [read_yaml(f)["params"] for f in presets]
    assert len(documents) > 3 and all(not list(validator.iter_errors(doc)) for doc in documents)
    bad = [
        {"model": {"rankformer": {"enable": False}}},
        {"data": {"max_image_pixels": -5}},
        {"ranks": {"labels": [[1, 2]]}},
        {"data": {"on_bad": "ignore"}},
        {"train": {"epochs": "ten"}},
    ]
    for document in bad:
        assert list(validator.iter_errors(document)), document
        with pytest.raises(ConfigError):
            from_dict(Params, document)


def test_a_section_built_in_code_is_checked_like_a_loaded_one():
    from l2rclip.config import SplitConfig, section_problems

    assert section_problems(SplitConfig(val_fraction=0.9), "split") == [
        "'split.val_fraction': expected a value in [0, 0.5], found 0.9"
    ]
    assert section_problems(SplitConfig(few_shot=2, shift_keep=0.5), "split") == [
        "'split': few_shot and shift_keep are both set; choose one"
    ]
