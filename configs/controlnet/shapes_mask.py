# COMMAND: jaxdiff controlnet-train --config configs/controlnet/shapes_mask.py --out runs/controlnet_shapes_mask
# A ControlNet for the built-in shapes model conditioned on the renderer's exact object masks (white silhouettes on
# black, 32 px; conditioning embedding (16, 32, 64): 4x the 8x8 latents), initialised from the frozen UNet, trained
# on freshly rendered scenes with train-template captions, 10 % of them dropped to the empty prompt. Defaults sized
# for a 2-core CPU: batch 32, AdamW 2e-4 after 100 warm-up steps, 5000 steps (160k images, about what the shapes UNet
# itself saw); 0.26-0.33 s/step measured on 2 cores shared with another training job, so ~25 min. ":edges"
# conditions on 1 px outlines instead; ":smoke" is a seconds-long run of 3 steps.
"""ControlNet on the shapes world's exact object masks; see jaxdiff/control/config.py for the fields."""

from jaxdiff.control.config import base_config
from jaxdiff.errors import UserError


def get_config(arg: str = ""):
    c = base_config()
    for variant in filter(None, arg.split(",")):
        if variant == "edges":
            c.condition = "edges"
        elif variant == "smoke":
            c.train.update(steps=3, batch_size=4, warmup_steps=0, log_every=1, checkpoint_every=1)
        else:
            raise UserError(f"unknown shapes_mask config variant {variant!r} (edges, smoke)")
    return c
