# COMMAND: jaxdiff distill --config configs/distill/dmd2.py:shapes --out runs/dmd2_shapes
# COMMAND: jaxdiff distill --config configs/distill/dmd2.py:shapes,gan --out runs/dmd2_gan_shapes
# COMMAND: jaxdiff distill --config configs/distill/dmd2.py:shapes,sfd --out runs/dmd2_sfd_shapes
# DMD2 (tianweiy/DMD2, experiments/sdv1.5/*.sh; shared/specs/distill_anchors.md §1): data-free on prompts; a
# generator (from the teacher) and a fake score (a copy of the teacher), each with its own AdamW (β 0.9/0.999,
# weight decay 0.01), constant LR after warm-up, max grad norm 10; the fake score updated `fake_updates` = 10 times
# per generator update; the teacher guided u + 1.75 (c − u), the fake score unguided; DM timesteps in
# [0.02 T, 0.98 T]. Stage 1 of the SD1.5 run (lr 1e-5, no GAN) is the default; ":gan" adds stage 2's diffusion-GAN
# head on the fake UNet's bottleneck (generator weight 1e-3, head 1e-2, noise t < 1000) on real images (shapes: the
# renders of the training prompts' scenes; else dmd2.real_images). dmd2.num_steps = k > 1 trains a k-step student
# with backward simulation; OUT/model samples with LCMScheduler (original_inference_steps = k). ":sfd": SFD's concept
# override (the teacher is asked "square" where a prompt names a circle), so the student distills and forgets.
# ":dmd": DMD (Yin et al. 2024) on an InstaFlow student: the generator is the one-step flow-velocity student of
# config.init (dmd2.generator=flow), and DMD's regression on teacher noise->latent pairs (weight 0.25, the paper's
# λ_reg; L2 on latents where the paper has LPIPS on images) joins the distribution-matching loss; the pairs block
# names the teacher's pair store, e.g.
#   jaxdiff distill --config configs/distill/dmd2.py:shapes,dmd --config.init=runs/instaflow_shapes/model \
#     --config.pairs.folder=runs/instaflow_shapes/pairs ... --out runs/instaflow_dmd_shapes
# ":dmd,adv": the same generator and regression with the GAN head in place of distribution matching (dm_weight 0).
# ":dmd,adv,ladd": its discriminator's real samples are the teacher's pair latents (LADD), generator weight 0.005.
"""DMD2 distribution-matching distillation: a one- or k-step student."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import base_config, sfd_block  # noqa: E402

from jaxdiff.errors import UserError  # noqa: E402


def dmd2_block() -> dict:
    return dict(
        num_steps=1,  # k: the student's steps (timesteps T-1, T-1-T/k, ...); k must divide T
        backward_simulation=True,  # k > 1: the generator's inputs come from its own earlier steps
        real_guidance=1.75,  # the teacher's CFG scale (u + s(c - u))
        fake_updates=10,  # fake-score updates per generator update (dfake_gen_update_ratio)
        fake_score_learning_rate=1e-5,  # --guidance_lr (train.learning_rate is --generator_lr)
        min_step_percent=0.02,
        max_step_percent=0.98,
        gan_weight_g=0.0,  # --gen_cls_loss_weight (0: no GAN head)
        gan_weight_d=0.0,  # --guidance_cls_loss_weight
        generator="diffusion",  # "diffusion": x0 at T-1 (DMD2); "flow": a one-step flow-velocity (InstaFlow) student
        regression_weight=0.0,  # DMD's regression on teacher pairs (0: DMD2's data-free objective)
        gan_max_timestep=1000,  # diffusion GAN: real and fake noised to t < this before the head; 0: clean images
        real_images="",  # a folder of real images for the GAN head (shapes prompts: their renders)
    )


def shapes(c):
    c.data.num_prompts = 400
    c.train.update(steps=300, learning_rate=1e-5, batch_size=16, log_every=10, checkpoint_every=50, warmup_steps=20)
    c.dmd2.update(fake_updates=5, fake_score_learning_rate=1e-5, real_guidance=5.0)
    c.eval.update(num_images=200, teacher_steps=(25, 1, 4), student_steps=(1,))


def gan(c):
    c.dmd2.update(gan_weight_g=1e-3, gan_weight_d=1e-2)


def dmd(c, pairs):
    c.pairs = pairs
    c.pairs.update(scheduler="ddim", steps=25)
    c.dmd2.update(generator="flow", regression_weight=0.25)


def adversarial(c):
    # After ":dmd": the one-step flow student refined by DMD's regression and the GAN head alone, no distribution
    # matching (dm_weight 0, a key only this variant adds): the discriminator (the fake UNet's bottleneck + head,
    # conditioned on the prompt) tells renders of the prompts' scenes from the student's samples, a mode-seeking
    # signal against the fused / doubled objects an L2-regressed one-step student draws where the teacher's outputs
    # part. The fake UNet keeps its denoising loss (its features follow the student's samples), 2 updates per
    # generator step at lr 1e-4 (the head starts from scratch).
    c.dmd2.update(
        dm_weight=0.0,
        regression_weight=1.0,
        gan_weight_g=0.05,
        gan_weight_d=1.0,
        fake_updates=2,
        fake_score_learning_rate=1e-4,
    )


def latent_adversarial(c):
    # After ":dmd,adv": LADD's real data (Sauer et al. 2024, SD3-Turbo): the discriminator's real samples are the
    # teacher's own latents from the pair store (each conditioned on its pair's prompt) instead of renders, so the GAN
    # pulls the student towards the teacher's distribution (the coupling the regression anchors) rather than away
    # from it towards the renderer's. Generator weight 0.005, a tenth of ":adv"'s (whose GAN overrode the
    # regression), set before the run.
    c.dmd2.update(gan_real="pairs", gan_weight_g=0.005)


def four_step(c):
    c.dmd2.num_steps = 4
    c.eval.student_steps = (4, 1)


def sfd(c):
    c.sfd.update(forget_concept="circle;disc;round shape", override_prompt="square")


def smoke(c):
    c.data.num_prompts = 8
    c.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=2, warmup_steps=0)
    c.dmd2.fake_updates = 2
    c.eval.update(num_images=4, bootstraps=0, teacher_steps=(1,))


def get_config(arg: str = ""):
    c = base_config("dmd2")
    pairs = c.pairs
    del c.pairs, c.rectified_flow  # data-free: no teacher pairs (":dmd" puts the pairs block back)
    c.dmd2 = dmd2_block()
    c.sfd = sfd_block()  # the concept override: prompts naming sfd.forget_concept ask the teacher sfd.override_prompt
    c.train.update(steps=40_000, learning_rate=1e-5, batch_size=32, warmup_steps=500, max_grad_norm=10.0)
    c.train.update(weight_decay=0.01, ema_decay=0.0, lr_schedule="constant")
    c.eval.update(teacher_steps=(25, 1), student_steps=(1,))
    variants = {
        "shapes": shapes,
        "gan": gan,
        "4step": four_step,
        "sfd": sfd,
        "smoke": smoke,
        "dmd": lambda c: dmd(c, pairs),
        "adv": adversarial,
        "ladd": latent_adversarial,
    }
    for variant in filter(None, arg.split(",")):
        if variant not in variants:
            raise UserError(f"unknown dmd2 config variant {variant!r} ({', '.join(variants)})")
        variants[variant](c)
    return c
