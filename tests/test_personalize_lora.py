"""LoRA: targets, a zero-up adapter is the identity, merging equals the side branch, the file round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import lora
from jaxdiff.sampling.pipeline import load_pipeline
from jaxdiff.selectors import flatten

CLIP_ATTENTION = r"self_attn/(q_proj|k_proj|v_proj|out_proj)/kernel$"


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("shapes")


def _nonzero(adapters, seed=0):
    rng = np.random.default_rng(seed)
    return {
        n: {k: jnp.asarray(rng.standard_normal(v.shape) * 0.05, jnp.float32) for k, v in a.items()}
        for n, a in adapters.items()
    }


def test_default_targets_are_the_unet_attention_projections(pipe):
    names = lora.targets(pipe.unet.params)
    attn = {
        "/".join(p[:-1])
        for p in flatten(pipe.unet.params)
        if p[-1] == "kernel" and len(p) > 2 and p[-3] in ("attn1", "attn2")
    }
    # q, k, v, out of attn1 and attn2 in the shapes UNet's 10 transformers: 3 down blocks x 1, the mid block, 3 up
    # blocks x 2 (attention at every resolution since the v2 teacher)
    assert set(names) == attn and len(names) == 4 * 2 * 10


def test_a_fresh_adapter_merges_to_the_same_bits(pipe):
    adapters = lora.init(pipe.unet.params, rank=4)
    merged = lora.merge(pipe.unet.params, adapters, 1.0)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(pipe.unet.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_merge_equals_the_side_branch_on_the_text_encoder(pipe):
    te = pipe.text_encoders[0]
    adapters = _nonzero(lora.init(te.params, CLIP_ATTENTION, rank=3, init="kaiming"))
    assert len(adapters) == 4 * 3
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 308, (2, 32)), jnp.int32)
    scale = 0.7
    run = jax.jit(lambda f, p: f(p, ids)["last_hidden_state"], static_argnums=0)
    merged = run(te.apply, lora.merge(te.params, adapters, scale))
    side = run(lora.side_branch(te.apply, adapters, scale), te.params)
    plain = run(te.apply, te.params)
    np.testing.assert_allclose(np.asarray(side), np.asarray(merged), atol=2e-5)  # float32 reassociation only
    assert float(jnp.max(jnp.abs(merged - plain))) > 1e-2  # the adapters do change the output


def test_adapter_file_layout_round_trips(pipe):
    adapters = _nonzero(lora.init(pipe.unet.params, rank=2))
    back = lora.from_flat(lora.to_flat(adapters))
    assert back.keys() == adapters.keys()
    for name in adapters:
        for k in ("down", "up"):
            np.testing.assert_array_equal(np.asarray(back[name][k]), np.asarray(adapters[name][k]))
    with pytest.raises(ValueError, match="not a jaxdiff LoRA key"):
        lora.from_flat({"a/b/lora_A": np.zeros(2)})


def test_apply_adds_a_saved_runs_token_and_merges_its_lora(pipe, tmp_path):
    import ml_collections

    from jaxdiff.personalize import run, tokens

    adapters = _nonzero(lora.init(pipe.unet.params, rank=2))
    config = ml_collections.ConfigDict(dict(lora=dict(rank=2, alpha=1.0, targets=lora.ATTENTION)))
    row = np.random.default_rng(3).standard_normal((1, 128)).astype(np.float32)
    tokens.save_embeds(tmp_path / tokens.EMBEDS_FILE, ["<v>"], row)
    run._save_lora(tmp_path / run.LORA_DIR, adapters, 0.5, config)
    personal = run.apply(pipe, tmp_path, multiplier=2.0)
    expected = lora.merge(pipe.unet.params, adapters, 1.0)  # multiplier 2 x scale 0.5
    for a, b in zip(jax.tree_util.tree_leaves(personal.unet.params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(tokens.table_of(personal.text_encoders[0].params))[-1], row[0])
    assert personal.tokenizers[0].convert_tokens_to_ids("<v>") == 308
