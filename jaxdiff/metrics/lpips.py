"""LPIPS (Zhang et al. 2018; the `lpips` package, v0.1) in pure JAX on user-supplied weights: jit-able, differentiable.

`lpips_distance(params, in0, in1, net)` equals `lpips.LPIPS(net=net, version="0.1", lpips=True, spatial=False)
.forward(in0, in1, normalize=False)` (shape [N] here, [N, 1, 1, 1] there): the ScalingLayer ((x − shift) / scale,
shift [−.030, −.088, −.188], scale [.458, .448, .450]), the backbone's five ReLU taps (net="vgg": torchvision VGG16
`features`, relu1_2 relu2_2 relu3_3 relu4_3 relu5_3; net="alex": AlexNet `features`, relu1..relu5), per-pixel unit
normalisation over channels x / (√Σx² + 1e-10), squared differences, the 1×1 "lin" layers (no bias; their dropout is
the identity in eval), the spatial mean, the sum over taps. Images are NHWC in [−1, 1] (`normalize=True` maps
[0, 1] → [−1, 1] first, as the package's flag does). Parity with lpips 0.1.4 on drawn weights:
tests/test_lpips.py (goldens from tools/make_metric_goldens.py --only lpips).

Weights: jaxdiff ships and downloads none. `load_lpips(path_or_state_dict, net)` reads the state dict of the whole
`lpips.LPIPS` module (keys `net.slice1.0.weight` ..., `lin0.model.1.weight` ...; the duplicate `lins.K.*` and the
`scaling_layer.*` buffers are accepted) from .pth/.pt/.bin (torch.load(weights_only=True): a pickle that would run
code is refused), .safetensors or .npz (no torch). The package ships only the lin layers (lpips/weights/v0.1/
vgg.pth, alex.pth); the backbone is torchvision's ImageNet VGG16 / AlexNet `features`. One file of both, made
where torchvision can download (`merge_state_dict` maps torchvision's `features` keys to the slices):

    import lpips, torch, torchvision  # pip install lpips (its wheel holds weights/v0.1/*.pth)
    from jaxdiff.metrics.lpips import merge_state_dict
    lin = torch.load(f"{lpips.__path__[0]}/weights/v0.1/vgg.pth", "cpu", weights_only=True)  # lin0.model.1.weight
    features = torchvision.models.vgg16(weights="IMAGENET1K_V1").features.state_dict()  # 0.weight, 0.bias ...
    torch.save(merge_state_dict(features, lin, "vgg"), "lpips_vgg.pth")  # (or lpips.LPIPS(net="vgg").state_dict())

then `load_lpips("lpips_vgg.pth")` (for net="alex": alexnet, alex.pth, "alex").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

# Each net: per slice (one tap at its end), the ops in torchvision's `features` order: ("conv", index, c_out, c_in,
# kernel, stride, padding) followed by its ReLU, or ("pool", kernel, stride) (max pool, no padding, floor).
_VGG = (
    (("conv", 0, 64, 3, 3, 1, 1), ("conv", 2, 64, 64, 3, 1, 1)),
    (("pool", 2, 2), ("conv", 5, 128, 64, 3, 1, 1), ("conv", 7, 128, 128, 3, 1, 1)),
    (("pool", 2, 2), ("conv", 10, 256, 128, 3, 1, 1), ("conv", 12, 256, 256, 3, 1, 1), ("conv", 14, 256, 256, 3, 1, 1)),
    (("pool", 2, 2), ("conv", 17, 512, 256, 3, 1, 1), ("conv", 19, 512, 512, 3, 1, 1), ("conv", 21, 512, 512, 3, 1, 1)),
    (("pool", 2, 2), ("conv", 24, 512, 512, 3, 1, 1), ("conv", 26, 512, 512, 3, 1, 1), ("conv", 28, 512, 512, 3, 1, 1)),
)
_ALEX = (
    (("conv", 0, 64, 3, 11, 4, 2),),
    (("pool", 3, 2), ("conv", 3, 192, 64, 5, 1, 2)),
    (("pool", 3, 2), ("conv", 6, 384, 192, 3, 1, 1)),
    (("conv", 8, 256, 384, 3, 1, 1),),
    (("conv", 10, 256, 256, 3, 1, 1),),
)
NETS = {"vgg": _VGG, "alex": _ALEX}
MIN_SIZE = {"vgg": 16, "alex": 31}  # the smallest height/width whose last tap is at least 1x1


def _convs(net: str):
    """(slice number 1..5, torchvision index, c_out, c_in, kernel, stride, padding) of every conv of `net`."""
    return [(s + 1, *op[1:]) for s, ops in enumerate(_layers(net)) for op in ops if op[0] == "conv"]


def _layers(net: str):
    if net not in NETS:
        raise UserError(f"LPIPS net must be one of {', '.join(NETS)}, got {net!r}")
    return NETS[net]


def state_dict_shapes(net: str = "vgg") -> dict[str, tuple[int, ...]]:
    """The keys and shapes `lpips.LPIPS(net=net).state_dict()` holds (without the duplicate `lins.K.*` and the
    `scaling_layer.*` buffers)."""
    shapes = {}
    for s, i, c_out, c_in, k, _, _ in _convs(net):
        shapes[f"net.slice{s}.{i}.weight"] = (c_out, c_in, k, k)
        shapes[f"net.slice{s}.{i}.bias"] = (c_out,)
    ends = [[op for op in ops if op[0] == "conv"][-1][2] for ops in _layers(net)]  # channels of each tap
    for kk, c in enumerate(ends):
        shapes[f"lin{kk}.model.1.weight"] = (1, c, 1, 1)
    return shapes


# ------------------------------------------------------------------------------------------------ loading


def merge_state_dict(features: Mapping, lin: Mapping, net: str = "vgg") -> dict:
    """An lpips.LPIPS state dict from torchvision's VGG16 / AlexNet `features` state dict (keys "0.weight", ...; a
    "features." prefix is dropped) and the lpips package's lin file (weights/v0.1/<net>.pth: "lin0.model.1.weight",
    ...). Values pass through unchanged (torch tensors or arrays)."""
    where = {i: s for s, i, *_ in _convs(net)}
    out = {}
    for key, value in features.items():
        name = key.removeprefix("features.")
        index = int(name.split(".")[0]) if name.split(".")[0].isdigit() else None
        if index not in where:
            raise UserError(f"{key}: not a conv of torchvision's {net} `features` (convs at {sorted(where)})")
        out[f"net.slice{where[index]}.{name}"] = value
    return {**out, **lin}


def read_lpips_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{key: numpy array} from a .npz (no pickles), .safetensors, or .pth/.pt/.bin/.ckpt (torch, weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no LPIPS weights at {path}: a state dict of lpips.LPIPS (see jaxdiff.metrics.lpips for the recipe; "
            "jaxdiff downloads nothing)"
        )
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    from jaxdiff.convert import checkpoint

    return checkpoint.read_state_dict(path)


def convert_state_dict(state: Mapping[str, np.ndarray], net: str = "vgg", where: str = "state dict") -> dict:
    """lpips.LPIPS state dict (OIHW convs) -> params {"convs": [[(w HWIO, b)] per slice], "lins": [w [C]],
    "shift": [3], "scale": [3]} (float32 numpy). Strict: a missing, unknown or misshapen key is one UserError naming
    every such key; `lins.K.model.1.weight` (the module's duplicate of linK) must equal linK when both are present."""
    state = {str(k): np.asarray(v) for k, v in state.items()}
    expected = state_dict_shapes(net)
    optional = {"scaling_layer.shift": (1, 3, 1, 1), "scaling_layer.scale": (1, 3, 1, 1)}
    optional.update({f"lins.{kk}.model.1.weight": expected[f"lin{kk}.model.1.weight"] for kk in range(5)})
    missing = sorted(k for k in expected if k not in state)
    unknown = sorted(k for k in state if k not in expected and k not in optional)
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} (expected {shape})"
        for k, shape in {**expected, **optional}.items()
        if k in state and tuple(state[k].shape) != shape
    )
    if missing or unknown or wrong:
        parts = [f"missing {', '.join(missing)}" if missing else "", f"unknown {', '.join(unknown)}" if unknown else ""]
        parts.append(f"wrong shape {', '.join(wrong)}" if wrong else "")
        first = state.get("net.slice1.0.weight")
        kernel = None if first is None or first.ndim != 4 else first.shape[-1]
        other = {3: "vgg", 11: "alex"}.get(kernel, net)
        hint = f" (its first conv is net={other!r}'s)" if other != net else ""
        raise UserError(
            f"{where}: not an lpips.LPIPS(net={net!r}) state dict{hint}: {'; '.join(p for p in parts if p)}. "
            f"Expected keys: {', '.join(expected)} (see jaxdiff.metrics.lpips for how to make one)"
        )
    for kk in range(5):
        dup = state.get(f"lins.{kk}.model.1.weight")
        if dup is not None and not np.array_equal(dup, state[f"lin{kk}.model.1.weight"]):
            raise UserError(f"{where}: lins.{kk}.model.1.weight differs from lin{kk}.model.1.weight (one module)")
    f32 = lambda k: np.asarray(state[k], np.float32)  # noqa: E731
    convs = [[] for _ in range(5)]
    for s, i, *_ in _convs(net):
        w = f32(f"net.slice{s}.{i}.weight").transpose(2, 3, 1, 0)  # OIHW -> HWIO
        convs[s - 1].append((w, f32(f"net.slice{s}.{i}.bias")))
    return {
        "convs": convs,
        "lins": [f32(f"lin{kk}.model.1.weight").reshape(-1) for kk in range(5)],
        "shift": f32("scaling_layer.shift").reshape(3) if "scaling_layer.shift" in state else np.float32(SHIFT),
        "scale": f32("scaling_layer.scale").reshape(3) if "scaling_layer.scale" in state else np.float32(SCALE),
    }


