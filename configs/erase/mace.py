# COMMAND: jaxdiff erase --config configs/erase/mace.py --config.concept=circle --config.anchor=square \
#   --out runs/mace_circle
# MACE (Lu et al. 2024), closed-form refinement only: residual tokens of the concept's prompts mapped onto the
# anchor-substituted prompts, λ 0, preservation cache of captions (COCO in the paper; the preserve prompts and
# templates here) with ρ 7e-7 applied twice (official quirk, squared). The per-concept LoRA stage is not
# implemented; `jaxdiff.erase.mace.fuse` does the closed-form LoRA fusion. ":runlocal": the same, tiny model.
"""MACE CFR; see jaxdiff/erase/mace.py."""

from jaxdiff.erase.config import base_config
from jaxdiff.errors import UserError


def get_config(arg: str = ""):
    c = base_config("mace")
    c.templates = ("{}", "a photo of {}", "an image of {}")
    c.mace = dict(
        lam=0.0, preserve_scale=7e-7, square_preserve_scale=True, with_to_k=True, cache_prompts=""
    )  # ";"-separated captions for the preservation cache ("" = templates × preserve)
    for variant in filter(None, arg.split(",")):
        if variant == "runlocal":
            pass
        elif variant == "shapes":
            c.num_prompts = 8
            c.templates = ("{}",)
            c.mace.preserve_scale = 1e-3
            # λ = 0 on this ~100-token cache is a near-singular solve (condition number ≈ 9e10, refused by
            # erase.ridge); λ = 0.01 gives ≈ 2.4e6 (measured: concept circle, anchor square).
            c.mace.lam = 0.01
        else:
            raise UserError(f"unknown mace config variant {variant!r} (runlocal, shapes)")
    return c
