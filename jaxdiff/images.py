"""Image files: atomic PNG writes and labelled grids for people to look at."""

from __future__ import annotations

import os

import numpy as np

from jaxdiff import fileio


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] (or uint8) [H, W, 3] -> uint8."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a PNG atomically and durably (temp file in the same folder, fsync, rename)."""
    from PIL import Image

    with fileio.atomic_file(path, "wb") as f:
        Image.fromarray(to_uint8(image)).save(f, format="PNG")


def read_image(path: str | os.PathLike, mode: str = "RGB") -> np.ndarray:
    """A PNG/JPEG file as uint8 [H, W, 3] ("RGB") or [H, W] ("L"); an unreadable file is a one-line UserError."""
    from PIL import Image, UnidentifiedImageError

    from jaxdiff.errors import UserError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except FileNotFoundError:
        raise UserError(f"no image at {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


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


def labeled_rows(
    rows: list[tuple[str, np.ndarray]], min_cell: int = 64, pad: int = 2, label_width: int = 150
) -> np.ndarray:
    """One uint8 image: a text label, then the images [N, H, W, 3] of each row (rows may differ in length)."""
    from PIL import Image, ImageDraw

    columns = max(len(images) for _, images in rows)
    blocks = []
    for label, images in rows:
        images = np.asarray([to_uint8(im) for im in images]) if len(images) else np.zeros((0, 1, 1, 3), np.uint8)
        h = max(min_cell, images.shape[1]) if len(images) else min_cell
        if len(images):  # a short row: make_grid leaves its missing cells white, the strip as wide as a full one
            strip = make_grid(images, columns=columns, min_cell=min_cell, pad=pad)
        else:
            strip = np.full((h + 2 * pad, columns * (h + pad) + pad, 3), 255, np.uint8)
        text = Image.new("RGB", (label_width, strip.shape[0]), (255, 255, 255))
        ImageDraw.Draw(text).multiline_text((4, 4), label, fill=(0, 0, 0))
        blocks.append(np.concatenate([np.asarray(text), strip], axis=1))
    width = max(b.shape[1] for b in blocks)
    blocks = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in blocks]
    return np.concatenate(blocks, axis=0)


PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def scatter_plot(points, x_label: str, y_label: str, title: str = "", size: tuple[int, int] = (720, 480)) -> np.ndarray:
    """A scatter plot as a uint8 image: points (x, y, group, ringed), one colour per group (legend on the right),
    ringed points circled; both axes span [0, max(1, largest value)]."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 60, 170, 30, 50
    im = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(im)
    x_max = max([1.0, *(float(p[0]) for p in points)])
    y_max = max([1.0, *(float(p[1]) for p in points)])
    x_min = min([0.0, *(float(p[0]) for p in points)])
    y_min = min([0.0, *(float(p[1]) for p in points)])

    def at(x, y):
        px = left + (x - x_min) / (x_max - x_min) * (width - left - right)
        py = height - bottom - (y - y_min) / (y_max - y_min) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for i in range(5):
        fx, fy = x_min + (x_max - x_min) * i / 4, y_min + (y_max - y_min) * i / 4
        px, _ = at(fx, y_min)
        _, py = at(x_min, fy)
        draw.line([px, height - bottom, px, height - bottom + 4], fill=(0, 0, 0))
        draw.text((px - 10, height - bottom + 6), f"{fx:.2f}", fill=(0, 0, 0))
        draw.line([left - 4, py, left, py], fill=(0, 0, 0))
        draw.text((8, py - 6), f"{fy:.2f}", fill=(0, 0, 0))
    draw.text(((left + width - right) // 2 - 40, height - 22), x_label, fill=(0, 0, 0))
    draw.text((8, 8), y_label + (f"    {title}" if title else ""), fill=(0, 0, 0))
    groups = list(dict.fromkeys(p[2] for p in points))
    for x, y, group, ringed in points:
        colour = PALETTE[groups.index(group) % len(PALETTE)]
        px, py = at(float(x), float(y))
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        if ringed:
            draw.ellipse([px - 7, py - 7, px + 7, py + 7], outline=(0, 0, 0), width=2)
    for i, group in enumerate(groups):
        y = top + 14 * i
        draw.ellipse([width - right + 12, y + 3, width - right + 18, y + 9], fill=PALETTE[i % len(PALETTE)])
        draw.text((width - right + 24, y), str(group), fill=(0, 0, 0))
    draw.text((width - right + 12, top + 14 * len(groups) + 6), "ringed: selected", fill=(0, 0, 0))
    return np.asarray(im)
