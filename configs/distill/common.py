"""Shared defaults of the configs/distill/*.py files (rectified-flow family)."""

import ml_collections

from jaxdiff.erase.config import train_block


def base_config(method: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = method
    c.teacher = "shapes"  # a text-to-image pipeline folder or "shapes"
    c.init = "teacher"  # "teacher" or a pipeline folder of the same UNet (e.g. a reflow run's OUT/model)
    c.seed = 0
    c.data = dict(file="", shapes="train", num_prompts=2000)  # prompts only (jaxdiff.data.prompts)
    # The teacher ODE that makes the (noise, latent) pairs; a shared folder lets reflow and InstaFlow reuse them.
    # source: whose ODE, "teacher" or "init" (the model the student starts from; InstaFlow's distillation stage).
    c.pairs = dict(
        folder="",
        source="teacher",
        num_pairs=100_000,
        shard_size=256,
        scheduler="dpm++2m",
        steps=25,
        guidance=5.0,
        seed=0,
    )
    c.rectified_flow = dict(t_schedule="uniform", eps=1e-3, loss="l2")
    c.train = train_block(steps=25_000, learning_rate=1e-6, batch_size=64, selector="all", max_grad_norm=1.0)
    c.train.optimizer = "adamw"
    c.train.warmup_steps = 1000
    c.train.ema_decay = 0.0
    c.eval = dict(
        num_images=200,
        seed=1234,
        bootstraps=200,
        teacher_guidance=5.0,
        teacher_steps=(25, 1, 2),
        student_steps=(1, 2, 4),
    )
    return c


def sfd_block() -> dict:
    """Score Forgetting Distillation's concept override (SiD: with its remain/forget coefficients; DMD2: the teacher
    alone is asked the override)."""
    return dict(
        forget_concept="",  # ";"-separated words; "" = plain SiD
        override_prompt="",  # what the teacher is asked instead
        override_mode="word",  # "word": the concept word is replaced in the prompt; "prompt": the whole prompt is
        remain_weight=1.0,
        forget_weight=0.01,
        forget_batch_size=-1,  # extra rows of forget prompts per phase; -1 = train.batch_size (SFD's forget batch)
    )
