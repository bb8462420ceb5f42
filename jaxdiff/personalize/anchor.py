"""Anchor-start sampling of a personalised model (the "anchor-start DreamBooth" recipe of deepfake interaction
images): render or generate a composition first (the anchor, e.g. two generic subjects in the wanted layout), then
sample the personalised model from that anchor noised to `strength` (SDEdit through the pipeline's img2img path), so
the layout comes from the anchor and the identity from the fine-tuned model. strength 1.0 means no anchor: plain
text-to-image from the same noise.

    images = sample_from_anchor(pipe, prompts, anchors, strength=0.5, noise=z)

On the shapes world the anchor is a two-object render (`anchor_scenes`) and `layout_kept` / `identity_left` judge
the result with the pixel judge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxdiff.errors import UserError


def sample_from_anchor(
    pipe,
    prompts: Sequence[str],
    anchors,
    strength: float,
    *,
    noise=None,
    steps: int = 25,
    guidance: float = 5.0,
    scheduler: str | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Images [B, H, W, 3] in [0, 1] of `pipe` for `prompts`, started from `anchors` ([H, W, 3] or [B, H, W, 3],
    uint8 or float in [0, 1]) noised to `strength` in (0, 1]: the last int(steps * strength) steps run (diffusers'
    img2img). strength 1.0 ignores the anchors and samples from `noise` alone (the no-anchor reference; img2img at
    strength 1 would still leak the anchor through the last noise level's signal). `noise`: unit Gaussian latents
    [B, h, w, C] (the added noise of img2img, the start of text-to-image), or None for the pipeline's `seed`."""
    prompts = list(prompts)
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise UserError(f"anchor strength must be in (0, 1], got {strength}")
    kw = dict(steps=int(steps), guidance=float(guidance), scheduler=scheduler, seed=int(seed), latents=noise)
    if strength >= 1.0:
        return pipe(prompts, **kw)
    return pipe(prompts, image=anchors, strength=strength, **kw)


# -- the shapes world ------------------------------------------------------------------------------------------------


def anchor_scenes(
    n: int,
    seed: int,
    left_shapes: Sequence[str] = ("circle", "square"),
    left_colours: Sequence[str] = ("red", "green", "blue"),
) -> list:
    """n two-object scenes of the training world (left object one of `left_shapes` in one of `left_colours`: a
    generic subject the personalised one should replace; right object any training shape and colour; random
    sizes)."""
    from jaxdiff.data import shapes as S

    rng = np.random.default_rng([seed, 31])
    scenes = []
    for _ in range(n):
        scene = S.sample_scene(rng, num_objects=2)
        shape, colour = str(rng.choice(list(left_shapes))), str(rng.choice(list(left_colours)))
        left = dataclasses.replace(scene.objects[0], shape=shape, colour=colour)
        scenes.append(dataclasses.replace(scene, objects=(left, scene.objects[1])))
    return scenes


def composition_prompts(scenes, token: str) -> list[str]:
    """ "a <v> on the left and a {colour} {shape} on the right", the right object the anchor's."""
    return [f"a {token} on the left and a {s.objects[1].colour} {s.objects[1].shape} on the right" for s in scenes]


def layout_kept(verdicts: dict, scenes) -> np.ndarray:
    """bool [N]: the pixel judge found exactly two objects, on the left and on the right as in the anchor, each of
    the anchor's size (small/large)."""
    from jaxdiff.data import shapes as S

    ok = verdicts["num_objects"] == 2
    for slot, where in ((0, "left"), (1, "right")):
        ok &= verdicts["position"][:, slot] == S.POSITIONS.index(where)
        size = np.asarray([S.SIZES.index(s.objects[slot].size) for s in scenes])
        ok &= verdicts["size"][:, slot] == size
    return ok


def identity_left(verdicts: dict, shape: str, colour: str) -> np.ndarray:
    """bool [N]: two objects found and the left one is the concept (`shape` in `colour`, ids of the full
    vocabularies)."""
    from jaxdiff.data import shapes as S

    return (
        (verdicts["num_objects"] == 2)
        & (verdicts["shape"][:, 0] == S.ALL_SHAPES.index(shape))
        & (verdicts["colour"][:, 0] == S.ALL_COLOURS.index(colour))
    )


def right_kept(verdicts: dict, scenes) -> np.ndarray:
    """bool [N]: the right object has the anchor's (and the prompt's) shape and colour."""
    from jaxdiff.data import shapes as S

    shape = np.asarray([S.ALL_SHAPES.index(s.objects[1].shape) for s in scenes])
    colour = np.asarray([S.ALL_COLOURS.index(s.objects[1].colour) for s in scenes])
    return (verdicts["num_objects"] == 2) & (verdicts["shape"][:, 1] == shape) & (verdicts["colour"][:, 1] == colour)
