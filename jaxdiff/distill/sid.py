"""SiD (Score identity Distillation), SiD-LSG long-and-short guidance, SFD concept override, on a VP teacher."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.distill import teacher as teacher_lib
from jaxdiff.errors import UserError

NOISE_LEVELS = ("lsg", "edm")
NAN_POS = 1e5  # the official nan_to_num on gradients: nan -> 0, ±inf -> ±1e5 (distill_metrics.md §3.4)
WEIGHT_FLOOR = 1e-5  # the generator loss's w is clipped below at this (§3.3)


# ------------------------------------------------------------------------------------------------ EDM <-> VP


def _xp(*arrays):
    return np if all(isinstance(a, (np.ndarray, np.generic, float, int)) for a in arrays) else jnp


def alphas_cumprod_at(acp, t):
    """ᾱ at (fractional) training timesteps t, linear between integer steps: exactly `Teacher.alpha_sigma`'s ᾱ."""
    xp = _xp(acp, t)
    acp, t = xp.asarray(acp), xp.asarray(t, acp.dtype)
    lo = xp.clip(xp.floor(t).astype(np.int32), 0, acp.shape[0] - 1)
    hi = xp.clip(lo + 1, 0, acp.shape[0] - 1)
    frac = t - xp.floor(t)
    return acp[lo] * (1 - frac) + acp[hi] * frac


def sigma_of_timestep(acp, t):
    """The EDM noise level of VP timestep t: σ = σ_t / α_t = √((1 − ᾱ_t) / ᾱ_t) (distill_metrics.md §3.1 vs §3.5).

    A VP latent x_t = α_t x0 + σ_t ε is α_t times the EDM point x0 + σ ε, so EDM's D(x; σ) is the VP model's x0
    prediction at input α_t·x and timestep t(σ); the generator's EDM input σ_init·z is the VP input σ_t·z."""
    xp = _xp(acp, t)
    a = alphas_cumprod_at(acp, t)
    return xp.sqrt((1 - a) / a)


def timestep_of_sigma(acp, sigma):
    """The fractional VP timestep whose ᾱ (linearly interpolated, as `alphas_cumprod_at`) is 1 / (1 + σ²): the exact
    inverse of `sigma_of_timestep` on [σ(0), σ(T − 1)]; σ outside that range maps to the end steps 0 or T − 1."""
    xp = _xp(acp, sigma)
    acp = xp.asarray(acp)
    sigma = xp.asarray(sigma, acp.dtype)
    target = 1.0 / (1.0 + sigma * sigma)
    n = acp.shape[0]
    # ᾱ decreases with t: entries 0..lo are >= target.
    lo = xp.clip(xp.sum(acp[None, :] >= target.reshape(-1, 1), axis=1) - 1, 0, n - 2).reshape(target.shape)
    frac = (acp[lo] - target) / (acp[lo] - acp[lo + 1])
    return xp.clip(lo + frac, 0.0, n - 1.0)


def sigma_range(acp) -> tuple[float, float]:
    """(σ(0), σ(T − 1)): the EDM noise levels a VP teacher covers."""
    acp = np.asarray(acp, np.float64)
    return float(np.sqrt((1 - acp[0]) / acp[0])), float(np.sqrt((1 - acp[-1]) / acp[-1]))


# ------------------------------------------------------------------------------------------------ noise levels


def lsg_timesteps(key, batch: int, t_min: int = 20, t_max: int = 980):
    """SiD-LSG's training timesteps: torch.randint(tmin, tmax), i.e. integers in [t_min, t_max − 1] (both losses)."""
    return jax.random.randint(key, (batch,), t_min, t_max).astype(jnp.float32)


