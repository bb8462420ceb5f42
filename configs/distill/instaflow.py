# COMMAND: jaxdiff distill --config configs/distill/instaflow.py:shapes --config.init=runs/reflow_shapes/model \
#   --out runs/instaflow_shapes
# InstaFlow's one-step distillation (Liu et al. 2024): t fixed at 0 (UNet time 1000, the 1-step sampler's), loss
# D(ODE[v_2](z0), z0 + v(z0)) with D = L2: the pairs are the 2-rectified flow's own ODE solutions
# (`pairs.source="init"`: the `init` model's uniform Euler steps, at guidance 1.5 as the paper's distillation
# stage), not the teacher's; its straightened coupling is what one step can learn. `--config.pairs.source=teacher`
# (with the teacher's scheduler) regresses the teacher's pairs instead. The paper's second stage uses LPIPS:
# ",lpips" with --config.rectified_flow.perceptual_weights=PATH (the user's lpips state dict, recipe in
# jaxdiff/metrics/lpips.py; none ships: no weights offline). The ",probe" variant plays that stage on shapes:
# D = the shapes probe's penultimate features of the VAE decode, squared distance, weighted
# perceptual_weight·D_probe + l2_weight·D_L2; e.g. --config.init=runs/instaflow_shapes/model.
# Init: the 2-rectified flow (`init`); "teacher" with `pairs.source=teacher` gives "SD + Distill" without reflow.
# ",deep": a larger student, two transformer blocks per Transformer2DModel where the init has one (the added ones
# start at zero output: jaxdiff/distill/grow.py); --config.student.transformer_layers=N for N.
"""InstaFlow one-step distillation on the 2-rectified flow's pairs."""

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
    c.pairs.update(source="init", scheduler="rf_euler", steps=25, guidance=1.5)  # Distill 1: 2-RF, guidance 1.5
    for variant in filter(None, arg.split(",")):
        if variant == "shapes":
            c.data.num_prompts = 400
            # The shapes 2-RF learns the teacher's guided coupling without caption dropout: its own ODE at
            # guidance 1 (no unconditional branch to contrast), 16 Euler steps of its straightened flow.
            c.pairs.update(num_pairs=512, shard_size=64, steps=16, guidance=1.0)
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
        elif variant == "deep":  # keys only this variant adds: a larger student (jaxdiff.distill.grow)
            # InstaFlow-1.7B's remedy for a student its teacher's size cannot carry: here every Transformer2DModel
            # of the init gets a second block, added at zero output (the student starts as the init's function).
            c.student = dict(transformer_layers=2)
        elif variant == "runlocal":
            c.data.num_prompts = 8
            # runlocal starts from the teacher (no reflow run to point `init` at): the teacher's pairs.
            c.pairs.update(num_pairs=8, shard_size=4, source="teacher", scheduler="ddim", steps=2)
            c.train.update(steps=3, batch_size=2, learning_rate=1e-4, warmup_steps=0, log_every=1, checkpoint_every=2)
            c.eval.update(num_images=4, bootstraps=0, teacher_steps=(1,), student_steps=(1,))
        else:
            raise UserError(
                f"unknown instaflow config variant {variant!r} (shapes, probe, lpips, tsit5, deep, runlocal)"
            )
    return c
