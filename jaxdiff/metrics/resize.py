"""The FID references' image resizes (torch bilinear, TF1 bilinear, PIL bicubic) as separable matrices on NHWC."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# method -> how the reference resizes
METHODS = {
    # torch F.interpolate(mode="bilinear", align_corners=False): half-pixel centres, no antialiasing (pytorch-fid)
    "bilinear": "torch",
    # TF1 resize_bilinear(align_corners=False, half_pixel_centers=False): src = dst * in / out (torch-fidelity)
    "bilinear_tf1": "tf1",
    # PIL Image.resize(BICUBIC) on a float ('F') image: a=-0.5 kernel widened by the scale when shrinking (clean-fid)
    "pil_bicubic": "pil",
}


def _bilinear_torch(in_size: int, out_size: int) -> np.ndarray:
    # aten upsample_bilinear2d on CPU: src = scale * (dst + 0.5) - 0.5 in float32 with one rounding (the kernel's
    # fused multiply-add; the float64 product of two float32s is exact), clamped at 0; the upper neighbour clamped to
    # the edge. Equal to torch's weights bit for bit (checked for 11 to 1024 pixels).
    scale = np.float32(in_size) / np.float32(out_size)
    half = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = np.maximum((np.float64(scale) * half.astype(np.float64) - 0.5).astype(np.float32), np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(np.float32), 0.0, 1.0).astype(np.float64)
    return _two_taps(in_size, lo, hi, frac)


def _bilinear_tf1(in_size: int, out_size: int) -> np.ndarray:
    # torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x ("slow", bit-exact on CPU): positions computed in
    # float32 as arange(out) * float32(in / out).
    src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float64)
    return _two_taps(in_size, lo, hi, frac)


def _two_taps(in_size, lo, hi, frac) -> np.ndarray:
    m = np.zeros((len(lo), in_size))
    rows = np.arange(len(lo))
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _bicubic(x: np.ndarray) -> np.ndarray:
    # PIL's bicubic_filter with a = -0.5
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _pil_bicubic(in_size: int, out_size: int) -> np.ndarray:
    # PIL Resample.c precompute_coeffs: support scaled by the shrink factor, taps [xmin, xmax) rounded as C casts,
    # weights normalised to sum 1; all in double.
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    m = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax)
        w = _bicubic((taps - center + 0.5) / filterscale)
        total = w.sum()
        m[xx, xmin:xmax] = w / total if total != 0.0 else w
    return m


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """[out_size, in_size] float64: one axis of `method`'s resize as a linear map (the identity when sizes match, as
    each reference then leaves the axis untouched)."""
    if method not in METHODS:
        raise ValueError(f"unknown resize method {method!r} (known: {', '.join(METHODS)})")
    if in_size == out_size:
        return np.eye(in_size)
    build = {"torch": _bilinear_torch, "tf1": _bilinear_tf1, "pil": _pil_bicubic}[METHODS[method]]
    return build(in_size, out_size)


def resize(x, size: tuple[int, int], method: str):
    """Resize float NHWC `x` to `size` = (height, width): the width pass first, then the height pass (PIL's order and
    torch's), each a float32 matmul at full precision."""
    _, h, w, _ = x.shape
    out_h, out_w = size
    x = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    if w != out_w:
        mw = jnp.asarray(resize_matrix(w, out_w, method), jnp.float32)
        x = jnp.einsum("bhwc,ow->bhoc", x, mw, precision=hi)
    if h != out_h:
        mh = jnp.asarray(resize_matrix(h, out_h, method), jnp.float32)
        x = jnp.einsum("bhwc,oh->bowc", x, mh, precision=hi)
    return x
