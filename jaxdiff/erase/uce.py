"""UCE — Unified Concept Editing (Gandikota et al., WACV 2024), closed form on every cross-attention K/V matrix.

For each W (PyTorch convention [d_out, d_in]; see `jaxdiff.erase.ridge`), paper Eq. 7:

    W' = (λ W_old + s_e Σ_{i∈E} v_i* c_iᵀ + s_p Σ_{j∈P} (W_old c_j) c_jᵀ)
         · (λ I + s_e Σ_{i∈E} c_i c_iᵀ + s_p Σ_{j∈P} c_j c_jᵀ)⁻¹

with c_i the edited concept's token vectors, v_i* = W_old c_i^guide ("replace") or the "tensor" variant
v* = W_old c_g − ⟨u, W_old c_g⟩ u, u = W_old c_i / ||W_old c_i||_F (over the pair's rows, as the paper-era code).

Token choices (`edit_tokens`, `preserve_tokens`, see `jaxdiff.erase.common.pair_token_indices`):
- default = the current official code (`trainscripts/uce_sd_erase.py`, HEAD 28c81ed): one vector per prompt, the
  last word token (attention_mask.sum() − 2) for edit, guide and preserve prompts alike; λ 0.5, s_e 1, s_p 1;
- "paper" preset (`train-scripts/train_erase.py`, 35e91e2): edit "last_word_to_end" (the last word token to the
  end of the sequence, aligned with the guide's slice, both trimmed to equal length), preserve "all" 77 tokens,
  the empty prompt always preserved, guide "" replaced by " ", s_p = max(0.1, 1/#retain) (these prompt-level
  choices live in configs/erase/uce.py).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.erase import ridge
from jaxdiff.erase.common import Encoded, pair_token_indices, token_indices
from jaxdiff.erase.job import Job, Result
from jaxdiff.erase.registry import MethodInfo
from jaxdiff.errors import UserError

METHOD = MethodInfo(kind="closed_form", order=10)
# The config settings that regularise the edit, named when it is refused as ill-conditioned (ridge.edit).
SETTINGS = "--config.uce.lam (λ) or --config.uce.preserve_scale, or add preserved prompts (--config.preserve)"

TECHNIQUES = ("replace", "tensor")
# `--expand_prompts true` of the current code: 5 templates per (edit, guide) pair, added after the bare concepts.
EXPANSION_TEMPLATES = {
    "art": ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
    "object": ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"),
}


def expand_prompts(edit: list[str], guide: list[str], concept_type: str = "object") -> tuple[list[str], list[str]]:
    """The official prompt expansion: the bare pairs, then each pair under the 5 templates of its type."""
    if len(guide) == 1:
        guide = guide * len(edit)
    edit_out, guide_out = list(edit), list(guide)
    for e, g in zip(edit, guide, strict=True):
        for template in EXPANSION_TEMPLATES[concept_type]:
            edit_out.append(template.format(e))
            guide_out.append(template.format(g))
    return edit_out, guide_out


def default_preserve_scale(num_retain: int) -> float:
    """The paper-era rule: max(0.1, 1 / number of retained prompts)."""
    return max(0.1, 1.0 / max(1, num_retain))


def edit_rows(edit: Encoded, guide: Encoded, mode: str):
    """(contexts [n, D], guide sources [n, D], pair id [n]) of every (edit prompt, guide prompt) pair. A single
    guide prompt serves every edit prompt."""
    if len(guide) not in (1, len(edit)):
        raise ValueError(f"{len(guide)} guide prompts for {len(edit)} edit prompts (give one, or one per edit prompt)")
    ctx, src, seg = [], [], []
    for i in range(len(edit)):
        j = 0 if len(guide) == 1 else i
        oi, ni = pair_token_indices(edit, i, guide, j, mode)
        ctx.append(edit.emb[i, np.asarray(oi)])
        src.append(guide.emb[j, np.asarray(ni)])
        seg.append(np.full(len(oi), i, np.int32))
    return jnp.concatenate(ctx), jnp.concatenate(src), np.concatenate(seg)


def preserve_rows(preserve: Encoded, mode: str):
    """Contexts [n, D] of the preserved prompts (their values are W_old c)."""
    return jnp.concatenate(
        [preserve.emb[i, np.asarray(token_indices(preserve, i, mode))] for i in range(len(preserve))]
    )


def tensor_values(mats: dict, contexts, sources, segments) -> dict:
    """UCE's "tensor" targets per matrix: N − ⟨U, N⟩_F U per pair, U = O / ||O||_F, O = rows of W c_old, N = rows of
    W c_guide (the Frobenius products run over all rows of one pair, as `edit_model` does)."""
    segments = jnp.asarray(segments)
    n_seg = int(np.max(np.asarray(segments))) + 1

    @jax.jit
    def values(W):
        o = jnp.matmul(contexts, W.T, precision=ridge.HIGHEST)
        n = jnp.matmul(sources, W.T, precision=ridge.HIGHEST)
        norm = jnp.sqrt(jax.ops.segment_sum(jnp.sum(o * o, -1), segments, n_seg))
        u = o / norm[segments][:, None]
        proj = jax.ops.segment_sum(jnp.sum(u * n, -1), segments, n_seg)
        return n - proj[segments][:, None] * u

    return {name: values(w) for name, w in mats.items()}


def uce_mats(
    mats: dict,
    edit: Encoded,
    guide: Encoded,
    preserve: Encoded | None = None,
    *,
    lam: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float | None = 1.0,
    edit_tokens: str = "last_word",
    preserve_tokens: str = "last_word",
    technique: str = "replace",
) -> tuple[dict, float]:
    """UCE on a dict of K/V matrices {name: W_old [d_out, d_in]} -> ({name: W'}, the solve's condition number)."""
    if technique not in TECHNIQUES:
        raise UserError(f"unknown UCE technique {technique!r}; choose from {TECHNIQUES}")
    ctx, src, seg = edit_rows(edit, guide, edit_tokens)
    if technique == "replace":
        terms = [ridge.Term(ctx, erase_scale, sources=src)]
    else:
        terms = [ridge.Term(ctx, erase_scale, values=tensor_values(mats, ctx, src, seg))]
    if preserve is not None and len(preserve):
        if preserve_scale is None:
            preserve_scale = default_preserve_scale(len(preserve))
        p = preserve_rows(preserve, preserve_tokens)
        terms.append(ridge.Term(p, preserve_scale, sources=p))
    return ridge.edit(mats, terms, lam, settings=SETTINGS)


def uce(params, edit: Encoded, guide: Encoded, preserve: Encoded | None = None, *, with_to_k: bool = True, **options):
    """UCE on a UNet param tree: (edited params, info). `options` as `uce_mats` (lam, erase_scale, preserve_scale,
    edit_tokens, preserve_tokens, technique); `with_to_k=False` edits only the value projections."""
    start = time.perf_counter()
    mats = ridge.get_kv(params, ridge.KV_NAMES if with_to_k else ("to_v",))
    new, condition = uce_mats(mats, edit, guide, preserve, **options)
    jax.block_until_ready(new)
    info = {"matrices": len(new), "condition_number": condition, "seconds": time.perf_counter() - start}
    return ridge.set_kv(params, new), info


# ------------------------------------------------------------------------------------------- the method


def run(job: Job) -> Result:
    """UCE from the job's config: edit the concept prompts towards the anchor's (or ""), keep the preserved."""
    o = job.config.uce
    edit = job.concept_prompts
    guide = job.anchor_prompts if job.anchor.strip() else [" " if o.get("empty_guide_as_space", False) else ""]
    if o.get("expand_prompts", False):  # RECE's starting UCE block has only the edit options
        edit, guide = expand_prompts(edit, guide, o.concept_type)
    preserve = job.preserve_prompts + ([""] if o.get("preserve_empty", False) else [])
    params, info = uce(
        job.original,
        job.encode(edit),
        job.encode(guide),
        job.encode(preserve) if preserve else None,
        with_to_k=o.with_to_k,
        lam=o.lam,
        erase_scale=o.erase_scale,
        preserve_scale=None if o.preserve_scale < 0 else o.preserve_scale,
        edit_tokens=o.edit_tokens,
        preserve_tokens=o.preserve_tokens,
        technique=o.technique,
    )
    return Result(params, {**info, "edit_prompts": len(edit), "preserve_prompts": len(preserve)})
