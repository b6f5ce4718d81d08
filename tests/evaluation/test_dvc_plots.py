"""DVC plots: the project's learning curves and the offline page, with the real DVC in a scratch repository.

The scratch repository holds the project's dvc.yaml and plot template, a params.yaml whose `folds`
go beyond 0..4 (as the protocols' 10 repeats or 82 persons do), one history.csv per fold written
the way train@k writes it (epoch, phase, loss terms, val metrics) and the curves stage's stack of
them, committed once and then changed in the workspace, so `dvc plots diff HEAD` compares two
revisions as it compares experiments; a last test runs two real `dvc exp run` over a stand-in
train@k and the real curves stage and diffs them. The
offline page is rendered by headless Chromium with every host name unresolvable.
"""

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from dvc_render import VegaRenderer
from support.project import ROOT, environment, run

from l2rclip.evaluation import offline_plots
from l2rclip.stages import curves

FOLDS = [0, 1, 3, 7, 12, 81]  # more than the default 5, with gaps: dvc.yaml must not list folds
HISTORY = "outputs/folds/{}/train/history.csv"
CURVES = "outputs/curves/learning_curves.csv"
TEMPLATE = ".dvc/plots/fold_curves.json"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def history(fold: int, epochs: int, shift: float) -> pd.DataFrame:
    """A history.csv as train@k writes it; values distinct per fold and revision (`shift`)."""
    epoch = pd.Series(range(1, epochs + 1))
    return pd.DataFrame(
        {
            "epoch": epoch,
            "phase": ["one_stage"] * epochs,
            "train/ce_loss": 2.0 / epoch,
            "train/loss": 3.0 / epoch + shift,
            "val/accuracy": 0.1 * epoch / epochs,
            "val/mae": 4.0 + fold / 10 - epoch / 10 + shift,
        }
    )


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory):
    """The project's dvc.yaml with a committed history per fold and fold 0 changed in the workspace."""
    tmp = tmp_path_factory.mktemp("plots")
    repo, env = tmp / "repo", environment(tmp)
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(
        json.dumps(
            {
                "folds": FOLDS,
                "split": {"n_folds": 82},  # FG-NET's persons
                "data": {"root": "data/demo"},
            }
        )
    )
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    (repo / TEMPLATE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / TEMPLATE, repo / TEMPLATE)
    run(["dvc", "config", "plots.html_template", str(ROOT / offline_plots.TEMPLATE)], repo, env)
    for fold in FOLDS:
        path = repo / HISTORY.format(fold)
        path.parent.mkdir(parents=True)
        history(fold, 4, 0.0).to_csv(path, index=False)
    stack(repo)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "histories"], repo, env)
    history(0, 6, 0.125).to_csv(repo / HISTORY.format(0), index=False)  # a longer, shifted curve
    stack(repo)
    return repo, env


def stack(repo: Path) -> None:
    """Run the curves stage in `repo`, as `dvc repro curves` would."""
    assert (
        curves.main(
            [
                "--params",
                str(repo / "params.yaml"),
                "--folds-dir",
                str(repo / "outputs/folds"),
                "--out",
                str(repo / CURVES),
            ]
        )
        == 0
    )


