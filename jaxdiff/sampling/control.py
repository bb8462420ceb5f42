"""ControlNet guidance in the sampling loop: several nets, per-net scales and step windows, guess mode (diffusers'
StableDiffusionControlNetPipeline and MultiControlNetModel semantics)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.models import controlnet as controlnet_lib
from jaxdiff.sampling.image_conditioning import as_image_batch


@dataclasses.dataclass(frozen=True)
class ControlRequest:
    """Validated host inputs per net: images [B, H, W, 3] in [0, 1], scales, and keep [nets, steps] (1 where a
    step lies inside the net's [start, end] window, as diffusers' controlnet_keep)."""

    images: tuple
    scales: np.ndarray
    keep: np.ndarray
    guess_mode: bool


def _per_net(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise UserError(f"{len(values)} values of {name} for {n} ControlNets")
    return values


def request(nets, images, scale, start, end, guess_mode, batch, height, width, num_steps, unet_config):
    """A ControlRequest, or one-line UserErrors: a count that does not match the nets, a window outside [0, 1] or
    empty, an image of another size, a ControlNet that does not fit the UNet."""
    if not nets:
        raise UserError("control images need a ControlNet (load_pipeline(..., controlnet=PATH))")
    images = images if isinstance(images, (list, tuple)) else [images]
    if len(images) != len(nets):
        raise UserError(f"{len(images)} control images for {len(nets)} ControlNets")
    for net in nets:
        controlnet_lib.check_compatible(net.config, unet_config)
    images = [as_image_batch(im, batch) for im in images]
    for im in images:
        if im.shape[1:3] != (height, width):
            raise UserError(f"a control image is {im.shape[1]}x{im.shape[2]}, the output {height}x{width}")
    scales = [float(s) for s in _per_net(scale, len(nets), "controlnet_scale")]
    starts = [float(s) for s in _per_net(start, len(nets), "control_start")]
    ends = [float(e) for e in _per_net(end, len(nets), "control_end")]
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise UserError(f"a control window must satisfy 0 <= start < end <= 1, got [{s}, {e}]")
    i = np.arange(num_steps)
    keep = np.stack([1.0 - ((i / num_steps < s) | ((i + 1) / num_steps > e)) for s, e in zip(starts, ends)])
    return ControlRequest(tuple(images), np.asarray(scales, np.float32), keep.astype(np.float32), bool(guess_mode))


class WithControlNets:
    """The UNet call with the summed residuals of every ControlNet at this step: model(x, t, cond) as `denoise` calls
    it, rows [cond; uncond] under classifier-free guidance. In guess mode the nets see only the conditional rows
    and the unconditional rows get zero residuals."""

    def __init__(self, model, nets, net_params, images, scales, keep, timesteps, guess_mode: bool):
        self.model, self.nets, self.net_params = model, nets, net_params
        self.images, self.scales, self.keep, self.timesteps = images, scales, keep, timesteps
        self.guess_mode = guess_mode

    def __call__(self, x, t, cond):
        n = self.images[0].shape[0]
        rows = x.shape[0]
        step = jnp.argmax(self.timesteps == t[0])  # the plan step (the first, where a scheduler repeats one)
        split = self.guess_mode and rows > n
        take = (lambda a: a[:n]) if split else (lambda a: a)
        x_c, t_c, (context, added) = take(x), take(t), jax.tree_util.tree_map(take, cond)
        down, mid = None, None
        for k, (net, params, image) in enumerate(zip(self.nets, self.net_params, self.images)):
            image = jnp.concatenate([image] * (x_c.shape[0] // n)).astype(x.dtype)
            d, m = net.apply(
                params,
                x_c,
                t_c,
                context,
                image,
                added,
                conditioning_scale=self.scales[k] * self.keep[k, step],
                guess_mode=self.guess_mode,
            )
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if split:  # the unconditional rows run without control
            down = [jnp.concatenate([r, jnp.zeros_like(r)]) for r in down]
            mid = jnp.concatenate([mid, jnp.zeros_like(mid)])
        return self.model(x, t, cond, residuals=(down, mid))
