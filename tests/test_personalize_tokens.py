"""Placeholder tokens: appended tokenizer ids, a separate embedding leaf that leaves every other row bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.data import shapes as S
from jaxdiff.errors import UserError
from jaxdiff.personalize import tokens
from jaxdiff.sampling import text
from jaxdiff.sampling.pipeline import BUILTIN, load_pipeline


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("shapes")


def _world_captions(n=200):
    rng = np.random.default_rng(0)
    return [S.caption(S.sample_scene(rng), rng, split) for split in ("train", "heldout") for _ in range(n // 2)]


def test_tokenizer_appends_the_token_and_keeps_every_existing_id(tmp_path):
    base = text.load_tokenizer(BUILTIN["shapes"] / "tokenizer")
    tok, ids = tokens.add_tokens(base, ["<v>"])
    assert ids == [len(base)] and len(tok) == len(base) + 1
    prompts = _world_captions()
    np.testing.assert_array_equal(text.tokenize(tok, prompts), text.tokenize(base, prompts))
    assert tok("a red <v> on the left").input_ids[2:4] == [base("a red").input_ids[2], ids[0]]
    tok.save_pretrained(str(tmp_path))  # what OUT/model/tokenizer holds
    again = text.load_tokenizer(tmp_path)
    np.testing.assert_array_equal(
        text.tokenize(again, prompts + ["a red <v>"]), text.tokenize(tok, prompts + ["a red <v>"])
    )
    assert len(base) == 308  # the original is untouched


@pytest.mark.parametrize("token", ["red", "circle", "Red", "", "two words"])
def test_a_token_already_in_the_vocabulary_or_not_one_word_is_refused(token):
    base = text.load_tokenizer(BUILTIN["shapes"] / "tokenizer")
    with pytest.raises(UserError):
        tokens.add_tokens(base, [token])


def test_lookup_of_existing_ids_is_the_encoder_itself(pipe):
    te = pipe.text_encoders[0]
    ids = jnp.asarray(text.tokenize(pipe.tokenizers[0], _world_captions(16)))
    rows = jnp.ones((1, 128), jnp.float32)
    plain = te.apply(te.params, ids)["last_hidden_state"]
    np.testing.assert_array_equal(np.asarray(tokens.encode(te, te.params, rows, ids)), np.asarray(plain))


def test_training_the_row_leaf_leaves_every_other_row_bit_identical(pipe):
    """AdamW with weight decay (which would shrink every row of a trained table) on the separate leaf: after the
    updates the merged table's first V rows are the original bits, the new row moved."""
    te = pipe.text_encoders[0]
    tok, (new,) = tokens.add_tokens(pipe.tokenizers[0], ["<v>"])
    ids = jnp.asarray(text.tokenize(tok, ["a red <v>", "a <v> on the left", "a blue circle"]))
    table = tokens.table_of(te.params)
    rows = tokens.init_rows(table, "shape", tok)
    target = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 128))
    tx = optax.adamw(1e-2, weight_decay=0.1)

    @jax.jit
    def update(rows, opt):
        g = jax.grad(lambda r: jnp.mean((tokens.encode(te, te.params, r, ids) - target) ** 2))(rows)
        u, opt = tx.update(g, opt, rows)
        return optax.apply_updates(rows, u), opt

    start, opt = rows, tx.init(rows)
    for _ in range(3):
        rows, opt = update(rows, opt)
    merged = tokens.table_of(tokens.merge_rows(te.params, rows))
    assert merged.shape == (table.shape[0] + 1, table.shape[1]) and new == table.shape[0]
    np.testing.assert_array_equal(np.asarray(merged[:new]), np.asarray(table))
    assert not np.array_equal(np.asarray(merged[new]), np.asarray(start[0]))


def test_add_to_pipeline_encodes_the_token_with_its_row(pipe):
    te = pipe.text_encoders[0]
    row = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
    personal = tokens.add_to_pipeline(pipe, {"<v>": row})
    assert personal.text_encoders[0].config["vocab_size"] == 309 and len(pipe.tokenizers[0]) == 308
    ids = text.tokenize(personal.tokenizers[0], ["a red <v>"])
    expected = tokens.encode(te, te.params, jnp.asarray(row), jnp.asarray(ids))
    got, _ = personal.encode_prompts(["a red <v>"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)
