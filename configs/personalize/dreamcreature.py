# COMMAND: python tools/dreamcreature_eval.py data --out runs/dreamcreature_data   (renders + parts.json + masks)
#   jaxdiff personalize --config configs/personalize/dreamcreature.py:shapes --images runs/dreamcreature_data \
#   --token "<part>" --out runs/dreamcreature
# DreamCreature / PartCraft (Ng et al. 2023), defaults of the official run_sd_sup.sh: LoRA rank 4 on every UNet
# attention, a 3-layer TokenMapper, min-SNR gamma 5, attention loss weight 0.01, lr 1e-4 constant AdamW wd 1e-2,
# captions "a photo of a {}" style templates with probability 0.5 (shuffled part tokens). ":shapes" sizes it for the
# tiny shapes model on a CPU (attention at 8x8, lr 2e-3, batch 8, 1500 steps, shapes-world templates; the images
# folder needs parts.json + parts_masks.npz: see jaxdiff/personalize/dreamcreature.py); ":runlocal" is a smoke run.
"""DreamCreature; see jaxdiff/personalize/dreamcreature.py for the objective and the options."""

import ml_collections

from jaxdiff.errors import UserError
from jaxdiff.lora import ATTENTION
from jaxdiff.personalize.config import base_config, train_block


def get_config(arg: str = ""):
    c = base_config("dreamcreature")
    c.token = "<part>"  # part m's token is "<part>_m"
    c.captions = "templates"  # captions are built from each image's codes (parts.json), not IMAGE.txt files
    c.templates = ("a photo of a {}", "a rendering of a {}", "a photo of the {}")  # official: ImageNet templates
    c.p_template = 0.5  # probability of a template (else the part tokens alone)
    c.shuffle = True  # --vector_shuffle: the present part tokens in random order
    c.mapper = ml_collections.ConfigDict(dict(layers=3))  # projection_nlayers
    c.lora = ml_collections.ConfigDict(dict(rank=4, alpha=4.0, init="gaussian", targets=ATTENTION))
    c.snr_gamma = 5.0
    c.attention_weight = 0.01
    c.attention_side = 16  # cross-attention resolution of the attention loss (official: 16 at a 64x64 latent)
    c.mask_pool = "nearest"  # the official nearest resize of the part masks; "mean": soft area fractions
    c.train = train_block(steps=1000, learning_rate=1e-4, batch_size=8, weight_decay=1e-2)
    c.sample.prompts = ("0:0 1:5 2:0", "a picture of a 0:5 1:0 2:1")
    for variant in filter(None, arg.split(",")):
        if variant == "shapes":
            c.templates = ("a {}", "a picture of a {}", "an image of a {}")  # the shapes vocabulary has no "photo"
            c.attention_side = 8  # the shapes UNet's finest cross-attention (8x8 latent)
            c.mask_pool = "mean"
            c.train.update(steps=1500, learning_rate=2e-3, batch_size=8, log_every=50)
        elif variant == "runlocal":
            c.templates = ("a {}", "a picture of a {}")
            c.attention_side = 8
            c.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=0)
            c.sample.num_images = 2
        else:
            raise UserError(f"unknown dreamcreature config variant {variant!r} (shapes, runlocal)")
    return c
