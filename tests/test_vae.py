"""AutoencoderKL: parity with a tiny random diffusers VAE, both attention key spellings, round trip, SD param count."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from parity import assert_parity
from safetensors.numpy import load_file

from jaxdiff.convert import layout
from jaxdiff.convert.table import CheckpointMismatchError
from jaxdiff.models.model import create
from jaxdiff.models.vae import ARCHITECTURES

ARCH = ARCHITECTURES["AutoencoderKL"]

TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)

SD_VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, saved config.json dict, safetensors state) for a tiny random VAE."""
    torch.manual_seed(0)
    vae = TorchAutoencoderKL(**TINY).eval()
    with torch.no_grad():
        # Default init leaves norms at scale 1 / bias 0, which would hide a swapped or dropped norm param.
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path, safe_serialization=True)
    config = json.loads((path / "config.json").read_text())
    state = load_file(str(path / layout.LAYOUTS[ARCH.name].weights_name))
    return vae, config, state


@pytest.fixture(scope="module")
def loaded(tiny):
    _, config, state = tiny
    model = create(ARCH, config, abstract=True)
    return model, layout.load_state_dict(model, state)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_encode_decode_parity(tiny, loaded):
    vae, _, _ = tiny
    model, params = loaded
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = np.random.default_rng(1).normal(size=(2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(_nchw(x)).latent_dist
        ref_image = vae.decode(_nchw(z)).sample
    mean, logvar = jax.jit(model.encode)(params, x)
    image = jax.jit(model.decode)(params, z)
    assert_parity(mean, _nhwc(posterior.mean), what="encode mean")
    assert_parity(logvar, _nhwc(posterior.logvar), what="encode logvar")
    assert_parity(image, _nhwc(ref_image), what="decode")
    # __call__ (used for init) is decode(mean).
    assert_parity(jax.jit(model.apply)(params, x), _nhwc(vae.decode(posterior.mean).sample.detach()), what="__call__")


def test_logvar_is_clipped(loaded):
    model, params = loaded
    # Blow up the quant_conv bias of the logvar half so the raw logvar leaves [-30, 20] on both sides.
    bias = np.zeros(8, np.float32)
    bias[4:6], bias[6:] = 1e3, -1e3
    params = jax.tree_util.tree_map(lambda a: a, params)
    params["quant_conv"] = dict(params["quant_conv"], bias=jnp.asarray(bias))
    _, logvar = jax.jit(model.encode)(params, np.zeros((2, 16, 16, 3), np.float32))
    assert float(logvar[..., :2].min()) == 20.0 and float(logvar[..., 2:].max()) == -30.0


@pytest.mark.parametrize("conv_shaped", [False, True], ids=["linear", "conv1x1"])
def test_old_attention_spelling_loads(tiny, loaded, conv_shaped):
    _, _, state = tiny
    model, params = loaded
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, tensor in state.items():
        for new, legacy in renames.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{legacy}.")
                if conv_shaped and tensor.ndim == 2:  # original LDM checkpoints store 1x1 convs
                    tensor = tensor[:, :, None, None]
        old[key] = tensor
    assert any(k.endswith("mid_block.attentions.0.proj_attn.weight") for k in old)
    legacy_params = layout.load_state_dict(model, old)
    jax.tree_util.tree_map(np.testing.assert_array_equal, legacy_params, params)


def test_state_dict_round_trip_is_bitwise(tiny, loaded):
    _, _, state = tiny
    model, params = loaded
    exported = layout.to_state_dict(model, params)
    assert set(exported) == set(state)
    for key, tensor in state.items():
        assert exported[key].dtype == np.float32 and exported[key].shape == tensor.shape, key
        assert exported[key].tobytes() == tensor.tobytes(), key


def test_param_tree_mirrors_diffusers(loaded):
    _, params = loaded
    enc, dec = params["encoder"], params["decoder"]
    assert set(enc["down_blocks_0"]) == {"resnets_0", "downsamplers_0"}
    assert set(enc["down_blocks_1"]) == {"resnets_0"}
    assert set(enc["mid_block"]["attentions_0"]) == {"group_norm", "to_q", "to_k", "to_v", "to_out_0"}
    assert set(dec["up_blocks_0"]) == {"resnets_0", "resnets_1", "upsamplers_0"}
    assert params["quant_conv"]["kernel"].shape == (1, 1, 8, 8)
    assert params["post_quant_conv"]["kernel"].shape == (1, 1, 4, 4)


def test_missing_key_is_reported(tiny, loaded):
    _, _, state = tiny
    model, _ = loaded
    broken = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(CheckpointMismatchError, match="decoder.conv_out.bias"):
        layout.load_state_dict(model, broken)


def test_optional_convs_and_attention_follow_config():
    options = dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    torch_keys = set(TorchAutoencoderKL(**TINY, **options).state_dict())
    model = create(ARCH, dict(TINY, **options), abstract=True)
    assert {e.torch_key for e in layout.conversion_table(model)} == torch_keys
    assert "quant_conv" not in model.params and "attentions_0" not in model.params["encoder"]["mid_block"]


def test_bfloat16_decode_close(tiny, loaded):
    vae, config, state = tiny
    _, params = loaded
    model = create(ARCH, config, abstract=True, dtype=jnp.bfloat16)
    z = np.random.default_rng(2).normal(size=(1, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        ref = _nhwc(vae.decode(_nchw(z)).sample)
    image = jax.jit(model.decode)(params, z)
    assert image.dtype == jnp.float32
    assert_parity(image, ref, rel=5e-2, what="bf16 decode")


def test_sd_vae_param_count():
    assert create(ARCH, SD_VAE, abstract=True).num_params() == 83_653_863


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]), "down_block_types"),
        (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types"),
        (dict(act_fn="gelu"), "act_fn"),
        (dict(norm_num_groups=24), "norm_num_groups"),
    ],
)
def test_unsupported_config_raises(change, message):
    with pytest.raises(ValueError, match=message):
        ARCH.build(dict(TINY, **change), dtype=jnp.float32, attention="auto")
