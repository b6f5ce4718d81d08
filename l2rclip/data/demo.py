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
from dataclasses import asdict, dataclass
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
SIZES = ("count", "free")
_FREE_SIZE_RANGE = (1.0, 2.0)  # "free" sizes: the largest radius, in units of the ten-shape radius


@dataclass(frozen=True)
class DemoStyle:
    """What a drawn image may show; the default is the demo set's own style, drawn exactly as before.

    A shifted domain for the method study (l2rclip.stages.method_study): training shots restricted to
    one kind, a band of hues and sizes that fall with the count, test images with every kind, hue and
    size, so that a model which learnt "big red circles mean few" from the shots is found out.

    Attributes:
        kinds: the shape kinds drawn from (a non-empty subset of SHAPES).
        hues: (low, high): every shape's hue is drawn uniformly from [low, high) modulo 1 (so
            (-0.05, 0.1) is red to orange); None: any hue, as in the demo set.
        sizes: `count`: the largest radius falls as 1/sqrt(count), as in the demo set (size hints
            the count); `free`: the largest radius is drawn independently of the count, between
            1 and 2 times the ten-shape radius (capped where the count's demo size is smaller).
    """

    kinds: tuple[str, ...] = SHAPES
    hues: tuple[float, float] | None = None
    sizes: str = "count"

    def __post_init__(self) -> None:
        if not self.kinds or set(self.kinds) - set(SHAPES):
            raise ValueError(f"DemoStyle.kinds: expected a non-empty subset of {SHAPES}, found {self.kinds}")
        if self.hues is not None and not (len(self.hues) == 2 and 0 < self.hues[1] - self.hues[0] <= 1):
            raise ValueError(f"DemoStyle.hues: expected (low, high) with 0 < high - low <= 1, found {self.hues}")
        if self.sizes not in SIZES:
            raise ValueError(f"DemoStyle.sizes: expected one of {SIZES}, found {self.sizes!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DemoStyle:
        """The style of a dict such as `to_dict` writes (lists for tuples); unknown keys are an error."""
        unknown = sorted(set(values) - {"kinds", "hues", "sizes"})
        if unknown:
            raise ValueError(f"DemoStyle: unknown key(s) {', '.join(unknown)}; expected kinds, hues, sizes")
        hues = values.get("hues")
        return cls(
            kinds=tuple(values.get("kinds", SHAPES)),
            hues=None if hues is None else (float(hues[0]), float(hues[1])),
            sizes=values.get("sizes", "count"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists for tuples."""
        values = asdict(self)
        return {**values, "kinds": list(self.kinds), "hues": None if self.hues is None else list(self.hues)}

    def scale(self, rng: np.random.Generator, count: int) -> float:
        """The `place_objects` scale of one image; draws from `rng` only for `free` sizes."""
        if self.sizes == "count":
            return 1.0
        # place_objects' largest radius is scale * 0.3 * size / sqrt(count): aim it at a drawn
        # multiple of the ten-shape radius 0.3 * size / sqrt(10), whatever the count.
        target = float(rng.uniform(*_FREE_SIZE_RANGE)) / math.sqrt(max(COUNTS))
        return min(1.0, target * math.sqrt(count))

    def shape_hues(self, rng: np.random.Generator, n_shapes: int) -> list[float] | None:
        """One hue per shape from the band, or None (random hues, drawn by shape_colours) without drawing."""
        if self.hues is None:
            return None
        return [float(h) % 1.0 for h in rng.uniform(*self.hues, size=n_shapes)]


DEMO_STYLE = DemoStyle()


def generate_demo(
    root: str | Path, n_per_rank: int = 60, image_size: int = 96, seed: int = 0, style: DemoStyle = DEMO_STYLE
) -> pd.DataFrame:
    """Write the demo set under `root` (unless it is already there) and return its table.

    Args:
        root: output folder, created if needed.
        n_per_rank: images per count 1..10 (also the number of pseudo-subject groups).
        image_size: side of the square images, in pixels.
        seed: everything drawn depends only on it (and on the image's count and group).
        style: what the images may show (`DemoStyle`); the default draws the demo set.

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
    settings = demo_settings(n_per_rank, image_size, seed, style)
    previous = _read_manifest(root)
    if previous is not None and previous["settings"] == settings and _complete(root, previous):
        log.info("demo set in %s is up to date (%s)", root, settings)
        return demo_table(previous)
    backgrounds = [group_background(seed, group) for group in range(n_per_rank)]
    images: list[dict[str, Any]] = []  # one manifest entry per image
    for count in COUNTS:
        for group, background in enumerate(backgrounds):
            image, objects = demo_image(seed, group, count, image_size, background, style)
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


def demo_settings(n_per_rank: int, image_size: int, seed: int, style: DemoStyle = DEMO_STYLE) -> dict[str, Any]:
    """What a demo set's manifest records as `settings`; two sets with equal settings are byte-identical.

    The style appears only when it is not the demo set's own, so the demo set's manifest is unchanged.
    """
    settings: dict[str, Any] = {
        "version": GENERATOR_VERSION,
        "n_per_rank": n_per_rank,
        "image_size": image_size,
        "seed": seed,
    }
    if style != DEMO_STYLE:
        settings["style"] = style.to_dict()
    return settings


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
    seed: int,
    group: int,
    count: int,
    image_size: int,
    background: tuple[float, float, float] | None = None,
    style: DemoStyle = DEMO_STYLE,
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
        style: what the image may show; the default style draws nothing more from the generator
            than the demo set always did, so its pixels are unchanged.

    Returns:
        The RGB image and its objects `[shape, cx, cy, r]`.
    """
    if background is None:
        background = group_background(seed, group)
    rng = np.random.default_rng([seed, group, count])
    objects = place_objects(rng, count, image_size, scale=style.scale(rng, count), kinds=style.kinds)
    styles = shape_colours(rng, objects, background, style.shape_hues(rng, len(objects)))
    return draw_shapes(objects, styles, image_size, background), objects


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
