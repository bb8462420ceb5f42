"""tools/snapshot_train.py: a `jaxdiff train` checkpoint becomes a loadable pipeline folder with the run's UNet."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdiff.config import load_config
from jaxdiff.train import config as config_lib
from jaxdiff.train import loop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import snapshot_train  # noqa: E402

OVERRIDES = ["--config.total_steps=2", "--config.checkpoint.every_steps=1", "--config.train.ema_decay=0.9"]


def test_snapshot_holds_the_runs_ema_unet_and_the_base_pipelines_rest(tmp_path):
    from jaxdiff.sampling.pipeline import load_pipeline

    config = config_lib.apply_overrides(load_config("configs/train/unet_tiny.py"), OVERRIDES)
    loop.train(config, str(tmp_path / "run"))
    out = tmp_path / "snap"
    argv = ["--config", "configs/train/unet_tiny.py", *OVERRIDES, "--workdir", str(tmp_path / "run"), "--out", str(out)]
    assert snapshot_train.main(argv) == 0
    state, _, meta = loop.restore(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    pipe = load_pipeline(out)
    want = jax.tree_util.tree_leaves(jax.device_get(state.ema_params("unet")))
    got = jax.tree_util.tree_leaves(jax.device_get(pipe.unet.params))
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    raw = jax.tree_util.tree_leaves(jax.device_get(state.params["unet"]))
    assert not all(np.array_equal(a, b) for a, b in zip(raw, want))  # the EMA, not the raw params
    assert json.loads((out / "training.json").read_text())["step"] == meta["step"] == 2
    assert pipe.unet.config["block_out_channels"] == [32, 64]
    assert (out / "tokenizer").is_dir() and (out / "vae").is_dir()  # the base (shapes) pipeline's other parts
    assert snapshot_train.main(argv) == 2  # an existing folder is kept unless --overwrite
    empty = ["--config", "configs/train/unet_tiny.py", "--workdir", str(tmp_path / "none"), "--out"]
    assert snapshot_train.main([*empty, str(tmp_path / "x")]) == 2  # no checkpoint: one line, ...
    assert not (tmp_path / "x").exists()  # ... nothing written
    assert pipe.unet.config == load_pipeline(out).unet.config
    with pytest.raises(SystemExit):  # a stray argument is an error, not ignored
        snapshot_train.main([*argv, "--overwrite", "--stepp", "1"])
