"""The closed-form ridge edit shared by UCE, RECE, TRCE stage 1 and MACE, and access to the cross-attention
K/V projections of a UNet param tree.

Convention: all the math here is written for PyTorch's Linear weight W [d_out, d_in] (y = W c). Flax's
Dense kernel is its transpose ([d_in, d_out], y = c @ kernel); `get_kv` / `set_kv` transpose at the boundary,
so `W = kernel.T` and `kernel = W'.T`.

The edit of one matrix W, for context rows C [n, d_in], target value rows V [n, d_out] and weights w [n]:

    W' = (λ W_anchor + Σ_k w_k v_k c_kᵀ + ρ S_vc) (λ I + Σ_k w_k c_k c_kᵀ + ρ S_cc)⁻¹

which minimises Σ_k w_k ||W c_k − v_k||² + λ ||W − W_anchor||²_F + ρ Σ_j ||W p_j − W_ref p_j||² when the cache
S_cc = Σ_j p_j p_jᵀ, S_vc = Σ_j (W_ref p_j) p_jᵀ. It is solved in float32 with a linear solve
(W'ᵀ = solve(M2ᵀ, M1ᵀ)), never an explicit inverse, over the stacked matrices of each shape. Because the contexts
are text vectors shared by all layers, M2 is the same for every matrix and is factorised once; when every value
is the anchor applied to a source vector (UCE, RECE, TRCE stage 1, MACE CFR), M1 = W F and the edit is
W' = W · solve(M2ᵀ, Fᵀ)ᵀ, a single d_in x d_in solve followed by one batched matmul per shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.erase.common import ONE_OFF
from jaxdiff.errors import UserError
from jaxdiff.selectors import Path, flatten, path_str, unflatten

HIGHEST = jax.lax.Precision.HIGHEST
KV_NAMES = ("to_k", "to_v")
# The largest condition number (2-norm, of λI + Σ w c cᵀ + ρ S_cc in float64) of an edit `edit` accepts. The solve
# runs in float32 (unit roundoff 2⁻²⁴ ≈ 6e-8), whose relative error is bounded by about κ·2⁻²⁴: at κ = 1e8 that
# bound is ~6, no correct digit along the directions the contexts barely span, so the edit there is rounding noise.
# A rank-deficient system with λ = 0 reads 1e16 or more; well-posed edits (λ > 0, or contexts and a cache that span
# the space) read far less.
MAX_CONDITION = 1e8

# ------------------------------------------------------------------------------------ K/V access


def kv_paths(params, names: Sequence[str] = KV_NAMES) -> list[Path]:
    """Module paths of every cross-attention (`attn2`) projection in `names`, in param-tree order."""
    return [
        p[:-1] for p in flatten(params) if p[-1] == "kernel" and len(p) >= 3 and p[-3] == "attn2" and p[-2] in names
    ]


# All the kernels <-> W transposes of an edit in one compiled program (one dispatch instead of 32).
_transpose = jax.jit(lambda mats: {n: w.T for n, w in mats.items()}, compiler_options=ONE_OFF)


def get_kv(params, names: Sequence[str] = KV_NAMES) -> dict[str, jax.Array]:
    """{"down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k": W [d_out, d_in] float32, ...}
    (PyTorch convention: the transpose of the Flax kernel)."""
    flat = flatten(params)
    kernels = {path_str(p): jnp.asarray(flat[p + ("kernel",)], jnp.float32) for p in kv_paths(params, names)}
    if not kernels:
        raise ValueError("no cross-attention (attn2) to_k/to_v kernels in these params: is this a UNet param tree?")
    return _transpose(kernels)


def set_kv(params, mats: dict[str, jax.Array]):
    """A copy of `params` whose attn2 kernels named in `mats` are replaced by W.T (in the kernel's dtype)."""
    flat = flatten(params)
    for name, w in mats.items():
        key = tuple(name.split("/")) + ("kernel",)
        if key not in flat:
            raise KeyError(f"{name} is not a kernel of these params")
        old = flat[key]
        if tuple(w.shape[::-1]) != tuple(old.shape):
            raise ValueError(
                f"{name}: W has shape {tuple(w.shape)}, the kernel is {tuple(old.shape)} (W must be its transpose)"
            )
    for name, k in _transpose({n: jnp.asarray(w) for n, w in mats.items()}).items():
        key = tuple(name.split("/")) + ("kernel",)
        flat[key] = k if k.dtype == flat[key].dtype else k.astype(flat[key].dtype)
    return unflatten(flat)


def torch_name(name: str) -> str:
    """diffusers' parameter name of a Flax module path: down_blocks_0/... -> down_blocks.0....weight."""
    import re

    return re.sub(r"_(\d+)(?=/|$)", r".\1", name).replace("/", ".") + ".weight"


def group_by_shape(mats: dict[str, jax.Array]) -> dict[tuple[int, int], list[str]]:
    groups: dict[tuple[int, int], list[str]] = {}
    for name, w in mats.items():
        groups.setdefault(tuple(w.shape), []).append(name)
    return groups


# ----------------------------------------------------------------------------------------- the kernel


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def moments(C, V=None, w=None):
    """(Σ_k w_k v_k c_kᵀ [d_out, d_in] or None, Σ_k w_k c_k c_kᵀ [d_in, d_in]) for rows C [n, d_in], V [n, d_out]."""
    C = _f32(C)
    w = jnp.ones((C.shape[0],), jnp.float32) if w is None else jnp.broadcast_to(_f32(w), (C.shape[0],))
    wc = C * w[:, None]
    cc = jnp.matmul(wc.T, C, precision=HIGHEST)
    vc = None if V is None else jnp.matmul(_f32(V).T, wc, precision=HIGHEST)
    return vc, cc


def ridge_solve(W, VC, CC, lam):
    """One matrix: W' = (λW + VC)(λI + CC)⁻¹ via W'ᵀ = solve((λI + CC)ᵀ, (λW + VC)ᵀ). VC holds Σ w v cᵀ (+ ρ S_vc),
    CC holds Σ w c cᵀ (+ ρ S_cc)."""
    W, VC, CC = _f32(W), _f32(VC), _f32(CC)
    m1 = lam * W + VC
    m2 = lam * jnp.eye(W.shape[1], dtype=jnp.float32) + CC
    return jnp.linalg.solve(m2.T, m1.T).T


@jax.jit
def _solve_shared(M1, CC, lam):
    # M1 [R, i]: the λW + VC rows of any number of matrices that share CC. One factorisation of λI + CC, all
    # right-hand sides solved together (measured 1.7x faster than a vmapped solve, which factorises per matrix).
    m2 = lam * jnp.eye(CC.shape[0], dtype=jnp.float32) + CC
    return jnp.linalg.solve(m2.T, M1.T).T


def _anchor_edit_impl(mats, rows, s_cc, rho, lam):
    d = s_cc.shape[0]
    eye = jnp.eye(d, dtype=jnp.float32)
    cc = rho * s_cc
    f = lam * eye + rho * s_cc
    for C, S, w in rows:
        wc = C * jnp.broadcast_to(w, (C.shape[0],))[:, None]
        cc = cc + jnp.matmul(wc.T, C, precision=HIGHEST)
        f = f + jnp.matmul(S.T, wc, precision=HIGHEST)
    X = jnp.linalg.solve((lam * eye + cc).T, f.T).T
    out = {}
    for _, names in group_by_shape(mats).items():
        W = jnp.stack([mats[n] for n in names])
        out.update(zip(names, list(jnp.matmul(W, X, precision=HIGHEST))))
    return out, jnp.all(jnp.isfinite(X))


# A closed-form edit runs once per shape set: unoptimised XLA compiles it 3x faster and runs as fast (the time
# is in the matmul and LU library calls).
_anchor_edit = jax.jit(_anchor_edit_impl, compiler_options=ONE_OFF)


@jax.jit
def _solve_per_layer(W, VC, CC, lam):
    return jax.vmap(ridge_solve, in_axes=(0, 0, 0, None))(W, VC, CC, lam)


def ridge_solve_layers(W, VC, CC, lam):
    """Stacked matrices of one shape: W [G, o, i], VC [G, o, i], CC [i, i] (shared) or [G, i, i] (per matrix).
    With a shared CC the G right-hand sides are solved against one factorisation (the same result as
    vmapping `ridge_solve` over the stack)."""
    W, VC, CC, lam = _f32(W), _f32(VC), _f32(CC), jnp.float32(lam)
    if jnp.ndim(CC) == 3:
        return _solve_per_layer(W, VC, CC, lam)
    g, o, i = W.shape
    return _solve_shared((lam * W + VC).reshape(g * o, i), CC, lam).reshape(g, o, i)


def ridge_edit(W, C, V, w=None, lam: float = 0.0, S_vc=None, S_cc=None, rho: float = 0.0):
    """The edit of a single matrix from explicit rows: (λW + Σ w V Cᵀ + ρ S_vc)(λI + Σ w C Cᵀ + ρ S_cc)⁻¹."""
    vc, cc = moments(C, V, w)
    if S_cc is not None:
        cc = cc + rho * _f32(S_cc)
        vc = vc + rho * _f32(S_vc)
    return ridge_solve(W, vc, cc, lam)


# --------------------------------------------------------------------------- edits over many matrices


@dataclasses.dataclass
class Term:
    """A set of (context, value) pairs entering Σ w v cᵀ and Σ w c cᵀ for every edited matrix.

    contexts [n, d_in]; weights [n] or a scalar. Values are either `W_src @ sources[k]` per matrix (sources
    [n, d_in]; W_src = `value_mats[name]`, default the anchor being edited), or given per matrix in `values`
    ({name: [n, d_out]}).
    """

    contexts: jax.Array
    weights: jax.Array | float = 1.0
    sources: jax.Array | None = None
    value_mats: dict[str, jax.Array] | None = None
    values: dict[str, jax.Array] | None = None

    def __post_init__(self):
        if (self.sources is None) == (self.values is None):
            raise ValueError("a Term needs exactly one of sources= (values W_src @ source) or values= (explicit)")
        if self.sources is not None and np.shape(self.sources) != np.shape(self.contexts):
            raise ValueError(f"sources {np.shape(self.sources)} and contexts {np.shape(self.contexts)} differ in shape")


@dataclasses.dataclass
class Preserve:
    """A cached preservation term ρ (S_vc, S_cc): S_cc = Σ_j p_j p_jᵀ over cached contexts (e.g. MACE's COCO
    cache), S_vc = W_ref S_cc with W_ref = `value_mats[name]` (default: the anchor), or given per matrix."""

    S_cc: jax.Array
    rho: float
    value_mats: dict[str, jax.Array] | None = None
    S_vc: dict[str, jax.Array] | None = None


def context_cache(emb, lengths=None) -> jax.Array:
    """S_cc = Σ c cᵀ over all tokens of emb [B, L, D] (or the first lengths[b] tokens of each prompt)."""
    emb = _f32(emb)
    if lengths is not None:
        keep = (np.arange(emb.shape[1])[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
        emb = emb * keep[..., None]
    flat = emb.reshape(-1, emb.shape[-1])
    return jnp.matmul(flat.T, flat, precision=HIGHEST)


def _stack(mats: dict[str, jax.Array], names: list[str]) -> jax.Array:
    return jnp.stack([_f32(mats[n]) for n in names])


class IllConditionedEdit(UserError, FloatingPointError):
    """A closed-form edit whose system is singular or too ill-conditioned to solve in float32."""


DEFAULT_SETTINGS = "lam (λ) or the preservation weight (ρ / preserve_scale), or give more preserved prompts"


def _check_finite(x, settings: str = DEFAULT_SETTINGS):
    if not bool(jnp.all(jnp.isfinite(x))):
        raise IllConditionedEdit(
            f"the ridge edit is singular or too ill-conditioned in float32 (non-finite result): raise {settings}"
        )


def system_matrix(terms: Sequence[Term], lam: float, preserve: Preserve | None, d: int) -> np.ndarray:
    """λI + Σ w c cᵀ (+ ρ S_cc) [d, d] in float64 (numpy): the matrix every edited W's solve factorises."""
    m = lam * np.eye(d)
    for t in terms:
        C = np.asarray(t.contexts, np.float64)
        w = np.broadcast_to(np.asarray(t.weights, np.float64), (C.shape[0],))
        m += (C * w[:, None]).T @ C
    if preserve is not None:
        m += preserve.rho * np.asarray(preserve.S_cc, np.float64)
    return m


def condition_number(terms: Sequence[Term], lam: float, preserve: Preserve | None = None) -> float:
    """The 2-norm condition number σ_max/σ_min of the edit's `system_matrix` (inf when it is not finite)."""
    d = int(np.shape(terms[0].contexts if terms else preserve.S_cc)[-1])
    m = system_matrix(terms, lam, preserve, d)
    return float(np.linalg.cond(m)) if np.all(np.isfinite(m)) else float("inf")


def edit(
    mats: dict[str, jax.Array],
    terms: Sequence[Term],
    lam: float,
    preserve: Preserve | None = None,
    *,
    settings: str = DEFAULT_SETTINGS,
    max_condition: float = MAX_CONDITION,
) -> tuple[dict[str, jax.Array], float]:
    """Edit every matrix of `mats` ({name: W [d_out, d_in]}, the anchors W_anchor) in closed form; matrices of
    the same shape are stacked and edited together against one shared factorisation. Returns ({name: W'} in
    float32, the system's condition number). IllConditionedEdit (a UserError naming `settings`, the method's
    config settings that regularise the edit) when the condition number exceeds `max_condition` or the float32
    solve is not finite."""
    if not terms and preserve is None:
        raise ValueError("nothing to edit: no terms and no preserve cache")
    d_in = {int(w.shape[1]) for w in mats.values()}
    if len(d_in) != 1:
        raise ValueError(f"the edited matrices take inputs of different sizes {sorted(d_in)}")
    (d,) = d_in
    for t in terms:
        if np.shape(t.contexts)[-1] != d:
            raise ValueError(f"contexts have dimension {np.shape(t.contexts)[-1]}, the matrices take {d}")
    condition = condition_number(terms, lam, preserve)
    if not condition <= max_condition:
        raise IllConditionedEdit(
            f"the closed-form edit is ill-conditioned: the condition number of λI + Σ w c cᵀ + ρ S_cc is "
            f"{condition:.3g} (> {max_condition:.0e}), so its float32 solve would be rounding noise along the "
            f"directions the contexts do not span; raise {settings}"
        )

    anchor_only = all(t.sources is not None and t.value_mats is None for t in terms)
    anchor_only = anchor_only and (preserve is None or (preserve.S_vc is None and preserve.value_mats is None))
    if anchor_only:
        # Every value is W_anchor · s, so M1 = W F with F = λI + Σ w s cᵀ (+ ρ S_cc) and W' = W (F M2⁻¹): one
        # d_in x d_in solve X = solve(M2ᵀ, Fᵀ)ᵀ shared by all matrices, then W' = W X (half the work of solving
        # every matrix's rows), all in one compiled program. UCE, RECE, TRCE stage 1 and MACE's CFR take this path.
        rows = tuple((_f32(t.contexts), _f32(t.sources), _f32(t.weights)) for t in terms)
        s_cc = jnp.zeros((d, d), jnp.float32) if preserve is None else _f32(preserve.S_cc)
        rho = 0.0 if preserve is None else preserve.rho
        out, finite = _anchor_edit(
            {n: _f32(w) for n, w in mats.items()}, rows, s_cc, jnp.float32(rho), jnp.float32(lam)
        )
        if not bool(finite):
            _check_finite(jnp.asarray(jnp.nan), settings)
        return {n: out[n] for n in mats}, condition

    # General case. Σ w c cᵀ is the same for every matrix; Σ w v cᵀ = W_src (Σ w s cᵀ) for source terms.
    cc = jnp.zeros((d, d), jnp.float32)
    anchor_moment = jnp.zeros((d, d), jnp.float32)
    src_moments = []
    for t in terms:
        wv, wc = moments(t.contexts, t.sources, t.weights)  # wv is None for explicit-value terms
        cc = cc + wc
        if t.sources is not None:
            if t.value_mats is None:
                anchor_moment = anchor_moment + wv
            else:
                src_moments.append((t.value_mats, wv))
    # M1 = λW + Σ w v cᵀ + ρ S_vc = W (λI + anchor-valued moments) + the other terms.
    anchor_factor = lam * jnp.eye(d, dtype=jnp.float32) + anchor_moment
    if preserve is not None:
        cc = cc + preserve.rho * _f32(preserve.S_cc)
        if preserve.S_vc is None and preserve.value_mats is None:
            anchor_factor = anchor_factor + preserve.rho * _f32(preserve.S_cc)

    rows = []
    for _, names in group_by_shape(mats).items():
        W = _stack(mats, names)  # [G, d_out, d_in]: the matrices of one shape, edited together
        m1 = jnp.matmul(W, anchor_factor, precision=HIGHEST)
        for value_mats, m in src_moments:
            m1 = m1 + jnp.matmul(_stack(value_mats, names), m, precision=HIGHEST)
        for t in terms:
            if t.values is not None:
                C = _f32(t.contexts)
                w = jnp.broadcast_to(_f32(t.weights), (C.shape[0],))
                V = _stack(t.values, names)  # [G, n, o]
                m1 = m1 + jnp.einsum("gno,ni->goi", V, C * w[:, None], precision=HIGHEST)
        if preserve is not None and preserve.S_vc is not None:
            m1 = m1 + preserve.rho * _stack(preserve.S_vc, names)
        elif preserve is not None and preserve.value_mats is not None:
            ref = _stack(preserve.value_mats, names)
            m1 = m1 + preserve.rho * jnp.matmul(ref, _f32(preserve.S_cc), precision=HIGHEST)
        rows.append((m1.reshape(-1, d), names, W.shape))
    # One factorisation of λI + Σ w c cᵀ (+ ρ S_cc) for all matrices: the contexts are the same text vectors.
    solved = _solve_shared(jnp.concatenate([r for r, _, _ in rows]), cc, jnp.float32(lam))
    _check_finite(solved, settings)
    out, start = {}, 0
    for r, names, shape in rows:
        out.update(zip(names, list(solved[start : start + r.shape[0]].reshape(shape))))
        start += r.shape[0]
    return {n: out[n] for n in mats}, condition


def augmented_lstsq_problem(W, C, V, w, lam, P=None, W_ref=None, rho=0.0):
    """The same ridge problem as an ordinary least-squares system A X ≈ B with X = W'ᵀ (numpy, float64), for
    checking: rows sqrt(w_k) c_kᵀ -> sqrt(w_k) v_kᵀ, sqrt(λ) I -> sqrt(λ) W_anchorᵀ and
    sqrt(ρ) p_jᵀ -> sqrt(ρ)(W_ref p_j)ᵀ."""
    W, C, V = (np.asarray(x, np.float64) for x in (W, C, V))
    w = np.broadcast_to(np.asarray(1.0 if w is None else w, np.float64), (C.shape[0],))
    rows_a, rows_b = [np.sqrt(w)[:, None] * C], [np.sqrt(w)[:, None] * V]
    if lam:
        rows_a.append(np.sqrt(lam) * np.eye(W.shape[1]))
        rows_b.append(np.sqrt(lam) * W.T)
    if P is not None and rho:
        P = np.asarray(P, np.float64)
        rows_a.append(np.sqrt(rho) * P)
        rows_b.append(np.sqrt(rho) * P @ np.asarray(W_ref, np.float64).T)
    return np.concatenate(rows_a), np.concatenate(rows_b)
