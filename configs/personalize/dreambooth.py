# COMMAND: jaxdiff personalize --config configs/personalize/dreambooth.py:shapes --images DIR --token "<v>" \
#   --out runs/dreambooth
# Full DreamBooth with prior preservation (Ruiz et al. 2023), defaults of diffusers' train_dreambooth.py README
# (prior-preservation example): every UNet parameter trains, lr 5e-6 AdamW, batch 1, 400 steps, prior weight 1,
# 200 class images. ":shapes" sizes it for the tiny shapes model on a CPU (class prompts from the world's captions,
# lr 1e-4, 400 steps); ":runlocal" is a smoke run.
"""Full DreamBooth; see jaxdiff/personalize/dreambooth.py for the objective and the options."""

import ml_collections

from jaxdiff.errors import UserError
from jaxdiff.personalize.config import base_config, train_block


def get_config(arg: str = ""):
    c = base_config("dreambooth")
    c.token_init = "random"  # "random" (a rare token) or a word whose embedding the token's row copies
    c.train_token = False  # also train the token's row (the text encoder itself never trains)
    c.prior = ml_collections.ConfigDict(dict(weight=1.0, num_images=200, prompts="a photo of an object"))
    c.train = train_block(steps=400, learning_rate=5e-6, batch_size=1, weight_decay=1e-2)
    for variant in filter(None, arg.split(",")):
        if variant == "shapes":
            c.prior.update(prompts="world", num_images=128)
            c.train.update(steps=400, learning_rate=1e-4, batch_size=8, log_every=50)
        elif variant == "runlocal":
            c.prior.num_images = 4
            c.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=0)
            c.sample.num_images = 2
        else:
            raise UserError(f"unknown dreambooth config variant {variant!r} (shapes, runlocal)")
    return c
