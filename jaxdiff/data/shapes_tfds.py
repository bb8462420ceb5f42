"""TFDS builder for the `shapes` world (array_record, no TensorFlow needed) and `load_shapes()`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxdiff.data import shapes

_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Image side and split sizes; scenes depend only on (split, index), not on the image size."""

    size: int = 32
    num_train: int = 50_000
    num_validation: int = 2_000
    num_test: int = 2_000
    p_single: float = 0.6  # fraction of one-object scenes


def scene_and_captions(split: str, index: int, p_single: float = 0.6) -> tuple[shapes.Scene, str, str]:
    """The scene and the (train, held-out) captions of example `index` of `split`, without rendering it."""
    rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
    scene = shapes.sample_scene(rng, num_objects=1 if rng.random() < p_single else 2)
    return scene, shapes.caption(scene, rng, "train"), shapes.caption(scene, rng, "heldout")


def make_example(split: str, index: int, size: int, p_single: float = 0.6) -> dict[str, Any]:
    """The deterministic example `index` of `split`: image, train and held-out captions, labels."""
    scene, caption, heldout = scene_and_captions(split, index, p_single)
    return {
        "image": shapes.render(scene, size),
        "caption": caption,
        "heldout_caption": heldout,
        **shapes.scene_labels(scene),
    }


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Procedural images of one or two coloured shapes on a plain background, with captions."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="32x32", version="1.0.0", size=32, description="32x32 images."),
        ShapesConfig(name="64x64", version="1.0.0", size=64, description="64x64 images."),
    ]
    DEFAULT_CONFIG_NAME = "32x32"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 resolves this through `importlib_resources`, which it no longer declares as a
        # dependency on Python >= 3.9; the file path is all it needs (for a checksums file we lack).
        return epath.Path(__file__)

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.size
        obj = lambda: tfds.features.Tensor(shape=(shapes.MAX_OBJECTS,), dtype=np.int32)  # noqa: E731
        return self.dataset_info_from_configs(
            description=(
                "The jaxdiff shapes world. Per-object labels (shape, colour, size, position) are class ids "
                f"into jaxdiff.data.shapes.{{SHAPES,COLOURS,SIZES,POSITIONS}}, padded to {shapes.MAX_OBJECTS} with -1."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
                    "caption": tfds.features.Text(),
                    "heldout_caption": tfds.features.Text(),
                    "num_objects": tfds.features.Tensor(shape=(), dtype=np.int32),
                    "background": tfds.features.Tensor(shape=(), dtype=np.int32),
                    "shape": obj(),
                    "colour": obj(),
                    "size": obj(),
                    "position": obj(),
                }
            ),
            supervised_keys=("image", "caption"),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # everything is generated
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict[str, Any]]]:
        # One process is enough: rendering is ~0.25 ms/example, TFDS's writer and shuffler dominate.
        c = self.builder_config
        for i in range(num):
            yield i, make_example(split, i, c.size, c.p_single)


def default_data_dir() -> str:
    """`$JAXDIFF_DATA_DIR`, else `~/.cache/jaxdiff/tensorflow_datasets`."""
    return os.environ.get("JAXDIFF_DATA_DIR") or os.path.expanduser("~/.cache/jaxdiff/tensorflow_datasets")


def shapes_builder(data_dir: str | None = None, size: int = 32, config: ShapesConfig | None = None) -> Shapes:
    """The builder for `size`x`size` images (or a custom config), prepared on first use."""
    if config is None:
        if size not in (32, 64):
            raise ValueError(f"shapes images are 32 or 64 pixels square, got size={size}")
        config = f"{size}x{size}"
    builder = Shapes(data_dir=os.path.expanduser(data_dir or default_data_dir()), config=config)
    builder.download_and_prepare()
    return builder


def load_shapes(
    split: str = "train", data_dir: str | None = None, size: int = 32, config: ShapesConfig | None = None
) -> Sequence[dict[str, Any]]:
    """Random-access source of `split` ("train", "validation", "test"); builds the data set on first use.

    Items are dicts of numpy arrays (image uint8 [H, W, 3], labels int32 [2]), Python ints for the scalar
    labels and `bytes` for the captions.
    """
    return shapes_builder(data_dir, size, config).as_data_source()[split]
