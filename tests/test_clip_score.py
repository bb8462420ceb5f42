"""CLIP preprocessing bit-identical to transformers' CLIPImageProcessor (PIL), and torchmetrics' CLIP score formula
recomputed with transformers' CLIPModel.

Measured, not asserted (tools: this file's images, 224 crop): `jax.image.resize(..., "bicubic")` in place of PIL's
resampling differs from the processor by up to 0.02 (smooth images) / 0.3 (noise) in normalised pixel units, mean
0.004 (about 1-20 uint8 levels, 0.3 on average) with antialias=True, and by up to 2.4 without antialias when
downscaling; hence the PIL emulation.
"""

import os
import warnings

import jax
import numpy as np
import pytest
import torch
import transformers
from parity import assert_parity
from PIL import Image

from jaxdiff.convert import layout
from jaxdiff.errors import UserError
from jaxdiff.metrics import clip_score as cs
from jaxdiff.metrics.clip_preprocess import CLIPImageConfig, preprocess
from jaxdiff.metrics.pil_resize import FILTERS, pil_resize, vertical_first
from jaxdiff.models import clip_vision
from jaxdiff.models.clip import ARCHITECTURES as TEXT_ARCHITECTURES
from jaxdiff.models.model import create
from jaxdiff.sampling.text import load_tokenizer

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "jaxdiff", "assets", "shapes", "tokenizer")
_PIL = {"box": Image.BOX, "bilinear": Image.BILINEAR, "hamming": Image.HAMMING, "bicubic": Image.BICUBIC}
_PIL["lanczos"] = Image.LANCZOS


