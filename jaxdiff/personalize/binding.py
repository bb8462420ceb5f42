"""T2I-Zero's "binding" loss for personalization: a supervised contrastive term on the learned tokens' embeddings.

Source: only a reviewer's summary of the withdrawn ICLR'24 submission (§4.2 adds a *supervised contrastive loss*
for multi-concept personalization); no code. Everything below is UNVERIFIED beyond "SupCon" (spec §1, §10.1).

The loss is SupCon (Khosla et al. 2020, eq. 2, L^sup_out) on L2-normalised features z with labels y:

    L = mean over anchors i with P(i) ≠ ∅ of  −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) )

with A(i) every valid item but i and P(i) those of A(i) with i's label. Items labelled −1 are negatives only: they
sit in every denominator but are never anchors or positives.

Which embeddings (`binding.features`; the spec's default is "SupCon over the learned token embeddings,
positives = same concept"). With one vector per concept, the learned rows alone give no positive pair, so:

- "context" (default, the choice made here, UNVERIFIED): the text encoder's output at each placeholder position of
  the step's captions, i.e. the learned token's embedding as the UNet reads it, in different caption contexts.
  Anchors and positives: the placeholder positions of the same token across the batch ("a <v>", "a picture of a
  <v>", ...); negatives: the other placeholders' positions and every other word of the captions (BOS, EOS and
  padding excluded). The term pulls one concept's token to one representation whatever its context and pushes it
  away from the words it appears with and from the other concepts: binding, against concept dominance.
- "rows": the learned rows themselves [K, D], labels = concept; with one row per concept there are no positives
  and the term is 0 (it is meant for several vectors per concept).

Weight (spec's proposal 0.1) and temperature (0.07, SupCon's) are config options; `binding.weight` 0 (default)
adds nothing to the objective (the term is not even traced). The term depends on the trainable params only through
the placeholder rows (the text encoder is frozen), so with Custom Diffusion it moves the rows and never the K/V.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff.errors import UserError

FEATURES = ("context", "rows")


def config_block() -> ml_collections.ConfigDict:
    """The `binding` block of the TI and Custom Diffusion configs (weight 0: off)."""
    return ml_collections.ConfigDict(dict(weight=0.0, temperature=0.07, features="context"))


def supcon(features: jax.Array, labels: jax.Array, temperature: float = 0.07, valid: jax.Array | None = None):
    """Supervised contrastive loss (L^sup_out) of features [N, D] with integer labels [N] (−1: negative only) and an
    optional validity mask [N]; anchors without a positive are left out; 0 when no anchor has one."""
    z = features.astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    n = z.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    logits = (z @ z.T) / temperature
    others = valid[:, None] & valid[None, :] & ~jnp.eye(n, dtype=bool)  # A(i)
    labelled = labels >= 0
    pos = others & (labels[:, None] == labels[None, :]) & labelled[:, None] & labelled[None, :]  # P(i)
    log_den = jax.nn.logsumexp(jnp.where(others, logits, -1e9), axis=1)  # finite fill: no NaN gradients
    log_prob = jnp.where(pos, logits - log_den[:, None], 0.0)
    num_pos = pos.sum(1)
    per_anchor = -log_prob.sum(1) / jnp.maximum(num_pos, 1)
    anchors = (num_pos > 0) & valid
    return jnp.sum(jnp.where(anchors, per_anchor, 0.0)) / jnp.maximum(anchors.sum(), 1)


def context_items(context: jax.Array, ids: jax.Array, placeholder_ids: Sequence[int], eos_id: int):
    """(features [B·L, D], labels [B·L], valid [B·L]) of "context" mode: label k at positions holding placeholder
    k, −1 at the caption's other words; BOS (position 0), the first EOS and everything after it are invalid."""
    b, length = ids.shape
    pos = jnp.arange(length)[None, :]
    first_eos = jnp.where((ids == eos_id).any(1), jnp.argmax(ids == eos_id, axis=1), length)
    valid = (pos > 0) & (pos < first_eos[:, None])
    labels = jnp.full(ids.shape, -1, jnp.int32)
    for k, tid in enumerate(placeholder_ids):
        labels = jnp.where(ids == int(tid), k, labels)
    return context.reshape(b * length, -1), labels.reshape(-1), valid.reshape(-1)


def term(
    config, *, rows: jax.Array, context: jax.Array, ids: jax.Array, placeholder_ids: Sequence[int], eos_id: int
) -> jax.Array:
    """The unweighted binding loss of one step from the `binding` config block; rows [K, D] (row k = concept k)."""
    features, temperature = str(config.features), float(config.temperature)
    if not temperature > 0:
        raise UserError(f"binding.temperature must be > 0, got {temperature}")
    if features == "context":
        f, labels, valid = context_items(context, ids, placeholder_ids, eos_id)
        return supcon(f, labels, temperature, valid)
    if features == "rows":
        return supcon(rows, jnp.arange(rows.shape[0]) % max(len(placeholder_ids), 1), temperature)
    raise UserError(f"binding.features {features!r} is unknown; choose from {', '.join(FEATURES)}")


def add(objective: jax.Array, aux: dict, config, **inputs) -> tuple[jax.Array, dict]:
    """objective + weight · term, with aux["binding"]; with weight 0 the objective is returned as it is."""
    weight = float(config.weight)
    if weight == 0:
        return objective, aux
    b = term(config, **inputs)
    return objective + weight * b, {**aux, "binding": b}
