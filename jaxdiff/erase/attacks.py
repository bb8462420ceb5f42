"""Attacks on concept-erased models: RECE's closed-form regenerating embedding and a white-box soft-prompt attack
(UnlearnDiffAtk-style)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.erase import common, rece, ridge
from jaxdiff.sampling import text

# The placeholder word prepended to every attacked prompt: one token in CLIP's vocabulary and in the word-level
# tokenizers of jaxdiff's tiny models (its embedding only initialises the optimised vectors).
PLACEHOLDER = "*"
# The fixed evaluation draws behind info["loss_first"] / info["loss_last"]: at least this many batches.
EVAL_BATCHES = 4


def regenerating_embedding_attack(
    edited_unet_params, original_unet_params, concept_context, *, reg: float = 1e-3, with_to_k: bool = True
) -> jax.Array:
    """RECE's attack: the context c' [B, L, D] that makes the edited model's cross-attention K/V reproduce the
    original model's K/V of the concept context c [B, L, D] (closed form, see rece.regenerating_embedding):

        c' = argmin Σ_l ||W'_l c' − W_l c||² + reg ||c'||²   over every attn2 to_k and to_v (to_v only when
        `with_to_k` is False), token by token.
    """
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")
    c = jnp.asarray(concept_context, jnp.float32)
    if c.ndim != 3:
        raise ValueError(f"concept_context must be [B, L, D], got shape {tuple(c.shape)}")
    names = ridge.KV_NAMES if with_to_k else ("to_v",)
    edited = ridge.get_kv(edited_unet_params, names)
    original = ridge.get_kv(original_unet_params, names)
    if set(edited) != set(original):
        raise ValueError("the edited and original UNets have different cross-attention K/V layers")
    return rece.regenerating_embedding(edited, original, c, reg)


def placeholder_prompts(prompts: Sequence[str], num_tokens: int, placeholder: str = PLACEHOLDER) -> list[str]:
    """Each prompt with `num_tokens` placeholder words in front: "* * * a red circle"."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return [" ".join([placeholder] * num_tokens + ([p] if p.strip() else [])) for p in prompts]


def placeholder_ids(tokenizer, prompts: Sequence[str], num_tokens: int, placeholder: str = PLACEHOLDER) -> np.ndarray:
    """Token ids [P, L] of the placeholder prompts; the placeholders sit at positions 1 .. num_tokens. A clear
    error when a prompt no longer fits the tokenizer or the placeholder is not a single token."""
    single = tokenizer(placeholder, add_special_tokens=False).input_ids
    if len(single) != 1:
        raise ValueError(f"placeholder {placeholder!r} is {len(single)} tokens for this tokenizer; it must be one")
    adversarial = placeholder_prompts(prompts, num_tokens, placeholder)
    try:
        ids = text.tokenize(tokenizer, adversarial)
    except text.PromptTooLongError as err:
        raise text.PromptTooLongError(
            f"with {num_tokens} placeholder tokens prepended, a prompt exceeds the tokenizer's "
            f"{tokenizer.model_max_length} tokens: {err}"
        ) from err
    if not np.all(ids[:, 1 : 1 + num_tokens] == single[0]):
        raise ValueError(f"placeholder {placeholder!r} does not tokenize to {num_tokens} leading tokens")
    return ids


def soft_prompt_attack(
    pipe,
    unet_params,
    prompts: list[str],
    target_latents,
    *,
    num_tokens: int = 3,
    steps: int = 50,
    learning_rate: float = 1e-2,
    batch_size: int = 4,
    seed: int = 0,
    text_encoder_params=None,
) -> tuple[jax.Array, dict]:
    """White-box soft-prompt attack against `unet_params` (the erased UNet): `num_tokens` placeholder tokens are
    prepended to each prompt and their input token embeddings (continuous, initialised from the placeholder
    tokens' embeddings) are optimised with Adam for `steps` steps to minimise the denoising loss
    E_{t,ε} ||ε_θ(x_t, t, TextEncoder(adv prompt)) − ε||² of the erased model on `target_latents` [N, h, w, C]
    (scaled latents of images of the erased concept made by the ORIGINAL model). Returns (contexts [len(prompts), L, D]
    to condition the UNet on, info {"loss_first", "loss_last", "seconds", "steps"}).

    The vectors stay continuous (UnlearnDiffAtk projects them onto vocabulary tokens; this is its soft relaxation,
    searching a superset of the discrete prompts). Each prompt has its own adversarial vectors. A step draws
    `batch_size` (prompt, target, t, ε): prompts uniformly, the target of the same index when N == len(prompts)
    (one target per prompt, as UnlearnDiffAtk) and uniformly otherwise, t uniform over the training timesteps;
    the regression target follows the scheduler's prediction_type (ε, or v for v-prediction models).
    loss_first / loss_last: the mean loss of the initial / final embeddings on the same fixed draws (every prompt,
    at least EVAL_BATCHES batches). `seconds` is the wall time of the call (the first call per shape includes
    compilation). The loop over the steps is one compiled `fori_loop` (the step count is an argument: no
    recompilation per count).
    """
    if pipe.is_sdxl:
        raise ValueError("soft_prompt_attack supports SD 1.x/2.x pipelines (one text encoder) only")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
    targets = jnp.asarray(target_latents, jnp.float32)
    if targets.ndim != 4 or targets.shape[0] == 0:
        raise ValueError(f"target_latents must be a non-empty [N, h, w, C] array, got shape {tuple(targets.shape)}")
    start = time.perf_counter()
    te_params = pipe.params["text_encoders"][0] if text_encoder_params is None else text_encoder_params
    ids = jnp.asarray(placeholder_ids(pipe.tokenizers[0], prompts, num_tokens))
    table = te_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    embeds = jnp.take(jnp.asarray(table, jnp.float32), ids, axis=0)  # [P, L, D]
    programs = _programs(pipe, num_tokens, batch_size, paired=targets.shape[0] == len(prompts))
    eval_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    adv = embeds[:, 1 : 1 + num_tokens]
    loss_first = programs["evaluate"](unet_params, te_params, ids, embeds, adv, targets, eval_key)
    adv = programs["train"](
        unet_params, te_params, ids, embeds, adv, targets, train_key, jnp.int32(steps), jnp.float32(learning_rate)
    )
    loss_last = programs["evaluate"](unet_params, te_params, ids, embeds, adv, targets, eval_key)
    contexts = programs["encode"](te_params, ids, embeds, adv)
    loss_first, loss_last = float(loss_first), float(loss_last)
    info = {"loss_first": loss_first, "loss_last": loss_last, "seconds": time.perf_counter() - start, "steps": steps}
    return contexts, info


