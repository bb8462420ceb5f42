"""Original single-file checkpoints (LDM / A1111 layout: SD 1.x, SD 2.x, SDXL base) <-> jaxdiff checkpoints."""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxdiff.convert import checkpoint, layout, open_clip
from jaxdiff.convert import table as table_lib
from jaxdiff.convert.open_clip import COPY, QKV, TRANSPOSE
from jaxdiff.convert.safetensors_io import DTYPES, SafetensorsFile, dtype_tag, load_safetensors, write_safetensors
from jaxdiff.convert.table import CheckpointMismatchError
from jaxdiff.convert.torch_io import TORCH_SUFFIXES, load_torch_state_dict
from jaxdiff.errors import UserError
from jaxdiff.models import unet as unet_lib
from jaxdiff.models.model import Model, create

CONV1X1 = "conv1x1"  # LDM VAE attention q/k/v/proj_out: a 1x1 Conv2d [C, C, 1, 1] for diffusers' Linear [C, C]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
LDM_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.embedders.", EMA_PREFIX)
# A converted checkpoint keeps in this folder what an exact export needs: manifest.json (architecture, stored dtypes,
# shapes and spellings that differ from the canonical ones, the original metadata) and extras.safetensors (tensors no
# model uses, e.g. schedule buffers). A folder without config.json: copied along by save_pipeline and export.
SIDECAR = "single_file"
MANIFEST = "manifest.json"
EXTRAS = "extras.safetensors"
PREDICTION_TYPES = ("epsilon", "v_prediction")
EXPORT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": DTYPES["BF16"]}


@dataclasses.dataclass(frozen=True)
class Encoder:
    component: str  # "text_encoder" / "text_encoder_2"
    prefix: str  # where its tensors live in the single file
    open_clip: bool  # OpenCLIP keys (SD 2.x, SDXL's second encoder) instead of transformers CLIP keys
    with_projection: bool = False  # diffusers stores it as CLIPTextModelWithProjection


_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "timestep_spacing": "leading",
}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    label: str
    pipeline: str  # diffusers pipeline class
    encoders: tuple[Encoder, ...]
    scheduler: dict  # the release's scheduler config, less prediction_type
    sample_size: int  # UNet latent size of the release (images are 8x larger)
    vae_scaling_factor: float

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet", "vae", *(e.component for e in self.encoders))


FAMILIES = {
    "sd1": Family(
        "sd1",
        "SD 1.x",
        "StableDiffusionPipeline",
        (Encoder("text_encoder", "cond_stage_model.transformer.", False),),
        {"_class_name": "PNDMScheduler", **_SCHEDULE, "skip_prk_steps": True},
        64,
        0.18215,
    ),
    "sd2": Family(
        "sd2",
        "SD 2.x",
        "StableDiffusionPipeline",
        (Encoder("text_encoder", "cond_stage_model.model.", True),),
        {"_class_name": "DDIMScheduler", **_SCHEDULE},
        64,
        0.18215,
    ),
    "sdxl": Family(
        "sdxl",
        "SDXL base",
        "StableDiffusionXLPipeline",
        (
            Encoder("text_encoder", "conditioner.embedders.0.transformer.", False),
            Encoder("text_encoder_2", "conditioner.embedders.1.model.", True, with_projection=True),
        ),
        {
            "_class_name": "EulerDiscreteScheduler",
            **_SCHEDULE,
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
            "sample_max_value": 1.0,
            "skip_prk_steps": True,
        },
        128,
        0.13025,
    ),
}


class UnknownLayoutError(UserError):
    """A file in no single-file layout jaxdiff reads; the message (one line) names the tensors that decided."""

    def __init__(self, where: str, reason: str):
        self.reason = reason
        super().__init__(f"{where}: {reason}")


# ---------------------------------------------------------------- reading a single file


