"""Textual Inversion (Gal et al. 2023): learn only the placeholder token's embedding row with the frozen model.

Objective: the DDPM ε-MSE of the frozen UNet conditioned on captions naming the token ("a {}", or each image's
caption file), differentiated in the new row only; the table's other rows are a different leaf, so they cannot move
(diffusers restores them after every step instead). Options kept from the official script (diffusers
examples/textual_inversion): the row starts at an init word's embedding (`init_word`; the mean of its tokens when it
has several), AdamW with weight decay on the row, constant lr. Not kept: random flips by default (`flip` 0: a flip
moves a shapes object to the other side of its caption's position), `num_vectors` > 1.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.personalize import losses, tokens
from jaxdiff.personalize.job import Job, Plan


def plan(job: Job) -> Plan:
    c = job.config
    te, unet = job.text_encoder, job.unet
    rows = tokens.init_rows(tokens.table_of(te.params), c.init_word, job.tokenizer, seed=int(c.seed))
    acp = job.alphas_cumprod()
    gamma = float(c.snr_gamma)

    def loss(params, frozen, batch, rng):
        context = tokens.encode(te, frozen["text_encoder"], params["personal"]["rows"], batch["ids"])
        apply = lambda x, t, ctx: unet.apply(frozen["unet"], x, t, ctx)  # noqa: E731
        per = losses.eps_mse(apply, acp, batch["latents"], context, rng, gamma)
        return jnp.mean(per), {"row_norm": jnp.linalg.norm(params["personal"]["rows"])}

    frozen = {"unet": unet.params, "text_encoder": te.params}
    batch = int(c.train.batch_size)
    return Plan({"rows": rows}, None, loss, lambda s: job.instance_batch(s, batch), frozen)


def outputs(job: Job, trained: dict) -> dict:
    """{"rows": [1, D], "unet": the unchanged UNet params, "trained_params"}."""
    rows = np.asarray(trained["rows"])
    return {"rows": rows, "unet": job.unet.params, "trained_params": rows.size}
