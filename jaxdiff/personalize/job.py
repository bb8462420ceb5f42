"""One personalization run's context: the pipeline, the placeholder token, instance data, prompts and the runner.

Methods (`textual_inversion`, `dreambooth_lora`) describe what trains as one network "personal" of the runner:
its params (e.g. {"rows": [n, D]} or {"lora": adapters, "rows": ...}), which leaves train, a loss
`loss(params, frozen, batch, rng)` and a batch function of the step index; `train` runs it on
`jaxdiff.train.runner` in OUT/train (progress bar, metrics.jsonl, checkpoints, resume by rerunning).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff.errors import UserError
from jaxdiff.personalize import data, tokens


@dataclasses.dataclass
class Plan:
    """What a method trains: params of the "personal" network, its trainable selector, loss and batches."""

    params: dict
    trainable: Any  # a selector of `params` (see jaxdiff.selectors), e.g. {"rows": True, "lora": False}
    loss: Callable  # loss(params {"personal": ...}, frozen, batch, rng) -> (loss, aux)
    batch_fn: Callable[[int], dict]
    frozen: dict
    # More runner networks updated before "personal" in every step: {name: (step.Network, step.Phase, initial
    # params)} (AttenCraft's mask refresh); their final params land in Job.trained_extra.
    extra: dict = dataclasses.field(default_factory=dict)


class Job:
    """Checks the inputs (before anything is written), loads the pipeline, adds the token, encodes the images."""

    def __init__(self, config: mlc.ConfigDict, out: Path, progress: bool = True):
        from jaxdiff.sampling.pipeline import load_pipeline

        self.config, self.out, self.progress = config, Path(out), progress
        # "<a>,<b>": several placeholders (methods that learn several, e.g. attencraft); self.token is the first
        self.tokens = [t.strip() for t in str(config.token).split(",")]
        if len(self.tokens) > 1 and not config.get("multi_token", False):
            raise UserError(f"--token {config.token!r}: the {config.method} method learns one token; give one")
        self.token = self.tokens[0]
        data.image_files(config.images)  # no images: fail before loading anything
        self.pipe = load_pipeline(config.model)
        if self.pipe.is_sdxl:
            raise UserError("jaxdiff personalize supports SD 1.x/2.x pipelines (one text encoder); this one is SDXL")
        self.tokenizer, self.new_ids = tokens.add_tokens(self.pipe.tokenizers[0], self.tokens)
        self.text_encoder = self.pipe.text_encoders[0]
        self.unet = self.pipe.unet
        vocab = int(tokens.table_of(self.text_encoder.params).shape[0])
        if self.new_ids[0] != vocab:
            raise UserError(f"the tokenizer has {self.new_ids[0]} entries but the text encoder's table {vocab} rows")
        self.images, self.captions = data.load_images(config.images, self.pipe.default_size)
        self.prompts = self._instance_prompts()
        c = self.unet.config
        self.latent_shape = (int(c.get("sample_size", 64)),) * 2 + (int(c.get("in_channels", 4)),)

    # -- prompts ---------------------------------------------------------------------------------------------------
    def _instance_prompts(self) -> list[list[str]]:
        """Per image, the captions it trains with: its IMAGE.txt (config.captions "auto" or "files") or every
        template filled with the token ("templates", or "auto" when no image has a caption file)."""
        mode = str(self.config.captions)
        if mode not in ("auto", "files", "templates"):
            raise UserError(f"config.captions={mode!r}: choose auto, files or templates")
        have = [c is not None for c in self.captions]
        if mode == "files" or (mode == "auto" and any(have)):
            if not all(have):
                missing = [i for i, h in enumerate(have) if not h]
                raise UserError(f"--images: {len(missing)} of {len(have)} images have no caption file (IMAGE.txt)")
            for c in self.captions:
                if self.token.lower() not in c.lower().split():
                    raise UserError(f"--images: caption {c!r} does not contain the token {self.token!r}")
            return [[c] for c in self.captions]
        templates = list(self.config.templates)
        if not templates or any("{}" not in t for t in templates):
            raise UserError("config.templates must be a non-empty list of strings with one {} each")
        return [[t.format(self.token) for t in templates] for _ in range(len(self.images))]

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        from jaxdiff.sampling import text

        return text.tokenize(self.tokenizer, list(prompts))

    @functools.cached_property
    def instance_ids(self) -> np.ndarray:
        """[N, K, L] ids of each image's K captions (K the largest count; shorter lists are cycled)."""
        k = max(len(p) for p in self.prompts)
        return np.stack([self.tokenize([p[j % len(p)] for j in range(k)]) for p in self.prompts])

    # -- latents ---------------------------------------------------------------------------------------------------
    def latents_of(self, images) -> np.ndarray:
        """Scaled VAE latents (posterior mean) of images [N, H, W, 3] in [0, 1]."""
        vae = self.pipe.vae
        scale = vae.config.get("scaling_factor", 0.18215)
        fn = jax.jit(lambda p, x: vae.encode(p, x * 2.0 - 1.0)[0] * scale)
        return np.asarray(fn(vae.params, jnp.asarray(images, jnp.float32)))

    @functools.cached_property
    def instance_latents(self) -> np.ndarray:
        return self.latents_of(self.images)

    def instance_batch(self, step: int, batch: int) -> dict:
        """Instance examples of a step: a pure function of (seed, step), so a resumed run sees the same batches."""
        rng = np.random.default_rng([int(self.config.seed), 11, step])
        n, k = self.instance_ids.shape[:2]
        i, j = rng.integers(0, n, batch), rng.integers(0, k, batch)
        latents = self.instance_latents[i]
        if float(self.config.flip) > 0:
            flip = rng.random(batch) < float(self.config.flip)
            latents = np.where(flip[:, None, None, None], latents[:, :, ::-1], latents)
        return {"latents": latents, "ids": self.instance_ids[i, j]}

    # -- training --------------------------------------------------------------------------------------------------
    @functools.cached_property
    def mesh(self):
        from jaxdiff import sharding
        from jaxdiff.train.config import mesh_shape

        shape = {k: int(v) for k, v in self.config.mesh.to_dict().items()}
        devices = jax.devices()
        if -1 not in shape.values():
            devices = devices[: int(np.prod(list(shape.values())))]
        return sharding.make_mesh(mesh_shape(shape, len(devices)), devices)

    def frozen_shardings(self, frozen: dict) -> dict:
        """The frozen UNet and text encoder follow their logical axes on the mesh; anything else is replicated."""
        from jaxdiff import sharding

        replicated = NamedSharding(self.mesh, PartitionSpec())
        models = {"unet": self.unet, "text_encoder": self.text_encoder}
        return {
            k: sharding.param_shardings(v, models[k].logical_axes, self.mesh)
            if k in models
            else jax.tree_util.tree_map(lambda _: replicated, v)
            for k, v in frozen.items()
        }

    def train(self, plan: Plan) -> tuple[dict, dict]:
        """Train the plan's "personal" network on the runner (`erase.finetune.run`, the loop every fine-tuning
        method shares) in OUT/train; (trained params, info)."""
        from jaxdiff.erase import finetune
        from jaxdiff.train import optim
        from jaxdiff.train import step as step_lib

        t = self.config.train
        lr = optim.schedule(t.learning_rate, t.steps, kind=t.lr_schedule, warmup_steps=t.warmup_steps)
        tx = optim.optimizer(t.optimizer, lr, weight_decay=float(t.weight_decay))
        net = step_lib.Network("personal", tx, lr, trainable=plan.trainable, clip_norm=float(t.max_grad_norm))
        extra = plan.extra
        state, info = finetune.run(
            [net] + [n for n, _, _ in extra.values()],
            [p for _, p, _ in extra.values()] + [step_lib.Phase("personal", "personal", plan.loss)],
            {"personal": plan.params, **{name: p for name, (_, _, p) in extra.items()}},
            plan.frozen,
            plan.batch_fn,
            t,
            str(self.out / "train"),
            seed=int(self.config.seed),
            mesh=self.mesh,
            model=self.unet,
            progress=self.progress,
            label="personalization step",
            images_per_step=int(t.batch_size),
            config=json.loads(self.config.to_json_best_effort()),
            frozen_sharding=self.frozen_shardings(plan.frozen),
        )
        self.trained_extra = {name: jax.device_get(state.params[name]) for name in extra}
        return jax.device_get(state.params["personal"]), info

    def alphas_cumprod(self) -> np.ndarray:
        from jaxdiff.sampling.schedulers.common import make_alphas_cumprod

        return np.asarray(make_alphas_cumprod(self.pipe.scheduler_config), np.float32)

    def sampling_defaults(self) -> dict:
        from jaxdiff.generate import model_defaults

        return {"steps": 25, "guidance": 7.5, "scheduler": "ddim", **model_defaults(self.pipe.path)}

    def sample_rows(self, prompts: list[str], draw: Callable) -> list[tuple[str, np.ndarray]]:
        """samples.png rows: (prompt, draw(prompt, n, latents=, steps=, guidance=)) per prompt, with config.sample's
        n, seed (one per prompt) and guidance (< 0: the model's default) and the model's default steps."""
        from jaxdiff.erase.evaluate import noise

        s, d = self.config.sample, self.sampling_defaults()
        n = int(s.num_images)
        if n <= 0:
            return []
        guidance = float(s.guidance) if float(s.guidance) >= 0 else float(d["guidance"])
        return [
            (
                prompt,
                draw(
                    prompt,
                    n,
                    latents=noise(n, self.latent_shape, int(s.seed) + i),
                    steps=int(d["steps"]),
                    guidance=guidance,
                ),
            )
            for i, prompt in enumerate(prompts)
        ]