def _images(rng, shape, n=2):
    """uint8 [n, H, W, 3]: a noise image and a smooth one (the ringing of noise is the hardest case for rounding)."""
    h, w = shape
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ramp = np.clip(np.cumsum(rng.integers(-12, 13, (h, w, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    return np.stack([noise, ramp][:n])


def _processor(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision ... falling back to CLIPImageProcessorPil"
        return transformers.CLIPImageProcessor(**kw)


# (H, W) -> (out H, out W): up, down, mixed, tall images whose height shrinks > 2x the width's (Pillow 13 then
# resamples vertically first) and shapes where the width shrinks more.
RESIZES = [((37, 53), (224, 320)), ((300, 200), (224, 224)), ((512, 384), (298, 224)), ((900, 300), (672, 224)),
           ((108, 28), (60, 7)), ((54, 96), (8, 60)), ((20, 30), (31, 17))]  # fmt: skip


@pytest.mark.parametrize("method", sorted(FILTERS))
def test_pil_resize_is_pillow_bit_for_bit(method):
    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in RESIZES:
        images = _images(rng, (h, w))
        out = np.asarray(jax.jit(pil_resize, static_argnums=(1, 2, 3))(images, oh, ow, method))
        ref = np.stack([np.asarray(Image.fromarray(i).resize((ow, oh), _PIL[method])) for i in images])
        assert np.array_equal(out, ref), (method, h, w, oh, ow)


def test_pillow12_order_is_horizontal_then_vertical():
    # Pillow <= 12 always ran the horizontal pass first; two one-axis Pillow resizes reproduce it on any Pillow.
    images = _images(np.random.default_rng(1), (900, 300))
    out = np.asarray(pil_resize(images, 672, 224, order="pillow12"))
    ref = [Image.fromarray(i).resize((224, 900), Image.BICUBIC).resize((224, 672), Image.BICUBIC) for i in images]
    assert vertical_first(900, 300, 672, 224) and not vertical_first(900, 300, 672, 224, "pillow12")
    assert np.array_equal(out, np.stack([np.asarray(r) for r in ref]))


@pytest.mark.parametrize("shape", [(300, 400), (256, 256), (500, 375), (900, 300), (224, 224), (120, 200)])
def test_preprocess_equals_clip_image_processor(shape):
    images = _images(np.random.default_rng(2), shape)
    ref = _processor()(images=list(images), return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    out = np.asarray(jax.jit(preprocess)(images))
    assert out.dtype == np.float32 and np.array_equal(out, ref)  # bit-identical, not merely close


def test_preprocessor_config_round_trips_and_odd_ones_are_refused():
    assert CLIPImageConfig.from_preprocessor_config(_processor().to_dict()) == CLIPImageConfig()
    large = _processor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).to_dict()
    assert CLIPImageConfig.from_preprocessor_config(large) == CLIPImageConfig.for_image_size(336)
    with pytest.raises(UserError, match="do_center_crop off"):
        CLIPImageConfig.from_preprocessor_config({**large, "do_center_crop": False})
    with pytest.raises(UserError, match="must be uint8"):
        preprocess(np.zeros((1, 8, 8, 3), np.float32))


def test_cmmd_order_crops_a_square_then_resizes():
    # google-research/cmmd io_util: PIL crop of the centered largest square, then PIL bicubic resize.
    images = _images(np.random.default_rng(3), (300, 500))
    config = CLIPImageConfig.for_image_size(336, crop_first=True)
    out = np.asarray(preprocess(images, config))
    ref = _processor(do_resize=False, do_center_crop=False)(
        images=[
            np.asarray(Image.fromarray(i).crop((100, 0, 400, 300)).resize((336, 336), Image.BICUBIC)) for i in images
        ],
        return_tensors="np",
    ).pixel_values.transpose(0, 2, 3, 1)
    assert np.array_equal(out, ref)


# ----------------------------------------------------------------- CLIP score against transformers' CLIPModel

TINY = transformers.CLIPConfig(
    text_config=dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                     max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu"),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                       patch_size=8, hidden_act="quick_gelu"),
    projection_dim=20,
)  # fmt: skip
PROMPTS = [
    "a red circle",
    "a big blue square above a small green triangle on the left of a red circle",  # 21 tokens: cut to 16
    "a green triangle",
    "a small yellow square",
    "a blue circle on a red background",
]


@pytest.fixture(scope="module")
def clip_case():
    torch.manual_seed(0)
    pt = transformers.CLIPModel(TINY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter random (biases, norms, logit_scale too)
        for name, p in pt.named_parameters():
            p.add_(
                (0.2 if name.endswith("bias") or "norm" in name or p.ndim == 0 else 0.5 * float(p.std()))
                * torch.randn(p.shape, generator=g)
            )
    rng = np.random.default_rng(4)
    images = [_images(rng, s, 1)[0] for s in [(40, 52), (64, 64), (90, 30), (33, 40), (200, 120)]]
    return pt, images, load_tokenizer(TOKENIZER)


def _torchmetrics_scores(pt, images, prompts, tokenizer):
    """torchmetrics `_clip_score_update`: processor (padding=True, no truncation), cut to max_position_embeddings,
    L2-normalised get_image_features / get_text_features, 100 · their dot product."""
    pixels = _processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=images, return_tensors="pt"
    ).pixel_values
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    ids, mask = enc.input_ids[:, :16], enc.attention_mask[:, :16]
    with torch.no_grad():
        img, txt = pt.get_image_features(pixel_values=pixels), pt.get_text_features(input_ids=ids, attention_mask=mask)
    img = getattr(img, "pooler_output", img)  # transformers 5 returns an output object
    txt = getattr(txt, "pooler_output", txt)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return (100 * (img * txt).sum(-1)).double().numpy()


def _jaxdiff_clip(pt):
    state = {k: v.numpy() for k, v in pt.state_dict().items() if not k.endswith("position_ids")}
    model = create(clip_vision.ARCHITECTURES["CLIPModel"], pt.config.to_dict(), abstract=True)
    model.params = layout.load_state_dict(model, state)
    return model, state


def test_clip_score_matches_torchmetrics_formula_on_transformers_clip(clip_case):
    pt, images, tokenizer = clip_case
    ref = _torchmetrics_scores(pt, images, PROMPTS, tokenizer)
    model, _ = _jaxdiff_clip(pt)
    image = cs.image_embeddings(model, images, batch_size=2)  # mixed sizes, a padded last batch
    with pytest.warns(UserWarning, match="1 prompt\\(s\\) longer than 16 tokens were cut"):
        ids, mask = cs.text_inputs(tokenizer, PROMPTS, 16)
    assert ids.shape == mask.shape == (5, 16) and mask[1].all() and not (ids[1] == 1).any()  # cut: no EOS left
    text = cs.text_embeddings(model, ids, mask, batch_size=4)
    assert_parity(cs.clip_scores(image, text), ref, what="per-pair 100·cos")  # |err| <= 1e-4 * max(1, max|ref|)
    with pytest.warns(UserWarning, match="1 prompt"):
        score = cs.score_images(images, PROMPTS, model, tokenizer, batch_size=2)
    assert abs(score - max(ref.mean(), 0.0)) <= 1e-4 * max(1.0, abs(ref).max())


def test_image_embeddings_split_over_eight_devices_equal_one_device(clip_case, eight_devices):
    from jaxdiff.sharding import make_mesh

    pt, images, _ = clip_case
    model, _ = _jaxdiff_clip(pt)
    one = cs.image_embeddings(model, images, batch_size=2)
    eight = cs.image_embeddings(model, images, batch_size=2, mesh=make_mesh({"data": 8}, eight_devices))
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6)  # batches of 8 rows (2 rounded up), same math


def test_separate_towers_built_from_the_clip_state_dict_give_the_same_score(clip_case):
    pt, images, tokenizer = clip_case
    model, state = _jaxdiff_clip(pt)
    config = pt.config.to_dict()
    vision = create(
        clip_vision.ARCHITECTURES["CLIPVisionModelWithProjection"],
        {**config["vision_config"], "projection_dim": config["projection_dim"]},
        abstract=True,
    )
    vision.params = layout.load_state_dict(vision, {k: v for k, v in state.items() if "vision" in k or "visual" in k})
    text = create(
        TEXT_ARCHITECTURES["CLIPTextModelWithProjection"],
        {**config["text_config"], "projection_dim": config["projection_dim"]},
        abstract=True,
    )
    text.params = layout.load_state_dict(text, {k: v for k, v in state.items() if k.startswith("text_")})
    prompts = PROMPTS[:1] + PROMPTS[2:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no prompt is cut
        both = cs.score_images(images[:4], prompts, model, tokenizer)
        towers = cs.score_images(images[:4], prompts, vision, tokenizer, text_model=text)
    assert abs(both - towers) <= 1e-5 * max(1.0, abs(both))


def test_the_clamp_applies_to_the_mean_not_to_each_pair():
    x = np.array([[1.0, 0.0], [1.0, 0.0]])
    y = np.array([[1.0, 0.0], [-0.6, 0.8]])  # cos 1 and -0.6
    assert cs.clip_scores(x, y) == pytest.approx([100.0, -60.0])
    assert cs.clip_score(x, y) == pytest.approx(20.0)  # per-pair clamping would give 50
    assert cs.clip_score(x, -x) == 0.0
    with pytest.raises(UserError, match="one text per image"):
        cs.clip_score(x, y[:1])


def test_evaluate_clip_score_on_a_saved_transformers_clip_is_torchmetrics_score(clip_case, tmp_path, capsys):
    """`jaxdiff evaluate clip-score --clip FOLDER` (transformers save_pretrained + its tokenizer) on a folder of
    PNGs: torchmetrics' value for the same images and prompts, |err| <= 1e-4 · max(1, |ref|)."""
    import json
    import shutil

    from jaxdiff import cli

    pt, images, tokenizer = clip_case
    pt.save_pretrained(tmp_path / "clip")
    shutil.copytree(TOKENIZER, tmp_path / "clip" / "tokenizer")
    rng = np.random.default_rng(5)
    pngs = np.concatenate([_images(rng, (48, 40)), _images(rng, (48, 40))])
    (tmp_path / "fake").mkdir()
    for i, image in enumerate(pngs):
        Image.fromarray(image).save(tmp_path / "fake" / f"{i}.png")
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[4]]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    args = ["--clip", tmp_path / "clip", "--fake", tmp_path / "fake", "--prompts", tmp_path / "prompts.txt"]
    rc = cli.main(["evaluate", "clip-score", *map(str, args), "--batch-size", "3", "--bootstrap", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-500:]
    record = json.loads(out)
    ref = max(_torchmetrics_scores(pt, list(pngs), prompts, tokenizer).mean(), 0.0)
    assert rc == 0 and record["n_fake"] == 4 and abs(record["value"] - ref) <= 1e-4 * max(1.0, abs(ref))
