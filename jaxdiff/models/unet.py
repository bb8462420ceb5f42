"""UNet2DConditionModel (SD 1.x, SD 2.x, SDXL) built from a diffusers config.json, NHWC."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.layers import EMBED, MLP, Conv, Dense, GroupNorm
from jaxdiff.models.model import Architecture
from jaxdiff.models.unet_blocks import DownBlock, MidBlockCrossAttn, UpBlock

_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

# Config values jaxdiff does not implement; anything else than these defaults is refused with a clear error.
_REQUIRED_DEFAULTS = {
    "class_embed_type": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "act_fn": "silu",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "num_class_embeds": None,
    "attention_type": "default",
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "class_embeddings_concat": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
}


# diffusers' runwayml/stable-diffusion-v1-5 unet/config.json: the reference shape for benchmarks and scale checks.
SD15_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
# stabilityai/stable-diffusion-2-1's unet/config.json (865,910,724 params; v-prediction, 768 px).
SD21_CONFIG = {
    **SD15_CONFIG,
    "sample_size": 96,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
}
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (2,567,463,684 params; 1024 px).
SDXL_CONFIG = {
    **SD15_CONFIG,
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim], float32 (DDPM / diffusers)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2; with `cond_proj_dim` (diffusers' `time_cond_proj_dim`, LCM's guidance-scale
    embedding) `condition` [B, cond_proj_dim] enters first through `cond_proj` (no bias): x + cond_proj(condition).
    Without a condition the module computes what it computes without cond_proj (diffusers skips it too)."""

    features: int
    dtype: jnp.dtype = jnp.float32
    cond_proj_dim: int | None = None

    @nn.compact
    def __call__(self, x, condition=None):
        if self.cond_proj_dim:
            if condition is None and self.is_initializing():
                condition = jnp.zeros((x.shape[0], self.cond_proj_dim), self.dtype)  # create the kernel
            if condition is not None:
                if condition.shape[-1] != self.cond_proj_dim:
                    raise ValueError(
                        f"timestep_cond has {condition.shape[-1]} features; this UNet's time_cond_proj_dim is "
                        f"{self.cond_proj_dim}"
                    )
                proj = Dense(x.shape[-1], use_bias=False, axes=(MLP, EMBED), dtype=self.dtype, name="cond_proj")
                x = x + proj(condition.astype(self.dtype))
        elif condition is not None:
            raise ValueError("timestep_cond needs a UNet with time_cond_proj_dim set in its config")
        x = Dense(self.features, axes=(EMBED, MLP), dtype=self.dtype, name="linear_1")(x)
        return Dense(self.features, axes=(MLP, EMBED), dtype=self.dtype, name="linear_2")(nn.silu(x))


def _per_block(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} down blocks")
        return list(value)
    return [value] * n


