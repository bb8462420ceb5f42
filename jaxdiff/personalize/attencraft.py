"""AttenCraft (Shentu et al. 2024, arXiv 2405.17965; official train.py): two new tokens learned from ONE image holding
both concepts, with masks the model's own attention derives (no user masks).

Objective. Custom-Diffusion parameters train (to_k/to_v kernels of every cross-attention, and the two new token rows,
a separate leaf). Per step each instance example uses a prompt subset drawn with probability 1/3 each: `<a>` only,
`<b>` only, both. L = ε-MSE masked to the union of the present tokens' masks + `prior.weight` × unmasked ε-MSE on
class images + `attention_weight` × the Jensen–Shannon attention loss: per present token (the start token, standing
for the background, always), JS(softmax over pixels of its min-max normalised cross-attention map,
softmax over pixels of its binary mask), mean over those tokens.

Masks (`derive_masks`, pure). Prompt "both", t ~ U[0, `mask_t_max`): cross-attention at `cross_side` (mean over heads
and layers) of [SoT, `<a>`, `<b>`], resized to `affinity_side` (bicubic), raised to `cross_power` and min-max
normalised; the affinity A = mean self-attention at `affinity_side`, P = A^`affinity_power` (rows re-normalised);
refined m_k = normalise(P · vec(map_k)). A pixel belongs to class k when m_k exceeds both other maps by more than
`threshold`; each class goes to the token with the largest m-mass inside it; the tokens must be distinct
(a UserError at the start; a refused refresh later). Every `refresh_every` steps the masks are derived again with
the current parameters and kept only when both concept masks have SSIM ≥ `ssim_threshold` (uniform window
`ssim_window`, skimage's defaults otherwise) with the previous ones and the tokens stay distinct. The masks live in
a second runner network ("masks") that a refresh phase replaces in the compiled step, so they are checkpointed and
a killed run resumes with them.

Split (`split`, not in the paper). On the shapes model the two fresh tokens' cross-attention maps agree to ~0.01
(both light up both objects), so no pixel goes to either concept class and the official code would abort. "x_kmeans"
then takes the pixels where the larger concept map beats the background map by `threshold` and splits them into two
by 2-means of their x coordinates: the left part is `<a>`'s mask, the right one `<b>`'s (the prompt order; the
tokens are fresh, so any fixed order is a naming). "none" (default) is the official behaviour.

Resolution. The official code uses SD's 16×16 cross-attention and a 32×32 affinity; the v2 shapes UNet (8×8 latent)
has attention at 8×8 (down0, up2 ×2), 4×4 and 2×2, so the defaults are the finest, 8×8 for both (64 pixels; a
64×64 affinity). `cross_side`/`affinity_side` pick others (e.g. 4 and 4; or 4 upsampled to an 8×8 affinity).

Kept from the official code as options: the 1/3 prompt subsets, t < 300 for masks, threshold 0.1, A⁴, SSIM 0.8
with window 7, refresh every 20 steps, squared cross maps. Not kept: detaching the start token's key and value (needs
a per-position hook in the attention; as in `custom_diffusion`), the crop-mask augmentation. UNVERIFIED readings
(../shared/specs/personalization.md §3): the cross map is squared once (step 1 and step 3 of the spec are read as the
same square); "normalise" of A and P is a row normalisation (rows of a softmax already sum to 1, so any positive
scale gives the same min-max normalised m_k); the masked ε-MSE divides by the mask's area (Custom Diffusion's masked
loss); the attention loss uses the instance half's maps of the same forward pass at every sampled t.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import fileio, selectors
from jaxdiff.errors import UserError
from jaxdiff.models import attention_control as ac
from jaxdiff.personalize import custom_diffusion, dreambooth_lora, tokens
from jaxdiff.personalize.job import Job, Plan
from jaxdiff.sampling.schedulers import common

MASKS_FILE = "attencraft_masks.npz"
NUM_TOKENS = 2  # --token "<a>,<b>"
CLASSES = ("background", "a", "b")  # mask rows: the start token (background), then the two new tokens


# -- pure pieces ----------------------------------------------------------------------------------------------------
def normalise(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Min-max normalisation over the last axis: [..., Q] -> [..., Q] in [0, 1]."""
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    return (x - lo) / (hi - lo + eps)


