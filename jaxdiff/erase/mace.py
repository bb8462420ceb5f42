"""MACE — Mass Concept Erasure (Lu et al., CVPR 2024; Shilin-LU/MACE): CFR, per-concept LoRA, closed-form fusion.

(1) Closed-form refinement (`cfr`, `src/cfr_utils.py::closed_form_refinement`) of every attn2 K/V matrix: the
residual tokens of prompts containing the concept (common prefix, common suffix and the padding/EoT tail,
`find_matching_indices` extended to L) are mapped onto the matching tokens of the same prompt with the concept
replaced by the mapping concept ("a person wearing clothes" for nudity):

    W' = (Σ v cᵀ + ρ S_vc + λW)(Σ c cᵀ + ρ S_cc + λI)⁻¹,   v = W_old c_new,  λ = 0,  ρ = 7e-7

S = a cache over many captions' tokens (MACE: all COCO-2014 captions, all 77 tokens; S_vc = W_old S_cc).
Quirk kept as an option: the official common branch applies the preserve scale twice (ρ²); default on.

(2) Per-concept LoRA (`make_loss`, `train_lora`; `src/cfr_lora_training.py`, `train_seperate`): for each concept i
separately, on top of the CFR-edited UNet, a rank-r LoRA on attn2 to_k/to_v (diffusers LoRALinearLayer: down
Gaussian with std 1/r, up 0, scale 1) trained on images of the concept with a segmentation mask of it. The loss
is the attention loss alone (no denoising term; the official prior preservation is off by default and not kept):

    L = Σ_{cross-attention layers} ‖ P_l[b·heads, q ∈ M_l, k ∈ K] ‖_F

P_l the layer's attention probabilities at x_t = add_noise(z, ε, t), z = VAE sample × scaling factor, M_l the mask
resized to the layer's d×d (nearest) and > 0.5, K the positions of the concept's tokens in the prompt. Official
settings (`configs/erase/mace.py`): rank 1, AdamW lr 1e-5 constant, max grad norm 1, batch 1, ~120 steps. Official
options kept: `importance_sampling` (t drawn with probability ∝ f(t) = σ(0.05(t − 200)) − σ(0.05(t − 400)), σ the
logistic function; otherwise t ~ U{0..999}) and `no_real_image` (noise added to zeros instead of the latents).
MACE masks generated images with Grounded-SAM; on the `shapes` model the training images are renders of scenes
containing the concept with the renderer's exact object mask (`shapes.render_mask`), the exact equivalent. Other
models read images and masks from `lora.data_dir` (`<dir>/<concept>/*.png|jpg`, `<dir>/<concept>/masks/<same
name>`, optional `prompts.txt`, one prompt per image in name order).

(3) Closed-form multi-LoRA fusion (`fuse`, `src/fuse_lora_close_form.py`):
    W = argmin Σ_i Σ_{c∈E_i} ||W c − (W_0 + ΔW_i) c||² + ρ_f Σ_cache ||W c − W_0 c||² + λ ||W − W_0||²,
W_0 the CFR-edited weights, ρ_f = fuse_preserve_scale (7e-7, applied once), E_i all L tokens of the prompts of
concept i. `run` does (1) → (2) → (3); `stages="cfr"` (config variant ":cfr", "mace-cfr") stops after (1).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import lora, selectors
from jaxdiff.erase import common, finetune, ridge
from jaxdiff.erase.common import Encoded, pair_token_indices
from jaxdiff.erase.config import split_list
from jaxdiff.erase.job import Job, Result
from jaxdiff.erase.registry import MethodInfo
from jaxdiff.errors import UserError
from jaxdiff.models import attention_control
from jaxdiff.sampling.schedulers.common import add_noise

SELECTOR = "esd-x-strict"  # attn2 to_k / to_v: the official LoRA targets
METHOD = MethodInfo(kind="closed_form+finetune", order=30, selector=SELECTOR)
FUSE_SETTINGS = "--config.lora.fuse_lam (λ) or --config.lora.fuse_preserve_scale (ρ_f)"
STAGES = ("full", "cfr")  # full: CFR -> per-concept LoRA -> fusion; cfr: stage 1 alone ("mace-cfr")
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
    new_mats, condition = ridge.edit(mats, terms, lam, preserve, settings=FUSE_SETTINGS)
    jax.block_until_ready(new_mats)
    info = {"concepts": len(deltas), "condition_number": condition, "seconds": time.perf_counter() - start}
    return ridge.set_kv(params, new_mats), info


# ---------------------------------------------------------------------------- stage 2: per-concept LoRA


def importance_weights(num_train_timesteps: int = 1000) -> np.ndarray:
    """MACE's concept-focal importance sampling: P(t) ∝ σ(0.05 (t − 200)) − σ(0.05 (t − 400)), t = 0..T−1."""
    t = np.arange(num_train_timesteps, dtype=np.float64)
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    f = sigmoid(0.05 * (t - 200)) - sigmoid(0.05 * (t - 400))
    return f / f.sum()


