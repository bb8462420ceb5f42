"""CLIP image tower and CLIPModel: parity with transformers, lossless conversion, exact full-size parameter counts."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from parity import assert_parity
from safetensors.numpy import load_file, save_file

import jaxdiff
from jaxdiff.convert import checkpoint, layout
from jaxdiff.convert.table import CheckpointMismatchError
from jaxdiff.models.clip_vision import ARCHITECTURES, image_embeds, text_embeds
from jaxdiff.models.model import create

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8
)
TINY_TEXT = dict(
    vocab_size=400,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=16,
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=300,
)

# name -> (transformers class, config)
CASES = {
    "vision_projection_quick_gelu": (
        "CLIPVisionModelWithProjection",
        transformers.CLIPVisionConfig(**TINY_VISION, hidden_act="quick_gelu", projection_dim=24),
    ),
    "vision_gelu_patch4": (
        "CLIPVisionModel",
        transformers.CLIPVisionConfig(**{**TINY_VISION, "patch_size": 4, "image_size": 16}, hidden_act="gelu"),
    ),
    "clip_model": (
        "CLIPModel",
        transformers.CLIPConfig(
            text_config=dict(TINY_TEXT, hidden_act="gelu"),
            vision_config=dict(TINY_VISION, hidden_act="quick_gelu"),
            projection_dim=20,
        ),
    ),
}


def _randomized(model):
    """Every parameter random: the default init leaves biases at 0 and LayerNorm weights at 1 (and logit_scale at its
    constant), which would hide a dropped or swapped bias, norm or scale."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if name.endswith("bias") or "norm" in name or p.ndim == 0 else 0.5 * float(p.std())
            p.add_(scale * torch.randn(p.shape, generator=g))
            assert p.ndim == 0 or float(p.std()) > 0.05 * max(scale, 1e-3), name  # no parameter is left constant
    return model


def _vision_size(config):
    return (config.vision_config if hasattr(config, "vision_config") else config).image_size


