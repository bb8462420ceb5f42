"""One erasure run's shared context: the pipeline, prompt sets, cached encodings, sampling and the method result."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from jaxdiff.erase import common
from jaxdiff.erase import evaluate as ev
from jaxdiff.erase.config import resolve_anchor, split_list
from jaxdiff.errors import UserError


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


@dataclasses.dataclass
class Result:
    """What a method returns: the edited UNet params, or adapters with a per-prompt params function (SPM)."""

    unet_params: Any
    info: dict
    params_for_prompt: Callable[[str], Any] | None = None  # prompt -> UNet params (Facilitated Transport)
    adapters: Any = None
    adapter_meta: dict | None = None


class Job:
    """One erasure run: the pipeline, the prompt sets every method draws from, and cached encodings."""

    def __init__(self, config: mlc.ConfigDict, out: Path, progress: bool = True):
        from jaxdiff.sampling.pipeline import BUILTIN, load_pipeline

        self.config, self.out, self.progress = config, out, progress
        self.concepts = split_list(config.concept)
        if not self.concepts:
            raise UserError("config.concept is empty: name the concept to erase, e.g. --config.concept=circle")
        self.preserve = split_list(config.preserve)
        self.is_shapes = str(config.model) == "shapes" or Path(str(config.model)).resolve() == BUILTIN["shapes"]
        self.anchor = resolve_anchor(config.anchor, self.concepts, self.is_shapes)
        # The shapes concepts this run resolves (the evaluated one; all of them when world captions are added),
        # checked before the model loads so a typo costs nothing.
        self.concept = ev.resolve(self.concepts[0]) if self.is_shapes else None
        if self.is_shapes and int(config.num_prompts):
            for word in self.concepts + self.preserve:
                ev.resolve(word)
        self.pipe = load_pipeline(config.model)
        if self.pipe.is_sdxl:
            raise UserError("jaxdiff erase supports SD 1.x/2.x pipelines (one text encoder); this one is SDXL")
        self.model = self.pipe.unet
        self.original = self.pipe.unet.params
        c = self.model.config
        self.latent_shape = (int(c.get("sample_size", 64)),) * 2 + (int(c.get("in_channels", 4)),)
        self._enc: dict[tuple[str, ...], common.Encoded] = {}
        self._compiled: dict[str, Callable] = {}

    # -- prompts -------------------------------------------------------------------------------------------------
    def prompts_for(self, concepts: list[str], cut: bool = True) -> list[str]:
        """templates × concepts, plus (shapes model, `num_prompts` > 0) captions of the world naming each, cut
        after the concept ("a picture of a red circle on the left" -> "a picture of a red circle"): the text
        encoder is causal, so the concept's token and the [EoT] after it carry the concept, as the closed-form
        methods' last-word / [EoT] token choices assume. `cut=False` keeps the full captions (fine-tuning)."""
        out = [t.format(x) for x in concepts for t in self.config.templates]
        n = int(self.config.num_prompts)
        if n and self.is_shapes:
            for i, x in enumerate(concepts):
                for caption in ev.captions(ev.resolve(x), n, self.config.seed + 17 * i)[0]:
                    m = re.search(r"(?<![\w-])" + re.escape(x) + r"(?![\w-])", caption) if cut else None
                    out.append(caption[: m.end()] if m else caption)
        return out

    @functools.cached_property
    def concept_prompts(self) -> list[str]:
        return self.prompts_for(self.concepts)

    @functools.cached_property
    def concept_captions(self) -> list[str]:
        """`concept_prompts` with the world captions whole ("a red circle", not "a red"), as fine-tuning trains on."""
        return self.prompts_for(self.concepts, cut=False)

    @functools.cached_property
    def preserve_prompts(self) -> list[str]:
        return self.prompts_for(self.preserve)

    def replaced(self, prompts: list[str], by: str) -> list[str]:
        """Each prompt with the erased concept's word replaced by `by` (removed when empty)."""
        pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(c) for c in self.concepts) + r")(?![\w-])")
        return [" ".join(pattern.sub(by, p).split()) for p in prompts]

    def anchored(self, prompts: list[str]) -> list[str]:
        """Each prompt with the concept replaced by the anchor ("" when the anchor is empty)."""
        if not self.anchor.strip():
            return [""] * len(prompts)
        return self.replaced(prompts, self.anchor)

    @functools.cached_property
    def anchor_prompts(self) -> list[str]:
        """The concept prompts with the concept replaced by the anchor ("" when the anchor is empty)."""
        return self.anchored(self.concept_prompts)

    @functools.cached_property
    def anchor_captions(self) -> list[str]:
        """The concept's full captions with the concept replaced by the anchor ("a red square on the left" for
        "a red circle on the left"), the anchor side of the fine-tuning methods that train on full captions."""
        return self.anchored(self.concept_captions)

    def encode(self, prompts: list[str]) -> common.Encoded:
        key = tuple(prompts)
        if key not in self._enc:
            self._enc[key] = common.encode(self.pipe, list(prompts))
        return self._enc[key]

    def context(self, prompts: list[str]) -> jax.Array:
        return self.encode(prompts).emb

    def preservation_cache(self):
        """Σ c cᵀ over the preserved prompts' tokens (MACE/TRCE); world captions without the concept when none."""
        from jaxdiff.erase import ridge

        prompts = self.preserve_prompts
        if not prompts and self.is_shapes:
            c = ev.resolve(self.concepts[0])
            prompts = ev.captions(None, 32, self.config.seed + 5, exclude=c.name, kind=c.kind)[0]
        if not prompts:
            return None
        enc = self.encode(prompts)
        return ridge.context_cache(enc.emb, enc.lengths)

    # -- images --------------------------------------------------------------------------------------------------
    def images(
        self,
        prompts: list[str],
        latents: np.ndarray,
        unet_params=None,
        params_for_prompt=None,
        guidance: float | None = None,
        contexts=None,
    ) -> np.ndarray:
        """Samples for `prompts` (or text `contexts` [N, L, D], e.g. an attack's) from the given starting noise;
        per-prompt params (SPM) run one prompt at a time."""
        e = self.config.eval
        guidance = self.guidance if guidance is None else guidance
        kw = dict(steps=int(e.steps), guidance=guidance, scheduler=e.scheduler or None)
        if params_for_prompt is None:
            params = {**self.pipe.params, "unet": self.original if unet_params is None else unet_params}
            return self.pipe(prompts, latents=latents, params=params, prompt_embeds=contexts, **kw)
        out = []
        for i, p in enumerate(prompts):
            params = {**self.pipe.params, "unet": params_for_prompt(p)}
            out.append(self.pipe([p], latents=latents[i : i + 1], params=params, **kw))
        return np.concatenate(out)

    @functools.cached_property
    def guidance(self) -> float:
        g = float(self.config.eval.guidance)
        if g >= 0:
            return g
        defaults = self.pipe.path / "sampling_defaults.json"
        return float(json.loads(defaults.read_text()).get("guidance", 7.5)) if defaults.is_file() else 7.5

    def train_dir(self) -> str:
        return str(self.out / "train")

    @functools.cached_property
    def mesh(self):
        """The fine-tuning mesh of `config.mesh` (all devices when an axis is -1, else the first ones)."""
        from jaxdiff import sharding
        from jaxdiff.train.config import mesh_shape

        shape = {k: int(v) for k, v in self.config.mesh.to_dict().items()}
        devices = jax.devices()
        if -1 not in shape.values():
            devices = devices[: int(np.prod(list(shape.values())))]
        return sharding.make_mesh(mesh_shape(shape, len(devices)), devices)

    def anchor_data(self, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Concept Ablation / DoCo data: `n` images of the anchor captions made by the original model, as scaled
        latents, with (target = the concept's full caption, anchor = that caption with the anchor in place of the
        concept) contexts per image: the official code trains on the anchor images' whole captions with the target
        inserted ("… van gogh", "robot+r2d2")."""
        if not self.anchor.strip():
            raise UserError(
                f"{self.config.method} needs an anchor concept (--config.anchor=...), e.g. square for circle"
            )
        k = len(self.concept_captions)
        order = [i % k for i in range(n)]
        anchors = [self.anchor_captions[i] for i in order]
        latents = ev.noise(n, self.latent_shape, self.config.seed + 31)
        z = self.latents_of(self.images(anchors, latents))
        target = self.context(self.concept_captions)[np.asarray(order)]
        anchor = self.context(anchors)
        return z, target, anchor

    def retain_data(self, n: int) -> tuple[jax.Array, jax.Array]:
        """The retain loss's data (`train.retain_weight`): `n` images of the preserved concepts' full captions made
        by the original model, as scaled latents, with their contexts."""
        captions = self.prompts_for(self.preserve, cut=False)
        if not captions:
            raise UserError(
                f"config.train.retain_weight={self.config.train.retain_weight} needs preserved concepts: set "
                "--config.preserve=... (on shapes 'auto' takes the other concepts of the erased one's kind)"
            )
        prompts = [captions[i % len(captions)] for i in range(n)]
        latents = ev.noise(n, self.latent_shape, self.config.seed + 37)
        return self.latents_of(self.images(prompts, latents)), self.context(prompts)

    def latents_of(self, images) -> jax.Array:
        """Scaled VAE latents (posterior mean) of images [N, H, W, 3] in [0, 1]."""
        vae = self.pipe.vae
        if "latents" not in self._compiled:
            scale = vae.config.get("scaling_factor", 0.18215)
            self._compiled["latents"] = jax.jit(lambda p, x: vae.encode(p, x * 2.0 - 1.0)[0] * scale)
        return self._compiled["latents"](vae.params, jnp.asarray(images, jnp.float32))


@functools.lru_cache(maxsize=1)
def probe():
    """The shapes probe (jaxdiff/assets/shapes_probe)."""
    from jaxdiff.metrics.probe import load_probe

    return load_probe()
