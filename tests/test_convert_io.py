"""Safe checkpoint I/O: safetensors without torch, weights_only pickles, folder formats, lossless convert/export."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.numpy import load_file, save_file

import jaxdiff
from jaxdiff.convert import checkpoint
from jaxdiff.convert.safetensors_io import CorruptCheckpointError, load_safetensors, write_safetensors
from jaxdiff.convert.table import CheckpointMismatchError
from jaxdiff.convert.torch_io import UnsafeCheckpointError, load_torch_state_dict

UNET = dict(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
)
VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[16, 32],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
CLIP = dict(
    vocab_size=60,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def _randomized(module, seed=0):
    # diffusers zero-initialises some layers; random values make equality checks meaningful.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def tiny_unet():
    return _randomized(UNet2DConditionModel(**UNET), 0)


def tiny_pipeline(folder):
    """Save a tiny random StableDiffusionPipeline (with a word-level CLIP tokenizer) into `folder`."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in "a b c d e f g h i j k l m n o p q r s t u v w x y z".split():
        vocab[w + "</w>"] = len(vocab)
    tok_src = folder.parent / (folder.name + "_vocab")
    tok_src.mkdir()
    (tok_src / "vocab.json").write_text(json.dumps(vocab))
    (tok_src / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(tok_src / "vocab.json"), str(tok_src / "merges.txt"), model_max_length=16
    )
    text_encoder = _randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 2)
    pipe = StableDiffusionPipeline(
        vae=_randomized(AutoencoderKL(**VAE), 1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(),
        scheduler=DDIMScheduler(clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def converted(pipeline_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("jx") / "ckpt"
    checkpoint.convert(pipeline_dir, dst)
    return dst


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
    dst = tmp_path_factory.mktemp("ex") / "diffusers"
    checkpoint.export(converted, dst)
    return dst


def _canonical(state: dict) -> dict:
    # transformers 5 saves CLIPTextModel keys without `text_model.`; export writes the prefixed spelling,
    # which every transformers version loads.
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _assert_bitwise_equal(a: dict, b: dict):
    a, b = _canonical(a), _canonical(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


# ---------------------------------------------------------------- safetensors


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.bool_])
def test_safetensors_reader_equals_reference_reader(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 5)), "b": rng.standard_normal(7), "c": rng.standard_normal((2, 0))}
    tensors = {k: (v > 0 if dtype is np.bool_ else v * 100).astype(dtype) for k, v in tensors.items()}
    if dtype is ml_dtypes.bfloat16:
        write_safetensors(tmp_path / "x.safetensors", tensors)  # the reference numpy writer has no bf16
    else:
        save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    _assert_bitwise_equal(load_safetensors(tmp_path / "x.safetensors"), load_file(str(tmp_path / "x.safetensors")))


def test_safetensors_writer_is_read_by_reference_reader(tmp_path):
    tensors = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f16": np.ones(3, np.float16),
        "i32": np.arange(5, dtype=np.int32),
        "u8": np.arange(3, dtype=np.uint8),
        "f64": np.zeros((), np.float64),
    }
    write_safetensors(tmp_path / "w.safetensors", tensors, metadata={"format": "pt"})
    _assert_bitwise_equal(load_file(str(tmp_path / "w.safetensors")), tensors)
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # no temporary file left behind


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[: len(b) // 2], "past the end"),
        (lambda b: b[:5], "shorter than"),
        (lambda b: b[:8] + b"{not json" + b[17:], "not valid JSON"),
        (lambda b: b + b"\0" * 8, "cover"),
    ],
    ids=["half", "stub", "json", "trailing"],
)
def test_damaged_safetensors_raise_corrupt_checkpoint_error(tmp_path, damage, reason):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.ones((64, 64), np.float32), "b": np.ones(3, np.float32)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptCheckpointError, match=reason) as e:
        load_safetensors(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- PyTorch pickles


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_loads_through_weights_only_and_upcasts(tmp_path):
    state = {
        "w": torch.randn(3, 4, dtype=torch.bfloat16),
        "h": torch.randn(2, dtype=torch.float16),
        "i": torch.arange(3),
    }
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "m.ckpt")
    loaded = load_torch_state_dict(tmp_path / "m.ckpt")
    assert sorted(loaded) == ["h", "i", "w"]
    for k, v in state.items():
        expected = v.float() if v.is_floating_point() else v
        np.testing.assert_array_equal(loaded[k], expected.numpy())
    assert loaded["w"].dtype == np.float32 and loaded["i"].dtype == np.int64
    assert load_torch_state_dict(tmp_path / "m.ckpt", upcast=False)["w"].dtype == ml_dtypes.bfloat16


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "unet"
    tiny_unet().save_pretrained(folder, safe_serialization=False)
    torch.save({"conv_in.weight": torch.ones(1), "x": _Exploit(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="refused for safety") as e:
        jaxdiff.load_model(folder)
    assert "diffusion_pytorch_model.bin" in str(e.value)
    assert not marker.exists()


def test_unet_from_bin_equals_unet_from_safetensors(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    unet.save_pretrained(tmp_path / "st")
    a, b = jaxdiff.load_model(tmp_path / "bin"), jaxdiff.load_model(tmp_path / "st")
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


# ---------------------------------------------------------------- folder formats, convert, export


def test_convert_then_export_is_bitwise_lossless(pipeline_dir, converted, exported):
    assert json.loads((converted / "jaxdiff.json").read_text())["components"] == {
        "text_encoder": "CLIPTextModel",
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
    }
    for name, weights in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ]:
        original = load_file(str(pipeline_dir / name / f"{weights}.safetensors"))
        _assert_bitwise_equal(load_file(str(exported / name / f"{weights}.safetensors")), original)
        assert (exported / name / "config.json").read_bytes() == (pipeline_dir / name / "config.json").read_bytes()
    for name in ("tokenizer", "scheduler", "model_index.json"):
        assert (exported / name).exists()


def test_exported_pipeline_loads_with_diffusers_and_transformers(pipeline_dir, exported):
    original = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    loaded = StableDiffusionPipeline.from_pretrained(exported)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert UNet2DConditionModel.from_pretrained(exported / "unet").config.block_out_channels == [16, 32]
    assert AutoencoderKL.from_pretrained(exported / "vae").config.latent_channels == 4
    assert transformers.CLIPTextModel.from_pretrained(exported / "text_encoder").config.hidden_size == 32


def test_clip_with_projection_round_trips(tmp_path):
    config = transformers.CLIPTextConfig(**CLIP, projection_dim=24)
    model = _randomized(transformers.CLIPTextModelWithProjection(config), 3)
    model.save_pretrained(tmp_path / "te2")
    checkpoint.convert(tmp_path / "te2", tmp_path / "jx")
    checkpoint.export(tmp_path / "jx", tmp_path / "out")
    back = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "out")
    a, b = model.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_variant_is_upcast_exactly(tmp_path):
    unet = tiny_unet().half()
    unet.save_pretrained(tmp_path / "unet", variant="fp16")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    checkpoint.convert(tmp_path / "unet", tmp_path / "jx")
    checkpoint.export(tmp_path / "jx", tmp_path / "out")
    back = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    _assert_bitwise_equal(back, {k: v.float().numpy() for k, v in unet.state_dict().items()})


def test_plain_weights_are_preferred_over_variants_and_shards_are_read(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "both")
    tiny_unet().half().save_pretrained(tmp_path / "both", variant="fp16")
    assert [f.name for f in checkpoint.find_weights(tmp_path / "both")] == ["diffusion_pytorch_model.safetensors"]
    tiny_unet().save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = checkpoint.find_weights(tmp_path / "sharded")
    assert len(shards) > 1
    a, b = jaxdiff.load_model(tmp_path / "sharded"), jaxdiff.load_model(tmp_path / "both")
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_load_model_reads_both_formats_identically(pipeline_dir, converted):
    a = jaxdiff.load_model(pipeline_dir / "vae")
    b = jaxdiff.load_model(converted / "vae")
    assert a.config == b.config and a.kind == "vae"
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(b.params))
    components = jaxdiff.load_components(converted)
    assert sorted(components) == ["text_encoder", "unet", "vae"]
    with pytest.raises(ValueError, match="pipeline folder"):
        jaxdiff.load_model(pipeline_dir)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        jaxdiff.load_model(pipeline_dir / "nope")