@dataclasses.dataclass(frozen=True)
class LPIPS:
    """LPIPS weights for one backbone; `model(in0, in1)` → distances [N] (jitted; see `lpips_distance`)."""

    net: str
    params: dict

    def __call__(self, in0, in1, normalize: bool = False):
        return _jitted(self.net, bool(normalize))(self.params, in0, in1)


def load_lpips(path_or_state_dict, net: str = "vgg") -> LPIPS:
    """LPIPS(net) from a file (.pth/.pt/.bin via torch.load(weights_only=True), .safetensors, .npz) or an in-memory
    state dict {key: array} of the whole lpips.LPIPS module (see the module docstring for how to make one)."""
    _layers(net)
    if isinstance(path_or_state_dict, Mapping):
        state, where = path_or_state_dict, "state dict"
    else:
        state, where = read_lpips_state_dict(path_or_state_dict), str(path_or_state_dict)
    params = jax.tree.map(jnp.asarray, convert_state_dict(state, net, where))
    return LPIPS(net, params)


# ------------------------------------------------------------------------------------------------ the network


_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, b, stride: int, padding: int, precision):
    y = jax.lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        [(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )
    return y + b


def _max_pool(x, k: int, s: int):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), "VALID")


def features(params, x, net: str = "vgg", precision=None) -> list[jax.Array]:
    """The five ReLU taps [N, h, w, C] of the scaled input x (NHWC, after the ScalingLayer)."""
    taps = []
    for ops, convs in zip(_layers(net), params["convs"], strict=True):
        convs = iter(convs)
        for op in ops:
            if op[0] == "pool":
                x = _max_pool(x, op[1], op[2])
            else:
                w, b = next(convs)
                x = jax.nn.relu(_conv(x, w, b, op[5], op[6], precision))
        taps.append(x)
    return taps


