# COMMAND: jaxdiff personalize --config configs/personalize/textual_inversion.py:shapes --images DIR --token "<v>" \
#   --out runs/textual_inversion
# Textual Inversion (Gal et al. 2023), defaults of diffusers' examples/textual_inversion README: AdamW lr 5e-4 (their
# 5e-4 x scale_lr), wd 1e-2, constant lr, 3000 steps, one vector initialised from an init word. ":shapes" sizes it for
# the tiny shapes model on a CPU (init word "shape", lr 1e-2, 1500 steps); ":runlocal" is a seconds-long smoke run.
"""Textual Inversion; see jaxdiff/personalize/textual_inversion.py for the objective and the options."""

from jaxdiff.errors import UserError
from jaxdiff.personalize import binding
from jaxdiff.personalize.config import base_config, train_block


def get_config(arg: str = ""):
    c = base_config("textual_inversion")
    c.init_word = "object"  # the new row starts at this word's embedding (mean of its tokens)
    c.snr_gamma = 0.0  # > 0: min-SNR-γ weights
    c.binding = binding.config_block()  # T2I-Zero's binding term: weight > 0 (spec's proposal 0.1) turns it on
    c.train = train_block(steps=3000, learning_rate=5e-4, batch_size=4)
    for variant in filter(None, arg.split(",")):
        if variant == "shapes":
            c.init_word = "shape"
            c.train.update(steps=1500, learning_rate=1e-2, batch_size=8, log_every=50)
        elif variant == "runlocal":
            c.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=0)
            c.sample.num_images = 2
        else:
            raise UserError(f"unknown textual_inversion config variant {variant!r} (shapes, runlocal)")
    return c
