#!/usr/bin/env python
"""Train the embedded `shapes` text-to-image models on the CPU and write them as a jaxdiff pipeline.

Stages (each resumable: state is saved atomically every --save-every steps, a killed run restarts from the
last save, a finished stage is skipped):

  clip     word-level CLIP tokenizer + a transformers-style CLIPTextModel trained contrastively (InfoNCE)
           against a small image CNN (jaxdiff/metrics/shapes_clip.py) on the train captions
  vae      diffusers AutoencoderKL, 32x32x3 -> 8x8x4; then scaling_factor = 1 / std(latent means)
  probe    the judge (jaxdiff/metrics/probe.py): object count, per-slot shape/colour/size, position;
           shipped to jaxdiff/assets/shapes_probe
  unet     diffusers UNet2DConditionModel trained by jaxdiff's trainer (configs/train/shapes.py): images and
           caption ids encoded in the step by the frozen VAE and text encoder above, epsilon prediction with
           SD's betas, 10% caption dropout (classifier-free guidance), AdamW + warmup + cosine, EMA, min-SNR
           weighting; orbax checkpoints in unet/train; steps from --unet-steps, or fitted to --unet-minutes
           by a measured s/step, else the config's 2700
  decoder  the VAE decoder fine-tuned with the encoder frozen (sharper images; latents, scaling factor and
           the UNet stay valid)
  package  jaxdiff/assets/shapes (a jaxdiff checkpoint laid out like a diffusers StableDiffusionPipeline)
           and jaxdiff/assets/shapes_clip

  python tools/train_shapes.py                                  # everything, in runs/shapes_train
  python tools/train_shapes.py --stage unet                     # one stage
  python tools/train_shapes.py --smoke --workdir /tmp/smoke     # all stages with tiny step counts (~3 min)
  python tools/train_shapes.py --stage snapshot --snapshot-out /tmp/snap   # pipeline from the UNet so far

The data comes from the TFDS builder (`load_shapes`, set JAXDIFF_DATA_DIR to reuse a prepared copy); --smoke
renders its few examples directly with the same per-index generator.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import shutil
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jaxdiff.convert import checkpoint  # noqa: E402
from jaxdiff.data import shapes as S  # noqa: E402
from jaxdiff.metrics import probe as probe_lib  # noqa: E402
from jaxdiff.metrics import shapes_clip  # noqa: E402
from jaxdiff.models import registry  # noqa: E402
from jaxdiff.models.model import create  # noqa: E402

STAGES = ("clip", "vae", "probe", "unet", "decoder", "package")
SHAPES_CONFIG = ROOT / "configs" / "train" / "shapes.py"  # the unet stage's trainer config
MAX_TOKENS = 32
DIFFUSERS_VERSION = "0.42.0"

# ---------------------------------------------------------------- configurations

# SD's noise schedule; the pipeline samples with DDIM from the same betas.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "trained_betas": None,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def text_config(tokenizer, tiny: bool = False) -> dict:
    hidden = 32 if tiny else 128
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "projection_dim": hidden,
        "num_hidden_layers": 1 if tiny else 3,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float32",
    }


def vae_config(tiny: bool = False) -> dict:
    chans = [16, 16, 16] if tiny else [16, 32, 64]
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": chans,
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 8 if tiny else 16,
        "sample_size": 32,
        "scaling_factor": 1.0,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


def unet_config(cross_attention_dim: int, tiny: bool = False) -> dict:
    chans = [32, 32, 32] if tiny else [64, 64, 128]
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        # 8x8 convolutions only; cross-attention at 4x4, at the lowest resolution (2x2) and in the mid block.
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "only_cross_attention": False,
        "block_out_channels": chans,
        "layers_per_block": 1,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 8 if tiny else 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 4,
        "use_linear_projection": False,
        "upcast_attention": False,
    }


# Steps and batch sizes: (full, smoke).
HPARAMS = {
    "clip": {"steps": (500, 6), "batch": (128, 32), "lr": 1e-3, "warmup": 50},
    "vae": {"steps": (900, 6), "batch": (32, 16), "lr": 1e-3, "warmup": 50, "kl_weight": 1e-6},
    "decoder": {"steps": (1500, 6), "batch": (32, 16), "lr": 5e-4, "warmup": 50},
    "probe": {"steps": (1500, 6), "batch": (128, 32), "lr": 2e-3, "warmup": 50},
    "unet": {
        "batch": (64, 16),
        "lr": 5e-4,
        "warmup": 150,
        "ema": 0.999,
        "min_snr": 5.0,
        "drop": 0.1,
        "smoke_steps": 6,
        "min_steps": 500,
    },
}


def hp(stage: str, key: str, smoke: bool):
    value = HPARAMS[stage][key]
    return value[1 if smoke else 0] if isinstance(value, tuple) else value


# ---------------------------------------------------------------- small infrastructure


class Run:
    """Workdir, logging and per-stage state files shared by the stages."""

    def __init__(self, args):
        self.args = args
        self.workdir = Path(args.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.smoke = args.smoke
        self.tiny = args.tiny
        self.log_path = self.workdir / "log.jsonl"
        self._data = {}

    def dir(self, stage: str) -> Path:
        d = self.workdir / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 1), **record}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def done(self, stage: str) -> dict | None:
        path = self.workdir / stage / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def mark_done(self, stage: str, info: dict) -> None:
        _atomic_write_text(self.dir(stage) / "done.json", json.dumps(info, indent=2) + "\n")
        self.log({"stage": stage, "event": "done", **info})
        print(f"[{stage}] done: {json.dumps(info)}", flush=True)

    # -- data

    def data(self, split: str) -> dict:
        """images uint8 [N, 32, 32, 3], captions (train templates), labels; cached in the workdir."""
        if split in self._data:
            return self._data[split]
        n = self.args.num_examples or (2048 if self.smoke else None)
        cache = self.workdir / f"data_{split}{'' if n is None else f'_{n}'}.npz"
        if cache.is_file():
            z = np.load(cache, allow_pickle=False)
            out = {k: z[k] for k in z.files}
        else:
            out = _load_split(split, n, generate=self.smoke or self.args.generate_data)
            tmp = cache.with_name(cache.name + ".tmp.npz")
            np.savez(tmp, **out)
            os.replace(tmp, cache)
        out["captions"] = out["captions"].astype(str)
        self._data[split] = out
        return out

    def tokenizer(self):
        from jaxdiff.data.tokenizer import build_clip_tokenizer
        from jaxdiff.sampling import text

        folder = self.dir("clip") / "tokenizer"
        if not (folder / "tokenizer_config.json").is_file():
            tmp = folder.with_name("tokenizer.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build_clip_tokenizer(vocabulary_words(), tmp, MAX_TOKENS)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        return text.load_tokenizer(folder)


def vocabulary_words() -> list[str]:
    """Every word of the train and held-out templates, phrasings, vocabularies and backgrounds."""
    texts = []
    for table in (S.TRAIN_TEMPLATES, S.HELDOUT_TEMPLATES):
        for templates in table.values():
            texts += [re.sub(r"\{\w+\}", " ", t) for t in templates]
    for phrases in (*S.TRAIN_PHRASES.values(), *S.HELDOUT_PHRASES.values(), *S.SYNONYMS.values()):
        texts += list(phrases)
    texts += list(S.SHAPES + S.COLOURS + S.SIZES + S.POSITIONS + S.BACKGROUNDS)
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())})


def _load_split(split: str, n: int | None, generate: bool) -> dict:
    keys = ("shape", "colour", "size", "position", "num_objects", "background")
    if generate:
        from jaxdiff.data.shapes_tfds import make_example

        items = (make_example(split, i, 32) for i in range(n))
    else:
        from jaxdiff.data.shapes_tfds import load_shapes

        source = load_shapes(split)
        total = len(source) if n is None else min(n, len(source))
        items = (
            item
            for start in range(0, total, 5000)
            for item in source.__getitems__(list(range(start, min(start + 5000, total))))
        )
    cols = {k: [] for k in ("images", "captions", *keys)}
    for item in tqdm(items, desc=f"data {split}", total=n, mininterval=5):
        cols["images"].append(item["image"])
        cap = item["caption"]
        cols["captions"].append(cap.decode() if isinstance(cap, bytes) else str(cap))
        for k in keys:
            cols[k].append(item[k])
    out = {k: np.asarray(v) for k, v in cols.items()}
    out["images"] = out["images"].astype(np.uint8)
    out["captions"] = out["captions"].astype(np.str_)
    return out


def labels_of(data: dict, idx=None) -> dict:
    keys = ("shape", "colour", "size", "position", "num_objects", "background")
    return {k: data[k] if idx is None else data[k][idx] for k in keys}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(jax.device_get(state), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def load_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def decay_mask(params):
    """Weight decay on kernels only (not biases, norms or embeddings: unseen tokens must stay small)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: str(getattr(p[-1], "key", "")) == "kernel", params)


