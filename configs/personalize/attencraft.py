# COMMAND: jaxdiff personalize --config configs/personalize/attencraft.py:shapes --images DIR --token "<a>,<b>" \
#   --out runs/attencraft
# AttenCraft (Shentu et al. 2024), defaults of the official train.sh: ONE image holding both concepts, no masks;
# Custom-Diffusion K/V of cross-attention + two token rows, AdamW lr 5e-5 x 2 (prior) = 1e-4, wd 1e-2, clip 1, 500
# steps, batch 1 instance + 1 prior image, masks refreshed every 20 steps (kept when SSIM >= 0.8), threshold 0.1.
# ":shapes" sizes it for the tiny shapes model on a CPU (8x8 attention, init words "shape", class prompts from the
# world's captions, lr 1e-3, 300 steps, batch 4 + 4, split "x_kmeans" (see the module docstring: the official
# segmentation finds no concept classes on this model)); ":runlocal" is a seconds-long smoke run.
"""AttenCraft; see jaxdiff/personalize/attencraft.py for the objective and the options."""

import ml_collections

from jaxdiff.errors import UserError
from jaxdiff.personalize.config import base_config, train_block


def get_config(arg: str = ""):
    c = base_config("attencraft")
    c.multi_token = True  # --token "<a>,<b>"
    c.token = "<a>,<b>"
    c.init_words = "object,object"  # the official --initializer_token (e.g. "cat+dog"), one word per token
    c.freeze_model = "crossattn_kv"  # as Custom Diffusion: crossattn_kv | crossattn
    c.captions = "templates"  # the prompts below, not IMAGE.txt captions
    c.prompt_both = "a photo of {} and {}"
    c.prompt_single = "a photo of {}"
    # masks (jaxdiff/personalize/attencraft.py): SD's 16x16 cross maps and 32x32 affinity in the official code
    c.cross_side = 16
    c.affinity_side = 32
    c.cross_power = 2.0
    c.affinity_power = 4
    c.threshold = 0.1
    c.split = "none"  # the official code; "x_kmeans": split the joint concept region by x when the maps agree
    c.mask_t_max = 300
    c.refresh_every = 20
    c.ssim_threshold = 0.8
    c.ssim_window = 7
    c.attention_weight = 1.0
    c.prior = ml_collections.ConfigDict(dict(weight=1.0, num_images=200, prompts="a photo at the beach"))
    c.train = train_block(steps=500, learning_rate=1e-4, batch_size=1, weight_decay=1e-2)
    c.train.max_grad_norm = 1.0
    c.sample.prompts = ("a photo of {0} and {1}", "a photo of {0}", "a photo of {1}")
    for variant in filter(None, arg.split(",")):
        if variant == "shapes":
            c.init_words = "shape,shape"
            c.prompt_both, c.prompt_single = "a {} and a {}", "a {}"
            c.sample.prompts = ("a {0} and a {1}", "a {0}", "a {1}")
            c.cross_side, c.affinity_side = 8, 8  # the v2 shapes UNet's finest attention (down0, up2)
            c.split = "x_kmeans"  # the fresh tokens' maps agree on this model: the official split finds no classes
            c.prior.update(prompts="world", num_images=128)
            c.train.update(steps=300, learning_rate=1e-3, batch_size=4, log_every=25)
        elif variant == "runlocal":
            c.prior.num_images = 4
            c.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=0)
            c.refresh_every = 2
            c.sample.num_images = 2
        else:
            raise UserError(f"unknown attencraft config variant {variant!r} (shapes, runlocal)")
    return c