def edm_fake_sigmas(key, batch: int, p_mean: float = -1.2, p_std: float = 1.2):
    """§3.2: ln σ ~ N(P_mean, P_std²)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch,)))


def edm_generator_sigmas(key, batch: int, t_max: int = 800, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """§3.3: σ = (σ_max^{1/ρ} + (1 − u)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, u ~ U[0, t_max/1000] (σ ∈ [0.002, ≈24.4])."""
    u = jax.random.uniform(key, (batch,)) * (t_max / 1000.0)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (hi + (1.0 - u) * (lo - hi)) ** rho


def vp_timesteps_of_edm(acp, sigma):
    """EDM noise levels -> VP timesteps, σ first clipped to the teacher's range [σ(0), σ(T − 1)] (EDM's lognormal and
    Karras levels reach below SD's σ(0) ≈ 0.029 and above its σ(999) ≈ 14.6; the clipped σ is the one used)."""
    lo, hi = sigma_range(acp)
    return timestep_of_sigma(jnp.asarray(acp, jnp.float32), jnp.clip(sigma, lo, hi))


# ------------------------------------------------------------------------------------------------ the losses


def _rows(x):
    return jnp.reshape(x, (x.shape[0], -1))


def _bc(a, x):
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def fake_score_loss_rows(eps_fake, noise):
    """SiD-LSG's fake-score loss per row (training/sid_training_loop.py): Σ_pixels (ε_ψ(x_t, t) − ε)², ε_ψ guided
    with κ1. For a v-prediction UNet the official loss is (v_ψ − v)² · snr/(snr + 1); at fixed x_t, v − v' =
    (ε − ε')/α and snr/(snr + 1) = α², so it is the same ε-space error, which is what this takes."""
    return jnp.sum(_rows(jnp.square(eps_fake - noise)), axis=1)


def edm_fake_score_loss_rows(x0_fake, x_g, sigma, sigma_data: float = 0.5):
    """§3.2 per row: λ(σ) Σ_pixels ‖D_ψ(x_g + σn; σ) − x_g‖², λ(σ) = (σ² + σ_d²)/(σ σ_d)²; D_ψ = the fake network's x0
    prediction at the VP point α_t(x_g + σn), t = t(σ) (`sigma_of_timestep`)."""
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return lam * jnp.sum(_rows(jnp.square(x0_fake - x_g)), axis=1)


def generator_loss_rows(x_g, y_real, y_fake, alpha: float = 1.2):
    """§3.3 per row: Σ_pixels (a − b) ⊙ [(a − x_g) − α(a − b)] / w, a = teacher x0, b = fake x0, w = stop_grad(mean
    |x_g − a|) clipped at ≥ 1e-5. The gradient reaches the generator through x_g and through a and b (their inputs);
    only w is constant. α = 1 gives the official special case (a − b)(b − x_g) / w."""
    w = jax.lax.stop_gradient(jnp.maximum(jnp.mean(_rows(jnp.abs(x_g - y_real)), axis=1), WEIGHT_FLOOR))
    diff = y_real - y_fake
    value = diff * ((y_real - x_g) - alpha * diff)
    return jnp.sum(_rows(value), axis=1) / w


def finite_rows(*arrays):
    """[B] bool: rows where every array is finite (the official code drops rows with NaNs before the loss)."""
    ok = None
    for a in arrays:
        r = jnp.all(jnp.isfinite(_rows(a)), axis=1)
        ok = r if ok is None else ok & r
    return ok


def mask_rows(ok, *arrays):
    """The arrays with the rows where `ok` is False set to 0 (dropped rows contribute nothing, shapes stay fixed)."""
    return tuple(jnp.where(_bc(ok, a), a, 0.0) for a in arrays)


def reduce_rows(rows, ok, row_weight, normaliser: float, scaling: float = 1.0):
    """Σ_rows [ok] weight·loss × scaling / normaliser: the official `loss.sum().mul(loss_scaling / batch_gpu_total)`
    with dropped rows contributing 0 (the normaliser is still the whole batch, as there) and SFD's per-row
    remain / forget coefficients as `row_weight`."""
    return jnp.sum(jnp.where(ok, row_weight * rows, 0.0)) * (scaling / normaliser)


@jax.custom_vjp
def sanitize_gradients(tree):
    """Identity whose gradient is nan_to_num(g, nan=0, posinf=1e5, neginf=−1e5): the official sanitising of both
    networks' gradients (§3.4), applied to the params before the loss uses them."""
    return tree


def _sanitize_fwd(tree):
    return tree, None


def _sanitize_bwd(_, g):
    return (jax.tree_util.tree_map(lambda x: jnp.nan_to_num(x, nan=0.0, posinf=NAN_POS, neginf=-NAN_POS), g),)


sanitize_gradients.defvjp(_sanitize_fwd, _sanitize_bwd)


# ------------------------------------------------------------------------------------------------ networks


def predict_guided(model: teacher_lib.Teacher, params, x, t, cond, uncond, scale: float, target: str):
    """The UNet's prediction as `target`, guided u + κ(c − u) (SiD-LSG's `sid_sd_denoise`); κ = 1: the conditional
    call alone, as there. The conversions are linear in the output at fixed (x, t), so guiding ε and converting
    equals converting each branch and guiding x0."""
    if float(scale) == 1.0:
        return model.predict(params, x, t, cond, target)
    return model.guided(params, x, t, cond, uncond, float(scale), "uncond_based", target)


def generate(model: teacher_lib.Teacher, params, z, context, t_init):
    """The one-step generator (§3.1, SiD-LSG `sid_sd_sampler`): x_g = x0 of G at VP input σ_{t_init}·z and timestep
    t_init (= G(σ_init z, σ_init) in EDM terms, σ_init = `sigma_of_timestep(t_init)`), z ~ N(0, I). SiD-LSG's
    t_init = 625 is σ_init ≈ 2.50 on SD's scaled-linear schedule: SiD's EDM σ_init = 2.5."""
    t = jnp.full((z.shape[0],), t_init, jnp.float32)
    _, sigma = model.alpha_sigma(t)
    x = _bc(sigma, z) * z
    return model.predict(params, x, t, context, "sample").astype(jnp.float32)


def add_noise(x0, noise, alpha, sigma):
    """diffusers' add_noise: α_t x0 + σ_t n."""
    return _bc(alpha, x0) * x0 + _bc(sigma, x0) * noise


# ------------------------------------------------------------------------------------------------ SFD


def concept_pattern(forget_concept: str) -> re.Pattern | None:
    """A case-insensitive whole-word pattern for the ";"-separated forget concept(s) (a plural "s" allowed)."""
    words = [w.strip() for w in str(forget_concept).split(";") if w.strip()]
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")s?\b", re.IGNORECASE)


