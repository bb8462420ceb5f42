"""Original single-file checkpoints (SD 1.x / 2.x / SDXL LDM layout): diffusers' own converters, import, round trip."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file

import jaxdiff
from jaxdiff import cli
from jaxdiff.convert import checkpoint, single_file
from jaxdiff.convert.safetensors_io import load_safetensors, read_header, write_safetensors
from jaxdiff.convert.table import CheckpointMismatchError
from jaxdiff.errors import UserError

# Channels are multiples of 32 so that the release's 32 norm groups fit and configs can be read from the tensors.
VAE = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=16,
)
_CLIP = dict(vocab_size=40, hidden_size=32, num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=12)
CLIP_L = dict(_CLIP, intermediate_size=37, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
OPEN_CLIP = dict(_CLIP, intermediate_size=48, hidden_act="gelu", projection_dim=24, bos_token_id=0, eos_token_id=2)
_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32)
UNETS = {
    "sd1": dict(
        _UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    ),
    "sd2": dict(
        _UNET,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        attention_head_dim=(1, 1),
        use_linear_projection=True,
    ),
    "sdxl": dict(
        _UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,
        attention_head_dim=(1, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,
    ),
}
ENCODERS = {
    "sd1": {"text_encoder": (transformers.CLIPTextModel, CLIP_L)},
    "sd2": {"text_encoder": (transformers.CLIPTextModel, OPEN_CLIP)},
    "sdxl": {
        "text_encoder": (transformers.CLIPTextModel, CLIP_L),
        "text_encoder_2": (transformers.CLIPTextModelWithProjection, OPEN_CLIP),
    },
}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
FAMILIES = ("sd1", "sd2", "sdxl")


def _randomized(module, seed):
    # diffusers zero-initialises some layers; random values make equality checks meaningful.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def _tokenizer(folder):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({w + "</w>": i + 2 for i, w in enumerate("a b c d e f g h i j".split())})
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12)


def make_pipeline(folder, family):
    """A tiny random diffusers pipeline folder of `family`; returns its torch models by component."""
    models = {
        "unet": _randomized(UNet2DConditionModel(**UNETS[family]), 0),
        "vae": _randomized(AutoencoderKL(**VAE), 1),
    }
    for i, (name, (cls, config)) in enumerate(ENCODERS[family].items()):
        models[name] = _randomized(cls(transformers.CLIPTextConfig(**config)), 2 + i)
    index = {"_class_name": PIPELINES[family], "scheduler": ["diffusers", "DDIMScheduler"]}
    for name, model in models.items():
        model.save_pretrained(folder / name)
        index[name] = ["transformers" if name.startswith("text") else "diffusers", type(model).__name__]
    tokenizer = _tokenizer(folder.parent / f"{folder.name}_vocab")
    for i in range(len(ENCODERS[family])):
        name = "tokenizer" if i == 0 else "tokenizer_2"
        tokenizer.save_pretrained(folder / name)
        index[name] = ["transformers", "CLIPTokenizer"]
    prediction = "v_prediction" if family == "sd2" else "epsilon"
    DDIMScheduler(clip_sample=False, prediction_type=prediction).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index))
    return models


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """A family's torch models, diffusers folder, its direct jaxdiff conversion and the single file exported from it."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    models = make_pipeline(root / "diffusers", family)
    checkpoint.convert(root / "diffusers", root / "direct")
    summary = single_file.export(root / "diffusers", root / "model.safetensors")
    assert summary["architecture"] == single_file.FAMILIES[family].label
    return dict(family=family, root=root, models=models, folder=root / "diffusers", file=root / "model.safetensors")


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = (np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for v in (a[k], b[k]))
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


def _canonical(state):
    return {
        "text_model." + k if not k.startswith(("text_model.", "text_projection")) else k: v for k, v in state.items()
    }


def _params(folder):
    return {n: load_safetensors(folder / n / "params.safetensors") for n in ("unet", "vae", "text_encoder")}


# ---------------------------------------------------------------- (a) diffusers' own converters read the file