class _Source:
    """The tensors of a .safetensors (memory-mapped, read on access) or .ckpt/.pt/.bin file (weights_only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such file: {self.path}")
        if self.path.suffix == ".safetensors":
            f = SafetensorsFile(self.path)
            self._tensors: Mapping[str, np.ndarray] = f
            self.shapes = {k: f.shape(k) for k in f}
            self.dtypes = {k: f.header[k]["dtype"] for k in f}
            self.metadata: dict | None = dict(f.metadata)
        elif self.path.suffix in TORCH_SUFFIXES:
            state = load_torch_state_dict(self.path, upcast=False)  # a "state_dict" wrapper is unwrapped
            self._tensors = state
            self.shapes = {k: tuple(v.shape) for k, v in state.items()}
            self.dtypes = {k: dtype_tag(v.dtype) for k, v in state.items()}
            self.metadata = None
        else:
            raise UserError(
                f"{self.path}: unknown weights format (expected .safetensors or {'/'.join(TORCH_SUFFIXES)})"
            )

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(self._tensors[key])

    def is_ldm(self) -> bool:
        return any(k.startswith(LDM_PREFIXES) for k in self.shapes)


# ---------------------------------------------------------------- which architecture


_UNET_PROBE = UNET_PREFIX + "input_blocks.0.0.weight"
_VAE_PROBE = VAE_PREFIX + "encoder.conv_in.weight"
_ADD_PROBE = UNET_PREFIX + "label_emb.0.0.weight"  # SDXL's text_time embedding
_REFINER_PROBE = "conditioner.embedders.0.model.token_embedding.weight"


def _encoder_probe(encoder: Encoder, keys) -> str:
    """The token-embedding key of an encoder, in the spelling the file uses (canonical if absent)."""
    if encoder.open_clip:
        return encoder.prefix + "token_embedding.weight"
    key = encoder.prefix + "text_model.embeddings.token_embedding.weight"
    short = encoder.prefix + "embeddings.token_embedding.weight"  # transformers < 4.19 had no `text_model.`
    return short if key not in keys and short in keys else key


def detect(keys: Iterable[str], where: str = "checkpoint") -> tuple[Family, list[str]]:
    """The family of an LDM-layout state dict and the tensors that decided it ("no KEY" for a decisive absence).

    SD 1.x: transformers CLIP under cond_stage_model.transformer; SD 2.x: OpenCLIP under cond_stage_model.model;
    SDXL base: CLIP-L + OpenCLIP bigG under conditioner.embedders.0/1 and the UNet's text_time embedding (label_emb).
    Anything else raises UnknownLayoutError naming the tensors looked at.
    """
    keys = keys if isinstance(keys, (set, frozenset, Mapping)) else set(keys)
    matches = []
    for family in FAMILIES.values():
        probes = [_encoder_probe(e, keys) for e in family.encoders]
        xl = family.name == "sdxl"
        if all(p in keys for p in probes) and (_ADD_PROBE in keys) == xl:
            matches.append((family, probes + ([_ADD_PROBE] if xl else [f"no {_ADD_PROBE}"])))
    has_unet, has_vae = _UNET_PROBE in keys, _VAE_PROBE in keys
    if has_unet and has_vae and len(matches) == 1:
        family, probes = matches[0]
        return family, [_UNET_PROBE, _VAE_PROBE, *probes]
    encoder_probes = sorted({_encoder_probe(e, keys) for f in FAMILIES.values() for e in f.encoders})
    found = [p for p in [_UNET_PROBE, _VAE_PROBE, _ADD_PROBE, _REFINER_PROBE, *encoder_probes] if p in keys]
    if not has_unet:
        reason = f"no UNet ({_UNET_PROBE} is absent)"
    elif not has_vae:
        reason = f"no VAE ({_VAE_PROBE} is absent)"
    elif _REFINER_PROBE in keys:
        reason = f"an SDXL refiner ({_REFINER_PROBE}), which jaxdiff does not support"
    elif len(matches) > 1:
        reason = "text encoders of several families: " + " and ".join(f.label for f, _ in matches)
    elif any(p in keys for p in encoder_probes):
        label = "with" if _ADD_PROBE in keys else "without"
        reason = f"text encoder(s) {', '.join(p for p in encoder_probes if p in keys)} {label} {_ADD_PROBE}"
    else:
        reason = "no text encoder (none of " + ", ".join(encoder_probes) + ")"
    raise UnknownLayoutError(
        where,
        f"unknown single-file layout (jaxdiff reads SD 1.x, SD 2.x and SDXL base): {reason}; "
        f"tensors present: {', '.join(found) or 'none of the above'}; top-level prefixes: {_prefixes(keys)}",
    )


def _prefixes(keys: Iterable[str], limit: int = 8) -> str:
    def head(k: str) -> str:
        parts = k.split(".")
        return ".".join(parts[: 4 if k.startswith("conditioner.embedders.") else 2][: len(parts) - 1] or parts)

    counts = collections.Counter(head(k) for k in keys).most_common()
    text = ", ".join(f"{p} ({n})" for p, n in counts[:limit])
    return text + (f", ... ({len(counts) - limit} more)" if len(counts) > limit else "")


def family_of_configs(configs: Mapping[str, dict], where: str) -> tuple[Family, list[str]]:
    """The family of a pipeline from its component configs: a second text encoder is SDXL; an OpenCLIP (GELU) text
    encoder is SD 2.x; an OpenAI CLIP (quick GELU) one SD 1.x."""
    if "text_encoder" not in configs:
        raise UserError(f"{where}: no text_encoder component, so no single-file layout fits it")
    if "text_encoder_2" in configs:
        return FAMILIES["sdxl"], ["text_encoder_2/config.json"]
    act = configs["text_encoder"].get("hidden_act", "quick_gelu")
    family = FAMILIES["sd2" if act == "gelu" else "sd1"]
    return family, [f"text_encoder/config.json hidden_act={act!r}"]


# ---------------------------------------------------------------- key rules: diffusers key -> LDM key


_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def unet_key(key: str, cfg: dict) -> str:
    """The LDM key (without `model.diffusion_model.`) of a diffusers UNet2DConditionModel key; `cfg` resolved."""
    module, leaf = key.rsplit(".", 1)
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    parts = module.split(".")
    layers = list(cfg["layers_per_block"])
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_UNET_RESNET[rest[0]]}.{leaf}"
        if kind == "attentions":
            return ".".join(["middle_block.1", *rest, leaf])
    elif parts[0] in ("down_blocks", "up_blocks"):
        down = parts[0] == "down_blocks"
        b, kind = int(parts[1]), parts[2]
        per_block = layers if down else layers[::-1]
        # input_blocks.0 is conv_in; a down block has its resnets (+ attentions) then a downsampler slot; an up block
        # has one resnet more (the skip of the downsampler) and its upsampler in the last slot.
        start = (1 if down else 0) + sum(n + 1 for n in per_block[:b])
        blocks = "input_blocks" if down else "output_blocks"
        if kind in ("resnets", "attentions"):
            index, rest = start + int(parts[3]), parts[4:]
            if kind == "resnets":
                return f"{blocks}.{index}.0.{_UNET_RESNET[rest[0]]}.{leaf}"
            return ".".join([f"{blocks}.{index}.1", *rest, leaf])
        if kind == "downsamplers":
            return f"input_blocks.{start + per_block[b]}.0.op.{leaf}"
        if kind == "upsamplers":
            slot = 2 if cfg["up_block_types"][b].startswith("CrossAttn") else 1
            return f"output_blocks.{start + per_block[b]}.{slot}.conv.{leaf}"
    raise KeyError(f"no single-file key for UNet param {key}")


_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, num_blocks: int) -> tuple[str, str]:
    """(LDM key without `first_stage_model.`, relation) of a diffusers AutoencoderKL key."""
    module, leaf = key.rsplit(".", 1)
    parts = module.split(".")
    if parts[0] not in ("encoder", "decoder"):
        return key, COPY  # quant_conv, post_quant_conv
    side, rest = parts[0], parts[1:]
    if len(rest) == 1:
        return f"{side}.{_VAE_TOP.get(rest[0], rest[0])}.{leaf}", COPY
    if rest[0] == "mid_block":
        kind, j, sub = rest[1], int(rest[2]), ".".join(rest[3:])
        if kind == "resnets":
            return f"{side}.mid.block_{j + 1}.{sub}.{leaf}", COPY
        relation = CONV1X1 if sub != "group_norm" and leaf == "weight" else COPY
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[sub]}.{leaf}", relation
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1])
        level, name = (i, "down") if rest[0] == "down_blocks" else (num_blocks - 1 - i, "up")
        if rest[2] == "resnets":
            sub = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.{name}.{level}.block.{rest[3]}.{sub}.{leaf}", COPY
        if rest[2] in ("downsamplers", "upsamplers"):
            return f"{side}.{name}.{level}.{rest[2][:-2]}.conv.{leaf}", COPY
    raise KeyError(f"no single-file key for VAE param {key}")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tensor of the single file and the diffusers/transformers tensor(s) it holds."""

    key: str  # LDM key, canonical spelling
    parts: tuple[str, ...]  # diffusers keys (q, k, v for OpenCLIP's fused in_proj)
    relation: str  # COPY, CONV1X1, QKV, TRANSPOSE
    part_shapes: tuple[tuple[int, ...], ...]  # their PyTorch shapes
    aliases: tuple[str, ...] = ()  # other spellings accepted on import

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.part_shapes[0]
        if self.relation == CONV1X1:
            return (*first, 1, 1)
        if self.relation == QKV:
            return (sum(s[0] for s in self.part_shapes), *first[1:])
        if self.relation == TRANSPOSE:
            return first[::-1]
        return first


