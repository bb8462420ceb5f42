# COMMAND: jaxdiff distill --config configs/distill/reflow.py:shapes --out runs/reflow_shapes
# 2-rectified flow (Liu et al. 2023; InstaFlow's "Reflow" stage): the student, initialised from the teacher UNet,
# regresses the straight velocity z1 − z0 on teacher pairs, t = u(1 − eps) + eps, UNet time (1 − t)·1000
# (shared/specs/distill_metrics.md §1.2, §1.5, §1.8). Defaults: the SD1.5 card's stage 1 (batch 64, lr 1e-6 AdamW,
# clip 1, warm-up 1000); ":shapes" a ~10-minute CPU run; ":runlocal" a seconds-long smoke run.
"""2-rectified flow (reflow) on teacher pairs."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import base_config  # noqa: E402

from jaxdiff.errors import UserError  # noqa: E402


def shapes(c):
    c.data.num_prompts = 400
    c.pairs.update(num_pairs=512, shard_size=64, scheduler="ddim", steps=25, guidance=5.0)
    c.train.update(steps=300, learning_rate=2e-4, batch_size=16, warmup_steps=20, log_every=25, checkpoint_every=100)
    c.eval.update(num_images=200, teacher_steps=(25, 1, 2), student_steps=(1, 2, 4))


def runlocal(c):
    c.data.num_prompts = 8
    c.pairs.update(num_pairs=8, shard_size=4, scheduler="ddim", steps=2)
    c.train.update(steps=3, batch_size=2, learning_rate=1e-4, warmup_steps=0, log_every=1, checkpoint_every=2)
    c.eval.update(num_images=4, bootstraps=0, teacher_steps=(1,), student_steps=(1,))


def tsit5(c):
    """Pairs from the adaptive Tsit5 solve of the teacher ODE (diffrax; `jaxdiff.distill.pairs.AdaptiveSolver`):
    pairs.steps is ignored, pairs.rtol / pairs.atol (keys only this variant adds) set the step-size control. Name it
    after "shapes" / "runlocal" (which set pairs.scheduler), e.g. reflow.py:shapes,tsit5."""
    c.pairs.update(scheduler="tsit5", rtol=1e-3, atol=1e-3)


def get_config(arg: str = ""):
    c = base_config("reflow")
    variants = {"shapes": shapes, "runlocal": runlocal, "tsit5": tsit5}
    for variant in filter(None, arg.split(",")):
        if variant not in variants:
            raise UserError(f"unknown reflow config variant {variant!r} ({', '.join(variants)})")
        variants[variant](c)
    return c
