"""Instance images for personalization: a folder of same-size images, optional per-image captions (IMAGE.txt)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxdiff.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of `folder` (sorted); a UserError when it is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    return files


def load_images(folder: str | os.PathLike, size: int | None = None) -> tuple[np.ndarray, list[str | None]]:
    """(images [N, H, W, 3] float32 in [0, 1], captions [N]: the text of IMAGE.txt beside each image, else None).

    Every image must have the same size, and `size` x `size` when given (the model's resolution): one UserError
    naming the offending files otherwise."""
    from PIL import Image

    files = image_files(folder)
    images, sizes = [], {}
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"), np.float32) / 255.0
        except OSError as e:
            raise UserError(f"--images: cannot read {f}: {e}") from None
        images.append(arr)
        sizes.setdefault(arr.shape[:2], []).append(f.name)
    if len(sizes) > 1:
        desc = "; ".join(
            f"{h}x{w}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for (h, w), names in sizes.items()
        )
        raise UserError(f"--images {folder}: images of different sizes ({desc}); give images of one size")
    (h, w) = next(iter(sizes))
    if size is not None and (h, w) != (size, size):
        raise UserError(f"--images {folder}: images are {h}x{w}, the model makes {size}x{size}; resize them first")
    captions = []
    for f in files:
        txt = f.with_suffix(".txt")
        captions.append(" ".join(txt.read_text().split()) if txt.is_file() else None)
    return np.stack(images), captions


def write_shapes_renders(
    folder: str | os.PathLike,
    n: int,
    token: str,
    shape: str = "star",
    seed: int = 0,
    size: int = 32,
    sizes: tuple[str, ...] = ("small", "large"),
) -> list[str]:
    """n single-object renders of the shapes world whose shape is `shape` (e.g. a held-out one), varied colour
    (training colours), position and background, object size from `sizes`, as PNGs with IMAGE.txt captions naming
    the shape `token` ("a large red <v> on the left on a white background"); returns the captions."""
    import dataclasses

    from jaxdiff.data import shapes as S
    from jaxdiff.images import save_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 61])
    captions = []
    for i in range(n):
        scene = S.sample_scene(rng, num_objects=1, shapes=(shape,))
        obj = dataclasses.replace(scene.objects[0], size=str(rng.choice(sizes)))
        scene = dataclasses.replace(scene, objects=(obj,))
        text = (
            f"a {obj.size} {obj.colour} {token} {S.TRAIN_PHRASES[obj.position][0]} on a {scene.background} background"
        )
        save_png(folder / f"{i:03d}.png", S.render(scene, size))
        (folder / f"{i:03d}.txt").write_text(text + "\n")
        captions.append(text)
    return captions
