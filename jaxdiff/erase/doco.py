"""DoCo / CDC — Concept Domain Correction with a concept-preserving gradient (Wu et al., AAAI 2025;
yongliang-wu/DoCo ebf6ff4), built on Concept Ablation.

Data: latents x of anchor images ("painting", "clothed", …) noised with t ~ U{0..T−1}; target captions embed the
erased concept, anchor captions are plain; with prior preservation a second batch of anchor-class images and
prompts. Trainable: attn2 to_k/to_v (selector "cross-attn-kv"); θ* a frozen shadow UNet.

    x̂0_tgt = x̂0(x_t, ε_θ(x_t, t, c_target)),   x̂0_anc = x̂0(x_t, ε_θ*(x_t, t, c_anchor))      (DDPM pred_original_sample)
    D: PatchGAN on latents [Conv4-s2(C→64) LReLU, Conv4-s2(64→128) BN LReLU, (128→256) BN, (256→512) BN,
       Conv4-s1(512→1)]
    L_D      = BCE(D(sg x̂0_anc), 0) + BCE(D(sg x̂0_tgt), 1)          ("real" = anchor = label 0)
    L_adv(θ) = BCE(D(x̂0_tgt), 0)
    L_prior(θ) = MSE(ε_θ(x_t^prior, t, c_prior), ε)

Concept-preserving gradient (`DoCo/gradient_clip.py::adjust_gradient`), per parameter tensor, after clipping
each gradient set to global norm 1 (`max_grad_norm`):

    ĝ_r = g_r / (||g_r|| + 1e-8),  ĝ_u = g_u / (||g_u|| + 1e-8),  cos = ⟨ĝ_u, ĝ_r⟩
    g_u ← g_u − λ·cos·ĝ_r  if cos < 0         (λ = lambda_ = 1; the normalised form, not PCGrad's exact projection)

and the UNet is updated with g_u only (official quirk: the retain gradient only sets the direction;
`add_retain_grad=True` adds it). Without surgery (`gradient_clip=False`) the update is the clipped gradient of
L_adv + 0.1·prior_loss_weight·L_prior. The discriminator trains every step with its own Adam(0.5, 0.999); the
UNet only after `warm_up` steps. Official quirk (default on, `disc_grad_includes_adv`): after warm-up the
discriminator's gradient also contains ∇_D L_adv, because `backward(L_adv)` reaches D's parameters and their
gradients are only zeroed after D's step. D's accuracy on each domain is logged every step
(`discriminator_accuracy`) and reported at the end of the warm-up and of training (`accuracy_report`): the warm-up
should end with D separating the domains. BatchNorm runs in training mode (batch statistics) as it always does in
the official training; running averages are not kept.

Prior pool (`prior_concepts`): the anchor images with their captions (official: the class images), or
"anchor+preserved": also images of the preserved concepts (`train.retain_images` of them), so that L_prior and
the surgery's g_r keep the concepts that must stay (jaxdiff's option, for targets whose neighbours drift).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdiff import platforms, selectors
from jaxdiff.erase import common, finetune
from jaxdiff.erase.job import Job, Result
from jaxdiff.erase.registry import MethodInfo
from jaxdiff.errors import UserError
from jaxdiff.models.layers import conv2d
from jaxdiff.sampling.schedulers.common import add_noise
from jaxdiff.train import optim
from jaxdiff.train import step as step_lib

# Trained on images of the anchor (square for circle), which the scorecard picks among the target's kind.
METHOD = MethodInfo(kind="finetune", order=90, selector="cross-attn-kv", needs_anchor=True, anchor="other_concept")

# ------------------------------------------------------------------------------------ discriminator


def _torch_uniform(fan_in):
    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / jnp.sqrt(jnp.float32(fan_in))
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class _Conv(nn.Module):
    features: int
    stride: int
    platform: str | None = None  # of the devices the step is compiled for (the convolution's formulation)

    @nn.compact
    def __call__(self, x):
        fan_in = 16 * x.shape[-1]
        kernel = self.param("kernel", _torch_uniform(fan_in), (4, 4, x.shape[-1], self.features))
        bias = self.param("bias", _torch_uniform(fan_in), (self.features,))
        return conv2d(x, kernel, self.stride, ((1, 1), (1, 1)), platform=self.platform) + bias


class BatchNormTrain(nn.Module):
    """BatchNorm2d in training mode: batch statistics over N, H, W (biased variance), affine."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,))
        bias = self.param("bias", nn.initializers.zeros_init(), (c,))
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class PatchGAN(nn.Module):
    """DoCo's PatchGANDiscriminator on NHWC latents -> logit map [B, h', w', 1]."""

    channels: Sequence[int] = (64, 128, 256, 512)
    platform: str | None = None

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        for i, c in enumerate(self.channels):
            x = _Conv(c, 2, self.platform, name=f"conv_{i}")(x)
            if i > 0:
                x = BatchNormTrain(name=f"bn_{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        return _Conv(1, 1, self.platform, name=f"conv_{len(self.channels)}")(x)


def bce_logits(logits, label: float):
    """torch BCEWithLogitsLoss (mean) against a constant label 0 or 1."""
    return jnp.mean(jax.nn.softplus(-logits) if label == 1 else jax.nn.softplus(logits))


def discriminator_accuracy(logits_anchor, logits_target) -> dict:
    """D's accuracy per domain, over its patch logits: "d_acc_anchor" = share of anchor patches called anchor
    (logit < 0, label 0), "d_acc_target" = share of target patches called target (logit > 0, label 1); 0.5 is
    chance. The runner logs them as d_acc_anchor_disc / d_acc_target_disc."""
    return {
        "d_acc_anchor": jnp.mean((logits_anchor < 0).astype(jnp.float32)),
        "d_acc_target": jnp.mean((logits_target > 0).astype(jnp.float32)),
    }


# -------------------------------------------------------------------------------------- surgery


def gradient_surgery(g_u, g_r, lam: float = 1.0, eps: float = 1e-8):
    """DoCo's per-tensor adjustment: g_u − λ·min(cos, 0)·ĝ_r with cos = ⟨ĝ_u, ĝ_r⟩ of the normalised tensors."""

    def one(u, r):
        rn = r / (jnp.linalg.norm(r.ravel()) + eps)
        un = u / (jnp.linalg.norm(u.ravel()) + eps)
        cos = jnp.vdot(un.ravel(), rn.ravel())
        return u - lam * jnp.minimum(cos, 0.0) * rn

    return jax.tree_util.tree_map(one, g_u, g_r)


def clip_by_global_norm(tree, max_norm: float):
    """torch clip_grad_norm_: scale by max_norm / (norm + 1e-6) when the global norm exceeds max_norm."""
    norm = optax.global_norm(tree)
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree_util.tree_map(lambda g: g * factor, tree)


# ---------------------------------------------------------------------------------------- losses


class DoCo:
    """DoCo's pure losses and its two runner phases (UNet with gradient surgery, then discriminator).

    batch: latents [B,h,w,C] (anchor images, scaled), target [B,L,D] (captions with the concept), anchor
    [B,L,D] (plain anchor captions); with prior preservation also prior_latents [B',h,w,C], prior [B',L,D].
    frozen: {"base": θ*}; the losses that need D read it from frozen["disc"].
    """

    def __init__(
        self,
        model,
        *,
        disc_channels=(64, 128, 256, 512),
        lambda_: float = 1.0,
        gradient_clip: bool = True,
        max_grad_norm: float = 1.0,
        prior_loss_weight: float = 1.0,
        warm_up: int = 1000,
        disc_grad_includes_adv: bool = True,
        add_retain_grad: bool = False,
        scheduler_config=None,
        platform: str | None = None,
    ):
        self.model = model
        self.disc = PatchGAN(tuple(disc_channels), platform)
        self.lambda_, self.gradient_clip, self.max_grad_norm = lambda_, gradient_clip, max_grad_norm
        self.prior_loss_weight, self.warm_up = prior_loss_weight, warm_up
        self.disc_grad_includes_adv, self.add_retain_grad = disc_grad_includes_adv, add_retain_grad
        sched = common.ddim(scheduler_config)
        self.acp = jnp.asarray(sched.alphas_cumprod)
        self.T = sched.num_train_timesteps

    # -- noise draws shared by the adversarial and the prior loss
    def _noised(self, latents, key):
        k_n, k_t = jax.random.split(key)
        noise = jax.random.normal(k_n, latents.shape, jnp.float32)
        t = jax.random.randint(k_t, (latents.shape[0],), 0, self.T)
        return add_noise(self.acp, latents.astype(jnp.float32), noise, t), noise, t

    def init_disc(self, key, latent_shape):
        x = jnp.zeros((2, *latent_shape), jnp.float32)
        # Runs once: unoptimised XLA compiles the threefry draws ~10x faster on CPU.
        return common.run_once(lambda k: self.disc.init(k, x)["params"], key)

    def disc_apply(self, d_params, x):
        return self.disc.apply({"params": d_params}, x)

    def adv_loss(self, trainable, frozen, batch, rng):
        """L_adv = BCE(D(x̂0_tgt), 0); aux carries x̂0_tgt and x̂0_anc (stop-gradient) for the discriminator."""
        x_t, _, t = self._noised(batch["latents"], jax.random.fold_in(rng, 0))
        params = selectors.combine(trainable, frozen["base"])
        x0_tgt = common.predict_x0(self.acp, x_t, common.eps(self.model, params, x_t, t, batch["target"]), t)
        e_anc = common.eps(self.model, jax.lax.stop_gradient(frozen["base"]), x_t, t, batch["anchor"])
        x0_anc = jax.lax.stop_gradient(common.predict_x0(self.acp, x_t, e_anc, t))
        logits = self.disc_apply(jax.lax.stop_gradient(frozen["disc"]), x0_tgt)
        return bce_logits(logits, 0.0), {"x0_target": jax.lax.stop_gradient(x0_tgt), "x0_anchor": x0_anc}

    def prior_loss(self, trainable, frozen, batch, rng):
        """L_prior = MSE(ε_θ(x_t^prior, t, c_prior), ε)."""
        x_t, noise, t = self._noised(batch["prior_latents"], jax.random.fold_in(rng, 1))
        pred = common.eps(self.model, selectors.combine(trainable, frozen["base"]), x_t, t, batch["prior"])
        return common.mse(pred, noise), {}

    def disc_loss(self, d_params, x0_anchor, x0_target, adv_weight=0.0):
        """L_D = BCE(D(x̂0_anc), 0) + BCE(D(x̂0_tgt), 1) (+ adv_weight · BCE(D(x̂0_tgt), 0): the official quirk).
        aux also has D's accuracy on each domain before its update (`discriminator_accuracy`)."""
        logits_anc = self.disc_apply(d_params, x0_anchor)
        l_real = bce_logits(logits_anc, 0.0)
        logits_tgt = self.disc_apply(d_params, x0_target)
        l_fake = bce_logits(logits_tgt, 1.0)
        aux = {"d_real": l_real, "d_fake": l_fake, **discriminator_accuracy(logits_anc, logits_tgt)}
        return l_real + l_fake + adv_weight * bce_logits(logits_tgt, 0.0), aux

    def unet_grads(self, trainable, frozen, batch, rng):
        """(update gradient for the UNet, aux): surgery on the clipped L_adv / L_prior gradients, or the clipped
        gradient of L_adv + 0.1·w·L_prior."""
        has_prior = "prior_latents" in batch
        (l_adv, aux), g_adv = jax.value_and_grad(self.adv_loss, has_aux=True)(trainable, frozen, batch, rng)
        metrics = {"adv": l_adv}
        if self.gradient_clip:
            if not has_prior:
                raise ValueError("DoCo's gradient surgery needs the prior-preservation batch (prior_latents, prior)")
            (l_prior, _), g_prior = jax.value_and_grad(self.prior_loss, has_aux=True)(trainable, frozen, batch, rng)
            g_adv = clip_by_global_norm(g_adv, self.max_grad_norm)
            g_prior = clip_by_global_norm(g_prior, self.max_grad_norm)
            g = gradient_surgery(g_adv, g_prior, self.lambda_)
            if self.add_retain_grad:
                g = jax.tree_util.tree_map(jnp.add, g, g_prior)
            metrics["prior"] = l_prior
        elif has_prior:
            (l_prior, _), g_prior = jax.value_and_grad(self.prior_loss, has_aux=True)(trainable, frozen, batch, rng)
            w = 0.1 * self.prior_loss_weight
            g = clip_by_global_norm(jax.tree_util.tree_map(lambda a, b: a + w * b, g_adv, g_prior), self.max_grad_norm)
            metrics["prior"] = l_prior
        else:
            g = clip_by_global_norm(g_adv, self.max_grad_norm)
        return g, {**aux, **metrics}

    def phases(self) -> list[step_lib.Phase]:
        """The runner's phases of one DoCo step: the UNet's surgery gradient (applied once the step exceeds
        `warm_up`, as the official loop's global_step > warm_up), then the discriminator every step on the x̂0 the
        UNet phase produced before its update. Networks: "unet" (the trainable leaves), "disc" (PatchGAN)."""

        def active(step):
            return step > self.warm_up

        def unet_grad(params, frozen, batch, rng):
            g, aux = self.unet_grads(params["unet"], {**frozen, "disc": params["disc"]}, batch, rng)
            produced = {"x0_anchor": aux.pop("x0_anchor"), "x0_target": aux.pop("x0_target")}
            adv = aux.pop("adv")
            return g, adv, {**aux, "produced": produced}

        def disc_loss(params, frozen, batch, rng):
            x0 = frozen["produced"]["unet"]
            adv_weight = jnp.where(active(frozen["step"]), 1.0, 0.0) if self.disc_grad_includes_adv else 0.0
            return self.disc_loss(params["disc"], x0["x0_anchor"], x0["x0_target"], adv_weight)

        return [
            step_lib.Phase("unet", "unet", grad_fn=unet_grad, active=active),
            step_lib.Phase("disc", "disc", disc_loss),
        ]


# ------------------------------------------------------------------------------------------- the method


def run(job: Job) -> Result:
    """DoCo: Concept Ablation's data, a discriminator on the latents, and gradient surgery."""
    o, t = job.config.doco, job.config.train
    lr = float(t.learning_rate) * (int(t.batch_size) if o.scale_lr else 1)
    d = DoCo(
        job.model,
        disc_channels=tuple(o.disc_channels),
        lambda_=o.lambda_,
        gradient_clip=o.gradient_clip,
        max_grad_norm=float(t.max_grad_norm) or 1.0,
        prior_loss_weight=o.prior_loss_weight,
        warm_up=int(o.warm_up),
        disc_grad_includes_adv=o.disc_grad_includes_adv,
        add_retain_grad=o.add_retain_grad,
        scheduler_config=job.pipe.scheduler_config or None,
        platform=platforms.of(job.mesh),
    )
    z, target, anchor = job.anchor_data(int(o.num_anchor_images))
    prior_z, prior_c = prior_data(job, z, anchor)
    b, n, m = int(t.batch_size), z.shape[0], prior_z.shape[0]

    def batch_fn(i):
        idx, jdx = finetune.pick(i, n, b, job.config.seed), finetune.pick(i, m, b, job.config.seed + 1)
        return {
            "latents": z[idx],
            "target": target[idx],
            "anchor": anchor[idx],
            "prior_latents": prior_z[jdx],
            "prior": prior_c[jdx],
        }

    trainable, _ = common.split(job.original, t.selector)
    disc = d.init_disc(jax.random.PRNGKey(job.config.seed), job.latent_shape)
    networks = [  # DoCo clips inside its gradient surgery, so neither network clips again
        step_lib.Network("unet", optim.optimizer("adamw", lr, weight_decay=float(t.weight_decay))),
        step_lib.Network(
            "disc", optim.optimizer("adam", float(o.disc_lr), b1=float(o.disc_betas[0]), b2=float(o.disc_betas[1]))
        ),
    ]
    params = {"unet": trainable, "disc": disc}
    finetune.refuse_retention(job)
    state, info = finetune.train_networks(job, networks, d.phases(), params, {"base": job.original}, batch_fn)
    info = {**info, "learning_rate": lr, "warm_up": int(o.warm_up), **accuracy_report(job.train_dir(), int(o.warm_up))}
    return Result(common.combine(state.params["unet"], job.original), info)


PRIOR_CONCEPTS = ("anchor", "anchor+preserved")


def prior_data(job: Job, z, anchor) -> tuple[jax.Array, jax.Array]:
    """The prior-preservation pool (latents, contexts) that L_prior and the surgery's g_r read: the anchor images
    with their captions (official), and with `doco.prior_concepts="anchor+preserved"` also `train.retain_images`
    images of the preserved concepts' captions made by the original model (`Job.retain_data`), so that the
    surgery also keeps the gradient of the concepts that must not move (the other colours when erasing red)."""
    which = str(job.config.doco.get("prior_concepts", "anchor"))
    if which not in PRIOR_CONCEPTS:
        raise UserError(f"config.doco.prior_concepts={which!r}: one of {', '.join(PRIOR_CONCEPTS)}")
    if which == "anchor":
        return z, anchor
    if not job.preserve:
        raise UserError(
            "config.doco.prior_concepts='anchor+preserved' needs preserved concepts: set --config.preserve=... (on "
            "shapes 'auto' takes the other concepts of the erased one's kind)"
        )
    zr, cr = job.retain_data(int(job.config.train.get("retain_images", 64)))
    return jnp.concatenate([z, zr.astype(z.dtype)]), jnp.concatenate([anchor, cr.astype(anchor.dtype)])


def accuracy_report(workdir: str, warm_up: int) -> dict:
    """D's logged accuracies (`discriminator_accuracy`) at the last logged step of the warm-up (rows 1..warm_up + 1
    of metrics.jsonl count steps done; the UNet's first update is step warm_up + 2) and at the end:
    {"disc_accuracy_warm_up": {"step", "d_acc_anchor_disc", "d_acc_target_disc"}, "disc_accuracy_final": {...}}
    (entries absent when nothing was logged then)."""
    rows = finetune.logged_rows(workdir, "d_acc_")
    out = {}
    warm = [r for r in rows if r["step"] <= warm_up + 1]
    if warm:
        out["disc_accuracy_warm_up"] = warm[-1]
    if rows:
        out["disc_accuracy_final"] = rows[-1]
    return out
