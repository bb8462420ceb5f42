"""Writes a PNG grid of sample `shapes` scenes and prints their captions (row-major) to stdout.

python tools/render_shapes_grid.py --rows 4 --cols 6 --size 32 --scale 4 --out shapes_grid.png
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdiff import fileio  # noqa: E402
from jaxdiff.data import shapes  # noqa: E402


def make_grid(images: list[np.ndarray], cols: int, scale: int, pad: int = 2) -> np.ndarray:
    """Tiles uint8 [H, W, 3] images, each upscaled `scale`x (nearest), on a mid-grey canvas."""
    h, w = images[0].shape[0] * scale, images[0].shape[1] * scale
    rows = -(-len(images) // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 128, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = img.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_png_atomic(array: np.ndarray, path: str) -> None:
    """Writes a PNG through a temporary file in the same folder, fsync'd, then renamed into place."""
    from PIL import Image

    with fileio.atomic_file(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--cols", type=int, default=6)
    p.add_argument("--size", type=int, default=32, help="image side in pixels (32 or 64 in the data set)")
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling for viewing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-objects", type=int, choices=[0, 1, 2], default=0, help="0: mix of one and two")
    p.add_argument("--split", choices=["train", "heldout"], default="train", help="which caption templates")
    p.add_argument("--out", default="shapes_grid.png")
    args = p.parse_args(argv)
    if min(args.rows, args.cols, args.size, args.scale) <= 0:
        p.error("--rows, --cols, --size and --scale must be positive")
    rng = np.random.default_rng(args.seed)
    images = []
    for k in range(args.rows * args.cols):
        scene = shapes.sample_scene(rng, num_objects=args.num_objects or None)
        images.append(shapes.render(scene, args.size))
        print(f"{k:3d}  {shapes.caption(scene, rng, args.split)}")
    save_png_atomic(make_grid(images, args.cols, args.scale), args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
