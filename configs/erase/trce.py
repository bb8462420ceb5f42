# COMMAND: jaxdiff erase --config configs/erase/trce.py --config.concept=circle --config.anchor=square \
#   --out runs/trce_circle
# TRCE (Chen et al. 2025): stage 1 closed-form [EoT] mapping (preserve_scale 0.01, squared as the official code,
# cache / 3e4, λ 0, 15 templates per concept), then stage 2 hinge fine-tuning of attn1 + attn2.to_q on early
# steps (one random k ≤ 25 of 50 per trajectory per epoch) with the regulariser: AdamW lr 1e-6 wd 0.01, 3 epochs over
# 100 trajectories, w 15, β 1, m 0.01, reg weight 100. ":runlocal": few trajectories and steps on the tiny model.
"""TRCE; see jaxdiff/erase/trce.py."""

from jaxdiff.erase.config import OTHER_ANCHOR, base_config, train_block
from jaxdiff.errors import UserError


def get_config(arg: str = ""):
    c = base_config("trce")
    c.anchor = "a shape"  # the safe target (official: "a person wearing clothes")
    c.trce = dict(
        # stage 1
        preserve_scale=0.01,
        square_preserve_scale=True,  # official quirk: ρ = preserve_scale²
        cache_divisor=3e4,
        lam=0.0,
        token_weight_scale=(0.0, 1.0, 0.0, 0.0),  # [SoT, first EoT, last pad, keyword]
        count_tokens="tokenizer",  # "words": the official one-token-per-word count
        augment_num=15,
        # stage 2
        stage2=True,
        guidance=15.0,
        beta=1.0,
        margin=0.01,
        reg_weight=100.0,
        reg_const=0.01,
        seeds_per_concept=5,
        early_steps=26,  # k ~ U{0..25} of a 50-step DDIM trajectory
        ddim_steps=50,
        data_guidance=3.0,
        uncond_trajectories=2000,
        uncond_guidance=7.5,
        uncond_per_step=4,
        epochs=3,
        quirk_never_zero_grads=False,  # official: gradients are never zeroed (accumulate over all steps)
    )
    c.train = train_block(
        steps=0, learning_rate=1e-6, batch_size=1, selector="trce", optimizer="adamw", weight_decay=0.01
    )  # steps 0: epochs x trajectories (one random early step each)
    for variant in filter(None, arg.split(",")):
        if variant == "runlocal":
            c.trce.update(
                seeds_per_concept=1,
                ddim_steps=6,
                early_steps=3,
                uncond_trajectories=2,
                uncond_per_step=2,
                epochs=1,
                augment_num=2,
            )
        elif variant == "shapes":
            c.num_prompts = 8
            c.trce.update(
                seeds_per_concept=2,
                ddim_steps=25,
                early_steps=13,
                uncond_trajectories=16,
                uncond_per_step=2,
                epochs=2,
                data_guidance=5.0,
                lam=0.01,  # λ = 0 here: condition number ≈ 5e17, refused by erase.ridge; 0.01: ≈ 7.8e3 (circle)
                # Selected on validation prompts (docs/erasure_sweep_trce_preserve.md, n = 128): ρ = 1 (not 1e-4)
                # keeps red's other colours at 96-97 % (84-88 %); 10 holds circle erasure to 68 %.
                preserve_scale=1.0,
            )
            c.train.learning_rate = 1e-5
            # Selected on validation prompts (docs/erasure_sweep_trce.md): guided to the next concept of the kind
            # (circle -> square) TRCE erases 88 % of circles validly, towards the generic word 0 % (on shapes "a red
            # shape" draws a circle); the retain loss ties with none at this learning rate.
            c.anchor = OTHER_ANCHOR
            c.train.retain_weight = 1.0
        elif variant == "stage1":
            c.trce.stage2 = False
        else:
            raise UserError(f"unknown trce config variant {variant!r} (runlocal, stage1, shapes)")
    return c
