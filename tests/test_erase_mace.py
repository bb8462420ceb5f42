"""MACE's stages 2 and 3: the attention loss, importance sampling, LoRA training and the CFR-only variant."""

import types

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from test_erase_closed_form import TINY_UNET, D, _random_params
from test_erase_losses import TINY_UNET as SMALLEST_UNET

from jaxdiff import lora, selectors, sharding
from jaxdiff.erase import mace, ridge
from jaxdiff.erase.common import Encoded
from jaxdiff.erase.config import train_block
from jaxdiff.errors import UserError
from jaxdiff.models import unet
from jaxdiff.models.model import create


def _official_loss(maps: dict, mask: np.ndarray, positions: np.ndarray) -> float:
    """A numpy transcription of the official AttnController (batch 1): probabilities [heads, Q, L] per cross layer,
    the mask [H, W] resized nearest (F.interpolate) and > 0.5, the query rows inside it and the concept's token
    columns kept, the Frobenius norm of that slice per layer, summed."""
    total = 0.0
    for name, probs in maps.items():
        if not name.endswith("attn2"):
            continue
        attn_prob = probs.reshape(-1, *probs.shape[2:])  # [batch·heads, Q, L], batch 1
        d = int(attn_prob.shape[1] ** 0.5)
        h, w = mask.shape
        resized = np.array(
            [[mask[int(np.floor(i * h / d)), int(np.floor(j * w / d))] for j in range(d)] for i in range(d)]
        )
        keep = (resized > 0.5).reshape(-1)
        target = attn_prob[:, keep, :][:, :, positions.astype(bool)]
        total += float(np.linalg.norm(target.astype(np.float64)))
    return total


def test_attention_loss_equals_the_official_controller():
    rng = np.random.default_rng(0)
    L, heads = 10, 3
    maps = {}
    for k, side in enumerate((8, 4, 2)):
        logits = rng.standard_normal((1, heads, side * side, L))
        maps[f"block_{k}/attn2"] = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    maps["block_0/attn1"] = rng.random((1, heads, 64, 64)).astype(np.float32)  # self-attention: not counted
    yy, xx = np.mgrid[:32, :32]
    mask = np.clip(1.3 - np.hypot(yy - 13.5, xx - 17.0) / 8.0, 0, 1).astype(np.float32)  # soft edge around 0.5
    positions = np.zeros(L, np.float32)
    positions[[3, 4]] = 1
    want = _official_loss(maps, mask, positions)
    got = mace.attention_loss({k: jnp.asarray(v) for k, v in maps.items()}, mask[None], positions[None])
    assert want > 0 and abs(float(got) - want) <= 1e-6 * want
    # an empty selection adds 0 and keeps the gradient finite
    grad = jax.grad(lambda p: mace.attention_loss({"x/attn2": p}, np.zeros((1, 32, 32)), positions[None]))(
        jnp.asarray(maps["block_0/attn2"])
    )
    assert np.all(np.asarray(grad) == 0)


def test_importance_sampling_follows_f_normalised():
    t = np.arange(1000.0)
    f = 1 / (1 + np.exp(-0.05 * (t - 200))) - 1 / (1 + np.exp(-0.05 * (t - 400)))
    np.testing.assert_allclose(mace.importance_weights(1000), f / f.sum(), rtol=1e-12)
    draws = np.asarray(mace.sample_timesteps(jax.random.PRNGKey(0), 200_000, 1000, True))
    hist = np.bincount(draws // 50, minlength=20) / draws.size  # 20 bins of 50 steps
    np.testing.assert_allclose(hist, (f / f.sum()).reshape(20, 50).sum(1), atol=4e-3)
    uniform = np.asarray(mace.sample_timesteps(jax.random.PRNGKey(1), 20_000, 1000, False))
    assert uniform.min() >= 0 and uniform.max() <= 999 and abs(uniform.mean() - 499.5) < 10


def test_lora_steps_lower_the_attention_loss_and_touch_only_attn2_kv(tmp_path):
    model = create(unet.ARCHITECTURES["UNet2DConditionModel"], SMALLEST_UNET, abstract=True, attention="einsum")
    base = _random_params(model.params, 0)
    rng = np.random.default_rng(3)
    L = 10
    positions = np.zeros((1, L), np.float32)
    positions[0, [2, 3]] = 1
    mask = np.zeros((1, 32, 32), np.float32)
    mask[0, 8:24, 4:20] = 1
    batch = {
        "latent_mean": jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32),
        "latent_std": jnp.full((1, 8, 8, 4), 0.1, jnp.float32),
        "mask": jnp.asarray(mask),
        "context": jnp.asarray(rng.standard_normal((1, L, D)), jnp.float32),
        "positions": jnp.asarray(positions),
    }
    train = train_block(steps=4, learning_rate=0.05, optimizer="adamw", weight_decay=1e-2, max_grad_norm=1.0)
    train.log_every = 1
    mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
    adapters, deltas, info = mace.train_lora(
        model,
        base,
        lambda i: batch,
        train,
        str(tmp_path / "lora"),
        rank=1,
        mesh=mesh,
        importance_sampling=False,
        eval_examples=2,
    )
    fixed = info["attention_loss_fixed"]  # the same 2 draws (noise, t) with the initial and the trained adapters
    assert fixed["after"] < fixed["before"] and info["loss_final"]["loss"] < info["loss_initial"]["loss"]
    assert info["delta_w_norm"] > 0 and info["delta_norm"] > 0
    assert sorted(deltas) == sorted(ridge.get_kv(base))  # every attn2 to_k / to_v, nothing else
    merged = selectors.flatten(lora.merge(base, adapters))
    changed = {
        p for p, v in selectors.flatten(base).items() if not np.array_equal(np.asarray(merged[p]), np.asarray(v))
    }
    # to_k moved; this UNet's only cross-attention's to_v gets no gradient (the probabilities do not depend on it;
    # deeper UNets reach earlier layers' to_v through the later layers' queries); every other param is bit-identical
    assert any(p[-2] == "to_k" for p in changed)
    assert all(p[-3:] in (("attn2", "to_k", "kernel"), ("attn2", "to_v", "kernel")) for p in changed), changed