def plots_json(repo: Path, env: dict, *command: str) -> dict:
    """`dvc plots ... --json` (stdout only: the evaluate plots, absent here, are reported on stderr)."""
    done = subprocess.run(
        ["dvc", "plots", *command, "--json"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout)


def test_the_committed_page_is_what_the_lock_pins_and_what_dvc_loads():
    assert offline_plots.check(ROOT / offline_plots.LOCK, ROOT / offline_plots.TEMPLATE) == []
    cdn = dict(re.findall(r"npm/([\w-]+)@([\w.-]+)", VegaRenderer.SCRIPTS))
    assert {p["name"]: p["version"] for p in offline_plots.read_lock(ROOT / offline_plots.LOCK)} == cdn
    # the project's DVC config uses it, relative to .dvc/
    configured = run(["dvc", "config", "plots.html_template"], ROOT, environment(ROOT)).strip()
    assert (ROOT / ".dvc" / configured).resolve() == (ROOT / offline_plots.TEMPLATE).resolve()


def test_check_names_a_changed_library(tmp_path):
    page = (ROOT / offline_plots.TEMPLATE).read_text(encoding="utf-8")
    changed = tmp_path / "offline.html"
    changed.write_text(page.replace("vegaEmbed", "vegaEmbeD", 1), encoding="utf-8")
    problems = offline_plots.check(ROOT / offline_plots.LOCK, changed)
    assert len(problems) == 1 and "vega-embed@6.18.2 sha256" in problems[0]
    changed.write_text(page.replace("<script>", '<script src="https://cdn.example/x.js"></script><script>', 1))
    assert any("<script src=...>" in p for p in offline_plots.check(ROOT / offline_plots.LOCK, changed))


def _package(code: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in (("package/build/lib.min.js", code), ("package/LICENSE", b"BSD-3-Clause text")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_build_refuses_a_tarball_the_lock_or_registry_does_not_pin(tmp_path):
    """The npm registry replaced by local bytes: integrity is checked against both the lock and the metadata."""
    tarball = _package(b"window.lib = 1;")
    integrity = offline_plots._sri_sha512(tarball)
    lock = tmp_path / "lock.json"
    package = {
        "name": "lib",
        "version": "1.0.0",
        "tarball": "https://registry.npmjs.org/lib/-/lib-1.0.0.tgz",
        "integrity": integrity,
        "file": "package/build/lib.min.js",
        "sha256": hashlib.sha256(b"window.lib = 1;").hexdigest(),
    }
    lock.write_text(json.dumps({"packages": [package]}))
    served = {
        "https://registry.npmjs.org/lib/1.0.0": json.dumps({"dist": {"integrity": integrity}}).encode(),
        package["tarball"]: tarball,
    }
    page, licenses = tmp_path / "page.html", tmp_path / "LICENSES.txt"
    template = offline_plots.build(lock, page, licenses, fetch=served.__getitem__)
    assert offline_plots.check(lock, template) == []
    assert "window.lib = 1;" in template.read_text() and "BSD-3-Clause" in licenses.read_text()

    served[package["tarball"]] = _package(b"window.lib = 2;")  # the same version, other bytes
    with pytest.raises(ValueError, match=r"lib@1.0.0: .*lib-1.0.0.tgz has integrity sha512-.*expected"):
        offline_plots.build(lock, page, licenses, fetch=served.__getitem__)
    served["https://registry.npmjs.org/lib/1.0.0"] = json.dumps({"dist": {"integrity": "sha512-other"}}).encode()
    with pytest.raises(ValueError, match="the registry's integrity is sha512-other"):
        offline_plots.build(lock, page, licenses, fetch=served.__getitem__)


def test_a_tarball_whose_license_is_no_file_is_refused():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        code = tarfile.TarInfo("package/build/lib.min.js")
        code.size = 2
        archive.addfile(code, io.BytesIO(b"x;"))
        folder = tarfile.TarInfo("package/LICENSE")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
    tarball = buffer.getvalue()
    integrity = offline_plots._sri_sha512(tarball)
    package = {"name": "lib", "version": "1.0.0", "tarball": "lib.tgz", "integrity": integrity}
    package["file"] = "package/build/lib.min.js"
    served = {"https://registry.npmjs.org/lib/1.0.0": json.dumps({"dist": {"integrity": integrity}}).encode()}
    served["lib.tgz"] = tarball
    with pytest.raises(
        ValueError, match=r"lib@1.0.0: expected package/LICENSE to be a file in the package tarball"
    ):
        offline_plots.fetch_package(package, fetch=served.__getitem__)


def test_dvc_yaml_declares_learning_curves_for_every_fold(plots_repo):
    """Issue 21.6: one plot per metric holds a line for every fold of `folds`, whatever they are."""
    repo, env = plots_repo
    done = subprocess.run(
        ["dvc", "plots", "show", "--json"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    shown = json.loads(done.stdout)
    assert not [e for e in shown.get("errors") or [] if e.get("name") in ("val_mae", "train_loss")]
    for plot_id, column in (("val_mae", "val/mae"), ("train_loss", "train/loss")):
        (plot,) = shown["data"][plot_id]
        spec = plot["content"]
        assert spec["encoding"]["x"]["field"] == "epoch" and spec["encoding"]["color"]["field"] == "fold"
        rows = pd.DataFrame(spec["data"]["values"])
        assert sorted(rows["fold"].unique(), key=int) == [str(fold) for fold in FOLDS]
        assert rows.groupby("fold").size().to_dict()["0"] == 6  # the workspace's history of fold 0
        assert column in rows.columns


def test_the_curves_stage_names_every_fold_without_a_history(tmp_path):
    history(0, 2, 0.0).to_csv(tmp_path / "history.csv", index=False)
    (tmp_path / "0" / "train").mkdir(parents=True)
    (tmp_path / "history.csv").rename(tmp_path / "0" / "train" / "history.csv")
    assert curves.stack_histories(tmp_path, [0])["fold"].tolist() == ["0", "0"]
    with pytest.raises(FileNotFoundError, match=r"folds` \[0, 5, 9\]; missing: .*5/train/history.csv, .*9/train"):
        curves.stack_histories(tmp_path, [0, 5, 9])


def test_plots_diff_compares_revisions_on_an_offline_page(plots_repo):
    repo, env = plots_repo
    (plot,) = plots_json(repo, env, "diff", "HEAD")["data"]["val_mae"]
    rows = pd.DataFrame(plot["content"]["data"]["values"])
    fold0 = rows[rows["fold"] == "0"]
    assert fold0.groupby("rev").size().to_dict() == {"HEAD": 4, "workspace": 6}

    out = run(["dvc", "plots", "diff", "HEAD", "-o", "page"], repo, env)
    page = repo / "page" / "index.html"
    assert page.as_uri() in out
    html = page.read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in html  # and no <script src=...> at all, the three libraries inlined as pinned:
    assert offline_plots.inlined_problems(ROOT / offline_plots.LOCK, page) == []
    first = pd.read_csv(repo / HISTORY.format(0), dtype=str).iloc[0]["val/mae"]  # DVC embeds the CSV's text
    assert f'"val/mae": "{first}"' in html and '"rev": "HEAD"' in html  # the data of both revisions


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package) to render the page")
def test_the_page_renders_with_no_network(plots_repo):
    repo, env = plots_repo
    run(["dvc", "plots", "show", "-o", "shown"], repo, env)
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--virtual-time-budget=10000",
            "--dump-dom",
            (repo / "shown" / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    drawn = [(int(w), int(h)) for w, h in re.findall(r'<canvas width="(\d+)" height="(\d+)"', dom)]
    assert sum(w > 100 and h > 100 for w, h in drawn) >= 2, drawn  # val_mae and train_loss were drawn


WRITE_HISTORY = """\
import pathlib, sys, yaml
fold, scale = int(sys.argv[1]), yaml.safe_load(open("scale.yaml"))["scale"]
out = pathlib.Path(f"outputs/folds/{fold}/train")
out.mkdir(parents=True, exist_ok=True)
rows = [f"{e},one_stage,{scale * 3 / e:.4f},{scale * (4 - e / 10) + fold / 10:.4f}" for e in range(1, 4)]
(out / "history.csv").write_text("epoch,phase,train/loss,val/mae\\n" + "\\n".join(rows) + "\\n")
"""


def test_plots_diff_compares_the_learning_curves_of_experiments(tmp_path):
    """The project's curves stage and plots over a stand-in train@k (same persist folder): two real experiments."""
    repo, env = tmp_path / "repo", environment(tmp_path)
    repo.mkdir()
    project = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = {
        "foreach": "${folds}",
        "do": {
            "cmd": "python write_history.py ${item}",
            "deps": ["write_history.py"],
            "params": [{"scale.yaml": ["scale"]}],
            "outs": [{"outputs/folds/${item}/train": {"persist": True}}],
        },
    }
    curves_stage = {**project["stages"]["curves"], "deps": ["outputs/folds"]}  # the code runs from ROOT
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"train": stage, "curves": curves_stage}, "plots": project["plots"]})
    )
    (repo / "params.yaml").write_text(yaml.safe_dump({"folds": [0, 7], "split": {"n_folds": 8}}))
    (repo / "scale.yaml").write_text(yaml.safe_dump({"scale": 1.0}))  # not an l2rclip param: a file of its own
    (repo / "write_history.py").write_text(WRITE_HISTORY)
    env = {**env, "PYTHONPATH": str(ROOT)}
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        run(command, repo, env)
    (repo / TEMPLATE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / TEMPLATE, repo / TEMPLATE)
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    run(["dvc", "repro", "-q"], repo, env)
    (repo / "outputs/folds/0/train.lock").write_text("12345\n")  # a stage's lock beside its output (its PID)
    assert json.loads(run(["dvc", "status", "--json"], repo, env).strip().splitlines()[-1]) == {}
    for command in (
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "baseline"],
        ["dvc", "exp", "run", "-n", "slower", "-S", "scale.yaml:scale=1.5"],
        ["dvc", "exp", "run", "-n", "faster", "-S", "scale.yaml:scale=0.5"],
    ):
        run(command, repo, env)
    (plot,) = plots_json(repo, env, "diff", "slower", "faster")["data"]["val_mae"]
    rows = pd.DataFrame(plot["content"]["data"]["values"])
    assert sorted(rows["rev"].unique()) == ["faster", "slower"]
    assert set(rows["fold"]) == {"0", "7"}
    first = rows[(rows["epoch"] == "1") & (rows["fold"] == "0")].set_index("rev")["val/mae"]
    assert first.to_dict() == {"slower": "5.8500", "faster": "1.9500"}  # each experiment's own curve
