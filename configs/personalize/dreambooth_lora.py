# COMMAND: jaxdiff personalize --config configs/personalize/dreambooth_lora.py:shapes --images DIR --token "<v>" \
#   --out runs/dreambooth_lora
# DreamBooth-LoRA with prior preservation (Ruiz et al. 2023), defaults of diffusers' train_dreambooth_lora.py:
# rank 4, alpha = rank, Gaussian A, lr 1e-4 AdamW, prior weight 1, 100 class images. ":shapes" sizes it for the tiny
# shapes model on a CPU (class prompts from the world's captions, lr 3e-3, 1000 steps); ":runlocal" is a smoke run.
"""DreamBooth-LoRA; see jaxdiff/personalize/dreambooth_lora.py for the objective and the options."""

import ml_collections

from jaxdiff.errors import UserError
from jaxdiff.lora import ATTENTION
from jaxdiff.personalize.config import base_config, train_block


def get_config(arg: str = ""):
    c = base_config("dreambooth_lora")
    c.token_init = "random"  # "random" (a rare token) or a word whose embedding the token's row copies
    c.train_token = False  # also train the token's row (DreamBooth leaves the text side alone)
    c.lora = ml_collections.ConfigDict(dict(rank=4, alpha=4.0, init="gaussian", targets=ATTENTION))
    c.prior = ml_collections.ConfigDict(dict(weight=1.0, num_images=100, prompts="a photo of an object"))
    c.train = train_block(steps=800, learning_rate=1e-4, batch_size=2, weight_decay=1e-2)
    for variant in filter(None, arg.split(",")):
        if variant == "shapes":
            c.prior.update(prompts="world", num_images=128)
            c.train.update(steps=1000, learning_rate=3e-3, batch_size=8, log_every=50)
        elif variant == "runlocal":
            c.prior.num_images = 4
            c.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=0)
            c.sample.num_images = 2
        else:
            raise UserError(f"unknown dreambooth_lora config variant {variant!r} (shapes, runlocal)")
    return c
