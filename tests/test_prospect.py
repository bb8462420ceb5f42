"""ProSpect: stage index at the boundaries, the stage vector each example reads, only the stage vectors train, and a
smoke run of `jaxdiff personalize --config configs/personalize/prospect.py:runlocal` whose stages sample per step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import cli, personalize
from jaxdiff.config import load_config
from jaxdiff.errors import UserError
from jaxdiff.personalize import data, prospect, tokens
from jaxdiff.sampling.denoise import stage_index
from jaxdiff.sampling.pipeline import load_pipeline

FAST = ["--no-progress", "--config.sample.num_images=0", "--config.train.checkpoint_every=0"]


def test_stage_index_at_the_boundaries():
    k = stage_index(jnp.asarray([0, 99, 100, 999]), 10, 1000)
    np.testing.assert_array_equal(k, [0, 0, 1, 9])


def test_each_example_reads_the_stage_vector_of_its_timestep():
    pipe = load_pipeline("shapes")
    te = pipe.text_encoders[0]
    tok, _ = tokens.add_tokens(pipe.tokenizers[0], ["<p>"])
    ids = jnp.asarray(tok(["a red <p>", "<p>"], padding="max_length", max_length=32).input_ids, jnp.int32)
    stages = jnp.asarray(np.random.default_rng(0).standard_normal((10, 128)), jnp.float32)
    k = stage_index(jnp.asarray([999, 150]), 10)
    got = prospect.stage_encode(te, te.params, stages, ids, k)
    for row, stage in ((0, 9), (1, 1)):
        want = tokens.encode(te, te.params, stages[stage : stage + 1], ids[row : row + 1])
        np.testing.assert_allclose(got[row], want[0], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    images = tmp_path_factory.mktemp("one")
    data.write_shapes_renders(images, 1, "<p>")
    out = tmp_path_factory.mktemp("runs") / "prospect"
    config = "configs/personalize/prospect.py:runlocal"
    args = ["personalize", "--config", config, "--images", str(images), "--token", "<p>", "--out", str(out), *FAST]
    assert cli.main(args) == 0
    return out


def test_only_the_stage_vectors_train_and_the_run_samples_per_stage(run):
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == "prospect" and report["steps"] == 3 and report["trainable_params"] == 10 * 128
    token, stages = prospect.load_stages(run)
    assert token == "<p>" and stages.shape == (10, 128)
    base = load_pipeline("shapes")
    init = tokens.init_rows(tokens.table_of(base.text_encoders[0].params), "shape", base.tokenizers[0], num=10)
    assert np.all(np.abs(stages - np.asarray(init)).max(-1) > 0)  # every stage moved
    personal = load_pipeline(run / "model")
    same = lambda a, b: jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))  # noqa: E731
    assert same(personal.unet.params, base.unet.params) and same(personal.vae.params, base.vae.params)
    te_new, te_old = personal.text_encoders[0].params, base.text_encoders[0].params
    table_new, table_old = tokens.table_of(te_new), tokens.table_of(te_old)
    np.testing.assert_array_equal(np.asarray(table_new)[:-1], np.asarray(table_old))
    np.testing.assert_allclose(np.asarray(table_new)[-1], stages.mean(0), rtol=1e-6)
    rest = lambda p: {k: v for k, v in p["text_model"].items() if k != "embeddings"}  # noqa: E731
    assert same(rest(te_new), rest(te_old))
    assert same(te_new["text_model"]["embeddings"]["position_embedding"],
                te_old["text_model"]["embeddings"]["position_embedding"])  # fmt: skip
    assert (run / "samples.png").is_file()
    # Per-stage sampling with the learned stages: equal stages are the plain token; different ones differ.
    pipe = personalize.apply(base, run)
    noise = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    cond = prospect.stage_conditioning(pipe, [["a red <p>"]] * 10, stages, "<p>")
    flat = prospect.stage_conditioning(pipe, [["a red <p>"]] * 10, np.repeat(stages[:1], 10, 0), "<p>")
    np.testing.assert_array_equal(flat[3], cond[0])
    assert np.abs(cond[3] - cond[0]).max() > 0
    kw = dict(steps=5, guidance=2.0, latents=noise)
    np.testing.assert_array_equal(pipe(prompt_embeds=flat, **kw), pipe(prompt_embeds=flat[0], **kw))
    with pytest.raises(UserError, match="no placeholder token"):
        prospect.stage_conditioning(base, [["a red <p>"]] * 10, stages, "<p>")


def test_config_and_bad_representation():
    c = load_config("configs/personalize/prospect.py:shapes")
    assert c.stages == 10 and c.representation == "free" and tuple(c.templates) == ("{}",)
    with pytest.raises(UserError, match="unknown prospect config variant"):
        load_config("configs/personalize/prospect.py:nope")


def test_generator_block_maps_the_init_embedding_to_k_stages_and_alone_trains(tmp_path):
    params = prospect.init_generator(128, 10)
    init = jnp.asarray(np.random.default_rng(0).standard_normal((1, 128)), jnp.float32)
    stages = prospect.generate(params, init, 10)
    assert stages.shape == (10, 128) and np.all(np.isfinite(stages))
    grads = jax.grad(lambda p: jnp.sum(prospect.generate(p, init, 10) ** 2))(params)
    assert all(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads["ff"]))
    images = tmp_path / "one"
    data.write_shapes_renders(images, 1, "<p>")
    out = tmp_path / "gen"
    config = "configs/personalize/prospect.py:runlocal"
    args = ["personalize", "--config", config, "--images", str(images), "--token", "<p>", "--out", str(out), *FAST]
    assert cli.main([*args, "--config.representation=generator"]) == 0
    report = json.loads((out / "report.json").read_text())
    size = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    assert report["trainable_params"] == size
    _, learned = prospect.load_stages(out)
    assert learned.shape == (10, 128) and np.abs(learned - np.asarray(stages)).max() > 0  # trained from init
