"""The fields every configs/erase/<method>.py shares (ml_collections)."""

from __future__ import annotations

import ml_collections


def base_config(method: str) -> ml_collections.ConfigDict:
    """concept / preserve / anchor and the model; each method adds its own block `c.<method>` (and `c.train`
    for the fine-tuning methods).

    concept: the erased concept (several separated by ";"); synonyms: other names of it (used by evaluation and,
    where a method supports it, prompt expansion); preserve: concepts to keep (";"-separated); anchor: the
    concept the erased one is mapped to or replaced by ("" = the unconditional/empty prompt).
    """
    c = ml_collections.ConfigDict()
    c.method = method
    c.concept = "circle"
    c.synonyms = ""
    c.preserve = ""
    c.anchor = ""
    c.templates = ("{}",)  # prompts built from each concept; e.g. ("a photo of {}", "{}")
    c.model = "shapes"  # "shapes" or a diffusers / jaxdiff checkpoint folder
    c.seed = 0
    c.dtype = "float32"
    return c


def train_block(
    steps: int,
    learning_rate: float,
    batch_size: int = 1,
    selector: str = "esd-x",
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
) -> ml_collections.ConfigDict:
    """The optax loop settings of a fine-tuning method (the trainer reads them)."""
    t = ml_collections.ConfigDict()
    t.steps = steps
    t.learning_rate = learning_rate
    t.batch_size = batch_size
    t.selector = selector
    t.optimizer = optimizer
    t.weight_decay = weight_decay
    t.max_grad_norm = max_grad_norm  # 0: no clipping
    t.lr_schedule = "constant"
    t.warmup_steps = 0
    t.log_every = 10
    t.checkpoint_every = 0  # 0: only at the end
    return t


def split_list(value: str) -> list[str]:
    """ "a; b ;c" -> ["a", "b", "c"] (empty string -> [])."""
    return [x.strip() for x in value.split(";") if x.strip()] if value else []