def _programs(pipe, num_tokens: int, batch_size: int, paired: bool) -> dict:
    """The attack's jitted programs (evaluate, train, encode), cached on the pipeline per configuration."""
    key = ("soft_prompt_attack", num_tokens, batch_size, paired)
    if key not in pipe._compiled:
        pipe._compiled[key] = _build(pipe, num_tokens, batch_size, paired)
    return pipe._compiled[key]


def _build(pipe, num_tokens: int, batch_size: int, paired: bool) -> dict:
    unet, encoder = pipe.unet, pipe.text_encoders[0]
    sched = common.ddim(pipe.scheduler_config or None)
    n_train = sched.num_train_timesteps

    def contexts(te_params, ids, embeds, adv, rows):
        """Text-encoder hidden states of prompts `rows` with their placeholder embeddings replaced by `adv`."""
        e = embeds[rows]
        e = jnp.concatenate([e[:, :1], adv[rows].astype(e.dtype), e[:, 1 + num_tokens :]], axis=1)
        return encoder.apply(te_params, ids[rows], token_embeds=e)["last_hidden_state"].astype(jnp.float32)

    def draws(key, rows, n_targets):
        k_target, k_t, k_noise = jax.random.split(key, 3)
        target_rows = rows if paired else jax.random.randint(k_target, rows.shape, 0, n_targets)
        t = jax.random.randint(k_t, rows.shape, 0, n_train)
        return target_rows, t, k_noise

    def loss_fn(adv, unet_params, te_params, ids, embeds, targets, rows, key):
        target_rows, t, k_noise = draws(key, rows, targets.shape[0])
        x0 = targets[target_rows]
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        x_t = sched.add_noise(None, x0, noise, t)
        ctx = contexts(te_params, ids, embeds, adv, rows)
        pred = unet.apply(unet_params, x_t, t.astype(jnp.float32), ctx).astype(jnp.float32)
        return common.mse(pred, sched.training_target(x0, noise, t))

    def train(unet_params, te_params, ids, embeds, adv, targets, key, steps, learning_rate):
        unet_params, te_params = jax.lax.stop_gradient((unet_params, te_params))
        opt = optax.adam(learning_rate)
        grad = jax.grad(loss_fn)

        def body(i, state):
            adv, opt_state = state
            k_rows, k_draw = jax.random.split(jax.random.fold_in(key, i))
            rows = jax.random.randint(k_rows, (batch_size,), 0, ids.shape[0])
            g = grad(adv, unet_params, te_params, ids, embeds, targets, rows, k_draw)
            updates, opt_state = opt.update(g, opt_state, adv)
            return optax.apply_updates(adv, updates), opt_state

        adv, _ = jax.lax.fori_loop(0, steps, body, (adv, opt.init(adv)))
        return adv

    def evaluate(unet_params, te_params, ids, embeds, adv, targets, key):
        n_batches = max(EVAL_BATCHES, math.ceil(ids.shape[0] / batch_size))
        rows = (jnp.arange(n_batches * batch_size) % ids.shape[0]).reshape(n_batches, batch_size)
        keys = jax.random.split(key, n_batches)
        losses = jax.lax.map(
            lambda a: loss_fn(adv, unet_params, te_params, ids, embeds, targets, a[0], a[1]), (rows, keys)
        )
        return jnp.mean(losses)

    def encode(te_params, ids, embeds, adv):
        return contexts(te_params, ids, embeds, adv, jnp.arange(ids.shape[0]))

    return {"train": jax.jit(train), "evaluate": jax.jit(evaluate), "encode": jax.jit(encode)}