class DownPath(nn.Module):
    """The time embedding, conv_in, down blocks and mid block of a UNet2DConditionModel config: the part the UNet and
    the ControlNet share (same submodule names, so the same PyTorch keys). Subclasses call `setup_down_path` in
    `setup`, then `embed` and `down_path`."""

    config: dict
    attention: str = "auto"
    dtype: jnp.dtype = jnp.float32
    # The platform the program is compiled for (None: the host's default backend): it picks attention and convs.
    platform: str | None = None
    # T-GATE: (self-attention, cross-attention) cache modes of every transformer block (transformer.ATTN_CACHE_MODES).
    attn_cache_mode: tuple | None = None
    # Run each stack of identical transformer blocks (SDXL's 2- and 10-deep) as one lax.scan: one copy of the block
    # in the compiled program (XLA:TPU compiles every unrolled layer afresh); same params and results.
    scan_layers: bool = False

    def block_options(self, cfg: dict) -> dict:
        """Keyword arguments every UNet block takes."""
        return dict(
            groups=cfg["norm_num_groups"],
            eps=cfg["norm_eps"],
            linear_projection=cfg["use_linear_projection"],
            upcast=cfg["upcast_attention"],
            attention=self.attention,
            dtype=self.dtype,
            platform=self.platform,
            attn_cache_mode=self.attn_cache_mode,
            scan_layers=self.scan_layers,
        )

    def setup_down_path(self, cfg: dict) -> None:
        """Create time_embedding (+ add_embedding), conv_in, down_blocks and mid_block (call from `setup`)."""
        n = len(cfg["block_out_channels"])
        channels = cfg["block_out_channels"]
        dt = self.dtype
        common = self.block_options(cfg)
        self.time_embedding = TimestepEmbedding(channels[0] * 4, dtype=dt, cond_proj_dim=cfg["time_cond_proj_dim"])
        if cfg["addition_embed_type"] == "text_time":
            self.add_embedding = TimestepEmbedding(channels[0] * 4, dtype=dt)
        self.conv_in = Conv(channels[0], 3, padding=1, dtype=dt, platform=self.platform)
        self.down_blocks = [
            DownBlock(
                channels[i],
                cfg["layers_per_block"][i],
                cross_attention=_DOWN[block_type],
                heads=cfg["num_attention_heads"][i],
                transformer_layers=cfg["transformer_layers_per_block"][i],
                only_cross_attention=cfg["only_cross_attention"][i],
                add_downsample=i < n - 1,
                **common,
            )
            for i, block_type in enumerate(cfg["down_block_types"])
        ]
        if cfg["mid_block_type"] is not None:
            self.mid_block = MidBlockCrossAttn(
                channels[-1],
                1,
                cross_attention=True,
                heads=cfg["num_attention_heads"][-1],
                transformer_layers=cfg["transformer_layers_per_block"][-1],
                **common,
            )

    def embed(self, timesteps, batch: int, added_cond=None, timestep_cond=None):
        """The time (+ SDXL text_time) embedding [batch, 4 * C0] of timesteps [batch] (or a scalar).

        `timestep_cond` [batch, time_cond_proj_dim] (diffusers' `timestep_cond`, an LCM student's guidance-scale
        embedding) goes through time_embedding.cond_proj; `added_cond["timestep_cond"]` is the same input carried
        with the other added conditioning (how the sampling loop passes it), used when `timestep_cond` is None."""
        cfg = self._cfg
        c0 = cfg["block_out_channels"][0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t = timestep_embedding(timesteps, c0, cfg["flip_sin_to_cos"], cfg["freq_shift"])
        if timestep_cond is None and cfg["time_cond_proj_dim"]:  # a ControlNet beside the UNet ignores it
            timestep_cond = (added_cond or {}).get("timestep_cond")
        emb = self.time_embedding(t.astype(self.dtype), timestep_cond)
        if cfg["addition_embed_type"] == "text_time":
            if added_cond is None or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError('this model needs added_cond={"text_embeds": [B, P], "time_ids": [B, 6]} (SDXL)')
            time_ids = added_cond["time_ids"]
            tid = timestep_embedding(
                time_ids.reshape(-1), cfg["addition_time_embed_dim"], cfg["flip_sin_to_cos"], cfg["freq_shift"]
            ).reshape(time_ids.shape[0], -1)
            add = jnp.concatenate([added_cond["text_embeds"].astype(jnp.float32), tid], axis=-1)
            emb = emb + self.add_embedding(add.astype(self.dtype))
        return emb

    def check_sample_size(self, sample) -> None:
        factor = 2 ** (len(self._cfg["block_out_channels"]) - 1)
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"sample height and width must be multiples of {factor}, got {sample.shape[1:3]}")

    def down_path(self, x, emb, context, num_skips: int | None = None):
        """Down blocks then the mid block from conv_in's output `x`: (skips, mid), skips a list with `x` first.

        `num_skips`: stop once that many skips exist, with no mid block (mid is then None)."""
        skips = [x]
        for block in self.down_blocks:
            if num_skips is not None and len(skips) >= num_skips:
                return skips, None
            units = None if num_skips is None else min(block.num_units, num_skips - len(skips))
            x, block_skips = block(x, emb, context, units)
            skips.extend(block_skips)
        if num_skips is not None:
            return skips[:num_skips], None
        if self._cfg["mid_block_type"] is not None:
            x = self.mid_block(x, emb, context)
        return skips, x