def test_diffusers_converters_map_the_file_back_to_the_original_state_dicts(tiny):
    ckpt, models = load_file(str(tiny["file"])), tiny["models"]
    unet = sfu.convert_ldm_unet_checkpoint(ckpt, dict(models["unet"].config))
    _assert_same(unet, models["unet"].state_dict())
    vae = sfu.convert_ldm_vae_checkpoint(ckpt, dict(models["vae"].config))
    _assert_same(vae, models["vae"].state_dict())
    if tiny["family"] == "sd2":
        te = sfu.convert_open_clip_checkpoint(models["text_encoder"], ckpt, prefix="cond_stage_model.model.")
        _assert_same(te, _canonical(models["text_encoder"].state_dict()))
    else:
        te = sfu.convert_ldm_clip_checkpoint(ckpt)  # strips cond_stage_model.transformer. / conditioner.embedders.0.
        _assert_same(te, _canonical(models["text_encoder"].state_dict()))
    n = len(unet) + len(vae) + len(te)
    if tiny["family"] == "sdxl":
        te2 = sfu.convert_open_clip_checkpoint(models["text_encoder_2"], ckpt, prefix="conditioner.embedders.1.model.")
        _assert_same(te2, _canonical(models["text_encoder_2"].state_dict()))
        n += len(te2)
    if tiny["family"] != "sd1":
        n -= 4 * OPEN_CLIP["num_hidden_layers"]  # q, k, v weights and biases come from one in_proj weight and bias
    assert n == len(ckpt)  # nothing else in the file


