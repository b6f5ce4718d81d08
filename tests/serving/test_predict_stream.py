"""Streaming prediction (issue 21.5): rows written batch by batch, atomic replacement, reading ahead, the store."""

import logging
import os
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from support.models import on_forward, save_tiny_model

from l2rclip import cli
from l2rclip.data.demo import generate_demo
from l2rclip.data.store import spec_for, write_store
from l2rclip.serving import reading
from l2rclip.serving.predictor import Predictor, expand_inputs, write_table
from l2rclip.serving.reading import AHEAD, read_batches


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """13 demo images (64 px, the tiny model's input) and two bad entries, in a data root."""
    root = tmp_path_factory.mktemp("data")
    generate_demo(root, n_per_rank=1, image_size=64)
    folder = root / "images"
    (folder / "03" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "07" / "notes.txt").write_text("not an image")
    return folder


def predict(model_dir: Path, inputs: list[str], out: Path, *options: str) -> int:
    return cli.main(["predict", str(model_dir), *inputs, "--out", str(out), "--device", "cpu", *options])


def temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_streamed_csv_is_the_whole_table_byte_for_byte(model_dir, images, tmp_path, monkeypatch):
    """Batches of 3 on 2 reading threads, appended as they finish, give the CSV of the one-piece table.

    (The same batches: a batch's numbers can differ in the last float bit with its composition.)
    """
    monkeypatch.chdir(tmp_path)  # no outputs/preprocess here: files are decoded
    paths = expand_inputs([str(images)])
    whole = Predictor.load(model_dir, device="cpu").predict_paths(
        paths, batch_size=3, with_probabilities=True, progress=False
    )
    write_table(whole, tmp_path / "expected.csv")
    streamed = tmp_path / "streamed.csv"
    options = ("--batch-size", "3", "--workers", "2", "--probabilities")
    assert predict(model_dir, [str(images)], streamed, *options) == cli.EXIT_SOME_FAILED
    assert streamed.read_bytes() == (tmp_path / "expected.csv").read_bytes()
    table = pd.read_csv(streamed, keep_default_na=False)
    assert len(table) == len(paths) == 12 and (table["error"] != "").sum() == 2


def test_rows_reach_the_temporary_file_batch_by_batch(model_dir, images, tmp_path, monkeypatch):
    """Before the k-th forward pass the temporary file already holds the k-1 batches before it."""
    lines: list[int] = []

    def count_lines(call: int) -> None:
        found = [tmp_path / name for name in temporary_files(tmp_path)]
        lines.append(len(found[0].read_text().splitlines()) if found else 0)

    calls = on_forward(monkeypatch, count_lines)
    out = tmp_path / "p.csv"
    inputs = [str(p) for p in sorted(images.rglob("0000.png"))[:5]]
    assert predict(model_dir, inputs, out, "--batch-size", "2", "--workers", "0", "--store", "none") == 0
    assert calls == [1, 2, 3] and lines == [0, 3, 5]  # header + 2 rows, header + 4 rows
    assert len(out.read_text().splitlines()) == 6 and temporary_files(tmp_path) == []


@pytest.mark.parametrize("failure", [RuntimeError("CUDA error: an illegal memory access"), KeyboardInterrupt()])
def test_a_failure_mid_run_keeps_the_old_output_and_leaves_no_temporary_file(
    model_dir, images, tmp_path, monkeypatch, capsys, failure
):
    def fail(call: int) -> None:
        if call == 2:
            raise failure

    on_forward(monkeypatch, fail)
    out = tmp_path / "p.csv"
    out.write_text("path,pred_label\nold.png,3\n")
    options = ("--batch-size", "2", "--workers", "2", "--store", "none")
    if isinstance(failure, KeyboardInterrupt):
        assert predict(model_dir, [str(images)], out, *options) == cli.EXIT_INTERRUPTED
        assert capsys.readouterr().err.splitlines()[-1] == f"interrupted, nothing written ({out} unchanged)"
    else:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            predict(model_dir, [str(images)], out, *options)
    assert out.read_text() == "path,pred_label\nold.png,3\n" and temporary_files(tmp_path) == []