class UNet2DConditionModel(DownPath):
    """apply(params, sample [B,H,W,C], timesteps [B], encoder_hidden_states [B,L,D], added_cond=None) -> [B,H,W,C];
    a ControlNet's outputs go in as `down_block_additional_residuals` / `mid_block_additional_residual` (see encode);
    with `time_cond_proj_dim` in the config, `timestep_cond` [B, time_cond_proj_dim] (an LCM student's guidance-scale
    embedding; also accepted as `added_cond["timestep_cond"]`) enters the time embedding, as in diffusers.

    The same module, split for training-free acceleration (`method=` on apply):
    `encode` (time embedding, conv_in, down blocks, mid block) -> features {"skips", "mid", "emb"};
    `decode(features, context, timesteps=None)` (up blocks, conv_out), with the features' embedding or that of
    other `timesteps` (Faster Diffusion's non-key steps); __call__ is decode(encode(...)).
    `deep_feature` / `shallow`: DeepCache's full call that also returns the feature entering the up layer that
    consumes skip `branch`, and the shallow call that computes only the skips 0..branch and the up layers from that
    one on, entering with a cached feature.
    """

    def setup(self):
        cfg = self._cfg = resolved_config(self.config)
        n = len(cfg["block_out_channels"])
        dt = self.dtype
        common = self.block_options(cfg)
        self.setup_down_path(cfg)
        rev = lambda key: list(reversed(cfg[key]))  # noqa: E731
        up_transformer_layers = cfg["reverse_transformer_layers_per_block"] or rev("transformer_layers_per_block")
        self.up_blocks = [
            UpBlock(
                rev("block_out_channels")[i],
                rev("layers_per_block")[i] + 1,
                cross_attention=_UP[block_type],
                heads=rev("num_attention_heads")[i],
                transformer_layers=up_transformer_layers[i],
                only_cross_attention=rev("only_cross_attention")[i],
                add_upsample=i < n - 1,
                **common,
            )
            for i, block_type in enumerate(cfg["up_block_types"])
        ]
        self.conv_norm_out = GroupNorm(cfg["norm_num_groups"], cfg["norm_eps"], dt)
        self.conv_out = Conv(cfg["out_channels"], 3, padding=1, dtype=dt, platform=self.platform)

    def __call__(
        self,
        sample,
        timesteps,
        encoder_hidden_states,
        added_cond=None,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
        timestep_cond=None,
    ):
        features = self.encode(
            sample,
            timesteps,
            encoder_hidden_states,
            added_cond,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            timestep_cond=timestep_cond,
        )
        return self.decode(features, encoder_hidden_states)

    def encode(
        self,
        sample,
        timesteps,
        encoder_hidden_states,
        added_cond=None,
        *,
        num_skips: int | None = None,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
        timestep_cond=None,
    ):
        """Faster Diffusion's encoder: {"skips": tuple of down-path features (conv_in's first), "mid": [B, h, w, C],
        "emb": [B, E]}. `num_skips`: stop once that many skips exist, with no mid block (DeepCache's shallow
        branch; "mid" is then None).

        ControlNet residuals (a ControlNet's outputs, both or neither), added where diffusers adds them: each of
        `down_block_additional_residuals` (one per skip) to its skip after the whole down path, so only the up path
        sees them, and `mid_block_additional_residual` to the mid block's output. With `num_skips`, the first
        residuals go to the skips computed and the mid residual is unused.

        `timestep_cond` [B, time_cond_proj_dim]: diffusers' `timestep_cond` (see `embed`)."""
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError(
                "ControlNet residuals come in pairs: pass both down_block_additional_residuals and "
                "mid_block_additional_residual, or neither"
            )
        if down_block_additional_residuals is not None and len(down_block_additional_residuals) != self.num_skips:
            raise ValueError(
                f"down_block_additional_residuals has {len(down_block_additional_residuals)} entries; this UNet has "
                f"{self.num_skips} skips (conv_in's, one per down layer and per downsampler)"
            )
        cfg = self._cfg
        self.check_sample_size(sample)
        emb = self.embed(timesteps, sample.shape[0], added_cond, timestep_cond)
        x = sample.astype(self.dtype)
        if cfg["center_input_sample"]:
            x = 2 * x - 1.0
        skips, mid = self.down_path(self.conv_in(x), emb, encoder_hidden_states, num_skips)
        if down_block_additional_residuals is not None:
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
            if mid is not None:
                mid = mid + mid_block_additional_residual.astype(mid.dtype)
        return {"skips": tuple(skips), "mid": mid, "emb": emb}

    def decode(self, features, encoder_hidden_states, timesteps=None, added_cond=None):
        """Up blocks and conv_out over encoder `features` [B, ...]; with `timesteps` [B] the embedding is recomputed
        for them (with `added_cond` for SDXL) instead of taken from the features."""
        batch = features["skips"][0].shape[0]
        emb = features["emb"] if timesteps is None else self.embed(timesteps, batch, added_cond)
        return self._up(features["mid"], list(features["skips"]), emb, encoder_hidden_states)[0]

    def _up(self, x, skips, emb, context, enter: int | None = None, capture: int | None = None):
        """The up path from the layer consuming skip `enter` (None: from the first), entered with `x`; also returns
        the hidden state entering the layer that consumes skip `capture`."""
        captured = None
        for block in self.up_blocks:
            first = len(skips) - block.num_layers  # index of the block's last-consumed skip
            block_skips, skips = skips[first:], skips[:first]
            layers = range(block.num_layers)  # layer i consumes skip first + num_layers - 1 - i
            index = {first + block.num_layers - 1 - i: i for i in layers}
            if enter is not None and enter < first:
                continue  # the whole block lies deeper than the entry point
            start = index[enter] if enter is not None and enter in index else 0
            layer = index.get(capture)
            out = block(x, block_skips, emb, context, start, layer)
            x, captured = (out[0], out[1]) if layer is not None else (out, captured)
        x = nn.silu(self.conv_norm_out(x))
        return self.conv_out(x), captured

    def deep_feature(self, sample, timesteps, encoder_hidden_states, added_cond=None, *, branch: int = 0):
        """The full UNet call and DeepCache's cached feature: (out, the hidden state entering the up layer that
        consumes skip `branch`)."""
        f = self.encode(sample, timesteps, encoder_hidden_states, added_cond)
        return self._up(f["mid"], list(f["skips"]), f["emb"], encoder_hidden_states, capture=branch)

    def shallow(self, sample, timesteps, encoder_hidden_states, feature, added_cond=None, *, branch: int = 0):
        """DeepCache's partial call: skips 0..`branch` from `sample`, then the up layers from the one consuming skip
        `branch` on, entered with `feature` (from `deep_feature` at the last full step)."""
        f = self.encode(sample, timesteps, encoder_hidden_states, added_cond, num_skips=branch + 1)
        padded = list(f["skips"]) + [None] * (self.num_skips - branch - 1)
        return self._up(feature, padded, f["emb"], encoder_hidden_states, enter=branch)[0]

    @property
    def num_skips(self) -> int:
        return num_skips(self.config)