def sample_timesteps(key, batch: int, num_train_timesteps: int = 1000, importance_sampling: bool = True):
    """Integer timesteps [batch]: drawn from `importance_weights`, or uniform on 0..T−1."""
    if importance_sampling:
        p = jnp.asarray(importance_weights(num_train_timesteps), jnp.float32)
        return jax.random.choice(key, num_train_timesteps, (batch,), p=p)
    return jax.random.randint(key, (batch,), 0, num_train_timesteps)


def resize_nearest(masks, side: int):
    """masks [B, H, W] -> [B, side, side] as torch's F.interpolate(mode="nearest"): source index ⌊i·H/side⌋."""
    h, w = masks.shape[-2:]
    rows, cols = (np.arange(side) * h) // side, (np.arange(side) * w) // side
    return masks[:, rows][:, :, cols]


def attention_loss(maps: dict, masks, positions):
    """Σ over the cross-attention layers (names ending in attn2) of ‖P[b, heads, q ∈ mask, k ∈ concept tokens]‖_F.

    maps: {layer: probabilities [B, heads, Q, L]} (`attention_control.apply_with_maps`); masks [B, H, W] in [0, 1]
    (resized per layer to its √Q × √Q, nearest, then > 0.5); positions [B, L]: 1 at the concept's tokens. An empty
    selection contributes 0 (zero gradient, as torch's norm of an empty tensor)."""
    positions = jnp.asarray(positions, jnp.float32)
    total = jnp.float32(0.0)
    for name in sorted(maps):
        if not name.endswith("attn2"):
            continue
        p = maps[name].astype(jnp.float32)
        b, _, q, keys = p.shape
        if keys != positions.shape[1]:
            raise ValueError(f"{name}: {keys} keys for {positions.shape[1]} token positions")
        inside = (resize_nearest(jnp.asarray(masks, jnp.float32), math.isqrt(q)) > 0.5).reshape(b, q)
        sel = inside.astype(jnp.float32)[:, None, :, None] * positions[:, None, None, :]
        sq = jnp.sum(jnp.square(p) * sel)
        total = total + jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    return total


