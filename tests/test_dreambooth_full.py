"""Full DreamBooth (`configs/personalize/dreambooth.py`): a smoke run trains UNet leaves only and loads back."""

import json

import numpy as np
import pytest

from jaxdiff import cli, selectors
from jaxdiff.personalize import data, tokens
from jaxdiff.sampling.pipeline import load_pipeline

DB = "configs/personalize/dreambooth.py:runlocal"
FAST = ["--no-progress", "--config.sample.num_images=0", "--config.prior.num_images=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("star")
    data.write_shapes_renders(folder, 3, "<v>")
    out = tmp_path_factory.mktemp("runs") / "db"
    args = ["personalize", "--config", DB, "--images", str(folder), "--token", "<v>", "--out", str(out), *FAST]
    assert cli.main(args) == 0
    return out


def test_full_dreambooth_changes_unet_leaves_and_nothing_on_the_text_side(run):
    base, personal = load_pipeline("shapes"), load_pipeline(run / "model")
    before, after = selectors.flatten(base.unet.params), selectors.flatten(personal.unet.params)
    assert before.keys() == after.keys()
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert len(changed) > len(before) // 2  # not just attention: convolutions, norms, time embedding move too
    assert any("conv" in "/".join(p) for p in changed) and any("attn2" in p for p in changed)
    te_before = selectors.flatten(base.text_encoders[0].params)
    te_after = selectors.flatten(personal.text_encoders[0].params)
    old = tokens.table_of(base.text_encoders[0].params)
    new = tokens.table_of(personal.text_encoders[0].params)
    assert new.shape[0] == old.shape[0] + 1
    np.testing.assert_array_equal(new[: old.shape[0]], old)  # every old row bit-identical
    for p, v in te_before.items():
        if np.shape(v) != old.shape:  # every text-encoder weight but the (grown) table
            np.testing.assert_array_equal(te_after[p], v)
    # the token's row is the fixed random init (train_token False): it equals the saved learned_embeds row
    row = tokens.load_embeds(run / tokens.EMBEDS_FILE)["<v>"]
    np.testing.assert_array_equal(new[old.shape[0] :], np.asarray(row).reshape(1, -1))
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == "dreambooth" and report["steps"] == 3
    assert report["trainable_params"] == sum(int(np.size(v)) for v in before.values())


def test_full_dreambooth_model_samples_with_the_token(run):
    personal = load_pipeline(run / "model")
    images = personal(["a <v>"], steps=2, guidance=1.0)
    assert np.asarray(images).shape[0] == 1 and np.all(np.isfinite(np.asarray(images)))


def test_config_variants():
    import importlib.util

    from jaxdiff.errors import UserError

    spec = importlib.util.spec_from_file_location("dreambooth_config", "configs/personalize/dreambooth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.get_config("shapes").method == "dreambooth" and module.get_config("runlocal").train.steps == 3
    with pytest.raises(UserError, match="unknown dreambooth config variant"):
        module.get_config("nope")