def rules(component: str, model: Model, family: Family) -> list[Rule]:
    """The single-file rules of one component, in the order of the model's conversion table."""
    leaves = {tuple(p.key for p in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]}
    encoder = next((e for e in family.encoders if e.component == component), None)
    cfg = unet_lib.resolved_config(model.config) if component == "unet" else None
    grouped: dict[str, list] = {}
    for entry in layout.conversion_table(model):
        key = entry.torch_key
        if component == "unet":
            ldm, relation, part = UNET_PREFIX + unet_key(key, cfg), COPY, 0
        elif component == "vae":
            suffix, relation = vae_key(key, len(model.config["block_out_channels"]))
            ldm, part = VAE_PREFIX + suffix, 0
        elif encoder is None:
            raise UserError(f"{component}: no place for it in a {family.label} single file")
        elif encoder.open_clip:
            suffix, relation, part = open_clip.ldm_key(key)
            ldm = encoder.prefix + suffix
        else:
            ldm, relation, part = encoder.prefix + key, COPY, 0
        shape = tuple(table_lib._expected_torch_shape(tuple(leaves[entry.flax_path].shape), entry.transform))
        grouped.setdefault(ldm, []).append((part, key, shape, relation))
    result = []
    for ldm, items in grouped.items():
        items.sort()
        aliases = ()
        if encoder is not None and not encoder.open_clip and ldm.startswith(encoder.prefix + "text_model."):
            aliases = (encoder.prefix + ldm[len(encoder.prefix + "text_model.") :],)
        result.append(Rule(ldm, tuple(i[1] for i in items), items[0][3], tuple(i[2] for i in items), aliases))
    return result


def _to_diffusers(rule: Rule, tensor: np.ndarray) -> dict[str, np.ndarray]:
    if rule.relation == CONV1X1:
        return {rule.parts[0]: tensor.reshape(tensor.shape[:2])}
    if rule.relation == QKV:
        bounds = np.cumsum([s[0] for s in rule.part_shapes])[:-1]
        return dict(zip(rule.parts, np.split(tensor, bounds, axis=0)))
    if rule.relation == TRANSPOSE:
        return {rule.parts[0]: tensor.T}
    return {rule.parts[0]: tensor}


