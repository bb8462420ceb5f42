# COMMAND: jaxdiff personalize --config configs/personalize/custom_diffusion.py:shapes --images DIR --token "<v>" \
#   --out runs/custom_diffusion
# Custom Diffusion (Kumari et al. 2023), defaults of diffusers' examples/custom_diffusion README: attn2 to_k/to_v and
# the token's row train, AdamW, lr 1e-5 x batch 2 x 2 (prior) = 4e-5, 250 steps, 200 prior images, weight 1.
# ":shapes" sizes it for the tiny shapes model on a CPU (class prompts from the world's captions, init word "shape",
# lr 1e-3, 400 steps); ":runlocal" is a smoke run.
"""Custom Diffusion; see jaxdiff/personalize/custom_diffusion.py for the objective and the options."""

import ml_collections

from jaxdiff.errors import UserError
from jaxdiff.personalize import binding
from jaxdiff.personalize.config import base_config, train_block


def get_config(arg: str = ""):
    c = base_config("custom_diffusion")
    c.init_word = "object"  # the script's "ktn"; the row starts at this word's embedding
    c.freeze_model = "crossattn_kv"  # crossattn_kv | crossattn (adds to_q and to_out)
    c.prior = ml_collections.ConfigDict(dict(weight=1.0, num_images=200, prompts="a photo of an object"))
    c.binding = binding.config_block()  # T2I-Zero's binding term: weight > 0 (spec's proposal 0.1) turns it on
    c.train = train_block(steps=250, learning_rate=4e-5, batch_size=2, weight_decay=1e-2)
    for variant in filter(None, arg.split(",")):
        if variant == "shapes":
            c.init_word = "shape"
            c.prior.update(prompts="world", num_images=128)
            c.train.update(steps=400, learning_rate=1e-3, batch_size=8, log_every=50)
        elif variant == "runlocal":
            c.prior.num_images = 4
            c.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=0)
            c.sample.num_images = 2
        else:
            raise UserError(f"unknown custom_diffusion config variant {variant!r} (shapes, runlocal)")
    return c