def contains_concept(prompts: list[str], forget_concept: str) -> np.ndarray:
    """[N] bool: the prompts that name the forget concept."""
    pattern = concept_pattern(forget_concept)
    return np.array([bool(pattern and pattern.search(p)) for p in prompts], bool)


def override_prompts(prompts: list[str], forget_concept: str, override: str, mode: str = "word") -> list[str]:
    """The teacher's prompts under SFD's override (§3.5): prompts naming the concept get the concept word replaced by
    `override` (mode "word", e.g. "a red circle" -> "a red square") or become `override` (mode "prompt"); the others
    are unchanged."""
    if mode not in ("word", "prompt"):
        raise UserError(f"sfd.override_mode must be 'word' or 'prompt', got {mode!r}")
    pattern = concept_pattern(forget_concept)
    if pattern is None:
        return list(prompts)
    out = []
    for p in prompts:
        if not pattern.search(p):
            out.append(p)
        elif mode == "prompt":
            out.append(override)
        else:
            out.append(re.sub(r"\s+", " ", pattern.sub(override, p)).strip())
    return out


def row_weights(forget_rows, remain_weight: float = 1.0, forget_weight: float = 0.01):
    """SFD's coefficients per row (remain 1.0, forget 0.01 for both networks, §3.5)."""
    return np.where(np.asarray(forget_rows), np.float32(forget_weight), np.float32(remain_weight)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the phases


def _settings(s) -> dict:
    s = dict(s)
    if s["noise"] not in NOISE_LEVELS:
        raise UserError(f"sid.noise must be one of {', '.join(NOISE_LEVELS)}, got {s['noise']!r}")
    return s


def make_phases(unet_fn, scheduler_config: dict, settings, normaliser: int):
    """The two phases of a SiD step in the official order (fake score, then generator; distill_metrics.md §3.4 and
    SiD-LSG's training/sid_training_loop.py) on networks "fake_score" and "unet" (the generator); `frozen` holds
    "teacher" (UNet params) and "uncond" [1, L, D] (the "" prompt's encoding).

    Long and short guidance (distill_anchors.md §1, SiD-LSG): κ1 = `cfg_train_fake` guides the fake score's output in
    its own training loss; κ2 = κ3 = `cfg_eval_fake` guides the fake score inside the generator loss; κ4 =
    `cfg_eval_real` guides the teacher there; all u + κ(c − u). When κ1 or κ2 is not 1, `context_dropout` (10 %) of
    the fake-score phase's prompts become "" (for the generator's sample and the fake score alike).

    Noise levels: "lsg" — t ~ U{t_min..t_max − 1} (20..979) in both phases, fake loss in ε (`fake_score_loss_rows`);
    "edm" — §3.2's lognormal σ for the fake score (loss `edm_fake_score_loss_rows`) and §3.3's Karras σ for the
    generator, each mapped to the VP timestep t(σ) (`vp_timesteps_of_edm`). Both losses are Σ_rows weight·loss ×
    scaling / `normaliser` (the batch size), rows with non-finite values dropped, gradients nan_to_num'd.

    Batch: fake_context, fake_weight (the fake-score phase's prompts), gen_context, gen_teacher_context, gen_weight
    (the generator phase's; the teacher's context differs from the generator's only in SFD's forget rows)."""
    from jaxdiff.train import step as step_lib

    s = _settings(settings)
    model = teacher_lib.Teacher(unet_fn, dict(scheduler_config))
    acp = model.alphas_cumprod()
    t_init = float(s["t_init"])
    k1, k2, k4 = float(s["cfg_train_fake"]), float(s["cfg_eval_fake"]), float(s["cfg_eval_real"])
    dropout = float(s["context_dropout"]) if (k1 != 1.0 or k2 != 1.0) else 0.0

    def noise_levels(key, batch, which):
        if s["noise"] == "lsg":
            return lsg_timesteps(key, batch, int(s["t_min"]), int(s["t_max"]))
        if which == "fake":
            sig = edm_fake_sigmas(key, batch, float(s["p_mean"]), float(s["p_std"]))
        else:
            sig = edm_generator_sigmas(key, batch, int(s["edm_t_max"]))
        return vp_timesteps_of_edm(acp, sig)

    def fake_loss(params, frozen, batch, rng):
        k_drop, k_z, k_t, k_n = jax.random.split(rng, 4)
        ctx = batch["fake_context"]
        uncond = jnp.broadcast_to(frozen["uncond"], ctx.shape)
        if dropout > 0:  # SiD-LSG: 10 % of the fake-score phase's prompts become "" when κ1 or κ2 is not 1
            drop = jax.random.uniform(k_drop, (ctx.shape[0],)) < dropout
            ctx = jnp.where(_bc(drop, ctx), uncond, ctx)
        b = ctx.shape[0]
        z = jax.random.normal(k_z, (b, *s["latent_shape"]))
        x_g = jax.lax.stop_gradient(generate(model, params["unet"], z, ctx, t_init))
        t = noise_levels(k_t, b, "fake")
        noise = jax.random.normal(k_n, z.shape)
        alpha, sigma = model.alpha_sigma(t)
        x_t = add_noise(x_g, noise, alpha, sigma)
        fake = sanitize_gradients(params["fake_score"])
        if s["noise"] == "lsg":
            eps = predict_guided(model, fake, x_t, t, ctx, uncond, k1, "epsilon")
            ok = finite_rows(eps)
            eps, noise_m = mask_rows(ok, eps, noise)
            rows = fake_score_loss_rows(eps, noise_m)
        else:
            x0 = predict_guided(model, fake, x_t, t, ctx, uncond, k1, "sample")
            ok = finite_rows(x0, x_g)
            x0, x_g_m = mask_rows(ok, x0, x_g)
            rows = edm_fake_score_loss_rows(x0, x_g_m, sigma / alpha, float(s["sigma_data"]))
        loss = reduce_rows(rows, ok, batch["fake_weight"], normaliser, float(s["loss_scaling"]))
        return loss, {"t_mean": jnp.mean(t), "x_g_std": jnp.std(x_g), "dropped_rows": jnp.sum(~ok)}

    def generator_loss(params, frozen, batch, rng):
        k_z, k_t, k_n = jax.random.split(rng, 3)
        ctx, teacher_ctx = batch["gen_context"], batch["gen_teacher_context"]
        uncond = jnp.broadcast_to(frozen["uncond"], ctx.shape)
        b = ctx.shape[0]
        z = jax.random.normal(k_z, (b, *s["latent_shape"]))
        x_g = generate(model, sanitize_gradients(params["unet"]), z, ctx, t_init)
        t = noise_levels(k_t, b, "generator")
        noise = jax.random.normal(k_n, z.shape)
        alpha, sigma = model.alpha_sigma(t)
        x_t = add_noise(x_g, noise, alpha, sigma)
        y_fake = predict_guided(model, params["fake_score"], x_t, t, ctx, uncond, k2, "sample")
        y_real = predict_guided(model, frozen["teacher"], x_t, t, teacher_ctx, uncond, k4, "sample")
        ok = finite_rows(x_g, y_real, y_fake)
        x_g_m, y_real, y_fake = mask_rows(ok, x_g, y_real, y_fake)
        rows = generator_loss_rows(x_g_m, y_real, y_fake, float(s["alpha"]))
        loss = reduce_rows(rows, ok, batch["gen_weight"], normaliser, float(s["loss_scaling_g"]))
        return loss, {"t_mean": jnp.mean(t), "x_g_std": jnp.std(x_g), "dropped_rows": jnp.sum(~ok)}

    return [
        step_lib.Phase("fake_score", "fake_score", fake_loss),
        step_lib.Phase("generator", "unet", generator_loss),
    ]


# ------------------------------------------------------------------------------------------------ training


def prompt_pools(prompts: list[str], sfd) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(forget-row flags [N], indices of the forget prompts, the teacher's prompts)."""
    concept = str(sfd.forget_concept)
    forget = contains_concept(prompts, concept)
    if concept and not forget.any():
        raise UserError(f"sfd.forget_concept={concept!r}: none of the {len(prompts)} training prompts names it")
    teacher_prompts = override_prompts(prompts, concept, str(sfd.override_prompt), str(sfd.override_mode))
    return forget, np.flatnonzero(forget), teacher_prompts


def batch_function(config, contexts, teacher_ctx, forget, forget_index):
    """step -> batch: a pure function of the step (resumable). Each phase draws its own prompts (the official loop
    draws anew for each network); with SFD, `sfd.forget_batch_size` rows of forget prompts are appended (SFD's
    separate forget batch), and every row naming the concept gets the forget coefficient and the override."""
    b, seed = int(config.train.batch_size), int(config.seed)
    nf = int(config.sfd.forget_batch_size)
    nf = (b if nf < 0 else nf) if len(forget_index) else 0
    weights = row_weights(forget, float(config.sfd.remain_weight), float(config.sfd.forget_weight))
    if not len(forget_index):
        weights = np.ones_like(weights)

    def rows(step: int, phase: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 7, step, phase])
        idx = rng.integers(0, len(contexts), size=b)
        if nf:
            idx = np.concatenate([idx, forget_index[rng.integers(0, len(forget_index), size=nf)]])
        return idx

    def batch_fn(step: int) -> dict:
        fi, gi = rows(step, 0), rows(step, 1)
        return {
            "fake_context": contexts[fi],
            "fake_weight": weights[fi],
            "gen_context": contexts[gi],
            "gen_teacher_context": teacher_ctx[gi],
            "gen_weight": weights[gi],
        }

    return batch_fn


def build(config, unet_fn, features_fn, scheduler_config: dict, latent_shape):
    """(networks, phases) of a SiD / SFD step: the fake score ("fake_score") and the generator ("unet"), each with
    its own AdamW (β `sid.adam_b1`/`adam_b2`, the train block's weight decay and clipping; the generator's EMA), the
    phases of `make_phases` with the config's `sid` block on latents of `latent_shape` (h, w, c), the loss
    normaliser the train block's batch size. `unet_fn(params, x, t, context)`; `features_fn` is unused (DMD2's)."""
    from jaxdiff.train import optim
    from jaxdiff.train import step as step_lib

    t, s = config.train, config.sid
    settings = dict(s, latent_shape=tuple(latent_shape))
    settings["t_init"] = init_timestep(scheduler_config, s)
    phases = make_phases(unet_fn, scheduler_config, settings, int(t.batch_size))

    def adamw(lr_value):
        lr = optim.schedule(lr_value, t.steps, kind=t.lr_schedule, warmup_steps=t.warmup_steps)
        tx = optim.optimizer(
            "adamw",
            lr,
            b1=float(s.adam_b1),
            b2=float(s.adam_b2),
            eps=float(s.adam_eps),
            weight_decay=float(t.weight_decay),
        )
        return tx, lr

    g_tx, g_lr = adamw(float(t.learning_rate))
    f_tx, f_lr = adamw(float(s.fake_score_learning_rate))
    networks = [
        step_lib.Network("fake_score", f_tx, f_lr, clip_norm=float(t.max_grad_norm)),
        step_lib.Network("unet", g_tx, g_lr, clip_norm=float(t.max_grad_norm), ema_decay=float(t.ema_decay)),
    ]
    return networks, phases


def initial_params(config, student, teacher, features_fn=None, latent_shape=None, context=None) -> dict:
    """{"fake_score": a copy of the teacher, "unet": a copy of the student (the generator)}."""
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # noqa: E731  (no buffer shared with the teacher)
    return {"fake_score": copy(teacher), "unet": copy(student)}


def train(config, pipe, init_params, prompts: list[str], contexts, uncond, workdir: str, progress: bool):
    """Generator ("unet", from `init_params`) and fake score ("fake_score", from the teacher) on the runner, each with
    its own AdamW; returns (generator params (its EMA when train.ema_decay > 0), info)."""
    from jaxdiff.distill import run as run_lib

    forget, forget_index, teacher_prompts = prompt_pools(prompts, config.sfd)
    teacher_ctx = np.asarray(pipe.encode_prompts(teacher_prompts)[0]) if forget.any() else contexts
    c = pipe.unet.config
    latent_shape = (int(c.get("sample_size", 64)),) * 2 + (int(c.get("in_channels", 4)),)
    unet = pipe.unet
    # One jitted UNet: the step's five UNet calls (two batch sizes) are traced twice instead of five times.
    unet_fn = jax.jit(lambda p, x, tt, ctx: unet.apply(p, x, tt, ctx))
    networks, phases = build(config, unet_fn, None, pipe.scheduler_config, latent_shape)
    params = initial_params(config, init_params, pipe.unet.params)
    batch_fn = batch_function(config, contexts, teacher_ctx, forget, forget_index)
    state, info = run_lib.train_beside_teacher(
        networks, phases, params, pipe, uncond, batch_fn, config, workdir, progress, "SiD step"
    )
    info["forget_prompts"] = int(forget.sum())
    return state.ema_params("unet"), info


def init_timestep(scheduler_config: dict, s) -> float:
    """The generator's timestep: `sid.t_init`, or t(σ_init) when `sid.sigma_init` > 0 (EDM's σ_init = 2.5)."""
    if float(s.get("sigma_init", 0.0)) > 0:
        acp = teacher_lib.Teacher(None, dict(scheduler_config)).alphas_cumprod().astype(np.float64)
        return float(timestep_of_sigma(acp, np.float64(s.sigma_init)))
    return float(s.t_init)


# ------------------------------------------------------------------------------------------------ the command


def distill(config, pipe, init_params, prompts, contexts, uncond, out, progress: bool = True) -> dict:
    """`jaxdiff distill` for method "sid" (run.distill hands over after loading the teacher and the prompts): train,
    OUT/model (an Euler pipeline whose one step is the generator), the grid and the NFE-vs-quality report."""
    from pathlib import Path

    from jaxdiff.distill import run as run_lib

    out = Path(out)
    params, info, seconds = run_lib.timed(
        train, config, pipe, init_params, prompts, contexts, uncond, str(out / "train"), progress
    )
    t_init = init_timestep(pipe.scheduler_config, config.sid)
    run_lib.save_student(pipe, params, out, 1, student_scheduler(pipe.scheduler_config, t_init))
    s = config.sid
    settings = {
        "sid": {
            "t_init": t_init,
            "alpha": float(s.alpha),
            "kappa": [float(s.cfg_train_fake), float(s.cfg_eval_fake), float(s.cfg_eval_fake), float(s.cfg_eval_real)],
            "noise": str(s.noise),
            "forget_concept": str(config.sfd.forget_concept),
            "override_prompt": str(config.sfd.override_prompt),
            "forget_prompts": info["forget_prompts"],
        }
    }

    def sample_student(pipe, params, prompts, latents, steps):
        return sample(pipe, params, prompts, latents, steps, t_init)

    return run_lib.write_report(config, pipe, params, out, info, seconds, settings, sample_student, "generator")


# ------------------------------------------------------------------------------------------------ the student


def student_scheduler(scheduler_config: dict, t_init: float) -> dict:
    """A diffusers EulerDiscreteScheduler config whose one step is the generator: Karras σ from σ_max = σ(t_init) with
    "trailing" spacing starts at x = σ_max z, the UNet sees x / √(σ² + 1) = σ_t z at timestep t(σ_max) = t_init, and
    the Euler step to σ = 0 returns x − σ ε̂ = x0 (`generate`'s output). More steps run a Karras schedule from t_init
    down to σ(0) (not what SiD trains)."""
    from jaxdiff.sampling.schedulers.euler import train_sigmas

    acp = teacher_lib.Teacher(None, dict(scheduler_config)).alphas_cumprod()
    sig = train_sigmas(acp)
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    sched = {k: scheduler_config[k] for k in keep if k in scheduler_config}
    sched.update(
        _class_name="EulerDiscreteScheduler",
        _diffusers_version="0.42.0",
        use_karras_sigmas=True,
        sigma_max=float(np.interp(t_init, np.arange(len(sig)), sig)),
        sigma_min=float(sig[0]),
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        steps_offset=0,
    )
    return sched


_SAMPLERS: dict = {}


def sample(pipe, generator_params, prompts: list[str], latents, steps: int = 1, t_init: float = 625.0):
    """Images [N, H, W, 3] in [0, 1] from the one-step generator (no CFG; `latents` = z). Only one step is defined."""
    if int(steps) != 1:
        raise UserError(f"the SiD generator samples in one step, got steps={steps}")
    key = (id(pipe), float(t_init))
    if key not in _SAMPLERS:
        unet = pipe.unet
        model = teacher_lib.Teacher(lambda p, x, t, c: unet.apply(p, x, t, c), dict(pipe.scheduler_config))

        def run(params, vae_params, cond, z):
            return pipe.decode_latents(vae_params, generate(model, params, z, cond, t_init))

        _SAMPLERS[key] = jax.jit(run)
    cond = pipe.encode_prompts(list(prompts))[0]
    return np.asarray(_SAMPLERS[key](generator_params, pipe.vae.params, cond, jnp.asarray(latents, jnp.float32)))