def num_skips(config: dict) -> int:
    """How many down-path features the up path consumes: conv_in's, one per down layer and per downsampler."""
    cfg = resolved_config(config)
    n = len(cfg["block_out_channels"])
    return 1 + sum(cfg["layers_per_block"]) + n - 1


def resolved_config(config: dict, *, up_blocks: bool = True, what: str = "UNet2DConditionModel") -> dict:
    """diffusers defaults filled in, per-block values expanded to lists, unsupported options refused.

    `up_blocks=False`: a config with no up path (a ControlNet's); `what` names the class in errors."""
    cfg = dict(
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        only_cross_attention=False,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=1280,
        transformer_layers_per_block=1,
        reverse_transformer_layers_per_block=None,
        attention_head_dim=8,
        num_attention_heads=None,
        use_linear_projection=False,
        upcast_attention=False,
        addition_embed_type=None,
        addition_time_embed_dim=None,
        projection_class_embeddings_input_dim=None,
        downsample_padding=1,
        mid_block_scale_factor=1,
        time_cond_proj_dim=None,
    )
    cfg.update({k: v for k, v in config.items() if not k.startswith("_")})
    problems = [f"{k}={cfg[k]!r} (supported: {v!r})" for k, v in _REQUIRED_DEFAULTS.items() if cfg.get(k, v) != v]
    n = len(cfg["block_out_channels"])
    for key, known in (("down_block_types", _DOWN), ("up_block_types", _UP))[: 2 if up_blocks else 1]:
        problems += [f"{key} entry {b!r} (supported: {sorted(known)})" for b in cfg[key] if b not in known]
    if cfg["mid_block_type"] not in ("UNetMidBlock2DCrossAttn", None):
        problems.append(f"mid_block_type={cfg['mid_block_type']!r} (supported: UNetMidBlock2DCrossAttn or null)")
    if cfg["addition_embed_type"] not in (None, "text_time"):
        problems.append(f"addition_embed_type={cfg['addition_embed_type']!r} (supported: null, 'text_time')")
    if cfg["time_cond_proj_dim"] is not None and (not up_blocks or int(cfg["time_cond_proj_dim"]) <= 0):
        problems.append(f"time_cond_proj_dim={cfg['time_cond_proj_dim']!r} (supported: null, or > 0 for a UNet)")
    if cfg["downsample_padding"] != 1 or cfg["mid_block_scale_factor"] != 1:
        problems.append("downsample_padding and mid_block_scale_factor must be 1")
    if problems:
        raise ValueError(f"unsupported {what} config: " + "; ".join(problems))
    # diffusers' historical naming bug: `attention_head_dim` holds the number of heads when
    # `num_attention_heads` is absent (SD 1.x: 8 heads; SD 2.x: [5, 10, 20, 20]).
    heads = cfg["num_attention_heads"] or cfg["attention_head_dim"]
    cfg["num_attention_heads"] = _per_block(heads, n, "num_attention_heads")
    for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "only_cross_attention"):
        cfg[key] = _per_block(cfg[key], n, key)
    if any(isinstance(x, (list, tuple)) for x in cfg["transformer_layers_per_block"]):
        raise ValueError("nested transformer_layers_per_block lists are not supported")
    for i, c in enumerate(cfg["block_out_channels"]):
        if c % cfg["num_attention_heads"][i]:
            raise ValueError(f"block_out_channels[{i}]={c} is not divisible by {cfg['num_attention_heads'][i]} heads")
    return cfg


def example_inputs(config: dict) -> tuple:
    cfg = resolved_config(config)
    size = 2 ** (len(cfg["block_out_channels"]) - 1)
    args = (
        jnp.zeros((1, size, size, cfg["in_channels"]), jnp.float32),
        jnp.zeros((1,), jnp.float32),
        jnp.zeros((1, 1, cfg["cross_attention_dim"][0]), jnp.float32),
    )
    if cfg["addition_embed_type"] == "text_time":
        text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        args += ({"text_embeds": jnp.zeros((1, text_dim)), "time_ids": jnp.zeros((1, 6))},)
    return args


def build(
    config: dict, dtype=jnp.float32, attention: str = "auto", platform: str | None = None
) -> UNet2DConditionModel:
    resolved_config(config)  # fail early with a clear message
    return UNet2DConditionModel(dict(config), attention=attention, dtype=dtype, platform=platform)


ARCHITECTURES = {
    "UNet2DConditionModel": Architecture(
        name="UNet2DConditionModel",
        kind="unet",
        build=build,
        example_inputs=example_inputs,
    )
}