def test_mace_cfr_variant_is_the_closed_form_refinement_alone():
    from jaxdiff.config import load_config

    config = load_config("configs/erase/mace.py:shapes,cfr")
    assert config.stages == "cfr" and load_config("configs/erase/mace.py").stages == "full"
    model = create(unet.ARCHITECTURES["UNet2DConditionModel"], TINY_UNET, abstract=True, attention="einsum")
    params = _random_params(model.params, 0)
    rng = np.random.default_rng(5)

    def enc(n, seed):
        r = np.random.default_rng(seed)
        ids = np.tile(np.arange(10), (n, 1))
        ids[:, 2] = 20 + seed
        return Encoded(jnp.asarray(r.standard_normal((n, 10, D)), jnp.float32), ids, np.full(n, 5, np.int32))

    old, new = enc(3, 1), enc(3, 2)
    cache = ridge.context_cache(jnp.asarray(rng.standard_normal((4, 10, D)), jnp.float32))
    job = types.SimpleNamespace(
        config=config,
        original=params,
        concept_prompts=["p0", "p1", "p2"],
        anchor="square",
        replaced=lambda prompts, by: [p + by for p in prompts],
        encode=lambda prompts: old if prompts[0] == "p0" else new,
        preservation_cache=lambda: cache,
    )
    o = config.mace
    result = mace.run(job)
    want, _ = mace.cfr(params, old, new, cache, lam=o.lam, preserve_scale=o.preserve_scale)
    for path, value in selectors.flatten(want).items():
        assert np.array_equal(np.asarray(selectors.flatten(result.unet_params)[path]), np.asarray(value)), path
    assert "lora" not in result.info
    with pytest.raises(UserError, match="choose from full, cfr"):
        mace.run(types.SimpleNamespace(**{**vars(job), "config": mlc.ConfigDict({**config.to_dict(), "stages": "x"})}))


def test_folder_data_reads_images_masks_and_prompts_and_refuses_a_missing_folder(tmp_path):
    from PIL import Image

    with pytest.raises(UserError, match="--config.lora.data_dir"):
        mace.folder_data("", "nudity", 16, ["nudity"])
    root = tmp_path / "ship"
    (root / "masks").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
        Image.fromarray(np.full((20, 20), 255 * i, np.uint8)).save(root / "masks" / f"{i}.png")
    prompts, images, masks = mace.folder_data(str(tmp_path), "ship", 16, ["a ship", "a photo of a ship"])
    assert prompts == ["a ship", "a photo of a ship"] and images.shape == (2, 16, 16, 3) and masks.shape == (2, 16, 16)
    assert masks[0].max() == 0 and masks[1].min() == 1
    (root / "prompts.txt").write_text("one ship\n")
    with pytest.raises(UserError, match="1 prompts for 2 images"):
        mace.folder_data(str(tmp_path), "ship", 16, ["a ship"])
    ids = np.array([[49406, 5, 7, 8, 49407, 0], [49406, 7, 8, 49407, 0, 0]])
    enc = Encoded(jnp.zeros((2, 6, D)), ids, np.array([5, 4]), ("x y z", "y z"))
    np.testing.assert_array_equal(mace.concept_positions(enc, [7, 8]), [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]])
    with pytest.raises(UserError, match="not in the prompt"):
        mace.concept_positions(enc, [5])
