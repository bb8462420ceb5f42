"""Placeholder tokens: new tokenizer entries, and new token-embedding rows as a separate leaf concatenated at lookup.

Training never touches the original table: the text encoder reads `concat([table, rows])[ids]` through its
`token_embeds=` input, so every existing row is bit-identical after any number of steps by construction (the
diffusers script instead restores them after each step, `index_no_updates`). The new ids are appended at the end of
the vocabulary (`len(tokenizer)`, ...), so every existing id is unchanged. `merge_rows` writes them into the table
(vocab_size grows) for a saved pipeline; `save_embeds` writes diffusers' `learned_embeds.safetensors` layout
({token: [num_vectors, D]}).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError

EMBEDS_FILE = "learned_embeds.safetensors"


def table_of(te_params) -> jax.Array:
    """The token-embedding table [V, D] of CLIP text-encoder params."""
    return te_params["text_model"]["embeddings"]["token_embedding"]["embedding"]


def token_ids(tokenizer, word: str) -> list[int]:
    """Ids of `word` without BOS/EOS."""
    return [int(i) for i in tokenizer(word).input_ids[1:-1]]


def check_new(tokenizer, tokens: Sequence[str]) -> None:
    """UserError when a placeholder is empty, has spaces, repeats, or is already one token of the vocabulary."""
    if len(set(tokens)) != len(tokens):
        raise UserError(f"placeholder tokens repeat: {list(tokens)}")
    vocab = tokenizer.get_vocab()
    for tok in tokens:
        if not tok or tok != tok.strip() or len(tok.split()) != 1:
            raise UserError(f"placeholder token {tok!r} must be one word without spaces")
        low = tok.lower()
        if any(k in vocab for k in (tok, low, low + "</w>")) or len(token_ids(tokenizer, tok)) == 1:
            raise UserError(f"token {tok!r} already exists in the tokenizer's vocabulary; choose another, e.g. '<v>'")


def add_tokens(tokenizer, tokens: Sequence[str]):
    """A copy of `tokenizer` with `tokens` appended as added tokens; (tokenizer, new ids). Existing ids unchanged."""
    check_new(tokenizer, tokens)
    tok = copy.deepcopy(tokenizer)
    start = len(tok)
    added = tok.add_tokens(list(tokens))
    ids = [int(tok.convert_tokens_to_ids(t)) for t in tokens]
    if added != len(tokens) or ids != list(range(start, start + len(tokens))):
        raise UserError(f"could not append {list(tokens)} to the tokenizer (got ids {ids}, expected from {start})")
    return tok, ids


def init_rows(table, init: str | Sequence[int], tokenizer=None, num: int = 1, seed: int = 0) -> jax.Array:
    """Initial rows [num, D]: the mean embedding of an init word's tokens (diffusers: the initializer token's row),
    or "random": Gaussian rows with the table's per-dimension std (a rare token, as DreamBooth's identifier)."""
    table = np.asarray(table, np.float32)
    if isinstance(init, str) and init == "random":
        rng = np.random.default_rng([seed, 31])
        rows = table.mean(0) + rng.standard_normal((num, table.shape[1])) * table.std(0)
        return jnp.asarray(rows, jnp.float32)
    ids = token_ids(tokenizer, init) if isinstance(init, str) else list(init)
    if not ids:
        raise UserError(f"the init word {init!r} has no tokens")
    return jnp.asarray(np.repeat(table[ids].mean(0, keepdims=True), num, 0), jnp.float32)


def lookup(table: jax.Array, rows: jax.Array, ids: jax.Array) -> jax.Array:
    """Token embeddings [B, L, D] of ids [B, L] in the table extended by `rows` (ids >= V read rows[id - V])."""
    return jnp.take(jnp.concatenate([table, rows.astype(table.dtype)]), ids, axis=0)


def encode(text_encoder, te_params, rows: jax.Array, ids: jax.Array) -> jax.Array:
    """SD conditioning [B, L, D] (last hidden state) of ids with the placeholder rows; differentiable in rows."""
    embeds = lookup(table_of(te_params), rows, ids)
    return text_encoder.apply(te_params, ids, token_embeds=embeds)["last_hidden_state"]


def merge_rows(te_params, rows) -> dict:
    """Text-encoder params with `rows` appended to the token table (the original rows are the same arrays)."""
    out = jax.tree_util.tree_map(lambda x: x, te_params)
    emb = out["text_model"]["embeddings"]["token_embedding"]
    emb["embedding"] = jnp.concatenate([emb["embedding"], jnp.asarray(rows, emb["embedding"].dtype)])
    return out


def with_vocab(text_encoder, te_params):
    """The text-encoder Model carrying `te_params` with its config's vocab_size set to the table's rows."""
    vocab = int(table_of(te_params).shape[0])
    config = {**text_encoder.config, "vocab_size": vocab}
    return dataclasses.replace(
        text_encoder, config=config, module=text_encoder.module.clone(config=config), params=te_params
    )


def save_embeds(path: str | os.PathLike, tokens: Sequence[str], rows) -> None:
    """diffusers' textual-inversion file: {token: [1, D]} per placeholder (one vector per token)."""
    from jaxdiff.convert.safetensors_io import write_safetensors

    rows = np.asarray(rows, np.float32)
    write_safetensors(Path(path), {t: rows[i : i + 1] for i, t in enumerate(tokens)}, metadata={"format": "pt"})


def load_embeds(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{token: [n, D]} from a learned_embeds.safetensors (diffusers' and this module's layout)."""
    from jaxdiff.convert.safetensors_io import load_safetensors

    out = {k: np.atleast_2d(np.asarray(v, np.float32)) for k, v in load_safetensors(path, copy=True).items()}
    if not out:
        raise UserError(f"{path} holds no embeddings")
    return out


def add_to_pipeline(pipe, embeds: dict[str, np.ndarray]):
    """A new Pipeline whose tokenizer knows the tokens and whose text encoder has their rows (one vector each)."""
    if pipe.is_sdxl:
        raise UserError("placeholder tokens are supported for SD 1.x/2.x pipelines (one text encoder)")
    tokens = list(embeds)
    rows = np.concatenate([embeds[t][:1] for t in tokens])
    encoder = pipe.text_encoders[0]
    if rows.shape[1] != table_of(encoder.params).shape[1]:
        raise UserError(f"embeddings have width {rows.shape[1]}, the text encoder {table_of(encoder.params).shape[1]}")
    tokenizer, ids = add_tokens(pipe.tokenizers[0], tokens)
    if ids[0] != table_of(encoder.params).shape[0]:
        raise UserError(f"the tokenizer has {ids[0]} entries but the token table {table_of(encoder.params).shape[0]}")
    encoder = with_vocab(encoder, merge_rows(encoder.params, rows))
    return dataclasses.replace(pipe, text_encoders=[encoder], tokenizers=[tokenizer], _compiled={})
