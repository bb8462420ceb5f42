"""Prompt encoding: CLIP tokenizers from a pipeline folder (no network) and SD / SDXL text conditioning."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError


class PromptTooLongError(UserError):
    """A prompt has more tokens than the tokenizer's model_max_length."""


def load_tokenizer(folder: str | os.PathLike):
    """A CLIP tokenizer from a `tokenizer/` folder, offline."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
    """Token ids [B, model_max_length] padded as diffusers does; a prompt that would be truncated is an error."""
    max_length = tokenizer.model_max_length
    for prompt in prompts:
        n = len(tokenizer(prompt, truncation=False).input_ids)
        if n > max_length:
            raise PromptTooLongError(
                f"prompt is {n} tokens, longer than the {max_length} the tokenizer allows: {prompt[:60]!r}"
            )
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return ids.input_ids.astype(np.int32)


def sd_conditioning(text_encoder, params, ids, clip_skip: int | None = None):
    """SD 1.x/2.x: last hidden state [B, L, D] (or an earlier layer, final-layer-normed, for clip-skip)."""
    out = text_encoder.apply(params, ids)
    if not clip_skip:
        return out["last_hidden_state"]
    # diffusers: hidden_states[-(clip_skip + 1)] passed through the final LayerNorm.
    x = out["hidden_states"][-(clip_skip + 1)].astype(jnp.float32)
    norm = params["text_model"]["final_layer_norm"]
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    eps = text_encoder.config.get("layer_norm_eps", 1e-5)
    return (x - mean) / jnp.sqrt(var + eps) * norm["scale"] + norm["bias"]


def sdxl_conditioning(encoders, params, ids_list):
    """SDXL: penultimate hidden states of both encoders concatenated [B, L, D1+D2], pooled [B, P] from the second."""
    states, pooled = [], None
    for encoder, p, ids in zip(encoders, params, ids_list):
        out = encoder.apply(p, ids)
        states.append(out["hidden_states"][-2])
        pooled = out.get("text_embeds", out["pooler_output"])
    return jnp.concatenate(states, axis=-1), pooled
