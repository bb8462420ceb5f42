"""The shapes probe: a small CNN that reads a 32x32 shapes image back into labels; the judge of generated images.

From an image it predicts the number of objects and, per slot (slot 0: the single object or the left one;
slot 1: the right one), shape, colour and size, and for a single object its position. Its penultimate
features serve for a Fréchet distance between generated and real images.

`Probe.judge` adds, from two optional files beside the weights (tools/train_probe_validity.py writes them), a
per-head confidence calibrated by temperature scaling (calibration.json) and a validity verdict from a small
head on the frozen features and head log-probabilities (validity.safetensors); the tower, its features and the
heads' argmax predictions are those of the trained probe, unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
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
VALIDITY = "validity.safetensors"  # the validity head (optional)
CALIBRATION = "calibration.json"  # per-head temperatures, validity threshold, the params it was fitted to (optional)
# Verdict codes of Probe.judge; every code but "ok" makes the image invalid.
JUDGE_REASONS = ("ok", "invalid", "too_many", "too_few")

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


def validity_inputs(logits: Mapping[str, np.ndarray], feats: np.ndarray) -> np.ndarray:
    """The validity head's input [N, features + classes]: the features and every head's log-probabilities."""
    logp = [np.asarray(jax.nn.log_softmax(jnp.asarray(logits[name], jnp.float32)), np.float32) for name in HEADS]
    return np.concatenate([np.asarray(feats, np.float32), *logp], axis=1)


def validity_logit(head: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    """A small MLP on standardised validity inputs x [N, D] -> logit of "valid" [N]."""
    x = (x - head["mean"]) / head["std"]
    h = jax.nn.silu(x @ head["w1"] + head["b1"])
    return (h @ head["w2"] + head["b2"])[:, 0]


def init_validity(x: np.ndarray, hidden: int = 64, seed: int = 0) -> dict[str, jax.Array]:
    """A validity head for inputs like x [N, D] (its standardisation statistics come from x)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    d = x.shape[1]
    return {
        "mean": jnp.asarray(x.mean(0)),
        "std": jnp.asarray(x.std(0) + 1e-3),
        "w1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, 1)) / np.sqrt(hidden),
        "b2": jnp.zeros(1),
    }


