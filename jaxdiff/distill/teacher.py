"""The teacher wrapper: ε / x0 / v / flow-velocity conversions, both CFG conventions, the guidance-scale embedding.

Conventions (all arrays NHWC, `alpha`, `sigma` broadcast against them):

- VP (DDPM family, `alphas_cumprod`): x_t = alpha_t x0 + sigma_t ε with alpha_t = √ᾱ_t, sigma_t = √(1 − ᾱ_t);
  v = alpha_t ε − sigma_t x0 (diffusers' `get_velocity`, Salimans & Ho 2022).
- Flow (diffusers' FlowMatchEulerDiscreteScheduler): x_σ = (1 − σ) x0 + σ ε, σ = 1 is noise; the model predicts
  `flow_velocity` = ε − x0. In these terms alpha = 1 − σ, sigma = σ.
- Rectified flow (RectifiedFlow / InstaFlow code, `distill_metrics.md` §1.1): t = 0 is noise, t = 1 data,
  X_t = t X1 + (1 − t) X0, `rf_velocity` = X1 − X0 = data − noise = −flow_velocity; t_RF = 1 − σ.

Classifier-free guidance has two spellings in the references (`distill_anchors.md` §4, FastVideo#1256):
`cfg_uncond_based(c, u, s)` = u + s (c − u) (diffusers, DMD2, SANA-Sprint, InstaFlow; s = 1 is no guidance) and
`cfg_cond_based(c, u, w)` = c + w (c − u) (LCM's script; w = 0 is no guidance). They agree when s = w + 1
(`cond_based_to_uncond_based`). Functions take (cond, uncond) in that order, by keyword where it matters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


# ------------------------------------------------------------------------------------------------ conversions


def _b(a, x):
    """A scalar or per-row [B] coefficient broadcast against x [B, ...]."""
    a = jnp.asarray(a, x.dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def x0_from_eps(eps, x, alpha, sigma):
    """x0 = (x − σ ε) / α."""
    return (x - _b(sigma, x) * eps) / _b(alpha, x)


def eps_from_x0(x0, x, alpha, sigma):
    """ε = (x − α x0) / σ."""
    return (x - _b(alpha, x) * x0) / _b(sigma, x)


def v_from_x0_eps(x0, eps, alpha, sigma):
    """v = α ε − σ x0 (VP only: α² + σ² = 1)."""
    return _b(alpha, x0) * eps - _b(sigma, x0) * x0


def x0_eps_from_v(v, x, alpha, sigma):
    """(x0, ε) = (α x − σ v, α v + σ x) (VP only)."""
    a, s = _b(alpha, x), _b(sigma, x)
    return a * x - s * v, a * v + s * x


def flow_velocity(x0, eps):
    """diffusers' flow-matching target ε − x0 (σ = 1 is noise)."""
    return eps - x0


def rf_velocity(x0, eps):
    """RectifiedFlow's target X1 − X0 = data − noise (t = 1 is data); = −flow_velocity."""
    return x0 - eps


def x0_eps_from_flow(u, x, sigma):
    """(x0, ε) from a flow velocity u = ε − x0 at x = (1 − σ) x0 + σ ε: x0 = x − σ u, ε = x + (1 − σ) u."""
    s = _b(sigma, x)
    return x - s * u, x + (1.0 - s) * u


def to_x0_eps(output, x, alpha, sigma, prediction_type: str):
    """(x0, ε) from a model output of any prediction type; for "flow_prediction", alpha = 1 − σ and sigma = σ."""
    if prediction_type == "epsilon":
        return x0_from_eps(output, x, alpha, sigma), output
    if prediction_type == "sample":
        return output, eps_from_x0(output, x, alpha, sigma)
    if prediction_type == "v_prediction":
        return x0_eps_from_v(output, x, alpha, sigma)
    if prediction_type == "flow_prediction":
        return x0_eps_from_flow(output, x, sigma)
    raise UserError(f"unknown prediction_type {prediction_type!r} (known: {', '.join(PREDICTION_TYPES)})")


