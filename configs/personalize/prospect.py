# COMMAND: jaxdiff personalize --config configs/personalize/prospect.py:shapes --images DIR --token "<p>" \
#   --out runs/prospect
# ProSpect (Zhang et al. 2023), defaults of the official v1-finetune.yaml / main.py: K = 10 stages, caption "{}" (the
# token alone), AdamW lr 1e-4 (x accum x gpus x batch with --scale_lr: 1e-4 at batch 1), 600 steps, batch 1, no
# embedding regulariser. ":shapes" sizes it for the tiny shapes model on a CPU (init word "shape", lr 1e-2, 800
# steps, batch 8); ":runlocal" is a seconds-long smoke run.
"""ProSpect; see jaxdiff/personalize/prospect.py for the objective and the options."""

from jaxdiff.errors import UserError
from jaxdiff.personalize.config import base_config, train_block


def get_config(arg: str = ""):
    c = base_config("prospect")
    c.stages = 10  # K: stage k serves the timesteps t with floor(t K / 1000) = k (k = 0: the end of generation)
    c.representation = "free"  # "free" stage vectors (the paper) or "generator" (the official code's block)
    c.init_word = "shape"  # the official 'teddy' string's element 0 is "t" (UNVERIFIED which one was used)
    c.snr_gamma = 0.0
    c.captions = "templates"
    c.templates = ("{}",)
    c.flip = 0.0  # the official code flips at random; a flip moves a shapes object to the other side
    c.train = train_block(steps=600, learning_rate=1e-4, batch_size=1)
    c.sample.prompts = ("{}", "a red {}", "a blue {} on the left")
    for variant in filter(None, arg.split(",")):
        if variant == "shapes":
            c.train.update(steps=800, learning_rate=1e-2, batch_size=8, log_every=50)
        elif variant == "runlocal":
            c.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=0)
            c.sample.num_images = 2
        else:
            raise UserError(f"unknown prospect config variant {variant!r} (shapes, runlocal)")
    return c
