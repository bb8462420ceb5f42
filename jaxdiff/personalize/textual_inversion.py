"""Textual Inversion (Gal et al. 2023): learn only the placeholder token's embedding row with the frozen model.

Objective: the DDPM ε-MSE of the frozen UNet conditioned on captions naming the token ("a {}", or each image's
caption file), differentiated in the new row only; the table's other rows are a different leaf, so they cannot move
(diffusers restores them after every step instead). Options kept from the official script (diffusers
examples/textual_inversion): the row starts at an init word's embedding (`init_word`; the mean of its tokens when it
has several), AdamW with weight decay on the row, constant lr. Not kept: random flips by default (`flip` 0: a flip
moves a shapes object to the other side of its caption's position), `num_vectors` > 1.

`binding.weight` > 0 adds T2I-Zero's supervised contrastive binding term (`jaxdiff.personalize.binding`, UNVERIFIED
form; off by default).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.personalize import binding, losses, tokens
from jaxdiff.personalize.job import Job, Plan


def plan(job: Job) -> Plan:
    c = job.config
    te, unet = job.text_encoder, job.unet
    rows = tokens.init_rows(tokens.table_of(te.params), c.init_word, job.tokenizer, seed=int(c.seed))
    acp = job.alphas_cumprod()
    gamma = float(c.snr_gamma)
    bind = c.get("binding") or binding.config_block()
    eos = int(job.tokenizer.eos_token_id)

    def loss(params, frozen, batch, rng):
        rows = params["personal"]["rows"]
        context = tokens.encode(te, frozen["text_encoder"], rows, batch["ids"])
        apply = lambda x, t, ctx: unet.apply(frozen["unet"], x, t, ctx)  # noqa: E731
        per = losses.eps_mse(apply, acp, batch["latents"], context, rng, gamma)
        aux = {"row_norm": jnp.linalg.norm(rows)}
        inputs = dict(rows=rows, context=context, ids=batch["ids"], placeholder_ids=job.new_ids, eos_id=eos)
        return binding.add(jnp.mean(per), aux, bind, **inputs)

    frozen = {"unet": unet.params, "text_encoder": te.params}
    batch = int(c.train.batch_size)
    return Plan({"rows": rows}, None, loss, lambda s: job.instance_batch(s, batch), frozen)


def outputs(job: Job, trained: dict) -> dict:
    """{"rows": [1, D], "unet": the unchanged UNet params, "trained_params"}."""
    rows = np.asarray(trained["rows"])
    return {"rows": rows, "unet": job.unet.params, "trained_params": rows.size}