def make_optimizer(lr: float, warmup: int, steps: int, weight_decay: float = 0.01, b2: float = 0.999):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, min(warmup, steps // 2)), max(steps, 2), lr * 0.1)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )
    return tx, schedule


class Trainer:
    """A resumable loop: `step_fn(state, batch) -> (state, metrics)`, `batch_fn(rng, step) -> batch`."""

    def __init__(self, run: Run, stage: str, state: dict, steps: int, step_fn, batch_fn, save_every: int):
        self.run, self.stage, self.steps = run, stage, steps
        self.state_path = run.dir(stage) / "state.pkl"
        self.state, self.step_fn, self.batch_fn, self.save_every = state, step_fn, batch_fn, save_every

    def __call__(self, meta: dict) -> dict:
        """Runs to `steps`; `meta` (step, elapsed, rng state...) is saved with the train state."""
        step = meta.get("step", 0)
        rng = np.random.default_rng([self.run.args.seed, step, zlib.crc32(self.stage.encode())])
        bar = tqdm(total=self.steps, initial=step, desc=self.stage, mininterval=5, dynamic_ncols=True)
        t0 = time.time() - meta.get("elapsed", 0.0)
        last_save = step
        metrics = {}
        while step < self.steps:
            batch = self.batch_fn(rng, step)
            self.state, metrics = self.step_fn(self.state, batch)
            step += 1
            if step % 25 == 0 or step == self.steps:
                metrics = {k: float(v) for k, v in metrics.items()}
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
                self.run.log({"stage": self.stage, "step": step, **metrics, "elapsed": round(time.time() - t0, 1)})
            bar.update(1)
            if step - last_save >= self.save_every and step < self.steps:
                meta.update(step=step, elapsed=time.time() - t0)
                save_state(self.state_path, {"train": self.state, "meta": meta})
                last_save = step
        bar.close()
        meta.update(step=step, elapsed=time.time() - t0)
        save_state(self.state_path, {"train": self.state, "meta": meta})
        return {k: float(v) for k, v in metrics.items()}


def resume(run: Run, stage: str, fresh_state: callable) -> tuple[dict, dict]:
    saved = load_state(run.dir(stage) / "state.pkl")
    if saved is None:
        return fresh_state(), {"step": 0, "elapsed": 0.0}
    print(f"[{stage}] resuming from step {saved['meta']['step']}", flush=True)
    return jax.tree_util.tree_map(jnp.asarray, saved["train"]), saved["meta"]


def to_images(x_uint8) -> jnp.ndarray:
    return jnp.asarray(x_uint8, jnp.float32) / 255.0


def tokenize(tokenizer, captions) -> np.ndarray:
    from jaxdiff.sampling import text

    return text.tokenize(tokenizer, list(captions))


# ---------------------------------------------------------------- stage 1: tokenizer + text encoder (CLIP)


def load_text_encoder(run: Run):
    """The trained text encoder (after the clip stage) and the tokenizer."""
    return checkpoint.load_component(run.dir("clip") / "text_encoder"), run.tokenizer()


def stage_clip(run: Run) -> dict:
    smoke = run.smoke
    tok = run.tokenizer()
    data = run.data("train")
    unique, cap_idx = np.unique(data["captions"], return_inverse=True)
    ids = tokenize(tok, unique)
    tcfg = text_config(tok, run.tiny)
    arch = registry.architecture_for(tcfg)
    steps, batch = hp("clip", "steps", smoke), hp("clip", "batch", smoke)
    if run.args.clip_steps:
        steps = run.args.clip_steps
    head_cfg = {
        **shapes_clip.DEFAULT_CONFIG,
        "channels": [16, 32, 64],
        "projection_dim": tcfg["hidden_size"],
        "text_hidden_size": tcfg["hidden_size"],
    }
    if run.tiny:
        head_cfg.update(channels=[8, 16, 16])
    text_model = create(arch, tcfg, abstract=False, seed=run.args.seed)
    head = shapes_clip.build_head(head_cfg)
    tx, schedule = make_optimizer(hp("clip", "lr", smoke), hp("clip", "warmup", smoke), steps, weight_decay=0.05)

    def fresh():
        _, head_params = shapes_clip.init_head(head_cfg, seed=run.args.seed)
        params = {"text": text_model.params, "head": head_params}
        return {"params": params, "opt": tx.init(params)}

    state, meta = resume(run, "clip", fresh)

    def loss_fn(params, images, tokens, same):
        pooled = text_model.apply(params["text"], tokens)["pooler_output"]
        logits = head.apply({"params": params["head"]}, images, pooled)
        target = same / same.sum(1, keepdims=True)  # identical captions are all positives
        li = -(target * jax.nn.log_softmax(logits, axis=1)).sum(1).mean()
        lt = -(target * jax.nn.log_softmax(logits.T, axis=1)).sum(1).mean()
        acc = (jnp.take_along_axis(same, jnp.argmax(logits, 1)[:, None], 1)).mean()
        return (li + lt) / 2, acc

    @jax.jit
    def step_fn(state, batch):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], *batch)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, {"loss": loss, "acc": acc}

    def batch_fn(rng, step):
        idx = rng.integers(0, len(data["images"]), batch)
        c = cap_idx[idx]
        return to_images(data["images"][idx]), jnp.asarray(ids[c]), jnp.asarray(c[:, None] == c[None, :], jnp.float32)

    metrics = Trainer(run, "clip", state, steps, step_fn, batch_fn, run.args.save_every)(meta)
    params = trained_state(run, "clip")["params"]
    text_model.params = params["text"]
    checkpoint.save_checkpoint(run.dir("clip") / "text_encoder", text_model, overwrite=True)
    shapes_clip.save_head(run.dir("clip") / "head", head_cfg, params["head"])

    # Retrieval accuracy on the test split with held-out captions (never trained on).
    test = run.data("test")
    n = min(len(test["images"]), 1000)
    held = _heldout_captions(run, "test", n)
    img_e = head.apply({"params": params["head"]}, to_images(test["images"][:n]), method="image_embeds")
    pooled = text_model.apply(params["text"], jnp.asarray(tokenize(tok, held)))["pooler_output"]
    txt_e = head.apply({"params": params["head"]}, pooled, method="text_embeds")
    sims = np.asarray(img_e @ txt_e.T)
    # Counts as right when the best caption describes the same scene (labels equal) as the image's own.
    lab = np.concatenate([test[k][:n].reshape(n, -1) for k in ("shape", "colour", "num_objects")], 1)
    best = sims.argmax(1)
    match = float(np.mean([np.array_equal(lab[i], lab[b]) for i, b in enumerate(best)]))
    return {
        "steps": steps,
        "batch": batch,
        "final": metrics,
        "heldout_caption_retrieval_shape_colour": match,
        "text_params": text_model.num_params(),
        "seconds": round(meta["elapsed"], 1),
        "s_per_step": round(meta["elapsed"] / max(steps, 1), 4),
    }


