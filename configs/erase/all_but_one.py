# COMMAND: jaxdiff erase --config configs/erase/all_but_one.py --config.concept=circle --out runs/abo_circle
# All but One (Hong et al. 2024), jaxdiff's reconstruction (no official code): replace the guidance term
# ε_θ(c*) − ε_θ(∅) by s·(ε*(c_alt) − ε*(∅)) and constrain the unconditional drift ||ε_θ(∅) − ε*(∅)||² (λ 1).
# c_alt = anchor ("" by default). x_t from the frozen model, CFG 3, DDIM 50, exact timesteps; attn2 trains;
# Adam lr 1e-5, 1000 steps (ESD's budget; the paper's are unknown). ":runlocal": 5 steps.
"""All but One; see jaxdiff/erase/all_but_one.py for the exact objective."""

from jaxdiff.erase.config import base_config, train_block
from jaxdiff.errors import UserError


def get_config(arg: str = ""):
    c = base_config("all_but_one")
    c.all_but_one = dict(
        drift_weight=1.0, guidance_target_scale=1.0, start_guidance=3.0, ddim_steps=50, sampler="frozen"
    )
    c.train = train_block(steps=1000, learning_rate=1e-5, batch_size=1, selector="xattn")
    for variant in filter(None, arg.split(",")):
        if variant == "shapes":
            c.num_prompts = 8
            c.all_but_one.update(start_guidance=5.0, ddim_steps=25)
            c.train.update(steps=400, learning_rate=5e-4, log_every=50)
        elif variant == "runlocal":
            c.all_but_one.ddim_steps = 4
            c.train.update(steps=5, log_every=1)
        else:
            raise UserError(f"unknown all_but_one config variant {variant!r} (runlocal, shapes)")
    return c
