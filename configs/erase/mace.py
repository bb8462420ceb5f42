# COMMAND: jaxdiff erase --config configs/erase/mace.py --config.concept=circle --config.anchor=square \
#   --out runs/mace_circle
# COMMAND: jaxdiff erase --config configs/erase/mace.py:cfr --config.concept=circle --config.anchor=square \
#   --out runs/mace_cfr_circle
# COMMAND: jaxdiff erase --config configs/erase/mace.py:shapes --config.concept=circle --config.anchor=square \
#   --out runs/mace_shapes_circle
# MACE (Lu et al. 2024), all three stages (`stages="full"`): (1) closed-form refinement: residual tokens of the
# concept's prompts mapped onto the anchor-substituted prompts, λ 0, preservation cache of captions (COCO in the
# paper; the preserve prompts and templates here) with ρ 7e-7 applied twice (official quirk, squared); (2) one
# rank-1 LoRA per concept on attn2 to_k/to_v, trained on the attention loss over the concept's masked images
# (official: AdamW lr 1e-5 constant, clip 1, batch 1, 120 steps, importance sampling); (3) closed-form fusion of
# the LoRAs onto the CFR weights (ρ_f 7e-7, once). The `shapes` model trains on renders with their exact masks;
# other models need `lora.data_dir` (<dir>/<concept>/*.png, masks/<same name>, optional prompts.txt).
# ":cfr" ("mace-cfr", `--config.stages=cfr`): the closed-form refinement alone, as before. ":shapes": the tiny
# model's settings (CFR λ 8 and ρ 1, fusion λ 8 and ρ_f 0.1, LoRA lr 1e-4). ":runlocal": a seconds-long smoke run.
"""MACE; see jaxdiff/erase/mace.py."""

from jaxdiff.erase.config import OTHER_ANCHOR, base_config, train_block
from jaxdiff.errors import UserError


def get_config(arg: str = ""):
    c = base_config("mace")
    c.templates = ("{}", "a photo of {}", "an image of {}")
    c.stages = "full"  # full: CFR -> per-concept LoRA -> fusion; cfr: the closed-form refinement alone
    c.mace = dict(
        lam=0.0, preserve_scale=7e-7, square_preserve_scale=True, with_to_k=True, cache_prompts=""
    )  # ";"-separated captions for the preservation cache ("" = templates × preserve)
    c.lora = dict(
        rank=1,
        importance_sampling=True,  # t ∝ σ(0.05(t − 200)) − σ(0.05(t − 400)); False: uniform
        no_real_image=False,  # True: noise added to zeros instead of the images' latents (official option)
        num_images=32,  # shapes model: renders of the concept (with exact masks) per concept
        data_dir="",  # other models: <dir>/<concept>/*.png, <dir>/<concept>/masks/<same name>, prompts.txt
        eval_examples=16,  # report the mean attention loss before/after on this many fixed draws (0: off)
        fuse_preserve_scale=7e-7,  # ρ_f of the fusion (applied once)
        fuse_lam=0.0,  # λ of the fusion (times the CFR weights)
    )
    # The LoRA's optimisation: official AdamW lr 1e-5, constant, max grad norm 1, batch 1, 120 steps.
    c.train = train_block(
        steps=120,
        learning_rate=1e-5,
        batch_size=1,
        selector="esd-x-strict",
        optimizer="adamw",
        weight_decay=1e-2,
        max_grad_norm=1.0,
    )
    for variant in filter(None, arg.split(",")):
        if variant == "cfr":
            c.stages = "cfr"
        elif variant == "runlocal":
            c.lora.update(num_images=2, eval_examples=0)
            c.train.update(steps=2, log_every=1)
        elif variant == "shapes":
            c.num_prompts = 8
            c.templates = ("{}",)
            c.anchor = OTHER_ANCHOR  # guided to the next concept of the kind (docs/erasure_sweep.md: towards "" worse)
            # Selected on validation prompts, n = 128 (docs/erasure_sweep_mace.md, docs/erasure_sweep_mace_preserve.md):
            # - CFR λ 8 (λ = 0 on this ~100-token cache is a near-singular solve, κ ≈ 9e10, refused by erase.ridge;
            #   λ 1 kept circle's other shapes at 48 %, λ 8 at 65 %) and preservation scale 1 (ρ = 1, squared as the
            #   official code; 1e-3 → 65 %, 1 → 99 % with circle still 78 % erased validly).
            # - the LoRA at lr 1e-4 (SD's 1e-5 leaves the attention loss at 1.004 of 1.007; 1e-3 broke 7-25 % of
            #   images); at 1e-4 it moves little, so the fusion's λ 0.01 and 8 tie (the sweep's pick, 8, is kept).
            # - fusion ρ_f 0.1 instead of 7e-7 (MACE's cache is ~all COCO captions, this one ~100 prompts).
            c.mace.update(lam=8.0, preserve_scale=1.0)
            c.lora.update(fuse_lam=8.0, fuse_preserve_scale=0.1)
            c.train.update(learning_rate=1e-4, log_every=10)
        else:
            raise UserError(f"unknown mace config variant {variant!r} (cfr, runlocal, shapes)")
    return c
