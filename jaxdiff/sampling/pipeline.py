"""Text-to-image pipelines (SD 1.x/2.x, SDXL, `shapes`): the whole denoising loop is one compiled program."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import checkpoint
from jaxdiff.errors import UserError
from jaxdiff.models.model import Model
from jaxdiff.sampling import denoise, image_conditioning, text

# diffusers scheduler class -> jaxdiff scheduler name
SCHEDULER_NAMES = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpm++2m",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
    "LCMScheduler": "lcm",
}
BUILTIN = {"shapes": Path(__file__).resolve().parent.parent / "assets" / "shapes"}


def resolve(path_or_name: str | os.PathLike) -> Path:
    """A pipeline folder from a path or a built-in name ("shapes")."""
    if str(path_or_name) in BUILTIN:
        path = BUILTIN[str(path_or_name)]
        if not path.is_dir():
            raise FileNotFoundError(
                f"the built-in {path_or_name!r} model is not installed at {path}; train it with tools/train_shapes.py"
            )
        return path
    path = Path(path_or_name)
    if not path.exists():
        raise FileNotFoundError(
            f"no model at {path} (give a diffusers pipeline folder, a jaxdiff checkpoint or 'shapes')"
        )
    return path


def load_pipeline(
    path_or_name: str | os.PathLike = "shapes",
    dtype=jnp.float32,
    attention: str = "auto",
    platform: str | None = None,
    controlnet=None,
    weights_dtype=None,
) -> Pipeline:
    """A pipeline from a diffusers pipeline folder, a jaxdiff checkpoint, or a built-in name ("shapes").

    `platform`: the platform its programs are compiled for; None: the platform of the default devices, where the
    params are placed and the pipeline runs. `controlnet`: a ControlNet folder (diffusers or jaxdiff) or a list of
    them, used in that order by `pipe(..., control_image=...)`; a StableDiffusionControlNetPipeline folder brings
    its own `controlnet/`. `weights_dtype`: store every component's params in this dtype (e.g. jnp.bfloat16 for
    inference, half the memory of float32 weights); None keeps float32."""
    from jaxdiff.models import controlnet as controlnet_lib

    path = resolve(path_or_name)
    models = checkpoint.load_components(
        path, dtype=dtype, attention=attention, platform=platform, weights_dtype=weights_dtype
    )
    nets = [models.pop("controlnet")] if "controlnet" in models else []
    for folder in (
        [] if controlnet is None else [controlnet] if isinstance(controlnet, (str, os.PathLike)) else controlnet
    ):
        nets.append(
            checkpoint.load_component(
                folder, dtype=dtype, attention=attention, platform=platform, weights_dtype=weights_dtype
            )
        )
    for net in nets:
        if "controlnet_cond_embedding" not in net.params:
            raise UserError(f"{net.config.get('_class_name')} given as a ControlNet")
        if "unet" in models:
            controlnet_lib.check_compatible(net.config, models["unet"].config)
    # SDXL's refiner has only the second text encoder.
    missing = [name for name in ("unet", "vae") if name not in models]
    missing += [] if {"text_encoder", "text_encoder_2"} & set(models) else ["text_encoder"]
    if missing:
        raise UserError(f"{path} is not a text-to-image pipeline: missing components {missing}")
    names = [n for n in ("text_encoder", "text_encoder_2") if n in models]
    encoders = [models[n] for n in names]
    tokenizer_dirs = [path / n.replace("text_encoder", "tokenizer") for n in names]
    scheduler_path = path / "scheduler" / "scheduler_config.json"
    scheduler_config = checkpoint.read_json(scheduler_path) if scheduler_path.exists() else {}
    index_path = path / checkpoint.MODEL_INDEX
    index = checkpoint.read_json(index_path) if index_path.is_file() else {}
    return Pipeline(
        path=path,
        unet=models["unet"],
        vae=models["vae"],
        text_encoders=encoders,
        tokenizers=[text.load_tokenizer(d) for d in tokenizer_dirs],
        scheduler_config=scheduler_config,
        # diffusers' StableDiffusionXLPipeline default; a model_index.json saved by diffusers records it.
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
        controlnets=nets,
    )


@dataclasses.dataclass
class Pipeline:
    """`pipe(prompts, ...)` -> images [B, H, W, 3] in [0, 1]; params live in `self.params` (a dict by component).

    `force_zeros_for_empty_prompt` (SDXL only, as in diffusers): without negative prompts, the unconditional
    branch of classifier-free guidance gets zero text embeddings instead of the encoding of ""."""

    path: Path
    unet: Model
    vae: Model
    text_encoders: list[Model]
    tokenizers: list[Any]
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool = True
    # SDXL refiner: time ids (original size, crop, aesthetic score) instead of (original size, crop, target size).
    requires_aesthetics_score: bool = False
    controlnets: list = dataclasses.field(default_factory=list)
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)
    # Ahead-of-time executables by (program, argument shapes): resolution buckets compiled up front.
    _executables: dict = dataclasses.field(default_factory=dict, repr=False)
    buckets: list = dataclasses.field(default_factory=list, repr=False)
    _noted: set = dataclasses.field(default_factory=set, repr=False)
    _bar: list = dataclasses.field(default_factory=lambda: [None], repr=False)

    @property
    def is_sdxl(self) -> bool:
        """SDXL base or refiner: pooled text embeddings and time ids condition the UNet."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def params(self) -> dict:
        return {
            "unet": self.unet.params,
            "vae": self.vae.params,
            "text_encoders": [e.params for e in self.text_encoders],
            "controlnets": [c.params for c in self.controlnets],
        }

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.get("sample_size", 64)) * self.vae_scale_factor

    def default_scheduler(self) -> str:
        return SCHEDULER_NAMES.get(self.scheduler_config.get("_class_name"), "ddim")

    def encode_prompts(self, prompts: list[str], params=None):
        """Conditioning for the UNet: (context [B, L, D], added_cond or None)."""
        params = self.params if params is None else params
        ids = [text.tokenize(tok, prompts) for tok in self.tokenizers]
        if "encode" not in self._compiled:  # one compiled text-encoder program (eager CLIP took ~50 ms on shapes)
            if self.is_sdxl:
                fn = lambda p, i: text.sdxl_conditioning(self.text_encoders, p, i)  # noqa: E731
            else:
                fn = lambda p, i: (text.sd_conditioning(self.text_encoders[0], p[0], i[0]), None)  # noqa: E731
            self._compiled["encode"] = jax.jit(fn)
        return self._compiled["encode"](params["text_encoders"], ids)

    def __call__(
        self,
        prompts: str | list[str] | None = None,
        negative_prompts: str | list[str] | None = None,
        steps: int = 25,
        guidance: float = 7.5,
        scheduler: str | None = None,
        seed: int = 0,
        latents=None,
        height: int | None = None,
        width: int | None = None,
        params: dict | None = None,
        progress: bool = False,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        cache: str | None = None,
        image=None,
        mask=None,
        strength: float | None = None,
        control_image=None,
        controlnet_scale=1.0,
        control_start=0.0,
        control_end=1.0,
        guess_mode: bool = False,
        init_latents=None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        output: str = "images",
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        attention_edit=None,
        text_correction=None,
        step_callback=None,
        return_callback_state: bool = False,
        _compile_only: bool = False,
    ) -> np.ndarray | None:
        """Images [B, H, W, 3] float in [0, 1]. `latents`: NHWC unit Gaussian noise (scaled by the scheduler's
        init_noise_sigma, as diffusers does); `params` overrides the loaded params (e.g. an erased UNet).

        `prompt_embeds` [B, L, D] (SD 1.x/2.x only) conditions the UNet directly instead of `prompts` (which must
        then be None); `negative_prompt_embeds` [B, L, D] likewise replaces `negative_prompts` (default: the
        encoding of "" for every row; SDXL with `force_zeros_for_empty_prompt`: zeros), as in diffusers.

        `cache`: a training-free feature cache compiled into the loop (`jaxdiff.sampling.cache.USAGE`), e.g.
        "faster:50ls", "faster:every2", "deepcache:3", "tgate:10"; None samples plainly.

        `image` ([H, W, 3] or [B, H, W, 3], uint8 or float in [0, 1]; its size sets height and width): img2img
        (SDEdit) from the image noised to the step `strength` sets (default 0.8: the last int(steps * strength)
        steps run, as in diffusers); with `mask` ([H, W] or [B, H, W], white = repaint), inpainting (default
        strength 1): an inpainting UNet (9 input channels) sees the mask and the masked image's latents, any other
        UNet keeps the unmasked region by blending it back after every step. `latents` is then the added noise.

        `control_image` (one per loaded ControlNet, each [H, W, 3] or [B, H, W, 3] in [0, 1] at the output size):
        ControlNet guidance, each net's residuals scaled by its `controlnet_scale` inside its step window
        [`control_start`, `control_end`] (fractions of the steps; a value or one per net), summed over nets;
        `guess_mode`: the nets see only the conditional rows of classifier-free guidance (diffusers' semantics).

        Base + refiner (SDXL's ensemble of experts, diffusers' semantics): `denoising_end` (a fraction in (0, 1))
        stops after the steps whose timestep is at least (1 - denoising_end) * num_train_timesteps, and
        `output="latents"` returns the scaled latents [B, h, w, C] instead of images; the refiner takes them as
        `init_latents` with `denoising_start` (the same fraction) and runs the remaining steps on them as they
        are. `init_latents` without `denoising_start` are noised like an image's latents (img2img `strength`).
        `aesthetic_score` / `negative_aesthetic_score`: a refiner's time ids (model_index.json
        requires_aesthetics_score).

        `attention_edit`: a hashable `edit(probs, layer, step, num_steps) -> probs` applied to every attention of
        every UNet call in the loop (`jaxdiff.models.attention_control`), e.g.
        `jaxdiff.sampling.prompt_to_prompt.PromptToPrompt`; one compiled program per edit object.

        Per-stage conditioning (ProSpect): `prompt_embeds` of shape [K, B, L, D] holds K stages; the UNet call at
        timestep t sees stage floor(t·K / num_train_timesteps) (`denoise.stage_index`; 0 = the end of generation),
        the negative rows the same at every stage. `text_correction`: a hashable correction of the prompts' rows
        of the text conditioning inside a step window, e.g. `jaxdiff.sampling.t2i_zero.CbS`.

        `step_callback`: a `jaxdiff.sampling.denoise.StepCallback` (hashable, pure) run after every step inside the
        compiled loop on the latents, the step and the captured attention of that step's UNet call, with its own
        carried state, e.g. prompt-to-prompt's LocalBlend:
        `pipe([src, tgt], attention_edit=PromptToPrompt(2), step_callback=LocalBlend(tokens), latents=same_noise)`.
        With `return_callback_state`, returns (images, the callback's final state as numpy arrays). Not with a
        cache or ControlNets."""
        from jaxdiff.sampling import cache as cache_lib
        from jaxdiff.sampling import make_scheduler

        if prompt_embeds is not None or negative_prompt_embeds is not None:
            if self.is_sdxl:
                raise UserError("prompt_embeds / negative_prompt_embeds are supported for SD 1.x/2.x pipelines only")
        if prompt_embeds is not None:
            if prompts is not None:
                raise UserError("give prompts or prompt_embeds, not both")
            if np.ndim(prompt_embeds) == 4:  # [K, B, L, D] stages -> [B, K, L, D] (batch first, as CFG concatenates)
                staged = jnp.asarray(prompt_embeds)
                if 0 in staged.shape:
                    raise UserError(f"per-stage prompt_embeds must be a non-empty [K, B, L, D], got {staged.shape}")
                staged = staged if jnp.issubdtype(staged.dtype, jnp.floating) else staged.astype(jnp.float32)
                prompt_embeds = jnp.moveaxis(staged, 0, 1)
            else:
                prompt_embeds = _embeds(prompt_embeds, "prompt_embeds")
            batch = prompt_embeds.shape[0]
        else:
            if prompts is None:
                raise UserError("no prompts given (pass prompts or prompt_embeds)")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not prompts:
                raise UserError("no prompts given")
            batch = len(prompts)
        if negative_prompt_embeds is not None:
            if negative_prompts is not None:
                raise UserError("give negative_prompts or negative_prompt_embeds, not both")
            negative_prompt_embeds = _embeds(negative_prompt_embeds, "negative_prompt_embeds")
            if negative_prompt_embeds.shape[0] != batch:
                raise UserError(
                    f"negative_prompt_embeds has {negative_prompt_embeds.shape[0]} rows for {batch} prompts"
                )
        # diffusers' SDXL zeroes the negative embeddings only when no negative prompt is given (not for "").
        zero_negatives = self.is_sdxl and self.force_zeros_for_empty_prompt and negative_prompts is None
        if negative_prompts is None:
            negative_prompts = [""] * batch
        negative_prompts = [negative_prompts] * batch if isinstance(negative_prompts, str) else negative_prompts
        if len(negative_prompts) != batch:
            raise UserError(f"{len(negative_prompts)} negative prompts for {batch} prompts")
        if steps <= 0:
            raise UserError(f"steps must be positive, got {steps}")
        params = self.params if params is None else params
        name = scheduler or self.default_scheduler()
        sched = make_scheduler(name, self.scheduler_config)
        plan = sched.plan(steps)
        latent_channels = self.vae.config.get("latent_channels", 4)
        if output not in ("images", "latents"):
            raise UserError(f"output must be 'images' or 'latents', got {output!r}")
        num_train = int(self.scheduler_config.get("num_train_timesteps", 1000))
        end = image_conditioning.end_step(np.asarray(plan.timesteps), denoising_end, num_train)
        req = image_conditioning.request(
            image, mask, strength, batch, int(plan.timesteps.shape[0]), self.unet.config.get("in_channels", 4),
            latent_channels, init_latents=init_latents, denoising_start=denoising_start,
            timesteps=np.asarray(plan.timesteps), num_train_timesteps=num_train,
        )  # fmt: skip
        if req is not None and end is not None and req.start >= end:
            raise UserError(f"denoising_start {denoising_start} is not before denoising_end {denoising_end}")
        if req is not None:
            if cache is not None:
                raise UserError("a feature cache runs whole plans: it cannot be combined with an image")
            size = req.pixel_size(self.vae_scale_factor)
            if (height or size[0], width or size[1]) != size:
                raise UserError(f"height and width come from the image ({size[0]}x{size[1]})")
            height, width = size
        height, width = height or self.default_size, width or self.default_size
        control = None
        if control_image is not None:
            from jaxdiff.sampling import control as control_lib

            if cache is not None or (req is not None and req.mask is not None):
                raise UserError("ControlNet guidance runs with plain text-to-image or img2img sampling only")
            guess_mode = guess_mode or any(n.config.get("global_pool_conditions") for n in self.controlnets)
            control = control_lib.request(
                self.controlnets, control_image, controlnet_scale, control_start, control_end, guess_mode, batch,
                height, width, int(plan.timesteps.shape[0]), self.unet.config,
            )  # fmt: skip
        factor = self.vae_scale_factor * 2 ** (len(self.unet.config.get("block_out_channels", (0,) * 4)) - 1)
        if height <= 0 or width <= 0 or height % factor or width % factor:
            raise UserError(f"height and width must be positive multiples of {factor}, got {height}x{width}")

        # A UNet with a guidance-scale embedding (diffusers' time_cond_proj_dim: an LCM student) takes the guidance as
        # input, as diffusers' LatentConsistencyModelPipeline: timestep_cond = embedding of w = guidance − 1, no CFG.
        w_dim = self.unet.config.get("time_cond_proj_dim")
        use_cfg = guidance > 1.0 and not w_dim
        schedule = cache_lib.parse(cache, np.asarray(plan.timesteps), self.unet.module.num_skips, use_cfg)
        if prompt_embeds is None and negative_prompt_embeds is None and use_cfg and zero_negatives:
            context, pooled = self.encode_prompts(prompts, params)
            context = jnp.concatenate([context, jnp.zeros_like(context)])
            pooled = jnp.concatenate([pooled, jnp.zeros_like(pooled)])
        elif prompt_embeds is None and negative_prompt_embeds is None:
            context, pooled = self.encode_prompts(prompts + (negative_prompts if use_cfg else []), params)
        else:
            context, pooled = self._contexts(
                prompts, negative_prompts, prompt_embeds, negative_prompt_embeds, use_cfg, params
            )
        added = None
        if self.is_sdxl:
            if self.requires_aesthetics_score:  # diffusers' SDXL img2img: negative rows get the negative score
                rows = [[height, width, 0, 0, aesthetic_score]] * batch
                rows += [[height, width, 0, 0, negative_aesthetic_score]] * (context.shape[0] - batch)
            else:
                rows = [[height, width, 0, 0, height, width]] * context.shape[0]
            added = {"text_embeds": pooled, "time_ids": jnp.asarray(rows, jnp.float32)}
        if w_dim:
            from jaxdiff.distill.teacher import guidance_embedding

            w = jnp.full((context.shape[0],), float(guidance) - 1.0, jnp.float32)
            added = {**(added or {}), "timestep_cond": guidance_embedding(w, int(w_dim))}
        shape = (
            batch,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
            latent_channels,
        )
        if latents is None:
            latents = _initial_noise(jax.random.PRNGKey(seed), shape)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != shape:
            raise UserError(f"latents must have shape {shape}, got {latents.shape}")

        kind = None if req is None else req.kind
        if attention_edit is not None and cache is not None:
            raise UserError("an attention edit needs every UNet call computed: it cannot be combined with a cache")
        if step_callback is not None and (cache is not None or control is not None):
            raise UserError("a step_callback cannot be combined with a cache or ControlNets")
        if return_callback_state and step_callback is None:
            raise UserError("return_callback_state needs a step_callback")
        if context.ndim == 4 and (cache is not None or control is not None or text_correction is not None):
            raise UserError("per-stage prompt_embeds cannot be combined with a cache, ControlNets or text_correction")
        control_key = control and (len(control.images), control.guess_mode)
        fn = self._sampler(
            name,
            use_cfg,
            progress,
            schedule,
            kind,
            control_key,
            end,
            output,
            attention_edit,
            text_correction,
            step_callback,
        )
        conditioning = None
        if req is not None:
            conditioning = {
                "image": req.image,
                "latents": req.latents,
                "mask": req.mask,
                "start": np.int32(req.start),
                "pure_noise": np.bool_(req.kind != image_conditioning.IMG2IMG and req.strength == 1.0),
                "add_noise": np.bool_(req.add_noise),
            }
        args = (
            params["unet"],
            params["vae"],
            plan,
            context,
            added,
            latents,
            jnp.float32(guidance),
            jax.random.PRNGKey(seed + 1),
            conditioning,
            None
            if control is None
            else {
                "params": params.get("controlnets", [c.params for c in self.controlnets]),
                "images": list(control.images),
                "scales": control.scales,
                "keep": control.keep,
            },
        )
        signature = _signature(fn, args)
        if _compile_only:
            if signature not in self._executables:
                self._executables[signature] = fn.lower(*args).compile()
            return None
        executable = self._executables.get(signature)
        if executable is None and self.buckets and (height, width) not in self.buckets:
            if (height, width) not in self._noted:
                self._noted.add((height, width))
                sizes = ", ".join(f"{h}x{w}" for h, w in self.buckets)
                print(
                    f"jaxdiff: {height}x{width} is not a compiled bucket ({sizes}): compiling it once", file=sys.stderr
                )
        if progress:
            from tqdm.auto import tqdm

            calls = (end or sched.num_model_calls(plan)) - (0 if req is None else req.start)
            self._bar[0] = tqdm(total=calls, desc="denoising", unit="step")
        try:
            result = (executable or fn)(*args)
        finally:
            if self._bar[0] is not None:
                self._bar[0].close()
                self._bar[0] = None
        if step_callback is None:
            return np.asarray(result)
        images, state = np.asarray(result[0]), jax.tree_util.tree_map(np.asarray, result[1])
        return (images, state) if return_callback_state else images

    def compile_buckets(self, sizes, batch: int = 1, progress_bar: bool = False, **sampling) -> list[dict]:
        """Compile the sampling program for each (height, width) in `sizes` up front, for `batch` prompts and the
        sampling options `sampling` (steps, guidance, scheduler, cache, progress, ...), as `pipe(...)` would: a
        later call at a bucket's size runs without tracing or compiling; with the persistent compilation cache on
        (`jaxdiff generate` turns it on) a later process loads the bucket instead of compiling it. Returns
        [{"height", "width", "seconds"}] per bucket."""
        import time

        from tqdm.auto import tqdm

        done = []
        for height, width in tqdm(list(sizes), desc="compiling buckets", unit="size", disable=not progress_bar):
            start = time.perf_counter()
            self([""] * batch, height=height, width=width, _compile_only=True, **sampling)
            done.append({"height": height, "width": width, "seconds": round(time.perf_counter() - start, 3)})
            if (height, width) not in self.buckets:
                self.buckets.append((height, width))
        return done

    def _contexts(self, prompts, negative_prompts, prompt_embeds, negative_prompt_embeds, use_cfg, params):
        """(context [B or 2B, L, D], None) when embeddings replace the prompts or the negative prompts."""
        cond = self.encode_prompts(prompts, params)[0] if prompt_embeds is None else prompt_embeds
        if not use_cfg:
            return cond, None
        if negative_prompt_embeds is not None:
            uncond = negative_prompt_embeds
        elif all(p == negative_prompts[0] for p in negative_prompts):  # e.g. all "": encode once, broadcast
            uncond = jnp.broadcast_to(self.encode_prompts(negative_prompts[:1], params)[0], cond.shape)
        else:
            uncond = self.encode_prompts(negative_prompts, params)[0]
        if cond.ndim == 4 and uncond.ndim == 3:  # per-stage prompts: the negative rows at every stage
            uncond = jnp.broadcast_to(uncond[:, None], uncond.shape[:1] + cond.shape[1:])
        if uncond.shape[1:] != cond.shape[1:]:
            raise UserError(
                f"negative conditioning rows have shape {tuple(uncond.shape[1:])}, the prompts' {tuple(cond.shape[1:])}"
            )
        return jnp.concatenate([cond, uncond.astype(cond.dtype)]), None

    def _sampler(
        self,
        name: str,
        use_cfg: bool,
        progress: bool,
        schedule=None,
        kind: str | None = None,
        control=None,
        end: int | None = None,
        output: str = "images",
        attention_edit=None,
        text_correction=None,
        step_callback=None,
    ):
        """One jitted program per (scheduler, guidance on/off, progress, cache schedule, image kind, (number of
        ControlNets, guess mode)); XLA caches one executable per shape (strength, start step, control scales and
        windows are traced: no recompiling when they change)."""
        key = (name, use_cfg, progress) + ((schedule,) if schedule is not None else ()) + ((kind,) if kind else ())
        key += (("control",) + tuple(control),) if control else ()
        key += (("end", end, output),) if end is not None or output != "images" else ()
        key += (("attention_edit", attention_edit),) if attention_edit is not None else ()
        key += (("text_correction", text_correction),) if text_correction is not None else ()
        key += (("step_callback", step_callback),) if step_callback is not None else ()
        if key not in self._compiled:
            from jaxdiff.sampling import make_scheduler

            sched = make_scheduler(name, self.scheduler_config)
            guess = bool(control and control[1])
            sample = functools.partial(
                self._sample, sched, use_cfg, progress, schedule, kind, guess, end, output, attention_edit,
                text_correction, step_callback=step_callback,
            )  # fmt: skip
            self._compiled[key] = jax.jit(sample)
        return self._compiled[key]

    def _tick(self, _):
        if self._bar[0] is not None:
            self._bar[0].update(1)

    def _sample(
        self,
        sched,
        use_cfg,
        progress,
        schedule,
        kind,
        guess_mode,
        end,
        output,
        attention_edit,
        text_correction,
        unet_params,
        vae_params,
        plan,
        context,
        added,
        latents,
        guidance,
        key,
        conditioning=None,
        control=None,
        step_callback=None,
    ):
        from jaxdiff.sampling.cache import CachedUNet

        model = CachedUNet(self.unet.module, unet_params)
        if control is not None:
            from jaxdiff.sampling.control import WithControlNets

            nets = self.controlnets[: len(control["params"])]
            model = WithControlNets(
                model, nets, control["params"], control["images"], control["scales"], control["keep"],
                plan.timesteps, guess_mode,
            )  # fmt: skip

        n = latents.shape[0]
        cond, uncond = (context, added), None
        if use_cfg:  # the conditioning holds the prompts' rows, then the negative prompts' rows
            cond, uncond = jax.tree_util.tree_map(lambda a: a[:n], cond), jax.tree_util.tree_map(lambda a: a[n:], cond)
        x, start, after_step = latents * plan.init_noise_sigma, 0, None
        if kind is not None:
            model, x, start, after_step = self._image_conditioned(
                sched, plan, model, vae_params, latents, key, **conditioning
            )
        if context.ndim == 4:  # per-stage conditioning [B, K, L, D]
            model = denoise.Staged(model, int(self.scheduler_config.get("num_train_timesteps", 1000)))
        if text_correction is not None:
            from jaxdiff.sampling.t2i_zero import TextCorrected

            model = TextCorrected(model, text_correction, plan.timesteps, n)
        callback, callback_state = None, None
        if attention_edit is not None or step_callback is not None:
            from jaxdiff.models.attention_control import Controlled

            # Without an edit only the callback's captured layers run explicitly (the others keep the fast path).
            record = None if step_callback is None else step_callback.capture
            select = None if attention_edit is not None else record
            model = Controlled(model, attention_edit, plan.timesteps, select=select, record=record)
        if step_callback is not None:
            controlled, num_steps = model, plan.timesteps.shape[0]

            def callback(i, x, state):  # the prompts' rows (first) of the attention of this step's UNet call
                captures = {name: probs[:n] for name, probs in controlled.captured.items()}
                return step_callback(x, i, num_steps, captures, state)

            callback_state = step_callback.init(x)
        x = denoise.denoise(
            model,
            sched,
            plan,
            x,
            cond,
            uncond,
            guidance,
            start=start,
            end=end,
            key=key,
            on_step=self._tick if progress else None,
            cache=schedule,
            after_step=after_step,
            step_callback=callback,
            callback_state=callback_state,
        )
        if step_callback is not None:
            x, callback_state = x
        out = x if output == "latents" else self.decode_latents(vae_params, x)
        return out if step_callback is None else (out, callback_state)

    def _image_conditioned(
        self, sched, plan, model, vae_params, noise, key, image, latents, mask, start, pure_noise, add_noise
    ):
        """(model, first latent, start step, after-step hook) of img2img or inpainting, traced in `_sample`."""
        ic = image_conditioning
        key_image, key_masked = jax.random.split(jax.random.fold_in(key, 1))
        z0 = jnp.asarray(latents) if image is None else ic.encode(self.vae, vae_params, jnp.asarray(image), key_image)
        x = jnp.where(add_noise, ic.initial_latents(sched, plan, z0, noise, start, pure_noise), z0)
        if mask is None:
            return model, x, start, None
        mask = jnp.asarray(mask)
        small = ic.latent_mask(mask, self.vae_scale_factor)
        if self.unet.config.get("in_channels", 4) != z0.shape[-1]:  # an inpainting UNet
            # diffusers masks in [-1, 1]: the repainted region becomes 0 (grey) before encoding.
            masked = ic.encode(self.vae, vae_params, jnp.asarray(image) * (1.0 - mask) + 0.5 * mask, key_masked)
            return ic.WithMaskChannels(model, jnp.concatenate([small, masked], axis=-1)), x, start, None
        return model, x, start, ic.blend_known_region(sched, plan, z0, noise, small)

    def decode_latents(self, vae_params, latents):
        """Scaled latents -> images [B, H, W, 3] in [0, 1] (diffusers: z / scaling_factor + shift, decode, /2 + 0.5)."""
        z = latents / self.vae.config.get("scaling_factor", 0.18215)
        if self.vae.config.get("shift_factor") is not None:
            z = z + self.vae.config["shift_factor"]
        return jnp.clip(self.vae.decode(vae_params, z) / 2 + 0.5, 0.0, 1.0)


def _signature(fn, args) -> tuple:
    """What an ahead-of-time executable is specific to: the program and the arguments' structure, shapes, dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return (id(fn), treedef, tuple((np.shape(x), np.result_type(x)) for x in leaves))


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """ "512x512,768x512" -> [(512, 512), (768, 512)] as (height, width); a malformed entry is a UserError."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"bucket {item.strip()!r} is not HEIGHTxWIDTH (e.g. 512x512,768x512)")
        sizes.append((int(parts[0]), int(parts[1])))
    return sizes


def _embeds(x, name: str):
    """A [B, L, D] float array of text-encoder hidden states (float dtypes kept, others made float32)."""
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[0] == 0:
        raise UserError(f"{name} must be a non-empty [B, L, D] array, got shape {tuple(x.shape)}")
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(1,))
def _initial_noise(key, shape):
    """Unit Gaussian starting latents, drawn by one compiled program (eagerly, threefry dispatches op by op)."""
    return jax.random.normal(key, shape, jnp.float32)
