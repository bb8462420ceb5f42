"""ProSpect (Zhang et al., ACM TOG 2023): an image as K = 10 stage embeddings of one placeholder token, stage k
serving the DDPM timesteps t with floor(t·K / T) = k (k = 0: t < 100, the end of generation; k = 9: the start).

Objective (the official code's p_losses): the plain ε-MSE of the frozen UNet, L = E‖ε_θ(z_t, t, c_{k(t)}) − ε‖²,
where c_k encodes the caption ("{}": the token alone, the official template) with the token's embedding replaced by
stage vector k of the sampled t. Only the stage vectors train (a separate leaf; the text encoder's table, the UNet
and the VAE are the frozen arrays they were). No embedding regulariser, no logvar.

Options (../shared/specs/personalization.md §2, §10):
- `representation`: "free" (default, the paper's wording: K free vectors initialised from the init word's
  embedding) or "generator" (the official code: a small transformer block maps the init word's frozen embedding to
  the K vectors). The generator block is NOT implemented here (TODO): asking for it is a UserError.
- `init_word`: the official config's 'teddy' is a string whose element 0 is "t" (UNVERIFIED which one was used);
  the default here is "shape".

Outputs beside the runner's: OUT/prospect_stages.safetensors ({token: [K, D]}, stage 0 first); OUT/model carries the
mean of the stage vectors as the token's single row (a plain-token approximation). Sample with per-stage
conditioning: `stage_conditioning(pipe, stages, prompts_by_stage)` -> [K, B, L, D] for `pipe(prompt_embeds=...)`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.personalize import losses, tokens
from jaxdiff.personalize.job import Job, Plan
from jaxdiff.sampling.denoise import stage_index

STAGES_FILE = "prospect_stages.safetensors"


def stage_encode(text_encoder, te_params, stages, ids, k, token_id: int | None = None):
    """Conditioning [B, L, D] of ids [B, L] whose placeholder `token_id` (default: one past the table, V) reads
    stage vector stages[k[b]] for row b; differentiable in `stages` [K, D]."""
    table = tokens.table_of(te_params)
    vocab = table.shape[0]
    token_id = vocab if token_id is None else token_id
    embeds = jnp.take(table, jnp.minimum(ids, vocab - 1), axis=0)
    embeds = jnp.where((ids == token_id)[..., None], stages[k][:, None, :].astype(table.dtype), embeds)
    return text_encoder.apply(te_params, ids, token_embeds=embeds)["last_hidden_state"]


def plan(job: Job) -> Plan:
    c = job.config
    te, unet = job.text_encoder, job.unet
    num = int(c.stages)
    if num < 1:
        raise UserError(f"config.stages must be >= 1, got {num}")
    if str(c.representation) != "free":
        raise UserError(
            f"config.representation={c.representation!r}: only 'free' stage vectors are implemented "
            "(the official code's 'generator' block is a TODO)"
        )
    table = tokens.table_of(te.params)
    rows = tokens.init_rows(table, c.init_word, job.tokenizer, num=num, seed=int(c.seed))
    acp = job.alphas_cumprod()
    steps_total = int(acp.shape[0])
    gamma = float(c.snr_gamma)

    def loss(params, frozen, batch, rng):
        stages = params["personal"]["rows"]

        def apply(x, t, ids):  # eps_mse draws t: the context follows it, stage k(t) per example
            ctx = stage_encode(te, frozen["text_encoder"], stages, ids, stage_index(t, num, steps_total))
            return unet.apply(frozen["unet"], x, t, ctx)

        per = losses.eps_mse(apply, acp, batch["latents"], batch["ids"], rng, gamma)
        return jnp.mean(per), {"stage_norm": jnp.mean(jnp.linalg.norm(stages, axis=-1))}

    frozen = {"unet": unet.params, "text_encoder": te.params}
    batch = int(c.train.batch_size)
    return Plan({"rows": rows}, None, loss, lambda s: job.instance_batch(s, batch), frozen)


def outputs(job: Job, trained: dict) -> dict:
    """{"rows": [1, D] the mean stage vector (OUT/model's row), "stages": [K, D], "unet", "trained_params"}."""
    stages = np.asarray(trained["rows"])
    return {"rows": stages.mean(0, keepdims=True), "stages": stages, "unet": job.unet.params,
            "trained_params": stages.size}  # fmt: skip


def save_extra(job: Job, result: dict, out: Path) -> None:
    from jaxdiff.convert.safetensors_io import write_safetensors

    write_safetensors(
        out / STAGES_FILE, {job.token: np.asarray(result["stages"], np.float32)}, metadata={"format": "pt"}
    )


def load_stages(path: str | os.PathLike) -> tuple[str, np.ndarray]:
    """(token, stages [K, D]) from OUT/prospect_stages.safetensors or its folder."""
    path = Path(path)
    path = path / STAGES_FILE if path.is_dir() else path
    (token, stages), *rest = tokens.load_embeds(path).items()
    if rest:
        raise UserError(f"{path} holds more than one token")
    return token, stages


def stage_conditioning(pipe, prompts_by_stage: Sequence[Sequence[str]], stages=None, token=None, params=None):
    """Per-stage conditioning [K, B, L, D] for `pipe(prompt_embeds=...)`: stage k encodes prompts_by_stage[k]
    (B prompts); with `stages` [K, D], the placeholder `token` (added to the pipeline by `tokens.add_to_pipeline`,
    e.g. `jaxdiff.personalize.apply(pipe, OUT)`) reads stage vector k in stage k. K = len(prompts_by_stage)."""
    from jaxdiff.sampling import text

    if stages is None:
        return jnp.stack([pipe.encode_prompts(list(p), params)[0] for p in prompts_by_stage])
    stages = jnp.asarray(stages, jnp.float32)
    if stages.shape[0] != len(prompts_by_stage):
        raise UserError(f"{stages.shape[0]} stage vectors for {len(prompts_by_stage)} stages of prompts")
    te = pipe.text_encoders[0]
    te_params = te.params if params is None else params["text_encoders"][0]
    added = pipe.tokenizers[0].get_added_vocab()
    if token not in added or added[token] >= tokens.table_of(te_params).shape[0]:
        raise UserError(f"the pipeline has no placeholder token {token!r} (add it with tokens.add_to_pipeline)")
    token_id = added[token]
    out = []
    for k, prompts in enumerate(prompts_by_stage):
        ids = jnp.asarray(text.tokenize(pipe.tokenizers[0], list(prompts)))
        out.append(stage_encode(te, te_params, stages, ids, jnp.full((ids.shape[0],), k), token_id))
    return jnp.stack(out)


def samples(job: Job, pipe, prompts: list[str], result: dict) -> list[tuple[str, np.ndarray]]:
    """samples.png rows: each prompt with the token reading its stage vector in every stage."""
    from jaxdiff.erase.evaluate import noise

    s, d = job.config.sample, job.sampling_defaults()
    n = int(s.num_images)
    if n <= 0:
        return []
    guidance = float(s.guidance) if float(s.guidance) >= 0 else float(d["guidance"])
    stages = result["stages"]
    rows = []
    for i, prompt in enumerate(prompts):
        cond = stage_conditioning(pipe, [[prompt] * n] * len(stages), stages, job.token)
        z = noise(n, job.latent_shape, int(s.seed) + i)
        rows.append((prompt, pipe(prompt_embeds=cond, latents=z, steps=int(d["steps"]), guidance=guidance)))
    return rows
