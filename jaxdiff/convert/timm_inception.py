"""timm's Inception-v4 / Inception-ResNet-v2 weights (a state dict, a .pth/.safetensors file) <-> jaxdiff Models."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import layout
from jaxdiff.errors import UserError
from jaxdiff.models.model import Model, create
from jaxdiff.models.registry import architecture_for

# timm model name -> (jaxdiff class, a key only that network has, its classifier module)
NETWORKS = {
    "inception_v4": ("InceptionV4", "features.0.conv.weight", "last_linear"),
    "inception_resnet_v2": ("InceptionResnetV2", "conv2d_1a.conv.weight", "classif"),
}


def timm_name(state: Mapping[str, np.ndarray], where: str = "state dict") -> str:
    """ "inception_v4" or "inception_resnet_v2", told apart by their first convolution's key."""
    found = [name for name, (_, first, _) in NETWORKS.items() if first in state]
    if len(found) != 1:
        expected = " or ".join(f"{first!r} ({name})" for name, (_, first, _) in NETWORKS.items())
        raise UserError(f"{where}: not a timm Inception-v4 / Inception-ResNet-v2 state dict (no key {expected})")
    return found[0]


def config(name: str, num_classes: int = 1000) -> dict:
    """The jaxdiff config of a timm network (`num_classes` 0: no classifier, as timm's `num_classes=0`)."""
    if name not in NETWORKS:
        raise UserError(f"unknown timm network {name!r} (known: {', '.join(NETWORKS)})")
    return {"_class_name": NETWORKS[name][0], "num_classes": int(num_classes)}


def from_state_dict(
    state: Mapping[str, np.ndarray], name: str | None = None, *, platform: str | None = None, where: str = "state dict"
) -> Model:
    """A Model from timm's state dict (numpy arrays keyed by timm names): the network is told by its keys unless
    `name` is given, the number of classes by the classifier's shape (none: num_classes 0). Strict: one
    CheckpointMismatchError names every missing, unexpected and mis-shaped key (`num_batches_tracked` is ignored)."""
    name = name or timm_name(state, where)
    config(name)  # an unknown name is a UserError
    head = state.get(f"{NETWORKS[name][2]}.weight")
    cfg = config(name, 0 if head is None else np.shape(head)[0])
    model = create(architecture_for(cfg), cfg, abstract=True, platform=platform)
    params = layout.load_state_dict(model, state, where=where)
    return dataclasses.replace(model, params=jax.tree.map(jnp.asarray, params))


def to_state_dict(model: Model, params=None) -> dict[str, np.ndarray]:
    """timm's state dict (float32 numpy, timm names) of an InceptionV4 / InceptionResnetV2 Model, without the
    BatchNorm `num_batches_tracked` counters (timm's `load_state_dict(strict=True)` wants them: `strict=False`)."""
    if model.architecture.name not in {cls for cls, _, _ in NETWORKS.values()}:
        raise UserError(f"not a timm Inception network: {model.architecture.name}")
    return layout.to_state_dict(model, params)


def load(path: str | os.PathLike, name: str | None = None, platform: str | None = None) -> Model:
    """A Model from a timm weights file (.safetensors without torch; .pth/.bin through torch.load(weights_only))."""
    from jaxdiff.convert import checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no timm weights at {path} (a local .pth or .safetensors file; jaxdiff downloads nothing)"
        )
    return from_state_dict(checkpoint.read_state_dict(path), name, platform=platform, where=str(path))
