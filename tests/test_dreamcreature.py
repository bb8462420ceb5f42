"""DreamCreature: normalised part maps, the BCE against a numpy transcription, the mapper's code->row indexing, part
tokens reading the mapper, and a smoke run of `jaxdiff personalize --config configs/personalize/dreamcreature.py:
runlocal` after which only the mapper and the LoRA changed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import cli, lora
from jaxdiff.convert.safetensors_io import load_safetensors
from jaxdiff.errors import UserError
from jaxdiff.personalize import dreamcreature as dc
from jaxdiff.personalize import dreamcreature_data as dd
from jaxdiff.personalize import tokens
from jaxdiff.sampling.pipeline import load_pipeline

FAST = ["--no-progress", "--config.sample.num_images=0", "--config.train.checkpoint_every=0"]
same = lambda a, b: jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))  # noqa: E731


def test_normalised_maps_sum_to_one_over_present_tokens_and_zero_elsewhere():
    a = jnp.asarray(np.random.default_rng(0).uniform(0.01, 1.0, (3, 16, 3)), jnp.float32)
    present = jnp.asarray([[1, 1, 0], [0, 0, 0], [0, 1, 0]], jnp.float32)
    p = np.asarray(dc.normalise(a, present))
    np.testing.assert_allclose(p[0, :, :2].sum(-1), 1.0, rtol=1e-6)
    want = np.asarray(a[0, :, :2]) / np.asarray(a[0, :, :2]).sum(-1, keepdims=True)
    np.testing.assert_allclose(p[0, :, :2], want, rtol=1e-6)
    assert np.all(p[0, :, 2] == 0) and np.all(p[1] == 0)  # absent token; no token present at all
    np.testing.assert_allclose(p[2, :, 1], 1.0, rtol=1e-6)  # one present token owns every pixel


def test_bce_matches_a_numpy_transcription():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, (2, 16, 3)).astype(np.float32)
    p[0, 0, 0], p[0, 1, 0] = 0.0, 1.0  # clipped, not inf
    y = rng.uniform(0, 1, (2, 16, 3)).astype(np.float32)
    present = np.asarray([[1, 0, 1], [1, 1, 1]], np.float32)
    q = np.clip(p, np.float32(1e-6), np.float32(1 - 1e-6)).astype(np.float64)  # the clip in float32, as JAX
    terms = []
    for b in range(2):
        for m in range(3):
            if present[b, m]:
                terms += list(-(y[b, :, m] * np.log(q[b, :, m]) + (1 - y[b, :, m]) * np.log(1 - q[b, :, m])))
    got = float(dc.bce(jnp.asarray(p), jnp.asarray(y), jnp.asarray(present)))
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
    assert float(dc.bce(jnp.asarray(p), jnp.asarray(y), jnp.zeros((2, 3)))) == 0.0


def test_mapper_shapes_and_code_rows_absent_code_is_k():
    k, m, d = 12, 3, 16
    params = dc.init_mapper(m, k, d, layers=2, seed=0)
    assert params["table"].shape == ((k + 1) * m, d) and params["part"].shape == (m, d) and len(params["mlp"]) == 2
    codes = dc.parse_codes("1:5 0:7", m, k)
    np.testing.assert_array_equal(codes, [7, 5, k])  # part 2 not named: K, "not present"
    np.testing.assert_array_equal(dc.code_rows(jnp.asarray(codes), k), [7, 5 + 13, 12 + 26])
    assert dc.format_codes(codes, k) == "0:7 1:5"
    out = np.asarray(dc.mapper_apply(params, jnp.asarray([codes]), k))
    assert out.shape == (1, m, d)
    t, pv, (l0, l1) = (np.asarray(params[x]) if x != "mlp" else params[x] for x in ("table", "part", "mlp"))
    x = t[[7, 18, 38]] + pv
    want = np.maximum(x @ np.asarray(l0["kernel"]) + np.asarray(l0["bias"]), 0) @ np.asarray(l1["kernel"])
    np.testing.assert_allclose(out[0], want + np.asarray(l1["bias"]), atol=1e-5)
    for bad in ("3:1", "0:13", "0:1 0:2", "a photo"):
        with pytest.raises(UserError):
            dc.parse_codes(bad, m, k)


def test_part_maps_average_cross_layers_at_the_side_only():
    onehot = dc.part_onehot(jnp.asarray([[0, 9, 8, 1]]), jnp.asarray([8, 9]))  # part 0 at position 2, part 1 at 1
    a = jnp.arange(4.0).reshape(1, 1, 1, 4) * jnp.ones((1, 2, 4, 4))
    maps = {"x/attn2": a, "y/attn2": 3 * a, "x/attn1": 100 * a, "z/attn2": jnp.ones((1, 2, 16, 4))}
    got = np.asarray(dc.part_maps(maps, onehot, side=2))
    np.testing.assert_allclose(got[0], [[4.0, 2.0]] * 4)  # mean of (1, 3) x key 2 and key 1
    with pytest.raises(UserError):
        dc.part_maps(maps, onehot, side=8)


def test_part_tokens_read_the_mapper_output_of_their_code():
    pipe = load_pipeline("shapes")
    te = pipe.text_encoders[0]
    tok, ids = tokens.add_tokens(pipe.tokenizers[0], dc.part_tokens("<part>", 3))
    mapper = dc.init_mapper(3, 12, 128, seed=3)
    x = jnp.asarray(tok(["a <part>_1 <part>_0"], padding="max_length", max_length=32).input_ids, jnp.int32)
    codes = jnp.asarray([[4, 9, 12]])
    got = dc.encode_parts(te, te.params, mapper, x, codes, jnp.asarray(ids), 12)
    rows = dc.mapper_apply(mapper, codes, 12)[0]  # token ids V, V+1, V+2 read rows 0, 1, 2
    np.testing.assert_allclose(got, tokens.encode(te, te.params, rows, x), atol=1e-5, rtol=0)


def test_kmeans_recovers_separated_clusters_and_maps_labels_to_them():
    rng = np.random.default_rng(0)
    centres = np.asarray([[0, 0], [10, 0], [0, 10]], np.float64)
    truth = np.repeat(np.arange(3), 20)
    x = centres[truth] + rng.normal(0, 0.5, (60, 2))
    found, _ = dd.kmeans(x, 3, seed=1)
    assert len(set(zip(truth, found))) == 3  # a one-to-one relabelling
    parts = {"parts": ["a"], "num_codes": 3, "labels": {}, "codes": {}}
    for i, (t, f) in enumerate(zip(truth, found)):
        parts["labels"][f"{i}"], parts["codes"][f"{i}"] = f"0:{t}", f"0:{f}"
    (to_code,) = dd.cluster_of_label(parts)
    np.testing.assert_array_equal(to_code[truth], found)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    images = tmp_path_factory.mktemp("parts")
    meta = dd.write_part_renders(images, 6, dd.held_out_pairs(0.3))
    assert len(meta["held_out"]) == 43  # 30 % of the 144 (left, right) combinations
    for code in meta["codes"].values():
        left, right, _ = dc.parse_codes(code, 3, 12)
        assert [left, right] not in meta["held_out"]
    out = tmp_path_factory.mktemp("runs") / "dreamcreature"
    config = "configs/personalize/dreamcreature.py:runlocal"
    args = ["personalize", "--config", config, "--images", str(images), "--token", "<part>", "--out", str(out), *FAST]
    assert cli.main(args) == 0
    return out


def test_only_the_mapper_and_the_lora_change_and_code_prompts_sample(run):
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == "dreamcreature" and report["steps"] == 3
    mapper, meta = dc.load_mapper(run)
    adapters = lora.from_flat(load_safetensors(run / "lora" / "adapters.safetensors", copy=True))
    assert report["trainable_params"] == lora.num_params(adapters) + sum(
        x.size for x in jax.tree_util.tree_leaves(mapper)
    )
    init = jax.tree_util.tree_leaves(dc.init_mapper(3, 12, 128, seed=0))
    assert all(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(jax.tree_util.tree_leaves(mapper), init))
    assert all(float(jnp.abs(a["up"]).max()) > 0 for a in adapters.values())  # every adapter moved off B = 0
    base = load_pipeline("shapes")
    personal, mapper2, meta2 = dc.load(run)
    assert meta2["tokens"] == ["<part>_0", "<part>_1", "<part>_2"]
    # the UNet is the frozen base plus the saved LoRA, the VAE and the text encoder (old rows) are untouched
    merged = lora.merge(base.unet.params, adapters, 1.0)
    close = jax.tree_util.tree_map(lambda a, b: np.allclose(a, b, atol=1e-6, rtol=0), personal.unet.params, merged)
    assert jax.tree_util.tree_all(close)
    assert same(personal.vae.params, base.vae.params)
    te_new, te_old = personal.text_encoders[0].params, base.text_encoders[0].params
    v = tokens.table_of(te_old).shape[0]
    np.testing.assert_array_equal(np.asarray(tokens.table_of(te_new))[:v], np.asarray(tokens.table_of(te_old)))
    rest = lambda p: {k: x for k, x in p["text_model"].items() if k != "embeddings"}  # noqa: E731
    assert same(rest(te_new), rest(te_old))
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    prompts = ["a 0:1 1:5 2:0", "a 0:6 1:5 2:0"]
    cond = dc.conditioning(personal, mapper2, meta2, prompts)
    assert cond.shape == (2, 32, 128) and float(jnp.abs(cond[0] - cond[1]).max()) > 0
    images = dc.sample(personal, mapper2, meta2, prompts, steps=3, guidance=2.0, latents=noise)
    assert images.shape == (2, 32, 32, 3)
    with pytest.raises(UserError, match="part tokens"):
        dc.conditioning(base, mapper2, meta2, prompts)
