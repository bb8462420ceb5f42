"""TRCE — Towards Reliable Malicious Concept Erasure (Chen et al., 2025; ddgoodgood/TRCE 0da9b71).

Stage 1 (`eot_mapping`): closed-form [EoT] mapping on every cross-attention K/V matrix (MACE-style ridge):

    W' = (mean_pairs Σ_p s_p·b_p v_p c_pᵀ + ρ S_vc / 3e4 + λW)(mean_pairs Σ_p s_p·b_p c_p c_pᵀ + ρ S_cc / 3e4 + λI)⁻¹

for (malicious prompt, safe prompt) pairs, token slots p = [SoT, first EoT, last padding/EoT, keyword tokens]
(contexts from the malicious prompt, values W_orig · the safe prompt's row at the matching slot: [0, first EoT,
L−1, L−1]), weight_base b = [1, 1, L − n_words − 2, 1] and token_weight_scale s = [0, 1, 0, 0]: only the first
[EoT] is mapped. λ = 0. Quirk kept as an option (default on, as the official code): ρ = preserve_scale² (the
script scales the cache and `closed_form_refinement` scales it again). The official code counts one token per
whitespace word to find the [EoT]; `count_tokens="tokenizer"` (default) uses the real token count instead
(identical for word-level vocabularies such as the shapes model's, and always the [EoT]).

Stage 2 (`make_stage2_loss`): contrastive early-step steering, a hinge loss on the ft model's predictions
(attn1 + attn2.to_q train), with the reference (original) and regulariser (stage-1) models frozen:

    ε⁺ = (1+w) ε_ref(x,t,c_safe) − w ε_ref(x,t,∅),   ε⁻ = (1+w) ε_ref(x,t,c_neg) − w ε_ref(x,t,∅)   (w = 15)
    ℓ(c) = max(0, β(||ε_ft(x,t,c) − ε⁺||²_mean − ||ε_ft(x,t,c) − ε⁻||²_mean + m))                (β 1, m 0.01)
    L = ½[ℓ(c_neg) + ℓ(∅)] + 100 · (0.01 + Σ_u MSE(ε_ft(x_u,t_u,∅), sg ε_reg(x_u,t_u,∅))) / N_u

An epoch visits every malicious trajectory once at one random early step (`stage2_sample`, as the official loop),
not every (trajectory, step) pair. ℓ is computed per sample and averaged over the batch (the official batch is 1).
The 0.01 inside the regulariser is the official code's constant (it does not change gradients). The official
training loop never calls `optimizer.zero_grad()`, so gradients accumulate over all steps: `never_zeroed_gradients()`
reproduces that as an optax transformation (config `quirk_never_zero_grads`, default off: standard zeroing).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import selectors
from jaxdiff.erase import common, finetune, ridge
from jaxdiff.erase import evaluate as ev
from jaxdiff.erase.common import Encoded
from jaxdiff.erase.job import Job, Result
from jaxdiff.erase.registry import MethodInfo
from jaxdiff.errors import UserError

# The scorecard maps the concept onto its kind's generic word (circle -> shape): TRCE's "safe" prompts name it.
METHOD = MethodInfo(kind="closed_form+finetune", order=40, selector="trce", anchor="kind", retention=True)
# The config settings that regularise stage 1, named when it is refused as ill-conditioned (ridge.edit).
SETTINGS = (
    "--config.trce.lam (λ) or --config.trce.preserve_scale (ρ = preserve_scale² / cache_divisor), or add "
    "preserved prompts to the cache (--config.preserve)"
)

# ------------------------------------------------------------------------------------------- stage 1


def eot_positions(old: Encoded, i: int, new: Encoded, j: int, count_tokens: str = "tokenizer"):
    """Slots [SoT, first EoT, last position] of (old i, new j) and the old prompt's keyword positions
    (the span where the two prompts' tokens differ; the new side maps them to position L−1)."""
    L = old.emb.shape[1]
    if count_tokens == "words":
        if not old.prompts or not new.prompts:
            raise ValueError("count_tokens='words' needs the prompt strings in Encoded.prompts")
        eo, en = len(old.prompts[i].split()) + 1, len(new.prompts[j].split()) + 1
    elif count_tokens == "tokenizer":
        eo, en = int(old.lengths[i]) - 1, int(new.lengths[j]) - 1
    else:
        raise UserError(f"count_tokens must be 'tokenizer' or 'words', got {count_tokens!r}")
    kept, _ = common.find_matching_indices(
        old.ids[i, : int(old.lengths[i])].tolist(), new.ids[j, : int(new.lengths[j])].tolist()
    )
    keyword = [p for p in range(1, int(old.lengths[i]) - 1) if p not in set(kept)]
    return [0, eo, L - 1], [0, en, L - 1], keyword, eo - 1


def eot_mapping_terms(old: Encoded, new: Encoded, token_weight_scale=(0.0, 1.0, 0.0, 0.0), count_tokens="tokenizer"):
    """(contexts [n, D], sources [n, D], weights [n]) of stage 1, already divided by the number of pairs."""
    if len(new) not in (1, len(old)):
        raise ValueError(f"{len(new)} safe prompts for {len(old)} malicious prompts")
    L = old.emb.shape[1]
    scale = np.asarray(token_weight_scale, np.float32)
    ctx, src, w = [], [], []
    for i in range(len(old)):
        j = 0 if len(new) == 1 else i
        po, pn, keyword, n_words = eot_positions(old, i, new, j, count_tokens)
        base = np.array([1.0, 1.0, L - n_words - 2, 1.0], np.float32)
        slots_o = po + keyword
        slots_n = pn + [L - 1] * len(keyword)
        weights = [scale[k] * base[k] for k in range(3)] + [scale[3] * base[3]] * len(keyword)
        keep = [k for k, x in enumerate(weights) if x != 0]
        ctx.append(old.emb[i, np.asarray([slots_o[k] for k in keep], np.int32)])
        src.append(new.emb[j, np.asarray([slots_n[k] for k in keep], np.int32)])
        w.append(np.asarray([weights[k] for k in keep], np.float32) / len(old))
    return jnp.concatenate(ctx), jnp.concatenate(src), jnp.asarray(np.concatenate(w))


def eot_mapping(
    params,
    old: Encoded,
    new: Encoded,
    cache_cc=None,
    *,
    preserve_scale: float = 0.01,
    square_preserve_scale: bool = True,
    cache_divisor: float = 3e4,
    lam: float = 0.0,
    token_weight_scale=(0.0, 1.0, 0.0, 0.0),
    count_tokens: str = "tokenizer",
    with_to_k: bool = True,
):
    """TRCE stage 1 on a UNet param tree: (edited params, info). `cache_cc` = Σ c cᵀ over the preserved captions'
    tokens (`ridge.context_cache`), whose values are W_orig c (S_vc = W_orig S_cc)."""
    start = time.perf_counter()
    mats = ridge.get_kv(params, ridge.KV_NAMES if with_to_k else ("to_v",))
    ctx, src, w = eot_mapping_terms(old, new, token_weight_scale, count_tokens)
    rho = (preserve_scale**2 if square_preserve_scale else preserve_scale) / cache_divisor
    preserve = None if cache_cc is None else ridge.Preserve(jnp.asarray(cache_cc, jnp.float32), rho)
    if preserve is None and lam == 0 and ctx.shape[0] < ctx.shape[1]:
        raise UserError(
            f"TRCE stage 1 with lam=0 and no preservation cache is singular ({ctx.shape[0]} mapped tokens for "
            f"{ctx.shape[1]} dimensions): give cache_cc (ridge.context_cache of preserved captions) or lam > 0"
        )
    new_mats, condition = ridge.edit(mats, [ridge.Term(ctx, w, sources=src)], lam, preserve, settings=SETTINGS)
    jax.block_until_ready(new_mats)
    return ridge.set_kv(params, new_mats), {
        "matrices": len(new_mats),
        "rows": int(ctx.shape[0]),
        "rho": rho,
        "condition_number": condition,
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------- stage 2


def make_stage2_loss(
    model,
    *,
    guidance: float = 15.0,
    beta: float = 1.0,
    margin: float = 0.01,
    reg_weight: float = 100.0,
    reg_const: float = 0.01,
):
    """TRCE stage 2 objective. trainable: the ft model's selected leaves (selector "trce"); frozen: {"base": the
    original model θ_ref, "reg": the stage-1 model (also the ft model's frozen leaves)}.

    batch: x [B,h,w,C] latents of a malicious trajectory at t [B] (early steps), safe/neg/uncond [B, L, D]
    contexts; x_u [N_u,h,w,C], t_u [N_u], uncond_u [N_u, L, D] unconditional-trajectory samples.
    """

    def loss(trainable, frozen, batch, rng):
        del rng
        x, t = batch["x"], jnp.asarray(batch["t"], jnp.float32)
        b = x.shape[0]
        safe, neg, null = batch["safe"], batch["neg"], batch["uncond"]
        ref = jax.lax.stop_gradient(frozen["base"])
        e_safe, e_neg, e_null = common.eps_many(model, ref, x, t, [safe, neg, null])
        pos = (1 + guidance) * e_safe - guidance * e_null
        negv = (1 + guidance) * e_neg - guidance * e_null
        pos, negv = jax.lax.stop_gradient(pos), jax.lax.stop_gradient(negv)

        ft = selectors.combine(trainable, jax.lax.stop_gradient(frozen["reg"]))
        xu, tu = batch["x_u"], jnp.asarray(batch["t_u"], jnp.float32)
        out = common.eps(
            model,
            ft,
            jnp.concatenate([x, x, xu]),
            jnp.concatenate([t, t, tu]),
            jnp.concatenate([neg, null, batch["uncond_u"]]),
        )
        f_neg, f_null, f_u = out[:b], out[b : 2 * b], out[2 * b :]

        def per_sample(a, c):
            return jnp.mean(jnp.square(a - c).reshape(a.shape[0], -1), axis=1)

        def hinge(f):
            return jnp.maximum(0.0, beta * (per_sample(f, pos) - per_sample(f, negv) + margin))

        l_neg, l_null = hinge(f_neg), hinge(f_null)
        target = 0.5 * (jnp.mean(l_neg) + jnp.mean(l_null))
        e_reg = jax.lax.stop_gradient(
            common.eps(model, jax.lax.stop_gradient(frozen["reg"]), xu, tu, batch["uncond_u"])
        )
        reg = (reg_const + jnp.sum(per_sample(f_u, e_reg))) / xu.shape[0]
        total = target + reg_weight * reg
        return total, {"target": target, "reg": reg, "hinge_neg": jnp.mean(l_neg), "hinge_null": jnp.mean(l_null)}

    return loss


def never_zeroed_gradients() -> optax.GradientTransformation:
    """The official stage-2 quirk: PyTorch gradients never zeroed, so step k uses Σ_{j≤k} g_j. Chain it before
    the optimiser: optax.chain(never_zeroed_gradients(), optax.adamw(...))."""

    def init(params):
        return jax.tree_util.tree_map(jnp.zeros_like, params)

    def update(updates, state, params=None):
        del params
        total = jax.tree_util.tree_map(jnp.add, state, updates)
        return total, total

    return optax.GradientTransformation(init, update)


def stage2_sample(i: int, trajectories: int, early_steps: int, seed: int) -> tuple[int, int]:
    """(trajectory j, early step k) of stage-2 step `i`, as the official loop: an epoch visits every trajectory once
    (shuffled) at one random early step k ~ U{0..early_steps−1}, so an epoch is `trajectories` steps."""
    epoch, pos = divmod(i, trajectories)
    j = int(np.random.default_rng([seed, 3, epoch]).permutation(trajectories)[pos])
    return j, int(np.random.default_rng([seed, 4, i]).integers(0, early_steps))


def stage2_optimizer(learning_rate: float = 1e-6, weight_decay: float = 0.01, never_zero_grads: bool = False):
    """AdamW(lr 1e-6, wd 0.01) as the official stage 2; optionally with the never-zeroed-gradients quirk."""
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    return optax.chain(never_zeroed_gradients(), opt) if never_zero_grads else opt


# ------------------------------------------------------------------------------------------- the method


def run(job: Job) -> Result:
    """TRCE: the [EoT] mapping (stage 1), then the early-step contrastive fine-tuning (stage 2) when asked."""
    o, t = job.config.trce, job.config.train
    safe_prompts = job.replaced(job.concept_prompts, job.anchor)
    old, new = job.encode(job.concept_prompts), job.encode(safe_prompts)
    stage1, info1 = eot_mapping(
        job.original,
        old,
        new,
        job.preservation_cache(),
        preserve_scale=o.preserve_scale,
        square_preserve_scale=o.square_preserve_scale,
        cache_divisor=o.cache_divisor,
        lam=o.lam,
        token_weight_scale=tuple(o.token_weight_scale),
        count_tokens=o.count_tokens,
    )
    if not o.stage2:
        return Result(stage1, {"stage1": info1})

    # Stage 2 data: DDIM trajectories of the original model on the concept prompts (early steps) and on "".
    sched = common.ddim(job.pipe.scheduler_config or None)
    plan = sched.plan(int(o.ddim_steps))
    k_prompts = len(job.concept_prompts)
    seeds = int(o.seeds_per_concept)
    x_T = jnp.asarray(ev.noise(k_prompts * seeds, job.latent_shape, job.config.seed + 41))
    cond = jnp.repeat(old.emb, seeds, axis=0)
    null = job.context([""])
    _, after, _, ts = _trajectory(job, sched, plan, x_T, cond, null, float(o.data_guidance))
    early = min(int(o.early_steps), after.shape[0])
    n_u = int(o.uncond_trajectories)
    xu_T = jnp.asarray(ev.noise(n_u, job.latent_shape, job.config.seed + 43))
    _, after_u, _, _ = _trajectory(job, sched, plan, xu_T, jnp.repeat(null, n_u, axis=0), null, 1.0)
    safe = jnp.repeat(new.emb, seeds, axis=0)
    steps = int(t.steps) or int(o.epochs) * cond.shape[0]
    if not int(t.steps):
        job.config.unlock()
        job.config.train.steps = steps
    per = int(o.uncond_per_step)
    nulls_u = jnp.repeat(null, per, axis=0)
    n_steps_traj = after.shape[0]

    def batch_fn(i):
        j, k = stage2_sample(i, cond.shape[0], early, job.config.seed)
        rng = np.random.default_rng([job.config.seed, 5, i])
        ju, ku = rng.integers(0, n_u, per), rng.integers(0, n_steps_traj, per)
        return {
            "x": after[k, j][None],
            "t": ts[k][None].astype(jnp.float32),
            "safe": safe[j][None],
            "neg": cond[j][None],
            "uncond": null,
            "x_u": after_u[ku, ju],
            "t_u": ts[ku].astype(jnp.float32),
            "uncond_u": nulls_u,
        }

    loss = make_stage2_loss(
        job.model, guidance=o.guidance, beta=o.beta, margin=o.margin, reg_weight=o.reg_weight, reg_const=o.reg_const
    )
    tx = stage2_optimizer(float(t.learning_rate), float(t.weight_decay), o.quirk_never_zero_grads)
    params, info = finetune.train_selected(job, loss, batch_fn, stage1, {"base": job.original, "reg": stage1}, tx)
    return Result(params, {"stage1": info1, **info})


def _trajectory(job: Job, sched, plan, x_T, cond, null, guidance):
    fn = jax.jit(lambda p, x, c, u: common.ddim_trajectory(job.model, p, sched, plan, x, c, u, guidance))
    return fn(job.original, x_T, cond, jnp.repeat(null, cond.shape[0], axis=0))
