"""ControlNetModel parity with diffusers, the UNet consuming its residuals, strict conversion both ways, config fit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import assert_parity
from safetensors.numpy import load_file

from jaxdiff.convert import checkpoint, layout
from jaxdiff.convert.table import CheckpointMismatchError
from jaxdiff.errors import UserError
from jaxdiff.models import controlnet, registry
from jaxdiff.models.model import create

WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
)
UNETS = {
    "sd1": dict(UNET),
    # SDXL-like: text_time added conditioning, linear projections, two transformer layers; its ControlNet reads BGR.
    "sdxl": dict(
        UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=10 + 6 * 4,
    ),
}
CHANNEL_ORDER = {"sd1": "rgb", "sdxl": "bgr"}
COND_CHANNELS = (8, 16)  # one stride-2 step: the conditioning image is twice the latents' size


def _randomize(module: torch.nn.Module, seed: int):
    # diffusers zero-initialises the zero convs, conv_out and proj_out; random values make the test meaningful.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module", params=sorted(UNETS))
def reference(request, tmp_path_factory):
    """(name, diffusers UNet, diffusers ControlNet made by from_unet, its from_unet state dict, folders)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    name = request.param
    torch.manual_seed(0)
    ref_unet = UNet2DConditionModel(**UNETS[name]).eval()
    _randomize(ref_unet, 0)
    ref_cn = ControlNetModel.from_unet(
        ref_unet,
        conditioning_embedding_out_channels=COND_CHANNELS,
        controlnet_conditioning_channel_order=CHANNEL_ORDER[name],
    ).eval()
    from_unet_state = {k: v.numpy().copy() for k, v in ref_cn.state_dict().items()}
    _randomize(ref_cn, 1)
    folders = {"unet": tmp_path_factory.mktemp(f"{name}_unet"), "controlnet": tmp_path_factory.mktemp(f"{name}_cn")}
    ref_unet.save_pretrained(folders["unet"], safe_serialization=True)
    ref_cn.save_pretrained(folders["controlnet"], safe_serialization=True)
    return name, ref_unet, ref_cn, from_unet_state, folders


def _load(folder):
    config = json.loads((folder / "config.json").read_text())
    model = create(registry.architecture_for(config), config, abstract=True)
    return model, layout.load_state_dict(model, load_file(folder / WEIGHTS))


def _inputs(name):
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10.0, 901.0], np.float32)
    context = rng.standard_normal((2, 5, 16)).astype(np.float32)
    cond = rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    added = None
    if name == "sdxl":
        added = {
            "text_embeds": rng.standard_normal((2, 10)).astype(np.float32),
            "time_ids": np.array([[64, 64, 0, 0, 64, 64], [32, 48, 4, 2, 64, 64]], np.float32),
        }
    return sample, t, context, cond, added


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


def _torch_added(added):
    return {} if added is None else {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}}


def _diffusers_residuals(ref_cn, name, scale, guess_mode):
    sample, t, context, cond, added = _inputs(name)
    with torch.no_grad():
        down, mid = ref_cn(
            _nchw(sample),
            torch.from_numpy(t),
            torch.from_numpy(context),
            _nchw(cond),
            conditioning_scale=scale,
            guess_mode=guess_mode,
            return_dict=False,
            **_torch_added(added),
        )
    return down, mid


def test_controlnet_residuals_match_diffusers(reference):
    name, _, ref_cn, _, folders = reference
    model, params = _load(folders["controlnet"])
    assert model.kind == "controlnet"
    sample, t, context, cond, added = _inputs(name)

    # One program for every scale and mode: conditioning_scale and guess_mode are traced.
    @jax.jit
    def run(params, scale, guess_mode):
        return model.apply(params, sample, t, context, cond, added, conditioning_scale=scale, guess_mode=guess_mode)

    for scale, guess_mode in ((0.7, False), (1.3, True)):
        down, mid = run(params, jnp.float32(scale), jnp.bool_(guess_mode))
        ref_down, ref_mid = _diffusers_residuals(ref_cn, name, scale, guess_mode)
        assert len(down) == len(ref_down) == 4
        what = f"{name} ControlNet (scale {scale}, guess_mode {guess_mode})"
        for i, (a, b) in enumerate(zip(down, ref_down)):
            assert_parity(a, _nhwc(b), rel=1e-4, what=f"{what} down residual {i}")
        assert_parity(mid, _nhwc(ref_mid), rel=1e-4, what=f"{what} mid residual")
        assert float(np.max(np.abs(np.asarray(mid)))) > 1e-3  # random weights: the residuals are not zeros


