"""benchmarks/gpu_check.py runs every part in its CPU smoke mode (the GPU run needs a GPU machine)."""

import json
import os
import subprocess
import sys

import pytest
from support.project import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402  (a script folder, not a package)


@pytest.mark.slow  # end to end: the slow tier (make test-all)
def test_cpu_smoke_run_writes_every_part(tmp_path):
    results = gpu_check.main(["--device", "cpu", "--out", str(tmp_path)])
    assert "errors" not in results, results.get("errors")
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["settings"]["arch"] == "L2RCLIP-Tiny"
    assert saved["a_train_step"]["l2rclip_images_per_s"] > 0 and saved["a_train_step"]["bare_images_per_s"] > 0
    assert saved["b_loader"]["loader_over_step"] > 0
    assert set(saved["c_peak_memory_gib"]) == {"10", "62", "101"}  # not measured on the CPU: null
    assert saved["d_predict"]["ratio"] > 0
    assert saved["e_fp32_device_vs_cpu"]["loss_abs_diff"] == 0.0  # the CPU against itself
    table = (tmp_path / "gpu_check.md").read_text()
    assert "NOT CLIP" in table and "| (e) fp32 step" in table


def test_the_shell_entry_needs_an_output_folder():
    usage = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


@pytest.mark.slow
def test_the_shell_entry_runs_the_check_with_its_limit(tmp_path):
    # Later arguments win: --device cpu turns the GPU command into the smoke run on this machine.
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), str(tmp_path), "--device", "cpu", "--parts", "ae"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "a_train_step" in saved and "e_fp32_device_vs_cpu" in saved and "b_loader" not in saved