def _inputs(config):
    rng = np.random.default_rng(0)
    size = _vision_size(config)
    pixels = rng.normal(size=(3, size, size, 3)).astype(np.float32)  # NHWC, already "normalised"
    ids = rng.integers(3, 299, size=(3, 16)).astype(np.int32)
    mask = np.ones((3, 16), np.int32)
    ids[0, 9], ids[0, 10:], mask[0, 10:] = 300, 1, 0
    ids[1, 15] = 300
    ids[2, 4], ids[2, 5:], mask[2, 5:] = 300, 1, 0
    return pixels, ids, mask


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    cls_name, config = CASES[request.param]
    torch.manual_seed(0)
    pt = _randomized(getattr(transformers, cls_name)(config).eval())
    folder = tmp_path_factory.mktemp(request.param)
    pt.save_pretrained(folder)
    state = load_file(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        config_dict = json.load(f)

    pixels, ids, mask = _inputs(config)
    nchw = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ref = {}
        if cls_name == "CLIPModel":
            out = pt(input_ids=torch.from_numpy(ids).long(), pixel_values=nchw, attention_mask=torch.from_numpy(mask))
            for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
                ref[key] = getattr(out, key).numpy()
            ref["image_features"] = _features(pt.get_image_features(pixel_values=nchw))
            ref["text_features"] = _features(
                pt.get_text_features(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
            )
        else:
            tower = pt.vision_model if hasattr(pt, "vision_model") else pt  # transformers 5's CLIPVisionModel is it
            vision = tower(nchw, output_hidden_states=True)
            ref["last_hidden_state"] = vision.last_hidden_state.numpy()
            ref["hidden_states"] = [h.numpy() for h in vision.hidden_states]
            ref["pooler_output"] = vision.pooler_output.numpy()
            if cls_name == "CLIPVisionModelWithProjection":
                ref["image_embeds"] = pt(nchw).image_embeds.numpy()

    model = create(ARCHITECTURES[cls_name], config_dict, abstract=True)
    params = layout.load_state_dict(model, state)
    if cls_name == "CLIPModel":
        out = jax.jit(model.apply)(params, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
        out["image_features"] = jax.jit(lambda p, x: image_embeds(model, p, x))(params, jnp.asarray(pixels))
        out["text_features"] = jax.jit(lambda p, i, m: text_embeds(model, p, i, m))(
            params, jnp.asarray(ids), jnp.asarray(mask)
        )
    else:
        out = jax.jit(model.apply)(params, jnp.asarray(pixels))
    return dict(
        name=cls_name, pt=pt, folder=folder, state=state, model=model, params=params, ref=ref, out=jax.device_get(out)
    )


def _features(out):
    # transformers 5 returns a model output from get_*_features; 4.x returned the tensor.
    return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


def test_outputs_match_transformers(case):
    ref, out = case["ref"], case["out"]
    for key, value in ref.items():
        if key == "hidden_states":
            assert len(out[key]) == len(value) == case["pt"].config.num_hidden_layers + 1
            for i, (a, b) in enumerate(zip(out[key], value)):
                assert_parity(a, b, what=f"hidden_states[{i}]")
        else:
            assert_parity(out[key], value, what=key)


def test_param_tree_mirrors_pytorch_names(case):
    keys = {e.torch_key for e in layout.conversion_table(case["model"])}
    for key in (
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.pre_layrnorm.weight",
        "vision_model.encoder.layers.1.self_attn.out_proj.bias",
        "vision_model.post_layernorm.bias",
    ):
        assert key in keys, key
    assert ("visual_projection.weight" in keys) == (case["name"] != "CLIPVisionModel")
    assert ("logit_scale" in keys) == ("text_model.final_layer_norm.weight" in keys) == (case["name"] == "CLIPModel")
    assert "vision_model.embeddings.patch_embedding.bias" not in keys  # the patch convolution has no bias


def test_state_dict_round_trip_is_bitwise(case):
    exported = layout.to_state_dict(case["model"], case["params"])
    # transformers 5 saves CLIPVisionModel without the `vision_model.` prefix; jaxdiff exports the Hub spelling.
    original = {
        k
        if k.startswith(("vision_model.", "visual_projection.", "text_")) or k == "logit_scale"
        else "vision_model." + k: v
        for k, v in case["state"].items()
    }
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert np.array_equal(exported[key], value), key


def test_export_loads_in_transformers(case, tmp_path):
    save_file(layout.to_state_dict(case["model"], case["params"]), os.path.join(tmp_path, "model.safetensors"))
    case["pt"].config.save_pretrained(tmp_path)
    reloaded = getattr(transformers, case["name"]).from_pretrained(tmp_path).eval()
    for name, tensor in case["pt"].state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_load_model_converts_the_folder_and_refuses_a_missing_key(case, tmp_path):
    model = jaxdiff.load_model(case["folder"])
    assert model.architecture.name == case["name"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(case["params"]):
        assert np.array_equal(np.asarray(_at(model.params, path)), np.asarray(leaf)), jax.tree_util.keystr(path)
    state = dict(case["state"])
    key = next(k for k in state if k.endswith("post_layernorm.weight"))
    del state[key]
    state[key.replace("post_layernorm.weight", "embeddings.position_ids")] = np.arange(4)[None]  # ignored (legacy)
    save_file(state, os.path.join(tmp_path, "model.safetensors"))
    case["pt"].config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="missing keys \\(1\\): .*post_layernorm.weight"):
        jaxdiff.load_model(tmp_path)


def test_jaxdiff_convert_then_export_gives_back_the_transformers_tensors(case, tmp_path):
    checkpoint.convert(case["folder"], tmp_path / "jaxdiff")
    assert jaxdiff.load_model(tmp_path / "jaxdiff").architecture.name == case["name"]
    checkpoint.export(tmp_path / "jaxdiff", tmp_path / "exported")
    exported = load_file(os.path.join(tmp_path, "exported", "model.safetensors"))
    for key, value in case["state"].items():
        key = key if key in exported else "vision_model." + key  # transformers 5's unprefixed CLIPVisionModel
        assert exported[key].shape == value.shape and np.array_equal(exported[key], value), key


def _at(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


def test_bfloat16_compute_stays_close(case):
    if case["name"] == "CLIPModel":
        pytest.skip("the towers are the ones checked here; CLIPModel only adds projections")
    model = create(ARCHITECTURES[case["name"]], case["model"].config, abstract=True, dtype=jnp.bfloat16)
    pixels, _, _ = _inputs(case["pt"].config)
    out = jax.jit(model.apply)(case["params"], jnp.asarray(pixels))
    assert out["last_hidden_state"].dtype == jnp.bfloat16
    for key in ("last_hidden_state", "pooler_output", "image_embeds"):
        if key in case["ref"]:
            assert_parity(out[key].astype(np.float32), case["ref"][key], rel=5e-2, what=key)


def test_other_image_sizes_are_refused():
    model = create(ARCHITECTURES["CLIPVisionModel"], CASES["vision_gelu_patch4"][1].to_dict(), abstract=True)
    with pytest.raises(ValueError, match="must be 16x16, got 20x20"):
        jax.eval_shape(model.apply, model.params, jnp.zeros((1, 20, 20, 3)))


# Full-size towers: (transformers CLIPVisionConfig kwargs, parameter count of CLIPVisionModelWithProjection).
# Shapes from the Hub configs: openai/clip-vit-base-patch32, openai/clip-vit-large-patch14(-336) (vision_config);
# laion/CLIP-ViT-g-14-laion2B-s12B-b42K and laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (OpenCLIP widths 1408/1664,
# 40/48 layers, head width 88/104 -> 16 heads, MLP 6144/8192, embed_dim 1024/1280, GELU).
FULL_SIZE = {
    "ViT-B/32": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      patch_size=32, image_size=224, projection_dim=512), 87_849_216),
    "ViT-L/14": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=14, image_size=224, projection_dim=768), 303_966_208),
    "ViT-L/14@336": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          patch_size=14, image_size=336, projection_dim=768), 304_293_888),
    "ViT-g/14": (dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=40, num_attention_heads=16,
                      patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu"), 1_012_645_632),
    "ViT-bigG/14": (dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                         patch_size=14, image_size=224, projection_dim=1280, hidden_act="gelu"), 1_844_907_264),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameter_counts(name):
    kwargs, expected = FULL_SIZE[name]
    config = transformers.CLIPVisionConfig(**kwargs)
    with torch.device("meta"):  # shapes only: nothing allocated
        reference = sum(p.numel() for p in transformers.CLIPVisionModelWithProjection(config).parameters())
    jax_model = create(ARCHITECTURES["CLIPVisionModelWithProjection"], config.to_dict(), abstract=True)
    assert jax_model.num_params() == reference == expected
