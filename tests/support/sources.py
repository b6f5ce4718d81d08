"""Image sources with one row of every kind of bad input, for validation and prepare tests."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

EXIF_ORIENTATION = 0x0112


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width x height` pixels but holds no image data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def write_good_images(folder: Path) -> dict[str, str]:
    """One image per awkward-but-valid format; returns file name -> expected stored mode."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 12), 90).save(folder / "grey.png")
    rgba = Image.new("RGBA", (16, 12), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(folder / "alpha.png")
    palette = Image.new("P", (16, 12), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(folder / "palette.png", transparency=0)
    Image.new("LA", (16, 12), (200, 0)).save(folder / "grey_alpha.png")
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((12, 16), 128 * 257, dtype=np.uint16)).save(folder / "wide.png")
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    noise((16, 12)).save(folder / "plain.jpg")
    return {
        "grey.png": "L",
        "alpha.png": "RGBA",
        "palette.png": "P",
        "grey_alpha.png": "LA",
        "cmyk.jpg": "CMYK",
        "wide.png": "I;16",
        "rotated.jpg": "RGB",
        "plain.jpg": "RGB",
    }


def build_mixed_source(folder: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Good images of every format and one row of each bad kind, listed in `folder/labels.csv`.

    Returns the table and, for each bad row's path, its expected reason (labels are 1 or 2).
    """
    good = write_good_images(folder)
    (folder / "empty.jpg").write_bytes(b"")
    noise((64, 64), seed=1).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(2).bytes(500))
    (folder / "bomb.png").write_bytes(png_header_only(10_000, 10_000))  # warning-sized: > MAX pixels
    (folder / "huge_bomb.png").write_bytes(png_header_only(20_000, 20_000))  # > 2 x MAX: PIL's error
    Image.new("RGB", (8, 8)).save(folder / "text_label.png")
    Image.new("RGB", (8, 8)).save(folder / "eleven.png")
    rows = [(name, 1 + i % 2, f"p{i}") for i, name in enumerate(sorted(good))]
    bad = {
        "missing.jpg": ("missing_file", 1),
        "empty.jpg": ("empty_file", 2),
        "truncated.jpg": ("corrupt_image", 1),
        "garbage.jpg": ("corrupt_image", 2),
        "bomb.png": ("decompression_bomb", 1),
        "huge_bomb.png": ("decompression_bomb", 2),
        "text_label.png": ("non_numeric_label", "abc"),
        "eleven.png": ("label_not_in_ranks", 11),
    }
    rows += [(name, label, f"q{i}") for i, (name, (_, label)) in enumerate(bad.items())]
    rows.append(("plain.jpg", 2, "p_dup"))
    table = pd.DataFrame(rows, columns=["path", "label", "group"])
    table.to_csv(folder / "labels.csv", index=False)
    return table, {name: reason for name, (reason, _) in bad.items()}
