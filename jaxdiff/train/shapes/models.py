"""The shapes pipeline's architectures (text encoder, VAE, UNet), scheduler and model index, as diffusers configs."""

from __future__ import annotations

MAX_TOKENS = 32
DIFFUSERS_VERSION = "0.42.0"

# SD's noise schedule; the pipeline samples with DDIM from the same betas.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "trained_betas": None,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def text_config(tokenizer, tiny: bool = False) -> dict:
    hidden = 32 if tiny else 128
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "projection_dim": hidden,
        "num_hidden_layers": 1 if tiny else 3,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float32",
    }


def vae_config(tiny: bool = False) -> dict:
    chans = [16, 16, 16] if tiny else [16, 32, 64]
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": chans,
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 8 if tiny else 16,
        "sample_size": 32,
        "scaling_factor": 1.0,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


def unet_config(cross_attention_dim: int, tiny: bool = False) -> dict:
    chans = [32, 32, 32] if tiny else [64, 64, 128]
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        # Self- and cross-attention at every resolution (8x8, 4x4, 2x2) and in the mid block: attention-map methods
        # (prompt-to-prompt, AttenCraft, ...) read the 8x8 maps, where a left and a right object are 4 columns each.
        "down_block_types": ["CrossAttnDownBlock2D"] * 3,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D"] * 3,
        "only_cross_attention": False,
        "block_out_channels": chans,
        "layers_per_block": 1,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 8 if tiny else 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 4,
        "use_linear_projection": False,
        "upcast_attention": False,
    }


def clip_head_config(hidden: int, tiny: bool = False) -> dict:
    """The image tower trained against the text encoder (jaxdiff/metrics/shapes_clip.py)."""
    from jaxdiff.metrics import shapes_clip

    channels = [8, 16, 16] if tiny else [16, 32, 64]
    return {**shapes_clip.DEFAULT_CONFIG, "channels": channels, "projection_dim": hidden, "text_hidden_size": hidden}


def probe_config(tiny: bool = False) -> dict:
    from jaxdiff.metrics import probe

    return {**probe.DEFAULT_CONFIG, "channels": [8, 16, 16] if tiny else [16, 32, 64], "features": 32 if tiny else 128}
