"""Prompt-to-prompt (Hertz et al.; google/prompt-to-prompt): word-swap replace and reweight of the targets'
attention by the source prompt's, as an attention edit inside the compiled sampling loop; LocalBlend of the latents."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.sampling.denoise import StepCallback


@dataclasses.dataclass(frozen=True)
class PromptToPrompt:
    """An `edit(probs, layer, step, num_steps)` for `pipe(prompts, attention_edit=...)`.

    The prompts are [source, target, ...] sampled from the same starting noise (`latents` repeated). Only the
    conditional rows are edited (the official controller's `attn[h // 2:]`; here the first `num_prompts` rows, the
    order jaxdiff's CFG batch uses). For the first `cross_replace` fraction of the steps, each target's
    cross-attention becomes the source's (Replace with equal token counts: the word-swap mapper is the identity);
    for the first `self_replace` fraction, on layers with at most `max_self_queries` queries (16² in the official
    code), each target's self-attention becomes the source's. `equalizer` ((token index, factor), ...) scales the
    targets' cross-attention to those tokens inside the window (AttentionReweight, applied after the replace)."""

    num_prompts: int
    cross_replace: float = 0.8
    self_replace: float = 0.4
    equalizer: tuple = ()
    max_self_queries: int = 16 * 16

    def __post_init__(self):
        if self.num_prompts < 2:
            raise UserError("prompt-to-prompt needs a source prompt and at least one target prompt")
        for name in ("cross_replace", "self_replace"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be a fraction of the steps in [0, 1], got {getattr(self, name)}")

    def __call__(self, probs, layer, step, num_steps):
        b = self.num_prompts
        if probs.shape[0] not in (b, 2 * b):
            raise UserError(f"prompt-to-prompt was set up for {b} prompts, the batch has {probs.shape[0]} rows")
        cond, rest = probs[:b], probs[b:]
        source, targets = cond[:1], cond[1:]
        if layer.cross:
            on = step < self.cross_replace * num_steps
            edited = jnp.broadcast_to(source, targets.shape)
            if self.equalizer:
                scale = jnp.ones((probs.shape[-1],), probs.dtype)
                for token, factor in self.equalizer:
                    scale = scale.at[token].set(factor)
                edited = edited * scale
            targets = jnp.where(on, edited, targets)
        elif layer.queries <= self.max_self_queries:
            on = step < self.self_replace * num_steps
            targets = jnp.where(on, jnp.broadcast_to(source, targets.shape), targets)
        return jnp.concatenate([source, targets, rest])


@dataclasses.dataclass(frozen=True)
class LocalBlend(StepCallback):
    """Prompt-to-prompt's LocalBlend (the official `step_callback`), a `StepCallback` for
    `pipe([source, target, ...], attention_edit=PromptToPrompt(n), step_callback=LocalBlend(tokens))` (all rows
    from the same noise), run inside the pipeline's compiled loop: after each step from `start` (a fraction of the
    steps; `start_blend` 0.2 in the official controller) on, x_target <- x_source + mask * (x_target - x_source),
    applied as a select so that a mask of ones keeps x_target and a mask of zeros gives x_source, bitwise.

    The mask of prompt row b: its cross-attention to the tokens `tokens[b]` (the chosen words of that prompt; row 0
    is the source), summed over those tokens, averaged over heads and over every cross-attention layer with
    `side` x `side` queries (16 x 16 on SD's 64 x 64 latent, official; 4 x 4 on `shapes`), summed over the steps so
    far with `accumulate` (the official attention store; else this step's maps only), max-pooled (`pool` x `pool`,
    stride 1), upsampled to the latent (nearest), divided by its maximum, thresholded (> `threshold`, official 0.3),
    and united with the source row's mask. The maps are the attention before prompt-to-prompt's edit, as the
    official store records them. Thresholds and the layer choice are UNVERIFIED (read from copies of the notebook)."""

    tokens: tuple  # per prompt row, a tuple of token indices into the padded sequence (SoT = 0)
    threshold: float = 0.3
    start: float = 0.2
    side: int = 4
    pool: int = 3
    accumulate: bool = True

    def __post_init__(self):
        if len(self.tokens) < 2 or any(len(t) == 0 for t in self.tokens):
            raise UserError("LocalBlend needs at least one chosen token for the source and for every target prompt")
        if not 0.0 <= self.start <= 1.0:
            raise UserError(f"LocalBlend start must be a fraction of the steps in [0, 1], got {self.start}")
        if self.pool < 1 or self.pool % 2 == 0 or self.side < 1:
            raise UserError(f"LocalBlend pool must be odd and positive and side positive, got {self.pool}, {self.side}")

    def capture(self, layer) -> bool:
        return layer.cross and layer.side == self.side

    def init(self, latents):
        """(accumulated maps [B, side, side], last mask bool [B, h, w, 1])."""
        if latents.shape[0] != len(self.tokens):
            raise UserError(f"LocalBlend has tokens for {len(self.tokens)} prompts, the batch has {latents.shape[0]}")
        return jnp.zeros((latents.shape[0], self.side, self.side)), jnp.ones(latents.shape[:3] + (1,), bool)

    def __call__(self, latents, step, num_steps, captures, state):
        acc, _ = state
        maps = self.maps(captures)
        acc = acc + maps if self.accumulate else maps
        mask = self.mask(acc, latents.shape[1], latents.shape[2])
        blended = jnp.where(mask, latents, latents[:1])
        return jnp.where(step >= self.start_step(num_steps), blended, latents), (acc, mask)

    def start_step(self, num_steps: int) -> int:
        """The first plan step after which the latents are blended (the official `counter > start_blend`)."""
        return int(self.start * num_steps)

    def weights(self, num_keys: int) -> jnp.ndarray:
        """[B, num_keys]: 1 at each row's chosen tokens."""
        w = np.zeros((len(self.tokens), num_keys), np.float32)
        for row, tokens in enumerate(self.tokens):
            for token in tokens:
                if not 0 <= token < num_keys:
                    raise UserError(f"LocalBlend token {token} is outside the {num_keys} text positions")
                w[row, token] = 1.0
        return jnp.asarray(w)

    def maps(self, captured: dict) -> jnp.ndarray:
        """{layer name: cross-attention probabilities [B, H, side², K] of the prompts' rows} -> [B, side, side]: the
        chosen tokens' attention, summed over tokens, averaged over heads and layers."""
        picked = [p for p in captured.values() if p.shape[2] == self.side * self.side]
        if not picked:
            raise UserError(f"LocalBlend: the UNet has no cross-attention at {self.side}x{self.side}")
        w = self.weights(picked[0].shape[-1])
        per_layer = [jnp.einsum("bhqk,bk->bq", p.astype(jnp.float32), w) / p.shape[1] for p in picked]
        return jnp.mean(jnp.stack(per_layer), axis=0).reshape(-1, self.side, self.side)

    def mask(self, maps: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
        """maps [B, side, side] -> bool mask [B, height, width, 1] (row 0: the source's; the others: united with it)."""
        k = self.pool // 2
        pooled = jax.lax.reduce_window(
            maps, -jnp.inf, jax.lax.max, (1, self.pool, self.pool), (1, 1, 1), ((0, 0), (k, k), (k, k))
        )
        rows = (np.arange(height) * self.side) // height  # nearest, torch's F.interpolate default
        cols = (np.arange(width) * self.side) // width
        up = pooled[:, rows][:, :, cols]
        top = jnp.max(up, axis=(1, 2), keepdims=True)
        m = up / jnp.maximum(top, jnp.finfo(up.dtype).tiny) > self.threshold
        return (m | m[:1])[..., None]


def word_tokens(tokenizer, prompt: str, words) -> tuple[int, ...]:
    """The token indices (in the padded sequence, SoT = 0) of each word or phrase of `words` in `prompt`; a word
    that is not in the prompt is a UserError."""
    from jaxdiff.sampling import text

    ids = list(text.tokenize(tokenizer, [prompt])[0])
    found = []
    for word in [words] if isinstance(words, str) else words:
        sub = list(tokenizer(word, add_special_tokens=False).input_ids)
        hits = [i for i in range(len(ids) - len(sub) + 1) if sub and ids[i : i + len(sub)] == sub]
        if not hits:
            raise UserError(f"{word!r} is not in the prompt {prompt!r}")
        found.extend(range(hits[0], hits[0] + len(sub)))
    return tuple(found)


def sample(
    pipe,
    prompts: list[str],
    edit: PromptToPrompt | None = None,
    blend: LocalBlend | None = None,
    *,
    steps: int = 25,
    guidance: float = 7.5,
    scheduler: str | None = None,
    seed: int = 0,
    latents=None,
    output: str = "images",
):
    """Prompt-to-prompt with LocalBlend (SD 1.x/2.x pipelines, e.g. `shapes`): the prompts [source, targets...] from
    the same noise `latents` ([1 or B, h, w, C] unit Gaussian; default from `seed`), the attention edit `edit` at
    every UNet call and the blend after every step, all in the pipeline's one compiled loop:
    `pipe(prompts, attention_edit=edit, step_callback=blend, latents=...)`. Returns (images [B, H, W, 3] in [0, 1]
    or, with output="latents", the final latents [B, h, w, C], and the last blend mask bool [B, h, w] (all True
    without `blend`))."""
    if pipe.is_sdxl:
        raise UserError("prompt_to_prompt.sample supports SD 1.x/2.x pipelines")
    if output not in ("images", "latents"):
        raise UserError(f"output must be 'images' or 'latents', got {output!r}")
    if blend is not None and len(blend.tokens) != len(prompts):
        raise UserError(f"LocalBlend has tokens for {len(blend.tokens)} prompts, {len(prompts)} were given")
    batch = len(prompts)
    side = pipe.default_size // pipe.vae_scale_factor
    shape = (batch, side, side, pipe.vae.config.get("latent_channels", 4))
    if latents is None:
        latents = jax.random.normal(jax.random.PRNGKey(seed), shape[1:], jnp.float32)[None]
    latents = jnp.broadcast_to(jnp.asarray(latents, jnp.float32), shape)
    kw = dict(steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, latents=latents, output=output)
    if blend is None:
        return pipe(list(prompts), attention_edit=edit, **kw), np.ones(shape[:3], bool)
    out, (_, mask) = pipe(list(prompts), attention_edit=edit, step_callback=blend, return_callback_state=True, **kw)
    return out, mask[..., 0]
