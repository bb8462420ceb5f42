# COMMAND: jaxdiff train --config configs/train/sd15.py --workdir runs/sd15 \
#   --config.model.pretrained=/path/to/stable-diffusion-v1-5/unet --config.data.name=my_cached_latents
# Stable Diffusion 1.5-shaped UNet fine-tuning on cached latents (64x64x4, scaled) and CLIP-L text embeddings
# (77x768), as maxdiffusion's latent caching: a TFDS dataset with features `latents` and `encoder_hidden_states`.
# FSDP over all devices, bf16 compute with float32 master weights, remat per UNet block, min-SNR-5 weighting.
"""SD 1.5 UNet2DConditionModel fine-tuning (epsilon prediction) sharded FSDP across the mesh."""

from jaxdiff.models.unet import SD15_CONFIG
from jaxdiff.train.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.total_steps = 10_000
    # diffusers' runwayml/stable-diffusion-v1-5 unet/config.json (used when model.pretrained is empty).
    c.model.unet = dict(SD15_CONFIG)
    c.model.compute_dtype = "bfloat16"
    c.objective.prediction_type = "epsilon"
    c.objective.snr_gamma = 5.0
    c.objective.input_scale = 1.0  # the cached latents are already multiplied by 0.18215
    c.data.source = "tfds"
    c.data.name = "sd15_cached_latents"  # your TFDS dataset (array_record) with latents + encoder_hidden_states
    c.data.features = ("latents", "encoder_hidden_states")
    c.data.global_batch_size = 256
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 500
    c.optimizer.weight_decay = 1e-2
    c.optimizer.clip_norm = 1.0
    c.train.ema_decay = 0.9999
    c.train.remat = "blocks"
    c.train.nonfinite = "skip"
    c.train.max_skipped_steps = 20
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3
    c.log.every_steps = 50
    if arg == "synthetic":  # the same model on synthetic 32x32 latents: check a host's compile and step time
        c.data.source = "synthetic"
        c.data.features = ()
        c.data.synthetic.update(num_records=4096, size=32, channels=4, context_length=77, context_dim=768, classes=16)
        c.data.global_batch_size = 8
    return c
