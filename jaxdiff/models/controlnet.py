"""ControlNetModel (SD 1.x, SD 2.x, SDXL) built from a diffusers config.json, NHWC; its residuals feed the UNet."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.models import unet
from jaxdiff.models.layers import Conv
from jaxdiff.models.model import Architecture

# ControlNet-only config keys and diffusers' defaults; every other key means what it means in a UNet config.
_OWN_DEFAULTS = {
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False,
    "addition_embed_type_num_heads": 64,  # used only by addition_embed_type="text", which jaxdiff refuses
    "encoder_hid_dim": None,
}
# UNet config keys a ControlNet config has no use for (a ControlNet has no up path); dropped by `config_from_unet`.
_UNET_ONLY = (
    "out_channels",
    "up_block_types",
    "center_input_sample",
    "reverse_transformer_layers_per_block",
    "sample_size",
    "conv_out_kernel",
)


def resolved_config(config: dict) -> dict:
    """The UNet-style resolved config (defaults filled, per-block lists) plus the ControlNet's own keys; unsupported
    options refused with a ValueError naming them."""
    own = {**_OWN_DEFAULTS, **{k: config[k] for k in _OWN_DEFAULTS if k in config}}
    shared = {k: v for k, v in config.items() if k not in _OWN_DEFAULTS}
    problems = []
    if own["encoder_hid_dim"] is not None:
        problems.append(f"encoder_hid_dim={own['encoder_hid_dim']!r} (supported: null)")
    if own["controlnet_conditioning_channel_order"] not in ("rgb", "bgr"):
        problems.append(
            f"controlnet_conditioning_channel_order={own['controlnet_conditioning_channel_order']!r} "
            "(supported: 'rgb', 'bgr')"
        )
    if shared.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"mid_block_type={shared['mid_block_type']!r} (supported: UNetMidBlock2DCrossAttn)")
    if not own["conditioning_embedding_out_channels"]:
        problems.append("conditioning_embedding_out_channels must list at least one channel count")
    if problems:
        raise ValueError("unsupported ControlNetModel config: " + "; ".join(problems))
    cfg = unet.resolved_config(shared, up_blocks=False, what="ControlNetModel")
    cfg.update(own, conditioning_embedding_out_channels=tuple(own["conditioning_embedding_out_channels"]))
    return cfg


def skip_channels(cfg: dict) -> list[int]:
    """Channels of each down-path feature (conv_in's, one per down layer and per downsampler) of a resolved config."""
    channels = cfg["block_out_channels"]
    out = [channels[0]]
    for i, c in enumerate(channels):
        out += [c] * cfg["layers_per_block"][i] + ([c] if i < len(channels) - 1 else [])
    return out


def cond_factor(config: dict) -> int:
    """How much larger than the latents the conditioning image is (8 for diffusers' default embedding)."""
    channels = config.get("conditioning_embedding_out_channels", _OWN_DEFAULTS["conditioning_embedding_out_channels"])
    return 2 ** (len(channels) - 1)


def guess_mode_scales(n: int) -> np.ndarray:
    """diffusers' guess-mode weights: 10 ** linspace(-1, 0, n + 1), the n down residuals then the mid one."""
    return np.logspace(-1, 0, n + 1).astype(np.float32)


class ControlNetConditioningEmbedding(nn.Module):
    """conv_in, then per step a 3x3 conv and a stride-2 3x3 conv (`blocks_<2i>`, `blocks_<2i+1>`), SiLU after each,
    then conv_out: the conditioning image [B, H, W, C] -> [B, H / f, W / f, out_channels]."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: jnp.dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, cond):
        c = self.block_out_channels
        conv = lambda features, name, stride=1: Conv(  # noqa: E731
            features, 3, stride=stride, padding=1, dtype=self.dtype, platform=self.platform, name=name
        )
        x = nn.silu(conv(c[0], "conv_in")(cond.astype(self.dtype)))
        for i in range(len(c) - 1):
            x = nn.silu(conv(c[i], f"blocks_{2 * i}")(x))
            x = nn.silu(conv(c[i + 1], f"blocks_{2 * i + 1}", stride=2)(x))
        return conv(self.out_channels, "conv_out")(x)


class ControlNetModel(unet.DownPath):
    """apply(params, sample [B,h,w,C], timesteps [B], encoder_hidden_states [B,L,D], controlnet_cond [B,H,W,c],
    added_cond=None, *, conditioning_scale=1.0, guess_mode=False) -> (down residuals: list, mid residual), NHWC.

    The UNet's conv_in, time embedding, down blocks and mid block (shared code: `unet.DownPath`), the conditioning
    image's embedding added after conv_in, and a 1x1 "zero conv" per down-path feature (`controlnet_down_blocks_<i>`)
    and on the mid block's output (`controlnet_mid_block`). The outputs go to the UNet as
    `down_block_additional_residuals` / `mid_block_additional_residual`. `controlnet_cond` is cond_factor(config)
    times the latents' size (8: the image size), in [0, 1] as diffusers' pipelines feed it.
    """

    def setup(self):
        cfg = self._cfg = resolved_config(self.config)
        self.setup_down_path(cfg)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            cfg["block_out_channels"][0],
            cfg["conditioning_embedding_out_channels"],
            dtype=self.dtype,
            platform=self.platform,
        )
        zero_conv = lambda c: Conv(c, 1, padding=0, dtype=self.dtype, platform=self.platform)  # noqa: E731
        self.controlnet_down_blocks = [zero_conv(c) for c in skip_channels(cfg)]
        self.controlnet_mid_block = zero_conv(cfg["block_out_channels"][-1])

    def __call__(
        self,
        sample,
        timesteps,
        encoder_hidden_states,
        controlnet_cond,
        added_cond=None,
        *,
        conditioning_scale=1.0,
        guess_mode=False,
    ):
        """`conditioning_scale`: a float or a traced scalar; `guess_mode`: a bool or a traced boolean scalar (weights
        10 ** linspace(-1, 0) from the first down residual to the mid one, unless `global_pool_conditions`)."""
        cfg = self._cfg
        self.check_sample_size(sample)
        factor = cond_factor(cfg)
        want = (sample.shape[0], sample.shape[1] * factor, sample.shape[2] * factor, cfg["conditioning_channels"])
        if tuple(controlnet_cond.shape) != want:
            raise ValueError(
                f"controlnet_cond has shape {tuple(controlnet_cond.shape)}; for latents {tuple(sample.shape)} this "
                f"ControlNet takes {want} ({factor}x the latents' size, conditioning_channels channels, NHWC)"
            )
        emb = self.embed(timesteps, sample.shape[0], added_cond)
        cond = controlnet_cond[..., ::-1] if cfg["controlnet_conditioning_channel_order"] == "bgr" else controlnet_cond
        x = self.conv_in(sample.astype(self.dtype)) + self.controlnet_cond_embedding(cond)
        skips, mid = self.down_path(x, emb, encoder_hidden_states)
        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(mid)
        weights = jnp.full((len(down) + 1,), 1.0, jnp.float32)
        if not cfg["global_pool_conditions"]:
            weights = jnp.where(guess_mode, guess_mode_scales(len(down)), weights)
        weights = weights * conditioning_scale
        down = [r * weights[i].astype(r.dtype) for i, r in enumerate(down)]
        mid = mid * weights[-1].astype(mid.dtype)
        if cfg["global_pool_conditions"]:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid


def config_from_unet(
    unet_config: dict,
    conditioning_embedding_out_channels=(16, 32, 96, 256),
    conditioning_channels: int = 3,
    controlnet_conditioning_channel_order: str = "rgb",
) -> dict:
    """The config of a ControlNet for a UNet (diffusers' `ControlNetModel.from_unet`)."""
    config = {k: v for k, v in unet_config.items() if not k.startswith("_") and k not in _UNET_ONLY}
    return {
        "_class_name": "ControlNetModel",
        **config,
        "conditioning_embedding_out_channels": tuple(conditioning_embedding_out_channels),
        "conditioning_channels": conditioning_channels,
        "controlnet_conditioning_channel_order": controlnet_conditioning_channel_order,
    }


# The submodules a ControlNet shares with its UNet (same names, same shapes when the configs match).
SHARED_WITH_UNET = ("time_embedding", "add_embedding", "conv_in", "down_blocks_", "mid_block")


def params_from_unet(controlnet_params: dict, unet_params: dict) -> dict:
    """ControlNet params with the UNet's conv_in, time/add embedding, down blocks and mid block copied in (diffusers'
    `from_unet(load_weights_from_unet=True)`); the conditioning embedding and zero convs are kept."""
    shared = {k: v for k, v in unet_params.items() if k.startswith(SHARED_WITH_UNET)}
    missing = sorted(k for k in controlnet_params if k.startswith(SHARED_WITH_UNET) and k not in shared)
    if missing:
        raise UserError(f"the UNet params lack {', '.join(missing)}: this ControlNet does not fit this UNet")
    return {**controlnet_params, **shared}


# Config keys that must agree for a ControlNet's residuals and inputs to fit a UNet.
_MUST_MATCH = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type")


def check_compatible(controlnet_config: dict, unet_config: dict) -> None:
    """Raise a UserError naming every setting in which the ControlNet does not fit the UNet (residual shapes and
    inputs: latent channels, block widths, layers per block, text width, SDXL's added conditioning)."""
    try:
        cn, un = resolved_config(controlnet_config), unet.resolved_config(unet_config)
    except ValueError as e:
        raise UserError(str(e)) from None
    diffs = [
        f"{k} (ControlNet {_plain(cn[k])!r}, UNet {_plain(un[k])!r})"
        for k in _MUST_MATCH
        if _plain(cn[k]) != _plain(un[k])
    ]
    if diffs:
        raise UserError("the ControlNet does not fit the UNet: " + "; ".join(diffs))


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def example_inputs(config: dict) -> tuple:
    cfg = resolved_config(config)
    size = 2 ** (len(cfg["block_out_channels"]) - 1)
    factor = cond_factor(cfg)
    args = (
        jnp.zeros((1, size, size, cfg["in_channels"]), jnp.float32),
        jnp.zeros((1,), jnp.float32),
        jnp.zeros((1, 1, cfg["cross_attention_dim"][0]), jnp.float32),
        jnp.zeros((1, size * factor, size * factor, cfg["conditioning_channels"]), jnp.float32),
    )
    if cfg["addition_embed_type"] == "text_time":
        text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        args += ({"text_embeds": jnp.zeros((1, text_dim)), "time_ids": jnp.zeros((1, 6))},)
    return args


def build(config: dict, dtype=jnp.float32, attention: str = "auto", platform: str | None = None) -> ControlNetModel:
    resolved_config(config)  # fail early with a clear message
    return ControlNetModel(dict(config), attention=attention, dtype=dtype, platform=platform)


ARCHITECTURES = {
    "ControlNetModel": Architecture(
        name="ControlNetModel", kind="controlnet", build=build, example_inputs=example_inputs
    )
}