def test_unet_with_diffusers_residuals_matches_diffusers(reference):
    name, ref_unet, ref_cn, _, folders = reference
    model, params = _load(folders["unet"])
    sample, t, context, _, added = _inputs(name)
    ref_down, ref_mid = _diffusers_residuals(ref_cn, name, 0.8, False)
    down = [_nhwc(r) for r in ref_down]
    out = jax.jit(model.apply)(params, sample, t, context, added, down, _nhwc(ref_mid))
    with torch.no_grad():
        expected = ref_unet(
            _nchw(sample),
            torch.from_numpy(t),
            torch.from_numpy(context),
            down_block_additional_residuals=tuple(ref_down),
            mid_block_additional_residual=ref_mid,
            **_torch_added(added),
        ).sample
        plain = ref_unet(_nchw(sample), torch.from_numpy(t), torch.from_numpy(context), **_torch_added(added)).sample
    assert float((expected - plain).abs().max()) > 1e-2  # the residuals matter
    assert_parity(out, _nhwc(expected), rel=1e-4, what=f"{name} UNet with ControlNet residuals")
    with pytest.raises(ValueError, match="in pairs"):
        model.apply(params, sample, t, context, added, down)
    with pytest.raises(ValueError, match="has 3 entries"):
        model.apply(params, sample, t, context, added, down[:3], _nhwc(ref_mid))


def test_state_dict_round_trip_is_bitwise_and_strict(reference):
    name, _, _, _, folders = reference
    state = load_file(folders["controlnet"] / WEIGHTS)
    model, params = _load(folders["controlnet"])
    back = layout.to_state_dict(model, params)
    assert sorted(back) == sorted(state)
    for key, tensor in state.items():
        np.testing.assert_array_equal(back[key], tensor, err_msg=key)

    corrupt = dict(state)
    del corrupt["controlnet_down_blocks.2.weight"]
    corrupt["controlnet_cond_embedding.blocks.9.weight"] = np.zeros((1,), np.float32)
    corrupt["controlnet_mid_block.bias"] = np.zeros((7,), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        layout.load_state_dict(model, corrupt)
    message = str(err.value)
    for key in ("controlnet_down_blocks.2.weight", "controlnet_cond_embedding.blocks.9.weight"):
        assert key in message
    assert "controlnet_mid_block.bias (checkpoint (7,), model expects (32,))" in message


def test_convert_then_export_reproduces_the_diffusers_folder(reference, tmp_path):
    name, _, _, _, folders = reference
    src = folders["controlnet"]
    summary = checkpoint.convert(src, tmp_path / "jax")
    assert summary["components"]["."]["class"] == "ControlNetModel"
    assert checkpoint.info(tmp_path / "jax")["components"]["."]["supported"]
    checkpoint.export(tmp_path / "jax", tmp_path / "torch")
    exported, original = load_file(tmp_path / "torch" / WEIGHTS), load_file(src / WEIGHTS)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        np.testing.assert_array_equal(exported[key], tensor, err_msg=key)
    loaded = checkpoint.load_component(tmp_path / "jax")
    assert loaded.architecture.name == "ControlNetModel"


def test_from_unet_config_and_params_match_diffusers(reference):
    name, _, _, from_unet_state, folders = reference
    unet_config = json.loads((folders["unet"] / "config.json").read_text())
    cn_config = json.loads((folders["controlnet"] / "config.json").read_text())
    ours = controlnet.config_from_unet(
        unet_config, COND_CHANNELS, controlnet_conditioning_channel_order=CHANNEL_ORDER[name]
    )
    mine, theirs = controlnet.resolved_config(ours), controlnet.resolved_config(cn_config)
    assert {k: mine[k] for k in theirs} == theirs
    controlnet.check_compatible(cn_config, unet_config)

    unet_model, unet_params = _load(folders["unet"])
    cn_model, cn_params = _load(folders["controlnet"])
    merged = layout.to_state_dict(cn_model, controlnet.params_from_unet(cn_params, unet_params))
    shared = [k for k in from_unet_state if not k.startswith(("controlnet_", "time_proj"))]
    assert shared and any(k.startswith("mid_block.") for k in shared)
    for key in shared:
        np.testing.assert_array_equal(merged[key], from_unet_state[key], err_msg=key)


def test_a_controlnet_that_does_not_fit_the_unet_is_a_user_error():
    unet_config = {"_class_name": "UNet2DConditionModel", **UNETS["sd1"]}
    wider = controlnet.config_from_unet(dict(unet_config, block_out_channels=(16, 48)), COND_CHANNELS)
    with pytest.raises(UserError, match=r"block_out_channels \(ControlNet \[16, 48\], UNet \[16, 32\]\)"):
        controlnet.check_compatible(wider, unet_config)
    sdxl = controlnet.config_from_unet(UNETS["sdxl"], COND_CHANNELS)
    with pytest.raises(UserError, match="addition_embed_type"):
        controlnet.check_compatible(sdxl, unet_config)
    with pytest.raises(UserError, match="mid_block_type"):
        controlnet.check_compatible(dict(wider, mid_block_type="UNetMidBlock2D"), unet_config)


def test_conditioning_image_of_the_wrong_size_is_refused():
    config = controlnet.config_from_unet(UNETS["sd1"], COND_CHANNELS)
    model = create(registry.architecture_for(config), config, abstract=True)
    sample, t, context, cond, _ = _inputs("sd1")
    with pytest.raises(ValueError, match=r"controlnet_cond has shape \(2, 8, 8, 3\)"):
        jax.eval_shape(lambda p: model.apply(p, sample, t, context, cond[:, :8, :8]), model.params)
