"""DMD2: distribution matching with a fake score updated k times per generator step, a diffusion-GAN head, backward
simulation for k-step students (tianweiy/DMD2 `main/sd_guidance.py`, `main/sd_unified_model.py`); DMD's regression
on teacher pairs, and a one-step flow-velocity generator (an InstaFlow student) in place of the diffusion one."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.distill import rectified_flow as rf
from jaxdiff.distill import teacher as teacher_lib
from jaxdiff.errors import UserError

# ------------------------------------------------------------------------------------------------ the losses


def _rows(x):
    return jnp.reshape(x, (x.shape[0], -1))


def _bc(a, x):
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def dm_gradient(x, x0_real, x0_fake):
    """The distribution-matching direction per image: (p_real − p_fake) / mean|p_real| with p = x − x̂0 (the mean over
    each image's elements), NaN → 0 and ±inf → the largest float (torch.nan_to_num's defaults). No gradient flows
    through it: the official code computes it under torch.no_grad."""
    x, x0_real, x0_fake = (jax.lax.stop_gradient(jnp.asarray(a, jnp.float32)) for a in (x, x0_real, x0_fake))
    p_real, p_fake = x - x0_real, x - x0_fake
    norm = jnp.mean(jnp.abs(_rows(p_real)), axis=1)
    return jnp.nan_to_num((p_real - p_fake) / _bc(norm, x))


def dm_loss(x, grad):
    """0.5 · mean((x − stop_grad(x − grad))²): its gradient in x is grad / x.size (F.mse_loss's mean reduction)."""
    x = x.astype(jnp.float32)
    return 0.5 * jnp.mean(jnp.square(x - jax.lax.stop_gradient(x - grad)))


def fake_score_loss(eps_fake, noise):
    """The fake score's denoising loss: mean((ε_ψ(x_t, t) − ε)²), no guidance (`compute_loss_fake`)."""
    return jnp.mean(jnp.square(eps_fake.astype(jnp.float32) - noise))


def discriminator_loss(logits_real, logits_fake):
    """The GAN head's loss (`compute_guidance_clean_cls_loss`): mean softplus(fake) + mean softplus(−real)."""
    return jnp.mean(jax.nn.softplus(logits_fake)) + jnp.mean(jax.nn.softplus(-logits_real))


def generator_gan_loss(logits_fake):
    """The generator's GAN loss (`compute_generator_clean_cls_loss`): mean softplus(−fake)."""
    return jnp.mean(jax.nn.softplus(-logits_fake))


# ------------------------------------------------------------------------------------------------ the GAN head


class GANHead(nn.Module):
    """Realism logits [B] from the fake UNet's bottleneck [B, h, w, C] (the official `cls_pred_branch`): 4×4 stride-2
    convs (GroupNorm, SiLU) down to 4×4 or less, a conv as wide as what is left to 1×1 (GroupNorm, SiLU), a 1×1 conv
    to one logit. On SD1.5's 8×8×1280 that is the official conv(4, s2) → conv(4, s4) → conv(1)."""

    @nn.compact
    def __call__(self, features):
        x = features.astype(jnp.float32)
        c = x.shape[-1]
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)
        while x.shape[1] > 4:
            x = nn.Conv(c, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)))(x)
            x = nn.silu(nn.GroupNorm(num_groups=groups, epsilon=1e-5)(x))
        x = nn.Conv(c, (x.shape[1], x.shape[2]), strides=(x.shape[1], x.shape[2]), padding="VALID")(x)
        x = nn.silu(nn.GroupNorm(num_groups=groups, epsilon=1e-5)(x))
        return nn.Conv(1, (1, 1))(x).reshape(x.shape[0])


# ------------------------------------------------------------------------------------------------ the generator

GENERATORS = ("diffusion", "flow")


def flow_generate(unet_fn, params, z, context):
    """A one-step flow-velocity student's sample, InstaFlow's (`jaxdiff.distill.rectified_flow` at t = 0, UNet time
    1000): x̂0 = z + v_RF(z)."""
    t = jnp.zeros((z.shape[0],), jnp.float32)
    out = unet_fn(params, z, rf.unet_timestep(t), context).astype(jnp.float32)
    return rf.extrapolate(z, t, rf.rf_velocity_of(out))


