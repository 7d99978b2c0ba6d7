"""Make the small example folder: images of mixed sizes and modes, generated, no downloads.

    python examples/make_examples.py examples/images

The tests use the same function for their fixtures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth, photo-like RGB image (gradients and blobs), uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 6.3)]
        out[..., c] = 0.5 + 0.5 * np.sin(
            fx * x / max(width, 1) * 6.3 + fy * y / max(height, 1) * 6.3 + phase
        )
    for _ in range(4):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(5, 80)
        out += (
            0.4
            * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
            * rng.uniform(-1, 1, 3)
        )
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def make_examples(folder: Path) -> list[Path]:
    """Write the example images into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []

    def save(name: str, img: Image.Image, **kwargs: object) -> None:
        path = folder / name
        img.save(path, **kwargs)
        made.append(path)

    save("landscape.jpg", Image.fromarray(photo(240, 320, 1)), quality=90)
    save("portrait.png", Image.fromarray(photo(300, 200, 2)))
    # Stored 160x120 landscape, displayed as 120x160 portrait (EXIF orientation 6 = rotate 90 CW).
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated_exif.jpg", Image.fromarray(photo(120, 160, 3)), exif=exif.tobytes(), quality=90)
    save("gray.png", Image.fromarray(photo(129, 257, 4)[..., 0]))
    rgba = np.dstack(
        [photo(100, 150, 5), np.tile(np.linspace(0, 255, 150, dtype=np.uint8), (100, 1))]
    )
    save("transparent.png", Image.fromarray(rgba))
    save("cmyk.jpg", Image.fromarray(photo(90, 110, 6)).convert("CMYK"), quality=90)
    save("tiny_1x1.png", Image.fromarray(np.array([[[200, 30, 60]]], np.uint8)))
    save("strip_3x500.png", Image.fromarray(photo(3, 500, 7)))
    save(
        "palette.gif",
        Image.fromarray(photo(64, 96, 8)).convert("P", palette=Image.Palette.ADAPTIVE),
    )
    sixteen = photo(80, 100, 9)[..., 1].astype(np.uint16) * 257
    save("deep_16bit.png", Image.fromarray(sixteen))
    (folder / "sub").mkdir(exist_ok=True)
    save("sub/nested.bmp", Image.fromarray(photo(50, 70, 10)))
    save("sub/UPPER.TIFF", Image.fromarray(photo(64, 48, 11)))
    (folder / "README.txt").write_text("not an image: ignored\n")
    return made


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "images"
    for path in make_examples(target):
        print(path)
