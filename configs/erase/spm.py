# COMMAND: jaxdiff erase --config configs/erase/spm.py --config.concept=circle --out runs/spm_circle
# SPM (Lyu et al. 2024): rank-1 adapters on every Linear/Conv of the transformer blocks, ESD-style erase loss
# against the surrogate plus latent anchoring (λ_LA 1000, 4 anchors), Facilitated Transport at inference.
# Defaults of the official configs: 3000 its, batch 1, lr 1e-4 (AdamW; the official AdamW8bit), cosine with 3
# restarts and 500 warm-up steps, no clipping, DDIM 30 steps, CFG 3, η 1. ":runlocal": 5 steps, 4 DDIM steps.
"""SPM; see jaxdiff/erase/spm.py."""

from jaxdiff.erase.config import OTHER_ANCHOR, base_config, train_block
from jaxdiff.errors import UserError


def get_config(arg: str = ""):
    c = base_config("spm")
    c.anchor = ""  # the surrogate concept c_sur
    c.spm = dict(
        rank=1,
        alpha=1.0,
        erase_scale=1.0,  # η (guidance_scale)
        la_strength=1000.0,  # λ_LA
        num_anchors=4,  # sampling_batch_size
        max_denoising_steps=30,
        guidance=3.0,  # CFG of x_t generation
        ft_power=2,  # Facilitated Transport: γ² ΔW (official code); 1 = the paper's γ ΔW
        matching_metric="clipcos_tokenuni",
        facilitate_factor=1.0,
    )
    c.train = train_block(
        steps=3000, learning_rate=1e-4, batch_size=1, selector="transformers", optimizer="adamw", weight_decay=1e-2
    )
    c.train.lr_schedule = "cosine_with_restarts"
    c.train.lr_cycles = 3
    c.train.warmup_steps = 500
    for variant in filter(None, arg.split(",")):
        if variant == "shapes":
            c.num_prompts = 8
            c.spm.update(max_denoising_steps=25, guidance=5.0)
            c.train.update(steps=400, learning_rate=2e-3, warmup_steps=40, log_every=50)
            # Selected on validation prompts (docs/erasure_sweep_spm.md): the erase target ε(c_sur) − η(ε(c_tar) −
            # ε(c_sur)) is relative to the surrogate, and on shapes the empty prompt draws circles, so with c_sur = ""
            # SPM erased 0-19 % of circles validly; guided to the next concept of the kind it erases 84 % (circle)
            # and 100 % (red). Latent anchoring at λ_LA = 1000 held the adapters still on circle (6 % erased) and
            # broke the erased prompts' shapes on red (16 % kept): λ_LA = 0 here.
            c.anchor = OTHER_ANCHOR
            c.spm.la_strength = 0.0
        elif variant == "runlocal":
            c.spm.update(max_denoising_steps=4, num_anchors=2)
            c.train.update(steps=5, warmup_steps=1, log_every=1)
        else:
            raise UserError(f"unknown spm config variant {variant!r} (runlocal, shapes)")
    return c
