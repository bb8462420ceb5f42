"""Images + caption ids encoded in the step by a frozen VAE and text encoder: the same loss as on those latents and
contexts, caption dropout to the empty prompt, a sharded run that checkpoints and resumes exactly, clear config
errors before anything compiles."""

import shutil

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
import train_worker as tw

from jaxdiff import cli, sharding
from jaxdiff.config import load_config
from jaxdiff.convert.checkpoint import save_checkpoint
from jaxdiff.data import shapes_source
from jaxdiff.models.model import create
from jaxdiff.models.registry import architecture_for
from jaxdiff.sampling import text
from jaxdiff.sampling.pipeline import BUILTIN
from jaxdiff.train import checkpoint as ckpt_lib
from jaxdiff.train import config as config_lib
from jaxdiff.train import frozen as frozen_lib
from jaxdiff.train import loop, objectives
from jaxdiff.train import state as state_lib

TOKENIZER = BUILTIN["shapes"] / "tokenizer"  # 308 words, 32 tokens
VAE = dict(
    _class_name="AutoencoderKL",
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 8],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.5,
    shift_factor=0.1,
)
TEXT = dict(
    architectures=["CLIPTextModel"],
    model_type="clip_text_model",
    vocab_size=308,
    hidden_size=32,  # the tiny UNet's cross_attention_dim
    intermediate_size=64,
    projection_dim=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    max_position_embeddings=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
DATA_OPTIONS = dict(generate=True, num_records=32, size=16)  # the tiny VAE's 16x16 -> 8x8 latents
DATA = (
    "--config.data.source=jaxdiff.data.shapes_source:captioned",
    "--config.data.options.generate=True",
    "--config.data.options.num_records=32",
    "--config.data.options.size=16",
    "--config.data.features=('image', 'input_ids')",
)


def _random_model(config: dict, seed: int):
    """The model with random numpy params (norms 1 and 0): no initialiser to compile."""
    model = create(architecture_for(config), config, abstract=True)
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = state_lib.path_str(path)
        if name.endswith("scale"):
            return np.ones(leaf.shape, np.float32)
        if name.endswith("bias"):
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    model.params = jax.tree_util.tree_map_with_path(init, model.params)
    return model


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A jaxdiff checkpoint with a tiny random VAE (16x16x3 -> 8x8x4) and CLIP text encoder, plus a tokenizer."""
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    save_checkpoint(folder, {"vae": _random_model(VAE, 1), "text_encoder": _random_model(TEXT, 2)})
    shutil.copytree(TOKENIZER, folder / "tokenizer")
    return folder


def _config(pipeline, *overrides):
    return tw.tiny_config(
        f"--config.model.pipeline={pipeline}",
        "--config.objective.image_key=image",
        "--config.objective.caption_dropout=0.25",
        *DATA,
        *overrides,
    )


@pytest.fixture(scope="module")
def encoders(pipeline):
    """(frozen models, their params, a batch of 4 shapes images + caption ids)."""
    frozen = frozen_lib.from_config(config_lib.validate(_config(pipeline), 1))
    data = mlc.ConfigDict(dict(split="train", tokenizer=str(TOKENIZER), data_dir="", options=dict(DATA_OPTIONS)))
    source = shapes_source.captioned(data)
    records = [source[i] for i in range(4)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in records])) for k in ("image", "input_ids")}
    return frozen, frozen.load_params(), batch


def test_image_caption_loss_is_the_latents_loss_on_the_encoded_batch(encoders):
    frozen, params, batch = encoders
    cfg = config_lib.default_config().objective
    cfg.update(image_key="image", caption_key="input_ids", caption_dropout=0.5, snr_gamma=5.0)
    apply_fn = lambda p, x, t, c: p * x + jnp.mean(c, axis=(1, 2))[:, None, None, None]  # uses the context
    loss_fn = objectives.image_caption_loss(apply_fn, cfg, frozen_lib.encoder(frozen, cfg))
    rng = jax.random.PRNGKey(2)
    loss, aux = jax.jit(loss_fn)(jnp.float32(0.5), params, batch, rng)

    # The same draws by hand: (encode, loss) = split(rng); (posterior sample, dropout) = split(encode).
    @jax.jit
    def by_hand(params, batch, rng):
        encode_rng, loss_rng = jax.random.split(rng)
        vae_rng, drop_rng = jax.random.split(encode_rng)
        mean, logvar = frozen.vae.encode(params["vae"], batch["image"].astype(jnp.float32) / 127.5 - 1.0)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(vae_rng, mean.shape)
        latents = (z - 0.1) * 0.5  # shift_factor, scaling_factor
        drop = jax.random.uniform(drop_rng, (4,)) < 0.5
        ids = jnp.where(drop[:, None], jnp.asarray(frozen.empty_ids)[None], batch["input_ids"])
        context = frozen.text_encoder.apply(params["text_encoder"], ids)["last_hidden_state"]
        cached = config_lib.default_config().objective
        cached.snr_gamma = 5.0
        loss, aux = objectives.denoising_loss(apply_fn, cached)(
            jnp.float32(0.5), None, {"latents": latents, "encoder_hidden_states": context}, loss_rng
        )
        return loss, aux, latents, drop

    expected, expected_aux, latents, drop = by_hand(params, batch, rng)
    assert latents.shape == (4, 8, 8, 4) and 0 < int(drop.sum()) < 4  # both kinds of rows are in the batch
    assert abs(float(loss) - float(expected)) <= 1e-5
    assert abs(float(aux["mse"]) - float(expected_aux["mse"])) <= 1e-5


def test_caption_dropout_one_gives_the_empty_prompt_context(encoders):
    frozen, params, batch = encoders
    assert np.array_equal(frozen.empty_ids, text.tokenize(text.load_tokenizer(TOKENIZER), [""])[0])
    encoders = {}
    for p in (0.0, 1.0):
        cfg = config_lib.default_config().objective
        cfg.update(image_key="image", caption_key="input_ids", caption_dropout=p)
        encoders[p] = frozen_lib.encoder(frozen, cfg)

    @jax.jit
    def contexts(params, batch, rng):
        apply = lambda ids: frozen.text_encoder.apply(params["text_encoder"], ids)["last_hidden_state"]
        out = {p: encode(params, batch, rng)[1] for p, encode in encoders.items()}
        return out, apply(jnp.asarray(frozen.empty_ids)[None]), apply(batch["input_ids"])

    contexts, empty, captioned = contexts(params, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(contexts[1.0], jnp.broadcast_to(empty, contexts[1.0].shape), atol=1e-5)
    np.testing.assert_allclose(contexts[0.0], captioned, atol=1e-5)
    assert np.abs(np.asarray(contexts[0.0]) - np.asarray(contexts[1.0])).max() > 1e-3


def test_run_on_images_and_captions_checkpoints_and_resumes_exactly(pipeline, tmp_path):
    config = _config(pipeline, "--config.total_steps=3", "--config.checkpoint.every_steps=2", "--config.mesh.data=1")
    devices = jax.devices()[:1]
    s = loop.setup(config, devices)
    assert s.config.data.tokenizer == str(pipeline.resolve() / "tokenizer")  # captions tokenized as the model's
    mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
    specs = [sh.spec for sh in jax.tree_util.tree_leaves(s.frozen.shardings(mesh, s.rules))]
    assert any("fsdp" in str(spec) for spec in specs), "the frozen models are sharded by their logical axes"

    def restore():
        checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
        try:
            return checkpointer.restore(None, state_lib.abstract(s.abstract_state, s.state_shardings))
        finally:
            checkpointer.close()

    first = loop.train(config, str(tmp_path), devices=devices)
    assert first["step"] == 3 and np.isfinite(first["loss"]) and tw.committed_steps(tmp_path) == [2, 3]
    final = jax.device_get(restore()[0])
    shutil.rmtree(tmp_path / "checkpoints" / "3")

    again = loop.train(config, str(tmp_path), devices=devices)  # resumes from step 2
    resumed, data, meta = restore()
    assert again["step"] == 3 and meta["step"] == 3 and data["position"] == 3
    assert again["loss"] == first["loss"]
    assert tw.bitwise_equal(jax.device_get(resumed.params), final.params)
    assert tw.bitwise_equal(jax.device_get(resumed.opt_state), final.opt_state)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("--config.model.pipeline=/no/such/pipeline",), "config.model.pipeline: no model at /no/such/pipeline"),
        (("--config.model.pipeline=",), "config.objective.image_key='image' needs the frozen encoders"),
        (
            ("--config.model.pretrained_vae={p}", "--config.model.pretrained_text_encoder={p}/text_encoder"),
            "give its vae/",
        ),
        (
            (
                "--config.model.pretrained_vae={p}/text_encoder",
                "--config.model.pretrained_text_encoder={p}/text_encoder",
            ),
            "is a CLIPTextModel, not a vae",
        ),
        (
            ("--config.model.unet.cross_attention_dim=16",),
            "cross_attention_dim=16 but the text encoder has hidden_size=32",
        ),
        (("--config.data.features=('image',)",), "leaves out the objective's ['input_ids']"),
        (("--config.objective.caption_dropout=1.5",), "caption_dropout must be in [0, 1]"),
        (("--config.objective.image_key=",), "frozen encoders are for image + caption data"),
    ],
)
def test_config_errors_name_the_problem_before_anything_compiles(pipeline, overrides, message):
    config = _config(pipeline, *(o.format(p=pipeline) for o in overrides))
    with pytest.raises(config_lib.ConfigError) as e:
        loop.setup(config, jax.devices()[:1])
    assert message in str(e.value)


def test_shapes_config_builds_on_the_builtin_pipeline_and_the_cli_reports_a_missing_one(capsys, tmp_path):
    config = load_config("configs/train/shapes.py")
    s = loop.setup(config, jax.devices()[:1])
    assert s.frozen.paths["tokenizer"] == (BUILTIN["shapes"] / "tokenizer").resolve()
    assert s.frozen.vae.config["scaling_factor"] > 0 and s.config.objective.caption_dropout == 0.1
    assert s.model.config["block_out_channels"] == [64, 64, 128]

    rc = cli.main(
        ["train", "--config", "configs/train/shapes.py", "--workdir", str(tmp_path), "--config.model.pipeline=nope"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "jaxdiff: error: config.model.pipeline: no model at nope" in err
