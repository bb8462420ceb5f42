# COMMAND: jaxdiff distill --config configs/distill/instaflow.py:shapes --config.init=runs/reflow_shapes/model \
#   --config.pairs.folder=runs/reflow_shapes/pairs --out runs/instaflow_shapes
# InstaFlow's one-step distillation (Liu et al. 2024): t fixed at 0 (UNet time 1000, the 1-step sampler's), loss
# D(z1, z0 + v(z0)) with D = L2; the paper's second stage uses LPIPS: ",lpips" with
# --config.rectified_flow.perceptual_weights=PATH (user-supplied lpips state dict, recipe in jaxdiff/metrics/lpips.py;
# none ships: no weights offline). The ",probe" variant plays that stage on shapes: D = the shapes probe's
# penultimate features of the VAE decode, squared distance, weighted perceptual_weight·D_probe + l2_weight·D_L2;
# e.g. --config.init=runs/instaflow_shapes/model).
# Init: the 2-rectified flow (`init`); "teacher" gives "SD + Distill" without reflow. The shapes variant reuses the
# reflow run's pairs when `pairs.folder` points at them (same teacher and solver key).
"""InstaFlow one-step distillation on teacher pairs."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import base_config  # noqa: E402

from jaxdiff.errors import UserError  # noqa: E402


def get_config(arg: str = ""):
    c = base_config("instaflow")
    c.rectified_flow.update(t_schedule="t0", eps=0.0, loss="distill_l2")
    c.train.update(steps=21_500, batch_size=1024)
    c.eval.student_steps = (1, 2)
    for variant in filter(None, arg.split(",")):
        if variant == "shapes":
            c.data.num_prompts = 400
            c.pairs.update(num_pairs=512, shard_size=64, scheduler="ddim", steps=25, guidance=5.0)
            c.train.update(
                steps=200, learning_rate=1e-4, batch_size=16, warmup_steps=20, log_every=25, checkpoint_every=100
            )
        elif variant == "tsit5":  # adaptive teacher pairs (diffrax), after shapes/runlocal; keys only this adds
            c.pairs.update(scheduler="tsit5", rtol=1e-3, atol=1e-3)
        elif variant == "probe":  # keys only this variant adds (jaxdiff.distill.rectified_flow.perceptual_settings)
            c.rectified_flow.update(loss="distill_probe", perceptual_weight=1.0, l2_weight=0.0, probe="")
        elif variant == "lpips":  # keys only this variant adds; perceptual_weights: the user's lpips.LPIPS state dict
            c.rectified_flow.update(
                loss="distill_lpips", perceptual_weight=1.0, l2_weight=0.0, perceptual_weights="", lpips_net="vgg"
            )
        elif variant == "runlocal":
            c.data.num_prompts = 8
            c.pairs.update(num_pairs=8, shard_size=4, scheduler="ddim", steps=2)
            c.train.update(steps=3, batch_size=2, learning_rate=1e-4, warmup_steps=0, log_every=1, checkpoint_every=2)
            c.eval.update(num_images=4, bootstraps=0, teacher_steps=(1,), student_steps=(1,))
        else:
            raise UserError(f"unknown instaflow config variant {variant!r} (shapes, probe, lpips, tsit5, runlocal)")
    return c
