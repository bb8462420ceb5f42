"""Stage clip: the word-level tokenizer and a CLIPTextModel trained contrastively (InfoNCE) against a small image
tower (jaxdiff/metrics/shapes_clip.py) on the train captions; both are one network, "clip" = {text, head}."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import checkpoint
from jaxdiff.metrics import shapes_clip
from jaxdiff.models import registry
from jaxdiff.models.model import create
from jaxdiff.train.shapes import fit
from jaxdiff.train.shapes.common import Run, to_images, tokenize
from jaxdiff.train.shapes.models import clip_head_config, text_config


def load_text_encoder(run: Run):
    """The trained text encoder (after this stage) and the tokenizer."""
    return checkpoint.load_component(run.dir("clip") / "text_encoder"), run.tokenizer()


def contrastive_loss(text_model, head):
    """loss_fn of the "clip" phase: symmetric InfoNCE where identical captions are all positives."""

    def loss_fn(params, frozen, batch, rng):
        p = params["clip"]
        pooled = text_model.apply(p["text"], batch["tokens"])["pooler_output"]
        logits = head.apply({"params": p["head"]}, batch["images"], pooled)
        same = batch["same"]
        target = same / same.sum(1, keepdims=True)
        li = -(target * jax.nn.log_softmax(logits, axis=1)).sum(1).mean()
        lt = -(target * jax.nn.log_softmax(logits.T, axis=1)).sum(1).mean()
        acc = jnp.take_along_axis(same, jnp.argmax(logits, 1)[:, None], 1).mean()
        return (li + lt) / 2, {"acc": acc}

    return loss_fn


def stage(run: Run) -> dict:
    seed = run.opts.seed
    tok = run.tokenizer()
    data = run.data("train")
    unique, cap_idx = np.unique(data["captions"], return_inverse=True)
    ids = tokenize(tok, unique)
    tcfg = text_config(tok, run.tiny)
    batch_size = run.hp("clip", "batch")
    head_cfg = clip_head_config(tcfg["hidden_size"], run.tiny)
    text_model = create(registry.architecture_for(tcfg), tcfg, abstract=False, seed=seed)
    head = shapes_clip.build_head(head_cfg)
    _, head_params = shapes_clip.init_head(head_cfg, seed=seed)

    def batch_fn(rng):
        idx = rng.integers(0, len(data["images"]), batch_size)
        c = cap_idx[idx]
        return {
            "images": to_images(data["images"][idx]),
            "tokens": np.asarray(ids[c]),
            "same": (c[:, None] == c[None, :]).astype(np.float32),
        }

    params, info = fit.train_one(
        run,
        "clip",
        "clip",
        contrastive_loss(text_model, head),
        {"text": text_model.params, "head": head_params},
        batch_fn,
        seed=seed,
        config={"text": tcfg, "head": head_cfg, "examples": len(data["images"])},
    )
    text_model.params = params["text"]
    checkpoint.save_checkpoint(run.dir("clip") / "text_encoder", text_model, overwrite=True)
    shapes_clip.save_head(run.dir("clip") / "head", head_cfg, params["head"])

    # Retrieval accuracy on the test split with held-out captions (never trained on).
    test = run.data("test")
    n = min(len(test["images"]), 1000)
    held = run.heldout_captions("test", n)
    img_e = head.apply({"params": params["head"]}, to_images(test["images"][:n]), method="image_embeds")
    pooled = text_model.apply(params["text"], jnp.asarray(tokenize(tok, held)))["pooler_output"]
    txt_e = head.apply({"params": params["head"]}, pooled, method="text_embeds")
    sims = np.asarray(img_e @ txt_e.T)
    # Counts as right when the best caption describes the same scene (labels equal) as the image's own.
    lab = np.concatenate([test[k][:n].reshape(n, -1) for k in ("shape", "colour", "num_objects")], 1)
    best = sims.argmax(1)
    match = float(np.mean([np.array_equal(lab[i], lab[b]) for i, b in enumerate(best)]))
    return {
        **info,
        "batch": batch_size,
        "heldout_caption_retrieval_shape_colour": match,
        "text_params": text_model.num_params(),
    }