def make_loss(
    model,
    *,
    importance_sampling: bool = True,
    no_real_image: bool = False,
    scheduler_config: dict | None = None,
):
    """MACE's LoRA loss `loss(adapters, frozen, batch, rng) -> (loss, aux)`: the attention loss of the UNet
    frozen["base"] (the CFR-edited params) with the adapters merged. batch: "latent_mean", "latent_std" [B, h, w, c]
    (scaled VAE posterior: z = mean + std·ε, as `latent_dist.sample()`), "mask" [B, H, W], "context" [B, L, D],
    "positions" [B, L]."""
    sched = common.ddim(scheduler_config)
    acp = jnp.asarray(sched.alphas_cumprod, jnp.float32)
    T = sched.num_train_timesteps

    def loss(adapters, frozen, batch, rng):
        base = jax.lax.stop_gradient(frozen["base"])
        mean = batch["latent_mean"]
        b = mean.shape[0]
        k_z, k_noise, k_t = jax.random.split(rng, 3)
        z = mean + batch["latent_std"] * jax.random.normal(k_z, mean.shape, jnp.float32)
        if no_real_image:
            z = jnp.zeros_like(z)
        noise = jax.random.normal(k_noise, mean.shape, jnp.float32)
        t = sample_timesteps(k_t, b, T, importance_sampling)
        x = add_noise(acp, z, noise, t)
        merged = lora.merge(base, adapters)
        _, maps = attention_control.apply_with_maps(
            model, merged, x, t.astype(jnp.float32), batch["context"], select=lambda layer: layer.cross
        )
        return attention_loss(maps, batch["mask"], batch["positions"]), {"t": jnp.mean(t.astype(jnp.float32))}

    return loss


def lora_pattern(params, selector: str = SELECTOR) -> str:
    """The `lora.init` pattern of the 2-D kernels a selector picks (attn2 to_k/to_v by default)."""
    paths = [selectors.path_str(p[:-1]) for p in selectors.selected_paths(params, selector) if p[-1] == "kernel"]
    if not paths:
        raise UserError(f"selector {selector!r} picks no kernel for MACE's LoRA")
    return "^(" + "|".join(re.escape(p) for p in paths) + ")/kernel$"


def kv_deltas(adapters: dict) -> dict:
    """{module path: ΔW [d_out, d_in]} (PyTorch convention, names as `ridge.get_kv`) of trained adapters."""
    return {name: lora.delta(a).T for name, a in adapters.items()}


def train_lora(
    model,
    base,
    batch_fn,
    train,
    workdir: str,
    *,
    rank: int = 1,
    selector: str = SELECTOR,
    seed: int = 0,
    mesh=None,
    progress: bool = False,
    eval_examples: int = 0,
    **loss_options,
):
    """One concept's LoRA on `base` (the CFR-edited params) through the erasure runner (`finetune.run`): returns
    (adapters, ΔW by module path, info with the first/last logged loss, ‖Δ adapters‖ and ‖ΔW‖_F; with
    `eval_examples`, the mean loss before/after training on the first batches with fixed noise and timesteps)."""
    if mesh is None:
        from jaxdiff import sharding

        mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
    adapters = lora.init(base, lora_pattern(base, selector), rank=int(rank), init="gaussian", seed=seed)
    loss = make_loss(model, **loss_options)
    state, info = finetune.run(
        [finetune.unet_network(train)],
        finetune.single_loss(loss),
        {"unet": adapters},
        {"base": base},
        batch_fn,
        train,
        workdir,
        seed=seed,
        mesh=mesh,
        model=model,
        progress=progress,
        label="MACE LoRA step",
    )
    trained = state.params["unet"]
    if eval_examples:  # the logged losses are single noisy steps (batch 1, random t): also the mean on fixed draws
        fixed = jax.jit(lambda a, batch, key: loss(a, {"base": base}, batch, key)[0])
        keys = [jax.random.fold_in(jax.random.PRNGKey(seed + 99), i) for i in range(int(eval_examples))]
        mean = lambda a: float(np.mean([float(fixed(a, batch_fn(i), k)) for i, k in enumerate(keys)]))  # noqa: E731
        info["attention_loss_fixed"] = {"before": mean(adapters), "after": mean(trained), "examples": len(keys)}
    deltas = kv_deltas(trained)
    info["delta_w_norm"] = float(jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d in deltas.values())))
    return trained, deltas, info


