"""Protocol presets (protocols/*.yaml) and the `reproduce` command that runs them as DVC experiments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from support.project import ROOT

from l2rclip.config import ConfigError, Params, from_dict
from l2rclip.evaluation.reproduce import dvc_command, find_preset, load_preset, overrides, paper_table

PROTOCOLS = ROOT / "protocols"
EXPECTED = {
    "morph-a",
    "morph-b",
    "morph-c",
    "morph-d",
    "adience",
    "hci",
    "aesthetics-animals",
    "aesthetics-nature",
    "aesthetics-people",
    "aesthetics-urban",
    "clap2015",
    "fgnet-lopo",
    "utkface",
}

TINY = {
    "name": "tiny",
    "title": "Tiny HCI-like protocol",
    "paper": {
        "metrics": [
            {"column": "acc (%)", "key": "test/accuracy", "scale": 100},
            {"column": "MAE (decades)", "key": "test/mae", "scale": 0.1},
        ],
        "published": {"L2RCLIP": {"acc (%)": "67.2 (1.6)", "MAE (decades)": "0.43 (0.03)"}},
    },
    "params": {
        "folds": [0, 1],
        "ranks": {"labels": [1930, 1940], "names": "labels", "name_format": "{}s"},
        "data": {"source": "hci", "list_file": "hci"},
        "split": {"protocol": "repeats", "n_repeats": 2, "n_train": 3, "n_val": 1, "n_test": 2},
        "model": {"prompt": {"context_init": "a photo taken in the"}},
        "tracking": {"experiment": "tiny"},
    },
}


def write_preset(folder: Path, preset: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{preset['name']}.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False), encoding="utf-8")
    return path


def test_every_published_protocol_has_a_valid_preset():
    names = {p.stem for p in PROTOCOLS.glob("*.yaml")}
    assert names == EXPECTED
    for name in sorted(names):
        preset = find_preset(name, PROTOCOLS)
        params = from_dict(Params, preset.params)  # the repo's schema: unknown keys are errors
        assert params.tracking.experiment == f"l2rclip-{name}"
        assert preset.paper["metrics"] and all(m["key"].startswith("test/") for m in preset.paper["metrics"])
        columns = {m["column"] for m in preset.paper["metrics"]}
        for cells in (preset.paper.get("published") or {}).values():
            assert set(cells) <= columns
        settings = overrides(preset, "/data/x", "/lists")
        assert f"data.root={json.dumps('/data/x')}" in settings
        if params.data.list_file is not None:
            assert f"data.list_file={json.dumps('/lists/' + params.data.list_file)}" in settings


def test_preset_folds_match_their_protocols():
    counts = {name: len(find_preset(name, PROTOCOLS).folds) for name in EXPECTED}
    assert counts == {
        "morph-a": 5,
        "morph-b": 2,
        "morph-c": 5,
        "morph-d": 5,
        "adience": 5,
        "hci": 10,
        "aesthetics-animals": 1,
        "aesthetics-nature": 1,
        "aesthetics-people": 1,
        "aesthetics-urban": 1,
        "clap2015": 1,
        "fgnet-lopo": 82,
        "utkface": 5,
    }


def test_overrides_set_the_whole_protocol_and_the_reduced_budget(tmp_path):
    preset = load_preset(write_preset(tmp_path, TINY))
    settings = overrides(preset, "/images", "/lists", epochs=1, folds=[1])
    assert settings == [
        "folds=[1]",
        "ranks.start=1",
        "ranks.stop=10",
        "ranks.labels=[1930, 1940]",
        "ranks.values=null",
        'ranks.names="labels"',
        'ranks.name_format="{}s"',
        'ranks.unit=""',
        'data.source="hci"',
        'data.root="/images"',
        'data.list_file="/lists/hci"',
        "data.category=null",
        'split.protocol="repeats"',
        "split.n_folds=5",
        "split.val_fraction=0.1",
        "split.few_shot=null",
        "split.shift_keep=null",
        "split.shift_ranks=null",
        "split.n_repeats=2",
        "split.n_train=3",
        "split.n_val=1",
        "split.n_test=2",
        'split.missing_ranks="error"',
        "split.holdout_fraction=0.0",
        'split.holdout_salt="l2rclip-gate"',  # published protocols: no holdout
        "split.calib_fraction=0.0",  # ... and no calibration split carved from their training part
        'model.prompt.context_init="a photo taken in the"',
        'tracking.experiment="tiny"',
        "train.epochs=1",
        "model.fallback.epochs=1",
    ]
    command = dvc_command(preset, settings[:2])
    assert command[1:] == ["exp", "run", "--name", "tiny", "-S", "folds=[1]", "-S", "ranks.start=1"]


def test_overrides_reject_folds_outside_the_protocol_and_missing_lists(tmp_path):
    preset = load_preset(write_preset(tmp_path, TINY))
    with pytest.raises(ConfigError, match=r"has folds 0..1; asked for \[2\]"):
        overrides(preset, "/images", "/lists", folds=[2])
    with pytest.raises(ConfigError, match="reads the list hci: give the lists folder"):
        overrides(preset, "/images", None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"params": {**TINY["params"], "split": {"protocol": "repeats", "n_repeats": 3}}},
            r"protocol repeats has folds 0..2; folds is \[0, 1\]",
        ),
        ({"params": {**TINY["params"], "data": {"sauce": "hci"}}}, "unknown key 'data.sauce'"),
        ({"name": "other"}, "name 'other' must equal the file name 'tiny'"),
        ({"extra": 1}, "expected the keys name, title, paper, params"),
    ],
)
def test_bad_presets_are_rejected_with_the_reason(tmp_path, change, message):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **change}), encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_preset(path)


def test_unknown_protocol_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown protocol 'morph-e': expected one of adience, .*utkface"):
        find_preset("morph-e", PROTOCOLS)


def test_paper_table_prints_published_rows_and_this_run_in_paper_units(tmp_path):
    preset = load_preset(write_preset(tmp_path, TINY))
    report = {
        "test/accuracy": {"mean": 0.5, "std": 0.125},
        "test/mae": {"mean": 6.0, "std": 1.0},
        "n_folds": 2,
        "backbone": "L2RCLIP-Tiny",
        "is_clip": False,
        "method": "l2rclip",
    }
    assert paper_table(preset, report).splitlines()[2:] == [
        "| method | folds | acc (%) | MAE (decades) |",
        "|---|---|---|---|",
        "| L2RCLIP (published) | 2 | 67.2 (1.6) | 0.43 (0.03) |",
        "| l2rclip (this run: L2RCLIP-Tiny, random init, NOT CLIP) | 2 | 50.00 +- 12.50 | 0.60 +- 0.10 |",
    ]
    demo = {**report, "backbone": "L2RCLIP-Demo", "backbone_kind": "demo"}  # is_clip False, yet not random
    assert "| l2rclip (this run: L2RCLIP-Demo, DEMO CLIP, NOT real CLIP) | 2 |" in paper_table(preset, demo)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reproduce_runs_a_dvc_experiment_and_prints_the_row(tmp_path):
    from support.project import SMALL, copy_project, environment, run

    repo = copy_project(tmp_path / "repo", SMALL)
    write_preset(repo / "protocols", TINY)
    lists, images = tmp_path / "lists" / "hci", tmp_path / "images"
    for decade in (1930, 1940):
        names = [f"images/{decade}s_decade_{i:03d}.jpg" for i in range(6)]
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{decade}s.txt").write_text("".join(f"./{n} {decade}s\n" for n in names), encoding="utf-8")
        for i, name in enumerate(names):
            (images / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (decade % 255, 20 * i, 90)).save(images / name)
    env = environment(tmp_path)
    for command in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "scratch"],
    ):
        run(command, repo, env)
    output = run(
        [
            sys.executable,
            "-m",
            "l2rclip.cli",
            "reproduce",
            "tiny",
            "--data",
            str(images),
            "--lists",
            str(tmp_path / "lists"),
            "--epochs",
            "1",
        ],
        repo,
        env,
    )
    assert "dvc exp run --name tiny" in output
    row = [line for line in output.splitlines() if "(this run:" in line]
    assert len(row) == 1 and "| 2 |" in row[0] and "+-" in row[0], output[-2000:]
    report = json.loads((repo / "outputs" / "report" / "metrics.json").read_text())
    assert report["n_folds"] == 2 and report["source"] == "hci"
    names = subprocess.run(
        ["dvc", "exp", "list", "--name-only"], cwd=repo, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert names == ["tiny"]