def fit_validity(
    x: np.ndarray,
    valid: np.ndarray,
    hidden: int = 64,
    steps: int = 2000,
    lr: float = 3e-3,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> dict[str, jax.Array]:
    """Trains the validity head on inputs x [N, D] with labels valid [N] (bool): full-batch AdamW on the
    class-balanced logistic loss; deterministic."""
    import optax

    head = init_validity(x, hidden, seed)
    frozen = {k: head.pop(k) for k in ("mean", "std")}
    y = jnp.asarray(valid, jnp.float32)
    w = jnp.where(y > 0, 0.5 / max(valid.mean(), 1e-6), 0.5 / max(1 - valid.mean(), 1e-6))
    xs = jnp.asarray(x, jnp.float32)
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)

    def loss(p):
        z = validity_logit({**p, **frozen}, xs)
        return jnp.mean(w * optax.sigmoid_binary_cross_entropy(z, y))

    @jax.jit
    def run(p):
        def step(_, carry):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, steps, step, (p, opt.init(p)))[0]

    return {**frozen, **run(head)}


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T > 0 minimising the mean NLL of softmax(logits / T) [N, C] at targets [N] (-1: skipped),
    searched on a log grid (0.05 .. 20, 1201 points); argmax is unchanged by any T > 0."""
    keep = np.asarray(targets) >= 0
    lg, t = np.asarray(logits, np.float64)[keep], np.asarray(targets)[keep]
    if not len(t):
        return 1.0
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 1201))
    nll = []
    for temp in grid:
        z = lg / temp
        z = z - z.max(1, keepdims=True)
        nll.append(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(t)), t]))
    return float(grid[int(np.argmin(nll))])


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE: the bin-weighted mean |accuracy - confidence| over `bins` equal-width confidence bins."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    if not len(confidence):
        return float("nan")
    idx = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(correct[m].mean() - confidence[m].mean())
    return float(total / len(confidence))


def softmax_confidence(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The top class's probability under softmax(logits / temperature), logits [N, C] -> [N] in [0, 1]."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return (p.max(1) / p.sum(1)).astype(np.float32)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclasses.dataclass
class Probe:
    """A trained probe: `probe(images)` -> ({head: predicted ids}, features), images [N, 32, 32, 3] in [0, 1]
    (float) or uint8. `probe.judge(images)` adds calibrated confidences and validity verdicts.

    `validity`: the validity head's params (None: no validity verdict); `calibration`: {"temperatures": {head: T},
    "threshold": float, ...} (None: temperature 1, uncalibrated).
    """

    config: dict
    params: dict
    validity: dict | None = None
    calibration: dict | None = None

    def __post_init__(self):
        c = self.config
        self.module = ProbeNet(tuple(c["channels"]), c["features"], c["groups"])
        self._fn = jax.jit(lambda p, x: self.module.apply({"params": p}, x))

    def _batches(self, images, batch_size: int):
        """Yields (len, logits, features) per chunk of images, as jax arrays padded to one compiled shape."""
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        size = self.config["image_size"]
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"the probe reads images [N, {size}, {size}, 3], got {images.shape}")
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            pad = batch_size - len(chunk) if len(images) > batch_size else 0  # one compiled shape per call site
            x = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
            logits, f = self._fn(self.params, jnp.asarray(x, jnp.float32))
            yield len(chunk), logits, f

    def __call__(self, images, batch_size: int = 500) -> tuple[dict[str, np.ndarray], np.ndarray]:
        preds, feats = {name: [] for name in HEADS}, []
        for n, logits, f in self._batches(images, batch_size):
            for name in HEADS:
                preds[name].append(np.asarray(jnp.argmax(logits[name], -1))[:n])
            feats.append(np.asarray(f)[:n])
        return {k: np.concatenate(v) for k, v in preds.items()}, np.concatenate(feats)

    def logits(self, images, batch_size: int = 500) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """({head: logits [N, classes]}, features [N, D]) of images [N, 32, 32, 3]."""
        out, feats = {name: [] for name in HEADS}, []
        for n, logits, f in self._batches(images, batch_size):
            for name in HEADS:
                out[name].append(np.asarray(logits[name])[:n])
            feats.append(np.asarray(f)[:n])
        return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(feats)

    @property
    def temperatures(self) -> dict[str, float]:
        t = (self.calibration or {}).get("temperatures", {})
        return {name: float(t.get(name, 1.0)) for name in HEADS}

    @property
    def has_validity(self) -> bool:
        return self.validity is not None and self.calibration is not None

    def judge(
        self, images, expected_objects: int | np.ndarray | None = None, batch_size: int = 500
    ) -> dict[str, np.ndarray]:
        """Judge images [N, 32, 32, 3] in the form of `pixel_judge.judge` (so `pixel_judge.accuracy` reads it).

        Returns valid bool [N] (the validity head's probability >= the threshold, and the predicted object count
        equals `expected_objects` where given, per image or for all), reason str [N] (one of JUDGE_REASONS),
        num_objects int [N] (1 or 2), shape, colour, size, position int [N, 2] (ids into ALL_SHAPES,
        ALL_COLOURS, SIZES, POSITIONS; -1 in slot 1 of a single object; a pair is left, right),
        validity float [N] (probability that the image is a valid render; NaN when the probe has no validity head),
        confidence {head: float [N]} (calibrated probability of the predicted class), predictions {head: ids [N]}
        (exactly those of `probe(images)`), validity_available bool.
        """
        logits, feats = self.logits(images, batch_size)
        n = len(feats)
        preds = {name: np.argmax(lg, -1).astype(np.int32) for name, lg in logits.items()}
        temps = self.temperatures
        confidence = {name: softmax_confidence(lg, temps[name]) for name, lg in logits.items()}
        if self.has_validity:
            z = validity_logit(self.validity, jnp.asarray(validity_inputs(logits, feats)))
            validity = np.asarray(jax.nn.sigmoid(z), np.float32)
            ok = validity >= float(self.calibration["threshold"])
        else:
            warnings.warn(
                "this probe has no validity head (validity.safetensors + calibration.json beside its weights): "
                "'valid' only checks the predicted object count; train one with tools/train_probe_validity.py",
                stacklevel=2,
            )
            validity, ok = np.full(n, np.nan, np.float32), np.ones(n, bool)
        count = preds["num_objects"] + 1
        expected = np.broadcast_to(np.asarray(-1 if expected_objects is None else expected_objects), (n,))
        reason = np.full(n, "ok", dtype=f"<U{max(map(len, JUDGE_REASONS))}")
        reason[(expected > 0) & (count < expected)] = "too_few"
        reason[(expected > 0) & (count > expected)] = "too_many"
        reason[~ok] = "invalid"
        two = count == 2
        out = {"valid": reason == "ok", "reason": reason, "num_objects": count.astype(np.int32)}
        for key in ("shape", "colour", "size"):
            out[key] = np.stack([preds[f"{key}0"], np.where(two, preds[f"{key}1"], -1)], 1).astype(np.int32)
        left, right = S.POSITIONS.index("left"), S.POSITIONS.index("right")
        out["position"] = np.stack([np.where(two, left, preds["position0"]), np.where(two, right, -1)], 1)
        out["position"] = out["position"].astype(np.int32)
        out |= {"validity": validity, "confidence": confidence, "predictions": preds}
        out["validity_available"] = self.has_validity
        return out

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(self.params, sep="/").items()}
        write_safetensors(folder / PARAMS, flat, metadata={"format": "jaxdiff-probe"})
        (folder / CONFIG).write_text(
            json.dumps({**self.config, "heads": {k: list(v[2]) for k, v in HEADS.items()}}, indent=2) + "\n"
        )
        if self.has_validity:
            self.save_judge(folder)

    def save_judge(self, folder: str | Path, extra: dict | None = None) -> None:
        """Writes the validity head and the calibration (bound to the params file beside them) into folder."""
        folder = Path(folder)
        head = {k: np.asarray(v, np.float32) for k, v in self.validity.items()}
        write_safetensors(folder / VALIDITY, head, metadata={"format": "jaxdiff-probe-validity"})
        cal = {**self.calibration, **(extra or {}), "params_sha256": file_sha256(folder / PARAMS)}
        (folder / CALIBRATION).write_text(json.dumps(cal, indent=2) + "\n")


def init_probe(config: dict | None = None, seed: int = 0) -> Probe:
    config = {**DEFAULT_CONFIG, **(config or {})}
    module = ProbeNet(tuple(config["channels"]), config["features"], config["groups"])
    size = config["image_size"]
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))["params"]
    return Probe(config, params)


def load_probe(folder: str | Path | None = None) -> Probe:
    """The probe saved in `folder` (default: the one shipped in jaxdiff/assets/shapes_probe), with its validity head
    and calibration when the folder has them (and they were fitted to these weights)."""
    folder = Path(folder) if folder is not None else DEFAULT_PATH
    if not (folder / CONFIG).is_file() or not (folder / PARAMS).is_file():
        raise FileNotFoundError(f"no probe at {folder} (train one with tools/train_shapes.py --stage probe)")
    config = json.loads((folder / CONFIG).read_text())
    config.pop("heads", None)
    flat = load_safetensors(folder / PARAMS)
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    validity = calibration = None
    if (folder / CALIBRATION).is_file() and (folder / VALIDITY).is_file():
        calibration = json.loads((folder / CALIBRATION).read_text())
        if calibration.get("params_sha256") != file_sha256(folder / PARAMS):
            warnings.warn(
                f"{folder / CALIBRATION} was fitted to other probe weights; ignoring it and {VALIDITY} "
                "(rerun tools/train_probe_validity.py)",
                stacklevel=2,
            )
            calibration = None
        else:
            validity = {k: jnp.asarray(v) for k, v in load_safetensors(folder / VALIDITY).items()}
    return Probe({**DEFAULT_CONFIG, **config}, params, validity, calibration)
