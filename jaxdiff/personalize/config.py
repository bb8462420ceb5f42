"""The fields every configs/personalize/<method>.py shares (ml_collections)."""

from __future__ import annotations

import ml_collections


def base_config(method: str) -> ml_collections.ConfigDict:
    """token / images (set by --token / --images), the model, captions, sampling of the result, the runner block.

    captions: "auto" (each image's IMAGE.txt when the images have them, else `templates`), "files" or "templates";
    templates: caption templates with one {} for the token (the official TI script's are "a photo of a {}", ...).
    """
    c = ml_collections.ConfigDict()
    c.method = method
    c.model = "shapes"  # "shapes" or a diffusers / jaxdiff pipeline folder
    c.token = "<v>"
    c.images = ""
    c.captions = "auto"
    c.templates = ("a {}", "a picture of a {}", "an image of a {}")
    c.flip = 0.0  # probability of a horizontal flip of an instance latent
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.sample = ml_collections.ConfigDict(
        dict(prompts=("a {}", "a red {}", "a blue {} on the left"), num_images=6, guidance=-1.0, seed=4321)
    )
    c.train = train_block(steps=1000, learning_rate=5e-4, batch_size=4)
    return c


def train_block(
    steps: int, learning_rate: float, batch_size: int, optimizer: str = "adamw", weight_decay: float = 1e-2
) -> ml_collections.ConfigDict:
    """The runner block of a personalization job (logs every 10 steps, a checkpoint every 100)."""
    from jaxdiff.train.config import finetune_block

    return finetune_block(
        steps, learning_rate, batch_size, optimizer=optimizer, weight_decay=weight_decay, checkpoint_every=100
    )
