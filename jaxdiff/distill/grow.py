"""A deeper student UNet that starts as its init's exact function: added transformer blocks with zero outputs.

InstaFlow's answer to a one-step student that its teacher's size cannot carry is a larger network (InstaFlow-1.7B
stacks two U-Nets). `deepen` grows every Transformer2DModel of a UNet from its `transformer_layers_per_block` to
`layers` blocks and initialises the added blocks so that the grown UNet computes what the init computed: a
BasicTransformerBlock is x + attn1(·) + attn2(·) + ff(·) (pre-norm residuals), so with the three output projections
(attn1/attn2 to_out_0, ff net_2) at zero it is the identity, while its other weights keep a fresh random init (the
zero projections receive gradient at once, and through them the rest: ControlNet's zero-convolution argument). The
grown UNet is still a diffusers UNet2DConditionModel (`transformer_layers_per_block`), so it loads, samples and
exports as any other.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import traverse_util

from jaxdiff.errors import UserError

# The output projections of a BasicTransformerBlock's three residual branches (jaxdiff/models/transformer.py).
ZERO_BRANCHES = (("attn1", "to_out_0"), ("attn2", "to_out_0"), ("ff", "net_2"))
# UNet config keys that `deepen` changes (a grown student's init may differ from its teacher in these only).
GROWN_KEYS = ("transformer_layers_per_block", "reverse_transformer_layers_per_block")


def transformer_layers(config: dict) -> list[int]:
    """The UNet's transformer blocks per down block (an int in the config means the same for every block)."""
    from jaxdiff.models.unet import resolved_config

    return [int(n) for n in resolved_config(config)["transformer_layers_per_block"]]


def deepen(unet, layers: int, seed: int = 0):
    """`unet` (a jaxdiff UNet Model) with `layers` transformer blocks in each Transformer2DModel, the added ones at
    zero output; `layers` equal to the current depth returns `unet` itself."""
    from jaxdiff.models.model import create

    current = transformer_layers(unet.config)
    if unet.config.get("reverse_transformer_layers_per_block"):
        raise UserError("student.transformer_layers: the UNet sets reverse_transformer_layers_per_block (SDXL-style)")
    if layers < max(current):
        raise UserError(f"student.transformer_layers={layers} is fewer than the init's {max(current)} blocks")
    if all(n == layers for n in current):
        return unet
    config = {**unet.config, "transformer_layers_per_block": int(layers)}
    m = unet.module
    grown = create(
        unet.architecture, config, abstract=False, dtype=m.dtype, attention=m.attention, platform=m.platform, seed=seed
    )
    old = traverse_util.flatten_dict(jax.device_get(unet.params))
    new = traverse_util.flatten_dict(jax.device_get(grown.params))
    lost = sorted("/".join(k) for k in old if k not in new)
    if lost:
        raise ValueError(f"deepen: params of the init missing from the grown UNet: {lost[:5]}")
    params = {}
    for path, fresh in new.items():
        if path in old:
            if np.shape(old[path]) != np.shape(fresh):
                raise ValueError(f"deepen: {'/'.join(path)} has shape {np.shape(old[path])}, grown {np.shape(fresh)}")
            params[path] = old[path]
        elif not any(name.startswith("transformer_blocks_") for name in path):
            raise ValueError(f"deepen: {'/'.join(path)} is new in the grown UNet but not in an added block")
        elif path[-3:-1] in ZERO_BRANCHES:  # .../attn1/to_out_0/kernel
            params[path] = np.zeros_like(fresh)
        else:
            params[path] = fresh
    return dataclasses.replace(grown, params=jax.device_put(traverse_util.unflatten_dict(params)))
