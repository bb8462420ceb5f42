"""`jaxdiff controlnet-train` on a tiny random pipeline (a loadable net, resume, one-line errors), the renderer's exact
condition images and the placement measure."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from jaxdiff import cli
from jaxdiff.control import data, evaluate, net
from jaxdiff.data import shapes as S

SMOKE = "configs/controlnet/shapes_mask.py:smoke"
TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 128,  # the shapes text encoder's width
    "attention_head_dim": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
SCENES = [
    S.Scene(
        (
            S.ShapeObject("triangle", "red", "large", "left", 0.02, -0.01),
            S.ShapeObject("circle", "blue", "small", "right"),
        ),
        "grey",
    ),
    S.Scene((S.ShapeObject("square", "yellow", "small", "center", -0.02, 0.03),), "white"),
    S.Scene((S.ShapeObject("star", "green", "large", "center"),), "black"),
]

# ------------------------------------------------------------------------------------------- condition images


@pytest.mark.parametrize("size", [32, 64])
def test_mask_is_the_rendered_objects_coverage_white_on_black(size):
    for scene in SCENES:
        image, mask = S.render(scene, size), S.render_mask(scene, size)
        assert mask.shape == (size, size, 3) and mask.dtype == np.uint8
        assert (mask == mask[..., :1]).all()  # grey: three equal channels
        drawn = (image != np.asarray(S.RGB[scene.background], np.uint8)).any(-1)
        np.testing.assert_array_equal(mask[..., 0] > 0, drawn)  # the mask covers exactly the object's pixels
        coverage = sum(S.coverage(o, size) for o in scene.objects)
        np.testing.assert_array_equal(mask[..., 0], np.rint(255 * coverage).astype(np.uint8))  # anti-aliased as render


def test_edges_are_a_band_inside_the_mask():
    for scene in SCENES:
        mask, edges = S.render_mask(scene), S.render_edges(scene)
        assert (edges[..., 0] > 0).any() and ((edges[..., 0] > 0) <= (mask[..., 0] > 0)).all()
        assert (edges <= mask).all() and (edges[..., 0] == 255).sum() < (mask[..., 0] == 255).sum() / 2
    big = S.Scene((S.ShapeObject("square", "red", "large", "center"),), "white")
    assert S.render_edges(big)[16, 16, 0] == 0 and S.render_mask(big)[16, 16, 0] == 255  # hollow inside


def test_training_batches_are_a_function_of_the_step():
    from jaxdiff.sampling import text
    from jaxdiff.sampling.pipeline import BUILTIN

    examples = data.Examples(text.load_tokenizer(BUILTIN["shapes"] / "tokenizer"), 32, 3, "mask", seed=1)
    a, b = examples(5), examples(5)
    assert a["image"].shape == a["cond"].shape == (3, 32, 32, 3) and a["input_ids"].dtype == np.int32
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], examples(6)["image"])
    drawn = (a["image"] != a["image"][:, :1, :1]).any(-1)  # the border pixel is background in this world
    np.testing.assert_array_equal(a["cond"][..., 0] > 0, drawn)


# ------------------------------------------------------------------------------------------- the placement measure


def test_iou_of_renders_with_their_own_masks_is_near_one_and_of_empty_images_zero():
    images = np.stack([S.render(s) for s in SCENES]).astype(np.float32) / 255
    counts = [len(s.objects) for s in SCENES]
    target = evaluate.target_masks(SCENES, 32)
    assert (evaluate.iou(evaluate.segmented_masks(images, counts), target) > 0.9).all()
    blank = np.full_like(images, 0.6)
    np.testing.assert_array_equal(evaluate.iou(evaluate.segmented_masks(blank, counts), target), 0.0)
    shifted = np.roll(target, 8, axis=2)
    assert (evaluate.iou(shifted, target) < 0.8).all()


def test_attributes_correct_needs_every_object():
    labels = [S.scene_labels(s) for s in SCENES]
    batched = {k: np.stack([lab[k] for lab in labels]) for k in labels[0]}
    from jaxdiff.metrics import pixel_judge

    truth = pixel_judge.targets(batched)
    ok = evaluate.attributes_correct(truth, batched)
    assert ok["shape"].all() and ok["colour"].all()
    wrong = {**truth, "colour1": np.where(truth["colour1"] >= 0, (truth["colour1"] + 1) % 4, -1)}
    ok = evaluate.attributes_correct(wrong, batched)
    assert ok["shape"].all() and ok["colour"].tolist() == [False, True, True]


# ------------------------------------------------------------------------------------------- the command


def _draw(rng, path, leaf):
    if path[-1].key == "scale":
        return np.ones(leaf.shape, np.float32)
    return (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """The shapes VAE, text encoder, tokenizer and scheduler around a tiny random UNet (16, 32 channels)."""
    from jaxdiff.convert import checkpoint
    from jaxdiff.models import unet
    from jaxdiff.models.model import create
    from jaxdiff.sampling.pipeline import BUILTIN, load_pipeline

    folder = tmp_path_factory.mktemp("tinypipe") / "pipe"
    shapes = load_pipeline("shapes")
    tiny = create(unet.ARCHITECTURES["UNet2DConditionModel"], TINY_UNET, abstract=True, attention="einsum")
    rng = np.random.default_rng(0)  # random weights drawn on the host: no init program to compile
    tiny = dataclasses.replace(
        tiny, params=jax.tree_util.tree_map_with_path(lambda p, x: _draw(rng, p, x), tiny.params)
    )
    checkpoint.save_checkpoint(folder, {"unet": tiny, "vae": shapes.vae, "text_encoder": shapes.text_encoders[0]})
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(BUILTIN["shapes"] / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def smoke_run(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("cn") / "run"
    argv = ["controlnet-train", "--config", SMOKE, "--model", str(tiny_pipeline), "--out", str(out), "--no-progress"]
    argv += ["--config.train.batch_size=2", "--config.controlnet.conditioning_embedding_out_channels=(8, 8, 16)"]
    assert cli.main(argv) == 0
    return out, argv


def test_a_fresh_controlnet_is_the_unets_down_path_with_zero_convs(tiny_pipeline):
    from jaxdiff.erase.common import flatten
    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline(tiny_pipeline)
    start = net.from_unet(pipe.unet, pipe.vae_scale_factor, (8, 8, 16))
    flat, unet_flat = flatten(start.params), flatten(pipe.unet.params)
    for path, leaf in flat.items():
        if path[0].startswith(net.ZEROED) or path[:2] == ("controlnet_cond_embedding", "conv_out"):
            assert not np.asarray(leaf).any(), path
        elif path[0] != "controlnet_cond_embedding":
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(unet_flat[path]))
    with pytest.raises(ValueError, match="give 3 channel counts"):
        net.from_unet(pipe.unet, pipe.vae_scale_factor, (8, 16))


def test_smoke_run_writes_a_controlnet_that_load_pipeline_accepts(tiny_pipeline, smoke_run):
    from jaxdiff.erase.common import flatten
    from jaxdiff.sampling.pipeline import load_pipeline

    out, _ = smoke_run
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["resumed_from"] == 0 and np.isfinite(report["loss_last"])
    pipe = load_pipeline(tiny_pipeline, controlnet=out / "controlnet")
    (cn,) = pipe.controlnets
    assert cn.config["conditioning_embedding_out_channels"] == [8, 8, 16]
    assert np.asarray(flatten(cn.params)[("controlnet_mid_block", "kernel")]).any()  # the zero convs trained
    assert (out / "example_condition.png").is_file() and "load_pipeline" in (out / "report.md").read_text()
    assert len((out / "train" / "metrics.jsonl").read_text().splitlines()) == 3


def test_rerun_after_losing_the_last_checkpoint_resumes_and_ends_bitwise_equal(smoke_run):
    from jaxdiff.convert.safetensors_io import load_safetensors

    out, argv = smoke_run
    first = load_safetensors(out / "controlnet" / "params.safetensors", copy=True)
    shutil.rmtree(out / "train" / "checkpoints" / "3")  # as if killed after step 2's checkpoint
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from"] == 2 and report["steps"] == 3
    again = load_safetensors(out / "controlnet" / "params.safetensors", copy=True)
    assert first.keys() == again.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])


def test_bad_config_key_and_another_config_in_out_are_one_line_errors(smoke_run, tmp_path, capsys):
    out, argv = smoke_run
    fresh = tmp_path / "new"
    code = cli.main(["controlnet-train", "--config", SMOKE, "--out", str(fresh), "--config.train.stepz=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "unknown config key 'train.stepz'" in err and "train.steps" in err
    assert not fresh.exists()
    assert cli.main([*argv, "--config.condition=edges"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "condition: 'mask' -> 'edges'" in err
