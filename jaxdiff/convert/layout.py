"""The PyTorch (diffusers / transformers) layout of each architecture and the model <-> state-dict conversions.

Per architecture: which Flax module names are PyTorch list members (`down_blocks_0` <-> `down_blocks.0`), the weights
file name diffusers/transformers use, other spellings accepted on import and keys skipped on import. The models in
`jaxdiff.models` know nothing of this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxdiff.convert import table as table_lib

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class Layout:
    list_names: tuple[str, ...]  # Flax `name_<i>` spelled `name.<i>` by PyTorch
    weights_name: str  # file name used on export
    aliases: Callable[[str], tuple[str, ...]] = lambda key: ()  # other spellings of a key accepted on import
    ignore: tuple[str, ...] = ()  # key suffixes skipped on import


_VAE_OLD_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def vae_aliases(torch_key: str) -> tuple[str, ...]:
    """Old diffusers/LDM spelling of a VAE attention key (e.g. `stabilityai/sd-vae-ft-mse`): `to_q` -> `query`."""
    if ".attentions." not in torch_key:
        return ()
    head, _, leaf = torch_key.rpartition(".")
    for new, old in _VAE_OLD_ATTENTION.items():
        if head.endswith("." + new):
            return (f"{head[: -len(new)]}{old}.{leaf}",)
    return ()


_CLIP_PREFIX = "text_model."


def clip_unprefixed(key: str) -> tuple[str, ...]:
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix (it still loads either spelling)."""
    return (key[len(_CLIP_PREFIX) :],) if key.startswith(_CLIP_PREFIX) else ()


def clip_vision_unprefixed(key: str) -> tuple[str, ...]:
    """The same for CLIPVisionModel and its `vision_model.` prefix."""
    return (key[len("vision_model.") :],) if key.startswith("vision_model.") else ()


_UNET_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers")
_CLIP_IGNORE = ("position_ids",)  # a persistent buffer in checkpoints saved by transformers < 4.31
# pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (and torch-fidelity's copy of it): module names already match
# (Conv2d_1a_3x3.conv.weight, Mixed_5b.branch1x1.bn.running_mean, fc.weight); a BatchNorm counter saved by newer torch
# is not a weight.
_INCEPTION_IGNORE = ("num_batches_tracked",)

LAYOUTS = {
    "UNet2DConditionModel": Layout((*_UNET_LISTS, "transformer_blocks", "to_out", "net"), DIFFUSERS_WEIGHTS),
    # ControlNetModel: the UNet's down path plus `controlnet_cond_embedding.blocks.<i>` and the zero convs
    # `controlnet_down_blocks.<i>` (diffusers' ControlNetModel state dict).
    "ControlNetModel": Layout(
        (*_UNET_LISTS, "transformer_blocks", "to_out", "net", "blocks", "controlnet_down_blocks"), DIFFUSERS_WEIGHTS
    ),
    "AutoencoderKL": Layout((*_UNET_LISTS, "to_out"), DIFFUSERS_WEIGHTS, vae_aliases),
    "CLIPTextModel": Layout(("layers",), TRANSFORMERS_WEIGHTS, clip_unprefixed, _CLIP_IGNORE),
    "CLIPTextModelWithProjection": Layout(("layers",), TRANSFORMERS_WEIGHTS, ignore=_CLIP_IGNORE),
    "CLIPVisionModel": Layout(("layers",), TRANSFORMERS_WEIGHTS, clip_vision_unprefixed, _CLIP_IGNORE),
    "CLIPVisionModelWithProjection": Layout(("layers",), TRANSFORMERS_WEIGHTS, ignore=_CLIP_IGNORE),
    "CLIPModel": Layout(("layers",), TRANSFORMERS_WEIGHTS, ignore=_CLIP_IGNORE),
    "FIDInceptionV3": Layout((), TRANSFORMERS_WEIGHTS, ignore=_INCEPTION_IGNORE),
    # timm's `inception_v4` / `inception_resnet_v2` state dicts: the Flax trees mirror timm's module names, Sequential
    # members included ("0", "1", ...); timm's hub folders hold config.json + model.safetensors, as exported.
    "InceptionV4": Layout((), TRANSFORMERS_WEIGHTS, ignore=_INCEPTION_IGNORE),
    "InceptionResnetV2": Layout((), TRANSFORMERS_WEIGHTS, ignore=_INCEPTION_IGNORE),
}


def layout(model) -> Layout:
    """The PyTorch layout of a jaxdiff Model (by its architecture's name)."""
    name = model.architecture.name
    if name not in LAYOUTS:
        raise KeyError(f"no PyTorch layout for architecture {name!r} (known: {', '.join(sorted(LAYOUTS))})")
    return LAYOUTS[name]


def conversion_table(model) -> list[table_lib.Entry]:
    """The key table of a model: every Flax param path with its PyTorch key and transform."""
    return table_lib.build_table(model.params, layout(model).list_names)


def to_state_dict(model, params=None) -> dict[str, np.ndarray]:
    """PyTorch-layout float32 tensors keyed by diffusers/transformers names (the model's params by default)."""
    return table_lib.state_dict_from_params(conversion_table(model), model.params if params is None else params)


def load_state_dict(model, state, where: str = "checkpoint"):
    """Params from a PyTorch state dict (numpy arrays), strictly checked against the model (one error naming every
    missing, unexpected and mis-shaped key)."""
    lay, table = layout(model), conversion_table(model)
    aliases = {e.torch_key: lay.aliases(e.torch_key) for e in table}
    return table_lib.load_state_dict(table, state, model.params, aliases=aliases, ignore=lay.ignore, where=where)
