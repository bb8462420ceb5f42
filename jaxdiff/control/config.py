"""The fields of a configs/controlnet/<name>.py (ml_collections): model, condition, ControlNet, data, runner block."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """A ControlNet for the shapes world, conditioned on the renderer's exact object masks.

    condition: "mask" (white silhouettes on black) or "edges" (white outlines `edge_width` pixels wide);
    controlnet.conditioning_embedding_out_channels: its length sets how much larger than the latents the condition
    image is (2 ** (length - 1)): the VAE's factor (4 for shapes: 32 px images, 8x8 latents; 8 for SD).
    """
    c = ml_collections.ConfigDict()
    c.model = "shapes"  # "shapes" or a diffusers / jaxdiff SD 1.x/2.x pipeline folder (frozen)
    c.condition = "mask"  # mask | edges
    c.edge_width = 1.0  # pixels, condition="edges"
    c.controlnet = ml_collections.ConfigDict(dict(conditioning_embedding_out_channels=(16, 32, 64)))
    c.caption_dropout = 0.1  # probability of training a row on the empty prompt (diffusers' --proportion_empty_prompts)
    c.snr_gamma = 0.0  # > 0: min-SNR-gamma weights
    c.data = ml_collections.ConfigDict(dict(seed=0, num_objects=0))  # num_objects 0: one or two per scene
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.train = train_block(steps=5000, learning_rate=2e-4, batch_size=32)
    return c


def train_block(
    steps: int, learning_rate: float, batch_size: int, optimizer: str = "adamw", weight_decay: float = 1e-2
) -> ml_collections.ConfigDict:
    """The runner block (diffusers' train_controlnet.py: AdamW, weight decay 1e-2, gradients clipped to norm 1)."""
    from jaxdiff.train.config import finetune_block

    return finetune_block(
        steps, learning_rate, batch_size, optimizer=optimizer, weight_decay=weight_decay, max_grad_norm=1.0,
        warmup_steps=100, log_every=25, checkpoint_every=500,
    )  # fmt: skip