def _from_diffusers(rule: Rule, state: Mapping[str, np.ndarray]) -> np.ndarray:
    if rule.relation == CONV1X1:
        return state[rule.parts[0]].reshape(rule.shape)
    if rule.relation == QKV:
        return np.concatenate([state[p] for p in rule.parts], axis=0)
    if rule.relation == TRANSPOSE:
        return np.ascontiguousarray(state[rule.parts[0]].T)
    return state[rule.parts[0]]


# ---------------------------------------------------------------- tensors no model uses

_SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
        "denoiser.sigmas",
        "denoiser.log_sigmas",
    }
)
KEPT, IGNORED = "kept", "ignored"


def leftover_rule(key: str, family: Family, layers: Mapping[str, int]) -> tuple[str, str] | None:
    """(KEPT or IGNORED, reason) for a tensor no model consumes, or None when no rule covers it (an error).

    Kept tensors travel in the checkpoint's single_file/extras.safetensors so that export restores them bitwise;
    ignored ones (EMA copies, as large as the UNet) are dropped. `layers`: each encoder's model layer count.
    """
    if key.startswith(EMA_PREFIX):
        return IGNORED, "EMA copies (model_ema.*; the non-EMA weights are converted)"
    if key in _SCHEDULE_BUFFERS:
        return KEPT, "noise-schedule buffers"
    for encoder in family.encoders:
        if not key.startswith(encoder.prefix):
            continue
        rest = key[len(encoder.prefix) :]
        if rest.endswith("position_ids"):
            return KEPT, "position_ids buffers"
        if encoder.open_clip and rest in ("logit_scale", "attn_mask"):
            return KEPT, "OpenCLIP's logit_scale / attn_mask"
        if encoder.open_clip and family.name == "sd2":
            m = open_clip.RESBLOCK.match(rest)
            if rest == "text_projection" or (m and int(m[1]) >= layers[encoder.component]):
                return KEPT, "SD 2.x: OpenCLIP's text_projection and last layer (SD 2 conditions on the penultimate)"
    return None


# ---------------------------------------------------------------- configs from tensors


def _indices(shapes, prefix: str) -> list[int]:
    n = len(prefix)
    return sorted(
        {int(k[n:].split(".", 1)[0]) for k in shapes if k.startswith(prefix) and k[n:].split(".")[0].isdigit()}
    )


def unet_config(shapes: Mapping[str, tuple], family: Family, pooled_dim: int | None) -> dict:
    """A diffusers UNet2DConditionModel config from the LDM UNet's tensor shapes (keys without the prefix).

    Seen in the tensors: in/out channels, block channels and types, layers per block, cross-attention dim, linear
    projection, transformer depths, SDXL's text_time embedding sizes. Not seen, the release's values: attention heads
    (SD 1.x: 8; SD 2.x / SDXL: 64-dimensional heads), sample_size, 32 norm groups, no upcast_attention.
    """
    n_in = _indices(shapes, "input_blocks.")[-1] + 1
    ops = [i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in shapes]
    layers, firsts, start = [], [], 1
    for end in [*ops, n_in]:
        firsts.append(start)
        layers.append(end - start)
        start = end + 1

    def depth(block: str) -> int:
        return len(_indices(shapes, f"{block}.transformer_blocks."))

    channels = [shapes[f"input_blocks.{f}.0.out_layers.3.weight"][0] for f in firsts]
    has_attn = [f"input_blocks.{f}.1.proj_in.weight" in shapes for f in firsts]
    depths = [depth(f"input_blocks.{f}.1") if a else 1 for f, a in zip(firsts, has_attn)]
    if not has_attn[-1] and "middle_block.1.proj_in.weight" in shapes:
        depths[-1] = depth("middle_block.1")  # diffusers' mid block takes the last entry
    up_firsts = np.cumsum([0] + [n + 1 for n in layers[::-1]])[:-1]
    up_attn = [f"output_blocks.{f}.1.proj_in.weight" in shapes for f in up_firsts]
    up_depths = [depth(f"output_blocks.{f}.1") if a else d for f, a, d in zip(up_firsts, up_attn, depths[::-1])]
    attn_key = next(k for k in sorted(shapes) if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in sorted(shapes) if k.endswith(".proj_in.weight"))
    n = len(channels)
    config = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8 if family.name == "sd1" else [max(1, int(c) // 64) for c in channels],
        "block_out_channels": [int(c) for c in channels],
        "center_input_sample": False,
        "cross_attention_dim": int(shapes[attn_key][1]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": int(shapes["input_blocks.0.0.weight"][1]),
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "out_channels": int(shapes["out.2.weight"][0]),
        "sample_size": family.sample_size,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 and n > 0 else depths,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "upcast_attention": False,
        "use_linear_projection": len(shapes[proj_in]) == 2,
    }
    if up_depths != depths[::-1]:
        config["reverse_transformer_layers_per_block"] = up_depths
    if "label_emb.0.0.weight" in shapes:
        adm_in = int(shapes["label_emb.0.0.weight"][1])
        config["addition_embed_type"] = "text_time"
        config["addition_embed_type_num_heads"] = 64
        config["addition_time_embed_dim"] = (adm_in - int(pooled_dim or 0)) // 6
        config["projection_class_embeddings_input_dim"] = adm_in
    return config


def vae_config(shapes: Mapping[str, tuple], family: Family) -> dict:
    """A diffusers AutoencoderKL config from the LDM VAE's tensor shapes (keys without the prefix); norm groups (32),
    sample_size and scaling_factor are the release's."""
    levels = _indices(shapes, "encoder.down.")
    channels = [int(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0]) for i in levels]
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "force_upcast": family.name == "sdxl",
        "in_channels": int(shapes["encoder.conv_in.weight"][1]),
        "latent_channels": int(shapes["decoder.conv_in.weight"][1]),
        "layers_per_block": len(_indices(shapes, "encoder.down.0.block.")),
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
        "norm_num_groups": 32,
        "out_channels": int(shapes["decoder.conv_out.weight"][0]),
        "sample_size": family.sample_size * 8,
        "scaling_factor": family.vae_scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "use_quant_conv": "quant_conv.weight" in shapes,
    }


