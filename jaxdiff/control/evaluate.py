"""How often a ControlNet puts the object where the condition says: IoU with the mask, both judges' attributes."""

from __future__ import annotations

import numpy as np

from jaxdiff.control import data
from jaxdiff.data import shapes as S
from jaxdiff.erase.evaluate import noise, rate
from jaxdiff.metrics import pixel_judge

IOU_HIT = 0.5  # an image whose segmented object(s) overlap the condition's mask at least this much is a hit


def heldout_scenes(n: int, seed: int = 0, num_objects: int = 0) -> tuple[list[S.Scene], list[str]]:
    """n scenes from the held-out stream (never a training step's generator) with held-out-template captions."""
    rng = np.random.default_rng([seed, data.HELDOUT_STREAM])
    scenes = data.draw_scenes(rng, n, num_objects)
    return scenes, [S.caption(scene, rng, "heldout") for scene in scenes]


def target_masks(scenes: list[S.Scene], size: int) -> np.ndarray:
    """bool [N, size, size]: pixels at least half covered by an object of the scene (the filled condition mask)."""
    return np.stack([S.render_mask(s, size)[..., 0] >= 128 for s in scenes])


def segmented_masks(images: np.ndarray, num_objects) -> np.ndarray:
    """bool [N, H, W]: pixels at least half covered by an object the pixel judge segments (specks and fragments
    too small to be an object left out); `num_objects` [N] as the judge is told (one: no midline split)."""
    blobs, _, _ = pixel_judge.segment(images, split=np.asarray(num_objects) != 1)
    n, h, w = np.shape(images)[:3]
    out = np.zeros((n, h, w), bool)
    for i, objects in enumerate(blobs):
        for obj in objects:
            if not obj["small"]:
                out[i] |= obj["alpha"] >= 0.5
    return out


def iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Intersection over union per image [N] of bool masks [N, H, W] (0 where both are empty)."""
    inter = (pred & target).sum(axis=(1, 2))
    union = (pred | target).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def attributes_correct(verdicts: dict, labels: dict) -> dict[str, np.ndarray]:
    """Per image, bool [N]: every object's shape right ("shape"), every colour right ("colour"); `verdicts`: head ->
    ids in the probe's form (`pixel_judge.heads` gives it for the pixel judge, -2 for invalid images)."""
    tgt = pixel_judge.targets(labels)
    out = {}
    for kind in ("shape", "colour"):
        ok = np.ones(len(tgt["num_objects"]), bool)
        for slot in range(S.MAX_OBJECTS):
            t = tgt[f"{kind}{slot}"]
            ok &= (np.asarray(verdicts[f"{kind}{slot}"]) == t) | (t < 0)
        out[kind] = ok
    return out


def measure(images: np.ndarray, scenes: list[S.Scene], probe) -> dict:
    """Placement and prompt-following of generated images [N, S, S, 3] (float in [0, 1]) of `scenes`: per-image IoU
    of the segmented object(s) with the scene's mask, and rates {"rate", "k", "n", "ci"} of IoU >= IOU_HIT, of
    shape and colour right by the probe and by the pixel judge (training vocabulary), of valid images."""
    labels = [S.scene_labels(s) for s in scenes]
    batched = {k: np.stack([lab[k] for lab in labels]) for k in labels[0]}
    counts = np.asarray([len(s.objects) for s in scenes])
    overlap = iou(segmented_masks(images, counts), target_masks(scenes, images.shape[1]))
    verdicts = pixel_judge.judge(images, counts, shapes=S.SHAPES, colours=S.COLOURS)
    pixel = attributes_correct(pixel_judge.heads(verdicts), batched)
    probe_ok = attributes_correct(probe(images)[0], batched)
    return {
        "n": len(scenes),
        "iou": overlap.tolist(),
        "iou_mean": float(overlap.mean()),
        "iou_ci": _mean_ci(overlap),
        "hit": rate(overlap >= IOU_HIT),
        "probe_shape": rate(probe_ok["shape"]),
        "probe_colour": rate(probe_ok["colour"]),
        "pixel_shape": rate(pixel["shape"]),
        "pixel_colour": rate(pixel["colour"]),
        "pixel_valid": rate(verdicts["valid"]),
    }


def _mean_ci(x: np.ndarray) -> list[float]:
    """Normal-approximation 95 % interval of the mean."""
    half = 1.96 * float(np.std(x, ddof=1)) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return [float(np.mean(x)) - half, float(np.mean(x)) + half]


def generate(pipe, prompts, latents, steps: int, guidance: float, batch: int, conditions=None, scale: float = 1.0):
    """Images [N, S, S, 3] of `prompts` from `latents` [N, h, w, C], with the pipeline's ControlNet on `conditions`
    (uint8 [N, S, S, 3]) or without it (None); fixed-size chunks (the last padded) so one program serves all."""
    out = []
    for start in range(0, len(prompts), batch):
        stop = min(start + batch, len(prompts))
        pad = batch - (stop - start) if len(prompts) > batch else 0
        take = lambda a: np.concatenate([a[start:stop]] + [a[stop - 1 : stop]] * pad)  # noqa: E731
        kwargs = {}
        if conditions is not None:
            kwargs = {"control_image": [take(conditions).astype(np.float32) / 255.0], "controlnet_scale": scale}
        chunk = list(prompts[start:stop]) + [prompts[stop - 1]] * pad
        images = pipe(chunk, steps=steps, guidance=guidance, scheduler="ddim", latents=take(latents), **kwargs)
        out.append(np.asarray(images)[: stop - start])
    return np.concatenate(out)


def starting_noise(pipe, n: int, seed: int) -> np.ndarray:
    """The same unit Gaussian latents [n, h, w, C] for the runs with and without the ControlNet."""
    c = pipe.unet.config
    return noise(n, (int(c.get("sample_size", 64)),) * 2 + (int(c.get("in_channels", 4)),), seed)