def trained_state(run: Run, stage: str) -> dict:
    return jax.tree_util.tree_map(jnp.asarray, load_state(run.dir(stage) / "state.pkl")["train"])


def _heldout_captions(run: Run, split: str, n: int) -> list[str]:
    from jaxdiff.data.shapes_tfds import make_example

    if not run.smoke and not run.args.generate_data:
        from jaxdiff.data.shapes_tfds import load_shapes

        items = load_shapes(split).__getitems__(list(range(n)))
        return [
            it["heldout_caption"].decode() if isinstance(it["heldout_caption"], bytes) else it["heldout_caption"]
            for it in items
        ]
    return [make_example(split, i, 32)["heldout_caption"] for i in range(n)]


# ---------------------------------------------------------------- stage 2: VAE


def stage_vae(run: Run) -> dict:
    smoke = run.smoke
    data = run.data("train")
    cfg = vae_config(run.tiny)
    model = create(registry.architecture_for(cfg), cfg, abstract=False, seed=run.args.seed + 1)
    steps, batch = hp("vae", "steps", smoke), hp("vae", "batch", smoke)
    if run.args.vae_steps:
        steps = run.args.vae_steps
    kl_weight = hp("vae", "kl_weight", smoke)
    tx, _ = make_optimizer(hp("vae", "lr", smoke), hp("vae", "warmup", smoke), steps)
    state, meta = resume(run, "vae", lambda: {"params": model.params, "opt": tx.init(model.params)})

    def loss_fn(params, x, key):
        mean, logvar = model.encode(params, x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        rec = model.decode(params, z)
        err = rec - x
        rec_loss = (jnp.square(err) + jnp.abs(err)).sum((1, 2, 3)).mean()
        kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar).sum((1, 2, 3)).mean()
        return rec_loss + kl_weight * kl, {"mse": jnp.square(err).mean(), "kl": kl}

    @jax.jit
    def step_fn(state, batch):
        x, key = batch
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], x, key)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, {"loss": loss, **aux}

    def batch_fn(rng, step):
        idx = rng.integers(0, len(data["images"]), batch)
        return to_images(data["images"][idx]) * 2 - 1, jax.random.PRNGKey(int(rng.integers(2**31)))

    metrics = Trainer(run, "vae", state, steps, step_fn, batch_fn, run.args.save_every)(meta)
    params = trained_state(run, "vae")["params"]

    # Latents of the whole train set (for the UNet stage) and the scaling factor.
    encode = jax.jit(lambda p, x: model.encode(p, x))
    means, logvars = [], []
    for i in tqdm(range(0, len(data["images"]), 500), desc="vae latents", mininterval=5):
        m, lv = encode(params, to_images(data["images"][i : i + 500]) * 2 - 1)
        means.append(np.asarray(m))
        logvars.append(np.asarray(lv))
    means, logvars = np.concatenate(means), np.concatenate(logvars)
    scaling = float(1.0 / means.std())
    cfg = {**cfg, "scaling_factor": scaling}
    final = create(registry.architecture_for(cfg), cfg, abstract=True)
    final.params = params
    checkpoint.save_checkpoint(run.dir("vae") / "vae", final, overwrite=True)
    tmp = run.dir("vae") / "latents.tmp.npz"
    np.savez(tmp, mean=means.astype(np.float32), logvar=logvars.astype(np.float32))
    os.replace(tmp, run.dir("vae") / "latents.npz")

    test = run.data("test")
    x = to_images(test["images"][:500]) * 2 - 1
    rec = jax.jit(lambda p, x: model.decode(p, model.encode(p, x)[0]))(params, x)
    return {
        "steps": steps,
        "batch": batch,
        "final": metrics,
        "scaling_factor": scaling,
        "latent_std": float(means.std()),
        "posterior_std_mean": float(np.exp(0.5 * logvars).mean()),
        "test_mse": float(jnp.mean(jnp.square(rec - x))),
        "params": final.num_params(),
        "seconds": round(meta["elapsed"], 1),
        "s_per_step": round(meta["elapsed"] / max(steps, 1), 4),
    }