def js_divergence(p: jax.Array, q: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Jensen–Shannon divergence (natural log) of distributions over the last axis: [..., Q] -> [...]."""
    m = 0.5 * (p + q)
    kl = lambda a: jnp.sum(a * (jnp.log(a + eps) - jnp.log(m + eps)), -1)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def attention_js(maps: jax.Array, masks: jax.Array) -> jax.Array:
    """Per map, JS(softmax(normalise(map)), softmax(mask)) over pixels: maps, masks [..., Q] -> [...]."""
    return js_divergence(jax.nn.softmax(normalise(maps), -1), jax.nn.softmax(masks.astype(jnp.float32), -1))


def refine(cross: jax.Array, affinity: jax.Array, power: int) -> jax.Array:
    """m_k = normalise(P · cross_k), P = A^power, A and P row-normalised: cross [K, Q], affinity [Q, Q] -> [K, Q]."""
    a = affinity / (affinity.sum(-1, keepdims=True) + 1e-12)
    p = jnp.linalg.matrix_power(a, int(power)) if power > 1 else a
    p = p / (p.sum(-1, keepdims=True) + 1e-12)
    return normalise(cross @ p.T)


def segment(m: jax.Array, threshold: float) -> jax.Array:
    """Class per pixel of refined maps m [K, Q]: k where m_k exceeds every other map by more than `threshold`, else -1
    (unassigned). -> int32 [Q]."""
    k = m.shape[0]
    wins = [jnp.all(jnp.stack([m[i] - m[j] > threshold for j in range(k) if j != i]), 0) for i in range(k)]
    wins = jnp.stack(wins)  # at most one class wins a pixel
    return jnp.where(wins.any(0), jnp.argmax(wins, 0), -1).astype(jnp.int32)


def assign(labels: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Class -> token: each class goes to the token (row of m [K, Q]) with the largest m-mass inside it.
    -> (token of each class int32 [K], distinct bool [])."""
    k = m.shape[0]
    inside = jnp.stack([labels == c for c in range(k)]).astype(m.dtype)  # [class, Q]
    mass = inside @ m.T  # [class, token]
    owner = jnp.argmax(mass, -1).astype(jnp.int32)
    distinct = jnp.all(jnp.sort(owner) == jnp.arange(k))
    return owner, distinct


def token_masks(labels: jax.Array, owner: jax.Array) -> jax.Array:
    """Binary masks [K, Q] per token: the pixels of the class assigned to it (float32)."""
    k = owner.shape[0]
    per_class = jnp.stack([labels == c for c in range(k)]).astype(jnp.float32)
    # token t takes the class c with owner[c] == t (distinct owners: exactly one)
    pick = (owner[None, :] == jnp.arange(k)[:, None]).astype(jnp.float32)  # [token, class]
    return pick @ per_class


def ssim(a: jax.Array, b: jax.Array, window: int = 7, data_range: float = 1.0) -> jax.Array:
    """Mean SSIM of two [H, W] images as skimage.metrics.structural_similarity with its defaults (uniform window,
    K1 0.01, K2 0.03, sample covariance, reflect padding, the border of (window-1)/2 cropped); the window is capped
    at the image's smaller side (odd)."""
    h, w = a.shape
    win = min(window, h, w)
    win -= 1 - win % 2
    pad = (win - 1) // 2

    def filt(x):  # scipy.ndimage.uniform_filter, mode "reflect" (edge sample repeated)
        x = jnp.pad(x, pad, mode="symmetric")
        k = jnp.ones((win, win), jnp.float32) / (win * win)
        return jax.scipy.signal.convolve2d(x, k, mode="valid")

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    npix = win * win
    cov_norm = npix / (npix - 1) if npix > 1 else 1.0
    ux, uy = filt(a), filt(b)
    vx = cov_norm * (filt(a * a) - ux * ux)
    vy = cov_norm * (filt(b * b) - uy * uy)
    vxy = cov_norm * (filt(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    if pad:
        s = s[pad:-pad, pad:-pad]
    return s.mean()


@dataclasses.dataclass(frozen=True)
class MaskSettings:
    cross_side: int = 8
    affinity_side: int = 8
    cross_power: float = 2.0
    affinity_power: int = 4
    threshold: float = 0.1
    split: str = "none"

    @classmethod
    def of(cls, c) -> MaskSettings:
        if str(c.split) not in SPLITS:
            raise UserError(f"config.split={c.split!r}: choose from {', '.join(SPLITS)}")
        return cls(int(c.cross_side), int(c.affinity_side), float(c.cross_power), int(c.affinity_power),
                   float(c.threshold), str(c.split))  # fmt: skip


SPLITS = ("none", "x_kmeans")


def split_x(region: jax.Array, side: int, iterations: int = 8) -> tuple[jax.Array, jax.Array]:
    """The pixels of a region [Q] (on a side x side grid) split in two by 2-means of their x coordinates
    (initialised at the region's leftmost and rightmost x): (left [Q], right [Q]) float32."""
    x = jnp.tile(jnp.arange(side, dtype=jnp.float32), side)
    w = region.astype(jnp.float32)
    big = jnp.float32(side)
    lo, hi = jnp.min(jnp.where(w > 0, x, big)), jnp.max(jnp.where(w > 0, x, -1.0))

    def body(_, centres):
        a, b = centres
        left = (jnp.abs(x - a) <= jnp.abs(x - b)).astype(jnp.float32) * w
        right = w - left
        a = jnp.where(left.sum() > 0, (left * x).sum() / jnp.maximum(left.sum(), 1e-9), a)
        b = jnp.where(right.sum() > 0, (right * x).sum() / jnp.maximum(right.sum(), 1e-9), b)
        return a, b

    a, b = jax.lax.fori_loop(0, iterations, body, (lo, hi))
    left = (jnp.abs(x - a) <= jnp.abs(x - b)).astype(jnp.float32) * w
    return left, w - left


def cross_at(maps: dict, side: int, positions) -> jax.Array:
    """Mean over heads and cross-attention layers at `side` of key positions [K] (ints): [B, K, side²]."""
    return jnp.stack([ac.token_maps(maps, side, int(p)).reshape(-1, side * side) for p in positions], 1)


def affinity_at(maps: dict, side: int) -> jax.Array:
    """Mean over heads and self-attention layers at `side`: [B, side², side²]."""
    picked = [p.mean(1) for name, p in maps.items() if name.endswith("attn1") and p.shape[2] == side * side]
    if not picked:
        raise UserError(f"the UNet has no self-attention at {side}x{side} (config.affinity_side)")
    return jnp.mean(jnp.stack(picked), 0)


def derive_masks(cross: jax.Array, affinity: jax.Array, s: MaskSettings):
    """One image's masks: cross [K, cross_side²] raw maps of (SoT, <a>, <b>), affinity [Q, Q] at affinity_side.
    -> (masks [K, Q] float32 binary, distinct bool [], refined maps [K, Q])."""
    k = cross.shape[0]
    c = cross.reshape(k, s.cross_side, s.cross_side)
    if s.cross_side != s.affinity_side:
        c = jax.image.resize(c, (k, s.affinity_side, s.affinity_side), "bicubic")
    c = normalise(jnp.maximum(c.reshape(k, -1), 0.0) ** s.cross_power)
    m = refine(c, affinity, s.affinity_power)
    labels = segment(m, s.threshold)
    owner, distinct = assign(labels, m)
    masks = token_masks(labels, owner)
    if s.split == "x_kmeans":  # not in the paper: the concept maps agree, so split their joint region by x
        region = (jnp.maximum(m[1], m[2]) - m[0] > s.threshold) & (labels != 0)
        left, right = split_x(region, s.affinity_side)
        fallback = jnp.stack([(labels == 0).astype(jnp.float32), left, right])
        ok = (left.sum() > 0) & (right.sum() > 0) & (jnp.sum(labels == 0) > 0)
        masks = jnp.where(distinct, masks, fallback)
        distinct = distinct | ok
    return masks, distinct, m


def resize_masks(masks: jax.Array, side: int) -> jax.Array:
    """[..., Q] masks on a square grid -> [..., side, side] (bicubic, clipped to [0, 1]; identity at the same side)."""
    q = masks.shape[-1]
    src = math.isqrt(q)
    m = masks.reshape(*masks.shape[:-1], src, src)
    if src == side:
        return m
    return jnp.clip(jax.image.resize(m, (*m.shape[:-2], side, side), "bicubic"), 0.0, 1.0)


# -- the method -----------------------------------------------------------------------------------------------------
def _tokens(job: Job) -> tuple[str, str]:
    if len(job.tokens) != 2:
        raise UserError(f"attencraft learns two tokens: give --token '<a>,<b>' (got {job.tokens})")
    return job.tokens[0], job.tokens[1]


def subset_prompts(job: Job) -> list[tuple[str, tuple[int, int, int]]]:
    """[(prompt, key positions of (SoT, <a>, <b>), -1 where absent)] for the subsets <a> only, <b> only, both."""
    a, b = _tokens(job)
    c = job.config
    prompts = [str(c.prompt_single).format(a), str(c.prompt_single).format(b), str(c.prompt_both).format(a, b)]
    out = []
    for prompt in prompts:
        ids = list(job.tokenize([prompt])[0])
        pos = [0] + [ids.index(i) if i in ids else -1 for i in job.new_ids]
        out.append((prompt, tuple(pos)))
    if out[2][1][1] < 0 or out[2][1][2] < 0 or out[0][1][1] < 0 or out[1][1][2] < 0:
        raise UserError("config.prompt_single / prompt_both must place the tokens within the tokenizer's length")
    return out


def _select(s: MaskSettings, with_self: bool):
    sides = {s.cross_side}
    return lambda layer: (layer.cross and layer.side in sides) or (with_self and not layer.cross and
                                                                   layer.side == s.affinity_side)  # fmt: skip


def plan(job: Job) -> Plan:
    c = job.config
    _tokens(job)
    te, unet = job.text_encoder, job.unet
    table = tokens.table_of(te.params)
    words = [w.strip() for w in str(c.init_words).split(",")]
    if len(words) != 2:
        raise UserError(f"config.init_words needs two words separated by ',', got {c.init_words!r}")
    rows = jnp.concatenate([tokens.init_rows(table, w, job.tokenizer, seed=int(c.seed)) for w in words])
    attention, _ = selectors.split(unet.params, custom_diffusion._selector(str(c.freeze_model)))
    if len(job.images) != 1:
        raise UserError(f"attencraft learns from ONE image holding both concepts; --images has {len(job.images)}")
    s = MaskSettings.of(c)
    latent = jnp.asarray(job.instance_latents[:1])
    subsets = subset_prompts(job)
    sub_ids = np.stack([job.tokenize([p])[0] for p, _ in subsets])
    sub_pos = np.asarray([pos for _, pos in subsets], np.int32)
    both_ids, both_pos = jnp.asarray(sub_ids[2:3]), [int(x) for x in sub_pos[2]]
    acp = jnp.asarray(job.alphas_cumprod(), jnp.float32)
    t_max = int(c.mask_t_max)
    side_lat = int(job.latent_shape[0])

    def masks_from(personal, frozen, rng):
        """Masks [3, Q] of the instance image under `personal` (the "both" prompt, t ~ U[0, t_max))."""
        unet_params = selectors.combine(personal["attention"], frozen["unet"])
        ctx = tokens.encode(te, frozen["text_encoder"], personal["rows"], both_ids)
        r_t, r_n = jax.random.split(rng)
        t = jax.random.randint(r_t, (1,), 0, t_max)
        x_t = common.add_noise(acp, latent, jax.random.normal(r_n, latent.shape), t)
        _, maps = ac.apply_with_maps(unet, unet_params, x_t, t.astype(jnp.float32), ctx, select=_select(s, True))
        cross = cross_at(maps, s.cross_side, both_pos)[0]
        return derive_masks(cross, affinity_at(maps, s.affinity_side)[0], s)

    frozen = {"unet": unet.params, "text_encoder": te.params}
    personal = {"attention": attention, "rows": rows}
    init_masks, distinct, refined = jax.jit(masks_from)(personal, frozen, jax.random.PRNGKey(int(c.seed)))
    init_masks = np.asarray(init_masks)
    if not bool(distinct):
        raise UserError(
            "attencraft: the initial attention maps do not give the two tokens and the background distinct classes "
            f"(pixels per class {[int(x) for x in init_masks.sum(-1)]}); try other config.init_words, "
            "config.threshold or config.cross_side"
        )
    job.out.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_file(job.out / MASKS_FILE) as f:
        np.savez(f, initial=init_masks, initial_refined=np.asarray(refined), side=s.affinity_side)

    weight, attn_w = float(c.prior.weight), float(c.attention_weight)
    use_prior = weight > 0 and int(c.prior.num_images) > 0
    prior_latents, prior_ids, _ = dreambooth_lora.prior_data(job) if use_prior else (None, None, None)
    batch = int(c.train.batch_size)

    def loss(params, frozen, b, rng):
        p, masks = params["personal"], jax.lax.stop_gradient(params["masks"]["masks"])
        ids, latents = b["ids"], b["latents"]
        if use_prior:
            ids = jnp.concatenate([ids, b["prior_ids"]])
            latents = jnp.concatenate([latents, b["prior_latents"]])
        ctx = tokens.encode(te, frozen["text_encoder"], p["rows"], ids)
        unet_params = selectors.combine(p["attention"], frozen["unet"])
        r_n, r_t = jax.random.split(rng)
        noise = jax.random.normal(r_n, latents.shape, jnp.float32)
        t = jax.random.randint(r_t, (latents.shape[0],), 0, acp.shape[0])
        x_t = common.add_noise(acp, latents.astype(jnp.float32), noise, t)
        pred, maps = ac.apply_with_maps(unet, unet_params, x_t, t.astype(jnp.float32), ctx, select=_select(s, False))
        err = jnp.mean(jnp.square(pred.astype(jnp.float32) - noise), -1)  # [B, h, w]
        present = b["present"]  # [B, 3]: SoT, <a>, <b>
        region = jnp.clip(present[:, 1:] @ resize_masks(masks[1:], side_lat).reshape(2, -1), 0.0, 1.0)
        region = region.reshape(-1, side_lat, side_lat)  # union of the present tokens' masks
        inst = jnp.sum(err[:batch] * region, (1, 2)) / jnp.maximum(jnp.sum(region, (1, 2)), 1.0)
        total = jnp.mean(inst)
        aux = {"instance": jnp.mean(inst)}
        if use_prior:
            aux["prior"] = jnp.mean(err[batch:])
            total = total + weight * aux["prior"]
        # the cross-attention of each example's present tokens at their key positions, instance rows only
        per_layer = [
            v[:batch].mean(1) for n, v in maps.items() if n.endswith("attn2") and v.shape[2] == s.cross_side**2
        ]
        cross = jnp.mean(jnp.stack(per_layer), 0)  # [B, Q, L]
        cols = jnp.take_along_axis(cross, jnp.maximum(b["positions"], 0)[:, None, :], -1).swapaxes(1, 2)  # [B,3,Q]
        target = masks if s.cross_side == s.affinity_side else resize_masks(masks, s.cross_side).reshape(3, -1)
        js = attention_js(cols, jnp.broadcast_to(target, cols.shape))  # [B, 3]
        aux["attention"] = jnp.mean(jnp.sum(js * present, 1) / jnp.sum(present, 1))
        total = total + attn_w * aux["attention"]
        return total, aux

    every, ssim_min, window = int(c.refresh_every), float(c.ssim_threshold), int(c.ssim_window)

    def refresh(params, frozen, b, rng):
        """The masks network's update: new masks - old (applied as is) when the refresh is accepted, else 0."""
        old = params["masks"]["masks"]
        step = frozen["step"]
        due = (every > 0) & (step > 0) & (step % max(every, 1) == 0)
        side = s.affinity_side

        def compute(_):
            new, distinct, _ = masks_from(jax.lax.stop_gradient(params["personal"]), frozen, rng)
            sims = jnp.stack([ssim(new[k].reshape(side, side), old[k].reshape(side, side), window) for k in (1, 2)])
            ok = distinct & jnp.all(sims >= ssim_min)
            return jnp.where(ok, new - old, 0.0), ok.astype(jnp.float32), sims.min()

        def skip(_):
            return jnp.zeros_like(old), jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)

        delta, accepted, sim = jax.lax.cond(due, compute, skip, None)
        counts = jnp.stack([due.astype(jnp.float32), accepted])  # running [refreshes tried, accepted]
        return (
            {"masks": delta, "refreshes": counts},
            1.0 - accepted,
            {"accepted": accepted, "ssim_min": sim, "due": due},
        )

    from jaxdiff.train import step as step_lib

    net = step_lib.Network("masks", optax.identity())  # update = the delta: params become the new masks exactly
    phase = step_lib.Phase("refresh", "masks", grad_fn=refresh)

    def batch_fn(step: int) -> dict:
        rng = np.random.default_rng([int(c.seed), 17, step])
        k = rng.integers(0, 3, batch)  # 0: <a> only, 1: <b> only, 2: both (1/3 each)
        out = {
            "latents": np.repeat(job.instance_latents[:1], batch, 0),
            "ids": sub_ids[k],
            "positions": sub_pos[k],
            "present": (sub_pos[k] >= 0).astype(np.float32),
        }
        if use_prior:
            j = np.random.default_rng([int(c.seed), 13, step]).integers(0, len(prior_latents), batch)
            out.update(prior_latents=prior_latents[j], prior_ids=prior_ids[j])
        return out

    extra = {"masks": (net, phase, {"masks": jnp.asarray(init_masks), "refreshes": jnp.zeros((2,), jnp.float32)})}
    return Plan(personal, None, loss, batch_fn, frozen, extra=extra)


def outputs(job: Job, trained: dict) -> dict:
    """{"rows": [2, D], "unet": the UNet with the trained projections, "masks": the last accepted [3, Q],
    "trained_params"}."""
    result = custom_diffusion.outputs(job, trained)
    extra = getattr(job, "trained_extra", {}).get("masks", {})
    masks, counts = extra.get("masks"), extra.get("refreshes")
    return {
        **result,
        "masks": None if masks is None else np.asarray(masks),
        "refreshes": None if counts is None else np.asarray(counts),
    }


def save_extra(job: Job, result: dict, out) -> None:
    """OUT/attencraft_masks.npz: the initial masks (and refined maps) and the last accepted ones, [3, side²] rows
    (background, <a>, <b>), and "refreshes" = [refreshes tried, accepted]."""
    path = out / MASKS_FILE
    saved = dict(np.load(path)) if path.is_file() else {}
    if result.get("masks") is not None:
        saved["final"] = result["masks"]
    if result.get("refreshes") is not None:
        saved["refreshes"] = result["refreshes"]  # [tried, accepted]
    with fileio.atomic_file(path) as f:
        np.savez(f, **saved)
