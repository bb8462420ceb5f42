"""Multi-Concept T2I-Zero (Tunanyan et al., ICLR'24 submission, withdrawn): Correction by Similarities (CbS) on the
text embeddings and Cross-Token Non-Maximum Suppression (CTNMS) on the cross-attention, inside the compiled loop.

There is no official code. Both readings follow ../shared/specs/personalization.md §1 (the reviewers' description of
"Algorithm 1" and "Algorithm 2" and a third-party implementation); every choice the sources leave open is an option
here, with its default named in the docstring (UNVERIFIED):

- CbS: the quantile map θ → 1 − e^{−10θ} (`quantile_map`), the quantile and the max taken over the whole S_c (every
  token row, before the window), entries kept strictly above τ, the window clipped to the prompt's word tokens
  (`first`..`last`: BOS, EOS and padding never contribute).
- CTNMS: the 3×3 Gaussian's σ (`sigma`, 0.85 ≈ the binomial 1-2-1 kernel) with edge padding, the arg-max per head
  (`per_head`), the winner keeping its unsmoothed probability, no renormalisation (`renormalize`), every
  cross-attention layer, the step window, and the blend (1 − α)·P + α·P_suppressed (`alpha`, 1 = hard suppression;
  the third-party code's 0.1 blends the layer output, which is the same thing since the output is linear in P).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UserError


def quantile_of(threshold: float, quantile_map: bool = True) -> float:
    """The quantile CbS keeps S_c above: 1 − e^{−10θ} (the third-party map, UNVERIFIED) or θ itself."""
    return 1.0 - math.exp(-10.0 * threshold) if quantile_map else float(threshold)


def correct_by_similarities(
    f,
    concepts: Sequence[int],
    last,
    alpha: float = 0.25,
    threshold: float = 0.5,
    window: int = 2,
    first: int = 1,
    quantile_map: bool = True,
):
    """CbS on text-encoder outputs f [B, L, D] (the conditional rows only); returns [B, L, D] where only the
    `concepts` rows (token positions) change. For each concept c:

      S_c[j] = f_c ⊙ f_j                                   element-wise products, [L, D]
      S_c ← S_c · [S_c > τ],  τ = the q-quantile of S_c    q = quantile_of(threshold, quantile_map)
      S̃_c = S_c / max(S_c),  rows outside |j − c| ≤ window or outside first..last zeroed
      f_c ← (1 − α) f_c + α Σ_j S̃_c[j] ⊙ f_j

    `last`: the last word token per row (an int or [B]); every S_c is built from the uncorrected f. α = 0 returns f
    bit for bit."""
    f = jnp.asarray(f)
    b, length, _ = f.shape
    q = quantile_of(threshold, quantile_map)
    j = jnp.arange(length)
    last = jnp.broadcast_to(jnp.asarray(last), (b,))
    out = f
    for c in concepts:
        if not 0 <= c < length:
            raise UserError(f"concept token position {c} is outside the {length} tokens")
        fc = f[:, c]  # [B, D]
        s = fc[:, None, :] * f  # [B, L, D]
        tau = jnp.quantile(s.reshape(b, -1), q, axis=1)[:, None, None]
        kept = jnp.where(s > tau, s, 0.0)
        top = jnp.max(kept, axis=(1, 2), keepdims=True)
        kept = kept / jnp.where(top > 0, top, 1.0)
        inside = (jnp.abs(j - c) <= window)[None, :] & (j[None, :] >= first) & (j[None, :] <= last[:, None])
        kept = kept * inside[..., None]
        corrected = jnp.sum(kept * f, axis=1)  # [B, D]
        mixed = (1.0 - alpha) * fc + alpha * corrected
        out = out.at[:, c].set(jnp.where(alpha == 0, fc, mixed).astype(f.dtype))
    return out


@dataclasses.dataclass(frozen=True)
class CbS:
    """Correction by Similarities for `pipe(prompts, text_correction=CbS(...))`: applied to the prompts' rows of
    the conditioning (never the negative/unconditional rows) at the plan steps s with
    step_start·N ≤ s < step_end·N (fractions of the N steps; default every step). `concepts`: token positions
    shared by every prompt of the batch (`token_positions`); `last`: the last word token (an int or one per
    prompt). See `correct_by_similarities` for the rest."""

    concepts: tuple[int, ...]
    last: int | tuple[int, ...]
    alpha: float = 0.25
    threshold: float = 0.5
    window: int = 2
    first: int = 1
    quantile_map: bool = True
    step_start: float = 0.0
    step_end: float = 1.0

    def __post_init__(self):
        if not self.concepts:
            raise UserError("CbS needs at least one concept token position")
        if not 0.0 <= self.step_start <= self.step_end <= 1.0:
            raise UserError(
                f"CbS step window must satisfy 0 <= start <= end <= 1, got {self.step_start, self.step_end}"
            )
        if self.window < 0:
            raise UserError(f"CbS window must be >= 0, got {self.window}")

    def __call__(self, f):
        return correct_by_similarities(
            f, self.concepts, self.last, self.alpha, self.threshold, self.window, self.first, self.quantile_map
        )

    def on(self, step, num_steps):
        return (step >= self.step_start * num_steps) & (step < self.step_end * num_steps)


class TextCorrected:
    """A denoiser model(x, t, cond) whose first `num_prompts` context rows (the conditional ones; jaxdiff's CFG batch
    is [prompts; negatives]) are replaced by `correction(rows)` at the steps where `correction.on(step, N)`; `step`
    is found from t as `attention_control.Controlled` does. cond is a context [B, L, D] or (context, added)."""

    def __init__(self, model, correction, timesteps, num_prompts: int):
        self.model, self.correction, self.timesteps, self.n = model, correction, timesteps, num_prompts

    def __call__(self, x, t, cond):
        step = jnp.argmax(self.timesteps == t[0])
        context = cond[0] if isinstance(cond, tuple) else cond
        fixed = jnp.concatenate([self.correction(context[: self.n]), context[self.n :]])
        context = jnp.where(self.correction.on(step, self.timesteps.shape[0]), fixed, context)
        return self.model(x, t, (context,) + tuple(cond[1:]) if isinstance(cond, tuple) else context)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The normalised 3×3 Gaussian [3, 3]."""
    g = np.exp(-0.5 * (np.arange(-1, 2) / sigma) ** 2)
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def smooth3x3(maps, sigma: float):
    """maps [..., H, W, C] smoothed over (H, W) by the 3×3 Gaussian, edges replicated."""
    k = gaussian_kernel(sigma)
    pad = [(0, 0)] * (maps.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
    p = jnp.pad(maps, pad, mode="edge")
    h, w = maps.shape[-3], maps.shape[-2]
    return sum(float(k[a, b]) * p[..., a : a + h, b : b + w, :] for a in range(3) for b in range(3))


@dataclasses.dataclass(frozen=True)
class CTNMS:
    """Cross-Token Non-Maximum Suppression, an `edit(probs, layer, step, num_steps)` for
    `pipe(prompts, attention_edit=CTNMS(...))`.

    On every cross-attention layer (square latents), inside the step window, for the first `num_prompts` rows (the
    conditional ones): the concept tokens' maps P[..., tokens] are smoothed by a 3×3 Gaussian (σ = `sigma`); at each
    pixel the arg-max concept (per head, or over the head mean without `per_head`) keeps its probability and the
    other concepts' probabilities become 0; other tokens are untouched. The result is blended as
    (1 − α)·P + α·P_suppressed and, with `renormalize`, rescaled to sum to 1 over the keys."""

    tokens: tuple[int, ...]
    num_prompts: int
    alpha: float = 1.0
    sigma: float = 0.85
    per_head: bool = True
    renormalize: bool = False
    step_start: float = 0.0
    step_end: float = 1.0

    def __post_init__(self):
        if len(self.tokens) < 2:
            raise UserError("CTNMS needs at least two concept token positions")
        if not 0.0 <= self.step_start <= self.step_end <= 1.0:
            raise UserError(
                f"CTNMS step window must satisfy 0 <= start <= end <= 1, got {self.step_start, self.step_end}"
            )

    def suppress(self, probs, side: int):
        """probs [B, H, Q, K] (Q = side²) -> the hard-suppressed probabilities (before the blend)."""
        b, h, q, _ = probs.shape
        idx = jnp.asarray(self.tokens)
        maps = probs[..., idx]  # [B, H, Q, C]
        smoothed = smooth3x3(maps.reshape(b, h, side, side, -1), self.sigma).reshape(b, h, q, -1)
        score = smoothed if self.per_head else jnp.mean(smoothed, axis=1, keepdims=True)
        keep = jnp.argmax(score, axis=-1)[..., None] == jnp.arange(len(self.tokens))
        out = probs.at[..., idx].set(jnp.where(keep, maps, 0.0))
        if self.renormalize:
            out = out / jnp.sum(out, axis=-1, keepdims=True)
        return out

    def __call__(self, probs, layer, step, num_steps):
        if not layer.cross:
            return probs
        n = self.num_prompts
        if probs.shape[0] not in (n, 2 * n):
            raise UserError(f"CTNMS was set up for {n} prompts, the batch has {probs.shape[0]} rows")
        side = layer.side
        if side * side != layer.queries:
            raise UserError(f"CTNMS needs square latents, got {layer.queries} queries")
        cond, rest = probs[:n], probs[n:]
        edited = (1.0 - self.alpha) * cond + self.alpha * self.suppress(cond, side)
        on = (step >= self.step_start * num_steps) & (step < self.step_end * num_steps)
        return jnp.concatenate([jnp.where(on, edited, cond), rest])


def token_positions(tokenizer, prompt: str, words: Sequence[str]) -> tuple[tuple[int, ...], int]:
    """(positions of the first token of each word, in order of occurrence, each word once; the last word token)
    for `prompt` tokenized as the pipeline does (position 0 is BOS)."""
    ids = tokenizer(prompt).input_ids
    names = [t.removesuffix("</w>") for t in tokenizer.convert_ids_to_tokens(ids)]
    found = []
    for w in words:
        hits = [i for i, n in enumerate(names[1:-1], start=1) if n == w]
        if not hits:
            raise UserError(f"{w!r} is not a token of {prompt!r}")
        found.append(hits[0])
    return tuple(found), len(ids) - 2
