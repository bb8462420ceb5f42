"""Image files: atomic PNG writes and labelled grids for people to look at."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] (or uint8) [H, W, 3] -> uint8."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a PNG atomically (temp file in the same folder, then rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(to_uint8(image)).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def make_grid(images, columns: int | None = None, min_cell: int = 128, pad: int = 2) -> np.ndarray:
    """Tile images [N, H, W, 3] into one uint8 image; small images are enlarged (nearest) to >= min_cell."""
    images = [to_uint8(im) for im in images]
    n = len(images)
    columns = columns or min(n, 8)
    rows = -(-n // columns)
    h, w = images[0].shape[:2]
    scale = max(1, -(-min_cell // max(h, w)))
    images = [im.repeat(scale, 0).repeat(scale, 1) for im in images]
    h, w = h * scale, w * scale
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    return grid
