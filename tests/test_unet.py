"""UNet2DConditionModel parity with diffusers (SD1-, SD2-, SDXL-like tiny configs) and full-size parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import assert_parity

from jaxdiff.convert import layout
from jaxdiff.models.model import create
from jaxdiff.models.unet import ARCHITECTURES

UNET = ARCHITECTURES["UNet2DConditionModel"]

TINY = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=24,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
)
TINY_CONFIGS = {
    "sd1": dict(TINY),
    "sd2": dict(TINY, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(
        TINY,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 2, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=20 + 6 * 8,
    ),
}


def _randomize(module: torch.nn.Module, seed: int):
    # diffusers zero-initialises some layers (conv_out, proj_out); random values make the test meaningful.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def reference(request, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**TINY_CONFIGS[request.param]).eval()
    _randomize(ref, 0)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder, safe_serialization=True)
    return request.param, ref, folder


def _inputs(name):
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([10.0, 901.0], np.float32)
    context = rng.standard_normal((2, 7, 24)).astype(np.float32)
    added = None
    if name == "sdxl":
        added = {
            "text_embeds": rng.standard_normal((2, 20)).astype(np.float32),
            "time_ids": np.array([[64, 64, 0, 0, 64, 64], [32, 48, 4, 2, 64, 64]], np.float32),
        }
    return sample, t, context, added


def test_unet_matches_diffusers(reference):
    import json

    from safetensors.numpy import load_file

    name, ref, folder = reference
    config = json.loads((folder / "config.json").read_text())
    model = create(UNET, config, abstract=True)
    params = layout.load_state_dict(model, load_file(folder / "diffusion_pytorch_model.safetensors"))
    sample, t, context, added = _inputs(name)
    out = jax.jit(model.apply)(params, sample, t, context, added)
    with torch.no_grad():
        kwargs = {}
        if added is not None:
            kwargs["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
        expected = ref(
            torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(context), **kwargs
        ).sample.permute(0, 2, 3, 1)
    assert_parity(out, expected.numpy(), rel=1e-4, what=f"{name} UNet output")


def test_unet_state_dict_round_trip_is_bitwise(reference):
    from safetensors.numpy import load_file

    _, _, folder = reference
    import json

    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    model = create(UNET, json.loads((folder / "config.json").read_text()), abstract=True)
    back = layout.to_state_dict(model, layout.load_state_dict(model, state))
    assert sorted(back) == sorted(state)
    for key, tensor in state.items():
        np.testing.assert_array_equal(back[key], tensor, err_msg=key)


def test_unet_bfloat16_compute_stays_close(reference):
    import json

    from safetensors.numpy import load_file

    name, _, folder = reference
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    f32 = create(UNET, config, abstract=True)
    bf16 = create(UNET, config, abstract=True, dtype=jnp.bfloat16)
    params = layout.load_state_dict(f32, state)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    args = _inputs(name)
    a = np.asarray(jax.jit(f32.apply)(params, *args))
    b = np.asarray(jax.jit(bf16.apply)(params, *args)).astype(np.float32)
    # bf16 has an 8-bit mantissa: a few percent of the output scale after a dozen layers.
    assert np.max(np.abs(a - b)) <= 0.1 * max(1.0, np.max(np.abs(a)))


FULL_SIZE = {
    "sd15": (dict(cross_attention_dim=768), 859_520_964),
    "sd21": (
        dict(
            attention_head_dim=[5, 10, 20, 20],
            cross_attention_dim=1024,
            use_linear_projection=True,
            upcast_attention=True,
        ),
        865_910_724,
    ),
    "sdxl": (
        dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            attention_head_dim=[5, 10, 20],
            block_out_channels=[320, 640, 1280],
            cross_attention_dim=2048,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            projection_class_embeddings_input_dim=2816,
            transformer_layers_per_block=[1, 2, 10],
            use_linear_projection=True,
        ),
        2_567_463_684,
    ),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameter_count_without_allocating(name):
    config, count = FULL_SIZE[name]
    model = create(UNET, config, abstract=True)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(model.params))
    assert model.num_params() == count


def test_unsupported_unet_config_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="class_embed_type"):
        create(UNET, dict(TINY, class_embed_type="timestep"), abstract=True)
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        create(UNET, dict(TINY, down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), abstract=True)


def test_unet_with_time_cond_proj_dim_matches_diffusers(tmp_path):
    """diffusers' `time_cond_proj_dim` (LCM's guidance-scale embedding): time_embedding.cond_proj (no bias) adds
    cond_proj(timestep_cond) before linear_1; timestep_cond=None skips it (both as in diffusers); the key round-trips
    (time_embedding.cond_proj.weight)."""
    import json

    from diffusers import UNet2DConditionModel
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**TINY_CONFIGS["sd1"], time_cond_proj_dim=16).eval()
    _randomize(ref, 3)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["time_cond_proj_dim"] == 16
    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert state["time_embedding.cond_proj.weight"].shape == (32, 16)  # [in_channels = block_out_channels[0], dim]
    model = create(UNET, config, abstract=True)
    params = layout.load_state_dict(model, state)
    assert params["time_embedding"]["cond_proj"]["kernel"].shape == (16, 32)
    back = layout.to_state_dict(model, params)
    assert sorted(back) == sorted(state)
    np.testing.assert_array_equal(back["time_embedding.cond_proj.weight"], state["time_embedding.cond_proj.weight"])

    sample, t, context, _ = _inputs("sd1")
    cond = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)
    apply = jax.jit(model.apply)
    out = apply(params, sample, t, context, timestep_cond=cond)
    out_added = apply(params, sample, t, context, {"timestep_cond": cond})  # how the sampling loop passes it
    plain = apply(params, sample, t, context)
    with torch.no_grad():
        args = (torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(context))
        expected = ref(*args, timestep_cond=torch.from_numpy(cond)).sample.permute(0, 2, 3, 1).numpy()
        expected_plain = ref(*args).sample.permute(0, 2, 3, 1).numpy()
    assert_parity(out, expected, rel=1e-4, what="time_cond_proj_dim UNet output")
    assert_parity(plain, expected_plain, rel=1e-4, what="time_cond_proj_dim UNet output without timestep_cond")
    np.testing.assert_array_equal(np.asarray(out_added), np.asarray(out))
    assert np.max(np.abs(expected - expected_plain)) > 1e-2  # the condition matters

    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        plain_model = create(UNET, TINY_CONFIGS["sd1"], abstract=True)
        plain_model.apply(plain_model.params, sample, t, context, timestep_cond=cond)
    with pytest.raises(ValueError, match="time_cond_proj_dim is 16"):
        apply(params, sample, t, context, timestep_cond=cond[:, :8])


def test_unet_without_time_cond_proj_dim_has_no_cond_proj():
    model = create(UNET, TINY_CONFIGS["sd1"], abstract=True)
    assert "cond_proj" not in model.params["time_embedding"]
    with_it = create(UNET, dict(TINY_CONFIGS["sd1"], time_cond_proj_dim=256), abstract=True)
    assert with_it.num_params() == model.num_params() + 256 * 32