def concept_positions(enc: Encoded, word_ids: list[int]) -> np.ndarray:
    """[B, L] float: 1 at the tokens of the concept (`word_ids`, the concept's tokens without BOS/EOS) in each prompt
    (every occurrence); a UserError naming a prompt where the concept's tokens do not appear."""
    out = np.zeros(enc.ids.shape, np.float32)
    n = len(word_ids)
    for i in range(len(enc)):
        ids = enc.ids[i, : int(enc.lengths[i])].tolist()
        for j in range(len(ids) - n + 1):
            if ids[j : j + n] == word_ids:
                out[i, j : j + n] = 1.0
        if not out[i].any():
            prompt = enc.prompts[i] if enc.prompts else i
            raise UserError(f"MACE LoRA: the concept's tokens {word_ids} are not in the prompt {prompt!r}")
    return out


def shapes_data(concept: str, n: int, size: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """n (caption, render [size, size, 3] in [0, 1], exact mask [size, size] in [0, 1]) of single-object scenes of the
    concept: the shapes world's stand-in for MACE's generated images and their Grounded-SAM masks."""
    from jaxdiff.data import shapes
    from jaxdiff.erase import evaluate as ev

    prompts, scenes = ev.captions(ev.resolve(concept), n, seed)
    images = np.stack([shapes.render(s, size) for s in scenes]).astype(np.float32) / 255.0
    masks = np.stack([shapes.render_mask(s, size)[..., 0] for s in scenes]).astype(np.float32) / 255.0
    return prompts, images, masks


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def folder_data(folder: str, concept: str, size: int, default_prompts: list[str]):
    """(prompts, images [N, size, size, 3], masks [N, size, size]) from `<folder>/<concept>/`: images, masks of the
    same name in `masks/`, optional `prompts.txt` (one per image in name order; else `default_prompts` cycled)."""
    from PIL import Image

    if not folder:
        raise UserError(
            "MACE's LoRA stage needs images of the concept with segmentation masks on this model: set "
            "--config.lora.data_dir (<dir>/<concept>/*.png and <dir>/<concept>/masks/<same name>), or run the "
            "closed-form refinement alone (configs/erase/mace.py:cfr)"
        )
    root = Path(folder) / concept
    files = sorted(p for p in root.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
    if not files:
        raise UserError(f"MACE LoRA: no images of {concept!r} in {root}")
    masks = []
    for f in files:
        found = [m for m in (root / "masks").glob(f.stem + ".*") if m.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise UserError(f"MACE LoRA: no mask for {f} in {root / 'masks'}")
        masks.append(found[0])
    load = lambda p, mode: np.asarray(Image.open(p).convert(mode).resize((size, size), Image.BICUBIC), np.float32)  # noqa: E731
    images = np.stack([load(f, "RGB") for f in files]) / 255.0
    mask_arr = np.stack([load(m, "L") for m in masks]) / 255.0
    listed = root / "prompts.txt"
    if listed.is_file():
        prompts = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if len(prompts) != len(files):
            raise UserError(f"{listed}: {len(prompts)} prompts for {len(files)} images")
    else:
        prompts = [default_prompts[i % len(default_prompts)] for i in range(len(files))]
    return prompts, images, mask_arr


def concept_batches(job: Job, index: int, concept: str):
    """The training data of one concept as a deterministic `batch_fn(step)` for `finetune.run`."""
    from jaxdiff.erase import evaluate as ev

    o, b = job.config.lora, int(job.config.train.batch_size)
    size = job.pipe.default_size
    if job.is_shapes:
        prompts, images, masks = shapes_data(concept, int(o.num_images), size, job.config.seed + 61 + 7 * index)
    else:
        prompts, images, masks = folder_data(o.data_dir, concept, size, job.prompts_for([concept]))
    enc = job.encode(prompts)
    word = ev.resolve(concept).word if job.is_shapes else concept  # the shapes captions name it by its `word`
    positions = jnp.asarray(concept_positions(enc, job.encode([word]).word_ids(0)))
    vae = job.pipe.vae
    scale = float(vae.config.get("scaling_factor", 0.18215))
    mean, logvar = jax.jit(lambda p, x: vae.encode(p, x * 2.0 - 1.0))(vae.params, jnp.asarray(images))
    data = {
        "latent_mean": mean * scale,
        "latent_std": jnp.exp(0.5 * logvar) * scale,
        "mask": jnp.asarray(masks),
        "context": enc.emb,
        "positions": positions,
    }
    n = len(prompts)

    def batch_fn(step):
        idx = finetune.pick(step, n, b, job.config.seed + index)
        return {k: v[idx] for k, v in data.items()}

    return batch_fn, n


# ------------------------------------------------------------------------------------------- the method


def cache_of(job: Job):
    """The preservation cache S_cc: `mace.cache_prompts` when given, else the job's preserved prompts."""
    o = job.config.mace
    if o.cache_prompts:
        enc = job.encode(split_list(o.cache_prompts))
        return ridge.context_cache(enc.emb, enc.lengths)
    return job.preservation_cache()


def run(job: Job) -> Result:
    """MACE: closed-form refinement mapping the concept prompts onto the anchor's, then (stages "full") one LoRA per
    concept on the attention loss and their closed-form fusion; stages "cfr" ("mace-cfr") stops after the CFR."""
    o = job.config.mace
    stages = str(job.config.get("stages", "full"))
    if stages not in STAGES:
        raise UserError(f"config.stages={stages!r}; choose from {', '.join(STAGES)}")
    old = job.encode(job.concept_prompts)
    new = job.encode(job.replaced(job.concept_prompts, job.anchor))
    cache = cache_of(job)
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
    if stages == "cfr":
        return Result(params, info)
    return lora_and_fuse(job, params, cache, {"cfr": info})


def lora_and_fuse(job: Job, cfr_params, cache, info: dict) -> Result:
    """Stages 2 and 3 on the CFR-edited params: a LoRA per concept (OUT/train/<i>), then `fuse`."""
    lo, t = job.config.lora, job.config.train
    runs, deltas, embs = [], [], []
    for i, concept in enumerate(job.concepts):
        batch_fn, n = concept_batches(job, i, concept)
        _, delta, run_info = train_lora(
            job.model,
            cfr_params,
            batch_fn,
            t,
            str(Path(job.train_dir()) / str(i)),
            rank=int(lo.rank),
            selector=t.selector,
            seed=job.config.seed + i,
            mesh=job.mesh,
            progress=job.progress,
            eval_examples=int(lo.eval_examples),
            importance_sampling=bool(lo.importance_sampling),
            no_real_image=bool(lo.no_real_image),
            scheduler_config=job.pipe.scheduler_config or None,
        )
        runs.append({"concept": concept, "images": n, **run_info})
        deltas.append(delta)
        embs.append(job.encode(job.prompts_for([concept])).emb)
    fused, fuse_info = fuse(
        cfr_params,
        deltas,
        embs,
        cache,
        rho=float(lo.fuse_preserve_scale),
        lam=float(lo.fuse_lam),
        with_to_k=job.config.mace.with_to_k,
    )
    before, after = ridge.get_kv(cfr_params), ridge.get_kv(fused)
    fuse_info["delta_norm"] = float(jnp.sqrt(sum(jnp.sum(jnp.square(after[n] - before[n])) for n in before)))
    # The summary line's loss and ‖Δθ‖ (adapters) are the first concept's LoRA's (every one is in "lora"); its loss
    # is the mean on fixed draws before/after (step 0 / the last), when measured, rather than two noisy logged steps.
    first = runs[0]
    keys = ("loss_initial", "loss_final", "delta_norm", "delta_w_norm", "attention_loss_fixed", "steps")
    top = {k: first[k] for k in keys if k in first}
    if "attention_loss_fixed" in first:
        fixed = first["attention_loss_fixed"]
        top["loss_initial"] = {"step": 0, "attention_loss_fixed": fixed["before"]}
        top["loss_final"] = {"step": int(first["steps"]), "attention_loss_fixed": fixed["after"]}
    return Result(fused, {**info, **top, "lora": runs, "fuse": fuse_info})