def clip_config(shapes: Mapping[str, tuple]) -> dict:
    """A transformers CLIPTextConfig from transformers-CLIP keys (prefix removed, `text_model.` optional): OpenAI
    CLIP's quick GELU, 64-dimensional heads and the legacy token ids of the released SD configs."""
    tm = "text_model." if "text_model.embeddings.token_embedding.weight" in shapes else ""
    vocab, hidden = shapes[tm + "embeddings.token_embedding.weight"]
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(shapes[tm + "encoder.layers.0.mlp.fc1.weight"][0]),
        "num_hidden_layers": len(_indices(shapes, tm + "encoder.layers.")),
        "num_attention_heads": max(1, int(hidden) // 64),
        "max_position_embeddings": int(shapes[tm + "embeddings.position_embedding.weight"][0]),
        "projection_dim": int(hidden),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }


def configs_from_tensors(shapes: Mapping[str, tuple], family: Family, where: str) -> dict[str, dict]:
    """Every component's config, read from the tensor shapes (see unet_config, vae_config, clip_config)."""

    def under(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}

    configs = {}
    try:
        for e in family.encoders:
            if e.open_clip:
                layers = open_clip.num_layers(shapes, e.prefix)
                # Real SD 2.x files hold OpenCLIP-H whole (24 layers, text_projection); SD 2 conditions on the
                # penultimate layer, so diffusers' text encoder has one layer less. A file without text_projection
                # (written from a diffusers/jaxdiff model) holds only the layers used.
                if family.name == "sd2" and e.prefix + "text_projection" in shapes:
                    layers -= 1
                cfg = open_clip.config(shapes, e.prefix, layers=layers, with_projection=e.with_projection)
            else:
                cfg = clip_config(under(e.prefix))
            configs[e.component] = cfg
        pooled = configs.get("text_encoder_2", {}).get("projection_dim")
        configs["unet"] = unet_config(under(UNET_PREFIX), family, pooled)
        configs["vae"] = vae_config(under(VAE_PREFIX), family)
    except (KeyError, IndexError, StopIteration) as e:
        detail = f"{e.args[0]} is missing" if isinstance(e, KeyError) and e.args else "tensors are missing"
        raise UserError(
            f"{where}: cannot read the {family.label} configs from the tensors ({detail}); "
            "pass --config-from a diffusers/jaxdiff pipeline folder of the same architecture"
        ) from None
    return {name: configs[name] for name in family.components}


# ---------------------------------------------------------------- convert: single file -> jaxdiff checkpoint


def _read_manifest(folder: Path) -> dict | None:
    path = folder / SIDECAR / MANIFEST
    return checkpoint.read_json(path) if path.is_file() else None


def _folder_configs(folder: Path, names: Iterable[str]) -> dict[str, Path]:
    return {n: folder / n / checkpoint.CONFIG for n in names if (folder / n / checkpoint.CONFIG).is_file()}