def test_init_model_is_abstract_from_dict_file_or_folder(pipeline_dir):
    for source in (
        dict(UNET, _class_name="UNet2DConditionModel"),
        pipeline_dir / "unet" / "config.json",
        pipeline_dir / "unet",
    ):
        model = jaxdiff.init_model(source)
        leaves = jax.tree.leaves(model.params)
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    abstract = jaxdiff.init_model(pipeline_dir / "text_encoder")
    concrete = jaxdiff.init_model(pipeline_dir / "text_encoder", abstract=False, seed=1)
    assert concrete.num_params() == abstract.num_params() > 0
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(concrete.params))
    with pytest.raises(FileNotFoundError):
        jaxdiff.init_model(pipeline_dir / "missing")


def test_jaxdiff_checkpoint_loads_without_torch(converted):
    code = (
        "import sys; sys.modules['torch'] = None; import jaxdiff; print(jaxdiff.load_model(sys.argv[1]).num_params())"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code, str(converted / "text_encoder")],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 0


def test_state_dict_with_missing_extra_and_misshaped_tensor_is_one_error(tmp_path, pipeline_dir):
    shutil.copytree(pipeline_dir / "vae", tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = np.zeros(3, np.float32)
    state["encoder.conv_in.weight"] = np.zeros((1, 2, 3, 3), np.float32)
    save_file(state, str(weights))
    with pytest.raises(CheckpointMismatchError) as e:
        jaxdiff.load_model(tmp_path / "vae")
    assert e.value.missing == ["decoder.conv_out.bias"] and e.value.unexpected == ["decoder.extra.weight"]
    assert [m[0] for m in e.value.misshaped] == ["encoder.conv_in.weight"]
    assert "diffusion_pytorch_model.safetensors" in str(e.value)


def test_jaxdiff_params_are_checked_strictly(tmp_path, converted):
    shutil.copytree(converted / "vae", tmp_path / "vae")
    params = load_file(str(tmp_path / "vae" / "params.safetensors"))
    params.pop("decoder/conv_out/bias")
    params["decoder/bogus/kernel"] = np.zeros(1, np.float32)
    save_file(params, str(tmp_path / "vae" / "params.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="decoder/conv_out/bias") as e:
        jaxdiff.load_model(tmp_path / "vae")
    assert e.value.unexpected == ["decoder/bogus/kernel"]


def test_unsupported_model_type_or_missing_config_is_a_clear_error(tmp_path, pipeline_dir):
    folder = tmp_path / "adapter"
    shutil.copytree(pipeline_dir / "unet", folder)
    (folder / "config.json").write_text(json.dumps({"_class_name": "T2IAdapter"}))
    with pytest.raises(ValueError, match="unsupported model type 'T2IAdapter'.*UNet2DConditionModel") as e:
        jaxdiff.load_model(folder)
    assert str(folder / "config.json") in str(e.value)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="not a model folder"):
        jaxdiff.load_model(folder)


def test_writes_are_atomic_and_refuse_to_overwrite(tmp_path, pipeline_dir):
    bad = tmp_path / "bad"
    shutil.copytree(pipeline_dir, bad)
    weights = bad / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # unet converts first, then the vae fails
    with pytest.raises(CorruptCheckpointError):
        checkpoint.convert(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # neither out nor out.tmp-<pid>
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        checkpoint.convert(pipeline_dir / "unet", tmp_path / "out")
    checkpoint.convert(pipeline_dir / "unet", tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "jaxdiff.json", "params.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out"]


def test_single_weights_file_with_config_converts(tmp_path, pipeline_dir):
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    torch.save(unet.state_dict(), tmp_path / "unet.bin")
    checkpoint.convert(tmp_path / "unet.bin", tmp_path / "jx", config=pipeline_dir / "unet" / "config.json")
    model = jaxdiff.load_model(tmp_path / "jx")
    reference = jaxdiff.load_model(pipeline_dir / "unet")
    jax.tree.map(np.testing.assert_array_equal, model.params, reference.params)


def test_in_memory_models_save_and_export(tmp_path, pipeline_dir):
    model = jaxdiff.load_model(pipeline_dir / "vae")
    checkpoint.save_checkpoint(tmp_path / "jx", {"vae": model})
    checkpoint.export(model, tmp_path / "out")
    _assert_bitwise_equal(
        load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors")),
        load_file(str(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors")),
    )
    jax.tree.map(np.testing.assert_array_equal, jaxdiff.load_components(tmp_path / "jx")["vae"].params, model.params)


def test_optional_unsupported_components_are_dropped_and_others_refused(tmp_path, pipeline_dir):
    src = tmp_path / "pipe"
    shutil.copytree(pipeline_dir, src)
    (src / "safety_checker").mkdir()
    (src / "safety_checker" / "config.json").write_text(json.dumps({"architectures": ["StableDiffusionSafetyChecker"]}))
    save_file({"w": np.zeros(2, np.float32)}, str(src / "safety_checker" / "model.safetensors"))
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "safety_checker": ["stable_diffusion", "X"]}))
    summary = checkpoint.convert(src, tmp_path / "jx")
    assert summary["skipped"] == ["safety_checker"] and not (tmp_path / "jx" / "safety_checker").exists()
    assert json.loads((tmp_path / "jx" / "model_index.json").read_text())["safety_checker"] == [None, None]

    (src / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="unsupported model type 'UNet2DModel'"):
        checkpoint.convert(src, tmp_path / "jx2")
    assert not (tmp_path / "jx2").exists()
