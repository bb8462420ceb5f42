# COMMAND: jaxdiff erase --config configs/erase/doco.py --config.concept=circle --config.anchor=square \
#   --out runs/doco_circle
# DoCo (Wu et al. 2025): PatchGAN on predicted x̂0 latents aligns the target-caption domain with the anchor one;
# the UNet's adversarial gradient goes through the concept-preserving surgery against the prior gradient.
# Defaults of the README: attn2 K/V, batch 8, lr 6e-6 (×batch with scale_lr), 2000 steps, warm-up 1000 (D only),
# D lr 1e-4 (objects/nudity; 5e-4 styles, ":style"), λ 1, max_grad_norm 1, prior preservation on.
"""DoCo; see jaxdiff/erase/doco.py."""

from jaxdiff.erase.config import base_config, train_block
from jaxdiff.errors import UserError


def get_config(arg: str = ""):
    c = base_config("doco")
    c.anchor = "square"  # the anchor concept whose images are generated and noised
    c.doco = dict(
        disc_channels=(64, 128, 256, 512),
        disc_lr=1e-4,
        disc_betas=(0.5, 0.999),
        lambda_=1.0,
        gradient_clip=True,  # the concept-preserving gradient surgery
        prior_loss_weight=1.0,
        prior_concepts="anchor",  # the prior pool: "anchor" (official) or "anchor+preserved" (+ train.retain_images)
        warm_up=1000,  # discriminator-only steps before the UNet's first update (its accuracy is logged)
        disc_grad_includes_adv=True,  # official quirk (False switches it off), see jaxdiff/erase/doco.py
        add_retain_grad=False,  # official: the update is the adjusted adversarial gradient only
        num_anchor_images=200,
        scale_lr=True,
    )
    c.train = train_block(
        steps=2000,
        learning_rate=6e-6,
        batch_size=8,
        selector="cross-attn-kv",
        optimizer="adamw",
        weight_decay=1e-2,
        max_grad_norm=1.0,
    )
    for variant in filter(None, arg.split(",")):
        if variant == "style":
            c.doco.disc_lr = 5e-4
        elif variant == "shapes":
            c.num_prompts = 8
            # The official share of discriminator-only steps (1000 of 2000): 20 of 300 left D at chance (issue 12).
            c.doco.update(disc_channels=(32, 64), warm_up=300, num_anchor_images=64, scale_lr=False)
            # Selected on validation prompts (docs/erasure_sweep_doco_prior.md, n = 128): with the preserved concepts
            # in the prior pool circle erasure rose 68 -> 75 % and the other shapes stayed at 95 % (89 % without).
            c.doco.prior_concepts = "anchor+preserved"
            c.train.update(steps=600, learning_rate=5e-4, batch_size=4, log_every=50)
        elif variant == "runlocal":
            c.doco.update(disc_channels=(8, 16), warm_up=2, num_anchor_images=4)
            c.train.update(steps=5, batch_size=2, log_every=1)
        else:
            raise UserError(f"unknown doco config variant {variant!r} (style, runlocal, shapes)")
    return c
