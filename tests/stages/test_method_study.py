"""The method study end to end on a tiny setting, its study file, and its DVC pipeline's code deps."""

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from support.project import ROOT

from l2rclip.config import Params, from_dict
from l2rclip.config.fields import ConfigError
from l2rclip.evaluation.method_table import write_report
from l2rclip.stages.method_study import draw_study_set, load_study, run_setting, study_runs
from l2rclip.stages.prepare import prepare
from l2rclip.training.code_deps import import_closure

STUDY_DIR = ROOT / "studies/methods"
TINY = {
    "methods": ["zero_shot", "linear_probe", "coop"],
    "seeds": [0],
    "settings": {"shots1": {"few_shot": 1, "epochs": 1}},
    "data": {"pool_per_rank": 4, "test_per_rank": 2, "image_size": 64, "pool_style": {"kinds": ["circle"]}},
}


def test_the_study_runs_end_to_end_and_its_table_shows_the_runs_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(TINY))
    study = load_study(tmp_path / "study.yaml")
    draw_study_set(study.data, tmp_path / "data")
    committed = yaml.safe_load((STUDY_DIR / "params.yaml").read_text())
    params = from_dict(Params, {**committed, "split": {**committed["split"], "val_fraction": 0.25}})
    prepare(params, tmp_path / "prepared")
    records = run_setting(params, study, "shots1", tmp_path / "prepared", tmp_path / "runs/shots1.json")
    assert [(r["method"], r["n_train"], r["n_val"], r["n_test"]) for r in records] == [
        (m, 10, 10, 20)
        for m in TINY["methods"]  # validation thinned to the one shot per rank
    ]
    assert all(r["backbone_kind"] == "demo" for r in records)
    paths = write_report(study_runs(tmp_path / "runs", study), TINY["methods"], tmp_path / "report")
    table = paths["table"].read_text()
    for record in records:
        row = next(line for line in table.splitlines() if line.startswith(f"| {record['method']} |"))
        assert f"{record['test/accuracy']:.3f} (1 seed)" in row
    assert "NOT real CLIP" in table
    assert json.loads(paths["summary"].read_text())["settings"]["shots1"]["coop"]["test/accuracy"]["n"] == 1


def test_the_study_file_is_checked():
    with pytest.raises(ValueError, match="unknown method"):
        load_study_text({**TINY, "methods": ["coop", "l2rclip_three_stage"]})
    with pytest.raises(ConfigError, match="settings.shots1.few_shot"):
        load_study_text({**TINY, "settings": {"shots1": {"few_shot": 0, "epochs": 1}}})
    study = load_study(STUDY_DIR / "study.yaml")  # the committed one
    assert len(study.seeds) >= 3 and {"all", "shift"} <= set(study.settings)


def load_study_text(content: dict):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.yaml"
        path.write_text(yaml.safe_dump(content))
        return load_study(path)


STAGES = yaml.safe_load((STUDY_DIR / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_study_stage_code_deps_cover_its_imports(stage):
    spec = STAGES[stage].get("do", STAGES[stage])
    module = spec["cmd"].split("python -m ", 1)[1].split()[0]
    deps = [(STUDY_DIR / dep).resolve().relative_to(ROOT).as_posix() for dep in spec["deps"]]
    files = [p.relative_to(ROOT).as_posix() for p in import_closure(module) if p.name != "__init__.py"]
    missing = [f for f in files if not any(f == d or f.startswith(d + "/") for d in deps)]
    assert not missing, f"studies/methods/dvc.yaml stage {stage} imports but does not depend on: {missing}"
