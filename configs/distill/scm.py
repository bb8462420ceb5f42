# COMMAND: jaxdiff distill --config configs/distill/scm.py:shapes --out runs/scm_shapes
# COMMAND: jaxdiff distill --config configs/distill/scm.py:shapes,rcm --out runs/rcm_shapes
# sCM (Lu & Song 2024; NVlabs/FastGen fastgen/methods/consistency_model/sCM.py, shared/specs/distill_anchors.md §1):
# continuous-time consistency distillation in TrigFlow. The VP teacher and student are read as TrigFlow networks by
# SNR matching (t̂ = atan2(σ_t, α_t σ_d)); the tangent dF/dt comes from jax.jvp through the student UNet (XLA
# attention), with tangent warm-up r = min(1, step / tangent_warmup_steps) and normalisation g / (‖g‖ + 0.1); the
# loss has the adaptive log-variance weight (a small head on t̂). x0 are the teacher's latents from the pair store.
# The student samples like DMD2's: x̂0, then fresh noise to the next timestep (LCMScheduler in OUT/model).
# ":rcm": rCM (NVlabs/rcm) = sCM × 100 + DMD2's distribution-matching term × 1 on the student's own 2-step samples,
# DMD2's fake score updated 5 times per student update, teacher CFG 5 (the `dmd2` block; unused without :rcm).
"""sCM (and rCM with :rcm) continuous-time consistency distillation: a one- or two-step student."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import base_config  # noqa: E402
from dmd2 import dmd2_block  # noqa: E402

from jaxdiff.errors import UserError  # noqa: E402


def scm_block() -> dict:
    return dict(
        sigma_data=1.0,  # TrigFlow's σ_d (SD-scaled latents have unit std; FastGen's EDM latents use 0.5)
        guidance=5.0,  # the teacher's CFG scale u + w (c - u) in dx/dt
        p_mean=-1.0,  # ln σ ~ N(p_mean, p_std²), t̂ = arctan(σ / σ_d) (sCM)
        p_std=1.4,
        tangent_warmup_steps=10_000,  # r = min(1, step / this)
        tangent_const=0.1,  # g / (‖g‖ + c)
        scm_weight=1.0,  # rCM: scm_weight · sCM + dmd_weight · DMD
        dmd_weight=0.0,  # 0: pure sCM
    )


def rcm(c):
    c.scm.update(scm_weight=100.0, dmd_weight=1.0)
    c.dmd2.update(num_steps=2, fake_updates=5, real_guidance=5.0)


def shapes(c):
    c.data.num_prompts = 400
    c.pairs.update(num_pairs=512, steps=25, guidance=5.0)
    c.train.update(steps=500, learning_rate=1e-4, batch_size=16, log_every=25, checkpoint_every=100, warmup_steps=50)
    c.scm.tangent_warmup_steps = 200
    c.eval.update(num_images=200, teacher_steps=(25, 1, 2), student_steps=(1, 2))


def smoke(c):
    c.data.num_prompts = 8
    c.pairs.update(num_pairs=4, shard_size=4, steps=1, scheduler="ddim")
    c.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=2, warmup_steps=0)
    c.scm.tangent_warmup_steps = 2
    c.eval.update(num_images=4, bootstraps=0, teacher_steps=(1,), student_steps=(2,))
    c.dmd2.fake_updates = 2


def get_config(arg: str = ""):
    c = base_config("scm")
    del c.rectified_flow
    c.scm = scm_block()
    c.dmd2 = dmd2_block()
    c.train.update(steps=20_000, learning_rate=1e-5, batch_size=32, warmup_steps=1000, max_grad_norm=1.0)
    c.eval.update(teacher_steps=(25, 1, 2), student_steps=(1, 2))
    variants = {"shapes": shapes, "rcm": rcm, "smoke": smoke}
    for variant in filter(None, arg.split(",")):
        if variant not in variants:
            raise UserError(f"unknown scm config variant {variant!r} ({', '.join(variants)})")
        variants[variant](c)
    return c
