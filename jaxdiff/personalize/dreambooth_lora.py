"""DreamBooth-LoRA with prior preservation (Ruiz et al. 2023; diffusers examples/dreambooth/train_dreambooth_lora.py).

Objective: L = mean ε-MSE on instance examples (captions naming the token) + λ · mean ε-MSE on class examples that
the frozen model generated beforehand from the class prompts (`prior.prompts`), in one batch of two halves; what
trains is a LoRA (rank r, scale α/r) on the UNet attention projections to_q/to_k/to_v/to_out_0 of attn1 and attn2,
B = 0 at the start, A Gaussian N(0, 1/r) as the diffusers script. The identifier token is a new vocabulary entry
whose row is drawn at random once (`token_init` "random": a rare token) or copied from a word, and stays fixed
unless `train_token` (the text encoder itself never trains here).

Options beyond the script: `prior.prompts` "world" draws class prompts from the shapes world's own captions (the
model's plain prompts are what prior preservation should keep; SD users give a class prompt such as
"a photo of a dog"). Not kept: --snr_gamma, --offset_noise, text-encoder training.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jaxdiff import fileio, lora
from jaxdiff.errors import UserError
from jaxdiff.personalize import binding, losses, tokens
from jaxdiff.personalize.job import Job, Plan

PRIOR_FILE = "prior.npz"


def class_prompts(job: Job) -> list[str]:
    """The class prompts, `prior.num_images` of them (cycled): "world" = shapes-world captions of the training
    vocabulary (train templates), anything else = ";"-separated prompts."""
    p = job.config.prior
    n = int(p.num_images)
    if str(p.prompts) == "world":
        from jaxdiff.data import shapes as S

        rng = np.random.default_rng([int(job.config.seed), 23])
        return [S.caption(S.sample_scene(rng, num_objects=1), rng) for _ in range(n)]
    prompts = [x.strip() for x in str(p.prompts).split(";") if x.strip()]
    if not prompts:
        raise UserError("config.prior.prompts is empty: give class prompts (';'-separated) or 'world'")
    return [prompts[i % len(prompts)] for i in range(n)]


def prior_data(job: Job) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(class latents [M, h, w, C], class ids [M, L], prompts), generated once by the frozen model and kept in
    OUT/prior.npz so a resumed run reuses them."""
    from jaxdiff.erase.evaluate import noise

    prompts = class_prompts(job)
    path = job.out / PRIOR_FILE
    if path.is_file():
        saved = np.load(path)
        if [str(x) for x in saved["prompts"]] == prompts:
            return saved["latents"], job.tokenize(prompts), prompts
    d = job.sampling_defaults()
    images, batch = [], 64
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        z = noise(len(chunk), job.latent_shape, int(job.config.seed) + 1000 + i)
        images.append(job.pipe(chunk, latents=z, steps=int(d["steps"]), guidance=float(d["guidance"])))
    latents = job.latents_of(np.concatenate(images))
    with fileio.atomic_file(path) as f:
        np.savez(f, latents=latents, prompts=np.asarray(prompts), images=np.concatenate(images))
    return latents, job.tokenize(prompts), prompts


def scale(job: Job) -> float:
    c = job.config.lora
    return float(c.alpha) / int(c.rank)


def instance_and_prior(job: Job, unet_params_of: Callable, bind=None) -> tuple[Callable, Callable]:
    """(loss, batch_fn) of DreamBooth's objective, shared with Custom Diffusion: ε-MSE on instance captions (the
    token's row from the "rows" leaf) + `prior.weight` × ε-MSE on the generated class examples, one batch of two
    halves. `unet_params_of(personal params, frozen UNet params)` gives the UNet the step trains through. `bind`: a
    `binding` config block whose weight > 0 adds T2I-Zero's binding term on the instance half
    (`jaxdiff.personalize.binding`)."""
    c = job.config
    te, unet = job.text_encoder, job.unet
    acp = job.alphas_cumprod()
    weight = float(c.prior.weight)
    use_prior = weight > 0 and int(c.prior.num_images) > 0
    prior_latents, prior_ids, _ = prior_data(job) if use_prior else (None, None, None)
    batch = int(c.train.batch_size)
    eos = int(job.tokenizer.eos_token_id)

    def loss(params, frozen, batch_, rng):
        p = params["personal"]
        ids, latents = batch_["ids"], batch_["latents"]
        if use_prior:
            ids = jnp.concatenate([ids, batch_["prior_ids"]])
            latents = jnp.concatenate([latents, batch_["prior_latents"]])
        context = tokens.encode(te, frozen["text_encoder"], p["rows"], ids)
        unet_params = unet_params_of(p, frozen["unet"])
        apply = lambda x, t, ctx: unet.apply(unet_params, x, t, ctx)  # noqa: E731
        per = losses.eps_mse(apply, acp, latents, context, rng)
        total, aux = losses.prior_preservation(per, batch, weight)
        if bind is None:
            return total, aux
        inst = dict(context=context[:batch], ids=ids[:batch], placeholder_ids=job.new_ids, eos_id=eos)
        return binding.add(total, aux, bind, rows=p["rows"], **inst)

    def batch_fn(step: int) -> dict:
        b = job.instance_batch(step, batch)
        if use_prior:
            rng = np.random.default_rng([int(c.seed), 13, step])
            k = rng.integers(0, len(prior_latents), batch)
            b.update(prior_latents=prior_latents[k], prior_ids=prior_ids[k])
        return b

    return loss, batch_fn


def plan(job: Job) -> Plan:
    c = job.config
    te, unet = job.text_encoder, job.unet
    rows = tokens.init_rows(tokens.table_of(te.params), c.token_init, job.tokenizer, seed=int(c.seed))
    adapters = lora.init(unet.params, c.lora.targets, int(c.lora.rank), c.lora.init, seed=int(c.seed))
    s = scale(job)
    loss, batch_fn = instance_and_prior(job, lambda p, frozen_unet: lora.merge(frozen_unet, p["lora"], s))
    frozen = {"unet": unet.params, "text_encoder": te.params}
    trainable = {"lora": True, "rows": bool(c.train_token)}
    return Plan({"lora": adapters, "rows": rows}, trainable, loss, batch_fn, frozen)


def outputs(job: Job, trained: dict) -> dict:
    """{"rows", "unet": the UNet with the LoRA merged, "lora": the adapters, "lora_scale", "trained_params"}."""
    s = scale(job)
    rows = np.asarray(trained["rows"])
    return {
        "trained_params": lora.num_params(trained["lora"]) + (rows.size if job.config.train_token else 0),
        "rows": rows,
        "unet": lora.merge(job.unet.params, trained["lora"], s),
        "lora": trained["lora"],
        "lora_scale": s,
    }
