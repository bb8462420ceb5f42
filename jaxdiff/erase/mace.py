"""MACE — Mass Concept Erasure (Lu et al., CVPR 2024; Shilin-LU/MACE): the two closed-form parts.

(1) Closed-form refinement (`cfr`, `src/cfr_utils.py::closed_form_refinement`) of every attn2 K/V matrix: the
residual tokens of prompts containing the concept (common prefix, common suffix and the padding/EoT tail,
`find_matching_indices` extended to L) are mapped onto the matching tokens of the same prompt with the concept
replaced by the mapping concept ("a person wearing clothes" for nudity):

    W' = (Σ v cᵀ + ρ S_vc + λW)(Σ c cᵀ + ρ S_cc + λI)⁻¹,   v = W_old c_new,  λ = 0,  ρ = 7e-7

S = a cache over many captions' tokens (MACE: all COCO-2014 captions, all 77 tokens; S_vc = W_old S_cc).
Quirk kept as an option: the official common branch applies the preserve scale twice (ρ²); default on.

(3) Closed-form multi-LoRA fusion (`fuse`, `src/fuse_lora_close_form.py`):
    W = argmin Σ_i Σ_{c∈E_i} ||W c − (W_0 + ΔW_i) c||² + ρ_f Σ_cache ||W c − W_0 c||²,  ρ_f = 7e-7,
with E_i all L tokens of the prompts of concept i. The LoRA training of part (2) (attention-map suppression on
Grounded-SAM masks) is not implemented.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.erase import ridge
from jaxdiff.erase.common import Encoded, pair_token_indices
from jaxdiff.erase.config import split_list
from jaxdiff.erase.job import Job, Result
from jaxdiff.erase.registry import MethodInfo
from jaxdiff.errors import UserError

METHOD = MethodInfo(kind="closed_form", order=30)
# The config settings that regularise the edit, named when it is refused as ill-conditioned (ridge.edit).
SETTINGS = (
    "--config.mace.lam (λ) or --config.mace.preserve_scale (ρ; squared with square_preserve_scale), or add "
    "preserved prompts to the cache (--config.preserve or --config.mace.cache_prompts)"
)


def residual_rows(old: Encoded, new: Encoded):
    """Contexts (old rows) and sources (new rows) of MACE's residual tokens for each (old i, new i) pair."""
    if len(old) != len(new):
        raise ValueError(f"{len(old)} concept prompts for {len(new)} mapped prompts (they pair one to one)")
    ctx, src = [], []
    for i in range(len(old)):
        oi, ni = pair_token_indices(old, i, new, i, "residual")
        ctx.append(old.emb[i, np.asarray(oi)])
        src.append(new.emb[i, np.asarray(ni)])
    return jnp.concatenate(ctx), jnp.concatenate(src)


def _rho(preserve_scale, square):
    return preserve_scale**2 if square else preserve_scale


def cfr(
    params,
    old: Encoded,
    new: Encoded,
    cache_cc=None,
    *,
    lam: float = 0.0,
    preserve_scale: float = 7e-7,
    square_preserve_scale: bool = True,
    with_to_k: bool = True,
):
    """MACE closed-form refinement on a UNet param tree: (edited params, info)."""
    start = time.perf_counter()
    mats = ridge.get_kv(params, ridge.KV_NAMES if with_to_k else ("to_v",))
    ctx, src = residual_rows(old, new)
    rho = _rho(preserve_scale, square_preserve_scale)
    preserve = None if cache_cc is None else ridge.Preserve(jnp.asarray(cache_cc, jnp.float32), rho)
    if preserve is None and lam == 0:
        raise UserError("MACE CFR with lam=0 needs a preservation cache (cache_cc) to be well posed")
    new_mats, condition = ridge.edit(mats, [ridge.Term(ctx, 1.0, sources=src)], lam, preserve, settings=SETTINGS)
    jax.block_until_ready(new_mats)
    return ridge.set_kv(params, new_mats), {
        "rows": int(ctx.shape[0]),
        "rho": rho,
        "condition_number": condition,
        "seconds": time.perf_counter() - start,
    }


def fuse(
    params,
    deltas: list[dict],
    concepts: list,
    cache_cc=None,
    *,
    rho: float = 7e-7,
    lam: float = 0.0,
    with_to_k: bool = True,
):
    """Fuse per-concept LoRA updates of the K/V matrices in closed form. deltas[i]: {name: ΔW_i [d_out, d_in]}
    (PyTorch convention, names as `ridge.get_kv`); concepts[i]: the concept's prompt embeddings [n_i, L, D] (all
    tokens enter). Returns (params, info)."""
    start = time.perf_counter()
    mats = ridge.get_kv(params, ridge.KV_NAMES if with_to_k else ("to_v",))
    terms = []
    for delta, emb in zip(deltas, concepts, strict=True):
        emb = jnp.asarray(emb, jnp.float32)
        rows = emb.reshape(-1, emb.shape[-1])
        tuned = {n: w + jnp.asarray(delta[n], jnp.float32) if n in delta else w for n, w in mats.items()}
        terms.append(ridge.Term(rows, 1.0, sources=rows, value_mats=tuned))
    preserve = None if cache_cc is None else ridge.Preserve(jnp.asarray(cache_cc, jnp.float32), rho)
    new_mats, condition = ridge.edit(mats, terms, lam, preserve, settings="lam (λ) or rho (ρ_f, fuse_preserve_scale)")
    jax.block_until_ready(new_mats)
    info = {"concepts": len(deltas), "condition_number": condition, "seconds": time.perf_counter() - start}
    return ridge.set_kv(params, new_mats), info


# ------------------------------------------------------------------------------------------- the method


def run(job: Job) -> Result:
    """MACE's closed-form refinement mapping the concept prompts onto the anchor's."""
    o = job.config.mace
    old = job.encode(job.concept_prompts)
    new = job.encode(job.replaced(job.concept_prompts, job.anchor))
    cache = None
    if o.cache_prompts:
        enc = job.encode(split_list(o.cache_prompts))
        cache = ridge.context_cache(enc.emb, enc.lengths)
    else:
        cache = job.preservation_cache()
    params, info = cfr(
        job.original,
        old,
        new,
        cache,
        lam=o.lam,
        preserve_scale=o.preserve_scale,
        square_preserve_scale=o.square_preserve_scale,
        with_to_k=o.with_to_k,
    )
    return Result(params, info)