# ---------------------------------------------------------------- stage 4 (run third): the probe


def stage_probe(run: Run) -> dict:
    smoke = run.smoke
    data, test = run.data("train"), run.data("test")
    steps, batch = hp("probe", "steps", smoke), hp("probe", "batch", smoke)
    if run.args.probe_steps:
        steps = run.args.probe_steps
    cfg = {**probe_lib.DEFAULT_CONFIG, "channels": [16, 32, 64], "features": 128}
    if run.tiny:
        cfg.update(channels=[8, 16, 16], features=32)
    probe = probe_lib.init_probe(cfg, seed=run.args.seed + 2)
    module = probe.module
    train_targets = probe_lib.targets(labels_of(data))
    test_targets = probe_lib.targets(labels_of(test))
    tx, _ = make_optimizer(hp("probe", "lr", smoke), hp("probe", "warmup", smoke), steps)
    state, meta = resume(run, "probe", lambda: {"params": probe.params, "opt": tx.init(probe.params)})

    @jax.jit
    def step_fn(state, batch):
        x, tgt = batch

        def loss_fn(params):
            logits, _ = module.apply({"params": params}, x)
            return probe_lib.loss_fn(logits, tgt)

        (loss, accs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        accs = {k: v for k, v in accs.items() if k in ("shape0", "colour0", "shape1")}
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, {"loss": loss, **accs}

    def batch_fn(rng, step):
        idx = rng.integers(0, len(data["images"]), batch)
        x = data["images"][idx].astype(np.float32) / 255.0
        # Mild noise and per-image brightness: decoded samples are never pixel-exact renders.
        x = (
            x
            + rng.normal(0, 0.03, x.shape).astype(np.float32)
            + rng.normal(0, 0.02, (batch, 1, 1, 1)).astype(np.float32)
        )
        return jnp.asarray(np.clip(x, 0, 1)), {k: jnp.asarray(v[idx]) for k, v in train_targets.items()}

    Trainer(run, "probe", state, steps, step_fn, batch_fn, run.args.save_every)(meta)
    probe = probe_lib.Probe(cfg, trained_state(run, "probe")["params"])
    preds, _ = probe(test["images"])
    acc = probe_lib.accuracy(preds, test_targets)
    out = run.dir("probe") / "probe"
    probe.save(out)
    _ship(out, Path(run.args.assets) / "shapes_probe")
    worst = min(v for k, v in acc.items() if k != "all")
    if worst < 0.98:
        print(f"[probe] WARNING: a head is below 98% on the test split: {acc}", flush=True)
    return {
        "steps": steps,
        "batch": batch,
        "test_accuracy": acc,
        "test_examples": int(len(test["images"])),
        "params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(probe.params))),
        "seconds": round(meta["elapsed"], 1),
        "s_per_step": round(meta["elapsed"] / max(steps, 1), 4),
    }


def _ship(src: Path, dst: Path) -> None:
    with checkpoint.atomic_directory(dst, overwrite=True) as tmp:
        for f in src.iterdir():
            shutil.copyfile(f, tmp / f.name)


# ---------------------------------------------------------------- stage 3: UNet


def unet_workdir(run: Run) -> Path:
    """The trainer's workdir: orbax checkpoints (resumable), metrics.jsonl, config.json."""
    return run.dir("unet") / "train"


def unet_train_config(run: Run, steps: int):
    """configs/train/shapes.py with this run's text encoder, VAE and tokenizer, its data, batch and step count."""
    from jaxdiff.train import config as config_lib

    smoke = run.smoke
    config = config_lib.load_config(str(SHAPES_CONFIG))
    hidden = checkpoint.read_json(run.dir("clip") / "text_encoder" / "config.json")["hidden_size"]
    config.seed = run.args.seed + 3
    config.total_steps = steps
    config.model.unet = {k: v for k, v in unet_config(hidden, run.tiny).items() if not k.startswith("_")}
    config.model.pipeline = ""
    config.model.pretrained_vae = str(run.dir("vae") / "vae")  # its encoder; the decoder stage leaves it as is
    config.model.pretrained_text_encoder = str(run.dir("clip") / "text_encoder")
    config.model.tokenizer = str(run.dir("clip") / "tokenizer")
    config.objective.snr_gamma = hp("unet", "min_snr", smoke)
    config.objective.caption_dropout = hp("unet", "drop", smoke)
    config.data.seed = run.args.seed
    config.data.global_batch_size = hp("unet", "batch", smoke)
    config.data.options.update(
        num_records=run.args.num_examples or (2048 if smoke else 0), generate=bool(smoke or run.args.generate_data)
    )
    config.optimizer.learning_rate = hp("unet", "lr", smoke)
    config.optimizer.warmup_steps = min(hp("unet", "warmup", smoke), steps // 2)
    config.train.ema_decay = hp("unet", "ema", smoke)
    config.checkpoint.every_steps = run.args.save_every
    config.log.every_steps = min(25, steps)
    config.log.tensorboard = False
    return config


def _metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def measure_unet_s_per_step(run: Run) -> float:
    """Seconds per step of the trainer on this machine (after compiling), from a throwaway 12-step run."""
    from jaxdiff.train import loop

    config = unet_train_config(run, 12)
    config.log.every_steps, config.log.progress = 4, False
    workdir = run.dir("unet") / "measure"
    shutil.rmtree(workdir, ignore_errors=True)
    loop.train(config, str(workdir))
    rates = [r["steps_per_s"] for r in _metrics(workdir)[1:] if "steps_per_s" in r]  # past the first steps
    shutil.rmtree(workdir, ignore_errors=True)
    return 1.0 / float(np.mean(rates))


def stage_unet(run: Run) -> dict:
    """The shapes UNet trained by jaxdiff's trainer (`jaxdiff.train.loop.train` with configs/train/shapes.py):
    images and caption ids are encoded in the step by this run's frozen VAE and text encoder; resumes from the
    trainer's checkpoints. The number of steps is fixed on the first start (unet/plan.json)."""
    from jaxdiff.api import init_model
    from jaxdiff.train import loop

    plan_path = run.dir("unet") / "plan.json"
    if plan_path.is_file():
        steps = json.loads(plan_path.read_text())["steps"]
    else:
        per_step = None
        if run.smoke:
            steps = HPARAMS["unet"]["smoke_steps"]
        elif run.args.unet_steps:
            steps = run.args.unet_steps
        elif run.args.unet_minutes:
            per_step = measure_unet_s_per_step(run)
            steps = max(hp("unet", "min_steps", False), int(run.args.unet_minutes * 60 / per_step))
        else:
            from jaxdiff.train import config as config_lib

            steps = config_lib.load_config(str(SHAPES_CONFIG)).total_steps
        print(
            f"[unet] batch {hp('unet', 'batch', run.smoke)}, "
            f"{'' if per_step is None else f'{per_step:.3f} s/step measured, '}{steps} steps",
            flush=True,
        )
        run.log({"stage": "unet", "event": "plan", "steps": steps, "measured_s_per_step": per_step})
        _atomic_write_text(plan_path, json.dumps({"steps": steps}) + "\n")
    config = unet_train_config(run, steps)
    workdir = unet_workdir(run)
    t0 = time.time()
    result = loop.train(config, str(workdir))
    seconds = time.time() - t0
    records = _metrics(workdir)
    final = next((r for r in reversed(records) if "loss" in r), {})
    rates = [r["steps_per_s"] for r in records if r.get("steps_per_s")]
    for r in records:
        if "loss" in r:
            run.log({"stage": "unet", "step": r["step"], "loss": r["loss"], "mse": r.get("mse")})
    return {
        "steps": result["step"],
        "batch": config.data.global_batch_size,
        "final": {k: final[k] for k in ("loss", "mse", "learning_rate") if k in final},
        "params": init_model({"_class_name": "UNet2DConditionModel", **config.model.unet.to_dict()}).num_params(),
        "workdir": str(workdir),
        "compile_s": round(result["compile_s"], 1),
        "seconds": round(seconds, 1),
        "s_per_step": round(1.0 / float(np.median(rates)), 4) if rates else None,
    }


def trained_unet(run: Run, use_ema: bool = True) -> tuple[dict, int]:
    """(UNet params, step) from the trainer's latest checkpoint: the EMA params unless `use_ema` is False."""
    from jaxdiff.train import loop

    plan_path = run.dir("unet") / "plan.json"
    if not plan_path.is_file() or not (unet_workdir(run) / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"no UNet checkpoint in {unet_workdir(run)}: run the unet stage first (a UNet trained before the stage "
            "used jaxdiff's trainer lives in unet/state.pkl: rerun it with --stage unet --redo)"
        )
    config = unet_train_config(run, json.loads(plan_path.read_text())["steps"])
    state, _, meta = loop.restore(config, str(unet_workdir(run)), devices=jax.devices()[:1])
    params = state.ema_params() if use_ema else state.params
    return jax.device_get(params), int(meta["step"])


# ---------------------------------------------------------------- decoder fine-tuning


def final_vae_path(run: Run) -> Path:
    """The VAE with the fine-tuned decoder when that stage has run, else the VAE as first trained."""
    tuned = run.workdir / "decoder" / "vae"
    return tuned if (tuned / "params.safetensors").is_file() and run.done("decoder") else run.workdir / "vae" / "vae"


def stage_decoder(run: Run) -> dict:
    """Sharpen the VAE decoder with the encoder frozen (as SD's ft-MSE decoder): latents, and so the UNet trained
    on them and the scaling factor, stay valid. Trains from the stored train-set posteriors."""
    smoke = run.smoke
    data = run.data("train")
    vae = checkpoint.load_component(run.dir("vae") / "vae")
    lat = np.load(run.dir("vae") / "latents.npz")
    lat_mean, lat_std = lat["mean"], np.exp(0.5 * lat["logvar"])
    steps, batch = hp("decoder", "steps", smoke), hp("decoder", "batch", smoke)
    if run.args.decoder_steps:
        steps = run.args.decoder_steps
    frozen = {k: v for k, v in vae.params.items() if k not in ("decoder", "post_quant_conv")}
    trainable = {k: v for k, v in vae.params.items() if k in ("decoder", "post_quant_conv")}
    tx, _ = make_optimizer(hp("decoder", "lr", smoke), hp("decoder", "warmup", smoke), steps)
    state, meta = resume(run, "decoder", lambda: {"params": trainable, "opt": tx.init(trainable)})

    def loss_fn(params, z, x):
        err = vae.decode({**frozen, **params}, z) - x
        return (jnp.square(err) + jnp.abs(err)).sum((1, 2, 3)).mean(), jnp.square(err).mean()

    @jax.jit
    def step_fn(state, batch):
        (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], *batch)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, {"loss": loss, "mse": mse}

    def batch_fn(rng, step):
        idx = rng.integers(0, len(lat_mean), batch)
        z = lat_mean[idx] + lat_std[idx] * rng.standard_normal(lat_mean[idx].shape, np.float32)
        return jnp.asarray(z), to_images(data["images"][idx]) * 2 - 1

    metrics = Trainer(run, "decoder", state, steps, step_fn, batch_fn, run.args.save_every)(meta)
    vae.params = {**frozen, **trained_state(run, "decoder")["params"]}
    checkpoint.save_checkpoint(run.dir("decoder") / "vae", vae, overwrite=True)
    test = run.data("test")
    x = to_images(test["images"][:500]) * 2 - 1
    rec = jax.jit(lambda p, x: vae.decode(p, vae.encode(p, x)[0]))(vae.params, x)
    return {
        "steps": steps,
        "batch": batch,
        "final": metrics,
        "test_mse": float(jnp.mean(jnp.square(rec - x))),
        "seconds": round(meta["elapsed"], 1),
        "s_per_step": round(meta["elapsed"] / max(steps, 1), 4),
    }


# ---------------------------------------------------------------- packaging


def write_pipeline(run: Run, dst: Path, use_ema: bool = True) -> dict:
    """The shapes pipeline folder (jaxdiff checkpoint + tokenizer, scheduler, model_index.json), atomically."""
    encoder, _ = load_text_encoder(run)
    vae = checkpoint.load_component(final_vae_path(run))
    params, unet_step = trained_unet(run, use_ema)
    cfg = unet_config(encoder.config["hidden_size"], run.tiny)
    unet = create(registry.architecture_for(cfg), cfg, abstract=True)
    unet.params = jax.tree_util.tree_map(jnp.asarray, params)
    with checkpoint.atomic_directory(dst, overwrite=True) as tmp:
        checkpoint.save_checkpoint(tmp, {"unet": unet, "vae": vae, "text_encoder": encoder}, overwrite=True)
        shutil.copytree(run.dir("clip") / "tokenizer", tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    params = {n: m.num_params() for n, m in (("unet", unet), ("vae", vae), ("text_encoder", encoder))}
    return {
        "path": str(dst),
        "params": params,
        "unet_step": unet_step,
        "bytes": sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()),
    }


def stage_package(run: Run) -> dict:
    assets = Path(run.args.assets)
    info = write_pipeline(run, assets / "shapes")
    _ship(run.dir("clip") / "head", assets / "shapes_clip")
    return info


RUNNERS = {
    "clip": stage_clip,
    "vae": stage_vae,
    "probe": stage_probe,
    "unet": stage_unet,
    "decoder": stage_decoder,
    "package": stage_package,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/shapes_train", help="state, logs and intermediate models")
    p.add_argument(
        "--stage",
        default="all",
        choices=("all", *STAGES, "snapshot"),
        help="run one stage (its inputs must exist); 'snapshot' writes a pipeline from the UNet so far",
    )
    p.add_argument(
        "--assets",
        default=None,
        help="where shapes/, shapes_clip/, shapes_probe/ go (default jaxdiff/assets; <workdir>/assets with --smoke)",
    )
    p.add_argument("--snapshot-out", default=None, help="folder for --stage snapshot (default <workdir>/snapshot)")
    p.add_argument("--smoke", action="store_true", help="tiny step counts and 2048 rendered examples (~3 min)")
    p.add_argument("--tiny", action="store_true", help="tiny model configs (for tests)")
    p.add_argument(
        "--unet-minutes",
        type=float,
        default=None,
        help="UNet time budget, turned into steps by a measured s/step (default: configs/train/shapes.py's steps)",
    )
    p.add_argument("--unet-steps", type=int, default=None, help="fixed number of UNet steps (overrides the budget)")
    p.add_argument("--clip-steps", type=int, default=None)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--probe-steps", type=int, default=None)
    p.add_argument("--decoder-steps", type=int, default=None)
    p.add_argument("--num-examples", type=int, default=None, help="use only the first N examples of each split")
    p.add_argument("--generate-data", action="store_true", help="render examples directly instead of via TFDS")
    p.add_argument("--save-every", type=int, default=200, help="steps between saved states")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redo", action="store_true", help="run the chosen stage again even if it is done")
    args = p.parse_args(argv)
    if args.assets is None:
        args.assets = str(Path(args.workdir) / "assets") if args.smoke else str(ROOT / "jaxdiff" / "assets")
    run = Run(args)
    run.log({"event": "start", "argv": sys.argv[1:] if argv is None else list(argv)})

    if args.stage == "snapshot":
        out = Path(args.snapshot_out or Path(args.workdir) / "snapshot")
        print(json.dumps(write_pipeline(run, out)), flush=True)
        return 0
    stages = STAGES if args.stage == "all" else (args.stage,)
    t_all = time.time()
    for stage in stages:
        if run.done(stage) and not (args.redo and args.stage == stage):
            print(f"[{stage}] already done, skipping", flush=True)
            continue
        if args.redo and args.stage == stage:
            with contextlib.suppress(FileNotFoundError):
                (run.dir(stage) / "state.pkl").unlink()
            if stage == "unet":
                shutil.rmtree(unet_workdir(run), ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    (run.dir(stage) / "plan.json").unlink()
        t0 = time.time()
        info = RUNNERS[stage](run)
        info["wall_seconds_this_run"] = round(time.time() - t0, 1)
        run.mark_done(stage, info)
    run.log({"event": "finished", "wall_seconds": round(time.time() - t_all, 1)})
    summary = {s: run.done(s) for s in STAGES}
    _atomic_write_text(Path(args.workdir) / "summary.json", json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
