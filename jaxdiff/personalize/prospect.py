"""ProSpect (Zhang et al., ACM TOG 2023): an image as K = 10 stage embeddings of one placeholder token, stage k
serving the DDPM timesteps t with floor(t·K / T) = k (k = 0: t < 100, the end of generation; k = 9: the start).

Objective (the official code's p_losses): the plain ε-MSE of the frozen UNet, L = E‖ε_θ(z_t, t, c_{k(t)}) − ε‖²,
where c_k encodes the caption ("{}": the token alone, the official template) with the token's embedding replaced by
stage vector k of the sampled t. Only the stage vectors train (a separate leaf; the text encoder's table, the UNet
and the VAE are the frozen arrays they were). No embedding regulariser, no logvar.

Options (../shared/specs/personalization.md §2, §10):
- `representation`: "free" (default, the paper's wording: K free vectors initialised from the init word's
  embedding) or "generator" (the official code's EmbeddingManager: a small transformer block maps the init word's
  frozen embedding to the K vectors and only the block trains): two pre-LayerNorm self-attentions with residuals
  (8 heads), then a LayerNorm and a GEGLU feed-forward (inner 4·D) to K·D, reshaped to [K, D]. Kept from the
  official block: heads 8, the GEGLU output width K·D; not kept: dropout 0.1 (deterministic here), its exact head
  width (64; here D / 8) and initialisation (here N(0, 0.02) weights, zero biases, unit LayerNorms) — UNVERIFIED.
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

import jax
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


REPRESENTATIONS = ("free", "generator")
HEADS = 8


def init_generator(dim: int, num_stages: int, seed: int = 0) -> dict:
    """Params of the generator block (see the module docstring): a pytree of float32 arrays."""
    rng = np.random.default_rng([seed, 77])
    normal = lambda *shape: jnp.asarray(rng.normal(0.0, 0.02, shape), jnp.float32)  # noqa: E731
    norm = lambda: {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}  # noqa: E731
    attn = lambda: {k: normal(dim, dim) for k in ("q", "k", "v", "o")}  # noqa: E731
    inner = 4 * dim
    return {
        "norm1": norm(), "attn1": attn(), "norm2": norm(), "attn2": attn(), "norm3": norm(),
        "ff": {"proj": normal(dim, 2 * inner), "proj_bias": jnp.zeros((2 * inner,), jnp.float32),
               "out": normal(inner, num_stages * dim), "out_bias": jnp.zeros((num_stages * dim,), jnp.float32)},
    }  # fmt: skip


def generate(params: dict, init, num_stages: int):
    """Stage vectors [K, D] from the init word's frozen embeddings init [n, D] (the first token's output)."""

    def norm(p, x):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]

    def attend(p, x):
        n, d = x.shape
        q, k, v = (jnp.einsum("nd,de->ne", x, p[name]).reshape(n, HEADS, d // HEADS) for name in ("q", "k", "v"))
        w = jax.nn.softmax(jnp.einsum("qhc,khc->hqk", q, k) / np.sqrt(d // HEADS), axis=-1)
        return jnp.einsum("hqk,khc->qhc", w, v).reshape(n, d) @ p["o"]

    x = jnp.asarray(init, jnp.float32)
    x = x + attend(params["attn1"], norm(params["norm1"], x))
    x = x + attend(params["attn2"], norm(params["norm2"], x))
    h = norm(params["norm3"], x) @ params["ff"]["proj"] + params["ff"]["proj_bias"]
    a, gate = jnp.split(h, 2, axis=-1)
    out = (a * jax.nn.gelu(gate, approximate=False)) @ params["ff"]["out"] + params["ff"]["out_bias"]
    return out[0].reshape(num_stages, x.shape[-1])


def _init_embedding(job: Job):
    c = job.config
    return tokens.init_rows(tokens.table_of(job.text_encoder.params), c.init_word, job.tokenizer, seed=int(c.seed))


def stages_of(job: Job, personal: dict):
    """The stage vectors [K, D] of the "personal" params (free rows, or the generator's output)."""
    if "generator" in personal:
        return generate(personal["generator"], _init_embedding(job), int(job.config.stages))
    return personal["rows"]


def plan(job: Job) -> Plan:
    c = job.config
    te, unet = job.text_encoder, job.unet
    num = int(c.stages)
    if num < 1:
        raise UserError(f"config.stages must be >= 1, got {num}")
    if str(c.representation) not in REPRESENTATIONS:
        raise UserError(f"config.representation={c.representation!r}: choose from {', '.join(REPRESENTATIONS)}")
    table = tokens.table_of(te.params)
    if str(c.representation) == "generator":
        if int(table.shape[1]) % HEADS:
            raise UserError(f"the generator block needs a width divisible by {HEADS}, got {table.shape[1]}")
        params = {"generator": init_generator(int(table.shape[1]), num, int(c.seed))}
    else:
        params = {"rows": tokens.init_rows(table, c.init_word, job.tokenizer, num=num, seed=int(c.seed))}
    acp = job.alphas_cumprod()
    steps_total = int(acp.shape[0])
    gamma = float(c.snr_gamma)

    def loss(params, frozen, batch, rng):
        stages = stages_of(job, params["personal"])

        def apply(x, t, ids):  # eps_mse draws t: the context follows it, stage k(t) per example
            ctx = stage_encode(te, frozen["text_encoder"], stages, ids, stage_index(t, num, steps_total))
            return unet.apply(frozen["unet"], x, t, ctx)

        per = losses.eps_mse(apply, acp, batch["latents"], batch["ids"], rng, gamma)
        return jnp.mean(per), {"stage_norm": jnp.mean(jnp.linalg.norm(stages, axis=-1))}

    frozen = {"unet": unet.params, "text_encoder": te.params}
    batch = int(c.train.batch_size)
    return Plan(params, None, loss, lambda s: job.instance_batch(s, batch), frozen)


def outputs(job: Job, trained: dict) -> dict:
    """{"rows": [1, D] the mean stage vector (OUT/model's row), "stages": [K, D], "unet", "trained_params"}."""
    stages = np.asarray(stages_of(job, trained))
    size = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(trained))
    return {"rows": stages.mean(0, keepdims=True), "stages": stages, "unet": job.unet.params, "trained_params": size}


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
    stages = result["stages"]

    def draw(prompt, n, **kw):
        return pipe(prompt_embeds=stage_conditioning(pipe, [[prompt] * n] * len(stages), stages, job.token), **kw)

    return job.sample_rows(prompts, draw)
