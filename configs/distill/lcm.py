# COMMAND: jaxdiff distill --config configs/distill/lcm.py:shapes --out runs/lcm_shapes
# Latent Consistency Distillation (LCM; diffusers examples/consistency_distillation/train_lcm_distill_sd_wds.py,
# shared/specs/distill_anchors.md §1): skipping-step DDIM teacher jump (k = 1000 // 50 = 20), cond-based CFG on the
# teacher x_c + w(x_c − x_u) with w ~ U[w_min, w_max], boundary scalings (σ_data 0.5, timestep scaling 10), Huber
# (c = 0.001) or l2, an EMA target (0.95); student and target initialised from the teacher. The x0 are the teacher's
# latents from the pair store (jaxdiff.distill.pairs). Defaults: the script's (lr 1e-6, batch 16 per GPU, Adam
# weight decay 1e-2, max grad norm 1, w in [5, 15], 500 lr-warmup steps) except loss "huber" (the spec; the script's
# default is "l2"). The w-embedding (the script's --unet_time_cond_proj_dim 256): the student is the teacher's UNet
# plus diffusers' time_cond_proj_dim, called with guidance_embedding(w) of the teacher's w and sampled, like diffusers'
# LatentConsistencyModelPipeline, at guidance s = w + 1 without CFG; time_cond_proj_dim=0 is the student without it
# (w for the teacher only, sampled at guidance 1: the LCM-LoRA script's behaviour).
"""LCM consistency distillation: a few-step student sampled by LCMScheduler."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import base_config  # noqa: E402

from jaxdiff.errors import UserError  # noqa: E402


def lcm_block() -> dict:
    return dict(
        num_ddim_timesteps=50,  # N; the skip k = num_train_timesteps // N
        w_min=5.0,  # cond-based w (0 = the conditional teacher)
        w_max=15.0,
        sigma_data=0.5,
        timestep_scaling=10.0,
        loss="huber",  # "huber" | "l2"
        huber_c=0.001,
        ema_decay=0.95,  # the target network
        time_cond_proj_dim=256,  # the student's w-embedding width (0: none, the teacher's architecture)
        cond_proj_init="torch",  # its new kernel: "torch" (nn.Linear's default, as the script) | "zeros"
        student_guidance=0.0,  # pipeline guidance s = w + 1 for the report and OUT/model; 0: 1 + (w_min + w_max) / 2
        # LoRA-LCM (train_lcm_distill_lora_sd_wds.py): r > 0 trains adapters (its target modules, PEFT init, scale
        # lora_alpha / r) on the frozen teacher, no w-embedding, the student itself (no gradient) as the target, and
        # saves the merged student; 0 = the full fine-tune above. The `lora` variant: the script's r = α = 64, lr 1e-4.
        lora_rank=0,
        lora_alpha=64.0,
    )


def shapes(c):
    c.data.num_prompts = 400
    c.pairs.update(num_pairs=2000, guidance=5.0, steps=25)
    c.train.update(steps=2000, learning_rate=1e-5, batch_size=16, log_every=50, checkpoint_every=250)
    # No w-embedding here: tools/distill_table.py trains this preset at one w and samples every student at guidance
    # 1, which a w-embedding student reads as w = 0 (set --config.lcm.time_cond_proj_dim=256 to train one).
    c.lcm.update(w_min=1.0, w_max=4.0, time_cond_proj_dim=0)
    c.eval.update(num_images=200, teacher_steps=(25, 1, 2, 4), student_steps=(4, 1, 2))


def lora(c):
    c.lcm.update(lora_rank=64, lora_alpha=64.0)
    c.train.update(learning_rate=1e-4)


def smoke(c):
    c.data.num_prompts = 8
    c.pairs.update(num_pairs=4, shard_size=4, steps=1, scheduler="ddim")
    c.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=2, warmup_steps=0)
    c.eval.update(num_images=4, bootstraps=0, teacher_steps=(1,), student_steps=(2,))
    c.lcm.update(time_cond_proj_dim=8)  # the w-embedding student, small


def get_config(arg: str = ""):
    c = base_config("lcm")
    del c.rectified_flow
    c.lcm = lcm_block()
    c.train.update(steps=10_000, learning_rate=1e-6, batch_size=16, warmup_steps=500, max_grad_norm=1.0)
    c.train.update(weight_decay=1e-2)
    c.eval.update(teacher_steps=(25, 4), student_steps=(4, 1, 2))
    variants = {"shapes": shapes, "smoke": smoke, "lora": lora}
    for variant in filter(None, arg.split(",")):
        if variant not in variants:
            raise UserError(f"unknown lcm config variant {variant!r} ({', '.join(variants)})")
        variants[variant](c)
    return c