def convert(
    src,
    dst,
    *,
    config_from=None,
    prediction_type: str | None = None,
    overwrite: bool = False,
    progress: bool | None = False,
) -> dict:
    """An LDM/A1111 single file (SD 1.x, SD 2.x, SDXL base; .safetensors or .ckpt) -> a jaxdiff pipeline checkpoint.

    Configs come from `config_from` (a diffusers or jaxdiff pipeline folder, which also gives the scheduler and the
    tokenizer(s): a single file holds none) or are read from the tensors with the release's values for what the
    tensors cannot show. The prediction type cannot be seen in the tensors: `prediction_type`, else config_from's
    scheduler's, else epsilon. Strict: every tensor is consumed, kept aside by rule (written to single_file/ for an
    exact export) or ignored by rule (EMA copies); anything else, or a missing or mis-shaped tensor, is one error
    naming them all, and nothing is written.
    """
    src, dst = Path(src), Path(dst)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(f"--prediction-type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")
    source = _Source(src)
    if not source.is_ldm():
        raise UserError(
            f"{src}: not an original single-file checkpoint (no {', '.join(p + '*' for p in LDM_PREFIXES[:4])} "
            "tensors); converting the weights of one diffusers/transformers component needs its --config config.json"
        )
    family, decided_by = detect(source.shapes, str(src))
    checkpoint._check_not_inside(src, dst)
    notes = []
    if config_from is not None:
        folder = Path(config_from)
        if checkpoint.folder_kind(folder) not in ("pipeline", "jaxdiff"):
            raise UserError(f"--config-from {folder}: expected a diffusers pipeline folder or a jaxdiff checkpoint")
        config_paths = _folder_configs(folder, ("unet", "vae", "text_encoder", "text_encoder_2"))
        configs = {n: checkpoint.read_json(p) for n, p in config_paths.items()}
        theirs, why = family_of_configs(configs, f"--config-from {folder}")
        if theirs is not family:
            raise UserError(
                f"--config-from {folder} is an {theirs.label} pipeline ({', '.join(why)}) but {src} is "
                f"{family.label} ({', '.join(decided_by)})"
            )
        lacking = [n for n in family.components if n not in config_paths]
        if lacking:
            raise UserError(f"--config-from {folder}: no {', '.join(f'{n}/config.json' for n in lacking)}")
        notes.append(f"configs from {folder}")
    else:
        folder, config_paths = None, {}
        configs = configs_from_tensors(source.shapes, family, str(src))
        notes.append(
            "configs read from the tensors; attention heads, sample_size, norm groups and upcast_attention are the "
            f"{family.label} release's (a model that differs needs --config-from)"
        )
    models = {}
    for name in family.components:
        where = config_paths.get(name, f"{name} config inferred from {src}")
        models[name] = create(checkpoint.architecture_of(configs[name], where), configs[name], abstract=True)
    plan = _match(source, family, models)
    scheduler = _scheduler(family, folder, prediction_type)
    how = "--prediction-type" if prediction_type else ("--config-from" if folder else "default")
    notes.append(
        f"prediction type: {scheduler['prediction_type']} ({how}; the tensors cannot show it"
        + ("; SD 2.x 768-v models are v_prediction" if family.name == "sd2" and how == "default" else "")
        + ")"
    )
    summary = {"src": str(src), "dst": str(dst), "components": {}, "copied": [], "architecture": family.label}
    summary["decided_by"] = decided_by
    with checkpoint.atomic_directory(dst, overwrite) as tmp:
        bar = tqdm(models.items(), desc="convert", unit="component", disable=checkpoint._disable(progress))
        for name, model in bar:
            state = {}
            for rule in plan["rules"][name]:
                state.update(_to_diffusers(rule, source[plan["found"][rule.key]]))
            params = layout.load_state_dict(model, state, where=f"{src} ({name})")
            checkpoint._write_jaxdiff_component(tmp / name, model, params, config_source=config_paths.get(name))
            summary["components"][name] = checkpoint._describe(model, params)
            del state, params
        (tmp / "scheduler").mkdir()
        checkpoint._write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        wanted = ("tokenizer", "tokenizer_2")[: len(family.encoders)]
        tokenizers = [t for t in wanted if folder and (folder / t).is_dir()]
        for name in tokenizers:
            shutil.copytree(folder / name, tmp / name)
        summary["copied"] = [*tokenizers, "scheduler" if folder else "scheduler (the release's)"]
        if folder and (folder / "sampling_defaults.json").is_file():
            shutil.copyfile(folder / "sampling_defaults.json", tmp / "sampling_defaults.json")
            summary["copied"].append("sampling_defaults.json")
        if len(tokenizers) < len(wanted):
            folders = " and ".join(f"{t}/" for t in wanted)
            notes.append(
                f"no tokenizer: a single file holds none, so {dst} loads as models but not as a pipeline; "
                f"pass --config-from a {family.label} diffusers pipeline folder (its {folders} is copied) or copy "
                f"{folders} into {dst}"
            )
        checkpoint._write_json(tmp / checkpoint.MODEL_INDEX, _model_index(family, folder, models, tokenizers))
        _write_sidecar(tmp / SIDECAR, source, family, decided_by, plan, scheduler["prediction_type"], how)
        classes = {name: m.architecture.name for name, m in models.items()}
        checkpoint._write_json(
            tmp / checkpoint.JAXDIFF_INDEX,
            {"format": "jaxdiff", "version": checkpoint.FORMAT_VERSION, "components": classes},
        )
    for relation, label in ((KEPT, "kept aside for an exact export"), (IGNORED, "ignored")):
        reasons = collections.Counter(reason for rel, reason in plan["leftovers"].values() if rel == relation)
        if reasons:
            notes.append(f"{label}: " + "; ".join(f"{n} tensor(s): {r}" for r, n in reasons.items()))
    summary["notes"] = notes
    return summary


def _match(source: _Source, family: Family, models: Mapping[str, Model]) -> dict:
    """Check every rule against the file's header before anything is read or written; one error names every missing,
    unexpected (no rule) and mis-shaped tensor."""
    all_rules = {name: rules(name, model, family) for name, model in models.items()}
    found, missing, misshaped = {}, [], []
    for rule in (r for rs in all_rules.values() for r in rs):
        key = next((k for k in (rule.key, *rule.aliases) if k in source.shapes), None)
        if key is None:
            missing.append(rule.key)
            continue
        shape = tuple(source.shapes[key])
        if shape != rule.shape and not (rule.relation == CONV1X1 and shape == rule.part_shapes[0]):
            misshaped.append((key, shape, rule.shape))
            continue
        found[rule.key] = key
    consumed = set(found.values()) | {k for k, *_ in misshaped}
    layers = {e.component: int(models[e.component].config.get("num_hidden_layers", 0)) for e in family.encoders}
    leftovers, unexpected = {}, []
    for key in source.shapes:
        if key in consumed:
            continue
        rule = leftover_rule(key, family, layers)
        if rule is None:
            unexpected.append(key)
        else:
            leftovers[key] = rule
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(missing, sorted(unexpected), misshaped, where=f"{source.path} ({family.label})")
    return {"rules": all_rules, "found": found, "leftovers": leftovers}


