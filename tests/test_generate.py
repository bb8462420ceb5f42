"""`jaxdiff generate`: PNGs, a grid and a JSON record; bad input is one line, exit 2, nothing written."""

import json

import numpy as np
import pytest
from PIL import Image
from test_convert_io import tiny_pipeline

from jaxdiff import cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("genpipe") / "pipe")


def test_generate_writes_images_grid_and_record(folder, tmp_path):
    out = tmp_path / "out"
    argv = ["generate", "a b c", "x y", "--model", str(folder), "--steps", "3", "--seed", "7", "--out", str(out)]
    assert cli.main(argv + ["--num-images", "2", "--quiet", "--buckets", "16x16,32x16"]) == 0
    record = json.loads((out / "generate.json").read_text())
    assert record["steps"] == 3 and record["scheduler"] == "ddim" and record["seed"] == 7
    assert [r["prompt"] for r in record["images"]] == ["a b c", "a b c", "x y", "x y"]
    assert [r["seed"] for r in record["images"]] == [7, 8, 7, 8]
    first = np.asarray(Image.open(out / record["images"][0]["file"]))
    assert first.shape == (16, 16, 3)
    assert Image.open(out / "grid.png").size[0] > 2 * 16
    # The same prompt and seed give the same image whatever else is in the batch.
    out2 = tmp_path / "out2"
    assert (
        cli.main(
            ["generate", "a b c", "--model", str(folder), "--steps", "3", "--seed", "7", "--out", str(out2), "--quiet"]
        )
        == 0
    )
    again = np.asarray(Image.open(out2 / json.loads((out2 / "generate.json").read_text())["images"][0]["file"]))
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--steps", "0"], "steps must be positive"),
        (["--height", "10"], "--height must be a positive multiple of"),
        (["--width", "-8"], "--width must be a positive multiple of"),
        (["--model", "/no/such/model"], "no model at"),
        (["--scheduler", "bogus"], "--scheduler 'bogus' is unknown"),
        (["--steps", "5000"], "cannot be larger than num_train_timesteps"),
        (["--negative", "a", "--negative", "b"], "one --negative for all prompts"),
        (["--buckets", "16x"], "bucket '16x' is not HEIGHTxWIDTH"),
        (["--buckets", "16x10"], "--width must be a positive multiple of"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(folder, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["generate", "a b", "--model", str(folder), "--out", str(out), "--quiet", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_prompt_longer_than_the_tokenizer_allows(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["generate", "a " * 40, "--model", str(folder), "--out", str(out), "--quiet"]) == 2
    assert "longer than" in capsys.readouterr().err
    assert not out.exists()


def test_img2img_and_inpainting_from_files(folder, tmp_path, capsys):
    from jaxdiff.images import save_png

    rng = np.random.default_rng(0)
    save_png(tmp_path / "in.png", rng.uniform(0, 1, (16, 16, 3)))
    mask = np.zeros((16, 16, 3))
    mask[4:12, 4:12] = 1.0
    save_png(tmp_path / "mask.png", mask)
    save_png(tmp_path / "small.png", mask[:8, :8])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    common = ["generate", "a b", "--model", str(folder), "--quiet", "--steps", "4", "--image", str(tmp_path / "in.png")]
    assert cli.main([*common, "--buckets", "16x16", "--out", str(tmp_path / "c")]) == 2
    assert "with --image the image sets the size" in capsys.readouterr().err
    out = tmp_path / "out"
    assert cli.main([*common, "--mask", str(tmp_path / "mask.png"), "--out", str(out)]) == 0
    record = json.loads((out / "generate.json").read_text())
    assert (record["height"], record["width"], record["strength"]) == (16, 16, None)
    assert record["mask"].endswith("mask.png")
    for extra, message in [
        (["--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--mask", str(tmp_path / "small.png")], "--mask is 8x8 but --image is 16x16"),
        (["--image", str(tmp_path / "broken.png")], "not a readable image"),
        (["--image", str(tmp_path / "none.png")], "no image at"),
    ]:
        bad = tmp_path / "bad"
        assert cli.main([*common, *extra, "--out", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not bad.exists()
    argv = ["generate", "a b", "--model", str(folder), "--quiet", "--strength", "0.5", "--out", str(tmp_path / "b")]
    assert cli.main(argv) == 2
    assert "need --image" in capsys.readouterr().err


def test_bf16_weights_halve_the_params_and_draw_the_same_image(folder, tmp_path):
    """`--weights-dtype bfloat16` holds every component's floating params in bf16 (half their bytes); at float32
    compute the image stays within 4/255 per pixel of float32 weights' (bf16 rounds each weight by ≤ 2^-9
    relative; measured ≤ 1/255 on this tiny pipeline)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.sampling.pipeline import load_pipeline

    full, half = load_pipeline(folder), load_pipeline(folder, weights_dtype=jnp.bfloat16)
    for name in ("unet", "vae"):
        leaves = jax.tree_util.tree_leaves(getattr(half, name).params)
        assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}, name
        bytes_of = [sum(x.nbytes for x in jax.tree_util.tree_leaves(getattr(p, name).params)) for p in (full, half)]
        assert bytes_of[1] * 2 == bytes_of[0], name
    assert {x.dtype for x in jax.tree_util.tree_leaves(half.text_encoders[0].params)} == {jnp.dtype(jnp.bfloat16)}
    images = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        argv = ["generate", "a b c", "--model", str(folder), "--steps", "3", "--out", str(out), "--quiet"]
        assert cli.main(argv + ["--weights-dtype", dtype]) == 0
        record = json.loads((out / "generate.json").read_text())
        assert record["weights_dtype"] == dtype
        images[dtype] = np.asarray(Image.open(out / record["images"][0]["file"]), np.int16)
    difference = np.abs(images["float32"] - images["bfloat16"])
    assert difference.max() <= 4, difference.max()
