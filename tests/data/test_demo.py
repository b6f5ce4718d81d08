import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from l2rclip.data.demo import GAP, MIN_IMAGE_SIZE, generate_demo, place_objects


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    """The demo set at its default settings (600 images of 96 px), generated once for the module."""
    root = tmp_path_factory.mktemp("demo")
    return root, generate_demo(root)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_set_has_n_per_rank_images_of_every_count_1_to_10(default_set):
    root, table = default_set
    assert list(table.columns) == ["path", "label", "group"]
    assert table["label"].dtype == np.int64
    assert table["label"].value_counts().sort_index().to_dict() == {k: 60 for k in range(1, 11)}
    assert table["group"].nunique() == 60
    assert (table.groupby("group")["label"].apply(sorted) == [list(range(1, 11))] * 60).all()
    assert table["path"].is_unique and all((root / p).is_file() for p in table["path"])
    on_disk = pd.read_csv(root / "labels.csv", dtype={"group": str})
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)
    with Image.open(root / table["path"].iloc[0]) as image:
        assert image.size == (96, 96) and image.mode == "RGB"


def test_every_image_shows_exactly_label_separate_shapes(default_set):
    root, table = default_set
    manifest = json.loads((root / "manifest.json").read_text())
    objects = {image["path"]: image["objects"] for image in manifest["images"]}
    for path, label in zip(table["path"], table["label"], strict=True):
        shapes = objects[path]
        assert len(shapes) == label
        for _, cx, cy, r in shapes:
            assert r + 1 <= cx <= 95 - r and r + 1 <= cy <= 95 - r
        for (_, x1, y1, r1), (_, x2, y2, r2) in combinations(shapes, 2):
            assert math.hypot(x1 - x2, y1 - y2) >= r1 + r2 + GAP
        # The drawn pixels agree: shapes are the connected regions that differ from the background
        # (8-connected: PIL's polygon fill may leave a corner pixel touching only diagonally).
        pixels = np.asarray(Image.open(root / path))
        _, regions = ndimage.label((pixels != pixels[0, 0]).any(axis=2), structure=np.ones((3, 3)))
        assert regions == label, path


def test_two_generations_are_byte_identical_and_the_seed_matters(tmp_path):
    first = generate_demo(tmp_path / "a", n_per_rank=3, image_size=48, seed=7)
    second = generate_demo(tmp_path / "b", n_per_rank=3, image_size=48, seed=7)
    other = generate_demo(tmp_path / "c", n_per_rank=3, image_size=48, seed=8)
    pd.testing.assert_frame_equal(first, second)
    pd.testing.assert_frame_equal(first, other)  # same table: only the pictures depend on the seed
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 3 * 10 + 2  # images + labels.csv + manifest.json
    assert a == b
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in images)


def test_existing_set_with_same_settings_is_not_rewritten(tmp_path):
    generate_demo(tmp_path, n_per_rank=2, image_size=48)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    table = generate_demo(tmp_path, n_per_rank=2, image_size=48)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")} == stamps
    assert len(table) == 20


def test_changed_settings_regenerate_and_drop_stale_images(tmp_path):
    generate_demo(tmp_path, n_per_rank=3, image_size=48)
    table = generate_demo(tmp_path, n_per_rank=2, image_size=48)
    assert len(table) == 20
    on_disk = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert on_disk == sorted(table["path"])
    assert json.loads((tmp_path / "manifest.json").read_text())["settings"]["n_per_rank"] == 2


def test_a_missing_image_triggers_regeneration(tmp_path):
    table = generate_demo(tmp_path, n_per_rank=1, image_size=48)
    (tmp_path / table["path"].iloc[-1]).unlink()
    generate_demo(tmp_path, n_per_rank=1, image_size=48)
    assert (tmp_path / table["path"].iloc[-1]).is_file()


@pytest.mark.parametrize("count", [1, 10])
def test_placement_fits_in_the_smallest_allowed_image(count):
    shapes = place_objects(np.random.default_rng(0), count, MIN_IMAGE_SIZE)
    assert len(shapes) == count


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"n_per_rank": 0}, "n_per_rank"), ({"image_size": MIN_IMAGE_SIZE - 1}, "image_size")]
)
def test_bad_settings_are_rejected(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_demo(tmp_path, **kwargs)


def test_the_default_style_leaves_the_demo_set_as_it_was(tmp_path):
    from l2rclip.data.demo import DEMO_STYLE, demo_image

    generate_demo(tmp_path, n_per_rank=2, image_size=48, seed=3, style=DEMO_STYLE)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "style" not in manifest["settings"]  # the committed demo set's manifest is unchanged
    # The pixels of the default style are those of the plain call (dvc.lock's md5 of data/demo was checked too).
    image, _ = demo_image(3, 1, 4, 48)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "images/04/0001.png")))


def test_a_style_restricts_kinds_and_hues_and_frees_sizes_from_the_count(tmp_path):
    from l2rclip.data.demo import DemoStyle

    narrow = DemoStyle(kinds=("circle",), hues=(-0.05, 0.1))
    generate_demo(tmp_path / "narrow", n_per_rank=6, image_size=96, seed=5, style=narrow)
    manifest = json.loads((tmp_path / "narrow/manifest.json").read_text())
    assert manifest["settings"]["style"] == {"kinds": ["circle"], "hues": [-0.05, 0.1], "sizes": "count"}
    assert {shape for image in manifest["images"] for shape, *_ in image["objects"]} == {"circle"}
    free = DemoStyle(sizes="free")
    generate_demo(tmp_path / "free", n_per_rank=6, image_size=96, seed=5, style=free)

    def largest_by_count(root):
        images = json.loads((root / "manifest.json").read_text())["images"]
        return {c: np.mean([max(o[3] for o in i["objects"]) for i in images if i["label"] == c]) for c in (1, 10)}

    demo, freed = largest_by_count(tmp_path / "narrow"), largest_by_count(tmp_path / "free")
    assert demo[1] / demo[10] > 2.3 and freed[1] / freed[10] < 1.8  # one shape is no longer much larger
    with pytest.raises(ValueError, match="DemoStyle.kinds"):
        DemoStyle(kinds=("hexagon",))
    with pytest.raises(ValueError, match="unknown key"):
        DemoStyle.from_dict({"colours": "red"})
