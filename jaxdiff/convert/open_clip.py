"""OpenCLIP text-tower keys (SD 2.x `cond_stage_model.model.*`, SDXL `conditioner.embedders.1.model.*`) <-> CLIP."""

from __future__ import annotations

import re

# How an LDM tensor relates to the diffusers/transformers tensor(s) it holds.
COPY = "copy"  # the same tensor
QKV = "qkv"  # OpenCLIP's fused `attn.in_proj_*`: q, k and v stacked along dim 0
TRANSPOSE = (
    "transpose"  # OpenCLIP's `text_projection` [hidden, proj] is used as x @ P; transformers' Linear is [proj, hidden]
)

_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_IN_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV_PART = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")


def ldm_key(key: str) -> tuple[str, str, int]:
    """(OpenCLIP key without its prefix, relation, part) for a transformers CLIPTextModel(WithProjection) key."""
    if key in _TOP:
        return _TOP[key], COPY, 0
    if key == "text_projection.weight":
        return "text_projection", TRANSPOSE, 0
    if m := _LAYER.match(key):
        module, leaf = m[2].rsplit(".", 1)
        base = f"transformer.resblocks.{m[1]}"
        if module in _QKV_PART:
            return f"{base}.attn.in_proj_{leaf}", QKV, _QKV_PART[module]
        if module in _IN_LAYER:
            return f"{base}.{_IN_LAYER[module]}.{leaf}", COPY, 0
    raise KeyError(f"no OpenCLIP key for text-encoder param {key}")


def num_layers(shapes, prefix: str) -> int:
    """How many residual blocks an OpenCLIP text tower under `prefix` holds."""
    found = {int(m[1]) for k in shapes if k.startswith(prefix) and (m := RESBLOCK.match(k[len(prefix) :]))}
    return max(found) + 1 if found else 0


def config(shapes, prefix: str, *, layers: int, with_projection: bool) -> dict:
    """A transformers CLIPTextConfig dict from an OpenCLIP text tower's tensor shapes.

    What the tensors cannot show is what the released SD 2.x / SDXL text encoders use: GELU, 64-dimensional heads,
    layer-norm eps 1e-5 and the legacy token ids (eos 2: pooling at the highest token id, the end-of-text token).
    """
    vocab, hidden = shapes[prefix + "token_embedding.weight"]
    positions = shapes[prefix + "positional_embedding"][0]
    intermediate = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
    projection = shapes[prefix + "text_projection"][1] if with_projection else 512
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(intermediate),
        "num_hidden_layers": int(layers),
        "num_attention_heads": max(1, int(hidden) // 64),
        "max_position_embeddings": int(positions),
        "projection_dim": int(projection),
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }
