"""The fields every configs/erase/<method>.py shares (ml_collections)."""

from __future__ import annotations

import ml_collections

from jaxdiff.errors import UserError

AUTO = "auto"
OTHER_ANCHOR = "@other"  # config.anchor: the first other concept of the erased one's kind (shapes world)
# What `preserve=auto` keeps on a model other than `shapes` (Stable Diffusion and the like): common concepts.
COMMON_CONCEPTS = (
    "a person",
    "a man",
    "a woman",
    "a dog",
    "a cat",
    "a car",
    "a house",
    "a tree",
    "a flower",
    "a city street",
    "a landscape",
    "food on a plate",
)


def base_config(method: str) -> ml_collections.ConfigDict:
    """concept / preserve / anchor and the model; each method adds its own block `c.<method>` (and `c.train`
    for the fine-tuning methods).

    concept: the erased concept (several separated by ";"); synonyms: other names of it (used by evaluation and,
    where a method supports it, prompt expansion); preserve: concepts to keep (";"-separated; "auto" = the model's
    world, see `default_preserve`; "" = none); anchor: the concept the erased one is mapped to or replaced by
    ("" = the unconditional/empty prompt; "@other" = on shapes, the first other concept of its kind).
    """
    c = ml_collections.ConfigDict()
    c.method = method
    c.concept = "circle"
    c.synonyms = ""
    c.preserve = AUTO  # the model's world (default_preserve); "" preserves nothing
    c.anchor = ""
    c.templates = ("{}",)  # prompts built from each concept; e.g. ("a photo of {}", "{}")
    c.model = "shapes"  # "shapes" or a diffusers / jaxdiff checkpoint folder
    c.num_prompts = 0  # shapes model: add this many world captions naming each concept (and each preserved one)
    c.seed = 0
    c.dtype = "float32"
    # Fine-tuning mesh: the trainable leaves and the frozen UNet(s) are sharded by their logical axes, e.g.
    # fsdp=-1 spreads them over every device; the default runs on one device. (DoCo's step is not sharded yet.)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.eval = eval_block()
    return c


def eval_block() -> ml_collections.ConfigDict:
    """What `jaxdiff erase` measures after the edit (see jaxdiff/erase/evaluate.py) and the attack budgets."""
    e = ml_collections.ConfigDict()
    e.num_images = 32  # per prompt set (word, synonyms, held-out templates, preserved concepts)
    e.steps = 25
    e.guidance = -1.0  # < 0: the model's sampling_defaults.json (7.5 without one)
    e.scheduler = "ddim"
    e.seed = 1234
    # "test": the scoring prompts and seeds; "validation": prompts none of the test set's and other seeds, for
    # choosing settings (tools/erasure_sweep.py). test_num_images: the test set's num_images that validation avoids
    # (0 = num_images).
    e.split = "test"
    e.test_num_images = 0
    e.attacks = False  # also run the two attacks (regenerating embedding, soft prompt) and report success rates
    e.attack_images = 16
    e.attack_steps = 50  # Adam steps of the soft-prompt attack
    e.attack_tokens = 3  # optimised input embeddings prepended to the prompt
    e.attack_lr = 1e-2
    e.attack_reg = 1e-3  # ridge term of the regenerating-embedding solve
    return e


def train_block(
    steps: int,
    learning_rate: float,
    batch_size: int = 1,
    selector: str = "esd-x",
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
) -> ml_collections.ConfigDict:
    """The optax loop settings of a fine-tuning method (the trainer reads them), with the UNet selector it trains."""
    from jaxdiff.train.config import finetune_block

    t = finetune_block(
        steps, learning_rate, batch_size, optimizer=optimizer, weight_decay=weight_decay, max_grad_norm=max_grad_norm
    )
    t.selector = selector
    # Not in any paper: > 0 adds w · ‖ε_θ(x_t, c_p) − ε_θ*(x_t, c_p)‖² on the preserved concepts' captions (x_t: the
    # original model's samples of them, noised at t ~ U[0, T)), a retain loss for the methods that fine-tune the
    # UNet's leaves (esd, ablation, all_but_one, trce); 0 keeps each method as published.
    t.retain_weight = 0.0
    t.retain_images = 64
    return t


def split_list(value: str) -> list[str]:
    """ "a; b ;c" -> ["a", "b", "c"] (empty string -> [])."""
    return [x.strip() for x in value.split(";") if x.strip()] if value else []


def resolve_anchor(anchor: str, concepts: list[str], is_shapes: bool) -> str:
    """The anchor a run maps the erased concept to: `anchor` as given, or for OTHER_ANCHOR ("@other") the first
    other concept of the erased one's kind in the shapes world (circle -> square, red -> green), so that one preset
    serves every target. On shapes an edit towards "" cannot remove a circle (prompts without a shape word draw
    circles); UCE guided to "@other" erases 88-91 % of circles validly (docs/erasure_sweep.md)."""
    anchor = str(anchor)
    if anchor.strip() != OTHER_ANCHOR:
        return anchor
    if not is_shapes:
        raise UserError(
            f"config.anchor={OTHER_ANCHOR} (another concept of the erased one's kind) needs the shapes model; "
            "name the anchor concept instead, e.g. --config.anchor=dog"
        )
    from jaxdiff.erase import evaluate as ev

    return ev.resolve(concepts[0]).others[0]


def default_preserve(concepts: list[str], is_shapes: bool) -> list[str]:
    """What `preserve=auto` keeps: on `shapes`, the world's other concepts of the erased one's kind (the other
    shapes, or the other colours: what the scorecard preserves and the evaluation's "preserved" prompts name);
    elsewhere COMMON_CONCEPTS. An edit without any preservation term wrecks the rest of the model: UCE erasing
    "circle" on shapes without it leaves green blobs for "a blue triangle". (Preserving every other concept, both
    kinds, did no better for UCE on circle: preserved shape/colour 53 %/53 % vs 69 %/66 %, n = 32, both judges.)"""
    if not is_shapes:
        return list(COMMON_CONCEPTS)
    from jaxdiff.erase import evaluate as ev

    resolved = [ev.resolve(c) for c in concepts]
    erased = {c.name for c in resolved}
    kinds = dict.fromkeys(c.kind for c in resolved)
    return [name for kind in kinds for name in ev.KINDS[kind] if name not in erased]