def _scheduler(family: Family, folder: Path | None, prediction_type: str | None) -> dict:
    path = folder / "scheduler" / "scheduler_config.json" if folder else None
    config = (
        checkpoint.read_json(path) if path and path.is_file() else {**family.scheduler, "prediction_type": "epsilon"}
    )
    if prediction_type:
        config["prediction_type"] = prediction_type
    config.setdefault("prediction_type", "epsilon")
    return config


def _model_index(family: Family, folder: Path | None, models: Mapping[str, Model], tokenizers: list[str]) -> dict:
    """diffusers' model_index.json: config_from's (entries for components not written set to null) or the family's."""
    index = {"_class_name": family.pipeline}
    if folder and (folder / checkpoint.MODEL_INDEX).is_file():
        index = checkpoint.read_json(folder / checkpoint.MODEL_INDEX)
    index = {k: (v if k.startswith("_") or not isinstance(v, list) else [None, None]) for k, v in index.items()}
    index.update({"_class_name": family.pipeline, "scheduler": ["diffusers", family.scheduler["_class_name"]]})
    if folder and (folder / "scheduler" / "scheduler_config.json").is_file():
        cls = checkpoint.read_json(folder / "scheduler" / "scheduler_config.json").get("_class_name")
        index["scheduler"] = ["diffusers", cls]
    for name, model in models.items():
        index[name] = ["transformers" if name.startswith("text_encoder") else "diffusers", model.architecture.name]
    for name in ("tokenizer", "tokenizer_2")[: len(family.encoders)]:
        index[name] = ["transformers", "CLIPTokenizer"] if name in tokenizers else [None, None]
    if family.name == "sdxl":
        index.setdefault("force_zeros_for_empty_prompt", True)
    else:
        index.update({k: index.get(k, [None, None]) for k in ("safety_checker", "feature_extractor")})
        index.setdefault("requires_safety_checker", False)
    return index


def _write_sidecar(
    folder: Path, source: _Source, family: Family, decided_by, plan: dict, prediction_type: str, how: str
) -> None:
    folder.mkdir()
    rules_ = [r for rs in plan["rules"].values() for r in rs]
    found = plan["found"]
    tags = collections.Counter(source.dtypes[found[r.key]] for r in rules_)
    dtype = tags.most_common(1)[0][0] if tags else "F32"
    kept = {k: reason for k, (relation, reason) in plan["leftovers"].items() if relation == KEPT}
    manifest = {
        "format": "jaxdiff-single-file",
        "version": 1,
        "architecture": family.name,
        "label": family.label,
        "source": source.path.name,
        "decided_by": decided_by,
        "prediction_type": prediction_type,
        "prediction_type_from": how,
        "dtype": dtype,
        "dtypes": {found[r.key]: source.dtypes[found[r.key]] for r in rules_ if source.dtypes[found[r.key]] != dtype},
        "shapes": {
            found[r.key]: list(source.shapes[found[r.key]])
            for r in rules_
            if tuple(source.shapes[found[r.key]]) != r.shape
        },
        "spellings": {r.key: found[r.key] for r in rules_ if found[r.key] != r.key},
        "kept": kept,
        "ignored": sum(1 for relation, _ in plan["leftovers"].values() if relation == IGNORED),
        "metadata": source.metadata,
    }
    checkpoint._write_json(folder / MANIFEST, manifest)
    if kept:
        write_safetensors(folder / EXTRAS, {k: np.array(source[k]) for k in kept}, metadata={"format": "pt"})


# ---------------------------------------------------------------- export: pipeline -> single file


