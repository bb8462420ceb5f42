"""Custom Diffusion (Kumari et al. 2023; diffusers examples/custom_diffusion/train_custom_diffusion.py): the new
token's embedding row and the cross-attention key/value projections train, with prior preservation.

What trains (`freeze_model`): "crossattn_kv" (default, the script's) = attn2.to_k and attn2.to_v kernels of every
transformer block; "crossattn" adds attn2.to_q and attn2.to_out_0. The token's row starts at an init word's
embedding (the script's "ktn"; `init_word`) and is its own leaf, so every other row stays bit-identical (the script
zeroes their gradients). Objective: the DreamBooth ε-MSE on instance captions + `prior.weight` × ε-MSE on class
images the frozen model generated from `prior.prompts` (`dreambooth_lora.prior_data`, shared). Learning rate: the
script's 1e-5 × batch (× 2 with prior: `--scale_lr`), done in the config. Not kept: the random rescale/zoom
augmentation with its masked loss and caption prefixes (a shapes object's size is part of its caption), detaching
the start token's key and value (it needs a per-position hook in the attention; the row of the start token does
not train here either way).

`binding.weight` > 0 adds T2I-Zero's supervised contrastive binding term on the instance half
(`jaxdiff.personalize.binding`, UNVERIFIED form; off by default).
"""

from __future__ import annotations

import numpy as np

from jaxdiff import selectors
from jaxdiff.errors import UserError
from jaxdiff.personalize import binding, dreambooth_lora, tokens
from jaxdiff.personalize.job import Job, Plan

FREEZE_MODELS = {
    "crossattn_kv": lambda path: "attn2" in path and path[-2] in ("to_k", "to_v") and path[-1] == "kernel",
    "crossattn": lambda path: "attn2" in path and path[-2] in ("to_q", "to_k", "to_v", "to_out_0"),
}


def _selector(name: str):
    if name not in FREEZE_MODELS:
        raise UserError(f"config.freeze_model {name!r} is unknown; choose from {', '.join(FREEZE_MODELS)}")
    rule = FREEZE_MODELS[name]
    return lambda path_string, leaf: rule(tuple(path_string.split("/")))


def plan(job: Job) -> Plan:
    c = job.config
    te, unet = job.text_encoder, job.unet
    rows = tokens.init_rows(tokens.table_of(te.params), c.init_word, job.tokenizer, seed=int(c.seed))
    attention, _ = selectors.split(unet.params, _selector(str(c.freeze_model)))
    loss, batch_fn = dreambooth_lora.instance_and_prior(
        job,
        lambda p, frozen_unet: selectors.combine(p["attention"], frozen_unet),
        c.get("binding") or binding.config_block(),
    )
    frozen = {"unet": unet.params, "text_encoder": te.params}
    return Plan({"attention": attention, "rows": rows}, None, loss, batch_fn, frozen)


def outputs(job: Job, trained: dict) -> dict:
    """{"rows": [1, D], "unet": the UNet with the trained projections, "trained_params"}."""
    rows = np.asarray(trained["rows"])
    n = sum(int(np.size(v)) for v in selectors.flatten(trained["attention"]).values())
    return {
        "rows": rows,
        "unet": selectors.combine(trained["attention"], job.unet.params),
        "trained_params": n + rows.size,
    }
