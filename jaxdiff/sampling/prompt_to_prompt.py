"""Prompt-to-prompt (Hertz et al.; google/prompt-to-prompt): word-swap replace and reweight of the target prompts'
attention by the source prompt's, as an attention edit inside the compiled sampling loop."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxdiff.errors import UserError


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