def _unit(f):
    """f / (√Σ_c f² + eps), with a gradient that stays finite where Σ_c f² = 0 (a dead pixel: the forward is 0 there,
    as the package's)."""
    s = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    pos = s > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)
    return f / (norm + EPS)


def lpips_distance(params, in0, in1, net: str = "vgg", normalize: bool = False, precision=None) -> jax.Array:
    """LPIPS distances [N] of images in0, in1 [N, H, W, 3] (NHWC, in [−1, 1]; `normalize`: in [0, 1]), as
    lpips.LPIPS(net, version="0.1").forward(in0, in1, normalize) (NCHW there). Pure and differentiable in params
    and both images; in0 and in1 go through the backbone as one batch (identical images give 0 up to float32
    rounding in XLA's fused reductions, ~1e-15 jitted on CPU; exactly 0 eagerly)."""
    in0, in1 = jnp.asarray(in0, jnp.float32), jnp.asarray(in1, jnp.float32)
    if in0.shape != in1.shape or in0.ndim != 4 or in0.shape[-1] != 3:
        raise UserError(f"LPIPS compares two NHWC RGB batches of one shape, got {in0.shape} and {in1.shape}")
    if min(in0.shape[1:3]) < MIN_SIZE[net]:
        raise UserError(f"LPIPS net={net!r} needs images of at least {MIN_SIZE[net]}x{MIN_SIZE[net]}, got {in0.shape}")
    if normalize:
        in0, in1 = 2 * in0 - 1, 2 * in1 - 1
    x = (jnp.concatenate([in0, in1]) - params["shift"]) / params["scale"]
    total = jnp.zeros((in0.shape[0],), jnp.float32)
    for f, lin in zip(features(params, x, net, precision), params["lins"], strict=True):
        f0, f1 = jnp.split(_unit(f), 2)
        d = jnp.einsum("nhwc,c->nhw", jnp.square(f0 - f1), lin, precision=precision)  # the 1x1 conv, no bias
        total = total + jnp.mean(d, axis=(1, 2))
    return total


_JITTED: dict = {}


def _jitted(net: str, normalize: bool):
    key = (net, normalize)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda p, a, b: lpips_distance(p, a, b, net, normalize))
    return _JITTED[key]
