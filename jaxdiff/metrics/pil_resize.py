"""PIL's `Image.resize` of uint8 images, bit-exact, in JAX (the resampling the CLIP processor and clean-fid use)."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

# Pillow's src/libImaging/Resample.c: fixed-point coefficients with 22 fraction bits for 8-bit images.
PRECISION_BITS = 32 - 8 - 2


def _box(x):
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x):
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _hamming(x):
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x *= math.pi
    # Pillow writes the constants as C floats (0.54f, 0.46f), promoted to double.
    return math.sin(x) / x * (float(np.float32(0.54)) + float(np.float32(0.46)) * math.cos(x))


def _bicubic(x, a=-0.5):
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x):
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x):
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


# name -> (kernel, support), as PIL.Image.Resampling BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS.
FILTERS = {
    "box": (_box, 0.5),
    "bilinear": (_bilinear, 1.0),
    "hamming": (_hamming, 1.0),
    "bicubic": (_bicubic, 2.0),
    "lanczos": (_lanczos, 3.0),
}


@functools.lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int, method: str = "bicubic") -> np.ndarray:
    """Pillow's fixed-point resampling matrix [out_size, in_size] (int64) for one axis (`precompute_coeffs` then
    `normalize_coeffs_8bpc`): the filter is widened by the downscale factor (antialiasing) and each row normalised."""
    if method not in FILTERS:
        raise ValueError(f"unknown resampling method {method!r}; choose from {sorted(FILTERS)}")
    kernel, support = FILTERS[method]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ss = 1.0 / filterscale
    matrix = np.zeros((out_size, in_size), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        # C's (int) truncates toward zero, as int() does.
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        weights = [kernel((x - center + 0.5) * ss) for x in range(xmin, xmax)]
        total = sum(weights)  # summed in order, as Pillow does
        for x, w in zip(range(xmin, xmax), weights):
            w = w / total if total != 0.0 else w
            fixed = w * (1 << PRECISION_BITS)
            matrix[xx, x] = int(fixed - 0.5) if w < 0 else int(fixed + 0.5)
    return matrix


# The fixed-point coefficients are split as k = hi * 2^SPLIT + lo (0 <= lo < 2^SPLIT) so that both float32 matmuls
# stay below 2^24 (exact integers on every backend) and no integer matmul is needed (slow or absent on accelerators):
# 255 * sum|hi| ~ 255 * 1.3 * 2^14 and 255 * 2^8 * taps, exact up to ~60x downscaling with bicubic.
_SPLIT = 8


def _pass(x, matrix: np.ndarray, axis: int):
    """One axis of PIL's resampling of uint8-valued x [B, H, W, C] (int32); the result is clipped uint8 (int32)."""
    hi, lo = np.divmod(matrix, 1 << _SPLIT)
    if 255 * max(np.abs(hi).sum(axis=1).max(), lo.sum(axis=1).max()) >= 1 << 24:
        raise ValueError(f"downscaling {matrix.shape[1]} -> {matrix.shape[0]} is too large for exact resampling")
    xf = x.astype(jnp.float32)
    spec = "bhwc,oh->bowc" if axis == 1 else "bhwc,ow->bhoc"

    def apply(m):
        y = jnp.einsum(spec, xf, jnp.asarray(m, jnp.float32), precision="highest")
        return y.astype(jnp.int32)

    acc = apply(hi) * (1 << _SPLIT) + apply(lo) + (1 << (PRECISION_BITS - 1))
    return jnp.clip(acc >> PRECISION_BITS, 0, 255)  # Pillow's clip8 (the shift floors negative sums)


ORDERS = ("pillow13", "pillow12")


def vertical_first(height: int, width: int, out_height: int, out_width: int, order: str = "pillow13") -> bool:
    """Whether Pillow runs the vertical pass first. Pillow <= 12 always resamples horizontally first; Pillow 13
    (python-pillow/Pillow#9549, "if height is scaled down significantly more than width, resize vertically first")
    goes vertical first when the height loses more than twice as many pixels as the width (for an aspect-preserving
    downscale: images more than twice as tall as wide). The rule here was fitted to Pillow 13.0.0 on 700 random shapes
    without an exception; the pass order changes the rounding of the intermediate image."""
    if order not in ORDERS:
        raise ValueError(f"unknown Pillow pass order {order!r}; choose from {ORDERS}")
    return order == "pillow13" and out_height < height and height - out_height > 2 * (width - out_width)


def pil_resize(images, height: int, width: int, method: str = "bicubic", order: str = "pillow13"):
    """uint8 images [B, H, W, C] -> [B, height, width, C] uint8, equal to `PIL.Image.resize((width, height),
    method)` per image: two separable passes, each rounded to uint8 as Pillow does, in Pillow's order (`order`:
    "pillow13", the pinned Pillow, or "pillow12", always horizontal first). Jittable."""
    x = jnp.asarray(images).astype(jnp.int32)
    _, h, w, _ = x.shape
    passes = [(2, w, width), (1, h, height)]
    if vertical_first(h, w, height, width, order):
        passes.reverse()
    for axis, size, out in passes:
        if size != out:
            x = _pass(x, coefficients(size, out, method), axis=axis)
    return x.astype(jnp.uint8)
