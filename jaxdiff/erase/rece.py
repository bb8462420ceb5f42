"""RECE — Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024; CharlesGong12/RECE 403a67f).

Starting from a UCE-edited model, each epoch
1. finds, per concept, the closed-form *regenerating* embedding c' that makes the edited K/V layers reproduce
   the original model's K/V of the concept (`close_form_emb_regzero`, the variant the released scripts use):

       c' = argmin Σ_l ||W'_l c' − W_l c||² + λ_reg ||c'||²   ⇒   c'ᵀ = (Σ_l W'_lᵀ W'_l + λ_reg I)⁻¹ (Σ_l W'_lᵀ W_l) cᵀ

   per token (all L rows of c), the sum running over all edited/original K and V pairs;
2. erases every c' with one UCE edit (`edit_model_adversarial`) anchored at the *current* matrices W_cur:

       W ← (λ₂ W_cur + s_e Σ_k (W_cur n_k) c'_kᵀ + λ₁ Σ_k (W_cur r_k) r_kᵀ)
           · (λ₂ I + s_e Σ_k c'_k c'_kᵀ + λ₁ Σ_k r_k r_kᵀ)⁻¹

   over all L token rows of c' (mapped position-wise onto the neutral target n, the embedding of " ") and of
   the retain prompts r = the empty prompt "" and the preserved prompts (`retain_texts = [''] + preserve_concepts`
   of train_object.py).

Defaults (scripts/nudity.sh): λ₂ = lamb = 0.1, λ₁ = preserve_scale = 0.1, s_e = 1, "replace"; λ_reg 0.1 for
nudity (3 epochs) / unsafe, 1e-3 for artistic styles and hard objects (1 epoch). The official loop keeps the
epoch whose validation images score lowest (NudeNet rate); here that is the `validate(params, epoch) -> float`
callback (lower is better). On `shapes` it scores the probe's concept rate on validation captions that share no
prompt with the evaluation and attack prompts (`validation_prompts`, recorded in the report's info).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.erase import evaluate as ev
from jaxdiff.erase import ridge, uce
from jaxdiff.erase.common import ONE_OFF
from jaxdiff.erase.job import Job, Result, probe
from jaxdiff.erase.registry import MethodInfo
from jaxdiff.erase.uce import TECHNIQUES, tensor_values
from jaxdiff.errors import UserError

METHOD = MethodInfo(kind="closed_form", order=20)
# The config settings that regularise the erase edit, named when it is refused as ill-conditioned (ridge.edit).
SETTINGS = "--config.rece.lam (λ₂) or --config.rece.preserve_scale (λ₁), or add preserved prompts (--config.preserve)"


def embedding_system(edited: dict, original: dict):
    """(A, B) = (Σ W'ᵀW', Σ W'ᵀW) [d_in, d_in] over all matrices (float32). One product per matrix: measured
    faster on CPU than one GEMM over the concatenated rows."""
    d = next(iter(edited.values())).shape[1]
    A = jnp.zeros((d, d), jnp.float32)
    B = jnp.zeros((d, d), jnp.float32)
    for name, we in edited.items():
        we, wo = jnp.asarray(we, jnp.float32), jnp.asarray(original[name], jnp.float32)
        A = A + jnp.matmul(we.T, we, precision=ridge.HIGHEST)
        B = B + jnp.matmul(we.T, wo, precision=ridge.HIGHEST)
    return A, B


def _regenerating_embedding(edited, original, c, reg):
    A, B = embedding_system(edited, original)
    coef = jnp.linalg.solve(A + reg * jnp.eye(A.shape[0], dtype=jnp.float32), B)
    return jnp.matmul(c, coef.T, precision=ridge.HIGHEST)


_regenerating_embedding_jit = jax.jit(_regenerating_embedding, compiler_options=ONE_OFF)


def regenerating_embedding(edited: dict, original: dict, c, reg: float):
    """c' = c @ coefᵀ with coef = solve(Σ W'ᵀW' + reg I, Σ W'ᵀW) (a linear solve, not RECE's explicit inverse).
    c: [..., L, D] text-encoder hidden states of the concept prompt; returns the same shape. One compiled
    program (unoptimised XLA: it runs once; the time is in the library matmuls and LU)."""
    f32 = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    return _regenerating_embedding_jit(f32(edited), f32(original), jnp.asarray(c, jnp.float32), jnp.float32(reg))


def rece_edit(
    current: dict,
    adversarial,
    targets,
    retain,
    *,
    lam: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 0.1,
    technique: str = "replace",
) -> tuple[dict, float]:
    """One RECE erase step: adversarial [K, L, D] rows mapped onto W_cur · targets [K, L, D] rows (position-wise),
    retain [R, L, D] rows kept at W_cur r; anchored at W_cur (λ = lamb). Returns ({name: W'}, the solve's
    condition number)."""
    if technique not in TECHNIQUES:
        raise UserError(f"unknown technique {technique!r}; choose from {TECHNIQUES}")
    adv = jnp.asarray(adversarial, jnp.float32)
    tgt = jnp.broadcast_to(jnp.asarray(targets, jnp.float32), adv.shape)
    ctx, src = adv.reshape(-1, adv.shape[-1]), tgt.reshape(-1, tgt.shape[-1])
    if technique == "replace":
        terms = [ridge.Term(ctx, erase_scale, sources=src)]
    else:
        seg = np.repeat(np.arange(adv.shape[0]), adv.shape[1])
        terms = [ridge.Term(ctx, erase_scale, values=tensor_values(current, ctx, src, seg))]
    if retain is not None:
        r = jnp.asarray(retain, jnp.float32).reshape(-1, adv.shape[-1])
        terms.append(ridge.Term(r, preserve_scale, sources=r))
    return ridge.edit(current, terms, lam, settings=SETTINGS)


def rece(
    params,
    original_params,
    concepts,
    targets,
    retain=None,
    *,
    epochs: int = 1,
    reg: float = 1e-3,
    lam: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 0.1,
    technique: str = "replace",
    validate: Callable[[object, int], float] | None = None,
    validate_initial: bool = False,
    with_to_k: bool = True,
):
    """RECE on a UCE-edited UNet `params` (original weights `original_params`): alternate the regenerating-embedding
    solve and the erase edit for `epochs` epochs.

    concepts [K, L, D]: text embeddings of the erased concepts; targets [K, L, D] or [L, D]: of the neutral
    target (" "); retain [R, L, D]: of the retain prompts (RECE: "" and the preserved prompts, `retain_prompts`).
    validate(params, epoch) -> score (lower is better) picks the epoch returned; without it the last epoch is
    returned. `validate_initial` also scores the starting (UCE) model as epoch 0.

    Returns (params, info) with info = {"history": [{epoch, score, seconds, adversarial_norm, condition_number}],
    "best_epoch", "condition_number" (the largest of the epochs' erase solves)}.
    """
    names = ridge.KV_NAMES if with_to_k else ("to_v",)
    original = ridge.get_kv(original_params, names)
    current = ridge.get_kv(params, names)
    concepts = jnp.asarray(concepts, jnp.float32)
    if concepts.ndim == 2:
        concepts = concepts[None]
    history, best, best_score = [], (params, 0), None
    if validate is not None and validate_initial:
        best_score = float(validate(params, 0))
        history.append({"epoch": 0, "score": best_score, "seconds": 0.0})
    out_params = params
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        adversarial = regenerating_embedding(current, original, concepts, reg)
        current, condition = rece_edit(
            current,
            adversarial,
            targets,
            retain,
            lam=lam,
            erase_scale=erase_scale,
            preserve_scale=preserve_scale,
            technique=technique,
        )
        jax.block_until_ready(current)
        seconds = time.perf_counter() - start
        out_params = ridge.set_kv(params, current)
        record = {"epoch": epoch, "seconds": seconds, "adversarial_norm": float(jnp.linalg.norm(adversarial))}
        record["condition_number"] = condition
        if validate is not None:
            score = float(validate(out_params, epoch))
            record["score"] = score
            if best_score is None or score < best_score:
                best, best_score = (out_params, epoch), score
        history.append(record)
    if validate is None:
        best = (out_params, epochs)
    conditions = [h["condition_number"] for h in history if "condition_number" in h]
    return best[0], {"history": history, "best_epoch": best[1], "condition_number": max(conditions, default=None)}


# ------------------------------------------------------------------------------------------- the method


def retain_prompts(preserve_prompts: list[str]) -> list[str]:
    """RECE's retain set: the empty prompt, always kept, then the preserved prompts (train_object.py)."""
    return ["", *preserve_prompts]


def validation_prompts(job: Job, concept: ev.Concept) -> tuple[list[str], dict]:
    """The prompts that pick RECE's epoch: captions of the concept that are none of the prompts that score the
    run (`ev.scoring_prompts` of its eval block), so the epoch is not chosen on the test set. Returns (prompts, the
    record kept in the report)."""
    e = job.config.eval
    test = ev.scoring_prompts(concept, int(e.num_images), int(e.seed), int(e.attack_images) if e.attacks else 0)
    seed = job.config.seed + 99
    prompts = ev.validation_captions(concept, int(job.config.rece.num_validation_prompts), seed, test)
    record = {
        "prompts": prompts,
        "seed": seed,
        "rule": "captions of the concept (train and held-out templates) outside the evaluation and attack prompts",
        "excluded_test_prompts": len(test),
    }
    return prompts, record


def run(job: Job) -> Result:
    """RECE: UCE, then epochs of regenerating-embedding edits (validated on the shapes probe when asked)."""
    start = uce.run(job)
    o = job.config.rece
    concepts = job.context(job.concept_prompts)
    targets = job.context([job.anchor or " "])[0]
    retain = job.context(retain_prompts(job.preserve_prompts))
    validate, validation = None, {}
    if o.validate and job.is_shapes:
        concept = ev.resolve(job.concepts[0])
        prompts, validation = validation_prompts(job, concept)
        latents = ev.noise(len(prompts), job.latent_shape, job.config.seed + 99)

        def validate(params, epoch):  # fraction of validation images still showing the concept (lower is better)
            return ev.attack_success(probe(), concept, job.images(prompts, latents, params))

    params, info = rece(
        start.unet_params,
        job.original,
        concepts,
        targets,
        retain,
        epochs=o.epochs,
        reg=o.reg,
        lam=o.lam,
        erase_scale=o.erase_scale,
        preserve_scale=o.preserve_scale,
        technique=o.technique,
        validate=validate,
        validate_initial=o.validate_initial,
        with_to_k=job.config.uce.with_to_k,
    )
    if validation:
        info["validation"] = validation
    return Result(params, {"uce": start.info, **info})
