# COMMAND: jaxdiff distill --config configs/distill/sid.py:shapes --out runs/sid_shapes
# COMMAND: jaxdiff distill --config configs/distill/sid.py:shapes,sfd --out runs/sfd_shapes
# SiD with long-and-short guidance (SiD-LSG, mingyuanzhou/SiD-LSG run_sid.sh / training/sid_training_loop.py;
# shared/specs/distill_metrics.md §3, distill_anchors.md §1): data-free on prompts; a one-step generator and a fake
# score network, both initialised from the teacher UNet, each with its own AdamW (betas 0/0.999, eps 1e-8; weight
# decay 0 = the official Adam); per step the fake score first, then the generator. Guidance: κ1 = cfg_train_fake
# (the fake score's training), κ2 = κ3 = cfg_eval_fake (the fake score inside the generator loss), κ4 = cfg_eval_real
# (the teacher). Defaults: run_sid.sh's SD1.5 run (κ 2/2/2, t_init 625, batch 512, lr 1e-6, fp32) except alpha,
# which is the SiD default 1.2 here (run_sid.sh passes --alpha 1: use --config.sid.alpha=1.0 for that run).
# ":sfd" adds Score Forgetting Distillation (§3.5): prompts naming the forget concept query the teacher with the
# override, with SFD's remain/forget coefficients 1.0/0.01 and a separate forget batch.
"""SiD-LSG (and SFD with :sfd) data-free one-step distillation."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import base_config, sfd_block  # noqa: E402

from jaxdiff.errors import UserError  # noqa: E402


def sid_block() -> dict:
    return dict(
        noise="lsg",  # "lsg": t ~ U{t_min..t_max-1} and the ε loss (SiD-LSG); "edm": §3.2/3.3's σ levels mapped to t(σ)
        t_init=625,  # the generator's timestep (SiD-LSG --init_timestep)
        sigma_init=0.0,  # > 0: the generator's EDM σ_init instead (t_init = t(σ_init); SiD's EDM runs use 2.5)
        t_min=20,
        t_max=980,
        alpha=1.2,
        cfg_train_fake=2.0,  # κ1
        cfg_eval_fake=2.0,  # κ2 = κ3
        cfg_eval_real=2.0,  # κ4
        context_dropout=0.1,  # of the fake-score phase's prompts, when κ1 or κ2 is not 1
        loss_scaling=1.0,  # --ls
        loss_scaling_g=1.0,  # --lsg (SiD-LSG: 1; SiD's EDM runs: 100, §3.3)
        fake_score_learning_rate=1e-6,  # --lr (train.learning_rate is the generator's, --glr)
        adam_b1=0.0,
        adam_b2=0.999,
        adam_eps=1e-8,
        p_mean=-1.2,  # noise="edm" only
        p_std=1.2,
        sigma_data=0.5,
        edm_t_max=800,
    )


def shapes(c):
    # ~2000 steps at ~1.5 steps/s on 2 CPU cores (untuned: a 100-step smoke run is the only one made so far)
    c.data.num_prompts = 400
    c.train.update(steps=2000, learning_rate=1e-5, batch_size=16, log_every=50, checkpoint_every=250)
    c.sid.fake_score_learning_rate = 1e-5
    c.eval.update(num_images=200, teacher_steps=(25, 1, 2), student_steps=(1,))


def smoke(c):
    c.data.num_prompts = 8
    c.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=2)
    c.eval.update(num_images=4, bootstraps=0, teacher_steps=(1,), student_steps=(1,))


def sfd(c):
    c.sfd.update(forget_concept="circle;disc;round shape", override_prompt="square")


def get_config(arg: str = ""):
    c = base_config("sid")
    del c.pairs, c.rectified_flow  # data-free: no teacher pairs
    c.sid = sid_block()
    c.sfd = sfd_block()
    c.train.update(steps=19_531, learning_rate=1e-6, batch_size=512, warmup_steps=0, max_grad_norm=0.0)
    c.train.update(weight_decay=0.0, ema_decay=0.993)  # EMA half-life 50 kimg at batch 512: 0.5 ** (512 / 50000)
    c.eval.update(teacher_steps=(25, 1), student_steps=(1,))
    variants = {"shapes": shapes, "smoke": smoke, "sfd": sfd}
    for variant in filter(None, arg.split(",")):
        if variant not in variants:
            raise UserError(f"unknown sid config variant {variant!r} ({', '.join(variants)})")
        variants[variant](c)
    return c