def from_x0_eps(x0, eps, alpha, sigma, prediction_type: str):
    """The model output of `prediction_type` that corresponds to (x0, ε)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    if prediction_type == "flow_prediction":
        return flow_velocity(x0, eps)
    raise UserError(f"unknown prediction_type {prediction_type!r} (known: {', '.join(PREDICTION_TYPES)})")


def vp_to_rf(x, alpha, sigma):
    """The rectified-flow point of a VP latent (`distill_metrics.md` §1.8, derived, not InstaFlow's own):
    X_t = x / (α + σ) at t_RF = α / (α + σ). Returns (X_t, t_RF)."""
    total = alpha + sigma
    return x / _b(total, x), alpha / total


# ------------------------------------------------------------------------------------------------ guidance


def cfg_uncond_based(cond, uncond, scale):
    """u + s (c − u): diffusers / DMD2 / InstaFlow convention; scale 1 = the conditional output."""
    return uncond + scale * (cond - uncond)


def cfg_cond_based(cond, uncond, w):
    """c + w (c − u): LCM's convention; w = 0 = the conditional output; equals cfg_uncond_based with s = w + 1."""
    return cond + w * (cond - uncond)


def cond_based_to_uncond_based(w):
    """The uncond-based scale s that equals the cond-based weight w: s = w + 1."""
    return w + 1.0


def uncond_based_to_cond_based(scale):
    return scale - 1.0


CFG = {"uncond_based": cfg_uncond_based, "cond_based": cfg_cond_based}


def guidance_embedding(w, dim: int = 512, scale: float = 1000.0, dtype=jnp.float32):
    """Sinusoidal embedding of guidance scales w [B] -> [B, dim] for students that take w as input (LCM, VDM
    Appendix; diffusers' `get_guidance_scale_embedding`): w·scale times 10000^(−k/(half − 1)), sin then cos,
    zero-padded when dim is odd."""
    w = jnp.asarray(w, jnp.float32).reshape(-1) * scale
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(dtype)


# ------------------------------------------------------------------------------------------------ the teacher


def params_digest(params) -> str:
    """sha256 of a params pytree (paths, dtypes, shapes, bytes): the teacher's identity in pair-store keys."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen diffusion model as a pure function: `output(params, x, t, cond)` is the raw UNet output, the other
    methods give x0 / ε / v / flow velocity under the scheduler config's prediction type and schedule.

    `unet_fn(params, x [B,H,W,C], t [B], context [B,L,D]) -> [B,H,W,C]`; `scheduler_config`: a diffusers scheduler
    config dict (beta schedule and prediction type; a FlowMatch config for flow models)."""

    unet_fn: Callable
    scheduler_config: dict
    name: str = "teacher"

    @property
    def prediction_type(self) -> str:
        if self.scheduler_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
            return "flow_prediction"
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == "flow_prediction"

    def alphas_cumprod(self) -> np.ndarray:
        from jaxdiff.sampling.schedulers.ddim import DDIM

        return DDIM(self.scheduler_config).alphas_cumprod

    def alpha_sigma(self, t):
        """(α_t, σ_t) at training timesteps t [B] (floats interpolate ᾱ linearly; flow: σ = t / T)."""
        t = jnp.asarray(t, jnp.float32)
        if self.is_flow:
            s = t / float(self.scheduler_config.get("num_train_timesteps", 1000))
            return 1.0 - s, s
        acp = jnp.asarray(self.alphas_cumprod())
        lo = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, acp.shape[0] - 1)
        hi = jnp.clip(lo + 1, 0, acp.shape[0] - 1)
        frac = t - jnp.floor(t)
        a = acp[lo] * (1 - frac) + acp[hi] * frac
        return jnp.sqrt(a), jnp.sqrt(1.0 - a)

    def output(self, params, x, t, context):
        return self.unet_fn(params, x, t, context)

    def x0_eps(self, params, x, t, context, output=None):
        out = self.output(params, x, t, context) if output is None else output
        alpha, sigma = self.alpha_sigma(jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],)))
        return to_x0_eps(out.astype(jnp.float32), x, alpha, sigma, self.prediction_type)

    def predict(self, params, x, t, context, target: str):
        """The teacher's prediction as `target` ("epsilon", "sample", "v_prediction", "flow_prediction")."""
        out = self.output(params, x, t, context)
        if target == self.prediction_type:
            return out
        alpha, sigma = self.alpha_sigma(jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],)))
        x0, eps = to_x0_eps(out.astype(jnp.float32), x, alpha, sigma, self.prediction_type)
        return from_x0_eps(x0, eps, alpha, sigma, target)

    def guided(self, params, x, t, cond, uncond, scale, convention: str = "uncond_based", target: str | None = None):
        """Guided prediction (one batched call on [cond; uncond]); `convention` names how `scale` is read."""
        if convention not in CFG:
            raise UserError(f"unknown CFG convention {convention!r} (known: {', '.join(CFG)})")
        x2 = jnp.concatenate([x, x])
        t2 = jnp.concatenate([jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))] * 2)
        ctx = jnp.concatenate([cond, uncond])
        out = self.predict(params, x2, t2, ctx, target or self.prediction_type)
        c, u = jnp.split(out, 2)
        return CFG[convention](c, u, scale)


def from_pipeline(pipe) -> Teacher:
    """The Teacher of a loaded text-to-image pipeline's UNet (SD 1.x/2.x: one text encoder)."""
    if pipe.is_sdxl:
        raise UserError("the distillation teacher must be an SD 1.x/2.x pipeline (one text encoder); this is SDXL")
    unet = pipe.unet

    def unet_fn(params, x, t, context):
        return unet.apply(params, x, t, context).astype(jnp.float32)

    return Teacher(unet_fn, dict(pipe.scheduler_config), name=str(pipe.path))