# The released configs (diffusers' stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-xl-base-1.0).
CA, DB, UB, CU = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"
_SD_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, in_channels=4, out_channels=4)
CLIP_L_RELEASE = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768
)
RELEASES = {
    "sd1": dict(
        unet=dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768, down_block_types=[CA, CA, CA, DB]),
        text_encoder=dict(CLIP_L_RELEASE),
    ),
    "sd2": dict(
        unet=dict(
            _SD_UNET,
            attention_head_dim=[5, 10, 20, 20],
            cross_attention_dim=1024,
            down_block_types=[CA, CA, CA, DB],
            use_linear_projection=True,
        ),
        text_encoder=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
            projection_dim=512,
        ),
    ),
    "sdxl": dict(
        unet=dict(
            _SD_UNET,
            block_out_channels=[320, 640, 1280],
            attention_head_dim=[5, 10, 20],
            cross_attention_dim=2048,
            down_block_types=[DB, CA, CA],
            use_linear_projection=True,
            transformer_layers_per_block=[1, 2, 10],
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        text_encoder=dict(CLIP_L_RELEASE),
        text_encoder_2=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            hidden_act="gelu",
            projection_dim=1280,
        ),
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_release_sized_layouts_match_diffusers_on_meta_tensors(family):
    """Full-size SD 1.5 / 2.1 / SDXL: the keys and shapes of jaxdiff's rules are what diffusers' converters map onto
    the real models (meta tensors: no memory), diffusers infers the same model type, and the configs read back from
    the tensors are the released ones (but SD 2.1's 768-px sample_size, which the tensors cannot show)."""
    fam = single_file.FAMILIES[family]
    release = RELEASES[family]
    release["unet"]["up_block_types"] = [UB if t == DB else CU for t in release["unet"]["down_block_types"][::-1]]
    vae = dict(VAE, block_out_channels=[128, 256, 512, 512], layers_per_block=2)
    vae.update(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    with torch.device("meta"):
        torch_models = {"unet": UNet2DConditionModel(**release["unet"]), "vae": AutoencoderKL(**vae)}
        for name in ENCODERS[family]:
            config = transformers.CLIPTextConfig(**dict(CLIP_L, vocab_size=49408, max_position_embeddings=77))
            config.update(release[name])
            cls = transformers.CLIPTextModelWithProjection if name == "text_encoder_2" else transformers.CLIPTextModel
            torch_models[name] = cls(config)
    configs = {n: dict(m.config) if n in ("unet", "vae") else m.config.to_dict() for n, m in torch_models.items()}
    configs["unet"]["_class_name"], configs["vae"]["_class_name"] = "UNet2DConditionModel", "AutoencoderKL"
    for name in ENCODERS[family]:
        configs[name]["architectures"] = [type(torch_models[name]).__name__]
    shapes = {}
    for name, config in configs.items():
        model = jaxdiff.init_model(config, abstract=True)
        shapes.update({r.key: r.shape for r in single_file.rules(name, model, fam)})
    if family == "sd2":  # a real SD 2 file holds OpenCLIP-H whole: 24 layers and text_projection
        shapes.update({k.replace(".22.", ".23."): v for k, v in shapes.items() if ".resblocks.22." in k})
        shapes["cond_stage_model.model.text_projection"] = (1024, 1024)
    assert single_file.detect(shapes)[0] is fam
    ckpt = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    assert sfu.infer_diffusers_model_type(ckpt) == {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[family]
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(ckpt, torch_models["unet"].config),
        "vae": sfu.convert_ldm_vae_checkpoint(ckpt, torch_models["vae"].config),
    }
    for encoder in fam.encoders:
        model = torch_models[encoder.component]
        if encoder.open_clip:
            converted[encoder.component] = sfu.convert_open_clip_checkpoint(model, ckpt, prefix=encoder.prefix)
        else:
            converted[encoder.component] = sfu.convert_ldm_clip_checkpoint(ckpt)
    for name, state in converted.items():
        state_dict = torch_models[name].state_dict()
        want = {k: tuple(v.shape) for k, v in (_canonical(state_dict) if "text" in name else state_dict).items()}
        assert {k: tuple(v.shape) for k, v in state.items()} == want, name
    inferred = single_file.configs_from_tensors(shapes, fam, "release")
    for name, config in configs.items():
        for key, value in config.items():
            if key in inferred[name] and key not in ("sample_size", "scaling_factor", "force_upcast", "torch_dtype"):
                value = list(value) if isinstance(value, tuple) else value
                assert inferred[name][key] == value, (name, key)


# ---------------------------------------------------------------- (b) import = converting the diffusers folder


def test_import_equals_direct_conversion_and_export_from_either_is_the_same_file(tiny, tmp_path):
    root = tiny["root"]
    summary = single_file.convert(tiny["file"], tmp_path / "jx", config_from=tiny["folder"])
    assert summary["architecture"] == single_file.FAMILIES[tiny["family"]].label
    names = list(ENCODERS[tiny["family"]]) + ["unet", "vae"]
    for name in names:
        _assert_same(
            load_safetensors(tmp_path / "jx" / name / "params.safetensors"),
            load_safetensors(root / "direct" / name / "params.safetensors"),
        )
        assert (tmp_path / "jx" / name / "config.json").read_bytes() == (
            tiny["folder"] / name / "config.json"
        ).read_bytes()
    scheduler = json.loads((tmp_path / "jx" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("v_prediction" if tiny["family"] == "sd2" else "epsilon")
    single_file.export(root / "direct", tmp_path / "again.safetensors")
    _assert_same(load_safetensors(tmp_path / "again.safetensors"), load_safetensors(tiny["file"]))


def test_configs_read_from_the_tensors(tiny, tmp_path):
    summary = single_file.convert(tiny["file"], tmp_path / "jx")
    notes = " ".join(summary["notes"])
    assert "no tokenizer" in notes and "--config-from" in notes and "prediction type: epsilon (default" in notes
    for name in ["unet", "vae", *ENCODERS[tiny["family"]]]:
        _assert_same(
            load_safetensors(tmp_path / "jx" / name / "params.safetensors"),
            load_safetensors(tiny["root"] / "direct" / name / "params.safetensors"),
        )
        got = json.loads((tmp_path / "jx" / name / "config.json").read_text())
        want = dict(tiny["models"][name].config if name in ("unet", "vae") else tiny["models"][name].config.to_dict())
        visible = {
            "unet": [
                "in_channels",
                "out_channels",
                "block_out_channels",
                "layers_per_block",
                "down_block_types",
                "up_block_types",
                "cross_attention_dim",
                "use_linear_projection",
                "transformer_layers_per_block",
                "addition_embed_type",
                "addition_time_embed_dim",
                "projection_class_embeddings_input_dim",
            ],
            "vae": ["in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels"],
        }.get(name, ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act"])
        if name == "text_encoder_2":
            visible.append("projection_dim")
        for key in visible:
            expected = want.get(key)
            expected = list(expected) if isinstance(expected, tuple) else expected
            if key == "transformer_layers_per_block" and tiny["family"] != "sdxl":
                expected = 1
            assert got.get(key) == expected, (name, key)


# ---------------------------------------------------------------- (c) exact round trip of a file as users hold it


def _user_file(tiny, path):
    """The exported file as real ones are: float16, schedule and position_ids buffers, an EMA copy, metadata, a 2-D VAE
    attention weight; SD 1.x with the old `text_model`-less CLIP keys; SD 2.x with OpenCLIP's unused last layer."""
    exported = load_safetensors(tiny["file"])
    tensors = {k: v.astype(np.float16) for k, v in exported.items()}
    tensors["alphas_cumprod"] = np.linspace(1, 0, 10, dtype=np.float32)
    tensors["model_ema.decay"] = np.array(0.9999, np.float32)
    tensors["first_stage_model.decoder.mid.attn_1.q.weight"] = tensors["first_stage_model.decoder.mid.attn_1.q.weight"][
        :, :, 0, 0
    ]
    bias = "first_stage_model.decoder.mid.attn_1.k.bias"
    tensors[bias] = exported[bias].astype(ml_dtypes.bfloat16)
    family = tiny["family"]
    if family == "sd1":
        old = "cond_stage_model.transformer.text_model."
        tensors = {k.replace(old, "cond_stage_model.transformer."): v for k, v in tensors.items()}
        tensors["cond_stage_model.transformer.embeddings.position_ids"] = np.arange(12, dtype=np.int64)[None]
    if family == "sdxl":
        tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = np.arange(12)[None]
        tensors["conditioner.embedders.1.model.logit_scale"] = np.array(4.6, np.float16)
    if family == "sd2":
        p = "cond_stage_model.model."
        rng = np.random.default_rng(0)
        last = {k: v for k, v in tensors.items() if k.startswith(p + "transformer.resblocks.1.")}
        tensors.update(
            {
                k.replace("resblocks.1.", "resblocks.2."): rng.standard_normal(v.shape).astype(v.dtype)
                for k, v in last.items()
            }
        )
        tensors[p + "text_projection"] = rng.standard_normal((32, 16)).astype(np.float16)
        tensors[p + "logit_scale"] = np.array(4.6, np.float16)
    write_safetensors(path, tensors, metadata={"modelspec.title": f"tiny {family}"})
    return path


def _torch(array):
    if array.dtype == ml_dtypes.bfloat16:  # numpy has no bfloat16 bridge to torch: reinterpret the bits
        return torch.from_numpy(np.array(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def test_round_trip_is_bitwise(tiny, tmp_path):
    user = _user_file(tiny, tmp_path / "user.safetensors")
    summary = single_file.convert(user, tmp_path / "jx", config_from=tiny["folder"])
    assert any("ignored: 1 tensor(s): EMA" in n for n in summary["notes"]), summary["notes"]
    direct = _params(tiny["root"] / "direct")
    converted = _params(tmp_path / "jx")
    for name in direct:  # the float32 params rounded to the file's float16 (one bias: bfloat16), exactly
        for k, v in direct[name].items():
            got = converted[name][k]
            rounded = [v.astype(t).astype(np.float32) for t in (np.float16, ml_dtypes.bfloat16)]
            assert any(np.array_equal(got, r) for r in rounded), (name, k)
    single_file.export(tmp_path / "jx", tmp_path / "back.safetensors")
    original = {k: v for k, v in load_safetensors(user).items() if not k.startswith("model_ema.")}
    _assert_same(load_safetensors(tmp_path / "back.safetensors"), original)
    assert read_header(tmp_path / "back.safetensors")[1] == read_header(user)[1]

    # The same tensors in a Lightning-style .ckpt go through the safe torch loader and convert to the same params.
    state = {k: _torch(v) for k, v in load_safetensors(user).items()}
    torch.save({"state_dict": state, "global_step": 3}, tmp_path / "user.ckpt")
    single_file.convert(tmp_path / "user.ckpt", tmp_path / "from_ckpt", config_from=tiny["folder"])
    for name, params in _params(tmp_path / "from_ckpt").items():
        _assert_same(params, converted[name])


# ---------------------------------------------------------------- (d) errors name the tensors


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD 1.x diffusers folder and its single file (and an SD 2.x folder beside them)."""
    root = tmp_path_factory.mktemp("sd1")
    make_pipeline(root / "diffusers", "sd1")
    make_pipeline(root / "sd2", "sd2")
    single_file.export(root / "diffusers", root / "model.safetensors")
    return root


def test_unknown_layout_is_one_line_naming_the_tensors(sd1, tmp_path):
    tensors = {k: v for k, v in load_safetensors(sd1 / "model.safetensors").items() if not k.startswith("cond_stage")}
    tensors["conditioner.embedders.0.model.token_embedding.weight"] = np.zeros((4, 4), np.float32)
    write_safetensors(tmp_path / "refiner.safetensors", tensors)
    with pytest.raises(single_file.UnknownLayoutError) as e:
        single_file.convert(tmp_path / "refiner.safetensors", tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message and "SDXL refiner" in message
    assert "conditioner.embedders.0.model.token_embedding.weight" in message and "model.diffusion_model" in message
    assert not (tmp_path / "out").exists()
    del tensors["conditioner.embedders.0.model.token_embedding.weight"]
    write_safetensors(tmp_path / "no_text.safetensors", tensors)
    code = cli.main(["convert", str(tmp_path / "no_text.safetensors"), str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()
    with pytest.raises(
        single_file.UnknownLayoutError, match="no text encoder .*cond_stage_model.model.token_embedding"
    ):
        single_file.detect(tensors)


def test_missing_extra_and_misshaped_tensors_are_named(sd1, tmp_path):
    tensors = dict(load_safetensors(sd1 / "model.safetensors"))
    del tensors["model.diffusion_model.output_blocks.1.1.conv.weight"]
    tensors["model.diffusion_model.stray.weight"] = np.zeros(3, np.float32)
    tensors["first_stage_model.encoder.conv_in.bias"] = np.zeros(5, np.float32)
    write_safetensors(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(CheckpointMismatchError) as e:
        single_file.convert(tmp_path / "bad.safetensors", tmp_path / "out", config_from=sd1 / "diffusers")
    assert e.value.missing == ["model.diffusion_model.output_blocks.1.1.conv.weight"]
    assert e.value.unexpected == ["model.diffusion_model.stray.weight"]
    assert [k for k, *_ in e.value.misshaped] == ["first_stage_model.encoder.conv_in.bias"]
    assert not (tmp_path / "out").exists()


def test_config_from_a_folder_of_another_family_is_refused(sd1, tmp_path):
    with pytest.raises(UserError, match=r"is an SD 2.x pipeline \(text_encoder/config.json hidden_act='gelu'\) but"):
        single_file.convert(sd1 / "model.safetensors", tmp_path / "out", config_from=sd1 / "sd2")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- (e) the command line


def test_cli_convert_info_export(sd1, tmp_path, capsys):
    src = sd1 / "model.safetensors"
    assert cli.main(["info", str(src)]) == 0
    out = capsys.readouterr().out
    assert "architecture: SD 1.x" in out and "cond_stage_model.transformer.text_model.embeddings" in out
    args = ["convert", str(src), str(tmp_path / "jx"), "--config-from", str(sd1 / "diffusers")]
    assert cli.main([*args, "--prediction-type", "v_prediction"]) == 0
    assert "architecture: SD 1.x" in capsys.readouterr().out
    assert cli.main(["info", str(tmp_path / "jx")]) == 0
    out = capsys.readouterr().out
    assert "architecture: SD 1.x" in out and "v_prediction (--prediction-type)" in out
    pipe = jaxdiff.load_pipeline(tmp_path / "jx")  # tokenizer and scheduler came from --config-from
    assert pipe.scheduler_config["prediction_type"] == "v_prediction" and len(pipe.tokenizers) == 1
    assert cli.main(["export", str(tmp_path / "jx"), str(tmp_path / "back.safetensors")]) == 0
    _assert_same(load_safetensors(tmp_path / "back.safetensors"), load_safetensors(src))
    assert cli.main(["convert", str(sd1 / "diffusers"), str(tmp_path / "x"), "--prediction-type", "epsilon"]) == 2
