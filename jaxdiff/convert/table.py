"""Explicit PyTorch <-> Flax key-mapping tables with per-tensor transforms, used in both directions."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxdiff.errors import UserError

# Transforms from a PyTorch tensor to the Flax leaf (the inverse is applied on export).
IDENTITY = "identity"  # norms, biases, embeddings
LINEAR = "linear"  # torch Linear weight [out, in]  <->  Dense kernel [in, out]
CONV = "conv"  # torch Conv2d weight [O, I, kh, kw]  <->  kernel [kh, kw, I, O]


class CheckpointMismatchError(UserError):
    """A checkpoint does not match the model: lists every missing, unexpected and mis-shaped key."""

    def __init__(self, missing=(), unexpected=(), misshaped=(), where: str = "checkpoint"):
        self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
        lines = [f"{where} does not match the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.misshaped:
            lines.append(
                f"  mis-shaped keys ({len(self.misshaped)}): "
                + ", ".join(f"{k} (checkpoint {tuple(a)}, model expects {tuple(b)})" for k, a, b in self.misshaped)
            )
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a mapping table: Flax param path, PyTorch state-dict key, transform."""

    flax_path: tuple[str, ...]
    torch_key: str
    transform: str


def _torch_name(segment: str, list_names: frozenset[str]) -> str:
    # Flax names list members `name_<i>` (e.g. `down_blocks_0`); PyTorch spells them `name.<i>`.
    head, sep, tail = segment.rpartition("_")
    if sep and tail.isdigit() and head in list_names:
        return f"{head}.{tail}"
    return segment


# Flax leaf name -> PyTorch's; `mean`/`var` are BatchNorm running statistics kept as params (inference-only models).
_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
# Bare `nn.Parameter`s of a PyTorch module keep their own name (CLIP's `embeddings.class_embedding`, `logit_scale`).
_LEAF.update({name: name for name in ("class_embedding", "logit_scale")})


def build_table(abstract_params: Mapping, list_names: Iterable[str]) -> list[Entry]:
    """Derive the table for a (possibly abstract) Flax param tree whose module names mirror PyTorch's."""
    list_names = frozenset(list_names)
    table = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        names = tuple(p.key for p in path)
        *modules, leaf_name = names
        if leaf_name not in _LEAF:
            raise ValueError(f"no conversion rule for param {'/'.join(names)}")
        if leaf_name == "kernel":
            transform = CONV if len(leaf.shape) == 4 else LINEAR
        else:
            transform = IDENTITY
        key = ".".join([_torch_name(m, list_names) for m in modules] + [_LEAF[leaf_name]])
        table.append(Entry(names, key, transform))
    return table


def torch_to_flax(tensor: np.ndarray, transform: str) -> np.ndarray:
    if transform == LINEAR:
        if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):  # 1x1 conv stored for a Linear (old LDM VAE attention)
            tensor = tensor[:, :, 0, 0]
        return np.ascontiguousarray(tensor.T) if tensor.ndim == 2 else tensor
    if transform == CONV:
        return np.ascontiguousarray(tensor.transpose(2, 3, 1, 0)) if tensor.ndim == 4 else tensor
    return tensor


def flax_to_torch(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == LINEAR:
        return np.ascontiguousarray(array.T)
    if transform == CONV:
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return np.ascontiguousarray(array).reshape(array.shape)  # ascontiguousarray makes a scalar (logit_scale) 1-d


def load_state_dict(
    table: list[Entry],
    state: Mapping[str, np.ndarray],
    abstract_params: Mapping,
    *,
    aliases: Mapping[str, Iterable[str]] = (),
    ignore: Iterable[str] = (),
    where: str = "checkpoint",
) -> dict:
    """Fill the param tree from a PyTorch state dict, strictly.

    Every table entry must find its tensor (under its key or one of `aliases[key]`), every tensor must be
    consumed (except keys ending with a name in `ignore`, e.g. non-persistent buffers), and every shape
    must match; otherwise one CheckpointMismatchError lists all offending keys. Half precision is upcast
    to float32.
    """
    aliases = dict(aliases)
    ignore = tuple(ignore)
    expected = {
        tuple(p.key for p in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }
    consumed, missing, misshaped, flat = set(), [], [], {}
    for entry in table:
        key = next((k for k in (entry.torch_key, *aliases.get(entry.torch_key, ())) if k in state), None)
        if key is None:
            missing.append(entry.torch_key)
            continue
        consumed.add(key)
        tensor = np.asarray(state[key])
        if tensor.dtype != np.float32:
            tensor = tensor.astype(np.float32)
        array = torch_to_flax(tensor, entry.transform)
        want = tuple(expected[entry.flax_path].shape)
        if array.shape != want:
            misshaped.append((key, tensor.shape, _expected_torch_shape(want, entry.transform)))
            continue
        flat[entry.flax_path] = array
    unexpected = sorted(k for k in state if k not in consumed and not k.endswith(ignore or ("\0",)))
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(missing, unexpected, misshaped, where=where)
    return _unflatten(flat)


def _expected_torch_shape(flax_shape, transform):
    if transform == LINEAR and len(flax_shape) == 2:
        return flax_shape[::-1]
    if transform == CONV and len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    return flax_shape


def state_dict_from_params(table: list[Entry], params: Mapping) -> dict[str, np.ndarray]:
    """The inverse of load_state_dict: PyTorch-layout float32 numpy tensors keyed by PyTorch names."""
    flat = {tuple(p.key for p in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    return {e.torch_key: flax_to_torch(np.asarray(flat[e.flax_path], dtype=np.float32), e.transform) for e in table}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree
