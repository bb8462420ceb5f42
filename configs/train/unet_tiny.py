# COMMAND: jaxdiff train --config configs/train/unet_tiny.py --workdir runs/unet_tiny
# A tiny UNet2DConditionModel (channels 32/64, one layer per block) denoising 8x8x4 synthetic latents on CPU in
# seconds; the variant after ":" picks the parallelism, e.g. configs/train/unet_tiny.py:fsdp on 8 devices
# (XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""Tiny UNet on synthetic latents: the CPU smoke test of the trainer (and the config the train tests use)."""

from jaxdiff.train.config import default_config


def get_config(arg: str = "dp"):
    c = default_config()
    c.seed = 0
    c.total_steps = 20
    c.model.unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    c.model.attention = "einsum"  # plain attention: the smallest program, so CPU compiles stay short
    c.data.source = "synthetic"
    c.data.synthetic.update(num_records=256, size=8, channels=4, context_length=4, context_dim=32, classes=8)
    c.data.global_batch_size = 8
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 2
    c.checkpoint.every_steps = 10
    c.log.every_steps = 5
    c.mesh = {
        "dp": dict(data=-1, fsdp=1, tensor=1),
        "fsdp": dict(data=1, fsdp=-1, tensor=1),
        "single": dict(data=1, fsdp=1, tensor=1),
    }[arg]
    return c
