"""Full DreamBooth with prior preservation (Ruiz et al. 2023; diffusers examples/dreambooth/train_dreambooth.py).

Objective: the same as `dreambooth_lora` (whose pieces this reuses): mean ε-MSE on instance captions naming the
token + `prior.weight` × mean ε-MSE on class examples the frozen model generated beforehand from `prior.prompts`,
one batch of two halves. What trains here is every UNet parameter (the paper's setting; the script's default
without --train_text_encoder); the identifier token is a new vocabulary row, drawn at random (`token_init`
"random", a rare token) or copied from a word, that trains only with `train_token`. The text encoder never trains,
so every old embedding row and every text-encoder weight stay bit-identical.

The frozen copy of the UNet is not kept in `frozen` (the prior examples were generated before training and the loss
only needs the trained copy), so full DreamBooth holds one UNet plus its optimizer state. Not kept:
--train_text_encoder, --snr_gamma, --offset_noise, the script's 8-bit Adam.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxdiff.personalize import dreambooth_lora, tokens
from jaxdiff.personalize.job import Job, Plan


def plan(job: Job) -> Plan:
    c = job.config
    te, unet = job.text_encoder, job.unet
    rows = tokens.init_rows(tokens.table_of(te.params), c.token_init, job.tokenizer, seed=int(c.seed))
    shared_loss, batch_fn = dreambooth_lora.instance_and_prior(job, lambda p, _frozen_unet: p["unet"])

    def loss(params, frozen, batch, rng):
        return shared_loss(params, {**frozen, "unet": None}, batch, rng)

    frozen = {"text_encoder": te.params}
    trainable = {"unet": True, "rows": bool(c.train_token)}
    return Plan({"unet": unet.params, "rows": rows}, trainable, loss, batch_fn, frozen)


def outputs(job: Job, trained: dict) -> dict:
    """{"rows": [1, D], "unet": the fine-tuned UNet, "trained_params"}."""
    rows = np.asarray(trained["rows"])
    n = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(trained["unet"]))
    return {"rows": rows, "unet": trained["unet"], "trained_params": n + (rows.size if job.config.train_token else 0)}
