"""Training examples from the shapes world: (render, caption ids, exact condition image) as a function of the step."""

from __future__ import annotations

import numpy as np

from jaxdiff.data import shapes as S
from jaxdiff.errors import UserError
from jaxdiff.sampling import text

CONDITIONS = ("mask", "edges")
# Scene streams: training batches draw from rng([seed, TRAIN_STREAM, step]), evaluations from rng([seed,
# HELDOUT_STREAM]), so held-out scenes never come from a training step's generator.
TRAIN_STREAM, HELDOUT_STREAM = 1701, 1702


def condition_image(scene: S.Scene, kind: str, size: int, edge_width: float = 1.0) -> np.ndarray:
    """The exact condition image of a scene, uint8 [size, size, 3]: its object mask or its outlines."""
    if kind == "mask":
        return S.render_mask(scene, size)
    if kind == "edges":
        return S.render_edges(scene, size, width=edge_width)
    raise UserError(f"condition={kind!r}: choose {' or '.join(CONDITIONS)}")


def draw_scenes(rng: np.random.Generator, n: int, num_objects: int = 0) -> list[S.Scene]:
    """n scenes of the training world; `num_objects` 0: one or two per scene (as the shapes model was trained)."""
    return [S.sample_scene(rng, num_objects=num_objects or None) for _ in range(n)]


class Examples:
    """`examples(step)` -> {"image": renders uint8 [B, S, S, 3], "input_ids": train-template captions [B, L] int32,
    "cond": condition images uint8 [B, S, S, 3]}; a pure function of (seed, step), so a resumed run sees the same
    batches."""

    def __init__(
        self,
        tokenizer,
        size: int,
        batch_size: int,
        condition: str = "mask",
        *,
        seed: int = 0,
        num_objects: int = 0,
        edge_width: float = 1.0,
    ):
        if condition not in CONDITIONS:
            raise UserError(f"condition={condition!r}: choose {' or '.join(CONDITIONS)}")
        self.tokenizer, self.size, self.batch_size, self.condition = tokenizer, int(size), int(batch_size), condition
        self.seed, self.num_objects, self.edge_width = int(seed), int(num_objects), float(edge_width)
        self._ids: dict[str, np.ndarray] = {}

    def ids(self, caption: str) -> np.ndarray:
        if caption not in self._ids:
            self._ids[caption] = text.tokenize(self.tokenizer, [caption])[0]
        return self._ids[caption]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, TRAIN_STREAM, int(step)])
        scenes = draw_scenes(rng, self.batch_size, self.num_objects)
        captions = [S.caption(scene, rng, "train") for scene in scenes]
        return {
            "image": np.stack([S.render(s, self.size) for s in scenes]),
            "input_ids": np.stack([self.ids(c) for c in captions]).astype(np.int32),
            "cond": np.stack([condition_image(s, self.condition, self.size, self.edge_width) for s in scenes]),
        }