def test_reading_threads_keep_input_order_and_stay_a_bounded_distance_ahead():
    """Slow, out-of-order reads still come in input order; at most AHEAD batches beyond the consumer."""
    started: list[int] = []
    lock = threading.Lock()

    def read(position: int) -> torch.Tensor:
        with lock:
            started.append(position)
        time.sleep(0.002 * (position % 3))  # later positions often finish first
        if position == 5:
            raise OSError("disk gone")
        return torch.full((3, 2, 2), float(position))

    batches = read_batches(40, read, batch_size=4, workers=3)
    seen = []
    for number, batch in enumerate(batches):
        with lock:
            furthest = max(started)
        assert furthest < (number + 1 + AHEAD) * 4  # nothing read beyond AHEAD batches ahead
        seen += batch.positions
        assert batch.images[:, 0, 0, 0].tolist() == [float(p) for p in batch.good]
    assert seen == list(range(40))
    assert sorted(started) == list(range(40))
    errors = [b.errors for b in read_batches(8, read, 4, workers=0)]
    assert errors == [{}, {5: "OSError: disk gone"}]
    with pytest.raises(ValueError, match="expected 0 .* or more, found -1"):
        next(read_batches(8, read, 4, workers=-1))


@pytest.fixture
def store(model_dir, images, tmp_path):
    """A margin-0 image store of the good images, for the tiny model, as the preprocess stage writes it."""
    root = images.parent
    recipe = Predictor.load(model_dir, device="cpu").meta["recipe"]
    paths = sorted(str(p.relative_to(root)) for p in images.rglob("*.png") if p.name != "corrupt.png")
    write_store(paths, root, spec_for(recipe, 0.0), tmp_path / "store", recipe=recipe)
    return tmp_path / "store"


def test_the_store_is_read_instead_of_the_files_with_the_same_predictions(
    model_dir, images, store, tmp_path, monkeypatch
):
    from_files, from_store = tmp_path / "files.csv", tmp_path / "store.csv"
    options = ("--batch-size", "4", "--probabilities")
    assert predict(model_dir, [str(images)], from_files, *options, "--store", "none") == cli.EXIT_SOME_FAILED
    decoded: list[str] = []
    load = reading.load_image_file

    def recorded(path, limit):
        decoded.append(Path(path).name)
        return load(path, limit)

    monkeypatch.setattr(reading, "load_image_file", recorded)
    assert predict(model_dir, [str(images)], from_store, *options, "--store", str(store)) == cli.EXIT_SOME_FAILED
    assert from_store.read_bytes() == from_files.read_bytes()  # the same pixels, the same numbers
    assert sorted(decoded) == ["corrupt.png", "notes.txt"]  # only what the store lacks was opened as a file

    monkeypatch.chdir(tmp_path)  # the default --store: outputs/preprocess of the working folder
    (tmp_path / "outputs").mkdir()
    store.rename(tmp_path / "outputs" / "preprocess")
    decoded.clear()
    assert predict(model_dir, [str(images)], tmp_path / "default.csv", *options) == cli.EXIT_SOME_FAILED
    assert sorted(decoded) == ["corrupt.png", "notes.txt"]
    assert (tmp_path / "default.csv").read_bytes() == from_files.read_bytes()


def test_a_changed_file_is_decoded_and_an_unfit_store_is_refused_or_skipped(
    model_dir, images, store, tmp_path, monkeypatch, capsys, caplog
):
    changed = images / "02" / "0000.png"
    original = changed.read_bytes()
    try:
        Image.new("RGB", (64, 64), (255, 0, 0)).save(changed)  # newer than the store's index
        out = tmp_path / "p.csv"
        assert predict(model_dir, [str(changed)], out, "--store", str(store), "--probabilities") == 0
        assert predict(model_dir, [str(changed)], tmp_path / "f.csv", "--store", "none", "--probabilities") == 0
        assert out.read_bytes() == (tmp_path / "f.csv").read_bytes()  # the new red picture, not the stored one
    finally:
        changed.write_bytes(original)
        os.utime(changed, ns=(0, 0))  # older than the store again, for the other tests

    recipe = Predictor.load(model_dir, device="cpu").meta["recipe"]
    paths = sorted(str(p.relative_to(images.parent)) for p in images.rglob("0000.png"))
    write_store(paths, images.parent, spec_for(recipe, 0.25), tmp_path / "margin", recipe=recipe)
    good = str(images / "02" / "0000.png")
    assert (
        predict(model_dir, [good], tmp_path / "m.csv", "--store", str(tmp_path / "margin")) == cli.EXIT_BAD_REQUEST
    )
    assert "holds 80 px images for a 64 px input (preprocess.margin > 0)" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()

    monkeypatch.chdir(tmp_path)  # the same store as the default: skipped with a reason, files decoded
    (tmp_path / "outputs").mkdir()
    (tmp_path / "margin").rename(tmp_path / "outputs" / "preprocess")
    with caplog.at_level(logging.INFO, logger="l2rclip"):
        assert predict(model_dir, [good], tmp_path / "m.csv") == 0
    assert "decoding the image files, not reading outputs/preprocess: the image store" in caplog.text
    assert "(preprocess.margin > 0)" in caplog.text