def export(src, dst, *, dtype: str | None = None, overwrite: bool = False, progress: bool | None = False) -> dict:
    """A jaxdiff checkpoint or diffusers pipeline folder (SD 1.x / 2.x / SDXL-shaped) -> one LDM-layout .safetensors.

    A checkpoint converted from a single file exports bitwise equal to it: its single_file/ manifest restores the
    stored dtypes, shapes, key spellings, metadata and the tensors kept aside (EMA copies are not kept). Otherwise the
    family comes from the configs, tensors are float32, or `dtype` ("float16", "bfloat16", "float32") for all of them.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise UserError(f"{dst}: a single-file export is written as .safetensors (name it {dst.stem}.safetensors)")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (use --overwrite / overwrite=True to replace it)")
    kind = checkpoint.folder_kind(src)
    if kind == "jaxdiff":
        names = list(checkpoint._component_names(src))
        read = lambda n: checkpoint._read_jaxdiff_params(src / n)  # noqa: E731
    elif kind == "pipeline":
        names = [n for n, role in checkpoint._pipeline_entries(src).items() if role == "model"]
        read = lambda n: checkpoint._read_torch_layout(src / n, src / n / checkpoint.CONFIG, None)  # noqa: E731
    else:
        raise UserError(f"{src}: not a pipeline (a single file holds a whole pipeline: UNet, VAE, text encoder(s))")
    manifest = _read_manifest(src)
    if manifest is not None and manifest.get("architecture") in FAMILIES:
        family, decided_by = FAMILIES[manifest["architecture"]], [f"{SIDECAR}/{MANIFEST}"]
    else:
        manifest = None  # a pipeline not converted from a single file: the family from its configs
        configs = {n: checkpoint.read_json(src / n / checkpoint.CONFIG) for n in names}
        family, decided_by = family_of_configs(configs, str(src))
    lacking = [n for n in family.components if n not in names]
    if lacking:
        raise UserError(f"{src}: a {family.label} single file needs the components {', '.join(lacking)}")
    summary = {"src": str(src), "dst": str(dst), "components": {}, "architecture": family.label, "notes": []}
    summary["decided_by"] = decided_by
    manifest = manifest or {}
    tensors = {}
    bar = tqdm(family.components, desc="export", unit="component", disable=checkpoint._disable(progress))
    for name in bar:
        model, params = read(name)
        state = layout.to_state_dict(model, params)
        for rule in rules(name, model, family):  # stored as they go: one component in float32 at a time
            key, value = _stored(rule.key, _from_diffusers(rule, state), manifest, dtype)
            tensors[key] = value
        summary["components"][name] = checkpoint._describe(model, params)
        del state, params
    kept = manifest.get("kept") or {}
    if kept and (src / SIDECAR / EXTRAS).is_file():
        extras = load_safetensors(src / SIDECAR / EXTRAS)
        tensors.update({k: np.array(extras[k]) for k in kept if k in extras and k not in tensors})
    elif kept:
        summary["notes"].append(f"{len(kept)} tensor(s) kept aside on convert are gone ({SIDECAR}/{EXTRAS} is missing)")
    if manifest.get("ignored"):
        summary["notes"].append(f"{manifest['ignored']} EMA tensor(s) ignored on convert are not in the export")
    if not manifest and family.name == "sd2":
        summary["notes"].append(
            "SD 2.x: OpenCLIP's unused last layer and text_projection are not in a diffusers model, so the file "
            "holds only the layers used"
        )
    metadata = manifest["metadata"] if manifest.get("metadata") is not None else {"format": "pt"}
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(dst, tensors, metadata=metadata)
    summary["tensors"] = len(tensors)
    return summary


def _stored(key: str, value: np.ndarray, manifest: dict, dtype: str | None) -> tuple[str, np.ndarray]:
    """A tensor as the file stores it: the spelling, shape and dtype its manifest records (else canonical, float32),
    or `dtype` for every tensor."""
    key = manifest.get("spellings", {}).get(key, key)
    shape = manifest.get("shapes", {}).get(key)
    if shape is not None and int(np.prod(shape)) == value.size:
        value = value.reshape(shape)
    if dtype is not None:
        return key, value.astype(EXPORT_DTYPES[dtype])
    tag = manifest.get("dtypes", {}).get(key, manifest.get("dtype", "F32"))
    return key, value.astype(DTYPES[tag])


# ---------------------------------------------------------------- info


def _stats(source: _Source, keys: list[str], name: str) -> dict:
    return {
        "weights": [name],
        "tensors": len(keys),
        "params": int(sum(int(np.prod(source.shapes[k], dtype=np.int64)) for k in keys)),
        "dtypes": dict(collections.Counter(source.dtypes[k] for k in keys)),
    }


def info(path: str | os.PathLike) -> dict:
    """checkpoint.info, plus for a single file in the LDM layout its architecture (and the tensors that decided it)
    and its tensors by component; for a checkpoint converted from one, the architecture its manifest records."""
    path = Path(path)
    if not path.is_file():
        result = checkpoint.info(path)
        manifest = _read_manifest(path) if path.is_dir() else None
        if manifest is not None:
            result["architecture"] = f"{manifest.get('label')} (converted from {manifest.get('source')})"
            result["decided_by"] = manifest.get("decided_by", [])
            result["prediction_type"] = f"{manifest.get('prediction_type')} ({manifest.get('prediction_type_from')})"
        return result
    source = _Source(path)
    if not source.is_ldm():
        return {
            "path": str(path),
            "format": "file",
            "components": {".": _stats(source, list(source.shapes), path.name)},
            "other": [],
        }
    result = {"path": str(path), "format": "single file, LDM/A1111 layout", "components": {}, "other": []}
    try:
        family, decided_by = detect(source.shapes, str(path))
    except UnknownLayoutError as e:
        result["architecture"], result["architecture_error"] = None, e.reason
        result["components"]["."] = _stats(source, list(source.shapes), path.name)
        return result
    result["architecture"], result["decided_by"] = family.label, decided_by
    result["prediction_type"] = "not stored in the file (epsilon unless converted with --prediction-type v_prediction)"
    groups = {
        "unet": (UNET_PREFIX, "UNet2DConditionModel"),
        "vae": (VAE_PREFIX, "AutoencoderKL"),
        **{
            e.component: (e.prefix, "CLIPTextModelWithProjection" if e.with_projection else "CLIPTextModel")
            for e in family.encoders
        },
        "ema": (EMA_PREFIX, "EMA copies (ignored)"),
    }
    taken = set()
    for name, (prefix, cls) in groups.items():
        keys = [k for k in source.shapes if k.startswith(prefix)]
        if keys:
            result["components"][name] = {"class": cls, "supported": True, **_stats(source, keys, path.name)}
            taken.update(keys)
    rest = [k for k in source.shapes if k not in taken]
    if rest:
        result["components"]["other"] = {
            "class": "buffers (kept aside)",
            "supported": True,
            **_stats(source, rest, path.name),
        }
    return result
