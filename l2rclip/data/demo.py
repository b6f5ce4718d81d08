"""The embedded demo set: generated images of 1 to 10 shapes, labelled by how many there are.

Counting is ordinal, needs no download, and is learnable by CLIP-like models, so the whole
pipeline can run end to end on any machine. Everything is drawn from the seed with numpy's
Generator and PIL, and PNGs carry no timestamps, so the same settings give byte-identical files.

Layout under `root`:
    images/<count:02d>/<group:04d>.png   one image per (count, group)
    labels.csv                           path,label,group
    manifest.json                        settings + every image's objects (shape, cx, cy, r)

The group `g<index>` is a pseudo-subject: image `index` of every count shares its background
colour, the way a person's photos share a face across ages. Grouped splitting then keeps a
"look" on one side of a split, as it must keep a person, and the demo exercises that code path.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
COUNTS = range(1, 11)
SHAPES = ("circle", "square", "triangle")
GAP = 3.0  # px between the circles that enclose two shapes, so that no two shapes touch
MIN_RADIUS = 4.0  # px; smaller shapes stop being recognisable
MIN_IMAGE_SIZE = 48  # smallest side where ten shapes of MIN_RADIUS reliably fit
_PLACEMENT_ATTEMPTS = 100
_PLACEMENT_TRIES = 200
_CORNERS = {"square": 4, "triangle": 3}


def generate_demo(root: str | Path, n_per_rank: int = 60, image_size: int = 96, seed: int = 0) -> pd.DataFrame:
    """Write the demo set under `root` (unless it is already there) and return its table.

    Args:
        root: output folder, created if needed.
        n_per_rank: images per count 1..10 (also the number of pseudo-subject groups).
        image_size: side of the square images, in pixels.
        seed: everything drawn depends only on it (and on the image's count and group).

    Returns:
        `path` (relative to root), `label` (int64, the number of shapes 1..10), `group` ("g0000"..),
        ordered by label then group.

    Raises:
        ValueError: n_per_rank below 1 or image_size below MIN_IMAGE_SIZE (ten shapes would not fit).
    """
    if n_per_rank < 1:
        raise ValueError(f"n_per_rank: expected at least 1, found {n_per_rank}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size: expected at least {MIN_IMAGE_SIZE} px, found {image_size}")
    root = Path(root)
    settings = demo_settings(n_per_rank, image_size, seed)
    previous = _read_manifest(root)
    if previous is not None and previous["settings"] == settings and _complete(root, previous):
        log.info("demo set in %s is up to date (%s)", root, settings)
        return demo_table(previous)
    backgrounds = [group_background(seed, group) for group in range(n_per_rank)]
    images: list[dict[str, Any]] = []  # one manifest entry per image
    for count in COUNTS:
        for group, background in enumerate(backgrounds):
            image, objects = demo_image(seed, group, count, image_size, background)
            path = f"images/{count:02d}/{group:04d}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / path, format="PNG")
            images.append({"path": path, "label": count, "group": f"g{group:04d}", "objects": objects})
    manifest = {"settings": settings, "images": images}
    _remove_stale(root, previous, {image["path"] for image in images})
    table = demo_table(manifest)
    table.to_csv(root / "labels.csv", index=False)
    # The manifest goes last: an interrupted run leaves no manifest, so the next run starts over.
    staging = root / "manifest.json.tmp"
    staging.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    staging.replace(root / "manifest.json")
    log.info("generated %d demo images in %s (%s)", len(images), root, settings)
    return table


def demo_settings(n_per_rank: int, image_size: int, seed: int) -> dict[str, int]:
    """What a demo set's manifest records as `settings`; two sets with equal settings are byte-identical."""
    return {"version": GENERATOR_VERSION, "n_per_rank": n_per_rank, "image_size": image_size, "seed": seed}


class DemoMismatchError(ValueError):
    """The folder holds a demo set other than the one asked for (settings differ or files are missing)."""


def read_demo(root: str | Path, n_per_rank: int, image_size: int, seed: int) -> pd.DataFrame | None:
    """The table of the demo set under `root` made with these settings; None when `root` holds none.

    Never writes: the demo set is a DVC output of the `demo` stage, and a side command (prepare
    with another params file, check) that rewrote it in place would change what `dvc status`
    and a concurrent stage see. A folder that holds files but not this set (other settings, an
    interrupted generation, a foreign folder) raises DemoMismatchError naming both settings.
    """
    root = Path(root)
    wanted = demo_settings(n_per_rank, image_size, seed)
    manifest = _read_manifest(root)
    if manifest is not None and manifest["settings"] == wanted and _complete(root, manifest):
        return demo_table(manifest)
    if manifest is None and not (root.is_dir() and any(root.iterdir())):
        return None
    found = (
        "no readable manifest.json"
        if manifest is None
        else (
            f"settings {_describe(manifest['settings'])}"
            if manifest["settings"] != wanted
            else "missing files (an interrupted generation?)"
        )
    )
    raise DemoMismatchError(
        f"{root} does not hold the demo set these params ask for ({_describe(wanted)}; found {found}). "
        f"Only the `demo` stage writes it: run `dvc repro demo` (or `python -m l2rclip.stages.demo_data "
        f"--params <params file> --out {root}`), or set data.root to another folder"
    )


def _describe(settings: Any) -> str:
    """'seed=0, n_per_rank=60, image_size=96' (the version only when it is not this generator's)."""
    if not isinstance(settings, dict):
        return repr(settings)
    keys = [k for k in ("seed", "n_per_rank", "image_size") if k in settings]
    if settings.get("version") != GENERATOR_VERSION:
        keys.append("version")
    return ", ".join(f"{k}={settings[k]}" for k in keys)


def demo_table(manifest: dict[str, Any]) -> pd.DataFrame:
    """Build the source table (`path,label,group`) of a demo manifest."""
    frame = pd.DataFrame([{k: image[k] for k in ("path", "label", "group")} for image in manifest["images"]])
    frame["label"] = frame["label"].astype("int64")
    frame["group"] = frame["group"].astype(object)
    return frame


def demo_image(
    seed: int, group: int, count: int, image_size: int, background: tuple[float, float, float] | None = None
) -> tuple[Image.Image, list[list[Any]]]:
    """Draw one demo image in memory: the picture `generate_demo` writes for (seed, group, count).

    The image depends only on its key (numpy's generator seeded with `[seed, group, count]`, the
    group's background with `[seed, group]`), so a caller can draw any single demo image, e.g. an
    evaluation set that is never written to disk, and get the same pixels as the files.

    Args:
        seed: the demo set's seed.
        group: pseudo-subject index (shares the background).
        count: number of shapes, 1..10.
        image_size: side in pixels.
        background: the group's HSV background when the caller has it already (else drawn).

    Returns:
        The RGB image and its objects `[shape, cx, cy, r]`.
    """
    if background is None:
        background = group_background(seed, group)
    rng = np.random.default_rng([seed, group, count])
    objects = place_objects(rng, count, image_size)
    return draw_shapes(objects, shape_colours(rng, objects, background), image_size, background), objects


def group_background(seed: int, group: int) -> tuple[float, float, float]:
    """The HSV background shared by every image of a demo group."""
    return _background(np.random.default_rng([seed, group]))


def place_objects(
    rng: np.random.Generator,
    count: int,
    size: int,
    scale: float = 1.0,
    same_size: bool = False,
    kinds: Sequence[str] = SHAPES,
) -> list[list[Any]]:
    """Non-overlapping shapes for one image: `[shape, cx, cy, r]`, each inside its circle of radius r.

    Enclosing circles keep at least `GAP` px apart and inside the image, which makes the count
    unambiguous whatever the shape's rotation. Radii shrink with the count so ten shapes still fit;
    if random placement jams, the whole image is retried smaller (still deterministic).

    The demo set uses the defaults. The captioned pretraining corpus (l2rclip.pretraining.corpus)
    varies them so that size stops predicting the count: `scale` shrinks the largest radius,
    `same_size` gives every shape one radius, `kinds` restricts the shape kinds drawn from.
    """
    if not kinds or set(kinds) - set(SHAPES):
        raise ValueError(f"kinds: expected a non-empty subset of {SHAPES}, found {tuple(kinds)}")
    for attempt in range(_PLACEMENT_ATTEMPTS):
        largest = max(MIN_RADIUS, scale * 0.3 * size / math.sqrt(count) * 0.85**attempt)
        radius = _radius(rng, largest) if same_size else None
        objects: list[list[Any]] = []
        while len(objects) < count:
            placed = _place_one(rng, objects, size, largest, radius, kinds)
            if placed is None:
                break
            objects.append(placed)
        else:
            return objects
    raise RuntimeError(f"cannot place {count} shapes of radius >= {MIN_RADIUS} px in {size} px")


def _radius(rng: np.random.Generator, largest: float) -> float:
    return round(float(rng.uniform(max(MIN_RADIUS, 0.55 * largest), largest)), 2)


def _place_one(
    rng: np.random.Generator,
    objects: list[list[Any]],
    size: int,
    largest: float,
    radius: float | None,
    kinds: Sequence[str],
) -> list[Any] | None:
    """One shape clear of `objects` (of `radius`, else a random one); None after `_PLACEMENT_TRIES` misses."""
    for _ in range(_PLACEMENT_TRIES):
        r = _radius(rng, largest) if radius is None else radius
        cx, cy = (round(float(v), 2) for v in rng.uniform(r + 1, size - 1 - r, size=2))
        if all(math.hypot(cx - x, cy - y) >= r + s + GAP for _, x, y, s in objects):
            return [kinds[int(rng.integers(len(kinds)))], cx, cy, r]
    return None


def _background(rng: np.random.Generator) -> tuple[float, float, float]:
    """Draw a group's background as HSV: any hue, muted, either dark or light."""
    dark = bool(rng.integers(2))
    return (
        float(rng.random()),
        float(rng.uniform(0.1, 0.5)),
        float(rng.uniform(0.1, 0.3) if dark else rng.uniform(0.75, 0.95)),
    )


def _rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(red * 255), round(green * 255), round(blue * 255)


def shape_colours(
    rng: np.random.Generator,
    objects: list[list[Any]],
    background: tuple[float, float, float],
    hues: Sequence[float] | None = None,
) -> list[tuple[tuple[int, int, int], float]]:
    """Colour and rotation of every shape: vivid, with a brightness far from the background's.

    Args:
        rng: drawn from in the demo set's order (per shape: brightness, hue, saturation, rotation).
        objects: `[shape, cx, cy, r]` per shape.
        background: HSV of the background (light or dark decides the shapes' brightness).
        hues: a fixed hue in [0, 1) per shape (the captioned corpus names colours), or None for
            random hues as in the demo set.

    Returns:
        `(rgb, turn)` per shape, `turn` the rotation in radians (unused for circles).
    """
    light_background = background[2] > 0.5
    styles = []
    for index, (shape, *_) in enumerate(objects):
        value = rng.uniform(0.15, 0.4) if light_background else rng.uniform(0.8, 1.0)
        hue = float(rng.random()) if hues is None else float(hues[index])
        colour = _rgb(hue, float(rng.uniform(0.6, 1.0)), float(value))
        styles.append((colour, 0.0 if shape == "circle" else float(rng.uniform(0.0, 2 * math.pi))))
    return styles


def draw_shapes(
    objects: list[list[Any]],
    styles: Sequence[tuple[tuple[int, int, int], float]],
    size: int,
    background: tuple[float, float, float],
) -> Image.Image:
    """Render shapes (`[shape, cx, cy, r]`, styled by `shape_colours`) on an HSV background."""
    image = Image.new("RGB", (size, size), _rgb(*background))
    draw = ImageDraw.Draw(image)
    for (shape, cx, cy, r), (colour, turn) in zip(objects, styles, strict=True):
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
            continue
        corners = _CORNERS[shape]
        draw.polygon(
            [
                (
                    cx + r * math.cos(turn + 2 * math.pi * k / corners),
                    cy + r * math.sin(turn + 2 * math.pi * k / corners),
                )
                for k in range(corners)
            ],
            fill=colour,
        )
    return image


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; regenerating the demo set", path)
        return None
    return manifest if isinstance(manifest, dict) and {"settings", "images"} <= set(manifest) else None


def _complete(root: Path, manifest: dict[str, Any]) -> bool:
    return (root / "labels.csv").is_file() and all((root / i["path"]).is_file() for i in manifest["images"])


def _remove_stale(root: Path, previous: dict[str, Any] | None, keep: set[str]) -> None:
    """Delete images of an earlier generation that this one did not rewrite (e.g. fewer per rank)."""
    for image in previous["images"] if previous else ():
        if image["path"] not in keep:
            (root / image["path"]).unlink(missing_ok=True)
