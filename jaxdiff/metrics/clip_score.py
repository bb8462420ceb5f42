"""CLIP score as torchmetrics' CLIPScore computes it: 100 · cos(image, text) per pair, the mean clamped at 0."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.errors import UserError
from jaxdiff.metrics.clip_preprocess import CLIPImageConfig, preprocess
from jaxdiff.metrics.fid import DATA_AXES
from jaxdiff.models import clip_vision


def clip_scores(image_embeds, text_embeds) -> np.ndarray:
    """Per pair 100 · cos(image_i, text_i) in float64 (not clamped), from embeddings [N, P] (normalised or not)."""
    a, b = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise UserError(f"CLIP score needs one text per image: embeddings {a.shape} and {b.shape}")
    if len(a) == 0:
        raise UserError("CLIP score needs at least 1 image-text pair, got 0")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 100.0 * np.sum(a * b, axis=1)


def clip_score(image_embeds, text_embeds) -> float:
    """torchmetrics' CLIPScore: max(mean_i 100 · cos(image_i, text_i), 0). The clamp applies to the mean (its
    `compute`), not to each pair as its docstring's formula suggests (spec §5.1)."""
    return max(float(np.mean(clip_scores(image_embeds, text_embeds))), 0.0)


def text_inputs(tokenizer, prompts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask [N, max_length] as torchmetrics builds them: tokenised without truncation,
    padded, then cut to the text tower's `max_position_embeddings` (a cut prompt loses its EOS token, exactly as
    in torchmetrics, which warns; so does this)."""
    enc = tokenizer(list(prompts), padding="longest", truncation=False, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if ids.shape[1] < max_length:  # one shape for every batch; padding after the EOS changes no embedding
        pad = max_length - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=tokenizer.pad_token_id)
        mask = np.pad(mask, ((0, 0), (0, pad)))
    cut = int((mask[:, max_length:].sum(axis=1) > 0).sum())
    if cut:
        warnings.warn(
            f"{cut} prompt(s) longer than {max_length} tokens were cut, as torchmetrics cuts them", stacklevel=2
        )
    return ids[:, :max_length].astype(np.int32), mask[:, :max_length].astype(np.int32)


def _batches(items, batch_size: int):
    """Runs of at most batch_size consecutive items of one shape (an array [N, ...] or a list of arrays)."""
    if isinstance(items, np.ndarray | jax.Array):
        for start in range(0, len(items), batch_size):
            yield np.asarray(items[start : start + batch_size])
        return
    run = []
    for item in items:
        item = np.asarray(item)
        if run and (item.shape != run[0].shape or len(run) == batch_size):
            yield np.stack(run)
            run = []
        run.append(item)
    if run:
        yield np.stack(run)


def _embed_in_batches(fn, chunks, batch_size: int) -> np.ndarray:
    """fn over rows gathered into fixed batches of batch_size (the last padded by repeating a row): one compile."""
    out, pending = [], []

    def flush(rows):
        n = len(rows)
        if n < batch_size:
            rows = jnp.concatenate([rows, jnp.repeat(rows[:1], batch_size - n, axis=0)])
        out.append(np.asarray(fn(rows), np.float32)[:n])

    for chunk in chunks:
        pending.append(chunk)
        rows = jnp.concatenate(pending) if len(pending) > 1 else pending[0]
        while len(rows) >= batch_size:
            flush(rows[:batch_size])
            rows = rows[batch_size:]
        pending = [rows] if len(rows) else []
    if pending:
        flush(pending[0])
    if not out:
        raise UserError("no images or texts to embed")
    return np.concatenate(out)


def image_embeddings(
    model,
    images,
    *,
    params=None,
    config: CLIPImageConfig | None = None,
    batch_size: int = 32,
    normalize=False,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Projected image embeddings [N, P] of uint8 images (an array [N, H, W, 3] or a list of [H, W, 3] arrays of
    any sizes) through CLIP's preprocessing and a CLIPModel or CLIPVisionModelWithProjection `Model`.

    `mesh`: the vision tower runs with each batch split over the mesh's data axes (the batch size is rounded up to
    a multiple of them) and the weights replicated."""
    params = model.params if params is None else params
    size = clip_vision.image_size(model)
    config = config or CLIPImageConfig.for_image_size(size)
    if config.crop_size != size:
        raise UserError(f"the preprocessing crops to {config.crop_size} but the vision tower takes {size}x{size}")
    prep = jax.jit(functools.partial(preprocess, config=config))
    if mesh is None:
        embed = jax.jit(lambda pixels: clip_vision.image_embeds(model, params, pixels))
    else:
        axes = tuple(a for a in DATA_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
        shards = int(np.prod([mesh.shape[a] for a in axes]))
        batch_size = -(-batch_size // shards) * shards
        replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(axes or None))
        params = jax.device_put(params, replicated)
        tower = jax.jit(lambda p, pixels: clip_vision.image_embeds(model, p, pixels), out_shardings=split)
        embed = lambda pixels: tower(params, jax.device_put(pixels, split))  # noqa: E731
    out = _embed_in_batches(embed, (prep(chunk) for chunk in _batches(images, batch_size)), batch_size)
    return out / np.linalg.norm(out, axis=1, keepdims=True) if normalize else out


def text_embeddings(model, input_ids, attention_mask=None, *, params=None, batch_size: int = 64) -> np.ndarray:
    """Projected text embeddings [N, P] of token ids [N, L] through a CLIPModel or CLIPTextModelWithProjection."""
    params = model.params if params is None else params
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    embed = jax.jit(lambda rows: clip_vision.text_embeds(model, params, rows[:, 0], rows[:, 1]))
    stacked = np.stack([ids, mask], axis=1)  # [N, 2, L]: ids and mask batched together
    return _embed_in_batches(embed, (jnp.asarray(b) for b in _batches(stacked, batch_size)), batch_size)


def text_length(model) -> int:
    """The text tower's max_position_embeddings (torchmetrics cuts prompts to it)."""
    config = (model.config.get("text_config") or {}) if model.architecture.name == "CLIPModel" else model.config
    return clip_vision.text_config(config)["max_position_embeddings"]


def score_images(images, prompts, model, tokenizer, *, text_model=None, batch_size: int = 32) -> float:
    """torchmetrics' `CLIPScore(model)(images, prompts)` for uint8 images and their prompts (one per image).

    `model`: a CLIPModel `Model` (e.g. `jaxdiff.load_model("openai/clip-vit-large-patch14")`, torchmetrics'
    default), or a CLIPVisionModelWithProjection with its CLIPTextModelWithProjection as `text_model`;
    `tokenizer`: the checkpoint's transformers CLIPTokenizer (`jaxdiff.sampling.text.load_tokenizer`).
    """
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise UserError(f"CLIP score needs one prompt per image: {len(images)} images, {len(prompts)} prompts")
    text_model = text_model or model
    image = image_embeddings(model, images, batch_size=batch_size)
    ids, mask = text_inputs(tokenizer, prompts, text_length(text_model))
    text = text_embeddings(text_model, ids, mask, batch_size=batch_size)
    return clip_score(image, text)
