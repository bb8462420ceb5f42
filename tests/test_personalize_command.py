"""`jaxdiff personalize` end to end (tiny run, resume after a lost checkpoint) and its one-line input errors."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxdiff import cli, personalize
from jaxdiff.personalize import data, tokens
from jaxdiff.sampling import text
from jaxdiff.sampling.pipeline import load_pipeline

TI = "configs/personalize/textual_inversion.py:runlocal"
FAST = ["--no-progress", "--config.sample.num_images=0", "--config.train.checkpoint_every=1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("star")
    data.write_shapes_renders(folder, 3, "<v>")
    return folder


@pytest.fixture(scope="module")
def ti_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ti"
    args = ["personalize", "--config", TI, "--images", str(images), "--token", "<v>", "--out", str(out), *FAST]
    assert cli.main(args) == 0
    first = tokens.load_embeds(out / tokens.EMBEDS_FILE)["<v>"]
    report = json.loads((out / "report.json").read_text())
    return out, args, first, report


def test_run_writes_a_loadable_model_whose_old_rows_and_ids_are_unchanged(ti_run):
    out, _, row, report = ti_run
    assert report["steps"] == 3 and report["token_id"] == 308 and report["trainable_params"] == 128
    personal = load_pipeline(out / "model")
    base = load_pipeline("shapes")
    table = np.asarray(tokens.table_of(personal.text_encoders[0].params))
    old = np.asarray(tokens.table_of(base.text_encoders[0].params))
    assert table.shape == (309, 128)
    np.testing.assert_array_equal(table[:308], old)  # every existing row: the same bits after training
    np.testing.assert_array_equal(table[308], row[0])
    init = np.asarray(tokens.init_rows(old, "object", base.tokenizers[0]))[0]
    assert not np.array_equal(row[0], init)  # the new row trained
    prompts = ["a red circle on the left", "a picture of a blue square on a grey background"]
    np.testing.assert_array_equal(
        text.tokenize(personal.tokenizers[0], prompts), text.tokenize(base.tokenizers[0], prompts)
    )
    assert personal.tokenizers[0]("a red <v>").input_ids[3] == 308
    for a, b in zip(jax.tree_util.tree_leaves(personal.unet.params), jax.tree_util.tree_leaves(base.unet.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # textual inversion leaves the UNet alone
    applied = personalize.apply(base, out)
    np.testing.assert_array_equal(np.asarray(tokens.table_of(applied.text_encoders[0].params)), table)
    assert (out / "samples.png").is_file() and "load_pipeline" in (out / "report.md").read_text()


def test_rerun_after_losing_the_last_checkpoint_resumes_and_ends_bitwise_equal(ti_run):
    out, args, first, _ = ti_run
    shutil.rmtree(out / "train" / "checkpoints" / "3")  # as if killed after step 2's checkpoint
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from"] == 2 and report["steps"] == 3
    np.testing.assert_array_equal(tokens.load_embeds(out / tokens.EMBEDS_FILE)["<v>"], first)


def _mixed(folder):
    data.write_shapes_renders(folder, 2, "<v>")
    data.write_shapes_renders(folder / "big", 1, "<v>", size=64)
    shutil.move(folder / "big" / "000.png", folder / "zz.png")
    return folder


@pytest.mark.parametrize(
    "case, token, message",
    [
        ("empty", "<v>", "no images"),
        ("missing", "<v>", "not a folder"),
        ("mixed", "<v>", "images of different sizes"),
        ("ok", "red", "already exists in the tokenizer's vocabulary"),
        ("ok", "<w>", "does not contain the token '<w>'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, images, capsys, case, token, message):
    folder = {"empty": tmp_path / "empty", "missing": tmp_path / "none", "ok": images}.get(case)
    if case == "empty":
        folder.mkdir()
    if case == "mixed":
        folder = _mixed(tmp_path / "mixed")
    out = tmp_path / "out"
    code = cli.main(["personalize", "--config", TI, "--images", str(folder), "--token", token, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_help_names_the_flags(capsys):
    assert cli.main(["personalize", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--images", "--token", "--out", "--config"))


def test_custom_diffusion_trains_only_cross_attention_kv_and_the_token_row(images, tmp_path):
    from jaxdiff import selectors

    out = tmp_path / "cd"
    config = "configs/personalize/custom_diffusion.py:runlocal"
    args = ["personalize", "--config", config, "--images", str(images), "--token", "<v>", "--out", str(out), *FAST]
    assert cli.main([*args, "--config.prior.num_images=2"]) == 0
    base, personal = load_pipeline("shapes"), load_pipeline(out / "model")
    before, after = selectors.flatten(base.unet.params), selectors.flatten(personal.unet.params)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    kv = {p for p in before if "attn2" in p and p[-2] in ("to_k", "to_v") and p[-1] == "kernel"}
    assert changed and changed <= kv  # nothing outside attn2's key/value kernels moved
    old = tokens.table_of(base.text_encoders[0].params)
    new = tokens.table_of(personal.text_encoders[0].params)
    np.testing.assert_array_equal(new[: old.shape[0]], old)  # every old row bit-identical
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "custom_diffusion" and report["trainable_params"] > old.shape[1]