def check_generator(settings) -> str:
    """The generator kind; a flow generator and DMD's regression need a one-step student."""
    kind = str(settings.get("generator", "diffusion"))
    if kind not in GENERATORS:
        raise UserError(f"dmd2.generator must be one of {', '.join(GENERATORS)}, got {kind!r}")
    k = int(settings["num_steps"])
    if k != 1 and (kind == "flow" or float(settings.get("regression_weight", 0.0)) > 0):
        raise UserError(f"dmd2.generator=flow and dmd2.regression_weight need dmd2.num_steps=1, got {k}")
    return kind


def denoising_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The student's timesteps (`denoising_step_list`): T − 1, T − 1 − T/k, …; k = 1: [999], k = 4: [999, 749, 499,
    249]. k must divide T, so that diffusers' LCMScheduler with original_inference_steps = k samples the same ones."""
    k, t = int(num_steps), int(num_train_timesteps)
    if k < 1 or t % k:
        raise UserError(f"dmd2.num_steps must be a divisor of num_train_timesteps={t}, got {k}")
    return np.arange(t - 1, 0, -(t // k), dtype=np.int32)


def add_noise(model: teacher_lib.Teacher, x0, noise, t):
    """diffusers' add_noise at (integer) timesteps t [B]."""
    alpha, sigma = model.alpha_sigma(t)
    return _bc(alpha, x0) * x0 + _bc(sigma, x0) * noise


def student_input(model, params, z, context, timesteps, selected, key, num_train_timesteps: int = 1000):
    """Backward simulation (`sample_backward` + `prepare_denoising_data`): from pure noise z, `selected` (traced, < k)
    student steps — predict x̂0 at timesteps[i], re-noise it to timesteps[i + 1] with fresh noise — then the input of
    the student's step `selected`: x̂0 noised to timesteps[selected] with fresh noise (pure noise when that is T − 1).
    Returns (x_t, t [B]); no gradient flows through it."""
    params = jax.lax.stop_gradient(params)
    ts = jnp.asarray(timesteps, jnp.float32)
    b = z.shape[0]
    k_loop, k_last = jax.random.split(key)

    def body(i, carry):
        x, _ = carry
        t = jnp.full((b,), ts[i])
        x0 = model.predict(params, x, t, context, "sample").astype(jnp.float32)
        t_next = jnp.full((b,), ts[jnp.minimum(i + 1, ts.shape[0] - 1)])
        return add_noise(model, x0, jax.random.normal(jax.random.fold_in(k_loop, i), z.shape), t_next), x0

    _, x0 = jax.lax.fori_loop(0, selected, body, (z, z))
    t = jnp.full((b,), ts[selected])
    noised = add_noise(model, x0, jax.random.normal(k_last, z.shape), t)
    pure = ts[selected] >= num_train_timesteps - 1
    return jax.lax.stop_gradient(jnp.where(pure, z, noised)), t


def sample_latents(model, params, z, context, timesteps, key):
    """The k-step student's sampler: x̂0 at each timestep, re-noised with fresh noise to the next (the last x̂0 is the
    result); one step = one UNet call on pure noise at t = T − 1."""
    ts = [float(t) for t in np.asarray(timesteps)]
    b, x = z.shape[0], z
    for i, t in enumerate(ts):
        x0 = model.predict(params, x, jnp.full((b,), t), context, "sample").astype(jnp.float32)
        if i + 1 == len(ts):
            return x0
        x = add_noise(model, x0, jax.random.normal(jax.random.fold_in(key, i), z.shape), jnp.full((b,), ts[i + 1]))
    return x


# ------------------------------------------------------------------------------------------------ the phases


def make_phases(unet_fn, features_fn, scheduler_config: dict, settings):
    """[fake score × fake_updates, generator] from `make_losses`."""
    from jaxdiff.train import step as step_lib

    fake_loss, generator_loss = make_losses(unet_fn, features_fn, scheduler_config, settings)
    return [
        step_lib.Phase("fake_score", "fake_score", fake_loss, repeat=int(settings["fake_updates"])),
        step_lib.Phase("generator", "unet", generator_loss),
    ]


def make_losses(unet_fn, features_fn, scheduler_config: dict, settings):
    """(fake_loss, generator_loss): the losses of a DMD2 step's phases on networks "fake_score" ({"unet", "head"}:
    the fake UNet and the GAN head) and "unet" (the generator). `frozen` holds "teacher" (UNet params) and "uncond"
    [1, L, D]; the batch: "context" [B, L, D] (fake phase), "gen_context" and "gen_teacher_context" [B, L, D]
    (generator phase), and with the GAN "real" [B, h, w, c] (latents of real images). `make_phases` runs the fake
    loss `fake_updates` times (each on fresh generator samples), then the generator once: the official ratio
    dfake_gen_update_ratio of guidance to generator updates.

    dmd2.generator "flow": the generator is a one-step flow-velocity student (`flow_generate`, an InstaFlow OUT/model
    as init) instead of an x0 prediction at T − 1; dmd2.regression_weight λ > 0 adds DMD's regression λ ·
    `rectified_flow.distill_l2` (in latents; the paper's D is LPIPS on images) of the generator's samples of
    teacher-pair noises "pair_z0" (prompts "pair_context") against the teacher's latents "pair_z1" to the generator
    loss.

    Fake loss: fake_score_loss on the generator's (backward-simulated) samples at t ~ U{0..T−1}; with the GAN,
    + gan_weight_d · discriminator_loss on the head's logits for real latents vs samples (diffusion-GAN: both noised
    to t ~ U{0..gan_max_timestep−1}); dmd2.gan_real "pairs" takes the real latents from the teacher pairs
    ("pair_z1", conditioned on "pair_context") instead of "real".
    Generator loss: dm_loss at t ~ U{min_step..max_step} with the teacher guided u + s(c − u), s = `real_guidance`,
    on "gen_teacher_context" (SFD's concept override: the teacher is asked another prompt where the generator's
    names the forget concept), the fake score unguided on the generator's own prompt, weighted by dmd2.dm_weight
    (default 1; 0 drops it and the generator phase's teacher calls: regression and GAN only, ":adv");
    + gan_weight_g · generator_gan_loss."""
    s = dict(settings)
    model = teacher_lib.Teacher(unet_fn, dict(scheduler_config))
    if model.is_flow:
        raise UserError("DMD2 needs a VP (ε / v / x0) teacher")
    T = int(scheduler_config.get("num_train_timesteps", 1000))
    timesteps = denoising_timesteps(int(s["num_steps"]), T)
    k = len(timesteps)
    min_step, max_step = int(s["min_step_percent"] * T), int(s["max_step_percent"] * T)
    w_real = float(s["real_guidance"])
    gan_d, gan_g = float(s["gan_weight_d"]), float(s["gan_weight_g"])
    gan = gan_d > 0 or gan_g > 0
    head = GANHead()
    flow = check_generator(s) == "flow"
    w_reg = float(s.get("regression_weight", 0.0))
    w_dm = float(s.get("dm_weight", 1.0))  # 0: DMD's regression and the GAN head only (":adv")
    real_pairs = gan_real_source(s) == "pairs"  # the GAN's real samples: the teacher's pair latents (LADD)

    def generate(gen_params, z, ctx, key, with_grad: bool):
        if flow:
            x0 = flow_generate(unet_fn, gen_params, z, ctx)
            return x0 if with_grad else jax.lax.stop_gradient(x0)
        k_sel, k_sim = jax.random.split(key)
        selected = jax.random.randint(k_sel, (), 0, k) if bool(s["backward_simulation"]) else 0
        x_t, t = student_input(model, gen_params, z, ctx, timesteps, selected, k_sim, T)
        x0 = model.predict(gen_params, x_t, t, ctx, "sample").astype(jnp.float32)
        return x0 if with_grad else jax.lax.stop_gradient(x0)

    def logits(fake, x, ctx, key):
        k_t, k_n = jax.random.split(key)
        b = x.shape[0]
        if int(s["gan_max_timestep"]) > 0:  # diffusion GAN
            t = jax.random.randint(k_t, (b,), 0, int(s["gan_max_timestep"])).astype(jnp.float32)
            x = add_noise(model, x, jax.random.normal(k_n, x.shape), t)
        else:
            t = jnp.zeros((b,), jnp.float32)
        return head.apply({"params": fake["head"]}, features_fn(fake["unet"], x, t, ctx))

    def fake_loss(params, frozen, batch, rng):
        k_z, k_g, k_t, k_n, k_gan = jax.random.split(rng, 5)
        ctx = batch["context"]
        z = jax.random.normal(k_z, (ctx.shape[0], *s["latent_shape"]))
        x_g = generate(params["unet"], z, ctx, k_g, False)
        t = jax.random.randint(k_t, (ctx.shape[0],), 0, T).astype(jnp.float32)
        noise = jax.random.normal(k_n, z.shape)
        fake = params["fake_score"]
        eps = model.predict(fake["unet"], add_noise(model, x_g, noise, t), t, ctx, "epsilon")
        loss = fake_score_loss(eps, noise)
        aux = {"loss_fake": loss, "x_g_std": jnp.std(x_g)}
        if gan:
            k_real, k_fake = jax.random.split(k_gan)
            if real_pairs:  # the teacher's latent of a pair, conditioned on the pair's own prompt
                real = logits(fake, batch["pair_z1"], batch["pair_context"], k_real)
            else:
                real = logits(fake, batch["real"], ctx, k_real)
            fake_logits = logits(fake, x_g, ctx, k_fake)
            d_loss = discriminator_loss(real, fake_logits)
            loss = loss + gan_d * d_loss
            aux.update(
                loss_d=d_loss,
                p_real=jnp.mean(jax.nn.sigmoid(real)),
                p_fake=jnp.mean(jax.nn.sigmoid(fake_logits)),
            )
        return loss, aux

    def generator_loss(params, frozen, batch, rng):
        k_z, k_g, k_t, k_n, k_gan = jax.random.split(rng, 5)
        ctx = batch["gen_context"]
        b = ctx.shape[0]
        z = jax.random.normal(k_z, (b, *s["latent_shape"]))
        x_g = generate(params["unet"], z, ctx, k_g, True)
        fake = jax.lax.stop_gradient(params["fake_score"])
        if w_dm > 0:
            loss, aux = dm_term(fake, frozen, batch, x_g, ctx, k_t, k_n)
            loss = loss if w_dm == 1.0 else w_dm * loss  # (weight 1: DMD2's program as it was, op for op)
        else:  # regression and GAN only: the teacher is not called in the generator phase
            loss, aux = jnp.float32(0.0), {"x_g_std": jnp.std(x_g)}
        if gan:
            g_loss = generator_gan_loss(logits(fake, x_g, ctx, k_gan))
            loss = loss + gan_g * g_loss
            aux["loss_gan"] = g_loss
        if w_reg > 0:  # DMD: the generator's sample of a teacher pair's noise regressed onto the teacher's latent
            x_reg = generate(params["unet"], batch["pair_z0"], batch["pair_context"], k_g, True)
            reg = rf.distill_l2(x_reg, batch["pair_z1"])
            loss = loss + w_reg * reg
            aux["loss_reg"] = reg
        return loss, aux

    def dm_term(fake, frozen, batch, x_g, ctx, k_t, k_n):
        """DMD's distribution-matching loss on the generator's samples x_g (`fake`: the fake score, no gradient) and
        its aux figures."""
        b = ctx.shape[0]
        t = jax.random.randint(k_t, (b,), min_step, min(max_step + 1, T)).astype(jnp.float32)
        x_t = add_noise(model, jax.lax.stop_gradient(x_g), jax.random.normal(k_n, x_g.shape), t)
        x0_fake = model.predict(fake["unet"], x_t, t, ctx, "sample")
        teacher_ctx = batch["gen_teacher_context"]  # = ctx but where SFD's override asks the teacher another prompt
        uncond = jnp.broadcast_to(frozen["uncond"], ctx.shape)
        if w_real == 1.0:
            x0_real = model.predict(frozen["teacher"], x_t, t, teacher_ctx, "sample")
        else:
            x0_real = model.guided(frozen["teacher"], x_t, t, teacher_ctx, uncond, w_real, "uncond_based", "sample")
        grad = dm_gradient(x_g, x0_real, x0_fake)
        loss = dm_loss(x_g, grad)
        return loss, {"loss_dm": loss, "dm_grad_norm": jnp.sqrt(jnp.sum(jnp.square(grad))), "x_g_std": jnp.std(x_g)}

    return fake_loss, generator_loss


def init_head(features_fn, unet_params, latent_shape, context, seed: int = 0):
    """The GAN head's params for the bottleneck of the fake UNet on latents of `latent_shape`."""
    x = jnp.zeros((1, *latent_shape), jnp.float32)
    feats = jax.eval_shape(features_fn, unet_params, x, jnp.zeros((1,), jnp.float32), jnp.asarray(context[:1]))
    return GANHead().init(jax.random.PRNGKey(seed), jnp.zeros(feats.shape, jnp.float32))["params"]


# ------------------------------------------------------------------------------------------------ real images


def real_latents(config, pipe, prompts: list[str]) -> np.ndarray:
    """Latents of real images for the GAN head: the shapes renders of the training prompts' own scenes
    (data.shapes), or `dmd2.real_images` (a folder of images, resized to the model's resolution)."""
    from pathlib import Path

    from jaxdiff import images as images_lib
    from jaxdiff.sampling import image_conditioning as ic

    size = pipe.default_size
    folder = str(config.dmd2.real_images)
    if folder:
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not paths:
            raise UserError(f"dmd2.real_images: no .png/.jpg/.webp images in {folder}")
        pixels = [images_lib.read_image(p) for p in paths]
        from PIL import Image

        pixels = [np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in pixels]
    elif not config.data.file:
        from jaxdiff.data import shapes as S
        from jaxdiff.data.shapes_tfds import scene_and_captions

        pixels = [S.render(scene_and_captions(str(config.data.shapes), i)[0], size) for i in range(len(prompts))]
    else:
        raise UserError("the DMD2 GAN head needs real images: set dmd2.real_images to a folder (or gan weights to 0)")
    batch = np.stack(pixels).astype(np.float32) / 255.0
    encode = jax.jit(lambda vp, x, key: ic.encode(pipe.vae, vp, x, key))
    out = [
        np.asarray(encode(pipe.vae.params, batch[i : i + 64], jax.random.PRNGKey(i))) for i in range(0, len(batch), 64)
    ]
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ training


def batch_function(config, contexts, reals, teacher_ctx=None, forget_index=(), pairs=None):
    """step -> batch, a pure function of the step (resumable): each phase draws its own prompts; real latents for
    the GAN are drawn independently of the prompts (as the official real-image loader); with `pairs` (a pair store's
    z0, z1, prompt_index) train.batch_size random pairs for DMD's regression. With SFD's override,
    `sfd.forget_batch_size` rows of forget prompts are appended to each phase's batch (SFD's forget batch) and the
    teacher sees `teacher_ctx` (the override's encoding on the forget rows)."""
    b, seed = int(config.train.batch_size), int(config.seed)
    nf = int(config.sfd.forget_batch_size) if len(forget_index) else 0
    nf = b if nf < 0 else nf
    teacher_ctx = contexts if teacher_ctx is None else teacher_ctx

    def rows(rng) -> np.ndarray:
        idx = rng.integers(0, len(contexts), size=b)
        if nf:
            idx = np.concatenate([idx, np.asarray(forget_index)[rng.integers(0, len(forget_index), size=nf)]])
        return idx

    def batch_fn(step: int) -> dict:
        rng = np.random.default_rng([seed, 11, step])
        fi, gi = rows(rng), rows(rng)
        batch = {"context": contexts[fi], "gen_context": contexts[gi], "gen_teacher_context": teacher_ctx[gi]}
        if reals is not None:
            batch["real"] = reals[rng.integers(0, len(reals), size=b + nf)]
        if pairs is not None:
            pi = np.random.default_rng([seed, 13, step]).integers(0, len(pairs["z0"]), size=b)
            batch["pair_z0"], batch["pair_z1"] = pairs["z0"][pi], pairs["z1"][pi]
            batch["pair_context"] = contexts[pairs["prompt_index"][pi]]
        return batch

    return batch_fn


def settings_of(config, pipe) -> dict:
    c = pipe.unet.config
    latent_shape = (int(c.get("sample_size", 64)),) * 2 + (int(c.get("in_channels", 4)),)
    return dict(config.dmd2, latent_shape=latent_shape)


def adamw_network(name: str, learning_rate: float, train, ema_decay: float = 0.0):
    """A network with the official run's AdamW (β 0.9/0.999, the train block's weight decay), its LR schedule
    (train.lr_schedule after train.warmup_steps) and clipping at train.max_grad_norm."""
    from jaxdiff.train import optim
    from jaxdiff.train import step as step_lib

    lr = optim.schedule(float(learning_rate), train.steps, kind=train.lr_schedule, warmup_steps=train.warmup_steps)
    tx = optim.optimizer("adamw", lr, b1=0.9, b2=0.999, weight_decay=float(train.weight_decay))
    return step_lib.Network(name, tx, lr, clip_norm=float(train.max_grad_norm), ema_decay=float(ema_decay))


def gan_real_source(settings) -> str:
    """dmd2.gan_real: "images" (renders of the prompts' scenes or dmd2.real_images) or "pairs" (the teacher's latents
    of the pair store, each with its own prompt: LADD's synthetic real data, Sauer et al. 2024)."""
    source = str(settings.get("gan_real", "images"))
    if source not in ("images", "pairs"):
        raise UserError(f"dmd2.gan_real must be 'images' or 'pairs', got {source!r}")
    return source


def uses_pairs(config) -> bool:
    """DMD's regression, or the GAN head on the teacher's latents, reads a teacher pair store."""
    d = config.dmd2
    return float(d.get("regression_weight", 0.0)) > 0 or (uses_gan(config) and gan_real_source(d) == "pairs")


def uses_gan(config) -> bool:
    return float(config.dmd2.gan_weight_d) > 0 or float(config.dmd2.gan_weight_g) > 0


def build(config, unet_fn, features_fn, scheduler_config: dict, latent_shape):
    """(networks, phases) of a DMD2 step: the fake score ("fake_score") and the generator ("unet"), each with the
    official AdamW (`adamw_network`), the phases of `make_phases` with the config's `dmd2` block on latents of
    `latent_shape` (h, w, c). `unet_fn(params, x, t, context)`, `features_fn` the same UNet's bottleneck."""
    t, d = config.train, config.dmd2
    settings = dict(d, latent_shape=tuple(latent_shape))
    phases = make_phases(unet_fn, features_fn, scheduler_config, settings)
    networks = [
        adamw_network("fake_score", d.fake_score_learning_rate, t),
        adamw_network("unet", t.learning_rate, t, t.ema_decay),
    ]
    return networks, phases


def initial_params(config, student, teacher, features_fn=None, latent_shape=None, context=None) -> dict:
    """{"fake_score": {"unet": a copy of the teacher, "head": the GAN head (with the GAN)}, "unet": a copy of the
    student}; `context` [N, L, D] (its first row shapes the head's init)."""
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # noqa: E731  (no buffer shared with the teacher)
    fake = {"unet": copy(teacher)}
    if uses_gan(config):
        fake["head"] = init_head(features_fn, teacher, tuple(latent_shape), context, int(config.seed))
    return {"fake_score": fake, "unet": copy(student)}


def train(config, pipe, init_params, prompts: list[str], contexts, uncond, workdir: str, progress: bool, pairs=None):
    """Generator ("unet", from `init_params`) and fake score ("fake_score": a copy of the teacher + the GAN head) on
    the runner, each with its own AdamW (β 0.9/0.999, weight decay 0.01, as the official run) and constant LR after
    warm-up; returns (generator params (its EMA when train.ema_decay > 0), info)."""
    from jaxdiff.distill import run as run_lib
    from jaxdiff.distill import sid

    latent_shape = settings_of(config, pipe)["latent_shape"]
    unet = pipe.unet
    unet_fn = jax.jit(lambda p, x, tt, ctx: unet.apply(p, x, tt, ctx))
    features_fn = jax.jit(lambda p, x, tt, ctx: unet.apply(p, x, tt, ctx, method="encode")["mid"])
    networks, phases = build(config, unet_fn, features_fn, pipe.scheduler_config, latent_shape)
    from_images = uses_gan(config) and gan_real_source(config.dmd2) == "images"
    reals = real_latents(config, pipe, prompts) if from_images else None
    forget, forget_index, teacher_prompts = sid.prompt_pools(prompts, config.sfd)
    teacher_ctx = np.asarray(pipe.encode_prompts(teacher_prompts)[0]) if forget.any() else contexts
    params = initial_params(config, init_params, pipe.unet.params, features_fn, latent_shape, contexts)
    batch_fn = batch_function(config, contexts, reals, teacher_ctx, forget_index, pairs)
    state, info = run_lib.train_beside_teacher(
        networks, phases, params, pipe, uncond, batch_fn, config, workdir, progress, "DMD2 step"
    )
    info["forget_prompts"] = int(forget.sum())
    return state.ema_params("unet"), info


# ------------------------------------------------------------------------------------------------ the student


def student_scheduler(scheduler_config: dict, num_steps: int) -> dict:
    """diffusers' LCMScheduler with original_inference_steps = k: its k-step timesteps are the student's
    (`denoising_timesteps`), x̂0 re-noised with fresh noise between steps, as DMD2's own SDXL inference. (Its
    boundary scalings c_skip = 0.25 / ((10 t)² + 0.25) are below 1e-7 at the student's timesteps.)"""
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    sched = {k: scheduler_config[k] for k in keep if k in scheduler_config}
    sched.update(
        _class_name="LCMScheduler",
        _diffusers_version="0.42.0",
        original_inference_steps=int(num_steps),
        timestep_spacing="leading",
        set_alpha_to_one=True,
        steps_offset=0,
        clip_sample=False,
    )
    return sched


_SAMPLERS: dict = {}


def sample(pipe, generator_params, prompts: list[str], latents, steps: int, num_steps: int, seed: int = 0):
    """Images [N, H, W, 3] in [0, 1] from the k-step student (no CFG; `latents` = z) at `steps` of its k timesteps
    (steps must divide k: 1 … k)."""
    k = int(num_steps)
    T = int(pipe.scheduler_config.get("num_train_timesteps", 1000))
    if int(steps) < 1 or k % int(steps):
        raise UserError(f"the DMD2 student trained for {k} steps samples in a divisor of {k}, got steps={steps}")
    timesteps = denoising_timesteps(k, T)[:: k // int(steps)]
    key = (id(pipe), tuple(int(t) for t in timesteps))
    if key not in _SAMPLERS:
        unet = pipe.unet
        model = teacher_lib.Teacher(lambda p, x, t, c: unet.apply(p, x, t, c), dict(pipe.scheduler_config))

        def run(params, vae_params, cond, z, rng):
            return pipe.decode_latents(vae_params, sample_latents(model, params, z, cond, timesteps, rng))

        _SAMPLERS[key] = jax.jit(run)
    cond = pipe.encode_prompts(list(prompts))[0]
    z = jnp.asarray(latents, jnp.float32)
    return np.asarray(_SAMPLERS[key](generator_params, pipe.vae.params, cond, z, jax.random.PRNGKey(seed)))


# ------------------------------------------------------------------------------------------------ the command


def distill(config, pipe, init_params, prompts, contexts, uncond, out, progress: bool = True, pairs=None) -> dict:
    """`jaxdiff distill` for method "dmd2" (run.distill hands over after loading the teacher, the prompts and, for
    DMD's regression, the pairs): train, OUT/model (an LCMScheduler pipeline of the student's k steps; a flow
    generator's: FlowMatchEuler, one step), the grid and the NFE-vs-quality report."""
    from pathlib import Path

    from jaxdiff.distill import run as run_lib

    out = Path(out)
    d = config.dmd2
    denoising_timesteps(int(d.num_steps), int(pipe.scheduler_config.get("num_train_timesteps", 1000)))
    flow = check_generator(d) == "flow"  # (run.distill has refused DMD's regression without a pairs block)
    params, info, seconds = run_lib.timed(
        train, config, pipe, init_params, prompts, contexts, uncond, str(out / "train"), progress, pairs
    )
    k = int(d.num_steps)
    run_lib.save_student(pipe, params, out, k, None if flow else student_scheduler(pipe.scheduler_config, k))
    keys = ("num_steps", "real_guidance", "fake_updates", "gan_weight_g", "gan_weight_d")
    settings = {
        "dmd2": {key: d[key] for key in keys}
        | {"generator": str(d.get("generator", "diffusion")), "regression_weight": float(d.get("regression_weight", 0))}
        | {"dm_weight": float(d.get("dm_weight", 1.0))}
        | {
            "forget_concept": str(config.sfd.forget_concept),
            "override_prompt": str(config.sfd.override_prompt),
            "forget_prompts": info["forget_prompts"],
        }
    }

    def sample_student(pipe, params, prompts, latents, steps):
        return sample(pipe, params, prompts, latents, steps, k)

    if flow:  # the flow student samples with uniform Euler (`rectified_flow.sample`), as InstaFlow's
        return run_lib.write_report(config, pipe, params, out, info, seconds, settings)
    return run_lib.write_report(config, pipe, params, out, info, seconds, settings, sample_student, "student")
