"""Attention and convolution formulations follow the platform a model is compiled for, not the host's backend."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxdiff import platforms
from jaxdiff.models import attention, layers, unet
from jaxdiff.models.model import create

ROOT = Path(__file__).resolve().parent.parent
UNET = unet.ARCHITECTURES["UNet2DConditionModel"]
HEAD_DIM = 8  # unet_tiny: 32 channels, 4 heads
SIZE = 32  # latents: 1024 tokens at the first level (chunked on CPU), 16x16 = 256 pixels at the second (im2col)


def _tiny_config():
    spec = importlib.util.spec_from_file_location("unet_tiny", ROOT / "configs" / "train" / "unet_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"_class_name": "UNet2DConditionModel", **module.get_config().model.unet.to_dict()}


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' params (pjit, custom_vjp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns"):
                    yield from _equations(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _equations(sub.jaxpr)


def _traced(model):
    """Summary of the UNet's forward jaxpr: native convolutions, im2col concatenations, attention logits shapes."""
    args = (
        jax.ShapeDtypeStruct((1, SIZE, SIZE, 4), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 4, 32), jnp.float32),
    )
    jaxpr = jax.make_jaxpr(model.apply)(model.params, *args).jaxpr
    eqns = list(_equations(jaxpr))
    convs = sum(e.primitive.name == "conv_general_dilated" for e in eqns)
    # im2col concatenates the 9 shifted views of a 3x3 convolution's input along channels.
    im2col = sum(e.primitive.name == "concatenate" and len(e.invars) == 9 for e in eqns)
    # Self-attention logits over the 1024 tokens of the first level (contracting the head dim, 8): their largest
    # non-key dimension is the query block, 128 when chunked, 1024 when whole.
    splash_calls = sum(e.primitive.name == "pallas_call" for e in eqns)
    logits = sorted(
        {
            max(e.outvars[0].aval.shape[1:-1])
            for e in eqns
            if e.primitive.name == "dot_general"
            and e.outvars[0].aval.shape[-1] == SIZE * SIZE
            and e.invars[0].aval.shape[e.params["dimension_numbers"][0][0][0]] == HEAD_DIM
        }
    )
    return convs, im2col, logits, splash_calls, str(jaxpr)


def _conv3x3_count(params):
    return sum(leaf.ndim == 4 and leaf.shape[0] == 3 for leaf in jax.tree_util.tree_leaves(params))


def test_platform_names_resolve_and_come_from_the_devices():
    assert platforms.resolve(None) == jax.default_backend()
    assert platforms.resolve("CUDA") == "gpu" and platforms.resolve("tpu") == "tpu"
    mesh = jax.sharding.Mesh(jax.devices()[:2], ("fsdp",))
    assert platforms.of(mesh) == platforms.of(jax.devices()) == platforms.of(jnp.zeros(2)) == "cpu"
    assert platforms.of(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())) == "cpu"


def test_auto_attention_follows_the_platform():
    q = jnp.zeros((1, 1024, 8, 64), jnp.bfloat16)
    assert attention.auto_implementation(q, platform="cpu") == "chunked"
    assert attention.auto_implementation(q, platform="tpu") == "splash"  # 1024 queries: the Pallas kernel
    assert attention.auto_implementation(q[:, :77], platform="tpu") == "xla"  # not a multiple of its 128-row block
    assert attention.auto_implementation(q, platform="gpu") == "cudnn"
    assert attention.auto_implementation(q.astype(jnp.float32), platform="gpu") == "xla"
    assert layers.use_im2col(256, "cpu") and not layers.use_im2col(257, "cpu")
    assert not layers.use_im2col(64, "tpu") and not layers.use_im2col(64, "gpu")


def test_unet_for_tpu_traces_splash_attention_and_native_convolutions():
    config = _tiny_config()
    tpu = create(UNET, config, abstract=True, platform="tpu")
    assert tpu.platform == "tpu"
    convs, im2col, logits, splash_calls, _ = _traced(tpu)
    assert convs == _conv3x3_count(tpu.params), "every 3x3 convolution is a native convolution on TPU"
    assert im2col == 0
    # The 1024- and 256-token levels' self- and cross-attention run the Pallas kernel: no logits materialised.
    assert logits == [] and splash_calls > 0, (logits, splash_calls)
    convs, im2col, logits, splash_calls, _ = _traced(
        create(UNET, config, abstract=True, platform="tpu", attention="xla")
    )
    assert logits == [SIZE * SIZE] and splash_calls == 0, f"unchunked XLA attention, got query blocks {logits}"

    cpu = create(UNET, config, abstract=True, platform="cpu")
    convs, im2col, logits, splash_calls, cpu_text = _traced(cpu)
    assert im2col > 0 and convs < _conv3x3_count(cpu.params), "small convolutions are im2col on CPU"
    assert logits == [attention.CPU_QUERY_CHUNK], f"128-query chunks on CPU, got {logits}"
    # On this CPU host the default is the CPU program, unchanged; for_platform rebuilds the same model.
    assert splash_calls == 0
    assert _traced(create(UNET, config, abstract=True))[4] == cpu_text
    assert _traced(tpu.for_platform("cpu"))[4] == cpu_text


def test_the_trainer_builds_for_its_mesh_not_for_the_host(monkeypatch):
    from jaxdiff.train import loop

    spec = importlib.util.spec_from_file_location("unet_tiny", ROOT / "configs" / "train" / "unet_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # A host whose default backend is a TPU, training on a mesh of CPU devices: the mesh decides.
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert create(UNET, _tiny_config(), abstract=True).platform == "tpu"  # nothing else says: the host's
    s = loop.setup(module.get_config("single"), devices=jax.devices()[:1])
    assert s.model.platform == "cpu"


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_vae_and_clip_carry_the_platform(platform):
    from jaxdiff.models import clip, vae

    v = create(
        vae.ARCHITECTURES["AutoencoderKL"],
        {"block_out_channels": (8,), "norm_num_groups": 4},
        abstract=True,
        platform=platform,
    )
    c = create(
        clip.ARCHITECTURES["CLIPTextModel"],
        dict(
            vocab_size=10,
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=4,
        ),
        abstract=True,
        platform=platform,
    )
    assert v.platform == c.platform == platform
    assert v.module.platform == c.module.platform == platform
