"""The shapes probe: a small CNN that reads a 32x32 shapes image back into labels; the judge of generated images.

From an image it predicts the number of objects and, per slot (slot 0: the single object or the left one;
slot 1: the right one), shape, colour and size, and for a single object its position. Its penultimate
features serve for a Fréchet distance between generated and real images.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.convert.safetensors_io import load_safetensors, write_safetensors
from jaxdiff.data import shapes as S

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "shapes_probe"
CONFIG = "config.json"
PARAMS = "params.safetensors"

# head name -> (label key, slot or None, vocabulary)
HEADS: dict[str, tuple[str, int | None, tuple[str, ...]]] = {
    "num_objects": ("num_objects", None, ("1", "2")),
    "shape0": ("shape", 0, S.SHAPES),
    "colour0": ("colour", 0, S.COLOURS),
    "size0": ("size", 0, S.SIZES),
    "position0": ("position", 0, S.POSITIONS),
    "shape1": ("shape", 1, S.SHAPES),
    "colour1": ("colour", 1, S.COLOURS),
    "size1": ("size", 1, S.SIZES),
}
DEFAULT_CONFIG = {"channels": [32, 64, 128], "features": 256, "groups": 8, "image_size": 32}


def conv_tower(images, channels, groups):
    """Shared CNN trunk: per level conv, stride-2 conv, each GroupNorm+SiLU; flattened features [B, D].

    Call inside a compact method: the layers (conv{i}a/b, norm{i}a/b) belong to the caller. Flattening (not
    pooling) keeps where things are, since slots are the left/right halves.
    """
    x = images.astype(jnp.float32) * 2.0 - 1.0
    for i, c in enumerate(channels):
        x = nn.Conv(c, (3, 3), padding=1, name=f"conv{i}a")(x)
        x = nn.silu(nn.GroupNorm(groups, name=f"norm{i}a")(x))
        x = nn.Conv(c, (3, 3), strides=2, padding=1, name=f"conv{i}b")(x)
        x = nn.silu(nn.GroupNorm(groups, name=f"norm{i}b")(x))
    return x.reshape(x.shape[0], -1)


class ProbeNet(nn.Module):
    """images [B, H, W, 3] in [0, 1] -> ({head: logits [B, classes]}, features [B, features])."""

    channels: tuple[int, ...] = (32, 64, 128)
    features: int = 256
    groups: int = 8

    @nn.compact
    def __call__(self, images):
        x = conv_tower(images, self.channels, self.groups)
        feats = nn.silu(nn.Dense(self.features, name="fc")(x))
        logits = {name: nn.Dense(len(vocab), name=f"head_{name}")(feats) for name, (_, _, vocab) in HEADS.items()}
        return logits, feats


def targets(labels: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-head class ids from `scene_labels`-style arrays (batched: shape/colour/size/position [B, 2],
    num_objects [B]); -1 where a head does not apply (slot 1 of a single object, position of a pair)."""
    n = np.asarray(labels["num_objects"])
    out = {"num_objects": n - 1}
    for name, (key, slot, _) in HEADS.items():
        if slot is None:
            continue
        ids = np.asarray(labels[key])[:, slot]
        if name == "position0":
            ids = np.where(n == 1, ids, -1)
        out[name] = ids.astype(np.int32)
    return {k: np.asarray(v, np.int32) for k, v in out.items()}


def loss_fn(logits: Mapping[str, jax.Array], tgt: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """Sum over heads of the mean cross-entropy over the examples where the head applies."""
    total, accs = 0.0, {}
    for name, lg in logits.items():
        t = tgt[name]
        valid = t >= 0
        logp = jax.nn.log_softmax(lg)
        nll = -jnp.take_along_axis(logp, jnp.maximum(t, 0)[:, None], axis=1)[:, 0]
        count = jnp.maximum(valid.sum(), 1)
        total = total + jnp.where(valid, nll, 0).sum() / count
        accs[name] = jnp.where(valid, jnp.argmax(lg, -1) == t, False).sum() / count
    return total, accs


def accuracy(predictions: Mapping[str, np.ndarray], tgt: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Accuracy per head over the examples where it applies; "all": every applicable head right."""
    out, all_ok = {}, None
    for name, t in tgt.items():
        t = np.asarray(t)
        valid = t >= 0
        ok = np.asarray(predictions[name]) == t
        if valid.any():
            out[name] = float(ok[valid].mean())
        ok = ok | ~valid
        all_ok = ok if all_ok is None else all_ok & ok
    out["all"] = float(all_ok.mean())
    return out


@dataclasses.dataclass
class Probe:
    """A trained probe: `probe(images)` -> ({head: predicted ids}, features), images [N, 32, 32, 3] in [0, 1]
    (float) or uint8."""

    config: dict
    params: dict

    def __post_init__(self):
        c = self.config
        self.module = ProbeNet(tuple(c["channels"]), c["features"], c["groups"])
        self._fn = jax.jit(lambda p, x: self.module.apply({"params": p}, x))

    def __call__(self, images, batch_size: int = 500) -> tuple[dict[str, np.ndarray], np.ndarray]:
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        size = self.config["image_size"]
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"the probe reads images [N, {size}, {size}, 3], got {images.shape}")
        preds, feats = {name: [] for name in HEADS}, []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            pad = batch_size - len(chunk) if len(images) > batch_size else 0  # one compiled shape per call site
            x = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
            logits, f = self._fn(self.params, jnp.asarray(x, jnp.float32))
            for name in HEADS:
                preds[name].append(np.asarray(jnp.argmax(logits[name], -1))[: len(chunk)])
            feats.append(np.asarray(f)[: len(chunk)])
        return {k: np.concatenate(v) for k, v in preds.items()}, np.concatenate(feats)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(self.params, sep="/").items()}
        write_safetensors(folder / PARAMS, flat, metadata={"format": "jaxdiff-probe"})
        (folder / CONFIG).write_text(
            json.dumps({**self.config, "heads": {k: list(v[2]) for k, v in HEADS.items()}}, indent=2) + "\n"
        )


def init_probe(config: dict | None = None, seed: int = 0) -> Probe:
    config = {**DEFAULT_CONFIG, **(config or {})}
    module = ProbeNet(tuple(config["channels"]), config["features"], config["groups"])
    size = config["image_size"]
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))["params"]
    return Probe(config, params)


def load_probe(folder: str | Path | None = None) -> Probe:
    """The probe saved in `folder` (default: the one shipped in jaxdiff/assets/shapes_probe)."""
    folder = Path(folder) if folder is not None else DEFAULT_PATH
    if not (folder / CONFIG).is_file() or not (folder / PARAMS).is_file():
        raise FileNotFoundError(f"no probe at {folder} (train one with tools/train_shapes.py --stage probe)")
    config = json.loads((folder / CONFIG).read_text())
    config.pop("heads", None)
    flat = load_safetensors(folder / PARAMS)
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    return Probe({**DEFAULT_CONFIG, **config}, params)
