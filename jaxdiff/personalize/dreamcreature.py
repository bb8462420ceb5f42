"""DreamCreature / PartCraft (Ng et al. 2023, arXiv 2311.15477): part tokens whose embeddings a TokenMapper computes
from per-part sub-concept codes, so that codes of different images compose into new combinations.

Objective (the official train_dreamcreature_sd.py): L = ε-MSE with min-SNR weights (γ = 5: min(SNR, γ)/SNR)
+ λ · attention loss, λ = 0.01. Placeholder tokens `<part>_0 … <part>_{M-1}` (here `{token}_m`); each one's *input*
embedding is the TokenMapper output for the part's code k of the image: a table of (K+1)·M rows (row = k + m·(K+1);
k = K means "part not present") plus a learned per-part vector, summed, then an MLP of `mapper.layers` Linear(D)
layers with ReLU between. What trains: the mapper and a LoRA (rank 4, α = rank) on to_q/to_k/to_v/to_out of every UNet
attention, self and cross; text encoder, UNet and VAE are frozen (so they are bit-identical by construction).
Captions: with probability `p_template` a template with {} = the present part tokens in shuffled order
(`shuffle`, the official --vector_shuffle), else the tokens alone. The attention loss: the cross-attention
probabilities of the present part tokens, averaged over heads and over the layers at `attention_side`², normalised
across part tokens per pixel (a_m / Σ_m' a_m'), then binary cross-entropy against the part masks pooled to that
resolution (mean over present parts and pixels).

Official quirks kept as options / choices made here (../shared/specs/personalization.md §4, §10):
- `attention_side`: 16 (the official 16×16 at a 64×64 latent); the `:shapes` preset uses the shapes UNet's finest,
  8 (its 8×8 latent has cross-attention at 8, 4 and 2).
- `mask_pool`: "nearest" (the official nearest resize, then binary) or "mean" (the `:shapes` preset: the fraction
  of each attention pixel the part covers, a soft BCE target; at 8×8 a nearest sample misses small objects' edges).
- The mapper's sum of code row and part vector, and PyTorch-default initialisation (rows N(0, 1), Linear
  U(±1/√D)): UNVERIFIED readings of the official mapper.py. `drop_tokens` (off in the paper scripts) is not kept.
- Sub-concept codes come from the data (`parts.json`): on shapes, the supervised (shape, colour) pair of each
  object (the official --use_gt_label analogue), or unsupervised: k-means of the shapes probe's features of each
  object (the official k-means of DINO features; `dreamcreature_data.kmeans`).

Data: `--images DIR` holds the renders plus `DIR/parts.json` ({"parts": names, "num_codes": K, "code_names",
"codes": {file name: "0:5 1:7 2:1"}}) and `DIR/parts_masks.npz` ("files" [N], "masks" [N, M, H, W] in [0, 1]);
`dreamcreature_data.write_part_renders` writes both for the shapes world (parts: left object, right object,
background; codes: the (shape, colour) labels, or k-means of probe features).
Outputs beside the runner's: OUT/dreamcreature_mapper.safetensors (the mapper), OUT/dreamcreature.json (parts,
codes, token ids); OUT/model's tokenizer knows the part tokens. Sample "a 0:5 1:7 2:1" with
`load(OUT)` then `sample(pipe, mapper, meta, prompts, ...)` (per-prompt embeddings through `pipe(prompt_embeds=...)`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import lora
from jaxdiff.errors import UserError
from jaxdiff.models import attention_control
from jaxdiff.personalize import losses, tokens
from jaxdiff.personalize.job import Job, Plan

PARTS_FILE, MASKS_FILE = "parts.json", "parts_masks.npz"
MAPPER_FILE, META_FILE = "dreamcreature_mapper.safetensors", "dreamcreature.json"
CODE = re.compile(r"(?<![\w<>])(\d+):(\d+)(?![\w:])")
EPS = 1e-6


# -- codes -------------------------------------------------------------------------------------------------------
def parse_codes(text: str, num_parts: int, num_codes: int) -> np.ndarray:
    """Codes [M] of a code string "0:5 1:12" (part:code pairs; parts not named get K = "not present")."""
    out = np.full(num_parts, num_codes, np.int32)
    pairs = CODE.findall(text)
    if not pairs and text.strip():
        raise UserError(f"no part:code pair in {text!r}")
    for m, k in ((int(a), int(b)) for a, b in pairs):
        if not 0 <= m < num_parts:
            raise UserError(f"part {m} in {text!r}: parts are 0..{num_parts - 1}")
        if not 0 <= k <= num_codes:
            raise UserError(f"code {k} in {text!r}: codes are 0..{num_codes} ({num_codes} = not present)")
        if out[m] != num_codes:
            raise UserError(f"part {m} appears twice in {text!r}")
        out[m] = k
    return out


def format_codes(codes: Sequence[int], num_codes: int) -> str:
    """The code string of codes [M] ("0:5 1:12"), present parts only."""
    return " ".join(f"{m}:{int(k)}" for m, k in enumerate(codes) if int(k) != num_codes)


def code_rows(codes, num_codes: int):
    """Mapper table rows of codes [..., M]: k + m·(K+1)."""
    m = jnp.arange(codes.shape[-1])
    return codes + m * (num_codes + 1)


# -- the TokenMapper -----------------------------------------------------------------------------------------------
def init_mapper(num_parts: int, num_codes: int, dim: int, layers: int = 3, seed: int = 0) -> dict:
    """{"table": [(K+1)·M, D], "part": [M, D], "mlp": [{"kernel": [D, D], "bias": [D]}] * layers} (PyTorch defaults:
    embedding rows N(0, 1), Linear weights and biases U(±1/√D))."""
    if layers < 1:
        raise UserError(f"config.mapper.layers must be >= 1, got {layers}")
    rng = np.random.default_rng([seed, 83])
    bound = 1.0 / np.sqrt(dim)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return {
        "table": f32(rng.standard_normal(((num_codes + 1) * num_parts, dim))),
        "part": f32(rng.standard_normal((num_parts, dim))),
        "mlp": [
            {"kernel": f32(rng.uniform(-bound, bound, (dim, dim))), "bias": f32(rng.uniform(-bound, bound, dim))}
            for _ in range(layers)
        ],
    }


def mapper_apply(params: dict, codes, num_codes: int):
    """Part-token embeddings [B, M, D] of codes [B, M]: MLP(table[k + m(K+1)] + part[m]), ReLU between layers."""
    x = jnp.take(params["table"], code_rows(jnp.asarray(codes), num_codes), axis=0) + params["part"]
    for i, layer in enumerate(params["mlp"]):
        if i:
            x = jax.nn.relu(x)
        x = x @ layer["kernel"] + layer["bias"]
    return x


def encode_parts(text_encoder, te_params, mapper: dict, ids, codes, part_ids, num_codes: int):
    """Conditioning [B, L, D] of ids [B, L] where part token m (id part_ids[m]) reads the mapper output of codes[b, m];
    every other id reads the frozen table (ids past the table are only the part tokens). Differentiable in mapper."""
    table = tokens.table_of(te_params)
    embeds = jnp.take(table, jnp.minimum(ids, table.shape[0] - 1), axis=0)
    parts = mapper_apply(mapper, codes, num_codes).astype(table.dtype)  # [B, M, D]
    onehot = part_onehot(ids, part_ids)  # [B, L, M]
    hit = onehot.sum(-1, keepdims=True) > 0
    embeds = jnp.where(hit, jnp.einsum("blm,bmd->bld", onehot, parts), embeds)
    return text_encoder.apply(te_params, ids, token_embeds=embeds)["last_hidden_state"]


# -- the attention loss --------------------------------------------------------------------------------------------
def part_onehot(ids, part_ids):
    """[B, L, M] float: 1 where position l holds part token m."""
    return (jnp.asarray(ids)[..., None] == jnp.asarray(part_ids)).astype(jnp.float32)


def part_maps(maps: dict, onehot, side: int):
    """Per part token the cross-attention probability [B, side², M], averaged over heads and over the captured
    cross-attention layers (names ending in attn2) at side x side; a token absent from the caption gets zeros."""
    picked = [p.mean(axis=1) for n, p in maps.items() if n.endswith("attn2") and p.shape[2] == side * side]
    if not picked:
        raise UserError(f"no cross-attention layer at {side}x{side} (config.attention_side)")
    probs = jnp.mean(jnp.stack(picked), axis=0).astype(jnp.float32)  # [B, Q, L]
    return jnp.einsum("bql,blm->bqm", probs, onehot)


def normalise(a, present):
    """a [B, Q, M] normalised across the present part tokens per pixel: a_m / Σ_m' a_m' (0 for absent parts, and
    everywhere in an image with no part present)."""
    a = a * present[:, None, :]
    total = a.sum(-1, keepdims=True)
    return jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), 0.0)


def bce(p, target, present):
    """Binary cross-entropy −[y log p + (1−y) log(1−p)] of normalised maps p [B, Q, M] against masks [B, Q, M],
    averaged over pixels and present parts (p clipped to [1e-6, 1 − 1e-6]); 0 when no part is present."""
    p = jnp.clip(p, EPS, 1.0 - EPS)
    per = -(target * jnp.log(p) + (1.0 - target) * jnp.log1p(-p))  # [B, Q, M]
    weight = jnp.broadcast_to(present[:, None, :], per.shape)
    return jnp.sum(per * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def pool_masks(masks: np.ndarray, side: int, mode: str = "mean") -> np.ndarray:
    """masks [N, M, H, W] in [0, 1] -> [N, side², M] at the attention resolution: "mean" (area fraction) or
    "nearest" (torch's nearest resize: source index ⌊i·H/side⌋, then > 0.5)."""
    n, m, h, w = masks.shape
    if mode == "mean":
        if h % side or w % side:
            raise UserError(f"masks {h}x{w} do not pool evenly to {side}x{side}")
        out = masks.reshape(n, m, side, h // side, side, w // side).mean(axis=(3, 5))
    elif mode == "nearest":
        rows, cols = (np.arange(side) * h) // side, (np.arange(side) * w) // side
        out = (masks[:, :, rows][:, :, :, cols] > 0.5).astype(np.float32)
    else:
        raise UserError(f"config.mask_pool={mode!r}: mean or nearest")
    return np.ascontiguousarray(out.reshape(n, m, side * side).transpose(0, 2, 1), np.float32)


def captions(rng: np.random.Generator, present: Sequence[bool], part_tokens, templates, p_template, shuffle):
    """A caption: the present part tokens (shuffled when `shuffle`), in a random template with probability
    `p_template`, else alone."""
    words = [t for t, on in zip(part_tokens, present) if on]
    if shuffle:
        words = [words[i] for i in rng.permutation(len(words))]
    text = " ".join(words)
    if templates and rng.random() < p_template:
        return templates[int(rng.integers(len(templates)))].format(text)
    return text


# -- data ----------------------------------------------------------------------------------------------------------
def load_parts(folder: str | os.PathLike, files: Sequence[Path]) -> tuple[dict, np.ndarray, np.ndarray]:
    """(meta, codes [N, M], masks [N, M, H, W]) for the image files of `folder` from its parts.json and
    parts_masks.npz (see the module docstring); a UserError naming what is missing."""
    folder = Path(folder)
    if not (folder / PARTS_FILE).is_file() or not (folder / MASKS_FILE).is_file():
        raise UserError(f"--images {folder}: DreamCreature needs {PARTS_FILE} and {MASKS_FILE} beside the images")
    meta = json.loads((folder / PARTS_FILE).read_text())
    num_parts, k = len(meta["parts"]), int(meta["num_codes"])
    missing = [f.name for f in files if f.name not in meta["codes"]]
    if missing:
        raise UserError(f"{folder / PARTS_FILE}: no codes for {len(missing)} images, e.g. {missing[:3]}")
    codes = np.stack([parse_codes(meta["codes"][f.name], num_parts, k) for f in files])
    with np.load(folder / MASKS_FILE) as z:
        index = {str(name): i for i, name in enumerate(z["files"])}
        if any(f.name not in index for f in files):
            raise UserError(f"{folder / MASKS_FILE}: masks missing for some images")
        masks = np.asarray(z["masks"], np.float32)[[index[f.name] for f in files]]
    if masks.shape[1] != num_parts:
        raise UserError(f"{folder / MASKS_FILE}: {masks.shape[1]} masks per image for {num_parts} parts")
    return meta, codes, masks


# -- the method ----------------------------------------------------------------------------------------------------
def part_tokens(token: str, num_parts: int) -> list[str]:
    return [f"{token}_{m}" for m in range(num_parts)]


def _setup(job: Job) -> dict:
    """Adds the part tokens to the job's tokenizer (after its own token) and reads the part data, once."""
    if getattr(job, "dreamcreature", None) is not None:
        return job.dreamcreature
    from jaxdiff.personalize import data

    c = job.config
    meta, codes, masks = load_parts(c.images, data.image_files(c.images))
    names = part_tokens(job.token, len(meta["parts"]))
    job.tokenizer, ids = tokens.add_tokens(job.tokenizer, names)
    side = int(c.attention_side)
    setup = dict(meta=meta, codes=codes, masks=pool_masks(masks, side, str(c.mask_pool)), names=names, ids=ids)
    job.dreamcreature = setup
    k = int(meta["num_codes"])  # the report's captions: each image's part tokens in order
    job.prompts = [[" ".join(t for t, code in zip(names, row) if code != k)] for row in codes]
    return setup


def sidecar(job: Job) -> dict:
    """OUT/dreamcreature.json: parts, codes and the part tokens' ids in OUT/model's tokenizer."""
    s = _setup(job)
    meta = {k: s["meta"][k] for k in ("parts", "num_codes", "code_names") if k in s["meta"]}
    c = job.config
    return {**meta, "tokens": s["names"], "token_ids": s["ids"], "mapper_layers": int(c.mapper.layers)}


def plan(job: Job) -> Plan:
    c = job.config
    te, unet = job.text_encoder, job.unet
    s = _setup(job)
    num_parts, k = len(s["meta"]["parts"]), int(s["meta"]["num_codes"])
    dim = int(tokens.table_of(te.params).shape[1])
    mapper = init_mapper(num_parts, k, dim, int(c.mapper.layers), int(c.seed))
    adapters = lora.init(unet.params, c.lora.targets, int(c.lora.rank), c.lora.init, seed=int(c.seed))
    scale = float(c.lora.alpha) / int(c.lora.rank)
    acp = job.alphas_cumprod()
    side, weight, gamma = int(c.attention_side), float(c.attention_weight), float(c.snr_gamma)
    part_ids = jnp.asarray(s["ids"], jnp.int32)
    select = lambda layer: layer.cross and layer.side == side  # noqa: E731

    def loss(params, frozen, batch, rng):
        p = params["personal"]
        ids = batch["ids"]
        ctx = encode_parts(te, frozen["text_encoder"], p["mapper"], ids, batch["codes"], part_ids, k)
        unet_params = lora.merge(frozen["unet"], p["lora"], scale)
        captured = {}

        def apply(x, t, context):  # the same UNet call gives ε̂ and the maps (held for this trace only)
            out, captured["maps"] = attention_control.apply_with_maps(unet, unet_params, x, t, context, select=select)
            return out

        per = losses.eps_mse(apply, acp, batch["latents"], ctx, rng, gamma)
        onehot = part_onehot(ids, part_ids)
        present = (onehot.sum(1) > 0).astype(jnp.float32)  # [B, M]: the part tokens in the caption
        attn = bce(normalise(part_maps(captured["maps"], onehot, side), present), batch["masks"], present)
        eps = jnp.mean(per)
        return eps + weight * attn, {"eps_mse": eps, "attention_bce": attn}

    templates = list(c.templates)
    if any("{}" not in t for t in templates):
        raise UserError("config.templates must be strings with one {} each")
    batch_size = int(c.train.batch_size)
    latents = job.instance_latents

    def batch_fn(step: int) -> dict:
        rng = np.random.default_rng([int(c.seed), 17, step])
        i = rng.integers(0, len(latents), batch_size)
        present = s["codes"][i] != k
        text = [captions(rng, row, s["names"], templates, float(c.p_template), bool(c.shuffle)) for row in present]
        return {"latents": latents[i], "ids": job.tokenize(text), "codes": s["codes"][i], "masks": s["masks"][i]}

    frozen = {"unet": unet.params, "text_encoder": te.params}
    return Plan({"mapper": mapper, "lora": adapters}, {"mapper": True, "lora": True}, loss, batch_fn, frozen)


def outputs(job: Job, trained: dict) -> dict:
    """OUT/model's rows [1 + M, D] (the run's own token: the mean part row; part m: the mean mapper output over its
    codes, a plain-token approximation), the UNet with the LoRA merged, the LoRA and the mapper."""
    s = _setup(job)
    num_parts, k = len(s["meta"]["parts"]), int(s["meta"]["num_codes"])
    codes = np.repeat(np.arange(k)[:, None], num_parts, axis=1)
    parts = np.asarray(mapper_apply(trained["mapper"], codes, k)).mean(0)  # [M, D]
    rows = np.concatenate([parts.mean(0, keepdims=True), parts])
    scale = float(job.config.lora.alpha) / int(job.config.lora.rank)
    size = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(trained["mapper"]))
    return {
        "rows": rows,
        "unet": lora.merge(job.unet.params, trained["lora"], scale),
        "lora": trained["lora"],
        "lora_scale": scale,
        "mapper": trained["mapper"],
        "trained_params": size + lora.num_params(trained["lora"]),
    }


def save_extra(job: Job, result: dict, out: Path) -> None:
    from jaxdiff.convert.safetensors_io import write_safetensors

    flat = {"table": result["mapper"]["table"], "part": result["mapper"]["part"]}
    for i, layer in enumerate(result["mapper"]["mlp"]):
        flat |= {f"mlp/{i}/kernel": layer["kernel"], f"mlp/{i}/bias": layer["bias"]}
    flat = {key: np.asarray(v, np.float32) for key, v in flat.items()}
    write_safetensors(out / MAPPER_FILE, flat, metadata={"format": "jaxdiff-dreamcreature"})
    (out / META_FILE).write_text(json.dumps(sidecar(job), indent=1) + "\n")


def load_mapper(out: str | os.PathLike) -> tuple[dict, dict]:
    """(mapper params, OUT/dreamcreature.json) of a run."""
    from jaxdiff.convert.safetensors_io import load_safetensors

    out = Path(out)
    flat = load_safetensors(out / MAPPER_FILE, copy=True)
    meta = json.loads((out / META_FILE).read_text())
    mlp = [
        {"kernel": jnp.asarray(flat[f"mlp/{i}/kernel"]), "bias": jnp.asarray(flat[f"mlp/{i}/bias"])}
        for i in range(int(meta["mapper_layers"]))
    ]
    return {"table": jnp.asarray(flat["table"]), "part": jnp.asarray(flat["part"]), "mlp": mlp}, meta


def load(out: str | os.PathLike):
    """(pipeline of OUT/model: part tokens known, LoRA merged; mapper; meta) of a DreamCreature run."""
    from jaxdiff.sampling.pipeline import load_pipeline

    mapper, meta = load_mapper(out)
    return load_pipeline(Path(out) / "model"), mapper, meta


def prompt_codes(prompts: Sequence[str], meta: dict) -> tuple[list[str], np.ndarray]:
    """("a 0:5 1:7" -> "a <part>_0 <part>_1") prompts and their codes [B, M]."""
    num_parts, k = len(meta["parts"]), int(meta["num_codes"])
    texts, codes = [], []
    for p in prompts:
        codes.append(parse_codes(" ".join(":".join(x) for x in CODE.findall(p)), num_parts, k))
        texts.append(" ".join(CODE.sub(lambda mt: meta["tokens"][int(mt.group(1))], p).split()))
    return texts, np.stack(codes)


def conditioning(pipe, mapper: dict, meta: dict, prompts: Sequence[str]):
    """Conditioning [B, L, D] of code prompts ("a 0:5 1:7 2:1") for `pipe(prompt_embeds=...)`: part token m carries
    the mapper output of its code. `pipe` must know the part tokens (OUT/model)."""
    from jaxdiff.sampling import text

    added = pipe.tokenizers[0].get_added_vocab()
    if any(added.get(t) != i for t, i in zip(meta["tokens"], meta["token_ids"])):
        raise UserError(f"the pipeline's tokenizer lacks the part tokens {meta['tokens']} (load OUT/model)")
    texts, codes = prompt_codes(prompts, meta)
    ids = jnp.asarray(text.tokenize(pipe.tokenizers[0], texts))
    te = pipe.text_encoders[0]
    part_ids = jnp.asarray(meta["token_ids"], jnp.int32)
    return encode_parts(te, te.params, mapper, ids, jnp.asarray(codes), part_ids, int(meta["num_codes"]))


def sample(pipe, mapper: dict, meta: dict, prompts: Sequence[str], **kw) -> np.ndarray:
    """Images [B, H, W, 3] in [0, 1] of code prompts ("a picture of a 0:5 1:7 2:1"); kw go to `pipe(...)`."""
    return pipe(prompt_embeds=conditioning(pipe, mapper, meta, prompts), **kw)


def samples(job: Job, pipe, prompts: list[str], result: dict) -> list[tuple[str, np.ndarray]]:
    """samples.png rows: each config.sample prompt (code strings, e.g. "a 0:5 1:7 2:1") through the mapper."""
    meta = sidecar(job)
    return job.sample_rows(prompts, lambda prompt, n, **kw: sample(pipe, result["mapper"], meta, [prompt] * n, **kw))
